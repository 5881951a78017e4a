//! Tests of the twin rules against KubeEdge's worked examples (edge-node §2.8) and the rules and
//! quirks of §2.4–§2.7, without sockets.

use super::model::Device;
use super::rules::*;
use crate::message::{Message, Route};
use serde_json::{json, Value};

const T0: i64 = 1_645_000_000_000;
const T: i64 = 1_645_000_001_000;
const T2: i64 = 1_645_000_002_000;

fn settings() -> Settings {
    Settings { node_name: "edge-node-1".into(), id_segments: 1 }
}

fn cloud(resource: &str, content: Value) -> Message {
    let route = Route {
        source: "devicecontroller".into(),
        group: "twin".into(),
        operation: "update".into(),
        resource: resource.into(),
        ..Route::default()
    };
    Message::new(route, crate::message::json_content(&content.to_string()).unwrap())
}

/// Applies effects as the module would after a successful store write.
fn commit(devices: &mut Devices, effects: &Effects) {
    for change in &effects.store {
        apply(devices, change);
    }
}

fn published(effects: &Effects) -> Vec<(String, Value)> {
    effects
        .publish
        .iter()
        .map(|p| (p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()))
        .collect()
}

fn content(msg: &Message) -> Value {
    serde_json::from_str(msg.content.get()).unwrap()
}

/// The setup of §2.8: thermo-1 added by the cloud with desired temperature 25 at rv 4711.
fn thermo() -> (Devices, Effects) {
    let mut devices = Devices::new();
    let add = cloud(
        "membership",
        json!({"event_id":"e0","timestamp":T0,"added_devices":[{"id":"thermo-1","name":"thermo-1",
            "twin":{"temperature":{"expected":{"value":"25","metadata":{"timestamp":T0}},"optional":false,
            "metadata":{"type":"float"},"expected_version":{"cloud":4711,"edge":0}}}}],"removed_devices":null}),
    );
    let effects = on_cloud(&devices, &settings(), &add, T0);
    commit(&mut devices, &effects);
    (devices, effects)
}

#[test]
fn membership_add_stores_the_device_publishes_delta_and_membership_updated() {
    let (devices, effects) = thermo();
    let stored = &devices["thermo-1"].twin["temperature"];
    assert_eq!(
        serde_json::to_value(stored).unwrap(),
        json!({"expected":{"value":"25","metadata":{"timestamp":T0}},"optional":false,
               "metadata":{"type":"float"},"expected_version":{"cloud":4711,"edge":0}})
    );
    let p = published(&effects);
    let topics: Vec<&str> = p.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "$hw/events/device/thermo-1/twin/update/document",
            "$hw/events/device/thermo-1/twin/update/delta",
            "$hw/events/node/edge-node-1/membership/updated"
        ]
    );
    assert_eq!(p[1].1["delta"], json!({"temperature":"25"}));
    let updated = &p[2].1;
    assert_eq!(updated["removed_devices"], Value::Null);
    // versions stripped for mappers
    assert_eq!(
        updated["added_devices"][0]["twin"]["temperature"],
        json!({"expected":{"value":"25","metadata":{"timestamp":T0}},"optional":false,"metadata":{"type":"float"}})
    );
    assert!(effects.cloud.is_empty());
}

