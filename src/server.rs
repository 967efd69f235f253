//! The server: the `Contact` gRPC service (and the operators' `Admin`, see
//! `admin`) on grpcio's thread pools, and
//! `Server`, which wires it to the dispatcher, the producers, the result
//! sink and the stats line, and shuts it all down without losing a result.
//! When the disk fails under the recorder, it stops taking work at once
//! (calls are answered UNAVAILABLE, so agents keep their results) and stops.
//!
//! Handlers never block a completion-queue thread: each call becomes a
//! future on grpcio's executor (`ctx.spawn`) that only touches the
//! dispatcher's lock and non-blocking channels; files and producers live on
//! threads of ours.

use crate::admin::{AdminReach, AdminService, AdminWorker, Rollouts};
use crate::budget::{budget_key, StaleBudget, StaleLimits};
use crate::dispatch::{Answer, AttachRefused, DispatchConfig, Dispatcher, Holder};
use crate::error::Error;
use crate::feed::{Delivery, TaskFeed};
use crate::jobs::JobTable;
use crate::journal::{Journal, OnDamage, Record};
use crate::labels;
use crate::listen::ListenAddr;
use crate::logtext::quoted;
use crate::observe::health::Health;
use crate::observe::metrics::Metrics;
use crate::observe::port::{MetricsPort, PortState};
use crate::producer::{Producer, TaskSource};
use crate::proto::{self, ClientMsg, Contact, Empty, ResultMsg, ServerMsg};
use crate::reload::{CredentialFiles, Reloader};
use crate::replica::{Lease, LeaseRefused, Replica, ReplicaRuntime, StoreConfig};
use crate::results::{ResultSink, ResultWriter, SinkConfig};
use crate::shutdown::Shutdown;
use crate::tls::{self, CertificateReloader, ServerTls};
use crate::transport;
use crate::trust::{self, Authenticator, Caller, Presented, Refusal, TrustConfig};
use futures::future::poll_fn;
use futures::{SinkExt, StreamExt, TryStreamExt};
use grpcio::{
    ClientStreamingSink, DuplexSink, RequestStream, RpcContext, RpcStatus, RpcStatusCode,
    ServerBuilder, ServerCredentials, ServerStreamingSink, WriteFlags,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Deliveries written to a stream before one flush: enough to amortise the
/// write completion, small enough to keep a fair share between clients.
const MAX_WRITE_BATCH: usize = 256;

/// Results of one `tellResult` stream judged together at most: those
/// already received when it is read (see `next_results`).
const MAX_RESULT_BATCH: usize = 256;

/// How long stopping waits for open calls to complete before cancelling them.
const CALLS_DRAIN: Duration = Duration::from_secs(2);

/// How often connected clients are checked against the deny list.
const REVOCATION_CHECK: Duration = Duration::from_secs(1);

/// How often ack deadlines and client liveness are checked.
const TICK: Duration = Duration::from_millis(50);

/// The most frequent keepalive ping the server accepts from a client.
pub const MIN_CLIENT_PING: Duration = Duration::from_secs(1);

/// Everything `contact-server` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `host:port` to listen on; port 0 picks a free port (see [`Server::port`]).
    pub listen: String,
    pub sources: Vec<TaskSource>,
    pub dispatch: DispatchConfig,
    /// Append every result as one JSON object per line.
    pub results_to: Option<PathBuf>,
    /// `--admin-listen unix:PATH`: a Unix socket (mode 0600) on which admin
    /// calls need no token.
    pub admin_socket: Option<PathBuf>,
    /// Append every task given up on as one JSON object per line.
    pub dead_letters: Option<PathBuf>,
    /// Keep the durable state (journal) here; `None` keeps state in memory only.
    pub state_dir: Option<PathBuf>,
    /// `--store nats://...`: share the fleet with other replicas through
    /// NATS JetStream instead (an alternative to `state_dir`).
    pub store: Option<StoreConfig>,
    /// What to do with a journal damaged before its last complete commit.
    pub on_damage: OnDamage,
    /// Journal size from which it is compacted (it also waits for it to double).
    pub compact_bytes: u64,
    /// How often the stats line is logged.
    pub stats_every: Duration,
    /// How long shutdown waits for clients to report the tasks in their hands.
    pub grace: Duration,
    /// Largest message accepted from a client.
    pub max_message_bytes: usize,
    /// Interval of HTTP/2 keepalive pings to idle clients...
    pub keepalive: Duration,
    /// ...and how long an unanswered ping may wait before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// TLS (and with a client CA, mutual TLS); `None` serves plaintext.
    pub tls: Option<ServerTls>,
    /// What callers must prove (tokens, certificates).
    pub trust: TrustConfig,
    /// Serve an address other machines can reach without TLS and credentials.
    pub insecure: bool,
    /// Bounds on what one connection may hold.
    pub transport: TransportLimits,
    /// Stale results an agent may send per minute before its results are refused.
    pub stale: StaleLimits,
    /// `--metrics-listen HOST:PORT`: metrics, health and the web view over HTTP.
    pub metrics_listen: Option<String>,
    /// `--metrics-per-agent`: series per connected agent too.
    pub metrics_per_agent: bool,
}

