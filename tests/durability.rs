//! Durable state (`--state-dir`): a server killed with -9 and restarted on
//! the same directory loses nothing it accepted and repeats nothing that was
//! acknowledged; a tail torn by a crash or power loss is trimmed, and damaged
//! state is refused (exit 1) unless `--repair` moves the damage aside. A
//! restart does not publish the lines of its `--tasks-from` file again.

mod common;

use common::*;
use contact::dispatch::Mode;
use contact::journal::{self, Record};
use contact::server::{Server, ServerConfig};
use contact::shutdown::Shutdown;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn durable_config(state: &Path, results: &Path, mode: Mode) -> ServerConfig {
    let mut c = server_config().with_results(results);
    c.state_dir = Some(state.to_path_buf());
    c.dispatch.mode = mode;
    c
}

#[test]
fn kill_9_the_server_mid_run_and_restart_it_on_the_same_state() {
    const N: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let (state, results) = (dir.path().join("state"), dir.path().join("results.jsonl"));
    let tasks = dir.path().join("tasks.txt");
    write_tasks(&tasks, "job", N as usize);
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let args = |tasks: &Path, listen: &str| {
        let mut args = server_args(listen, &state, tasks, &results);
        args.extend(["--max-in-flight", "8"].map(String::from));
        args
    };
    let (mut server, addr) = start_server_proc(&args(&tasks, "127.0.0.1:0"));
    let exec = "sh -c 'sleep 0.01; echo done $0'";
    let mut clients: Vec<Proc> = ["k1", "k2"]
        .iter()
        .map(|id| agent_process(&addr, id, exec, &[]))
        .collect();
    wait_for("some results before the crash", || {
        read_results(&results).len() >= 60
    });
    server.signal("KILL");
    server.wait_exit();
    let before_restart = read_results(&results).len();
    assert!((before_restart as u64) < N, "the crash came mid-run");

    let (mut server, _) = start_server_proc(&args(&empty, &addr));
    server.wait_line("unfinished");
    wait_for("every task answered after the restart", || {
        accepted_per_task(&read_results(&results)).len() as u64 == N
    });
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);
    for c in &mut clients {
        c.signal("TERM");
        c.wait_exit();
    }

    let all = read_results(&results);
    let per_task = accepted_per_task(&all);
    assert_eq!(per_task.len() as u64, N);
    assert!(
        per_task.values().all(|&n| n == 1),
        "exactly one accepted result per task"
    );
    let mut lines = BTreeSet::new();
    for r in &all {
        let key = (
            r["task_id"].as_u64(),
            r["client"].to_string(),
            r["attempt"].as_u64(),
        );
        assert!(
            lines.insert(key.clone()),
            "duplicate line in the results file: {key:?}\n{:#?}",
            all.iter()
                .filter(|x| x["task_id"] == r["task_id"])
                .collect::<Vec<_>>()
        );
    }
    // Nothing acknowledged was delivered again to the client that answered
    // it: in the journal (as compacted at the restart), no delivery of a task
    // to a client follows that client's accepted answer to it.
    let mut answered = BTreeSet::new();
    let mut deliveries_after_restart = 0;
    for r in journal::read_records(&state.join("journal")).unwrap() {
        match r {
            Record::Done { task, client, .. } => {
                answered.insert((client, task));
            }
            Record::Result(r) if r.accepted => {
                answered.insert((r.client, r.task_id.unwrap()));
            }
            Record::Sent {
                task,
                client,
                attempt,
            } => {
                deliveries_after_restart += 1;
                assert!(
                    !answered.contains(&(client.clone(), task)),
                    "task {task} sent again to {client} (attempt {attempt}) after it answered"
                );
            }
            _ => {}
        }
    }
    assert!(
        deliveries_after_restart > 0,
        "the restarted server did deliver tasks"
    );
}