#[test]
fn worked_example_a_mapper_reports_23_5() {
    let (mut devices, _) = thermo();
    let report = json!({"event_id":"","timestamp":T0,"twin":{"temperature":{"actual":{"value":"23.5"},"metadata":{"type":"float"}}}});
    let effects = on_mqtt(
        &devices,
        &settings(),
        "$hw/events/device/thermo-1/twin/update",
        report.to_string().as_bytes(),
        T,
    );
    assert_eq!(effects.store.len(), 1, "one durable write before the result");
    let p = published(&effects);
    assert_eq!(p.len(), 3);
    assert_eq!(p[0].0, "$hw/events/device/thermo-1/twin/update/result");
    assert_eq!(
        p[0].1,
        json!({"event_id":"","timestamp":T,"twin":{"temperature":{"actual":{"value":"23.5","metadata":{"timestamp":T}},"optional":false,"metadata":{"type":"float"}}}})
    );
    assert_eq!(p[1].0, "$hw/events/device/thermo-1/twin/update/document");
    assert_eq!(
        p[1].1["twin"]["temperature"],
        json!({"last":{"expected":{"value":"25","metadata":{"timestamp":T0}},"optional":false,"metadata":{"type":"float"}},
               "current":{"expected":{"value":"25","metadata":{"timestamp":T0}},"actual":{"value":"23.5","metadata":{"timestamp":T}},"optional":false,"metadata":{"type":"float"}}})
    );
    assert_eq!(p[2].0, "$hw/events/device/thermo-1/twin/update/delta");
    assert_eq!(p[2].1["delta"], json!({"temperature":"25"}));
    assert_eq!(
        p[2].1["twin"]["temperature"],
        json!({"expected":{"value":"25","metadata":{"timestamp":T0}},"actual":{"value":"23.5","metadata":{"timestamp":T}},"optional":false,"metadata":{"type":"float"}})
    );
    assert_eq!(effects.cloud.len(), 1);
    let up = &effects.cloud[0];
    assert_eq!(
        (
            up.route.source.as_str(),
            up.route.group.as_str(),
            up.route.operation.as_str(),
            up.route.resource.as_str()
        ),
        ("twin", "resource", "update", "device/thermo-1/twin/edge_updated")
    );
    let mut body = content(up);
    assert!(body["event_id"].as_str().unwrap().len() == 36, "a fresh uuid");
    body["event_id"] = json!("<uuid>");
    assert_eq!(
        body,
        json!({"event_id":"<uuid>","timestamp":T,"twin":{"temperature":{"actual":{"value":"23.5","metadata":{"timestamp":T}},
               "optional":false,"metadata":{"type":"float"},"actual_version":{"cloud":0,"edge":1}}}})
    );
    commit(&mut devices, &effects);
    assert_eq!(devices["thermo-1"].twin["temperature"].actual_version.unwrap().edge, 1);
}

fn report(devices: &Devices, value: &str, now: i64) -> Effects {
    let body = json!({"event_id":"r","twin":{"temperature":{"actual":{"value":value}}}});
    on_mqtt(
        devices,
        &settings(),
        "$hw/events/device/thermo-1/twin/update",
        body.to_string().as_bytes(),
        now,
    )
}

#[test]
fn worked_example_b_cloud_sets_26_and_the_mapper_gets_the_delta() {
    let (mut devices, _) = thermo();
    let a = report(&devices, "23.5", T);
    commit(&mut devices, &a);
    let b1 = cloud(
        "device/thermo-1/twin/cloud_updated",
        json!({"event_id":"c1","timestamp":T2,"twin":{"temperature":{"expected":{"value":"26","metadata":{"timestamp":T2}},
            "optional":false,"metadata":{"type":"float"},"expected_version":{"cloud":4790,"edge":0}}}}),
    );
    let effects = on_cloud(&devices, &settings(), &b1, T2);
    let p = published(&effects);
    let topics: Vec<&str> = p.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "$hw/events/device/thermo-1/twin/update/document",
            "$hw/events/device/thermo-1/twin/update/delta"
        ]
    );
    assert_eq!(
        p[1].1["twin"]["temperature"],
        json!({"expected":{"value":"26","metadata":{"timestamp":T2}},"actual":{"value":"23.5","metadata":{"timestamp":T}},"optional":false,"metadata":{"type":"float"}})
    );
    assert_eq!(p[1].1["delta"], json!({"temperature":"26"}));
    assert!(effects.cloud.is_empty(), "no result and no edge_updated for an accepted sync");
    commit(&mut devices, &effects);
    assert_eq!(devices["thermo-1"].twin["temperature"].expected_version.unwrap().cloud, 4790);

    // B3: "26" ends the delta; "26.0" keeps it coming after every report.
    let same = report(&devices, "26", T2 + 1);
    assert!(!same.publish.iter().any(|p| p.topic.ends_with("/delta")));
    commit(&mut devices, &same);
    let float_text = report(&devices, "26.0", T2 + 2);
    assert!(float_text.publish.iter().any(|p| p.topic.ends_with("/delta")));
    commit(&mut devices, &float_text);
    let again = report(&devices, "26.0", T2 + 3);
    assert!(
        again.publish.iter().any(|p| p.topic.ends_with("/delta")),
        "re-published while a difference remains"
    );
    assert_eq!(again.store.len(), 1, "values are never compared: every report is a write");
}

