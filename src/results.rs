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
    /// True when the result answered no delivery in flight (unknown, duplicate or
    /// superseded): recorded, but it does not count as the task's result.
    pub stale: bool,
    /// Unix time the result was received, in seconds.
    pub received_at: f64,
}

enum Entry {
    Record(ResultRecord),
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

impl ResultSink {
    /// Starts the recording thread, appending to `path` when given.
    pub fn start(path: Option<&Path>) -> Result<(ResultSink, ResultWriter), Error> {
        let file = match path {
            Some(p) => Some((
                p.to_path_buf(),
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::file(p, "open the results file", e))?,
            )),
            None => None,
        };
        // Unbounded: results arrive at most as fast as tasks were handed out,
        // and that is bounded by the per-client in-flight limit.
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("result-sink".into())
            .spawn(move || record_loop(rx, file))
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

    /// Resolves once every result queued before this call is written and flushed.
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

fn record_loop(rx: Receiver<Entry>, file: Option<(PathBuf, File)>) -> Result<u64, Error> {
    let (path, mut out) = match file {
        Some((p, f)) => (Some(p), Some(BufWriter::new(f))),
        None => (None, None),
    };
    let write_err = |e| Error::file(path.clone().unwrap_or_default(), "write the results file", e);
    let mut count = 0u64;
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut closed = false;
    while !closed {
        let Ok(first) = rx.recv() else { break };
        // Take whatever else is queued, so a burst costs one flush.
        for entry in std::iter::once(first).chain(rx.try_iter()) {
            match entry {
                Entry::Close => {
                    closed = true;
                    break;
                }
                Entry::Record(r) => {
                    count += 1;
                    log_result(&r);
                    if let Some(out) = out.as_mut() {
                        serde_json::to_writer(&mut *out, &r).map_err(|e| write_err(e.into()))?;
                        out.write_all(b"\n").map_err(write_err)?;
                    }
                }
                Entry::Flush(w) => waiters.push(w),
            }
        }
        if let Some(out) = out.as_mut() {
            out.flush().map_err(write_err)?;
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
            received_at: 0.0,
        }
    }

    #[test]
    fn flushed_resolves_after_earlier_records_are_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let (sink, writer) = ResultSink::start(Some(&path)).unwrap();
        sink.record(record(1));
        sink.record(record(2));
        futures::executor::block_on(sink.flushed()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["task_id"], 2);
        for key in ["task_id", "task", "client", "ok", "output", "latency_ms", "attempt", "stale"] {
            assert!(lines[0].get(key).is_some(), "missing {key}");
        }
        sink.record(record(3));
        assert_eq!(writer.finish().unwrap(), 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn an_unwritable_results_file_is_named_in_the_error() {
        let err = ResultSink::start(Some(Path::new("/nonexistent-dir/r.jsonl"))).err().unwrap();
        assert!(err.to_string().contains("/nonexistent-dir/r.jsonl"), "{err}");
    }
}
