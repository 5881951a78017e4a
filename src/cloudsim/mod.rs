//! A CloudHub simulator for tests, the demo and benchmarks (feature `cloudsim`): a mutual-TLS
//! WebSocket server that accepts edges the way CloudHub does (protocol §2, §4) and reports
//! everything it sees as [`SimEvent`]s. It owns the accept loop, the node table and the public
//! handle; each connection's reading and writing lives in `conn`, the per-node queue rules in
//! `queues`, certificate minting in `pki`, and CloudHub's certificate HTTPS server (join and
//! rotation, its own port) in `certserver`. It is a test tool, never part of the device binary.
//!
//! Thread model: one `sim-accept` thread, and one `sim-conn` thread per TCP connection that does
//! the TLS and WebSocket handshakes and then both reads and writes. [`CloudSim::stop`] (or drop)
//! stops the accept loop, shuts every socket down and joins every thread.

pub mod certserver;
mod conn;
pub mod devicecontroller;
pub mod edgecontroller;
pub mod load;
pub mod pki;
mod queues;

// Answers to queries for objects put in the cloud.
mod objects;

pub use certserver::{CertServer, CertServerConfig};
pub use load::{LoadConfig, SendClass};
pub use pki::{Pki, PkiPaths};
pub use queues::Class;

use crate::error::{ErrorKind, Result};
use crate::message::Message;
use conn::ConnCtl;
use crossbeam_channel::{Receiver, Sender};
use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use queues::{AckTiming, Downstream, NodeQueues};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// CloudHub's `keepaliveInterval` default (protocol §4.3).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long CloudHub waits for an ACK before writing the message again (protocol §4.4).
pub const DEFAULT_ACK_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Writes of one ack-queue message before CloudHub gives up on it for a while (protocol §4.4).
pub const DEFAULT_ACK_MAX_WRITES: u32 = 5;
/// How long ref CloudHub rests after giving up on a message (protocol §4.4).
pub const DEFAULT_ACK_REQUEUE_DELAY: Duration = Duration::from_secs(2);
/// gorilla's write buffer size, which is where large messages get split (protocol §2.4).
pub const DEFAULT_FRAGMENT_BYTES: usize = 4096;
/// Largest upstream message accepted. CloudHub has no limit (protocol §2.7); this bounds memory.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Ack-queue messages in flight per node: CloudHub sends the next only once the last is ACKed.
pub const DEFAULT_ACK_WINDOW: usize = 1;

/// How the simulator listens and behaves. Build with [`SimConfig::new`] and change fields.
#[derive(Clone)]
pub struct SimConfig {
    /// Where to listen; port 0 picks a free port (see [`CloudSim::addr`]). Default `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// The only CA client certificates are verified against (PEM).
    pub ca_pem: Vec<u8>,
    /// The server certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// The server key (PEM, SEC1 or PKCS#8).
    pub key_pem: Vec<u8>,
    /// Closes a connection that sent no `keepalive` for this long. Default 30 s.
    pub keepalive_timeout: Duration,
    /// Wait for an ACK before writing an ack-queue message again. Default 5 s.
    pub ack_retry_interval: Duration,
    /// Total writes of one ack-queue message before giving up on it for now. Default 5.
    pub ack_max_writes: u32,
    /// Rest after a give-up before the ack queue moves on. Default 2 s.
    pub ack_requeue_delay: Duration,
    /// Downstream messages longer than this go out as a text frame plus continuation frames of
    /// this size. Default 4096.
    pub fragment_size: usize,
    /// Largest upstream message (and frame) accepted. Default 64 MiB.
    pub max_message_size: usize,
    /// Ack-queue messages written before their ACKs come back, per node. Default 1, which is
    /// CloudHub; more lets a benchmark push without waiting for ACKs (each message still resends
    /// on its own timer until ACKed).
    pub ack_window: usize,
    /// Load mode for benchmarks (`load`): generate downstream bench messages, answer bench
    /// requests, read in 1 ms slices. Default `None`.
    pub load: Option<LoadConfig>,
    /// Run the edgecontroller side of the node lifecycle (`edgecontroller`): answer
    /// registrations and status updates and hold the Node objects. Default true.
    pub edgecontroller: bool,
    /// Also send each node its own Node object (`update` of `null/node/<n>`, ack queue) after
    /// every change, as a HEAD cloud does (edge-node §1.6). Default false (REF).
    pub head_node_updates: bool,
}

