//! The `Dispatcher`: decides which task goes to which client and when, and
//! judges every result. It owns the `TaskLog`, the `WorkQueue`, the
//! `ClientRegistry` and each client's deliveries behind one lock, and is
//! driven by events: tasks published, a client attached or gone, a result in,
//! a clock tick. After each event it tops up the affected feeds, never beyond
//! `max_in_flight` unanswered deliveries per client: that credit is what keeps
//! a slow client from holding more than its share and memory bounded.
//!
//! Delivery is at least once, with fencing: every delivery carries an attempt
//! number, and a result counts only if it answers the current attempt from
//! the client that holds it. Anything else is recorded as stale.

use crate::feed::{self, Delivery, FeedSender, TaskFeed};
use crate::journal::Record;
use crate::logtext::quoted;
use crate::registry::{ClientInfo, ClientRegistry};
use crate::results::{DeadLetter, ResultRecord, ResultSink};
use crate::task::{Task, TaskId, TaskLog};
use crate::workqueue::WorkQueue;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How tasks are spread over clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every client gets every task (the seed's behaviour).
    Broadcast,
    /// Each task goes to exactly one client, the one with the fewest in flight.
    Queue,
}

/// Where a client seen for the first time starts reading the task log (broadcast).
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
    pub mode: Mode,
    pub start_at: StartAt,
    /// Unanswered deliveries allowed per client before it gets no more.
    pub max_in_flight: usize,
    /// Tasks kept in the log for late clients.
    pub retain: usize,
    /// A delivery not answered within this time is taken back and redelivered;
    /// for a client that reports what it works on, the time runs from when it
    /// last said it was working on the task (see [`Dispatcher::renew`]).
    pub ack_timeout: Duration,
    /// The longest a client that reports its work may hold one delivery, in
    /// all (started or waiting its turn at the client).
    pub max_lease: Duration,
    /// How long a refused task waits before it is delivered again.
    pub retry_backoff: RetryBackoff,
    /// Deliveries of one task (to one client, in broadcast) before it is dead-lettered.
    pub max_attempts: u32,
    /// A client with an id that shows no sign of life (status, result) for
    /// this long is declared gone; `None` leaves it to HTTP/2 keepalive.
    pub client_timeout: Option<Duration>,
    /// A disconnected client with an id is forgotten (its resume point and
    /// unanswered broadcast tasks with it) after this long.
    pub forget_after: Duration,
    /// Clients remembered at most; past it the longest-disconnected are forgotten first.
    pub max_known_clients: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            mode: Mode::Broadcast,
            start_at: StartAt::Oldest,
            max_in_flight: 256,
            retain: 100_000,
            ack_timeout: Duration::from_secs(60),
            max_lease: Duration::from_secs(3600),
            retry_backoff: RetryBackoff::default(),
            max_attempts: 5,
            client_timeout: Some(Duration::from_secs(30)),
            forget_after: Duration::from_secs(7 * 24 * 3600),
            max_known_clients: 10_000,
        }
    }
}

/// The wait before a refused task is delivered again: the k-th refusal of a
/// task waits `min`·2^(k-1), capped at `max`, less up to half of it at random
/// (so that tasks refused together do not come back together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBackoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl RetryBackoff {
    /// The wait after the refusal of attempt `attempt` (1 for the first delivery).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
        let ceiling = self.min.saturating_mul(factor).min(self.max.max(self.min));
        ceiling.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// Who holds a `getTask` stream, as [`Dispatcher::attach_as`] is told.
#[derive(Debug, Clone, Copy, Default)]
pub struct Holder<'a> {
    /// The connection's address, for the log.
    pub peer: &'a str,
    /// The client process (`contact-client-instance`), "" when unknown.
    pub instance: &'a str,
    /// Known by address only (a seed peer): forgotten when its streams end.
    pub ephemeral: bool,
    /// It reports the tasks it works on (`contact-leases`), so their ack
    /// deadlines start when it starts them.
    pub leases: bool,
}

