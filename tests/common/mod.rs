//! Helpers shared by the integration tests: servers on port 0, in-process
//! clients, condition waits (never bare sleeps) and results-file readers.
#![allow(dead_code)]

pub mod cutproxy;
pub mod nats;

use contact::client::{self, ClientConfig, ClientReport};
use contact::server::{Server, ServerConfig};
use contact::shutdown::Shutdown;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
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

/// A grpcio client of the `Contact` service on a local port, to drive the
/// calls by hand (what goes over the wire, not what our client does).
pub fn raw_client(port: u16) -> contact::proto::ContactClient {
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    let ch = grpcio::ChannelBuilder::new(env)
        .max_send_message_len(8 << 20)
        .connect(&format!("127.0.0.1:{port}"));
    contact::proto::ContactClient::new(ch)
}

/// The options of a call made as agent `id`.
pub fn as_client(id: &str) -> grpcio::CallOption {
    grpcio::CallOption::default().headers(contact::proto::client_id_metadata(id).unwrap())
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
    server
        .dispatcher()
        .publish((0..n).map(|i| (None, format!("{prefix}-{i}"))));
}

/// Every line of a JSON Lines results file.
pub fn read_results(path: &Path) -> Vec<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| serde_json::from_str(l).expect("valid JSON line"))
            .collect(),
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

/// `RUST_LOG` for the processes tests start: info, and the per-task lines
/// tests read, which are at debug ("task N produced", "result for task N
/// from ...", an agent's "task N: ..." and "task N done: ..."); `contact`
/// covers the library and both binaries (their targets start with it).
pub const TEST_LOG: &str = "info,grpcio=warn,contact=debug";

/// A child process whose stderr lines are collected on a thread.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn start(bin: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Proc::spawn(cmd)
    }

    /// Starts a prepared command (e.g. with limits set in `pre_exec`),
    /// logging at [`TEST_LOG`] (unless it sets `RUST_LOG`) to a piped stderr.
    pub fn spawn(mut cmd: Command) -> Proc {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", TEST_LOG);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts");
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Proc {
            child,
            lines,
            seen: vec![],
        }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no line with {needle:?}; saw {:#?}", self.seen));
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Every stderr line so far, without waiting for more.
    pub fn lines_so_far(&mut self) -> &[String] {
        self.seen.extend(self.lines.try_iter());
        &self.seen
    }

    /// Every stderr line up to the end of the output (the process has exited
    /// or is about to), including those already seen.
    pub fn whole_log(&mut self) -> &[String] {
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push(line);
        }
        &self.seen
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig}");
    }

    pub fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit; saw {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python of the test venv (or `CONTACT_PYTHON`), checked to have `modules`.
pub fn test_python(modules: &[&str]) -> std::path::PathBuf {
    let py = std::env::var_os("CONTACT_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "these tests need Python with {modules:?} at {} (run scripts/test.sh, which installs them into .venv, or set CONTACT_PYTHON)",
        py.display()
    );
    py
}

/// Starts `cmd` with these soft and hard limits on open files.
pub fn with_open_file_limit(cmd: &mut Command, soft: u64, hard: u64) {
    with_limit(cmd, libc::RLIMIT_NOFILE, soft, hard);
}

/// Starts `cmd` with a limit of `bytes` on the size of the files it writes
/// (`ulimit -f`, exact to the byte).
pub fn with_file_size_limit(cmd: &mut Command, bytes: u64) {
    with_limit(cmd, libc::RLIMIT_FSIZE, bytes, bytes);
}

fn with_limit(cmd: &mut Command, resource: libc::__rlimit_resource_t, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only setrlimit runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The flags of an agent process that reconnects fast and acknowledges
/// quickly (echoing each task).
pub fn agent_flags<'a>(addr: &'a str, id: &'a str) -> Vec<&'a str> {
    vec![
        "--server",
        addr,
        "--id",
        id,
        "--backoff-initial",
        "0.05",
        "--backoff-max",
        "0.2",
        "--ack-interval",
        "0.05",
    ]
}

/// An agent process ([`agent_flags`]) running `exec` for each task; with
/// `extra` flags (e.g. `--max-tasks N`).
pub fn agent_process(addr: &str, id: &str, exec: &str, extra: &[&str]) -> Proc {
    let mut args = agent_flags(addr, id);
    args.extend_from_slice(&["--exec", exec]);
    args.extend_from_slice(extra);
    Proc::start(CLIENT_BIN, &args)
}

/// The port in a server's "listening on HOST:PORT (...)" log line.
pub fn port_of_listening_line(line: &str) -> u16 {
    line.split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// The client binary built for these tests.
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_contact-client");
/// The server binary built for these tests.
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_contact-server");

/// How many accepted results each task id has.
pub fn accepted_per_task(results: &[serde_json::Value]) -> std::collections::BTreeMap<u64, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in results.iter().filter(|r| r["accepted"] == true) {
        *m.entry(r["task_id"].as_u64().expect("task_id"))
            .or_insert(0) += 1;
    }
    m
}

/// The operators' command-line tool built for these tests.
pub const CTL_BIN: &str = env!("CARGO_BIN_EXE_contact-ctl");

/// Runs `contact-ctl` with `args` (and `envs`) to its end: exit code, stdout, stderr.
pub fn ctl(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(CTL_BIN)
        .args(args)
        .env_remove("CONTACT_ADMIN_TOKEN")
        // No user's ~/.config/contact/ctl.toml, unless a test gives one.
        .env("XDG_CONFIG_HOME", "/nonexistent/contact-test")
        .envs(envs.iter().copied())
        .output()
        .expect("contact-ctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One HTTP/1.1 request to `addr` (`host:port`) on a connection of its own:
/// the status, the headers (names lowercased) and the body (not chunked).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the HTTP port accepts");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    // Headers, then a body of Content-Length bytes (or up to the close).
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before the headers: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    match headers.iter().find(|(k, _)| k == "content-length") {
        Some((_, n)) => {
            let n: usize = n.parse().unwrap();
            while body.len() < n {
                let got = s.read(&mut buf).unwrap();
                assert!(got > 0, "the body was cut short");
                body.extend_from_slice(&buf[..got]);
            }
        }
        None => {
            s.read_to_end(&mut body).unwrap();
        }
    }
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// The address in a server's "metrics on http://ADDR/metrics" log line.
pub fn metrics_addr_of(line: &str) -> String {
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_string()
}

/// A token from `contact-server token --auth-secret SECRET ARGS` (`["web-1"]`
/// for an agent, `["--admin", "ops"]` for an operator).
pub fn mint_token(secret: &str, args: &[&str]) -> String {
    let out = Command::new(SERVER_BIN)
        .args(["token", "--auth-secret", secret])
        .args(args)
        .output()
        .expect("contact-server token runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
