#![cfg(feature = "cloudsim")]
//! DeviceTwin end to end: the agent with its twin module, a real mosquitto, a "mapper" (an MQTT
//! client on the same broker) and the simulated cloud's devicecontroller. Covers the two worked
//! examples of edge-node §2.8, membership add and remove, `membership/get`, `twin/get`, state
//! updates, the version rules, reports made while the cloud is away, two-segment IDs, a newer
//! cloud's Device object, malformed payloads, and devices surviving a restart.

mod support;

use crossbeam_channel::{bounded, Receiver};
use edgehub::cloudsim::devicecontroller::{Desired, DeviceController};
use edgehub::cloudsim::SimEvent;
use edgehub::message::Message;
use edgehub::modules::device_twin::{self, rules, topics, Links};
use edgehub::modules::meta_store;
use edgehub::mqtt::{Client, ClientBuilder, Options, Publish, Publisher};
use edgehub::{Agent, Config};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::mosquitto::Mosquitto;
use support::proxy::Proxy;
use support::{recv_within, wait_until, watchdog, Cloud, NODE, PATIENCE};

/// The agent side: the agent, its MQTT client, and what the twin forwards to the local API.
struct Edge {
    agent: Agent,
    client: Client,
    local_rx: Receiver<Message>,
}

impl Edge {
    fn stop(self) {
        self.agent.stop();
        self.client.stop();
    }
}

fn mqtt_options(broker: &Mosquitto, config: &Config) -> Options {
    let mut c = config.clone();
    c.event_bus.mqtt_server_external = broker.url();
    c.event_bus.mqtt_keep_alive = edgehub::config::Seconds(Duration::from_secs(5));
    Options::from_config(&c).unwrap().expect("mqtt is on")
}

/// Starts the agent with the resource store and the twin module on `broker`.
fn start_edge(config: &Config, broker: &Mosquitto) -> Edge {
    let cap = 1000;
    let mut builder = ClientBuilder::new(mqtt_options(broker, config));
    let twin_rx = builder.route(
        &topics::subscriptions(config.device_topic_id_segments)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        cap,
    );
    let client = builder.start().unwrap();
    let (changes_tx, changes_rx) = bounded(cap);
    let (meta, _store) = meta_store::spec(config.state_dir.clone(), Some(changes_tx));
    let (local_tx, local_rx) = bounded(cap);
    let settings = device_twin::Settings {
        state_dir: config.state_dir.clone(),
        rules: rules::Settings {
            node_name: config.node_name.clone(),
            id_segments: config.device_topic_id_segments,
        },
    };
    let links = Links {
        mqtt_in: twin_rx,
        mqtt_out: client.publisher(),
        meta_in: Some(changes_rx),
        meta_out: None,
        local_out: Some(local_tx),
    };
    let (twin, _handle) = device_twin::spec(settings, links).unwrap();
    let agent = Agent::start(config.clone(), vec![meta, twin]).unwrap();
    Edge { agent, client, local_rx }
}

/// A mapper: an MQTT client subscribed to every `$hw/events/…` topic.
struct Mapper {
    _client: Client,
    publisher: Publisher,
    rx: Receiver<Publish>,
}

impl Mapper {
    fn start(broker: &Mosquitto, config: &Config) -> Mapper {
        let mut options = mqtt_options(broker, config);
        options.client_id = format!("mapper-{}", std::process::id());
        let mut builder = ClientBuilder::new(options);
        let rx = builder.route(&["$hw/events/#"], 10_000);
        let client = builder.start().unwrap();
        let publisher = client.publisher();
        wait_until("mapper connected", || publisher.is_connected());
        Mapper { _client: client, publisher, rx }
    }

    fn publish(&self, topic: &str, payload: &Value) {
        self.publish_raw(topic, payload.to_string().as_bytes());
    }

    fn publish_raw(&self, topic: &str, payload: &[u8]) {
        self.publisher.publish(topic, payload.to_vec()).unwrap();
    }

