//! The live web view: one page of plain HTML, CSS and JavaScript embedded in
//! the binary (no front-end build step) that polls `/api/state` every
//! second and draws the connected agents, the recent jobs (a click shows
//! each agent's status and output), the fleet's totals and the result rate
//! over the last minutes as a small chart; failures and dead letters stand
//! out. Read-only. And the login form used when the server has admin
//! credentials (see `port`).

/// The page (`/`).
pub const PAGE: &str = include_str!("webview.html");

/// The login form, with why the last attempt failed, if it did.
pub fn login_page(refused: Option<&str>) -> String {
    let message = refused
        .map(|m| format!("<p class=\"error\">{}</p>", escape(m)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>contact — log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px system-ui, sans-serif; margin: 4em auto; max-width: 32em; color: #222; }}
input {{ width: 100%; font: 14px monospace; padding: .4em; box-sizing: border-box; }}
button {{ margin-top: .8em; padding: .4em 1.2em; }}
.error {{ color: #b00020; }}
</style></head>
<body>
<h1>contact</h1>
<p>This server needs an admin token (<code>contact-server token --admin NAME</code>).</p>
{message}
<form method="post" action="/login">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="off" autofocus>
<button id="login" type="submit">Log in</button>
</form>
</body></html>
"#
    )
}

/// Text made safe to put in HTML.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_shown_escaped() {
        let page = login_page(Some("bad <token>"));
        assert!(page.contains("bad &lt;token&gt;"));
        assert!(!login_page(None).contains("class=\"error\""));
    }
}
