//! The agent's TLS client checks the server certificate's name or address against the configured
//! server, and trusts only `tlsCaFile` (the system trust store is never loaded). Over real TLS on
//! loopback, with the simulator's certificate (SANs 127.0.0.1, ::1, localhost).
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::{link, ErrorKind};
use std::time::Duration;
use support::*;

#[test]
fn a_server_certificate_for_another_address_is_refused() {
    let _w = watchdog(Duration::from_secs(30));
    // Listening on every address, so 127.0.0.2 (loopback too, not in the certificate) connects.
    let cloud = Cloud::start_with(|c| c.listen = "0.0.0.0:0".parse().unwrap());
    let port = cloud.sim.addr().port();

    let mut config = cloud.config_to(&format!("127.0.0.2:{port}"));
    let tls = link::tls_connector(&config).unwrap();
    let err = link::connect(&config, &tls).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    let text = err.to_string();
    assert!(text.contains("tls handshake with 127.0.0.2"), "{text}");
    assert!(text.contains("IP address mismatch"), "{text}");

    // The same server by an address and a name its certificate holds.
    for server in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        config.websocket.server = server;
        let link = link::connect(&config, &tls).unwrap_or_else(|e| panic!("{e}"));
        link.shutdown();
    }
}
