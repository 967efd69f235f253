//! Round-trip throughput: C clients, each handling its share of the tasks,
//! timed from the moment the clients are started (the server is up and has
//! every task) until the last one has had all its results acknowledged and
//! exited — in queue mode, until the server has counted every result (its
//! stats line, every 50 ms): a queue client that leaves after its share
//! would hand back the up to `--max-in-flight` tasks it holds, each counted
//! as a delivery, and with 64 clients leaving at once some tasks used up
//! their `--max-attempts` bouncing between them. Three implementations of the same round trip, each as real
//! processes on loopback: contact (`contact-server` + C `contact-client`s,
//! default flags), the bare grpcio ceiling (see `ceiling`) and the
//! seed-faithful Python pair (`tests/interop/seed_*.py`). A run that does
//! not get every result acknowledged fails the benchmark.

use crate::procs::{server_log, signal, Daemon, Group, Outcome, STARTUP};
use crate::Bench;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The longest a single run may take before it is called stuck.
const RUN_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Broadcast,
    Queue,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Broadcast => "broadcast",
            Mode::Queue => "queue",
        }
    }
}

/// One contact round trip.
#[derive(Debug, Clone, Copy)]
pub struct ContactRun {
    pub mode: Mode,
    /// `--state-dir` (fsync'd journal) rather than `--no-state`.
    pub state: bool,
    pub clients: usize,
    /// Tasks each client handles.
    pub per_client: u64,
    pub stall: Stall,
}

/// Part e: the timed clients alone or beside one that stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Not part e: default flags.
    NotMeasured,
    /// Part e, without the stalled client (but with the same server flags).
    Alone,
    /// Part e: a client that connects and then stops reading (SIGSTOP).
    Beside,
}

/// The time a run took and the results it got acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub secs: f64,
    pub results: u64,
}

impl Timed {
    pub fn rate(&self) -> f64 {
        self.results as f64 / self.secs
    }
}

/// Runs `run` once: see the module documentation.
pub fn contact(b: &Bench, run: ContactRun) -> Outcome<Timed> {
    let tasks = match run.mode {
        Mode::Broadcast => run.per_client,
        Mode::Queue => run.per_client * run.clients as u64,
    };
    let expected = run.per_client * run.clients as u64;
    let tasks_file = b.tasks_file(tasks)?;
    let tag = b.next_tag("contact");
    let state_dir = if run.state {
        Some(b.fresh_dir(&format!("{tag}-state"))?)
    } else {
        None
    };
    let (mut server, port) = b.contact_server(&tag, Stdio::null(), |cmd| {
        cmd.args(["--dispatch", run.mode.flag(), "--tasks-from"])
            .arg(&tasks_file);
        match &state_dir {
            Some(dir) => cmd.arg("--state-dir").arg(dir),
            None => cmd.arg("--no-state"),
        };
        if run.mode == Mode::Queue {
            cmd.args(["--stats-every", "0.05"]);
        }
        if run.stall != Stall::NotMeasured {
            // To see the stalled client attach; its tasks are still held at
            // the end, so the server need not wait long for them.
            cmd.args(["--stats-every", "0.1", "--grace", "0.5"]);
        }
    })?;
    wait_published(&mut server, tasks, &tasks_file)?;
    let addr = format!("127.0.0.1:{port}");
    let client = |id: &str, max: Option<u64>| {
        let mut c = Command::new(b.bin("contact-client"));
        c.args(["--server", &addr, "--id", id])
            .env("RUST_LOG", "warn");
        if let Some(max) = max {
            c.args(["--max-tasks", &max.to_string()]);
        }
        c
    };
    let mut stalled = Group::new();
    let mut stalled_pid = None;
    if run.stall == Stall::Beside {
        let pid = stalled.spawn(
            "stalled contact-client".into(),
            client("stalled", None),
            &b.log(&format!("{tag}-stalled")),
        )?;
        server.wait_for("the stalled client attached", STARTUP, |l| {
            server_log::stats_clients(l).filter(|&n| n >= 1)
        })?;
        signal(pid, libc::SIGSTOP);
        stalled_pid = Some(pid);
    }
    let mut clients = Group::new();
    let t0 = Instant::now();
    for i in 0..run.clients {
        let id = format!("bench-{i}");
        let log = b.log(&format!("{tag}-{id}"));
        clients.spawn(
            format!("contact-client {id}"),
            client(&id, (run.mode == Mode::Broadcast).then_some(run.per_client)),
            &log,
        )?;
    }
    let secs = match run.mode {
        Mode::Broadcast => {
            clients.wait_all(RUN_LIMIT)?;
            t0.elapsed().as_secs_f64()
        }
        Mode::Queue => {
            server.wait_for("every result", RUN_LIMIT, |l| {
                server_log::stats_results(l).filter(|&n| n >= expected)
            })?;
            let secs = t0.elapsed().as_secs_f64();
            clients.signal_all(libc::SIGTERM);
            clients.wait_all(RUN_LIMIT)?;
            secs
        }
    };
    if let Some(pid) = stalled_pid {
        signal(pid, libc::SIGCONT);
    }
    drop(stalled);
    let rest = server.stop()?;
    // Every acknowledged result is recorded once; fewer means some were lost.
    let recorded = rest
        .iter()
        .find_map(|l| server_log::results_recorded(l))
        .ok_or("contact-server did not log how many results it recorded")?;
    if recorded < expected {
        return Err(format!(
            "contact-server recorded {recorded} results, but its clients had {expected} acknowledged (log: {})",
            b.log(&format!("{tag}-server")).display()
        ));
    }
    Ok(Timed {
        secs,
        results: expected,
    })
}

