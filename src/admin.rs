//! `AdminService`: the operators' gRPC service (`proto/admin.proto`, package
//! `contact.admin.v1`), served beside the agents' `Contact` service. It owns
//! who may call it (admin credentials, see `trust`) and turns each call into
//! dispatcher operations. Publishing may wait for the journal's fsync, so it
//! runs on a thread of ours (`admin`), never on a completion-queue thread.

use crate::dispatch::{Dispatcher, Mode, TaskProgress};
use crate::jobs::{Job, JobTable, JobTask, Limit, Release, Rollout, Waiting};
use crate::labels::Selector;
use crate::logtext::quoted;
use crate::proto::admin::{
    Admin, AgentStatus, CancelReply, CancelRequest, ClientInfo as ClientRow, DisconnectReply,
    DisconnectRequest, DrainReply, DrainRequest, GetJobRequest, Job as JobMsg, JobTotals,
    ListClientsReply, ListClientsRequest, ListJobsReply, ListJobsRequest, PushReply, PushRequest,
    ResultEvent, WatchResultsRequest,
};
use crate::proto::validate_client_id;
use crate::registry::ClientInfo;
use crate::shutdown::Shutdown;
use crate::task::{NewTask, Published, TaskId};
use crate::trust::{self, Authenticator, Refusal};
use crate::watch::{read_results, WatchFrom};
use crossbeam_channel::Sender;
use futures::channel::oneshot;
use futures::{SinkExt, StreamExt};
use grpcio::{RpcContext, RpcStatus, RpcStatusCode, ServerStreamingSink, UnarySink, WriteFlags};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes a task's envelope (ids, attempt, incarnation) may add to its text
/// in the message an agent receives.
const ENVELOPE_BYTES: usize = 256;

/// How often job deadlines are checked, and waiting jobs look for agents
/// that came to match.
const JOB_CHECK: Duration = Duration::from_millis(200);

/// Longest idempotency key accepted.
const MAX_KEY_BYTES: usize = 256;

/// Work for the `admin` thread.
type Work = Box<dyn FnOnce() + Send>;

/// The service: cheap to clone, one clone per completion queue.
#[derive(Clone)]
pub struct AdminService {
    dispatcher: Arc<Dispatcher>,
    jobs: Arc<JobTable>,
    auth: Arc<Authenticator>,
    worker: Sender<Work>,
    /// The largest message the server sends or receives.
    max_message_bytes: usize,
    /// The results file `WatchResults` reads (`--results-to`), if any.
    results_file: Option<PathBuf>,
    /// Served on an admin socket too: its callers are operators.
    socket: bool,
    /// Listening beyond loopback (`--insecure` without credentials: then the
    /// admin API is refused over the network).
    exposed: bool,
    /// With `--store`: results are read from the store (any replica's).
    replica: Option<crate::replica::Replica>,
    /// Results are numbered (`--state-dir`), so WatchResults can resume.
    numbered: bool,
    shutdown: Shutdown,
}

/// How the server is reached and what it keeps, as the admin API needs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdminReach {
    /// Also on `--admin-listen unix:PATH`.
    pub socket: bool,
    /// `--listen` is beyond loopback.
    pub exposed: bool,
    /// Results carry sequence numbers (`--state-dir`).
    pub numbered: bool,
}

/// The `admin` thread.
pub struct AdminWorker(JoinHandle<()>);

impl AdminWorker {
    /// Waits for the thread to finish the calls it holds.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl AdminService {
    /// With replicas: `WatchResults` reads every replica's results from the store.
    pub fn reading_results_from(mut self, replica: crate::replica::Replica) -> AdminService {
        self.replica = Some(replica);
        self
    }