#[test]
fn once_a_mapper_wrote_expected_cloud_values_are_refused_and_reported_back() {
    let (mut devices, _) = thermo();
    let body = json!({"event_id":"m","twin":{"temperature":{"expected":{"value":"30"}}}});
    let w = on_mqtt(
        &devices,
        &settings(),
        "$hw/events/device/thermo-1/twin/update",
        body.to_string().as_bytes(),
        T,
    );
    commit(&mut devices, &w);
    assert_eq!(
        devices["thermo-1"].twin["temperature"].expected_version.unwrap(),
        super::model::TwinVersion { cloud: 4711, edge: 1 }
    );
    let sync = cloud(
        "device/thermo-1/twin/cloud_updated",
        json!({"twin":{"temperature":{"expected":{"value":"26"},"metadata":{"type":"float"},"expected_version":{"cloud":4800,"edge":0}}}}),
    );
    let effects = on_cloud(&devices, &settings(), &sync, T2);
    assert!(effects.store.is_empty(), "refused: nothing written");
    assert!(!effects.publish.iter().any(|p| p.topic.ends_with("/document")));
    assert_eq!(effects.cloud.len(), 1);
    let twin = &content(&effects.cloud[0])["twin"]["temperature"];
    assert_eq!(twin["expected"]["value"], "30");
    assert_eq!(twin["expected_version"], json!({"cloud":4711,"edge":1}));
    // an older cloud version is refused too
    let (devices, _) = thermo();
    let old = cloud(
        "device/thermo-1/twin/cloud_updated",
        json!({"twin":{"temperature":{"expected":{"value":"20"},"metadata":{"type":"float"},"expected_version":{"cloud":4000,"edge":0}}}}),
    );
    assert!(on_cloud(&devices, &settings(), &old, T2).store.is_empty());
}

#[test]
fn errors_go_to_the_result_topic_and_change_nothing() {
    let (devices, _) = thermo();
    let s = settings();
    let topic = "$hw/events/device/thermo-1/twin/update";
    let bad_json = on_mqtt(&devices, &s, topic, b"{not json", T);
    let p = published(&bad_json);
    assert_eq!(p[0].0, "$hw/events/device//twin/update/result");
    assert_eq!(p[0].1["code"], 400);
    assert_eq!(p[0].1["event_id"], "");
    assert!(bad_json.store.is_empty() && bad_json.cloud.is_empty());

    let type_error = on_mqtt(
        &devices,
        &s,
        topic,
        br#"{"event_id":"x1","twin":{"temperature":{"expected":{"value":"warm"}}}}"#,
        T,
    );
    let p = published(&type_error);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, "$hw/events/device/thermo-1/twin/update/result");
    assert_eq!((p[0].1["code"].clone(), p[0].1["event_id"].clone()), (json!(400), json!("x1")));
    assert!(type_error.store.is_empty());

    let unknown = on_mqtt(
        &devices,
        &s,
        "$hw/events/device/nope/twin/update",
        br#"{"event_id":"x2","twin":{}}"#,
        T,
    );
    let p = published(&unknown);
    assert_eq!(p[0].0, "$hw/events/device/nope/twin/update/result");
    assert_eq!((p[0].1["code"].clone(), p[0].1["event_id"].clone()), (json!(404), json!("x2")));

    let bad_value =
        on_mqtt(&devices, &s, topic, br#"{"twin":{"temperature":{"actual":{"value":"1e+5"}}}}"#, T);
    assert_eq!(published(&bad_value)[0].1["code"], 400);
    // a REST failure can be answered with a 500 if the store cannot be written
    let ok = report(&devices, "1", T);
    assert_eq!(
        serde_json::from_slice::<Value>(&ok.on_store_failure[0].payload).unwrap()["code"],
        500
    );
}

