//! The DeviceTwin rules of KubeEdge (edge-node §2.4–§2.7) as plain functions: a mapper's MQTT
//! publish or a cloud message in, a list of [`Effects`] out (store changes, MQTT publishes,
//! messages to the cloud), so every rule is testable without a socket or a disk. The quirks
//! mappers depend on are kept: values are never compared (every report is a write), a REST
//! write bumps the edge version so later cloud values are refused, deltas compare strings and
//! are re-published after every update while a difference remains. Where Go would crash (a
//! `null` twin in a Sync, a twin without metadata, a value without `value`) the entry is skipped
//! or read as empty instead.

use super::model::{
    parse_twin_update, validate_value, Device, DeviceMsg, MsgAttr, MsgTwin, TwinValue, TwinVersion,
    TypeMetadata, TYPE_DELETED, TYPE_STRING,
};
use super::topics::{self, Request};
use crate::logging::shown;
use crate::message::{group, new_uuid, operation, text_content, Message, Route};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

/// Every device the edge knows, by ID.
pub type Devices = BTreeMap<String, Device>;

/// `source` of every twin message to the cloud.
pub const SOURCE: &str = "twin";
/// Device states a mapper may report (REF's list plus HEAD's `unhealthy`, compared lower-case).
pub const STATES: [&str; 6] = ["online", "offline", "ok", "unknown", "disconnected", "unhealthy"];
/// Most twins one device keeps; a new key beyond it is refused (REST: 400) or skipped (Sync).
pub const MAX_TWINS_PER_DEVICE: usize = 1024;
pub const CODE_BAD_REQUEST: u16 = 400;
pub const CODE_NOT_FOUND: u16 = 404;
pub const CODE_INTERNAL: u16 = 500;

/// What the rules need to know about the agent.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The node name in `$hw/events/node/<node>/membership/…` answers and the detail request.
    pub node_name: String,
    /// Device topics carry 1 (v1.10-era mappers) or 2 (`<ns>/<name>`) ID segments.
    pub id_segments: u8,
}

/// One MQTT publish (the MQTT client's own type: plain data).
pub use crate::mqtt::Publish;

/// A change to the device store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChange {
    Put(Device),
    Remove(String),
}

/// What one input leads to. The caller applies `store` durably first, then publishes `publish`
/// in order, then sends `cloud` in order; if the store write fails it publishes only
/// `on_store_failure` (KubeEdge's 500 result) and sends nothing.
#[derive(Debug, Default)]
pub struct Effects {
    pub store: Vec<StoreChange>,
    pub publish: Vec<Publish>,
    pub cloud: Vec<Message>,
    pub on_store_failure: Vec<Publish>,
}

impl Effects {
    fn publish(&mut self, topic: String, payload: &impl Serialize) {
        // Cannot fail: plain structs of strings, integers and maps with string keys.
        let payload = serde_json::to_vec(payload).unwrap_or_default();
        self.publish.push(Publish { topic, payload });
    }
}

/// `{event_id, timestamp, code, reason}`, KubeEdge's error result.
#[derive(Serialize)]
struct ErrorResult<'a> {
    event_id: &'a str,
    timestamp: i64,
    code: u16,
    reason: &'a str,
}

fn error_publish(topic: String, event_id: &str, code: u16, reason: &str, now: i64) -> Publish {
    let body = ErrorResult { event_id, timestamp: now, code, reason };
    Publish { topic, payload: serde_json::to_vec(&body).unwrap_or_default() }
}

/// `{event_id, timestamp, twin}`: results, `get/result`, `edge_updated`.
#[derive(Serialize)]
struct TwinResult<'a, T: Serialize> {
    event_id: &'a str,
    timestamp: i64,
    twin: &'a BTreeMap<String, T>,
}

/// `{last, current}` of one twin in a document: both always emitted.
#[derive(Clone, Debug, Serialize)]
struct TwinDoc {
    last: Option<MsgTwin>,
    current: Option<MsgTwin>,
}

#[derive(Serialize)]
struct TwinDelta<'a> {
    event_id: &'a str,
    timestamp: i64,
    twin: &'a BTreeMap<String, MsgTwin>,
    delta: &'a BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deal {
    /// A mapper's `twin/update`.
    Rest,
    /// The cloud's `cloud_updated` and membership twins.
    Sync,
    /// A Sync delete (`metadata.type: deleted`): a missing version is allowed.
    SyncDelete,
}

/// What a run over a message's twins found (Go's `DealTwinResult`).
#[derive(Default)]
struct Run {
    /// REST only: the changed twins for `update/result` (`null`: deleted).
    result: BTreeMap<String, Option<MsgTwin>>,
    /// REST: the changes, with versions; Sync: the twins refused for a version conflict.
    sync: BTreeMap<String, MsgTwin>,
    document: BTreeMap<String, TwinDoc>,
    changed: bool,
}

