//! The `node` module: this gateway as a Kubernetes Node, kept the way edged keeps one (edge-node
//! §1): on every connect a registration (`insert` of `<ns>/nodestatus/<node>` carrying a `v1.Node`;
//! only the answer "OK" is success, anything else is retried with backoff), then a
//! `NodeStatusRequest` `update` at once and every period, each treated as a request so that three
//! unanswered periods in a row mean the node is gone on the cloud side and it registers again; the
//! label `update` of `<ns>/node/<node>` once per start; and the pods that reach a node that runs no
//! containers (reported `Failed` once, deletion confirmed, §1.8). Host facts come from
//! `node_status`, pods from the `meta` store (which stores and ACKs them). Never touches the link.

use crate::config::{Config, Taint};
use crate::message::{
    text_content, Message, Route, CLOUD_CONNECTED, CLOUD_DISCONNECTED, CONNECTION_RESOURCE,
    CONTENT_OK,
};
use crate::modules::meta_store::MetaHandle;
use crate::modules::node_status::{self, HostFacts};
use crate::modules::{Hub, ModuleContext, ModuleSpec, PendingReply};
use crossbeam_channel::{after, never, select, tick, Receiver};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `kubeletVersion` reported: KubeEdge's `v<k8s>-kubeedge-<version>` shape, with the versions of
/// the protocol line edgehub speaks (REF, KubeEdge v1.10 on Kubernetes v1.21.4), so cloud tools
/// that read the version to tell edge nodes apart see one of the kind they know.
pub const KUBELET_VERSION: &str = "v1.21.4-kubeedge-v1.10.0";
/// Status updates in a row without an answer after which the node registers again.
pub const MISSED_ANSWERS_BEFORE_REREGISTERING: u32 = 3;
/// Longest wait between registration attempts, in periods.
const MAX_BACKOFF_PERIODS: u32 = 8;
/// Shortest period: a zero period would spin the thread.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);
/// edged's allocatable is capacity minus these reservations (edge-node §1.2).
const RESERVED_MEMORY_MIB: u64 = 100;
const RESERVED_EPHEMERAL_KIB: u64 = 1 << 20;
/// Pods looked at per scan, and pod UIDs remembered as handled (the sets are cleared when full,
/// which at worst reports a pod a second time).
const MAX_PODS: usize = 256;
const MAX_REMEMBERED_PODS: usize = 4096;
/// Why a pod that reached this node is reported `Failed`.
pub const POD_FAILED_REASON: &str = "NoContainerRuntime";
/// `source`/`group` of what edged sends up.
const EDGED: &str = "edged";
const META: &str = "meta";

/// What the module needs from the config.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    pub namespace: String,
    pub period: Duration,
    /// `nodeIP`; `None`: the local address of the link's socket.
    pub node_ip: Option<IpAddr>,
    pub pods_capacity: u32,
    pub taints: Vec<Taint>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Where the agent keeps its state: Ready needs it writable; its filesystem is the
    /// ephemeral storage reported.
    pub state_dir: PathBuf,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        if config.node_status_interval.is_some() {
            log::warn!(
                "nodeStatusInterval is the old name of nodeStatusUpdateFrequency (edged's key); \
                 using it as that"
            );
        }
        Settings {
            node: config.node_name.clone(),
            namespace: config.register_node_namespace.clone(),
            period: config.node_status_period(),
            node_ip: config.node_ip.parse().ok(),
            pods_capacity: config.pods_capacity,
            taints: config.taints.clone(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            state_dir: config.state_dir.clone(),
        }
    }
}

/// The `node` module. `meta` is the store the pods bound to this node arrive in.
pub fn spec(settings: Settings, meta: Option<MetaHandle>) -> ModuleSpec {
    ModuleSpec::new("node", &[], move |ctx| Lifecycle::new(settings, meta).run(ctx))
}

