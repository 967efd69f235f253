//! `Metrics`: the server's numbers in the Prometheus text format, for
//! `--metrics-listen`. What happens on the hot path — results by outcome,
//! time to deliver, time to result, journal fsyncs — is counted as it
//! happens (atomic adds, no lock, nothing when metrics are off); what the
//! dispatcher already counts (tasks produced, sent, redelivered,
//! dead-lettered; agents, in flight, backlog) is read from it once per
//! scrape. Per-agent series only with `--metrics-per-agent`: a fleet of
//! 10,000 agents would otherwise make 10,000 series per name.

use crate::dispatch::{Counters, Dispatcher};
use crate::results::ResultRecord;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Mutex;
use std::time::SystemTime;

/// Buckets for times a task or a result takes, in seconds: from a
/// millisecond (a loopback round trip) to ten minutes (a long command).
const TASK_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// Buckets for one fsync, in seconds.
const FSYNC_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The registry and every series in it.
pub struct Metrics {
    registry: Registry,
    results: IntCounterVec,
    acknowledged: IntCounter,
    time_to_result: Histogram,
    time_to_deliver: Histogram,
    fsync: Histogram,
    produced: IntCounter,
    sent: IntCounter,
    redelivered: IntCounter,
    dead: IntCounter,
    agents: IntGauge,
    in_flight: IntGauge,
    backlog: IntGauge,
    per_agent: Option<PerAgent>,
    /// The dispatcher's counters at the last scrape (the counters above
    /// advance by the difference).
    last: Mutex<Counters>,
}

/// `--metrics-per-agent`: one series per connected agent.
struct PerAgent {
    in_flight: IntGaugeVec,
    results: IntGaugeVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(Opts::new(name, help)).expect("a valid metric name")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::with_opts(Opts::new(name, help)).expect("a valid metric name")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("a valid metric name")
}

