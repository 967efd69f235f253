//! `contact-load`: parses flags into a `LoadConfig`, runs the load generator's
//! phases against a running server, prints one JSON object per phase on
//! standard output and a table on standard error; exits 1 if a phase did not
//! complete for every agent (2 for a usage error).
//!
//! The JSON lines, in order, each with `phase` and `complete`:
//! - `idle`: `server_rss_kib`, `server_fds`, `server_sockets`, `server_threads`
//!   (null without `--server-pid`), and the same `loadgen_*` fields for this process;
//! - `attach`: `agents`, `connections`, `agents_per_connection`,
//!   `server_rss_per_agent_kib`, `server_rss_per_connection_kib` (growth since idle);
//! - `attach`, `broadcast` and `reconnect`: `received` and `acknowledged`
//!   (agents), `received_secs` / `acknowledged_secs` (until the last one; null
//!   unless all), `*_p50_secs`, `*_p99_secs`, and `failures` (why dials and
//!   calls failed: count by status code and message);
//! - `disconnect`: `away_secs` and `server_closed_all_secs` (until the server's
//!   sockets are back to the idle count; null if longer than `away_secs`);
//! - every phase but `idle`: `server_cpu_secs` and `loadgen_cpu_secs` spent in
//!   it, and the memory, files and threads of both processes at its end.

use clap::Parser;
use contact::cli::{self, parse_positive, parse_secs};
use contact::loadgen::{self, LoadConfig};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Hold a fleet of agents on a contact server and measure it: attach, a
/// broadcast task, a mass disconnect and reconnect, and the server's memory.
/// Prints one JSON object per phase (idle, attach, broadcast, disconnect,
/// reconnect) on standard output and a table on standard error.
///
/// The server must read tasks from a FIFO (--tasks-from FIFO, default
/// --dispatch broadcast and --from oldest), which this program writes its
/// tasks to (--tasks-to FIFO). Keep the FIFO open for writing elsewhere too
/// (e.g. `exec 3<>FIFO` in the shell) so that the server neither blocks
/// opening it nor sees its end when this program exits.
#[derive(Parser, Debug)]
#[command(name = "contact-load", version)]
struct Flags {
    /// Server address.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    server: String,
    /// The FIFO the server reads tasks from (its --tasks-from).
    #[arg(long, value_name = "FIFO")]
    tasks_to: PathBuf,
    /// The server's process id, to report its memory (VmRSS), CPU time and open files.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Agents to hold, each with its own client id.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "1000")]
    agents: u64,
    /// Agents sharing one connection [default: as many as the server's
    /// stream cap leaves a result stream for: 33 of 100].
    #[arg(long, value_name = "S", value_parser = parse_positive)]
    agents_per_connection: Option<u64>,
    /// The server's --max-streams-per-connection.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "100")]
    max_streams_per_connection: u64,
    /// Client ids are this prefix and the agent's number.
    #[arg(long, value_name = "TEXT", default_value = "load-")]
    id_prefix: String,
    /// Seconds between an agent's status messages (as contact-client's --status-every).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5")]
    status_every: Duration,
    /// Agents send no status messages (and keep one stream open instead of
    /// two); a server declares them gone after its --client-timeout.
    #[arg(long)]
    no_status: bool,
    /// Seconds all agents stay away after the mass disconnect.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10")]
    reconnect_after: Duration,
    /// Seconds a phase may take before it is reported incomplete.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "60")]
    phase_timeout: Duration,
    /// Seconds one dial may take before it counts as failed.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10")]
    connect_timeout: Duration,
    /// First delay before a failed dial or call is tried again (doubling, with jitter).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "0.2")]
    backoff_initial: Duration,
    /// Largest delay before a failed dial or call is tried again.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10")]
    backoff_max: Duration,
    /// gRPC completion queues (one thread each) that run all the agents.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "2")]
    completion_queues: u64,
}

fn main() {
    let flags = Flags::parse();
    cli::init_logging();
    cli::raise_open_file_limit();
    let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let mut config = LoadConfig::new(flags.server, flags.tasks_to);
    config.agents = count(flags.agents);
    config.agents_per_connection = flags.agents_per_connection.map(count);
    config.max_streams_per_connection = count(flags.max_streams_per_connection);
    config.id_prefix = flags.id_prefix;
    config.server_pid = flags.server_pid;
    config.status_every = (!flags.no_status).then_some(flags.status_every);
    config.reconnect_after = flags.reconnect_after;
    config.phase_timeout = flags.phase_timeout;
    config.connect_timeout = flags.connect_timeout;
    config.backoff_initial = flags.backoff_initial;
    config.backoff_max = flags.backoff_max;
    config.completion_queues = count(flags.completion_queues);
    let mut emit = |r: &loadgen::PhaseReport| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", r.json);
        let _ = out.flush();
    };
    match loadgen::run(&config, &mut emit) {
        Ok(reports) => {
            eprint!("{}", loadgen::table(&reports));
            if reports.iter().any(|r| !r.complete) {
                eprintln!(
                    "contact-load: a phase did not complete for every agent (see INCOMPLETE above)"
                );
                std::process::exit(cli::EXIT_FAILURE);
            }
        }
        Err(e) => {
            eprintln!("contact-load: {e}");
            std::process::exit(cli::exit_code(&e));
        }
    }
}