#[test]
fn new_twins_default_to_optional_strings_and_rest_null_deletes_only_optional_twins() {
    let (mut devices, _) = thermo();
    let topic = "$hw/events/device/thermo-1/twin/update";
    let add = on_mqtt(
        &devices,
        &settings(),
        topic,
        br#"{"event_id":"a","twin":{"mode":{"actual":{"value":"eco"}}}}"#,
        T,
    );
    assert_eq!(
        published(&add)[0].1["twin"]["mode"],
        json!({"actual":{"value":"eco","metadata":{"timestamp":T}},"optional":true,"metadata":{"type":"string"}})
    );
    commit(&mut devices, &add);
    // non-optional: a null changes nothing
    let keep = on_mqtt(
        &devices,
        &settings(),
        topic,
        br#"{"event_id":"d","twin":{"temperature":null}}"#,
        T2,
    );
    assert!(keep.store.is_empty());
    assert_eq!(published(&keep)[0].1["twin"], json!({}));
    let delete =
        on_mqtt(&devices, &settings(), topic, br#"{"event_id":"d","twin":{"mode":null}}"#, T2);
    assert_eq!(published(&delete)[0].1["twin"], json!({"mode":null}));
    commit(&mut devices, &delete);
    assert!(devices["thermo-1"].twin["mode"].is_deleted(), "the row stays, typed deleted");
    // twin/get omits deleted twins and versions
    let get = on_mqtt(
        &devices,
        &settings(),
        "$hw/events/device/thermo-1/twin/get",
        br#"{"event_id":"g"}"#,
        T2,
    );
    let p = published(&get);
    assert_eq!(p[0].0, "$hw/events/device/thermo-1/twin/get/result");
    assert_eq!(p[0].1["event_id"], "g");
    assert_eq!(p[0].1["twin"].as_object().unwrap().keys().collect::<Vec<_>>(), ["temperature"]);
    assert!(p[0].1["twin"]["temperature"].get("expected_version").is_none());
    let unknown =
        on_mqtt(&devices, &settings(), "$hw/events/device/x/twin/get", br#"{"event_id":"g2"}"#, T2);
    assert_eq!(published(&unknown)[0].1["code"], 404);
}

#[test]
fn state_update_is_stored_answered_and_sent_up_as_a_json_string() {
    let (mut devices, _) = thermo();
    let effects = on_mqtt(
        &devices,
        &settings(),
        "$hw/events/device/thermo-1/state/update",
        br#"{"state":"Online"}"#,
        T,
    );
    let p = published(&effects);
    assert_eq!(p[0].0, "$hw/events/device/thermo-1/state/update/result");
    assert_eq!(
        p[0].1["device"],
        json!({"name":"thermo-1","state":"Online","last_online":"2022-02-16 08:26:41"})
    );
    let up = &effects.cloud[0];
    assert_eq!(up.route.resource, "device/thermo-1/state/update");
    let text = up.content_text().expect("a JSON string");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), p[0].1);
    commit(&mut devices, &effects);
    assert_eq!(devices["thermo-1"].state, "Online");
    for ignored in [&br#"{"state":"melting"}"#[..], b"nope"] {
        let e =
            on_mqtt(&devices, &settings(), "$hw/events/device/thermo-1/state/update", ignored, T);
        assert!(e.publish.is_empty() && e.store.is_empty() && e.cloud.is_empty());
    }
}

#[test]
fn membership_get_lists_devices_without_twins_and_remove_publishes_removed() {
    let (mut devices, _) = thermo();
    let get = on_mqtt(
        &devices,
        &settings(),
        "$hw/events/node/whatever/membership/get",
        br#"{"event_id":"m1"}"#,
        T,
    );
    let p = published(&get);
    assert_eq!(p[0].0, "$hw/events/node/edge-node-1/membership/get/result");
    assert_eq!(p[0].1["event_id"], "m1");
    assert_eq!(p[0].1["devices"], json!([{"id":"thermo-1","name":"thermo-1"}]));
    let remove = cloud(
        "membership",
        json!({"added_devices":null,"removed_devices":[{"id":"thermo-1","name":"thermo-1"}]}),
    );
    let effects = on_cloud(&devices, &settings(), &remove, T);
    assert_eq!(effects.store, [StoreChange::Remove("thermo-1".into())]);
    let p = published(&effects);
    assert_eq!(p[0].0, "$hw/events/node/edge-node-1/membership/updated");
    assert_eq!(p[0].1["added_devices"], Value::Null);
    assert_eq!(p[0].1["removed_devices"][0]["id"], "thermo-1");
    commit(&mut devices, &effects);
    assert!(devices.is_empty());
    let empty = on_mqtt(&devices, &settings(), "$hw/events/node/n/membership/get", b"garbage", T);
    assert_eq!(published(&empty)[0].1["devices"], json!([]));
}

#[test]
fn sync_skips_invalid_and_metadata_less_twins_without_failing() {
    let devices = Devices::new();
    let add = cloud(
        "membership",
        json!({"added_devices":[{"id":"d","twin":{"t":{"expected":{"value":""},"metadata":{"type":"float"},"expected_version":{"cloud":1,"edge":0}},
            "u":{"expected":{"value":"x"},"expected_version":{"cloud":1,"edge":0}},"n":null}}]}),
    );
    let effects = on_cloud(&devices, &settings(), &add, T);
    let StoreChange::Put(device) = &effects.store[0] else { panic!("a put") };
    assert!(!device.twin.contains_key("t"), "an empty desired float is skipped");
    assert_eq!(device.twin["u"].kind(), "string");
    assert!(!device.twin.contains_key("n"));
}

