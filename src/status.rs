//! Live counters and link state, shared by every thread and read by whoever reports on the agent
//! (`edgehub status` through the local API). 32-bit atomics only, so the same code runs on 32-bit
//! MIPS and ARM gateways; times are Unix seconds (good until 2106).

use crate::outbox::Outbox;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the agent has done so far. Every field is a plain counter or flag.
#[derive(Debug, Default)]
pub struct Status {
    /// A session is up (between `cloud_connected` and `cloud_disconnected`).
    pub connected: AtomicBool,
    /// CloudHub's `host:port`, set once at start.
    pub server: OnceLock<String>,
    /// When the current session began, or 0.
    pub connected_since: AtomicU32,
    /// Failed dials since the last successful one.
    pub dial_attempts: AtomicU32,
    /// When the last keepalive was written, and the last frame of any kind arrived.
    pub last_keepalive: AtomicU32,
    pub last_frame: AtomicU32,
    /// Local API clients connected now.
    pub local_clients: AtomicU32,
    /// The client certificate's notAfter, when known, or 0.
    pub cert_not_after: AtomicU32,
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
    /// Local IP address of the current (or last) link's socket, for the node's `InternalIP`.
    link_local_ip: std::sync::Mutex<Option<std::net::IpAddr>>,
    /// The MQTT client's counters, once the EventBus has started one (issue 13).
    pub mqtt: OnceLock<crate::mqtt::Publisher>,
    /// DeviceTwin's counters, once its module runs (issue 13).
    pub twin: OnceLock<crate::modules::device_twin::TwinHandle>,
}

impl Status {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) fn set_link_local_ip(&self, ip: Option<std::net::IpAddr>) {
        *self.link_local_ip.lock().unwrap_or_else(|p| p.into_inner()) = ip;
    }

    /// The local IP address of the current (or last) link's socket, once one was up.
    pub fn link_local_ip(&self) -> Option<std::net::IpAddr> {
        *self.link_local_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn bump(counter: &AtomicU32) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU32) -> u32 {
        counter.load(Ordering::Relaxed)
    }

    /// Stores the current Unix time in `field`.
    pub(crate) fn stamp(field: &AtomicU32) {
        field.store(unix_now(), Ordering::Relaxed);
    }

    /// Everything an operator asks at 3 a.m., as JSON (what `edgehub status --json` prints).
    pub fn snapshot(&self, outbox: &Outbox, pending_requests: usize) -> Value {
        let get = |c: &AtomicU32| c.load(Ordering::Relaxed);
        let time = |c: &AtomicU32| match c.load(Ordering::Relaxed) {
            0 => Value::Null,
            t => json!(t),
        };
        let counters = &outbox.counters;
        let mut snapshot = json!({
            "connected": self.is_connected(),
            "server": self.server.get().cloned().unwrap_or_default(),
            "now": unix_now(),
            "connectedSince": time(&self.connected_since),
            "dialAttempts": get(&self.dial_attempts),
            "sessions": get(&self.sessions),
            "lastKeepaliveSent": time(&self.last_keepalive),
            "lastFrameReceived": time(&self.last_frame),
            "messagesUp": get(&self.messages_up),
            "messagesDown": get(&self.messages_down),
            "acksSent": get(&self.acks_sent),
            "requestsPending": pending_requests,
            "outbox": {
                "messages": outbox.len(),
                "inFlight": outbox.in_flight(),
                "bytes": outbox.bytes(),
                "spoolBytes": outbox.spool_bytes(),
            },
            "drops": {
                "outboxFull": get(&counters.rejected_full),
                "outboxOldest": get(&counters.dropped_oldest),
                "expired": get(&counters.expired),
                "urgentDropped": get(&counters.urgent_dropped),
                "unroutable": get(&self.unroutable),
                "malformed": get(&self.malformed),
            },
            "coalesced": get(&counters.coalesced),
            "spoolErrors": get(&counters.spool_errors),
            "orphanResponses": get(&self.orphan_responses),
            "redeliveries": get(&self.redeliveries),
            "localClients": get(&self.local_clients),
            "certNotAfter": time(&self.cert_not_after),
        });
        if let Some(mqtt) = self.mqtt.get() {
            snapshot["mqtt"] = json!(mqtt.stats());
        }
        if let Some(twin) = self.twin.get() {
            snapshot["twin"] = twin.stats_json();
        }
        snapshot
    }
}

/// Seconds since the Unix epoch, as u32 (0 if the clock is before 1970).
pub fn unix_now() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}
