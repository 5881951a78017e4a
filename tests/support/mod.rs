//! Shared helpers for the integration tests: a per-test temp dir, throwaway certificates, a
//! running CloudHub simulator with a matching agent config (short heartbeats), modules that
//! capture what they receive, bounded waits on events, and a watchdog so a hang fails the test.
#![allow(dead_code)] // each test file uses a different subset

pub mod mosquitto;
pub mod proxy;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use edgehub::cloudsim::pki::{Pki, PkiPaths};
use edgehub::cloudsim::{CloudSim, SimConfig, SimEvent};
use edgehub::config::Seconds;
use edgehub::message::{Message, Route};
use edgehub::modules::ModuleSpec;
use edgehub::Config;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const NODE: &str = "gw-test";
pub const HEARTBEAT: Duration = Duration::from_millis(300);
pub const READ_DEADLINE: Duration = Duration::from_millis(1200);
/// Upper bound for anything a test waits for.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Fails the whole test binary if a test hangs, instead of stalling CI.
pub struct Watchdog(Option<Sender<()>>);

pub fn watchdog(limit: Duration) -> Watchdog {
    let (tx, rx) = crossbeam_channel::bounded::<()>(0);
    let name = std::thread::current().name().unwrap_or("test").to_owned();
    std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: test {name} still running after {limit:?}; aborting");
            std::process::exit(101);
        }
    });
    Watchdog(Some(tx))
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("edgehub-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A simulator with fresh certificates, and the files an agent needs to reach it.
pub struct Cloud {
    pub dir: TempDir,
    pub pki: Pki,
    pub paths: PkiPaths,
    pub sim: CloudSim,
    pub events: Receiver<SimEvent>,
}

impl Cloud {
    pub fn start() -> Cloud {
        Cloud::start_with(|_| {})
    }

    pub fn start_with(tune: impl FnOnce(&mut SimConfig)) -> Cloud {
        let dir = TempDir::new("cloud");
        let pki = Pki::generate(NODE).unwrap();
        let paths = pki.write_to(dir.path()).unwrap();
        let mut sim_config = SimConfig::new(
            pki.ca_cert_pem.clone(),
            pki.server_cert_pem.clone(),
            pki.server_key_pem.clone(),
        );
        tune(&mut sim_config);
        let sim = CloudSim::start(sim_config).unwrap();
        let events = sim.events();
        Cloud { dir, pki, paths, sim, events }
    }

    /// Stops the simulator (every connection dropped, whatever it had not read is lost, as when
    /// cloudcore restarts) and starts a fresh one on the same address. Returns the old
    /// simulator's event receiver, which still holds the events not read yet.
    pub fn restart(&mut self, tune: impl FnOnce(&mut SimConfig)) -> Receiver<SimEvent> {
        let addr = self.sim.addr();
        let config = |listen| {
            let mut c = SimConfig::new(
                self.pki.ca_cert_pem.clone(),
                self.pki.server_cert_pem.clone(),
                self.pki.server_key_pem.clone(),
            );
            c.listen = listen;
            c
        };
        // The port must be free before the new simulator binds it: park a throwaway one.
        let parked = CloudSim::start(config("127.0.0.1:0".parse().unwrap())).unwrap();
        std::mem::replace(&mut self.sim, parked).stop();
        let mut fresh = config(addr);
        tune(&mut fresh);
        let sim = CloudSim::start(fresh).unwrap_or_else(|e| panic!("restart on {addr}: {e}"));
        std::mem::replace(&mut self.sim, sim).stop();
        std::mem::replace(&mut self.events, self.sim.events())
    }

    /// An agent config for this cloud: short heartbeat and read deadline, no reconnect jitter.
    pub fn config(&self) -> Config {
        self.config_to(&self.sim.addr().to_string())
    }

    /// The same, dialling `server` (a proxy in front of the simulator, say).
    pub fn config_to(&self, server: &str) -> Config {
        let mut c = Config::from_json("{}").unwrap();
        c.node_name = NODE.to_owned();
        c.websocket.server = server.to_owned();
        c.tls_ca_file = self.paths.ca_cert.clone();
        c.tls_cert_file = self.paths.client_cert.clone();
        c.tls_private_key_file = self.paths.client_key.clone();
        c.state_dir = self.dir.path().join("state");
        c.heartbeat = Seconds(HEARTBEAT);
        c.websocket.read_deadline = Seconds(READ_DEADLINE);
        c.websocket.handshake_timeout = Seconds(Duration::from_secs(3));
        c.websocket.write_deadline = Seconds(Duration::from_secs(2));
        c.reconnect_jitter = Seconds(Duration::ZERO);
        c.message_qps = 100_000;
        c.message_burst = 100_000;
        c.validate().unwrap();
        c
    }

    /// Waits for the next event matching `want`, skipping others.
    pub fn wait_for<T>(&self, what: &str, want: impl FnMut(&SimEvent) -> Option<T>) -> T {
        wait_event(&self.events, what, want)
    }

    pub fn wait_connected(&self) {
        self.wait_for("connected", |e| matches!(e, SimEvent::Connected { .. }).then_some(()));
    }

    /// Waits for an upstream message matching `want`.
    pub fn wait_received(&self, what: &str, mut want: impl FnMut(&Message) -> bool) -> Message {
        self.wait_for(what, |e| match e {
            SimEvent::Received { msg, .. } if want(msg) => Some(msg.clone()),
            _ => None,
        })
    }
}

pub fn wait_event<T>(
    events: &Receiver<SimEvent>,
    what: &str,
    mut want: impl FnMut(&SimEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(event) => {
                if let Some(found) = want(&event) {
                    return found;
                }
            }
            Err(_) => panic!("no {what} within {PATIENCE:?}"),
        }
    }
}

