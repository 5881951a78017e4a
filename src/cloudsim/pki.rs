//! Throwaway certificates for the tests and the demo: a CA, a CloudHub server certificate and an
//! edge client certificate, all ECDSA P-256 as cloudcore makes them (protocol §2.2, §5.5). It only
//! mints and writes PEM; loading and checking certificates on the edge belongs to `certs`.

use crate::error::{ErrorKind, Result};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509NameRef, X509Ref, X509};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds in a day, for the validity offsets.
const DAY_SECS: i64 = 24 * 60 * 60;
/// Leaf and CA certificates start an hour in the past, so a clock a little behind still accepts them.
const NOT_BEFORE_SLACK_SECS: i64 = 60 * 60;
/// Default lifetime of every generated certificate.
const VALIDITY_DAYS: i64 = 365;

/// A CA with one server and one client certificate, all as PEM bytes.
///
/// Private keys are SEC1 `EC PRIVATE KEY` PEM, the form KubeEdge writes (protocol §5.5). Generate a
/// second, unrelated `Pki` to get a CA the simulator does not trust.
#[derive(Clone)]
pub struct Pki {
    pub ca_cert_pem: Vec<u8>,
    pub ca_key_pem: Vec<u8>,
    pub server_cert_pem: Vec<u8>,
    pub server_key_pem: Vec<u8>,
    pub client_cert_pem: Vec<u8>,
    pub client_key_pem: Vec<u8>,
}

impl fmt::Debug for Pki {
    /// Names the type only: the keys are secrets even when throwaway.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pki { .. }")
    }
}

/// Where [`Pki::write_to`] put each file.
#[derive(Clone, Debug)]
pub struct PkiPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    /// SEC1 `EC PRIVATE KEY`, as KubeEdge writes it.
    pub client_key: PathBuf,
    /// The same client key as PKCS#8 `PRIVATE KEY`.
    pub client_key_pkcs8: PathBuf,
}

impl Pki {
    /// Makes a fresh CA, a server certificate for `127.0.0.1`, `::1` and `localhost`, and a client
    /// certificate for `system:node:<node_name>` in `system:nodes`.
    pub fn generate(node_name: &str) -> Result<Pki> {
        let ca_key = new_key()?;
        let ca_cert = build_ca(&ca_key)?;
        let server_key = new_key()?;
        let server_cert = build_server(&ca_cert, &ca_key, &server_key)?;
        let client_key = new_key()?;
        let client_cert = build_client(
            &ca_cert,
            &ca_key,
            &client_key,
            &node_cn(node_name),
            NODE_ORGANIZATION,
            -NOT_BEFORE_SLACK_SECS,
            VALIDITY_DAYS * DAY_SECS,
        )?;
        Ok(Pki {
            ca_cert_pem: cert_pem(&ca_cert)?,
            ca_key_pem: sec1_pem(&ca_key)?,
            server_cert_pem: cert_pem(&server_cert)?,
            server_key_pem: sec1_pem(&server_key)?,
            client_cert_pem: cert_pem(&client_cert)?,
            client_key_pem: sec1_pem(&client_key)?,
        })
    }

    /// Issues another client certificate from this CA, valid from now + `not_before_days_offset`
    /// days until now + `not_after_days_offset` days (negative offsets lie in the past, so
    /// `(-10, -1)` gives an expired certificate). Returns `(cert_pem, sec1_key_pem)`.
    pub fn issue_client(
        &self,
        node_name: &str,
        not_before_days_offset: i64,
        not_after_days_offset: i64,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        self.issue_client_with_subject(
            &node_cn(node_name),
            NODE_ORGANIZATION,
            not_before_days_offset * DAY_SECS,
            not_after_days_offset * DAY_SECS,
        )
    }

    /// Issues a client certificate with the subject edges requested from clouds up to v1.20
    /// (`CN=kubeedge.io`, `O=kubeEdge`, protocol §5.5), valid from an hour ago for `days` days.
    /// Returns `(cert_pem, sec1_key_pem)`.
    pub fn issue_legacy_client(&self, days: i64) -> Result<(Vec<u8>, Vec<u8>)> {
        self.issue_client_with_subject(
            "kubeedge.io",
            "kubeEdge",
            -NOT_BEFORE_SLACK_SECS,
            days * DAY_SECS,
        )
    }

