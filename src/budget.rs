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

/// The key an agent is budgeted under: its id, or for an anonymous peer its
/// IPv4 address or IPv6 /64 (one host can cycle through a /64). The two
/// kinds of key cannot collide: agents' ids are prefixed.
pub fn budget_key(id: &str, ephemeral: bool) -> String {
    if !ephemeral {
        return format!("id:{id}");
    }
    // "ipv4:127.0.0.1:5555" / "ipv6:[2001:db8::1]:5555": drop the port.
    let addr = match id.rsplit_once(':') {
        Some((addr, port)) if port.bytes().all(|b| b.is_ascii_digit()) => addr,
        _ => id,
    };
    if let Some(v6) = addr
        .strip_prefix("ipv6:[")
        .and_then(|a| a.strip_suffix(']'))
        .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
    {
        let s = v6.segments();
        return format!("ipv6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3]);
    }
    addr.to_string()
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
        let map = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        self.over(map.get(key)?)
    }

    /// Why a window is over the limits, if it is and is not over yet.
    fn over(&self, w: &Window) -> Option<String> {
        let left = WINDOW.saturating_sub(w.started.elapsed());
        if left.is_zero() {
            return None;
        }
        let why = if w.results >= self.limits.results_per_minute {
            format!("{} stale results", w.results)
        } else if w.bytes >= self.limits.bytes_per_minute {
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
        let mut map = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES && !map.contains_key(key) {
            map.retain(|_, w| w.started.elapsed() < WINDOW);
            // Still full within one minute: the oldest window goes (a hard cap).
            if map.len() >= MAX_ENTRIES {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, w)| w.started)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
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
        self.over(w)
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
        for _ in 0..2 {
            assert!(b.charge("a", 1).is_none());
        }
        let why = b.charge("a", 1).unwrap();
        assert!(why.contains("3 stale results"), "{why}");
        assert!(b.exhausted("a").is_some());
        assert!(b.exhausted("b").is_none());
        assert!(b.charge("b", 100).unwrap().contains("100 bytes"));
        // A window that is over starts again.
        b.windows.lock().unwrap().get_mut("a").unwrap().started -= WINDOW;
        assert!(b.exhausted("a").is_none());
        assert!(b.charge("a", 1).is_none());
    }

    #[test]
    fn anonymous_peers_are_budgeted_by_address() {
        assert_eq!(budget_key("ipv4:127.0.0.1:5555", true), "ipv4:127.0.0.1");
        assert_eq!(
            budget_key("ipv6:[2001:db8:1:2:aa::1]:80", true),
            budget_key("ipv6:[2001:db8:1:2:bb::9]:81", true)
        );
        assert_eq!(budget_key("ipv6:[::1]:80", true), "ipv6:0:0:0:0::/64");
        assert_eq!(budget_key("ipv4:1.2.3.4", false), "id:ipv4:1.2.3.4");
    }

    #[test]
    fn the_map_is_capped_even_within_a_minute() {
        let b = StaleBudget::new(StaleLimits::default());
        for i in 0..MAX_ENTRIES + 50 {
            b.charge(&format!("k{i}"), 1);
        }
        assert!(b.windows.lock().unwrap().len() <= MAX_ENTRIES);
    }
}
