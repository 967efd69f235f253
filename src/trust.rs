//! `Authenticator`: who is calling, decided once per call from what the
//! transport and the metadata prove. Three sources can name a caller: the
//! `contact-client-id` metadata (a claim), an `authorization: Bearer` token
//! (see `token`) and, with mutual TLS, the client certificate's common name
//! and subject alternative names. A claim must agree with every credential
//! present; a caller with credentials but no claim is the id they name.
//!
//! Without credentials configured every caller is believed, as the seed
//! does (the server then listens on loopback only unless told otherwise,
//! see `listen`). Once a secret or a client CA is configured, a call must
//! prove its id; anonymous seed peers are served only with `allow_anonymous`.

use crate::proto;
use crate::token::{Secret, TokenKind};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// Metadata key of the bearer token.
pub const AUTHORIZATION_KEY: &str = "authorization";

/// What the server requires of callers.
#[derive(Debug, Clone, Default)]
pub struct TrustConfig {
    /// Tokens are derived from (and checked against) this secret.
    pub secret: Option<Secret>,
    /// Client certificates are required and verified (mutual TLS).
    pub client_certs: bool,
    /// Names (agent ids, admin names) refused even with valid credentials; re-read when it changes.
    pub deny_list: Option<PathBuf>,
    /// With credentials configured, still serve callers that present none (seed peers, by address).
    pub allow_anonymous: bool,
}

impl TrustConfig {
    /// Whether callers must prove who they are.
    pub fn requires_credentials(&self) -> bool {
        self.secret.is_some() || self.client_certs
    }
}

/// What a call presented, gathered from its context.
#[derive(Debug, Clone, Default)]
pub struct Presented<'a> {
    /// The `contact-client-id` metadata, if any (already checked for form).
    pub claimed: Option<&'a str>,
    /// The bearer token, if any.
    pub bearer: Option<&'a str>,
    /// Names from a verified client certificate (CN and SANs); empty without mTLS.
    pub cert_names: Vec<String>,
    /// The peer address, the name of an anonymous caller.
    pub peer: &'a str,
}

/// An authenticated (or, without credentials configured, believed) agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: String,
    /// Known only by its address (a seed peer): cannot resume, forgotten when it leaves.
    pub ephemeral: bool,
}

/// Why a call was refused, mapped to a gRPC status by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No or invalid credentials: UNAUTHENTICATED.
    Unauthenticated(String),
    /// Valid credentials that do not allow this: PERMISSION_DENIED.
    Denied(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::Unauthenticated(m) | Refusal::Denied(m) => m,
        }
    }
}

/// Decides who a call is; shared by every handler. The secret and the deny
/// list can be replaced while the server runs ([`Authenticator::reload`], on
/// SIGHUP): each call reads the secret in force when it is checked (a read
/// lock held for one `Arc` clone), and a call already accepted stays accepted.
#[derive(Debug)]
pub struct Authenticator {
    /// What was required at start: the kinds of credentials do not change
    /// while the server runs (a secret may be replaced, not added or removed).
    required: Required,
    secret: RwLock<Option<Arc<Secret>>>,
    deny: Mutex<DenyList>,
}

/// The kinds of credentials callers must present, fixed at start.
#[derive(Debug, Clone, Copy)]
struct Required {
    secret: bool,
    client_certs: bool,
    allow_anonymous: bool,
}

#[derive(Debug, Default)]
struct DenyList {
    path: Option<PathBuf>,
    names: HashSet<String>,
}

impl Authenticator {
    pub fn new(config: TrustConfig) -> Result<Authenticator, crate::Error> {
        let auth = Authenticator {
            required: Required {
                secret: config.secret.is_some(),
                client_certs: config.client_certs,
                allow_anonymous: config.allow_anonymous,
            },
            secret: RwLock::new(config.secret.map(Arc::new)),
            deny: Mutex::new(DenyList::default()),
        };
        // Unreadable at start is an error; later, the last good list stays.
        auth.set_deny_list(
            config
                .deny_list
                .as_deref()
                .map(DenyListFile::read)
                .transpose()?,
        );
        Ok(auth)
    }

