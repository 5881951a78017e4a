//! The `meta` module: the durable store of the objects the cloud sends down, and the answers to
//! local queries about them. Each insert, update or delete in group `resource`/`func` becomes one
//! file, `<state_dir>/meta/<ns>/<type>/<name>.json`, holding `{"resourceVersion", "msgId",
//! "content"}`, and a message is ACKed only once that file (or its removal) is durable: an ACK
//! tells the cloud never to send this version again (protocol §4.4–4.5). Keys come from the
//! network, so they are checked before they become paths.
//!
//! Group commit: one `eh-meta` thread owns every write. It takes everything waiting in its inbox
//! (up to [`MAX_BATCH`] messages), decides each message in order against the stored and the
//! already-staged state, writes one temp file per changed object and fsyncs them all at once
//! (short-lived `eh-meta-sync` helpers only call fsync, so the device flushes its cache once for
//! many files), renames them all into place, fsyncs each touched folder once, and only then ACKs
//! the whole batch. A crash anywhere leaves each file holding the old record or the new one, never
//! a mix, and nothing unacknowledged is lost: the cloud resends it. [`MetaHandle`] answers queries
//! (asking the cloud first for the types it owns, §3.6), and applied messages go out on an
//! optional change channel. This file owns key checking, version comparison, the durable batch
//! write and queries; it never touches the link.

use crate::error::{Error, ErrorKind, Result};
use crate::logging::shown;
use crate::message::{group, operation, Message, Route, CONNECTION_RESOURCE};
use crate::modules::{Hub, ModuleContext, ModuleSpec};
use crate::router::bus_group;
use crossbeam_channel::{bounded, never, select, Receiver, SendTimeoutError, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Folder under the state dir that holds the store.
pub const STORE_DIR: &str = "meta";
/// Longest namespace, type or name: a Kubernetes DNS subdomain name.
pub const MAX_SEGMENT_BYTES: usize = 253;
/// Longest name that still fits Linux's 255-byte file-name limit once `.json` is appended.
pub const MAX_NAME_BYTES: usize = 255 - FILE_SUFFIX.len();
/// Most messages committed together. Each changed object holds an open temp file until the
/// batch's fsyncs are done, so this also bounds the thread's file descriptors.
pub const MAX_BATCH: usize = 256;
/// Stop adding to a batch once its messages hold this many bytes: a batch is a second copy of
/// what the inbox held, so this bounds the memory group commit adds.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most helper threads fsyncing one batch's temp files at once (see `sync_files`).
pub const SYNC_HELPERS: usize = 16;
const SYNC_HELPER_NAME: &str = "eh-meta-sync";
/// A helper only calls fsync.
const SYNC_HELPER_STACK_BYTES: usize = 64 << 10;
/// Cloud answers to queries waiting for the store thread; a full queue makes the caller wait up
/// to [`LOCAL_REPLY_TIMEOUT`].
pub const STORE_JOB_CAP: usize = 16;
/// How long a query waits for the store thread, to take a cloud answer and to confirm it is
/// stored (on top of the caller's timeout for the cloud itself).
pub const LOCAL_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Resource types the cloud owns: a query for one asks the cloud first when connected (protocol
/// §3.6, KubeEdge's `requireRemoteQuery`).
pub const CLOUD_OWNED_TYPES: [&str; 7] = [
    "configmap",
    "secret",
    "persistentvolume",
    "persistentvolumeclaim",
    "volumeattachment",
    "node",
    "serviceaccounttoken",
];
/// `source` of the queries this module sends to the cloud (KubeEdge's MetaManager).
pub const QUERY_SOURCE: &str = "metaManager";
const FILE_SUFFIX: &str = ".json";
/// Temp files are `<prefix><n>`, `n` the object's place in its batch: unique per batch, and never
/// ending in `.json`, so they cannot collide with a stored object. One is left behind only by a
/// crash, and the next batch that uses its name truncates it.
const TEMP_PREFIX: &str = ".meta-store.tmp.";
/// Stored objects may be Secrets: only the agent's user may read them.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// Only in builds with the simulator (tests and benchmarks, never the device binary): when this
/// variable is set, the store thread aborts the process right after a batch became durable and
/// before its ACKs, so a test can show the cloud resends and the store stays consistent.
#[cfg(feature = "cloudsim")]
pub const CRASH_HOOK_ENV: &str = "EDGEHUB_TEST_CRASH_AFTER_DURABLE_WRITE";

/// The `meta` module, storing under `<state_dir>/meta`, and the handle that queries it. Each
/// applied cloud message is also offered to `changes` (never blocking: when it is full the
/// message is counted in [`StoreStats::changes_dropped`] and logged).
pub fn spec(state_dir: PathBuf, changes: Option<Sender<Message>>) -> (ModuleSpec, MetaHandle) {
    spec_with_feed_cap(state_dir, changes, crate::config::DEFAULT_MODULE_INBOX_CAP)
}

/// [`spec`] for a `changes` channel that may be unbounded: the feed then holds at most `feed_cap`
/// unread changes (a bounded channel keeps its own capacity). An unbounded channel allocates as
/// changes come instead of every slot up front (63 KB at the default capacity, issue 14).
pub fn spec_with_feed_cap(
    state_dir: PathBuf,
    changes: Option<Sender<Message>>,
    feed_cap: usize,
) -> (ModuleSpec, MetaHandle) {
    let store = Store::new(state_dir.join(STORE_DIR));
    let (jobs_tx, jobs_rx) = bounded(STORE_JOB_CAP);
    let handle =
        MetaHandle { root: store.root.clone(), jobs_tx, counters: Arc::clone(&store.counters) };
    #[cfg(feature = "cloudsim")]
    let crash_hook = std::env::var_os(CRASH_HOOK_ENV).is_some();
    #[cfg(not(feature = "cloudsim"))]
    let crash_hook = false;
    let feed = ChangeFeed { tx: changes, cap: feed_cap.max(1), dropped_in_batch: 0 };
    let spec = ModuleSpec::new("meta", &[bus_group::META], move |ctx| {
        run(store, ctx, jobs_rx, feed, crash_hook)
    });
    (spec, handle)
}

/// A cloud answer to a query, handed to the store thread to be stored and ACKed.
struct StoreJob {
    response: Message,
    /// Capacity 1 and the caller may be gone: the store thread only `try_send`s.
    reply_tx: Sender<Outcome>,
}

/// The store thread: cloud messages from the inbox in batches, and cloud answers to queries one
/// at a time, until the inbox disconnects (the agent is stopping).
fn run(
    mut store: Store,
    ctx: ModuleContext,
    mut jobs_rx: Receiver<StoreJob>,
    mut feed: ChangeFeed,
    crash_hook: bool,
) {
    loop {
        select! {
            recv(ctx.inbox) -> msg => {
                let Ok(first) = msg else { return };
                let batch = take_batch(first, &ctx.inbox);
                commit(&mut store, &ctx.hub, &batch, &mut feed, crash_hook);
            }
            recv(jobs_rx) -> job => match job {
                Ok(job) => {
                    let answer = std::slice::from_ref(&job.response);
                    let mut outcomes = commit(&mut store, &ctx.hub, answer, &mut feed, crash_hook);
                    if let Some(outcome) = outcomes.pop() {
                        let _ = job.reply_tx.try_send(outcome); // the caller may have given up
                    }
                }
                // Every handle is gone: no more queries, the inbox still counts.
                Err(_) => jobs_rx = never(),
            },
        }
    }
}

/// `first` and whatever else waits in the inbox, up to [`MAX_BATCH`] messages and about
/// [`MAX_BATCH_BYTES`]; connection events are logged and left out.
fn take_batch(first: Message, inbox: &Receiver<Message>) -> Vec<Message> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(msg) = next.take() {
        if msg.route.resource == CONNECTION_RESOURCE {
            log::debug!(
                "meta: connection event {:?}",
                shown(&msg.content_text().unwrap_or_default())
            );
        } else {
            bytes += msg.encoded_len_hint();
            batch.push(msg);
        }
        if batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            next = inbox.try_recv().ok();
        }
    }
    batch
}

