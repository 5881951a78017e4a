//! The link against the CloudHub simulator over real TLS on 127.0.0.1: handshake headers,
//! keepalives and pings, dispatch of every group, ACKs, request/response, control operations,
//! and bad frames from the cloud.
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::message;
use edgehub::status::Status;
use edgehub::{Agent, ErrorKind};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn connects_with_kubeedge_path_and_headers() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let config = cloud.config();
    let project = config.project_id.clone();
    let agent = Agent::start(config, vec![]).unwrap();
    let (path, headers, node, cn) = cloud.wait_for("connected", |e| match e {
        SimEvent::Connected { path, headers, node, client_cn, .. } => {
            Some((path.clone(), headers.clone(), node.clone(), client_cn.clone()))
        }
        _ => None,
    });
    assert_eq!(path, format!("/{project}/{NODE}/events"));
    assert_eq!(node, NODE);
    assert_eq!(cn, format!("system:node:{NODE}"));
    let header = |name: &str| {
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    assert_eq!(header("node_id").as_deref(), Some(NODE));
    assert_eq!(header("project_id"), Some(project));
    assert_eq!(header("connectionuse").as_deref(), Some("msg"));
    assert_eq!(header("origin"), None, "gorilla rejects a mismatched Origin");
    assert_eq!(header("sec-websocket-extensions"), None, "no compression");
    agent.stop();
}

#[test]
fn keepalive_at_connect_then_every_heartbeat_and_pings_keep_the_link() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let agent = Agent::start(cloud.config(), vec![]).unwrap();
    let connected_at =
        cloud.wait_for("connected", |e| matches!(e, SimEvent::Connected { .. }).then(Instant::now));
    let mut keepalives = Vec::new();
    let mut pings = 0;
    while keepalives.len() < 5 {
        cloud.wait_for("keepalive or ping", |e| {
            match e {
                SimEvent::Received { msg, at, .. } if msg.route.operation == "keepalive" => {
                    assert_eq!(msg.route.source, "websocket");
                    assert_eq!(msg.route.group, "resource");
                    assert_eq!(msg.route.resource, "node");
                    assert_eq!(msg.content.get(), "\"ping\"");
                    keepalives.push(*at);
                }
                SimEvent::Ping { .. } => pings += 1,
                _ => return None,
            }
            Some(())
        });
    }
    // Bounds with room for a busy machine (issue 11): the first keepalive comes before the
    // first heartbeat tick, then one per heartbeat (never two in half a heartbeat, never one
    // in several).
    assert!(keepalives[0].duration_since(connected_at) < HEARTBEAT, "first keepalive is immediate");
    for pair in keepalives.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap > HEARTBEAT / 2 && gap < HEARTBEAT * 5,
            "keepalive gap {gap:?} vs heartbeat {HEARTBEAT:?}"
        );
    }
    // A ping every 0.4 s: wait for two (not a count within a window), all in one session.
    while pings < 2 {
        cloud.wait_for("ping", |e| matches!(e, SimEvent::Ping { .. }).then_some(()));
        pings += 1;
    }
    assert_eq!(Status::get(&agent.status().sessions), 1, "pongs kept the read deadline satisfied");
    agent.stop();
}

#[test]
fn every_group_reaches_its_module_and_unroutable_ones_are_counted() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (meta, meta_rx) = capture_module("meta", &["meta"], false);
    let (twin, twin_rx) = capture_module("twin", &["twin"], false);
    let (bus, bus_rx) = capture_module("bus", &["bus"], false);
    let (task, task_rx) = capture_module("task", &["taskmanager"], false);
    let agent = Agent::start(cloud.config(), vec![meta, twin, bus, task]).unwrap();
    for rx in [&meta_rx, &twin_rx, &bus_rx, &task_rx] {
        wait_connection_event(rx, message::CLOUD_CONNECTED);
    }
    let cases = [
        (cloud_msg("resource", "edgecontroller", "insert", "default/pod/a", "1"), &meta_rx),
        (cloud_msg("func", "edgecontroller", "update", "default/func/f", "2"), &meta_rx),
        (cloud_msg("twin", "devicecontroller", "update", "membership", ""), &twin_rx),
        (cloud_msg("user", "router_eventbus", "publish", "topic/a", ""), &bus_rx),
        (cloud_msg("user", "router_servicebus", "GET", "80:/x", ""), &bus_rx),
        (cloud_msg("taskmanager", "taskmanager", "upgrade", "task/1", ""), &task_rx),
    ];
    for (msg, rx) in cases {
        let id = msg.header.id.clone();
        cloud.sim.push(NODE, msg.clone());
        let got = next_cloud_message(rx);
        assert_eq!(got, msg, "{id} arrives unchanged at its module");
        // Ack-queue messages block the queue until ACKed; these modules do not ACK, so ACK here.
        if got.needs_ack() {
            agent.hub().ack(&got);
        }
    }
    // Unknown group and a user message from an unknown source: counted, not delivered, no crash.
    // (Resources the cloud sends once, in order with the marker: `membership` is a no-ack kind.)
    cloud.sim.push(NODE, cloud_msg("edged", "x", "update", "membership/x", ""));
    cloud.sim.push(NODE, cloud_msg("user", "stranger", "publish", "t", ""));
    let marker = cloud_msg("twin", "devicecontroller", "update", "membership/detail", "");
    cloud.sim.push(NODE, marker.clone());
    assert_eq!(
        next_cloud_message(&twin_rx),
        marker,
        "agent keeps routing after unroutable messages"
    );
    assert_eq!(Status::get(&agent.status().unroutable), 2);
    assert!(meta_rx.try_recv().is_err() && bus_rx.try_recv().is_err());
    agent.stop();
}

