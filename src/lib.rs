//! edgehub: the edge half of KubeEdge's cloud–edge link, as a small synchronous agent.
//!
//! One mutual-TLS WebSocket to CloudHub carries JSON messages both ways (`message`). The thread
//! model, all of it:
//!
//! ```text
//!  eh-supervisor ── dial (link) ── session (thread::scope) ─────────────── joins all, waits 2×hb
//!                                   ├─ eh-reader:    poll → frames → Message::decode → Router
//!                                   ├─ eh-writer:    Outbox (urgent, then rate-limited) → socket
//!                                   │                (a pushing thread writes itself when it is idle)
//!                                   └─ eh-heartbeat: keepalive every heartbeat, WS ping every rd/3
//!  Router ── meta / twin / bus / taskmanager ──▶ module inbox (bounded) ──▶ eh-<module> thread
//!       └─ responses ──▶ Pending (request/response)      module ── Hub::send / ack / request ──▶ Outbox
//! ```
//!
//! Files, one concern each:
//! - the link: `link` (TLS + WebSocket, shared by reader and writer), `session` (supervisor and
//!   session threads), `message` (wire model), `router` (dispatch table, pending requests,
//!   re-sends), `outbox` (the bounded upstream queue: confirmation, TTL, latest-wins, full policy),
//!   `spool` (its disk copy) and `writer` (outbox → link, by the writer thread or the pushing one);
//! - edge modules: `modules` (module threads and the `Hub`), `modules::meta_store` (the durable
//!   resource store that ACKs), `modules::node` (the Node object: registration, status, pods),
//!   `modules::node_status` (host facts), `modules::local_api` (the Unix socket for apps and
//!   mappers) with its client `local_client`;
//! - devices (issue 13): `mqtt` (the client to the local broker: `eh-mqtt` and `eh-mqtt-read`,
//!   its codec and connection), `modules::event_bus` (MQTT ⇄ cloud; owns `bus` when a broker or the
//!   ServiceBus is configured, forwarding to the local API) and `modules::service_bus` (cloud
//!   requests to local HTTP services on `eh-servicebus`), `modules::device_twin` (KubeEdge's
//!   DeviceTwin for mappers on `eh-twin`, owning `twin` when a broker is configured: its rules as
//!   plain functions, its durable device store, and a newer cloud's Device objects);
//! - certificates: `certs` (join with a token, expiry check, rotation, the pair store);
//! - the process: `config`, `cli`, `agent` (assembly, start/stop order, reload), `status`
//!   (counters), `logging`, `error`, `dirs` (private directories whose creation is durable);
//! - system calls std lacks, the only `unsafe`: `poll` (readiness), `signals` (sigwait), `disk`
//!   (statvfs).
//!
//! `cloudsim` (feature `cloudsim`) is a CloudHub simulator with a certificate server, used by the
//! tests, the demo and the benchmarks; it is never in the device binary.

#![deny(unsafe_code)]

pub mod agent;
pub mod certs;
pub mod cli;
pub mod config;
pub mod dirs;
pub mod disk;
pub mod error;
pub mod link;
pub mod local_client;
pub mod logging;
pub mod message;
pub mod modules;
pub mod mqtt;
pub mod outbox;
mod poll;
pub mod router;
pub mod session;
pub mod signals;
pub mod spool;
pub mod status;
pub mod writer;

#[cfg(feature = "cloudsim")]
pub mod cloudsim;

pub use agent::Agent;
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use message::Message;
