//! The edge's certificates (protocol §5): checking the pair at start, joining a cluster with a
//! KubeEdge token, and rotating the certificate before it expires. It owns the files named by
//! `tlsCaFile`, `tlsCertFile` and `tlsPrivateKeyFile`; the link only reads them at each dial.
//!
//! - **Check** ([`inspect`]): the CA, certificate and key must parse, the key must belong to the
//!   certificate, the certificate must chain to the CA, be valid now and carry
//!   `CN=system:node:<nodeName>`. Anything else makes the pair unusable ([`Unusable`]): KubeEdge
//!   never checks expiry at start (§8 W20). One exception ([`usable`]): with no token configured,
//!   a legacy CN such as `kubeedge.io` (clouds up to v1.20) is used, with one warning at start.
//! - **Join** ([`join`], [`ensure`] at start): `GET /ca.crt` without server verification, trusted
//!   only because its SHA-256 equals the token's first part (constant-time compare; §5.2, §5.3,
//!   and unlike §8 W17 the status is checked); a fresh ECDSA P-256 key and a PKCS#10 CSR for
//!   `CN=system:node:<nodeName>, O=system:nodes`; `GET /edge.crt` with the DER CSR as body,
//!   `Authorization: Bearer <jwt>` and `NodeName`, the server now verified against the pinned CA
//!   (§5.4); the answer must be a certificate for our key from that CA (an empty 200 is an error,
//!   §8 W18). Then the CA is written as PEM and the pair installed.
//! - **Rotation** ([`Rotation`], thread `eh-certs`): at a random point in [70 %, 90 %] of the
//!   certificate's lifetime, the same `GET /edge.crt` over mutual TLS with the current pair and no
//!   token (§5.6), retried with exponential backoff; then the new pair is installed and the
//!   supervisor is asked to reconnect over a channel. A certificate that is already unusable is
//!   renewed with the configured token if there is one.
//!
//! Files: the key and certificate are switched as one pair by `store` (a crash leaves the old
//! pair or the new one, §8 W19), the key is SEC1 `EC PRIVATE KEY` PEM with mode 0600 (§8 W23), the
//! CA is written atomically before the pair: a crash between the two leaves a pair that does not
//! chain to the CA, which the check treats as missing, so the next start joins again. Fetching
//! never holds a lock; only the file reads and the install take [`pair_lock`], which the
//! supervisor also takes while it reads the files for a dial, so a dial never reads half of a
//! switch. The token is never logged, and is not read at all while the certificate is usable.

pub mod boot_join;
pub mod http;
pub mod store;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::message::random_u64;
use crossbeam_channel::{bounded, select, Receiver, Sender};
use http::{Abort, BaseUrl, Request};
use native_tls::{Certificate, Identity, Protocol, TlsConnector};
use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509NameBuilder, X509Ref, X509ReqBuilder, X509StoreContext, X509};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::PairPaths;

/// CloudHub's certificate endpoints (`common/constants/default.go`, protocol §5.1).
pub const CA_PATH: &str = "/ca.crt";
pub const CERT_PATH: &str = "/edge.crt";
/// The CSR subject of a node since KubeEdge v1.16 (protocol §5.5).
pub const NODE_CN_PREFIX: &str = "system:node:";
pub const NODE_ORGANIZATION: &str = "system:nodes";
/// Deadline of one certificate request, connect to last byte (edgecore's 30 s client timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Rotation happens at a random point in this part of the lifetime (protocol §5.6).
pub const ROTATE_FROM: f64 = 0.7;
pub const ROTATE_TO: f64 = 0.9;
/// Backoff of a failed rotation: 2 s doubling to 32 s (edgecore: 2 s ×2, 5 steps, then every
/// 32 s), but never more than a twentieth of the certificate's lifetime, so a short-lived one
/// still gets a try or two before it expires.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(32);
const RETRY_MIN: Duration = Duration::from_millis(100);
/// The rotation thread wakes at least this often to look at the files again, so a pair replaced
/// from outside (`edgehub join`) or a clock that jumped is noticed.
const RECHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Key generation and a TLS handshake: OpenSSL's needs, no deep recursion.
const ROTATION_STACK_BYTES: usize = 256 << 10;
/// A returned certificate starting more than this in the future means the clocks disagree.
const CLOCK_SKEW_WARNING_SECS: i64 = 60;
const NEW_TOKEN_HINT: &str =
    "a new token is needed (config key token or tokenFile, or `edgehub join --token <token>`)";

