//! Broadcast dispatch end to end: our client library against a real server
//! over real sockets — several clients, late joiners, `--from new`, a server
//! restart, and the `--exec` handler.

mod common;

use common::*;
use contact::dispatch::StartAt;
use contact::handler::Handler;
use contact::shutdown::Shutdown;

#[test]
fn every_client_gets_every_task_in_order_and_results_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&path));
    publish(&server, "t", 50);
    let stop = Shutdown::new();
    let clients: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| {
            let mut c = client_config(server.port(), id);
            c.max_tasks = Some(50);
            spawn_client(c, &stop)
        })
        .collect();
    for c in clients {
        let report = c.join().unwrap();
        assert_eq!(report.acknowledged, 50);
    }
    let results = read_results(&path);
    for id in ["a", "b", "c"] {
        // Every task answered once. (A client writes on the next `tellResult`
        // call while the last one awaits its answer, and the server reads
        // calls side by side: results of neighbouring calls may be recorded
        // interleaved.)
        let mut answered = accepted_ids(&results, id);
        answered.sort_unstable();
        assert_eq!(answered, (1..=50).collect::<Vec<_>>(), "client {id}");
    }
    let first = results.iter().find(|r| r["client"] == "a").unwrap();
    assert_eq!(first["output"], "client received task: t-0");
    assert_eq!(first["ok"], true);
    server.stop().unwrap();
}

#[test]
fn a_late_client_gets_the_history_first_then_new_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&path));
    publish(&server, "old", 5);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "late");
    c.max_tasks = Some(8);
    let client = spawn_client(c, &stop);
    wait_for("the history to be answered", || {
        accepted_ids(&read_results(&path), "late").len() == 5
    });
    publish(&server, "new", 3);
    assert_eq!(client.join().unwrap().acknowledged, 8);
    let results = read_results(&path);
    assert_eq!(accepted_ids(&results, "late"), (1..=8).collect::<Vec<_>>());
    assert_eq!(results[7]["task"], "new-2");
    server.stop().unwrap();
}

#[test]
fn from_new_skips_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = server_config().with_results(&path);
    config.dispatch.start_at = StartAt::New;
    let server = start_server(config);
    publish(&server, "old", 5);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "fresh");
    c.max_tasks = Some(2);
    let client = spawn_client(c, &stop);
    wait_for("the client to connect", || {
        !server.dispatcher().clients().is_empty()
    });
    publish(&server, "new", 2);
    assert_eq!(client.join().unwrap().acknowledged, 2);
    assert_eq!(accepted_ids(&read_results(&path), "fresh"), vec![6, 7]);
    server.stop().unwrap();
}

#[test]
fn a_client_reconnects_and_keeps_working_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first_path = dir.path().join("first.jsonl");
    let second_path = dir.path().join("second.jsonl");
    let server = start_server(server_config().with_results(&first_path));
    let port = server.port();
    publish(&server, "before", 3);
    let stop = Shutdown::new();
    let client = spawn_client(client_config(port, "survivor"), &stop);
    wait_for("results before the restart", || {
        accepted_ids(&read_results(&first_path), "survivor").len() == 3
    });
    server.stop().unwrap();

    let mut config = server_config().with_results(&second_path);
    config.listen = format!("127.0.0.1:{port}");
    let server = start_server(config);
    publish(&server, "after", 4);
    wait_for("results after the restart", || {
        accepted_ids(&read_results(&second_path), "survivor").len() == 4
    });
    stop.trigger();
    let report = client.join().unwrap();
    assert!(report.connections >= 2, "{report:?}");
    assert_eq!(report.acknowledged, 7);
    assert_eq!(read_results(&second_path)[3]["task"], "after-3");
    server.stop().unwrap();
}

#[test]
fn exec_results_carry_the_commands_status_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&path));
    server
        .dispatcher()
        .publish(vec![(None, "0".to_string()), (None, "7".to_string())]);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "runner");
    c.handler = Handler::exec("sh -c 'echo ran $0; exit $0'", 1000).unwrap();
    c.max_tasks = Some(2);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 2);
    let results = read_results(&path);
    assert_eq!(
        (results[0]["ok"].clone(), results[0]["output"].clone()),
        (true.into(), "ran 0".into())
    );
    assert_eq!(
        (results[1]["ok"].clone(), results[1]["output"].clone()),
        (false.into(), "exit status 7: ran 7".into())
    );
    server.stop().unwrap();
}

#[test]
fn shutdown_lets_clients_report_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&path));
    publish(&server, "t", 3);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "slow");
    // Each task takes a while: the stop arrives while tasks are in the client's hands.
    c.handler = Handler::exec("sh -c 'sleep 0.3; echo done $0'", 100).unwrap();
    let client = spawn_client(c, &stop);
    wait_for("the client to hold tasks", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.in_flight == 3)
    });
    let recorded = server.stop().unwrap();
    stop.trigger();
    client.join().unwrap();
    assert_eq!(
        recorded, 3,
        "the three tasks it held were reported during the grace period"
    );
    assert_eq!(accepted_ids(&read_results(&path), "slow"), vec![1, 2, 3]);
}
