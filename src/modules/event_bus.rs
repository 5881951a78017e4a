//! EventBus (group `bus`, KubeEdge's `eventbus` in external-broker mode, edge-node §3): MQTT
//! publishes on the upload topics go to the cloud as `bus`/`user`/`upload` messages, and the
//! cloud's `router_eventbus` messages become MQTT publishes, subscriptions (kept in
//! `stateDir/eventbus/sub_topics.json`) or unsubscriptions. It owns the [`mqtt::Client`] and stops
//! it when the agent stops, and hands `router_servicebus` requests to the ServiceBus worker when
//! that is on (`service_bus`). Every cloud `bus` message is also offered to the local API, so
//! `edgehub subscribe bus` sees what it saw before MQTT existed.

use crate::error::{ErrorKind, Result};
use crate::logging::shown;
use crate::message::{group, operation, Message, Route};
use crate::modules::service_bus::{self, ServiceBus};
use crate::modules::{Hub, ModuleContext, ModuleSpec};
use crate::mqtt::{self, Publish, Publisher};
use crate::router::bus_group;
use crossbeam_channel::{never, select, Receiver, Sender, TrySendError};
use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the module (its thread is `eh-eventbus`).
pub const MODULE_NAME: &str = "eventbus";
/// The fixed filters of edgecore's sub client (§3.2) that are not DeviceTwin's: their publishes go
/// to the cloud. (DeviceTwin's `$hw/events/device/…` and `$hw/events/node/…` belong to `twin`.)
pub const UPLOAD_FILTERS: [&str; 3] = ["$hw/events/upload/#", "SYS/dis/upload_records", "+/user/#"];
/// Source of messages sent up, as edgecore's eventbus.
pub const SOURCE: &str = "bus";
/// Cloud sources this module serves.
pub const ROUTER_EVENTBUS: &str = "router_eventbus";
/// `router_eventbus` subscriptions kept at most (each is a filter subscribed at every connect).
pub const MAX_SUB_TOPICS: usize = 1024;
/// Cloud publishes remembered so their echo (our own subscription receiving them) is not uploaded
/// straight back: edgecore's hazard in §3.3, avoided here.
const ECHO_MEMORY: usize = 256;
const SUB_TOPICS_FILE: &str = "sub_topics.json";

/// The channels the EventBus reads MQTT publishes from (see [`routes`]).
pub struct BusRoutes {
    /// Publishes on [`UPLOAD_FILTERS`].
    pub uploads: Receiver<Publish>,
    /// Publishes on the filters the cloud subscribed at run time.
    pub subscribed: Receiver<Publish>,
}

/// Registers the EventBus routes on `builder`: the upload filters, and every run-time
/// subscription (the `route_rest` channel). Register the routes of modules that must win on an
/// overlap (DeviceTwin's) first, and call `builder.start()` after.
pub fn routes(builder: &mut mqtt::ClientBuilder, capacity: usize) -> BusRoutes {
    BusRoutes {
        uploads: builder.route(&UPLOAD_FILTERS, capacity),
        subscribed: builder.route_rest(capacity),
    }
}

/// What the module needs besides its context.
pub struct Wiring {
    /// The MQTT client and its routes; `None` when no broker is configured (ServiceBus only).
    pub client: Option<mqtt::Client>,
    pub routes: Option<BusRoutes>,
    /// Serve `router_servicebus` requests (`serviceBus.enable`).
    pub service_bus: bool,
    pub state_dir: PathBuf,
    pub node_name: String,
    /// Cloud `bus` messages for the local API's subscribers (never blocks: dropped when full).
    pub local_api: Option<Sender<Message>>,
}

/// The EventBus module for group `bus`.
pub fn spec(wiring: Wiring) -> ModuleSpec {
    ModuleSpec::new(MODULE_NAME, &[bus_group::BUS], move |ctx| run(ctx, wiring))
}

