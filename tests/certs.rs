//! Certificates over real TLS on 127.0.0.1 (protocol §5, §8 W17–W24): joining with a token against
//! the simulator's certificate server and then connecting, the ways a join must fail clearly,
//! the check at start (expired, wrong node), rotation with a lifetime of a few seconds while
//! numbered messages flow, a crash between the two file writes, and the key's file mode.
#![cfg(feature = "cloudsim")]

mod support;

use crossbeam_channel::Receiver;
use edgehub::certs::store::{self, CrashPoint, PairPaths};
use edgehub::certs::{self, http::Abort, Token, Unusable};
use edgehub::cloudsim::certserver::{mint_token, Auth, CertRequest};
use edgehub::cloudsim::{CertServer, CertServerConfig, Pki, SimEvent};
use edgehub::{link, message, Agent, Config, ErrorKind};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::*;

/// A simulator, its certificate server, and a directory for the edge's files.
struct Joinable {
    cloud: Cloud,
    certs: CertServer,
    requests: Receiver<CertRequest>,
    edge: TempDir,
}

impl Joinable {
    fn start(tune: impl FnOnce(&mut CertServerConfig)) -> Joinable {
        let cloud = Cloud::start();
        let mut cfg = CertServerConfig::from_pki(&cloud.pki);
        tune(&mut cfg);
        let certs = CertServer::start(cfg).unwrap();
        let requests = certs.requests();
        Joinable { cloud, certs, requests, edge: TempDir::new("edge") }
    }

    /// The simulator's agent config, with the certificate files in `edge/` (not there yet), the
    /// certificate server and a valid token.
    fn config(&self) -> Config {
        let mut c = self.cloud.config();
        c.tls_ca_file = self.edge.path().join("ca/rootCA.crt");
        c.tls_cert_file = self.edge.path().join("certs/edge.crt");
        c.tls_private_key_file = self.edge.path().join("certs/edge.key");
        c.http_server = self.certs.url();
        c.token = self.certs.token().unwrap();
        c.validate().unwrap();
        c
    }

