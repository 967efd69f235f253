//! `contact-ctl top`'s model: what two polls of a server's admin API say
//! together — each agent's results per second and the fleet's, from the
//! difference of their counters — made into the rows and lines the screen
//! shows, sorted by the column the operator chose, and what is shown while
//! the server cannot be reached. The terminal itself (drawing, keys) is
//! [`screen`]; nothing here touches it, so all of it is tested as data.

pub mod screen;

use crate::ctl::{self, Ctl};
use crate::error::Error;
use crate::proto::admin::{ClientInfo, Job};
use std::cmp::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How many of the newest jobs are shown under the agents.
pub const JOBS_SHOWN: usize = 5;

/// What one poll of the server saw.
#[derive(Debug, Clone)]
pub struct Poll {
    /// When the agents' counters were read (the answer to ListClients).
    pub taken_at: Instant,
    pub clients: Vec<ClientInfo>,
    /// Newest first, as ListJobs answers.
    pub jobs: Vec<Job>,
}

/// Asks the server for its agents and jobs.
pub fn poll(ctl: &Ctl) -> Result<Poll, Error> {
    let clients = ctl.clients()?;
    let taken_at = Instant::now();
    let jobs = ctl.jobs()?;
    Ok(Poll {
        taken_at,
        clients,
        jobs,
    })
}

/// The column the agents are sorted by; `s` on the screen goes to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortColumn {
    Id,
    Rate,
    InFlight,
    Done,
    Failed,
    LastSeen,
}

impl SortColumn {
    /// The next column, after the last the first again.
    pub fn next(self) -> SortColumn {
        match self {
            SortColumn::Id => SortColumn::Rate,
            SortColumn::Rate => SortColumn::InFlight,
            SortColumn::InFlight => SortColumn::Done,
            SortColumn::Done => SortColumn::Failed,
            SortColumn::Failed => SortColumn::LastSeen,
            SortColumn::LastSeen => SortColumn::Id,
        }
    }

    /// Its heading in the agents' table.
    pub fn title(self) -> &'static str {
        match self {
            SortColumn::Id => "ID",
            SortColumn::Rate => "RESULTS/S",
            SortColumn::InFlight => "IN FLIGHT",
            SortColumn::Done => "DONE",
            SortColumn::Failed => "FAILED",
            SortColumn::LastSeen => "LAST SEEN",
        }
    }

    /// `a` before `b`: ids ascending, everything else busiest (or most
    /// recently seen) first; ties by id.
    fn order(self, a: &AgentRow, b: &AgentRow) -> Ordering {
        let by = match self {
            SortColumn::Id => Ordering::Equal,
            SortColumn::Rate => b.rate.unwrap_or(-1.0).total_cmp(&a.rate.unwrap_or(-1.0)),
            SortColumn::InFlight => b.in_flight.cmp(&a.in_flight),
            SortColumn::Done => b.done.cmp(&a.done),
            SortColumn::Failed => b.failed.cmp(&a.failed),
            SortColumn::LastSeen => a.last_seen_ago.total_cmp(&b.last_seen_ago),
        };
        by.then_with(|| a.id.cmp(&b.id))
    }
}

/// The headings of the agents' table, in the order of [`AgentRow::cells`].
pub const AGENT_COLUMNS: [&str; 8] = [
    "ID",
    "STATE",
    "LABELS",
    "IN FLIGHT",
    "DONE",
    "FAILED",
    "RESULTS/S",
    "LAST SEEN",
];

/// One connected agent as the table shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRow {
    pub id: String,
    pub drained: bool,
    pub labels: String,
    pub in_flight: u64,
    pub done: u64,
    pub failed: u64,
    /// Results (succeeded or failed) per second between the last two polls;
    /// None on its first poll, or when its connection was replaced between
    /// them (its counters started again).
    pub rate: Option<f64>,
    /// Seconds since the server last heard from it.
    pub last_seen_ago: f64,
}

impl AgentRow {
    /// Its cells, under [`AGENT_COLUMNS`].
    pub fn cells(&self) -> [String; 8] {
        [
            self.id.clone(),
            if self.drained { "drained" } else { "active" }.into(),
            self.labels.clone(),
            self.in_flight.to_string(),
            self.done.to_string(),
            self.failed.to_string(),
            self.rate.map_or("-".into(), |r| format!("{r:.1}")),
            format!("{} ago", ctl::span(self.last_seen_ago)),
        ]
    }
}

/// The headings of the jobs' table, in the order of [`JobRow::cells`].
pub const JOB_COLUMNS: [&str; 7] = ["JOB", "PUSHED", "TARGET", "OK", "FAILED", "WAITING", "TEXT"];

