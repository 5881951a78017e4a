//! The local API: a Unix socket through which programs on the device (device mappers, scripts,
//! apps in any language, and `edgehub send/subscribe/query`) receive cloud messages and talk to the
//! cloud. This file owns the socket file (mode 0660, a stale one replaced, a live one refused), the
//! accept thread, one reader and one writer thread per client, each client's bounded outgoing queue
//! and the line protocol below. It never blocks the router or the outbox: the module thread only
//! ever `try_send`s to a client's queue, and a client that lets its queue overflow is cut off.
//!
//! # Protocol
//! Newline-delimited JSON, one object per line, both ways. Messages have the wire shape
//! (`{"header":{…},"route":{…},"content":…}`, protocol §1.1); a missing `msg_id` or `timestamp`
//! is filled in by the agent. Requests carry an `op` and optionally an `id` (any JSON value, echoed
//! in the reply):
//!
//! | request | reply (`ok:true`) |
//! | --- | --- |
//! | `{"op":"subscribe","groups":["twin","bus"]}` | `{"ok":true,"groups":[…],"connected":true}` |
//! | `{"op":"send","message":{…}}` (through the outbox: survives a disconnect) | `{"ok":true,"msgId":"…"}` |
//! | `{"op":"request","message":{…},"timeoutMs":5000}` | `{"ok":true,"message":{the cloud's response}}` |
//! | `{"op":"ack","message":{a message received}}` | `{"ok":true,"acked":true}` (false: it needed none) |
//! | `{"op":"query","resource":"default/configmap/x"}` | `{"ok":true,"object":{"resource","resourceVersion","content"}}`, `"object":null` if absent |
//! | `{"op":"status"}` | `{"ok":true,"status":{"connected":…,"outbox":{…},"drops":{…},…}}` (what `edgehub status` shows) |
//! | `{"op":"watch","resource":"default/configmap/x","intervalMs":30000}` | as `query`, plus `"intervalMs"` (the interval granted) |
//! | `{"op":"unwatch","resource":"default/configmap/x"}` | `{"ok":true}` |
//!
//! Any failure is `{"ok":false,"error":"…","kind":"…"}` and the connection stays usable; `kind`
//! is `bad_request` (not JSON, unknown op or field, a line over `localApiMaxLineBytes`…),
//! `timeout` (the cloud did not answer), `full` (the outbox, or the agent's client slots),
//! `stopping` (the agent is stopping: a request waiting for the cloud is cancelled at once, and
//! the reply is written before the connection closes) or `failed`.
//!
//! A client that has not subscribed and sends no line for `localApiIdleTimeout` (60 s) gets
//! `{"ok":false,"kind":"idle",…}` (not a reply to anything) and is disconnected, so idle
//! connections cannot hold every client slot; a client refused because all
//! `localApiMaxClients` slots are taken gets a `full` error line. `LocalClient` reconnects by
//! itself after an idle disconnect.
//!
//! Replies come in request order. Once subscribed, a client also gets pushed events, interleaved
//! with replies: `{"event":"message","group":"twin","message":{…}}` for each cloud message routed
//! to a group it subscribed to, and `{"event":"connection","connected":false}` whenever the cloud
//! link goes down or up; the first subscription is followed by one such event with the current
//! state. Groups: `twin`, `bus` (wire group `user`), `taskmanager`, `meta` (the resource store's
//! changes, after they are durable), or any custom wire group name. Messages that travel in the
//! cloud's ACK queue (they carry a `resourceversion`) must be ACKed by a client (`op:"ack"`);
//! until one does, the cloud re-sends them every 5 s and subscribers get them again.
//!
//! A client that watches an object (`watch`, in `watch.rs`) gets
//! `{"event":"object","resource":"…","object":{…}}` (`"object":null` when absent, or `"error":"…"`
//! when the cloud answered with an error) each time a later query finds it changed, until it
//! unwatches or hangs up.
//!
//! # Threads
//! `eh-localapi` (the module: fans cloud messages out), `eh-api-accept`, `eh-api-watch` (queries
//! watched objects again, `watch.rs`), and per client
//! `eh-client` (reads and runs commands; a `request` or `query` blocks only this client) and
//! `eh-client-out` (writes its queue). Stopping wakes `accept()`, cuts every client, joins every
//! thread and deletes the socket file.

use crate::config::Config;
use crate::error::{ErrorKind, Result};
use crate::message::{new_uuid, now_millis, Message, CLOUD_CONNECTED, CLOUD_DISCONNECTED};
use crate::message::{operation, CONNECTION_RESOURCE};
use crate::modules::meta_store::{MetaHandle, StoredObject};
use crate::modules::{Hub, ModuleContext, ModuleSpec};
use crate::router::{bus_group, destination, Destination};
use crossbeam_channel::{bounded, never, select, Receiver, RecvTimeoutError, Sender};
use crossbeam_channel::{TryRecvError, TrySendError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fs::{self, DirBuilder};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

mod watch;

/// Name of the module (its thread is `eh-localapi`).
pub const MODULE_NAME: &str = "localapi";
/// The socket lets the agent's user and group in, nobody else.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of the socket's folder when the agent creates it.
const DIR_MODE: u32 = 0o750;
/// Longest `timeoutMs` a request or query may ask for. Stopping the agent waits for a running
/// request, so this also bounds how long a stop can take.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Most groups one client may subscribe to.
pub const MAX_GROUPS_PER_CLIENT: usize = 32;
/// Longest group name.
pub const MAX_GROUP_BYTES: usize = 64;
/// A client's queue also holds at most this many bytes, so `localClientQueue` lines of big cloud
/// messages cannot pile up (one longer line still goes to an empty queue).
pub const MAX_CLIENT_QUEUE_BYTES: usize = 4 << 20;
/// A client whose socket accepts nothing for this long is cut off (it stopped reading).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// At stop, how long clients get to finish the command they are running (requests waiting for
/// the cloud are cancelled first, so this is quick) and to be written their last replies, before
/// their sockets are cut.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// At most one "refusing clients" line per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after a failed `accept()` (out of file descriptors, say) before trying again.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Read buffers keep at most this much capacity between lines (a 1 MiB line is not kept).
const KEPT_LINE_CAPACITY: usize = 64 << 10;
/// These threads parse JSON and copy bytes; `hub.request` needs no deep stack either.
const ACCEPT_STACK_BYTES: usize = 64 << 10;
const CLIENT_STACK_BYTES: usize = 128 << 10;
const WRITER_STACK_BYTES: usize = 64 << 10;

/// What the module needs from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Objects followed by `watch`.
    pub watch: watch::WatchSettings,
    pub socket: PathBuf,
    pub max_clients: usize,
    pub client_queue: usize,
    pub max_line_bytes: usize,
    /// Used when a request or query gives no `timeoutMs`.
    pub request_timeout: Duration,
    /// A client that has not subscribed and sent nothing for this long is disconnected
    /// (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            watch: watch::WatchSettings {
                default_interval: config.local_api_watch_interval.0,
                min_interval: config.local_api_min_watch_interval.0,
                max_watches: config.local_api_max_watches,
            },
            socket: config.local_api_socket.clone(),
            max_clients: config.local_api_max_clients.max(1),
            client_queue: config.local_client_queue.max(1),
            max_line_bytes: config.local_api_max_line_bytes.max(1),
            request_timeout: config.request_timeout.0,
            idle_timeout: Some(config.local_api_idle_timeout.0).filter(|t| !t.is_zero()),
        }
    }
}

