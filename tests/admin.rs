//! The admin API (`contact.admin.v1.Admin`) against a real server over real
//! sockets: pushing to every agent, to one agent and to the work queue,
//! pushes that are refused and why, the list of clients, and who may call it
//! once credentials are configured.

mod common;

use common::*;
use contact::dispatch::Mode;
use contact::proto::admin::{AdminClient, ListClientsRequest, PushReply, PushRequest};
use contact::server::ServerConfig;
use contact::shutdown::Shutdown;
use contact::token::{Secret, TokenKind};
use contact::trust::TrustConfig;
use grpcio::{CallOption, MetadataBuilder, RpcStatusCode};

fn admin(port: u16) -> AdminClient {
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    let ch = grpcio::ChannelBuilder::new(env).connect(&format!("127.0.0.1:{port}"));
    AdminClient::new(ch)
}

fn push(text: &str, agent: &str) -> PushRequest {
    PushRequest {
        text: text.into(),
        agent: agent.into(),
        ..Default::default()
    }
}

fn code_of<T: std::fmt::Debug>(r: grpcio::Result<T>) -> (RpcStatusCode, String) {
    match r {
        Err(grpcio::Error::RpcFailure(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected a refused call, got {other:?}"),
    }
}

#[test]
fn a_push_reaches_every_agent_one_agent_or_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&results));
    let ctl = admin(server.port());
    let stop = Shutdown::new();
    let agents: Vec<_> = ["a", "b"]
        .iter()
        .map(|id| {
            let mut c = client_config(server.port(), id);
            c.max_tasks = Some(if *id == "a" { 2 } else { 1 });
            spawn_client(c, &stop)
        })
        .collect();
    wait_for("both agents connected", || {
        ctl.list_clients(&ListClientsRequest::default())
            .unwrap()
            .clients
            .len()
            == 2
    });
    let all: PushReply = ctl.push(&push("uptime", "")).unwrap();
    assert_eq!(all.target, "every agent");
    let one = ctl.push(&push("only for a", "a")).unwrap();
    assert_eq!(one.target, "agent a");
    assert!(one.task_id > all.task_id);
    for a in agents {
        a.join().unwrap();
    }
    let recorded = read_results(&results);
    let mut answered: Vec<(String, u64)> = recorded
        .iter()
        .map(|r| {
            (
                r["client"].as_str().unwrap().to_string(),
                r["task_id"].as_u64().unwrap(),
            )
        })
        .collect();
    answered.sort();
    assert_eq!(
        answered,
        vec![
            ("a".into(), all.task_id),
            ("a".into(), one.task_id),
            ("b".into(), all.task_id)
        ]
    );
    // The list counts what each did.
    let listed = ctl.list_clients(&ListClientsRequest::default()).unwrap();
    assert!(listed.clients.iter().all(|c| c.in_flight == 0));
    server.stop().unwrap();

    let mut config = server_config();
    config.dispatch.mode = Mode::Queue;
    let server = start_server(config);
    let reply = admin(server.port()).push(&push("work", "")).unwrap();
    assert_eq!(reply.target, "the work queue");
    server.stop().unwrap();
}

#[test]
fn bad_pushes_are_refused_with_the_reason_and_an_unknown_agent_can_be_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&results));
    let ctl = admin(server.port());
    let (code, why) = code_of(ctl.push(&push("", "")));
    assert_eq!(code, RpcStatusCode::INVALID_ARGUMENT);
    assert!(why.contains("empty"), "{why}");
    let (code, why) = code_of(ctl.push(&push(&"x".repeat((1 << 20) - 128), "")));
    assert_eq!(code, RpcStatusCode::INVALID_ARGUMENT);
    assert!(why.contains("bytes"), "{why}");
    let (code, why) = code_of(ctl.push(&push("uptime", "web 9")));
    assert_eq!(code, RpcStatusCode::INVALID_ARGUMENT);
    assert!(why.contains("agent"), "{why}");
    // A typo in an agent id is reported, not kept for an agent that never comes.
    let (code, why) = code_of(ctl.push(&push("uptime", "web-9")));
    assert_eq!(code, RpcStatusCode::NOT_FOUND);
    assert!(
        why.contains("web-9") && why.contains("--wait-for-agents"),
        "{why}"
    );
    // Unless the caller says the agent is yet to come.
    let waiting = ctl
        .push(&PushRequest {
            wait_for_agents: true,
            ..push("hello later", "web-9")
        })
        .unwrap();
    assert_eq!(waiting.target, "agent web-9");
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "web-9");
    c.max_tasks = Some(1);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 1);
    let recorded = read_results(&results);
    assert_eq!(accepted_ids(&recorded, "web-9"), vec![waiting.task_id]);
    // Once known (remembered after it left), it needs no flag.
    ctl.push(&push("again", "web-9")).unwrap();
    server.stop().unwrap();
}

fn secret() -> Secret {
    Secret::from_bytes(b"integration test secret, 32 bytes!").unwrap()
}

fn bearer(token: &str) -> CallOption {
    let mut b = MetadataBuilder::new();
    b.add_str("authorization", &format!("Bearer {token}"))
        .unwrap();
    CallOption::default().headers(b.build())
}

#[test]
fn with_credentials_only_an_admin_token_may_call_it() {
    let s = secret();
    let server = start_server(ServerConfig {
        trust: TrustConfig {
            secret: Some(s.clone()),
            ..Default::default()
        },
        ..server_config()
    });
    let ctl = admin(server.port());
    let list = ListClientsRequest::default();
    let (code, why) = code_of(ctl.list_clients(&list));
    assert_eq!(code, RpcStatusCode::UNAUTHENTICATED);
    assert!(why.contains("admin token"), "{why}");
    let agent = bearer(&s.token(TokenKind::Agent, "web-1"));
    let (code, why) = code_of(ctl.push_opt(&push("uptime", ""), agent.clone()));
    assert_eq!(code, RpcStatusCode::PERMISSION_DENIED);
    assert!(why.contains("web-1"), "{why}");
    let (code, _) = code_of(ctl.list_clients_opt(&list, agent));
    assert_eq!(code, RpcStatusCode::PERMISSION_DENIED);
    let ops = bearer(&s.token(TokenKind::Admin, "ops"));
    assert!(ctl.list_clients_opt(&list, ops.clone()).is_ok());
    let pushed = ctl.push_opt(&push("uptime", ""), ops).unwrap();
    assert_eq!(pushed.task_id, 1);
    server.stop().unwrap();
}
