//! Edge modules: named threads with a bounded inbox, registered for bus groups (`meta`, `twin`,
//! `bus`, `taskmanager`). This file holds what every module shares: the [`Hub`] handle through
//! which a module talks to the cloud (send, request/response, and the one `ack` call), and the
//! [`Module`] handle that owns the thread. Nothing here is specific to one module.

pub mod device_twin;
pub mod event_bus;
pub mod local_api;
pub mod meta_store;
pub mod node;
pub mod node_status;
pub mod service_bus;

use crate::error::{ErrorKind, Result};
use crate::message::Message;
use crate::outbox::{Outbox, Rejected};
use crate::router::{NoReply, Pending, Redeliveries};
use crate::status::Status;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Stack of a module thread: modules do small JSON work, not deep recursion.
pub const MODULE_STACK_BYTES: usize = 256 << 10;

/// A module's way to the cloud. Cheap to clone; holds no socket, so it works (and queues) while
/// the link is down.
#[derive(Clone, Debug)]
pub struct Hub {
    outbox: Arc<Outbox>,
    pending: Arc<Pending>,
    redeliveries: Arc<Redeliveries>,
    status: Arc<Status>,
}

impl Hub {
    pub(crate) fn new(
        outbox: Arc<Outbox>,
        pending: Arc<Pending>,
        redeliveries: Arc<Redeliveries>,
        status: Arc<Status>,
    ) -> Hub {
        Hub { outbox, pending, redeliveries, status }
    }

    /// Queues a message for the cloud. It survives disconnects and is written in order.
    ///
    /// # Errors
    /// The outbox is full: the message is handed back with the reason.
    pub fn send(&self, msg: Message) -> Result<(), Rejected> {
        self.outbox.push(msg)
    }

    /// The ACK contract of protocol §4.5 in one call: "I have applied this message". Queues the
    /// response CloudHub waits for if the message came through its ACK queue (it carries a
    /// resourceversion, or is a delete, and no no-ack rule of [`crate::router::cloud_queue`]
    /// covers it), and returns whether one was queued. Call it only after the change is durable:
    /// an ACK tells the cloud never to send this version again.
    pub fn ack(&self, msg: &Message) -> bool {
        let Some(ack) = self.ack_for(msg) else { return false };
        self.outbox.push_urgent(ack);
        true
    }

