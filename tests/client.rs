//! The client's pipeline end to end: `--jobs N` runs that many programs at
//! once (and reports them all as working), one job keeps tasks one at a time
//! and in order, results cut off by a lost connection are sent again and
//! acknowledged once, and a quiet pipe flushes at once rather than on a timer.

mod common;

use common::*;
use contact::dispatch::Mode;
use contact::handler::Handler;
use contact::server::ServerConfig;
use contact::shutdown::Shutdown;
use std::io::{Read, Write};
use std::net::{Shutdown as SocketShutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn queue_config(results: &Path) -> ServerConfig {
    let mut c = server_config().with_results(results);
    c.dispatch.mode = Mode::Queue;
    c
}

/// An `sh -c` handler running `script` with the task as `$0`.
fn sh(script: &str) -> Handler {
    Handler::exec(&format!("sh -c '{script}'"), 1000).unwrap()
}

#[test]
fn with_jobs_3_three_programs_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let marks = dir.path().join("started");
    std::fs::create_dir(&marks).unwrap();
    let mut config = queue_config(&path);
    config.dispatch.max_in_flight = 3;
    let server = start_server(config);
    publish(&server, "t", 3);
    // Each program marks its start, then waits (up to 20 s) until three have
    // started: run one at a time, the first would see only itself.
    let m = marks.display();
    let script = format!(
        "touch {m}/$0; n=0; while [ $(ls {m} | wc -l) -lt 3 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done; echo $0 saw $(ls {m} | wc -l)"
    );
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "parallel");
    c.handler = sh(&script);
    c.jobs = 3;
    c.max_tasks = Some(3);
    let report = spawn_client(c, &stop).join().unwrap();
    assert_eq!(report.acknowledged, 3);
    let mut outputs: Vec<String> = read_results(&path)
        .iter()
        .map(|r| r["output"].as_str().unwrap().to_string())
        .collect();
    outputs.sort();
    assert_eq!(outputs, ["t-0 saw 3", "t-1 saw 3", "t-2 saw 3"]);
    server.stop().unwrap();
}

#[test]
fn one_job_runs_programs_one_at_a_time_in_the_order_they_came() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let (lock, order) = (dir.path().join("lock"), dir.path().join("order"));
    let mut config = queue_config(&path);
    config.dispatch.max_in_flight = 5;
    let server = start_server(config);
    // All five are in the client's hands at once, queued for its one job.
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "serial");
    // A program that finds another one running (the lock taken) says so.
    c.handler = sh(&format!(
        "mkdir {l} || echo overlap; echo $0 >> {o}; sleep 0.05; rmdir {l}; echo ran $0",
        l = lock.display(),
        o = order.display()
    ));
    c.max_tasks = Some(5);
    let client = spawn_client(c, &stop);
    wait_for("the client to connect", || {
        server.dispatcher().clients().len() == 1
    });
    publish(&server, "t", 5);
    assert_eq!(client.join().unwrap().acknowledged, 5);
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "t-0\nt-1\nt-2\nt-3\nt-4\n"
    );
    let results = read_results(&path);
    assert!(
        results
            .iter()
            .all(|r| r["output"].as_str().unwrap().starts_with("ran ")),
        "{results:#?}"
    );
    server.stop().unwrap();
}

#[test]
fn long_tasks_running_side_by_side_all_keep_their_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = queue_config(&path);
    // Each task runs 2.5 ack timeouts; two run at once at the agent.
    config.dispatch.ack_timeout = Duration::from_secs(1);
    config.dispatch.max_in_flight = 2;
    let server = start_server(config);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "worker");
    c.handler = sh("sleep 2.5; echo done $0");
    c.jobs = 2;
    // Status every 30 s: its progress reports follow the server's ack timeout.
    c.status_every = Duration::from_secs(30);
    let client = spawn_client(c, &stop);
    wait_for("the worker to connect", || {
        server.dispatcher().clients().len() == 1
    });
    publish(&server, "long", 2);
    wait_for("both tasks answered", || {
        accepted_per_task(&read_results(&path)).len() == 2
    });
    stop.trigger();
    client.join().unwrap();
    server.stop().unwrap();
    let results = read_results(&path);
    assert!(
        results
            .iter()
            .all(|r| r["accepted"] == true && r["attempt"] == 1 && r["stale"] == false),
        "neither task was delivered again: {results:#?}"
    );
    assert_eq!(results.len(), 2, "{results:#?}");
}

