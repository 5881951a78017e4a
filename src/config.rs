//! The agent's configuration: one JSON file whose keys and nesting are exactly edgecore's `edgeHub`
//! section (protocol §6), so an operator can carry settings over, plus the agent's own keys at the top
//! level. Defaults live here as consts; `validate()` refuses bad values naming the key and the reason.
//! It holds paths only: it never opens sockets or reads certificate contents.

use crate::error::{ErrorKind, Result};
use crate::logging::LogTarget;
use crate::outbox::FullPolicy;
use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
pub const DEFAULT_PROJECT_ID: &str = "e632aba927ea4ac2b575ec1603d56f10";
pub const DEFAULT_TLS_CA_FILE: &str = "/etc/kubeedge/ca/rootCA.crt";
pub const DEFAULT_TLS_CERT_FILE: &str = "/etc/kubeedge/certs/server.crt";
pub const DEFAULT_TLS_KEY_FILE: &str = "/etc/kubeedge/certs/server.key";
pub const DEFAULT_MESSAGE_QPS: u32 = 30;
pub const DEFAULT_MESSAGE_BURST: u32 = 60;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_READ_DEADLINE: Duration = Duration::from_secs(15);
pub const DEFAULT_WRITE_DEADLINE: Duration = Duration::from_secs(15);
pub const DEFAULT_STATE_DIR: &str = "/var/lib/edgehub";
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 32 << 20;
pub const DEFAULT_OUTBOX_MAX_MESSAGES: usize = 10_000;
pub const DEFAULT_OUTBOX_MAX_BYTES: usize = 8 << 20;
pub const DEFAULT_MODULE_INBOX_CAP: usize = 256;
pub const DEFAULT_RECONNECT_JITTER: Duration = Duration::from_secs(3);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// edged's `nodeStatusUpdateFrequency` default (edge-node §1.1).
pub const DEFAULT_NODE_STATUS_UPDATE_FREQUENCY: Duration = Duration::from_secs(10);
/// edged's `registerNodeNamespace` default.
pub const DEFAULT_REGISTER_NODE_NAMESPACE: &str = "default";
/// The taint a node that runs no containers registers with (edge-node §1.9).
pub const DEFAULT_TAINT_KEY: &str = "edgehub.io/no-containers";
/// Taint effects Kubernetes knows.
pub const TAINT_EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
pub const DEFAULT_LOCAL_API_SOCKET: &str = "/run/edgehub/edgehub.sock";
pub const DEFAULT_LOCAL_API_MAX_CLIENTS: usize = 16;
pub const DEFAULT_LOCAL_CLIENT_QUEUE: usize = 1024;
pub const DEFAULT_LOCAL_API_MAX_LINE_BYTES: usize = 1 << 20;
/// Hardening (issue 11): a local client that neither subscribed nor sent a line for this long is
/// disconnected, so idle connections cannot hold every client slot.
pub const DEFAULT_LOCAL_API_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest local API socket path: `sun_path` holds 107 bytes, and binding first at a temporary
/// `<path>.<pid>` (then renaming) needs room for up to 8 more.
pub const MAX_LOCAL_API_SOCKET_BYTES: usize = 99;
pub const DEFAULT_MESSAGE_TTL: Duration = Duration::from_secs(2 * 3600);
pub const DEFAULT_SPOOL_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between two join attempts at start (join retry at boot).
pub const DEFAULT_JOIN_RETRY_MAX: Duration = Duration::from_secs(60);
/// Resource substrings of status-like messages where only the latest unsent one matters.
pub const DEFAULT_COALESCE: [&str; 3] = ["/nodestatus/", "/podstatus", "/twin/edge_updated"];
/// CloudHub closes a node that sent no keepalive for this long (protocol §4.3).
pub const CLOUD_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
// Objects followed by local apps (`watch`, issue 12): the interval when a watch names
// none, the shortest one granted, and how many objects may be followed at once.
pub const DEFAULT_LOCAL_API_WATCH_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_LOCAL_API_MIN_WATCH_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_LOCAL_API_MAX_WATCHES: usize = 32;

/// A duration written in the file as seconds. edgecore writes whole seconds; fractions are accepted
/// too (tests and benchmarks run with sub-second heartbeats).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Seconds, D::Error> {
        let secs = f64::deserialize(d)?;
        if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
            return Err(D::Error::custom(format!(
                "{secs} is not a number of seconds from 0 to 1e9"
            )));
        }
        Ok(Seconds(Duration::from_secs_f64(secs)))
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            s.serialize_u64(d.as_secs())
        } else {
            s.serialize_f64(d.as_secs_f64())
        }
    }
}

/// `edgeHub.websocket` (protocol §6).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WebSocket {
    pub enable: bool,
    /// CloudHub address, `host:port`; the host must be in the server certificate's SANs.
    pub server: String,
    pub handshake_timeout: Seconds,
    /// edgecore ignores it; here it is real: no frame at all for this long means the link is dead.
    pub read_deadline: Seconds,
    pub write_deadline: Seconds,
}

