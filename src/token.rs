//! Credentials without certificates: a `Secret` known only to the server, and
//! tokens derived from it, each bound to one agent id (or one admin name).
//! A token is `contact1.<kind>.<name>.<mac>`, where the MAC is HMAC-SHA256 of
//! the kind and name under the secret: the server checks a token by
//! recomputing it (in constant time), so it needs no token database, and an
//! agent's token can never pass as an admin's. Revocation is a deny list of
//! names (see `trust`); rotating the secret revokes every token at once.

use crate::error::Error;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use std::path::Path;

/// Fewest bytes a secret file may hold (after trimming whitespace).
pub const MIN_SECRET_BYTES: usize = 16;

const PREFIX: &str = "contact1";

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An agent: may call the `Contact` service as the id in the token.
    Agent,
    /// An operator: may call the admin API, never the `Contact` service as an agent.
    Admin,
}

impl TokenKind {
    fn label(self) -> &'static str {
        match self {
            TokenKind::Agent => "agent",
            TokenKind::Admin => "admin",
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The server's secret. Its `Debug` form never shows the bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret from bytes (surrounding whitespace is not part of it).
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret is {} bytes long; it needs at least {MIN_SECRET_BYTES} (make one with: head -c 32 /dev/urandom | base64 > FILE)",
                trimmed.len()
            ));
        }
        Ok(Secret(trimmed.to_vec()))
    }

    /// Reads the secret file given with `--auth-secret`; warns when other users can read it.
    pub fn load(path: &Path) -> Result<Secret, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, "read the secret", e))?;
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "secret file {} can be read by other users: chmod 600 it",
                    path.display()
                );
            }
        }
        Secret::from_bytes(&bytes)
            .map_err(|why| Error::Usage(format!("--auth-secret {}: {why}", path.display())))
    }

    /// Whether `other` holds the same bytes (then it issues the same tokens).
    pub fn same_as(&self, other: &Secret) -> bool {
        self.0 == other.0
    }

    fn mac(&self, kind: TokenKind, name: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(PREFIX.as_bytes());
        mac.update(b"\0");
        mac.update(kind.label().as_bytes());
        mac.update(b"\0");
        mac.update(name.as_bytes());
        mac
    }

    /// The token of `name` as `kind`.
    pub fn token(&self, kind: TokenKind, name: &str) -> String {
        let tag = self.mac(kind, name).finalize().into_bytes();
        format!("{PREFIX}.{kind}.{name}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks a token: its kind and name if it was made with this secret.
    pub fn verify(&self, token: &str) -> Result<(TokenKind, String), TokenError> {
        let (kind, name, tag) = parse(token)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(kind, name)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        Ok((kind, name.to_string()))
    }
}

/// Why a token was not accepted (worded for a status message: never echoes the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the form `contact1.<kind>.<name>.<mac>`.
    Malformed,
    /// Well formed, but not made with this server's secret (or altered).
    BadSignature,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed => f.write_str(
                "the token is malformed (expected contact1.<kind>.<name>.<signature>, as printed by `contact-server token`)",
            ),
            TokenError::BadSignature => f.write_str(
                "the token was not issued by this server's secret (or was altered)",
            ),
        }
    }
}

/// Splits a token into kind, name and signature without checking the signature.
fn parse(token: &str) -> Result<(TokenKind, &str, &str), TokenError> {
    let rest = token
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or(TokenError::Malformed)?;
    let (kind, rest) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let kind = match kind {
        "agent" => TokenKind::Agent,
        "admin" => TokenKind::Admin,
        _ => return Err(TokenError::Malformed),
    };
    let (name, tag) = rest.rsplit_once('.').ok_or(TokenError::Malformed)?;
    if name.is_empty() || tag.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok((kind, name, tag))
}

/// The agent id a token names, unchecked: what an agent without `--id` calls itself.
pub fn agent_id_of(token: &str) -> Option<&str> {
    match parse(token) {
        Ok((TokenKind::Agent, name, _)) => Some(name),
        _ => None,
    }
}

/// An agent's token as the client holds it: its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token from `--token-file` or `CONTACT_TOKEN`: printable ASCII, no spaces.
    pub fn new(text: &str) -> Result<Token, Error> {
        let t = text.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Usage(
                "the token must be printable ASCII without spaces (as printed by `contact-server token`)".into(),
            ));
        }
        Ok(Token(t.to_string()))
    }

    /// The text to send as `authorization: Bearer <text>`.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match agent_id_of(&self.0) {
            Some(id) => write!(f, "Token(agent {id:?}, redacted)"),
            None => f.write_str("Token(redacted)"),
        }
    }
}