/// Applies `batch` durably, then ACKs and publishes what was applied, in order. Returns the
/// outcome of each message.
fn commit(
    store: &mut Store,
    hub: &Hub,
    batch: &[Message],
    feed: &mut ChangeFeed,
    crash_hook: bool,
) -> Vec<Outcome> {
    if batch.is_empty() {
        return Vec::new();
    }
    let started = Instant::now();
    let outcomes = store.apply_batch(batch);
    let wrote = outcomes.iter().any(|o| matches!(o, Outcome::Stored(_) | Outcome::Removed(_)));
    if crash_hook && wrote {
        log::error!("meta: test crash hook set: aborting after a durable write, before its acks");
        std::process::abort();
    }
    // Subscribers hear of a change before the cloud hears it is stored: both are after the
    // durable write, and whoever sees the ACK can count on the event having been offered.
    for (msg, outcome) in batch.iter().zip(&outcomes) {
        log_outcome(msg, outcome);
        if outcome.is_change() {
            feed.publish(msg, &store.counters);
        }
        if matches!(outcome, Outcome::Failed(_)) {
            // The disk may have room by the cloud's next re-send (5 s): let that one through
            // instead of dropping it as a duplicate of a message still being worked on.
            hub.release(msg);
        }
    }
    // Together, so a batch's ACKs share one flush.
    let applied = batch.iter().zip(&outcomes).filter(|(_, outcome)| outcome.is_applied());
    hub.ack_all(applied.map(|(msg, _)| msg));
    feed.end_batch(&store.counters);
    log::debug!(
        "meta: committed {} messages ({} written) in {:?}",
        batch.len(),
        outcomes.iter().filter(|o| matches!(o, Outcome::Stored(_) | Outcome::Removed(_))).count(),
        started.elapsed()
    );
    outcomes
}

fn log_outcome(msg: &Message, outcome: &Outcome) {
    match outcome {
        Outcome::Stored(path) => log::debug!("meta: stored {msg:?} in {}", path.display()),
        Outcome::Removed(path) => log::debug!("meta: removed {} for {msg:?}", path.display()),
        Outcome::Unchanged(why) => log::debug!("meta: {msg:?} changes nothing: {why}"),
        Outcome::NotStored => log::debug!("meta: not storing collection {msg:?}"),
        Outcome::Ignored(why) => log::debug!("meta: ignoring {msg:?}: {why}"),
        Outcome::Refused(why) => log::warn!(
            "meta: refusing {} {} {:?}: {why}",
            shown(&msg.route.group),
            shown(&msg.route.operation),
            shown(&msg.route.resource)
        ),
        // Not ACKed but released: the cloud's next re-send is applied again, by which time the
        // disk may have room.
        Outcome::Failed(e) => log::error!("meta: {e}; not acking {msg:?}, will apply a re-send"),
    }
}

/// Where applied messages go for local subscribers. Never blocks the store thread.
struct ChangeFeed {
    tx: Option<Sender<Message>>,
    /// Most unread changes when `tx` is unbounded.
    cap: usize,
    dropped_in_batch: u32,
}

impl ChangeFeed {
    fn publish(&mut self, msg: &Message, counters: &Counters) {
        let Some(tx) = &self.tx else { return };
        let full = tx.capacity().is_none() && tx.len() >= self.cap;
        let sent = if full {
            Err(TrySendError::Full(()))
        } else {
            tx.try_send(msg.clone()).map_err(|e| match e {
                TrySendError::Full(_) => TrySendError::Full(()),
                TrySendError::Disconnected(_) => TrySendError::Disconnected(()),
            })
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped_in_batch += 1;
                counters.changes_dropped.fetch_add(1, AtomicOrdering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                log::info!("meta: nobody listens for changes any more; no longer publishing them");
                self.tx = None;
            }
        }
    }

    /// One log line per batch, however many were dropped.
    fn end_batch(&mut self, counters: &Counters) {
        if self.dropped_in_batch > 0 {
            log::warn!(
                "meta: change queue full: dropped {} change events ({} since start)",
                self.dropped_in_batch,
                counters.changes_dropped.load(AtomicOrdering::Relaxed)
            );
            self.dropped_in_batch = 0;
        }
    }
}

/// What the store did with one message. Only an applied message is ACKed.
#[derive(Debug)]
pub enum Outcome {
    /// The object was written durably to this file.
    Stored(PathBuf),
    /// This file was removed durably.
    Removed(PathBuf),
    /// Already applied, older than what is stored, or a delete of nothing: nothing was written.
    Unchanged(&'static str),
    /// A valid `<ns>/<type>` key (a list, such as podstatus): there is no one object to keep.
    NotStored,
    /// Nothing to apply (a response without a resourceversion).
    Ignored(&'static str),
    /// An unsafe key, or an operation or group the store does not handle.
    Refused(String),
    /// The write or removal failed; the error names the file.
    Failed(Error),
}

impl Outcome {
    /// True when the message is in effect on disk, so the cloud may stop sending it.
    pub fn is_applied(&self) -> bool {
        matches!(
            self,
            Outcome::Stored(_) | Outcome::Removed(_) | Outcome::Unchanged(_) | Outcome::NotStored
        )
    }

    /// True when local subscribers should hear of the message: it changed the store, or it is a
    /// list the store does not keep. Redeliveries and stale versions are not news.
    pub fn is_change(&self) -> bool {
        matches!(self, Outcome::Stored(_) | Outcome::Removed(_) | Outcome::NotStored)
    }
}

/// A resource key whose segments are all safe to use as path components.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Object { namespace: &'a str, kind: &'a str, name: &'a str },
    Collection { namespace: &'a str, kind: &'a str },
}

/// Checks a wire resource `<ns>/<type>[/<name>]` (protocol §1.4). Each segment is 1 to 253 bytes
/// of `[A-Za-z0-9._-]` and not `.` or `..`, so no key can name a path outside its folder.
pub fn parse_key(resource: &str) -> Result<Key<'_>, String> {
    // At most four pieces: a fourth one only says "too many", however long the text is.
    let segments: Vec<&str> = resource.splitn(4, '/').collect();
    match segments[..] {
        [namespace, kind] => {
            check_segment(namespace)?;
            check_segment(kind)?;
            Ok(Key::Collection { namespace, kind })
        }
        [namespace, kind, name] => {
            check_segment(namespace)?;
            check_segment(kind)?;
            check_segment(name)?;
            if name.len() > MAX_NAME_BYTES {
                return Err(format!(
                    "name of {} bytes does not fit a file name ({MAX_NAME_BYTES} at most)",
                    name.len()
                ));
            }
            Ok(Key::Object { namespace, kind, name })
        }
        _ => Err("expected <namespace>/<type>/<name> or <namespace>/<type>".to_owned()),
    }
}

fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() || segment.len() > MAX_SEGMENT_BYTES {
        return Err(format!("segment of {} bytes (1 to {MAX_SEGMENT_BYTES})", segment.len()));
    }
    if segment == "." || segment == ".." {
        return Err(format!("segment {segment:?} names a directory"));
    }
    match segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(format!("character {c:?} is not allowed")),
        None => Ok(()),
    }
}

/// Orders two resourceversions as the decimal u64s Kubernetes writes; `None` when either is not
/// one (then the caller cannot tell which is newer).
pub fn compare_versions(incoming: &str, stored: &str) -> Option<Ordering> {
    Some(incoming.parse::<u64>().ok()?.cmp(&stored.parse::<u64>().ok()?))
}

/// True for the resource types whose queries go to the cloud first (protocol §3.6).
pub fn is_cloud_owned(kind: &str) -> bool {
    CLOUD_OWNED_TYPES.contains(&kind)
}

/// What is written for each object.
#[derive(Serialize)]
struct Record<'a> {
    #[serde(rename = "resourceVersion")]
    resource_version: &'a str,
    #[serde(rename = "msgId")]
    msg_id: &'a str,
    content: &'a RawValue,
}

/// A stored record read back whole, for queries.
#[derive(Deserialize)]
struct StoredRecord {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
    content: Box<RawValue>,
}

/// The part of a stored record that decides whether a message is new (`content` is skipped).
#[derive(Clone, Debug, Deserialize)]
struct Stamp {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
    #[serde(rename = "msgId", default)]
    msg_id: String,
}

/// One object as the store (or the cloud, for a query it answered) has it.
#[derive(Debug)]
pub struct StoredObject {
    /// `<ns>/<type>/<name>`.
    pub resource: String,
    /// Empty when the cloud's answer carried none (such an answer is not stored).
    pub resource_version: String,
    /// The object, byte for byte as the cloud sent it.
    pub content: Box<RawValue>,
}

/// Counters of the store's work since start (32-bit, like `Status`, for 32-bit gateways).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Batches committed (each one ends with its folder fsyncs and then its ACKs).
    pub batches: u32,
    /// Messages in those batches.
    pub messages: u32,
    /// The largest batch so far.
    pub largest_batch: u32,
    /// Object files fsynced (one per changed object per batch, however many messages changed it).
    pub file_syncs: u32,
    /// Folders fsynced (one per touched folder per batch, plus each newly created folder's parent).
    pub dir_syncs: u32,
    /// Change events dropped because the change channel was full.
    pub changes_dropped: u32,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU32,
    messages: AtomicU32,
    largest_batch: AtomicU32,
    file_syncs: AtomicU32,
    dir_syncs: AtomicU32,
    changes_dropped: AtomicU32,
}

impl Counters {
    fn snapshot(&self) -> StoreStats {
        let get = |c: &AtomicU32| c.load(AtomicOrdering::Relaxed);
        StoreStats {
            batches: get(&self.batches),
            messages: get(&self.messages),
            largest_batch: get(&self.largest_batch),
            file_syncs: get(&self.file_syncs),
            dir_syncs: get(&self.dir_syncs),
            changes_dropped: get(&self.changes_dropped),
        }
    }

    fn bump(counter: &AtomicU32) {
        counter.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

/// Queries the store; cheap to clone and usable from any thread.
///
/// Local reads go straight to the object's file from the caller's thread: every file is replaced
/// by an atomic rename, so a reader always sees one whole record, and a query never waits behind
/// a batch's fsyncs. A record read this way may belong to a batch whose folder fsync has not
/// finished yet; it is the cloud's object all the same, and the cloud resends it until it is
/// durable. Only the store thread writes.
#[derive(Clone, Debug)]
pub struct MetaHandle {
    root: PathBuf,
    jobs_tx: Sender<StoreJob>,
    counters: Arc<Counters>,
}

impl MetaHandle {
    /// The object `resource` (`<ns>/<type>/<name>`). For a type the cloud owns
    /// ([`CLOUD_OWNED_TYPES`]) while connected, the cloud is asked first (waiting up to
    /// `timeout`); its answer is stored and ACKed by the store thread (waiting up to
    /// [`LOCAL_REPLY_TIMEOUT`] more) and returned. When the cloud does not answer in time, or
    /// the link is down, or for any other type, the answer comes from the store: `None` when
    /// nothing is stored.
    ///
    /// # Errors
    /// `Config` for a resource that is not a safe `<ns>/<type>/<name>` key; `Protocol` when the
    /// cloud answered with an error; `Io` when the stored record cannot be read.
    pub fn query(
        &self,
        hub: &Hub,
        resource: &str,
        timeout: Duration,
    ) -> Result<Option<StoredObject>> {
        let kind = match parse_key(resource) {
            Ok(Key::Object { kind, .. }) => kind,
            Ok(Key::Collection { .. }) => {
                return Err(ErrorKind::Config.msg(format!(
                    "query {:?}: name one object, <namespace>/<type>/<name>",
                    shown(resource)
                )))
            }
            Err(why) => {
                return Err(ErrorKind::Config.msg(format!("query {:?}: {why}", shown(resource))))
            }
        };
        if is_cloud_owned(kind) && hub.is_connected() {
            match self.ask_cloud(hub, resource, timeout) {
                Ok(object) => return Ok(Some(object)),
                Err(e) if e.kind() == ErrorKind::Protocol => return Err(e),
                Err(e) => log::warn!(
                    "meta: query for {:?} got no answer from the cloud ({e}); answering from the store",
                    shown(resource)
                ),
            }
        }
        self.read(resource)
    }

    /// The stored object `resource`, read from its file; `None` when there is none.
    ///
    /// # Errors
    /// `Config` for an unsafe or non-object key; `Io` when the file cannot be read or is not a
    /// record.
    pub fn read(&self, resource: &str) -> Result<Option<StoredObject>> {
        let Ok(Key::Object { namespace, kind, name }) = parse_key(resource) else {
            return Err(ErrorKind::Config
                .msg(format!("read {:?}: not a <namespace>/<type>/<name> key", shown(resource))));
        };
        let path = self.root.join(namespace).join(kind).join(format!("{name}{FILE_SUFFIX}"));
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ErrorKind::Io.msg(format!("read {}", path.display())).src(e)),
        };
        let record: StoredRecord = serde_json::from_slice(&bytes).map_err(|e| {
            ErrorKind::Io.msg(format!("read {}: not a stored record", path.display())).src(e)
        })?;
        Ok(Some(StoredObject {
            resource: resource.to_owned(),
            resource_version: record.resource_version,
            content: record.content,
        }))
    }

