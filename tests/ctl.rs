//! `contact-ctl` end to end: a real `contact-server` process, real agents,
//! and the operator's tool pushing tasks and listing agents — its output for
//! people and for scripts, its exit codes (0 done, 1 refused or unreachable,
//! 2 usage), and admin credentials.

mod common;

use common::*;
use std::process::Command;

/// A server process on a free loopback port, with `extra` flags; its address.
fn server(extra: &[&str]) -> (Proc, String) {
    let mut flags = vec!["--no-state"];
    flags.extend_from_slice(extra);
    server_with(&flags)
}

/// A server with exactly `flags` (beyond its address and no generated tasks).
fn server_with(flags: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(SERVER_BIN);
    // No generated tasks: only what the operator pushes.
    cmd.args(["--listen", "127.0.0.1:0", "--tasks-from", "/dev/null"])
        .args(flags);
    let mut p = Proc::spawn(cmd);
    let port = port_of_listening_line(&p.wait_line("listening on"));
    (p, format!("127.0.0.1:{port}"))
}

/// Waits until `contact-ctl clients` says `n` agents are connected.
fn wait_connected(addr: &str, n: usize) {
    let line = match n {
        1 => "1 agent connected".to_string(),
        n => format!("{n} agents connected"),
    };
    wait_for(&line, || {
        ctl(&["--server", addr, "clients"], &[]).1.contains(&line)
    });
}

#[test]
fn an_operator_lists_agents_and_pushes_to_all_or_one() {
    let (mut srv, addr) = server(&[]);
    let mut web1 = agent_process(&addr, "web-1", "echo", &[]);
    let mut web2 = agent_process(&addr, "web-2", "echo", &[]);
    wait_for("both agents listed", || {
        let (code, out, _) = ctl(&["--server", &addr, "clients"], &[]);
        code == 0 && out.contains("web-1") && out.contains("web-2")
    });
    let (code, out, err) = ctl(&["--server", &addr, "clients"], &[]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("ID "), "{out}");
    assert!(
        lines[0].contains("LAST SEEN") && lines[0].contains("FAILED"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("web-1 ") && lines[1].contains("ipv4:127.0.0.1:"),
        "{out}"
    );
    assert_eq!(lines[3], "2 agents connected");

    let (code, out, err) = ctl(&["--server", &addr, "push", "hello fleet"], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "job 1: task 1 pushed to every agent"),
        "{err}"
    );
    web1.wait_line("task 1 done");
    web2.wait_line("task 1 done");
    let (code, out, err) = ctl(
        &[
            "--server", &addr, "--json", "push", "just you", "--agent", "web-2",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let reply: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (reply["task_id"].as_u64(), reply["target"].as_str()),
        (Some(2), Some("agent web-2"))
    );
    web2.wait_line("task 2 done");

    // Scripts read JSON lines, one per agent, with what each has done.
    wait_for("web-2's second result counted", || {
        let (_, out, _) = ctl(&["--server", &addr, "--json", "clients"], &[]);
        out.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"] == "web-2" && v["done"] == 2
        })
    });
    assert!(!web1.lines_so_far().iter().any(|l| l.contains("task 2")));

    // A typo is reported and nothing is published.
    let (code, out, err) = ctl(&["--server", &addr, "push", "x", "--agent", "web-9"], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("push: NOT_FOUND: no agent \"web-9\""), "{err}");
    for p in [&mut web1, &mut web2, &mut srv] {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }
    assert!(srv
        .whole_log()
        .iter()
        .any(|l| l.contains("task 2 pushed by local to agent web-2")));
}

