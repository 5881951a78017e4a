//! The daemon as an operator meets it, through the real `edgehub` binary: `edgehub status` and its
//! exit codes in each state, SIGTERM during a burst (nothing lost), SIGKILL mid-stream (the spool
//! delivers after the restart), SIGHUP (log level and rate change without a reconnect).
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::local_client::LocalClient;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::proxy::Proxy;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgehub");

/// An `edgehub run` process with its own config, state dir and local API socket.
struct Daemon {
    dir: TempDir,
    config: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn config(cloud: &Cloud, server: &str, extra: &str) -> Daemon {
        let dir = TempDir::new("daemon");
        let p = &cloud.paths;
        let config = dir.path().join("config.json");
        let json = format!(
            r#"{{"nodeName": "{NODE}", "heartbeat": 0.3, "reconnectJitter": 0,
                "websocket": {{"server": "{server}", "readDeadline": 1.2}},
                "tlsCaFile": "{}", "tlsCertFile": "{}", "tlsPrivateKeyFile": "{}",
                "stateDir": "state", "localApiSocket": "api.sock",
                "messageQPS": 100000, "messageBurst": 100000 {extra}}}"#,
            p.ca_cert.display(),
            p.client_cert.display(),
            p.client_key.display()
        );
        std::fs::write(&config, json).unwrap();
        Daemon { dir, config, child: None }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Starts the agent and waits until its local API answers.
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log()).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let socket = self.socket();
        wait_until("local api socket", || LocalClient::connect(&socket).is_ok());
    }

    fn client(&self) -> LocalClient {
        LocalClient::connect(&self.socket()).unwrap()
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([name, &pid]).status().unwrap().success());
    }

    /// Waits for the process to exit; returns its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        let mut status = None;
        wait_until("agent exit", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        status.and_then(|s| s.code())
    }

    fn status(&self, json: bool) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("status").arg("--socket").arg(self.socket());
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    }

    fn status_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.status(true).stdout).unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn send_numbered(client: &mut LocalClient, seq: u32) -> bool {
    let msg = numbered(seq).encode();
    let raw = serde_json::value::RawValue::from_string(msg.trim_end().to_owned()).unwrap();
    client.send(&raw).is_ok()
}

/// Collects numbered messages into `seen` until `done(seen)` (duplicates allowed).
fn collect_until(cloud: &Cloud, seen: &mut HashSet<u32>, done: impl Fn(&HashSet<u32>) -> bool) {
    while !done(seen) {
        let seq = cloud.wait_for("numbered message", |e| match e {
            SimEvent::Received { msg, .. } => seq_of(msg),
            _ => None,
        });
        seen.insert(seq);
    }
}

/// Collects numbered messages until every one of `expected` has arrived.
fn collect_all(cloud: &Cloud, expected: &HashSet<u32>) {
    collect_until(cloud, &mut HashSet::new(), |seen| expected.is_subset(seen));
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn status_answers_in_every_state_with_its_exit_code() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    proxy.refuse_new(true);
    let mut daemon = Daemon::config(&cloud, &proxy.addr().to_string(), "");

    // Not running.
    let out = daemon.status(false);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));

    // Running but not connected, then with a backlog.
    daemon.start();
    let out = daemon.status(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("not connected to"), "{}", text(&out));
    let mut client = daemon.client();
    for seq in 0..5 {
        assert!(send_numbered(&mut client, seq));
    }
    let status = daemon.status_json();
    assert_eq!(status["connected"], false);
    assert_eq!(status["outbox"]["messages"], 5);
    // The first dial may still be in flight: waited for, not expected by now (issue 11).
    wait_until("a failed dial counted", || {
        daemon.status_json()["dialAttempts"].as_u64().is_some_and(|n| n >= 1)
    });
    assert!(text(&daemon.status(false)).contains("outbox 5"));

    // Connected: exit 0, the backlog drains.
    proxy.refuse_new(false);
    cloud.wait_connected();
    collect_all(&cloud, &(0..5).collect());
    wait_until("status connected", || daemon.status(false).status.code() == Some(0));
    wait_until("outbox drained", || daemon.status_json()["outbox"]["messages"] == 0);
    let out = daemon.status(false);
    let line = text(&out);
    assert!(line.starts_with(&format!("connected to {}", proxy.addr())), "{line}");
    assert!(line.contains("outbox 0 · drops 0 · cert expires in"), "{line}");
    let status = daemon.status_json();
    assert!(status["lastKeepaliveSent"].as_u64().is_some());
    assert!(status["lastFrameReceived"].as_u64().is_some());
    // The client above and the asking status call; an earlier call's thread may still be
    // finishing, so this is waited for (issue 11).
    wait_until("two local clients", || daemon.status_json()["localClients"] == 2);
    drop(client);
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
}

