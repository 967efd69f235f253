//! `WorkQueue`: the tasks of `--dispatch queue` that are not finished yet —
//! waiting for a client, or held by one — with each task's current attempt
//! and holder. It is the fencing authority: a result counts only if it answers
//! the task's current attempt from the client that attempt was given to.

use crate::task::{Task, TaskId};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// One unfinished task.
#[derive(Debug)]
pub struct QueuedTask {
    pub task: Arc<Task>,
    /// Deliveries made so far; the current attempt (0 = never delivered).
    pub attempt: u32,
    /// The client holding the current attempt, while it is in flight.
    pub holder: Option<Arc<str>>,
    /// The client the current attempt was given to (kept after it is taken back,
    /// so that its answer still counts until the task is given to someone else).
    pub last_holder: Option<Arc<str>>,
    /// The client that let it go last (refused it, or did not answer in
    /// time): another one gets it if there is one with room.
    pub avoid: Option<Arc<str>>,
    /// The client that refused it last, and the attempts `first..=last` it
    /// refused in a row: a refusal of one of them sent again (after a lost
    /// acknowledgement) is not another refusal.
    pub refused: Option<(Arc<str>, u32, u32)>,
}

/// Unfinished tasks. Those waiting are handed out in task order (the order
/// they arrived in), a task taken back included: it goes back to its place.
#[derive(Debug, Default)]
pub struct WorkQueue {
    unfinished: HashMap<TaskId, QueuedTask>,
    /// Untargeted tasks waiting for any client.
    ready: BTreeSet<TaskId>,
    /// Targeted tasks waiting for their client.
    waiting: HashMap<String, BTreeSet<TaskId>>,
    /// Refused tasks waiting out their retry backoff, soonest first (entries
    /// of tasks finished meanwhile are skipped when they come due).
    delayed: BinaryHeap<Reverse<(Instant, TaskId)>>,
}

impl WorkQueue {
    /// Adds a task waiting for delivery.
    pub fn push(&mut self, task: Arc<Task>) {
        self.restore(task, 0, None);
    }

    /// Puts back a task restored from the journal: `attempt` deliveries were
    /// made, the last one to `last_holder`, whose answer may still count.
    pub fn restore(&mut self, task: Arc<Task>, attempt: u32, last_holder: Option<Arc<str>>) {
        let id = task.id;
        self.unfinished.insert(
            id,
            QueuedTask {
                task,
                attempt,
                holder: None,
                last_holder,
                avoid: None,
                refused: None,
            },
        );
        self.enqueue(id);
    }

    fn enqueue(&mut self, id: TaskId) {
        let Some(q) = self.unfinished.get(&id) else {
            return;
        };
        let task = q.task.clone();
        match (&task.target, &task.any_of) {
            (Some(t), _) => {
                self.waiting.entry(t.clone()).or_default().insert(id);
            }
            // Waiting for each of its clients: the first to take it has it.
            (None, Some(clients)) => {
                for c in clients.iter() {
                    self.waiting.entry(c.clone()).or_default().insert(id);
                }
            }
            (None, None) => {
                self.ready.insert(id);
            }
        }
    }

    /// Removes `id` from the waiting sets (it is finished or handed out).
    fn dequeue(&mut self, id: TaskId, task: &Task) {
        let mut unwait = |t: &str| {
            if let Some(set) = self.waiting.get_mut(t) {
                set.remove(&id);
                if set.is_empty() {
                    self.waiting.remove(t);
                }
            }
        };
        match (&task.target, &task.any_of) {
            (Some(t), _) => unwait(t),
            (None, Some(clients)) => clients.iter().for_each(|c| unwait(c)),
            (None, None) => {
                self.ready.remove(&id);
            }
        }
    }

    /// Takes the next task for `client` (its targeted tasks first), marking it held.
    /// Returns the task and the attempt number of this delivery.
    pub fn take_for(&mut self, client: &Arc<str>, targeted_only: bool) -> Option<(Arc<Task>, u32)> {
        let id = match self.waiting.get(&**client).and_then(|set| set.first()) {
            Some(id) => *id,
            None if targeted_only => return None,
            None => *self.ready.first()?,
        };
        let q = self
            .unfinished
            .get_mut(&id)
            .expect("waiting implies unfinished");
        q.attempt += 1;
        q.holder = Some(client.clone());
        q.last_holder = Some(client.clone());
        let (task, attempt) = (q.task.clone(), q.attempt);
        self.dequeue(id, &task);
        Some((task, attempt))
    }