/// What one connection may hold, so that hostile peers cannot exhaust the server.
#[derive(Debug, Clone, Copy)]
pub struct TransportLimits {
    /// Concurrent streams (calls) per connection; an agent uses 3.
    pub max_streams_per_connection: u32,
    /// A connection with no call open for this long is closed (GOAWAY).
    pub idle_connection: Duration,
    /// A connection must finish its handshake (TLS and HTTP/2 preface) within this.
    pub handshake: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            max_streams_per_connection: 100,
            idle_connection: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:50051".into(),
            sources: vec![],
            dispatch: DispatchConfig::default(),
            results_to: None,
            admin_socket: None,
            dead_letters: None,
            state_dir: None,
            store: None,
            on_damage: OnDamage::Refuse,
            compact_bytes: 64 << 20,
            stats_every: Duration::from_secs(5),
            grace: Duration::from_secs(5),
            max_message_bytes: 1 << 20,
            keepalive: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            tls: None,
            trust: TrustConfig::default(),
            insecure: false,
            transport: TransportLimits::default(),
            stale: StaleLimits::default(),
            metrics_listen: None,
            metrics_per_agent: false,
        }
    }
}

/// The gRPC service: cheap to clone, one clone per completion queue.
#[derive(Clone)]
struct ContactService {
    dispatcher: Arc<Dispatcher>,
    /// Jobs pushed through the admin API, told of the results that answer them.
    jobs: Arc<JobTable>,
    /// Gives rolling-out jobs' tasks to their next agents.
    rollouts: Rollouts,
    results: ResultSink,
    auth: Arc<Authenticator>,
    stale: Arc<StaleBudget>,
    /// Counted as it happens, with `--metrics-listen`.
    metrics: Option<Arc<Metrics>>,
    /// With `--store`: this server as one replica of several.
    replica: Option<Replica>,
}

impl ContactService {
    /// Who is calling (see `trust`): an agent proven (or, without credentials
    /// configured, believed) by its id, or a seed peer known by its address.
    fn caller(&self, ctx: &RpcContext) -> Result<Caller, RpcStatus> {
        let headers = ctx.request_headers();
        let invalid = |why| RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why);
        let claimed = proto::client_id_from(headers).map_err(invalid)?;
        let bearer = trust::bearer_from(headers).map_err(invalid)?;
        let peer = ctx.peer();
        let cert_names = if self.auth.client_certs() {
            tls::peer_cert_names(ctx)
        } else {
            vec![]
        };
        let presented = Presented {
            claimed: claimed.as_deref(),
            bearer: bearer.as_deref(),
            cert_names,
            peer: &peer,
        };
        self.auth.agent(&presented).map_err(|r| match r {
            Refusal::Unauthenticated(m) => {
                RpcStatus::with_message(RpcStatusCode::UNAUTHENTICATED, m)
            }
            Refusal::Denied(m) => RpcStatus::with_message(RpcStatusCode::PERMISSION_DENIED, m),
        })
    }
}

/// A status stream is noted (logged, and a sign of life) at most this often.
const STATUS_NOTE_EVERY: Duration = Duration::from_secs(1);

/// A status stream's progress reports (`working`) are applied at most this often.
const RENEW_EVERY: Duration = Duration::from_millis(100);

/// Entries of one progress report read at most (a client holds `--max-in-flight`).
const MAX_WORKING_REPORTED: usize = 1024;

/// Warnings about refused calls, at most this many per second (a flood of
/// bad calls must not become a flood of log lines).
const REFUSAL_WARNINGS_PER_SEC: u64 = 10;

/// Logs a refused call at warn, rate-limited; the rest are counted and summed up.
fn warn_refused(peer: &str, why: &str) {
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let window = WINDOW.load(Ordering::Relaxed);
    if window != now
        && WINDOW
            .compare_exchange(window, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = COUNT
            .swap(0, Ordering::Relaxed)
            .saturating_sub(REFUSAL_WARNINGS_PER_SEC);
        if suppressed > 0 {
            log::warn!("{suppressed} more calls were refused in the last second (not logged)");
        }
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) < REFUSAL_WARNINGS_PER_SEC {
        log::warn!("refused a call from {peer}: {}", quoted(why));
    }
}

/// Rejects a call whose caller is unknown or unproven, saying why.
macro_rules! caller_or_reject {
    ($self:expr, $ctx:expr, $sink:expr) => {
        match $self.caller(&$ctx) {
            Ok(c) => c,
            Err(status) => {
                warn_refused(&$ctx.peer(), status.message());
                $ctx.spawn(async move {
                    let _ = $sink.fail(status).await;
                });
                return;
            }
        }
    };
}

