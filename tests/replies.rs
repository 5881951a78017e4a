#![cfg(feature = "cloudsim")]
//! Replies from KubeEdge's own controllers, shaped exactly as they send them, against the
//! simulator over real TLS (issue 16): a reply whose request waits goes to it whatever its group
//! (devicecontroller answers `edge_updated` in group `twin`), unparented twin messages still reach
//! the twin group, a no-ack "OK" with a resourceversion draws no ACK, and an ack-queue answer
//! nobody waits for is ACKed once (protocol §8 W9).

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::message::{json_content, text_content, Message};
use edgehub::Agent;
use std::time::Duration;
use support::*;

/// devicecontroller's answer to an `edge_updated` request (`DC/controller/upstream.go`): route
/// `{devicecontroller, twin, response, "twin"}`, the request's ID as parent, content "OK", no
/// resourceversion.
fn devicecontroller_ok(request_id: &str) -> Message {
    let mut reply = Message::with_text(route("devicecontroller", "twin", "response", "twin"), "OK");
    reply.header.parent_id = request_id.to_owned();
    reply
}

/// edgecontroller's answer to a node status update (edge-node §1.5 step 6): `response` on
/// `<ns>/node/<n>`, content "OK", the new resourceversion.
fn edgecontroller_status_ok(request_id: &str, rv: &str) -> Message {
    let mut reply = Message::with_text(
        route("edgecontroller", "resource", "response", &format!("default/node/{NODE}")),
        "OK",
    );
    reply.header.parent_id = request_id.to_owned();
    reply.header.resource_version = rv.to_owned();
    reply
}

/// edgecontroller's answer to a ConfigMap query (protocol example D2): the object, with a
/// resourceversion, so it travels in the ack queue.
fn configmap_answer(request_id: &str, rv: &str) -> Message {
    let mut reply = Message::new(
        route("edgecontroller", "resource", "response", "default/configmap/app-cfg"),
        json_content(&format!(
            r#"{{"metadata":{{"name":"app-cfg","namespace":"default","resourceVersion":"{rv}"}},"data":{{"LOG_LEVEL":"info"}}}}"#
        ))
        .unwrap(),
    );
    reply.header.parent_id = request_id.to_owned();
    reply.header.resource_version = rv.to_owned();
    reply
}

/// Waits for the simulator to see the ACK of `msg_id`, keeping every upstream message seen on the
/// way in `seen`.
fn wait_ack_keeping(cloud: &Cloud, msg_id: &str, seen: &mut Vec<Message>) {
    cloud.wait_for(&format!("ack of {msg_id}"), |e| match e {
        SimEvent::Received { msg, .. } => {
            seen.push(msg.clone());
            None
        }
        SimEvent::Ack { parent_id, .. } if parent_id == msg_id => Some(()),
        _ => None,
    });
}

fn acks_of(seen: &[Message], msg_id: &str) -> usize {
    seen.iter().filter(|m| m.route.operation == "response" && m.header.parent_id == msg_id).count()
}

#[test]
fn request_answered_in_group_twin_goes_to_the_caller_and_not_to_the_twin_module() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let (twin, twin_rx) = capture_module("twin", &["twin"], false);
    let agent = Agent::start(cloud.config(), vec![twin]).unwrap();
    cloud.wait_connected();
    wait_connection_event(&twin_rx, "cloud_connected");

    // `edgehub send --request` of an edge_updated (edge-node §4 item 30).
    let request = Message::new(
        route("twin", "resource", "update", "device/thermo-1/twin/edge_updated"),
        json_content(
            r#"{"event_id":"e1","timestamp":1,"twin":{"temperature":{"actual":{"value":"21"}}}}"#,
        )
        .unwrap(),
    );
    let request_id = request.header.id.clone();
    let hub = agent.hub();
    let caller = std::thread::spawn(move || hub.request(request, PATIENCE));
    cloud.wait_received("edge_updated request", |m| m.header.id == request_id);
    cloud.sim.push(NODE, devicecontroller_ok(&request_id));
    let answer = caller.join().unwrap().expect("the request gets devicecontroller's answer");
    assert_eq!(answer.header.parent_id, request_id);
    assert_eq!(answer.route.group, "twin");
    assert_eq!(answer.content_text().as_deref(), Some("OK"));

    // An unparented twin message still reaches the twin group, and it is the first cloud message
    // the module sees: the answer above did not go to it as well.
    let membership = Message::new(
        route("devicecontroller", "twin", "update", "membership"),
        json_content(r#"{"event_id":"","timestamp":2,"added_devices":[],"removed_devices":[]}"#)
            .unwrap(),
    );
    let membership_id = membership.header.id.clone();
    cloud.sim.push(NODE, membership);
    let first = next_cloud_message(&twin_rx);
    assert_eq!(first.header.id, membership_id, "twin module got {first:?} first");
    agent.stop();
}

#[test]
fn a_twin_reply_nobody_waits_for_still_reaches_the_twin_group() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let (twin, twin_rx) = capture_module("twin", &["twin"], false);
    let agent = Agent::start(cloud.config(), vec![twin]).unwrap();
    cloud.wait_connected();
    let reply = devicecontroller_ok("a-request-of-a-previous-run");
    let reply_id = reply.header.id.clone();
    cloud.sim.push(NODE, reply);
    // HEAD hands parented twin messages to the twin module (protocol §3.5).
    assert_eq!(next_cloud_message(&twin_rx).header.id, reply_id);
    agent.stop();
}

#[test]
fn node_status_ok_with_resourceversion_is_not_acked_and_an_unawaited_ack_queue_answer_is_acked_once(
) {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let agent = Agent::start(cloud.config(), vec![]).unwrap();
    cloud.wait_connected();
    let mut seen = Vec::new();

    // One status answer per report, for a node whose updates nobody awaits.
    let status_ok = edgecontroller_status_ok("status-update-1", "1001");
    let status_ok_id = status_ok.header.id.clone();
    cloud.sim.push(NODE, status_ok);
    // Then an ack-queue answer whose requester has gone (W9). The router handles messages in
    // order, so once this one's ACK is in, the status answer has been dealt with too.
    let answer = configmap_answer("query-that-timed-out", "4711");
    let answer_id = answer.header.id.clone();
    cloud.sim.push(NODE, answer);
    wait_ack_keeping(&cloud, &answer_id, &mut seen);

    // A second orphan as a marker: its ACK comes after any repeat of the first one's.
    let marker = configmap_answer("another-gone-query", "4712");
    let marker_id = marker.header.id.clone();
    cloud.sim.push(NODE, marker);
    wait_ack_keeping(&cloud, &marker_id, &mut seen);

    assert_eq!(acks_of(&seen, &status_ok_id), 0, "no-ack \"OK\" reply was ACKed");
    assert_eq!(acks_of(&seen, &answer_id), 1, "ack-queue answer ACKed once");
    let ack = seen.iter().find(|m| m.header.parent_id == answer_id).unwrap();
    assert_eq!(ack.route.resource, "default/configmap/app-cfg");
    assert_eq!(ack.content.get(), text_content("OK").get());
    agent.stop();
}
