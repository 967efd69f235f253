//! Delivery guarantees end to end: queue dispatch, redelivery when a client
//! dies or stalls, fencing of late results, and broadcast resume — with
//! client processes that are really killed and stopped.

mod common;

use common::*;
use contact::dispatch::Mode;
use contact::server::ServerConfig;
use contact::shutdown::Shutdown;
use std::path::Path;
use std::time::Duration;

fn queue_config(results: &Path) -> ServerConfig {
    let mut c = server_config().with_results(results);
    c.dispatch.mode = Mode::Queue;
    c
}

fn client_proc(port: u16, id: &str, extra: &[&str]) -> Proc {
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--server",
        &addr,
        "--id",
        id,
        "--backoff-max",
        "0.3",
        "--status-every",
        "0.2",
        "--ack-interval",
        "0.05",
    ];
    args.extend_from_slice(extra);
    Proc::start(CLIENT_BIN, &args)
}

#[test]
fn queue_mode_with_three_clients_answers_every_task_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(queue_config(&path));
    let stop = Shutdown::new();
    let clients: Vec<_> = ["q1", "q2", "q3"]
        .iter()
        .map(|id| spawn_client(client_config(server.port(), id), &stop))
        .collect();
    wait_for("three clients", || server.dispatcher().clients().len() == 3);
    publish(&server, "job", 1000);
    wait_for("every task answered", || {
        server.dispatcher().unfinished() == 0 && read_results(&path).len() >= 1000
    });
    stop.trigger();
    let handled: u64 = clients.into_iter().map(|c| c.join().unwrap().handled).sum();
    server.stop().unwrap();
    let results = read_results(&path);
    let per_task = accepted_per_task(&results);
    assert_eq!(per_task.len(), 1000);
    assert!(
        per_task.values().all(|&n| n == 1),
        "each task exactly one accepted result"
    );
    assert_eq!(handled, 1000, "no task was handled twice");
    for id in ["q1", "q2", "q3"] {
        assert!(results.iter().any(|r| r["client"] == id), "{id} got work");
    }
}

#[test]
fn the_tasks_of_a_killed_client_are_completed_by_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = queue_config(&path);
    config.dispatch.max_in_flight = 4;
    let server = start_server(config);
    // The victim takes four tasks and sits on them.
    let mut victim = client_proc(server.port(), "victim", &["--exec", "sh -c 'sleep 10'"]);
    wait_for("the victim to connect", || {
        server.dispatcher().clients().len() == 1
    });
    publish(&server, "job", 12);
    wait_for("the victim to hold four tasks", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.id == "victim" && c.in_flight == 4)
    });
    let stop = Shutdown::new();
    let helpers: Vec<_> = ["h1", "h2"]
        .iter()
        .map(|id| spawn_client(client_config(server.port(), id), &stop))
        .collect();
    wait_for("the other tasks to be answered", || {
        accepted_per_task(&read_results(&path)).len() == 8
    });

    victim.signal("KILL");
    victim.wait_exit();
    wait_for("the victim's tasks to be completed by others", || {
        server.dispatcher().unfinished() == 0
    });
    stop.trigger();
    for h in helpers {
        h.join().unwrap();
    }
    server.stop().unwrap();
    let results = read_results(&path);
    let per_task = accepted_per_task(&results);
    assert_eq!(per_task.len(), 12);
    assert!(per_task.values().all(|&n| n == 1));
    assert!(results.iter().all(|r| r["client"] != "victim"));
    let redelivered: Vec<_> = results.iter().filter(|r| r["attempt"] == 2).collect();
    assert_eq!(
        redelivered.len(),
        4,
        "the four held tasks were delivered a second time"
    );
}

