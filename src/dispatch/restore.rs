//! Rebuilding the dispatcher from the journal at start-up, and writing its
//! state back as a compact snapshot. The two are inverses: a snapshot replays
//! to the state it was taken from (modulo open streams, which never survive).
//! A snapshot holds each broadcast client's cursor and unanswered deliveries
//! and each retained queue task's state: it grows with clients plus tasks,
//! never with their product. Journals written before this form (with each
//! client's recent answers as `Done` records) are read as well.

use super::{ClientState, Dispatcher, Mode, State, EPHEMERAL, NAMED};
use crate::error::Error;
use crate::feed::Delivery;
use crate::journal::Record;
use crate::registry::ClientId;
use crate::task::{Settled, Task, TaskId, TaskLog};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// What start-up found in the journal, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    pub tasks: usize,
    /// Queue mode: tasks still to be answered.
    pub unfinished: usize,
    pub clients: usize,
}

/// A broadcast client as the journal describes it.
#[derive(Default)]
struct Progress {
    cursor: TaskId,
    /// Delivered and not answered: task -> attempt.
    pending: BTreeMap<TaskId, u32>,
}

/// What replay learns about answers, per task and per client.
#[derive(Default)]
struct Seen {
    queue_mode: bool,
    /// Queue mode: tasks answered (by whom, attempts `first..=last`) or dead (`None`).
    finished: HashMap<TaskId, Option<(String, u32, u32)>>,
    /// Broadcast mode: each client's progress.
    progress: HashMap<String, Progress>,
}

/// `client` answered `task` (attempt `attempt`) and the answer was accepted.
fn answered(seen: &mut Seen, task: TaskId, client: String, attempt: u32) {
    if seen.queue_mode {
        let entry = seen.finished.entry(task).or_insert(None);
        match entry {
            Some((who, first, last)) if *who == client => {
                *first = (*first).min(attempt);
                *last = (*last).max(attempt);
            }
            _ => *entry = Some((client, attempt, attempt)),
        }
    } else if let Some(p) = seen.progress.get_mut(&client) {
        p.pending.remove(&task);
    }
}

/// Seed clients are known by their address; they cannot come back, so their
/// state is not worth restoring.
fn is_peer_address(client: &str) -> bool {
    ["ipv4:", "ipv6:", "unix:"]
        .iter()
        .any(|p| client.starts_with(p))
}

