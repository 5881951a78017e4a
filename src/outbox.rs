//! The one bounded upstream queue (store-and-forward). Everything modules send to the cloud waits
//! here until the session's writer has written it to the socket; it outlives sessions and, with a
//! spool, restarts. The writer (`writer.rs`) pulls, on the session's writer thread or, through the
//! writer attached here, on the thread that has just pushed; the outbox never sees the socket and
//! knows nothing of modules.
//!
//! Invariants, true at the start and end of every method:
//! - `normal` holds at most `max_messages` messages and `max_bytes` encoded bytes, except for a
//!   message put back after a failed write (already accepted, never dropped for it);
//! - when a push would break a bound the policy decides: `Reject` hands the new message back to
//!   its sender, `DropOldest` drops from the head until it fits; every drop is counted and logged;
//! - a message whose resource matches a coalescing pattern replaces the unsent message with the same
//!   (resource, operation) in its place in the queue (latest wins), so an outage does not queue
//!   stale status;
//! - a message older than `ttl` is never sent: `next()` drops it, counted;
//! - a message leaves only through `next()` (taken by the writer); `put_back()` reverses that;
//!   `written()` moves it to the in-flight window, where it stays until the cloud has provably
//!   read it: `confirm(cursor)` (from the pong answering a ping sent after it) makes it final and
//!   only then is its spool record done. At the end of a session `requeue_unconfirmed()` puts the
//!   window back at the head, in order. So delivery is at least once (a resend keeps its msg_id,
//!   so duplicates can be recognised), never lost;
//! - at most `CONFIRM_WINDOW` messages are in flight; the window counts toward the bounds;
//! - `urgent` (ACKs, control answers) is served first, skips the rate limit and is not spooled:
//!   it holds at most `URGENT_CAP` messages and `URGENT_MAX_BYTES` bytes, and when a push would
//!   pass either its oldest are dropped and counted (the cloud re-sends what it did not see ACKed,
//!   protocol §4.4, so losing an ACK costs a resend, not data);
//! - `normal` is rate limited by a token bucket of `messageQPS` / `messageBurst`, so a backlog
//!   drains at that rate after a reconnect, not as a flood.

use crate::error::Result;
use crate::message::{now_millis, Message};
use crate::spool::Spool;
use crate::writer::Writer;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bound of the urgent lane (ACKs and control answers).
pub const URGENT_CAP: usize = 4096;
/// Byte bound of the urgent lane (encoded size). An ACK is a few hundred bytes, and at most about
/// 1.5 KiB with the fields it copies cut (`Message::bounded_reply`), so this holds thousands.
pub const URGENT_MAX_BYTES: usize = 1 << 20;
/// Done records are batched: written when this many are waiting, or when the queue runs empty.
const DONE_BATCH: usize = 64;
/// Written-but-unconfirmed messages at most; the writer then waits for a pong.
pub const CONFIRM_WINDOW: usize = 1024;
/// A message is encoded once, for the spool, and that text is kept for the writer while at most
/// this many messages are queued (the writer keeps up); behind a longer backlog it is dropped and
/// the writer encodes again, so the copy costs at most this many messages' worth of memory.
const KEEP_WIRE_QUEUED: usize = 256;

/// Which lane a message travels in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// ACKs and control answers: first, and not rate limited.
    Urgent,
    /// Everything else modules send: in order, rate limited, bounded, spooled.
    Normal,
}

/// What to do when a push would exceed the bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FullPolicy {
    /// Refuse the new message; its sender gets it back with an error.
    Reject,
    /// Drop the oldest queued messages until the new one fits.
    DropOldest,
}

/// A message taken by the writer. Hand it back with [`Outbox::put_back`] if the write failed, or
/// confirm it with [`Outbox::sent`].
#[derive(Debug)]
pub struct Taken {
    pub message: Message,
    /// The message's wire text when the outbox still has it from the spool write.
    pub wire: Option<String>,
    pub lane: Lane,
    /// A request: its sender waits for the response (see [`Outbox::push_request`]).
    pub awaited: bool,
    seq: u64,
    enqueued_ms: i64,
    spooled: bool,
}

/// What the writer should do next.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // returned once per message and consumed at once; boxing would allocate per message
pub enum Next {
    /// Write this message.
    Ready(Taken),
    /// Messages wait but the rate limit says not yet: try again after this long.
    Wait(Duration),
    /// Nothing to send, and the spool's fsync is due after this long: call again then (the call
    /// does the fsync), or at the bell.
    SyncDue(Duration),
    /// Nothing to send: wait for the bell.
    Empty,
    /// The in-flight window is full: ask for a confirmation (ping) and wait for the bell.
    WindowFull,
}

/// A message the outbox refused, handed back to the sender with the reason.
#[derive(Debug)]
pub struct Rejected {
    /// Boxed so the common `Ok` path stays small; refusal is the cold path.
    pub message: Box<Message>,
    pub reason: &'static str,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "outbox refused {:?}: {}", self.message, self.reason)
    }
}

impl std::error::Error for Rejected {}

/// Bounds, rate and policies of the outbox.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
    /// Tokens added per second.
    pub rate_per_sec: u32,
    /// Bucket size.
    pub burst: u32,
    pub full_policy: FullPolicy,
    /// Messages older than this are not sent. `None`: no expiry.
    pub ttl: Option<Duration>,
    /// Resource substrings marking status-like messages where the latest wins.
    pub coalesce: Vec<String>,
}