#[test]
fn unfinished_queue_tasks_and_broadcast_progress_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let results = dir.path().join("results.jsonl");
    // Queue: ten tasks, nobody to take them, the server stops.
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    publish(&server, "q", 10);
    server.stop().unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    assert_eq!(server.dispatcher().unfinished(), 10);
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "after");
    c.max_tasks = Some(10);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 10);
    server.stop().unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    assert_eq!(
        server.dispatcher().unfinished(),
        0,
        "answered tasks stay answered"
    );
    server.stop().unwrap();

    // Broadcast: a client answers three of five, the server restarts, it gets only the last two.
    let state = dir.path().join("bstate");
    let results = dir.path().join("bresults.jsonl");
    let server = start_server(durable_config(&state, &results, Mode::Broadcast));
    publish(&server, "b", 5);
    let mut c = client_config(server.port(), "steady");
    c.max_tasks = Some(3);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 3);
    server.stop().unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Broadcast));
    let mut c = client_config(server.port(), "steady");
    c.max_tasks = Some(2);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 2);
    server.stop().unwrap();
    let ids: Vec<u64> = read_results(&results)
        .iter()
        .filter(|r| r["accepted"] == true)
        .map(|r| r["task_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
}

#[test]
fn the_journal_is_compacted_and_still_replays_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let results = dir.path().join("results.jsonl");
    let mut config = durable_config(&state, &results, Mode::Queue);
    config.compact_bytes = 16 * 1024;
    config.dispatch.retain = 50;
    let server = start_server(config.clone());
    let stop = Shutdown::new();
    let mut c = client_config(server.port(), "worker");
    c.max_tasks = Some(400);
    let client = spawn_client(c, &stop);
    for i in 0..5 {
        publish(&server, &format!("round{i}"), 100);
    }
    assert_eq!(client.join().unwrap().acknowledged, 400);
    wait_for("a compaction", || {
        std::fs::metadata(state.join("journal")).unwrap().len() < 64 * 1024
    });
    server.stop().unwrap();
    let server = start_server(config);
    assert_eq!(
        server.dispatcher().unfinished(),
        100,
        "the last hundred are still to do"
    );
    server.stop().unwrap();
    assert_eq!(accepted_per_task(&read_results(&results)).len(), 400);
}

#[test]
fn a_damaged_journal_is_refused_and_a_torn_tail_is_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let results = dir.path().join("results.jsonl");
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    // Two commits: tasks 1 and 2, then task 3.
    publish(&server, "t", 2);
    publish(&server, "u", 1);
    server.stop().unwrap();
    let journal = state.join("journal");
    let good = std::fs::read(&journal).unwrap();

    // A flipped byte in the middle: refuse to start, saying where and what to do.
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x55;
    std::fs::write(&journal, &bad).unwrap();
    let err = Server::start(durable_config(&state, &results, Mode::Queue))
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("damaged") && msg.contains(journal.to_str().unwrap()),
        "{msg}"
    );
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let (status, stderr) = run_to_exit(&server_args("127.0.0.1:0", &state, &empty, &results));
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("damaged"), "{stderr}");

    // The last commit cut short: the commits before it are served, with a warning.
    std::fs::write(&journal, &good[..good.len() - 5]).unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    assert_eq!(
        server.dispatcher().unfinished(),
        2,
        "tasks 1 and 2 survive; the torn commit of the third is dropped"
    );
    server.stop().unwrap();
}

#[test]
fn a_redelivery_after_a_restart_is_answered_without_running_the_task_again() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (first, second) = (
        dir.path().join("first.jsonl"),
        dir.path().join("second.jsonl"),
    );
    let runs = dir.path().join("runs.txt");
    let mut config = durable_config(&state, &first, Mode::Broadcast);
    config.grace = std::time::Duration::from_millis(200);
    let server = start_server(config);
    let port = server.port();
    publish(&server, "t", 2);
    let stop = Shutdown::new();
    let mut c = client_config(port, "careful");
    let script = format!("echo $0 >> {}; sleep 0.5; echo ran $0", runs.display());
    c.handler = contact::handler::Handler::exec(&format!("sh -c '{script}'"), 100).unwrap();
    let client = spawn_client(c, &stop);
    wait_for("the first task to start", || {
        std::fs::read_to_string(&runs).is_ok_and(|r| !r.is_empty())
    });
    // Stop while the task runs: its result cannot be reported to this server.
    server.stop().unwrap();

    let mut config = durable_config(&state, &second, Mode::Broadcast);
    config.listen = format!("127.0.0.1:{port}");
    let server = start_server(config);
    wait_for("both tasks answered", || {
        accepted_per_task(&read_results(&second)).len() == 2
    });
    stop.trigger();
    client.join().unwrap();
    server.stop().unwrap();
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "t-0\nt-1\n",
        "each task ran once"
    );
    let results = read_results(&second);
    assert!(results.iter().all(|r| r["stale"] == false), "{results:?}");
    assert_eq!(
        accepted_per_task(&results)
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![1, 1]
    );
}

