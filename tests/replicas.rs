//! Several `contact-server` replicas sharing one fleet through NATS
//! JetStream (`--store nats://...`), against real `nats-server` processes
//! this binary starts: one node, or three in a cluster on loopback. Its tests
//! start clusters, replicas and agents of their own and take one machine's
//! worth of processes each: they run one at a time (`--test-threads=1`, as
//! scripts/test.sh does, and a lock here for a plain `cargo test`). Without
//! nats-server they are skipped with a message, and fail with `CI=true`.

mod common;

use common::cutproxy::CutProxy;
use common::nats::NatsCluster;
use common::*;
use std::sync::{Mutex, MutexGuard};

/// Held by each test for its whole run: one test at a time, even when the
/// harness runs several threads.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn the_test_cluster_forms_survives_a_killed_node_and_takes_it_back() {
    let _one = one_at_a_time();
    let Some(mut nats) = NatsCluster::start(3, "the test cluster") else {
        return;
    };
    assert_eq!(nats.urls().split(',').count(), 3, "{}", nats.urls());
    let leader = nats.meta_leader_seen_by(0).expect("a meta leader");
    let leader_index = (0..3)
        .find(|&i| format!("n{i}") == leader)
        .unwrap_or_else(|| panic!("meta leader {leader:?} is none of n0..n2"));

    // The leader is the node whose loss matters: kill it.
    nats.kill9(leader_index);
    assert_eq!(nats.running().len(), 2);
    nats.wait_until_ready()
        .unwrap_or_else(|why| panic!("{why}\n{}", nats.logs()));
    let new_leader = nats.meta_leader_seen_by(nats.running()[0]).unwrap();
    assert_ne!(new_leader, leader, "the dead node cannot lead");

    // Back on the same ports and storage, it rejoins as a follower.
    nats.restart(leader_index);
    assert_eq!(nats.running().len(), 3);
    assert_eq!(nats.meta_leader_seen_by(leader_index), Some(new_leader));

    // A client of its port reaches it through a proxy, until the proxy is cut.
    let proxy = CutProxy::start(&nats.addr_of(leader_index));
    let info = nats_info(&proxy.addr()).expect("INFO through the proxy");
    assert!(
        info.contains(&format!("\"server_name\":\"{leader}\"")),
        "{info}"
    );
    proxy.cut();
    assert!(
        std::net::TcpStream::connect(proxy.addr()).is_err(),
        "a cut proxy refuses connections"
    );
    proxy.restore();
    assert!(
        nats_info(&proxy.addr()).is_some(),
        "restored proxy forwards"
    );
    nats.stop_all();
    assert!(nats.running().is_empty());
}

/// The first line a NATS server sends a new client (`INFO {...}`), or
/// `None` if the connection is refused or closed first.
fn nats_info(addr: &str) -> Option<String> {
    use std::io::BufRead;
    let s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    line.starts_with("INFO ").then_some(line)
}
