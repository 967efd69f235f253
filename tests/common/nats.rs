//! Real `nats-server` processes with JetStream for the tests of replicas
//! sharing one fleet: one node, or a three-node cluster on loopback, each in
//! a temporary directory of its own (configuration, file storage, log), on
//! free ports kept across restarts; nodes killed (`kill -9`), stopped and
//! started again on the same storage. Every wait is on what the nodes' own
//! monitoring endpoints say (`/healthz`, `/jsz`), never a fixed sleep.

use super::PATIENCE;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A name of its own for each test cluster, so that a node of another
/// cluster on this machine (another test run, a benchmark) that still dials
/// a route port now ours is refused instead of joining this one.
fn unique_cluster_name() -> String {
    static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("contact-test-{}-{n}", std::process::id())
}

/// Where Debian puts the binary (`/usr/sbin`, often missing from a user's PATH).
const KNOWN_PLACES: [&str; 2] = ["/usr/sbin/nats-server", "/usr/local/sbin/nats-server"];

/// The `nats-server` binary (`CONTACT_NATS_SERVER`, else on PATH or where
/// Debian puts it), or `None` (after printing `SKIPPED: ...`) where it is not
/// installed; with `CI=true` a missing one fails the test instead.
pub fn nats_server_or_skip(test: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("CONTACT_NATS_SERVER") {
        Some(bin) => vec![bin.into()],
        None => std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|dir| dir.join("nats-server"))
            .chain(KNOWN_PLACES.iter().map(PathBuf::from))
            .collect(),
    };
    if let Some(bin) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "nats-server not installed: run scripts/setup.sh as root (or apt-get install nats-server)"
    );
    eprintln!("SKIPPED: {test}: nats-server not installed (run scripts/setup.sh as root)");
    None
}