/// The lines of `--tasks-from FILE` carry keys journaled with their tasks: a
/// server restarted on its state skips the lines it published, and publishes
/// a line whose text changed and one added at the end.
#[test]
fn a_restart_does_not_publish_the_tasks_file_again_but_publishes_an_edited_or_appended_line() {
    let dir = tempfile::tempdir().unwrap();
    let (state, results) = (dir.path().join("state"), dir.path().join("results.jsonl"));
    let tasks = dir.path().join("tasks.txt");
    write_tasks(&tasks, "job", 5);
    // Runs the server on the state until it has read the whole file: the
    // texts it published, and its log.
    let run = || {
        let args = server_args("127.0.0.1:0", &state, &tasks, &results);
        let (mut server, _) = start_server_proc(&args);
        server.wait_line(&format!("tasks from {} published", tasks.display()));
        server.signal("TERM");
        assert_eq!(server.wait_exit(), 0);
        let log = server.whole_log().to_vec();
        let produced: Vec<String> = log
            .iter()
            .filter_map(|l| l.split(" produced: ").nth(1))
            .map(String::from)
            .collect();
        (produced, log)
    };
    let skipped = |log: &[String]| {
        log.iter()
            .find(|l| l.contains("were published before (same line, same text): skipped"))
            .cloned()
    };

    let (produced, log) = run();
    assert_eq!(produced, ["job-0", "job-1", "job-2", "job-3", "job-4"]);
    assert_eq!(skipped(&log), None);

    let (produced, log) = run();
    assert_eq!(produced, Vec::<String>::new(), "nothing published again");
    let line = skipped(&log).expect("the skipped lines are logged");
    assert!(line.contains("5 of 5 tasks from"), "{line}");

    std::fs::write(&tasks, "job-0\njob-1 edited\njob-2\njob-3\njob-4\njob-5\n").unwrap();
    let (produced, log) = run();
    assert_eq!(produced, ["job-1 edited", "job-5"]);
    let line = skipped(&log).expect("the skipped lines are logged");
    assert!(line.contains("4 of 6 tasks from"), "{line}");
}