impl Dispatcher {
    /// Replays journal records into an empty dispatcher (before it serves),
    /// consuming them: their texts move into the tasks, not copied.
    pub fn restore(&self, records: Vec<Record>) -> Result<Restored, Error> {
        let queue_mode = self.config.mode == Mode::Queue;
        let (mut first, mut next) = (1, 1);
        let mut tasks: BTreeMap<TaskId, Arc<Task>> = BTreeMap::new();
        let mut last_sent: HashMap<TaskId, (String, u32)> = HashMap::new();
        let mut incarnation = None;
        let mut cancelled = BTreeSet::new();
        let mut seen = Seen {
            queue_mode,
            ..Default::default()
        };
        for r in records {
            match r {
                Record::Task {
                    id,
                    text,
                    target,
                    key,
                    any_of,
                } => {
                    let task = Task {
                        id,
                        text,
                        target,
                        key: key.map(Arc::from),
                        any_of: any_of.map(Arc::from),
                        produced_at: SystemTime::now(),
                    };
                    tasks.insert(id, Arc::new(task));
                    next = next.max(id + 1);
                }
                Record::Window { first: f, next: n } => {
                    first = f;
                    next = next.max(n);
                }
                Record::Sent {
                    task,
                    client,
                    attempt,
                } if queue_mode => {
                    last_sent.insert(task, (client, attempt));
                }
                Record::Sent {
                    task,
                    client,
                    attempt,
                } => {
                    let p = seen.progress.entry(client).or_default();
                    p.pending.insert(task, attempt);
                    p.cursor = p.cursor.max(task + 1);
                }
                Record::Cursor { client, next } => {
                    let p = seen.progress.entry(client).or_default();
                    p.cursor = p.cursor.max(next);
                }
                Record::Result(r) => {
                    if let (true, Some(task)) = (r.accepted, r.task_id) {
                        answered(&mut seen, task, r.client, r.attempt);
                    }
                }
                Record::Done {
                    task,
                    client,
                    attempt,
                } => answered(&mut seen, task, client, attempt),
                Record::Finished { task } => {
                    seen.finished.entry(task).or_insert(None);
                }
                Record::Cancelled { task } => {
                    cancelled.insert(task);
                }
                Record::Dead(d) if queue_mode => {
                    seen.finished.insert(d.task_id, None);
                }
                Record::Dead(d) => {
                    if let Some(p) = seen.progress.get_mut(&d.client) {
                        p.pending.remove(&d.task_id);
                    }
                }
                Record::Seq { .. } => {}
                Record::Incarnation { id } => incarnation = Some(id),
            }
        }

        let mut guard = self.lock();
        let st: &mut State = &mut guard;
        if let Some(id) = incarnation {
            st.incarnation = id;
        }
        st.cancelled = cancelled;
        st.log = TaskLog::starting_at(first, self.config.retain);
        for (id, task) in tasks.range(first..) {
            if *id != st.log.next_id() {
                return Err(Error::State(format!(
                    "the state journal lacks task {} (it jumps to {id}); move the state directory away to start afresh",
                    st.log.next_id()
                )));
            }
            // Keys come back with their tasks: the key index is rebuilt.
            st.log.push_any_of(
                task.text.clone(),
                task.target.clone(),
                task.key.clone(),
                task.any_of.clone(),
            );
        }
        if st.log.next_id() < next {
            log::warn!(
                "tasks {}..{} are missing from the state journal",
                st.log.next_id(),
                next - 1
            );
        }
        let mut summary = Restored {
            tasks: tasks.len(),
            ..Default::default()
        };
        let Seen {
            finished,
            mut progress,
            ..
        } = seen;
        if queue_mode {
            for (id, task) in &tasks {
                match finished.get(id) {
                    None => {
                        let (holder, attempt) = last_sent
                            .remove(id)
                            .map_or((None, 0), |(c, a)| (Some(ClientId::from(c)), a));
                        st.queue.restore(task.clone(), attempt, holder);
                    }
                    Some(Some((client, first, last))) => {
                        let answered = Settled::Answered {
                            client: ClientId::from(client.as_str()),
                            first: *first,
                            last: *last,
                        };
                        st.log.settle(*id, answered);
                    }
                    Some(None) => st.log.settle(*id, Settled::Dead),
                }
            }
            summary.unfinished = st.queue.len();
        }
        let names: HashSet<String> = progress
            .keys()
            .filter(|c| !is_peer_address(c))
            .cloned()
            .collect();
        let now = Instant::now();
        for name in names {
            let p = progress.remove(&name).unwrap_or_default();
            let redeliver = p
                .pending
                .iter()
                .filter_map(|(id, attempt)| {
                    tasks.get(id).map(|t| Delivery {
                        task: t.clone(),
                        attempt: attempt + 1,
                    })
                })
                .collect();
            let cursor = if p.cursor == 0 {
                st.log.next_id()
            } else {
                p.cursor
            };
            let name = ClientId::from(name);
            let mut state = ClientState::new(name.clone(), cursor, redeliver, false);
            // Whatever it answered before is behind its cursor.
            state.since = 0;
            state.last_seen = now;
            state.gone_key = Some(now);
            st.gone[NAMED].insert((now, name.clone()));
            st.clients.insert(name, state);
        }
        debug_assert!(st.gone[EPHEMERAL].is_empty());
        summary.clients = st.clients.len();
        Ok(summary)
    }