/// The local API module, registered for every group a local program may want (`twin`, `bus`,
/// `taskmanager`, and custom groups through `other`). `meta` answers queries; `changes` carries
/// the store's applied cloud messages to clients subscribed to `meta`. The socket is bound here,
/// before the agent starts, so a second agent fails at once instead of running without it.
///
/// # Errors
/// `Io` when the socket's folder cannot be made, the path holds something that is not a socket,
/// another agent is listening on it, or binding fails.
pub fn spec(
    settings: Settings,
    meta: Option<MetaHandle>,
    changes: Option<Receiver<Message>>,
) -> Result<ModuleSpec> {
    spec_forwarding(settings, meta, changes, None, &[])
}

/// [`spec`] for an agent where other modules own some of the groups (`owned_elsewhere`, e.g.
/// `bus` when the EventBus runs): the local API does not register for them, and shows their
/// subscribers what those modules forward on `forwarded` (cloud messages, grouped as the router
/// would; the owner handles ACKs, so forwarded messages are never released here).
///
/// # Errors
/// As [`spec`].
pub fn spec_forwarding(
    settings: Settings,
    meta: Option<MetaHandle>,
    changes: Option<Receiver<Message>>,
    forwarded: Option<Receiver<Message>>,
    owned_elsewhere: &[&'static str],
) -> Result<ModuleSpec> {
    let (listener, socket_file) = bind(&settings.socket)?;
    let groups: Vec<&'static str> =
        [bus_group::TWIN, bus_group::BUS, bus_group::TASK_MANAGER, bus_group::OTHER]
            .into_iter()
            .filter(|g| !owned_elsewhere.contains(g))
            .collect();
    Ok(ModuleSpec::new(MODULE_NAME, &groups, move |ctx| {
        run(ctx, listener, socket_file, settings, meta, changes, forwarded);
    }))
}

// ---------------------------------------------------------------------------------------------
// The socket file

/// The bound socket's path, deleted when dropped, but only while it is still the file this agent
/// created (another agent may have replaced it since).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn is_ours(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.is_ours() {
            log::debug!("local api: {} is no longer ours; leaving it", self.path.display());
        } else if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("local api: remove {}: {e}", self.path.display());
        }
    }
}

/// Binds the socket at `path` with mode 0660. A leftover socket nobody listens on is replaced; a
/// live one, or anything that is not a socket, is refused. The socket is bound at `<path>.<pid>`,
/// given its mode, then renamed into place, so the path never shows a socket with looser
/// permissions and is never missing while a stale file is replaced.
fn bind(path: &Path) -> Result<(UnixListener, SocketFile)> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| ErrorKind::Io.msg(format!("create folder {}", dir.display())).src(e))?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ErrorKind::Io.msg(format!(
                "local api socket {shown} exists and is not a socket; not replacing it"
            )));
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ErrorKind::Io.msg(format!(
                    "local api socket {shown} is in use: another edgehub agent is running"
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("local api: replacing stale socket {shown} (nobody listening)");
            }
            Err(e) => {
                return Err(ErrorKind::Io.msg(format!("probe existing socket {shown}")).src(e));
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ErrorKind::Io.msg(format!("stat {shown}")).src(e)),
    }

    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}", std::process::id()));
    let temp = PathBuf::from(temp);
    let _ = fs::remove_file(&temp); // our own leftover from a crash with the same pid
    let listener = UnixListener::bind(&temp).map_err(|e| {
        ErrorKind::Io.msg(format!("bind local api socket {}", temp.display())).src(e)
    })?;
    let placed = fs::set_permissions(&temp, fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| ErrorKind::Io.msg(format!("chmod {}", temp.display())).src(e))
        .and_then(|()| {
            fs::rename(&temp, path).map_err(|e| {
                ErrorKind::Io.msg(format!("rename {} to {shown}", temp.display())).src(e)
            })
        })
        .and_then(|()| {
            fs::symlink_metadata(path)
                .map_err(|e| ErrorKind::Io.msg(format!("stat {shown}")).src(e))
        });
    match placed {
        Ok(m) => {
            log::info!("local api listening on {shown}");
            Ok((listener, SocketFile { path: path.to_owned(), dev: m.dev(), ino: m.ino() }))
        }
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The module thread

fn run(
    ctx: ModuleContext,
    listener: UnixListener,
    socket_file: SocketFile,
    settings: Settings,
    meta: Option<MetaHandle>,
    changes: Option<Receiver<Message>>,
    forwarded: Option<Receiver<Message>>,
) {
    // A second handle on the listening socket: shutdown(2) on it wakes the blocked accept().
    let waker = listener.try_clone().map(|l| UnixStream::from(OwnedFd::from(l)));
    let clients = Arc::new(Clients::new(settings.client_queue, settings.max_clients));
    let watches = Arc::new(watch::Watches::new(settings.watch.clone()));
    let (stop_tx, stop_rx) = bounded::<()>(0);
    let watcher = watch::spawn(
        watches.clone(),
        meta.clone(),
        ctx.hub.clone(),
        clients.clone(),
        stop_rx.clone(),
        settings.request_timeout,
    );
    let watcher = match watcher {
        Ok(thread) => Some(thread),
        Err(e) => {
            log::error!(
                "local api: spawn watch thread: {e}; watched objects are not queried again"
            );
            None
        }
    };
    let shared = ClientShared {
        watches: watches.clone(),
        hub: ctx.hub.clone(),
        meta,
        clients: clients.clone(),
        max_line_bytes: settings.max_line_bytes,
        request_timeout: settings.request_timeout,
        idle_timeout: settings.idle_timeout,
    };
    let accept = std::thread::Builder::new()
        .name("eh-api-accept".to_owned())
        .stack_size(ACCEPT_STACK_BYTES)
        .spawn(move || accept_loop(&listener, &shared, &stop_rx));
    let accept = match accept {
        Ok(thread) => Some(thread),
        Err(e) => {
            log::error!("local api: spawn accept thread: {e}; the local api is unavailable");
            None
        }
    };

    let mut changes = changes.unwrap_or_else(never);
    let mut forwarded = forwarded.unwrap_or_else(never);
    loop {
        select! {
            recv(ctx.inbox) -> msg => match msg {
                Ok(msg) => {
                    if is_connection_event(&msg) == Some(true) {
                        watches.on_connected();
                    }
                    clients.publish_cloud(&msg, &ctx.hub);
                }
                Err(_) => break, // the agent is stopping
            },
            recv(changes) -> msg => match msg {
                Ok(msg) => {
                    clients.publish(Some(bus_group::META), &event_line(bus_group::META, &msg));
                }
                Err(_) => changes = never(), // the store has stopped; keep serving the rest
            },
            recv(forwarded) -> msg => match msg {
                Ok(msg) => {
                    let group = subscription_group(&msg);
                    clients.publish(Some(group), &event_line(group, &msg));
                }
                Err(_) => forwarded = never(), // its owner has stopped
            },
        }
    }

    // Stop: wake and join the accept thread, then cut and join every client, then the file goes.
    drop(stop_tx);
    if let Some(thread) = accept {
        // shutdown(2) on a listening socket wakes accept() on Linux; connecting to ourselves
        // (tiny_http's trick) does it anywhere, as long as the path is still ours.
        match &waker {
            Ok(w) => {
                let _ = w.shutdown(Shutdown::Both);
            }
            Err(e) => log::warn!("local api: no second handle on the listener: {e}"),
        }
        if socket_file.is_ours() {
            let _ = UnixStream::connect(&socket_file.path);
        }
        if thread.join().is_err() {
            log::error!("bug: local api accept thread panicked");
        }
    }
    // The watch thread sees the stop before its next query (one running query ends within
    // `WATCH_QUERY_TIMEOUT`).
    if watcher.is_some_and(|thread| thread.join().is_err()) {
        log::error!("bug: local api watch thread panicked");
    }
    clients.close_all_and_join();
    drop(socket_file);
    log::info!("local api stopped");
}

fn accept_loop(listener: &UnixListener, shared: &ClientShared, stop_rx: &Receiver<()>) {
    loop {
        let accepted = listener.accept();
        if let Err(TryRecvError::Disconnected) = stop_rx.try_recv() {
            return;
        }
        match accepted {
            Ok((stream, _)) => shared.clients.admit(stream, shared),
            Err(e) => {
                log::warn!("local api: accept: {e}");
                if let Err(RecvTimeoutError::Disconnected) =
                    stop_rx.recv_timeout(ACCEPT_RETRY_PAUSE)
                {
                    return;
                }
            }
        }
    }
}

/// The subscription group of a cloud message in the module's inbox: the bus group it was routed
/// by, or for a custom group (routed through `other`) its wire group.
fn subscription_group(msg: &Message) -> &str {
    match destination(msg) {
        Destination::Module(group) => group,
        _ => msg.route.group.as_str(),
    }
}

fn is_connection_event(msg: &Message) -> Option<bool> {
    if msg.route.resource != CONNECTION_RESOURCE || msg.route.operation != operation::CONNECT {
        return None;
    }
    match msg.content_text().as_deref() {
        Some(CLOUD_CONNECTED) => Some(true),
        Some(CLOUD_DISCONNECTED) => Some(false),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Lines on the socket

/// A pushed event.
#[derive(Serialize)]
struct Event<'a> {
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a Message>,
}

fn event_line(group: &str, msg: &Message) -> Arc<str> {
    to_line(&Event { event: "message", group: Some(group), connected: None, message: Some(msg) })
}

fn connection_line(connected: bool) -> Arc<str> {
    to_line(&Event { event: "connection", group: None, connected: Some(connected), message: None })
}

/// A stored object as a query reply shows it.
#[derive(Serialize)]
struct Object {
    resource: String,
    #[serde(rename = "resourceVersion")]
    resource_version: String,
    content: Box<RawValue>,
}

/// A reply. Only the fields of the op that answers are present.
#[derive(Default, Serialize)]
struct Reply<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(rename = "msgId", skip_serializing_if = "Option::is_none")]
    msg_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acked: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Message>,
    /// `Some(None)` is a query that found nothing: `"object":null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    object: Option<Option<Object>>,
    /// The agent's counters and link state (`status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<serde_json::Value>,
    /// The interval a `watch` was granted.
    #[serde(rename = "intervalMs", skip_serializing_if = "Option::is_none")]
    interval_ms: Option<u64>,
}

