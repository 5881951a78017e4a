//! The MQTT client to the local broker (KubeEdge's `eventBus` external mode): one connection on its
//! own threads, in the three files below. This file holds the public contract and the plain data:
//! [`Options`] from the config, the broker address, [`Publish`], and topic-filter matching.
//!
//! - `codec`: MQTT 3.1.1 packets (pure, fuzzed);
//! - `conn`: dialling the broker (TCP or TLS), CONNECT/CONNACK, and the socket shared by the
//!   reader and the writer;
//! - `client`: the [`Client`] (its threads, stop and join), the [`Publisher`] handle, the bounded
//!   queue of publishes, subscriptions and the routing of incoming publishes to consumers.
//!
//! # Contract (stable: other modules build on it)
//! ```text
//! let mut builder = ClientBuilder::new(options);                  // Options::from_config(&config)?
//! let twin_rx: Receiver<Publish> = builder.route(&["$hw/events/device/+/twin/+"], capacity);
//! let rest_rx: Receiver<Publish> = builder.route_rest(capacity);  // topics no route claims
//! let client: Client = builder.start()?;                          // spawns eh-mqtt (+ eh-mqtt-read)
//! let publisher: Publisher = client.publisher();                  // Clone + Send + Sync
//! publisher.publish("topic", payload_bytes)?;                     // never blocks
//! publisher.subscribe("a/#"); publisher.unsubscribe("a/#");       // run-time filters (to route_rest)
//! client.stop();                                                  // or drop: stops and joins
//! ```
//! * **Routing.** Every route's filters are subscribed (QoS 1) at each connect. An incoming
//!   publish goes to the first route (in `route` call order) with a matching filter, else to the
//!   `route_rest` channel, else it is counted as unrouted. Channels are bounded: when a consumer's
//!   channel is full the reader waits up to 1 s for room (back-pressure: meanwhile TCP and the
//!   broker hold what follows); then the publish is dropped, counted (`delivery_dropped`) and
//!   logged, and that consumer's publishes are dropped at once until it takes one again, so a
//!   stuck consumer cannot stall the others or the keep-alive.
//! * **Publishing.** `publish` queues and returns at once; publishes go out in order at the QoS
//!   and retain of the options (QoS 1: kept until the broker's PUBACK, re-sent after a reconnect).
//!   While the broker is away the queue holds at most `queue_max_messages` publishes and
//!   `queue_max_bytes` payload bytes (plus the at most 32 unacknowledged ones a lost connection
//!   puts back at its head); when full, the **oldest** is dropped and counted (`queue_dropped`). `publish` errs only for a payload bigger than the whole byte bound
//!   (`Full`) or after `stop` (`Stopped`).
//! * **Reconnect.** A lost connection (EOF, error, no PINGRESP within the keep-alive) is redialled
//!   after 0.5 s, doubling to 5 s (KubeEdge's retry interval); every subscription is renewed.
//! * **Stop.** `stop` (or dropping the [`Client`]) gives queued publishes up to 2 s to reach a
//!   connected broker, sends DISCONNECT, closes and joins the threads. Consumers see their channel
//!   disconnect.

mod client;
pub mod codec;
mod conn;

pub use client::{Client, ClientBuilder, MqttStats, Publisher};

use crate::config::Config;
use crate::error::{ErrorKind, Result};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// One MQTT application message: what a consumer receives, and what a publisher sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The broker's address, from `mqttServerExternal`: `tcp://host:port` (or plain `host:port`);
/// `ssl://`, `tls://`, `mqtts://` or `tcps://` for TLS (port 1883, or 8883 with TLS, if omitted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Broker {
    /// # Errors
    /// `Config` naming `eventBus.mqttServerExternal` and what is wrong.
    pub fn parse(url: &str) -> Result<Broker> {
        let bad = |why: &str| {
            ErrorKind::Config.msg(format!("eventBus.mqttServerExternal: {url:?}: {why}"))
        };
        let (tls, rest) = match url.split_once("://") {
            None => (false, url),
            Some(("tcp" | "mqtt", rest)) => (false, rest),
            Some(("ssl" | "tls" | "mqtts" | "tcps", rest)) => (true, rest),
            Some((scheme, _)) => return Err(bad(&format!("unknown scheme {scheme:?}"))),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a broker address has no path"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(':') || host.starts_with('[') => {
                let port = port.parse::<u16>().map_err(|_| bad("the port is not 1-65535"))?;
                (host, port)
            }
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad("expected tcp://host:port"));
        }
        Ok(Broker { host: host.to_owned(), port, tls })
    }
}

