//! `contact-ctl`'s library side: dialling a server's admin API with the
//! operator's credentials, making one call, and showing the answer — a table
//! for people, JSON lines for scripts. The binary only parses flags.

use crate::error::Error;
use crate::listen::ListenAddr;
use crate::proto::admin::{
    AdminClient, AgentStatus, CancelRequest, ClientInfo, DisconnectRequest, DrainRequest,
    GetJobRequest, Job, ListClientsRequest, ListJobsRequest, PushReply, PushRequest, ResultEvent,
    WatchResultsRequest,
};
use crate::tls::ClientTls;
use crate::token::Token;
use grpcio::{CallOption, ChannelBuilder, MetadataBuilder};
use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How `contact-ctl` reaches a server.
#[derive(Debug, Clone)]
pub struct CtlConfig {
    pub server: String,
    /// An admin token (`contact-server token --admin NAME`).
    pub token: Option<Token>,
    pub tls: Option<ClientTls>,
    /// How long one call may take, connecting included.
    pub timeout: Duration,
}

/// A connection to one server's admin API.
pub struct Ctl {
    client: AdminClient,
    server: String,
    token: Option<Token>,
    timeout: Duration,
}

impl Ctl {
    /// Prepares the channel; nothing is sent until the first call.
    pub fn connect(cfg: &CtlConfig) -> Result<Ctl, Error> {
        let loopback = cfg
            .server
            .parse::<ListenAddr>()
            .is_ok_and(|a| a.is_loopback());
        if cfg.token.is_some() && cfg.tls.is_none() && !loopback {
            return Err(Error::Usage(format!(
                "the admin token would cross the network to {} in clear text: add --tls-ca FILE (or --tls to trust the system's CAs)",
                cfg.server
            )));
        }
        let env = crate::tls::grpc_environment(1, "contact-ctl");
        // A long-lived caller (`top`) finds a restarted server within 2 s,
        // not gRPC's default of up to 2 minutes; one call never redials.
        let mut builder = ChannelBuilder::new(env).max_reconnect_backoff(Duration::from_secs(2));
        if let Some(tls) = &cfg.tls {
            builder = builder.set_credentials(tls.credentials()?);
            if let Some(name) = &tls.server_name {
                builder = builder.override_ssl_target(name.clone());
            }
        }
        Ok(Ctl {
            client: AdminClient::new(builder.connect(&cfg.server)),
            server: cfg.server.clone(),
            token: cfg.token.clone(),
            timeout: cfg.timeout,
        })
    }

    fn options(&self) -> Result<CallOption, Error> {
        self.options_with(Some(self.timeout))
    }

    fn options_with(&self, timeout: Option<Duration>) -> Result<CallOption, Error> {
        let mut opt = CallOption::default();
        if let Some(t) = timeout {
            opt = opt.timeout(t);
        }
        if let Some(t) = &self.token {
            let mut b = MetadataBuilder::new();
            b.add_str("authorization", &format!("Bearer {}", t.expose()))
                .map_err(|e| Error::Usage(format!("the admin token cannot be sent: {e}")))?;
            opt = opt.headers(b.build());
        }
        Ok(opt)
    }

    /// Says what a failed call means for the operator.
    fn failed(&self, what: &str, e: grpcio::Error) -> Error {
        let why = match e {
            grpcio::Error::RpcFailure(s) => match s.code() {
                grpcio::RpcStatusCode::UNAVAILABLE => {
                    format!("cannot reach the server at {}: {}", self.server, s.message())
                }
                grpcio::RpcStatusCode::DEADLINE_EXCEEDED => format!(
                    "the server at {} did not answer within {:?}",
                    self.server, self.timeout
                ),
                grpcio::RpcStatusCode::UNIMPLEMENTED => format!(
                    "the server at {} has no admin API (an older contact-server, or not a contact server)",
                    self.server
                ),
                code => {
                    // `5-NOT_FOUND` → `NOT_FOUND`, the name gRPC's documentation uses.
                    let name = format!("{code:?}");
                    let name = name.split_once('-').map_or(&name[..], |(_, n)| n);
                    format!("{name}: {}", s.message())
                }
            },
            other => other.to_string(),
        };
        Error::Remote(format!("{what}: {why}"))
    }

