//! What a benchmark run found, as tables: the targets beside the
//! measurements with a pass/fail mark, then one table per measurement. The
//! same tables are printed and written into BENCHMARKS.md, between the
//! machine and command they were measured with and the explanation of how.

use crate::fanout::{self, Fanout};
use crate::latency::Latencies;
use crate::roundtrip::{Mode, Timed};
use crate::stats::{median, percentile, sorted};
use crate::store::{Setup, StoreRun, StoreSeries};
use std::fmt::Write;

/// Repeated runs of one configuration.
#[derive(Debug, Clone)]
pub struct Series {
    pub clients: usize,
    pub per_client: u64,
    pub runs: Vec<Timed>,
}

impl Series {
    pub fn new(clients: usize, per_client: u64) -> Series {
        Series {
            clients,
            per_client,
            runs: vec![],
        }
    }

    /// Median results per second over the runs.
    pub fn rate(&self) -> f64 {
        median(&self.runs.iter().map(Timed::rate).collect::<Vec<_>>())
    }

    pub fn secs(&self) -> f64 {
        median(&self.runs.iter().map(|t| t.secs).collect::<Vec<_>>())
    }

    fn runs_text(&self) -> String {
        let v: Vec<String> = self.runs.iter().map(|t| group(t.rate())).collect();
        v.join(" ")
    }
}

/// One contact configuration of the round trip.
#[derive(Debug, Clone)]
pub struct ContactSeries {
    pub mode: Mode,
    pub state: bool,
    pub series: Series,
}

impl ContactSeries {
    pub fn label(&self) -> String {
        let state = if self.state {
            "--state-dir"
        } else {
            "--no-state"
        };
        format!("{} {state}", self.mode.flag())
    }
}

/// Everything one run of the benchmark measured.
#[derive(Default)]
pub struct Results {
    pub contact: Vec<ContactSeries>,
    pub ceiling: Vec<Series>,
    pub python: Vec<Series>,
    pub latency: Vec<Latencies>,
    pub fanout: Option<Fanout>,
    /// The others' round trip without, then with, a client that stopped reading.
    pub stall: Option<(Series, Series)>,
    pub growth: Vec<Series>,
    /// g: the round trip on each store.
    pub store: Vec<StoreSeries>,
    /// g: latency at a fixed rate on each store (queue mode).
    pub store_latency: Vec<(Setup, Latencies)>,
    /// g: part d's fan-out on one replica with `--store` (one NATS node).
    pub store_fleet: Option<Fanout>,
}

impl Results {
    /// The round trip with default flags (broadcast, `--state-dir`) at `clients`.
    fn default_flags(&self, clients: usize) -> Option<&Series> {
        self.contact_at(Mode::Broadcast, true, clients)
    }

    pub fn contact_at(&self, mode: Mode, state: bool, clients: usize) -> Option<&Series> {
        self.contact
            .iter()
            .find(|c| c.mode == mode && c.state == state && c.series.clients == clients)
            .map(|c| &c.series)
    }

    fn at(list: &[Series], clients: usize) -> Option<&Series> {
        list.iter().find(|s| s.clients == clients)
    }