#[test]
fn usage_errors_exit_2_and_an_unreachable_server_exits_1() {
    let (code, _, err) = ctl(&["push"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ctl(&["clients", "--timeout", "soon"], &[]);
    assert_eq!(code, 2, "{err}");
    // Nothing listens on port 1.
    let (code, _, err) = ctl(&["--server", "127.0.0.1:1", "clients"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the server at 127.0.0.1:1"),
        "{err}"
    );
    // A token is not sent in clear text beyond loopback.
    let (code, _, err) = ctl(
        &["--server", "192.0.2.1:50051", "clients"],
        &[("CONTACT_ADMIN_TOKEN", "contact1.admin.ops.abc")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("clear text"), "{err}");
}

#[test]
fn with_a_secret_the_admin_token_is_needed_and_an_agents_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "integration test secret, 32 bytes!").unwrap();
    let secret = secret.to_str().unwrap();
    let token = |args: &[&str]| mint_token(secret, args);
    let admin = token(&["--admin", "ops"]);
    let agent = token(&["web-1"]);
    let (mut srv, addr) = server(&["--auth-secret", secret]);
    let (code, _, err) = ctl(&["--server", &addr, "clients"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("admin token"),
        "{err}"
    );
    let (code, _, err) = ctl(
        &["--server", &addr, "push", "x"],
        &[("CONTACT_ADMIN_TOKEN", &agent)],
    );
    assert_eq!(code, 1);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    let (code, out, err) = ctl(
        &["--server", &addr, "push", "x"],
        &[("CONTACT_ADMIN_TOKEN", &admin)],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "job 1: task 1 pushed to every agent"),
        "{err}"
    );
    let file = dir.path().join("admin-token");
    std::fs::write(&file, &admin).unwrap();
    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "--token-file",
            file.to_str().unwrap(),
            "clients",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "ID  STATE  LABELS  ADDRESS  CONNECTED  LAST SEEN  IN FLIGHT  SENT  DONE  FAILED\n0 agents connected"
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
    assert!(srv
        .whole_log()
        .iter()
        .any(|l| l.contains("task 1 pushed by ops")));
}

#[test]
fn a_selector_reaches_the_agents_with_those_labels_and_no_other() {
    let (mut srv, addr) = server(&[]);
    let mut agents: Vec<Proc> = [
        ("web-1", "role=web"),
        ("web-2", "role=web"),
        ("db-1", "role=db"),
    ]
    .iter()
    .map(|(id, label)| agent_process(&addr, id, "echo", &["--label", label, "--label", "zone=eu"]))
    .collect();
    wait_connected(&addr, 3);
    let (_, out, _) = ctl(&["--server", &addr, "clients"], &[]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("db-1 ") && l.contains(" role=db,zone=eu ")),
        "{out}"
    );

    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "push",
            "deploy",
            "--target",
            "zone=eu,role=web",
        ],
        &[],
    );
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "job 1: tasks 1-2 pushed to 2 agents matching role=web,zone=eu"
        ),
        "{err}"
    );
    agents[0].wait_line("task 1 done");
    agents[1].wait_line("task 2 done");
    let (code, out, err) = ctl(
        &[
            "--server", &addr, "--json", "push", "all", "--target", "zone=eu",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let reply: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        reply["agents"],
        serde_json::json!(["db-1", "web-1", "web-2"])
    );
    assert_eq!(reply["task_ids"], serde_json::json!([3, 4, 5]));
    agents[2].wait_line("task 3 done");
    assert!(!agents[2]
        .lines_so_far()
        .iter()
        .any(|l| l.contains("deploy")));

    let (code, _, err) = ctl(
        &["--server", &addr, "push", "x", "--target", "role=cache"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("NOT_FOUND: selector role=cache matches no connected agent")
            && err.contains("--wait-for-agents"),
        "{err}"
    );
    // Waiting for agents needs someone to wait for (usage).
    let (code, _, err) = ctl(&["--server", &addr, "push", "x", "--wait-for-agents"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ctl(&["--server", &addr, "push", "x", "--target", "role"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("INVALID_ARGUMENT: selector: \"role\" is not key=value"),
        "{err}"
    );
    for p in agents.iter_mut().chain([&mut srv]) {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }

    // A malformed label stops an agent at start (usage), before it dials.
    let mut bad = Proc::start(CLIENT_BIN, &["--server", &addr, "--label", "role web"]);
    assert_eq!(bad.wait_exit(), 2);
    assert!(bad.whole_log().iter().any(|l| l.contains("not key=value")));
}

#[test]
fn run_wait_prints_each_agents_result_and_exits_by_the_worst() {
    let (mut srv, addr) = server(&[]);
    let mut agents = vec![
        agent_process(&addr, "web-1", "echo", &["--label", "role=web"]),
        agent_process(&addr, "web-2", "echo", &["--label", "role=web"]),
        agent_process(&addr, "db-1", "false", &["--label", "role=db"]),
    ];
    wait_connected(&addr, 3);
    // Salt's `cmd.run` semantics: one agent failed, so the run fails.
    let (code, out, err) = ctl(&["--server", &addr, "run", "hello", "--wait"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "job 1: task 1 pushed to every agent", "{out}");
    assert!(out.contains("web-1: ok\n    hello\n"), "{out}");
    assert!(out.contains("web-2: ok\n    hello\n"), "{out}");
    assert!(out.contains("db-1: failed\n"), "{out}");
    assert_eq!(
        lines.last().unwrap(),
        &"job 1: 2 of 3 agents ok, 1 failed",
        "{out}"
    );

    let (code, out, err) = ctl(
        &[
            "--server", &addr, "run", "deploy", "--target", "role=web", "--wait",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("job 2: 2 of 2 agents ok\n"), "{out}");

    // For scripts: one JSON line per agent, then the summary.
    let (code, out, _) = ctl(
        &[
            "--server", &addr, "--json", "run", "x", "--agent", "web-2", "--wait",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        (
            lines[0]["agent"].as_str(),
            lines[0]["status"].as_str(),
            lines[0]["output"].as_str()
        ),
        (Some("web-2"), Some("ok"), Some("x"))
    );
    assert_eq!(lines[1]["job_id"], 3);
    assert_eq!(lines[1]["ok"], 1);

    // The job's record: each agent's status and output.
    let (code, out, _) = ctl(&["--server", &addr, "job", "1"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("job 1: hello → every agent\nAGENT  TASK  STATUS  ATTEMPT  OUTPUT\n"),
        "{out}"
    );
    assert!(
        out.contains("\nweb-1  1     ok      1        hello\n"),
        "{out}"
    );
    assert!(
        out.ends_with("3 agents: 2 ok, 1 failed, 0 running, 0 delivered, 0 pending, 0 dead\n"),
        "{out}"
    );
    // An agent that does not answer in time is named.
    agents.push(agent_process(
        &addr,
        "slow-1",
        "sleep",
        &["--label", "role=slow"],
    ));
    wait_connected(&addr, 4);
    let (code, out, _) = ctl(
        &[
            "--server",
            &addr,
            "run",
            "30",
            "--target",
            "role=slow",
            "--wait",
            "--timeout",
            "1",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("slow-1: timed-out\njob 4: 0 of 1 agent ok, 1 timed out\n"),
        "{out}"
    );

    let (code, out, _) = ctl(&["--server", &addr, "jobs"], &[]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("JOB  PUSHED"), "{out}");
    assert!(
        lines[1].starts_with("4  ") && lines[4].starts_with("1  "),
        "{out}"
    );
    let (code, _, err) = ctl(&["--server", &addr, "job", "99"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("NOT_FOUND: no job 99"), "{err}");
    // slow-1 would finish its 30 s task before leaving: no need to wait.
    for p in agents.iter_mut() {
        p.signal("KILL");
        p.wait_exit();
    }
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
}

#[test]
fn a_push_with_a_key_seen_before_publishes_nothing_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let start = || {
        let mut cmd = Command::new(SERVER_BIN);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state,
            "--tasks-from",
            "/dev/null",
        ]);
        let mut p = Proc::spawn(cmd);
        let port = port_of_listening_line(&p.wait_line("listening on"));
        (p, format!("127.0.0.1:{port}"))
    };
    let (mut srv, addr) = start();
    let push = |addr: &str| {
        ctl(
            &["--server", addr, "push", "deploy v42", "--key", "deploy-42"],
            &[],
        )
    };
    let (code, out, err) = push(&addr);
    assert_eq!(
        (code, out.trim()),
        (0, "job 1: task 1 pushed to every agent"),
        "{err}"
    );
    // A retried script: the same key again is answered, not published.
    let (code, out, err) = push(&addr);
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "job 1: task 1 already pushed to every agent with this key; nothing published"
        ),
        "{err}"
    );
    let (code, out, _) = ctl(
        &[
            "--server",
            &addr,
            "push",
            "deploy v43",
            "--key",
            "deploy-43",
        ],
        &[],
    );
    assert_eq!(
        (code, out.trim()),
        (0, "job 2: task 2 pushed to every agent")
    );
    let (code, _, err) = ctl(
        &["--server", &addr, "push", "x", "--key", &"k".repeat(300)],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("INVALID_ARGUMENT: the idempotency key is 300 bytes"),
        "{err}"
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);

    // The keys are in the journal: after a restart the push is still a
    // duplicate (its job, held in memory, is gone: job 0).
    let (mut srv, addr) = start();
    let (code, out, err) = push(&addr);
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "job 0: task 1 already pushed to every agent with this key; nothing published"
        ),
        "{err}"
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
    assert!(srv
        .whole_log()
        .iter()
        .any(|l| l.contains("repeats the key of task 1")));
}

#[test]
fn a_drained_agent_gets_nothing_new_until_let_go_and_a_disconnected_one_comes_back() {
    let (mut srv, addr) = server(&["--dispatch", "queue"]);
    let mut a = agent_process(&addr, "a", "echo", &[]);
    let mut b = agent_process(&addr, "b", "echo", &[]);
    wait_connected(&addr, 2);
    let (code, out, err) = ctl(&["--server", &addr, "drain", "a"], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "agent a drained: nothing new for it; it holds 0 tasks"),
        "{err}"
    );
    let (_, out, _) = ctl(&["--server", &addr, "clients"], &[]);
    let state_of = |out: &str, id: &str| {
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id)).then(|| f[1].to_string())
            })
            .unwrap_or_default()
    };
    assert_eq!(state_of(&out, "a"), "drained", "{out}");
    assert_eq!(state_of(&out, "b"), "active", "{out}");
    // Every task of the queue goes to b while a is drained.
    for i in 1..=6 {
        let (code, _, err) = ctl(&["--server", &addr, "push", &format!("job-{i}")], &[]);
        assert_eq!(code, 0, "{err}");
    }
    b.wait_line("task 6 done");
    assert!(!a.lines_so_far().iter().any(|l| l.contains("done")));
    let (code, _, err) = ctl(&["--server", &addr, "drain", "b"], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = ctl(&["--server", &addr, "push", "job-7"], &[]);
    assert_eq!(code, 0);
    let (code, out, err) = ctl(&["--server", &addr, "drain", "a", "--undo"], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "agent a takes tasks again"),
        "{err}"
    );
    a.wait_line("task 7 done");

    // Disconnect: the agent's stream ends and it dials again.
    let (code, out, err) = ctl(&["--server", &addr, "disconnect", "a"], &[]);
    assert_eq!((code, out.trim()), (0, "agent a disconnected"), "{err}");
    srv.wait_line("client a disconnected: disconnected by local");
    a.wait_line("connected to");
    let (code, _, err) = ctl(&["--server", &addr, "disconnect", "nobody"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("NOT_FOUND: agent \"nobody\" is not connected"),
        "{err}"
    );
    let (code, _, err) = ctl(&["--server", &addr, "drain", "nobody"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("NOT_FOUND: no agent \"nobody\""), "{err}");
    for p in [&mut a, &mut b, &mut srv] {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }
}

#[test]
fn a_rollout_stops_at_its_error_budget_and_the_rest_are_cancelled() {
    let (mut srv, addr) = server(&[]);
    let mut agents: Vec<Proc> = (1..=5)
        .map(|i| agent_process(&addr, &format!("w{i}"), "false", &["--label", "role=web"]))
        .chain([agent_process(
            &addr,
            "ok-1",
            "echo",
            &["--label", "role=api"],
        )])
        .chain([agent_process(
            &addr,
            "ok-2",
            "echo",
            &["--label", "role=api"],
        )])
        .collect();
    wait_connected(&addr, 7);
    // One at a time, one failure tolerated: w1 fails, w2 fails, and the
    // job stops before w3, w4 and w5 get it.
    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "run",
            "deploy",
            "--target",
            "role=web",
            "--max-concurrency",
            "1",
            "--max-errors",
            "1",
            "--wait",
            "--timeout",
            "20",
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.starts_with("job 1: task 1 pushed to 5 agents matching role=web\n"),
        "{out}"
    );
    for w in ["w3", "w4", "w5"] {
        assert!(out.contains(&format!("{w}: cancelled\n")), "{out}");
    }
    assert!(
        out.ends_with("job 1: 0 of 5 agents ok, 2 failed, 3 cancelled (too many failed: it stopped spreading)\n"),
        "{out}"
    );
    for a in &mut agents[2..5] {
        assert!(
            !a.lines_so_far().iter().any(|l| l.contains("deploy")),
            "a cancelled agent ran it"
        );
    }
    let (_, out, _) = ctl(&["--server", &addr, "job", "1"], &[]);
    assert!(
        out.ends_with("0 held, 3 cancelled (stopped: too many failed)\n"),
        "{out}"
    );

    // Within its budget a rollout reaches every agent, a share at a time.
    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "run",
            "hi",
            "--target",
            "role=api",
            "--max-concurrency",
            "50%",
            "--wait",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("job 2: 2 of 2 agents ok\n"), "{out}");
    let (code, _, err) = ctl(
        &["--server", &addr, "push", "x", "--max-errors", "lots"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("INVALID_ARGUMENT: max_errors: \"lots\" is not a number"),
        "{err}"
    );
    for p in agents.iter_mut() {
        p.signal("KILL");
        p.wait_exit();
    }
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
}