// ---------------------------------------------------------------------------------------------
// Entry points

/// A mapper's publish on `topic`. Topics that are not twin requests give no effects.
pub fn on_mqtt(
    devices: &Devices,
    settings: &Settings,
    topic: &str,
    payload: &[u8],
    now: i64,
) -> Effects {
    match topics::parse(topic, settings.id_segments) {
        Some(Request::TwinUpdate(id)) => twin_update(devices, &id, payload, Deal::Rest, now),
        Some(Request::TwinCloudUpdated(id)) => twin_update(devices, &id, payload, Deal::Sync, now),
        Some(Request::TwinGet(id)) => twin_get(devices, &id, payload, now),
        Some(Request::StateUpdate(id)) => state_update(devices, &id, payload, now),
        Some(Request::MembershipGet) => membership_get(devices, settings, payload, now),
        None => Effects::default(),
    }
}

/// A cloud message in group `twin` (edge-node §2.1): membership, detail, `cloud_updated`, and
/// attribute updates. Responses and anything else give no effects.
pub fn on_cloud(devices: &Devices, settings: &Settings, msg: &Message, now: i64) -> Effects {
    if msg.is_response() {
        return Effects::default(); // "OK" to an edge_updated: nothing to do
    }
    let resource = msg.route.resource.as_str();
    let content = msg.content.get().as_bytes();
    // `cloud_updated` first: Go tests for "membership" anywhere first, so a device whose name
    // contains it would be taken for a membership message.
    if let Some(id) = cloud_updated_id(resource) {
        twin_update(devices, id, content, Deal::Sync, now)
    } else if resource.contains("membership/detail") {
        membership_detail(devices, &settings.node_name, content, now)
    } else if resource.contains("membership") && !resource.starts_with("device/") {
        membership_update(devices, &settings.node_name, content, now)
    } else if msg.route.operation.contains("updated") {
        match resource.strip_prefix("device/") {
            Some(id) if !id.is_empty() => attributes_update(devices, id, content, now),
            _ => Effects::default(),
        }
    } else {
        Effects::default()
    }
}

/// `device/<id>/twin/cloud_updated` → `<id>` (one or two segments).
fn cloud_updated_id(resource: &str) -> Option<&str> {
    let id = resource.strip_prefix("device/")?.strip_suffix("/twin/cloud_updated")?;
    (!id.is_empty()).then_some(id)
}

/// The `membership/detail` request sent on each transition to connected (edge-node §2.6): a
/// JSON string holding JSON, which no cloud answers.
pub fn membership_detail_request(node: &str, now: i64) -> Message {
    let body = serde_json::json!({
        "event_type": "group_membership_event",
        "event_id": new_uuid(),
        "group_id": node,
        "operation": "detail",
        "timestamp": now,
    });
    upstream("membership/detail".to_owned(), "get", text_content(&body.to_string()))
}

fn upstream(resource: String, op: &str, content: Box<RawValue>) -> Message {
    let route = Route {
        source: SOURCE.to_owned(),
        group: group::RESOURCE.to_owned(),
        operation: op.to_owned(),
        resource,
        ..Route::default()
    };
    Message::new(route, content)
}

// ---------------------------------------------------------------------------------------------
// Twin update (REST from a mapper, Sync from the cloud)

fn twin_update(devices: &Devices, id: &str, payload: &[u8], deal: Deal, now: i64) -> Effects {
    let mut effects = Effects::default();
    let update = match parse_twin_update(payload) {
        Ok(update) => update,
        Err(reason) => {
            // KubeEdge answers on the device-less topic with an empty event ID.
            let topic = topics::device_topic("", topics::UPDATE_RESULT);
            effects.publish.push(error_publish(topic, "", CODE_BAD_REQUEST, &reason, now));
            return effects;
        }
    };
    let result_topic = topics::device_topic(id, topics::UPDATE_RESULT);
    let Some(stored) = devices.get(id) else {
        let reason = "Update rejected due to the device is not existed";
        effects.publish.push(error_publish(
            result_topic,
            &update.event_id,
            CODE_NOT_FOUND,
            reason,
            now,
        ));
        return effects;
    };
    let mut device = stored.clone();
    let mut run = Run::default();
    for (key, twin) in update.twin.iter().flatten() {
        if let Err(reason) = deal_twin(&mut device, key, twin.as_ref(), deal, now, &mut run) {
            // Only REST fails; nothing of the message is kept.
            effects.publish.push(error_publish(
                result_topic,
                &update.event_id,
                CODE_BAD_REQUEST,
                &reason,
                now,
            ));
            return effects;
        }
    }
    if run.changed {
        effects.store.push(StoreChange::Put(device.clone()));
    }
    if deal == Deal::Rest {
        let reason = "Update device twin failed due to writing the device store";
        let failure =
            error_publish(result_topic.clone(), &update.event_id, CODE_INTERNAL, reason, now);
        effects.on_store_failure.push(failure);
        let twin: BTreeMap<String, Option<MsgTwin>> = run
            .result
            .iter()
            .filter(|(_, t)| !t.as_ref().is_some_and(MsgTwin::is_deleted))
            .map(|(k, t)| (k.clone(), t.as_ref().map(MsgTwin::without_versions)))
            .collect();
        let body = TwinResult { event_id: &update.event_id, timestamp: now, twin: &twin };
        effects.publish(result_topic, &body);
    }
    finish_run(&mut effects, &device, &update.event_id, &run, now);
    effects
}

