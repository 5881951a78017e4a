//! CloudHub's certificate server for the simulator (protocol §5.1–5.4): HTTPS on its own port,
//! `GET /ca.crt` answers the CA as raw DER, `GET /edge.crt` signs the DER CSR in the body. A client
//! that shows a certificate is authenticated by it (mutual TLS, rotation: it must chain to the CA,
//! be valid, allow client auth and carry HEAD's subject `O=system:nodes`,
//! `CN=system:node:<NodeName header>`); otherwise by `Authorization: Bearer <jwt>`, an HS256 JWT
//! keyed by the CA private key's DER bytes that expires 24 h after it was minted (§5.3). Errors
//! are answered as ref does (401 for a missing or malformed header, 400 for every JWT failure,
//! 200 with an empty body when the CSR cannot be used) or, with `head_errors`, as HEAD does (401
//! "token validation failure, …", 500). Like CloudHub it signs only the CSR's public key, CN and
//! O, and does not check the CSR's signature (§8 W21).
//!
//! Test knobs: the certificate lifetime (seconds, so tests can watch a rotation), a switch that
//! answers every sign request with 200 and an empty body (§8 W18), [`mint_token`] for tokens that
//! are expired or for another CA, and a stream of [`CertRequest`]s saying what was asked and how
//! it was answered. Threads: `sim-cert-accept` and one short-lived `sim-cert-conn` per connection
//! (one request each, `Connection: close`); stop (or drop) joins them all.

use super::{lock, wake_addr};
use crate::error::{ErrorKind, Result};
use crossbeam_channel::{Receiver, Sender};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use openssl::ssl::{SslAcceptor, SslMethod, SslStream, SslVerifyMode, SslVersion};
use openssl::stack::Stack;
use openssl::x509::extension::{ExtendedKeyUsage, KeyUsage};
use openssl::x509::store::{X509Store, X509StoreBuilder};
use openssl::x509::{X509NameBuilder, X509PurposeId, X509Req, X509StoreContext, X509};
use serde::Serialize;
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// cloudcore's `edgeCertSigningDuration` default: 365 days (protocol §6).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A token is valid for 2 × `tokenRefreshDuration` (12 h) (protocol §5.3).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// HEAD caps the request body at 1 MiB (protocol §5.4).
pub const MAX_REQUEST_BODY_BYTES: usize = 1 << 20;
const MAX_REQUEST_HEAD_BYTES: usize = 16 << 10;
/// Bound on one connection (handshake, request, response), so a silent client cannot hold a thread.
const CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// ref's answer to every token problem (protocol §5.4).
const INVALID_TOKEN: &str = "Invalid authorization token";

/// How the certificate server listens and answers. Build with [`CertServerConfig::new`].
#[derive(Clone)]
pub struct CertServerConfig {
    /// Default `127.0.0.1:0` (see [`CertServer::addr`]).
    pub listen: SocketAddr,
    pub ca_cert_pem: Vec<u8>,
    /// The CA key (PEM): signs certificates, and its DER bytes key the JWTs.
    pub ca_key_pem: Vec<u8>,
    /// The server's own certificate and key (PEM), as CloudHub uses its cloudcore certificate.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Lifetime of signed certificates, in whole seconds (at least 1). Default 365 days.
    pub cert_lifetime: Duration,
    /// Answer errors as HEAD does rather than as ref does. Default false (ref).
    pub head_errors: bool,
}

impl CertServerConfig {
    pub fn new(
        ca_cert_pem: Vec<u8>,
        ca_key_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> CertServerConfig {
        CertServerConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            ca_cert_pem,
            ca_key_pem,
            cert_pem,
            key_pem,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            head_errors: false,
        }
    }

    /// The simulator PKI's CA and server certificate.
    pub fn from_pki(pki: &super::Pki) -> CertServerConfig {
        CertServerConfig::new(
            pki.ca_cert_pem.clone(),
            pki.ca_key_pem.clone(),
            pki.server_cert_pem.clone(),
            pki.server_key_pem.clone(),
        )
    }
}

impl fmt::Debug for CertServerConfig {
    /// Leaves out the PEM material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertServerConfig")
            .field("listen", &self.listen)
            .field("cert_lifetime", &self.cert_lifetime)
            .field("head_errors", &self.head_errors)
            .finish_non_exhaustive()
    }
}

