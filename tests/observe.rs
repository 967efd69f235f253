//! Seeing a running server from outside: the gRPC health service and the
//! metrics port (`/metrics`, `/healthz`, `/readyz`, the web view's JSON and
//! its login), against real server and agent processes. The web view in a
//! real browser is in tests/webview.rs.

mod common;

use common::*;
use grpcio::{ChannelBuilder, EnvBuilder};
use grpcio_health::proto::HealthCheckRequest;
use grpcio_health::{HealthClient, ServingStatus};
use std::process::Command;
use std::sync::Arc;

/// A server process with a metrics port, and its gRPC and HTTP addresses.
fn server(extra: &[&str]) -> (Proc, String, String) {
    let mut cmd = Command::new(SERVER_BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--tasks-from",
        "/dev/null",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .args(extra);
    let mut p = Proc::spawn(cmd);
    let metrics = metrics_addr_of(&p.wait_line("metrics on http://"));
    let port = port_of_listening_line(&p.wait_line("listening on"));
    (p, format!("127.0.0.1:{port}"), metrics)
}

/// The grpc.health.v1 status of `service` at `addr`.
fn health(addr: &str, service: &str) -> ServingStatus {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let client = HealthClient::new(ChannelBuilder::new(env).connect(addr));
    let mut req = HealthCheckRequest::default();
    req.set_service(service.into());
    client
        .check_opt(
            &req,
            grpcio::CallOption::default().timeout(std::time::Duration::from_secs(5)),
        )
        .map(|r| r.get_status())
        .unwrap_or(ServingStatus::ServiceUnknown)
}

/// The value of one series in a scrape.
fn value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
}

