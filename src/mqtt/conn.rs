//! One connection to the broker: dial with a deadline, TLS through OpenSSL when configured
//! (trust from `eventBusTLS`'s CA only, host name checked, a client certificate when given), the
//! CONNECT/CONNACK exchange, then a socket shared by the reader and the writer threads.
//!
//! Sharing, as in `link`: after CONNACK the socket is non-blocking. The reader waits for
//! readability with poll(2) without the lock and takes it only to drain what arrived; a writer
//! takes it only to write and releases it while waiting for room. Nobody spins, and a writer
//! (PUBACKs from the reader thread, publishes from the writer) never waits behind an idle reader.

use super::codec::{self, Connect, Packet};
use super::Options;
use crate::error::{ErrorKind, Result};
use crate::poll::{self, Interest};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslStream, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Dial, TLS handshake and CONNACK together must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long means the broker stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK: usize = 8 << 10;

enum Stream {
    Plain(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An established, accepted MQTT connection.
pub(super) struct Conn {
    stream: Mutex<Stream>,
    /// A dup of the socket: polled for readiness, and shut down to wake the reader.
    raw: TcpStream,
}

/// The TLS settings, built once at start so a bad certificate file fails the start, not each dial.
pub(super) fn tls_connector(options: &Options) -> Result<Option<SslConnector>> {
    let Some(files) = &options.tls else { return Ok(None) };
    let err = |what: String| ErrorKind::Tls.msg(what);
    let mut builder = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| err("build tls client for the mqtt broker".into()).src(e))?;
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| err("set tls version".into()).src(e))?;
    // Trust only this CA: `SslConnector::builder` also loads the system's roots, which a store
    // of our own replaces.
    let ca_key = || err(format!("eventBusTLS.tlsMqttCAFile {}", files.ca.display()));
    let ca_pem = std::fs::read(&files.ca).map_err(|e| ca_key().src(e))?;
    let cas = X509::stack_from_pem(&ca_pem).map_err(|e| ca_key().src(e))?;
    if cas.is_empty() {
        return Err(ca_key().src("no PEM certificate in file"));
    }
    let mut store = X509StoreBuilder::new().map_err(|e| ca_key().src(e))?;
    for ca in cas {
        store.add_cert(ca).map_err(|e| ca_key().src(e))?;
    }
    builder.set_cert_store(store.build());
    if let Some((cert, key)) = &files.client {
        builder
            .set_certificate_chain_file(cert)
            .map_err(|e| err(format!("eventBusTLS.tlsMqttCertFile {}", cert.display())).src(e))?;
        builder.set_private_key_file(key, SslFiletype::PEM).map_err(|e| {
            err(format!("eventBusTLS.tlsMqttPrivateKeyFile {}", key.display())).src(e)
        })?;
        builder.check_private_key().map_err(|e| {
            err(format!("eventBusTLS.tlsMqttPrivateKeyFile {} does not match", key.display()))
                .src(e)
        })?;
    }
    Ok(Some(builder.build()))
}

