//! Tasks and the `TaskLog`: the retained, numbered history of every task the
//! server has produced. Broadcast clients read it through their own cursor, so
//! a late client can be given the history; its length is capped (`--retain`)
//! so that memory stays bounded however long the server runs. The log indexes
//! its tasks by target, so that a client finds the next task for it without
//! walking past other clients' targeted tasks, and it keeps how each queue
//! task was settled while the task is retained (to recognise a resent answer).
//! It also indexes its tasks by idempotency key: a key is known exactly as
//! long as the task that has it is retained.

use std::collections::{HashMap, VecDeque};
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
    /// Its idempotency key, if it was published with one (see [`NewTask::key`]).
    pub key: Option<Arc<str>>,
    /// Queue mode: only these clients may take it (any one of them), e.g.
    /// the agents a label selector matched when it was pushed.
    pub any_of: Option<Arc<[String]>>,
    pub produced_at: SystemTime,
}

/// A task to publish (see [`crate::dispatch::Dispatcher::publish_new`]);
/// also what the shared store's task stream holds, as JSON (`--store`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NewTask {
    /// Only this client gets it; `None`: every client (broadcast) or any one (queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub text: String,
    /// Its idempotency key: while a task published with the same key is
    /// retained (the last `--retain` tasks), this one is not published. An
    /// empty key is a key like any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Queue mode: any one of these clients takes it (see [`Task::any_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any_of: Option<Vec<String>>,
}

impl NewTask {
    /// A task without a key, for `target` (`None`: not targeted).
    pub fn new(target: Option<String>, text: String) -> NewTask {
        NewTask {
            target,
            text,
            key: None,
            any_of: None,
        }
    }
}

/// What became of one [`NewTask`] given to [`crate::dispatch::Dispatcher::publish_new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Published now, as this task.
    New(Arc<Task>),
    /// Not published: its key is that of task `of`, published before (in the
    /// same call or an earlier one) and still retained.
    Duplicate { of: TaskId },
}

impl Published {
    /// The id of the task it was published as, or of the task it duplicates.
    pub fn id(&self) -> TaskId {
        match self {
            Published::New(t) => t.id,
            Published::Duplicate { of } => *of,
        }
    }

    /// The task published, unless it was a duplicate.
    pub fn new_task(self) -> Option<Arc<Task>> {
        match self {
            Published::New(t) => Some(t),
            Published::Duplicate { .. } => None,
        }
    }
}

impl Task {
    /// Whether `client` may be given this task.
    pub fn is_for(&self, client: &str) -> bool {
        self.target.as_deref().is_none_or(|t| t == client)
    }
}

/// Splits an input line into its target client (for `@<client-id> <text>`) and text.
///
/// A line that starts with `@` must be `@<client-id> <text>`: anything else
/// (`@name` alone, `@ x`, an id that is not valid) is an error naming the
/// problem, never a task for everyone. (A task for everyone that starts with
/// `@` can be pushed with `contact-ctl push`.)
pub fn parse_line(line: &str) -> Result<(Option<String>, String), String> {
    let Some(rest) = line.strip_prefix('@') else {
        return Ok((None, line.to_string()));
    };
    let malformed = |why: &str| format!("{why}: an @ line is \"@<agent-id> <task>\"");
    let Some((client, text)) = rest.split_once(char::is_whitespace) else {
        return Err(malformed("no task after the agent id"));
    };
    crate::proto::validate_client_id(client).map_err(|e| malformed(&e))?;
    let text = text.trim_start();
    if text.is_empty() {
        return Err(malformed("no task after the agent id"));
    }
    Ok((Some(client.to_string()), text.to_string()))
}

/// How a queue task was settled, remembered while it is retained: a result
/// sent again after its acknowledgement was lost is recognised by it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Settled {
    /// Not settled (or not a queue task).
    #[default]
    Open,
    /// `client` answered it, and its answer to any attempt in `first..=last`
    /// is that same answer (it answered an earlier attempt while it held a later one).
    Answered {
        client: Arc<str>,
        first: u32,
        last: u32,
    },
    /// Dead-lettered.
    Dead,
    /// Cancelled by an operator before it was answered.
    Cancelled,
}