    /// The service and its thread, which ends when `shutdown` fires (calls
    /// still waiting for it are answered UNAVAILABLE).
    pub fn start(
        dispatcher: Arc<Dispatcher>,
        jobs: Arc<JobTable>,
        auth: Arc<Authenticator>,
        max_message_bytes: usize,
        results_file: Option<PathBuf>,
        reach: AdminReach,
        shutdown: Shutdown,
    ) -> Result<(AdminService, AdminWorker), crate::Error> {
        let stop = shutdown.clone();
        let (worker, queue) = crossbeam_channel::unbounded::<Work>();
        let rollouts = Rollouts {
            worker: worker.clone(),
            dispatcher: dispatcher.clone(),
            jobs: jobs.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                let mut next_check = Instant::now();
                loop {
                    crossbeam_channel::select! {
                        recv(queue) -> work => match work {
                            Ok(work) => work(),
                            Err(_) => return,
                        },
                        recv(stop.receiver()) -> _ => return,
                        default(JOB_CHECK) => {}
                    }
                    if Instant::now() >= next_check {
                        rollouts.check_jobs();
                        next_check = Instant::now() + JOB_CHECK;
                    }
                }
            })
            .map_err(crate::Error::Thread)?;
        let service = AdminService {
            dispatcher,
            jobs,
            auth,
            worker,
            max_message_bytes,
            results_file,
            socket: reach.socket,
            exposed: reach.exposed,
            numbered: reach.numbered,
            replica: None,
            shutdown,
        };
        Ok((service, AdminWorker(thread)))
    }

    /// The operator behind a call, or the status that refuses it.
    fn operator(&self, ctx: &RpcContext) -> Result<String, RpcStatus> {
        // Through the admin socket (mode 0600): the file's owner, or root.
        if self.socket && ctx.peer().starts_with("unix:") {
            return Ok("local socket".into());
        }
        // Without credentials the admin API is for this machine only: an
        // --insecure server on a reachable address must not take orders from
        // the network.
        if self.exposed && !self.auth.requires_credentials() {
            return Err(RpcStatus::with_message(
                RpcStatusCode::PERMISSION_DENIED,
                "this server listens beyond loopback without credentials: its admin API needs --auth-secret (admin tokens) or --admin-listen unix:PATH".into(),
            ));
        }
        let bearer = trust::bearer_from(ctx.request_headers())
            .map_err(|why| RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why))?;
        self.auth.admin(bearer.as_deref()).map_err(|r| match r {
            Refusal::Unauthenticated(m) => {
                RpcStatus::with_message(RpcStatusCode::UNAUTHENTICATED, m)
            }
            Refusal::Denied(m) => RpcStatus::with_message(RpcStatusCode::PERMISSION_DENIED, m),
        })
    }

    /// Checks a push and says where it goes; publishing is left to the caller.
    fn check_push(&self, req: &PushRequest) -> Result<Target, RpcStatus> {
        let invalid = |m: String| RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, m);
        if req.text.is_empty() {
            return Err(invalid("the task's text is empty".into()));
        }
        let limit = self.max_message_bytes.saturating_sub(ENVELOPE_BYTES);
        if req.text.len() > limit {
            return Err(invalid(format!(
                "the task's text is {} bytes; agents take at most {limit} (the server's message limit less the envelope)",
                req.text.len()
            )));
        }
        if req.idempotency_key.len() > MAX_KEY_BYTES {
            return Err(invalid(format!(
                "the idempotency key is {} bytes; at most {MAX_KEY_BYTES}",
                req.idempotency_key.len()
            )));
        }
        match (req.agent.is_empty(), req.selector.is_empty()) {
            (true, true) if req.wait_for_agents => Err(invalid(
                "wait_for_agents needs an agent or a selector to wait for".into(),
            )),
            (true, true) => Ok(Target::Default),
            (false, false) => Err(invalid("give one agent or a selector, not both".into())),
            (false, true) => {
                validate_client_id(&req.agent).map_err(|e| invalid(format!("agent: {e}")))?;
                if !req.wait_for_agents && !self.dispatcher.knows(&req.agent) {
                    return Err(RpcStatus::with_message(
                        RpcStatusCode::NOT_FOUND,
                        format!(
                            "no agent {:?} is connected or remembered; check the id (`contact-ctl clients`), or push with --wait-for-agents to keep the task for it",
                            req.agent
                        ),
                    ));
                }
                Ok(Target::Agent(req.agent.clone()))
            }
            (true, false) => {
                let selector = Selector::parse(&req.selector)
                    .map_err(|e| invalid(format!("selector: {e}")))?;
                let agents = self.dispatcher.matching(&selector);
                let queue = self.dispatcher.config().mode == Mode::Queue;
                match (req.wait_for_agents, agents.is_empty()) {
                    // A queue task for agents already there waits for nobody else.
                    (true, false) if queue => Ok(Target::Selected(selector, agents)),
                    (true, _) => Ok(Target::Waiting(selector, agents)),
                    (false, false) => Ok(Target::Selected(selector, agents)),
                    (false, true) => Err(RpcStatus::with_message(
                        RpcStatusCode::NOT_FOUND,
                        format!("selector {selector} matches no connected agent; `contact-ctl clients` shows their labels, and --wait-for-agents keeps the task for agents that come to match"),
                    )),
                }
            }
        }
    }

    /// A handle that gives rolling-out jobs' tasks to their next agents.
    pub fn rollouts(&self) -> Rollouts {
        Rollouts {
            worker: self.worker.clone(),
            dispatcher: self.dispatcher.clone(),
            jobs: self.jobs.clone(),
        }
    }

    /// The rollout of a push with limits or one that waits for agents: its
    /// agents (held, in order), the target in words, and what it waits for.
    fn rollout_of(
        &self,
        req: &PushRequest,
        target: Target,
    ) -> Result<(Rollout, String, Option<Waiting>), RpcStatus> {
        let invalid = |m: String| RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, m);
        let limit = |what: &str, text: &str| -> Result<Option<Limit>, RpcStatus> {
            if text.is_empty() {
                return Ok(None);
            }
            Limit::parse(text)
                .map(Some)
                .map_err(|e| invalid(format!("{what}: {e}")))
        };
        let concurrency = limit("max_concurrency", &req.max_concurrency)?;
        let max_errors = limit("max_errors", &req.max_errors)?;
        let queue = self.dispatcher.config().mode == Mode::Queue;
        let mut waiting = None;
        let (agents, what) = match target {
            Target::Agent(a) => (vec![a.clone()], format!("agent {a}")),
            Target::Selected(selector, agents) => {
                let n = agents.len();
                (agents, format!("{n} agent{} matching {selector}", plural(n)))
            }
            Target::Waiting(..) if queue && (concurrency.is_some() || max_errors.is_some()) => {
                return Err(RpcStatus::with_message(
                    RpcStatusCode::FAILED_PRECONDITION,
                    "rollout limits count agents: a task for the work queue goes to one".into(),
                ))
            }
            // The queue's one task is published when the first agent matches.
            Target::Waiting(selector, _) if queue => {
                let what = format!("any one agent matching {selector}, when one connects");
                waiting = Some(Waiting {
                    selector,
                    one_task: true,
                });
                (vec![], what)
            }
            Target::Waiting(selector, agents) => {
                let n = agents.len();
                let what = format!(
                    "{n} agent{} matching {selector} now and any that come to match",
                    plural(n)
                );
                waiting = Some(Waiting {
                    selector,
                    one_task: false,
                });
                (agents, what)
            }
            Target::Default if self.dispatcher.config().mode == Mode::Queue => {
                return Err(RpcStatus::with_message(
                    RpcStatusCode::FAILED_PRECONDITION,
                    "rollout limits count agents: a task for the work queue goes to one; give --target or --agent".into(),
                ))
            }
            Target::Default => {
                let agents: Vec<String> = self
                    .dispatcher
                    .clients()
                    .into_iter()
                    .filter(|c| !c.drained)
                    .map(|c| c.id)
                    .collect();
                if agents.is_empty() {
                    return Err(RpcStatus::with_message(
                        RpcStatusCode::NOT_FOUND,
                        "no agent is connected to roll it out to".into(),
                    ));
                }
                let n = agents.len();
                (agents, format!("{n} connected agent{}", plural(n)))
            }
        };
        let n = agents.len();
        let rollout = Rollout {
            // A share of a waiting job's agents is of those matching now.
            concurrency: concurrency.map_or(usize::MAX, |l| l.of(n)).max(1),
            max_errors: max_errors.map(|l| l.of(n)),
            held: agents.into(),
            cancelled: vec![],
            stopped: false,
            key: (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone()),
            released: 0,
        };
        Ok((rollout, what, waiting))
    }

    /// Runs `job` on the `admin` thread and answers the call with its outcome.
    fn answer_from_worker<T: Send + 'static>(
        &self,
        ctx: &RpcContext,
        sink: UnarySink<T>,
        job: impl FnOnce() -> Result<T, RpcStatus> + Send + 'static,
    ) {
        let (tx, rx) = oneshot::channel();
        let sent = self.worker.send(Box::new(move || {
            let _ = tx.send(job());
        }));
        ctx.spawn(async move {
            let outcome = match (sent, rx.await) {
                (Ok(()), Ok(outcome)) => outcome,
                _ => Err(RpcStatus::with_message(
                    RpcStatusCode::UNAVAILABLE,
                    "the server is shutting down".to_string(),
                )),
            };
            let _ = match outcome {
                Ok(reply) => sink.success(reply).await,
                Err(status) => sink.fail(status).await,
            };
        });
    }
}

