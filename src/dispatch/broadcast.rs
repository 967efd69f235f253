//! Broadcast dispatch: every client reads the task log through its own
//! cursor; what it left unanswered is delivered to it again first.

use super::{bury, record, stale, Answer, Dispatcher, InFlight, State};
use crate::feed::Delivery;
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
        let pos = if answer.task_id == 0 {
            (!c.in_flight.is_empty()).then_some(0)
        } else {
            c.in_flight.iter().position(|f| {
                f.delivery.task.id == answer.task_id
                    && (answer.attempt == 0 || f.delivery.attempt == answer.attempt)
            })
        };
        let superseded = |d: &Delivery| {
            d.task.id == answer.task_id && answer.attempt != 0 && d.attempt > answer.attempt
        };
        let (delivery, latency) = match pos.and_then(|p| c.in_flight.remove(p)) {
            Some(f) => (f.delivery, Some(f.sent_at.elapsed())),
            None if c.answered(answer.task_id, answer.attempt) => return None,
            // A refusal of an attempt superseded by one it holds (or is owed)
            // now: the newer attempt is untouched.
            None if answer.is_refusal() => return stale(&st.log, client, answer),
            None => {
                // An earlier attempt's answer, while this client holds (or is
                // about to be sent) the task again, still counts.
                let resent = c.in_flight.iter().position(|f| superseded(&f.delivery));
                let later = match resent.and_then(|p| c.in_flight.remove(p)) {
                    Some(f) => Some(f.delivery),
                    None => match c.redeliver.iter().position(superseded) {
                        Some(p) => c.redeliver.remove(p),
                        None => c
                            .delayed
                            .iter()
                            .position(|(_, d)| superseded(d))
                            .map(|p| c.delayed.remove(p).1),
                    },
                };
                match later {
                    Some(d) => {
                        // Its answer to the later attempt will be a resend.
                        c.remember(d.task.id, d.attempt);
                        (
                            Delivery {
                                task: d.task,
                                attempt: answer.attempt,
                            },
                            None,
                        )
                    }
                    None => return stale(&st.log, client, answer),
                }
            }
        };
        st.registry.result_received(client, latency.is_some());
        let c = st.clients.get_mut(client).expect("looked up above");
        let retry = answer.is_refusal();
        let out = record(client, &delivery, &answer, latency, retry);
        if retry {
            if delivery.attempt >= self.config.max_attempts {
                bury(
                    st,
                    self.sink.as_ref(),
                    &delivery,
                    client,
                    format!("refused: {}", answer.output),
                );
            } else {
                c.remember_refusal(delivery.task.id, delivery.attempt);
                let due = Instant::now() + self.config.retry_backoff.delay(delivery.attempt);
                let again = Delivery {
                    task: delivery.task,
                    attempt: delivery.attempt + 1,
                };
                c.delayed.push((due, again));
                st.counters.redelivered += 1;
            }
        } else {
            c.remember(delivery.task.id, delivery.attempt);
        }
        Some(out)
    }

    /// Offers `client` what it must get again, then the tasks it has not seen, up to its credit.
    pub(super) fn pump_broadcast(&self, st: &mut State, client: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        let Some((_, tx)) = c.session.as_ref() else {
            return;
        };
        while c.in_flight.len() < self.config.max_in_flight {
            let delivery = match c.redeliver.pop_front() {
                Some(d) => d,
                None => {
                    if c.cursor < st.log.first_id() {
                        log::warn!(
                            "client {client} fell behind the retained history; tasks {}..{} were dropped for it (raise --retain)",
                            c.cursor,
                            st.log.first_id() - 1
                        );
                        c.cursor = st.log.first_id();
                    }
                    let Some(task) = st.log.get(c.cursor) else {
                        break;
                    };
                    c.cursor += 1;
                    if !task.is_for(client) {
                        continue;
                    }
                    Delivery {
                        task: task.clone(),
                        attempt: 1,
                    }
                }
            };
            if let Err(e) = tx.send(delivery.clone()) {
                // Full (not read fast enough): later. Closed: the stream is
                // gone and will detach itself; the task waits for its return.
                c.redeliver.push_front(e.into_delivery());
                break;
            }
            log::debug!(
                "task {} (attempt {}) sent to {client}",
                delivery.task.id,
                delivery.attempt
            );
            if !c.ephemeral {
                self.journal(|| Record::Sent {
                    task: delivery.task.id,
                    client: client.to_string(),
                    attempt: delivery.attempt,
                });
            }
            c.in_flight.push_back(InFlight::new(delivery));
            st.registry.task_sent(client);
            st.counters.sent += 1;
        }
    }
}
