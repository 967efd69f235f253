//! What the server records — results, dead letters, journal records — and
//! `ResultSink`, the handle through which everyone hands them to the one
//! recording thread (see `recorder`), so that file I/O never runs on a gRPC
//! thread. A `tellResult` call is only answered once everything it carried is
//! on disk: see [`ResultSink::flushed`]. When the disk fails, the sink says so
//! ([`ResultSink::failure`]) and nothing more is recorded.

use crate::error::Error;
use crate::journal::{Journal, Record};
use crate::recorder::{self, Entry, Outputs};
use crate::shutdown::Shutdown;
use crate::task::TaskId;
use crossbeam_channel::Sender;
use futures::channel::oneshot;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One result as the server recorded it: one JSON object per line in `--results-to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Position in the server's record of results and dead letters (with
    /// `--state-dir`): increasing, so a reader can resume after the last one it saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// A task given up on: one JSON object per line in `--dead-letter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// As in [`ResultRecord::seq`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// Handle to the recording thread; cheap to clone.
#[derive(Clone)]
pub struct ResultSink {
    tx: Sender<Entry>,
    compaction_due: Arc<AtomicBool>,
    /// Fired, with the error as its cause, when the recorder cannot write.
    stop: Shutdown,
    /// Whether results are written anywhere (`--results-to` or `--state-dir`).
    keeps_results: bool,
    /// Results with nothing to write or log, counted here instead of being
    /// handed to the recording thread (see [`ResultSink::record_many`]).
    passed: Arc<AtomicU64>,
}

/// Owns the recording thread; `finish` drains and flushes everything.
pub struct ResultWriter {
    tx: Sender<Entry>,
    handle: JoinHandle<Result<u64, Error>>,
    passed: Arc<AtomicU64>,
}

/// Where the recording thread writes.
#[derive(Default)]
pub struct SinkConfig<'a> {
    /// `--results-to`: one JSON line per result.
    pub results: Option<&'a Path>,
    /// `--dead-letter`: one JSON line per task given up on.
    pub dead_letters: Option<&'a Path>,
    /// `--state-dir`: the journal, with the records it held at start-up (the
    /// files above are first brought up to date with them).
    pub journal: Option<(Journal, &'a [Record])>,
    /// Journal size that makes a compaction due (it grows with the state too).
    pub compact_bytes: u64,
    /// Fired, with the error as its failure cause, when a write or fsync
    /// fails: the owner must stop taking work (see `recorder`).
    pub stop: Shutdown,
    /// `--store`: accepted results and dead letters are stored there (and
    /// acknowledged) before the files are written (see `replica`).
    pub outcomes: Option<crate::replica::Replica>,
}

