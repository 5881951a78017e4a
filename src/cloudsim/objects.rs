//! The simulator's answers to an edge's `query` (edgecontroller's `queryInner`, protocol example
//! D): objects a test or the demo puts "in the cloud" (ConfigMaps, Secrets, …) by resource, and
//! the ack-queue `response` that carries one to the edge. A query for a resource not put here is
//! left unanswered, as the real cloud does for an object it does not find, so tests that play the
//! cloud by hand see every query as before.

use crate::message::{operation, Message, Route};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Mutex;

/// The objects the simulated cloud serves, by wire resource `<ns>/<type>/<name>`.
#[derive(Default)]
pub(super) struct Objects {
    table: Mutex<HashMap<String, Object>>,
}

struct Object {
    resource_version: String,
    content: Box<RawValue>,
}

impl Objects {
    pub(super) fn put(&self, resource: &str, resource_version: &str, content: Box<RawValue>) {
        let object = Object { resource_version: resource_version.to_owned(), content };
        super::lock(&self.table).insert(resource.to_owned(), object);
    }

    pub(super) fn remove(&self, resource: &str) -> bool {
        super::lock(&self.table).remove(resource).is_some()
    }

    /// The cloud's answer to `msg` when it is a `query` for an object put here: a `response`
    /// from edgecontroller in group `resource`, with the object's resourceversion (so it travels
    /// in the ack queue and the edge ACKs it) and the object as content.
    pub(super) fn answer(&self, msg: &Message) -> Option<Message> {
        if msg.route.operation != operation::QUERY {
            return None;
        }
        let table = super::lock(&self.table);
        let object = table.get(&msg.route.resource)?;
        let route = Route {
            source: "edgecontroller".to_owned(),
            group: "resource".to_owned(),
            operation: operation::RESPONSE.to_owned(),
            resource: msg.route.resource.clone(),
            ..Route::default()
        };
        let mut response = Message::new(route, object.content.clone());
        response.header.parent_id = msg.header.id.clone();
        response.header.resource_version = object.resource_version.clone();
        Some(response)
    }
}
