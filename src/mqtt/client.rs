//! The MQTT client's threads and state: `eh-mqtt` dials, keeps the connection (keep-alive,
//! subscriptions, the publish queue and its in-flight window) and reconnects with backoff; for
//! each connection it runs `eh-mqtt-read`, which decodes what the broker sends, acknowledges
//! QoS 1 publishes and hands each publish to the consumer whose filter matches. The contract is
//! in the module doc (`mqtt/mod.rs`).

use super::codec::{self, DecodeError, IncomingPublish, Packet};
use super::conn::{self, Conn};
use super::{filter_matches, is_valid_filter, is_valid_topic, Options, Publish};
use crate::error::{ErrorKind, Result};
use crate::logging::shown;
use crossbeam_channel::{bounded, select, tick, Receiver, SendTimeoutError, Sender, TrySendError};
use openssl::ssl::SslConnector;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First wait after a failed or lost connection; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// KubeEdge's eventbus retries every 5 s.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// QoS 1 publishes sent and not yet acknowledged, at most.
const INFLIGHT_WINDOW: usize = 32;
/// How long a stop waits for queued publishes to reach a connected broker.
const STOP_FLUSH: Duration = Duration::from_secs(2);
/// The reader's poll timeout. Nothing depends on it: a stop or a dead connection wakes the reader
/// through shutdown(2), so an idle connection costs no wake-ups beyond the keep-alive.
const READ_WAKE: Duration = Duration::from_secs(3600);
/// How long the reader waits for a full consumer before dropping (see `Routes::deliver`). Well
/// under the keep-alive, so a PINGRESP behind a waiting publish still arrives in time.
const DELIVERY_WAIT: Duration = Duration::from_secs(1);
/// Drops are logged on the first and then every this many.
const LOG_EVERY: u32 = 1000;
const CLIENT_STACK_BYTES: usize = 128 << 10;
const READER_STACK_BYTES: usize = 128 << 10;

/// The client's counters (all since start).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MqttStats {
    pub connected: bool,
    /// Accepted connections (1 + reconnects).
    pub connects: u32,
    /// Publishes sent (QoS 1: acknowledged by the broker).
    pub published: u32,
    /// Publishes waiting (queued or in flight).
    pub queued: u32,
    /// Oldest publishes dropped because the queue was full.
    pub queue_dropped: u32,
    /// Publishes refused by `publish` (too big, bad topic, stopped).
    pub refused: u32,
    /// Publishes received from the broker.
    pub received: u32,
    /// Received publishes dropped because the consumer's channel was full.
    pub delivery_dropped: u32,
    /// Received publishes no route wanted.
    pub unrouted: u32,
    /// Packets from the broker over the size limit, skipped.
    pub oversized: u32,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU32,
    published: AtomicU32,
    queue_dropped: AtomicU32,
    refused: AtomicU32,
    received: AtomicU32,
    delivery_dropped: AtomicU32,
    unrouted: AtomicU32,
    oversized: AtomicU32,
}

fn bump(counter: &AtomicU32) -> u32 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}

/// A publish waiting to go out; `seq` keeps the order when in-flight ones are put back.
struct Outgoing {
    seq: u64,
    publish: Publish,
}

/// What `eh-mqtt` must do next, besides the queue.
enum SubChange {
    Subscribe(String),
    Unsubscribe(String),
}

#[derive(Default)]
struct State {
    queue: VecDeque<Outgoing>,
    queue_bytes: usize,
    next_seq: u64,
    /// Sent at QoS 1, waiting for PUBACK: packet id → publish.
    inflight: BTreeMap<u16, Outgoing>,
    next_packet_id: u16,
    /// Every filter subscribed at each connect: the routes' and the run-time ones.
    filters: Vec<String>,
    /// Run-time subscription changes not yet sent to the broker.
    sub_changes: VecDeque<SubChange>,
    /// SUBSCRIBE packet id → its filters, to name a refused one in the log.
    sub_pending: HashMap<u16, Vec<String>>,
    /// When the unanswered PINGREQ was sent.
    ping_sent: Option<Instant>,
    closed: bool,
}

