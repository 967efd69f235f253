//! `Replica`: this server as one of several sharing one fleet through NATS
//! JetStream (`--store nats://...`). We do not replicate anything ourselves:
//! JetStream (Raft-replicated streams, a durable work-queue consumer,
//! key-value buckets) holds everything replicas must agree on, and each
//! replica keeps its dispatcher as a view of it:
//!
//! - `CONTACT_TASKS` (subjects `contact.tasks.any`, `contact.tasks.to`): the
//!   task log. A task's id is its stream sequence; its idempotency key is
//!   the `Nats-Msg-Id`, so JetStream's duplicate window rejects a repeat
//!   whichever replica it reaches. Every replica reads the whole stream, in
//!   order, into its dispatcher ([`Dispatcher::ingest`]).
//! - the durable pull consumer `contact-queue` on `contact.tasks.any` (queue
//!   mode): it hands each untargeted task to one replica (a claim), which
//!   delivers it to one of its agents; the claim is kept alive (in-progress
//!   acks) while the replica lives, acknowledged once the task's outcome is
//!   stored, and given back (nak) when no agent here can take it. A replica
//!   that dies stops renewing: after `AckWait` (the replica timeout)
//!   JetStream hands its tasks to another replica.
//! - `CONTACT_OUTCOMES` (subjects `contact.outcome.<task>` in queue mode,
//!   `contact.outcome.<task>.<agent>` in broadcast): accepted results and
//!   dead letters, each published with its subject as its `Nats-Msg-Id`.
//!   JetStream stores the first outcome of a subject only (within the
//!   duplicate window, one hour), so exactly one result (or dead letter)
//!   counts per task (per agent in broadcast) whichever replicas delivered
//!   it: that is fencing across replicas. A
//!   result is acknowledged to its agent only after this publish was
//!   acknowledged. Every replica reads the outcomes back (queue mode: all of
//!   them, to settle tasks it holds or will be handed).
//! - key-value bucket `contact_agents`: one lease per connected agent id
//!   (the replica and process holding it, its labels), with a time to live
//!   (the replica timeout) renewed by the holder. A second process with the
//!   same id is refused by every replica; the same process reconnecting to
//!   another replica takes its lease over, and the replica it left ends its
//!   old session.
//! - key-value bucket `contact_cursors` (broadcast): each agent's place in
//!   the task log, saved by the replica serving it before its results are
//!   acknowledged (and when it leaves), so that an agent that moves
//!   continues after its last acknowledged task.
//! - key-value bucket `contact_fleet`: the fleet's dispatch mode and its
//!   incarnation (the identity agents echo with results).
//!
//! The NATS client (`async-nats`) runs on a small tokio runtime of its own;
//! our threads reach it through `block_on` on that runtime's handle (the
//! recorder, producers) and gRPC handlers through a oneshot channel (a lease).
//! A replica that loses NATS for half the replica timeout stops (its
//! agents move to other replicas) rather than diverge: by then the others
//! may own its agents and tasks.

use crate::dispatch::{
    AgentProgress, Claimed, Dispatcher, FleetView, Mode, NotJournaled, SharedLog,
};
use crate::error::Error;
use crate::jobs::{JobEvent, JobId, JobLog, JobTable, MAX_JOBS};
use crate::recorder::Entry;
use crate::registry::ClientInfo;
use crate::results::{DeadLetter, ResultRecord};
use crate::shutdown::Shutdown;
use crate::task::{NewTask, Settled, TaskId};
use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stream of tasks.
pub const TASKS_STREAM: &str = "CONTACT_TASKS";
/// Stream of accepted results and dead letters.
pub const OUTCOMES_STREAM: &str = "CONTACT_OUTCOMES";
/// Durable consumer handing untargeted queue tasks to replicas.
pub const QUEUE_CONSUMER: &str = "contact-queue";
/// Stream of job events (the job id is its `Created` event's sequence).
pub const JOBS_STREAM: &str = "CONTACT_JOBS";
/// Bucket of agent leases.
pub const AGENTS_BUCKET: &str = "contact_agents";
/// The stream behind it (a bucket `B` is the stream `KV_B`).
const AGENTS_STREAM: &str = "KV_contact_agents";
/// Bucket of broadcast agents' places in the task log.
pub const CURSORS_BUCKET: &str = "contact_cursors";
/// Bucket of fleet-wide settings.
pub const FLEET_BUCKET: &str = "contact_fleet";

/// How long a JetStream request may take before the replica gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reader of the task log or the outcomes waits for a message
/// before it checks whether it fell behind the stream.
const STALL_CHECK: Duration = Duration::from_secs(2);

/// How long a write to JetStream is tried again (a stream of an R3 cluster
/// that lost its leader elects another within seconds) before the replica
/// gives up on it: a result then is not acknowledged, and the replica stops.
const STORE_PATIENCE: Duration = Duration::from_secs(30);

/// Messages published before their acknowledgements are awaited.
const PUBLISH_ROUND: usize = 1024;

/// Most tasks claimed in one fetch.
const CLAIM_BATCH: usize = 256;

/// `--store` and its companions.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// NATS servers (`host:port`), from `nats://HOST:PORT[,HOST:PORT...]`.
    pub servers: Vec<String>,
    /// `--store-replicas`: copies JetStream keeps of each stream and bucket (1 or 3).
    pub copies: usize,
    /// `--replica-timeout`: how long a silent replica keeps its agents'
    /// leases and its claimed tasks.
    pub replica_timeout: Duration,
    /// How long the streams remember a `Nats-Msg-Id` (keys, outcome fences).
    pub dedupe_window: Duration,
}

/// Parses `nats://HOST:PORT[,HOST:PORT...]` (each entry may repeat the scheme).
pub fn parse_store(url: &str) -> Result<Vec<String>, String> {
    let rest = url.strip_prefix("nats://").ok_or_else(|| {
        format!("--store {url:?}: expected nats://HOST:PORT[,HOST:PORT...] (the only store besides --state-dir is NATS JetStream)")
    })?;
    let mut servers = vec![];
    for entry in rest.split(',') {
        let entry = entry.trim();
        let entry = entry.strip_prefix("nats://").unwrap_or(entry);
        let ok = entry.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(format!(
                "--store {url:?}: {entry:?} is not HOST:PORT (a NATS server's client port, e.g. 127.0.0.1:4222)"
            ));
        }
        servers.push(format!("nats://{entry}"));
    }
    Ok(servers)
}

/// An outcome as the outcomes stream holds it.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Outcome {
    Result {
        replica: String,
        #[serde(flatten)]
        result: ResultRecord,
    },
    Dead {
        replica: String,
        #[serde(flatten)]
        dead: DeadLetter,
    },
    /// An operator cancelled the task (`contact.outcome.<task>.cancelled`).
    Cancelled { replica: String, task: TaskId },
}

