//! Part g: the NATS JetStream store (`contact-server --store`, issue 12)
//! beside the embedded journal, in queue mode. Each [`Setup`] is a store
//! (the journal, one NATS node, three nodes keeping three copies) and a
//! number of `contact-server` replicas sharing the clients; for each, the
//! round trip of part a (C `contact-client`s, default flags) and what it
//! cost: the NATS nodes' messages and bytes per task (their `/varz`), the
//! replicas' own traffic with NATS (`/connz`), and the CPU time per task of
//! the replicas and of the NATS nodes (`/proc`).
//!
//! Every run starts fresh NATS nodes. The first replica publishes the
//! tasks (`--tasks-from`, into `CONTACT_TASKS`); the second, if any, starts
//! once they are published, with an empty `--tasks-from`; client i is
//! served by replica i mod replicas.
//! The clock runs from the clients' start until `CONTACT_OUTCOMES` holds
//! an outcome for every task (asked of the monitoring port, which sends no
//! NATS message); the counters run from before the first replica starts
//! until then, so they include publishing the tasks. Afterwards the outcome
//! stream is read back: every task must have exactly one outcome, an
//! accepted result, or the run fails. The journal's runs end as part a's
//! do (the server has counted every result).

use crate::nats::{Counters, Nats};
use crate::procs::{cpu_seconds, server_log, Daemon, Group, Outcome};
use crate::roundtrip::{wait_published, Timed};
use crate::Bench;
use futures::StreamExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The longest a single run may take before it is called stuck.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// How long the outcomes may stop growing before the run is called stuck.
const STALLED: Duration = Duration::from_secs(20);

/// Where the fleet's state is, and how many replicas serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// NATS nodes; 0: the embedded journal (`--state-dir`).
    pub nodes: usize,
    /// `--store-replicas`.
    pub copies: usize,
    /// `contact-server` processes sharing the clients.
    pub replicas: usize,
}

/// The setups part g compares, in the table's order.
pub const SETUPS: [Setup; 4] = [
    Setup {
        nodes: 0,
        copies: 1,
        replicas: 1,
    },
    Setup {
        nodes: 1,
        copies: 1,
        replicas: 1,
    },
    Setup {
        nodes: 3,
        copies: 3,
        replicas: 1,
    },
    Setup {
        nodes: 3,
        copies: 3,
        replicas: 2,
    },
];

impl Setup {
    pub fn is_journal(&self) -> bool {
        self.nodes == 0
    }

    pub fn label(&self) -> String {
        if self.is_journal() {
            return "embedded journal (--state-dir)".into();
        }
        let node = if self.nodes == 1 { "node" } else { "nodes" };
        format!("--store, {} NATS {node}, R{}", self.nodes, self.copies)
    }

    /// The flags that put a server's state here (`url`: the NATS nodes').
    fn state_flags(&self, cmd: &mut Command, url: &str, state_dir: &std::path::Path) {
        if self.is_journal() {
            cmd.arg("--state-dir").arg(state_dir);
        } else {
            cmd.args(["--store", url, "--store-replicas", &self.copies.to_string()]);
        }
    }
}

/// One run of a setup.
#[derive(Debug, Clone, Copy)]
pub struct StoreRun {
    pub timed: Timed,
    /// Differences over the run; `None` for the journal.
    pub nats: Option<Counters>,
    /// CPU time of the `contact-server` replicas over the run.
    pub server_cpu_secs: f64,
}

/// A setup's runs at one number of clients.
#[derive(Debug, Clone)]
pub struct StoreSeries {
    pub setup: Setup,
    pub clients: usize,
    pub tasks: u64,
    pub runs: Vec<StoreRun>,
    /// Runs that lost or doubled a task, or did not finish: why.
    pub failed: Vec<String>,
}