impl State {
    fn packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            let id = self.next_packet_id;
            if id != 0 && !self.inflight.contains_key(&id) && !self.sub_pending.contains_key(&id) {
                return id;
            }
        }
    }
}

struct Shared {
    options: Options,
    state: Mutex<State>,
    /// Wakes `eh-mqtt` (capacity 1: wake-ups coalesce).
    wake_tx: Sender<()>,
    connected: AtomicBool,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data under the lock, left consistent by every critical section.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }
}

/// A consumer: the filters it claims and its bounded channel.
struct Route {
    filters: Vec<String>,
    tx: Sender<Publish>,
    /// It let a publish wait `DELIVERY_WAIT` in vain: until it takes one again, publishes for it
    /// are dropped at once instead of each waiting (so a stuck consumer cannot slow the rest).
    stalled: AtomicBool,
}

impl Route {
    fn new(filters: Vec<String>, tx: Sender<Publish>) -> Route {
        Route { filters, tx, stalled: AtomicBool::new(false) }
    }
}

struct Routes {
    routes: Vec<Route>,
    rest: Option<Route>,
}

impl Routes {
    /// Hands `publish` to its consumer. A full channel is waited on up to `DELIVERY_WAIT`: the
    /// reader then reads no further, so TCP and the broker hold the rest (back-pressure) while a
    /// consumer catches up; after that the publish is dropped and counted.
    fn deliver(&self, publish: Publish, counters: &Counters) {
        let route = self
            .routes
            .iter()
            .find(|r| r.filters.iter().any(|f| filter_matches(f, &publish.topic)))
            .or(self.rest.as_ref());
        let Some(route) = route else {
            let n = bump(&counters.unrouted);
            log::debug!("mqtt: no consumer for topic {} ({n} so far)", shown(&publish.topic));
            return;
        };
        let sent = if route.stalled.load(Ordering::Relaxed) {
            route.tx.try_send(publish).map_err(|e| match e {
                TrySendError::Full(p) => SendTimeoutError::Timeout(p),
                TrySendError::Disconnected(p) => SendTimeoutError::Disconnected(p),
            })
        } else {
            route.tx.send_timeout(publish, DELIVERY_WAIT)
        };
        match sent {
            Ok(()) => route.stalled.store(false, Ordering::Relaxed),
            Err(SendTimeoutError::Timeout(p)) => {
                route.stalled.store(true, Ordering::Relaxed);
                let n = bump(&counters.delivery_dropped);
                if n == 1 || n % LOG_EVERY == 0 {
                    log::warn!(
                        "mqtt: consumer of {} is full; dropped the publish ({n} dropped so far)",
                        shown(&p.topic)
                    );
                }
            }
            Err(SendTimeoutError::Disconnected(p)) => {
                let n = bump(&counters.delivery_dropped);
                log::debug!(
                    "mqtt: consumer of {} has stopped; dropped ({n} so far)",
                    shown(&p.topic)
                );
            }
        }
    }
}

/// Collects the consumers, then starts the client.
pub struct ClientBuilder {
    options: Options,
    routes: Vec<Route>,
    rest: Option<Route>,
}

impl ClientBuilder {
    pub fn new(options: Options) -> ClientBuilder {
        ClientBuilder { options, routes: Vec::new(), rest: None }
    }

    /// Subscribes `filters` (QoS 1, at every connect) and returns the channel (bounded by
    /// `capacity`) that receives the publishes they match. Earlier routes win on overlap.
    /// Invalid filters are logged and left out.
    pub fn route(&mut self, filters: &[&str], capacity: usize) -> Receiver<Publish> {
        let (tx, rx) = bounded(capacity.max(1));
        let filters = filters
            .iter()
            .filter(|f| {
                let ok = is_valid_filter(f);
                if !ok {
                    log::error!("mqtt: topic filter {f:?} is not valid; not subscribing to it");
                }
                ok
            })
            .map(|f| f.to_string())
            .collect();
        self.routes.push(Route::new(filters, tx));
        rx
    }

    /// The channel for publishes no route claims: those of [`Publisher::subscribe`] filters.
    pub fn route_rest(&mut self, capacity: usize) -> Receiver<Publish> {
        let (tx, rx) = bounded(capacity.max(1));
        self.rest = Some(Route::new(Vec::new(), tx));
        rx
    }

