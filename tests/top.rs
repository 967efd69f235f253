//! `contact-ctl top` as an operator over SSH sees it: in a real terminal (a
//! detached tmux session, read with capture-pane and driven with send-keys),
//! against a real server process and agents — the agents' rows, rates that
//! follow the results, an outage shown and recovered from, and the terminal
//! given back when `q` is pressed.

mod common;

use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A tmux server of our own (its own socket, no user configuration) with
/// one 160×40 session; killed when dropped, whatever the test's outcome.
struct Tmux {
    socket: String,
    /// The socket's file, which `kill-server` leaves behind.
    socket_path: String,
}

impl Tmux {
    /// Whether tmux can be run here; if not, says that `test` is skipped.
    fn installed_or_say_skipped(test: &str) -> bool {
        match Command::new("tmux").arg("-V").output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!(
                    "SKIPPED {test}: tmux is not installed \
                     (scripts/setup.sh installs it as root: apt-get install tmux)"
                );
                false
            }
            Err(e) => panic!("cannot run tmux: {e}"),
            Ok(_) => true,
        }
    }

    /// Runs `shell_command` in a new session.
    fn start(shell_command: &str) -> Tmux {
        static SESSIONS: AtomicUsize = AtomicUsize::new(0);
        let socket = format!(
            "contact-top-test-{}-{}",
            std::process::id(),
            SESSIONS.fetch_add(1, Ordering::Relaxed)
        );
        let started = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-x", "160", "-y", "40", "-s", "top", shell_command])
            .env_remove("TMUX")
            .status()
            .expect("tmux runs");
        let mut tmux = Tmux {
            socket,
            socket_path: String::new(),
        };
        assert!(started.success(), "tmux new-session failed: {started}");
        tmux.socket_path = tmux.pane_format("#{socket_path}");
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the pane shows now.
    fn pane(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    /// Types `key` into the pane (a tmux key name: `q`, `C-c`).
    fn send(&self, key: &str) {
        self.run(&["send-keys", "-t", "top", key]);
    }

    /// A tmux format about the pane, e.g. `#{alternate_on}`.
    fn pane_format(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "top", format])
            .trim()
            .to_string()
    }

    /// Waits until the pane shows what `cond` wants, failing with the pane.
    fn wait_for(&self, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let last = self.pane();
            if cond(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the pane shows:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
        if !self.socket_path.is_empty() {
            let _ = std::fs::remove_file(&self.socket_path);
        }
    }
}

/// A server process with no generated tasks on `listen`; its address.
fn server(listen: &str) -> (Proc, String) {
    let mut cmd = Command::new(SERVER_BIN);
    cmd.args([
        "--listen",
        listen,
        "--tasks-from",
        "/dev/null",
        "--no-state",
    ]);
    let mut p = Proc::spawn(cmd);
    let port = port_of_listening_line(&p.wait_line("listening on"));
    (p, format!("127.0.0.1:{port}"))
}

/// The fleet's results per second and failures per second in top's status
/// line (`127.0.0.1:PORT: 2 agents, 4.9 results/s, 0.0 failures/s (every 0.2s)`).
fn fleet_rates(pane: &str) -> Option<(f64, f64)> {
    let status = pane.lines().next()?;
    let (_, fleet) = status.rsplit_once(": ")?;
    let mut numbers = fleet.split(", ").skip(1).map(|part| {
        part.split_whitespace()
            .next()
            .and_then(|n| n.parse::<f64>().ok())
    });
    Some((numbers.next()??, numbers.next()??))
}

/// A shell command running `contact-ctl top` against `addr`, then saying
/// how it ended and whether the terminal is back in cooked mode, and
/// keeping the pane open.
fn top_then_report(addr: &str) -> String {
    format!(
        "env -u CONTACT_ADMIN_TOKEN XDG_CONFIG_HOME=/nonexistent/contact-test RUST_LOG=warn \
         '{CTL_BIN}' --server {addr} top --interval 0.2; echo \"top exited $?\"; \
         if stty -a | grep -qw -e -icanon -e -echo; then echo 'terminal left raw'; \
         else echo 'terminal cooked'; fi; exec cat"
    )
}

/// Waits for the end of top in `tmux` and checks it exited 0 and gave
/// the terminal back: the main screen, cooked mode, a cursor.
fn assert_ended_cleanly(tmux: &Tmux) {
    let pane = tmux.wait_for("top's end", |p| p.contains("top exited"));
    assert!(pane.contains("top exited 0"), "{pane}");
    tmux.wait_for("the shell's report on the terminal", |p| {
        p.contains("terminal cooked") || p.contains("terminal left raw")
    });
    let pane = tmux.pane();
    assert!(pane.contains("terminal cooked"), "{pane}");
    assert!(!pane.contains("results/s"), "the table stayed: {pane}");
    assert_eq!(tmux.pane_format("#{alternate_on}"), "0");
    assert_eq!(tmux.pane_format("#{cursor_flag}"), "1");
}

/// The line of the agents' table for `id`.
fn agent_line<'a>(pane: &'a str, id: &str) -> Option<&'a str> {
    pane.lines().find(|l| l.starts_with(&format!("│{id} ")))
}