/// Steps 2–4 of edge-node §2.4: document, delta, `edge_updated`.
fn finish_run(effects: &mut Effects, device: &Device, event_id: &str, run: &Run, now: i64) {
    if !run.document.is_empty() {
        let body = TwinResult { event_id, timestamp: now, twin: &run.document };
        effects.publish(topics::device_topic(&device.id, topics::UPDATE_DOCUMENT), &body);
    }
    if let Some(delta) = delta_publish(device, now) {
        effects.publish.push(delta);
    }
    if !run.sync.is_empty() {
        effects.cloud.push(edge_updated(device, &run.sync, now));
    }
}

/// `update/delta` over all the device's twins (Go's `BuildDeviceTwinDelta`), if any differ.
pub fn delta_publish(device: &Device, now: i64) -> Option<Publish> {
    let mut twin = BTreeMap::new();
    let mut delta = BTreeMap::new();
    for (key, t) in &device.twin {
        if t.is_deleted() {
            continue;
        }
        let Some(expected) = &t.expected else { continue };
        twin.insert(key.clone(), t.without_versions());
        let Some(want) = expected.value.as_deref().filter(|v| !v.is_empty()) else { continue };
        let have = t.actual.as_ref().and_then(|a| a.value.as_deref());
        if have != Some(want) {
            delta.insert(key.clone(), want.to_owned());
        }
    }
    if delta.is_empty() {
        return None;
    }
    let event_id = new_uuid();
    let body = TwinDelta { event_id: &event_id, timestamp: now, twin: &twin, delta: &delta };
    let payload = serde_json::to_vec(&body).unwrap_or_default();
    Some(Publish { topic: topics::device_topic(&device.id, topics::UPDATE_DELTA), payload })
}

/// `device/<id>/twin/edge_updated` (edge-node §2.6). Go sends only this run's twins; the outbox
/// keeps only the latest `edge_updated` per device while the cloud is away (latest wins), so
/// here every message also carries the edge's whole reported view of the device (each twin's
/// `actual`, and an `expected` a mapper wrote), with this run's twins on top: the latest message
/// alone then says everything, and coalescing loses no twin.
pub fn edge_updated(device: &Device, run_twins: &BTreeMap<String, MsgTwin>, now: i64) -> Message {
    let mut twin = reported_view(device);
    for (key, t) in run_twins {
        twin.insert(key.clone(), t.clone());
    }
    let event_id = new_uuid();
    let body = TwinResult { event_id: &event_id, timestamp: now, twin: &twin };
    let text = serde_json::to_string(&body).unwrap_or_default();
    let content = RawValue::from_string(text).unwrap_or_else(|_| text_content(""));
    upstream(format!("device/{}/twin/edge_updated", device.id), operation::UPDATE, content)
}

/// What the edge reports about each non-deleted twin: its `actual`, and an `expected` that a
/// mapper wrote (edge version above 0), with their versions.
fn reported_view(device: &Device) -> BTreeMap<String, MsgTwin> {
    let mut view = BTreeMap::new();
    for (key, t) in &device.twin {
        if t.is_deleted() {
            continue;
        }
        let mut entry =
            MsgTwin { optional: t.optional, metadata: t.metadata.clone(), ..MsgTwin::default() };
        if t.actual.is_some() {
            entry.actual = t.actual.clone();
            entry.actual_version = t.actual_version;
        }
        if t.expected_version.is_some_and(|v| v.edge > 0) {
            entry.expected = t.expected.clone();
            entry.expected_version = t.expected_version;
        }
        if entry.actual.is_some() || entry.expected.is_some() {
            view.insert(key.clone(), entry);
        }
    }
    view
}