    /// The next publish on `topic` for which `want` holds (others skipped), as JSON.
    fn wait_for(&self, topic: &str, mut want: impl FnMut(&Value) -> bool) -> Value {
        loop {
            let v = self.wait(topic);
            if want(&v) {
                return v;
            }
        }
    }

    /// The next publish on `topic` (others skipped), as JSON.
    fn wait(&self, topic: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let p = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no publish on {topic} within {PATIENCE:?}"));
            if p.topic == topic {
                return serde_json::from_slice(&p.payload)
                    .unwrap_or_else(|e| panic!("{topic}: {e}"));
            }
        }
    }

    /// The topics of the next `n` publishes under `prefix`, in order.
    fn next_topics(&self, prefix: &str, n: usize) -> Vec<String> {
        let mut topics = Vec::new();
        while topics.len() < n {
            let p = recv_within(&self.rx, "a publish");
            if p.topic.starts_with(prefix) && !p.topic.ends_with("/twin/update") {
                topics.push(p.topic);
            }
        }
        topics
    }

    /// Waits until the twin answers on the broker (its subscriptions are in place).
    fn wait_twin_ready(&self, segments: u8) {
        let id = if segments == 2 { "probe/probe" } else { "probe" };
        let result = format!("$hw/events/device/{id}/twin/get/result");
        wait_until("twin subscribed", || {
            self.publish(&format!("$hw/events/device/{id}/twin/get"), &json!({"event_id":"probe"}));
            let deadline = Instant::now() + Duration::from_millis(300);
            while let Ok(p) =
                self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if p.topic == result {
                    return true;
                }
            }
            false
        });
        while self.rx.try_recv().is_ok() {}
    }
}

/// Everything a test needs. `None` when mosquitto is missing (outside CI).
struct Rig {
    cloud: Cloud,
    broker: Mosquitto,
    config: Config,
    edge: Option<Edge>,
    mapper: Mapper,
    dc: DeviceController,
}

fn rig(test: &str, segments: u8, tune: impl FnOnce(&Cloud, &mut Config)) -> Option<Rig> {
    let broker = Mosquitto::start_or_skip(test)?;
    let cloud = Cloud::start();
    let mut config = cloud.config();
    config.device_topic_id_segments = segments;
    config.event_bus.mqtt_server_external = broker.url();
    tune(&cloud, &mut config);
    config.validate().unwrap();
    let edge = start_edge(&config, &broker);
    cloud.wait_connected();
    let mapper = Mapper::start(&broker, &config);
    mapper.wait_twin_ready(segments);
    Some(Rig { cloud, broker, config, edge: Some(edge), mapper, dc: DeviceController::new(NODE) })
}

impl Rig {
    fn edge(&self) -> &Edge {
        self.edge.as_ref().unwrap()
    }

    /// Waits for the next upstream message for which `want` holds.
    fn received(&self, what: &str, want: impl FnMut(&Message) -> bool) -> Message {
        self.cloud.wait_received(what, want)
    }

    /// Waits for an `edge_updated` of device `id`, feeds it to the devicecontroller and pushes
    /// its reply. Returns the message.
    fn edge_updated(&self, id: &str) -> Message {
        let resource = format!("device/{id}/twin/edge_updated");
        let msg = self.received("edge_updated", |m| m.route.resource == resource);
        let reply = self.dc.observe(&msg).expect("a reply to edge_updated");
        self.cloud.sim.push(NODE, reply);
        msg
    }

    /// §2.8's setup: thermo-1 with desired temperature 25 (float) at resourceVersion 4711.
    fn add_thermo(&self, id: &str) {
        self.cloud.sim.push(
            NODE,
            self.dc.membership_add(id, &[Desired::new("temperature", "25", "float")], 4711),
        );
        // In KubeEdge's order: the twins are applied (document, delta), then membership/updated.
        let delta = self.mapper.wait(&format!("$hw/events/device/{id}/twin/update/delta"));
        assert_eq!(delta["delta"], json!({"temperature":"25"}));
        let updated = self.mapper.wait(&format!("$hw/events/node/{NODE}/membership/updated"));
        assert_eq!(updated["added_devices"][0]["id"], id);
    }
}