/// Gives rolling-out jobs' tasks to their next agents, on the `admin`
/// thread (publishing may wait for the journal): handed to the result path,
/// which learns whom to release as results come back.
#[derive(Clone)]
pub struct Rollouts {
    worker: Sender<Work>,
    dispatcher: Arc<Dispatcher>,
    jobs: Arc<JobTable>,
}

impl Rollouts {
    /// Times out the jobs past their deadline, and gives waiting jobs'
    /// task to the agents that came to match them (on the `admin` thread).
    fn check_jobs(&self) {
        let late = self.jobs.expire(Instant::now());
        if !late.is_empty() {
            let n = self.dispatcher.cancel(&late);
            log::info!("a job timed out: {n} of its tasks are delivered no further");
        }
        for (job, selector) in self.jobs.waiting() {
            let matching = self.dispatcher.matching(&selector);
            if let Some(r) = self.jobs.admit(job, matching) {
                let ids = self.publish(r);
                log::info!(
                    "job {job}: {} for agents that came to match {selector}",
                    tasks_named(&ids)
                );
            }
        }
    }

    /// Publishes each release's tasks (later, on the `admin` thread).
    pub fn release(&self, releases: Vec<Release>) {
        if releases.is_empty() {
            return;
        }
        let this = self.clone();
        let _ = self.worker.send(Box::new(move || {
            for r in releases {
                this.publish(r);
            }
        }));
    }