impl Default for WebSocket {
    fn default() -> WebSocket {
        WebSocket {
            enable: true,
            server: String::new(),
            handshake_timeout: Seconds(DEFAULT_HANDSHAKE_TIMEOUT),
            read_deadline: Seconds(DEFAULT_READ_DEADLINE),
            write_deadline: Seconds(DEFAULT_WRITE_DEADLINE),
        }
    }
}

/// The log level key, as simplelog understands it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The whole configuration file.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    // ---- edgecore's `edgeHub` keys (protocol §6) ----
    /// Kept for compatibility; edgehub only runs the hub, so `false` is refused.
    pub enable: bool,
    /// Keepalive period, and half the reconnect cooldown.
    pub heartbeat: Seconds,
    #[serde(rename = "projectID")]
    pub project_id: String,
    pub tls_ca_file: PathBuf,
    pub tls_cert_file: PathBuf,
    pub tls_private_key_file: PathBuf,
    /// `<caHash>.<jwt>` join token. Never printed.
    pub token: String,
    /// A file holding the join token (like HEAD's bootstrap file), used when `token` is empty.
    /// Read only when there is no usable certificate; left in place after the join.
    pub token_file: PathBuf,
    pub http_server: String,
    pub rotate_certificates: bool,
    #[serde(rename = "messageQPS")]
    pub message_qps: u32,
    pub message_burst: u32,
    pub websocket: WebSocket,
    /// Accepted so an edgecore section can be pasted as is; QUIC is not supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<serde_json::Value>,

    // ---- the agent's own keys ----
    /// Node name (edgecore's `edged.hostnameOverride`); defaults to the host name.
    pub node_name: String,
    pub state_dir: PathBuf,
    pub log_level: LogLevel,
    /// `stderr` (procd, systemd) or `syslog` (through /dev/log).
    pub log_target: LogTarget,
    /// Largest cloud message accepted; a bigger one ends the session (it cannot be skipped).
    pub max_message_bytes: usize,
    /// Upstream outbox bounds (in memory and in the spool alike).
    pub outbox_max_messages: usize,
    pub outbox_max_bytes: usize,
    /// When the outbox is full: `reject` the new message (its sender gets an error) or
    /// `dropOldest`. Every drop is counted and logged.
    pub outbox_full_policy: FullPolicy,
    /// Keep the outbox on disk under `stateDir/spool`, so it survives a restart.
    pub outbox_spool: bool,
    /// How often the spool is fsynced at most: a power cut loses at most this much.
    pub spool_sync_interval: Seconds,
    /// Messages older than this are not sent (0: never expire).
    #[serde(rename = "messageTTL")]
    pub message_ttl: Seconds,
    /// Resource substrings of status-like messages: a newer one replaces the unsent older one
    /// with the same resource and operation.
    pub coalesce_resources: Vec<String>,
    /// Bound of each module's inbox; when full, reading from the cloud pauses (back-pressure).
    pub module_inbox_capacity: usize,
    /// Random extra wait added to the 2×heartbeat reconnect cooldown, from 0 to this.
    pub reconnect_jitter: Seconds,
    /// Default time a local request waits for the cloud's response.
    pub request_timeout: Seconds,
    /// Old name of `nodeStatusUpdateFrequency`, still accepted alone (with a warning at start);
    /// refused together with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_status_interval: Option<Seconds>,
    /// Unix socket of the local API (mode 0660), for device mappers, scripts and the CLI client.
    pub local_api_socket: PathBuf,
    /// Local API clients connected at once; more are refused with an error line.
    pub local_api_max_clients: usize,

    // ---- objects followed by local apps (local API `watch`, issue 12) ----
    /// How often a followed object is queried again while connected, when the watch names no
    /// interval.
    pub local_api_watch_interval: Seconds,
    /// The shortest interval a watch may ask for (shorter ones are raised to it), so local
    /// clients cannot make the agent flood the cloud with queries.
    pub local_api_min_watch_interval: Seconds,
    /// Distinct objects followed at once, all clients together; more watches are refused.
    pub local_api_max_watches: usize,

    // ---- the local API, continued ----
    /// Lines (replies and events) queued per local client; a client that lets it overflow is
    /// disconnected, so a slow reader never stalls the agent.
    pub local_client_queue: usize,
    /// Longest request line a local client may send; a longer one gets an error reply.
    pub local_api_max_line_bytes: usize,

    // ---- the node object in the cloud (`modules::node`; edged's keys, edge-node §1) ----
    /// Status report period, also the registration retry base (edged's key). Default 10 s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_status_update_frequency: Option<Seconds>,
    /// Namespace of `<ns>/nodestatus/<node>` (edged's key).
    pub register_node_namespace: String,
    /// The `InternalIP` reported; empty: the local address of the link's own socket.
    #[serde(rename = "nodeIP")]
    pub node_ip: String,
    /// `pods` in capacity and allocatable: 0, since edgehub runs no containers (§1.9).
    pub pods_capacity: u32,
    /// Taints of the registration (the only message that can set them, §1.5).
    pub taints: Vec<Taint>,
    /// Extra node labels (merged over the KubeEdge ones) and annotations.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,

    // ---- join retry at start ----
    /// A join at start that fails (cloud unreachable, WAN not up yet) is tried again after 2 s,
    /// doubling up to this, until it succeeds or the agent is stopped.
    pub join_retry_max: Seconds,

    // ---- hardening (issue 11) ----
    /// A local client that has not subscribed and sent no line for this long is disconnected
    /// (0: never), so idle connections cannot lock other clients out.
    pub local_api_idle_timeout: Seconds,

    // ---- DeviceTwin (issue 13, twin part) ----
    /// ID segments in device topics: 1 (`$hw/events/device/<name>/…`, v1.10-era mappers) or 2
    /// (`$hw/events/device/<namespace>/<name>/…`, today's KubeEdge).
    pub device_topic_id_segments: u8,

    // ---- devices over MQTT (issue 13): edgecore's `modules.eventBus` section ----
    /// The MQTT broker connection and EventBus; off unless `mqttServerExternal` is set.
    pub event_bus: EventBus,
    /// edgecore's `modules.serviceBus`: cloud `router_servicebus` requests to local HTTP services.
    pub service_bus: ServiceBus,
}