/// An agent's lease, as the agents bucket holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    pub agent: String,
    /// The replica serving it.
    pub replica: String,
    /// The agent process (`contact-client-instance`); empty for seed peers.
    pub instance: String,
    pub peer: String,
    pub labels: Vec<(String, String)>,
    /// Unix time the session began.
    pub since: f64,
}

/// Why an agent may not attach here.
#[derive(Debug)]
pub enum LeaseRefused {
    /// Another process holds the id, through another replica.
    InUse { replica: String, peer: String },
    /// NATS did not answer.
    Store(String),
}

/// An agent id as a key-value key or subject token (ids may hold any character).
fn agent_key(agent: &str) -> String {
    agent.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A lease this replica holds: the bucket revision it last wrote, and the
/// session it was taken for (see [`Replica::release`]).
struct Held {
    revision: u64,
    lease: Lease,
    token: u64,
}

/// A job event as the jobs stream holds it.
#[derive(Serialize, Deserialize)]
struct JobMessage {
    replica: String,
    #[serde(flatten)]
    event: JobEvent,
}

/// Told of every outcome another replica stored (jobs, rollouts).
pub type OutcomeObserver = Box<dyn Fn(&ResultRecord) + Send + Sync>;

struct Inner {
    name: String,
    mode: Mode,
    config: StoreConfig,
    handle: tokio::runtime::Handle,
    js: jetstream::Context,
    agents: kv::Store,
    cursors: kv::Store,
    /// Untargeted queue tasks this replica claimed, by id.
    claims: Mutex<HashMap<TaskId, jetstream::Message>>,
    leases: Mutex<HashMap<String, Held>>,
    /// Every lease in the bucket, as the watch last saw it (and when).
    fleet: Mutex<HashMap<String, (Lease, Instant)>>,
    dispatcher: std::sync::OnceLock<Arc<Dispatcher>>,
    observer: std::sync::OnceLock<OutcomeObserver>,
    /// When the NATS connection was lost (ms since `epoch`), 0 while connected.
    lost_at: Arc<AtomicU64>,
    epoch: Instant,
    /// Messages given a [`Replica::unique_id`] so far.
    published: AtomicU64,
    /// Unix milliseconds when this replica started.
    started: u128,
    stop: Shutdown,
    incarnation: String,
}

/// This replica's link to the shared store; cheap to clone.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

/// Owns the NATS runtime; dropping it ends every loop of the replica.
pub struct ReplicaRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    /// Flushed before the runtime stops: the last acknowledgements go out.
    client: async_nats::Client,
}

impl Drop for ReplicaRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            let client = self.client.clone();
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn store_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::State(format!("NATS JetStream store: {what}: {e}"))
}