#[test]
fn two_segment_ids_and_detail_removing_unlisted_devices() {
    let s = Settings { node_name: "n".into(), id_segments: 2 };
    let mut devices = Devices::new();
    let add =
        cloud("membership", json!({"added_devices":[{"id":"default/thermo-1","name":"thermo-1"}]}));
    let e = on_cloud(&devices, &s, &add, T);
    commit(&mut devices, &e);
    let r = on_mqtt(
        &devices,
        &s,
        "$hw/events/device/default/thermo-1/twin/update",
        br#"{"twin":{"t":{"actual":{"value":"1"}}}}"#,
        T,
    );
    assert_eq!(r.publish[0].topic, "$hw/events/device/default/thermo-1/twin/update/result");
    assert_eq!(r.cloud[0].route.resource, "device/default/thermo-1/twin/edge_updated");
    devices.insert("gone".into(), Device { id: "gone".into(), ..Device::default() });
    let detail = cloud("membership/detail", json!({"devices":[{"id":"default/thermo-1"}]}));
    let e = on_cloud(&devices, &s, &detail, T);
    assert!(e.store.contains(&StoreChange::Remove("gone".into())));
}

#[test]
fn edge_updated_carries_the_whole_reported_view_so_coalescing_loses_nothing() {
    let (mut devices, _) = thermo();
    let topic = "$hw/events/device/thermo-1/twin/update";
    let a = on_mqtt(
        &devices,
        &settings(),
        topic,
        br#"{"twin":{"humidity":{"actual":{"value":"40"}}}}"#,
        T,
    );
    commit(&mut devices, &a);
    let b = report(&devices, "21", T2);
    let twin = &content(&b.cloud[0])["twin"];
    assert_eq!(twin["temperature"]["actual"]["value"], "21");
    assert_eq!(twin["humidity"]["actual"]["value"], "40");
}

#[test]
fn detail_request_and_last_online_format() {
    let m = membership_detail_request("edge-node-1", T);
    assert_eq!(
        (m.route.resource.as_str(), m.route.operation.as_str()),
        ("membership/detail", "get")
    );
    let v: Value = serde_json::from_str(&m.content_text().unwrap()).unwrap();
    assert_eq!(v["group_id"], "edge-node-1");
    assert_eq!(v["event_type"], "group_membership_event");
    assert_eq!(last_online_text(0), "1970-01-01 00:00:00");
    assert_eq!(last_online_text(951_782_400_000), "2000-02-29 00:00:00");
}

#[test]
fn a_device_named_like_membership_gets_its_cloud_updated_and_twins_are_bounded() {
    let mut devices = Devices::new();
    let add = cloud("membership", json!({"added_devices":[{"id":"membership-x"}]}));
    let e = on_cloud(&devices, &settings(), &add, T);
    commit(&mut devices, &e);
    let sync = cloud(
        "device/membership-x/twin/cloud_updated",
        json!({"twin":{"t":{"expected":{"value":"1"},"expected_version":{"cloud":1,"edge":0}}}}),
    );
    let e = on_cloud(&devices, &settings(), &sync, T);
    commit(&mut devices, &e);
    assert!(devices["membership-x"].twin.contains_key("t"));

    let topic = "$hw/events/device/membership-x/twin/update";
    let filler = devices["membership-x"].twin["t"].clone();
    let device = devices.get_mut("membership-x").unwrap();
    for i in 1..MAX_TWINS_PER_DEVICE {
        device.twin.insert(format!("k{i}"), filler.clone());
    }
    assert_eq!(devices["membership-x"].twin.len(), MAX_TWINS_PER_DEVICE);
    let over = on_mqtt(
        &devices,
        &settings(),
        topic,
        br#"{"event_id":"o","twin":{"one-more":{"actual":{"value":"1"}}}}"#,
        T,
    );
    assert!(over.store.is_empty());
    assert_eq!(published(&over)[0].1["code"], 400);
    let update =
        on_mqtt(&devices, &settings(), topic, br#"{"twin":{"k1":{"actual":{"value":"2"}}}}"#, T);
    assert_eq!(update.store.len(), 1, "existing twins still update");
}
