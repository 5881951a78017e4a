//! Live counters and link state, shared by every thread and read by whoever reports on the agent.
//! 32-bit atomics only, so the same code runs on 32-bit MIPS and ARM gateways.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// What the agent has done so far. Every field is a plain counter or flag.
#[derive(Debug, Default)]
pub struct Status {
    /// A session is up (between `cloud_connected` and `cloud_disconnected`).
    pub connected: AtomicBool,
    /// Sessions established since start.
    pub sessions: AtomicU32,
    /// Dial attempts that failed (TCP, TLS or upgrade).
    pub dial_failures: AtomicU32,
    /// Messages written to the cloud, keepalives and ACKs included.
    pub messages_up: AtomicU32,
    /// Data messages read from the cloud.
    pub messages_down: AtomicU32,
    pub keepalives_sent: AtomicU32,
    pub acks_sent: AtomicU32,
    /// Frames from the cloud that were not a message (bad JSON, wrong shape).
    pub malformed: AtomicU32,
    /// Messages for a group edgehub has no route or module for.
    pub unroutable: AtomicU32,
    /// Responses nobody waited for (their requester timed out, or never existed).
    pub orphan_responses: AtomicU32,
    /// Re-sends of ack-queue messages kept from a module that already has them.
    pub redeliveries: AtomicU32,
    /// Control operations (`config`/`ping`/`pong`) answered.
    pub control_answered: AtomicU32,
}

impl Status {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(counter: &AtomicU32) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU32) -> u32 {
        counter.load(Ordering::Relaxed)
    }
}