    pub fn push(&self, req: &PushRequest) -> Result<PushReply, Error> {
        self.client
            .push_opt(req, self.options()?)
            .map_err(|e| self.failed("push", e))
    }

    pub fn job(&self, id: u64) -> Result<Job, Error> {
        let req = GetJobRequest {
            job_id: id,
            ..Default::default()
        };
        self.client
            .get_job_opt(&req, self.options()?)
            .map_err(|e| self.failed("job", e))
    }

    pub fn jobs(&self) -> Result<Vec<Job>, Error> {
        self.client
            .list_jobs_opt(&ListJobsRequest::default(), self.options()?)
            .map(|r| r.jobs.into_vec())
            .map_err(|e| self.failed("jobs", e))
    }

    /// Drains `agent` (or with `undo`, lets it go); returns the tasks it holds.
    pub fn drain(&self, agent: &str, undo: bool) -> Result<u64, Error> {
        let req = DrainRequest {
            agent: agent.into(),
            undo,
            ..Default::default()
        };
        self.client
            .drain_opt(&req, self.options()?)
            .map(|r| r.in_flight)
            .map_err(|e| self.failed("drain", e))
    }

    /// Cancels `tasks` and, when `job` is not 0, every task of that job;
    /// returns the tasks cancelled and the held agents cancelled.
    pub fn cancel(&self, tasks: &[u64], job: u64) -> Result<(u32, u32), Error> {
        let req = CancelRequest {
            task_ids: tasks.to_vec(),
            job_id: job,
            ..Default::default()
        };
        self.client
            .cancel_opt(&req, self.options()?)
            .map(|r| (r.cancelled, r.held_cancelled))
            .map_err(|e| self.failed("cancel", e))
    }

    pub fn disconnect(&self, agent: &str) -> Result<(), Error> {
        let req = DisconnectRequest {
            agent: agent.into(),
            ..Default::default()
        };
        self.client
            .disconnect_opt(&req, self.options()?)
            .map(|_| ())
            .map_err(|e| self.failed("disconnect", e))
    }

    /// Writes the results from `from_seq` (0: from now) to `out` as they
    /// come; with `follow`, until the server stops, else to the file's end.
    pub fn results(
        &self,
        from_seq: u64,
        follow: bool,
        json: bool,
        out: &mut impl Write,
    ) -> Result<(), Error> {
        let req = WatchResultsRequest {
            from_seq,
            follow,
            ..Default::default()
        };
        // A follower waits for results as long as it takes: no deadline.
        let timeout = (!follow).then_some(self.timeout);
        let mut stream = self
            .client
            .watch_results_opt(&req, self.options_with(timeout)?)
            .map_err(|e| self.failed("results", e))?;
        let io = |e: std::io::Error| Error::Remote(format!("cannot write the output: {e}"));
        while let Some(event) = futures::executor::block_on(futures::StreamExt::next(&mut stream)) {
            let e = event.map_err(|e| self.failed("results", e))?;
            writeln!(out, "{}", show_result(&e, json)).map_err(io)?;
            out.flush().map_err(io)?;
        }
        Ok(())
    }

    pub fn clients(&self) -> Result<Vec<ClientInfo>, Error> {
        self.client
            .list_clients_opt(&ListClientsRequest::default(), self.options()?)
            .map(|r| r.clients.into_vec())
            .map_err(|e| self.failed("clients", e))
    }
}

/// One recorded result: `12  task 5  web-1  ok  <first line of output>`.
pub fn show_result(e: &ResultEvent, json: bool) -> String {
    if json {
        return serde_json::json!({
            "seq": e.seq, "task_id": e.task_id, "task": e.task, "client": e.client,
            "ok": e.ok, "output": e.output, "attempt": e.attempt, "accepted": e.accepted,
            "stale": e.stale, "retry": e.retry, "received_at": e.received_at,
        })
        .to_string();
    }
    let status = match (e.ok, e.retry, e.stale) {
        (_, _, true) => "stale",
        (true, _, _) => "ok",
        (false, true, _) => "refused",
        (false, false, _) => "failed",
    };
    format!(
        "{}  task {}  {}  {status}  {}",
        e.seq,
        e.task_id,
        e.client,
        e.output.lines().next().unwrap_or_default()
    )
}

