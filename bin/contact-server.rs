//! `contact-server`: parses flags into a `ServerConfig`, runs the server until
//! SIGINT/SIGTERM, then stops it gracefully; or until its disk fails, then
//! stops at once and exits 1 (for a supervisor to restart it). On SIGHUP it
//! reads its config file and credential files again (see `Reload`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use contact::budget::StaleLimits;
use contact::cli::{self, parse_positive, parse_secs, parse_secs_range};
use contact::config::ConfigFile;
use contact::dispatch::{DispatchConfig, Mode, RetryBackoff, StartAt};
use contact::journal::OnDamage;
use contact::listen::ListenAddr;
use contact::producer::TaskSource;
use contact::reload::{CredentialFiles, Reloader};
use contact::server::{Server, ServerConfig, TransportLimits};
use contact::shutdown::Shutdown;
use contact::tls::ServerTls;
use contact::token::{Secret, TokenKind};
use contact::trust::TrustConfig;
use std::path::PathBuf;
use std::time::Duration;

/// Push tasks to connected contact clients and collect their results.
///
/// Tasks come from --tasks-from (one per line; "@<client-id> <text>" sends a
/// line to one client only) and/or the seed's generator (--generate/--every,
/// on by default when no file is given).
#[derive(Parser, Debug)]
#[command(
    name = "contact-server",
    version,
    allow_negative_numbers = true,
    args_conflicts_with_subcommands = true
)]
struct Flags {
    #[command(subcommand)]
    command: Option<Command>,
    /// Read settings from this TOML file: each key is a long flag without
    /// its dashes (`state-dir = "/var/lib/contact"`); a flag given here wins over the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, HOST:PORT (port 0 picks a free port, logged at
    /// start). Addresses other machines can reach need TLS and credentials, or --insecure.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051", value_parser = parse_listen)]
    listen: String,
    #[command(flatten)]
    security: Security,
    /// Read tasks from FILE, one per line ("-" = standard input). With
    /// --state-dir, the lines of a file published before (same line number,
    /// same text) are not published again.
    #[arg(long, value_name = "FILE")]
    tasks_from: Option<PathBuf>,
    /// Generate N tasks "task:<100..200>" per batch, as the seed does [default: 10 when no --tasks-from, except with --store].
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
    /// Unanswered tasks allowed per client; a client at this limit gets no
    /// more until it answers. Enough for tasks and results to travel in
    /// batches both ways at full speed; lower it to spread few long tasks
    /// over many clients.
    #[arg(long, value_name = "K", value_parser = parse_positive, default_value = "256")]
    max_in_flight: u64,
    /// Seconds a client has to answer a task before it is delivered again.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "60")]
    ack_timeout: Duration,
    /// Seconds an agent that reports its work may hold one task in all
    /// (running, or waiting its turn at the agent); its ack timeout runs from
    /// its last report that it is working on the task.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "3600")]
    max_lease: Duration,
    /// Wait before a refused task (exit 75, or retry) is delivered again:
    /// MIN seconds after the first refusal, doubling per refusal up to MAX,
    /// less up to half at random.
    #[arg(long, value_name = "MIN..MAX", value_parser = parse_secs_range, default_value = "1..60")]
    retry_backoff: RetryBackoff,
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
    /// If the journal in --state-dir is damaged (not just torn at its end by
    /// a crash), keep it up to the last complete commit before the damage,
    /// move the rest aside to journal.damaged-<UTC time> there, and start.
    #[arg(long, conflicts_with = "no_state")]
    repair: bool,
    /// Share one fleet with other replicas through NATS JetStream instead of
    /// --state-dir: tasks, outcomes, agent leases and progress live in the
    /// JetStream cluster at these addresses (see docs/scale-out.md).
    #[arg(
        long,
        value_name = "nats://HOST:PORT[,HOST:PORT...]",
        conflicts_with_all = ["state_dir", "no_state", "repair"]
    )]
    store: Option<String>,
    /// With --store: copies JetStream keeps of each stream and bucket
    /// (1, or 3 on a cluster of at least three nodes).
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_copies, requires = "store")]
    store_replicas: usize,
    /// With --store: seconds a replica that stopped answering (killed, cut
    /// off from NATS) keeps its agents' leases and its claimed tasks before
    /// other replicas take them over; a replica cut off from NATS for half
    /// of it stops.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10", requires = "store")]
    replica_timeout: Duration,
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
    /// Also serve the admin API on a Unix socket, created with mode 0600:
    /// whoever can open it (this user, and root) is an operator, without a
    /// token (like Docker's socket). Written unix:PATH.
    #[arg(long, value_name = "unix:PATH")]
    admin_listen: Option<String>,
    /// Serve HTTP on IP:PORT: Prometheus metrics at /metrics, /healthz and
    /// /readyz, and the live web view at / (admin token required with
    /// --auth-secret; without credentials, loopback only). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Also export series per connected agent (one per agent and name: mind
    /// the cardinality of a large fleet).
    #[arg(long, requires = "metrics_listen")]
    metrics_per_agent: bool,
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

