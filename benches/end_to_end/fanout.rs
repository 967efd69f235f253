//! Fan-out to a fleet: `contact-load` (the load generator, a binary of its
//! own) holds thousands of agents on one `contact-server` and reports each
//! phase — `idle`, `attach` (with the server's memory per agent),
//! `broadcast` (one task received by all, all results acknowledged, i.e.
//! durable), `disconnect` and `reconnect` (all dial again after a mass
//! disconnect) — as one JSON object per line on its stdout. It publishes its
//! tasks by writing lines to the FIFO the server reads (`--tasks-from`),
//! which the benchmark makes and holds open so that the server neither
//! blocks opening it nor sees its end. This module only starts them and
//! reads those lines: how `contact-load` is called and what it prints are in
//! [`load_command`], [`parse_phases`] and [`TARGETS`], and nowhere else.

use crate::procs::{memory_bytes, wait_with_timeout, Outcome};
use crate::Bench;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One phase as `contact-load` reported it: its name, whether it completed
/// for every agent, and every number it gave.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub complete: bool,
    pub values: Vec<(String, f64)>,
}

/// What the fan-out step found.
pub enum Fanout {
    Skipped(String),
    Measured { agents: u64, phases: Vec<Phase> },
}

/// The command line of `contact-load` against a server on `port` (pid
/// `pid`) that reads its tasks from `fifo`.
fn load_command(bin: &Path, port: u16, pid: u32, fifo: &Path, agents: u64) -> Command {
    let mut c = Command::new(bin);
    c.args(["--server", &format!("127.0.0.1:{port}")])
        .arg("--tasks-to")
        .arg(fifo)
        .args(["--server-pid", &pid.to_string()])
        .args(["--agents", &agents.to_string()]);
    c
}

/// `{"phase": NAME, "complete": BOOL, KEY: NUMBER, ...}` per line; other
/// lines (its table on stderr) are ignored.
fn parse_phases(output: &str) -> Vec<Phase> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let obj = v.as_object()?;
            let name = obj.get("phase")?.as_str()?.to_string();
            let complete = obj.get("complete").and_then(|c| c.as_bool()) != Some(false);
            let values = obj
                .iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect();
            Some(Phase {
                name,
                complete,
                values,
            })
        })
        .collect()
}

/// The table's columns: (heading, the number `contact-load` reports).
pub const COLUMNS: &[(&str, &str)] = &[
    ("received", "received"),
    ("all received (s)", "received_secs"),
    ("p50 (s)", "received_p50_secs"),
    ("acknowledged", "acknowledged"),
    ("all acknowledged (s)", "acknowledged_secs"),
    ("server RSS (KiB)", "server_rss_kib"),
    ("server CPU (s)", "server_cpu_secs"),
];

/// The summary under the table: (what, phase, the number reported).
pub const NOTES: &[(&str, &str, &str)] = &[
    ("connections", "attach", "connections"),
    ("server KiB per agent", "attach", "server_rss_per_agent_kib"),
    (
        "server KiB per connection",
        "attach",
        "server_rss_per_connection_kib",
    ),
    ("server peak RSS (KiB)", PEAK, "peak_rss_kib"),
];

/// The phase the benchmark adds: the server's peak memory, read by itself.
const PEAK: &str = "server peak";

/// The fan-out targets: (target, the phase and number
/// `contact-load` reports for it, the bound it must stay under, its unit).
pub const TARGETS: &[(&str, &str, &str, f64, &str)] = &[
    (
        "10,000 agents: a broadcast reaches all in < 1 s",
        "broadcast",
        "received_secs",
        1.0,
        "s",
    ),
    (
        "10,000 agents: all results durable in < 2 s",
        "broadcast",
        "acknowledged_secs",
        2.0,
        "s",
    ),
    (
        "10,000 agents: all back within 10 s after a mass disconnect",
        "reconnect",
        "received_secs",
        10.0,
        "s",
    ),
    (
        "server memory < 64 KiB per idle connected agent",
        "attach",
        "server_rss_per_agent_kib",
        64.0,
        "KiB",
    ),
];

/// `phase`'s value of `key`; `None` when not reported, or when the phase
/// did not complete for every agent (then the target is not met).
pub fn value(phases: &[Phase], phase: &str, key: &str) -> Option<Result<f64, String>> {
    let p = phases.iter().find(|p| p.name == phase)?;
    if !p.complete {
        return Some(Err(format!("{phase} incomplete")));
    }
    p.get(key).map(Ok)
}

impl Phase {
    /// Whether `contact-load` reported it (not the benchmark's own reading).
    pub fn is_load_phase(&self) -> bool {
        self.name != PEAK
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// Part d: [`measure`] on the embedded journal (`--state-dir`).
pub fn measure_journal(b: &Bench, agents: u64) -> Outcome<Fanout> {
    let state_dir = b.fresh_dir("fanout-state")?;
    measure(b, agents, |cmd| {
        cmd.arg("--state-dir").arg(&state_dir);
    })
}

/// Runs `contact-load` with `agents` agents against a fresh server that
/// keeps its state where `state` says, or says why not.
pub fn measure(b: &Bench, agents: u64, state: impl FnOnce(&mut Command)) -> Outcome<Fanout> {
    let load = b.bin("contact-load");
    if !load.exists() {
        return Ok(Fanout::Skipped("skipped: contact-load not built".into()));
    }
    let tag = b.next_tag("fanout");
    let fifo = b.work.join(format!("{tag}-tasks.fifo"));
    make_fifo(&fifo)?;
    // Held open (read and write) until the end: see the module documentation.
    let _held: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .map_err(|e| format!("cannot open {}: {e}", fifo.display()))?;
    let (server, port) = b.contact_server(&tag, Stdio::null(), |cmd| {
        cmd.arg("--tasks-from").arg(&fifo);
        state(cmd);
    })?;
    let out = b.log(&format!("{tag}-load"));
    let log = File::create(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut child = load_command(&load, port, server.pid(), &fifo, agents)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", load.display()))?;
    let status = wait_with_timeout(&mut child, Duration::from_secs(900))
        .map_err(|e| format!("contact-load: {e} (output: {})", out.display()))?;
    // Ours, whatever contact-load reports: the server's peak over its life.
    let peak_rss = memory_bytes(server.pid(), "VmHWM:").unwrap_or(0) as f64;
    server.stop()?;
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut phases = parse_phases(&text);
    // A phase that did not complete is a measurement (a target missed);
    // no phase at all is a failure to measure.
    if phases.is_empty() {
        return Err(format!(
            "contact-load exited with {status} and reported no phase (output: {})",
            out.display()
        ));
    }
    phases.push(Phase {
        name: PEAK.into(),
        complete: true,
        values: vec![("peak_rss_kib".into(), peak_rss / 1024.0)],
    });
    Ok(Fanout::Measured { agents, phases })
}

fn make_fifo(path: &Path) -> Outcome<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", path.display()))?;
    // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(format!(
            "cannot make the FIFO {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
