//! Where each message from the cloud goes: the dispatch table of protocol §3.5 (HEAD), the pending
//! requests waiting for a response, viaduct's control operations, and the connection events every
//! module receives. Touches no socket and no file, and never drops a message without saying so.
//!
//! Back-pressure: each module's inbox is bounded. When one is full the reader *waits* (logging it
//! once) instead of dropping (KubeEdge's 100-slot FIFO drops the oldest, §8 W7). The wait pauses
//! reading from the socket, so TCP flow control slows the cloud down; nothing is lost. A stop
//! request always interrupts the wait.

use crate::message::{group, operation, Message};
use crate::outbox::Outbox;
use crate::status::Status;
use crossbeam_channel::{bounded, select, Receiver, Sender};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Groups on the edge's side (protocol §1.5): what modules register for.
pub mod bus_group {
    pub const META: &str = "meta";
    pub const TWIN: &str = "twin";
    pub const BUS: &str = "bus";
    pub const TASK_MANAGER: &str = "taskmanager";
    /// Every wire group the table does not know (custom groups of local apps). Without a module
    /// registered for it, such messages are unroutable.
    pub const OTHER: &str = "other";
    pub const ALL: [&str; 5] = [META, TWIN, BUS, TASK_MANAGER, OTHER];
}

/// Upper bound on requests waiting for a response at once.
pub const MAX_PENDING_REQUESTS: usize = 1024;

/// Longest `msg_id` or `parent_msg_id` accepted from the cloud. KubeEdge's are 36-byte UUIDs; an
/// id is copied into the redelivery memory and into every ACK or control answer, so a longer one
/// is refused (logged, counted as malformed, not delivered, not ACKed): no KubeEdge cloud sends it.
pub const MAX_MSG_ID_BYTES: usize = 128;

/// True when both IDs of `msg` are within [`MAX_MSG_ID_BYTES`].
pub fn ids_within_bounds(msg: &Message) -> bool {
    msg.header.id.len() <= MAX_MSG_ID_BYTES && msg.header.parent_id.len() <= MAX_MSG_ID_BYTES
}

