//! Trust against a real server: TLS, mutual TLS with the id from the
//! certificate, tokens bound to one agent, the secure default for exposed
//! addresses, one owner per id, and the stale-result budget. Certificates
//! are made at run time (rcgen); none are checked in.

mod common;

use common::*;
use contact::budget::StaleLimits;
use contact::dispatch::{DispatchConfig, Mode};
use contact::proto::{ContactClient, Empty, ResultMsg, ServerMsg};
use contact::server::{Server, ServerConfig};
use contact::shutdown::Shutdown;
use contact::tls::{ClientTls, ServerTls};
use contact::token::{Secret, TokenKind};
use contact::trust::TrustConfig;
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpcio::{
    CallOption, ChannelBuilder, ChannelCredentials, ChannelCredentialsBuilder, EnvBuilder,
    MetadataBuilder, RpcStatusCode, WriteFlags,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A throw-away CA with a server certificate (localhost, 127.0.0.1) and
/// client certificates on demand.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "contact test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki.issue("server", "localhost", &["localhost"], true);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `<file>.pem` and `<file>.key` for a certificate with this CN and DNS SANs.
    fn issue(&self, file: &str, cn: &str, sans: &[&str], ip: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        if ip {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.path(&format!("{file}.pem")),
            self.path(&format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn server_tls(&self, mutual: bool) -> ServerTls {
        ServerTls {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mutual.then(|| self.path("ca.pem")),
        }
    }

    fn client_tls(&self, cert: Option<(PathBuf, PathBuf)>) -> ClientTls {
        ClientTls {
            ca: Some(self.path("ca.pem")),
            cert_key: cert,
            server_name: Some("localhost".into()),
        }
    }
}

fn pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A raw stub, for calls a well-behaved client would never make.
fn stub(port: u16, creds: Option<ChannelCredentials>) -> ContactClient {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let mut b = ChannelBuilder::new(env);
    if let Some(c) = creds {
        b = b.set_credentials(c).override_ssl_target("localhost");
    }
    ContactClient::new(b.connect(&format!("127.0.0.1:{port}")))
}

fn tls_creds(pki: &Pki, cert: Option<&(PathBuf, PathBuf)>) -> ChannelCredentials {
    let mut b = ChannelCredentialsBuilder::new().root_cert(pem(&pki.path("ca.pem")));
    if let Some((c, k)) = cert {
        b = b.cert(pem(c), pem(k));
    }
    b.build()
}

/// Call options with these metadata pairs and a deadline.
fn with(pairs: &[(&str, &str)]) -> CallOption {
    let mut md = MetadataBuilder::new();
    for (k, v) in pairs {
        md.add_str(k, v).unwrap();
    }
    CallOption::default()
        .headers(md.build())
        .timeout(Duration::from_secs(10))
}

/// The first task of a `getTask` call, or the status code it failed with.
fn first_task(c: &ContactClient, opt: CallOption) -> Result<ServerMsg, RpcStatusCode> {
    let code = |e: grpcio::Error| match e {
        grpcio::Error::RpcFailure(s) => s.code(),
        other => panic!("unexpected error {other}"),
    };
    let mut s = c.get_task_opt(&Empty::new(), opt).map_err(code)?;
    match block_on(s.next()) {
        Some(Ok(t)) => Ok(t),
        Some(Err(e)) => Err(code(e)),
        None => panic!("the task stream ended without a task or an error"),
    }
}

/// Sends `results` on one `tellResult` call; the status it ended with.
fn tell(c: &ContactClient, opt: CallOption, results: Vec<ResultMsg>) -> Result<(), RpcStatusCode> {
    let (mut tx, rx) = c.tell_result_opt(opt).unwrap();
    let sent: grpcio::Result<()> = block_on(async {
        for r in results {
            tx.send((r, WriteFlags::default())).await?;
        }
        tx.close().await
    });
    match (sent, block_on(rx)) {
        (_, Ok(_)) => Ok(()),
        (_, Err(grpcio::Error::RpcFailure(s))) => Err(s.code()),
        (a, b) => panic!("unexpected outcome {a:?} {b:?}"),
    }
}

/// The status a `tellResult` call is refused with as soon as it is opened
/// (before anything is sent, so no write can race the refusal); then a
/// forged result is sent anyway, for the results file to prove it unrecorded.
fn refused_results(c: &ContactClient, opt: CallOption, forged: ResultMsg) -> RpcStatusCode {
    let (mut tx, rx) = c.tell_result_opt(opt).unwrap();
    let code = match block_on(rx) {
        Err(grpcio::Error::RpcFailure(s)) => s.code(),
        other => panic!("the call was not refused: {other:?}"),
    };
    let _ = block_on(tx.send((forged, WriteFlags::default())));
    code
}

fn secret() -> Secret {
    Secret::from_bytes(b"integration test secret, 32 bytes!").unwrap()
}

fn run_client(config: contact::client::ClientConfig) -> contact::client::ClientReport {
    let stop = Shutdown::new();
    let h = spawn_client(config, &stop);
    let report = h.join().expect("client thread");
    stop.trigger();
    report
}

#[test]
fn tls_serves_agents_that_trust_the_ca_and_no_one_else() {
    let pki = Pki::new();
    let server = start_server(ServerConfig {
        tls: Some(pki.server_tls(false)),
        ..server_config()
    });
    let port = server.port();
    publish(&server, "t", 3);
    let mut c = client_config(port, "web-1");
    c.tls = Some(pki.client_tls(None));
    c.max_tasks = Some(3);
    assert_eq!(run_client(c).acknowledged, 3);

    // Plaintext, or TLS trusting another CA: no task, whatever the id.
    let plain = stub(port, None);
    assert_eq!(
        first_task(&plain, with(&[("contact-client-id", "web-1")])).unwrap_err(),
        RpcStatusCode::UNAVAILABLE
    );
    let other = Pki::new();
    let wrong_ca = stub(port, Some(tls_creds(&other, None)));
    assert_eq!(
        first_task(&wrong_ca, with(&[("contact-client-id", "web-1")])).unwrap_err(),
        RpcStatusCode::UNAVAILABLE
    );
    server.stop().unwrap();
}

#[test]
fn each_server_entry_is_dialled_by_address_and_checked_by_its_own_host_name() {
    let pki = Pki::new();
    // A certificate for the name only: an agent that checked the address
    // it dialled (127.0.0.1) would refuse it.
    let (cert, key) = pki.issue("named", "localhost", &["localhost"], false);
    let server = start_server(ServerConfig {
        tls: Some(ServerTls {
            cert,
            key,
            client_ca: None,
        }),
        ..server_config()
    });
    let port = server.port();
    for (servers, id) in [
        (format!("localhost:{port}"), "by-name"),
        // The address entry fails its handshake; the name entry is served.
        (format!("127.0.0.1:{port},localhost:{port}"), "both"),
    ] {
        publish(&server, id, 2);
        let mut c = client_config(port, id);
        c.servers = vec![servers];
        c.tls = Some(ClientTls {
            server_name: None,
            ..pki.client_tls(None)
        });
        c.max_tasks = Some(2);
        let stop = Shutdown::new();
        let client = spawn_client(c, &stop);
        wait_for(&format!("agent {id} to be served over TLS"), || {
            client.is_finished()
        });
        assert_eq!(client.join().unwrap().acknowledged, 2, "{id}");
    }
    server.stop().unwrap();
}

#[test]
fn mutual_tls_takes_the_agent_id_from_its_certificate() {
    let pki = Pki::new();
    let web1 = pki.issue("web-1", "web-1", &["web-1.example"], false);
    let server = start_server(ServerConfig {
        tls: Some(pki.server_tls(true)),
        trust: TrustConfig {
            client_certs: true,
            ..Default::default()
        },
        ..server_config()
    });
    let port = server.port();
    publish(&server, "t", 2);

    // The agent's own client, by its CN.
    let mut c = client_config(port, "web-1");
    c.tls = Some(pki.client_tls(Some(web1.clone())));
    c.max_tasks = Some(2);
    assert_eq!(run_client(c).acknowledged, 2);

    let with_cert = stub(port, Some(tls_creds(&pki, Some(&web1))));
    // A SAN names it too; an id the certificate does not name is refused.
    assert!(first_task(&with_cert, with(&[("contact-client-id", "web-1.example")])).is_ok());
    assert_eq!(
        first_task(&with_cert, with(&[("contact-client-id", "web-2")])).unwrap_err(),
        RpcStatusCode::PERMISSION_DENIED
    );
    // A seed-style call without an id is known by its certificate, not its
    // address (once the agent's own session above is over: one owner per id).
    wait_for("the agent's own session to end", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .all(|c| c.id != "web-1")
    });
    // A task it has not had yet, so that its stream is open with a task in
    // it (not waiting for its deadline, after which it would be gone) while
    // the holder is looked up.
    publish(&server, "more", 1);
    let (_session, first) = {
        let mut s = with_cert.get_task_opt(&Empty::new(), with(&[])).unwrap();
        let first = block_on(s.next());
        (s, first)
    };
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    wait_for("the certificate's holder to be known as web-1", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.id == "web-1")
    });
    assert!(server
        .dispatcher()
        .clients()
        .iter()
        .all(|c| !c.id.starts_with("ipv4:")));
    // Without a certificate there is no connection at all.
    let no_cert = stub(port, Some(tls_creds(&pki, None)));
    assert_eq!(
        first_task(&no_cert, with(&[("contact-client-id", "web-1")])).unwrap_err(),
        RpcStatusCode::UNAVAILABLE
    );
    server.stop().unwrap();
}