impl SimConfig {
    /// A configuration with the given TLS material and CloudHub's defaults for everything else.
    pub fn new(ca_pem: Vec<u8>, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> SimConfig {
        SimConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            ca_pem,
            cert_pem,
            key_pem,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            ack_retry_interval: DEFAULT_ACK_RETRY_INTERVAL,
            ack_max_writes: DEFAULT_ACK_MAX_WRITES,
            ack_requeue_delay: DEFAULT_ACK_REQUEUE_DELAY,
            fragment_size: DEFAULT_FRAGMENT_BYTES,
            max_message_size: DEFAULT_MAX_MESSAGE_BYTES,
            ack_window: DEFAULT_ACK_WINDOW,
            load: None,
            edgecontroller: true,
            head_node_updates: false,
        }
    }

    fn ack_timing(&self) -> AckTiming {
        AckTiming {
            retry_interval: self.ack_retry_interval,
            max_writes: self.ack_max_writes.max(1),
            requeue_delay: self.ack_requeue_delay,
            window: self.ack_window.max(1),
        }
    }
}

impl fmt::Debug for SimConfig {
    /// Leaves out the PEM material (the key is a secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("listen", &self.listen)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .field("ack_retry_interval", &self.ack_retry_interval)
            .field("ack_max_writes", &self.ack_max_writes)
            .field("ack_requeue_delay", &self.ack_requeue_delay)
            .field("fragment_size", &self.fragment_size)
            .field("max_message_size", &self.max_message_size)
            .field("ack_window", &self.ack_window)
            .field("load", &self.load)
            .field("edgecontroller", &self.edgecontroller)
            .field("head_node_updates", &self.head_node_updates)
            .finish_non_exhaustive()
    }
}

/// Something the simulator saw or did. Serialises as one JSON object tagged `"event"` (snake
/// case), which is what the `edgehub-cloudsim` binary prints.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SimEvent {
    /// A node finished the handshakes with `ConnectionUse: msg` and its queues now flow.
    Connected {
        node: String,
        project: String,
        path: String,
        /// Every request header, names in lower case.
        headers: Vec<(String, String)>,
        /// The CN of the verified client certificate.
        client_cn: String,
    },
    /// A connection was refused: TLS failure, missing `node_id`, missing `ConnectionUse: msg`.
    Rejected { reason: String },
    /// An upstream message, keepalives and ACKs included.
    Received {
        node: String,
        msg: Message,
        #[serde(skip)]
        at: Instant,
    },
    /// An upstream frame that is not a message (the real cloud would drop the connection).
    Malformed { node: String, error: String },
    /// An upstream `response` closed the node's in-flight ack-queue message.
    Ack { node: String, parent_id: String },
    /// A node's connection ended: `keepalive timeout`, `replaced`, `cut`, `eof`, `read error: …`, …
    Disconnected { node: String, reason: String },
    /// A downstream write. Ack-queue resends carry attempt 2, 3, …; raw frames have an empty ID.
    Sent {
        node: String,
        msg_id: String,
        attempt: u32,
        /// When the write finished (for latency measurements).
        #[serde(skip)]
        at: Instant,
    },
    /// An ack-queue message went unacknowledged `ack_max_writes` times; it was put at the back of
    /// the queue and the queue rests for `ack_requeue_delay`.
    GaveUp { node: String, msg_id: String },
    /// A pushed message CloudHub would not deliver (no resourceversion and not a delete).
    Dropped { node: String, msg_id: String, reason: String },
    /// A WebSocket ping frame arrived (it is answered with a pong).
    Ping { node: String },
    /// The Node object as the cloud now holds it (`edgecontroller`): `action` is `created`,
    /// `status`, `labels`, `deleted` or `shown` (asked for).
    NodeObject { node: String, action: String, object: serde_json::Value },
    /// A pod bound to a node changed on the cloud side: `bound`, `deleting`, `status`, `deleted`.
    Pod { node: String, action: String, object: serde_json::Value },
}

