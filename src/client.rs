//! The client: dials out, registers with an empty `getTask`, handles every
//! task it is pushed, reports each result over a `tellResult` stream and its
//! status over `sendStatus`, and dials again (capped exponential backoff with
//! jitter) whenever the server goes away.
//!
//! One connection is a *session* of four threads: a receiver that turns the
//! `getTask` stream into a crossbeam channel, the worker (the caller's thread)
//! that runs the handler, a result sender and a status sender. Results are
//! acknowledged by completing the `tellResult` call, so the sender closes its
//! call every `ack_every` results or `ack_interval` and opens a new one: a
//! completed call is the server's word that those results are recorded.

use crate::backoff::Backoff;
use crate::error::Error;
use crate::handler::{Handler, Outcome};
use crate::listen::ListenAddr;
use crate::logtext::quoted;
use crate::proto::{self, ClientMsg, ContactClient, Empty, ResultMsg, ServerMsg, Working};
use crate::shutdown::Shutdown;
use crate::tls::ClientTls;
use crate::token::Token;
use crate::trust::AUTHORIZATION_KEY;
use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};
use futures::executor::block_on;
use futures::future::{self, Either};
use futures::{SinkExt, StreamExt};
use grpcio::{
    CallOption, Channel, ChannelBuilder, ClientCStreamReceiver, ClientCStreamSender,
    ClientSStreamReceiver, ConnectivityState, EnvBuilder, Environment, Metadata, MetadataBuilder,
    RpcStatusCode, WriteFlags,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Everything `contact-client` can be told.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server.
    pub server: String,
    /// Sent as `contact-client-id` metadata on every call.
    pub id: String,
    pub handler: Handler,
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
}

