//! What `/proc` says about the server's process and this one: memory
//! (VmRSS), threads, CPU time, open files and sockets.

use std::path::Path;

/// What `/proc` says about a process at one moment (fields it could not read are `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    pub rss_kib: Option<u64>,
    pub threads: Option<u64>,
    pub cpu_secs: Option<f64>,
    pub fds: Option<u64>,
    /// Open sockets (connections, and the listening socket).
    pub sockets: Option<u64>,
}

impl ProcSample {
    /// Reads `/proc/<pid>` (`"self"` for this process).
    pub fn of(pid: &str) -> ProcSample {
        let dir = Path::new("/proc").join(pid);
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        ProcSample {
            rss_kib: status_field(&status, "VmRSS:"),
            threads: status_field(&status, "Threads:"),
            cpu_secs: cpu_ticks(&stat).map(|t| t as f64 / clock_ticks_per_sec()),
            fds: std::fs::read_dir(dir.join("fd"))
                .ok()
                .map(|d| d.count() as u64),
            sockets: open_sockets(&dir),
        }
    }
}

/// How many of a process's open files are sockets.
fn open_sockets(proc_dir: &Path) -> Option<u64> {
    let fds = std::fs::read_dir(proc_dir.join("fd")).ok()?;
    let sockets = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count();
    Some(sockets as u64)
}

/// The number in a `/proc/<pid>/status` line such as `VmRSS:   1234 kB`.
pub fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// User plus system CPU time in clock ticks from `/proc/<pid>/stat` (fields
/// 14 and 15; the command name before them may contain spaces and parentheses).
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Both processes at one moment: the server (when its pid is known) and this one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Samples {
    pub server: ProcSample,
    pub loadgen: ProcSample,
}

impl Samples {
    pub fn take(server_pid: Option<u32>) -> Samples {
        Samples {
            server: server_pid.map_or_else(ProcSample::default, |p| ProcSample::of(&p.to_string())),
            loadgen: ProcSample::of("self"),
        }
    }
}

/// Whether process `pid` is alive (has a `/proc` entry).
pub fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_field_by_field() {
        let status =
            "Name:\tcontact-server\nVmPeak:\t  9999 kB\nVmRSS:\t   12345 kB\nThreads:\t7\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(12345));
        assert_eq!(status_field(status, "Threads:"), Some(7));
        assert_eq!(status_field(status, "VmSwap:"), None);
        // A command name with spaces and parentheses does not shift the fields.
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
        let me = ProcSample::of("self");
        assert!(me.rss_kib.unwrap() > 0 && me.threads.unwrap() >= 1);
        assert!(me.cpu_secs.is_some() && me.fds.unwrap() > 0);
        // Other tests open and close sockets meanwhile: only a lower bound holds.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(ProcSample::of("self").sockets.unwrap() >= 1);
        drop(listener);
        assert_eq!(ProcSample::of("0"), ProcSample::default());
    }
}