#[test]
fn sigterm_during_a_burst_loses_nothing() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let mut daemon = Daemon::config(&cloud, &cloud.sim.addr().to_string(), "");
    daemon.start();
    cloud.wait_connected();
    let socket = daemon.socket();
    let sender = std::thread::spawn(move || {
        let mut client = LocalClient::connect(&socket).unwrap();
        let mut accepted = HashSet::new();
        for seq in 0..1_000_000 {
            if !send_numbered(&mut client, seq) {
                break; // "agent stopping", or the socket closed
            }
            accepted.insert(seq);
        }
        accepted
    });
    // Stop in the middle of the burst.
    let mut seen = HashSet::new();
    collect_until(&cloud, &mut seen, |seen| seen.len() >= 500);
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0), "clean stop exits 0");
    let accepted = sender.join().unwrap();
    assert!(accepted.len() >= 500);
    let log = daemon.log_text();
    assert!(log.contains("stopping") && log.contains("stopped"), "{log}");
    // Whatever was accepted but not confirmed is in the spool: a restart delivers it.
    daemon.start();
    collect_until(&cloud, &mut seen, |seen| accepted.is_subset(seen));
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
}

#[test]
fn sigkill_mid_stream_then_restart_delivers_the_spool() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    let mut daemon = Daemon::config(&cloud, &proxy.addr().to_string(), "");
    daemon.start();
    cloud.wait_connected();
    // Half of the stream gets out, then the link stalls and the rest piles up in the spool.
    let mut client = daemon.client();
    for seq in 0..100 {
        assert!(send_numbered(&mut client, seq));
    }
    collect_all(&cloud, &(0..100).collect());
    proxy.set_mode(support::proxy::Mode::Stall);
    for seq in 100..300 {
        assert!(send_numbered(&mut client, seq));
    }
    drop(client);
    daemon.child.as_mut().unwrap().kill().unwrap(); // SIGKILL: no chance to clean up
    daemon.child.as_mut().unwrap().wait().unwrap();
    daemon.child = None;
    proxy.cut_all();
    proxy.set_mode(support::proxy::Mode::Pass);
    daemon.start();
    collect_all(&cloud, &(100..300).collect());
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
}

