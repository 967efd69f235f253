//! `contact-ctl`: parses flags, makes one admin call to a running
//! `contact-server` (see `contact::ctl`) and prints the answer, or runs the
//! live view `top` (see `contact::top`).

use clap::{Args, Parser, Subcommand};
use contact::cli::{self, parse_secs};
use contact::ctl::{self, Ctl, CtlConfig};
use contact::proto::admin::PushRequest;
use contact::tls::ClientTls;
use contact::token;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Operate a running contact server: push tasks, list its agents.
///
/// With credentials configured on the server, an admin token is needed
/// (`contact-server token --admin NAME`): --token-file, or the
/// CONTACT_ADMIN_TOKEN environment variable. On loopback without
/// credentials, none is.
#[derive(Parser, Debug)]
#[command(name = "contact-ctl", version)]
struct Flags {
    /// Read settings from this TOML file [default: ~/.config/contact/ctl.toml
    /// when it exists]: each key is a long flag without its dashes
    /// (`server = "fleet.example:50051"`, `token-file = "..."`); a flag given
    /// here wins over the file's.
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Server address.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    server: String,
    /// Read the admin token from FILE.
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Dial with TLS, trusting this CA (PEM) for the server's certificate.
    #[arg(long, value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// Dial with TLS, trusting the system's CAs.
    #[arg(long, conflicts_with = "tls_ca", global = true)]
    tls: bool,
    /// Expect this name in the server's certificate instead of the host dialled.
    #[arg(long, value_name = "NAME", global = true)]
    tls_server_name: Option<String>,
    /// Seconds one call to the server may take, connecting included.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "10", global = true)]
    call_timeout: Duration,
    /// Print JSON lines instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish a task: to every agent (broadcast) or the work queue (queue), to one agent, or to the agents with some labels.
    Push {
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Push a task (as `push`) and, with --wait, print each agent's result as
    /// it arrives; exit 0 when every agent succeeded, 1 when any failed or
    /// did not answer within --timeout.
    Run {
        #[command(flatten)]
        task: TaskArgs,
        /// Wait for the results.
        #[arg(long)]
        wait: bool,
    },
    /// List the connected agents.
    Clients,
    /// One job: each agent's status and output.
    Job { id: u64 },
    /// The jobs the server holds, newest first.
    Jobs,
    /// An agent gets nothing new and finishes what it holds (maintenance).
    Drain {
        agent: String,
        /// Let it take tasks again.
        #[arg(long)]
        undo: bool,
    },
    /// Deliver tasks no further: these task ids, or every task of a job
    /// (and the agents its rollout still holds). A task in an agent's hands
    /// may still be answered.
    Cancel {
        #[arg(value_name = "TASK", required_unless_present = "job")]
        tasks: Vec<u64>,
        #[arg(long, value_name = "ID")]
        job: Option<u64>,
    },
    /// End an agent's connection now; what it held is delivered again. It dials again by itself.
    Disconnect { agent: String },
    /// A live, full-screen view of the agents and the newest jobs, with
    /// results per second (like `nats top`): `s` changes the sort column,
    /// `q` or Ctrl-C quits. An unreachable server is shown, and asked again.
    Top {
        /// Seconds between two polls of the server; the rates are over this.
        #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "1")]
        interval: Duration,
    },
    /// The recorded results, from the server's results file (--results-to).
    Results {
        /// Keep printing new results as they are recorded.
        #[arg(long)]
        follow: bool,
        /// Start at this sequence number (one after the last you saw, to
        /// resume without a gap) [default: from the start; with --follow, from now].
        #[arg(long, value_name = "SEQ")]
        from: Option<u64>,
    },
}

/// What to push, and to whom.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("whom").args(["agent", "target"])))]
struct TaskArgs {
    /// The task's text, as the agents receive it.
    text: String,
    /// Only this agent gets it.
    #[arg(long, value_name = "ID", conflicts_with = "target")]
    agent: Option<String>,
    /// The connected agents started with every one of these labels (`contact-client --label`) each get it.
    #[arg(long, value_name = "KEY=VALUE[,KEY=VALUE]")]
    target: Option<String>,
    /// Accept an agent id the server has never seen (the task waits for it),
    /// or a --target no agent matches now: the job also takes the agents
    /// that come to match later, until --timeout or `cancel --job`.
    #[arg(long, requires = "whom")]
    wait_for_agents: bool,
    /// An idempotency key: pushed again with the same key (a retried
    /// script), nothing is published twice.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// At most this many agents (N) or share of them (P%) run it at once;
    /// the others get it as results come back.
    #[arg(long, value_name = "N|P%")]
    max_concurrency: Option<String>,
    /// Once more agents than this (N or P%) failed, it stops spreading: the
    /// agents still waiting are cancelled.
    #[arg(long, value_name = "N|P%")]
    max_errors: Option<String>,
    /// Seconds the job has: then its task is delivered no further and the
    /// agents that have not answered are marked timed-out (with `run
    /// --wait`, also how long it waits) [default for run --wait: 60].
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
}

impl TaskArgs {
    fn request(self) -> PushRequest {
        PushRequest {
            text: self.text,
            agent: self.agent.unwrap_or_default(),
            selector: self.target.unwrap_or_default(),
            wait_for_agents: self.wait_for_agents,
            idempotency_key: self.key.unwrap_or_default(),
            max_concurrency: self.max_concurrency.unwrap_or_default(),
            max_errors: self.max_errors.unwrap_or_default(),
            timeout_secs: self
                .timeout
                .map_or(0, |t| t.as_secs_f64().ceil().min(u32::MAX as f64) as u32),
            ..Default::default()
        }
    }
}

fn main() {
    let flags: Flags = contact::config::parse_args(contact::config::user_config("ctl.toml"));
    cli::init_logging();
    match run(flags) {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("contact-ctl: {e}");
            std::process::exit(cli::exit_code(&e));
        }
    }
}