/// The node's state on this side.
struct Lifecycle {
    settings: Settings,
    meta: Option<MetaHandle>,
    uid: String,
    connected: bool,
    registered: bool,
    /// The registration in flight.
    registration: Option<PendingReply>,
    /// When the next registration attempt is due (also the wait for an answer).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The last status update, while its answer has not come.
    status_reply: Option<PendingReply>,
    /// When the last status update was sent.
    last_report: Option<Instant>,
    missed_answers: u32,
    /// The Ready condition last reported: its status and since when (Unix seconds).
    ready: Option<(bool, i64)>,
    labels_sent: bool,
    /// Pod UIDs already reported `Failed`, and already confirmed deleted.
    pods_failed: HashSet<String>,
    pods_deleted: HashSet<String>,
    /// A refused send is logged once per run of refusals.
    refusing: bool,
}

impl Lifecycle {
    fn new(mut settings: Settings, meta: Option<MetaHandle>) -> Lifecycle {
        settings.period = settings.period.max(MIN_PERIOD);
        let machine_id = HostFacts::read().machine_id;
        Lifecycle {
            uid: node_status::node_uid(&machine_id, &settings.node),
            backoff: settings.period,
            settings,
            meta,
            connected: false,
            registered: false,
            registration: None,
            retry_at: None,
            status_reply: None,
            last_report: None,
            missed_answers: 0,
            ready: None,
            labels_sent: false,
            pods_failed: HashSet::new(),
            pods_deleted: HashSet::new(),
            refusing: false,
        }
    }

    fn run(mut self, ctx: ModuleContext) {
        let ticker = tick(self.settings.period);
        loop {
            let registration_rx = answer_rx(&self.registration);
            let status_rx = answer_rx(&self.status_reply);
            let retry = self
                .retry_at
                .map_or(never(), |at| after(at.saturating_duration_since(Instant::now())));
            select! {
                recv(ctx.inbox) -> msg => match msg {
                    Err(_) => return,
                    Ok(msg) if msg.route.resource == CONNECTION_RESOURCE => {
                        match msg.content_text().as_deref() {
                            Some(CLOUD_CONNECTED) => self.on_connected(&ctx.hub),
                            Some(CLOUD_DISCONNECTED) => self.on_disconnected(),
                            _ => {}
                        }
                    }
                    Ok(msg) => log::debug!("node: ignoring {msg:?}"),
                },
                recv(registration_rx) -> answer => {
                    if let Ok(answer) = answer {
                        self.on_registration_answer(&ctx.hub, &answer);
                    }
                }
                recv(status_rx) -> _ => {
                    self.status_reply = None;
                    self.missed_answers = 0;
                }
                recv(retry) -> _ => {
                    self.retry_at = None;
                    self.register(&ctx.hub);
                }
                recv(ticker) -> _ => self.on_tick(&ctx.hub),
            }
        }
    }

    fn on_connected(&mut self, hub: &Hub) {
        self.connected = true;
        self.registered = false;
        self.status_reply = None;
        self.missed_answers = 0;
        self.backoff = self.settings.period;
        self.register(hub);
    }

    fn on_disconnected(&mut self) {
        self.connected = false;
        self.registration = None;
        self.retry_at = None;
        self.status_reply = None;
    }

    /// Sends the registration (edge-node §1.2) and schedules the next attempt, which also bounds
    /// the wait for this one's answer.
    fn register(&mut self, hub: &Hub) {
        if !self.connected {
            return;
        }
        let body = registration_body(&self.settings, &self.facts(), self.internal_ip(hub));
        let msg = self.message("insert", &format!("nodestatus/{}", self.settings.node), &body);
        self.registration = self.request(hub, msg);
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(self.settings.period * MAX_BACKOFF_PERIODS);
    }

    fn on_registration_answer(&mut self, hub: &Hub, answer: &Message) {
        self.registration = None;
        let text = answer.content_text();
        if text.as_deref() != Some(CONTENT_OK) {
            let text = text.unwrap_or_else(|| answer.content.get().to_owned());
            let wait = self.retry_at.map(|at| at.saturating_duration_since(Instant::now()));
            log::warn!(
                "node: the cloud did not register node {}: {text:?}; trying again in {:?}",
                self.settings.node,
                wait.unwrap_or_default()
            );
            return;
        }
        log::info!("node: {} is registered with the cloud", self.settings.node);
        self.registered = true;
        self.retry_at = None;
        self.backoff = self.settings.period;
        self.missed_answers = 0;
        if !self.labels_sent {
            // A node that registered earlier keeps its old labels otherwise: the insert does
            // nothing for a node that exists (edge-node §1.4).
            let body = label_update_body(&self.settings);
            let msg = self.message("update", &format!("node/{}", self.settings.node), &body);
            self.send(hub, msg);
            self.labels_sent = true;
        }
        self.report_status(hub);
        self.handle_pods(hub);
    }