#[test]
fn a_stopped_client_loses_its_tasks_and_its_late_results_are_stale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = queue_config(&path);
    config.dispatch.max_in_flight = 2;
    config.dispatch.client_timeout = Some(Duration::from_millis(1500));
    let server = start_server(config);
    let sleeper = client_proc(
        server.port(),
        "sleeper",
        &["--exec", "sh -c 'sleep 0.5; echo woke $0'"],
    );
    wait_for("the sleeper to connect", || {
        server.dispatcher().clients().len() == 1
    });
    publish(&server, "job", 2);
    wait_for("the sleeper to hold both tasks", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.in_flight == 2)
    });
    sleeper.signal("STOP");

    let stop = Shutdown::new();
    let helper = spawn_client(client_config(server.port(), "helper"), &stop);
    wait_for("the helper to finish the sleeper's tasks", || {
        server.dispatcher().unfinished() == 0
    });
    sleeper.signal("CONT");
    wait_for("the sleeper's late results, fenced", || {
        read_results(&path)
            .iter()
            .filter(|r| r["client"] == "sleeper" && r["stale"] == true)
            .count()
            >= 1
    });
    stop.trigger();
    helper.join().unwrap();
    server.stop().unwrap();
    let results = read_results(&path);
    let per_task = accepted_per_task(&results);
    assert_eq!(per_task.len(), 2);
    assert!(
        per_task.values().all(|&n| n == 1),
        "a late result never counts twice"
    );
    assert!(results
        .iter()
        .filter(|r| r["accepted"] == true)
        .all(|r| r["client"] == "helper"));
}

#[test]
fn a_broadcast_client_restarted_with_the_same_id_gets_only_what_it_had_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&path));
    publish(&server, "t", 5);
    let stop = Shutdown::new();
    let mut first = client_config(server.port(), "resumer");
    first.max_tasks = Some(3);
    assert_eq!(spawn_client(first, &stop).join().unwrap().acknowledged, 3);
    wait_for("the first run to be gone", || {
        server.dispatcher().clients().is_empty()
    });

    let mut second = client_config(server.port(), "resumer");
    second.max_tasks = Some(2);
    assert_eq!(spawn_client(second, &stop).join().unwrap().acknowledged, 2);
    server.stop().unwrap();
    let results = read_results(&path);
    let ids: Vec<u64> = results
        .iter()
        .filter(|r| r["accepted"] == true)
        .map(|r| r["task_id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![1, 2, 3, 4, 5],
        "each task answered once, in order"
    );
    assert!(results.iter().all(|r| r["stale"] == false));
}

#[test]
fn refused_tasks_are_retried_then_dead_lettered_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let dead = dir.path().join("dead.jsonl");
    let mut config = queue_config(&path);
    config.dead_letters = Some(dead.clone());
    config.dispatch.max_attempts = 3;
    config.dispatch.retry_backoff = contact::dispatch::RetryBackoff {
        min: Duration::from_millis(300),
        max: Duration::from_secs(1),
    };
    let server = start_server(config);
    server.dispatcher().publish(vec![
        (None, "refuse".to_string()),
        (None, "fine".to_string()),
    ]);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "picky");
    // Exit status 75 refuses the task and asks for a retry.
    c.handler =
        contact::handler::Handler::exec("sh -c 'test $0 = fine || exit 75; echo ok'", 100).unwrap();
    let client = spawn_client(c, &stop);
    wait_for("the refused task to be dead-lettered", || {
        read_results(&dead).len() == 1
    });
    wait_for("everything finished", || {
        server.dispatcher().unfinished() == 0
    });
    stop.trigger();
    client.join().unwrap();
    server.stop().unwrap();
    let letter = &read_results(&dead)[0];
    assert_eq!(
        (letter["task"].clone(), letter["attempts"].clone()),
        ("refuse".into(), 3.into())
    );
    assert!(
        letter["reason"].as_str().unwrap().starts_with("refused"),
        "{letter}"
    );
    let results = read_results(&path);
    let refusals: Vec<f64> = results
        .iter()
        .filter(|r| r["retry"] == true)
        .map(|r| r["received_at"].as_f64().unwrap())
        .collect();
    assert_eq!(refusals.len(), 3);
    // Each refusal waited out its backoff (300 ms, then 600 ms, less up to
    // half at random) before the next attempt was delivered and refused.
    let waits: Vec<f64> = refusals.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        waits[0] >= 0.15 && waits[1] >= 0.3,
        "retried too soon: {waits:?}"
    );
    assert_eq!(
        accepted_per_task(&results).into_iter().collect::<Vec<_>>(),
        vec![(2, 1)]
    );
}

