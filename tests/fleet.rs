//! A fleet on one server: the server binary and the `contact-load` generator
//! holding 1,000 agents (each its own client id, 33 to a connection): all
//! attach, a broadcast reaches all and every result is recorded, and after a
//! mass disconnect all come back, while a normal `contact-client` is served
//! throughout. The generator's numbers are printed; only sanity bounds are
//! asserted.

mod common;

use common::*;
use contact::shutdown::Shutdown;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LOAD_BIN: &str = env!("CARGO_BIN_EXE_contact-load");

const AGENTS: usize = 1000;

/// A FIFO held open for reading and writing by the test, so that the server
/// neither blocks opening it nor sees its end when the generator exits.
struct Fifo {
    path: PathBuf,
    _held: File,
}

impl Fifo {
    fn new(path: &Path) -> Fifo {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Fifo {
            path: path.to_path_buf(),
            _held: held,
        }
    }
}

/// What the generator printed (one JSON object per phase) and its exit status.
struct LoadRun {
    phases: BTreeMap<String, serde_json::Value>,
    status: i32,
    stderr: String,
}

/// Runs `contact-load` to its end, killing it if it outlives `limit`.
fn run_load(args: &[&str], limit: Duration) -> LoadRun {
    let mut child = Command::new(LOAD_BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("contact-load starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "contact-load did not finish within {limit:?}; stderr: {}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let phases = stdout
        .join()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .map(|v| (v["phase"].as_str().expect("phase").to_string(), v))
        .collect();
    LoadRun {
        phases,
        status,
        stderr: stderr.join().unwrap(),
    }
}

#[test]
fn a_thousand_agents_attach_take_a_broadcast_and_all_come_back_after_a_mass_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = Fifo::new(&dir.path().join("tasks"));
    let results = dir.path().join("results.jsonl");
    let state = dir.path().join("state");
    let mut server = Proc::start(
        SERVER_BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tasks-from",
            fifo.path.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--results-to",
            results.to_str().unwrap(),
            "--stats-every",
            "1",
        ],
    );
    let port = port_of_listening_line(&server.wait_line("listening on"));
    let addr = format!("127.0.0.1:{port}");

    // A normal agent, connected before and throughout.
    let stop = Shutdown::new();
    let normal = spawn_client(client_config(port, "normal"), &stop);
    wait_for("the normal agent to connect", || {
        server
            .lines_so_far()
            .iter()
            .any(|l| l.contains("client normal connected"))
    });

    let pid = server.child.id().to_string();
    let agents = AGENTS.to_string();
    let load = run_load(
        &[
            "--server",
            &addr,
            "--tasks-to",
            fifo.path.to_str().unwrap(),
            "--server-pid",
            &pid,
            "--agents",
            &agents,
            "--reconnect-after",
            "1",
            "--phase-timeout",
            "40",
        ],
        Duration::from_secs(150),
    );
    eprintln!("{}", load.stderr);
    for phase in load.phases.values() {
        eprintln!("{phase}");
    }
    assert_eq!(load.status, 0, "every phase completes: {}", load.stderr);
    for name in ["attach", "broadcast", "reconnect"] {
        let p = &load.phases[name];
        assert_eq!(p["complete"], true, "{name}: {p}");
        assert_eq!(p["received"], AGENTS, "{name}: {p}");
        assert_eq!(p["acknowledged"], AGENTS, "{name}: {p}");
    }
    let disconnect = &load.phases["disconnect"];
    assert_eq!(
        disconnect["complete"], true,
        "the server closed every connection: {disconnect}"
    );
    let attach = &load.phases["attach"];
    assert_eq!(attach["connections"], AGENTS.div_ceil(33));
    // Sanity only: far above what it takes (tens of KiB per agent).
    let per_agent = attach["server_rss_per_agent_kib"].as_f64().unwrap();
    assert!(per_agent < 1024.0, "{per_agent} KiB per agent");
    assert!(
        attach["loadgen_threads"].as_u64().unwrap() < 32,
        "agents are futures, not threads: {attach}"
    );

    // Every agent's three results are on record, accepted once each.
    let tasks: BTreeSet<String> = read_results(&results)
        .iter()
        .filter_map(|r| r["task"].as_str())
        .filter(|t| t.starts_with("contact-load "))
        .map(String::from)
        .collect();
    assert_eq!(
        tasks.len(),
        3,
        "attach, broadcast and reconnect tasks: {tasks:?}"
    );
    let mut answered: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in read_results(&results) {
        if r["accepted"] == true && r["client"].as_str().unwrap().starts_with("load-") {
            let fresh = answered
                .entry(r["client"].as_str().unwrap().to_string())
                .or_default()
                .insert(r["task"].as_str().unwrap().to_string());
            assert!(fresh, "one accepted result per agent and task: {r}");
        }
    }
    assert_eq!(answered.len(), AGENTS);
    assert!(answered.values().all(|t| *t == tasks));

    // The normal agent was served throughout: it answered the three tasks
    // (one published while a thousand agents were away) on its first connection.
    wait_for("the normal agent's results", || {
        accepted_ids(&read_results(&results), "normal").len() == 3
    });
    for r in read_results(&results) {
        if r["client"] == "normal" {
            eprintln!(
                "normal agent: {} answered in {} ms",
                r["task"], r["latency_ms"]
            );
            assert!(r["latency_ms"].as_f64().unwrap() < 10_000.0, "{r}");
        }
    }
    stop.trigger();
    assert_eq!(normal.join().unwrap().connections, 1, "never disconnected");
    server.signal("INT");
    assert_eq!(server.wait_exit(), 0);
}