fn deal_twin(
    device: &mut Device,
    key: &str,
    msg: Option<&MsgTwin>,
    deal: Deal,
    now: i64,
    run: &mut Run,
) -> Result<(), String> {
    let Some(stored) = device.twin.get_mut(key) else {
        return add_twin(device, key, msg, deal, now, run);
    };
    match (deal, msg) {
        (Deal::Rest, None) => {
            delete_twin(stored, key, None, Deal::Rest, run);
            Ok(())
        }
        (_, Some(m)) if deal != Deal::Rest && m.is_deleted() => {
            delete_twin(stored, key, Some(m), Deal::SyncDelete, run);
            Ok(())
        }
        (_, Some(m)) => compare_twin(stored, key, m, deal, now, run),
        (_, None) => Ok(()), // a null twin in a Sync: Go crashes here; we skip it
    }
}

/// Go's `dealVersion`.
fn deal_version(
    version: &mut TwinVersion,
    request: Option<TwinVersion>,
    deal: Deal,
) -> Result<(), String> {
    if deal == Deal::Rest {
        version.edge += 1;
        return Ok(());
    }
    let Some(request) = request else {
        if deal == Deal::SyncDelete {
            return Ok(());
        }
        return Err("Version not allowed be nil while syncing".to_owned());
    };
    if version.cloud > request.cloud {
        return Err("Version not allowed".to_owned());
    }
    if version.edge > request.edge {
        return Err("Not allowed to sync due to version conflict".to_owned());
    }
    *version = request;
    Ok(())
}

#[derive(Clone, Copy)]
enum Side {
    Expected,
    Actual,
}

fn value_of(twin: &MsgTwin, side: Side) -> &Option<TwinValue> {
    match side {
        Side::Expected => &twin.expected,
        Side::Actual => &twin.actual,
    }
}

fn version_of(twin: &MsgTwin, side: Side) -> Option<TwinVersion> {
    match side {
        Side::Expected => twin.expected_version,
        Side::Actual => twin.actual_version,
    }
}

fn set_side(
    twin: &mut MsgTwin,
    side: Side,
    value: Option<TwinValue>,
    version: Option<TwinVersion>,
) {
    match side {
        Side::Expected => {
            twin.expected = value;
            twin.expected_version = version;
        }
        Side::Actual => {
            twin.actual = value;
            twin.actual_version = version;
        }
    }
}

fn deleted_metadata() -> Option<TypeMetadata> {
    Some(TypeMetadata { kind: TYPE_DELETED.to_owned() })
}

/// Go's `dealTwinDelete`: REST deletes only an optional twin; the row stays, typed `deleted`.
fn delete_twin(stored: &mut MsgTwin, key: &str, msg: Option<&MsgTwin>, deal: Deal, run: &mut Run) {
    if deal == Deal::Rest && !stored.optional.unwrap_or(true) {
        return;
    }
    if stored.is_deleted() {
        return;
    }
    let last = stored.without_versions();
    let mut changed = false;
    for side in [Side::Expected, Side::Actual] {
        let Some(mut version) = version_of(stored, side) else { continue };
        let request = msg.and_then(|m| version_of(m, side));
        if deal_version(&mut version, request, deal).is_err() {
            run.sync.insert(key.to_owned(), stored.clone());
            return;
        }
        set_side(stored, side, Some(TwinValue::default()), Some(version));
        stored.metadata = deleted_metadata();
        changed = true;
    }
    if changed {
        run.changed = true;
        run.document.insert(key.to_owned(), TwinDoc { last: Some(last), current: None });
        if deal == Deal::Rest {
            run.result.insert(key.to_owned(), None);
            run.sync.insert(key.to_owned(), stored.clone());
        }
    }
}

