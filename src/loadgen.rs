//! The load generator behind `contact-load`: a fleet of agents on few
//! connections and few threads, to measure what a fleet costs a server.
//!
//! Agents are futures on grpcio's completion queues (two by default), not
//! threads: each holds its own `getTask` stream (and, like a real agent, a
//! `sendStatus` stream) with its own client id, and answers every task it is
//! pushed with a `tellResult` call of its own, whose completion is the
//! server's acknowledgement (the result is durable). Up to
//! `agents_per_connection` agents share one HTTP/2 connection, within the
//! server's cap on streams per connection. One coordinating thread (the
//! caller's) dials, re-dials with backoff, paces status messages and keeps
//! the tallies; agents only report events to it.
//!
//! A run is five phases, each reported as one JSON object ([`PhaseReport`]):
//! `idle` (the server's memory before anyone attaches), `attach` (a task
//! published first reaches every agent as it attaches: attached = served),
//! `broadcast` (a new task reaches all and all results are acknowledged),
//! `disconnect` (every connection is dropped at once and a task published
//! while they are away: how long until the server has closed them all), and
//! `reconnect` (after `reconnect_after` they all dial again: back = that
//! task received). Tasks are published by writing lines to the
//! file the server reads with `--tasks-from` (a FIFO).
//!
//! Here: the configuration, the coordinator and the phases; in `agent` the
//! agents' futures and dialling, in `tally` what a phase adds up to, in
//! `procfs` what `/proc` says about the two processes.

mod agent;
mod procfs;
mod tally;

pub use procfs::{ProcSample, Samples};
pub use tally::{Tally, Timing};

use crate::backoff::Backoff;
use crate::client::wait_ready;
use crate::error::Error;
use crate::proto::{self, ContactClient};
use agent::{grpc_target, Agent, Command, Event};
use crossbeam_channel::{Receiver, Sender};
use futures::channel::mpsc;
use grpcio::{ChannelBuilder, Environment, Metadata, MetadataBuilder};
use procfs::process_exists;
use serde_json::{json, Value};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything `contact-load` can be told.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `host:port` of the server.
    pub server: String,
    /// Agents to hold, each with its own client id.
    pub agents: usize,
    /// Agents sharing one connection; `None`: as many as the server's stream
    /// cap leaves room for (see [`LoadConfig::per_connection`]).
    pub agents_per_connection: Option<usize>,
    /// The server's `--max-streams-per-connection`.
    pub max_streams_per_connection: usize,
    /// Client ids are this prefix and the agent's number (`load-00042`).
    pub id_prefix: String,
    /// Where tasks are published: the file (a FIFO) the server reads with `--tasks-from`.
    pub tasks_to: PathBuf,
    /// The server's process, whose memory and CPU time are reported.
    pub server_pid: Option<u32>,
    /// Each agent sends a status message this often (`None`: no status stream).
    pub status_every: Option<Duration>,
    /// How long every agent stays away after the mass disconnect.
    pub reconnect_after: Duration,
    /// How long a phase may take before it is reported incomplete.
    pub phase_timeout: Duration,
    /// How long one dial may take before it counts as failed (as `contact-client`).
    pub connect_timeout: Duration,
    /// First and largest delay before a failed dial or call is tried again.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// grpcio completion queues (one thread each) that run every agent.
    pub completion_queues: usize,
}

impl LoadConfig {
    /// Defaults (those of `contact-client` where an agent has one) for all but
    /// the server and the task file.
    pub fn new(server: impl Into<String>, tasks_to: impl Into<PathBuf>) -> LoadConfig {
        LoadConfig {
            server: server.into(),
            agents: 1000,
            agents_per_connection: None,
            max_streams_per_connection: 100,
            id_prefix: "load-".into(),
            tasks_to: tasks_to.into(),
            server_pid: None,
            status_every: Some(Duration::from_secs(5)),
            reconnect_after: Duration::from_secs(10),
            phase_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            completion_queues: 2,
        }
    }

    /// Streams an agent keeps open: `getTask`, and `sendStatus` when it sends status.
    pub fn long_streams_per_agent(&self) -> usize {
        1 + usize::from(self.status_every.is_some())
    }

