//! The small HTTPS client the certificate flow needs (protocol §5.2, §5.4), and nothing more: one
//! request per connection (`Connection: close`), HTTP/1.1 written by hand over a native-tls
//! stream, one deadline over the whole exchange (connect, handshake, request, response), a request
//! body sent with `Content-Length` (CloudHub's `/edge.crt` is a GET *with* a body), and a response
//! body capped at [`MAX_BODY_BYTES`] read by `Content-Length`, chunked encoding or to the end of the
//! stream. Any status other than 200 is an error that quotes the status and the body text.
//!
//! It knows nothing of certificates or tokens: the caller brings the TLS connector (which decides
//! what the server is trusted by and which client certificate is shown) and the headers. Header
//! values are never logged, so an `Authorization` header cannot leak (ureq's redaction).
//!
//! Whoever answers `httpServer` during a join is not trusted yet (the CA is checked against the
//! token only once `/ca.crt` has arrived), so every size is bounded before anything is buffered:
//! chunk sizes with checked arithmetic, and the bytes of a whole response. Written by hand
//! rather than with `ureq` (issue 11): ureq 2.12 on native-tls added 306 KB to a stripped
//! x86_64 release binary (url and idna's Unicode tables), more than this file's job is worth, and
//! it offers no way for another thread to cancel a request in flight ([`Abort`]).

use crate::error::{Error, ErrorKind, Result};
use crate::logging::shown;
use native_tls::{HandshakeError, TlsConnector, TlsStream};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Largest response body accepted (HEAD's `constants.MaxRespBodyLength`, protocol §5.2).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Status line plus headers; CloudHub's are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 << 10;
/// Hard cap on the bytes read for one response, framing included: a chunked body of many tiny
/// chunks with long extensions stays under [`MAX_BODY_BYTES`] of body while its wire bytes (which
/// are buffered) would not.
const MAX_RESPONSE_BYTES: usize = MAX_HEAD_BYTES + 2 * MAX_BODY_BYTES;
/// A chunk size line's hex digits: 16 fill a u64, and nothing under the body cap needs more than 6.
const MAX_CHUNK_SIZE_DIGITS: usize = 16;
/// How much of an error body is quoted in the error text.
const MAX_QUOTED_BODY: usize = 512;
/// Bytes read per call.
const READ_CHUNK_BYTES: usize = 8 << 10;
/// A connect is tried in slices of this, checking for an abort in between: a connect cannot be
/// woken from outside, and a stop must not wait for a black-holed server's full timeout.
const CONNECT_SLICE: Duration = Duration::from_secs(1);

/// `https://host[:port][/prefix]`: edgecore's `httpServer` (protocol §6). Paths are appended to
/// the prefix, as edgecore concatenates them (§5.1); a trailing slash is dropped so that
/// concatenation cannot produce `//ca.crt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl {
    host: String,
    port: u16,
    prefix: String,
}

impl BaseUrl {
    /// # Errors
    /// `Config` naming `httpServer` and what is wrong with it.
    pub fn parse(text: &str) -> Result<BaseUrl> {
        let bad = |why: &str| {
            Err(ErrorKind::Config
                .msg(format!("httpServer: {text:?} {why} (expected https://host:port)")))
        };
        let Some(rest) = text.strip_prefix("https://") else {
            return bad("does not start with https://");
        };
        let (authority, prefix) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) || prefix.contains(' ')
        {
            return bad("is malformed");
        }
        // `[v6]:port`, `[v6]`, `host:port` or `host`.
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            match v6.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, port)) => match port.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return bad("has text after the IPv6 address"),
                },
                None => return bad("has unbalanced brackets"),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return bad("has an invalid port"),
            },
        };
        if host.is_empty() {
            return bad("has no host");
        }
        Ok(BaseUrl { host: host.to_owned(), port, prefix: prefix.to_owned() })
    }

    /// The host as TLS verifies it (no brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `host:port`, with brackets around an IPv6 host: for the `Host` header and dialling.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The full URL of `path` (which starts with `/`), for messages.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}{path}", self.authority(), self.prefix)
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}{}", self.authority(), self.prefix)
    }
}

/// Stops a request in flight from another thread: `fire` marks it and shuts down the socket a
/// request registered, which wakes any blocking read or write at once (the nudge `link` uses).
/// Once fired, every request made with it fails with `Stopped`.
#[derive(Clone, Debug, Default)]
pub struct Abort {
    state: Arc<AbortState>,
}