    /// Publishes one release's tasks and adds them to their job (before
    /// any can be delivered); nothing for a job cancelled or timed out since
    /// the release was decided.
    fn publish(&self, r: Release) -> Vec<u64> {
        if !self.jobs.is_live(r.job) {
            return vec![];
        }
        let tasks = if r.one_of {
            vec![NewTask {
                target: None,
                text: r.text.clone(),
                key: r.key.clone(),
                any_of: Some(r.agents.clone()),
            }]
        } else {
            r.agents
                .iter()
                .map(|a| NewTask {
                    target: Some(a.clone()),
                    text: r.text.clone(),
                    key: r.key.as_ref().map(|k| format!("{k}@{a}")),
                    any_of: None,
                })
                .collect()
        };
        let mut live = true;
        let added = self.dispatcher.publish_new_then(tasks, |added| {
            live = self.jobs.add_tasks(r.job, job_tasks(added));
        });
        let Ok(published) = added else {
            log::error!(
                "job {}: its next tasks could not be journaled; the job stops spreading",
                r.job
            );
            return vec![];
        };
        let ids: Vec<u64> = published.iter().map(Published::id).collect();
        if !live {
            // Cancelled or timed out while these were being published.
            self.dispatcher.cancel(&ids);
        }
        // With replicas, an agent may have answered before its task was in the job.
        self.release(self.jobs.observe_early());
        ids
    }

    /// Holds a new rolling-out job and gives the first agents their task.
    fn start(
        &self,
        text: String,
        target: String,
        rollout: Rollout,
        waiting: Option<Waiting>,
        timeout: u32,
        who: &str,
    ) -> PushReply {
        // A retried keyed push answers with its job, which this server
        // holds or, after a restart, finds by its first agent's task.
        if let Some(job) = rollout.key.as_ref().and_then(|k| self.jobs.keyed(k)) {
            let j = self.jobs.get(job);
            let ids: Vec<u64> = j
                .iter()
                .flat_map(|j| j.tasks.iter().map(|t| t.id))
                .collect();
            log::info!("push by {who} to {target} repeats the key of job {job}: nothing published");
            return PushReply {
                task_id: ids.first().copied().unwrap_or(0),
                target,
                task_ids: ids,
                job_id: job,
                duplicate: true,
                ..Default::default()
            };
        }
        let repeat = rollout
            .key
            .as_ref()
            .zip(rollout.held.front())
            .and_then(|(k, a)| self.dispatcher.task_with_key(&format!("{k}@{a}")));
        if let Some(task) = repeat {
            let job = self.jobs.job_of(task).unwrap_or(0);
            log::info!("push by {who} to {target} repeats the key of job {job}: nothing published");
            return PushReply {
                task_id: task,
                target,
                task_ids: vec![task],
                job_id: job,
                duplicate: true,
                ..Default::default()
            };
        }
        let expected: Vec<String> = rollout.held.iter().cloned().collect();
        let (limit, errors) = (rollout.concurrency, rollout.max_errors);
        let (job, first) =
            self.jobs
                .create_rollout(text, target.clone(), vec![], expected, Some(rollout));
        if timeout > 0 {
            self.jobs
                .set_deadline(job, Instant::now() + Duration::from_secs(timeout.into()));
        }
        if let Some(w) = waiting {
            self.jobs.set_waiting(job, w);
        }
        let agents = first.as_ref().map(|r| r.agents.clone()).unwrap_or_default();
        let ids = first.map(|r| self.publish(r)).unwrap_or_default();
        log::info!(
            "job {job}: pushed by {who} to {target}, {limit} at a time{}; first {}",
            errors.map_or(String::new(), |e| format!(", stopping past {e} failed")),
            tasks_named(&ids)
        );
        PushReply {
            task_id: ids.first().copied().unwrap_or(0),
            target,
            task_ids: ids,
            agents: agents.into(),
            job_id: job,
            ..Default::default()
        }
    }
}

/// A job's record of tasks just published.
fn job_tasks(added: &[Arc<crate::task::Task>]) -> Vec<JobTask> {
    added
        .iter()
        .map(|t| JobTask {
            id: t.id,
            agent: t.target.clone(),
        })
        .collect()
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Where a push goes.
enum Target {
    /// Where `--dispatch` sends a task: every agent, or the work queue.
    Default,
    Agent(String),
    /// The connected agents a selector matched, each with a task of its own.
    Selected(Selector, Vec<String>),
    /// Those and the agents that come to match later (`wait_for_agents`).
    Waiting(Selector, Vec<String>),
}

/// "task 7" or "tasks 7-9" (ids published together are consecutive).
fn tasks_named(ids: &[u64]) -> String {
    match ids {
        [one] => format!("task {one}"),
        [first, .., last] => format!("tasks {first}-{last}"),
        [] => "no task".into(),
    }
}

/// The refusal for a job the server does not hold.
fn no_job(id: u64) -> RpcStatus {
    RpcStatus::with_message(
        RpcStatusCode::NOT_FOUND,
        format!(
            "no job {id} here: this server holds the newest {} jobs since it started (`contact-ctl jobs`)",
            crate::jobs::MAX_JOBS
        ),
    )
}

/// The refusal for an agent id the server does not know.
fn unknown_agent(agent: &str) -> RpcStatus {
    RpcStatus::with_message(
        RpcStatusCode::NOT_FOUND,
        format!(
            "no agent {agent:?} is connected or remembered; check the id (`contact-ctl clients`)"
        ),
    )
}

/// Answers a refused call.
fn refuse<T: 'static>(ctx: &RpcContext, sink: UnarySink<T>, status: RpcStatus) {
    warn_refused(ctx, &status);
    ctx.spawn(async move {
        let _ = sink.fail(status).await;
    });
}