impl Replica {
    /// Connects to NATS, creates (or checks) the streams and buckets, and
    /// reads the fleet's settings: `mode` must be the fleet's.
    pub fn connect(
        config: StoreConfig,
        mode: Mode,
        stop: Shutdown,
    ) -> Result<(Replica, ReplicaRuntime), Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nats")
            .enable_all()
            .build()
            .map_err(Error::Thread)?;
        let handle = runtime.handle().clone();
        let name = format!(
            "{}-{}",
            gethostname::gethostname().to_string_lossy(),
            std::process::id()
        );
        let lost_at = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        // A cluster just started (or electing leaders) answers some requests
        // late: setting up is tried again for a while.
        let started = Instant::now();
        let inner = loop {
            let attempt = setup(
                config.clone(),
                mode,
                name.clone(),
                lost_at.clone(),
                epoch,
                stop.clone(),
                handle.clone(),
            );
            match runtime.block_on(attempt) {
                Ok(inner) => break inner,
                Err(Error::State(why)) if started.elapsed() < STORE_PATIENCE => {
                    log::warn!("{why}; trying again");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        };
        let client = inner.js.client();
        Ok((
            Replica {
                inner: Arc::new(inner),
            },
            ReplicaRuntime {
                client,
                runtime: Some(runtime),
            },
        ))
    }

    /// A message id no other message of the fleet has: this replica's
    /// name, when it started, and a count.
    fn unique_id(&self) -> String {
        let n = self.inner.published.fetch_add(1, Ordering::Relaxed);
        format!("{}/{}/{n}", self.inner.name, self.inner.started)
    }

    /// This replica's name (host and process id), in leases and outcomes.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The fleet's incarnation (the same on every replica).
    pub fn incarnation(&self) -> &str {
        &self.inner.incarnation
    }

    /// Starts reading the shared log into `dispatcher` and the jobs into
    /// `jobs` and, in queue mode, claiming tasks; returns once this replica
    /// has read every task and outcome stored so far. `observer` is told of
    /// every outcome another replica stored.
    pub fn serve(
        &self,
        dispatcher: Arc<Dispatcher>,
        jobs: Arc<JobTable>,
        observer: OutcomeObserver,
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let _ = inner.dispatcher.set(dispatcher.clone());
        let _ = inner.observer.set(observer);
        dispatcher.share_log(Arc::new(self.clone()));
        dispatcher.see_fleet(Arc::new(self.clone()));
        jobs.share(Arc::new(self.clone()));
        let jobs_read = Arc::new(AtomicU64::new(0));
        self.spawn_loop("reading jobs", move |r| {
            let (jobs, read) = (jobs.clone(), jobs_read.clone());
            async move { r.read_jobs(jobs, read).await }
        });
        let tasks_upto = inner
            .handle
            .block_on(last_sequence(&inner.js, TASKS_STREAM))?;
        // Tasks first (no agent is attached yet: nothing is offered), then
        // the outcomes that finish some of them.
        self.spawn_loop("reading tasks", |r| async move { r.read_tasks().await });
        let started = Instant::now();
        while dispatcher.next_task_id() <= tasks_upto {
            if inner.stop.wait_timeout(Duration::from_millis(20)) {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err(store_error(
                    "reading the task log",
                    format!("task {tasks_upto} not read within 2 minutes"),
                ));
            }
        }
        // Queue mode reads every outcome; broadcast every cancellation, and
        // the rest from now on (an agent's progress is in its cursor).
        let readers: Vec<(consumer::DeliverPolicy, &str)> = match inner.mode {
            Mode::Queue => vec![(consumer::DeliverPolicy::All, "contact.outcome.>")],
            Mode::Broadcast => vec![
                (consumer::DeliverPolicy::All, "contact.outcome.*.cancelled"),
                (consumer::DeliverPolicy::New, "contact.outcome.>"),
            ],
        };
        let mut read = vec![];
        for (policy, filter) in readers {
            let (tx, rx) = crossbeam_channel::bounded(1);
            read.push(rx);
            let filter = filter.to_string();
            let done = Arc::new(AtomicU64::new(0));
            self.spawn_loop("reading outcomes", move |r| {
                let (filter, tx, done) = (filter.clone(), tx.clone(), done.clone());
                async move { r.read_outcomes(policy, filter, done, tx).await }
            });
        }
        for rx in read {
            if rx.recv_timeout(Duration::from_secs(120)).is_err() {
                return Err(store_error(
                    "reading outcomes",
                    "not read within 2 minutes".to_string(),
                ));
            }
        }
        if inner.mode == Mode::Queue {
            self.spawn_loop("claiming tasks", |r| async move { r.claim_tasks().await });
        }
        let this = self.clone();
        inner.handle.spawn(async move { this.keep_alive().await });
        self.spawn_loop("watching leases", |r| async move { r.watch_leases().await });
        log::info!(
            "replica {} serves the fleet of {} ({} tasks read)",
            inner.name,
            inner.config.servers.join(","),
            tasks_upto
        );
        Ok(())
    }

    /// Runs one of the replica's loops on the NATS runtime, starting it
    /// again after an error (a NATS node gone, a stream electing a new
    /// leader, a consumer lost), with a growing pause: the loop resumes
    /// where it was. Whether the store is lost is the connection's to say
    /// (see `keep_alive`) and the recorder's (an outcome not stored).
    fn spawn_loop<F, Fut>(&self, what: &'static str, run: F)
    where
        F: Fn(Replica) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let this = self.clone();
        self.inner.handle.spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                let started = Instant::now();
                let Err(e) = run(this.clone()).await else {
                    return;
                };
                if this.inner.stop.is_triggered() {
                    return;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    pause = Duration::from_millis(100);
                }
                log::warn!("{what}: {e}; trying again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        });
    }

    /// The store failed under this replica: it stops taking work.
    fn lost(&self, why: &str) {
        if self.inner.stop.is_triggered() {
            return;
        }
        let cause = format!(
            "lost the NATS JetStream store ({why}): this replica stops taking work so as not to diverge; its agents move to the other replicas"
        );
        log::error!("{cause}");
        self.inner.stop.fail(cause);
    }

    /// An ordered consumer of stream `name` (of `filter_subject`, if not
    /// empty): from just after sequence `after` when something was read
    /// already, else by `policy`.
    async fn ordered(
        &self,
        name: &str,
        after: u64,
        policy: consumer::DeliverPolicy,
        filter_subject: String,
    ) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, String> {
        let stream = self
            .inner
            .js
            .get_stream(name)
            .await
            .map_err(|e| e.to_string())?;
        let deliver_policy = match after {
            0 => policy,
            seq => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
        };
        stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy,
                filter_subject,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn read_tasks(&self) -> Result<(), String> {
        let inner = &self.inner;
        let dispatcher = inner.dispatcher.get().expect("set by serve").clone();
        let read = dispatcher.next_task_id().saturating_sub(1);
        let all = consumer::DeliverPolicy::All;
        let mut messages = self
            .ordered(TASKS_STREAM, read, all, String::new())
            .await?
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        let mut batch: Vec<(TaskId, NewTask)> = vec![];
        loop {
            let next = if batch.is_empty() {
                match tokio::time::timeout(STALL_CHECK, messages.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        // Quiet, or stalled (a NATS node gone, which the
                        // consumer notices only after missed heartbeats).
                        let last = last_sequence(&inner.js, TASKS_STREAM)
                            .await
                            .map_err(|e| e.to_string())?;
                        if last >= dispatcher.next_task_id() {
                            return Err(format!(
                                "behind the stream (task {last} unread): reading again"
                            ));
                        }
                        continue;
                    }
                }
            } else {
                match futures::FutureExt::now_or_never(messages.next()) {
                    Some(n) => n,
                    None => {
                        dispatcher.ingest(std::mem::take(&mut batch));
                        continue;
                    }
                }
            };
            let Some(m) = next else {
                return Err("the task stream ended".into());
            };
            let m = m.map_err(|e| e.to_string())?;
            let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
            match serde_json::from_slice::<NewTask>(&m.payload) {
                Ok(t) => batch.push((seq, t)),
                Err(e) => {
                    // Kept in its place (the log has no gaps), finished.
                    log::error!("task {seq} in {TASKS_STREAM} is unreadable, skipped: {e}");
                    dispatcher.settle_shared(seq, Settled::Cancelled);
                    batch.push((seq, NewTask::new(None, String::new())));
                }
            }
            if batch.len() >= 1024 {
                dispatcher.ingest(std::mem::take(&mut batch));
            }
        }
    }

    /// Reads outcomes back (all of them in queue mode, new ones in
    /// broadcast), settling tasks here and telling the observer; `read`
    /// is told once those stored up to `upto` are read.
    async fn read_outcomes(
        &self,
        deliver_policy: consumer::DeliverPolicy,
        filter_subject: String,
        done: Arc<AtomicU64>,
        read: crossbeam_channel::Sender<()>,
    ) -> Result<(), String> {
        let inner = &self.inner;
        let dispatcher = inner.dispatcher.get().expect("set by serve").clone();
        let queue = inner.mode == Mode::Queue;
        let everything = filter_subject == "contact.outcome.>";
        // Started again after an error: on after the last one read.
        let after = done.load(Ordering::SeqCst);
        let mut consumer = self
            .ordered(OUTCOMES_STREAM, after, deliver_policy, filter_subject)
            .await?;
        // Caught up once nothing stored before is pending.
        let mut told = false;
        if consumer
            .info()
            .await
            .map_err(|e| e.to_string())?
            .num_pending
            == 0
        {
            let _ = read.try_send(());
            told = true;
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        loop {
            let m = match tokio::time::timeout(STALL_CHECK, messages.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) if everything => {
                    // As for tasks: quiet, or stalled.
                    let last = last_sequence(&inner.js, OUTCOMES_STREAM)
                        .await
                        .map_err(|e| e.to_string())?;
                    if last > done.load(Ordering::SeqCst) {
                        return Err(format!(
                            "behind the stream (outcome {last} unread): reading again"
                        ));
                    }
                    continue;
                }
                Err(_) => continue,
            };
            let m = m.map_err(|e| e.to_string())?;
            let info = m.info().map_err(|e| e.to_string())?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            match serde_json::from_slice::<Outcome>(&m.payload) {
                Ok(Outcome::Result { result, replica }) => {
                    if let (true, Some(id)) = (queue, result.task_id) {
                        let how = Settled::Answered {
                            client: Arc::from(result.client.as_str()),
                            first: result.attempt,
                            last: result.attempt,
                        };
                        if dispatcher.settle_shared(id, how) {
                            self.ack_claim(id);
                        }
                    }
                    // This replica's own were observed when judged.
                    if let Some(o) = inner.observer.get().filter(|_| replica != inner.name) {
                        o(&result);
                    }
                }
                Ok(Outcome::Dead { dead, .. }) => {
                    if queue && dispatcher.settle_shared(dead.task_id, Settled::Dead) {
                        self.ack_claim(dead.task_id);
                    }
                }
                Ok(Outcome::Cancelled { task, .. }) => {
                    if dispatcher.settle_shared(task, Settled::Cancelled) {
                        self.ack_claim(task);
                    }
                }
                Err(e) => {
                    log::error!("outcome {seq} in {OUTCOMES_STREAM} is unreadable, skipped: {e}")
                }
            }
            done.store(seq, Ordering::SeqCst);
            if !told && pending == 0 {
                let _ = read.try_send(());
                told = true;
            }
        }
        Err("the outcome stream ended".into())
    }

    /// Holds a copy of every job another replica created (the newest ones).
    async fn read_jobs(&self, jobs: Arc<JobTable>, done: Arc<AtomicU64>) -> Result<(), String> {
        let inner = &self.inner;
        let all = consumer::DeliverPolicy::All;
        let mut messages = self
            .ordered(JOBS_STREAM, done.load(Ordering::SeqCst), all, String::new())
            .await?
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| e.to_string())?;
            let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
            done.store(seq, Ordering::SeqCst);
            match serde_json::from_slice::<JobMessage>(&m.payload) {
                Ok(j) if j.replica == inner.name => {}
                Ok(j) => jobs.insert_copy(seq, j.event),
                Err(e) => {
                    log::error!("job event {seq} in {JOBS_STREAM} is unreadable, skipped: {e}")
                }
            }
        }
        Err("the job stream ended".into())
    }

