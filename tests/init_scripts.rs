//! The init integrations in `cross/` run the way a gateway runs them, against the real `edgehub`
//! binary and the simulator. The busybox/SysV script runs under `busybox sh` with busybox's applets
//! first on PATH (start, status, reload, restart, stop, respawn, a bounded log). The OpenWrt procd
//! script runs through stand-ins of rc.common, functions.sh, procd.sh and jshn.sh
//! (`tests/openwrt/`), with the test playing procd on the message it sends; the package Makefile
//! runs against stand-ins of the SDK's include files. `edgehub run` retries a join that fails at
//! start. The systemd unit passes `systemd-analyze verify`, and every shell script passes
//! shellcheck. Needs busybox, shellcheck and make (scripts/setup.sh installs them).
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::pki::{Pki, PkiPaths};
use edgehub::cloudsim::SimEvent;
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use support::*;

const EDGEHUB: &str = env!("CARGO_BIN_EXE_edgehub");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A program the tests need from the system, with what to do when it is missing.
fn required_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file()).unwrap_or_else(
        || panic!("{name} is not installed; it is needed by this test: apt-get install {name} (scripts/setup.sh does)"),
    )
}

/// A directory of busybox applet links, first on PATH, so scripts get busybox's own
/// start-stop-daemon, sed, sleep... as on a busybox system, not the host's.
struct Busybox {
    busybox: PathBuf,
    dir: TempDir,
}

impl Busybox {
    fn new() -> Busybox {
        let busybox = required_tool("busybox");
        let dir = TempDir::new("busybox");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let out = Command::new(&busybox).arg("--install").arg("-s").arg(&bin).output().unwrap();
        assert!(out.status.success(), "busybox --install: {}", text(&out));
        Busybox { busybox, dir }
    }

