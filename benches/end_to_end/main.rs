//! The end-to-end benchmark of `contact` (issue 9, "Benchmarks"), run by
//! `scripts/bench.sh`: real server and client processes of the release
//! build on loopback, beside the bare grpcio ceiling and the seed's Python
//! pair in the same run; it prints a table of the measurements next to the
//! targets and writes BENCHMARKS.md with plots. A run that loses a task or a
//! result fails (exit 1) rather than printing a rate.
//!
//! It is a `harness = false` bench target, not a binary of the package, so
//! that `plotters` is only a dev-dependency: `contact`'s own build never
//! sees it. Modules: [`roundtrip`] (a, b, e, f), [`ceiling`] (the bare
//! grpcio program, also run as this program's `ceiling-server` and
//! `ceiling-client`), [`latency`] (c), [`fanout`] (d, through
//! `contact-load`), [`store`] (g, the NATS JetStream store, on the
//! `nats-server` nodes of [`nats`]), [`procs`] (processes and the server's
//! log), [`report`] (tables and targets), [`plots`] and [`stats`].

mod ceiling;
mod fanout;
mod latency;
mod nats;
mod plots;
mod procs;
mod report;
mod roundtrip;
mod stats;
mod store;

use clap::{Parser, Subcommand};
use procs::{server_log, Daemon, Outcome, STARTUP};
use report::{ContactSeries, Results, Series};
use roundtrip::{ContactRun, Mode, Stall};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Parser, Debug)]
#[command(
    name = "end_to_end",
    about = "contact's end-to-end benchmark (see scripts/bench.sh)"
)]
struct Flags {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the benchmark, print the table and write BENCHMARKS.md and its plots.
    Run(RunFlags),
    /// The bare grpcio server (internal: started by `run`).
    CeilingServer {
        /// Tasks pushed on each task stream.
        #[arg(long)]
        tasks: u64,
    },
    /// One bare grpcio client (internal: started by `run`).
    CeilingClient {
        #[arg(long)]
        port: u16,
        /// Tasks to answer before exiting.
        #[arg(long)]
        tasks: u64,
    },
}

#[derive(clap::Args, Debug)]
struct RunFlags {
    /// Where contact-server and contact-client (and contact-load, if built) are.
    #[arg(long, value_name = "DIR")]
    bin_dir: PathBuf,
    /// A Python with grpcio and grpcio-tools, for the seed pair.
    #[arg(long, value_name = "FILE", default_value = ".venv/bin/python")]
    python: PathBuf,
    /// The Markdown report to write.
    #[arg(long, value_name = "FILE", default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where the plots go (PNG), referenced from the report by relative path.
    #[arg(long, value_name = "DIR", default_value = "benchmarks")]
    plots: PathBuf,
    /// A smoke run of a couple of minutes: small sizes, one run each.
    #[arg(long)]
    quick: bool,
    /// Runs of each round-trip configuration; the median is reported [default: 3, 1 with --quick].
    #[arg(long, value_name = "N")]
    reps: Option<usize>,
    /// Only these parts (comma-separated): roundtrip, latency, fanout, stall,
    /// growth, store; the report keeps the other parts' sections as they were.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Vec<String>,
    /// A TrueType font for the plots' text [default: DejaVu Sans where installed].
    #[arg(long, value_name = "FILE")]
    font: Option<PathBuf>,
    /// The command that ran the benchmark, for the report.
    #[arg(long, value_name = "TEXT", default_value = "scripts/bench.sh")]
    command: String,
    /// Keep the scratch directory (logs, state, results) and say where it is.
    #[arg(long)]
    keep: bool,
}

/// What every measurement needs: the programs, the scratch directory and the sizes.
pub struct Bench {
    bins: PathBuf,
    python: PathBuf,
    /// This program, for the ceiling's processes.
    me: PathBuf,
    work: PathBuf,
    counter: Cell<u32>,
}

impl Bench {
    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// A unique name for one run's files.
    fn next_tag(&self, what: &str) -> String {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        format!("{n:03}-{what}")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.log"))
    }

    fn fresh_dir(&self, name: &str) -> Outcome<PathBuf> {
        let d = self.work.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        Ok(d)
    }

