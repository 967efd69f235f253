//! The `Dispatcher`: decides which task goes to which client and when, and
//! matches results to the deliveries they answer. It owns the `TaskLog`, the
//! `ClientRegistry` and each client's delivery state behind one lock, and is
//! driven by events: a task published, a client attached or gone, a result in.
//! After each event it tops up the affected clients' feeds, never beyond
//! `max_in_flight` unanswered deliveries per client: that credit is what
//! keeps a slow client from holding more than its share and memory bounded.

use crate::feed::{self, Delivery, FeedSender, TaskFeed};
use crate::registry::{ClientInfo, ClientRegistry};
use crate::results::ResultRecord;
use crate::task::{TaskId, TaskLog};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where a newly attached broadcast client starts reading the task log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest retained task: the seed's behaviour, a late client gets the history.
    Oldest,
    /// Only tasks produced after it attached.
    New,
}

/// How the dispatcher behaves; fixed for the server's lifetime.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub start_at: StartAt,
    /// Unanswered deliveries allowed per client before it gets no more.
    pub max_in_flight: usize,
    /// Tasks kept in the log for late clients.
    pub retain: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig { start_at: StartAt::Oldest, max_in_flight: 32, retain: 100_000 }
    }
}

/// Identifies one `getTask` stream, so that a stale stream cannot detach a newer one.
pub type SessionId = u64;

/// Totals since start, for the stats line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub produced: u64,
    pub sent: u64,
    pub results: u64,
}

/// What a client said about one task (the new fields of `Result`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 0 for a seed client: the answer then goes to its oldest unanswered delivery.
    pub task_id: TaskId,
    pub attempt: u32,
    pub ok: bool,
    pub output: String,
}

struct InFlight {
    delivery: Delivery,
    sent_at: Instant,
}

struct ClientState {
    /// The open `getTask` stream, if any.
    session: Option<(SessionId, FeedSender)>,
    /// Next task id this client has not been offered yet.
    cursor: TaskId,
    /// Written, not yet answered; oldest first.
    in_flight: VecDeque<InFlight>,
    /// Identified by peer address (a seed client): its state dies with its stream.
    ephemeral: bool,
}

struct State {
    log: TaskLog,
    registry: ClientRegistry,
    clients: HashMap<String, ClientState>,
    counters: Counters,
    next_session: SessionId,
    /// Set at shutdown: no new streams, no new deliveries.
    closed: bool,
}

/// Shared by the producer, every gRPC handler and the stats thread.
pub struct Dispatcher {
    config: DispatchConfig,
    state: Mutex<State>,
}