fn body(msg: &Message) -> Value {
    serde_json::from_str(msg.content.get()).unwrap()
}

fn device_topic(id: &str, suffix: &str) -> String {
    format!("$hw/events/device/{id}/{suffix}")
}

#[test]
fn worked_examples_a_and_b_end_to_end() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(rig) = rig("worked_examples_a_and_b_end_to_end", 1, |_, _| {}) else { return };
    rig.add_thermo("thermo-1");
    // The membership message still reaches local API subscribers of `twin`.
    let forwarded = recv_within(&rig.edge().local_rx, "twin event for the local api");
    assert!(forwarded.route.resource.ends_with("membership"), "{forwarded:?}");

    // A: the mapper reports 23.5.
    rig.mapper.publish(
        &device_topic("thermo-1", "twin/update"),
        &json!({"event_id":"","timestamp":1_645_000_000_000_i64,"twin":{"temperature":{"actual":{"value":"23.5"},"metadata":{"type":"float"}}}}),
    );
    let order = rig.mapper.next_topics("$hw/events/device/thermo-1/", 3);
    assert_eq!(
        order,
        [
            device_topic("thermo-1", "twin/update/result"),
            device_topic("thermo-1", "twin/update/document"),
            device_topic("thermo-1", "twin/update/delta")
        ]
    );
    let up = rig.edge_updated("thermo-1");
    assert_eq!(
        (up.route.source.as_str(), up.route.group.as_str(), up.route.operation.as_str()),
        ("twin", "resource", "update")
    );
    let mut got = body(&up);
    let t = got["timestamp"].as_i64().unwrap();
    assert!(got["event_id"].as_str().unwrap().len() == 36);
    got["event_id"] = json!("<uuid>");
    assert_eq!(
        got,
        json!({"event_id":"<uuid>","timestamp":t,"twin":{"temperature":{"actual":{"value":"23.5","metadata":{"timestamp":t}},
               "optional":false,"metadata":{"type":"float"},"actual_version":{"cloud":0,"edge":1}}}})
    );
    let reported = rig.dc.reported("thermo-1", "temperature").unwrap();
    assert_eq!((reported.value.as_str(), reported.timestamp.clone()), ("23.5", t.to_string()));

    // B: the user sets desired to 26; the mapper gets the delta.
    rig.cloud.sim.push(
        NODE,
        rig.dc.cloud_updated("thermo-1", &[Desired::new("temperature", "26", "float")], 4790),
    );
    let delta = rig.mapper.wait(&device_topic("thermo-1", "twin/update/delta"));
    assert_eq!(delta["delta"], json!({"temperature":"26"}));
    assert_eq!(delta["twin"]["temperature"]["actual"]["value"], "23.5");
    assert_eq!(delta["twin"]["temperature"]["expected"]["value"], "26");
    rig.edge.unwrap().stop();
}