impl Contact for ContactService {
    fn send_status(
        &mut self,
        ctx: RpcContext,
        mut stream: RequestStream<ClientMsg>,
        mut sink: DuplexSink<ResultMsg>,
    ) {
        let client = caller_or_reject!(self, ctx, sink).id;
        let dispatcher = self.dispatcher.clone();
        ctx.spawn(async move {
            // Every message is answered; a flood of them is not logged (nor
            // noted as a sign of life) more than once a second, nor its
            // progress report applied more than ten times a second.
            let mut noted: Option<Instant> = None;
            let mut renewed: Option<Instant> = None;
            let res: grpcio::Result<()> = async {
                loop {
                    let msg = match stream.try_next().await {
                        Ok(Some(msg)) => msg,
                        Ok(None) => break,
                        Err(grpcio::Error::Codec(e)) => {
                            let status = undecodable(&client, "status", &e);
                            return sink.fail(status).await;
                        }
                        Err(e) => return Err(e),
                    };
                    if !msg.working.is_empty() && renewed.is_none_or(|t| t.elapsed() >= RENEW_EVERY)
                    {
                        renewed = Some(Instant::now());
                        let working: Vec<(u64, u32, String)> = msg
                            .working
                            .iter()
                            .take(MAX_WORKING_REPORTED)
                            .map(|w| (w.task_id, w.attempt, w.incarnation.clone()))
                            .collect();
                        dispatcher.renew(&client, &working);
                    }
                    if noted.is_none_or(|t| t.elapsed() >= STATUS_NOTE_EVERY) {
                        noted = Some(Instant::now());
                        dispatcher.touch(&client);
                        log::debug!("status from {client}: {}", quoted(&msg.msg));
                    }
                    let reply = ResultMsg {
                        ret: format!("server received: {}", msg.msg),
                        ..Default::default()
                    };
                    sink.send((reply, WriteFlags::default())).await?;
                }
                sink.close().await
            }
            .await;
            if let Err(e) = res {
                log::debug!("status stream of {client} ended: {e}");
            }
        });
    }

    fn get_task(&mut self, ctx: RpcContext, _req: Empty, mut sink: ServerStreamingSink<ServerMsg>) {
        let Caller {
            id: client,
            ephemeral,
        } = caller_or_reject!(self, ctx, sink);
        if self.results.failure().is_some() {
            ctx.spawn(async move {
                let _ = sink.fail(cannot_record()).await;
            });
            return;
        }
        let incarnation = self.dispatcher.incarnation();
        let headers = ctx.request_headers();
        let instance = proto::instance_from(headers);
        let peer = ctx.peer();
        let labels = match labels::from_metadata(headers) {
            Ok(l) => l,
            Err(why) => {
                let status = RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why);
                warn_refused(&peer, status.message());
                ctx.spawn(async move {
                    let _ = sink.fail(status).await;
                });
                return;
            }
        };
        let leases = proto::leases_from(headers);
        // With replicas, the agent's lease is taken first (one owner per id
        // in the fleet), on the store's runtime: this thread does not wait.
        let lease = match (&self.replica, ephemeral) {
            (Some(r), false) => Some((
                r.clone(),
                r.acquire(Lease {
                    agent: client.clone(),
                    replica: r.name().to_string(),
                    instance: instance.clone(),
                    peer: peer.clone(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    since: crate::unixtime::now(),
                }),
            )),
            _ => None,
        };
        let dispatcher = self.dispatcher.clone();
        let ack_timeout_ms =
            u32::try_from(self.dispatcher.config().ack_timeout.as_millis()).unwrap_or(u32::MAX);
        let results = self.results.clone();
        let metrics = self.metrics.clone();
        ctx.spawn(async move {
            let replica = match lease {
                None => None,
                Some((replica, answer)) => {
                    let (refused, token) = match answer.await {
                        Ok(Ok(token)) => (None, token),
                        Ok(Err(LeaseRefused::InUse { replica: other, peer: holder })) => {
                            warn_refused(
                                &peer,
                                &format!("client {client} is already connected to replica {other} from {holder} (two agents must not share an id)"),
                            );
                            (Some(RpcStatus::with_message(
                                RpcStatusCode::ALREADY_EXISTS,
                                format!("client id {client:?} is already connected from another process; give each agent its own --id"),
                            )), 0)
                        }
                        Ok(Err(LeaseRefused::Store(why))) => (Some(RpcStatus::with_message(
                            RpcStatusCode::UNAVAILABLE,
                            format!("this replica cannot reach its store ({why}); try another"),
                        )), 0),
                        Err(_) => (Some(RpcStatus::with_message(
                            RpcStatusCode::UNAVAILABLE,
                            "the server is shutting down".into(),
                        )), 0),
                    };
                    if let Some(status) = refused {
                        let _ = sink.fail(status).await;
                        return;
                    }
                    Some((replica, token))
                }
            };
            let holder = Holder {
                peer: &peer,
                instance: &instance,
                ephemeral,
                leases,
                labels,
            };
            let attached = dispatcher.attach_as(&client, holder);
            let (session, mut feed) = match attached {
                Ok(a) => a,
                Err(refused) => {
                    let status = match refused {
                        AttachRefused::Closed => RpcStatus::with_message(
                            RpcStatusCode::UNAVAILABLE,
                            "the server is shutting down".into(),
                        ),
                        AttachRefused::InUse { peer: holder } => {
                            warn_refused(
                                &peer,
                                &format!("client {client} is already connected from {holder} (two agents must not share an id)"),
                            );
                            RpcStatus::with_message(
                                RpcStatusCode::ALREADY_EXISTS,
                                format!("client id {client:?} is already connected from another process; give each agent its own --id"),
                            )
                        }
                    };
                    if let Some((r, token)) = &replica {
                        r.release(&client, *token);
                    }
                    let _ = sink.fail(status).await;
                    return;
                }
            };
            let mut res = forward(
                &mut feed,
                &mut sink,
                &incarnation,
                ack_timeout_ms,
                metrics.as_deref(),
            )
            .await;
            if res.is_ok() {
                // The dispatcher ended the feed: a stop, or a failed disk.
                res = match results.failure() {
                    Some(_) => sink.fail(cannot_record()).await,
                    None => sink.close().await,
                };
            }
            dispatcher.detach(&client, session);
            // Its lease goes with the session that took it.
            if let Some((r, token)) = replica {
                r.release(&client, token);
            }
            if let Err(e) = res {
                log::debug!("task stream of {client} ended: {e}");
            }
        });
    }

