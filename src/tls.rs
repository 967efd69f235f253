//! TLS for both ends, on grpcio's secure credentials (OpenSSL): the server's
//! certificate and key, and with a client CA, mutual TLS where every agent
//! must present a certificate that CA signed; the agent's trust anchor, its
//! own certificate for mutual TLS, and a server-name override. PEM files are
//! checked here so that a wrong file is named at start, not at a handshake.
//! It also reads the names a verified client certificate carries (CN and
//! SANs), which `trust` takes as the agent's id. The server's files can be
//! read again while it runs (`CertificateReloader`, on SIGHUP) for the
//! handshakes that follow. And it makes the gRPC
//! environment every process uses, with OpenSSL told to keep its state until
//! the process is gone.

use crate::error::Error;
use grpcio::{
    CertificateRequestType, ChannelCredentials, ChannelCredentialsBuilder, EnvBuilder, Environment,
    RpcContext, ServerCredentials, ServerCredentialsBuilder, ServerCredentialsFetcher,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};

/// The gRPC environment (completion queues and their polling threads, named
/// `NAME-N`) of this process. Made here so that OpenSSL is first told not to
/// free its global state at exit (`OPENSSL_INIT_NO_ATEXIT`): by default its
/// exit handler frees it while gRPC's threads may still be ending a TLS
/// connection, and a process that returned from `main` then died of a
/// segmentation fault in libcrypto — the agent after `--max-tasks`, the
/// server after SIGTERM — about once in thirty TLS runs.
pub fn grpc_environment(completion_queues: usize, name: &str) -> Arc<Environment> {
    static KEEP_OPENSSL: Once = Once::new();
    KEEP_OPENSSL.call_once(|| {
        const OPENSSL_INIT_NO_ATEXIT: u64 = 0x0008_0000;
        extern "C" {
            // libcrypto, linked through grpcio-sys's `openssl` feature.
            fn OPENSSL_init_crypto(opts: u64, settings: *const libc::c_void) -> libc::c_int;
        }
        // SAFETY: documented as callable at any time from any thread, with
        // NULL settings; it only sets how OpenSSL initialises and exits.
        if unsafe { OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, std::ptr::null()) } != 1 {
            log::warn!("OpenSSL refused OPENSSL_INIT_NO_ATEXIT: a TLS process may crash at exit");
        }
    });
    Arc::new(
        EnvBuilder::new()
            .cq_count(completion_queues)
            .name_prefix(name)
            .build(),
    )
}

/// The server's side: `--tls-cert`, `--tls-key` and optionally `--client-ca`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The agent's side: `--tls-ca`, `--tls-cert`/`--tls-key`, `--tls-server-name`.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA that signed the server's certificate; `None` uses the system's roots.
    pub ca: Option<PathBuf>,
    /// The agent's certificate and key, for a server that requires mutual TLS.
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// Name to expect in the server's certificate instead of the host of
    /// each `--server` entry.
    pub server_name: Option<String>,
}

/// Reads a PEM file and checks that it holds what `what` says: "CERTIFICATE"
/// (not a request), or "PRIVATE KEY" (PKCS#8, EC or RSA; not encrypted).
fn read_pem(path: &Path, flag: &str, what: &str) -> Result<Vec<u8>, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, "read", e))?;
    let text = String::from_utf8_lossy(&bytes);
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .collect();
    if labels.contains(&"ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(Error::Usage(format!(
            "{flag} {}: the key is encrypted; give a key without a passphrase (mode 600)",
            path.display()
        )));
    }
    let wanted: &[&str] = match what {
        "CERTIFICATE" => &["CERTIFICATE"],
        _ => &["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"],
    };
    let holds = labels.iter().any(|l| wanted.contains(l));
    if !holds || bytes.contains(&0) {
        return Err(Error::Usage(format!(
            "{flag} {}: not a PEM file with a {what} (-----BEGIN ...{what}-----)",
            path.display()
        )));
    }
    Ok(bytes)
}

impl ServerTls {
    /// The server credentials, after checking every file, and the handle
    /// that replaces the certificate, key and client CA for the handshakes
    /// that follow (connections already made keep theirs).
    pub fn credentials(&self) -> Result<(ServerCredentials, CertificateReloader), Error> {
        let reloader = CertificateReloader {
            pending: Arc::new(Mutex::new(Some(self.read()?))),
            mutual: self.client_ca.is_some(),
        };
        let request = if reloader.mutual {
            CertificateRequestType::RequestAndRequireClientCertificateAndVerify
        } else {
            CertificateRequestType::DontRequestClientCertificate
        };
        let fetcher = PendingCertificates(reloader.pending.clone());
        Ok((
            ServerCredentials::with_fetcher(Box::new(fetcher), request),
            reloader,
        ))
    }

