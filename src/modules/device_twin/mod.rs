//! DeviceTwin (group `twin`): KubeEdge's device twin for mappers on the local MQTT broker
//! (edge-node §2). `model` holds the data model and validation, `topics` the MQTT topic names,
//! `rules` the twin rules as plain functions, `store` the durable device store and
//! `device_object` the newer cloud's Device objects; this file is the `eh-twin` thread that ties
//! them to the cloud, the broker and the local API.
//!
//! The thread takes, one at a time: cloud messages of group `twin` (also passed on to the local
//! API, so `edgehub subscribe twin` still sees them), mapper publishes from the MQTT client, and
//! the resource store's applied changes (Device objects; all of them passed on to the local API's
//! `meta` feed). For each it runs the rules, makes their store changes durable, and only then
//! publishes to MQTT and queues messages for the cloud. `edge_updated` goes through the outbox,
//! which keeps it across disconnects and keeps only the latest per device (`coalesceResources`
//! holds `/twin/edge_updated` by default); each one carries the device's whole reported view, so
//! the latest alone loses nothing. A `membership/detail` request goes up at every connect.

pub mod device_object;
pub mod model;
pub mod rules;
pub mod store;
pub mod topics;

#[cfg(test)]
mod rules_tests;

use crate::error::Result;
use crate::logging::shown;
use crate::message::{
    now_millis, Message, CLOUD_CONNECTED, CLOUD_DISCONNECTED, CONNECTION_RESOURCE,
};
use crate::modules::{Hub, ModuleContext, ModuleSpec};
use crate::mqtt::Publisher;
use crate::router::bus_group;
use crossbeam_channel::{never, select, Receiver, Sender, TrySendError};
use device_object::DeviceEvent;
use model::Device;
pub use rules::Publish;
use rules::{Devices, Effects, StoreChange};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use store::DeviceStore;

/// Name of the module (its thread is `eh-twin`).
pub const MODULE_NAME: &str = "twin";
/// Most mapper publishes committed together (one folder fsync, one fsync per touched device).
pub const MQTT_BATCH: usize = 64;

/// What the module needs from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub rules: rules::Settings,
}

/// The module's channels to its neighbours.
pub struct Links {
    /// Mapper publishes on the twin topics (`topics::subscriptions`), from the MQTT client.
    pub mqtt_in: Receiver<Publish>,
    /// The MQTT client's publish handle (never blocks; QoS, retain and the queue while the
    /// broker is away are the client's).
    pub mqtt_out: Publisher,
    /// The resource store's applied changes: Device objects are read from them.
    pub meta_in: Option<Receiver<Message>>,
    /// Where `meta_in` is passed on to (the local API's `meta` feed); never blocks.
    pub meta_out: Option<Sender<Message>>,
    /// Cloud messages of group `twin`, for local API subscribers; never blocks.
    pub local_out: Option<Sender<Message>>,
}

/// What the module counts; shown under `twin` in `edgehub status --json`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Devices in the store.
    pub devices: AtomicU32,
    pub mqtt_handled: AtomicU32,
    pub cloud_handled: AtomicU32,
    pub publishes_dropped: AtomicU32,
    pub local_dropped: AtomicU32,
    pub store_failures: AtomicU32,
    pub outbox_refused: AtomicU32,
}

/// A handle on the running module's counters.
#[derive(Clone, Debug)]
pub struct TwinHandle {
    counters: Arc<Counters>,
}

impl TwinHandle {
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counters as `edgehub status --json` shows them.
    pub fn stats_json(&self) -> serde_json::Value {
        let c = &self.counters;
        let get = |n: &AtomicU32| n.load(Ordering::Relaxed);
        serde_json::json!({
            "devices": get(&c.devices),
            "mqttHandled": get(&c.mqtt_handled),
            "cloudHandled": get(&c.cloud_handled),
            "publishesDropped": get(&c.publishes_dropped),
            "localDropped": get(&c.local_dropped),
            "storeFailures": get(&c.store_failures),
            "outboxRefused": get(&c.outbox_refused),
        })
    }
}

/// The twin module. The store is opened (and loaded) here, so a state dir the agent cannot use
/// fails the start instead of every later report.
///
/// # Errors
/// `Io` when `<stateDir>/twin` cannot be made or listed.
pub fn spec(settings: Settings, links: Links) -> Result<(ModuleSpec, TwinHandle)> {
    let (store, devices) = DeviceStore::open(&settings.state_dir)?;
    let counters = Arc::new(Counters::default());
    let handle = TwinHandle { counters: Arc::clone(&counters) };
    counters.devices.store(devices.len() as u32, Ordering::Relaxed);
    let status_handle = handle.clone();
    let spec = ModuleSpec::new(MODULE_NAME, &[bus_group::TWIN], move |ctx| {
        let _ = ctx.hub.status().twin.set(status_handle); // one twin module per agent
        let state = Twin {
            store,
            devices,
            settings: settings.rules,
            state_dir: settings.state_dir,
            connected: false,
            counters,
        };
        run(state, ctx, links);
    });
    Ok((spec, handle))
}