    fn on_tick(&mut self, hub: &Hub) {
        if !self.connected || !self.registered {
            return;
        }
        // A report went out moments ago (right after registering): its answer has had no time
        // to come, and another report now would be a duplicate.
        if self.last_report.is_some_and(|at| at.elapsed() < self.settings.period / 2) {
            return;
        }
        if self.status_reply.take().is_some() {
            self.missed_answers += 1;
            if self.missed_answers >= MISSED_ANSWERS_BEFORE_REREGISTERING {
                log::warn!(
                    "node: {} status updates in a row drew no answer; node {} seems gone from \
                     the cloud, registering it again",
                    self.missed_answers,
                    self.settings.node
                );
                self.registered = false;
                self.missed_answers = 0;
                self.backoff = self.settings.period;
                self.register(hub);
                return;
            }
        }
        self.report_status(hub);
        self.handle_pods(hub);
    }

    /// One `NodeStatusRequest` update (edge-node §1.3), awaited as a request.
    fn report_status(&mut self, hub: &Hub) {
        let now = node_status::now_secs();
        let problem = state_dir_problem(&self.settings.state_dir);
        let healthy = problem.is_none();
        let since = match self.ready {
            Some((was, since)) if was == healthy => since,
            _ => now,
        };
        self.ready = Some((healthy, since));
        let condition = ready_condition(problem.as_deref(), now, since);
        let body = status_request(
            &self.settings,
            &self.uid,
            &self.facts(),
            self.internal_ip(hub),
            condition,
        );
        let msg = self.message("update", &format!("nodestatus/{}", self.settings.node), &body);
        self.status_reply = self.request(hub, msg);
        self.last_report = Some(Instant::now());
    }

    /// Pods bound to this node: each is reported `Failed` once (it would sit `Pending` for ever),
    /// and one being deleted gets its deletion confirmed (edge-node §1.8) so it does not stay
    /// `Terminating`.
    fn handle_pods(&mut self, hub: &Hub) {
        let Some(meta) = &self.meta else { return };
        let pods = meta.list("pod", MAX_PODS);
        for pod in pods {
            let Ok(object) = serde_json::from_str::<Value>(pod.content.get()) else { continue };
            let text = |path: &str| object.pointer(path).and_then(Value::as_str).unwrap_or("");
            let (namespace, name, uid) =
                (text("/metadata/namespace"), text("/metadata/name"), text("/metadata/uid"));
            if name.is_empty() || uid.is_empty() {
                continue;
            }
            let namespace = if namespace.is_empty() { "default" } else { namespace };
            if object.pointer("/metadata/deletionTimestamp").is_some_and(|t| !t.is_null()) {
                if remember(&mut self.pods_deleted, uid) {
                    log::info!("node: confirming deletion of pod {namespace}/{name}");
                    let msg = edged_message(
                        "delete",
                        &format!("{namespace}/pod/{name}"),
                        text_content(uid),
                    );
                    self.send(hub, Some(msg));
                }
            } else if remember(&mut self.pods_failed, uid) {
                log::info!(
                    "node: pod {namespace}/{name} was bound to this node, which runs no \
                     containers; reporting it Failed"
                );
                let body =
                    pod_failed_status(&self.settings.node, name, uid, node_status::now_secs());
                if let Some(content) = raw(&body) {
                    let resource = format!("{namespace}/podstatus/{name}");
                    self.send(hub, Some(edged_message("update", &resource, content)));
                }
            }
        }
    }

    fn facts(&self) -> HostFacts {
        HostFacts::read_with_state_dir(Some(&self.settings.state_dir))
    }

    fn internal_ip(&self, hub: &Hub) -> Option<IpAddr> {
        self.settings.node_ip.or_else(|| hub.status().link_local_ip())
    }

    /// An edged message on `<ns>/<rest>`.
    fn message(&self, operation: &str, rest: &str, body: &Value) -> Option<Message> {
        let content = raw(body)?;
        Some(edged_message(operation, &format!("{}/{rest}", self.settings.namespace), content))
    }

