//! The recording thread behind `ResultSink`: it writes state records to the
//! journal and results and dead letters to the journal *and* to their JSON
//! Lines files, then fsyncs — once per burst of entries (group commit) — and
//! only then releases whoever waits for the flush (a `tellResult` answer, a
//! producer's tasks). The journal is written first, so after a crash the
//! files can be brought up to date from it: each line carries the sequence
//! number of its journal record, and `Outputs::catch_up` appends what is missing.
//!
//! A write or fsync that fails (a full disk, a file-size limit, an I/O error)
//! ends the thread: it logs the error once, fires the server's stop signal
//! with it as the cause (so that the server stops taking work and exits), and
//! whoever waits for a flush is told it failed, never that it is recorded.

use crate::error::Error;
use crate::journal::{Journal, Record};
use crate::logtext::quoted;
use crate::results::{DeadLetter, ResultRecord};
use crate::shutdown::Shutdown;
use crossbeam_channel::Receiver;
use futures::channel::oneshot;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// What the recording thread is asked to do, in order.
pub enum Entry {
    /// Results of one `tellResult` batch (or one result), in order.
    Results(Vec<ResultRecord>),
    Dead(DeadLetter),
    Journal(Vec<Record>),
    Compact(Vec<Record>),
    /// Answered once everything before it is written and fsync'd.
    Flush(oneshot::Sender<()>),
    /// Answered once everything before it is in the journal (for records
    /// only the journal holds, such as tasks).
    JournalFlush(oneshot::Sender<()>),
    Close,
}

/// An append-only JSON Lines file. Lines are held in memory until `sync`,
/// which runs after the journal's: nothing reaches the file before the
/// journal has it (a buffered writer could flush early on its own).
struct LinesFile {
    path: PathBuf,
    out: File,
    pending: Vec<u8>,
    /// A pipe, a socket or a device such as /dev/null: written through, but
    /// it cannot be synced, cut back or read back for catching up.
    stream: bool,
}

impl LinesFile {
    fn open(path: Option<&Path>, what: &'static str) -> Result<Option<LinesFile>, Error> {
        let Some(p) = path else { return Ok(None) };
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| Error::file(p, what, e))?;
        let stream = !out
            .metadata()
            .map_err(|e| Error::file(p, what, e))?
            .is_file();
        Ok(Some(LinesFile {
            path: p.to_path_buf(),
            out,
            pending: vec![],
            stream,
        }))
    }

    fn append(&mut self, value: &impl Serialize) {
        serde_json::to_writer(&mut self.pending, value).expect("records always serialise");
        self.pending.push(b'\n');
    }

    fn sync(&mut self) -> Result<(), Error> {
        let err = |e: std::io::Error| Error::file(&self.path, "write", e);
        if self.stream {
            self.out.write_all(&self.pending).map_err(err)?;
            self.pending.clear();
        } else if !self.pending.is_empty() {
            let len = self.out.metadata().map_err(err)?.len();
            if let Err(e) = self.out.write_all(&self.pending) {
                // A full disk takes part of the lines: take them back, so that
                // readers of the file never see a torn line.
                let _ = self.out.set_len(len);
                return Err(err(e));
            }
            self.pending.clear();
            self.out.sync_data().map_err(err)?;
        }
        Ok(())
    }

    /// The sequence number on the last complete line (0 for an empty file),
    /// after cutting off a torn (unterminated) last line; `None` when that line
    /// has none (written without a journal): then nothing can be matched.
    fn last_seq(&mut self) -> Result<Option<u64>, Error> {
        if self.stream {
            return Ok(None);
        }
        let err = |e: std::io::Error| Error::file(&self.path, "read", e);
        let mut f = File::open(&self.path).map_err(err)?;
        let len = f.metadata().map_err(err)?.len();
        let start = len.saturating_sub(8 << 20);
        f.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut tail = vec![];
        f.read_to_end(&mut tail).map_err(err)?;
        if !tail.is_empty() && !tail.ends_with(b"\n") {
            let keep = tail.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            log::warn!(
                "{}: dropping a torn last line ({} bytes) left by a crash",
                self.path.display(),
                tail.len() - keep
            );
            self.out.set_len(start + keep as u64).map_err(err)?;
            tail.truncate(keep);
        }
        if start == 0 && tail.is_empty() {
            return Ok(Some(0));
        }
        let last = tail.strip_suffix(b"\n").unwrap_or(&tail);
        let line = last.rsplit(|&b| b == b'\n').next().unwrap_or_default();
        Ok(serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["seq"].as_u64()))
    }
}

/// The results and dead-letter files.
pub struct Outputs {
    results: Option<LinesFile>,
    dead: Option<LinesFile>,
}

impl Outputs {
    /// Opens both files (when asked for), naming the one that cannot be opened.
    pub fn open(results: Option<&Path>, dead: Option<&Path>) -> Result<Outputs, Error> {
        Ok(Outputs {
            results: LinesFile::open(results, "open the results file")?,
            dead: LinesFile::open(dead, "open the dead-letter file")?,
        })
    }

