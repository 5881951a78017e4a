//! One WebSocket link to CloudHub: dial with a deadline, mutual TLS through OpenSSL with trust
//! taken only from `tlsCaFile`, the upgrade with KubeEdge's headers (protocol §2), then framed reads
//! and writes shared by two threads. Knows nothing of groups, modules or threads of its own.
//!
//! Sharing one TLS stream between a reader and a writer: the socket is non-blocking after the
//! handshake. The reader waits for readability with poll(2) *without* the lock and takes it only to
//! drain what arrived; the writer takes it only to write, and if the socket buffer is full it
//! releases the lock while it waits for writability. So a writer never waits behind an idle reader,
//! and nobody spins.

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::poll::{self, Interest};
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslMethod, SslMode, SslOptions, SslStream, SslVerifyMode,
    SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509CheckFlags;
use openssl::x509::{X509VerifyResult, X509};
use std::io;
use std::net::{IpAddr, Shutdown, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::WebSocket;

/// Small socket-side buffers: messages are small and the device is small.
const READ_BUFFER_BYTES: usize = 8 << 10;
/// Frames are gathered up to this many bytes (one TLS record) before they are written; every send
/// ends with a flush, so this only lets a batch (`send_texts`) share records and sends.
const WRITE_BUFFER_BYTES: usize = 16 << 10;
/// Largest upgrade-failure body we quote in an error.
const MAX_QUOTED_BODY: usize = 512;
/// While reading, tungstenite queues a pong for every ping (RFC 6455) into its write buffer. A
/// cloud that pings and never reads would grow that buffer without end, so while reading the
/// buffer may hold at most this many bytes: past it a pong waits in tungstenite's one-frame slot,
/// where a newer pong replaces it (RFC 6455 allows answering only the latest ping).
const MAX_PENDING_PONG_BYTES: usize = 64 << 10;
/// A dial in progress looks at the stop signal at least this often.
const DIAL_STOP_CHECK: Duration = Duration::from_millis(100);
/// Longest single TCP connect attempt: std cannot interrupt a connect, so within
/// `handshakeTimeout` a dial retries in attempts this long, and a stop waits at most this for a
/// connect to a black hole. An attempt sends the SYN twice (Linux retransmits after 1 s), so any
/// path with a round trip under about 2 s connects within one.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(3);

/// The cipher list of openssl's `SslConnector` (Python's defaults): no anonymous, null or weak
/// ciphers. TLS 1.3 suites are OpenSSL's defaults.
const CIPHER_LIST: &str = "DEFAULT:!aNULL:!eNULL:!MD5:!3DES:!DES:!RC4:!IDEA:!SEED:!aDSS:!SRP:!PSK";

type Stream = SslStream<TcpStream>;

/// A whole WebSocket message read from the cloud, or pings.
#[derive(Debug)]
pub enum Incoming {
    /// A text or binary data message (gorilla's `ReadJSON` takes both).
    Data(Vec<u8>),
    /// A pong, with the payload of the ping it answers: the cloud read our ping.
    Pong(Vec<u8>),
    /// One or more pings in a row (answered by tungstenite, and reported once per run so a ping
    /// flood costs no memory here). A ping shows the peer sends, not that it reads what we send,
    /// so it is no proof the link is alive (see the reader in `session`).
    Control,
}

/// An established link. `&Link` is shared by the session's reader, writer and heartbeat.
pub struct Link {
    ws: Mutex<WebSocket<Stream>>,
    /// The raw socket (a dup of the one inside TLS): polled for readiness, and shut down to wake
    /// a reader blocked in poll.
    socket: TcpStream,
    write_deadline: Duration,
    peer: String,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({})", self.peer)
    }
}

