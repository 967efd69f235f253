//! `WorkQueue`: the tasks of `--dispatch queue` that are not finished yet —
//! waiting for a client, or held by one — with each task's current attempt
//! and holder. It is the fencing authority: a result counts only if it answers
//! the task's current attempt from the client that attempt was given to.

use crate::task::{Task, TaskId};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One unfinished task.
#[derive(Debug)]
pub struct QueuedTask {
    pub task: Arc<Task>,
    /// Deliveries made so far; the current attempt (0 = never delivered).
    pub attempt: u32,
    /// The client holding the current attempt, while it is in flight.
    pub holder: Option<String>,
    /// The client the current attempt was given to (kept after it is taken back,
    /// so that its answer still counts until the task is given to someone else).
    pub last_holder: Option<String>,
    /// The client that refused it last: another one gets it if there is one.
    pub refused_by: Option<String>,
}

/// Unfinished tasks, in arrival order for delivery.
#[derive(Debug, Default)]
pub struct WorkQueue {
    unfinished: HashMap<TaskId, QueuedTask>,
    /// Untargeted tasks waiting for any client (ids of finished tasks are skipped lazily).
    ready: VecDeque<TaskId>,
    /// Targeted tasks waiting for their client.
    waiting: HashMap<String, VecDeque<TaskId>>,
}

impl WorkQueue {
    /// Adds a task waiting for delivery.
    pub fn push(&mut self, task: Arc<Task>) {
        self.restore(task, 0, None);
    }

    /// Puts back a task restored from the journal: `attempt` deliveries were
    /// made, the last one to `last_holder`, whose answer may still count.
    pub fn restore(&mut self, task: Arc<Task>, attempt: u32, last_holder: Option<String>) {
        let id = task.id;
        let target = task.target.clone();
        self.unfinished.insert(
            id,
            QueuedTask {
                task,
                attempt,
                holder: None,
                last_holder,
                refused_by: None,
            },
        );
        self.enqueue(id, target, false);
    }

    fn enqueue(&mut self, id: TaskId, target: Option<String>, front: bool) {
        let q = match target {
            Some(t) => self.waiting.entry(t).or_default(),
            None => &mut self.ready,
        };
        if front {
            q.push_front(id);
        } else {
            q.push_back(id);
        }
    }

    /// Takes the next task for `client` (its targeted tasks first), marking it held.
    /// Returns the task and the attempt number of this delivery.
    pub fn take_for(&mut self, client: &str, targeted_only: bool) -> Option<(Arc<Task>, u32)> {
        loop {
            let id = match self.waiting.get_mut(client).and_then(|q| q.pop_front()) {
                Some(id) => id,
                None if targeted_only => return None,
                None => self.ready.pop_front()?,
            };
            // Skip ids whose task finished while they waited (answered late).
            if let Some(q) = self.unfinished.get_mut(&id) {
                if q.holder.is_some() {
                    continue;
                }
                q.attempt += 1;
                q.holder = Some(client.to_string());
                q.last_holder = Some(client.to_string());
                return Some((q.task.clone(), q.attempt));
            }
        }
    }

    /// The next untargeted task waiting for any client, if any (dropping the
    /// ids of tasks that finished while they waited).
    pub fn next_ready(&mut self) -> Option<&QueuedTask> {
        while let Some(id) = self.ready.front() {
            if self.unfinished.get(id).is_some_and(|q| q.holder.is_none()) {
                return self.unfinished.get(id);
            }
            self.ready.pop_front();
        }
        None
    }

    /// Puts a held task back after `client` refused it, noting who refused.
    pub fn release_refused(&mut self, id: TaskId, client: &str) {
        self.release(id);
        if let Some(q) = self.unfinished.get_mut(&id) {
            q.refused_by = Some(client.to_string());
        }
    }

    /// Puts a held task back at the front of its queue (its holder let go of it).
    pub fn release(&mut self, id: TaskId) {
        let Some(q) = self.unfinished.get_mut(&id) else {
            return;
        };
        if q.holder.take().is_none() {
            return;
        }
        let target = q.task.target.clone();
        self.enqueue(id, target, true);
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
        self.unfinished.remove(&id)
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
            produced_at: SystemTime::now(),
        })
    }

    #[test]
    fn tasks_go_out_once_and_come_back_first_when_released() {
        let mut q = WorkQueue::default();
        q.push(task(1, None));
        q.push(task(2, None));
        assert_eq!(q.take_for("a", false).map(|(t, n)| (t.id, n)), Some((1, 1)));
        q.release(1);
        assert!(
            q.is_current(1, "a", 1),
            "a released attempt still counts until redelivered"
        );
        assert_eq!(q.take_for("b", false).map(|(t, n)| (t.id, n)), Some((1, 2)));
        assert!(!q.is_current(1, "a", 1) && q.is_current(1, "b", 2));
        assert_eq!(q.take_for("a", false).map(|(t, _)| t.id), Some(2));
        assert!(q.take_for("a", false).is_none());
        assert!(q.finish(1).is_some() && !q.is_current(1, "b", 2));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn targeted_tasks_wait_for_their_client() {
        let mut q = WorkQueue::default();
        q.push(task(1, Some("b")));
        q.push(task(2, None));
        assert!(q.take_for("a", true).is_none());
        assert_eq!(q.take_for("a", false).map(|(t, _)| t.id), Some(2));
        assert!(q.take_for("a", false).is_none());
        assert_eq!(q.take_for("b", true).map(|(t, _)| t.id), Some(1));
    }

    #[test]
    fn a_task_answered_while_waiting_is_not_delivered_again() {
        let mut q = WorkQueue::default();
        q.push(task(1, None));
        q.take_for("a", false);
        q.release(1);
        q.finish(1);
        assert!(q.take_for("b", false).is_none());
        assert!(q.next_ready().is_none());
    }
}
