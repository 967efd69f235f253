//! `JobTable`: what each admin push became. A job is one push — one task
//! for every agent or the work queue, one for a named agent, or one per
//! agent a selector matched — with the agents it is for and the accepted
//! results that came back, so that an operator can ask "did it succeed on
//! every web server?" (SaltStack's job ids with per-minion returns).
//!
//! Held in memory, the newest [`MAX_JOBS`]: a restart forgets them (the
//! results themselves are in the results file and the journal). Results are
//! observed as the server judges them; when no job is held that costs one
//! atomic load per batch.

use crate::results::ResultRecord;
use crate::task::TaskId;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// Jobs kept at most; the oldest is forgotten first.
pub const MAX_JOBS: usize = 1000;

/// A job's number, from 1, in the order pushed.
pub type JobId = u64;

/// One task of a job and whom it is for (`None`: every agent, or the queue).
#[derive(Debug, Clone, PartialEq)]
pub struct JobTask {
    pub id: TaskId,
    pub agent: Option<String>,
}

/// An accepted result of one of a job's tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub task: TaskId,
    pub ok: bool,
    pub output: String,
    pub attempt: u32,
    /// Unix seconds.
    pub at: f64,
}

/// A job as pushed, with what came back so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub text: String,
    /// Where it was pushed, in words.
    pub target: String,
    pub created_at: SystemTime,
    pub tasks: Vec<JobTask>,
    /// The agents it is for when pushed (for every agent: those connected then).
    pub expected: Vec<String>,
    /// Accepted results by agent (an agent answers each of its tasks once).
    pub answers: BTreeMap<String, Answer>,
}

#[derive(Default)]
struct Jobs {
    next: JobId,
    held: VecDeque<Job>,
    by_task: HashMap<TaskId, JobId>,
}

/// The jobs held; shared by the admin service and the result path.
#[derive(Default)]
pub struct JobTable {
    jobs: Mutex<Jobs>,
    /// Whether any job is held (the result path skips the lock otherwise).
    any: AtomicBool,
}

impl JobTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds a new job; returns its id.
    pub fn create(
        &self,
        text: String,
        target: String,
        tasks: Vec<JobTask>,
        expected: Vec<String>,
    ) -> JobId {
        let mut jobs = self.lock();
        jobs.next += 1;
        let id = jobs.next;
        for t in &tasks {
            jobs.by_task.insert(t.id, id);
        }
        jobs.held.push_back(Job {
            id,
            text,
            target,
            created_at: SystemTime::now(),
            tasks,
            expected,
            answers: BTreeMap::new(),
        });
        if jobs.held.len() > MAX_JOBS {
            if let Some(old) = jobs.held.pop_front() {
                for t in &old.tasks {
                    jobs.by_task.remove(&t.id);
                }
            }
        }
        self.any.store(true, Ordering::Release);
        id
    }

    /// Notes the accepted results among `judged` that answer a job's task.
    pub fn observe<'a>(&self, judged: impl IntoIterator<Item = &'a ResultRecord>) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut jobs = self.lock();
        for r in judged {
            let (true, Some(task)) = (r.accepted, r.task_id) else {
                continue;
            };
            let Some(&job) = jobs.by_task.get(&task) else {
                continue;
            };
            let first = jobs.held.front().map_or(0, |j| j.id);
            let Some(j) = jobs.held.get_mut((job - first) as usize) else {
                continue;
            };
            j.answers.insert(
                r.client.clone(),
                Answer {
                    task,
                    ok: r.ok,
                    output: r.output.clone(),
                    attempt: r.attempt,
                    at: r.received_at,
                },
            );
        }
    }

    /// Job `id`, if held.
    pub fn get(&self, id: JobId) -> Option<Job> {
        let jobs = self.lock();
        let first = jobs.held.front()?.id;
        let j = jobs.held.get(id.checked_sub(first)? as usize)?;
        Some(j.clone())
    }

    /// The job holding task `task`, if any.
    pub fn job_of(&self, task: TaskId) -> Option<JobId> {
        self.lock().by_task.get(&task).copied()
    }

    /// Every job held, newest first.
    pub fn list(&self) -> Vec<Job> {
        self.lock().held.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(task: TaskId, client: &str, ok: bool, accepted: bool) -> ResultRecord {
        ResultRecord {
            task_id: Some(task),
            task: Some("uptime".into()),
            client: client.into(),
            ok,
            output: format!("{client} says {ok}"),
            latency_ms: None,
            attempt: 1,
            stale: !accepted,
            retry: false,
            accepted,
            received_at: 1.5,
            seq: None,
        }
    }

    fn one_task(id: TaskId) -> Vec<JobTask> {
        vec![JobTask { id, agent: None }]
    }

    #[test]
    fn accepted_answers_of_a_jobs_tasks_are_kept_by_agent() {
        let t = JobTable::default();
        let job = t.create(
            "uptime".into(),
            "every agent".into(),
            one_task(7),
            vec!["a".into(), "b".into()],
        );
        t.observe(&[
            result(7, "a", true, true),
            result(7, "b", false, false),
            result(8, "a", true, true),
        ]);
        let j = t.get(job).unwrap();
        assert_eq!(j.answers.len(), 1);
        assert_eq!(j.answers["a"].output, "a says true");
        t.observe(&[result(7, "b", false, true)]);
        assert!(!t.get(job).unwrap().answers["b"].ok);
        assert_eq!(t.get(job + 1), None);
    }

    #[test]
    fn only_the_newest_jobs_are_held() {
        let t = JobTable::default();
        for i in 0..MAX_JOBS as u64 + 5 {
            t.create(
                format!("t{i}"),
                "every agent".into(),
                one_task(i + 1),
                vec![],
            );
        }
        assert_eq!(t.get(5), None);
        assert_eq!(t.get(6).unwrap().text, "t5");
        let listed = t.list();
        assert_eq!(listed.len(), MAX_JOBS);
        assert_eq!(listed[0].id, MAX_JOBS as u64 + 5);
        // A forgotten job's tasks are not matched any more.
        t.observe(&[result(1, "a", true, true)]);
        assert!(t.list().iter().all(|j| j.answers.is_empty()));
    }
}