impl ResultSink {
    /// Opens the files and starts the recording thread.
    pub fn start(config: SinkConfig<'_>) -> Result<(ResultSink, ResultWriter), Error> {
        let mut outputs = Outputs::open(config.results, config.dead_letters)?;
        let (journal, next_seq) = match config.journal {
            Some((j, records)) => (Some(j), outputs.catch_up(records)?),
            None => (None, 1),
        };
        let keeps_results =
            journal.is_some() || config.results.is_some() || config.outcomes.is_some();
        let passed = Arc::new(AtomicU64::new(0));
        // Unbounded: results arrive at most as fast as tasks were handed out,
        // and that is bounded by the per-client in-flight limit.
        let (tx, rx) = crossbeam_channel::unbounded();
        let compaction_due = Arc::new(AtomicBool::new(false));
        let due = compaction_due.clone();
        let compact_bytes = config.compact_bytes;
        let stop = config.stop.clone();
        let outcomes = config.outcomes;
        let handle = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                let journal = recorder::Durable { journal, outcomes };
                recorder::run(rx, outputs, journal, next_seq, compact_bytes, &due, &stop)
            })
            .map_err(Error::Thread)?;
        Ok((
            ResultSink {
                tx: tx.clone(),
                compaction_due,
                stop: config.stop,
                keeps_results,
                passed: passed.clone(),
            },
            ResultWriter { tx, handle, passed },
        ))
    }

    fn send(&self, e: Entry, what: &str) {
        // Fails only after `finish` or a failed write, when nothing can be
        // recorded any more; the failure was reported once, when it happened.
        if self.tx.send(e).is_err() {
            if self.failure().is_some() {
                log::debug!("{what} was dropped: the recorder has failed");
            } else {
                log::error!("{what} arrived after shutdown and was dropped");
            }
        }
    }

    /// Why nothing can be recorded any more, once a write or fsync has failed.
    pub fn failure(&self) -> Option<&str> {
        self.stop.failure()
    }

    /// Queues a result for recording.
    pub fn record(&self, r: ResultRecord) {
        self.record_many(vec![r]);
    }

    /// Queues results for recording, in order, as one entry: the recording
    /// thread wakes once for them all. When results are written nowhere,
    /// plain successes are only counted (nothing to write, and their log
    /// line is at debug): they never reach the thread unless that line is on.
    pub fn record_many(&self, mut records: Vec<ResultRecord>) {
        if !self.keeps_results && !recorder::logs_every_result() {
            let before = records.len();
            records.retain(recorder::has_log_line);
            self.passed
                .fetch_add((before - records.len()) as u64, Ordering::Relaxed);
        }
        if !records.is_empty() {
            self.send(Entry::Results(records), "results");
        }
    }

    /// Queues a dead letter for recording.
    pub fn bury(&self, d: DeadLetter) {
        self.send(Entry::Dead(d), "a dead letter");
    }

    /// Queues a state record for the journal (ignored without `--state-dir`).
    pub fn journal(&self, r: Record) {
        self.journal_many(vec![r]);
    }

    /// Queues state records for the journal, in order, as one entry.
    pub fn journal_many(&self, records: Vec<Record>) {
        self.send(Entry::Journal(records), "journal records");
    }

    /// Replaces the journal with `snapshot`, once everything queued before is durable.
    pub fn compact(&self, snapshot: Vec<Record>) {
        self.compaction_due.store(false, Ordering::SeqCst);
        self.send(Entry::Compact(snapshot), "a journal snapshot");
    }

    /// Whether the journal has grown enough to be worth compacting.
    pub fn compaction_due(&self) -> bool {
        self.compaction_due.load(Ordering::SeqCst)
    }

    /// Resolves once everything queued before this call is written and
    /// fsync'd; fails (is cancelled) if that cannot be done.
    pub fn flushed(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Entry::Flush(tx));
        rx
    }

    /// Like [`ResultSink::flushed`], for records only the journal holds
    /// (tasks): resolves once the journal has everything queued before this
    /// call, even if the results files cannot be written afterwards.
    pub fn journaled(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Entry::JournalFlush(tx));
        rx
    }
}

impl ResultWriter {
    /// Records everything queued so far, flushes and stops the thread; returns
    /// how many results were recorded. Sink handles still alive (a gRPC call
    /// that outlived shutdown) can no longer record: they log an error instead.
    /// After a failed write it returns at once with that failure.
    pub fn finish(self) -> Result<u64, Error> {
        let _ = self.tx.send(Entry::Close);
        let recorded = self
            .handle
            .join()
            .unwrap_or_else(|_| Err(Error::Usage("the recording thread panicked".into())))
            .map_err(|e| Error::Recording(Box::new(e)))?;
        Ok(recorded + self.passed.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(id: u64) -> ResultRecord {
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
            seq: None,
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn flushed_resolves_after_earlier_records_are_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let (sink, writer) = ResultSink::start(SinkConfig {
            results: Some(&path),
            ..Default::default()
        })
        .unwrap();
        sink.record(record(1));
        sink.record(record(2));
        futures::executor::block_on(sink.flushed()).unwrap();
        let got = lines(&path);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1]["task_id"], 2);
        for key in [
            "task_id",
            "task",
            "client",
            "ok",
            "output",
            "latency_ms",
            "attempt",
            "stale",
            "accepted",
        ] {
            assert!(got[0].get(key).is_some(), "missing {key}");
        }
        assert!(got[0].get("seq").is_none(), "no sequence without a journal");
        sink.record(record(3));
        assert_eq!(writer.finish().unwrap(), 3);
        assert_eq!(lines(&path).len(), 3);
    }

