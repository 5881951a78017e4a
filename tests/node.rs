#![cfg(feature = "cloudsim")]
//! The gateway as a Kubernetes node (issue 12), against the simulator's edgecontroller over real
//! TLS: the registration body, a refused registration retried, status every period with a kept
//! `lastTransitionTime`, registering again after the cloud deleted the node or stopped answering,
//! a pod bound to the node (stored, ACKed, reported Failed, its deletion confirmed), and a HEAD
//! cloud's `null/node/<node>` updates (stored and ACKed once each, no storm).

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::config::Seconds;
use edgehub::message::Message;
use edgehub::modules::{meta_store, node};
use edgehub::{Agent, Config};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::*;

const PERIOD: Duration = Duration::from_millis(500);

fn start_agent(cloud: &Cloud, tune: impl FnOnce(&mut Config)) -> Agent {
    let mut config = cloud.config();
    config.node_status_update_frequency = Some(Seconds(PERIOD));
    config.labels.insert("site".into(), "lab".into());
    config.annotations.insert("owner".into(), "ops".into());
    tune(&mut config);
    config.validate().unwrap();
    let (meta, store) = meta_store::spec(config.state_dir.clone(), None);
    let node = node::spec(node::Settings::from_config(&config), Some(store));
    Agent::start(config, vec![meta, node]).unwrap()
}

fn content(msg: &Message) -> Value {
    serde_json::from_str(msg.content.get()).unwrap()
}

fn is_registration(msg: &Message) -> bool {
    msg.route.operation == "insert" && msg.route.resource == format!("default/nodestatus/{NODE}")
}

fn is_status(msg: &Message) -> bool {
    msg.route.operation == "update" && msg.route.resource == format!("default/nodestatus/{NODE}")
}

/// Waits for the edgecontroller to report the node object with `action`.
fn wait_node_object(cloud: &Cloud, action: &str) -> Value {
    cloud.wait_for(&format!("node object {action}"), |e| match e {
        SimEvent::NodeObject { action: a, object, .. } if a == action => Some(object.clone()),
        _ => None,
    })
}

#[test]
fn registration_is_edgeds_node_and_precedes_every_status_report() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let agent = start_agent(&cloud, |_| {});
    let first = cloud.wait_received("first node message", |m| {
        m.route.resource == format!("default/nodestatus/{NODE}")
    });
    assert!(is_registration(&first), "first node message is the registration: {first:?}");
    assert_eq!((first.route.source.as_str(), first.route.group.as_str()), ("edged", "meta"));
    let body = content(&first);
    assert!(body["metadata"].get("name").is_none(), "no metadata.name: {body}");
    let labels = &body["metadata"]["labels"];
    assert_eq!(labels["kubernetes.io/hostname"], NODE);
    assert_eq!(labels["kubernetes.io/os"], "linux");
    let arch = labels["kubernetes.io/arch"].as_str().unwrap();
    assert!(["amd64", "arm64", "arm", "386", "mipsle", "mips"].contains(&arch), "{arch}");
    assert_eq!(labels["node-role.kubernetes.io/edge"], "");
    assert_eq!(labels["node-role.kubernetes.io/agent"], "");
    assert_eq!(labels["site"], "lab");
    assert_eq!(body["metadata"]["annotations"], json!({"owner": "ops"}));
    assert_eq!(
        body["spec"]["taints"],
        json!([{"key": "edgehub.io/no-containers", "value": "true", "effect": "NoSchedule"}])
    );
    assert_eq!(body["status"]["capacity"]["pods"], "0");
    assert_eq!(body["status"]["allocatable"]["pods"], "0");
    assert!(body["status"].get("conditions").is_none());
    assert_eq!(body["status"]["nodeInfo"]["kubeletVersion"], node::KUBELET_VERSION);

    let created = wait_node_object(&cloud, "created");
    assert_eq!(created["metadata"]["name"], NODE);
    let status = cloud.wait_received("status after registration", is_status);
    assert_eq!(content(&status)["Status"]["conditions"][0]["status"], "True");
    let held = wait_node_object(&cloud, "status");
    assert_eq!(held["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(held["spec"]["taints"][0]["effect"], "NoSchedule");
    agent.stop();
}

#[test]
fn a_refused_registration_is_retried_until_ok() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    cloud.sim.refuse_registrations(NODE, 2);
    let agent = start_agent(&cloud, |_| {});
    let mut inserts = 0;
    let mut status_before_ok = false;
    cloud.wait_for("node created after two refusals", |e| match e {
        SimEvent::Received { msg, .. } if is_registration(msg) => {
            inserts += 1;
            None
        }
        SimEvent::Received { msg, .. } if is_status(msg) => {
            status_before_ok = true;
            None
        }
        SimEvent::NodeObject { action, .. } if action == "created" => Some(()),
        _ => None,
    });
    assert_eq!(inserts, 3, "two refusals, then the one that worked");
    assert!(!status_before_ok, "no status report before the registration succeeded");
    cloud.wait_received("status after registration", is_status);
    agent.stop();
}