    /// What the store thread has done so far.
    pub fn stats(&self) -> StoreStats {
        self.counters.snapshot()
    }

    /// Every stored object of type `kind` in any namespace (the `node` module's view of the pods
    /// bound to this node), at most `limit` of them. Unreadable entries are skipped and logged.
    pub fn list(&self, kind: &str, limit: usize) -> Vec<StoredObject> {
        let mut found = Vec::new();
        let Ok(namespaces) = fs::read_dir(&self.root) else { return found };
        for namespace in namespaces.flatten() {
            let Ok(files) = fs::read_dir(namespace.path().join(kind)) else { continue };
            let namespace = namespace.file_name().to_string_lossy().into_owned();
            for file in files.flatten() {
                let file_name = file.file_name().to_string_lossy().into_owned();
                let Some(name) = file_name.strip_suffix(FILE_SUFFIX) else { continue };
                if found.len() >= limit {
                    return found;
                }
                match self.read(&format!("{namespace}/{kind}/{name}")) {
                    Ok(Some(object)) => found.push(object),
                    Ok(None) => {} // removed meanwhile
                    Err(e) => log::warn!("meta: list {kind}: {e}"),
                }
            }
        }
        found
    }

    /// Sends the query from the caller's thread and has the store thread store and ACK the
    /// answer. `Err(Protocol)` when the cloud answered with an error; any other error means no
    /// answer (timeout, queue full, link down).
    fn ask_cloud(&self, hub: &Hub, resource: &str, timeout: Duration) -> Result<StoredObject> {
        let query = Message::new(
            Route {
                source: QUERY_SOURCE.to_owned(),
                group: bus_group::META.to_owned(),
                operation: operation::QUERY.to_owned(),
                resource: resource.to_owned(),
                ..Route::default()
            },
            null_json(),
        );
        let response = hub.request(query, timeout)?;
        if response.route.operation == operation::ERROR {
            let text = response.content_text().unwrap_or_else(|| response.content.get().to_owned());
            return Err(ErrorKind::Protocol.msg(format!(
                "the cloud answered query for {:?} with an error: {text}",
                shown(resource)
            )));
        }
        let object = StoredObject {
            resource: response.route.resource.clone(),
            resource_version: response.header.resource_version.clone(),
            content: response.content.clone(),
        };
        let (reply_tx, reply_rx) = bounded(1);
        match self.jobs_tx.send_timeout(StoreJob { response, reply_tx }, LOCAL_REPLY_TIMEOUT) {
            Ok(()) => match reply_rx.recv_timeout(LOCAL_REPLY_TIMEOUT) {
                Ok(outcome) if outcome.is_applied() => {}
                Ok(Outcome::Ignored(why)) => {
                    log::debug!("meta: answer to query for {:?} not stored: {why}", shown(resource))
                }
                Ok(outcome) => log::warn!(
                    "meta: answer to query for {:?} not stored: {outcome:?}",
                    shown(resource)
                ),
                Err(_) => log::warn!(
                    "meta: store did not confirm the answer to query for {:?} within {LOCAL_REPLY_TIMEOUT:?}",
                    shown(resource)
                ),
            },
            Err(SendTimeoutError::Timeout(_)) => log::warn!(
                "meta: store busy for {LOCAL_REPLY_TIMEOUT:?}; answer to query for {:?} not stored",
                shown(resource)
            ),
            Err(SendTimeoutError::Disconnected(_)) => log::warn!(
                "meta: store stopped; answer to query for {:?} not stored",
                shown(resource)
            ),
        }
        Ok(object)
    }
}

fn null_json() -> Box<RawValue> {
    // Cannot fail: `null` is valid JSON.
    crate::message::json_content("null").unwrap_or_else(|_| crate::message::text_content(""))
}

/// A change staged for the batch's commit.
#[derive(Debug)]
enum Staged {
    /// Write `bytes` (a record with this stamp) to the object's file.
    Write { stamp: Stamp, bytes: Vec<u8> },
    /// Remove the object's file (it may exist only on disk, only staged, or both).
    Remove,
}

#[derive(Debug)]
struct Change {
    path: PathBuf,
    namespace: String,
    kind: String,
    staged: Staged,
}

/// A batch's decisions so far: per object, the state after the messages decided up to now.
#[derive(Debug, Default)]
struct Plan {
    index: HashMap<PathBuf, usize>,
    changes: Vec<Change>,
}

impl Plan {
    /// The stamp the object has after the staged changes, or `None` when it is not staged.
    fn staged_stamp(&self, path: &Path) -> Option<Option<Stamp>> {
        let change = &self.changes[*self.index.get(path)?];
        Some(match &change.staged {
            Staged::Write { stamp, .. } => Some(stamp.clone()),
            Staged::Remove => None,
        })
    }

    fn stage(&mut self, path: PathBuf, namespace: &str, kind: &str, staged: Staged) {
        match self.index.get(&path) {
            Some(&i) => self.changes[i].staged = staged,
            None => {
                self.index.insert(path.clone(), self.changes.len());
                self.changes.push(Change {
                    path,
                    namespace: namespace.to_owned(),
                    kind: kind.to_owned(),
                    staged,
                });
            }
        }
    }
}

/// Why a file or folder could not be made durable; copied onto every message that depended on it.
#[derive(Clone, Debug)]
struct Failure {
    context: String,
    cause: String,
}

impl Failure {
    fn io(doing: &str, path: &Path, e: &io::Error) -> Failure {
        Failure { context: format!("{doing} {}", path.display()), cause: e.to_string() }
    }

    fn to_error(&self) -> Error {
        ErrorKind::Io.msg(self.context.clone()).src(self.cause.clone())
    }
}

/// What a commit could not make durable.
#[derive(Debug, Default)]
struct Failures {
    paths: HashMap<PathBuf, Failure>,
    dirs: HashMap<PathBuf, Failure>,
}

impl Failures {
    fn for_path(&self, path: &Path) -> Option<&Failure> {
        self.paths.get(path).or_else(|| path.parent().and_then(|dir| self.dirs.get(dir)))
    }
}

