//! Writing to the cloud during a session: takes what is ready in the outbox and writes it to the
//! link (urgent lane first, up to `WRITE_BATCH` messages per flush), and asks the cloud to confirm
//! what it has read (a ping carrying the count of messages written, see `Outbox::confirm`).
//!
//! Two kinds of thread take turns at this, one at a time. The session's writer thread, and the
//! thread that has just queued a message: when nobody is writing, it writes its message at once
//! instead of waking the writer thread, because waking a thread on another CPU costs more than
//! the write itself (12–15 µs of CPU per wake-up on the benchmark VM, issue 14). Only the writer
//! thread ever sleeps or waits for the socket; a queueing thread that would have to leaves the rest
//! to it (it rings the outbox's bell).

use crate::error::Error;
use crate::link::Link;
use crate::outbox::{Lane, Next, Outbox, Pushed, Taken};
use crate::status::Status;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The writer asks the cloud to confirm what it read at least every this many messages (a quarter
/// of the in-flight window): each pong wakes the reader and finishes a batch of spool records, so
/// at 10k messages/s 64 cost 156 wake-ups a second (issue 14).
const CONFIRM_EVERY: u64 = 256;
/// When nothing more is ready, the confirmation waits until nothing was written for this long,
/// so a steady trickle (a request, then the next) does not cost a ping and a pong per message.
const CONFIRM_LINGER: Duration = Duration::from_millis(5);
/// Most messages taken from the outbox for one flush: what is ready at once shares TLS records
/// and sends instead of costing one of each per message.
const WRITE_BATCH: usize = 64;
/// A dense stream of messages (pushed less than `DENSE_GAP` apart on average) is flushed at most
/// once per `GATHER_GAP`: a message pushed less than that after the last flush is left to the
/// writer thread, which waits for the rest of the gap so that what is pushed meanwhile shares the
/// flush. At 10k messages/s that is one wake-up and one send per ten messages instead of per
/// message, for at most this much added latency. Requests and ACKs never wait (someone waits for
/// them), and a sparser stream goes out at once: batching four or fewer would not pay the delay.
const GATHER_GAP: Duration = Duration::from_millis(1);
const DENSE_GAP: Duration = Duration::from_micros(250);
/// ACKs pushed one by one less than this far apart on average (over 25k/s, a module ACKing a
/// flood) are left to the writer thread, without any wait: what piles up while it wakes shares a
/// flush, where writing each on the pushing thread would cost a send per ACK.
const DENSE_ACK_GAP: Duration = Duration::from_micros(40);

/// The writing side of one session. The session attaches it to the outbox
/// (`Outbox::attach_writer`) while the link is up.
#[derive(Debug)]
pub struct Writer {
    link: Arc<Link>,
    status: Arc<Status>,
    turn: Mutex<Turn>,
    /// `Turn::written`, for the heartbeat's pings: readable without the turn, which a write
    /// waiting for a slow socket may hold for up to `writeDeadline`.
    cursor: AtomicU64,
}

/// What whoever holds the turn may change.
#[derive(Debug)]
struct Turn {
    /// The session is over: nobody writes any more.
    ended: bool,
    /// A queueing thread's write failed: the writer thread ends the session with this.
    failure: Option<Error>,
    /// A queueing thread's write left bytes buffered: the writer thread flushes them before
    /// anything else is written.
    unflushed: bool,
    /// Normal-lane messages written this session, and how many the last ping asked about.
    written: u64,
    pinged: u64,
    /// When the last flush ended.
    flushed_at: Instant,
    /// How dense the stream of plain messages is, and that of ACKs.
    plain_pace: Pace,
    ack_pace: Pace,
    /// When the writer thread will look again without being rung (`None`: only when rung).
    writer_wakes: Option<Instant>,
    /// The batch being written and its wire texts, kept to be reused.
    batch: Vec<Taken>,
    texts: Vec<String>,
}

/// The moving average of the time between a kind of push (weight 1/8 for the newest).
#[derive(Debug)]
struct Pace {
    last: Instant,
    average_gap: Duration,
}

impl Pace {
    fn new() -> Pace {
        Pace { last: Instant::now(), average_gap: GATHER_GAP }
    }

    /// Counts a push at `now` and returns the new average. A gap counts at most `GATHER_GAP`, so a
    /// pause does not hide a new stream for long.
    fn push(&mut self, now: Instant) -> Duration {
        let gap = now.saturating_duration_since(self.last).min(GATHER_GAP);
        self.last = now;
        self.average_gap = (self.average_gap * 7 + gap) / 8;
        self.average_gap
    }
}

impl Turn {
    /// Plain messages come faster than `DENSE_GAP` apart and the last flush was less than
    /// `GATHER_GAP` ago: the next flush waits for the end of the gap.
    fn is_dense_stream(&self, now: Instant) -> bool {
        self.plain_pace.average_gap < DENSE_GAP && now < self.flushed_at + GATHER_GAP
    }
}

/// Why a turn stopped taking messages.
enum Idle {
    /// Nothing to send.
    Empty,
    /// Nothing to send; the spool's fsync is due after this long.
    SyncDue(Duration),
    /// The rate limit holds the next message back for this long.
    RateLimited(Duration),
    /// The in-flight window is full.
    WindowFull,
    /// A queueing thread's write could not finish without waiting.
    Unflushed,
}

impl Writer {
    pub fn new(link: Arc<Link>, status: Arc<Status>) -> Writer {
        Writer {
            link,
            status,
            turn: Mutex::new(Turn {
                ended: false,
                failure: None,
                unflushed: false,
                written: 0,
                pinged: 0,
                flushed_at: Instant::now(),
                plain_pace: Pace::new(),
                ack_pace: Pace::new(),
                writer_wakes: None,
                // Both grow to WRITE_BATCH with the first bursts, then are kept.
                batch: Vec::new(),
                texts: Vec::new(),
            }),
            cursor: AtomicU64::new(0),
        }
    }

    /// Normal-lane messages written this session.
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Turn> {
        // Every field stays consistent between statements; a panic ends the session anyway.
        self.turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// For a thread that has just queued a message: writes what is ready if nobody else is
    /// writing, without waiting for anything. Returns `false` when the writer thread must be rung
    /// instead: someone else has the turn, or what is left needs a wait (rate limit, full window,
    /// a slow socket), or the writer thread must look earlier than it planned (fsync, confirmation).
    /// ACKs and requests are written even in the middle of a stream.
    pub fn write_queued(&self, outbox: &Outbox, pushed: Pushed) -> bool {
        let Ok(mut turn) = self.turn.try_lock() else { return false };
        if turn.ended || turn.failure.is_some() || turn.unflushed {
            return false;
        }
        let now = Instant::now();
        match pushed {
            Pushed::Plain => {
                turn.plain_pace.push(now);
                if turn.is_dense_stream(now) {
                    // The writer thread flushes it at the end of the gap; ring it only if it
                    // does not plan to look by then.
                    let gap_ends = turn.flushed_at + GATHER_GAP;
                    return turn.writer_wakes.is_some_and(|wakes| wakes <= gap_ends);
                }
            }
            Pushed::Acks => {
                if turn.ack_pace.push(now) < DENSE_ACK_GAP {
                    return false;
                }
            }
            Pushed::Request => {}
        }
        let idle = match self.write_ready(&mut turn, outbox, false) {
            Ok(idle) => idle,
            Err(e) => {
                turn.failure = Some(e);
                return false;
            }
        };
        let now = Instant::now();
        let due = match idle {
            Idle::Empty => None,
            Idle::SyncDue(left) => Some(now + left),
            Idle::RateLimited(_) | Idle::WindowFull | Idle::Unflushed => return false,
        };
        let confirm_due = (turn.written > turn.pinged).then(|| turn.flushed_at + CONFIRM_LINGER);
        match ([due, confirm_due].into_iter().flatten().min(), turn.writer_wakes) {
            (None, _) => true,
            (Some(due), Some(wakes)) => wakes <= due,
            (Some(_), None) => false,
        }
    }

    /// The writer thread's loop, until `stopping()` or a write fails. It writes what is ready,
    /// finishes what a queueing thread left, asks for confirmations, and sleeps on the outbox's
    /// bell between turns.
    ///
    /// # Errors
    /// A failed write (its messages are back at the head of the outbox).
    pub fn run(&self, outbox: &Outbox, stopping: impl Fn() -> bool) -> Result<(), Error> {
        loop {
            let wait = {
                let mut turn = self.lock();
                if let Some(e) = turn.failure.take() {
                    return Err(e);
                }
                if turn.unflushed {
                    self.link.finish_flush()?;
                    turn.unflushed = false;
                }
                let idle = self.write_ready(&mut turn, outbox, true)?;
                let now = Instant::now();
                let wait = match idle {
                    Idle::RateLimited(left) => {
                        self.ask_confirmation(&mut turn, true)?;
                        Some(left)
                    }
                    Idle::WindowFull => {
                        self.ask_confirmation(&mut turn, true)?;
                        None
                    }
                    Idle::Unflushed => Some(Duration::ZERO), // not when waiting is allowed
                    Idle::Empty | Idle::SyncDue(_) => {
                        let sync = match idle {
                            Idle::SyncDue(left) => Some(left),
                            _ => None,
                        };
                        let mut confirm = None;
                        if turn.written > turn.pinged {
                            let left =
                                (turn.flushed_at + CONFIRM_LINGER).saturating_duration_since(now);
                            if left.is_zero() {
                                self.ask_confirmation(&mut turn, true)?;
                            } else {
                                confirm = Some(left);
                            }
                        }
                        // In a dense stream, its next messages are due by the end of the gap
                        // (their pushes then do not ring, see `write_queued`).
                        let stream =
                            turn.is_dense_stream(now).then(|| turn.flushed_at + GATHER_GAP - now);
                        [sync, confirm, stream].into_iter().flatten().min()
                    }
                };
                turn.writer_wakes = wait.map(|left| now + left);
                wait
            };
            if stopping() {
                return Ok(());
            }
            outbox.wait_bell(wait);
            if stopping() {
                return Ok(());
            }
        }
    }

    /// The session is over: from now on nobody writes (queueing threads ring the bell, and what
    /// they queued waits for the next session). Waits for a write in progress, which fails at once
    /// when the link is shut down.
    pub fn end(&self) {
        self.lock().ended = true;
    }

    /// Takes ready messages and writes them, a batch per flush, until the outbox has nothing
    /// ready. `may_wait`: the writer thread, which gathers a stream into batches and waits for a
    /// slow socket; a queueing thread does neither.
    fn write_ready(&self, turn: &mut Turn, outbox: &Outbox, may_wait: bool) -> Result<Idle, Error> {
        loop {
            let first = match outbox.next(Instant::now()) {
                Next::Ready(first) => first,
                Next::Empty => return Ok(Idle::Empty),
                Next::SyncDue(left) => return Ok(Idle::SyncDue(left)),
                Next::Wait(left) => return Ok(Idle::RateLimited(left)),
                Next::WindowFull => return Ok(Idle::WindowFull),
            };
            let gather_until = turn.flushed_at + GATHER_GAP;
            let streaming = may_wait
                && first.lane == Lane::Normal
                && !first.awaited
                && turn.is_dense_stream(Instant::now());
            let batch = &mut turn.batch;
            batch.push(first);
            let mut gathered = !streaming;
            while batch.len() < WRITE_BATCH {
                // Anything but a message is asked for again by the outer loop.
                let Next::Ready(more) = outbox.next(Instant::now()) else {
                    if gathered {
                        break;
                    }
                    // Not any ring: every push of the stream rings. An ACK or a request ends
                    // the wait, and what was gathered goes out with it.
                    outbox.wait_prompt(gather_until);
                    gathered = true;
                    continue;
                };
                gathered |= more.awaited || more.lane == Lane::Urgent;
                batch.push(more);
            }
            // Encoded here, outside the link's lock, which the reader needs too; once, when it
            // was spooled, if the outbox kept the text.
            let texts = &mut turn.texts;
            texts.extend(batch.iter_mut().map(|taken| {
                log::debug!("to cloud: {:?}", taken.message);
                taken.wire.take().unwrap_or_else(|| taken.message.encode())
            }));
            let sent = if may_wait {
                self.link.send_texts(texts.drain(..)).map(|()| true)
            } else {
                self.link.try_send_texts(texts.drain(..))
            };
            match sent {
                Ok(flushed) => turn.unflushed = !flushed,
                Err(e) => {
                    // Last first, so the batch is back at the head in its order.
                    batch.drain(..).rev().for_each(|taken| outbox.put_back(taken));
                    return Err(e);
                }
            }
            turn.flushed_at = Instant::now();
            let confirmations_due = turn.written / CONFIRM_EVERY;
            for taken in batch.drain(..) {
                Status::bump(&self.status.messages_up);
                if taken.lane == Lane::Normal {
                    turn.written += 1;
                    outbox.written(taken, turn.written);
                }
            }
            self.cursor.store(turn.written, Ordering::Relaxed);
            if turn.written / CONFIRM_EVERY > confirmations_due {
                self.ask_confirmation(turn, may_wait)?;
            }
            if turn.unflushed {
                return Ok(Idle::Unflushed);
            }
        }
    }

    /// Asks the cloud to confirm the first `written` messages of the session, unless it was asked
    /// for them already.
    fn ask_confirmation(&self, turn: &mut Turn, may_wait: bool) -> Result<(), Error> {
        if turn.written > turn.pinged {
            let payload = turn.written.to_be_bytes();
            if may_wait {
                self.link.send_ping(&payload)?;
            } else if !self.link.try_send_ping(&payload)? {
                turn.unflushed = true;
            }
            turn.pinged = turn.written;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_tells_a_dense_stream_and_a_pause_counts_at_most_the_gather_gap() {
        let start = Instant::now();
        let mut pace = Pace { last: start, average_gap: GATHER_GAP };
        let mut average = GATHER_GAP;
        for n in 1..=40 {
            average = pace.push(start + Duration::from_micros(100 * n)); // 10k/s
        }
        assert!(average < DENSE_GAP, "{average:?}");
        let after_pause = pace.push(start + Duration::from_secs(60));
        assert_eq!(after_pause, (average * 7 + GATHER_GAP) / 8);
    }
}