#[test]
fn membership_twin_get_and_state_update_over_mqtt() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(rig) = rig("membership_twin_get_and_state_update_over_mqtt", 1, |_, _| {}) else {
        return;
    };
    rig.add_thermo("thermo-1");
    let get = format!("$hw/events/node/{NODE}/membership/get");
    rig.mapper.publish(&get, &json!({"event_id":"m1"}));
    let list = rig.mapper.wait(&format!("{get}/result"));
    assert_eq!(list["event_id"], "m1");
    assert_eq!(list["devices"], json!([{"id":"thermo-1","name":"thermo-1"}]));

    rig.mapper.publish(&device_topic("thermo-1", "twin/get"), &json!({"event_id":"g1"}));
    let twin = rig.mapper.wait(&device_topic("thermo-1", "twin/get/result"));
    assert_eq!(twin["event_id"], "g1");
    assert_eq!(twin["twin"]["temperature"]["expected"]["value"], "25");
    assert!(twin["twin"]["temperature"].get("expected_version").is_none(), "versions stripped");

    rig.mapper.publish(&device_topic("thermo-1", "state/update"), &json!({"state":"online"}));
    let state = rig.mapper.wait(&device_topic("thermo-1", "state/update/result"));
    assert_eq!(state["device"]["state"], "online");
    let up = rig.received("state/update", |m| m.route.resource == "device/thermo-1/state/update");
    let text = up.content_text().expect("state/update content is a JSON string");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), state);

    rig.cloud.sim.push(NODE, rig.dc.membership_remove("thermo-1"));
    let removed = rig.mapper.wait(&format!("$hw/events/node/{NODE}/membership/updated"));
    assert_eq!(removed["added_devices"], Value::Null);
    assert_eq!(removed["removed_devices"][0]["id"], "thermo-1");
    rig.mapper.publish(&get, &json!({"event_id":"m2"}));
    assert_eq!(rig.mapper.wait(&format!("{get}/result"))["devices"], json!([]));
    rig.mapper.publish(&device_topic("thermo-1", "twin/get"), &json!({"event_id":"g2"}));
    assert_eq!(rig.mapper.wait(&device_topic("thermo-1", "twin/get/result"))["code"], 404);
    rig.edge.unwrap().stop();
}

#[test]
fn version_rules_a_mapper_written_expected_refuses_the_cloud_and_is_reported_back() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(rig) = rig("version_rules_end_to_end", 1, |_, _| {}) else { return };
    rig.add_thermo("thermo-1");
    rig.mapper.publish(
        &device_topic("thermo-1", "twin/update"),
        &json!({"event_id":"w","twin":{"temperature":{"expected":{"value":"30"}}}}),
    );
    assert_eq!(rig.mapper.wait(&device_topic("thermo-1", "twin/update/result"))["event_id"], "w");
    let first = rig.edge_updated("thermo-1");
    assert_eq!(
        body(&first)["twin"]["temperature"]["expected_version"],
        json!({"cloud":4711,"edge":1})
    );
    // The cloud's newer desired value is refused (edge version 1 > 0) and the edge's value goes up.
    rig.cloud.sim.push(
        NODE,
        rig.dc.cloud_updated("thermo-1", &[Desired::new("temperature", "26", "float")], 4800),
    );
    let refused = rig.edge_updated("thermo-1");
    let twin = &body(&refused)["twin"]["temperature"];
    assert_eq!(twin["expected"]["value"], "30");
    assert_eq!(twin["expected_version"], json!({"cloud":4711,"edge":1}));
    rig.mapper.publish(&device_topic("thermo-1", "twin/get"), &json!({"event_id":"g"}));
    let stored = rig.mapper.wait(&device_topic("thermo-1", "twin/get/result"));
    assert_eq!(stored["twin"]["temperature"]["expected"]["value"], "30");
    rig.edge.unwrap().stop();
}