/// The running simulator. Dropping it stops it, like [`CloudSim::stop`].
pub struct CloudSim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    events_rx: Receiver<SimEvent>,
    accept_thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for CloudSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudSim").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// State shared by the handle, the accept thread and the connection threads.
struct Shared {
    cfg: SimConfig,
    acceptor: SslAcceptor,
    /// Objects the cloud answers queries for ([`CloudSim::put_object`]).
    objects: objects::Objects,
    /// Unbounded: the simulator is a test tool and must never block on a slow test reading events.
    events_tx: Sender<SimEvent>,
    stopping: AtomicBool,
    next_conn_id: AtomicU64,
    /// Node table. Held only for short bookkeeping, never across socket I/O.
    nodes: Mutex<HashMap<String, Node>>,
    /// Every live connection, so stop can shut them all down (including mid-handshake ones).
    conns: Mutex<HashMap<u64, Arc<ConnCtl>>>,
    /// Connection threads not yet joined.
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Node objects and bound pods, when `SimConfig::edgecontroller` is set.
    edgecontroller: Mutex<edgecontroller::EdgeController>,
}

/// One node: its queues, which outlive connections, and its current connection.
#[derive(Default)]
struct Node {
    queues: NodeQueues,
    conn: Option<Arc<ConnCtl>>,
}

impl Shared {
    fn emit(&self, event: SimEvent) {
        log::debug!("cloudsim event {event:?}");
        // Cannot fail while the CloudSim (which holds a receiver) is alive.
        let _ = self.events_tx.send(event);
    }

    fn nodes(&self) -> MutexGuard<'_, HashMap<String, Node>> {
        lock(&self.nodes)
    }

    /// Queues `msg` for `node` by CloudHub's rules (see [`CloudSim::push`]).
    fn push(&self, node: &str, mut msg: Message) {
        let internal_prefix = format!("node/{node}/");
        if let Some(rest) = msg.route.resource.strip_prefix(&internal_prefix) {
            msg.route.resource = rest.to_owned();
        }
        match queues::classify(&msg) {
            Class::NoAck => {
                self.nodes()
                    .entry(node.to_owned())
                    .or_default()
                    .queues
                    .push_no_ack(Downstream::message(&msg));
            }
            Class::Ack => {
                self.nodes().entry(node.to_owned()).or_default().queues.push_ack(msg);
            }
            Class::Drop(reason) => self.emit(SimEvent::Dropped {
                node: node.to_owned(),
                msg_id: msg.header.id.clone(),
                reason: reason.to_owned(),
            }),
        }
    }

    /// The edgecontroller's part in an upstream message of `node` (called after `Received`).
    fn edgecontroller(&self, node: &str, msg: &Message) {
        if !self.cfg.edgecontroller {
            return;
        }
        let outcome = lock(&self.edgecontroller).on_upstream(node, msg);
        self.apply(node, outcome);
    }

    fn apply(&self, node: &str, outcome: edgecontroller::Outcome) {
        for msg in outcome.send {
            self.push(node, msg);
        }
        for (action, object) in outcome.node_changes {
            self.emit(SimEvent::NodeObject { node: node.to_owned(), action, object });
        }
        for (action, object) in outcome.pod_changes {
            self.emit(SimEvent::Pod { node: node.to_owned(), action, object });
        }
    }
}

