//! Liveness: HTTP/2 keepalive on both sides with settings that agree (an idle
//! connection survives its pings), and a client that stops answering is
//! found out by keepalive alone and loses its tasks.

mod common;

use common::*;
use contact::dispatch::Mode;
use contact::shutdown::Shutdown;
use std::time::{Duration, Instant};

#[test]
fn an_idle_connection_with_frequent_keepalive_pings_is_not_dropped() {
    let mut config = server_config();
    config.keepalive = Duration::from_secs(1);
    let server = start_server(config);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "idle");
    c.keepalive = Duration::from_secs(1);
    c.status_every = Duration::from_secs(60);
    let client = spawn_client(c, &stop);
    wait_for("the client to connect", || {
        server.dispatcher().clients().len() == 1
    });
    // Several keepalive intervals with no data on the connection: a server
    // that found the pings too frequent would answer with GOAWAY.
    let idle_until = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < idle_until {
        assert_eq!(
            server.dispatcher().clients().len(),
            1,
            "the idle client stays connected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    publish(&server, "wake", 1);
    wait_for("the task to be answered", || {
        server.dispatcher().counters().results == 1
    });
    stop.trigger();
    let report = client.join().unwrap();
    assert_eq!(report.connections, 1, "never reconnected: {report:?}");
    server.stop().unwrap();
}

#[test]
fn keepalive_finds_a_stopped_client_and_its_tasks_move_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = server_config().with_results(&path);
    config.dispatch.mode = Mode::Queue;
    config.dispatch.max_in_flight = 2;
    // Status-based liveness and ack deadlines far away: only keepalive can act.
    config.dispatch.client_timeout = None;
    config.dispatch.ack_timeout = Duration::from_secs(600);
    config.keepalive = Duration::from_secs(1);
    config.keepalive_timeout = Duration::from_secs(1);
    let server = start_server(config);
    let addr = format!("127.0.0.1:{}", server.port());
    let frozen = Proc::start(
        CLIENT_BIN,
        &[
            "--server",
            &addr,
            "--id",
            "frozen",
            "--exec",
            "sh -c 'sleep 10'",
        ],
    );
    wait_for("the frozen client to connect", || {
        server.dispatcher().clients().len() == 1
    });
    publish(&server, "job", 2);
    wait_for("it to hold both tasks", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.in_flight == 2)
    });
    frozen.signal("STOP");
    let stop = Shutdown::new();
    let helper = spawn_client(client_config(server.port(), "helper"), &stop);
    wait_for("keepalive to give its tasks to the helper", || {
        server.dispatcher().unfinished() == 0
    });
    stop.trigger();
    helper.join().unwrap();
    frozen.signal("CONT");
    server.stop().unwrap();
    let results = read_results(&path);
    assert_eq!(accepted_per_task(&results).len(), 2);
    assert!(results
        .iter()
        .filter(|r| r["accepted"] == true)
        .all(|r| r["client"] == "helper"));
}