#[test]
fn malformed_payloads_get_error_results_and_the_agent_goes_on() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(rig) = rig("malformed_payloads_get_error_results", 1, |_, _| {}) else { return };
    rig.add_thermo("thermo-1");
    rig.mapper.publish_raw(&device_topic("thermo-1", "twin/update"), b"\xff{not json");
    let error = rig.mapper.wait(&device_topic("", "twin/update/result"));
    assert_eq!((error["code"].clone(), error["event_id"].clone()), (json!(400), json!("")));
    // The stored twin has an `expected`, so a new expected value is type-checked (an `actual`
    // would not be: the first one of a twin is never checked, as in KubeEdge).
    rig.mapper.publish(
        &device_topic("thermo-1", "twin/update"),
        &json!({"event_id":"t","twin":{"temperature":{"expected":{"value":"hot"}}}}),
    );
    let type_error = rig.mapper.wait(&device_topic("thermo-1", "twin/update/result"));
    assert_eq!(
        (type_error["code"].clone(), type_error["event_id"].clone()),
        (json!(400), json!("t"))
    );
    rig.mapper.publish(&device_topic("ghost", "twin/update"), &json!({"event_id":"u","twin":{}}));
    assert_eq!(rig.mapper.wait(&device_topic("ghost", "twin/update/result"))["code"], 404);
    rig.mapper.publish_raw(&device_topic("thermo-1", "state/update"), b"[]");
    rig.mapper.publish_raw(&format!("$hw/events/node/{NODE}/membership/get"), b"");
    // still serving
    rig.mapper.publish(
        &device_topic("thermo-1", "twin/update"),
        &json!({"event_id":"ok","twin":{"temperature":{"actual":{"value":"21"}}}}),
    );
    let ok = rig.mapper.wait(&device_topic("thermo-1", "twin/update/result"));
    assert_eq!(ok["event_id"], "ok");
    assert!(ok.get("code").is_none(), "{ok}");
    assert_eq!(body(&rig.edge_updated("thermo-1"))["twin"]["temperature"]["actual"]["value"], "21");
    rig.edge.unwrap().stop();
}

#[test]
fn reports_made_while_the_cloud_is_away_arrive_after_it_returns_latest_per_device() {
    let _w = watchdog(Duration::from_secs(120));
    let mut proxy_slot = None;
    let Some(rig) = rig("reports_while_the_cloud_is_away", 1, |cloud, config| {
        let proxy = Proxy::start(cloud.sim.addr()).unwrap();
        *config = Config {
            websocket: cloud.config_to(&proxy.addr().to_string()).websocket,
            ..config.clone()
        };
        proxy_slot = Some(proxy);
    }) else {
        return;
    };
    let proxy = proxy_slot.unwrap();
    rig.add_thermo("thermo-1");
    rig.received("membership detail at connect", |m| m.route.resource == "membership/detail");

    proxy.refuse_new(true);
    proxy.cut_all();
    let hub = rig.edge().agent.hub();
    wait_until("agent sees the cloud gone", || !hub.is_connected());
    for (key, value) in
        [("temperature", "20"), ("humidity", "40"), ("temperature", "21"), ("temperature", "22")]
    {
        rig.mapper.publish(
            &device_topic("thermo-1", "twin/update"),
            &json!({"event_id":value,"twin":{key:{"actual":{"value":value}}}}),
        );
        assert_eq!(
            rig.mapper.wait(&device_topic("thermo-1", "twin/update/result"))["event_id"],
            value
        );
    }
    assert!(!hub.is_connected(), "the reports were made while the cloud was away");
    proxy.refuse_new(false);
    // What waited in the outbox goes first, then the detail request of the new connection.
    let up = rig.edge_updated("thermo-1");
    rig.received("membership detail at reconnect", |m| m.route.resource == "membership/detail");
    let twin = &body(&up)["twin"];
    assert_eq!(twin["temperature"]["actual"]["value"], "22", "latest wins");
    assert_eq!(twin["humidity"]["actual"]["value"], "40", "no twin lost to coalescing");
    // Only the latest went up: the next report's edge_updated is the next one the cloud sees.
    rig.mapper.publish(
        &device_topic("thermo-1", "twin/update"),
        &json!({"event_id":"after","twin":{"temperature":{"actual":{"value":"23"}}}}),
    );
    let next = rig.edge_updated("thermo-1");
    assert_eq!(body(&next)["twin"]["temperature"]["actual"]["value"], "23");
    assert_eq!(
        rig.dc.status("thermo-1").unwrap().edge_updates,
        2,
        "one coalesced message, then one live"
    );
    rig.edge.unwrap().stop();
}