    /// Agents per connection: as given, or as many as leave each a stream for
    /// its `tellResult` call within the server's cap (33 of 100, as a real
    /// agent uses 3 streams).
    pub fn per_connection(&self) -> usize {
        self.agents_per_connection.unwrap_or_else(|| {
            (self.max_streams_per_connection / (self.long_streams_per_agent() + 1)).max(1)
        })
    }

    /// Connections the agents need.
    pub fn connections(&self) -> usize {
        self.agents.div_ceil(self.per_connection())
    }

    /// The connection agent `agent` rides on.
    pub fn connection_of(&self, agent: usize) -> usize {
        agent / self.per_connection()
    }

    /// The agents riding on connection `conn`.
    pub fn agents_of(&self, conn: usize) -> std::ops::Range<usize> {
        let per = self.per_connection();
        (conn * per).min(self.agents)..((conn + 1) * per).min(self.agents)
    }

    /// Agent `agent`'s client id, zero-padded so that ids sort by number.
    pub fn agent_id(&self, agent: usize) -> String {
        let width = self.agents.saturating_sub(1).to_string().len();
        format!("{}{agent:0width$}", self.id_prefix)
    }

    /// Checks what flags cannot catch one by one.
    pub fn check(&self) -> Result<(), Error> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.agents == 0 {
            return usage("--agents must be at least 1".into());
        }
        if self.completion_queues == 0 {
            return usage("--completion-queues must be at least 1".into());
        }
        let per = self.per_connection();
        let long = per * self.long_streams_per_agent();
        if per == 0 || long >= self.max_streams_per_connection {
            return usage(format!(
                "--agents-per-connection {per}: its agents keep {long} streams open, which leaves none of the server's {} per connection (--max-streams-per-connection) for their results; use at most {}",
                self.max_streams_per_connection,
                (self.max_streams_per_connection - 1) / self.long_streams_per_agent()
            ));
        }
        let id = self.agent_id(self.agents - 1);
        proto::validate_client_id(&id).map_err(|e| Error::Usage(format!("--id-prefix: {e}")))?;
        Ok(())
    }
}

/// One phase's outcome, printed as one JSON object per line.
#[derive(Debug, Clone)]
pub struct PhaseReport {
    pub phase: &'static str,
    /// The phase did what it measures for every agent within the timeout.
    pub complete: bool,
    pub json: Value,
}

/// Something to do later, in the generation it was planned in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Dial(usize),
    Start(usize),
}

struct Conn {
    client: Option<ContactClient>,
    backoff: Backoff,
}

struct AgentSlot {
    commands: Option<mpsc::UnboundedSender<Command>>,
    backoff: Backoff,
}

/// The phase being measured: its task's text and who got it.
struct Measured {
    text: String,
    tally: Tally,
}

/// The coordinator: owns the connections, starts agents, keeps the tallies.
struct Fleet<'a> {
    cfg: &'a LoadConfig,
    env: Arc<Environment>,
    instance: String,
    conns: Vec<Conn>,
    agents: Vec<AgentSlot>,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    timers: BinaryHeap<Reverse<(Instant, u32, Timer)>>,
    /// Bumped by a mass disconnect: events and timers of earlier ones are stale.
    generation: u32,
    /// Status messages go out round-robin: agent `status_next` is due at
    /// `status_round + every * status_next / agents`.
    status_round: Instant,
    status_next: usize,
    measured: Option<Measured>,
    /// Why dials and calls failed in the current phase, with how often.
    failures: BTreeMap<String, u64>,
}

