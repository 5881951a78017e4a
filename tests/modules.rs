#![cfg(feature = "cloudsim")]
//! The built-in modules against the CloudHub simulator over real TLS: the `meta` store writes
//! what the cloud sends before ACKing it, stays idempotent under redelivery and old versions,
//! deletes, and refuses keys that would leave its folder; `node_status` reports up on connect.

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::message::{json_content, Message};
use edgehub::modules::{meta_store, node_status};
use edgehub::Agent;
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

/// The cloud and an agent running only the `meta` module, connected.
fn meta_agent(cloud: &Cloud) -> (Agent, PathBuf) {
    let config = cloud.config();
    let state_dir = config.state_dir.clone();
    let agent = Agent::start(config, vec![meta_store::spec(state_dir.clone())]).unwrap();
    cloud.wait_connected();
    (agent, state_dir)
}

fn store_file(state_dir: &Path, resource: &str) -> PathBuf {
    state_dir.join(meta_store::STORE_DIR).join(format!("{resource}.json"))
}

fn object(op: &str, resource: &str, rv: &str, content: &str) -> Message {
    let mut msg = cloud_msg("resource", "edgecontroller", op, resource, rv);
    msg.content = json_content(content).unwrap();
    msg
}

fn wait_ack(cloud: &Cloud, msg: &Message) {
    let id = &msg.header.id;
    cloud.wait_for("ack", |e| {
        matches!(e, SimEvent::Ack { parent_id, .. } if parent_id == id).then_some(())
    });
}

fn record(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn insert_is_stored_before_it_is_acked() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (agent, state_dir) = meta_agent(&cloud);
    let insert =
        object("insert", "default/pod/nginx", "482913", r#"{"metadata":{"name":"nginx"}}"#);
    cloud.sim.push(NODE, insert.clone());

    let ack = cloud.wait_received("ack of the insert", |m| m.header.parent_id == insert.header.id);
    // The ACK left only after the durable write, so the file must already be complete.
    let stored = record(&store_file(&state_dir, "default/pod/nginx"));
    assert_eq!(stored["resourceVersion"], "482913");
    assert_eq!(stored["msgId"], insert.header.id.as_str());
    assert_eq!(stored["content"], serde_json::json!({"metadata": {"name": "nginx"}}));
    assert_eq!(ack.route.operation, "response");
    assert_eq!(ack.route.source, "edgecontroller");
    assert_eq!(ack.route.resource, "default/pod/nginx");
    assert_eq!(ack.content_text().as_deref(), Some("OK"));
    wait_ack(&cloud, &insert);
    agent.stop();
}

#[test]
fn redelivered_message_is_acked_again_and_not_rewritten() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (agent, state_dir) = meta_agent(&cloud);
    let insert = object("insert", "default/configmap/app-cfg", "7", r#"{"data":{"k":"v"}}"#);
    cloud.sim.push(NODE, insert.clone());
    wait_ack(&cloud, &insert);
    let path = store_file(&state_dir, "default/configmap/app-cfg");
    let (bytes, inode) = (std::fs::read(&path).unwrap(), std::fs::metadata(&path).unwrap().ino());

    cloud.sim.push(NODE, insert.clone()); // same msg_id, as CloudHub's resend
    wait_ack(&cloud, &insert);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "a rewrite would rename a new file");
    agent.stop();
}

#[test]
fn older_version_after_newer_does_not_overwrite() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (agent, state_dir) = meta_agent(&cloud);
    let newer = object("update", "default/pod/p", "10", r#"{"v":"newer"}"#);
    let older = object("update", "default/pod/p", "9", r#"{"v":"older"}"#);
    cloud.sim.push(NODE, newer.clone());
    cloud.sim.push(NODE, older.clone());
    wait_ack(&cloud, &newer);
    wait_ack(&cloud, &older);
    let stored = record(&store_file(&state_dir, "default/pod/p"));
    assert_eq!(stored["resourceVersion"], "10");
    assert_eq!(stored["msgId"], newer.header.id.as_str());
    assert_eq!(stored["content"]["v"], "newer");
    agent.stop();
}

#[test]
fn delete_removes_the_file_and_is_acked() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (agent, state_dir) = meta_agent(&cloud);
    let path = store_file(&state_dir, "default/secret/token");
    let insert = object("insert", "default/secret/token", "3", r#"{"data":{}}"#);
    cloud.sim.push(NODE, insert.clone());
    wait_ack(&cloud, &insert);
    assert!(path.exists());

    // CloudHub delivers deletes through the ACK queue even without a resourceversion.
    let delete = object("delete", "default/secret/token", "", "null");
    cloud.sim.push(NODE, delete.clone());
    wait_ack(&cloud, &delete);
    assert!(!path.exists(), "{} still there after the delete was acked", path.display());
    agent.stop();
}

#[test]
fn traversal_key_is_neither_written_nor_acked() {
    let _w = watchdog(Duration::from_secs(30));
    // Short resend timing, so the unacked message is given up on quickly.
    let cloud = Cloud::start_with(|sim| {
        sim.ack_retry_interval = Duration::from_millis(150);
        sim.ack_max_writes = 2;
        sim.ack_requeue_delay = Duration::from_millis(50);
    });
    let (agent, state_dir) = meta_agent(&cloud);
    // Joined naively, this would be `<state_dir>/meta/../../escaped.json`: outside the state dir.
    let traversal = object("insert", "../../escaped", "1", r#"{"pwned":true}"#);
    let sentinel = object("insert", "default/pod/after", "2", "{}");
    cloud.sim.push(NODE, traversal.clone());
    cloud.sim.push(NODE, sentinel.clone());

    // The ack queue is FIFO: the sentinel goes out only once the traversal message was given up.
    let (mut gave_up, mut sentinel_acked) = (false, false);
    while !(gave_up && sentinel_acked) {
        let given_up =
            cloud.wait_for("give-up of the traversal message, ack of the sentinel", |e| match e {
                SimEvent::Ack { parent_id, .. } if *parent_id == traversal.header.id => {
                    panic!("the traversal message was acked")
                }
                SimEvent::Ack { parent_id, .. } if *parent_id == sentinel.header.id => Some(false),
                SimEvent::GaveUp { msg_id, .. } if *msg_id == traversal.header.id => Some(true),
                _ => None,
            });
        gave_up |= given_up;
        sentinel_acked |= !given_up;
    }
    let cloud_dir = cloud.dir.path();
    assert!(!cloud_dir.join("escaped.json").exists());
    assert!(!state_dir.join("escaped.json").exists());
    let escaped: Vec<_> = files_under(cloud_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("escaped"))
        .collect();
    assert!(escaped.is_empty(), "{escaped:?}");
    assert_eq!(files_under(&state_dir), [store_file(&state_dir, "default/pod/after")]);
    agent.stop();
}

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
    assert_eq!(keys, ["ExtendResources", "Status", "UID"]);
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
    let again = cloud.wait_received("node status report at reconnect", is_node_status);
    check_node_status(&again);
    assert_ne!(first.header.id, again.header.id);
    agent.stop();
}