    fn tell_result(
        &mut self,
        ctx: RpcContext,
        mut stream: RequestStream<ResultMsg>,
        sink: ClientStreamingSink<Empty>,
    ) {
        let Caller {
            id: client,
            ephemeral,
        } = caller_or_reject!(self, ctx, sink);
        if self.results.failure().is_some() {
            ctx.spawn(async move {
                let _ = sink.fail(cannot_record()).await;
            });
            return;
        }
        let budget_key = budget_key(&client, ephemeral);
        if let Some(why) = self.stale.exhausted(&budget_key) {
            warn_refused(&ctx.peer(), &format!("results of {client}: {why}"));
            let status = RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why);
            ctx.spawn(async move {
                let _ = sink.fail(status).await;
            });
            return;
        }
        let dispatcher = self.dispatcher.clone();
        let jobs = self.jobs.clone();
        let rollouts = self.rollouts.clone();
        let results = self.results.clone();
        let budget = self.stale.clone();
        let metrics = self.metrics.clone();
        ctx.spawn(async move {
            let res: grpcio::Result<()> = async {
                // A client that sent a stale result has the rest of its
                // results judged one at a time, so that its budget cuts it
                // off at the result that exhausts it.
                let mut max = MAX_RESULT_BATCH;
                loop {
                    let (batch, end) = next_results(&mut stream, max).await;
                    let answers: Vec<Answer> = batch.into_iter().map(answer_of).collect();
                    // Recorded by the dispatcher. An agent with an id must name
                    // the delivery exactly; only seed peers get the wildcards.
                    let judged = if answers.is_empty() {
                        vec![]
                    } else {
                        dispatcher.complete_many(&client, answers, !ephemeral)
                    };
                    rollouts.release(jobs.observe(judged.iter().flatten()));
                    if let Some(m) = &metrics {
                        m.observe_results(judged.iter().flatten());
                    }
                    // Results that answer nothing are budgeted, not written to disk forever.
                    for r in judged.iter().flatten().filter(|r| r.stale) {
                        max = 1;
                        // What is written: the output and the task text it names.
                        let bytes = r.output.len() + r.task.as_ref().map_or(0, String::len);
                        if let Some(why) = budget.charge(&budget_key, bytes) {
                            return Err(grpcio::Error::RpcFailure(RpcStatus::with_message(
                                RpcStatusCode::RESOURCE_EXHAUSTED,
                                why,
                            )));
                        }
                    }
                    match end {
                        None => continue,
                        Some(end) => return end,
                    }
                }
            }
            .await;
            if ephemeral {
                dispatcher.results_ended(&client);
            }
            // Answer only once every result of this call is on disk: the
            // answer is the client's acknowledgement.
            let recorded = results.flushed().await.is_ok();
            match (res, recorded) {
                (Ok(()), true) => {
                    let _ = sink.success(Empty::default()).await;
                }
                (Ok(()), false) => {
                    // Not recorded: UNAVAILABLE, so that the client keeps
                    // these results and sends them again later.
                    let status = match results.failure() {
                        Some(_) => cannot_record(),
                        None => RpcStatus::with_message(
                            RpcStatusCode::UNAVAILABLE,
                            "the server is shutting down".into(),
                        ),
                    };
                    let _ = sink.fail(status).await;
                }
                (Err(grpcio::Error::RpcFailure(status)), _)
                    if status.code() == RpcStatusCode::RESOURCE_EXHAUSTED =>
                {
                    warn_refused(
                        &client,
                        &format!("results of {client}: {}", status.message()),
                    );
                    let _ = sink.fail(status).await;
                }
                (Err(grpcio::Error::Codec(e)), _) => {
                    let _ = sink.fail(undecodable(&client, "result", &e)).await;
                }
                (Err(e), _) => log::debug!("result stream of {client} ended: {e}"),
            }
        });
    }
}

