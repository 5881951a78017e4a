//! The simulator's edgecontroller (edge-node §1.5–1.7): the Node objects and the pods bound to
//! nodes, as the cloud holds them. It creates a node on the registration `insert`, replaces its
//! status on each `update` (an update for an unknown node is dropped with no reply), merges label
//! updates, takes pod statuses and the pod deletion handshake (§1.8), and, like a HEAD cloud when
//! asked, sends each node its own object after every change (§1.6 [HEAD]). Pure state: it returns
//! what to send and what to report, and the parent module queues and emits them.

use crate::message::{group, new_uuid, operation, text_content, Message, Route, CONTENT_OK};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

const SOURCE: &str = "edgecontroller";

/// What handling one message produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Downstream messages for the node, in order.
    pub send: Vec<Message>,
    /// `(action, node object)` changes to report, in order.
    pub node_changes: Vec<(String, Value)>,
    /// `(action, pod)` changes to report.
    pub pod_changes: Vec<(String, Value)>,
}

/// Every node and pod the simulated cloud holds.
#[derive(Debug, Default)]
pub struct EdgeController {
    nodes: HashMap<String, Value>,
    /// Node → `<ns>/<name>` → pod.
    pods: HashMap<String, BTreeMap<String, Value>>,
    /// Registrations still to refuse, per node (for retry tests).
    refusals: HashMap<String, u32>,
    next_version: u64,
    /// Send `update` of `null/node/<n>` after every change, as a HEAD cloud does.
    head_node_updates: bool,
}

impl EdgeController {
    pub fn new(head_node_updates: bool) -> EdgeController {
        EdgeController { head_node_updates, ..EdgeController::default() }
    }

    fn version(&mut self) -> String {
        self.next_version += 1;
        (1000 + self.next_version).to_string()
    }

    /// The node object as the cloud holds it.
    pub fn node(&self, node: &str) -> Option<Value> {
        self.nodes.get(node).cloned()
    }

    /// Removes the node object; true when there was one.
    pub fn delete_node(&mut self, node: &str) -> bool {
        self.nodes.remove(node).is_some()
    }

    pub fn refuse_registrations(&mut self, node: &str, count: u32) {
        self.refusals.insert(node.to_owned(), count);
    }

    pub fn pod(&self, node: &str, namespace: &str, name: &str) -> Option<Value> {
        self.pods.get(node)?.get(&format!("{namespace}/{name}")).cloned()
    }

    /// Binds `pod` to `node`: fills in what the API server would (uid, resourceVersion,
    /// nodeName) and returns the `insert` syncPod sends (ack queue).
    pub fn bind_pod(&mut self, node: &str, mut pod: Value) -> Message {
        let version = self.version();
        if pod.pointer("/metadata/uid").is_none() {
            pod["metadata"]["uid"] = json!(new_uuid());
        }
        if pod.pointer("/metadata/namespace").is_none() {
            pod["metadata"]["namespace"] = json!("default");
        }
        pod["metadata"]["resourceVersion"] = json!(version);
        pod["spec"]["nodeName"] = json!(node);
        let key = pod_key(&pod);
        self.pods.entry(node.to_owned()).or_default().insert(key.clone(), pod.clone());
        pod_message(operation::INSERT, &key, &pod, &version)
    }

