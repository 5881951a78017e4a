//! The simulator's load side, for benchmarks (`edgehub-bench`, `scripts/bench.sh`): what a
//! connection generates downstream at a set rate, the answer to bench requests, and the report
//! that turns the simulator's events into one JSON stats line per interval and a summary. It also
//! holds what both ends of a benchmark share: the bench content `{"bench": <seq>, "sent_ns": <unix
//! ns>, "pad": "..."}`, a fixed-size latency histogram and a tracker of sequence numbers seen.
//!
//! A connection in load mode (`SimConfig::load`) is non-blocking and, when it finds nothing to
//! read, sleeps in poll(2) until the next message is due (at most 1 ms, poll's resolution here),
//! instead of in 20 ms socket timeouts; on every pass it asks its [`Generator`] to queue what is
//! due. Ack-class messages are generated only while the ack window
//! has room, so their `sent_ns` is the write time and not time spent queued in the simulator;
//! what the schedule wanted but the window or the socket had no room for is counted as skipped:
//! the edge did not keep up.

use super::queues::{Downstream, NodeQueues};
use super::SimEvent;
use crate::message::{group, json_content, operation, text_content, Message, Route};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest sleep of a connection in load mode between passes (it also wakes when a frame
/// arrives): how late a timer or a scheduled downstream write can be.
pub const LOAD_READ_SLICE: Duration = Duration::from_millis(1);
/// Most bench messages queued per pass of the connection loop, so reads (ACKs) keep flowing.
pub const MAX_PER_PASS: usize = 256;
/// Resource of bench requests: the simulator answers each at once, echoing its content.
pub const REQUEST_RESOURCE: &str = "bench/request";
/// Resource of the bench's upstream messages (edge to cloud).
pub const UP_RESOURCE: &str = "bench/up";
/// Resource of no-ack bench messages (cloud to edge, group `user`, to the edge's `bus` module).
pub const DOWN_RESOURCE: &str = "bench/down";
/// Ack-class bench messages update this many ConfigMaps in turn, so a durable store overwrites
/// files instead of creating millions.
pub const ACK_OBJECTS: u64 = 1024;
/// Sent times kept for ACK round trips; beyond this the map is reset (only a run that answers
/// requests and sends ack-class messages at once gets there, with IDs no ACK will ever close).
const MAX_TRACKED_SENDS: usize = 1 << 20;
/// Highest sequence number a [`SeqTracker`] records (a 32 MiB bitmap); higher ones are counted
/// as out of range.
const MAX_TRACKED_SEQ: u64 = 1 << 28;

/// Which CloudHub queue downstream bench messages travel in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendClass {
    /// `resource` updates with a resourceversion: one ACK each, `ack_window` in flight.
    Ack,
    /// `user` publishes: sent once, never ACKed.
    NoAck,
}

impl FromStr for SendClass {
    type Err = String;
    fn from_str(s: &str) -> Result<SendClass, String> {
        match s {
            "ack" => Ok(SendClass::Ack),
            "noack" => Ok(SendClass::NoAck),
            other => Err(format!("send class {other:?}: expected ack or noack")),
        }
    }
}

/// What a connection in load mode generates. Clones share their counters.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Bench messages per second to each connected node: 0 none (only measure and answer
    /// requests), negative as fast as the edge takes them (window or socket permitting).
    pub send_rate: i64,
    /// Bytes of bench content per message (at least the stamp itself, about 60).
    pub send_size: usize,
    pub send_class: SendClass,
    counters: Arc<LoadCounters>,
}

/// Counted by connections, read by the report.
#[derive(Debug, Default)]
struct LoadCounters {
    /// Next sequence number: runs on across connections, so losses show across reconnects.
    next_seq: AtomicU64,
    generated: AtomicU64,
    skipped: AtomicU64,
    answered: AtomicU64,
}

impl LoadConfig {
    pub fn new(send_rate: i64, send_size: usize, send_class: SendClass) -> LoadConfig {
        LoadConfig { send_rate, send_size, send_class, counters: Arc::default() }
    }

    /// The answer to a bench request (same content, `parent_msg_id` set), or `None` for any
    /// other message. Written by the connection at once, outside the queues.
    pub(super) fn answer(&self, msg: &Message) -> Option<Message> {
        if msg.route.resource != REQUEST_RESOURCE || msg.is_response() {
            return None;
        }
        self.counters.answered.fetch_add(1, Ordering::Relaxed);
        Some(msg.response_to(msg.content.clone()))
    }
}