/// One of the newest jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: u64,
    pub pushed_ago: f64,
    pub target: String,
    pub counts: ctl::JobCounts,
    pub text: String,
}

impl JobRow {
    /// Its cells, under [`JOB_COLUMNS`].
    pub fn cells(&self) -> [String; 7] {
        [
            self.id.to_string(),
            format!("{} ago", ctl::span(self.pushed_ago)),
            self.target.clone(),
            self.counts.ok.to_string(),
            self.counts.failed.to_string(),
            self.counts.waiting.to_string(),
            self.text.clone(),
        ]
    }
}

/// The fleet's totals over the last refresh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetRates {
    pub results_per_sec: f64,
    pub failures_per_sec: f64,
}

/// Everything on the screen at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// The first line: the server, the agents connected and the rates, or
    /// that the server cannot be reached.
    pub status: String,
    /// The server did not answer the last poll.
    pub unreachable: bool,
    pub agents: Vec<AgentRow>,
    pub jobs: Vec<JobRow>,
    pub sort: SortColumn,
    /// The keys, and the sort column.
    pub help: String,
}

/// The state of a `top` session: the last two good polls, and the failure
/// since when the server has not answered, if it has not.
pub struct Top {
    server: String,
    interval: Duration,
    sort: SortColumn,
    previous: Option<Poll>,
    latest: Option<Poll>,
    /// Why the last poll failed, and when the first failure of this outage came.
    down: Option<(String, Instant)>,
}

impl Top {
    pub fn new(server: &str, interval: Duration) -> Top {
        Top {
            server: server.into(),
            interval,
            sort: SortColumn::Id,
            previous: None,
            latest: None,
            down: None,
        }
    }

    /// Takes in a poll's outcome, at `now`.
    pub fn record(&mut self, outcome: Result<Poll, Error>, now: Instant) {
        match outcome {
            Ok(poll) => {
                self.previous = self.latest.replace(poll);
                self.down = None;
            }
            Err(e) => {
                let since = self.down.as_ref().map_or(now, |(_, since)| *since);
                self.down = Some((e.to_string(), since));
            }
        }
    }

    pub fn cycle_sort(&mut self) {
        self.sort = self.sort.next();
    }

    /// Results per second between the last two polls, the fleet's; None
    /// before there are two.
    pub fn fleet_rates(&self) -> Option<FleetRates> {
        let (prev, cur) = (self.previous.as_ref()?, self.latest.as_ref()?);
        let secs = cur.taken_at.duration_since(prev.taken_at).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let (mut results, mut failures) = (0, 0);
        for c in &cur.clients {
            if let Some(before) = same_connection(prev, c) {
                results += (c.done + c.failed).saturating_sub(before.done + before.failed);
                failures += c.failed.saturating_sub(before.failed);
            }
        }
        Some(FleetRates {
            results_per_sec: results as f64 / secs,
            failures_per_sec: failures as f64 / secs,
        })
    }

    /// The screen's contents at `now` (the wall clock, for "seconds ago",
    /// and the monotonic one, for how long the server has been down).
    pub fn view(&self, wall: SystemTime, now: Instant) -> View {
        let wall = wall
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let interval = format!("every {}", seconds(self.interval));
        let status = match (&self.down, &self.latest) {
            (Some((why, since)), _) => format!(
                "{}: UNREACHABLE for {}, retrying {interval}: {why}",
                self.server,
                ctl::span(now.duration_since(*since).as_secs_f64())
            ),
            (None, None) => format!("{}: connecting...", self.server),
            (None, Some(latest)) => {
                let n = latest.clients.len();
                let rates =
                    self.fleet_rates()
                        .map_or("- results/s, - failures/s".to_string(), |r| {
                            format!(
                                "{:.1} results/s, {:.1} failures/s",
                                r.results_per_sec, r.failures_per_sec
                            )
                        });
                format!(
                    "{}: {n} agent{}, {rates} ({interval})",
                    self.server,
                    if n == 1 { "" } else { "s" }
                )
            }
        };
        let mut agents: Vec<AgentRow> = self
            .latest
            .iter()
            .flat_map(|cur| {
                cur.clients.iter().map(|c| AgentRow {
                    id: c.id.clone(),
                    drained: c.drained,
                    labels: ctl::labels(c),
                    in_flight: c.in_flight,
                    done: c.done,
                    failed: c.failed,
                    rate: self.agent_rate(cur, c),
                    last_seen_ago: wall - c.last_seen,
                })
            })
            .collect();
        agents.sort_by(|a, b| self.sort.order(a, b));
        let jobs = self
            .latest
            .iter()
            .flat_map(|cur| cur.jobs.iter().take(JOBS_SHOWN))
            .map(|j| JobRow {
                id: j.job_id,
                pushed_ago: wall - j.created_at,
                target: j.target.clone(),
                counts: ctl::job_counts(j),
                text: j.text.clone(),
            })
            .collect();
        View {
            status,
            unreachable: self.down.is_some(),
            agents,
            jobs,
            sort: self.sort,
            help: format!(
                "q quit · s sort (by {}) · agents' results/s over the last refresh",
                self.sort.title()
            ),
        }
    }