impl<'a> Fleet<'a> {
    fn new(cfg: &'a LoadConfig) -> Fleet<'a> {
        let env = crate::tls::grpc_environment(cfg.completion_queues, "contact-load");
        let backoff = Backoff::new(cfg.backoff_initial, cfg.backoff_max);
        let (events_tx, events) = crossbeam_channel::unbounded();
        Fleet {
            cfg,
            env,
            instance: format!("{:016x}", fastrand::u64(..)),
            conns: (0..cfg.connections())
                .map(|_| Conn {
                    client: None,
                    backoff: backoff.clone(),
                })
                .collect(),
            agents: (0..cfg.agents)
                .map(|_| AgentSlot {
                    commands: None,
                    backoff: backoff.clone(),
                })
                .collect(),
            events_tx,
            events,
            timers: BinaryHeap::new(),
            generation: 0,
            status_round: Instant::now(),
            status_next: 0,
            measured: None,
            failures: BTreeMap::new(),
        }
    }

    /// Starts measuring who receives (and answers) the task `text`.
    fn measure(&mut self, text: &str, start: Instant) {
        self.failures.clear();
        self.measured = Some(Measured {
            text: text.to_string(),
            tally: Tally::new(self.cfg.agents, start),
        });
    }

    fn tally(&self) -> &Tally {
        &self.measured.as_ref().expect("a phase is measured").tally
    }

    /// The fields of a task phase: the tally, the failures met, and both
    /// processes' memory now and CPU time since `before`.
    fn phase_json(&self, before: &Samples, now: &Samples) -> Value {
        let failures = json!({ "failures": self.failures });
        merged(
            merged(tally_json(self.tally()), failures),
            procs_json(before, now),
        )
    }

    fn dial_all(&mut self) {
        for c in 0..self.conns.len() {
            self.dial(c);
        }
    }

    /// Opens connection `c` (a channel of its own: its own TCP connection)
    /// and reports when it is ready, as `contact-client` waits for it.
    fn dial(&mut self, c: usize) {
        let channel = ChannelBuilder::new(self.env.clone())
            // Channels with equal arguments share a connection by default.
            .use_local_subchannel_pool(true)
            .keepalive_time(Duration::from_secs(20))
            .keepalive_timeout(Duration::from_secs(10))
            .keepalive_permit_without_calls(true)
            .http2_max_pings_without_data(0)
            .max_receive_message_len(1 << 20)
            .connect(&grpc_target(&self.cfg.server));
        let client = ContactClient::new(channel.clone());
        let (events, generation, timeout) = (
            self.events_tx.clone(),
            self.generation,
            self.cfg.connect_timeout,
        );
        client.spawn(async move {
            let result = wait_ready(&channel, timeout).await;
            let _ = events.send(Event::Dialled {
                conn: c,
                generation,
                result,
            });
        });
        self.conns[c].client = Some(client);
    }

    /// Starts agent `a` on its connection.
    fn start(&mut self, a: usize) {
        let conn = self.cfg.connection_of(a);
        let Some(client) = self.conns[conn].client.clone() else {
            return;
        };
        let metadata = match self.metadata(a) {
            Ok(m) => m,
            Err(e) => {
                self.note_failure(format!("metadata: {e}"));
                return;
            }
        };
        let (tx, rx) = mpsc::unbounded();
        self.agents[a].commands = Some(tx);
        let agent = Agent {
            index: a,
            generation: self.generation,
            metadata,
            status: self.cfg.status_every.is_some(),
        };
        client.spawn(agent.run(client.clone(), rx, self.events_tx.clone()));
    }

    /// What a `contact-client` sends on every call (see `client::call_metadata`).
    fn metadata(&self, a: usize) -> Result<Metadata, grpcio::Error> {
        let mut b = MetadataBuilder::new();
        b.add_str(proto::CLIENT_ID_KEY, &self.cfg.agent_id(a))?;
        b.add_str(proto::INSTANCE_KEY, &self.instance)?;
        if self.cfg.status_every.is_some() {
            b.add_str(proto::LEASES_KEY, "1")?;
        }
        Ok(b.build())
    }

    /// Drops every connection at once: agents stop (their calls are
    /// cancelled), channels are dropped, and whatever was planned is void.
    fn disconnect_all(&mut self) {
        self.generation += 1;
        for a in &mut self.agents {
            a.commands = None;
            a.backoff.reset();
        }
        for c in &mut self.conns {
            c.client = None;
            c.backoff.reset();
        }
        self.timers.clear();
    }

    fn note_failure(&mut self, why: String) {
        *self.failures.entry(why).or_default() += 1;
    }

    fn later(&mut self, delay: Duration, timer: Timer) {
        self.timers
            .push(Reverse((Instant::now() + delay, self.generation, timer)));
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Dialled {
                conn,
                generation,
                result,
            } if generation == self.generation => match result {
                Ok(()) => {
                    self.conns[conn].backoff.reset();
                    for a in self.cfg.agents_of(conn) {
                        self.start(a);
                    }
                }
                Err(why) => {
                    self.note_failure(format!("dial: {why}"));
                    self.conns[conn].client = None;
                    let delay = self.conns[conn].backoff.next_delay();
                    self.later(delay, Timer::Dial(conn));
                }
            },
            Event::Received {
                agent,
                generation,
                text,
                at,
            } if generation == self.generation => {
                self.agents[agent].backoff.reset();
                if let Some(m) = self.measured.as_mut().filter(|m| m.text == text) {
                    m.tally.received(agent, at);
                }
            }
            Event::Acknowledged {
                agent,
                generation,
                text,
                at,
            } if generation == self.generation => {
                if let Some(m) = self.measured.as_mut().filter(|m| m.text == text) {
                    m.tally.acknowledged(agent, at);
                }
            }
            Event::AnswerFailed { generation, why } if generation == self.generation => {
                self.note_failure(format!("result: {why}"));
            }
            Event::Ended {
                agent,
                generation,
                why,
                refused,
            } if generation == self.generation => {
                self.note_failure(why);
                self.agents[agent].commands = None;
                let b = &mut self.agents[agent].backoff;
                let delay = if refused {
                    b.refused_delay()
                } else {
                    b.next_delay()
                };
                self.later(delay, Timer::Start(agent));
            }
            // From before the last mass disconnect.
            _ => {}
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, generation, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if generation != self.generation {
                continue;
            }
            match timer {
                Timer::Dial(c) => self.dial(c),
                Timer::Start(a) => self.start(a),
            }
        }
    }