/// Why a command failed: `kind` is one of [`failure`]'s names, for programs to decide on.
struct Failure {
    kind: &'static str,
    error: String,
}

/// The `kind` of an error reply.
pub mod failure {
    /// The line or command is malformed: fix the request.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The cloud did not answer in time.
    pub const TIMEOUT: &str = "timeout";
    /// Not a reply: the client sent nothing for `localApiIdleTimeout` without having subscribed,
    /// and is disconnected. Nothing it sends after this line is read; reconnect to go on.
    pub const IDLE: &str = "idle";
    /// A bounded queue (the outbox, the pending requests) is full: try again later.
    pub const FULL: &str = "full";
    /// The agent is stopping; the command was cancelled (try again once it runs again).
    pub const STOPPING: &str = "stopping";
    /// Anything else (the store failed, the agent is too busy…).
    pub const FAILED: &str = "failed";
}

fn bad_request(error: impl Into<String>) -> Failure {
    Failure { kind: failure::BAD_REQUEST, error: error.into() }
}

impl Failure {
    fn from_error(what: &str, e: &crate::error::Error) -> Failure {
        let kind = match e.kind() {
            ErrorKind::Config => failure::BAD_REQUEST,
            ErrorKind::Timeout => failure::TIMEOUT,
            ErrorKind::Full => failure::FULL,
            ErrorKind::Stopped => failure::STOPPING,
            _ => failure::FAILED,
        };
        Failure { kind, error: format!("{what}: {e}") }
    }
}

fn error_line(id: Option<&RawValue>, failure: Failure) -> Arc<str> {
    to_line(&Reply { id, error: Some(failure.error), kind: Some(failure.kind), ..Reply::default() })
}

fn to_line(value: &impl Serialize) -> Arc<str> {
    // Cannot fail: every field is a string, a bool, a list of strings or valid raw JSON.
    let mut text = serde_json::to_string(value).unwrap_or_default();
    text.push('\n');
    Arc::from(text)
}

/// One request line. A flat struct rather than a tagged enum: serde's tagged enums buffer their
/// input, which `RawValue` (the message, kept byte for byte) does not support.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    op: String,
    #[serde(default)]
    id: Option<Box<RawValue>>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    message: Option<Box<RawValue>>,
    #[serde(default, rename = "timeoutMs")]
    timeout_ms: Option<u64>,
    #[serde(default)]
    resource: Option<String>,
    /// How often a `watch` queries again.
    #[serde(default, rename = "intervalMs")]
    interval_ms: Option<u64>,
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line (without its `\n`) is in the buffer. At end of stream, an unterminated last line.
    Complete,
    /// The line was longer than the limit; its bytes (this many) were read and thrown away.
    TooLong(usize),
    /// End of stream, nothing pending.
    Eof,
}

/// Reads one `\n`-terminated line into `line`, never holding more than `max` bytes of it: a
/// longer line is consumed up to its end and reported as [`Line::TooLong`], so the stream stays
/// in step and usable.
pub fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    line.clear();
    let mut total = 0usize;
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if total > max {
                Line::TooLong(total)
            } else if total == 0 {
                Line::Eof
            } else {
                Line::Complete
            });
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        total = total.saturating_add(chunk.len());
        if total <= max {
            line.extend_from_slice(chunk);
        } else if !line.is_empty() {
            line.clear();
        }
        let used = chunk.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            return Ok(if total > max { Line::TooLong(total) } else { Line::Complete });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// What every client thread shares.
