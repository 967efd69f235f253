//! Task handlers: what a client does with a task. `echo` is the seed's
//! behaviour; `exec` runs an operator-chosen program, which is how `contact`
//! pushes commands to agents. The program is run directly (no shell), with
//! the task text as its last argument, so a task can never inject shell syntax.

use crate::error::Error;
use crossbeam_channel::RecvTimeoutError;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Output kept from a command, so one chatty task cannot flood the server.
pub const DEFAULT_MAX_OUTPUT: usize = 16 * 1024;

/// Exit status with which an `--exec` command refuses a task and asks for it
/// to be delivered again (`EX_TEMPFAIL` from sysexits.h).
pub const EXIT_RETRY: i32 = 75;

/// What a handler concluded about one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ok: bool,
    /// The task was refused and should be delivered again.
    pub retry: bool,
    pub output: String,
}

/// How a client handles tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    /// Answer `client received task: <task>`, as the seed's client does.
    Echo,
    /// Run `program args... <task>`; exit status 0 is success, [`EXIT_RETRY`]
    /// a refusal, anything else a failure; stdout (trimmed, capped at
    /// `max_output` bytes) is the output.
    Exec {
        program: String,
        args: Vec<String>,
        max_output: usize,
        /// Longest run: then the command's whole process group is killed.
        timeout: Option<Duration>,
    },
}

/// After a timeout, how long the process group has between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

impl Handler {
    /// Parses an `--exec` command line (shell-style quoting, no shell features).
    pub fn exec(command: &str, max_output: usize) -> Result<Handler, Error> {
        let mut words = shell_words::split(command)
            .map_err(|e| Error::Usage(format!("--exec {command:?}: {e}")))?
            .into_iter();
        let program = words
            .next()
            .ok_or_else(|| Error::Usage("--exec needs a command".into()))?;
        Ok(Handler::Exec {
            program,
            args: words.collect(),
            max_output,
            timeout: None,
        })
    }

    /// Checks that the program of an `Exec` handler can be run now: a path
    /// to an executable file, or a name found as one on `PATH`. For a
    /// client's start-up, so that a typo is a usage error rather than a
    /// fleet of tasks failing (it may still vanish later: see [`Handler::handle`]).
    pub fn check_runnable(&self) -> Result<(), Error> {
        let Handler::Exec { program, .. } = self else {
            return Ok(());
        };
        let path = std::env::var_os("PATH").unwrap_or_default();
        find_program(program, &path)
            .map(|_| ())
            .map_err(|why| Error::Usage(format!("--exec: cannot run {program:?}: {why}")))
    }

    /// The same handler with a time limit for each command (`--exec-timeout`).
    pub fn with_timeout(self, limit: Option<Duration>) -> Handler {
        match self {
            Handler::Exec {
                program,
                args,
                max_output,
                ..
            } => Handler::Exec {
                program,
                args,
                max_output,
                timeout: limit,
            },
            echo => echo,
        }
    }

    /// Handles one task; failures of the command become a failed outcome,
    /// never an error. A command that cannot be started at all (its program
    /// is gone, or no process can be made) is a refusal: the task never ran,
    /// so it is delivered again, to another agent if there is one.
    pub fn handle(&self, task: &str) -> Outcome {
        match self {
            Handler::Echo => Outcome {
                ok: true,
                retry: false,
                output: format!("client received task: {task}"),
            },
            Handler::Exec {
                program,
                args,
                max_output,
                timeout,
            } => run(program, args, task, *max_output, *timeout),
        }
    }
}