/// Runs `setup` once with `clients` clients sharing `tasks` queue tasks.
pub fn round_trip(b: &Bench, setup: Setup, clients: usize, tasks: u64) -> Outcome<StoreRun> {
    let tasks_file = b.tasks_file(tasks)?;
    let no_tasks = b.tasks_file(0)?;
    let tag = b.next_tag(if setup.is_journal() {
        "store-journal"
    } else {
        "store-nats"
    });
    let nats = if setup.is_journal() {
        None
    } else {
        Some(Nats::start(b, &tag, setup.nodes)?)
    };
    let url = nats.as_ref().map(Nats::url).unwrap_or_default();
    let state_dir = b.work.join(format!("{tag}-state"));
    let before = nats.as_ref().map(Nats::counters).transpose()?;
    let mut servers: Vec<(Daemon, u16)> = vec![];
    for i in 0..setup.replicas {
        let (mut server, port) = b.contact_server(&format!("{tag}-{i}"), Stdio::null(), |cmd| {
            cmd.args(["--dispatch", "queue", "--stats-every", "0.05"]);
            setup.state_flags(cmd, &url, &state_dir);
            // The others read an empty file: without --tasks-from a
            // server runs the seed's generator, into the shared stream.
            cmd.arg("--tasks-from")
                .arg(if i == 0 { &tasks_file } else { &no_tasks });
        })?;
        if i == 0 {
            wait_published(&mut server, tasks, &tasks_file)?;
        }
        servers.push((server, port));
    }
    let cpu_before: f64 = servers
        .iter()
        .filter_map(|(s, _)| cpu_seconds(s.pid()))
        .sum();
    let mut group = Group::new();
    let t0 = Instant::now();
    for i in 0..clients {
        let id = format!("bench-{i}");
        let port = servers[i % servers.len()].1;
        let mut c = Command::new(b.bin("contact-client"));
        c.args(["--server", &format!("127.0.0.1:{port}"), "--id", &id])
            .env("RUST_LOG", "warn");
        group.spawn(
            format!("contact-client {id}"),
            c,
            &b.log(&format!("{tag}-{id}")),
        )?;
    }
    let secs = match &nats {
        None => {
            servers[0].0.wait_for("every result", RUN_LIMIT, |l| {
                server_log::stats_results(l).filter(|&n| n >= tasks)
            })?;
            t0.elapsed().as_secs_f64()
        }
        Some(nats) => {
            wait_for_outcomes(nats, tasks, &mut servers)?;
            t0.elapsed().as_secs_f64()
        }
    };
    let after = nats.as_ref().map(Nats::counters).transpose()?;
    let server_cpu_secs = servers
        .iter()
        .filter_map(|(s, _)| cpu_seconds(s.pid()))
        .sum::<f64>()
        - cpu_before;
    group.signal_all(libc::SIGTERM);
    group.wait_all(RUN_LIMIT)?;
    let mut recorded = 0;
    for (server, _) in servers {
        let log = server.log.clone();
        let rest = server.stop()?;
        recorded += rest
            .iter()
            .find_map(|l| server_log::results_recorded(l))
            .ok_or_else(|| {
                format!(
                    "contact-server did not log how many results it recorded (log: {})",
                    log.display()
                )
            })?;
        report_trouble(&log);
    }
    match &nats {
        // Every acknowledged result is recorded once; fewer means some were lost.
        None if recorded < tasks => {
            return Err(format!(
                "contact-server recorded {recorded} results of {tasks} tasks (log: {})",
                b.log(&format!("{tag}-0-server")).display()
            ))
        }
        None => {}
        Some(nats) => check_outcomes(nats, tasks)
            .map_err(|e| format!("{e} (logs: {}/{tag}-*)", b.work.display()))?,
    }
    Ok(StoreRun {
        timed: Timed {
            secs,
            results: tasks,
        },
        nats: after.zip(before).map(|(a, b)| a.since(&b)),
        server_cpu_secs,
    })
}

