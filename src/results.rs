//! `ResultSink`: the one thread that records results — to the log and, when
//! asked, as JSON Lines to a file — so that file I/O never runs on a gRPC
//! thread. A `tellResult` call is only answered once the sink has written
//! (and flushed) every result the call carried: see [`ResultSink::flushed`].

use crate::error::Error;
use crate::task::TaskId;
use crossbeam_channel::{Receiver, Sender};
use futures::channel::oneshot;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// One result as the server recorded it: one JSON object per line in `--results-to`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultRecord {
    /// The task answered; `null` when a seed client's result matched no task.
    pub task_id: Option<TaskId>,
    /// The task's text, when the task is known.
    pub task: Option<String>,
    pub client: String,
    pub ok: bool,
    pub output: String,
    /// From writing the task to the client to receiving its result.
    pub latency_ms: Option<f64>,
    /// Delivery attempt answered (1 unless the task was redelivered).
    pub attempt: u32,
    /// True when the result answered no current delivery (unknown, or the task
    /// was given to another client or attempt): recorded, but it does not count.
    pub stale: bool,
    /// True when the client refused the task and asked for it to be retried.
    pub retry: bool,
    /// True for the result that counts as the task's answer (not stale, not a
    /// refusal): each task has at most one accepted result per client in
    /// broadcast, and in queue mode exactly one or a dead letter.
    pub accepted: bool,
    /// Unix time the result was received, in seconds.
    pub received_at: f64,
}

/// A task given up on: one JSON object per line in `--dead-letter`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub task_id: TaskId,
    pub task: String,
    /// The client a targeted task was meant for.
    pub target: Option<String>,
    /// The client that held the last attempt.
    pub client: String,
    pub attempts: u32,
    pub reason: String,
    /// Unix time, in seconds.
    pub at: f64,
}

enum Entry {
    Record(ResultRecord),
    Dead(DeadLetter),
    Flush(oneshot::Sender<()>),
    Close,
}

/// Handle to the recording thread; cheap to clone.
#[derive(Clone)]
pub struct ResultSink {
    tx: Sender<Entry>,
}

/// Owns the recording thread; `finish` drains and flushes everything.
pub struct ResultWriter {
    tx: Sender<Entry>,
    handle: JoinHandle<Result<u64, Error>>,
}

/// Opens a JSON Lines file for appending, naming it in the error.
fn open_lines(path: Option<&Path>, what: &'static str) -> Result<Option<LinesFile>, Error> {
    let Some(p) = path else { return Ok(None) };
    let f = OpenOptions::new().create(true).append(true).open(p).map_err(|e| Error::file(p, what, e))?;
    Ok(Some(LinesFile { path: p.to_path_buf(), out: BufWriter::new(f) }))
}

/// An append-only JSON Lines file, fsync'd at every flush.
struct LinesFile {
    path: PathBuf,
    out: BufWriter<File>,
}

impl LinesFile {
    fn append(&mut self, value: &impl Serialize) -> Result<(), Error> {
        let err = |e: std::io::Error| Error::file(&self.path, "write", e);
        serde_json::to_writer(&mut self.out, value).map_err(|e| err(e.into()))?;
        self.out.write_all(b"\n").map_err(err)
    }

    /// Flushes and fsyncs: a line acknowledged to a client survives a crash.
    fn sync(&mut self) -> Result<(), Error> {
        let err = |e: std::io::Error| Error::file(&self.path, "write", e);
        self.out.flush().map_err(err)?;
        self.out.get_ref().sync_data().map_err(err)
    }
}

impl ResultSink {
    /// Starts the recording thread, appending results to `results` and dead
    /// letters to `dead_letters` when given.
    pub fn start(results: Option<&Path>, dead_letters: Option<&Path>) -> Result<(ResultSink, ResultWriter), Error> {
        let results = open_lines(results, "open the results file")?;
        let dead = open_lines(dead_letters, "open the dead-letter file")?;
        // Unbounded: results arrive at most as fast as tasks were handed out,
        // and that is bounded by the per-client in-flight limit.
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("result-sink".into())
            .spawn(move || record_loop(rx, results, dead))
            .map_err(Error::Thread)?;
        Ok((ResultSink { tx: tx.clone() }, ResultWriter { tx, handle }))
    }

