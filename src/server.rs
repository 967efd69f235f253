//! The server: the `Contact` gRPC service on grpcio's thread pools, and
//! `Server`, which wires it to the dispatcher, the producers, the result
//! sink and the stats line, and shuts it all down without losing a result.
//!
//! Handlers never block a completion-queue thread: each call becomes a
//! future on grpcio's executor (`ctx.spawn`) that only touches the
//! dispatcher's lock and non-blocking channels; files and producers live on
//! threads of ours.

use crate::dispatch::{Answer, DispatchConfig, Dispatcher};
use crate::error::Error;
use crate::feed::TaskFeed;
use crate::journal::Journal;
use crate::producer::{Producer, TaskSource};
use crate::proto::{self, ClientMsg, Contact, Empty, ResultMsg, ServerMsg};
use crate::results::{ResultSink, ResultWriter, SinkConfig};
use crate::shutdown::Shutdown;
use futures::future::poll_fn;
use futures::{SinkExt, StreamExt, TryStreamExt};
use grpcio::{
    ChannelBuilder, ClientStreamingSink, DuplexSink, Environment, RequestStream, RpcContext,
    RpcStatus, RpcStatusCode, ServerBuilder, ServerCredentials, ServerStreamingSink, WriteFlags,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Deliveries written to a stream before one flush: enough to amortise the
/// write completion, small enough to keep a fair share between clients.
const MAX_WRITE_BATCH: usize = 256;

/// How long stopping waits for open calls to complete before cancelling them.
const CALLS_DRAIN: Duration = Duration::from_secs(2);

/// Stale results one `tellResult` call may carry before it is refused.
const MAX_STALE_PER_CALL: usize = 10_000;

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
    /// Append every task given up on as one JSON object per line.
    pub dead_letters: Option<PathBuf>,
    /// Keep the durable state (journal) here; `None` keeps state in memory only.
    pub state_dir: Option<PathBuf>,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:50051".into(),
            sources: vec![],
            dispatch: DispatchConfig::default(),
            results_to: None,
            dead_letters: None,
            state_dir: None,
            compact_bytes: 64 << 20,
            stats_every: Duration::from_secs(5),
            grace: Duration::from_secs(5),
            max_message_bytes: 1 << 20,
            keepalive: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// The gRPC service: cheap to clone, one clone per completion queue.
#[derive(Clone)]
struct ContactService {
    dispatcher: Arc<Dispatcher>,
    results: ResultSink,
}

/// Who is calling: the `contact-client-id` metadata, or for a seed peer that
/// sends none, its address (results are then matched by connection).
fn caller(ctx: &RpcContext) -> Result<(String, bool), RpcStatus> {
    match proto::client_id_from(ctx.request_headers()) {
        Ok(Some(id)) => Ok((id, false)),
        Ok(None) => Ok((ctx.peer(), true)),
        Err(why) => Err(RpcStatus::with_message(
            RpcStatusCode::INVALID_ARGUMENT,
            why,
        )),
    }
}

/// Rejects a call whose metadata is unusable, saying why.
macro_rules! caller_or_reject {
    ($ctx:expr, $sink:expr) => {
        match caller(&$ctx) {
            Ok(c) => c,
            Err(status) => {
                log::warn!("rejected a call from {}: {}", $ctx.peer(), status.message());
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
        let (client, _) = caller_or_reject!(ctx, sink);
        let dispatcher = self.dispatcher.clone();
        ctx.spawn(async move {
            let res: grpcio::Result<()> = async {
                while let Some(msg) = stream.try_next().await? {
                    dispatcher.touch(&client);
                    log::info!("status from {client}: {}", msg.msg);
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
        let (client, ephemeral) = caller_or_reject!(ctx, sink);
        let incarnation = self.dispatcher.incarnation();
        let Some((session, mut feed)) = self.dispatcher.attach(&client, &ctx.peer(), ephemeral)
        else {
            let status = RpcStatus::with_message(
                RpcStatusCode::UNAVAILABLE,
                "the server is shutting down".into(),
            );
            ctx.spawn(async move {
                let _ = sink.fail(status).await;
            });
            return;
        };
        let dispatcher = self.dispatcher.clone();
        ctx.spawn(async move {
            let res = forward(&mut feed, &mut sink, &incarnation).await;
            dispatcher.detach(&client, session);
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
        let (client, ephemeral) = caller_or_reject!(ctx, sink);
        let dispatcher = self.dispatcher.clone();
        let results = self.results.clone();
        ctx.spawn(async move {
            let mut stale = 0usize;
            let res: grpcio::Result<()> = async {
                while let Some(r) = stream.try_next().await? {
                    let answer = Answer {
                        task_id: r.task_id,
                        attempt: r.attempt,
                        ok: r.ok,
                        retry: r.retry,
                        output: r.ret,
                        incarnation: r.incarnation,
                    };
                    // Recorded by the dispatcher; a flood of results that answer
                    // nothing is cut off rather than written to disk forever.
                    if dispatcher
                        .complete(&client, answer)
                        .is_some_and(|r| r.stale)
                    {
                        stale += 1;
                        if stale > MAX_STALE_PER_CALL {
                            let why = format!(
                                "more than {MAX_STALE_PER_CALL} results in one call answer no task"
                            );
                            return Err(grpcio::Error::RpcFailure(RpcStatus::with_message(
                                RpcStatusCode::INVALID_ARGUMENT,
                                why,
                            )));
                        }
                    }
                }
                Ok(())
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
                    let status = RpcStatus::with_message(
                        RpcStatusCode::INTERNAL,
                        "results could not be recorded".into(),
                    );
                    let _ = sink.fail(status).await;
                }
                (Err(grpcio::Error::RpcFailure(status)), _)
                    if status.code() == RpcStatusCode::INVALID_ARGUMENT =>
                {
                    log::warn!("result stream of {client} refused: {}", status.message());
                    let _ = sink.fail(status).await;
                }
                (Err(e), _) => log::debug!("result stream of {client} ended: {e}"),
            }
        });
    }
}

/// Writes the feed's deliveries into the stream, a batch per flush, until the
/// dispatcher ends the feed (clean end) or the client goes away (error).
async fn forward(
    feed: &mut TaskFeed,
    sink: &mut ServerStreamingSink<ServerMsg>,
    incarnation: &str,
) -> grpcio::Result<()> {
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
        let Some(first) = next else { break };
        let mut batch = vec![first];
        while batch.len() < MAX_WRITE_BATCH {
            match feed.try_next() {
                Some(d) => batch.push(d),
                None => break,
            }
        }
        let last = batch.len() - 1;
        for (i, d) in batch.into_iter().enumerate() {
            let msg = ServerMsg {
                task: d.task.text.clone(),
                task_id: d.task.id,
                attempt: d.attempt,
                incarnation: incarnation.to_string(),
                ..Default::default()
            };
            // Buffer all but the last write of a batch; the flush sends them together.
            sink.feed((msg, WriteFlags::default().buffer_hint(i < last)))
                .await?;
        }
        sink.flush().await?;
    }
    sink.close().await
}

/// A running server. Dropping it without [`Server::stop`] cancels every call.
pub struct Server {
    grpc: grpcio::Server,
    port: u16,
    dispatcher: Arc<Dispatcher>,
    writer: ResultWriter,
    producers: Vec<Producer>,
    clock: Option<JoinHandle<()>>,
    shutdown: Shutdown,
    grace: Duration,
}

impl Server {
    /// Binds, starts serving and starts the producers.
    pub fn start(config: ServerConfig) -> Result<Server, Error> {
        let (journal, records) = match &config.state_dir {
            Some(dir) => {
                let (j, r) = Journal::open(dir)?;
                (Some(j), r)
            }
            None => (None, vec![]),
        };
        let durable = journal.is_some();
        let (results, writer) = ResultSink::start(SinkConfig {
            results: config.results_to.as_deref(),
            dead_letters: config.dead_letters.as_deref(),
            journal: journal.map(|j| (j, &records[..])),
            compact_bytes: config.compact_bytes,
        })?;
        let dispatcher = Arc::new(Dispatcher::recording(
            config.dispatch.clone(),
            results.clone(),
            durable,
        ));
        if let Some(dir) = &config.state_dir {
            let r = dispatcher.restore(&records)?;
            log::info!(
                "state {}: {} tasks ({} unfinished), {} known clients restored",
                dir.display(),
                r.tasks,
                r.unfinished,
                r.clients
            );
            // Start from a compact journal: it also drops a torn tail for good.
            dispatcher.compact();
        }
        drop(records);
        let env = Arc::new(Environment::new(2));
        let service = ContactService {
            dispatcher: dispatcher.clone(),
            results: results.clone(),
        };
        let max_msg = i32::try_from(config.max_message_bytes).unwrap_or(i32::MAX);
        let args = ChannelBuilder::new(env.clone())
            .max_receive_message_len(max_msg)
            .max_send_message_len(max_msg)
            .keepalive_time(config.keepalive)
            .keepalive_timeout(config.keepalive_timeout)
            .keepalive_permit_without_calls(true)
            // Accept client pings down to MIN_CLIENT_PING apart, so that a
            // client's keepalive never earns a GOAWAY "too_many_pings".
            .http2_min_recv_ping_interval_without_data(MIN_CLIENT_PING)
            .build_args();
        let mut grpc = ServerBuilder::new(env)
            .channel_args(args)
            .register_service(proto::create_contact(service))
            .build()?;
        let port = grpc
            .add_listening_port(config.listen.clone(), ServerCredentials::insecure())
            .map_err(|e| Error::Bind {
                addr: config.listen.clone(),
                reason: bind_reason(e),
            })?;
        grpc.start();
        log::info!(
            "contact server listening on {}",
            with_port(&config.listen, port)
        );

        let shutdown = Shutdown::new();
        let mut server = Server {
            grpc,
            port,
            dispatcher: dispatcher.clone(),
            writer,
            producers: vec![],
            clock: None,
            shutdown: shutdown.clone(),
            grace: config.grace,
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
                .spawn(move || clock_loop(&dispatcher, &results, every, &shutdown))
                .map_err(Error::Thread)?,
        );
        Ok(server)
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The dispatcher, to publish tasks or inspect clients from outside gRPC.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }

    /// Graceful stop: end every task stream, give clients up to `grace` to
    /// report the tasks in their hands (their result calls are still served),
    /// then refuse new calls, cancel what remains and flush the results.
    /// Returns how many results were recorded.
    pub fn stop(mut self) -> Result<u64, Error> {
        log::info!(
            "shutting down: task streams end; waiting up to {:?} for clients to report",
            self.grace
        );
        self.shutdown.trigger();
        self.dispatcher.close_all();
        let deadline = Instant::now() + self.grace;
        while self.dispatcher.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let unanswered = self.dispatcher.in_flight();
        if unanswered > 0 {
            log::warn!("{unanswered} tasks were still unanswered when the grace period ended");
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
        if let Some(c) = self.clock.take() {
            let _ = c.join();
        }
        let Server { grpc, writer, .. } = self;
        drop(grpc);
        let n = writer.finish()?;
        log::info!("server stopped; {n} results recorded");
        Ok(n)
    }
}

fn bind_reason(e: grpcio::Error) -> String {
    match e {
        grpcio::Error::BindFail(_) => "the address is in use or not valid for this machine".into(),
        other => other.to_string(),
    }
}

fn with_port(listen: &str, port: u16) -> String {
    match listen.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{port}"),
        None => listen.to_string(),
    }
}

/// The server's clock: ack deadlines and liveness every tick, dead letters
/// to the sink, and the stats line every `stats_every`.
fn clock_loop(
    dispatcher: &Dispatcher,
    results: &ResultSink,
    stats_every: Duration,
    shutdown: &Shutdown,
) {
    let mut last = (dispatcher.counters(), Instant::now());
    loop {
        let stopping = shutdown.wait_timeout(TICK);
        dispatcher.expire();
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
