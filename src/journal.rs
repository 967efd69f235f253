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
            return Err(Error::State(format!(
                "state directory {} is in use by another contact-server (stop it, or choose another --state-dir)",
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
        Error::State(format!(
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
    fn a_second_server_on_the_same_directory_is_refused_as_state_not_usage() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Journal::open(dir.path()).unwrap();
        let err = Journal::open(dir.path()).err().unwrap();
        assert!(matches!(err, Error::State(_)), "{err:?}");
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

#[cfg(test)]
mod properties {
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
            (any::<TaskId>(), any::<String>(), any::<Option<String>>())
                .prop_map(|(id, text, target)| Record::Task { id, text, target }),
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
            any::<u64>().prop_map(|next| Record::Seq { next }),
            any::<String>().prop_map(|id| Record::Incarnation { id }),
        ]
    }

    /// The frames of `records` and where each one starts; the last start is the end.
    fn frames(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = vec![];
        let mut starts = vec![0];
        for r in records {
            bytes.extend(encode(r));
            starts.push(bytes.len());
        }
        (bytes, starts)
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    fn read(bytes: &[u8]) -> Result<Vec<Record>, String> {
        decode(bytes, Path::new("journal")).map_err(|e| e.to_string())
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

        /// Fails today: `Journal::open` drops a torn tail from what it returns
        /// but leaves its bytes in the file and appends after them, so at the
        /// next start the torn frame is no longer last: the journal is refused as
        /// damaged, or (when the torn length runs past the new end) everything
        /// written since is silently dropped as a torn tail.
        #[test]
        #[ignore = "known bug, issue 8 (power-loss recovery): records appended after a torn tail are lost or the journal refused; see the comment"]
        fn a_journal_torn_by_a_crash_stays_usable(
            records in vec(record(), 1..5),
            cut in any::<prop::sample::Index>(),
            after in vec(record(), 1..4),
        ) {
            let (bytes, starts) = frames(&records);
            let cut = cut.index(bytes.len() + 1);
            let whole = starts.iter().filter(|&&s| s <= cut).count() - 1;
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("journal"), &bytes[..cut]).unwrap();
            let (mut j, got) = Journal::open(dir.path()).unwrap();
            prop_assert_eq!(&got[..], &records[..whole]);
            for r in &after {
                j.append(r).unwrap();
            }
            j.sync().unwrap();
            drop(j);
            let reopened = Journal::open(dir.path()).map(|(_, got)| got).map_err(|e| e.to_string());
            prop_assert_eq!(reopened, Ok([&records[..whole], &after[..]].concat()), "cut at {}", cut);
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
            prop_assert_eq!(read(&encode(&r)), Ok(vec![r]));
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
            prop_assert_eq!(read(&encode(&Record::Result(r.clone()))), Ok(vec![Record::Result(r.clone())]));
            r.latency_ms = None;
            prop_assert_eq!(read(&encode(&Record::Result(r.clone()))), Ok(vec![Record::Result(r)]));
        }

        #[test]
        fn a_journal_cut_anywhere_reads_back_as_the_records_wholly_before_the_cut(
            records in vec(record(), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let (bytes, starts) = frames(&records);
            let cut = cut.index(bytes.len() + 1);
            let whole = starts.iter().filter(|&&s| s <= cut).count() - 1;
            prop_assert_eq!(read(&bytes[..cut]), Ok(records[..whole].to_vec()), "cut at {}", cut);
        }

        #[test]
        fn a_garbled_last_frame_is_dropped_as_a_torn_tail(
            records in vec(record(), 1..6),
            at in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            // Anywhere in the last frame but its length (a crash mid-write
            // leaves a right length with wrong bytes after it).
            let (mut bytes, starts) = frames(&records);
            let last = starts[records.len() - 1];
            let i = last + 4 + at.index(bytes.len() - last - 4);
            bytes[i] ^= flip;
            prop_assert_eq!(read(&bytes), Ok(records[..records.len() - 1].to_vec()));
        }

        /// A damaged byte before the last frame is refused, naming the frame
        /// where it is; but a damaged length is indistinguishable from a torn
        /// tail when it runs to or past the end of the file: then that frame and
        /// all after it are dropped (with a warning), as the format promises for
        /// a final frame cut short. Never is a wrong record returned.
        #[test]
        fn a_damaged_byte_before_the_last_frame_is_refused_unless_it_makes_a_torn_tail(
            records in vec(record(), 2..6),
            frame in any::<prop::sample::Index>(),
            at in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let (mut bytes, starts) = frames(&records);
            let k = frame.index(records.len() - 1);
            let (start, end) = (starts[k], starts[k + 1]);
            let i = start + at.index(end - start);
            bytes[i] ^= flip;
            let got = read(&bytes);
            let len = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap()) as usize;
            if i < start + 4 && len <= MAX_FRAME && start + 8 + len >= bytes.len() {
                prop_assert_eq!(got, Ok(records[..k].to_vec()), "byte {} of {}", i, bytes.len());
            } else {
                let err = got.unwrap_err();
                prop_assert!(err.contains(&format!("damaged at byte {start}:")), "byte {}: {}", i, err);
            }
        }

        #[test]
        fn any_bytes_are_read_without_panicking_and_damage_is_placed_in_the_file(
            prefix in vec(record(), 0..3),
            junk in vec(any::<u8>(), 0..200),
            header in proptest::option::of((0..300u32, any::<bool>())),
        ) {
            // Whole frames, then junk, optionally behind a header whose checksum is right.
            let (mut bytes, _) = frames(&prefix);
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
