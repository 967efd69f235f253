//! Fan-out to a fleet: `contact-load` (the load generator, a binary of its
//! own) holds thousands of agents on one `contact-server` and reports each
//! phase — attach, one broadcast task received by all and its results
//! durable, server memory per agent, a mass disconnect and reconnect — as one
//! JSON object per line on its stdout. This module only starts it and reads
//! those lines: how it is called and what it prints are in
//! [`load_command`], [`parse_phases`] and [`TARGETS`], and nowhere else.

use crate::procs::{memory_bytes, Group, Outcome};
use crate::Bench;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One phase as `contact-load` reported it: its name and every number it gave.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub values: Vec<(String, f64)>,
}

impl Phase {
    fn get(&self, key: &str) -> Option<f64> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// What the fan-out step found.
pub enum Fanout {
    Skipped(String),
    Measured { agents: u64, phases: Vec<Phase> },
}

/// The command line of `contact-load` against a server on `port` whose pid is `pid`.
fn load_command(bin: &Path, port: u16, pid: u32, agents: u64) -> Command {
    let mut c = Command::new(bin);
    c.args(["--server", &format!("127.0.0.1:{port}")])
        .args(["--agents", &agents.to_string()])
        .args(["--server-pid", &pid.to_string()])
        .args(["--json"]);
    c
}

/// `{"phase": NAME, KEY: NUMBER, ...}` per line; other lines are ignored.
fn parse_phases(stdout: &str) -> Vec<Phase> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let obj = v.as_object()?;
            let name = obj.get("phase")?.as_str()?.to_string();
            let values = obj
                .iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect();
            Some(Phase { name, values })
        })
        .collect()
}

/// Runs `contact-load` with `agents` agents against a fresh server, or says why not.
pub fn measure(b: &Bench, agents: u64) -> Outcome<Fanout> {
    let load = b.bin("contact-load");
    if !load.exists() {
        return Ok(Fanout::Skipped("skipped: contact-load not built".into()));
    }
    let tag = b.next_tag("fanout");
    let state_dir = b.fresh_dir(&format!("{tag}-state"))?;
    let (server, port) = b.contact_server(&tag, Stdio::piped(), |cmd| {
        cmd.args(["--tasks-from", "-", "--state-dir"])
            .arg(&state_dir);
    })?;
    let idle_rss = memory_bytes(server.pid(), "VmRSS:").unwrap_or(0) as f64;
    let out = b.log(&format!("{tag}-load"));
    let mut group = Group::new();
    group.spawn(
        "contact-load".into(),
        load_command(&load, port, server.pid(), agents),
        &out,
    )?;
    group.wait_all(Duration::from_secs(600))?;
    // Ours, whatever contact-load reports: the server's peak over its idle size.
    let peak_rss = memory_bytes(server.pid(), "VmHWM:").unwrap_or(0) as f64;
    server.stop()?;
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut phases = parse_phases(&text);
    if phases.is_empty() {
        return Err(format!(
            "contact-load printed no phase as a JSON line (output: {})",
            out.display()
        ));
    }
    phases.push(Phase {
        name: "server memory (read by the benchmark)".into(),
        values: vec![
            ("idle_rss_bytes".into(), idle_rss),
            ("peak_rss_bytes".into(), peak_rss),
            (
                "peak_growth_per_agent_bytes".into(),
                (peak_rss - idle_rss) / agents as f64,
            ),
        ],
    });
    Ok(Fanout::Measured { agents, phases })
}

/// The fan-out targets: (target, the number `contact-load` reports
/// for it, the bound it must stay under, its unit).
pub const TARGETS: &[(&str, &str, f64, &str)] = &[
    (
        "10,000 agents: a broadcast reaches all in < 1 s",
        "all_received_secs",
        1.0,
        "s",
    ),
    (
        "10,000 agents: all results durable in < 2 s",
        "all_durable_secs",
        2.0,
        "s",
    ),
    (
        "10,000 agents: all back within 10 s after a mass disconnect",
        "all_back_secs",
        10.0,
        "s",
    ),
    (
        "server memory < 64 KiB per idle connected agent",
        "rss_per_agent_bytes",
        65536.0,
        "bytes",
    ),
];

/// The first phase's value of `key`.
pub fn value(phases: &[Phase], key: &str) -> Option<f64> {
    phases.iter().find_map(|p| p.get(key))
}