impl Limits {
    /// Bounds with no policy extras: reject when full, no TTL, no coalescing.
    pub fn simple(max_messages: usize, max_bytes: usize, rate_per_sec: u32, burst: u32) -> Limits {
        Limits {
            max_messages,
            max_bytes,
            rate_per_sec,
            burst,
            full_policy: FullPolicy::Reject,
            ttl: None,
            coalesce: Vec::new(),
        }
    }
}

/// Where and how the outbox keeps its disk copy.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub sync_interval: Duration,
}

/// Counters of what the outbox refused, replaced or dropped (32-bit: works on every target).
#[derive(Debug, Default)]
pub struct OutboxCounters {
    pub rejected_full: AtomicU32,
    pub dropped_oldest: AtomicU32,
    pub expired: AtomicU32,
    pub coalesced: AtomicU32,
    pub urgent_dropped: AtomicU32,
    /// Spool writes that failed (disk full, read-only): the message was kept in memory only.
    pub spool_errors: AtomicU32,
}

/// The upstream queue. Share it in an `Arc`.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Changed live by a reload. Lock order: `state` before `limits`, never the reverse.
    limits: Mutex<Limits>,
    /// Rung whenever something is queued (rings coalesce until the writer takes them); the writer
    /// waits on `bell_cond`. A flag and a condition variable rather than a channel: a channel's
    /// blocking select spins and yields the CPU several times before it sleeps, on every message
    /// of a trickle (issue 14).
    bell: Mutex<Bell>,
    bell_cond: Condvar,
    /// The session's writer while a link is up: a push hands its message straight to it, so the
    /// pushing thread writes it when nobody else is writing (see `writer.rs`).
    writer: Mutex<Option<Arc<Writer>>>,
    pub counters: OutboxCounters,
}

/// What a push queued, for the writer it is handed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// A message of the normal lane (`push`).
    Plain,
    /// ACKs or control answers (`push_urgent`, `push_urgent_all`).
    Acks,
    /// A request (`push_request`).
    Request,
}

/// The writer's bell: `rung` by every push the writer thread has to handle, `prompt` as well when
/// one of them is an ACK or a request, which must not wait for a stream's gathering to end.
#[derive(Debug, Default)]
struct Bell {
    rung: bool,
    prompt: bool,
}

#[derive(Debug)]
struct Entry {
    message: Message,
    /// Wire text kept from the spool write (see `KEEP_WIRE_QUEUED`).
    wire: Option<String>,
    size: usize,
    seq: u64,
    enqueued_ms: i64,
    spooled: bool,
    awaited: bool,
    coalesce_key: Option<(String, String)>,
}

#[derive(Debug)]
struct State {
    urgent: VecDeque<Message>,
    /// Encoded bytes of `urgent` (`encoded_len_hint`), kept within `URGENT_MAX_BYTES`.
    urgent_bytes: usize,
    /// Ordered by `seq`. Entries are replaced in place (coalescing), never removed from the middle.
    normal: VecDeque<Entry>,
    normal_bytes: usize,
    /// (resource, operation) → seq of the queued message with that key.
    latest: HashMap<(String, String), u64>,
    next_seq: u64,
    tokens: f64,
    refilled_at: Instant,
    spool: Option<Spool>,
    pending_done: Vec<u64>,
    /// Written this session, not yet confirmed: (cursor, entry), in write order.
    in_flight: VecDeque<(u64, Entry)>,
    in_flight_bytes: usize,
    /// The agent is stopping: new messages are refused.
    closed: bool,
}

impl State {
    /// The spooled message `seq` is finished (sent, replaced, expired, dropped).
    fn finish(&mut self, seq: u64) {
        if self.spool.is_some() {
            self.pending_done.push(seq);
            if self.pending_done.len() >= DONE_BATCH {
                self.flush_done();
            }
        }
    }

    fn flush_done(&mut self) {
        if let Some(spool) = self.spool.as_mut() {
            spool.done(&self.pending_done);
        }
        self.pending_done.clear();
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let entry = self.normal.pop_front()?;
        self.normal_bytes -= entry.size;
        if let Some(key) = &entry.coalesce_key {
            if self.latest.get(key) == Some(&entry.seq) {
                self.latest.remove(key);
            }
        }
        Some(entry)
    }
}

impl Outbox {
    /// An in-memory outbox.
    pub fn new(limits: Limits) -> Outbox {
        Outbox::build(limits, None, Vec::new())
    }

    /// An outbox with a disk spool: messages left from a previous run are queued again first
    /// (those past their TTL are dropped, counted).
    ///
    /// # Errors
    /// `Io` when the spool directory cannot be created or listed.
    pub fn open(limits: Limits, spool: &SpoolOptions) -> Result<Outbox> {
        let (spool, recovered) = Spool::open(&spool.dir, spool.sync_interval)?;
        let recovered: Vec<_> =
            recovered.into_iter().map(|r| (r.seq, r.enqueued_ms, r.message)).collect();
        if !recovered.is_empty() {
            log::info!("outbox: {} message(s) recovered from the spool", recovered.len());
        }
        Ok(Outbox::build(limits, Some(spool), recovered))
    }