    /// Hands the journal a snapshot of the current state to replace it. Taken
    /// and queued under the state lock, so no later change can precede it.
    pub fn compact(&self) {
        let Some(sink) = self.sink.as_ref().filter(|_| self.durable) else {
            return;
        };
        // Not between a producer's journaled tasks and their publication.
        let _serial = self.publishing.lock().unwrap_or_else(|e| e.into_inner());
        let st = self.lock();
        sink.compact(self.snapshot(&st));
    }

    /// The records that replay to `st`.
    pub(super) fn snapshot(&self, st: &State) -> Vec<Record> {
        let mut out = vec![
            Record::Incarnation {
                id: st.incarnation.clone(),
            },
            Record::Window {
                first: st.log.first_id(),
                next: st.log.next_id(),
            },
        ];
        let task_record = |t: &Task| Record::Task {
            id: t.id,
            text: t.text.clone(),
            target: t.target.clone(),
            key: t.key.as_deref().map(String::from),
            any_of: t.any_of.as_deref().map(<[String]>::to_vec),
        };
        out.extend(st.log.iter().map(|t| task_record(t)));
        let mut queued: Vec<_> = st.queue.iter().collect();
        queued.sort_by_key(|q| q.task.id);
        for q in &queued {
            if q.task.id < st.log.first_id() {
                out.push(task_record(&q.task));
            }
            if let (Some(holder), true) = (&q.last_holder, q.attempt > 0) {
                out.push(Record::Sent {
                    task: q.task.id,
                    client: holder.to_string(),
                    attempt: q.attempt,
                });
            }
        }
        if self.config.mode == Mode::Queue {
            // Each retained task answered: by whom (a resend of that answer
            // is recognised after a restart too); dead, or answered before
            // that was known: finished.
            for t in st.log.iter().filter(|t| st.queue.get(t.id).is_none()) {
                match st.log.settled(t.id) {
                    Some(Settled::Answered {
                        client,
                        first,
                        last,
                    }) => {
                        for attempt in [*first, *last] {
                            out.push(Record::Done {
                                task: t.id,
                                client: client.to_string(),
                                attempt,
                            });
                            if first == last {
                                break;
                            }
                        }
                    }
                    _ => out.push(Record::Finished { task: t.id }),
                }
            }
        }
        // Every cancellation (an operator's few): a task past the retained
        // history may still be owed to a client that is away.
        out.extend(st.cancelled.iter().map(|&task| Record::Cancelled { task }));
        // Task records must precede the records that name them.
        let mut early: Vec<Record> = vec![];
        let mut written_early: HashSet<TaskId> = HashSet::new();
        if self.config.mode == Mode::Broadcast {
            let mut names: Vec<&ClientId> = st
                .clients
                .iter()
                .filter(|(_, c)| !c.ephemeral)
                .map(|(n, _)| n)
                .collect();
            names.sort();
            for name in names {
                let c = &st.clients[name];
                // Tasks it still has to answer, even those past the retained history.
                let held = c.in_flight.iter().map(|f| &f.delivery).chain(c.owed());
                for d in held.filter(|d| d.task.id < st.log.first_id()) {
                    if written_early.insert(d.task.id) {
                        early.push(task_record(&d.task));
                    }
                }
                out.push(Record::Cursor {
                    client: name.to_string(),
                    next: c.cursor,
                });
                for f in &c.in_flight {
                    out.push(Record::Sent {
                        task: f.delivery.task.id,
                        client: name.to_string(),
                        attempt: f.delivery.attempt,
                    });
                }
                for d in c.owed() {
                    // Replay turns an unanswered delivery into the next attempt.
                    out.push(Record::Sent {
                        task: d.task.id,
                        client: name.to_string(),
                        attempt: d.attempt - 1,
                    });
                }
            }
        }
        out.splice(2..2, early);
        out
    }
}
