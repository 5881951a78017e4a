//! One simulated CloudHub connection, from the accepted TCP socket to its end: the TLS and
//! WebSocket handshakes with CloudHub's header rules (protocol §2.2, §2.3, §4.1), then one loop that
//! reads upstream frames, applies the keepalive timeout (§4.3) and writes what the node's queues
//! hand out (§4.4), fragmenting long messages the way gorilla does (§2.4). The queue rules
//! themselves live in `queues`; the node table and the public handle in the parent module.

use super::load::{self, Generator};
use super::queues::{AckStep, Downstream};
use super::{lock, Shared, SimEvent};
use crate::message::{operation, Message};
use openssl::nid::Nid;
use openssl::ssl::SslStream;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;
use tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::{WebSocket, WebSocketConfig};

/// Bound on the TLS plus WebSocket handshake, so a silent client cannot hold a thread forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read timeout once the connection is up. The simulator is a test tool, not the
/// constrained agent: waking every 20 ms to interleave reads with queue work and timers keeps it
/// one thread per connection and simple, at a cost nobody measures.
const READ_SLICE: Duration = Duration::from_millis(20);
/// Socket write timeout. A write that cannot finish (a stalled client) is left in tungstenite's
/// buffer and retried on the next pass, so timers keep running meanwhile.
const WRITE_SLICE: Duration = Duration::from_millis(50);
/// How long a new connection waits for the connection it replaces to finish.
const REPLACE_WAIT: Duration = Duration::from_secs(5);
/// Most ack-queue steps (writes, give-ups) per pass, so reads and the keepalive timer still run
/// between them when the ack window is wide.
const MAX_ACK_STEPS_PER_PASS: usize = 1024;

type Ws = WebSocket<SslStream<TcpStream>>;

/// The outside's grip on one connection: the raw socket, to shut it down from any thread, and
/// why it was closed. The connection thread marks it finished when it is done.
pub(super) struct ConnCtl {
    pub(super) id: u64,
    tcp: TcpStream,
    state: Mutex<CtlState>,
    changed: Condvar,
}

#[derive(Default)]
struct CtlState {
    close_reason: Option<String>,
    finished: bool,
}

impl ConnCtl {
    pub(super) fn new(id: u64, tcp: TcpStream) -> ConnCtl {
        ConnCtl { id, tcp, state: Mutex::new(CtlState::default()), changed: Condvar::new() }
    }

    /// Shuts the TCP connection down both ways, without a close frame, waking the connection
    /// thread wherever it is blocked. The first reason given is the one reported.
    pub(super) fn close(&self, reason: &str) {
        {
            let mut state = lock(&self.state);
            if state.close_reason.is_none() {
                state.close_reason = Some(reason.to_owned());
            }
        }
        self.changed.notify_all();
        let _ = self.tcp.shutdown(Shutdown::Both);
    }

    fn close_reason(&self) -> Option<String> {
        lock(&self.state).close_reason.clone()
    }

    /// Waits until someone closes this connection or `timeout` passes. True when closed.
    fn wait_closed(&self, timeout: Duration) -> bool {
        let state = lock(&self.state);
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.close_reason.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.close_reason.is_some()
    }

    /// Waits until the connection thread is done or `timeout` passes. True when done.
    fn wait_finished(&self, timeout: Duration) -> bool {
        let state = lock(&self.state);
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| !s.finished)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.finished
    }
}

/// Marks the connection finished and unregisters it when the thread ends, panics included.
struct FinishGuard<'a> {
    shared: &'a Shared,
    ctl: &'a ConnCtl,
}

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.ctl.id);
        lock(&self.ctl.state).finished = true;
        self.ctl.changed.notify_all();
    }
}

/// What the upgrade request said.
#[derive(Default)]
struct Upgrade {
    path: String,
    headers: Vec<(String, String)>,
    node: String,
    project: String,
    connection_use: String,
}