    /// Whether callers must prove who they are (a secret or a client CA is configured).
    pub fn requires_credentials(&self) -> bool {
        self.required.secret || self.required.client_certs
    }

    /// Whether agents present client certificates (mutual TLS).
    pub fn client_certs(&self) -> bool {
        self.required.client_certs
    }

    /// The secret in force now.
    fn secret(&self) -> Option<Arc<Secret>> {
        self.secret
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts a new secret and deny list (already read) in force (SIGHUP). A
    /// server started without a secret cannot be given one, nor one started
    /// with a secret lose it: that changes what callers must present, and
    /// needs a restart. Returns whether the secret is another than before
    /// (tokens of the old one no longer pass).
    pub fn reload(
        &self,
        secret: Option<Secret>,
        deny_list: Option<DenyListFile>,
    ) -> Result<bool, crate::Error> {
        if secret.is_some() != self.required.secret {
            return Err(crate::Error::Usage(
                "adding or removing --auth-secret changes what callers must present: it needs a restart".into(),
            ));
        }
        self.set_deny_list(deny_list);
        let mut current = self.secret.write().unwrap_or_else(|e| e.into_inner());
        let changed = match (&*current, &secret) {
            (Some(old), Some(new)) => !old.same_as(new),
            _ => false,
        };
        *current = secret.map(Arc::new);
        Ok(changed)
    }

    /// Whether the server was started with a secret (`--auth-secret`):
    /// tokens are checked, and admin tokens open the admin API and the web view.
    pub fn requires_secret(&self) -> bool {
        self.required.secret
    }

    fn set_deny_list(&self, file: Option<DenyListFile>) {
        let mut d = self.deny.lock().unwrap_or_else(|e| e.into_inner());
        (d.path, d.names) = match file {
            Some(f) => {
                log::info!("deny list {}: {} names", f.path.display(), f.names.len());
                (Some(f.path), f.names)
            }
            None => (None, HashSet::new()),
        };
    }

    /// The agent a `Contact` call comes from, or why it is refused.
    pub fn agent(&self, p: &Presented) -> Result<Caller, Refusal> {
        let secret = self.secret();
        let token = match (p.bearer, secret.as_deref()) {
            (Some(t), Some(secret)) => match secret.verify(t) {
                Ok((TokenKind::Agent, id)) => Some(id),
                Ok((TokenKind::Admin, name)) => {
                    return Err(Refusal::Denied(format!(
                        "the token of admin {name:?} cannot be used by an agent; issue an agent token with `contact-server token ID`"
                    )))
                }
                Err(e) => return Err(Refusal::Unauthenticated(e.to_string())),
            },
            (Some(_), None) => {
                return Err(Refusal::Unauthenticated(
                    "a token was sent but this server has no --auth-secret to check it".into(),
                ))
            }
            (None, _) => None,
        };
        if let Some(id) = &token {
            if p.claimed.is_some_and(|c| c != id) {
                return Err(Refusal::Denied(format!(
                    "the token is for {id:?}, not for the id {:?} the call claims",
                    p.claimed.unwrap_or_default()
                )));
            }
        }
        let id = if self.required.client_certs {
            let wanted = token.as_deref().or(p.claimed);
            let id = match wanted {
                Some(w) if p.cert_names.iter().any(|n| n == w) => w.to_string(),
                Some(w) => {
                    return Err(Refusal::Denied(format!(
                        "the client certificate is for {:?}, not for {w:?}",
                        p.cert_names
                    )))
                }
                None => match p.cert_names.first() {
                    Some(n) => n.clone(),
                    None => {
                        return Err(Refusal::Unauthenticated(
                            "the client certificate names no one (no CN or SAN)".into(),
                        ))
                    }
                },
            };
            // A verified certificate is proof enough; a token, if sent, must agree.
            Some(id)
        } else if self.required.secret {
            match (&token, p.claimed) {
                (Some(id), _) => Some(id.clone()),
                (None, Some(c)) => {
                    return Err(Refusal::Unauthenticated(format!(
                        "client {c:?} sent no token (authorization: Bearer); give the agent one with --token-file"
                    )))
                }
                (None, None) if self.required.allow_anonymous => None,
                (None, None) => {
                    return Err(Refusal::Unauthenticated(
                        "this server requires credentials: a token (authorization: Bearer) naming the agent".into(),
                    ))
                }
            }
        } else {
            p.claimed.map(str::to_string)
        };
        match id {
            Some(id) => {
                proto::validate_client_id(&id).map_err(Refusal::Denied)?;
                if is_peer_address(&id) {
                    return Err(Refusal::Denied(format!(
                        "client id {id:?} has the form of a peer address, which names clients without an id; choose another id"
                    )));
                }
                // A certificate is revoked by any of its names.
                if let Some(name) = std::iter::once(&id)
                    .chain(&p.cert_names)
                    .find(|n| self.is_denied(n))
                {
                    return Err(Refusal::Denied(format!(
                        "client {name:?} is on the deny list"
                    )));
                }
                Ok(Caller {
                    id,
                    ephemeral: false,
                })
            }
            None => Ok(Caller {
                id: p.peer.to_string(),
                ephemeral: true,
            }),
        }
    }

    /// The operator behind an admin call: an admin token is required once a
    /// secret is configured (an agent's token never passes); with client
    /// certificates alone the admin API is closed; without credentials it is
    /// open (loopback only) and the caller is "local".
    pub fn admin(&self, bearer: Option<&str>) -> Result<String, Refusal> {
        let Some(secret) = self.secret() else {
            if self.required.client_certs {
                // Agents' certificates prove agents, never operators.
                return Err(Refusal::Denied(
                    "the admin API needs admin tokens: start the server with --auth-secret FILE and use `contact-server token --admin NAME`".into(),
                ));
            }
            return Ok("local".into());
        };
        let token = bearer.ok_or_else(|| {
            Refusal::Unauthenticated(
                "the admin API requires an admin token (authorization: Bearer), from `contact-server token --admin NAME`".into(),
            )
        })?;
        match secret.verify(token) {
            Ok((TokenKind::Admin, name)) if self.is_denied(&format!("admin:{name}")) => Err(
                Refusal::Denied(format!("admin {name:?} is on the deny list")),
            ),
            Ok((TokenKind::Admin, name)) => Ok(name),
            Ok((TokenKind::Agent, id)) => Err(Refusal::Denied(format!(
                "agent {id:?}'s token cannot call the admin API"
            ))),
            Err(e) => Err(Refusal::Unauthenticated(e.to_string())),
        }
    }

    /// Whether `name` is on the deny list as last read (see
    /// [`Authenticator::refresh_deny_list`]): a lookup, no file read, so
    /// that it may run on gRPC's threads.
    pub fn is_denied(&self, name: &str) -> bool {
        self.deny
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .names
            .contains(name)
    }

    /// Reads the deny list again (a small file: its contents, not its
    /// mtime, are compared, so a rewrite within one mtime tick is not
    /// missed). Called once a second on a thread of ours (the server's
    /// clock), never a gRPC one; the file is read outside the lock. Write
    /// it by renaming a new file over it, so that the server never reads it
    /// half-written.
    pub fn refresh_deny_list(&self) {
        let path = {
            let d = self.deny.lock().unwrap_or_else(|e| e.into_inner());
            match &d.path {
                Some(p) => p.clone(),
                None => return,
            }
        };
        let read = read_deny_list(&path);
        let mut d = self.deny.lock().unwrap_or_else(|e| e.into_inner());
        if d.path.as_ref() != Some(&path) {
            return; // replaced by a reload meanwhile
        }
        match read {
            Ok(names) if names != d.names => {
                log::warn!(
                    "deny list {} changed: {} names",
                    path.display(),
                    names.len()
                );
                d.names = names;
            }
            Ok(_) => {}
            Err(e) => log::error!("deny list: {e}; keeping the previous list"),
        }
    }

    /// Whether a deny list is in force (so that live sessions are checked against it).
    pub fn has_deny_list(&self) -> bool {
        self.deny
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .path
            .is_some()
    }
}

/// Whether `id` looks like the name gRPC gives a peer (`ipv4:1.2.3.4:5`),
/// which is how seed peers without an id are known: no agent may take one.
fn is_peer_address(id: &str) -> bool {
    ["ipv4:", "ipv6:", "unix:", "unix-abstract:"]
        .iter()
        .any(|p| id.starts_with(p))
}

/// The bearer token of a call: `Ok(None)` without an `authorization` header,
/// an error naming the problem when it is not `Bearer <token>`.
pub fn bearer_from(headers: &grpcio::Metadata) -> Result<Option<String>, String> {
    for (key, value) in headers.iter() {
        if key.eq_ignore_ascii_case(AUTHORIZATION_KEY) {
            let value = std::str::from_utf8(value)
                .map_err(|_| "the authorization header is not UTF-8".to_string())?;
            let token = value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| "the authorization header must be \"Bearer <token>\"".to_string())?;
            return Ok(Some(token.to_string()));
        }
    }
    Ok(None)
}