#[test]
fn tokens_bind_every_call_to_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let deny = dir.path().join("deny");
    std::fs::write(&deny, "web-3\n").unwrap();
    let s = secret();
    let server = start_server(
        ServerConfig {
            trust: TrustConfig {
                secret: Some(s.clone()),
                deny_list: Some(deny),
                ..Default::default()
            },
            ..server_config()
        }
        .with_results(&results),
    );
    let port = server.port();
    publish(&server, "t", 2);
    let t1 = s.token(TokenKind::Agent, "web-1");
    let bearer = |t: &str| format!("Bearer {t}");
    let raw = stub(port, None);
    let refused = [
        (
            vec![("contact-client-id", "web-1".to_string())],
            RpcStatusCode::UNAUTHENTICATED,
        ),
        (vec![], RpcStatusCode::UNAUTHENTICATED),
        (
            vec![
                ("contact-client-id", "web-2".into()),
                ("authorization", bearer(&t1)),
            ],
            RpcStatusCode::PERMISSION_DENIED,
        ),
        (
            vec![("authorization", bearer(&s.token(TokenKind::Admin, "web-1")))],
            RpcStatusCode::PERMISSION_DENIED,
        ),
        (
            vec![("authorization", bearer(&t1.replace("web-1", "web-2")))],
            RpcStatusCode::UNAUTHENTICATED,
        ),
        (
            vec![("authorization", bearer(&s.token(TokenKind::Agent, "web-3")))],
            RpcStatusCode::PERMISSION_DENIED,
        ),
        (
            vec![("authorization", "Basic d2ViLTE=".into())],
            RpcStatusCode::INVALID_ARGUMENT,
        ),
    ];
    for (md, code) in refused {
        let pairs: Vec<(&str, &str)> = md.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(first_task(&raw, with(&pairs)).unwrap_err(), code, "{md:?}");
        // Forged results are refused the same way, and never recorded.
        let forged = ResultMsg {
            ret: "forged".into(),
            task_id: 1,
            attempt: 1,
            ok: true,
            ..Default::default()
        };
        assert_eq!(refused_results(&raw, with(&pairs), forged), code, "{md:?}");
    }

    // The token alone names the agent; the client takes its id from it too.
    let mut c = client_config(port, "web-1");
    c.token = Some(contact::token::Token::new(&t1).unwrap());
    c.max_tasks = Some(2);
    assert_eq!(run_client(c).acknowledged, 2);
    let recorded = read_results(&results);
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(recorded
        .iter()
        .all(|r| r["client"] == "web-1" && r["output"] != "forged"));
    server.stop().unwrap();
}

