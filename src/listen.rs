//! `ListenAddr`: the address a server listens on, parsed strictly. gRPC's own
//! parser forgives too much (a missing port means 443, `:99999` wraps to
//! another port), so `--listen` is checked here first: a host (an IPv4
//! address, a bracketed IPv6 address or a name) and a port from 0 to 65535,
//! where 0 picks a free one. It also tells whether the address is reachable
//! only from this machine, which decides what the server may serve without
//! credentials (see `trust`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A checked `host:port` to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    /// As written, without brackets for IPv6.
    host: String,
    port: u16,
}

impl ListenAddr {
    /// The host as written (an IPv6 address without its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port as given (0 until the server has bound one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The same host with another port (the one actually bound).
    pub fn with_port(&self, port: u16) -> ListenAddr {
        ListenAddr {
            host: self.host.clone(),
            port,
        }
    }

    /// Whether only this machine can connect: a loopback address, or `localhost`.
    pub fn is_loopback(&self) -> bool {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => self.host.eq_ignore_ascii_case("localhost"),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenAddr, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: an IPv6 address needs a closing ']'"))?;
            v6.parse::<Ipv6Addr>()
                .map_err(|_| format!("{s:?}: {v6:?} is not an IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("{s:?}: a port is required, as in [{v6}]:50051"))?;
            (v6.to_string(), port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?}: a port is required, as in {s}:50051"))?;
            if host.contains(':') {
                return Err(format!(
                    "{s:?}: write an IPv6 address in brackets, as in [::1]:50051"
                ));
            }
            check_host(s, host)?;
            (host.to_string(), port)
        };
        let port = parse_port(port).map_err(|why| format!("{s:?}: {why}"))?;
        Ok(ListenAddr { host, port })
    }
}

fn check_host(whole: &str, host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err(format!(
            "{whole:?}: a host is required (127.0.0.1 for this machine only, 0.0.0.0 for every interface)"
        ));
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{whole:?}: {host:?} is not an IPv4 address"));
    }
    let name_ok = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if name_ok {
        Ok(())
    } else {
        Err(format!("{whole:?}: {host:?} is not a host name or address"))
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("a port is required after ':'".into());
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a number"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("port {port} is out of range (0-65535; 0 picks a free port)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> ListenAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn good_addresses_parse_and_print_back() {
        for s in [
            "127.0.0.1:50051",
            "0.0.0.0:0",
            "[::1]:65535",
            "[::]:1",
            "localhost:7",
            "ops.example.com:443",
        ] {
            assert_eq!(ok(s).to_string(), s);
        }
        assert_eq!(ok("[::1]:9").port(), 9);
        assert_eq!(ok("127.0.0.1:0").with_port(5).to_string(), "127.0.0.1:5");
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let cases = [
            ("127.0.0.1", "port is required"),
            ("127.0.0.1:", "port is required"),
            ("127.0.0.1:99999", "out of range"),
            ("127.0.0.1:-1", "not a number"),
            ("127.0.0.1:+80", "not a number"),
            (":50051", "host is required"),
            ("::1:50051", "brackets"),
            ("[::1]", "port is required"),
            ("[::1:80", "closing"),
            ("[nope]:80", "not an IPv6"),
            ("300.1.1.1:80", "not an IPv4"),
            ("bad host:80", "not a host name"),
            ("unix:/tmp/x", "not a number"),
        ];
        for (s, why) in cases {
            let e = s.parse::<ListenAddr>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,40}") {
            let _ = s.parse::<ListenAddr>();
        }

        #[test]
        fn every_port_in_range_round_trips_and_every_other_is_refused(
            a: [u8; 4], port: u32, v6: bool,
        ) {
            let host = if v6 { "[::1]".to_string() } else { format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]) };
            let s = format!("{host}:{port}");
            match s.parse::<ListenAddr>() {
                Ok(l) => {
                    proptest::prop_assert!(port <= 65535);
                    proptest::prop_assert_eq!(l.to_string(), s);
                }
                Err(e) => {
                    proptest::prop_assert!(port > 65535, "{}", e);
                    proptest::prop_assert!(e.contains("out of range"));
                }
            }
        }
    }

    #[test]
    fn loopback_is_recognised() {
        assert!(ok("127.0.0.1:1").is_loopback());
        assert!(ok("127.8.9.10:1").is_loopback());
        assert!(ok("[::1]:1").is_loopback());
        assert!(ok("LOCALHOST:1").is_loopback());
        assert!(!ok("0.0.0.0:1").is_loopback());
        assert!(!ok("[::]:1").is_loopback());
        assert!(!ok("10.0.0.1:1").is_loopback());
        assert!(!ok("example.com:1").is_loopback());
    }
}