fn run(ctx: ModuleContext, wiring: Wiring) {
    let Wiring { client, routes, service_bus, state_dir, node_name, local_api } = wiring;
    let publisher = client.as_ref().map(mqtt::Client::publisher);
    if let Some(publisher) = &publisher {
        // `edgehub status` shows the MQTT counters from now on.
        let _ = ctx.hub.status().mqtt.set(publisher.clone());
    }
    let service_bus = if service_bus {
        ServiceBus::start(ctx.hub.clone())
            .map_err(|e| log::error!("servicebus: {e}; router_servicebus requests go unanswered"))
            .ok()
    } else {
        None
    };
    let mut bus = EventBus {
        hub: ctx.hub.clone(),
        publisher,
        service_bus,
        node_name,
        sub_topics: SubTopics::load(state_dir.join("eventbus")),
        echoes: VecDeque::new(),
        local_api,
        local_api_dropped: 0,
    };
    if let Some(publisher) = &bus.publisher {
        for topic in &bus.sub_topics.topics {
            if let Err(e) = publisher.subscribe(topic) {
                log::warn!("eventbus: stored subscription {topic:?} skipped: {e}");
            }
        }
    }
    let (mut uploads, mut subscribed) = match routes {
        Some(routes) => (routes.uploads, routes.subscribed),
        None => (never(), never()),
    };
    loop {
        select! {
            recv(ctx.inbox) -> msg => match msg {
                Ok(msg) => bus.handle_cloud(msg),
                Err(_) => break, // the agent is stopping
            },
            recv(uploads) -> p => match p {
                Ok(p) => bus.upload(p),
                Err(_) => uploads = never(),
            },
            recv(subscribed) -> p => match p {
                Ok(p) => bus.upload(p),
                Err(_) => subscribed = never(),
            },
        }
    }
    if let Some(service_bus) = bus.service_bus.take() {
        service_bus.stop();
    }
    if let Some(client) = client {
        client.stop();
    }
    log::info!("eventbus stopped");
}

struct EventBus {
    hub: Hub,
    /// `None` without a broker: `router_eventbus` messages then only reach the local API.
    publisher: Option<Publisher>,
    service_bus: Option<ServiceBus>,
    node_name: String,
    sub_topics: SubTopics,
    /// (topic, payload) of recent cloud publishes, oldest first.
    echoes: VecDeque<(String, Vec<u8>)>,
    local_api: Option<Sender<Message>>,
    local_api_dropped: u64,
}

/// The message edgecore's eventbus sends up for an MQTT publish (§3.3, checklist 38): the topic
/// as resource, the payload as a JSON string (invalid UTF-8 replaced, as Go's JSON encoder does).
pub fn upload_message(publish: &Publish) -> Message {
    Message::with_text(
        Route {
            source: SOURCE.to_owned(),
            group: group::USER.to_owned(),
            operation: operation::UPLOAD.to_owned(),
            resource: publish.topic.clone(),
            ..Route::default()
        },
        &String::from_utf8_lossy(&publish.payload),
    )
}

/// What a cloud `router_eventbus` message asks for (§3.4).
#[derive(Debug, PartialEq, Eq)]
pub enum CloudAction {
    Publish {
        topic: String,
        payload: Vec<u8>,
    },
    Subscribe(String),
    Unsubscribe(String),
    /// Nothing to do, and why (for the log).
    Ignore(String),
}

/// The pure mapping of §3.4: `publish` (string content only), `subscribe`, `unsubscribe`,
/// `message` (`{"message":{"topic":…}}` published as JSON) and `get_result` on `auth_info`.
pub fn cloud_action(msg: &Message, node_name: &str) -> CloudAction {
    let resource = msg.route.resource.as_str();
    match msg.route.operation.as_str() {
        "publish" => match msg.content_text() {
            Some(text) => {
                CloudAction::Publish { topic: resource.to_owned(), payload: text.into_bytes() }
            }
            None => CloudAction::Ignore("publish content is not a JSON string".into()),
        },
        "subscribe" => CloudAction::Subscribe(resource.to_owned()),
        "unsubscribe" => CloudAction::Unsubscribe(resource.to_owned()),
        "message" => {
            let parsed: Option<serde_json::Value> = serde_json::from_str(msg.content.get()).ok();
            // edgecore also accepts the content as a JSON string holding the object.
            let parsed = match parsed {
                Some(serde_json::Value::String(s)) => serde_json::from_str(&s).ok(),
                other => other,
            };
            let message = parsed.as_ref().and_then(|v| v.get("message"));
            match message.and_then(|m| m.get("topic")).and_then(|t| t.as_str()) {
                Some(topic) => CloudAction::Publish {
                    topic: topic.to_owned(),
                    payload: message.map(|m| m.to_string().into_bytes()).unwrap_or_default(),
                },
                None => CloudAction::Ignore("message content has no message.topic".into()),
            }
        }
        "get_result" if resource == "auth_info" => CloudAction::Publish {
            topic: format!("$hw/events/node/{node_name}/authInfo/get/result"),
            payload: msg.content.get().as_bytes().to_vec(),
        },
        op => {
            CloudAction::Ignore(format!("operation {op:?} on {resource:?} has no eventbus action"))
        }
    }
}