#[test]
fn exposed_addresses_need_tls_and_credentials_or_an_explicit_insecure() {
    let e = Server::start(ServerConfig {
        listen: "0.0.0.0:0".into(),
        ..server_config()
    })
    .err()
    .expect("refused");
    assert!(
        matches!(e, contact::Error::Usage(_)) && e.to_string().contains("--insecure"),
        "{e}"
    );
    // TLS without credentials is not enough either.
    let pki = Pki::new();
    let e = Server::start(ServerConfig {
        listen: "0.0.0.0:0".into(),
        tls: Some(pki.server_tls(false)),
        ..server_config()
    })
    .err()
    .expect("refused");
    assert!(e.to_string().contains("credentials"), "{e}");
    // Nor are credentials that anonymous callers may do without.
    let e = Server::start(ServerConfig {
        listen: "0.0.0.0:0".into(),
        tls: Some(pki.server_tls(false)),
        trust: TrustConfig {
            secret: Some(secret()),
            allow_anonymous: true,
            ..Default::default()
        },
        ..server_config()
    })
    .err()
    .expect("refused");
    assert!(e.to_string().contains("--allow-anonymous"), "{e}");
    for config in [
        ServerConfig {
            listen: "0.0.0.0:0".into(),
            insecure: true,
            ..server_config()
        },
        ServerConfig {
            listen: "0.0.0.0:0".into(),
            tls: Some(pki.server_tls(false)),
            trust: TrustConfig {
                secret: Some(secret()),
                ..Default::default()
            },
            ..server_config()
        },
    ] {
        start_server(config).stop().unwrap();
    }
}