/// Identifies one `getTask` stream, so that a stale stream cannot detach a newer one.
pub type SessionId = u64;

/// Why a `getTask` stream was not attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachRefused {
    /// The server is shutting down.
    Closed,
    /// Another live connection holds this id (one owner per id).
    InUse { peer: String },
}

/// Totals since start, for the stats line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub produced: u64,
    pub sent: u64,
    pub results: u64,
    pub redelivered: u64,
    pub dead: u64,
}

/// What a client said about one task (the new fields of `Result`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 0 for a seed client: the answer then goes to its oldest unanswered delivery.
    pub task_id: TaskId,
    pub attempt: u32,
    pub ok: bool,
    /// With `ok == false`: the client asks for the task to be tried again.
    pub retry: bool,
    pub output: String,
    /// The incarnation the task came from (empty from a seed client).
    pub incarnation: String,
}

impl Answer {
    /// A refusal asking for another try (a seed client, with no task id, never refuses).
    fn is_refusal(&self) -> bool {
        !self.ok && self.retry && self.task_id != 0
    }
}

struct InFlight {
    delivery: Delivery,
    sent_at: Instant,
    /// When its client last said it is working on it (`None`: not started).
    renewed: Option<Instant>,
}

impl InFlight {
    fn new(delivery: Delivery) -> InFlight {
        InFlight {
            delivery,
            sent_at: Instant::now(),
            renewed: None,
        }
    }
}

/// How long a disconnected seed client's late answers are still matched.
const EPHEMERAL_LINGER: Duration = Duration::from_secs(30);

/// How many recently accepted (task, attempt) pairs a client remembers, to
/// recognise a result it sends again after a lost acknowledgement.
const RECENT_ACCEPTED: usize = 4096;

/// How many recent refusals a client remembers (in memory only), likewise.
const RECENT_REFUSED: usize = 256;

/// The last `N` (task, attempt) pairs a client answered, oldest forgotten
/// first; looked up in constant time.
#[derive(Default)]
pub(crate) struct RecentAnswers<const N: usize> {
    order: VecDeque<(TaskId, u32)>,
    set: HashSet<(TaskId, u32)>,
}

impl<const N: usize> RecentAnswers<N> {
    fn insert(&mut self, id: TaskId, attempt: u32) {
        if !self.set.insert((id, attempt)) {
            return;
        }
        self.order.push_back((id, attempt));
        if self.order.len() > N {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, id: TaskId, attempt: u32) -> bool {
        self.set.contains(&(id, attempt))
    }

    /// Oldest first.
    fn iter(&self) -> impl Iterator<Item = &(TaskId, u32)> {
        self.order.iter()
    }
}

struct ClientState {
    /// The open `getTask` stream, if any.
    session: Option<(SessionId, FeedSender)>,
    /// Which process holds the session (its `contact-client-instance`), and from where.
    holder: (String, String),
    /// Next log id this client has not been offered (broadcast).
    cursor: TaskId,
    /// Written, not yet answered; oldest first.
    in_flight: VecDeque<InFlight>,
    /// Taken back, to be written again before anything new (broadcast).
    redeliver: VecDeque<Delivery>,
    /// Refused, to be written again once their retry backoff is over (broadcast).
    delayed: Vec<(Instant, Delivery)>,
    /// Its session reports the tasks it works on (see [`Holder::leases`]).
    leases: bool,
    /// When it last showed progress: a report naming a task it holds, or an answer.
    progress_at: Instant,
    /// Recently accepted (task, attempt): a resend of one is acknowledged, not recorded.
    recent: RecentAnswers<RECENT_ACCEPTED>,
    /// Recently refused (task, attempt): a resend of one (after a lost
    /// acknowledgement) is acknowledged, not counted as another refusal.
    refused: RecentAnswers<RECENT_REFUSED>,
    last_seen: Instant,
    /// Known by peer address (a seed client): forgotten when its streams end.
    ephemeral: bool,
    /// Connected when shutdown began: its answers are still awaited.
    draining: bool,
}

impl ClientState {
    fn new(cursor: TaskId, redeliver: VecDeque<Delivery>, ephemeral: bool) -> ClientState {
        ClientState {
            session: None,
            holder: (String::new(), String::new()),
            cursor,
            in_flight: VecDeque::new(),
            redeliver,
            delayed: Vec::new(),
            leases: false,
            progress_at: Instant::now(),
            recent: RecentAnswers::default(),
            refused: RecentAnswers::default(),
            last_seen: Instant::now(),
            ephemeral,
            draining: false,
        }
    }