/// Go's `dealTwinCompare` for an existing twin.
fn compare_twin(
    stored: &mut MsgTwin,
    key: &str,
    msg: &MsgTwin,
    deal: Deal,
    now: i64,
    run: &mut Run,
) -> Result<(), String> {
    let last = (!stored.is_deleted()).then(|| stored.without_versions());
    let value_kind = if stored.is_deleted() {
        msg.metadata.as_ref().map_or(TYPE_STRING.to_owned(), |m| m.kind.clone())
    } else {
        stored.kind().to_owned()
    };
    let mut entry = MsgTwin::default();
    let mut changed = false;
    let mut sync_allowed = true;
    for side in [Side::Expected, Side::Actual] {
        if !sync_allowed {
            break;
        }
        let Some(incoming) = value_of(msg, side) else { continue };
        let new_value = incoming.value.clone();
        if value_of(stored, side).is_some() {
            // Quirk: the type is checked only when the twin already had this side.
            if let Err(reason) = validate_value(&value_kind, new_value.as_deref().unwrap_or("")) {
                if deal == Deal::Rest {
                    return Err(reason);
                }
                continue;
            }
        }
        let mut version = version_of(stored, side).unwrap_or_default();
        let request = if deal == Deal::Rest { None } else { version_of(msg, side) };
        match deal_version(&mut version, request, deal) {
            Err(_) => {
                // A refused Sync: the edge's value goes back up in edge_updated.
                set_side(
                    &mut entry,
                    side,
                    value_of(stored, side).clone(),
                    Some(version_of(stored, side).unwrap_or_default()),
                );
                entry.optional = stored.optional;
                entry.metadata = Some(stored.metadata.clone().unwrap_or_default());
                sync_allowed = false;
            }
            Ok(()) => {
                let value = TwinValue::stamped(new_value, now);
                set_side(stored, side, Some(value.clone()), Some(version));
                if deal == Deal::Rest {
                    set_side(&mut entry, side, Some(value), Some(version));
                    entry.optional = stored.optional;
                    entry.metadata = Some(stored.metadata.clone().unwrap_or_default());
                }
                changed = true;
            }
        }
    }
    if sync_allowed {
        if let Some(optional) = msg.optional {
            // `optional` only ever goes from true to false.
            if stored.optional != Some(optional) && stored.optional == Some(true) {
                stored.optional = Some(optional);
                entry.optional = Some(optional);
                changed = true;
            }
        }
        match &msg.metadata {
            Some(meta) if stored.metadata.as_ref() != Some(meta) => {
                if stored.is_deleted() {
                    stored.metadata = Some(meta.clone());
                    entry.metadata = Some(meta.clone());
                }
                changed = true; // Go counts this as a change (a DB write) even when nothing moves
            }
            Some(_) => {}
            None => {
                if stored.is_deleted() {
                    let meta = TypeMetadata { kind: TYPE_STRING.to_owned() };
                    stored.metadata = Some(meta.clone());
                    entry.metadata = Some(meta);
                    changed = true;
                }
            }
        }
    }
    if changed {
        run.changed = true;
        let current = Some(stored.without_versions());
        run.document.insert(key.to_owned(), TwinDoc { last, current });
        if deal == Deal::Rest {
            run.result.insert(key.to_owned(), Some(entry.without_versions()));
            run.sync.insert(key.to_owned(), entry);
        } else if !sync_allowed {
            run.sync.insert(key.to_owned(), entry);
        }
    } else if deal != Deal::Rest && !sync_allowed {
        run.sync.insert(key.to_owned(), entry);
    }
    Ok(())
}

/// Go's `dealTwinAdd` for a key the device does not have yet.
fn add_twin(
    device: &mut Device,
    key: &str,
    msg: Option<&MsgTwin>,
    deal: Deal,
    now: i64,
    run: &mut Run,
) -> Result<(), String> {
    let Some(msg) = msg else {
        return if deal == Deal::Rest {
            Err("The request body is wrong".to_owned())
        } else {
            Ok(())
        };
    };
    if device.twin.len() >= MAX_TWINS_PER_DEVICE {
        // Not in KubeEdge: a bound, so a mapper inventing keys cannot fill memory and disk.
        let reason = format!("the device has {MAX_TWINS_PER_DEVICE} twins, the most kept");
        return if deal == Deal::Rest { Err(reason) } else { Ok(()) };
    }
    let kind = msg.metadata.as_ref().map_or(TYPE_STRING.to_owned(), |m| m.kind.clone());
    let mut twin = MsgTwin::default();
    if deal != Deal::Rest && kind == TYPE_DELETED {
        twin.expected_version = msg.expected_version;
        twin.actual_version = msg.actual_version;
    }
    for side in [Side::Expected, Side::Actual] {
        let Some(incoming) = value_of(msg, side) else { continue };
        let mut version = TwinVersion::default();
        let request = if deal == Deal::Rest { None } else { version_of(msg, side) };
        if let Err(reason) = deal_version(&mut version, request, deal) {
            return if deal == Deal::Rest { Err(reason) } else { Ok(()) };
        }
        let value = incoming.value.clone().unwrap_or_default();
        if let Err(reason) = validate_value(&kind, &value) {
            // REST answers 400; Sync silently skips the twin.
            return if deal == Deal::Rest { Err(reason) } else { Ok(()) };
        }
        set_side(&mut twin, side, Some(TwinValue::stamped(Some(value), now)), Some(version));
    }
    twin.optional = Some(msg.optional.unwrap_or(true));
    twin.metadata = Some(TypeMetadata { kind });
    device.twin.insert(key.to_owned(), twin.clone());
    run.changed = true;
    let current = (!twin.is_deleted()).then(|| twin.without_versions());
    run.document.insert(key.to_owned(), TwinDoc { last: None, current });
    if deal == Deal::Rest {
        run.result.insert(key.to_owned(), Some(twin.without_versions()));
        run.sync.insert(key.to_owned(), twin);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// twin/get, state/update, membership/get

#[derive(Deserialize)]
struct EventOnly {
    #[serde(default)]
    event_id: String,
}

fn twin_get(devices: &Devices, id: &str, payload: &[u8], now: i64) -> Effects {
    let mut effects = Effects::default();
    let topic = topics::device_topic(id, topics::GET_RESULT);
    let request: EventOnly = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("Unmarshal twin info failed, err: {e}");
            effects.publish.push(error_publish(topic, "", CODE_BAD_REQUEST, &reason, now));
            return effects;
        }
    };
    let Some(device) = devices.get(id) else {
        let reason = format!("Device {id} not found while getting twin");
        effects.publish.push(error_publish(topic, &request.event_id, CODE_NOT_FOUND, &reason, now));
        return effects;
    };
    let twin: BTreeMap<String, MsgTwin> = device
        .twin
        .iter()
        .filter(|(_, t)| !t.is_deleted())
        .map(|(k, t)| (k.clone(), t.without_versions()))
        .collect();
    effects
        .publish(topic, &TwinResult { event_id: &request.event_id, timestamp: now, twin: &twin });
    effects
}