/// A node taint, as `v1.Taint` writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub effect: String,
}

/// The default taints: `edgehub.io/no-containers=true:NoSchedule`.
pub fn default_taints() -> Vec<Taint> {
    vec![Taint {
        key: DEFAULT_TAINT_KEY.to_owned(),
        value: "true".to_owned(),
        effect: "NoSchedule".to_owned(),
    }]
}

impl Default for Config {
    fn default() -> Config {
        Config {
            enable: true,
            heartbeat: Seconds(DEFAULT_HEARTBEAT),
            project_id: DEFAULT_PROJECT_ID.to_owned(),
            tls_ca_file: PathBuf::from(DEFAULT_TLS_CA_FILE),
            tls_cert_file: PathBuf::from(DEFAULT_TLS_CERT_FILE),
            tls_private_key_file: PathBuf::from(DEFAULT_TLS_KEY_FILE),
            token: String::new(),
            token_file: PathBuf::new(),
            http_server: String::new(),
            rotate_certificates: true,
            message_qps: DEFAULT_MESSAGE_QPS,
            message_burst: DEFAULT_MESSAGE_BURST,
            websocket: WebSocket::default(),
            quic: None,
            node_name: String::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log_level: LogLevel::Info,
            log_target: LogTarget::Stderr,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            outbox_max_messages: DEFAULT_OUTBOX_MAX_MESSAGES,
            outbox_max_bytes: DEFAULT_OUTBOX_MAX_BYTES,
            outbox_full_policy: FullPolicy::Reject,
            outbox_spool: true,
            spool_sync_interval: Seconds(DEFAULT_SPOOL_SYNC_INTERVAL),
            message_ttl: Seconds(DEFAULT_MESSAGE_TTL),
            coalesce_resources: DEFAULT_COALESCE.iter().map(|s| s.to_string()).collect(),
            module_inbox_capacity: DEFAULT_MODULE_INBOX_CAP,
            reconnect_jitter: Seconds(DEFAULT_RECONNECT_JITTER),
            request_timeout: Seconds(DEFAULT_REQUEST_TIMEOUT),
            node_status_interval: None,
            local_api_socket: PathBuf::from(DEFAULT_LOCAL_API_SOCKET),
            local_api_max_clients: DEFAULT_LOCAL_API_MAX_CLIENTS,
            local_api_watch_interval: Seconds(DEFAULT_LOCAL_API_WATCH_INTERVAL),
            local_api_min_watch_interval: Seconds(DEFAULT_LOCAL_API_MIN_WATCH_INTERVAL),
            local_api_max_watches: DEFAULT_LOCAL_API_MAX_WATCHES,
            local_client_queue: DEFAULT_LOCAL_CLIENT_QUEUE,
            local_api_max_line_bytes: DEFAULT_LOCAL_API_MAX_LINE_BYTES,
            node_status_update_frequency: None,
            register_node_namespace: DEFAULT_REGISTER_NODE_NAMESPACE.to_owned(),
            node_ip: String::new(),
            pods_capacity: 0,
            taints: default_taints(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            join_retry_max: Seconds(DEFAULT_JOIN_RETRY_MAX),
            local_api_idle_timeout: Seconds(DEFAULT_LOCAL_API_IDLE_TIMEOUT),
            device_topic_id_segments: 1,
            event_bus: EventBus::default(),
            service_bus: ServiceBus::default(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_redacted_json())
    }
}

impl Config {
    /// Reads and parses `path`. Relative certificate paths are taken relative to the file's folder.
    /// Does not validate: call [`Config::validate`] after applying overrides.
    ///
    /// # Errors
    /// `Config`, naming the file and, where serde can, the key, line and column.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ErrorKind::Config.msg(format!("read {}", path.display())).src(e))?;
        let mut config = Config::from_json(&text)
            .map_err(|e| ErrorKind::Config.msg(format!("parse {}", path.display())).src(e))?;
        if let Some(dir) = path.parent() {
            config.resolve_relative_paths(dir);
        }
        Ok(config)
    }

    /// Parses configuration JSON over the defaults (omitted keys keep their defaults).
    pub fn from_json(text: &str) -> std::result::Result<Config, serde_json::Error> {
        let mut config: Config = serde_json::from_str(text)?;
        if config.node_name.is_empty() {
            config.node_name = host_name();
        }
        Ok(config)
    }

    fn resolve_relative_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.tls_ca_file,
            &mut self.tls_cert_file,
            &mut self.tls_private_key_file,
            &mut self.token_file,
            &mut self.state_dir,
            &mut self.local_api_socket,
            &mut self.event_bus.event_bus_tls.tls_mqtt_ca_file,
            &mut self.event_bus.event_bus_tls.tls_mqtt_cert_file,
            &mut self.event_bus.event_bus_tls.tls_mqtt_private_key_file,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Refuses values the agent cannot run with, naming the key and the reason.
    ///
    /// # Errors
    /// `Config` with context `<key>: <reason>`.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(ErrorKind::Config.msg(format!("{key}: {why}")));
        if !self.enable {
            return bad(
                "enable",
                "false: edgehub is the hub module, it cannot run disabled".into(),
            );
        }
        if !self.websocket.enable {
            return bad(
                "websocket.enable",
                "false: only the websocket transport is supported".into(),
            );
        }
        if self.quic.as_ref().and_then(|q| q.get("enable")).and_then(|e| e.as_bool()) == Some(true)
        {
            return bad("quic.enable", "true: QUIC is not supported, use websocket".into());
        }
        if self.heartbeat.0 < Duration::from_millis(10) {
            return bad(
                "heartbeat",
                format!("{:?} is too short (at least 0.01 s)", self.heartbeat.0),
            );
        }
        if self.heartbeat.0 >= CLOUD_KEEPALIVE_TIMEOUT {
            return bad(
                "heartbeat",
                format!(
                    "{} s is not shorter than CloudHub's {} s keepalive timeout",
                    self.heartbeat.0.as_secs_f64(),
                    CLOUD_KEEPALIVE_TIMEOUT.as_secs()
                ),
            );
        }
        if self.join_retry_max.0 < Duration::from_millis(10) {
            return bad("joinRetryMax", "must be at least 0.01 s".into());
        }
        if !(1..=2).contains(&self.device_topic_id_segments) {
            return bad(
                "deviceTopicIdSegments",
                format!("{} is not 1 or 2", self.device_topic_id_segments),
            );
        }
        if self.message_qps == 0 {
            return bad("messageQPS", "0 would block every upstream message forever".into());
        }
        if self.message_burst == 0 {
            return bad("messageBurst", "0 would drop every upstream message".into());
        }
        if self.project_id.is_empty() || self.project_id.contains('/') {
            return bad(
                "projectID",
                format!("{:?} must be non-empty without '/'", self.project_id),
            );
        }
        if self.node_name.is_empty() || self.node_name.contains('/') || self.node_name.len() > 253 {
            return bad(
                "nodeName",
                format!("{:?} must be 1-253 chars without '/'", self.node_name),
            );
        }
        validate_server(&self.websocket.server)?;
        let socket_len = self.local_api_socket.as_os_str().len();
        if socket_len == 0 || socket_len > MAX_LOCAL_API_SOCKET_BYTES {
            return bad(
                "localApiSocket",
                format!(
                    "{} is {socket_len} bytes (1 to {MAX_LOCAL_API_SOCKET_BYTES})",
                    self.local_api_socket.display()
                ),
            );
        }
        for (key, d) in [
            ("localApiWatchInterval", self.local_api_watch_interval),
            ("localApiMinWatchInterval", self.local_api_min_watch_interval),
            ("websocket.handshakeTimeout", self.websocket.handshake_timeout),
            ("websocket.readDeadline", self.websocket.read_deadline),
            ("websocket.writeDeadline", self.websocket.write_deadline),
            ("requestTimeout", self.request_timeout),
            ("nodeStatusUpdateFrequency", Seconds(self.node_status_period())),
        ] {
            if d.0 < Duration::from_millis(10) {
                return bad(key, format!("{:?} is too short (at least 0.01 s)", d.0));
            }
        }
        for (key, n, min) in [
            ("maxMessageBytes", self.max_message_bytes, 1024),
            ("outboxMaxMessages", self.outbox_max_messages, 1),
            ("outboxMaxBytes", self.outbox_max_bytes, 1024),
            ("moduleInboxCapacity", self.module_inbox_capacity, 1),
            ("localApiMaxClients", self.local_api_max_clients, 1),
            ("localClientQueue", self.local_client_queue, 1),
            ("localApiMaxLineBytes", self.local_api_max_line_bytes, 1024),
            ("localApiMaxWatches", self.local_api_max_watches, 1),
        ] {
            if n < min {
                return bad(key, format!("{n} is below the minimum {min}"));
            }
        }
        if !self.http_server.is_empty() {
            crate::certs::http::BaseUrl::parse(&self.http_server)?;
        }
        self.validate_node_object()?;
        self.event_bus.validate()?;
        for (key, path) in [
            ("tlsCaFile", &self.tls_ca_file),
            ("tlsCertFile", &self.tls_cert_file),
            ("tlsPrivateKeyFile", &self.tls_private_key_file),
        ] {
            let Err(e) = std::fs::metadata(path) else { continue };
            if !self.has_token() {
                return Err(ErrorKind::Config.msg(format!("{key}: {}", path.display())).src(e));
            }
            // Joining with the token writes the files, from the certificate server.
            if self.http_server.is_empty() {
                return bad(
                    "httpServer",
                    format!(
                        "must be set to join with the token ({key} {} is missing)",
                        path.display()
                    ),
                );
            }
        }
        Ok(())
    }