    /// Appends the journal's results and dead letters that a crash kept out
    /// of the files; returns the next sequence number to use.
    pub fn catch_up(&mut self, records: &[Record]) -> Result<u64, Error> {
        let mut next = 1;
        for r in records {
            next = next.max(match r {
                Record::Result(x) => x.seq.map_or(0, |s| s + 1),
                Record::Dead(x) => x.seq.map_or(0, |s| s + 1),
                Record::Seq { next } => *next,
                _ => 0,
            });
        }
        if let Some(f) = self.results.as_mut() {
            let last = catch_up_file(f, records, |r| match r {
                Record::Result(x) => Some((x, x.seq)),
                _ => None,
            })?;
            next = next.max(last.map_or(0, |s| s + 1));
        }
        if let Some(f) = self.dead.as_mut() {
            let last = catch_up_file(f, records, |r| match r {
                Record::Dead(x) => Some((x, x.seq)),
                _ => None,
            })?;
            next = next.max(last.map_or(0, |s| s + 1));
        }
        // A file may be ahead of the journal (one repaired with --repair
        // lost its tail): numbers go on after the file's, never repeat.
        Ok(next)
    }

    fn sync(&mut self) -> Result<(), Error> {
        for f in [self.results.as_mut(), self.dead.as_mut()]
            .into_iter()
            .flatten()
        {
            f.sync()?;
        }
        Ok(())
    }
}

/// Appends to `f` the journal's lines (chosen by `pick`, with their sequence
/// numbers) that come after its last line; returns the sequence number of
/// that line (`None` when it has none).
fn catch_up_file<'a, T: Serialize + 'a>(
    f: &mut LinesFile,
    records: &'a [Record],
    pick: impl Fn(&'a Record) -> Option<(&'a T, Option<u64>)>,
) -> Result<Option<u64>, Error> {
    let Some(last) = f.last_seq()? else {
        return Ok(None);
    };
    let missing: Vec<&T> = records
        .iter()
        .filter_map(pick)
        .filter(|(_, seq)| *seq > Some(last))
        .map(|(x, _)| x)
        .collect();
    if missing.is_empty() {
        return Ok(Some(last));
    }
    log::warn!(
        "{}: restoring {} lines from the journal that a crash kept out of it",
        f.path.display(),
        missing.len()
    );
    for m in missing {
        f.append(m);
    }
    f.sync().map(|()| Some(last))
}

/// A line of the results or dead-letter file, numbered (with a journal) in
/// one sequence and journaled as its own record.
trait Numbered: Serialize + Sized {
    fn set_seq(&mut self, seq: Option<u64>);
    fn into_record(self) -> Record;
    /// The line back from the record `into_record` made.
    fn from_record(r: Record) -> Self;
}

impl Numbered for ResultRecord {
    fn set_seq(&mut self, seq: Option<u64>) {
        self.seq = seq;
    }
    fn into_record(self) -> Record {
        Record::Result(self)
    }
    fn from_record(r: Record) -> Self {
        match r {
            Record::Result(x) => x,
            _ => unreachable!("made by into_record"),
        }
    }
}

impl Numbered for DeadLetter {
    fn set_seq(&mut self, seq: Option<u64>) {
        self.seq = seq;
    }
    fn into_record(self) -> Record {
        Record::Dead(self)
    }
    fn from_record(r: Record) -> Self {
        match r {
            Record::Dead(x) => x,
            _ => unreachable!("made by into_record"),
        }
    }
}

/// Numbers `line`, appends it to the journal (first) and to its file, if any.
fn write_numbered<T: Numbered>(
    mut line: T,
    next_seq: &mut u64,
    journal: Option<&mut Journal>,
    file: Option<&mut LinesFile>,
) -> Result<(), Error> {
    line.set_seq(journal.is_some().then_some(*next_seq));
    *next_seq += 1;
    if let Some(j) = journal {
        // Moved into the record and back: no copy of the line per result.
        let record = line.into_record();
        j.append(&record)?;
        line = T::from_record(record);
    }
    if let Some(f) = file {
        f.append(&line);
    }
    Ok(())
}

/// Who waits for the current burst of entries to be durable.
#[derive(Default)]
struct Waiters {
    /// In the journal.
    journal: Vec<oneshot::Sender<()>>,
    /// In the journal and the files.
    all: Vec<oneshot::Sender<()>>,
}

/// Where the thread makes things durable before the files: the journal
/// (`--state-dir`), or the shared store's outcomes (`--store`).
pub struct Durable {
    pub journal: Option<Journal>,
    pub outcomes: Option<crate::replica::Replica>,
}

