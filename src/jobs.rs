//! `JobTable`: what each admin push became. A job is one push — one task
//! for every agent or the work queue, one for a named agent, or one per
//! agent a selector matched — with the agents it is for and the accepted
//! results that came back, so that an operator can ask "did it succeed on
//! every web server?" (SaltStack's job ids with per-minion returns).
//!
//! A job may roll out under limits (SaltStack's batch mode, SSM Run
//! Command's MaxConcurrency and MaxErrors): its agents are held and given
//! their task a few at a time as results come back, and once too many have
//! failed it stops spreading and the held agents are cancelled. The table
//! decides who is released; publishing is the caller's (it may wait for the
//! journal's fsync, which the result path must not).
//!
//! A job pushed to a selector with `--wait-for-agents` keeps taking agents:
//! one that comes to match later (it connects, or is connected with its
//! labels) joins the job and gets its task under the job's limits, until the
//! job times out or is cancelled; in queue mode the job's one task is
//! published when the first agent matches.
//!
//! Held in memory, the newest [`MAX_JOBS`]: a restart forgets them (the
//! results themselves are in the results file and the journal). With
//! replicas (`--store`), a job's id comes from the shared [`JobLog`], where
//! its creation, the tasks its rollout adds and its cancellation are written
//! for the other replicas, which hold a copy of it ([`JobTable::insert_copy`]):
//! the replica it was pushed to drives its rollout, and every replica sees
//! its answers (results are read back from the store by all). Results are
//! observed as the server judges them; when no job is held that costs one
//! atomic load per batch.

use crate::labels::Selector;
use crate::results::ResultRecord;
use crate::task::TaskId;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

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

/// A rollout limit: a number of agents, or a share of those targeted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Agents(usize),
    Percent(u32),
}

impl Limit {
    /// `N` or `P%` (1 to 100); what is wrong otherwise.
    pub fn parse(text: &str) -> Result<Limit, String> {
        let bad = || format!("{text:?} is not a number of agents (N) or a percentage (P%)");
        match text.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p @ 1..=100) => Ok(Limit::Percent(p)),
                _ => Err(bad()),
            },
            None => text.trim().parse().map(Limit::Agents).map_err(|_| bad()),
        }
    }

    /// The limit for `n` agents (a share rounds up: 10% of 5 is 1).
    pub fn of(self, n: usize) -> usize {
        match self {
            Limit::Agents(k) => k,
            Limit::Percent(p) => (n * p as usize).div_ceil(100),
        }
    }
}

/// How a job spreads over its agents.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Agents running it at once, at most (at least 1).
    pub concurrency: usize,
    /// Failed agents tolerated; one more stops the job.
    pub max_errors: Option<usize>,
    /// Agents waiting for a slot, in order.
    pub held: VecDeque<String>,
    /// Agents that never got it: the job stopped first.
    pub cancelled: Vec<String>,
    /// The error budget ran out.
    pub stopped: bool,
    /// The idempotency key of the push, if any (each agent's is `KEY@AGENT`).
    pub key: Option<String>,
    /// Agents released so far (their tasks may not be published yet).
    pub released: usize,
}

/// Agents of a job to give its task to now.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    pub job: JobId,
    pub text: String,
    pub agents: Vec<String>,
    pub key: Option<String>,
    /// One task for any one of `agents` (queue mode), not one task each.
    pub one_of: bool,
}

/// A job that takes the agents matching its selector as they come
/// (`--wait-for-agents`).
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub selector: Selector,
    /// Queue mode: the job is one task for any one of them, published when
    /// the first matches (then the job waits no more).
    pub one_task: bool,
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
    /// Stale results by agent (answering a delivery no longer current, e.g.
    /// after its ack deadline passed): recorded, but they do not count.
    pub stale: BTreeMap<String, Answer>,
    /// Its rollout limits, when it has any.
    pub rollout: Option<Rollout>,
    /// An operator cancelled it.
    pub cancelled: bool,
    /// When it times out (`timeout_secs`), if it does.
    pub deadline: Option<Instant>,
    /// Its deadline passed before every agent answered.
    pub timed_out: bool,
    /// It still takes agents that come to match (until it times out or is
    /// cancelled); it needs a rollout to hold them.
    pub waiting: Option<Waiting>,
}

