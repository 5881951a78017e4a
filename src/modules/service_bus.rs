//! ServiceBus (edge-node §3.5): a cloud `router_servicebus` request, resource `<port>:<path>` and
//! content `{header, body (base64), method, url}`, becomes an HTTP/1.1 request to
//! `http://127.0.0.1:<port><path>`; the answer goes back as `{source:"servicebus", group:"user",
//! operation:"upload"}` with `parent_msg_id` = the request's ID and content `{header,
//! status_code, body (base64)}`. Requests run one at a time on `eh-servicebus` (10 s each at most,
//! answers capped at 5 MiB) behind a bounded queue, so the bus thread never waits on a local
//! service. Unlike edgecore, failures are answered too (400, 502, 504 with the reason as body)
//! instead of an unroutable error message, so the cloud caller does not wait for nothing.

use crate::error::{ErrorKind, Result};
use crate::message::{group, operation, Message, Route};
use crate::modules::Hub;
use crossbeam_channel::{bounded, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Cloud source served here.
pub const ROUTER_SERVICEBUS: &str = "router_servicebus";
/// Source of the answers, as edgecore's servicebus.
pub const SOURCE: &str = "servicebus";
/// edgecore's client timeout.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body passed on.
pub const MAX_BODY_BYTES: usize = 5 << 20;
/// Requests waiting for the worker; more are answered 503 at once.
pub const QUEUE_CAP: usize = 64;
const MAX_HEAD_BYTES: usize = 64 << 10;
const STACK_BYTES: usize = 128 << 10;

/// `common/types/http.go` `HTTPRequest`: Go's `http.Header` and a base64 `[]byte` body.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct HttpRequest {
    pub header: BTreeMap<String, Vec<String>>,
    pub body: Option<String>,
    pub method: String,
    pub url: String,
}

/// `HTTPResponse`.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    pub header: BTreeMap<String, Vec<String>>,
    pub status_code: u16,
    pub body: String,
}

/// The worker: `offer` requests, `stop` to finish the one running and join.
pub struct ServiceBus {
    tx: Option<Sender<Message>>,
    thread: Option<JoinHandle<()>>,
    hub: Hub,
}

impl ServiceBus {
    /// # Errors
    /// `Io` when the thread cannot start.
    pub fn start(hub: Hub) -> Result<ServiceBus> {
        let (tx, rx) = bounded::<Message>(QUEUE_CAP);
        let worker_hub = hub.clone();
        let thread = std::thread::Builder::new()
            .name("eh-servicebus".to_owned())
            .stack_size(STACK_BYTES)
            .spawn(move || {
                for msg in rx.iter() {
                    let answer = answer(&msg);
                    if let Err(rejected) = worker_hub.send(answer) {
                        log::warn!("servicebus: answer to {msg:?} dropped: {rejected}");
                    }
                }
            })
            .map_err(|e| ErrorKind::Io.msg("spawn servicebus thread").src(e))?;
        Ok(ServiceBus { tx: Some(tx), thread: Some(thread), hub })
    }

    /// Queues a `router_servicebus` request; when the queue is full it is answered 503 at once.
    pub fn offer(&self, msg: Message) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) | Err(TrySendError::Disconnected(msg)) => {
                log::warn!("servicebus: {QUEUE_CAP} requests waiting; answering {msg:?} with 503");
                let busy = response_message(&msg, error_response(503, "edge servicebus is busy"));
                if let Err(rejected) = self.hub.send(busy) {
                    log::warn!("servicebus: answer to {msg:?} dropped: {rejected}");
                }
            }
        }
    }

    /// Lets the running request finish (at most `HTTP_TIMEOUT`), drops the queued ones, joins.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("bug: servicebus thread panicked");
            }
        }
    }
}