    /// Queue mode: claims as many untargeted tasks as this replica's agents
    /// can take, from the shared work queue.
    async fn claim_tasks(&self) -> Result<(), String> {
        let inner = &self.inner;
        let dispatcher = inner.dispatcher.get().expect("set by serve").clone();
        let consumer: consumer::PullConsumer = inner
            .js
            .get_consumer_from_stream(QUEUE_CONSUMER, TASKS_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let mut not_yet: Vec<jetstream::Message> = vec![];
        loop {
            if inner.stop.is_triggered() {
                return Ok(());
            }
            // Claimed before their task was read: offered once it is.
            for m in std::mem::take(&mut not_yet) {
                self.take_claim(&dispatcher, m, &mut not_yet);
            }
            // Claimed before read: the task is a moment away.
            if !not_yet.is_empty() {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let room = dispatcher.claim_room();
            if room == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let mut batch = consumer
                .fetch()
                .max_messages(room.min(CLAIM_BATCH))
                .expires(Duration::from_millis(200))
                .messages()
                .await
                .map_err(|e| e.to_string())?;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| e.to_string())?;
                self.take_claim(&dispatcher, m, &mut not_yet);
            }
        }
    }

    fn take_claim(
        &self,
        dispatcher: &Dispatcher,
        m: jetstream::Message,
        not_yet: &mut Vec<jetstream::Message>,
    ) {
        let Ok(info) = m.info() else { return };
        let (id, delivered) = (info.stream_sequence, info.delivered);
        let before = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
        let Ok(task) = serde_json::from_slice::<NewTask>(&m.payload) else {
            log::error!("task {id} in {TASKS_STREAM} is unreadable: dropped from the queue");
            tokio::spawn(async move {
                let _ = m.ack_with(AckKind::Term).await;
            });
            return;
        };
        // Held before the dispatcher sees it: its outcome may come at once.
        let mut claims = self.inner.claims.lock().unwrap_or_else(|e| e.into_inner());
        match dispatcher.claim(id, before, task) {
            Claimed::Taken => {
                claims.insert(id, m);
            }
            Claimed::Finished => {
                drop(claims);
                tokio::spawn(async move {
                    let _ = m.ack().await;
                });
            }
            Claimed::NotYet => not_yet.push(m),
        }
    }

    /// The task's outcome is stored: its claim is done.
    fn ack_claim(&self, id: TaskId) {
        let claim = self
            .inner
            .claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(m) = claim {
            self.inner.handle.spawn(async move {
                if let Err(e) = m.ack().await {
                    log::warn!("could not acknowledge the claim of task {id}: {e}");
                }
            });
        }
    }

    /// Renews this replica's claims and leases, gives back claims no agent
    /// here can take, saves broadcast agents' progress, and stops the
    /// replica when NATS has been gone too long.
    async fn keep_alive(&self) {
        let inner = &self.inner;
        let every = (inner.config.replica_timeout / 4).max(Duration::from_millis(100));
        let dispatcher = inner.dispatcher.get().expect("set by serve").clone();
        let mut last_renewal = Instant::now();
        let mut renewals_failing: Option<Instant> = None;
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        loop {
            // Through a shutdown too: agents still answer during its grace,
            // and their claims and leases must hold until the runtime stops.
            ticks.tick().await;
            let lost = inner.lost_at.load(Ordering::SeqCst);
            if lost > 0 {
                let gone = Duration::from_millis(inner.epoch.elapsed().as_millis() as u64 - lost);
                if gone >= inner.config.replica_timeout / 2 {
                    self.lost(&format!("disconnected for {:.1}s", gone.as_secs_f64()));
                    return;
                }
                continue;
            }
            // Claims no agent here can take go to another replica.
            let released = dispatcher.release_claims();
            if !released.is_empty() {
                let mut claims = inner.claims.lock().unwrap_or_else(|e| e.into_inner());
                for id in released {
                    if let Some(m) = claims.remove(&id) {
                        tokio::spawn(async move {
                            let _ = m.ack_with(AckKind::Nak(None)).await;
                        });
                    }
                }
            }
            if last_renewal.elapsed() < every {
                continue;
            }
            last_renewal = Instant::now();
            let ids: Vec<TaskId> = inner
                .claims
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .copied()
                .collect();
            // A cancelled task that was waiting here is done with.
            for id in dispatcher.cancelled_claims(&ids) {
                self.ack_claim(id);
            }
            let held: Vec<jetstream::Message> = inner
                .claims
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for m in held {
                let _ = m.ack_with(AckKind::Progress).await;
            }
            // A renewal that fails while connected (the bucket's stream
            // electing a leader: nobody can take a lease then) is tried
            // again next period, for as long as writes are; a lease that
            // expired meanwhile is taken again (`lease_changed`).
            match self.renew_leases().await {
                Ok(()) => renewals_failing = None,
                Err(e) => {
                    let since = *renewals_failing.get_or_insert_with(Instant::now);
                    if since.elapsed() >= STORE_PATIENCE {
                        self.lost(&format!("renewing agent leases: {e}"));
                        return;
                    }
                    log::warn!("renewing agent leases: {e}; trying again");
                }
            }
        }
    }