/// Receives one message within `PATIENCE`, or panics naming `what`.
pub fn recv_within<T>(rx: &Receiver<T>, what: &str) -> T {
    rx.recv_timeout(PATIENCE).unwrap_or_else(|_| panic!("no {what} within {PATIENCE:?}"))
}

/// A module that forwards everything it receives to a channel, ACKing what needs it when `ack`.
pub fn capture_module(
    name: &str,
    groups: &[&'static str],
    ack: bool,
) -> (ModuleSpec, Receiver<Message>) {
    let (tx, rx) = unbounded();
    let spec = ModuleSpec::new(name, groups, move |ctx| {
        for msg in ctx.inbox.iter() {
            if ack {
                ctx.hub.ack(&msg);
            }
            let _ = tx.send(msg);
        }
    });
    (spec, rx)
}

/// Skips connection events; returns the next cloud message.
pub fn next_cloud_message(rx: &Receiver<Message>) -> Message {
    loop {
        let msg = recv_within(rx, "cloud message at module");
        if msg.route.resource != edgehub::message::CONNECTION_RESOURCE {
            return msg;
        }
    }
}

/// Waits for a connection event with the given content ("cloud_connected"/"cloud_disconnected").
pub fn wait_connection_event(rx: &Receiver<Message>, content: &str) {
    loop {
        let msg = recv_within(rx, content);
        if msg.route.resource == edgehub::message::CONNECTION_RESOURCE
            && msg.content_text().as_deref() == Some(content)
        {
            return;
        }
    }
}

/// A route from its four parts.
pub fn route(source: &str, group: &str, operation: &str, resource: &str) -> Route {
    Route {
        source: source.into(),
        group: group.into(),
        operation: operation.into(),
        resource: resource.into(),
        ..Route::default()
    }
}

pub fn cloud_msg(group: &str, source: &str, operation: &str, resource: &str, rv: &str) -> Message {
    let mut m = Message::new(
        route(source, group, operation, resource),
        edgehub::message::json_content(r#"{"metadata":{"name":"x"}}"#).unwrap(),
    );
    m.header.resource_version = rv.into();
    m
}

/// A message an edge module sends up, numbered so delivery can be checked exactly.
pub fn numbered(seq: u32) -> Message {
    Message::new(
        // Not a coalescing kind: every one counts.
        route("edged", "meta", "update", &format!("default/testdata/{NODE}")),
        edgehub::message::json_content(&format!(r#"{{"seq":{seq}}}"#)).unwrap(),
    )
}

/// The `seq` of a numbered message, if it is one.
pub fn seq_of(msg: &Message) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(msg.content.get()).ok()?;
    v.get("seq")?.as_u64().map(|s| s as u32)
}

/// Names of this process's threads that belong to the agent (`eh-*`).
pub fn agent_threads() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| n.starts_with("eh-"))
        .collect();
    names.sort();
    names
}

/// The agent's threads whose names `ours` accepts that are still listed after a stop joined them,
/// allowed a bounded moment to go: a joined thread leaves /proc/self/task just after join returns
/// (the kernel, or qemu's user-mode emulation in the armv7 run, clears its tid first). A thread
/// that was never joined is still there after that moment.
pub fn threads_left_after_stop(ours: impl Fn(&str) -> bool) -> Vec<String> {
    let left = || agent_threads().into_iter().filter(|t| ours(t)).collect::<Vec<_>>();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !left().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    left()
}

/// Waits for a condition the agent signals no event for (a counter, the outbox draining), checking
/// every 10 ms, up to `PATIENCE`.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// This process's resident memory, in KiB (0 if /proc cannot be read).
pub fn vm_rss_kib() -> u64 {
    rss_kib_in("/proc/self/status")
}

/// `VmRSS` of process `pid` in KiB (0 once it has gone).
pub fn rss_kib_of(pid: u32) -> u64 {
    rss_kib_in(&format!("/proc/{pid}/status"))
}

/// The `VmRSS` line of a `/proc/<pid>/status` file, in KiB (0 if it cannot be read).
fn rss_kib_in(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
