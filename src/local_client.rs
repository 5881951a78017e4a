//! The client side of the local API (`modules::local_api` documents the protocol): connect to a
//! running agent's socket, send one command line at a time, read its reply, and read pushed
//! events. Used by `edgehub send`, `subscribe` and `query` (and `query --watch`), and usable from any Rust program on the
//! device. Blocking and single-threaded; events that arrive while a reply is awaited are kept, in
//! order, for [`LocalClient::next_event`].

use crate::error::{ErrorKind, Result};
use crate::modules::local_api::{failure, read_line, Line};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest line read from the agent: an event carries a cloud message (`maxMessageBytes`, 32 MiB
/// by default) plus its framing.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// A connection to the agent's local API.
pub struct LocalClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: Vec<u8>,
    /// Events read while waiting for a reply (at most what the agent had queued before it).
    events: VecDeque<String>,
    /// The agent closed this connection for being idle (the last command was not read).
    idle_closed: bool,
}

/// A reply line, with the fields any op may answer.
#[derive(Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, rename = "msgId")]
    msg_id: Option<String>,
    #[serde(default)]
    connected: Option<bool>,
    #[serde(default)]
    acked: Option<bool>,
    #[serde(default)]
    message: Option<Box<RawValue>>,
    #[serde(default)]
    object: Option<Box<RawValue>>,
    #[serde(default)]
    status: Option<Value>,
}

impl LocalClient {
    /// Connects to the agent listening on `path`.
    ///
    /// # Errors
    /// `Io`, naming the socket, when no agent listens there.
    pub fn connect(path: &Path) -> Result<LocalClient> {
        let stream = UnixStream::connect(path).map_err(|e| {
            ErrorKind::Io
                .msg(format!(
                    "connect to the agent's local api at {} (is `edgehub run` running?)",
                    path.display()
                ))
                .src(e)
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| ErrorKind::Io.msg(format!("clone socket {}", path.display())).src(e))?;
        Ok(LocalClient {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
            line: Vec::new(),
            events: VecDeque::new(),
            idle_closed: false,
        })
    }

    /// Queues `message` (wire JSON) for the cloud; returns its `msg_id`.
    ///
    /// # Errors
    /// `Full` when the agent's outbox is full; `Config` for a malformed message; `Io`/`Closed`
    /// when the agent goes away.
    pub fn send(&mut self, message: &RawValue) -> Result<String> {
        let reply = self.call(&json!({"op": "send", "message": message}))?;
        Ok(reply.msg_id.unwrap_or_default())
    }

    /// Sends `message` and waits for the cloud's response (raw wire JSON). `None` for the agent's
    /// default timeout (`requestTimeout`).
    ///
    /// # Errors
    /// `Timeout` when the cloud did not answer in time; as [`LocalClient::send`] otherwise.
    pub fn request(
        &mut self,
        message: &RawValue,
        timeout: Option<Duration>,
    ) -> Result<Box<RawValue>> {
        let mut request = json!({"op": "request", "message": message});
        if let Some(timeout) = timeout {
            request["timeoutMs"] = json!(timeout.as_millis().max(1) as u64);
        }
        let reply = self.call(&request)?;
        reply.message.ok_or_else(|| self.bad_reply("request reply without a message"))
    }

    /// ACKs a message received in an event; returns whether it needed one.
    pub fn ack(&mut self, message: &RawValue) -> Result<bool> {
        Ok(self.call(&json!({"op": "ack", "message": message}))?.acked.unwrap_or(false))
    }

    /// Subscribes to `groups`; returns whether the agent is connected to the cloud. Events
    /// follow, starting with the current link state.
    pub fn subscribe(&mut self, groups: &[String]) -> Result<bool> {
        Ok(self.call(&json!({"op": "subscribe", "groups": groups}))?.connected.unwrap_or(false))
    }

    /// Looks `resource` up in the agent's store (which may ask the cloud); `None` if absent.
    pub fn query(&mut self, resource: &str) -> Result<Option<Box<RawValue>>> {
        let reply = self.call(&json!({"op": "query", "resource": resource}))?;
        // `"object":null` deserializes as `None`.
        Ok(reply.object.filter(|o| o.get() != "null"))
    }

    /// Follows `resource`: returns it now (as [`LocalClient::query`]), and from then on an
    /// `{"event":"object",…}` comes through [`LocalClient::next_event`] each time the agent finds
    /// it changed. `interval` (how often the agent queries it again; `None`: `localApiWatchInterval`)
    /// is raised to the agent's `localApiMinWatchInterval`.
    ///
    /// # Errors
    /// `Full` when the agent already follows `localApiMaxWatches` objects; `Config` for a bad
    /// resource or interval; as [`LocalClient::query`] otherwise.
    pub fn watch(
        &mut self,
        resource: &str,
        interval: Option<Duration>,
    ) -> Result<Option<Box<RawValue>>> {
        let mut request = json!({"op": "watch", "resource": resource});
        if let Some(interval) = interval {
            request["intervalMs"] = json!(interval.as_millis().max(1) as u64);
        }
        let reply = self.call(&request)?;
        Ok(reply.object.filter(|o| o.get() != "null"))
    }

    /// Stops following `resource`.
    pub fn unwatch(&mut self, resource: &str) -> Result<()> {
        self.call(&json!({"op": "unwatch", "resource": resource})).map(|_| ())
    }

    /// The agent's counters and link state (what `edgehub status` shows).
    pub fn status(&mut self) -> Result<Value> {
        let reply = self.call(&json!({"op": "status"}))?;
        reply.status.ok_or_else(|| self.bad_reply("status reply without a status"))
    }

    /// The next pushed event line (JSON, without the newline), or `None` when the agent closed the
    /// connection.
    pub fn next_event(&mut self) -> Result<Option<String>> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        self.read_line()
    }