    /// Runs `busybox sh ARGS...` with `env` added.
    fn sh(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let path = std::env::var("PATH").unwrap_or_default();
        let mut cmd = Command::new(&self.busybox);
        cmd.arg("sh")
            .args(args)
            .env("PATH", format!("{}:{path}", self.dir.path().join("bin").display()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Under qemu-user (scripts/cross-test.sh) the agent's /proc/PID/cmdline names the emulator, so
/// these tests cannot find the agent's process; the script is the same shell on every
/// architecture and runs in the host suite.
fn emulated(test: &str) -> bool {
    match std::env::var("EDGEHUB_CROSS_TARGET") {
        Ok(target) => {
            eprintln!(
                "SKIPPED {test}: {target} runs under qemu-user, where /proc names the emulator, \
                 not the agent; this test runs in the host suite"
            );
            true
        }
        Err(_) => false,
    }
}

// ---- busybox / SysV: cross/busybox/S95edgehub -------------------------------------------------

struct SysV {
    bb: Busybox,
    /// Removed with the test's files when the test ends.
    _dir: TempDir,
    script: PathBuf,
    pidfile: PathBuf,
    agent_pidfile: PathBuf,
    log: PathBuf,
}

impl SysV {
    /// The script with its fixed paths (/etc/default, /var/run, /usr/bin, /bin/sh) moved into a
    /// test folder, the binary under test and busybox's sh; its settings in the defaults file, as
    /// an operator would write them, plus `extra` lines.
    fn new(config: &Path, extra: &str) -> SysV {
        let bb = Busybox::new();
        let dir = TempDir::new("sysv");
        let d = dir.path();
        std::fs::create_dir_all(d.join("run")).unwrap();
        let log = d.join("edgehub.log");
        std::fs::write(
            d.join("default"),
            format!(
                "CONFIG='{}'\nLOG='{}'\nSTOP_TIMEOUT=10\nRESPAWN_DELAY=1\n{extra}",
                config.display(),
                log.display()
            ),
        )
        .unwrap();
        let bin_dir = Path::new(EDGEHUB).parent().unwrap();
        let original = std::fs::read_to_string(format!("{ROOT}/cross/busybox/S95edgehub")).unwrap();
        for fixed in ["/etc/default/$DAEMON", "/var/run/$DAEMON", "/usr/bin/$DAEMON", "-x /bin/sh"]
        {
            assert!(original.contains(fixed), "{fixed}");
        }
        let script_text = original
            .replace("/etc/default/$DAEMON", path_str(&d.join("default")))
            .replace("/var/run/$DAEMON", &format!("{}/$DAEMON", d.join("run").display()))
            .replace("/usr/bin/$DAEMON", &format!("{}/$DAEMON", bin_dir.display()))
            .replace("-x /bin/sh", &format!("-x {}/bin/sh", bb.dir.path().display()));
        let script = d.join("S95edgehub");
        std::fs::write(&script, script_text).unwrap();
        let (pidfile, agent_pidfile) = (d.join("run/edgehub.pid"), d.join("run/edgehub.agent.pid"));
        SysV { bb, _dir: dir, script, pidfile, agent_pidfile, log }
    }

    fn run(&self, action: &str) -> Output {
        self.bb.sh(&[path_str(&self.script), action], &[])
    }

    /// The supervisor's pid (the pid file).
    fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(&self.pidfile).unwrap();
        text.trim().parse().unwrap_or_else(|_| panic!("pid file holds {text:?}"))
    }

    /// The agent's pid, as the supervisor records it.
    fn agent(&self) -> Option<u32> {
        std::fs::read_to_string(&self.agent_pidfile).ok().and_then(|t| t.trim().parse().ok())
    }

    fn log(&self) -> String {
        let old = std::fs::read_to_string(self.log.with_extension("log.1")).unwrap_or_default();
        old + &std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SysV {
    /// A failed assertion must not leave an agent or a supervisor running.
    fn drop(&mut self) {
        let supervisor = std::fs::read_to_string(&self.pidfile).unwrap_or_default();
        let supervisor = supervisor.trim();
        if !supervisor.is_empty() && supervisor != std::process::id().to_string() {
            let _ = Command::new("kill").args(["-9", supervisor]).status();
        }
        if let Some(agent) = self.agent() {
            let _ = Command::new("kill").args(["-9", &agent.to_string()]).status();
        }
    }
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Live `edgehub` processes whose command line mentions `needle` (a test's own folder).
fn agent_pids(needle: &Path) -> Vec<u32> {
    let needle = path_str(needle);
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().map(String::as_str) == Some(EDGEHUB)
            && args.iter().any(|a| a.contains(needle))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Gone, or a zombie nobody has reaped yet (it holds no resources and runs no code).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        }
    }
}

fn wait_disconnected(cloud: &Cloud) {
    cloud.wait_for("disconnect", |e| matches!(e, SimEvent::Disconnected { .. }).then_some(()));
}

#[test]
fn busybox_init_script_runs_the_agent_through_start_status_reload_restart_and_stop() {
    if emulated("busybox_init_script_runs_the_agent_through_start_status_reload_restart_and_stop") {
        return;
    }
    let _w = watchdog(Duration::from_secs(90));
    let cloud = Cloud::start();
    let work = TempDir::new("sysv-agent");
    let mut config = cloud.config();
    config.local_api_socket = work.path().join("eh.sock");
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let sysv = SysV::new(&config_path, "");

    // A pid file left by a power cut, naming a live process that is not ours (this test).
    std::fs::write(&sysv.pidfile, format!("{}\n", std::process::id())).unwrap();
    let out = sysv.run("status");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stdout(&out).contains("not running"), "{}", text(&out));

    let out = sysv.run("start");
    assert!(out.status.success(), "{}", text(&out));
    let supervisor = sysv.pid();
    assert_ne!(supervisor, std::process::id(), "the stale pid file was replaced");
    let agent = sysv.agent().unwrap();
    assert!(
        stdout(&out).contains(&format!("OK (pid {supervisor}, agent {agent})")),
        "{}",
        text(&out)
    );
    assert_eq!(parent_of(agent), Some(supervisor));
    cloud.wait_connected();
    assert_eq!(agent_pids(work.path()), vec![agent]);

    let out = sysv.run("status");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let running = format!("edgehub is running (pid {supervisor}, agent {agent})");
    assert!(stdout(&out).contains(&running), "{}", text(&out));

    let out = sysv.run("start");
    assert_eq!(out.status.code(), Some(1), "a second start is refused: {}", text(&out));
    assert!(stderr(&out).contains("already running"), "{}", text(&out));
    assert_eq!(sysv.pid(), supervisor, "the pid file still names the running supervisor");
    assert_eq!(agent_pids(work.path()), vec![agent], "still exactly one agent");

    // reload: SIGHUP, passed on to the same agent, which re-reads the file.
    let mut changed = config.clone();
    changed.log_level = edgehub::config::LogLevel::Debug;
    std::fs::write(&config_path, serde_json::to_string_pretty(&changed).unwrap()).unwrap();
    let out = sysv.run("reload");
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the agent logs the reload", || sysv.log().contains("reloaded"));
    assert_eq!(agent_pids(work.path()), vec![agent], "reload keeps the process");

    let out = sysv.run("restart");
    assert!(out.status.success(), "{}", text(&out));
    wait_disconnected(&cloud);
    cloud.wait_connected();
    let restarted = sysv.agent().unwrap();
    assert!(is_gone(agent) && is_gone(supervisor), "the first ended before the second started");
    assert_eq!(agent_pids(work.path()), vec![restarted]);

    let second_supervisor = sysv.pid();
    let out = sysv.run("stop");
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("OK"), "{}", text(&out));
    assert!(is_gone(restarted) && is_gone(second_supervisor), "stop returns once both are gone");
    assert!(!sysv.pidfile.exists() && !sysv.agent_pidfile.exists(), "no stale pid file");
    assert!(agent_pids(work.path()).is_empty());
    wait_disconnected(&cloud);

    let out = sysv.run("status");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let out = sysv.run("stop");
    assert!(out.status.success(), "stopping a stopped agent is not an error: {}", text(&out));
    assert!(stdout(&out).contains("not running"), "{}", text(&out));

    let log = sysv.log();
    assert!(log.contains("connected to"), "the agent's output reaches the log file:\n{log}");
    assert!(log.contains("applied logLevel"), "{log}");
    assert_eq!(
        log.matches("] stopped").count(),
        2,
        "both agents stopped cleanly on SIGTERM:\n{log}"
    );
    assert!(!log.contains("starting it again"), "no respawn on a requested stop:\n{log}");
}

#[test]
fn busybox_init_script_respawns_a_dead_agent_and_keeps_its_log_bounded() {
    if emulated("busybox_init_script_respawns_a_dead_agent_and_keeps_its_log_bounded") {
        return;
    }
    let _w = watchdog(Duration::from_secs(90));
    let cloud = Cloud::start();
    let work = TempDir::new("sysv-respawn");
    let mut config = cloud.config();
    config.local_api_socket = work.path().join("eh.sock");
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    // 1 KiB log files, and trace output (every frame) to fill them.
    let sysv = SysV::new(&config_path, "LOG_MAX_KB=1\nEDGEHUB_ARGS='-v -v'\n");

    let out = sysv.run("start");
    assert!(out.status.success(), "{}", text(&out));
    let supervisor = sysv.pid();
    let agent = sysv.agent().unwrap();
    cloud.wait_connected();

    // A crash: the supervisor starts the agent again, and stays the service's process.
    assert!(Command::new("kill").args(["-KILL", &agent.to_string()]).status().unwrap().success());
    wait_disconnected(&cloud);
    cloud.wait_connected();
    let again = sysv.agent().unwrap();
    assert_ne!(again, agent);
    assert_eq!(parent_of(again), Some(supervisor));
    assert_eq!(sysv.pid(), supervisor);
    let out = sysv.run("status");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // The log is rotated at 1 KiB: two files, each at most the limit plus one line.
    let old = sysv.log.with_extension("log.1");
    wait_until("the log is rotated", || old.exists());
    let bound = 1024 + 4096;
    for _ in 0..3 {
        let (now, before) = (std::fs::metadata(&sysv.log), std::fs::metadata(&old));
        assert!(now.map_or(0, |m| m.len()) <= bound, "{}", sysv.log.display());
        assert!(before.unwrap().len() <= bound);
        std::thread::sleep(Duration::from_millis(300)); // let it write more; check again
    }

    let out = sysv.run("stop");
    assert!(out.status.success(), "{}", text(&out));
    assert!(is_gone(again) && is_gone(supervisor));
}

#[test]
fn busybox_init_script_reports_an_agent_that_dies_right_after_start() {
    if emulated("busybox_init_script_reports_an_agent_that_dies_right_after_start") {
        return;
    }
    let _w = watchdog(Duration::from_secs(60));
    let work = TempDir::new("sysv-dies");
    // Passes check-config, but `run` exits at once: the certificate has expired and there is no
    // token to join again with.
    let pki = Pki::generate(NODE).unwrap();
    let (cert, key) = pki.issue_client(NODE, -10, -1).unwrap();
    let d = work.path();
    std::fs::write(d.join("ca.crt"), &pki.ca_cert_pem).unwrap();
    std::fs::write(d.join("edge.crt"), cert).unwrap();
    std::fs::write(d.join("edge.key"), key).unwrap();
    let config_path = d.join("config.json");
    let config = json!({
        "nodeName": NODE,
        "websocket": {"server": "127.0.0.1:1"},
        "tlsCaFile": d.join("ca.crt"),
        "tlsCertFile": d.join("edge.crt"),
        "tlsPrivateKeyFile": d.join("edge.key"),
        "stateDir": d.join("state"),
        "localApiSocket": d.join("eh.sock"),
    });
    std::fs::write(&config_path, config.to_string()).unwrap();
    let check = Command::new(EDGEHUB).arg("check-config").arg("-c").arg(&config_path).output();
    let check = check.unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let sysv = SysV::new(&config_path, "");
    let out = sysv.run("start");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stdout(&out).contains("FAIL (edgehub exited right after start"), "{}", text(&out));
    let out = sysv.run("stop");
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn busybox_init_script_refuses_a_bad_configuration_at_start() {
    let _w = watchdog(Duration::from_secs(30));
    let work = TempDir::new("sysv-bad");
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, r#"{"heartbeat": 40, "websocket": {"server": "127.0.0.1:1"}}"#)
        .unwrap();
    let sysv = SysV::new(&config_path, "");

    let out = sysv.run("start");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("edgehub not started"), "{}", text(&out));
    assert!(stderr(&out).contains("heartbeat"), "names the bad key: {}", text(&out));
    assert!(!sysv.pidfile.exists());
    assert!(agent_pids(work.path()).is_empty());
}

// ---- OpenWrt / procd: cross/openwrt/edgehub/files/edgehub.init ---------------------------------

const OPENWRT_INIT: &str = "cross/openwrt/edgehub/files/edgehub.init";

/// A router's file system in a folder: the UCI file, /var/etc, the syslog, and the messages the
/// init script sends procd. The script runs under `busybox sh` through the stand-ins in
/// `tests/openwrt/` (rc.common, functions.sh, procd.sh, jshn.sh).
struct OpenWrt {
    bb: Busybox,
    dir: TempDir,
    pki: PkiPaths,
}

impl OpenWrt {
    fn new() -> OpenWrt {
        let dir = TempDir::new("openwrt");
        std::fs::create_dir_all(dir.path().join("etc/config")).unwrap();
        let pki = Pki::generate(NODE).unwrap().write_to(&dir.path().join("pki")).unwrap();
        OpenWrt { bb: Busybox::new(), dir, pki }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("var/etc/edgehub.json")
    }

    fn syslog(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("syslog")).unwrap_or_default()
    }

    /// The "METHOD JSON" lines sent to procd so far.
    fn procd_messages(&self) -> Vec<(String, Value)> {
        let text = std::fs::read_to_string(self.dir.path().join("procd")).unwrap_or_default();
        text.lines()
            .map(|l| {
                let (method, json) = l.split_once(' ').unwrap();
                let value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
                (method.to_owned(), value)
            })
            .collect()
    }

    /// Writes /etc/config/edgehub: section main with these option lines (`option k 'v'`,
    /// `list k 'v'`), as `uci commit` would leave it.
    fn write_uci(&self, lines: &[String]) {
        let mut text = "config edgehub 'main'\n".to_owned();
        for line in lines {
            text.push_str(&format!("\t{line}\n"));
        }
        std::fs::write(self.dir.path().join("etc/config/edgehub"), text).unwrap();
    }

    /// `/etc/init.d/edgehub ACTION` (or any function of the script).
    fn rc(&self, action: &str) -> Output {
        let rc = format!("{ROOT}/tests/openwrt/rc.common");
        let init = format!("{ROOT}/{OPENWRT_INIT}");
        let uid = format!("{}", std::fs::metadata(self.dir.path()).unwrap().uid());
        let d = self.dir.path();
        let (uci, procd, syslog) = (d.join("etc/config"), d.join("procd"), d.join("syslog"));
        let conf = self.conf();
        self.bb.sh(
            &[&rc, &init, action],
            &[
                ("UCI_CONFIG_DIR", path_str(&uci)),
                ("PROCD_MESSAGES", path_str(&procd)),
                ("TEST_SYSLOG", path_str(&syslog)),
                ("TEST_PROG", EDGEHUB),
                ("TEST_CONF", path_str(&conf)),
                ("TEST_USER", &uid),
            ],
        )
    }

    /// Every option the UCI file knows, valid, with the test's certificates and folder.
    fn every_option(&self, server: &str) -> Vec<String> {
        let d = self.dir.path();
        let o = |k: &str, v: &str| format!("option {k} '{v}'");
        vec![
            o("enabled", "1"),
            o("server", server),
            o("node_name", NODE),
            o("project_id", "e632aba927ea4ac2b575ec1603d56f10"),
            o("heartbeat", "7.5"),
            o("ca_file", path_str(&self.pki.ca_cert)),
            o("cert_file", path_str(&self.pki.client_cert)),
            o("key_file", path_str(&self.pki.client_key)),
            // Everything a shell or JSON could trip on, in UCI's (and the shell's) quoting.
            r#"option token 'ab"c\d$e`f'\''g h/i'"#.to_owned(),
            o("token_file", path_str(&d.join("token"))),
            o("http_server", "https://127.0.0.1:10002"),
            o("rotate_certificates", "off"),
            o("join_retry_max", "30"),
            o("state_dir", path_str(&d.join("state"))),
            o("outbox_spool", "1"),
            o("spool_sync_interval", "0.5"),
            o("outbox_max_messages", "1000"),
            o("outbox_max_bytes", "1048576"),
            o("outbox_full_policy", "dropOldest"),
            o("message_ttl", "0"),
            o("message_qps", "30"),
            o("message_burst", "60"),
            o("node_status_update_frequency", "120"),
            o("reconnect_jitter", "2"),
            o("log_level", "debug"),
            o("log_target", "stderr"),
            o("local_api_socket", path_str(&d.join("run/eh.sock"))),
            o("local_api_idle_timeout", "30"),
            o("node_ip", "192.0.2.7"),
            o("pods_capacity", "0"),
            o("device_topic_id_segments", "2"),
            o("mqtt_server", "tcp://127.0.0.1:1883"),
            o("mqtt_qos", "1"),
            o("mqtt_username", "gw"),
            o("mqtt_password", "s3cret"),
            "list coalesce_resources '/nodestatus/'".to_owned(),
            "list coalesce_resources 'pod status'".to_owned(),
        ]
    }
}

#[test]
fn openwrt_every_uci_option_lists_included_becomes_json_that_check_config_accepts() {
    let _w = watchdog(Duration::from_secs(30));
    let wrt = OpenWrt::new();
    wrt.write_uci(&wrt.every_option("127.0.0.1:10000"));
    let out = wrt.rc("edgehub_json");
    assert!(out.status.success(), "{}", text(&out));
    let json: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let d = wrt.dir.path();
    assert_eq!(
        json,
        json!({
            "websocket": {"server": "127.0.0.1:10000"},
            "logTarget": "stderr",
            "nodeName": NODE,
            "projectID": "e632aba927ea4ac2b575ec1603d56f10",
            "heartbeat": 7.5,
            "tlsCaFile": path_str(&wrt.pki.ca_cert),
            "tlsCertFile": path_str(&wrt.pki.client_cert),
            "tlsPrivateKeyFile": path_str(&wrt.pki.client_key),
            "token": r#"ab"c\d$e`f'g h/i"#,
            "tokenFile": path_str(&d.join("token")),
            "httpServer": "https://127.0.0.1:10002",
            "rotateCertificates": false,
            "joinRetryMax": 30,
            "stateDir": path_str(&d.join("state")),
            "outboxSpool": true,
            "spoolSyncInterval": 0.5,
            "outboxMaxMessages": 1000,
            "outboxMaxBytes": 1048576,
            "outboxFullPolicy": "dropOldest",
            "messageTTL": 0,
            "messageQPS": 30,
            "messageBurst": 60,
            "nodeStatusUpdateFrequency": 120,
            "reconnectJitter": 2,
            "logLevel": "debug",
            "localApiSocket": path_str(&d.join("run/eh.sock")),
            "localApiIdleTimeout": 30,
            "nodeIP": "192.0.2.7",
            "podsCapacity": 0,
            "deviceTopicIdSegments": 2,
            "eventBus": {
                "mqttServerExternal": "tcp://127.0.0.1:1883",
                "mqttQOS": 1,
                "mqttUsername": "gw",
                "mqttPassword": "s3cret",
            },
            "coalesceResources": ["/nodestatus/", "pod status"],
        })
    );

    // The real agent reads it as meant: check-config prints the effective configuration.
    let file = d.join("edgehub.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let check = Command::new(EDGEHUB).arg("check-config").arg("-c").arg(&file).output().unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let effective: Value = serde_json::from_slice(&check.stdout).unwrap();
    for key in
        ["heartbeat", "outboxMaxBytes", "coalesceResources", "spoolSyncInterval", "logTarget"]
    {
        assert_eq!(effective[key], json[key], "{key}");
    }
    assert_eq!(effective["token"], json!("<redacted>"));
}

#[test]
fn openwrt_shipped_uci_defaults_are_the_router_defaults() {
    let wrt = OpenWrt::new();
    let shipped =
        std::fs::read_to_string(format!("{ROOT}/cross/openwrt/edgehub/files/edgehub.config"))
            .unwrap();
    std::fs::write(wrt.dir.path().join("etc/config/edgehub"), shipped).unwrap();
    let out = wrt.rc("edgehub_json");
    assert!(out.status.success(), "{}", text(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["stateDir"], json!("/etc/edgehub/state"), "resources survive a power cut");
    assert_eq!(json["outboxSpool"], json!(false), "the upstream queue in RAM: no flash writes");
    assert_eq!(json["logTarget"], json!("syslog"));
    assert_eq!(json["outboxMaxBytes"], json!(1048576));
    assert_eq!(json["outboxMaxMessages"], json!(1000));
    assert_eq!(json["joinRetryMax"], json!(60));
    // An option deleted from the file: still syslog.
    wrt.write_uci(&["option server 'c:1'".to_owned()]);
    let out = wrt.rc("edgehub_json");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json, json!({"websocket": {"server": "c:1"}, "logTarget": "syslog"}));
}

#[test]
fn openwrt_bad_values_are_refused_by_name_before_jshn_could_coerce_them() {
    let _w = watchdog(Duration::from_secs(60));
    let wrt = OpenWrt::new();
    let server = "option server 'c:1'".to_owned();
    // (option line, what the refusal says)
    let cases = [
        ("option heartbeat '.5'", "option heartbeat must be seconds such as 15 or 0.5, not '.5'"),
        ("option heartbeat '5.'", "option heartbeat must be seconds such as 15 or 0.5, not '5.'"),
        ("option heartbeat '015'", "option heartbeat must be seconds such as 15 or 0.5, not '015'"),
        ("option heartbeat '15s'", "option heartbeat must be seconds"),
        ("option heartbeat '1.2.3'", "option heartbeat must be seconds"),
        ("option heartbeat '-1'", "option heartbeat must be seconds"),
        ("option message_ttl '1e3'", "option message_ttl must be seconds"),
        ("option outbox_max_messages '015'", "option outbox_max_messages must be a whole number"),
        ("option outbox_max_bytes '1.5'", "option outbox_max_bytes must be a whole number"),
        ("option message_qps '0x10'", "option message_qps must be a whole number"),
        ("option rotate_certificates 'maybe'", "option rotate_certificates must be 0 or 1"),
        (
            "option log_level 'loud'",
            "option log_level must be one of off|error|warn|info|debug|trace",
        ),
        ("option log_target 'file'", "option log_target must be one of stderr|syslog"),
        (
            "option outbox_full_policy 'drop'",
            "option outbox_full_policy must be one of reject|dropOldest",
        ),
    ];
    for (line, why) in cases {
        wrt.write_uci(&[server.clone(), line.to_owned()]);
        let out = wrt.rc("edgehub_json");
        assert_eq!(out.status.code(), Some(1), "{line}: {}", text(&out));
        assert!(stderr(&out).contains(why), "{line}: expected {why:?}: {}", text(&out));
        assert!(wrt.syslog().contains(why), "{line}: logged for logread: {}", wrt.syslog());
    }
    wrt.write_uci(&["option heartbeat '15'".to_owned()]);
    let out = wrt.rc("edgehub_json");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("option server is not set"), "{}", text(&out));

    // The accepted spellings of the same numbers.
    for (value, expected) in [("0.5", json!(0.5)), ("5", json!(5)), ("15", json!(15))] {
        wrt.write_uci(&[server.clone(), format!("option heartbeat '{value}'")]);
        let out = wrt.rc("edgehub_json");
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["heartbeat"], expected, "{value}");
    }
}