    /// Every target with its measurement and a pass/fail mark.
    pub fn targets(&self) -> String {
        let mut t = Table::new(&["target", "measured", "result"]);
        let rate_check = |t: &mut Table, clients: usize, min: f64| {
            let got = self.default_flags(clients).map(Series::rate);
            t.check(
                &format!(
                    "{clients} client{}: ≥ {} tasks/s round trip (default flags)",
                    plural(clients),
                    group(min)
                ),
                got.map(|r| format!("{}/s", group(r))),
                got.map(|r| r >= min),
            );
        };
        rate_check(&mut t, 1, 100_000.0);
        rate_check(&mut t, 8, 150_000.0);
        for clients in [1, 8] {
            let ours = self.default_flags(clients).map(Series::rate);
            let ceiling = Self::at(&self.ceiling, clients).map(Series::rate);
            if clients == 8 {
                let ratio = ours.zip(ceiling).map(|(a, b)| a / b);
                t.check(
                    "8 clients: ≥ 0.75 × the bare grpcio ceiling of the same run",
                    ratio.map(|r| format!("{r:.2} ×")),
                    ratio.map(|r| r >= 0.75),
                );
            }
            let python = Self::at(&self.python, clients).map(Series::rate);
            let ratio = ours.zip(python).map(|(a, b)| a / b);
            t.check(
                &format!(
                    "{clients} client{}: ≥ 30 × the Python pair of the same run",
                    plural(clients)
                ),
                ratio.map(|r| format!("{r:.1} ×")),
                ratio.map(|r| r >= 30.0),
            );
        }
        // The worst ratio of --state-dir to --no-state over every configuration.
        let worst = self
            .contact
            .iter()
            .filter(|c| c.state)
            .filter_map(|c| {
                let without = self.contact_at(c.mode, false, c.series.clients)?;
                Some((c.series.rate() / without.rate(), c))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0));
        t.check(
            "--state-dir: ≥ 0.8 × the same run without it (worst case)",
            worst.map(|(r, c)| {
                format!(
                    "{r:.2} × ({}, {} client{})",
                    c.mode.flag(),
                    c.series.clients,
                    plural(c.series.clients)
                )
            }),
            worst.map(|(r, _)| r >= 0.8),
        );
        let at_10k = self.latency.iter().find(|l| l.rate == 10_000);
        let p99 = |xs: &[f64]| percentile(&sorted(xs), 99.0);
        let back = at_10k.map(|l| p99(&l.back));
        t.check(
            "10,000 tasks/s offered: p99 producer → client < 2 ms",
            back.map(|ms| format!("{ms:.2} ms (→ result back)")),
            back.map(|ms| ms < 2.0),
        );
        let durable = at_10k.map(|l| p99(&l.durable));
        t.check(
            "10,000 tasks/s offered: p99 producer → result durable < 10 ms",
            durable.map(|ms| format!("{ms:.2} ms")),
            durable.map(|ms| ms < 10.0),
        );
        let (phases, fleet) = match &self.fanout {
            Some(Fanout::Measured { phases, agents }) => (
                Some(phases.as_slice()),
                format!(" ({} agents)", group(*agents as f64)),
            ),
            _ => (None, String::new()),
        };
        for (target, phase, key, limit, unit) in fanout::TARGETS {
            let got = phases.and_then(|p| fanout::value(p, phase, key));
            t.check(
                target,
                got.as_ref().map(|v| match v {
                    Ok(v) => format!("{} {unit}{fleet}", short(*v)),
                    Err(why) => format!("{why}{fleet}"),
                }),
                got.map(|v| v.is_ok_and(|v| v < *limit)),
            );
        }
        t.check(
            "dispatcher operations at 10,000 clients within 2 × their cost at 10",
            Some("see `cargo bench --bench dispatch` (criterion)".into()),
            None,
        );
        let stall = self
            .stall
            .as_ref()
            .map(|(without, with)| with.rate() / without.rate());
        t.check(
            "a client that stops reading lowers the others' throughput by < 10%",
            stall.map(|r| format!("{:+.1}%", (r - 1.0) * 100.0)),
            stall.map(|r| r > 0.9),
        );
        t.render()
    }

    /// a and b: throughput against clients, contact as a ratio of the others.
    pub fn round_trip(&self) -> String {
        let mut t = Table::new(&[
            "implementation",
            "clients",
            "tasks each",
            "results/s (median)",
            "÷ grpcio ceiling",
            "÷ Python pair",
            "runs (results/s)",
        ]);
        let mut rows: Vec<(String, &Series)> = vec![];
        for s in &self.ceiling {
            rows.push(("bare grpcio (ceiling)".into(), s));
        }
        for s in &self.python {
            rows.push(("seed Python pair".into(), s));
        }
        for c in &self.contact {
            rows.push((format!("contact {}", c.label()), &c.series));
        }
        for (label, s) in rows {
            let ratio = |list: &[Series]| {
                Self::at(list, s.clients).map_or("–".into(), |other| {
                    format!("{:.2}", s.rate() / other.rate())
                })
            };
            let is_contact = label.starts_with("contact");
            t.row(vec![
                label,
                s.clients.to_string(),
                group(s.per_client as f64),
                group(s.rate()),
                if is_contact {
                    ratio(&self.ceiling)
                } else {
                    "".into()
                },
                if is_contact {
                    ratio(&self.python)
                } else {
                    "".into()
                },
                s.runs_text(),
            ]);
        }
        t.render()
    }