/// The answer to a message that is not what the proto says (a hostile or
/// broken peer): INVALID_ARGUMENT, naming the call; logged rate-limited.
fn undecodable(client: &str, what: &str, e: &dyn std::fmt::Display) -> RpcStatus {
    let why = format!("a {what} message from {client} could not be decoded: {e}");
    warn_refused(client, &why);
    RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why)
}

/// A result message as the dispatcher judges it.
fn answer_of(r: ResultMsg) -> Answer {
    Answer {
        task_id: r.task_id,
        attempt: r.attempt,
        ok: r.ok,
        retry: r.retry,
        output: r.ret,
        incarnation: r.incarnation,
    }
}

/// The next results of a `tellResult` stream: the first awaited, then every
/// one already received, up to `max`; with how the stream ended, if it did
/// (`Ok` at its end, or the error) — the results before an end are still
/// returned, to be judged before it. (grpcio reads one message per
/// completion-queue event, so a batch is mostly one result: nothing waits
/// for more, since judging a result is what frees the client's credit.)
async fn next_results(
    stream: &mut RequestStream<ResultMsg>,
    max: usize,
) -> (Vec<ResultMsg>, Option<grpcio::Result<()>>) {
    let mut batch = Vec::new();
    poll_fn(|cx| loop {
        if batch.len() >= max {
            return Poll::Ready((std::mem::take(&mut batch), None));
        }
        match stream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(r))) => batch.push(r),
            Poll::Ready(Some(Err(e))) => {
                return Poll::Ready((std::mem::take(&mut batch), Some(Err(e))))
            }
            Poll::Ready(None) => return Poll::Ready((std::mem::take(&mut batch), Some(Ok(())))),
            Poll::Pending if batch.is_empty() => return Poll::Pending,
            Poll::Pending => return Poll::Ready((std::mem::take(&mut batch), None)),
        }
    })
    .await
}

/// The answer to every call once the recorder has failed: UNAVAILABLE, which
/// clients treat as "keep your results and try again later".
fn cannot_record() -> RpcStatus {
    RpcStatus::with_message(
        RpcStatusCode::UNAVAILABLE,
        "the server cannot record results (a disk or store error) and is stopping; keep them and send them again later".into(),
    )
}

/// Writes the feed's deliveries into the stream until the dispatcher ends
/// the feed (`Ok`; the caller ends the call) or the client goes away (error).
///
/// Every delivery already in the feed is written with `buffer_hint` (C-core
/// holds it), the feed looked at again after each write (deliveries keep
/// coming while the stream is written), and the last one of a batch — when
/// the feed is empty, or after `MAX_WRITE_BATCH` — is written without the
/// hint, which sends them all in one go: nothing waits for a timer or for
/// more tasks once the feed is empty.
async fn forward(
    feed: &mut TaskFeed,
    sink: &mut ServerStreamingSink<ServerMsg>,
    incarnation: &str,
    ack_timeout_ms: u32,
    metrics: Option<&Metrics>,
) -> grpcio::Result<()> {
    let message = |d: Delivery| {
        if let Some(m) = metrics.filter(|_| d.attempt == 1) {
            m.observe_first_delivery(d.task.produced_at);
        }
        ServerMsg {
            task: d.task.text.clone(),
            task_id: d.task.id,
            attempt: d.attempt,
            incarnation: incarnation.to_string(),
            ack_timeout_ms,
            ..Default::default()
        }
    };
    loop {
        // Wait for a delivery, but notice a vanished client even when idle:
        // polling the sink's readiness watches the call's end.
        let next = poll_fn(|cx| {
            if let Poll::Ready(Err(e)) = sink.poll_ready_unpin(cx) {
                return Poll::Ready(Err(e));
            }
            feed.poll_next_unpin(cx).map(Ok)
        })
        .await?;
        let Some(mut pending) = next else { break };
        let mut written = 0;
        loop {
            written += 1;
            let next = if written < MAX_WRITE_BATCH {
                feed.try_next()
            } else {
                None
            };
            let more = next.is_some();
            // Buffered while more follow; the last write of the batch sends them all.
            sink.feed((message(pending), WriteFlags::default().buffer_hint(more)))
                .await?;
            match next {
                Some(d) => pending = d,
                None => break,
            }
        }
        sink.flush().await?;
    }
    Ok(())
}

/// A running server. Dropping it without [`Server::stop`] cancels every call.
pub struct Server {
    grpc: grpcio::Server,
    port: u16,
    dispatcher: Arc<Dispatcher>,
    writer: ResultWriter,
    producers: Vec<Producer>,
    clock: Option<JoinHandle<()>>,
    admin_worker: Option<AdminWorker>,
    health: Arc<Health>,
    /// `--metrics-listen`, and what stops it (last, after the drain).
    metrics_port: Option<(MetricsPort, Shutdown)>,
    shutdown: Shutdown,
    grace: Duration,
    auth: Arc<Authenticator>,
    certificates: Option<CertificateReloader>,
    /// With `--store`: the NATS client's runtime, stopped last.
    store_runtime: Option<ReplicaRuntime>,
}

