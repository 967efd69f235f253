//! The binaries as an operator meets them: flags, exit statuses, messages,
//! signals, and a real server process talking to real client processes.

mod common;

use common::*;
use std::process::{Command, Output};

const SERVER: &str = SERVER_BIN;
const CLIENT: &str = CLIENT_BIN;

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", TEST_LOG)
        .output()
        .expect("binary runs")
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
        (SERVER, vec!["--listen", "127.0.0.1"], "--listen"),
        (SERVER, vec!["--listen", "127.0.0.1:99999"], "--listen"),
        (SERVER, vec!["--listen", "localhost:http"], "--listen"),
        (
            SERVER,
            vec!["--listen", "0.0.0.0:0", "--no-state"],
            "--insecure",
        ),
        (SERVER, vec!["--tls-cert", "x.pem"], "--tls-key"),
        (CLIENT, vec!["--exec-timeout", "5"], "--exec"),
        (
            CLIENT,
            vec!["--exec", "/no/such/program -x"],
            "/no/such/program",
        ),
        (
            CLIENT,
            vec!["--exec", "no-such-program-on-path"],
            "no-such-program-on-path",
        ),
        (SERVER, vec!["--retry-backoff", "5..1"], "--retry-backoff"),
        (SERVER, vec!["--retry-backoff", "5"], "--retry-backoff"),
        (SERVER, vec!["--max-lease", "0"], "--max-lease"),
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
        "--max-lease",
        "--retry-backoff",
        "--repair",
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
    port_of_listening_line(&server.wait_line("listening on")).to_string()
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

fn write_secret(dir: &std::path::Path) -> std::path::PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, "a secret of more than sixteen bytes\n").unwrap();
    secret
}

#[test]
fn the_readme_tls_token_and_mutual_tls_setups_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-certs.sh");
    let made = Command::new("bash")
        .arg(script)
        .arg(&certs)
        .args(["localhost", "web-1"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let cert = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let secret = write_secret(dir.path());
    let token = run(
        SERVER,
        &["token", "web-1", "--auth-secret", secret.to_str().unwrap()],
    );
    assert_eq!(token.status.code(), Some(0), "{}", stderr(&token));
    let token_file = dir.path().join("web-1.token");
    std::fs::write(&token_file, &token.stdout).unwrap();

    // TLS and a token: the agent's id comes from its token.
    let tls_server = |credentials: &[&str]| {
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--no-state".into(),
            "--generate".into(),
            "2".into(),
            "--every".into(),
            "0.2".into(),
            "--tls-cert".into(),
            cert("server.pem"),
            "--tls-key".into(),
            cert("server.key"),
        ];
        args.extend(credentials.iter().map(|s| s.to_string()));
        Proc::start(SERVER, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut server = tls_server(&["--auth-secret", secret.to_str().unwrap()]);
    let line = server.wait_line("listening on");
    assert!(line.contains("TLS, tokens required"), "{line}");
    let addr = format!("localhost:{}", port_of_listening_line(&line));
    let agent = run(
        CLIENT,
        &[
            "--server",
            &addr,
            "--tls-ca",
            &cert("ca.pem"),
            "--token-file",
            token_file.to_str().unwrap(),
            "--max-tasks",
            "3",
        ],
    );
    assert_eq!(agent.status.code(), Some(0), "{}", stderr(&agent));
    server.wait_line("client web-1 connected");
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    assert!(
        !server.seen.iter().any(|l| l.contains(&token)),
        "the token was logged"
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);

    // Mutual TLS: the agent's id comes from its certificate.
    let mut server = tls_server(&["--client-ca", &cert("ca.pem")]);
    let line = server.wait_line("listening on");
    assert!(line.contains("mutual TLS"), "{line}");
    let addr = format!("localhost:{}", port_of_listening_line(&line));
    let agent = run(
        CLIENT,
        &[
            "--server",
            &addr,
            "--tls-ca",
            &cert("ca.pem"),
            "--tls-cert",
            &cert("web-1.pem"),
            "--tls-key",
            &cert("web-1.key"),
            "--id",
            "web-1",
            "--max-tasks",
            "2",
        ],
    );
    assert_eq!(agent.status.code(), Some(0), "{}", stderr(&agent));
    server.wait_line("client web-1 connected");
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);
}

#[test]
fn token_subcommand_checks_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_secret(dir.path());
    let s = secret.to_str().unwrap();
    let agent = run(SERVER, &["token", "web-1", "--auth-secret", s]);
    let admin = run(SERVER, &["token", "--admin", "web-1", "--auth-secret", s]);
    assert_eq!(
        (agent.status.code(), admin.status.code()),
        (Some(0), Some(0))
    );
    assert_ne!(agent.stdout, admin.stdout);
    assert!(String::from_utf8_lossy(&agent.stdout).starts_with("contact1.agent.web-1."));
    let short = dir.path().join("short");
    std::fs::write(&short, "tiny").unwrap();
    let out = run(
        SERVER,
        &["token", "web-1", "--auth-secret", short.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("at least 16"), "{}", stderr(&out));
    let out = run(SERVER, &["token", "has space", "--auth-secret", s]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = run(
        SERVER,
        &["token", "web-1", "--auth-secret", "/no/such/secret"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn the_server_raises_its_open_file_limit_to_the_hard_limit() {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(SERVER);
    cmd.args(["--listen", "127.0.0.1:0", "--no-state"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped());
    // Started with a soft limit of 256 under a hard limit of 2048.
    with_open_file_limit(&mut cmd, 256, 2048);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let raised = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("open file limit"))
        .expect("a line about the open file limit");
    assert!(raised.contains("raised from 256 to 2048"), "{raised}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files
            .split_whitespace()
            .skip(3)
            .take(2)
            .collect::<Vec<_>>(),
        ["2048", "2048"],
        "{open_files}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A malformed `@` line of `--tasks-from` is an error naming the line, never
/// a task for every agent; an `@id` never seen is published (it waits for
/// that agent) with a warning, since it may be a typo.
#[test]
fn a_malformed_at_line_is_an_error_and_an_unknown_agent_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("tasks.txt");
    std::fs::write(&tasks, "@lonely\n@web-9 uptime\nhello\n@bad\u{e9}id x\n").unwrap();
    let mut srv = Proc::start(
        SERVER_BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-state",
            "--tasks-from",
            tasks.to_str().unwrap(),
        ],
    );
    let published = srv.wait_line(" published");
    let log = srv.lines_so_far().to_vec();
    let says = |needle: &str| log.iter().any(|l| l.contains(needle));
    assert!(
        says("ERROR") && says("line 1: no task after the agent id"),
        "{log:#?}"
    );
    assert!(
        says("line 4: client id \"bad\u{e9}id\" contains"),
        "{log:#?}"
    );
    assert!(
        says("WARN") && says("agent \"web-9\" has never been seen"),
        "{log:#?}"
    );
    assert!(published.contains("all 2 tasks"), "{published}");
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
}