#[test]
fn two_segment_ids_and_a_newer_cloud_device_object() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(rig) = rig("two_segment_ids_and_device_object", 2, |_, _| {}) else { return };
    let object = rig.dc.device_object(
        "default",
        "thermo-1",
        &[Desired::new("temperature", "26", "FLOAT")],
        12,
        "insert",
    );
    let object_id = object.header.id.clone();
    rig.cloud.sim.push(NODE, object);
    rig.cloud.wait_for("device object acked", |e| match e {
        SimEvent::Ack { parent_id, .. } if *parent_id == object_id => Some(()),
        _ => None,
    });
    let delta = rig.mapper.wait(&device_topic("default/thermo-1", "twin/update/delta"));
    assert_eq!(delta["delta"], json!({"temperature":"26"}));
    let updated = rig.mapper.wait(&format!("$hw/events/node/{NODE}/membership/updated"));
    assert_eq!(updated["added_devices"][0]["id"], "default/thermo-1");

    rig.mapper.publish(
        &device_topic("default/thermo-1", "twin/update"),
        &json!({"twin":{"temperature":{"actual":{"value":"24.5"}}}}),
    );
    rig.mapper.wait(&device_topic("default/thermo-1", "twin/update/result"));
    let up = rig.edge_updated("default/thermo-1");
    assert_eq!(body(&up)["twin"]["temperature"]["actual"]["value"], "24.5");

    // A changed desired value arrives as an update of the object: a new delta.
    rig.cloud.sim.push(
        NODE,
        rig.dc.device_object(
            "default",
            "thermo-1",
            &[Desired::new("temperature", "27", "FLOAT")],
            13,
            "update",
        ),
    );
    // (the report above re-published the delta for 26: a difference remained)
    let delta = rig.mapper.wait_for(&device_topic("default/thermo-1", "twin/update/delta"), |d| {
        d["delta"] == json!({"temperature":"27"})
    });
    assert_eq!(delta["twin"]["temperature"]["actual"]["value"], "24.5");
    // One-segment topics are not twin topics in this mode: no answer, and the agent goes on.
    rig.mapper.publish(&device_topic("thermo-1", "twin/get"), &json!({"event_id":"x"}));
    rig.mapper.publish(&device_topic("default/thermo-1", "twin/get"), &json!({"event_id":"y"}));
    let got = rig.mapper.wait(&device_topic("default/thermo-1", "twin/get/result"));
    assert_eq!(got["event_id"], "y");

    rig.cloud.sim.push(NODE, rig.dc.device_object("default", "thermo-1", &[], 14, "delete"));
    let removed = rig.mapper.wait(&format!("$hw/events/node/{NODE}/membership/updated"));
    assert_eq!(removed["removed_devices"][0]["id"], "default/thermo-1");
    rig.edge.unwrap().stop();
}

#[test]
fn devices_and_twins_survive_a_restart() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(mut rig) = rig("devices_and_twins_survive_a_restart", 1, |_, _| {}) else { return };
    rig.add_thermo("thermo-1");
    rig.mapper.publish(
        &device_topic("thermo-1", "twin/update"),
        &json!({"event_id":"r","twin":{"temperature":{"actual":{"value":"23.5"}}}}),
    );
    let result = rig.mapper.wait(&device_topic("thermo-1", "twin/update/result"));
    let stamp = result["twin"]["temperature"]["actual"]["metadata"]["timestamp"].clone();
    rig.edge.take().unwrap().stop();
    rig.edge = Some(start_edge(&rig.config, &rig.broker));
    rig.mapper.wait_twin_ready(1);
    rig.mapper.publish(&device_topic("thermo-1", "twin/get"), &json!({"event_id":"after"}));
    let got = rig.mapper.wait(&device_topic("thermo-1", "twin/get/result"));
    assert_eq!(
        got["twin"]["temperature"]["actual"],
        json!({"value":"23.5","metadata":{"timestamp":stamp}})
    );
    assert_eq!(got["twin"]["temperature"]["expected"]["value"], "25");
    rig.edge.take().unwrap().stop();
}

