//! The dispatcher as one replica of several (`--store nats://`, see
//! `replica`): the task log is shared, so tasks are appended to it rather
//! than to the local log, and every replica ingests them in the shared
//! order, with the ids the shared log gave them. In queue mode an
//! untargeted task enters this replica's `WorkQueue` only once the replica
//! has claimed it (the shared work queue hands each task to one replica);
//! targeted tasks wait in every replica, for wherever their agent is.
//! Outcomes recorded by other replicas settle tasks here too, and a
//! broadcast agent that comes from another replica is adopted with the
//! progress that replica saved.

use super::{ClientState, Dispatcher, Duplicates, Mode, NotJournaled, NAMED};
use crate::feed::Delivery;
use crate::labels::Selector;
use crate::registry::{ClientId, ClientInfo};
use crate::task::{NewTask, Settled, Task, TaskId, TaskLog};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Where tasks are appended when the task log is shared by replicas.
pub trait SharedLog: Send + Sync {
    /// Appends the tasks in order, returning for each its id in the shared
    /// log and whether it repeats the idempotency key of a task appended
    /// before (the id is then that task's). Fails, appending nothing
    /// acknowledged, when the shared log cannot be written.
    fn append(&self, tasks: &[NewTask]) -> Result<Vec<(TaskId, bool)>, NotJournaled>;

    /// Cancels the tasks in every replica (an outcome of its own in queue
    /// mode: only a task not answered yet is cancelled); returns those
    /// cancelled now.
    fn cancel(&self, tasks: &[TaskId]) -> Vec<TaskId>;
}

/// The agents other replicas serve, as the shared store says.
pub trait FleetView: Send + Sync {
    /// This replica's name.
    fn name(&self) -> String;
    /// Agents connected to other replicas (with `replica` set).
    fn elsewhere(&self) -> Vec<ClientInfo>;
}

/// What became of a claimed task (see [`Dispatcher::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// It waits here for a local agent.
    Taken,
    /// It is finished (answered, dead, cancelled, or past the retained
    /// history): the claim can be acknowledged.
    Finished,
    /// Not ingested yet: claim it again once it is.
    NotYet,
}

/// A broadcast agent's place in the task log, as one replica saw it last:
/// the next task it was not offered, and what it holds unanswered below.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentProgress {
    pub cursor: TaskId,
    /// Delivered and not answered: (task, attempt).
    pub pending: Vec<(TaskId, u32)>,
}

impl Dispatcher {
    /// Makes this dispatcher a replica whose tasks are appended to `log`;
    /// set once, before anything is published.
    pub fn share_log(&self, log: Arc<dyn SharedLog>) {
        if self.shared.set(log).is_err() {
            log::warn!("the shared task log was set twice; the first one stays");
        }
    }

    /// Makes this dispatcher see the agents other replicas serve, in
    /// [`Dispatcher::clients`] and [`Dispatcher::matching`].
    pub fn see_fleet(&self, fleet: Arc<dyn FleetView>) {
        let _ = self.fleet.set(fleet);
    }

    /// Adds the agents other replicas serve to `local` (this replica's).
    pub(super) fn with_fleet(&self, mut local: Vec<ClientInfo>) -> Vec<ClientInfo> {
        let Some(fleet) = self.fleet.get() else {
            return local;
        };
        let name = fleet.name();
        for c in &mut local {
            c.replica = Some(name.clone());
        }
        let here: std::collections::HashSet<String> = local.iter().map(|c| c.id.clone()).collect();
        local.extend(
            fleet
                .elsewhere()
                .into_iter()
                .filter(|c| !here.contains(&c.id)),
        );
        local
    }

    /// The agents other replicas serve that `selector` matches.
    pub(super) fn matching_elsewhere(&self, selector: &Selector) -> Vec<String> {
        let Some(fleet) = self.fleet.get() else {
            return vec![];
        };
        fleet
            .elsewhere()
            .into_iter()
            .filter(|c| selector.matches(&c.labels))
            .map(|c| c.id)
            .collect()
    }

    /// Whether tasks go to a shared log (`--store`).
    pub fn is_shared(&self) -> bool {
        self.shared.get().is_some()
    }

