//! `Reloader`: what a running server reads again when told to (SIGHUP) —
//! the secret of `--auth-secret`, the `--deny-list` and the TLS files —
//! without ending a connection. Every file is read and checked first, and
//! all are put in force together or none is: a reload that fails (a file
//! missing, unreadable or malformed) leaves the server with the credentials
//! it had. What callers must present is fixed at start: adding or removing
//! a secret, TLS or a client CA is logged as needing a restart and not
//! applied. A secret that changed revokes every token of the old one, so
//! the connected agents' sessions are ended: they reconnect and are let in
//! only with a token of the new secret.

use crate::dispatch::Dispatcher;
use crate::error::Error;
use crate::tls::{CertificateReloader, ServerTls};
use crate::token::Secret;
use crate::trust::{Authenticator, DenyListFile};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The credential files a server reads: the paths, whose contents are
/// read at each reload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CredentialFiles {
    /// `--auth-secret`.
    pub auth_secret: Option<PathBuf>,
    /// `--deny-list`.
    pub deny_list: Option<PathBuf>,
    /// `--tls-cert`, `--tls-key` and `--client-ca`.
    pub tls: Option<ServerTls>,
}

/// Puts new credentials in force in a running server (see the module's
/// doc). Cheap to clone; reloads are serialised.
#[derive(Clone)]
pub struct Reloader {
    auth: Arc<Authenticator>,
    certificates: Option<CertificateReloader>,
    dispatcher: Arc<Dispatcher>,
    in_force: Arc<Mutex<CredentialFiles>>,
}

impl Reloader {
    /// A reloader for a server that started with `files`.
    pub fn new(
        auth: Arc<Authenticator>,
        certificates: Option<CertificateReloader>,
        dispatcher: Arc<Dispatcher>,
        files: CredentialFiles,
    ) -> Reloader {
        Reloader {
            auth,
            certificates,
            dispatcher,
            in_force: Arc::new(Mutex::new(files)),
        }
    }

    /// Reads `wanted` and puts it in force; on an error nothing changed.
    /// Returns a summary of what is in force now, for the log.
    pub fn reload(&self, wanted: CredentialFiles) -> Result<String, Error> {
        let mut in_force = self.in_force.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = without_restart(wanted, &in_force, self.auth.requires_secret());
        let secret = wanted
            .auth_secret
            .as_deref()
            .map(Secret::load)
            .transpose()?;
        let deny_list = wanted
            .deny_list
            .as_deref()
            .map(DenyListFile::read)
            .transpose()?;
        if let (Some(certificates), Some(tls)) = (&self.certificates, &wanted.tls) {
            certificates.reload(tls)?;
        }
        // Cannot fail: `without_restart` kept the secret's presence.
        let rotated = self.auth.reload(secret, deny_list)?;
        if rotated {
            self.end_sessions_of_old_tokens();
        }
        let summary = summary(&wanted, rotated);
        *in_force = wanted;
        Ok(summary)
    }

    /// After the secret changed: every agent connected with an id (seed
    /// peers known by address hold no token) must show a token of the new
    /// secret, so its session ends and it reconnects.
    fn end_sessions_of_old_tokens(&self) {
        let ended = self
            .dispatcher
            .clients()
            .into_iter()
            .filter(|c| c.id != c.peer)
            .filter(|c| {
                self.dispatcher.evict(
                    &c.id,
                    "the server's secret changed: reconnect with a token of the new secret",
                )
            })
            .count();
        log::warn!("the secret changed: every token of the old one is refused from now on; {ended} agent sessions ended");
    }
}

/// `wanted`, with the changes that need a restart (adding or removing a
/// secret, TLS or a client CA) replaced by what is in force, each logged.
fn without_restart(
    mut wanted: CredentialFiles,
    in_force: &CredentialFiles,
    secret_required: bool,
) -> CredentialFiles {
    if wanted.auth_secret.is_some() != secret_required {
        log::warn!(
            "reload: {} --auth-secret changes what callers must present and needs a restart; not applied",
            if secret_required { "removing" } else { "adding" }
        );
        wanted.auth_secret = in_force.auth_secret.clone();
    }
    let mutual = |t: &Option<ServerTls>| t.as_ref().map(|t| t.client_ca.is_some());
    if mutual(&wanted.tls) != mutual(&in_force.tls) {
        log::warn!(
            "reload: turning TLS or --client-ca on or off needs a restart; the TLS files stay {}",
            match &in_force.tls {
                Some(t) => format!("{} and {}", t.cert.display(), t.key.display()),
                None => "off".into(),
            }
        );
        wanted.tls = in_force.tls.clone();
    }
    wanted
}

/// What is in force after a reload, for the log line.
fn summary(files: &CredentialFiles, rotated: bool) -> String {
    let mut parts = vec![];
    if let Some(s) = &files.auth_secret {
        let how = if rotated { "changed" } else { "unchanged" };
        parts.push(format!("secret {} ({how})", s.display()));
    }
    if let Some(d) = &files.deny_list {
        parts.push(format!("deny list {}", d.display()));
    }
    if let Some(t) = &files.tls {
        parts.push(format!("TLS {} for new connections", t.cert.display()));
    }
    if parts.is_empty() {
        "no credential files configured".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(ca: bool) -> Option<ServerTls> {
        Some(ServerTls {
            cert: "new.pem".into(),
            key: "new.key".into(),
            client_ca: ca.then(|| "ca.pem".into()),
        })
    }

    #[test]
    fn changes_that_need_a_restart_keep_what_is_in_force() {
        let in_force = CredentialFiles {
            auth_secret: Some("old-secret".into()),
            deny_list: None,
            tls: None,
        };
        // Paths may change; the kinds of credentials may not.
        let wanted = CredentialFiles {
            auth_secret: Some("new-secret".into()),
            deny_list: Some("deny".into()),
            tls: None,
        };
        assert_eq!(without_restart(wanted.clone(), &in_force, true), wanted);
        let kept = without_restart(
            CredentialFiles {
                auth_secret: None,
                deny_list: None,
                tls: tls(false),
            },
            &in_force,
            true,
        );
        assert_eq!(kept, in_force);
        let tls_in_force = CredentialFiles {
            tls: tls(false),
            ..Default::default()
        };
        let kept = without_restart(
            CredentialFiles {
                auth_secret: Some("s".into()),
                tls: tls(true),
                ..Default::default()
            },
            &tls_in_force,
            false,
        );
        assert_eq!(kept, tls_in_force);
    }
}
