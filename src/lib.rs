//! `contact` pushes tasks from a gRPC server to clients that can only dial
//! out, and reliably collects their results.
//!
//! gRPC is request/response, so the push rides on a server-streaming call: a
//! client "registers" with an empty `getTask` request and the server keeps
//! that stream open, writing a task into it whenever it has one. Results come
//! back over `tellResult`, status over `sendStatus`. The wire protocol is the
//! original Python article's, extended only with new fields (see `proto`).
//!
//! Modules, one concept each: [`server`] (the gRPC service and its
//! lifecycle), [`dispatch`] (who gets which task, and matching results),
//! [`registry`] (connected clients), [`task`] (tasks and the retained log),
//! [`workqueue`] (unfinished tasks of queue dispatch, and fencing),
//! [`feed`] (the channel from dispatcher to a client's stream), [`producer`]
//! (task sources), [`results`] (what is recorded, and the handle to record
//! it), [`recorder`] (the thread that writes it), [`journal`] (durable
//! state), [`client`] (the agent
//! side), [`handler`] (what an agent does with a task), [`backoff`],
//! [`shutdown`] and [`error`]. Trust: [`listen`] (what address, reachable
//! by whom), [`tls`], [`token`] and [`trust`] (who is calling), [`reload`]
//! (new credentials on SIGHUP), [`budget`]
//! (stale results an agent may send) and [`logtext`] (peer text in logs).
//! [`loadgen`] is the load generator behind `contact-load` (a fleet of
//! agents on few connections, for measurements).

pub mod admin;
pub mod backoff;
pub mod budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod ctl;
pub mod dispatch;
pub mod error;
pub mod feed;
pub mod handler;
pub mod jobs;
pub mod journal;
pub mod labels;
pub mod listen;
pub mod loadgen;
pub mod logtext;
pub mod observe;
pub mod producer;
pub mod proto;
pub mod recorder;
pub mod registry;
pub mod reload;
pub mod replica;
pub mod results;
pub mod server;
pub mod shutdown;
pub mod task;
pub mod tls;
pub mod token;
pub mod top;
pub mod transport;
pub mod trust;
pub mod unixtime;
pub mod watch;
pub mod workqueue;

pub use error::Error;
