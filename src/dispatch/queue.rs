//! Queue dispatch: each task goes to one connected client, the one with
//! credit and the fewest tasks in flight; the `WorkQueue` fences answers.

use super::{bury, record, stale, Answer, Dispatcher, InFlight, State};
use crate::feed::{Delivery, SendError};
use crate::journal::Record;
use crate::results::ResultRecord;
use crate::task::Task;
use std::sync::Arc;
use std::time::Instant;

impl Dispatcher {
    pub(super) fn complete_queue(
        &self,
        st: &mut State,
        client: &str,
        answer: Answer,
    ) -> Option<ResultRecord> {
        // A seed client sends no task id: it answers its oldest delivery.
        let (task_id, attempt) = match (answer.task_id, st.clients.get(client)) {
            (0, Some(c)) => match c.in_flight.front() {
                Some(f) => (f.delivery.task.id, f.delivery.attempt),
                None => return stale(&st.log, client, answer),
            },
            _ => (answer.task_id, answer.attempt),
        };
        if st
            .clients
            .get(client)
            .is_some_and(|c| c.answered(task_id, attempt))
        {
            // A resend of an answer already counted (its acknowledgement was lost).
            return None;
        }
        if !st.queue.is_current(task_id, client, attempt) {
            return stale(&st.log, client, answer);
        }
        let q = st.queue.get(task_id).expect("current implies unfinished");
        let current = q.attempt;
        if answer.is_refusal() && attempt < current {
            // It refused an attempt it holds again by now (the refusal was
            // resent after a reconnect): the newer attempt is untouched.
            return stale(&st.log, client, answer);
        }
        let delivery = Delivery {
            task: q.task.clone(),
            attempt: if attempt == 0 { current } else { attempt },
        };
        let mut latency = None;
        if let Some(c) = st.clients.get_mut(client) {
            if let Some(p) = c
                .in_flight
                .iter()
                .position(|f| f.delivery.task.id == task_id)
            {
                latency = c.in_flight.remove(p).map(|f| f.sent_at.elapsed());
            }
            if delivery.attempt != current {
                // Its answer to the current attempt will be a resend.
                c.remember(task_id, current);
            }
        }
        st.registry.result_received(client, latency.is_some());
        let retry = answer.is_refusal();
        let out = record(client, &delivery, &answer, latency, retry);
        if retry {
            if delivery.attempt >= self.config.max_attempts {
                st.queue.finish(task_id);
                bury(
                    st,
                    self.sink.as_ref(),
                    &delivery,
                    client,
                    format!("refused: {}", answer.output),
                );
            } else {
                if let Some(c) = st.clients.get_mut(client) {
                    c.remember_refusal(task_id, delivery.attempt);
                }
                // Held (or just released): available again after its
                // backoff, preferably elsewhere.
                let due = Instant::now() + self.config.retry_backoff.delay(delivery.attempt);
                st.queue.release_at(task_id, client, due);
                st.counters.redelivered += 1;
            }
        } else {
            st.queue.finish(task_id);
            if let Some(c) = st.clients.get_mut(client) {
                c.remember(task_id, attempt);
            }
        }
        Some(out)
    }

    /// Hands waiting tasks out: targeted ones to their client, the others to
    /// the connected client with credit and the fewest tasks in flight.
    pub(super) fn pump_queue(&self, st: &mut State) {
        let k = self.config.max_in_flight;
        let mut open: Vec<String> = st
            .clients
            .iter()
            .filter(|(_, c)| c.session.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        // Credit, and room in its feed: a feed still holding deliveries taken
        // back from it (its stream is not read) takes nothing now, so that no
        // attempt is spent on a delivery that cannot be made.
        let has_room = |st: &State, name: &str| {
            st.clients.get(name).is_some_and(|c| {
                c.in_flight.len() < k && c.session.as_ref().is_some_and(|(_, tx)| !tx.is_full())
            })
        };
        // Clients whose feed refused a delivery get no more in this round.
        open.retain(|name| {
            while has_room(st, name) {
                let Some((task, attempt)) = st.queue.take_for(name, true) else {
                    break;
                };
                if !self.send_queued(st, name, task, attempt) {
                    return false;
                }
            }
            true
        });
        while let Some(next) = st.queue.next_ready() {
            let avoid = next.avoid.clone();
            let best = open
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    st.clients
                        .get(n)
                        .filter(|_| has_room(st, n))
                        .map(|c| (i, n, c.in_flight.len()))
                })
                // Not back to the client that let it go, unless it is the only one with room.
                .min_by_key(|(_, n, held)| (avoid.as_ref() == Some(*n), *held))
                .map(|(i, n, _)| (i, n.clone()));
            let Some((i, name)) = best else { break };
            let Some((task, attempt)) = st.queue.take_for(&name, false) else {
                break;
            };
            if !self.send_queued(st, &name, task, attempt) {
                open.swap_remove(i);
            }
        }
    }

    /// Writes a task into `client`'s feed; false when the feed took it not
    /// (the task is back in the queue). A full feed (its stream is not
    /// being read fast enough) only means "no more for now"; a closed one
    /// ends the session.
    fn send_queued(&self, st: &mut State, client: &str, task: Arc<Task>, attempt: u32) -> bool {
        let c = st.clients.get_mut(client).expect("open client");
        let delivery = Delivery { task, attempt };
        let Some((_, tx)) = c.session.as_ref() else {
            st.queue.release(delivery.task.id, None);
            return false;
        };
        match tx.send(delivery.clone()) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                st.queue.release(delivery.task.id, Some(client));
                return false;
            }
            Err(SendError::Closed(_)) => {
                // Its stream just went away: back to the queue for someone else.
                st.queue.release(delivery.task.id, None);
                self.end_session(st, client, "task stream closed");
                return false;
            }
        }
        log::debug!(
            "task {} (attempt {attempt}) sent to {client}",
            delivery.task.id
        );
        self.journal(|| Record::Sent {
            task: delivery.task.id,
            client: client.to_string(),
            attempt,
        });
        c.in_flight.push_back(InFlight::new(delivery));
        st.registry.task_sent(client);
        st.counters.sent += 1;
        true
    }
}
