//! Several `contact-server` replicas sharing one fleet through NATS
//! JetStream (`--store nats://...`), against real `nats-server` processes
//! this binary starts: one node, or three in a cluster on loopback. Its tests
//! start clusters, replicas and agents of their own and take one machine's
//! worth of processes each: they run one at a time, each holding a lock for
//! its whole run (as `--test-threads=1` would, whatever the harness is
//! given). Without nats-server they are skipped with a message, and fail
//! with `CI=true`.

mod common;

use common::cutproxy::CutProxy;
use common::nats::NatsCluster;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Held by each test for its whole run: one test at a time, even when the
/// harness runs several threads.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds a replica's claims and agent leases outlive it (`--replica-timeout`):
/// short, so that the tests of a killed replica see its work move quickly.
const REPLICA_TIMEOUT: &str = "4";

/// How long a scenario may take to settle its tasks after a failure (a
/// killed replica's claims come back after the replica timeout, a killed
/// NATS node's streams elect new leaders).
const SETTLE: Duration = Duration::from_secs(60);

/// An agent command that takes a moment per task, so that tasks are still
/// in agents' hands when a test kills or stops something.
const SLOW_ECHO: &str = "sh -c 'sleep 0.1; echo \"$0\"'";

#[test]
fn the_test_cluster_forms_survives_a_killed_node_and_takes_it_back() {
    let _one = one_at_a_time();
    let Some(mut nats) = NatsCluster::start(3, "the test cluster") else {
        return;
    };
    assert_eq!(nats.urls().split(',').count(), 3, "{}", nats.urls());
    let leader = nats.meta_leader_seen_by(0).expect("a meta leader");
    let leader_index = (0..3)
        .find(|&i| format!("n{i}") == leader)
        .unwrap_or_else(|| panic!("meta leader {leader:?} is none of n0..n2"));

    // The leader is the node whose loss matters: kill it.
    nats.kill9(leader_index);
    assert_eq!(nats.running().len(), 2);
    nats.wait_until_ready()
        .unwrap_or_else(|why| panic!("{why}\n{}", nats.logs()));
    let new_leader = nats.meta_leader_seen_by(nats.running()[0]).unwrap();
    assert_ne!(new_leader, leader, "the dead node cannot lead");

    // Back on the same ports and storage, it rejoins as a follower.
    nats.restart(leader_index);
    assert_eq!(nats.running().len(), 3);
    assert_eq!(nats.meta_leader_seen_by(leader_index), Some(new_leader));

    // A client of its port reaches it through a proxy, until the proxy is cut.
    let proxy = CutProxy::start(&nats.addr_of(leader_index));
    let info = nats_info(&proxy.addr()).expect("INFO through the proxy");
    assert!(
        info.contains(&format!("\"server_name\":\"{leader}\"")),
        "{info}"
    );
    proxy.cut();
    assert!(
        std::net::TcpStream::connect(proxy.addr()).is_err(),
        "a cut proxy refuses connections"
    );
    proxy.restore();
    assert!(
        nats_info(&proxy.addr()).is_some(),
        "restored proxy forwards"
    );
    nats.stop_all();
    assert!(nats.running().is_empty());
}

#[test]
fn two_replicas_on_one_node_share_a_work_queue() {
    a_work_queue_shared(1, 2, "two replicas share a work queue");
}

#[test]
fn three_replicas_on_three_nodes_share_a_work_queue() {
    a_work_queue_shared(3, 3, "three replicas share a work queue");
}