    /// Starts `eh-mqtt`, which connects (and keeps reconnecting) in the background.
    ///
    /// # Errors
    /// `Tls` when the `eventBusTLS` files cannot be loaded; `Io` when the thread cannot start.
    pub fn start(self) -> Result<Client> {
        let tls = conn::tls_connector(&self.options)?;
        let (wake_tx, wake_rx) = bounded(1);
        let mut filters: Vec<String> = Vec::new();
        for f in self.routes.iter().flat_map(|r| r.filters.iter()) {
            if !filters.contains(f) {
                filters.push(f.clone());
            }
        }
        let shared = Arc::new(Shared {
            options: self.options,
            state: Mutex::new(State { filters, ..State::default() }),
            wake_tx,
            connected: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let routes = Arc::new(Routes { routes: self.routes, rest: self.rest });
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let runner = Runner { shared: shared.clone(), routes, tls, stop_rx, wake_rx };
        let thread = std::thread::Builder::new()
            .name("eh-mqtt".to_owned())
            .stack_size(CLIENT_STACK_BYTES)
            .spawn(move || runner.run())
            .map_err(|e| ErrorKind::Io.msg("spawn mqtt client thread").src(e))?;
        Ok(Client { publisher: Publisher { shared }, stop_tx: Some(stop_tx), thread: Some(thread) })
    }
}

/// The running client: stop it (or drop it) to disconnect and join its threads.
pub struct Client {
    publisher: Publisher,
    stop_tx: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    /// A handle to publish and subscribe through this client.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Flushes what is queued (up to 2 s, if connected), disconnects and joins the threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop_tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("bug: mqtt client thread panicked");
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Publishes and subscribes through the client. Cheap to clone, never blocks.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("broker", &self.shared.options.broker).finish()
    }
}

impl Publisher {
    /// Queues `payload` for `topic`. When the queue is full the oldest waiting publish is
    /// dropped (and counted) to make room.
    ///
    /// # Errors
    /// `Config` for a topic that is empty or has wildcards; `Full` for a payload bigger than
    /// the whole queue; `Stopped` once the client is stopping.
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<()> {
        let shared = &self.shared;
        let options = &shared.options;
        if !is_valid_topic(topic) {
            bump(&shared.counters.refused);
            return Err(ErrorKind::Config.msg(format!("mqtt: cannot publish to topic {topic:?}")));
        }
        let size = topic.len() + payload.len();
        if size > options.queue_max_bytes {
            bump(&shared.counters.refused);
            return Err(ErrorKind::Full.msg(format!(
                "mqtt: a publish of {size} bytes to {} is over mqttQueueMaxBytes {}",
                shown(topic),
                options.queue_max_bytes
            )));
        }
        let mut dropped = 0;
        {
            let mut state = shared.lock();
            if state.closed {
                bump(&shared.counters.refused);
                return Err(ErrorKind::Stopped.msg("mqtt client is stopping"));
            }
            while state.queue.len() >= options.queue_max_messages
                || state.queue_bytes + size > options.queue_max_bytes
            {
                let Some(old) = state.queue.pop_front() else { break };
                state.queue_bytes -= old.publish.topic.len() + old.publish.payload.len();
                dropped += 1;
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.queue_bytes += size;
            state
                .queue
                .push_back(Outgoing { seq, publish: Publish { topic: topic.to_owned(), payload } });
        }
        for _ in 0..dropped {
            let n = bump(&shared.counters.queue_dropped);
            if n == 1 || n % LOG_EVERY == 0 {
                log::warn!(
                    "mqtt: publish queue full ({} messages or {} bytes); dropped the oldest \
                     ({n} dropped so far)",
                    options.queue_max_messages,
                    options.queue_max_bytes
                );
            }
        }
        shared.wake();
        Ok(())
    }

    /// Adds `filter` to the subscriptions (now if connected, and at every reconnect); its
    /// publishes go to the `route_rest` channel unless a route claims them.
    ///
    /// # Errors
    /// `Config` for an invalid filter.
    pub fn subscribe(&self, filter: &str) -> Result<()> {
        if !is_valid_filter(filter) {
            return Err(ErrorKind::Config.msg(format!("mqtt: invalid topic filter {filter:?}")));
        }
        let mut state = self.shared.lock();
        if !state.filters.iter().any(|f| f == filter) {
            state.filters.push(filter.to_owned());
            state.sub_changes.push_back(SubChange::Subscribe(filter.to_owned()));
        }
        drop(state);
        self.shared.wake();
        Ok(())
    }

    /// Removes `filter` from the subscriptions.
    pub fn unsubscribe(&self, filter: &str) {
        let mut state = self.shared.lock();
        let before = state.filters.len();
        state.filters.retain(|f| f != filter);
        if state.filters.len() != before {
            state.sub_changes.push_back(SubChange::Unsubscribe(filter.to_owned()));
        }
        drop(state);
        self.shared.wake();
    }

    /// The filters subscribed at each connect.
    pub fn filters(&self) -> Vec<String> {
        self.shared.lock().filters.clone()
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> MqttStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU32| a.load(Ordering::Relaxed);
        let queued = {
            let state = self.shared.lock();
            (state.queue.len() + state.inflight.len()) as u32
        };
        MqttStats {
            connected: self.is_connected(),
            connects: get(&c.connects),
            published: get(&c.published),
            queued,
            queue_dropped: get(&c.queue_dropped),
            refused: get(&c.refused),
            received: get(&c.received),
            delivery_dropped: get(&c.delivery_dropped),
            unrouted: get(&c.unrouted),
            oversized: get(&c.oversized),
        }
    }
}

/// How a connection ended.
enum End {
    Stop,
    Lost(crate::error::Error),
}

/// The `eh-mqtt` thread.
struct Runner {
    shared: Arc<Shared>,
    routes: Arc<Routes>,
    tls: Option<SslConnector>,
    stop_rx: Receiver<()>,
    wake_rx: Receiver<()>,
}

impl Runner {
    fn run(self) {
        let broker = &self.shared.options.broker;
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u32;
        loop {
            match Conn::open(&self.shared.options, self.tls.as_ref(), true) {
                Ok((conn, leftover)) => {
                    failures = 0;
                    backoff = MIN_BACKOFF;
                    let n = bump(&self.shared.counters.connects);
                    log::info!(
                        "mqtt: connected to broker {}:{} (connection {n})",
                        broker.host,
                        broker.port
                    );
                    self.shared.connected.store(true, Ordering::Relaxed);
                    let end = self.session(&conn, leftover);
                    self.shared.connected.store(false, Ordering::Relaxed);
                    self.requeue_inflight();
                    match end {
                        End::Stop => break,
                        End::Lost(e) => log::warn!("mqtt: connection to the broker lost: {e}"),
                    }
                }
                Err(e) => {
                    failures += 1;
                    // Said once at warn; a broker that stays away is not news every 5 s.
                    if failures == 1 {
                        log::warn!(
                            "mqtt: cannot connect to broker {}:{}: {e}; retrying",
                            broker.host,
                            broker.port
                        );
                    } else {
                        log::debug!("mqtt: connect attempt {failures} failed: {e}");
                    }
                }
            }
            select! {
                recv(self.stop_rx) -> _ => break,
                default(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        let left = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.queue.len() + state.inflight.len()
        };
        if left > 0 {
            log::warn!("mqtt: stopping with {left} publish(es) not delivered to the broker");
        }
        log::info!("mqtt client stopped");
    }

    /// Puts unacknowledged publishes back at the head of the queue, in their original order.
    fn requeue_inflight(&self) {
        let mut state = self.shared.lock();
        let mut back: Vec<Outgoing> = std::mem::take(&mut state.inflight).into_values().collect();
        back.sort_by_key(|o| o.seq);
        for o in back.into_iter().rev() {
            state.queue_bytes += o.publish.topic.len() + o.publish.payload.len();
            state.queue.push_front(o);
        }
        state.sub_pending.clear();
        state.sub_changes.clear(); // the whole list is subscribed at the next connect
        state.ping_sent = None;
    }

    /// One connection: subscribe, start the reader, then send and keep alive until it ends.
    fn session(&self, conn: &Conn, leftover: Vec<u8>) -> End {
        let shared = &self.shared;
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = bounded::<crate::error::Error>(1);
            let routes = &self.routes;
            let reader = std::thread::Builder::new()
                .name("eh-mqtt-read".to_owned())
                .stack_size(READER_STACK_BYTES)
                .spawn_scoped(scope, move || {
                    let e = read_loop(conn, shared, routes, leftover);
                    let _ = done_tx.send(e);
                });
            if let Err(e) = reader {
                return End::Lost(ErrorKind::Io.msg("spawn mqtt reader").src(e));
            }
            let end = self.write_loop(conn, &done_rx);
            conn.shutdown(); // wakes the reader; leaving the scope joins it
            end
        })
    }

