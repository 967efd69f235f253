//! The client: dials out, registers with an empty `getTask`, handles every
//! task it is pushed, reports each result over a `tellResult` stream and its
//! status over `sendStatus`, and dials another of its servers whenever the
//! one it is on goes away — at once, backing off (capped exponential backoff
//! with jitter) only after every address of a round failed (see [`servers`]).
//!
//! One connection is a *session*: its [`pipeline`] runs receive → handle →
//! report as one future on the client's completion-queue thread (no thread
//! hop per task); `--exec` programs run on the [`jobs`] pool of `--jobs N`
//! threads; a status sender reports progress. The session's own thread waits
//! for the pipeline, stops it on shutdown and wakes it when an
//! acknowledgement interval is over. Results are acknowledged by completing
//! the `tellResult` call that carried them: a completed call is the server's
//! word that those results are recorded.

mod jobs;
mod pipeline;
pub mod servers;

use crate::backoff::Backoff;
use crate::error::Error;
use crate::handler::{Handler, Outcome};
use crate::labels::{self, Labels};
use crate::logtext::quoted;
use crate::proto::{self, ClientMsg, ContactClient, Empty, ResultMsg, ServerMsg, Working};
use crate::shutdown::Shutdown;
use crate::tls::ClientTls;
use crate::token::Token;
use crate::trust::AUTHORIZATION_KEY;
use crossbeam_channel::{select, Receiver, Sender};
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpcio::{
    CallOption, Channel, ChannelBuilder, ConnectivityState, Environment, Metadata, MetadataBuilder,
    RpcStatusCode, WriteFlags,
};
use pipeline::{Control, Setup};
use servers::{Endpoint, ServerList};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Everything `contact-client` can be told.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The `--server` values: `host:port` entries, several comma-separated
    /// in one value (checked by [`run`]).
    pub servers: Vec<String>,
    /// Sent as `contact-client-id` metadata on every call.
    pub id: String,
    pub handler: Handler,
    /// `--exec` programs run at once at most (1: one at a time, in the
    /// order the tasks came). `echo` is answered in-line and ignores it.
    pub jobs: usize,
    /// Interval between status messages.
    pub status_every: Duration,
    /// Exit once this many results are acknowledged.
    pub max_tasks: Option<u64>,
    /// First and largest reconnect delay.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long one dial may take before it counts as failed.
    pub connect_timeout: Duration,
    /// A `tellResult` call is completed (acknowledged) after this many results...
    pub ack_every: u64,
    /// ...or this long after it was opened, whichever comes first.
    pub ack_interval: Duration,
    /// Interval of HTTP/2 keepalive pings.
    pub keepalive: Duration,
    /// Dial with TLS (`None`: plaintext).
    pub tls: Option<ClientTls>,
    /// Sent as `authorization: Bearer` on every call.
    pub token: Option<Token>,
    /// Reported to the server (`contact-labels`), which targets agents by them.
    pub labels: Labels,
}

impl ClientConfig {
    /// Defaults for everything but where to dial (`host:port`, or several
    /// comma-separated) and who we are.
    pub fn new(servers: impl Into<String>, id: impl Into<String>) -> ClientConfig {
        ClientConfig {
            servers: vec![servers.into()],
            id: id.into(),
            handler: Handler::Echo,
            jobs: 1,
            status_every: Duration::from_secs(5),
            max_tasks: None,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            ack_every: 1000,
            ack_interval: Duration::from_millis(200),
            keepalive: Duration::from_secs(20),
            tls: None,
            token: None,
            labels: Labels::new(),
        }
    }
}

/// `<hostname>-<pid>`: unique enough per machine, and readable in the server's log.
pub fn default_client_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host: String = host.chars().filter(|c| c.is_ascii_graphic()).collect();
    let host = if host.is_empty() {
        "client".to_string()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

/// What a client run achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientReport {
    /// Results the server acknowledged (their `tellResult` call completed).
    pub acknowledged: u64,
    /// Tasks handled, acknowledged or not.
    pub handled: u64,
    /// Sessions that got connected.
    pub connections: u64,
}

