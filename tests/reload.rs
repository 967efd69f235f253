//! SIGHUP against a real server process: its secret, deny list, config file
//! and TLS files are read again without ending the connected agents'
//! sessions, and a reload that fails leaves the server with what it had.

mod common;

use common::*;
use contact::token::{Secret, TokenKind};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use std::path::{Path, PathBuf};

/// Writes `text` to `path` as an operator should: a new file renamed over
/// the old one, so that the server never reads it half-written.
fn replace(path: &Path, text: &str) {
    let new = path.with_extension("new");
    std::fs::write(&new, text).unwrap();
    std::fs::rename(&new, path).unwrap();
}

fn write_token(dir: &Path, secret: &str, id: &str) -> PathBuf {
    let token = Secret::from_bytes(secret.as_bytes())
        .unwrap()
        .token(TokenKind::Agent, id);
    let path = dir.join(format!("{id}.token"));
    std::fs::write(&path, token).unwrap();
    path
}

/// How many of `p`'s lines so far contain `needle`.
fn count(p: &mut Proc, needle: &str) -> usize {
    p.lines_so_far()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Sends SIGHUP and waits for the reload's outcome line: `reloaded: ...`
/// or `reload failed: ...` (the `n`th of its kind), returned.
fn hangup(server: &mut Proc, outcome: &str, n: usize) -> String {
    server.signal("HUP");
    wait_for(&format!("reload #{n} ({outcome})"), || {
        count(server, outcome) >= n
    });
    server
        .lines_so_far()
        .iter()
        .filter(|l| l.contains(outcome))
        .nth(n - 1)
        .unwrap()
        .clone()
}

/// Waits until `agent` has finished another task (it is being served).
fn finishes_another_task(agent: &mut Proc) {
    let before = count(agent, " done");
    wait_for("another task done", || count(agent, " done") > before);
}

const OLD_SECRET: &str = "the first secret, of enough bytes";
const NEW_SECRET: &str = "the rotated secret, also long enough";

#[test]
fn sighup_reloads_credentials_and_config_without_dropping_agents() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    replace(&secret, OLD_SECRET);
    let deny = dir.path().join("deny");
    std::fs::write(&deny, "# revoked\nweb-2\n").unwrap();
    let config = dir.path().join("server.toml");
    let settings = format!(
        "listen = \"127.0.0.1:0\"\nno-state = true\ngenerate = 1\nevery = 0.2\nauth-secret = \"{}\"\n",
        secret.display()
    );
    std::fs::write(&config, &settings).unwrap();
    let mut server = Proc::start(SERVER_BIN, &["--config", config.to_str().unwrap()]);
    let line = server.wait_line("listening on");
    assert!(line.contains("tokens required"), "{line}");
    let addr = format!("127.0.0.1:{}", port_of_listening_line(&line));
    let agent = |id: &str, secret: &str| {
        let token = write_token(dir.path(), secret, id);
        agent_process(
            &addr,
            id,
            "echo",
            &["--token-file", token.to_str().unwrap()],
        )
    };

    // A reload that changes nothing keeps the session.
    let mut web1 = agent("web-1", OLD_SECRET);
    server.wait_line("client web-1 connected");
    finishes_another_task(&mut web1);
    let reloaded = hangup(&mut server, "reloaded: ", 1);
    assert!(
        reloaded.contains(&format!("secret {} (unchanged)", secret.display())),
        "{reloaded}"
    );
    finishes_another_task(&mut web1);

    // The config file gains a deny list: in force at the reload, and the
    // revoked agent's session ends; a setting that needs a restart is named.
    let mut web2 = agent("web-2", OLD_SECRET);
    server.wait_line("client web-2 connected");
    std::fs::write(
        &config,
        format!(
            "{settings}deny-list = \"{}\"\nmax-in-flight = 7\n",
            deny.display()
        ),
    )
    .unwrap();
    let reloaded = hangup(&mut server, "reloaded: ", 2);
    assert!(
        reloaded.contains(&format!("deny list {}", deny.display())),
        "{reloaded}"
    );
    let warning = server.wait_line("not applied until the server is restarted");
    assert!(
        warning.contains("changes --max-in-flight:") && !warning.contains("deny-list"),
        "{warning}"
    );
    // Its session ends: evicted, or its next call refused first.
    wait_for("web-2's session to end", || {
        server
            .lines_so_far()
            .iter()
            .any(|l| l.contains("client web-2") && l.contains("disconnected"))
    });
    web2.wait_line("is on the deny list");
    finishes_another_task(&mut web1);
    // Two reloads, one session.
    assert_eq!(count(&mut web1, "connected to"), 1);
    assert_eq!(
        count(&mut web1, "dialling"),
        0,
        "{:#?}",
        web1.lines_so_far()
    );

    // A token of a new secret is refused until the secret file is replaced
    // and the server told; then it is let in, and the old secret's tokens
    // are refused, even for the sessions they opened.
    let mut web3 = agent("web-3", NEW_SECRET);
    web3.wait_line("not issued by this server's secret");
    assert_eq!(count(&mut server, "client web-3 connected"), 0);
    replace(&secret, NEW_SECRET);
    let reloaded = hangup(&mut server, "reloaded: ", 3);
    assert!(reloaded.contains("(changed)"), "{reloaded}");
    server.wait_line("client web-3 connected");
    finishes_another_task(&mut web3);
    let web3_dials = (
        count(&mut web3, "connected to"),
        count(&mut web3, "dialling"),
    );
    server.wait_line("client web-1 disconnected: the server's secret changed");
    let before = count(&mut web1, "not issued by this server's secret");
    wait_for("web-1's old token refused on reconnecting", || {
        count(&mut web1, "not issued by this server's secret") > before
    });

    // A broken secret file: logged with its name, the secret in force stays.
    replace(&secret, "short\n");
    let failed = hangup(&mut server, "reload failed: ", 1);
    assert!(
        failed.contains(&secret.display().to_string()) && failed.contains("5 bytes"),
        "{failed}"
    );
    let mut web4 = agent("web-4", NEW_SECRET);
    server.wait_line("client web-4 connected");
    finishes_another_task(&mut web4);
    // So does a broken config file, named with its line.
    std::fs::write(&config, format!("{settings}every = \"soon\n")).unwrap();
    let failed = hangup(&mut server, "reload failed: ", 2);
    assert!(
        failed.contains(&config.display().to_string()) && failed.contains("line 6"),
        "{failed}"
    );
    finishes_another_task(&mut web3);

    // The failed reloads ended no session.
    assert_eq!(
        (
            count(&mut web3, "connected to"),
            count(&mut web3, "dialling")
        ),
        web3_dials
    );
    assert_eq!(count(&mut web4, "connected to"), 1);
    assert_eq!(count(&mut web4, "dialling"), 0);
    assert_eq!(count(&mut server, "reconnected"), 0);
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);
}