struct Twin {
    store: DeviceStore,
    devices: Devices,
    settings: rules::Settings,
    /// Where the resource store keeps Device objects (read by `catch_up`).
    state_dir: PathBuf,
    /// Last connection event seen: the detail request goes up on each transition to connected.
    connected: bool,
    counters: Arc<Counters>,
}

fn run(mut twin: Twin, ctx: ModuleContext, links: Links) {
    let Links { mqtt_in, mqtt_out, meta_in, meta_out, local_out } = links;
    twin.catch_up(&ctx.hub, &mqtt_out);
    let mut mqtt_in = mqtt_in;
    let mut meta_in = meta_in.unwrap_or_else(never);
    loop {
        select! {
            recv(ctx.inbox) -> msg => match msg {
                Ok(msg) => twin.on_inbox(&ctx.hub, &mqtt_out, local_out.as_ref(), msg),
                Err(_) => break, // the agent is stopping
            },
            recv(mqtt_in) -> publish => match publish {
                Ok(p) => twin.on_mqtt_batch(&ctx.hub, &mqtt_out, p, &mqtt_in),
                Err(_) => mqtt_in = never(), // the MQTT client stopped; the cloud side goes on
            },
            recv(meta_in) -> msg => match msg {
                Ok(msg) => twin.on_meta_change(&ctx.hub, &mqtt_out, meta_out.as_ref(), msg),
                Err(_) => meta_in = never(),
            },
        }
    }
    log::info!("twin: stopped with {} devices", twin.devices.len());
}