/// Waits until `server` says it published all the tasks of `file`, which must be `tasks`.
pub fn wait_published(server: &mut Daemon, tasks: u64, file: &Path) -> Outcome<()> {
    let published = server.wait_for(
        "that all tasks are published",
        STARTUP,
        server_log::all_published,
    )?;
    if published != tasks {
        return Err(format!(
            "contact-server published {published} tasks from {}, expected {tasks} (log: {})",
            file.display(),
            server.log.display()
        ));
    }
    Ok(())
}

/// The bare grpcio round trip with `clients` client processes of `per_client` tasks each.
pub fn ceiling(b: &Bench, clients: usize, per_client: u64) -> Outcome<Timed> {
    let n = per_client.to_string();
    let mut server = Command::new(&b.me);
    server.args(["ceiling-server", "--tasks", &n]);
    let (secs, _) = peer_pair(b, "ceiling", server, clients, |port| {
        let mut c = Command::new(&b.me);
        c.args(["ceiling-client", "--port", &port.to_string(), "--tasks", &n]);
        c
    })?;
    Ok(Timed {
        secs,
        results: per_client * clients as u64,
    })
}

/// The seed's Python server and `clients` seed Python clients; the seed
/// server sends every task to every client, so each answers all `per_client`.
pub fn python(b: &Bench, clients: usize, per_client: u64) -> Outcome<Timed> {
    let stubs = b.python_stubs()?;
    let n = per_client.to_string();
    let mut server = Command::new(&b.python);
    server
        .arg("tests/interop/seed_server.py")
        .arg(&stubs)
        .args([&n, "1000000", "0"])
        .env("PYTHONUNBUFFERED", "1");
    let (secs, logs) = peer_pair(b, "python", server, clients, |port| {
        let mut c = Command::new(&b.python);
        c.arg("tests/interop/seed_client.py")
            .arg(&stubs)
            .arg(format!("127.0.0.1:{port}"))
            .args([&n, "1"]);
        c
    })?;
    for log in &logs {
        let last = crate::procs::last_line(log);
        if last != format!("ACKED {per_client}") {
            return Err(format!(
                "seed_client.py ended with {last:?}, not \"ACKED {per_client}\" (log: {})",
                log.display()
            ));
        }
    }
    Ok(Timed {
        secs,
        results: per_client * clients as u64,
    })
}

/// Starts `server` (it prints `LISTENING <port>`), then times `clients`
/// processes made by `client(port)` until all exited 0; returns the seconds
/// and the clients' logs. The server is killed after.
fn peer_pair(
    b: &Bench,
    what: &str,
    mut server: Command,
    clients: usize,
    client: impl Fn(u16) -> Command,
) -> Outcome<(f64, Vec<PathBuf>)> {
    let tag = b.next_tag(what);
    // Piped and left open: the ceiling server serves until its stdin closes.
    server.stdin(Stdio::piped());
    let log = b.log(&format!("{tag}-server"));
    let mut server = Daemon::start(&format!("{what} server"), server, &log, true)?;
    let port = server.wait_for("its port", STARTUP, listening_line)?;
    let logs: Vec<PathBuf> = (0..clients).map(|i| b.log(&format!("{tag}-{i}"))).collect();
    let mut group = Group::new();
    let t0 = Instant::now();
    for (i, log) in logs.iter().enumerate() {
        group.spawn(format!("{what} client {i}"), client(port), log)?;
    }
    group.wait_all(RUN_LIMIT)?;
    let secs = t0.elapsed().as_secs_f64();
    server.kill();
    Ok((secs, logs))
}

/// `LISTENING <port>`, as the ceiling and the seed server print it.
fn listening_line(line: &str) -> Option<u16> {
    line.strip_prefix("LISTENING ")?.trim().parse().ok()
}
