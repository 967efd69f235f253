//! Agents fail over: `contact-client --server A,B` moves to the other server
//! at once when its server is killed or drains, and back again; a name that
//! resolves to several addresses counts as all of them; an id in use on one
//! server sends the agent to the next; a malformed entry is a usage error
//! naming it. Real servers (each with its own `--state-dir`)
//! and a real agent process, over real sockets.

mod common;

use common::*;
use contact::shutdown::Shutdown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A queue-mode server with a state directory and a results file of its own.
struct Replica {
    proc: Proc,
    addr: String,
    state: PathBuf,
    results: PathBuf,
}

impl Replica {
    /// Starts one on `listen` (port 0: a free one), keeping its files in `dir`.
    fn start(dir: &Path, listen: &str) -> Replica {
        Replica::start_with(dir.join("state"), dir.join("results.jsonl"), listen)
    }

    fn start_with(state: PathBuf, results: PathBuf, listen: &str) -> Replica {
        let mut proc = Proc::start(
            SERVER_BIN,
            &[
                "--listen",
                listen,
                "--dispatch",
                "queue",
                "--state-dir",
                state.to_str().unwrap(),
                "--results-to",
                results.to_str().unwrap(),
            ],
        );
        let line = proc.wait_line("listening on");
        let port = port_of_listening_line(&line);
        let host = listen.rsplit_once(':').unwrap().0;
        Replica {
            proc,
            addr: format!("{host}:{port}"),
            state,
            results,
        }
    }

    /// Starts this replica again, on the same address and files.
    fn restart(&self) -> Replica {
        Replica::start_with(self.state.clone(), self.results.clone(), &self.addr)
    }

    fn push(&self, task: &str) {
        let (code, out, err) = ctl(&["--server", &self.addr, "push", task], &[]);
        assert_eq!(code, 0, "push to {}: {out}{err}", self.addr);
    }

    /// Whether `agent`'s answer to `task` was accepted here.
    fn accepted(&self, agent: &str, task: &str) -> bool {
        read_results(&self.results)
            .iter()
            .any(|r| r["client"] == agent && r["task"] == task && r["accepted"] == true)
    }

    fn kill_9(&mut self) {
        self.proc.signal("KILL");
        self.proc.wait_exit();
    }

    /// SIGTERM: the server drains (ends its agents' task streams) and exits 0.
    fn drain(&mut self) {
        self.proc.signal("TERM");
        assert_eq!(self.proc.wait_exit(), 0, "{:#?}", self.proc.whole_log());
    }
}

/// `(the one the agent is on, the other)`, from its first `connected to` line.
fn on_and_other<'a>(
    agent: &mut Proc,
    x: &'a mut Replica,
    y: &'a mut Replica,
) -> (&'a mut Replica, &'a mut Replica) {
    let first = connected_to(agent, 0);
    if first == x.addr {
        (x, y)
    } else {
        assert_eq!(first, y.addr, "{:#?}", agent.seen);
        (y, x)
    }
}

/// The address of the agent's `connected to ADDR` lines from the `nth` on
/// (0-based), waiting for one.
fn connected_to(agent: &mut Proc, nth: usize) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let lines: Vec<String> = agent
            .lines_so_far()
            .iter()
            .filter_map(|l| l.split("connected to ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect();
        if let Some(addr) = lines.get(nth) {
            return addr.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no connection #{nth}; saw {:#?}",
            agent.seen
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills the agent's server with SIGKILL and waits for the agent's first
/// result accepted by `other` (a task waiting there already): how long that took.
fn kill_and_time_the_move(on: &mut Replica, other: &Replica, agent: &str, task: &str) -> Duration {
    other.push(task);
    let killed = Instant::now();
    on.kill_9();
    wait_for("the agent's result accepted by the other server", || {
        other.accepted(agent, task)
    });
    killed.elapsed()
}

#[test]
fn an_agent_moves_to_the_other_server_when_its_server_is_killed_and_back_when_that_one_drains() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let mut a = Replica::start(&da, "127.0.0.1:0");
    let mut b = Replica::start(&db, "127.0.0.1:0");
    let servers = format!("{},{}", a.addr, b.addr);
    let mut agent = Proc::start(CLIENT_BIN, &agent_flags(&servers, "mover"));
    let (on, other) = on_and_other(&mut agent, &mut a, &mut b);
    on.push("before");
    wait_for("a result on the first server", || {
        on.accepted("mover", "before")
    });

    let took = kill_and_time_the_move(on, other, "mover", "after the kill");
    eprintln!(
        "failover: kill -9 to the first result accepted by the other server: {} ms",
        took.as_millis()
    );
    assert_eq!(connected_to(&mut agent, 1), other.addr);
    agent.wait_line(&format!("lost {}: ", on.addr));
    other.push("still answering");
    wait_for("tasks pushed there answered", || {
        other.accepted("mover", "still answering")
    });

    // The first comes back; the second drains: the agent moves back.
    let mut back = on.restart();
    back.push("back home");
    other.drain();
    wait_for("the agent's result on the restarted server", || {
        back.accepted("mover", "back home")
    });
    assert_eq!(connected_to(&mut agent, 2), back.addr);
    let moves = agent
        .lines_so_far()
        .iter()
        .filter(|l| l.contains(&format!("lost {}: ", other.addr)))
        .cloned()
        .collect::<Vec<_>>();
    assert!(
        moves
            .iter()
            .any(|l| l.contains(&format!("trying {}", back.addr))),
        "{moves:#?}"
    );
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(), 0);
    back.drain();
}

/// Runs the agent so that `localhost` resolves to 127.0.0.1 and ::1: as is,
/// if it already does here, else in a user and mount namespace of its own
/// with an /etc/hosts that says so (`unshare`). `None`, and why, if neither.
fn agent_where_localhost_is_both(dir: &Path, args: &[&str]) -> Result<Proc, String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = ("localhost", 1)
        .to_socket_addrs()
        .map_err(|e| format!("localhost does not resolve: {e}"))?
        .collect();
    if addrs.iter().any(|a| a.is_ipv4()) && addrs.iter().any(|a| a.is_ipv6()) {
        return Ok(Proc::start(CLIENT_BIN, args));
    }
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
    let bind = |prog: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "-Urm",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
        ])
        .arg(&hosts)
        .arg(prog);
        cmd
    };
    let probe = bind("getent").args(["ahosts", "localhost"]).output();
    match probe {
        Ok(out) if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("::1") => {
            let mut cmd = bind(CLIENT_BIN);
            cmd.args(args);
            Ok(Proc::spawn(cmd))
        }
        _ => Err(format!(
            "localhost resolves to {addrs:?} only, and `unshare -Urm` cannot give the agent an /etc/hosts naming both 127.0.0.1 and ::1"
        )),
    }
}