impl Job {
    /// Under its limits: who gets the task next (nothing once stopped);
    /// stops it when its error budget ran out.
    fn release(&mut self) -> Option<Release> {
        let failed = self.answers.values().filter(|a| !a.ok).count();
        let answered = self.answers.len();
        let r = self.rollout.as_mut()?;
        if r.stopped || self.cancelled || self.timed_out {
            return None;
        }
        if r.max_errors.is_some_and(|m| failed > m) {
            r.stopped = true;
            r.cancelled.extend(r.held.drain(..));
            return None;
        }
        let running = r.released.saturating_sub(answered);
        let free = r.concurrency.saturating_sub(running).min(r.held.len());
        if free == 0 {
            return None;
        }
        r.released += free;
        Some(Release {
            job: self.id,
            text: self.text.clone(),
            agents: r.held.drain(..free).collect(),
            key: r.key.clone(),
            one_of: false,
        })
    }
}

/// What other replicas learn of a job (see [`JobLog`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    Created {
        text: String,
        target: String,
        /// Unix seconds.
        created_at: f64,
        tasks: Vec<(TaskId, Option<String>)>,
        expected: Vec<String>,
    },
    TasksAdded {
        job: JobId,
        tasks: Vec<(TaskId, Option<String>)>,
    },
    Cancelled {
        job: JobId,
    },
}

/// The job log replicas share: it numbers jobs across the fleet.
pub trait JobLog: Send + Sync {
    /// Writes the event; for `Created`, returns the new job's id (`None`
    /// when the log could not be written: the job then gets no id).
    fn write(&self, event: &JobEvent) -> Option<JobId>;
}

fn pairs(tasks: &[JobTask]) -> Vec<(TaskId, Option<String>)> {
    tasks.iter().map(|t| (t.id, t.agent.clone())).collect()
}

fn job_tasks(pairs: Vec<(TaskId, Option<String>)>) -> Vec<JobTask> {
    pairs
        .into_iter()
        .map(|(id, agent)| JobTask { id, agent })
        .collect()
}

#[derive(Default)]
struct Jobs {
    next: JobId,
    held: VecDeque<Job>,
    by_task: HashMap<TaskId, JobId>,
    /// With replicas: the latest results of tasks no job held when they
    /// came (another replica may answer a job's task before the job is
    /// known here), given to the job that turns out to hold them.
    early: VecDeque<ResultRecord>,
}

/// Results kept for a job not known yet, at most.
const EARLY_RESULTS: usize = 10_000;

impl Jobs {
    /// Job `id`, if still held (ids increase, oldest first; with replicas
    /// not consecutive).
    fn get_mut(&mut self, id: JobId) -> Option<&mut Job> {
        let first = self.held.front()?.id;
        let i = usize::try_from(id.checked_sub(first)?).ok()?;
        if self.held.get(i).is_some_and(|j| j.id == id) {
            return self.held.get_mut(i);
        }
        let i = self.held.binary_search_by_key(&id, |j| j.id).ok()?;
        self.held.get_mut(i)
    }

    /// Holds `job` in id order, forgetting the oldest past [`MAX_JOBS`].
    fn hold(&mut self, job: Job) {
        for t in &job.tasks {
            self.by_task.insert(t.id, job.id);
        }
        let at = self.held.partition_point(|j| j.id < job.id);
        self.held.insert(at, job);
        if self.held.len() > MAX_JOBS {
            if let Some(old) = self.held.pop_front() {
                for t in &old.tasks {
                    self.by_task.remove(&t.id);
                }
            }
        }
    }
}

/// Bytes of an agent's output a job keeps (the whole output is in the
/// results file): a job over a large fleet stays small in memory.
pub const KEPT_OUTPUT: usize = 4096;

