//! The supervisor loop and the threads of one session (the owner's design, protocol §3.11):
//! dial → on success start a reader, a writer and a heartbeat inside one `thread::scope` → the
//! first of them to fail ends the session → nudge the others, join them all (leaving the scope is
//! the join, so no thread outlives its session, unlike KubeEdge §8 W3) → `cloud_disconnected` →
//! wait 2×heartbeat plus jitter → dial again. No disk, no business rules.
//!
//! Threads and channels of a session:
//! - reader: poll(2) on the socket without the lock, drain frames, decode, `Router::dispatch`;
//!   it also keeps the read deadline (no data message and no pong for `readDeadline` = dead
//!   link; the cloud's own pings do not count, as a peer can ping while never reading);
//! - writer: runs `writer::Writer` (urgent lane first, token bucket on the rest), waiting on the
//!   outbox bell; while it is idle, a thread that pushes a message writes it itself (the writer
//!   attached to the outbox); a failed write puts the message back at the head (§8 W1);
//! - heartbeat: a keepalive at once and every `heartbeat`, a WebSocket ping every readDeadline/3,
//!   written straight to the link so neither waits behind the outbox or its rate limit.
//!
//! Each thread holds an `ExitGuard` that reports why it ended on `done`, even if it panics. The
//! session's `stop` channel is never sent on; dropping its sender wakes every `select!`.
//! A rotated certificate (`certs`, thread `eh-certs`) ends the session too: the supervisor's wait
//! also listens on the `reconnect` channel. Signals are coalesced (capacity 1) and one that
//! arrives before a dial reads the files is drained, so no stale signal ends a later session.

use crate::certs;
use crate::config::Config;
use crate::error::Error;
use crate::link::{self, Incoming, Link};
use crate::message::{self, Message};
use crate::outbox::Outbox;
use crate::router::Router;
use crate::status::Status;
use crate::writer::Writer;
use crossbeam_channel::{bounded, never, select, tick, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Stack sizes: the reader decodes JSON (serde_json caps nesting at 128 levels), the others only
/// move bytes.
const READER_STACK_BYTES: usize = 256 << 10;
const WRITER_STACK_BYTES: usize = 128 << 10;
const HEARTBEAT_STACK_BYTES: usize = 128 << 10;
/// How much of a malformed frame is quoted in the log.
const MAX_QUOTED_FRAME: usize = 200;

/// Why a session ended.
#[derive(Debug)]
pub enum ExitReason {
    /// The agent is stopping.
    Stopped,
    /// No data message and no pong arrived within `readDeadline` (half-open link, or a cloud that
    /// no longer reads).
    ReadDeadline(Duration),
    /// Reading failed (closed, reset, broken framing, oversized message).
    Read(Error),
    /// Writing failed (closed, reset, write deadline).
    Write(Error),
    /// A session thread could not start, or panicked: a bug or resource exhaustion.
    Fault(String),
    /// A new certificate was installed; the next dial uses it.
    CertificateRotated,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Stopped => f.write_str("agent stopping"),
            ExitReason::ReadDeadline(d) => {
                write!(
                    f,
                    "no message or pong from the cloud for {:.1} s (readDeadline)",
                    d.as_secs_f64()
                )
            }
            ExitReason::Read(e) => write!(f, "read failed: {e}"),
            ExitReason::Write(e) => write!(f, "write failed: {e}"),
            ExitReason::Fault(what) => write!(f, "session fault: {what}"),
            ExitReason::CertificateRotated => f.write_str("certificate rotated, reconnecting"),
        }
    }
}

/// Reports the reason its thread ended when dropped, so a panic reports too.
struct ExitGuard {
    done: Sender<ExitReason>,
    reason: Option<ExitReason>,
    role: &'static str,
}

impl ExitGuard {
    fn new(done: &Sender<ExitReason>, role: &'static str) -> ExitGuard {
        ExitGuard { done: done.clone(), reason: None, role }
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let reason = self
            .reason
            .take()
            .unwrap_or_else(|| ExitReason::Fault(format!("{} thread panicked", self.role)));
        // The channel holds one slot per thread, so this never blocks.
        let _ = self.done.try_send(reason);
    }
}