    #[test]
    fn a_batch_of_results_is_recorded_in_order_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let (sink, writer) = journaled_sink(&dir.path().join("state"), &path);
        sink.record_many((1..=5).map(record).collect());
        sink.record(record(6));
        futures::executor::block_on(sink.flushed()).unwrap();
        let got: Vec<(u64, u64)> = lines(&path)
            .iter()
            .map(|l| (l["task_id"].as_u64().unwrap(), l["seq"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, (1..=6).map(|i| (i, i)).collect::<Vec<_>>());
        assert_eq!(writer.finish().unwrap(), 6);
    }

    #[test]
    fn results_written_nowhere_are_still_counted_and_flushes_still_answered() {
        let (sink, writer) = ResultSink::start(SinkConfig::default()).unwrap();
        let stale = ResultRecord {
            stale: true,
            accepted: false,
            ..record(3)
        };
        sink.record_many(vec![record(1), record(2), stale]);
        futures::executor::block_on(sink.flushed()).unwrap();
        assert_eq!(writer.finish().unwrap(), 3);
    }

    #[test]
    fn an_unwritable_results_file_is_named_in_the_error() {
        let bad = Path::new("/nonexistent-dir/r.jsonl");
        let err = ResultSink::start(SinkConfig {
            results: Some(bad),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("/nonexistent-dir/r.jsonl"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_write_is_reported_once_and_stops_everything_waiting_on_it() {
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        let full = Path::new("/dev/full");
        let stop = Shutdown::new();
        let (sink, writer) = ResultSink::start(SinkConfig {
            results: Some(full),
            stop: stop.clone(),
            ..Default::default()
        })
        .unwrap();
        sink.record(record(1));
        let flushed = futures::executor::block_on(sink.flushed());
        assert!(
            flushed.is_err(),
            "a failed write is never reported as recorded"
        );
        assert!(stop.is_triggered(), "the owner is told to stop");
        let why = sink.failure().expect("the failure is kept");
        assert!(
            why.contains("/dev/full") && why.contains("No space left on device"),
            "{why}"
        );
        // Later records and flushes fail at once, quietly; finishing does not hang.
        sink.record(record(2));
        assert!(futures::executor::block_on(sink.flushed()).is_err());
        let err = writer.finish().unwrap_err();
        assert!(matches!(err, Error::Recording(_)), "{err}");
        assert_eq!(crate::cli::exit_code(&err), 1);
    }

    /// A sink on the journal in `state`, writing results to `path`.
    fn journaled_sink(state: &Path, path: &Path) -> (ResultSink, ResultWriter) {
        let (j, records) = Journal::open(state).unwrap();
        let config = SinkConfig {
            results: Some(path),
            journal: Some((j, &records)),
            compact_bytes: 1 << 20,
            ..Default::default()
        };
        ResultSink::start(config).unwrap()
    }

    #[test]
    fn results_missing_from_the_file_after_a_crash_are_restored_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let state = dir.path().join("state");
        {
            let (sink, writer) = journaled_sink(&state, &path);
            for id in 1..=3 {
                sink.record(record(id));
            }
            writer.finish().unwrap();
        }
        // A crash after the journal was synced but before the file was: the
        // last line is lost and the one before it torn.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut keep: Vec<&str> = text.lines().collect();
        keep.pop();
        let torn = format!("{}\n{}", keep[0], &keep[1][..10]);
        std::fs::write(&path, torn).unwrap();
        let (sink, writer) = journaled_sink(&state, &path);
        sink.record(record(4));
        writer.finish().unwrap();
        let seqs: Vec<u64> = lines(&path)
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);

        // A crash before the very first line reached the file: it is empty, and filled.
        let fresh = dir.path().join("fresh.jsonl");
        std::fs::write(&fresh, "").unwrap();
        let (_sink, writer) = journaled_sink(&state, &fresh);
        writer.finish().unwrap();
        assert_eq!(lines(&fresh).len(), 4);
    }

    #[test]
    fn a_results_file_ahead_of_its_journal_keeps_its_numbers_increasing() {
        // As after --repair moved the journal's tail aside: the file has lines
        // the journal no longer knows.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let state = dir.path().join("state");
        {
            let (sink, writer) = journaled_sink(&state, &path);
            sink.record(record(1));
            writer.finish().unwrap();
        }
        let ahead = ResultRecord {
            seq: Some(9),
            ..record(2)
        };
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&serde_json::to_string(&ahead).unwrap());
        text.push('\n');
        std::fs::write(&path, text).unwrap();
        let (sink, writer) = journaled_sink(&state, &path);
        sink.record(record(3));
        writer.finish().unwrap();
        let seqs: Vec<u64> = lines(&path)
            .iter()
            .map(|l| l["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 9, 10]);
    }
}