/// procd as the test plays it: a "set" message replaces the service's instances. An instance
/// whose definition and watched files are unchanged keeps running; a changed one is restarted;
/// one that is missing (an empty list) is stopped.
struct Procd {
    running: Option<(Value, std::process::Child)>,
    log: PathBuf,
}

impl Procd {
    fn apply(&mut self, method: &str, message: &Value) {
        assert_eq!(method, "set", "rc.common sends the whole service");
        let wanted = message["instances"].get("instance1").map(|def| {
            let files: Vec<String> = def["file"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| std::fs::read_to_string(f.as_str().unwrap()).unwrap_or_default())
                .collect();
            json!({"definition": def, "files": files})
        });
        if let (Some((current, _)), Some(wanted)) = (&self.running, &wanted) {
            if current == wanted {
                return;
            }
        }
        if let Some((_, mut child)) = self.running.take() {
            let pid = child.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
            child.wait().unwrap();
        }
        if let Some(wanted) = wanted {
            let command: Vec<&str> = wanted["definition"]["command"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log);
            let child =
                Command::new(command[0]).args(&command[1..]).stderr(log.unwrap()).spawn().unwrap();
            self.running = Some((wanted, child));
        }
    }

    fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|(_, child)| child.id())
    }
}

impl Drop for Procd {
    fn drop(&mut self) {
        if let Some((_, mut child)) = self.running.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn openwrt_reload_with_a_refused_configuration_keeps_the_running_agent_and_its_file() {
    let _w = watchdog(Duration::from_secs(90));
    let cloud = Cloud::start();
    let wrt = OpenWrt::new();
    let mut procd = Procd { running: None, log: wrt.dir.path().join("agent.log") };
    let mut uci = wrt.every_option(&cloud.sim.addr().to_string());
    uci.retain(|l| !l.contains("token") && !l.contains("http_server"));
    let pki = &cloud.paths;
    for (key, path) in
        [("ca_file", &pki.ca_cert), ("cert_file", &pki.client_cert), ("key_file", &pki.client_key)]
    {
        uci.push(format!("option {key} '{}'", path.display()));
    }
    uci.push("option heartbeat '1'".to_owned()); // the last value of an option wins, as in UCI
    wrt.write_uci(&uci);

    let out = wrt.rc("start");
    assert!(out.status.success(), "{}", text(&out));
    let (method, message) = wrt.procd_messages().pop().unwrap();
    procd.apply(&method, &message);
    cloud.wait_connected();
    let pid = procd.pid().unwrap();
    let good = std::fs::read_to_string(wrt.conf()).unwrap();

    // A typo, then reload (as a config trigger runs it): refused, logged, and the same instance
    // registered again, so procd keeps the agent.
    let mut typo = uci.clone();
    typo.push("option heartbeat '.5'".to_owned());
    wrt.write_uci(&typo);
    let out = wrt.rc("reload");
    assert!(out.status.success(), "{}", text(&out));
    let (method, message) = wrt.procd_messages().pop().unwrap();
    assert!(message["instances"]["instance1"].is_object(), "an instance is registered: {message}");
    procd.apply(&method, &message);
    assert_eq!(procd.pid(), Some(pid), "the running agent is kept");
    assert_eq!(std::fs::read_to_string(wrt.conf()).unwrap(), good, "and its configuration");
    assert!(wrt.syslog().contains("option heartbeat must be seconds"), "{}", wrt.syslog());
    assert!(wrt.syslog().contains("keeping the running configuration"), "{}", wrt.syslog());

    // A value only the agent refuses (heartbeat not below CloudHub's 30 s): the same.
    let mut refused = uci.clone();
    refused.push("option heartbeat '40'".to_owned());
    wrt.write_uci(&refused);
    let out = wrt.rc("reload");
    assert!(out.status.success(), "{}", text(&out));
    let (method, message) = wrt.procd_messages().pop().unwrap();
    procd.apply(&method, &message);
    assert_eq!(procd.pid(), Some(pid));
    assert_eq!(std::fs::read_to_string(wrt.conf()).unwrap(), good);
    assert!(wrt.syslog().contains("configuration refused"), "{}", wrt.syslog());
    assert!(wrt.syslog().contains("heartbeat"), "{}", wrt.syslog());

    // A good change: the file changes, so procd restarts the agent with it.
    let mut changed = uci.clone();
    changed.push("option log_level 'info'".to_owned());
    wrt.write_uci(&changed);
    let out = wrt.rc("reload");
    assert!(out.status.success(), "{}", text(&out));
    let (method, message) = wrt.procd_messages().pop().unwrap();
    procd.apply(&method, &message);
    let restarted = procd.pid().unwrap();
    assert_ne!(restarted, pid);
    let conf: Value = serde_json::from_str(&std::fs::read_to_string(wrt.conf()).unwrap()).unwrap();
    assert_eq!(conf["logLevel"], json!("info"));
    cloud.wait_connected();

    // Disabled: an empty instance list, and procd stops the agent.
    let mut disabled = changed.clone();
    disabled.push("option enabled '0'".to_owned());
    wrt.write_uci(&disabled);
    let out = wrt.rc("reload");
    assert!(out.status.success(), "{}", text(&out));
    let (method, message) = wrt.procd_messages().pop().unwrap();
    assert_eq!(message["instances"], json!({}));
    procd.apply(&method, &message);
    assert_eq!(procd.pid(), None);
    assert!(is_gone(restarted));
}

#[test]
fn openwrt_start_registers_a_jailed_unprivileged_instance_that_procd_always_respawns() {
    let _w = watchdog(Duration::from_secs(30));
    let wrt = OpenWrt::new();
    wrt.write_uci(&wrt.every_option("127.0.0.1:10000"));
    let out = wrt.rc("start");
    assert!(out.status.success(), "{}", text(&out));
    let d = wrt.dir.path();
    let conf = path_str(&wrt.conf()).to_owned();
    let (method, message) = wrt.procd_messages().pop().unwrap();
    assert_eq!(method, "set");
    let uid = format!("{}", std::fs::metadata(d).unwrap().uid());
    let instance = &message["instances"]["instance1"];
    assert_eq!(instance["command"], json!([EDGEHUB, "run", "-c", conf]));
    assert_eq!(instance["respawn"], json!(["3600", "5", "0"]), "0: procd never gives up");
    assert_eq!(instance["user"], json!(uid));
    assert_eq!(instance["group"], json!(uid));
    assert_eq!(instance["no_new_privs"], json!(true));
    assert_eq!(instance["file"], json!([conf]));
    assert_eq!(instance["term_timeout"], json!(20));
    assert_eq!((&instance["stdout"], &instance["stderr"]), (&json!(true), &json!(true)));
    let jail = &instance["jail"];
    assert_eq!(jail["name"], json!("edgehub"));
    assert_eq!(jail["log"], json!(true));
    assert_eq!(jail["procfs"], json!(true), "the node status reads /proc");
    let mount = jail["mount"].as_object().unwrap();
    assert_eq!(mount[&conf], json!("0"), "{jail}");
    for rw in [
        d.join("state"),
        wrt.pki.ca_cert.parent().unwrap().to_owned(),
        wrt.pki.client_cert.parent().unwrap().to_owned(),
        d.join("run"),
    ] {
        assert_eq!(mount[path_str(&rw)], json!("1"), "{} writable: {jail}", rw.display());
        assert!(rw.is_dir(), "{} created", rw.display());
    }
    assert_eq!(
        message["triggers"],
        json!([["config.change", "edgehub"], ["mount.add", path_str(&d.join("state"))]])
    );
    let mode = std::fs::metadata(wrt.conf()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file holds the token");

    // A first start with a refused configuration: nothing to keep, nothing registered.
    std::fs::remove_file(wrt.conf()).unwrap();
    let mut refused = wrt.every_option("127.0.0.1:10000");
    refused.push("option heartbeat '40'".to_owned());
    wrt.write_uci(&refused);
    let out = wrt.rc("start");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let (_, message) = wrt.procd_messages().pop().unwrap();
    assert_eq!(message["instances"], json!({}));
    assert!(stderr(&out).contains("heartbeat"), "{}", text(&out));
    assert!(!wrt.conf().exists());
}

// ---- OpenWrt package Makefile, against stand-ins of the SDK's include files -------------------

/// `make TARGET` in cross/openwrt/edgehub with TOPDIR at the SDK stand-in (tests/openwrt/sdk).
fn openwrt_make(args: &[&str], path_prefix: Option<&Path>) -> Output {
    let make = required_tool("make");
    let mut cmd = Command::new(make);
    cmd.current_dir(format!("{ROOT}/cross/openwrt/edgehub"))
        .arg("-s")
        .arg(format!("TOPDIR={ROOT}/tests/openwrt/sdk"))
        .args(args);
    if let Some(dir) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", dir.display()));
    }
    cmd.output().unwrap()
}

#[test]
fn openwrt_makefile_metadata_build_variables_and_install_layout() {
    // The package is a feed root's edgehub/ directory, so it is package/feeds/<feed>/edgehub.
    assert!(Path::new(&format!("{ROOT}/cross/openwrt/edgehub/Makefile")).is_file());

    let out = openwrt_make(&["info"], None);
    assert!(out.status.success(), "{}", text(&out));
    let info = stdout(&out);
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing:\n{info}"))
            .to_owned()
    };
    assert_eq!(field("PKG_SOURCE_PROTO"), "git");
    assert!(!field("PKG_MIRROR_HASH").is_empty());
    assert_eq!(field("PKG_LICENSE"), "Apache-2.0");
    let license = field("PKG_LICENSE_FILES");
    let license_text = std::fs::read_to_string(format!("{ROOT}/{license}")).unwrap();
    assert!(license_text.contains("Apache License") && license_text.contains("Version 2.0"));
    let maintainer = field("PKG_MAINTAINER");
    let (name, email) = maintainer.split_once(" <").unwrap_or_else(|| panic!("{maintainer}"));
    assert!(!name.is_empty() && email.ends_with('>') && email.contains('@'), "{maintainer}");
    assert_eq!(field("PKG_BUILD_DEPENDS"), "rust/host");
    assert!(field("DEPENDS").starts_with("@(") && field("DEPENDS").ends_with(" +libopenssl"));
    assert_eq!(field("USERID"), "edgehub=368:edgehub=368");
    assert_eq!(field("CONFFILES"), "/etc/config/edgehub");

    // The compile step, run with a cargo that records what it was given: the environment as the
    // shell leaves it (the package's own settings come after rust-values.mk's and win).
    let stub = TempDir::new("openwrt-cargo");
    let record = stub.path().join("cargo.txt");
    std::fs::write(
        stub.path().join("cargo"),
        format!("#!/bin/sh\n{{ echo \"args: $*\"; env; }} >'{}'\n", record.display()),
    )
    .unwrap();
    std::fs::set_permissions(stub.path().join("cargo"), std::fs::Permissions::from_mode(0o755))
        .unwrap();
    let out = openwrt_make(&["compile"], Some(stub.path()));
    assert!(out.status.success(), "{}", text(&out));
    let recorded = std::fs::read_to_string(&record).unwrap();
    for line in [
        "CARGO_PROFILE_RELEASE_PANIC=abort",
        "OPENSSL_NO_VENDOR=1",
        &format!(
            "OPENSSL_INCLUDE_DIR={ROOT}/tests/openwrt/sdk/staging_dir/target-test/usr/include"
        ),
        &format!("OPENSSL_LIB_DIR={ROOT}/tests/openwrt/sdk/staging_dir/target-test/usr/lib"),
        "PKG_CONFIG_ALLOW_CROSS=1",
    ] {
        assert!(recorded.lines().any(|l| l == line), "{line} not in:\n{recorded}");
    }
    let args = recorded.lines().next().unwrap();
    assert!(args.starts_with("args: install "), "{args}");
    assert!(args.contains(" --locked") && args.ends_with(" --bin edgehub"), "{args}");

    // The install step into a package root.
    let root = TempDir::new("openwrt-ipkg");
    let built = root.path().join("build/bin");
    std::fs::create_dir_all(&built).unwrap();
    std::fs::write(built.join("edgehub"), "binary").unwrap();
    let dest = root.path().join("ipkg");
    let out = openwrt_make(
        &[
            "install",
            &format!("DESTDIR={}", dest.display()),
            &format!("PKG_INSTALL_DIR={}", root.path().join("build").display()),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let mode = |p: &str| std::fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("usr/bin/edgehub"), 0o755);
    assert_eq!(mode("etc/init.d/edgehub"), 0o755);
    assert_eq!(mode("etc/config/edgehub"), 0o600, "the UCI file can hold the token");
    assert_eq!(
        std::fs::read_to_string(dest.join("lib/upgrade/keep.d/edgehub")).unwrap(),
        "/etc/edgehub/ca/\n/etc/edgehub/certs/\n/etc/edgehub/state/\n",
        "the certificates from a join, and the resources, survive a sysupgrade"
    );
    let shipped = std::fs::read(format!("{ROOT}/{OPENWRT_INIT}")).unwrap();
    assert_eq!(std::fs::read(dest.join("etc/init.d/edgehub")).unwrap(), shipped);
}

// ---- `edgehub run`: a join that fails at boot is retried by the agent itself -------------------

/// The process and its stderr file; killed if a failed assertion leaves it running.
struct RunningAgent {
    child: std::process::Child,
    log: PathBuf,
}

impl RunningAgent {
    /// `edgehub run` with `config` written to `work`/config.json, its stderr to a log file.
    fn spawn(work: &TempDir, config: &Value) -> RunningAgent {
        let config_path = work.path().join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = work.path().join("stderr.log");
        let child = Command::new(EDGEHUB)
            .arg("run")
            .arg("-c")
            .arg(&config_path)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        RunningAgent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn run_retries_a_failed_join_at_start_until_the_cloud_answers_without_a_restart() {
    use edgehub::cloudsim::{CertServer, CertServerConfig};
    let _w = watchdog(Duration::from_secs(90));
    let cloud = Cloud::start();
    let work = TempDir::new("boot-join");
    // The certificate server's address, with nothing listening on it yet: WAN down at boot.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut certs_cfg = CertServerConfig::from_pki(&cloud.pki);
    certs_cfg.listen = addr;
    let token_source = CertServer::start(CertServerConfig::from_pki(&cloud.pki)).unwrap();
    let token = token_source.token().unwrap(); // same CA and key, so valid on the later server
    drop(token_source);
    let config = json!({
        "nodeName": NODE,
        "websocket": {"server": cloud.sim.addr().to_string()},
        "heartbeat": 1,
        "httpServer": format!("https://{addr}"),
        "token": token,
        "tlsCaFile": work.path().join("ca/rootCA.crt"),
        "tlsCertFile": work.path().join("certs/edge.crt"),
        "tlsPrivateKeyFile": work.path().join("certs/edge.key"),
        "stateDir": work.path().join("state"),
        "localApiSocket": work.path().join("eh.sock"),
        // The backoff's ceiling, short here so the test does not wait the default minute: the
        // first attempts fail as for the first ~40 s of a boot, in less than a second each.
        "joinRetryMax": 0.2,
    });
    let mut agent = RunningAgent::spawn(&work, &config);

    wait_until("three failed join attempts", || agent.log().contains("join attempt 3 failed"));
    assert!(agent.child.try_wait().unwrap().is_none(), "still running:\n{}", agent.log());
    let certs = CertServer::start(certs_cfg).unwrap();
    cloud.wait_connected();
    assert!(agent.child.try_wait().unwrap().is_none(), "the same process:\n{}", agent.log());
    assert!(agent.log().contains("joined as"), "{}", agent.log());
    drop(certs);

    let pid = agent.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
}

#[test]
fn run_stopped_while_a_join_is_pending_exits_cleanly() {
    let _w = watchdog(Duration::from_secs(60));
    let work = TempDir::new("boot-join-stop");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cloud = Cloud::start();
    let token = {
        let source = edgehub::cloudsim::CertServer::start(
            edgehub::cloudsim::CertServerConfig::from_pki(&cloud.pki),
        )
        .unwrap();
        source.token().unwrap()
    };
    let config = json!({
        "nodeName": NODE,
        "websocket": {"server": "127.0.0.1:1"},
        "httpServer": format!("https://{addr}"),
        "token": token,
        "tlsCaFile": work.path().join("ca.crt"),
        "tlsCertFile": work.path().join("edge.crt"),
        "tlsPrivateKeyFile": work.path().join("edge.key"),
        "stateDir": work.path().join("state"),
        "localApiSocket": work.path().join("eh.sock"),
        "joinRetryMax": 30,
    });
    let mut agent = RunningAgent::spawn(&work, &config);
    wait_until("a failed join attempt", || agent.log().contains("join attempt 1 failed"));
    let pid = agent.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = agent.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(agent.log().contains("the join had not succeeded yet"), "{}", agent.log());
}

// ---- static checks ---------------------------------------------------------------------------

#[test]
fn shell_scripts_pass_shellcheck() {
    let shellcheck = required_tool("shellcheck");
    for (shell, script) in [
        ("sh", "cross/busybox/S95edgehub"),
        ("sh", "cross/openwrt/edgehub/files/edgehub.init"),
        ("sh", "tests/openwrt/jshn.sh"),
        ("sh", "tests/openwrt/functions.sh"),
        ("sh", "tests/openwrt/procd.sh"),
        ("sh", "tests/openwrt/rc.common"),
        ("bash", "cross/env.sh"),
        ("bash", "scripts/cross-build.sh"),
        ("bash", "scripts/cross-test.sh"),
    ] {
        let out = Command::new(&shellcheck)
            .current_dir(ROOT)
            .args(["-x", "-s", shell, script])
            .output()
            .unwrap();
        assert!(out.status.success(), "shellcheck {script}: {}", text(&out));
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let analyze = required_tool("systemd-analyze");
    let dir = TempDir::new("systemd");
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let unit = std::fs::read_to_string(format!("{ROOT}/cross/systemd/edgehub.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/edgehub run -c /etc/edgehub/config.json"));
    let path = dir.path().join("edgehub.service");
    std::fs::write(&path, unit.replace("/usr/bin/edgehub", EDGEHUB)).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stderr(&out).contains("edgehub.service"), "complaints about the unit: {}", text(&out));
}
