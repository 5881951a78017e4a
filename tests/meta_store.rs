#![cfg(feature = "cloudsim")]
//! The `meta` store against the CloudHub simulator over real TLS: it writes what the cloud sends
//! before ACKing it, stays idempotent under redelivery and old versions, deletes, refuses keys
//! that would leave its folder, group-commits a burst, publishes changes, answers queries (asking
//! the cloud first for the types it owns), and — with the real `edgehub` binary aborted between
//! the durable write and the ACK — gets the message again and ACKs it after a restart.
//!
//! The `#[ignore]`d `bench_durable_ack_rate` measures ACK rate and latency; run it with
//! `scripts/bench-store.sh`.

mod support;

use crossbeam_channel::{bounded, Receiver};
use edgehub::cloudsim::{SimConfig, SimEvent};
use edgehub::message::{json_content, Message};
use edgehub::modules::meta_store::{self, MetaHandle, StoredObject};
use edgehub::Agent;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;

/// A connected agent running only the `meta` module, its state dir and its query handle.
struct MetaAgent {
    agent: Agent,
    state_dir: PathBuf,
    handle: MetaHandle,
}

fn meta_agent(cloud: &Cloud) -> MetaAgent {
    meta_agent_with_changes(cloud, None)
}

fn meta_agent_with_changes(
    cloud: &Cloud,
    changes: Option<crossbeam_channel::Sender<Message>>,
) -> MetaAgent {
    let config = cloud.config();
    let state_dir = config.state_dir.clone();
    let (spec, handle) = meta_store::spec(state_dir.clone(), changes);
    let agent = Agent::start(config, vec![spec]).unwrap();
    cloud.wait_connected();
    // The agent counts itself connected before its first keepalive goes out.
    cloud.wait_received("first keepalive", |m| m.route.operation == "keepalive");
    MetaAgent { agent, state_dir, handle }
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
    found.sort();
    found
}

fn content_of(object: &StoredObject) -> Value {
    serde_json::from_str(object.content.get()).unwrap()
}

#[test]
fn insert_is_stored_before_it_is_acked() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let m = meta_agent(&cloud);
    let insert =
        object("insert", "default/pod/nginx", "482913", r#"{"metadata":{"name":"nginx"}}"#);
    cloud.sim.push(NODE, insert.clone());

    let ack = cloud.wait_received("ack of the insert", |m| m.header.parent_id == insert.header.id);
    // The ACK left only after the durable write, so the file must already be complete.
    let stored = record(&store_file(&m.state_dir, "default/pod/nginx"));
    assert_eq!(stored["resourceVersion"], "482913");
    assert_eq!(stored["msgId"], insert.header.id.as_str());
    assert_eq!(stored["content"], serde_json::json!({"metadata": {"name": "nginx"}}));
    assert_eq!(ack.route.operation, "response");
    assert_eq!(ack.route.source, "edgecontroller");
    assert_eq!(ack.route.resource, "default/pod/nginx");
    assert_eq!(ack.content_text().as_deref(), Some("OK"));
    wait_ack(&cloud, &insert);
    m.agent.stop();
}

#[test]
fn redelivered_message_is_acked_again_and_not_rewritten() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let m = meta_agent(&cloud);
    let insert = object("insert", "default/configmap/app-cfg", "7", r#"{"data":{"k":"v"}}"#);
    cloud.sim.push(NODE, insert.clone());
    wait_ack(&cloud, &insert);
    let path = store_file(&m.state_dir, "default/configmap/app-cfg");
    let (bytes, inode) = (std::fs::read(&path).unwrap(), std::fs::metadata(&path).unwrap().ino());

    cloud.sim.push(NODE, insert.clone()); // same msg_id, as CloudHub's resend
    wait_ack(&cloud, &insert);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "a rewrite would rename a new file");
    m.agent.stop();
}