    /// The next untargeted task waiting for any client, if any.
    pub fn next_ready(&self) -> Option<&QueuedTask> {
        self.ready.first().and_then(|id| self.unfinished.get(id))
    }

    /// Puts a held task back in its place (its holder let go of it or is
    /// gone); with `avoid`, another client gets it if one has room.
    pub fn release(&mut self, id: TaskId, avoid: Option<&Arc<str>>) {
        if self.unhold(id, avoid) {
            self.enqueue(id);
        }
    }

    /// Puts a held task back once `due` has passed (a refusal's retry
    /// backoff), preferably for a client other than `avoid`.
    /// A task already let go (taken back, waiting) waits out `due` too.
    pub fn release_at(&mut self, id: TaskId, avoid: &Arc<str>, due: Instant) {
        let Some(task) = self.unfinished.get(&id).map(|q| q.task.clone()) else {
            return;
        };
        if !self.unhold(id, Some(avoid)) {
            self.dequeue(id, &task);
        }
        self.delayed.push(Reverse((due, id)));
    }

    fn unhold(&mut self, id: TaskId, avoid: Option<&Arc<str>>) -> bool {
        let Some(q) = self.unfinished.get_mut(&id) else {
            return false;
        };
        if q.holder.take().is_none() {
            return false;
        }
        q.avoid = avoid.cloned();
        true
    }

    /// Makes the tasks whose backoff is over by `now` available again;
    /// returns them.
    pub fn wake_due(&mut self, now: Instant) -> Vec<Arc<Task>> {
        let mut woken = vec![];
        while let Some(Reverse((due, id))) = self.delayed.peek().copied() {
            if due > now {
                break;
            }
            self.delayed.pop();
            if let Some(q) = self.unfinished.get(&id).filter(|q| q.holder.is_none()) {
                woken.push(q.task.clone());
                self.enqueue(id);
            }
        }
        woken
    }

    /// Notes that `client` refused attempt `attempt` of the unfinished task `id`.
    pub fn refused(&mut self, id: TaskId, client: &Arc<str>, attempt: u32) {
        if let Some(q) = self.unfinished.get_mut(&id) {
            q.refused = match q.refused.take() {
                Some((who, first, _)) if who == *client => Some((who, first, attempt)),
                _ => Some((client.clone(), attempt, attempt)),
            };
        }
    }

    /// Whether a targeted task waits for `client`.
    pub fn has_waiting_for(&self, client: &str) -> bool {
        self.waiting.contains_key(client)
    }

    /// Whether an answer from `client` to `attempt` counts: the task is
    /// unfinished and its current attempt (held or just released) went to
    /// that client — an earlier attempt of the same client counts too, since
    /// nobody else has the task.
    pub fn is_current(&self, id: TaskId, client: &str, attempt: u32) -> bool {
        self.unfinished
            .get(&id)
            .is_some_and(|q| attempt <= q.attempt && q.last_holder.as_deref() == Some(client))
    }

    /// The unfinished task with this id.
    pub fn get(&self, id: TaskId) -> Option<&QueuedTask> {
        self.unfinished.get(&id)
    }

    /// Ends a task (answered or dead-lettered).
    pub fn finish(&mut self, id: TaskId) -> Option<QueuedTask> {
        let q = self.unfinished.remove(&id)?;
        self.dequeue(id, &q.task.clone());
        Some(q)
    }

    /// Untargeted tasks waiting for a client.
    pub fn waiting_untargeted(&self) -> usize {
        self.ready.len()
    }

    /// Takes the untargeted tasks waiting for a client out of the queue
    /// (another replica is to deliver them); returns their ids.
    pub fn take_waiting_untargeted(&mut self) -> Vec<TaskId> {
        let ids: Vec<TaskId> = self.ready.iter().copied().collect();
        for id in &ids {
            self.finish(*id);
        }
        ids
    }

    /// Unfinished tasks.
    pub fn len(&self) -> usize {
        self.unfinished.len()
    }

    /// Whether every task is finished.
    pub fn is_empty(&self) -> bool {
        self.unfinished.is_empty()
    }