/// Serialises reading and switching the pair within the process: the rotation's install, the
/// start check and the supervisor's reads for a dial. Held for file operations only, never across
/// network I/O, and never by a session thread.
pub fn pair_lock() -> MutexGuard<'static, ()> {
    static PAIR_LOCK: Mutex<()> = Mutex::new(());
    PAIR_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `keadm gettoken` token: `<sha256 of the CA DER, hex>.<HS256 JWT>` (protocol §5.3). Its
/// Debug shows the CA hash only; the JWT is a secret.
#[derive(Clone)]
pub struct Token {
    ca_hash: String,
    jwt: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token {{ ca_hash: {}, jwt: <redacted> }}", self.ca_hash)
    }
}

impl Token {
    /// # Errors
    /// `Config` saying what is wrong, without quoting the token.
    pub fn parse(text: &str) -> Result<Token> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        if parts.len() != 4 || parts.iter().any(|p| p.is_empty()) {
            return Err(ErrorKind::Config.msg(format!(
                "token: expected <caHash>.<jwt>, 4 non-empty parts separated by dots, got {} part(s)",
                parts.len()
            )));
        }
        if parts[0].len() != 64 || !parts[0].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ErrorKind::Config
                .msg("token: the first part must be the CA's sha256 as 64 hex digits"));
        }
        Ok(Token { ca_hash: parts[0].to_ascii_lowercase(), jwt: parts[1..].join(".") })
    }

    /// The token from the config: key `token`, else the file named by `tokenFile`, else none.
    ///
    /// # Errors
    /// `Config` when the token file cannot be read or a token is malformed.
    pub fn configured(config: &Config) -> Result<Option<Token>> {
        if !config.token.trim().is_empty() {
            return Token::parse(&config.token).map(Some);
        }
        if config.token_file.as_os_str().is_empty() {
            return Ok(None);
        }
        let path = &config.token_file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| ErrorKind::Config.msg(format!("tokenFile {}", path.display())).src(e))?;
        Token::parse(&text)
            .map(Some)
            .map_err(|e| ErrorKind::Config.msg(format!("tokenFile {}", path.display())).src(e))
    }

    /// The CA hash the token pins (not secret).
    pub fn ca_hash(&self) -> &str {
        &self.ca_hash
    }
}

/// What the agent needs to know about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    /// Lower-case hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl CertInfo {
    fn of(cert: &X509Ref) -> Result<CertInfo> {
        let common_name = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok())
            .unwrap_or_default();
        let serial = cert
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_hex_str().map(|s| s.to_ascii_lowercase()))
            .unwrap_or_default();
        Ok(CertInfo {
            common_name,
            serial,
            not_before: unix_of(cert.not_before())?,
            not_after: unix_of(cert.not_after())?,
        })
    }

    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(self.not_after.saturating_sub(self.not_before).max(0) as u64)
    }
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} serial {} valid {} to {}",
            crate::logging::shown(&self.common_name),
            self.serial,
            rfc3339(self.not_before),
            rfc3339(self.not_after)
        )
    }
}

/// Why the pair on disk cannot be used. Each case is treated as "no certificate": the agent joins
/// again if it has a token, and otherwise says a new token is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// A file is missing or unreadable, or the three do not belong together.
    Missing(String),
    Expired {
        path: PathBuf,
        not_after: i64,
    },
    NotYetValid {
        path: PathBuf,
        not_before: i64,
        now: i64,
    },
    /// The CN is not `system:node:<nodeName>` (edgecore since v1.21 re-joins too, §5.5).
    WrongNode {
        path: PathBuf,
        common_name: String,
        node_name: String,
    },
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::Missing(why) => write!(f, "no usable certificate: {why}"),
            Unusable::Expired { path, not_after } => {
                write!(f, "certificate {} expired on {}", path.display(), rfc3339(*not_after))
            }
            Unusable::NotYetValid { path, not_before, now } => write!(
                f,
                "certificate {} is not valid before {} (the clock says {})",
                path.display(),
                rfc3339(*not_before),
                rfc3339(*now)
            ),
            Unusable::WrongNode { path, common_name, node_name } => write!(
                f,
                "certificate {} is for {common_name}, not {NODE_CN_PREFIX}{node_name}",
                path.display()
            ),
        }
    }
}