/// Queue mode, `replicas` replicas on `nodes` NATS nodes (as many copies),
/// two agents on each replica: tasks pushed through every replica each get
/// exactly one accepted result over all replicas' files, and the agents of
/// every replica take a share.
fn a_work_queue_shared(nodes: usize, replicas: usize, test: &str) {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start(test, nodes, "queue") else {
        return;
    };
    fleet.add_replicas(replicas);
    for r in 0..replicas {
        fleet.add_agent(Dial::Home(r), SLOW_ECHO, &[]);
        fleet.add_agent(Dial::Home(r), SLOW_ECHO, &[]);
    }
    let ids = fleet.push_round_robin("job", 30);
    let distinct: BTreeSet<&u64> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "task ids are global: {ids:?}");
    fleet.wait_settled(&ids);
    // The admin API answers the same from every replica: the results every
    // replica stored, and every agent with the replica serving it.
    let mut seen = vec![];
    for r in &fleet.replicas {
        let (code, out, err) = ctl(
            &["--server", &r.admin, "results", "--from", "1", "--json"],
            &[],
        );
        assert_eq!(code, 0, "contact-ctl results from {}: {err}", r.name);
        let mut answered: Vec<(u64, String)> = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .filter(|v| v["accepted"] == true)
            .map(|v| {
                (
                    v["task_id"].as_u64().unwrap(),
                    v["client"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        answered.sort();
        let tasks: BTreeSet<u64> = answered.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            tasks.len(),
            answered.len(),
            "one accepted result per task from {}: {out}",
            r.name
        );
        assert_eq!(
            tasks,
            ids.iter().copied().collect(),
            "{} lists every task's result",
            r.name
        );
        let (code, out, err) = ctl(&["--server", &r.admin, "clients"], &[]);
        assert_eq!(code, 0, "contact-ctl clients from {}: {err}", r.name);
        assert!(
            out.contains(&format!("{} agents connected", 2 * replicas)),
            "{} lists the whole fleet: {out}",
            r.name
        );
        seen.push(answered);
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "every replica answers the same: {seen:?}"
    );

    let outcomes = fleet.stop();
    outcomes.assert_each_task_accepted_once(&ids);
    for r in &fleet.replicas {
        assert!(
            outcomes.accepted_in(&r.results) > 0,
            "replica {}'s agents answered none of {} tasks ({})",
            r.name,
            ids.len(),
            r.results.display()
        );
    }
}

#[test]
fn two_replicas_on_one_node_broadcast_to_one_fleet() {
    broadcast_shared(1, 2, "two replicas broadcast");
}

#[test]
fn three_replicas_on_three_nodes_broadcast_to_one_fleet() {
    broadcast_shared(3, 3, "three replicas broadcast");
}

/// Broadcast mode, `replicas` replicas on `nodes` NATS nodes, one agent on
/// each: every agent answers every task pushed through any replica exactly
/// once; a task for one agent, and one for the agents with a label, pushed
/// through a replica that agent is not on, reach that agent only.
fn broadcast_shared(nodes: usize, replicas: usize, test: &str) {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start(test, nodes, "broadcast") else {
        return;
    };
    fleet.add_replicas(replicas);
    let everyone: Vec<String> = (0..replicas)
        .map(|r| fleet.add_agent(Dial::Home(r), "echo", &["--label", &format!("home=r{r}")]))
        .collect();
    let everyone: Vec<&str> = everyone.iter().map(|s| &**s).collect();
    let ids = fleet.push_round_robin("to all", 6);
    fleet.wait_answered_by_all(&ids, &everyone);

    // Through the first replica to the last one's agent, and through the
    // last replica to the agents labelled as the first's.
    let last = replicas - 1;
    let to_one = fleet.replicas[0].push("just you", &["--agent", everyone[last]]);
    let to_label = fleet.replicas[last].push("the first's", &["--target", "home=r0"]);
    fleet.wait_answered_by_all(&[to_one], &[everyone[last]]);
    fleet.wait_answered_by_all(&[to_label], &[everyone[0]]);

    let outcomes = fleet.stop();
    outcomes.assert_each_agent_answered_once(&ids, &everyone);
    outcomes.assert_each_agent_answered_once(&[to_one], &[everyone[last]]);
    outcomes.assert_each_agent_answered_once(&[to_label], &[everyone[0]]);
    let strays: Vec<&Value> = outcomes
        .results
        .iter()
        .map(|(_, v)| v)
        .filter(|v| {
            (v["task_id"] == to_one && v["client"] != everyone[last])
                || (v["task_id"] == to_label && v["client"] != everyone[0])
        })
        .collect();
    assert!(
        strays.is_empty(),
        "targeted tasks answered by others: {strays:?}"
    );
}

#[test]
fn a_replica_killed_mid_run_hands_its_agents_and_tasks_to_the_other() {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start("a killed replica", 1, "queue") else {
        return;
    };
    fleet.add_replicas(2);
    for _ in 0..4 {
        fleet.add_agent(Dial::Every, SLOW_ECHO, &[]);
    }
    let ids = fleet.push_round_robin("job", 40);
    fleet.wait_some_settled(10, "before the kill");
    // Agents pick a replica at random: the one with more of them dies.
    let victim = usize::from(fleet.agents_on(1) > fleet.agents_on(0));
    let survivor = 1 - victim;
    let moving = fleet.agents_on(victim);
    fleet.replicas[victim].kill9();
    let killed = Instant::now();

    fleet.wait_all_agents_on(survivor);
    let moved = killed.elapsed();
    fleet.wait_settled(&ids);
    eprintln!(
        "replica r{victim} killed: its {moving} of 4 agents on r{survivor} in {:.1}s, all {} tasks answered {:.1}s after the kill",
        moved.as_secs_f64(),
        ids.len(),
        killed.elapsed().as_secs_f64()
    );
    let outcomes = fleet.stop();
    outcomes.assert_each_task_accepted_once(&ids);
}

#[test]
fn a_nats_node_killed_mid_run_loses_nothing_with_three_copies() {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start("a killed NATS node", 3, "queue") else {
        return;
    };
    fleet.add_replicas(2);
    for a in 0..4 {
        fleet.add_agent(Dial::Home(a % 2), SLOW_ECHO, &[]);
    }
    let mut ids = fleet.push_round_robin("job", 40);
    fleet.wait_some_settled(10, "before the kill");
    // The meta leader goes: the cluster elects another, and the leaders of
    // the streams that were on it move.
    let leader = fleet.nats.meta_leader_seen_by(0).expect("a meta leader");
    let node: usize = leader[1..].parse().unwrap();
    fleet.nats.kill9(node);
    let killed = Instant::now();
    // Two nodes of three still store tasks pushed through either replica
    // (refused at most while leaders are elected).
    for n in 0..10 {
        let text = format!("after the kill {n}");
        let key = format!("after-kill-{n}");
        ids.push(fleet.replicas[n % 2].push_until_taken(&text, &key));
    }
    let pushed = killed.elapsed();
    fleet.wait_settled(&ids);
    eprintln!(
        "NATS node {leader} killed: 10 more tasks pushed in {:.1}s, all {} answered {:.1}s after the kill",
        pushed.as_secs_f64(),
        ids.len(),
        killed.elapsed().as_secs_f64()
    );
    fleet.report_troubles();
    fleet.nats.restart(node);

    let outcomes = fleet.stop();
    outcomes.assert_each_task_accepted_once(&ids);
}

#[test]
fn a_broadcast_fleet_stopped_and_started_again_continues_after_each_agents_last_task() {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start("a stopped broadcast fleet", 1, "broadcast") else {
        return;
    };
    fleet.add_replicas(2);
    let everyone = [
        fleet.add_agent(Dial::Home(0), "echo", &[]),
        fleet.add_agent(Dial::Home(1), "echo", &[]),
    ];
    let everyone: Vec<&str> = everyone.iter().map(|s| &**s).collect();
    let before = fleet.push_round_robin("before", 4);
    fleet.wait_answered_by_all(&before, &everyone);

    fleet.stop_everything();
    fleet.start_everything_again();
    let after = fleet.push_round_robin("after", 4);
    fleet.wait_answered_by_all(&after, &everyone);
    for a in &mut fleet.agents {
        let again: Vec<u64> = tasks_run(a.proc())
            .into_iter()
            .filter(|t| before.contains(t))
            .collect();
        assert!(
            again.is_empty(),
            "{} ran tasks {again:?} again after the restart",
            a.id
        );
    }

    let outcomes = fleet.stop();
    let every: Vec<u64> = before.iter().chain(&after).copied().collect();
    outcomes.assert_each_agent_answered_once(&every, &everyone);
}

#[test]
fn a_work_queue_stopped_and_started_again_answers_the_tasks_left() {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start("a stopped work queue", 1, "queue") else {
        return;
    };
    fleet.add_replicas(2);
    let slower = "sh -c 'sleep 0.3; echo \"$0\"'";
    fleet.add_agent(Dial::Home(0), slower, &[]);
    fleet.add_agent(Dial::Home(1), slower, &[]);
    let ids = fleet.push_round_robin("job", 40);
    fleet.wait_some_settled(6, "before the stop");

    fleet.stop_everything();
    let done_before = fleet.outcomes().settled_per_task().len();
    assert!(
        done_before < ids.len(),
        "every task was answered before the stop: the restart is not tested"
    );
    fleet.start_everything_again();
    fleet.wait_settled(&ids);
    let outcomes = fleet.stop();
    outcomes.assert_each_task_accepted_once(&ids);
    eprintln!(
        "{done_before} of {} tasks answered before the stop",
        ids.len()
    );
}

#[test]
fn a_replica_cut_off_from_nats_stops_taking_work_and_its_agents_move() {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start("a replica cut off from NATS", 1, "queue") else {
        return;
    };
    // r0 reaches NATS through a proxy the test cuts; r1 directly.
    let proxy = CutProxy::start(&fleet.nats.addr_of(0));
    fleet.add_replica_on(&format!("nats://{}", proxy.addr()));
    fleet.add_replicas(1);
    for _ in 0..4 {
        fleet.add_agent(Dial::Every, "echo", &[]);
    }
    let before = fleet.push_round_robin("before", 10);
    fleet.wait_settled(&before);

    proxy.cut();
    // What it cannot store it does not take: a push through it fails.
    let (code, out, err) = ctl(
        &["--server", &fleet.replicas[0].admin, "push", "lost?"],
        &[],
    );
    assert_ne!(
        code, 0,
        "a push through the cut-off replica succeeded: {out}{err}"
    );
    fleet.wait_all_agents_on(1);
    let after: Vec<u64> = (0..10)
        .map(|n| fleet.replicas[1].push(&format!("after {n}"), &[]))
        .collect();
    fleet.wait_settled(&after);

    // It may have stopped by itself (as it should) or still be running.
    fleet.replicas[0].kill9();
    let outcomes = fleet.stop();
    let every: Vec<u64> = before.iter().chain(&after).copied().collect();
    outcomes.assert_each_task_accepted_once(&every);
    let cut_off = &fleet.replicas[0].results;
    let diverged: Vec<&Value> = outcomes
        .results
        .iter()
        .filter(|(file, v)| file == cut_off && after.iter().any(|id| v["task_id"] == *id))
        .map(|(_, v)| v)
        .collect();
    assert!(
        diverged.is_empty(),
        "the cut-off replica recorded results of tasks pushed after the cut: {diverged:?}"
    );
}

#[test]
fn a_key_pushed_through_two_replicas_publishes_one_task() {
    let _one = one_at_a_time();
    let Some(mut fleet) = Fleet::start("an idempotent push", 1, "broadcast") else {
        return;
    };
    fleet.add_replicas(2);
    let agent = fleet.add_agent(Dial::Home(1), "echo", &[]);
    let first = fleet.replicas[0].push_reply("deploy v42", &["--key", "deploy-42"]);
    let again = fleet.replicas[1].push_reply("deploy v42", &["--key", "deploy-42"]);
    assert_eq!(first["duplicate"], false, "{first}");
    assert_eq!(
        again["duplicate"], true,
        "the second push published again: {again}"
    );
    assert_eq!(first["task_id"], again["task_id"], "{first} / {again}");
    let id = first["task_id"].as_u64().unwrap();
    // A later task: once it is answered, so is everything before it.
    let next = fleet.replicas[1].push("deploy v43", &["--key", "deploy-43"]);
    assert!(next > id, "task ids increase: {id}, then {next}");
    fleet.wait_answered_by_all(&[id, next], &[&agent]);

    let outcomes = fleet.stop();
    let texts: Vec<&Value> = outcomes.results.iter().map(|(_, v)| &v["task"]).collect();
    assert_eq!(
        texts.iter().filter(|t| **t == "deploy v42").count(),
        1,
        "results: {texts:?}"
    );
}

/// The first line a NATS server sends a new client (`INFO {...}`), or
/// `None` if the connection is refused or closed first.
fn nats_info(addr: &str) -> Option<String> {
    use std::io::BufRead;
    let s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    line.starts_with("INFO ").then_some(line)
}

/// One test's world: a NATS cluster, the replicas sharing it, their agents,
/// and a temporary directory for the replicas' sockets and files.
struct Fleet {
    /// Dropped (killed) first, then the replicas, then NATS.
    agents: Vec<Agent>,
    replicas: Vec<Replica>,
    nats: NatsCluster,
    /// `queue` or `broadcast`.
    dispatch: &'static str,
    dir: tempfile::TempDir,
}

/// Which replicas an agent dials.
#[derive(Clone, Copy)]
enum Dial {
    /// This one only.
    Home(usize),
    /// All of them (`--server A,B,...`): it fails over.
    Every,
}

/// An agent and what it is started with.
struct Agent {
    id: String,
    dial: Dial,
    exec: String,
    extra: Vec<String>,
    /// Its process, once started.
    proc: Option<Proc>,
}

impl Fleet {
    /// A NATS cluster of `nodes` for replicas in `dispatch` mode; `None`
    /// when nats-server is missing (the test is skipped).
    fn start(test: &str, nodes: usize, dispatch: &'static str) -> Option<Fleet> {
        Some(Fleet {
            nats: NatsCluster::start(nodes, test)?,
            dispatch,
            replicas: vec![],
            agents: vec![],
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// Starts `n` replicas on every NATS node, JetStream keeping as many
    /// copies as there are nodes.
    fn add_replicas(&mut self, n: usize) {
        for _ in 0..n {
            let urls = self.nats.urls();
            self.add_replica_on(&urls);
        }
    }

    /// Starts replica `r<N>` on `store` (`nats://...`).
    fn add_replica_on(&mut self, store: &str) {
        let copies = self.nats.urls().split(',').count();
        let name = format!("r{}", self.replicas.len());
        let r = Replica::start(self.dir.path(), &name, store, copies, self.dispatch);
        self.replicas.push(r);
    }

    /// Starts agent `agent<N>` dialling `dial`, answering with `exec`, with
    /// `extra` flags; its id, once it is connected.
    fn add_agent(&mut self, dial: Dial, exec: &str, extra: &[&str]) -> String {
        let mut agent = Agent {
            id: format!("agent{}", self.agents.len()),
            dial,
            exec: exec.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        agent.proc = Some(self.spawn_agent(&agent));
        self.agents.push(agent);
        self.agents.last().unwrap().id.clone()
    }

    /// Starts `agent`'s process, dialling its replicas; once it is connected.
    fn spawn_agent(&self, agent: &Agent) -> Proc {
        let servers = match agent.dial {
            Dial::Home(r) => self.replicas[r].addr.clone(),
            Dial::Every => self
                .replicas
                .iter()
                .map(|r| r.addr.clone())
                .collect::<Vec<_>>()
                .join(","),
        };
        let extra: Vec<&str> = agent.extra.iter().map(|s| &**s).collect();
        let mut p = agent_process(&servers, &agent.id, &agent.exec, &extra);
        p.wait_line("connected to");
        p
    }

    /// Pushes `n` tasks `<prefix> <i>`, through each running replica in
    /// turn; their ids.
    fn push_round_robin(&mut self, prefix: &str, n: usize) -> Vec<u64> {
        let running: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| self.replicas[r].running)
            .collect();
        (0..n)
            .map(|i| self.replicas[running[i % running.len()]].push(&format!("{prefix} {i}"), &[]))
            .collect()
    }

    /// How many agents are connected to replica `r` (by their logs).
    fn agents_on(&mut self, r: usize) -> usize {
        let addr = &self.replicas[r].addr;
        self.agents
            .iter_mut()
            .filter_map(|a| connected_to(a.proc()))
            .filter(|at| at == addr)
            .count()
    }

    /// Waits until every agent is connected to replica `r`.
    fn wait_all_agents_on(&mut self, r: usize) {
        let n = self.agents.len();
        let what = format!("all {n} agents connected to {}", self.replicas[r].name);
        wait_for(&what, || self.agents_on(r) == n);
    }

    /// Every result and dead letter the replicas have recorded so far.
    fn outcomes(&self) -> Outcomes {
        Outcomes::read(&self.replicas)
    }

    /// Waits until `n` tasks have an outcome.
    fn wait_some_settled(&self, n: usize, when: &str) {
        wait_for(&format!("{n} tasks answered {when}"), || {
            self.outcomes().settled_per_task().len() >= n
        });
    }

    /// Waits (up to [`SETTLE`]) until every task of `ids` has an accepted
    /// result or a dead letter in some replica's files.
    fn wait_settled(&mut self, ids: &[u64]) {
        self.wait_outcomes(ids.len(), |outcomes| {
            let settled = outcomes.settled_per_task();
            ids.iter()
                .filter(|id| !settled.contains_key(id))
                .copied()
                .collect()
        });
    }

    /// Waits (up to [`SETTLE`]) until each of `agents` has an accepted
    /// result for every task of `ids`.
    fn wait_answered_by_all(&mut self, ids: &[u64], agents: &[&str]) {
        self.wait_outcomes(ids.len() * agents.len(), |outcomes| {
            let got = outcomes.accepted_per_agent();
            ids.iter()
                .flat_map(|&id| agents.iter().map(move |&a| (id, a.to_string())))
                .filter(|k| !got.contains_key(k))
                .map(|(id, _)| id)
                .collect()
        });
    }

    /// Polls `missing` (the task ids still waiting for an outcome) until it
    /// is empty, failing after [`SETTLE`] with them, the files, and what
    /// the replicas logged as warnings and errors.
    fn wait_outcomes(&mut self, expected: usize, missing: impl Fn(&Outcomes) -> Vec<u64>) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let left = missing(&self.outcomes());
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "after {SETTLE:?}, {} of {expected} outcomes missing, of tasks {left:?};{}",
                    left.len(),
                    self.troubles()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Each replica's files, and the warnings and errors it logged so far.
    fn troubles(&mut self) -> String {
        let mut report = String::new();
        for r in &mut self.replicas {
            report += &format!(
                "\n{} ({}, {}), its warnings and errors:",
                r.name,
                r.results.display(),
                r.dead.display()
            );
            for l in r
                .proc
                .lines_so_far()
                .iter()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            {
                report += &format!("\n  {l}");
            }
        }
        report
    }

    /// Prints [`Self::troubles`] (seen with `--nocapture`, or when the test fails).
    fn report_troubles(&mut self) {
        eprintln!("{}", self.troubles());
    }

    /// Stops the agents, then the replicas still running (each exits 0);
    /// what all replicas recorded, final.
    fn stop(&mut self) -> Outcomes {
        for a in &mut self.agents {
            a.stop();
        }
        for r in self.replicas.iter_mut().filter(|r| r.running) {
            r.stop();
        }
        self.outcomes()
    }

    /// Stops everything, in the order of a shutdown: replicas (each
    /// exits 0), agents, NATS nodes. Their files and storage stay.
    fn stop_everything(&mut self) {
        for r in self.replicas.iter_mut().filter(|r| r.running) {
            r.stop();
        }
        for a in &mut self.agents {
            a.stop();
        }
        self.nats.stop_all();
    }

    /// Starts everything again on the same storage and files: NATS nodes,
    /// replicas (on new ports), the same agents.
    fn start_everything_again(&mut self) {
        self.nats.start_all();
        self.replicas = self.replicas.iter().map(Replica::start_again).collect();
        for i in 0..self.agents.len() {
            self.agents[i].proc = Some(self.spawn_agent(&self.agents[i]));
        }
    }
}

impl Agent {
    fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("the agent was started")
    }

    /// SIGTERM, and it exits 0.
    fn stop(&mut self) {
        let id = self.id.clone();
        let p = self.proc();
        p.signal("TERM");
        let code = p.wait_exit();
        assert_eq!(code, 0, "agent {id} exit code; log: {:#?}", p.whole_log());
    }
}

/// One `contact-server --store nats://...` process and its files.
struct Replica {
    name: String,
    proc: Proc,
    /// False once it was killed or stopped.
    running: bool,
    /// `127.0.0.1:PORT`, where agents dial.
    addr: String,
    /// `unix:PATH` of its admin socket.
    admin: String,
    results: PathBuf,
    dead: PathBuf,
    /// Its arguments, to start it again on the same files.
    args: Vec<String>,
}

impl Replica {
    /// Starts replica `name` on `store` (`nats://...`) with JetStream keeping
    /// `copies` of everything, in `dispatch` mode; its socket and files in `dir`.
    fn start(dir: &Path, name: &str, store: &str, copies: usize, dispatch: &str) -> Replica {
        let file = |suffix: &str| dir.join(format!("{name}.{suffix}"));
        let args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--store",
            store,
            "--store-replicas",
            &copies.to_string(),
            "--replica-timeout",
            REPLICA_TIMEOUT,
            "--dispatch",
            dispatch,
            "--tasks-from",
            "/dev/null",
            "--admin-listen",
            &format!("unix:{}", file("sock").display()),
            "--results-to",
            file("results.jsonl").to_str().unwrap(),
            "--dead-letter",
            file("dead.jsonl").to_str().unwrap(),
            // Tasks spread over agents, and one answered late comes back soon.
            "--max-in-flight",
            "2",
            "--ack-timeout",
            "10",
            "--grace",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Replica::spawn(name, args, file("results.jsonl"), file("dead.jsonl"))
    }

    fn spawn(name: &str, args: Vec<String>, results: PathBuf, dead: PathBuf) -> Replica {
        let mut cmd = Command::new(SERVER_BIN);
        cmd.args(&args);
        let mut proc = Proc::spawn(cmd);
        let port = port_of_listening_line(&proc.wait_line("listening on"));
        let admin = args[args.iter().position(|a| a == "--admin-listen").unwrap() + 1].clone();
        Replica {
            name: name.to_string(),
            proc,
            running: true,
            addr: format!("127.0.0.1:{port}"),
            admin,
            results,
            dead,
            args,
        }
    }

    /// This replica started again with the same arguments and files (on a
    /// new port).
    fn start_again(&self) -> Replica {
        let (results, dead) = (self.results.clone(), self.dead.clone());
        Replica::spawn(&self.name, self.args.clone(), results, dead)
    }

    /// Pushes `text` through this replica's admin socket; the task's id.
    fn push(&mut self, text: &str, extra: &[&str]) -> u64 {
        let reply = self.push_reply(text, extra);
        reply["task_id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no task_id in {reply}"))
    }

    /// `contact-ctl --json push` through this replica: its JSON answer.
    fn push_reply(&mut self, text: &str, extra: &[&str]) -> Value {
        self.try_push(text, extra)
            .unwrap_or_else(|e| panic!("{e}; its log ends: {:#?}", self.log_tail()))
    }

    /// `contact-ctl --json push`: its JSON answer, or why it failed.
    fn try_push(&mut self, text: &str, extra: &[&str]) -> Result<Value, String> {
        let mut args = vec!["--server", &self.admin, "--json", "push", text];
        args.extend_from_slice(extra);
        let (code, out, err) = ctl(&args, &[]);
        match serde_json::from_str(out.trim()) {
            Ok(v) if code == 0 => Ok(v),
            _ => Err(format!(
                "push {text:?} through {}: exit {code}: {out}{err}",
                self.name
            )),
        }
    }

    /// Pushes `text` with idempotency key `key`, again while it is refused
    /// (as a script would: the key keeps a retry from publishing twice), for
    /// up to [`SETTLE`] (JetStream elects new stream leaders after a node
    /// is lost: seconds, more on a loaded machine) and while this replica
    /// runs; the task's id.
    fn push_until_taken(&mut self, text: &str, key: &str) -> u64 {
        let deadline = Instant::now() + SETTLE;
        loop {
            match self.try_push(text, &["--key", key]) {
                Ok(reply) => return reply["task_id"].as_u64().expect("task_id"),
                Err(e) if Instant::now() > deadline || self.exited() => {
                    panic!("{e}; its log ends: {:#?}", self.log_tail())
                }
                Err(e) => eprintln!("refused, tried again: {}", e.trim()),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last lines of its log (to its end if it has exited).
    fn log_tail(&mut self) -> Vec<String> {
        let log = if self.exited() {
            self.proc.whole_log()
        } else {
            self.proc.lines_so_far()
        };
        log[log.len().saturating_sub(30)..].to_vec()
    }

    /// Whether its process has ended.
    fn exited(&mut self) -> bool {
        self.proc.child.try_wait().unwrap().is_some()
    }

    /// `kill -9` (if it is still running).
    fn kill9(&mut self) {
        let _ = self.proc.child.kill();
        self.proc.child.wait().unwrap();
        self.running = false;
    }

    /// SIGTERM, and it exits 0.
    fn stop(&mut self) {
        self.proc.signal("TERM");
        let code = self.proc.wait_exit();
        self.running = false;
        assert_eq!(
            code,
            0,
            "{} exit code; log: {:#?}",
            self.name,
            self.proc.whole_log()
        );
    }
}

/// The address (`127.0.0.1:PORT`) an agent connected to last, by its log.
fn connected_to(agent: &mut Proc) -> Option<String> {
    agent
        .lines_so_far()
        .iter()
        .rev()
        .find_map(|l| l.split("connected to ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

/// The tasks an agent ran, by its log ("task N done: ...").
fn tasks_run(agent: &mut Proc) -> Vec<u64> {
    agent
        .lines_so_far()
        .iter()
        .filter_map(|l| {
            let (n, rest) = l.split("task ").nth(1)?.split_once(' ')?;
            rest.starts_with("done").then(|| n.parse().ok())?
        })
        .collect()
}

/// Every result line and dead letter the replicas recorded, over all their
/// files, each with its file.
struct Outcomes {
    results: Vec<(PathBuf, Value)>,
    dead: Vec<(PathBuf, Value)>,
}

impl Outcomes {
    fn read(replicas: &[Replica]) -> Outcomes {
        let read = |path: &Path| -> Vec<(PathBuf, Value)> {
            read_results(path)
                .into_iter()
                .map(|v| (path.to_path_buf(), v))
                .collect()
        };
        Outcomes {
            results: replicas.iter().flat_map(|r| read(&r.results)).collect(),
            dead: replicas.iter().flat_map(|r| read(&r.dead)).collect(),
        }
    }

    fn accepted(&self) -> impl Iterator<Item = &(PathBuf, Value)> {
        self.results.iter().filter(|(_, r)| r["accepted"] == true)
    }

    /// Accepted results recorded in `file`.
    fn accepted_in(&self, file: &Path) -> usize {
        self.accepted().filter(|(f, _)| f == file).count()
    }

    /// Accepted results and dead letters per task id.
    fn settled_per_task(&self) -> BTreeMap<u64, usize> {
        let mut m = BTreeMap::new();
        for (_, r) in self.accepted().chain(&self.dead) {
            *m.entry(r["task_id"].as_u64().unwrap()).or_insert(0) += 1;
        }
        m
    }

    /// Accepted results per (task id, agent).
    fn accepted_per_agent(&self) -> BTreeMap<(u64, String), usize> {
        let mut m = BTreeMap::new();
        for (_, r) in self.accepted() {
            let agent = r["client"].as_str().unwrap().to_string();
            *m.entry((r["task_id"].as_u64().unwrap(), agent))
                .or_insert(0) += 1;
        }
        m
    }

    /// Every task of `ids` has exactly one accepted result over all
    /// replicas' files, and nothing was dead-lettered or answers another task.
    fn assert_each_task_accepted_once(&self, ids: &[u64]) {
        assert!(self.dead.is_empty(), "dead letters: {:#?}", self.dead);
        let settled = self.settled_per_task();
        for &id in ids {
            let n = settled.get(&id).copied().unwrap_or(0);
            assert_eq!(
                n,
                1,
                "task {id}: {n} accepted results over all replicas:{}",
                self.about(id)
            );
        }
        let unknown: Vec<&u64> = settled.keys().filter(|id| !ids.contains(id)).collect();
        assert!(
            unknown.is_empty(),
            "results of tasks never pushed: {unknown:?}"
        );
    }

    /// Each of `agents` has exactly one accepted result for every task of
    /// `ids` over all replicas' files.
    fn assert_each_agent_answered_once(&self, ids: &[u64], agents: &[&str]) {
        let got = self.accepted_per_agent();
        for &id in ids {
            for &a in agents {
                let n = got.get(&(id, a.to_string())).copied().unwrap_or(0);
                assert_eq!(
                    n,
                    1,
                    "task {id}, agent {a}: {n} accepted results over all replicas:{}",
                    self.about(id)
                );
            }
        }
    }

    /// Every line about task `id`, with its file: for a failure message.
    fn about(&self, id: u64) -> String {
        let mut out = String::new();
        for (file, v) in self.results.iter().chain(&self.dead) {
            if v["task_id"] == id {
                out += &format!("\n  {}: {v}", file.display());
            }
        }
        if out.is_empty() {
            out = " (no line in any results or dead-letter file)".into();
        }
        out
    }
}