/// Builds the TLS client from the files named in the config: trust roots only from `tlsCaFile`, the
/// client identity from `tlsCertFile` (the certificate, then any intermediates) and
/// `tlsPrivateKeyFile` (SEC1 `EC PRIVATE KEY`, as KubeEdge writes it, or PKCS#8). Read on every
/// dial, so a rotated certificate is picked up.
///
/// Built on OpenSSL directly with the settings of openssl's `SslConnector` but without the system
/// trust store: native-tls (and `SslConnector`) parse the whole system CA bundle for every client,
/// twice in native-tls, only for it to be replaced by `tlsCaFile`. That was 1.4 MB of heap churn
/// per dial, most of which the dialling thread's malloc arena kept (scripts/bench.sh, idle RSS).
///
/// # Errors
/// `Tls`, naming the config key and file that could not be read or used.
pub fn tls_connector(config: &Config) -> Result<SslContext> {
    let ca_pem = read_file("tlsCaFile", &config.tls_ca_file)?;
    let cert_pem = read_file("tlsCertFile", &config.tls_cert_file)?;
    let key_pem = read_file("tlsPrivateKeyFile", &config.tls_private_key_file)?;
    let tls_err = |key: &str, path: &Path| ErrorKind::Tls.msg(format!("{key} {}", path.display()));

    let cas = X509::stack_from_pem(&ca_pem)
        .map_err(|e| tls_err("tlsCaFile", &config.tls_ca_file).src(e))?;
    if cas.is_empty() {
        return Err(tls_err("tlsCaFile", &config.tls_ca_file).src("no PEM certificate in file"));
    }
    let mut chain = X509::stack_from_pem(&cert_pem)
        .map_err(|e| tls_err("tlsCertFile", &config.tls_cert_file).src(e))?
        .into_iter();
    let Some(cert) = chain.next() else {
        return Err(tls_err("tlsCertFile", &config.tls_cert_file).src("no PEM certificate in file"));
    };
    let key = openssl::pkey::PKey::private_key_from_pem(&key_pem)
        .map_err(|e| tls_err("tlsPrivateKeyFile", &config.tls_private_key_file).src(e))?;
    let matches = cert.public_key().map(|public| public.public_eq(&key)).unwrap_or(false);
    if !matches {
        return Err(ErrorKind::Tls.msg(format!(
            "tlsPrivateKeyFile {} does not belong to the certificate in tlsCertFile {}",
            config.tls_private_key_file.display(),
            config.tls_cert_file.display()
        )));
    }

    let build = |e| ErrorKind::Tls.msg("build tls client").src(e);
    let mut builder = SslContext::builder(SslMethod::tls_client()).map_err(build)?;
    let mut options = SslOptions::ALL | SslOptions::NO_COMPRESSION;
    options &= !SslOptions::DONT_INSERT_EMPTY_FRAGMENTS;
    builder.set_options(options);
    // RELEASE_BUFFERS: an idle link holds no 16 KiB record buffers.
    builder.set_mode(
        SslMode::AUTO_RETRY
            | SslMode::ACCEPT_MOVING_WRITE_BUFFER
            | SslMode::ENABLE_PARTIAL_WRITE
            | SslMode::RELEASE_BUFFERS,
    );
    builder.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(build)?;
    builder.set_cipher_list(CIPHER_LIST).map_err(build)?;
    builder
        .set_certificate(&cert)
        .map_err(|e| tls_err("tlsCertFile", &config.tls_cert_file).src(e))?;
    for intermediate in chain {
        builder
            .add_extra_chain_cert(intermediate)
            .map_err(|e| tls_err("tlsCertFile", &config.tls_cert_file).src(e))?;
    }
    builder
        .set_private_key(&key)
        .map_err(|e| tls_err("tlsPrivateKeyFile", &config.tls_private_key_file).src(e))?;
    let mut store = X509StoreBuilder::new().map_err(build)?;
    for ca in cas {
        store.add_cert(ca).map_err(|e| tls_err("tlsCaFile", &config.tls_ca_file).src(e))?;
    }
    builder.set_cert_store(store.build());
    builder.set_verify(SslVerifyMode::PEER);
    // One read takes every record that has arrived, instead of a header and then a body per
    // record; the reader drains until WouldBlock, so nothing stays behind in OpenSSL's buffer.
    builder.set_read_ahead(true);
    Ok(builder.build())
}