/// The arguments of a `contact-server` listening on `listen`, with its state
/// in `state`, in queue mode, reading tasks from `tasks` and writing results to `results`.
fn server_args(listen: &str, state: &Path, tasks: &Path, results: &Path) -> Vec<String> {
    [
        "--listen",
        listen,
        "--dispatch",
        "queue",
        "--state-dir",
        state.to_str().unwrap(),
        "--tasks-from",
        tasks.to_str().unwrap(),
        "--results-to",
        results.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `contact-server` with `args`; returns it once it listens, and its address.
fn start_server_proc(args: &[String]) -> (Proc, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Proc::start(SERVER_BIN, &args);
    let line = server.wait_line("listening on");
    let addr = format!("127.0.0.1:{}", port_of_listening_line(&line));
    (server, addr)
}

/// Runs `contact-server` with `args` to its end: its exit status and stderr.
fn run_to_exit(args: &[String]) -> (Option<i32>, String) {
    let out = std::process::Command::new(SERVER_BIN)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

fn write_tasks(path: &Path, prefix: &str, n: usize) {
    let lines: String = (0..n).map(|i| format!("{prefix}-{i}\n")).collect();
    std::fs::write(path, lines).unwrap();
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The number in `line` after `before` (e.g. "trimmed 4096 bytes").
fn number_after(line: &str, before: &str) -> u64 {
    line.split(before)
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {before:?} in {line:?}"))
}

/// What a power loss leaves at the end of a file whose size reached the disk
/// before its data: zeros, or part of a frame and then zeros.
#[derive(Clone, Copy, Debug)]
enum PowerLossTail {
    Zeros,
    HalfAFrameThenZeros,
}

#[test]
fn a_tail_left_by_a_power_loss_is_trimmed_and_everything_acknowledged_is_served() {
    const N: usize = 10;
    for tail in [PowerLossTail::Zeros, PowerLossTail::HalfAFrameThenZeros] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let results = dir.path().join("results.jsonl");
        let (tasks, empty) = (dir.path().join("tasks.txt"), dir.path().join("empty"));
        write_tasks(&tasks, "job", N);
        std::fs::write(&empty, "").unwrap();

        let (mut server, addr) =
            start_server_proc(&server_args("127.0.0.1:0", &state, &tasks, &results));
        server.wait_line(&format!("all {N} tasks"));
        let mut first = agent_process(&addr, "first", "echo done", &["--max-tasks", "4"]);
        assert_eq!(first.wait_exit(), 0, "the agent got 4 results acknowledged");
        let acknowledged = accepted_per_task(&read_results(&results));
        assert!(acknowledged.len() >= 4, "{acknowledged:?}");
        server.signal("KILL");
        server.wait_exit();

        let journal = state.join("journal");
        let mut bytes = std::fs::read(&journal).unwrap();
        let mut appended = vec![];
        if let PowerLossTail::HalfAFrameThenZeros = tail {
            // A frame is its length (u32), checksum (u32), kind byte, then
            // the JSON: take the first half of the first task's frame.
            let json = find(&bytes, br#"{"k":"task""#).expect("a task record");
            let start = json - 9;
            let len = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap()) as usize;
            appended.extend_from_slice(&bytes[start..start + (8 + len) / 2]);
        }
        appended.resize(4096, 0);
        bytes.extend_from_slice(&appended);
        std::fs::write(&journal, &bytes).unwrap();

        let (mut server, addr) =
            start_server_proc(&server_args("127.0.0.1:0", &state, &empty, &results));
        let warning = server.wait_line("trimmed");
        assert!(
            warning.contains(journal.to_str().unwrap()),
            "{tail:?}: {warning}"
        );
        assert!(
            number_after(&warning, "trimmed ") >= 4096,
            "{tail:?}: {warning}"
        );
        let mut second = agent_process(&addr, "second", "echo done", &[]);
        wait_for("every task answered after the restart", || {
            accepted_per_task(&read_results(&results)).len() == N
        });
        server.signal("TERM");
        assert_eq!(server.wait_exit(), 0);
        second.signal("TERM");
        second.wait_exit();
        let per_task = accepted_per_task(&read_results(&results));
        assert!(
            per_task.values().all(|&n| n == 1),
            "{tail:?}: what was acknowledged before the power loss is not done again: {per_task:?}"
        );
    }
}

/// The state directory, results file and empty tasks file in `dir` after a
/// server run that published, per `(prefix, n)`, `n` tasks named `prefix-i`
/// in a commit of their own, and stopped.
fn state_after_commits(dir: &Path, commits: &[(&str, usize)]) -> (PathBuf, PathBuf, PathBuf) {
    let state = dir.join("state");
    let results = dir.join("results.jsonl");
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    let server = start_server(durable_config(&state, &results, Mode::Queue));
    for &(prefix, n) in commits {
        publish(&server, prefix, n);
    }
    server.stop().unwrap();
    (state, results, empty)
}

/// Answers the tasks of `server` (at `addr`, writing `results`) with an
/// agent until `n` are answered, stops both, and returns the tasks answered.
fn answer_all(mut server: Proc, addr: &str, results: &Path, n: usize) -> BTreeSet<String> {
    let mut worker = agent_process(addr, "worker", "echo done", &[]);
    wait_for("every task answered", || {
        accepted_per_task(&read_results(results)).len() == n
    });
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0);
    worker.signal("TERM");
    worker.wait_exit();
    read_results(results)
        .iter()
        .map(|r| r["task"].as_str().unwrap().to_string())
        .collect()
}

fn early_tasks() -> BTreeSet<String> {
    (0..5).map(|i| format!("early-{i}")).collect()
}

#[test]
fn damage_before_a_complete_commit_exits_1_and_repair_keeps_what_came_before_it() {
    let dir = tempfile::tempdir().unwrap();
    // The late tasks are committed after the early ones, and another batch after them.
    let commits = [("early", 5), ("late", 5), ("later", 2)];
    let (state, results, empty) = state_after_commits(dir.path(), &commits);
    let journal = state.join("journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    let late_0 = find(&bytes, b"late-0").expect("the late tasks are in the journal");
    bytes[late_0] ^= 0x20;
    std::fs::write(&journal, &bytes).unwrap();

    let mut args = server_args("127.0.0.1:0", &state, &empty, &results);
    let (status, stderr) = run_to_exit(&args);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains(journal.to_str().unwrap()), "{stderr}");
    let at = number_after(&stderr, "damaged at byte ") as usize;
    assert!(
        at < late_0 && late_0 - at < 64,
        "the offset of the damaged record's frame: {stderr}"
    );
    assert!(stderr.contains("--repair"), "{stderr}");
    assert_eq!(std::fs::read(&journal).unwrap(), bytes, "nothing changed");

    args.push("--repair".into());
    let (mut server, addr) = start_server_proc(&args);
    let line = server.wait_line("moved");
    let aside = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("journal.damaged-")
        })
        .expect("the damaged part is moved aside in the state directory");
    assert!(line.contains(aside.to_str().unwrap()), "{line}");
    let moved = std::fs::read(&aside).unwrap();
    assert!(
        bytes.ends_with(&moved) && find(&moved, b"late-4").is_some(),
        "the moved bytes are the journal's tail from before the damage"
    );
    assert_eq!(
        number_after(&line, "moved ") as usize,
        moved.len(),
        "{line}"
    );
    assert!(
        moved.len() < bytes.len() && moved.len() >= bytes.len() - at,
        "kept up to the last commit before the damage"
    );
    assert_eq!(
        answer_all(server, &addr, &results, 5),
        early_tasks(),
        "what was before the damage is served; what was moved aside is not"
    );
}

