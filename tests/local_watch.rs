//! Objects followed by local apps (local API `watch`, issue 12), with the agent's built-in modules
//! talking to the CloudHub simulator over real TLS through a fault proxy: a ConfigMap changed in
//! the cloud reaches the client as one event per change; offline the object is served from the
//! store and the change made meanwhile arrives after the reconnect; the limits (objects followed,
//! minimum interval, bad requests) hold; and `edgehub query --watch` prints one line per change.
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::config::Seconds;
use edgehub::local_client::LocalClient;
use edgehub::{Agent, Config};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::proxy::Proxy;
use support::*;

const CONFIGMAP: &str = "default/configmap/app-cfg";
const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// An agent with the built-in modules, reaching the simulator through a proxy.
struct Edge {
    cloud: Cloud,
    proxy: Proxy,
    agent: Option<Agent>,
    socket: PathBuf,
    _dir: TempDir,
}

impl Edge {
    fn start(tune: impl FnOnce(&mut Config)) -> Edge {
        let cloud = Cloud::start();
        let proxy = Proxy::start(cloud.sim.addr()).unwrap();
        let dir = TempDir::new("watch");
        let mut config = cloud.config_to(&proxy.addr().to_string());
        config.local_api_socket = dir.path().join("api.sock");
        config.state_dir = dir.path().join("state");
        config.local_api_min_watch_interval = Seconds(MIN_INTERVAL);
        tune(&mut config);
        config.validate().unwrap();
        let socket = config.local_api_socket.clone();
        let modules = edgehub::cli::builtin_modules(&config).unwrap();
        let agent = Agent::start(config, modules).unwrap();
        cloud.wait_connected();
        let edge = Edge { cloud, proxy, agent: Some(agent), socket, _dir: dir };
        // The simulator sees the connection a moment before the agent calls itself connected.
        wait_until("the agent is connected", || edge.connected());
        edge
    }

    fn put(&self, resource: &str, rv: &str, level: &str) {
        let name = resource.rsplit('/').next().unwrap();
        let content = json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
            "data": {"LOG_LEVEL": level},
        });
        self.cloud.sim.put_object(resource, rv, &content.to_string()).unwrap();
    }

    fn connected(&self) -> bool {
        self.agent.as_ref().unwrap().hub().is_connected()
    }

    /// Waits for the next query of `resource` the cloud receives; returns when it arrived.
    fn wait_query(&self, resource: &str) -> Instant {
        self.cloud.wait_for("a query", |e| match e {
            SimEvent::Received { msg, at, .. }
                if msg.route.operation == "query" && msg.route.resource == resource =>
            {
                Some(*at)
            }
            _ => None,
        })
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop();
        }
    }
}

/// `(resourceVersion, LOG_LEVEL)` of an object as the local API shows it.
fn version_and_level(object: &Value) -> (String, String) {
    let rv = object["resourceVersion"].as_str().unwrap_or("?").to_owned();
    let level = object["content"]["data"]["LOG_LEVEL"].as_str().unwrap_or("?").to_owned();
    (rv, level)
}

fn pair(rv: &str, level: &str) -> (String, String) {
    (rv.to_owned(), level.to_owned())
}

/// The object a `watch` returned.
fn watched(client: &mut LocalClient, resource: &str) -> (String, String) {
    let object = client.watch(resource, Some(MIN_INTERVAL)).unwrap().expect("an object");
    version_and_level(&serde_json::from_str(object.get()).unwrap())
}

/// The object of the next `object` event for `resource`.
fn next_change(client: &mut LocalClient, resource: &str) -> (String, String) {
    loop {
        let line = client.next_event().unwrap().expect("the agent closed the connection");
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["event"] == "object" && event["resource"] == resource {
            assert!(event.get("error").is_none(), "{event}");
            return version_and_level(&event["object"]);
        }
    }
}

#[test]
fn a_configmap_changed_in_the_cloud_reaches_the_client_once_per_change() {
    let _w = watchdog(Duration::from_secs(60));
    let edge = Edge::start(|_| {});
    edge.put(CONFIGMAP, "4711", "info");
    let mut client = LocalClient::connect(&edge.socket).unwrap();
    assert_eq!(watched(&mut client, CONFIGMAP), pair("4711", "info"));

    edge.put(CONFIGMAP, "4712", "debug");
    assert_eq!(next_change(&mut client, CONFIGMAP), pair("4712", "debug"));

    // Two more rounds find nothing new; the next event is the next change, not a repeat.
    edge.wait_query(CONFIGMAP);
    edge.wait_query(CONFIGMAP);
    edge.put(CONFIGMAP, "4713", "warn");
    assert_eq!(next_change(&mut client, CONFIGMAP), pair("4713", "warn"));

    // The answers went through the store: a plain query (the cloud asked again) agrees.
    let object = client.query(CONFIGMAP).unwrap().expect("stored");
    assert_eq!(version_and_level(&serde_json::from_str(object.get()).unwrap()).0, "4713");
}