/// The next `message` event of group `group` on the local API.
fn local_event(local: &mut edgehub::local_client::LocalClient, group: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no {group} event on the local api");
        let line = local.next_event().unwrap().expect("the local api connection closed");
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["event"] == "message" && event["group"] == group {
            return event;
        }
    }
}

#[test]
fn the_assembled_agent_runs_the_twin_and_local_subscribers_still_see_twin_and_meta_events() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(broker) = Mosquitto::start_or_skip("assembled_agent_runs_the_twin") else { return };
    let cloud = Cloud::start();
    let dir = support::TempDir::new("twin-assembled");
    let mut config = cloud.config();
    config.event_bus.mqtt_server_external = broker.url();
    config.event_bus.mqtt_keep_alive = edgehub::config::Seconds(Duration::from_secs(5));
    config.local_api_socket = dir.path().join("api.sock");
    config.device_topic_id_segments = 2;
    config.validate().unwrap();
    let agent =
        Agent::start(config.clone(), edgehub::cli::builtin_modules(&config).unwrap()).unwrap();
    cloud.wait_connected();
    let mut local = edgehub::local_client::LocalClient::connect(&config.local_api_socket).unwrap();
    local.subscribe(&["twin".to_owned(), "meta".to_owned()]).unwrap();
    let mapper = Mapper::start(&broker, &config);
    mapper.wait_twin_ready(2);
    let dc = DeviceController::new(NODE);

    // A Device object: stored and ACKed by the resource store, passed on to `meta` subscribers,
    // and its desired value reaches the mapper.
    let object = dc.device_object(
        "default",
        "valve-1",
        &[Desired::new("open", "true", "BOOLEAN")],
        7,
        "insert",
    );
    let object_id = object.header.id.clone();
    cloud.sim.push(NODE, object);
    cloud.wait_for("device object acked", |e| match e {
        SimEvent::Ack { parent_id, .. } if *parent_id == object_id => Some(()),
        _ => None,
    });
    assert_eq!(
        mapper.wait(&device_topic("default/valve-1", "twin/update/delta"))["delta"],
        json!({"open":"true"})
    );
    assert_eq!(
        local_event(&mut local, "meta")["message"]["route"]["resource"],
        "default/device/valve-1"
    );

    // A cloud twin message: applied, and still seen by `twin` subscribers.
    cloud.sim.push(
        NODE,
        dc.cloud_updated("default/valve-1", &[Desired::new("open", "false", "boolean")], 8),
    );
    assert_eq!(
        mapper.wait_for(&device_topic("default/valve-1", "twin/update/delta"), |d| d["delta"]
            ["open"]
            == "false")["delta"],
        json!({"open":"false"})
    );
    let event = local_event(&mut local, "twin");
    assert_eq!(event["message"]["route"]["resource"], "device/default/valve-1/twin/cloud_updated");

    // A report reaches the cloud.
    mapper.publish(
        &device_topic("default/valve-1", "twin/update"),
        &json!({"twin":{"open":{"actual":{"value":"false"}}}}),
    );
    let up = cloud.wait_received("edge_updated", |m| {
        m.route.resource == "device/default/valve-1/twin/edge_updated"
    });
    assert_eq!(body(&up)["twin"]["open"]["actual"]["value"], "false");
    let twin = agent.hub().status_json()["twin"].clone();
    assert_eq!(twin["devices"], 1, "{twin}");
    assert!(twin["mqttHandled"].as_u64().unwrap() >= 2, "{twin}");
    assert_eq!(twin["storeFailures"], 0, "{twin}");
    agent.stop();
}

