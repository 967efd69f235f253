//! The server's HTTP/2 transport settings (gRPC C-core channel arguments):
//! message size limits, keepalive, and what one connection may hold, so
//! that ten thousand agents, or hostile peers, cannot make the server's
//! memory grow without bound.
//!
//! Per connection, C-core's memory is bounded by three settings: at most
//! `max_streams_per_connection` calls; each call's receive window stays at
//! its initial 64 KiB because BDP probing is off (with it on, windows grow
//! with the traffic, to megabytes per call: 90 status streams that never read
//! their replies held 3 GB of the server, see `tests/fleet.rs`; grpc-rs issue
//! 412 saw it at 10,000 connections); and a resource quota over all
//! connections (half the machine's memory), near which C-core reads in small
//! chunks and sends connections without calls away (GOAWAY) to reclaim memory.

use crate::server::{ServerConfig, MIN_CLIENT_PING};
use grpcio::{ChannelBuilder, Environment, ResourceQuota};
use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

/// The quota when the machine's memory cannot be read.
const FALLBACK_QUOTA_BYTES: usize = 1 << 30;

/// The channel arguments every incoming connection gets (for
/// `ServerBuilder::channel_args`, with `build_args`).
pub fn server_channel(env: Arc<Environment>, config: &ServerConfig) -> ChannelBuilder {
    let limits = config.transport;
    let millis = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    let max_msg = i32::try_from(config.max_message_bytes).unwrap_or(i32::MAX);
    let raw = |key: &str| CString::new(key).expect("no NUL");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let quota =
        ResourceQuota::new(Some("contact-server connections")).resize_memory(quota_bytes(&meminfo));
    ChannelBuilder::new(env)
        .max_receive_message_len(max_msg)
        .max_send_message_len(max_msg)
        .keepalive_time(config.keepalive)
        .keepalive_timeout(config.keepalive_timeout)
        .keepalive_permit_without_calls(true)
        // Accept client pings down to MIN_CLIENT_PING apart, so that a
        // client's keepalive never earns a GOAWAY "too_many_pings".
        .http2_min_recv_ping_interval_without_data(MIN_CLIENT_PING)
        // gRPC shares a busy port by default (SO_REUSEPORT): a second
        // server would silently split the fleet. Make it an error.
        .reuse_port(false)
        .max_concurrent_stream(i32::try_from(limits.max_streams_per_connection).unwrap_or(i32::MAX))
        .http2_bdp_probe(false)
        .set_resource_quota(quota)
        .raw_cfg_int(
            raw("grpc.max_connection_idle_ms"),
            millis(limits.idle_connection),
        )
        .raw_cfg_int(
            raw("grpc.server_handshake_timeout_ms"),
            millis(limits.handshake),
        )
}

/// Half the machine's memory (`MemTotal` in `/proc/meminfo`), or 1 GiB when unknown.
pub fn quota_bytes(meminfo: &str) -> usize {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<usize>().ok())
        .filter(|kib| *kib > 0)
        .map_or(FALLBACK_QUOTA_BYTES, |kib| kib.saturating_mul(1024) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_is_half_the_machine_or_a_gibibyte_when_unknown() {
        let meminfo = "MemTotal:       24684544 kB\nMemFree:         2692368 kB\n";
        assert_eq!(quota_bytes(meminfo), 24684544 * 1024 / 2);
        assert_eq!(quota_bytes(""), 1 << 30);
        assert_eq!(quota_bytes("MemTotal: lots kB\n"), 1 << 30);
        assert_eq!(quota_bytes("MemTotal: 0 kB\n"), 1 << 30);
    }
}