/// One connection's downstream schedule.
#[derive(Debug)]
pub(super) struct Generator {
    cfg: LoadConfig,
    started: Instant,
    /// Messages the schedule has asked for so far (generated or skipped).
    scheduled: u64,
}

impl Generator {
    pub(super) fn new(cfg: &LoadConfig, now: Instant) -> Generator {
        Generator { cfg: cfg.clone(), started: now, scheduled: 0 }
    }

    /// How long until the next scheduled message is due (zero: now). At most `LOAD_READ_SLICE`
    /// when there is no schedule to keep (no rate, or as fast as ACKs make room).
    pub(super) fn next_due(&self, now: Instant) -> Duration {
        if self.cfg.send_rate <= 0 {
            return LOAD_READ_SLICE;
        }
        let next = Duration::from_secs_f64((self.scheduled + 1) as f64 / self.cfg.send_rate as f64);
        (self.started + next).saturating_duration_since(now)
    }

    /// Queues the bench messages due by `now`. `window` is the ack window; `socket_full` says the
    /// last write could not finish, so no-ack messages would only pile up in memory.
    pub(super) fn fill(
        &mut self,
        queues: &mut NodeQueues,
        now: Instant,
        window: usize,
        socket_full: bool,
    ) {
        let rate = self.cfg.send_rate;
        if rate == 0 {
            return;
        }
        let room = match self.cfg.send_class {
            SendClass::Ack => window.saturating_sub(queues.ack_backlog()).min(MAX_PER_PASS),
            SendClass::NoAck if socket_full => 0,
            SendClass::NoAck => MAX_PER_PASS,
        } as u64;
        let wanted = if rate < 0 {
            room
        } else {
            let elapsed = now.saturating_duration_since(self.started).as_secs_f64();
            let due = (elapsed * rate as f64) as u64;
            let wanted = due.saturating_sub(self.scheduled);
            self.scheduled = due;
            wanted
        };
        let made = wanted.min(room);
        let counters = &self.cfg.counters;
        counters.skipped.fetch_add(wanted - made, Ordering::Relaxed);
        for _ in 0..made {
            let seq = counters.next_seq.fetch_add(1, Ordering::Relaxed);
            let content = bench_content(seq, self.cfg.send_size);
            match self.cfg.send_class {
                SendClass::Ack => queues.push_ack(ack_message(seq, content)),
                SendClass::NoAck => {
                    queues.push_no_ack(Downstream::message(&noack_message(content)))
                }
            }
        }
        counters.generated.fetch_add(made, Ordering::Relaxed);
    }
}

/// A ConfigMap update from `edgecontroller`: CloudHub's ack queue, the edge's `meta` module.
fn ack_message(seq: u64, content: Box<RawValue>) -> Message {
    let route = Route {
        source: "edgecontroller".to_owned(),
        group: group::RESOURCE.to_owned(),
        operation: operation::UPDATE.to_owned(),
        resource: format!("default/configmap/bench-{}", seq % ACK_OBJECTS),
        ..Route::default()
    };
    let mut msg = Message::new(route, content);
    msg.header.resource_version = (seq + 1).to_string();
    msg
}

/// A `user` publish from the router: CloudHub's no-ack queue, the edge's `bus` module.
fn noack_message(content: Box<RawValue>) -> Message {
    let route = Route {
        source: "router_eventbus".to_owned(),
        group: group::USER.to_owned(),
        operation: "publish".to_owned(),
        resource: DOWN_RESOURCE.to_owned(),
        ..Route::default()
    };
    Message::new(route, content)
}

