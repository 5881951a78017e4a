//! The simulator's per-node downstream state, kept free of sockets so its rules can be tested on
//! their own: how CloudHub sorts a message into the no-ack or the ack queue (protocol §4.4), and the
//! ack queue's one-in-flight (or, for benchmarks, `window`-in-flight), resend, give-up and requeue
//! timing. The connection thread in `conn` asks it what to write next and tells it about ACKs and
//! new connections.

use crate::message::Message;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Where CloudHub puts a downstream message: the edge's own reading of the cloud's rules, so both
/// ends follow one function (`router::cloud_queue`, with the rules beside it).
pub use crate::router::CloudQueue as Class;

/// Classifies a downstream message the way CloudHub does (protocol §4.4).
pub fn classify(msg: &Message) -> Class {
    crate::router::cloud_queue(msg)
}

/// One downstream WebSocket message waiting to be written.
#[derive(Clone, Debug)]
pub struct Downstream {
    /// The message ID for events; empty for raw frames.
    pub msg_id: String,
    pub payload: Vec<u8>,
    pub binary: bool,
    /// Split into `fragment_size` frames when longer (JSON messages); raw frames go out whole.
    pub may_fragment: bool,
}

impl Downstream {
    pub fn message(msg: &Message) -> Downstream {
        Downstream {
            msg_id: msg.header.id.clone(),
            payload: msg.encode().into_bytes(),
            binary: false,
            may_fragment: true,
        }
    }
}

/// An ack-queue message waiting for its ACK.
#[derive(Clone, Debug)]
struct InFlight {
    msg: Message,
    /// Writes so far on the current connection.
    writes: u32,
    /// When the next write (or the give-up) is due.
    due: Instant,
}

/// What the ack queue wants done now.
#[derive(Debug)]
pub enum AckStep {
    /// Write this message; `attempt` counts writes since it became in flight (from 1).
    Write { item: Downstream, attempt: u32 },
    /// `ack_max_writes` writes went unanswered: the message went to the back of the queue.
    GaveUp { msg_id: String },
}

/// Timing of the ack queue, from `SimConfig`.
#[derive(Clone, Copy, Debug)]
pub struct AckTiming {
    pub retry_interval: Duration,
    pub max_writes: u32,
    pub requeue_delay: Duration,
    /// Messages in flight at once; CloudHub's is 1. At least 1.
    pub window: usize,
}

/// A node's downstream queues. They outlive connections: a message pushed while the node is away
/// waits, and the in-flight ack message is written again on the next connection.
#[derive(Debug, Default)]
pub struct NodeQueues {
    no_ack: VecDeque<Downstream>,
    ack: VecDeque<Message>,
    /// Oldest first; at most `AckTiming::window` (CloudHub: one).
    in_flight: VecDeque<InFlight>,
    /// After a give-up the sender rests, as ref's `sendMsg` sleeps 2 s before the next message.
    paused_until: Option<Instant>,
}

impl NodeQueues {
    pub fn push_no_ack(&mut self, item: Downstream) {
        self.no_ack.push_back(item);
    }

    pub fn push_ack(&mut self, msg: Message) {
        self.ack.push_back(msg);
    }

    /// Takes every waiting no-ack message, oldest first.
    pub fn take_no_ack(&mut self) -> Vec<Downstream> {
        self.no_ack.drain(..).collect()
    }

    /// A new connection took over: whatever was in flight may never have reached the edge, so it
    /// is written again at once with a fresh round of attempts.
    pub fn on_new_connection(&mut self, now: Instant) {
        for in_flight in &mut self.in_flight {
            in_flight.writes = 0;
            in_flight.due = now;
        }
    }

    /// An upstream `response` arrived. Returns true when it closes an in-flight message.
    pub fn on_response(&mut self, parent_id: &str) -> bool {
        let found = self.in_flight.iter().position(|f| f.msg.header.id == parent_id);
        if let Some(index) = found {
            self.in_flight.remove(index);
        }
        found.is_some()
    }