    /// [`Hub::ack`] for each of `msgs` (a batch applied together), queued at once so the ACKs
    /// share one flush. Returns how many were queued.
    pub fn ack_all<'a>(&self, msgs: impl IntoIterator<Item = &'a Message>) -> usize {
        let acks: Vec<Message> = msgs.into_iter().filter_map(|msg| self.ack_for(msg)).collect();
        let queued = acks.len();
        self.outbox.push_urgent_all(acks);
        queued
    }

    /// The ACK to queue for `msg`, if the cloud waits for one (counted and recorded as acked).
    fn ack_for(&self, msg: &Message) -> Option<Message> {
        if !crate::router::cloud_waits_for_ack(msg) {
            return None;
        }
        if !crate::router::ids_within_bounds(msg) {
            // The ACK would carry the ID; the router never delivers such a message from the cloud.
            log::warn!(
                "not acking a message whose msg_id has {} bytes (longest accepted: {})",
                msg.header.id.len(),
                crate::router::MAX_MSG_ID_BYTES
            );
            return None;
        }
        Status::bump(&self.status.acks_sent);
        self.redeliveries.acked(&msg.header.id);
        Some(msg.ack())
    }

    /// "I could not apply this message": the cloud's next re-send of it is delivered again
    /// instead of being dropped as a duplicate. Call it when not ACKing because of an error.
    pub fn release(&self, msg: &Message) {
        self.redeliveries.release(&msg.header.id);
    }

    /// Sends `msg` and waits up to `timeout` for the cloud's response (the message whose
    /// `parent_msg_id` is `msg`'s ID). On timeout the waiter is removed; a late response is then
    /// treated as an orphan (and still ACKed if it needs one). The request waits in the outbox
    /// across reconnects but is not spooled: a restart ends its waiter too.
    ///
    /// # Errors
    /// `Full` when too many requests wait or the outbox is full; `Timeout` when no response came;
    /// `Stopped` when the agent stops while waiting (at once, whatever the timeout).
    pub fn request(&self, msg: Message, timeout: Duration) -> Result<Message> {
        let id = msg.header.id.clone();
        let slot = self.pending.register_slot(&id)?;
        if let Err(rejected) = self.outbox.push_request(msg) {
            self.pending.cancel(&id);
            return Err(ErrorKind::Full.msg(rejected.to_string()));
        }
        match slot.wait(timeout) {
            Ok(response) => Ok(response),
            Err(NoReply::Timeout) => {
                self.pending.cancel(&id);
                Err(ErrorKind::Timeout.msg(format!(
                    "no response to request {} within {timeout:?}",
                    crate::logging::shown(&id)
                )))
            }
            Err(NoReply::Cancelled) => Err(ErrorKind::Stopped.msg(format!(
                "request {} cancelled: the agent is stopping",
                crate::logging::shown(&id)
            ))),
        }
    }

    /// Sends `msg` as a request without waiting: the response (the message whose
    /// `parent_msg_id` is `msg`'s ID) arrives on the returned handle's receiver. Dropping the
    /// handle gives the request up; a later response is then an orphan.
    ///
    /// # Errors
    /// `Full` when too many requests wait or the outbox is full.
    pub fn request_async(&self, msg: Message) -> Result<PendingReply> {
        let id = msg.header.id.clone();
        let rx = self.pending.register(&id)?;
        if let Err(rejected) = self.outbox.push_request(msg) {
            self.pending.cancel(&id);
            return Err(ErrorKind::Full.msg(rejected.to_string()));
        }
        Ok(PendingReply { id, rx, pending: self.pending.clone() })
    }

    /// The agent is stopping: every request waiting for the cloud ends now with `Stopped`.
    pub(crate) fn cancel_requests(&self) {
        self.pending.close();
    }

    /// The agent's counters and link state.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// The status report of `edgehub status`: counters, link state, outbox and drops.
    pub fn status_json(&self) -> serde_json::Value {
        self.status.snapshot(&self.outbox, self.pending.len())
    }

    /// True while a session with the cloud is up.
    pub fn is_connected(&self) -> bool {
        self.status.is_connected()
    }

    /// Messages waiting to go up.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

/// A request in flight, from [`Hub::request_async`]. Its waiter is removed when dropped.
#[derive(Debug)]
pub struct PendingReply {
    id: String,
    rx: Receiver<Message>,
    pending: Arc<Pending>,
}

impl PendingReply {
    /// The request's `msg_id`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the response arrives (once), for `select!`.
    pub fn receiver(&self) -> &Receiver<Message> {
        &self.rx
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.pending.cancel(&self.id);
    }
}

/// What a module's thread gets: its inbox (cloud messages for its groups, and connection events)
/// and the hub. The inbox disconnects when the agent stops: that is the module's signal to return.
pub struct ModuleContext {
    pub name: String,
    /// To `select!` on beside a module's other channels; waiting on it alone, use
    /// [`ModuleContext::recv`].
    pub inbox: Receiver<Message>,
    pub hub: Hub,
}

impl ModuleContext {
    /// The next message, waiting for it; `None` once the agent stops. For a module that waits on
    /// its inbox alone: `while let Some(msg) = ctx.recv() { ... }`.
    ///
    /// A lone `recv()` on a crossbeam channel spins, then calls `sched_yield` up to four times,
    /// before it sleeps, every time the inbox is empty: 2.4 yields per message for a module fed
    /// 10k messages a second on the bench VM, about a tenth of that path's CPU. `select!` over
    /// two operations sleeps at once, as the agent's own modules do with their other channels.
    pub fn recv(&self) -> Option<Message> {
        crossbeam_channel::select! {
            recv(self.inbox) -> msg => msg.ok(),
            recv(crossbeam_channel::never::<()>()) -> _ => None,
        }
    }
}

/// The body of a module: runs on the module's own thread until its inbox disconnects.
pub type ModuleBody = Box<dyn FnOnce(ModuleContext) + Send + 'static>;

/// A module to start: its name, the bus groups it receives, and its body.
pub struct ModuleSpec {
    pub name: String,
    pub groups: Vec<&'static str>,
    pub body: ModuleBody,
}