/// A CA and a server certificate it signed (localhost, 127.0.0.1), written
/// as `<name>-ca.pem`, `<name>-server.pem` and `<name>-server.key`.
fn issue(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    let ca = p.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-server.pem")),
        dir.join(format!("{name}-server.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn sighup_serves_new_tls_files_to_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, old_cert, old_key) = issue(dir.path(), "old");
    let (new_ca, new_cert, new_key) = issue(dir.path(), "new");
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::copy(&old_cert, &cert).unwrap();
    std::fs::copy(&old_key, &key).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let mut server = Proc::start(
        SERVER_BIN,
        &[
            "--listen",
            "127.0.0.1:0",
            "--no-state",
            "--generate",
            "1",
            "--every",
            "0.2",
            "--tls-cert",
            &path(&cert),
            "--tls-key",
            &path(&key),
        ],
    );
    let line = server.wait_line("listening on");
    let addr = format!("localhost:{}", port_of_listening_line(&line));
    let agent = |id: &str, ca: &Path| agent_process(&addr, id, "echo", &["--tls-ca", &path(ca)]);
    let mut before = agent("before", &old_ca);
    server.wait_line("client before connected");
    finishes_another_task(&mut before);

    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let reloaded = hangup(&mut server, "reloaded: ", 1);
    assert!(reloaded.contains("for new connections"), "{reloaded}");
    // New connections are served the new certificate...
    let mut after = agent("after", &new_ca);
    server.wait_line("client after connected");
    finishes_another_task(&mut after);
    let mut stale = agent("stale", &old_ca);
    stale.wait_line("cannot reach server");
    assert_eq!(count(&mut server, "client stale connected"), 0);
    // ...and the connection made before keeps its session.
    finishes_another_task(&mut before);
    assert_eq!(count(&mut before, "connected to"), 1);
    assert_eq!(count(&mut before, "dialling"), 0);

    // A key that is not PEM: logged, and the files in force stay.
    std::fs::write(&key, "not a key").unwrap();
    let failed = hangup(&mut server, "reload failed: ", 1);
    assert!(
        failed.contains("--tls-key") && failed.contains(&path(&key)),
        "{failed}"
    );
    let mut later = agent("later", &new_ca);
    server.wait_line("client later connected");
    finishes_another_task(&mut later);
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);
}
