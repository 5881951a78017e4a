//! A newer cloud's Device objects (edge-node §2.9): `<ns>/device/<name>` resource messages that
//! the resource store keeps and ACKs, read here for what the twin needs. Desired values live in
//! `spec.properties[].desired`; the cloud no longer sends `cloud_updated`, so each desired value
//! becomes the twin's `expected` here (a Sync at the object's resourceVersion, never refused for
//! a mapper's own earlier write) and reaches the mapper as a delta. DeviceModel objects need
//! nothing from the twin.

use super::model::{DeviceMsg, MsgTwin, TwinValue, TwinVersion, TypeMetadata};
use super::rules::{Devices, Settings};
use crate::message::{group, operation, Message, Route};
use crate::modules::meta_store;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// What a resource message means for the twin.
#[derive(Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A Device was created or changed: its ID, name and desired twins.
    Upsert(DeviceMsg),
    /// A Device was deleted.
    Delete(String),
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Object {
    metadata: ObjectMeta,
    spec: Spec,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    resource_version: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Spec {
    properties: Vec<Property>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Property {
    name: String,
    desired: Option<Desired>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Desired {
    value: String,
    metadata: BTreeMap<String, String>,
}

/// The twin's reading of `msg`: `None` when it is not a Device message (a DeviceModel, a pod,
/// anything else), `Some(Err)` when it is one the twin cannot read.
pub fn from_resource(
    msg: &Message,
    settings: &Settings,
    devices: &Devices,
) -> Option<Result<DeviceEvent, String>> {
    if msg.route.group != group::RESOURCE {
        return None;
    }
    let mut parts = msg.route.resource.split('/');
    let (Some(namespace), Some("device"), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if name.is_empty() {
        return None;
    }
    let id =
        if settings.id_segments == 2 { format!("{namespace}/{name}") } else { name.to_owned() };
    if msg.route.operation == operation::DELETE {
        return Some(Ok(DeviceEvent::Delete(id)));
    }
    let object: Object = match serde_json::from_str(msg.content.get()) {
        Ok(o) => o,
        Err(e) => return Some(Err(format!("device object {id}: {e}"))),
    };
    let version_text = if msg.header.resource_version.is_empty() {
        object.metadata.resource_version.as_str()
    } else {
        msg.header.resource_version.as_str()
    };
    let cloud = version_text.parse::<i64>().unwrap_or(0);
    let stored = devices.get(&id);
    let mut twins = BTreeMap::new();
    for property in object.spec.properties {
        let Some(desired) = property.desired else { continue };
        if property.name.is_empty() {
            continue;
        }
        // The mapper's own writes must not block the cloud here (REF's quirk): the request
        // carries the stored edge version, so only an older resourceVersion is refused.
        let edge = stored
            .and_then(|d| d.twin.get(&property.name))
            .and_then(|t| t.expected_version)
            .map_or(0, |v| v.edge);
        let kind = desired.metadata.get("type").map_or("string", |t| twin_type(t)).to_owned();
        let twin = MsgTwin {
            expected: Some(TwinValue { value: Some(desired.value), metadata: None }),
            optional: Some(false),
            metadata: Some(TypeMetadata { kind }),
            expected_version: Some(TwinVersion { cloud, edge }),
            ..MsgTwin::default()
        };
        twins.insert(property.name, Some(twin));
    }
    let name_only =
        if object.metadata.name.is_empty() { name.to_owned() } else { object.metadata.name };
    Some(Ok(DeviceEvent::Upsert(DeviceMsg {
        id,
        name: name_only,
        twin: Some(twins),
        ..DeviceMsg::default()
    })))
}

/// True when applying `device` (an upsert from a stored Device object) would change the twin:
/// the device is missing, or a desired value or its resourceVersion is not what is stored. Used
/// at start, so a restart does not rewrite every twin and re-send every delta.
pub fn is_news(devices: &Devices, device: &DeviceMsg) -> bool {
    let Some(stored) = devices.get(&device.id) else { return true };
    device.twin.iter().flatten().any(|(key, twin)| {
        let Some(twin) = twin else { return false };
        let Some(have) = stored.twin.get(key) else { return true };
        let want_value = twin.expected.as_ref().and_then(|e| e.value.as_deref());
        let have_value = have.expected.as_ref().and_then(|e| e.value.as_deref());
        let want_cloud = twin.expected_version.map_or(0, |v| v.cloud);
        let have_cloud = have.expected_version.map_or(0, |v| v.cloud);
        want_value != have_value || want_cloud > have_cloud
    })
}

/// The Device objects the resource store holds (`<state_dir>/meta/<ns>/device/<name>.json`), as
/// the messages that brought them. Lets the twin catch up at start with an object stored and
/// ACKed whose desired values it never applied (a crash in between, or a full change queue).
/// Unreadable records are skipped (the store logs its own problems).
pub fn stored_objects(state_dir: &Path) -> Vec<Message> {
    let root = state_dir.join(meta_store::STORE_DIR);
    let mut found = Vec::new();
    let Ok(namespaces) = fs::read_dir(&root) else { return found };
    for ns in namespaces.flatten() {
        let Some(namespace) = ns.file_name().to_str().map(str::to_owned) else { continue };
        let Ok(files) = fs::read_dir(ns.path().join("device")) else { continue };
        for file in files.flatten() {
            let file_name = file.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(bytes) = fs::read(file.path()) else { continue };
            let Ok(record) = serde_json::from_slice::<StoredRecord>(&bytes) else { continue };
            let route = Route {
                group: group::RESOURCE.to_owned(),
                operation: operation::UPDATE.to_owned(),
                resource: format!("{namespace}/device/{name}"),
                ..Route::default()
            };
            let mut msg = Message::new(route, record.content);
            msg.header.resource_version = record.resource_version;
            found.push(msg);
        }
    }
    found
}

/// A resource store record: `{"resourceVersion", "msgId", "content"}`.
#[derive(Deserialize)]
struct StoredRecord {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
    content: Box<RawValue>,
}

/// A DeviceModel property type (`INT`, `FLOAT`, `DOUBLE`, `BOOLEAN`, `STRING`, …) as a twin type.
fn twin_type(kind: &str) -> &'static str {
    match kind.to_ascii_lowercase().as_str() {
        "int" | "integer" => "int",
        "float" | "double" => "float",
        "boolean" | "bool" => "boolean",
        _ => "string",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(op: &str, resource: &str, rv: &str, content: &str) -> Message {
        let route = Route {
            group: "resource".into(),
            operation: op.into(),
            resource: resource.into(),
            ..Route::default()
        };
        let mut m = Message::new(route, crate::message::json_content(content).unwrap());
        m.header.resource_version = rv.into();
        m
    }

    #[test]
    fn desired_values_become_expected_at_the_resource_version() {
        let s = Settings { node_name: "n".into(), id_segments: 2 };
        let body = r#"{"metadata":{"name":"thermo-1","namespace":"default"},"spec":{"nodeName":"n","properties":[
            {"name":"temperature","desired":{"value":"26","metadata":{"type":"FLOAT"}}},{"name":"noDesired"}]}}"#;
        let Some(Ok(DeviceEvent::Upsert(d))) = from_resource(
            &msg("update", "default/device/thermo-1", "4790", body),
            &s,
            &Devices::new(),
        ) else {
            panic!("an upsert")
        };
        assert_eq!(d.id, "default/thermo-1");
        let twins = d.twin.unwrap();
        assert_eq!(twins.len(), 1);
        let t = twins["temperature"].clone().unwrap();
        assert_eq!(t.expected.clone().unwrap().value.unwrap(), "26");
        assert_eq!(t.kind(), "float");
        assert_eq!(t.expected_version.unwrap(), TwinVersion { cloud: 4790, edge: 0 });
        let one = Settings { node_name: "n".into(), id_segments: 1 };
        let del = from_resource(
            &msg("delete", "default/device/thermo-1", "", "null"),
            &one,
            &Devices::new(),
        );
        assert_eq!(del, Some(Ok(DeviceEvent::Delete("thermo-1".into()))));
        assert!(from_resource(
            &msg("update", "default/devicemodel/m", "1", "{}"),
            &s,
            &Devices::new()
        )
        .is_none());
        assert!(from_resource(&msg("update", "default/device/x", "1", "[1]"), &s, &Devices::new())
            .unwrap()
            .is_err());
    }

    #[test]
    fn stored_objects_are_read_back_and_only_news_is_applied() {
        let dir =
            std::env::temp_dir().join(format!("edgehub-device-objects-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let folder = dir.join("meta/default/device");
        fs::create_dir_all(&folder).unwrap();
        let body = r#"{"metadata":{"name":"t1"},"spec":{"properties":[{"name":"temp","desired":{"value":"26"}}]}}"#;
        fs::write(
            folder.join("t1.json"),
            format!(r#"{{"resourceVersion":"5","msgId":"m","content":{body}}}"#),
        )
        .unwrap();
        fs::write(folder.join("bad.json"), "{cut").unwrap();
        let found = stored_objects(&dir);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].route.resource.as_str(), found[0].header.resource_version.as_str()),
            ("default/device/t1", "5")
        );
        let s = Settings { node_name: "n".into(), id_segments: 1 };
        let Some(Ok(DeviceEvent::Upsert(device))) = from_resource(&found[0], &s, &Devices::new())
        else {
            panic!("an upsert")
        };
        let mut devices = Devices::new();
        assert!(is_news(&devices, &device));
        let effects = super::super::rules::desired_values(&devices, "n", device.clone(), 1);
        for change in &effects.store {
            super::super::rules::apply(&mut devices, change);
        }
        assert!(!is_news(&devices, &device), "applied once, not again at the next start");
    }
}