#[test]
fn targeted_tasks_wait_for_their_client_in_queue_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(queue_config(&path));
    let stop = Shutdown::new();
    let other = spawn_client(client_config(server.port(), "other"), &stop);
    wait_for("the other client", || {
        server.dispatcher().clients().len() == 1
    });
    server.dispatcher().publish(vec![(
        Some("late".to_string()),
        "only for late".to_string(),
    )]);
    let mut late = client_config(server.port(), "late");
    late.max_tasks = Some(1);
    assert_eq!(spawn_client(late, &stop).join().unwrap().acknowledged, 1);
    stop.trigger();
    other.join().unwrap();
    server.stop().unwrap();
    let results = read_results(&path);
    assert_eq!(results.len(), 1);
    assert_eq!(
        (results[0]["client"].clone(), results[0]["task"].clone()),
        ("late".into(), "only for late".into())
    );
}

#[test]
fn a_long_task_keeps_its_lease_while_its_agent_works_and_waiting_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = queue_config(&path);
    // Each task runs 2.5 ack timeouts, one at a time at the agent.
    config.dispatch.ack_timeout = Duration::from_secs(1);
    config.dispatch.max_in_flight = 3;
    let server = start_server(config);
    // Status every 30 s: its progress reports follow the server's ack
    // timeout (sent with each task), not the status interval.
    let addr = format!("127.0.0.1:{}", server.port());
    let worker = agent_process(
        &addr,
        "worker",
        "sh -c 'sleep 2.5; echo done $0'",
        &["--status-every", "30"],
    );
    wait_for("the worker to connect", || {
        server.dispatcher().clients().len() == 1
    });
    publish(&server, "long", 2);
    // An idle agent beside it must not take the waiting task away.
    let idle = client_proc(server.port(), "idle", &[]);
    wait_for("both tasks answered", || {
        accepted_per_task(&read_results(&path)).len() == 2
    });
    server.stop().unwrap();
    drop((worker, idle));
    let results = read_results(&path);
    assert_eq!(server_redeliveries(&results), 0, "{results:#?}");
    assert!(
        results
            .iter()
            .all(|r| r["client"] == "worker" && r["accepted"] == true && r["attempt"] == 1),
        "{results:#?}"
    );
}

/// Results that answer a redelivery (attempt > 1), or that came too late.
fn server_redeliveries(results: &[serde_json::Value]) -> usize {
    results
        .iter()
        .filter(|r| r["attempt"].as_u64() != Some(1) || r["stale"] == true)
        .count()
}

#[test]
fn an_agent_whose_program_vanished_refuses_steps_aside_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let dead = dir.path().join("dead.jsonl");
    let program = dir.path().join("work.sh");
    let install = || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&program, "#!/bin/sh\necho worked \"$1\"\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    install();
    let mut config = queue_config(&path);
    config.dead_letters = Some(dead.clone());
    config.dispatch.max_attempts = 2;
    let server = start_server(config);
    let program_arg = program.display().to_string();
    let mut broken = client_proc(server.port(), "broken", &["--exec", &program_arg]);
    wait_for("the agent to connect", || {
        server.dispatcher().clients().len() == 1
    });
    // It checked its program at start; now the program goes away.
    std::fs::remove_file(&program).unwrap();
    publish(&server, "job", 4);
    broken.wait_line("takes no tasks until it can run it");
    wait_for("the broken agent to step aside", || {
        server.dispatcher().clients().is_empty()
    });
    // Everything waits for an agent that can work, none of it failed or dead.
    let healthy = client_proc(server.port(), "healthy", &["--exec", "echo"]);
    wait_for("every task answered", || {
        server.dispatcher().unfinished() == 0
    });
    // With its program back, it takes tasks again.
    install();
    broken.wait_line("can be run again");
    wait_for("the agent back", || {
        server.dispatcher().clients().len() == 2
    });
    server.stop().unwrap();
    drop((broken, healthy));
    let results = read_results(&path);
    assert_eq!(accepted_per_task(&results).len(), 4, "{results:#?}");
    let refusals: Vec<_> = results.iter().filter(|r| r["retry"] == true).collect();
    assert_eq!(
        refusals.len(),
        1,
        "one refusal, then it stepped aside: {results:#?}"
    );
    assert_eq!(refusals[0]["client"], "broken");
    assert!(
        results
            .iter()
            .filter(|r| r["accepted"] == true)
            .all(|r| r["client"] == "healthy" && r["ok"] == true),
        "{results:#?}"
    );
    assert!(read_results(&dead).is_empty(), "nothing dead-lettered");
}
