//! `MetricsPort`: the HTTP side of `--metrics-listen ADDR`, on one thread of
//! ours (tiny_http; every answer is quick, so one thread serves them in
//! turn). `/metrics` is the Prometheus scrape, `/healthz` says the process
//! is alive and not failed, `/readyz` whether it takes work (as the gRPC
//! health service says). `/` is the live web view (`webview`) and
//! `/api/state`, `/api/job/ID` the JSON it polls. Metrics and health are
//! open, like the NATS monitoring port: the operator chose the address.
//! The web view shows the fleet, so it follows the admin API's rule: with
//! `--auth-secret` it needs an admin token — a login form that sets a
//! session cookie (a browser's EventSource could not send a header), or
//! `Authorization: Bearer` — and without credentials it is served on
//! loopback only. The same thread samples the result rate every
//! [`SAMPLE_EVERY`] for the web view's chart.

use crate::admin::AdminService;
use crate::dispatch::{Dispatcher, Mode};
use crate::error::Error;
use crate::observe::health::Health;
use crate::observe::metrics::{self, Metrics};
use crate::observe::webview;
use crate::proto::admin::Job as JobMsg;
use crate::shutdown::Shutdown;
use crate::trust::{Authenticator, Refusal};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tiny_http::{Header, Method, Request, Response};

/// How often the result rate is sampled for the chart.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Samples kept: ten minutes.
const SAMPLES: usize = 300;

/// How long a web view login lasts.
const SESSION: Duration = Duration::from_secs(12 * 3600);

/// Logins held at most (the oldest go first).
const MAX_SESSIONS: usize = 1000;

/// The session cookie's name.
const COOKIE: &str = "contact_session";

/// Jobs the web view lists.
const JOBS_SHOWN: usize = 20;

/// What the port serves from.
#[derive(Clone)]
pub struct PortState {
    pub dispatcher: Arc<Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub admin: AdminService,
    pub auth: Arc<Authenticator>,
    /// The server's: it tells a failure after a disk error.
    pub shutdown: Shutdown,
}

/// The running port.
pub struct MetricsPort {
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsPort {
    /// Binds `addr` and serves until `stop` fires.
    pub fn start(addr: &str, state: PortState, stop: Shutdown) -> Result<MetricsPort, Error> {
        let bind_err = |reason: String| Error::Bind {
            addr: addr.to_string(),
            reason,
        };
        let socket: SocketAddr = addr
            .parse()
            .map_err(|_| {
                Error::Usage(format!(
                    "--metrics-listen {addr:?} is not IP:PORT (a name is not resolved here): e.g. 127.0.0.1:9090"
                ))
            })?;
        let server = tiny_http::Server::http(socket).map_err(|e| bind_err(e.to_string()))?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| bind_err("not an IP address".into()))?;
        let loopback = bound.ip().is_loopback();
        let web = WebAccess::of(&state.auth, loopback);
        if let WebAccess::Login = web {
            if !loopback {
                log::warn!("the web view on {bound} is plain HTTP: admin tokens typed into its login cross the network in clear text; put it behind a TLS proxy or keep --metrics-listen on loopback");
            }
        }
        log::info!(
            "metrics on http://{bound}/metrics (health /healthz /readyz, web view /: {})",
            web.describe()
        );
        let mut port = Port {
            stop,
            state,
            web,
            sessions: HashMap::new(),
            samples: VecDeque::new(),
            last_sample: None,
        };
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || port.serve(&server))
            .map_err(Error::Thread)?;
        Ok(MetricsPort {
            addr: bound,
            thread: Some(thread),
        })
    }

    /// The address bound (its port, with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the thread, which ends soon after shutdown fires.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Who may see the web view.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WebAccess {
    /// No credentials configured, loopback address: anyone on this machine.
    Open,
    /// Admin tokens (`--auth-secret`).
    Login,
    /// Closed, with the reason.
    Closed(String),
}

impl WebAccess {
    /// The admin API's rule, as `AdminService::operator` applies it: without
    /// credentials, loopback only; then whoever `Authenticator::admin`
    /// takes for an operator.
    fn of(auth: &Authenticator, loopback: bool) -> WebAccess {
        if !loopback && !auth.requires_credentials() {
            return WebAccess::Closed(
                "this address is beyond loopback and the server has no credentials: the web view needs --auth-secret (admin tokens), or --metrics-listen on 127.0.0.1".into(),
            );
        }
        match auth.admin(None) {
            Ok(_) => WebAccess::Open,
            Err(Refusal::Unauthenticated(_)) => WebAccess::Login,
            Err(Refusal::Denied(why)) => WebAccess::Closed(why),
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            WebAccess::Open => "open to local users",
            WebAccess::Login => "admin token required",
            WebAccess::Closed(_) => "closed",
        }
    }
}

/// One result-rate sample: when, and the counts then.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: SystemTime,
    results: u64,
    failed: u64,
}