impl Server {
    /// Binds, starts serving and starts the producers.
    pub fn start(config: ServerConfig) -> Result<Server, Error> {
        let listen = exposure_checked(&config)?;
        let auth = Arc::new(Authenticator::new(config.trust.clone())?);
        let (credentials, certificates) = match &config.tls {
            Some(t) => {
                let (c, reloader) = t.credentials()?;
                (c, Some(reloader))
            }
            None => (ServerCredentials::insecure(), None),
        };
        let metrics = config
            .metrics_listen
            .as_ref()
            .map(|_| Arc::new(Metrics::new(config.metrics_per_agent)));
        let (journal, records) = match &config.state_dir {
            Some(dir) => {
                let (mut j, r) = Journal::open_with(dir, config.on_damage)?;
                if let Some(m) = &metrics {
                    j.time_syncs(m.fsync_timer());
                }
                (Some(j), r)
            }
            None => (None, vec![]),
        };
        let durable = journal.is_some();
        // Fired by `stop`, or by the recorder when the disk fails.
        let shutdown = Shutdown::new();
        let replica = match &config.store {
            Some(store) => {
                let (r, rt) =
                    Replica::connect(store.clone(), config.dispatch.mode, shutdown.clone())?;
                Some((r, rt))
            }
            None => None,
        };
        let (results, writer) = ResultSink::start(SinkConfig {
            results: config.results_to.as_deref(),
            dead_letters: config.dead_letters.as_deref(),
            journal: journal.map(|j| (j, &records[..])),
            compact_bytes: config.compact_bytes,
            stop: shutdown.clone(),
            outcomes: replica.as_ref().map(|(r, _)| r.clone()),
        })?;
        let dispatcher = Arc::new(Dispatcher::recording(
            config.dispatch.clone(),
            results.clone(),
            durable,
        ));
        if let Some(dir) = &config.state_dir {
            let r = dispatcher.restore(records)?;
            log::info!(
                "state {}: {} tasks ({} unfinished), {} known clients restored",
                dir.display(),
                r.tasks,
                r.unfinished,
                r.clients
            );
            // Start from a compact journal (the records are gone by now:
            // a large state is not held three times, as records, state and snapshot).
            dispatcher.compact();
        }
        if let Some((r, _)) = &replica {
            // Every replica gives agents the fleet's identity.
            dispatcher.restore(vec![Record::Incarnation {
                id: r.incarnation().to_string(),
            }])?;
        }
        let env = crate::tls::grpc_environment(2, "grpc-poll");
        let jobs = Arc::new(JobTable::default());
        let (admin, admin_worker) = AdminService::start(
            dispatcher.clone(),
            jobs.clone(),
            auth.clone(),
            config.max_message_bytes,
            config.results_to.clone(),
            AdminReach {
                socket: config.admin_socket.is_some(),
                exposed: !listen.is_loopback(),
                numbered: config.state_dir.is_some(),
            },
            shutdown.clone(),
        )?;
        let admin = match &replica {
            Some((r, _)) => admin.reading_results_from(r.clone()),
            None => admin,
        };
        if let Some((r, _)) = &replica {
            let jobs = jobs.clone();
            let rollouts = admin.rollouts();
            r.serve(
                dispatcher.clone(),
                jobs.clone(),
                Box::new(move |result| {
                    rollouts.release(jobs.observe(std::iter::once(result)));
                }),
            )?;
        }
        let service = ContactService {
            replica: replica.as_ref().map(|(r, _)| r.clone()),
            dispatcher: dispatcher.clone(),
            jobs: jobs.clone(),
            rollouts: admin.rollouts(),
            results: results.clone(),
            auth: auth.clone(),
            stale: Arc::new(StaleBudget::new(config.stale)),
            metrics: metrics.clone(),
        };
        let health = Arc::new(Health::new());
        let args = transport::server_channel(env.clone(), &config).build_args();
        let mut grpc = ServerBuilder::new(env)
            .channel_args(args)
            .register_service(proto::create_contact(service))
            .register_service(proto::admin::create_admin(admin.clone()))
            .register_service(health.grpc_service())
            .build()?;
        let port = grpc
            .add_listening_port(listen.to_string(), credentials)
            .map_err(|e| Error::Bind {
                addr: listen.to_string(),
                reason: bind_reason(e),
            })?;
        if let Some(path) = &config.admin_socket {
            listen_admin_socket(&mut grpc, path)?;
        }
        let metrics_port = match (&config.metrics_listen, metrics) {
            (Some(addr), Some(metrics)) => {
                let stop = Shutdown::new();
                let state = PortState {
                    dispatcher: dispatcher.clone(),
                    metrics,
                    health: health.clone(),
                    admin,
                    auth: auth.clone(),
                    shutdown: shutdown.clone(),
                };
                Some((MetricsPort::start(addr, state, stop.clone())?, stop))
            }
            _ => None,
        };
        grpc.start();
        health.set_serving(true);
        log::info!(
            "contact server listening on {} ({})",
            listen.with_port(port),
            protection(&config)
        );

        let mut server = Server {
            grpc,
            port,
            dispatcher: dispatcher.clone(),
            writer,
            producers: vec![],
            clock: None,
            admin_worker: Some(admin_worker),
            health,
            metrics_port,
            shutdown: shutdown.clone(),
            grace: config.grace,
            auth: auth.clone(),
            certificates,
            store_runtime: replica.map(|(_, rt)| rt),
        };
        for source in &config.sources {
            server.producers.push(Producer::start(
                source,
                dispatcher.clone(),
                shutdown.clone(),
            )?);
        }
        let every = config.stats_every;
        server.clock = Some(
            std::thread::Builder::new()
                .name("clock".into())
                .spawn(move || clock_loop(&dispatcher, &results, &auth, every, &shutdown))
                .map_err(Error::Thread)?,
        );
        Ok(server)
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where `--metrics-listen` is bound, if it is.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_port.as_ref().map(|(p, _)| p.addr())
    }