/// Nanoseconds since the Unix epoch (both ends of a benchmark run on one host).
pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Bench content `{"bench":<seq>,"sent_ns":<now>,"pad":"xx…"}`, padded to `size` bytes (or the
/// stamp alone, when `size` is smaller).
pub fn bench_content(seq: u64, size: usize) -> Box<RawValue> {
    let mut text = format!(r#"{{"bench":{seq},"sent_ns":{},"pad":""#, unix_ns());
    let pad = size.saturating_sub(text.len() + 2);
    text.push_str(&"x".repeat(pad));
    text.push_str("\"}");
    // Cannot fail: the text is built above from integers and `x`s.
    json_content(&text).unwrap_or_else(|_| text_content(""))
}

/// The stamp of bench content.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct Stamp {
    #[serde(rename = "bench")]
    pub seq: u64,
    pub sent_ns: u64,
}

impl Stamp {
    /// The stamp of `content`, if it is bench content.
    pub fn of(content: &RawValue) -> Option<Stamp> {
        let text = content.get();
        if text.starts_with(r#""{\"bench\":"#) {
            // Bench content sent as a JSON string: an MQTT payload uploaded by the EventBus.
            let inner: String = serde_json::from_str(text).ok()?;
            return serde_json::from_str(&inner).ok();
        }
        if text.starts_with(r#"{"event_id":"#) {
            return Stamp::of_twin_report(text);
        }
        if !text.starts_with(r#"{"bench":"#) {
            return None; // cheap reject of everything else (keepalives, status)
        }
        serde_json::from_str(text).ok()
    }

    /// The stamp in an `edge_updated` of a bench mapper (`edgehub-mqtt-load --twin-devices`): the
    /// `bench` twin's reported value is `<seq>:<sent ns>`.
    fn of_twin_report(text: &str) -> Option<Stamp> {
        const MARK: &str = r#""twin":{"bench":{"actual":{"value":""#;
        let start = text.find(MARK)? + MARK.len();
        let value = &text[start..start + text[start..].find('"')?];
        let (seq, sent_ns) = value.split_once(':')?;
        Some(Stamp { seq: seq.parse().ok()?, sent_ns: sent_ns.parse().ok()? })
    }

    /// Nanoseconds from `sent_ns` to `now_ns` (0 if the clock stepped back).
    pub fn age_ns(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.sent_ns)
    }
}

/// A latency histogram of fixed size (15 KiB): exact below 64 µs, then 32 buckets per power of
/// two (values within about 3 %). Values are microseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const LINEAR: u64 = 64;
const SUB_BUCKETS: u64 = 32;
const BUCKETS: usize = (LINEAR + 58 * SUB_BUCKETS) as usize;

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram { counts: vec![0; BUCKETS], total: 0, max: 0 }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let shift = (63 - v.leading_zeros() as u64) - 5; // v >> shift is in [32, 64)
        (LINEAR + (shift - 1) * SUB_BUCKETS + ((v >> shift) - SUB_BUCKETS)) as usize
    }

    /// The lowest value that falls in bucket `i`.
    fn low(i: usize) -> u64 {
        let i = i as u64;
        if i < LINEAR {
            return i;
        }
        let shift = (i - LINEAR) / SUB_BUCKETS + 1;
        ((i - LINEAR) % SUB_BUCKETS + SUB_BUCKETS) << shift
    }

    pub fn record(&mut self, micros: u64) {
        self.counts[Histogram::index(micros).min(BUCKETS - 1)] += 1;
        self.total += 1;
        self.max = self.max.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), as its bucket's lower bound; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Histogram::low(i).min(self.max));
            }
        }
        Some(self.max)
    }

    /// `{"<name>_p50_us":…,"<name>_p99_us":…,"<name>_max_us":…}` entries (null when empty).
    pub fn json_fields(&self, name: &str, out: &mut serde_json::Map<String, serde_json::Value>) {
        out.insert(format!("{name}_p50_us"), self.quantile(0.50).into());
        out.insert(format!("{name}_p99_us"), self.quantile(0.99).into());
        out.insert(format!("{name}_max_us"), (self.total > 0).then_some(self.max).into());
    }
}

/// Which sequence numbers arrived: distinct, duplicates, and the gaps below the highest seen.
#[derive(Debug, Default)]
pub struct SeqTracker {
    bits: Vec<u64>,
    distinct: u64,
    duplicates: u64,
    out_of_range: u64,
    highest: Option<u64>,
}