/// Everything the supervisor needs, shared with the rest of the agent.
pub struct Supervisor {
    pub config: Arc<Config>,
    pub router: Router,
    pub outbox: Arc<Outbox>,
    pub status: Arc<Status>,
    /// One `()` per installed certificate (from `certs::Rotation`): end the session and redial.
    /// Its sender must outlive the supervisor (the agent keeps one).
    pub reconnect: Receiver<()>,
}

impl Supervisor {
    /// Runs until `stop` fires or disconnects: dial, run a session, cool down, repeat.
    pub fn run(self, stop: Receiver<()>) {
        let _ = self.status.server.set(self.config.websocket.server.clone());
        let mut last_dial_error = String::new();
        let config = &self.config;
        log::info!("edgehub starting: node {} cloud {}", config.node_name, config.websocket_url());
        loop {
            if is_stopping(&stop) {
                break;
            }
            match self.dial(&stop) {
                Ok(link) => {
                    let link = Arc::new(link);
                    let sessions =
                        self.status.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    log::info!("connected to {} (session {sessions})", link.peer());
                    self.status.connected.store(true, std::sync::atomic::Ordering::Relaxed);
                    Status::stamp(&self.status.connected_since);
                    self.status.set_link_local_ip(link.local_ip());
                    self.status.dial_attempts.store(0, std::sync::atomic::Ordering::Relaxed);
                    last_dial_error.clear();
                    let reason = if self.router.broadcast_connection(true, &stop).is_err() {
                        ExitReason::Stopped
                    } else {
                        self.run_session(&link, &stop)
                    };
                    link.shutdown();
                    self.status.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                    let requeued = self.outbox.requeue_unconfirmed();
                    if requeued > 0 {
                        log::info!("{requeued} message(s) not confirmed by the cloud go out again");
                    }
                    match &reason {
                        ExitReason::Stopped | ExitReason::CertificateRotated => {
                            log::info!("disconnected from {}: {reason}", link.peer())
                        }
                        ExitReason::Fault(_) => {
                            log::error!("disconnected from {}: {reason}", link.peer())
                        }
                        _ => log::warn!("disconnected from {}: {reason}", link.peer()),
                    }
                    let _ = self.router.broadcast_connection(false, &stop);
                    if matches!(reason, ExitReason::Stopped) {
                        break;
                    }
                }
                Err(e) if e.kind() == crate::error::ErrorKind::Stopped => {
                    log::info!("dial interrupted: {e}");
                    break;
                }
                Err(e) => {
                    Status::bump(&self.status.dial_failures);
                    let attempts = self
                        .status
                        .dial_attempts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    // One line per kind of failure, then a reminder every tenth attempt: a
                    // router's log must not fill with "connection refused" during an outage.
                    let text = e.to_string();
                    if text != last_dial_error {
                        log::warn!("cannot connect to {}: {text}", config.websocket.server);
                        last_dial_error = text;
                    } else if attempts % 10 == 0 {
                        log::warn!(
                            "still cannot connect to {} after {attempts} attempts: {text}",
                            config.websocket.server
                        );
                    } else {
                        log::debug!(
                            "cannot connect to {} (attempt {attempts}): {text}",
                            config.websocket.server
                        );
                    }
                }
            }
            let wait = reconnect_delay(config);
            log::info!("reconnecting in {:.1} s", wait.as_secs_f64());
            select! {
                recv(stop) -> _ => break,
                default(wait) => {}
            }
        }
        log::info!("edgehub supervisor stopped");
    }