    /// Issues a client certificate for any subject `CN=<cn>, O=<organization>`, valid from now +
    /// `not_before_offset_secs` until now + `not_after_offset_secs`. Returns
    /// `(cert_pem, sec1_key_pem)`.
    pub fn issue_client_with_subject(
        &self,
        cn: &str,
        organization: &str,
        not_before_offset_secs: i64,
        not_after_offset_secs: i64,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let ca_cert = X509::from_pem(&self.ca_cert_pem)
            .map_err(|e| ErrorKind::Tls.msg("parse ca cert").src(e))?;
        let ca_key = PKey::private_key_from_pem(&self.ca_key_pem)
            .map_err(|e| ErrorKind::Tls.msg("parse ca key").src(e))?;
        let key = new_key()?;
        let cert = build_client(
            &ca_cert,
            &ca_key,
            &key,
            cn,
            organization,
            not_before_offset_secs,
            not_after_offset_secs,
        )?;
        Ok((cert_pem(&cert)?, sec1_pem(&key)?))
    }

    /// The client key as PKCS#8 `PRIVATE KEY` PEM (what native-tls's `Identity::from_pkcs8` takes).
    pub fn client_key_pkcs8_pem(&self) -> Result<Vec<u8>> {
        to_pkcs8(&self.client_key_pem)
    }

    /// Writes `ca.crt`, `server.crt`, `server.key`, `client.crt`, `client.key` and
    /// `client-pkcs8.key` into `dir` (created if missing). Key files get mode 0600.
    pub fn write_to(&self, dir: &Path) -> Result<PkiPaths> {
        fs::create_dir_all(dir)
            .map_err(|e| ErrorKind::Io.msg(format!("create directory {}", dir.display())).src(e))?;
        let paths = PkiPaths {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            client_key_pkcs8: dir.join("client-pkcs8.key"),
        };
        write_file(&paths.ca_cert, &self.ca_cert_pem, false)?;
        write_file(&paths.server_cert, &self.server_cert_pem, false)?;
        write_file(&paths.server_key, &self.server_key_pem, true)?;
        write_file(&paths.client_cert, &self.client_cert_pem, false)?;
        write_file(&paths.client_key, &self.client_key_pem, true)?;
        write_file(&paths.client_key_pkcs8, &self.client_key_pkcs8_pem()?, true)?;
        Ok(paths)
    }
}

/// Converts a private key PEM (SEC1 or PKCS#8) to PKCS#8 PEM.
pub fn to_pkcs8(key_pem: &[u8]) -> Result<Vec<u8>> {
    let key = PKey::private_key_from_pem(key_pem)
        .map_err(|e| ErrorKind::Tls.msg("parse private key").src(e))?;
    key.private_key_to_pem_pkcs8().map_err(|e| ErrorKind::Tls.msg("encode pkcs#8 key").src(e))
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if secret {
            options.mode(0o600);
        }
    }
    let context = || format!("write {}", path.display());
    let mut file = options.open(path).map_err(|e| ErrorKind::Io.msg(context()).src(e))?;
    // The mode above applies only when the file is created; an existing key file is tightened too.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| ErrorKind::Io.msg(context()).src(e))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents).map_err(|e| ErrorKind::Io.msg(context()).src(e))
}

fn tls_err(what: &'static str) -> impl Fn(openssl::error::ErrorStack) -> crate::Error {
    move |e| ErrorKind::Tls.msg(what).src(e)
}

fn new_key() -> Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(tls_err("p-256 group"))?;
    let ec = EcKey::generate(&group).map_err(tls_err("generate ec key"))?;
    PKey::from_ec_key(ec).map_err(tls_err("wrap ec key"))
}

fn sec1_pem(key: &PKey<Private>) -> Result<Vec<u8>> {
    key.ec_key().and_then(|ec| ec.private_key_to_pem()).map_err(tls_err("encode ec key"))
}