/// Waits until `CONTACT_OUTCOMES` holds `tasks` outcomes; fails if a
/// replica exits first, or no outcome is added for [`STALLED`].
fn wait_for_outcomes(nats: &Nats, tasks: u64, servers: &mut [(Daemon, u16)]) -> Outcome<()> {
    let deadline = Instant::now() + RUN_LIMIT;
    let mut last = (0, Instant::now());
    loop {
        let stored = nats.stream_messages("CONTACT_OUTCOMES")?.unwrap_or(0);
        if stored >= tasks {
            return Ok(());
        }
        if stored > last.0 {
            last = (stored, Instant::now());
        } else if last.1.elapsed() > STALLED {
            return Err(format!(
                "lost tasks: CONTACT_OUTCOMES has held {stored} outcomes for {tasks} tasks for {STALLED:?} ({})",
                nats.consumer_state("CONTACT_TASKS", "contact-queue")?
            ));
        }
        for (s, _) in servers.iter_mut() {
            if let Some(l) = s.exited() {
                return Err(l);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "CONTACT_OUTCOMES did not reach {tasks} outcomes within {RUN_LIMIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads `CONTACT_OUTCOMES` back: every task 1..=`tasks` must have exactly
/// one outcome, and it must be an accepted result (no dead letter).
fn check_outcomes(nats: &Nats, tasks: u64) -> Outcome<()> {
    let servers = nats.addresses();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let held = nats.stream_messages("CONTACT_TASKS")?.unwrap_or(0);
    if held != tasks {
        return Err(format!(
            "CONTACT_TASKS holds {held} tasks, {tasks} were published"
        ));
    }
    let stored = nats.stream_messages("CONTACT_OUTCOMES")?.unwrap_or(0);
    if stored != tasks {
        return Err(format!(
            "CONTACT_OUTCOMES holds {stored} outcomes for {tasks} tasks: every task must have exactly one"
        ));
    }
    runtime.block_on(async move {
        use async_nats::jetstream::consumer;
        let err = |what: &str, e: &dyn std::fmt::Display| {
            format!("reading CONTACT_OUTCOMES: {what}: {e}")
        };
        let client = async_nats::connect(servers)
            .await
            .map_err(|e| err("connect", &e))?;
        let js = async_nats::jetstream::new(client);
        let stream = js
            .get_stream("CONTACT_OUTCOMES")
            .await
            .map_err(|e| err("stream", &e))?;
        let mut messages = stream
            .create_consumer(consumer::pull::OrderedConfig::default())
            .await
            .map_err(|e| err("consumer", &e))?
            .messages()
            .await
            .map_err(|e| err("messages", &e))?;
        let mut outcomes = vec![0u32; tasks as usize + 1];
        for _ in 0..stored {
            let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|e| err("next", &e))?
                .ok_or("reading CONTACT_OUTCOMES: it ended early")?
                .map_err(|e| err("next", &e))?;
            let task = m
                .subject
                .strip_prefix("contact.outcome.")
                .and_then(|t| t.parse::<usize>().ok())
                .filter(|&t| (1..=tasks as usize).contains(&t))
                .ok_or_else(|| format!("CONTACT_OUTCOMES: unexpected subject {}", m.subject))?;
            let v: serde_json::Value = serde_json::from_slice(&m.payload).map_err(|e| {
                format!("CONTACT_OUTCOMES: outcome of task {task} is not JSON: {e}")
            })?;
            if v["kind"] != "result" || v["accepted"] != true {
                return Err(format!(
                    "CONTACT_OUTCOMES: task {task} ended with {v}, not an accepted result"
                ));
            }
            outcomes[task] += 1;
        }
        let missing = outcomes[1..].iter().filter(|&&n| n == 0).count();
        let doubled = outcomes[1..].iter().filter(|&&n| n > 1).count();
        if missing > 0 || doubled > 0 {
            return Err(format!(
                "CONTACT_OUTCOMES: {missing} tasks without an outcome, {doubled} with more than one"
            ));
        }
        Ok(())
    })
}

/// Says on stderr what a replica logged at warn or error level (the bench
/// keeps those lines: a store that worked but complained is worth a look).
fn report_trouble(log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let trouble: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if let Some(first) = trouble.first() {
        eprintln!(
            "bench: {} logged {} warning/error line(s), the first: {first}",
            log.display(),
            trouble.len()
        );
    }
}

/// Latency of queue mode at `rate` tasks/s offered for `secs` seconds, one
/// replica and one client, on `setup`'s store (part c's method).
pub fn latency(
    b: &Bench,
    setup: Setup,
    rate: u64,
    secs: f64,
) -> Outcome<crate::latency::Latencies> {
    let tag = b.next_tag("store-latency");
    let nats = if setup.is_journal() {
        None
    } else {
        Some(Nats::start(b, &tag, setup.nodes)?)
    };
    let url = nats.as_ref().map(Nats::url).unwrap_or_default();
    let state_dir = b.fresh_dir(&format!("{tag}-state"))?;
    crate::latency::measure(b, rate, secs, |cmd| {
        cmd.args(["--dispatch", "queue"]);
        setup.state_flags(cmd, &url, &state_dir);
    })
}

/// The set-up part g holds a fleet on: one replica on one NATS node.
pub const FLEET_SETUP: Setup = Setup {
    nodes: 1,
    copies: 1,
    replicas: 1,
};

/// Part d's fan-out (`contact-load`, broadcast) on one replica with
/// `--store` on one NATS node: what an agent costs a replica when its
/// lease, its progress and its results live in JetStream.
pub fn fleet(b: &Bench, agents: u64) -> Outcome<crate::fanout::Fanout> {
    let tag = b.next_tag("store-fleet");
    let nats = Nats::start(b, &tag, FLEET_SETUP.nodes)?;
    let url = nats.url();
    crate::fanout::measure(b, agents, |cmd| {
        FLEET_SETUP.state_flags(cmd, &url, std::path::Path::new(""));
    })
}