fn warn_refused(ctx: &RpcContext, status: &RpcStatus) {
    log::warn!(
        "refused an admin call from {}: {}",
        ctx.peer(),
        quoted(status.message())
    );
}

impl Admin for AdminService {
    fn push(&mut self, ctx: RpcContext, req: PushRequest, sink: UnarySink<PushReply>) {
        let checked = self
            .operator(&ctx)
            .and_then(|who| self.check_push(&req).map(|target| (who, target)));
        let (who, target) = match checked {
            Ok(x) => x,
            Err(status) => return refuse(&ctx, sink, status),
        };
        let limited = !req.max_concurrency.is_empty() || !req.max_errors.is_empty();
        if limited || matches!(target, Target::Waiting(..)) {
            return match self.rollout_of(&req, target) {
                Ok((rollout, what, waiting)) => {
                    let rollouts = self.rollouts();
                    self.answer_from_worker(&ctx, sink, move || {
                        let timeout = req.timeout_secs;
                        Ok(rollouts.start(req.text, what, rollout, waiting, timeout, &who))
                    })
                }
                Err(status) => refuse(&ctx, sink, status),
            };
        }
        let dispatcher = self.dispatcher.clone();
        let jobs = self.jobs.clone();
        self.answer_from_worker(&ctx, sink, move || {
            let text = req.text.clone();
            let timeout = req.timeout_secs;
            // Broadcast to every agent: the job is for those connected now.
            let connected = match (&target, dispatcher.config().mode) {
                (Target::Default, Mode::Broadcast) => {
                    dispatcher.clients().into_iter().map(|c| c.id).collect()
                }
                _ => vec![],
            };
            let queue = dispatcher.config().mode == Mode::Queue;
            let (tasks, agents, target) = match target {
                Target::Default => (
                    vec![(None, req.text, None)],
                    vec![],
                    dispatcher.default_target().to_string(),
                ),
                Target::Agent(a) => (
                    vec![(Some(a.clone()), req.text, None)],
                    vec![],
                    format!("agent {a}"),
                ),
                // A work queue: one task, for whichever of them takes it first.
                Target::Selected(selector, agents) if queue => {
                    let n = agents.len();
                    let what = format!("any one of {n} agent{} matching {selector}", plural(n));
                    (vec![(None, req.text, Some(agents.clone()))], agents, what)
                }
                Target::Selected(selector, agents) | Target::Waiting(selector, agents) => {
                    let tasks = agents
                        .iter()
                        .map(|a| (Some(a.clone()), req.text.clone(), None))
                        .collect();
                    let n = agents.len();
                    let what = format!("{n} agent{} matching {selector}", plural(n));
                    (tasks, agents, what)
                }
            };
            let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
            let keyed = tasks.len() > 1;
            let tasks: Vec<NewTask> = tasks
                .into_iter()
                .map(|(agent, text, any_of)| NewTask {
                    key: key.as_ref().map(|k| match (&agent, keyed) {
                        (Some(a), true) => format!("{k}@{a}"),
                        _ => k.clone(),
                    }),
                    target: agent,
                    text,
                    any_of,
                })
                .collect();
            // The job is held before any of its tasks can be delivered, so
            // that no answer comes before the job that waits for it.
            let mut job = 0;
            let mut connected = Some(connected);
            let published = dispatcher
                .publish_new_then(tasks, |added| {
                    if added.is_empty() {
                        return;
                    }
                    let targets: Vec<String> =
                        added.iter().filter_map(|t| t.target.clone()).collect();
                    let expected = if targets.is_empty() {
                        connected.take().unwrap_or_default()
                    } else {
                        targets
                    };
                    job = jobs.create(text.clone(), target.clone(), job_tasks(added), expected);
                    if timeout > 0 {
                        let deadline = Instant::now() + Duration::from_secs(timeout.into());
                        jobs.set_deadline(job, deadline);
                    }
                    // With replicas, an agent may have answered before the job was known.
                    jobs.observe_early();
                })
                .map_err(|e| {
                    RpcStatus::with_message(
                        RpcStatusCode::UNAVAILABLE,
                        format!("{e}; nothing was published"),
                    )
                })?;
            let ids: Vec<u64> = published.iter().map(Published::id).collect();
            if published.iter().all(|p| matches!(p, Published::Duplicate { .. })) {
                let job = jobs.job_of(ids[0]).unwrap_or(0);
                log::info!(
                    "push by {who} to {target} repeats the key of {} (job {job}): nothing published",
                    tasks_named(&ids)
                );
                return Ok(PushReply {
                    task_id: ids[0],
                    target,
                    task_ids: ids,
                    agents: agents.into(),
                    job_id: job,
                    duplicate: true,
                    ..Default::default()
                });
            }
            log::info!(
                "job {job}: {} pushed by {who} to {target}",
                tasks_named(&ids)
            );
            Ok(PushReply {
                task_id: ids[0],
                target,
                task_ids: ids,
                agents: agents.into(),
                job_id: job,
                ..Default::default()
            })
        });
    }