#[derive(Debug, Default)]
struct AbortState {
    fired: AtomicBool,
    socket: Mutex<Option<TcpStream>>,
}

impl Abort {
    pub fn new() -> Abort {
        Abort::default()
    }

    pub fn fire(&self) {
        let socket = self.state.socket.lock().unwrap_or_else(PoisonError::into_inner);
        self.state.fired.store(true, Ordering::SeqCst);
        if let Some(socket) = socket.as_ref() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    pub fn is_fired(&self) -> bool {
        self.state.fired.load(Ordering::SeqCst)
    }

    /// Remembers the socket of the request in flight. Checking the flag under the same lock that
    /// `fire` takes means a fire can never fall between the check and the registration.
    fn register(&self, tcp: &TcpStream) -> Result<()> {
        let mut slot = self.state.socket.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_fired() {
            return Err(ErrorKind::Stopped.msg("certificate request cancelled"));
        }
        *slot = Some(tcp.try_clone().map_err(|e| ErrorKind::Io.msg("clone socket").src(e))?);
        Ok(())
    }

    fn unregister(&self) {
        *self.state.socket.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// One request: `GET <prefix><path>` with these extra headers and body.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub path: &'a str,
    /// Extra headers. Their values are never logged or quoted in errors.
    pub headers: &'a [(&'a str, &'a str)],
    /// Sent with `Content-Length` when not empty.
    pub body: &'a [u8],
}

/// Sends `request` to `base` over a TLS connection made by `tls`, all within `timeout`, and
/// returns the body of a 200 response (possibly empty: callers decide what an empty body means).
///
/// # Errors
/// - `Handshake`: resolve or connect failed, or the status is not 200 (the text names the URL,
///   the status and the body);
/// - `Tls`: the TLS handshake failed (untrusted server, refused client certificate);
/// - `Timeout`: the deadline passed; `Stopped`: `abort` fired;
/// - `Protocol`: the response is not HTTP/1.x, or its head or body is over the limits.
pub fn get(
    base: &BaseUrl,
    request: Request<'_>,
    tls: &TlsConnector,
    timeout: Duration,
    abort: &Abort,
) -> Result<Vec<u8>> {
    let url = base.url(request.path);
    log::debug!("certificate request: GET {url} ({} byte body)", request.body.len());
    let deadline = Instant::now() + timeout;
    let tcp = dial(base, deadline, &url, abort)?;
    abort.register(&tcp)?;
    let result = exchange(base, request, tls, tcp, deadline, &url);
    abort.unregister();
    match result {
        Err(_) if abort.is_fired() => Err(ErrorKind::Stopped.msg(format!("GET {url} cancelled"))),
        Err(e) => Err(e),
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(ErrorKind::Handshake.msg(format!(
            "GET {url}: HTTP {status} {}: {}",
            reason_phrase(status),
            quote_body(&body)
        ))),
    }
}

fn dial(base: &BaseUrl, deadline: Instant, url: &str, abort: &Abort) -> Result<TcpStream> {
    let authority = base.authority();
    let addrs = (base.host.as_str(), base.port)
        .to_socket_addrs()
        .map_err(|e| ErrorKind::Handshake.msg(format!("resolve {authority} for {url}")).src(e))?;
    let mut last = ErrorKind::Handshake.msg(format!("resolve {authority}: no addresses"));
    for addr in addrs {
        loop {
            if abort.is_fired() {
                return Err(ErrorKind::Stopped.msg(format!("GET {url} cancelled")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::Timeout.msg(format!("connect {addr} for {url}")));
            }
            match TcpStream::connect_timeout(&addr, left.min(CONNECT_SLICE)) {
                Ok(tcp) => return Ok(tcp),
                Err(e) if e.kind() == io::ErrorKind::TimedOut && left > CONNECT_SLICE => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    last = ErrorKind::Timeout.msg(format!("connect {addr} for {url}")).src(e);
                    break;
                }
                Err(e) => {
                    last = ErrorKind::Handshake.msg(format!("connect {addr} for {url}")).src(e);
                    break;
                }
            }
        }
    }
    Err(last)
}

/// TLS handshake, request, response: returns the status and the body.
fn exchange(
    base: &BaseUrl,
    request: Request<'_>,
    tls: &TlsConnector,
    tcp: TcpStream,
    deadline: Instant,
    url: &str,
) -> Result<(u16, Vec<u8>)> {
    set_timeouts(&tcp, deadline, url)?;
    let mut stream = match tls.connect(base.host(), tcp) {
        Ok(stream) => stream,
        Err(HandshakeError::Failure(e)) => {
            return Err(ErrorKind::Tls.msg(format!("tls handshake for {url}")).src(e));
        }
        Err(HandshakeError::WouldBlock(_)) => {
            return Err(ErrorKind::Timeout.msg(format!("tls handshake for {url}")));
        }
    };
    let mut head = format!(
        "GET {}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: edgehub/{}\r\nAccept: */*\r\nConnection: close\r\n",
        base.prefix,
        request.path,
        base.authority(),
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in request.headers {
        if value.contains(['\r', '\n']) || name.contains(['\r', '\n', ':']) {
            return Err(ErrorKind::Config.msg(format!("header {name} for {url} has a line break")));
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !request.body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", request.body.len()));
    }
    head.push_str("\r\n");
    let mut wire = head.into_bytes();
    wire.extend_from_slice(request.body);
    set_timeouts(stream.get_ref(), deadline, url)?;
    stream
        .write_all(&wire)
        .and_then(|()| stream.flush())
        .map_err(|e| io_error(e, &format!("send request to {url}")))?;

    let mut reader = BodyReader { stream: &mut stream, buf: Vec::new(), pos: 0, deadline, url };
    let response = reader.read_response();
    // Best effort: the server closes anyway (`Connection: close`).
    let _ = stream.shutdown();
    response
}

fn set_timeouts(tcp: &TcpStream, deadline: Instant, url: &str) -> Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ErrorKind::Timeout.msg(format!("GET {url}")));
    }
    tcp.set_read_timeout(Some(left))
        .and_then(|()| tcp.set_write_timeout(Some(left)))
        .map_err(|e| ErrorKind::Io.msg("set socket timeout").src(e))
}

fn io_error(e: io::Error, doing: &str) -> Error {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            ErrorKind::Timeout.msg(doing.to_owned()).src(e)
        }
        _ => ErrorKind::Handshake.msg(doing.to_owned()).src(e),
    }
}