/// One TLS session to `host`: SNI (for a name) and verification of the server certificate's
/// name or IP address against `host`, as openssl's `SslConnector` does.
fn tls_session(
    tls: &SslContext,
    host: &str,
) -> std::result::Result<Ssl, openssl::error::ErrorStack> {
    let mut ssl = Ssl::new(tls)?;
    let param = ssl.param_mut();
    param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
    match host.parse::<IpAddr>() {
        Ok(ip) => param.set_ip(ip)?,
        Err(_) => {
            param.set_host(host)?;
            ssl.set_hostname(host)?;
        }
    }
    Ok(ssl)
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| ErrorKind::Tls.msg(format!("read {key} {}", path.display())).src(e))
}

/// Dials CloudHub: TCP connect, TLS handshake and WebSocket upgrade, all within
/// `websocket.handshakeTimeout`. Not interruptible: see [`connect_until_stopped`].
///
/// # Errors
/// As [`connect_until_stopped`].
pub fn connect(config: &Config, tls: &SslContext) -> Result<Link> {
    connect_until_stopped(config, tls, &crossbeam_channel::never())
}

/// Dials CloudHub: TCP connect, TLS handshake and WebSocket upgrade, all within one deadline,
/// `websocket.handshakeTimeout` from now, however slowly the server trickles its bytes (the
/// handshakes run on a non-blocking socket, waiting with poll(2) for at most what is left). A
/// `stop` that fires or disconnects ends the dial within [`DIAL_STOP_CHECK`] (a TCP connect
/// attempt within [`CONNECT_ATTEMPT`]).
///
/// # Errors
/// `Handshake` (resolve, connect or upgrade refused, with the HTTP status and body), `Tls`
/// (certificates, verification), `Timeout` (the handshake deadline passed), `Stopped`.
pub fn connect_until_stopped(
    config: &Config,
    tls: &SslContext,
    stop: &crossbeam_channel::Receiver<()>,
) -> Result<Link> {
    let server = &config.websocket.server;
    let timeout = config.websocket.handshake_timeout.0;
    let deadline = Instant::now() + timeout;
    let tcp = dial(server, deadline, stop)?;
    let socket = tcp.try_clone().map_err(|e| ErrorKind::Io.msg("clone socket").src(e))?;
    tcp.set_nonblocking(true).map_err(|e| ErrorKind::Io.msg("set non-blocking").src(e))?;
    let dial_wait = DialWait { socket: &socket, server, deadline, timeout, stop };

    let handshake_err = || ErrorKind::Tls.msg(format!("tls handshake with {server}"));
    let ssl = tls_session(tls, host_of(server)).map_err(|e| handshake_err().src(e))?;
    let mut handshake = ssl.connect(tcp);
    let tls_stream = loop {
        match handshake {
            Ok(s) => break s,
            Err(HandshakeError::SetupFailure(e)) => return Err(handshake_err().src(e)),
            Err(HandshakeError::Failure(mid)) => {
                // Say why verification failed, as the bare OpenSSL error does not.
                let verify = mid.ssl().verify_result();
                let e = mid.into_error();
                return Err(if verify == X509VerifyResult::OK {
                    handshake_err().src(e)
                } else {
                    handshake_err().src(format!("{e} ({})", verify.error_string()))
                });
            }
            Err(HandshakeError::WouldBlock(mid)) => {
                let interest = if mid.error().code() == openssl::ssl::ErrorCode::WANT_WRITE {
                    Interest::Write
                } else {
                    Interest::Read
                };
                dial_wait.wait(interest, "tls handshake")?;
                handshake = mid.handshake();
            }
        }
    };

    let url = config.websocket_url();
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ErrorKind::Config.msg(format!("websocket url {url}")).src(e))?;
    let headers = request.headers_mut();
    for (name, value) in [
        ("node_id", config.node_name.as_str()),
        ("project_id", config.project_id.as_str()),
        ("ConnectionUse", "msg"),
    ] {
        let value = HeaderValue::from_str(value)
            .map_err(|e| ErrorKind::Config.msg(format!("header {name} value {value:?}")).src(e))?;
        headers.insert(name, value);
    }
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(Some(config.max_message_bytes))
        .max_frame_size(Some(config.max_message_bytes));
    let mut upgrade = tungstenite::client::client_with_config(request, tls_stream, Some(ws_config));
    let ws = loop {
        match upgrade {
            Ok((ws, _response)) => break ws,
            Err(tungstenite::HandshakeError::Interrupted(mid)) => {
                // Mostly the answer is missing, but tungstenite does not say whether a read or
                // a write blocked: try again when bytes arrive, or after a slice at the latest.
                dial_wait.pause(Interest::Read, "websocket upgrade")?;
                upgrade = mid.handshake();
            }
            Err(e) => return Err(upgrade_error(server, e)),
        }
    };

    // The socket stays non-blocking; deadlines are kept by poll(2).
    Ok(Link {
        ws: Mutex::new(ws),
        socket,
        write_deadline: config.websocket.write_deadline.0,
        peer: server.clone(),
    })
}

