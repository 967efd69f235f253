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
//!
//! No event costs work in proportion to the number of clients (except a
//! broadcast task, which goes to each of them): the dispatcher keeps indexes
//! instead of looking — the clients that take tasks now, ordered by how many
//! they hold (queue mode); the clients that took everything there was, for a
//! new task to wake (broadcast); the disconnected clients by when they were
//! last seen; and every deadline in one heap (see `deadlines`), so a clock
//! tick costs what is due. What a client answered is known from its cursor
//! (broadcast) or from the task (queue), not from a per-client list.

use crate::feed::{self, Delivery, FeedSender, TaskFeed};
use crate::journal::Record;
use crate::labels::{Labels, Selector};
use crate::logtext::quoted;
use crate::registry::{ClientId, ClientInfo, ClientRegistry, Reported};
use crate::results::{DeadLetter, ResultRecord, ResultSink};
use crate::task::{NewTask, Published, Settled, Task, TaskId, TaskLog};
use crate::workqueue::WorkQueue;
use deadlines::{Deadlines, Due};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

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
#[derive(Debug, Clone, Default)]
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
    /// The labels it reported (`contact-labels`).
    pub labels: Labels,
}

/// Where one task stands with one client, short of its result (which the
/// dispatcher does not keep): for the admin API's job status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskProgress {
    /// Not delivered to it (yet), or already answered.
    Waiting,
    /// Written to it and not answered; `running` once it said it started.
    Delivered { attempt: u32, running: bool },
    /// Dead-lettered at it after its attempts.
    Dead,
    /// Cancelled by an operator before it reached it (or was answered).
    Cancelled,
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

/// How much is going on now, for the metrics (see [`Dispatcher::gauges`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Clients connected.
    pub connected: usize,
    /// Deliveries written and not answered yet.
    pub in_flight: usize,
    /// Tasks waiting for delivery: queue mode, those no client holds;
    /// broadcast, per connected client the retained tasks it has not been
    /// offered yet plus those it is owed again, summed.
    pub backlog: usize,
}

/// Tasks were not published: they could not be written to the state
/// journal or the shared store (the cause is logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJournaled;

impl std::fmt::Display for NotJournaled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the tasks could not be stored (in the --state-dir journal or the --store; the server's log says why)"
        )
    }
}

impl std::error::Error for NotJournaled {}