#[derive(Deserialize)]
struct StateReport {
    #[serde(default)]
    state: String,
}

#[derive(Serialize)]
struct StateResult<'a> {
    event_id: &'a str,
    timestamp: i64,
    device: DeviceState<'a>,
}

#[derive(Serialize)]
struct DeviceState<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    state: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    last_online: &'a str,
}

/// Go's `dealDeviceStateUpdate`: unknown devices, unknown states and unreadable payloads are
/// ignored (logged by the caller), as KubeEdge does: a state result has no error form.
fn state_update(devices: &Devices, id: &str, payload: &[u8], now: i64) -> Effects {
    let mut effects = Effects::default();
    let Ok(report) = serde_json::from_slice::<StateReport>(payload) else {
        log::warn!("twin: unreadable state/update payload for device {}; ignored", shown(id));
        return effects;
    };
    if !STATES.contains(&report.state.to_ascii_lowercase().as_str()) {
        log::warn!(
            "twin: device {} reported unknown state {:?}; ignored",
            shown(id),
            shown(&report.state)
        );
        return effects;
    }
    let Some(stored) = devices.get(id) else {
        log::warn!("twin: state/update for unknown device {}; ignored", shown(id));
        return effects;
    };
    let mut device = stored.clone();
    device.state = report.state;
    device.last_online = last_online_text(now);
    effects.store.push(StoreChange::Put(device.clone()));
    let event_id = new_uuid();
    let state =
        DeviceState { name: &device.name, state: &device.state, last_online: &device.last_online };
    let body = StateResult { event_id: &event_id, timestamp: now, device: state };
    let text = serde_json::to_string(&body).unwrap_or_default();
    effects.publish.push(Publish {
        topic: topics::device_topic(id, topics::STATE_RESULT),
        payload: text.clone().into_bytes(),
    });
    // Upstream the same payload as JSON text inside a JSON string (edge-node §2.6).
    effects.cloud.push(upstream(
        format!("device/{id}/state/update"),
        operation::UPDATE,
        text_content(&text),
    ));
    effects
}

/// REF's `last_online` layout `2006-01-02 15:04:05`, in UTC (the agent has no time zone data).
pub fn last_online_text(now_ms: i64) -> String {
    // `2006-01-02T15:04:05Z` → `2006-01-02 15:04:05`
    let text = crate::modules::node_status::rfc3339(now_ms.div_euclid(1000));
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

#[derive(Serialize)]
struct MembershipDetail<'a> {
    event_id: &'a str,
    timestamp: i64,
    devices: Vec<Device>,
}

/// `membership/get`: every device without its twins. An unreadable request is answered with an
/// empty event ID, as Go does.
fn membership_get(devices: &Devices, settings: &Settings, payload: &[u8], now: i64) -> Effects {
    let mut effects = Effects::default();
    let event_id =
        serde_json::from_slice::<EventOnly>(payload).map(|r| r.event_id).unwrap_or_default();
    let list = devices.values().map(|d| Device { twin: BTreeMap::new(), ..d.clone() }).collect();
    let body = MembershipDetail { event_id: &event_id, timestamp: now, devices: list };
    effects.publish(
        topics::membership_topic(&settings.node_name, topics::MEMBERSHIP_GET_RESULT),
        &body,
    );
    effects
}