struct Port {
    stop: Shutdown,
    state: PortState,
    web: WebAccess,
    /// Session id → (operator, expiry).
    sessions: HashMap<String, (String, Instant)>,
    samples: VecDeque<(f64, f64, f64)>,
    last_sample: Option<(Instant, Sample)>,
}

impl Port {
    fn serve(&mut self, server: &tiny_http::Server) {
        while !self.stop.is_triggered() {
            self.sample();
            match server.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(req)) => self.answer(req),
                Ok(None) => {}
                Err(e) => {
                    log::error!("metrics port: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// Adds a rate sample when one is due.
    fn sample(&mut self) {
        let now = Instant::now();
        if self
            .last_sample
            .is_some_and(|(t, _)| now.duration_since(t) < SAMPLE_EVERY)
        {
            return;
        }
        let counts = self.state.metrics.result_counts();
        let s = Sample {
            at: SystemTime::now(),
            results: counts.0,
            failed: counts.1,
        };
        if let Some((t, last)) = self.last_sample {
            let secs = now.duration_since(t).as_secs_f64().max(1e-3);
            self.samples.push_back((
                crate::unixtime::seconds(s.at),
                (s.results - last.results) as f64 / secs,
                (s.failed - last.failed) as f64 / secs,
            ));
            if self.samples.len() > SAMPLES {
                self.samples.pop_front();
            }
        }
        self.last_sample = Some((now, s));
    }

    fn answer(&mut self, mut req: Request) {
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let response = match (req.method(), path.as_str()) {
            (Method::Get, "/metrics") => text(
                200,
                metrics::CONTENT_TYPE,
                self.state.metrics.scrape(&self.state.dispatcher),
            ),
            (Method::Get, "/healthz") => match self.state.shutdown.failure() {
                Some(why) => plain(503, format!("failed: {why}\n")),
                None => plain(200, "ok\n".into()),
            },
            (Method::Get, "/readyz") if self.state.health.is_serving() => {
                plain(200, "serving\n".into())
            }
            (Method::Get, "/readyz") => plain(503, "not serving\n".into()),
            (Method::Post, "/login") => self.login(&mut req),
            (Method::Get, p) if p == "/" || p.starts_with("/api/") => match self.viewer(&req) {
                Err(refusal) => refusal,
                Ok(()) if path == "/" => {
                    text(200, "text/html; charset=utf-8", webview::PAGE.into())
                }
                Ok(()) if path == "/api/state" => json_response(&self.fleet()),
                Ok(()) => match path
                    .strip_prefix("/api/job/")
                    .and_then(|id| id.parse().ok())
                    .and_then(|id| self.state.admin.job_with_agents(id))
                {
                    Some(job) => json_response(&job_json(&job, true)),
                    None => plain(404, "no such job here\n".into()),
                },
            },
            _ => plain(
                404,
                "not found: try /metrics, /healthz, /readyz or /\n".into(),
            ),
        };
        let _ = req.respond(response);
    }

    /// Whether the request may see the web view; the answer otherwise (the
    /// login page for a browser, 401 for a script).
    fn viewer(&mut self, req: &Request) -> Result<(), Response<std::io::Cursor<Vec<u8>>>> {
        match &self.web {
            WebAccess::Open => return Ok(()),
            WebAccess::Closed(why) => return Err(plain(403, format!("{why}\n"))),
            WebAccess::Login => {}
        }
        let header = |name: &str| {
            req.headers()
                .iter()
                .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                .map(|h| h.value.as_str().to_string())
        };
        if let Some(token) = header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string()))
        {
            return match self.state.auth.admin(Some(&token)) {
                Ok(_) => Ok(()),
                Err(r) => Err(plain(401, format!("{}\n", r.message()))),
            };
        }
        let now = Instant::now();
        let session = header("cookie").and_then(|c| {
            c.split(';')
                .filter_map(|kv| kv.trim().strip_prefix(&format!("{COOKIE}=")))
                .map(str::to_string)
                .next()
        });
        if session.is_some_and(|id| {
            self.sessions
                .get(&id)
                .is_some_and(|(_, until)| *until > now)
        }) {
            return Ok(());
        }
        if req.url() == "/" {
            Err(text(
                200,
                "text/html; charset=utf-8",
                webview::login_page(None),
            ))
        } else {
            Err(plain(
                401,
                "log in at / (admin token) or send Authorization: Bearer\n".into(),
            ))
        }
    }

    /// `POST /login` with `token=...`: a session cookie for an admin token.
    fn login(&mut self, req: &mut Request) -> Response<std::io::Cursor<Vec<u8>>> {
        if self.web != WebAccess::Login {
            return plain(
                404,
                "no login here: the web view needs none, or is closed\n".into(),
            );
        }
        let mut body = String::new();
        if req
            .as_reader()
            .take(8192)
            .read_to_string(&mut body)
            .is_err()
        {
            return plain(400, "the form could not be read\n".into());
        }
        let token = body
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(form_decode)
            .unwrap_or_default();
        match self.state.auth.admin(Some(token.trim())) {
            Ok(name) => {
                let now = Instant::now();
                self.sessions.retain(|_, (_, until)| *until > now);
                if self.sessions.len() >= MAX_SESSIONS {
                    if let Some(oldest) = self
                        .sessions
                        .iter()
                        .min_by_key(|(_, (_, until))| *until)
                        .map(|(id, _)| id.clone())
                    {
                        self.sessions.remove(&oldest);
                    }
                }
                let Some(id) = session_id() else {
                    log::error!("web view: /dev/urandom cannot be read: no login possible");
                    return plain(500, "the server cannot make a session id\n".into());
                };
                log::info!(
                    "web view: admin {name:?} logged in from {:?}",
                    req.remote_addr()
                );
                self.sessions.insert(id.clone(), (name, now + SESSION));
                let cookie = format!(
                    "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                    SESSION.as_secs()
                );
                plain(303, "logged in\n".into())
                    .with_header(header("Set-Cookie", &cookie))
                    .with_header(header("Location", "/"))
            }
            Err(r) => {
                log::warn!(
                    "web view: a login from {:?} was refused: {}",
                    req.remote_addr(),
                    r.message()
                );
                text(
                    401,
                    "text/html; charset=utf-8",
                    webview::login_page(Some(r.message())),
                )
            }
        }
    }

    /// Everything the web view shows, as JSON.
    fn fleet(&self) -> Value {
        let d = &self.state.dispatcher;
        let c = d.counters();
        let g = d.gauges();
        let (results, failed) = self.state.metrics.result_counts();
        let now = SystemTime::now();
        let ago = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs_f64();
        let agents: Vec<Value> = d
            .clients()
            .iter()
            .map(|a| {
                json!({
                    "id": a.id, "address": a.peer,
                    "labels": a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                    "state": if a.drained { "drained" } else { "active" },
                    "connected_secs": ago(a.connected_since),
                    "last_seen_secs": ago(a.last_seen),
                    "in_flight": a.in_flight, "sent": a.tasks_sent,
                    "done": a.done, "failed": a.failed,
                })
            })
            .collect();
        let jobs: Vec<Value> = self
            .state
            .admin
            .recent_jobs(JOBS_SHOWN)
            .iter()
            .map(|j| job_json(j, false))
            .collect();
        json!({
            "mode": match d.config().mode { Mode::Broadcast => "broadcast", Mode::Queue => "queue" },
            "serving": self.state.health.is_serving(),
            "totals": {
                "agents": g.connected, "in_flight": g.in_flight, "backlog": g.backlog,
                "produced": c.produced, "sent": c.sent, "results": results,
                "failed": failed, "redelivered": c.redelivered, "dead": c.dead,
            },
            "rates": self.samples.iter().map(|(t, r, f)| json!([t, r, f])).collect::<Vec<_>>(),
            "sample_secs": SAMPLE_EVERY.as_secs_f64(),
            "agents": agents,
            "jobs": jobs,
        })
    }
}

/// A job as the web view shows it.
fn job_json(j: &JobMsg, agents: bool) -> Value {
    let t = j.totals.get_ref();
    let mut v = json!({
        "id": j.job_id, "text": j.text, "target": j.target,
        "created": j.created_at,
        "agents": t.agents, "ok": t.ok, "failed": t.failed, "dead": t.dead,
        "running": t.running + t.delivered, "pending": t.pending + t.held,
        "cancelled": t.cancelled, "timed_out": t.timed_out, "stale": t.stale,
        "stopped": j.stopped, "waiting_for": j.waiting_for,
    });
    if agents {
        v["rows"] = j
            .agents
            .iter()
            .map(|s| {
                json!({"agent": s.agent, "task_id": s.task_id, "status": s.status,
                       "attempt": s.attempt, "output": s.output})
            })
            .collect();
    }
    v
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("a valid header")
}

fn text(status: u16, content_type: &str, body: String) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", content_type))
        .with_header(header("Cache-Control", "no-store"))
        .with_header(header("X-Content-Type-Options", "nosniff"))
}

fn plain(status: u16, body: String) -> Response<std::io::Cursor<Vec<u8>>> {
    text(status, "text/plain; charset=utf-8", body)
}

fn json_response(v: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    text(200, "application/json", v.to_string())
}

/// `application/x-www-form-urlencoded` decoding of one value.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match (bytes[i], escaped) {
            (_, Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// 128 random bits from the system's generator, as hex; `None` without one
/// (then no session: an id must never be guessable).
fn session_id() -> Option<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(
            form_decode("contact1.admin%2Bx+y%3D"),
            "contact1.admin+x y="
        );
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(form_decode("%4"), "%4");
        assert_eq!(form_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn session_ids_are_long_and_differ() {
        let (a, b) = (session_id().unwrap(), session_id().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