    /// Every unfinished task, for snapshots.
    pub fn iter(&self) -> impl Iterator<Item = &QueuedTask> {
        self.unfinished.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn task(id: TaskId, target: Option<&str>) -> Arc<Task> {
        Arc::new(Task {
            id,
            text: format!("t{id}"),
            target: target.map(String::from),
            key: None,
            any_of: None,
            produced_at: SystemTime::now(),
        })
    }

    #[test]
    fn a_task_for_any_of_some_clients_goes_to_the_first_of_them_only() {
        let mut q = WorkQueue::default();
        let t = Arc::new(Task {
            any_of: Some(Arc::from(vec!["a".to_string(), "b".to_string()])),
            ..Arc::try_unwrap(task(1, None)).unwrap()
        });
        q.push(t);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert!(q.has_waiting_for("a") && q.has_waiting_for("b"));
        assert_eq!(q.take_for(&c, false), None, "not for c, even untargeted");
        let (got, attempt) = q.take_for(&b, true).unwrap();
        assert_eq!((got.id, attempt), (1, 1));
        assert!(
            !q.has_waiting_for("a"),
            "taken by b: no longer waiting for a"
        );
        // Let go: waiting for each of them again.
        q.release(1, None);
        assert!(q.has_waiting_for("a") && q.has_waiting_for("b"));
        assert_eq!(q.take_for(&a, true).unwrap().0.id, 1);
        q.finish(1);
        assert!(!q.has_waiting_for("b"));
    }

    #[test]
    fn tasks_go_out_once_and_come_back_first_when_released() {
        let mut q = WorkQueue::default();
        q.push(task(1, None));
        q.push(task(2, None));
        assert_eq!(
            q.take_for(&"a".into(), false).map(|(t, n)| (t.id, n)),
            Some((1, 1))
        );
        q.release(1, None);
        assert!(
            q.is_current(1, "a", 1),
            "a released attempt still counts until redelivered"
        );
        assert_eq!(
            q.take_for(&"b".into(), false).map(|(t, n)| (t.id, n)),
            Some((1, 2))
        );
        assert!(!q.is_current(1, "a", 1) && q.is_current(1, "b", 2));
        assert_eq!(q.take_for(&"a".into(), false).map(|(t, _)| t.id), Some(2));
        assert!(q.take_for(&"a".into(), false).is_none());
        assert!(q.finish(1).is_some() && !q.is_current(1, "b", 2));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn targeted_tasks_wait_for_their_client() {
        let mut q = WorkQueue::default();
        q.push(task(1, Some("b")));
        q.push(task(2, None));
        assert!(q.take_for(&"a".into(), true).is_none());
        assert_eq!(q.take_for(&"a".into(), false).map(|(t, _)| t.id), Some(2));
        assert!(q.take_for(&"a".into(), false).is_none());
        assert_eq!(q.take_for(&"b".into(), true).map(|(t, _)| t.id), Some(1));
    }

    #[test]
    fn a_task_answered_while_waiting_is_not_delivered_again() {
        let mut q = WorkQueue::default();
        q.push(task(1, None));
        q.take_for(&"a".into(), false);
        q.release(1, None);
        q.finish(1);
        assert!(q.take_for(&"b".into(), false).is_none());
        assert!(q.next_ready().is_none());
    }

    #[test]
    fn tasks_let_go_return_to_their_place_and_refusals_wait_until_due() {
        let mut q = WorkQueue::default();
        for id in 1..=4 {
            q.push(task(id, None));
        }
        let taken: Vec<u64> = (0..3)
            .map(|_| q.take_for(&"a".into(), false).unwrap().0.id)
            .collect();
        assert_eq!(taken, vec![1, 2, 3]);
        q.release(3, Some(&"a".into()));
        q.release(1, Some(&"a".into()));
        assert_eq!(
            q.next_ready().map(|t| (t.task.id, t.avoid.as_deref())),
            Some((1, Some("a")))
        );
        let now = Instant::now();
        q.release_at(2, &"a".into(), now + std::time::Duration::from_secs(60));
        let order: Vec<u64> =
            std::iter::from_fn(|| q.take_for(&"b".into(), false).map(|(t, _)| t.id)).collect();
        assert_eq!(order, vec![1, 3, 4], "task 2 waits out its backoff");
        assert!(q.wake_due(now).is_empty());
        assert_eq!(
            q.wake_due(now + std::time::Duration::from_secs(61)).len(),
            1
        );
        assert_eq!(
            q.take_for(&"b".into(), false).map(|(t, n)| (t.id, n)),
            Some((2, 2))
        );
        // A task finished while it waits is not woken.
        q.release_at(2, &"b".into(), now);
        q.finish(2);
        assert!(q.wake_due(now).is_empty());
        assert!(q.take_for(&"c".into(), false).is_none());
    }
}
