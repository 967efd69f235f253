//! A failing disk: when the server cannot write its journal or its results
//! (a file-size limit, a full file system) it logs one error naming the file,
//! stops taking work, answers agents UNAVAILABLE so that they keep their
//! results, and exits 1 by itself. Restarted on the same state with room
//! again, it finishes the work: no acknowledged result is lost or repeated.

mod common;

use common::*;
use contact::proto::{Empty, ResultMsg};
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpcio::{RpcStatusCode, WriteFlags};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Tasks in the file the first server reads: their journal records alone
/// (about 45 KB, each with its line's idempotency key) fit under the limits
/// below, their results do not.
const TASKS: usize = 400;

/// How long the failed server may take from its error to its exit: no grace
/// period (the test asks for 30 s), only the bounded drain of open calls.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// Where a server keeps its state directory and its results file.
struct Files {
    state: PathBuf,
    results: PathBuf,
}

impl Files {
    /// Both in `dir`.
    fn in_dir(dir: &Path) -> Files {
        Files {
            state: dir.join("state"),
            results: dir.join("results.jsonl"),
        }
    }
}

/// A server in queue mode on `files`; a generator keeps producing tasks
/// besides the file, so that publishing meets the failure too.
fn server_command(files: &Files, tasks: &Path, listen: &str, generate: bool) -> Command {
    let mut cmd = Command::new(SERVER_BIN);
    cmd.arg("--listen").arg(listen);
    cmd.arg("--state-dir").arg(&files.state);
    cmd.arg("--results-to").arg(&files.results);
    cmd.arg("--tasks-from").arg(tasks);
    cmd.args([
        "--dispatch",
        "queue",
        "--max-in-flight",
        "8",
        "--grace",
        "30",
    ]);
    if generate {
        cmd.args(["--generate", "2", "--every", "0.1"]);
    }
    cmd
}

fn agent(addr: &str, id: &str) -> Proc {
    agent_process(addr, id, "sh -c 'echo done $0'", &[])
}

/// The task ids in a log's "task 17 <word>: ..." lines, one per line, for
/// any of `words`: "produced" (a server accepted it from a producer), "done"
/// or "failed" (an agent sent its answer).
fn task_ids(log: &[String], words: &[&str]) -> Vec<u64> {
    log.iter()
        .filter_map(|l| {
            let (id, rest) = l.split("task ").nth(1)?.split_once(' ')?;
            let (word, _) = rest.split_once(':')?;
            words.contains(&word).then(|| id.parse().ok())?
        })
        .collect()
}

/// The tasks an agent answered, one per answer it sent.
fn answered_tasks(log: &[String]) -> Vec<u64> {
    task_ids(log, &["done", "failed"])
}

/// The task count in a server's "state DIR: N tasks (M unfinished), ..." line.
fn restored_tasks(line: &str) -> usize {
    line.split(" tasks (")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no task count in {line:?}"))
}

/// The count in an agent's last line, "client ID stopping: N results acknowledged"
/// (its "N results acknowledged" lines per call are at debug).
fn acknowledged(agent: &mut Proc) -> usize {
    let line = agent.wait_line("stopping: ");
    line.split("stopping: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"))
}