    fn list_clients(
        &mut self,
        ctx: RpcContext,
        _req: ListClientsRequest,
        sink: UnarySink<ListClientsReply>,
    ) {
        if let Err(status) = self.operator(&ctx) {
            return refuse(&ctx, sink, status);
        }
        let reply = ListClientsReply {
            clients: self.dispatcher.clients().iter().map(row).collect(),
            ..Default::default()
        };
        ctx.spawn(async move {
            let _ = sink.success(reply).await;
        });
    }

    fn drain(&mut self, ctx: RpcContext, req: DrainRequest, sink: UnarySink<DrainReply>) {
        let who = match self.operator(&ctx) {
            Ok(w) => w,
            Err(status) => return refuse(&ctx, sink, status),
        };
        let Some(held) = self.dispatcher.drain(&req.agent, !req.undo) else {
            return refuse(&ctx, sink, unknown_agent(&req.agent));
        };
        if req.undo {
            log::info!("agent {} let go by {who}: it takes tasks again", req.agent);
        } else {
            log::info!(
                "agent {} drained by {who}: nothing new for it; it holds {held} tasks",
                req.agent
            );
        }
        let reply = DrainReply {
            in_flight: held as u64,
            ..Default::default()
        };
        ctx.spawn(async move {
            let _ = sink.success(reply).await;
        });
    }

    fn disconnect(
        &mut self,
        ctx: RpcContext,
        req: DisconnectRequest,
        sink: UnarySink<DisconnectReply>,
    ) {
        let who = match self.operator(&ctx) {
            Ok(w) => w,
            Err(status) => return refuse(&ctx, sink, status),
        };
        if !self
            .dispatcher
            .evict(&req.agent, &format!("disconnected by {who}"))
        {
            let status = RpcStatus::with_message(
                RpcStatusCode::NOT_FOUND,
                format!("agent {:?} is not connected", req.agent),
            );
            return refuse(&ctx, sink, status);
        }
        ctx.spawn(async move {
            let _ = sink.success(DisconnectReply::default()).await;
        });
    }