fn cert_pem(cert: &X509) -> Result<Vec<u8>> {
    cert.to_pem().map_err(tls_err("encode certificate"))
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn build_name(entries: &[(Nid, &str)]) -> Result<X509Name> {
    let mut name = X509NameBuilder::new().map_err(tls_err("name builder"))?;
    for (nid, value) in entries {
        name.append_entry_by_nid(*nid, value).map_err(tls_err("certificate name"))?;
    }
    Ok(name.build())
}

/// A v3 certificate builder with a random serial, subject, issuer, validity and public key set.
fn base_builder(
    subject: &[(Nid, &str)],
    issuer: &X509NameRef,
    key: &PKey<Private>,
    not_before_offset_secs: i64,
    not_after_offset_secs: i64,
) -> Result<X509Builder> {
    let name = build_name(subject)?;
    let mut serial = BigNum::new().map_err(tls_err("serial"))?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false).map_err(tls_err("serial"))?;
    let serial = serial.to_asn1_integer().map_err(tls_err("serial"))?;
    let now = now_unix();
    let not_before =
        Asn1Time::from_unix(now + not_before_offset_secs).map_err(tls_err("not before"))?;
    let not_after =
        Asn1Time::from_unix(now + not_after_offset_secs).map_err(tls_err("not after"))?;

    let mut b = X509Builder::new().map_err(tls_err("x509 builder"))?;
    b.set_version(2).map_err(tls_err("x509 version"))?;
    b.set_serial_number(&serial).map_err(tls_err("serial"))?;
    b.set_subject_name(&name).map_err(tls_err("subject"))?;
    b.set_issuer_name(issuer).map_err(tls_err("issuer"))?;
    b.set_not_before(&not_before).map_err(tls_err("not before"))?;
    b.set_not_after(&not_after).map_err(tls_err("not after"))?;
    b.set_pubkey(key).map_err(tls_err("public key"))?;
    Ok(b)
}

fn build_ca(key: &PKey<Private>) -> Result<X509> {
    let subject = [(Nid::COMMONNAME, "edgehub test ca"), (Nid::ORGANIZATIONNAME, "KubeEdge")];
    // Self-signed: the issuer is the subject.
    let issuer = build_name(&subject)?;
    let mut b =
        base_builder(&subject, &issuer, key, -NOT_BEFORE_SLACK_SECS, VALIDITY_DAYS * DAY_SECS)?;
    let bc =
        BasicConstraints::new().critical().ca().build().map_err(tls_err("basic constraints"))?;
    b.append_extension(bc).map_err(tls_err("basic constraints"))?;
    let ku = KeyUsage::new()
        .critical()
        .key_cert_sign()
        .crl_sign()
        .digital_signature()
        .build()
        .map_err(tls_err("key usage"))?;
    b.append_extension(ku).map_err(tls_err("key usage"))?;
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(None, None))
        .map_err(tls_err("subject key id"))?;
    b.append_extension(ski).map_err(tls_err("subject key id"))?;
    b.sign(key, MessageDigest::sha256()).map_err(tls_err("sign ca"))?;
    Ok(b.build())
}

/// Adds the extensions every leaf certificate shares and signs it with the CA.
fn finish_leaf(
    mut b: X509Builder,
    ca_cert: &X509Ref,
    ca_key: &PKey<Private>,
    usage: ExtendedKeyUsage,
    san: Option<SubjectAlternativeName>,
) -> Result<X509> {
    let bc = BasicConstraints::new().critical().build().map_err(tls_err("basic constraints"))?;
    b.append_extension(bc).map_err(tls_err("basic constraints"))?;
    let ku = KeyUsage::new()
        .critical()
        .digital_signature()
        .key_agreement()
        .build()
        .map_err(tls_err("key usage"))?;
    b.append_extension(ku).map_err(tls_err("key usage"))?;
    let eku = usage.build().map_err(tls_err("extended key usage"))?;
    b.append_extension(eku).map_err(tls_err("extended key usage"))?;
    if let Some(san) = san {
        let san = san.build(&b.x509v3_context(Some(ca_cert), None)).map_err(tls_err("san"))?;
        b.append_extension(san).map_err(tls_err("san"))?;
    }
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(Some(ca_cert), None))
        .map_err(tls_err("subject key id"))?;
    b.append_extension(ski).map_err(tls_err("subject key id"))?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(false)
        .build(&b.x509v3_context(Some(ca_cert), None))
        .map_err(tls_err("authority key id"))?;
    b.append_extension(aki).map_err(tls_err("authority key id"))?;
    b.sign(ca_key, MessageDigest::sha256()).map_err(tls_err("sign certificate"))?;
    Ok(b.build())
}