    /// Deliveries it is owed but does not hold: taken back, or refused and
    /// waiting out their backoff (broadcast).
    fn owed(&self) -> impl Iterator<Item = &Delivery> {
        self.redeliver
            .iter()
            .chain(self.delayed.iter().map(|(_, d)| d))
    }

    /// Whether it answered this attempt already (accepted or refused): an
    /// answer to it now is a resend.
    fn answered(&self, id: TaskId, attempt: u32) -> bool {
        id != 0 && (self.recent.contains(id, attempt) || self.refused.contains(id, attempt))
    }

    fn remember_refusal(&mut self, id: TaskId, attempt: u32) {
        self.refused.insert(id, attempt);
    }

    fn remember(&mut self, id: TaskId, attempt: u32) {
        self.recent.insert(id, attempt);
    }
}

struct State {
    log: TaskLog,
    queue: WorkQueue,
    registry: ClientRegistry,
    clients: HashMap<String, ClientState>,
    counters: Counters,
    next_session: SessionId,
    /// Set at shutdown: no new streams, no new deliveries.
    closed: bool,
    /// Dead letters not yet taken by the server for recording.
    dead: Vec<DeadLetter>,
    /// This state's identity: task ids are only meaningful within it.
    incarnation: String,
}

/// Shared by the producer, every gRPC handler and the clock thread.
pub struct Dispatcher {
    config: DispatchConfig,
    state: Mutex<State>,
    /// Where dead letters (and, when `durable`, journal records) go.
    sink: Option<ResultSink>,
    /// With `--state-dir`: journal every change, tasks before they are dispatched.
    durable: bool,
    /// Serialises producers, so that task ids reach the journal in order.
    publishing: Mutex<()>,
}

mod batch;
mod broadcast;
mod queue;
mod restore;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Dispatcher {
    /// A dispatcher with an empty task log that keeps dead letters for
    /// [`Dispatcher::take_dead_letters`] (for tests and embedding).
    pub fn new(config: DispatchConfig) -> Dispatcher {
        Dispatcher::build(config, None, false)
    }

    /// A dispatcher that hands dead letters to `sink`, and with `durable`
    /// journals every change through it (see `journal`).
    pub fn recording(config: DispatchConfig, sink: ResultSink, durable: bool) -> Dispatcher {
        Dispatcher::build(config, Some(sink), durable)
    }

    fn build(config: DispatchConfig, sink: Option<ResultSink>, durable: bool) -> Dispatcher {
        let state = State {
            log: TaskLog::new(config.retain),
            queue: WorkQueue::default(),
            registry: ClientRegistry::default(),
            clients: HashMap::new(),
            counters: Counters::default(),
            next_session: 1,
            closed: false,
            dead: vec![],
            incarnation: format!("{:016x}", fastrand::u64(..)),
        };
        Dispatcher {
            config,
            state: Mutex::new(state),
            sink,
            durable,
            publishing: Mutex::new(()),
        }
    }