impl ClientConfig {
    /// Defaults for everything but where to dial and who we are.
    pub fn new(server: impl Into<String>, id: impl Into<String>) -> ClientConfig {
        ClientConfig {
            server: server.into(),
            id: id.into(),
            handler: Handler::Echo,
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
    /// The task being handled now, reported with every status message so
    /// that the server keeps its lease (see `ClientMsg.working`).
    working: Mutex<Option<Working>>,
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

    fn set_working(&self, w: Option<Working>) {
        *self.working.lock().unwrap_or_else(|e| e.into_inner()) = w;
    }

    fn working(&self) -> Option<Working> {
        self.working
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn report(&self) -> ClientReport {
        ClientReport {
            acknowledged: self.acked(),
            handled: self.handled.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
        }
    }
}

/// How a session failed.
enum Failure {
    /// The connection or a call broke: dial again soon.
    Lost(String),
    /// The server refused us (credentials, an id in use, a limit): dial again
    /// only after the longest backoff, since trying sooner changes nothing.
    Refused(String),
}

impl Failure {
    fn from_call(what: &str, server: &str, e: grpcio::Error) -> Failure {
        if let grpcio::Error::RpcFailure(s) = &e {
            let code = s.code();
            if [
                RpcStatusCode::UNAUTHENTICATED,
                RpcStatusCode::PERMISSION_DENIED,
                RpcStatusCode::ALREADY_EXISTS,
                RpcStatusCode::RESOURCE_EXHAUSTED,
            ]
            .contains(&code)
            {
                return Failure::Refused(format!(
                    "server {server} refused {what}: {} ({code:?})",
                    quoted(s.message())
                ));
            }
        }
        Failure::Lost(format!("{what} to {server} failed: {e}"))
    }
}

/// The metadata of every call: who we are (id and process), and our token.
fn call_metadata(cfg: &ClientConfig, instance: &str) -> Result<Metadata, grpcio::Error> {
    let mut b = MetadataBuilder::new();
    b.add_str(proto::CLIENT_ID_KEY, &cfg.id)?;
    b.add_str(proto::INSTANCE_KEY, instance)?;
    b.add_str(proto::LEASES_KEY, "1")?;
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
/// An unreachable or vanished server is not an error: it is logged and dialled
/// again. Only an unusable configuration is.
pub fn run(config: &ClientConfig, shutdown: &Shutdown) -> Result<ClientReport, Error> {
    proto::validate_client_id(&config.id).map_err(|e| Error::Usage(format!("--id: {e}")))?;
    if let Some(tls) = &config.tls {
        // Checked once here, so that a wrong file is a usage error, not a retry loop.
        tls.credentials()?;
    }
    let loopback = config
        .server
        .parse::<ListenAddr>()
        .is_ok_and(|a| a.is_loopback());
    if config.token.is_some() && config.tls.is_none() && !loopback {
        return Err(Error::Usage(format!(
            "the token would cross the network to {} in clear text: add --tls-ca FILE (or --tls to trust the system's CAs)",
            config.server
        )));
    }
    // This process, as opposed to another one using the same id.
    let instance = format!("{:016x}", fastrand::u64(..));
    let env = Arc::new(
        EnvBuilder::new()
            .cq_count(1)
            .name_prefix("contact-client")
            .build(),
    );
    let progress = Arc::new(Progress::default());
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let done = |p: &Progress| config.max_tasks.is_some_and(|max| p.acked() >= max);
    while !shutdown.is_triggered() && !done(&progress) {
        let before = progress.acked();
        let mut refused = false;
        match session(&env, config, &instance, shutdown, &progress) {
            Ok(End::Finished) => break,
            Ok(End::StreamClosed) => log::info!("the server ended the task stream"),
            Ok(End::CannotWork(why)) => {
                // Disconnected, so that the tasks it held go to other agents.
                log::error!(
                    "{why}: this agent takes no tasks until it can run it (checked every {:.1}s)",
                    config.backoff_max.as_secs_f64()
                );
                while config.handler.check_runnable().is_err() {
                    if shutdown.wait_timeout(config.backoff_max) {
                        break;
                    }
                }
                if !shutdown.is_triggered() {
                    log::info!("the --exec program can be run again: taking tasks");
                }
                continue;
            }
            Err(Failure::Lost(e)) => log::warn!("{e}"),
            Err(Failure::Refused(e)) => {
                log::error!("{e}");
                refused = true;
            }
        }
        if progress.acked() > before {
            backoff.reset();
        }
        if done(&progress) {
            break;
        }
        let delay = if refused {
            backoff.refused_delay()
        } else {
            backoff.next_delay()
        };
        log::info!(
            "dialling {} again in {:.1}s",
            config.server,
            delay.as_secs_f64()
        );
        if shutdown.wait_timeout(delay) {
            break;
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

fn session(
    env: &Arc<Environment>,
    cfg: &ClientConfig,
    instance: &str,
    shutdown: &Shutdown,
    progress: &Arc<Progress>,
) -> Result<End, Failure> {
    let mut builder = ChannelBuilder::new(env.clone());
    if let Some(tls) = &cfg.tls {
        let creds = tls
            .credentials()
            .map_err(|e| Failure::Lost(e.to_string()))?;
        builder = builder.set_credentials(creds);
        if let Some(name) = &tls.server_name {
            builder = builder.override_ssl_target(name.clone());
        }
    }
    let channel = builder
        .keepalive_time(cfg.keepalive)
        .keepalive_timeout(Duration::from_secs(10))
        .keepalive_permit_without_calls(true)
        // Keep pinging an idle connection (gRPC stops after two by default):
        // a vanished server is noticed even when no task comes for hours.
        .http2_max_pings_without_data(0)
        .max_receive_message_len(1 << 20)
        .connect(&cfg.server);
    wait_connected(&channel, cfg.connect_timeout)
        .map_err(|why| Failure::Lost(format!("cannot reach server {}: {why}", cfg.server)))?;
    progress.connections.fetch_add(1, Ordering::SeqCst);
    log::info!("connected to {} as {}", cfg.server, cfg.id);
    let client = ContactClient::new(channel);
    let md = call_metadata(cfg, instance)
        .map_err(|e| Failure::Lost(format!("client id {:?}: {e}", cfg.id)))?;
    let opt = move || CallOption::default().headers(md.clone());
    let lost = |what: &str, e: grpcio::Error| Failure::from_call(what, &cfg.server, e);

    let tasks = client
        .get_task_opt(&Empty::new(), opt())
        .map_err(|e| lost("registering", e))?;
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
    let (task_tx, task_rx) = crossbeam_channel::bounded(256);
    let receiver = spawn("task-receiver", move || {
        receive_tasks(tasks, task_tx, stop_rx)
    })
    .map_err(Failure::Lost)?;

    // Counted before the result sender takes the carried results over.
    let base = progress.acked() + progress.carried();
    let (result_tx, result_rx) = crossbeam_channel::bounded(4096);
    let results = {
        let (client, opt, progress) = (client.clone(), opt.clone(), progress.clone());
        let policy = (cfg.ack_every.max(1), cfg.ack_interval);
        spawn("result-sender", move || {
            send_results(&client, &opt, &result_rx, &progress, policy)
        })
        .map_err(Failure::Lost)?
    };

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

    let end = work(cfg, shutdown, progress, base, &task_rx, &result_tx);
    status_stop.trigger();
    drop(stop_tx);
    // Unblocks a receiver waiting for room in the channel.
    drop(task_rx);
    drop(result_tx);
    let acked = results
        .join()
        .unwrap_or_else(|_| Err(grpcio::Error::RemoteStopped));
    let received = receiver.join().unwrap_or(Ok(()));
    acked.map_err(|e| lost("reporting results", e))?;
    match end {
        End::StreamClosed => received
            .map_err(|e| lost("the task stream", e))
            .map(|()| End::StreamClosed),
        End::Finished => Ok(End::Finished),
        End::CannotWork(why) => Ok(End::CannotWork(why)),
    }
}

/// The worker: handles tasks until the stream ends, the client is told to
/// stop, or `max_tasks` results are on their way.
/// `base` counts the results acknowledged or carried over from a broken
/// connection before this session started.
fn work(
    cfg: &ClientConfig,
    shutdown: &Shutdown,
    progress: &Progress,
    base: u64,
    tasks: &Receiver<ServerMsg>,
    results: &Sender<ResultMsg>,
) -> End {
    let mut handled = 0u64;
    loop {
        if cfg.max_tasks.is_some_and(|max| base + handled >= max) {
            return End::Finished;
        }
        let task = select! {
            recv(tasks) -> t => match t {
                Ok(t) => t,
                Err(_) => return End::StreamClosed,
            },
            recv(shutdown.receiver()) -> _ => return End::Finished,
        };
        if task.attempt > 1 {
            log::info!(
                "task {} (attempt {}): {}",
                task.task_id,
                task.attempt,
                quoted(&task.task)
            );
        } else {
            log::info!("task {}: {}", task.task_id, quoted(&task.task));
        }
        progress.learn_ack_timeout(task.ack_timeout_ms);
        // Seed servers send no task ids: there is nothing to report then.
        if task.task_id != 0 {
            progress.set_working(Some(Working {
                task_id: task.task_id,
                attempt: task.attempt,
                incarnation: task.incarnation.clone(),
                ..Default::default()
            }));
        }
        let key = (task.incarnation.clone(), task.task_id);
        let known = (task.attempt > 1 && task.task_id != 0)
            .then(|| {
                progress
                    .outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
            })
            .flatten();
        let outcome = match known {
            Some(o) => {
                log::info!(
                    "task {} was handled before this redelivery; reporting the same result",
                    task.task_id
                );
                o
            }
            None => cfg.handler.handle(&task.task),
        };
        progress.set_working(None);
        // A refusal asked for another try: that one is not remembered.
        if task.task_id != 0 && !outcome.retry {
            progress
                .outcomes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, outcome.clone());
        }
        log::info!(
            "task {} {}: {}",
            task.task_id,
            if outcome.ok { "done" } else { "failed" },
            quoted(&outcome.output)
        );
        let outcome_retry = outcome.retry;
        let result = ResultMsg {
            ret: outcome.output,
            task_id: task.task_id,
            ok: outcome.ok,
            retry: outcome.retry,
            attempt: task.attempt,
            incarnation: task.incarnation.clone(),
            ..Default::default()
        };
        if let Err(unsent) = results.send(result) {
            // The result sender died (the connection broke); the session is over.
            progress.carry([unsent.0]);
            return End::StreamClosed;
        }
        handled += 1;
        progress.handled.fetch_add(1, Ordering::SeqCst);
        // A refusal because the program could not be started (it was removed,
        // or lost its execute bit): stop taking tasks rather than refuse them all.
        if outcome_retry {
            if let Err(why) = cfg.handler.check_runnable() {
                return End::CannotWork(why.to_string());
            }
        }
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| format!("cannot start a thread: {e}"))
}

/// Waits until the channel is connected; fails fast on a refused connection.
fn wait_connected(channel: &Channel, timeout: Duration) -> Result<(), String> {
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
        block_on(channel.wait_for_state_change(state, left));
    }
}

/// Moves tasks from the `getTask` stream into the worker's channel until the
/// stream ends or the session stops (which cancels the call).
fn receive_tasks(
    mut stream: ClientSStreamReceiver<ServerMsg>,
    tx: Sender<ServerMsg>,
    mut stop: futures::channel::oneshot::Receiver<()>,
) -> grpcio::Result<()> {
    block_on(async {
        loop {
            match future::select(stream.next(), &mut stop).await {
                Either::Left((Some(Ok(task)), _)) => {
                    if tx.send(task).is_err() {
                        return Ok(());
                    }
                }
                Either::Left((Some(Err(e)), _)) => return Err(e),
                Either::Left((None, _)) | Either::Right(_) => return Ok(()),
            }
        }
    })
}

struct OpenCall {
    sender: ClientCStreamSender<ResultMsg>,
    receiver: ClientCStreamReceiver<Empty>,
    /// What the call carried, kept until it is acknowledged.
    sent: Vec<ResultMsg>,
    opened: Instant,
}

impl OpenCall {
    fn open(client: &ContactClient, opt: CallOption) -> grpcio::Result<OpenCall> {
        let (sender, receiver) = client.tell_result_opt(opt)?;
        Ok(OpenCall {
            sender,
            receiver,
            sent: vec![],
            opened: Instant::now(),
        })
    }

    /// Writes a batch, buffering all but the last message. The batch counts
    /// as carried by the call even if writing fails, so it is kept either way.
    fn send(&mut self, batch: Vec<ResultMsg>) -> grpcio::Result<()> {
        let start = self.sent.len();
        self.sent.extend(batch);
        let (sender, batch) = (&mut self.sender, &self.sent[start..]);
        let last = batch.len().saturating_sub(1);
        block_on(async {
            for (i, r) in batch.iter().enumerate() {
                sender
                    .feed((r.clone(), WriteFlags::default().buffer_hint(i < last)))
                    .await?;
            }
            sender.flush().await
        })
    }

    /// Completes the call; its answer acknowledges every result it carried.
    /// On failure the results are kept for the next connection.
    fn finish(mut self, progress: &Progress) -> grpcio::Result<()> {
        let done =
            block_on(self.sender.close()).and_then(|()| block_on(&mut self.receiver).map(|_| ()));
        match done {
            Ok(()) => {
                progress
                    .acknowledged
                    .fetch_add(self.sent.len() as u64, Ordering::SeqCst);
                log::debug!("{} results acknowledged", self.sent.len());
                Ok(())
            }
            Err(e) => {
                progress.carry(self.sent);
                Err(e)
            }
        }
    }
}

/// Streams results over `tellResult`, completing a call every `policy.0`
/// results or `policy.1` after it was opened; returns once the worker is done
/// and the last call is acknowledged. Results from an earlier, broken
/// connection go first. Whatever is not acknowledged when it fails is kept.
fn send_results(
    client: &ContactClient,
    opt: &dyn Fn() -> CallOption,
    rx: &Receiver<ResultMsg>,
    progress: &Progress,
    policy: (u64, Duration),
) -> grpcio::Result<()> {
    let mut call: Option<OpenCall> = None;
    let res = result_loop(client, opt, rx, progress, policy, &mut call);
    if res.is_err() {
        if let Some(c) = call.take() {
            progress.carry(c.sent);
        }
        progress.carry(rx.try_iter());
    }
    res
}

fn result_loop(
    client: &ContactClient,
    opt: &dyn Fn() -> CallOption,
    rx: &Receiver<ResultMsg>,
    progress: &Progress,
    (ack_every, ack_interval): (u64, Duration),
    call: &mut Option<OpenCall>,
) -> grpcio::Result<()> {
    let carried = progress.take_carried();
    if !carried.is_empty() {
        log::info!(
            "sending {} results again that were not acknowledged",
            carried.len()
        );
        send_batch(client, opt, call, carried, progress)?;
    }
    loop {
        let next = match call.as_ref() {
            Some(c) => rx.recv_timeout(ack_interval.saturating_sub(c.opened.elapsed())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let first = match next {
            Ok(r) => r,
            Err(end) => {
                if let Some(c) = call.take() {
                    c.finish(progress)?;
                }
                match end {
                    RecvTimeoutError::Timeout => continue,
                    RecvTimeoutError::Disconnected => return Ok(()),
                }
            }
        };
        let in_call = call.as_ref().map_or(0, |c| c.sent.len() as u64);
        let room = ack_every.saturating_sub(in_call).clamp(1, 256) as usize;
        let batch: Vec<ResultMsg> = std::iter::once(first)
            .chain(rx.try_iter().take(room - 1))
            .collect();
        send_batch(client, opt, call, batch, progress)?;
        if call
            .as_ref()
            .is_some_and(|c| c.sent.len() as u64 >= ack_every)
        {
            call.take().expect("open").finish(progress)?;
        }
    }
}

/// Sends a batch on the open call, opening one if needed; on failure nothing
/// of the batch is lost (it is in the call's `sent`, or carried over).
fn send_batch(
    client: &ContactClient,
    opt: &dyn Fn() -> CallOption,
    call: &mut Option<OpenCall>,
    batch: Vec<ResultMsg>,
    progress: &Progress,
) -> grpcio::Result<()> {
    if call.is_none() {
        match OpenCall::open(client, opt()) {
            Ok(c) => *call = Some(c),
            Err(e) => {
                progress.carry(batch);
                return Err(e);
            }
        }
    }
    call.as_mut().expect("opened above").send(batch)
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