fn run(
    program: &str,
    args: &[String],
    task: &str,
    max_output: usize,
    timeout: Option<Duration>,
) -> Outcome {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg(task)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group: a Ctrl-C meant for the client must not kill the
    // task in hand, which the client finishes and reports before exiting.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log::error!("cannot run {program}: {e}; refusing the task so that it goes elsewhere");
            return Outcome {
                ok: false,
                retry: true,
                output: format!("cannot run {program} on this agent: {e}"),
            };
        }
    };
    // Both pipes are read on threads of their own, keeping at most
    // `max_output` (+1, to know it was cut) and draining the rest, so the
    // child never blocks on a full pipe and a chatty one cannot fill memory.
    let stdout = child.stdout.take().map(|p| drain(p, max_output));
    let stderr = child.stderr.take().map(|p| drain(p, max_output));
    // The watchdog: past the timeout the whole process group (the command and
    // whatever it started) gets SIGTERM, and after KILL_GRACE SIGKILL, even if
    // the command itself has exited by then.
    let group = child.id() as i32;
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    let watchdog = timeout.map(|limit| {
        std::thread::spawn(move || {
            // The sender is dropped (disconnected) once the command is over.
            if done_rx.recv_timeout(limit) != Err(RecvTimeoutError::Timeout) {
                return false;
            }
            // SAFETY: killpg only sends signals. The group's leader is not
            // reaped until this thread is joined (see exited_unreaped), so
            // its id cannot have been reused by another group.
            unsafe { libc::killpg(group, libc::SIGTERM) };
            std::thread::sleep(KILL_GRACE);
            unsafe { libc::killpg(group, libc::SIGKILL) };
            true
        })
    });
    exited_unreaped(group);
    drop(done_tx);
    let timed_out = watchdog.is_some_and(|w| w.join().unwrap_or(false));
    let status = child.wait();
    // A process that left the group (setsid) may still hold a pipe: what it
    // wrote so far is kept, and it is not waited for.
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    let status = match status {
        Ok(s) => s,
        Err(e) => return failed(format!("cannot wait for {program}: {e}")),
    };
    if timed_out {
        let limit = timeout.unwrap_or_default().as_secs_f64();
        return failed(format!(
            "timed out after {limit}s (--exec-timeout): its process group was killed"
        ));
    }
    let out = capped(&stdout, max_output);
    if status.success() {
        return Outcome {
            ok: true,
            retry: false,
            output: out,
        };
    }
    let detail = if out.is_empty() {
        capped(&stderr, max_output)
    } else {
        out
    };
    let why = match status.code() {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    };
    let output = if detail.is_empty() {
        why
    } else {
        format!("{why}: {detail}")
    };
    Outcome {
        ok: false,
        retry: status.code() == Some(EXIT_RETRY),
        output,
    }
}

/// How long the pipes are read after the command exited (for output still
/// buffered by processes it started).
const PIPE_LINGER: Duration = Duration::from_secs(2);