    /// The node status period: `nodeStatusUpdateFrequency`, else the old `nodeStatusInterval`,
    /// else edged's 10 s.
    pub fn node_status_period(&self) -> Duration {
        self.node_status_update_frequency
            .or(self.node_status_interval)
            .map_or(DEFAULT_NODE_STATUS_UPDATE_FREQUENCY, |s| s.0)
    }

    /// The keys of the node object (`modules::node`).
    fn validate_node_object(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(ErrorKind::Config.msg(format!("{key}: {why}")));
        if self.node_status_interval.is_some() && self.node_status_update_frequency.is_some() {
            return bad(
                "nodeStatusInterval",
                "is the old name of nodeStatusUpdateFrequency; set only nodeStatusUpdateFrequency"
                    .into(),
            );
        }
        let ns = &self.register_node_namespace;
        if ns.is_empty()
            || ns.len() > 63
            || !ns.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return bad(
                "registerNodeNamespace",
                format!("{ns:?} is not a namespace name (1-63 of a-z, 0-9, -)"),
            );
        }
        if !self.node_ip.is_empty() && self.node_ip.parse::<std::net::IpAddr>().is_err() {
            return bad("nodeIP", format!("{:?} is not an IP address", self.node_ip));
        }
        for taint in &self.taints {
            if taint.key.is_empty() || taint.key.len() > 316 {
                return bad("taints", format!("key {:?} must be 1-316 chars", taint.key));
            }
            if !TAINT_EFFECTS.contains(&taint.effect.as_str()) {
                return bad(
                    "taints",
                    format!(
                        "effect {:?} of {:?} is not one of {TAINT_EFFECTS:?}",
                        taint.effect, taint.key
                    ),
                );
            }
        }
        for (key, map) in [("labels", &self.labels), ("annotations", &self.annotations)] {
            if let Some(name) = map.keys().find(|k| k.is_empty() || k.len() > 316) {
                return bad(key, format!("name {name:?} must be 1-316 chars"));
            }
        }
        Ok(())
    }

    /// True when a join token is configured (`token` or `tokenFile`).
    pub fn has_token(&self) -> bool {
        !self.token.trim().is_empty() || !self.token_file.as_os_str().is_empty()
    }

    /// `wss://<server>/<projectID>/<nodeName>/events` (protocol §2.1).
    pub fn websocket_url(&self) -> String {
        format!("wss://{}/{}/{}/events", self.websocket.server, self.project_id, self.node_name)
    }

    /// Interval of WebSocket pings: a third of the read deadline, so two pongs may be lost
    /// before the deadline declares the link dead.
    pub fn ping_interval(&self) -> Duration {
        self.websocket.read_deadline.0 / 3
    }

    /// The effective configuration as pretty JSON, with the token redacted.
    pub fn to_redacted_json(&self) -> String {
        let mut shown = self.clone();
        if !shown.token.is_empty() {
            shown.token = "<redacted>".to_owned();
        }
        if !shown.event_bus.mqtt_password.is_empty() {
            shown.event_bus.mqtt_password = "<redacted>".to_owned();
        }
        serde_json::to_string_pretty(&shown).unwrap_or_default()
    }
}