#[derive(Default)]
struct Progress {
    acknowledged: AtomicU64,
    handled: AtomicU64,
    connections: AtomicU64,
    /// Results whose call failed before it was acknowledged: sent again first
    /// on the next connection (the server records a resend only once).
    unacked: Mutex<Vec<ResultMsg>>,
    /// What recent tasks came to, so that a redelivery (after a reconnect,
    /// before the server saw the result) is answered without running it again.
    outcomes: Mutex<RecentOutcomes>,
    /// The tasks being handled now (by `--exec` programs), reported with
    /// every status message so that the server keeps their leases (see
    /// `ClientMsg.working`).
    working: Mutex<Vec<Working>>,
    /// The server's ack timeout, from the last task (0: not told): progress
    /// is reported well within it.
    ack_timeout_ms: AtomicU64,
    /// Wakes the status sender when the ack timeout changes, so that its
    /// next report does not wait out an interval chosen without it.
    ack_timeout_changed: Nudge,
}

/// A wake-up for one waiting thread; nudges while one is pending merge.
struct Nudge {
    tx: Sender<()>,
    rx: Receiver<()>,
}

impl Default for Nudge {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(1);
        Nudge { tx, rx }
    }
}

/// Outcomes of the last [`RECENT_OUTCOMES`] tasks, by (incarnation, task id).
#[derive(Default)]
struct RecentOutcomes {
    by_task: HashMap<(String, u64), Outcome>,
    order: VecDeque<(String, u64)>,
}

/// How many outcomes a client remembers for redeliveries.
const RECENT_OUTCOMES: usize = 4096;

impl RecentOutcomes {
    fn get(&self, key: &(String, u64)) -> Option<Outcome> {
        self.by_task.get(key).cloned()
    }

    fn insert(&mut self, key: (String, u64), outcome: Outcome) {
        if self.by_task.insert(key.clone(), outcome).is_none() {
            self.order.push_back(key);
            if self.order.len() > RECENT_OUTCOMES {
                if let Some(old) = self.order.pop_front() {
                    self.by_task.remove(&old);
                }
            }
        }
    }
}

