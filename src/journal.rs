//! `Journal`: the server's durable state (`--state-dir`), an append-only log
//! of `Record`s in checksummed frames. Tasks, deliveries, results and dead
//! letters are appended by the one recording thread and committed in groups
//! (a commit marker, then fsync) before anything that depends on them is
//! acknowledged; at start-up the log is replayed, and it is rewritten as a
//! compact snapshot when it grows.
//!
//! Recovery (the format is in [`format`]): what follows the last complete
//! commit was never acknowledged, so a tail torn by a crash or a power loss
//! (zeros, a partial or garbled frame, records whose marker never reached the
//! disk) is trimmed off the file with a warning, and appends continue after
//! the last commit. So is a last batch with a bad frame before its intact
//! marker: a power loss can write a batch's pages out of order, and only the
//! last batch can be torn (the next is written after its fsync). A bad frame
//! is damage when a complete commit follows the first marker after it (a
//! later batch was written, so its own had been synced):
//! the server refuses to start, naming the file and the byte, unless told to
//! repair ([`OnDamage::Repair`], `--repair`): then the journal keeps every
//! commit completed before the damage, and the rest is moved aside to
//! `journal.damaged-<UTC time>` in the state directory.
//! A journal of the previous release (no header, no markers) is read and
//! rewritten in the current format.

mod format;

use crate::error::Error;
use crate::results::{DeadLetter, ResultRecord};
use crate::task::TaskId;
use format::{Damage, Format, Scan};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One fact about the server's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Record {
    /// A task was accepted from a producer.
    Task {
        id: TaskId,
        text: String,
        target: Option<String>,
        /// Its idempotency key; absent when it has none (and in journals
        /// written before tasks had keys).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        /// Queue mode: the clients that may take it (any one of them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        any_of: Option<Vec<String>>,
    },
    /// A task was written to a client.
    Sent {
        task: TaskId,
        client: String,
        attempt: u32,
    },
    /// A result was received (its `accepted` flag says whether it answered the task).
    Result(ResultRecord),
    /// A task was given up on.
    Dead(DeadLetter),
    /// Snapshot: the retained tasks are `first..next`.
    Window { first: TaskId, next: TaskId },
    /// Snapshot: a broadcast client's next task.
    Cursor { client: String, next: TaskId },
    /// Snapshot: `client` answered `task` (attempt `attempt`) and it was accepted.
    Done {
        task: TaskId,
        client: String,
        attempt: u32,
    },
    /// Snapshot: a queue task finished (answered or dead) whose answer is not kept.
    Finished { task: TaskId },
    /// An operator cancelled the task: it is delivered no further.
    Cancelled { task: TaskId },
    /// Snapshot: the next sequence number of the results and dead-letter files.
    Seq { next: u64 },
    /// The identity of this state, echoed by clients with their results.
    Incarnation { id: String },
}

/// What opening a journal does with damage before its last complete commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamage {
    /// Refuse to open it (an [`Error::State`] naming the file and byte).
    Refuse,
    /// Keep every commit completed before the damage and move the rest
    /// aside to a dated file in the state directory.
    Repair,
}

/// The open journal of a state directory, locked against a second server.
/// After a failed write or sync it must not be written again (the file may
/// hold part of a frame): the server stops, and the next start recovers.
pub struct Journal {
    dir: PathBuf,
    out: BufWriter<File>,
    /// The file's salt, which every checksum starts from.
    salt: u32,
    /// Frames were appended since the last commit marker.
    uncommitted: bool,
    /// Bytes in the file, to decide when to compact.
    pub size: u64,
    /// Held for the journal's lifetime: the lock on the state directory.
    _lock: File,
    /// Times each commit, for the metrics (`--metrics-listen`).
    sync_timer: Option<prometheus::Histogram>,
}

impl Journal {
    /// Opens (creating) `dir`, locks it, and reads the records of every
    /// complete commit in its journal; damage before one is refused.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), Error> {
        Journal::open_with(dir, OnDamage::Refuse)
    }

    /// As [`Journal::open`], with damage handled as `on_damage` says. The
    /// file is read frame by frame, never whole; a torn tail is trimmed.
    pub fn open_with(dir: &Path, on_damage: OnDamage) -> Result<(Journal, Vec<Record>), Error> {
        fs::create_dir_all(dir).map_err(|e| Error::file(dir, "create the state directory", e))?;
        let lock = lock(dir)?;
        let path = dir.join("journal");
        let (records, salt, size) = match scan_file(&path)? {
            Some(scan) => recover(dir, &path, scan, on_damage)?,
            None => {
                let (salt, size) = write_file(dir, &[])?;
                (vec![], salt, size)
            }
        };
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                out: BufWriter::new(open_to_append(&path)?),
                salt,
                uncommitted: false,
                size,
                _lock: lock,
                sync_timer: None,
            },
            records,
        ))
    }

    fn path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Appends one record (buffered, and not committed until [`Journal::sync`]).
    pub fn append(&mut self, r: &Record) -> Result<(), Error> {
        let frame = format::record_frame(self.salt, r);
        self.size += frame.len() as u64;
        self.uncommitted = true;
        self.out
            .write_all(&frame)
            .map_err(|e| Error::file(self.path(), "write the journal", e))
    }

    /// Times every commit from now on into `timer`.
    pub fn time_syncs(&mut self, timer: prometheus::Histogram) {
        self.sync_timer = Some(timer);
    }

    /// Commits everything appended so far: a commit marker, then flush and fsync.
    pub fn sync(&mut self) -> Result<(), Error> {
        let _timed = self.sync_timer.as_ref().map(|t| t.start_timer());
        let path = self.path();
        let err = |e| Error::file(&path, "write the journal", e);
        if self.uncommitted {
            let marker = format::commit_frame(self.salt, self.size);
            self.out.write_all(&marker).map_err(err)?;
            self.size += marker.len() as u64;
            self.uncommitted = false;
        }
        self.out.flush().map_err(err)?;
        self.out.get_ref().sync_data().map_err(err)
    }

    /// Replaces the journal with `snapshot` (one commit), atomically: written
    /// to a new file, fsync'd, renamed over the old one, the directory fsync'd.
    pub fn compact(&mut self, snapshot: &[Record]) -> Result<(), Error> {
        self.sync()?;
        let (salt, size) = write_file(&self.dir, snapshot)?;
        self.out = BufWriter::new(open_to_append(&self.path())?);
        self.salt = salt;
        self.size = size;
        Ok(())
    }
}

