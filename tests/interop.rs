//! Wire compatibility with the seed: Python grpcio peers generated from the
//! seed's unchanged proto (tests/interop/contact.proto) against our server
//! and our client. The Python packages come from tests/interop/requirements.txt,
//! installed into .venv by scripts/test.sh (or name an interpreter that has
//! them in CONTACT_PYTHON).

mod common;

use common::*;
use contact::shutdown::Shutdown;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

fn python() -> PathBuf {
    test_python(&["grpc", "grpc_tools"])
}

/// Generates the Python stubs from the seed's proto into a fresh directory.
fn seed_stubs(py: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(py)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(interop_dir())
        .arg(format!("--python_out={}", out.path().display()))
        .arg(format!("--grpc_python_out={}", out.path().display()))
        .arg(interop_dir().join("contact.proto"))
        .status()
        .unwrap();
    assert!(status.success(), "grpc_tools.protoc failed");
    out
}

#[test]
fn a_seed_python_client_works_against_our_server() {
    let py = python();
    let stubs = seed_stubs(&py);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    let server = start_server(server_config().with_results(&path));
    publish(&server, "py", 5);

    let out = Command::new(&py)
        .arg(interop_dir().join("seed_client.py"))
        .arg(stubs.path())
        .arg(format!("127.0.0.1:{}", server.port()))
        .args(["5", "15"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "seed client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let tasks: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("TASK "))
        .collect();
    assert_eq!(tasks, vec!["py-0", "py-1", "py-2", "py-3", "py-4"]);
    let replies: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("REPLY "))
        .collect();
    let expected: Vec<String> = (0..15)
        .map(|i| format!("server received: status {i}"))
        .collect();
    assert_eq!(replies, expected);
    assert_eq!(lines.last(), Some(&"ACKED 5"));

    // The seed client sends no ids: its results were matched in order on its connection.
    let results = read_results(&path);
    assert_eq!(results.len(), 5);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["task_id"], i as u64 + 1);
        assert_eq!(r["output"], format!("client received task: py-{i}"));
        assert_eq!(
            (r["ok"].clone(), r["stale"].clone()),
            (true.into(), false.into())
        );
        assert!(r["client"].as_str().unwrap().contains("127.0.0.1"), "{r}");
    }
    server.stop().unwrap();
}

#[test]
fn our_client_works_against_a_seed_python_server() {
    let py = python();
    let stubs = seed_stubs(&py);
    let mut child = Command::new(&py)
        .arg(interop_dir().join("seed_server.py"))
        .arg(stubs.path())
        .args(["10", "0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = lines.recv_timeout(PATIENCE).expect("python server starts");
    let port: u16 = first
        .strip_prefix("LISTENING ")
        .expect("LISTENING line")
        .parse()
        .unwrap();

    let stop = Shutdown::new();
    let mut config = client_config(port, "rusty");
    config.max_tasks = Some(10);
    let report = spawn_client(config, &stop).join().unwrap();
    assert_eq!(report.acknowledged, 10);

    let mut results = vec![];
    let mut statuses = vec![];
    while results.len() < 10 || statuses.is_empty() {
        let l = lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("python server printed only {results:?} {statuses:?}"));
        if let Some(r) = l.strip_prefix("RESULT ") {
            results.push(r.to_string());
        } else if let Some(s) = l.strip_prefix("STATUS ") {
            statuses.push(s.to_string());
        }
    }
    assert!(
        results
            .iter()
            .all(|r| r.starts_with("client received task: task:")),
        "{results:?}"
    );
    assert!(statuses[0].starts_with("alive:"), "{statuses:?}");
    let _ = child.kill();
    let _ = child.wait();
}