    fn write_loop(&self, conn: &Conn, done_rx: &Receiver<crate::error::Error>) -> End {
        let shared = &self.shared;
        let filters = shared.lock().filters.clone();
        if let Err(e) = self.send_subscribe(conn, &filters) {
            return End::Lost(e);
        }
        let keep_alive = shared.options.keep_alive.max(Duration::from_secs(1));
        let pings = tick(keep_alive / 2);
        loop {
            if let Err(e) = self.send_pending(conn) {
                return End::Lost(e);
            }
            select! {
                recv(self.wake_rx) -> _ => {}
                recv(pings) -> _ => {
                    let sent = shared.lock().ping_sent;
                    match sent {
                        Some(at) if at.elapsed() >= keep_alive => {
                            return End::Lost(ErrorKind::Timeout.msg(format!(
                                "no PINGRESP within the {keep_alive:?} keep-alive"
                            )));
                        }
                        Some(_) => {}
                        None => {
                            shared.lock().ping_sent = Some(Instant::now());
                            if let Err(e) = conn.write_all(&codec::encode_pingreq()) {
                                return End::Lost(e);
                            }
                        }
                    }
                }
                recv(done_rx) -> e => {
                    return End::Lost(e.unwrap_or_else(|_| ErrorKind::Closed.msg("mqtt reader ended")));
                }
                recv(self.stop_rx) -> _ => {
                    self.flush_before_stop(conn, done_rx);
                    let _ = conn.write_all(&codec::encode_disconnect());
                    return End::Stop;
                }
            }
        }
    }