// ---- devices over MQTT (issue 13) ----

pub const DEFAULT_MQTT_MODE: u8 = 2;
pub const DEFAULT_MQTT_SERVER_INTERNAL: &str = "tcp://127.0.0.1:1884";
/// edgecore's default `mqttSessionQueueSize`; here the bound of publishes waiting for the broker.
pub const DEFAULT_MQTT_SESSION_QUEUE_SIZE: usize = 100;
pub const DEFAULT_MQTT_QUEUE_MAX_BYTES: usize = 1 << 20;
pub const DEFAULT_MQTT_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_MQTT_MAX_PACKET_BYTES: usize = 1 << 20;
pub const DEFAULT_MQTT_CA_FILE: &str = "/etc/kubeedge/ca/rootCA.crt";
pub const DEFAULT_MQTT_CERT_FILE: &str = "/etc/kubeedge/certs/server.crt";
pub const DEFAULT_MQTT_KEY_FILE: &str = "/etc/kubeedge/certs/server.key";

/// edgecore's `modules.eventBus` (edge-node §3.1), plus the agent's own `mqttQueueMaxBytes`,
/// `mqttKeepAlive` and `mqttMaxPacketBytes`. Only the external-broker mode exists here.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EventBus {
    /// `false` turns MQTT off even with a broker configured.
    pub enable: bool,
    /// 2 (external broker) or 1 (treated as 2: there is no internal broker); 0 is refused.
    pub mqtt_mode: u8,
    /// The broker, `tcp://host:port` (`ssl://` for TLS). Empty (the default here, unlike
    /// edgecore): MQTT is off and a gateway without devices runs as before.
    pub mqtt_server_external: String,
    /// Accepted so an edgecore section can be pasted; there is no internal broker.
    pub mqtt_server_internal: String,
    /// QoS of the agent's publishes (0 or 1). edgecore's external mode always publishes at 1,
    /// so the default here is 1.
    #[serde(rename = "mqttQOS")]
    pub mqtt_qos: u8,
    pub mqtt_retain: bool,
    /// Publishes kept while the broker is away (the oldest is dropped beyond it).
    pub mqtt_session_queue_size: usize,
    /// The client ID (default `hub-client-sub-<ms time>`, as edgecore).
    #[serde(rename = "mqttSubClientID")]
    pub mqtt_sub_client_id: String,
    /// Accepted for compatibility: one connection both subscribes and publishes.
    #[serde(rename = "mqttPubClientID")]
    pub mqtt_pub_client_id: String,
    pub mqtt_username: String,
    /// Never printed.
    pub mqtt_password: String,
    #[serde(rename = "eventBusTLS")]
    pub event_bus_tls: EventBusTls,
    /// Payload bytes kept while the broker is away (the oldest is dropped beyond it).
    pub mqtt_queue_max_bytes: usize,
    pub mqtt_keep_alive: Seconds,
    /// Largest packet accepted from the broker; a longer one is skipped and counted.
    pub mqtt_max_packet_bytes: usize,
}

