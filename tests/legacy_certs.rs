//! Certificates from older clouds over real TLS on 127.0.0.1 (issue 12, protocol §5.5): a pair
//! whose CN is `kubeedge.io` (what clouds up to v1.20 issue) is used with exactly one warning when
//! no join token is configured, and the cloud decides (and its first rotation asks for a
//! `system:node:<node>` certificate); with a token the node joins for one as before.
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::certs::store::{self, PairPaths};
use edgehub::certs::{self, Unusable};
use edgehub::cloudsim::{CertServer, CertServerConfig, SimEvent};
use edgehub::{Agent, Config};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

const LEGACY_CN: &str = "kubeedge.io";

/// A simulator with its certificate server, and an edge whose files hold a legacy-CN pair from
/// the simulator's CA.
struct LegacyEdge {
    cloud: Cloud,
    certs: CertServer,
    edge: TempDir,
}

impl LegacyEdge {
    fn start() -> LegacyEdge {
        let cloud = Cloud::start();
        let certs = CertServer::start(CertServerConfig::from_pki(&cloud.pki)).unwrap();
        let edge = LegacyEdge { cloud, certs, edge: TempDir::new("legacy-edge") };
        let c = edge.config(None);
        let (cert, key) = edge.cloud.pki.issue_legacy_client(30).unwrap();
        let paths = PairPaths::new(&c.tls_private_key_file, &c.tls_cert_file).unwrap();
        store::install(&paths, &key, &cert).unwrap();
        store::write_file_atomic(&c.tls_ca_file, &edge.cloud.pki.ca_cert_pem, 0o644).unwrap();
        edge
    }

    /// The simulator's agent config with the edge's files, the certificate server, and `token`.
    fn config(&self, token: Option<String>) -> Config {
        let mut c = self.cloud.config();
        c.tls_ca_file = self.edge.path().join("ca/rootCA.crt");
        c.tls_cert_file = self.edge.path().join("certs/edge.crt");
        c.tls_private_key_file = self.edge.path().join("certs/edge.key");
        c.http_server = self.certs.url();
        c.token = token.unwrap_or_default();
        c
    }

    fn wait_connected_as(&self) -> String {
        self.cloud.wait_for("a connection", |e| match e {
            SimEvent::Connected { node, client_cn, .. } if node == NODE => Some(client_cn.clone()),
            _ => None,
        })
    }
}

#[test]
fn legacy_cn_without_a_token_connects_with_exactly_one_warning() {
    let _w = watchdog(Duration::from_secs(60));
    let e = LegacyEdge::start();
    let c = e.config(None);
    let wrong = certs::inspect(&c).unwrap_err();
    assert!(matches!(&wrong, Unusable::WrongNode { common_name, .. } if common_name == LEGACY_CN));
    assert_eq!(certs::usable(&c).unwrap().common_name, LEGACY_CN);

    let file = e.edge.path().join("config.json");
    let json = serde_json::json!({
        "nodeName": NODE,
        "websocket": {"server": c.websocket.server},
        "httpServer": c.http_server,
        "tlsCaFile": c.tls_ca_file,
        "tlsCertFile": c.tls_cert_file,
        "tlsPrivateKeyFile": c.tls_private_key_file,
        "stateDir": e.edge.path().join("state"),
        "localApiSocket": e.edge.path().join("api.sock"),
        "heartbeat": 0.3,
        "reconnectJitter": 0,
    });
    std::fs::write(&file, json.to_string()).unwrap();
    let log_path = e.edge.path().join("agent.log");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(["run", "--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    // It connects with the legacy certificate, and again after the link drops (a second dial
    // reads and checks the files again, and the rotation thread has looked at them meanwhile).
    assert_eq!(e.wait_connected_as(), LEGACY_CN);
    e.cloud.sim.cut(NODE);
    assert_eq!(e.wait_connected_as(), LEGACY_CN);
    let pid = agent.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = agent.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{log}");
    let warnings: Vec<&str> =
        log.lines().filter(|l| l.contains("[WARN]") && l.contains(LEGACY_CN)).collect();
    assert_eq!(warnings.len(), 1, "exactly one warning about the legacy certificate:\n{log}");
    assert!(warnings[0].contains("no join token is configured"), "{}", warnings[0]);
    assert!(!log.contains("a new token is needed"), "{log}");
    assert!(!log.contains("renewing it now"), "the rotation thread left it alone:\n{log}");
}

#[test]
fn legacy_cn_with_a_token_joins_for_a_node_certificate_then_connects() {
    let _w = watchdog(Duration::from_secs(60));
    let e = LegacyEdge::start();
    let c = e.config(Some(e.certs.token().unwrap()));
    assert!(certs::usable(&c).is_err(), "with a token a legacy CN is not used");
    let joined = certs::ensure(&c).unwrap();
    assert_eq!(joined.common_name, format!("system:node:{NODE}"));
    assert_eq!(certs::inspect(&c).unwrap(), joined);

    let agent = Agent::start(c, Vec::new()).unwrap();
    assert_eq!(e.wait_connected_as(), format!("system:node:{NODE}"));
    agent.stop();
}

#[test]
fn a_certificate_for_another_node_is_not_legacy_and_still_needs_a_token() {
    let _w = watchdog(Duration::from_secs(30));
    let e = LegacyEdge::start();
    let c = e.config(None);
    let (cert, key) = e.cloud.pki.issue_client("other-node", -1, 30).unwrap();
    let paths = PairPaths::new(&c.tls_private_key_file, &c.tls_cert_file).unwrap();
    store::install(&paths, &key, &cert).unwrap();
    assert!(!certs::is_legacy_cn("system:node:other-node") && certs::is_legacy_cn(LEGACY_CN));
    assert!(matches!(certs::usable(&c), Err(Unusable::WrongNode { .. })));
    let text = certs::ensure(&c).unwrap_err().to_string();
    assert!(text.contains("a new token is needed"), "{text}");
}

#[test]
fn a_legacy_certificate_becomes_a_node_certificate_at_its_first_rotation_without_a_token() {
    let _w = watchdog(Duration::from_secs(60));
    let e = LegacyEdge::start();
    let c = e.config(None);
    // O=KubeEdge: the legacy subject HEAD's certificate server still rotates (protocol §5.4).
    // A 10 s lifetime puts the rotation 6-8 s from now.
    let (cert, key) = e.cloud.pki.issue_client_with_subject(LEGACY_CN, "KubeEdge", -1, 9).unwrap();
    let paths = PairPaths::new(&c.tls_private_key_file, &c.tls_cert_file).unwrap();
    store::install(&paths, &key, &cert).unwrap();
    assert_eq!(certs::ensure(&c).unwrap().common_name, LEGACY_CN);
    let agent = Agent::start(c.clone(), Vec::new()).unwrap();
    assert_eq!(e.wait_connected_as(), LEGACY_CN);

    // The rotation asks for system:node:<node> over mutual TLS, then the link reconnects with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotated = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match e.cloud.events.recv_timeout(left) {
            Ok(SimEvent::Connected { client_cn, .. }) => break client_cn,
            Ok(_) => {}
            Err(_) => panic!("no reconnect with a rotated certificate within 30 s"),
        }
    };
    assert_eq!(rotated, format!("system:node:{NODE}"));
    assert_eq!(certs::inspect(&c).unwrap().common_name, rotated);
    agent.stop();
}