impl Drop for ServiceBus {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The upload message answering `request` with `response`.
pub fn response_message(request: &Message, response: HttpResponse) -> Message {
    let content = serde_json::to_string(&response).unwrap_or_else(|_| "null".to_owned());
    // Cannot fail: serde_json produced the text.
    let content =
        crate::message::json_content(&content).unwrap_or_else(|_| crate::message::text_content(""));
    let mut msg = Message::new(
        Route {
            source: SOURCE.to_owned(),
            group: group::USER.to_owned(),
            operation: operation::UPLOAD.to_owned(),
            resource: String::new(),
            ..Route::default()
        },
        content,
    );
    msg.header.parent_id = request.header.id.clone();
    msg
}

fn error_response(status_code: u16, reason: &str) -> HttpResponse {
    HttpResponse { header: BTreeMap::new(), status_code, body: base64_encode(reason.as_bytes()) }
}

/// Runs the request `msg` describes and builds the answer (never fails: errors are answers).
pub fn answer(msg: &Message) -> Message {
    let response = match call(msg) {
        Ok(response) => response,
        Err((status, reason)) => {
            log::warn!("servicebus: {msg:?}: {reason}");
            error_response(status, &reason)
        }
    };
    response_message(msg, response)
}

fn call(msg: &Message) -> std::result::Result<HttpResponse, (u16, String)> {
    let bad = |why: String| (400, why);
    let (port, path) =
        msg.route.resource.split_once(':').ok_or_else(|| {
            bad(format!("resource {:?} is not <port>:<path>", msg.route.resource))
        })?;
    let port: u16 = port.parse().map_err(|_| bad(format!("port {port:?} is not 1-65535")))?;
    if port == 0 || !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad(format!("resource {:?} is not <port>:/<path>", msg.route.resource)));
    }
    // The content is the request object, or (as some clouds send it) a JSON string holding it.
    let raw = msg.content.get();
    let request: HttpRequest = serde_json::from_str(raw)
        .or_else(|e| match msg.content_text() {
            Some(text) => serde_json::from_str(&text),
            None => Err(e),
        })
        .map_err(|e| bad(format!("content is not an HTTPRequest: {e}")))?;
    let method =
        if request.method.is_empty() { msg.route.operation.clone() } else { request.method };
    let method = method.to_ascii_uppercase();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(bad(format!("method {method:?} is not an HTTP method")));
    }
    let body = match &request.body {
        Some(b) if !b.is_empty() => {
            base64_decode(b).ok_or_else(|| bad("body is not base64".to_owned()))?
        }
        _ => Vec::new(),
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (name, values) in &request.header {
        let lower = name.to_ascii_lowercase();
        if matches!(lower.as_str(), "host" | "connection" | "content-length" | "transfer-encoding")
        {
            continue;
        }
        let clean = |s: &str| !s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
        if name.is_empty() || name.contains(':') || !clean(name) {
            return Err(bad(format!("header name {name:?} is not valid")));
        }
        for value in values {
            if !clean(value) {
                return Err(bad(format!("header {name} has a line break")));
            }
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));

    let deadline = Instant::now() + HTTP_TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let unreachable = |e: std::io::Error| (502, format!("local service 127.0.0.1:{port}: {e}"));
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).map_err(unreachable)?;
    let timed = |e: std::io::Error| {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            (504, format!("local service 127.0.0.1:{port} did not answer within {HTTP_TIMEOUT:?}"))
        } else {
            (502, format!("local service 127.0.0.1:{port}: {e}"))
        }
    };
    let set_timeouts = |s: &TcpStream| {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).and_then(|()| s.set_write_timeout(Some(left)))
    };
    set_timeouts(&stream).map_err(timed)?;
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body)).map_err(timed)?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    // With a Content-Length the answer is complete before EOF (a server may keep the connection).
    // `None`: head not complete yet; `Some(None)`: no length, read to EOF.
    let mut complete_at: Option<Option<usize>> = None;
    loop {
        set_timeouts(&stream).map_err(timed)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed(e)),
        }
        if raw.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES + (64 << 10) {
            return Err((
                502,
                format!("answer of 127.0.0.1:{port} is over {MAX_BODY_BYTES} bytes"),
            ));
        }
        if Instant::now() >= deadline {
            return Err(timed(std::io::ErrorKind::TimedOut.into()));
        }
        if complete_at.is_none() {
            complete_at = expected_length(&raw);
        }
        if complete_at.flatten().is_some_and(|total| raw.len() >= total) {
            break;
        }
    }
    match parse_response(&raw, true) {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err((502, format!("answer of 127.0.0.1:{port} ended early"))),
        Err(why) => Err((502, format!("answer of 127.0.0.1:{port}: {why}"))),
    }
}