    fn request(&mut self, hub: &Hub, msg: Option<Message>) -> Option<PendingReply> {
        match hub.request_async(msg?) {
            Ok(pending) => {
                self.refusing = false;
                Some(pending)
            }
            Err(e) => {
                self.refused(&e.to_string());
                None
            }
        }
    }

    fn send(&mut self, hub: &Hub, msg: Option<Message>) {
        let Some(msg) = msg else { return };
        match hub.send(msg) {
            Ok(()) => self.refusing = false,
            Err(rejected) => self.refused(&rejected.to_string()),
        }
    }

    fn refused(&mut self, why: &str) {
        if !self.refusing {
            log::warn!("node: could not queue a message for the cloud: {why}");
        }
        self.refusing = true;
    }
}

fn answer_rx(pending: &Option<PendingReply>) -> Receiver<Message> {
    pending.as_ref().map_or(never(), |p| p.receiver().clone())
}

/// Adds `uid` to `set`; false when it was there. A full set starts over.
fn remember(set: &mut HashSet<String>, uid: &str) -> bool {
    if set.contains(uid) {
        return false;
    }
    if set.len() >= MAX_REMEMBERED_PODS {
        set.clear();
    }
    set.insert(uid.to_owned())
}

fn edged_message(
    operation: &str,
    resource: &str,
    content: Box<serde_json::value::RawValue>,
) -> Message {
    Message::new(
        Route {
            source: EDGED.to_owned(),
            group: META.to_owned(),
            operation: operation.to_owned(),
            resource: resource.to_owned(),
            ..Route::default()
        },
        content,
    )
}

fn raw(body: &Value) -> Option<Box<serde_json::value::RawValue>> {
    match serde_json::value::to_raw_value(body) {
        Ok(content) => Some(content),
        Err(_) => {
            log::error!("bug: node: encode message body");
            None
        }
    }
}

/// Why the agent is not healthy, or `None`: the state directory must take a write.
fn state_dir_problem(state_dir: &std::path::Path) -> Option<String> {
    let probe = state_dir.join(".ready-probe");
    let written = std::fs::create_dir_all(state_dir).and_then(|()| std::fs::write(&probe, b"ok"));
    let _ = std::fs::remove_file(&probe);
    written.err().map(|e| format!("state directory {} is not writable: {e}", state_dir.display()))
}

/// The one condition reported (edge-node §1.3): `Ready`, `True` while healthy, else `False` with
/// a reason that names the problem.
pub fn ready_condition(problem: Option<&str>, now: i64, since: i64) -> Value {
    let (status, reason, message) = match problem {
        None => ("True", "EdgeReady", "edge is posting ready status"),
        Some(problem) => ("False", "StateDirNotWritable", problem),
    };
    json!({
        "type": "Ready",
        "status": status,
        "lastHeartbeatTime": node_status::rfc3339(now),
        "lastTransitionTime": node_status::rfc3339(since),
        "reason": reason,
        "message": message,
    })
}

