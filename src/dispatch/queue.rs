//! Queue dispatch: each task goes to one connected client, the one with
//! credit and the fewest tasks in flight (first in `State::ready`); the
//! `WorkQueue` fences answers, and the task log keeps who answered a task
//! while it is retained, so that a resent answer is recognised.

use super::{bury, record, stale, Answer, Dispatcher, InFlight, State};
use crate::feed::{Delivery, SendError};
use crate::journal::Record;
use crate::registry::ClientId;
use crate::results::ResultRecord;
use crate::task::{Settled, Task};
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
        let Some(q) = st.queue.get(task_id) else {
            // Settled: by this very answer, sent again after its
            // acknowledgement was lost, or it is stale.
            return match st.log.settled(task_id) {
                Some(Settled::Answered {
                    client: who,
                    first,
                    last,
                }) if **who == *client && (*first..=*last).contains(&attempt) => None,
                _ => stale(&st.log, client, answer),
            };
        };
        if answer.is_refusal()
            && q.refused.as_ref().is_some_and(|(who, first, last)| {
                **who == *client && (*first..=*last).contains(&attempt)
            })
        {
            // A refusal it sent again: not another refusal.
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
        let mut name: ClientId = ClientId::from(client);
        if let Some(c) = st.clients.get_mut(client) {
            name = c.name.clone();
            if let Some(p) = c
                .in_flight
                .iter()
                .position(|f| f.delivery.task.id == task_id)
            {
                latency = c.in_flight.remove(p).map(|f| f.sent_at.elapsed());
            }
        }
        st.registry
            .result_received(client, latency.is_some(), answer.reported());
        let retry = answer.is_refusal();
        let out = record(client, &delivery, &answer, latency, retry);
        if !retry {
            st.queue.finish(task_id);
            // Its answer to any attempt up to the current one is this one.
            let answered = Settled::Answered {
                client: name,
                first: delivery.attempt,
                last: current,
            };
            st.log.settle(task_id, answered);
        } else if delivery.attempt >= self.config.max_attempts {
            st.queue.finish(task_id);
            st.log.settle(task_id, Settled::Dead);
            let reason = format!("refused: {}", answer.output);
            bury(st, self.sink.as_ref(), &delivery, client, reason);
        } else {
            st.queue.refused(task_id, &name, delivery.attempt);
            // Held (or just released): available again after its
            // backoff, preferably elsewhere.
            let due = Instant::now() + self.config.retry_backoff.delay(delivery.attempt);
            st.queue.release_at(task_id, &name, due);
            st.counters.redelivered += 1;
        }
        Some(out)
    }

    /// Hands `client` the targeted tasks waiting for it, while it takes tasks.
    pub(super) fn pump_queue_client(&self, st: &mut State, client: &str) {
        st.visits += 1;
        loop {
            let Some(c) = st.clients.get(client) else {
                return;
            };
            if c.ready_key.is_none() || !st.queue.has_waiting_for(client) {
                return;
            }
            if c.feed_full() {
                self.block(st, client);
                return;
            }
            let name = c.name.clone();
            let Some((task, attempt)) = st.queue.take_for(&name, true) else {
                return;
            };
            if !self.send_queued(st, &name, task, attempt) {
                return;
            }
        }
    }

    /// Hands the waiting untargeted tasks out, each to the first client in
    /// `ready` (the fewest in flight) — not back to the client that let it
    /// go, unless it is the only one taking tasks.
    pub(super) fn pump_queue_ready(&self, st: &mut State) {
        while let Some(next) = st.queue.next_ready() {
            let mut first = st.ready.iter().take(2).map(|(_, name)| name);
            let pick = match (first.next(), first.next()) {
                (Some(a), Some(b)) if next.avoid.as_ref() == Some(a) => b.clone(),
                (Some(a), _) => a.clone(),
                (None, _) => return,
            };
            st.visits += 1;
            // Credit, and room in its feed: a feed still holding deliveries
            // taken back from it (its stream is not read) takes nothing now,
            // so that no attempt is spent on a delivery that cannot be made.
            if st.clients.get(&pick).is_none_or(|c| c.feed_full()) {
                self.block(st, &pick);
                continue;
            }
            let Some((task, attempt)) = st.queue.take_for(&pick, false) else {
                return;
            };
            self.send_queued(st, &pick, task, attempt);
        }
    }

    /// Writes a task into `client`'s feed; false when the feed took it not
    /// (the task is back in the queue). A full feed (its stream is not
    /// being read fast enough) only means "no more for now"; a closed one
    /// ends the session.
    fn send_queued(
        &self,
        st: &mut State,
        client: &ClientId,
        task: Arc<Task>,
        attempt: u32,
    ) -> bool {
        if st.cancelled.contains(&task.id) {
            // Cancelled while in an agent's hands, and given back since.
            st.queue.finish(task.id);
            st.log.settle(task.id, Settled::Cancelled);
            return true;
        }
        let c = st.clients.get_mut(client).expect("open client");
        let delivery = Delivery { task, attempt };
        let id = delivery.task.id;
        let Some((_, tx)) = c.session.as_ref() else {
            st.queue.release(id, None);
            return false;
        };
        match tx.send(delivery.clone()) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                st.queue.release(id, Some(client));
                self.block(st, client);
                return false;
            }
            Err(SendError::Closed(_)) => {
                // Its stream just went away: back to the queue for someone else.
                st.queue.release(id, None);
                self.end_session(st, client, "task stream closed");
                return false;
            }
        }
        log::debug!("task {id} (attempt {attempt}) sent to {client}");
        self.journal(&mut st.journal_out, || Record::Sent {
            task: id,
            client: client.to_string(),
            attempt,
        });
        c.in_flight.push_back(InFlight::new(delivery));
        let unarmed = c.ack_timer.is_none();
        st.registry.task_sent(client);
        st.counters.sent += 1;
        if unarmed {
            self.arm_ack(st, client);
        }
        self.refile(st, client);
        true
    }
}