    /// The ID of the oldest message waiting for its ACK, if any.
    pub fn in_flight_id(&self) -> Option<&str> {
        self.in_flight.front().map(|f| f.msg.header.id.as_str())
    }

    /// Ack-queue messages not yet ACKed: waiting plus in flight.
    pub fn ack_backlog(&self) -> usize {
        self.ack.len() + self.in_flight.len()
    }

    /// Advances the ack queue to `now` by one step: resends or gives up on an in-flight message
    /// that is due, or else starts the next message if the window has room. Call it until it
    /// returns `None` to do everything that is due.
    pub fn next_ack_step(&mut self, now: Instant, timing: AckTiming) -> Option<AckStep> {
        if let Some(index) = self.in_flight.iter().position(|f| now >= f.due) {
            if self.in_flight[index].writes >= timing.max_writes {
                let msg = self.in_flight.remove(index)?.msg;
                let msg_id = msg.header.id.clone();
                self.ack.push_back(msg);
                self.paused_until = Some(now + timing.requeue_delay);
                return Some(AckStep::GaveUp { msg_id });
            }
            return Some(write_step(&mut self.in_flight[index], now, timing));
        }
        if self.in_flight.len() >= timing.window.max(1) {
            return None;
        }
        if self.paused_until.is_some_and(|until| now < until) {
            return None;
        }
        self.paused_until = None;
        let msg = self.ack.pop_front()?;
        self.in_flight.push_back(InFlight { msg, writes: 0, due: now });
        let started = self.in_flight.back_mut()?;
        Some(write_step(started, now, timing))
    }
}