    /// The dispatcher, to publish tasks or inspect clients from outside gRPC.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// What puts new credentials in force while the server runs (SIGHUP),
    /// for a server started with the credential files `files`.
    pub fn reloader(&self, files: CredentialFiles) -> Reloader {
        Reloader::new(
            self.auth.clone(),
            self.certificates.clone(),
            self.dispatcher.clone(),
            files,
        )
    }

    /// Serves until `stop` fires (a signal) or the disk fails under the
    /// recorder, then stops (see [`Server::stop`]).
    pub fn run_until(self, stop: &Shutdown) -> Result<u64, Error> {
        crossbeam_channel::select! {
            recv(stop.receiver()) -> _ => {}
            recv(self.shutdown.receiver()) -> _ => {}
        }
        self.stop()
    }

    /// Why the server stopped taking work, once the disk failed under it.
    pub fn failure(&self) -> Option<&str> {
        self.shutdown.failure()
    }

    /// Graceful stop: end every task stream, give clients up to `grace` to
    /// report the tasks in their hands (their result calls are still served),
    /// then refuse new calls, cancel what remains and flush the results.
    /// Returns how many results were recorded. After the disk failed there
    /// is no grace period (no result could be recorded): open calls get a
    /// bounded drain, and the recorder's error is returned.
    pub fn stop(mut self) -> Result<u64, Error> {
        // Load balancers and probes learn first that no new work is taken.
        self.health.set_serving(false);
        let failed = self.shutdown.failure().is_some();
        if failed {
            log::info!("shutting down at once: results cannot be recorded any more");
        } else {
            log::info!(
                "shutting down: task streams end; waiting up to {:?} for clients to report",
                self.grace
            );
        }
        self.shutdown.trigger();
        self.dispatcher.close_all();
        if !failed {
            let deadline = Instant::now() + self.grace;
            // A disk failing meanwhile ends the wait: nothing can be recorded.
            while self.dispatcher.in_flight() > 0
                && self.failure().is_none()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let unanswered = self.dispatcher.in_flight();
            if unanswered > 0 {
                log::warn!("{unanswered} tasks were still unanswered when the grace period ended");
            }
        }
        // Calls already open (a client's last result call) may complete; new ones are refused.
        let done = self.grpc.shutdown();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = futures::executor::block_on(done);
            let _ = tx.send(());
        });
        if rx.recv_timeout(CALLS_DRAIN).is_err() {
            self.grpc.cancel_all_calls();
            let _ = rx.recv_timeout(CALLS_DRAIN);
        }
        for p in self.producers.drain(..) {
            p.join();
        }
        if let Some(w) = self.admin_worker.take() {
            w.join();
        }
        if let Some(c) = self.clock.take() {
            let _ = c.join();
        }
        let Server {
            grpc,
            writer,
            metrics_port,
            store_runtime,
            ..
        } = self;
        drop(grpc);
        let n = writer.finish();
        // The store's last outcomes were stored by the recorder's finish.
        drop(store_runtime);
        // Served until the end: a probe sees NOT_SERVING through the drain.
        if let Some((port, stop)) = metrics_port {
            stop.trigger();
            port.join();
        }
        let n = n?;
        log::info!("server stopped; {n} results recorded");
        Ok(n)
    }
}

