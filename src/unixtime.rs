//! Unix time as the results files, the admin API, the web view and the
//! shared store carry it: seconds since the epoch as an `f64` (0 for a
//! clock set before 1970).

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in Unix seconds.
pub fn seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Now, in Unix seconds.
pub fn now() -> f64 {
    seconds(SystemTime::now())
}
