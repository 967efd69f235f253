//! The NATS servers part g runs `contact-server --store` on: one
//! `nats-server -js` node, or a cluster of three on loopback (each with its
//! own config file, store directory and log), started fresh for every run
//! and killed after it. Each node's monitoring port answers the counters
//! the benchmark reads ([`Counters`]: messages and bytes in and out of the
//! node, those of the `contact-server` connections, and CPU time) and the
//! number of messages a stream holds.

use crate::procs::{cpu_seconds, Daemon, Outcome, STARTUP};
use crate::Bench;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Where Debian's package installs it; `NATS_SERVER` overrides.
const DEFAULT_BINARY: &str = "/usr/sbin/nats-server";

/// The name `contact-server` gives its NATS connection starts with this.
const CONTACT_CONNECTION: &str = "contact-server ";

/// One NATS node the benchmark started.
struct Node {
    daemon: Daemon,
    client_port: u16,
    monitor_port: u16,
}

/// A NATS deployment of one or three JetStream nodes; killed when dropped.
pub struct Nats {
    nodes: Vec<Node>,
}

/// The nats-server program: `NATS_SERVER`, else Debian's, else on `PATH`.
fn binary() -> Outcome<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    if std::path::Path::new(DEFAULT_BINARY).exists() {
        return Ok(PathBuf::from(DEFAULT_BINARY));
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nats-server"))
            .find(|p| p.exists())
    });
    on_path.ok_or_else(|| {
        "no nats-server (looked at $NATS_SERVER, /usr/sbin/nats-server and PATH): install Debian's nats-server package (scripts/setup.sh does, as root), or skip part g with --only".into()
    })
}

