//! The live web view in a real browser: headless Chromium driven over
//! WebDriver (chromedriver), against a real server with agents. It logs in
//! with an admin token, waits for the agents' rows and for the numbers to
//! move when a job runs, opens the job, and saves a screenshot under the
//! target directory. Skipped, saying so, only where Chromium or its driver
//! is not installed (scripts/setup.sh installs them as root).

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const CHROMIUM: &str = "/usr/bin/chromium";
const DRIVER: &str = "/usr/bin/chromedriver";

/// A headless Chromium session, ended (and its driver stopped) on drop.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    /// Its profile directory, which names its processes.
    profile: PathBuf,
}

impl Browser {
    /// A fresh browser with its own profile in `profile`, or why not.
    fn start(profile: &Path) -> Result<Browser, String> {
        for bin in [CHROMIUM, DRIVER] {
            if !Path::new(bin).exists() {
                return Err(format!(
                    "{bin} is not installed (apt-get install chromium chromium-driver)"
                ));
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| e.to_string())?;
        let driver = Command::new(DRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{DRIVER}: {e}"))?;
        let addr = format!("127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            profile: profile.to_path_buf(),
        };
        wait_for("chromedriver answers", || {
            std::net::TcpStream::connect(&browser.addr).is_ok()
        });
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1400,1000",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let created = browser.call("POST", "/session", &caps);
        browser.session = created["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session: {created}"))?
            .to_string();
        Ok(browser)
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let (status, _, text) = http(
            &self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            &body,
        );
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("WebDriver {path}: {e}: {text}"));
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), &body)
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    /// Runs `js` (a function body) in the page; what it returns.
    fn script(&self, js: &str) -> Value {
        self.session_call("POST", "/execute/sync", json!({"script": js, "args": []}))
    }

    /// The element `css` selects (the first).
    fn find(&self, css: &str) -> String {
        let v = self.session_call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.session_call(
            "POST",
            &format!("/element/{el}/value"),
            json!({ "text": text }),
        );
    }

    fn click(&self, css: &str) {
        let el = self.find(css);
        self.session_call("POST", &format!("/element/{el}/click"), json!({}));
    }

    /// The text of the element `css` selects, or "" when there is none.
    fn text(&self, css: &str) -> String {
        self.script(&format!(
            "const e = document.querySelector({css:?}); return e ? e.textContent : '';"
        ))
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    fn screenshot(&self, to: &Path) {
        use base64::Engine;
        let png = self.session_call("GET", "/screenshot", json!({}));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a base64 PNG"))
            .expect("valid base64");
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::write(to, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                &self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                "",
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // A browser whose session never finished starting outlives its
        // driver: its processes carry the profile directory in their flags.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .status();
    }
}

#[test]
fn the_web_view_shows_the_fleet_live_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("chromium-profile");
    let browser = match Browser::start(&profile) {
        Ok(b) => b,
        Err(why) => {
            eprintln!("SKIPPED: the web view's browser test needs Chromium: {why}");
            return;
        }
    };
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "integration test secret, 32 bytes!").unwrap();
    let secret = secret.to_str().unwrap();
    let token = |args: &[&str]| mint_token(secret, args);
    let admin = token(&["--admin", "ops"]);
    let mut cmd = Command::new(SERVER_BIN);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--no-state",
        "--tasks-from",
        "/dev/null",
        "--auth-secret",
        secret,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut srv = Proc::spawn(cmd);
    let metrics = metrics_addr_of(&srv.wait_line("metrics on http://"));
    let addr = format!(
        "127.0.0.1:{}",
        port_of_listening_line(&srv.wait_line("listening on"))
    );
    let mut agents = Vec::new();
    for (id, exec, label) in [
        ("web-1", "echo", "role=web"),
        ("web-2", "echo", "role=web"),
        ("db-1", "false", "role=db"),
    ] {
        let token_file = dir.path().join(format!("{id}.token"));
        std::fs::write(&token_file, token(&[id])).unwrap();
        agents.push(agent_process(
            &addr,
            id,
            exec,
            &[
                "--label",
                label,
                "--token-file",
                token_file.to_str().unwrap(),
            ],
        ));
    }

    // The login form, then the page.
    browser.goto(&format!("http://{metrics}/"));
    browser.type_into("#token", &admin);
    browser.click("#login");
    wait_for("the three agents' rows", || {
        browser.script("return document.querySelectorAll('tr[data-agent]').length;") == json!(3)
    });
    assert_eq!(browser.text("#agents-count"), "3");
    assert!(browser
        .text("tr[data-agent=\"web-1\"]")
        .contains("role=web"));
    assert_eq!(browser.text("#results-total"), "0");

    // A job runs: the numbers move, the failing agent and job stand out.
    let env = [("CONTACT_ADMIN_TOKEN", admin.as_str())];
    let (code, out, err) = ctl(&["--server", &addr, "push", "uptime"], &env);
    assert_eq!(code, 0, "{out}{err}");
    wait_for("three results shown", || {
        browser.text("#results-total") == "3"
    });
    wait_for("db-1's row marked failed", || {
        browser.script("return document.querySelector('tr[data-agent=\"db-1\"]').className;")
            == json!("bad")
    });
    wait_for("the job listed", || {
        browser.text("tr[data-job=\"1\"]").contains("uptime")
    });
    assert_eq!(browser.text("#failed-total"), "1");
    browser.click("tr[data-job=\"1\"]");
    wait_for("the job's agents shown", || {
        browser.script("return document.querySelectorAll('#job-rows tr').length;") == json!(3)
    });
    assert!(browser.text("#job-rows").contains("failed"));
    wait_for("a rate sample drawn", || {
        browser
            .script("return document.querySelector('#chart .results').getAttribute('points');")
            .as_str()
            .is_some_and(|p| !p.is_empty())
    });

    let shot: PathBuf = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("webview.png");
    browser.screenshot(&shot);
    eprintln!("web view screenshot: {}", shot.display());
    drop(browser);
    for p in agents.iter_mut().chain([&mut srv]) {
        p.signal("TERM");
        assert_eq!(p.wait_exit(), 0);
    }
}