/// Per task given to publish, the id of the task whose key it repeats, if
/// it does; empty when no task had a key.
type Duplicates = Vec<Option<TaskId>>;

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

    fn reported(&self) -> Reported {
        match (self.ok, self.is_refusal()) {
            (true, _) => Reported::Ok,
            (false, true) => Reported::Refused,
            (false, false) => Reported::Failed,
        }
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

/// How many of the tasks dead-lettered at a client it remembers (broadcast):
/// a late answer to one is recorded as stale rather than taken for a resend.
const RECENT_BURIED: usize = 64;

/// Where the dispatcher's log lines go (as if logged from this module).
const LOG_TARGET: &str = module_path!();

/// Indexes of `State::gone`: disconnected clients known by id, and seed peers.
const NAMED: usize = 0;
const EPHEMERAL: usize = 1;

struct ClientState {
    /// Its id, shared with the indexes that name it.
    name: ClientId,
    /// The open `getTask` stream, if any.
    session: Option<(SessionId, FeedSender)>,
    /// Which process holds the session (its `contact-client-instance`), and from where.
    holder: (String, String),
    /// Next log id this client has not been offered (broadcast). Below it,
    /// whatever it neither holds nor is owed it has answered: the watermark
    /// that recognises a resent answer.
    cursor: TaskId,
    /// The first log id it could have been offered (broadcast).
    since: TaskId,
    /// Written, not yet answered; oldest first.
    in_flight: VecDeque<InFlight>,
    /// Taken back, to be written again before anything new (broadcast).
    redeliver: VecDeque<Delivery>,
    /// Refused, to be written again once their retry backoff is over (broadcast).
    delayed: BTreeMap<(Instant, TaskId), Delivery>,
    /// Tasks it is refusing (broadcast), with the attempts `first..=last` it
    /// refused in a row: a refusal of one sent again is not another refusal.
    refusing: HashMap<TaskId, (u32, u32)>,
    /// The last tasks dead-lettered at it (broadcast), see [`RECENT_BURIED`].
    buried: VecDeque<TaskId>,
    /// Its session reports the tasks it works on (see [`Holder::leases`]).
    leases: bool,
    /// When it last showed progress: a report naming a task it holds, or an answer.
    progress_at: Instant,
    last_seen: Instant,
    /// Known by peer address (a seed client): forgotten when its streams end.
    ephemeral: bool,
    /// Connected when shutdown began: its answers are still awaited.
    draining: bool,
    /// Drained by an operator (admin `Drain`): it gets nothing new and
    /// finishes what it holds, until let go. Kept while the server runs.
    drained: bool,
    /// It takes tasks until it holds `max_in_flight`: set when a useful
    /// share of its credit is free (or it holds nothing), so that tasks are
    /// written in batches rather than one per answer.
    filling: bool,
    /// Its feed refused a delivery (full): tried again on the clock tick.
    blocked: bool,
    /// Its key in `State::ready` (queue mode), while it is there.
    ready_key: Option<usize>,
    /// Its key in `State::gone`, while it is there.
    gone_key: Option<Instant>,
    /// The token of its ack deadline in `State::deadlines`, while armed.
    ack_timer: Option<u64>,
    /// The token and time of its retry deadline (broadcast), while armed.
    retry_timer: Option<(u64, Instant)>,
}

impl ClientState {
    fn new(
        name: ClientId,
        cursor: TaskId,
        redeliver: VecDeque<Delivery>,
        ephemeral: bool,
    ) -> ClientState {
        let since = redeliver.front().map_or(cursor, |d| d.task.id.min(cursor));
        ClientState {
            name,
            session: None,
            holder: (String::new(), String::new()),
            cursor,
            since,
            in_flight: VecDeque::new(),
            redeliver,
            delayed: BTreeMap::new(),
            refusing: HashMap::new(),
            buried: VecDeque::new(),
            leases: false,
            progress_at: Instant::now(),
            last_seen: Instant::now(),
            ephemeral,
            draining: false,
            drained: false,
            filling: true,
            blocked: false,
            ready_key: None,
            gone_key: None,
            ack_timer: None,
            retry_timer: None,
        }
    }

    /// Deliveries it is owed but does not hold: taken back, or refused and
    /// waiting out their backoff (broadcast).
    fn owed(&self) -> impl Iterator<Item = &Delivery> {
        self.redeliver.iter().chain(self.delayed.values())
    }

    /// The attempt of task `id` it holds or is owed, if any.
    fn holds(&self, id: TaskId) -> Option<u32> {
        self.in_flight
            .iter()
            .map(|f| &f.delivery)
            .chain(self.owed())
            .find(|d| d.task.id == id)
            .map(|d| d.attempt)
    }

    /// Takes the delivery of task `id` it holds or is owed; says whether it was in flight.
    fn take_held(&mut self, id: TaskId) -> Option<(Delivery, bool)> {
        if let Some(p) = self.in_flight.iter().position(|f| f.delivery.task.id == id) {
            return self.in_flight.remove(p).map(|f| (f.delivery, true));
        }
        if let Some(p) = self.redeliver.iter().position(|d| d.task.id == id) {
            return self.redeliver.remove(p).map(|d| (d, false));
        }
        let key = *self.delayed.iter().find(|(_, d)| d.task.id == id)?.0;
        self.delayed.remove(&key).map(|d| (d, false))
    }

    /// Whether an answer to attempt `attempt` of task `id`, which it neither
    /// holds nor is owed, repeats one it gave: the task is behind its cursor
    /// (so it was offered and is settled for it), was for it, was not
    /// dead-lettered at it, and the attempt is one that can have been made.
    fn answered_before(&self, log: &TaskLog, id: TaskId, attempt: u32, max_attempts: u32) -> bool {
        (1..=max_attempts).contains(&attempt)
            && (self.since..self.cursor).contains(&id)
            && !self.buried.contains(&id)
            && log.get(id).is_none_or(|t| t.is_for(&self.name))
    }

    /// Notes that task `id` was dead-lettered at it.
    fn buried(&mut self, id: TaskId) {
        self.refusing.remove(&id);
        if self.buried.len() == RECENT_BURIED {
            self.buried.pop_front();
        }
        self.buried.push_back(id);
    }

    /// Opens its credit when a useful share of it is free, closes it when full.
    fn refresh_filling(&mut self, max: usize, share: usize) {
        let held = self.in_flight.len();
        if held >= max {
            self.filling = false;
        } else if held == 0 || max - held >= share {
            self.filling = true;
        }
    }

    fn feed_full(&self) -> bool {
        self.session.as_ref().is_some_and(|(_, tx)| tx.is_full())
    }
}

struct State {
    log: TaskLog,
    queue: WorkQueue,
    registry: ClientRegistry,
    clients: HashMap<ClientId, ClientState>,
    /// Queue mode: the connected clients taking tasks now (credit open, feed
    /// not full), by (deliveries in flight, id): the first takes the next task.
    ready: BTreeSet<(usize, ClientId)>,
    /// Broadcast: connected clients that took everything there was for them;
    /// a new task wakes these, no others.
    caught_up: HashSet<ClientId>,
    /// Clients whose feed was full, tried again on the clock tick.
    blocked: HashSet<ClientId>,
    /// Disconnected clients by when they were last seen (at most: a client
    /// seen since is filed again when it comes up): `[NAMED]`, `[EPHEMERAL]`.
    gone: [BTreeSet<(Instant, ClientId)>; 2],
    /// Ack deadlines, silence deadlines and retry backoffs.
    deadlines: Deadlines,
    next_token: u64,
    counters: Counters,
    next_session: SessionId,
    /// Set at shutdown: no new streams, no new deliveries.
    closed: bool,
    /// Dead letters not yet taken by the server for recording.
    dead: Vec<DeadLetter>,
    /// This state's identity: task ids are only meaningful within it.
    incarnation: String,
    /// Log lines to emit once the lock is released.
    notes: Vec<(log::Level, String)>,
    /// Journal records of this operation, queued as one entry just before
    /// the lock is released (so journal order is still event order).
    journal_out: Vec<Record>,
    /// Tasks an operator cancelled: skipped wherever they would be delivered.
    cancelled: BTreeSet<TaskId>,
    /// With a shared log: outcomes read before their task was ingested
    /// here (another replica was faster), applied when it is.
    settled_early: HashMap<TaskId, Settled>,
    /// Clients and deadlines looked at, for tests that check that an
    /// operation does not scan the fleet.
    visits: u64,
}

/// Queues a log line for after the lock, formatting it only if it will be logged.
fn note(notes: &mut Vec<(log::Level, String)>, level: log::Level, text: impl FnOnce() -> String) {
    if log::log_enabled!(target: LOG_TARGET, level) {
        notes.push((level, text()));
    }
}

/// The state, locked; on release it logs what was noted meanwhile.
struct Locked<'a> {
    guard: Option<MutexGuard<'a, State>>,
    /// Where the operation's journal records go (with `--state-dir`).
    journal: Option<&'a ResultSink>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let mut notes = vec![];
        if let Some(st) = self.guard.as_mut() {
            notes = std::mem::take(&mut st.notes);
            if let (Some(sink), false) = (self.journal, st.journal_out.is_empty()) {
                sink.journal_many(std::mem::take(&mut st.journal_out));
            }
        }
        drop(self.guard.take());
        for (level, text) in notes {
            log::log!(target: LOG_TARGET, level, "{text}");
        }
    }
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
    /// With `--store`: the task log all replicas share (see `shared`).
    shared: OnceLock<Arc<dyn SharedLog>>,
    /// With `--store`: the agents other replicas serve.
    fleet: OnceLock<Arc<dyn FleetView>>,
    /// The next task id to ingest from the shared log, for publishers
    /// waiting to see their tasks here.
    ingested: (Mutex<TaskId>, Condvar),
}

mod broadcast;
mod deadlines;
mod queue;
mod restore;
mod shared;