/// A push in words: the tasks published and where they went.
pub fn show_push(r: &PushReply, json: bool) -> String {
    if json {
        return serde_json::json!({
            "task_id": r.task_id,
            "task_ids": r.task_ids.to_vec(),
            "agents": r.agents.to_vec(),
            "target": r.target,
            "job_id": r.job_id,
            "duplicate": r.duplicate,
        })
        .to_string();
    }
    let tasks = match &r.task_ids[..] {
        [first, .., last] => format!("tasks {first}-{last}"),
        [] if !r.duplicate => return format!("job {}: no task yet, for {}", r.job_id, r.target),
        _ => format!("task {}", r.task_id),
    };
    if r.duplicate {
        return format!(
            "job {}: {tasks} already pushed to {} with this key; nothing published",
            r.job_id, r.target
        );
    }
    format!("job {}: {tasks} pushed to {}", r.job_id, r.target)
}

/// How often `run --wait` asks for the job's progress.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A status no later one replaces.
fn is_final(s: &AgentStatus) -> bool {
    match s.status.as_str() {
        "ok" | "failed" => !s.agent.is_empty(),
        // A queue task may end with nobody holding it.
        "dead" | "cancelled" | "timed-out" => true,
        _ => false,
    }
}

/// `contact-ctl run --wait`: pushes, then prints each agent's result as it
/// arrives and a summary; gives up after `timeout`, naming the agents that
/// did not answer. Returns whether every agent succeeded.
pub fn run_and_wait(
    ctl: &Ctl,
    req: &PushRequest,
    timeout: Duration,
    json: bool,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let pushed = ctl.push(req)?;
    let io = |e: std::io::Error| Error::Remote(format!("cannot write the output: {e}"));
    if !json {
        writeln!(out, "{}", show_push(&pushed, false)).map_err(io)?;
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut shown = BTreeSet::new();
    let job = loop {
        let job = ctl.job(pushed.job_id)?;
        for s in job.agents.iter().filter(|s| is_final(s)) {
            if shown.insert(s.agent.clone()) {
                writeln!(out, "{}", show_answer(s, json)).map_err(io)?;
            }
        }
        let done = !job.agents.is_empty() && job.agents.iter().all(is_final);
        if done || std::time::Instant::now() >= deadline {
            break job;
        }
        std::thread::sleep(POLL_EVERY);
    };
    let waiting: Vec<&AgentStatus> = job.agents.iter().filter(|s| !is_final(s)).collect();
    let count = |status: &str| job.agents.iter().filter(|s| s.status == status).count();
    let (ok, failed, dead) = (count("ok"), count("failed"), count("dead"));
    let cancelled = count("cancelled");
    let timed_out = count("timed-out");
    if json {
        let unanswered: Vec<serde_json::Value> = waiting
            .iter()
            .map(|s| serde_json::json!({"agent": s.agent, "status": s.status}))
            .collect();
        let summary = serde_json::json!({
            "job_id": job.job_id, "ok": ok, "failed": failed, "dead": dead,
            "cancelled": cancelled, "stopped": job.stopped, "unanswered": unanswered,
        });
        writeln!(out, "{summary}").map_err(io)?;
    } else {
        let n = job.agents.iter().filter(|s| !s.agent.is_empty()).count();
        let mut line = format!("job {}: {ok} of {n} agent{} ok", job.job_id, plural(n));
        if failed > 0 {
            line += &format!(", {failed} failed");
        }
        if dead > 0 {
            line += &format!(", {dead} dead-lettered");
        }
        if cancelled > 0 {
            line += &format!(", {cancelled} cancelled");
        }
        if timed_out > 0 {
            line += &format!(", {timed_out} timed out");
        }
        if job.stopped {
            line += " (too many failed: it stopped spreading)";
        }
        writeln!(out, "{line}").map_err(io)?;
        if job.agents.is_empty() {
            writeln!(out, "no agent was there to run it").map_err(io)?;
        }
        if !waiting.is_empty() {
            let who: Vec<String> = waiting
                .iter()
                .map(|s| match s.agent.as_str() {
                    "" => format!("(no agent yet: {})", s.status),
                    a => format!("{a} ({})", s.status),
                })
                .collect();
            writeln!(
                out,
                "no answer within {:?} from: {}",
                timeout,
                who.join(", ")
            )
            .map_err(io)?;
        }
    }
    Ok(!job.agents.is_empty() && waiting.is_empty() && failed + dead + cancelled + timed_out == 0)
}

/// One agent's answer: `web-1: ok` and its output, indented.
fn show_answer(s: &AgentStatus, json: bool) -> String {
    if json {
        return serde_json::json!({
            "agent": s.agent, "task_id": s.task_id, "status": s.status,
            "attempt": s.attempt, "output": s.output,
        })
        .to_string();
    }
    let mut text = format!("{}: {}", s.agent, s.status);
    for line in s.output.lines() {
        text += &format!("\n    {line}");
    }
    text
}

/// A job, each agent's status and output (`contact-ctl job ID`).
pub fn show_job(job: &Job, json: bool) -> String {
    if json {
        return job
            .agents
            .iter()
            .map(|s| show_answer(s, true) + "\n")
            .collect();
    }
    let mut table = vec![vec![
        "AGENT".to_string(),
        "TASK".into(),
        "STATUS".into(),
        "ATTEMPT".into(),
        "OUTPUT".into(),
    ]];
    for s in &job.agents {
        table.push(vec![
            if s.agent.is_empty() {
                "-".into()
            } else {
                s.agent.clone()
            },
            s.task_id.to_string(),
            s.status.clone(),
            s.attempt.to_string(),
            s.output.lines().next().unwrap_or_default().to_string(),
        ]);
    }
    format!(
        "job {}: {} → {}\n{}{}\n",
        job.job_id,
        job.text,
        job.target,
        render(&table),
        totals_line(job)
    )
}

fn totals_line(job: &Job) -> String {
    let t = job.totals.get_ref();
    let mut line = format!(
        "{} agent{}: {} ok, {} failed, {} running, {} delivered, {} pending, {} dead",
        t.agents,
        plural(t.agents as usize),
        t.ok,
        t.failed,
        t.running,
        t.delivered,
        t.pending,
        t.dead
    );
    if t.stale > 0 {
        line += &format!(", {} stale", t.stale);
    }
    if t.held + t.cancelled > 0 {
        line += &format!(", {} held, {} cancelled", t.held, t.cancelled);
    }
    if job.stopped {
        line += " (stopped: too many failed)";
    }
    if job.cancelled {
        line += " (cancelled)";
    }
    if t.timed_out > 0 || job.timed_out {
        line += &format!(", {} timed out", t.timed_out);
    }
    if !job.waiting_for.is_empty() {
        line += &format!(" (waiting for agents matching {})", job.waiting_for);
    }
    line
}

/// The jobs held, newest first (`contact-ctl jobs`).
pub fn show_jobs(jobs: &[Job], json: bool, now: SystemTime) -> String {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if json {
        return jobs
            .iter()
            .map(|j| {
                let t = j.totals.get_ref();
                serde_json::json!({
                    "job_id": j.job_id, "text": j.text, "target": j.target,
                    "created_at": j.created_at, "agents": t.agents, "ok": t.ok,
                    "failed": t.failed, "running": t.running, "delivered": t.delivered,
                    "pending": t.pending, "dead": t.dead,
                })
                .to_string()
                    + "\n"
            })
            .collect();
    }
    let mut table = vec![vec![
        "JOB".to_string(),
        "PUSHED".into(),
        "TARGET".into(),
        "AGENTS".into(),
        "OK".into(),
        "FAILED".into(),
        "WAITING".into(),
        "TEXT".into(),
    ]];
    for j in jobs {
        let counts = job_counts(j);
        table.push(vec![
            j.job_id.to_string(),
            format!("{} ago", span(now - j.created_at)),
            j.target.clone(),
            j.totals.get_ref().agents.to_string(),
            counts.ok.to_string(),
            counts.failed.to_string(),
            counts.waiting.to_string(),
            j.text.clone(),
        ]);
    }
    render(&table)
}

/// A job's agents in three heaps, as `jobs` and `top` show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCounts {
    pub ok: u32,
    /// Failed, dead-lettered or cancelled.
    pub failed: u32,
    /// Pending, delivered, running or held for a rollout slot.
    pub waiting: u32,
}

