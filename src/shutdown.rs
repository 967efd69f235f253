//! The shutdown signal passed down to every long-running part (producer,
//! result writer, client loops), instead of a global flag: triggering it once
//! wakes every waiter, including those blocked in a `crossbeam_channel::select!`.
//! A part that cannot go on (the recorder, when the disk fails) fires it with
//! a cause, which the others read to say why they stop.

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// A one-shot, cloneable "stop now" signal.
///
/// It is a channel on which nothing is ever sent: triggering drops the only
/// sender, so every receiver sees "disconnected" at once and forever.
#[derive(Clone)]
pub struct Shutdown {
    sender: Arc<Mutex<Option<Sender<()>>>>,
    receiver: Receiver<()>,
    /// Why it fired, when it fired because something failed (the first cause).
    failure: Arc<OnceLock<String>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal that has not fired yet.
    pub fn new() -> Shutdown {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Shutdown {
            sender: Arc::new(Mutex::new(Some(tx))),
            receiver: rx,
            failure: Arc::new(OnceLock::new()),
        }
    }

    /// Fires the signal; later calls do nothing.
    pub fn trigger(&self) {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Fires the signal because something failed; the first cause is kept
    /// (even if the signal had already fired for an ordinary stop).
    pub fn fail(&self, cause: String) {
        let _ = self.failure.set(cause);
        self.trigger();
    }

    /// The cause given to [`Shutdown::fail`], if it was called.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Whether the signal has fired.
    pub fn is_triggered(&self) -> bool {
        matches!(
            self.receiver.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        )
    }

    /// Sleeps for `timeout` unless the signal fires first; returns true if it fired.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        matches!(
            self.receiver.recv_timeout(timeout),
            Err(RecvTimeoutError::Disconnected)
        )
    }

    /// The receiver to use in `select!`: it becomes ready (disconnected) when the signal fires.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn trigger_wakes_a_waiter_early() {
        let s = Shutdown::new();
        assert!(!s.is_triggered());
        assert!(!s.wait_timeout(Duration::from_millis(1)));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_timeout(Duration::from_secs(30)));
        let start = Instant::now();
        s.trigger();
        assert!(t.join().unwrap());
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(s.is_triggered());
        s.trigger();
        assert!(s.is_triggered());
        assert_eq!(s.failure(), None, "an ordinary stop has no cause");
    }

    #[test]
    fn a_failure_fires_the_signal_and_keeps_the_first_cause() {
        let s = Shutdown::new();
        let seen_by = s.clone();
        s.fail("disk full".into());
        s.fail("later".into());
        assert!(seen_by.is_triggered());
        assert_eq!(seen_by.failure(), Some("disk full"));
    }
}