pub use shared::{AgentProgress, Claimed, FleetView, SharedLog};

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
            ready: BTreeSet::new(),
            caught_up: HashSet::new(),
            blocked: HashSet::new(),
            gone: [BTreeSet::new(), BTreeSet::new()],
            deadlines: Deadlines::default(),
            next_token: 0,
            counters: Counters::default(),
            next_session: 1,
            closed: false,
            dead: vec![],
            incarnation: format!("{:016x}", fastrand::u64(..)),
            notes: vec![],
            journal_out: vec![],
            cancelled: BTreeSet::new(),
            visits: 0,
            settled_early: HashMap::new(),
        };
        Dispatcher {
            config,
            state: Mutex::new(state),
            sink,
            durable,
            publishing: Mutex::new(()),
            shared: OnceLock::new(),
            fleet: OnceLock::new(),
            ingested: (Mutex::new(1), Condvar::new()),
        }
    }

    /// Whether it journals what it publishes (`--state-dir`), so that it
    /// outlives a restart, idempotency keys included.
    pub fn is_durable(&self) -> bool {
        self.durable && self.sink.is_some()
    }

    /// Journals a change of this operation (see `State::journal_out`).
    fn journal(&self, st: &mut Vec<Record>, record: impl FnOnce() -> Record) {
        if self.is_durable() {
            st.push(record());
        }
    }

    fn lock(&self) -> Locked<'_> {
        // A panic elsewhere must not take every client down with it.
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Locked {
            guard: Some(guard),
            journal: self.sink.as_ref().filter(|_| self.durable),
        }
    }

    /// The free credit at which a client is written to again (see `ClientState::filling`).
    fn batch_share(&self) -> usize {
        (self.config.max_in_flight / 4).max(1)
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
            labels: Labels::new(),
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
            labels,
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
        let known = st.clients.contains_key(client);
        if !known {
            let cursor = match self.config.start_at {
                StartAt::Oldest => st.log.first_id(),
                StartAt::New => st.log.next_id(),
            };
            // A targeted task waits for its client, even one that starts at `New`.
            let waiting: VecDeque<Delivery> = match self.config.mode {
                Mode::Broadcast => st
                    .log
                    .targeted_before(client, cursor)
                    .map(|t| Delivery {
                        task: t.clone(),
                        attempt: 1,
                    })
                    .collect(),
                Mode::Queue => VecDeque::new(),
            };
            self.make_room(st, ephemeral);
            let name = ClientId::from(client);
            let state = ClientState::new(name.clone(), cursor, waiting, ephemeral);
            st.clients.insert(name, state);
        }
        let now = Instant::now();
        let c = st.clients.get_mut(client).expect("inserted above");
        let name = c.name.clone();
        if let Some(key) = c.gone_key.take() {
            st.gone[c.ephemeral as usize].remove(&(key, name.clone()));
        }
        // A stream it replaces ends here (its sender is dropped).
        c.session = Some((id, tx));
        c.holder = (instance.to_string(), peer.to_string());
        c.leases = leases && !ephemeral;
        c.last_seen = now;
        c.blocked = false;
        st.blocked.remove(client);
        note(&mut st.notes, log::Level::Info, || {
            format!(
                "client {client} {} from {peer}",
                if known { "reconnected" } else { "connected" }
            )
        });
        st.registry.connect(client, peer, labels);
        if let (Some(t), false) = (self.config.client_timeout, ephemeral) {
            st.deadlines.push(now + t, Due::Silence, name, id);
        }
        // What the previous stream left unanswered is taken back now.
        self.take_back_all(st, client, "client reconnected");
        self.refile(st, client);
        self.pump_after(st, Some(client));
        Ok((id, rx))
    }

    /// Keeps the remembered clients under `max_known_clients` by forgetting
    /// the longest-disconnected ones (connected clients are never forgotten).
    /// Room for a seed peer is never made at a named agent's expense (seed
    /// peers are forgotten anyway once their connection ends).
    fn make_room(&self, st: &mut State, for_ephemeral: bool) {
        while st.clients.len() >= self.config.max_known_clients.max(1) {
            let Some(name) = self.longest_gone(st, for_ephemeral) else {
                return;
            };
            note(&mut st.notes, log::Level::Warn, || {
                format!(
                    "client {name} forgotten: more than {} clients are known (--max-known-clients)",
                    self.config.max_known_clients
                )
            });
            self.forget(st, &name, "client forgotten");
        }
    }

    /// The disconnected client seen longest ago (a seed peer, with `ephemeral_only`).
    fn longest_gone(&self, st: &mut State, ephemeral_only: bool) -> Option<ClientId> {
        loop {
            let eph = st.gone[EPHEMERAL].first();
            let named = st.gone[NAMED].first().filter(|_| !ephemeral_only);
            let (i, (key, name)) = match (named, eph) {
                (Some(n), Some(e)) if e < n => (EPHEMERAL, e.clone()),
                (Some(n), _) => (NAMED, n.clone()),
                (None, Some(e)) => (EPHEMERAL, e.clone()),
                (None, None) => return None,
            };
            st.visits += 1;
            let c = st.clients.get_mut(&name).expect("gone clients are known");
            if c.last_seen <= key {
                return Some(name);
            }
            // Seen since it was filed: filed again under when it was.
            st.gone[i].remove(&(key, name.clone()));
            st.gone[i].insert((c.last_seen, name));
            c.gone_key = Some(c.last_seen);
        }
    }

    /// Forgets a disconnected client, taking back what it holds.
    fn forget(&self, st: &mut State, client: &str, why: &str) {
        self.take_back_all(st, client, why);
        let Some(c) = st.clients.remove(client) else {
            return;
        };
        if let Some(key) = c.gone_key {
            st.gone[c.ephemeral as usize].remove(&(key, c.name.clone()));
        }
        if let Some(held) = c.ready_key {
            st.ready.remove(&(held, c.name.clone()));
        }
        st.caught_up.remove(client);
        st.blocked.remove(client);
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
        self.pump_after(st, None);
    }

    /// Whether `client` has a task stream open here.
    pub fn has_session(&self, client: &str) -> bool {
        self.lock()
            .clients
            .get(client)
            .is_some_and(|c| c.session.is_some())
    }

    /// Ends `client`'s task stream now (its credentials were revoked, or an
    /// operator said so): its tasks are handled as for any disconnect.
    /// Returns whether it was connected.
    pub fn evict(&self, client: &str, why: &str) -> bool {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.clients.get(client).is_none_or(|c| c.session.is_none()) {
            return false;
        }
        note(&mut st.notes, log::Level::Warn, || {
            format!("client {client} disconnected: {why}")
        });
        self.end_session(st, client, why);
        self.pump_after(st, None);
        true
    }

    /// A client's stream is over (gone, declared gone, or unwritable): in queue
    /// mode its tasks go to others now; in broadcast they wait for it to come
    /// back (and for late answers on its result stream).
    fn end_session(&self, st: &mut State, client: &str, why: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        let now = Instant::now();
        c.session = None;
        c.last_seen = now;
        c.blocked = false;
        if !c.draining {
            let i = c.ephemeral as usize;
            if let Some(key) = c.gone_key.replace(now) {
                st.gone[i].remove(&(key, c.name.clone()));
            }
            st.gone[i].insert((now, c.name.clone()));
        }
        st.caught_up.remove(client);
        st.blocked.remove(client);
        st.registry.disconnect(client);
        note(&mut st.notes, log::Level::Info, || {
            format!("client {client}: {why}")
        });
        if self.config.mode == Mode::Queue {
            self.take_back_all(st, client, why);
        }
        self.refile(st, client);
        self.forget_if_done(st, client);
    }

    /// A result stream of `client` ended: forget a seed client that has no
    /// task stream any more, whatever it left unanswered.
    pub fn results_ended(&self, client: &str) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st
            .clients
            .get(client)
            .is_some_and(|c| c.ephemeral && c.session.is_none())
        {
            self.forget(st, client, "client disconnected");
            self.pump_after(st, None);
        }
    }

    /// Appends tasks to the log (and the queue) and offers them to clients
    /// with credit. When durable, the tasks are on disk before any client can
    /// see them: this blocks the calling (producer) thread on the fsync.
    /// Returns the tasks published: none if the journal could not be written.
    pub fn publish<I>(&self, tasks: I) -> Vec<Arc<Task>>
    where
        I: IntoIterator<Item = (Option<String>, String)>,
    {
        let tasks = tasks
            .into_iter()
            .map(|(target, text)| NewTask::new(target, text))
            .collect();
        self.publish_tasks(tasks, &mut |_| {})
            .map_or(vec![], |(added, _)| added)
    }

    /// Publishes tasks as [`Dispatcher::publish`] does, except those whose
    /// idempotency key is already known: one per input task, in order, says
    /// which task it was published as, or which task it duplicates.
    ///
    /// A key is remembered as long as the task published with it is
    /// retained, that is while it is among the last `retain` tasks
    /// (`--retain`) published from any source (the window JetStream keeps
    /// `Nats-Msg-Id`s for, counted in tasks rather than time). With
    /// `--state-dir` keys are journaled with their tasks, so a restart
    /// remembers them. Two tasks of one call with the same key are published
    /// once. Tasks without a key cost nothing more than through `publish`.
    ///
    /// Fails, publishing nothing, when the tasks could not be written to the
    /// state journal (the server is stopping; the cause is logged).
    pub fn publish_new(&self, tasks: Vec<NewTask>) -> Result<Vec<Published>, NotJournaled> {
        self.publish_new_then(tasks, |_| {})
    }

    /// [`Dispatcher::publish_new`], calling `on_added` with the tasks
    /// published once they have their ids and before any is delivered (so
    /// that what answers them can be matched; it runs under the dispatcher's
    /// lock and must not call back into the dispatcher).
    pub fn publish_new_then(
        &self,
        tasks: Vec<NewTask>,
        mut on_added: impl FnMut(&[Arc<Task>]),
    ) -> Result<Vec<Published>, NotJournaled> {
        let (added, duplicates) = self.publish_tasks(tasks, &mut on_added)?;
        if duplicates.is_empty() {
            return Ok(added.into_iter().map(Published::New).collect());
        }
        let mut added = added.into_iter();
        Ok(duplicates
            .into_iter()
            .map(|of| match of {
                Some(of) => Published::Duplicate { of },
                None => Published::New(added.next().expect("one task per new one")),
            })
            .collect())
    }

    /// For each task, the id of the task whose key it repeats, if any: one
    /// retained in the log, or one before it in `tasks` (which would get ids
    /// from `first` on). Empty when no task has a key.
    fn duplicates(log: &TaskLog, first: TaskId, tasks: &[NewTask]) -> Duplicates {
        if tasks.iter().all(|t| t.key.is_none()) {
            return vec![];
        }
        let mut next = first;
        let mut in_batch: HashMap<&str, TaskId> = HashMap::new();
        tasks
            .iter()
            .map(|t| {
                let Some(key) = t.key.as_deref() else {
                    next += 1;
                    return None;
                };
                let known = log.keyed(key).or_else(|| in_batch.get(key).copied());
                if known.is_none() {
                    in_batch.insert(key, next);
                    next += 1;
                }
                known
            })
            .collect()
    }

    /// Publishes the tasks whose key is not known: the tasks published, and
    /// what [`Dispatcher::duplicates`] found.
    fn publish_tasks(
        &self,
        tasks: Vec<NewTask>,
        on_added: &mut dyn FnMut(&[Arc<Task>]),
    ) -> Result<(Vec<Arc<Task>>, Duplicates), NotJournaled> {
        let _serial = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = self.shared.get() {
            return self.append_shared(shared.as_ref(), tasks, on_added);
        }
        // Only publishers add tasks (and keys), and they are serialised: what
        // is found here still holds when the tasks are added below.
        let keyed = tasks.iter().any(|t| t.key.is_some());
        let journaled = self.is_durable() && !tasks.is_empty();
        let (first, duplicates) = if keyed || journaled {
            let st = self.lock();
            let first = st.log.next_id();
            (first, Dispatcher::duplicates(&st.log, first, &tasks))
        } else {
            (0, vec![])
        };
        let is_new = |i: usize| duplicates.get(i).is_none_or(Option::is_none);
        if let (true, Some(sink)) = (journaled, &self.sink) {
            let new = (0..tasks.len()).filter(|i| is_new(*i));
            for (id, i) in (first..).zip(new) {
                let t = &tasks[i];
                sink.journal(Record::Task {
                    id,
                    text: t.text.clone(),
                    target: t.target.clone(),
                    key: t.key.clone(),
                    any_of: t.any_of.clone(),
                });
            }
            if futures::executor::block_on(sink.journaled()).is_err() {
                let new = (0..tasks.len()).filter(|i| is_new(*i)).count();
                log::error!(
                    "{new} tasks could not be written to the state journal and were not accepted"
                );
                return Err(NotJournaled);
            }
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut added = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.into_iter().enumerate() {
            if let Some(Some(of)) = duplicates.get(i) {
                log::debug!(
                    "task not published: its key {} is task {of}'s: {}",
                    quoted(t.key.as_deref().unwrap_or_default()),
                    quoted(&t.text)
                );
                continue;
            }
            let any_of = t.any_of.map(Arc::<[String]>::from);
            let task = st
                .log
                .push_any_of(t.text, t.target, t.key.map(Arc::from), any_of);
            log::debug!("task {} produced: {}", task.id, quoted(&task.text));
            if self.config.mode == Mode::Queue {
                st.queue.push(task.clone());
            }
            added.push(task);
        }
        st.counters.produced += added.len() as u64;
        on_added(&added);
        self.offer_new(st, &added);
        Ok((added, duplicates))
    }

    /// Offers tasks just added to the log to the clients that can take them now.
    fn offer_new(&self, st: &mut State, added: &[Arc<Task>]) {
        if st.closed {
            return;
        }
        let mut targets: Vec<String> = vec![];
        let mut for_all = false;
        for task in added {
            match (&task.target, &task.any_of) {
                (Some(t), _) if !targets.contains(t) => targets.push(t.clone()),
                (Some(_), _) => {}
                (None, Some(clients)) => {
                    for c in clients.iter() {
                        if !targets.contains(c) {
                            targets.push(c.clone());
                        }
                    }
                }
                (None, None) => for_all = true,
            }
        }
        match self.config.mode {
            Mode::Broadcast => {
                // Only clients that took everything can take a new task now
                // (the others are out of credit, and get it with their next).
                let woken: Vec<ClientId> = if for_all {
                    st.caught_up.iter().cloned().collect()
                } else {
                    targets
                        .iter()
                        .filter_map(|t| st.caught_up.get(t.as_str()).cloned())
                        .collect()
                };
                for name in woken {
                    self.pump_broadcast(st, &name);
                }
            }
            Mode::Queue => {
                for t in &targets {
                    self.pump_queue_client(st, t);
                }
                self.pump_queue_ready(st);
            }
        }
    }

    /// Judges a client's answer, records it through the sink (if the
    /// dispatcher has one) and returns the record: `None` for an exact resend
    /// of an accepted result (acknowledged again, recorded once).
    ///
    /// An answer counts if it is for the task's current attempt, or for an
    /// earlier attempt of the client that holds the current one (its answer
    /// crossed a redelivery to itself, e.g. a resend after a reconnect).
    pub fn complete(&self, client: &str, answer: Answer) -> Option<ResultRecord> {
        self.complete_many(client, vec![answer], false)
            .pop()
            .flatten()
    }

    /// [`Dispatcher::complete`] for an agent known by its id: its answer must
    /// name the delivery exactly (task id, attempt and incarnation), as our
    /// clients always do; an answer that leaves any of them out matches
    /// nothing and is recorded as stale. The wildcards of `complete` are for
    /// seed peers, which cannot send them.
    pub fn complete_exact(&self, client: &str, answer: Answer) -> Option<ResultRecord> {
        self.complete_many(client, vec![answer], true)
            .pop()
            .flatten()
    }

    /// Judges a batch of `client`'s answers under one acquisition of the
    /// lock (with `exact`, as [`Dispatcher::complete_exact`] does; without,
    /// as [`Dispatcher::complete`]), hands the records to the sink as one
    /// batch, tops up the client's feed once, and returns the judgements in order.
    pub fn complete_many(
        &self,
        client: &str,
        answers: Vec<Answer>,
        exact: bool,
    ) -> Vec<Option<ResultRecord>> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut out = Vec::with_capacity(answers.len());
        let mut records = Vec::with_capacity(if self.sink.is_some() {
            answers.len()
        } else {
            0
        });
        let mut judged = false;
        for answer in answers {
            st.counters.results += 1;
            let named =
                answer.task_id != 0 && answer.attempt != 0 && !answer.incarnation.is_empty();
            let outcome = if exact && !named {
                stale(&st.log, client, answer)
            } else {
                judged = true;
                self.judge(st, client, answer)
            };
            if let (Some(_), Some(r)) = (&self.sink, &outcome) {
                records.push(r.clone());
            }
            out.push(outcome);
        }
        // Recorded under the lock, so that a snapshot never runs ahead of a
        // result it already counts as answered.
        if let (Some(sink), false) = (&self.sink, records.is_empty()) {
            sink.record_many(records);
        }
        if judged {
            self.refile(st, client);
            self.forget_if_done(st, client);
            // Only this client got credit back (in broadcast, only it can use it).
            self.pump_after(st, Some(client));
        }
        out
    }

    fn judge(&self, st: &mut State, client: &str, answer: Answer) -> Option<ResultRecord> {
        if let Some(c) = st.clients.get_mut(client) {
            c.last_seen = Instant::now();
            c.progress_at = c.last_seen;
        }
        if !answer.incarnation.is_empty() && answer.incarnation != st.incarnation {
            // A task id of another life of the server (restarted without its
            // state): the same number may name a different task now.
            let answer = Answer {
                task_id: 0,
                ..answer
            };
            return stale(&st.log, client, answer);
        }
        match self.config.mode {
            Mode::Broadcast => self.complete_broadcast(st, client, answer),
            Mode::Queue => self.complete_queue(st, client, answer),
        }
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

    /// The clock: takes back deliveries past the ack deadline, declares
    /// silent clients gone, forgets clients gone too long, and redelivers
    /// refused tasks whose backoff is over. It looks only at what is due.
    pub fn expire(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = Instant::now();
        let mut touched: Vec<ClientId> = vec![];
        while let Some((due, name, tag)) = st.deadlines.pop_due(now) {
            st.visits += 1;
            match due {
                Due::Ack => self.ack_due(st, &name, tag, now, &mut touched),
                Due::Silence => self.silence_due(st, &name, tag, now),
                Due::Retry => self.retry_due(st, &name, tag, now, &mut touched),
            }
        }
        self.forget_gone(st, now);
        for task in st.queue.wake_due(now) {
            if let Some((name, _)) = task
                .target
                .as_deref()
                .and_then(|t| st.clients.get_key_value(t))
            {
                touched.push(name.clone());
            }
        }
        // Feeds that were full may have room now.
        let blocked: Vec<ClientId> = st.blocked.drain().collect();
        for name in blocked {
            st.visits += 1;
            let Some(c) = st.clients.get_mut(&name) else {
                continue;
            };
            if c.feed_full() {
                st.blocked.insert(name);
                continue;
            }
            c.blocked = false;
            self.refile(st, &name);
            touched.push(name);
        }
        if st.closed {
            return;
        }
        for name in touched {
            match self.config.mode {
                Mode::Broadcast => self.pump_broadcast(st, &name),
                Mode::Queue => self.pump_queue_client(st, &name),
            }
        }
        if self.config.mode == Mode::Queue {
            self.pump_queue_ready(st);
        }
    }

    /// A client's ack deadline came: takes back what is overdue, and arms the next.
    fn ack_due(
        &self,
        st: &mut State,
        name: &ClientId,
        token: u64,
        now: Instant,
        touched: &mut Vec<ClientId>,
    ) {
        let Some(c) = st.clients.get_mut(name) else {
            return;
        };
        if c.ack_timer != Some(token) {
            return;
        }
        c.ack_timer = None;
        // A disconnected client's deliveries wait for it (they are taken
        // back when it returns or is forgotten); a seed client's answers are
        // matched by order, so taking one back would shift every later answer.
        if c.session.is_none() || c.ephemeral {
            return;
        }
        let expired: Vec<(TaskId, &'static str)> = c
            .in_flight
            .iter()
            .filter_map(|f| self.overdue(c, f, now).map(|why| (f.delivery.task.id, why)))
            .collect();
        if !expired.is_empty() {
            for (id, why) in expired {
                self.take_back(st, name, id, why);
            }
            touched.push(name.clone());
        }
        self.arm_ack(st, name);
    }

    /// Arms `client`'s ack deadline at the earliest of its deliveries', unless armed.
    fn arm_ack(&self, st: &mut State, client: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        if c.ack_timer.is_some() || c.ephemeral || c.session.is_none() {
            return;
        }
        let Some(at) = c.in_flight.iter().map(|f| self.ack_deadline(c, f)).min() else {
            return;
        };
        st.next_token += 1;
        c.ack_timer = Some(st.next_token);
        st.deadlines
            .push(at, Due::Ack, c.name.clone(), st.next_token);
    }

    /// A client's silence deadline came: declares it gone if it was silent
    /// that long, or sets the deadline again from when it was last heard.
    fn silence_due(&self, st: &mut State, name: &ClientId, session: SessionId, now: Instant) {
        let (Some(c), Some(limit)) = (st.clients.get(name), self.config.client_timeout) else {
            return;
        };
        if c.session.as_ref().map(|(id, _)| *id) != Some(session) || c.ephemeral {
            return;
        }
        let idle = now.duration_since(c.last_seen);
        if idle > limit {
            note(&mut st.notes, log::Level::Warn, || {
                format!("client {name} silent for {idle:?}: declared gone")
            });
            self.end_session(st, name, "declared gone");
        } else {
            let at = c.last_seen + limit;
            st.deadlines.push(at, Due::Silence, name.clone(), session);
        }
    }

    /// A client's retry deadline came (broadcast): the refused tasks whose
    /// backoff is over become deliverable again.
    fn retry_due(
        &self,
        st: &mut State,
        name: &ClientId,
        token: u64,
        now: Instant,
        touched: &mut Vec<ClientId>,
    ) {
        let Some(c) = st.clients.get_mut(name) else {
            return;
        };
        if c.retry_timer.map(|(t, _)| t) != Some(token) {
            return;
        }
        c.retry_timer = None;
        let later = c.delayed.split_off(&(now, TaskId::MAX));
        let due = std::mem::replace(&mut c.delayed, later);
        if !due.is_empty() {
            let mut due: Vec<Delivery> = due.into_values().collect();
            due.sort_by_key(|d| d.task.id);
            c.redeliver.extend(due);
            touched.push(name.clone());
        }
        self.arm_retry(st, name);
    }

    /// Arms `client`'s retry deadline at its earliest refused task's, unless armed as early.
    fn arm_retry(&self, st: &mut State, client: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        let Some(&(at, _)) = c.delayed.first_key_value().map(|(k, _)| k) else {
            return;
        };
        if c.retry_timer.is_some_and(|(_, armed)| armed <= at) {
            return;
        }
        st.next_token += 1;
        c.retry_timer = Some((st.next_token, at));
        st.deadlines
            .push(at, Due::Retry, c.name.clone(), st.next_token);
    }

    /// Forgets the clients disconnected for longer than they are remembered.
    fn forget_gone(&self, st: &mut State, now: Instant) {
        for (i, linger) in [
            (NAMED, self.config.forget_after),
            (EPHEMERAL, EPHEMERAL_LINGER),
        ] {
            while let Some((key, name)) = st.gone[i].first().cloned() {
                if now.saturating_duration_since(key) <= linger {
                    break;
                }
                st.visits += 1;
                st.gone[i].pop_first();
                let Some(c) = st.clients.get_mut(&name) else {
                    continue;
                };
                c.gone_key = None;
                if now.saturating_duration_since(c.last_seen) <= linger {
                    // Heard from since (a late answer): filed again.
                    c.gone_key = Some(c.last_seen);
                    st.gone[i].insert((c.last_seen, name));
                    continue;
                }
                self.forget(st, &name, "client forgotten");
            }
        }
    }

    /// When a delivery is to be taken back (see [`Dispatcher::overdue`]).
    fn ack_deadline(&self, c: &ClientState, f: &InFlight) -> Instant {
        let ack = self.config.ack_timeout;
        if !c.leases {
            return f.sent_at + ack;
        }
        let lease_end = f.sent_at + self.config.max_lease.max(ack);
        let idle_end = match f.renewed {
            Some(t) => t + ack,
            None => f.sent_at.max(c.progress_at) + ack,
        };
        lease_end.min(idle_end)
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
        if !c.leases {
            return;
        }
        let named: HashSet<(TaskId, u32)> = working
            .iter()
            .filter(|(_, _, incarnation)| *incarnation == st.incarnation)
            .map(|(task, attempt, _)| (*task, *attempt))
            .collect();
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

    /// Takes every delivery `client` holds back (see `give_back`).
    fn take_back_all(&self, st: &mut State, client: &str, why: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        if c.in_flight.is_empty() {
            return;
        }
        let held: Vec<InFlight> = c.in_flight.drain(..).collect();
        for f in held {
            self.give_back(st, client, f, why);
        }
        self.refile(st, client);
    }

    /// Takes `client`'s delivery of task `id` back (see `give_back`).
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
        self.give_back(st, client, f, why);
        self.refile(st, client);
    }

    /// A delivery taken from `client`: it is delivered again (to anyone in
    /// queue mode, to the same client in broadcast), or dead-lettered when it
    /// has had `max_attempts`.
    fn give_back(&self, st: &mut State, client: &str, f: InFlight, why: &str) {
        st.registry.released(client);
        let id = f.delivery.task.id;
        if f.delivery.attempt >= self.config.max_attempts {
            match self.config.mode {
                Mode::Queue => {
                    st.queue.finish(id);
                    st.log.settle(id, Settled::Dead);
                }
                Mode::Broadcast => {
                    if let Some(c) = st.clients.get_mut(client) {
                        c.buried(id);
                    }
                }
            }
            let reason = format!("{why} (attempt {})", f.delivery.attempt);
            bury(st, self.sink.as_ref(), &f.delivery, client, reason);
            return;
        }
        log::debug!("task {id} taken back from {client} ({why}); it will be delivered again");
        st.counters.redelivered += 1;
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        match self.config.mode {
            Mode::Queue => st.queue.release(id, Some(&c.name)),
            Mode::Broadcast => c.redeliver.push_back(Delivery {
                task: f.delivery.task,
                attempt: f.delivery.attempt + 1,
            }),
        }
    }

    /// Files `client` where its state says: opens or closes its credit, and
    /// (queue mode) puts it in, moves it within, or takes it out of `ready`.
    fn refile(&self, st: &mut State, client: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        c.refresh_filling(self.config.max_in_flight, self.batch_share());
        if self.config.mode != Mode::Queue {
            return;
        }
        let want = (!st.closed && c.session.is_some() && !c.blocked && !c.drained && c.filling)
            .then_some(c.in_flight.len());
        if want != c.ready_key {
            if let Some(held) = c.ready_key {
                st.ready.remove(&(held, c.name.clone()));
            }
            if let Some(held) = want {
                st.ready.insert((held, c.name.clone()));
            }
            c.ready_key = want;
        }
    }

    /// Notes that `client`'s feed is full: it gets nothing until the clock finds room in it.
    fn block(&self, st: &mut State, client: &str) {
        let Some(c) = st.clients.get_mut(client) else {
            return;
        };
        c.blocked = true;
        st.blocked.insert(c.name.clone());
        self.refile(st, client);
    }

    /// Tops up feeds after an event: `client`'s (in broadcast, only it can
    /// use what it freed), and in queue mode whoever is first in line for
    /// the tasks waiting.
    fn pump_after(&self, st: &mut State, client: Option<&str>) {
        if st.closed {
            return;
        }
        match self.config.mode {
            Mode::Broadcast => {
                if let Some(client) = client {
                    self.pump_broadcast(st, client);
                }
            }
            Mode::Queue => {
                if let Some(client) = client {
                    self.pump_queue_client(st, client);
                }
                self.pump_queue_ready(st);
            }
        }
    }

    /// Forgets a seed client whose task stream ended once nothing is in flight.
    fn forget_if_done(&self, st: &mut State, client: &str) {
        if st
            .clients
            .get(client)
            .is_some_and(|c| c.ephemeral && c.session.is_none() && c.in_flight.is_empty())
        {
            self.forget(st, client, "client disconnected");
        }
    }

    /// Ends every client's stream (cleanly) and stops offering tasks: for
    /// shutdown. Results for deliveries in flight are still judged.
    pub fn close_all(&self) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.closed = true;
        for c in st.clients.values_mut() {
            c.draining = c.session.take().is_some();
            c.ready_key = None;
            c.blocked = false;
        }
        st.ready.clear();
        st.caught_up.clear();
        st.blocked.clear();
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
        let st = self.lock();
        let mut all = st.registry.snapshot();
        for c in &mut all {
            c.drained = st.clients.get(c.id.as_str()).is_some_and(|s| s.drained);
        }
        drop(st);
        self.with_fleet(all)
    }

    /// Drains `client` (it gets nothing new and finishes what it holds) or,
    /// with `drain` false, lets it take tasks again; returns how many tasks
    /// it holds, or `None` for a client neither connected nor remembered.
    pub fn drain(&self, client: &str, drain: bool) -> Option<usize> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let c = st.clients.get_mut(client)?;
        c.drained = drain;
        let held = c.in_flight.len();
        self.refile(st, client);
        if !drain {
            self.pump_after(st, Some(client));
        }
        Some(held)
    }

    /// Whether an operator drained `client`.
    pub fn is_drained(&self, client: &str) -> bool {
        self.lock().clients.get(client).is_some_and(|c| c.drained)
    }

    /// Where `task` stands with `client` (see [`TaskProgress`]).
    pub fn progress_of(&self, task: TaskId, client: &str) -> TaskProgress {
        self.progress_many(&[(task, client)])[0]
    }

    /// [`Dispatcher::progress_of`] for many (task, client) pairs under one
    /// lock (a job's status over a large fleet).
    pub fn progress_many(&self, pairs: &[(TaskId, &str)]) -> Vec<TaskProgress> {
        let st = self.lock();
        pairs
            .iter()
            .map(|&(task, client)| self.progress_locked(&st, task, client))
            .collect()
    }

    fn progress_locked(&self, st: &State, task: TaskId, client: &str) -> TaskProgress {
        let Some(c) = st.clients.get(client) else {
            return TaskProgress::Waiting;
        };
        if let Some(f) = c.in_flight.iter().find(|f| f.delivery.task.id == task) {
            return TaskProgress::Delivered {
                attempt: f.delivery.attempt,
                running: f.renewed.is_some(),
            };
        }
        let dead = match self.config.mode {
            Mode::Broadcast => c.buried.contains(&task),
            Mode::Queue => matches!(st.log.settled(task), Some(Settled::Dead)),
        };
        if dead {
            TaskProgress::Dead
        } else if st.cancelled.contains(&task) {
            TaskProgress::Cancelled
        } else {
            TaskProgress::Waiting
        }
    }

    /// Cancels `tasks`: none is delivered any more (a delivery in an agent's
    /// hands may still be answered). Returns how many were retained and not
    /// finished yet, which are the ones cancelled.
    pub fn cancel(&self, tasks: &[TaskId]) -> usize {
        if let Some(shared) = self.shared.get() {
            return self.cancel_shared(shared.as_ref(), tasks);
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut n = 0;
        for &id in tasks {
            let open = match self.config.mode {
                Mode::Queue => st.queue.get(id).is_some(),
                Mode::Broadcast => st.log.get(id).is_some(),
            };
            if !open || !st.cancelled.insert(id) {
                continue;
            }
            n += 1;
            self.journal(&mut st.journal_out, || Record::Cancelled { task: id });
            if st.queue.get(id).is_some_and(|q| q.holder.is_none()) {
                st.queue.finish(id);
                st.log.settle(id, Settled::Cancelled);
            }
        }
        if n > 0 {
            note(&mut st.notes, log::Level::Info, || {
                format!("{n} tasks cancelled: they are delivered no further")
            });
        }
        drop(guard);
        // Answered once it would survive a crash.
        if let (true, true, Some(sink)) = (n > 0, self.durable, &self.sink) {
            let _ = futures::executor::block_on(sink.journaled());
        }
        n
    }

    /// The retained task published with idempotency key `key`, if any.
    pub fn task_with_key(&self, key: &str) -> Option<TaskId> {
        self.lock().log.keyed(key)
    }

    /// Queue mode: the client holding a delivery of `task` now, if any.
    pub fn holder_of(&self, task: TaskId) -> Option<String> {
        let st = self.lock();
        let q = st.queue.get(task)?;
        q.holder.as_ref().map(|h| h.to_string())
    }

    /// Whether an operator cancelled `task`.
    pub fn is_cancelled(&self, task: TaskId) -> bool {
        self.lock().cancelled.contains(&task)
    }

    /// Queue mode: whether `task` was dead-lettered.
    pub fn is_dead(&self, task: TaskId) -> bool {
        matches!(self.lock().log.settled(task), Some(Settled::Dead))
    }

    /// The connected agents whose labels `selector` matches, by id (not
    /// those an operator drained).
    pub fn matching(&self, selector: &Selector) -> Vec<String> {
        let st = self.lock();
        let mut agents = st.registry.matching(selector);
        agents.retain(|a| !st.clients.get(a.as_str()).is_some_and(|c| c.drained));
        drop(st);
        for a in self.matching_elsewhere(selector) {
            if !agents.contains(&a) {
                agents.push(a);
            }
        }
        agents
    }

    /// Whether `client` is connected or remembered (it has a resume point),
    /// here or (with replicas) at another replica.
    pub fn knows(&self, client: &str) -> bool {
        self.lock().clients.contains_key(client)
            || self
                .fleet
                .get()
                .is_some_and(|f| f.elsewhere().iter().any(|c| c.id == client))
    }

    /// Where a task without a target goes, in words.
    pub fn default_target(&self) -> &'static str {
        match self.config.mode {
            Mode::Broadcast => "every agent",
            Mode::Queue => "the work queue",
        }
    }

    /// How many clients are connected (without listing them, for the stats line).
    pub fn connected(&self) -> usize {
        self.lock().registry.len()
    }

    /// How much is going on now, in one pass over the clients (for a
    /// metrics scrape, not for every message).
    pub fn gauges(&self) -> Gauges {
        let st = self.lock();
        let next = st.log.next_id();
        let mut g = Gauges {
            connected: st.registry.len(),
            ..Gauges::default()
        };
        for c in st.clients.values() {
            g.in_flight += c.in_flight.len();
            if self.config.mode == Mode::Broadcast && c.session.is_some() {
                let unoffered = next.saturating_sub(c.cursor.max(st.log.first_id()));
                g.backlog += unoffered as usize + c.redeliver.len() + c.delayed.len();
            }
        }
        if self.config.mode == Mode::Queue {
            g.backlog = st.queue.len().saturating_sub(g.in_flight);
        }
        g
    }

    /// Totals since start.
    pub fn counters(&self) -> Counters {
        self.lock().counters
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
        received_at: crate::unixtime::now(),
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
        received_at: crate::unixtime::now(),
        seq: None,
    };
    Some(record)
}

/// Gives up on a delivery: its dead letter goes to the sink (journaled, in
/// event order, since this runs under the state lock) or to the outbox.
fn bury(st: &mut State, sink: Option<&ResultSink>, d: &Delivery, client: &str, reason: String) {
    note(&mut st.notes, log::Level::Warn, || {
        format!(
            "task {} dead-lettered after {} attempts at {client}: {}",
            d.task.id,
            d.attempt,
            quoted(&reason)
        )
    });
    st.counters.dead += 1;
    let letter = DeadLetter {
        task_id: d.task.id,
        task: d.task.text.clone(),
        target: d.task.target.clone(),
        client: client.to_string(),
        attempts: d.attempt,
        reason,
        at: crate::unixtime::now(),
        seq: None,
    };
    match sink {
        Some(sink) => sink.bury(letter),
        None => st.dead.push(letter),
    }
}

#[cfg(test)]
mod tests;