/// The jobs held; shared by the admin service and the result path.
#[derive(Default)]
pub struct JobTable {
    jobs: Mutex<Jobs>,
    /// Whether any job is held (the result path skips the lock otherwise).
    any: AtomicBool,
    /// With replicas: where jobs are numbered and told to the others.
    shared: std::sync::OnceLock<Arc<dyn JobLog>>,
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
        self.create_rollout(text, target, tasks, expected, None).0
    }

    /// Holds a new job that rolls out under `rollout` (its `held` agents get
    /// the task as slots free up); returns its id and whom to give it first.
    pub fn create_rollout(
        &self,
        text: String,
        target: String,
        tasks: Vec<JobTask>,
        expected: Vec<String>,
        rollout: Option<Rollout>,
    ) -> (JobId, Option<Release>) {
        let id = match self.shared.get() {
            Some(log) => {
                let event = JobEvent::Created {
                    text: text.clone(),
                    target: target.clone(),
                    created_at: crate::unixtime::seconds(SystemTime::now()),
                    tasks: pairs(&tasks),
                    expected: expected.clone(),
                };
                log.write(&event).unwrap_or(0)
            }
            None => 0,
        };
        let mut jobs = self.lock();
        let id = if id == 0 {
            jobs.next += 1;
            jobs.next
        } else {
            jobs.next = jobs.next.max(id);
            id
        };
        let mut job = Job {
            id,
            text,
            target,
            created_at: SystemTime::now(),
            tasks,
            expected,
            answers: BTreeMap::new(),
            stale: BTreeMap::new(),
            rollout,
            cancelled: false,
            deadline: None,
            timed_out: false,
            waiting: None,
        };
        let first = job.release();
        jobs.hold(job);
        self.any.store(true, Ordering::Release);
        (id, first)
    }

    /// With replicas: observes the results that came before the job
    /// holding their task was known (call after creating a job or adding
    /// tasks to it); returns whom rollouts give their task to next.
    pub fn observe_early(&self) -> Vec<Release> {
        self.observe_early_of(None)
    }

    /// [`JobTable::observe_early`] for the results of job `only`, if given.
    fn observe_early_of(&self, only: Option<JobId>) -> Vec<Release> {
        let early: Vec<ResultRecord> = {
            let mut jobs = self.lock();
            if jobs.early.is_empty() {
                return vec![];
            }
            let Jobs { early, by_task, .. } = &mut *jobs;
            let (known, unknown): (Vec<_>, Vec<_>) = early.drain(..).partition(|r| {
                r.task_id
                    .and_then(|t| by_task.get(&t))
                    .is_some_and(|j| only.is_none_or(|o| o == *j))
            });
            early.extend(unknown);
            known
        };
        self.observe(early.iter())
    }

    /// Numbers jobs through `log` and tells it what becomes of them (replicas).
    pub fn share(&self, log: Arc<dyn JobLog>) {
        let _ = self.shared.set(log);
        // Results are kept for jobs not known yet from now on.
        self.any.store(true, Ordering::Release);
    }

    /// Applies what another replica wrote about job `id`: a copy of the job
    /// (its rollout is driven there), tasks added, a cancellation.
    pub fn insert_copy(&self, id: JobId, event: JobEvent) {
        let copied = match &event {
            JobEvent::Created { .. } => id,
            JobEvent::TasksAdded { job, .. } | JobEvent::Cancelled { job } => *job,
        };
        let mut jobs = self.lock();
        match event {
            JobEvent::Created {
                text,
                target,
                created_at,
                tasks,
                expected,
            } => {
                if jobs.get_mut(id).is_some() {
                    return;
                }
                jobs.next = jobs.next.max(id);
                jobs.hold(Job {
                    id,
                    text,
                    target,
                    created_at: SystemTime::UNIX_EPOCH
                        + std::time::Duration::from_secs_f64(created_at.max(0.0)),
                    tasks: job_tasks(tasks),
                    expected,
                    answers: BTreeMap::new(),
                    stale: BTreeMap::new(),
                    rollout: None,
                    cancelled: false,
                    deadline: None,
                    timed_out: false,
                    waiting: None,
                });
                self.any.store(true, Ordering::Release);
            }
            JobEvent::TasksAdded { job, tasks } => {
                let tasks = job_tasks(tasks);
                if let Some(j) = jobs.get_mut(job) {
                    j.tasks.extend(tasks.iter().cloned());
                    for t in tasks {
                        jobs.by_task.insert(t.id, job);
                    }
                }
            }
            JobEvent::Cancelled { job } => {
                if let Some(j) = jobs.get_mut(job) {
                    j.cancelled = true;
                }
            }
        }
        drop(jobs);
        // Only the copy's own: a copy drives no rollout (nothing to release),
        // and another job's early results are its rollout's to release.
        self.observe_early_of(Some(copied));
    }

    /// Makes job `id` (made with a rollout) take agents as they come to match.
    pub fn set_waiting(&self, id: JobId, waiting: Waiting) {
        if let Some(j) = self.lock().get_mut(id) {
            j.waiting = Some(waiting);
        }
    }

    /// The jobs still taking agents, with the selector each takes them by.
    pub fn waiting(&self) -> Vec<(JobId, Selector)> {
        let jobs = self.lock();
        jobs.held
            .iter()
            .filter_map(|j| j.waiting.as_ref().map(|w| (j.id, w.selector.clone())))
            .collect()
    }

    /// The agents `matching` waiting job `id` now: those it did not have
    /// join it, held by its rollout and released under its limits; a queue
    /// job's one task goes to any one of them. Returns whom to publish for.
    pub fn admit(&self, id: JobId, matching: Vec<String>) -> Option<Release> {
        let mut jobs = self.lock();
        let j = jobs.get_mut(id)?;
        let one_task = j.waiting.as_ref()?.one_task;
        if matching.is_empty() {
            return None;
        }
        if one_task {
            j.waiting = None;
            return Some(Release {
                job: id,
                text: j.text.clone(),
                agents: matching,
                key: j.rollout.as_ref().and_then(|r| r.key.clone()),
                one_of: true,
            });
        }
        let known: HashSet<&String> = j.expected.iter().collect();
        let new: Vec<String> = matching
            .into_iter()
            .filter(|a| !known.contains(a))
            .collect();
        if new.is_empty() {
            return None;
        }
        j.expected.extend(new.iter().cloned());
        j.rollout.as_mut()?.held.extend(new);
        j.release()
    }

    /// The newest job pushed with idempotency key `key` that is still held.
    pub fn keyed(&self, key: &str) -> Option<JobId> {
        let jobs = self.lock();
        jobs.held
            .iter()
            .rev()
            .find(|j| j.rollout.as_ref().and_then(|r| r.key.as_deref()) == Some(key))
            .map(|j| j.id)
    }

    /// Gives job `id` until `deadline`.
    pub fn set_deadline(&self, id: JobId, deadline: Instant) {
        if let Some(j) = self.lock().get_mut(id) {
            j.deadline = Some(deadline);
        }
    }

    /// Marks the jobs whose deadline passed by `now` timed out (their
    /// rollouts release no one more); returns their tasks, to be delivered
    /// no further.
    pub fn expire(&self, now: Instant) -> Vec<TaskId> {
        let mut tasks = vec![];
        let mut jobs = self.lock();
        for j in jobs.held.iter_mut() {
            if j.timed_out || j.deadline.is_none_or(|d| d > now) {
                continue;
            }
            j.timed_out = true;
            j.deadline = None;
            j.waiting = None;
            if let Some(r) = j.rollout.as_mut() {
                r.cancelled.extend(r.held.drain(..));
            }
            tasks.extend(j.tasks.iter().map(|t| t.id));
        }
        tasks
    }

    /// Whether job `id` is held and still spreading (not cancelled, not
    /// timed out): a release decided before either must not be published.
    pub fn is_live(&self, id: JobId) -> bool {
        self.lock()
            .get_mut(id)
            .is_some_and(|j| !j.cancelled && !j.timed_out)
    }

    /// Adds the tasks published for a release to job `id`; false when the
    /// job was cancelled, timed out or forgotten meanwhile (then the tasks
    /// are the caller's to cancel).
    pub fn add_tasks(&self, id: JobId, tasks: Vec<JobTask>) -> bool {
        if let Some(log) = self.shared.get() {
            log.write(&JobEvent::TasksAdded {
                job: id,
                tasks: pairs(&tasks),
            });
        }
        let mut jobs = self.lock();
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        let Some(j) = jobs.get_mut(id) else {
            return false;
        };
        let live = !j.cancelled && !j.timed_out;
        j.tasks.extend(tasks);
        for t in ids {
            jobs.by_task.insert(t, id);
        }
        live
    }

    /// Notes the accepted results among `judged` that answer a job's task;
    /// returns whom jobs rolling out give their task to next.
    pub fn observe<'a>(&self, judged: impl IntoIterator<Item = &'a ResultRecord>) -> Vec<Release> {
        let mut releases = vec![];
        if !self.any.load(Ordering::Acquire) {
            return releases;
        }
        let mut jobs = self.lock();
        for r in judged {
            let Some(task) = r.task_id.filter(|_| r.accepted || r.stale) else {
                continue;
            };
            let Some(&job) = jobs.by_task.get(&task) else {
                if self.shared.get().is_some() {
                    if jobs.early.len() == EARLY_RESULTS {
                        jobs.early.pop_front();
                    }
                    jobs.early.push_back(r.clone());
                }
                continue;
            };
            let Some(j) = jobs.get_mut(job) else {
                continue;
            };
            let mut output = r.output.clone();
            if output.len() > KEPT_OUTPUT {
                let mut cut = KEPT_OUTPUT;
                while !output.is_char_boundary(cut) {
                    cut -= 1;
                }
                output.truncate(cut);
                output.push('…');
            }
            let answer = Answer {
                task,
                ok: r.ok,
                output,
                attempt: r.attempt,
                at: r.received_at,
            };
            if !r.accepted {
                j.stale.insert(r.client.clone(), answer);
                continue;
            }
            j.answers.insert(r.client.clone(), answer);
            releases.extend(j.release());
        }
        releases
    }

    /// Job `id`, if held.
    pub fn get(&self, id: JobId) -> Option<Job> {
        self.lock().get_mut(id).map(|j| j.clone())
    }

    /// Marks job `id` cancelled: its rollout releases no one more (the
    /// agents it held are cancelled). Returns its tasks and how many agents
    /// were held, or `None` for a job not held.
    pub fn cancel(&self, id: JobId) -> Option<(Vec<TaskId>, usize)> {
        let cancelled = {
            let mut jobs = self.lock();
            let j = jobs.get_mut(id)?;
            j.cancelled = true;
            j.waiting = None;
            let mut held = 0;
            if let Some(r) = j.rollout.as_mut() {
                held = r.held.len();
                r.cancelled.extend(r.held.drain(..));
            }
            (j.tasks.iter().map(|t| t.id).collect(), held)
        };
        if let Some(log) = self.shared.get() {
            log.write(&JobEvent::Cancelled { job: id });
        }
        Some(cancelled)
    }

    /// The job holding task `task`, if any.
    pub fn job_of(&self, task: TaskId) -> Option<JobId> {
        self.lock().by_task.get(&task).copied()
    }

    /// Every job held, newest first.
    pub fn list(&self) -> Vec<Job> {
        self.newest(usize::MAX)
    }

    /// The newest `n` jobs held, newest first.
    pub fn newest(&self, n: usize) -> Vec<Job> {
        self.lock().held.iter().rev().take(n).cloned().collect()
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
        assert_eq!(j.stale["b"].task, 7, "a stale answer is kept apart");
        assert_eq!(j.answers["a"].output, "a says true");
        t.observe(&[result(7, "b", false, true)]);
        assert!(!t.get(job).unwrap().answers["b"].ok);
        assert_eq!(t.get(job + 1), None);
    }

    #[test]
    fn limits_are_numbers_or_shares_of_the_agents() {
        assert_eq!(Limit::parse("2"), Ok(Limit::Agents(2)));
        assert_eq!(Limit::parse("25%"), Ok(Limit::Percent(25)));
        assert_eq!(Limit::parse("25%").unwrap().of(5), 2);
        assert_eq!(Limit::parse("10%").unwrap().of(5), 1);
        assert!(Limit::parse("0%").unwrap_err().contains("percentage"));
        assert!(Limit::parse("many").is_err());
    }

    #[test]
    fn a_rollout_releases_agents_as_results_come_and_stops_past_its_error_budget() {
        let t = JobTable::default();
        let agents: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let rollout = Rollout {
            concurrency: 2,
            max_errors: Some(1),
            held: agents.iter().cloned().collect(),
            cancelled: vec![],
            stopped: false,
            key: None,
            released: 0,
        };
        let (job, first) =
            t.create_rollout("x".into(), "5 agents".into(), vec![], agents, Some(rollout));
        assert_eq!(first.unwrap().agents, ["a", "b"]);
        let task = |id, agent: &str| JobTask {
            id,
            agent: Some(agent.into()),
        };
        t.add_tasks(job, vec![task(1, "a"), task(2, "b")]);
        // One slot frees: one more agent.
        let next = t.observe(&[result(1, "a", true, true)]);
        assert_eq!(next[0].agents, ["c"]);
        t.add_tasks(job, vec![task(3, "c")]);
        // One failure is within the budget; a second stops the job.
        assert_eq!(t.observe(&[result(2, "b", false, true)])[0].agents, ["d"]);
        t.add_tasks(job, vec![task(4, "d")]);
        assert!(t.observe(&[result(3, "c", false, true)]).is_empty());
        let r = t.get(job).unwrap().rollout.unwrap();
        assert!(r.stopped);
        assert_eq!(r.cancelled, ["e"]);
        // What is still running finishes; nothing more is released.
        assert!(t.observe(&[result(4, "d", true, true)]).is_empty());
    }

    fn unlimited(held: &[&str], key: Option<&str>) -> Rollout {
        Rollout {
            concurrency: usize::MAX,
            max_errors: None,
            held: held.iter().map(|a| a.to_string()).collect(),
            cancelled: vec![],
            stopped: false,
            key: key.map(String::from),
            released: 0,
        }
    }

    #[test]
    fn a_waiting_job_takes_each_agent_that_comes_to_match_once_until_cancelled() {
        let t = JobTable::default();
        let role = Selector::parse("role=db").unwrap();
        let (job, first) = t.create_rollout(
            "x".into(),
            "agents matching role=db".into(),
            vec![],
            vec!["a".into()],
            Some(unlimited(&["a"], Some("k"))),
        );
        assert_eq!(first.unwrap().agents, ["a"]);
        t.set_waiting(
            job,
            Waiting {
                selector: role.clone(),
                one_task: false,
            },
        );
        assert_eq!(t.waiting(), [(job, role)]);
        assert_eq!(t.keyed("k"), Some(job));
        assert_eq!(t.keyed("other"), None);
        // Only the newcomers join, each once.
        let r = t
            .admit(job, vec!["a".into(), "b".into(), "c".into()])
            .unwrap();
        assert_eq!((r.agents, r.one_of), (vec!["b".into(), "c".into()], false));
        assert_eq!(t.admit(job, vec!["a".into(), "b".into()]), None);
        assert_eq!(t.get(job).unwrap().expected, ["a", "b", "c"]);
        t.cancel(job);
        assert!(t.waiting().is_empty());
        assert_eq!(t.admit(job, vec!["d".into()]), None);
    }

    #[test]
    fn a_waiting_queue_job_publishes_its_one_task_when_the_first_agents_match() {
        let t = JobTable::default();
        let (job, first) = t.create_rollout(
            "x".into(),
            "any one agent matching role=db".into(),
            vec![],
            vec![],
            Some(unlimited(&[], Some("k"))),
        );
        assert_eq!(first, None);
        let selector = Selector::parse("role=db").unwrap();
        t.set_waiting(
            job,
            Waiting {
                selector,
                one_task: true,
            },
        );
        assert_eq!(t.admit(job, vec![]), None);
        let r = t.admit(job, vec!["a".into(), "b".into()]).unwrap();
        assert_eq!(r.agents, ["a", "b"]);
        assert!(r.one_of);
        assert_eq!(r.key.as_deref(), Some("k"));
        assert!(t.waiting().is_empty(), "one task, once");
        assert_eq!(t.admit(job, vec!["c".into()]), None);
    }

    #[test]
    fn a_waiting_job_stops_waiting_when_it_times_out() {
        let t = JobTable::default();
        let (job, _) = t.create_rollout("x".into(), "t".into(), vec![], vec![], None);
        let selector = Selector::parse("role=db").unwrap();
        t.set_waiting(
            job,
            Waiting {
                selector,
                one_task: false,
            },
        );
        let now = Instant::now();
        t.set_deadline(job, now);
        t.expire(now);
        assert!(t.waiting().is_empty());
    }

    #[test]
    fn a_job_past_its_deadline_times_out_once_and_gives_its_tasks() {
        let t = JobTable::default();
        let job = t.create(
            "x".into(),
            "every agent".into(),
            one_task(3),
            vec!["a".into()],
        );
        let now = Instant::now();
        t.set_deadline(job, now + std::time::Duration::from_secs(5));
        assert!(t.expire(now).is_empty());
        assert_eq!(t.expire(now + std::time::Duration::from_secs(6)), [3]);
        assert!(t.get(job).unwrap().timed_out);
        assert!(t.expire(now + std::time::Duration::from_secs(7)).is_empty());
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
