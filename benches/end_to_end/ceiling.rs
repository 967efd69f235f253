//! The ceiling: the same round trip as contact's, done by a bare grpcio
//! program on the same `Contact` service — the server pushes N tasks on each
//! `getTask` stream, the client answers each on a `tellResult` stream, both
//! sides writing in batches of up to 64 with `buffer_hint` (flushing as soon
//! as nothing more is ready) — with no dispatcher, no bookkeeping and no
//! disk. Like contact's (`--max-in-flight`), the server keeps at most
//! [`WINDOW`] tasks unanswered per connection: without a window it buffers
//! all N tasks in C-core at once and runs at half the speed. The benchmark runs its server and clients as processes of their own
//! (this same program, `ceiling-server` and `ceiling-client`), as it runs
//! contact's, so the two are timed the same way.

use contact::proto::{self, ClientMsg, Contact, ContactClient, Empty, ResultMsg, ServerMsg};
use futures::task::AtomicWaker;
use futures::{FutureExt, SinkExt, StreamExt};
use grpcio::{
    ChannelBuilder, ClientStreamingSink, DuplexSink, EnvBuilder, Environment, RequestStream,
    RpcContext, RpcStatus, RpcStatusCode, ServerBuilder, ServerCredentials, ServerStreamingSink,
    WriteFlags,
};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

/// Messages written before one flush, on both sides.
const BATCH: usize = 64;

/// Tasks a connection may have unanswered at most (contact's default
/// `--max-in-flight`).
const WINDOW: u64 = 256;

/// One connection's answered count, shared by its two calls (matched by the
/// peer address), and the task stream waiting for it to grow.
#[derive(Default)]
struct Window {
    answered: AtomicU64,
    waiting: AtomicWaker,
}

impl Window {
    async fn reach(&self, answered: u64) {
        poll_fn(|cx| {
            self.waiting.register(cx.waker());
            if self.answered.load(Ordering::Acquire) >= answered {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn answer(&self) {
        self.answered.fetch_add(1, Ordering::AcqRel);
        self.waiting.wake();
    }
}

#[derive(Clone)]
struct Pusher {
    windows: Arc<Mutex<HashMap<String, Arc<Window>>>>,
    tasks: u64,
}

impl Pusher {
    fn window(&self, ctx: &RpcContext) -> Arc<Window> {
        let mut windows = self.windows.lock().unwrap();
        windows.entry(ctx.peer()).or_default().clone()
    }
}

impl Contact for Pusher {
    fn send_status(
        &mut self,
        ctx: RpcContext,
        _stream: RequestStream<ClientMsg>,
        sink: DuplexSink<ResultMsg>,
    ) {
        ctx.spawn(async move {
            let _ = sink
                .fail(RpcStatus::new(RpcStatusCode::UNIMPLEMENTED))
                .await;
        });
    }

    fn get_task(&mut self, ctx: RpcContext, _req: Empty, mut sink: ServerStreamingSink<ServerMsg>) {
        let n = self.tasks;
        let window = self.window(&ctx);
        ctx.spawn(async move {
            let res: grpcio::Result<()> = async {
                let mut i = 0;
                while i < n {
                    let end = (i + BATCH as u64).min(n);
                    window.reach(end.saturating_sub(WINDOW)).await;
                    for id in i + 1..=end {
                        let msg = ServerMsg {
                            task: format!("job-{id}"),
                            task_id: id,
                            attempt: 1,
                            ..Default::default()
                        };
                        sink.feed((msg, WriteFlags::default().buffer_hint(id < end)))
                            .await?;
                    }
                    sink.flush().await?;
                    i = end;
                }
                sink.close().await
            }
            .await;
            if let Err(e) = res {
                eprintln!("ceiling-server: task stream ended: {e}");
            }
        });
    }

    fn tell_result(
        &mut self,
        ctx: RpcContext,
        mut stream: RequestStream<ResultMsg>,
        sink: ClientStreamingSink<Empty>,
    ) {
        let window = self.window(&ctx);
        ctx.spawn(async move {
            let mut n = 0u64;
            while let Some(r) = stream.next().await {
                match r {
                    Ok(_) => {
                        n += 1;
                        window.answer();
                    }
                    Err(e) => {
                        eprintln!("ceiling-server: result stream failed after {n}: {e}");
                        return;
                    }
                }
            }
            let _ = sink.success(Empty::default()).await;
        });
    }
}

/// `ceiling-server TASKS`: serves on a free loopback port, prints
/// `LISTENING <port>` and serves until killed.
pub fn server_main(tasks: u64) -> i32 {
    let env = Arc::new(Environment::new(2));
    let service = proto::create_contact(Pusher {
        tasks,
        windows: Arc::default(),
    });
    let mut server = match ServerBuilder::new(env).register_service(service).build() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ceiling-server: {e}");
            return 1;
        }
    };
    let port = match server.add_listening_port("127.0.0.1:0", ServerCredentials::insecure()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ceiling-server: cannot listen on 127.0.0.1: {e}");
            return 1;
        }
    };
    server.start();
    println!("LISTENING {port}");
    let _ = std::io::stdout().flush();
    // Serves until the benchmark closes our stdin (or kills us).
    for _ in std::io::stdin().lock().lines() {}
    0
}

/// `ceiling-client PORT TASKS`: one task stream and one result stream; exits
/// 0 once all TASKS were answered and the server acknowledged them. The
/// round trip runs on grpcio's completion-queue thread (no hop to another
/// thread per message); this thread only waits for its outcome.
pub fn client_main(port: u16, tasks: u64) -> i32 {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let channel = ChannelBuilder::new(env).connect(&format!("127.0.0.1:{port}"));
    let client = ContactClient::new(channel);
    let (tx, rx) = std::sync::mpsc::channel();
    let on_cq = client.clone();
    client.spawn(async move {
        let _ = tx.send(round_trip(&on_cq, tasks).await);
    });
    match rx.recv() {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("ceiling-client: {e}");
            1
        }
        Err(_) => {
            eprintln!("ceiling-client: the round trip ended without an outcome");
            1
        }
    }
}