/// Runs a server whose disk fails under it (`first` is its command, with the
/// fault set up), checks that it stops cleanly, then lets `make_room` give the
/// space back and checks that a restart finishes the work without losing or
/// repeating an acknowledged result. `os_error` is how the OS words the fault.
fn fail_then_recover(files: &Files, first: Command, os_error: &str, make_room: impl FnOnce()) {
    let scratch = tempfile::tempdir().unwrap();
    let results = &files.results;
    let mut server = Proc::spawn(first);
    let line = server.wait_line("listening on");
    let addr = format!("127.0.0.1:{}", port_of_listening_line(&line));
    let mut agents = [agent(&addr, "d1"), agent(&addr, "d2")];

    let error = server.wait_line(os_error);
    let failed_at = Instant::now();
    let code = server.wait_exit();
    let took = failed_at.elapsed();
    let log = server.whole_log().to_vec();
    eprintln!("exited with status {code} {took:?} after: {error}");
    assert_eq!(
        code, 1,
        "the server exits 1 when it cannot record; log:\n{log:#?}"
    );
    assert!(
        took < EXIT_WITHIN,
        "it took {took:?} to exit after the error"
    );
    assert!(
        error.contains("ERROR")
            && (error.contains(results.to_str().unwrap())
                || error.contains(files.state.to_str().unwrap())),
        "the error names the file: {error}"
    );
    let errors: Vec<&String> = log.iter().filter(|l| l.contains(os_error)).collect();
    assert_eq!(errors.len(), 1, "one error line: {errors:#?}");
    assert!(
        !log.iter().any(|l| l.contains("after shutdown")),
        "no line per dropped record: {log:#?}"
    );
    let refused: Vec<&String> = log.iter().filter(|l| l.contains("not accepted")).collect();
    assert!(refused.len() <= 1, "publishing refused once: {refused:#?}");
    // How each agent's session ended: as a lost connection (it keeps its
    // results and dials again), never as a refusal. An agent whose last result
    // call started after the server was gone sees only that (connection refused).
    let mut ends = vec![];
    for a in &mut agents {
        a.wait_line("dialling");
        ends.extend(a.seen.iter().filter(|l| l.contains("failed: ")).cloned());
        let refusal = format!("server {addr} refused");
        assert!(
            !a.seen.iter().any(|l| l.contains(&refusal)),
            "{:#?}",
            a.seen
        );
    }
    assert!(
        ends.iter()
            .any(|l| l.contains("UNAVAILABLE") && l.contains("cannot record")),
        "an agent was told UNAVAILABLE: {ends:#?}"
    );
    eprintln!("the agents' sessions ended: {ends:#?}");

    let produced: BTreeSet<u64> = task_ids(&log, &["produced"]).into_iter().collect();
    assert!(produced.len() >= TASKS, "{} tasks produced", produced.len());
    let before = read_results(results);
    assert!(
        accepted_per_task(&before).len() < produced.len(),
        "the disk failed mid-run"
    );

    make_room();
    let empty = scratch.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let mut server = Proc::spawn(server_command(files, &empty, &addr, false));
    server.wait_line("listening on");
    let held = restored_tasks(&server.wait_line(" tasks ("));
    // Done when every task has its accepted result and every answer an agent
    // sent (those it kept from the failed server too) is recorded: each task
    // it answered has a line from it. (A delivery whose journal record the
    // failure kept out is made again with the same attempt number, so an
    // agent may have two lines for it: one stale, one accepted.)
    let unrecorded = |agent: &mut Proc, id: &str, all: &[serde_json::Value]| {
        let lines: BTreeSet<u64> = all
            .iter()
            .filter(|r| r["client"] == id)
            .filter_map(|r| r["task_id"].as_u64())
            .collect();
        answered_tasks(agent.lines_so_far())
            .into_iter()
            .filter(|t| !lines.contains(t))
            .collect::<Vec<u64>>()
    };
    wait_for(
        "every task and every answer recorded after the restart",
        || {
            let all = read_results(results);
            accepted_per_task(&all).len() == held
                && agents
                    .iter_mut()
                    .zip(["d1", "d2"])
                    .all(|(a, id)| unrecorded(a, id, &all).is_empty())
        },
    );
    server.signal("TERM");
    assert_eq!(server.wait_exit(), 0, "a clean stop exits 0");
    for (a, id) in agents.iter_mut().zip(["d1", "d2"]) {
        a.signal("TERM");
        let acked = acknowledged(a);
        assert_eq!(a.wait_exit(), 0);
        let answers = answered_tasks(a.whole_log()).len();
        assert_eq!(
            acked, answers,
            "{id}: every answer it sent was acknowledged"
        );
    }

    let all = read_results(results);
    for (a, id) in agents.iter_mut().zip(["d1", "d2"]) {
        let missing = unrecorded(a, id, &all);
        assert!(
            missing.is_empty(),
            "{id}: answers not recorded: {missing:?}"
        );
    }
    let per_task = accepted_per_task(&all);
    assert!(
        per_task.values().all(|&n| n == 1),
        "exactly one accepted result per task"
    );
    let answered: BTreeSet<u64> = per_task.keys().copied().collect();
    assert_eq!(
        answered,
        (1..=held as u64).collect(),
        "every task held is answered"
    );
    // The journal records a task before it is reported produced. Only when the
    // journal itself failed may it hold tasks that were refused: whole
    // records of the batch that failed (until recovery trims them).
    assert!(produced.is_subset(&answered));
    let unreported: Vec<&u64> = answered.difference(&produced).collect();
    if error.contains(results.to_str().unwrap()) {
        assert!(
            unreported.is_empty(),
            "refused tasks were run: {unreported:?}"
        );
    } else {
        let last = produced.last().unwrap();
        assert!(
            unreported.iter().all(|&id| id > last),
            "only tasks of the failed batch are unreported: {unreported:?}"
        );
    }
    for r in &before {
        assert!(
            all.contains(r),
            "a line recorded before the failure is kept: {r}"
        );
    }
}

