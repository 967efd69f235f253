//! `Backoff`: how long a client waits before dialling again. Capped
//! exponential growth keeps a fleet from hammering a restarting server, and
//! jitter keeps thousands of agents from reconnecting in lockstep.

use std::time::Duration;

/// Capped exponential backoff with jitter (each delay is drawn from the upper half).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles per failure, never exceeds `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        ceiling.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// The longest delay (with jitter), and growth stays there: for a server
    /// that refused us (bad credentials, id in use), where trying sooner only adds load.
    pub fn refused_delay(&mut self) -> Duration {
        self.attempt = 20;
        self.max.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// Back to `initial` after a session that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubles_caps_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= ms(50) && d[0] <= ms(100));
        assert!(d[2] >= ms(200) && d[2] <= ms(400));
        assert!(d.iter().all(|x| *x <= ms(1000)));
        assert!(d[7] >= ms(500));
        b.reset();
        assert!(b.next_delay() <= ms(100));
        assert!(b.refused_delay() >= ms(500));
        assert!(b.next_delay() >= ms(500));
    }
}