    /// Marks the pod as being deleted and returns the `update` syncPod sends, or `None` when the
    /// node has no such pod.
    pub fn start_pod_deletion(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Message> {
        let version = self.version();
        let key = format!("{namespace}/{name}");
        let pod = self.pods.get_mut(node)?.get_mut(&key)?;
        pod["metadata"]["deletionTimestamp"] =
            json!(crate::modules::node_status::rfc3339(crate::message::now_millis() / 1000));
        pod["metadata"]["resourceVersion"] = json!(version);
        Some(pod_message(operation::UPDATE, &key, pod, &version))
    }

    /// Handles an upstream message from `node`'s connection (edge-node §1.5, §1.8).
    pub fn on_upstream(&mut self, node: &str, msg: &Message) -> Outcome {
        let mut out = Outcome::default();
        let parts: Vec<&str> = msg.route.resource.splitn(3, '/').collect();
        let [namespace, kind, name] = parts[..] else { return out };
        match (kind, msg.route.operation.as_str()) {
            ("nodestatus", operation::INSERT) => self.register(namespace, name, msg, &mut out),
            ("nodestatus", operation::UPDATE) => self.update_status(namespace, name, msg, &mut out),
            ("node", operation::UPDATE) if msg.route.source == "edged" => {
                self.update_labels(namespace, name, msg, &mut out)
            }
            ("podstatus", operation::UPDATE) => {
                self.pod_status(node, namespace, name, msg, &mut out)
            }
            ("pod", operation::DELETE) if msg.route.source == "edged" => {
                self.delete_pod(node, namespace, name, msg, &mut out)
            }
            _ => {}
        }
        out
    }

    /// `updateNodeStatus` for an insert: "OK" for a node that exists, else create it.
    fn register(&mut self, namespace: &str, name: &str, msg: &Message, out: &mut Outcome) {
        let refusals = self.refusals.get(name).copied().unwrap_or(0);
        if refusals > 0 {
            self.refusals.insert(name.to_owned(), refusals - 1);
            let text = format!(
                "create node {name} error: simulated refusal ({refusals} left) , register node failed"
            );
            out.send.push(node_response(namespace, name, msg, &text, ""));
            return;
        }
        if self.nodes.contains_key(name) {
            out.send.push(node_response(namespace, name, msg, CONTENT_OK, ""));
            return;
        }
        let mut object: Value = match serde_json::from_str(msg.content.get()) {
            Ok(object @ Value::Object(_)) => object,
            Ok(_) | Err(_) => {
                let text = format!(
                    "create node {name} error: body is not a v1.Node object , register node failed"
                );
                out.send.push(node_response(namespace, name, msg, &text, ""));
                return;
            }
        };
        let version = self.version();
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(name);
        metadata["uid"] = json!(new_uuid());
        metadata["resourceVersion"] = json!(version);
        metadata["creationTimestamp"] =
            json!(crate::modules::node_status::rfc3339(crate::message::now_millis() / 1000));
        self.nodes.insert(name.to_owned(), object.clone());
        out.send.push(node_response(namespace, name, msg, CONTENT_OK, ""));
        self.changed("created", name, object, &version, out);
    }

    /// `updateNodeStatus` for an update: replaces the whole status of a known node; an unknown
    /// node's update is dropped with no reply.
    fn update_status(&mut self, namespace: &str, name: &str, msg: &Message, out: &mut Outcome) {
        if !self.nodes.contains_key(name) {
            return;
        }
        let Ok(request) = serde_json::from_str::<Value>(msg.content.get()) else { return };
        let Some(status) = request.get("Status").cloned() else { return };
        let version = self.version();
        let Some(object) = self.nodes.get_mut(name) else { return };
        object["status"] = status;
        object["metadata"]["resourceVersion"] = json!(version);
        let object = object.clone();
        out.send.push(node_response(namespace, name, msg, CONTENT_OK, &version));
        self.changed("status", name, object, &version, out);
    }

    /// `updateNode`: merges labels and annotations (never removes any).
    fn update_labels(&mut self, namespace: &str, name: &str, msg: &Message, out: &mut Outcome) {
        if !self.nodes.contains_key(name) {
            return;
        }
        let Ok(body) = serde_json::from_str::<Value>(msg.content.get()) else { return };
        let version = self.version();
        let Some(object) = self.nodes.get_mut(name) else { return };
        for field in ["labels", "annotations"] {
            let Some(Value::Object(incoming)) = body.pointer(&format!("/metadata/{field}")) else {
                continue;
            };
            let target = &mut object["metadata"][field];
            if !target.is_object() {
                *target = json!({});
            }
            if let Some(target) = target.as_object_mut() {
                target.extend(incoming.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        object["metadata"]["resourceVersion"] = json!(version);
        let object = object.clone();
        out.send.push(node_response(namespace, name, msg, CONTENT_OK, &version));
        self.changed("labels", name, object, &version, out);
    }

    /// `updatePodStatus`: stores the status of a known pod; for an unknown one the cloud answers
    /// with a delete.
    fn pod_status(&mut self, node: &str, ns: &str, name: &str, msg: &Message, out: &mut Outcome) {
        let key = format!("{ns}/{name}");
        let status = serde_json::from_str::<Value>(msg.content.get())
            .ok()
            .and_then(|request| request.get("Status").cloned());
        let version = self.version();
        match self.pods.get_mut(node).and_then(|pods| pods.get_mut(&key)) {
            Some(pod) => {
                if let Some(status) = status {
                    pod["status"] = status;
                    pod["metadata"]["resourceVersion"] = json!(version);
                    out.pod_changes.push(("status".to_owned(), pod.clone()));
                }
            }
            None => {
                let gone = json!({"metadata": {"name": name, "namespace": ns}});
                out.send.push(pod_message(operation::DELETE, &key, &gone, ""));
            }
        }
    }

    /// `deletePod`: deletes with grace 0 when the UID matches; the Deleted event goes back down
    /// as a `delete` to ACK.
    fn delete_pod(&mut self, node: &str, ns: &str, name: &str, msg: &Message, out: &mut Outcome) {
        let key = format!("{ns}/{name}");
        let uid = msg.content_text().unwrap_or_default();
        let Some(pods) = self.pods.get_mut(node) else { return };
        let matches = pods
            .get(&key)
            .is_some_and(|pod| pod.pointer("/metadata/uid").and_then(Value::as_str) == Some(&uid));
        if !matches {
            return;
        }
        if let Some(pod) = pods.remove(&key) {
            out.send.push(pod_message(operation::DELETE, &key, &pod, ""));
            out.pod_changes.push(("deleted".to_owned(), pod));
        }
    }

    fn changed(&self, action: &str, name: &str, object: Value, version: &str, out: &mut Outcome) {
        if self.head_node_updates {
            let mut update = Message::new(
                route(operation::UPDATE, &format!("null/node/{name}")),
                crate::message::json_content(&object.to_string())
                    .unwrap_or_else(|_| text_content("")),
            );
            update.header.resource_version = version.to_owned();
            out.send.push(update);
        }
        out.node_changes.push((action.to_owned(), object));
    }
}

fn route(operation: &str, resource: &str) -> Route {
    Route {
        source: SOURCE.to_owned(),
        group: group::RESOURCE.to_owned(),
        operation: operation.to_owned(),
        resource: resource.to_owned(),
        ..Route::default()
    }
}

/// `nodeMsgResponse`: a `response` on `<ns>/node/<name>`, parent = the request, string content.
fn node_response(namespace: &str, name: &str, request: &Message, text: &str, rv: &str) -> Message {
    let mut reply =
        Message::with_text(route(operation::RESPONSE, &format!("{namespace}/node/{name}")), text);
    reply.header.parent_id = request.header.id.clone();
    reply.header.resource_version = rv.to_owned();
    reply
}

fn pod_message(operation: &str, key: &str, pod: &Value, version: &str) -> Message {
    let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
    let mut msg = Message::new(
        route(operation, &format!("{namespace}/pod/{name}")),
        crate::message::json_content(&pod.to_string()).unwrap_or_else(|_| text_content("")),
    );
    msg.header.resource_version = version.to_owned();
    msg
}

fn pod_key(pod: &Value) -> String {
    let text = |path: &str| pod.pointer(path).and_then(Value::as_str).unwrap_or("").to_owned();
    format!("{}/{}", text("/metadata/namespace"), text("/metadata/name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edged(op: &str, resource: &str, content: &str) -> Message {
        Message::new(
            Route {
                source: "edged".into(),
                group: "meta".into(),
                operation: op.into(),
                resource: resource.into(),
                ..Route::default()
            },
            crate::message::json_content(content).unwrap(),
        )
    }

    #[test]
    fn insert_creates_update_replaces_status_and_unknown_updates_get_no_reply() {
        let mut ec = EdgeController::default();
        let update = edged("update", "default/nodestatus/n1", r#"{"Status":{"phase":"Running"}}"#);
        assert!(ec.on_upstream("n1", &update).send.is_empty(), "unknown node: no reply");
        let insert = edged("insert", "default/nodestatus/n1", r#"{"metadata":{"labels":{}}}"#);
        let out = ec.on_upstream("n1", &insert);
        let reply = &out.send[0];
        assert_eq!(reply.header.parent_id, insert.header.id);
        assert_eq!(reply.route.resource, "default/node/n1");
        assert_eq!(reply.content_text().as_deref(), Some("OK"));
        assert!(reply.header.resource_version.is_empty());
        assert_eq!(ec.node("n1").unwrap()["metadata"]["name"], "n1");
        let out = ec.on_upstream("n1", &update);
        assert!(!out.send[0].header.resource_version.is_empty());
        assert_eq!(ec.node("n1").unwrap()["status"]["phase"], "Running");
        // An insert for a node that exists changes nothing and says OK.
        let again =
            edged("insert", "default/nodestatus/n1", r#"{"metadata":{"labels":{"x":"y"}}}"#);
        assert_eq!(ec.on_upstream("n1", &again).send[0].content_text().as_deref(), Some("OK"));
        assert!(ec.node("n1").unwrap()["metadata"]["labels"].get("x").is_none());
        ec.refuse_registrations("n2", 1);
        let insert2 = edged("insert", "default/nodestatus/n2", "{}");
        let refused = ec.on_upstream("n2", &insert2).send.remove(0);
        assert_ne!(refused.content_text().as_deref(), Some("OK"));
    }
}
