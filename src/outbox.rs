//! The one bounded upstream queue. Everything modules send to the cloud waits here until the
//! session's writer has written it to the socket; it outlives sessions, so nothing is lost across a
//! reconnect. The writer pulls; the outbox never sees the socket and knows nothing of modules.
//!
//! Invariants, true at the start and end of every method:
//! - `normal` holds at most `max_messages` messages and `max_bytes` encoded bytes, except for
//!   messages put back after a failed write (they were already accepted and are never dropped);
//! - a message leaves only through `next()` (taken by the writer) or `put_back()` reverses that;
//! - `urgent` (ACKs, control answers) is always served before `normal` and skips the rate limit;
//!   when it is full the oldest urgent message is dropped and counted (the cloud re-sends anything
//!   it did not see ACKed, protocol §4.4, so losing an ACK costs a resend, not data);
//! - `normal` is rate limited by a token bucket of `messageQPS` / `messageBurst`.

use crate::message::Message;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bound of the urgent lane (ACKs and control answers).
pub const URGENT_CAP: usize = 4096;

/// Which lane a message travels in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// ACKs and control answers: first, and not rate limited.
    Urgent,
    /// Everything else modules send: in order, rate limited, bounded.
    Normal,
}

/// What the writer should do next.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // returned once per message and consumed at once; boxing would allocate per message
pub enum Next {
    /// Write this message; on failure hand it back with [`Outbox::put_back`].
    Ready(Message, Lane),
    /// Messages wait but the rate limit says not yet: try again after this long.
    Wait(Duration),
    /// Nothing to send: wait for the bell.
    Empty,
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

/// Bounds and rate of the outbox.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
    /// Tokens added per second.
    pub rate_per_sec: u32,
    /// Bucket size.
    pub burst: u32,
}

/// Counters of what the outbox refused or dropped (32-bit: works on every target).
#[derive(Debug, Default)]
pub struct OutboxCounters {
    pub rejected_full: AtomicU32,
    pub urgent_dropped: AtomicU32,
}

/// The upstream queue. Share it in an `Arc`.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    limits: Limits,
    /// Rung (capacity 1, so rings coalesce) whenever something is queued; the writer selects on it.
    bell_tx: Sender<()>,
    bell_rx: Receiver<()>,
    pub counters: OutboxCounters,
}

#[derive(Debug)]
struct State {
    urgent: VecDeque<Message>,
    normal: VecDeque<(Message, usize)>,
    normal_bytes: usize,
    tokens: f64,
    refilled_at: Instant,
}

