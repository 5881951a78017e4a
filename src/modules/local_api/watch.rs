//! Objects followed by local apps (`{"op":"watch"}`): the table of followed resources (who follows
//! each, how often, what was last seen) and the `eh-api-watch` thread that queries each one again
//! when it is due and tells its followers when it changed. A container-less node is never pushed
//! the ConfigMaps and Secrets its apps need (edge-node §1.6), so following is how they stay current.
//!
//! Bounded so no local client can make the agent flood the cloud: at most `localApiMaxWatches`
//! objects (all clients together; one object followed by many clients is queried once), none more
//! often than `localApiMinWatchInterval`, one query at a time, each waiting at most
//! [`WATCH_QUERY_TIMEOUT`]. Queries go through the store (`MetaHandle::query`): the cloud while
//! connected, the store while offline; on reconnect every followed object is queried at once.

use super::{bad_request, failure, timeout_or_default, to_line, ClientShared, Clients};
use super::{Failure, Object, Outcome, Reply};
use crate::error::{ErrorKind, Result};
use crate::modules::meta_store::{parse_key, Key, MetaHandle, StoredObject};
use crate::modules::Hub;
use crossbeam_channel::{bounded, select, Receiver, Sender, TryRecvError};
use serde::Serialize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest `intervalMs` a watch may ask for.
pub const MAX_WATCH_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Longest a periodic query waits for the cloud before the store answers: it also bounds how long
/// one silent answer holds up the other followed objects, and how long a stop waits for the thread.
pub const WATCH_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// A cloud error text kept and shown is cut to this many bytes.
const MAX_ERROR_BYTES: usize = 1024;
/// The thread queries through the hub and hashes content: no deep stack.
const WATCH_STACK_BYTES: usize = 128 << 10;

/// The bounds, from the configuration.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// Used when a watch names no `intervalMs`.
    pub default_interval: Duration,
    /// Shorter intervals are raised to this.
    pub min_interval: Duration,
    /// Distinct objects followed at once.
    pub max_watches: usize,
}

/// What one query of a followed object found, compared between rounds: the resourceVersion and
/// a digest of the content (a cloud answer may carry no version), so only a change makes an event
/// and no copy of a large object is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Object { resource_version: String, digest: [u8; 32] },
    Absent,
    CloudError(String),
}

impl Seen {
    fn of(found: &Option<StoredObject>) -> Seen {
        match found {
            Some(object) => Seen::Object {
                resource_version: object.resource_version.clone(),
                digest: openssl::sha::sha256(object.content.get().as_bytes()),
            },
            None => Seen::Absent,
        }
    }
}

/// One followed object.
struct Followed {
    resource: String,
    /// Each following client and the interval it asked for.
    followers: Vec<(u64, Duration)>,
    seen: Seen,
    /// When it is queried next.
    due: Instant,
}

impl Followed {
    /// The shortest interval any follower asked for (each already at least the minimum).
    fn interval(&self) -> Duration {
        self.followers.iter().map(|&(_, interval)| interval).min().unwrap_or(MAX_WATCH_INTERVAL)
    }
}

/// The table of followed objects, shared by the client threads (watch, unwatch, hang-up), the
/// module thread (reconnects) and the watch thread. Its lock is held for bookkeeping only, never
/// across a query or a client's lock.
pub(super) struct Watches {
    table: Mutex<Vec<Followed>>,
    /// Wakes the thread when something became due earlier (a new object, a reconnect).
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    settings: WatchSettings,
}

