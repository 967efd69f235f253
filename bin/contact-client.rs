//! `contact-client`: parses flags into a `ClientConfig` and runs the client
//! until SIGINT/SIGTERM or `--max-tasks` acknowledged results.

use clap::Parser;
use contact::cli::{self, parse_positive, parse_secs};
use contact::client::{self, ClientConfig};
use contact::handler::Handler;
use contact::labels;
use contact::shutdown::Shutdown;
use contact::tls::ClientTls;
use contact::token;
use std::path::PathBuf;
use std::time::Duration;

/// Connect to a contact server, handle the tasks it pushes and report results.
///
/// Each task is echoed back (the seed's behaviour) or, with --exec, handed to
/// a command as its last argument; the command's exit status and output
/// become the result.
#[derive(Parser, Debug)]
#[command(name = "contact-client", version, allow_negative_numbers = true)]
struct Flags {
    /// Read settings from this TOML file: each key is a long flag without
    /// its dashes (`server = "fleet.example:50051"`); a flag given here wins over the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Server addresses, host:port: several comma-separated, or the flag
    /// repeated. A name counts as every address it resolves to. Dialled in
    /// random order; when the server goes, the next at once.
    #[arg(long, value_name = "ADDR,...", default_value = "127.0.0.1:50051")]
    server: Vec<String>,
    /// Client id sent to the server [default: the id in the token, else <hostname>-<pid>].
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// A label the server can target this agent by (`contact-ctl push --target key=value`); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = labels::parse_label)]
    labels: Vec<(String, String)>,
    /// Dial with TLS, trusting this CA (PEM) for the server's certificate.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Dial with TLS, trusting the system's CAs.
    #[arg(long, conflicts_with = "tls_ca")]
    tls: bool,
    /// This agent's certificate (PEM), for a server that requires mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Expect this name in the server's certificate instead of each --server entry's host.
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Read this agent's token from FILE (from `contact-server token ID`);
    /// the CONTACT_TOKEN environment variable is read otherwise.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Seconds an --exec command may run; then its process group is killed
    /// and the task reported as failed.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "exec")]
    exec_timeout: Option<Duration>,
    /// Exit 0 once N results have been acknowledged by the server.
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    max_tasks: Option<u64>,
    /// Run CMD (no shell; quoting as in sh) with the task as last argument;
    /// exit status 0 = ok, its stdout is the result.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// --exec commands run at once at most, each on a task of its own
    /// (1: one at a time, in the order the tasks came).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "1", requires = "exec")]
    jobs: u64,
    /// Bytes of a command's output kept in its result.
    #[arg(long, value_name = "BYTES", value_parser = parse_positive, default_value = "16384")]
    max_output: u64,
    /// Seconds between status messages.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "5")]
    status_every: Duration,
    /// First reconnect delay, in seconds; it doubles per failure.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "0.2")]
    backoff_initial: Duration,
    /// Largest reconnect delay, in seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10")]
    backoff_max: Duration,
    /// Seconds one dial may take.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10")]
    connect_timeout: Duration,
    /// Results per tellResult call (each completed call acknowledges its results).
    #[arg(long, value_name = "N", value_parser = parse_positive, default_value = "1000")]
    ack_every: u64,
    /// Longest time, in seconds, a result waits for its acknowledgement to be asked for.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "0.2")]
    ack_interval: Duration,
    /// Seconds between HTTP/2 keepalive pings (at least 1).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "20")]
    keepalive: Duration,
}

fn main() {
    let flags: Flags = contact::config::parse_args(None);
    cli::init_logging();
    let shutdown = Shutdown::new();
    let result = config(flags).and_then(|config| {
        cli::stop_on_signals(&shutdown)?;
        client::run(&config, &shutdown)
    });
    if let Err(e) = result {
        eprintln!("contact-client: {e}");
        std::process::exit(cli::exit_code(&e));
    }
}

fn config(flags: Flags) -> Result<ClientConfig, contact::Error> {
    let token = token::token_from(flags.token_file.as_deref(), "CONTACT_TOKEN")?;
    let id = flags
        .id
        .or_else(|| {
            token
                .as_ref()
                .and_then(|t| token::agent_id_of(t.expose()))
                .map(str::to_string)
        })
        .unwrap_or_else(client::default_client_id);
    let mut c = ClientConfig {
        servers: flags.server,
        ..ClientConfig::new("", id)
    };
    c.token = token;
    let given = flags.labels.len();
    c.labels = flags.labels.into_iter().collect();
    if c.labels.len() < given {
        return Err(contact::Error::Usage(
            "--label: a key is given twice; an agent has one value per key".into(),
        ));
    }
    if c.labels.len() > labels::MAX_LABELS {
        return Err(contact::Error::Usage(format!(
            "--label: {} labels; at most {} are allowed",
            c.labels.len(),
            labels::MAX_LABELS
        )));
    }
    let tls_wanted = flags.tls
        || flags.tls_ca.is_some()
        || flags.tls_cert.is_some()
        || flags.tls_server_name.is_some();
    if tls_wanted {
        c.tls = Some(ClientTls {
            ca: flags.tls_ca,
            cert_key: flags.tls_cert.zip(flags.tls_key),
            server_name: flags.tls_server_name,
        });
    }
    if let Some(cmd) = flags.exec {
        c.handler =
            Handler::exec(&cmd, flags.max_output as usize)?.with_timeout(flags.exec_timeout);
        c.handler.check_runnable()?;
    }
    c.jobs = usize::try_from(flags.jobs)
        .map_err(|_| contact::Error::Usage(format!("--jobs {}: too many", flags.jobs)))?;
    c.status_every = flags.status_every;
    c.max_tasks = flags.max_tasks;
    c.backoff_initial = flags.backoff_initial;
    c.backoff_max = flags.backoff_max;
    c.connect_timeout = flags.connect_timeout;
    c.ack_every = flags.ack_every;
    c.ack_interval = flags.ack_interval;
    if flags.keepalive < contact::server::MIN_CLIENT_PING {
        let min = contact::server::MIN_CLIENT_PING.as_secs_f64();
        return Err(contact::Error::Usage(format!(
            "--keepalive: servers refuse pings more often than every {min}s"
        )));
    }
    c.keepalive = flags.keepalive;
    Ok(c)
}
