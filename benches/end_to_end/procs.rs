//! The processes a measurement runs: a server whose log is read line by line
//! (to learn its port and when it is ready), clients waited for with their
//! exit status checked, signals, and a process's resident memory. Everything
//! the benchmark reads from `contact-server`'s log is parsed in [`server_log`],
//! so that a changed log line is fixed in one place.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// What a measurement can fail with: a message saying what went wrong and where to look.
pub type Outcome<T> = Result<T, String>;

/// How long a server gets to say it is ready, or to stop.
pub const STARTUP: Duration = Duration::from_secs(60);

/// The lines of `contact-server`'s log that the benchmark reads.
pub mod server_log {
    /// `contact server listening on 127.0.0.1:PORT (...)`: the port.
    pub fn listening_port(line: &str) -> Option<u16> {
        let rest = line.split("listening on ").nth(1)?;
        let addr = rest.split_whitespace().next()?;
        addr.rsplit(':').next()?.parse().ok()
    }

    /// `all N tasks from FILE published`: N.
    pub fn all_published(line: &str) -> Option<u64> {
        let rest = line.split("all ").nth(1)?;
        if !line.ends_with(" published") {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    }

    /// `stats: clients=N ...`: N.
    pub fn stats_clients(line: &str) -> Option<usize> {
        let rest = line.split("stats: clients=").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }

    /// `stats: ... results=N ...`: N.
    pub fn stats_results(line: &str) -> Option<u64> {
        let rest = line.split("stats: clients=").nth(1)?;
        let n = rest.split(" results=").nth(1)?;
        n.split_whitespace().next()?.parse().ok()
    }

    /// `server stopped; N results recorded`: N.
    pub fn results_recorded(line: &str) -> Option<u64> {
        let rest = line.split("server stopped; ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }

    /// The log filter that shows the lines above and nothing per task.
    pub const RUST_LOG: &str = "warn,contact::server=info,contact::producer=info";
}

/// A long-running process (a server) whose stderr (or stdout) lines are
/// copied to a log file and handed to whoever waits for one.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    lines: Receiver<String>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd`, reading its stderr, or its stdout when `from_stdout`
    /// (the other goes to the log file's `.other` twin).
    pub fn start(name: &str, mut cmd: Command, log: &Path, from_stdout: bool) -> Outcome<Daemon> {
        let other = File::create(log.with_extension("other"))
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        if from_stdout {
            cmd.stdout(Stdio::piped()).stderr(other);
        } else {
            cmd.stderr(Stdio::piped()).stdout(other);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        let out: Box<dyn std::io::Read + Send> = if from_stdout {
            Box::new(child.stdout.take().expect("piped"))
        } else {
            Box::new(child.stderr.take().expect("piped"))
        };
        let mut file =
            File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                let _ = tx.send(line);
            }
        });
        Ok(Daemon {
            name: name.to_string(),
            child,
            lines: rx,
            log: log.to_path_buf(),
        })
    }

    /// Waits for the first line for which `parse` gives a value.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Outcome<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = parse(&line) {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} did not log {what} within {timeout:?} (log: {})",
                        self.name,
                        self.log.display()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "{} ended before it logged {what} (log: {})",
                        self.name,
                        self.log.display()
                    ))
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// If the process has ended: a message saying so, naming its log.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        Some(format!(
            "{} exited with {status} (log: {})",
            self.name,
            self.log.display()
        ))
    }

    /// SIGINT, then waits for the exit and its remaining log lines; the
    /// exit status must be 0. Returns those lines.
    pub fn stop(mut self) -> Outcome<Vec<String>> {
        signal(self.pid(), libc::SIGINT);
        let status = wait_with_timeout(&mut self.child, STARTUP)
            .map_err(|e| format!("{}: {e} (log: {})", self.name, self.log.display()))?;
        let rest: Vec<String> = self.lines.iter().collect();
        if !status.success() {
            return Err(format!(
                "{} exited with {status} (log: {})",
                self.name,
                self.log.display()
            ));
        }
        Ok(rest)
    }

    /// Ends a process the benchmark owns and whose exit says nothing (SIGKILL).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A measurement that failed half-way leaves nothing running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for `child`, killing it after `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Outcome<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not exit within {timeout:?}; killed"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Processes started together (the clients of one run), each with its log file.
pub struct Group {
    members: Vec<(String, Child, PathBuf)>,
}

impl Group {
    pub fn new() -> Group {
        Group { members: vec![] }
    }

    /// Starts `cmd` with stdout and stderr to `log`.
    pub fn spawn(&mut self, name: String, mut cmd: Command, log: &Path) -> Outcome<u32> {
        let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        let pid = child.id();
        self.members.push((name, child, log.to_path_buf()));
        Ok(pid)
    }

    /// Sends `sig` to every member.
    pub fn signal_all(&self, sig: libc::c_int) {
        for (_, child, _) in &self.members {
            signal(child.id(), sig);
        }
    }

    /// Waits for every member (at most `timeout` in all); each must exit 0.
    pub fn wait_all(&mut self, timeout: Duration) -> Outcome<()> {
        let deadline = Instant::now() + timeout;
        for (name, child, log) in &mut self.members {
            let left = deadline.saturating_duration_since(Instant::now());
            let status = wait_with_timeout(child, left)
                .map_err(|e| format!("{name}: {e} (log: {})", log.display()))?;
            if !status.success() {
                return Err(format!(
                    "{name} exited with {status}: {} (log: {})",
                    last_line(log),
                    log.display()
                ));
            }
        }
        self.members.clear();
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.members {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last non-empty line of a log, for an error message.
pub fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty log)")
        .to_string()
}

/// Sends `sig` to a process the benchmark started.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid of our own child; no memory is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// A process's memory figure from /proc (`VmRSS:` resident now, `VmHWM:`
/// its peak), in bytes, if it can be read.
pub fn memory_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU time (user + system) a process has used so far, in seconds, if
/// /proc can tell.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_sec > 0).then(|| ticks / per_sec as f64)
}
