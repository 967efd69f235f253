//! Helpers shared by the integration tests: servers on port 0, in-process
//! clients, condition waits (never bare sleeps) and results-file readers.
#![allow(dead_code)]

use contact::client::{self, ClientConfig, ClientReport};
use contact::server::{Server, ServerConfig};
use contact::shutdown::Shutdown;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Generous: CI machines are slow, and the wait ends as soon as the condition holds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds, failing the test with `what` after [`PATIENCE`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server config on an ephemeral loopback port with quick shutdown.
pub fn server_config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".into(),
        grace: Duration::from_secs(3),
        stats_every: Duration::from_secs(1),
        ..Default::default()
    }
}

pub fn start_server(config: ServerConfig) -> Server {
    let _ = env_logger::builder().is_test(true).try_init();
    Server::start(config).expect("server starts")
}

/// A client config that reconnects fast and acknowledges quickly.
pub fn client_config(port: u16, id: &str) -> ClientConfig {
    let mut c = ClientConfig::new(format!("127.0.0.1:{port}"), id);
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(300);
    c.ack_interval = Duration::from_millis(50);
    c.status_every = Duration::from_millis(200);
    c
}

/// Runs a client on a thread of its own.
pub fn spawn_client(config: ClientConfig, shutdown: &Shutdown) -> JoinHandle<ClientReport> {
    let shutdown = shutdown.clone();
    std::thread::spawn(move || client::run(&config, &shutdown).expect("client runs"))
}

/// Publishes `n` tasks named `<prefix>-<i>`.
pub fn publish(server: &Server, prefix: &str, n: usize) {
    server.dispatcher().publish((0..n).map(|i| (None, format!("{prefix}-{i}"))));
}

/// Every line of a JSON Lines results file.
pub fn read_results(path: &Path) -> Vec<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(|l| serde_json::from_str(l).expect("valid JSON line")).collect(),
        Err(_) => vec![],
    }
}

/// The task ids a client's accepted results answer, in the order recorded.
pub fn accepted_ids(results: &[serde_json::Value], client: &str) -> Vec<u64> {
    results
        .iter()
        .filter(|r| r["client"] == client && r["stale"] == false)
        .map(|r| r["task_id"].as_u64().expect("task_id"))
        .collect()
}

/// Small builder-style additions to `ServerConfig` for tests.
pub trait ServerConfigExt {
    fn with_results(self, path: &Path) -> Self;
}

impl ServerConfigExt for ServerConfig {
    fn with_results(mut self, path: &Path) -> Self {
        self.results_to = Some(path.to_path_buf());
        self
    }
}