    /// Journals a change (called under the state lock, so journal order is event order).
    fn journal(&self, record: impl FnOnce() -> Record) {
        if let (true, Some(sink)) = (self.durable, &self.sink) {
            sink.journal(record());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere must not take every client down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a `getTask` stream for `client` and returns the feed to forward.
    ///
    /// One owner per id: while a stream of `client` is live, a new one is
    /// refused unless it comes from the same process (the same non-empty
    /// `instance`, e.g. reconnecting over a new connection before the server
    /// noticed the old one died), or from the same connection for a seed peer;
    /// then it replaces the old stream, which ends. A client seen before
    /// resumes: what it had not answered is delivered again first, then it
    /// continues where it left off. `ephemeral` clients (seed peers, known only
    /// by address) are forgotten when their streams end.
    pub fn attach(
        &self,
        client: &str,
        peer: &str,
        ephemeral: bool,
        instance: &str,
    ) -> Result<(SessionId, TaskFeed), AttachRefused> {
        let holder = Holder {
            peer,
            instance,
            ephemeral,
            leases: false,
        };
        self.attach_as(client, holder)
    }

    /// [`Dispatcher::attach`], saying all that is known of the stream's holder.
    pub fn attach_as(
        &self,
        client: &str,
        holder: Holder<'_>,
    ) -> Result<(SessionId, TaskFeed), AttachRefused> {
        let Holder {
            peer,
            instance,
            ephemeral,
            leases,
        } = holder;
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closed {
            return Err(AttachRefused::Closed);
        }
        if let Some(c) = st.clients.get(client) {
            let same_holder = ephemeral || (!instance.is_empty() && c.holder.0 == instance);
            if c.session.is_some() && !same_holder {
                return Err(AttachRefused::InUse {
                    peer: c.holder.1.clone(),
                });
            }
        }
        let id = st.next_session;
        st.next_session += 1;
        let (tx, rx) = feed::channel(self.config.max_in_flight);
        let cursor = match self.config.start_at {
            StartAt::Oldest => st.log.first_id(),
            StartAt::New => st.log.next_id(),
        };
        let known = st.clients.contains_key(client);
        if !known {
            // A targeted task waits for its client, even one that starts at `New`.
            let waiting: VecDeque<Delivery> = match self.config.mode {
                Mode::Broadcast => st
                    .log
                    .iter()
                    .filter(|t| t.id < cursor && t.target.as_deref() == Some(client))
                    .map(|t| Delivery {
                        task: t.clone(),
                        attempt: 1,
                    })
                    .collect(),
                Mode::Queue => VecDeque::new(),
            };
            self.make_room(st, ephemeral);
            st.clients.insert(
                client.to_string(),
                ClientState::new(cursor, waiting, ephemeral),
            );
        }
        let c = st.clients.get_mut(client).expect("inserted above");
        c.session = Some((id, tx));
        c.holder = (instance.to_string(), peer.to_string());
        c.leases = leases && !ephemeral;
        c.last_seen = Instant::now();
        log::info!(
            "client {client} {} from {peer}",
            if known { "reconnected" } else { "connected" }
        );
        st.registry.connect(client, peer);
        // What the previous stream left unanswered is taken back now.
        self.take_back_all(st, client, "client reconnected");
        self.pump_all(st);
        Ok((id, rx))
    }

    /// Keeps the remembered clients under `max_known_clients` by forgetting
    /// the longest-disconnected ones (connected clients are never forgotten).
    /// Room for a seed peer is never made at a named agent's expense (seed
    /// peers are forgotten anyway once their connection ends).
    fn make_room(&self, st: &mut State, for_ephemeral: bool) {
        while st.clients.len() >= self.config.max_known_clients.max(1) {
            let oldest = st
                .clients
                .iter()
                .filter(|(_, c)| c.session.is_none() && !c.draining)
                .filter(|(_, c)| c.ephemeral || !for_ephemeral)
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(name, _)| name.clone());
            let Some(name) = oldest else { return };
            log::warn!(
                "client {name} forgotten: more than {} clients are known (--max-known-clients)",
                self.config.max_known_clients
            );
            self.take_back_all(st, &name, "client forgotten");
            st.clients.remove(&name);
        }
    }

    /// Ends `session` (its stream finished or broke) unless a newer one replaced it.
    pub fn detach(&self, client: &str, session: SessionId) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        if c.session.as_ref().map(|(id, _)| *id) != Some(session) {
            return;
        }
        self.end_session(st, client, "client disconnected");
        self.pump_all(st);
    }