impl ModuleSpec {
    pub fn new(
        name: impl Into<String>,
        groups: &[&'static str],
        body: impl FnOnce(ModuleContext) + Send + 'static,
    ) -> ModuleSpec {
        ModuleSpec { name: name.into(), groups: groups.to_vec(), body: Box::new(body) }
    }
}

/// A running module: its thread, and the sending end of its inbox until the router takes it.
pub struct Module {
    pub name: String,
    pub groups: Vec<&'static str>,
    thread: Option<JoinHandle<()>>,
}

impl Module {
    /// Starts `spec` on a thread named `eh-<name>` with an inbox for `inbox_cap` messages.
    /// Returns the handle and the inbox's sender, which only the router should keep: the router
    /// keeps the inbox within `inbox_cap` (`Router::with_inbox_capacity`).
    ///
    /// # Errors
    /// `Io` when the thread cannot be spawned.
    pub fn spawn(
        spec: ModuleSpec,
        inbox_cap: usize,
        hub: Hub,
    ) -> Result<(Module, Sender<Message>)> {
        // Unbounded as a channel, bounded by the router (`Router::with_inbox_capacity`), which
        // only then allocates slots as messages come, instead of all of them up front.
        let _ = inbox_cap;
        let (inbox_tx, inbox_rx) = unbounded();
        let ModuleSpec { name, groups, body } = spec;
        let context = ModuleContext { name: name.clone(), inbox: inbox_rx, hub };
        let thread = std::thread::Builder::new()
            .name(thread_name(&name))
            .stack_size(MODULE_STACK_BYTES)
            .spawn(move || body(context))
            .map_err(|e| ErrorKind::Io.msg(format!("spawn module {name}")).src(e))?;
        Ok((Module { name, groups, thread: Some(thread) }, inbox_tx))
    }

    /// Waits for the module's thread to end (after its inbox disconnected).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("bug: module {} panicked", self.name);
            }
        }
    }
}

/// `eh-<name>`, cut to Linux's 15-byte thread-name limit.
pub(crate) fn thread_name(name: &str) -> String {
    let mut n = format!("eh-{name}");
    while n.len() > 15 {
        n.pop();
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// A bounded channel allocated and touched every slot of an inbox at start (about 250 bytes
    /// each): a million-message inbox would cost about 240 MB before any message came.
    #[test]
    fn an_inbox_costs_nothing_until_messages_come() {
        let outbox = Arc::new(Outbox::new(crate::outbox::Limits::simple(10, 1 << 20, 10, 10)));
        let hub = Hub::new(outbox, Arc::default(), Arc::default(), Arc::default());
        let before = vm_rss_kib();
        let spec = ModuleSpec::new("roomy", &["meta"], |ctx| while ctx.recv().is_some() {});
        let (module, inbox) = Module::spawn(spec, 1_000_000, hub).unwrap();
        let grown = vm_rss_kib().saturating_sub(before);
        drop(inbox);
        module.join();
        assert!(grown < 50 << 10, "spawning a module grew VmRSS by {grown} KiB");
    }

    /// `recv` gives the inbox's messages in order, then `None` when the agent drops the inbox.
    #[test]
    fn recv_gives_messages_in_order_then_none_at_stop() {
        let outbox = Arc::new(Outbox::new(crate::outbox::Limits::simple(10, 1 << 20, 10, 10)));
        let hub = Hub::new(outbox, Arc::default(), Arc::default(), Arc::default());
        let (seen_tx, seen_rx) = crossbeam_channel::unbounded();
        let spec = ModuleSpec::new("reader", &["meta"], move |ctx| {
            while let Some(msg) = ctx.recv() {
                seen_tx.send(Some(msg.header.id)).unwrap();
            }
            seen_tx.send(None).unwrap();
        });
        let (module, inbox) = Module::spawn(spec, 10, hub).unwrap();
        let sent: Vec<Message> =
            (0..3).map(|_| Message::with_text(crate::message::Route::default(), "m")).collect();
        let ids: Vec<String> = sent.iter().map(|m| m.header.id.clone()).collect();
        for msg in sent {
            inbox.send(msg).unwrap();
        }
        drop(inbox);
        module.join();
        let seen: Vec<Option<String>> = seen_rx.try_iter().collect();
        let mut expected: Vec<Option<String>> = ids.into_iter().map(Some).collect();
        expected.push(None);
        assert_eq!(seen, expected);
    }
}