/// The retained history of tasks, oldest first, with consecutive ids.
#[derive(Debug)]
pub struct TaskLog {
    tasks: VecDeque<Arc<Task>>,
    /// Beside `tasks`: how each was settled (queue mode).
    settled: VecDeque<Settled>,
    /// Ids of the retained tasks for every client, ascending.
    untargeted: VecDeque<TaskId>,
    /// Ids of the retained tasks for one client, ascending, by client.
    targeted: HashMap<String, VecDeque<TaskId>>,
    /// The retained tasks that have an idempotency key, by key.
    keys: HashMap<Arc<str>, TaskId>,
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
            settled: VecDeque::new(),
            untargeted: VecDeque::new(),
            targeted: HashMap::new(),
            keys: HashMap::new(),
            next_id: first.max(1),
            retain: retain.max(1),
        }
    }

    /// The retained tasks, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Task>> {
        self.tasks.iter()
    }

    /// Appends a task, forgetting the oldest one when the log is full. A
    /// `key` names it in the key index (replacing an older task's entry for
    /// the same key, if any: the caller decides what a duplicate is).
    pub fn push(
        &mut self,
        text: String,
        target: Option<String>,
        key: Option<Arc<str>>,
    ) -> Arc<Task> {
        self.push_any_of(text, target, key, None)
    }

    /// [`TaskLog::push`], for a queue task any one of `any_of` may take.
    pub fn push_any_of(
        &mut self,
        text: String,
        target: Option<String>,
        key: Option<Arc<str>>,
        any_of: Option<Arc<[String]>>,
    ) -> Arc<Task> {
        let task = Arc::new(Task {
            id: self.next_id,
            text,
            target,
            key,
            any_of,
            produced_at: SystemTime::now(),
        });
        self.next_id += 1;
        if self.tasks.len() == self.retain {
            self.forget_oldest();
        }
        if let Some(key) = &task.key {
            self.keys.insert(key.clone(), task.id);
        }
        match &task.target {
            Some(t) => match self.targeted.get_mut(t.as_str()) {
                Some(ids) => ids.push_back(task.id),
                None => {
                    self.targeted.insert(t.clone(), VecDeque::from([task.id]));
                }
            },
            None => self.untargeted.push_back(task.id),
        }
        self.tasks.push_back(task.clone());
        self.settled.push_back(Settled::Open);
        task
    }

    fn forget_oldest(&mut self) {
        let Some(old) = self.tasks.pop_front() else {
            return;
        };
        self.settled.pop_front();
        if let Some(key) = &old.key {
            if self.keys.get(key) == Some(&old.id) {
                self.keys.remove(key);
            }
        }
        match &old.target {
            Some(t) => {
                if let Some(ids) = self.targeted.get_mut(t.as_str()) {
                    ids.pop_front();
                    if ids.is_empty() {
                        self.targeted.remove(t.as_str());
                    }
                }
            }
            None => {
                self.untargeted.pop_front();
            }
        }
    }

    /// The retained task published with idempotency key `key`, if any.
    pub fn keyed(&self, key: &str) -> Option<TaskId> {
        self.keys.get(key).copied()
    }

    /// How many keys the key index holds (one per retained task that has a key).
    pub fn keys_known(&self) -> usize {
        self.keys.len()
    }

    /// The first retained task at or after `from` that `client` may be given.
    pub fn next_for(&self, client: &str, from: TaskId) -> Option<&Arc<Task>> {
        let after = |ids: &VecDeque<TaskId>| {
            let i = ids.partition_point(|id| *id < from);
            ids.get(i).copied()
        };
        let any = after(&self.untargeted);
        let own = self.targeted.get(client).and_then(after);
        let id = match (any, own) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        self.get(id)
    }

    /// The retained tasks targeted at `client` with ids below `before`, oldest first.
    pub fn targeted_before<'a>(
        &'a self,
        client: &str,
        before: TaskId,
    ) -> impl Iterator<Item = &'a Arc<Task>> + 'a {
        self.targeted
            .get(client)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .take_while(move |id| **id < before)
            .filter_map(|id| self.get(*id))
    }

    /// Notes how the retained task `id` was settled (ignored once it is not retained).
    pub fn settle(&mut self, id: TaskId, how: Settled) {
        let first = self.first_id();
        if let Some(s) = id
            .checked_sub(first)
            .and_then(|i| self.settled.get_mut(i as usize))
        {
            *s = how;
        }
    }

    /// How the retained task `id` was settled.
    pub fn settled(&self, id: TaskId) -> Option<&Settled> {
        let first = self.first_id();
        id.checked_sub(first)
            .and_then(|i| self.settled.get(i as usize))
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
            log.push(format!("t{i}"), None, None);
        }
        assert_eq!(log.len(), 3);
        assert_eq!((log.first_id(), log.next_id()), (3, 6));
        assert!(log.get(2).is_none());
        assert_eq!(log.get(3).unwrap().text, "t2");
        assert_eq!(log.get(5).unwrap().text, "t4");
        assert!(log.get(6).is_none());
    }

    #[test]
    fn a_key_is_known_while_its_task_is_retained() {
        let mut log = TaskLog::new(3);
        let k1 = log.push("a".into(), None, Some("k1".into())).id;
        log.push("b".into(), None, None);
        let k3 = log.push("c".into(), None, Some("k3".into())).id;
        assert_eq!((log.keyed("k1"), log.keyed("k3")), (Some(k1), Some(k3)));
        assert_eq!((log.keyed("b"), log.keys_known()), (None, 2));
        // Task 1 leaves retention, and its key with it.
        log.push("d".into(), None, None);
        assert_eq!((log.keyed("k1"), log.keys_known()), (None, 1));
        // Pushed again under the same key, then the old holder of a key
        // leaving does not take the newer task's entry with it.
        let again = log.push("c again".into(), None, Some("k3".into())).id;
        assert_eq!(log.keyed("k3"), Some(again));
        log.push("e".into(), None, None);
        assert_eq!(log.get(k3), None);
        assert_eq!((log.keyed("k3"), log.keys_known()), (Some(again), 1));
        for _ in 0..3 {
            log.push("f".into(), None, None);
        }
        assert_eq!(log.keys_known(), 0, "the index shrinks with retention");
    }

    #[test]
    fn targeted_lines_name_a_client() {
        assert_eq!(
            parse_line("@web-1 uptime"),
            Ok((Some("web-1".into()), "uptime".into()))
        );
        assert_eq!(
            parse_line("@web-1   ls -l"),
            Ok((Some("web-1".into()), "ls -l".into()))
        );
        assert_eq!(parse_line("plain task"), Ok((None, "plain task".into())));
        assert!(parse_line("@lonely").unwrap_err().contains("no task after"));
        assert!(parse_line("@ x").unwrap_err().contains("empty"));
        assert!(parse_line("@web-1 ").unwrap_err().contains("no task after"));
        let t = Task {
            id: 1,
            text: "x".into(),
            target: Some("a".into()),
            key: None,
            any_of: None,
            produced_at: SystemTime::now(),
        };
        assert!(t.is_for("a") && !t.is_for("b"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::proto::validate_client_id;
    use proptest::prelude::*;

    /// Every valid client id (see `proto::validate_client_id`).
    fn client_id() -> impl Strategy<Value = String> {
        "[!-~]{1,24}|[!-~]{128}"
    }

    /// What may separate the id from the text: any run of whitespace.
    fn gap() -> impl Strategy<Value = String> {
        r"[ \t\u{a0}\u{3000}]{1,4}"
    }

    /// Task text: not empty, not starting with whitespace.
    fn text() -> impl Strategy<Value = String> {
        any::<String>().prop_filter_map("needs a non-blank start", |s| {
            let t = s.trim_start();
            (!t.is_empty()).then(|| t.to_string())
        })
    }

    /// Lines of every shape: anything, or `@` lines with any id-ish part and text.
    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            (r"\PC{0,6}", gap(), any::<String>()).prop_map(|(id, g, t)| format!("@{id}{g}{t}")),
            (client_id(), gap(), text()).prop_map(|(id, g, t)| format!("@{id}{g}{t}")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_line_is_either_taken_whole_or_split_exactly_at_its_first_whitespace(l in line()) {
            match parse_line(&l) {
                Err(why) => prop_assert!(l.starts_with('@') && why.contains("@<agent-id> <task>")),
                Ok((None, text)) => prop_assert_eq!(text, l),
                Ok((Some(client), text)) => {
                    let after = l.strip_prefix('@').and_then(|rest| rest.strip_prefix(client.as_str()));
                    prop_assert!(after.is_some(), "{:?} does not start with @{:?}", l, client);
                    let after = after.unwrap();
                    prop_assert!(!client.is_empty() && !client.contains(char::is_whitespace));
                    prop_assert!(after.starts_with(char::is_whitespace));
                    prop_assert_eq!(after.trim_start(), &text);
                    prop_assert!(!text.is_empty());
                }
            }
        }

        #[test]
        fn a_line_naming_a_valid_client_is_for_that_client(
            id in client_id(),
            g in gap(),
            t in text(),
        ) {
            prop_assert_eq!(parse_line(&format!("@{id}{g}{t}")), Ok((Some(id), t)));
        }

        #[test]
        fn a_line_not_starting_with_at_is_taken_whole(l in any::<String>()) {
            prop_assume!(!l.starts_with('@'));
            prop_assert_eq!(parse_line(&l), Ok((None, l)));
        }

        #[test]
        fn an_at_line_without_text_or_without_an_id_is_an_error_never_a_task_for_all(
            id in r"\S{0,8}",
            g in r"\s{0,3}",
            t in any::<String>(),
        ) {
            let stray = format!("@{id}{g}");
            prop_assert!(parse_line(&stray).is_err(), "{:?}", stray);
            let nameless = format!("@ {g}{t}");
            prop_assert!(parse_line(&nameless).is_err());
        }

        /// `@héllo x` or `@a\u{1} x` would name a client id that no client
        /// can ever have (the task would wait forever): such a line is an error.
        #[test]
        fn a_target_is_always_a_valid_client_id(l in line()) {
            if let Ok((Some(client), _)) = parse_line(&l) {
                prop_assert!(validate_client_id(&client).is_ok(), "{:?} targets {:?}", l, client);
            }
        }
    }
}