    /// Ends `client`'s task stream now (its credentials were revoked): its
    /// tasks are handled as for any disconnect.
    pub fn evict(&self, client: &str, why: &str) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.clients.get(client).is_some_and(|c| c.session.is_some()) {
            log::warn!("client {client} disconnected: {why}");
            self.end_session(st, client, why);
            self.pump_all(st);
        }
    }

    /// A client's stream is over (gone, declared gone, or unwritable): in queue
    /// mode its tasks go to others now; in broadcast they wait for it to come
    /// back (and for late answers on its result stream).
    fn end_session(&self, st: &mut State, client: &str, why: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        c.session = None;
        c.last_seen = Instant::now();
        st.registry.disconnect(client);
        log::info!("client {client}: {why}");
        if self.config.mode == Mode::Queue {
            self.take_back_all(st, client, why);
        }
        self.forget_if_done(st, client);
    }

    /// A result stream of `client` ended: forget a seed client that has no
    /// task stream any more, whatever it left unanswered.
    pub fn results_ended(&self, client: &str) {
        let mut st = self.lock();
        if st
            .clients
            .get(client)
            .is_some_and(|c| c.ephemeral && c.session.is_none())
        {
            self.take_back_all(&mut st, client, "client disconnected");
            st.clients.remove(client);
            self.pump_all(&mut st);
        }
    }

