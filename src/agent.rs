//! Assembles a running agent from a validated config and a list of modules: the outbox, the pending
//! requests, the module threads, the router, and the supervisor thread. Owns start and stop order:
//! stop ends the supervisor (which joins its session), whose router holds the only senders of the
//! module inboxes, so the modules then see their inbox disconnect and return; each is joined.
//! The certificate rotation thread (`eh-certs`, when `rotateCertificates` and `httpServer` are
//! set) starts last and is told to stop first; it asks the supervisor to reconnect over a channel.

use crate::certs;
use crate::config::Config;
use crate::error::{ErrorKind, Result};
use crate::modules::{Hub, Module, ModuleSpec};
use crate::outbox::{Limits, Outbox, SpoolOptions};
use crate::router::{bus_group, Pending, Redeliveries, Router};
use crate::session::Supervisor;
use crate::status::Status;
use crossbeam_channel::{bounded, Sender};
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

/// Keys `reload` applies live.
const RELOADABLE_KEYS: [&str; 8] = [
    "logLevel",
    "messageQPS",
    "messageBurst",
    "outboxMaxMessages",
    "outboxMaxBytes",
    "outboxFullPolicy",
    "messageTTL",
    "coalesceResources",
];
/// How long a stop waits for the outbox to reach the cloud.
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The supervisor only dials, waits and joins.
const SUPERVISOR_STACK_BYTES: usize = 128 << 10;

/// A running agent. Dropping it without [`Agent::stop`] stops it too.
pub struct Agent {
    config: Arc<Config>,
    hub: Hub,
    status: Arc<Status>,
    outbox: Arc<Outbox>,
    stop_tx: Option<Sender<()>>,
    supervisor: Option<JoinHandle<()>>,
    modules: Vec<Module>,
    rotation: Option<certs::Rotation>,
    /// Kept so the supervisor's `reconnect` channel stays connected even without rotation.
    _reconnect_tx: Sender<()>,
}

impl Agent {
    /// Starts the modules, then the supervisor, which connects and reconnects by itself.
    /// The config must already be validated.
    ///
    /// # Errors
    /// `Config` when two modules claim the same group or a group is not a bus group; `Io` when a
    /// thread cannot be spawned.
    pub fn start(config: Config, modules: Vec<ModuleSpec>) -> Result<Agent> {
        let config = Arc::new(config);
        let status = Arc::new(Status::default());
        let limits = outbox_limits(&config);
        let outbox = Arc::new(if config.outbox_spool {
            let spool = SpoolOptions {
                dir: config.state_dir.join("spool"),
                sync_interval: config.spool_sync_interval.0,
            };
            Outbox::open(limits, &spool)?
        } else {
            Outbox::new(limits)
        });
        let pending = Arc::new(Pending::default());
        let redeliveries = Arc::new(Redeliveries::default());
        let hub = Hub::new(outbox.clone(), pending.clone(), redeliveries.clone(), status.clone());

        // Check every registration before starting any thread, so a bad list starts nothing.
        let groups = group_table(&modules)?;
        let mut inboxes = Vec::new();
        let mut running = Vec::new();
        for spec in modules {
            let first_group = spec.groups.first().copied().unwrap_or("");
            match Module::spawn(spec, config.module_inbox_capacity, hub.clone()) {
                Ok((module, inbox_tx)) => {
                    log::info!("module {} started for groups {:?}", module.name, module.groups);
                    inboxes.push((module.name.clone(), first_group, inbox_tx));
                    running.push(module);
                }
                Err(e) => {
                    drop(inboxes); // the started modules see their inbox close and return
                    running.into_iter().for_each(Module::join);
                    return Err(e);
                }
            }
        }

        let router =
            Router::new(inboxes, groups, pending, redeliveries, outbox.clone(), status.clone())
                .with_inbox_capacity(config.module_inbox_capacity);
        // Capacity 1: reconnect requests coalesce (see `session`).
        let (reconnect_tx, reconnect_rx) = bounded::<()>(1);
        let supervisor = Supervisor {
            config: config.clone(),
            router,
            outbox: outbox.clone(),
            status: status.clone(),
            reconnect: reconnect_rx,
        };
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("eh-supervisor".to_owned())
            .stack_size(SUPERVISOR_STACK_BYTES)
            .spawn(move || supervisor.run(stop_rx))
            .map_err(|e| ErrorKind::Io.msg("spawn supervisor").src(e))?;
        let mut agent = Agent {
            config: config.clone(),
            hub,
            status,
            outbox,
            stop_tx: Some(stop_tx),
            supervisor: Some(thread),
            modules: running,
            rotation: None,
            _reconnect_tx: reconnect_tx.clone(),
        };
        if config.rotate_certificates && !config.http_server.is_empty() {
            // On failure `agent` is dropped, which stops and joins everything started above.
            agent.rotation = Some(certs::Rotation::spawn(config, reconnect_tx)?);
        }
        Ok(agent)
    }