/// Checks the CA, certificate and key named in the config (see the file doc).
pub fn inspect(config: &Config) -> std::result::Result<CertInfo, Unusable> {
    check_pair(config, false)
}

/// True for a CN outside the `system:node:` naming, such as `kubeedge.io`, which clouds up to
/// v1.20 put in every node's certificate (protocol §5.5). A `system:node:<other>` certificate is
/// not legacy: it names another node (a copied pair or a wrong `nodeName`).
pub fn is_legacy_cn(common_name: &str) -> bool {
    !common_name.starts_with(NODE_CN_PREFIX)
}

/// What the agent runs with: [`inspect`], except that with no join token configured a
/// certificate with a legacy CN ([`is_legacy_cn`]) is usable. KubeEdge's cloud checks the CN only
/// when `cloudHub.authorization.enable` is set (off by default), so the cloud decides. With a
/// token the node re-joins for a `system:node:` certificate instead, as for any unusable pair.
pub fn usable(config: &Config) -> std::result::Result<CertInfo, Unusable> {
    check_pair(config, !config.has_token())
}

/// [`inspect`]; `legacy_ok` accepts a legacy CN too.
fn check_pair(config: &Config, legacy_ok: bool) -> std::result::Result<CertInfo, Unusable> {
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| Unusable::Missing(format!("{key} {}: {e}", path.display())))
    };
    let (ca_pem, cert_pem, key_pem) = {
        let _pair = pair_lock();
        (
            read("tlsCaFile", &config.tls_ca_file)?,
            read("tlsCertFile", &config.tls_cert_file)?,
            read("tlsPrivateKeyFile", &config.tls_private_key_file)?,
        )
    };
    let missing = |key: &str, path: &Path, why: String| {
        Unusable::Missing(format!("{key} {}: {why}", path.display()))
    };
    let cas = X509::stack_from_pem(&ca_pem)
        .map_err(|e| missing("tlsCaFile", &config.tls_ca_file, e.to_string()))?;
    if cas.is_empty() {
        return Err(missing("tlsCaFile", &config.tls_ca_file, "no PEM certificate".into()));
    }
    let chain = X509::stack_from_pem(&cert_pem)
        .map_err(|e| missing("tlsCertFile", &config.tls_cert_file, e.to_string()))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(missing("tlsCertFile", &config.tls_cert_file, "no PEM certificate".into()));
    };
    let key = PKey::private_key_from_pem(&key_pem)
        .map_err(|e| missing("tlsPrivateKeyFile", &config.tls_private_key_file, e.to_string()))?;
    if !leaf.public_key().is_ok_and(|public| public.public_eq(&key)) {
        return Err(Unusable::Missing(format!(
            "tlsPrivateKeyFile {} does not belong to the certificate in tlsCertFile {}",
            config.tls_private_key_file.display(),
            config.tls_cert_file.display()
        )));
    }
    if let Err(why) = verify_chain(leaf, intermediates, &cas) {
        return Err(Unusable::Missing(format!(
            "certificate {} was not issued by the CA in tlsCaFile {}: {why}",
            config.tls_cert_file.display(),
            config.tls_ca_file.display()
        )));
    }
    let info = CertInfo::of(leaf)
        .map_err(|e| missing("tlsCertFile", &config.tls_cert_file, e.to_string()))?;
    let path = config.tls_cert_file.clone();
    let now = unix_now();
    if info.not_before > now {
        return Err(Unusable::NotYetValid { path, not_before: info.not_before, now });
    }
    if info.not_after <= now {
        return Err(Unusable::Expired { path, not_after: info.not_after });
    }
    let legacy = legacy_ok && is_legacy_cn(&info.common_name);
    if info.common_name != node_cn(config) && !legacy {
        return Err(Unusable::WrongNode {
            path,
            common_name: info.common_name,
            node_name: config.node_name.clone(),
        });
    }
    Ok(info)
}