    /// `publish_tasks` for a shared log: appended there, then offered here
    /// once ingested (see [`Dispatcher::ingest`]), like every replica does.
    pub(super) fn append_shared(
        &self,
        shared: &dyn SharedLog,
        tasks: Vec<NewTask>,
        on_added: &mut dyn FnMut(&[Arc<Task>]),
    ) -> Result<(Vec<Arc<Task>>, Duplicates), NotJournaled> {
        // A key this replica knows is not sent at all; the others are
        // judged by the shared log's duplicate window.
        let known: Vec<Option<TaskId>> = {
            let st = self.lock();
            tasks
                .iter()
                .map(|t| t.key.as_deref().and_then(|k| st.log.keyed(k)))
                .collect()
        };
        let fresh: Vec<NewTask> = tasks
            .iter()
            .zip(&known)
            .filter(|(_, k)| k.is_none())
            .map(|(t, _)| t.clone())
            .collect();
        let ids = if fresh.is_empty() {
            vec![]
        } else {
            shared.append(&fresh)?
        };
        let mut ids = ids.into_iter();
        let mut added = vec![];
        let mut duplicates: Duplicates = Vec::with_capacity(tasks.len());
        let mut newest = 0;
        for (t, known) in tasks.into_iter().zip(known) {
            if let Some(of) = known {
                duplicates.push(Some(of));
                continue;
            }
            let (id, duplicate) = ids.next().expect("one id per task appended");
            if duplicate {
                duplicates.push(Some(id));
                continue;
            }
            duplicates.push(None);
            newest = newest.max(id);
            added.push(Arc::new(Task {
                id,
                text: t.text,
                target: t.target,
                key: t.key.map(Arc::from),
                any_of: t.any_of.map(Arc::from),
                produced_at: SystemTime::now(),
            }));
        }
        on_added(&added);
        // What was published is in this replica's log when the call returns.
        if newest > 0 {
            self.wait_ingested(newest);
        }
        Ok((added, duplicates))
    }

    /// Waits (up to a few seconds) until the task `id` has been ingested.
    fn wait_ingested(&self, id: TaskId) {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut next = self.ingested.0.lock().unwrap_or_else(|e| e.into_inner());
        while *next <= id {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("task {id} was appended but is not ingested yet");
                return;
            }
            next = self
                .ingested
                .1
                .wait_timeout(next, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Adds tasks of the shared log, in its order, and offers them. A task
    /// already here is skipped; the first task ingested sets where the
    /// log starts (the shared log may have dropped older ones).
    pub fn ingest(&self, tasks: Vec<(TaskId, NewTask)>) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut added = Vec::with_capacity(tasks.len());
        for (id, t) in tasks {
            if st.log.is_empty() && st.log.next_id() < id && st.log.next_id() <= 1 {
                st.log = TaskLog::starting_at(id, self.config.retain);
            }
            if id < st.log.next_id() {
                continue;
            }
            if id > st.log.next_id() {
                log::warn!(
                    "tasks {}..{} of the shared log were dropped before this replica read them",
                    st.log.next_id(),
                    id - 1
                );
                st.log = TaskLog::starting_at(id, self.config.retain);
            }
            let any_of = t.any_of.map(Arc::<[String]>::from);
            let task = st
                .log
                .push_any_of(t.text, t.target, t.key.map(Arc::from), any_of);
            if let Some(how) = st.settled_early.remove(&task.id) {
                if matches!(how, Settled::Cancelled) {
                    st.cancelled.insert(task.id);
                }
                st.log.settle(task.id, how);
                continue;
            }
            // Untargeted queue tasks wait for this replica's claim.
            let claimed_elsewhere = task.target.is_none() && task.any_of.is_none();
            if self.config.mode == Mode::Queue && !claimed_elsewhere {
                st.queue.push(task.clone());
            }
            added.push(task);
        }
        st.counters.produced += added.len() as u64;
        self.offer_new(st, &added);
        let next = st.log.next_id();
        drop(guard);
        *self.ingested.0.lock().unwrap_or_else(|e| e.into_inner()) = next;
        self.ingested.1.notify_all();
    }

    /// The id the next task ingested will have.
    pub fn next_task_id(&self) -> TaskId {
        self.lock().log.next_id()
    }

    /// Queue mode: this replica claimed the untargeted task `id` (`task`
    /// as the shared log holds it), delivered `before` times already (by
    /// any replica): it waits here for a local agent, counting its attempts
    /// on from there. A task older than this replica's retained history
    /// still is (its claim says it is unanswered).
    pub fn claim(&self, id: TaskId, before: u32, task: NewTask) -> Claimed {
        let mut guard = self.lock();
        let st = &mut *guard;
        if id >= st.log.next_id() {
            return Claimed::NotYet;
        }
        let task = match st.log.get(id) {
            Some(t) => t.clone(),
            None if st.cancelled.contains(&id) => return Claimed::Finished,
            None => Arc::new(Task {
                id,
                text: task.text,
                target: None,
                key: task.key.map(Arc::from),
                any_of: None,
                produced_at: SystemTime::now(),
            }),
        };
        let settled = st
            .log
            .settled(id)
            .is_some_and(|s| !matches!(s, Settled::Open));
        if st.cancelled.contains(&id) || settled {
            return Claimed::Finished;
        }
        if st.queue.get(id).is_none() {
            st.queue.restore(task, before, None);
            self.pump_queue_ready(st);
        }
        Claimed::Taken
    }

    /// Queue mode: deliveries this replica's agents could take now, less the
    /// tasks already waiting here for one: how many tasks to claim.
    pub fn claim_room(&self) -> usize {
        let st = self.lock();
        let k = self.config.max_in_flight;
        let free: usize = st
            .ready
            .iter()
            .map(|(held, _)| k.saturating_sub(*held))
            .sum();
        free.saturating_sub(st.queue.waiting_untargeted())
    }

    /// Queue mode: when no agent is connected here any more, gives back the
    /// untargeted tasks waiting here, for another replica to claim. (Not
    /// when its agents are merely busy: each claim given back counts as a
    /// delivery towards `--max-attempts`.)
    pub fn release_claims(&self) -> Vec<TaskId> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if !st.registry.is_empty() || st.queue.waiting_untargeted() == 0 {
            return vec![];
        }
        st.queue.take_waiting_untargeted()
    }

