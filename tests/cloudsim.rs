#![cfg(feature = "cloudsim")]
//! The CloudHub simulator against a plain test client (native-tls + tungstenite, no edgehub
//! agent code): handshake rules, the ack and no-ack queues, keepalive timeout, replacement,
//! fragmentation, pings and abrupt closes, and the fault-injection proxy in `support/proxy.rs`.
//! Every wait is bounded; a watchdog fails a hung test.

#[path = "support/proxy.rs"]
mod proxy;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use edgehub::cloudsim::{CloudSim, Pki, SimConfig, SimEvent};
use edgehub::message::{text_content, Route};
use edgehub::Message;
use native_tls::{Certificate, Identity, TlsConnector, TlsStream};
use std::net::{SocketAddr, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::WebSocket;

type Client = WebSocket<TlsStream<TcpStream>>;

/// Longest any single expected thing may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(3);
/// Whole-test limit enforced by the watchdog.
const TEST_LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers

/// Exits the process if the test is still running after `TEST_LIMIT`, so a hang fails loudly.
struct Watchdog {
    done_tx: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn new(name: &'static str) -> Watchdog {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let thread = thread::Builder::new()
            .name("sim-watchdog".to_owned())
            .spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(TEST_LIMIT) {
                    eprintln!("test {name} hung for {TEST_LIMIT:?}");
                    std::process::exit(1);
                }
            })
            .expect("spawn watchdog");
        Watchdog { done_tx: Some(done_tx), thread: Some(thread) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done_tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A simulator with a fresh PKI, configured by `tweak`.
fn start(tweak: impl FnOnce(&mut SimConfig)) -> (CloudSim, Pki, Receiver<SimEvent>) {
    let pki = Pki::generate("gw-1").expect("generate pki");
    let mut cfg = SimConfig::new(
        pki.ca_cert_pem.clone(),
        pki.server_cert_pem.clone(),
        pki.server_key_pem.clone(),
    );
    tweak(&mut cfg);
    let sim = CloudSim::start(cfg).expect("start simulator");
    let events = sim.events();
    (sim, pki, events)
}

/// A TLS connector trusting only the test CA, presenting `identity` (cert PEM, SEC1 key PEM).
fn connector(pki: &Pki, identity: Option<(&[u8], &[u8])>) -> TlsConnector {
    let mut b = TlsConnector::builder();
    b.disable_built_in_roots(true);
    b.add_root_certificate(Certificate::from_pem(&pki.ca_cert_pem).expect("ca pem"));
    if let Some((cert, sec1_key)) = identity {
        let pkcs8 = edgehub::cloudsim::pki::to_pkcs8(sec1_key).expect("pkcs8 key");
        b.identity(Identity::from_pkcs8(cert, &pkcs8).expect("identity"));
    }
    b.build().expect("tls connector")
}

/// Dials the simulator with the given headers; any failure comes back as text.
fn dial(
    sim: &CloudSim,
    tls: &TlsConnector,
    headers: &[(&str, &str)],
    config: Option<WebSocketConfig>,
) -> Result<Client, String> {
    dial_addr(sim.addr(), tls, headers, config)
}

fn dial_addr(
    addr: SocketAddr,
    tls: &TlsConnector,
    headers: &[(&str, &str)],
    config: Option<WebSocketConfig>,
) -> Result<Client, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| format!("tcp: {e}"))?;
    tcp.set_read_timeout(Some(PATIENCE)).map_err(|e| e.to_string())?;
    let tls = tls.connect("127.0.0.1", tcp).map_err(|e| format!("tls: {e}"))?;
    let url = format!("wss://{addr}/proj-1/gw-1/events");
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    for (name, value) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("name");
        req.headers_mut().insert(name, value.parse().expect("header value"));
    }
    let (ws, _) = tungstenite::client::client_with_config(req, tls, config)
        .map_err(|e| format!("ws: {e}"))?;
    Ok(ws)
}

