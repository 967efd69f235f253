//! The journal's bytes on disk, and reading them back frame by frame.
//!
//! A file opens with a 20-byte header: the magic `CONTACTJ`, the format
//! version (`u32`), a random salt (`u32`) and the CRC-32 of those 16 bytes.
//! Frames follow: a `u32` body length, a `u32` CRC-32 of the length and the
//! body (started from the file's salt), then the body: a kind byte and its
//! contents, `R` and one JSON `Record`, or `C` and the `u64` offset of the
//! frame itself: the commit marker that ends every group commit and snapshot.
//! All numbers are little endian. A body is never empty and the checksum
//! covers the length, so unwritten space (zeros) never reads as a frame; the
//! salt keeps frames of an older file (blocks reused after a compaction) from
//! passing as this file's, and the offset keeps a marker from passing for one
//! elsewhere in the file.
//!
//! Reading keeps the records of complete commits only. What follows the last
//! complete commit (zeros, a frame cut short or failing its checksum, frames
//! whose marker never came) is a torn tail. So is a bad frame before the
//! last marker when no complete commit follows that marker: a batch is only
//! written once the one before it is synced, so only the last can be torn,
//! and a power loss may have written its marker's page but not an earlier
//! one. A bad frame is damage when, after the first valid marker following
//! it, a complete commit (valid frames ending in a valid marker) follows:
//! a later batch was written, so the bad frame's batch had been synced.
//!
//! Files of the previous release (no header, no markers: `u32` length, `u32`
//! CRC-32 of the JSON, the JSON) are still read: there a frame cut short by
//! the end of the file, or a bad frame followed only by zeros, is the torn tail.

use crate::error::Error;
use crate::journal::Record;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

const MAGIC: [u8; 8] = *b"CONTACTJ";
const VERSION: u32 = 1;
/// Bytes of the header.
pub(super) const HEADER_LEN: u64 = 20;
/// Largest frame body accepted when reading; a longer length field is damage.
pub(super) const MAX_FRAME: usize = 64 << 20;
const KIND_RECORD: u8 = b'R';
const KIND_COMMIT: u8 = b'C';
/// Bytes of a commit marker: length, checksum, kind, offset.
pub(super) const COMMIT_LEN: usize = 17;
/// How much is read at a time when searching past damage.
const CHUNK: usize = 64 << 10;

/// The header of a new file with this salt.
pub(super) fn header(salt: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0; HEADER_LEN as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The frame of one record in a file with this salt.
pub(super) fn record_frame(salt: u32, r: &Record) -> Vec<u8> {
    frame(salt, KIND_RECORD, |body| {
        serde_json::to_writer(body, r).expect("records always serialise")
    })
}

/// The commit marker that starts at byte `at` of a file with this salt.
pub(super) fn commit_frame(salt: u32, at: u64) -> [u8; COMMIT_LEN] {
    let f = frame(salt, KIND_COMMIT, |body| body.extend(at.to_le_bytes()));
    f.try_into().expect("a commit marker has a fixed size")
}

fn frame(salt: u32, kind: u8, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    // Room for a typical result record at once: growing the frame field by
    // field (realloc and copy) was a tenth of the recorder's time.
    let mut f = Vec::with_capacity(512);
    f.extend([0, 0, 0, 0, 0, 0, 0, 0, kind]);
    body(&mut f);
    let len = u32::try_from(f.len() - 8).expect("records are far below 4 GiB");
    f[..4].copy_from_slice(&len.to_le_bytes());
    let crc = checksum(salt, &f[..4], &f[8..]);
    f[4..8].copy_from_slice(&crc.to_le_bytes());
    f
}

fn checksum(salt: u32, len: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(salt);
    h.update(len);
    h.update(body);
    h.finalize()
}

/// Which format a file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Current {
        salt: u32,
    },
    /// The previous release's: to be rewritten in the current one.
    Legacy,
    /// The header itself is damaged: nothing in the file can be checked.
    Unreadable,
}

/// The first bad frame, when it is not a torn tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Damage {
    pub at: u64,
    pub what: String,
}

/// What reading a journal found.
#[derive(Debug)]
pub(super) struct Scan {
    pub format: Format,
    /// The records of complete commits (in a legacy file: of intact frames),
    /// up to the torn tail or the damage.
    pub records: Vec<Record>,
    /// Bytes from the start of the file that hold those records.
    pub kept: u64,
    /// Bytes in the file: `kept..len` is a torn tail, or holds `damage`.
    pub len: u64,
    pub damage: Option<Damage>,
    /// The first bad frame of a tail whose last batch was torn with its
    /// marker intact (its pages reached the disk out of order), if it was.
    pub torn_batch: Option<Damage>,
}