impl EventBus {
    fn handle_cloud(&mut self, msg: Message) {
        if msg.route.resource == crate::message::CONNECTION_RESOURCE {
            return; // connection events: the MQTT side does not care
        }
        self.forward_to_local_api(&msg);
        if msg.needs_ack() {
            // User-group messages are never ACKed (checklist 41): let a re-send through again.
            self.hub.release(&msg);
        }
        if msg.route.source == service_bus::ROUTER_SERVICEBUS {
            if let Some(service_bus) = &self.service_bus {
                service_bus.offer(msg);
            }
            return;
        }
        let Some(publisher) = &self.publisher else { return };
        if msg.route.source != ROUTER_EVENTBUS {
            log::debug!("eventbus: {msg:?} is not from router_eventbus; local api only");
            return;
        }
        match cloud_action(&msg, &self.node_name) {
            CloudAction::Publish { topic, payload } => self.publish(&msg, topic, payload),
            CloudAction::Subscribe(topic) => {
                if self.sub_topics.topics.len() >= MAX_SUB_TOPICS
                    && !self.sub_topics.topics.contains(&topic)
                {
                    log::warn!(
                        "eventbus: {msg:?}: already {MAX_SUB_TOPICS} subscriptions; not adding"
                    );
                    return;
                }
                match publisher.subscribe(&topic) {
                    Ok(()) => self.sub_topics.add(&topic),
                    Err(e) => log::warn!("eventbus: {msg:?}: {e}"),
                }
            }
            CloudAction::Unsubscribe(topic) => {
                publisher.unsubscribe(&topic);
                self.sub_topics.remove(&topic);
            }
            CloudAction::Ignore(why) => log::warn!("eventbus: dropped {msg:?}: {why}"),
        }
    }

    fn publish(&mut self, msg: &Message, topic: String, payload: Vec<u8>) {
        let Some(publisher) = &self.publisher else { return };
        if self.echoes.len() >= ECHO_MEMORY {
            self.echoes.pop_front();
        }
        self.echoes.push_back((topic.clone(), payload.clone()));
        if let Err(e) = publisher.publish(&topic, payload) {
            log::warn!("eventbus: {msg:?} not published on {topic:?}: {e}");
            self.echoes.pop_back();
        }
    }

    fn upload(&mut self, publish: Publish) {
        if let Some(i) =
            self.echoes.iter().position(|(t, p)| *t == publish.topic && *p == publish.payload)
        {
            self.echoes.remove(i);
            log::debug!(
                "eventbus: not uploading the echo of a cloud publish on {}",
                shown(&publish.topic)
            );
            return;
        }
        if std::str::from_utf8(&publish.payload).is_err() {
            log::warn!(
                "eventbus: publish on {} is not UTF-8; invalid bytes replaced before upload",
                shown(&publish.topic)
            );
        }
        let msg = upload_message(&publish);
        if let Err(rejected) = self.hub.send(msg) {
            log::warn!(
                "eventbus: upload of a publish on {} dropped: {rejected}",
                shown(&publish.topic)
            );
        }
    }

    fn forward_to_local_api(&mut self, msg: &Message) {
        let Some(tx) = &self.local_api else { return };
        match tx.try_send(msg.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.local_api_dropped += 1;
                let n = self.local_api_dropped;
                if n == 1 || n % 1000 == 0 {
                    log::warn!("eventbus: local api is behind; bus event not shown ({n} so far)");
                }
            }
            Err(TrySendError::Disconnected(_)) => self.local_api = None,
        }
    }
}

/// The cloud's run-time subscriptions (edgecore's `sub_topics` table), one JSON file rewritten
/// atomically (temp file, fsync, rename) on every change.
struct SubTopics {
    dir: PathBuf,
    topics: Vec<String>,
}

impl SubTopics {
    fn load(dir: PathBuf) -> SubTopics {
        let path = dir.join(SUB_TOPICS_FILE);
        let topics = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Vec<String>>(&bytes).unwrap_or_else(|e| {
                log::error!(
                    "eventbus: {} is not a JSON list of topics ({e}); starting empty",
                    path.display()
                );
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                log::error!(
                    "eventbus: read {}: {e}; starting without stored subscriptions",
                    path.display()
                );
                Vec::new()
            }
        };
        SubTopics { dir, topics: topics.into_iter().take(MAX_SUB_TOPICS).collect() }
    }

    fn add(&mut self, topic: &str) {
        if !self.topics.iter().any(|t| t == topic) {
            self.topics.push(topic.to_owned());
            self.save();
        }
    }

    fn remove(&mut self, topic: &str) {
        let before = self.topics.len();
        self.topics.retain(|t| t != topic);
        if self.topics.len() != before {
            self.save();
        }
    }

