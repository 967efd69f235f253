//! Durable state (`--state-dir`): a server killed with -9 and restarted on
//! the same directory loses nothing it accepted and repeats nothing that was
//! acknowledged; damaged state is refused or, for a torn tail, trimmed.

mod common;

use common::*;
use contact::dispatch::Mode;
use contact::journal::{self, Record};
use contact::server::{Server, ServerConfig};
use contact::shutdown::Shutdown;
use std::collections::BTreeSet;
use std::path::Path;

fn durable_config(state: &Path, results: &Path, mode: Mode) -> ServerConfig {
    let mut c = server_config().with_results(results);
    c.state_dir = Some(state.to_path_buf());
    c.dispatch.mode = mode;
    c
}

#[test]
fn kill_9_the_server_mid_run_and_restart_it_on_the_same_state() {
    const N: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let (state, results) = (dir.path().join("state"), dir.path().join("results.jsonl"));
    let tasks = dir.path().join("tasks.txt");
    std::fs::write(
        &tasks,
        (0..N).map(|i| format!("job-{i}\n")).collect::<String>(),
    )
    .unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let server_args = |tasks: &Path, listen: &str| -> Vec<String> {
        [
            "--listen",
            listen,
            "--dispatch",
            "queue",
            "--state-dir",
            state.to_str().unwrap(),
            "--tasks-from",
            tasks.to_str().unwrap(),
            "--results-to",
            results.to_str().unwrap(),
            "--max-in-flight",
            "8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = server_args(&tasks, "127.0.0.1:0");
    let mut server = Proc::start(
        SERVER_BIN,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let line = server.wait_line("listening on");
    let addr = format!("127.0.0.1:{}", port_of_listening_line(&line));
    let exec = "sh -c 'sleep 0.01; echo done $0'";
    let mut clients: Vec<Proc> = ["k1", "k2"]
        .iter()
        .map(|id| agent_process(&addr, id, exec))
        .collect();
    wait_for("some results before the crash", || {
        read_results(&results).len() >= 60
    });
    server.signal("KILL");
    server.wait_exit();
    let before_restart = read_results(&results).len();
    assert!((before_restart as u64) < N, "the crash came mid-run");

    let args = server_args(&empty, &addr);
    let mut server = Proc::start(
        SERVER_BIN,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    server.wait_line("listening on");
    server.wait_line("unfinished");
    wait_for("every task answered after the restart", || {
        accepted_per_task(&read_results(&results)).len() as u64 == N
    });
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);
    for c in &mut clients {
        c.signal("TERM");
        c.wait_exit();
    }

    let all = read_results(&results);
    let per_task = accepted_per_task(&all);
    assert_eq!(per_task.len() as u64, N);
    assert!(
        per_task.values().all(|&n| n == 1),
        "exactly one accepted result per task"
    );
    let mut lines = BTreeSet::new();
    for r in &all {
        let key = (
            r["task_id"].as_u64(),
            r["client"].to_string(),
            r["attempt"].as_u64(),
        );
        assert!(
            lines.insert(key.clone()),
            "duplicate line in the results file: {key:?}\n{:#?}",
            all.iter()
                .filter(|x| x["task_id"] == r["task_id"])
                .collect::<Vec<_>>()
        );
    }
    // Nothing acknowledged was delivered again to the client that answered
    // it: in the journal (as compacted at the restart), no delivery of a task
    // to a client follows that client's accepted answer to it.
    let mut answered = BTreeSet::new();
    let mut deliveries_after_restart = 0;
    for r in journal::read_records(&state.join("journal")).unwrap() {
        match r {
            Record::Done { task, client, .. } => {
                answered.insert((client, task));
            }
            Record::Result(r) if r.accepted => {
                answered.insert((r.client, r.task_id.unwrap()));
            }
            Record::Sent {
                task,
                client,
                attempt,
            } => {
                deliveries_after_restart += 1;
                assert!(
                    !answered.contains(&(client.clone(), task)),
                    "task {task} sent again to {client} (attempt {attempt}) after it answered"
                );
            }
            _ => {}
        }
    }
    assert!(
        deliveries_after_restart > 0,
        "the restarted server did deliver tasks"
    );
}

#[test]
fn unfinished_queue_tasks_and_broadcast_progress_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let results = dir.path().join("results.jsonl");
    // Queue: ten tasks, nobody to take them, the server stops.
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    publish(&server, "q", 10);
    server.stop().unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    assert_eq!(server.dispatcher().unfinished(), 10);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "after");
    c.max_tasks = Some(10);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 10);
    server.stop().unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    assert_eq!(
        server.dispatcher().unfinished(),
        0,
        "answered tasks stay answered"
    );
    server.stop().unwrap();

    // Broadcast: a client answers three of five, the server restarts, it gets only the last two.
    let state = dir.path().join("bstate");
    let results = dir.path().join("bresults.jsonl");
    let server = start_server(durable_config(&state, &results, Mode::Broadcast));
    publish(&server, "b", 5);
    let mut c = client_config(server.port(), "steady");
    c.max_tasks = Some(3);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 3);
    server.stop().unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Broadcast));
    let mut c = client_config(server.port(), "steady");
    c.max_tasks = Some(2);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 2);
    server.stop().unwrap();
    let ids: Vec<u64> = read_results(&results)
        .iter()
        .filter(|r| r["accepted"] == true)
        .map(|r| r["task_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
}

#[test]
fn the_journal_is_compacted_and_still_replays_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let results = dir.path().join("results.jsonl");
    let mut config = durable_config(&state, &results, Mode::Queue);
    config.compact_bytes = 16 * 1024;
    config.dispatch.retain = 50;
    let server = start_server(config.clone());
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "worker");
    c.max_tasks = Some(400);
    let client = spawn_client(c, &stop);
    for i in 0..5 {
        publish(&server, &format!("round{i}"), 100);
    }
    assert_eq!(client.join().unwrap().acknowledged, 400);
    wait_for("a compaction", || {
        std::fs::metadata(state.join("journal")).unwrap().len() < 64 * 1024
    });
    server.stop().unwrap();
    let server = start_server(config);
    assert_eq!(
        server.dispatcher().unfinished(),
        100,
        "the last hundred are still to do"
    );
    server.stop().unwrap();
    assert_eq!(accepted_per_task(&read_results(&results)).len(), 400);
}

