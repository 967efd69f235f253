//! Latency at a fixed offered rate, open loop: a real `contact-server`
//! (default flags and `--results-to`, with the state its caller gives:
//! `--state-dir` for part c, a queue on `--store` for part g) reads its tasks from
//! standard input, and the benchmark writes task `lat-<i>` there at its
//! scheduled time t0 + i/rate, whatever happened to the tasks before it (so
//! a stall shows up as the delay of every task scheduled during it: no
//! coordinated omission). One real `contact-client` (echo) answers them.
//!
//! Each task's times come from the server's results file, one JSON line per
//! result, written only after the result is in the fsync'd journal (or
//! stored in JetStream):
//! - producer → sent: `received_at - latency_ms` (the server wrote the task
//!   to the client's stream) minus the scheduled time;
//! - producer → result back: `received_at` (the server read the client's
//!   result) minus the scheduled time — an upper bound of producer → client,
//!   which is what the target is checked against;
//! - producer → durable: the moment the benchmark, polling the file every
//!   100 µs, reads the line, minus the scheduled time.
//!
//! All are wall-clock (`SystemTime`) on the one machine.

use crate::procs::{Group, Outcome, STARTUP};
use crate::Bench;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long after the last scheduled task its result may take to become durable.
const DRAIN: Duration = Duration::from_secs(60);

/// Per-task latencies of one offered rate, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub rate: u64,
    pub tasks: usize,
    pub sent: Vec<f64>,
    pub back: Vec<f64>,
    pub durable: Vec<f64>,
    /// The rate the schedule actually achieved (tasks / schedule length).
    pub achieved: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Part c: [`measure`] on the embedded journal (`--state-dir`), default flags.
pub fn measure_journal(b: &Bench, rate: u64, secs: f64) -> Outcome<Latencies> {
    let state_dir = b.fresh_dir(&format!("latency-{rate}-state"))?;
    measure(b, rate, secs, |cmd| {
        cmd.arg("--state-dir").arg(&state_dir);
    })
}

/// Offers `rate` tasks/s for `secs` seconds to a server with the flags
/// `state` adds (where it keeps its state, its dispatch mode); see the
/// module documentation.
pub fn measure(
    b: &Bench,
    rate: u64,
    secs: f64,
    state: impl FnOnce(&mut Command),
) -> Outcome<Latencies> {
    let tag = b.next_tag(&format!("latency-{rate}"));
    let results = b.work.join(format!("{tag}-results.jsonl"));
    let (mut server, port) = b.contact_server(&tag, Stdio::piped(), |cmd| {
        cmd.args(["--tasks-from", "-", "--results-to"])
            .arg(&results);
        state(cmd);
    })?;
    let mut stdin = server.child.stdin.take().expect("piped");
    let mut clients = Group::new();
    let mut client = Command::new(b.bin("contact-client"));
    client
        .args(["--server", &format!("127.0.0.1:{port}"), "--id", "latency"])
        .env("RUST_LOG", "warn");
    clients.spawn(
        "contact-client".into(),
        client,
        &b.log(&format!("{tag}-client")),
    )?;

    let mut tail = Tail::open(&results)?;
    // Warm up: the client is connected and a result has gone all the way.
    writeln!(stdin, "warmup").map_err(|e| format!("writing to contact-server: {e}"))?;
    let deadline = Instant::now() + STARTUP;
    while tail.lines()?.is_empty() {
        if Instant::now() > deadline {
            return Err(format!("no warm-up result in {}", results.display()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    let n = ((rate as f64) * secs).round().max(1.0) as usize;
    let interval = 1.0 / rate as f64;
    let writer = std::thread::spawn(move || -> Outcome<(f64, f64, std::process::ChildStdin)> {
        let t0 = Instant::now();
        let t0_unix = unix_now();
        let mut next = 0usize;
        let mut line = String::new();
        while next < n {
            let due = ((t0.elapsed().as_secs_f64() / interval) as usize + 1).min(n);
            if due > next {
                line.clear();
                for i in next..due {
                    line.push_str(&format!("lat-{i}\n"));
                }
                stdin
                    .write_all(line.as_bytes())
                    .map_err(|e| format!("writing tasks to contact-server: {e}"))?;
                next = due;
            }
            let wake = t0 + Duration::from_secs_f64(next as f64 * interval);
            let now = Instant::now();
            if wake > now {
                std::thread::sleep(wake - now);
            }
        }
        let achieved = n as f64 / t0.elapsed().as_secs_f64().max(interval);
        // Handed back: the pipe stays open until the results are in.
        Ok((t0_unix, achieved, stdin))
    });

    let mut seen: HashMap<usize, (f64, f64, f64)> = HashMap::with_capacity(n);
    let mut last_progress = Instant::now();
    while seen.len() < n {
        let lines = tail.lines()?;
        let now = unix_now();
        if lines.is_empty() {
            if last_progress.elapsed() > DRAIN {
                return Err(format!(
                    "{} of {n} results became durable in {} (none for {DRAIN:?}): tasks or results were lost",
                    seen.len(),
                    results.display()
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        last_progress = Instant::now();
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(&l)
                .map_err(|e| format!("{}: not a JSON line ({e}): {l}", results.display()))?;
            let Some(i) = v["task"]
                .as_str()
                .and_then(|t| t.strip_prefix("lat-"))
                .and_then(|i| i.parse::<usize>().ok())
            else {
                continue;
            };
            let received = v["received_at"].as_f64().unwrap_or(f64::NAN);
            let latency = v["latency_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
            seen.insert(i, (received - latency, received, now));
        }
    }
    let (t0_unix, achieved, stdin) = writer
        .join()
        .map_err(|_| "the task writer panicked".to_string())??;
    let mut out = Latencies {
        rate,
        tasks: n,
        achieved,
        ..Default::default()
    };
    for (i, (sent, back, durable)) in seen {
        let scheduled = t0_unix + i as f64 * interval;
        out.sent.push((sent - scheduled) * 1000.0);
        out.back.push((back - scheduled) * 1000.0);
        out.durable.push((durable - scheduled) * 1000.0);
    }
    if out.back.iter().any(|x| x.is_nan()) {
        return Err(format!(
            "{}: results without received_at or latency_ms",
            results.display()
        ));
    }
    drop(stdin);
    drop(clients);
    server.kill();
    Ok(out)
}

/// Reads the complete lines appended to a file since the last call.
struct Tail {
    file: File,
    partial: Vec<u8>,
}

impl Tail {
    fn open(path: &Path) -> Outcome<Tail> {
        // The server creates the file when it starts; wait for it briefly.
        let deadline = Instant::now() + STARTUP;
        loop {
            match File::open(path) {
                Ok(file) => {
                    return Ok(Tail {
                        file,
                        partial: vec![],
                    })
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("cannot open {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn lines(&mut self) -> Outcome<Vec<String>> {
        let mut buf = vec![];
        self.file
            .read_to_end(&mut buf)
            .map_err(|e| format!("reading the results file: {e}"))?;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(vec![]);
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        Ok(String::from_utf8_lossy(&complete)
            .lines()
            .map(str::to_string)
            .collect())
    }
}
