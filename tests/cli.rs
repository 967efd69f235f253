//! The binaries as an operator meets them: flags, exit statuses, messages,
//! signals, and a real server process talking to real client processes.

mod common;

use common::*;
use std::process::{Command, Output};

const SERVER: &str = SERVER_BIN;
const CLIENT: &str = CLIENT_BIN;

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_flags_and_values_exit_2_naming_the_flag() {
    for (bin, args, needle) in [
        (SERVER, vec!["--bogus"], "--bogus"),
        (SERVER, vec!["--generate", "0"], "--generate"),
        (SERVER, vec!["--every", "soon"], "--every"),
        (SERVER, vec!["--dispatch", "random"], "--dispatch"),
        (CLIENT, vec!["--max-tasks", "-3"], "--max-tasks"),
        (CLIENT, vec!["--status-every", "0"], "--status-every"),
        (CLIENT, vec!["--exec", "echo 'unclosed"], "--exec"),
        (CLIENT, vec!["--id", "has space"], "--id"),
    ] {
        let out = run(bin, &args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bin} {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(needle),
            "{bin} {args:?} should name {needle}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn help_describes_every_flag() {
    let server = String::from_utf8(run(SERVER, &["--help"]).stdout).unwrap();
    for flag in [
        "--listen",
        "--tasks-from",
        "--generate",
        "--every",
        "--dispatch",
        "--from",
        "--results-to",
        "--max-in-flight",
    ] {
        assert!(server.contains(flag), "server --help lacks {flag}");
    }
    let client = String::from_utf8(run(CLIENT, &["--help"]).stdout).unwrap();
    for flag in [
        "--server",
        "--id",
        "--max-tasks",
        "--exec",
        "--status-every",
        "--backoff-max",
    ] {
        assert!(client.contains(flag), "client --help lacks {flag}");
    }
}

#[test]
fn an_unreadable_tasks_file_or_a_busy_port_exits_1_saying_so() {
    let out = run(
        SERVER,
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-state",
            "--tasks-from",
            "/no/such/tasks.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/no/such/tasks.txt"),
        "{}",
        stderr(&out)
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = run(SERVER, &["--listen", &addr, "--no-state"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&addr), "{}", stderr(&out));
}

fn listening_port(server: &mut Proc) -> String {
    let line = server.wait_line("listening on");
    line.rsplit(':').next().unwrap().trim().to_string()
}

#[test]
fn server_and_clients_as_processes_then_sigterm_flushes_results() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("tasks.txt");
    std::fs::write(&tasks, "alpha\nbeta\n@only-b gamma\n").unwrap();
    let results = dir.path().join("results.jsonl");
    let mut server = Proc::start(
        SERVER,
        &[
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--tasks-from",
            tasks.to_str().unwrap(),
            "--results-to",
            results.to_str().unwrap(),
        ],
    );
    let port = listening_port(&mut server);
    let addr = format!("127.0.0.1:{port}");
    let a = run(
        CLIENT,
        &["--server", &addr, "--id", "only-a", "--max-tasks", "2"],
    );
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    let b = run(
        CLIENT,
        &[
            "--server",
            &addr,
            "--id",
            "only-b",
            "--max-tasks",
            "3",
            "--exec",
            "echo handled",
        ],
    );
    assert_eq!(b.status.code(), Some(0), "{}", stderr(&b));
    assert!(stderr(&b).contains("task 3: gamma"), "{}", stderr(&b));

    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);
    let recorded = read_results(&results);
    assert_eq!(accepted_ids(&recorded, "only-a"), vec![1, 2]);
    assert_eq!(accepted_ids(&recorded, "only-b"), vec![1, 2, 3]);
    let outputs: Vec<&str> = recorded
        .iter()
        .filter(|r| r["client"] == "only-b")
        .map(|r| r["output"].as_str().unwrap())
        .collect();
    assert_eq!(
        outputs,
        vec!["handled alpha", "handled beta", "handled gamma"]
    );
    server.wait_line("server stopped; 5 results recorded");
}

#[test]
fn a_client_retries_an_unreachable_server_then_works_and_stops_on_sigint() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut client = Proc::start(
        CLIENT,
        &[
            "--server",
            &addr,
            "--id",
            "patient",
            "--backoff-max",
            "0.3",
            "--status-every",
            "0.2",
        ],
    );
    let warn = client.wait_line("cannot reach server");
    assert!(warn.contains("WARN"), "{warn}");

    let mut server = Proc::start(
        SERVER,
        &[
            "--listen",
            &addr,
            "--no-state",
            "--generate",
            "2",
            "--every",
            "0.2",
        ],
    );
    server.wait_line("listening on");
    client.wait_line("client received task: task:");
    client.wait_line("status reply: server received: alive");
    client.signal("INT");
    assert_eq!(client.wait_exit(), 0);
    client.wait_line("results acknowledged");
    server.signal("INT");
    assert_eq!(server.wait_exit(), 0);
}