/// An `object` event for the followers of one resource: the object (`null` when absent), or the
/// cloud's error.
#[derive(Serialize)]
struct ObjectEvent<'a> {
    event: &'static str,
    resource: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<Option<Object>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Watches {
    pub(super) fn new(settings: WatchSettings) -> Watches {
        let (wake_tx, wake_rx) = bounded(1);
        let settings = WatchSettings { max_watches: settings.max_watches.max(1), ..settings };
        Watches { table: Mutex::new(Vec::new()), wake_tx, wake_rx, settings }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Followed>> {
        // Plain data: a panic elsewhere cannot leave it half-updated.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `client` follows any object (so it waits for events, and is not idle).
    pub(super) fn is_following(&self, client: u64) -> bool {
        self.lock().iter().any(|f| f.followers.iter().any(|&(id, _)| id == client))
    }

    fn wake(&self) {
        let _ = self.wake_tx.try_send(()); // full: a wake-up is already pending
    }

    /// The interval a watch gets: what it asked for (or the default), at least the minimum.
    fn interval_for(&self, requested: Option<Duration>) -> Duration {
        requested.unwrap_or(self.settings.default_interval).max(self.settings.min_interval)
    }

    /// Refuses a watch that would follow more objects than allowed (before its query is made).
    fn check_room(&self, resource: &str) -> Result<(), Failure> {
        let table = self.lock();
        if table.len() >= self.settings.max_watches && !table.iter().any(|f| f.resource == resource)
        {
            return Err(self.full());
        }
        Ok(())
    }

    fn full(&self) -> Failure {
        Failure {
            kind: failure::FULL,
            error: format!(
                "watch: already following {} objects (localApiMaxWatches); unwatch one first",
                self.settings.max_watches
            ),
        }
    }

    /// Adds `client` to the followers of `resource`, which it has just seen as `seen`. When other
    /// clients already follow it and saw something else, they are told (`line`).
    fn follow(
        &self,
        client: u64,
        resource: &str,
        interval: Duration,
        seen: Seen,
        line: &Arc<str>,
        clients: &Clients,
    ) -> Result<(), Failure> {
        let mut table = self.lock();
        let now = Instant::now();
        let told = match table.iter().position(|f| f.resource == resource) {
            Some(i) => {
                let followed = &mut table[i];
                let others: Vec<u64> = followed
                    .followers
                    .iter()
                    .map(|&(id, _)| id)
                    .filter(|&id| id != client)
                    .collect();
                let changed = followed.seen != seen;
                followed.seen = seen;
                followed.followers.retain(|&(id, _)| id != client);
                followed.followers.push((client, interval));
                let next = now.checked_add(followed.interval()).unwrap_or(followed.due);
                followed.due = followed.due.min(next);
                if changed {
                    others
                } else {
                    Vec::new()
                }
            }
            // Taken meanwhile by another client's watch.
            None if table.len() >= self.settings.max_watches => return Err(self.full()),
            None => {
                let due = now.checked_add(interval).unwrap_or(now + MAX_WATCH_INTERVAL);
                table.push(Followed {
                    resource: resource.to_owned(),
                    followers: vec![(client, interval)],
                    seen,
                    due,
                });
                Vec::new()
            }
        };
        drop(table);
        self.wake();
        for id in told {
            clients.reply(id, line.clone());
        }
        Ok(())
    }

    /// Takes `client` off the followers of `resource`; true if it followed it.
    fn unfollow(&self, client: u64, resource: &str) -> bool {
        let mut table = self.lock();
        let Some(i) = table.iter().position(|f| f.resource == resource) else { return false };
        let before = table[i].followers.len();
        table[i].followers.retain(|&(id, _)| id != client);
        let followed = table[i].followers.len() < before;
        if table[i].followers.is_empty() {
            table.swap_remove(i);
        }
        followed
    }

    /// A client hung up: it follows nothing any more.
    pub(super) fn drop_client(&self, client: u64) {
        let mut table = self.lock();
        for followed in table.iter_mut() {
            followed.followers.retain(|&(id, _)| id != client);
        }
        table.retain(|f| !f.followers.is_empty());
    }

    /// The link came up: every followed object may have changed meanwhile, query them all now.
    pub(super) fn on_connected(&self) {
        let now = Instant::now();
        for followed in self.lock().iter_mut() {
            followed.due = now;
        }
        self.wake();
    }

    /// The resource due first, if it is due by `now`; it is rescheduled one interval later.
    fn take_due(&self, now: Instant) -> Option<String> {
        let mut table = self.lock();
        let followed = table.iter_mut().filter(|f| f.due <= now).min_by_key(|f| f.due)?;
        followed.due = now.checked_add(followed.interval()).unwrap_or(now + MAX_WATCH_INTERVAL);
        Some(followed.resource.clone())
    }

    fn next_due(&self) -> Option<Instant> {
        self.lock().iter().map(|f| f.due).min()
    }

    /// Records what a query of `resource` found; when it differs from what was seen before,
    /// returns the followers to tell.
    fn record(&self, resource: &str, seen: Seen) -> Vec<u64> {
        let mut table = self.lock();
        let Some(followed) = table.iter_mut().find(|f| f.resource == resource) else {
            return Vec::new(); // unwatched meanwhile
        };
        if followed.seen == seen {
            return Vec::new();
        }
        followed.seen = seen;
        followed.followers.iter().map(|&(id, _)| id).collect()
    }
}

/// The `object` event line for `found`.
fn object_line(resource: &str, found: Option<&StoredObject>) -> Arc<str> {
    let object = found.map(|stored| Object {
        resource: stored.resource.clone(),
        resource_version: stored.resource_version.clone(),
        content: stored.content.clone(),
    });
    to_line(&ObjectEvent { event: "object", resource, object: Some(object), error: None })
}

fn error_event_line(resource: &str, error: &str) -> Arc<str> {
    to_line(&ObjectEvent { event: "object", resource, object: None, error: Some(error) })
}

/// Checks a watched resource before anything else: one object, `<ns>/<type>/<name>`, with safe
/// segments (so the table holds only short, valid keys).
pub(super) fn check_resource(op: &str, resource: &str) -> std::result::Result<(), String> {
    match parse_key(resource) {
        Ok(Key::Object { .. }) => Ok(()),
        Ok(Key::Collection { .. }) => {
            Err(format!("{op}: name one object, <namespace>/<type>/<name>"))
        }
        Err(why) => Err(format!("{op}: {why}")),
    }
}

/// `{"op":"watch"}`: the object now (asking the cloud while connected, like `query`), and the
/// client follows it from here on.
pub(super) fn watch(
    client: u64,
    resource: &str,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    shared: &ClientShared,
) -> Outcome {
    let Some(meta) = &shared.meta else {
        return Err(Failure {
            kind: failure::FAILED,
            error: "watch: this agent runs no resource store".to_owned(),
        });
    };
    let watches = &shared.watches;
    let interval = watches.interval_for(interval);
    watches.check_room(resource)?;
    let timeout = timeout_or_default(timeout, shared);
    let found =
        meta.query(&shared.hub, resource, timeout).map_err(|e| Failure::from_error("watch", &e))?;
    let line = object_line(resource, found.as_ref());
    watches.follow(client, resource, interval, Seen::of(&found), &line, &shared.clients)?;
    let object = found.map(|stored| Object {
        resource: stored.resource,
        resource_version: stored.resource_version,
        content: stored.content,
    });
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    Ok(Reply { object: Some(object), interval_ms: Some(interval_ms), ..Reply::default() })
}

/// `{"op":"unwatch"}`: the client no longer follows `resource`.
pub(super) fn unwatch(client: u64, resource: &str, shared: &ClientShared) -> Outcome {
    if shared.watches.unfollow(client, resource) {
        Ok(Reply::default())
    } else {
        Err(bad_request(format!("unwatch: this client does not watch {resource}")))
    }
}

/// Starts `eh-api-watch`. It runs until `stop_rx` disconnects.
pub(super) fn spawn(
    watches: Arc<Watches>,
    meta: Option<MetaHandle>,
    hub: Hub,
    clients: Arc<Clients>,
    stop_rx: Receiver<()>,
    request_timeout: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("eh-api-watch".to_owned()).stack_size(WATCH_STACK_BYTES).spawn(
        move || {
            let Some(meta) = meta else { return }; // no store: `watch` is refused anyway
            let timeout = request_timeout.min(WATCH_QUERY_TIMEOUT);
            run(&watches, &meta, &hub, &clients, &stop_rx, timeout);
        },
    )
}

fn run(
    watches: &Watches,
    meta: &MetaHandle,
    hub: &Hub,
    clients: &Clients,
    stop_rx: &Receiver<()>,
    timeout: Duration,
) {
    loop {
        while let Some(resource) = watches.take_due(Instant::now()) {
            if let Err(TryRecvError::Disconnected) = stop_rx.try_recv() {
                return;
            }
            let (seen, line) = match meta.query(hub, &resource, timeout) {
                Ok(found) => (Seen::of(&found), object_line(&resource, found.as_ref())),
                Err(e) if e.kind() == ErrorKind::Protocol => {
                    let mut text = e.to_string();
                    truncate(&mut text, MAX_ERROR_BYTES);
                    (Seen::CloudError(text.clone()), error_event_line(&resource, &text))
                }
                Err(e) => {
                    log::warn!("local api: watch: query {resource}: {e}");
                    continue;
                }
            };
            for id in watches.record(&resource, seen) {
                clients.reply(id, line.clone());
            }
        }
        // Nothing followed: wait for a watch (or a stop); an hour is just a bound on the wait.
        let wait = watches
            .next_due()
            .map_or(Duration::from_secs(3600), |due| due.saturating_duration_since(Instant::now()));
        select! {
            recv(stop_rx) -> _ => return,
            recv(watches.wake_rx) -> _ => {}
            default(wait) => {}
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary ([`crate::message::cut`]), marked
/// with `…` when something was cut.
fn truncate(text: &mut String, max: usize) {
    let kept = crate::message::cut(text, max).len();
    if kept < text.len() {
        text.truncate(kept);
        text.push('…');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watches(max: usize) -> Watches {
        Watches::new(WatchSettings {
            default_interval: Duration::from_secs(60),
            min_interval: Duration::from_secs(10),
            max_watches: max,
        })
    }

    fn seen(rv: &str) -> Seen {
        Seen::Object { resource_version: rv.to_owned(), digest: [0; 32] }
    }

    #[test]
    fn intervals_are_raised_to_the_minimum() {
        let w = watches(2);
        assert_eq!(w.interval_for(None), Duration::from_secs(60));
        assert_eq!(w.interval_for(Some(Duration::from_millis(1))), Duration::from_secs(10));
        assert_eq!(w.interval_for(Some(Duration::from_secs(30))), Duration::from_secs(30));
    }

    #[test]
    fn one_object_is_followed_once_and_only_a_change_is_recorded() {
        let w = watches(1);
        let clients = Clients::new(4, 4);
        let line: Arc<str> = Arc::from("x\n");
        let every = Duration::from_secs(10);
        assert!(w.follow(1, "default/configmap/a", every, seen("1"), &line, &clients).is_ok());
        assert!(w.follow(2, "default/configmap/a", every * 2, seen("1"), &line, &clients).is_ok());
        let full = w.follow(3, "default/configmap/b", every, seen("1"), &line, &clients);
        assert_eq!(full.err().map(|f| f.kind), Some(failure::FULL));
        assert!(w.record("default/configmap/a", seen("1")).is_empty(), "no change, no event");
        assert_eq!(w.record("default/configmap/a", seen("2")), vec![1, 2]);
        assert!(w.record("default/configmap/a", seen("2")).is_empty());
        assert!(w.take_due(Instant::now()).is_none(), "not due before its interval");
        w.on_connected();
        assert_eq!(w.take_due(Instant::now()).as_deref(), Some("default/configmap/a"));
        assert!(w.take_due(Instant::now()).is_none(), "rescheduled one interval later");
        assert!(w.unfollow(1, "default/configmap/a") && !w.unfollow(1, "default/configmap/a"));
        w.drop_client(2);
        assert!(w.next_due().is_none(), "nobody follows it any more");
        assert!(w.follow(3, "default/configmap/b", every, Seen::Absent, &line, &clients).is_ok());
    }

    #[test]
    fn resources_must_name_one_safe_object() {
        assert!(check_resource("watch", "default/configmap/a").is_ok());
        assert!(check_resource("watch", "default/configmap").is_err());
        assert!(check_resource("watch", "../etc/passwd").is_err());
    }
}
