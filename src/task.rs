//! Tasks and the `TaskLog`: the retained, numbered history of every task the
//! server has produced. Broadcast clients read it through their own cursor, so
//! a late client can be given the history; its length is capped (`--retain`)
//! so that memory stays bounded however long the server runs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

/// Server-assigned task number: 1 for the first task, then consecutive.
/// 0 is never a task: on the wire it means "no id" (a seed peer).
pub type TaskId = u64;

/// One unit of work pushed to clients.
#[derive(Debug, PartialEq, Eq)]
pub struct Task {
    pub id: TaskId,
    /// What the client's handler receives (for `--exec`, the command's last argument).
    pub text: String,
    /// Set for a targeted line (`@<client-id> <text>`): only that client gets it.
    pub target: Option<String>,
    pub produced_at: SystemTime,
}

impl Task {
    /// Whether `client` may be given this task.
    pub fn is_for(&self, client: &str) -> bool {
        self.target.as_deref().is_none_or(|t| t == client)
    }
}

/// Splits an input line into its target client (for `@<client-id> <text>`) and text.
///
/// A line that starts with `@` but has no text after the client id is taken
/// literally, so that a stray `@name` is not silently dropped.
pub fn parse_line(line: &str) -> (Option<String>, String) {
    if let Some(rest) = line.strip_prefix('@') {
        if let Some((client, text)) = rest.split_once(char::is_whitespace) {
            let text = text.trim_start();
            if !client.is_empty() && !text.is_empty() {
                return (Some(client.to_string()), text.to_string());
            }
        }
    }
    (None, line.to_string())
}

/// The retained history of tasks, oldest first, with consecutive ids.
#[derive(Debug)]
pub struct TaskLog {
    tasks: VecDeque<Arc<Task>>,
    next_id: TaskId,
    retain: usize,
}

impl TaskLog {
    /// An empty log keeping at most `retain` tasks (at least one).
    pub fn new(retain: usize) -> TaskLog {
        TaskLog::starting_at(1, retain)
    }

    /// An empty log whose first task will get id `first` (when restoring state).
    pub fn starting_at(first: TaskId, retain: usize) -> TaskLog {
        TaskLog {
            tasks: VecDeque::new(),
            next_id: first.max(1),
            retain: retain.max(1),
        }
    }

    /// The retained tasks, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Task>> {
        self.tasks.iter()
    }

    /// Appends a task, forgetting the oldest one when the log is full.
    pub fn push(&mut self, text: String, target: Option<String>) -> Arc<Task> {
        let task = Arc::new(Task {
            id: self.next_id,
            text,
            target,
            produced_at: SystemTime::now(),
        });
        self.next_id += 1;
        if self.tasks.len() == self.retain {
            self.tasks.pop_front();
        }
        self.tasks.push_back(task.clone());
        task
    }

    /// The id the next pushed task will get; also "one past the newest task".
    pub fn next_id(&self) -> TaskId {
        self.next_id
    }

    /// The oldest retained id (equal to `next_id()` when the log is empty).
    pub fn first_id(&self) -> TaskId {
        self.tasks.front().map_or(self.next_id, |t| t.id)
    }

    /// The task with this id, if it is still retained.
    pub fn get(&self, id: TaskId) -> Option<&Arc<Task>> {
        let first = self.first_id();
        if id < first {
            return None;
        }
        self.tasks.get((id - first) as usize)
    }

    /// How many tasks are retained.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is retained.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_consecutive_and_retention_drops_the_oldest() {
        let mut log = TaskLog::new(3);
        assert_eq!((log.first_id(), log.next_id()), (1, 1));
        for i in 0..5 {
            log.push(format!("t{i}"), None);
        }
        assert_eq!(log.len(), 3);
        assert_eq!((log.first_id(), log.next_id()), (3, 6));
        assert!(log.get(2).is_none());
        assert_eq!(log.get(3).unwrap().text, "t2");
        assert_eq!(log.get(5).unwrap().text, "t4");
        assert!(log.get(6).is_none());
    }

    #[test]
    fn targeted_lines_name_a_client() {
        assert_eq!(
            parse_line("@web-1 uptime"),
            (Some("web-1".into()), "uptime".into())
        );
        assert_eq!(
            parse_line("@web-1   ls -l"),
            (Some("web-1".into()), "ls -l".into())
        );
        assert_eq!(parse_line("plain task"), (None, "plain task".into()));
        assert_eq!(parse_line("@lonely"), (None, "@lonely".into()));
        assert_eq!(parse_line("@ x"), (None, "@ x".into()));
        let t = Task {
            id: 1,
            text: "x".into(),
            target: Some("a".into()),
            produced_at: SystemTime::now(),
        };
        assert!(t.is_for("a") && !t.is_for("b"));
    }
}