#[test]
fn results_are_read_from_a_sequence_number_and_followed_as_they_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let state = dir.path().join("state");
    let (mut srv, addr) = server_with(&[
        "--results-to",
        results.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let mut a = agent_process(&addr, "a", "echo", &[]);
    for i in 1..=3 {
        let (code, _, err) = ctl(&["--server", &addr, "push", &format!("job-{i}")], &[]);
        assert_eq!(code, 0, "{err}");
    }
    a.wait_line("task 3 done");
    wait_for("three results recorded", || {
        read_results(&results).len() == 3
    });
    let (code, out, err) = ctl(&["--server", &addr, "results"], &[]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "1  task 1  a  ok  job-1",
            "2  task 2  a  ok  job-2",
            "3  task 3  a  ok  job-3"
        ]
    );
    let (_, out, _) = ctl(
        &["--server", &addr, "--json", "results", "--from", "3"],
        &[],
    );
    let last: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (last["seq"].as_u64(), last["output"].as_str()),
        (Some(3), Some("job-3"))
    );

    // A follower resuming after 2 gets 3, then what is recorded next.
    let mut follower = Command::new(CTL_BIN)
        .args(["--server", &addr, "results", "--follow", "--from", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(l.unwrap());
        }
    });
    let next = || rx.recv_timeout(PATIENCE).expect("a line from the follower");
    assert_eq!(next(), "3  task 3  a  ok  job-3");
    let (code, _, _) = ctl(&["--server", &addr, "push", "job-4"], &[]);
    assert_eq!(code, 0);
    assert_eq!(next(), "4  task 4  a  ok  job-4");
    let _ = follower.kill();
    let _ = follower.wait();
    for p in [&mut a, &mut srv] {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }

    // Without a results file there is nothing to read, and it says so;
    // without --state-dir nothing is numbered, so no reader could resume.
    let (mut srv, addr) = server(&[]);
    let (code, _, err) = ctl(&["--server", &addr, "results"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("--results-to"),
        "{err}"
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
    let (mut srv, addr) = server(&["--results-to", results.to_str().unwrap()]);
    let (code, _, err) = ctl(&["--server", &addr, "results"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("numbered only with --state-dir"), "{err}");
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
}

#[test]
fn the_admin_socket_is_private_and_needs_no_token() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "integration test secret, 32 bytes!").unwrap();
    let socket = dir.path().join("admin.sock");
    let listen = format!("unix:{}", socket.display());
    let (mut srv, addr) = server(&[
        "--auth-secret",
        secret.to_str().unwrap(),
        "--admin-listen",
        &listen,
    ]);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Over TCP a token is needed; through the socket, its permissions are the credential.
    let (code, _, _) = ctl(&["--server", &addr, "clients"], &[]);
    assert_eq!(code, 1);
    let (code, out, err) = ctl(&["--server", &listen, "push", "hello"], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "job 1: task 1 pushed to every agent"),
        "{err}"
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
    assert!(srv
        .whole_log()
        .iter()
        .any(|l| l.contains("pushed by local socket")));

    // A path that is some other file is refused, not replaced.
    let file = dir.path().join("plain");
    std::fs::write(&file, "keep me").unwrap();
    let mut refused = Proc::start(
        SERVER_BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-state",
            "--admin-listen",
            &format!("unix:{}", file.display()),
        ],
    );
    assert_eq!(refused.wait_exit(), 2);
    assert!(refused
        .whole_log()
        .iter()
        .any(|l| l.contains("is not a socket")));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let mut bad = Proc::start(
        SERVER_BIN,
        &["--listen", "127.0.0.1:0", "--admin-listen", "/tmp/x.sock"],
    );
    assert_eq!(bad.wait_exit(), 2);
}