pub fn job_counts(j: &Job) -> JobCounts {
    let t = j.totals.get_ref();
    JobCounts {
        ok: t.ok,
        failed: t.failed + t.dead + t.cancelled,
        waiting: t.pending + t.delivered + t.running + t.held,
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The clients as a table (or JSON lines), times relative to `now`.
pub fn show_clients(rows: &[ClientInfo], json: bool, now: SystemTime) -> String {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if json {
        return rows
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id,
                    "address": c.address,
                    "labels": labels(c),
                    "drained": c.drained,
                    "replica": c.replica,
                    "connected_since": c.connected_since,
                    "last_seen": c.last_seen,
                    "in_flight": c.in_flight,
                    "tasks_sent": c.tasks_sent,
                    "done": c.done,
                    "failed": c.failed,
                })
                .to_string()
                    + "\n"
            })
            .collect();
    }
    let header = [
        "ID",
        "STATE",
        "LABELS",
        "ADDRESS",
        "CONNECTED",
        "LAST SEEN",
        "IN FLIGHT",
        "SENT",
        "DONE",
        "FAILED",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for c in rows {
        table.push(vec![
            c.id.clone(),
            if c.drained { "drained" } else { "active" }.into(),
            labels(c),
            c.address.clone(),
            format!("{} ago", span(now - c.connected_since)),
            format!("{} ago", span(now - c.last_seen)),
            c.in_flight.to_string(),
            c.tasks_sent.to_string(),
            c.done.to_string(),
            c.failed.to_string(),
        ]);
    }
    // With replicas, which one serves each agent.
    if rows.iter().any(|c| !c.replica.is_empty()) {
        table[0].insert(1, "REPLICA".into());
        for (row, c) in table.iter_mut().skip(1).zip(rows) {
            row.insert(1, c.replica.clone());
        }
    }
    let mut out = render(&table);
    out.push_str(&format!(
        "{} agent{} connected\n",
        rows.len(),
        plural(rows.len())
    ));
    out
}