impl Metrics {
    /// Every series at zero; `per_agent` adds the per-agent ones.
    pub fn new(per_agent: bool) -> Metrics {
        let registry = Registry::new();
        let results = IntCounterVec::new(
            Opts::new(
                "contact_results_total",
                "Results received, by outcome: ok, failed, refused (the agent asked for another try), stale (answering a delivery no longer current).",
            ),
            &["outcome"],
        )
        .expect("a valid metric name");
        let m = Metrics {
            results,
            acknowledged: counter(
                "contact_tasks_acknowledged_total",
                "Tasks finished by an accepted result (ok or failed).",
            ),
            time_to_result: histogram(
                "contact_time_to_result_seconds",
                "From a task's delivery to an agent to its accepted result.",
                TASK_SECONDS,
            ),
            time_to_deliver: histogram(
                "contact_time_to_deliver_seconds",
                "From a task's publication to its first delivery to an agent (written to its stream; in broadcast mode once per agent).",
                TASK_SECONDS,
            ),
            fsync: histogram(
                "contact_journal_fsync_seconds",
                "One commit of the state journal (write, flush and fsync).",
                FSYNC_SECONDS,
            ),
            produced: counter("contact_tasks_produced_total", "Tasks published."),
            sent: counter(
                "contact_tasks_sent_total",
                "Deliveries written to agents (a task delivered again counts again).",
            ),
            redelivered: counter(
                "contact_tasks_redelivered_total",
                "Deliveries made again: unanswered in time, refused, or their agent left.",
            ),
            dead: counter(
                "contact_tasks_dead_lettered_total",
                "Tasks given up on after their attempts (dead letters).",
            ),
            agents: gauge("contact_agents_connected", "Agents connected now."),
            in_flight: gauge(
                "contact_tasks_in_flight",
                "Deliveries written to agents and not answered yet.",
            ),
            backlog: gauge(
                "contact_tasks_backlog",
                "Tasks waiting for delivery: in queue mode those no agent holds; in broadcast mode the retained tasks each connected agent has not been offered yet, summed over agents.",
            ),
            per_agent: per_agent.then(|| PerAgent {
                in_flight: IntGaugeVec::new(
                    Opts::new("contact_agent_in_flight", "Deliveries an agent holds unanswered."),
                    &["agent"],
                )
                .expect("a valid metric name"),
                results: IntGaugeVec::new(
                    Opts::new(
                        "contact_agent_results",
                        "Results an agent sent in its current connection, by outcome (ok, failed).",
                    ),
                    &["agent", "outcome"],
                )
                .expect("a valid metric name"),
            }),
            registry,
            last: Mutex::new(Counters::default()),
        };
        let mut all: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.results.clone()),
            Box::new(m.acknowledged.clone()),
            Box::new(m.time_to_result.clone()),
            Box::new(m.time_to_deliver.clone()),
            Box::new(m.fsync.clone()),
            Box::new(m.produced.clone()),
            Box::new(m.sent.clone()),
            Box::new(m.redelivered.clone()),
            Box::new(m.dead.clone()),
            Box::new(m.agents.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.backlog.clone()),
        ];
        if let Some(p) = &m.per_agent {
            all.push(Box::new(p.in_flight.clone()));
            all.push(Box::new(p.results.clone()));
        }
        for c in all {
            m.registry.register(c).expect("each series registered once");
        }
        // Every outcome shows from the start, at 0.
        for outcome in ["ok", "failed", "refused", "stale"] {
            m.results.with_label_values(&[outcome]);
        }
        m
    }

    /// Counts judged results (on the result path: atomic adds only).
    pub fn observe_results<'a>(&self, records: impl IntoIterator<Item = &'a ResultRecord>) {
        for r in records {
            let outcome = match (r.retry, r.accepted, r.ok) {
                (true, _, _) => "refused",
                (false, false, _) => "stale",
                (false, true, true) => "ok",
                (false, true, false) => "failed",
            };
            self.results.with_label_values(&[outcome]).inc();
            if r.accepted {
                self.acknowledged.inc();
                if let Some(ms) = r.latency_ms {
                    self.time_to_result.observe(ms / 1000.0);
                }
            }
        }
    }

    /// Results received so far, and how many of them failed.
    pub fn result_counts(&self) -> (u64, u64) {
        let n = |o: &str| self.results.with_label_values(&[o]).get();
        let failed = n("failed");
        (n("ok") + failed + n("refused") + n("stale"), failed)
    }

    /// A task's first delivery to an agent, published at `produced_at`.
    pub fn observe_first_delivery(&self, produced_at: SystemTime) {
        let waited = produced_at.elapsed().unwrap_or_default();
        self.time_to_deliver.observe(waited.as_secs_f64());
    }

    /// The timer of journal commits (see `Journal::time_syncs`).
    pub fn fsync_timer(&self) -> Histogram {
        self.fsync.clone()
    }

    /// Brings the series read from `dispatcher` up to date.
    fn refresh(&self, dispatcher: &Dispatcher) {
        let now = dispatcher.counters();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.produced
            .inc_by(now.produced.saturating_sub(last.produced));
        self.sent.inc_by(now.sent.saturating_sub(last.sent));
        self.redelivered
            .inc_by(now.redelivered.saturating_sub(last.redelivered));
        self.dead.inc_by(now.dead.saturating_sub(last.dead));
        *last = now;
        drop(last);
        let g = dispatcher.gauges();
        self.agents.set(g.connected as i64);
        self.in_flight.set(g.in_flight as i64);
        self.backlog.set(g.backlog as i64);
        if let Some(p) = &self.per_agent {
            // Agents gone since the last scrape leave no series behind.
            p.in_flight.reset();
            p.results.reset();
            for c in dispatcher.clients() {
                p.in_flight
                    .with_label_values(&[&c.id])
                    .set(c.in_flight as i64);
                p.results
                    .with_label_values(&[&c.id, "ok"])
                    .set(c.done as i64);
                p.results
                    .with_label_values(&[&c.id, "failed"])
                    .set(c.failed as i64);
            }
        }
    }

    /// The text format page of a scrape.
    pub fn scrape(&self, dispatcher: &Dispatcher) -> String {
        self.refresh(dispatcher);
        let mut out = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("writing to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The `Content-Type` of [`Metrics::scrape`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ok: bool, accepted: bool, retry: bool) -> ResultRecord {
        ResultRecord {
            task_id: Some(1),
            task: Some("t".into()),
            client: "a".into(),
            ok,
            output: String::new(),
            latency_ms: Some(20.0),
            attempt: 1,
            stale: !accepted && !retry,
            retry,
            accepted,
            received_at: 0.0,
            seq: None,
        }
    }

    fn value(page: &str, series: &str) -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{page}"))
    }

    #[test]
    fn results_are_counted_by_outcome_and_timed_when_accepted() {
        let m = Metrics::new(false);
        m.observe_results(&[
            record(true, true, false),
            record(true, true, false),
            record(false, true, false),
            record(false, false, true),
            record(true, false, false),
        ]);
        let d = Dispatcher::new(crate::dispatch::DispatchConfig::default());
        let page = m.scrape(&d);
        assert_eq!(value(&page, "contact_results_total{outcome=\"ok\"}"), 2.0);
        assert_eq!(
            value(&page, "contact_results_total{outcome=\"failed\"}"),
            1.0
        );
        assert_eq!(
            value(&page, "contact_results_total{outcome=\"refused\"}"),
            1.0
        );
        assert_eq!(
            value(&page, "contact_results_total{outcome=\"stale\"}"),
            1.0
        );
        assert_eq!(value(&page, "contact_tasks_acknowledged_total"), 3.0);
        assert_eq!(value(&page, "contact_time_to_result_seconds_count"), 3.0);
        assert_eq!(
            value(&page, "contact_time_to_result_seconds_bucket{le=\"0.025\"}"),
            3.0
        );
        assert_eq!(value(&page, "contact_agents_connected"), 0.0);
        assert!(page.contains("# TYPE contact_tasks_sent_total counter"));
        assert!(
            !page.contains("contact_agent_in_flight"),
            "per agent is opt-in"
        );
    }
}