#[test]
fn a_second_agent_with_a_live_id_is_refused_and_backs_off() {
    let server = start_server(server_config());
    let port = server.port();
    let stop = Shutdown::new();
    let mut first = client_config(port, "twin");
    first.max_tasks = Some(20);
    let first = spawn_client(first, &stop);
    wait_for("the first twin", || {
        server.dispatcher().clients().len() == 1
    });
    // Known by when it connected: in one process the twins' channels may
    // share a TCP connection (C-core pools subchannels), hence an address.
    let holder_since = server.dispatcher().clients()[0].connected_since;

    let mut second = client_config(port, "twin");
    second.backoff_max = Duration::from_secs(2);
    second.max_tasks = Some(5);
    let second = spawn_client(second, &stop);
    publish(&server, "a", 20);
    let report = first.join().unwrap();
    // Every task went to the first twin; its stream was never replaced.
    assert_eq!(report.acknowledged, 20);
    assert_eq!(report.connections, 1);
    // Once it is gone, the second takes the id over (within its backoff).
    wait_for("the second twin to take over", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.id == "twin" && c.connected_since > holder_since)
    });
    publish(&server, "b", 5);
    let report = second.join().unwrap();
    assert_eq!(report.acknowledged, 5);
    // It backed off (at most ~2 s apart) rather than flapping.
    assert!(report.connections <= 8, "{report:?}");
    stop.trigger();
    server.stop().unwrap();
}

#[test]
fn a_stale_result_flood_is_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let server = start_server(
        ServerConfig {
            stale: StaleLimits {
                results_per_minute: 50,
                bytes_per_minute: 1 << 20,
            },
            dispatch: DispatchConfig {
                mode: Mode::Queue,
                ..Default::default()
            },
            ..server_config()
        }
        .with_results(&results),
    );
    let port = server.port();
    let raw = stub(port, None);
    let id = [("contact-client-id", "flooder")];
    let junk = |i: u64| ResultMsg {
        ret: "x".repeat(1000),
        task_id: 1_000_000 + i,
        attempt: 1,
        ok: true,
        incarnation: "nope".into(),
        ..Default::default()
    };
    assert_eq!(
        tell(&raw, with(&id), (0..500).map(junk).collect()).unwrap_err(),
        RpcStatusCode::RESOURCE_EXHAUSTED
    );
    // Its next call is refused at once; a new connection does not help.
    assert_eq!(
        tell(&stub(port, None), with(&id), vec![junk(0)]).unwrap_err(),
        RpcStatusCode::RESOURCE_EXHAUSTED
    );
    // Meanwhile a legit agent is served as usual.
    publish(&server, "t", 3);
    let mut c = client_config(port, "legit");
    c.max_tasks = Some(3);
    assert_eq!(run_client(c).acknowledged, 3);
    let recorded = read_results(&results);
    let flood = recorded.iter().filter(|r| r["client"] == "flooder").count();
    assert!((50..=52).contains(&flood), "{flood} stale results recorded");
    assert_eq!(accepted_ids(&recorded, "legit").len(), 3);
    server.stop().unwrap();
}

#[test]
fn a_busy_port_is_an_error_not_a_shared_listener() {
    let first = start_server(server_config());
    let e = Server::start(ServerConfig {
        listen: format!("127.0.0.1:{}", first.port()),
        ..server_config()
    })
    .err()
    .expect("second server refused");
    assert!(matches!(e, contact::Error::Bind { .. }), "{e}");
    first.stop().unwrap();
}

#[test]
fn a_revoked_agent_loses_its_open_stream_and_cannot_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let deny = dir.path().join("deny");
    std::fs::write(&deny, "# nobody yet\n").unwrap();
    let s = secret();
    let server = start_server(ServerConfig {
        trust: TrustConfig {
            secret: Some(s.clone()),
            deny_list: Some(deny.clone()),
            ..Default::default()
        },
        ..server_config()
    });
    let port = server.port();
    let stop = Shutdown::new();
    let mut c = client_config(port, "web-1");
    c.token = Some(contact::token::Token::new(&s.token(TokenKind::Agent, "web-1")).unwrap());
    let agent = spawn_client(c, &stop);
    wait_for("web-1 to connect", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.id == "web-1")
    });
    // Revoke it the way the README says: a new file renamed over the list.
    let next = dir.path().join("deny.new");
    std::fs::write(&next, "web-1\n").unwrap();
    std::fs::rename(&next, &deny).unwrap();
    wait_for("web-1's stream to be ended", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .all(|c| c.id != "web-1")
    });
    let bearer = format!("Bearer {}", s.token(TokenKind::Agent, "web-1"));
    assert_eq!(
        first_task(&stub(port, None), with(&[("authorization", &bearer)])).unwrap_err(),
        RpcStatusCode::PERMISSION_DENIED
    );
    stop.trigger();
    agent.join().unwrap();
    server.stop().unwrap();
}