/// The store: one file per object under `root`. Only one thread writes to it.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    counters: Arc<Counters>,
    /// Folders whose last fsync failed: a rename in them may not be durable yet, so anything
    /// decided from their files waits for a successful fsync of the folder before it is ACKed.
    unsynced_dirs: BTreeSet<PathBuf>,
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root, counters: Arc::default(), unsynced_dirs: BTreeSet::new() }
    }

    /// What this store has done so far.
    pub fn stats(&self) -> StoreStats {
        self.counters.snapshot()
    }

    /// Applies one cloud message durably and says what happened (a batch of one).
    pub fn apply(&mut self, msg: &Message) -> Outcome {
        self.apply_batch(std::slice::from_ref(msg)).pop().unwrap_or(Outcome::Ignored("empty batch"))
    }

    /// Applies `msgs` in order as one group commit and returns one outcome per message. Each
    /// message is decided against the state the earlier ones leave (so a batch behaves exactly as
    /// the same messages applied one by one); every changed object is then written to a temp file
    /// and fsynced, all are renamed into place, and each touched folder is fsynced once. A message
    /// is applied only if everything it depends on became durable. Never panics.
    pub fn apply_batch(&mut self, msgs: &[Message]) -> Vec<Outcome> {
        let mut plan = Plan::default();
        let decided: Vec<(Outcome, Option<PathBuf>)> =
            msgs.iter().map(|msg| self.decide(msg, &mut plan)).collect();
        let failures = self.write_plan(&plan);
        Counters::bump(&self.counters.batches);
        let n = u32::try_from(msgs.len()).unwrap_or(u32::MAX);
        self.counters.messages.fetch_add(n, AtomicOrdering::Relaxed);
        self.counters.largest_batch.fetch_max(n, AtomicOrdering::Relaxed);
        decided
            .into_iter()
            .map(|(outcome, depends_on)| {
                match depends_on.as_deref().and_then(|path| failures.for_path(path)) {
                    Some(failure) if outcome.is_applied() => Outcome::Failed(failure.to_error()),
                    _ => outcome,
                }
            })
            .collect()
    }

    /// Decides what `msg` does given the stored and staged state, staging any change. Returns the
    /// outcome if the commit succeeds, and the object path whose commit it depends on.
    fn decide(&self, msg: &Message, plan: &mut Plan) -> (Outcome, Option<PathBuf>) {
        let route = &msg.route;
        if route.group != group::RESOURCE && route.group != group::FUNC {
            return (
                Outcome::Refused(format!("group {:?} is not stored", shown(&route.group))),
                None,
            );
        }
        let is_delete = match route.operation.as_str() {
            operation::INSERT | operation::UPDATE => false,
            // A query answer (asked for or not) still carries an object version worth keeping.
            operation::RESPONSE if !msg.header.resource_version.is_empty() => false,
            operation::RESPONSE => {
                return (Outcome::Ignored("response without a resourceversion"), None)
            }
            operation::DELETE => true,
            other => {
                return (
                    Outcome::Refused(format!("operation {:?} is not handled", shown(other))),
                    None,
                )
            }
        };
        let (namespace, kind, name) = match parse_key(&route.resource) {
            Ok(Key::Object { namespace, kind, name }) => (namespace, kind, name),
            Ok(Key::Collection { .. }) => return (Outcome::NotStored, None),
            Err(why) => return (Outcome::Refused(why), None),
        };
        let rv = msg.header.resource_version.as_str();
        if !rv.is_empty() && rv.parse::<u64>().is_err() {
            log::warn!(
                "meta: resourceversion {:?} is not a number; treating {msg:?} as newest",
                shown(rv)
            );
        }
        let path = self.root.join(namespace).join(kind).join(format!("{name}{FILE_SUFFIX}"));
        let current = match plan.staged_stamp(&path) {
            Some(staged) => staged,
            None => match read_stamp(&path) {
                Ok(stamp) => stamp,
                Err(e) => return (Outcome::Failed(e), None),
            },
        };
        let outcome = if is_delete {
            match current {
                None => Outcome::Unchanged("no such object to delete"),
                // A delete of the same version as the stored object came after it: versions only
                // grow.
                Some(stamp)
                    if compare_versions(rv, &stamp.resource_version) == Some(Ordering::Less) =>
                {
                    Outcome::Unchanged("delete is older than the stored object")
                }
                Some(_) => {
                    plan.stage(path.clone(), namespace, kind, Staged::Remove);
                    Outcome::Removed(path.clone())
                }
            }
        } else {
            match current {
                Some(stamp) if stamp.msg_id == msg.header.id => {
                    Outcome::Unchanged("this message is already stored")
                }
                Some(stamp)
                    if matches!(
                        compare_versions(rv, &stamp.resource_version),
                        Some(Ordering::Less | Ordering::Equal)
                    ) =>
                {
                    Outcome::Unchanged("the stored version is the same or newer")
                }
                _ => {
                    let record = Record {
                        resource_version: rv,
                        msg_id: &msg.header.id,
                        content: &msg.content,
                    };
                    match serde_json::to_vec(&record) {
                        Ok(bytes) => {
                            let stamp = Stamp {
                                resource_version: rv.to_owned(),
                                msg_id: msg.header.id.clone(),
                            };
                            plan.stage(
                                path.clone(),
                                namespace,
                                kind,
                                Staged::Write { stamp, bytes },
                            );
                            Outcome::Stored(path.clone())
                        }
                        Err(e) => Outcome::Failed(
                            ErrorKind::Io.msg(format!("encode {}", path.display())).src(e),
                        ),
                    }
                }
            }
        };
        (outcome, Some(path))
    }

    /// Makes the plan durable: temp files written and fsynced, renamed over their objects,
    /// removals done, then one fsync per touched folder. Returns what failed.
    fn write_plan(&mut self, plan: &Plan) -> Failures {
        let mut failures = Failures::default();
        let mut made: HashMap<(&str, &str), Result<(), Failure>> = HashMap::new();
        // 1. Write every temp file, keeping it open for its fsync.
        let mut temps: Vec<(&Change, PathBuf, File)> = Vec::new();
        for (n, change) in plan.changes.iter().enumerate() {
            let Staged::Write { bytes, .. } = &change.staged else { continue };
            let dirs = made
                .entry((&change.namespace, &change.kind))
                .or_insert_with(|| self.make_dirs(&change.namespace, &change.kind));
            if let Err(failure) = dirs {
                failures.paths.insert(change.path.clone(), failure.clone());
                continue;
            }
            // Every object path is `root/<ns>/<type>/<name>.json`, so it has a folder.
            let temp = change.path.with_file_name(format!("{TEMP_PREFIX}{n}"));
            match write_temp(&temp, bytes) {
                Ok(file) => temps.push((change, temp, file)),
                Err(e) => {
                    failures.paths.insert(change.path.clone(), Failure::io("write", &temp, &e));
                    let _ = fs::remove_file(&temp); // best effort: a leftover is harmless
                }
            }
        }
        // 2. Make every temp file's contents durable before any of them gets its real name.
        let files: Vec<&File> = temps.iter().map(|(_, _, file)| file).collect();
        let synced = sync_files(&files);
        drop(files);
        let mut ready: Vec<(&Change, PathBuf)> = Vec::new();
        for ((change, temp, file), result) in temps.into_iter().zip(synced) {
            Counters::bump(&self.counters.file_syncs);
            drop(file);
            match result {
                Ok(()) => ready.push((change, temp)),
                Err(e) => {
                    failures.paths.insert(change.path.clone(), Failure::io("fsync", &temp, &e));
                    let _ = fs::remove_file(&temp);
                }
            }
        }
        // 3. Renames and removals: each file now names the old record or the new one.
        let mut touched: BTreeSet<PathBuf> = BTreeSet::new();
        for (change, temp) in ready {
            match fs::rename(&temp, &change.path) {
                Ok(()) => touch(&mut touched, &change.path),
                Err(e) => {
                    failures
                        .paths
                        .insert(change.path.clone(), Failure::io("rename into", &change.path, &e));
                    let _ = fs::remove_file(&temp);
                }
            }
        }
        for change in &plan.changes {
            if !matches!(change.staged, Staged::Remove) {
                continue;
            }
            match fs::remove_file(&change.path) {
                Ok(()) => touch(&mut touched, &change.path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    failures
                        .paths
                        .insert(change.path.clone(), Failure::io("remove", &change.path, &e));
                }
            }
        }
        // 4. One fsync per folder makes its renames and removals durable. Folders whose fsync
        // failed earlier are tried again: until one succeeds, every message decided from a file
        // in them (even "unchanged") fails with it, as `Failures::for_path` looks at the folder.
        touched.append(&mut self.unsynced_dirs);
        for dir in touched {
            Counters::bump(&self.counters.dir_syncs);
            if let Err(e) = sync_dir(&dir) {
                failures.dirs.insert(dir.clone(), Failure::io("fsync folder", &dir, &e));
                self.unsynced_dirs.insert(dir);
            }
        }
        failures
    }

    /// Creates `root/<ns>/<type>`, making each new folder's entry in its parent durable too.
    fn make_dirs(&self, namespace: &str, kind: &str) -> Result<(), Failure> {
        if !self.root.is_dir() {
            // `stateDir` itself may be new too: each new folder's entry is made durable.
            let created = crate::dirs::create_durable(&self.root, DIR_MODE)
                .map_err(|e| Failure::io("create", &self.root, &e))?;
            for _ in &created {
                Counters::bump(&self.counters.dir_syncs);
            }
        }
        let ns_dir = self.root.join(namespace);
        let kind_dir = ns_dir.join(kind);
        for (dir, parent) in [(&ns_dir, &self.root), (&kind_dir, &ns_dir)] {
            match DirBuilder::new().mode(DIR_MODE).create(dir) {
                Ok(()) => self.sync_new_dir_parent(parent)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Failure::io("create", dir, &e)),
            }
        }
        Ok(())
    }

    fn sync_new_dir_parent(&self, parent: &Path) -> Result<(), Failure> {
        Counters::bump(&self.counters.dir_syncs);
        sync_dir(parent).map_err(|e| Failure::io("fsync folder", parent, &e))
    }
}