/// A port nothing listens on now (the kernel's pick, released at once).
fn free_port() -> Outcome<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl Nats {
    /// Starts `nodes` (1 or 3) JetStream nodes in a fresh directory named
    /// after `tag`, and returns once every one says JetStream is healthy
    /// (for a cluster: a meta leader is elected).
    pub fn start(b: &Bench, tag: &str, nodes: usize) -> Outcome<Nats> {
        let bin = binary()?;
        let dir = b.fresh_dir(&format!("{tag}-nats"))?;
        let ports: Vec<(u16, u16, u16)> = (0..nodes)
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<Outcome<_>>()?;
        let mut started = Nats { nodes: vec![] };
        for (i, &(client_port, cluster_port, monitor_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let mut config = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{client_port}\"\nhttp: \"127.0.0.1:{monitor_port}\"\njetstream {{ store_dir: \"{}\" }}\n",
                dir.join(&name).display()
            );
            if nodes > 1 {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, p)| format!("\"nats-route://127.0.0.1:{}\"", p.1))
                    .collect();
                config.push_str(&format!(
                    "cluster {{ name: contact-bench, listen: \"127.0.0.1:{cluster_port}\", routes: [{}] }}\n",
                    routes.join(", ")
                ));
            }
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(&conf, config).map_err(|e| format!("{}: {e}", conf.display()))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("-c").arg(&conf);
            let log = b.log(&format!("{tag}-nats-{name}"));
            let daemon = Daemon::start(&format!("nats-server {name}"), cmd, &log, false)?;
            started.nodes.push(Node {
                daemon,
                client_port,
                monitor_port,
            });
        }
        let deadline = Instant::now() + STARTUP;
        for node in &mut started.nodes {
            loop {
                if let Some(exited) = node.daemon.exited() {
                    return Err(exited);
                }
                let health = get_json(node.monitor_port, "/healthz");
                if health.is_ok_and(|h| h["status"] == "ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{} did not report JetStream healthy within {STARTUP:?} (log: {})",
                        node.daemon.name,
                        node.daemon.log.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(started)
    }

    /// `nats://H:P,H:P,...` for `contact-server --store`.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.client_port))
            .collect();
        format!("nats://{}", addrs.join(","))
    }

    /// Each node's `nats://H:P`, for a client of our own.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// The counters of every node, summed.
    pub fn counters(&self) -> Outcome<Counters> {
        let mut total = Counters::default();
        for n in &self.nodes {
            let varz = get_json(n.monitor_port, "/varz")?;
            let num = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
            total.msgs += num(&varz, "in_msgs") + num(&varz, "out_msgs");
            total.bytes += num(&varz, "in_bytes") + num(&varz, "out_bytes");
            let connz = get_json(n.monitor_port, "/connz?limit=100000")?;
            for c in connz["connections"].as_array().into_iter().flatten() {
                if c["name"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(CONTACT_CONNECTION))
                {
                    total.contact_msgs += num(c, "in_msgs") + num(c, "out_msgs");
                    total.contact_bytes += num(c, "in_bytes") + num(c, "out_bytes");
                }
            }
            total.cpu_secs += cpu_seconds(n.daemon.pid()).unwrap_or(0.0);
        }
        Ok(total)
    }

    /// How many messages stream `name` holds, as the first node that has
    /// it says (every node of a cluster holds a copy of an R3 stream).
    pub fn stream_messages(&self, name: &str) -> Outcome<Option<u64>> {
        for n in &self.nodes {
            let jsz = get_json(n.monitor_port, "/jsz?accounts=true&streams=true")?;
            let streams = jsz["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
            for s in streams {
                if s["name"] == name {
                    return Ok(s["state"]["messages"].as_u64());
                }
            }
        }
        Ok(None)
    }
}

impl Nats {
    /// The consumer's delivered and acknowledged stream sequences and
    /// pending counts, as its leader reports them, for an error message.
    pub fn consumer_state(&self, stream: &str, consumer: &str) -> Outcome<String> {
        for (i, n) in self.nodes.iter().enumerate() {
            // The node's server_name in its config file.
            let name = format!("n{}", i + 1);
            let jsz = get_json(
                n.monitor_port,
                "/jsz?accounts=true&streams=true&consumers=true",
            )?;
            let streams = jsz["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
            for s in streams.filter(|s| s["name"] == stream) {
                for c in s["consumer_detail"].as_array().into_iter().flatten() {
                    let leader = c["cluster"]["leader"].as_str();
                    let single = c["cluster"].is_null();
                    if c["name"] == consumer && (single || leader == Some(name.as_str())) {
                        return Ok(format!(
                            "consumer {consumer}: delivered up to {}, acknowledged up to {}, {} pending, {} awaiting acknowledgement, {} redelivered",
                            c["delivered"]["stream_seq"], c["ack_floor"]["stream_seq"], c["num_pending"], c["num_ack_pending"], c["num_redelivered"]
                        ));
                    }
                }
            }
        }
        Ok(format!("consumer {consumer}: no leader found"))
    }
}

/// What the NATS nodes counted so far (monotonic: a run takes differences).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Messages in plus out, every node (`/varz`).
    pub msgs: f64,
    pub bytes: f64,
    /// Those of the `contact-server` connections only (`/connz`): what a
    /// replica sends to and receives from NATS.
    pub contact_msgs: f64,
    pub contact_bytes: f64,
    /// CPU time of the nats-server processes.
    pub cpu_secs: f64,
}

impl Counters {
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            msgs: self.msgs - before.msgs,
            bytes: self.bytes - before.bytes,
            contact_msgs: self.contact_msgs - before.contact_msgs,
            contact_bytes: self.contact_bytes - before.contact_bytes,
            cpu_secs: self.cpu_secs - before.cpu_secs,
        }
    }
}

/// `GET path` on a node's monitoring port, as JSON.
fn get_json(port: u16, path: &str) -> Outcome<serde_json::Value> {
    let what = || format!("http://127.0.0.1:{port}{path}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("{}: {e}", what()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("{}: {e}", what()))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", what()))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("{}: no HTTP response", what()))?;
    serde_json::from_str(body).map_err(|e| format!("{}: not JSON ({e})", what()))
}
