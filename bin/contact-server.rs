//! `contact-server`: parses flags into a `ServerConfig`, runs the server until
//! SIGINT/SIGTERM, then stops it gracefully.

use clap::{Parser, ValueEnum};
use contact::cli::{self, parse_positive, parse_secs};
use contact::dispatch::{DispatchConfig, Mode, StartAt};
use contact::producer::TaskSource;
use contact::server::{Server, ServerConfig};
use contact::shutdown::Shutdown;
use std::path::PathBuf;
use std::time::Duration;

/// Push tasks to connected contact clients and collect their results.
///
/// Tasks come from --tasks-from (one per line; "@<client-id> <text>" sends a
/// line to one client only) and/or the seed's generator (--generate/--every,
/// on by default when no file is given).
#[derive(Parser, Debug)]
#[command(name = "contact-server", version, allow_negative_numbers = true)]
struct Flags {
    /// Address to listen on (port 0 picks a free port, logged at start).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Read tasks from FILE, one per line ("-" = standard input).
    #[arg(long, value_name = "FILE")]
    tasks_from: Option<PathBuf>,
    /// Generate N tasks "task:<100..200>" per batch, as the seed does [default: 10 when no --tasks-from].
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    generate: Option<u64>,
    /// Seconds between generated batches.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5")]
    every: Duration,
    /// How tasks are spread over clients: broadcast = every client gets every
    /// task; queue = each task goes to exactly one client (fewest in flight).
    #[arg(long, value_enum, default_value = "broadcast")]
    dispatch: Dispatch,
    /// Where a newly connected client starts: the oldest retained task, or only new ones.
    #[arg(long, value_enum, default_value = "oldest")]
    from: From,
    /// Unanswered tasks allowed per client; a client at this limit gets no more until it answers.
    #[arg(long, value_name = "K", value_parser = parse_positive, default_value = "16")]
    max_in_flight: u64,
    /// Seconds a client has to answer a task before it is delivered again.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "60")]
    ack_timeout: Duration,
    /// Deliveries of a task before it is given up and dead-lettered.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "5")]
    max_attempts: u64,
    /// Append tasks given up on (with the reason) as JSON lines to FILE.
    #[arg(long, value_name = "FILE")]
    dead_letter: Option<PathBuf>,
    /// Keep tasks, deliveries and results durably in DIR (fsync'd journal), so
    /// that a restarted server, even after kill -9, loses nothing it accepted.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "contact-state",
        conflicts_with = "no_state"
    )]
    state_dir: PathBuf,
    /// Keep all state in memory only (lost when the server stops).
    #[arg(long)]
    no_state: bool,
    /// Seconds without a status message or result after which a client is declared gone.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "30")]
    client_timeout: Duration,
    /// Seconds after which a disconnected client is forgotten (its resume point too).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "604800")]
    forget_after: Duration,
    /// Tasks kept for late clients; older ones are forgotten.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "100000")]
    retain: u64,
    /// Append every result as a JSON object per line to FILE.
    #[arg(long, value_name = "FILE")]
    results_to: Option<PathBuf>,
    /// Seconds between stats lines in the log.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5")]
    stats_every: Duration,
    /// Seconds clients get at shutdown to report the tasks in their hands.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5")]
    grace: Duration,
    /// Largest message accepted from or sent to a client, in bytes.
    #[arg(long, value_name = "BYTES", value_parser = parse_positive, default_value = "1048576")]
    max_message_bytes: u64,
    /// Seconds between HTTP/2 keepalive pings on idle connections.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "20")]
    keepalive: Duration,
    /// Seconds a keepalive ping may go unanswered before the connection is dropped.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10")]
    keepalive_timeout: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dispatch {
    Broadcast,
    Queue,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum From {
    Oldest,
    New,
}

fn main() {
    let flags = Flags::parse();
    cli::init_logging();
    let mut sources = vec![];
    if let Some(path) = flags.tasks_from {
        sources.push(TaskSource::Lines(path));
    }
    if flags.generate.is_some() || sources.is_empty() {
        let count = flags.generate.unwrap_or(10) as usize;
        sources.push(TaskSource::Generate {
            count,
            every: flags.every,
        });
    }
    let config = ServerConfig {
        listen: flags.listen,
        sources,
        dispatch: DispatchConfig {
            mode: match flags.dispatch {
                Dispatch::Broadcast => Mode::Broadcast,
                Dispatch::Queue => Mode::Queue,
            },
            ack_timeout: flags.ack_timeout,
            max_attempts: u32::try_from(flags.max_attempts).unwrap_or(u32::MAX),
            client_timeout: Some(flags.client_timeout),
            forget_after: flags.forget_after,
            start_at: match flags.from {
                From::Oldest => StartAt::Oldest,
                From::New => StartAt::New,
            },
            max_in_flight: flags.max_in_flight as usize,
            retain: flags.retain as usize,
        },
        results_to: flags.results_to,
        dead_letters: flags.dead_letter,
        state_dir: (!flags.no_state).then_some(flags.state_dir),
        compact_bytes: 64 << 20,
        stats_every: flags.stats_every,
        grace: flags.grace,
        max_message_bytes: flags.max_message_bytes as usize,
        keepalive: flags.keepalive,
        keepalive_timeout: flags.keepalive_timeout,
    };
    let shutdown = Shutdown::new();
    let result = cli::stop_on_signals(&shutdown).and_then(|()| {
        let server = Server::start(config)?;
        let _ = shutdown.receiver().recv();
        server.stop()
    });
    if let Err(e) = result {
        eprintln!("contact-server: {e}");
        std::process::exit(cli::exit_code(&e));
    }
}
