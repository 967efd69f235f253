//! What a phase adds up to: when each agent received the phase's task and
//! had its result acknowledged, and the count, time until all and
//! percentiles of those moments.

use std::time::Instant;

/// When each agent did something in a phase, and what that adds up to.
#[derive(Debug, Clone)]
pub struct Tally {
    start: Instant,
    received: Vec<Option<Instant>>,
    acknowledged: Vec<Option<Instant>>,
}

/// How long the agents took for one step of a phase, from its start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Agents that got there.
    pub count: usize,
    /// Until the last agent got there; `None` unless all did.
    pub all_secs: Option<f64>,
    pub p50_secs: Option<f64>,
    pub p99_secs: Option<f64>,
}

impl Tally {
    pub fn new(agents: usize, start: Instant) -> Tally {
        Tally {
            start,
            received: vec![None; agents],
            acknowledged: vec![None; agents],
        }
    }

    /// Agent `agent` received the phase's task at `at` (the first time counts).
    pub fn received(&mut self, agent: usize, at: Instant) {
        if let Some(slot @ None) = self.received.get_mut(agent) {
            *slot = Some(at);
        }
    }

    /// The server acknowledged agent `agent`'s result at `at`.
    pub fn acknowledged(&mut self, agent: usize, at: Instant) {
        if let Some(slot @ None) = self.acknowledged.get_mut(agent) {
            *slot = Some(at);
        }
    }

    /// Every agent received the task and had its result acknowledged.
    pub fn complete(&self) -> bool {
        self.received.iter().all(Option::is_some) && self.acknowledged.iter().all(Option::is_some)
    }

    pub fn receipts(&self) -> Timing {
        timing(self.start, &self.received)
    }

    pub fn acknowledgements(&self) -> Timing {
        timing(self.start, &self.acknowledged)
    }
}

/// Count, time until all, and nearest-rank p50/p99 of `times` since `start`.
pub fn timing(start: Instant, times: &[Option<Instant>]) -> Timing {
    let mut secs: Vec<f64> = times
        .iter()
        .flatten()
        .map(|t| t.saturating_duration_since(start).as_secs_f64())
        .collect();
    secs.sort_by(f64::total_cmp);
    let rank = |q: f64| -> Option<f64> {
        let n = secs.len();
        (n > 0).then(|| secs[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
    };
    Timing {
        count: secs.len(),
        all_secs: (secs.len() == times.len()).then(|| rank(1.0)).flatten(),
        p50_secs: rank(0.5),
        p99_secs: rank(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timings_count_who_got_there_and_how_fast() {
        let t0 = Instant::now();
        let at = |ms| Some(t0 + Duration::from_millis(ms));
        let mut tally = Tally::new(4, t0);
        tally.received(0, t0 + Duration::from_millis(400));
        tally.received(1, t0 + Duration::from_millis(100));
        tally.received(1, t0 + Duration::from_millis(900)); // the first receipt counts
        tally.received(9, t0); // no such agent
        let r = tally.receipts();
        assert_eq!(r.count, 2);
        assert_eq!(r.all_secs, None, "not all agents received it");
        assert_eq!(r.p50_secs, Some(0.1));
        assert_eq!(r.p99_secs, Some(0.4));
        assert!(!tally.complete());
        tally.received(2, t0 + Duration::from_millis(200));
        tally.received(3, t0 + Duration::from_millis(300));
        assert_eq!(tally.receipts().all_secs, Some(0.4));
        assert!(!tally.complete(), "no result is acknowledged yet");
        for a in 0..4 {
            tally.acknowledged(a, t0 + Duration::from_millis(500 + a as u64));
        }
        assert!(tally.complete());
        assert_eq!(tally.acknowledgements().all_secs, Some(0.503));
        let hundred: Vec<Option<Instant>> = (1..=100).map(at).collect();
        let t = timing(t0, &hundred);
        assert_eq!((t.p50_secs, t.p99_secs), (Some(0.05), Some(0.099)));
        assert_eq!(timing(t0, &[None, None]).p50_secs, None);
    }
}