    /// Appends tasks to the log (and the queue) and offers them to clients
    /// with credit. When durable, the tasks are on disk before any client can
    /// see them: this blocks the calling (producer) thread on the fsync.
    pub fn publish<I>(&self, tasks: I) -> Vec<Arc<Task>>
    where
        I: IntoIterator<Item = (Option<String>, String)>,
    {
        let tasks: Vec<(Option<String>, String)> = tasks.into_iter().collect();
        let _serial = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        if let (true, Some(sink), false) = (self.durable, &self.sink, tasks.is_empty()) {
            let first = self.lock().log.next_id();
            for (i, (target, text)) in tasks.iter().enumerate() {
                sink.journal(Record::Task {
                    id: first + i as u64,
                    text: text.clone(),
                    target: target.clone(),
                });
            }
            if futures::executor::block_on(sink.journaled()).is_err() {
                log::error!(
                    "{} tasks could not be written to the state journal and were not accepted",
                    tasks.len()
                );
                return vec![];
            }
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut added = vec![];
        for (target, text) in tasks {
            let task = st.log.push(text, target);
            log::info!("task {} produced: {}", task.id, quoted(&task.text));
            if self.config.mode == Mode::Queue {
                st.queue.push(task.clone());
            }
            added.push(task);
        }
        st.counters.produced += added.len() as u64;
        self.pump_all(st);
        added
    }

    /// Judges a client's answer, records it through the sink (if the
    /// dispatcher has one) and returns the record: `None` for an exact resend
    /// of an accepted result (acknowledged again, recorded once).
    ///
    /// An answer counts if it is for the task's current attempt, or for an
    /// earlier attempt of the client that holds the current one (its answer
    /// crossed a redelivery to itself, e.g. a resend after a reconnect).
    pub fn complete(&self, client: &str, answer: Answer) -> Option<ResultRecord> {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.counters.results += 1;
        if let Some(c) = st.clients.get_mut(client) {
            c.last_seen = Instant::now();
            c.progress_at = c.last_seen;
        }
        let outcome = if !answer.incarnation.is_empty() && answer.incarnation != st.incarnation {
            // A task id of another life of the server (restarted without its
            // state): the same number may name a different task now.
            stale(
                &st.log,
                client,
                Answer {
                    task_id: 0,
                    ..answer
                },
            )
        } else {
            match self.config.mode {
                Mode::Broadcast => self.complete_broadcast(st, client, answer),
                Mode::Queue => self.complete_queue(st, client, answer),
            }
        };
        // Recorded under the lock, so that a snapshot never runs ahead of a
        // result it already counts as answered.
        if let (Some(sink), Some(r)) = (&self.sink, &outcome) {
            sink.record(r.clone());
        }
        self.forget_if_done(st, client);
        // Only this client got credit back (in broadcast, only it can use it).
        match self.config.mode {
            Mode::Broadcast => self.pump_broadcast(st, client),
            Mode::Queue => self.pump_queue(st),
        }
        outcome
    }

    /// [`Dispatcher::complete`] for an agent known by its id: its answer must
    /// name the delivery exactly (task id, attempt and incarnation), as our
    /// clients always do; an answer that leaves any of them out matches
    /// nothing and is recorded as stale. The wildcards of `complete` are for
    /// seed peers, which cannot send them.
    pub fn complete_exact(&self, client: &str, answer: Answer) -> Option<ResultRecord> {
        if answer.task_id != 0 && answer.attempt != 0 && !answer.incarnation.is_empty() {
            return self.complete(client, answer);
        }
        let mut st = self.lock();
        st.counters.results += 1;
        let out = stale(&st.log, client, answer);
        if let (Some(sink), Some(r)) = (&self.sink, &out) {
            sink.record(r.clone());
        }
        out
    }

    /// How it was configured.
    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// The identity clients echo with their results (see `Answer::incarnation`).
    pub fn incarnation(&self) -> String {
        self.lock().incarnation.clone()
    }

    /// Notes a status message from `client` as a sign of life.
    pub fn touch(&self, client: &str) {
        let mut st = self.lock();
        if let Some(c) = st.clients.get_mut(client) {
            c.last_seen = Instant::now();
        }
        st.registry.touch(client);
    }

    /// The clock: takes back deliveries past the ack deadline and declares
    /// silent clients gone.
    pub fn expire(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = Instant::now();
        let names: Vec<String> = st.clients.keys().cloned().collect();
        for name in names {
            let c = &st.clients[&name];
            let idle = now.duration_since(c.last_seen);
            if c.session.is_none() {
                // Gone for good? A seed client cannot come back (its address
                // changes); a named one is forgotten after `forget_after`.
                if idle
                    > if c.ephemeral {
                        EPHEMERAL_LINGER
                    } else {
                        self.config.forget_after
                    }
                {
                    self.take_back_all(st, &name, "client forgotten");
                    st.clients.remove(&name);
                }
                continue;
            }
            if self
                .config
                .client_timeout
                .is_some_and(|t| !c.ephemeral && idle > t)
            {
                log::warn!("client {name} silent for {idle:?}: declared gone");
                self.end_session(st, &name, "declared gone");
                continue;
            }
            if c.ephemeral {
                // A seed client's answers are matched by order: taking one
                // delivery back would shift every later answer.
                continue;
            }
            let expired: Vec<(TaskId, &'static str)> = c
                .in_flight
                .iter()
                .filter_map(|f| self.overdue(c, f, now).map(|why| (f.delivery.task.id, why)))
                .collect();
            for (id, why) in expired {
                self.take_back(st, &name, id, why);
            }
        }
        self.wake_due(st, now);
        self.pump_all(st);
    }

    /// Why a delivery is to be taken back now, if it is. A client that does
    /// not report its work (a seed client) has `ack_timeout` from the
    /// delivery. One that does has `ack_timeout` from its last word that it
    /// is working on the task; a task still waiting its turn at it stays as
    /// long as the client makes progress (reports work or answers) at least
    /// once an ack timeout, so a client stuck with a queue of tasks loses
    /// them. Either way it holds one delivery `max_lease` in all.
    fn overdue(&self, c: &ClientState, f: &InFlight, now: Instant) -> Option<&'static str> {
        let ack = self.config.ack_timeout;
        if !c.leases {
            return (now.duration_since(f.sent_at) > ack)
                .then_some("no answer within the ack timeout");
        }
        if now.duration_since(f.sent_at) > self.config.max_lease.max(ack) {
            return Some("held longer than --max-lease");
        }
        match f.renewed {
            Some(t) => (now.duration_since(t) > ack)
                .then_some("no answer or progress report within the ack timeout"),
            None => (now.duration_since(f.sent_at.max(c.progress_at)) > ack)
                .then_some("not started, and its client made no progress within the ack timeout"),
        }
    }

    /// Refused tasks whose retry backoff is over become deliverable again.
    fn wake_due(&self, st: &mut State, now: Instant) {
        match self.config.mode {
            Mode::Queue => {
                st.queue.wake_due(now);
            }
            Mode::Broadcast => {
                for c in st.clients.values_mut() {
                    if c.delayed.is_empty() {
                        continue;
                    }
                    let (mut due, later): (Vec<_>, Vec<_>) =
                        c.delayed.drain(..).partition(|(t, _)| *t <= now);
                    c.delayed = later;
                    due.sort_by_key(|(_, d)| d.task.id);
                    c.redeliver.extend(due.into_iter().map(|(_, d)| d));
                }
            }
        }
    }

    /// `client` says it is working on these deliveries (task, attempt,
    /// incarnation): their ack deadlines start again now. Deliveries it does
    /// not hold are ignored.
    pub fn renew(&self, client: &str, working: &[(TaskId, u32, String)]) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        let now = Instant::now();
        c.last_seen = now;
        let named: HashSet<(TaskId, u32)> = working
            .iter()
            .filter(|(_, _, incarnation)| *incarnation == st.incarnation)
            .map(|(task, attempt, _)| (*task, *attempt))
            .collect();
        if !c.leases {
            return;
        }
        for f in c.in_flight.iter_mut() {
            if named.contains(&(f.delivery.task.id, f.delivery.attempt)) {
                f.renewed = Some(now);
                c.progress_at = now;
            }
        }
    }