// ---------------------------------------------------------------------------------------------
// Membership and attributes from the cloud

#[derive(Deserialize, Default)]
struct MembershipUpdate {
    #[serde(default)]
    added_devices: Option<Vec<DeviceMsg>>,
    #[serde(default)]
    removed_devices: Option<Vec<DeviceMsg>>,
}

#[derive(Serialize)]
struct MembershipUpdated<'a> {
    event_id: &'a str,
    timestamp: i64,
    added_devices: Option<Vec<DeviceMsg>>,
    removed_devices: Option<Vec<DeviceMsg>>,
}

fn membership_update(devices: &Devices, node: &str, content: &[u8], now: i64) -> Effects {
    let mut effects = Effects::default();
    let Some(update) =
        parse_or_warn::<MembershipUpdate>(content, "membership update from the cloud")
    else {
        return effects;
    };
    let mut working = devices.clone();
    for device in update.added_devices.into_iter().flatten() {
        add_device(&mut working, &mut effects, node, device, now);
    }
    for device in update.removed_devices.into_iter().flatten() {
        remove_device(&mut working, &mut effects, node, device, now);
    }
    effects
}

#[derive(Deserialize)]
struct Detail {
    #[serde(default)]
    devices: Option<Vec<DeviceMsg>>,
}

/// A detail result lists every device of the node: the listed are added, the others removed.
fn membership_detail(devices: &Devices, node: &str, content: &[u8], now: i64) -> Effects {
    let mut effects = Effects::default();
    let Some(detail) = parse_or_warn::<Detail>(content, "membership detail from the cloud") else {
        return effects;
    };
    let listed = detail.devices.unwrap_or_default();
    let mut working = devices.clone();
    let unlisted: Vec<DeviceMsg> = devices
        .values()
        .filter(|d| !listed.iter().any(|l| l.id == d.id))
        .map(device_msg_of)
        .collect();
    for device in listed {
        add_device(&mut working, &mut effects, node, device, now);
    }
    for device in unlisted {
        remove_device(&mut working, &mut effects, node, device, now);
    }
    effects
}

/// `content` read as a `T`, or `None` after a warning that the `what` was unreadable and ignored.
fn parse_or_warn<T: DeserializeOwned>(content: &[u8], what: impl std::fmt::Display) -> Option<T> {
    serde_json::from_slice(content)
        .map_err(|e| log::warn!("twin: unreadable {what}: {e}; ignored"))
        .ok()
}

/// A stored device in the membership message shape.
fn device_msg_of(d: &Device) -> DeviceMsg {
    DeviceMsg {
        id: d.id.clone(),
        name: d.name.clone(),
        description: d.description.clone(),
        state: d.state.clone(),
        last_online: d.last_online.clone(),
        attributes: (!d.attributes.is_empty())
            .then(|| d.attributes.iter().map(|(k, a)| (k.clone(), Some(a.clone()))).collect()),
        twin: (!d.twin.is_empty())
            .then(|| d.twin.iter().map(|(k, t)| (k.clone(), Some(t.clone()))).collect()),
    }
}

/// Go's `MarshalMembershipUpdate`: versions stripped, deleted twins `null`.
fn for_mappers(mut device: DeviceMsg) -> DeviceMsg {
    if let Some(twins) = &mut device.twin {
        for twin in twins.values_mut() {
            *twin = match twin.take() {
                Some(t) if t.is_deleted() => None,
                Some(t) => Some(t.without_versions()),
                None => None,
            };
        }
    }
    device
}

fn membership_updated(
    effects: &mut Effects,
    node: &str,
    added: Option<DeviceMsg>,
    removed: Option<DeviceMsg>,
    now: i64,
) {
    let event_id = new_uuid();
    let body = MembershipUpdated {
        event_id: &event_id,
        timestamp: now,
        added_devices: added.map(|d| vec![for_mappers(d)]),
        removed_devices: removed.map(|d| vec![for_mappers(d)]),
    };
    effects.publish(topics::membership_topic(node, topics::MEMBERSHIP_UPDATED), &body);
}