/// A TCP proxy whose client-to-server direction can be frozen (bytes stay
/// in the sockets' buffers) and whose connections can all be cut at once.
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(vec![]));
        let (f, c) = (frozen.clone(), conns.clone());
        std::thread::spawn(move || {
            for down in listener.incoming().map_while(Result::ok) {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                c.lock()
                    .unwrap()
                    .extend([down.try_clone().unwrap(), up.try_clone().unwrap()]);
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                pump(down, up, Some(f.clone()));
                pump(u2, d2, None);
            }
        });
        Proxy {
            port,
            frozen,
            conns,
        }
    }

    fn freeze_uploads(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    fn cut_all(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(SocketShutdown::Both);
        }
    }
}

/// Copies `from` to `to` on a thread; while `frozen` is set it reads nothing.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: Option<Arc<AtomicBool>>) {
    std::thread::spawn(move || {
        from.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut buf = [0u8; 16384];
        loop {
            if frozen.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(SocketShutdown::Both);
    });
}

#[test]
fn results_cut_off_by_a_lost_connection_are_sent_again_and_acknowledged_once() {
    const N: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = queue_config(&path);
    config.dispatch.max_in_flight = 64;
    let server = start_server(config);
    let proxy = Proxy::start(server.port());
    let stop = Shutdown::new();
    let c = client_config(proxy.port, "cut");
    let client = spawn_client(c, &stop);
    wait_for("the client to connect", || {
        server.dispatcher().clients().len() == 1
    });
    publish(&server, "t", N);
    wait_for("some results recorded", || read_results(&path).len() >= 50);
    // The server keeps sending; the client's results (and the ends of its
    // calls) stay in the frozen direction until the server has 64 tasks out.
    proxy.freeze_uploads(true);
    wait_for(
        "the client to hold a full window of unreported results",
        || {
            server
                .dispatcher()
                .clients()
                .iter()
                .any(|c| c.in_flight == 64)
        },
    );
    proxy.cut_all();
    proxy.freeze_uploads(false);
    wait_for("every task answered after the client came back", || {
        server.dispatcher().unfinished() == 0 && accepted_per_task(&read_results(&path)).len() == N
    });
    stop.trigger();
    let report = client.join().unwrap();
    server.stop().unwrap();
    assert!(report.connections >= 2, "{report:?}");
    let per_task = accepted_per_task(&read_results(&path));
    assert_eq!(per_task.len(), N);
    assert!(
        per_task.values().all(|&n| n == 1),
        "one accepted result per task"
    );
    // Every answer the client made was acknowledged, and only once.
    assert_eq!(report.acknowledged, report.handled, "{report:?}");
}

#[test]
fn a_quiet_pipe_flushes_at_once_not_on_the_ack_timer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(queue_config(&path));
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "prompt");
    // Calls are completed only every hour or million results: whatever the
    // server sees before then was flushed because nothing more was ready.
    c.ack_interval = Duration::from_secs(3600);
    c.ack_every = 1_000_000;
    let client = spawn_client(c, &stop);
    wait_for("the client to connect", || {
        server.dispatcher().clients().len() == 1
    });
    // A lone task, then a burst.
    publish(&server, "lone", 1);
    wait_for("the lone result at the server", || {
        server.dispatcher().unfinished() == 0
    });
    publish(&server, "burst", 50);
    wait_for("the burst's results at the server", || {
        server.dispatcher().unfinished() == 0
    });
    stop.trigger();
    let report = client.join().unwrap();
    assert_eq!(report.acknowledged, 51, "{report:?}");
    server.stop().unwrap();
    assert_eq!(accepted_per_task(&read_results(&path)).len(), 51);
}