/// `eventBus.eventBusTLS`: TLS to the broker (also turned on by an `ssl://` address).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EventBusTls {
    pub enable: bool,
    #[serde(rename = "tlsMqttCAFile")]
    pub tls_mqtt_ca_file: PathBuf,
    pub tls_mqtt_cert_file: PathBuf,
    pub tls_mqtt_private_key_file: PathBuf,
}

impl Default for EventBusTls {
    fn default() -> EventBusTls {
        EventBusTls {
            enable: false,
            tls_mqtt_ca_file: PathBuf::from(DEFAULT_MQTT_CA_FILE),
            tls_mqtt_cert_file: PathBuf::from(DEFAULT_MQTT_CERT_FILE),
            tls_mqtt_private_key_file: PathBuf::from(DEFAULT_MQTT_KEY_FILE),
        }
    }
}

impl Default for EventBus {
    fn default() -> EventBus {
        EventBus {
            enable: true,
            mqtt_mode: DEFAULT_MQTT_MODE,
            mqtt_server_external: String::new(),
            mqtt_server_internal: DEFAULT_MQTT_SERVER_INTERNAL.to_owned(),
            mqtt_qos: 1,
            mqtt_retain: false,
            mqtt_session_queue_size: DEFAULT_MQTT_SESSION_QUEUE_SIZE,
            mqtt_sub_client_id: String::new(),
            mqtt_pub_client_id: String::new(),
            mqtt_username: String::new(),
            mqtt_password: String::new(),
            event_bus_tls: EventBusTls::default(),
            mqtt_queue_max_bytes: DEFAULT_MQTT_QUEUE_MAX_BYTES,
            mqtt_keep_alive: Seconds(DEFAULT_MQTT_KEEP_ALIVE),
            mqtt_max_packet_bytes: DEFAULT_MQTT_MAX_PACKET_BYTES,
        }
    }
}

impl EventBus {
    /// True when the agent connects to a broker.
    pub fn is_on(&self) -> bool {
        self.enable && !self.mqtt_server_external.trim().is_empty()
    }

    /// The `eventBus` part of [`Config::validate`].
    ///
    /// # Errors
    /// `Config` naming `eventBus.<key>` and the reason.
    pub fn validate(&self) -> Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        let bad =
            |key: &str, why: String| Err(ErrorKind::Config.msg(format!("eventBus.{key}: {why}")));
        if self.mqtt_mode == 0 || self.mqtt_mode > 2 {
            return bad(
                "mqttMode",
                format!(
                    "{} is not supported: only 2 (external broker) exists here",
                    self.mqtt_mode
                ),
            );
        }
        if self.mqtt_qos > 1 {
            return bad("mqttQOS", format!("{} is not 0 or 1", self.mqtt_qos));
        }
        let broker = crate::mqtt::Broker::parse(&self.mqtt_server_external)?;
        if (broker.tls || self.event_bus_tls.enable)
            && self.event_bus_tls.tls_mqtt_ca_file.as_os_str().is_empty()
        {
            return bad("eventBusTLS.tlsMqttCAFile", "TLS to the broker needs a CA file".into());
        }
        let keep_alive = self.mqtt_keep_alive.0;
        if keep_alive < Duration::from_secs(1) || keep_alive > Duration::from_secs(65_535) {
            return bad("mqttKeepAlive", format!("{keep_alive:?} is not 1 to 65535 s"));
        }
        for (key, n, min) in [
            ("mqttSessionQueueSize", self.mqtt_session_queue_size, 1),
            ("mqttQueueMaxBytes", self.mqtt_queue_max_bytes, 1024),
            ("mqttMaxPacketBytes", self.mqtt_max_packet_bytes, 1024),
        ] {
            if n < min {
                return bad(key, format!("{n} is below the minimum {min}"));
            }
        }
        Ok(())
    }
}