#[test]
fn module_ack_reaches_the_cloud_and_clears_its_ack_queue() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (meta, meta_rx) = capture_module("meta", &["meta"], true);
    let agent = Agent::start(cloud.config(), vec![meta]).unwrap();
    wait_connection_event(&meta_rx, message::CLOUD_CONNECTED);
    let first = cloud_msg("resource", "edgecontroller", "insert", "default/configmap/a", "10");
    let second = cloud_msg("resource", "edgecontroller", "delete", "default/configmap/a", "");
    cloud.sim.push(NODE, first.clone());
    cloud.sim.push(NODE, second.clone());
    for sent in [&first, &second] {
        let ack = cloud.wait_received("ack", |m| m.header.parent_id == sent.header.id);
        assert_eq!(ack.route.operation, "response");
        assert_eq!(ack.route.source, "edgecontroller");
        assert_eq!(ack.route.group, "resource");
        assert_eq!(ack.route.resource, "default/configmap/a");
        assert_eq!(ack.content.get(), "\"OK\"");
        assert_eq!(next_cloud_message(&meta_rx), *sent);
    }
    assert_eq!(cloud.sim.in_flight(NODE), None);
    agent.stop();
}

#[test]
fn request_gets_its_response_and_times_out_cleanly() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let agent = Agent::start(cloud.config(), vec![]).unwrap();
    cloud.wait_connected();
    let hub = agent.hub();

    let query = cloud_msg("meta", "edged", "query", "default/configmap/app-cfg", "");
    let query_id = query.header.id.clone();
    let asker = std::thread::spawn({
        let hub = hub.clone();
        move || hub.request(query, Duration::from_secs(5))
    });
    let seen = cloud.wait_received("query", |m| m.header.id == query_id);
    let mut response = seen.response_to(message::json_content(r#"{"data":{"k":"v"}}"#).unwrap());
    response.route.source = "edgecontroller".into();
    response.route.group = "resource".into();
    response.header.resource_version = "4711".into(); // as D2: it travels in the ACK queue
    cloud.sim.push(NODE, response.clone());
    let got = asker.join().unwrap().unwrap();
    assert_eq!(got, response);
    assert!(hub.ack(&got), "the requester ACKs the stored response (D3)");
    cloud.wait_for("ack of response", |e| matches!(e, SimEvent::Ack { .. }).then_some(()));

    // No response: a clear timeout, and nothing left waiting.
    let lonely = cloud_msg("meta", "edged", "query", "default/secret/s", "");
    let started = Instant::now();
    let err = hub.request(lonely, Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(err.to_string().contains("no response"), "{err}");
    agent.stop();
}

/// See: protocol §8 W9. A response whose requester already gave up still gets its ACK when it
/// travelled in the cloud's ACK queue, or CloudHub would re-send it forever.
#[test]
fn w9_orphan_response_is_acked() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let agent = Agent::start(cloud.config(), vec![]).unwrap();
    cloud.wait_connected();
    let mut orphan =
        cloud_msg("resource", "edgecontroller", "response", "default/configmap/c", "4711");
    orphan.header.parent_id = "requester-long-gone".into();
    cloud.sim.push(NODE, orphan.clone());
    let ack = cloud.wait_received("ack of orphan", |m| m.header.parent_id == orphan.header.id);
    assert_eq!(ack.content.get(), "\"OK\"");
    cloud.wait_for("ack closes in-flight", |e| matches!(e, SimEvent::Ack { .. }).then_some(()));
    assert_eq!(Status::get(&agent.status().orphan_responses), 1);
    agent.stop();
}

#[test]
fn control_operations_are_answered_with_ack() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let agent = Agent::start(cloud.config(), vec![]).unwrap();
    cloud.wait_connected();
    for op in ["ping", "config", "pong"] {
        let control = cloud_msg("user", "viaduct", op, "", "");
        cloud.sim.push(NODE, control.clone());
        let answer =
            cloud.wait_received("control answer", |m| m.header.parent_id == control.header.id);
        assert_eq!(answer.route.operation, "response");
        assert_eq!(answer.content.get(), "\"ack\"");
    }
    assert_eq!(Status::get(&agent.status().control_answered), 3);
    agent.stop();
}