#[test]
fn sighup_changes_log_level_and_rate_without_a_reconnect() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let mut daemon =
        Daemon::config(&cloud, &cloud.sim.addr().to_string(), r#", "logLevel": "info""#);
    daemon.start();
    cloud.wait_connected();
    let mut client = daemon.client();
    assert!(send_numbered(&mut client, 1));
    collect_all(&cloud, &[1].into());
    assert!(!daemon.log_text().contains("to cloud:"), "no per-message lines at info");

    // Same file, debug level, another rate, and a key that needs a restart.
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    let changed = config
        .replace(r#""logLevel": "info""#, r#""logLevel": "debug""#)
        .replace(r#""messageQPS": 100000"#, r#""messageQPS": 5000"#)
        .replace(r#""heartbeat": 0.3"#, r#""heartbeat": 0.4"#);
    std::fs::write(&daemon.config, changed).unwrap();
    daemon.signal("-HUP");
    // The logger writes a line in several pieces: wait for its last words.
    wait_until("reload logged", || daemon.log_text().contains("need a restart: heartbeat\n"));
    let log = daemon.log_text();
    assert!(log.contains("applied logLevel, messageQPS"), "{log}");
    assert!(log.contains("need a restart: heartbeat"), "{log}");

    assert!(send_numbered(&mut client, 2));
    collect_all(&cloud, &[2].into());
    wait_until("debug line", || daemon.log_text().contains("to cloud:"));
    assert_eq!(daemon.status_json()["sessions"], 1, "no reconnect");

    // A broken file is refused and the agent keeps running.
    std::fs::write(&daemon.config, "{ not json").unwrap();
    daemon.signal("-HUP");
    wait_until("refusal logged", || {
        daemon
            .log_text()
            .lines()
            .any(|l| l.contains("reload refused") && l.contains("running configuration"))
    });
    assert_eq!(daemon.status(false).status.code(), Some(0));
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
}

/// Issue 11, item 7: a local request with `timeoutMs` 120000 that the cloud never answers made
/// the agent exit 119 s after SIGTERM. A stop cancels it at once, and the client is told why.
#[test]
fn sigterm_with_a_long_request_in_flight_stops_at_once_and_tells_the_client() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let mut daemon = Daemon::config(&cloud, &cloud.sim.addr().to_string(), "");
    daemon.start();
    cloud.wait_connected();
    let socket = daemon.socket();
    let requester = std::thread::spawn(move || {
        let mut client = LocalClient::connect(&socket).unwrap();
        // The simulator records it and never answers.
        let msg = numbered(7).encode();
        let raw = serde_json::value::RawValue::from_string(msg.trim_end().to_owned()).unwrap();
        client.request(&raw, Some(Duration::from_secs(120)))
    });
    wait_until("request in flight", || daemon.status_json()["requestsPending"] == 1);
    let started = std::time::Instant::now();
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0), "{}", daemon.log_text());
    eprintln!("stopped {:?} after SIGTERM with a 120 s request in flight", started.elapsed());
    let err = requester.join().unwrap().unwrap_err();
    assert_eq!(err.kind(), edgehub::ErrorKind::Stopped, "{err}");
    assert!(err.to_string().contains("the agent is stopping"), "{err}");
    // The node module may have a request of its own in flight too (seen under qemu).
    let log = daemon.log_text();
    assert!(log.contains("request(s) waiting for the cloud"), "{log}");
}

/// Issue 11, item 9: with every client slot held by idle connections, `edgehub status` printed
/// `Broken pipe` and exited 1 (read by a watchdog as "not connected"). It now exits 3, saying
/// the agent is busy; refusals are logged once per interval, not once per connection.
#[test]
fn status_says_busy_with_exit_3_when_every_client_slot_is_taken() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let mut daemon = Daemon::config(
        &cloud,
        &cloud.sim.addr().to_string(),
        r#", "localApiMaxClients": 2"#, // the default idle timeout (60 s) outlasts the test
    );
    daemon.start();
    cloud.wait_connected();
    // Two clients that say nothing more after one call (which proves each holds a slot). The
    // probe of `start` may hold a slot for a moment yet: a refused one is tried again.
    let mut holders = Vec::new();
    wait_until("two slots held", || {
        let mut client = daemon.client();
        if client.status().is_ok() {
            holders.push(client);
        }
        holders.len() == 2
    });
    for _ in 0..10 {
        let out = daemon.status(false);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "stdout {} stderr {stderr}", text(&out));
        assert!(stderr.contains("busy"), "{stderr}");
        assert!(!stderr.contains("Broken pipe"), "{stderr}");
    }
    drop(holders.pop());
    wait_until("a slot frees up", || daemon.status(false).status.code() == Some(0));
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
    let log = daemon.log_text();
    let refusal_lines = log.lines().filter(|l| l.contains("refused")).count();
    // One line per 10 s, and one at stop for the rest: 10 refusals make 2 lines unless the
    // machine is so slow that they take over 10 s.
    assert!(refusal_lines <= 3, "10 refusals, {refusal_lines} lines:\n{log}");
    assert!(log.contains("refused 1 client(s)"), "{log}");
}