impl Outbox {
    pub fn new(limits: Limits) -> Outbox {
        let (bell_tx, bell_rx) = bounded(1);
        Outbox {
            state: Mutex::new(State {
                urgent: VecDeque::new(),
                normal: VecDeque::new(),
                normal_bytes: 0,
                tokens: f64::from(limits.burst),
                refilled_at: Instant::now(),
            }),
            limits,
            bell_tx,
            bell_rx,
            counters: OutboxCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a pair of queues and numbers updated in single statements; a panic
        // elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ring(&self) {
        let _ = self.bell_tx.try_send(()); // full means already rung
    }

    /// The bell the writer waits on when [`Next::Empty`].
    pub fn bell(&self) -> &Receiver<()> {
        &self.bell_rx
    }

    /// Queues a message in the normal lane.
    ///
    /// # Errors
    /// Hands the message back when the outbox is full (by count or bytes): the policy is to refuse
    /// new messages, so the sender learns at once and nothing already accepted is dropped.
    pub fn push(&self, message: Message) -> Result<(), Rejected> {
        let size = message.encoded_len_hint();
        let mut state = self.lock();
        if state.normal.len() >= self.limits.max_messages {
            drop(state);
            self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(Rejected {
                message: Box::new(message),
                reason: "outbox full (outboxMaxMessages)",
            });
        }
        if state.normal_bytes + size > self.limits.max_bytes {
            drop(state);
            self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(Rejected {
                message: Box::new(message),
                reason: "outbox full (outboxMaxBytes)",
            });
        }
        state.normal_bytes += size;
        state.normal.push_back((message, size));
        drop(state);
        self.ring();
        Ok(())
    }

    /// Queues an ACK or control answer in the urgent lane; if the lane is full the oldest is
    /// dropped and counted (see the type's invariants for why that is safe).
    pub fn push_urgent(&self, message: Message) {
        let mut state = self.lock();
        if state.urgent.len() >= URGENT_CAP {
            if let Some(old) = state.urgent.pop_front() {
                log::warn!("outbox: urgent lane full ({URGENT_CAP}), dropped {old:?}");
                self.counters.urgent_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        state.urgent.push_back(message);
        drop(state);
        self.ring();
    }

    /// Takes the next message to write, honouring lane priority and the rate limit.
    pub fn next(&self, now: Instant) -> Next {
        let mut state = self.lock();
        if let Some(message) = state.urgent.pop_front() {
            return Next::Ready(message, Lane::Urgent);
        }
        if state.normal.is_empty() {
            return Next::Empty;
        }
        let elapsed = now.saturating_duration_since(state.refilled_at).as_secs_f64();
        state.refilled_at = now;
        let rate = f64::from(self.limits.rate_per_sec);
        state.tokens = (state.tokens + elapsed * rate).min(f64::from(self.limits.burst));
        if state.tokens < 1.0 {
            return Next::Wait(Duration::from_secs_f64((1.0 - state.tokens) / rate));
        }
        state.tokens -= 1.0;
        match state.normal.pop_front() {
            Some((message, size)) => {
                state.normal_bytes -= size;
                Next::Ready(message, Lane::Normal)
            }
            None => Next::Empty, // cannot happen: checked non-empty above under the same lock
        }
    }

    /// Returns a message whose write failed to the head of its lane, so it goes first on the
    /// next session (protocol §8 W1: Go loses it). Its rate token is refunded.
    pub fn put_back(&self, message: Message, lane: Lane) {
        let mut state = self.lock();
        match lane {
            Lane::Urgent => state.urgent.push_front(message),
            Lane::Normal => {
                let size = message.encoded_len_hint();
                state.normal_bytes += size;
                state.normal.push_front((message, size));
                state.tokens = (state.tokens + 1.0).min(f64::from(self.limits.burst));
            }
        }
        drop(state);
        self.ring();
    }

    /// Messages waiting in both lanes.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.urgent.len() + state.normal.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate encoded bytes waiting in the normal lane.
    pub fn bytes(&self) -> usize {
        self.lock().normal_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Route;

    fn msg(n: usize) -> Message {
        Message::with_text(Route { resource: format!("default/x/{n}"), ..Route::default() }, "v")
    }

    fn limits(max_messages: usize) -> Limits {
        Limits { max_messages, max_bytes: 1 << 20, rate_per_sec: 1000, burst: 1000 }
    }

    fn take(o: &Outbox) -> Message {
        match o.next(Instant::now()) {
            Next::Ready(m, _) => m,
            other => panic!("expected a message, got {other:?}"),
        }
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
        for n in 0..3 {
            assert_eq!(take(&o).route.resource, format!("default/x/{n}"));
        }
        assert!(matches!(o.next(Instant::now()), Next::Empty));
    }

    #[test]
    fn byte_bound_refuses() {
        let size = msg(0).encoded_len_hint();
        let o = Outbox::new(Limits { max_bytes: 2 * size, ..limits(100) });
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        assert!(o.push(msg(2)).is_err(), "one byte over the bound is refused");
        assert_eq!(o.bytes(), 2 * size);
    }

    #[test]
    fn put_back_goes_first_and_may_exceed_bound() {
        let o = Outbox::new(limits(2));
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        let first = take(&o);
        o.push(msg(2)).unwrap();
        o.put_back(first, Lane::Normal);
        assert_eq!(o.len(), 3);
        let order: Vec<_> = (0..3).map(|_| take(&o).route.resource).collect();
        assert_eq!(order, ["default/x/0", "default/x/1", "default/x/2"]);
    }

    #[test]
    fn urgent_goes_before_normal_and_skips_rate_limit() {
        let o = Outbox::new(Limits { rate_per_sec: 1, burst: 1, ..limits(10) });
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        o.push_urgent(msg(9));
        let now = Instant::now();
        assert!(
            matches!(o.next(now), Next::Ready(m, Lane::Urgent) if m.route.resource == "default/x/9")
        );
        assert!(matches!(o.next(now), Next::Ready(_, Lane::Normal)));
        match o.next(now) {
            Next::Wait(d) => assert!(d > Duration::from_millis(900) && d <= Duration::from_secs(1)),
            other => panic!("expected wait, got {other:?}"),
        }
        o.push_urgent(msg(8));
        assert!(matches!(o.next(now), Next::Ready(_, Lane::Urgent)));
        assert!(matches!(o.next(now + Duration::from_secs(1)), Next::Ready(_, Lane::Normal)));
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let o = Outbox::new(Limits { rate_per_sec: 10, burst: 5, ..limits(100) });
        for n in 0..20 {
            o.push(msg(n)).unwrap();
        }
        let t0 = Instant::now();
        let burst = (0..20).take_while(|_| matches!(o.next(t0), Next::Ready(..))).count();
        assert_eq!(burst, 5);
        // 0.5 s later, 5 more tokens.
        let t1 = t0 + Duration::from_millis(500);
        let more = (0..20).take_while(|_| matches!(o.next(t1), Next::Ready(..))).count();
        assert_eq!(more, 5);
    }

    #[test]
    fn bell_rings_once_for_many_pushes() {
        let o = Outbox::new(limits(10));
        o.push(msg(0)).unwrap();
        o.push(msg(1)).unwrap();
        assert!(o.bell().try_recv().is_ok());
        assert!(o.bell().try_recv().is_err());
    }

    #[test]
    fn urgent_lane_full_drops_oldest_and_counts() {
        let o = Outbox::new(limits(1));
        for n in 0..=URGENT_CAP {
            o.push_urgent(msg(n));
        }
        assert_eq!(o.counters.urgent_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(take(&o).route.resource, "default/x/1");
    }
}