#[test]
fn a_cancelled_task_is_delivered_no_further_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let (mut srv, addr) = server_with(&["--state-dir", state]);
    // Broadcast, with no agent yet: the tasks wait in the history.
    for text in ["never", "wanted"] {
        let (code, _, err) = ctl(&["--server", &addr, "push", text], &[]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, out, err) = ctl(&["--server", &addr, "cancel", "--job", "1"], &[]);
    assert_eq!((code, out.trim()), (0, "1 task cancelled"), "{err}");
    let (code, out, _) = ctl(&["--server", &addr, "cancel", "1"], &[]);
    assert_eq!(
        (code, out.trim()),
        (0, "0 tasks cancelled"),
        "cancelling twice changes nothing"
    );
    let mut a = agent_process(&addr, "a", "echo", &[]);
    a.wait_line("task 2 done");
    let (_, out, _) = ctl(&["--server", &addr, "job", "1"], &[]);
    assert!(
        out.ends_with(
            "0 agents: 0 ok, 0 failed, 0 running, 0 delivered, 0 pending, 0 dead (cancelled)\n"
        ),
        "{out}"
    );
    a.signal("TERM");
    assert_eq!(a.wait_exit(), 0);
    assert!(!a.whole_log().iter().any(|l| l.contains("never")));
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);

    // Restarted on its state: a new agent gets the history but not task 1.
    let (mut srv, addr) = server_with(&["--state-dir", state]);
    let mut b = agent_process(&addr, "b", "echo", &[]);
    b.wait_line("task 2 done");
    let (code, _, _) = ctl(&["--server", &addr, "push", "after"], &[]);
    assert_eq!(code, 0);
    b.wait_line("task 3 done");
    b.signal("TERM");
    assert_eq!(b.wait_exit(), 0);
    assert!(!b.whole_log().iter().any(|l| l.contains("never")));
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);

    // A work queue: a cancelled task never reaches anyone.
    let (mut srv, addr) = server(&["--dispatch", "queue"]);
    for text in ["skip-me", "do-me"] {
        let (code, _, _) = ctl(&["--server", &addr, "push", text], &[]);
        assert_eq!(code, 0);
    }
    let (code, out, _) = ctl(&["--server", &addr, "cancel", "1"], &[]);
    assert_eq!((code, out.trim()), (0, "1 task cancelled"));
    let mut c = agent_process(&addr, "c", "echo", &[]);
    c.wait_line("task 2 done");
    c.signal("TERM");
    assert_eq!(c.wait_exit(), 0);
    assert!(!c.whole_log().iter().any(|l| l.contains("skip-me")));
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
}