/// How a request was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// Nothing needed (`/ca.crt`) or nothing usable presented.
    None,
    /// `Authorization: Bearer <jwt>`.
    Token,
    /// A client certificate.
    Mtls,
}

/// One request the server answered. Serialises as `{"event":"cert_request",…}`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename = "cert_request")]
pub struct CertRequest {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub auth: Auth,
    /// Whether an `Authorization` header came (its value is never recorded).
    pub had_authorization: bool,
    /// The `NodeName` header.
    pub node: String,
    /// CN of the client certificate, when one was shown.
    pub client_cn: String,
    /// Serial (lower-case hex) of the certificate issued, if any.
    pub issued_serial: String,
    /// The error text answered, if any.
    pub error: String,
}

/// The running certificate server. Dropping it stops it.
pub struct CertServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    events_rx: Receiver<CertRequest>,
    accept_thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for CertServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

struct Shared {
    acceptor: SslAcceptor,
    ca_cert: X509,
    ca_key: PKey<Private>,
    /// The JWT key: the CA key as SEC1 DER (what CloudHub keeps in `casecret`).
    jwt_key: Vec<u8>,
    /// Verifies client certificates (time checked, client-auth purpose).
    client_store: X509Store,
    head_errors: bool,
    cert_lifetime_secs: AtomicU64,
    empty_body: AtomicBool,
    stopping: AtomicBool,
    /// Unbounded: a test tool must not block on a test that does not read events.
    events_tx: Sender<CertRequest>,
    /// Live connections' sockets, to shut them down on stop, and their threads.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

impl CertServer {
    /// Binds and starts accepting; the port accepts connections once this returns.
    ///
    /// # Errors
    /// `Tls` when the PEM material cannot be used; `Io` when binding fails.
    pub fn start(cfg: CertServerConfig) -> Result<CertServer> {
        let tls = |what: &'static str| move |e| ErrorKind::Tls.msg(what).src(e);
        let ca_cert = X509::from_pem(&cfg.ca_cert_pem).map_err(tls("parse ca certificate"))?;
        let ca_key = PKey::private_key_from_pem(&cfg.ca_key_pem).map_err(tls("parse ca key"))?;
        let jwt_key = ca_key
            .ec_key()
            .and_then(|ec| ec.private_key_to_der())
            .map_err(tls("ca key as sec1 der"))?;
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
            .map_err(tls("create tls acceptor"))?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(tls("set tls minimum"))?;
        let cert = X509::from_pem(&cfg.cert_pem).map_err(tls("parse server certificate"))?;
        let key = PKey::private_key_from_pem(&cfg.key_pem).map_err(tls("parse server key"))?;
        b.set_certificate(&cert).map_err(tls("use server certificate"))?;
        b.set_private_key(&key).map_err(tls("use server key"))?;
        b.check_private_key().map_err(tls("server key does not match its certificate"))?;
        b.add_client_ca(&ca_cert).map_err(tls("advertise ca"))?;
        // Go's RequestClientCert: ask for a certificate, accept any; the handler verifies it.
        b.set_verify_callback(SslVerifyMode::PEER, |_, _| true);
        let mut store = X509StoreBuilder::new().map_err(tls("create ca store"))?;
        store.add_cert(ca_cert.clone()).map_err(tls("add ca to store"))?;
        store.set_purpose(X509PurposeId::SSL_CLIENT).map_err(tls("set client purpose"))?;
        let listener = TcpListener::bind(cfg.listen)
            .map_err(|e| ErrorKind::Io.msg(format!("bind {}", cfg.listen)).src(e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ErrorKind::Io.msg("read certificate server address").src(e))?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            acceptor: b.build(),
            ca_cert,
            ca_key,
            jwt_key,
            client_store: store.build(),
            head_errors: cfg.head_errors,
            cert_lifetime_secs: AtomicU64::new(cfg.cert_lifetime.as_secs().max(1)),
            empty_body: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            events_tx,
            conns: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("sim-cert-accept".to_owned())
            .spawn(move || accept_loop(&accept_shared, &listener))
            .map_err(|e| ErrorKind::Io.msg("spawn certificate server thread").src(e))?;
        log::info!("cloudsim certificate server listening on {addr}");
        Ok(CertServer { shared, addr, events_rx, accept_thread: Some(accept_thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL for edgecore's `httpServer`: `https://<addr>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A join token valid for 24 h, as `keadm gettoken` prints it: `<sha256hex(CA DER)>.<jwt>`.
    ///
    /// # Errors
    /// `Tls` if OpenSSL fails.
    pub fn token(&self) -> Result<String> {
        self.token_expiring_at(unix_now() + TOKEN_LIFETIME.as_secs() as i64)
    }

    /// A token whose JWT expires at `exp` (Unix seconds; in the past for an expired token).
    ///
    /// # Errors
    /// `Tls` if OpenSSL fails.
    pub fn token_expiring_at(&self, exp: i64) -> Result<String> {
        let ca_der =
            self.shared.ca_cert.to_der().map_err(|e| ErrorKind::Tls.msg("ca der").src(e))?;
        Ok(format!("{}.{}", sha256_hex(&ca_der), mint_jwt(&self.shared.jwt_key, exp)?))
    }

    /// Lifetime of certificates signed from now on (whole seconds, at least 1).
    pub fn set_cert_lifetime(&self, lifetime: Duration) {
        self.shared.cert_lifetime_secs.store(lifetime.as_secs().max(1), Ordering::SeqCst);
    }

    /// When on, every sign request that passes authentication is answered 200 with an empty
    /// body, as ref CloudHub does when signing fails (protocol §8 W18).
    pub fn set_empty_body(&self, on: bool) {
        self.shared.empty_body.store(on, Ordering::SeqCst);
    }

    /// What the server answered, one [`CertRequest`] per request. Clones share one queue.
    pub fn requests(&self) -> Receiver<CertRequest> {
        self.events_rx.clone()
    }

    /// Stops accepting, shuts every connection down and joins every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&wake_addr(self.addr), Duration::from_secs(1));
        if accept_thread.join().is_err() {
            log::error!("bug: certificate server accept thread panicked");
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (socket, _) in &conns {
            let _ = socket.shutdown(Shutdown::Both);
        }
        for (_, worker) in conns {
            if worker.join().is_err() {
                log::error!("bug: certificate server connection thread panicked");
            }
        }
    }
}

impl Drop for CertServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A `keadm gettoken` token for this CA, expiring at `exp` (Unix seconds).
///
/// # Errors
/// `Tls` when the PEM material cannot be used.
pub fn mint_token(ca_cert_pem: &[u8], ca_key_pem: &[u8], exp: i64) -> Result<String> {
    let tls = |what: &'static str| move |e| ErrorKind::Tls.msg(what).src(e);
    let ca_der = X509::from_pem(ca_cert_pem)
        .and_then(|c| c.to_der())
        .map_err(tls("parse ca certificate"))?;
    let jwt_key = PKey::private_key_from_pem(ca_key_pem)
        .and_then(|k| k.ec_key())
        .and_then(|ec| ec.private_key_to_der())
        .map_err(tls("parse ca key"))?;
    Ok(format!("{}.{}", sha256_hex(&ca_der), mint_jwt(&jwt_key, exp)?))
}

/// An HS256 JWT with only `exp` (what CloudHub mints, protocol §5.3).
fn mint_jwt(key: &[u8], exp: i64) -> Result<String> {
    // Go's encoder sorts map keys: {"alg":"HS256","typ":"JWT"}.
    let signing_input = format!(
        "{}.{}",
        base64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        base64url(format!(r#"{{"exp":{exp}}}"#).as_bytes())
    );
    let signature = hmac_sha256(key, signing_input.as_bytes())
        .map_err(|e| ErrorKind::Tls.msg("sign jwt").src(e))?;
    Ok(format!("{signing_input}.{}", base64url(&signature)))
}

/// Checks an HS256 JWT as golang-jwt does: the algorithm, the signature, then `exp` if present.
fn verify_jwt(jwt: &str, key: &[u8], now: i64) -> std::result::Result<(), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("token contains an invalid number of segments".to_owned());
    };
    let json = |part: &str| -> std::result::Result<serde_json::Value, String> {
        let bytes = base64url_decode(part).ok_or("illegal base64 data")?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    };
    if json(header)?.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err("signing method (alg) is unavailable".to_owned());
    }
    let expected =
        hmac_sha256(key, format!("{header}.{claims}").as_bytes()).map_err(|e| e.to_string())?;
    let given = base64url_decode(signature).ok_or("illegal base64 data in signature")?;
    if given.len() != expected.len() || !openssl::memcmp::eq(&given, &expected) {
        return Err("signature is invalid".to_owned());
    }
    if let Some(exp) = json(claims)?.get("exp").and_then(|e| e.as_f64()) {
        if now as f64 > exp {
            return Err(format!("token is expired by {}s", now - exp as i64));
        }
    }
    Ok(())
}

fn hmac_sha256(
    key: &[u8],
    data: &[u8],
) -> std::result::Result<Vec<u8>, openssl::error::ErrorStack> {
    let key = PKey::hmac(key)?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key)?;
    signer.update(data)?;
    signer.sign_to_vec()
}

fn base64url(bytes: &[u8]) -> String {
    openssl::base64::encode_block(bytes)
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect()
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    if text.contains(['+', '/', '=']) {
        return None;
    }
    let mut standard: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while standard.len() % 4 != 0 {
        standard.push('=');
    }
    openssl::base64::decode_block(&standard).ok()
}

fn sha256_hex(bytes: &[u8]) -> String {
    openssl::sha::sha256(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                log::warn!("cloudsim certificate server accept: {e}");
                // Backoff, not synchronisation: a persistent error must not spin the core.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        reap_finished(shared);
        let Ok(raw) = tcp.try_clone() else { continue };
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("sim-cert-conn".to_owned())
            .spawn(move || serve(&conn_shared, tcp));
        match spawned {
            Ok(handle) => lock(&shared.conns).push((raw, handle)),
            Err(e) => log::warn!("cloudsim certificate server: spawn connection thread: {e}"),
        }
    }
}

fn reap_finished(shared: &Shared) {
    let finished: Vec<(TcpStream, JoinHandle<()>)> = {
        let mut conns = lock(&shared.conns);
        let (done, running) =
            std::mem::take(&mut *conns).into_iter().partition(|(_, w)| w.is_finished());
        *conns = running;
        done
    };
    for (_, worker) in finished {
        if worker.join().is_err() {
            log::error!("bug: certificate server connection thread panicked");
        }
    }
}

/// A parsed request.
struct HttpRequest {
    method: String,
    path: String,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// An answer, and what to report about it.
struct Answer {
    status: u16,
    body: Vec<u8>,
    auth: Auth,
    client_cn: String,
    issued_serial: String,
    error: String,
}

impl Answer {
    fn ok(body: Vec<u8>, auth: Auth) -> Answer {
        Answer {
            status: 200,
            body,
            auth,
            client_cn: String::new(),
            issued_serial: String::new(),
            error: String::new(),
        }
    }

    fn error(status: u16, text: &str, auth: Auth) -> Answer {
        Answer {
            status,
            body: text.as_bytes().to_vec(),
            auth,
            client_cn: String::new(),
            issued_serial: String::new(),
            error: text.to_owned(),
        }
    }
}

fn serve(shared: &Shared, tcp: TcpStream) {
    let _ = tcp.set_read_timeout(Some(CONN_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(CONN_TIMEOUT));
    let mut tls = match shared.acceptor.accept(tcp) {
        Ok(tls) => tls,
        Err(e) => {
            log::debug!("cloudsim certificate server: tls handshake: {e}");
            return;
        }
    };
    let (request, answer) = match read_request(&mut tls) {
        Ok(request) => {
            let answer = route(shared, &tls, &request);
            (request, answer)
        }
        Err((status, text)) => {
            let empty = HttpRequest {
                method: String::new(),
                path: String::new(),
                headers: Vec::new(),
                body: Vec::new(),
            };
            (empty, Answer::error(status, &text, Auth::None))
        }
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.status,
        crate::certs::http::reason_phrase(answer.status),
        if answer.status == 200 { "application/octet-stream" } else { "text/plain; charset=utf-8" },
        answer.body.len()
    );
    let mut wire = head.into_bytes();
    wire.extend_from_slice(&answer.body);
    let _ = tls.write_all(&wire).and_then(|()| tls.flush());
    let _ = tls.shutdown();
    let event = CertRequest {
        method: request.method.clone(),
        path: request.path.clone(),
        status: answer.status,
        auth: answer.auth,
        had_authorization: request.header("authorization").is_some(),
        node: request.header("nodename").unwrap_or_default().to_owned(),
        client_cn: answer.client_cn,
        issued_serial: answer.issued_serial,
        error: answer.error,
    };
    log::debug!("cloudsim certificate server: {event:?}");
    let _ = shared.events_tx.send(event);
}

/// Reads one request; `Err` is the status and text to answer.
fn read_request(tls: &mut SslStream<TcpStream>) -> std::result::Result<HttpRequest, (u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > MAX_REQUEST_HEAD_BYTES {
            return Err((431, "request head too large".to_owned()));
        }
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return Err((400, "incomplete request".to_owned())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(version)) =
        (request_line.next(), request_line.next(), request_line.next())
    else {
        return Err((400, "malformed request line".to_owned()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((400, "unsupported http version".to_owned()));
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length = match headers.iter().find(|(n, _)| n == "content-length") {
        None => 0,
        Some((_, v)) => v.parse::<usize>().map_err(|_| (400, "bad Content-Length".to_owned()))?,
    };
    if length > MAX_REQUEST_BODY_BYTES {
        return Err((413, format!("request body over {MAX_REQUEST_BODY_BYTES} bytes")));
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return Err((400, "incomplete request body".to_owned())),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    Ok(HttpRequest { method: method.to_owned(), path: path.to_owned(), headers, body })
}

fn route(shared: &Shared, tls: &SslStream<TcpStream>, request: &HttpRequest) -> Answer {
    let path = request.path.split('?').next().unwrap_or_default();
    match (request.method.as_str(), path) {
        ("GET", "/ca.crt") => match shared.ca_cert.to_der() {
            Ok(der) => Answer::ok(der, Auth::None),
            Err(e) => Answer::error(500, &e.to_string(), Auth::None),
        },
        ("GET", "/edge.crt") => edge_cert(shared, tls, request),
        (_, "/ca.crt" | "/edge.crt") => Answer::error(405, "Method Not Allowed", Auth::None),
        _ => Answer::error(404, "404 page not found", Auth::None),
    }
}

/// `GET /edge.crt` (protocol §5.4): authenticate, then sign.
fn edge_cert(shared: &Shared, tls: &SslStream<TcpStream>, request: &HttpRequest) -> Answer {
    let node = request.header("nodename").unwrap_or_default();
    let (auth, client_cn) = match tls.ssl().peer_certificate() {
        Some(client) => {
            let cn = name_entry(client.subject_name(), Nid::COMMONNAME);
            if let Err(why) = verify_client(shared, &client, node) {
                let mut answer = Answer::error(401, &why, Auth::Mtls);
                answer.client_cn = cn;
                return answer;
            }
            (Auth::Mtls, cn)
        }
        None => {
            let header = request.header("authorization").unwrap_or_default();
            // Go: strings.Split(value, " ") must give exactly two parts.
            let parts: Vec<&str> = header.split(' ').collect();
            if parts.len() != 2 {
                return Answer::error(401, INVALID_TOKEN, Auth::Token);
            }
            if let Err(why) = verify_jwt(parts[1], &shared.jwt_key, unix_now()) {
                return if shared.head_errors {
                    Answer::error(401, &format!("token validation failure, {why}"), Auth::Token)
                } else {
                    Answer::error(400, INVALID_TOKEN, Auth::Token)
                };
            }
            (Auth::Token, String::new())
        }
    };
    let signed = if shared.empty_body.load(Ordering::SeqCst) {
        Err("signing switched off (empty body)".to_owned())
    } else {
        sign(shared, &request.body)
    };
    let mut answer = match signed {
        Ok((der, serial)) => {
            let mut answer = Answer::ok(der, auth);
            answer.issued_serial = serial;
            answer
        }
        Err(why) if shared.head_errors => Answer::error(500, &why, auth),
        // ref: a CSR that cannot be used gives 200 and no body (§8 W18).
        Err(why) => {
            let mut answer = Answer::ok(Vec::new(), auth);
            answer.error = why;
            answer
        }
    };
    answer.client_cn = client_cn;
    answer
}

/// Verifies a client certificate as CloudHub's mTLS mode does, with HEAD's subject rule.
fn verify_client(shared: &Shared, client: &X509, node: &str) -> std::result::Result<(), String> {
    let chain = Stack::new().map_err(|e| e.to_string())?;
    let mut context = X509StoreContext::new().map_err(|e| e.to_string())?;
    let verified = context
        .init(&shared.client_store, client, &chain, |c| {
            Ok((c.verify_cert()?, c.error().error_string().to_owned()))
        })
        .map_err(|e| e.to_string())?;
    if !verified.0 {
        return Err(format!("x509: certificate verification failed: {}", verified.1));
    }
    let org = name_entry(client.subject_name(), Nid::ORGANIZATIONNAME);
    let cn = name_entry(client.subject_name(), Nid::COMMONNAME);
    let node_subject = org == "system:nodes" && cn == format!("system:node:{node}");
    let legacy_subject = org == "KubeEdge" && cn == "kubeedge.io";
    if !node_subject && !legacy_subject {
        return Err(format!("certificate subject O={org} CN={cn} does not match node {node:?}"));
    }
    Ok(())
}

/// Signs a DER CSR as `NewCertFromCa` does: only its public key, CN and O are used.
fn sign(shared: &Shared, csr_der: &[u8]) -> std::result::Result<(Vec<u8>, String), String> {
    let csr = X509Req::from_der(csr_der).map_err(|e| format!("failed to parse CSR: {e}"))?;
    let public = csr.public_key().map_err(|e| format!("CSR public key: {e}"))?;
    let cn = name_entry(csr.subject_name(), Nid::COMMONNAME);
    let org = name_entry(csr.subject_name(), Nid::ORGANIZATIONNAME);
    let lifetime = shared.cert_lifetime_secs.load(Ordering::SeqCst) as i64;
    let build = || -> std::result::Result<(Vec<u8>, String), openssl::error::ErrorStack> {
        let mut name = X509NameBuilder::new()?;
        if !org.is_empty() {
            name.append_entry_by_nid(Nid::ORGANIZATIONNAME, &org)?;
        }
        if !cn.is_empty() {
            name.append_entry_by_nid(Nid::COMMONNAME, &cn)?;
        }
        let name = name.build();
        let mut serial = BigNum::new()?;
        serial.rand(63, MsbOption::MAYBE_ZERO, false)?;
        let serial_hex = serial.to_hex_str()?.to_ascii_lowercase();
        let now = unix_now();
        let mut b = X509::builder()?;
        b.set_version(2)?;
        let serial_number = serial.to_asn1_integer()?;
        let not_before = Asn1Time::from_unix(now)?;
        let not_after = Asn1Time::from_unix(now + lifetime)?;
        b.set_serial_number(&serial_number)?;
        b.set_subject_name(&name)?;
        b.set_issuer_name(shared.ca_cert.subject_name())?;
        b.set_not_before(&not_before)?;
        b.set_not_after(&not_after)?;
        b.set_pubkey(&public)?;
        b.append_extension(KeyUsage::new().digital_signature().key_encipherment().build()?)?;
        b.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
        b.sign(&shared.ca_key, MessageDigest::sha256())?;
        Ok((b.build().to_der()?, serial_hex))
    };
    build().map_err(|e| format!("failed to sign certificate: {e}"))
}

fn name_entry(name: &openssl::x509::X509NameRef, nid: Nid) -> String {
    name.entries_by_nid(nid).next().and_then(|e| e.data().to_string().ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_round_trip_expiry_and_tampering() {
        let key = b"ca key der bytes";
        let now = 1_700_000_000;
        let jwt = mint_jwt(key, now + 60).unwrap();
        assert!(jwt.starts_with("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."), "{jwt}");
        verify_jwt(&jwt, key, now).unwrap();
        assert!(verify_jwt(&jwt, key, now + 61).unwrap_err().contains("expired"));
        assert!(verify_jwt(&jwt, b"other key", now).unwrap_err().contains("signature"));
        assert!(verify_jwt("a.b", key, now).unwrap_err().contains("segments"));
        let mut forged: Vec<&str> = jwt.split('.').collect();
        let claims = base64url(format!(r#"{{"exp":{}}}"#, now + 999_999).as_bytes());
        forged[1] = &claims;
        assert!(verify_jwt(&forged.join("."), key, now).unwrap_err().contains("signature"));
    }

    #[test]
    fn base64url_round_trip() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 250) as u8).collect();
            let text = base64url(&bytes);
            assert!(!text.contains(['+', '/', '=']));
            assert_eq!(base64url_decode(&text).unwrap(), bytes);
        }
    }
}