/// fsyncs every file, returning one result per file, in order. With more than one file the calls
/// are spread over up to [`SYNC_HELPERS`] short-lived helper threads: the device then sees one
/// cache flush for many concurrent fsyncs instead of one per file, which is what makes a batch
/// cheaper than its messages one by one. The helpers only fsync descriptors this thread opened
/// and wrote, and are joined before anything is renamed, so the store thread still owns every
/// write. A helper that cannot be spawned leaves its share to this thread.
fn sync_files(files: &[&File]) -> Vec<io::Result<()>> {
    sync_files_named(files, SYNC_HELPER_NAME)
}

/// [`sync_files`] with helper threads named `helper_name` (the twin store uses it too).
pub(crate) fn sync_files_named(files: &[&File], helper_name: &str) -> Vec<io::Result<()>> {
    if files.len() <= 1 || SYNC_HELPERS <= 1 {
        return files.iter().map(|file| file.sync_all()).collect();
    }
    let share = files.len().div_ceil(SYNC_HELPERS);
    std::thread::scope(|scope| {
        let spawned: Vec<_> = files
            .chunks(share)
            .map(|part| {
                let helper = std::thread::Builder::new()
                    .name(helper_name.to_owned())
                    .stack_size(SYNC_HELPER_STACK_BYTES)
                    .spawn_scoped(scope, move || {
                        part.iter().map(|file| file.sync_all()).collect::<Vec<_>>()
                    });
                (part, helper)
            })
            .collect();
        let mut results = Vec::with_capacity(files.len());
        for (part, helper) in spawned {
            match helper.map_err(|_| ()).and_then(|h| h.join().map_err(|_| ())) {
                Ok(part_results) => results.extend(part_results),
                // Could not spawn, or panicked (fsync does not): do this share here.
                Err(()) => results.extend(part.iter().map(|file| file.sync_all())),
            }
        }
        results
    })
}

fn touch(touched: &mut BTreeSet<PathBuf>, path: &Path) {
    if let Some(dir) = path.parent() {
        touched.insert(dir.to_path_buf());
    }
}

/// Writes `bytes` to `temp` (mode 0600, truncated), unsynced; the caller fsyncs and renames it.
/// The twin store uses it too.
pub(crate) fn write_temp(temp: &Path, bytes: &[u8]) -> io::Result<File> {
    let mut file =
        OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(temp)?;
    file.write_all(bytes)?;
    Ok(file)
}

/// The stamp of the stored object, `None` when there is none. An unreadable record (cut short by
/// a crash before this store wrote atomically, or edited by hand) counts as none: it is replaced.
fn read_stamp(path: &Path) -> Result<Option<Stamp>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ErrorKind::Io.msg(format!("open {}", path.display())).src(e)),
    };
    match serde_json::from_reader(BufReader::new(file)) {
        Ok(stamp) => Ok(Some(stamp)),
        Err(e) => {
            log::warn!("meta: {} is not a valid record ({e}); replacing it", path.display());
            Ok(None)
        }
    }
}

