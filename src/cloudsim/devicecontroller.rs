//! The devicecontroller side of the simulated cloud (edge-node §2.6, §2.9): it builds the
//! messages KubeEdge's devicecontroller sends a node (membership add and remove, `cloud_updated`
//! desired values, and a newer cloud's Device objects), and reads what the edge sends up:
//! `edge_updated` is merged into the device's reported status and answered with the reply REF
//! sends (`"OK"` with `parent_msg_id`), `state/update` is recorded. Unlike REF, which patches only
//! twins already in `status.twins`, every reported twin is recorded. Passive: the test feeds it
//! upstream messages and pushes what it returns, so it never competes for the event channel.

use crate::message::{group, json_content, text_content, Message, Route};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// `source` of every devicecontroller message.
pub const SOURCE: &str = "devicecontroller";

/// One desired property: name, value and twin type (`float`, `int`, `string`…).
#[derive(Clone, Debug)]
pub struct Desired {
    pub property: String,
    pub value: String,
    pub kind: String,
}

impl Desired {
    pub fn new(property: &str, value: &str, kind: &str) -> Desired {
        Desired { property: property.to_owned(), value: value.to_owned(), kind: kind.to_owned() }
    }
}

/// A reported twin as the cloud keeps it in `status.twins[].reported`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reported {
    pub value: String,
    /// The value's `metadata.timestamp` (edge ms), as text, like REF's status.
    pub timestamp: String,
    /// HEAD's `observedDesired`: the `expected` the edge reported, if any.
    pub observed_desired: Option<String>,
}

/// What the controller has seen of one device.
#[derive(Clone, Debug, Default)]
pub struct DeviceStatus {
    pub twins: BTreeMap<String, Reported>,
    /// The last `state/update` payload (decoded from its JSON string).
    pub state: Option<Value>,
    /// `edge_updated` messages received for this device.
    pub edge_updates: u32,
}

/// The simulated devicecontroller of one node.
#[derive(Debug)]
pub struct DeviceController {
    node: String,
    devices: Mutex<BTreeMap<String, DeviceStatus>>,
}

impl DeviceController {
    pub fn new(node: &str) -> DeviceController {
        DeviceController { node: node.to_owned(), devices: Mutex::new(BTreeMap::new()) }
    }

    fn devices(&self) -> MutexGuard<'_, BTreeMap<String, DeviceStatus>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// REF's twin entries for desired values (`createDevice`): expected, `optional:false`, type,
    /// `expected_version {cloud: rv, edge: 0}`.
    fn twins(desired: &[Desired], rv: i64, now: i64) -> Value {
        let mut twins = serde_json::Map::new();
        for d in desired {
            twins.insert(
                d.property.clone(),
                json!({"expected":{"value":d.value,"metadata":{"timestamp":now}},"optional":false,
                       "metadata":{"type":d.kind},"expected_version":{"cloud":rv,"edge":0}}),
            );
        }
        Value::Object(twins)
    }

    fn twin_message(&self, resource: String, content: &Value) -> Message {
        let route = Route {
            source: SOURCE.to_owned(),
            group: group::TWIN.to_owned(),
            operation: "update".to_owned(),
            resource: format!("node/{}/{resource}", self.node),
            ..Route::default()
        };
        // Cannot fail: serde_json output is valid JSON.
        Message::new(route, json_content(&content.to_string()).unwrap_or_else(|_| text_content("")))
    }

    /// `membership` adding device `id` with `desired` at resourceVersion `rv` (edge-node §2.6).
    pub fn membership_add(&self, id: &str, desired: &[Desired], rv: i64) -> Message {
        let now = crate::message::now_millis();
        let mut device = json!({"id":id,"name":id});
        if !desired.is_empty() {
            device["twin"] = Self::twins(desired, rv, now);
        }
        let body = json!({"event_id":crate::message::new_uuid(),"timestamp":now,
                          "added_devices":[device],"removed_devices":null});
        self.devices().entry(id.to_owned()).or_default();
        self.twin_message("membership".to_owned(), &body)
    }

    /// `membership` removing device `id`.
    pub fn membership_remove(&self, id: &str) -> Message {
        let now = crate::message::now_millis();
        let body = json!({"event_id":crate::message::new_uuid(),"timestamp":now,
                          "added_devices":null,"removed_devices":[{"id":id,"name":id}]});
        self.devices().remove(id);
        self.twin_message("membership".to_owned(), &body)
    }

    /// `device/<id>/twin/cloud_updated` with every desired value at resourceVersion `rv`.
    pub fn cloud_updated(&self, id: &str, desired: &[Desired], rv: i64) -> Message {
        let now = crate::message::now_millis();
        let body = json!({"event_id":crate::message::new_uuid(),"timestamp":now,
                          "twin":Self::twins(desired, rv, now)});
        self.twin_message(format!("device/{id}/twin/cloud_updated"), &body)
    }