impl Dispatcher {
    /// A dispatcher with an empty task log.
    pub fn new(config: DispatchConfig) -> Dispatcher {
        let state = State {
            log: TaskLog::new(config.retain),
            registry: ClientRegistry::default(),
            clients: HashMap::new(),
            counters: Counters::default(),
            next_session: 1,
            closed: false,
        };
        Dispatcher { config, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not take every client down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a `getTask` stream for `client` and returns the feed to forward.
    ///
    /// A second stream with the same client id replaces the first, which ends.
    /// `ephemeral` clients (seed peers, known only by address) are forgotten
    /// when their stream ends.
    /// Returns `None` once the dispatcher is closed (the server is shutting down).
    pub fn attach(&self, client: &str, peer: &str, ephemeral: bool) -> Option<(SessionId, TaskFeed)> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closed {
            return None;
        }
        let id = st.next_session;
        st.next_session += 1;
        let (tx, rx) = feed::channel(self.config.max_in_flight);
        let cursor = match self.config.start_at {
            StartAt::Oldest => st.log.first_id(),
            StartAt::New => st.log.next_id(),
        };
        // Seed semantics: a (re)connected client reads from its start point again;
        // deliveries of an earlier stream are no longer awaited.
        let state = ClientState { session: Some((id, tx)), cursor, in_flight: VecDeque::new(), ephemeral };
        if st.clients.insert(client.to_string(), state).is_some() {
            log::info!("client {client} reconnected from {peer}; its previous stream ends");
        } else {
            log::info!("client {client} connected from {peer}");
        }
        st.registry.connect(client, peer);
        self.pump(st, client);
        Some((id, rx))
    }

    /// Ends `session` (its stream finished or broke) unless a newer one replaced it.
    pub fn detach(&self, client: &str, session: SessionId) {
        let mut st = self.lock();
        let Some(state) = st.clients.get_mut(client) else { return };
        if state.session.as_ref().map(|(id, _)| *id) != Some(session) {
            return;
        }
        state.session = None;
        // A seed client's last results may still be on their way over its
        // result stream: keep its deliveries until they are answered.
        if state.ephemeral && state.in_flight.is_empty() {
            st.clients.remove(client);
        }
        st.registry.disconnect(client);
        log::info!("client {client} disconnected");
    }

    /// A result stream of `client` ended: forget a seed client that has no
    /// task stream any more, whatever it left unanswered.
    pub fn results_ended(&self, client: &str) {
        let mut st = self.lock();
        if st.clients.get(client).is_some_and(|c| c.ephemeral && c.session.is_none()) {
            st.clients.remove(client);
        }
    }

    /// Appends tasks to the log and offers them to every client with credit.
    pub fn publish<I>(&self, tasks: I) -> usize
    where
        I: IntoIterator<Item = (Option<String>, String)>,
    {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut n = 0;
        for (target, text) in tasks {
            let task = st.log.push(text, target);
            log::info!("task {} produced: {}", task.id, task.text);
            n += 1;
        }
        st.counters.produced += n as u64;
        let clients: Vec<String> = st.clients.keys().cloned().collect();
        for c in clients {
            self.pump(st, &c);
        }
        n
    }

    /// Matches a client's answer to its delivery and returns what to record.
    pub fn complete(&self, client: &str, answer: Answer) -> ResultRecord {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.counters.results += 1;
        let matched = st.clients.get_mut(client).and_then(|c| {
            let pos = if answer.task_id == 0 {
                (!c.in_flight.is_empty()).then_some(0)
            } else {
                c.in_flight.iter().position(|f| {
                    f.delivery.task.id == answer.task_id
                        && (answer.attempt == 0 || f.delivery.attempt == answer.attempt)
                })
            };
            pos.and_then(|p| c.in_flight.remove(p))
        });
        st.registry.result_received(client, matched.is_some());
        if st.clients.get(client).is_some_and(|c| c.ephemeral && c.session.is_none() && c.in_flight.is_empty()) {
            st.clients.remove(client);
        }
        let received_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        // A seed client sends no ok flag: its results count as successes.
        let ok = answer.ok || answer.task_id == 0;
        let record = match matched {
            Some(f) => ResultRecord {
                task_id: Some(f.delivery.task.id),
                task: Some(f.delivery.task.text.clone()),
                client: client.to_string(),
                ok,
                output: answer.output,
                latency_ms: Some(f.sent_at.elapsed().as_secs_f64() * 1000.0),
                attempt: f.delivery.attempt,
                stale: false,
                received_at,
            },
            None => {
                let task_id = (answer.task_id != 0).then_some(answer.task_id);
                let task = task_id.and_then(|id| st.log.get(id)).map(|t| t.text.clone());
                ResultRecord {
                    task_id,
                    task,
                    client: client.to_string(),
                    ok,
                    output: answer.output,
                    latency_ms: None,
                    attempt: answer.attempt,
                    stale: true,
                    received_at,
                }
            }
        };
        self.pump(st, client);
        record
    }

    /// Notes a status message from `client` as a sign of life.
    pub fn touch(&self, client: &str) {
        self.lock().registry.touch(client);
    }

    /// Ends every client's stream (cleanly) and stops offering tasks: for
    /// shutdown. Results for deliveries in flight are still matched.
    pub fn close_all(&self) {
        let mut st = self.lock();
        st.closed = true;
        for c in st.clients.values_mut() {
            c.session = None;
        }
    }

    /// Deliveries written to clients and not answered yet, over all clients.
    pub fn in_flight(&self) -> usize {
        self.lock().clients.values().map(|c| c.in_flight.len()).sum()
    }

    /// The connected clients.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.lock().registry.snapshot()
    }