    /// Dead letters produced since the last call, for the server to record.
    pub fn take_dead_letters(&self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.lock().dead)
    }

    /// Takes every delivery `client` holds back (see `take_back`).
    fn take_back_all(&self, st: &mut State, client: &str, why: &str) {
        let ids: Vec<TaskId> = st.clients.get(client).map_or(vec![], |c| {
            c.in_flight.iter().map(|f| f.delivery.task.id).collect()
        });
        for id in ids {
            self.take_back(st, client, id, why);
        }
    }

    /// Takes one delivery back from `client`: it is delivered again (to anyone
    /// in queue mode, to the same client in broadcast), or dead-lettered when
    /// it has had `max_attempts`.
    fn take_back(&self, st: &mut State, client: &str, id: TaskId, why: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        let Some(f) = c
            .in_flight
            .iter()
            .position(|f| f.delivery.task.id == id)
            .and_then(|p| c.in_flight.remove(p))
        else {
            return;
        };
        st.registry.released(client);
        if f.delivery.attempt >= self.config.max_attempts {
            if self.config.mode == Mode::Queue {
                st.queue.finish(id);
            }
            bury(
                st,
                self.sink.as_ref(),
                &f.delivery,
                client,
                format!("{why} (attempt {})", f.delivery.attempt),
            );
            return;
        }
        log::info!("task {id} taken back from {client} ({why}); it will be delivered again");
        st.counters.redelivered += 1;
        match self.config.mode {
            Mode::Queue => st.queue.release(id, Some(client)),
            Mode::Broadcast => c.redeliver.push_back(Delivery {
                task: f.delivery.task,
                attempt: f.delivery.attempt + 1,
            }),
        }
    }

    /// Forgets a seed client whose task stream ended once nothing is in flight.
    fn forget_if_done(&self, st: &mut State, client: &str) {
        if st
            .clients
            .get(client)
            .is_some_and(|c| c.ephemeral && c.session.is_none() && c.in_flight.is_empty())
        {
            st.clients.remove(client);
        }
    }

    /// Ends every client's stream (cleanly) and stops offering tasks: for
    /// shutdown. Results for deliveries in flight are still judged.
    pub fn close_all(&self) {
        let mut st = self.lock();
        st.closed = true;
        for c in st.clients.values_mut() {
            c.draining = c.session.take().is_some();
        }
    }

    /// Deliveries not answered yet by the clients still connected (or, after
    /// `close_all`, connected when it was called): what shutdown waits for.
    pub fn in_flight(&self) -> usize {
        self.lock()
            .clients
            .values()
            .filter(|c| c.session.is_some() || c.draining)
            .map(|c| c.in_flight.len())
            .sum()
    }

    /// Queue mode: tasks not finished yet (waiting or in flight).
    pub fn unfinished(&self) -> usize {
        self.lock().queue.len()
    }

    /// The connected clients.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.lock().registry.snapshot()
    }

    /// Totals since start.
    pub fn counters(&self) -> Counters {
        self.lock().counters
    }

    fn pump_all(&self, st: &mut State) {
        if st.closed {
            return;
        }
        match self.config.mode {
            Mode::Broadcast => {
                let names: Vec<String> = st.clients.keys().cloned().collect();
                for name in names {
                    self.pump_broadcast(st, &name);
                }
            }
            Mode::Queue => self.pump_queue(st),
        }
    }
}