/// The labels of the registration: KubeEdge's five, then the configured ones over them.
pub fn node_labels(settings: &Settings) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let arch = node_status::k8s_arch(std::env::consts::ARCH, cfg!(target_endian = "little"));
    labels.insert("kubernetes.io/arch".to_owned(), arch.to_owned());
    labels.insert("kubernetes.io/hostname".to_owned(), settings.node.clone());
    labels.insert("kubernetes.io/os".to_owned(), "linux".to_owned());
    // The edge-node informer selects on this one: without it a node gets nothing (§1.2).
    labels.insert("node-role.kubernetes.io/edge".to_owned(), String::new());
    labels.insert("node-role.kubernetes.io/agent".to_owned(), String::new());
    labels.extend(settings.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

/// `capacity` and `allocatable` (edge-node §1.2): cpu, memory in Mi (allocatable 100 Mi less),
/// ephemeral storage of the state directory's filesystem in Ki (allocatable 1 Gi less), pods.
pub fn resources(settings: &Settings, facts: &HostFacts) -> (Value, Value) {
    let memory_mib = facts.memory_kib / 1024;
    let pods = settings.pods_capacity.to_string();
    let mut capacity = json!({
        "cpu": facts.cpus.to_string(),
        "memory": format!("{memory_mib}Mi"),
        "pods": pods,
    });
    let mut allocatable = json!({
        "cpu": facts.cpus.to_string(),
        "memory": format!("{}Mi", memory_mib.saturating_sub(RESERVED_MEMORY_MIB)),
        "pods": pods,
    });
    if let Some((total, _)) = facts.state_dir_kib {
        capacity["ephemeral-storage"] = json!(format!("{total}Ki"));
        allocatable["ephemeral-storage"] =
            json!(format!("{}Ki", total.saturating_sub(RESERVED_EPHEMERAL_KIB)));
    }
    (capacity, allocatable)
}

/// `addresses`: `InternalIP` when known, then `Hostname`.
pub fn addresses(node: &str, internal_ip: Option<IpAddr>) -> Value {
    let mut list = Vec::new();
    if let Some(ip) = internal_ip {
        list.push(json!({"type": "InternalIP", "address": ip.to_string()}));
    }
    list.push(json!({"type": "Hostname", "address": node}));
    Value::Array(list)
}

/// `nodeInfo` (edge-node §1.2). No container runtime: its version is empty.
pub fn node_info(facts: &HostFacts) -> Value {
    json!({
        "machineID": facts.machine_id,
        "systemUUID": system_uuid(),
        "bootID": facts.boot_id,
        "kernelVersion": facts.kernel_version,
        "osImage": facts.os_image,
        "containerRuntimeVersion": "",
        "kubeletVersion": KUBELET_VERSION,
        "kubeProxyVersion": "",
        "operatingSystem": "linux",
        "architecture": node_status::k8s_arch(std::env::consts::ARCH, cfg!(target_endian = "little")),
    })
}

/// The DMI product UUID where the host has one and it is readable (often root only), else "".
fn system_uuid() -> String {
    ["/sys/class/dmi/id/product_uuid", "/sys/devices/virtual/dmi/id/product_uuid"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.trim().to_lowercase())
        .unwrap_or_default()
}

/// The registration body: a `v1.Node` without `metadata.name` (the cloud takes it from the
/// resource), labels, annotations and taints as configured, status without conditions
/// (edge-node §1.2).
pub fn registration_body(settings: &Settings, facts: &HostFacts, ip: Option<IpAddr>) -> Value {
    let (capacity, allocatable) = resources(settings, facts);
    let mut metadata = Map::new();
    metadata.insert("creationTimestamp".to_owned(), Value::Null);
    metadata.insert("labels".to_owned(), json!(node_labels(settings)));
    if !settings.annotations.is_empty() {
        metadata.insert("annotations".to_owned(), json!(settings.annotations));
    }
    let mut spec = Map::new();
    if !settings.taints.is_empty() {
        spec.insert("taints".to_owned(), json!(settings.taints));
    }
    json!({
        "metadata": metadata,
        "spec": spec,
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "addresses": addresses(&settings.node, ip),
            "nodeInfo": node_info(facts),
        },
    })
}

/// The status update content: Go's `NodeStatusRequest` (no JSON tags, hence the capitals), plus
/// `HostState`, which the cloud's decoder ignores and a reader of the message finds useful.
pub fn status_request(
    settings: &Settings,
    uid: &str,
    facts: &HostFacts,
    ip: Option<IpAddr>,
    ready: Value,
) -> Value {
    let (capacity, allocatable) = resources(settings, facts);
    json!({
        "UID": uid,
        "Status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "phase": "Running",
            "conditions": [ready],
            "addresses": addresses(&settings.node, ip),
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": node_info(facts),
        },
        "ExtendResources": null,
        "HostState": node_status::host_state(facts),
    })
}

/// The label update of `<ns>/node/<node>` (edge-node §1.4): name and labels, a zero status, no
/// annotations.
pub fn label_update_body(settings: &Settings) -> Value {
    json!({
        "metadata": {
            "name": settings.node,
            "labels": node_labels(settings),
            "creationTimestamp": null,
        },
        "spec": {},
        "status": {
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": node_info(&HostFacts::default()),
        },
    })
}