/// Issue 11, item 9: an idle client (connected, not subscribed, sending nothing) is let go after
/// `localApiIdleTimeout` with a reason, so it cannot hold a slot; a subscriber waiting for
/// events is not idle.
#[test]
fn an_idle_client_is_disconnected_and_a_subscriber_is_not() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let mut daemon = Daemon::config(
        &cloud,
        &cloud.sim.addr().to_string(),
        r#", "localApiMaxClients": 4, "localApiIdleTimeout": 1"#,
    );
    daemon.start();
    cloud.wait_connected();
    let mut subscriber = daemon.client();
    subscriber.subscribe(&["twin".to_owned()]).unwrap();
    let mut quiet = daemon.client();
    quiet.status().unwrap();
    // The raw socket, to see exactly what the agent says before it closes.
    let idle = std::os::unix::net::UnixStream::connect(daemon.socket()).unwrap();
    let mut said = String::new();
    std::io::Read::read_to_string(&mut &idle, &mut said).unwrap(); // ends when the agent closes
    assert!(said.contains(r#""kind":"idle""#), "{said}");
    assert!(said.contains("localApiIdleTimeout"), "{said}");
    // The subscriber has been idle at least as long, and is still served.
    assert_eq!(subscriber.status().unwrap()["connected"], true);
    // `quiet` was let go too (only the subscriber and the asking client remain); LocalClient
    // reconnects and its next command is answered.
    wait_until("quiet let go", || daemon.status_json()["localClients"] == 2);
    assert_eq!(quiet.status().unwrap()["connected"], true);
    assert_eq!(daemon.status(false).status.code(), Some(0));
    drop(subscriber);
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
}

/// Issue 11, item 10: with umask 022 `stateDir` and `stateDir/spool` were 0755 and segments 0644,
/// readable by every local user while they hold every upstream message. They are 0700 and 0600
/// whatever the umask.
#[test]
fn the_state_dir_and_spool_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    proxy.refuse_new(true); // messages stay in the spool
    let mut daemon = Daemon::config(&cloud, &proxy.addr().to_string(), "");
    let log = std::fs::File::create(daemon.log()).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg(r#"umask 022; exec "$0" run --config "$1""#)
        .arg(BIN)
        .arg(&daemon.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    daemon.child = Some(child);
    let socket = daemon.socket();
    wait_until("local api socket", || LocalClient::connect(&socket).is_ok());
    let mut client = daemon.client();
    assert!(send_numbered(&mut client, 1));
    let state = daemon.dir.path().join("state");
    let spool = state.join("spool");
    let segments = || -> Vec<PathBuf> {
        std::fs::read_dir(&spool)
            .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    };
    wait_until("a spool segment", || !segments().is_empty());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "stateDir");
    assert_eq!(mode(&spool), 0o700, "spool");
    for segment in segments() {
        assert_eq!(mode(&segment), 0o600, "{}", segment.display());
    }
    drop(client);
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
}

/// Issue 11, item 8: a `msg_id` holding `\n… [ERROR] FORGED` produced a separate forged ERROR
/// line, and a 2 MB resource a 2 MB WARN line. Text from the cloud is escaped and cut in logs.
#[test]
fn text_from_the_cloud_cannot_forge_log_lines_or_make_huge_ones() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let mut daemon = Daemon::config(&cloud, &cloud.sim.addr().to_string(), "");
    daemon.start();
    cloud.wait_connected();
    let resource = "r".repeat(2 << 20);
    // A user message not from the router: dropped with a WARN line naming the message.
    let mut msg = cloud_msg("user", "someone", "publish", &resource, "");
    msg.header.id = "x\n2026-11-28T00:00:00Z [ERROR] FORGED\r\u{1b}[2K".to_owned();
    cloud.sim.push_raw(NODE, msg.encode().into_bytes(), false);
    wait_until("the drop logged", || daemon.log_text().contains("dropping message from cloud"));
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(), Some(0));
    let log = daemon.log_text();
    for line in log.lines() {
        assert!(line.len() < 4096, "a line of {} bytes: {}…", line.len(), &line[..200]);
        assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
        if line.contains("FORGED") {
            assert!(line.contains("dropping message from cloud"), "forged line: {line}");
        }
    }
    assert!(log.contains(&format!("…({} bytes)", resource.len())), "{log}");
}