/// Certificates for TLS to the broker (`eventBusTLS`): the CA that signed the broker's
/// certificate, and a client certificate and key when the broker asks for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Everything the client needs, fixed at start.
#[derive(Clone)]
pub struct Options {
    pub broker: Broker,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsFiles>,
    /// QoS of our publishes, 0 or 1.
    pub qos: u8,
    pub retain: bool,
    pub keep_alive: Duration,
    pub queue_max_messages: usize,
    pub queue_max_bytes: usize,
    /// Largest packet accepted from the broker; a longer one is skipped and counted.
    pub max_packet_bytes: usize,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("broker", &self.broker)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("keep_alive", &self.keep_alive)
            .field("queue_max_messages", &self.queue_max_messages)
            .field("queue_max_bytes", &self.queue_max_bytes)
            .finish()
    }
}

impl Options {
    /// The client options of the `eventBus` section, or `None` when MQTT is off (no
    /// `mqttServerExternal`, or `enable: false`).
    ///
    /// # Errors
    /// `Config` when the broker address does not parse.
    pub fn from_config(config: &Config) -> Result<Option<Options>> {
        let bus = &config.event_bus;
        if !bus.is_on() {
            return Ok(None);
        }
        let broker = Broker::parse(&bus.mqtt_server_external)?;
        let tls = (broker.tls || bus.event_bus_tls.enable).then(|| {
            let t = &bus.event_bus_tls;
            let client = (!t.tls_mqtt_cert_file.as_os_str().is_empty())
                .then(|| (t.tls_mqtt_cert_file.clone(), t.tls_mqtt_private_key_file.clone()));
            TlsFiles { ca: t.tls_mqtt_ca_file.clone(), client }
        });
        let client_id = if bus.mqtt_sub_client_id.is_empty() {
            default_client_id()
        } else {
            bus.mqtt_sub_client_id.clone()
        };
        Ok(Some(Options {
            broker: Broker { tls: tls.is_some(), ..broker },
            client_id,
            username: Some(bus.mqtt_username.clone()).filter(|u| !u.is_empty()),
            password: Some(bus.mqtt_password.clone()).filter(|p| !p.is_empty()),
            tls,
            qos: bus.mqtt_qos.min(1),
            retain: bus.mqtt_retain,
            keep_alive: bus.mqtt_keep_alive.0,
            queue_max_messages: bus.mqtt_session_queue_size.max(1),
            queue_max_bytes: bus.mqtt_queue_max_bytes.max(1),
            max_packet_bytes: bus.mqtt_max_packet_bytes.max(64),
        }))
    }
}

/// KubeEdge's default: `hub-client-sub-` and the first 10 digits of the time in ms, so a
/// restarted agent does not collide with its own previous session on the broker.
fn default_client_id() -> String {
    let ms = crate::message::now_millis().to_string();
    format!("hub-client-sub-{}", &ms[..ms.len().min(10)])
}

/// MQTT topic-filter matching (3.1.1 §4.7): `+` is one level, a final `#` any number (also
/// none); a filter starting with a wildcard does not match a topic starting with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// A filter we may subscribe to: non-empty, at most 65535 bytes, no NUL, `#` only as the last
/// level, wildcards only as whole levels.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > usize::from(u16::MAX) || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// A topic we may publish to: non-empty, at most 65535 bytes, no wildcard, no NUL.
pub fn is_valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(filter_matches("$hw/events/device/+/twin/+", "$hw/events/device/d1/twin/update"));
        assert!(!filter_matches(
            "$hw/events/device/+/twin/+",
            "$hw/events/device/ns/d1/twin/update"
        ));
        assert!(filter_matches("$hw/events/upload/#", "$hw/events/upload"));
        assert!(filter_matches("$hw/events/upload/#", "$hw/events/upload/a/b"));
        assert!(filter_matches("+/user/#", "default/user/x"));
        assert!(!filter_matches("+/user/#", "$hw/user/x"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("a/+", "a/"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(!filter_matches("a/b/c", "a/b"));
    }

    #[test]
    fn filters_and_topics_are_checked() {
        assert!(is_valid_filter("a/+/#"));
        assert!(!is_valid_filter("a/#/b"));
        assert!(!is_valid_filter("a/b+"));
        assert!(!is_valid_filter(""));
        assert!(is_valid_topic("default/cmd"));
        assert!(!is_valid_topic("a/+"));
    }

    #[test]
    fn broker_urls_parse_like_edgecore_writes_them() {
        let b = Broker::parse("tcp://127.0.0.1:1883").unwrap();
        assert_eq!(b, Broker { host: "127.0.0.1".into(), port: 1883, tls: false });
        let b = Broker::parse("ssl://broker.local").unwrap();
        assert_eq!((b.port, b.tls), (8883, true));
        assert_eq!(Broker::parse("[::1]:1884").unwrap().host, "::1");
        for bad in ["ws://x:1", "tcp://:1883", "tcp://h:99999", "tcp://h:1/path"] {
            let e = Broker::parse(bad).unwrap_err().to_string();
            assert!(e.contains("mqttServerExternal"), "{e}");
        }
    }
}