/// TCP connect to the first address of `server` that answers, before `deadline`, in attempts of
/// at most [`CONNECT_ATTEMPT`] so that `stop` is seen between them.
fn dial(
    server: &str,
    deadline: Instant,
    stop: &crossbeam_channel::Receiver<()>,
) -> Result<TcpStream> {
    let addrs = server
        .to_socket_addrs()
        .map_err(|e| ErrorKind::Handshake.msg(format!("resolve {server}")).src(e))?;
    let mut last = ErrorKind::Handshake.msg(format!("resolve {server}: no addresses"));
    for addr in addrs {
        loop {
            if is_stopping(stop) {
                return Err(ErrorKind::Stopped.msg(format!("connect {addr}")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::Timeout.msg(format!("connect {server}")));
            }
            match TcpStream::connect_timeout(&addr, left.min(CONNECT_ATTEMPT)) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true); // small JSON frames: latency over batching
                    return Ok(tcp);
                }
                // Another attempt while the deadline allows (see CONNECT_ATTEMPT).
                Err(e) if e.kind() == io::ErrorKind::TimedOut => continue,
                Err(e) => last = ErrorKind::Handshake.msg(format!("connect {addr}")).src(e),
            }
            break;
        }
    }
    Err(last)
}

/// True once `stop` fired or its sender is gone.
fn is_stopping(stop: &crossbeam_channel::Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty))
}

/// The one deadline of a dial, and its stop signal.
struct DialWait<'a> {
    socket: &'a TcpStream,
    server: &'a str,
    deadline: Instant,
    timeout: Duration,
    stop: &'a crossbeam_channel::Receiver<()>,
}

impl DialWait<'_> {
    /// Waits until the socket is ready for `interest`, in slices of [`DIAL_STOP_CHECK`] so a stop
    /// is seen; fails once the dial's deadline has passed (`Timeout`) or on a stop (`Stopped`).
    fn wait(&self, interest: Interest, doing: &str) -> Result<()> {
        while !self.pause(interest, doing)? {}
        Ok(())
    }

    /// One slice of [`DialWait::wait`]: waits at most [`DIAL_STOP_CHECK`], and says whether the
    /// socket became ready.
    fn pause(&self, interest: Interest, doing: &str) -> Result<bool> {
        if is_stopping(self.stop) {
            return Err(ErrorKind::Stopped.msg(format!("{doing} with {}", self.server)));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::Timeout.msg(format!(
                "{doing} with {}: not done within handshakeTimeout ({:.1} s)",
                self.server,
                self.timeout.as_secs_f64()
            )));
        }
        poll::wait(self.socket, interest, left.min(DIAL_STOP_CHECK))
            .map_err(|e| ErrorKind::Io.msg("poll socket").src(e))
    }
}

/// The host part of `host:port` or `[v6]:port`, as used for certificate verification.
fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn upgrade_error(
    server: &str,
    e: tungstenite::HandshakeError<tungstenite::ClientHandshake<Stream>>,
) -> Error {
    match e {
        tungstenite::HandshakeError::Interrupted(_) => {
            ErrorKind::Timeout.msg(format!("websocket upgrade with {server}"))
        }
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            let body = String::from_utf8_lossy(&body[..body.len().min(MAX_QUOTED_BODY)]);
            ErrorKind::Handshake.msg(format!(
                "websocket upgrade with {server} refused: {} {}",
                response.status(),
                crate::logging::shown(body.trim())
            ))
        }
        tungstenite::HandshakeError::Failure(e) => {
            map_ws_error(e, &format!("websocket upgrade with {server}"))
        }
    }
}