/// Over the wire, once a write has failed: the open task stream ends
/// UNAVAILABLE, the result that could not be recorded is answered UNAVAILABLE
/// (not INTERNAL: the agent keeps it), so are new calls, and stopping skips
/// the grace period and returns the failure.
#[test]
fn after_a_failed_write_every_call_is_answered_unavailable() {
    let unavailable = |e: grpcio::Error| match e {
        grpcio::Error::RpcFailure(s) => {
            assert_eq!(s.code(), RpcStatusCode::UNAVAILABLE, "{s:?}");
            assert!(s.message().contains("cannot record"), "{s:?}");
        }
        other => panic!("not UNAVAILABLE: {other:?}"),
    };
    // Every write to /dev/full fails with ENOSPC ("No space left on device").
    let mut config = server_config().with_results(Path::new("/dev/full"));
    config.grace = Duration::from_secs(30);
    let server = start_server(config);
    publish(&server, "t", 2);
    let client = raw_client(server.port());
    let mut tasks = client
        .get_task_opt(&Empty::new(), as_client("raw"))
        .unwrap();
    let task = block_on(tasks.next()).unwrap().unwrap();
    let (mut tx, rx) = client.tell_result_opt(as_client("raw")).unwrap();
    let sent = block_on(async {
        let result = ResultMsg {
            ret: "done".into(),
            task_id: task.task_id,
            ok: true,
            attempt: task.attempt,
            incarnation: task.incarnation,
            ..Default::default()
        };
        tx.send((result, WriteFlags::default())).await?;
        tx.close().await
    });
    // The server may answer before the stream is closed: then closing it
    // fails with the server's status.
    match sent {
        Ok(()) => unavailable(block_on(rx).unwrap_err()),
        Err(grpcio::Error::RpcFinished(Some(status))) => {
            unavailable(grpcio::Error::RpcFailure(status))
        }
        Err(other) => panic!("sending the result: {other:?}"),
    }
    let why = server.failure().expect("the server knows it failed");
    assert!(
        why.contains("/dev/full") && why.contains("No space left"),
        "{why}"
    );
    let ended = block_on(async {
        loop {
            match tasks.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("the task stream ended without an error"),
            }
        }
    });
    unavailable(ended);
    let mut again = client
        .get_task_opt(&Empty::new(), as_client("late"))
        .unwrap();
    unavailable(block_on(again.next()).unwrap().unwrap_err());
    let (mut tx, rx) = client.tell_result_opt(as_client("raw")).unwrap();
    // Refused at once: closing may find the call over already.
    let _ = block_on(tx.close());
    unavailable(block_on(rx).unwrap_err());
    let started = Instant::now();
    let err = server.stop().unwrap_err();
    assert!(matches!(err, contact::Error::Recording(_)), "{err}");
    assert!(started.elapsed() < EXIT_WITHIN, "{:?}", started.elapsed());
}

fn tasks_file(dir: &Path) -> PathBuf {
    let path = dir.join("tasks.txt");
    let text: String = (0..TASKS).map(|i| format!("job-{i}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_file_size_limit_stops_the_server_and_a_restart_finishes_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = tasks_file(dir.path());
    let files = Files::in_dir(dir.path());
    let mut first = server_command(&files, &tasks, "127.0.0.1:0", true);
    with_file_size_limit(&mut first, 64 * 1024);
    fail_then_recover(&files, first, "File too large", || {});
}

/// A tmpfs mounted for one test, unmounted when it ends (even by a panic).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts `size` of tmpfs, or says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {} with size={size}", self.path().display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Runs [`fail_then_recover`] with a tmpfs of `size` holding the files that
/// `place` chooses (given the tmpfs and a directory on the ordinary disk).
fn on_a_small_tmpfs(size: &str, place: impl FnOnce(&Path, &Path) -> Files) {
    let fs = match Tmpfs::mount(size) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: a full file system is tested on a tmpfs, which needs root: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let tasks = tasks_file(dir.path());
    let files = place(fs.path(), dir.path());
    let first = server_command(&files, &tasks, "127.0.0.1:0", true);
    fail_then_recover(&files, first, "No space left on device", || {
        fs.resize("16m")
    });
}

#[test]
fn a_full_file_system_stops_the_server_and_a_restart_finishes_the_work() {
    on_a_small_tmpfs("256k", |fs, _| Files::in_dir(fs));
}

/// Only the results file's disk fills up: the journal has the results that
/// could not be written to it, and the restart restores them to the file.
#[test]
fn a_full_results_disk_stops_the_server_and_a_restart_restores_the_file() {
    on_a_small_tmpfs("64k", |fs, disk| Files {
        state: disk.join("state"),
        results: fs.join("results.jsonl"),
    });
}

/// `--results-to` may be a pipe (or /dev/null): its lines are written through
/// as they are recorded — a pipe can be neither synced nor read back, and
/// asking it to be is no disk error.
#[test]
fn results_can_go_to_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("results.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let f = std::io::BufReader::new(std::fs::File::open(&fifo).unwrap());
            f.lines()
                .take(20)
                .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap())
                .collect::<Vec<_>>()
        })
    };
    let mut config = server_config().with_results(&fifo);
    config.state_dir = Some(dir.path().join("state"));
    let server = start_server(config);
    publish(&server, "t", 20);
    let stop = contact::shutdown::Shutdown::new();
    let mut c = client_config(server.port(), "a");
    c.max_tasks = Some(20);
    assert_eq!(spawn_client(c, &stop).join().unwrap().acknowledged, 20);
    let mut ids = accepted_ids(&reader.join().unwrap(), "a");
    ids.sort_unstable();
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());
    server.stop().unwrap();
}