    fn watch_results(
        &mut self,
        ctx: RpcContext,
        req: WatchResultsRequest,
        mut sink: ServerStreamingSink<ResultEvent>,
    ) {
        let unable = |m: String| RpcStatus::with_message(RpcStatusCode::FAILED_PRECONDITION, m);
        if let Some(replica) = &self.replica {
            // With replicas: every replica's results, from the store.
            if let Err(status) = self.operator(&ctx) {
                warn_refused(&ctx, &status);
                ctx.spawn(async move {
                    let _ = sink.fail(status).await;
                });
                return;
            }
            let (tx, rx) = futures::channel::mpsc::channel::<ResultEvent>(256);
            let from = WatchFrom {
                seq: req.from_seq,
                follow: req.follow,
            };
            replica.watch_results(from, tx);
            ctx.spawn(async move {
                let mut events = rx.map(|e| Ok((e, WriteFlags::default())));
                if sink.send_all(&mut events).await.is_ok() {
                    let _ = sink.close().await;
                }
            });
            return;
        }
        let checked = self.operator(&ctx).and_then(|_| {
            let path = self.results_file.clone().ok_or_else(|| {
                unable("results are read from the results file: start the server with --results-to FILE (and --state-dir, which numbers them)".into())
            })?;
            if !self.numbered {
                return Err(unable("results are numbered only with --state-dir: without it a reader cannot resume, so WatchResults is not served".into()));
            }
            if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                return Err(unable(format!(
                    "{} is not a regular file (a pipe or a device): it cannot be read back",
                    path.display()
                )));
            }
            Ok(path)
        });
        let path = match checked {
            Ok(p) => p,
            Err(status) => {
                warn_refused(&ctx, &status);
                ctx.spawn(async move {
                    let _ = sink.fail(status).await;
                });
                return;
            }
        };
        let from = WatchFrom {
            seq: req.from_seq,
            follow: req.follow,
        };
        let (mut tx, rx) = futures::channel::mpsc::channel::<ResultEvent>(256);
        let stop = self.shutdown.clone();
        let reader = std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || {
                let gone = tx.clone();
                let read = read_results(
                    &path,
                    from,
                    &stop,
                    || gone.is_closed(),
                    |e| futures::executor::block_on(tx.send(e)).is_ok(),
                );
                if let Err(e) = read {
                    log::warn!("WatchResults: {e}");
                }
            });
        if let Err(e) = reader {
            log::error!("WatchResults: cannot start a thread: {e}");
        }
        ctx.spawn(async move {
            let mut events = rx.map(|e| Ok((e, WriteFlags::default())));
            if sink.send_all(&mut events).await.is_ok() {
                let _ = sink.close().await;
            }
        });
    }

    fn cancel(&mut self, ctx: RpcContext, req: CancelRequest, sink: UnarySink<CancelReply>) {
        let who = match self.operator(&ctx) {
            Ok(w) => w,
            Err(status) => return refuse(&ctx, sink, status),
        };
        let tasks = req.task_ids.to_vec();
        if req.job_id != 0 && self.jobs.get(req.job_id).is_none() {
            return refuse(&ctx, sink, no_job(req.job_id));
        }
        if tasks.is_empty() && req.job_id == 0 {
            let status = RpcStatus::with_message(
                RpcStatusCode::INVALID_ARGUMENT,
                "name the tasks or the job to cancel".into(),
            );
            return refuse(&ctx, sink, status);
        }
        let dispatcher = self.dispatcher.clone();
        let jobs = self.jobs.clone();
        let job = req.job_id;
        // On the worker: with replicas, cancelling writes to the store.
        self.answer_from_worker(&ctx, sink, move || {
            let mut tasks = tasks;
            let mut held = 0;
            if job != 0 {
                let (job_tasks, job_held) = jobs.cancel(job).ok_or_else(|| no_job(job))?;
                tasks.extend(job_tasks);
                held = job_held;
            }
            let n = dispatcher.cancel(&tasks);
            log::info!(
                "cancel by {who}: {n} of {} tasks cancelled, {held} held agents",
                tasks.len()
            );
            Ok(CancelReply {
                cancelled: n as u32,
                held_cancelled: held as u32,
                ..Default::default()
            })
        });
    }

    fn get_job(&mut self, ctx: RpcContext, req: GetJobRequest, sink: UnarySink<JobMsg>) {
        if let Err(status) = self.operator(&ctx) {
            return refuse(&ctx, sink, status);
        }
        let Some(job) = self.jobs.get(req.job_id) else {
            return refuse(&ctx, sink, no_job(req.job_id));
        };
        let reply = self.job_message(&job, true);
        ctx.spawn(async move {
            let _ = sink.success(reply).await;
        });
    }

    fn list_jobs(
        &mut self,
        ctx: RpcContext,
        _req: ListJobsRequest,
        sink: UnarySink<ListJobsReply>,
    ) {
        if let Err(status) = self.operator(&ctx) {
            return refuse(&ctx, sink, status);
        }
        let jobs: Vec<JobMsg> = self
            .jobs
            .list()
            .iter()
            .map(|j| self.job_message(j, false))
            .collect();
        ctx.spawn(async move {
            let _ = sink
                .success(ListJobsReply {
                    jobs: jobs.into(),
                    ..Default::default()
                })
                .await;
        });
    }
}

impl AdminService {
    /// The newest `n` jobs with their totals (no agent rows), for the web view.
    pub fn recent_jobs(&self, n: usize) -> Vec<JobMsg> {
        self.jobs
            .newest(n)
            .iter()
            .map(|j| self.job_message(j, false))
            .collect()
    }

    /// Job `id` with each agent's status and output, if held.
    pub fn job_with_agents(&self, id: u64) -> Option<JobMsg> {
        self.jobs.get(id).map(|j| self.job_message(&j, true))
    }