    /// Reads and checks every file.
    fn read(&self) -> Result<ServerPems, Error> {
        Ok(ServerPems {
            cert: read_pem(&self.cert, "--tls-cert", "CERTIFICATE")?,
            key: read_pem(&self.key, "--tls-key", "PRIVATE KEY")?,
            client_ca: match &self.client_ca {
                Some(ca) => Some(read_pem(ca, "--client-ca", "CERTIFICATE")?),
                None => None,
            },
        })
    }
}

/// The PEM files of the server's side, read and checked.
struct ServerPems {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// Replaces the server's certificate, key and client CA while it runs
/// (SIGHUP): gRPC asks for them before each handshake (see
/// `PendingCertificates`), so new connections get the new ones and
/// connections already made are not touched.
#[derive(Clone)]
pub struct CertificateReloader {
    pending: Arc<Mutex<Option<ServerPems>>>,
    mutual: bool,
}

impl CertificateReloader {
    /// Reads and checks `tls`'s files, to be served from the next handshake
    /// on; if one cannot be read, nothing changes. Whether client
    /// certificates are required is fixed at start: adding or removing
    /// `--client-ca` needs a restart. (A key that does not match its
    /// certificate passes this check; gRPC then logs the error and keeps
    /// the previous pair.)
    pub fn reload(&self, tls: &ServerTls) -> Result<(), Error> {
        if tls.client_ca.is_some() != self.mutual {
            return Err(Error::Usage(
                "adding or removing --client-ca changes what agents must present: it needs a restart".into(),
            ));
        }
        let pems = tls.read()?;
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(pems);
        Ok(())
    }
}

/// What gRPC calls before each handshake (on its own threads: only a lock
/// and no file is touched here): the files read at start or at the last
/// reload, once, and then "unchanged".
struct PendingCertificates(Arc<Mutex<Option<ServerPems>>>);

impl ServerCredentialsFetcher for PendingCertificates {
    fn fetch(&self) -> Result<Option<ServerCredentialsBuilder>, Box<dyn std::error::Error>> {
        let Some(p) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(None);
        };
        let mut b = ServerCredentialsBuilder::new().add_cert(p.cert, p.key);
        if let Some(ca) = p.client_ca {
            b = b.root_cert(
                ca,
                CertificateRequestType::RequestAndRequireClientCertificateAndVerify,
            );
        }
        Ok(Some(b))
    }
}

impl ClientTls {
    /// The channel credentials, after checking every file.
    pub fn credentials(&self) -> Result<ChannelCredentials, Error> {
        let mut b = ChannelCredentialsBuilder::new();
        if let Some(ca) = &self.ca {
            b = b.root_cert(read_pem(ca, "--tls-ca", "CERTIFICATE")?);
        }
        if let Some((cert, key)) = &self.cert_key {
            b = b.cert(
                read_pem(cert, "--tls-cert", "CERTIFICATE")?,
                read_pem(key, "--tls-key", "PRIVATE KEY")?,
            );
        }
        Ok(b.build())
    }
}

/// The names a verified client certificate gives its holder: the common name
/// first, then every subject alternative name. Empty without mutual TLS.
pub fn peer_cert_names(ctx: &RpcContext) -> Vec<String> {
    let Some(auth) = ctx.auth_context() else {
        return vec![];
    };
    if !auth.peer_is_authenticated() {
        return vec![];
    }
    let mut cn = vec![];
    let mut sans = vec![];
    for p in &auth {
        let Ok(value) = p.value_str() else { continue };
        match p.name() {
            "x509_common_name" => cn.push(value.to_string()),
            "x509_subject_alternative_name" => sans.push(value.to_string()),
            _ => {}
        }
    }
    for san in sans {
        if !cn.contains(&san) {
            cn.push(san);
        }
    }
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_files_are_named_before_any_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let tls = ServerTls {
            cert: junk.clone(),
            key: junk.clone(),
            client_ca: None,
        };
        let e = tls.credentials().err().unwrap().to_string();
        assert!(e.contains("--tls-cert") && e.contains("junk.pem"), "{e}");
        let missing = ClientTls {
            ca: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        let e = missing.credentials().err().unwrap().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        let key_as_cert = dir.path().join("key.pem");
        std::fs::write(
            &key_as_cert,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(read_pem(&key_as_cert, "--tls-ca", "CERTIFICATE").is_err());
        assert!(read_pem(&key_as_cert, "--tls-key", "PRIVATE KEY").is_ok());
        let csr = dir.path().join("req.pem");
        std::fs::write(
            &csr,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .unwrap();
        assert!(read_pem(&csr, "--tls-cert", "CERTIFICATE").is_err());
        let enc = dir.path().join("enc.pem");
        std::fs::write(
            &enc,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = read_pem(&enc, "--tls-key", "PRIVATE KEY")
            .unwrap_err()
            .to_string();
        assert!(e.contains("encrypted"), "{e}");
    }
}