/// A `PodStatusRequest` (`UID`, `Name`, `Status`) saying the pod failed because this node runs
/// no containers.
pub fn pod_failed_status(node: &str, name: &str, uid: &str, now: i64) -> Value {
    json!({
        "UID": uid,
        "Name": name,
        "Status": {
            "phase": "Failed",
            "reason": POD_FAILED_REASON,
            "message": format!("node {node} is an edgehub gateway: it runs no containers"),
            "conditions": [{
                "type": "Ready",
                "status": "False",
                "lastTransitionTime": node_status::rfc3339(now),
                "reason": POD_FAILED_REASON,
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            node: "edge-node-1".into(),
            namespace: "default".into(),
            period: Duration::from_secs(10),
            node_ip: None,
            pods_capacity: 0,
            taints: crate::config::default_taints(),
            labels: BTreeMap::from([("site".to_owned(), "north".to_owned())]),
            annotations: BTreeMap::new(),
            state_dir: PathBuf::from("/nonexistent"),
        }
    }

    #[test]
    fn registration_body_has_edgeds_shape() {
        let facts = HostFacts {
            cpus: 4,
            memory_kib: 4_000_000,
            state_dir_kib: Some((30_428_648, 1)),
            ..HostFacts::default()
        };
        let body = registration_body(&settings(), &facts, Some("192.168.1.20".parse().unwrap()));
        assert!(body["metadata"].get("name").is_none());
        assert_eq!(body["metadata"]["creationTimestamp"], Value::Null);
        assert!(body["metadata"].get("annotations").is_none(), "empty ones are omitted");
        let labels = &body["metadata"]["labels"];
        assert_eq!(labels["kubernetes.io/hostname"], "edge-node-1");
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert_eq!(labels["node-role.kubernetes.io/edge"], "");
        assert_eq!(labels["node-role.kubernetes.io/agent"], "");
        assert_eq!(labels["site"], "north");
        assert_eq!(
            body["spec"]["taints"],
            json!([{"key": "edgehub.io/no-containers", "value": "true", "effect": "NoSchedule"}])
        );
        let status = &body["status"];
        assert_eq!(status["capacity"]["pods"], "0");
        assert_eq!(status["capacity"]["memory"], "3906Mi");
        assert_eq!(status["allocatable"]["memory"], "3806Mi");
        assert_eq!(status["capacity"]["ephemeral-storage"], "30428648Ki");
        assert_eq!(status["allocatable"]["ephemeral-storage"], "29380072Ki");
        assert!(status.get("conditions").is_none());
        assert_eq!(
            status["addresses"],
            json!([{"type": "InternalIP", "address": "192.168.1.20"},
                   {"type": "Hostname", "address": "edge-node-1"}])
        );
        assert_eq!(status["nodeInfo"]["kubeletVersion"], KUBELET_VERSION);
        assert_eq!(status["nodeInfo"].as_object().unwrap().len(), 10);
    }

    #[test]
    fn ready_condition_names_the_problem() {
        let ok = ready_condition(None, 1_644_998_410, 1_644_998_280);
        assert_eq!(ok["status"], "True");
        assert_eq!(ok["reason"], "EdgeReady");
        assert_eq!(ok["lastTransitionTime"], "2022-02-16T07:58:00Z");
        assert_eq!(ok["lastHeartbeatTime"], "2022-02-16T08:00:10Z");
        let bad = ready_condition(Some("state directory /x is not writable"), 0, 0);
        assert_eq!(bad["status"], "False");
        assert_eq!(bad["reason"], "StateDirNotWritable");
        assert!(state_dir_problem(std::path::Path::new("/proc/edgehub-cannot-write")).is_some());
    }

    #[test]
    fn configured_labels_override_and_no_taints_means_no_key() {
        let mut s = settings();
        s.labels.insert("kubernetes.io/os".into(), "openwrt".into());
        s.taints.clear();
        let body = registration_body(&s, &HostFacts::default(), None);
        assert_eq!(body["metadata"]["labels"]["kubernetes.io/os"], "openwrt");
        assert_eq!(body["spec"], json!({}));
        assert_eq!(
            body["status"]["addresses"],
            json!([{"type": "Hostname", "address": "edge-node-1"}])
        );
    }
}
