//! A newer cloud's Device objects (edge-node §2.9): `<ns>/device/<name>` resource messages that
//! the resource store keeps and ACKs, read here for what the twin needs. Desired values live in
//! `spec.properties[].desired`; the cloud no longer sends `cloud_updated`, so each desired value
//! becomes the twin's `expected` here (a Sync at the object's resourceVersion, never refused for
//! a mapper's own earlier write) and reaches the mapper as a delta. DeviceModel objects need
//! nothing from the twin.

use super::model::{DeviceMsg, MsgTwin, TwinValue, TwinVersion, TypeMetadata};
use super::rules::{Devices, Settings};
use crate::message::{group, operation, Message};
use serde::Deserialize;
use std::collections::BTreeMap;

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
    use crate::message::Route;

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
}