    /// Totals since start.
    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    /// Offers `client` the tasks it has not seen, up to its credit.
    fn pump(&self, st: &mut State, client: &str) {
        let Some(c) = st.clients.get_mut(client) else { return };
        let Some((_, tx)) = c.session.as_ref() else { return };
        while c.in_flight.len() < self.config.max_in_flight {
            if c.cursor < st.log.first_id() {
                log::warn!(
                    "client {client} fell behind the retained history; tasks {}..{} were dropped for it (raise --retain)",
                    c.cursor,
                    st.log.first_id() - 1
                );
                c.cursor = st.log.first_id();
            }
            let Some(task) = st.log.get(c.cursor) else { break };
            if !task.is_for(client) {
                c.cursor += 1;
                continue;
            }
            let delivery = Delivery { task: task.clone(), attempt: 1 };
            if tx.send(delivery.clone()).is_err() {
                // The stream is gone; it will detach itself.
                break;
            }
            log::debug!("task {} sent to {client}", task.id);
            c.cursor += 1;
            c.in_flight.push_back(InFlight { delivery, sent_at: Instant::now() });
            st.registry.task_sent(client);
            st.counters.sent += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(texts: &[&str]) -> Vec<(Option<String>, String)> {
        texts.iter().map(|t| (None, t.to_string())).collect()
    }

    fn drain(feed: &TaskFeed) -> Vec<TaskId> {
        std::iter::from_fn(|| feed.try_next()).map(|d| d.task.id).collect()
    }

    fn answer(task_id: TaskId) -> Answer {
        Answer { task_id, attempt: 1, ok: true, output: "done".into() }
    }

    #[test]
    fn credit_limits_deliveries_and_results_release_more() {
        let d = Dispatcher::new(DispatchConfig { max_in_flight: 2, ..Default::default() });
        let (_, feed) = d.attach("a", "p", false).unwrap();
        d.publish(tasks(&["1", "2", "3", "4"]));
        assert_eq!(drain(&feed), vec![1, 2]);
        let r = d.complete("a", answer(2));
        assert_eq!((r.task_id, r.stale, r.task.as_deref()), (Some(2), false, Some("2")));
        assert_eq!(drain(&feed), vec![3]);
        assert_eq!(d.clients()[0].in_flight, 2);
        assert_eq!(d.counters(), Counters { produced: 4, sent: 3, results: 1 });
    }

    #[test]
    fn late_clients_get_history_unless_they_start_at_new() {
        let d = Dispatcher::new(DispatchConfig::default());
        d.publish(tasks(&["1", "2"]));
        let (_, old) = d.attach("old", "p1", false).unwrap();
        assert_eq!(drain(&old), vec![1, 2]);

        let d = Dispatcher::new(DispatchConfig { start_at: StartAt::New, ..Default::default() });
        d.publish(tasks(&["1", "2"]));
        let (_, new) = d.attach("new", "p2", false).unwrap();
        assert!(drain(&new).is_empty());
        d.publish(tasks(&["3"]));
        assert_eq!(drain(&new), vec![3]);
    }

    #[test]
    fn seed_results_answer_the_oldest_delivery_and_count_as_ok() {
        let d = Dispatcher::new(DispatchConfig::default());
        let (session, feed) = d.attach("ipv4:1.2.3.4:5", "ipv4:1.2.3.4:5", true).unwrap();
        d.publish(tasks(&["a", "b"]));
        assert_eq!(drain(&feed), vec![1, 2]);
        let seed = Answer { task_id: 0, attempt: 0, ok: false, output: "x".into() };
        let r1 = d.complete("ipv4:1.2.3.4:5", seed.clone());
        // The task stream ends before the last result arrives: it still matches.
        d.detach("ipv4:1.2.3.4:5", session);
        assert!(d.clients().is_empty());
        let r2 = d.complete("ipv4:1.2.3.4:5", seed.clone());
        let r3 = d.complete("ipv4:1.2.3.4:5", seed);
        assert_eq!((r1.task_id, r1.ok, r2.task_id, r2.stale), (Some(1), true, Some(2), false));
        assert!(r3.stale && r3.task_id.is_none());
        assert!(d.lock().clients.is_empty(), "a seed client is forgotten once answered and gone");
    }

    #[test]
    fn unknown_and_duplicate_results_are_stale() {
        let d = Dispatcher::new(DispatchConfig::default());
        let (_, feed) = d.attach("a", "p", false).unwrap();
        d.publish(tasks(&["1"]));
        drain(&feed);
        assert!(!d.complete("a", answer(1)).stale);
        let dup = d.complete("a", answer(1));
        assert!(dup.stale && dup.task.as_deref() == Some("1"));
        assert!(d.complete("a", answer(99)).stale);
        assert!(d.complete("nobody", answer(1)).stale);
    }

    #[test]
    fn targeted_tasks_reach_only_their_client() {
        let d = Dispatcher::new(DispatchConfig::default());
        let (_, a) = d.attach("a", "p1", false).unwrap();
        let (_, b) = d.attach("b", "p2", false).unwrap();
        d.publish(vec![(Some("b".to_string()), "for b".to_string()), (None, "all".to_string())]);
        assert_eq!(drain(&a), vec![2]);
        assert_eq!(drain(&b), vec![1, 2]);
    }

    #[test]
    fn a_replaced_stream_ends_and_its_detach_is_ignored() {
        let d = Dispatcher::new(DispatchConfig::default());
        let (first, mut old) = d.attach("a", "p1", false).unwrap();
        let (_, _new) = d.attach("a", "p2", false).unwrap();
        assert!(futures::executor::block_on(futures::StreamExt::next(&mut old)).is_none());
        d.detach("a", first);
        assert_eq!(d.clients().len(), 1);
        assert_eq!(d.clients()[0].peer, "p2");
    }

    #[test]
    fn a_client_behind_retention_skips_ahead() {
        let d = Dispatcher::new(DispatchConfig { retain: 2, max_in_flight: 1, ..Default::default() });
        let (_, feed) = d.attach("a", "p", false).unwrap();
        d.publish(tasks(&["1"]));
        d.publish(tasks(&["2", "3", "4"]));
        assert_eq!(drain(&feed), vec![1]);
        d.complete("a", answer(1));
        assert_eq!(drain(&feed), vec![3]);
    }
}