impl Progress {
    fn acked(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Keeps results for the next connection. A seed server gives no task ids
    /// and cannot tell a resend from a new result, so those are not kept.
    fn carry(&self, results: impl IntoIterator<Item = ResultMsg>) {
        let mut u = self.unacked.lock().unwrap_or_else(|e| e.into_inner());
        u.extend(results.into_iter().filter(|r| r.task_id != 0));
    }

    fn take_carried(&self) -> Vec<ResultMsg> {
        std::mem::take(&mut *self.unacked.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn carried(&self) -> u64 {
        self.unacked.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    /// How often the status sender writes: every `every`, and at least three
    /// times per ack timeout so that the task in hand keeps its lease.
    fn status_interval(&self, every: Duration) -> Duration {
        match self.ack_timeout_ms.load(Ordering::Relaxed) {
            0 => every,
            ms => every.min(Duration::from_millis(ms / 3).max(Duration::from_millis(100))),
        }
    }

    /// Notes the ack timeout a task came with (0: the server did not say).
    fn learn_ack_timeout(&self, ms: u32) {
        let ms = u64::from(ms);
        if ms != 0 && self.ack_timeout_ms.swap(ms, Ordering::Relaxed) != ms {
            let _ = self.ack_timeout_changed.tx.try_send(());
        }
    }

    fn start_working(&self, w: Working) {
        self.working
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    fn stop_working(&self, w: &Working) {
        let mut all = self.working.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = all.iter().position(|x| x == w) {
            all.swap_remove(i);
        }
    }

    fn working(&self) -> Vec<Working> {
        self.working
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Remembers what a task came to, for its redeliveries.
    fn remember(&self, key: (String, u64), outcome: &Outcome) {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, outcome.clone());
    }

    /// What a task came to, if it was handled before.
    fn known(&self, key: &(String, u64)) -> Option<Outcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
    }

    fn report(&self) -> ClientReport {
        ClientReport {
            acknowledged: self.acked(),
            handled: self.handled.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
        }
    }
}

/// What identifies a task across redeliveries: its incarnation and id.
fn task_key(task: &ServerMsg) -> (String, u64) {
    (task.incarnation.clone(), task.task_id)
}

/// How a session failed.
enum Failure {
    /// The connection or a call broke: dial the next address at once.
    Lost(String),
    /// This server refused us for a reason of its own (our id in use here,
    /// its limit): another server may not.
    RefusedHere(String),
    /// The server refused us for a reason every server shares (credentials,
    /// permissions): dial again only after the longest backoff, since trying
    /// sooner, or elsewhere, changes nothing.
    Refused(String),
}

impl Failure {
    /// How a failed call ended the session: `what` names the call, as in
    /// "the task stream".
    fn from_call(what: &str, e: grpcio::Error) -> Failure {
        if let grpcio::Error::RpcFailure(s) = &e {
            let code = s.code();
            let why = || format!("{what}: {} ({code:?})", quoted(s.message()));
            if [
                RpcStatusCode::UNAUTHENTICATED,
                RpcStatusCode::PERMISSION_DENIED,
            ]
            .contains(&code)
            {
                return Failure::Refused(why());
            }
            if [
                RpcStatusCode::ALREADY_EXISTS,
                RpcStatusCode::RESOURCE_EXHAUSTED,
            ]
            .contains(&code)
            {
                return Failure::RefusedHere(why());
            }
        }
        Failure::Lost(format!("{what} failed: {e}"))
    }
}

/// How long a session must last to count as service: when it ends, a new
/// round of dialling starts at once. A shorter one (with no result
/// acknowledged) counts as a failed dial, so that a server that takes
/// connections and drops them costs one round per backoff, not a busy loop.
const SERVED: Duration = Duration::from_secs(1);

/// The metadata of every call: who we are (id and process), and our token.
fn call_metadata(cfg: &ClientConfig, instance: &str) -> Result<Metadata, grpcio::Error> {
    let mut b = MetadataBuilder::new();
    b.add_str(proto::CLIENT_ID_KEY, &cfg.id)?;
    b.add_str(proto::INSTANCE_KEY, instance)?;
    b.add_str(proto::LEASES_KEY, "1")?;
    if !cfg.labels.is_empty() {
        b.add_str(labels::LABELS_KEY, &labels::to_metadata(&cfg.labels))?;
    }
    if let Some(token) = &cfg.token {
        b.add_str(AUTHORIZATION_KEY, &format!("Bearer {}", token.expose()))?;
    }
    Ok(b.build())
}

/// How a session ended, when it did not fail.
enum End {
    /// `--max-tasks` reached or shutdown requested: stop the client.
    Finished,
    /// The server ended the task stream (e.g. it is shutting down): dial again.
    StreamClosed,
    /// The `--exec` program cannot be run: take no tasks until it can.
    CannotWork(String),
}

/// Runs the client until `shutdown` fires or `max_tasks` results are acknowledged.
///
/// An unreachable or vanished server is not an error: it is logged and the
/// next address dialled. Only an unusable configuration is.
pub fn run(config: &ClientConfig, shutdown: &Shutdown) -> Result<ClientReport, Error> {
    proto::validate_client_id(&config.id).map_err(|e| Error::Usage(format!("--id: {e}")))?;
    let servers =
        ServerList::parse(&config.servers).map_err(|e| Error::Usage(format!("--server {e}")))?;
    if let Some(tls) = &config.tls {
        // Checked once here, so that a wrong file is a usage error, not a retry loop.
        tls.credentials()?;
    }
    if config.token.is_some() && config.tls.is_none() && !servers.is_loopback() {
        return Err(Error::Usage(format!(
            "the token would cross the network to {servers} in clear text: add --tls-ca FILE (or --tls to trust the system's CAs)"
        )));
    }
    // This process, as opposed to another one using the same id.
    let instance = format!("{:016x}", fastrand::u64(..));
    let env = crate::tls::grpc_environment(1, "contact-client");
    let progress = Arc::new(Progress::default());
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let done = |p: &Progress| config.max_tasks.is_some_and(|max| p.acked() >= max);
    // The address of the last session that served: the last of the next round.
    let mut last = None;
    let mut round = servers.round(last);
    let mut tally = RoundTally::default();
    while !shutdown.is_triggered() && !done(&progress) {
        let Some(endpoint) = round.pop_front() else {
            // Every address of the round failed.
            let delay = if tally.refused_everywhere() {
                backoff.refused_delay()
            } else {
                backoff.next_delay()
            };
            log::info!("dialling {servers} again in {:.1}s", delay.as_secs_f64());
            if shutdown.wait_timeout(delay) {
                break;
            }
            round = servers.round(last);
            tally = RoundTally::default();
            continue;
        };
        let (acked, connections) = (progress.acked(), progress.connections());
        let started = Instant::now();
        let outcome = session(&env, config, &endpoint, &instance, shutdown, &progress);
        let connected = progress.connections() > connections;
        let why = match outcome {
            Ok(End::Finished) => break,
            Ok(End::StreamClosed) => format!("lost {endpoint}: the server ended the task stream"),
            Ok(End::CannotWork(why)) => {
                wait_until_runnable(config, &why, shutdown);
                round.push_front(endpoint);
                continue;
            }
            Err(Failure::Lost(why)) if connected => format!("lost {endpoint}: {why}"),
            Err(Failure::Lost(why)) => format!("cannot reach server {endpoint}: {why}"),
            Err(Failure::RefusedHere(why)) => {
                tally.refused_here += 1;
                format!("server {endpoint} refused {why}")
            }
            Err(Failure::Refused(why)) => {
                // Every server would say the same: back off before the next round.
                log::error!("server {endpoint} refused {why}");
                tally.refused = true;
                round.clear();
                continue;
            }
        };
        tally.tried += 1;
        if connected && (progress.acked() > acked || started.elapsed() >= SERVED) {
            backoff.reset();
            last = Some(endpoint.addr());
            round = servers.round(last);
            tally = RoundTally::default();
        }
        if done(&progress) {
            break;
        }
        match round.front() {
            Some(next) => log::info!("{why}; trying {next}"),
            None => log::warn!("{why}"),
        }
    }
    let report = progress.report();
    log::info!(
        "client {} stopping: {} results acknowledged",
        config.id,
        report.acknowledged
    );
    Ok(report)
}

/// Disconnected (so that the tasks it held went to other agents), waits
/// until the `--exec` program can be run again.
fn wait_until_runnable(config: &ClientConfig, why: &str, shutdown: &Shutdown) {
    log::error!(
        "{why}: this agent takes no tasks until it can run it (checked every {:.1}s)",
        config.backoff_max.as_secs_f64()
    );
    while config.handler.check_runnable().is_err() {
        if shutdown.wait_timeout(config.backoff_max) {
            return;
        }
    }
    log::info!("the --exec program can be run again: taking tasks");
}

/// How the dials of one round failed, which decides the backoff after it.
#[derive(Default)]
struct RoundTally {
    /// Addresses dialled (that did not serve).
    tried: u32,
    /// Of those, how many refused us for a reason of their own.
    refused_here: u32,
    /// A server refused us for a reason every server shares.
    refused: bool,
}

impl RoundTally {
    /// Whether trying again soon changes nothing: a refusal every server
    /// shares, or every address refused us (our id in use everywhere).
    fn refused_everywhere(&self) -> bool {
        self.refused || (self.tried > 0 && self.refused_here == self.tried)
    }
}

/// One session with the server at `endpoint`.
fn session(
    env: &Arc<Environment>,
    cfg: &ClientConfig,
    endpoint: &Endpoint,
    instance: &str,
    shutdown: &Shutdown,
    progress: &Arc<Progress>,
) -> Result<End, Failure> {
    let mut builder = ChannelBuilder::new(env.clone());
    if let Some(tls) = &cfg.tls {
        let creds = tls
            .credentials()
            .map_err(|e| Failure::Lost(e.to_string()))?;
        // The name the certificate must carry: the entry's host, not the
        // address it resolved to.
        let name = tls.server_name.as_deref().unwrap_or(endpoint.host());
        builder = builder
            .set_credentials(creds)
            .override_ssl_target(name.to_string());
    }
    let channel = builder
        .keepalive_time(cfg.keepalive)
        .keepalive_timeout(Duration::from_secs(10))
        .keepalive_permit_without_calls(true)
        // Keep pinging an idle connection (gRPC stops after two by default):
        // a vanished server is noticed even when no task comes for hours.
        .http2_max_pings_without_data(0)
        .max_receive_message_len(1 << 20)
        .connect(&endpoint.target());
    block_on(wait_ready(&channel, cfg.connect_timeout)).map_err(Failure::Lost)?;
    progress.connections.fetch_add(1, Ordering::SeqCst);
    log::info!("connected to {endpoint} as {}", cfg.id);
    let client = ContactClient::new(channel.clone());
    let md = call_metadata(cfg, instance)
        .map_err(|e| Failure::Lost(format!("client id {:?}: {e}", cfg.id)))?;
    let opt = move || CallOption::default().headers(md.clone());

    let tasks = client
        .get_task_opt(&Empty::new(), opt())
        .map_err(|e| Failure::from_call("registering", e))?;

    let status_stop = Shutdown::new();
    {
        let (client, opt, stop, every) =
            (client.clone(), opt(), status_stop.clone(), cfg.status_every);
        let progress = progress.clone();
        // Not joined: a status write to a dead server may hang until the channel gives up.
        spawn("status-sender", move || {
            if let Err(e) = send_status(&client, opt, every, &stop, &progress) {
                log::debug!("status stream ended: {e}");
            }
        })
        .map_err(Failure::Lost)?;
    }
    let calls = Calls {
        client: &client,
        channel,
        opt: Box::new(opt),
    };
    let ended = run_pipeline(cfg, calls, tasks, shutdown, progress);
    status_stop.trigger();
    ended
}

/// What a session makes its calls with.
struct Calls<'a> {
    client: &'a ContactClient,
    channel: Channel,
    /// The options of every call (its metadata).
    opt: Box<dyn Fn() -> CallOption + Send>,
}

/// Runs the session's pipeline on the completion queue and waits for it:
/// stops it on shutdown, wakes it when an ack interval is over; afterwards
/// waits for the `--exec` pool and carries over what it finished too late.
fn run_pipeline(
    cfg: &ClientConfig,
    Calls {
        client,
        channel,
        opt,
    }: Calls,
    tasks: grpcio::ClientSStreamReceiver<ServerMsg>,
    shutdown: &Shutdown,
    progress: &Arc<Progress>,
) -> Result<End, Failure> {
    // Counted before the pipeline takes the carried results over.
    let base = progress.acked() + progress.carried();
    let (jobs, workers) = match cfg.handler {
        Handler::Echo => (None, None),
        Handler::Exec { .. } => {
            let (queue, workers, done) =
                jobs::start(cfg.jobs, &cfg.handler, progress).map_err(Failure::Lost)?;
            (Some((queue, done)), Some(workers))
        }
    };
    let control = Arc::new(Control::default());
    let (deadline_tx, deadline_rx) = crossbeam_channel::unbounded();
    let setup = Setup {
        client: client.clone(),
        channel,
        opt,
        tasks,
        progress: progress.clone(),
        control: control.clone(),
        deadlines: deadline_tx,
        handler: cfg.handler.clone(),
        jobs,
        ack_every: cfg.ack_every,
        ack_interval: cfg.ack_interval,
        limit: cfg.max_tasks.map(|max| max.saturating_sub(base)),
    };
    let (end_tx, end_rx) = crossbeam_channel::bounded(1);
    client.spawn(async move {
        let _ = end_tx.send(pipeline::run(setup).await);
    });
    let (ended, done) = wait_for_pipeline(&end_rx, &deadline_rx, &control, shutdown);
    if let Some(workers) = workers {
        workers.join();
    }
    // Outcomes of tasks that were running when the session failed.
    if let Some(mut done) = done {
        while let Ok(d) = done.try_recv() {
            if let Some(outcome) = d.outcome {
                progress.carry([pipeline::answer(&d.task, outcome, progress)]);
            }
        }
    }
    ended
}

/// The session's thread while the pipeline runs: it wakes the pipeline at
/// each deadline it was sent, and stops it when `shutdown` fires.
fn wait_for_pipeline(
    end: &Receiver<pipeline::Ending>,
    deadlines: &Receiver<Instant>,
    control: &Control,
    shutdown: &Shutdown,
) -> pipeline::Ending {
    let mut due: VecDeque<Instant> = VecDeque::new();
    let mut stop = shutdown.receiver().clone();
    let mut deadlines = deadlines.clone();
    loop {
        let wait = due.front().map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        select! {
            recv(end) -> ended => {
                return ended.unwrap_or_else(|_| {
                    (Err(Failure::Lost("the client's completion queue stopped".into())), None)
                });
            }
            recv(stop) -> _ => {
                control.stop();
                stop = crossbeam_channel::never();
            }
            recv(deadlines) -> d => match d {
                // Calls open in order, so their deadlines come in order.
                Ok(d) => due.push_back(d),
                Err(_) => deadlines = crossbeam_channel::never(),
            },
            default(wait) => {
                let now = Instant::now();
                while due.front().is_some_and(|d| *d <= now) {
                    due.pop_front();
                }
                control.wake();
            }
        }
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>, String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| format!("cannot start a thread: {e}"))
}

/// Waits until `channel` is connected, or says why not within `timeout`;
/// fails fast on a refused connection (also used by `contact-load`).
pub(crate) async fn wait_ready(channel: &Channel, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let state = channel.check_connectivity_state(true);
        match state {
            ConnectivityState::GRPC_CHANNEL_READY => return Ok(()),
            ConnectivityState::GRPC_CHANNEL_TRANSIENT_FAILURE => {
                return Err("connection failed".into())
            }
            ConnectivityState::GRPC_CHANNEL_SHUTDOWN => return Err("channel shut down".into()),
            _ => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not connected after {timeout:?}"));
        }
        channel.wait_for_state_change(state, left).await;
    }
}

/// Sends a status message every `every` and logs the server's replies.
fn send_status(
    client: &ContactClient,
    opt: CallOption,
    every: Duration,
    stop: &Shutdown,
    progress: &Progress,
) -> grpcio::Result<()> {
    let (mut tx, mut replies) = client.send_status_opt(opt)?;
    client.spawn(async move {
        // Progress reports make replies more frequent than `every`: log one per `every`.
        let mut logged: Option<Instant> = None;
        while let Some(Ok(reply)) = replies.next().await {
            if logged.is_none_or(|t| t.elapsed() >= every) {
                logged = Some(Instant::now());
                log::info!("status reply: {}", quoted(&reply.ret));
            } else {
                log::debug!("status reply: {}", quoted(&reply.ret));
            }
        }
    });
    loop {
        let r = progress.report();
        let msg = format!(
            "alive: handled={} acknowledged={}",
            r.handled, r.acknowledged
        );
        let mut status = ClientMsg {
            msg,
            ..Default::default()
        };
        status.working = progress.working().into_iter().collect();
        block_on(tx.send((status, WriteFlags::default())))?;
        select! {
            recv(stop.receiver()) -> _ => return block_on(tx.close()),
            recv(progress.ack_timeout_changed.rx) -> _ => {}
            default(progress.status_interval(every)) => {}
        }
    }
}