    /// When the next status message is due (`None`: agents send none).
    fn next_status(&self) -> Option<Instant> {
        let every = self.cfg.status_every?;
        let offset = every.mul_f64(self.status_next as f64 / self.cfg.agents as f64);
        Some(self.status_round + offset)
    }

    fn send_statuses(&mut self, now: Instant) {
        let Some(every) = self.cfg.status_every else {
            return;
        };
        while self.next_status().is_some_and(|due| due <= now) {
            if let Some(tx) = &self.agents[self.status_next].commands {
                let _ = tx.unbounded_send(Command::Status);
            }
            self.status_next += 1;
            if self.status_next == self.cfg.agents {
                self.status_next = 0;
                self.status_round += every;
            }
        }
    }

    /// Runs the fleet until `done` holds or `deadline` passes (or the
    /// server's process is gone); says whether `done` held.
    fn run_until(&mut self, deadline: Instant, done: impl Fn(&Self) -> bool) -> bool {
        let mut checked = Instant::now();
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if now.duration_since(checked) >= Duration::from_millis(500) {
                checked = now;
                if self.cfg.server_pid.is_some_and(|pid| !process_exists(pid)) {
                    log::error!(
                        "the server (process {}) is gone",
                        self.cfg.server_pid.unwrap_or(0)
                    );
                    return false;
                }
            }
            self.fire_timers(now);
            self.send_statuses(now);
            let mut wake = deadline.min(now + Duration::from_millis(100));
            if let Some(Reverse((at, _, _))) = self.timers.peek() {
                wake = wake.min(*at);
            }
            if let Some(at) = self.next_status() {
                wake = wake.min(at);
            }
            match self.events.recv_deadline(wake) {
                Ok(e) => {
                    self.handle(e);
                    while let Ok(e) = self.events.try_recv() {
                        self.handle(e);
                    }
                }
                Err(_) => continue,
            }
        }
    }
}

/// Writes task lines to the server's `--tasks-from` file.
struct Publisher {
    path: PathBuf,
    file: std::fs::File,
}

impl Publisher {
    fn open(path: &Path) -> Result<Publisher, Error> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::file(path, "open (for writing tasks)", e))?;
        Ok(Publisher {
            path: path.to_path_buf(),
            file,
        })
    }

    fn publish(&mut self, text: &str) -> Result<(), Error> {
        // One write of less than PIPE_BUF bytes: a FIFO keeps it whole.
        self.file
            .write_all(format!("{text}\n").as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::file(&self.path, "write a task to", e))
    }
}