/// Locks the state directory against a second server, for as long as the lock file is open.
fn lock(dir: &Path) -> Result<File, Error> {
    let path = dir.join("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::file(&path, "open", e))?;
    // A lock is released only when every copy of its descriptor is closed:
    // a server that just stopped may still have one in a child between fork
    // and exec (its descriptors close on exec), and a supervisor may restart
    // it while the old process is exiting. So wait a moment before saying
    // the directory is in use.
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    while lock.try_lock().is_err() {
        if std::time::Instant::now() >= deadline {
            return Err(Error::State(format!(
                "state directory {} is in use by another contact-server (stop it, or choose another --state-dir)",
                dir.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(lock)
}

/// How long opening waits for a state directory's lock to be released.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

fn open_to_append(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, "open the journal", e))
}

/// Writes `records` as one commit to a new journal file with a fresh salt
/// and renames it over `dir/journal`; returns the salt and the file's size.
/// When that fails the new file is removed (best effort): on a full disk it
/// would only take space.
fn write_file(dir: &Path, records: &[Record]) -> Result<(u32, u64), Error> {
    let tmp = dir.join("journal.new");
    let salt = fastrand::u32(..);
    let size = write_snapshot(&tmp, salt, records)
        .and_then(|size| {
            let path = dir.join("journal");
            fs::rename(&tmp, &path).map_err(|e| Error::file(&path, "replace the journal", e))?;
            Ok(size)
        })
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
    sync_dir(dir)?;
    Ok((salt, size))
}

/// Writes `records` as one commit to a new journal file at `tmp`, durably;
/// returns its size.
fn write_snapshot(tmp: &Path, salt: u32, records: &[Record]) -> Result<u64, Error> {
    let err = |e| Error::file(tmp, "write the journal snapshot", e);
    let mut out = BufWriter::new(File::create(tmp).map_err(err)?);
    out.write_all(&format::header(salt)).map_err(err)?;
    let mut size = format::HEADER_LEN;
    for r in records {
        let frame = format::record_frame(salt, r);
        size += frame.len() as u64;
        out.write_all(&frame).map_err(err)?;
    }
    if !records.is_empty() {
        out.write_all(&format::commit_frame(salt, size))
            .map_err(err)?;
        size += format::COMMIT_LEN as u64;
    }
    out.flush().map_err(err)?;
    out.get_ref().sync_all().map_err(err)?;
    Ok(size)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::file(dir, "sync the state directory", e))
}

/// Acts on what reading the journal at `path` found: refuses or repairs
/// damage, trims a torn tail, rewrites a file of an older format; returns
/// the records, and the salt and size of the journal to append to.
fn recover(
    dir: &Path,
    path: &Path,
    scan: Scan,
    on_damage: OnDamage,
) -> Result<(Vec<Record>, u32, u64), Error> {
    let tail = scan.len - scan.kept;
    match (&scan.damage, on_damage) {
        (Some(damage), OnDamage::Refuse) => return Err(damaged(path, &scan, damage)),
        (Some(damage), OnDamage::Repair) => {
            let aside = move_aside(dir, path, scan.kept)?;
            log::warn!(
                "state file {}: repaired (--repair): damaged at byte {} ({}); kept the first {} bytes \
                 ({}) and moved {tail} bytes to {}",
                path.display(),
                damage.at,
                damage.what,
                scan.kept,
                kept(&scan),
                aside.display()
            );
        }
        (None, _) if tail > 0 => match &scan.torn_batch {
            Some(bad) => log::warn!(
                "state file {}: trimmed {tail} bytes after byte {}, the end of the last complete \
                 commit: a power loss tore the last batch (its pages reached the disk out of order: \
                 a bad frame at byte {} ({}) before its commit marker). That batch was never \
                 acknowledged, unless the disk lost data it had confirmed as written; {} records kept",
                path.display(),
                scan.kept,
                bad.at,
                bad.what,
                scan.records.len()
            ),
            None => log::warn!(
                "state file {}: trimmed {tail} bytes after byte {}, the end of the last complete commit: \
                 a torn tail left by a crash or power loss, never acknowledged; {} records kept",
                path.display(),
                scan.kept,
                scan.records.len()
            ),
        },
        (None, _) => {}
    }
    match scan.format {
        Format::Current { salt } => {
            if tail > 0 {
                truncate(path, scan.kept)?;
            }
            Ok((scan.records, salt, scan.kept))
        }
        Format::Legacy | Format::Unreadable => {
            if scan.format == Format::Legacy && scan.len > 0 {
                log::info!(
                    "state file {}: rewriting its {} records in the current journal format",
                    path.display(),
                    scan.records.len()
                );
            }
            let (salt, size) = write_file(dir, &scan.records)?;
            Ok((scan.records, salt, size))
        }
    }
}

/// The refusal to start on a damaged journal: where, what, and what to do.
fn damaged(path: &Path, scan: &Scan, damage: &Damage) -> Error {
    let why = match scan.format {
        Format::Current { .. } => {
            "a complete commit follows the batch it is in, so it is not a tail torn by a crash \
             or power loss"
        }
        Format::Legacy => "data follows it, so it is not a tail torn by a crash",
        Format::Unreadable => "nothing in the file can be checked without it",
    };
    let keep = if scan.records.is_empty() {
        "start from an empty journal".to_string()
    } else {
        format!("keep its first {} bytes ({})", scan.kept, kept(scan))
    };
    Error::State(format!(
        "state file {} is damaged at byte {}: {}; {why}. Refusing to start rather than serve bad state: \
         start with --repair to {keep} and move the rest aside to a dated file in the state directory, \
         or restore the state directory from a backup",
        path.display(),
        damage.at,
        damage.what
    ))
}

/// The records a repair keeps, in words.
fn kept(scan: &Scan) -> String {
    let n = scan.records.len();
    match scan.format {
        Format::Current { .. } => {
            format!("{n} records, up to the last complete commit before the damage")
        }
        Format::Legacy | Format::Unreadable => format!("the {n} intact records before the damage"),
    }
}

/// Copies the bytes of `path` from `from` on into a new `journal.damaged-<UTC
/// time>` in `dir`, durably; returns its path.
fn move_aside(dir: &Path, path: &Path, from: u64) -> Result<PathBuf, Error> {
    let stamp = utc_stamp(SystemTime::now());
    let mut n = 1;
    let (aside, mut out) = loop {
        let name = match n {
            1 => format!("journal.damaged-{stamp}"),
            _ => format!("journal.damaged-{stamp}-{n}"),
        };
        let aside = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&aside) {
            Ok(f) => break (aside, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(Error::file(&aside, "create", e)),
        }
    };
    let mut src = File::open(path).map_err(|e| Error::file(path, "read the journal", e))?;
    src.seek(SeekFrom::Start(from))
        .and_then(|_| io::copy(&mut src, &mut out))
        .and_then(|_| out.sync_all())
        .map_err(|e| Error::file(&aside, "write", e))?;
    sync_dir(dir)?;
    Ok(aside)
}

/// Cuts `path` to its first `len` bytes, durably.
fn truncate(path: &Path, len: u64) -> Result<(), Error> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()))
        .map_err(|e| Error::file(path, "trim the torn tail of", e))
}