#[test]
fn an_insecure_server_beyond_loopback_refuses_admin_calls_without_credentials() {
    let mut srv = Proc::start(
        SERVER_BIN,
        &[
            "--listen",
            "0.0.0.0:0",
            "--insecure",
            "--no-state",
            "--tasks-from",
            "/dev/null",
        ],
    );
    let port = port_of_listening_line(&srv.wait_line("listening on"));
    let (code, _, err) = ctl(
        &["--server", &format!("127.0.0.1:{port}"), "push", "rm -rf /"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("PERMISSION_DENIED") && err.contains("beyond loopback"),
        "{err}"
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);
}

#[test]
fn in_a_work_queue_a_selector_gives_each_task_to_any_one_matching_agent() {
    let (mut srv, addr) = server(&["--dispatch", "queue"]);
    let mut agents = [
        agent_process(&addr, "web-1", "echo", &["--label", "role=web"]),
        agent_process(&addr, "web-2", "echo", &["--label", "role=web"]),
        agent_process(&addr, "db-1", "echo", &["--label", "role=db"]),
    ];
    wait_connected(&addr, 3);
    for i in 1..=6 {
        let (code, out, err) = ctl(
            &[
                "--server",
                &addr,
                "push",
                &format!("web-{i}"),
                "--target",
                "role=web",
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out.trim(),
            format!("job {i}: task {i} pushed to any one of 2 agents matching role=web")
        );
    }
    let (code, out, err) = ctl(
        &[
            "--server", &addr, "run", "db-only", "--target", "role=db", "--wait",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("db-1: ok\n    db-only\n"), "{out}");
    wait_for("six web tasks answered", || {
        let done: usize = agents[..2]
            .iter_mut()
            .map(|a| {
                a.lines_so_far()
                    .iter()
                    .filter(|l| l.contains(" done"))
                    .count()
            })
            .sum();
        done == 6
    });
    assert!(
        !agents[2].lines_so_far().iter().any(|l| l.contains("web-")),
        "db-1 got a web task"
    );
    for p in agents.iter_mut().chain([&mut srv]) {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }
}

/// The id, status and output of each agent row of job `job` (`--json job`).
fn job_rows(addr: &str, job: u64) -> Vec<(String, String, String)> {
    let (code, out, err) = ctl(&["--server", addr, "--json", "job", &job.to_string()], &[]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (field("agent"), field("status"), field("output"))
        })
        .collect()
}

#[test]
fn a_selector_job_waiting_for_agents_reaches_those_that_come_to_match_once_each() {
    let (mut srv, addr) = server(&[]);
    let mut web = agent_process(&addr, "web-1", "echo", &["--label", "role=web"]);
    wait_connected(&addr, 1);
    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "push",
            "migrate",
            "--target",
            "role=db",
            "--wait-for-agents",
            "--key",
            "mig-1",
        ],
        &[],
    );
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "job 1: no task yet, for 0 agents matching role=db now and any that come to match"
        ),
        "{err}"
    );
    let (_, out, _) = ctl(&["--server", &addr, "job", "1"], &[]);
    assert!(
        out.contains("(waiting for agents matching role=db)"),
        "{out}"
    );

    // Agents that come with the label get it, each once; others do not.
    let mut db1 = agent_process(&addr, "db-1", "echo", &["--label", "role=db"]);
    db1.wait_line("task 1 done");
    let mut db2 = agent_process(&addr, "db-2", "echo", &["--label", "role=db"]);
    db2.wait_line("task 2 done");
    wait_for("both answers in the job", || {
        job_rows(&addr, 1)
            == [
                ("db-1".into(), "ok".into(), "migrate".into()),
                ("db-2".into(), "ok".into(), "migrate".into()),
            ]
    });
    // A retried push with the same key is the same job.
    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "--json",
            "push",
            "migrate",
            "--target",
            "role=db",
            "--wait-for-agents",
            "--key",
            "mig-1",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let reply: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (reply["job_id"].as_u64(), reply["duplicate"].as_bool()),
        (Some(1), Some(true)),
        "{out}"
    );
    // db-1 comes back: it has had the task, it does not get it again.
    db1.signal("TERM");
    assert_eq!(db1.wait_exit(), 0);
    let mut db1 = agent_process(&addr, "db-1", "echo", &["--label", "role=db"]);
    wait_connected(&addr, 3);
    // Cancelled, the job takes no more agents.
    let (code, out, err) = ctl(&["--server", &addr, "cancel", "--job", "1"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, out, _) = ctl(&["--server", &addr, "job", "1"], &[]);
    assert!(!out.contains("waiting for agents"), "{out}");
    let mut db3 = agent_process(&addr, "db-3", "echo", &["--label", "role=db"]);
    wait_connected(&addr, 4);
    // Past a job check (200 ms) nothing more was published for the job.
    let (_, out, _) = ctl(
        &["--server", &addr, "push", "marker", "--agent", "db-3"],
        &[],
    );
    assert!(out.contains("task 3 pushed"), "{out}");
    db3.wait_line("task 3 done");
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert!(!db3.lines_so_far().iter().any(|l| l.contains("migrate")));
    assert!(!db1.lines_so_far().iter().any(|l| l.contains("migrate")));
    assert!(!web.lines_so_far().iter().any(|l| l.contains("migrate")));
    for p in [&mut web, &mut db1, &mut db2, &mut db3, &mut srv] {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }
}

