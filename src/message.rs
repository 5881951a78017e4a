//! The wire message of KubeEdge's CloudHub protocol (protocol §1): its exact JSON keys and omission
//! rules, encode/decode, the group and operation names, and the helpers that build responses and ACKs.
//! Pure data: no I/O, no channels, no threads, so it can be tested and fuzzed on its own.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::cell::Cell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wire groups (protocol §1.5, HEAD adds `taskmanager`).
pub mod group {
    pub const RESOURCE: &str = "resource";
    pub const FUNC: &str = "func";
    pub const TWIN: &str = "twin";
    pub const USER: &str = "user";
    pub const TASK_MANAGER: &str = "taskmanager";
}

/// Operations the edge itself reads or writes.
pub mod operation {
    pub const INSERT: &str = "insert";
    pub const UPDATE: &str = "update";
    pub const DELETE: &str = "delete";
    pub const QUERY: &str = "query";
    pub const UPLOAD: &str = "upload";
    pub const RESPONSE: &str = "response";
    pub const ERROR: &str = "error";
    pub const KEEPALIVE: &str = "keepalive";
    pub const CONNECT: &str = "connect";
    /// viaduct control operations, answered by the connection itself (protocol §2.8).
    pub const CONTROL_CONFIG: &str = "config";
    pub const CONTROL_PING: &str = "ping";
    pub const CONTROL_PONG: &str = "pong";
}

/// EdgeHub's module name on the edge bus and the `source` of its keepalive (protocol §1.5).
pub const EDGEHUB_MODULE: &str = "websocket";
/// Content of a successful response or ACK.
pub const CONTENT_OK: &str = "OK";
/// Content of the answer to a viaduct control operation.
pub const CONTENT_CONTROL_ACK: &str = "ack";
/// Contents of the local connection events (protocol §3.3).
pub const CLOUD_CONNECTED: &str = "cloud_connected";
pub const CLOUD_DISCONNECTED: &str = "cloud_disconnected";
/// Resource of the local connection events.
pub const CONNECTION_RESOURCE: &str = "node/connection";

/// Longest `resource` an ACK or control answer copies from the message it answers (a KubeEdge
/// resource `<ns>/<type>/<name>` is at most about 330 bytes).
pub const MAX_REPLY_RESOURCE_BYTES: usize = 1024;
/// Longest `source`, `group` or `type` an ACK or control answer copies (KubeEdge's are module and
/// group names such as `edgecontroller`).
pub const MAX_REPLY_FIELD_BYTES: usize = 128;

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `header` of a wire message. Key order and `omitempty` follow Go's `model.MessageHeader`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always emitted, even when empty.
    #[serde(rename = "msg_id", default)]
    pub id: String,
    /// Present only on responses; its presence marks the message as one (protocol §3.5).
    #[serde(rename = "parent_msg_id", default, skip_serializing_if = "String::is_empty")]
    pub parent_id: String,
    /// Milliseconds since the Unix epoch. Always emitted.
    #[serde(default)]
    pub timestamp: i64,
    /// Decimal Kubernetes resourceVersion; drives the cloud's reliable delivery (protocol §4.4).
    #[serde(rename = "resourceversion", default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// Beehive context type; normally absent.
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub message_type: String,
    // `sync` is a bus-only flag that must never be true on the wire (protocol §1.1): it is read
    // and dropped, and never written.
}

/// `route` of a wire message. Missing and empty strings are the same thing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub destination: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operation: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
}

/// One CloudHub message. `content` is kept as the raw JSON text it arrived as, so it is forwarded
/// byte for byte (a Go `[]byte` is a base64 string, twin payloads are JSON inside a string: both
/// must survive untouched, protocol §1.3).
#[derive(Clone, Serialize, Deserialize)]
pub struct Message {
    #[serde(default)]
    pub header: Header,
    #[serde(rename = "route", default)]
    pub route: Route,
    #[serde(default = "null_content")]
    pub content: Box<RawValue>,
}

fn null_content() -> Box<RawValue> {
    raw_json("null")
}