/// Reads a response from a stream, keeping the deadline on every read.
struct BodyReader<'s, 'u> {
    stream: &'s mut TlsStream<TcpStream>,
    buf: Vec<u8>,
    pos: usize,
    deadline: Instant,
    url: &'u str,
}

impl BodyReader<'_, '_> {
    /// Reads more bytes into the buffer. Returns false at the end of the stream.
    fn fill(&mut self) -> Result<bool> {
        if self.buf.len() >= MAX_RESPONSE_BYTES {
            return Err(self.protocol(format!("response over {MAX_RESPONSE_BYTES} bytes")));
        }
        set_timeouts(self.stream.get_ref(), self.deadline, self.url)?;
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(io_error(e, &format!("read response from {}", self.url))),
        }
    }

    fn protocol(&self, why: String) -> Error {
        ErrorKind::Protocol.msg(format!("response from {}: {why}", self.url))
    }

    fn read_response(&mut self) -> Result<(u16, Vec<u8>)> {
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at;
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(self.protocol(format!("head over {MAX_HEAD_BYTES} bytes")));
            }
            if !self.fill()? {
                return Err(self.protocol("connection closed before the end of the head".into()));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.pos = head_end + 4;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = parse_status_line(status_line)
            .ok_or_else(|| self.protocol(format!("bad status line {:?}", shown(status_line))))?;
        let mut content_length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse::<usize>()
                    .map_err(|_| self.protocol(format!("bad Content-Length {:?}", shown(value))))?;
                content_length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        let body = if chunked {
            self.read_chunked()?
        } else if let Some(n) = content_length {
            if n > MAX_BODY_BYTES {
                return Err(self.protocol(format!(
                    "body of {n} bytes is over the {MAX_BODY_BYTES}-byte limit"
                )));
            }
            self.read_exact(n)?
        } else {
            self.read_to_end()?
        };
        Ok((status, body))
    }

    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        while self.buf.len() - self.pos < n {
            if !self.fill()? {
                return Err(self.protocol(format!(
                    "connection closed after {} of {n} body bytes",
                    self.buf.len() - self.pos
                )));
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    fn read_to_end(&mut self) -> Result<Vec<u8>> {
        while self.fill()? {
            if self.buf.len() - self.pos > MAX_BODY_BYTES {
                return Err(self.protocol(format!("body over the {MAX_BODY_BYTES}-byte limit")));
            }
        }
        Ok(self.buf[self.pos..].to_vec())
    }

    fn read_line(&mut self) -> Result<String> {
        loop {
            if let Some(at) = find(&self.buf[self.pos..], b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[self.pos..self.pos + at]).into_owned();
                self.pos += at + 2;
                return Ok(line);
            }
            if self.buf.len() - self.pos > MAX_HEAD_BYTES {
                return Err(self.protocol("chunk header line too long".into()));
            }
            if !self.fill()? {
                return Err(self.protocol("connection closed inside a chunked body".into()));
            }
        }
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = Some(size_text)
                .filter(|t| t.len() <= MAX_CHUNK_SIZE_DIGITS)
                // u64, not usize: the same size is refused the same way on 32-bit gateways.
                .and_then(|t| u64::from_str_radix(t, 16).ok())
                .ok_or_else(|| self.protocol(format!("bad chunk size {:?}", shown(size_text))))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line()?.is_empty() {}
                return Ok(body);
            }
            // Checked: a size near usize::MAX must not wrap past the limit (issue 11, item 2).
            let total = (body.len() as u64).checked_add(size);
            let Some(size) = total
                .filter(|&total| total <= MAX_BODY_BYTES as u64)
                .and_then(|_| usize::try_from(size).ok())
            else {
                return Err(self.protocol(format!(
                    "chunk of {size} bytes after {} takes the body over the {MAX_BODY_BYTES}-byte limit",
                    body.len()
                )));
            };
            body.extend_from_slice(&self.read_exact(size)?);
            if !self.read_line()?.is_empty() {
                return Err(self.protocol("chunk not followed by CRLF".into()));
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?;
    if status.len() != 3 {
        return None;
    }
    status.parse().ok().filter(|s| (100..600).contains(s))
}

/// The standard reason phrase, so the error reads `HTTP 401 Unauthorized` whatever the server wrote.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The body as text for an error (which is logged): lossy UTF-8, trimmed, escaped and cut by
/// [`shown`], so a server's answer cannot forge log lines.
fn quote_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_QUOTED_BODY)]);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_owned()
    } else if body.len() > MAX_QUOTED_BODY {
        format!("{}… ({} bytes)", shown(text), body.len())
    } else {
        shown(text).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_forms() {
        let u = BaseUrl::parse("https://10.0.0.1:10002").unwrap();
        assert_eq!((u.host(), u.authority()), ("10.0.0.1", "10.0.0.1:10002".to_owned()));
        assert_eq!(u.url("/ca.crt"), "https://10.0.0.1:10002/ca.crt");
        let u = BaseUrl::parse("https://cloud.example/").unwrap();
        assert_eq!(u.url("/edge.crt"), "https://cloud.example:443/edge.crt");
        let u = BaseUrl::parse("https://[::1]:10002/kube/").unwrap();
        assert_eq!(u.host(), "::1");
        assert_eq!(u.url("/ca.crt"), "https://[::1]:10002/kube/ca.crt");
        for bad in
            ["http://1.2.3.4:10002", "https://", "https://:10002", "https://h:0", "https://h:x"]
        {
            let e = BaseUrl::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.to_string().contains("httpServer"), "{e}");
        }
    }

    #[test]
    fn status_lines_and_quoting() {
        assert_eq!(parse_status_line("HTTP/1.1 401 Unauthorized"), Some(401));
        assert_eq!(parse_status_line("HTTP/1.0 200"), Some(200));
        assert_eq!(parse_status_line("HTTP/2 200 OK"), None);
        assert_eq!(parse_status_line("HTTP/1.1 20 OK"), None);
        assert_eq!(quote_body(b"  Invalid authorization token\n"), "Invalid authorization token");
        assert_eq!(quote_body(b""), "(empty body)");
        let long = vec![b'x'; MAX_QUOTED_BODY + 1];
        assert!(quote_body(&long).ends_with(&format!("({} bytes)", MAX_QUOTED_BODY + 1)));
        assert_eq!(quote_body(b"bad\n[ERROR] forged"), "bad\\n[ERROR] forged");
    }
}