    fn wait_request(&self, what: &str, mut want: impl FnMut(&CertRequest) -> bool) -> CertRequest {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.requests.recv_timeout(left) {
                Ok(r) if want(&r) => return r,
                Ok(_) => {}
                Err(_) => panic!("no {what} within {PATIENCE:?}"),
            }
        }
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn serial_of(path: &Path) -> String {
    let cert = openssl::x509::X509::from_pem(&std::fs::read(path).unwrap()).unwrap();
    cert.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_ascii_lowercase()
}

#[test]
fn join_end_to_end_then_the_agent_connects_and_the_token_is_not_used_again() {
    let _w = watchdog(Duration::from_secs(30));
    let j = Joinable::start(|_| {});
    let token_file = j.edge.path().join("bootstrap-token");
    std::fs::write(&token_file, format!("{}\n", j.certs.token().unwrap())).unwrap();
    let mut config = j.config();
    config.token = String::new();
    config.token_file = token_file.clone();

    let info = certs::ensure(&config).unwrap();
    assert_eq!(info.common_name, format!("system:node:{NODE}"));
    let ca = j.wait_request("GET /ca.crt", |r| r.path == "/ca.crt");
    assert_eq!((ca.status, ca.auth, ca.had_authorization), (200, Auth::None, false));
    let signed = j.wait_request("GET /edge.crt", |r| r.path == "/edge.crt");
    assert_eq!((signed.status, signed.auth, signed.had_authorization), (200, Auth::Token, true));
    assert_eq!(signed.node, NODE);
    assert_eq!(signed.issued_serial, info.serial);

    // Files: the CA as PEM, the key as SEC1 PEM with mode 0600, the certificate 0644.
    let ca_written = openssl::x509::X509::from_pem(&std::fs::read(&config.tls_ca_file).unwrap());
    let ca_sim = openssl::x509::X509::from_pem(&j.cloud.pki.ca_cert_pem).unwrap();
    assert_eq!(ca_written.unwrap().to_der().unwrap(), ca_sim.to_der().unwrap());
    let key_pem = std::fs::read_to_string(&config.tls_private_key_file).unwrap();
    assert!(key_pem.starts_with("-----BEGIN EC PRIVATE KEY-----"), "{}", &key_pem[..40]);
    assert_eq!(mode(&config.tls_private_key_file), 0o600);
    assert_eq!(mode(&config.tls_cert_file), 0o644);
    assert_eq!(certs::inspect(&config), Ok(info.clone()));

    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let agent = Agent::start(config.clone(), vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    let cn = j.cloud.wait_for("connected", |e| match e {
        SimEvent::Connected { client_cn, .. } => Some(client_cn.clone()),
        _ => None,
    });
    assert_eq!(cn, format!("system:node:{NODE}"));
    agent.stop();

    // The token file stays, but is not read while the certificate is usable.
    std::fs::write(&token_file, "not a token").unwrap();
    assert_eq!(certs::ensure(&config).unwrap(), info);
    assert!(j.requests.try_recv().is_err(), "no request to the certificate server");
}

#[test]
fn w17_token_for_another_ca_is_refused_before_anything_is_written() {
    let _w = watchdog(Duration::from_secs(20));
    let j = Joinable::start(|_| {});
    let other = Pki::generate(NODE).unwrap();
    let wrong = mint_token(&other.ca_cert_pem, &other.ca_key_pem, unix_now() + 3600).unwrap();
    let mut config = j.config();
    config.token = wrong.clone();
    let e = certs::ensure(&config).unwrap_err();
    let text = format!("{e} {:?}", std::error::Error::source(&e));
    assert!(text.contains("sha256") && text.contains("the token pins"), "{text}");
    assert!(text.contains(Token::parse(&wrong).unwrap().ca_hash()), "{text}");
    assert!(!text.contains(wrong.split_once('.').unwrap().1), "the jwt is never shown: {text}");
    // Only the CA was asked for; nothing is on disk.
    let only = j.wait_request("GET /ca.crt", |_| true);
    assert_eq!(only.path, "/ca.crt");
    assert!(j.requests.try_recv().is_err());
    assert!(!config.tls_cert_file.exists() && !config.tls_ca_file.exists());
}

#[test]
fn expired_token_gives_the_status_and_body_ref_400_and_head_401() {
    let _w = watchdog(Duration::from_secs(20));
    for (head, expected) in [
        (false, "HTTP 400 Bad Request: Invalid authorization token"),
        (true, "HTTP 401 Unauthorized: token validation failure, token is expired"),
    ] {
        let j = Joinable::start(|c| c.head_errors = head);
        let expired = j.certs.token_expiring_at(unix_now() - 60).unwrap();
        let token = Token::parse(&expired).unwrap();
        let e = certs::join(&j.config(), &token, &Abort::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Handshake, "{e}");
        let text = e.to_string();
        assert!(text.contains(expected), "{text}");
        assert!(text.contains("/edge.crt"), "{text}");
        assert!(!j.config().tls_cert_file.exists());
    }
}

#[test]
fn w18_empty_200_body_is_a_clear_error() {
    let _w = watchdog(Duration::from_secs(20));
    let j = Joinable::start(|_| {});
    j.certs.set_empty_body(true);
    let config = j.config();
    let e = certs::join(&config, &Token::parse(&config.token).unwrap(), &Abort::new());
    let text = e.unwrap_err().to_string();
    assert!(text.contains("HTTP 200 OK with an empty body instead of a certificate"), "{text}");
    let r = j.wait_request("GET /edge.crt", |r| r.path == "/edge.crt");
    assert_eq!((r.status, r.issued_serial.as_str()), (200, ""));
    assert!(!config.tls_cert_file.exists());
}

#[test]
fn w20_expired_or_foreign_certificate_at_start_rejoins_with_a_token_or_says_one_is_needed() {
    let _w = watchdog(Duration::from_secs(20));
    let j = Joinable::start(|_| {});
    let mut config = j.config();
    let (expired_cert, expired_key) = j.cloud.pki.issue_client(NODE, -10, -1).unwrap();
    std::fs::create_dir_all(config.tls_cert_file.parent().unwrap()).unwrap();
    std::fs::create_dir_all(config.tls_ca_file.parent().unwrap()).unwrap();
    std::fs::write(&config.tls_ca_file, &j.cloud.pki.ca_cert_pem).unwrap();
    std::fs::write(&config.tls_cert_file, &expired_cert).unwrap();
    std::fs::write(&config.tls_private_key_file, &expired_key).unwrap();

    // No token: a clear error naming the date.
    let token = std::mem::take(&mut config.token);
    let Err(Unusable::Expired { not_after, .. }) = certs::inspect(&config) else {
        panic!("not seen as expired: {:?}", certs::inspect(&config));
    };
    assert!((unix_now() - 86_400 - not_after).abs() < 60, "expired a day ago");
    let text = certs::ensure(&config).unwrap_err().to_string();
    assert!(text.contains(&format!("expired on {}", certs::rfc3339(not_after))), "{text}");
    assert!(text.contains("a new token is needed"), "{text}");

    // With a token: joins again and replaces the pair.
    config.token = token.clone();
    let info = certs::ensure(&config).unwrap();
    assert!(info.not_after > unix_now());
    assert_eq!(mode(&config.tls_private_key_file), 0o600);

    // A certificate for another node is treated the same way.
    let (foreign_cert, foreign_key) = j.cloud.pki.issue_client("other-node", -1, 30).unwrap();
    let paths = PairPaths::new(&config.tls_private_key_file, &config.tls_cert_file).unwrap();
    store::install(&paths, &foreign_key, &foreign_cert).unwrap();
    let wrong = certs::inspect(&config).unwrap_err();
    assert!(wrong.to_string().contains("is for system:node:other-node"), "{wrong}");
    config.token = String::new();
    assert!(certs::ensure(&config).unwrap_err().to_string().contains("a new token is needed"));
    config.token = token;
    let rejoined = certs::ensure(&config).unwrap();
    assert_eq!(rejoined.common_name, format!("system:node:{NODE}"));
}

/// Sends numbered messages through `hub` every few milliseconds until `stop` is set; returns
/// how many it sent.
fn send_numbered_until(hub: edgehub::modules::Hub, stop: Arc<AtomicBool>) -> u32 {
    let mut next = 0;
    while !stop.load(Ordering::SeqCst) {
        hub.send(numbered(next)).unwrap();
        next += 1;
        // Pacing of the producer, not synchronisation: the test waits on events below.
        std::thread::sleep(Duration::from_millis(5));
    }
    next
}

/// Waits until every seq in 0..count arrived at the cloud; returns how many arrived twice.
fn collect_numbered(cloud: &Cloud, seen: &mut Vec<u32>, count: u32) -> usize {
    let mut present = vec![false; count as usize];
    let mut duplicates = 0;
    for &s in seen.iter() {
        if (s as usize) < present.len() {
            duplicates += usize::from(present[s as usize]);
            present[s as usize] = true;
        }
    }
    while present.iter().any(|p| !p) {
        let s = cloud.wait_for("numbered message", |e| match e {
            SimEvent::Received { msg, .. } => seq_of(msg),
            _ => None,
        });
        seen.push(s);
        if (s as usize) < present.len() {
            duplicates += usize::from(present[s as usize]);
            present[s as usize] = true;
        }
    }
    duplicates
}

#[test]
fn rotation_gets_a_new_certificate_reconnects_and_loses_no_message() {
    let _w = watchdog(Duration::from_secs(60));
    let j = Joinable::start(|c| c.cert_lifetime = Duration::from_secs(3));
    let config = j.config();
    let first = certs::ensure(&config).unwrap();
    j.wait_request("join", |r| r.path == "/edge.crt" && r.auth == Auth::Token);
    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let agent = Agent::start(config.clone(), vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    assert!(agent_threads().contains(&"eh-certs".to_owned()), "{:?}", agent_threads());

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (hub, stop) = (agent.hub(), stop.clone());
        std::thread::spawn(move || send_numbered_until(hub, stop))
    };
    let mut serials = vec![first.serial.clone()];
    let mut seen = Vec::new();
    for round in 0..2 {
        let r = j.wait_request("rotation", |r| r.path == "/edge.crt");
        assert_eq!((r.status, r.auth), (200, Auth::Mtls), "round {round}: {r:?}");
        assert!(!r.had_authorization, "rotation sends no token");
        assert_eq!(r.client_cn, format!("system:node:{NODE}"));
        serials.push(r.issued_serial.clone());
        wait_connection_event(&probe_rx, message::CLOUD_DISCONNECTED);
        wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
        assert_eq!(serial_of(&config.tls_cert_file), r.issued_serial);
        assert_eq!(mode(&config.tls_private_key_file), 0o600);
    }
    stop.store(true, Ordering::SeqCst);
    let sent = producer.join().unwrap();
    // Messages flowed while the certificate changed twice; how many depends on the machine
    // (issue 11: no count within a time window), so only that some did.
    assert!(sent >= 10, "only {sent} messages sent");
    let duplicates = collect_numbered(&j.cloud, &mut seen, sent);
    serials.dedup();
    assert_eq!(serials.len(), 3, "two new certificates: {serials:?}");
    eprintln!("{sent} messages across 2 rotations, {duplicates} delivered twice");
    agent.stop();
}

#[test]
fn failed_rotation_is_retried_with_backoff_then_succeeds() {
    let _w = watchdog(Duration::from_secs(60));
    let j = Joinable::start(|c| c.cert_lifetime = Duration::from_secs(6));
    let mut config = j.config();
    certs::ensure(&config).unwrap();
    j.wait_request("join", |r| r.path == "/edge.crt" && r.auth == Auth::Token);
    config.token = String::new(); // rotation must succeed over mutual TLS alone
    let agent = Agent::start(config.clone(), vec![]).unwrap();
    j.cloud.wait_connected();
    j.certs.set_empty_body(true);
    let failed = j.wait_request("failed rotation", |r| r.path == "/edge.crt");
    let failed_at = Instant::now();
    assert_eq!((failed.auth, failed.issued_serial.as_str()), (Auth::Mtls, ""));
    j.certs.set_empty_body(false);
    let retried = j.wait_request("retried rotation", |r| r.path == "/edge.crt");
    let gap = failed_at.elapsed();
    assert_eq!((retried.status, retried.auth), (200, Auth::Mtls), "{retried:?}");
    assert!(!retried.issued_serial.is_empty());
    // The first retry waits min(2 s, lifetime / 20) = 0.3 s.
    assert!(gap >= Duration::from_millis(250), "retried after {gap:?}");
    j.cloud.wait_connected();
    assert_eq!(serial_of(&config.tls_cert_file), retried.issued_serial);
    agent.stop();
}

#[test]
fn w19_crash_between_the_two_writes_leaves_a_consistent_pair_on_restart() {
    let _w = watchdog(Duration::from_secs(60));
    let j = Joinable::start(|_| {});
    let (new_cert, new_key) = j.cloud.pki.issue_client(NODE, -1, 30).unwrap();
    let new_serial = serial_of_pem(&new_cert);
    let old_serial = serial_of_pem(&j.cloud.pki.client_cert_pem);
    for point in CrashPoint::ALL {
        for from_store in [false, true] {
            // The old pair as edgecore leaves it (two plain files), or as edgehub installs it.
            let dir = TempDir::new("crash");
            let mut config = j.cloud.config();
            config.tls_cert_file = dir.path().join("edge.crt");
            config.tls_private_key_file = dir.path().join("edge.key");
            let paths =
                PairPaths::new(&config.tls_private_key_file, &config.tls_cert_file).unwrap();
            if from_store {
                store::install(&paths, &j.cloud.pki.client_key_pem, &j.cloud.pki.client_cert_pem)
                    .unwrap();
            } else {
                std::fs::write(&config.tls_cert_file, &j.cloud.pki.client_cert_pem).unwrap();
                std::fs::write(&config.tls_private_key_file, &j.cloud.pki.client_key_pem).unwrap();
            }
            let crashed = store::install_crashing(&paths, &new_key, &new_cert, Some(point));
            // "Restart": what the agent's start check and its dial read.
            let info = certs::inspect(&config)
                .unwrap_or_else(|e| panic!("{point:?} from_store={from_store}: {e}"));
            assert!(
                info.serial == old_serial || info.serial == new_serial,
                "{point:?}: {}",
                info.serial
            );
            if crashed.is_err() && point != CrashPoint::AfterCommit {
                assert_eq!(info.serial, old_serial, "{point:?} from_store={from_store}");
            }
            link::tls_connector(&config).unwrap();
            let adopted = from_store
                || !matches!(point, CrashPoint::AdoptCommitted | CrashPoint::AfterCertLink);
            if adopted {
                assert_eq!(mode(&config.tls_private_key_file), 0o600, "{point:?}");
            }
            if point == CrashPoint::BetweenKeyAndCert && !from_store {
                // A restarted agent connects with the pair it finds.
                let agent = Agent::start(config.clone(), vec![]).unwrap();
                j.cloud.wait_connected();
                agent.stop();
            }
        }
    }
}

#[test]
fn stopping_the_agent_cancels_a_certificate_request_in_flight() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    // A server that accepts TCP and then never answers: the TLS handshake would wait 30 s.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = cloud.config();
    config.http_server = format!("https://{}", black_hole.local_addr().unwrap());
    config.token =
        mint_token(&cloud.pki.ca_cert_pem, &cloud.pki.ca_key_pem, unix_now() + 60).unwrap();
    // An expired certificate makes the rotation thread renew at once, with the token.
    let dir = TempDir::new("expired");
    let (cert, key) = cloud.pki.issue_client(NODE, -10, -1).unwrap();
    config.tls_cert_file = dir.path().join("edge.crt");
    config.tls_private_key_file = dir.path().join("edge.key");
    std::fs::write(&config.tls_cert_file, cert).unwrap();
    std::fs::write(&config.tls_private_key_file, key).unwrap();
    let (accepted_tx, accepted_rx) = crossbeam_channel::bounded(1);
    let acceptor = std::thread::spawn(move || {
        let (socket, _) = black_hole.accept().unwrap();
        accepted_tx.send(()).unwrap();
        socket // held open until the test ends
    });
    let agent = Agent::start(config, vec![]).unwrap();
    recv_within(&accepted_rx, "the rotation's connection to the black hole");
    let stopping = Instant::now();
    agent.stop();
    let took = stopping.elapsed();
    // Far below the request's own 30 s timeout, with room for a busy machine (issue 11).
    assert!(took < Duration::from_secs(10), "stop waited {took:?} for the request");
    drop(acceptor.join().unwrap());
}

fn serial_of_pem(pem: &[u8]) -> String {
    let cert = openssl::x509::X509::from_pem(pem).unwrap();
    cert.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_ascii_lowercase()
}

mod binary {
    use super::*;
    use std::process::Command;