/// Locks a mutex, carrying on after a panic elsewhere: the simulator's state stays usable for the
/// remaining assertions of a test, which is more useful than a cascade of poison panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CloudSim {
    /// Builds the TLS acceptor, binds the listener and starts accepting. Once it returns the port
    /// accepts connections (the socket is listening before the accept thread even starts).
    ///
    /// # Errors
    /// `Tls` when the certificate, key or CA cannot be used; `Io` when binding fails.
    pub fn start(cfg: SimConfig) -> Result<CloudSim> {
        let acceptor = build_acceptor(&cfg)?;
        let listener = TcpListener::bind(cfg.listen)
            .map_err(|e| ErrorKind::Io.msg(format!("bind {}", cfg.listen)).src(e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ErrorKind::Io.msg("read simulator listen address").src(e))?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let cfg_head_node_updates = cfg.head_node_updates;
        let shared = Arc::new(Shared {
            cfg,
            acceptor,
            events_tx,
            stopping: AtomicBool::new(false),
            objects: objects::Objects::default(),
            next_conn_id: AtomicU64::new(1),
            nodes: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            edgecontroller: Mutex::new(edgecontroller::EdgeController::new(cfg_head_node_updates)),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("sim-accept".to_owned())
            .spawn(move || accept_loop(&accept_shared, &listener))
            .map_err(|e| ErrorKind::Io.msg("spawn simulator accept thread").src(e))?;
        log::info!("cloudsim listening on {addr}");
        Ok(CloudSim { shared, addr, events_rx, accept_thread: Some(accept_thread) })
    }

    /// The address the simulator listens on (with the real port when `listen` had port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The event stream. Every call returns a handle on the same queue, so with several
    /// receivers each event goes to only one of them. The queue is unbounded: read it, or expect
    /// it to grow for the simulator's lifetime.
    pub fn events(&self) -> Receiver<SimEvent> {
        self.events_rx.clone()
    }

    /// Queues a downstream message for `node`, sorted the way CloudHub sorts it (protocol §4.4):
    /// no-ack messages go out once in order, ack-queue messages one at a time until ACKed, and
    /// the rest are dropped with a [`SimEvent::Dropped`]. A resource in the cloud-internal form
    /// `node/<node>/…` is trimmed to the wire form first, as CloudHub does. Messages for a node
    /// that is not connected wait for it.
    pub fn push(&self, node: &str, msg: Message) {
        self.shared.push(node, msg);
    }

    /// The Node object `node` as the simulated cloud holds it (edgecontroller), if any.
    pub fn node_object(&self, node: &str) -> Option<serde_json::Value> {
        lock(&self.shared.edgecontroller).node(node)
    }

    /// Reports the Node object as a [`SimEvent::NodeObject`] with action `shown` (`null` when
    /// the cloud holds none).
    pub fn show_node(&self, node: &str) {
        let object = self.node_object(node).unwrap_or(serde_json::Value::Null);
        self.shared.emit(SimEvent::NodeObject {
            node: node.to_owned(),
            action: "shown".to_owned(),
            object,
        });
    }

    /// An admin deletes the Node (edge-node §1.7): the object goes, and CloudHub closes the
    /// node's socket (the delete itself is never written to the edge).
    pub fn delete_node(&self, node: &str) {
        let object = {
            let mut ec = lock(&self.shared.edgecontroller);
            let object = ec.node(node);
            ec.delete_node(node);
            object
        };
        if let Some(object) = object {
            self.shared.emit(SimEvent::NodeObject {
                node: node.to_owned(),
                action: "deleted".to_owned(),
                object,
            });
        }
        let conn = self.shared.nodes().get(node).and_then(|n| n.conn.clone());
        if let Some(conn) = conn {
            conn.close("node deleted");
        }
    }

    /// Removes the Node object without closing the socket (a deletion whose socket close was
    /// missed): the node's status updates then draw no answer.
    pub fn forget_node(&self, node: &str) {
        lock(&self.shared.edgecontroller).delete_node(node);
    }

    /// Answers the next `count` registrations of `node` with an error text instead of "OK".
    pub fn refuse_registrations(&self, node: &str, count: u32) {
        lock(&self.shared.edgecontroller).refuse_registrations(node, count);
    }

    /// Binds `pod` (a v1.Pod; `metadata.name` needed) to `node` and sends it, as syncPod does.
    pub fn bind_pod(&self, node: &str, pod: serde_json::Value) {
        let insert = lock(&self.shared.edgecontroller).bind_pod(node, pod);
        self.shared.emit(SimEvent::Pod {
            node: node.to_owned(),
            action: "bound".to_owned(),
            object: serde_json::from_str(insert.content.get()).unwrap_or_default(),
        });
        self.shared.push(node, insert);
    }

    /// Starts deleting a pod bound to `node` (sets `deletionTimestamp` and sends the update).
    pub fn delete_pod(&self, node: &str, namespace: &str, name: &str) {
        let update = lock(&self.shared.edgecontroller).start_pod_deletion(node, namespace, name);
        if let Some(update) = update {
            self.shared.emit(SimEvent::Pod {
                node: node.to_owned(),
                action: "deleting".to_owned(),
                object: serde_json::from_str(update.content.get()).unwrap_or_default(),
            });
            self.shared.push(node, update);
        }
    }

    /// A pod bound to `node` as the cloud holds it; `None` once deleted.
    pub fn pod(&self, node: &str, namespace: &str, name: &str) -> Option<serde_json::Value> {
        lock(&self.shared.edgecontroller).pod(node, namespace, name)
    }

    /// Queues `frame` to be written as one WebSocket message, never fragmented, text or binary,
    /// in order with the no-ack messages. The bytes need not be JSON or even UTF-8.
    pub fn push_raw(&self, node: &str, frame: Vec<u8>, binary: bool) {
        let item =
            Downstream { msg_id: String::new(), payload: frame, binary, may_fragment: false };
        self.shared.nodes().entry(node.to_owned()).or_default().queues.push_no_ack(item);
    }

    /// Queues a single text frame of exactly `len` bytes (or the smallest valid message, when
    /// `len` is below that) holding a valid no-ack message padded with `x`s: for size-limit tests.
    pub fn push_oversized(&self, node: &str, len: usize) {
        let route = crate::message::Route {
            source: "router_eventbus".to_owned(),
            group: crate::message::group::USER.to_owned(),
            operation: "publish".to_owned(),
            resource: "oversized".to_owned(),
            ..Default::default()
        };
        let empty = Message::with_text(route.clone(), "");
        let pad = len.saturating_sub(empty.encode().len());
        let msg = Message {
            header: empty.header.clone(),
            route,
            content: crate::message::text_content(&"x".repeat(pad)),
        };
        let item = Downstream {
            msg_id: msg.header.id.clone(),
            payload: msg.encode().into_bytes(),
            binary: false,
            may_fragment: false,
        };
        self.shared.nodes().entry(node.to_owned()).or_default().queues.push_no_ack(item);
    }

    /// Puts an object "in the cloud": from now on every node's `query` for `resource`
    /// (`<ns>/<type>/<name>`) is answered at once, as edgecontroller answers from its lister
    /// (protocol example D), with this `resource_version` and `content` (JSON text), through the
    /// ack queue. Putting it again replaces it; nothing is pushed to nodes (edgecontroller pushes a
    /// ConfigMap or Secret only to nodes running a pod that uses it, edge-node §1.6).
    ///
    /// # Errors
    /// `Protocol` when `content` is not JSON.
    pub fn put_object(&self, resource: &str, resource_version: &str, content: &str) -> Result<()> {
        let content = crate::message::json_content(content)
            .map_err(|e| ErrorKind::Protocol.msg(format!("put_object {resource}")).src(e))?;
        self.shared.objects.put(resource, resource_version, content);
        Ok(())
    }

    /// Takes an object out of the cloud: queries for it go unanswered again. True if it was there.
    pub fn remove_object(&self, resource: &str) -> bool {
        self.shared.objects.remove(resource)
    }

    /// Drops the node's TCP connection abruptly: no close frame, no TLS close_notify.
    pub fn cut(&self, node: &str) {
        let conn = self.shared.nodes().get(node).and_then(|n| n.conn.clone());
        if let Some(conn) = conn {
            conn.close("cut");
        }
    }

    /// True while `node` has an accepted, message-carrying connection.
    pub fn connected(&self, node: &str) -> bool {
        self.shared.nodes().get(node).is_some_and(|n| n.conn.is_some())
    }

    /// The ID of the node's (oldest) ack-queue message now waiting for an ACK, if any.
    pub fn in_flight(&self, node: &str) -> Option<String> {
        self.shared.nodes().get(node).and_then(|n| n.queues.in_flight_id().map(str::to_owned))
    }

    /// Stops accepting, closes every connection without a close frame and joins every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The accept thread is blocked in accept(): a connection of our own wakes it, and it then
        // sees the flag (tiny_http's trick).
        let _ = TcpStream::connect_timeout(&wake_addr(self.addr), Duration::from_secs(1));
        if accept_thread.join().is_err() {
            log::error!("bug: cloudsim accept thread panicked");
        }
        // No connection can be added any more: close them all, then join their threads.
        let conns: Vec<Arc<ConnCtl>> = lock(&self.shared.conns).values().cloned().collect();
        for conn in conns {
            conn.close("sim stopped");
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            if worker.join().is_err() {
                log::error!("bug: cloudsim connection thread panicked");
            }
        }
        log::info!("cloudsim on {} stopped", self.addr);
    }
}

impl Drop for CloudSim {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where to connect to reach a listener bound to `addr` (an unspecified IP means loopback).
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// CloudHub's TLS server (protocol §2.2): TLS 1.2 or newer, client certificate required and
/// verified against `ca_pem` only.
fn build_acceptor(cfg: &SimConfig) -> Result<SslAcceptor> {
    let tls = |what: &'static str| move |e| ErrorKind::Tls.msg(what).src(e);
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(tls("create tls acceptor"))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(tls("set tls minimum version"))?;
    let cert = X509::from_pem(&cfg.cert_pem).map_err(tls("parse simulator certificate"))?;
    let key = openssl::pkey::PKey::private_key_from_pem(&cfg.key_pem)
        .map_err(tls("parse simulator key"))?;
    b.set_certificate(&cert).map_err(tls("use simulator certificate"))?;
    b.set_private_key(&key).map_err(tls("use simulator key"))?;
    b.check_private_key().map_err(tls("simulator key does not match its certificate"))?;
    let cas = X509::stack_from_pem(&cfg.ca_pem).map_err(tls("parse ca"))?;
    if cas.is_empty() {
        return Err(ErrorKind::Tls.msg("parse ca: no certificate in pem"));
    }
    let mut store = X509StoreBuilder::new().map_err(tls("create ca store"))?;
    for ca in cas {
        b.add_client_ca(&ca).map_err(tls("advertise ca"))?;
        store.add_cert(ca).map_err(tls("add ca to store"))?;
    }
    b.set_verify_cert_store(store.build()).map_err(tls("set ca store"))?;
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    Ok(b.build())
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                log::warn!("cloudsim accept: {e}");
                // Backoff, not synchronisation: a persistent error (out of file descriptors)
                // must not spin the core.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        reap_finished_workers(shared);
        let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let ctl = match tcp.try_clone() {
            Ok(raw) => Arc::new(ConnCtl::new(id, raw)),
            Err(e) => {
                shared.emit(SimEvent::Rejected { reason: format!("clone accepted socket: {e}") });
                continue;
            }
        };
        lock(&shared.conns).insert(id, Arc::clone(&ctl));
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("sim-conn".to_owned())
            .spawn(move || conn::serve(&conn_shared, ctl, tcp));
        match spawned {
            Ok(handle) => lock(&shared.workers).push(handle),
            Err(e) => {
                lock(&shared.conns).remove(&id);
                shared.emit(SimEvent::Rejected { reason: format!("spawn connection thread: {e}") });
            }
        }
    }
}

/// Joins connection threads that have ended, so a long-running simulator does not keep a
/// handle per connection it ever had.
fn reap_finished_workers(shared: &Shared) {
    let finished: Vec<JoinHandle<()>> = {
        let mut workers = lock(&shared.workers);
        let (done, running) =
            std::mem::take(&mut *workers).into_iter().partition(|w| w.is_finished());
        *workers = running;
        done
    };
    for worker in finished {
        if worker.join().is_err() {
            log::error!("bug: cloudsim connection thread panicked");
        }
    }
}
