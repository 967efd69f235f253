//! `ResultsReader`: reads the results file (`--results-to`) for the admin
//! API's `WatchResults`, from a sequence number on, and follows it as the
//! recorder appends — the durable record, not a memory buffer, so a reader
//! that reconnects with the last number it saw misses nothing the file
//! still holds. One thread of ours per reader; the file's lines are only
//! written once they are in the journal, and never torn (see `recorder`).

use crate::proto::admin::ResultEvent;
use crate::results::ResultRecord;
use crate::shutdown::Shutdown;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

/// How often a follower looks for new lines at the end of the file.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Where a reader starts and whether it goes on.
#[derive(Debug, Clone, Copy)]
pub struct WatchFrom {
    /// The first sequence number wanted; 0: only results recorded from now.
    pub seq: u64,
    pub follow: bool,
}

/// Reads `path` as `from` says, handing each result to `send` until it
/// returns false or `gone` (checked while waiting for new lines) says the
/// reader left, the file ends (without `follow`) or `stop` fires. Errors
/// name the file.
pub fn read_results(
    path: &Path,
    from: WatchFrom,
    stop: &Shutdown,
    gone: impl Fn() -> bool,
    mut send: impl FnMut(ResultEvent) -> bool,
) -> Result<(), String> {
    let name = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = BufReader::new(File::open(path).map_err(name)?);
    if from.seq == 0 {
        f.seek(SeekFrom::End(0)).map_err(name)?;
    }
    let mut line = String::new();
    loop {
        let n = f.read_line(&mut line).map_err(name)?;
        if n > 0 && line.ends_with('\n') {
            if let Ok(r) = serde_json::from_str::<ResultRecord>(&line) {
                if r.seq.is_some_and(|s| s >= from.seq) && !send(event(r)) {
                    return Ok(());
                }
            }
            line.clear();
            continue;
        }
        // At the end (perhaps inside a line still being written).
        if !from.follow || gone() || stop.wait_timeout(POLL_EVERY) {
            return Ok(());
        }
    }
}

/// A recorded result as `WatchResults` sends it.
pub fn event(r: ResultRecord) -> ResultEvent {
    ResultEvent {
        seq: r.seq.unwrap_or(0),
        task_id: r.task_id.unwrap_or(0),
        task: r.task.unwrap_or_default(),
        client: r.client,
        ok: r.ok,
        output: r.output,
        attempt: r.attempt,
        accepted: r.accepted,
        stale: r.stale,
        retry: r.retry,
        received_at: r.received_at,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(seq: u64, client: &str) -> String {
        format!(
            "{{\"task_id\":{seq},\"task\":\"t\",\"client\":\"{client}\",\"ok\":true,\"output\":\"o\",\"latency_ms\":null,\"attempt\":1,\"stale\":false,\"retry\":false,\"accepted\":true,\"received_at\":1.0,\"seq\":{seq}}}\n"
        )
    }

    #[test]
    fn a_reader_starts_at_its_number_and_follows_new_lines_including_a_line_written_in_two_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let mut f = File::create(&path).unwrap();
        for s in 1..=3 {
            f.write_all(line(s, "a").as_bytes()).unwrap();
        }
        let stop = Shutdown::new();
        let mut seen = vec![];
        read_results(
            &path,
            WatchFrom {
                seq: 2,
                follow: false,
            },
            &stop,
            || false,
            |e| {
                seen.push(e.seq);
                true
            },
        )
        .unwrap();
        assert_eq!(seen, [2, 3]);

        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                read_results(
                    &path,
                    WatchFrom {
                        seq: 3,
                        follow: true,
                    },
                    &stop,
                    || false,
                    |e| tx.send(e.seq).is_ok(),
                )
            })
        };
        assert_eq!(rx.recv().unwrap(), 3);
        let four = line(4, "b");
        let (head, tail) = four.split_at(20);
        f.write_all(head.as_bytes()).unwrap();
        f.flush().unwrap();
        std::thread::sleep(POLL_EVERY * 2);
        f.write_all(tail.as_bytes()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 4);
        stop.trigger();
        reader.join().unwrap().unwrap();
        let missing = dir.path().join("nope");
        let from = WatchFrom {
            seq: 1,
            follow: false,
        };
        let err = read_results(&missing, from, &stop, || false, |_| true);
        assert!(err.unwrap_err().contains("nope"));
    }
}