/// Reads a journal of `len` bytes from `r`, one frame at a time; `path`
/// names it in errors. An I/O error, or a file written by a newer release
/// (which must not be trimmed or repaired by this one), is an `Err`.
pub(super) fn scan<R: Read + Seek>(mut r: R, len: u64, path: &Path) -> Result<Scan, Error> {
    let err = |e| Error::file(path, "read the journal", e);
    let mut head = Vec::with_capacity(HEADER_LEN as usize);
    (&mut r)
        .take(HEADER_LEN)
        .read_to_end(&mut head)
        .map_err(err)?;
    if !head.starts_with(&MAGIC) {
        r.seek(SeekFrom::Start(0)).map_err(err)?;
        return scan_legacy(r, len).map_err(err);
    }
    let unreadable = |what: &str| Scan {
        format: Format::Unreadable,
        records: vec![],
        kept: 0,
        len,
        damage: Some(Damage {
            at: 0,
            what: what.into(),
        }),
        torn_batch: None,
    };
    if head.len() < HEADER_LEN as usize {
        return Ok(unreadable("header cut short"));
    }
    let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&head[..16]) != word(16) {
        return Ok(unreadable("header checksum mismatch"));
    }
    if word(8) != VERSION {
        return Err(Error::State(format!(
            "state file {} is in journal format {}, written by a newer contact-server; \
             this one reads format {VERSION}. Run the newer release on it",
            path.display(),
            word(8)
        )));
    }
    scan_current(r, len, word(12)).map_err(err)
}

/// One frame, as read.
enum Frame {
    Record(Record),
    Commit,
    /// Not a valid frame, and why.
    Bad(String),
}

fn scan_current<R: Read + Seek>(mut r: R, len: u64, salt: u32) -> io::Result<Scan> {
    let mut scan = Scan {
        format: Format::Current { salt },
        records: vec![],
        kept: HEADER_LEN,
        len,
        damage: None,
        torn_batch: None,
    };
    let mut batch = vec![];
    let mut at = HEADER_LEN;
    let mut body = vec![];
    while at < len {
        let (frame, size) = read_frame(&mut r, at, len, salt, &mut body)?;
        at += size;
        match frame {
            Frame::Record(record) => batch.push(record),
            Frame::Commit => {
                scan.records.append(&mut batch);
                scan.kept = at;
            }
            Frame::Bad(what) => {
                let bad = Damage {
                    at: at - size,
                    what,
                };
                if let Some(marker) = commit_after(&mut r, bad.at + 1, salt)? {
                    let from = marker + COMMIT_LEN as u64;
                    if complete_commit_from(&mut r, from, len, salt, &mut body)? {
                        scan.damage = Some(bad);
                    } else {
                        scan.torn_batch = Some(bad);
                    }
                }
                break;
            }
        }
    }
    Ok(scan)
}

/// Reads the frame at `at` (`r` is there) into `body`; returns it and its size.
fn read_frame<R: Read>(
    r: &mut R,
    at: u64,
    len: u64,
    salt: u32,
    body: &mut Vec<u8>,
) -> io::Result<(Frame, u64)> {
    let bad = |what: &str| Ok((Frame::Bad(what.into()), 0));
    if len - at < 8 {
        return bad("frame header cut short by the end of the file");
    }
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let n = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if n == 0 {
        return bad("empty frame (unwritten space)");
    }
    if n > MAX_FRAME {
        return bad("impossible record length");
    }
    if len - at - 8 < n as u64 {
        return bad("frame cut short by the end of the file");
    }
    body.resize(n, 0);
    r.read_exact(body)?;
    let size = 8 + n as u64;
    let frame = if checksum(salt, &head[..4], body) != crc {
        Frame::Bad("checksum mismatch".into())
    } else if body[0] == KIND_RECORD {
        match serde_json::from_slice(&body[1..]) {
            Ok(record) => Frame::Record(record),
            Err(e) => Frame::Bad(format!("unreadable record ({e})")),
        }
    } else if body[0] == KIND_COMMIT && body[1..] == at.to_le_bytes() {
        Frame::Commit
    } else {
        Frame::Bad("unknown frame".into())
    };
    Ok((frame, size))
}