#[test]
fn older_version_after_newer_does_not_overwrite() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let m = meta_agent(&cloud);
    let newer = object("update", "default/pod/p", "10", r#"{"v":"newer"}"#);
    let older = object("update", "default/pod/p", "9", r#"{"v":"older"}"#);
    cloud.sim.push(NODE, newer.clone());
    cloud.sim.push(NODE, older.clone());
    wait_ack(&cloud, &newer);
    wait_ack(&cloud, &older);
    let stored = record(&store_file(&m.state_dir, "default/pod/p"));
    assert_eq!(stored["resourceVersion"], "10");
    assert_eq!(stored["msgId"], newer.header.id.as_str());
    assert_eq!(stored["content"]["v"], "newer");
    m.agent.stop();
}

#[test]
fn delete_removes_the_file_and_is_acked() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let m = meta_agent(&cloud);
    let path = store_file(&m.state_dir, "default/secret/token");
    let insert = object("insert", "default/secret/token", "3", r#"{"data":{}}"#);
    cloud.sim.push(NODE, insert.clone());
    wait_ack(&cloud, &insert);
    assert!(path.exists());

    // CloudHub delivers deletes through the ACK queue even without a resourceversion.
    let delete = object("delete", "default/secret/token", "", "null");
    cloud.sim.push(NODE, delete.clone());
    wait_ack(&cloud, &delete);
    assert!(!path.exists(), "{} still there after the delete was acked", path.display());
    m.agent.stop();
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
    let m = meta_agent(&cloud);
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
    assert!(!m.state_dir.join("escaped.json").exists());
    let escaped: Vec<_> = files_under(cloud_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("escaped"))
        .collect();
    assert!(escaped.is_empty(), "{escaped:?}");
    assert_eq!(files_under(&m.state_dir), [store_file(&m.state_dir, "default/pod/after")]);
    m.agent.stop();
}

/// Issue 11 item 1: a store write that fails (here a file where the `configmap` folder must go,
/// which fails for root too, like a full disk does) releases the msg_id, so the cloud's next
/// re-send of the same message is applied and ACKed once the disk is usable again, without a
/// restart. Before the fix every re-send was dropped as "still in progress".
#[test]
fn failed_store_write_is_retried_on_the_cloud_resend_and_then_acked() {
    let _w = watchdog(Duration::from_secs(40));
    let cloud = Cloud::start_with(|sim| sim.ack_retry_interval = Duration::from_millis(300));
    let m = meta_agent(&cloud);
    let namespace_dir = m.state_dir.join(meta_store::STORE_DIR).join("default");
    std::fs::create_dir_all(&namespace_dir).unwrap();
    let obstacle = namespace_dir.join("configmap");
    std::fs::write(&obstacle, "a file where the folder must go").unwrap();

    let insert = object("insert", "default/configmap/app-cfg", "7", r#"{"data":{"k":"v"}}"#);
    cloud.sim.push(NODE, insert.clone());
    // The first write fails: wait until the store has decided on it.
    let deadline = Instant::now() + PATIENCE;
    while m.handle.stats().messages < 1 {
        assert!(Instant::now() < deadline, "the store never saw the message");
        std::thread::sleep(Duration::from_millis(20));
    }
    let path = store_file(&m.state_dir, "default/configmap/app-cfg");
    assert!(!path.exists());
    std::fs::remove_file(&obstacle).unwrap(); // space freed

    cloud.wait_for("ack after a re-send", |e| match e {
        SimEvent::Ack { parent_id, .. } if *parent_id == insert.header.id => Some(()),
        _ => None,
    });
    let stored = record(&path);
    assert_eq!(stored["resourceVersion"], "7");
    assert_eq!(stored["msgId"], insert.header.id.as_str());
    assert!(m.handle.stats().messages >= 2, "the re-send went through the store");
    m.agent.stop();
}

#[test]
fn hostile_keys_among_good_ones_in_one_burst_are_never_acked() {
    let _w = watchdog(Duration::from_secs(30));
    // Everything in flight at once, so hostile and good keys share batches.
    let cloud = Cloud::start_with(|sim| {
        sim.ack_window = 64;
        sim.ack_retry_interval = Duration::from_millis(200);
        sim.ack_max_writes = 2;
        sim.ack_requeue_delay = Duration::from_millis(50);
    });
    let m = meta_agent(&cloud);
    let long_name = format!("default/pod/{}", "n".repeat(meta_store::MAX_NAME_BYTES + 1));
    let hostile: Vec<Message> = [
        "../../escaped",
        "/etc/escaped",
        "default/../../../escaped",
        "default/pod/a b",
        &long_name,
    ]
    .iter()
    .map(|key| object("insert", key, "1", r#"{"pwned":true}"#))
    .collect();
    let good: Vec<Message> =
        (0..5).map(|i| object("insert", &format!("default/pod/good-{i}"), "1", "{}")).collect();
    for (bad, fine) in hostile.iter().zip(&good) {
        cloud.sim.push(NODE, bad.clone());
        cloud.sim.push(NODE, fine.clone());
    }
    let hostile_ids: HashSet<&str> = hostile.iter().map(|m| m.header.id.as_str()).collect();
    let mut acked: HashSet<String> = HashSet::new();
    let mut given_up: HashSet<String> = HashSet::new();
    while acked.len() < good.len() || given_up.len() < hostile.len() {
        cloud.wait_for("acks of the good keys, give-ups of the hostile ones", |e| match e {
            SimEvent::Ack { parent_id, .. } => {
                assert!(!hostile_ids.contains(parent_id.as_str()), "a hostile key was acked");
                acked.insert(parent_id.clone());
                Some(())
            }
            SimEvent::GaveUp { msg_id, .. } if hostile_ids.contains(msg_id.as_str()) => {
                given_up.insert(msg_id.clone());
                Some(())
            }
            _ => None,
        });
    }
    let want: Vec<PathBuf> =
        (0..5).map(|i| store_file(&m.state_dir, &format!("default/pod/good-{i}"))).collect();
    assert_eq!(files_under(&m.state_dir), want);
    assert!(files_under(cloud.dir.path()).iter().all(|p| !p.to_string_lossy().contains("escaped")));
    m.agent.stop();
}

#[test]
fn a_burst_of_1000_is_group_committed_and_every_message_is_stored_then_acked() {
    let _w = watchdog(Duration::from_secs(60));
    // The simulator writes the whole burst without waiting for ACKs, so the inbox fills.
    let cloud = Cloud::start_with(|sim| {
        sim.ack_window = 1000;
        sim.ack_retry_interval = Duration::from_secs(30);
    });
    let m = meta_agent(&cloud);
    let burst: Vec<Message> = (0..1000)
        .map(|i| {
            object("insert", &format!("default/configmap/cm-{i}"), "5", &format!(r#"{{"n":{i}}}"#))
        })
        .collect();
    for msg in &burst {
        cloud.sim.push(NODE, msg.clone());
    }
    let mut waiting: HashSet<&str> = burst.iter().map(|m| m.header.id.as_str()).collect();
    while !waiting.is_empty() {
        let parent = cloud.wait_for("acks of the burst", |e| match e {
            SimEvent::Ack { parent_id, .. } => Some(parent_id.clone()),
            _ => None,
        });
        waiting.remove(parent.as_str());
    }
    for (i, msg) in burst.iter().enumerate() {
        let r = record(&store_file(&m.state_dir, &format!("default/configmap/cm-{i}")));
        assert_eq!(
            (&r["msgId"], &r["content"]["n"]),
            (&Value::from(msg.header.id.as_str()), &Value::from(i))
        );
    }
    let stats = m.handle.stats();
    eprintln!("burst of 1000: {stats:?}");
    assert_eq!(stats.messages, 1000);
    assert_eq!(stats.file_syncs, 1000, "one fsync per object");
    // Group commit: messages that wait together are committed together, each batch ending in
    // one folder fsync (plus one per folder created) and then its ACKs. How many batches there
    // are depends on timing, so that is not asserted (issue 11); that batches form at all in a
    // burst of 1000, and the one fsync per batch, are.
    assert!(stats.largest_batch > 1, "{stats:?}");
    assert!(stats.dir_syncs <= stats.batches + 4, "{stats:?}");
    m.agent.stop();
}

#[test]
fn applied_messages_reach_the_change_channel_once_and_a_full_channel_drops_and_counts() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (changes_tx, changes_rx) = bounded(2);
    let m = meta_agent_with_changes(&cloud, Some(changes_tx));
    let insert = object("insert", "default/pod/p", "1", r#"{"v":1}"#);
    cloud.sim.push(NODE, insert.clone());
    wait_ack(&cloud, &insert);
    assert_eq!(recv_within(&changes_rx, "change event"), insert);

    cloud.sim.push(NODE, insert.clone()); // a redelivery changes nothing: no event
    wait_ack(&cloud, &insert);
    let delete = object("delete", "default/pod/p", "2", "null");
    cloud.sim.push(NODE, delete.clone());
    wait_ack(&cloud, &delete);
    assert_eq!(recv_within(&changes_rx, "delete event"), delete, "no event for the redelivery");

    // Nobody reads now: two fit, the third and fourth are dropped (never blocking the store).
    let updates: Vec<Message> =
        (3..7).map(|rv| object("update", "default/pod/q", &rv.to_string(), "{}")).collect();
    for msg in &updates {
        cloud.sim.push(NODE, msg.clone());
    }
    // Events are offered before the ACK goes out, so after the last ACK all four were offered.
    updates.iter().for_each(|msg| wait_ack(&cloud, msg));
    assert_eq!(m.handle.stats().changes_dropped, 2);
    let kept: Vec<Message> = changes_rx.try_iter().collect();
    assert_eq!(kept, updates[..2]);
    m.agent.stop();
}

/// Runs `query` on its own thread (it blocks while the test plays the cloud).
fn query_async(
    m: &MetaAgent,
    resource: &str,
    timeout: Duration,
) -> Receiver<edgehub::Result<Option<StoredObject>>> {
    let (handle, hub, resource) = (m.handle.clone(), m.agent.hub(), resource.to_owned());
    let (tx, rx) = bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(handle.query(&hub, &resource, timeout));
    });
    rx
}

fn is_query_for(msg: &Message, resource: &str) -> bool {
    msg.route.operation == "query" && msg.route.resource == resource
}

#[test]
fn query_for_a_cloud_owned_type_asks_the_cloud_stores_the_answer_and_acks_it() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let (changes_tx, changes_rx) = bounded(8);
    let m = meta_agent_with_changes(&cloud, Some(changes_tx));
    let resource = "default/configmap/app-cfg";
    let answer = query_async(&m, resource, PATIENCE);

    let query = cloud.wait_received("query", |msg| is_query_for(msg, resource));
    assert_eq!(query.route.source, "metaManager");
    assert_eq!(query.route.group, "meta");
    assert_eq!(query.content.get(), "null");
    let mut response = object("response", resource, "4711", r#"{"data":{"LOG_LEVEL":"info"}}"#);
    response.header.parent_id = query.header.id.clone();
    cloud.sim.push(NODE, response.clone());

    let object = recv_within(&answer, "query answer").unwrap().expect("an object");
    assert_eq!((object.resource.as_str(), object.resource_version.as_str()), (resource, "4711"));
    assert_eq!(content_of(&object)["data"]["LOG_LEVEL"], "info");
    // Answered only once stored, so the file is there already; the ACK follows.
    let stored = record(&store_file(&m.state_dir, resource));
    assert_eq!(
        (stored["resourceVersion"].as_str(), stored["msgId"].as_str()),
        (Some("4711"), Some(response.header.id.as_str()))
    );
    wait_ack(&cloud, &response);
    assert_eq!(recv_within(&changes_rx, "change event"), response);
    m.agent.stop();
}

#[test]
fn query_falls_back_to_the_stored_copy_when_the_cloud_does_not_answer() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let m = meta_agent(&cloud);
    let resource = "default/secret/token";
    let insert = object("insert", resource, "3", r#"{"data":{"t":"old"}}"#);
    cloud.sim.push(NODE, insert.clone());
    wait_ack(&cloud, &insert);

    let answer = query_async(&m, resource, Duration::from_millis(300));
    cloud.wait_received("query", |msg| is_query_for(msg, resource)); // and never answered
    let object = recv_within(&answer, "fallback answer").unwrap().expect("the stored copy");
    assert_eq!(object.resource_version, "3");
    assert_eq!(content_of(&object)["data"]["t"], "old");
    m.agent.stop();
}

#[test]
fn query_for_a_type_the_edge_owns_is_answered_from_the_store_without_asking() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let m = meta_agent(&cloud);
    let pod = object("insert", "default/pod/p", "8", r#"{"spec":{}}"#);
    cloud.sim.push(NODE, pod.clone());
    wait_ack(&cloud, &pod);

    let hub = m.agent.hub();
    let object = m.handle.query(&hub, "default/pod/p", PATIENCE).unwrap().expect("stored pod");
    assert_eq!(
        (object.resource_version.as_str(), content_of(&object)),
        ("8", serde_json::json!({"spec": {}}))
    );
    assert!(m.handle.query(&hub, "default/pod/absent", PATIENCE).unwrap().is_none());
    // Bad keys are refused before anything happens.
    for bad in ["../../etc/passwd", "default/pod", "default/configmap/a b"] {
        assert!(m.handle.query(&hub, bad, PATIENCE).is_err(), "{bad}");
    }
    // The cloud saw no query: a marker sent afterwards arrives with no query before it.
    hub.send(numbered(1)).unwrap();
    cloud.wait_received("marker", |msg| {
        assert_ne!(msg.route.operation, "query", "{msg:?}");
        seq_of(msg) == Some(1)
    });
    m.agent.stop();
}

#[test]
fn query_while_disconnected_is_answered_from_the_store_at_once() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let mut config = cloud.config();
    // Nothing listens there: the agent never connects.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.websocket.server = unused.local_addr().unwrap().to_string();
    drop(unused);
    let state_dir = config.state_dir.clone();
    let resource = "default/configmap/offline";
    let mut store = meta_store::Store::new(state_dir.join(meta_store::STORE_DIR));
    assert!(store.apply(&object("insert", resource, "2", r#"{"k":"v"}"#)).is_applied());

    let (spec, handle) = meta_store::spec(state_dir, None);
    let agent = Agent::start(config, vec![spec]).unwrap();
    let hub = agent.hub();
    assert!(!hub.is_connected());
    // A day-long timeout: waiting on the cloud at all would trip the watchdog.
    let object = handle.query(&hub, resource, Duration::from_secs(86_400)).unwrap().unwrap();
    assert_eq!(object.resource_version, "2");
    assert_eq!(agent.outbox_len(), 0, "no query was queued for the cloud");
    agent.stop();
}

#[test]
fn query_answered_with_an_error_by_the_cloud_is_an_error() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let m = meta_agent(&cloud);
    let resource = "default/configmap/missing";
    let answer = query_async(&m, resource, PATIENCE);
    let query = cloud.wait_received("query", |msg| is_query_for(msg, resource));
    let mut refusal = cloud_msg("resource", "edgecontroller", "error", resource, "");
    refusal.content = edgehub::message::text_content("configmaps \"missing\" not found");
    refusal.header.parent_id = query.header.id.clone();
    cloud.sim.push(NODE, refusal);
    let err = recv_within(&answer, "query answer").unwrap_err().to_string();
    assert!(err.contains("not found"), "{err}");
    assert!(!store_file(&m.state_dir, resource).exists());
    m.agent.stop();
}

/// The `edgehub` binary's config for this cloud, written into the cloud's temp dir.
fn write_binary_config(cloud: &Cloud) -> PathBuf {
    let dir = cloud.dir.path();
    let config = serde_json::json!({
        "nodeName": NODE,
        "heartbeat": HEARTBEAT.as_secs_f64(),
        "websocket": {
            "server": cloud.sim.addr().to_string(),
            "readDeadline": READ_DEADLINE.as_secs_f64(),
            "handshakeTimeout": 3,
            "writeDeadline": 2,
        },
        "tlsCaFile": cloud.paths.ca_cert,
        "tlsCertFile": cloud.paths.client_cert,
        "tlsPrivateKeyFile": cloud.paths.client_key,
        "stateDir": dir.join("state"),
        "localApiSocket": dir.join("api.sock"),
        "nodeStatusInterval": 3600,
        "reconnectJitter": 0,
        "logLevel": "debug",
    });
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    path
}

/// A running `edgehub run`. A waiter thread owns the child and reports its exit on a channel, so
/// every wait on it is bounded.
struct Edgehub {
    exited: Receiver<std::process::ExitStatus>,
    pid: u32,
}

impl Edgehub {
    fn start(config: &Path, log: &Path, crash_hook: bool) -> Edgehub {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_edgehub"));
        command.args(["run", "--config"]).arg(config);
        command.stderr(std::fs::File::create(log).unwrap());
        if crash_hook {
            command.env(meta_store::CRASH_HOOK_ENV, "1");
        } else {
            command.env_remove(meta_store::CRASH_HOOK_ENV);
        }
        let mut child = command.spawn().unwrap();
        let pid = child.id();
        let (tx, exited) = bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(child.wait().unwrap());
        });
        Edgehub { exited, pid }
    }

    fn wait_exit(&self, what: &str) -> std::process::ExitStatus {
        recv_within(&self.exited, what)
    }

    /// SIGKILL, unless it already exited (then its pid may belong to someone else).
    fn kill(self) {
        if self.exited.try_recv().is_ok() {
            return;
        }
        let _ = std::process::Command::new("kill").args(["-KILL", &self.pid.to_string()]).status();
        let _ = self.wait_exit("exit after SIGKILL");
    }
}

#[test]
fn agent_killed_between_durable_write_and_ack_gets_the_message_again_and_acks_it() {
    use std::os::unix::process::ExitStatusExt;
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let config = write_binary_config(&cloud);
    let state_dir = cloud.dir.path().join("state");
    let resource = "default/configmap/crash-cfg";
    let insert = object("insert", resource, "42", r#"{"data":{"k":"v"}}"#);

    let first = Edgehub::start(&config, &cloud.dir.path().join("first.log"), true);
    cloud.wait_connected();
    cloud.sim.push(NODE, insert.clone());
    let status = first.wait_exit("abort after the durable write");
    assert_eq!(status.signal(), Some(6), "SIGABRT from the crash hook, got {status:?}");
    cloud.wait_for("disconnect", |e| matches!(e, SimEvent::Disconnected { .. }).then_some(()));
    // Durable before the crash, and no ACK left the process.
    let path = store_file(&state_dir, resource);
    let stored = record(&path);
    assert_eq!(stored["msgId"], insert.header.id.as_str());
    assert_eq!(stored["content"]["data"]["k"], "v");
    let inode = std::fs::metadata(&path).unwrap().ino();
    assert_eq!(cloud.sim.in_flight(NODE).as_deref(), Some(insert.header.id.as_str()));
    assert!(
        cloud.events.try_iter().all(|e| !matches!(e, SimEvent::Ack { .. })),
        "nothing may be acked before the crash"
    );

    let second = Edgehub::start(&config, &cloud.dir.path().join("second.log"), false);
    cloud.wait_connected();
    // CloudHub writes the unacked message again, same msg_id, on the new connection.
    cloud.wait_for("resend of the insert", |e| match e {
        SimEvent::Sent { msg_id, .. } if *msg_id == insert.header.id => Some(()),
        _ => None,
    });
    wait_ack(&cloud, &insert);
    assert_eq!(record(&path), stored, "the record is unchanged");
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "and was not rewritten");
    let leftovers: Vec<PathBuf> = files_under(&state_dir.join(meta_store::STORE_DIR))
        .into_iter()
        .filter(|p| p != &path)
        .collect();
    assert!(leftovers.is_empty(), "no temp files left: {leftovers:?}");
    second.kill();
}

/// What one benchmark run measured.
struct BenchResult {
    messages: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    resends: usize,
    stats: meta_store::StoreStats,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Pushes `n` inserts of distinct configmaps (about 600 bytes each, like a small real one) and
/// times each from the simulator's first write to its ACK's arrival.
fn bench_run(n: usize, window: usize) -> (BenchResult, Cloud) {
    let cloud = Cloud::start_with(|sim: &mut SimConfig| {
        sim.ack_window = window;
        // A resend would only measure the simulator: long enough for any run here.
        sim.ack_retry_interval = Duration::from_secs(120);
    });
    let m = meta_agent(&cloud);
    let data = "x".repeat(400);
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            let rv = (1000 + i).to_string();
            let body = serde_json::json!({
                "metadata": {"name": format!("bench-{i}"), "namespace": "default",
                    "uid": edgehub::message::new_uuid(), "resourceVersion": rv},
                "data": {"payload": data},
            });
            object("insert", &format!("default/configmap/bench-{i}"), &rv, &body.to_string())
        })
        .collect();
    let ids: HashSet<String> = msgs.iter().map(|m| m.header.id.clone()).collect();
    for msg in &msgs {
        cloud.sim.push(NODE, msg.clone());
    }
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut acked: HashMap<String, Instant> = HashMap::new();
    let mut resends = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while acked.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match cloud.events.recv_timeout(left).expect("benchmark stalled") {
            SimEvent::Sent { msg_id, attempt, at, .. } if ids.contains(&msg_id) => {
                if attempt == 1 && !sent.contains_key(&msg_id) {
                    sent.insert(msg_id, at);
                } else {
                    resends += 1;
                }
            }
            SimEvent::Received { msg, at, .. }
                if msg.route.operation == "response" && ids.contains(&msg.header.parent_id) =>
            {
                acked.entry(msg.header.parent_id).or_insert(at);
            }
            _ => {}
        }
    }
    let first_sent = sent.values().min().copied().unwrap();
    let last_ack = acked.values().max().copied().unwrap();
    let mut latencies: Vec<Duration> =
        acked.iter().map(|(id, at)| at.duration_since(sent[id])).collect();
    latencies.sort();
    let stats = m.handle.stats();
    m.agent.stop();
    let elapsed = last_ack.duration_since(first_sent);
    (BenchResult { messages: n, elapsed, latencies, resends, stats }, cloud)
}

fn report(mode: &str, r: &BenchResult) {
    let rate = r.messages as f64 / r.elapsed.as_secs_f64();
    let s = r.stats;
    println!(
        "{mode}: {} messages stored and ACKed in {:.3} s = {rate:.0} msg/s; send-to-ACK \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; batches {} (largest {}, mean {:.1}), \
         file fsyncs {}, folder fsyncs {}, resends {}",
        r.messages,
        r.elapsed.as_secs_f64(),
        percentile(&r.latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&r.latencies, 0.99).as_secs_f64() * 1e3,
        r.latencies.last().unwrap().as_secs_f64() * 1e3,
        s.batches,
        s.largest_batch,
        f64::from(s.messages) / f64::from(s.batches.max(1)),
        s.file_syncs,
        s.dir_syncs,
        r.resends,
    );
}

/// Durable ACK rate and send-to-ACK latency with the simulator pushing without waiting for ACKs,
/// then in CloudHub's one-in-flight mode. A measurement, not a check: run it with
/// `scripts/bench-store.sh` (release build). `EDGEHUB_BENCH_MESSAGES` sets the count (default
/// 5000); `TMPDIR` picks the file system the store writes to.
#[test]
#[ignore]
fn bench_durable_ack_rate() {
    let n: usize =
        std::env::var("EDGEHUB_BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    println!("store under {}", std::env::temp_dir().display());
    // Each run's files are kept until both are done: on ext4, thousands of just-deleted inodes
    // in a folder's block group slow every file creation there for minutes after.
    let (fast, _keep_fast) = bench_run(n, usize::MAX);
    report("fast mode (no in-flight limit)", &fast);
    let (faithful, _keep_faithful) = bench_run(n, 1);
    report("CloudHub mode (one in flight)", &faithful);
}