    fn save(&self) {
        if let Err(e) = write_atomically(&self.dir, SUB_TOPICS_FILE, &self.topics) {
            log::error!("eventbus: save subscriptions in {}: {e}", self.dir.display());
        }
    }
}

fn write_atomically(dir: &Path, name: &str, topics: &[String]) -> Result<()> {
    let io = |doing: &str| ErrorKind::Io.msg(format!("{doing} in {}", dir.display()));
    // New folders get a private mode and a durable entry, as the other stores' folders do.
    crate::dirs::create_durable(dir, 0o700).map_err(|e| io("create folder").src(e))?;
    let temp = dir.join(format!("{name}.tmp"));
    let bytes = serde_json::to_vec(topics).map_err(|e| io("encode subscriptions").src(e))?;
    let mut file = fs::File::create(&temp).map_err(|e| io("create temp file").src(e))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write temp file").src(e))?;
    fs::rename(&temp, dir.join(name)).map_err(|e| io("rename temp file").src(e))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("sync folder").src(e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{json_content, text_content};

    fn cloud(op: &str, resource: &str, content: Box<serde_json::value::RawValue>) -> Message {
        Message::new(
            Route {
                source: ROUTER_EVENTBUS.into(),
                group: group::USER.into(),
                operation: op.into(),
                resource: resource.into(),
                ..Route::default()
            },
            content,
        )
    }

    #[test]
    fn uploads_carry_the_topic_and_the_payload_as_a_json_string() {
        let msg = upload_message(&Publish {
            topic: "default/user/t".into(),
            payload: b"{\"a\":1}".to_vec(),
        });
        assert_eq!(
            (msg.route.source.as_str(), msg.route.group.as_str(), msg.route.operation.as_str()),
            ("bus", "user", "upload")
        );
        assert_eq!(msg.route.resource, "default/user/t");
        assert_eq!(msg.content.get(), r#""{\"a\":1}""#);
        let msg = upload_message(&Publish { topic: "t".into(), payload: vec![b'a', 0xff] });
        assert_eq!(msg.content_text().unwrap(), "a\u{fffd}");
    }

    #[test]
    fn cloud_messages_map_as_edgecore_does() {
        let node = "n1";
        assert_eq!(
            cloud_action(
                &cloud("publish", "default/cmd", text_content("{\"switch\":\"on\"}")),
                node
            ),
            CloudAction::Publish {
                topic: "default/cmd".into(),
                payload: b"{\"switch\":\"on\"}".to_vec()
            }
        );
        assert!(matches!(
            cloud_action(&cloud("publish", "t", json_content("{\"a\":1}").unwrap()), node),
            CloudAction::Ignore(_)
        ));
        assert_eq!(
            cloud_action(&cloud("subscribe", "default/topic", json_content("null").unwrap()), node),
            CloudAction::Subscribe("default/topic".into())
        );
        assert_eq!(
            cloud_action(
                &cloud("unsubscribe", "default/topic", json_content("null").unwrap()),
                node
            ),
            CloudAction::Unsubscribe("default/topic".into())
        );
        let m =
            cloud("message", "x", json_content(r#"{"message":{"topic":"a/b","v":1}}"#).unwrap());
        assert_eq!(
            cloud_action(&m, node),
            CloudAction::Publish {
                topic: "a/b".into(),
                payload: br#"{"topic":"a/b","v":1}"#.to_vec()
            }
        );
        let m = cloud("get_result", "auth_info", json_content(r#"{"k":"v"}"#).unwrap());
        assert_eq!(
            cloud_action(&m, node),
            CloudAction::Publish {
                topic: "$hw/events/node/n1/authInfo/get/result".into(),
                payload: br#"{"k":"v"}"#.to_vec()
            }
        );
        assert!(matches!(
            cloud_action(&cloud("delete", "x", text_content("")), node),
            CloudAction::Ignore(_)
        ));
    }

    #[test]
    fn subscriptions_persist_across_loads() {
        let dir = std::env::temp_dir().join(format!("eh-subtopics-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut subs = SubTopics::load(dir.clone());
        subs.add("default/a");
        subs.add("default/b");
        subs.add("default/a");
        subs.remove("default/b");
        assert_eq!(SubTopics::load(dir.clone()).topics, vec!["default/a".to_owned()]);
        fs::write(dir.join(SUB_TOPICS_FILE), b"not json").unwrap();
        assert!(SubTopics::load(dir.clone()).topics.is_empty(), "a corrupt file starts empty");
        let _ = fs::remove_dir_all(&dir);
    }
}