    /// c: latency percentiles per offered rate.
    pub fn latency_table(&self) -> String {
        let mut t = Table::new(&LATENCY_COLUMNS);
        for l in &self.latency {
            t.row(latency_cells(l));
        }
        t.render()
    }

    /// d: what contact-load reported, phase by phase.
    pub fn fanout_table(&self) -> String {
        fanout_text(self.fanout.as_ref())
    }

    /// e: the others' throughput without and with a stalled client.
    pub fn stall_table(&self) -> String {
        let Some((without, with)) = &self.stall else {
            return "not run\n".into();
        };
        let mut t = Table::new(&["", "clients", "results/s (median)", "runs (results/s)"]);
        for (label, s) in [
            ("without a stalled client", without),
            ("with one stalled (SIGSTOP) client", with),
        ] {
            t.row(vec![
                label.into(),
                s.clients.to_string(),
                group(s.rate()),
                s.runs_text(),
            ]);
        }
        let change = (with.rate() / without.rate() - 1.0) * 100.0;
        format!("{}\nchange: {change:+.1}%\n", t.render())
    }

    /// f: time against the work, and the time per result (flat when linear).
    pub fn growth_table(&self) -> String {
        let mut t = Table::new(&[
            "clients",
            "tasks each",
            "results",
            "seconds",
            "µs per result",
        ]);
        for s in &self.growth {
            let results = s.clients as u64 * s.per_client;
            t.row(vec![
                s.clients.to_string(),
                group(s.per_client as f64),
                group(results as f64),
                format!("{:.2}", s.secs()),
                format!("{:.2}", s.secs() * 1e6 / results as f64),
            ]);
        }
        t.render()
    }
}

impl Results {
    /// g: the round trip on the journal and on JetStream, with what each
    /// task cost the NATS nodes and the replicas; then latency.
    pub fn store_table(&self) -> String {
        if self.store.is_empty() {
            return "not run\n".into();
        }
        let mut t = Table::new(&[
            "store",
            "contact-servers",
            "clients",
            "results/s (median)",
            "÷ journal",
            "NATS msgs/task",
            "NATS bytes/task",
            "replica↔NATS msgs/task",
            "replica↔NATS bytes/task",
            "contact-server CPU µs/task",
            "nats-server CPU µs/task",
            "runs (results/s)",
        ]);
        for s in &self.store {
            let journal = self
                .store
                .iter()
                .find(|j| j.setup.is_journal() && j.clients == s.clients);
            let per_task = |f: &dyn Fn(&StoreRun) -> Option<f64>| {
                let xs: Vec<f64> = s
                    .runs
                    .iter()
                    .filter_map(|r| f(r).map(|x| x / r.timed.results as f64))
                    .collect();
                median(&xs)
            };
            let number = |x: f64, decimals: usize| {
                if !x.is_finite() {
                    "–".into()
                } else if decimals == 0 {
                    group(x)
                } else {
                    format!("{x:.decimals$}")
                }
            };
            let mut runs: Vec<String> = s.runs.iter().map(|r| group(r.timed.rate())).collect();
            runs.extend(s.failed.iter().map(|_| "❌ LOST TASKS".to_string()));
            t.row(vec![
                s.setup.label(),
                s.setup.replicas.to_string(),
                s.clients.to_string(),
                group(s.rate()),
                journal.map_or("–".into(), |j| format!("{:.2}", s.rate() / j.rate())),
                number(per_task(&|r| r.nats.map(|n| n.msgs)), 1),
                number(per_task(&|r| r.nats.map(|n| n.bytes)), 0),
                number(per_task(&|r| r.nats.map(|n| n.contact_msgs)), 1),
                number(per_task(&|r| r.nats.map(|n| n.contact_bytes)), 0),
                number(per_task(&|r| Some(r.server_cpu_secs * 1e6)), 0),
                number(per_task(&|r| r.nats.map(|n| n.cpu_secs * 1e6)), 0),
                runs.join(" "),
            ]);
        }
        let mut out = t.render();
        if !self.store_latency.is_empty() {
            let mut header = vec!["store (queue mode, 1 client)"];
            header.extend(LATENCY_COLUMNS);
            let mut l = Table::new(&header);
            for (setup, lat) in &self.store_latency {
                let mut row = vec![setup.label()];
                row.extend(latency_cells(lat));
                l.row(row);
            }
            out.push('\n');
            out.push_str(&l.render());
        }
        if let Some(fleet) = &self.store_fleet {
            out.push_str(&format!(
                "\nA fleet (part d's phases, broadcast) on one replica with `{}`: ",
                crate::store::FLEET_SETUP.label()
            ));
            out.push_str(&fanout_text(Some(fleet)));
        }
        out
    }
}