    /// `c`'s results per second since the previous poll, if that poll saw
    /// the same connection.
    fn agent_rate(&self, cur: &Poll, c: &ClientInfo) -> Option<f64> {
        let prev = self.previous.as_ref()?;
        let before = same_connection(prev, c)?;
        let secs = cur.taken_at.duration_since(prev.taken_at).as_secs_f64();
        let answered = (c.done + c.failed).checked_sub(before.done + before.failed)?;
        (secs > 0.0).then(|| answered as f64 / secs)
    }
}

/// `c` as `poll` saw it, when that was the same connection (its counters
/// count from the connection's start).
fn same_connection<'a>(poll: &'a Poll, c: &ClientInfo) -> Option<&'a ClientInfo> {
    poll.clients
        .iter()
        .find(|p| p.id == c.id && p.connected_since == c.connected_since)
}

/// `1s`, `0.2s`.
fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::admin::JobTotals;

    fn agent(id: &str, done: u64, failed: u64) -> ClientInfo {
        ClientInfo {
            id: id.into(),
            connected_since: 100.0,
            last_seen: 990.0,
            done,
            failed,
            ..Default::default()
        }
    }

    fn poll_at(at: Instant, clients: Vec<ClientInfo>) -> Poll {
        Poll {
            taken_at: at,
            clients,
            jobs: vec![],
        }
    }

    const WALL: Duration = Duration::from_secs(1000);

    fn view(top: &Top, now: Instant) -> View {
        top.view(UNIX_EPOCH + WALL, now)
    }

    #[test]
    fn rates_are_the_difference_of_two_polls_over_the_time_between() {
        let t0 = Instant::now();
        let mut top = Top::new("127.0.0.1:50051", Duration::from_secs(1));
        top.record(
            Ok(poll_at(t0, vec![agent("a", 10, 1), agent("b", 0, 0)])),
            t0,
        );
        // One poll: no rate yet.
        let v = view(&top, t0);
        assert_eq!(top.fleet_rates(), None);
        assert_eq!(v.agents[0].rate, None);
        assert!(v.status.contains("2 agents, - results/s"), "{}", v.status);

        let t1 = t0 + Duration::from_millis(500);
        top.record(
            Ok(poll_at(t1, vec![agent("a", 14, 2), agent("b", 3, 0)])),
            t1,
        );
        let v = view(&top, t1);
        // a: 5 results in 0.5 s; b: 3.
        assert_eq!(v.agents[0].rate, Some(10.0));
        assert_eq!(v.agents[1].rate, Some(6.0));
        assert_eq!(
            top.fleet_rates(),
            Some(FleetRates {
                results_per_sec: 16.0,
                failures_per_sec: 2.0
            })
        );
        assert_eq!(
            v.status,
            "127.0.0.1:50051: 2 agents, 16.0 results/s, 2.0 failures/s (every 1s)"
        );
    }

    #[test]
    fn a_new_connection_or_a_newcomer_has_no_rate_and_does_not_count() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut top = Top::new("s", Duration::from_secs(1));
        top.record(
            Ok(poll_at(t0, vec![agent("a", 50, 0), agent("b", 5, 0)])),
            t0,
        );
        let mut reconnected = agent("a", 2, 0);
        reconnected.connected_since = 500.0;
        top.record(
            Ok(poll_at(
                t1,
                vec![reconnected, agent("b", 7, 0), agent("c", 9, 0)],
            )),
            t1,
        );
        let v = view(&top, t1);
        let rates: Vec<(String, Option<f64>)> =
            v.agents.iter().map(|r| (r.id.clone(), r.rate)).collect();
        assert_eq!(
            rates,
            [
                ("a".into(), None),
                ("b".into(), Some(2.0)),
                ("c".into(), None)
            ]
        );
        assert_eq!(top.fleet_rates().unwrap().results_per_sec, 2.0);
    }

    #[test]
    fn rows_show_state_labels_counts_and_times() {
        let t0 = Instant::now();
        let mut top = Top::new("s", Duration::from_millis(200));
        let mut c = agent("web-1", 3, 1);
        c.drained = true;
        c.in_flight = 2;
        c.labels = [("zone", "eu"), ("role", "web")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        top.record(Ok(poll_at(t0, vec![c.clone()])), t0);
        c.done = 5;
        let t1 = t0 + Duration::from_millis(200);
        top.record(Ok(poll_at(t1, vec![c])), t1);
        let v = view(&top, t1);
        assert_eq!(
            v.agents[0].cells(),
            [
                "web-1",
                "drained",
                "role=web,zone=eu",
                "2",
                "5",
                "1",
                "10.0",
                "10s ago"
            ]
            .map(String::from)
        );
        assert!(v.status.ends_with("(every 0.2s)"), "{}", v.status);
    }

    #[test]
    fn sorting_cycles_through_the_columns_busiest_first() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut top = Top::new("s", Duration::from_secs(1));
        let mut quiet = agent("a-quiet", 100, 0);
        quiet.in_flight = 0;
        let mut busy = agent("b-busy", 1, 5);
        busy.in_flight = 4;
        busy.last_seen = 999.0;
        top.record(Ok(poll_at(t0, vec![quiet.clone(), busy.clone()])), t0);
        busy.done = 11;
        top.record(Ok(poll_at(t1, vec![quiet, busy])), t1);
        let order =
            |top: &Top| -> Vec<String> { view(top, t1).agents.into_iter().map(|r| r.id).collect() };
        let mut seen = vec![];
        for _ in 0..6 {
            let v = view(&top, t1);
            assert!(
                v.help.contains(&format!("by {}", v.sort.title())),
                "{}",
                v.help
            );
            seen.push((v.sort, order(&top)[0].clone()));
            top.cycle_sort();
        }
        assert_eq!(
            seen,
            [
                (SortColumn::Id, "a-quiet".to_string()),
                (SortColumn::Rate, "b-busy".into()),
                (SortColumn::InFlight, "b-busy".into()),
                (SortColumn::Done, "a-quiet".into()),
                (SortColumn::Failed, "b-busy".into()),
                (SortColumn::LastSeen, "b-busy".into()),
            ]
        );
        // After the last, the first again.
        assert_eq!(view(&top, t1).sort, SortColumn::Id);
    }

    #[test]
    fn an_unreachable_server_is_said_and_the_last_rows_stay() {
        let t0 = Instant::now();
        let mut top = Top::new("10.0.0.1:50051", Duration::from_secs(1));
        assert_eq!(view(&top, t0).status, "10.0.0.1:50051: connecting...");
        top.record(Ok(poll_at(t0, vec![agent("a", 1, 0)])), t0);
        let refused = || Err(Error::Remote("clients: cannot reach the server".into()));
        top.record(refused(), t0 + Duration::from_secs(1));
        top.record(refused(), t0 + Duration::from_secs(5));
        let v = view(&top, t0 + Duration::from_secs(65));
        assert!(v.unreachable);
        assert_eq!(
            v.status,
            "10.0.0.1:50051: UNREACHABLE for 1m4s, retrying every 1s: clients: cannot reach the server"
        );
        assert_eq!(v.agents.len(), 1);
        // It answers again: the rate spans the outage.
        let t9 = t0 + Duration::from_secs(10);
        top.record(Ok(poll_at(t9, vec![agent("a", 21, 0)])), t9);
        let v = view(&top, t9);
        assert!(!v.unreachable);
        assert_eq!(v.agents[0].rate, Some(2.0));
    }

    #[test]
    fn the_newest_jobs_show_their_counts() {
        let t0 = Instant::now();
        let mut top = Top::new("s", Duration::from_secs(1));
        let jobs: Vec<Job> = (1..=8)
            .rev()
            .map(|id| Job {
                job_id: id,
                text: format!("task {id}"),
                target: "every agent".into(),
                created_at: 995.0,
                totals: Some(JobTotals {
                    agents: 6,
                    ok: 2,
                    failed: 1,
                    dead: 1,
                    running: 1,
                    held: 1,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .collect();
        let mut p = poll_at(t0, vec![]);
        p.jobs = jobs;
        top.record(Ok(p), t0);
        let v = view(&top, t0);
        assert_eq!(v.jobs.len(), JOBS_SHOWN);
        assert_eq!(
            v.jobs[0].cells(),
            ["8", "5s ago", "every agent", "2", "2", "2", "task 8"].map(String::from)
        );
        assert_eq!(v.jobs[4].id, 4);
    }
}