/// edgecore's `modules.serviceBus` (edge-node §3.5). Only `enable` acts: requests go to
/// `http://127.0.0.1:<port from the request>`; `server`, `port` and `timeout` are accepted so the
/// section pastes as is (the local HTTP server edgecore starts on them is not offered).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServiceBus {
    pub enable: bool,
    pub server: String,
    pub port: u16,
    pub timeout: u32,
}

impl Default for ServiceBus {
    fn default() -> ServiceBus {
        ServiceBus { enable: false, server: "127.0.0.1".to_owned(), port: 9060, timeout: 60 }
    }
}

fn validate_server(server: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(ErrorKind::Config
            .msg(format!("websocket.server: {server:?} {why} (expected host:port)")))
    };
    if server.is_empty() {
        return bad("is not set");
    }
    if server.contains('/') || server.contains(char::is_whitespace) {
        return bad("is malformed");
    }
    let Some((host, port)) = server.rsplit_once(':') else {
        return bad("has no port");
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return bad("has an empty host or an invalid port");
    }
    if host.starts_with('[') != host.ends_with(']') {
        return bad("has unbalanced brackets");
    }
    // Resolvable names are checked at dial time (DNS may be down at boot); literal IPs here.
    // Parsed, not resolved: a resolver call here could hang validation at boot (found by fuzzing).
    if host.chars().all(|c| c.is_ascii_digit() || c == '.')
        && host.parse::<std::net::Ipv4Addr>().is_err()
    {
        return bad("is not a valid IPv4 address");
    }
    Ok(())
}