#[derive(Clone)]
struct ClientShared {
    watches: Arc<watch::Watches>,
    hub: Hub,
    meta: Option<MetaHandle>,
    clients: Arc<Clients>,
    max_line_bytes: usize,
    request_timeout: Duration,
    idle_timeout: Option<Duration>,
}

/// The table of connected clients. Its lock is held only for `try_send`s and bookkeeping, never
/// across a read or write on a client's socket, so the module thread never waits on a client.
struct Clients {
    table: Mutex<Table>,
    queue_cap: usize,
    max_clients: usize,
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    next_id: u64,
    /// The link state as of the last connection event fanned out (what a new subscriber is told).
    connected: bool,
    stopping: bool,
    /// Clients refused since the last line that said so, and when that line was logged: a flood
    /// of connections is logged once per [`REFUSAL_LOG_INTERVAL`], not once per connection.
    refused_unlogged: u64,
    refusal_logged: Option<std::time::Instant>,
}

struct Slot {
    id: u64,
    groups: Vec<String>,
    /// `None` once the client is closed: nothing more is queued for it, and its writer ends
    /// after writing what is already queued.
    out_tx: Option<Sender<Arc<str>>>,
    /// Bytes queued and not yet written, shared with the writer.
    queued_bytes: Arc<AtomicUsize>,
    /// Kept to shut the socket down (waking both threads) when the client is cut or we stop.
    stream: UnixStream,
    /// The reader thread, which joins its writer.
    thread: Option<JoinHandle<()>>,
    /// The reader has stopped reading (and will not take the table's lock again).
    reader_done: bool,
}

impl Slot {
    fn is_open(&self) -> bool {
        self.out_tx.is_some()
    }

