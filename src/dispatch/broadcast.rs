//! Broadcast dispatch: every client reads the task log through its own
//! cursor; what it left unanswered is delivered to it again first. Its
//! cursor is also what tells a resent answer: a task behind it that the
//! client neither holds nor is owed was answered by it already.

use super::{bury, note, record, stale, Answer, Dispatcher, InFlight, State};
use crate::feed::{Delivery, SendError};
use crate::journal::Record;
use crate::results::ResultRecord;
use std::time::Instant;

impl Dispatcher {
    pub(super) fn complete_broadcast(
        &self,
        st: &mut State,
        client: &str,
        answer: Answer,
    ) -> Option<ResultRecord> {
        let Some(c) = st.clients.get_mut(client) else {
            return stale(&st.log, client, answer);
        };
        let (id, attempt) = (answer.task_id, answer.attempt);
        let pos = if id == 0 {
            (!c.in_flight.is_empty()).then_some(0)
        } else {
            c.in_flight.iter().position(|f| {
                f.delivery.task.id == id && (attempt == 0 || f.delivery.attempt == attempt)
            })
        };
        let (delivery, latency, answered_held) = match pos.and_then(|p| c.in_flight.remove(p)) {
            Some(f) => (f.delivery, Some(f.sent_at.elapsed()), true),
            None => match c.holds(id) {
                // Settled for it already: an answer it sends again.
                None if c.answered_before(&st.log, id, attempt, self.config.max_attempts) => {
                    return None
                }
                None => return stale(&st.log, client, answer),
                // A refusal it sent again (its acknowledgement was lost) while
                // the next attempt waits or is out: not another refusal.
                Some(_)
                    if answer.is_refusal()
                        && c.refusing
                            .get(&id)
                            .is_some_and(|(first, last)| (*first..=*last).contains(&attempt)) =>
                {
                    return None
                }
                // A refusal of an attempt superseded by one it holds (or is
                // owed) now: the newer attempt is untouched.
                Some(_) if answer.is_refusal() => return stale(&st.log, client, answer),
                // An earlier attempt's answer, while this client holds (or is
                // about to be sent) the task again, still counts; its answer
                // to the later attempt will then be a resend.
                Some(later) if attempt != 0 && later > attempt => {
                    let (d, in_flight) = c.take_held(id).expect("held, as just seen");
                    let d = Delivery {
                        task: d.task,
                        attempt,
                    };
                    (d, None, in_flight)
                }
                Some(_) => return stale(&st.log, client, answer),
            },
        };
        st.registry
            .result_received(client, answered_held, answer.reported());
        let retry = answer.is_refusal();
        let out = record(client, &delivery, &answer, latency, retry);
        let c = st.clients.get_mut(client).expect("looked up above");
        let id = delivery.task.id;
        if !retry {
            c.refusing.remove(&id);
        } else if delivery.attempt >= self.config.max_attempts {
            c.buried(id);
            let reason = format!("refused: {}", answer.output);
            bury(st, self.sink.as_ref(), &delivery, client, reason);
        } else {
            let run = c
                .refusing
                .entry(id)
                .or_insert((delivery.attempt, delivery.attempt));
            run.1 = delivery.attempt;
            let due = Instant::now() + self.config.retry_backoff.delay(delivery.attempt);
            let again = Delivery {
                task: delivery.task,
                attempt: delivery.attempt + 1,
            };
            c.delayed.insert((due, id), again);
            st.counters.redelivered += 1;
            self.arm_retry(st, client);
        }
        Some(out)
    }

    /// Offers `client` what it must get again, then the tasks it has not
    /// seen, up to its credit — when its credit is open (see
    /// `ClientState::filling`). A client that took everything there was is
    /// filed in `caught_up`, for the next task to wake.
    pub(super) fn pump_broadcast(&self, st: &mut State, client: &str) {
        let k = self.config.max_in_flight;
        st.visits += 1;
        st.caught_up.remove(client);
        loop {
            let Some(c) = st.clients.get_mut(client) else {
                return;
            };
            let Some((_, tx)) = c.session.as_ref() else {
                return;
            };
            if c.blocked {
                if tx.is_full() {
                    return;
                }
                c.blocked = false;
                st.blocked.remove(client);
            }
            // Drained by an operator: nothing new until it is let go.
            if c.drained || !c.filling || c.in_flight.len() >= k {
                break;
            }
            let delivery = match c.redeliver.pop_front() {
                Some(d) => d,
                None => {
                    let first = st.log.first_id();
                    if c.cursor < first {
                        let behind = c.cursor;
                        note(&mut st.notes, log::Level::Warn, || {
                            format!(
                                "client {client} fell behind the retained history; tasks {behind}..{} were dropped for it (raise --retain)",
                                first - 1
                            )
                        });
                        c.cursor = first;
                    }
                    match st.log.next_for(client, c.cursor) {
                        Some(task) => {
                            c.cursor = task.id + 1;
                            Delivery {
                                task: task.clone(),
                                attempt: 1,
                            }
                        }
                        None => {
                            c.cursor = st.log.next_id();
                            st.caught_up.insert(c.name.clone());
                            break;
                        }
                    }
                }
            };
            // Cancelled by an operator: skipped (its cursor has moved on).
            if st.cancelled.contains(&delivery.task.id) {
                continue;
            }
            if let Err(e) = tx.send(delivery.clone()) {
                // Full (not read fast enough): later. Closed: the stream is
                // gone and will detach itself; the task waits for its return.
                let full = matches!(e, SendError::Full(_));
                c.redeliver.push_front(e.into_delivery());
                if full {
                    c.blocked = true;
                    st.blocked.insert(c.name.clone());
                }
                break;
            }
            log::debug!(
                "task {} (attempt {}) sent to {client}",
                delivery.task.id,
                delivery.attempt
            );
            if !c.ephemeral {
                self.journal(&mut st.journal_out, || Record::Sent {
                    task: delivery.task.id,
                    client: client.to_string(),
                    attempt: delivery.attempt,
                });
            }
            c.in_flight.push_back(InFlight::new(delivery));
            let unarmed = c.ack_timer.is_none();
            st.registry.task_sent(client);
            st.counters.sent += 1;
            if unarmed {
                self.arm_ack(st, client);
            }
        }
        self.refile(st, client);
    }
}