    /// A job as the admin API shows it; each agent's status with `agents`.
    fn job_message(&self, j: &Job, agents: bool) -> JobMsg {
        let rows = self.statuses(j);
        let mut totals = JobTotals {
            agents: rows.iter().filter(|r| !r.agent.is_empty()).count() as u32,
            ..Default::default()
        };
        for r in &rows {
            match r.status.as_str() {
                "pending" => totals.pending += 1,
                "delivered" => totals.delivered += 1,
                "running" => totals.running += 1,
                "ok" => totals.ok += 1,
                "failed" => totals.failed += 1,
                "held" => totals.held += 1,
                "timed-out" => totals.timed_out += 1,
                "stale" => totals.stale += 1,
                "cancelled" => totals.cancelled += 1,
                _ => totals.dead += 1,
            }
        }
        JobMsg {
            job_id: j.id,
            text: j.text.clone(),
            target: j.target.clone(),
            created_at: crate::unixtime::seconds(j.created_at),
            agents: if agents { rows.into() } else { vec![].into() },
            totals: Some(totals).into(),
            stopped: j.rollout.as_ref().is_some_and(|r| r.stopped),
            cancelled: j.cancelled,
            timed_out: j.timed_out,
            waiting_for: j
                .waiting
                .as_ref()
                .map(|w| w.selector.to_string())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    /// One status per agent the job is for, ordered by agent.
    fn statuses(&self, j: &Job) -> Vec<AgentStatus> {
        // Who each task is for; where it stands is asked of the dispatcher
        // in one go (one lock for the whole job, whatever the fleet).
        let mut pairs: Vec<(TaskId, String)> = vec![];
        let mut rows = vec![];
        for t in &j.tasks {
            match (&t.agent, self.dispatcher.config().mode) {
                (Some(a), _) => pairs.push((t.id, a.clone())),
                (None, Mode::Broadcast) => {
                    let mut agents: Vec<&String> = j.expected.iter().collect();
                    agents.extend(j.answers.keys());
                    agents.sort();
                    agents.dedup();
                    pairs.extend(agents.into_iter().map(|a| (t.id, a.clone())));
                }
                (None, Mode::Queue) => {
                    let holder = match j.answers.keys().next() {
                        Some(a) => Some(a.clone()),
                        None => self.dispatcher.holder_of(t.id),
                    };
                    match holder {
                        Some(a) => pairs.push((t.id, a)),
                        None => rows.push(AgentStatus {
                            task_id: t.id,
                            status: if self.dispatcher.is_dead(t.id) {
                                "dead"
                            } else if self.dispatcher.is_cancelled(t.id) {
                                "cancelled"
                            } else {
                                "pending"
                            }
                            .into(),
                            ..Default::default()
                        }),
                    }
                }
            }
        }
        let unanswered: Vec<(TaskId, &str)> = pairs
            .iter()
            .filter(|(task, a)| j.answers.get(a).is_none_or(|x| x.task != *task))
            .map(|(task, a)| (*task, a.as_str()))
            .collect();
        let mut progress = self.dispatcher.progress_many(&unanswered).into_iter();
        for (task, agent) in &pairs {
            let answered = j.answers.get(agent).is_some_and(|x| x.task == *task);
            let p = if answered { None } else { progress.next() };
            rows.push(self.status(*task, agent, j, p));
        }
        if let Some(r) = &j.rollout {
            let waiting = r.held.iter().map(|a| (a, "held"));
            for (a, status) in waiting.chain(r.cancelled.iter().map(|a| (a, "cancelled"))) {
                rows.push(AgentStatus {
                    agent: a.clone(),
                    status: status.into(),
                    ..Default::default()
                });
            }
        }
        if j.timed_out {
            let open = ["pending", "delivered", "running", "cancelled"];
            for r in rows
                .iter_mut()
                .filter(|r| open.contains(&r.status.as_str()))
            {
                r.status = "timed-out".into();
            }
        }
        rows.sort_by(|a, b| a.agent.cmp(&b.agent));
        rows
    }

    /// One agent's row: its answer, else `progress` (where the task stands).
    fn status(
        &self,
        task: TaskId,
        agent: &str,
        j: &Job,
        progress: Option<TaskProgress>,
    ) -> AgentStatus {
        let mut row = AgentStatus {
            agent: agent.to_string(),
            task_id: task,
            ..Default::default()
        };
        match j.answers.get(agent).filter(|a| a.task == task) {
            Some(a) => {
                row.status = if a.ok { "ok" } else { "failed" }.into();
                row.output = a.output.clone();
                row.attempt = a.attempt;
                row.finished_at = a.at;
            }
            None => match progress.unwrap_or(TaskProgress::Waiting) {
                // It answered a delivery that was no longer current, and
                // holds no newer one.
                TaskProgress::Waiting if j.stale.get(agent).is_some_and(|a| a.task == task) => {
                    let a = &j.stale[agent];
                    row.status = "stale".into();
                    row.output = a.output.clone();
                    row.attempt = a.attempt;
                    row.finished_at = a.at;
                }
                TaskProgress::Waiting => row.status = "pending".into(),
                TaskProgress::Delivered { attempt, running } => {
                    row.status = if running { "running" } else { "delivered" }.into();
                    row.attempt = attempt;
                }
                TaskProgress::Dead => row.status = "dead".into(),
                TaskProgress::Cancelled => row.status = "cancelled".into(),
            },
        }
        row
    }
}

/// One client as the admin API shows it.
fn row(c: &ClientInfo) -> ClientRow {
    ClientRow {
        id: c.id.clone(),
        address: c.peer.clone(),
        connected_since: crate::unixtime::seconds(c.connected_since),
        last_seen: crate::unixtime::seconds(c.last_seen),
        in_flight: c.in_flight as u64,
        done: c.done,
        failed: c.failed,
        tasks_sent: c.tasks_sent,
        labels: c.labels.clone().into_iter().collect(),
        drained: c.drained,
        replica: c.replica.clone().unwrap_or_default(),
        ..Default::default()
    }
}