/// The thread's loop: see the module documentation. Returns how many results
/// it recorded; on a failed write, fires `stop` with the error first.
pub fn run(
    rx: Receiver<Entry>,
    outputs: Outputs,
    durable: Durable,
    next_seq: u64,
    compact_bytes: u64,
    compaction_due: &AtomicBool,
    stop: &Shutdown,
) -> Result<u64, Error> {
    let mut waiters = Waiters::default();
    let res = record(
        &rx,
        outputs,
        durable,
        next_seq,
        compact_bytes,
        compaction_due,
        &mut waiters,
    );
    if let Err(e) = &res {
        log::error!("{e}: the server stops taking work and exits; nothing acknowledged is lost");
        stop.fail(e.to_string());
    }
    // Only now, with the failure known to all: the waiters learn that their
    // flush failed, and records still queued or sent later are dropped quietly.
    drop(waiters);
    drop(rx);
    res
}

fn record(
    rx: &Receiver<Entry>,
    mut outputs: Outputs,
    durable: Durable,
    mut next_seq: u64,
    compact_bytes: u64,
    compaction_due: &AtomicBool,
    waiters: &mut Waiters,
) -> Result<u64, Error> {
    let Durable {
        mut journal,
        outcomes,
    } = durable;
    let mut count = 0u64;
    // Compaction is due when the journal doubles past its last snapshot.
    let mut threshold = compact_bytes.max(journal.as_ref().map_or(0, |j| j.size * 2));
    let mut closed = false;
    while !closed {
        let Ok(first) = rx.recv() else { break };
        let mut burst: Vec<Entry> = std::iter::once(first).chain(rx.try_iter()).collect();
        if let Some(store) = &outcomes {
            store.store_outcomes(&mut burst).map_err(Error::State)?;
        }
        for entry in burst {
            match entry {
                Entry::Close => {
                    closed = true;
                    break;
                }
                Entry::Results(results) => {
                    for r in results {
                        count += 1;
                        log_result(&r);
                        let file = outputs.results.as_mut();
                        write_numbered(r, &mut next_seq, journal.as_mut(), file)?;
                    }
                }
                Entry::Dead(d) => {
                    let file = outputs.dead.as_mut();
                    write_numbered(d, &mut next_seq, journal.as_mut(), file)?;
                }
                Entry::Journal(records) => {
                    if let Some(j) = journal.as_mut() {
                        for r in &records {
                            j.append(r)?;
                        }
                    }
                }
                Entry::Compact(mut snapshot) => {
                    if let Some(j) = journal.as_mut() {
                        // The snapshot drops results: they must be in their files first.
                        j.sync()?;
                        outputs.sync()?;
                        snapshot.insert(0, Record::Seq { next: next_seq });
                        j.compact(&snapshot)?;
                        threshold = compact_bytes.max(j.size * 2);
                        log::info!(
                            "state journal compacted to {} records ({} bytes)",
                            snapshot.len(),
                            j.size
                        );
                    }
                }
                Entry::Flush(w) => waiters.all.push(w),
                Entry::JournalFlush(w) => waiters.journal.push(w),
            }
        }
        // Journal first: whatever reached a file is in the journal too.
        if let Some(j) = journal.as_mut() {
            j.sync()?;
            if j.size > threshold {
                compaction_due.store(true, Ordering::SeqCst);
            }
        }
        for w in waiters.journal.drain(..) {
            let _ = w.send(());
        }
        outputs.sync()?;
        for w in waiters.all.drain(..) {
            let _ = w.send(());
        }
    }
    if let Some(j) = journal.as_mut() {
        j.sync()?;
    }
    outputs.sync()?;
    Ok(count)
}

/// Whether every result gets a log line (at debug: one per task is too many
/// for info).
pub fn logs_every_result() -> bool {
    log::log_enabled!(log::Level::Debug)
}

/// Whether `r` is logged even when [`logs_every_result`] is off: a stale or
/// failed result (a warning) or a refusal (info), not a plain success.
pub fn has_log_line(r: &ResultRecord) -> bool {
    r.stale || r.retry || !r.ok
}

/// Logs one result: successes at debug (formatted only when that is on),
/// refusals at info, stale and failed results at warn.
fn log_result(r: &ResultRecord) {
    if !has_log_line(r) && !logs_every_result() {
        return;
    }
    let task = r.task_id.map_or("?".to_string(), |id| id.to_string());
    let latency = r
        .latency_ms
        .map_or(String::new(), |ms| format!(" in {ms:.1} ms"));
    if r.stale {
        log::warn!(
            "stale result for task {task} from {}: {}",
            r.client,
            quoted(&r.output)
        );
    } else if r.retry {
        log::info!(
            "task {task} refused by {} (retry asked){latency}: {}",
            r.client,
            quoted(&r.output)
        );
    } else if r.ok {
        log::debug!(
            "result for task {task} from {}{latency}: {}",
            r.client,
            quoted(&r.output)
        );
    } else {
        log::warn!(
            "task {task} failed at {}{latency}: {}",
            r.client,
            quoted(&r.output)
        );
    }
}
