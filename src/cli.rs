//! What the binaries share at their edge: logging set-up, flag value
//! parsers, signal handling (stop on SIGINT/SIGTERM, reload on SIGHUP) and
//! the exit-status contract (0 success, 2 usage error, 1 anything else).

use crate::dispatch::RetryBackoff;
use crate::error::Error;
use crate::shutdown::Shutdown;
use std::time::Duration;

/// Exit status for a usage error (bad flag or value), as clap uses too.
pub const EXIT_USAGE: i32 = 2;
/// Exit status for any other failure.
pub const EXIT_FAILURE: i32 = 1;

/// Logs to stderr; `RUST_LOG` overrides the default, which shows connections,
/// errors and the stats line (`info`; each task and result is a `debug` line)
/// but not gRPC's own chatter.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,grpcio=warn"))
        .format_timestamp_millis()
        .init();
}

/// Parses a duration in seconds (`5`, `0.25`) for flags like `--every`.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("{s:?} must be a number of seconds greater than 0"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `MIN..MAX` in seconds (`--retry-backoff 1..60`).
pub fn parse_secs_range(s: &str) -> Result<RetryBackoff, String> {
    let (min, max) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not MIN..MAX in seconds (e.g. 1..60)"))?;
    let (min, max) = (parse_secs(min)?, parse_secs(max)?);
    if min > max {
        return Err(format!("{s:?}: MIN is greater than MAX"));
    }
    Ok(RetryBackoff { min, max })
}

/// Parses a count that must be at least 1 (`--generate`, `--max-tasks`...).
pub fn parse_positive(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} must be a whole number of at least 1")),
    }
}

/// Fires `shutdown` on the first SIGINT or SIGTERM; a second one exits at once
/// (status 130), for an operator who does not want to wait.
pub fn stop_on_signals(shutdown: &Shutdown) -> Result<(), Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(Error::Thread)?;
    let shutdown = shutdown.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for (n, sig) in signals.forever().enumerate() {
                if n == 0 {
                    log::info!("signal {sig} received: stopping (send it again to exit at once)");
                    shutdown.trigger();
                } else {
                    log::warn!("second signal: exiting now");
                    std::process::exit(130);
                }
            }
        })
        .map_err(Error::Thread)?;
    Ok(())
}

/// Catches SIGHUP from now on (its default action ends the process): each
/// one is a message on the returned channel, for the server to reload its
/// credentials and settings. Hangups that come while one is waiting to be
/// handled are merged into it (one reload reads everything).
pub fn hangups() -> Result<crossbeam_channel::Receiver<()>, Error> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
        .map_err(Error::Thread)?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                if let Err(crossbeam_channel::TrySendError::Disconnected(())) = tx.try_send(()) {
                    return;
                }
            }
        })
        .map_err(Error::Thread)?;
    Ok(rx)
}

/// Ignores SIGXFSZ, whose default action kills the process: a write past
/// a file-size limit (`ulimit -f`) then fails with EFBIG ("File too large"),
/// an error the server handles like any other failed write.
pub fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal to SIG_IGN installs no handler code.
    unsafe {
        if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
            log::warn!("cannot ignore SIGXFSZ: a file-size limit would kill the server");
        }
    }
}

/// Raises the soft limit on open files to the hard limit, so that idle or
/// hostile connections cannot use up the few (often 1,024) a process starts with.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let before = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                log::info!("open file limit raised from {before} to {}", lim.rlim_max);
            } else {
                log::warn!("cannot raise the open file limit from {before}");
            }
        } else {
            log::debug!("open file limit: {}", lim.rlim_cur);
        }
    }
}

/// The exit status for an error that ends a binary.
pub fn exit_code(e: &Error) -> i32 {
    match e {
        Error::Usage(_) => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_counts_are_checked() {
        assert_eq!(parse_secs("0.25").unwrap(), Duration::from_millis(250));
        assert!(parse_secs("0").unwrap_err().contains("greater than 0"));
        assert!(parse_secs("soon").unwrap_err().contains("\"soon\""));
        assert!(parse_secs("NaN").is_err());
        assert_eq!(parse_positive("3").unwrap(), 3);
        assert!(parse_positive("0").is_err() && parse_positive("-1").is_err());
        assert_eq!(exit_code(&Error::Usage("x".into())), 2);
        let r = parse_secs_range("0.5..60").unwrap();
        assert_eq!(
            (r.min, r.max),
            (Duration::from_millis(500), Duration::from_secs(60))
        );
        assert!(parse_secs_range("5..1")
            .unwrap_err()
            .contains("greater than MAX"));
        assert!(parse_secs_range("5").unwrap_err().contains("MIN..MAX"));
        assert!(parse_secs_range("0..1").is_err());
        assert_eq!(exit_code(&Error::State("damaged".into())), 1);
    }
}