/// Fails with what to do when this process may not open enough files for
/// its connections (one each, plus some for grpcio's own).
fn check_open_files(connections: usize) -> Result<(), Error> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(());
    }
    let needed = connections as u64 + 64;
    if lim.rlim_cur < needed {
        return Err(Error::Usage(format!(
            "{connections} connections need about {needed} open files, but this process may open {} (ulimit -n); raise it, or put more agents on each connection (--agents-per-connection)",
            lim.rlim_cur
        )));
    }
    Ok(())
}

/// The JSON fields of one task phase: who received the task and who had
/// their result acknowledged, how fast.
fn tally_json(tally: &Tally) -> Value {
    let (r, a) = (tally.receipts(), tally.acknowledgements());
    json!({
        "received": r.count,
        "received_secs": r.all_secs,
        "received_p50_secs": r.p50_secs,
        "received_p99_secs": r.p99_secs,
        "acknowledged": a.count,
        "acknowledged_secs": a.all_secs,
        "acknowledged_p50_secs": a.p50_secs,
        "acknowledged_p99_secs": a.p99_secs,
    })
}

/// Adds the fields of `extra` (an object) to `base` (an object).
fn merged(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

/// Both processes' side of a phase: memory now, CPU time since `before`.
fn procs_json(before: &Samples, now: &Samples) -> Value {
    let cpu = |a: &ProcSample, b: &ProcSample| match (a.cpu_secs, b.cpu_secs) {
        (Some(a), Some(b)) => Some(((b - a) * 1000.0).round() / 1000.0),
        _ => None,
    };
    json!({
        "server_rss_kib": now.server.rss_kib,
        "server_fds": now.server.fds,
        "server_sockets": now.server.sockets,
        "server_threads": now.server.threads,
        "server_cpu_secs": cpu(&before.server, &now.server),
        "loadgen_rss_kib": now.loadgen.rss_kib,
        "loadgen_threads": now.loadgen.threads,
        "loadgen_cpu_secs": cpu(&before.loadgen, &now.loadgen),
    })
}

/// KiB per `n` of the growth from `from` to `to`, to 0.1 KiB.
fn kib_each(from: Option<u64>, to: Option<u64>, n: usize) -> Option<f64> {
    let (from, to) = (from?, to?);
    Some(((to as f64 - from as f64) / n.max(1) as f64 * 10.0).round() / 10.0)
}

/// Runs the four phases, handing each report to `emit` as soon as it is
/// known; returns them all. A phase that does not complete within the
/// timeout is reported incomplete, and the next phases still run.
pub fn run(
    cfg: &LoadConfig,
    emit: &mut dyn FnMut(&PhaseReport),
) -> Result<Vec<PhaseReport>, Error> {
    cfg.check()?;
    if let Some(pid) = cfg.server_pid.filter(|p| !process_exists(*p)) {
        return Err(Error::Usage(format!("--server-pid {pid}: no such process")));
    }
    check_open_files(cfg.connections())?;
    let mut publisher = Publisher::open(&cfg.tasks_to)?;
    let sample = || Samples::take(cfg.server_pid);
    let tag = format!("{:08x}", fastrand::u32(..));
    let task = |phase: &str| format!("contact-load {tag} {phase}");
    let mut reports = vec![];
    let mut report = |phase: &'static str, complete: bool, fields: Value| {
        let json = merged(json!({"phase": phase, "complete": complete}), fields);
        let r = PhaseReport {
            phase,
            complete,
            json,
        };
        emit(&r);
        reports.push(r);
    };
    let mut fleet = Fleet::new(cfg);
    let all_answered = |f: &Fleet| f.tally().complete();

    let idle = sample();
    report("idle", true, procs_json(&idle, &idle));

    // Attach: the task is published first, so that each agent is served it
    // as it attaches (the server delivers retained tasks to new clients).
    let hello = task("attach");
    publisher.publish(&hello)?;
    let start = Instant::now();
    fleet.measure(&hello, start);
    fleet.status_round = start;
    fleet.dial_all();
    let complete = fleet.run_until(start + cfg.phase_timeout, all_answered);
    let attached = sample();
    report(
        "attach",
        complete,
        merged(
            json!({
                "agents": cfg.agents,
                "connections": cfg.connections(),
                "agents_per_connection": cfg.per_connection(),
                "server_rss_per_agent_kib": kib_each(idle.server.rss_kib, attached.server.rss_kib, cfg.agents),
                "server_rss_per_connection_kib": kib_each(idle.server.rss_kib, attached.server.rss_kib, cfg.connections()),
            }),
            fleet.phase_json(&idle, &attached),
        ),
    );

    // Broadcast: one task to every attached agent.
    let before = sample();
    let broadcast = task("broadcast");
    let start = Instant::now();
    publisher.publish(&broadcast)?;
    fleet.measure(&broadcast, start);
    let complete = fleet.run_until(start + cfg.phase_timeout, all_answered);
    report("broadcast", complete, fleet.phase_json(&before, &sample()));

    // Mass disconnect: every connection dropped at once; a task published
    // while they are away; all dial again after `reconnect_after`.
    let before = sample();
    fleet.disconnect_all();
    let away = task("reconnect");
    publisher.publish(&away)?;
    let gone_at = Instant::now();
    let back_at = gone_at + cfg.reconnect_after;
    // Until the server has closed every connection (as many sockets as when idle).
    let mut closed_secs = None;
    while closed_secs.is_none() && Instant::now() < back_at {
        fleet.run_until(
            back_at.min(Instant::now() + Duration::from_millis(50)),
            |_| false,
        );
        let now = sample().server.sockets;
        if now.is_some() && now <= idle.server.sockets {
            closed_secs = Some(gone_at.elapsed().as_secs_f64());
        }
    }
    fleet.run_until(back_at, |_| false);
    // Complete either way: how long the server takes is what is measured
    // (`null`: longer than the agents stayed away).
    report(
        "disconnect",
        true,
        merged(
            json!({
                "agents": cfg.agents,
                "away_secs": cfg.reconnect_after.as_secs_f64(),
                "server_closed_all_secs": closed_secs,
            }),
            procs_json(&before, &sample()),
        ),
    );

    let before = sample();
    let start = Instant::now();
    fleet.measure(&away, start);
    fleet.dial_all();
    let complete = fleet.run_until(start + cfg.phase_timeout, all_answered);
    report("reconnect", complete, fleet.phase_json(&before, &sample()));
    fleet.disconnect_all();
    Ok(reports)
}