/// A well-behaved edge for `node` using the PKI's client certificate.
fn connect(sim: &CloudSim, pki: &Pki, node: &str) -> Client {
    connect_with(sim, pki, node, None)
}

fn connect_with(sim: &CloudSim, pki: &Pki, node: &str, config: Option<WebSocketConfig>) -> Client {
    connect_to(sim.addr(), pki, node, config)
}

fn connect_to(addr: SocketAddr, pki: &Pki, node: &str, config: Option<WebSocketConfig>) -> Client {
    let tls = connector(pki, Some((&pki.client_cert_pem, &pki.client_key_pem)));
    let headers = [("node_id", node), ("project_id", "proj-1"), ("ConnectionUse", "msg")];
    dial_addr(addr, &tls, &headers, config).expect("connect to simulator")
}

/// Waits for the first event matching `pred`, skipping others; panics after `within`.
fn wait_for(
    events: &Receiver<SimEvent>,
    within: Duration,
    what: &str,
    pred: impl Fn(&SimEvent) -> bool,
) -> SimEvent {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) if pred(&event) => return event,
            Ok(_) => {}
            Err(_) => panic!("no {what} event within {within:?}"),
        }
    }
}

/// Asserts that no event matching `pred` arrives during `window` (a bounded observation).
fn assert_no_event(
    events: &Receiver<SimEvent>,
    window: Duration,
    what: &str,
    pred: impl Fn(&SimEvent) -> bool,
) {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) if pred(&event) => panic!("unexpected {what}: {event:?}"),
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn connected_event(events: &Receiver<SimEvent>, node: &str) -> SimEvent {
    wait_for(
        events,
        PATIENCE,
        "connected",
        |e| matches!(e, SimEvent::Connected { node: n, .. } if n == node),
    )
}

/// Reads the next text message within `within`, skipping control frames.
fn read_msg_within(ws: &mut Client, within: Duration) -> Option<Message> {
    ws.get_ref().get_ref().set_read_timeout(Some(within)).expect("set read timeout");
    let deadline = Instant::now() + within;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(text)) => {
                return Some(Message::decode(text.as_bytes()).expect("simulator sent valid json"))
            }
            Ok(tungstenite::Message::Binary(_)) => panic!("unexpected binary frame"),
            Ok(_) if Instant::now() < deadline => {}
            Ok(_) => return None,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

fn read_msg(ws: &mut Client) -> Message {
    read_msg_within(ws, PATIENCE).expect("a downstream message")
}

/// Reads until the connection fails; asserts it ends without a close frame.
fn assert_dropped_without_close_frame(ws: &mut Client) {
    ws.get_ref().get_ref().set_read_timeout(Some(PATIENCE)).expect("set read timeout");
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(frame)) => panic!("got a close frame: {frame:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("connection still open after {PATIENCE:?}")
            }
            Err(_) => return,
        }
    }
}

fn send(ws: &mut Client, msg: &Message) {
    ws.send(tungstenite::Message::text(msg.encode())).expect("send upstream");
}

fn route(source: &str, group: &str, op: &str, resource: &str) -> Route {
    Route {
        source: source.to_owned(),
        group: group.to_owned(),
        operation: op.to_owned(),
        resource: resource.to_owned(),
        ..Route::default()
    }
}

/// An ack-queue message: a pod insert with a resourceversion.
fn pod_insert(name: &str) -> Message {
    let mut msg = Message::new(
        route("edgecontroller", "resource", "insert", &format!("default/pod/{name}")),
        text_content("pod"),
    );
    msg.header.resource_version = "42".to_owned();
    msg
}

/// A no-ack message: a pod list.
fn pod_list() -> Message {
    Message::with_text(route("edgecontroller", "resource", "query", "default/podlist"), "[]")
}