impl SeqTracker {
    /// Records `seq`; false when it was seen before.
    pub fn record(&mut self, seq: u64) -> bool {
        if seq >= MAX_TRACKED_SEQ {
            self.out_of_range += 1;
            return true;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        self.bits[word] |= 1 << bit;
        self.distinct += 1;
        true
    }

    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Sequence numbers below the highest seen that never arrived (numbering starts at 0).
    pub fn missing(&self) -> u64 {
        self.highest.map_or(0, |h| h + 1 - self.distinct.min(h + 1))
    }

    pub fn json_fields(&self, out: &mut serde_json::Map<String, serde_json::Value>) {
        out.insert("distinct".into(), self.distinct.into());
        out.insert("missing".into(), self.missing().into());
        out.insert("duplicates".into(), self.duplicates.into());
        if self.out_of_range > 0 {
            out.insert("seq_out_of_range".into(), self.out_of_range.into());
        }
    }
}

/// Counts over one interval or the whole run (`first_bench`/`last_bench`: the whole run only).
#[derive(Debug, Default)]
struct Window {
    up_msgs: u64,
    up_bench: u64,
    up_oneway: Histogram,
    down_resent: u64,
    acked: u64,
    ack_rtt: Histogram,
    first_bench: Option<Instant>,
    last_bench: Option<Instant>,
}

impl Window {
    fn bench_seen(&mut self, at: Instant) {
        self.first_bench.get_or_insert(at);
        self.last_bench = Some(at);
    }
}

/// Reads the simulator's events until the channel closes (the simulator stopped), printing a
/// `load_stats` line every `every` and a `load_summary` line at the end through `out`, and every
/// event other than messages, writes, ACKs and pings as it is. Returns when `out` returns false
/// (nobody reads any more) or the events end.
pub fn report(
    events: &Receiver<SimEvent>,
    load: &LoadConfig,
    every: Duration,
    out: &mut dyn FnMut(&str) -> bool,
) {
    let started = Instant::now();
    let started_ns = unix_ns();
    let unix_ns_of =
        |at: Instant| started_ns + at.saturating_duration_since(started).as_nanos() as u64;
    let track_acks = load.send_class == SendClass::Ack && load.send_rate != 0;
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut seqs = SeqTracker::default();
    let mut total = Window::default();
    let mut interval = Window::default();
    let mut last_counts = (0u64, 0u64, 0u64);
    let mut next_tick = started + every;
    loop {
        let event = match events.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                let elapsed = now.duration_since(started);
                let counts = load.counts();
                let line = stats_line(
                    "load_stats",
                    elapsed,
                    every.as_secs_f64(),
                    &interval,
                    (counts.0 - last_counts.0, counts.1 - last_counts.1, counts.2 - last_counts.2),
                    None,
                );
                last_counts = counts;
                interval = Window::default();
                next_tick += every;
                if !out(&line) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match event {
            SimEvent::Received { msg, at, .. } => {
                total.up_msgs += 1;
                interval.up_msgs += 1;
                if msg.is_response() {
                    if let Some(sent) = sent_at.remove(&msg.header.parent_id) {
                        let rtt = at.saturating_duration_since(sent).as_micros() as u64;
                        total.ack_rtt.record(rtt);
                        interval.ack_rtt.record(rtt);
                    }
                } else if let Some(stamp) = Stamp::of(&msg.content) {
                    let oneway = stamp.age_ns(unix_ns_of(at)) / 1000;
                    seqs.record(stamp.seq);
                    for w in [&mut total, &mut interval] {
                        w.up_bench += 1;
                        w.up_oneway.record(oneway);
                    }
                    total.bench_seen(at);
                }
            }
            SimEvent::Sent { msg_id, attempt, at, .. } => {
                if attempt > 1 {
                    total.down_resent += 1;
                    interval.down_resent += 1;
                } else if track_acks && !msg_id.is_empty() {
                    total.bench_seen(at);
                    if sent_at.len() >= MAX_TRACKED_SENDS {
                        sent_at.clear();
                    }
                    sent_at.insert(msg_id, at);
                }
            }
            SimEvent::Ack { .. } => {
                total.bench_seen(Instant::now());
                total.acked += 1;
                interval.acked += 1;
            }
            SimEvent::Ping { .. } => {}
            other => {
                let line = serde_json::to_string(&other).unwrap_or_default();
                if !out(&line) {
                    return;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let line = stats_line(
        "load_summary",
        elapsed,
        elapsed.as_secs_f64(),
        &total,
        load.counts(),
        Some(&seqs),
    );
    out(&line);
}

impl LoadConfig {
    /// (generated, skipped, answered) so far.
    fn counts(&self) -> (u64, u64, u64) {
        let c = &self.counters;
        (
            c.generated.load(Ordering::Relaxed),
            c.skipped.load(Ordering::Relaxed),
            c.answered.load(Ordering::Relaxed),
        )
    }
}

fn stats_line(
    event: &str,
    elapsed: Duration,
    span_s: f64,
    w: &Window,
    (generated, skipped, answered): (u64, u64, u64),
    seqs: Option<&SeqTracker>,
) -> String {
    // The summary's rates are over the span bench traffic actually flowed in, not the
    // simulator's whole life (it starts before the edge connects).
    let span_s = match (seqs, w.first_bench, w.last_bench) {
        (Some(_), Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
        _ => span_s,
    };
    let rate = |n: u64| if span_s > 0.0 { (n as f64 / span_s).round() } else { 0.0 };
    let mut o = serde_json::Map::new();
    o.insert("event".into(), event.into());
    o.insert("t_s".into(), ((elapsed.as_secs_f64() * 10.0).round() / 10.0).into());
    o.insert("up_msgs".into(), w.up_msgs.into());
    o.insert("up_bench".into(), w.up_bench.into());
    if seqs.is_some() {
        o.insert("active_s".into(), ((span_s * 10.0).round() / 10.0).into());
    }
    o.insert("up_bench_rate".into(), rate(w.up_bench).into());
    w.up_oneway.json_fields("up_oneway", &mut o);
    if let Some(seqs) = seqs {
        let mut s = serde_json::Map::new();
        seqs.json_fields(&mut s);
        o.insert("up_seq".into(), s.into());
    }
    o.insert("down_generated".into(), generated.into());
    o.insert("down_rate".into(), rate(generated).into());
    o.insert("down_skipped".into(), skipped.into());
    o.insert("down_resent".into(), w.down_resent.into());
    o.insert("acked".into(), w.acked.into());
    o.insert("ack_rate".into(), rate(w.acked).into());
    w.ack_rtt.json_fields("ack_rtt", &mut o);
    o.insert("answered".into(), answered.into());
    serde_json::Value::Object(o).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_close() {
        for i in 1..BUCKETS - 1 {
            assert!(Histogram::low(i) > Histogram::low(i - 1), "bucket {i}");
            assert_eq!(Histogram::index(Histogram::low(i)), i);
            assert_eq!(Histogram::index(Histogram::low(i + 1) - 1), i);
        }
        let mut h = Histogram::default();
        for v in 1..=10_000 {
            h.record(v);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((4850..=5000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((9600..=9900).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), Some(9984)); // the top bucket's lower bound
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn seq_tracker_counts_gaps_and_duplicates() {
        let mut s = SeqTracker::default();
        for seq in [0, 1, 2, 5, 5, 3, 700] {
            s.record(seq);
        }
        assert_eq!((s.distinct(), s.duplicates(), s.missing()), (6, 1, 695));
        assert_eq!(SeqTracker::default().missing(), 0);
    }

    #[test]
    fn bench_content_has_the_asked_size_and_parses_back() {
        let content = bench_content(42, 130);
        assert_eq!(content.get().len(), 130);
        let stamp = Stamp::of(&content).unwrap();
        assert_eq!(stamp.seq, 42);
        assert!(stamp.age_ns(unix_ns()) < 60_000_000_000);
        assert!(bench_content(7, 0).get().ends_with(r#""pad":""}"#));
        assert_eq!(Stamp::of(&json_content(r#""ping""#).unwrap()), None);
        let as_string = text_content(bench_content(7, 130).get());
        assert_eq!(Stamp::of(&as_string).map(|s| s.seq), Some(7), "an uploaded MQTT payload");
        let twin = r#"{"event_id":"e","timestamp":1,"twin":{"bench":{"actual":{"value":"9:123","metadata":{"timestamp":1}}}}}"#;
        let stamp = Stamp::of(&json_content(twin).unwrap()).unwrap();
        assert_eq!((stamp.seq, stamp.sent_ns), (9, 123), "a bench mapper's edge_updated");
        assert_eq!(Stamp::of(&json_content(r#"{"event_id":"e","twin":{}}"#).unwrap()), None);
    }

    #[test]
    fn generator_follows_the_rate_and_the_window() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let cfg = LoadConfig::new(10_000, 100, SendClass::NoAck);
        let mut g = Generator::new(&cfg, t0);
        let mut q = NodeQueues::default();
        g.fill(&mut q, t0 + 10 * ms, 1, false);
        assert_eq!(q.take_no_ack().len(), 100);
        g.fill(&mut q, t0 + 20 * ms, 1, true);
        assert_eq!(cfg.counts(), (100, 100, 0), "socket full: the next 100 are skipped");

        let cfg = LoadConfig::new(-1, 100, SendClass::Ack);
        let mut g = Generator::new(&cfg, t0);
        g.fill(&mut q, t0, 8, false);
        g.fill(&mut q, t0 + ms, 8, false);
        assert_eq!(q.ack_backlog(), 8, "max rate fills the window and no more");
        let msg = ack_message(3, bench_content(3, 0));
        assert_eq!(super::super::queues::classify(&msg), super::super::Class::Ack);
        let msg = noack_message(bench_content(3, 0));
        assert_eq!(super::super::queues::classify(&msg), super::super::Class::NoAck);
    }
}