/// `t` in UTC as `YYYYMMDDTHHMMSSZ`, for file names.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, time) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        time / 3_600,
        time % 3_600 / 60,
        time % 60
    )
}

/// Reads the journal at `path` frame by frame; `None` when there is none.
fn scan_file(path: &Path) -> Result<Option<Scan>, Error> {
    let err = |e| Error::file(path, "read the journal", e);
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let len = f.metadata().map_err(err)?.len();
    format::scan(BufReader::with_capacity(64 << 10, f), len, path).map(Some)
}

/// Reads the records of every complete commit of the journal at `path`,
/// changing nothing (for tests and tools); damage is an error.
pub fn read_records(path: &Path) -> Result<Vec<Record>, Error> {
    let Some(scan) = scan_file(path)? else {
        let missing = io::Error::from(io::ErrorKind::NotFound);
        return Err(Error::file(path, "read the journal", missing));
    };
    match &scan.damage {
        Some(damage) => Err(damaged(path, &scan, damage)),
        None => Ok(scan.records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// The salt of the files the tests build byte by byte.
    const SALT: u32 = 0x5eed;

    pub(super) fn task(id: TaskId) -> Record {
        Record::Task {
            id,
            text: format!("t{id}"),
            target: None,
            key: None,
            any_of: None,
        }
    }

    /// A journal file of `batches`, each one commit: its bytes, where each
    /// frame starts, and where each commit ends.
    pub(super) fn journal_bytes(batches: &[Vec<Record>]) -> (Vec<u8>, Vec<usize>, Vec<usize>) {
        let mut bytes = format::header(SALT).to_vec();
        let (mut starts, mut ends) = (vec![], vec![]);
        for batch in batches {
            for r in batch {
                starts.push(bytes.len());
                bytes.extend(format::record_frame(SALT, r));
            }
            starts.push(bytes.len());
            bytes.extend(format::commit_frame(SALT, bytes.len() as u64));
            ends.push(bytes.len());
        }
        (bytes, starts, ends)
    }

    /// A frame of the previous release.
    pub(super) fn legacy_frame(r: &Record) -> Vec<u8> {
        let payload = serde_json::to_vec(r).unwrap();
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend(crc32fast::hash(&payload).to_le_bytes());
        frame.extend(payload);
        frame
    }

    /// What a journal of these bytes reads as: its records, or the refusal.
    pub(super) fn read(bytes: &[u8]) -> Result<Vec<Record>, String> {
        let path = Path::new("journal");
        let scan = format::scan(Cursor::new(bytes), bytes.len() as u64, path)
            .map_err(|e| e.to_string())?;
        match &scan.damage {
            Some(d) => Err(damaged(path, &scan, d).to_string()),
            None => Ok(scan.records),
        }
    }

    fn write(dir: &Path, records: &[Record]) {
        let (mut j, _) = Journal::open(dir).unwrap();
        for r in records {
            j.append(r).unwrap();
        }
        j.sync().unwrap();
    }

    fn file_len(path: &Path) -> usize {
        fs::metadata(path).unwrap().len() as usize
    }

    /// The files of `dir` whose names start with `journal.damaged-`.
    pub(super) fn moved_aside(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("journal.damaged-"))
            })
            .collect();
        found.sort();
        found
    }

    #[test]
    fn records_survive_reopening_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[task(1), task(2)]);
        let (mut j, got) = Journal::open(dir.path()).unwrap();
        assert_eq!(got, vec![task(1), task(2)]);
        j.compact(&[Record::Window { first: 2, next: 3 }, task(2)])
            .unwrap();
        j.append(&task(3)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, got) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            got,
            vec![Record::Window { first: 2, next: 3 }, task(2), task(3)]
        );
    }

    #[test]
    fn a_compaction_that_cannot_be_written_leaves_no_new_file_and_the_journal_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[task(1), task(2)]);
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        // Writes to /dev/full fail as on a full disk (ENOSPC).
        let new = dir.path().join("journal.new");
        std::os::unix::fs::symlink("/dev/full", &new).unwrap();
        let err = j.compact(&[task(2)]).err().unwrap().to_string();
        assert!(
            err.contains("journal.new") && err.contains("space"),
            "{err}"
        );
        assert!(new.symlink_metadata().is_err(), "journal.new removed");
        drop(j);
        assert_eq!(Journal::open(dir.path()).unwrap().1, vec![task(1), task(2)]);
    }

    #[test]
    fn a_second_server_on_the_same_directory_is_refused_as_state_not_usage() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Journal::open(dir.path()).unwrap();
        let err = Journal::open(dir.path()).err().unwrap();
        assert!(matches!(err, Error::State(_)), "{err:?}");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn each_sync_with_new_records_ends_in_one_commit_marker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(file_len(&path), format::HEADER_LEN as usize);
        j.append(&task(1)).unwrap();
        j.append(&task(2)).unwrap();
        j.sync().unwrap();
        let bytes = fs::read(&path).unwrap();
        let marker = &bytes[bytes.len() - format::COMMIT_LEN..];
        assert_eq!(
            marker,
            format::commit_frame(j.salt, (bytes.len() - format::COMMIT_LEN) as u64)
        );
        assert_eq!(j.size as usize, bytes.len());
        j.sync().unwrap();
        assert_eq!(file_len(&path), bytes.len(), "nothing new, no marker");
    }

    #[test]
    fn a_tail_of_zeros_after_a_commit_is_trimmed_and_appends_after_it_survive() {
        for zeros in [1, 7, 8, 9, 17, 512, 4096, 70_000] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal");
            write(dir.path(), &[task(1), task(2)]);
            let committed = file_len(&path);
            let mut bytes = fs::read(&path).unwrap();
            bytes.resize(committed + zeros, 0);
            fs::write(&path, &bytes).unwrap();
            let (mut j, got) = Journal::open(dir.path()).unwrap();
            assert_eq!(got, vec![task(1), task(2)], "{zeros} zeros");
            assert_eq!(file_len(&path), committed, "{zeros} zeros trimmed");
            j.append(&task(3)).unwrap();
            j.sync().unwrap();
            drop(j);
            let (_, got) = Journal::open(dir.path()).unwrap();
            assert_eq!(got, vec![task(1), task(2), task(3)], "{zeros} zeros");
        }
    }

    #[test]
    fn a_bad_frame_followed_by_the_unsynced_rest_of_its_batch_is_a_torn_tail() {
        let (whole, _, _) = journal_bytes(&[vec![task(1)]]);
        // The next batch reached the disk in part: its first frame garbled,
        // the others intact, its marker missing; then zeros.
        let second: Vec<u8> = (2..5)
            .flat_map(|i| format::record_frame(SALT, &task(i)))
            .collect();
        let mut bytes = [&whole[..], &second[..], &[0; 100]].concat();
        bytes[whole.len() + 12] ^= 0x40;
        assert_eq!(read(&bytes), Ok(vec![task(1)]));
        // Intact frames without their marker were never acknowledged either.
        assert_eq!(read(&[&whole[..], &second[..]].concat()), Ok(vec![task(1)]));
        // And a marker cut short leaves its batch out...
        let (two, _, _) = journal_bytes(&[vec![task(1)], vec![task(2)]]);
        assert_eq!(read(&two[..two.len() - 1]), Ok(vec![task(1)]));
        // ...unless what is missing is the high bytes of its offset, zeros,
        // and zeros follow: then the marker is whole, and so is its batch.
        let restored = [&two[..two.len() - 3], &[0; 10]].concat();
        assert_eq!(read(&restored), Ok(vec![task(1), task(2)]));
    }

    #[test]
    fn damage_before_a_complete_commit_is_refused_with_the_offset_and_the_file_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let batches = [vec![task(1)], vec![task(2), task(3)], vec![task(4)]];
        let (mut bytes, starts, _) = journal_bytes(&batches);
        // In the frame of task 2, followed by its batch's marker and a complete batch.
        let frame = starts[2];
        bytes[frame + 12] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = Journal::open(dir.path()).err().unwrap();
        assert!(matches!(err, Error::State(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "{} is damaged at byte {frame}: checksum mismatch",
                path.display()
            )) && msg.contains("--repair"),
            "{msg}"
        );
        assert_eq!(fs::read(&path).unwrap(), bytes, "left as it was");
        assert!(moved_aside(dir.path()).is_empty());
    }

    #[test]
    fn a_last_batch_whose_pages_reached_the_disk_out_of_order_is_trimmed_unless_a_batch_follows() {
        const PAGE: usize = 4096;
        let big = |id| Record::Task {
            id,
            text: "x".repeat(300),
            target: None,
            key: None,
            any_of: None,
        };
        for another_batch in [false, true] {
            for damage in ["zeroed page", "stale page", "garbled page"] {
                let case = format!("{damage}, another batch after it: {another_batch}");
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("journal");
                let (mut j, _) = Journal::open(dir.path()).unwrap();
                j.append(&task(1)).unwrap();
                j.append(&task(2)).unwrap();
                j.sync().unwrap();
                let first_end = j.size as usize;
                // A batch of several pages, ending in its marker.
                let mut frames = vec![];
                for id in 10..50 {
                    frames.push(j.size as usize);
                    j.append(&big(id)).unwrap();
                }
                j.sync().unwrap();
                let marker_page = (j.size as usize - format::COMMIT_LEN) / PAGE;
                if another_batch {
                    j.append(&task(3)).unwrap();
                    j.sync().unwrap();
                }
                drop(j);
                let mut bytes = fs::read(&path).unwrap();
                // The batch's first page also holds the end of the one before
                // it; the next page holds only its records.
                let (shared, own) = (first_end / PAGE * PAGE, (first_end / PAGE + 1) * PAGE);
                assert!(own / PAGE < marker_page && first_end > shared, "{case}");
                let damaged_from = match damage {
                    "zeroed page" => {
                        bytes[own..own + PAGE].fill(0);
                        own
                    }
                    "stale page" => {
                        // As it was when the first batch's fsync returned.
                        bytes[first_end..own].fill(0);
                        first_end
                    }
                    _ => {
                        let junk = (0..PAGE).map(|i| (i * 7 + 3) as u8);
                        bytes[own..own + PAGE]
                            .iter_mut()
                            .zip(junk)
                            .for_each(|(b, j)| *b = j);
                        own
                    }
                };
                let frame = *frames.iter().rev().find(|&&s| s <= damaged_from).unwrap();
                fs::write(&path, &bytes).unwrap();
                if another_batch {
                    let err = Journal::open(dir.path()).err().unwrap().to_string();
                    let at = format!("{} is damaged at byte {frame}:", path.display());
                    assert!(
                        err.contains(&at) && err.contains("--repair"),
                        "{case}: {err}"
                    );
                    assert_eq!(fs::read(&path).unwrap(), bytes, "{case}: left as it was");
                    let (_, got) = Journal::open_with(dir.path(), OnDamage::Repair).unwrap();
                    assert_eq!(got, vec![task(1), task(2)], "{case}");
                    assert_eq!(fs::read(&path).unwrap(), &bytes[..first_end], "{case}");
                    let aside = fs::read(&moved_aside(dir.path())[0]).unwrap();
                    assert_eq!(aside, &bytes[first_end..], "{case}");
                } else {
                    let (mut j, got) = Journal::open(dir.path()).unwrap();
                    assert_eq!(got, vec![task(1), task(2)], "{case}");
                    assert_eq!(file_len(&path), first_end, "{case}: trimmed");
                    assert!(moved_aside(dir.path()).is_empty(), "{case}");
                    j.append(&task(4)).unwrap();
                    j.sync().unwrap();
                    drop(j);
                    let (_, got) = Journal::open(dir.path()).unwrap();
                    assert_eq!(got, vec![task(1), task(2), task(4)], "{case}");
                }
            }
        }
    }

    #[test]
    fn repair_keeps_the_commits_before_the_damage_and_moves_the_rest_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let batches = [vec![task(1)], vec![task(2), task(3)], vec![task(4)]];
        let (mut bytes, starts, ends) = journal_bytes(&batches);
        bytes[starts[3] + 3] ^= 0x01;
        for round in 1..=2 {
            fs::write(&path, &bytes).unwrap();
            let (mut j, got) = Journal::open_with(dir.path(), OnDamage::Repair).unwrap();
            assert_eq!(got, vec![task(1)]);
            assert_eq!(file_len(&path), ends[0]);
            let aside = moved_aside(dir.path());
            assert_eq!(
                aside.len(),
                round,
                "a second repair does not overwrite the first"
            );
            assert_eq!(fs::read(&aside[round - 1]).unwrap(), &bytes[ends[0]..]);
            j.append(&task(5)).unwrap();
            j.sync().unwrap();
            drop(j);
            let (_, got) = Journal::open(dir.path()).unwrap();
            assert_eq!(got, vec![task(1), task(5)]);
        }
        // Without damage, repairing changes nothing.
        let before = fs::read(&path).unwrap();
        Journal::open_with(dir.path(), OnDamage::Repair).unwrap();
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(moved_aside(dir.path()).len(), 2);
    }

    #[test]
    fn a_damaged_header_is_refused_and_repair_moves_the_whole_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut bytes, _, _) = journal_bytes(&[vec![task(1)]]);
        bytes[13] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let err = Journal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("damaged at byte 0: header checksum"), "{err}");
        let (_, got) = Journal::open_with(dir.path(), OnDamage::Repair).unwrap();
        assert!(got.is_empty());
        assert_eq!(fs::read(&moved_aside(dir.path())[0]).unwrap(), bytes);
        assert_eq!(read(&fs::read(&path).unwrap()), Ok(vec![]));
    }

    #[test]
    fn a_journal_in_a_newer_format_is_refused_even_with_repair_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut head = format::header(SALT);
        head[8] = 2;
        let crc = crc32fast::hash(&head[..16]);
        head[16..].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, head).unwrap();
        for on_damage in [OnDamage::Refuse, OnDamage::Repair] {
            let err = Journal::open_with(dir.path(), on_damage).err().unwrap();
            assert!(matches!(err, Error::State(_)), "{err:?}");
            assert!(err.to_string().contains("format 2"), "{err}");
        }
        assert_eq!(fs::read(&path).unwrap(), head);
        assert!(moved_aside(dir.path()).is_empty());
    }

    #[test]
    fn a_journal_of_the_previous_release_is_read_and_rewritten_in_the_current_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut old: Vec<u8> = [task(1), task(2)].iter().flat_map(legacy_frame).collect();
        fs::write(&path, &old).unwrap();
        let (mut j, got) = Journal::open(dir.path()).unwrap();
        assert_eq!(got, vec![task(1), task(2)]);
        j.append(&task(3)).unwrap();
        j.sync().unwrap();
        drop(j);
        assert_eq!(
            read(&fs::read(&path).unwrap()),
            Ok(vec![task(1), task(2), task(3)])
        );
        // The previous release's own empty file, and its torn tails.
        fs::write(&path, b"").unwrap();
        assert_eq!(Journal::open(dir.path()).unwrap().1, vec![]);
        old.extend(&legacy_frame(&task(3))[..9]);
        old.extend([0; 4096]);
        fs::write(&path, &old).unwrap();
        assert_eq!(Journal::open(dir.path()).unwrap().1, vec![task(1), task(2)]);
        fs::write(&path, [0; 4096]).unwrap();
        assert_eq!(Journal::open(dir.path()).unwrap().1, vec![]);
        assert_eq!(read(&fs::read(&path).unwrap()), Ok(vec![]));
    }

    #[test]
    fn damage_in_a_journal_of_the_previous_release_is_refused_and_repairable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let frames: Vec<Vec<u8>> = [task(1), task(2), task(3)]
            .iter()
            .map(legacy_frame)
            .collect();
        let mut old = frames.concat();
        let second = frames[0].len();
        old[second + 10] ^= 0xff;
        fs::write(&path, &old).unwrap();
        let err = Journal::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains(&format!("damaged at byte {second}:")), "{err}");
        let (_, got) = Journal::open_with(dir.path(), OnDamage::Repair).unwrap();
        assert_eq!(got, vec![task(1)]);
        assert_eq!(
            fs::read(&moved_aside(dir.path())[0]).unwrap(),
            &old[second..]
        );
        assert_eq!(read(&fs::read(&path).unwrap()), Ok(vec![task(1)]));
    }

    #[test]
    fn a_task_key_is_written_only_when_there_is_one_and_older_task_records_still_read() {
        let before_keys = r#"{"k":"task","id":7,"text":"t7","target":null}"#;
        let r: Record = serde_json::from_str(before_keys).unwrap();
        assert_eq!(r, task(7));
        assert_eq!(serde_json::to_string(&task(7)).unwrap(), before_keys);
        let keyed = Record::Task {
            id: 7,
            text: "t7".into(),
            target: None,
            key: Some("k".into()),
            any_of: None,
        };
        let json = serde_json::to_string(&keyed).unwrap();
        assert!(json.ends_with(r#","key":"k"}"#), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), keyed);
    }

    #[test]
    fn moved_aside_files_are_named_by_utc_time() {
        let at = |secs| utc_stamp(UNIX_EPOCH + std::time::Duration::from_secs(secs));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(1_700_000_000), "20231114T221320Z");
        assert_eq!(at(4_102_444_799), "20991231T235959Z");
    }
}

