//! Task producers: the blocking threads that turn a file, standard input or
//! the seed's generator into tasks for the dispatcher. They run on threads of
//! their own so that a slow disk or an idle terminal never touches a gRPC
//! thread, and a slow client never slows them (the dispatcher only appends).

use crate::dispatch::Dispatcher;
use crate::error::Error;
use crate::shutdown::Shutdown;
use crate::task::parse_line;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;
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
                let (name, input): (String, Box<dyn Read + Send>) = if path.as_os_str() == "-" {
                    ("standard input".into(), Box::new(io::stdin()))
                } else {
                    let f =
                        File::open(&path).map_err(|e| Error::file(&path, "read tasks from", e))?;
                    (path.display().to_string(), Box::new(f))
                };
                spawn(
                    "task-reader",
                    Box::new(move || read_lines(&name, input, &dispatcher, &shutdown)),
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

fn read_lines(
    name: &str,
    input: Box<dyn Read + Send>,
    dispatcher: &Dispatcher,
    shutdown: &Shutdown,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, input);
    let mut line_no = 0u64;
    let mut published = 0usize;
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
                    dispatcher.publish(batch);
                    return;
                }
            }
            line_no += 1;
            if let Some(task) = task_line(name, line_no, &buf) {
                batch.push(task);
            }
            if batch.len() >= 1024 || !reader.buffer().contains(&b'\n') {
                break;
            }
        }
        if batch.is_empty() && buf.is_empty() {
            log::info!("all {published} tasks from {name} published");
            return;
        }
        published += dispatcher.publish(batch).len();
        if shutdown.is_triggered() {
            return;
        }
    }
}

/// Turns one raw input line into a task, or says why it is skipped.
fn task_line(name: &str, line_no: u64, raw: &[u8]) -> Option<(Option<String>, String)> {
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
    Some(parse_line(text))
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
        let texts: Vec<String> = std::iter::from_fn(|| feed.try_next())
            .map(|x| x.task.text.clone())
            .collect();
        assert_eq!(texts, vec!["one", "two", "last-without-newline"]);
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