#[test]
fn top_shows_the_agents_and_their_rates_survives_an_outage_and_gives_the_terminal_back() {
    if !Tmux::installed_or_say_skipped(
        "top_shows_the_agents_and_their_rates_survives_an_outage_and_gives_the_terminal_back",
    ) {
        return;
    }
    let (mut srv, addr) = server("127.0.0.1:0");
    let _web = agent_process(&addr, "web-1", "echo", &["--label", "role=web"]);
    // Every task fails on this one.
    let _db = agent_process(&addr, "db-1", "false", &["--label", "role=db"]);
    wait_for("both agents connected", || {
        let (_, out, _) = ctl(&["--server", &addr, "clients"], &[]);
        out.contains("2 agents connected")
    });

    let tmux = Tmux::start(&top_then_report(&addr));

    // Two polls without results: the agents' rows and rates of zero.
    let pane = tmux.wait_for("the agents' rows and a rate", |p| {
        fleet_rates(p) == Some((0.0, 0.0))
            && agent_line(p, "web-1").is_some()
            && agent_line(p, "db-1").is_some()
    });
    assert!(
        pane.lines()
            .next()
            .unwrap()
            .starts_with(&format!("{addr}: 2 agents, 0.0 results/s")),
        "{pane}"
    );
    let web = agent_line(&pane, "web-1").unwrap();
    assert!(web.contains("active") && web.contains("role=web"), "{pane}");
    assert_eq!(tmux.pane_format("#{alternate_on}"), "1");

    // Results come in: the fleet's rates and each agent's counts follow.
    let mut last_push = Instant::now() - Duration::from_secs(1);
    let mut pushed = 0;
    let pane = tmux.wait_for("results/s and failures/s above 0", |p| {
        if last_push.elapsed() > Duration::from_millis(100) {
            let (code, _, err) = ctl(&["--server", &addr, "push", "tick"], &[]);
            assert_eq!(code, 0, "{err}");
            pushed += 1;
            last_push = Instant::now();
        }
        fleet_rates(p).is_some_and(|(results, failures)| results > 0.0 && failures > 0.0)
    });
    let db = agent_line(&pane, "db-1").unwrap();
    let cells: Vec<&str> = db.trim_matches('│').split_whitespace().collect();
    // ID STATE LABELS IN-FLIGHT DONE FAILED RESULTS/S LAST SEEN
    assert_eq!(cells[4], "0", "db-1 never succeeds: {pane}");
    assert!(cells[5].parse::<u64>().unwrap() > 0, "{pane}");
    assert!(cells[6].parse::<f64>().unwrap() > 0.0, "{pane}");
    // No more pushes: back to zero once a refresh saw no new result.
    tmux.wait_for("the rates back to 0", |p| {
        fleet_rates(p) == Some((0.0, 0.0))
    });
    let pane = tmux.wait_for("the jobs' table", |p| {
        p.contains(&format!("│{pushed} ")) && p.contains("every agent")
    });
    assert!(pane.contains("newest jobs"), "{pane}");

    // `s` sorts by the next column.
    tmux.send("s");
    tmux.wait_for("sorting by results/s", |p| {
        p.contains("sort (by RESULTS/S)")
    });

    // The server goes away: said, and asked again until it is back.
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
    tmux.wait_for("the outage in the status line", |p| {
        p.lines()
            .next()
            .is_some_and(|l| l.starts_with(&format!("{addr}: UNREACHABLE for")))
    });
    let (_srv, _) = server(&addr);
    tmux.wait_for("the agents back after the restart", |p| {
        p.lines()
            .next()
            .is_some_and(|l| l.starts_with(&format!("{addr}: 2 agents, ")))
    });

    // `q`: top ends with 0 and the terminal is as it was.
    tmux.send("q");
    assert_ended_cleanly(&tmux);
}

#[test]
fn top_without_a_server_says_so_until_ctrl_c() {
    if !Tmux::installed_or_say_skipped("top_without_a_server_says_so_until_ctrl_c") {
        return;
    }
    // Nothing listens on port 1.
    let tmux = Tmux::start(&top_then_report("127.0.0.1:1"));
    // Still there (and asking) a second on.
    let pane = tmux.wait_for("the outage, asked again", |p| {
        p.starts_with("127.0.0.1:1: UNREACHABLE for ")
            && !p.starts_with("127.0.0.1:1: UNREACHABLE for 0s")
    });
    assert!(
        pane.contains("retrying every 0.2s: clients: cannot reach the server at 127.0.0.1:1"),
        "{pane}"
    );
    tmux.send("C-c");
    assert_ended_cleanly(&tmux);
}

#[test]
fn top_ends_when_its_terminal_hangs_up() {
    if !Tmux::installed_or_say_skipped("top_ends_when_its_terminal_hangs_up") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    // The shell gives its process to top (exec), having written its pid.
    let tmux = Tmux::start(&format!(
        "echo $$ > '{}'; exec env XDG_CONFIG_HOME=/nonexistent/contact-test \
         '{CTL_BIN}' --server 127.0.0.1:1 top --interval 0.2",
        pid_file.display()
    ));
    tmux.wait_for("top running", |p| p.contains("UNREACHABLE"));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    /// Kills top if the test fails with it still running.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("contact-ctl") {
                unsafe { libc::kill(self.0, libc::SIGKILL) };
            }
        }
    }
    let _top = KillOnDrop(pid);
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists());
    // An SSH session dropped: the terminal goes away under top.
    drop(tmux);
    wait_for("top to end after the hang-up", || {
        // Gone, or a zombie of tmux's (which is gone too).
        std::fs::read_to_string(proc_dir.join("stat")).map_or(true, |stat| stat.contains(") Z "))
    });
}

#[test]
fn top_without_a_terminal_exits_2_pointing_to_clients_json() {
    let (code, out, err) = ctl(&["--server", "127.0.0.1:1", "top"], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("clients --json"), "{err}");
    let (code, _, err) = ctl(&["top", "--interval", "0"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--interval"), "{err}");
}