/// Maps tungstenite's errors onto ours: normal endings are `Closed`, timeouts `Timeout`, broken
/// framing `Protocol`.
fn map_ws_error(e: tungstenite::Error, doing: &str) -> Error {
    use tungstenite::Error as W;
    match e {
        W::ConnectionClosed | W::AlreadyClosed => ErrorKind::Closed.msg(doing.to_owned()),
        W::Io(io) => match io.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                ErrorKind::Timeout.msg(doing.to_owned()).src(io)
            }
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected => ErrorKind::Closed.msg(doing.to_owned()).src(io),
            _ => ErrorKind::Io.msg(doing.to_owned()).src(io),
        },
        W::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
            // CloudHub never sends a close frame: dropping TCP is its normal close (§2.6).
            ErrorKind::Closed.msg(doing.to_owned()).src("peer closed without close frame")
        }
        W::Tls(e) => ErrorKind::Tls.msg(doing.to_owned()).src(e.to_string()),
        other => ErrorKind::Protocol.msg(doing.to_owned()).src(other.to_string()),
    }
}

/// The stream, locked for reading: our own frames are bounded by the outbox, and what tungstenite
/// queues by itself while reading (pongs) may only fill its write buffer up to
/// [`MAX_PENDING_PONG_BYTES`]. The writer, when it has the lock, has no such limit.
struct PongBound<'a>(MutexGuard<'a, WebSocket<Stream>>);

impl<'a> PongBound<'a> {
    fn new(mut ws: MutexGuard<'a, WebSocket<Stream>>) -> PongBound<'a> {
        ws.set_config(|c| c.max_write_buffer_size = MAX_PENDING_PONG_BYTES);
        PongBound(ws)
    }
}

impl Drop for PongBound<'_> {
    fn drop(&mut self) {
        self.0.set_config(|c| c.max_write_buffer_size = usize::MAX);
    }
}

impl std::ops::Deref for PongBound<'_> {
    type Target = WebSocket<Stream>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for PongBound<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A WebSocket ping carrying `payload`.