/// Counts one more write of `in_flight` and schedules the next.
fn write_step(in_flight: &mut InFlight, now: Instant, timing: AckTiming) -> AckStep {
    in_flight.writes += 1;
    in_flight.due = now + timing.retry_interval;
    AckStep::Write { item: Downstream::message(&in_flight.msg), attempt: in_flight.writes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{text_content, Route};

    fn msg(source: &str, grp: &str, op: &str, resource: &str, rv: &str) -> Message {
        let route = Route {
            source: source.into(),
            group: grp.into(),
            operation: op.into(),
            resource: resource.into(),
            ..Route::default()
        };
        let mut m = Message::new(route, text_content("x"));
        m.header.resource_version = rv.into();
        m
    }

    #[test]
    fn classification_follows_cloudhub() {
        let ec = "edgecontroller";
        assert_eq!(classify(&msg(ec, "resource", "insert", "default/pod/p", "5")), Class::Ack);
        assert_eq!(classify(&msg(ec, "resource", "delete", "default/pod/p", "")), Class::Ack);
        assert!(matches!(
            classify(&msg(ec, "resource", "update", "default/pod/p", "")),
            Class::Drop(_)
        ));
        assert_eq!(classify(&msg(ec, "resource", "query", "default/podlist", "")), Class::NoAck);
        assert_eq!(
            classify(&msg("devicecontroller", "twin", "update", "membership", "")),
            Class::NoAck
        );
        assert_eq!(classify(&msg("router", "user", "publish", "topic", "")), Class::NoAck);
        assert_eq!(classify(&msg(ec, "resource", "insert", "default/node/n1", "7")), Class::NoAck);
        assert_eq!(classify(&msg(ec, "resource", "update", "default/node/n1", "7")), Class::Ack);
        let mut ok = msg(ec, "resource", "response", "default/node/n1", "");
        ok.content = text_content("OK");
        assert_eq!(classify(&ok), Class::NoAck);
        let mut resp = msg(ec, "resource", "response", "default/configmap/c", "9");
        resp.content = text_content("{}");
        assert_eq!(classify(&resp), Class::Ack);
        assert_eq!(
            classify(&msg("taskmanager", "taskmanager", "upgrade", "task/1", "")),
            Class::NoAck
        );
        assert_eq!(classify(&msg(ec, "resource", "update", "default/lease/n1", "")), Class::NoAck);
        assert_eq!(classify(&msg(ec, "resource", "response", "default/pod/p", "3")), Class::NoAck);
    }

    #[test]
    fn ack_queue_keeps_one_in_flight_resends_and_requeues() {
        let timing = AckTiming {
            retry_interval: Duration::from_secs(5),
            max_writes: 2,
            requeue_delay: Duration::from_secs(2),
            window: 1,
        };
        let (a, b) = (
            msg("e", "resource", "insert", "ns/pod/a", "1"),
            msg("e", "resource", "insert", "ns/pod/b", "1"),
        );
        let mut q = NodeQueues::default();
        q.push_ack(a.clone());
        q.push_ack(b.clone());
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert!(
            matches!(q.next_ack_step(t0, timing), Some(AckStep::Write { attempt: 1, ref item }) if item.msg_id == a.header.id)
        );
        assert!(q.next_ack_step(t0 + s, timing).is_none(), "b must wait for a");
        assert!(matches!(
            q.next_ack_step(t0 + 5 * s, timing),
            Some(AckStep::Write { attempt: 2, .. })
        ));
        assert!(
            matches!(q.next_ack_step(t0 + 10 * s, timing), Some(AckStep::GaveUp { ref msg_id }) if *msg_id == a.header.id)
        );
        assert!(q.next_ack_step(t0 + 11 * s, timing).is_none(), "paused after a give-up");
        assert!(
            matches!(q.next_ack_step(t0 + 12 * s, timing), Some(AckStep::Write { ref item, .. }) if item.msg_id == b.header.id)
        );
        assert!(!q.on_response(&a.header.id), "a is not in flight any more");
        assert!(q.on_response(&b.header.id));
        assert!(
            matches!(q.next_ack_step(t0 + 12 * s, timing), Some(AckStep::Write { ref item, attempt: 1 }) if item.msg_id == a.header.id)
        );
        q.on_new_connection(t0 + 13 * s);
        assert!(matches!(
            q.next_ack_step(t0 + 13 * s, timing),
            Some(AckStep::Write { attempt: 1, .. })
        ));
    }

    #[test]
    fn a_wider_window_keeps_several_in_flight_and_acks_any_of_them() {
        let timing = AckTiming {
            retry_interval: Duration::from_secs(5),
            max_writes: 5,
            requeue_delay: Duration::from_secs(2),
            window: 3,
        };
        let msgs: Vec<Message> =
            (0..4).map(|i| msg("e", "resource", "insert", &format!("ns/pod/{i}"), "1")).collect();
        let mut q = NodeQueues::default();
        msgs.iter().for_each(|m| q.push_ack(m.clone()));
        let t0 = Instant::now();
        let mut written = Vec::new();
        while let Some(step) = q.next_ack_step(t0, timing) {
            let AckStep::Write { item, attempt: 1 } = step else { panic!("{step:?}") };
            written.push(item.msg_id);
        }
        let ids: Vec<String> = msgs.iter().map(|m| m.header.id.clone()).collect();
        assert_eq!(written, ids[..3], "three in flight, the fourth waits");
        assert!(q.on_response(&ids[1]), "any in-flight message can be acked");
        assert!(
            matches!(q.next_ack_step(t0, timing), Some(AckStep::Write { ref item, .. }) if item.msg_id == ids[3])
        );
        assert!(q.next_ack_step(t0, timing).is_none());
        assert_eq!(q.in_flight_id(), Some(ids[0].as_str()), "oldest first");
        let resent: Vec<String> = std::iter::from_fn(|| q.next_ack_step(t0 + 5 * s(), timing))
            .map(|step| match step {
                AckStep::Write { item, attempt: 2 } => item.msg_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(resent, [ids[0].clone(), ids[2].clone(), ids[3].clone()]);
    }

    fn s() -> Duration {
        Duration::from_secs(1)
    }
}