    /// Queues a result for recording.
    pub fn record(&self, r: ResultRecord) {
        // Fails only after `finish`, when nothing can be recorded any more.
        if self.tx.send(Entry::Record(r)).is_err() {
            log::error!("result recorded after shutdown was dropped");
        }
    }

    /// Queues a dead letter for recording.
    pub fn bury(&self, d: DeadLetter) {
        if self.tx.send(Entry::Dead(d)).is_err() {
            log::error!("dead letter recorded after shutdown was dropped");
        }
    }

    /// Resolves once everything queued before this call is written and fsync'd.
    pub fn flushed(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Entry::Flush(tx));
        rx
    }
}

impl ResultWriter {
    /// Records everything queued so far, flushes and stops the thread; returns
    /// how many results were recorded. Sink handles still alive (a gRPC call
    /// that outlived shutdown) can no longer record: they log an error instead.
    pub fn finish(self) -> Result<u64, Error> {
        let _ = self.tx.send(Entry::Close);
        self.handle.join().unwrap_or_else(|_| Err(Error::Usage("result writer panicked".into())))
    }
}

fn record_loop(rx: Receiver<Entry>, mut results: Option<LinesFile>, mut dead: Option<LinesFile>) -> Result<u64, Error> {
    let mut count = 0u64;
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut closed = false;
    while !closed {
        let Ok(first) = rx.recv() else { break };
        // Take whatever else is queued, so that a burst costs one fsync (group commit).
        for entry in std::iter::once(first).chain(rx.try_iter()) {
            match entry {
                Entry::Close => {
                    closed = true;
                    break;
                }
                Entry::Record(r) => {
                    count += 1;
                    log_result(&r);
                    if let Some(f) = results.as_mut() {
                        f.append(&r)?;
                    }
                }
                Entry::Dead(d) => {
                    if let Some(f) = dead.as_mut() {
                        f.append(&d)?;
                    }
                }
                Entry::Flush(w) => waiters.push(w),
            }
        }
        for f in [results.as_mut(), dead.as_mut()].into_iter().flatten() {
            f.sync()?;
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
    Ok(count)
}

fn log_result(r: &ResultRecord) {
    let task = r.task_id.map_or("?".to_string(), |id| id.to_string());
    let latency = r.latency_ms.map_or(String::new(), |ms| format!(" in {ms:.1} ms"));
    if r.stale {
        log::warn!("stale result for task {task} from {}: {}", r.client, r.output);
    } else if r.retry {
        log::info!("task {task} refused by {} (retry asked){latency}: {}", r.client, r.output);
    } else if r.ok {
        log::info!("result for task {task} from {}{latency}: {}", r.client, r.output);
    } else {
        log::warn!("task {task} failed at {}{latency}: {}", r.client, r.output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> ResultRecord {
        ResultRecord {
            task_id: Some(id),
            task: Some(format!("t{id}")),
            client: "c".into(),
            ok: true,
            output: "out".into(),
            latency_ms: Some(1.5),
            attempt: 1,
            stale: false,
            retry: false,
            accepted: true,
            received_at: 0.0,
        }
    }

    #[test]
    fn flushed_resolves_after_earlier_records_are_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let (sink, writer) = ResultSink::start(Some(&path), None).unwrap();
        sink.record(record(1));
        sink.record(record(2));
        futures::executor::block_on(sink.flushed()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["task_id"], 2);
        for key in ["task_id", "task", "client", "ok", "output", "latency_ms", "attempt", "stale", "accepted"] {
            assert!(lines[0].get(key).is_some(), "missing {key}");
        }
        sink.record(record(3));
        assert_eq!(writer.finish().unwrap(), 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn an_unwritable_results_file_is_named_in_the_error() {
        let err = ResultSink::start(Some(Path::new("/nonexistent-dir/r.jsonl")), None).err().unwrap();
        assert!(err.to_string().contains("/nonexistent-dir/r.jsonl"), "{err}");
    }
}