fn ping(payload: &[u8]) -> tungstenite::Message {
    tungstenite::Message::Ping(payload.to_vec().into())
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, WebSocket<Stream>> {
        // A panic elsewhere cannot leave the WebSocket half-updated in a way that matters more
        // than the session ending, which the panic already causes.
        self.ws.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The `host:port` this link goes to.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The local IP address of the link's socket: the address the cloud sees this node on.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.socket.local_addr().ok().map(|a| a.ip())
    }

    /// Waits, without holding the stream's lock, until bytes arrive or `timeout` passes.
    /// Returns `false` on timeout.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        poll::wait(&self.socket, Interest::Read, timeout)
            .map_err(|e| ErrorKind::Io.msg("poll socket").src(e))
    }

    /// Reads every whole message that has arrived, without blocking, and appends them to `out`.
    /// Pings are answered by tungstenite. May append nothing (a partial frame, or TLS records that
    /// carry no data).
    ///
    /// # Errors
    /// `Closed` when the cloud closed or reset; `Protocol` for broken framing or a message over
    /// `maxMessageBytes` (the stream cannot be resynchronised after either).
    pub fn read_available(&self, out: &mut Vec<Incoming>) -> Result<()> {
        let mut ws = PongBound::new(self.lock());
        loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    out.push(Incoming::Data(text.as_bytes().to_vec()))
                }
                Ok(tungstenite::Message::Binary(bytes)) => out.push(Incoming::Data(bytes.to_vec())),
                Ok(tungstenite::Message::Close(_)) => {
                    return Err(ErrorKind::Closed.msg("read").src("close frame from cloud"));
                }
                Ok(tungstenite::Message::Pong(payload)) => {
                    out.push(Incoming::Pong(payload.to_vec()))
                }
                Ok(_) if matches!(out.last(), Some(Incoming::Control)) => {}
                Ok(_) => out.push(Incoming::Control),
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(map_ws_error(e, "read")),
            }
        }
    }

    /// Sends one JSON text frame within `websocket.writeDeadline`.
    ///
    /// # Errors
    /// `Timeout` when the deadline passed with the frame not fully written; `Closed`/`Io` when the
    /// socket failed. In either case the caller still owns the message and should put it back.
    pub fn send_text(&self, text: String) -> Result<()> {
        self.send(tungstenite::Message::text(text))
    }

    /// Sends JSON text frames, in order, with one flush, within `websocket.writeDeadline`: small
    /// frames share TLS records and sends.
    ///
    /// # Errors
    /// As [`Link::send_text`]; none of the frames may count as delivered then.
    pub fn send_texts(&self, texts: impl Iterator<Item = String>) -> Result<()> {
        self.send_all(texts.map(tungstenite::Message::text))
    }

    /// Sends a WebSocket ping; gorilla answers every ping with a pong carrying the same payload
    /// (protocol §2.6), from the same goroutine that reads and handles our messages in order.
    pub fn send_ping(&self, payload: &[u8]) -> Result<()> {
        self.send(ping(payload))
    }

    /// Writes JSON text frames, in order, and flushes what the socket takes now, without waiting:
    /// returns `false` when part of them is still buffered, and then [`Link::finish_flush`] must
    /// follow (before anything else is sent with this call). For a thread that must not block on
    /// the network.
    ///
    /// # Errors
    /// As [`Link::send_text`].
    pub fn try_send_texts(&self, texts: impl Iterator<Item = String>) -> Result<bool> {
        self.try_send_all(texts.map(tungstenite::Message::text))
    }

    /// A ping, as [`Link::send_ping`], written as [`Link::try_send_texts`] writes.
    pub fn try_send_ping(&self, payload: &[u8]) -> Result<bool> {
        self.try_send_all(std::iter::once(ping(payload)))
    }

    fn try_send_all(&self, messages: impl Iterator<Item = tungstenite::Message>) -> Result<bool> {
        let mut ws = self.lock();
        Link::write_frames(&mut ws, messages)?;
        match ws.flush() {
            Ok(()) => Ok(true),
            Err(e) if would_block(&e) => Ok(false),
            Err(e) => Err(map_ws_error(e, "write")),
        }
    }

    /// Writes out what [`Link::try_send_texts`] left buffered, within `websocket.writeDeadline`.
    pub fn finish_flush(&self) -> Result<()> {
        self.send_all(std::iter::empty())
    }

    fn send(&self, message: tungstenite::Message) -> Result<()> {
        self.send_all(std::iter::once(message))
    }

    fn write_frames(
        ws: &mut WebSocket<Stream>,
        messages: impl Iterator<Item = tungstenite::Message>,
    ) -> Result<()> {
        for message in messages {
            match ws.write(message) {
                Ok(()) => {}
                // Buffered inside tungstenite; a flush finishes it.
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(map_ws_error(e, "write")),
            }
        }
        Ok(())
    }

    fn send_all(&self, messages: impl Iterator<Item = tungstenite::Message>) -> Result<()> {
        let deadline = Instant::now() + self.write_deadline;
        let mut ws = self.lock();
        Link::write_frames(&mut ws, messages)?;
        loop {
            match ws.flush() {
                Ok(()) => return Ok(()),
                Err(e) if would_block(&e) => {
                    drop(ws); // let the reader in while the socket buffer drains
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ready = poll::wait(&self.socket, Interest::Write, left)
                        .map_err(|e| ErrorKind::Io.msg("poll socket").src(e))?;
                    if !ready {
                        return Err(ErrorKind::Timeout
                            .msg(format!("write deadline {:?} passed", self.write_deadline)));
                    }
                    ws = self.lock();
                }
                Err(e) => return Err(map_ws_error(e, "write")),
            }
        }
    }

    /// Wakes anyone blocked on this link and makes every further read and write fail. CloudHub
    /// closes by dropping TCP, so we do the same (no close frame).
    pub fn shutdown(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("10.0.0.1:10000"), "10.0.0.1");
        assert_eq!(host_of("[::1]:10000"), "::1");
        assert_eq!(host_of("cloud.example:443"), "cloud.example");
    }
}