    async fn renew_leases(&self) -> Result<(), String> {
        let inner = &self.inner;
        let held: Vec<(String, u64, Lease)> = inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, h)| (k.clone(), h.revision, h.lease.clone()))
            .collect();
        // Many at once: one round trip per lease would bound the agents a
        // replica can hold to what fits in a renewal period.
        let agents = inner.agents.clone();
        let mut renewals = futures::stream::iter(held.into_iter().map(|(key, revision, lease)| {
            let agents = agents.clone();
            async move {
                let value = serde_json::to_vec(&lease).expect("a lease serialises");
                let r = agents.update(&key, value.into(), revision).await;
                (key, lease, r)
            }
        }))
        .buffer_unordered(256);
        while let Some((key, lease, r)) = renewals.next().await {
            match r {
                Ok(rev) => {
                    if let Some(h) = inner
                        .leases
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(&key)
                    {
                        h.revision = rev;
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    self.lease_changed(&key, lease).await?;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// A renewal found the lease of `key` changed: taken over by another
    /// replica (the agent moved: its session here ends), or expired (this
    /// replica was paused past the replica timeout): then it is taken again.
    async fn lease_changed(&self, key: &str, lease: Lease) -> Result<(), String> {
        let inner = &self.inner;
        let entry = inner.agents.entry(key).await.map_err(|e| e.to_string())?;
        let elsewhere = entry
            .as_ref()
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| serde_json::from_slice::<Lease>(&e.value).ok())
            .filter(|l| l.replica != inner.name);
        if let Some(other) = elsewhere {
            inner
                .leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
            if let Some(d) = inner.dispatcher.get() {
                d.evict(
                    &lease.agent,
                    &format!("it moved to replica {}", other.replica),
                );
            }
            return Ok(());
        }
        log::warn!("the lease of {} had expired: taken again", lease.agent);
        let value = serde_json::to_vec(&lease).expect("a lease serialises");
        let rev = inner
            .agents
            .put(key, value.into())
            .await
            .map_err(|e| e.to_string())?;
        if let Some(h) = inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(key)
        {
            h.revision = rev;
        }
        Ok(())
    }

    /// Ends the session of an agent whose lease another replica took over.
    async fn watch_leases(&self) -> Result<(), String> {
        let inner = &self.inner;
        let dispatcher = inner.dispatcher.get().expect("set by serve").clone();
        let mut watch = inner.agents.watch_all().await.map_err(|e| e.to_string())?;
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| e.to_string())?;
            if entry.operation != kv::Operation::Put {
                inner
                    .fleet
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&entry.key);
                continue;
            }
            let Ok(lease) = serde_json::from_slice::<Lease>(&entry.value) else {
                continue;
            };
            inner
                .fleet
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(entry.key.clone(), (lease.clone(), Instant::now()));
            if lease.replica == inner.name {
                continue;
            }
            let ours = inner
                .leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&entry.key)
                .is_some();
            if ours {
                log::info!(
                    "agent {} moved to replica {}: its session here ends",
                    lease.agent,
                    lease.replica
                );
                dispatcher.evict(&lease.agent, "it moved to another replica");
            }
        }
        Err("the lease watch ended".into())
    }

    async fn put_progress(&self, agent: &str, p: &AgentProgress) {
        let value = serde_json::to_vec(p).expect("progress serialises");
        if let Err(e) = self.inner.cursors.put(agent_key(agent), value.into()).await {
            log::warn!("could not save the progress of {agent}: {e}");
        }
    }

    /// Takes the lease of `agent` for this replica (see the module
    /// documentation); in broadcast, an agent coming from elsewhere is
    /// adopted with its saved progress. Runs on the NATS runtime; the
    /// answer comes through the returned channel.
    pub fn acquire(
        &self,
        lease: Lease,
    ) -> futures::channel::oneshot::Receiver<Result<u64, LeaseRefused>> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let this = self.clone();
        self.inner.handle.spawn(async move {
            let r = tokio::time::timeout(REQUEST_TIMEOUT, this.take_lease(lease))
                .await
                .unwrap_or_else(|_| Err(LeaseRefused::Store("timed out".into())));
            let _ = tx.send(r);
        });
        rx
    }

    async fn take_lease(&self, lease: Lease) -> Result<u64, LeaseRefused> {
        let inner = &self.inner;
        let key = agent_key(&lease.agent);
        let value = serde_json::to_vec(&lease).expect("a lease serialises");
        let store = |e: &dyn std::fmt::Display| LeaseRefused::Store(e.to_string());
        let (revision, from_elsewhere) = match inner.agents.create(&key, value.clone().into()).await
        {
            Ok(rev) => (rev, true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let entry = inner.agents.entry(&key).await.map_err(|e| store(&e))?;
                let (current, revision) = match entry {
                    Some(e) if e.operation == kv::Operation::Put => {
                        (serde_json::from_slice::<Lease>(&e.value).ok(), e.revision)
                    }
                    Some(e) => (None, e.revision),
                    None => (None, 0),
                };
                if let Some(c) = &current {
                    let same_process = !c.instance.is_empty() && c.instance == lease.instance;
                    // Served here by another process: this replica's own
                    // rule (attach) refuses it; the lease must not change.
                    let live_here = c.replica == inner.name
                        && inner
                            .dispatcher
                            .get()
                            .is_some_and(|d| d.has_session(&lease.agent));
                    if (c.replica != inner.name || live_here) && !same_process {
                        return Err(LeaseRefused::InUse {
                            replica: c.replica.clone(),
                            peer: c.peer.clone(),
                        });
                    }
                }
                let mine = current.as_ref().is_some_and(|c| c.replica == inner.name);
                let rev = inner
                    .agents
                    .update(&key, value.into(), revision)
                    .await
                    .map_err(|e| store(&e))?;
                (rev, !mine)
            }
            Err(e) => return Err(store(&e)),
        };
        let token = inner.published.fetch_add(1, Ordering::Relaxed);
        inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.clone(),
                Held {
                    revision,
                    lease: lease.clone(),
                    token,
                },
            );
        if inner.mode == Mode::Broadcast && from_elsewhere {
            if let Ok(Some(saved)) = inner.cursors.get(&key).await {
                if let Ok(p) = serde_json::from_slice::<AgentProgress>(&saved) {
                    if let Some(d) = inner.dispatcher.get() {
                        d.adopt(&lease.agent, &p);
                    }
                }
            }
        }
        Ok(token)
    }

    /// The session that took the lease `token` (from [`Replica::acquire`])
    /// ended: the agent's progress is saved and its lease given up, unless
    /// a newer session (here, or at another replica) holds it by now.
    pub fn release(&self, agent: &str, token: u64) {
        let key = agent_key(agent);
        let held = {
            let mut leases = self.inner.leases.lock().unwrap_or_else(|e| e.into_inner());
            if leases.get(&key).is_none_or(|h| h.token != token) {
                return;
            }
            leases.remove(&key)
        };
        let Some(held) = held else { return };
        let this = self.clone();
        let agent = agent.to_string();
        self.inner.handle.spawn(async move {
            let inner = &this.inner;
            if inner.mode == Mode::Broadcast {
                if let Some(p) = inner.dispatcher.get().and_then(|d| d.progress(&agent)) {
                    this.put_progress(&agent, &p).await;
                }
            }
            let _ = inner
                .agents
                .delete_expect_revision(&key, Some(held.revision))
                .await;
        });
    }

    /// `WatchResults` with replicas: the results every replica stored
    /// (`CONTACT_OUTCOMES`), numbered by their sequence there, from `from`
    /// (0: from now on), until the stream's end (unless `follow`) or until
    /// `events` is closed. The same from any replica.
    pub fn watch_results(
        &self,
        from: crate::watch::WatchFrom,
        mut events: futures::channel::mpsc::Sender<crate::proto::admin::ResultEvent>,
    ) {
        use futures::SinkExt;
        let this = self.clone();
        self.inner.handle.spawn(async move {
            let policy = match from.seq {
                0 => consumer::DeliverPolicy::New,
                seq => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
            };
            let filter = "contact.outcome.>".to_string();
            let read = async {
                let mut consumer = this.ordered(OUTCOMES_STREAM, 0, policy, filter).await?;
                let pending = consumer
                    .info()
                    .await
                    .map_err(|e| e.to_string())?
                    .num_pending;
                if pending == 0 && !from.follow {
                    return Ok(());
                }
                let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
                while let Some(m) = messages.next().await {
                    let m = m.map_err(|e| e.to_string())?;
                    let info = m.info().map_err(|e| e.to_string())?;
                    let (seq, pending) = (info.stream_sequence, info.pending);
                    if let Ok(Outcome::Result { result, .. }) = serde_json::from_slice(&m.payload) {
                        let mut e = crate::watch::event(result);
                        e.seq = seq;
                        if events.send(e).await.is_err() {
                            return Ok(());
                        }
                    }
                    if pending == 0 && !from.follow {
                        return Ok(());
                    }
                }
                Ok::<(), String>(())
            };
            if let Err(e) = read.await {
                log::warn!("WatchResults from {OUTCOMES_STREAM}: {e}");
            }
        });
    }

    /// Stores the accepted results and dead letters among the recorder's
    /// entries as outcomes, in one round of publishes; a result or dead
    /// letter another replica's outcome came before is marked stale
    /// (dropped, for a dead letter). Then the claims of tasks finished are
    /// acknowledged. Fails when NATS does not acknowledge.
    pub fn store_outcomes(&self, entries: &mut [Entry]) -> Result<(), String> {
        let inner = &self.inner;
        let queue = inner.mode == Mode::Queue;
        let subject = |task: TaskId, agent: &str| {
            if queue {
                format!("contact.outcome.{task}")
            } else {
                format!("contact.outcome.{task}.{}", agent_key(agent))
            }
        };
        // Each outcome, and where its entry is: (entry, index in it).
        let mut places: Vec<(usize, usize)> = vec![];
        let mut outgoing: Vec<Outgoing> = vec![];
        let mut add = |place, subject: String, o: &Outcome| {
            places.push(place);
            outgoing.push(Outgoing {
                // The subject: the first outcome of a task is the one kept.
                id: subject.clone(),
                subject,
                payload: serde_json::to_vec(o).expect("serialises"),
                fenced: true,
            });
        };
        for (e, entry) in entries.iter().enumerate() {
            match entry {
                Entry::Results(results) => {
                    for (i, r) in results.iter().enumerate() {
                        if let (true, Some(task)) = (r.accepted, r.task_id) {
                            let o = Outcome::Result {
                                replica: inner.name.clone(),
                                result: r.clone(),
                            };
                            add((e, i), subject(task, &r.client), &o);
                        }
                    }
                }
                Entry::Dead(d) => {
                    let o = Outcome::Dead {
                        replica: inner.name.clone(),
                        dead: d.clone(),
                    };
                    add((e, 0), subject(d.task_id, &d.client), &o);
                }
                _ => {}
            }
        }
        if outgoing.is_empty() {
            return Ok(());
        }
        let js = inner.js.clone();
        let stop = inner.stop.clone();
        let stored = inner
            .handle
            .block_on(async move { publish_all(&js, outgoing, &stop).await })?;
        // Tasks with an outcome now (ours, or another replica's first).
        let mut finished = vec![];
        let mut lost_dead = vec![];
        let mut answered: HashSet<String> = HashSet::new();
        for ((e, i), stored) in places.into_iter().zip(stored) {
            let stored = matches!(stored, Stored::Ack(_));
            match &mut entries[e] {
                Entry::Results(results) => {
                    let r = &mut results[i];
                    finished.extend(r.task_id);
                    if stored {
                        answered.insert(r.client.clone());
                    } else {
                        log::info!(
                            "result of {} for task {} came after another replica's: recorded as stale",
                            r.client,
                            r.task_id.unwrap_or_default()
                        );
                        r.accepted = false;
                        r.stale = true;
                    }
                }
                Entry::Dead(d) => {
                    finished.push(d.task_id);
                    if stored {
                        answered.insert(d.client.clone());
                    } else {
                        lost_dead.push(e);
                    }
                }
                _ => {}
            }
        }
        for e in lost_dead {
            entries[e] = Entry::Journal(vec![]);
        }
        if queue {
            for id in finished {
                self.ack_claim(id);
            }
        } else if let Some(d) = inner.dispatcher.get() {
            // Broadcast: the agents' places are saved before their results
            // are acknowledged, so that one that moves now continues after them.
            let saves: Vec<(String, AgentProgress)> = answered
                .into_iter()
                .filter_map(|a| d.progress(&a).map(|p| (a, p)))
                .collect();
            let this = self.clone();
            inner.handle.block_on(async move {
                let mut puts = futures::stream::iter(
                    saves.iter().map(|(agent, p)| this.put_progress(agent, p)),
                )
                .buffer_unordered(64);
                while puts.next().await.is_some() {}
            });
        }
        Ok(())
    }
}

