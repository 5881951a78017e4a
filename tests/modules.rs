#![cfg(feature = "cloudsim")]
//! The built-in `node_status` module against the CloudHub simulator over real TLS: it reports up
//! on connect and every interval. The `meta` store has its own file, `tests/meta_store.rs`.

mod support;

use edgehub::message::Message;
use edgehub::modules::node_status;
use edgehub::Agent;
use serde_json::Value;
use std::time::Duration;
use support::*;

/// A node status report from `msg`, with its content checked against protocol example C.
fn check_node_status(msg: &Message) {
    assert_eq!(msg.route.source, "edged");
    assert_eq!(msg.route.group, "meta");
    assert_eq!(msg.route.operation, "update");
    assert_eq!(msg.route.resource, format!("default/nodestatus/{NODE}"));
    assert!(msg.header.parent_id.is_empty() && msg.header.resource_version.is_empty());
    let content: Value = serde_json::from_str(msg.content.get()).unwrap();
    let mut keys: Vec<&str> = content.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ExtendResources", "HostState", "Status", "UID"]);
    assert_eq!(content["ExtendResources"], Value::Null);
    assert_eq!(content["UID"].as_str().map(str::len), Some(36));
    let status = &content["Status"];
    assert_eq!(status["addresses"][0]["address"], NODE);
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["capacity"]["pods"], "110");
    assert_eq!(status["nodeInfo"]["operatingSystem"], "linux");
}

fn is_node_status(msg: &Message) -> bool {
    msg.route.resource == format!("default/nodestatus/{NODE}")
}

#[test]
fn node_status_reports_at_connect_and_every_interval() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let spec = node_status::spec(NODE.to_owned(), Duration::from_millis(200));
    let agent = Agent::start(cloud.config(), vec![spec]).unwrap();
    cloud.wait_connected();
    let first = cloud.wait_received("node status report", is_node_status);
    check_node_status(&first);
    let second = cloud.wait_received("second node status report", is_node_status);
    check_node_status(&second);
    assert_ne!(first.header.id, second.header.id);
    let uid = |m: &Message| serde_json::from_str::<Value>(m.content.get()).unwrap()["UID"].clone();
    assert_eq!(uid(&first), uid(&second), "the UID is stable");
    agent.stop();
}

#[test]
fn node_status_reports_on_every_connect_without_waiting_for_the_interval() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    // An interval no test outlives: every report seen here comes from a `cloud_connected` event.
    let spec = node_status::spec(NODE.to_owned(), Duration::from_secs(3600));
    let agent = Agent::start(cloud.config(), vec![spec]).unwrap();
    cloud.wait_connected();
    let first = cloud.wait_received("node status report at connect", is_node_status);
    check_node_status(&first);

    cloud.sim.cut(NODE);
    cloud.wait_connected();
    // The first report may be sent again (same msg_id) if the cut beat its confirmation.
    let again = cloud.wait_received("node status report at reconnect", |m| {
        is_node_status(m) && m.header.id != first.header.id
    });
    check_node_status(&again);
    assert_ne!(first.header.id, again.header.id);
    agent.stop();
}