/// An agent's labels as it was started with them: `role=web,zone=eu`.
pub(crate) fn labels(c: &ClientInfo) -> String {
    let sorted: std::collections::BTreeMap<_, _> = c.labels.iter().collect();
    let pairs: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(",")
}

/// Left-aligned columns two spaces apart.
fn render(table: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..table[0].len())
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A duration in the largest unit that keeps it short: `45s`, `3m12s`, `2h5m`, `3d4h`.
pub(crate) fn span(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_stay_short() {
        assert_eq!(span(-1.0), "0s");
        assert_eq!(span(45.9), "45s");
        assert_eq!(span(192.0), "3m12s");
        assert_eq!(span(7500.0), "2h5m");
        assert_eq!(span(3.0 * 86400.0 + 4.0 * 3600.0), "3d4h");
    }

    #[test]
    fn clients_line_up_in_columns_and_as_json_lines() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let row = |id: &str, done| ClientInfo {
            id: id.into(),
            labels: [
                ("zone".to_string(), "eu".to_string()),
                ("role".into(), "web".into()),
            ]
            .into_iter()
            .collect(),
            address: "ipv4:127.0.0.1:5000".into(),
            connected_since: 800.0,
            last_seen: 998.0,
            done,
            ..Default::default()
        };
        let rows = [row("web-1", 3), row("database-primary", 12)];
        let table = show_clients(&rows, false, now);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID                "), "{table}");
        assert!(lines[1].contains("3m20s ago  2s ago"), "{table}");
        assert!(lines[1].contains(" role=web,zone=eu "), "{table}");
        let done_at = lines[0].find("DONE").unwrap();
        assert_eq!(&lines[2][done_at..done_at + 2], "12", "{table}");
        assert_eq!(lines[3], "2 agents connected");
        let json = show_clients(&rows, true, now);
        let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(first["id"], "web-1");
        assert_eq!(first["done"], 3);
        assert_eq!(first["labels"], "role=web,zone=eu");
    }
}
