//! Each of the three calls, driven by a raw grpcio client against a real
//! server on a real socket: what goes over the wire, not what our client does.

mod common;

use common::*;
use contact::proto::{self, ClientMsg, Empty, ResultMsg};
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpcio::{CallOption, RpcStatusCode, WriteFlags};

#[test]
fn get_task_streams_every_task_in_order_with_ids() {
    let server = start_server(server_config());
    publish(&server, "t", 3);
    let client = raw_client(server.port());
    let mut stream = client
        .get_task_opt(&Empty::new(), as_client("raw"))
        .unwrap();
    let got: Vec<(u64, u32, String)> = (0..3)
        .map(|_| {
            let m = block_on(stream.next()).unwrap().unwrap();
            (m.task_id, m.attempt, m.task)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 1, "t-0".into()),
            (2, 1, "t-1".into()),
            (3, 1, "t-2".into())
        ]
    );
    wait_for("the registry to list the client", || {
        server
            .dispatcher()
            .clients()
            .iter()
            .any(|c| c.id == "raw" && c.tasks_sent == 3)
    });
    drop(stream);
    wait_for("the client to be gone after its stream is dropped", || {
        server.dispatcher().clients().is_empty()
    });
    server.stop().unwrap();
}

#[test]
fn tell_result_is_answered_once_results_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&path));
    publish(&server, "t", 2);
    let client = raw_client(server.port());
    let mut tasks = client
        .get_task_opt(&Empty::new(), as_client("raw"))
        .unwrap();
    let mut incarnation = String::new();
    for _ in 0..2 {
        incarnation = block_on(tasks.next()).unwrap().unwrap().incarnation;
    }
    let (mut tx, rx) = client.tell_result_opt(as_client("raw")).unwrap();
    block_on(async {
        // An agent with an id names each delivery exactly: task, attempt, incarnation.
        let ok = ResultMsg {
            ret: "fine".into(),
            task_id: 1,
            ok: true,
            attempt: 1,
            incarnation: incarnation.clone(),
            ..Default::default()
        };
        let bad = ResultMsg {
            ret: "broke".into(),
            task_id: 2,
            ok: false,
            attempt: 1,
            incarnation,
            ..Default::default()
        };
        tx.send((ok, WriteFlags::default())).await.unwrap();
        tx.send((bad, WriteFlags::default())).await.unwrap();
        tx.close().await.unwrap();
    });
    block_on(rx).expect("tellResult answered");
    // The answer came after the flush: the file already holds both results.
    let results = read_results(&path);
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["task"], "t-0");
    assert_eq!(
        (results[0]["ok"].clone(), results[1]["ok"].clone()),
        (true.into(), false.into())
    );
    assert_eq!(results[1]["output"], "broke");
    assert!(results[0]["latency_ms"].as_f64().unwrap() >= 0.0);
    server.stop().unwrap();
}

#[test]
fn send_status_answers_every_message() {
    let server = start_server(server_config());
    let client = raw_client(server.port());
    let (mut tx, mut rx) = client.send_status_opt(as_client("raw")).unwrap();
    let replies: Vec<String> = block_on(async {
        for i in 0..15 {
            let msg = ClientMsg {
                msg: format!("s{i}"),
                ..Default::default()
            };
            tx.send((msg, WriteFlags::default())).await.unwrap();
        }
        tx.close().await.unwrap();
        let mut out = vec![];
        while let Some(r) = rx.next().await {
            out.push(r.unwrap().ret);
        }
        out
    });
    let expected: Vec<String> = (0..15).map(|i| format!("server received: s{i}")).collect();
    assert_eq!(replies, expected);
    server.stop().unwrap();
}

/// Batched writes (buffer hints, one flush per batch) must not lose a message,
/// nor must the batched results a client streams back.
#[test]
fn every_message_and_every_acknowledgement_arrives_in_bulk() {
    const N: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let mut config = server_config().with_results(&path);
    config.dispatch.max_in_flight = N as usize;
    let server = start_server(config);
    let client = raw_client(server.port());
    let mut tasks = client
        .get_task_opt(&Empty::new(), as_client("bulk"))
        .unwrap();
    server
        .dispatcher()
        .publish((0..N).map(|i| (None, format!("bulk-{i}"))));
    let (mut tx, rx) = client.tell_result_opt(as_client("bulk")).unwrap();
    block_on(async {
        for expected in 1..=N {
            let m = tasks.next().await.unwrap().unwrap();
            assert_eq!(m.task_id, expected, "tasks arrive in order, none missing");
            let r = ResultMsg {
                ret: m.task,
                task_id: m.task_id,
                ok: true,
                attempt: m.attempt,
                incarnation: m.incarnation,
                ..Default::default()
            };
            tx.feed((r, WriteFlags::default().buffer_hint(expected % 64 != 0)))
                .await
                .unwrap();
        }
        tx.close().await.unwrap();
    });
    block_on(rx).unwrap();
    let ids: Vec<u64> = read_results(&path)
        .iter()
        .map(|r| r["task_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>());
    server.stop().unwrap();
}

#[test]
fn bad_metadata_and_oversized_messages_are_refused_and_the_server_keeps_serving() {
    let mut config = server_config();
    config.max_message_bytes = 64 * 1024;
    let server = start_server(config);
    let client = raw_client(server.port());

    let mut md = grpcio::MetadataBuilder::new();
    md.add_str(proto::CLIENT_ID_KEY, "bad id").unwrap();
    let mut s = client
        .get_task_opt(&Empty::new(), CallOption::default().headers(md.build()))
        .unwrap();
    match block_on(s.next()) {
        Some(Err(grpcio::Error::RpcFailure(st))) => {
            assert_eq!(st.code(), RpcStatusCode::INVALID_ARGUMENT);
            assert!(st.message().contains("bad id"), "{}", st.message());
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    let (mut tx, rx) = client.tell_result_opt(as_client("big")).unwrap();
    let huge = ResultMsg {
        ret: "x".repeat(200 * 1024),
        task_id: 1,
        ok: true,
        ..Default::default()
    };
    let _ = block_on(tx.send((huge, WriteFlags::default())));
    match block_on(rx) {
        Err(grpcio::Error::RpcFailure(st)) => {
            assert_eq!(st.code(), RpcStatusCode::RESOURCE_EXHAUSTED)
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }

    // Everyone else is still served.
    publish(&server, "after", 1);
    let mut ok = client
        .get_task_opt(&Empty::new(), as_client("fine"))
        .unwrap();
    assert_eq!(block_on(ok.next()).unwrap().unwrap().task, "after-0");
    server.stop().unwrap();
}