/// Serves on the Unix socket `path` too, readable and writable by this user
/// only (a stale socket left by a crash is replaced; any other file is not).
fn listen_admin_socket(grpc: &mut grpcio::Server, path: &std::path::Path) -> Result<(), Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| Error::file(path, "replace the old socket", e))?,
        Ok(_) => {
            return Err(Error::Usage(format!(
                "--admin-listen: {} exists and is not a socket; choose another path",
                path.display()
            )))
        }
        Err(_) => {}
    }
    let addr = format!("unix:{}", path.display());
    // Created owner-only from the start: no moment when others may connect.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o077) };
    let bound = grpc.add_listening_port(addr.clone(), ServerCredentials::insecure());
    unsafe { libc::umask(old) };
    bound.map_err(|e| Error::Bind {
        addr,
        reason: bind_reason(e),
    })?;
    // Connecting needs write permission: until now only this user had it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::file(path, "set the mode of", e))?;
    log::info!(
        "admin API also on {} (mode 0600: no token needed)",
        path.display()
    );
    Ok(())
}

fn bind_reason(e: grpcio::Error) -> String {
    match e {
        grpcio::Error::BindFail(_) => "the address is in use or not valid for this machine".into(),
        other => other.to_string(),
    }
}

/// Parses `--listen` and applies the secure default (Redis's protected mode):
/// an address other machines can reach is served only with TLS and
/// credentials, unless the operator said `--insecure`.
fn exposure_checked(config: &ServerConfig) -> Result<ListenAddr, Error> {
    let listen: ListenAddr = config
        .listen
        .parse()
        .map_err(|e| Error::Usage(format!("--listen {e}")))?;
    if config.trust.client_certs && config.tls.is_none() {
        return Err(Error::Usage(
            "--client-ca needs --tls-cert and --tls-key".into(),
        ));
    }
    let trust = &config.trust;
    let protected = config.tls.is_some() && trust.requires_credentials() && !trust.allow_anonymous;
    if !listen.is_loopback() && !protected {
        let missing = match (config.tls.is_some(), trust.requires_credentials()) {
            (false, false) => "TLS and credentials",
            (false, true) => "TLS (tokens would cross the network in clear text)",
            _ if trust.allow_anonymous => {
                "credentials for every caller (--allow-anonymous serves callers that present none)"
            }
            _ => "credentials",
        };
        if !config.insecure {
            return Err(Error::Usage(format!(
                "--listen {listen}: other machines can reach this address, but it would be served without {missing}: anyone reaching it could take tasks, run commands on agents that use --exec and forge results. Serve it with --tls-cert/--tls-key and --auth-secret or --client-ca, listen on 127.0.0.1, or pass --insecure to accept the risk"
            )));
        }
        log::warn!(
            "--insecure: serving {listen} without {missing}; anyone who can reach it can take tasks and forge results"
        );
    }
    Ok(listen)
}

/// How the listening port is protected, for the start-up line.
fn protection(config: &ServerConfig) -> String {
    let tls = match &config.tls {
        Some(t) if t.client_ca.is_some() => "mutual TLS",
        Some(_) => "TLS",
        None => "plaintext",
    };
    let creds = match (&config.trust.secret, config.trust.client_certs) {
        (Some(_), true) => "client certificates required, tokens checked when sent",
        (Some(_), false) => "tokens required",
        (None, true) => "client certificates required",
        (None, false) => "no credentials: every caller is believed",
    };
    let anonymous = if config.trust.requires_credentials() && config.trust.allow_anonymous {
        ", anonymous seed clients allowed"
    } else {
        ""
    };
    format!("{tls}, {creds}{anonymous}")
}

/// The server's clock: ack deadlines and liveness every tick, dead letters
/// to the sink, and the stats line every `stats_every`.
fn clock_loop(
    dispatcher: &Dispatcher,
    results: &ResultSink,
    auth: &Authenticator,
    stats_every: Duration,
    shutdown: &Shutdown,
) {
    let mut last = (dispatcher.counters(), Instant::now());
    let mut revocations_checked = Instant::now();
    loop {
        let stopping = shutdown.wait_timeout(TICK);
        if shutdown.failure().is_some() {
            // Nothing can be recorded: stop taking work now (task streams
            // end, no more deliveries); whoever owns the server stops the rest.
            dispatcher.close_all();
            return;
        }
        dispatcher.expire();
        // Revocation reaches streams already open, not only new calls.
        if auth.has_deny_list() && revocations_checked.elapsed() >= REVOCATION_CHECK {
            revocations_checked = Instant::now();
            auth.refresh_deny_list();
            for c in dispatcher.clients() {
                if auth.is_denied(&c.id) {
                    let _ = dispatcher.evict(&c.id, "its credentials were revoked (deny list)");
                }
            }
        }
        if results.compaction_due() {
            dispatcher.compact();
        }
        if stopping {
            return;
        }
        if last.1.elapsed() >= stats_every {
            let now = (dispatcher.counters(), Instant::now());
            let secs = now.1.duration_since(last.1).as_secs_f64().max(1e-9);
            let rate = (now.0.results - last.0.results) as f64 / secs;
            let c = now.0;
            log::info!(
                "stats: clients={} produced={} sent={} results={} redelivered={} dead={} rate={rate:.1}/s",
                dispatcher.clients().len(),
                c.produced,
                c.sent,
                c.results,
                c.redelivered,
                c.dead,
            );
            last = now;
        }
    }
}