#[test]
fn in_a_work_queue_a_waiting_selector_task_goes_to_the_first_agent_that_matches() {
    let (mut srv, addr) = server(&["--dispatch", "queue"]);
    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "push",
            "backup",
            "--target",
            "role=db",
            "--wait-for-agents",
        ],
        &[],
    );
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "job 1: no task yet, for any one agent matching role=db, when one connects"
        ),
        "{err}"
    );
    let mut web = agent_process(&addr, "web-1", "echo", &["--label", "role=web"]);
    let mut db1 = agent_process(&addr, "db-1", "echo", &["--label", "role=db"]);
    db1.wait_line("task 1 done");
    wait_for("db-1's answer in the job", || {
        job_rows(&addr, 1) == [("db-1".into(), "ok".into(), "backup".into())]
    });
    let (_, out, _) = ctl(&["--server", &addr, "job", "1"], &[]);
    assert!(!out.contains("waiting for agents"), "one task, once: {out}");
    // With agents there already, the task is published at once.
    let (code, out, err) = ctl(
        &[
            "--server",
            &addr,
            "push",
            "vacuum",
            "--target",
            "role=db",
            "--wait-for-agents",
        ],
        &[],
    );
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "job 2: task 2 pushed to any one of 1 agent matching role=db"
        ),
        "{err}"
    );
    db1.wait_line("task 2 done");
    // Rollout limits count agents; a queue task goes to one.
    let (code, _, err) = ctl(
        &[
            "--server",
            &addr,
            "push",
            "x",
            "--target",
            "role=cache",
            "--wait-for-agents",
            "--max-concurrency",
            "1",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("FAILED_PRECONDITION"), "{err}");
    assert!(!web.lines_so_far().iter().any(|l| l.contains("task ")));
    for p in [&mut web, &mut db1, &mut srv] {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }
}

