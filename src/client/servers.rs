//! `ServerList`: the servers an agent may dial — every `--server` entry
//! (`host:port`; several per flag, comma-separated, and the flag repeatable)
//! — and the order it dials them in. A host name counts as every address it
//! resolves to (DNS A and AAAA records, `/etc/hosts`), looked up again at
//! every round, since names change. A *round* is every address once, in a
//! random order, as NATS clients order their server pool: a fleet spreads
//! over its servers, and the agents of a server that goes spread over the
//! others. The address an agent just lost comes last in the round after it.

use crate::listen::ListenAddr;
use std::collections::VecDeque;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

/// The checked `--server` entries, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList {
    entries: Vec<ListenAddr>,
}

/// One address to dial, and the entry it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The entry's host as written: the name a TLS certificate must carry.
    host: String,
    addr: SocketAddr,
}

impl Endpoint {
    /// The address dialled.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The entry's host (a name, or an address as written).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The gRPC target for exactly this address: the channel resolves
    /// nothing of its own, so that the agent knows which server it is on.
    pub fn target(&self) -> String {
        match self.addr {
            SocketAddr::V4(a) => format!("ipv4:{a}"),
            SocketAddr::V6(a) => format!("ipv6:{a}"),
        }
    }
}

impl fmt::Display for Endpoint {
    /// The address, and the name it was resolved from if any:
    /// `[::1]:50051 (localhost)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.host.parse::<std::net::IpAddr>().is_err() {
            write!(f, " ({})", self.host)?;
        }
        Ok(())
    }
}

impl ServerList {
    /// Checks `values` (each one or more comma-separated `host:port`
    /// entries); an error names the entry that is wrong.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<ServerList, String> {
        let mut entries = vec![];
        for value in values {
            let value = value.as_ref();
            for entry in value.split(',').map(str::trim) {
                if entry.is_empty() {
                    return Err(format!(
                        "{value:?}: an entry is empty; give host:port entries separated by commas"
                    ));
                }
                if entry.starts_with(':') {
                    return Err(format!(
                        "{entry:?}: a host is required, as in server.example{entry}"
                    ));
                }
                let addr: ListenAddr = entry.parse()?;
                if addr.port() == 0 {
                    return Err(format!("{entry:?}: port 0 cannot be dialled"));
                }
                entries.push(addr);
            }
        }
        if entries.is_empty() {
            return Err("no server given; give host:port".into());
        }
        Ok(ServerList { entries })
    }

    /// Whether every entry is reachable only from this machine.
    pub fn is_loopback(&self) -> bool {
        self.entries.iter().all(ListenAddr::is_loopback)
    }

    /// The addresses of one round: every entry resolved now, in a random
    /// order, `last` (the address just lost) at the end. A name that does
    /// not resolve is logged and left out of this round.
    pub fn round(&self, last: Option<SocketAddr>) -> VecDeque<Endpoint> {
        let mut all = vec![];
        for entry in &self.entries {
            match (entry.host(), entry.port()).to_socket_addrs() {
                Ok(addrs) => all.extend(addrs.map(|addr| Endpoint {
                    host: entry.host().to_string(),
                    addr,
                })),
                Err(e) => log::warn!("cannot resolve --server {entry}: {e}"),
            }
        }
        in_round_order(all, last)
    }
}

impl fmt::Display for ServerList {
    /// The entries as given, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self.entries.iter().map(ToString::to_string).collect();
        f.write_str(&entries.join(","))
    }
}

/// `all` without repeats, shuffled, with `last` moved to the end. (Two
/// names of one address stay apart: a TLS certificate may carry one only.)
fn in_round_order(mut all: Vec<Endpoint>, last: Option<SocketAddr>) -> VecDeque<Endpoint> {
    let mut seen = std::collections::HashSet::new();
    all.retain(|e| seen.insert((e.host.clone(), e.addr)));
    fastrand::shuffle(&mut all);
    if let Some(i) = all.iter().position(|e| Some(e.addr) == last) {
        let lost = all.remove(i);
        all.push(lost);
    }
    all.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_comma_separated_and_from_repeated_flags() {
        let list = ServerList::parse(&["a.example:1, 10.0.0.2:2", "[::1]:3"]).unwrap();
        assert_eq!(list.to_string(), "a.example:1,10.0.0.2:2,[::1]:3");
        assert!(!list.is_loopback());
        assert!(ServerList::parse(&["127.0.0.1:1,localhost:2,[::1]:3"])
            .unwrap()
            .is_loopback());
    }

    #[test]
    fn a_wrong_entry_is_named() {
        let cases = [
            ("a:1,,b:2", "\"a:1,,b:2\": an entry is empty"),
            ("a:1,", "\"a:1,\": an entry is empty"),
            ("a:1,b", "\"b\": a port is required"),
            ("a:1,:5", "\":5\": a host is required"),
            ("a:0", "\"a:0\": port 0 cannot be dialled"),
            ("a:70000", "\"a:70000\": port 70000 is out of range"),
        ];
        for (value, why) in cases {
            let e = ServerList::parse(&[value]).unwrap_err();
            assert!(e.starts_with(why), "{value}: {e}");
        }
        assert!(ServerList::parse::<&str>(&[]).is_err());
    }

    #[test]
    fn a_name_counts_as_every_address_it_resolves_to() {
        let round = ServerList::parse(&["localhost:7,127.0.0.1:8"])
            .unwrap()
            .round(None);
        assert!(round
            .iter()
            .any(|e| e.addr() == "127.0.0.1:7".parse().unwrap() && e.host() == "localhost"));
        assert!(round.iter().any(|e| e.to_string() == "127.0.0.1:8"));
        let v6 = Endpoint {
            host: "localhost".into(),
            addr: "[::1]:9".parse().unwrap(),
        };
        assert_eq!(v6.to_string(), "[::1]:9 (localhost)");
        assert_eq!(v6.target(), "ipv6:[::1]:9");
    }

    #[test]
    fn a_round_has_each_address_once_in_random_order_the_lost_one_last() {
        let at = |port: u16| Endpoint {
            host: "h".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let all: Vec<Endpoint> = (1..=4).map(at).chain([at(2)]).collect();
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let round = in_round_order(all.clone(), Some(at(3).addr));
            let mut ports: Vec<u16> = round.iter().map(|e| e.addr.port()).collect();
            assert_eq!(ports.last(), Some(&3));
            firsts.insert(ports[0]);
            ports.sort();
            assert_eq!(ports, [1, 2, 3, 4]);
        }
        assert_eq!(firsts.len(), 3, "each of the others comes first sometimes");
    }
}