    /// A file of `n` tasks `job-<i>`, one per line (made once per size).
    fn tasks_file(&self, n: u64) -> Outcome<PathBuf> {
        let path = self.work.join(format!("tasks-{n}.txt"));
        if !path.exists() {
            let mut text = String::with_capacity(n as usize * 12);
            for i in 1..=n {
                text.push_str(&format!("job-{i}\n"));
            }
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(path)
    }

    /// Starts `contact-server --listen 127.0.0.1:0`, with the flags `flags`
    /// adds and the log filter the benchmark reads; returns it once it
    /// listens, with its port. Its log is `<tag>-server.log`.
    fn contact_server(
        &self,
        tag: &str,
        stdin: Stdio,
        flags: impl FnOnce(&mut Command),
    ) -> Outcome<(Daemon, u16)> {
        let mut cmd = Command::new(self.bin("contact-server"));
        cmd.args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", server_log::RUST_LOG)
            .stdin(stdin);
        flags(&mut cmd);
        let log = self.log(&format!("{tag}-server"));
        let mut server = Daemon::start("contact-server", cmd, &log, false)?;
        let port = server.wait_for("its port", STARTUP, server_log::listening_port)?;
        Ok((server, port))
    }

    /// The seed pair's generated Python stubs (made once).
    fn python_stubs(&self) -> Outcome<PathBuf> {
        let dir = self.work.join("stubs");
        if !dir.join("contact_pb2_grpc.py").exists() {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let status = Command::new(&self.python)
                .args(["-m", "grpc_tools.protoc", "-I", "tests/interop"])
                .arg(format!("--python_out={}", dir.display()))
                .arg(format!("--grpc_python_out={}", dir.display()))
                .arg("tests/interop/contact.proto")
                .status()
                .map_err(|e| format!("cannot run {}: {e}", self.python.display()))?;
            if !status.success() {
                return Err(format!(
                    "{} -m grpc_tools.protoc failed ({status}): run scripts/setup.sh --python",
                    self.python.display()
                ));
            }
        }
        Ok(dir)
    }
}

/// How much work each part does.
struct Sizes {
    reps: usize,
    /// Results per contact round-trip run, shared among its clients.
    contact_work: u64,
    ceiling_work: u64,
    /// Tasks each seed Python client answers (the seed server sends all to all).
    python_work: u64,
    latency_secs: f64,
    agents: u64,
    /// Tasks per run of part g (the store), shared among its clients.
    store_work: u64,
}

fn main() {
    // `cargo bench` appends `--bench`; it means nothing here.
    let args = std::env::args().filter(|a| a != "--bench");
    let flags = Flags::parse_from(args);
    let code = match flags.command {
        Cmd::CeilingServer { tasks } => ceiling::server_main(tasks),
        Cmd::CeilingClient { port, tasks } => ceiling::client_main(port, tasks),
        Cmd::Run(run) => match main_run(&run) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bench: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn main_run(flags: &RunFlags) -> Outcome<()> {
    for bin in ["contact-server", "contact-client"] {
        let p = flags.bin_dir.join(bin);
        if !p.exists() {
            return Err(format!(
                "--bin-dir {}: no {bin} there (build it with cargo build --release --bins)",
                flags.bin_dir.display()
            ));
        }
    }
    plots::load_font(flags.font.as_deref())?;
    let parts = ["roundtrip", "latency", "fanout", "stall", "growth", "store"];
    if let Some(bad) = flags.only.iter().find(|p| !parts.contains(&p.as_str())) {
        return Err(format!(
            "--only {bad}: not a part; the parts are {}",
            parts.join(", ")
        ));
    }
    let wanted = |p: &str| flags.only.is_empty() || flags.only.iter().any(|o| o == p);
    let work = std::env::temp_dir().join(format!("contact-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let b = Bench {
        bins: flags.bin_dir.clone(),
        python: flags.python.clone(),
        me: std::env::current_exe().map_err(|e| e.to_string())?,
        work: work.clone(),
        counter: Cell::new(0),
    };
    let sizes = if flags.quick {
        Sizes {
            reps: flags.reps.unwrap_or(1),
            contact_work: 16_000,
            ceiling_work: 64_000,
            python_work: 2_000,
            latency_secs: 1.0,
            agents: 1_000,
            store_work: 8_000,
        }
    } else {
        Sizes {
            reps: flags.reps.unwrap_or(3),
            contact_work: 96_000,
            ceiling_work: 256_000,
            python_work: 8_000,
            latency_secs: 5.0,
            agents: 10_000,
            store_work: 48_000,
        }
    };
    let started = std::time::Instant::now();
    let mut r = Results::default();
    let outcome = measure_all(&b, &sizes, &wanted, &mut r);
    if flags.keep || outcome.is_err() {
        eprintln!(
            "bench: logs, state and results of every run are in {}",
            work.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    outcome?;
    let took = started.elapsed().as_secs_f64();
    let sections = sections(&r, &wanted);
    for s in sections
        .iter()
        .filter(|s| s.measured || flags.only.is_empty())
    {
        println!("{}", s.text());
    }
    write_report(flags, &sizes, &sections, &r, took)?;
    let failed: Vec<&String> = r.store.iter().flat_map(|s| &s.failed).collect();
    match failed.first() {
        None => Ok(()),
        Some(first) => Err(format!(
            "{} run(s) of part g lost or doubled tasks (the report marks them), the first: {first}",
            failed.len()
        )),
    }
}

fn measure_all(
    b: &Bench,
    s: &Sizes,
    wanted: &dyn Fn(&str) -> bool,
    r: &mut Results,
) -> Outcome<()> {
    if wanted("roundtrip") {
        round_trips(b, s, r)?;
    }
    if wanted("latency") {
        for rate in [1_000, 10_000] {
            let l = latency::measure_journal(b, rate, s.latency_secs)?;
            let p99 = stats::percentile(&stats::sorted(&l.durable), 99.0);
            eprintln!("bench: latency at {rate}/s offered: p99 → durable {p99:.2} ms");
            r.latency.push(l);
        }
    }
    if wanted("fanout") {
        let f = fanout::measure_journal(b, s.agents)?;
        if let fanout::Fanout::Skipped(why) = &f {
            eprintln!("bench: fan-out {why}");
        }
        r.fanout = Some(f);
    }
    if wanted("stall") {
        let clients = 8;
        let per_client = s.contact_work / clients as u64;
        let mut without = Series::new(clients, per_client);
        let mut with = Series::new(clients, per_client);
        for _ in 0..s.reps {
            for (stall, series) in [(Stall::Alone, &mut without), (Stall::Beside, &mut with)] {
                let run = ContactRun {
                    mode: Mode::Broadcast,
                    state: true,
                    clients,
                    per_client,
                    stall,
                };
                let t = roundtrip::contact(b, run)?;
                eprintln!(
                    "bench: {clients} clients {} a stalled one: {}/s",
                    if stall == Stall::Beside {
                        "with"
                    } else {
                        "without"
                    },
                    report::group(t.rate())
                );
                series.runs.push(t);
            }
        }
        r.stall = Some((without, with));
    }
    if wanted("growth") {
        let base = s.contact_work / 4;
        for clients in [1usize, 8] {
            for total in [base, base * 2, base * 4] {
                let per_client = total / clients as u64;
                let run = ContactRun {
                    mode: Mode::Broadcast,
                    state: true,
                    clients,
                    per_client,
                    stall: Stall::NotMeasured,
                };
                let t = roundtrip::contact(b, run)?;
                eprintln!("bench: growth {clients} × {per_client}: {:.2} s", t.secs);
                let mut series = Series::new(clients, per_client);
                series.runs.push(t);
                r.growth.push(series);
            }
        }
    }
    if wanted("store") {
        store_part(b, s, r)?;
    }
    Ok(())
}

/// a and b: every configuration once per repetition, interleaved, so that
/// the machine's drift touches all of them alike.
fn round_trips(b: &Bench, s: &Sizes, r: &mut Results) -> Outcome<()> {
    let clients = [1usize, 8, 64];
    for &c in &clients {
        for mode in [Mode::Broadcast, Mode::Queue] {
            for state in [false, true] {
                r.contact.push(ContactSeries {
                    mode,
                    state,
                    series: Series::new(c, s.contact_work / c as u64),
                });
            }
        }
        r.ceiling.push(Series::new(c, s.ceiling_work / c as u64));
        if c <= 8 {
            // The seed server sends every task to every client, so each
            // answers them all (and its start-up weighs less). It is too
            // slow for 64 clients in a bench of minutes.
            r.python.push(Series::new(c, s.python_work));
        }
    }
    for rep in 1..=s.reps {
        for c in &mut r.contact {
            let run = ContactRun {
                mode: c.mode,
                state: c.state,
                clients: c.series.clients,
                per_client: c.series.per_client,
                stall: Stall::NotMeasured,
            };
            let t = roundtrip::contact(b, run)?;
            eprintln!(
                "bench: [{rep}/{}] contact {}, {} clients: {}/s",
                s.reps,
                c.label(),
                run.clients,
                report::group(t.rate())
            );
            c.series.runs.push(t);
        }
        type Peer = fn(&Bench, usize, u64) -> Outcome<roundtrip::Timed>;
        let peers: [(&str, &mut Vec<Series>, Peer); 2] = [
            ("bare grpcio", &mut r.ceiling, roundtrip::ceiling),
            ("seed Python pair", &mut r.python, roundtrip::python),
        ];
        for (what, list, run) in peers {
            for series in list.iter_mut() {
                let t = run(b, series.clients, series.per_client)?;
                eprintln!(
                    "bench: [{rep}/{}] {what}, {} clients: {}/s",
                    s.reps,
                    series.clients,
                    report::group(t.rate())
                );
                series.runs.push(t);
            }
        }
    }
    Ok(())
}

/// g: every store setup once per repetition at 1 and 8 clients,
/// interleaved; then latency at a modest rate on the journal and on one
/// replica of each JetStream deployment, and part d's fleet on one replica
/// with one NATS node.
fn store_part(b: &Bench, s: &Sizes, r: &mut Results) -> Outcome<()> {
    for clients in [1usize, 8] {
        for setup in store::SETUPS {
            r.store.push(store::StoreSeries {
                setup,
                clients,
                tasks: s.store_work,
                runs: vec![],
                failed: vec![],
            });
        }
    }
    for rep in 1..=s.reps {
        for series in &mut r.store {
            let run = match store::round_trip(b, series.setup, series.clients, series.tasks) {
                Ok(run) => run,
                Err(e) if e.starts_with("lost tasks") || e.starts_with("CONTACT_") => {
                    // The others are still measured; the run fails at the end.
                    eprintln!(
                        "bench: [{rep}/{}] {}, {} contact-server(s), {} clients: FAILED: {e}",
                        s.reps,
                        series.setup.label(),
                        series.setup.replicas,
                        series.clients
                    );
                    series.failed.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let per_task = run
                .nats
                .map(|n| format!(", {:.1} NATS msgs/task", n.msgs / series.tasks as f64))
                .unwrap_or_default();
            eprintln!(
                "bench: [{rep}/{}] {}, {} contact-server(s), {} clients: {}/s{per_task}",
                s.reps,
                series.setup.label(),
                series.setup.replicas,
                series.clients,
                report::group(run.timed.rate())
            );
            series.runs.push(run);
        }
    }
    let rate = 1_000;
    for setup in store::SETUPS.into_iter().filter(|s| s.replicas == 1) {
        let l = store::latency(b, setup, rate, s.latency_secs)?;
        let p99 = stats::percentile(&stats::sorted(&l.durable), 99.0);
        eprintln!(
            "bench: latency at {rate}/s offered, {}: p99 → durable {p99:.2} ms",
            setup.label()
        );
        r.store_latency.push((setup, l));
    }
    let fleet = store::fleet(b, s.agents)?;
    if let fanout::Fanout::Skipped(why) = &fleet {
        eprintln!("bench: fan-out on the store {why}");
    }
    r.store_fleet = Some(fleet);
    Ok(())
}

/// One section of the report: its heading, its text, and whether this run
/// measured it (with `--only`, the report keeps the others as they were).
struct Section {
    heading: &'static str,
    body: String,
    measured: bool,
}

impl Section {
    fn text(&self) -> String {
        format!("## {}\n\n{}", self.heading, self.body)
    }
}

/// Every table, with its heading, as printed and as written into the report.
fn sections(r: &Results, wanted: &dyn Fn(&str) -> bool) -> Vec<Section> {
    let all = ["roundtrip", "latency", "fanout", "stall", "growth", "store"]
        .iter()
        .all(|p| wanted(p));
    let s = |heading, body, measured| Section {
        heading,
        body,
        measured,
    };
    vec![
        s("Targets", r.targets(), all),
        s("a, b. Round trip", r.round_trip(), wanted("roundtrip")),
        s(
            "c. Latency at a fixed offered rate",
            r.latency_table(),
            wanted("latency"),
        ),
        s("d. Fan-out to a fleet", r.fanout_table(), wanted("fanout")),
        s(
            "e. A client that stops reading",
            r.stall_table(),
            wanted("stall"),
        ),
        s("f. Growth", r.growth_table(), wanted("growth")),
        s(
            "g. The NATS JetStream store (--store) beside the journal",
            r.store_table(),
            wanted("store"),
        ),
    ]
}

/// Output of a command, trimmed, or "unknown".
fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.0} GiB", kib / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(|| "unknown".into());
    format!(
        "| | |\n|---|---|\n| processors (nproc) | {cores} |\n| CPU | {cpu} |\n| memory | {mem} |\n| kernel | {} |\n| rustc | {} |\n| commit | {} |\n",
        command_output("uname", &["-sr"]),
        command_output("rustc", &["--version"]),
        command_output("git", &["describe", "--always", "--dirty"]),
    )
}

/// Writes the report: the whole of it, or, when `--only` left parts out
/// and the report exists, only the sections measured now (each saying when
/// and how), the others kept as they were. A plot is redrawn with its part.
fn write_report(
    flags: &RunFlags,
    s: &Sizes,
    sections: &[Section],
    r: &Results,
    took: f64,
) -> Outcome<()> {
    // Before the plots are written: they would make the checkout look modified.
    let machine = machine();
    let commit = command_output("git", &["describe", "--always", "--dirty"]);
    std::fs::create_dir_all(&flags.plots).map_err(|e| format!("{}: {e}", flags.plots.display()))?;
    let rel = |p: &Path| {
        let base = flags.out.parent().unwrap_or(Path::new(""));
        p.strip_prefix(base).unwrap_or(p).display().to_string()
    };
    type Plot = fn(&Results, &Path) -> Outcome<()>;
    let plots: [(&str, &str, &str, Plot); 2] = [
        (
            "a, b. Round trip",
            "throughput.png",
            "throughput against clients",
            plots::throughput,
        ),
        (
            "c. Latency at a fixed offered rate",
            "latency.png",
            "latency distribution",
            plots::latency,
        ),
    ];
    let mut bodies: Vec<(&str, String)> = vec![];
    let mut written = vec![flags.out.display().to_string()];
    for section in sections {
        let mut body = section.body.clone();
        for (heading, file, alt, draw) in &plots {
            if *heading == section.heading && section.measured {
                let path = flags.plots.join(file);
                draw(r, &path)?;
                body.push_str(&format!("\n![{alt}]({})\n", rel(&path)));
                written.push(path.display().to_string());
            }
        }
        bodies.push((section.heading, body));
    }
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mode = if flags.quick {
        " (--quick: small sizes, a smoke run)"
    } else {
        ""
    };
    let partial = sections.iter().any(|s| !s.measured);
    let old = std::fs::read_to_string(&flags.out).unwrap_or_default();
    let measured_now: Vec<(&str, String)> = sections
        .iter()
        .zip(&bodies)
        .filter(|(s, _)| s.measured)
        .map(|(_, (heading, body))| {
            let stamp = format!(
                "This section alone (`--only`): measured {date} at commit {commit} with `{command}`{mode} in {took:.0} s, \
                 every configuration {reps} time(s), interleaved, the median quoted; the rest of this file is from the run named at the top.\n\n",
                command = flags.command,
                reps = s.reps,
            );
            (*heading, format!("{stamp}{body}"))
        })
        .collect();
    let text = match partial.then(|| splice(&old, &measured_now)).flatten() {
        Some(text) => text,
        None => {
            let tables: Vec<String> = bodies
                .iter()
                .map(|(heading, body)| format!("## {heading}\n\n{body}"))
                .collect();
            format!(
                "# Benchmarks\n\n\
                 Measured {date} with `{command}`{mode} in {took:.0} s: every round-trip configuration \
                 {reps} time(s), interleaved, the median quoted. Server and clients on the same host \
                 (loopback), release build, default flags unless a row says otherwise.\n\n\
                 {machine}\n{tables}\n{how}",
                command = flags.command,
                reps = s.reps,
                tables = tables.join("\n"),
                how = HOW,
            )
        }
    };
    std::fs::write(&flags.out, text).map_err(|e| format!("{}: {e}", flags.out.display()))?;
    eprintln!("bench: wrote {}", written.join(", "));
    Ok(())
}

/// The report `old` with each of `sections` (heading, body) in place of
/// its section of that heading, or added after the last one, and the
/// explanation at its end replaced by today's; `None` if `old` is not a
/// report of ours (it has no "How it is measured").
fn splice(old: &str, sections: &[(&str, String)]) -> Option<String> {
    let how = HOW.lines().next()?;
    let how_at = old.find(&format!("\n{how}\n"))?;
    let mut head = old[..=how_at].to_string();
    for (heading, body) in sections {
        let marker = format!("\n## {heading}\n");
        let text = format!("## {heading}\n\n{body}\n");
        match head.find(&marker) {
            Some(at) => {
                let start = at + 1;
                let after = start + marker.len() - 1;
                let end = head[after..]
                    .find("\n## ")
                    .map_or(head.len(), |i| after + i + 1);
                head.replace_range(start..end, &text);
            }
            None => head.push_str(&text),
        }
    }
    Some(format!("{head}{HOW}"))
}

/// How each number is measured, and why that way.
const HOW: &str = include_str!("how.md");