    /// A handle for sending to the cloud from outside any module (tests, tools).
    pub fn hub(&self) -> Hub {
        self.hub.clone()
    }

    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Messages waiting to go up (queued or written but not yet confirmed by the cloud).
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The outbox's counters (refused, dropped, expired, coalesced...).
    pub fn outbox_counters(&self) -> &crate::outbox::OutboxCounters {
        &self.outbox.counters
    }

    /// Messages dropped because they outlived `messageTTL`.
    pub fn outbox_expired(&self) -> u32 {
        self.outbox.counters.expired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies what can change while running from a re-read, validated config (SIGHUP): the log
    /// level, the rate limit, the outbox bounds and policies. Returns the keys applied and the
    /// keys that changed but need a restart, for the log.
    pub fn reload(&mut self, new: &Config) -> (Vec<&'static str>, Vec<String>) {
        let old = &self.config;
        let mut applied = Vec::new();
        let mut restart = Vec::new();
        if new.log_level != old.log_level {
            log::set_max_level(new.log_level.to_filter());
            applied.push("logLevel");
        }
        let live = [
            ("messageQPS", new.message_qps != old.message_qps),
            ("messageBurst", new.message_burst != old.message_burst),
            ("outboxMaxMessages", new.outbox_max_messages != old.outbox_max_messages),
            ("outboxMaxBytes", new.outbox_max_bytes != old.outbox_max_bytes),
            ("outboxFullPolicy", new.outbox_full_policy != old.outbox_full_policy),
            ("messageTTL", new.message_ttl != old.message_ttl),
            ("coalesceResources", new.coalesce_resources != old.coalesce_resources),
        ];
        let mut outbox_changed = false;
        for (key, changed) in live {
            if changed {
                applied.push(key);
                outbox_changed = true;
            }
        }
        if outbox_changed {
            self.outbox.set_limits(outbox_limits(new));
        }
        let old_json = serde_json::to_value(&**old).unwrap_or_default();
        let new_json = serde_json::to_value(new).unwrap_or_default();
        if let (Some(old_map), Some(new_map)) = (old_json.as_object(), new_json.as_object()) {
            for (key, value) in new_map {
                if !RELOADABLE_KEYS.contains(&key.as_str()) && old_map.get(key) != Some(value) {
                    restart.push(key.clone());
                }
            }
        }
        // Remember what is now in force, so the next reload compares with it.
        let mut current = (*self.config).clone();
        current.log_level = new.log_level;
        current.message_qps = new.message_qps;
        current.message_burst = new.message_burst;
        current.outbox_max_messages = new.outbox_max_messages;
        current.outbox_max_bytes = new.outbox_max_bytes;
        current.outbox_full_policy = new.outbox_full_policy;
        current.message_ttl = new.message_ttl;
        current.coalesce_resources = new.coalesce_resources.clone();
        self.config = Arc::new(current);
        (applied, restart)
    }

    /// Blocks until the supervisor ends (only after [`Agent::stop`] from another handle, or a
    /// fatal fault); used by `edgehub run`.
    pub fn wait(mut self) {
        if let Some(thread) = self.supervisor.take() {
            if thread.join().is_err() {
                log::error!("bug: supervisor panicked");
            }
        }
        self.hub.cancel_requests();
        drop(self.rotation.take()); // stops and joins it
        self.stop_modules();
    }

    /// Stops cleanly: refuses new messages, gives the outbox up to `STOP_DRAIN` to reach the
    /// cloud (and be confirmed) if a session is up, then stops the session and the supervisor,
    /// the modules in reverse start order, and joins every thread. What is still queued stays
    /// in the spool for the next start.
    pub fn stop(mut self) {
        self.outbox.close();
        if self.status.is_connected() && !self.outbox.is_empty() {
            let deadline = std::time::Instant::now() + STOP_DRAIN;
            // Shutdown only: a short poll, bounded, rather than a signal nobody else needs.
            while !self.outbox.is_empty()
                && self.status.is_connected()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let left = self.outbox.len();
        self.shutdown();
        if left > 0 {
            if self.config.outbox_spool {
                log::info!("{left} message(s) not yet confirmed by the cloud stay in the spool");
            } else {
                log::warn!("{left} message(s) not sent are lost (outboxSpool is off)");
            }
        }
    }

    fn shutdown(&mut self) {
        // Requests waiting for the cloud (a local client's, say, with a 2-minute timeout) end
        // now with a clear error instead of holding the stop (issue 11, item 7).
        self.hub.cancel_requests();
        // Both stop at once: a rotation request in flight is cancelled, not waited for.
        if let Some(rotation) = self.rotation.as_mut() {
            rotation.signal_stop();
        }
        drop(self.stop_tx.take());
        if let Some(thread) = self.supervisor.take() {
            if thread.join().is_err() {
                log::error!("bug: supervisor panicked");
            }
        }
        drop(self.rotation.take()); // joins it
        self.stop_modules();
    }

    fn stop_modules(&mut self) {
        // The router (inside the supervisor) held the inbox senders; with it gone the modules end.
        while let Some(module) = self.modules.pop() {
            module.join();
        }
        self.outbox.flush();
    }
}

/// The outbox's bounds, rate and policies from the config.
fn outbox_limits(config: &Config) -> Limits {
    Limits {
        max_messages: config.outbox_max_messages,
        max_bytes: config.outbox_max_bytes,
        rate_per_sec: config.message_qps,
        burst: config.message_burst,
        full_policy: config.outbox_full_policy,
        ttl: Some(config.message_ttl.0).filter(|ttl| !ttl.is_zero()),
        coalesce: config.coalesce_resources.clone(),
    }
}

/// Bus group → index of the module that registered for it, refusing unknown groups and groups
/// claimed twice.
fn group_table(modules: &[ModuleSpec]) -> Result<HashMap<&'static str, usize>> {
    let mut groups: HashMap<&'static str, usize> = HashMap::new();
    for (index, spec) in modules.iter().enumerate() {
        for group in &spec.groups {
            if !bus_group::ALL.contains(group) {
                return Err(ErrorKind::Config.msg(format!(
                    "module {} registers for {group:?}, which is not one of {:?}",
                    spec.name,
                    bus_group::ALL
                )));
            }
            if let Some(&other) = groups.get(group) {
                return Err(ErrorKind::Config.msg(format!(
                    "modules {} and {} both register for group {group}",
                    modules[other].name, spec.name
                )));
            }
            groups.insert(group, index);
        }
    }
    Ok(groups)
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, groups: &[&'static str]) -> ModuleSpec {
        ModuleSpec::new(name, groups, |_| {})
    }

    #[test]
    fn group_table_refuses_unknown_and_doubly_claimed_groups() {
        let ok = group_table(&[spec("a", &["meta", "twin"]), spec("b", &[]), spec("c", &["bus"])])
            .unwrap();
        assert_eq!(ok["meta"], 0);
        assert_eq!(ok["bus"], 2);
        let e = group_table(&[spec("a", &["resource"])]).unwrap_err().to_string();
        assert!(e.contains("\"resource\""), "{e}");
        let e = group_table(&[spec("a", &["meta"]), spec("b", &["meta"])]).unwrap_err().to_string();
        assert!(e.contains("modules a and b both register for group meta"), "{e}");
    }
}