    /// A newer cloud's Device object `<ns>/device/<name>` (v1beta1), an ack-queue message with
    /// resourceversion `rv`; `op` is `insert`, `update` or `delete`.
    pub fn device_object(
        &self,
        namespace: &str,
        name: &str,
        desired: &[Desired],
        rv: i64,
        op: &str,
    ) -> Message {
        let properties: Vec<Value> = desired
            .iter()
            .map(|d| json!({"name":d.property,"desired":{"value":d.value,"metadata":{"type":d.kind}}}))
            .collect();
        let body = json!({"apiVersion":"devices.kubeedge.io/v1beta1","kind":"Device",
            "metadata":{"name":name,"namespace":namespace,"resourceVersion":rv.to_string()},
            "spec":{"nodeName":self.node,"properties":properties}});
        let route = Route {
            source: SOURCE.to_owned(),
            group: group::RESOURCE.to_owned(),
            operation: op.to_owned(),
            resource: format!("node/{}/{namespace}/device/{name}", self.node),
            ..Route::default()
        };
        let mut msg = Message::new(
            route,
            json_content(&body.to_string()).unwrap_or_else(|_| text_content("")),
        );
        msg.header.resource_version = rv.to_string();
        msg
    }

    /// Reads an upstream message. An `edge_updated` is merged into the device's status and the
    /// reply to push back is returned; a `state/update` is recorded. Anything else: `None`.
    pub fn observe(&self, msg: &Message) -> Option<Message> {
        let resource = msg.route.resource.as_str();
        if msg.route.source != "twin" {
            return None;
        }
        if let Some(id) =
            resource.strip_prefix("device/").and_then(|r| r.strip_suffix("/twin/edge_updated"))
        {
            let body: Value = serde_json::from_str(msg.content.get()).ok()?;
            let mut devices = self.devices();
            let status = devices.entry(id.to_owned()).or_default();
            status.edge_updates += 1;
            for (key, twin) in body.get("twin").and_then(Value::as_object).into_iter().flatten() {
                let Some(value) = twin.pointer("/actual/value").and_then(Value::as_str) else {
                    continue;
                };
                let stamp = twin
                    .pointer("/actual/metadata/timestamp")
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let observed =
                    twin.pointer("/expected/value").and_then(Value::as_str).map(str::to_owned);
                status.twins.insert(
                    key.clone(),
                    Reported {
                        value: value.to_owned(),
                        timestamp: stamp,
                        observed_desired: observed,
                    },
                );
            }
            let route = Route {
                source: SOURCE.to_owned(),
                group: group::TWIN.to_owned(),
                operation: "response".to_owned(),
                resource: "twin".to_owned(),
                ..Route::default()
            };
            let mut reply = Message::new(route, text_content(crate::message::CONTENT_OK));
            reply.header.parent_id = msg.header.id.clone();
            return Some(reply);
        }
        if let Some(id) =
            resource.strip_prefix("device/").and_then(|r| r.strip_suffix("/state/update"))
        {
            let state = msg.content_text().and_then(|t| serde_json::from_str(&t).ok());
            self.devices().entry(id.to_owned()).or_default().state = state;
        }
        None
    }

    /// The reported value of `property` on device `id`, if the edge sent one.
    pub fn reported(&self, id: &str, property: &str) -> Option<Reported> {
        self.devices().get(id).and_then(|d| d.twins.get(property).cloned())
    }

    /// A copy of everything seen for device `id`.
    pub fn status(&self, id: &str) -> Option<DeviceStatus> {
        self.devices().get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_devicecontroller_shapes_and_edge_updated_is_answered() {
        let dc = DeviceController::new("edge-node-1");
        let add =
            dc.membership_add("thermo-1", &[Desired::new("temperature", "25", "float")], 4711);
        assert_eq!(add.route.resource, "node/edge-node-1/membership");
        let body: Value = serde_json::from_str(add.content.get()).unwrap();
        assert_eq!(
            body["added_devices"][0]["twin"]["temperature"]["expected_version"],
            json!({"cloud":4711,"edge":0})
        );
        assert_eq!(body["removed_devices"], Value::Null);
        let up_route = Route {
            source: "twin".into(),
            group: "resource".into(),
            operation: "update".into(),
            resource: "device/thermo-1/twin/edge_updated".into(),
            ..Route::default()
        };
        let up = Message::new(
            up_route,
            json_content(r#"{"event_id":"e","timestamp":1,"twin":{"temperature":{"actual":{"value":"23.5","metadata":{"timestamp":7}}}}}"#).unwrap(),
        );
        let reply = dc.observe(&up).expect("a reply");
        assert_eq!(reply.header.parent_id, up.header.id);
        assert_eq!(reply.content_text().as_deref(), Some("OK"));
        assert_eq!(dc.reported("thermo-1", "temperature").unwrap().value, "23.5");
        let obj = dc.device_object(
            "default",
            "thermo-1",
            &[Desired::new("temperature", "26", "float")],
            9,
            "update",
        );
        assert!(obj.needs_ack());
    }
}
