//! A session's pipeline: receive → handle → report as one future on the
//! client's completion-queue thread, so that a task crosses no thread on its
//! way from the `getTask` stream to the `tellResult` call (only an `--exec`
//! program runs elsewhere, on the [`jobs`](super::jobs) pool).
//!
//! Each time it is woken it takes every task already received, handles it
//! (`echo` in-line), and writes the results: with gRPC's buffer hint while
//! more are ready, so that they leave in batches (of [`FLUSH_EVERY`] at
//! most), and flushed as soon as nothing more is ready — never held back by
//! a timer. The newest result is held back until that is known, so that it
//! can carry the flush: known when the write before it is done and no task
//! came meanwhile (every completion queued before that write has been seen
//! then), or else after one pass of the completion queue (a connectivity
//! watch that completes at once, queued behind whatever is ready) with no
//! task coming.
//!
//! A call is completed every `ack_every` results or `ack_interval` after it
//! was opened, and its answer — which the server gives once the results are
//! on disk — acknowledges them. The next call is opened at once (after the
//! last one's half-close went out, so that results leave in order):
//! acknowledgements are awaited side by side while results keep flowing.
//! Every result stays here until its call is answered; when the session
//! fails, all of them are carried over to the next connection.

use super::jobs::{Done, JobQueue};
use super::{task_key, End, Failure, Progress};
use crate::handler::{Handler, Outcome};
use crate::logtext::quoted;
use crate::proto::{ContactClient, Empty, ResultMsg, ServerMsg};
use futures::channel::mpsc::UnboundedReceiver;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use grpcio::{CallOption, ClientCStreamReceiver, ClientCStreamSender, ClientSStreamReceiver};
use grpcio::{Channel, ConnectivityState, WriteFlags};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Results buffered at most before a write goes out even while more keep
/// coming: small enough that a server's credit (`--max-in-flight`) comes
/// back in several steps, large enough to make one write of many results.
pub(super) const FLUSH_EVERY: usize = 64;

/// Calls completed and not answered yet at most: past it no call is opened
/// (nor results written) until one is answered, which bounds the results
/// kept in memory by a server that records slowly.
const MAX_UNANSWERED_CALLS: usize = 64;

/// Longest pass of the completion queue (it ends at once unless the channel
/// is shut down).
const PASS_LIMIT: Duration = Duration::from_millis(10);

/// Tasks taken per wake-up at most, so that writes and acknowledgements are
/// not starved by a stream that is always ready.
const RECEIVE_BUDGET: usize = 1024;

/// How the session's thread reaches the pipeline: to stop it, and to wake it
/// when an acknowledgement interval is over.
#[derive(Default)]
pub(super) struct Control {
    waker: Mutex<Option<Waker>>,
    stop: AtomicBool,
}

impl Control {
    /// Asks the pipeline to take no more tasks, finish what it holds and end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    pub fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn register(&self, cx: &Context) {
        let mut w = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
    }
}

/// What the pipeline is given to work with.
pub(super) struct Setup {
    pub client: ContactClient,
    /// The client's channel (watched for a pass of the completion queue).
    pub channel: Channel,
    pub opt: Box<dyn Fn() -> CallOption + Send>,
    pub tasks: ClientSStreamReceiver<ServerMsg>,
    pub progress: Arc<Progress>,
    pub control: Arc<Control>,
    /// When to wake the pipeline (sent when a call opens: its ack interval ends then).
    pub deadlines: crossbeam_channel::Sender<Instant>,
    /// Handles tasks in-line when there is no pool.
    pub handler: Handler,
    /// The `--exec` pool and where its outcomes come back.
    pub jobs: Option<(JobQueue, UnboundedReceiver<Done>)>,
    pub ack_every: u64,
    pub ack_interval: Duration,
    /// Tasks this session may take on (`--max-tasks` less what is acknowledged or carried).
    pub limit: Option<u64>,
}

/// How the pipeline ended, and the pool's outcomes still to come (results
/// of tasks that were running when it failed: the session carries them over).
pub(super) type Ending = (Result<End, Failure>, Option<UnboundedReceiver<Done>>);