    /// Dials within `handshakeTimeout`; a stop ends the dial at once (`ErrorKind::Stopped`).
    fn dial(&self, stop: &Receiver<()>) -> Result<Link, Error> {
        // Certificates are re-read on every dial, so a rotated pair is used at once. Under the
        // pair lock, so a rotation cannot switch the pair between the reads; a reconnect signal
        // sent before these reads is for the pair read here, so it is dropped.
        let tls = {
            let _pair = certs::pair_lock();
            while self.reconnect.try_recv().is_ok() {}
            link::tls_connector(&self.config)?
        };
        let link = link::connect_until_stopped(&self.config, &tls, stop)?;
        if let Ok(info) = certs::usable(&self.config) {
            let not_after = u32::try_from(info.not_after.max(0)).unwrap_or(u32::MAX);
            self.status.cert_not_after.store(not_after, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(link)
    }

    /// Runs the three session threads until the first one ends or the agent stops, then stops
    /// and joins all of them.
    fn run_session(&self, link: &Arc<Link>, agent_stop: &Receiver<()>) -> ExitReason {
        let (done_tx, done_rx) = bounded::<ExitReason>(3);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let writer = Arc::new(Writer::new(link.clone(), self.status.clone()));
        self.outbox.attach_writer(Some(writer.clone()));
        std::thread::scope(|scope| {
            let builder = |name: &str, stack: usize| {
                std::thread::Builder::new().name(name.to_owned()).stack_size(stack)
            };
            let started = [
                builder("eh-reader", READER_STACK_BYTES)
                    .spawn_scoped(scope, || self.reader(link, &done_tx, &stop_rx))
                    .err(),
                builder("eh-writer", WRITER_STACK_BYTES)
                    .spawn_scoped(scope, || self.writer(&writer, &done_tx, &stop_rx))
                    .err(),
                builder("eh-heartbeat", HEARTBEAT_STACK_BYTES)
                    .spawn_scoped(scope, || self.heartbeat(link, &writer, &done_tx, &stop_rx))
                    .err(),
            ];
            let first = match started.into_iter().flatten().next() {
                Some(e) => ExitReason::Fault(format!("spawn session thread: {e}")),
                None => select! {
                    recv(done_rx) -> reason => reason.unwrap_or(ExitReason::Fault("done channel closed".into())),
                    recv(agent_stop) -> _ => ExitReason::Stopped,
                    recv(self.reconnect) -> _ => ExitReason::CertificateRotated,
                },
            };
            // Nudge: wake every select!, the writer's bell and the reader's poll, then leave the
            // scope (joins all).
            // Nobody writes after this: what is pushed from now on waits for the next session,
            // and what was written is requeued (`run`) only after the last write has ended.
            drop(stop_tx);
            self.outbox.attach_writer(None);
            self.outbox.ring();
            link.shutdown();
            writer.end();
            first
        })
    }

    fn reader(&self, link: &Link, done: &Sender<ExitReason>, stop: &Receiver<()>) {
        let mut guard = ExitGuard::new(done, "reader");
        let read_deadline = self.config.websocket.read_deadline.0;
        let mut last_frame = Instant::now();
        let mut batch = Vec::new();
        guard.reason = Some(loop {
            let left = (last_frame + read_deadline).saturating_duration_since(Instant::now());
            let readable = match link.wait_readable(left) {
                Ok(readable) => readable,
                Err(e) => break ExitReason::Read(e),
            };
            if is_stopping(stop) {
                break ExitReason::Stopped;
            }
            if !readable {
                break ExitReason::ReadDeadline(read_deadline);
            }
            batch.clear();
            let result = link.read_available(&mut batch);
            // Alive: a data message or a pong arrived (the cloud answers our pings from the
            // goroutine that reads, so a pong shows it reads). Its own pings do not count: a peer
            // that pings and never reads keeps the socket readable forever.
            let alive = batch.iter().any(|frame| !matches!(frame, Incoming::Control));
            if alive {
                last_frame = Instant::now();
                Status::stamp(&self.status.last_frame);
            }
            let pings_only = !alive && !batch.is_empty();
            if self.handle_frames(&mut batch, stop).is_err() {
                break ExitReason::Stopped;
            }
            if let Err(e) = result {
                break ExitReason::Read(e);
            }
            if pings_only && last_frame.elapsed() >= read_deadline {
                break ExitReason::ReadDeadline(read_deadline);
            }
        });
    }

    fn handle_frames(
        &self,
        batch: &mut Vec<Incoming>,
        stop: &Receiver<()>,
    ) -> Result<(), crate::router::Stopped> {
        for incoming in batch.drain(..) {
            let frame = match incoming {
                Incoming::Data(frame) => frame,
                Incoming::Pong(payload) => {
                    if let Ok(cursor) = <[u8; 8]>::try_from(payload.as_slice()) {
                        self.outbox.confirm(u64::from_be_bytes(cursor));
                    }
                    continue;
                }
                Incoming::Control => continue,
            };
            match Message::decode(&frame) {
                Ok(msg) => {
                    Status::bump(&self.status.messages_down);
                    log::debug!("from cloud: {msg:?}");
                    self.router.dispatch(msg, stop)?;
                }
                Err(e) => {
                    // Unlike viaduct (§2.4) one bad frame does not end the session.
                    Status::bump(&self.status.malformed);
                    let quoted =
                        String::from_utf8_lossy(&frame[..frame.len().min(MAX_QUOTED_FRAME)]);
                    // Both may quote the frame (serde names bad values and fields): escaped, cut.
                    log::warn!(
                        "ignoring frame from cloud ({} bytes): {}: {:?}",
                        frame.len(),
                        crate::logging::shown(&e.to_string()),
                        crate::logging::shown(&quoted)
                    );
                }
            }
        }
        Ok(())
    }

    /// Runs the session's writer (`writer.rs`) until the session stops or a write fails.
    fn writer(&self, writer: &Writer, done: &Sender<ExitReason>, stop: &Receiver<()>) {
        let mut guard = ExitGuard::new(done, "writer");
        guard.reason = Some(match writer.run(&self.outbox, || is_stopping(stop)) {
            Ok(()) => ExitReason::Stopped,
            Err(e) => ExitReason::Write(e),
        });
    }

    /// Keepalives, and liveness pings that also carry the writer's cursor (a cloud answers only
    /// the latest of several pings it has not answered yet, so every ping must carry one).
    fn heartbeat(
        &self,
        link: &Link,
        writer: &Writer,
        done: &Sender<ExitReason>,
        stop: &Receiver<()>,
    ) {
        let mut guard = ExitGuard::new(done, "heartbeat");
        let keepalive_tick = tick(self.config.heartbeat.0);
        let ping_interval = self.config.ping_interval();
        let ping_tick = if ping_interval.is_zero() { never() } else { tick(ping_interval) };
        let send_keepalive = || {
            let sent = link.send_text(Message::keepalive().encode());
            if sent.is_ok() {
                Status::bump(&self.status.keepalives_sent);
                Status::stamp(&self.status.last_keepalive);
                Status::bump(&self.status.messages_up);
            }
            sent
        };
        // The first keepalive goes out at once (protocol §3.7).
        if let Err(e) = send_keepalive() {
            guard.reason = Some(ExitReason::Write(e));
            return;
        }
        guard.reason = Some(loop {
            select! {
                recv(stop) -> _ => break ExitReason::Stopped,
                recv(keepalive_tick) -> _ => {
                    if let Err(e) = send_keepalive() {
                        break ExitReason::Write(e);
                    }
                }
                recv(ping_tick) -> _ => {
                    if let Err(e) = link.send_ping(&writer.cursor().to_be_bytes()) {
                        break ExitReason::Write(e);
                    }
                }
            }
        });
    }
}

/// True once the stop channel fired or its sender is gone.
fn is_stopping(stop: &Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty))
}

/// 2 × heartbeat plus a random jitter in [0, reconnectJitter]: never less than 2 × heartbeat
/// (the owner's rule), and spread so a cloud restart does not get every node back at once (§8 W13).
pub fn reconnect_delay(config: &Config) -> Duration {
    let base = config.heartbeat.0 * 2;
    let jitter = config.reconnect_jitter.0;
    if jitter.is_zero() {
        return base;
    }
    let fraction = (message::random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    base + jitter.mul_f64(fraction)
}
