//! Volume end to end: an in-process server without state (`--no-state`) and
//! our client library over a real socket, at full speed, in queue and in
//! broadcast mode. Every task must get exactly one result — none lost, none
//! sent twice, none delivered twice — and every result its acknowledgement.
//! 100,000 tasks run in the test command; 1,000,000 take longer than a
//! minute in the dev profile and are `#[ignore]`d (run them with
//! `cargo test --release --test volume -- --ignored`).

mod common;

use common::*;
use contact::client::{self, ClientConfig};
use contact::dispatch::Mode;
use contact::shutdown::Shutdown;
use std::time::{Duration, Instant};

/// Tasks published but not answered yet, at most: the producer keeps ahead
/// of the client without holding the whole run in memory (in broadcast a
/// client reads the task log, which keeps `retain` tasks).
const AHEAD: u64 = 50_000;

/// Tasks published at once.
const CHUNK: u64 = 10_000;

fn tasks_get_exactly_one_result_each(mode: Mode, n: u64) {
    let mut config = server_config();
    config.dispatch.mode = mode;
    let server = start_server(config);
    let dispatcher = server.dispatcher().clone();
    let mut agent = ClientConfig::new(format!("127.0.0.1:{}", server.port()), "volume");
    agent.max_tasks = Some(n);
    let started = Instant::now();
    let client = std::thread::spawn(move || client::run(&agent, &Shutdown::new()));
    let mut published = 0;
    while published < n {
        let c = dispatcher.counters();
        if c.produced - c.results < AHEAD {
            let count = CHUNK.min(n - published);
            dispatcher.publish((published..published + count).map(|i| (None, format!("v-{i}"))));
            published += count;
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let report = client.join().expect("client thread").expect("client runs");
    let elapsed = started.elapsed();
    eprintln!(
        "{mode:?}: {n} tasks in {elapsed:.1?}, {:.0} round trips/s",
        n as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(report.acknowledged, n, "every result acknowledged");
    let c = dispatcher.counters();
    assert_eq!(c.produced, n);
    assert_eq!(c.results, n, "one result per task, none sent twice");
    // (A task the client still held when it ended its task stream is
    // counted as taken back, and its late answer accepted: not redelivered.)
    assert_eq!(c.sent, n, "no task delivered twice");
    assert_eq!(c.dead, 0);
    assert_eq!(dispatcher.in_flight(), 0);
    if mode == Mode::Queue {
        assert_eq!(dispatcher.unfinished(), 0, "every task finished");
    }
    assert_eq!(
        server.stop().expect("server stops"),
        n,
        "every result recorded"
    );
}

#[test]
fn a_hundred_thousand_tasks_in_queue_mode_each_get_one_result_and_every_ack_arrives() {
    tasks_get_exactly_one_result_each(Mode::Queue, 100_000);
}

#[test]
fn a_hundred_thousand_tasks_in_broadcast_each_get_one_result_and_every_ack_arrives() {
    tasks_get_exactly_one_result_each(Mode::Broadcast, 100_000);
}

#[test]
#[ignore = "over a minute in the dev profile: run with --release -- --ignored (scripts/bench.sh)"]
fn a_million_tasks_in_queue_mode_each_get_one_result_and_every_ack_arrives() {
    tasks_get_exactly_one_result_each(Mode::Queue, 1_000_000);
}

#[test]
#[ignore = "over a minute in the dev profile: run with --release -- --ignored (scripts/bench.sh)"]
fn a_million_tasks_in_broadcast_each_get_one_result_and_every_ack_arrives() {
    tasks_get_exactly_one_result_each(Mode::Broadcast, 1_000_000);
}
