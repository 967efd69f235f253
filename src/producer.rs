//! Task producers: the blocking threads that turn a file, standard input or
//! the seed's generator into tasks for the dispatcher. They run on threads of
//! their own so that a slow disk or an idle terminal never touches a gRPC
//! thread, and a slow client never slows them (the dispatcher only appends).
//!
//! With durable state, each line of a regular file gets an idempotency key
//! derived from the file, the line number and the line's text (see
//! [`line_key`]), so that a server restarted on its state does not publish
//! the file's lines again, while an edited or appended line is new.

use crate::dispatch::Dispatcher;
use crate::error::Error;
use crate::shutdown::Shutdown;
use crate::task::{parse_line, NewTask, Published};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest task line accepted; longer lines are reported and skipped.
pub const MAX_TASK_BYTES: usize = 64 * 1024;

/// Where tasks come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskSource {
    /// One task per line of a file, or of standard input for `-`; `@<client> <text>` targets one client.
    Lines(PathBuf),
    /// The seed's generator: `count` tasks `task:<100..200>` every `every`.
    Generate { count: usize, every: Duration },
}

/// A started producer; only the generator is joined at shutdown (a reader may
/// be blocked on a terminal that never speaks again).
pub struct Producer {
    handle: Option<JoinHandle<()>>,
}

impl Producer {
    /// Opens the source (so that a bad path fails at start-up) and starts its thread.
    pub fn start(
        source: &TaskSource,
        dispatcher: Arc<Dispatcher>,
        shutdown: Shutdown,
    ) -> Result<Producer, Error> {
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(Error::Thread)
        };
        match source.clone() {
            TaskSource::Lines(path) => {
                let (lines, input) = open_lines(path, &dispatcher)?;
                spawn(
                    "task-reader",
                    Box::new(move || read_lines(&lines, input, &dispatcher, &shutdown)),
                )?;
                Ok(Producer { handle: None })
            }
            TaskSource::Generate { count, every } => {
                let h = spawn(
                    "task-generator",
                    Box::new(move || generate(count, every, &dispatcher, &shutdown)),
                )?;
                Ok(Producer { handle: Some(h) })
            }
        }
    }

    /// Waits for a generator to notice the shutdown signal.
    pub fn join(self) {
        if let Some(h) = self.handle {
            let _ = h.join();
        }
    }
}

fn generate(count: usize, every: Duration, dispatcher: &Dispatcher, shutdown: &Shutdown) {
    loop {
        let batch = (0..count).map(|_| (None, format!("task:{}", fastrand::u32(100..=200))));
        dispatcher.publish(batch);
        if shutdown.wait_timeout(every) {
            return;
        }
    }
}

/// A source of task lines, as `read_lines` reads it.
struct Lines {
    /// For the log: the path as given, or "standard input".
    name: String,
    /// The canonical path its lines' keys are derived from; `None`: no keys.
    keyed_as: Option<PathBuf>,
}

/// Opens a source of task lines (`-`: standard input).
fn open_lines(
    path: PathBuf,
    dispatcher: &Dispatcher,
) -> Result<(Lines, Box<dyn Read + Send>), Error> {
    if path.as_os_str() == "-" {
        let lines = Lines {
            name: "standard input".into(),
            keyed_as: None,
        };
        return Ok((lines, Box::new(io::stdin())));
    }
    let f = File::open(&path).map_err(|e| Error::file(&path, "read tasks from", e))?;
    // Keys only for a file read again after a restart, and a state that
    // remembers them (the journal, or the shared store of replicas): not a
    // pipe, not --no-state.
    let durable = dispatcher.is_durable() || dispatcher.is_shared();
    let keyed = durable && f.metadata().is_ok_and(|m| m.is_file());
    let lines = Lines {
        name: path.display().to_string(),
        keyed_as: keyed.then(|| fs::canonicalize(&path).unwrap_or_else(|_| path.clone())),
    };
    Ok((lines, Box::new(f)))
}

/// The prefix of the keys [`line_key`] derives.
pub const LINE_KEY_PREFIX: &str = "tasks-from:";