impl StoreSeries {
    /// Median results per second over the runs.
    pub fn rate(&self) -> f64 {
        median(&self.runs.iter().map(|r| r.timed.rate()).collect::<Vec<_>>())
    }
}

/// The columns of [`latency_cells`].
const LATENCY_COLUMNS: [&str; 6] = [
    "offered",
    "achieved",
    "tasks",
    "→ sent p50 / p99 / p99.9",
    "→ result back p50 / p99 / p99.9",
    "→ durable p50 / p99 / p99.9",
];

/// One latency run as table cells: rates, tasks and percentiles.
fn latency_cells(l: &Latencies) -> Vec<String> {
    let pcts = |xs: &[f64]| {
        let s = sorted(xs);
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            percentile(&s, 50.0),
            percentile(&s, 99.0),
            percentile(&s, 99.9)
        )
    };
    vec![
        format!("{}/s", group(l.rate as f64)),
        format!("{}/s", group(l.achieved)),
        group(l.tasks as f64),
        pcts(&l.sent),
        pcts(&l.back),
        pcts(&l.durable),
    ]
}

/// What contact-load reported, phase by phase (or why it did not run).
fn fanout_text(fanout: Option<&Fanout>) -> String {
    match fanout {
        None => "not run\n".into(),
        Some(Fanout::Skipped(why)) => format!("{why}\n"),
        Some(Fanout::Measured { agents, phases }) => {
            let mut header = vec!["phase", "complete"];
            header.extend(fanout::COLUMNS.iter().map(|(h, _)| *h));
            let mut t = Table::new(&header);
            for p in phases.iter().filter(|p| p.is_load_phase()) {
                let mut row = vec![p.name.clone(), if p.complete { "yes" } else { "NO" }.into()];
                for (_, key) in fanout::COLUMNS {
                    row.push(p.get(key).map_or(String::new(), short));
                }
                t.row(row);
            }
            let notes: Vec<String> = fanout::NOTES
                .iter()
                .filter_map(|(what, phase, key)| {
                    let v = phases.iter().find(|p| p.name == *phase)?.get(key)?;
                    Some(format!("{what}: {}", short(v)))
                })
                .collect();
            format!(
                "{} agents\n\n{}\n{}\n",
                group(*agents as f64),
                t.render(),
                notes.join("; ")
            )
        }
    }
}

/// A Markdown table, readable as plain text too.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: vec![],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn check(&mut self, target: &str, measured: Option<String>, pass: Option<bool>) {
        let mark = match (pass, &measured) {
            (Some(true), _) => "✅ pass",
            (Some(false), _) => "❌ FAIL",
            (None, Some(_)) => "–",
            (None, None) => "– not measured",
        };
        self.row(vec![
            target.into(),
            measured.unwrap_or_else(|| "–".into()),
            mark.into(),
        ]);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let width: Vec<usize> = (0..cols)
            .map(|i| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, w) in width.iter().enumerate() {
                let c = cells.get(i).map_or("", String::as_str);
                let pad = w - c.chars().count();
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.header);
        out.push('|');
        for w in &width {
            let _ = write!(out, "{}|", "-".repeat(w + 2));
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// 123456.7 → "123,457".
pub fn group(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let n = x.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A number as read: whole ones grouped, small ones with three significant digits.
fn short(x: f64) -> String {
    if x.abs() >= 100.0 || x.fract() == 0.0 {
        group(x)
    } else {
        format!("{x:.3}")
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