/// One node: its ports, files and (while it runs) process.
struct Node {
    name: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

/// A NATS JetStream cluster of 1 or 3 nodes on loopback; every node still
/// running is killed when it is dropped.
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `nodes` (1 or 3) nodes and waits until JetStream is ready on
    /// each (with 3, a meta leader that sees the others current). `None`
    /// where nats-server is missing (see [`nats_server_or_skip`]).
    pub fn start(nodes: usize, test: &str) -> Option<NatsCluster> {
        assert!(nodes == 1 || nodes == 3, "a test cluster has 1 or 3 nodes");
        let bin = nats_server_or_skip(test)?;
        // Ports are picked free, then given up for the nodes to bind: another
        // process may take one in between, so a start that fails on a port in
        // use is tried again on new ones.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut cluster = NatsCluster {
                bin: bin.clone(),
                nodes: vec![],
                dir: tempfile::tempdir().unwrap(),
            };
            cluster.configure(nodes);
            for i in 0..nodes {
                cluster.spawn(i);
            }
            match cluster.wait_until_ready() {
                Ok(()) => return Some(cluster),
                Err(why) if attempt < 3 && cluster.any_log_contains("address already in use") => {
                    eprintln!("nats-server could not bind its ports ({why}); trying others");
                }
                Err(why) => panic!("{why}\n{}", cluster.logs()),
            }
        }
    }

    /// Writes each node's configuration: client, monitoring and (with
    /// several nodes) route ports, JetStream on file storage in the temporary
    /// directory. Clients are not told of the other nodes (`no_advertise`),
    /// so one given a single node (or a proxy to it) reaches no other.
    fn configure(&mut self, nodes: usize) {
        let held: Vec<TcpListener> = (0..nodes * 3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        let cluster_name = unique_cluster_name();
        let routes: Vec<String> = (0..nodes)
            .map(|i| format!("\"nats-route://127.0.0.1:{}\"", ports[3 * i + 2]))
            .collect();
        for i in 0..nodes {
            let name = format!("n{i}");
            let store = self.dir.path().join(format!("{name}-store"));
            let mut text = format!(
                "server_name: {name}\n\
                 listen: \"127.0.0.1:{}\"\n\
                 http: \"127.0.0.1:{}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 256MB\n  max_file_store: 2GB\n}}\n",
                ports[3 * i],
                ports[3 * i + 1],
                store.display()
            );
            if nodes > 1 {
                text += &format!(
                    "cluster {{\n  name: {cluster_name}\n  listen: \"127.0.0.1:{}\"\n  no_advertise: true\n  routes: [{}]\n}}\n",
                    ports[3 * i + 2],
                    routes.join(", ")
                );
            }
            let config = self.dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text).unwrap();
            self.nodes.push(Node {
                log: self.dir.path().join(format!("{name}.log")),
                name,
                client_port: ports[3 * i],
                monitor_port: ports[3 * i + 1],
                config,
                process: None,
            });
        }
        drop(held);
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.process.is_none(), "{} is already running", node.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", self.bin.display()));
        node.process = Some(child);
    }

    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,...`: every node, for `--store`.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url_of(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `nats://127.0.0.1:P` of node `i`.
    pub fn url_of(&self, i: usize) -> String {
        format!("nats://{}", self.addr_of(i))
    }

    /// `127.0.0.1:P`, the client address of node `i` (e.g. for a proxy).
    pub fn addr_of(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// `kill -9` of node `i`; returns at once (see [`Self::wait_until_ready`]).
    pub fn kill9(&mut self, i: usize) {
        let mut child = self.nodes[i].process.take().expect("node is running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts node `i` again (same ports, same storage) and waits until it
    /// has rejoined: JetStream ready on it, current with the meta leader.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_until_ready()
            .unwrap_or_else(|why| panic!("{why}\n{}", self.logs()));
    }

    /// Stops every node gracefully (SIGTERM, as systemd does) and waits
    /// for each to exit; their storage stays for [`Self::start_all`].
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.process.take() {
                // SAFETY: kill(2) on a child of ours that has not been reaped.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + PATIENCE;
                while child.try_wait().unwrap().is_none() {
                    assert!(
                        Instant::now() < deadline,
                        "{} did not stop on SIGTERM",
                        node.name
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Starts every stopped node again on its storage, and waits until
    /// JetStream is ready on all.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].process.is_none() {
                self.spawn(i);
            }
        }
        self.wait_until_ready()
            .unwrap_or_else(|why| panic!("{why}\n{}", self.logs()));
    }

    /// The indices of the nodes running.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].process.is_some())
            .collect()
    }

    /// The node that node `i` says is the JetStream meta leader, if it
    /// knows one (a single node has none: it is not clustered).
    pub fn meta_leader_seen_by(&self, i: usize) -> Option<String> {
        let jsz = self.jsz(i)?;
        jsz["meta_cluster"]["leader"].as_str().map(str::to_string)
    }

    /// Waits until JetStream is ready on every running node: each says it
    /// is healthy; with several, they agree on a meta leader that is running
    /// and that leader sees every other running node current.
    pub fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let why = match self.not_ready() {
                None => return Ok(()),
                Some(why) => why,
            };
            if let Some(exited) = self.exited() {
                return Err(format!("nats-server {exited} exited while starting"));
            }
            if Instant::now() > deadline {
                return Err(format!("JetStream not ready after {PATIENCE:?}: {why}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Why JetStream is not ready yet, or `None` when it is.
    fn not_ready(&self) -> Option<String> {
        let running = self.running();
        for &i in &running {
            let health = self.get(i, "/healthz").unwrap_or_default();
            if !health.contains("\"ok\"") {
                return Some(format!("{} /healthz: {health:?}", self.nodes[i].name));
            }
        }
        if self.nodes.len() == 1 {
            return None;
        }
        let names: Vec<&str> = running.iter().map(|&i| &*self.nodes[i].name).collect();
        let leaders: Vec<Option<String>> = running
            .iter()
            .map(|&i| self.meta_leader_seen_by(i))
            .collect();
        let leader = match &leaders[0] {
            Some(l) if names.contains(&&**l) && leaders.iter().all(|x| x == &leaders[0]) => l,
            _ => return Some(format!("meta leaders seen by {names:?}: {leaders:?}")),
        };
        let at = running
            .iter()
            .copied()
            .find(|&i| &self.nodes[i].name == leader)
            .unwrap();
        let jsz = self.jsz(at).unwrap_or_default();
        let replicas = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let lagging: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n != leader)
            .filter(|n| {
                !replicas
                    .iter()
                    .any(|r| r["name"] == *n && r["current"] == true)
            })
            .collect();
        if lagging.is_empty() {
            None
        } else {
            Some(format!(
                "meta leader {leader} does not see {lagging:?} current"
            ))
        }
    }

    /// The name of a node that has exited on its own, if any.
    fn exited(&mut self) -> Option<String> {
        self.nodes.iter_mut().find_map(|n| {
            let gone = n.process.as_mut()?.try_wait().unwrap().is_some();
            gone.then(|| n.name.clone())
        })
    }

    fn jsz(&self, i: usize) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get(i, "/jsz")?).ok()
    }

    /// The body of an HTTP GET of `path` on node `i`'s monitoring port, or
    /// `None` if it does not answer (yet).
    fn get(&self, i: usize, path: &str) -> Option<String> {
        let addr = format!("127.0.0.1:{}", self.nodes[i].monitor_port);
        let mut s =
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
    }

    fn any_log_contains(&self, needle: &str) -> bool {
        self.nodes.iter().any(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap_or_default()
                .contains(needle)
        })
    }

    /// The last lines of every node's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out += &format!(
                "--- {} ({}):\n{}\n",
                n.name,
                n.log.display(),
                tail.join("\n")
            );
        }
        out
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