/// Where the table sends a message (protocol §3.5, HEAD column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// viaduct control operation: answered here with `response`/`"ack"` (§2.8).
    Control,
    /// Carries `parent_msg_id` (group `resource`, `func` or `user`). `Router::dispatch` hands a
    /// reply of any group to its waiting request before consulting this table, so here nobody
    /// waits: a request that carries a parent still goes to `meta` (§8 W11), anything else is an
    /// orphan.
    Response,
    /// To the module registered for this bus group.
    Module(&'static str),
    /// Not deliverable anywhere; the reason is logged and counted.
    Unroutable(&'static str),
}

const UNKNOWN_GROUP: &str = "unknown group";

/// The dispatch table. Pure, so it is tested on its own.
pub fn destination(msg: &Message) -> Destination {
    if msg.is_control() {
        return Destination::Control;
    }
    match msg.route.group.as_str() {
        group::RESOURCE | group::FUNC if msg.is_response() => Destination::Response,
        group::RESOURCE | group::FUNC => Destination::Module(bus_group::META),
        // HEAD: twin ignores parent_msg_id.
        group::TWIN => Destination::Module(bus_group::TWIN),
        group::USER if msg.is_response() => Destination::Response,
        group::USER => match msg.route.source.as_str() {
            "router_eventbus" | "router_servicebus" => Destination::Module(bus_group::BUS),
            _ => Destination::Unroutable("user message from a source other than the router"),
        },
        group::TASK_MANAGER => Destination::Module(bus_group::TASK_MANAGER),
        _ => Destination::Unroutable(UNKNOWN_GROUP),
    }
}

/// Which of CloudHub's two downstream queues a message travelled in (protocol §4.4), which is what
/// decides whether the edge owes an ACK: the cloud re-sends an ack-queue message every 5 s until
/// it sees one, and waits for nothing on a no-ack message (an ACK for it is one wasted message up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudQueue {
    /// The no-ack ("list") queue: sent once, never ACKed.
    NoAck,
    /// The ack queue: re-sent until the edge ACKs it.
    Ack,
    /// Neither: CloudHub drops it before it reaches an edge. Carries the reason.
    Drop(&'static str),
}

/// Resource substrings that put a message in the no-ack queue (ref `isListResource`; HEAD adds
/// `k8s/ca.crt`).
const NO_ACK_RESOURCE_PARTS: [&str; 5] =
    ["podlist", "membership", "twin/cloud_updated", "serviceaccounttoken", "k8s/ca.crt"];
/// CSI volume operations, no-ack at ref.
const VOLUME_OPERATIONS: [&str; 4] =
    ["createvolume", "deletevolume", "controllerpublishvolume", "controllerunpublishvolume"];
/// Sources whose messages are never ACKed (HEAD `noAckRequired`).
const NO_ACK_SOURCES: [&str; 2] = ["taskmanager", "nodeupgradejobcontroller"];
/// Resource types of edgecontroller messages that are never ACKed (HEAD `noAckRequired`).
const NO_ACK_EDGECONTROLLER_TYPES: [&str; 5] =
    ["lease", "nodepatch", "podpatch", "podstatus", "certificatesigningrequest"];

/// The cloud's queue for `msg`: ref's `isListResource` (CH/channelq/channelq.go) together with
/// HEAD's `noAckRequired` (CH/dispatcher/message_dispatcher.go), so that whatever either version
/// would have put in its ack queue is ACKed. The one rule where the versions differ (ref sends
/// every edgecontroller `node` message no-ack, HEAD only those that are not `update`) takes HEAD's
/// narrower side: an ACK the cloud did not want costs one message, a missing one stalls the
/// node's ack queue for 25 s. Used by the router and `Hub::ack` on the edge, and by the simulator
/// to sort what it sends, so both ends read the same rules. `resource` is the wire form
/// `ns/type/name` (CloudHub trims `node/<id>/` before writing), so its type is the second segment.
///
/// Reply shapes this sorts, with the rule each follows:
/// - edgecontroller's answer to a node status `update` (`response` on `<ns>/node/<n>`, `"OK"`,
///   with a resourceversion): no-ack, rule "`response` with content `"OK"`" (ref and HEAD), and
///   also "edgecontroller `node`, not `update`".
/// - edgecontroller's answer to the registration `insert` (`response` on `<ns>/node/<n>`, `"OK"`
///   or the error text, no resourceversion): no-ack, "edgecontroller `node`" (an error text is no
///   "OK", so this rule is the one that covers it).
/// - edgecontroller's answer to the label `update` of `<ns>/node/<n>`: as the status answer.
/// - devicecontroller's answer to `edge_updated` (`response` in group `twin`, `"OK"`): no-ack,
///   "`response` with content `"OK"`".
/// - servicebus or eventbus answers (group `user`): no-ack, "group `user`".
/// - HEAD `ObjectResp` answers on `lease`, `nodepatch`, `podpatch`, `podstatus`, `pod`+`response`:
///   no-ack, HEAD's edgecontroller type list; `error` operations: no-ack, HEAD "error responses".
/// - a query's answer with the object (`response` on `<ns>/configmap/<n>` etc. with a
///   resourceversion, example D2): ack queue, the default; the edge ACKs it even when its
///   requester has gone (protocol §8 W9).
/// - anything else without a resourceversion that is not a delete: CloudHub drops it.
pub fn cloud_queue(msg: &Message) -> CloudQueue {
    let route = &msg.route;
    let resource_type = route.resource.split('/').nth(1).unwrap_or("");
    let from_edgecontroller = route.source == "edgecontroller";
    let no_ack = NO_ACK_RESOURCE_PARTS.iter().any(|part| route.resource.contains(part))
        || VOLUME_OPERATIONS.contains(&route.operation.as_str())
        || NO_ACK_SOURCES.contains(&route.source.as_str())
        || route.operation == "applicationResponse"
        || route.operation == operation::ERROR
        || (route.operation == operation::RESPONSE
            && msg.content_text().as_deref() == Some(crate::message::CONTENT_OK))
        || route.group == group::USER
        || (from_edgecontroller && resource_type == "node" && route.operation != operation::UPDATE)
        || (from_edgecontroller && NO_ACK_EDGECONTROLLER_TYPES.contains(&resource_type))
        || (from_edgecontroller
            && resource_type == "pod"
            && route.operation == operation::RESPONSE);
    if no_ack {
        CloudQueue::NoAck
    } else if msg.needs_ack() {
        CloudQueue::Ack
    } else {
        CloudQueue::Drop("ack-queue message without resourceversion and not a delete")
    }
}

/// True when the cloud waits for an ACK of `msg` ([`cloud_queue`] is `Ack`).
pub fn cloud_waits_for_ack(msg: &Message) -> bool {
    cloud_queue(msg) == CloudQueue::Ack
}

/// Requests waiting for the cloud's response, keyed by the request's `msg_id`. A waiter removes its
/// own entry when it gives up, so no timer is left behind per request. When the agent stops,
/// [`Pending::close`] wakes every waiter at once (and refuses new ones), so a request with a long
/// timeout cannot hold the stop.
#[derive(Debug, Default)]
pub struct Pending {
    waiters: Mutex<HashMap<String, Waiter>>,
    /// Set (under the `waiters` lock) by `close`: no request may wait any more.
    closed: std::sync::atomic::AtomicBool,
}

/// Where one response goes.
#[derive(Debug)]
enum Waiter {
    /// A channel, for a waiter that `select!`s (`Hub::request_async`).
    Channel(Sender<Message>),
    /// A slot, for a thread that only blocks on it (`Hub::request`).
    Slot(Arc<ReplySlot>),
}

/// The response to one blocking request. A slot and a condition variable rather than a channel:
/// a channel's receiver spins and yields the CPU several times before it sleeps, on every request
/// of a request/response trickle (issue 14).
#[derive(Debug, Default)]
pub struct ReplySlot {
    state: Mutex<Reply>,
    filled: std::sync::Condvar,
}

#[derive(Debug, Default)]
#[allow(clippy::large_enum_variant)] // one per request, inside the slot's own allocation: a Box would allocate again per response
enum Reply {
    #[default]
    Waiting,
    Answered(Message),
    /// The agent is stopping (`Pending::close`).
    Cancelled,
}

/// Why [`ReplySlot::wait`] returned without a response.
#[derive(Debug, PartialEq, Eq)]
pub enum NoReply {
    Timeout,
    Cancelled,
}

impl ReplySlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Reply> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, reply: Reply) {
        *self.lock() = reply;
        self.filled.notify_one();
    }

    /// Waits up to `timeout` for the response.
    ///
    /// # Errors
    /// `Timeout`, or `Cancelled` when the agent stops first.
    pub fn wait(&self, timeout: Duration) -> Result<Message, NoReply> {
        let deadline = std::time::Instant::now() + timeout;
        let mut reply = self.lock();
        loop {
            match std::mem::take(&mut *reply) {
                Reply::Answered(message) => return Ok(message),
                Reply::Cancelled => return Err(NoReply::Cancelled),
                Reply::Waiting => {}
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(NoReply::Timeout);
            }
            reply = match self.filled.wait_timeout(reply, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        // A map of channel ends and slots: a panic elsewhere cannot leave it half-updated.
        self.waiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a waiter for the response to `request_id`. The receiver disconnects (with no
    /// message) if the agent stops first.
    ///
    /// # Errors
    /// `Full` when too many requests wait; `Stopped` once [`Pending::close`] was called.
    pub fn register(&self, request_id: &str) -> crate::Result<Receiver<Message>> {
        let (tx, rx) = bounded(1);
        self.insert(request_id, Waiter::Channel(tx))?;
        Ok(rx)
    }

    /// As [`Pending::register`], for a thread that blocks on the response: it waits on the
    /// returned slot, which says `Cancelled` if the agent stops first.
    ///
    /// # Errors
    /// As [`Pending::register`].
    pub fn register_slot(&self, request_id: &str) -> crate::Result<Arc<ReplySlot>> {
        let slot = Arc::new(ReplySlot::default());
        self.insert(request_id, Waiter::Slot(slot.clone()))?;
        Ok(slot)
    }

    fn insert(&self, request_id: &str, waiter: Waiter) -> crate::Result<()> {
        let mut waiters = self.lock();
        // Checked under the lock `close` takes, so no waiter can slip in after it.
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::ErrorKind::Stopped.msg("not waiting for a response"));
        }
        if waiters.len() >= MAX_PENDING_REQUESTS {
            return Err(crate::ErrorKind::Full.msg("too many requests waiting for the cloud"));
        }
        waiters.insert(request_id.to_owned(), waiter);
        Ok(())
    }

    /// The agent is stopping: every waiter wakes now (a receiver disconnects, a slot says
    /// `Cancelled`) and no new one is registered. A response arriving later is an orphan.
    pub fn close(&self) {
        let mut waiters = self.lock();
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let woken = waiters.len();
        for (_, waiter) in waiters.drain() {
            // Dropping a Sender disconnects its waiter's receiver.
            if let Waiter::Slot(slot) = waiter {
                slot.set(Reply::Cancelled);
            }
        }
        if woken > 0 {
            log::info!("stopping: cancelled {woken} request(s) waiting for the cloud");
        }
    }

    /// Forgets a waiter (it timed out or its request could not be queued).
    pub fn cancel(&self, request_id: &str) {
        self.lock().remove(request_id);
    }

    /// Hands `response` to its waiter. Never blocks (a channel holds one message, a slot one,
    /// and each waiter gets one response), so the reader cannot deadlock here (protocol §8 W8).
    /// Gives the message back when nobody waits.
    pub fn deliver(&self, response: Message) -> Result<(), Box<Message>> {
        let waiter = self.lock().remove(&response.header.parent_id);
        match waiter {
            Some(Waiter::Channel(tx)) => {
                tx.try_send(response).map_err(|e| Box::new(e.into_inner()))
            }
            Some(Waiter::Slot(slot)) => {
                slot.set(Reply::Answered(response));
                Ok(())
            }
            None => Err(Box::new(response)),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ack-queue messages already handed to a module, so the cloud's re-sends of the same `msg_id`
/// (every 5 s until it sees the ACK, protocol §4.4) reach the module once: a re-send of a message
/// the module is still working on is dropped, and one it already ACKed is ACKed again here.
/// A module that could not apply a message calls `Hub::release` so the next re-send gets through.
/// Bounded: at most [`REDELIVERY_MEMORY`] IDs of at most [`MAX_MSG_ID_BYTES`] each, every one
/// stored once (shared by the map and the age queue), so well under 1 MiB in all; the oldest IDs
/// are forgotten first, and a longer ID is never remembered.
#[derive(Debug, Default)]
pub struct Redeliveries {
    seen: Mutex<SeenIds>,
}

/// ID → ACKed yet, and the IDs oldest first; both hold the same `Arc`, so each ID is stored once.
type SeenIds = (HashMap<Arc<str>, bool>, std::collections::VecDeque<Arc<str>>);

/// Message IDs remembered for re-send detection.
pub const REDELIVERY_MEMORY: usize = 4096;

/// What to do with an ack-queue message from the cloud.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time: deliver it.
    New,
    /// A re-send while the module still works on it: drop it.
    InProgress,
    /// A re-send of a message already ACKed (the ACK was lost): ACK again, do not deliver.
    Acked,
}

impl Redeliveries {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeenIds> {
        // Plain maps: a panic elsewhere cannot leave them half-updated.
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `msg_id` as delivered if new, and says what to do with it. An ID over
    /// [`MAX_MSG_ID_BYTES`] is not remembered (the router refuses such messages before this).
    pub fn check(&self, msg_id: &str) -> Seen {
        if msg_id.len() > MAX_MSG_ID_BYTES {
            return Seen::New;
        }
        let mut guard = self.lock();
        let (seen, order) = &mut *guard;
        match seen.get(msg_id) {
            Some(true) => Seen::Acked,
            Some(false) => Seen::InProgress,
            None => {
                if order.len() >= REDELIVERY_MEMORY {
                    if let Some(old) = order.pop_front() {
                        seen.remove(&old);
                    }
                }
                let id: Arc<str> = Arc::from(msg_id);
                seen.insert(Arc::clone(&id), false);
                order.push_back(id);
                Seen::New
            }
        }
    }

    /// The module ACKed `msg_id`.
    pub fn acked(&self, msg_id: &str) {
        if let Some(state) = self.lock().0.get_mut(msg_id) {
            *state = true;
        }
    }

    /// IDs remembered.
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The module gave `msg_id` up: let the next re-send through.
    pub fn release(&self, msg_id: &str) {
        let mut guard = self.lock();
        let (seen, order) = &mut *guard;
        if seen.remove(msg_id).is_some() {
            order.retain(|id| &**id != msg_id);
        }
    }
}

/// The reader was asked to stop while waiting to deliver.
#[derive(Debug)]
pub struct Stopped;

/// Dispatches cloud messages to module inboxes, pending requests and the outbox.
#[derive(Debug)]
pub struct Router {
    /// Every module: its name, its first group (for connection events) and its inbox.
    modules: Vec<(String, &'static str, Sender<Message>)>,
    /// Bus group → index into `modules`.
    groups: HashMap<&'static str, usize>,
    pending: Arc<Pending>,
    redeliveries: Arc<Redeliveries>,
    outbox: Arc<Outbox>,
    status: Arc<Status>,
    /// Messages a module inbox may hold (see `deliver_to`).
    inbox_cap: usize,
}

/// How often a reader waiting for room in a full module inbox looks again.
const INBOX_FULL_POLL: Duration = Duration::from_millis(1);

impl Router {
    /// `modules`: name, first group and inbox of each module; `groups`: bus group → module index.
    pub fn new(
        modules: Vec<(String, &'static str, Sender<Message>)>,
        groups: HashMap<&'static str, usize>,
        pending: Arc<Pending>,
        redeliveries: Arc<Redeliveries>,
        outbox: Arc<Outbox>,
        status: Arc<Status>,
    ) -> Router {
        let inbox_cap = crate::config::DEFAULT_MODULE_INBOX_CAP;
        Router { modules, groups, pending, redeliveries, outbox, status, inbox_cap }
    }

    /// Sets how many messages a module inbox may hold (`moduleInboxCapacity`).
    pub fn with_inbox_capacity(mut self, inbox_cap: usize) -> Router {
        self.inbox_cap = inbox_cap.max(1);
        self
    }

    /// Routes one message from the cloud. Blocks only while a module inbox is full, and returns
    /// `Err(Stopped)` if `stop` fires (or is dropped) during that wait.
    pub fn dispatch(&self, msg: Message, stop: &Receiver<()>) -> Result<(), Stopped> {
        if !ids_within_bounds(&msg) {
            log::warn!(
                "dropping message from cloud: msg_id of {} bytes or parent_msg_id of {} bytes is \
                 longer than {MAX_MSG_ID_BYTES} (KubeEdge's are 36-byte UUIDs): {} {} {}",
                msg.header.id.len(),
                msg.header.parent_id.len(),
                crate::logging::shown(&msg.route.group),
                crate::logging::shown(&msg.route.operation),
                crate::logging::shown(&msg.route.resource),
            );
            Status::bump(&self.status.malformed);
            return Ok(());
        }
        // A reply whose request still waits goes to it, whatever its group: ref EdgeHub's rule
        // (protocol §3.5 step 1) for the answers HEAD hands to a group, such as devicecontroller's
        // group-`twin` "OK" to an `edge_updated` request. Unparented or unawaited: the table.
        let msg = if msg.is_response() && !msg.is_control() {
            match self.pending.deliver(msg) {
                Ok(()) => return Ok(()),
                Err(msg) => *msg,
            }
        } else {
            msg
        };
        match destination(&msg) {
            Destination::Control => {
                log::debug!("answering control operation {msg:?}");
                Status::bump(&self.status.control_answered);
                self.outbox.push_urgent(msg.control_ack());
                Ok(())
            }
            // Nobody waits for it (that was tried above).
            Destination::Response
                if msg.route.operation != operation::RESPONSE
                    && matches!(msg.route.group.as_str(), group::RESOURCE | group::FUNC) =>
            {
                // A request that happens to carry a parent is still a request (§8 W11).
                self.deliver(bus_group::META, msg, stop)
            }
            Destination::Response => {
                self.orphan(msg);
                Ok(())
            }
            Destination::Module(bus) if msg.needs_ack() => {
                match self.redeliveries.check(&msg.header.id) {
                    Seen::New => self.deliver(bus, msg, stop),
                    Seen::InProgress => {
                        log::debug!("cloud re-sent {msg:?} while its module works on it; dropped");
                        Status::bump(&self.status.redeliveries);
                        Ok(())
                    }
                    Seen::Acked => {
                        log::debug!("cloud re-sent {msg:?} after its ACK; ACKing again");
                        Status::bump(&self.status.redeliveries);
                        Status::bump(&self.status.acks_sent);
                        self.outbox.push_urgent(msg.ack());
                        Ok(())
                    }
                }
            }
            Destination::Module(bus) => self.deliver(bus, msg, stop),
            Destination::Unroutable(why @ UNKNOWN_GROUP)
                if self.groups.contains_key(bus_group::OTHER) =>
            {
                log::debug!(
                    "{why} {:?}: to the module for other groups",
                    crate::logging::shown(&msg.route.group)
                );
                self.deliver(bus_group::OTHER, msg, stop)
            }
            Destination::Unroutable(why) => {
                log::warn!("dropping message from cloud: {why}: {msg:?}");
                Status::bump(&self.status.unroutable);
                Ok(())
            }
        }
    }

    /// A response nobody waits for. If it travelled in the cloud's ACK queue it is still ACKed,
    /// once per arrival, or CloudHub would re-send it every 5 s forever (protocol §8 W9). A no-ack
    /// reply (edgecontroller's "OK" to each node status update, say) is consumed without an ACK
    /// (edge-node §4 item 7): see [`cloud_queue`].
    fn orphan(&self, msg: Message) {
        Status::bump(&self.status.orphan_responses);
        if cloud_waits_for_ack(&msg) {
            log::info!("acking response nobody waits for (requester gone): {msg:?}");
            Status::bump(&self.status.acks_sent);
            self.outbox.push_urgent(msg.ack());
        } else {
            log::debug!("consuming no-ack response nobody waits for: {msg:?}");
        }
    }

    fn deliver(&self, bus: &'static str, msg: Message, stop: &Receiver<()>) -> Result<(), Stopped> {
        let Some(&index) = self.groups.get(bus) else {
            // Not ACKed: the cloud keeps it (if it is an ack-queue message) for when a module exists.
            log::warn!("no module registered for group {bus}; dropping {msg:?}");
            Status::bump(&self.status.unroutable);
            return Ok(());
        };
        self.deliver_to(index, msg, stop)
    }

    /// Module inboxes are unbounded channels (`Module::spawn`) bounded here, by their length: only
    /// the router sends to them. A bounded channel allocates and touches every slot up front,
    /// 63 KB per module at the default capacity, most of an idle agent's heap (issue 14).
    fn deliver_to(&self, index: usize, msg: Message, stop: &Receiver<()>) -> Result<(), Stopped> {
        let (module, _, inbox) = &self.modules[index];
        if inbox.len() >= self.inbox_cap {
            log::warn!(
                "module {module} inbox full; pausing reads from the cloud until it catches up"
            );
            while inbox.len() >= self.inbox_cap {
                select! {
                    recv(stop) -> _ => return Err(Stopped),
                    default(INBOX_FULL_POLL) => {}
                }
            }
        }
        if let Err(e) = inbox.send(msg) {
            log::error!("module {module} has stopped; dropping {:?}", e.into_inner());
            Status::bump(&self.status.unroutable);
        }
        Ok(())
    }

    /// Tells every module, once each, that the cloud link came up or went down (protocol §3.3;
    /// KubeEdge ref told `meta` twice, §8 W16). Waits for full inboxes like [`Router::dispatch`].
    pub fn broadcast_connection(
        &self,
        connected: bool,
        stop: &Receiver<()>,
    ) -> Result<(), Stopped> {
        for (index, (_, group, _)) in self.modules.iter().enumerate() {
            self.deliver_to(index, Message::connection_event(group, connected), stop)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Route;

    fn m(group: &str, source: &str, operation: &str, parent: &str) -> Message {
        let mut msg = Message::with_text(
            Route {
                source: source.into(),
                group: group.into(),
                operation: operation.into(),
                resource: "default/pod/p".into(),
                ..Route::default()
            },
            "x",
        );
        msg.header.parent_id = parent.into();
        msg
    }

    /// KubeEdge HEAD's TestDispatch cases (protocol §7.2), plus the control operations.
    #[test]
    fn dispatch_table_matches_kubeedge_head() {
        use Destination::*;
        let cases = [
            (m("edged", "", "update", ""), Unroutable("unknown group")),
            (m("twin", "", "update", "p1"), Module("twin")),
            (m("twin", "", "update", ""), Module("twin")),
            (m("user", "router_eventbus", "publish", ""), Module("bus")),
            (m("user", "router_servicebus", "GET", ""), Module("bus")),
            (m("user", "router_servicebus", "response", "p1"), Response),
            (
                m("user", "someone", "publish", ""),
                Unroutable("user message from a source other than the router"),
            ),
            (m("resource", "edgecontroller", "insert", ""), Module("meta")),
            (m("func", "x", "update", ""), Module("meta")),
            (m("func", "x", "response", "p1"), Response),
            (m("resource", "edgecontroller", "response", "p1"), Response),
            (m("taskmanager", "x", "upgrade", "p1"), Module("taskmanager")),
            (m("resource", "x", "ping", ""), Control),
            (m("resource", "x", "config", ""), Control),
            (m("", "x", "pong", ""), Control),
        ];
        for (msg, want) in cases {
            assert_eq!(destination(&msg), want, "{msg:?}");
        }
    }

    /// Every reply shape `cloud_queue` knows, as the controllers send them (issue 16).
    #[test]
    fn reply_shapes_follow_the_clouds_queues() {
        use CloudQueue::*;
        let reply = |source: &str, group: &str, op: &str, resource: &str, rv: &str, text: &str| {
            let mut msg = m(group, source, op, "req-1");
            msg.route.resource = resource.into();
            msg.header.resource_version = rv.into();
            msg.content = crate::message::text_content(text);
            msg
        };
        let ec = "edgecontroller";
        let cases = [
            // status update answered "OK" with the new resourceversion (edge-node §1.5)
            (reply(ec, "resource", "response", "default/node/n1", "42", "OK"), NoAck),
            // registration answered "OK" or with the error text, no resourceversion
            (reply(ec, "resource", "response", "default/node/n1", "", "OK"), NoAck),
            (
                reply(ec, "resource", "response", "default/node/n1", "", "create node n1 error"),
                NoAck,
            ),
            // devicecontroller's answer to edge_updated
            (reply("devicecontroller", "twin", "response", "twin", "", "OK"), NoAck),
            // servicebus / eventbus answers
            (reply("router_servicebus", "user", "response", "80:/x", "7", "{}"), NoAck),
            // HEAD ObjectResp answers and errors
            (reply(ec, "resource", "response", "kube-node-lease/lease/n1", "9", "{}"), NoAck),
            (reply(ec, "resource", "response", "null/nodepatch/n1", "9", "{}"), NoAck),
            (reply(ec, "resource", "response", "default/pod/p", "9", "{}"), NoAck),
            (reply(ec, "resource", "error", "default/configmap/c", "", "not found"), NoAck),
            // a query's answer with the object: ack queue (W9)
            (reply(ec, "resource", "response", "default/configmap/c", "4711", "{}"), Ack),
            // HEAD's node object after each change: ack queue
            (reply(ec, "resource", "update", "null/node/n1", "43", "{}"), Ack),
        ];
        for (msg, want) in cases {
            assert_eq!(cloud_queue(&msg), want, "{msg:?}");
        }
        let no_version = reply("someone", "resource", "response", "default/configmap/c", "", "{}");
        assert!(matches!(cloud_queue(&no_version), Drop(_)));
    }

    #[test]
    fn pending_delivers_once_and_cancel_leaves_nothing() {
        let p = Pending::default();
        let rx = p.register("req-1").unwrap();
        let resp = m("resource", "edgecontroller", "response", "req-1");
        p.deliver(resp.clone()).unwrap();
        assert_eq!(rx.try_recv().unwrap(), resp);
        assert!(p.deliver(resp).is_err(), "second response to the same request is an orphan");
        let _rx2 = p.register("req-2").unwrap();
        p.cancel("req-2");
        assert!(p.is_empty());
    }

    #[test]
    fn a_full_module_inbox_holds_the_reader_until_stop() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let outbox = Arc::new(Outbox::new(crate::outbox::Limits::simple(10, 1 << 20, 10, 10)));
        let router = Router::new(
            vec![("m".to_owned(), bus_group::META, tx)],
            HashMap::from([(bus_group::META, 0)]),
            Arc::default(),
            Arc::default(),
            outbox,
            Arc::default(),
        )
        .with_inbox_capacity(2);
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let msg = || m("resource", "edgecontroller", "insert", "");
        router.dispatch(msg(), &stop).unwrap();
        router.dispatch(msg(), &stop).unwrap();
        let blocked = std::thread::scope(|scope| {
            let third = scope.spawn(|| router.dispatch(msg(), &stop));
            std::thread::sleep(Duration::from_millis(20));
            let waiting = !third.is_finished();
            drop(stop_tx);
            (waiting, third.join().unwrap().is_err())
        });
        assert_eq!(blocked, (true, true), "the third waits for room, then stops");
        assert_eq!(rx.len(), 2, "never more than the capacity");
    }

    #[test]
    fn pending_is_bounded() {
        let p = Pending::default();
        let keep: Vec<_> =
            (0..MAX_PENDING_REQUESTS).map(|i| p.register(&i.to_string()).unwrap()).collect();
        assert_eq!(p.register("one-more").unwrap_err().kind(), crate::ErrorKind::Full);
        drop(keep);
    }

    /// Issue 11, item 7: a stop wakes every waiter at once and refuses new ones.
    #[test]
    fn close_wakes_every_waiter_and_refuses_new_ones() {
        let p = Pending::default();
        let rx = p.register("req-1").unwrap();
        let waiter =
            std::thread::spawn(move || rx.recv_timeout(std::time::Duration::from_secs(120)));
        p.close();
        assert_eq!(
            waiter.join().unwrap(),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected),
            "the waiter woke with no response"
        );
        assert!(p.is_empty());
        assert_eq!(p.register("req-2").unwrap_err().kind(), crate::ErrorKind::Stopped);
    }

    #[test]
    fn a_reply_slot_gets_its_response_times_out_or_is_cancelled() {
        let p = Arc::new(Pending::default());
        let slot = p.register_slot("req-1").unwrap();
        let waiter = std::thread::spawn(move || slot.wait(Duration::from_secs(120)));
        let mut response = Message::with_text(Default::default(), "answer");
        response.header.parent_id = "req-1".into();
        p.deliver(response).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap().content_text().as_deref(), Some("answer"));

        let slot = p.register_slot("req-2").unwrap();
        assert_eq!(slot.wait(Duration::from_millis(20)).unwrap_err(), NoReply::Timeout);
        p.cancel("req-2");

        let slot = p.register_slot("req-3").unwrap();
        let waiter = std::thread::spawn(move || slot.wait(Duration::from_secs(120)));
        p.close();
        assert_eq!(waiter.join().unwrap().unwrap_err(), NoReply::Cancelled);
        assert_eq!(p.register_slot("req-4").unwrap_err().kind(), crate::ErrorKind::Stopped);
    }
}

#[cfg(test)]
mod redelivery_tests {
    use super::*;

    #[test]
    fn resend_in_progress_is_dropped_after_ack_is_acked_again_and_release_lets_it_through() {
        let r = Redeliveries::default();
        assert_eq!(r.check("a"), Seen::New);
        assert_eq!(r.check("a"), Seen::InProgress);
        r.acked("a");
        assert_eq!(r.check("a"), Seen::Acked);
        assert_eq!(r.check("b"), Seen::New);
        r.release("b");
        assert_eq!(r.check("b"), Seen::New);
    }

    #[test]
    fn memory_is_bounded_oldest_forgotten_first() {
        let r = Redeliveries::default();
        for i in 0..=REDELIVERY_MEMORY {
            assert_eq!(r.check(&i.to_string()), Seen::New);
        }
        assert_eq!(r.check("0"), Seen::New, "the oldest was forgotten");
        assert_eq!(r.check(&REDELIVERY_MEMORY.to_string()), Seen::InProgress);
    }

    /// Issue 11 item 4: a cloud-chosen ID over the limit is never remembered (it used to be kept
    /// twice, at any size), and one at the limit still is.
    #[test]
    fn ids_over_the_limit_are_not_remembered() {
        let r = Redeliveries::default();
        let huge = "x".repeat(4 << 20);
        assert_eq!(r.check(&huge), Seen::New);
        assert_eq!(r.check(&huge), Seen::New);
        assert!(r.is_empty());
        let longest = "y".repeat(MAX_MSG_ID_BYTES);
        assert_eq!(r.check(&longest), Seen::New);
        assert_eq!(r.check(&longest), Seen::InProgress);
        assert_eq!(r.len(), 1);
        r.release(&longest);
        assert!(r.is_empty());
    }

    #[test]
    fn messages_with_ids_over_the_limit_are_out_of_bounds() {
        let mut msg = Message::with_text(crate::message::Route::default(), "x");
        assert!(ids_within_bounds(&msg), "a fresh UUID is within bounds");
        msg.header.id = "i".repeat(MAX_MSG_ID_BYTES + 1);
        assert!(!ids_within_bounds(&msg));
        msg.header.id = "i".repeat(MAX_MSG_ID_BYTES);
        msg.header.parent_id = "p".repeat(MAX_MSG_ID_BYTES + 1);
        assert!(!ids_within_bounds(&msg));
    }
}