/// Whether a complete commit (valid frames from the end of a marker through
/// the next marker) starts at byte `at`, the end of a valid marker, or after
/// any valid marker further on.
fn complete_commit_from<R: Read + Seek>(
    r: &mut R,
    mut at: u64,
    len: u64,
    salt: u32,
    body: &mut Vec<u8>,
) -> io::Result<bool> {
    r.seek(SeekFrom::Start(at))?;
    while at < len {
        let (frame, size) = read_frame(r, at, len, salt, body)?;
        match frame {
            Frame::Record(_) => at += size,
            Frame::Commit => return Ok(true),
            Frame::Bad(_) => match commit_after(r, at + 1, salt)? {
                Some(marker) => {
                    at = marker + COMMIT_LEN as u64;
                    r.seek(SeekFrom::Start(at))?;
                }
                None => return Ok(false),
            },
        }
    }
    Ok(false)
}

/// Where the first valid commit marker from byte `from` on starts, if any.
fn commit_after<R: Read + Seek>(r: &mut R, from: u64, salt: u32) -> io::Result<Option<u64>> {
    r.seek(SeekFrom::Start(from))?;
    // `window[i]` is byte `base + i` of the file; it keeps the last bytes of
    // one chunk, too few for a marker, to be searched with the next.
    let (mut window, mut base) = (Vec::with_capacity(CHUNK + COMMIT_LEN), from);
    loop {
        if r.take(CHUNK as u64).read_to_end(&mut window)? == 0 {
            return Ok(None);
        }
        let found = window.windows(COMMIT_LEN).enumerate().find_map(|(i, w)| {
            let at = base + i as u64;
            (w[..4] == [9, 0, 0, 0] && w[8] == KIND_COMMIT && *w == commit_frame(salt, at))
                .then_some(at)
        });
        if found.is_some() {
            return Ok(found);
        }
        let searched = window.len().saturating_sub(COMMIT_LEN - 1);
        window.drain(..searched);
        base += searched as u64;
    }
}

/// The previous release's format: see the module documentation.
fn scan_legacy<R: Read + Seek>(mut r: R, len: u64) -> io::Result<Scan> {
    let mut scan = Scan {
        format: Format::Legacy,
        records: vec![],
        kept: 0,
        len,
        damage: None,
        torn_batch: None,
    };
    let mut payload = vec![];
    while scan.kept < len {
        let at = scan.kept;
        match read_legacy_frame(&mut r, at, len, &mut payload)? {
            Ok((record, size)) => {
                scan.records.push(record);
                scan.kept += size;
            }
            Err((what, end)) => {
                let torn = match end {
                    Some(end) => zeros_from(&mut r, end)?,
                    None => false,
                };
                if !torn {
                    scan.damage = Some(Damage { at, what });
                }
                break;
            }
        }
    }
    Ok(scan)
}

/// A legacy frame and its size, or what is wrong with it and where it ends
/// when that is known: followed only by zeros, it is a torn tail.
type LegacyFrame = Result<(Record, u64), (String, Option<u64>)>;

fn read_legacy_frame<R: Read>(
    r: &mut R,
    at: u64,
    len: u64,
    payload: &mut Vec<u8>,
) -> io::Result<LegacyFrame> {
    let bad = |what: &str, end: Option<u64>| Ok(Err((what.to_string(), end)));
    if len - at < 8 {
        return bad("frame header cut short by the end of the file", Some(len));
    }
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let n = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if n > MAX_FRAME {
        return bad("impossible record length", None);
    }
    if len - at - 8 < n as u64 {
        return bad("frame cut short by the end of the file", Some(len));
    }
    payload.resize(n, 0);
    r.read_exact(payload)?;
    let end = at + 8 + n as u64;
    if crc32fast::hash(payload) != crc {
        return bad("checksum mismatch", Some(end));
    }
    Ok(match serde_json::from_slice(payload) {
        Ok(record) => Ok((record, end - at)),
        Err(e) => Err((format!("unreadable record ({e})"), Some(end))),
    })
}

/// Whether every byte from `from` to the end is zero.
fn zeros_from<R: Read + Seek>(r: &mut R, from: u64) -> io::Result<bool> {
    r.seek(SeekFrom::Start(from))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(true),
            n if buf[..n].iter().any(|&b| b != 0) => return Ok(false),
            _ => {}
        }
    }
}