    /// Of the claimed tasks `ids`, those cancelled and no longer waiting or
    /// held here: their claims are done.
    pub fn cancelled_claims(&self, ids: &[TaskId]) -> Vec<TaskId> {
        let st = self.lock();
        ids.iter()
            .copied()
            .filter(|id| st.cancelled.contains(id) && st.queue.get(*id).is_none())
            .collect()
    }

    /// `cancel` with a shared log: written there, then applied here as
    /// every replica applies it (see [`Dispatcher::settle_shared`]).
    pub(super) fn cancel_shared(&self, shared: &dyn SharedLog, tasks: &[TaskId]) -> usize {
        let open: Vec<TaskId> = {
            let st = self.lock();
            tasks
                .iter()
                .copied()
                .filter(|id| {
                    st.log.get(*id).is_some()
                        && !st.cancelled.contains(id)
                        && matches!(st.log.settled(*id), Some(Settled::Open))
                })
                .collect()
        };
        if open.is_empty() {
            return 0;
        }
        let cancelled = shared.cancel(&open);
        for id in &cancelled {
            self.settle_shared(*id, Settled::Cancelled);
        }
        if !cancelled.is_empty() {
            log::info!(
                "{} tasks cancelled: they are delivered no further",
                cancelled.len()
            );
        }
        cancelled.len()
    }

    /// An outcome another replica recorded (or this one, read back): the
    /// task is finished here too. Returns whether this replica held it and
    /// it is finished (a delivery of it here is taken back: its answer would
    /// be stale), so that its claim is done; a cancelled task an agent holds
    /// stays, to be answered.
    pub fn settle_shared(&self, id: TaskId, how: Settled) -> bool {
        let mut guard = self.lock();
        let st = &mut *guard;
        if id >= st.log.next_id() {
            st.settled_early.insert(id, how);
            return false;
        }
        if matches!(how, Settled::Cancelled) {
            st.cancelled.insert(id);
            // A delivery in an agent's hands may still be answered.
            if st.queue.get(id).is_some_and(|q| q.holder.is_some()) {
                return false;
            }
        }
        let held = st.queue.finish(id);
        if matches!(st.log.settled(id), Some(Settled::Open)) {
            st.log.settle(id, how);
        }
        let Some(q) = held else { return false };
        if let Some(h) = q.holder {
            if let Some(c) = st.clients.get_mut(&*h) {
                if let Some(p) = c.in_flight.iter().position(|f| f.delivery.task.id == id) {
                    c.in_flight.remove(p);
                }
            }
            self.refile(st, &h);
            self.pump_after(st, Some(&h));
        }
        true
    }

    /// Broadcast: where `client` is in the task log, if this replica knows it.
    pub fn progress(&self, client: &str) -> Option<AgentProgress> {
        let st = self.lock();
        let c = st.clients.get(client)?;
        let mut pending: Vec<(TaskId, u32)> = c
            .in_flight
            .iter()
            .map(|f| &f.delivery)
            .chain(c.redeliver.iter())
            .chain(c.delayed.values())
            .map(|d| (d.task.id, d.attempt))
            .collect();
        pending.sort_unstable();
        Some(AgentProgress {
            cursor: c.cursor,
            pending,
        })
    }

    /// Broadcast: takes over `client`'s place in the task log from another
    /// replica (unless it is connected here): it continues after `cursor`,
    /// getting its unanswered deliveries again first.
    pub fn adopt(&self, client: &str, progress: &AgentProgress) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if let Some(c) = st.clients.get(client) {
            if c.session.is_some() {
                return;
            }
            self.forget(st, client, "its progress comes from another replica");
        }
        let redeliver: VecDeque<Delivery> = progress
            .pending
            .iter()
            .filter_map(|(id, attempt)| {
                st.log.get(*id).map(|t| Delivery {
                    task: t.clone(),
                    attempt: attempt + 1,
                })
            })
            .collect();
        let cursor = progress.cursor.max(st.log.first_id());
        let name = ClientId::from(client);
        let mut state = ClientState::new(name.clone(), cursor, redeliver, false);
        let now = Instant::now();
        state.since = 0;
        state.last_seen = now;
        state.gone_key = Some(now);
        st.gone[NAMED].insert((now, name.clone()));
        st.clients.insert(name, state);
    }
}