/// At start: a usable pair is used as is (the token is not even read); otherwise the node joins
/// with the configured token; without one, the error says a new token is needed. A legacy-CN
/// certificate with no token configured is usable ([`usable`]) and logged once as a warning.
///
/// # Errors
/// `Tls` "certificate … expired on DATE; a new token is needed …" and the like when there is no
/// token; whatever [`join`] returns when joining fails.
pub fn ensure(config: &Config) -> Result<CertInfo> {
    let unusable = match usable(config) {
        Ok(info) if info.common_name != node_cn(config) => {
            // The one warning about it: the rotation thread and the dials use it silently.
            log::warn!(
                "certificate {} is for {}, not {}: using it because no join token is configured \
                 (the cloud accepts it unless cloudHub.authorization is enabled); configure a \
                 token to join for a {NODE_CN_PREFIX} certificate",
                config.tls_cert_file.display(),
                info.common_name,
                node_cn(config)
            );
            return Ok(info);
        }
        Ok(info) => {
            log::info!("certificate {}: {info}", config.tls_cert_file.display());
            return Ok(info);
        }
        Err(unusable) => unusable,
    };
    let token = Token::configured(config).map_err(|e| {
        ErrorKind::Config.msg(format!("{unusable}, and the join token cannot be used")).src(e)
    })?;
    let Some(token) = token else {
        return Err(needs_token(&unusable));
    };
    log::info!("{unusable}: joining with the configured token");
    join(config, &token, &Abort::new())
        .map_err(|e| ErrorKind::Tls.msg(format!("{unusable}, and joining failed")).src(e))
}

fn needs_token(unusable: &Unusable) -> Error {
    ErrorKind::Tls.msg(format!("{unusable}; {NEW_TOKEN_HINT}"))
}

/// Joins the cluster with `token` (protocol §5.2–5.5) and installs the CA and the new pair.
/// Replaces a usable pair too: it is what `edgehub join` asks for.
///
/// # Errors
/// `Config` (bad `httpServer`), `Tls` (the CA does not match the token, untrusted server),
/// `Handshake` (connection failed, or a status other than 200, quoting the body), `Protocol`
/// (empty or unusable certificate), `Timeout`, `Io` (writing the files), `Full` (a request for
/// this pair is already running).
pub fn join(config: &Config, token: &Token, abort: &Abort) -> Result<CertInfo> {
    let _renewing = Renewing::start(config)?;
    let issued = obtain_by_token(config, token, abort)?;
    commit(config, &issued, None)?;
    log::info!(
        "joined as {}: certificate {} written to {} (key {}, CA {})",
        issued.info.common_name,
        issued.info.serial,
        config.tls_cert_file.display(),
        config.tls_private_key_file.display(),
        config.tls_ca_file.display()
    );
    Ok(issued.info)
}

/// A certificate obtained but not yet on disk.
struct Issued {
    info: CertInfo,
    key_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    /// Set when joining: the pinned CA, to be written with the pair.
    ca_pem: Option<Vec<u8>>,
}

fn obtain_by_token(config: &Config, token: &Token, abort: &Abort) -> Result<Issued> {
    let base = BaseUrl::parse(&config.http_server)?;
    log::info!("joining the cluster through {base} as {}", node_cn(config));
    // No server verification for the CA itself (§5.2): trust rests on the token's hash.
    let ca_url = base.url(CA_PATH);
    let ca_der = http::get(
        &base,
        Request { path: CA_PATH, headers: &[], body: &[] },
        &bootstrap_connector()?,
        REQUEST_TIMEOUT,
        abort,
    )?;
    let ca_hash = hex(&openssl::sha::sha256(&ca_der));
    let pinned = ca_hash.len() == token.ca_hash.len()
        && openssl::memcmp::eq(ca_hash.as_bytes(), token.ca_hash.as_bytes());
    if !pinned {
        return Err(ErrorKind::Tls.msg(format!(
            "the CA from {ca_url} has sha256 {ca_hash} but the token pins {}: the token is for \
             another cluster, or something between here and the cloud answered",
            token.ca_hash
        )));
    }
    let ca = X509::from_der(&ca_der).map_err(|e| {
        ErrorKind::Protocol
            .msg(format!("the CA from {ca_url} ({} bytes) is not a DER certificate", ca_der.len()))
            .src(e)
    })?;
    log::info!("CA from {ca_url} matches the token (sha256 {ca_hash})");
    let (key, csr) = new_key_and_csr(&config.node_name)?;
    let authorization = format!("Bearer {}", token.jwt);
    let headers = [("Authorization", authorization.as_str()), ("NodeName", &config.node_name)];
    let cert_der = http::get(
        &base,
        Request { path: CERT_PATH, headers: &headers, body: &csr },
        &pinned_connector(std::slice::from_ref(&ca), None)?,
        REQUEST_TIMEOUT,
        abort,
    )?;
    let mut issued = accept_certificate(config, &base, &cert_der, &key, std::slice::from_ref(&ca))?;
    issued.ca_pem = Some(ca.to_pem().map_err(tls_err("encode CA as PEM"))?);
    Ok(issued)
}