    /// Queues `line` without waiting. A full queue means the client is not reading: it is cut off.
    fn push(&mut self, line: Arc<str>, queue_cap: usize) {
        let Some(out_tx) = &self.out_tx else { return };
        let len = line.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > MAX_CLIENT_QUEUE_BYTES {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            let mib = MAX_CLIENT_QUEUE_BYTES >> 20;
            return self.cut(&format!("its queue holds over {mib} MiB (it is not reading)"));
        }
        let refused = match out_tx.try_send(line) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => {
                format!("its queue of {queue_cap} lines is full (it is not reading)")
            }
            Err(TrySendError::Disconnected(_)) => "it is gone".to_owned(),
        };
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        self.cut(&refused);
    }

    fn cut(&mut self, why: &str) {
        if self.out_tx.take().is_some() {
            log::warn!("local api: disconnecting client {}: {why}", self.id);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Clients {
    fn new(queue_cap: usize, max_clients: usize) -> Clients {
        Clients { table: Mutex::new(Table::default()), queue_cap, max_clients }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Only channel ends and flags: a panic elsewhere cannot leave it half-updated.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new connection and starts its thread, or refuses it when the table is full.
    fn admit(&self, stream: UnixStream, shared: &ClientShared) {
        let mut table = self.lock();
        // Join the threads of clients that have gone, so their slots free up.
        join_slots(take_slots(&mut table, |s| {
            s.thread.as_ref().map_or(true, JoinHandle::is_finished)
        }));
        if table.slots.len() >= self.max_clients {
            // At the limit, clients that hung up but whose last replies are still being written
            // are finished off first. Their readers are done, so they take the lock no more and
            // joining them (outside the lock) returns as soon as the shutdown wakes their writer.
            let leaving = take_slots(&mut table, |s| s.reader_done);
            if !leaving.is_empty() {
                drop(table);
                join_slots(leaving);
                table = self.lock();
            }
        }
        if table.stopping {
            return;
        }
        if table.slots.len() >= self.max_clients {
            table.refused_unlogged += 1;
            let due = table.refusal_logged.map_or(true, |at| at.elapsed() >= REFUSAL_LOG_INTERVAL);
            let refused = if due {
                table.refusal_logged = Some(std::time::Instant::now());
                std::mem::take(&mut table.refused_unlogged)
            } else {
                0
            };
            drop(table);
            if refused > 0 {
                log::warn!(
                    "local api: refused {refused} client(s): {} already connected \
                     (localApiMaxClients); at most one such line per {}s",
                    self.max_clients,
                    REFUSAL_LOG_INTERVAL.as_secs()
                );
            }
            refuse(
                stream,
                &format!("too many local clients ({}); try again later", self.max_clients),
            );
            return;
        }
        let id = table.next_id;
        table.next_id += 1;
        let kept = match stream.try_clone() {
            Ok(kept) => kept,
            Err(e) => {
                log::warn!("local api: client {id}: clone socket: {e}");
                return;
            }
        };
        let (out_tx, rx) = bounded(self.queue_cap);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let outgoing = Outgoing { rx, queued_bytes: queued_bytes.clone() };
        let shared = shared.clone();
        // Spawned under the lock, so the slot exists before the client's first reply.
        let thread = std::thread::Builder::new()
            .name("eh-client".to_owned())
            .stack_size(CLIENT_STACK_BYTES)
            .spawn(move || serve_client(id, stream, outgoing, &shared));
        match thread {
            Ok(thread) => {
                log::debug!("local api: client {id} connected");
                table.slots.push(Slot {
                    id,
                    groups: Vec::new(),
                    out_tx: Some(out_tx),
                    queued_bytes,
                    stream: kept,
                    thread: Some(thread),
                    reader_done: false,
                });
            }
            Err(e) => {
                log::warn!("local api: client {id}: spawn thread: {e}");
                let _ = kept.shutdown(Shutdown::Both);
            }
        }
    }

    /// A cloud message from the module's inbox: to the clients subscribed to its group; a
    /// connection event: to every subscribed client.
    ///
    /// An ACK-queue message is not held here: ACKing is up to the clients, which live outside the
    /// agent and may die first, so it is released at once and a re-send of it (every 5 s until
    /// some client ACKs) reaches the subscribers again.
    fn publish_cloud(&self, msg: &Message, hub: &Hub) {
        if let Some(connected) = is_connection_event(msg) {
            let line = connection_line(connected);
            let mut table = self.lock();
            if table.connected == connected {
                return; // each module gets the event once; say it once per change too
            }
            table.connected = connected;
            self.publish_locked(&mut table, None, &line);
            return;
        }
        let group = subscription_group(msg);
        let line = event_line(group, msg);
        let delivered = self.publish(Some(group), &line);
        if delivered == 0 {
            log::debug!(
                "local api: no client subscribed to {}; dropping {msg:?}",
                crate::logging::shown(group)
            );
        }
        if msg.needs_ack() {
            hub.release(msg);
        }
    }

    /// Queues `line` for every open client subscribed to `group` (`None`: to any group).
    /// Returns how many got it.
    fn publish(&self, group: Option<&str>, line: &Arc<str>) -> usize {
        let mut table = self.lock();
        self.publish_locked(&mut table, group, line)
    }

    fn publish_locked(&self, table: &mut Table, group: Option<&str>, line: &Arc<str>) -> usize {
        let mut delivered = 0;
        for slot in table.slots.iter_mut().filter(|s| s.is_open()) {
            let wanted = match group {
                Some(group) => slot.groups.iter().any(|g| g == group),
                None => !slot.groups.is_empty(),
            };
            if wanted {
                slot.push(line.clone(), self.queue_cap);
                delivered += 1;
            }
        }
        delivered
    }

    /// Queues a reply for client `id`.
    fn reply(&self, id: u64, line: Arc<str>) {
        let mut table = self.lock();
        if let Some(slot) = table.slots.iter_mut().find(|s| s.id == id) {
            slot.push(line, self.queue_cap);
        }
    }

    /// Adds `groups` to client `id`'s subscription and queues the reply; after the first
    /// subscription, also the current link state. Both under one lock, so no event of the module
    /// can come between them.
    fn subscribe(&self, id: u64, request_id: Option<&RawValue>, groups: Vec<String>) {
        let mut table = self.lock();
        let connected = table.connected;
        let Some(slot) = table.slots.iter_mut().find(|s| s.id == id) else { return };
        let first = slot.groups.is_empty();
        for group in groups {
            if !slot.groups.contains(&group) {
                slot.groups.push(group);
            }
        }
        if slot.groups.len() > MAX_GROUPS_PER_CLIENT {
            slot.groups.truncate(MAX_GROUPS_PER_CLIENT);
        }
        let reply = Reply {
            ok: true,
            id: request_id,
            groups: Some(slot.groups.clone()),
            connected: Some(connected),
            ..Reply::default()
        };
        slot.push(to_line(&reply), self.queue_cap);
        if first {
            slot.push(connection_line(connected), self.queue_cap);
        }
    }

    /// Whether client `id` has subscribed (it then waits for events, and is never idle).
    fn is_subscribed(&self, id: u64) -> bool {
        self.lock().slots.iter().any(|s| s.id == id && !s.groups.is_empty())
    }

    /// How many more groups client `id` may subscribe to.
    fn groups_left(&self, id: u64) -> usize {
        let table = self.lock();
        let used = table.slots.iter().find(|s| s.id == id).map_or(0, |s| s.groups.len());
        MAX_GROUPS_PER_CLIENT.saturating_sub(used)
    }

    /// Client `id`'s reader is done: nothing more is queued, the writer finishes what is.
    fn finish(&self, id: u64) {
        if let Some(slot) = self.lock().slots.iter_mut().find(|s| s.id == id) {
            slot.out_tx = None;
            slot.reader_done = true;
        }
    }

    /// Refuses new clients, cuts every client and joins their threads. First every client stops
    /// being read and gets up to [`STOP_GRACE`] to finish its command and have its replies
    /// written (a cancelled request's `stopping` error, say); then what is left is cut.
    fn close_all_and_join(&self) {
        {
            let mut table = self.lock();
            table.stopping = true;
            for slot in &table.slots {
                // Wakes an idle reader (end of stream); a reader running a command finishes it.
                let _ = slot.stream.shutdown(Shutdown::Read);
            }
        }
        let deadline = std::time::Instant::now() + STOP_GRACE;
        // Shutdown only: a short, bounded poll rather than a signal nobody else needs.
        while std::time::Instant::now() < deadline
            && self.lock().slots.iter().any(|s| s.thread.as_ref().is_some_and(|t| !t.is_finished()))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let threads: Vec<(u64, JoinHandle<()>)> = {
            let mut table = self.lock();
            for slot in &mut table.slots {
                slot.out_tx = None;
                let _ = slot.stream.shutdown(Shutdown::Both);
            }
            table.slots.iter_mut().filter_map(|s| Some((s.id, s.thread.take()?))).collect()
        };
        for (id, thread) in threads {
            if thread.join().is_err() {
                log::error!("bug: local api client {id} thread panicked");
            }
        }
        let mut table = self.lock();
        table.slots.clear();
        if table.refused_unlogged > 0 {
            log::warn!(
                "local api: refused {} more client(s) since the last such line",
                table.refused_unlogged
            );
        }
    }
}

/// Removes the slots `pick` selects, shutting their sockets down, so they can be joined.
fn take_slots(table: &mut Table, pick: impl Fn(&Slot) -> bool) -> Vec<Slot> {
    let mut taken = Vec::new();
    let mut i = 0;
    while i < table.slots.len() {
        if pick(&table.slots[i]) {
            let mut slot = table.slots.swap_remove(i);
            slot.cut("finishing it off");
            taken.push(slot);
        } else {
            i += 1;
        }
    }
    taken
}

fn join_slots(slots: Vec<Slot>) {
    for slot in slots {
        if slot.thread.is_some_and(|t| t.join().is_err()) {
            log::error!("bug: local api client {} thread panicked", slot.id);
        }
    }
}

/// Tells a client it was not admitted, without waiting on it.
fn refuse(stream: UnixStream, why: &str) {
    let _ = stream.set_nonblocking(true);
    let mut stream = stream;
    let line = error_line(None, Failure { kind: failure::FULL, error: why.to_owned() });
    let _ = stream.write_all(line.as_bytes());
}

/// The reader thread of one client: starts its writer, then reads and runs commands until the
/// client hangs up or is cut off, then lets the writer finish and joins it.
/// The writer's end of a client's queue.
struct Outgoing {
    rx: Receiver<Arc<str>>,
    queued_bytes: Arc<AtomicUsize>,
}

fn serve_client(id: u64, stream: UnixStream, outgoing: Outgoing, shared: &ClientShared) {
    let clients = &shared.hub.status().local_clients;
    clients.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    serve_client_connected(id, stream, outgoing, shared);
    clients.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

fn serve_client_connected(id: u64, stream: UnixStream, outgoing: Outgoing, shared: &ClientShared) {
    let writer = stream.try_clone().and_then(|out| {
        out.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT))?;
        std::thread::Builder::new()
            .name("eh-client-out".to_owned())
            .stack_size(WRITER_STACK_BYTES)
            .spawn(move || write_loop(id, out, &outgoing))
    });
    let writer = match writer {
        Ok(writer) => writer,
        Err(e) => {
            log::warn!("local api: client {id}: start writer: {e}");
            let _ = stream.shutdown(Shutdown::Both);
            shared.clients.finish(id);
            return;
        }
    };
    read_loop(id, &stream, shared);
    shared.watches.drop_client(id);
    shared.clients.finish(id);
    if writer.join().is_err() {
        log::error!("bug: local api client {id} writer panicked");
    }
    log::debug!("local api: client {id} disconnected");
}

fn read_loop(id: u64, stream: &UnixStream, shared: &ClientShared) {
    if let Err(e) = stream.set_read_timeout(shared.idle_timeout) {
        log::warn!("local api: client {id}: set idle timeout: {e}");
    }
    let mut reader = BufReader::with_capacity(8 << 10, stream);
    let mut line = Vec::new();
    loop {
        let read = read_line(&mut reader, &mut line, shared.max_line_bytes);
        match read {
            // Idle: a subscriber waits for events by design; anyone else holds a slot for nothing
            // (or is sending a line too slowly), and is let go with a reason.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                // A watcher, too, waits for events by design.
                if line.is_empty()
                    && (shared.clients.is_subscribed(id) || shared.watches.is_following(id))
                {
                    continue;
                }
                let idle = shared.idle_timeout.unwrap_or_default();
                log::debug!("local api: client {id} idle for {idle:?}; disconnecting it");
                let error = format!(
                    "no request for {:.1} s (localApiIdleTimeout); disconnecting",
                    idle.as_secs_f64()
                );
                shared.clients.reply(id, error_line(None, Failure { kind: failure::IDLE, error }));
                return;
            }
            Ok(Line::Eof) => return,
            Ok(Line::TooLong(len)) => shared.clients.reply(
                id,
                error_line(
                    None,
                    bad_request(format!(
                        "line of {len} bytes is over the limit of {} (localApiMaxLineBytes)",
                        shared.max_line_bytes
                    )),
                ),
            ),
            Ok(Line::Complete) => {
                if !line.iter().all(u8::is_ascii_whitespace) {
                    execute(id, &line, shared);
                }
            }
            Err(e) => {
                log::debug!("local api: client {id}: read: {e}");
                return;
            }
        }
        if line.capacity() > KEPT_LINE_CAPACITY {
            line = Vec::new();
        }
    }
}

fn write_loop(id: u64, stream: UnixStream, outgoing: &Outgoing) {
    let mut out = BufWriter::with_capacity(16 << 10, &stream);
    let write = |out: &mut BufWriter<&UnixStream>, line: Arc<str>| {
        let written = out.write_all(line.as_bytes());
        outgoing.queued_bytes.fetch_sub(line.len(), Ordering::Relaxed);
        written
    };
    let result = (|| -> io::Result<()> {
        while let Ok(line) = outgoing.rx.recv() {
            write(&mut out, line)?;
            // Write whatever else is queued before flushing: one syscall for a burst.
            while let Ok(line) = outgoing.rx.try_recv() {
                write(&mut out, line)?;
            }
            out.flush()?;
        }
        Ok(())
    })();
    match result {
        // Everything queued is written: the client sees the end of the stream now, even while
        // other handles on the socket are still open.
        Ok(()) => {
            let _ = stream.shutdown(Shutdown::Write);
        }
        Err(e) => {
            log::debug!("local api: client {id}: write: {e}");
            // Wake the reader too: this client is done.
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

/// A request line that passed every check made before acting on it. [`parse_request`] is the
/// pure half of a command (no hub, no I/O), so it can be fuzzed; `execute` does the rest.
#[derive(Debug)]
pub struct ParsedRequest {
    /// The request's `id`, echoed in the reply.
    pub id: Option<Box<RawValue>>,
    pub command: Command,
}

/// What a request asks for, its arguments checked.
#[derive(Debug)]
pub enum Command {
    /// Groups to add: each 1-[`MAX_GROUP_BYTES`] bytes, at most [`MAX_GROUPS_PER_CLIENT`] (how
    /// many this client may still add is checked when it runs).
    Subscribe(Vec<String>),
    /// A message for the outbox, with `msg_id` and `timestamp` filled in.
    Send(Message),
    /// `timeout` is `None` when the line gave no `timeoutMs` (the configured default applies).
    Request {
        message: Message,
        timeout: Option<Duration>,
    },
    /// A message received, with a `msg_id`.
    Ack(Message),
    Query {
        resource: String,
        timeout: Option<Duration>,
    },
    Status,
    /// Query `resource` now and follow it: `interval` is `None` when the line gave none.
    Watch {
        resource: String,
        interval: Option<Duration>,
        timeout: Option<Duration>,
    },
    Unwatch {
        resource: String,
    },
}

/// Why [`parse_request`] refused a line (a `bad_request`), with the request's `id` when the line
/// was a request object.
#[derive(Debug)]
pub struct Rejected {
    pub id: Option<Box<RawValue>>,
    pub error: String,
}

/// Parses one request line (without its `\n`) and checks everything that can be checked without
/// the agent: the JSON shape, the op, the groups, the message (decoded, with route.group and
/// route.operation where it goes to the cloud), `timeoutMs` and a query's resource.
///
/// # Errors
/// [`Rejected`] with the reason, for any line a client could send; it never panics.
pub fn parse_request(line: &[u8]) -> Result<ParsedRequest, Rejected> {
    let request: Request = serde_json::from_slice(line)
        .map_err(|e| Rejected { id: None, error: format!("bad request: {e}") })?;
    match command_of(&request) {
        Ok(command) => Ok(ParsedRequest { id: request.id, command }),
        Err(error) => Err(Rejected { id: request.id, error }),
    }
}

fn command_of(request: &Request) -> Result<Command, String> {
    Ok(match request.op.as_str() {
        "subscribe" => Command::Subscribe(subscribe_groups(request)?),
        "send" => Command::Send(outgoing_message(request)?),
        "request" => {
            Command::Request { message: outgoing_message(request)?, timeout: timeout_of(request)? }
        }
        "ack" => Command::Ack(acked_message(request)?),
        "query" => {
            let Some(resource) = &request.resource else {
                return Err("query needs \"resource\": \"<namespace>/<type>/<name>\"".to_owned());
            };
            Command::Query { resource: resource.clone(), timeout: timeout_of(request)? }
        }
        "status" => Command::Status,
        "watch" => {
            let resource = watched_resource(request)?;
            let interval = match request.interval_ms.map(Duration::from_millis) {
                Some(i) if i.is_zero() || i > watch::MAX_WATCH_INTERVAL => {
                    return Err(format!(
                        "watch: intervalMs must be within 1..={}",
                        watch::MAX_WATCH_INTERVAL.as_millis()
                    ))
                }
                interval => interval,
            };
            Command::Watch { resource, interval, timeout: timeout_of(request)? }
        }
        "unwatch" => Command::Unwatch { resource: watched_resource(request)? },
        other => {
            return Err(format!(
                "unknown op {other:?} (expected subscribe, send, request, ack, query, status, \
                 watch or unwatch)"
            ))
        }
    })
}

fn execute(client: u64, line: &[u8], shared: &ClientShared) {
    let parsed = match parse_request(line) {
        Ok(parsed) => parsed,
        Err(rejected) => {
            let line = error_line(rejected.id.as_deref(), bad_request(rejected.error));
            shared.clients.reply(client, line);
            return;
        }
    };
    let id = parsed.id.as_deref();
    let outcome = match parsed.command {
        Command::Subscribe(groups) if groups.len() > shared.clients.groups_left(client) => Err(
            bad_request(format!("subscribe: at most {MAX_GROUPS_PER_CLIENT} groups per client")),
        ),
        Command::Subscribe(groups) => {
            shared.clients.subscribe(client, id, groups);
            return;
        }
        Command::Send(msg) => send(msg, &shared.hub),
        Command::Request { message, timeout } => cloud_request(message, timeout, shared),
        Command::Ack(msg) => Ok(Reply { acked: Some(shared.hub.ack(&msg)), ..Reply::default() }),
        Command::Query { resource, timeout } => query(&resource, timeout, shared),
        Command::Status => Ok(Reply { status: Some(shared.hub.status_json()), ..Reply::default() }),
        Command::Watch { resource, interval, timeout } => {
            watch::watch(client, &resource, interval, timeout, shared)
        }
        Command::Unwatch { resource } => watch::unwatch(client, &resource, shared),
    };
    let line = match outcome {
        Ok(reply) => to_line(&Reply { ok: true, id, ..reply }),
        Err(failure) => error_line(id, failure),
    };
    shared.clients.reply(client, line);
}

/// What a command answers: the reply's fields (without `ok` and `id`), or why it failed.
type Outcome = Result<Reply<'static>, Failure>;

/// The `resource` of a watch or unwatch: one object with a safe key.
fn watched_resource(request: &Request) -> Result<String, String> {
    let op = &request.op;
    let Some(resource) = &request.resource else {
        return Err(format!("{op} needs \"resource\": \"<namespace>/<type>/<name>\""));
    };
    watch::check_resource(op, resource)?;
    Ok(resource.clone())
}

fn subscribe_groups(request: &Request) -> Result<Vec<String>, String> {
    let Some(groups) = &request.groups else {
        return Err("subscribe needs \"groups\": [\"twin\", …]".to_owned());
    };
    if groups.is_empty() {
        return Err("subscribe: \"groups\" is empty".to_owned());
    }
    if let Some(group) = groups.iter().find(|g| {
        g.is_empty() || g.len() > MAX_GROUP_BYTES || g.chars().any(|c| c.is_control() || c == ' ')
    }) {
        return Err(format!(
            "subscribe: group {group:?} must be 1-{MAX_GROUP_BYTES} bytes without spaces"
        ));
    }
    if groups.len() > MAX_GROUPS_PER_CLIENT {
        return Err(format!("subscribe: at most {MAX_GROUPS_PER_CLIENT} groups per client"));
    }
    Ok(groups.clone())
}

/// The request's message for the cloud, with a fresh `msg_id` and the current time where they are
/// missing.
fn outgoing_message(request: &Request) -> Result<Message, String> {
    let op = &request.op;
    let Some(raw) = &request.message else {
        return Err(format!("{op} needs \"message\""));
    };
    let mut msg =
        Message::decode(raw.get().as_bytes()).map_err(|e| format!("{op}: message: {e}"))?;
    if msg.route.group.is_empty() || msg.route.operation.is_empty() {
        return Err(format!("{op}: message needs route.group and route.operation"));
    }
    if msg.header.id.is_empty() {
        msg.header.id = new_uuid();
    }
    if msg.header.timestamp == 0 {
        msg.header.timestamp = now_millis();
    }
    Ok(msg)
}

fn acked_message(request: &Request) -> Result<Message, String> {
    let Some(raw) = &request.message else {
        return Err("ack needs \"message\" (the message received)".to_owned());
    };
    let msg = Message::decode(raw.get().as_bytes()).map_err(|e| format!("ack: message: {e}"))?;
    if msg.header.id.is_empty() {
        return Err("ack: message has no msg_id".to_owned());
    }
    if msg.header.id.len() > crate::router::MAX_MSG_ID_BYTES {
        return Err(format!(
            "ack: msg_id has {} bytes, longer than any the cloud sends ({})",
            msg.header.id.len(),
            crate::router::MAX_MSG_ID_BYTES
        ));
    }
    Ok(msg)
}

/// The request's `timeoutMs`, if it gave one within 1..=[`MAX_REQUEST_TIMEOUT`].
fn timeout_of(request: &Request) -> Result<Option<Duration>, String> {
    let Some(ms) = request.timeout_ms else { return Ok(None) };
    let timeout = Duration::from_millis(ms);
    if timeout.is_zero() || timeout > MAX_REQUEST_TIMEOUT {
        return Err(format!(
            "timeoutMs: {ms} is not within 1..={}",
            MAX_REQUEST_TIMEOUT.as_millis()
        ));
    }
    Ok(Some(timeout))
}

fn timeout_or_default(timeout: Option<Duration>, shared: &ClientShared) -> Duration {
    timeout.unwrap_or(shared.request_timeout.min(MAX_REQUEST_TIMEOUT))
}

fn send(msg: Message, hub: &Hub) -> Outcome {
    let msg_id = msg.header.id.clone();
    hub.send(msg).map_err(|rejected| Failure {
        kind: failure::FULL,
        error: format!("send: outbox refused the message: {}", rejected.reason),
    })?;
    Ok(Reply { msg_id: Some(msg_id), ..Reply::default() })
}

/// Blocks this client's thread (only) until the cloud answers or the timeout passes.
fn cloud_request(msg: Message, timeout: Option<Duration>, shared: &ClientShared) -> Outcome {
    let timeout = timeout_or_default(timeout, shared);
    let response =
        shared.hub.request(msg, timeout).map_err(|e| Failure::from_error("request", &e))?;
    Ok(Reply { message: Some(response), ..Reply::default() })
}

fn query(resource: &str, timeout: Option<Duration>, shared: &ClientShared) -> Outcome {
    let Some(meta) = &shared.meta else {
        return Err(Failure {
            kind: failure::FAILED,
            error: "query: this agent runs no resource store".to_owned(),
        });
    };
    let timeout = timeout_or_default(timeout, shared);
    let found =
        meta.query(&shared.hub, resource, timeout).map_err(|e| Failure::from_error("query", &e))?;
    let object = found.map(|stored: StoredObject| Object {
        resource: stored.resource,
        resource_version: stored.resource_version,
        content: stored.content,
    });
    Ok(Reply { object: Some(object), ..Reply::default() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Route;
    use std::io::Cursor;

    fn lines(input: &[u8], max: usize) -> Vec<(Line, String)> {
        // A 4-byte buffer, so lines straddle refills.
        let mut reader = BufReader::with_capacity(4, Cursor::new(input.to_vec()));
        let mut line = Vec::new();
        let mut out = Vec::new();
        loop {
            let found = read_line(&mut reader, &mut line, max).unwrap();
            let text = String::from_utf8_lossy(&line).into_owned();
            let eof = found == Line::Eof;
            out.push((found, text));
            if eof {
                return out;
            }
        }
    }

    #[test]
    fn read_line_keeps_lines_up_to_the_limit_and_skips_longer_ones_whole() {
        let max = 10;
        let input = b"0123456789\n01234567890\nok\n\nabcdefghijklmnopqrstuvwxyz\nlast";
        assert_eq!(
            lines(input, max),
            vec![
                (Line::Complete, "0123456789".to_owned()),
                (Line::TooLong(11), String::new()),
                (Line::Complete, "ok".to_owned()),
                (Line::Complete, String::new()),
                (Line::TooLong(26), String::new()),
                (Line::Complete, "last".to_owned()),
                (Line::Eof, String::new()),
            ]
        );
        assert_eq!(lines(b"01234567890", max)[0], (Line::TooLong(11), String::new()));
        assert_eq!(lines(b"", max), vec![(Line::Eof, String::new())]);
    }

    #[test]
    fn read_line_never_holds_more_than_the_limit() {
        let mut input = vec![b'x'; 1 << 20];
        input.push(b'\n');
        let mut reader = BufReader::with_capacity(8 << 10, Cursor::new(input));
        let mut line = Vec::new();
        assert_eq!(read_line(&mut reader, &mut line, 1024).unwrap(), Line::TooLong(1 << 20));
        assert!(line.capacity() <= 1024 + (8 << 10), "capacity {}", line.capacity());
    }

    #[test]
    fn parse_request_checks_every_op_without_the_agent() {
        let message = r#"{"route":{"group":"user","operation":"update"},"content":"x"}"#;
        let parsed = |line: String| parse_request(line.as_bytes());
        let rejected = |line: &str| parse_request(line.as_bytes()).unwrap_err().error;

        let ok = parsed(r#"{"op":"subscribe","id":7,"groups":["twin"]}"#.to_owned()).unwrap();
        assert_eq!(ok.id.unwrap().get(), "7");
        assert!(matches!(ok.command, Command::Subscribe(g) if g == ["twin"]));
        let line = format!(r#"{{"op":"send","message":{message}}}"#);
        let Command::Send(msg) = parsed(line).unwrap().command else { panic!("not a send") };
        assert!(!msg.header.id.is_empty() && msg.header.timestamp > 0, "{msg:?}");
        let line = format!(r#"{{"op":"request","message":{message},"timeoutMs":300000}}"#);
        let Command::Request { timeout, .. } = parsed(line).unwrap().command else {
            panic!("not a request")
        };
        assert_eq!(timeout, Some(MAX_REQUEST_TIMEOUT));
        let query = parsed(r#"{"op":"query","resource":"a/b/c"}"#.to_owned()).unwrap();
        assert!(matches!(query.command, Command::Query { timeout: None, .. }));
        assert!(matches!(
            parsed(r#"{"op":"status"}"#.to_owned()).unwrap().command,
            Command::Status
        ));

        let too_many = format!(r#"{{"op":"subscribe","groups":{:?}}}"#, vec!["g"; 33]);
        assert!(rejected(&too_many).contains("at most 32 groups"));
        assert!(rejected(r#"{"op":"subscribe","groups":["a b"]}"#).contains("without spaces"));
        assert!(rejected(r#"{"op":"send","message":{"route":{"group":"user"}}}"#)
            .contains("route.group and route.operation"));
        assert!(rejected(r#"{"op":"ack","message":{}}"#).contains("no msg_id"));
        let late = format!(r#"{{"op":"request","message":{message},"timeoutMs":300001}}"#);
        assert!(rejected(&late).contains("timeoutMs"));
        assert!(rejected(r#"{"op":"query"}"#).contains("needs \"resource\""));
        assert!(rejected(r#"{"op":"reboot"}"#).contains("unknown op"));
        assert!(rejected(r#"{"op":"status","extra":1}"#).starts_with("bad request"));
        let bad = parse_request(br#"{"op":"nope","id":"x"}"#).unwrap_err();
        assert_eq!(bad.id.unwrap().get(), "\"x\"", "a rejected request keeps its id");
    }

    fn msg(group: &str, source: &str, resource: &str) -> Message {
        Message::with_text(
            Route {
                source: source.into(),
                group: group.into(),
                operation: "update".into(),
                resource: resource.into(),
                ..Route::default()
            },
            "x",
        )
    }

    #[test]
    fn subscription_groups_follow_the_router() {
        assert_eq!(subscription_group(&msg("twin", "twin", "d/twin/x")), "twin");
        assert_eq!(subscription_group(&msg("user", "router_eventbus", "t")), "bus");
        assert_eq!(subscription_group(&msg("taskmanager", "x", "t")), "taskmanager");
        assert_eq!(subscription_group(&msg("my-app", "x", "t")), "my-app");
        let event = Message::connection_event("twin", false);
        assert_eq!(is_connection_event(&event), Some(false));
        assert_eq!(is_connection_event(&msg("twin", "x", CONNECTION_RESOURCE)), None);
    }

    #[test]
    fn a_client_queue_is_bounded_in_bytes_but_takes_one_big_line_when_empty() {
        let (kept, _peer) = UnixStream::pair().unwrap();
        let (out_tx, out_rx) = bounded(1000);
        let mut slot = Slot {
            id: 1,
            groups: Vec::new(),
            out_tx: Some(out_tx),
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            stream: kept,
            thread: None,
            reader_done: false,
        };
        let big: Arc<str> = Arc::from("x".repeat(MAX_CLIENT_QUEUE_BYTES + 1));
        slot.push(big, 1000);
        assert!(slot.is_open(), "one line over the limit goes to an empty queue");
        assert_eq!(out_rx.try_recv().unwrap().len(), MAX_CLIENT_QUEUE_BYTES + 1);
        slot.queued_bytes.store(0, Ordering::Relaxed); // what the writer does once it is written
        let third: Arc<str> = Arc::from("y".repeat(MAX_CLIENT_QUEUE_BYTES / 3 + 1));
        slot.push(third.clone(), 1000);
        slot.push(third.clone(), 1000);
        assert!(slot.is_open());
        slot.push(third, 1000);
        assert!(!slot.is_open(), "a queue over the byte limit cuts the client off");
        assert_eq!(out_rx.len(), 2);
    }

    /// Issue 11 item 3/4: an `ack` line cannot make the agent queue an ACK carrying an ID
    /// longer than any the cloud sends.
    #[test]
    fn ack_with_an_overlong_msg_id_is_a_bad_request() {
        let id = "i".repeat(crate::router::MAX_MSG_ID_BYTES + 1);
        let line = format!(r#"{{"op":"ack","message":{{"header":{{"msg_id":"{id}"}}}}}}"#);
        let error = parse_request(line.as_bytes()).unwrap_err().error;
        assert!(error.contains("msg_id has 129 bytes"), "{error}");
        let id = "i".repeat(crate::router::MAX_MSG_ID_BYTES);
        let line = format!(r#"{{"op":"ack","message":{{"header":{{"msg_id":"{id}"}}}}}}"#);
        assert!(parse_request(line.as_bytes()).is_ok());
    }

    #[test]
    fn replies_and_events_are_one_json_line_each() {
        let line = error_line(None, bad_request("bad \"x\"\nthing"));
        assert_eq!(
            &*line,
            "{\"ok\":false,\"error\":\"bad \\\"x\\\"\\nthing\",\"kind\":\"bad_request\"}\n"
        );
        let id = RawValue::from_string("7".to_owned()).unwrap();
        let reply = Reply { ok: true, id: Some(&id), object: Some(None), ..Reply::default() };
        assert_eq!(&*to_line(&reply), "{\"ok\":true,\"id\":7,\"object\":null}\n");
        assert_eq!(&*connection_line(true), "{\"event\":\"connection\",\"connected\":true}\n");
        let event = event_line("bus", &msg("user", "router_eventbus", "t"));
        assert!(event.starts_with("{\"event\":\"message\",\"group\":\"bus\",\"message\":{"));
        assert_eq!(event.matches('\n').count(), 1);
    }
}