fn scrape(metrics: &str) -> String {
    let (status, headers, body) = http(metrics, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/plain; version=0.0.4")));
    body
}

#[test]
fn health_and_metrics_show_what_the_server_did() {
    let state = tempfile::tempdir().unwrap();
    let (mut srv, addr, metrics) = server(&[
        "--state-dir",
        state.path().to_str().unwrap(),
        "--metrics-per-agent",
        "--grace",
        "4",
    ]);
    for service in ["", "Contact", "contact.admin.v1.Admin"] {
        assert_eq!(
            health(&addr, service),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    assert_eq!(
        health(&addr, "no.such.Service"),
        ServingStatus::ServiceUnknown
    );
    assert_eq!(http(&metrics, "GET", "/healthz", &[], "").0, 200);
    assert_eq!(http(&metrics, "GET", "/readyz", &[], "").2, "serving\n");

    let mut ok = agent_process(&addr, "ok-1", "echo", &[]);
    let mut bad = agent_process(&addr, "bad-1", "false", &[]);
    wait_for("two agents counted", || {
        value(&scrape(&metrics), "contact_agents_connected") == 2.0
    });
    for i in 0..3 {
        let (code, _, err) = ctl(&["--server", &addr, "push", &format!("t{i}")], &[]);
        assert_eq!(code, 0, "{err}");
    }
    wait_for("six results", || {
        let page = scrape(&metrics);
        value(&page, "contact_results_total{outcome=\"ok\"}") == 3.0
            && value(&page, "contact_results_total{outcome=\"failed\"}") == 3.0
    });
    let page = scrape(&metrics);
    for (series, expected) in [
        ("contact_tasks_produced_total", 3.0),
        ("contact_tasks_sent_total", 6.0),
        ("contact_tasks_acknowledged_total", 6.0),
        ("contact_time_to_result_seconds_count", 6.0),
        ("contact_time_to_deliver_seconds_count", 6.0),
        ("contact_tasks_in_flight", 0.0),
        ("contact_tasks_backlog", 0.0),
        ("contact_tasks_dead_lettered_total", 0.0),
        (
            "contact_agent_results{agent=\"bad-1\",outcome=\"failed\"}",
            3.0,
        ),
        ("contact_agent_results{agent=\"ok-1\",outcome=\"ok\"}", 3.0),
    ] {
        assert_eq!(value(&page, series), expected, "{series}");
    }
    // Every push and every result went through the journal's fsync.
    assert!(value(&page, "contact_journal_fsync_seconds_count") >= 3.0);

    // An agent busy with a long task holds the server in its drain at
    // shutdown: meanwhile probes see NOT_SERVING, and the metrics stay up.
    ok.signal("TERM");
    assert_eq!(ok.wait_exit(), 0);
    let mut slow = agent_process(&addr, "slow-1", "sleep", &[]);
    wait_for("slow-1 counted", || {
        value(&scrape(&metrics), "contact_agents_connected") == 2.0
    });
    let (code, _, err) = ctl(&["--server", &addr, "push", "30", "--agent", "slow-1"], &[]);
    assert_eq!(code, 0, "{err}");
    wait_for("slow-1 holds it", || {
        value(
            &scrape(&metrics),
            "contact_agent_in_flight{agent=\"slow-1\"}",
        ) == 1.0
    });
    srv.signal("TERM");
    srv.wait_line("shutting down");
    wait_for("NOT_SERVING", || {
        health(&addr, "") == ServingStatus::NotServing
    });
    assert_eq!(http(&metrics, "GET", "/readyz", &[], "").0, 503);
    assert_eq!(http(&metrics, "GET", "/healthz", &[], "").0, 200);
    // The server waits out its grace (4 s) for slow-1's answer, then stops.
    assert_eq!(srv.wait_exit(), 0);
    for p in [&mut slow, &mut bad] {
        p.signal("KILL");
    }
}

#[test]
fn the_web_views_data_needs_an_admin_token_once_the_server_has_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "integration test secret, 32 bytes!").unwrap();
    let secret = secret.to_str().unwrap();
    let token = |args: &[&str]| mint_token(secret, args);
    let (admin, agent) = (token(&["--admin", "ops"]), token(&["web-1"]));
    let (mut srv, _addr, metrics) = server(&["--no-state", "--auth-secret", secret]);
    // Metrics and health stay open to the scraper.
    assert_eq!(http(&metrics, "GET", "/metrics", &[], "").0, 200);
    // A browser gets the login form; a script a 401.
    let (status, _, body) = http(&metrics, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(body.contains("action=\"/login\""), "{body}");
    assert_eq!(http(&metrics, "GET", "/api/state", &[], "").0, 401);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, body) = http(&metrics, "POST", "/login", &form, &format!("token={agent}"));
    assert_eq!(status, 401);
    assert!(body.contains("cannot call the admin API"), "{body}");
    let (status, headers, _) = http(&metrics, "POST", "/login", &form, &format!("token={admin}"));
    assert_eq!(status, 303);
    let cookie = headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.split(';').next().unwrap().to_string())
        .expect("a session cookie");
    let (status, _, body) = http(&metrics, "GET", "/api/state", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["mode"], "broadcast");
    assert_eq!(state["totals"]["agents"], 0);
    let (status, _, body) = http(&metrics, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200);
    assert!(body.contains("id=\"agents\""), "the page itself");
    // A made-up session is no session.
    let forged = "contact_session=00000000000000000000000000000000";
    assert_eq!(
        http(&metrics, "GET", "/api/state", &[("Cookie", forged)], "").0,
        401
    );
    // Scripts may send the token as a bearer instead.
    let bearer = format!("Bearer {admin}");
    assert_eq!(
        http(
            &metrics,
            "GET",
            "/api/state",
            &[("Authorization", &bearer)],
            ""
        )
        .0,
        200
    );
    srv.signal("TERM");
    assert_eq!(srv.wait_exit(), 0);

    // Without credentials, beyond loopback: metrics yes, the fleet's view no.
    let mut cmd = Command::new(SERVER_BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--no-state",
        "--tasks-from",
        "/dev/null",
        "--metrics-listen",
        "0.0.0.0:0",
    ]);
    let mut open = Proc::spawn(cmd);
    let line = open.wait_line("metrics on http://");
    let port = metrics_addr_of(&line)
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let local = format!("127.0.0.1:{port}");
    assert_eq!(http(&local, "GET", "/metrics", &[], "").0, 200);
    let (status, _, body) = http(&local, "GET", "/api/state", &[], "");
    assert_eq!(status, 403);
    assert!(body.contains("beyond loopback"), "{body}");
    open.signal("TERM");
    assert_eq!(open.wait_exit(), 0);
}