/// Runs one connection to its end. Body of a `sim-conn` thread.
pub(super) fn serve(shared: &Shared, ctl: Arc<ConnCtl>, tcp: TcpStream) {
    let _finished = FinishGuard { shared, ctl: &ctl };
    let Some((ws, upgrade, client_cn)) = handshake(shared, &ctl, tcp) else { return };

    if upgrade.connection_use != "msg" {
        // viaduct accepts the upgrade but only starts reading for `ConnectionUse: msg`, so the
        // edge's messages go nowhere and CloudHub times the node out (protocol §2.3).
        shared.emit(SimEvent::Rejected {
            reason: format!(
                "node {:?} connected without header ConnectionUse: msg (got {:?}); holding the socket unread",
                upgrade.node, upgrade.connection_use
            ),
        });
        ctl.wait_closed(shared.cfg.keepalive_timeout);
        ctl.close("never used");
        drop(ws);
        return;
    }

    let node = upgrade.node.clone();
    let replaced = {
        let mut nodes = shared.nodes();
        let entry = nodes.entry(node.clone()).or_default();
        entry.queues.on_new_connection(Instant::now());
        entry.conn.replace(Arc::clone(&ctl))
    };
    if let Some(old) = replaced {
        // CloudHub closes the old connection and carries on with the node's queues on the new one
        // (protocol §4.1). Waiting for the old thread keeps the events in order.
        old.close("replaced");
        if !old.wait_finished(REPLACE_WAIT) {
            log::warn!("cloudsim: replaced connection of {node} did not finish in time");
        }
    }
    shared.emit(SimEvent::Connected {
        node: node.clone(),
        project: upgrade.project,
        path: upgrade.path,
        headers: upgrade.headers,
        client_cn,
    });

    let mut session = Session {
        shared,
        ctl: &ctl,
        node,
        ws,
        keepalive_deadline: Instant::now() + shared.cfg.keepalive_timeout,
        write_pending: false,
        load: shared.cfg.load.as_ref().map(|load| Generator::new(load, Instant::now())),
    };
    let own_reason = session.run();
    let reason = ctl.close_reason().unwrap_or(own_reason);
    ctl.close(&reason);
    {
        let mut nodes = shared.nodes();
        if let Some(entry) = nodes.get_mut(&session.node) {
            if entry.conn.as_ref().is_some_and(|c| c.id == ctl.id) {
                entry.conn = None;
            }
        }
    }
    shared.emit(SimEvent::Disconnected { node: session.node.clone(), reason });
}

/// TLS, then the WebSocket upgrade. `None` when the connection was refused (already reported).
fn handshake(shared: &Shared, ctl: &ConnCtl, tcp: TcpStream) -> Option<(Ws, Upgrade, String)> {
    let reject = |reason: String| {
        // A handshake broken by our own close (stop) is not the client's fault.
        if ctl.close_reason().is_none() {
            shared.emit(SimEvent::Rejected { reason });
        }
    };
    if let Err(e) = set_timeouts(&tcp, Some(HANDSHAKE_TIMEOUT), Some(HANDSHAKE_TIMEOUT)) {
        reject(format!("set handshake timeouts: {e}"));
        return None;
    }
    // Go sets TCP_NODELAY on every TCP connection, so CloudHub's small frames are never held back
    // by Nagle waiting for the edge's delayed ACK.
    let _ = tcp.set_nodelay(true);
    let tls = match shared.acceptor.accept(tcp) {
        Ok(tls) => tls,
        Err(e) => {
            reject(format!("tls handshake failed: {e}"));
            return None;
        }
    };
    let client_cn = tls
        .ssl()
        .peer_certificate()
        .and_then(|cert| {
            let entry = cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?;
            entry.data().to_string().ok()
        })
        .unwrap_or_default();

    let mut upgrade = Upgrade::default();
    // The error type is tungstenite's `Callback` contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        upgrade.path = req.uri().path().to_owned();
        upgrade.headers = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
            .collect();
        let header = |name: &str| {
            req.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        upgrade.node = header("node_id").unwrap_or_default();
        upgrade.project = header("project_id").unwrap_or_default();
        upgrade.connection_use = header("connectionuse").unwrap_or_default();
        if upgrade.node.is_empty() {
            let mut refusal = ErrorResponse::new(Some("missing node_id header".to_owned()));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            return Err(refusal);
        }
        Ok(resp)
    };
    let max = shared.cfg.max_message_size;
    // gorilla sets no read limit (protocol §2.7): one frame may be as large as one message.
    let config = WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
    // The error holds the handshake, which borrows `upgrade` through the callback: keep its text.
    let accepted =
        tungstenite::accept_hdr_with_config(tls, callback, Some(config)).map_err(|e| e.to_string());
    let ws = match accepted {
        Ok(ws) => ws,
        Err(e) => {
            let reason = if upgrade.node.is_empty() && !upgrade.path.is_empty() {
                "missing node_id header (answered 400)".to_owned()
            } else {
                format!("websocket upgrade failed: {e}")
            };
            reject(reason);
            return None;
        }
    };
    let raw = ws.get_ref().get_ref();
    let session_io = if shared.cfg.load.is_some() {
        // Load mode: non-blocking, and the loop sleeps in poll(2) (`Session::generate_load`).
        // A socket timeout counts in scheduler ticks (4 ms at HZ=250): the generator was bursty.
        raw.set_nonblocking(true)
    } else {
        set_timeouts(raw, Some(READ_SLICE), Some(WRITE_SLICE))
    };
    if let Err(e) = session_io {
        reject(format!("set session timeouts: {e}"));
        return None;
    }
    Some((ws, upgrade, client_cn))
}