fn record(
    client: &str,
    d: &Delivery,
    answer: &Answer,
    latency: Option<Duration>,
    retry: bool,
) -> ResultRecord {
    ResultRecord {
        task_id: Some(d.task.id),
        task: Some(d.task.text.clone()),
        client: client.to_string(),
        // A seed client sends no ok flag: its results count as successes.
        ok: answer.ok || answer.task_id == 0,
        output: answer.output.clone(),
        latency_ms: latency.map(|l| l.as_secs_f64() * 1000.0),
        attempt: d.attempt,
        stale: false,
        retry,
        accepted: !retry,
        received_at: unix_now(),
        seq: None,
    }
}

fn stale(log: &TaskLog, client: &str, answer: Answer) -> Option<ResultRecord> {
    let task_id = (answer.task_id != 0).then_some(answer.task_id);
    let task = task_id.and_then(|id| log.get(id)).map(|t| t.text.clone());
    let record = ResultRecord {
        task_id,
        task,
        client: client.to_string(),
        ok: answer.ok || answer.task_id == 0,
        output: answer.output,
        latency_ms: None,
        attempt: answer.attempt,
        stale: true,
        retry: answer.retry,
        accepted: false,
        received_at: unix_now(),
        seq: None,
    };
    Some(record)
}

/// Gives up on a delivery: its dead letter goes to the sink (journaled, in
/// event order, since this runs under the state lock) or to the outbox.
fn bury(st: &mut State, sink: Option<&ResultSink>, d: &Delivery, client: &str, reason: String) {
    log::warn!(
        "task {} dead-lettered after {} attempts at {client}: {}",
        d.task.id,
        d.attempt,
        quoted(&reason)
    );
    st.counters.dead += 1;
    let letter = DeadLetter {
        task_id: d.task.id,
        task: d.task.text.clone(),
        target: d.task.target.clone(),
        client: client.to_string(),
        attempts: d.attempt,
        reason,
        at: unix_now(),
        seq: None,
    };
    match sink {
        Some(sink) => sink.bury(letter),
        None => st.dead.push(letter),
    }
}

#[cfg(test)]
mod tests;