#[test]
fn status_every_period_with_ready_kept_transition_time_and_the_link_address() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let agent = start_agent(&cloud, |_| {});
    let mut reports = Vec::new();
    let mut responses_up = 0;
    let started = Instant::now();
    cloud.wait_for("four status reports", |e| match e {
        SimEvent::Received { msg, .. } if is_status(msg) => {
            reports.push(content(msg));
            (reports.len() == 4).then_some(())
        }
        SimEvent::Received { msg, .. } if msg.route.operation == "response" => {
            responses_up += 1;
            None
        }
        _ => None,
    });
    // The first is sent at registration, then one each period.
    assert!(started.elapsed() >= PERIOD * 2, "four reports in {:?}", started.elapsed());
    let transition = &reports[0]["Status"]["conditions"][0]["lastTransitionTime"];
    for report in &reports {
        let keys: Vec<&String> = report.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["ExtendResources", "HostState", "Status", "UID"]);
        let status = &report["Status"];
        let ready = &status["conditions"][0];
        assert_eq!(status["conditions"].as_array().unwrap().len(), 1);
        assert_eq!(ready["type"], "Ready");
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["reason"], "EdgeReady");
        assert_eq!(ready["message"], "edge is posting ready status");
        assert_eq!(&ready["lastTransitionTime"], transition, "kept while Ready does not change");
        assert_eq!(status["capacity"]["pods"], "0");
        assert_eq!(
            status["addresses"],
            json!([{"type": "InternalIP", "address": "127.0.0.1"},
                   {"type": "Hostname", "address": NODE}])
        );
        assert_eq!(status["nodeInfo"]["operatingSystem"], "linux");
    }
    // edgecontroller answers each report "OK" with a resourceversion: no-ack, so no ACK goes up
    // (issue 16).
    assert_eq!(responses_up, 0, "the status answers drew ACKs");
    agent.stop();
}

#[test]
fn a_node_deleted_in_the_cloud_registers_again_after_the_reconnect() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let agent = start_agent(&cloud, |_| {});
    let first = wait_node_object(&cloud, "created");
    cloud.wait_received("status", is_status);
    cloud.sim.delete_node(NODE);
    cloud.wait_for("disconnect on node deletion", |e| {
        matches!(e, SimEvent::Disconnected { reason, .. } if reason == "node deleted").then_some(())
    });
    cloud.wait_connected();
    let again = wait_node_object(&cloud, "created");
    assert_ne!(again["metadata"]["uid"], first["metadata"]["uid"], "a new Node object");
    cloud.wait_received("status for the new node", is_status);
    assert!(cloud.sim.node_object(NODE).is_some());
    agent.stop();
}

#[test]
fn status_updates_without_answers_lead_to_registering_again() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let agent = start_agent(&cloud, |_| {});
    wait_node_object(&cloud, "created");
    cloud.wait_received("status", is_status);
    // The object goes but the socket stays: updates are dropped with no reply (edge-node §1.5).
    cloud.sim.forget_node(NODE);
    let mut unanswered = 0;
    cloud.wait_for("registration again", |e| match e {
        SimEvent::Received { msg, .. } if is_status(msg) => {
            unanswered += 1;
            None
        }
        SimEvent::Received { msg, .. } if is_registration(msg) => Some(()),
        SimEvent::Disconnected { .. } => panic!("the link dropped; the test wants it up"),
        _ => None,
    });
    assert!(unanswered >= 2, "registered again after {unanswered} unanswered updates");
    wait_node_object(&cloud, "created");
    agent.stop();
}