async fn round_trip(client: &ContactClient, tasks: u64) -> Result<(), String> {
    let err = |what: &str, e: grpcio::Error| format!("{what}: {e}");
    let mut incoming = client
        .get_task(&Empty::default())
        .map_err(|e| err("getTask", e))?;
    let (mut results, ack) = client.tell_result().map_err(|e| err("tellResult", e))?;
    let mut answered = 0u64;
    'stream: loop {
        let Some(first) = incoming.next().await else {
            break;
        };
        let mut batch = vec![first.map_err(|e| err("task stream", e))?];
        while batch.len() < BATCH {
            match incoming.next().now_or_never() {
                Some(Some(t)) => batch.push(t.map_err(|e| err("task stream", e))?),
                Some(None) => {
                    write_batch(&mut results, batch, &mut answered).await?;
                    break 'stream;
                }
                None => break,
            }
        }
        write_batch(&mut results, batch, &mut answered).await?;
    }
    results
        .close()
        .await
        .map_err(|e| err("closing results", e))?;
    ack.await.map_err(|e| err("result acknowledgement", e))?;
    if answered != tasks {
        return Err(format!("answered {answered} tasks, expected {tasks}"));
    }
    Ok(())
}

async fn write_batch(
    results: &mut grpcio::ClientCStreamSender<ResultMsg>,
    batch: Vec<ServerMsg>,
    answered: &mut u64,
) -> Result<(), String> {
    let last = batch.len() - 1;
    for (i, t) in batch.into_iter().enumerate() {
        let r = ResultMsg {
            ret: format!("client received task: {}", t.task),
            task_id: t.task_id,
            attempt: t.attempt,
            ok: true,
            ..Default::default()
        };
        results
            .feed((r, WriteFlags::default().buffer_hint(i < last)))
            .await
            .map_err(|e| format!("results: {e}"))?;
        *answered += 1;
    }
    results.flush().await.map_err(|e| format!("results: {e}"))
}