#[test]
fn offline_a_followed_object_is_served_from_the_store_and_the_change_arrives_on_reconnect() {
    let _w = watchdog(Duration::from_secs(60));
    let edge = Edge::start(|_| {});
    edge.put(CONFIGMAP, "1", "info");
    let mut first = LocalClient::connect(&edge.socket).unwrap();
    assert_eq!(watched(&mut first, CONFIGMAP), pair("1", "info"));

    edge.proxy.refuse_new(true);
    edge.proxy.cut_all();
    wait_until("the agent is offline", || !edge.connected());
    edge.put(CONFIGMAP, "2", "debug"); // changed in the cloud while the node is away

    // A watch made offline is answered from the store at once.
    let mut second = LocalClient::connect(&edge.socket).unwrap();
    let asked = Instant::now();
    assert_eq!(watched(&mut second, CONFIGMAP), pair("1", "info"));
    assert!(asked.elapsed() < Duration::from_secs(5), "served from the store, not the cloud");

    // Back online: both followers get the change, and nothing else before it (no event while
    // offline, when every round found the stored copy again).
    edge.proxy.refuse_new(false);
    assert_eq!(next_change(&mut first, CONFIGMAP), pair("2", "debug"));
    assert_eq!(next_change(&mut second, CONFIGMAP), pair("2", "debug"));
}

/// A raw line-protocol client, to see replies exactly.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Raw { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    /// Sends `request` and returns its reply, skipping events.
    fn call(&mut self, request: Value) -> Value {
        writeln!(self.writer, "{request}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "agent hung up");
            let reply: Value = serde_json::from_str(&line).unwrap();
            if reply.get("event").is_none() {
                return reply;
            }
        }
    }

    fn watch(&mut self, resource: &str, interval_ms: u64) -> Value {
        self.call(json!({"op": "watch", "resource": resource, "intervalMs": interval_ms}))
    }
}

#[test]
fn limits_on_followed_objects_and_intervals_are_enforced() {
    let _w = watchdog(Duration::from_secs(60));
    let min = Duration::from_millis(500);
    let edge = Edge::start(|c| {
        c.local_api_max_watches = 2;
        c.local_api_min_watch_interval = Seconds(min);
    });
    let [a, b, c] = ["default/configmap/a", "default/configmap/b", "default/secret/c"];
    for resource in [a, b, c] {
        edge.put(resource, "1", "info");
    }

    // An interval below the minimum is raised to it, and the cloud sees it kept: three gaps
    // between queries take about three minimum intervals, and surely more than two (a flood
    // would take milliseconds; a slow machine only makes the gaps longer).
    let mut one = Raw::connect(&edge.socket);
    let reply = one.watch(a, 1);
    assert_eq!((reply["ok"].clone(), reply["intervalMs"].clone()), (json!(true), json!(500)));
    assert_eq!(reply["object"]["resourceVersion"], "1", "{reply}");
    let first = edge.wait_query(a); // the watch's own query
    let mut last = first;
    for _ in 0..3 {
        last = edge.wait_query(a);
    }
    assert!(last - first >= min * 2, "3 rounds in {:?}", last - first);

    // At most two objects, all clients together; the same object again takes no new slot.
    assert_eq!(one.watch(b, 1000)["ok"], true);
    let mut two = Raw::connect(&edge.socket);
    let full = two.watch(c, 1000);
    assert_eq!((full["ok"].clone(), full["kind"].clone()), (json!(false), json!("full")));
    assert!(full["error"].as_str().unwrap().contains("localApiMaxWatches"), "{full}");
    assert_eq!(two.watch(a, 1000)["ok"], true);

    // Bad requests.
    for bad in [
        json!({"op": "watch", "resource": a, "intervalMs": 0}),
        json!({"op": "watch", "resource": a, "intervalMs": 86_400_001u64}),
        json!({"op": "watch", "resource": "default/configmap"}),
        json!({"op": "watch", "resource": "../../etc/passwd"}),
        json!({"op": "watch"}),
        json!({"op": "unwatch", "resource": c}),
    ] {
        let reply = two.call(bad.clone());
        assert_eq!(reply["kind"], "bad_request", "{bad} → {reply}");
    }

    // Unwatching, or hanging up, frees the slots.
    assert_eq!(one.call(json!({"op": "unwatch", "resource": b})), json!({"ok": true}));
    assert_eq!(two.watch(c, 1000)["ok"], true);
    drop(one); // `a` stays followed by `two`
    let mut three = Raw::connect(&edge.socket);
    assert_eq!(three.watch(b, 1000)["kind"], "full");
    drop(two);
    wait_until("the slots of a client that hung up are free", || {
        three.watch(b, 1000)["ok"] == true
    });
}

#[test]
fn edgehub_query_watch_prints_one_line_per_change_starting_with_null_for_an_absent_object() {
    let _w = watchdog(Duration::from_secs(60));
    // The cloud leaves a query for an object it does not have unanswered: a short request
    // timeout lets the store answer (nothing) soon.
    let edge = Edge::start(|c| c.request_timeout = Seconds(Duration::from_secs(1)));
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(["query", "--watch", CONFIGMAP, "--interval", "0.2", "--socket"])
        .arg(&edge.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("a line").unwrap();
    assert_eq!(next(), "null");
    edge.put(CONFIGMAP, "10", "info");
    let object = |line: String| version_and_level(&serde_json::from_str(&line).unwrap());
    assert_eq!(object(next()), pair("10", "info"));
    edge.put(CONFIGMAP, "11", "debug");
    assert_eq!(object(next()), pair("11", "debug"));
    child.kill().unwrap();
    child.wait().unwrap();
}