/// Wraps JSON text known to be valid (a literal in this crate, or the output of serde_json).
fn raw_json(text: &str) -> Box<RawValue> {
    // Cannot fail: every caller passes valid JSON text.
    RawValue::from_string(text.to_owned()).unwrap_or_else(|_| unreachable_null())
}

#[cold]
fn unreachable_null() -> Box<RawValue> {
    // `null` is valid JSON; from_string only fails on invalid JSON.
    serde_json::from_str("null").unwrap_or_else(|_| unreachable!("null is valid json"))
}

/// Why a frame could not be read as a message.
#[derive(Debug)]
pub enum DecodeError {
    /// The frame holds no JSON value at all (Go's `io.ErrUnexpectedEOF`).
    Empty,
    /// Not JSON, or JSON of the wrong shape; names the field where serde could.
    Json(serde_json::Error),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => f.write_str("empty frame"),
            DecodeError::Json(e) => write!(f, "malformed message json: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Empty => None,
            DecodeError::Json(e) => Some(e),
        }
    }
}

impl Message {
    /// A fresh message: new UUID v4, timestamp now, the given route and JSON content.
    pub fn new(route: Route, content: Box<RawValue>) -> Message {
        Message {
            header: Header { id: new_uuid(), timestamp: now_millis(), ..Header::default() },
            route,
            content,
        }
    }

    /// A fresh message whose content is the JSON string `text`.
    pub fn with_text(route: Route, text: &str) -> Message {
        Message::new(route, text_content(text))
    }

    /// Decodes the first JSON value of a text or binary frame. Trailing bytes (Go's `\n`) are
    /// ignored, as gorilla's `ReadJSON` does.
    pub fn decode(frame: &[u8]) -> Result<Message, DecodeError> {
        let mut values = serde_json::Deserializer::from_slice(frame).into_iter::<Message>();
        match values.next() {
            None => Err(DecodeError::Empty),
            Some(Err(e)) => Err(DecodeError::Json(e)),
            Some(Ok(msg)) => Ok(msg),
        }
    }