#[test]
fn settings_come_from_config_files_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(path("secret"), "integration test secret, 32 bytes!").unwrap();
    let token = |args: &[&str]| mint_token(&path("secret"), args);
    std::fs::write(path("ops.token"), token(&["--admin", "ops"])).unwrap();
    std::fs::write(path("db-1.token"), token(&["db-1"])).unwrap();
    std::fs::write(
        path("server.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nno_state = true\ntasks-from = \"/dev/null\"\nauth-secret = {:?}\n",
            path("secret")
        ),
    )
    .unwrap();
    let mut srv = Proc::start(SERVER_BIN, &["--config", &path("server.toml")]);
    let line = srv.wait_line("listening on");
    assert!(line.contains("tokens required"), "{line}");
    let addr = format!("127.0.0.1:{}", port_of_listening_line(&line));
    std::fs::write(
        path("agent.toml"),
        format!(
            "server = {addr:?}\ntoken-file = {:?}\nlabel = [\"role=db\", \"zone=eu\"]\nexec = \"echo\"\n",
            path("db-1.token")
        ),
    )
    .unwrap();
    let mut agent = Proc::start(CLIENT_BIN, &["--config", &path("agent.toml")]);
    agent.wait_line("connected to");
    // contact-ctl reads ~/.config/contact/ctl.toml (here under XDG_CONFIG_HOME).
    std::fs::create_dir_all(dir.path().join("contact")).unwrap();
    std::fs::write(
        dir.path().join("contact/ctl.toml"),
        format!("server = {addr:?}\ntoken-file = {:?}\n", path("ops.token")),
    )
    .unwrap();
    let home = [("XDG_CONFIG_HOME", dir.path().to_str().unwrap())];
    let (code, out, err) = ctl(
        &["run", "hi", "--target", "role=db,zone=eu", "--wait"],
        &home,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("db-1: ok\n    hi\n"), "{out}");
    // A flag wins over the file: nothing listens on port 1.
    let (code, _, err) = ctl(&["--server", "127.0.0.1:1", "clients"], &home);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the server at 127.0.0.1:1"),
        "{err}"
    );
    // Without the file's token the server refuses.
    let (code, _, err) = ctl(&["--server", &addr, "clients"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("UNAUTHENTICATED"), "{err}");

    // Mistakes are usage errors that say where they are.
    std::fs::write(path("bad.toml"), "no-state = true\nevery = \"soon\"\n").unwrap();
    let mut bad = Proc::start(SERVER_BIN, &["--config", &path("bad.toml")]);
    assert_eq!(bad.wait_exit(), 2);
    let log = bad.whole_log().join("\n");
    assert!(log.contains("\"soon\""), "{log}");
    assert!(
        log.contains("--every was set by the config file") && log.contains("bad.toml, line 2"),
        "{log}"
    );
    std::fs::write(path("typo.toml"), "sevrer = \"x\"\n").unwrap();
    let (code, _, err) = ctl(&["--config", &path("typo.toml"), "clients"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("typo.toml, line 1: unknown setting `sevrer`"),
        "{err}"
    );
    let (code, _, err) = ctl(&["--config", &path("missing.toml"), "clients"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the config file"), "{err}");
    for p in [&mut agent, &mut srv] {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }
}