/// The idempotency key of line `line_no` (from 1) of the task file at
/// `path` (its canonical path), whose text without its line ending is
/// `line`: `tasks-from:` and 32 hex digits, the first 128 bits of the
/// SHA-256 of the path's bytes, a NUL byte, the line number as 8 bytes
/// little endian, and the line's bytes. The same line of the same file with
/// the same text has the same key on every start; a line edited, added, or
/// moved (by a line inserted or removed above it) has a new one, and so has
/// every line of the file read under another path.
pub fn line_key(path: &Path, line_no: u64, line: &str) -> String {
    let digest = Sha256::new()
        .chain_update(path.as_os_str().as_bytes())
        .chain_update([0])
        .chain_update(line_no.to_le_bytes())
        .chain_update(line.as_bytes())
        .finalize();
    let mut key = String::with_capacity(LINE_KEY_PREFIX.len() + 32);
    key.push_str(LINE_KEY_PREFIX);
    for b in &digest[..16] {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// What reading a source did so far, for the log.
#[derive(Default)]
struct Tally {
    /// Lines that are tasks.
    tasks: usize,
    published: usize,
    /// Tasks whose key was known: published before.
    skipped: usize,
}

fn read_lines(
    lines: &Lines,
    input: Box<dyn Read + Send>,
    dispatcher: &Dispatcher,
    shutdown: &Shutdown,
) {
    let name = lines.name.as_str();
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line_no = 0u64;
    let mut tally = Tally::default();
    let mut buf = Vec::new();
    loop {
        // Publish every complete line already buffered as one batch; block only when none is.
        let mut batch = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    log::error!(
                        "cannot read tasks from {name}: {e}; no more tasks will be read from it"
                    );
                    publish(lines, batch, dispatcher, &mut tally);
                    return;
                }
            }
            line_no += 1;
            if let Some(task) = task_line(lines, line_no, &buf) {
                batch.push(task);
            }
            if batch.len() >= 1024 || !reader.buffer().contains(&b'\n') {
                break;
            }
        }
        if batch.is_empty() && buf.is_empty() {
            all_read(lines, &tally, dispatcher);
            return;
        }
        publish(lines, batch, dispatcher, &mut tally);
        if shutdown.is_triggered() {
            return;
        }
    }
}

/// Publishes a batch of `lines`' tasks, counting what became of them.
fn publish(lines: &Lines, batch: Vec<NewTask>, dispatcher: &Dispatcher, tally: &mut Tally) {
    tally.tasks += batch.len();
    // A typo in an `@id` line makes a task that waits forever: say so.
    let mut named: Vec<&str> = batch.iter().filter_map(|t| t.target.as_deref()).collect();
    named.sort_unstable();
    named.dedup();
    for id in named.into_iter().filter(|id| !dispatcher.knows(id)) {
        log::warn!(
            "{}: agent {id:?} has never been seen; its tasks wait until it connects (is the id right?)",
            lines.name
        );
    }
    if lines.keyed_as.is_none() {
        let pairs = batch.into_iter().map(|t| (t.target, t.text));
        tally.published += dispatcher.publish(pairs).len();
        return;
    }
    // Not journaled: the server is stopping (logged by the dispatcher).
    for p in dispatcher.publish_new(batch).unwrap_or_default() {
        match p {
            Published::New(_) => tally.published += 1,
            Published::Duplicate { .. } => tally.skipped += 1,
        }
    }
}

/// Logs what reading `lines` to its end did.
fn all_read(lines: &Lines, tally: &Tally, dispatcher: &Dispatcher) {
    let Tally {
        tasks,
        published,
        skipped,
    } = *tally;
    let name = &lines.name;
    if skipped > 0 {
        log::info!(
            "{skipped} of {tasks} tasks from {name} were published before (same line, same text): skipped"
        );
    }
    let retain = dispatcher.config().retain;
    if lines.keyed_as.is_some() && tasks > retain {
        log::warn!(
            "{name} has {tasks} tasks, more than the {retain} kept (--retain): a line is known as published only while its task is kept, so a restart on this state would publish the file again; raise --retain above its length"
        );
    }
    log::info!("all {published} tasks from {name} published");
}