/// Parses an HTTP/1.1 answer. `Ok(None)`: incomplete (with `at_eof`, a body without a length
/// ends at EOF).
fn parse_response(raw: &[u8], at_eof: bool) -> std::result::Result<Option<HttpResponse>, String> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        if raw.len() > MAX_HEAD_BYTES {
            return Err("header over 64 KiB".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let status_code: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|c| (100..=999).contains(c))
        .ok_or_else(|| format!("status line {status_line:?}"))?;
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?}"));
    }
    let mut header: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("header line {line:?}"));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(value.parse::<usize>().map_err(|_| "bad Content-Length")?);
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
        header.entry(canonical_header(name.trim())).or_default().push(value.to_owned());
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        match dechunk(rest)? {
            Some(body) => body,
            None if at_eof => return Err("chunked body ended early".into()),
            None => return Ok(None),
        }
    } else if let Some(len) = length {
        if len > MAX_BODY_BYTES {
            return Err(format!("body of {len} bytes is over {MAX_BODY_BYTES}"));
        }
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if at_eof || status_code == 204 || status_code == 304 {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    if body.len() > MAX_BODY_BYTES {
        return Err(format!("body over {MAX_BODY_BYTES} bytes"));
    }
    header.remove("Transfer-Encoding");
    Ok(Some(HttpResponse { header, status_code, body: base64_encode(&body) }))
}

/// `None` until the head has arrived; then the whole answer's length when the head names a
/// Content-Length (and no chunked encoding), else `Some(None)` (read to EOF).
fn expected_length(raw: &[u8]) -> Option<Option<usize>> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let Ok(head) = std::str::from_utf8(&raw[..head_end]) else { return Some(None) };
    let mut length = None;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { return Some(None) };
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => return Some(None),
            "content-length" => length = value.trim().parse::<usize>().ok(),
            _ => {}
        }
    }
    Some(length.map(|len| head_end + 4 + len))
}

/// A chunked body: `Ok(None)` when the last chunk has not arrived.
fn dechunk(mut raw: &[u8]) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| "chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "chunk size")?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if body.len() + size > MAX_BODY_BYTES {
            return Err(format!("body over {MAX_BODY_BYTES} bytes"));
        }
        if raw.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Go's `http.CanonicalHeaderKey`: `content-type` → `Content-Type`.
fn canonical_header(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Standard base64 with padding, as Go marshals `[]byte` (OpenSSL's encoder).
pub fn base64_encode(bytes: &[u8]) -> String {
    openssl::base64::encode_block(bytes)
}

/// Decodes standard base64 (padding optional); `None` for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    // OpenSSL wants whole 4-symbol groups, trims outer whitespace and takes '=' inside the
    // text: refuse those here, as Go does.
    if text.len() % 4 == 1 || text.contains(|c: char| c == '=' || c.is_ascii_whitespace()) {
        return None;
    }
    let mut padded = String::with_capacity(text.len() + 3);
    padded.push_str(text);
    while padded.len() % 4 != 0 {
        padded.push('=');
    }
    openssl::base64::decode_block(&padded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_like_go() {
        for (plain, encoded) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg==")]
        {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert!(base64_decode("Z").is_none());
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Zg==Zm9v").is_none());
        assert!(base64_decode(" Zm9v").is_none());
        assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
    }

    #[test]
    fn answers_parse_with_a_length_chunked_or_to_eof() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status_code, r.body.as_str()), (200, "aGk="));
        assert_eq!(r.header["Content-Type"], vec!["text/plain".to_owned()]);
        let chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n1\r\n!\r\n0\r\n\r\n";
        let r = parse_response(chunked, false).unwrap().unwrap();
        assert_eq!((r.status_code, base64_decode(&r.body).unwrap()), (201, b"hi!".to_vec()));
        assert!(!r.header.contains_key("Transfer-Encoding"));
        assert_eq!(parse_response(b"HTTP/1.0 200 OK\r\n\r\nabc", false), Ok(None));
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nabc", true).unwrap().unwrap();
        assert_eq!(base64_decode(&r.body).unwrap(), b"abc");
        assert!(parse_response(b"SMTP 220\r\n\r\n", true).is_err());
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", true),
            Ok(None)
        );
    }
}