impl FleetView for Replica {
    fn name(&self) -> String {
        self.inner.name.clone()
    }

    /// From the leases other replicas renew (one not renewed within the
    /// replica timeout has expired).
    fn elsewhere(&self) -> Vec<ClientInfo> {
        let inner = &self.inner;
        let fleet = inner.fleet.lock().unwrap_or_else(|e| e.into_inner());
        let since = |t: f64| std::time::UNIX_EPOCH + Duration::from_secs_f64(t.max(0.0));
        let mut out: Vec<ClientInfo> = fleet
            .values()
            .filter(|(l, seen)| {
                l.replica != inner.name && seen.elapsed() < inner.config.replica_timeout
            })
            .map(|(l, seen)| {
                let labels = l.labels.iter().cloned().collect();
                ClientInfo {
                    last_seen: std::time::SystemTime::now() - seen.elapsed(),
                    replica: Some(l.replica.clone()),
                    ..ClientInfo::connected(&l.agent, &l.peer, labels, since(l.since))
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

impl JobLog for Replica {
    fn write(&self, event: &JobEvent) -> Option<JobId> {
        let message = JobMessage {
            replica: self.inner.name.clone(),
            event: event.clone(),
        };
        let out = vec![Outgoing {
            subject: "contact.jobs".into(),
            payload: serde_json::to_vec(&message).expect("a job event serialises"),
            id: self.unique_id(),
            fenced: false,
        }];
        let js = self.inner.js.clone();
        let stop = self.inner.stop.clone();
        let r = self
            .inner
            .handle
            .block_on(async move { publish_all(&js, out, &stop).await });
        match r.map(|mut s| s.pop()) {
            Ok(Some(Stored::Ack(ack))) => Some(ack.sequence),
            Ok(_) => None,
            Err(e) => {
                log::error!("a job event could not be stored in {JOBS_STREAM}: {e}");
                None
            }
        }
    }
}

impl SharedLog for Replica {
    fn cancel(&self, tasks: &[TaskId]) -> Vec<TaskId> {
        let js = self.inner.js.clone();
        let name = self.inner.name.clone();
        let tasks = tasks.to_vec();
        let out: Vec<Outgoing> = tasks
            .iter()
            .map(|&task| {
                let o = Outcome::Cancelled {
                    replica: name.clone(),
                    task,
                };
                let subject = format!("contact.outcome.{task}.cancelled");
                Outgoing {
                    id: format!("{subject}/{name}"),
                    subject,
                    payload: serde_json::to_vec(&o).expect("serialises"),
                    fenced: false,
                }
            })
            .collect();
        let stop = self.inner.stop.clone();
        let r = self
            .inner
            .handle
            .block_on(async move { publish_all(&js, out, &stop).await })
            .map(|_| tasks);
        r.unwrap_or_else(|e| {
            log::error!("a cancellation could not be stored in {OUTCOMES_STREAM}: {e}");
            vec![]
        })
    }

    fn append(&self, tasks: &[NewTask]) -> Result<Vec<(TaskId, bool)>, NotJournaled> {
        let js = self.inner.js.clone();
        let messages: Vec<(String, Option<String>, Vec<u8>)> = tasks
            .iter()
            .map(|t| {
                let subject = if t.target.is_none() && t.any_of.is_none() {
                    "contact.tasks.any"
                } else {
                    "contact.tasks.to"
                };
                (
                    subject.to_string(),
                    t.key.clone(),
                    serde_json::to_vec(t).expect("serialises"),
                )
            })
            .collect();
        let out: Vec<Outgoing> = messages
            .into_iter()
            .map(|(subject, key, payload)| Outgoing {
                subject,
                payload,
                // A task without a key gets one of its own, for retries.
                id: key.unwrap_or_else(|| self.unique_id()),
                fenced: false,
            })
            .collect();
        let stop = self.inner.stop.clone();
        let r: Result<Vec<(TaskId, bool)>, String> = self
            .inner
            .handle
            .block_on(async move { publish_all(&js, out, &stop).await })
            .map(|stored| {
                stored
                    .into_iter()
                    .filter_map(|s| match s {
                        Stored::Ack(a) => Some((a.sequence, a.duplicate)),
                        Stored::Taken => None,
                    })
                    .collect()
            });
        r.map_err(|e| {
            log::error!("tasks could not be stored in {TASKS_STREAM}: {e}");
            NotJournaled
        })
    }
}

/// A message to store in a stream.
struct Outgoing {
    subject: String,
    payload: Vec<u8>,
    /// `Nats-Msg-Id`: a retry of a publish whose acknowledgement was lost
    /// is recognised as a duplicate (and answered with the first's sequence).
    id: String,
    /// An outcome: its id is its subject, so that within the duplicate
    /// window (one hour) only the first outcome of a task is stored; a
    /// duplicate is ours (a retry after a lost acknowledgement) only if the
    /// stored message is this one. One header both fences replicas and
    /// makes retries safe; after the window, a task's outcome exists and
    /// every replica has settled the task, so none delivers it again.
    fenced: bool,
}

/// What became of an [`Outgoing`].
enum Stored {
    Ack(jetstream::publish::PublishAck),
    /// Another outcome of its task was stored first (`fenced`).
    Taken,
}

/// Publishes every message, all at once, and publishes again those that
/// fail (no responders while a stream elects a new leader, a timeout) for
/// up to [`STORE_PATIENCE`], or until the replica stops; then the last error.
async fn publish_all(
    js: &jetstream::Context,
    out: Vec<Outgoing>,
    stop: &Shutdown,
) -> Result<Vec<Stored>, String> {
    let deadline = Instant::now() + STORE_PATIENCE;
    let mut stored: Vec<Option<Stored>> = out.iter().map(|_| None).collect();
    loop {
        let mut failed = None;
        let mut duplicates = vec![];
        let left: Vec<usize> = (0..out.len()).filter(|i| stored[*i].is_none()).collect();
        // In rounds: the client holds a permit per acknowledgement awaited
        // (5,000 by default) and waits for one before publishing more, so
        // publishing more than that before awaiting any would never end.
        for round in left.chunks(PUBLISH_ROUND) {
            let mut acks = Vec::with_capacity(round.len());
            for &i in round {
                let o = &out[i];
                let p = jetstream::message::PublishMessage::build()
                    .payload(o.payload.clone().into())
                    .message_id(&o.id);
                acks.push((i, js.send_publish(o.subject.clone(), p).await));
            }
            for (i, ack) in acks {
                match ack {
                    Err(e) => failed = Some(e.to_string()),
                    Ok(f) => match f.await {
                        Ok(a) if a.duplicate && out[i].fenced => duplicates.push((i, a)),
                        Ok(a) => stored[i] = Some(Stored::Ack(a)),
                        Err(e) => failed = Some(e.to_string()),
                    },
                }
            }
        }
        // A duplicate outcome: ours (a retry after a lost acknowledgement)
        // if the message stored is this very one, else another's first.
        for (i, ack) in duplicates {
            let first = match js.get_stream(&ack.stream).await {
                Ok(s) => s
                    .get_raw_message(ack.sequence)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match first {
                Ok(m) if m.payload.as_ref() == out[i].payload.as_slice() => {
                    stored[i] = Some(Stored::Ack(ack))
                }
                Ok(_) => stored[i] = Some(Stored::Taken),
                Err(e) => failed = Some(e),
            }
        }
        let Some(e) = failed else {
            return Ok(stored.into_iter().flatten().collect());
        };
        if Instant::now() >= deadline || stop.is_triggered() {
            return Err(e);
        }
        let left = stored.iter().filter(|s| s.is_none()).count();
        log::warn!("NATS did not store {left} messages ({e}); publishing them again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn last_sequence(js: &jetstream::Context, name: &str) -> Result<u64, Error> {
    let s = js
        .get_stream(name)
        .await
        .map_err(|e| store_error(&format!("stream {name}"), e))?;
    // An empty stream (aged out, purged) has nothing to wait for.
    let state = &s.cached_info().state;
    Ok(if state.messages == 0 {
        0
    } else {
        state.last_sequence
    })
}

async fn setup(
    config: StoreConfig,
    mode: Mode,
    name: String,
    lost_at: Arc<AtomicU64>,
    epoch: Instant,
    stop: Shutdown,
    handle: tokio::runtime::Handle,
) -> Result<Inner, Error> {
    let servers = config.servers.join(",");
    let events_lost_at = lost_at.clone();
    let client = async_nats::ConnectOptions::new()
        .name(format!("contact-server {name}"))
        .connection_timeout(REQUEST_TIMEOUT)
        .max_reconnects(None)
        .event_callback(move |event| {
            let lost_at = events_lost_at.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        log::warn!("NATS connection lost; reconnecting");
                        let now = (epoch.elapsed().as_millis() as u64).max(1);
                        let _ =
                            lost_at.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    async_nats::Event::Connected => {
                        log::info!("NATS connection up");
                        lost_at.store(0, Ordering::SeqCst);
                    }
                    other => log::warn!("NATS: {other}"),
                }
            }
        })
        .connect(config.servers.clone())
        .await
        .map_err(|e| store_error(&format!("cannot connect to {servers}"), e))?;
    let mut js = jetstream::new(client);
    js.set_timeout(REQUEST_TIMEOUT);
    let copies = config.copies;
    let stream_config =
        |name: &str, subjects: Vec<String>, max_messages: i64, max_age: Duration| stream::Config {
            name: name.to_string(),
            subjects,
            max_messages,
            max_age,
            num_replicas: copies,
            storage: stream::StorageType::File,
            duplicate_window: config.dedupe_window,
            ..Default::default()
        };
    let tasks = stream_config(
        TASKS_STREAM,
        vec!["contact.tasks.any".into(), "contact.tasks.to".into()],
        // Kept by age, not count: an unanswered queue task must still be
        // there when a replica claims it, however many came after it.
        -1,
        Duration::from_secs(7 * 24 * 3600),
    );
    let outcomes = stream_config(
        OUTCOMES_STREAM,
        vec!["contact.outcome.>".into()],
        -1,
        Duration::from_secs(7 * 24 * 3600),
    );
    let jobs = stream_config(
        JOBS_STREAM,
        vec!["contact.jobs".into()],
        i64::try_from(MAX_JOBS * 4).unwrap_or(i64::MAX),
        Duration::ZERO,
    );
    for s in [tasks, outcomes, jobs] {
        let name = s.name.clone();
        js.get_or_create_stream(s)
            .await
            .map_err(|e| store_error(&format!("creating stream {name}"), e))?;
    }
    // A bucket is a stream `KV_<bucket>` (as `create_key_value` makes it:
    // async-nats asks the account's limits first, in a form nats-server 2.9
    // does not answer, so the stream is made here).
    let bucket = |bucket: &str, max_age: Duration| stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: copies,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    let mut stores = vec![];
    for (b, age) in [
        (AGENTS_BUCKET, config.replica_timeout),
        (CURSORS_BUCKET, Duration::from_secs(7 * 24 * 3600)),
        (FLEET_BUCKET, Duration::ZERO),
    ] {
        js.get_or_create_stream(bucket(b, age))
            .await
            .map_err(|e| store_error(&format!("creating bucket {b}"), e))?;
        let store = js
            .get_key_value(b)
            .await
            .map_err(|e| store_error(&format!("opening bucket {b}"), e))?;
        stores.push(store);
    }
    let fleet = stores.pop().expect("three buckets");
    let cursors = stores.pop().expect("three buckets");
    let agents = stores.pop().expect("three buckets");
    if mode == Mode::Queue {
        let stream = js
            .get_stream(TASKS_STREAM)
            .await
            .map_err(|e| store_error("stream CONTACT_TASKS", e))?;
        stream
            .get_or_create_consumer(
                QUEUE_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(QUEUE_CONSUMER.to_string()),
                    filter_subject: "contact.tasks.any".into(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.replica_timeout,
                    max_deliver: -1,
                    max_ack_pending: 1_000_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| store_error("creating the consumer contact-queue", e))?;
    }
    let setting = |key: &'static str, value: String| {
        let fleet = fleet.clone();
        async move {
            match fleet.create(key, value.clone().into()).await {
                Ok(_) => Ok(value),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let v = fleet
                        .get(key)
                        .await
                        .map_err(|e| store_error(&format!("reading {FLEET_BUCKET}/{key}"), e))?
                        .unwrap_or_default();
                    Ok(String::from_utf8_lossy(&v).into_owned())
                }
                Err(e) => Err(store_error(&format!("writing {FLEET_BUCKET}/{key}"), e)),
            }
        }
    };
    let ours = match mode {
        Mode::Queue => "queue",
        Mode::Broadcast => "broadcast",
    };
    let fleet_mode = setting("mode", ours.to_string()).await?;
    if fleet_mode != ours {
        return Err(Error::Usage(format!(
            "--dispatch {ours}: the fleet in {servers} dispatches in {fleet_mode} mode; every replica must use --dispatch {fleet_mode}"
        )));
    }
    // The streams made by the first replica decide: another setting here
    // would be ignored by JetStream, or renew leases and claims too late.
    let made = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .map(|s| s.cached_info().config.clone())
                .map_err(|e| store_error(&format!("stream {name}"), e))
        }
    };
    let tasks = made(TASKS_STREAM).await?;
    if tasks.num_replicas != copies {
        return Err(Error::Usage(format!(
            "--store-replicas {copies}: the fleet in {servers} keeps {} copies of its streams; every replica must use --store-replicas {}",
            tasks.num_replicas, tasks.num_replicas
        )));
    }
    let leases = made(AGENTS_STREAM).await?;
    if leases.max_age != config.replica_timeout {
        return Err(Error::Usage(format!(
            "--replica-timeout {}: the fleet in {servers} uses {} (its agents' leases live that long); every replica must use --replica-timeout {}",
            config.replica_timeout.as_secs_f64(),
            leases.max_age.as_secs_f64(),
            leases.max_age.as_secs_f64()
        )));
    }
    let incarnation = setting("incarnation", format!("{:016x}", fastrand::u64(..))).await?;
    Ok(Inner {
        name,
        mode,
        config,
        handle,
        js,
        agents,
        cursors,
        claims: Mutex::new(HashMap::new()),
        leases: Mutex::new(HashMap::new()),
        fleet: Mutex::new(HashMap::new()),
        dispatcher: std::sync::OnceLock::new(),
        observer: std::sync::OnceLock::new(),
        lost_at,
        epoch,
        published: AtomicU64::new(0),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
        stop,
        incarnation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_addresses_are_parsed_and_mistakes_named() {
        assert_eq!(
            parse_store("nats://127.0.0.1:4222,10.0.0.2:4223").unwrap(),
            vec!["nats://127.0.0.1:4222", "nats://10.0.0.2:4223"]
        );
        assert_eq!(
            parse_store("nats://a:1,nats://b:2").unwrap(),
            vec!["nats://a:1", "nats://b:2"]
        );
        assert!(parse_store("127.0.0.1:4222")
            .unwrap_err()
            .contains("nats://"));
        assert!(parse_store("nats://host")
            .unwrap_err()
            .contains("\"host\" is not HOST:PORT"));
        assert!(parse_store("nats://a:1,")
            .unwrap_err()
            .contains("is not HOST:PORT"));
    }

    #[test]
    fn agent_ids_become_safe_keys() {
        assert_eq!(agent_key("a b/é"), "6120622fc3a9");
    }
}