#[test]
fn a_bound_pod_is_stored_acked_reported_failed_and_its_deletion_confirmed() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let agent = start_agent(&cloud, |_| {});
    wait_node_object(&cloud, "created");
    let pod = json!({"metadata": {"name": "nginx", "namespace": "default"},
                     "spec": {"containers": [{"name": "nginx", "image": "nginx:1.21"}]}});
    cloud.sim.bind_pod(NODE, pod);
    let uid = cloud.sim.pod(NODE, "default", "nginx").unwrap()["metadata"]["uid"].clone();
    cloud.wait_for("ACK of the pod insert", |e| match e {
        SimEvent::Received { msg, .. }
            if msg.route.operation == "response" && msg.route.resource == "default/pod/nginx" =>
        {
            Some(())
        }
        _ => None,
    });
    let stored = cloud.dir.path().join("state/meta/default/pod/nginx.json");
    assert!(stored.exists(), "pod stored before its ACK");
    let report = cloud.wait_received("pod status", |m| {
        m.route.operation == "update" && m.route.resource == "default/podstatus/nginx"
    });
    let report = content(&report);
    assert_eq!(report["UID"], uid);
    assert_eq!(report["Status"]["phase"], "Failed");
    assert_eq!(report["Status"]["reason"], node::POD_FAILED_REASON);
    wait_until("the cloud holds the pod as Failed", || {
        cloud.sim.pod(NODE, "default", "nginx").is_some_and(|p| p["status"]["phase"] == "Failed")
    });

    cloud.sim.delete_pod(NODE, "default", "nginx");
    let confirm = cloud.wait_received("pod deletion confirmed", |m| {
        m.route.operation == "delete" && m.route.resource == "default/pod/nginx"
    });
    assert_eq!(confirm.route.source, "edged");
    assert_eq!(confirm.content_text().as_deref(), uid.as_str());
    wait_until("the cloud deleted the pod", || cloud.sim.pod(NODE, "default", "nginx").is_none());
    wait_until("the pod's delete reached the store", || !stored.exists());
    agent.stop();
}

#[test]
fn head_node_object_updates_are_stored_and_acked_once_each_without_a_storm() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start_with(|c| c.head_node_updates = true);
    let agent = start_agent(&cloud, |_| {});
    wait_node_object(&cloud, "created");
    let mut statuses = 0;
    let mut acks: std::collections::HashMap<String, u32> = Default::default();
    let started = Instant::now();
    cloud.wait_for("six status reports", |e| match e {
        SimEvent::Received { msg, .. } if is_status(msg) => {
            statuses += 1;
            (statuses == 6).then_some(())
        }
        SimEvent::Received { msg, .. }
            if msg.route.operation == "response"
                && msg.route.resource == format!("null/node/{NODE}") =>
        {
            *acks.entry(msg.header.parent_id.clone()).or_default() += 1;
            None
        }
        SimEvent::GaveUp { .. } => panic!("a null/node update went unacknowledged"),
        _ => None,
    });
    // Six reports take at least five periods: the node object coming back after each report
    // does not set off another one.
    assert!(started.elapsed() >= PERIOD * 4, "six reports in {:?}", started.elapsed());
    assert!(acks.len() >= 4, "one null/node update per change: {acks:?}");
    assert!(acks.values().all(|&n| n == 1), "each ACKed once: {acks:?}");
    assert!(cloud.dir.path().join(format!("state/meta/null/node/{NODE}.json")).exists());
    agent.stop();
}

#[test]
fn old_status_interval_key_maps_and_both_keys_are_refused() {
    let cloud = Cloud::start();
    let mut config = cloud.config();
    config.node_status_interval = Some(Seconds(Duration::from_secs(30)));
    config.validate().unwrap();
    assert_eq!(config.node_status_period(), Duration::from_secs(30));
    config.node_status_update_frequency = Some(Seconds(Duration::from_secs(10)));
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("nodeStatusInterval"), "{e}");
    assert_eq!(cloud.config().node_status_period(), Duration::from_secs(10), "edged's default");
}

#[test]
fn a_label_added_to_the_config_reaches_a_node_that_registered_earlier() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let agent = start_agent(&cloud, |_| {});
    wait_node_object(&cloud, "created");
    let labelled = wait_node_object(&cloud, "labels");
    assert_eq!(labelled["metadata"]["labels"]["site"], "lab");
    agent.stop();

    // The insert is a no-op for a node that exists (edge-node §1.5); the label update at start
    // is what carries the new label (§1.4).
    let agent = start_agent(&cloud, |c| {
        c.labels.insert("zone".into(), "b".into());
    });
    // The first agent may have sent its label update again (a reconnect) before it stopped:
    // wait for the update that carries the new label.
    let labelled = cloud.wait_for("node object labels with zone", |e| match e {
        SimEvent::NodeObject { action, object, .. }
            if action == "labels" && object["metadata"]["labels"]["zone"] == "b" =>
        {
            Some(object.clone())
        }
        _ => None,
    });
    assert_eq!(labelled["metadata"]["labels"]["site"], "lab");
    assert_eq!(labelled["metadata"]["labels"]["node-role.kubernetes.io/edge"], "");
    agent.stop();
}