/// Rotation proper (§5.6): a new key and certificate over mutual TLS with the current pair.
fn obtain_by_mtls(config: &Config, abort: &Abort) -> Result<Issued> {
    let base = BaseUrl::parse(&config.http_server)?;
    let read = |key: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| ErrorKind::Tls.msg(format!("read {key} {}", path.display())).src(e))
    };
    let (ca_pem, cert_pem, key_pem) = {
        let _pair = pair_lock();
        (
            read("tlsCaFile", &config.tls_ca_file)?,
            read("tlsCertFile", &config.tls_cert_file)?,
            read("tlsPrivateKeyFile", &config.tls_private_key_file)?,
        )
    };
    let cas = X509::stack_from_pem(&ca_pem).map_err(tls_err("parse tlsCaFile"))?;
    let current_key = PKey::private_key_from_pem(&key_pem)
        .and_then(|k| k.private_key_to_pem_pkcs8())
        .map_err(tls_err("parse tlsPrivateKeyFile"))?;
    let identity = Identity::from_pkcs8(&cert_pem, &current_key)
        .map_err(|e| ErrorKind::Tls.msg("use the current certificate as client identity").src(e))?;
    let (key, csr) = new_key_and_csr(&config.node_name)?;
    let headers = [("NodeName", config.node_name.as_str())];
    let cert_der = http::get(
        &base,
        Request { path: CERT_PATH, headers: &headers, body: &csr },
        &pinned_connector(&cas, Some(identity))?,
        REQUEST_TIMEOUT,
        abort,
    )?;
    accept_certificate(config, &base, &cert_der, &key, &cas)
}

/// Checks what `/edge.crt` returned: a certificate, for our key, from the CA, for this node.
fn accept_certificate(
    config: &Config,
    base: &BaseUrl,
    der: &[u8],
    key: &PKey<Private>,
    cas: &[X509],
) -> Result<Issued> {
    let url = base.url(CERT_PATH);
    if der.is_empty() {
        return Err(ErrorKind::Protocol.msg(format!(
            "GET {url}: HTTP 200 OK with an empty body instead of a certificate (CloudHub \
             answers so when it cannot sign the request, protocol §8 W18)"
        )));
    }
    let cert = X509::from_der(der).map_err(|e| {
        ErrorKind::Protocol
            .msg(format!("GET {url}: the body ({} bytes) is not a DER certificate", der.len()))
            .src(e)
    })?;
    if !cert.public_key().is_ok_and(|public| public.public_eq(key)) {
        return Err(ErrorKind::Protocol
            .msg(format!("GET {url}: the certificate is not for the key in our request")));
    }
    verify_chain(&cert, &[], cas).map_err(|why| {
        ErrorKind::Tls.msg(format!("GET {url}: the certificate is not from the pinned CA: {why}"))
    })?;
    let info = CertInfo::of(&cert)?;
    if info.common_name != node_cn(config) {
        return Err(ErrorKind::Protocol.msg(format!(
            "GET {url}: the certificate is for {}, not {}",
            crate::logging::shown(&info.common_name),
            node_cn(config)
        )));
    }
    let now = unix_now();
    if info.not_after <= now {
        return Err(ErrorKind::Protocol
            .msg(format!("GET {url}: the certificate expired on {}", rfc3339(info.not_after))));
    }
    if info.not_before > now + CLOCK_SKEW_WARNING_SECS {
        log::warn!(
            "the new certificate is valid only from {} but the clock says {}: check the clock",
            rfc3339(info.not_before),
            rfc3339(now)
        );
    }
    let key_pem = key
        .ec_key()
        .and_then(|ec| ec.private_key_to_pem())
        .map_err(tls_err("encode the key as SEC1 PEM"))?;
    let cert_pem = cert.to_pem().map_err(tls_err("encode the certificate as PEM"))?;
    Ok(Issued { info, key_pem, cert_pem, ca_pem: None })
}