    /// Encodes as compact JSON followed by `\n`, exactly like gorilla's `WriteJSON`.
    pub fn encode(&self) -> String {
        // Sized up front from the fields, so the text is written into one allocation instead of
        // growing from serde_json's 128 bytes by doubling (issue 14).
        let mut bytes = Vec::with_capacity(self.encoded_len_hint() + 16);
        // Cannot fail: every field is a string, an integer or already valid raw JSON, and
        // writing to a Vec does not fail.
        if serde_json::to_writer(&mut bytes, self).is_err() {
            bytes.clear();
        }
        bytes.push(b'\n');
        // serde_json writes valid UTF-8; the lossy path is never taken.
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// Approximate encoded size in bytes, for queue accounting.
    pub fn encoded_len_hint(&self) -> usize {
        let h = &self.header;
        let r = &self.route;
        120 + h.id.len()
            + h.parent_id.len()
            + h.resource_version.len()
            + h.message_type.len()
            + r.source.len()
            + r.destination.len()
            + r.group.len()
            + r.operation.len()
            + r.resource.len()
            + self.content.get().len()
    }

    /// True when this message answers another (`parent_msg_id` set).
    pub fn is_response(&self) -> bool {
        !self.header.parent_id.is_empty()
    }

    /// True for a message the cloud delivers through its ACK queue and re-sends until acknowledged:
    /// it carries a resourceversion, or it is a delete in group `resource` (protocol §4.4, §9.5).
    pub fn needs_ack(&self) -> bool {
        !self.header.resource_version.is_empty()
            || (self.route.operation == operation::DELETE && self.route.group == group::RESOURCE)
    }

    /// True for viaduct's connection-level control operations (protocol §2.8).
    pub fn is_control(&self) -> bool {
        matches!(
            self.route.operation.as_str(),
            operation::CONTROL_CONFIG | operation::CONTROL_PING | operation::CONTROL_PONG
        )
    }

    /// The content as a JSON string value, if it is one.
    pub fn content_text(&self) -> Option<String> {
        serde_json::from_str::<String>(self.content.get()).ok()
    }

    /// Builds the answer to `self` the way Go's `NewRespByMessage` does: new ID, `parent_msg_id` =
    /// our ID, source, group, resource and type copied, operation `response`.
    pub fn response_to(&self, content: Box<RawValue>) -> Message {
        self.reply(content, usize::MAX, usize::MAX)
    }

    /// The ACK CloudHub expects for an ack-queue message: a response with content `"OK"` (§4.5),
    /// its copied fields cut as [`Message::bounded_reply`] says.
    pub fn ack(&self) -> Message {
        self.bounded_reply(text_content(CONTENT_OK))
    }

    /// The answer to a viaduct control operation: a response with content `"ack"` (§2.8), its
    /// copied fields cut as [`Message::bounded_reply`] says.
    pub fn control_ack(&self) -> Message {
        self.bounded_reply(text_content(CONTENT_CONTROL_ACK))
    }

    /// [`Message::response_to`] for the answers the agent makes by itself (ACKs, control
    /// answers), which the cloud could otherwise inflate: the copied `resource` is cut to
    /// [`MAX_REPLY_RESOURCE_BYTES`] and `source`, `group` and `type` to [`MAX_REPLY_FIELD_BYTES`].
    /// CloudHub matches an ACK on `operation` and `parent_msg_id` alone (§4.5), and looks at the
    /// resource only for its CSI prefix `<ns>/volume/<name>` (§4.2), which the cut keeps; real
    /// KubeEdge fields are far shorter than these limits, so a normal ACK is never changed.
    pub fn bounded_reply(&self, content: Box<RawValue>) -> Message {
        self.reply(content, MAX_REPLY_FIELD_BYTES, MAX_REPLY_RESOURCE_BYTES)
    }

    /// A response to this message, its copied fields cut to `field_max` and its resource to
    /// `resource_max` bytes.
    fn reply(&self, content: Box<RawValue>, field_max: usize, resource_max: usize) -> Message {
        Message {
            header: Header {
                id: new_uuid(),
                parent_id: self.header.id.clone(),
                timestamp: now_millis(),
                resource_version: String::new(),
                message_type: cut(&self.header.message_type, field_max).to_owned(),
            },
            route: Route {
                source: cut(&self.route.source, field_max).to_owned(),
                destination: String::new(),
                group: cut(&self.route.group, field_max).to_owned(),
                operation: operation::RESPONSE.to_owned(),
                resource: cut(&self.route.resource, resource_max).to_owned(),
            },
            content,
        }
    }

    /// The exact keepalive of protocol §1.6 A.
    pub fn keepalive() -> Message {
        Message::with_text(
            Route {
                source: EDGEHUB_MODULE.to_owned(),
                group: group::RESOURCE.to_owned(),
                operation: operation::KEEPALIVE.to_owned(),
                resource: "node".to_owned(),
                ..Route::default()
            },
            "ping",
        )
    }

    /// The local connection event sent to every module (protocol §3.3); never on the wire.
    pub fn connection_event(group: &str, connected: bool) -> Message {
        Message::with_text(
            Route {
                source: "edgehub".to_owned(),
                group: group.to_owned(),
                operation: operation::CONNECT.to_owned(),
                resource: CONNECTION_RESOURCE.to_owned(),
                ..Route::default()
            },
            if connected { CLOUD_CONNECTED } else { CLOUD_DISCONNECTED },
        )
    }
}

impl fmt::Debug for Message {
    /// Short form for logs: route and IDs, never the content (it may hold secrets). Every field
    /// comes from the cloud or a local client, so each is escaped and cut by `logging::shown`:
    /// an ID with a newline cannot forge a log line, a 2 MB resource makes no 2 MB line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::logging::shown;
        write!(
            f,
            "{}/{} {} {:?} id={}",
            shown(&self.route.source),
            shown(&self.route.group),
            shown(&self.route.operation),
            shown(&self.route.resource),
            shown(&self.header.id)
        )?;
        if !self.header.parent_id.is_empty() {
            write!(f, " parent={}", shown(&self.header.parent_id))?;
        }
        if !self.header.resource_version.is_empty() {
            write!(f, " rv={}", shown(&self.header.resource_version))?;
        }
        Ok(())
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Message) -> bool {
        self.header == other.header
            && self.route == other.route
            && self.content.get() == other.content.get()
    }
}