/// TLS, credentials and limits against hostile peers.
#[derive(Args, Debug)]
struct Security {
    /// Serve TLS with this certificate (PEM; the chain, leaf first).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: require every agent to present a certificate signed by this CA
    /// (PEM); the agent's id is its certificate's CN or a SAN.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Require a token on every call, checked against this secret (see `token`).
    #[arg(long, value_name = "FILE")]
    auth_secret: Option<PathBuf>,
    /// Agent ids (and admin:NAME) refused even with valid credentials, one per
    /// line; re-read when the file changes.
    #[arg(long, value_name = "FILE")]
    deny_list: Option<PathBuf>,
    /// With credentials configured, still serve seed clients that present none (by address).
    #[arg(long)]
    allow_anonymous: bool,
    /// Serve an address other machines can reach without TLS and credentials.
    #[arg(long)]
    insecure: bool,
    /// Concurrent calls one connection may have open (an agent uses 3).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "100")]
    max_streams_per_connection: u64,
    /// Seconds a connection with no call open is kept before it is closed.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "30")]
    idle_connection_timeout: Duration,
    /// Seconds a new connection has to finish its TLS and HTTP/2 handshake.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10")]
    handshake_timeout: Duration,
    /// Stale results (answering no current delivery) an agent may send per
    /// minute; past it, its results are refused until the minute is over.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "1000")]
    stale_results_per_minute: u64,
    /// Bytes of stale results an agent may send per minute.
    #[arg(long, value_name = "BYTES", value_parser = parse_positive, default_value = "1048576")]
    stale_bytes_per_minute: u64,
    /// Clients remembered (with their resume points) at most; the longest
    /// disconnected are forgotten first.
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "10000")]
    max_known_clients: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the token of agent ID (or with --admin, of operator NAME), derived
    /// from the secret: give it to the agent with --token-file or CONTACT_TOKEN.
    Token {
        /// The agent id (or admin name) the token is for.
        #[arg(value_name = "ID")]
        name: String,
        /// Print an admin token (for the admin API), not an agent's.
        #[arg(long)]
        admin: bool,
        /// The server's secret file.
        #[arg(long, value_name = "FILE")]
        auth_secret: PathBuf,
    },
}

fn parse_listen(s: &str) -> Result<String, String> {
    s.parse::<ListenAddr>().map(|a| a.to_string())
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
    let (flags, config_file): (Flags, _) = contact::config::parse_args_and_file(None);
    cli::init_logging();
    if let Some(Command::Token {
        name,
        admin,
        auth_secret,
    }) = &flags.command
    {
        std::process::exit(print_token(name, *admin, auth_secret));
    }
    cli::raise_open_file_limit();
    cli::ignore_file_size_signal();
    let files = credential_files(&flags.security);
    let security = match security(&flags.security, &files) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("contact-server: {e}");
            std::process::exit(cli::exit_code(&e));
        }
    };
    let mut sources = vec![];
    if let Some(path) = flags.tasks_from {
        sources.push(TaskSource::Lines(path));
    }
    // The seed's generator is the default source of a lone server; a
    // replica (--store) gets tasks through the admin API unless told.
    if flags.generate.is_some() || (sources.is_empty() && flags.store.is_none()) {
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
            max_lease: flags.max_lease,
            retry_backoff: flags.retry_backoff,
            max_attempts: u32::try_from(flags.max_attempts).unwrap_or(u32::MAX),
            client_timeout: Some(flags.client_timeout),
            forget_after: flags.forget_after,
            start_at: match flags.from {
                From::Oldest => StartAt::Oldest,
                From::New => StartAt::New,
            },
            max_in_flight: flags.max_in_flight as usize,
            retain: flags.retain as usize,
            max_known_clients: usize::try_from(flags.security.max_known_clients)
                .unwrap_or(usize::MAX),
        },
        results_to: flags.results_to,
        metrics_listen: flags.metrics_listen,
        metrics_per_agent: flags.metrics_per_agent,
        admin_socket: match flags
            .admin_listen
            .as_deref()
            .map(|a| a.strip_prefix("unix:"))
        {
            None => None,
            Some(Some(path)) if !path.is_empty() => Some(PathBuf::from(path)),
            Some(_) => {
                eprintln!("contact-server: --admin-listen takes unix:PATH (a Unix socket)");
                std::process::exit(cli::EXIT_USAGE);
            }
        },
        dead_letters: flags.dead_letter,
        state_dir: (!flags.no_state && flags.store.is_none()).then_some(flags.state_dir),
        store: match &flags.store {
            None => None,
            Some(url) => match contact::replica::parse_store(url) {
                Ok(servers) => Some(contact::replica::StoreConfig {
                    servers,
                    copies: flags.store_replicas,
                    replica_timeout: flags.replica_timeout,
                    dedupe_window: Duration::from_secs(3600),
                }),
                Err(why) => {
                    eprintln!("contact-server: {why}");
                    std::process::exit(cli::EXIT_USAGE);
                }
            },
        },
        on_damage: if flags.repair {
            OnDamage::Repair
        } else {
            OnDamage::Refuse
        },
        compact_bytes: 64 << 20,
        stats_every: flags.stats_every,
        grace: flags.grace,
        max_message_bytes: flags.max_message_bytes as usize,
        keepalive: flags.keepalive,
        keepalive_timeout: flags.keepalive_timeout,
        tls: security.0,
        trust: security.1,
        insecure: flags.security.insecure,
        transport: TransportLimits {
            max_streams_per_connection: u32::try_from(flags.security.max_streams_per_connection)
                .unwrap_or(u32::MAX),
            idle_connection: flags.security.idle_connection_timeout,
            handshake: flags.security.handshake_timeout,
        },
        stale: StaleLimits {
            results_per_minute: flags.security.stale_results_per_minute,
            bytes_per_minute: flags.security.stale_bytes_per_minute,
        },
    };
    let shutdown = Shutdown::new();
    let reload = Reload {
        started_with: config_file,
        files,
    };
    if let Err(e) = serve(config, reload, &shutdown) {
        eprintln!("contact-server: {e}");
        std::process::exit(cli::exit_code(&e));
    }
}