impl Counters {
    fn bump(counter: &AtomicU32) -> u32 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Twin {
    /// Applies the stored Device objects whose desired values the twin does not have yet: at
    /// start and at each connect.
    fn catch_up(&mut self, hub: &Hub, mqtt_out: &Publisher) {
        for msg in device_object::stored_objects(&self.state_dir) {
            let Some(Ok(DeviceEvent::Upsert(device))) =
                device_object::from_resource(&msg, &self.settings, &self.devices)
            else {
                continue;
            };
            if device_object::is_news(&self.devices, &device) {
                log::info!("twin: applying stored device object {:?}", shown(&device.id));
                let node = self.settings.node_name.clone();
                let effects = rules::desired_values(&self.devices, &node, device, now_millis());
                self.execute(hub, mqtt_out, effects);
            }
        }
    }

    fn on_inbox(
        &mut self,
        hub: &Hub,
        mqtt_out: &Publisher,
        local_out: Option<&Sender<Message>>,
        msg: Message,
    ) {
        if msg.route.resource == CONNECTION_RESOURCE {
            match msg.content_text().as_deref() {
                Some(CLOUD_CONNECTED) if !self.connected => {
                    self.connected = true;
                    // Also covers Device objects whose change event was dropped (a full queue).
                    self.catch_up(hub, mqtt_out);
                    let request =
                        rules::membership_detail_request(&self.settings.node_name, now_millis());
                    self.send_up(hub, request);
                }
                Some(CLOUD_DISCONNECTED) => self.connected = false,
                _ => {}
            }
            return;
        }
        Counters::bump(&self.counters.cloud_handled);
        if let Some(local) = local_out {
            forward(local, &msg, &self.counters.local_dropped, "local api twin events");
        }
        let effects = rules::on_cloud(&self.devices, &self.settings, &msg, now_millis());
        self.execute(hub, mqtt_out, effects);
    }

    fn on_meta_change(
        &mut self,
        hub: &Hub,
        mqtt_out: &Publisher,
        meta_out: Option<&Sender<Message>>,
        msg: Message,
    ) {
        let event = device_object::from_resource(&msg, &self.settings, &self.devices);
        if let Some(out) = meta_out {
            forward(out, &msg, &self.counters.local_dropped, "local api meta events");
        }
        let now = now_millis();
        let effects = match event {
            None => return,
            Some(Err(e)) => {
                log::warn!("twin: {e}; its desired values are not applied");
                return;
            }
            Some(Ok(DeviceEvent::Upsert(device))) => {
                rules::desired_values(&self.devices, &self.settings.node_name, device, now)
            }
            Some(Ok(DeviceEvent::Delete(id))) => {
                rules::device_deleted(&self.devices, &self.settings.node_name, &id, now)
            }
        };
        self.execute(hub, mqtt_out, effects);
    }

    /// Group commit of mapper publishes: `first` and whatever else waits (up to
    /// [`MQTT_BATCH`]) go through the rules one after another on the in-memory state, the devices
    /// they touched are written with one folder fsync, and only then are the answers published
    /// and the messages for the cloud queued, in order. If the write fails, every touched device
    /// is put back and each report that needed the write gets its failure answer instead.
    fn on_mqtt_batch(
        &mut self,
        hub: &Hub,
        mqtt_out: &Publisher,
        first: Publish,
        rx: &Receiver<Publish>,
    ) {
        let mut undo: BTreeMap<String, Option<Device>> = BTreeMap::new();
        let mut answers: Vec<(bool, Effects)> = Vec::new();
        let mut next = Some(first);
        while let Some(p) = next.take() {
            Counters::bump(&self.counters.mqtt_handled);
            let mut effects =
                rules::on_mqtt(&self.devices, &self.settings, &p.topic, &p.payload, now_millis());
            for change in &effects.store {
                let id = match change {
                    StoreChange::Put(device) => device.id.clone(),
                    StoreChange::Remove(id) => id.clone(),
                };
                let before = self.devices.get(&id).cloned();
                undo.entry(id).or_insert(before);
                rules::apply(&mut self.devices, change);
            }
            let wrote = !effects.store.is_empty();
            effects.store.clear();
            answers.push((wrote, effects));
            if answers.len() < MQTT_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let changes: Vec<StoreChange> = undo
            .keys()
            .map(|id| match self.devices.get(id) {
                Some(device) => StoreChange::Put(device.clone()),
                None => StoreChange::Remove(id.clone()),
            })
            .collect();
        if let Err(e) = self.store.write(&changes, &self.devices) {
            let n = Counters::bump(&self.counters.store_failures);
            log::error!("twin: {e}; keeping the previous state ({n} store failures since start)");
            for (id, before) in undo {
                match before {
                    Some(device) => self.devices.insert(id, device),
                    None => self.devices.remove(&id),
                };
            }
            for (wrote, effects) in answers {
                let publishes = if wrote { effects.on_store_failure } else { effects.publish };
                for p in publishes {
                    self.publish(mqtt_out, p);
                }
            }
            return;
        }
        self.counters.devices.store(self.devices.len() as u32, Ordering::Relaxed);
        for (_, effects) in answers {
            for p in effects.publish {
                self.publish(mqtt_out, p);
            }
            for msg in effects.cloud {
                self.send_up(hub, msg);
            }
        }
    }

    /// Store first, then MQTT, then the cloud (see [`Effects`]).
    fn execute(&mut self, hub: &Hub, mqtt_out: &Publisher, effects: Effects) {
        if let Err(e) = self.store.write(&effects.store, &self.devices) {
            let n = Counters::bump(&self.counters.store_failures);
            log::error!("twin: {e}; keeping the previous state ({n} store failures since start)");
            for p in effects.on_store_failure {
                self.publish(mqtt_out, p);
            }
            return;
        }
        for change in &effects.store {
            rules::apply(&mut self.devices, change);
        }
        self.counters.devices.store(self.devices.len() as u32, Ordering::Relaxed);
        for p in effects.publish {
            self.publish(mqtt_out, p);
        }
        for msg in effects.cloud {
            self.send_up(hub, msg);
        }
    }

    fn publish(&self, mqtt_out: &Publisher, p: Publish) {
        if let Err(e) = mqtt_out.publish(&p.topic, p.payload) {
            let n = Counters::bump(&self.counters.publishes_dropped);
            if n.is_power_of_two() {
                log::warn!("twin: publish {}: {e}; dropped ({n} since start)", shown(&p.topic));
            }
        }
    }

    fn send_up(&self, hub: &Hub, msg: Message) {
        if let Err(rejected) = hub.send(msg) {
            let n = Counters::bump(&self.counters.outbox_refused);
            log::warn!(
                "twin: outbox refused a message for the cloud: {rejected} ({n} since start)"
            );
        }
    }
}

/// Passes `msg` on without blocking; a full queue drops it (counted, logged at powers of two).
fn forward(tx: &Sender<Message>, msg: &Message, dropped: &AtomicU32, what: &str) {
    match tx.try_send(msg.clone()) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(_)) => {
            let n = Counters::bump(dropped);
            if n.is_power_of_two() {
                log::warn!("twin: {what} queue full; dropped {msg:?} ({n} since start)");
            }
        }
    }
}
