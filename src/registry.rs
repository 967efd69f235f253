//! `ClientRegistry`: who is connected right now and what each client has done
//! (address, since when, tasks sent, results received, last sign of life).
//! It answers operators' questions and feeds the periodic stats line; the
//! dispatcher updates it under its own lock so the two never disagree.

use crate::labels::{Labels, Selector};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// A client's id, shared by the dispatcher's indexes that name it.
pub type ClientId = Arc<str>;

/// A point-in-time view of one client, for logs, stats and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientInfo {
    /// The id from the `contact-client-id` metadata, or the peer address for seed clients.
    pub id: String,
    /// The peer address gRPC reports, e.g. `ipv4:127.0.0.1:53422`.
    pub peer: String,
    /// The labels it reported when it connected.
    pub labels: Labels,
    pub connected_since: SystemTime,
    /// When it last sent a result or a status message (or connected).
    pub last_seen: SystemTime,
    pub tasks_sent: u64,
    pub results_received: u64,
    /// Results that succeeded, and that failed (refusals are neither).
    pub done: u64,
    pub failed: u64,
    /// An operator drained it: it gets nothing new (filled in by the dispatcher).
    pub drained: bool,
    /// Deliveries written to the client and not answered yet.
    pub in_flight: usize,
    /// With replicas (`--store`): the replica serving it.
    pub replica: Option<String>,
}

/// What a result said, for the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    Ok,
    Failed,
    /// The client refused the task and asked for another try.
    Refused,
}

struct Entry {
    info: ClientInfo,
    last_seen: Instant,
}

impl ClientInfo {
    /// A client connected since `since`, with nothing counted yet (a new
    /// connection here, or one another replica serves, seen from its lease).
    pub fn connected(id: &str, peer: &str, labels: Labels, since: SystemTime) -> ClientInfo {
        ClientInfo {
            id: id.to_string(),
            peer: peer.to_string(),
            labels,
            connected_since: since,
            last_seen: since,
            tasks_sent: 0,
            results_received: 0,
            done: 0,
            failed: 0,
            drained: false,
            in_flight: 0,
            replica: None,
        }
    }
}

/// The connected clients, by id.
#[derive(Default)]
pub struct ClientRegistry {
    clients: BTreeMap<String, Entry>,
}

impl ClientRegistry {
    /// Records a (re)connection; counters start again from zero.
    pub fn connect(&mut self, id: &str, peer: &str, labels: Labels) {
        let info = ClientInfo::connected(id, peer, labels, SystemTime::now());
        self.clients.insert(
            id.to_string(),
            Entry {
                info,
                last_seen: Instant::now(),
            },
        );
    }

    /// Forgets a client that went away.
    pub fn disconnect(&mut self, id: &str) {
        self.clients.remove(id);
    }

    /// Counts a delivery written to `id`.
    pub fn task_sent(&mut self, id: &str) {
        if let Some(e) = self.clients.get_mut(id) {
            e.info.tasks_sent += 1;
            e.info.in_flight += 1;
        }
    }

    /// Counts a result from `id`; `answered` is true when it answered a delivery in flight.
    pub fn result_received(&mut self, id: &str, answered: bool, what: Reported) {
        if let Some(e) = self.clients.get_mut(id) {
            e.info.results_received += 1;
            match what {
                Reported::Ok => e.info.done += 1,
                Reported::Failed => e.info.failed += 1,
                Reported::Refused => {}
            }
            if answered {
                e.info.in_flight = e.info.in_flight.saturating_sub(1);
            }
            e.last_seen = Instant::now();
        }
    }

    /// Counts a delivery to `id` taken back unanswered (timed out, or the client left).
    pub fn released(&mut self, id: &str) {
        if let Some(e) = self.clients.get_mut(id) {
            e.info.in_flight = e.info.in_flight.saturating_sub(1);
        }
    }

    /// Notes a sign of life (a status message) from `id`.
    pub fn touch(&mut self, id: &str) {
        if let Some(e) = self.clients.get_mut(id) {
            e.last_seen = Instant::now();
        }
    }

    /// Time since the last sign of life from `id`, if it is connected.
    pub fn idle_for(&self, id: &str) -> Option<std::time::Duration> {
        self.clients.get(id).map(|e| e.last_seen.elapsed())
    }

    /// Every connected client, ordered by id.
    pub fn snapshot(&self) -> Vec<ClientInfo> {
        let now = (Instant::now(), SystemTime::now());
        self.clients
            .values()
            .map(|e| ClientInfo {
                last_seen: now.1 - now.0.duration_since(e.last_seen),
                ..e.info.clone()
            })
            .collect()
    }

    /// The connected clients whose labels `selector` matches, ordered by id.
    pub fn matching(&self, selector: &Selector) -> Vec<String> {
        self.clients
            .values()
            .filter(|e| selector.matches(&e.info.labels))
            .map(|e| e.info.id.clone())
            .collect()
    }

    /// How many clients are connected.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_sends_and_results_and_reset_on_reconnect() {
        let mut r = ClientRegistry::default();
        r.connect("a", "ipv4:127.0.0.1:1", Labels::new());
        r.task_sent("a");
        r.task_sent("a");
        r.result_received("a", true, Reported::Ok);
        r.result_received("a", false, Reported::Failed);
        r.task_sent("ghost");
        let a = &r.snapshot()[0];
        assert_eq!((a.tasks_sent, a.results_received, a.in_flight), (2, 2, 1));
        assert_eq!((a.done, a.failed), (1, 1));
        assert!(a.last_seen >= a.connected_since);
        assert!(r.idle_for("a").is_some() && r.idle_for("ghost").is_none());
        let web = Labels::from([("role".to_string(), "web".to_string())]);
        r.connect("a", "ipv4:127.0.0.1:2", web);
        r.connect("b", "ipv4:127.0.0.1:3", Labels::new());
        let role_web = Selector::parse("role=web").unwrap();
        assert_eq!(r.matching(&role_web), vec!["a".to_string()]);
        r.disconnect("b");
        assert_eq!(r.snapshot()[0].tasks_sent, 0);
        r.disconnect("a");
        assert!(r.is_empty());
    }
}