/// A peer that streams status messages on many calls of one connection
/// without ever reading the replies: the server stops reading each call once
/// its reply is stuck, and what the peer may still send is buffered. It must
/// stay within each call's fixed window, not grow with the traffic.
#[test]
fn status_floods_that_never_read_a_reply_are_buffered_within_fixed_windows() {
    use futures::SinkExt;
    let mut server = Proc::start(
        SERVER_BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-state",
            "--tasks-from",
            "/dev/null",
        ],
    );
    let port = port_of_listening_line(&server.wait_line("listening on"));
    let pid = server.child.id().to_string();
    let rss = || {
        contact::loadgen::ProcSample::of(&pid)
            .rss_kib
            .expect("server RSS")
    };
    // A client whose own windows stay small, so that it buffers little of
    // the replies it does not read.
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    let channel = grpcio::ChannelBuilder::new(env)
        .http2_bdp_probe(false)
        .connect(&format!("127.0.0.1:{port}"));
    let client = contact::proto::ContactClient::new(channel);
    const CALLS: usize = 90;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let before = rss();
    let mut calls = vec![];
    for i in 0..CALLS {
        let (mut tx, replies) = client
            .send_status_opt(as_client(&format!("flood-{i}")))
            .unwrap();
        let sent = sent.clone();
        client.spawn(async move {
            let msg = contact::proto::ClientMsg {
                msg: "x".repeat(16 << 10),
                ..Default::default()
            };
            while tx
                .send((msg.clone(), grpcio::WriteFlags::default()))
                .await
                .is_ok()
            {
                sent.fetch_add(msg.msg.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        });
        calls.push(replies);
    }
    // Until nothing more goes through: every call is stuck on its window.
    let mut last = u64::MAX;
    wait_for("the flood to stall", || {
        std::thread::sleep(Duration::from_millis(500));
        let now = sent.load(std::sync::atomic::Ordering::Relaxed);
        let stalled = now == last && now > 0;
        last = now;
        stalled
    });
    let grown = rss().saturating_sub(before);
    eprintln!(
        "{CALLS} calls sent {} KiB before stalling; the server grew by {grown} KiB",
        last >> 10
    );
    // 64 KiB of window per call, the replies stuck on their way out, and
    // room for the allocator: with windows that grow (BDP probing) it was
    // gigabytes.
    assert!(
        grown < (CALLS as u64) * 512,
        "server grew by {grown} KiB for {CALLS} stalled calls"
    );
    drop(calls);
    server.signal("INT");
    assert_eq!(server.wait_exit(), 0);
}
