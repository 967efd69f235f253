//! `StaleBudget`: how many results that answer nothing (stale results) an
//! agent may send per minute, by count and by bytes. Stale results are
//! recorded and fsync'd like any other, so without a budget one peer could
//! fill the disk with them. An agent over its budget has its `tellResult`
//! calls refused (RESOURCE_EXHAUSTED) until the minute is over. Anonymous
//! peers are budgeted by IP address, not by connection, so reconnecting does
//! not refill their budget.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window budgets are counted over.
const WINDOW: Duration = Duration::from_secs(60);

/// Budget entries kept before idle ones are dropped.
const MAX_ENTRIES: usize = 10_000;

/// Limits per agent and minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleLimits {
    pub results_per_minute: u64,
    pub bytes_per_minute: u64,
}

impl Default for StaleLimits {
    fn default() -> Self {
        StaleLimits {
            results_per_minute: 1000,
            bytes_per_minute: 1 << 20,
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    results: u64,
    bytes: u64,
}

/// Every agent's stale results in the current minute.
#[derive(Debug)]
pub struct StaleBudget {
    limits: StaleLimits,
    windows: Mutex<HashMap<String, Window>>,
}

/// The key an agent is budgeted under: its id, or an anonymous peer's IP.
pub fn budget_key(id: &str, ephemeral: bool) -> String {
    if !ephemeral {
        return id.to_string();
    }
    // "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555": drop the port.
    match id.rsplit_once(':') {
        Some((addr, port)) if port.bytes().all(|b| b.is_ascii_digit()) => addr.to_string(),
        _ => id.to_string(),
    }
}

impl StaleBudget {
    pub fn new(limits: StaleLimits) -> StaleBudget {
        StaleBudget {
            limits,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Why `key`'s calls are refused right now, if they are.
    pub fn exhausted(&self, key: &str) -> Option<String> {
        let w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let w = w.get(key)?;
        let left = WINDOW.saturating_sub(w.started.elapsed());
        if left.is_zero() {
            return None;
        }
        let why = if w.results > self.limits.results_per_minute {
            format!("{} stale results", w.results)
        } else if w.bytes > self.limits.bytes_per_minute {
            format!("{} bytes of stale results", w.bytes)
        } else {
            return None;
        };
        Some(format!(
            "{why} this minute (limits: {} results, {} bytes per minute); results are refused for {}s",
            self.limits.results_per_minute,
            self.limits.bytes_per_minute,
            left.as_secs() + 1
        ))
    }

    /// Counts one stale result of `bytes` from `key`; returns why its calls are
    /// refused from now on if this one went over the budget.
    pub fn charge(&self, key: &str, bytes: usize) -> Option<String> {
        {
            let mut map = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
                map.retain(|_, w| w.started.elapsed() < WINDOW);
            }
            let w = map.entry(key.to_string()).or_insert_with(|| Window {
                started: Instant::now(),
                results: 0,
                bytes: 0,
            });
            if w.started.elapsed() >= WINDOW {
                *w = Window {
                    started: Instant::now(),
                    results: 0,
                    bytes: 0,
                };
            }
            w.results += 1;
            w.bytes += bytes as u64;
        }
        self.exhausted(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_runs_out_by_count_or_bytes_per_key() {
        let b = StaleBudget::new(StaleLimits {
            results_per_minute: 3,
            bytes_per_minute: 100,
        });
        for _ in 0..3 {
            assert!(b.charge("a", 1).is_none());
        }
        let why = b.charge("a", 1).unwrap();
        assert!(why.contains("4 stale results"), "{why}");
        assert!(b.exhausted("a").is_some());
        assert!(b.exhausted("b").is_none());
        assert!(b.charge("b", 101).unwrap().contains("101 bytes"));
        // A window that is over starts again.
        b.windows.lock().unwrap().get_mut("a").unwrap().started -= WINDOW;
        assert!(b.exhausted("a").is_none());
        assert!(b.charge("a", 1).is_none());
    }

    #[test]
    fn anonymous_peers_are_budgeted_by_address() {
        assert_eq!(budget_key("ipv4:127.0.0.1:5555", true), "ipv4:127.0.0.1");
        assert_eq!(budget_key("ipv6:[::1]:80", true), "ipv6:[::1]");
        assert_eq!(budget_key("web:1", false), "web:1");
    }
}