fn build_server(ca_cert: &X509Ref, ca_key: &PKey<Private>, key: &PKey<Private>) -> Result<X509> {
    // cloudcore's own server certificate uses CN and O `KubeEdge` (protocol §2.2).
    let subject = [(Nid::COMMONNAME, "KubeEdge"), (Nid::ORGANIZATIONNAME, "KubeEdge")];
    let b = base_builder(
        &subject,
        ca_cert.subject_name(),
        key,
        -NOT_BEFORE_SLACK_SECS,
        VALIDITY_DAYS * DAY_SECS,
    )?;
    let mut san = SubjectAlternativeName::new();
    san.ip("127.0.0.1").ip("::1").dns("localhost");
    let mut usage = ExtendedKeyUsage::new();
    usage.server_auth();
    finish_leaf(b, ca_cert, ca_key, usage, Some(san))
}

/// The subject CN edgecore puts in its CSR since v1.16 (protocol §0.2), with [`NODE_ORGANIZATION`].
fn node_cn(node_name: &str) -> String {
    format!("system:node:{node_name}")
}

/// The subject organization of a node's client certificate since v1.16.
const NODE_ORGANIZATION: &str = "system:nodes";

fn build_client(
    ca_cert: &X509Ref,
    ca_key: &PKey<Private>,
    key: &PKey<Private>,
    cn: &str,
    organization: &str,
    not_before_offset_secs: i64,
    not_after_offset_secs: i64,
) -> Result<X509> {
    let subject = [(Nid::COMMONNAME, cn), (Nid::ORGANIZATIONNAME, organization)];
    let b = base_builder(
        &subject,
        ca_cert.subject_name(),
        key,
        not_before_offset_secs,
        not_after_offset_secs,
    )?;
    let mut usage = ExtendedKeyUsage::new();
    usage.client_auth();
    finish_leaf(b, ca_cert, ca_key, usage, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_chain_verifies_and_has_the_expected_names() {
        let pki = Pki::generate("edge-1").unwrap();
        let ca = X509::from_pem(&pki.ca_cert_pem).unwrap();
        let client = X509::from_pem(&pki.client_cert_pem).unwrap();
        let server = X509::from_pem(&pki.server_cert_pem).unwrap();
        let ca_pub = ca.public_key().unwrap();
        assert!(client.verify(&ca_pub).unwrap());
        assert!(server.verify(&ca_pub).unwrap());
        let cn = client.subject_name().entries_by_nid(Nid::COMMONNAME).next().unwrap();
        assert_eq!(cn.data().to_string().unwrap(), "system:node:edge-1");
        let sans: Vec<_> = server
            .subject_alt_names()
            .unwrap()
            .iter()
            .map(|n| {
                n.dnsname().map(str::to_owned).or_else(|| n.ipaddress().map(|ip| format!("{ip:?}")))
            })
            .collect();
        assert!(sans.contains(&Some("localhost".to_owned())), "{sans:?}");
        assert_eq!(sans.len(), 3);
        assert!(String::from_utf8_lossy(&pki.client_key_pem).contains("BEGIN EC PRIVATE KEY"));
        let pkcs8 = pki.client_key_pkcs8_pem().unwrap();
        assert!(String::from_utf8_lossy(&pkcs8).contains("BEGIN PRIVATE KEY"));
    }

    #[test]
    fn issue_client_can_make_expired_certificates() {
        let pki = Pki::generate("edge-1").unwrap();
        let (cert, key) = pki.issue_client("edge-1", -10, -1).unwrap();
        let cert = X509::from_pem(&cert).unwrap();
        let now = Asn1Time::days_from_now(0).unwrap();
        assert!(cert.not_after() < now);
        assert!(PKey::private_key_from_pem(&key).is_ok());
    }
}