    /// True when the next event can be had without waiting (a caller printing events may leave
    /// flushing until there is none).
    pub fn event_ready(&self) -> bool {
        !self.events.is_empty() || self.reader.buffer().contains(&b'\n')
    }

    /// Sends one command and waits for its reply, keeping events read meanwhile. When the agent
    /// had let this connection go for being idle (`localApiIdleTimeout`), the command was never
    /// read: it is sent again once over a new connection.
    fn call(&mut self, request: &Value) -> Result<Reply> {
        match self.call_once(request) {
            Err(e) if self.idle_closed => {
                self.idle_closed = false;
                let fresh = LocalClient::connect(&self.path).map_err(|_| e)?;
                self.reader = fresh.reader;
                self.writer = fresh.writer;
                self.line.clear();
                self.call_once(request)
            }
            result => result,
        }
    }

    fn call_once(&mut self, request: &Value) -> Result<Reply> {
        let mut line = request.to_string();
        line.push('\n');
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            // An agent that refused the connection (all client slots taken) or let it go (idle)
            // wrote why before closing: that says more than "Broken pipe".
            if let Ok(Some(line)) = self.read_line() {
                if let Ok(reply) = serde_json::from_str::<Reply>(&line) {
                    if !reply.ok {
                        return Err(self.failure(&reply));
                    }
                }
            }
            return Err(ErrorKind::Io.msg(format!("write to {}", self.path.display())).src(e));
        }
        loop {
            let Some(line) = self.read_line()? else {
                return Err(ErrorKind::Closed
                    .msg(format!("the agent at {} closed the connection", self.path.display())));
            };
            if line.starts_with("{\"event\"") {
                self.events.push_back(line);
                continue;
            }
            let reply: Reply = serde_json::from_str(&line)
                .map_err(|e| self.bad_reply(&format!("unreadable reply: {e}")))?;
            if reply.ok {
                return Ok(reply);
            }
            return Err(self.failure(&reply));
        }
    }

    /// The error an `ok:false` reply stands for. Notes an idle disconnect, which `call` recovers.
    fn failure(&mut self, reply: &Reply) -> crate::Error {
        if reply.kind.as_deref() == Some(failure::IDLE) {
            self.idle_closed = true;
        }
        let kind = match reply.kind.as_deref() {
            Some(failure::TIMEOUT) => ErrorKind::Timeout,
            Some(failure::FULL) => ErrorKind::Full,
            Some(failure::BAD_REQUEST) => ErrorKind::Config,
            Some(failure::STOPPING) => ErrorKind::Stopped,
            Some(failure::IDLE) => ErrorKind::Closed,
            _ => ErrorKind::Io,
        };
        kind.msg(format!(
            "agent at {}: {}",
            self.path.display(),
            reply.error.as_deref().unwrap_or("failed")
        ))
    }

    fn read_line(&mut self) -> Result<Option<String>> {
        let read = read_line(&mut self.reader, &mut self.line, MAX_LINE_BYTES)
            .map_err(|e| ErrorKind::Io.msg(format!("read from {}", self.path.display())).src(e))?;
        match read {
            Line::Eof => Ok(None),
            Line::TooLong(len) => Err(self.bad_reply(&format!("line of {len} bytes"))),
            Line::Complete => String::from_utf8(std::mem::take(&mut self.line))
                .map(Some)
                .map_err(|_| self.bad_reply("line is not utf-8")),
        }
    }

    fn bad_reply(&self, what: &str) -> crate::Error {
        ErrorKind::Protocol.msg(format!("agent at {}: {what}", self.path.display()))
    }
}