/// Writes the CA (when joining) and switches the pair, then, still under the pair lock, asks the
/// supervisor to reconnect: a dial that read the files before the switch will be ended, one that
/// reads them after drains the request first (see `session`).
fn commit(config: &Config, issued: &Issued, reconnect_tx: Option<&Sender<()>>) -> Result<()> {
    let paths = PairPaths::new(&config.tls_private_key_file, &config.tls_cert_file)?;
    let _pair = pair_lock();
    if let Some(ca_pem) = &issued.ca_pem {
        store::write_file_atomic(&config.tls_ca_file, ca_pem, store::CERT_MODE)?;
    }
    store::install(&paths, &issued.key_pem, &issued.cert_pem)?;
    if let Some(tx) = reconnect_tx {
        // Full means a reconnect is already pending, which will use these files: coalesced.
        let _ = tx.try_send(());
    }
    Ok(())
}

/// Marks a pair (by its key path) as being renewed, so two requests for it never run at once.
struct Renewing(PathBuf);

/// Key paths being renewed now; a handful at most, so a Vec.
fn renewing_now() -> MutexGuard<'static, Vec<PathBuf>> {
    static RENEWING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    RENEWING.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Renewing {
    fn start(config: &Config) -> Result<Renewing> {
        let key = config.tls_private_key_file.clone();
        let mut now = renewing_now();
        if now.contains(&key) {
            return Err(ErrorKind::Full
                .msg(format!("a certificate request for {} is already running", key.display())));
        }
        now.push(key.clone());
        Ok(Renewing(key))
    }
}

impl Drop for Renewing {
    fn drop(&mut self) {
        renewing_now().retain(|k| *k != self.0);
    }
}

/// The rotation thread (`eh-certs`). Stop it with [`Rotation::stop`]; dropping it stops and joins
/// it too.
pub struct Rotation {
    stop_tx: Option<Sender<()>>,
    abort: Abort,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Rotation")
    }
}

impl Rotation {
    /// Starts rotating the pair named in `config`. After each installed pair one `()` is offered
    /// on `reconnect_tx` (without blocking: a full channel already holds a pending reconnect).
    ///
    /// # Errors
    /// `Io` when the thread cannot be spawned.
    pub fn spawn(config: Arc<Config>, reconnect_tx: Sender<()>) -> Result<Rotation> {
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let abort = Abort::new();
        let thread_abort = abort.clone();
        let thread = std::thread::Builder::new()
            .name("eh-certs".to_owned())
            .stack_size(ROTATION_STACK_BYTES)
            .spawn(move || rotate_until_stopped(&config, &reconnect_tx, &stop_rx, &thread_abort))
            .map_err(|e| ErrorKind::Io.msg("spawn certificate rotation thread").src(e))?;
        Ok(Rotation { stop_tx: Some(stop_tx), abort, thread: Some(thread) })
    }

    /// Tells the thread to stop and cancels a request in flight, without waiting.
    pub fn signal_stop(&mut self) {
        drop(self.stop_tx.take());
        self.abort.fire();
    }

    /// Stops the thread and joins it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.signal_stop();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("bug: certificate rotation thread panicked");
            }
        }
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// When to rotate the certificate with this serial (drawn once per certificate).
struct Schedule {
    serial: String,
    at: f64,
    lifetime: Duration,
}