fn is_sent(e: &SimEvent, id: &str) -> Option<u32> {
    match e {
        SimEvent::Sent { msg_id, attempt, .. } if msg_id == id => Some(*attempt),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

#[test]
fn connected_event_carries_path_headers_and_client_cn() {
    let _w = Watchdog::new("connected_event");
    let (sim, pki, events) = start(|_| {});
    let _ws = connect(&sim, &pki, "gw-1");
    match connected_event(&events, "gw-1") {
        SimEvent::Connected { project, path, headers, client_cn, .. } => {
            assert_eq!(project, "proj-1");
            assert_eq!(path, "/proj-1/gw-1/events");
            assert_eq!(client_cn, "system:node:gw-1");
            assert!(
                headers.contains(&("connectionuse".to_owned(), "msg".to_owned())),
                "{headers:?}"
            );
            assert!(headers.contains(&("node_id".to_owned(), "gw-1".to_owned())), "{headers:?}");
        }
        other => unreachable!("{other:?}"),
    }
    assert!(sim.connected("gw-1"));
}

#[test]
fn client_without_valid_certificate_is_rejected() {
    let _w = Watchdog::new("client_without_valid_certificate");
    let (sim, pki, events) = start(|_| {});
    let headers = [("node_id", "gw-1"), ("ConnectionUse", "msg")];

    let anonymous = connector(&pki, None);
    assert!(dial(&sim, &anonymous, &headers, None).is_err());
    wait_for(
        &events,
        PATIENCE,
        "rejected (no cert)",
        |e| matches!(e, SimEvent::Rejected { reason } if reason.contains("tls")),
    );

    let stranger = Pki::generate("gw-1").expect("second pki");
    let foreign = connector(&pki, Some((&stranger.client_cert_pem, &stranger.client_key_pem)));
    assert!(dial(&sim, &foreign, &headers, None).is_err());
    wait_for(
        &events,
        PATIENCE,
        "rejected (other ca)",
        |e| matches!(e, SimEvent::Rejected { reason } if reason.contains("tls")),
    );

    let (cert, key) = pki.issue_client("gw-1", -10, -1).expect("expired cert");
    let expired = connector(&pki, Some((&cert, &key)));
    assert!(dial(&sim, &expired, &headers, None).is_err());
    wait_for(
        &events,
        PATIENCE,
        "rejected (expired)",
        |e| matches!(e, SimEvent::Rejected { reason } if reason.contains("tls")),
    );
    assert!(!sim.connected("gw-1"));
}

#[test]
fn missing_node_id_is_refused_with_400() {
    let _w = Watchdog::new("missing_node_id");
    let (sim, pki, events) = start(|_| {});
    let tls = connector(&pki, Some((&pki.client_cert_pem, &pki.client_key_pem)));
    let err = dial(&sim, &tls, &[("ConnectionUse", "msg")], None).expect_err("refused");
    assert!(err.contains("400"), "{err}");
    wait_for(
        &events,
        PATIENCE,
        "rejected",
        |e| matches!(e, SimEvent::Rejected { reason } if reason.contains("node_id")),
    );
}

#[test]
fn missing_connection_use_is_upgraded_but_never_read() {
    let _w = Watchdog::new("missing_connection_use");
    let (sim, pki, events) = start(|c| c.keepalive_timeout = Duration::from_millis(300));
    let tls = connector(&pki, Some((&pki.client_cert_pem, &pki.client_key_pem)));
    let mut ws = dial(&sim, &tls, &[("node_id", "gw-1")], None).expect("upgrade accepted");
    wait_for(
        &events,
        PATIENCE,
        "rejected",
        |e| matches!(e, SimEvent::Rejected { reason } if reason.contains("ConnectionUse")),
    );
    send(&mut ws, &Message::keepalive());
    assert!(!sim.connected("gw-1"));
    // Held unread until the keepalive timeout, then dropped; nothing was ever received.
    assert_dropped_without_close_frame(&mut ws);
    assert_no_event(&events, Duration::from_millis(50), "received", |e| {
        matches!(e, SimEvent::Received { .. })
    });
}

// ---------------------------------------------------------------------------------------------
// Downstream queues

#[test]
fn ack_message_is_resent_with_same_id_until_acked() {
    let _w = Watchdog::new("ack_resend");
    let (sim, pki, events) = start(|c| c.ack_retry_interval = Duration::from_millis(200));
    let mut ws = connect(&sim, &pki, "gw-1");
    let msg = pod_insert("a");
    sim.push("gw-1", msg.clone());

    let first = read_msg(&mut ws);
    let second = read_msg(&mut ws);
    assert_eq!(first, msg);
    assert_eq!(second.header.id, msg.header.id, "a resend keeps the msg_id");
    wait_for(&events, PATIENCE, "sent #2", |e| is_sent(e, &msg.header.id) == Some(2));

    send(&mut ws, &second.ack());
    wait_for(
        &events,
        PATIENCE,
        "ack",
        |e| matches!(e, SimEvent::Ack { parent_id, .. } if *parent_id == msg.header.id),
    );
    assert_eq!(sim.in_flight("gw-1"), None);
    assert_no_event(&events, Duration::from_millis(500), "resend after ack", |e| {
        is_sent(e, &msg.header.id).is_some()
    });
}

#[test]
fn unacked_message_is_given_up_then_requeued() {
    let _w = Watchdog::new("give_up");
    let (sim, pki, events) = start(|c| {
        c.ack_retry_interval = Duration::from_millis(100);
        c.ack_max_writes = 2;
        c.ack_requeue_delay = Duration::from_millis(150);
    });
    let _ws = connect(&sim, &pki, "gw-1");
    let msg = pod_insert("a");
    let id = msg.header.id.clone();
    sim.push("gw-1", msg);
    wait_for(&events, PATIENCE, "sent #1", |e| is_sent(e, &id) == Some(1));
    wait_for(&events, PATIENCE, "sent #2", |e| is_sent(e, &id) == Some(2));
    let gave_up_at = Instant::now();
    wait_for(
        &events,
        PATIENCE,
        "gave up",
        |e| matches!(e, SimEvent::GaveUp { msg_id, .. } if *msg_id == id),
    );
    wait_for(&events, PATIENCE, "sent again", |e| is_sent(e, &id) == Some(1));
    assert!(gave_up_at.elapsed() >= Duration::from_millis(150), "requeue waits ack_requeue_delay");
}

#[test]
fn one_ack_message_in_flight_while_no_ack_messages_flow() {
    let _w = Watchdog::new("one_in_flight");
    let (sim, pki, _events) = start(|_| {});
    let mut ws = connect(&sim, &pki, "gw-1");
    let (a, b, list) = (pod_insert("a"), pod_insert("b"), pod_list());
    sim.push("gw-1", a.clone());
    sim.push("gw-1", b.clone());
    sim.push("gw-1", list.clone());

    let mut got = vec![read_msg(&mut ws).header.id, read_msg(&mut ws).header.id];
    got.sort();
    let mut want = vec![a.header.id.clone(), list.header.id.clone()];
    want.sort();
    assert_eq!(got, want, "a and the no-ack list arrive; b waits for a's ack");
    assert!(read_msg_within(&mut ws, Duration::from_millis(300)).is_none(), "b must wait");

    send(&mut ws, &a.ack());
    assert_eq!(read_msg(&mut ws).header.id, b.header.id);
}

#[test]
fn no_ack_message_is_sent_once() {
    let _w = Watchdog::new("no_ack_once");
    let (sim, pki, events) = start(|c| c.ack_retry_interval = Duration::from_millis(100));
    let mut ws = connect(&sim, &pki, "gw-1");
    let list = pod_list();
    sim.push("gw-1", list.clone());
    assert_eq!(read_msg(&mut ws), list);
    wait_for(&events, PATIENCE, "sent", |e| is_sent(e, &list.header.id) == Some(1));
    assert_no_event(&events, Duration::from_millis(400), "resend", |e| {
        is_sent(e, &list.header.id).is_some()
    });
    assert!(read_msg_within(&mut ws, Duration::from_millis(50)).is_none());
}

#[test]
fn message_without_version_that_needs_ack_is_dropped() {
    let _w = Watchdog::new("dropped");
    let (sim, _pki, events) = start(|_| {});
    let update =
        Message::with_text(route("edgecontroller", "resource", "update", "default/pod/p"), "x");
    sim.push("gw-1", update.clone());
    wait_for(
        &events,
        PATIENCE,
        "dropped",
        |e| matches!(e, SimEvent::Dropped { msg_id, .. } if *msg_id == update.header.id),
    );
}

#[test]
fn queued_and_in_flight_messages_survive_reconnects() {
    let _w = Watchdog::new("survive_reconnect");
    let (sim, pki, events) = start(|_| {});
    let (a, list) = (pod_insert("a"), pod_list());
    // Pushed before the node ever connected.
    sim.push("gw-1", a.clone());
    sim.push("gw-1", list.clone());
    let mut ws = connect(&sim, &pki, "gw-1");
    let mut got = vec![read_msg(&mut ws).header.id, read_msg(&mut ws).header.id];
    got.sort();
    let mut want = vec![a.header.id.clone(), list.header.id.clone()];
    want.sort();
    assert_eq!(got, want);

    // The link dies before the ACK: a is written again at once on the next connection.
    sim.cut("gw-1");
    wait_for(
        &events,
        PATIENCE,
        "disconnected",
        |e| matches!(e, SimEvent::Disconnected { reason, .. } if reason == "cut"),
    );
    assert_dropped_without_close_frame(&mut ws);
    let mut ws = connect(&sim, &pki, "gw-1");
    let again = read_msg(&mut ws);
    assert_eq!(again.header.id, a.header.id);
    send(&mut ws, &again.ack());
    wait_for(&events, PATIENCE, "ack", |e| matches!(e, SimEvent::Ack { .. }));
}

#[test]
fn raw_frames_and_oversized_messages_go_out_whole() {
    let _w = Watchdog::new("raw_frames");
    let (sim, pki, _events) = start(|_| {});
    let config = WebSocketConfig::default().max_frame_size(Some(1 << 20));
    let mut ws = connect_with(&sim, &pki, "gw-1", Some(config));
    sim.push_raw("gw-1", vec![0, 1, 2], true);
    sim.push_raw("gw-1", b"{not json".to_vec(), false);
    sim.push_oversized("gw-1", 10_000);
    ws.get_ref().get_ref().set_read_timeout(Some(PATIENCE)).expect("timeout");
    assert_eq!(ws.read().expect("binary"), tungstenite::Message::binary(vec![0u8, 1, 2]));
    assert_eq!(ws.read().expect("text"), tungstenite::Message::text("{not json"));
    match ws.read().expect("oversized") {
        tungstenite::Message::Text(text) => {
            assert_eq!(text.len(), 10_000);
            assert!(Message::decode(text.as_bytes()).is_ok());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn large_message_is_fragmented_and_reassembles() {
    let _w = Watchdog::new("fragmented");
    let (sim, pki, _events) = start(|c| c.fragment_size = 4096);
    // The client refuses any frame over 4096 bytes, so the message must arrive in fragments.
    let config = WebSocketConfig::default().max_frame_size(Some(4096));
    let mut ws = connect_with(&sim, &pki, "gw-1", Some(config));
    let big = Message::with_text(
        route("router_eventbus", "user", "publish", "topic"),
        &"é".repeat(15_000),
    );
    assert!(big.encode().len() > 3 * 4096);
    sim.push("gw-1", big.clone());
    ws.get_ref().get_ref().set_read_timeout(Some(PATIENCE)).expect("timeout");
    match ws.read().expect("reassembled message") {
        tungstenite::Message::Text(text) => assert_eq!(text.as_str(), big.encode()),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream and connection life

#[test]
fn keepalives_hold_the_connection_and_their_absence_drops_it() {
    let _w = Watchdog::new("keepalive");
    // Keepalives go every 150 ms: the timeout leaves a busy machine 1.35 s of slack (issue 11).
    let timeout = Duration::from_millis(1500);
    let (sim, pki, events) = start(|c| c.keepalive_timeout = timeout);
    let mut ws = connect(&sim, &pki, "gw-1");
    connected_event(&events, "gw-1");
    let started = Instant::now();
    let mut last_keepalive = started;
    // Keepalives every 150 ms for twice the timeout; other traffic would not count.
    while started.elapsed() < 2 * timeout {
        last_keepalive = Instant::now();
        send(&mut ws, &Message::keepalive());
        assert!(read_msg_within(&mut ws, Duration::from_millis(150)).is_none());
    }
    assert!(sim.connected("gw-1"), "keepalives reset the timer");
    send(&mut ws, &pod_list()); // not a keepalive
    match wait_for(&events, PATIENCE, "disconnected", |e| {
        matches!(e, SimEvent::Disconnected { .. })
    }) {
        SimEvent::Disconnected { reason, .. } => assert_eq!(reason, "keepalive timeout"),
        other => unreachable!("{other:?}"),
    }
    assert!(last_keepalive.elapsed() >= timeout, "the timer runs from the last keepalive");
    assert_dropped_without_close_frame(&mut ws);
    assert!(!sim.connected("gw-1"));
}

#[test]
fn second_connection_replaces_the_first_and_inherits_its_queue() {
    let _w = Watchdog::new("replace");
    let (sim, pki, events) = start(|_| {});
    let mut first = connect(&sim, &pki, "gw-1");
    connected_event(&events, "gw-1");
    let a = pod_insert("a");
    sim.push("gw-1", a.clone());
    assert_eq!(read_msg(&mut first).header.id, a.header.id);

    let mut second = connect(&sim, &pki, "gw-1");
    wait_for(
        &events,
        PATIENCE,
        "replaced",
        |e| matches!(e, SimEvent::Disconnected { reason, .. } if reason == "replaced"),
    );
    connected_event(&events, "gw-1");
    assert_dropped_without_close_frame(&mut first);
    // The in-flight message is written on the new connection at once, not after 5 s.
    let again = read_msg_within(&mut second, Duration::from_secs(1)).expect("resent at once");
    assert_eq!(again.header.id, a.header.id);
    send(&mut second, &again.ack());
    wait_for(&events, PATIENCE, "ack", |e| matches!(e, SimEvent::Ack { .. }));
    assert!(sim.connected("gw-1"));
}

#[test]
fn every_upstream_message_is_reported_and_bad_frames_do_not_kill_the_link() {
    let _w = Watchdog::new("upstream");
    let (sim, pki, events) = start(|_| {});
    let mut ws = connect(&sim, &pki, "gw-1");
    ws.send(tungstenite::Message::text("{not json")).expect("send");
    ws.send(tungstenite::Message::text("")).expect("send");
    wait_for(&events, PATIENCE, "malformed", |e| matches!(e, SimEvent::Malformed { .. }));
    wait_for(
        &events,
        PATIENCE,
        "malformed (empty)",
        |e| matches!(e, SimEvent::Malformed { error, .. } if error.contains("empty")),
    );
    let keepalive = Message::keepalive();
    ws.send(tungstenite::Message::text(format!("{}  \n", keepalive.encode()))).expect("send");
    ws.send(tungstenite::Message::binary(pod_list().encode().into_bytes())).expect("send");
    match wait_for(&events, PATIENCE, "received", |e| matches!(e, SimEvent::Received { .. })) {
        SimEvent::Received { msg, .. } => assert_eq!(msg, keepalive),
        other => unreachable!("{other:?}"),
    }
    wait_for(
        &events,
        PATIENCE,
        "received binary",
        |e| matches!(e, SimEvent::Received { msg, .. } if msg.route.resource == "default/podlist"),
    );
}

#[test]
fn viaduct_control_operation_is_answered_with_ack() {
    let _w = Watchdog::new("control");
    let (sim, pki, _events) = start(|_| {});
    let mut ws = connect(&sim, &pki, "gw-1");
    let ping = Message::with_text(route("websocket", "resource", "ping", "node"), "");
    send(&mut ws, &ping);
    let reply = read_msg(&mut ws);
    assert_eq!(reply.header.parent_id, ping.header.id);
    assert_eq!(reply.route.operation, "response");
    assert_eq!(reply.content_text().as_deref(), Some("ack"));
}

#[test]
fn websocket_ping_is_answered_and_reported() {
    let _w = Watchdog::new("ws_ping");
    let (sim, pki, events) = start(|_| {});
    let mut ws = connect(&sim, &pki, "gw-1");
    ws.send(tungstenite::Message::Ping(b"hi".to_vec().into())).expect("ping");
    ws.get_ref().get_ref().set_read_timeout(Some(PATIENCE)).expect("timeout");
    assert_eq!(ws.read().expect("pong"), tungstenite::Message::Pong(b"hi".to_vec().into()));
    wait_for(&events, PATIENCE, "ping", |e| matches!(e, SimEvent::Ping { .. }));
}

#[test]
fn stop_closes_every_connection_and_joins() {
    let _w = Watchdog::new("stop");
    let (sim, pki, events) = start(|_| {});
    let mut ws = connect(&sim, &pki, "gw-1");
    connected_event(&events, "gw-1");
    sim.stop();
    assert_dropped_without_close_frame(&mut ws);
    wait_for(
        &events,
        PATIENCE,
        "disconnected",
        |e| matches!(e, SimEvent::Disconnected { reason, .. } if reason == "sim stopped"),
    );
}

// ---------------------------------------------------------------------------------------------
// Through the fault-injection proxy

#[test]
fn stalled_proxy_is_a_half_open_link_that_the_keepalive_timeout_ends() {
    let _w = Watchdog::new("proxy_stall");
    let (sim, pki, events) = start(|c| c.keepalive_timeout = Duration::from_millis(400));
    let proxy = proxy::Proxy::start(sim.addr()).expect("proxy");
    let mut ws = connect_to(proxy.addr(), &pki, "gw-1", None);
    connected_event(&events, "gw-1");
    let list = pod_list();
    sim.push("gw-1", list.clone());
    assert_eq!(read_msg(&mut ws), list);

    proxy.set_mode(proxy::Mode::Stall);
    send(&mut ws, &Message::keepalive());
    let held = pod_list();
    sim.push("gw-1", held.clone());
    assert!(read_msg_within(&mut ws, Duration::from_millis(200)).is_none(), "nothing passes");
    // The stalled keepalive never reaches the simulator, which times the node out.
    let ended = wait_for(&events, PATIENCE, "disconnected", |e| {
        assert!(!matches!(e, SimEvent::Received { .. }), "a byte passed the stall: {e:?}");
        matches!(e, SimEvent::Disconnected { .. })
    });
    assert!(
        matches!(ended, SimEvent::Disconnected { reason, .. } if reason == "keepalive timeout")
    );
    assert!(read_msg_within(&mut ws, Duration::from_millis(50)).is_none(), "even the FIN is held");

    // Back to pass: the held bytes arrive, then the end of the connection.
    proxy.set_mode(proxy::Mode::Pass);
    assert_eq!(read_msg(&mut ws), held);
    assert_dropped_without_close_frame(&mut ws);
    assert_eq!(proxy.connections_accepted(), 1);
}

#[test]
fn proxy_cut_all_drops_both_ends() {
    let _w = Watchdog::new("proxy_cut");
    let (sim, pki, events) = start(|_| {});
    let proxy = proxy::Proxy::start(sim.addr()).expect("proxy");
    let mut ws = connect_to(proxy.addr(), &pki, "gw-1", None);
    connected_event(&events, "gw-1");
    proxy.cut_all();
    assert_dropped_without_close_frame(&mut ws);
    wait_for(&events, PATIENCE, "disconnected", |e| matches!(e, SimEvent::Disconnected { .. }));
    // The proxy still accepts new connections after a cut.
    let _again = connect_to(proxy.addr(), &pki, "gw-1", None);
    connected_event(&events, "gw-1");
    assert_eq!(proxy.connections_accepted(), 2);
}

// ---------------------------------------------------------------------------------------------
// The edgehub-cloudsim binary

/// Kills and reaps the child if the test ends early.
struct ChildGuard(Option<std::process::Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("edgehub-cloudsim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn binary_prints_events_as_json_lines_and_takes_stdin_commands() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let _w = Watchdog::new("binary");
    let exe = env!("CARGO_BIN_EXE_edgehub-cloudsim");
    let dir = temp_dir("binary");
    let status = Command::new(exe)
        .args(["gen-certs", "--dir", dir.to_str().expect("utf-8 path"), "--node", "gw-1"])
        .stdout(Stdio::null())
        .status()
        .expect("run gen-certs");
    assert!(status.success());
    let file = |name: &str| std::fs::read(dir.join(name)).expect("generated file");
    let pki = Pki {
        ca_cert_pem: file("ca.crt"),
        ca_key_pem: Vec::new(),
        server_cert_pem: file("server.crt"),
        server_key_pem: file("server.key"),
        client_cert_pem: file("client.crt"),
        client_key_pem: file("client.key"),
    };

    let path = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
    let mut child = Command::new(exe)
        .args(["--listen", "127.0.0.1:0", "--ca", &path("ca.crt"), "--cert", &path("server.crt")])
        .args(["--key", &path("server.key")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start edgehub-cloudsim");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut guard = ChildGuard(Some(child));
    let (line_tx, line_rx) = crossbeam_channel::unbounded::<serde_json::Value>();
    let reader = thread::Builder::new()
        .name("sim-stdout".to_owned())
        .spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).expect("every stdout line is json");
                if line_tx.send(value).is_err() {
                    return;
                }
            }
        })
        .expect("spawn reader");
    let next_line = |event: &str| -> serde_json::Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = line_rx.recv_timeout(left).unwrap_or_else(|_| panic!("no {event} line"));
            if line["event"] == event {
                return line;
            }
        }
    };

    let listening = next_line("listening");
    let addr: SocketAddr = listening["addr"].as_str().expect("addr").parse().expect("socket addr");
    let mut ws = connect_to(addr, &pki, "gw-1", None);
    let connected = next_line("connected");
    assert_eq!(connected["node"], "gw-1");
    assert_eq!(connected["client_cn"], "system:node:gw-1");

    let list = pod_list();
    writeln!(stdin, "nonsense").expect("write stdin");
    writeln!(stdin, "push gw-1 {}", list.encode().trim_end()).expect("write stdin");
    assert_eq!(read_msg(&mut ws), list);
    assert_eq!(next_line("sent")["msg_id"], list.header.id.as_str());

    send(&mut ws, &Message::keepalive());
    assert_eq!(next_line("received")["msg"]["route"]["operation"], "keepalive");

    writeln!(stdin, "cut gw-1").expect("write stdin");
    assert_eq!(next_line("disconnected")["reason"], "cut");
    writeln!(stdin, "quit").expect("write stdin");
    // The reader ends when the process closes stdout, that is when it exits.
    reader.join().expect("reader thread");
    let status = guard.0.take().expect("child").wait().expect("wait for exit");
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn binary_exits_2_naming_a_missing_file() {
    let _w = Watchdog::new("binary_missing_file");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edgehub-cloudsim"))
        .args(["--ca", "/nonexistent/ca.crt", "--cert", "x", "--key", "y"])
        .output()
        .expect("run edgehub-cloudsim");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/ca.crt"), "{stderr}");
}