/// Go's `addDevice` (event ID blanked, twins as Sync, then attributes).
fn add_device(
    working: &mut Devices,
    effects: &mut Effects,
    node: &str,
    received: DeviceMsg,
    now: i64,
) {
    if received.id.is_empty() {
        log::warn!("twin: cloud added a device without an id; ignored");
        return;
    }
    let is_new = !working.contains_key(&received.id);
    let mut device = working.get(&received.id).cloned().unwrap_or_else(|| Device {
        id: received.id.clone(),
        name: received.name.clone(),
        description: received.description.clone(),
        state: received.state.clone(),
        last_online: received.last_online.clone(),
        ..Device::default()
    });
    let mut run = Run::default();
    for (key, twin) in received.twin.iter().flatten() {
        // Sync never fails as a whole: refused twins land in run.sync.
        let _ = deal_twin(&mut device, key, twin.as_ref(), Deal::Sync, now, &mut run);
    }
    let attrs_changed = !apply_attributes(&mut device, received.attributes.as_ref()).is_empty();
    if is_new || run.changed || attrs_changed {
        effects.store.push(StoreChange::Put(device.clone()));
    }
    finish_run(effects, &device, "", &run, now);
    working.insert(device.id.clone(), device);
    if is_new {
        membership_updated(effects, node, Some(received), None, now);
    }
}

fn remove_device(
    working: &mut Devices,
    effects: &mut Effects,
    node: &str,
    received: DeviceMsg,
    now: i64,
) {
    if working.remove(&received.id).is_none() {
        log::debug!("twin: cloud removed unknown device {:?}; nothing to do", received.id);
        return;
    }
    effects.store.push(StoreChange::Remove(received.id.clone()));
    membership_updated(effects, node, None, Some(received), now);
}

/// Applies attribute changes (`null`: delete) and returns what changed.
fn apply_attributes(
    device: &mut Device,
    attrs: Option<&BTreeMap<String, Option<MsgAttr>>>,
) -> BTreeMap<String, Option<MsgAttr>> {
    let mut changed = BTreeMap::new();
    for (key, attr) in attrs.into_iter().flatten() {
        match attr {
            None => {
                if device.attributes.remove(key).is_some() {
                    changed.insert(key.clone(), None);
                }
            }
            Some(attr) => {
                let mut attr = attr.clone();
                if attr.optional.is_none() {
                    attr.optional = Some(true);
                }
                if attr.metadata.is_none() {
                    attr.metadata = Some(TypeMetadata { kind: TYPE_STRING.to_owned() });
                }
                if device.attributes.get(key) != Some(&attr) {
                    device.attributes.insert(key.clone(), attr.clone());
                    changed.insert(key.clone(), Some(attr));
                }
            }
        }
    }
    changed
}

#[derive(Deserialize)]
struct AttributesUpdate {
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    attributes: Option<BTreeMap<String, Option<MsgAttr>>>,
}

#[derive(Serialize)]
struct AttributesUpdated<'a> {
    event_id: &'a str,
    timestamp: i64,
    attributes: &'a BTreeMap<String, Option<MsgAttr>>,
}

/// `device/<id>` `updated` (no cloud sends it, the edge takes it): `…/<id>/updated` when an
/// attribute changed.
fn attributes_update(devices: &Devices, id: &str, content: &[u8], now: i64) -> Effects {
    let mut effects = Effects::default();
    let Some(stored) = devices.get(id) else {
        log::warn!("twin: attribute update for unknown device {}; ignored", shown(id));
        return effects;
    };
    let Some(update) = parse_or_warn::<AttributesUpdate>(
        content,
        format_args!("attribute update for device {}", shown(id)),
    ) else {
        return effects;
    };
    let mut device = stored.clone();
    let changed = apply_attributes(&mut device, update.attributes.as_ref());
    if changed.is_empty() {
        return effects;
    }
    effects.store.push(StoreChange::Put(device));
    let body =
        AttributesUpdated { event_id: &update.event_id, timestamp: now, attributes: &changed };
    effects.publish(topics::device_topic(id, topics::ATTRIBUTES_UPDATED), &body);
    effects
}

/// Applies `change` to the in-memory map (after it is durable).
pub fn apply(devices: &mut Devices, change: &StoreChange) {
    match change {
        StoreChange::Put(device) => {
            devices.insert(device.id.clone(), device.clone());
        }
        StoreChange::Remove(id) => {
            devices.remove(id);
        }
    }
}

/// Desired values for one device from a newer cloud's Device object (edge-node §2.9), applied as
/// a Sync at the object's resourceVersion: a new device is created, each desired value becomes
/// the twin's `expected`, and a delta goes to the mapper.
pub fn desired_values(devices: &Devices, node: &str, device: DeviceMsg, now: i64) -> Effects {
    let mut effects = Effects::default();
    let mut working = devices.clone();
    add_device(&mut working, &mut effects, node, device, now);
    effects
}

/// Removes a device whose Device object was deleted.
pub fn device_deleted(devices: &Devices, node: &str, id: &str, now: i64) -> Effects {
    let mut effects = Effects::default();
    let mut working = devices.clone();
    let received = DeviceMsg { id: id.to_owned(), name: id.to_owned(), ..DeviceMsg::default() };
    remove_device(&mut working, &mut effects, node, received, now);
    effects
}
