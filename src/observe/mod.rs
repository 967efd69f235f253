//! Seeing a running server from outside, apart from the admin API: its
//! health (the gRPC health service and `/readyz`), its metrics in the
//! Prometheus format, and a live web view — all but the gRPC health
//! service served on `--metrics-listen` by [`port::MetricsPort`].

pub mod health;
pub mod metrics;
pub mod port;
pub mod webview;