/// A table of the reports for people (the JSON lines are for programs).
pub fn table(reports: &[PhaseReport]) -> String {
    let num = |v: &Value, k: &str| -> String {
        match &v[k] {
            Value::Null => "-".into(),
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.3}"),
                _ => n.to_string(),
            },
            other => other.to_string(),
        }
    };
    let mut out = format!(
        "{:<11} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>12} {:>10} {:>10}\n",
        "phase",
        "received",
        "all (s)",
        "p50 (s)",
        "acked",
        "all (s)",
        "p50 (s)",
        "server KiB",
        "server CPU",
        "load CPU"
    );
    for r in reports {
        let j = &r.json;
        out += &format!(
            "{:<11} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>12} {:>10} {:>10}{}\n",
            r.phase,
            num(j, "received"),
            num(j, "received_secs"),
            num(j, "received_p50_secs"),
            num(j, "acknowledged"),
            num(j, "acknowledged_secs"),
            num(j, "acknowledged_p50_secs"),
            num(j, "server_rss_kib"),
            num(j, "server_cpu_secs"),
            num(j, "loadgen_cpu_secs"),
            if r.complete { "" } else { "  INCOMPLETE" },
        );
    }
    if let Some(a) = reports.iter().find(|r| r.phase == "attach") {
        out += &format!(
            "server memory: {} KiB per agent, {} KiB per connection ({} agents on {} connections)\n",
            num(&a.json, "server_rss_per_agent_kib"),
            num(&a.json, "server_rss_per_connection_kib"),
            num(&a.json, "agents"),
            num(&a.json, "connections"),
        );
    }
    if let Some(d) = reports.iter().find(|r| r.phase == "disconnect") {
        out += &format!(
            "mass disconnect: the server closed every connection in {} s (using {} s of CPU)\n",
            num(&d.json, "server_closed_all_secs"),
            num(&d.json, "server_cpu_secs"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(agents: usize) -> LoadConfig {
        let mut c = LoadConfig::new("127.0.0.1:1", "/nonexistent");
        c.agents = agents;
        c
    }

    #[test]
    fn agents_are_spread_over_connections_within_the_stream_cap() {
        let c = config(1000);
        // getTask + sendStatus each, and a result stream each: 33 of 100.
        assert_eq!(c.per_connection(), 33);
        assert_eq!(c.connections(), 31);
        assert_eq!(c.agents_of(0), 0..33);
        assert_eq!(c.agents_of(30), 990..1000);
        assert_eq!(c.connection_of(989), 29);
        assert_eq!(c.connection_of(990), 30);
        let covered: usize = (0..c.connections()).map(|i| c.agents_of(i).len()).sum();
        assert_eq!(covered, 1000);
        let mut quiet = config(1000);
        quiet.status_every = None;
        assert_eq!(quiet.per_connection(), 50);
        let mut one = config(10);
        one.agents_per_connection = Some(1);
        assert_eq!(one.connections(), 10);
        assert_eq!(one.agents_of(9), 9..10);
    }

    #[test]
    fn a_layout_that_leaves_no_stream_for_results_is_a_usage_error() {
        let mut c = config(100);
        c.agents_per_connection = Some(50);
        let e = c.check().unwrap_err();
        assert!(matches!(e, Error::Usage(_)));
        let text = e.to_string();
        assert!(text.contains("--agents-per-connection 50"), "{text}");
        assert!(text.contains("at most 49"), "{text}");
        c.agents_per_connection = Some(49);
        c.check().unwrap();
        c.agents = 0;
        assert!(c.check().unwrap_err().to_string().contains("--agents"));
        let mut bad = config(10);
        bad.id_prefix = "has space".into();
        assert!(bad.check().unwrap_err().to_string().contains("--id-prefix"));
    }

    #[test]
    fn ids_are_zero_padded_to_the_largest() {
        assert_eq!(config(10_000).agent_id(42), "load-0042");
        assert_eq!(config(10_001).agent_id(42), "load-00042");
        assert_eq!(config(1).agent_id(0), "load-0");
    }

    #[test]
    fn reports_carry_per_agent_memory_and_a_readable_table() {
        assert_eq!(kib_each(Some(1000), Some(65_000), 1000), Some(64.0));
        assert_eq!(kib_each(None, Some(1), 1), None);
        let t0 = Instant::now();
        let mut tally = Tally::new(2, t0);
        tally.received(0, t0 + Duration::from_millis(250));
        let j = merged(json!({"phase": "broadcast"}), tally_json(&tally));
        assert_eq!(j["received"], 1);
        assert_eq!(j["received_secs"], Value::Null);
        assert_eq!(j["received_p50_secs"], 0.25);
        assert_eq!(j["acknowledged"], 0);
        let reports = [
            PhaseReport {
                phase: "attach",
                complete: true,
                json: json!({"received": 2, "received_secs": 1.5, "server_rss_kib": 900,
                    "server_rss_per_agent_kib": 40.5, "server_rss_per_connection_kib": 81.0,
                    "agents": 2, "connections": 1}),
            },
            PhaseReport {
                phase: "broadcast",
                complete: false,
                json: j,
            },
            PhaseReport {
                phase: "disconnect",
                complete: true,
                json: json!({"server_closed_all_secs": 0.75, "server_cpu_secs": 0.5}),
            },
        ];
        let t = table(&reports);
        assert!(t.contains("1.500"), "{t}");
        assert!(t.contains("INCOMPLETE"), "{t}");
        assert!(t.contains("40.500 KiB per agent"), "{t}");
        assert!(t.contains("closed every connection in 0.750 s"), "{t}");
    }
}