#[test]
fn a_damaged_journal_is_refused_and_a_torn_tail_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let results = dir.path().join("results.jsonl");
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    publish(&server, "t", 3);
    server.stop().unwrap();
    let journal = state.join("journal");
    let good = std::fs::read(&journal).unwrap();

    // A flipped byte in the middle: refuse to start, saying where and what to do.
    let mut bad = good.clone();
    bad[12] ^= 0x55;
    std::fs::write(&journal, &bad).unwrap();
    let err = Server::start(durable_config(&state, &results, Mode::Queue))
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("damaged") && msg.contains(journal.to_str().unwrap()),
        "{msg}"
    );
    let out = std::process::Command::new(SERVER_BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
            "--tasks-from",
            "/dev/null",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The last record cut short: the intact prefix is served, with a warning.
    std::fs::write(&journal, &good[..good.len() - 5]).unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    assert_eq!(
        server.dispatcher().unfinished(),
        2,
        "tasks 1 and 2 survive; the torn third is dropped"
    );
    server.stop().unwrap();
}

#[test]
fn a_redelivery_after_a_restart_is_answered_without_running_the_task_again() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (first, second) = (
        dir.path().join("first.jsonl"),
        dir.path().join("second.jsonl"),
    );
    let runs = dir.path().join("runs.txt");
    let mut config = durable_config(&state, &first, Mode::Broadcast);
    config.grace = std::time::Duration::from_millis(200);
    let server = start_server(config);
    let port = server.port();
    publish(&server, "t", 2);
    let stop = Shutdown::new();
    let mut c = client_config(port, "careful");
    let script = format!("echo $0 >> {}; sleep 0.5; echo ran $0", runs.display());
    c.handler = contact::handler::Handler::exec(&format!("sh -c '{script}'"), 100).unwrap();
    let client = spawn_client(c, &stop);
    wait_for("the first task to start", || {
        std::fs::read_to_string(&runs).is_ok_and(|r| !r.is_empty())
    });
    // Stop while the task runs: its result cannot be reported to this server.
    server.stop().unwrap();

    let mut config = durable_config(&state, &second, Mode::Broadcast);
    config.listen = format!("127.0.0.1:{port}");
    let server = start_server(config);
    wait_for("both tasks answered", || {
        accepted_per_task(&read_results(&second)).len() == 2
    });
    stop.trigger();
    client.join().unwrap();
    server.stop().unwrap();
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "t-0\nt-1\n",
        "each task ran once"
    );
    let results = read_results(&second);
    assert!(results.iter().all(|r| r["stale"] == false), "{results:?}");
    assert_eq!(
        accepted_per_task(&results)
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![1, 1]
    );
}