    fn build(limits: Limits, spool: Option<Spool>, recovered: Vec<(u64, i64, Message)>) -> Outbox {
        let next_seq = recovered.last().map_or(0, |(seq, _, _)| seq + 1);
        let outbox = Outbox {
            state: Mutex::new(State {
                urgent: VecDeque::new(),
                urgent_bytes: 0,
                normal: VecDeque::new(),
                normal_bytes: 0,
                latest: HashMap::new(),
                next_seq,
                tokens: f64::from(limits.burst),
                refilled_at: Instant::now(),
                spool,
                pending_done: Vec::new(),
                in_flight: VecDeque::new(),
                in_flight_bytes: 0,
                closed: false,
            }),
            limits: Mutex::new(limits),
            bell: Mutex::new(Bell::default()),
            bell_cond: Condvar::new(),
            writer: Mutex::new(None),
            counters: OutboxCounters::default(),
        };
        {
            let mut state = outbox.lock();
            for (seq, enqueued_ms, message) in recovered {
                // Re-admitted without the spool write (they are on disk already), in order, with
                // the current bounds and policy.
                let entry = outbox.entry(message, seq, enqueued_ms, true);
                if let Err(entry) = outbox.admit(&mut state, entry) {
                    log::warn!(
                        "outbox: recovered {:?} does not fit the bounds; dropped",
                        entry.message
                    );
                    outbox.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                    state.finish(entry.seq);
                }
            }
            state.next_seq = state.next_seq.max(next_seq);
        }
        outbox
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is queues and numbers updated under the lock without panicking paths; a panic
        // elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn limits(&self) -> MutexGuard<'_, Limits> {
        // Plain values replaced whole: a panic elsewhere cannot leave them half-updated.
        self.limits.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies new bounds, rate and policies (a config reload). Messages already queued stay,
    /// even if they now exceed the bounds; new pushes see the new limits.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits() = limits;
        self.ring(); // a faster rate may let the writer go now
    }

    /// Attaches the session's writer (`None`: the session is over).
    pub fn attach_writer(&self, writer: Option<Arc<Writer>>) {
        *self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = writer;
    }

    /// After a push: the attached writer writes what is ready on this thread if nobody else is
    /// writing and the push is not part of a dense stream; otherwise the writer thread is rung
    /// (a prompt ring for ACKs and requests).
    fn hand_over(&self, pushed: Pushed) {
        let writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if !writer.is_some_and(|writer| writer.write_queued(self, pushed)) {
            self.ring_with(pushed != Pushed::Plain);
        }
    }

    /// Wakes the writer (or leaves the ring for its next wait). Also used to wake it when the
    /// session stops.
    pub fn ring(&self) {
        self.ring_with(false);
    }

    fn ring_with(&self, prompt: bool) {
        let mut bell = self.bell();
        if !bell.rung || (prompt && !bell.prompt) {
            bell.rung = true;
            bell.prompt |= prompt;
            drop(bell);
            self.bell_cond.notify_one();
        }
    }

    fn bell(&self) -> MutexGuard<'_, Bell> {
        self.bell.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry(&self, message: Message, seq: u64, enqueued_ms: i64, spooled: bool) -> Entry {
        let coalesce_key = self
            .limits()
            .coalesce
            .iter()
            .any(|pattern| message.route.resource.contains(pattern.as_str()))
            .then(|| (message.route.resource.clone(), message.route.operation.clone()));
        Entry {
            size: message.encoded_len_hint(),
            message,
            wire: None,
            seq,
            enqueued_ms,
            spooled,
            awaited: false,
            coalesce_key,
        }
    }

    /// Puts `entry` in the queue: in place of its older twin if it coalesces, else at the back,
    /// applying the full policy. Returns the entry's index, or hands the entry back when the
    /// policy refuses it.
    #[allow(clippy::result_large_err)] // private; the refused entry goes straight back to its sender
    fn admit(&self, state: &mut State, entry: Entry) -> std::result::Result<usize, Entry> {
        if let Some(key) = &entry.coalesce_key {
            // Linear scan: status-like messages are rare, and the queue is bounded.
            let twin = state
                .latest
                .get(key)
                .and_then(|&seq| state.normal.iter().position(|e| e.seq == seq));
            if let Some(index) = twin {
                state.latest.insert(key.clone(), entry.seq);
                state.normal_bytes = state.normal_bytes - state.normal[index].size + entry.size;
                let old = std::mem::replace(&mut state.normal[index], entry);
                log::debug!("outbox: {:?} replaced by a newer one (latest wins)", old.message);
                self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                if old.spooled {
                    state.finish(old.seq);
                }
                return Ok(index);
            }
        }
        let (max_messages, max_bytes, full_policy) = {
            let limits = self.limits();
            (limits.max_messages, limits.max_bytes, limits.full_policy)
        };
        let fits = |state: &State| {
            state.normal.len() + state.in_flight.len() < max_messages
                && state.normal_bytes + state.in_flight_bytes + entry.size <= max_bytes
        };
        if !fits(state) {
            match full_policy {
                FullPolicy::Reject => return Err(entry),
                FullPolicy::DropOldest => {
                    while !fits(state) {
                        let Some(old) = state.pop_front() else { return Err(entry) };
                        log::warn!("outbox full: dropped oldest {:?}", old.message);
                        self.counters.dropped_oldest.fetch_add(1, Ordering::Relaxed);
                        if old.spooled {
                            state.finish(old.seq);
                        }
                    }
                }
            }
        }
        if let Some(key) = &entry.coalesce_key {
            state.latest.insert(key.clone(), entry.seq);
        }
        state.normal_bytes += entry.size;
        state.normal.push_back(entry);
        Ok(state.normal.len() - 1)
    }

    /// Waits until the bell rings (something was queued, the window has room, the session stops)
    /// or `timeout` passes (`None`: no limit), and takes the ring. Returns whether it rang.
    pub fn wait_bell(&self, timeout: Option<Duration>) -> bool {
        self.wait_for(timeout.map(|t| Instant::now() + t), false)
    }