/// Reads an agent's token from `--token-file` (surrounding whitespace dropped).
pub fn read_token_file(path: &Path) -> Result<Token, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, "read the token", e))?;
    Token::new(&text).map_err(|e| Error::Usage(format!("--token-file {}: {e}", path.display())))
}

/// The token from `--token-file` when given, else from the environment
/// variable `var` (unset or blank: none).
pub fn token_from(file: Option<&Path>, var: &str) -> Result<Option<Token>, Error> {
    if let Some(path) = file {
        return read_token_file(path).map(Some);
    }
    match std::env::var(var) {
        Ok(t) if !t.trim().is_empty() => Token::new(&t)
            .map(Some)
            .map_err(|e| Error::Usage(format!("{var}: {e}"))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> Secret {
        Secret::from_bytes(b"0123456789abcdef-test-secret").unwrap()
    }

    #[test]
    fn tokens_verify_for_their_kind_and_name_only() {
        let s = secret();
        let t = s.token(TokenKind::Agent, "web-1");
        assert!(t.starts_with("contact1.agent.web-1."));
        assert_eq!(s.verify(&t).unwrap(), (TokenKind::Agent, "web-1".into()));
        let admin = s.token(TokenKind::Admin, "web-1");
        assert_ne!(t, admin);
        assert_eq!(s.verify(&admin).unwrap().0, TokenKind::Admin);
        // Changing the kind or the name breaks the signature.
        let forged = t.replacen("agent", "admin", 1);
        assert_eq!(s.verify(&forged), Err(TokenError::BadSignature));
        let forged = t.replacen("web-1", "web-2", 1);
        assert_eq!(s.verify(&forged), Err(TokenError::BadSignature));
        // Another secret's tokens are refused.
        let other = Secret::from_bytes(b"another secret of enough bytes").unwrap();
        assert_eq!(other.verify(&t), Err(TokenError::BadSignature));
    }

    #[test]
    fn names_with_dots_and_colons_round_trip() {
        let s = secret();
        for name in ["a.b.c", "host:1", "x"] {
            let t = s.token(TokenKind::Agent, name);
            assert_eq!(s.verify(&t).unwrap().1, name);
            assert_eq!(agent_id_of(&t), Some(name));
        }
        assert_eq!(agent_id_of(&s.token(TokenKind::Admin, "ops")), None);
    }

    #[test]
    fn a_held_token_never_shows_in_debug_output() {
        let t = Token::new(&secret().token(TokenKind::Agent, "web-1")).unwrap();
        let shown = format!("{t:?}");
        assert!(
            shown.contains("web-1") && !shown.contains(t.expose()),
            "{shown}"
        );
        assert!(Token::new(" has space ").is_err() && Token::new("").is_err());
    }

    #[test]
    fn short_secrets_and_malformed_tokens_are_named() {
        assert!(Secret::from_bytes(b"  short \n")
            .unwrap_err()
            .contains("5 bytes"));
        let s = secret();
        for bad in [
            "",
            "contact1",
            "contact1.agent",
            "contact1.agent.x",
            "contact1.root.x.AAAA",
            "contact2.agent.x.AAAA",
            "contact1.agent..AAAA",
            "contact1.agent.x.",
            "contact1.agent.x.!!!",
        ] {
            assert_eq!(s.verify(bad), Err(TokenError::Malformed), "{bad:?}");
        }
        assert!(!format!("{s:?}").contains("0123"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_panics_and_never_verifies(t in ".{0,120}") {
            prop_assert!(secret().verify(&t).is_err());
            let _ = agent_id_of(&t);
        }

        #[test]
        fn every_issued_token_verifies_and_every_altered_one_fails(
            name in "[!-~]{1,64}", admin: bool, pos in any::<prop::sample::Index>(), byte in 0x21u8..0x7f,
        ) {
            let s = secret();
            let kind = if admin { TokenKind::Admin } else { TokenKind::Agent };
            let t = s.token(kind, &name);
            prop_assert_eq!(s.verify(&t), Ok((kind, name.clone())));
            let mut bytes = t.clone().into_bytes();
            let i = pos.index(bytes.len());
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            let altered = String::from_utf8(bytes).unwrap();
            // An altered token may still parse (e.g. a changed name), but never
            // verifies as anything it was not issued for.
            if let Ok((k, n)) = s.verify(&altered) {
                prop_assert!(s.token(k, &n) == altered);
            }
        }
    }
}