#[test]
fn malformed_frames_are_logged_and_the_session_goes_on() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (meta, meta_rx) = capture_module("meta", &["meta"], true);
    let agent = Agent::start(cloud.config(), vec![meta]).unwrap();
    wait_connection_event(&meta_rx, message::CLOUD_CONNECTED);
    let bad: [&[u8]; 5] =
        [b"not json", b"", b"[1,2,3]", b"{\"header\":{\"timestamp\":\"x\"}}", &[0xff, 0x00, 0x81]];
    for frame in bad {
        cloud.sim.push_raw(NODE, frame.to_vec(), frame.first() == Some(&0xff));
    }
    cloud.sim.push_raw(NODE, format!("{{\"content\":{}}}", "[".repeat(50_000)).into_bytes(), false);
    // A valid message in a binary frame is accepted, as gorilla's ReadJSON does.
    let binary = cloud_msg("resource", "edgecontroller", "insert", "default/pod/bin", "7");
    cloud.sim.push_raw(NODE, binary.encode().into_bytes(), true);
    assert_eq!(next_cloud_message(&meta_rx), binary);
    assert_eq!(Status::get(&agent.status().malformed), 6);
    assert_eq!(Status::get(&agent.status().sessions), 1, "bad frames do not end the session");
    agent.stop();
}

#[test]
fn fragmented_large_message_arrives_whole() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (meta, meta_rx) = capture_module("meta", &["meta"], true);
    let agent = Agent::start(cloud.config(), vec![meta]).unwrap();
    wait_connection_event(&meta_rx, message::CLOUD_CONNECTED);
    let mut big = cloud_msg("resource", "edgecontroller", "update", "default/configmap/big", "99");
    let data = "x\u{3c}y".repeat(100_000);
    big.content =
        message::json_content(&serde_json::json!({ "data": { "blob": data } }).to_string())
            .unwrap();
    cloud.sim.push(NODE, big.clone());
    assert_eq!(next_cloud_message(&meta_rx), big);
    agent.stop();
}

#[test]
fn oversized_message_ends_the_session_and_the_agent_reconnects() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let mut config = cloud.config();
    config.max_message_bytes = 64 << 10;
    let (meta, meta_rx) = capture_module("meta", &["meta"], true);
    let agent = Agent::start(config, vec![meta]).unwrap();
    wait_connection_event(&meta_rx, message::CLOUD_CONNECTED);
    cloud.sim.push_oversized(NODE, 256 << 10);
    wait_connection_event(&meta_rx, message::CLOUD_DISCONNECTED);
    wait_connection_event(&meta_rx, message::CLOUD_CONNECTED);
    let after = cloud_msg("resource", "edgecontroller", "insert", "default/pod/after", "3");
    cloud.sim.push(NODE, after.clone());
    assert_eq!(next_cloud_message(&meta_rx), after);
    assert_eq!(Status::get(&agent.status().sessions), 2);
    agent.stop();
}

#[test]
fn messages_sent_up_arrive_in_order_exactly_once() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let agent = Agent::start(cloud.config(), vec![]).unwrap();
    let hub = agent.hub();
    for seq in 0..500 {
        hub.send(numbered(seq)).unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 500 {
        seen.push(cloud.wait_for("numbered message", |e| match e {
            SimEvent::Received { msg, .. } => seq_of(msg),
            _ => None,
        }));
    }
    assert_eq!(seen, (0..500).collect::<Vec<_>>());
    agent.stop();
}