/// JSON string content holding `text`.
pub fn text_content(text: &str) -> Box<RawValue> {
    // Cannot fail: serializing a &str always succeeds.
    raw_json(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned()))
}

/// Raw JSON content from text that must be a valid JSON value.
pub fn json_content(text: &str) -> Result<Box<RawValue>, serde_json::Error> {
    RawValue::from_string(text.to_owned())
}

/// Milliseconds since the Unix epoch (protocol §1.1: `timestamp` is in ms).
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A random UUID v4 in lowercase hex, as Go's `uuid.New().String()` writes it.
///
/// IDs only need to be unique, not secret: a process-wide random seed (from std's `RandomState`)
/// mixed with a counter through splitmix64 gives that without a `rand` dependency.
pub fn new_uuid() -> String {
    let hi = random_u64();
    let lo = random_u64();
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant

    // One allocation and a table lookup per nibble: `format!` per byte was 16 allocations and a
    // tenth of the sending thread's CPU at 10k messages/s (scripts/bench.sh, issue 14).
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        id.push(char::from(DIGITS[usize::from(x >> 4)]));
        id.push(char::from(DIGITS[usize::from(x & 0x0f)]));
    }
    id
}

/// A pseudo-random u64 (splitmix64 over a per-thread random seed and counter). Not for
/// cryptography. Per-thread state needs no 64-bit atomics, which 32-bit MIPS lacks.
pub fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(thread_seed());
    }
    let n = STATE.with(|state| {
        let n = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(n);
        n
    });
    let mut z = n;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random start for a thread's sequence: std's `RandomState` keys are random per thread, mixed