/// Makes the folder's entries (a rename, a new file or folder, a removal) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{json_content, Route};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

    #[test]
    fn an_unbounded_change_feed_holds_at_most_its_cap_and_counts_the_rest() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut feed = ChangeFeed { tx: Some(tx), cap: 2, dropped_in_batch: 0 };
        let counters = Counters::default();
        let msg = Message::with_text(Route::default(), "change");
        for _ in 0..3 {
            feed.publish(&msg, &counters);
        }
        assert_eq!(rx.len(), 2);
        assert_eq!(counters.changes_dropped.load(AtomicOrdering::Relaxed), 1);
        rx.recv().unwrap();
        feed.publish(&msg, &counters);
        assert_eq!(rx.len(), 2, "room again once one was read");
    }

    /// A folder removed when the test ends.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, AtomicOrdering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("edgehub-meta-store-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn store(&self) -> Store {
            Store::new(self.0.join("state").join(STORE_DIR))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn msg(op: &str, resource: &str, rv: &str, content: &str) -> Message {
        let route = Route {
            source: "edgecontroller".into(),
            group: group::RESOURCE.into(),
            operation: op.into(),
            resource: resource.into(),
            ..Route::default()
        };
        let mut m = Message::new(route, json_content(content).unwrap());
        m.header.resource_version = rv.into();
        m
    }

    fn record(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn keys_with_three_safe_segments_are_objects() {
        assert_eq!(
            parse_key("default/pod/nginx-7c5b9d"),
            Ok(Key::Object { namespace: "default", kind: "pod", name: "nginx-7c5b9d" })
        );
        assert_eq!(
            parse_key("kube-system/configmap/app.cfg_v2"),
            Ok(Key::Object { namespace: "kube-system", kind: "configmap", name: "app.cfg_v2" })
        );
        assert_eq!(
            parse_key("default/podstatus"),
            Ok(Key::Collection { namespace: "default", kind: "podstatus" })
        );
        assert!(parse_key("default/pod/...").is_ok(), "three dots is an ordinary name");
    }

    #[test]
    fn traversal_and_malformed_keys_are_refused() {
        for bad in [
            "../../etc/passwd",
            "../pod/x",
            "default/../x",
            "default/pod/..",
            "default/pod/.",
            "./pod/x",
            "/etc/passwd",
            "/etc/passwd/x",
            "default//x",
            "default/pod/",
            "default/pod/a/b",
            "default/pod/a\0b",
            "default/pod/a\\b",
            "default/pod/a b",
            "default/pod/ümlaut",
            "default",
            "",
            "/",
            "default/",
        ] {
            assert!(parse_key(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn segment_length_limits_hold_at_n_and_n_plus_one() {
        let ok = "n".repeat(MAX_SEGMENT_BYTES);
        let long = "n".repeat(MAX_SEGMENT_BYTES + 1);
        assert!(parse_key(&format!("{ok}/pod")).is_ok());
        assert!(parse_key(&format!("{long}/pod")).is_err());
        assert!(parse_key(&format!("default/{long}/x")).is_err());
        let name = "n".repeat(MAX_NAME_BYTES);
        let name_long = "n".repeat(MAX_NAME_BYTES + 1);
        assert!(parse_key(&format!("default/pod/{name}")).is_ok());
        assert!(parse_key(&format!("default/pod/{name_long}")).is_err());
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(compare_versions("10", "9"), Some(Ordering::Greater));
        assert_eq!(compare_versions("9", "10"), Some(Ordering::Less));
        assert_eq!(compare_versions("482913", "482913"), Some(Ordering::Equal));
        assert_eq!(compare_versions("18446744073709551615", "1"), Some(Ordering::Greater));
        assert_eq!(compare_versions("abc", "1"), None);
        assert_eq!(compare_versions("1", ""), None);
        assert_eq!(compare_versions("18446744073709551616", "1"), None, "beyond u64");
    }

    #[test]
    fn insert_writes_the_record_and_newer_updates_overwrite() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let first = msg("insert", "default/pod/p", "10", r#"{"v":1}"#);
        let Outcome::Stored(path) = store.apply(&first) else { panic!("not stored") };
        assert_eq!(path, scratch.0.join("state/meta/default/pod/p.json"));
        let r = record(&path);
        assert_eq!(r["resourceVersion"], "10");
        assert_eq!(r["msgId"], first.header.id.as_str());
        assert_eq!(r["content"], serde_json::json!({"v": 1}));
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, FILE_MODE);
        assert_eq!(stored_names(path.parent().unwrap()), ["p.json"], "temp file renamed away");

        let newer = msg("update", "default/pod/p", "11", r#"{"v":2}"#);
        assert!(matches!(store.apply(&newer), Outcome::Stored(_)));
        assert_eq!(record(&path)["content"], serde_json::json!({"v": 2}));
    }

    #[test]
    fn redelivery_and_older_versions_change_nothing_but_count_as_applied() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let current = msg("insert", "default/pod/p", "10", r#"{"v":10}"#);
        let Outcome::Stored(path) = store.apply(&current) else { panic!("not stored") };
        let inode = fs::metadata(&path).unwrap().ino();
        for again in [
            current.clone(),
            msg("update", "default/pod/p", "9", r#"{"v":9}"#),
            msg("update", "default/pod/p", "10", r#"{"v":"same rv"}"#),
        ] {
            let outcome = store.apply(&again);
            assert!(matches!(outcome, Outcome::Unchanged(_)), "{outcome:?}");
            assert!(outcome.is_applied(), "still ACKed");
        }
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "never rewritten");
        assert_eq!(record(&path)["content"], serde_json::json!({"v": 10}));
    }

    #[test]
    fn non_numeric_version_counts_as_newer() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        store.apply(&msg("insert", "default/pod/p", "10", "1"));
        let odd = msg("update", "default/pod/p", "not-a-number", "2");
        let Outcome::Stored(path) = store.apply(&odd) else { panic!("not stored") };
        assert_eq!(record(&path)["resourceVersion"], "not-a-number");
    }

    #[test]
    fn delete_removes_the_file_and_is_idempotent() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let Outcome::Stored(path) = store.apply(&msg("insert", "default/pod/p", "10", "{}")) else {
            panic!("not stored")
        };
        let stale = msg("delete", "default/pod/p", "9", "{}");
        assert!(matches!(store.apply(&stale), Outcome::Unchanged(_)));
        assert!(path.exists(), "a delete older than the object keeps it");
        let delete = msg("delete", "default/pod/p", "10", "{}");
        assert!(matches!(store.apply(&delete), Outcome::Removed(_)));
        assert!(!path.exists());
        let again = store.apply(&delete);
        assert!(matches!(again, Outcome::Unchanged(_)) && again.is_applied() && !again.is_change());
    }

    #[test]
    fn refused_ignored_and_collection_outcomes() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let refused = store.apply(&msg("insert", "../../escaped", "1", "{}"));
        assert!(matches!(refused, Outcome::Refused(_)) && !refused.is_applied());
        assert!(!scratch.0.join("escaped.json").exists());
        assert!(matches!(
            store.apply(&msg("query", "default/pod/p", "1", "{}")),
            Outcome::Refused(_)
        ));
        let mut twin = msg("update", "default/pod/p", "1", "{}");
        twin.route.group = group::TWIN.into();
        assert!(matches!(store.apply(&twin), Outcome::Refused(_)));
        assert!(matches!(
            store.apply(&msg("response", "default/pod/p", "", "{}")),
            Outcome::Ignored(_)
        ));
        assert!(matches!(
            store.apply(&msg("response", "default/pod/p", "3", "{}")),
            Outcome::Stored(_)
        ));
        let list = store.apply(&msg("update", "default/podstatus", "4", "[]"));
        assert!(matches!(list, Outcome::NotStored) && list.is_applied());
    }

    #[test]
    fn write_error_names_the_file_and_is_not_applied() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        // A file where the `pod` folder should be: fails even for root (no permission tricks).
        fs::create_dir_all(scratch.0.join("state/meta/default")).unwrap();
        fs::write(scratch.0.join("state/meta/default/pod"), "in the way").unwrap();
        let outcome = store.apply(&msg("insert", "default/pod/p", "1", "{}"));
        let Outcome::Failed(e) = &outcome else { panic!("expected failure, got {outcome:?}") };
        assert!(!outcome.is_applied());
        assert!(e.to_string().contains("default/pod"), "{e}");
    }

    #[test]
    fn corrupt_record_is_replaced() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let Outcome::Stored(path) = store.apply(&msg("insert", "default/pod/p", "10", "1")) else {
            panic!("not stored")
        };
        fs::write(&path, "{\"resourceVersion\":\"10\", cut sh").unwrap();
        assert!(matches!(
            store.apply(&msg("update", "default/pod/p", "5", "2")),
            Outcome::Stored(_)
        ));
        assert_eq!(record(&path)["resourceVersion"], "5");
    }

    #[test]
    fn long_resources_are_cut_in_logs() {
        assert_eq!(format!("{:?}", shown("default/pod/p")), "\"default/pod/p\"");
        let long = "é".repeat(crate::logging::MAX_SHOWN_CHARS + 1);
        assert!(format!("{:?}", shown(&long)).contains(&format!("…({} bytes)", long.len())));
        assert!(
            format!("{:?}", shown(&long)).chars().count() < crate::logging::MAX_SHOWN_CHARS + 20
        );
    }

    fn stored_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_batch_decides_each_message_as_if_applied_one_by_one() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let first = msg("insert", "default/pod/p", "10", r#"{"v":10}"#);
        let batch = [
            first.clone(),
            first.clone(), // redelivered within the batch
            msg("update", "default/pod/p", "9", r#"{"v":9}"#),
            msg("update", "default/pod/p", "11", r#"{"v":11}"#),
            msg("delete", "default/pod/q", "5", "null"),
            msg("insert", "default/pod/q", "6", r#"{"q":6}"#),
            msg("delete", "default/pod/q", "6", "null"),
            msg("update", "default/podstatus", "7", "[]"),
            msg("insert", "default/pod/..", "1", "{}"),
        ];
        let outcomes = store.apply_batch(&batch);
        let kinds: Vec<&str> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Stored(_) => "stored",
                Outcome::Removed(_) => "removed",
                Outcome::Unchanged(_) => "unchanged",
                Outcome::NotStored => "not stored",
                Outcome::Ignored(_) => "ignored",
                Outcome::Refused(_) => "refused",
                Outcome::Failed(_) => "failed",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "stored",
                "unchanged",
                "unchanged",
                "stored",
                "unchanged",
                "stored",
                "removed",
                "not stored",
                "refused"
            ]
        );
        let dir = scratch.0.join("state/meta/default/pod");
        assert_eq!(stored_names(&dir), ["p.json"], "q came and went; no temp file is left");
        let r = record(&dir.join("p.json"));
        assert_eq!(
            (r["resourceVersion"].as_str(), r["content"]["v"].as_u64()),
            (Some("11"), Some(11))
        );
        let stats = store.stats();
        assert_eq!((stats.batches, stats.messages, stats.largest_batch), (1, 9, 9));
        assert_eq!(
            stats.file_syncs, 1,
            "p's versions coalesce; q is inserted and deleted unwritten"
        );
    }

    #[test]
    fn a_burst_syncs_each_folder_once_per_batch_not_once_per_message() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let burst: Vec<Message> = (0..1000)
            .map(|i| msg("insert", &format!("default/configmap/cm-{i}"), "1", &format!("{i}")))
            .collect();
        for chunk in burst.chunks(MAX_BATCH) {
            assert!(store.apply_batch(chunk).iter().all(|o| matches!(o, Outcome::Stored(_))));
        }
        let stats = store.stats();
        assert_eq!((stats.batches, stats.messages), (4, 1000));
        assert_eq!(stats.file_syncs, 1000);
        // Creating state/, meta/, default/ and configmap/ syncs each parent once; after that one
        // sync of the configmap folder per batch.
        assert_eq!(stats.dir_syncs, 4 + 4);
        let dir = scratch.0.join("state/meta/default/configmap");
        assert_eq!(stored_names(&dir).len(), 1000);
        assert_eq!(record(&dir.join("cm-999.json"))["content"], 999);
    }

    #[test]
    fn a_failed_folder_fails_only_the_messages_that_need_it() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        fs::create_dir_all(scratch.0.join("state/meta/default")).unwrap();
        fs::write(scratch.0.join("state/meta/default/secret"), "in the way").unwrap();
        let batch = [
            msg("insert", "default/secret/s1", "1", "{}"),
            msg("insert", "default/pod/p", "1", "{}"),
            msg("insert", "default/secret/s2", "1", "{}"),
        ];
        let outcomes = store.apply_batch(&batch);
        assert!(
            matches!(&outcomes[0], Outcome::Failed(e) if e.to_string().contains("default/secret"))
        );
        assert!(matches!(outcomes[1], Outcome::Stored(_)));
        assert!(matches!(outcomes[2], Outcome::Failed(_)));
        assert!(!outcomes[0].is_applied() && !outcomes[2].is_applied());
    }

    #[test]
    fn hostile_keys_in_a_batch_are_refused_and_write_nothing_outside() {
        let scratch = Scratch::new();
        let mut store = scratch.store();
        let long = format!("default/pod/{}", "n".repeat(MAX_NAME_BYTES + 1));
        let hostile =
            ["../../escaped", "/etc/escaped/x", "default/../../escaped", "default/pod/a\0b", &long];
        let mut batch: Vec<Message> =
            hostile.iter().map(|key| msg("insert", key, "1", "{}")).collect();
        batch.push(msg("insert", "default/pod/fine", "1", "{}"));
        let outcomes = store.apply_batch(&batch);
        for (key, outcome) in hostile.iter().zip(&outcomes) {
            assert!(matches!(outcome, Outcome::Refused(_)), "{key}: {outcome:?}");
        }
        assert!(matches!(outcomes.last(), Some(Outcome::Stored(_))));
        assert_eq!(stored_names(&scratch.0), ["state"]);
        assert_eq!(stored_names(&scratch.0.join("state/meta")), ["default"]);
    }
}