/// A deny list as read from its file: one name per line (`admin:NAME` for
/// an operator); blank lines and `#` comments are skipped.
#[derive(Debug, Clone)]
pub struct DenyListFile {
    path: PathBuf,
    names: HashSet<String>,
}

impl DenyListFile {
    pub fn read(path: &std::path::Path) -> Result<DenyListFile, crate::Error> {
        Ok(DenyListFile {
            path: path.to_path_buf(),
            names: read_deny_list(path)?,
        })
    }
}

fn read_deny_list(path: &std::path::Path) -> Result<HashSet<String>, crate::Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::Error::file(path, "read the deny list", e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::from_bytes(b"a test secret of enough bytes").unwrap()
    }

    fn auth(secret: bool, certs: bool, anonymous: bool) -> Authenticator {
        Authenticator::new(TrustConfig {
            secret: secret.then(self::secret),
            client_certs: certs,
            deny_list: None,
            allow_anonymous: anonymous,
        })
        .unwrap()
    }

    fn call<'a>(
        claimed: Option<&'a str>,
        bearer: Option<&'a str>,
        certs: &[&str],
    ) -> Presented<'a> {
        Presented {
            claimed,
            bearer,
            cert_names: certs.iter().map(|s| s.to_string()).collect(),
            peer: "ipv4:127.0.0.1:5",
        }
    }

    fn named(id: &str) -> Result<Caller, Refusal> {
        Ok(Caller {
            id: id.into(),
            ephemeral: false,
        })
    }

    fn is_unauthenticated(r: Result<Caller, Refusal>) -> bool {
        matches!(r, Err(Refusal::Unauthenticated(_)))
    }

    fn is_denied(r: Result<Caller, Refusal>) -> bool {
        matches!(r, Err(Refusal::Denied(_)))
    }

    #[test]
    fn without_credentials_every_claim_is_believed() {
        let a = auth(false, false, false);
        assert_eq!(a.agent(&call(Some("web-1"), None, &[])), named("web-1"));
        let anon = a.agent(&call(None, None, &[])).unwrap();
        assert!(anon.ephemeral && anon.id == "ipv4:127.0.0.1:5");
        assert!(is_unauthenticated(a.agent(&call(None, Some("x"), &[]))));
        // Nobody may pose as a seed peer by claiming its address as an id.
        assert!(is_denied(a.agent(&call(
            Some("ipv4:127.0.0.1:5"),
            None,
            &[]
        ))));
    }

    #[test]
    fn tokens_prove_an_id_and_must_agree_with_the_claim() {
        let a = auth(true, false, false);
        let t = secret().token(TokenKind::Agent, "web-1");
        assert_eq!(a.agent(&call(Some("web-1"), Some(&t), &[])), named("web-1"));
        assert_eq!(a.agent(&call(None, Some(&t), &[])), named("web-1"));
        assert!(is_denied(a.agent(&call(Some("web-2"), Some(&t), &[]))));
        assert!(is_unauthenticated(a.agent(&call(Some("web-1"), None, &[]))));
        assert!(is_unauthenticated(a.agent(&call(None, None, &[]))));
        assert!(is_unauthenticated(a.agent(&call(
            None,
            Some("contact1.agent.web-1.AAAA"),
            &[]
        ))));
        let admin = secret().token(TokenKind::Admin, "ops");
        assert!(is_denied(a.agent(&call(None, Some(&admin), &[]))));
        // Anonymous seed peers only when allowed, and never with a claimed id.
        let a = auth(true, false, true);
        assert!(a.agent(&call(None, None, &[])).unwrap().ephemeral);
        assert!(is_unauthenticated(a.agent(&call(Some("web-1"), None, &[]))));
    }

    #[test]
    fn certificates_name_the_caller() {
        let a = auth(false, true, false);
        assert_eq!(
            a.agent(&call(None, None, &["web-1", "web-1.example"])),
            named("web-1")
        );
        assert_eq!(
            a.agent(&call(
                Some("web-1.example"),
                None,
                &["web-1", "web-1.example"]
            )),
            named("web-1.example")
        );
        assert!(is_denied(a.agent(&call(Some("web-2"), None, &["web-1"]))));
        assert!(is_unauthenticated(a.agent(&call(None, None, &[]))));
        // Both: the token and the certificate must name the same agent.
        let a = auth(true, true, false);
        let t = secret().token(TokenKind::Agent, "web-1");
        assert_eq!(a.agent(&call(None, Some(&t), &["web-1"])), named("web-1"));
        assert!(is_denied(a.agent(&call(None, Some(&t), &["web-2"]))));
        assert_eq!(a.agent(&call(None, None, &["web-1"])), named("web-1"));
    }

    #[test]
    fn admin_tokens_are_a_kind_of_their_own() {
        let a = auth(true, false, false);
        let s = secret();
        assert_eq!(
            a.admin(Some(&s.token(TokenKind::Admin, "ops"))).unwrap(),
            "ops"
        );
        assert!(matches!(
            a.admin(Some(&s.token(TokenKind::Agent, "ops"))),
            Err(Refusal::Denied(_))
        ));
        assert!(matches!(a.admin(None), Err(Refusal::Unauthenticated(_))));
        assert_eq!(auth(false, false, false).admin(None).unwrap(), "local");
        // Client certificates prove agents: without a secret, no operator.
        assert!(matches!(
            auth(false, true, false).admin(None),
            Err(Refusal::Denied(m)) if m.contains("--auth-secret")
        ));
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let md = |v: &str| {
            let mut b = grpcio::MetadataBuilder::new();
            b.add_str(AUTHORIZATION_KEY, v).unwrap();
            b.build()
        };
        assert_eq!(
            bearer_from(&md("Bearer abc")).unwrap().as_deref(),
            Some("abc")
        );
        assert_eq!(
            bearer_from(&md("bearer  abc ")).unwrap().as_deref(),
            Some("abc")
        );
        assert!(bearer_from(&md("Basic abc"))
            .unwrap_err()
            .contains("Bearer"));
        assert!(bearer_from(&md("Bearer ")).is_err());
        assert_eq!(
            bearer_from(&grpcio::MetadataBuilder::new().build()).unwrap(),
            None
        );
    }

    #[test]
    fn the_deny_list_refuses_valid_credentials_and_is_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny");
        std::fs::write(&path, "# revoked\nweb-2\n\nadmin:ops\n").unwrap();
        let a = Authenticator::new(TrustConfig {
            secret: Some(secret()),
            deny_list: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        let s = secret();
        let t1 = s.token(TokenKind::Agent, "web-1");
        let t2 = s.token(TokenKind::Agent, "web-2");
        assert!(a.agent(&call(None, Some(&t1), &[])).is_ok());
        assert!(is_denied(a.agent(&call(None, Some(&t2), &[]))));
        assert!(a.admin(Some(&s.token(TokenKind::Admin, "ops"))).is_err());
        // A changed file is noticed at the next check, whatever its mtime.
        std::fs::write(&path, "web-1\n").unwrap();
        a.refresh_deny_list();
        assert!(is_denied(a.agent(&call(None, Some(&t1), &[]))));
        assert!(a.agent(&call(None, Some(&t2), &[])).is_ok());
        assert!(Authenticator::new(TrustConfig {
            deny_list: Some(dir.path().join("missing")),
            ..Default::default()
        })
        .is_err());
    }
}