fn rotate_until_stopped(
    config: &Config,
    reconnect_tx: &Sender<()>,
    stop_rx: &Receiver<()>,
    abort: &Abort,
) {
    let mut schedule: Option<Schedule> = None;
    loop {
        let wait = match usable(config) {
            Ok(info) => {
                if !matches!(&schedule, Some(s) if s.serial == info.serial) {
                    let fraction = ROTATE_FROM + (ROTATE_TO - ROTATE_FROM) * random_fraction();
                    let at = info.not_before as f64 + fraction * info.lifetime().as_secs_f64();
                    log::info!(
                        "certificate {} valid until {}: rotation at {} ({:.0} % of its lifetime)",
                        info.serial,
                        rfc3339(info.not_after),
                        rfc3339(at as i64),
                        fraction * 100.0
                    );
                    let lifetime = info.lifetime();
                    schedule = Some(Schedule { serial: info.serial, at, lifetime });
                }
                let at = schedule.as_ref().map_or(0.0, |s| s.at);
                Duration::from_secs_f64((at - unix_now_f64()).max(0.0))
            }
            Err(unusable) => {
                log::warn!("{unusable}: renewing it now");
                Duration::ZERO
            }
        };
        if wait > RECHECK_INTERVAL {
            if sleep_or_stop(stop_rx, RECHECK_INTERVAL) {
                return;
            }
            continue;
        }
        if sleep_or_stop(stop_rx, wait) {
            return;
        }
        let mut retry = RETRY_FIRST;
        loop {
            match renew(config, abort, reconnect_tx) {
                Ok(info) => {
                    log::info!("certificate rotated: {info}; reconnecting with it");
                    break;
                }
                Err(_) if abort.is_fired() => return,
                Err(e) => {
                    let cap = schedule.as_ref().map_or(RETRY_MAX, |s| s.lifetime / 20);
                    let delay = retry.min(cap).max(RETRY_MIN);
                    log::warn!(
                        "certificate rotation failed, next try in {:.1} s: {e}",
                        delay.as_secs_f64()
                    );
                    if sleep_or_stop(stop_rx, delay) {
                        return;
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// One rotation attempt: over mutual TLS while the pair is usable, else with the configured
/// token, else an error saying a new token is needed.
fn renew(config: &Config, abort: &Abort, reconnect_tx: &Sender<()>) -> Result<CertInfo> {
    let _renewing = Renewing::start(config)?;
    let issued = match usable(config) {
        Ok(current) => {
            log::info!("rotating certificate {} over mutual TLS", current.serial);
            obtain_by_mtls(config, abort)?
        }
        Err(unusable) => match Token::configured(config)? {
            Some(token) => {
                log::info!("{unusable}: joining again with the configured token");
                let issued = obtain_by_token(config, &token, abort)?;
                log::info!("joined again as {}", issued.info.common_name);
                issued
            }
            None => return Err(needs_token(&unusable)),
        },
    };
    commit(config, &issued, Some(reconnect_tx))?;
    Ok(issued.info)
}

/// Waits for `wait` unless a stop comes first; true when stopping.
fn sleep_or_stop(stop_rx: &Receiver<()>, wait: Duration) -> bool {
    select! {
        recv(stop_rx) -> _ => true,
        default(wait) => false,
    }
}

/// A fresh ECDSA P-256 key and a DER PKCS#10 request for `CN=system:node:<node>, O=system:nodes`
/// (protocol §5.5; O before CN, in Go's RDN order).
fn new_key_and_csr(node_name: &str) -> Result<(PKey<Private>, Vec<u8>)> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(tls_err("p-256 curve"))?;
    let key = EcKey::generate(&group)
        .and_then(PKey::from_ec_key)
        .map_err(tls_err("generate an ecdsa p-256 key"))?;
    let cn = format!("{NODE_CN_PREFIX}{node_name}");
    let build = || -> std::result::Result<Vec<u8>, ErrorStack> {
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_nid(Nid::ORGANIZATIONNAME, NODE_ORGANIZATION)?;
        name.append_entry_by_nid(Nid::COMMONNAME, &cn)?;
        let name = name.build();
        let mut req = X509ReqBuilder::new()?;
        req.set_version(0)?;
        req.set_subject_name(&name)?;
        req.set_pubkey(&key)?;
        req.sign(&key, MessageDigest::sha256())?;
        req.build().to_der()
    };
    let csr = build()
        .map_err(|e| ErrorKind::Tls.msg(format!("build a certificate request for {cn}")).src(e))?;
    Ok((key, csr))
}

/// For `GET /ca.crt` only: any server, because the body is checked against the token's hash.
fn bootstrap_connector() -> Result<TlsConnector> {
    TlsConnector::builder()
        .danger_accept_invalid_certs(true)
        .danger_accept_invalid_hostnames(true)
        .disable_built_in_roots(true)
        .min_protocol_version(Some(Protocol::Tlsv12))
        .build()
        .map_err(|e| ErrorKind::Tls.msg("build tls client").src(e))
}

/// Trusts only `cas` (the pinned or stored CA), optionally showing a client certificate.
fn pinned_connector(cas: &[X509], identity: Option<Identity>) -> Result<TlsConnector> {
    let mut builder = TlsConnector::builder();
    builder.disable_built_in_roots(true).min_protocol_version(Some(Protocol::Tlsv12));
    for ca in cas {
        let der = ca.to_der().map_err(tls_err("encode CA"))?;
        let ca = Certificate::from_der(&der).map_err(|e| ErrorKind::Tls.msg("use CA").src(e))?;
        builder.add_root_certificate(ca);
    }
    if let Some(identity) = identity {
        builder.identity(identity);
    }
    builder.build().map_err(|e| ErrorKind::Tls.msg("build tls client").src(e))
}

/// Verifies the signatures from `leaf` up to one of `cas`. Time is left out: callers check it
/// themselves to say *when* a certificate expired. An intermediate CA may serve as the anchor.
fn verify_chain(
    leaf: &X509Ref,
    intermediates: &[X509],
    cas: &[X509],
) -> std::result::Result<(), String> {
    let run = || -> std::result::Result<(bool, String), ErrorStack> {
        let mut store = X509StoreBuilder::new()?;
        for ca in cas {
            store.add_cert(ca.clone())?;
        }
        store.set_flags(X509VerifyFlags::NO_CHECK_TIME | X509VerifyFlags::PARTIAL_CHAIN)?;
        let store = store.build();
        let mut chain = Stack::new()?;
        for cert in intermediates {
            chain.push(cert.clone())?;
        }
        let mut context = X509StoreContext::new()?;
        context.init(&store, leaf, &chain, |c| {
            Ok((c.verify_cert()?, c.error().error_string().to_owned()))
        })
    };
    match run() {
        Ok((true, _)) => Ok(()),
        Ok((false, why)) => Err(why),
        Err(e) => Err(e.to_string()),
    }
}

fn node_cn(config: &Config) -> String {
    format!("{NODE_CN_PREFIX}{}", config.node_name)
}

fn tls_err(what: &'static str) -> impl Fn(ErrorStack) -> Error {
    move |e| ErrorKind::Tls.msg(what).src(e)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A uniform number in [0, 1).
fn random_fraction() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn unix_now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn unix_of(time: &Asn1TimeRef) -> Result<i64> {
    let epoch = Asn1Time::from_unix(0).map_err(tls_err("certificate time"))?;
    let diff = epoch.diff(time).map_err(tls_err("certificate time"))?;
    Ok(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

/// Unix seconds as `2026-03-05T12:00:00Z` (one implementation, with the node status's).
pub fn rfc3339(unix: i64) -> String {
    crate::modules::node_status::rfc3339(unix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_772_712_000), "2026-03-05T12:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn token_parsing_never_quotes_the_token() {
        let hash = "A".repeat(64);
        let t = Token::parse(&format!(" {hash}.eyJh.eyJl.c2ln\n")).unwrap();
        assert_eq!(t.ca_hash(), "a".repeat(64));
        assert_eq!(t.jwt, "eyJh.eyJl.c2ln");
        assert!(!format!("{t:?}").contains("eyJ"));
        for bad in ["", "a.b.c", "a.b.c.d.e", &format!("{hash}..b.c"), "xyz.a.b.c"] {
            let e = Token::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("config error: token:"), "{e}");
            assert!(!e.contains("a.b"), "{e}");
        }
    }

    #[test]
    fn csr_has_the_node_subject_and_a_p256_key() {
        let (key, der) = new_key_and_csr("gw-1").unwrap();
        let req = openssl::x509::X509Req::from_der(&der).unwrap();
        assert!(req.verify(&key).unwrap());
        let entry = |nid| {
            req.subject_name().entries_by_nid(nid).next().unwrap().data().to_string().unwrap()
        };
        assert_eq!(entry(Nid::COMMONNAME), "system:node:gw-1");
        assert_eq!(entry(Nid::ORGANIZATIONNAME), "system:nodes");
        assert_eq!(key.ec_key().unwrap().group().curve_name(), Some(Nid::X9_62_PRIME256V1));
    }
}