fn set_timeouts(
    tcp: &TcpStream,
    read: Option<Duration>,
    write: Option<Duration>,
) -> io::Result<()> {
    tcp.set_read_timeout(read)?;
    tcp.set_write_timeout(write)
}

/// True for the error a timed-out socket read or write gives.
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// An accepted, message-carrying connection of one node.
struct Session<'a> {
    shared: &'a Shared,
    ctl: &'a ConnCtl,
    node: String,
    ws: Ws,
    /// Reset only by upstream keepalives (protocol §4.3).
    keepalive_deadline: Instant,
    /// tungstenite holds bytes a timed-out write could not send; nothing new is queued until
    /// they are out.
    write_pending: bool,
    /// Load mode's downstream schedule (`SimConfig::load`).
    load: Option<Generator>,
}

impl Session<'_> {
    /// Reads, times and writes until the connection ends; returns why it ended.
    fn run(&mut self) -> String {
        loop {
            let read = match self.read_once() {
                Ok(read) => read,
                Err(reason) => return reason,
            };
            if Instant::now() >= self.keepalive_deadline {
                // CloudHub just closes the socket: no close frame (protocol §2.6, §4.3).
                self.ctl.close("keepalive timeout");
                return "keepalive timeout".to_owned();
            }
            self.generate_load(!read);
            if let Err(reason) = self.write_queued() {
                return reason;
            }
        }
    }

    /// One read of at most `READ_SLICE`; true when a frame arrived. `Err` carries the reason the
    /// connection is over.
    fn read_once(&mut self) -> Result<bool, String> {
        let frame = match self.ws.read() {
            Ok(frame) => frame,
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => return Ok(false),
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Err("closed by peer".to_owned())
            }
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => return Err("eof".to_owned()),
            Err(e) => return Err(format!("read error: {e}")),
        };
        match frame {
            tungstenite::Message::Text(text) => self.on_upstream(text.as_bytes()),
            tungstenite::Message::Binary(bytes) => self.on_upstream(&bytes),
            tungstenite::Message::Ping(_) => {
                self.shared.emit(SimEvent::Ping { node: self.node.clone() });
                // tungstenite queued the pong; send it now rather than on the next read.
                self.flush()?;
            }
            tungstenite::Message::Close(_) => {
                // tungstenite queued the close reply; the real cloud drops the socket anyway.
                let _ = self.ws.flush();
                return Err("close frame received".to_owned());
            }
            tungstenite::Message::Pong(_) | tungstenite::Message::Frame(_) => {}
        }
        Ok(true)
    }

    /// Handles one upstream WebSocket message (protocol §4.2).
    fn on_upstream(&mut self, bytes: &[u8]) {
        let msg = match Message::decode(bytes) {
            Ok(msg) => msg,
            Err(e) => {
                // The real cloud drops the connection on bad JSON (protocol §2.4); the simulator
                // reports it and carries on so tests can look at what follows.
                self.shared
                    .emit(SimEvent::Malformed { node: self.node.clone(), error: e.to_string() });
                return;
            }
        };
        if msg.route.operation == operation::KEEPALIVE {
            self.keepalive_deadline = Instant::now() + self.shared.cfg.keepalive_timeout;
        }
        // A query for an object put in the cloud is answered through the ack queue (example D).
        if let Some(answer) = self.shared.objects.answer(&msg) {
            self.shared.nodes().entry(self.node.clone()).or_default().queues.push_ack(answer);
        }
        let acked = msg.route.operation == operation::RESPONSE && {
            let mut nodes = self.shared.nodes();
            nodes.get_mut(&self.node).is_some_and(|n| n.queues.on_response(&msg.header.parent_id))
        };
        let control_reply = msg.is_control().then(|| msg.control_ack());
        // Load mode answers bench requests at once, like a control operation.
        let control_reply = control_reply.or_else(|| self.shared.cfg.load.as_ref()?.answer(&msg));
        let parent_id = msg.header.parent_id.clone();
        // Only edged's messages concern it: no copy of keepalives, ACKs or bench traffic.
        let for_edgecontroller =
            (self.shared.cfg.edgecontroller && msg.route.source == "edged").then(|| msg.clone());
        let received_at = Instant::now();
        if let Some(reply) = control_reply {
            // viaduct answers config/ping/pong operations itself (protocol §2.8), before anything
            // else sees the message: reporting first put a wake-up of the reporting thread into
            // every round trip the bench measures. A failed write shows up on the next read.
            let _ = self.write(&Downstream::message(&reply), 1);
        }
        self.shared.emit(SimEvent::Received { node: self.node.clone(), msg, at: received_at });
        if acked {
            self.shared.emit(SimEvent::Ack { node: self.node.clone(), parent_id });
        }
        if let Some(msg) = for_edgecontroller {
            self.shared.edgecontroller(&self.node, &msg);
        }
    }

    /// Load mode: queues the bench messages that are due, if this is still the node's connection.
    /// When `idle` (the last read found nothing, so nothing is buffered either) it first sleeps
    /// until the next message is due or a frame arrives.
    fn generate_load(&mut self, idle: bool) {
        let Some(generator) = self.load.as_mut() else { return };
        if idle {
            let wait = generator.next_due(Instant::now()).min(load::LOAD_READ_SLICE);
            let socket = self.ws.get_ref().get_ref();
            let _ = crate::poll::wait(socket, crate::poll::Interest::Read, wait);
        }
        let window = self.shared.cfg.ack_window.max(1);
        let mut nodes = self.shared.nodes();
        match nodes.get_mut(&self.node) {
            Some(entry) if entry.conn.as_ref().is_some_and(|c| c.id == self.ctl.id) => {
                generator.fill(&mut entry.queues, Instant::now(), window, self.write_pending)
            }
            _ => {}
        }
    }

    /// Writes whatever the node's queues hand out, if this is still the node's connection.
    fn write_queued(&mut self) -> Result<(), String> {
        if self.write_pending {
            self.flush()?;
            if self.write_pending {
                return Ok(());
            }
        }
        let timing = self.shared.cfg.ack_timing();
        let no_ack = {
            let mut nodes = self.shared.nodes();
            match nodes.get_mut(&self.node) {
                Some(entry) if entry.conn.as_ref().is_some_and(|c| c.id == self.ctl.id) => {
                    entry.queues.take_no_ack()
                }
                _ => return Ok(()),
            }
        };
        for item in &no_ack {
            self.write(item, 1)?;
        }
        // One step at a time: once the socket is full, stop taking messages off the queue (they
        // would only pile up in tungstenite's buffer) and go back to reading ACKs.
        for _ in 0..MAX_ACK_STEPS_PER_PASS {
            if self.write_pending {
                break;
            }
            let step = {
                let mut nodes = self.shared.nodes();
                match nodes.get_mut(&self.node) {
                    Some(entry) if entry.conn.as_ref().is_some_and(|c| c.id == self.ctl.id) => {
                        entry.queues.next_ack_step(Instant::now(), timing)
                    }
                    _ => None,
                }
            };
            match step {
                Some(AckStep::Write { item, attempt }) => self.write(&item, attempt)?,
                Some(AckStep::GaveUp { msg_id }) => {
                    self.shared.emit(SimEvent::GaveUp { node: self.node.clone(), msg_id })
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Writes one downstream message, fragmented when longer than `fragment_size`, and reports it.
    fn write(&mut self, item: &Downstream, attempt: u32) -> Result<(), String> {
        let data = if item.binary { OpData::Binary } else { OpData::Text };
        let size = self.shared.cfg.fragment_size.max(1);
        let frames: Vec<Frame> = if item.may_fragment && item.payload.len() > size {
            // gorilla's shape (protocol §2.4): a text frame, then continuations, the last final.
            let chunks: Vec<&[u8]> = item.payload.chunks(size).collect();
            let last = chunks.len() - 1;
            chunks
                .iter()
                .enumerate()
                .map(|(i, chunk)| {
                    let opcode =
                        if i == 0 { OpCode::Data(data) } else { OpCode::Data(OpData::Continue) };
                    Frame::message(chunk.to_vec(), opcode, i == last)
                })
                .collect()
        } else {
            vec![Frame::message(item.payload.clone(), OpCode::Data(data), true)]
        };
        for frame in frames {
            match self.ws.write(tungstenite::Message::Frame(frame)) {
                Ok(()) => {}
                // The frame is in tungstenite's buffer; `flush` below or a later pass sends it.
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                Err(e) => return Err(format!("write error: {e}")),
            }
        }
        self.flush()?;
        self.shared.emit(SimEvent::Sent {
            node: self.node.clone(),
            msg_id: item.msg_id.clone(),
            attempt,
            at: Instant::now(),
        });
        Ok(())
    }

    /// Pushes buffered bytes out; a timeout leaves them buffered and sets `write_pending`.
    fn flush(&mut self) -> Result<(), String> {
        match self.ws.flush() {
            Ok(()) => {
                self.write_pending = false;
                Ok(())
            }
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                self.write_pending = true;
                Ok(())
            }
            Err(e) => Err(format!("write error: {e}")),
        }
    }
}