/// Reads a pipe to its end on a thread, keeping the first `max + 1` bytes.
fn drain(mut pipe: impl Read + Send + 'static, max: usize) -> crossbeam_channel::Receiver<Vec<u8>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = (max + 1).saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

/// What a pipe reader kept, waiting at most [`PIPE_LINGER`] for its end.
fn collect(reader: Option<crossbeam_channel::Receiver<Vec<u8>>>) -> Vec<u8> {
    reader
        .and_then(|r| r.recv_timeout(PIPE_LINGER).ok())
        .unwrap_or_default()
}

/// Waits for process `pid` to exit without reaping it, so that its id (and
/// its group's) stays reserved until we reap it with `wait`.
fn exited_unreaped(pid: i32) {
    loop {
        // SAFETY: waitid with WNOWAIT only observes the child's state.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Where `program` is, as `execvp` would find it: a name with a slash is a
/// path; any other name is looked up in the directories of `path`. It must be
/// a regular file that someone may execute.
fn find_program(program: &str, path: &std::ffi::OsStr) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return match std::fs::metadata(&p) {
            Err(e) => Err(e.to_string()),
            Ok(_) if runnable(&p) => Ok(p),
            Ok(m) if m.is_dir() => Err("it is a directory".into()),
            Ok(_) => Err("it is not executable".into()),
        };
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| runnable(p))
        .ok_or_else(|| "no executable of that name on PATH".into())
}

fn failed(output: String) -> Outcome {
    Outcome {
        ok: false,
        retry: false,
        output,
    }
}

/// Trimmed, lossily decoded, at most `max` bytes (cut on a character
/// boundary, marked; the reader kept only `max + 1` bytes, so how much was
/// cut is not known).
fn capped(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated]", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_answers_like_the_seed() {
        assert_eq!(
            Handler::Echo.handle("task:150").output,
            "client received task: task:150"
        );
    }

    #[test]
    fn exec_passes_the_task_as_last_argument_without_a_shell() {
        let h = Handler::exec("echo 'a b'", 100).unwrap();
        assert_eq!(
            h.handle("$(rm -rf /); x"),
            Outcome {
                ok: true,
                retry: false,
                output: "a b $(rm -rf /); x".into()
            }
        );
    }

    #[test]
    fn exec_failures_carry_status_and_stderr() {
        let h = Handler::exec("sh -c 'echo oops >&2; exit 3' sh", 100).unwrap();
        assert_eq!(
            h.handle("t"),
            Outcome {
                ok: false,
                retry: false,
                output: "exit status 3: oops".into()
            }
        );
        let refuse = Handler::exec("sh -c 'echo busy; exit 75' sh", 100).unwrap();
        assert_eq!(
            refuse.handle("t"),
            Outcome {
                ok: false,
                retry: true,
                output: "exit status 75: busy".into()
            }
        );
        // A program that cannot be started: the task never ran, so it is refused.
        let missing = Handler::exec("/no/such/program", 100).unwrap().handle("t");
        assert!(
            !missing.ok && missing.retry && missing.output.contains("/no/such/program"),
            "{missing:?}"
        );
    }

    #[test]
    fn exec_output_is_capped() {
        let h = Handler::exec("sh -c 'yes x | head -c 5000' sh", 10).unwrap();
        let o = h.handle("t");
        assert!(
            o.ok && o.output.starts_with("x\nx\nx\nx\nx") && o.output.contains("truncated"),
            "{o:?}"
        );
    }

    /// Waits up to 10 s for the process whose pid is in `pidfile` to stop
    /// running (gone, or a zombie waiting to be reaped); fails with `survived`.
    fn wait_gone(pidfile: &std::path::Path, survived: &str) {
        let pid = std::fs::read_to_string(pidfile).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let dead = || match std::fs::read_to_string(&stat) {
            Err(_) => true,
            Ok(s) => s
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !dead() {
            assert!(std::time::Instant::now() < deadline, "{survived}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_its_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        // The command starts a grandchild and waits for it.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let h = Handler::exec("sh -c", 100)
            .unwrap()
            .with_timeout(Some(Duration::from_millis(300)));
        let started = std::time::Instant::now();
        let o = h.handle(&script);
        assert!(!o.ok && !o.retry && o.output.contains("timed out"), "{o:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        wait_gone(&pidfile, "the grandchild survived the timeout");
        // A quick command is not affected.
        let quick = Handler::exec("echo", 100)
            .unwrap()
            .with_timeout(Some(Duration::from_secs(5)));
        assert!(quick.handle("hi").ok);
    }

    #[test]
    fn a_timeout_also_kills_what_ignores_sigterm_and_output_is_read_capped() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("stubborn.pid");
        // A background process that ignores SIGTERM; the command itself exits on it.
        let script = format!(
            "sh -c 'trap \"\" TERM; sleep 30' & echo $! > {}; sleep 30",
            pidfile.display()
        );
        let h = Handler::exec("sh -c", 100)
            .unwrap()
            .with_timeout(Some(Duration::from_millis(300)));
        let o = h.handle(&script);
        assert!(o.output.contains("timed out"), "{o:?}");
        wait_gone(&pidfile, "the SIGTERM-proof process survived");
        // 50 MB of output: kept to the cap, without holding it all.
        let chatty =
            Handler::exec("sh -c 'head -c 50000000 /dev/zero | tr \"\\0\" x' sh", 10).unwrap();
        let o = chatty.handle("t");
        assert!(
            o.ok && o.output.starts_with("xxxxxxxxxx…[truncated"),
            "{:?}",
            &o.output[..40.min(o.output.len())]
        );
    }

    #[test]
    fn bad_exec_commands_are_usage_errors() {
        assert!(matches!(Handler::exec("", 10), Err(Error::Usage(_))));
        assert!(Handler::exec("echo 'unclosed", 10)
            .unwrap_err()
            .to_string()
            .contains("--exec"));
    }

    #[test]
    fn the_program_must_be_runnable_at_start() {
        assert!(Handler::Echo.check_runnable().is_ok());
        assert!(Handler::exec("sh -c", 10).unwrap().check_runnable().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "").unwrap();
        for (cmd, why) in [
            ("/no/such/program".to_string(), "No such file"),
            ("no-such-program-anywhere".to_string(), "PATH"),
            (plain.display().to_string(), "not executable"),
            (dir.path().display().to_string(), "directory"),
        ] {
            let err = Handler::exec(&format!("'{cmd}' arg"), 10)
                .unwrap()
                .check_runnable()
                .unwrap_err();
            assert!(matches!(err, Error::Usage(_)));
            let msg = err.to_string();
            assert!(
                msg.contains("--exec") && msg.contains(&cmd) && msg.contains(why),
                "{msg}"
            );
        }
        // Looked up on PATH as execvp does.
        let path = std::ffi::OsString::from(format!("/nonexistent:{}", dir.path().display()));
        assert!(find_program("plain.txt", &path).is_err(), "not executable");
        assert!(find_program("sh", std::ffi::OsStr::new("/bin:/usr/bin")).is_ok());
    }
}