/// Runs the server until SIGINT/SIGTERM (or a disk failure), reloading on SIGHUP.
fn serve(config: ServerConfig, reload: Reload, shutdown: &Shutdown) -> Result<u64, contact::Error> {
    cli::stop_on_signals(shutdown)?;
    // Caught from before the server starts: a SIGHUP must never end it.
    let hangups = cli::hangups()?;
    let server = Server::start(config)?;
    let reloader = server.reloader(reload.files.clone());
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            for () in hangups {
                reload.run(&reloader);
            }
        })
        .map_err(contact::Error::Thread)?;
    server.run_until(shutdown)
}

/// The settings that reload applies: the credential files' paths (their
/// contents are read at every reload). Every other setting needs a restart.
const RELOADABLE: [&str; 5] = [
    "auth-secret",
    "deny-list",
    "tls-cert",
    "tls-key",
    "client-ca",
];

/// What a SIGHUP reads again: the config file the server started with (if
/// any) and the credential files it names, or those of the command line.
struct Reload {
    started_with: Option<ConfigFile>,
    files: CredentialFiles,
}

impl Reload {
    /// Reloads; a failure is logged and leaves everything as it was.
    fn run(&self, reloader: &Reloader) {
        log::info!("SIGHUP: reloading");
        let files = match &self.started_with {
            None => self.files.clone(),
            Some(started) => {
                let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
                match contact::config::reparse::<Flags>(&args, started.path()) {
                    Ok((flags, now)) => {
                        let restart: Vec<String> = started
                            .changed_flags(&now, &args)
                            .into_iter()
                            .filter(|f| !RELOADABLE.contains(&f.as_str()))
                            .map(|f| format!("--{f}"))
                            .collect();
                        if !restart.is_empty() {
                            log::warn!(
                                "reload: the config file {} changes {}: not applied until the server is restarted",
                                started.path().display(),
                                restart.join(", ")
                            );
                        }
                        credential_files(&flags.security)
                    }
                    Err(e) => {
                        log::error!(
                            "reload failed: {e}; the server keeps its settings and credentials"
                        );
                        return;
                    }
                }
            }
        };
        match reloader.reload(files) {
            Ok(summary) => log::info!("reloaded: {summary}"),
            Err(e) => {
                log::error!("reload failed: {e}; the previous credentials stay in force")
            }
        }
    }
}

/// The credential files the flags name.
fn credential_files(s: &Security) -> CredentialFiles {
    CredentialFiles {
        auth_secret: s.auth_secret.clone(),
        deny_list: s.deny_list.clone(),
        tls: match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: s.client_ca.clone(),
            }),
            _ => None,
        },
    }
}

fn security(
    s: &Security,
    files: &CredentialFiles,
) -> Result<(Option<ServerTls>, TrustConfig), contact::Error> {
    let secret = files.auth_secret.as_deref().map(Secret::load).transpose()?;
    let trust = TrustConfig {
        secret,
        client_certs: s.client_ca.is_some(),
        deny_list: files.deny_list.clone(),
        allow_anonymous: s.allow_anonymous,
    };
    Ok((files.tls.clone(), trust))
}

/// `contact-server token`: prints one token; the exit status says whether it could.
fn print_token(name: &str, admin: bool, secret: &std::path::Path) -> i32 {
    let kind = if admin {
        TokenKind::Admin
    } else {
        TokenKind::Agent
    };
    if !admin {
        if let Err(why) = contact::proto::validate_client_id(name) {
            eprintln!("contact-server: token: {why}");
            return cli::EXIT_USAGE;
        }
    }
    match Secret::load(secret) {
        Ok(secret) => {
            println!("{}", secret.token(kind, name));
            0
        }
        Err(e) => {
            eprintln!("contact-server: {e}");
            cli::exit_code(&e)
        }
    }
}

/// `--store-replicas`: JetStream replicates streams on 1 or 3 nodes here (R1 or R3).
fn parse_copies(s: &str) -> Result<usize, String> {
    match s {
        "1" => Ok(1),
        "3" => Ok(3),
        _ => Err(format!(
            "{s:?}: 1 (no copies) or 3 (a three-node cluster keeps every write on a majority)"
        )),
    }
}