fn run(flags: Flags) -> Result<String, contact::Error> {
    let token = token::token_from(flags.token_file.as_deref(), "CONTACT_ADMIN_TOKEN")?;
    let tls = (flags.tls || flags.tls_ca.is_some() || flags.tls_server_name.is_some()).then(|| {
        ClientTls {
            ca: flags.tls_ca.clone(),
            cert_key: None,
            server_name: flags.tls_server_name.clone(),
        }
    });
    let ctl = Ctl::connect(&CtlConfig {
        server: flags.server.clone(),
        token,
        tls,
        timeout: flags.call_timeout,
    })?;
    match flags.command {
        Command::Push { task } => {
            let reply = ctl.push(&task.request())?;
            Ok(ctl::show_push(&reply, flags.json) + "\n")
        }
        Command::Run { task, wait } => {
            // With a job timeout, the server's verdict (timed-out) is awaited
            // a moment past it; without, 60 s of waiting.
            let timeout = task
                .timeout
                .map_or(Duration::from_secs(60), |t| t + Duration::from_secs(2));
            let req = task.request();
            if !wait {
                return Ok(ctl::show_push(&ctl.push(&req)?, flags.json) + "\n");
            }
            let stdout = std::io::stdout();
            let all_ok = ctl::run_and_wait(&ctl, &req, timeout, flags.json, &mut stdout.lock())?;
            if !all_ok {
                std::process::exit(1);
            }
            Ok(String::new())
        }
        Command::Drain { agent, undo } => {
            let held = ctl.drain(&agent, undo)?;
            Ok(if undo {
                format!("agent {agent} takes tasks again\n")
            } else {
                format!("agent {agent} drained: nothing new for it; it holds {held} tasks\n")
            })
        }
        Command::Cancel { tasks, job } => {
            let (n, held) = ctl.cancel(&tasks, job.unwrap_or(0))?;
            let mut text = format!("{n} task{} cancelled", if n == 1 { "" } else { "s" });
            if held > 0 {
                text += &format!(", and {held} agents the rollout still held");
            }
            Ok(text + "\n")
        }
        Command::Disconnect { agent } => {
            ctl.disconnect(&agent)?;
            Ok(format!("agent {agent} disconnected\n"))
        }
        Command::Results { follow, from } => {
            let from = from.unwrap_or(if follow { 0 } else { 1 });
            let stdout = std::io::stdout();
            ctl.results(from, follow, flags.json, &mut stdout.lock())?;
            Ok(String::new())
        }
        Command::Top { interval } => {
            contact::top::screen::run(ctl, &flags.server, interval)?;
            Ok(String::new())
        }
        Command::Job { id } => Ok(ctl::show_job(&ctl.job(id)?, flags.json)),
        Command::Jobs => Ok(ctl::show_jobs(&ctl.jobs()?, flags.json, SystemTime::now())),
        Command::Clients => Ok(ctl::show_clients(
            &ctl.clients()?,
            flags.json,
            SystemTime::now(),
        )),
    }
}