#[cfg(test)]
mod properties {
    use super::tests::{journal_bytes, legacy_frame, moved_aside, read};
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Numbers of up to 15 significant digits (a timestamp to the
    /// microsecond, a latency), which JSON carries exactly; for any other
    /// finite number see `any_finite_number_survives_a_frame`.
    fn number() -> impl Strategy<Value = f64> {
        (-999_999_999_999_999i64..=999_999_999_999_999, 0..=6i32)
            .prop_map(|(digits, decimals)| digits as f64 / 10f64.powi(decimals))
    }

    /// Any finite number: JSON has no NaN or infinity (and the server never makes one).
    fn any_finite() -> impl Strategy<Value = f64> {
        use proptest::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
    }

    fn result_record() -> impl Strategy<Value = ResultRecord> {
        (
            (
                any::<Option<TaskId>>(),
                any::<Option<String>>(),
                any::<String>(),
            ),
            (
                any::<bool>(),
                any::<String>(),
                proptest::option::of(number()),
            ),
            (
                any::<u32>(),
                any::<[bool; 3]>(),
                number(),
                any::<Option<u64>>(),
            ),
        )
            .prop_map(
                |(
                    (task_id, task, client),
                    (ok, output, latency_ms),
                    (attempt, [stale, retry, accepted], received_at, seq),
                )| ResultRecord {
                    task_id,
                    task,
                    client,
                    ok,
                    output,
                    latency_ms,
                    attempt,
                    stale,
                    retry,
                    accepted,
                    received_at,
                    seq,
                },
            )
    }

    fn dead_letter() -> impl Strategy<Value = DeadLetter> {
        (
            (any::<TaskId>(), any::<String>(), any::<Option<String>>()),
            (any::<String>(), any::<u32>(), any::<String>()),
            (number(), any::<Option<u64>>()),
        )
            .prop_map(
                |((task_id, task, target), (client, attempts, reason), (at, seq))| DeadLetter {
                    task_id,
                    task,
                    target,
                    client,
                    attempts,
                    reason,
                    at,
                    seq,
                },
            )
    }

    /// Every kind of record, with arbitrary contents.
    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                any::<TaskId>(),
                any::<String>(),
                any::<Option<String>>(),
                any::<Option<String>>(),
                any::<Option<Vec<String>>>()
            )
                .prop_map(|(id, text, target, key, any_of)| Record::Task {
                    id,
                    text,
                    target,
                    key,
                    any_of
                }),
            (any::<TaskId>(), any::<String>(), any::<u32>()).prop_map(|(task, client, attempt)| {
                Record::Sent {
                    task,
                    client,
                    attempt,
                }
            }),
            result_record().prop_map(Record::Result),
            dead_letter().prop_map(Record::Dead),
            (any::<TaskId>(), any::<TaskId>())
                .prop_map(|(first, next)| Record::Window { first, next }),
            (any::<String>(), any::<TaskId>())
                .prop_map(|(client, next)| Record::Cursor { client, next }),
            (any::<TaskId>(), any::<String>(), any::<u32>()).prop_map(|(task, client, attempt)| {
                Record::Done {
                    task,
                    client,
                    attempt,
                }
            }),
            any::<TaskId>().prop_map(|task| Record::Finished { task }),
            any::<TaskId>().prop_map(|task| Record::Cancelled { task }),
            any::<u64>().prop_map(|next| Record::Seq { next }),
            any::<String>().prop_map(|id| Record::Incarnation { id }),
        ]
    }

    /// Frames of the previous release of `records`, and where each one
    /// starts; the last start is the end.
    fn legacy_frames(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = vec![];
        let mut starts = vec![0];
        for r in records {
            bytes.extend(legacy_frame(r));
            starts.push(bytes.len());
        }
        (bytes, starts)
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    /// A journal of `bytes` (damaged as `what` says) opens as `kept`,
    /// trimmed to its first `kept_len` bytes, and records appended next are
    /// read back after them.
    fn trimmed_and_appendable(
        bytes: &[u8],
        what: &str,
        kept: &[Record],
        kept_len: usize,
        after: &[Record],
    ) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        fs::write(&path, bytes).unwrap();
        let (mut j, got) =
            Journal::open(dir.path()).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
        prop_assert_eq!(&got, kept, "{}", what);
        prop_assert_eq!(fs::read(&path).unwrap(), &bytes[..kept_len], "{}", what);
        for r in after {
            j.append(r).unwrap();
        }
        j.sync().unwrap();
        drop(j);
        let reopened = Journal::open(dir.path())
            .map(|(_, got)| got)
            .map_err(|e| e.to_string());
        prop_assert_eq!(reopened, Ok([kept, after].concat()), "{}", what);
        Ok(())
    }

    /// A journal of `bytes` (damaged as `what` says) is refused as damaged
    /// at byte `frame`, and `--repair` keeps `kept` (its first `kept_len`
    /// bytes) and moves the rest aside.
    fn refused_and_repairable(
        bytes: &[u8],
        what: &str,
        frame: usize,
        kept: &[Record],
        kept_len: usize,
    ) -> Result<(), TestCaseError> {
        let err = read(bytes)
            .err()
            .unwrap_or_else(|| format!("{what}: not refused"));
        prop_assert!(
            err.contains(&format!("damaged at byte {frame}:")),
            "{}: {}",
            what,
            err
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        fs::write(&path, bytes).unwrap();
        let (_, got) = Journal::open_with(dir.path(), OnDamage::Repair).unwrap();
        prop_assert_eq!(&got, kept, "{}", what);
        prop_assert_eq!(fs::read(&path).unwrap(), &bytes[..kept_len], "{}", what);
        let aside = fs::read(&moved_aside(dir.path())[0]).unwrap();
        prop_assert_eq!(aside, &bytes[kept_len..], "{}", what);
        Ok(())
    }

    /// What a power loss may leave after the last write that reached the disk.
    fn tail() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (0..9000usize).prop_map(|n| vec![0; n]),
            vec(any::<u8>(), 0..300),
            (vec(any::<u8>(), 1..40), 1..5000usize)
                .prop_map(|(junk, zeros)| { [junk, vec![0; zeros]].concat() }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn records_appended_over_several_runs_read_back_unchanged(
            runs in vec(vec(record(), 0..6), 1..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal");
            let mut written = vec![];
            for run in &runs {
                let (mut j, got) = Journal::open(dir.path()).unwrap();
                prop_assert_eq!(&got, &written);
                for r in run {
                    j.append(r).unwrap();
                    written.push(r.clone());
                }
                j.sync().unwrap();
                prop_assert_eq!(j.size, file_len(&path));
            }
            prop_assert_eq!(&read_records(&path).unwrap(), &written);
            let (j, got) = Journal::open(dir.path()).unwrap();
            prop_assert_eq!(got, written);
            prop_assert_eq!(j.size, file_len(&path));
        }

        #[test]
        fn a_compacted_journal_reads_back_as_its_snapshot_then_what_followed(
            before in vec(record(), 0..5),
            snapshot in vec(record(), 0..5),
            after in vec(record(), 0..5),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut j, _) = Journal::open(dir.path()).unwrap();
            for r in &before {
                j.append(r).unwrap();
            }
            j.compact(&snapshot).unwrap();
            prop_assert_eq!(j.size, file_len(&dir.path().join("journal")));
            for r in &after {
                j.append(r).unwrap();
            }
            j.sync().unwrap();
            drop(j);
            let (j, got) = Journal::open(dir.path()).unwrap();
            prop_assert_eq!(got, [snapshot, after].concat());
            prop_assert_eq!(j.size, file_len(&dir.path().join("journal")));
        }

        /// A crash cuts the file anywhere and may leave zeros or garbage
        /// after the cut: what survives is every commit whose bytes are all
        /// in the file (a marker ends in the high bytes of its offset, zeros
        /// that a zero tail can supply), the file is trimmed to the last of
        /// them, and what is appended next is read back after it.
        #[test]
        fn a_journal_torn_by_a_crash_stays_usable(
            batches in vec(vec(record(), 1..4), 1..5),
            cut in any::<prop::sample::Index>(),
            tail in tail(),
            after in vec(record(), 1..4),
        ) {
            let (bytes, _, ends) = journal_bytes(&batches);
            let header = format::HEADER_LEN as usize;
            let cut = header + cut.index(bytes.len() - header + 1);
            let file = [&bytes[..cut], &tail[..]].concat();
            let whole = ends.iter().filter(|&&e| file.get(..e) == Some(&bytes[..e])).count();
            let kept: Vec<Record> = batches[..whole].concat();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal");
            fs::write(&path, &file).unwrap();
            let (mut j, got) = Journal::open(dir.path()).unwrap();
            prop_assert_eq!(&got, &kept, "cut at {}", cut);
            let committed = if whole == 0 { header } else { ends[whole - 1] };
            prop_assert_eq!(file_len(&path), committed as u64);
            for r in &after {
                j.append(r).unwrap();
            }
            j.sync().unwrap();
            drop(j);
            let reopened = Journal::open(dir.path()).map(|(_, got)| got).map_err(|e| e.to_string());
            prop_assert_eq!(reopened, Ok([&kept[..], &after[..]].concat()), "cut at {}", cut);
        }

        /// A damaged byte is refused, naming the frame it is in, when a
        /// complete commit follows the first good marker after that frame
        /// (a later batch was written, so the damaged one had been synced),
        /// and `--repair` keeps the commits before it and moves the rest
        /// aside. Otherwise (in the last batch, or in the marker of the one
        /// before it) it is a torn last batch: trimmed, and appends after it survive.
        #[test]
        fn a_damaged_byte_is_refused_and_repairable_when_a_complete_batch_follows_its_own(
            batches in vec(vec(record(), 1..4), 1..5),
            at in any::<prop::sample::Index>(),
            flip in 1..=255u8,
            after in vec(record(), 1..3),
        ) {
            let (mut bytes, starts, ends) = journal_bytes(&batches);
            let header = format::HEADER_LEN as usize;
            let i = header + at.index(bytes.len() - header);
            bytes[i] ^= flip;
            let k = ends.iter().filter(|&&e| e <= i).count();
            let kept_len = if k == 0 { header } else { ends[k - 1] };
            let kept: Vec<Record> = batches[..k].concat();
            // The first good marker after the damage is batch k's own, or
            // the next batch's when the damage is in batch k's marker.
            let in_marker = i >= ends[k] - format::COMMIT_LEN;
            let refused = k + 1 + usize::from(in_marker) < batches.len();
            let frame = *starts.iter().rev().find(|&&s| s <= i).unwrap();
            let what = format!("byte {i} of {} flipped", bytes.len());
            if refused {
                refused_and_repairable(&bytes, &what, frame, &kept, kept_len)?;
            } else {
                trimmed_and_appendable(&bytes, &what, &kept, kept_len, &after)?;
            }
        }

        /// A power loss can write the last batch's pages out of order: its
        /// marker reaches the disk, an earlier page of it does not (zeros,
        /// or stale or arbitrary bytes). Never acknowledged, it is trimmed
        /// and appends after it survive; but with a complete batch after
        /// it, the same bytes are damage, refused and repairable.
        #[test]
        fn a_last_batch_torn_before_its_marker_is_trimmed_unless_a_complete_batch_follows(
            earlier in vec(vec(record(), 1..3), 0..3),
            last in vec(record(), 1..6),
            later in proptest::option::of(vec(record(), 1..3)),
            range in (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
            junk in proptest::option::of(vec(any::<u8>(), 1..300)),
            after in vec(record(), 1..3),
        ) {
            let mut batches = earlier.clone();
            batches.push(last);
            batches.extend(later.clone());
            let (mut bytes, starts, ends) = journal_bytes(&batches);
            let header = format::HEADER_LEN as usize;
            let k = earlier.len();
            let kept_len = if k == 0 { header } else { ends[k - 1] };
            // Somewhere in the last batch's records, before its marker.
            let records_end = ends[k] - format::COMMIT_LEN;
            let from = kept_len + range.0.index(records_end - kept_len);
            let to = from + 1 + range.1.index(records_end - from);
            let original = bytes.clone();
            for (n, b) in bytes[from..to].iter_mut().enumerate() {
                *b = junk.as_ref().map_or(0, |j| j[n % j.len()]);
            }
            let Some(first) = (from..to).find(|&n| bytes[n] != original[n]) else {
                prop_assert_eq!(read(&bytes), Ok(batches.concat()));
                return Ok(());
            };
            let frame = *starts.iter().rev().find(|&&s| s <= first).unwrap();
            let kept = earlier.concat();
            let what = format!("bytes {from}..{to} of {} overwritten", bytes.len());
            if later.is_some() {
                refused_and_repairable(&bytes, &what, frame, &kept, kept_len)?;
            } else {
                trimmed_and_appendable(&bytes, &what, &kept, kept_len, &after)?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// serde_json parses numbers approximately unless its `float_roundtrip`
        /// feature is on (it is): without it a number can come back a unit in
        /// the last place off (1700165887.4197125 read back as ...123).
        #[test]
        fn any_finite_number_survives_a_frame(x in any_finite(), y in any_finite()) {
            let r = Record::Dead(DeadLetter {
                task_id: 1,
                task: String::new(),
                target: None,
                client: String::new(),
                attempts: 1,
                reason: String::new(),
                at: x,
                seq: None,
            });
            prop_assert_eq!(read(&journal_bytes(&[vec![r.clone()]]).0), Ok(vec![r]));
            let mut r = ResultRecord {
                task_id: None,
                task: None,
                client: String::new(),
                ok: true,
                output: String::new(),
                latency_ms: Some(x),
                attempt: 1,
                stale: false,
                retry: false,
                accepted: true,
                received_at: y,
                seq: None,
            };
            let one = |r: &ResultRecord| journal_bytes(&[vec![Record::Result(r.clone())]]).0;
            prop_assert_eq!(read(&one(&r)), Ok(vec![Record::Result(r.clone())]));
            r.latency_ms = None;
            prop_assert_eq!(read(&one(&r)), Ok(vec![Record::Result(r)]));
        }

        #[test]
        fn a_previous_release_journal_cut_anywhere_reads_back_as_the_records_wholly_before_the_cut(
            records in vec(record(), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let (bytes, starts) = legacy_frames(&records);
            let cut = cut.index(bytes.len() + 1);
            let whole = starts.iter().filter(|&&s| s <= cut).count() - 1;
            prop_assert_eq!(read(&bytes[..cut]), Ok(records[..whole].to_vec()), "cut at {}", cut);
        }

        #[test]
        fn a_previous_release_journal_with_a_garbled_last_frame_drops_it_as_a_torn_tail(
            records in vec(record(), 1..6),
            at in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            // Anywhere in the last frame but its length (a crash mid-write
            // leaves a right length with wrong bytes after it).
            let (mut bytes, starts) = legacy_frames(&records);
            let last = starts[records.len() - 1];
            let i = last + 4 + at.index(bytes.len() - last - 4);
            bytes[i] ^= flip;
            prop_assert_eq!(read(&bytes), Ok(records[..records.len() - 1].to_vec()));
        }

        /// In a journal of the previous release (no commit markers), a
        /// damaged byte before the last frame is refused, naming the frame
        /// where it is; but a damaged length is indistinguishable from a torn
        /// tail when it runs to or past the end of the file: then that frame and
        /// all after it are dropped (with a warning), as the format promises for
        /// a final frame cut short. Never is a wrong record returned.
        #[test]
        fn a_previous_release_journal_damaged_before_its_last_frame_is_refused_unless_torn(
            records in vec(record(), 2..6),
            frame in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let (mut bytes, starts) = legacy_frames(&records);
            let k = frame.index(records.len() - 1);
            let (start, end) = (starts[k], starts[k + 1]);
            let i = start + at.index(end - start);
            bytes[i] ^= flip;
            let got = read(&bytes);
            let len = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap()) as usize;
            if i < start + 4 && len <= format::MAX_FRAME && start + 8 + len >= bytes.len() {
                prop_assert_eq!(got, Ok(records[..k].to_vec()), "byte {} of {}", i, bytes.len());
            } else {
                let err = got.unwrap_err();
                prop_assert!(err.contains(&format!("damaged at byte {start}:")), "byte {}: {}", i, err);
            }
        }

        /// Whatever follows the last commit (no marker can turn up by chance:
        /// it names its own offset and its checksum starts from the file's
        /// salt) is a torn tail: never a refusal, never a wrong record.
        #[test]
        fn any_bytes_after_the_last_commit_are_a_torn_tail(
            batches in vec(vec(record(), 1..3), 0..3),
            junk in vec(any::<u8>(), 0..300),
        ) {
            let (bytes, _, _) = journal_bytes(&batches);
            prop_assert_eq!(read(&[&bytes[..], &junk[..]].concat()), Ok(batches.concat()));
        }

        /// The previous release's reader, on any bytes.
        #[test]
        fn any_bytes_are_read_without_panicking_and_damage_is_placed_in_the_file(
            prefix in vec(record(), 0..3),
            junk in vec(any::<u8>(), 0..200),
            header in proptest::option::of((0..300u32, any::<bool>())),
        ) {
            // Whole frames, then junk, optionally behind a header whose checksum is right.
            let (mut bytes, _) = legacy_frames(&prefix);
            if let Some((len, crc_ok)) = header {
                let body = &junk[..junk.len().min(len as usize)];
                bytes.extend(len.to_le_bytes());
                bytes.extend(if crc_ok { crc32fast::hash(body) } else { 0 }.to_le_bytes());
            }
            bytes.extend(&junk);
            match read(&bytes) {
                Ok(got) => prop_assert_eq!(&got[..prefix.len().min(got.len())], &prefix[..]),
                Err(e) => {
                    let at: usize = e
                        .split("damaged at byte ")
                        .nth(1)
                        .and_then(|s| s.split(':').next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("no offset in {e}"));
                    prop_assert!(at < bytes.len(), "{}", e);
                }
            }
            // And arbitrary bytes alone.
            let _ = read(&junk);
        }
    }
}