/// with the time and process ID.
fn thread_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const B1: &str = r#"{"header":{"msg_id":"a1b2c3d4-0000-4a7e-9c1d-2f5e8b7a6c01","timestamp":1645000001000,"resourceversion":"482913"},"route":{"source":"edgecontroller","group":"resource","operation":"insert","resource":"default/pod/nginx-7c5b9d"},"content":{"metadata":{"name":"nginx-7c5b9d","namespace":"default","uid":"5f1c0e7e-1111-4c2b-a8a0-1d2e3f405060","resourceVersion":"482913","creationTimestamp":"2022-02-16T08:00:00Z","labels":{"app":"nginx"}},"spec":{"containers":[{"name":"nginx","image":"nginx:1.21","resources":{}}],"nodeName":"edge-node-1"},"status":{"phase":"Pending","qosClass":"BestEffort"}}}"#;
    const B2: &str = r#"{"header":{"msg_id":"e7d1aa90-4b3c-4d2e-8f10-9a8b7c6d5e4f","parent_msg_id":"a1b2c3d4-0000-4a7e-9c1d-2f5e8b7a6c01","timestamp":1645000001042},"route":{"source":"edgecontroller","group":"resource","operation":"response","resource":"default/pod/nginx-7c5b9d"},"content":"OK"}"#;
    const A: &str = r#"{"header":{"msg_id":"3f0d2c1e-9a4b-4c55-8e0a-6b1f2d7c9e10","timestamp":1645000000123},"route":{"source":"websocket","group":"resource","operation":"keepalive","resource":"node"},"content":"ping"}"#;
    const D1: &str = r#"{"header":{"msg_id":"8f0c1d2e-3b4a-4f5e-8d7c-6b5a4f3e2d1c","timestamp":1645000020000},"route":{"source":"edged","group":"meta","operation":"query","resource":"default/configmap/app-cfg"},"content":null}"#;
    const D2: &str = r#"{"header":{"msg_id":"c1d2e3f4-5a6b-4c7d-8e9f-0a1b2c3d4e5f","parent_msg_id":"8f0c1d2e-3b4a-4f5e-8d7c-6b5a4f3e2d1c","timestamp":1645000020150,"resourceversion":"4711"},"route":{"source":"edgecontroller","group":"resource","operation":"response","resource":"default/configmap/app-cfg"},"content":{"metadata":{"name":"app-cfg","namespace":"default","uid":"9a8b7c6d-1e2f-4a3b-8c4d-5e6f7a8b9c0d","resourceVersion":"4711"},"data":{"LOG_LEVEL":"info"}}}"#;

    #[test]
    fn examples_round_trip_byte_for_byte() {
        for example in [A, B1, B2, D1, D2] {
            let msg = Message::decode(example.as_bytes()).unwrap();
            assert_eq!(msg.encode(), format!("{example}\n"));
        }
    }

    #[test]
    fn go_frame_with_trailing_newline_and_escapes_keeps_content_verbatim() {
        let frame = "{\"header\":{\"msg_id\":\"x\",\"timestamp\":1},\"route\":{\"group\":\"user\"},\"content\":\"a \\u003cb\\u003e \\u0026\"}\n";
        let msg = Message::decode(frame.as_bytes()).unwrap();
        assert_eq!(msg.content.get(), r#""a \u003cb\u003e \u0026""#);
        assert_eq!(msg.content_text().unwrap(), "a <b> &");
        assert_eq!(msg.encode(), frame);
    }

    #[test]
    fn sync_is_read_but_never_written_and_unknown_keys_are_ignored() {
        let frame = r#"{"header":{"msg_id":"x","timestamp":5,"sync":true,"extra":1},"route":{"group":"twin","Other":"y"},"content":{"k":[1,2]},"more":0}"#;
        let msg = Message::decode(frame.as_bytes()).unwrap();
        let out = msg.encode();
        assert!(!out.contains("sync"), "{out}");
        assert_eq!(out, "{\"header\":{\"msg_id\":\"x\",\"timestamp\":5},\"route\":{\"group\":\"twin\"},\"content\":{\"k\":[1,2]}}\n");
    }

    #[test]
    fn missing_fields_default_and_content_null_is_emitted() {
        let msg = Message::decode(br#"{"header":{},"route":{}}"#).unwrap();
        assert_eq!(
            msg.encode(),
            "{\"header\":{\"msg_id\":\"\",\"timestamp\":0},\"route\":{},\"content\":null}\n"
        );
    }

    #[test]
    fn base64_and_double_encoded_content_survive() {
        let frame = r#"{"header":{"msg_id":"x","timestamp":1},"route":{},"content":{"body":"aGVsbG8=","twin":"{\"a\":1}"}}"#;
        let msg = Message::decode(frame.as_bytes()).unwrap();
        assert_eq!(msg.content.get(), r#"{"body":"aGVsbG8=","twin":"{\"a\":1}"}"#);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(Message::decode(b""), Err(DecodeError::Empty)));
        assert!(matches!(Message::decode(b"  \n"), Err(DecodeError::Empty)));
        assert!(Message::decode(b"{not json").is_err());
        assert!(Message::decode(b"[1,2]").is_err());
        assert!(Message::decode(br#"{"header":{"timestamp":"soon"}}"#).is_err());
        assert!(Message::decode(&[0xff, 0xfe, 0x00]).is_err());
        let deep = "[".repeat(100_000);
        assert!(Message::decode(format!("{{\"content\":{deep}").as_bytes()).is_err());
    }

    #[test]
    fn ack_follows_new_resp_by_message() {
        let b1 = Message::decode(B1.as_bytes()).unwrap();
        assert!(b1.needs_ack());
        let ack = b1.ack();
        assert_eq!(ack.header.parent_id, b1.header.id);
        assert_eq!(ack.route.source, "edgecontroller");
        assert_eq!(ack.route.group, "resource");
        assert_eq!(ack.route.operation, "response");
        assert_eq!(ack.route.resource, "default/pod/nginx-7c5b9d");
        assert_eq!(ack.content.get(), "\"OK\"");
        assert!(ack.header.resource_version.is_empty());
        assert_ne!(ack.header.id, b1.header.id);
    }

    #[test]
    fn keepalive_matches_example_a_shape() {
        let k = Message::keepalive();
        let v: serde_json::Value = serde_json::from_str(&k.encode()).unwrap();
        let a: serde_json::Value = serde_json::from_str(A).unwrap();
        assert_eq!(v["route"], a["route"]);
        assert_eq!(v["content"], a["content"]);
        assert!(v["header"]["timestamp"].as_i64().unwrap() > 1_600_000_000_000);
        assert!(v["header"].get("parent_msg_id").is_none());
    }

    #[test]
    fn uuids_are_v4_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = new_uuid();
            assert_eq!(id.len(), 36);
            assert_eq!(&id[14..15], "4");
            assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
            assert!(id
                .chars()
                .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn uuids_from_many_threads_do_not_collide() {
        let ids: Vec<Vec<String>> = (0..8)
            .map(|_| std::thread::spawn(|| (0..2_000).map(|_| new_uuid()).collect()))
            .map(|t| t.join().unwrap())
            .collect();
        let all: std::collections::HashSet<_> = ids.iter().flatten().collect();
        assert_eq!(all.len(), 16_000);
    }

    #[test]
    fn delete_in_resource_group_needs_ack_even_without_version() {
        let m = Message::decode(br#"{"header":{"msg_id":"x"},"route":{"group":"resource","operation":"delete","resource":"default/pod/p"}}"#).unwrap();
        assert!(m.needs_ack());
        let t = Message::decode(
            br#"{"header":{"msg_id":"x"},"route":{"group":"twin","operation":"update"}}"#,
        )
        .unwrap();
        assert!(!t.needs_ack());
    }

    /// Issue 11 item 3: an ACK or control answer copies at most the bounded fields, so a cloud
    /// cannot make each reply megabytes long; a normal ACK is exactly Go's `NewRespByMessage`.
    #[test]
    fn replies_copy_bounded_fields_and_normal_acks_are_untouched() {
        let b1 = Message::decode(B1.as_bytes()).unwrap();
        let ack = b1.ack();
        let full = b1.response_to(text_content(CONTENT_OK));
        assert_eq!((&ack.route, &ack.header.parent_id), (&full.route, &full.header.parent_id));
        assert_eq!(ack.header.message_type, full.header.message_type);

        let mut huge = b1.clone();
        huge.route.resource = format!("ns/volume/{}", "r".repeat(4 << 20));
        huge.route.source = "s".repeat(4 << 20);
        huge.route.group = "g".repeat(4 << 20);
        huge.header.message_type = "t".repeat(4 << 20);
        huge.route.operation = operation::CONTROL_PING.to_owned();
        for reply in [huge.ack(), huge.control_ack()] {
            assert_eq!(reply.header.parent_id, b1.header.id, "the ACK still matches");
            assert_eq!(reply.route.operation, operation::RESPONSE);
            assert_eq!(reply.route.resource.len(), MAX_REPLY_RESOURCE_BYTES);
            assert!(reply.route.resource.starts_with("ns/volume/r"), "the CSI prefix is kept");
            assert_eq!(reply.route.source.len(), MAX_REPLY_FIELD_BYTES);
            assert_eq!(reply.route.group.len(), MAX_REPLY_FIELD_BYTES);
            assert_eq!(reply.header.message_type.len(), MAX_REPLY_FIELD_BYTES);
            assert!(reply.encoded_len_hint() < 2 * MAX_REPLY_RESOURCE_BYTES);
        }
    }

    #[test]
    fn cut_ends_on_a_character_boundary() {
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abc", 2), "ab");
        assert_eq!(cut("aé", 2), "a", "é is two bytes");
        assert_eq!(cut("", 0), "");
    }
}