    fn write_config(j: &Joinable, token: Option<&str>) -> std::path::PathBuf {
        let c = j.config();
        let file = j.edge.path().join("config.json");
        let mut json = serde_json::json!({
            "nodeName": NODE,
            "websocket": {"server": c.websocket.server},
            "httpServer": c.http_server,
            "tlsCaFile": c.tls_ca_file,
            "tlsCertFile": c.tls_cert_file,
            "tlsPrivateKeyFile": c.tls_private_key_file,
            "stateDir": j.edge.path().join("state"),
        });
        if let Some(token) = token {
            json["token"] = token.into();
        }
        std::fs::write(&file, json.to_string()).unwrap();
        file
    }

    #[test]
    fn edgehub_join_writes_the_pair_and_never_prints_the_token() {
        let _w = watchdog(Duration::from_secs(30));
        let j = Joinable::start(|_| {});
        let file = write_config(&j, None);
        let token = j.certs.token().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_edgehub"))
            .args(["join", "--config", file.to_str().unwrap(), "--token", &token])
            .output()
            .unwrap();
        let (stdout, stderr) =
            (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains(&format!("joined as system:node:{NODE}")), "{stdout}");
        let jwt = token.split_once('.').unwrap().1;
        assert!(!stdout.contains(jwt) && !stderr.contains(jwt), "token printed: {stderr}");
        assert!(stderr.contains("matches the token"), "{stderr}");
        let c = j.config();
        assert_eq!(mode(&c.tls_private_key_file), 0o600);
        assert!(certs::inspect(&c).is_ok());
    }

    #[test]
    fn edgehub_run_with_an_expired_certificate_and_no_token_exits_naming_the_date() {
        let _w = watchdog(Duration::from_secs(30));
        let j = Joinable::start(|_| {});
        let c = j.config();
        let (cert, key) = j.cloud.pki.issue_client(NODE, -10, -1).unwrap();
        let paths = PairPaths::new(&c.tls_private_key_file, &c.tls_cert_file).unwrap();
        store::install(&paths, &key, &cert).unwrap();
        store::write_file_atomic(&c.tls_ca_file, &j.cloud.pki.ca_cert_pem, 0o644).unwrap();
        let file = write_config(&j, None);
        let out = Command::new(env!("CARGO_BIN_EXE_edgehub"))
            .args(["run", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("expired on") && stderr.contains("a new token is needed"),
            "{stderr}"
        );
    }
}