#[test]
fn a_last_batch_torn_by_a_power_loss_before_its_marker_is_trimmed_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (state, results, empty) = state_after_commits(dir.path(), &[("early", 5), ("late", 5)]);
    let journal = state.join("journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    // The page holding the start of the last batch never reached the disk,
    // its marker did: the late tasks' frames are zeros.
    let late_0 = find(&bytes, b"late-0").expect("the late tasks are in the journal");
    let late_4 = find(&bytes, b"late-4").unwrap();
    bytes[late_0 - 30..late_4].fill(0);
    std::fs::write(&journal, &bytes).unwrap();

    let (mut server, addr) =
        start_server_proc(&server_args("127.0.0.1:0", &state, &empty, &results));
    let warning = server.wait_line("tore the last batch");
    assert!(warning.contains(journal.to_str().unwrap()), "{warning}");
    assert!(warning.contains("never acknowledged"), "{warning}");
    // (The file itself is compacted right after.)
    let trimmed = number_after(&warning, "trimmed ") as usize;
    let kept = number_after(&warning, "after byte ") as usize;
    assert_eq!(kept + trimmed, bytes.len(), "{warning}");
    assert!(
        kept <= late_0 - 30,
        "trimmed from before the torn batch: {warning}"
    );
    assert_eq!(
        answer_all(server, &addr, &results, 5),
        early_tasks(),
        "the commits before the torn batch are served"
    );
}

#[test]
fn a_state_directory_in_use_exits_1_not_as_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let results = dir.path().join("results.jsonl");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let args = server_args("127.0.0.1:0", &state, &empty, &results);
    let (mut first, _) = start_server_proc(&args);
    let (status, stderr) = run_to_exit(&args);
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("in use") && stderr.contains(state.to_str().unwrap()),
        "{stderr}"
    );
    first.signal("TERM");
    assert_eq!(first.wait_exit(), 0);
}
