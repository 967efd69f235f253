//! The crate-level error type: every failure a user can meet, worded so that
//! they know what to change (a flag, a file, the server address).

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What went wrong, with enough context to act on it.
#[derive(Debug)]
pub enum Error {
    /// The server could not listen on the address given with `--listen`.
    Bind { addr: String, reason: String },
    /// A file named on the command line could not be opened, read or written.
    File {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    /// A flag's value is unusable (caught after parsing, e.g. an empty `--exec`).
    Usage(String),
    /// The state directory cannot be used as it is: another server holds it,
    /// its journal is damaged, or it was written by a newer release.
    State(String),
    /// gRPC failed in a way that is not a plain "server unreachable".
    Grpc(grpcio::Error),
    /// A call to a server failed or was refused (`contact-ctl`): what was
    /// asked and the server's reason.
    Remote(String),
    /// A thread of ours could not be started.
    Thread(io::Error),
    /// The recording thread could not write (a full disk, an I/O error), so
    /// the server stopped; the cause was logged when it happened.
    Recording(Box<Error>),
}

impl Error {
    /// Wraps an I/O error on `path` with the action that failed ("open", "write"...).
    pub fn file(path: impl Into<PathBuf>, action: &'static str, source: io::Error) -> Error {
        Error::File {
            path: path.into(),
            action,
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, reason } => write!(
                f,
                "cannot listen on {addr}: {reason} (is another server running there? choose another --listen address)"
            ),
            Error::File { path, action, source } => {
                write!(f, "cannot {action} {}: {source}", path.display())
            }
            Error::Usage(msg) | Error::State(msg) | Error::Remote(msg) => write!(f, "{msg}"),
            Error::Grpc(e) => write!(f, "gRPC error: {e}"),
            Error::Thread(e) => write!(f, "cannot start a thread: {e}"),
            // The cause (`source`) was logged when it happened; not repeated.
            Error::Recording(_) => write!(
                f,
                "stopped because results could not be recorded (the error is logged above)"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::File { source, .. } => Some(source),
            Error::Grpc(e) => Some(e),
            Error::Thread(e) => Some(e),
            Error::Recording(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl From<grpcio::Error> for Error {
    fn from(e: grpcio::Error) -> Error {
        Error::Grpc(e)
    }
}