impl Conn {
    /// Dials the broker and sends CONNECT; returns once the broker accepted (CONNACK 0), with any
    /// bytes that arrived after the CONNACK.
    ///
    /// # Errors
    /// `Handshake`/`Timeout` when the broker cannot be reached, `Tls` for TLS failures,
    /// `Protocol` when the broker refuses the connection (the CONNACK reason is named).
    pub(super) fn open(
        options: &Options,
        tls: Option<&SslConnector>,
        clean_session: bool,
    ) -> Result<(Conn, Vec<u8>)> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let broker = &options.broker;
        let tcp = dial(&broker.host, broker.port, deadline)?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        tcp.set_read_timeout(Some(left))
            .and_then(|()| tcp.set_write_timeout(Some(left)))
            .map_err(|e| ErrorKind::Io.msg("set mqtt connect timeout").src(e))?;
        let raw = tcp.try_clone().map_err(|e| ErrorKind::Io.msg("dup mqtt socket").src(e))?;
        let mut stream = match tls {
            None => Stream::Plain(tcp),
            Some(connector) => {
                let tls = connector.connect(&broker.host, tcp).map_err(|e| {
                    ErrorKind::Tls
                        .msg(format!("tls handshake with mqtt broker {}", broker.host))
                        .src(e.to_string())
                })?;
                Stream::Tls(Box::new(tls))
            }
        };
        let connect = codec::encode_connect(&Connect {
            client_id: &options.client_id,
            keep_alive_secs: options.keep_alive.as_secs().clamp(1, u64::from(u16::MAX)) as u16,
            clean_session,
            username: options.username.as_deref(),
            password: options.password.as_deref().map(str::as_bytes),
        });
        stream
            .write_all(&connect)
            .and_then(|()| stream.flush())
            .map_err(|e| ErrorKind::Handshake.msg("send mqtt CONNECT").src(e))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            match codec::decode(&buf, options.max_packet_bytes) {
                Ok(Some((Packet::ConnAck { code: 0, .. }, used))) => {
                    buf.drain(..used);
                    break;
                }
                Ok(Some((Packet::ConnAck { code, .. }, _))) => {
                    return Err(ErrorKind::Protocol.msg(format!(
                        "mqtt broker refused the connection: {} ({code})",
                        codec::connack_reason(code)
                    )));
                }
                Ok(Some((other, _))) => {
                    return Err(ErrorKind::Protocol
                        .msg(format!("mqtt broker sent {other:?} before CONNACK")));
                }
                Ok(None) => {}
                Err(e) => return Err(ErrorKind::Protocol.msg("mqtt CONNACK").src(e.to_string())),
            }
            match stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(ErrorKind::Closed.msg("mqtt broker closed before CONNACK"));
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if is_timeout(&e) => {
                    return Err(ErrorKind::Timeout.msg("no mqtt CONNACK"));
                }
                Err(e) => return Err(ErrorKind::Handshake.msg("read mqtt CONNACK").src(e)),
            }
        }
        raw.set_nonblocking(true)
            .map_err(|e| ErrorKind::Io.msg("make mqtt socket non-blocking").src(e))?;
        Ok((Conn { stream: Mutex::new(stream), raw }, buf))
    }

    fn lock(&self) -> MutexGuard<'_, Stream> {
        // A stream under a lock: a panic while holding it ends the connection anyway.
        self.stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits up to `timeout` for bytes (or EOF, or an error) to read.
    pub(super) fn wait_readable(&self, timeout: Duration) -> Result<bool> {
        poll::wait(&self.raw, Interest::Read, timeout)
            .map_err(|e| ErrorKind::Io.msg("poll mqtt socket").src(e))
    }

    /// Appends everything readable now to `out`.
    ///
    /// # Errors
    /// `Closed` at EOF; `Io` for a socket or TLS error.
    pub(super) fn read_available(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut stream = self.lock();
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::Closed.msg("mqtt broker closed the connection")),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ErrorKind::Io.msg("read from mqtt broker").src(e)),
            }
        }
    }

    /// Writes all of `bytes`, releasing the lock while the socket has no room.
    ///
    /// # Errors
    /// `Timeout` when no byte could be written for `WRITE_TIMEOUT`; `Io` otherwise.
    pub(super) fn write_all(&self, bytes: &[u8]) -> Result<()> {
        let mut done = 0;
        let mut deadline = Instant::now() + WRITE_TIMEOUT;
        while done < bytes.len() {
            let written = self.lock().write(&bytes[done..]);
            match written {
                Ok(0) => return Err(ErrorKind::Closed.msg("mqtt socket accepts no bytes")),
                Ok(n) => {
                    done += n;
                    deadline = Instant::now() + WRITE_TIMEOUT;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ErrorKind::Timeout.msg("write to mqtt broker"));
                    }
                    poll::wait(&self.raw, Interest::Write, left)
                        .map_err(|e| ErrorKind::Io.msg("poll mqtt socket").src(e))?;
                }
                Err(e) => return Err(ErrorKind::Io.msg("write to mqtt broker").src(e)),
            }
        }
        Ok(())
    }

    /// Shuts the socket down both ways: wakes a reader in poll, fails later writes.
    pub(super) fn shutdown(&self) {
        let _ = self.raw.shutdown(Shutdown::Both);
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn dial(host: &str, port: u16, deadline: Instant) -> Result<TcpStream> {
    let shown = format!("{host}:{port}");
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| ErrorKind::Handshake.msg(format!("resolve mqtt broker {shown}")).src(e))?;
    let mut last = ErrorKind::Handshake.msg(format!("resolve mqtt broker {shown}: no addresses"));
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::Timeout.msg(format!("connect to mqtt broker {shown}")));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true); // small publishes: latency over batching
                return Ok(tcp);
            }
            Err(e) => {
                last = ErrorKind::Handshake.msg(format!("connect to mqtt broker {addr}")).src(e)
            }
        }
    }
    Err(last)
}