/// Runs the pipeline to its end.
pub(super) async fn run(setup: Setup) -> Ending {
    let mut p = Pipeline::new(setup);
    let result = futures::future::poll_fn(|cx| p.poll(cx)).await;
    // The pool's workers end once its queue is gone.
    let done = p.jobs.take().map(|(_, done)| done);
    (result, done)
}

struct OpenCall {
    sink: ClientCStreamSender<ResultMsg>,
    receiver: ClientCStreamReceiver<Empty>,
    /// What the call carried, kept until it is acknowledged.
    sent: Vec<ResultMsg>,
    opened: Instant,
    /// Results written with the buffer hint since the last flush.
    unflushed: usize,
    /// A write was started and its completion not seen yet.
    writing: bool,
}

impl OpenCall {
    /// Whether the last write is done (if not, its completion wakes us).
    fn write_done(&mut self, cx: &mut Context) -> grpcio::Result<bool> {
        if self.writing {
            match self.sink.poll_ready_unpin(cx) {
                Poll::Ready(r) => r.map(|()| self.writing = false)?,
                Poll::Pending => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// A call being completed: its half-close is issued (which flushes it) once
/// its last write is done, then its answer is awaited.
struct Closing {
    sink: ClientCStreamSender<ResultMsg>,
    receiver: ClientCStreamReceiver<Empty>,
    sent: Vec<ResultMsg>,
    close_issued: bool,
    half_closed: bool,
}

impl Closing {
    /// Issues the half-close as soon as the last write is done; whether it is.
    fn issue(&mut self, cx: &mut Context) -> grpcio::Result<bool> {
        if !self.close_issued {
            match self.sink.poll_ready_unpin(cx) {
                Poll::Pending => return Ok(false),
                Poll::Ready(r) => r?,
            }
            // No write in flight: this starts the half-close at once.
            if let Poll::Ready(r) = self.sink.poll_close_unpin(cx) {
                r?;
                self.half_closed = true;
            }
            self.close_issued = true;
        }
        Ok(true)
    }

    /// Ready once the server answered: it has recorded every result.
    fn poll_answer(&mut self, cx: &mut Context) -> Poll<grpcio::Result<()>> {
        if !self.issue(cx)? {
            return Poll::Pending;
        }
        if !self.half_closed {
            futures::ready!(self.sink.poll_close_unpin(cx))?;
            self.half_closed = true;
        }
        self.receiver.poll_unpin(cx).map_ok(|_: Empty| ())
    }
}

struct Pipeline {
    client: ContactClient,
    opt: Box<dyn Fn() -> CallOption + Send>,
    /// `None` once the stream ended. Once the pipeline is ending it is not
    /// read any more, and dropped (which cancels the call) with the pipeline,
    /// after the last results are recorded: the server sees them before it
    /// sees this client go.
    tasks: Option<ClientSStreamReceiver<ServerMsg>>,
    progress: Arc<Progress>,
    control: Arc<Control>,
    deadlines: crossbeam_channel::Sender<Instant>,
    handler: Handler,
    jobs: Option<(JobQueue, UnboundedReceiver<Done>)>,
    ack_every: u64,
    ack_interval: Duration,
    limit: Option<u64>,
    /// Tasks taken on in this session.
    taken: u64,
    /// Tasks on the pool whose outcome has not come back.
    outstanding: usize,
    /// Set once no more tasks are taken: the pipeline ends so once settled.
    ending: Option<End>,
    /// Results not written yet.
    outbox: VecDeque<ResultMsg>,
    /// Results produced so far, and their number when the last write was
    /// started: equal when that write is done means nothing came meanwhile.
    arrivals: u64,
    arrivals_at_write: u64,
    /// A pass of the completion queue under way, with `arrivals` when it began.
    pass: Option<(BoxFuture<'static, bool>, u64)>,
    channel: Channel,
    call: Option<OpenCall>,
    closing: Vec<Closing>,
}

impl Pipeline {
    fn new(s: Setup) -> Pipeline {
        let mut p = Pipeline {
            client: s.client,
            opt: s.opt,
            tasks: Some(s.tasks),
            progress: s.progress,
            control: s.control,
            deadlines: s.deadlines,
            handler: s.handler,
            jobs: s.jobs,
            ack_every: s.ack_every.max(1),
            ack_interval: s.ack_interval,
            limit: s.limit,
            taken: 0,
            outstanding: 0,
            ending: None,
            outbox: VecDeque::new(),
            arrivals: 0,
            arrivals_at_write: 0,
            pass: None,
            channel: s.channel,
            call: None,
            closing: vec![],
        };
        // Results from an earlier, broken connection go first.
        let carried = p.progress.take_carried();
        if !carried.is_empty() {
            log::info!(
                "sending {} results again that were not acknowledged",
                carried.len()
            );
            p.outbox.extend(carried);
        }
        if p.limit == Some(0) {
            p.end_with(End::Finished, false);
        }
        p
    }

    fn poll(&mut self, cx: &mut Context) -> Poll<Result<End, Failure>> {
        self.control.register(cx);
        match self.step(cx) {
            Ok(None) => Poll::Pending,
            Ok(Some(end)) => Poll::Ready(Ok(end)),
            Err(failure) => {
                self.abandon();
                Poll::Ready(Err(failure))
            }
        }
    }

    fn step(&mut self, cx: &mut Context) -> Result<Option<End>, Failure> {
        if self.control.stop.load(Ordering::SeqCst) {
            self.end_with(End::Finished, true);
        }
        self.receive(cx)?;
        self.collect_outcomes(cx);
        // Answers first (one may make room for another call), and again for
        // the calls just completed, whose answers must have our waker.
        self.collect_answers(cx)?;
        self.write(cx)?;
        self.close_when_due(cx)?;
        self.collect_answers(cx)?;
        let settled = self.outstanding == 0
            && self.outbox.is_empty()
            && self.call.is_none()
            && self.closing.is_empty();
        Ok(if settled { self.ending.take() } else { None })
    }

    fn lost(&self, what: &str, e: grpcio::Error) -> Failure {
        Failure::from_call(what, e)
    }

    /// Takes no more tasks (what the server still sends goes to other
    /// agents once this one is gone). With `cancel_queued`, tasks waiting for
    /// the pool are not started either.
    fn end_with(&mut self, end: End, cancel_queued: bool) {
        if self.ending.is_some() {
            return;
        }
        self.ending = Some(end);
        if cancel_queued {
            if let Some((jobs, _)) = &self.jobs {
                jobs.cancel_queued();
            }
        }
    }

    /// Takes every task already received.
    fn receive(&mut self, cx: &mut Context) -> Result<(), Failure> {
        for _ in 0..RECEIVE_BUDGET {
            let Some(stream) = self.tasks.as_mut().filter(|_| self.ending.is_none()) else {
                return Ok(());
            };
            match stream.poll_next_unpin(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(None) => {
                    self.tasks = None;
                    self.end_with(End::StreamClosed, false);
                }
                Poll::Ready(Some(Err(e))) => return Err(self.lost("the task stream", e)),
                Poll::Ready(Some(Ok(task))) => self.take(task),
            }
        }
        // More is ready: come back after the rest of this round.
        cx.waker().wake_by_ref();
        Ok(())
    }

    fn take(&mut self, task: ServerMsg) {
        self.taken += 1;
        if self.limit.is_some_and(|l| self.taken >= l) {
            self.end_with(End::Finished, false);
        }
        if log::log_enabled!(log::Level::Debug) {
            if task.attempt > 1 {
                log::debug!(
                    "task {} (attempt {}): {}",
                    task.task_id,
                    task.attempt,
                    quoted(&task.task)
                );
            } else {
                log::debug!("task {}: {}", task.task_id, quoted(&task.task));
            }
        }
        self.progress.learn_ack_timeout(task.ack_timeout_ms);
        match &self.jobs {
            None => {
                // `echo` answers from the task text alone, so a redelivery
                // gets the same answer without being remembered.
                let outcome = self.handler.handle(&task.task);
                self.push_result(&task, outcome);
            }
            Some((jobs, _)) => {
                let known = (task.attempt > 1 && task.task_id != 0)
                    .then(|| self.progress.known(&task_key(&task)))
                    .flatten();
                match known {
                    Some(outcome) => {
                        log::debug!(
                            "task {} was handled before this redelivery; reporting the same result",
                            task.task_id
                        );
                        self.push_result(&task, outcome);
                    }
                    None => {
                        jobs.submit(task);
                        self.outstanding += 1;
                    }
                }
            }
        }
    }

    fn push_result(&mut self, task: &ServerMsg, outcome: Outcome) {
        self.outbox.push_back(answer(task, outcome, &self.progress));
        self.arrivals += 1;
    }

    /// Takes the pool's outcomes that came back.
    fn collect_outcomes(&mut self, cx: &mut Context) {
        while let Some((_, done)) = self.jobs.as_mut() {
            let Poll::Ready(Some(d)) = done.poll_next_unpin(cx) else {
                return;
            };
            self.outstanding -= 1;
            if let Some(outcome) = d.outcome {
                self.push_result(&d.task, outcome);
            }
            if let Some(why) = d.cannot_work {
                self.end_with(End::CannotWork(why), true);
            }
        }
    }

    /// Writes what is in the outbox, as far as the call takes it now.
    fn write(&mut self, cx: &mut Context) -> Result<(), Failure> {
        while !self.outbox.is_empty() {
            if self.call.is_none() {
                if self.closing.len() >= MAX_UNANSWERED_CALLS || !self.previous_call_closed(cx)? {
                    return Ok(());
                }
                self.open_call()?;
            }
            let c = self.call.as_mut().expect("opened above");
            match c.write_done(cx) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(self.lost("reporting results", e)),
            }
            // Buffered while another one is ready, up to FLUSH_EVERY; the
            // last one goes out (flushing the rest) once nothing more is.
            let full = c.unflushed + 1 >= FLUSH_EVERY;
            let hint = if self.outbox.len() >= 2 {
                !full
            } else if full || self.quiet(cx) {
                false
            } else {
                return Ok(());
            };
            let c = self.call.as_mut().expect("opened above");
            let r = self.outbox.pop_front().expect("not empty");
            let sent = c
                .sink
                .start_send_unpin((r.clone(), WriteFlags::default().buffer_hint(hint)));
            c.sent.push(r);
            if let Err(e) = sent {
                return Err(self.lost("reporting results", e));
            }
            c.writing = true;
            c.unflushed = if hint { c.unflushed + 1 } else { 0 };
            self.arrivals_at_write = self.arrivals;
            if c.sent.len() as u64 >= self.ack_every {
                self.close_call(cx)?;
            }
        }
        Ok(())
    }

    /// Whether nothing more is ready, with the last write done: true when
    /// no result came since that write was started; otherwise a pass of the
    /// completion queue begun after the last result tells (false until then,
    /// and we are woken when it is over).
    fn quiet(&mut self, cx: &mut Context) -> bool {
        if self.arrivals == self.arrivals_at_write {
            return true;
        }
        loop {
            match &mut self.pass {
                Some((pass, began)) => match pass.poll_unpin(cx) {
                    Poll::Pending => return false,
                    Poll::Ready(_) => {
                        let quiet = *began == self.arrivals;
                        self.pass = None;
                        if quiet {
                            return true;
                        }
                    }
                },
                None => {
                    // The channel is not shut down, so this completes at once
                    // (or at the deadline, if it is).
                    let watch = self.channel.wait_for_state_change(
                        ConnectivityState::GRPC_CHANNEL_SHUTDOWN,
                        PASS_LIMIT,
                    );
                    self.pass = Some((watch.boxed(), self.arrivals));
                }
            }
        }
    }

    fn open_call(&mut self) -> Result<(), Failure> {
        let (sink, receiver) = self
            .client
            .tell_result_opt((self.opt)())
            .map_err(|e| self.lost("reporting results", e))?;
        let opened = Instant::now();
        self.call = Some(OpenCall {
            sink,
            receiver,
            sent: vec![],
            opened,
            unflushed: 0,
            writing: false,
        });
        // The session's thread wakes us when the ack interval is over.
        let _ = self.deadlines.send(opened + self.ack_interval);
        Ok(())
    }

    /// Completes the open call on its ack interval, or when the pipeline
    /// ends and nothing more will be written on it.
    fn close_when_due(&mut self, cx: &mut Context) -> Result<(), Failure> {
        let Some(c) = &self.call else { return Ok(()) };
        let ending = self.ending.is_some() && self.outstanding == 0 && self.outbox.is_empty();
        if ending || c.opened.elapsed() >= self.ack_interval {
            self.close_call(cx)?;
        }
        Ok(())
    }

    /// Completes the open call (which flushes it); its answer is awaited
    /// beside the next one.
    fn close_call(&mut self, cx: &mut Context) -> Result<(), Failure> {
        let Some(c) = self.call.take() else {
            return Ok(());
        };
        let mut closing = Closing {
            sink: c.sink,
            receiver: c.receiver,
            sent: c.sent,
            close_issued: false,
            half_closed: false,
        };
        let issued = closing.issue(cx);
        self.closing.push(closing);
        issued.map_err(|e| self.lost("reporting results", e))?;
        Ok(())
    }

    /// Whether the last call completed has its half-close issued: until
    /// then no other call is written to, so that results go out in order.
    fn previous_call_closed(&mut self, cx: &mut Context) -> Result<bool, Failure> {
        match self.closing.last_mut().map(|c| c.issue(cx)) {
            None | Some(Ok(true)) => Ok(true),
            Some(Ok(false)) => Ok(false),
            Some(Err(e)) => Err(self.lost("reporting results", e)),
        }
    }

    /// Counts the results of every call answered.
    fn collect_answers(&mut self, cx: &mut Context) -> Result<(), Failure> {
        let mut i = 0;
        while i < self.closing.len() {
            match self.closing[i].poll_answer(cx) {
                Poll::Pending => i += 1,
                Poll::Ready(Ok(())) => {
                    let c = self.closing.swap_remove(i);
                    self.progress
                        .acknowledged
                        .fetch_add(c.sent.len() as u64, Ordering::SeqCst);
                    // A target of its own: calls can be followed without every task.
                    log::debug!(
                        target: "contact::client::calls",
                        "a call answered: the server has {} more results",
                        c.sent.len()
                    );
                }
                Poll::Ready(Err(e)) => return Err(self.lost("reporting results", e)),
            }
        }
        Ok(())
    }

    /// After a failure: keeps every result not acknowledged for the next
    /// connection, and starts no more queued tasks.
    fn abandon(&mut self) {
        self.end_with(End::StreamClosed, true);
        let mut unacked: Vec<ResultMsg> = vec![];
        for c in self.closing.drain(..) {
            unacked.extend(c.sent);
        }
        if let Some(c) = self.call.take() {
            unacked.extend(c.sent);
        }
        unacked.extend(self.outbox.drain(..));
        self.progress.carry(unacked);
    }
}

/// The result reporting `outcome` for `task`, counted and logged.
pub(super) fn answer(task: &ServerMsg, outcome: Outcome, progress: &Progress) -> ResultMsg {
    log::debug!(
        "task {} {}: {}",
        task.task_id,
        if outcome.ok { "done" } else { "failed" },
        quoted(&outcome.output)
    );
    progress.handled.fetch_add(1, Ordering::Relaxed);
    ResultMsg {
        ret: outcome.output,
        task_id: task.task_id,
        ok: outcome.ok,
        retry: outcome.retry,
        attempt: task.attempt,
        incarnation: task.incarnation.clone(),
        ..Default::default()
    }
}