    /// Waits until an ACK or a request is pushed or `until` passes, and takes that ring. Returns
    /// whether it came; a plain ring stays for the next `wait_bell`.
    pub fn wait_prompt(&self, until: Instant) -> bool {
        self.wait_for(Some(until), true)
    }

    fn wait_for(&self, deadline: Option<Instant>, prompt_only: bool) -> bool {
        let rang = |bell: &Bell| if prompt_only { bell.prompt } else { bell.rung };
        let mut bell = self.bell();
        while !rang(&bell) {
            bell = match deadline {
                None => self.bell_cond.wait(bell).unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    match self.bell_cond.wait_timeout(bell, left) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    }
                }
            };
        }
        bell.prompt = false;
        if !prompt_only {
            bell.rung = false;
        }
        true
    }

    /// Takes a ring without waiting. Returns whether the bell had rung.
    pub fn take_ring(&self) -> bool {
        let mut bell = self.bell();
        bell.prompt = false;
        std::mem::replace(&mut bell.rung, false)
    }

    /// Queues a message in the normal lane (and in the spool, before returning).
    ///
    /// # Errors
    /// Under the `Reject` policy, hands the message back when the outbox is full (by count or bytes).
    pub fn push(&self, message: Message) -> std::result::Result<(), Rejected> {
        self.queue(message, false)
    }

    /// Queues a request, a message whose sender waits for the response: as [`Outbox::push`], but
    /// it is not spooled and it is written at once, never held back to share a flush. A request
    /// lives as long as its waiter, which a restart ends: sent again by the next process, its
    /// response would find nobody waiting.
    ///
    /// # Errors
    /// As [`Outbox::push`].
    pub fn push_request(&self, message: Message) -> std::result::Result<(), Rejected> {
        self.queue(message, true)
    }

    fn queue(&self, message: Message, awaited: bool) -> std::result::Result<(), Rejected> {
        let mut state = self.lock();
        if state.closed {
            return Err(Rejected { message: Box::new(message), reason: "agent stopping" });
        }
        let seq = state.next_seq;
        let mut entry = self.entry(message, seq, now_millis(), false);
        entry.awaited = awaited;
        let index = match self.admit(&mut state, entry) {
            Ok(index) => index,
            Err(refused) => {
                drop(state);
                self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
                return Err(Rejected { message: Box::new(refused.message), reason: "outbox full" });
            }
        };
        state.next_seq += 1;
        let State { spool, normal, .. } = &mut *state;
        if let Some(spool) = spool.as_mut().filter(|_| !awaited) {
            let keep_wire = normal.len() <= KEEP_WIRE_QUEUED;
            let entry = &mut normal[index];
            let wire = entry.message.encode();
            entry.spooled = spool.put_encoded(entry.seq, entry.enqueued_ms, &wire);
            if !entry.spooled {
                self.counters.spool_errors.fetch_add(1, Ordering::Relaxed);
            }
            if keep_wire {
                entry.wire = Some(wire);
            }
        }
        drop(state);
        self.hand_over(if awaited { Pushed::Request } else { Pushed::Plain });
        Ok(())
    }

    /// Queues an ACK or control answer in the urgent lane; if the lane is full the oldest is
    /// dropped and counted (see the type's invariants for why that is safe).
    pub fn push_urgent(&self, message: Message) {
        self.push_urgent_all(std::iter::once(message));
    }

    /// As [`Outbox::push_urgent`] for several (a module's ACKs for a batch it applied): they are
    /// handed over together, so they share a flush instead of costing a send each.
    pub fn push_urgent_all(&self, messages: impl IntoIterator<Item = Message>) {
        let mut state = self.lock();
        let mut dropped = 0;
        let mut queued = false;
        for message in messages {
            let size = message.encoded_len_hint();
            if size > URGENT_MAX_BYTES {
                // Only a caller bypassing `Message::bounded_reply` gets here: the lane could hold
                // nothing else.
                log::warn!(
                    "outbox: urgent message of {size} bytes over {URGENT_MAX_BYTES}, dropped"
                );
                self.counters.urgent_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            while state.urgent.len() >= URGENT_CAP || state.urgent_bytes + size > URGENT_MAX_BYTES {
                let Some(old) = state.urgent.pop_front() else { break };
                state.urgent_bytes -= old.encoded_len_hint();
                dropped += 1;
                if dropped == 1 {
                    log::warn!(
                        "outbox: urgent lane full ({URGENT_CAP} messages or {URGENT_MAX_BYTES} \
                         bytes), dropped {old:?}"
                    );
                }
            }
            state.urgent_bytes += size;
            state.urgent.push_back(message);
            queued = true;
        }
        drop(state);
        if dropped > 0 {
            self.counters.urgent_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if queued {
            self.hand_over(Pushed::Acks);
        }
    }

    /// Encoded bytes waiting in the urgent lane.
    pub fn urgent_bytes(&self) -> usize {
        self.lock().urgent_bytes
    }

    /// Takes the next message to write, honouring lane priority, TTL and the rate limit.
    pub fn next(&self, now: Instant) -> Next {
        let mut state = self.lock();
        if let Some(message) = state.urgent.pop_front() {
            state.urgent_bytes -= message.encoded_len_hint();
            return Next::Ready(Taken {
                message,
                wire: None,
                lane: Lane::Urgent,
                seq: 0,
                enqueued_ms: 0,
                spooled: false,
                awaited: false,
            });
        }
        let (ttl, rate, burst) = {
            let limits = self.limits();
            (limits.ttl, f64::from(limits.rate_per_sec), f64::from(limits.burst))
        };
        if let Some(ttl) = ttl {
            let oldest_allowed = now_millis() - ttl.as_millis() as i64;
            while state.normal.front().is_some_and(|e| e.enqueued_ms < oldest_allowed) {
                if let Some(old) = state.pop_front() {
                    log::warn!("outbox: dropped {:?}, older than messageTTL", old.message);
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    if old.spooled {
                        state.finish(old.seq);
                    }
                }
            }
        }
        if state.in_flight.len() >= CONFIRM_WINDOW {
            return Next::WindowFull;
        }
        if state.normal.is_empty() {
            state.flush_done();
            if let Some(spool) = state.spool.as_mut() {
                // The fsync waits for `sync_interval` (the spool's bound on what a power cut
                // loses) instead of coming every time the queue runs empty: at low rates that was
                // one fdatasync per message, under this lock (scripts/bench.sh, sync c1).
                match spool.sync_due_in() {
                    Some(left) if !left.is_zero() => return Next::SyncDue(left),
                    Some(_) => spool.sync(),
                    None => {}
                }
            }
            return Next::Empty;
        }
        let elapsed = now.saturating_duration_since(state.refilled_at).as_secs_f64();
        state.refilled_at = now;
        state.tokens = (state.tokens + elapsed * rate).min(burst);
        if state.tokens < 1.0 {
            return Next::Wait(Duration::from_secs_f64((1.0 - state.tokens) / rate));
        }
        state.tokens -= 1.0;
        match state.pop_front() {
            Some(e) => Next::Ready(Taken {
                message: e.message,
                wire: e.wire,
                lane: Lane::Normal,
                seq: e.seq,
                enqueued_ms: e.enqueued_ms,
                spooled: e.spooled,
                awaited: e.awaited,
            }),
            None => Next::Empty, // cannot happen: checked non-empty above under the same lock
        }
    }

    /// Records that a taken message was written to the socket as the session's `cursor`-th
    /// message. It stays in flight until [`Outbox::confirm`] covers its cursor.
    pub fn written(&self, taken: Taken, cursor: u64) {
        if taken.lane == Lane::Urgent {
            return; // ACKs and control answers are not confirmed (see the invariants)
        }
        let entry = Entry {
            size: taken.message.encoded_len_hint(),
            coalesce_key: None,
            message: taken.message,
            wire: None, // no longer needed once written
            seq: taken.seq,
            enqueued_ms: taken.enqueued_ms,
            spooled: taken.spooled,
            awaited: taken.awaited,
        };
        let mut state = self.lock();
        state.in_flight_bytes += entry.size;
        state.in_flight.push_back((cursor, entry));
    }

    /// The cloud has read every message written up to `cursor` this session: they are final.
    pub fn confirm(&self, cursor: u64) {
        let mut state = self.lock();
        let was_full = state.in_flight.len() >= CONFIRM_WINDOW;
        while state.in_flight.front().is_some_and(|(c, _)| *c <= cursor) {
            if let Some((_, entry)) = state.in_flight.pop_front() {
                state.in_flight_bytes -= entry.size;
                if entry.spooled {
                    state.finish(entry.seq);
                }
            }
        }
        if state.in_flight.is_empty() {
            state.flush_done();
        }
        drop(state);
        if was_full {
            self.ring();
        }
    }

    /// Messages written but not confirmed when a session ended: the cloud may not have read
    /// them, so they go back to the head of the queue, in order, keeping their msg_id. Returns
    /// how many.
    pub fn requeue_unconfirmed(&self) -> usize {
        let mut state = self.lock();
        let count = state.in_flight.len();
        while let Some((_, entry)) = state.in_flight.pop_back() {
            state.in_flight_bytes -= entry.size;
            // A status-like message coalesces again; if a newer twin is already queued, the
            // newer one wins and this one is finished.
            let awaited = entry.awaited;
            let mut entry = self.entry(entry.message, entry.seq, entry.enqueued_ms, entry.spooled);
            entry.awaited = awaited;
            if let Some(key) = entry.coalesce_key.take() {
                if state.latest.contains_key(&key) {
                    self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                    if entry.spooled {
                        state.finish(entry.seq);
                    }
                    continue;
                }
                state.latest.insert(key.clone(), entry.seq);
                entry.coalesce_key = Some(key);
            }
            state.normal_bytes += entry.size;
            state.normal.push_front(entry);
        }
        drop(state);
        if count > 0 {
            self.ring();
        }
        count
    }

    /// Messages written this session and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight.len()
    }

    /// Returns a message whose write failed to the head of its lane, so it goes first on the
    /// next session (protocol §8 W1: Go loses it). Its rate token is refunded.
    pub fn put_back(&self, taken: Taken) {
        let mut state = self.lock();
        match taken.lane {
            Lane::Urgent => {
                state.urgent_bytes += taken.message.encoded_len_hint();
                state.urgent.push_front(taken.message);
            }
            Lane::Normal => {
                let entry = Entry {
                    size: taken.message.encoded_len_hint(),
                    coalesce_key: None, // a newer twin, if any, is already queued behind it
                    message: taken.message,
                    wire: taken.wire,
                    seq: taken.seq,
                    enqueued_ms: taken.enqueued_ms,
                    spooled: taken.spooled,
                    awaited: taken.awaited,
                };
                state.normal_bytes += entry.size;
                state.normal.push_front(entry);
                let burst = f64::from(self.limits().burst);
                state.tokens = (state.tokens + 1.0).min(burst);
            }
        }
        drop(state);
        self.ring();
    }

    /// Refuses every later `push` ("agent stopping"); what is queued still goes out.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Writes batched spool records and fsyncs: call before the process exits.
    pub fn flush(&self) {
        let mut state = self.lock();
        state.flush_done();
        if let Some(spool) = state.spool.as_mut() {
            spool.sync();
        }
    }

    /// Messages waiting in both lanes or in flight.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.urgent.len() + state.normal.len() + state.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate encoded bytes waiting in the normal lane or in flight.
    pub fn bytes(&self) -> usize {
        let state = self.lock();
        state.normal_bytes + state.in_flight_bytes
    }

    /// Bytes of spool segments on disk (0 without a spool).
    pub fn spool_bytes(&self) -> u64 {
        self.lock().spool.as_ref().map_or(0, |s| s.disk_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Route;

    fn msg(n: usize) -> Message {
        Message::with_text(Route { resource: format!("default/x/{n}"), ..Route::default() }, "v")
    }

    fn status(value: &str) -> Message {
        let route = Route {
            operation: "update".into(),
            resource: "default/nodestatus/gw".into(),
            ..Route::default()
        };
        Message::with_text(route, value)
    }

    fn limits(max_messages: usize) -> Limits {
        Limits::simple(max_messages, 1 << 20, 1000, 1000)
    }

    fn take(o: &Outbox) -> Taken {
        match o.next(Instant::now()) {
            Next::Ready(t) => t,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn drain(o: &Outbox) -> Vec<String> {
        let mut out = Vec::new();
        while let Next::Ready(t) = o.next(Instant::now()) {
            out.push(t.message.route.resource.clone());
            o.written(t, 0);
            o.confirm(0);
        }
        out
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgehub-outbox-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn fifo_with_count_bound_at_n_and_n_plus_1() {
        let o = Outbox::new(limits(3));
        for n in 0..3 {
            o.push(msg(n)).unwrap();
        }
        let rejected = o.push(msg(3)).unwrap_err();
        assert_eq!(rejected.message.route.resource, "default/x/3");
        assert_eq!(o.counters.rejected_full.load(Ordering::Relaxed), 1);
        assert_eq!(drain(&o), ["default/x/0", "default/x/1", "default/x/2"]);
        assert!(matches!(o.next(Instant::now()), Next::Empty));
    }

    #[test]
    fn byte_bound_refuses_one_byte_over() {
        let size = msg(0).encoded_len_hint();
        let o = Outbox::new(Limits::simple(100, 2 * size, 1000, 1000));
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        assert!(o.push(msg(2)).is_err());
        assert_eq!(o.bytes(), 2 * size);
    }

    #[test]
    fn drop_oldest_policy_keeps_the_newest_and_counts() {
        let o = Outbox::new(Limits { full_policy: FullPolicy::DropOldest, ..limits(3) });
        for n in 0..5 {
            o.push(msg(n)).unwrap();
        }
        assert_eq!(o.counters.dropped_oldest.load(Ordering::Relaxed), 2);
        assert_eq!(drain(&o), ["default/x/2", "default/x/3", "default/x/4"]);
    }

    #[test]
    fn put_back_goes_first_and_may_exceed_bound() {
        let o = Outbox::new(limits(2));
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        let first = take(&o);
        o.push(msg(2)).unwrap();
        o.put_back(first);
        assert_eq!(o.len(), 3);
        assert_eq!(drain(&o), ["default/x/0", "default/x/1", "default/x/2"]);
    }

    #[test]
    fn urgent_goes_before_normal_and_skips_rate_limit() {
        let o = Outbox::new(Limits::simple(10, 1 << 20, 1, 1));
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        o.push_urgent(msg(9));
        let now = Instant::now();
        assert!(
            matches!(o.next(now), Next::Ready(t) if t.lane == Lane::Urgent && t.message.route.resource == "default/x/9")
        );
        assert!(matches!(o.next(now), Next::Ready(t) if t.lane == Lane::Normal));
        match o.next(now) {
            Next::Wait(d) => assert!(d > Duration::from_millis(900) && d <= Duration::from_secs(1)),
            other => panic!("expected wait, got {other:?}"),
        }
        o.push_urgent(msg(8));
        assert!(matches!(o.next(now), Next::Ready(t) if t.lane == Lane::Urgent));
        assert!(
            matches!(o.next(now + Duration::from_secs(1)), Next::Ready(t) if t.lane == Lane::Normal)
        );
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let o = Outbox::new(Limits::simple(100, 1 << 20, 10, 5));
        for n in 0..20 {
            o.push(msg(n)).unwrap();
        }
        let t0 = Instant::now();
        let burst = (0..20).take_while(|_| matches!(o.next(t0), Next::Ready(..))).count();
        assert_eq!(burst, 5);
        let t1 = t0 + Duration::from_millis(500);
        let more = (0..20).take_while(|_| matches!(o.next(t1), Next::Ready(..))).count();
        assert_eq!(more, 5);
    }

    #[test]
    fn bell_rings_once_for_many_pushes() {
        let o = Outbox::new(limits(10));
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        assert!(o.take_ring());
        assert!(!o.take_ring());
    }

    #[test]
    fn a_batch_of_acks_is_queued_in_order_and_bounded_like_single_ones() {
        let o = Outbox::new(limits(10));
        o.push_urgent_all((0..3).map(msg));
        assert_eq!(drain(&o), ["default/x/0", "default/x/1", "default/x/2"]);
        o.push_urgent_all((0..=URGENT_CAP).map(msg));
        assert_eq!(o.counters.urgent_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(take(&o).message.route.resource, "default/x/1");
    }

    #[test]
    fn urgent_lane_full_drops_oldest_and_counts() {
        let o = Outbox::new(limits(1));
        for n in 0..=URGENT_CAP {
            o.push_urgent(msg(n));
        }
        assert_eq!(o.counters.urgent_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(take(&o).message.route.resource, "default/x/1");
    }

    /// Issue 11 item 3: the urgent lane is bounded by bytes as well as by count; a push that
    /// would pass the byte bound drops the oldest until it fits, and taking or putting back keeps
    /// the byte count exact.
    #[test]
    fn urgent_lane_is_bounded_by_bytes_and_drops_oldest() {
        let o = Outbox::new(limits(1));
        let big = |n: usize| {
            let mut m = msg(n);
            m.route.resource = format!("default/x/{n:03}/{}", "r".repeat(100 << 10));
            m
        };
        let size = big(0).encoded_len_hint();
        let fit = URGENT_MAX_BYTES / size;
        for n in 0..fit + 5 {
            o.push_urgent(big(n));
            assert!(o.urgent_bytes() <= URGENT_MAX_BYTES);
        }
        assert_eq!(o.counters.urgent_dropped.load(Ordering::Relaxed), 5);
        assert_eq!(o.len(), fit);
        let first = take(&o);
        assert!(first.message.route.resource.starts_with("default/x/005/"), "oldest went first");
        assert_eq!(o.urgent_bytes(), (fit - 1) * size);
        o.put_back(first);
        assert_eq!(o.urgent_bytes(), fit * size);

        let mut huge = msg(99);
        huge.route.resource = "h".repeat(URGENT_MAX_BYTES + 1);
        o.push_urgent(huge);
        assert_eq!(o.counters.urgent_dropped.load(Ordering::Relaxed), 6);
        assert_eq!(o.len(), fit, "a message over the whole bound displaces nothing");
    }

    #[test]
    fn status_coalesces_latest_wins_in_place_and_frees_no_slot() {
        let o = Outbox::new(Limits { coalesce: vec!["/nodestatus/".into()], ..limits(10) });
        o.push(msg(0)).unwrap();
        o.push(status("old")).unwrap();
        o.push(msg(1)).unwrap();
        for i in 0..100 {
            o.push(status(&format!("v{i}"))).unwrap();
        }
        assert_eq!(o.len(), 3, "a hundred reports during an outage occupy one slot");
        assert_eq!(o.counters.coalesced.load(Ordering::Relaxed), 100);
        let order: Vec<_> = (0..3).map(|_| take(&o).message).collect();
        assert_eq!(order[1].content_text().as_deref(), Some("v99"));
        assert_eq!(order[2].route.resource, "default/x/1");
        // Once the status is taken, a new one queues afresh.
        o.push(status("after")).unwrap();
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn unconfirmed_messages_go_back_in_order_with_their_ids() {
        let o = Outbox::new(limits(10));
        for n in 0..4 {
            o.push(msg(n)).unwrap();
        }
        let ids: Vec<String> = (1..=3)
            .map(|cursor| {
                let t = take(&o);
                let id = t.message.header.id.clone();
                o.written(t, cursor);
                id
            })
            .collect();
        o.confirm(1); // the cloud proved it read the first
        assert_eq!(o.in_flight(), 2);
        assert_eq!(o.len(), 3);
        assert_eq!(o.requeue_unconfirmed(), 2);
        let again: Vec<_> = (0..3).map(|_| take(&o).message).collect();
        assert_eq!(again[0].header.id, ids[1], "resent with the same msg_id");
        assert_eq!(again[1].header.id, ids[2]);
        assert_eq!(again[2].route.resource, "default/x/3");
    }

    #[test]
    fn a_full_window_waits_for_confirmation_and_confirm_rings() {
        let o = Outbox::new(Limits::simple(CONFIRM_WINDOW + 10, 1 << 24, 1 << 20, 1 << 20));
        for n in 0..CONFIRM_WINDOW + 1 {
            o.push(msg(n)).unwrap();
        }
        for cursor in 1..=CONFIRM_WINDOW as u64 {
            let t = take(&o);
            o.written(t, cursor);
        }
        o.take_ring();
        assert!(matches!(o.next(Instant::now()), Next::WindowFull));
        o.confirm(10);
        assert!(o.take_ring(), "room in the window wakes the writer");
        assert!(matches!(o.next(Instant::now()), Next::Ready(_)));
    }

    #[test]
    fn requeued_status_loses_to_a_newer_one() {
        let o = Outbox::new(Limits { coalesce: vec!["/nodestatus/".into()], ..limits(10) });
        o.push(status("old")).unwrap();
        let t = take(&o);
        o.written(t, 1);
        o.push(status("new")).unwrap();
        o.requeue_unconfirmed();
        assert_eq!(o.len(), 1);
        assert_eq!(take(&o).message.content_text().as_deref(), Some("new"));
    }

    #[test]
    fn expired_messages_are_not_sent() {
        let o = Outbox::new(Limits { ttl: Some(Duration::from_millis(50)), ..limits(10) });
        o.push(msg(0)).unwrap();
        {
            let mut state = o.lock();
            state.normal[0].enqueued_ms -= 60; // as if queued 60 ms ago
        }
        o.push(msg(1)).unwrap();
        assert_eq!(drain(&o), ["default/x/1"]);
        assert_eq!(o.counters.expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_spooled_message_reaches_the_writer_encoded_once_and_a_backlog_is_encoded_again() {
        let dir = temp_dir("wire");
        let options = SpoolOptions { dir: dir.clone(), sync_interval: Duration::ZERO };
        let o = Outbox::open(limits(KEEP_WIRE_QUEUED + 10), &options).unwrap();
        for n in 0..KEEP_WIRE_QUEUED + 1 {
            o.push(msg(n)).unwrap();
        }
        let mut kept = 0;
        while let Next::Ready(t) = o.next(Instant::now()) {
            if let Some(wire) = &t.wire {
                assert_eq!(*wire, t.message.encode(), "the spooled text is the wire text");
                kept += 1;
            }
        }
        assert_eq!(kept, KEEP_WIRE_QUEUED, "text kept only for the first messages of a backlog");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_bell_keeps_a_ring_until_waited_for_and_times_out_otherwise() {
        let o = Outbox::new(limits(10));
        assert!(!o.wait_bell(Some(Duration::from_millis(5))), "nothing rang");
        o.push(msg(1)).unwrap();
        assert!(o.wait_bell(Some(Duration::ZERO)), "a ring before the wait is not lost");
        assert!(!o.wait_bell(Some(Duration::from_millis(5))), "a ring is taken once");
        let o = std::sync::Arc::new(o);
        let waiter = {
            let o = o.clone();
            std::thread::spawn(move || o.wait_bell(None))
        };
        o.ring();
        assert!(waiter.join().unwrap(), "a ring wakes a waiting writer");
    }

    #[test]
    fn spool_keeps_unsent_messages_across_a_restart_in_order() {
        let dir = temp_dir("restart");
        let options = SpoolOptions { dir: dir.clone(), sync_interval: Duration::ZERO };
        let coalescing = Limits { coalesce: vec!["/nodestatus/".into()], ..limits(100) };
        {
            let o = Outbox::open(coalescing.clone(), &options).unwrap();
            for n in 0..5 {
                o.push(msg(n)).unwrap();
            }
            o.push(status("a")).unwrap();
            o.push(status("b")).unwrap();
            let sent = take(&o); // x/0 written and confirmed
            o.written(sent, 1);
            o.confirm(1);
            let failed = take(&o); // x/1 taken, write failed, put back
            o.put_back(failed);
            o.flush();
        }
        let o = Outbox::open(coalescing, &options).unwrap();
        let left: Vec<_> = std::iter::from_fn(|| match o.next(Instant::now()) {
            Next::Ready(t) => {
                let text = t.message.content_text().unwrap_or_default();
                let r = format!("{}={text}", t.message.route.resource);
                o.written(t, 7);
                o.confirm(7);
                Some(r)
            }
            _ => None,
        })
        .collect();
        assert_eq!(
            left,
            [
                "default/x/1=v",
                "default/x/2=v",
                "default/x/3=v",
                "default/x/4=v",
                "default/nodestatus/gw=b"
            ]
        );
        o.flush();
        drop(o);
        let o = Outbox::open(limits(100), &options).unwrap();
        assert!(o.is_empty(), "everything sent is done on disk too");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_an_ack_or_a_request_ends_the_gathering_wait() {
        let o = Outbox::new(limits(10));
        o.push(msg(0)).unwrap();
        let soon = || Instant::now() + Duration::from_millis(5);
        assert!(!o.wait_prompt(soon()), "a plain push does not end it");
        o.push_urgent(msg(1));
        assert!(o.wait_prompt(Instant::now() + Duration::from_secs(60)), "an ACK does");
        assert!(!o.wait_prompt(soon()), "that ring is taken once");
        assert!(o.wait_bell(Some(Duration::ZERO)), "the plain ring stays for the writer's wait");
        o.push_request(msg(2)).unwrap();
        assert!(o.wait_prompt(Instant::now() + Duration::from_secs(60)), "a request does");
    }

    #[test]
    fn a_request_waits_in_memory_only_and_is_marked_awaited() {
        let dir = temp_dir("requests");
        let options = SpoolOptions { dir: dir.clone(), sync_interval: Duration::ZERO };
        {
            let o = Outbox::open(limits(100), &options).unwrap();
            o.push(msg(0)).unwrap();
            o.push_request(msg(1)).unwrap();
            o.push(msg(2)).unwrap();
            let taken: Vec<_> = (0..3).map(|_| take(&o)).map(|t| (t.awaited, t.spooled)).collect();
            assert_eq!(taken, [(false, true), (true, false), (false, true)]);
            o.flush();
        }
        let o = Outbox::open(limits(100), &options).unwrap();
        assert_eq!(drain(&o), ["default/x/0", "default/x/2"], "the request is not recovered");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn recovered_backlog_respects_current_bounds() {
        let dir = temp_dir("bounds");
        let options = SpoolOptions { dir: dir.clone(), sync_interval: Duration::ZERO };
        {
            let o = Outbox::open(limits(100), &options).unwrap();
            for n in 0..10 {
                o.push(msg(n)).unwrap();
            }
        }
        let o = Outbox::open(Limits { full_policy: FullPolicy::DropOldest, ..limits(4) }, &options)
            .unwrap();
        assert_eq!(drain(&o), ["default/x/6", "default/x/7", "default/x/8", "default/x/9"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unwritable_spool_dir_keeps_messages_in_memory() {
        let dir = temp_dir("unwritable");
        let options = SpoolOptions { dir: dir.clone(), sync_interval: Duration::ZERO };
        let o = Outbox::open(limits(10), &options).unwrap();
        // Replace the directory by a file: every segment create now fails.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"not a dir").unwrap();
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        assert!(o.counters.spool_errors.load(Ordering::Relaxed) >= 1);
        assert_eq!(drain(&o), ["default/x/0", "default/x/1"]);
        let _ = std::fs::remove_file(&dir);
    }
}
