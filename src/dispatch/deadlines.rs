//! `Deadlines`: every time the dispatcher must act on by itself — a
//! client's earliest ack deadline, its silence deadline, its earliest retry
//! backoff (broadcast) — in one heap, soonest first, so that a clock tick
//! looks only at what is due. Entries are not removed when they stop
//! mattering: each carries a token (or session id) that the client's state
//! must still name when it comes due, and a deadline that moved later is
//! pushed again then. A client has at most one live entry of each kind.

use crate::registry::ClientId;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// What comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Due {
    /// The earliest ack deadline of a client's deliveries (token: its `ack_timer`).
    Ack,
    /// A connected client's silence limit (token: its session id).
    Silence,
    /// The earliest end of a refused task's backoff at a client (token: its `retry_timer`).
    Retry,
}

/// The heap of deadlines.
#[derive(Default)]
pub(super) struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, Due, ClientId, u64)>>,
}

impl Deadlines {
    pub(super) fn push(&mut self, at: Instant, due: Due, client: ClientId, token: u64) {
        self.heap.push(Reverse((at, due, client, token)));
    }

    /// The next entry whose time is before `now`, if any.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Due, ClientId, u64)> {
        if self.heap.peek()?.0 .0 >= now {
            return None;
        }
        let Reverse((_, due, client, token)) = self.heap.pop()?;
        Some((due, client, token))
    }

    /// Every entry, live or not (for tests).
    #[cfg(test)]
    pub(super) fn entries(&self) -> std::collections::HashSet<(Due, ClientId, u64)> {
        self.heap
            .iter()
            .map(|Reverse((_, due, client, token))| (*due, client.clone(), *token))
            .collect()
    }
}