/// The host name, as edgecore's `hostnameOverride` default.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edge-node".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_config(dir: &Path) -> String {
        for f in ["ca.crt", "c.crt", "c.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            r#"{{"nodeName":"gw-1","websocket":{{"server":"127.0.0.1:10000"}},
               "tlsCaFile":"{0}/ca.crt","tlsCertFile":"{0}/c.crt","tlsPrivateKeyFile":"{0}/c.key"}}"#,
            dir.display()
        )
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("edgehub-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn omitted_keys_take_edgecore_defaults() {
        let c = Config::from_json(r#"{"websocket":{"server":"10.0.0.1:10000"}}"#).unwrap();
        assert_eq!(c.heartbeat.0, Duration::from_secs(15));
        assert_eq!(c.project_id, DEFAULT_PROJECT_ID);
        assert_eq!(c.message_qps, 30);
        assert_eq!(c.message_burst, 60);
        assert_eq!(c.websocket.handshake_timeout.0, Duration::from_secs(30));
        assert_eq!(c.websocket.read_deadline.0, Duration::from_secs(15));
        assert_eq!(c.websocket.write_deadline.0, Duration::from_secs(15));
        assert!(c.rotate_certificates);
        assert_eq!(c.tls_ca_file, PathBuf::from(DEFAULT_TLS_CA_FILE));
        assert!(!c.node_name.is_empty());
    }

    #[test]
    fn issue_example_parses_and_builds_the_url() {
        let c = Config::from_json(
            r#"{"nodeName": "gw-1", "heartbeat": 15, "stateDir": "/var/lib/edgehub",
                "websocket": {"server": "10.0.0.1:10000", "readDeadline": 15}, "tlsCaFile": "/x"}"#,
        )
        .unwrap();
        assert_eq!(
            c.websocket_url(),
            format!("wss://10.0.0.1:10000/{DEFAULT_PROJECT_ID}/gw-1/events")
        );
    }

    #[test]
    fn edgecore_section_with_quic_and_enable_is_accepted() {
        let c = Config::from_json(
            r#"{"enable":true,"heartbeat":15,"quic":{"enable":false,"server":"1.2.3.4:10001"},
                "websocket":{"enable":true,"server":"1.2.3.4:10000"},"httpServer":"https://1.2.3.4:10002",
                "token":"abc.def.ghi.jkl","rotateCertificates":true,"messageQPS":30,"messageBurst":60}"#,
        )
        .unwrap();
        assert!(c.quic.is_some());
        assert!(!format!("{c:?}").contains("def.ghi"), "token must be redacted");
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let e = Config::from_json(r#"{"heartbeet": 15}"#).unwrap_err().to_string();
        assert!(e.contains("heartbeet"), "{e}");
    }

    #[test]
    fn invalid_values_are_refused_naming_the_key() {
        let dir = temp_dir("invalid");
        let base = files_config(&dir);
        let ok = Config::from_json(&base).unwrap();
        ok.validate().unwrap();
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("heartbeat", Box::new(|c| c.heartbeat = Seconds(Duration::ZERO))),
            ("heartbeat", Box::new(|c| c.heartbeat = Seconds(Duration::from_secs(30)))),
            ("messageBurst", Box::new(|c| c.message_burst = 0)),
            ("messageQPS", Box::new(|c| c.message_qps = 0)),
            ("websocket.server", Box::new(|c| c.websocket.server = "10.0.0.1".into())),
            ("websocket.server", Box::new(|c| c.websocket.server = "10.0.0.1:99999".into())),
            ("websocket.server", Box::new(|c| c.websocket.server = "wss://10.0.0.1:1".into())),
            ("websocket.server", Box::new(|c| c.websocket.server = "300.1.1.1:10000".into())),
            ("websocket.server", Box::new(|c| c.websocket.server = String::new())),
            ("tlsCaFile", Box::new(|c| c.tls_ca_file = "/nonexistent/ca.crt".into())),
            ("tlsPrivateKeyFile", Box::new(|c| c.tls_private_key_file = "/nonexistent/k".into())),
            (
                "websocket.readDeadline",
                Box::new(|c| c.websocket.read_deadline = Seconds(Duration::ZERO)),
            ),
            ("nodeName", Box::new(|c| c.node_name = "a/b".into())),
        ];
        for (key, mutate) in cases {
            let mut c = ok.clone();
            mutate(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn negative_or_huge_seconds_are_parse_errors() {
        assert!(Config::from_json(r#"{"heartbeat": -1}"#).is_err());
        assert!(Config::from_json(r#"{"heartbeat": "15"}"#).is_err());
        let c = Config::from_json(r#"{"heartbeat": 0.25}"#).unwrap();
        assert_eq!(c.heartbeat.0, Duration::from_millis(250));
    }

    #[test]
    fn load_names_the_file_and_resolves_relative_paths() {
        let dir = temp_dir("load");
        let e = Config::load(&dir.join("missing.json")).unwrap_err().to_string();
        assert!(e.contains("missing.json"), "{e}");
        std::fs::write(dir.join("bad.json"), "{\"heartbeat\": }").unwrap();
        let e = Config::load(&dir.join("bad.json")).unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("line 1"), "{e}");
        std::fs::write(dir.join("rel.json"), r#"{"tlsCaFile":"ca.crt"}"#).unwrap();
        let c = Config::load(&dir.join("rel.json")).unwrap();
        assert_eq!(c.tls_ca_file, dir.join("ca.crt"));
    }

    // ---- devices over MQTT (issue 13) ----

    #[test]
    fn event_bus_takes_edgecores_section_and_is_off_without_a_broker() {
        assert!(!Config::from_json("{}").unwrap().event_bus.is_on());
        let c = Config::from_json(
            r#"{"eventBus": {"enable": true, "mqttMode": 2, "mqttQOS": 0, "mqttRetain": false,
                "mqttSessionQueueSize": 100, "mqttServerExternal": "tcp://127.0.0.1:1883",
                "mqttServerInternal": "tcp://127.0.0.1:1884", "mqttSubClientID": "",
                "mqttPubClientID": "", "mqttUsername": "u", "mqttPassword": "hunter2",
                "eventBusTLS": {"enable": false, "tlsMqttCAFile": "/etc/kubeedge/ca/rootCA.crt",
                  "tlsMqttCertFile": "/etc/kubeedge/certs/server.crt",
                  "tlsMqttPrivateKeyFile": "/etc/kubeedge/certs/server.key"}}}"#,
        )
        .unwrap();
        assert!(c.event_bus.is_on());
        c.event_bus.validate().unwrap();
        let shown = c.to_redacted_json();
        assert!(!shown.contains("hunter2") && shown.contains("mqttServerExternal"), "{shown}");
        let e = Config::from_json(r#"{"eventBus": {"mqttBogus": 1}}"#).unwrap_err().to_string();
        assert!(e.contains("mqttBogus"), "{e}");
    }

    #[test]
    fn event_bus_values_are_checked_naming_the_key() {
        let mut ok = Config::from_json("{}").unwrap().event_bus;
        ok.mqtt_server_external = "tcp://127.0.0.1:1883".into();
        ok.validate().unwrap();
        type Mutation = Box<dyn Fn(&mut EventBus)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("mqttMode", Box::new(|b| b.mqtt_mode = 0)),
            ("mqttQOS", Box::new(|b| b.mqtt_qos = 2)),
            ("mqttServerExternal", Box::new(|b| b.mqtt_server_external = "ws://x:1".into())),
            ("mqttKeepAlive", Box::new(|b| b.mqtt_keep_alive = Seconds(Duration::ZERO))),
            ("mqttSessionQueueSize", Box::new(|b| b.mqtt_session_queue_size = 0)),
            ("mqttQueueMaxBytes", Box::new(|b| b.mqtt_queue_max_bytes = 10)),
            (
                "tlsMqttCAFile",
                Box::new(|b| {
                    b.mqtt_server_external = "ssl://h:8883".into();
                    b.event_bus_tls.tls_mqtt_ca_file = PathBuf::new();
                }),
            ),
        ];
        for (key, mutate) in cases {
            let mut b = ok.clone();
            mutate(&mut b);
            let e = b.validate().unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("eventBus"), "{key}: {e}");
        }
        let mut off = ok.clone();
        off.enable = false;
        off.mqtt_mode = 0;
        off.validate().unwrap(); // nothing is checked while MQTT is off
    }
}
