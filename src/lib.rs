//! edgehub: the edge half of KubeEdge's cloud–edge link, as a small synchronous agent.
//!
//! One mutual-TLS WebSocket to CloudHub carries JSON messages both ways (`message`). The thread
//! model, all of it:
//!
//! ```text
//!  eh-supervisor ── dial (link) ── session (thread::scope) ─────────────── joins all, waits 2×hb
//!                                   ├─ eh-reader:    poll → frames → Message::decode → Router
//!                                   ├─ eh-writer:    Outbox (urgent, then rate-limited) → socket
//!                                   └─ eh-heartbeat: keepalive every heartbeat, WS ping every rd/3
//!  Router ── meta / twin / bus / taskmanager ──▶ module inbox (bounded) ──▶ eh-<module> thread
//!       └─ responses ──▶ Pending (request/response)      module ── Hub::send / ack / request ──▶ Outbox
//! ```
//!
//! Files, one concern each: `config` (the JSON file, defaults, validation), `message` (wire
//! model), `link` (TLS + WebSocket, shared by reader and writer), `poll` (readiness, the only
//! `unsafe`), `session` (supervisor and session threads), `router` (dispatch table, pending
//! requests), `outbox` (the bounded upstream queue: TTL, latest-wins, full policy), `spool` (its disk copy), `modules` (module threads and the `Hub`;
//! `modules::meta_store` the durable resource store that ACKs, `modules::node_status` the status
//! reporter),
//! `agent` (assembly, start/stop order), `status` (counters), `cli` (command line),
//! `error` (the error type). `cloudsim` (feature `cloudsim`) is a CloudHub simulator for tests,
//! the demo and benchmarks; it is never in the device binary.

#![deny(unsafe_code)]

pub mod agent;
pub mod certs;
pub mod cli;
pub mod config;
pub mod error;
pub mod link;
pub mod local_client;
pub mod logging;
pub mod message;
pub mod modules;
pub mod outbox;
mod poll;
pub mod router;
pub mod session;
pub mod signals;
pub mod spool;
pub mod status;

#[cfg(feature = "cloudsim")]
pub mod cloudsim;

pub use agent::Agent;
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use message::Message;