/// Turns one raw input line into a task (with its key when `lines` has
/// keys), or says why it is skipped.
fn task_line(lines: &Lines, line_no: u64, raw: &[u8]) -> Option<NewTask> {
    let name = &lines.name;
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.len() > MAX_TASK_BYTES {
        log::warn!("{name} line {line_no}: task of {} bytes is over the {MAX_TASK_BYTES}-byte limit; skipped", raw.len());
        return None;
    }
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            log::warn!("{name} line {line_no}: not valid UTF-8 ({e}); skipped");
            return None;
        }
    };
    if text.trim().is_empty() {
        return None;
    }
    let (target, task) = match parse_line(text) {
        Ok(t) => t,
        Err(why) => {
            log::error!("{name} line {line_no}: {why}; skipped");
            return None;
        }
    };
    Some(NewTask {
        target,
        text: task,
        key: lines
            .keyed_as
            .as_deref()
            .map(|path| line_key(path, line_no, text)),
        any_of: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::DispatchConfig;
    use std::io::Write;

    fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not met in time"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_file_is_read_line_by_line_skipping_bad_lines() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"one\r\n\n@c two\nbad \xff utf8\n").unwrap();
        f.write_all(&vec![b'x'; MAX_TASK_BYTES + 1]).unwrap();
        f.write_all(b"\nlast-without-newline").unwrap();
        let d = Arc::new(Dispatcher::new(DispatchConfig::default()));
        Producer::start(
            &TaskSource::Lines(f.path().into()),
            d.clone(),
            Shutdown::new(),
        )
        .unwrap();
        wait_for(|| d.counters().produced == 3);
        let (_, feed) = d.attach("c", "p", false, "").unwrap();
        let got: Vec<_> = std::iter::from_fn(|| feed.try_next()).collect();
        let texts: Vec<&str> = got.iter().map(|x| x.task.text.as_str()).collect();
        assert_eq!(texts, vec!["one", "two", "last-without-newline"]);
        assert!(
            got.iter().all(|x| x.task.key.is_none()),
            "no state to remember them: no keys"
        );
    }

    #[test]
    fn a_line_key_is_fixed_by_the_path_the_line_number_and_the_text() {
        let path = Path::new("/srv/tasks.txt");
        let key = line_key(path, 3, "@web-1 uptime");
        // Fixed: a new derivation would publish every file again on upgrade.
        assert_eq!(key, "tasks-from:409bea344bf764a9f57a868ee1482e25");
        assert_eq!(line_key(path, 3, "@web-1 uptime"), key);
        let others = [
            line_key(path, 4, "@web-1 uptime"),
            line_key(path, 3, "@web-2 uptime"),
            line_key(Path::new("/srv/other.txt"), 3, "@web-1 uptime"),
        ];
        assert!(others.iter().all(|k| *k != key), "{others:?}");
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let d = Arc::new(Dispatcher::new(DispatchConfig::default()));
        let err = Producer::start(
            &TaskSource::Lines("/no/such/tasks.txt".into()),
            d,
            Shutdown::new(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("/no/such/tasks.txt"), "{err}");
    }

    #[test]
    fn the_generator_makes_seed_style_batches_until_shutdown() {
        let d = Arc::new(Dispatcher::new(DispatchConfig::default()));
        let shutdown = Shutdown::new();
        let every = Duration::from_millis(10);
        let p = Producer::start(
            &TaskSource::Generate { count: 10, every },
            d.clone(),
            shutdown.clone(),
        )
        .unwrap();
        wait_for(|| d.counters().produced >= 20);
        shutdown.trigger();
        p.join();
        assert_eq!(d.counters().produced % 10, 0);
        let (_, feed) = d.attach("c", "p", false, "").unwrap();
        let t = feed.try_next().unwrap();
        let n: u32 = t.task.text.strip_prefix("task:").unwrap().parse().unwrap();
        assert!((100..=200).contains(&n));
    }
}
