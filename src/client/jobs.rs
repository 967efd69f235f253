//! The `--exec` worker pool: `--jobs N` threads that run the program of an
//! `Exec` handler, one task each at a time, in the order the tasks came. A
//! program is expensive (a process per task), so handing it to a thread of
//! its own is the only thread hop a task makes; its outcome comes back to the
//! session's pipeline over a channel that wakes it.
//!
//! Each running task is listed in `Progress::working` (the status sender
//! reports them all, so the server keeps their leases), and what it came to
//! is remembered for redeliveries before the pipeline hears of it.

use super::{task_key, Progress};
use crate::handler::{Handler, Outcome};
use crate::proto::{ServerMsg, Working};
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// What became of a task handed to the pool.
pub(super) struct Done {
    pub task: ServerMsg,
    /// `None`: it was never started (the session stopped taking work first).
    pub outcome: Option<Outcome>,
    /// The program refused the task because it cannot be run any more (it
    /// was removed, or lost its execute bit): the agent should step aside.
    pub cannot_work: Option<String>,
}

/// The pipeline's side of the pool: where tasks are queued. Dropping it
/// lets the workers end once the queue is empty.
pub(super) struct JobQueue {
    queue: crossbeam_channel::Sender<ServerMsg>,
    /// Set when the session stops taking work: queued tasks are skipped.
    cancelled: Arc<AtomicBool>,
}

impl JobQueue {
    /// Queues a task; never blocks.
    pub fn submit(&self, task: ServerMsg) {
        // The workers hold the receiver until this sender is gone.
        let _ = self.queue.send(task);
    }

    /// Tasks still queued are skipped (reported with no outcome).
    pub fn cancel_queued(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

/// The session's side of the pool: its threads, joined at the session's end.
pub(super) struct Workers(Vec<JoinHandle<()>>);

impl Workers {
    /// Waits for the workers, which end once the [`JobQueue`] is dropped
    /// and its queue is empty; one running a task finishes it first (its
    /// outcome is on the channel then). Call it on a thread of ours, never
    /// on a completion-queue thread.
    pub fn join(self) {
        for w in self.0 {
            let _ = w.join();
        }
    }
}

/// Starts `n` workers (at least one) running `handler`; outcomes go to the receiver.
pub(super) fn start(
    n: usize,
    handler: &Handler,
    progress: &Arc<Progress>,
) -> Result<(JobQueue, Workers, UnboundedReceiver<Done>), String> {
    let (queue, tasks) = crossbeam_channel::unbounded::<ServerMsg>();
    let (done_tx, done_rx) = futures::channel::mpsc::unbounded();
    let jobs = JobQueue {
        queue,
        cancelled: Arc::new(AtomicBool::new(false)),
    };
    let mut workers = Workers(vec![]);
    for i in 0..n.max(1) {
        let worker = Worker {
            tasks: tasks.clone(),
            done: done_tx.clone(),
            cancelled: jobs.cancelled.clone(),
            handler: handler.clone(),
            progress: progress.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("exec-{i}"))
            .spawn(move || worker.run());
        match spawned {
            Ok(h) => workers.0.push(h),
            Err(e) => {
                jobs.cancel_queued();
                drop(jobs);
                workers.join();
                return Err(format!("cannot start a worker thread: {e}"));
            }
        }
    }
    Ok((jobs, workers, done_rx))
}

struct Worker {
    tasks: crossbeam_channel::Receiver<ServerMsg>,
    done: UnboundedSender<Done>,
    cancelled: Arc<AtomicBool>,
    handler: Handler,
    progress: Arc<Progress>,
}

impl Worker {
    fn run(self) {
        for task in self.tasks.iter() {
            let done = if self.cancelled.load(Ordering::SeqCst) {
                Done {
                    task,
                    outcome: None,
                    cannot_work: None,
                }
            } else {
                self.handle(task)
            };
            if self.done.unbounded_send(done).is_err() {
                // The session is gone; its successor carries nothing of ours.
                return;
            }
        }
    }

    fn handle(&self, task: ServerMsg) -> Done {
        // Seed servers send no task ids: there is nothing to report then.
        let working = (task.task_id != 0).then(|| Working {
            task_id: task.task_id,
            attempt: task.attempt,
            incarnation: task.incarnation.clone(),
            ..Default::default()
        });
        if let Some(w) = &working {
            self.progress.start_working(w.clone());
        }
        let outcome = self.handler.handle(&task.task);
        // Remembered before the server can hear of it, so that a
        // redelivery is never run again.
        if task.task_id != 0 && !outcome.retry {
            self.progress.remember(task_key(&task), &outcome);
        }
        if let Some(w) = &working {
            self.progress.stop_working(w);
        }
        // A refusal because the program could not be started: the agent
        // should stop taking tasks rather than refuse them all.
        let cannot_work = if outcome.retry {
            self.handler.check_runnable().err().map(|e| e.to_string())
        } else {
            None
        };
        if cannot_work.is_some() {
            // No other queued task is started (and refused) meanwhile.
            self.cancelled.store(true, Ordering::SeqCst);
        }
        Done {
            task,
            outcome: Some(outcome),
            cannot_work,
        }
    }
}