#[test]
fn a_stored_device_object_the_twin_never_applied_is_applied_at_start() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(mut rig) = rig("stored_device_object_applied_at_start", 2, |_, _| {}) else { return };
    let object = rig.dc.device_object(
        "default",
        "pump-1",
        &[Desired::new("speed", "3", "INT")],
        21,
        "insert",
    );
    rig.cloud.sim.push(NODE, object);
    assert_eq!(
        rig.mapper.wait(&device_topic("default/pump-1", "twin/update/delta"))["delta"],
        json!({"speed":"3"})
    );
    rig.edge.take().unwrap().stop();
    // As if the agent had died after the resource store ACKed the object and before the twin
    // stored its desired values: the twin's store lacks the device.
    std::fs::remove_dir_all(rig.config.state_dir.join("twin")).unwrap();
    rig.edge = Some(start_edge(&rig.config, &rig.broker));
    let delta = rig.mapper.wait(&device_topic("default/pump-1", "twin/update/delta"));
    assert_eq!(delta["delta"], json!({"speed":"3"}));
    rig.mapper.wait_twin_ready(2);
    rig.mapper.publish(&device_topic("default/pump-1", "twin/get"), &json!({"event_id":"g"}));
    let got = rig.mapper.wait(&device_topic("default/pump-1", "twin/get/result"));
    assert_eq!(got["twin"]["speed"]["expected"]["value"], "3");
    assert_eq!(got["twin"]["speed"]["metadata"]["type"], "int");
    // A second restart with everything applied re-sends nothing.
    rig.edge.take().unwrap().stop();
    rig.edge = Some(start_edge(&rig.config, &rig.broker));
    // The twin publishes in order: a catch-up delta would come before the first get/result.
    let result = device_topic("default/pump-1", "twin/get/result");
    let mut seen = Vec::new();
    wait_until("twin answers after the second restart", || {
        rig.mapper.publish(&device_topic("default/pump-1", "twin/get"), &json!({"event_id":"g2"}));
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(p) =
            rig.mapper.rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            seen.push(p.topic.clone());
            if p.topic == result {
                return true;
            }
        }
        false
    });
    assert!(!seen.iter().any(|t| t.ends_with("/delta")), "nothing re-sent: {seen:?}");
    rig.edge.take().unwrap().stop();
}

#[test]
fn a_report_the_store_cannot_write_is_answered_500_and_changes_nothing() {
    let _w = watchdog(Duration::from_secs(90));
    let Some(rig) = rig("store_failure_answers_500", 1, |_, _| {}) else { return };
    rig.add_thermo("thermo-1");
    let file = rig.config.state_dir.join("twin/thermo-1.json");
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap(); // the rename into place now fails
    let report = json!({"event_id":"r1","twin":{"temperature":{"actual":{"value":"23.5"}}}});
    rig.mapper.publish(&device_topic("thermo-1", "twin/update"), &report);
    let failed = rig.mapper.wait(&device_topic("thermo-1", "twin/update/result"));
    assert_eq!((failed["code"].clone(), failed["event_id"].clone()), (json!(500), json!("r1")));
    rig.mapper.publish(&device_topic("thermo-1", "twin/get"), &json!({"event_id":"g"}));
    let got = rig.mapper.wait(&device_topic("thermo-1", "twin/get/result"));
    assert!(got["twin"]["temperature"].get("actual").is_none(), "nothing applied: {got}");
    std::fs::remove_dir(&file).unwrap();
    rig.mapper.publish(
        &device_topic("thermo-1", "twin/update"),
        &json!({"event_id":"r2","twin":{"temperature":{"actual":{"value":"23.5"}}}}),
    );
    let ok = rig.mapper.wait(&device_topic("thermo-1", "twin/update/result"));
    assert_eq!(ok["event_id"], "r2");
    assert!(ok.get("code").is_none(), "{ok}");
    assert_eq!(
        body(&rig.edge_updated("thermo-1"))["twin"]["temperature"]["actual_version"],
        json!({"cloud":0,"edge":1})
    );
    rig.edge.unwrap().stop();
}