/// What a test that cannot run here does: it says why, and fails under CI.
fn cannot_run(why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!ci, "this test must run under CI: {why}");
    eprintln!("skipped: {why}");
}

#[test]
fn a_name_that_resolves_to_two_addresses_counts_as_both() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        return cannot_run(&format!("this machine has no IPv6 loopback (::1): {e}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut v4 = Replica::start(&dir.path().join("v4"), "127.0.0.1:0");
    let port = v4.addr.rsplit_once(':').unwrap().1.to_string();
    let mut v6 = Replica::start(&dir.path().join("v6"), &format!("[::1]:{port}"));
    let servers = format!("localhost:{port}");
    let mut agent = match agent_where_localhost_is_both(dir.path(), &agent_flags(&servers, "named"))
    {
        Ok(agent) => agent,
        Err(why) => return cannot_run(&why),
    };
    let (on, other) = on_and_other(&mut agent, &mut v4, &mut v6);
    assert!(
        agent
            .seen
            .iter()
            .any(|l| l.contains(&format!("connected to {} (localhost)", on.addr))),
        "{:#?}",
        agent.seen
    );
    on.push("first");
    wait_for("a result on the first address", || {
        on.accepted("named", "first")
    });
    kill_and_time_the_move(on, other, "named", "moved");
    assert_eq!(connected_to(&mut agent, 1), other.addr);
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(), 0);
    other.drain();
}

/// Runs `contact-client ARGS` to its end (killed if it does not end within
/// [`PATIENCE`]): exit code and stderr.
fn client_exit(args: &[&str]) -> (i32, String) {
    let mut client = Proc::start(CLIENT_BIN, args);
    let code = client.wait_exit();
    (code, client.whole_log().join("\n"))
}

#[test]
fn an_empty_entry_or_a_missing_port_is_a_usage_error_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "server = [\"127.0.0.1:1\", \"db.example\"]\n").unwrap();
    let config = config.to_str().unwrap();
    for (args, why) in [
        (
            vec!["--server", "127.0.0.1:1,,127.0.0.1:2"],
            "--server \"127.0.0.1:1,,127.0.0.1:2\": an entry is empty",
        ),
        (
            vec!["--server", "127.0.0.1:1", "--server", "web.example"],
            "--server \"web.example\": a port is required",
        ),
        (
            vec!["--server", "127.0.0.1:1,web.example:"],
            "--server \"web.example:\": a port is required",
        ),
        (
            vec!["--config", config],
            "--server \"db.example\": a port is required",
        ),
    ] {
        let (code, err) = client_exit(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

#[test]
fn an_id_in_use_on_one_server_sends_the_agent_to_the_next_at_once() {
    let (a, b) = (start_server(server_config()), start_server(server_config()));
    let stop = Shutdown::new();
    // Holders of four ids on A; then agents with those ids given A and B. In
    // random order, some dial A first: refused there, they must go on to B
    // at once, not after the refusal backoff (a minute here).
    let ids: Vec<String> = (0..4).map(|i| format!("twin-{i}")).collect();
    let holders: Vec<_> = ids
        .iter()
        .map(|id| spawn_client(client_config(a.port(), id), &stop))
        .collect();
    wait_for("the holders on A", || a.dispatcher().clients().len() == 4);
    let movers: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut c = client_config(a.port(), id);
            c.servers = vec![format!("127.0.0.1:{},127.0.0.1:{}", a.port(), b.port())];
            c.backoff_max = Duration::from_secs(60);
            spawn_client(c, &stop)
        })
        .collect();
    wait_for("every id also connected to B", || {
        b.dispatcher().clients().len() == 4
    });
    stop.trigger();
    for h in holders.into_iter().chain(movers) {
        h.join().unwrap();
    }
    a.stop().unwrap();
    b.stop().unwrap();
}
