//! `Journal`: the server's durable state (`--state-dir`), an append-only log
//! of `Record`s in checksummed frames. Tasks, deliveries, results and dead
//! letters are appended by the one recording thread and fsync'd in groups
//! before anything that depends on them is acknowledged; at start-up the log
//! is replayed, and it is rewritten as a compact snapshot when it grows.
//!
//! Frame: `u32` payload length, `u32` CRC-32 of the payload (both little
//! endian), then the payload (one JSON `Record`). A final frame cut short by a
//! crash is reported and dropped; a bad checksum anywhere else means the file
//! was damaged, and the server refuses to start rather than guess.

use crate::error::Error;
use crate::results::{DeadLetter, ResultRecord};
use crate::task::TaskId;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Largest frame accepted when reading; a longer length field is damage.
const MAX_FRAME: usize = 64 << 20;

/// One fact about the server's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Record {
    /// A task was accepted from a producer.
    Task {
        id: TaskId,
        text: String,
        target: Option<String>,
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
    /// Snapshot: the next sequence number of the results and dead-letter files.
    Seq { next: u64 },
    /// The identity of this state, echoed by clients with their results.
    Incarnation { id: String },
}

/// The open journal of a state directory, locked against a second server.
pub struct Journal {
    dir: PathBuf,
    out: BufWriter<File>,
    /// Bytes in the file, to decide when to compact.
    pub size: u64,
    /// Held for the journal's lifetime: the lock on the state directory.
    _lock: File,
}

impl Journal {
    /// Opens (creating) `dir`, locks it, and reads every record in its journal.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Record>), Error> {
        fs::create_dir_all(dir).map_err(|e| Error::file(dir, "create the state directory", e))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::file(&lock_path, "open", e))?;
        if lock.try_lock().is_err() {
            return Err(Error::Usage(format!(
                "state directory {} is in use by another contact-server (choose another --state-dir)",
                dir.display()
            )));
        }
        let path = dir.join("journal");
        let records = match fs::read(&path) {
            Ok(bytes) => decode(&bytes, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
            Err(e) => return Err(Error::file(&path, "read the journal", e)),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::file(&path, "open the journal", e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                out: BufWriter::new(file),
                size,
                _lock: lock,
            },
            records,
        ))
    }

    fn path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Appends one record (buffered until [`Journal::sync`]).
    pub fn append(&mut self, r: &Record) -> Result<(), Error> {
        let frame = encode(r);
        self.size += frame.len() as u64;
        self.out
            .write_all(&frame)
            .map_err(|e| Error::file(self.path(), "write the journal", e))
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), Error> {
        let path = self.path();
        let err = |e| Error::file(&path, "write the journal", e);
        self.out.flush().map_err(err)?;
        self.out.get_ref().sync_data().map_err(err)
    }

    /// Replaces the journal with `snapshot`, atomically: written to a new
    /// file, fsync'd, renamed over the old one, and the directory fsync'd.
    pub fn compact(&mut self, snapshot: &[Record]) -> Result<(), Error> {
        self.sync()?;
        let tmp = self.dir.join("journal.new");
        let err = |e| Error::file(&tmp, "write the journal snapshot", e);
        let mut out = BufWriter::new(File::create(&tmp).map_err(err)?);
        let mut size = 0u64;
        for r in snapshot {
            let frame = encode(r);
            size += frame.len() as u64;
            out.write_all(&frame).map_err(err)?;
        }
        out.flush().map_err(err)?;
        out.get_ref().sync_all().map_err(err)?;
        fs::rename(&tmp, self.path())
            .map_err(|e| Error::file(self.path(), "replace the journal", e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::file(&self.dir, "sync the state directory", e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(self.path())
            .map_err(|e| Error::file(self.path(), "open the journal", e))?;
        self.out = BufWriter::new(file);
        self.size = size;
        Ok(())
    }
}

fn encode(r: &Record) -> Vec<u8> {
    let payload = serde_json::to_vec(r).expect("records always serialise");
    let mut frame = Vec::with_capacity(payload.len() + 8);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Reads every frame; drops (with a warning) a torn final frame, refuses damage elsewhere.
fn decode(bytes: &[u8], path: &Path) -> Result<Vec<Record>, Error> {
    let corrupt = |offset: usize, what: &str| {
        Error::Usage(format!(
            "state file {} is damaged at byte {offset}: {what}. Refusing to start rather than serve bad state; \
             move the state directory away (or restore it from a backup) to start afresh",
            path.display()
        ))
    };
    let mut records = vec![];
    let mut at = 0usize;
    while at < bytes.len() {
        let header = bytes.get(at..at + 8);
        let (len, crc) = match header {
            Some(h) => (
                u32::from_le_bytes(h[..4].try_into().unwrap()) as usize,
                u32::from_le_bytes(h[4..].try_into().unwrap()),
            ),
            None => return Ok(torn(records, path, at, bytes.len())),
        };
        if len > MAX_FRAME {
            return Err(corrupt(at, "impossible record length"));
        }
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else {
            return Ok(torn(records, path, at, bytes.len()));
        };
        let last = at + 8 + len == bytes.len();
        if crc32fast::hash(payload) != crc {
            if last {
                return Ok(torn(records, path, at, bytes.len()));
            }
            return Err(corrupt(at, "checksum mismatch"));
        }
        let record = serde_json::from_slice(payload)
            .map_err(|e| corrupt(at, &format!("unreadable record ({e})")))?;
        records.push(record);
        at += 8 + len;
    }
    Ok(records)
}

fn torn(records: Vec<Record>, path: &Path, at: usize, len: usize) -> Vec<Record> {
    log::warn!(
        "state file {}: the last record (bytes {at}..{len}) was cut short by a crash and is dropped; \
         the {} records before it are intact",
        path.display(),
        records.len()
    );
    records
}

/// Reads all of `r` (for tests and tools).
pub fn read_records(path: &Path) -> Result<Vec<Record>, Error> {
    let mut bytes = vec![];
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::file(path, "read the journal", e))?;
    decode(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: TaskId) -> Record {
        Record::Task {
            id,
            text: format!("t{id}"),
            target: None,
        }
    }

    fn write(dir: &Path, records: &[Record]) {
        let (mut j, _) = Journal::open(dir).unwrap();
        for r in records {
            j.append(r).unwrap();
        }
        j.sync().unwrap();
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
    fn a_second_server_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Journal::open(dir.path()).unwrap();
        let err = Journal::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn a_torn_tail_is_dropped_and_the_prefix_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[task(1), task(2)]);
        let path = dir.path().join("journal");
        let bytes = fs::read(&path).unwrap();
        for cut in [
            bytes.len() - 1,
            bytes.len() - 10,
            bytes.len() - (encode(&task(2)).len() - 3),
        ] {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert_eq!(read_records(&path).unwrap(), vec![task(1)], "cut at {cut}");
        }
        // A last frame with garbage in it (partly written page) is also a torn tail.
        let mut garbled = bytes.clone();
        let n = garbled.len();
        garbled[n - 2] ^= 0xff;
        fs::write(&path, &garbled).unwrap();
        assert_eq!(read_records(&path).unwrap(), vec![task(1)]);
    }

    #[test]
    fn damage_before_the_end_is_refused_with_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[task(1), task(2)]);
        let path = dir.path().join("journal");
        let mut bytes = fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(
            err.contains("damaged at byte 0") && err.contains("checksum"),
            "{err}"
        );
    }
}