    /// Sends what is queued until the queue and the in-flight window are empty, the
    /// connection ends, or `STOP_FLUSH` passes.
    fn flush_before_stop(&self, conn: &Conn, done_rx: &Receiver<crate::error::Error>) {
        let deadline = Instant::now() + STOP_FLUSH;
        loop {
            if self.send_pending(conn).is_err() {
                return;
            }
            let empty = {
                let state = self.shared.lock();
                state.queue.is_empty() && state.inflight.is_empty()
            };
            if empty {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            select! {
                recv(self.wake_rx) -> _ => {}
                recv(done_rx) -> _ => return,
                default(left) => return,
            }
        }
    }

    fn send_subscribe(&self, conn: &Conn, filters: &[String]) -> Result<()> {
        // Many filters go in packets of at most 16, so one SUBACK names few of them.
        for chunk in filters.chunks(16) {
            let id = {
                let mut state = self.shared.lock();
                let id = state.packet_id();
                state.sub_pending.insert(id, chunk.to_vec());
                id
            };
            let list: Vec<(&str, u8)> = chunk.iter().map(|f| (f.as_str(), 1u8)).collect();
            conn.write_all(&codec::encode_subscribe(id, &list))?;
        }
        Ok(())
    }

    /// Sends run-time subscription changes, then queued publishes while the window has room.
    fn send_pending(&self, conn: &Conn) -> Result<()> {
        loop {
            let change = self.shared.lock().sub_changes.pop_front();
            match change {
                None => break,
                Some(SubChange::Subscribe(f)) => self.send_subscribe(conn, &[f])?,
                Some(SubChange::Unsubscribe(f)) => {
                    let id = self.shared.lock().packet_id();
                    conn.write_all(&codec::encode_unsubscribe(id, &[f.as_str()]))?;
                }
            }
        }
        let options = &self.shared.options;
        loop {
            let packet = {
                let mut state = self.shared.lock();
                if state.inflight.len() >= INFLIGHT_WINDOW {
                    return Ok(());
                }
                let Some(out) = state.queue.pop_front() else { return Ok(()) };
                state.queue_bytes -= out.publish.topic.len() + out.publish.payload.len();
                if options.qos == 1 {
                    let id = state.packet_id();
                    let bytes = codec::encode_publish(
                        &out.publish.topic,
                        &out.publish.payload,
                        1,
                        options.retain,
                        false,
                        Some(id),
                    );
                    state.inflight.insert(id, out);
                    bytes
                } else {
                    codec::encode_publish(
                        &out.publish.topic,
                        &out.publish.payload,
                        0,
                        options.retain,
                        false,
                        None,
                    )
                }
            };
            conn.write_all(&packet)?;
            if options.qos == 0 {
                bump(&self.shared.counters.published);
            }
        }
    }
}

/// The `eh-mqtt-read` thread: returns why the connection ended.
fn read_loop(
    conn: &Conn,
    shared: &Shared,
    routes: &Routes,
    mut buf: Vec<u8>,
) -> crate::error::Error {
    let max_packet = shared.options.max_packet_bytes;
    // Bytes still to throw away of a packet over the size limit.
    let mut skip = 0usize;
    loop {
        if skip > 0 {
            let n = skip.min(buf.len());
            buf.drain(..n);
            skip -= n;
        }
        if skip == 0 {
            // Decoded packets are cut off the buffer once, after the loop: a drain per packet
            // would move the rest of a burst again for each one.
            let mut at = 0;
            loop {
                match codec::decode(&buf[at..], max_packet) {
                    Ok(Some((packet, used))) => {
                        at += used;
                        if let Err(e) = handle_packet(conn, shared, routes, packet) {
                            return e;
                        }
                    }
                    Ok(None) => break,
                    Err(DecodeError::TooLarge { total }) => {
                        let n = bump(&shared.counters.oversized);
                        log::warn!(
                            "mqtt: skipping a {total}-byte packet from the broker, over the \
                             {max_packet}-byte limit ({n} skipped so far)"
                        );
                        let now = total.min(buf.len() - at);
                        at += now;
                        skip = total - now;
                        break;
                    }
                    Err(e @ DecodeError::Malformed(_)) => {
                        return ErrorKind::Protocol
                            .msg("decode a packet from the broker")
                            .src(e.to_string());
                    }
                }
            }
            buf.drain(..at);
        }
        if buf.capacity() > 64 << 10 && buf.len() < 1024 {
            buf.shrink_to(4096); // a big packet passed; do not keep its buffer
        }
        match conn.wait_readable(READ_WAKE) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return e,
        }
        if let Err(e) = conn.read_available(&mut buf) {
            return e;
        }
    }
}

fn handle_packet(conn: &Conn, shared: &Shared, routes: &Routes, packet: Packet) -> Result<()> {
    match packet {
        Packet::Publish(IncomingPublish { topic, payload, packet_id, .. }) => {
            bump(&shared.counters.received);
            routes.deliver(Publish { topic, payload }, &shared.counters);
            if let Some(id) = packet_id {
                conn.write_all(&codec::encode_puback(id))?;
            }
        }
        Packet::PubAck { packet_id } => {
            let acked = shared.lock().inflight.remove(&packet_id).is_some();
            if acked {
                bump(&shared.counters.published);
                shared.wake();
            } else {
                log::debug!("mqtt: PUBACK for unknown packet id {packet_id}");
            }
        }
        Packet::SubAck { packet_id, codes } => {
            let filters = shared.lock().sub_pending.remove(&packet_id).unwrap_or_default();
            for (i, code) in codes.iter().enumerate() {
                if *code == 0x80 {
                    let filter = filters.get(i).map_or("?", String::as_str);
                    log::error!("mqtt: the broker refused the subscription to {filter:?}");
                }
            }
        }
        Packet::UnsubAck { .. } => {}
        Packet::PingResp => shared.lock().ping_sent = None,
        Packet::ConnAck { .. } => {
            return Err(ErrorKind::Protocol.msg("mqtt broker sent a second CONNACK"));
        }
    }
    Ok(())
}
