//! The init scripts in `cross/` run the way a gateway runs them. The busybox/SysV script
//! (`cross/busybox/S95edgehub`) runs under `busybox sh` with busybox's applets first on PATH
//! (its start-stop-daemon, not dpkg's), driving the real `edgehub` binary against the simulator.
//! The OpenWrt procd script's UCI-to-JSON step and `start_service` run under `busybox sh` with
//! OpenWrt's `config_*` and `procd_*` functions stubbed, and the JSON it writes must pass
//! `edgehub check-config`. The systemd unit passes `systemd-analyze verify`, and every shell
//! script in `cross/` and `scripts/cross-*.sh` passes shellcheck.
//! Needs busybox and shellcheck (scripts/setup.sh installs them).
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::pki::{Pki, PkiPaths};
use edgehub::cloudsim::SimEvent;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
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

/// Under qemu-user (scripts/cross-test.sh) the agent's /proc/PID/exe and cmdline name the
/// emulator, so start-stop-daemon -x cannot recognise it; the script is the same shell on every
/// architecture and runs in the host suite.
fn emulated(test: &str) -> bool {
    match std::env::var("EDGEHUB_CROSS_TARGET") {
        Ok(target) => {
            eprintln!(
                "SKIPPED {test}: {target} runs under qemu-user, where start-stop-daemon -x cannot \
                 match the agent; this test runs in the host suite"
            );
            true
        }
        Err(_) => false,
    }
}

// ---- busybox / SysV: cross/busybox/S95edgehub -------------------------------------------------

struct SysV {
    bb: Busybox,
    dir: TempDir,
    defaults: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
}

impl SysV {
    /// The script's settings in an /etc/default-style file, as an operator would write them.
    fn new(config: &Path) -> SysV {
        let dir = TempDir::new("sysv");
        let (defaults, pidfile, log) = (
            dir.path().join("default"),
            dir.path().join("edgehub.pid"),
            dir.path().join("edgehub.log"),
        );
        std::fs::write(
            &defaults,
            format!(
                "DAEMON='{EDGEHUB}'\nCONFIG='{}'\nPIDFILE='{}'\nLOG='{}'\nSTOP_TIMEOUT=10\n",
                config.display(),
                pidfile.display(),
                log.display()
            ),
        )
        .unwrap();
        SysV { bb: Busybox::new(), dir, defaults, pidfile, log }
    }

    fn run(&self, action: &str) -> Output {
        let script = format!("{ROOT}/cross/busybox/S95edgehub");
        self.bb.sh(&[&script, action], &[("EDGEHUB_DEFAULTS", path_str(&self.defaults))])
    }

    fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(&self.pidfile).unwrap();
        text.trim().parse().unwrap_or_else(|_| panic!("pid file holds {text:?}"))
    }
}

impl Drop for SysV {
    /// A failed assertion must not leave an agent running.
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let pid = pid.trim();
            if !pid.is_empty() && agent_pids(self.dir.path()).iter().any(|p| p.to_string() == pid) {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }
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
    let sysv = SysV::new(&config_path);

    // A pid file left by a power cut, naming a live process that is not edgehub (this test).
    std::fs::write(&sysv.pidfile, format!("{}\n", std::process::id())).unwrap();
    let out = sysv.run("status");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stdout(&out).contains("not running"), "{}", text(&out));

    let out = sysv.run("start");
    assert!(out.status.success(), "{}", text(&out));
    let pid = sysv.pid();
    assert_ne!(pid, std::process::id(), "the stale pid file was replaced");
    assert!(stdout(&out).contains(&format!("OK (pid {pid})")), "{}", text(&out));
    cloud.wait_connected();
    assert_eq!(agent_pids(work.path()), vec![pid]);

    let out = sysv.run("status");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains(&format!("edgehub is running (pid {pid})")), "{}", text(&out));

    let out = sysv.run("start");
    assert_eq!(out.status.code(), Some(1), "a second start is refused: {}", text(&out));
    assert!(stderr(&out).contains("already running"), "{}", text(&out));
    assert_eq!(sysv.pid(), pid, "the pid file still names the running agent");
    assert_eq!(agent_pids(work.path()), vec![pid], "still exactly one agent");

    // reload: SIGHUP to the same process, which re-reads the file and says what it applied.
    let mut changed = config.clone();
    changed.log_level = edgehub::config::LogLevel::Debug;
    std::fs::write(&config_path, serde_json::to_string_pretty(&changed).unwrap()).unwrap();
    let out = sysv.run("reload");
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the agent logs the reload", || {
        std::fs::read_to_string(&sysv.log).unwrap_or_default().contains("reloaded")
    });
    assert_eq!(agent_pids(work.path()), vec![pid], "reload keeps the process");

    let out = sysv.run("restart");
    assert!(out.status.success(), "{}", text(&out));
    wait_disconnected(&cloud);
    cloud.wait_connected();
    let restarted = sysv.pid();
    assert!(is_gone(pid), "the first agent ended before the second started");
    assert_eq!(agent_pids(work.path()), vec![restarted]);

    let out = sysv.run("stop");
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("OK"), "{}", text(&out));
    assert!(is_gone(restarted), "stop returns only once the agent is gone");
    assert!(!sysv.pidfile.exists(), "no stale pid file after stop");
    assert!(agent_pids(work.path()).is_empty());
    wait_disconnected(&cloud);

    let out = sysv.run("status");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let out = sysv.run("stop");
    assert!(out.status.success(), "stopping a stopped agent is not an error: {}", text(&out));
    assert!(stdout(&out).contains("not running"), "{}", text(&out));

    let log = std::fs::read_to_string(&sysv.log).unwrap();
    assert!(log.contains("connected to"), "the agent's output reaches the log file:\n{log}");
    assert!(log.contains("applied logLevel"), "{log}");
    assert_eq!(
        log.matches("] stopped").count(),
        2,
        "both agents stopped cleanly on SIGTERM:\n{log}"
    );
}

#[test]
fn busybox_init_script_refuses_a_bad_configuration_at_start() {
    let _w = watchdog(Duration::from_secs(30));
    let work = TempDir::new("sysv-bad");
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, r#"{"heartbeat": 40, "websocket": {"server": "127.0.0.1:1"}}"#)
        .unwrap();
    let sysv = SysV::new(&config_path);

    let out = sysv.run("start");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("edgehub not started"), "{}", text(&out));
    assert!(stderr(&out).contains("heartbeat"), "names the bad key: {}", text(&out));
    assert!(!sysv.pidfile.exists());
    assert!(agent_pids(work.path()).is_empty());
}

// ---- OpenWrt / procd: cross/openwrt/files/edgehub.init ----------------------------------------

/// OpenWrt's `config_get` / `config_get_bool` (functions.sh) reading `UCI_<section>_<option>`
/// variables, and `procd_*` printing what they are given. Then the init script is sourced, as
/// /etc/rc.common does.
const OPENWRT_STUBS: &str = r#"
config_load() { [ "$1" = edgehub ]; }
config_get() {
	eval "eh_stub=\${UCI_$2_$3:-\$4}"
	eval "$1=\$eh_stub"
}
config_get_bool() {
	config_get "$@"
	eval "eh_stub=\$$1"
	case "$eh_stub" in
	1 | on | true | yes | enabled) eh_stub=1 ;;
	0 | off | false | no | disabled) eh_stub=0 ;;
	*) eh_stub="$4" ;;
	esac
	eval "$1=\$eh_stub"
}
procd_open_instance() { echo procd_open_instance; }
procd_set_param() { echo "procd_set_param $*"; }
procd_close_instance() { echo procd_close_instance; }
procd_add_reload_trigger() { echo "procd_add_reload_trigger $*"; }
. "$INIT"
"#;

struct OpenWrt {
    bb: Busybox,
    dir: TempDir,
    pki: PkiPaths,
}

impl OpenWrt {
    fn new() -> OpenWrt {
        let dir = TempDir::new("openwrt");
        let pki = Pki::generate("gw-uci").unwrap().write_to(&dir.path().join("pki")).unwrap();
        OpenWrt { bb: Busybox::new(), dir, pki }
    }

    fn json_path(&self) -> PathBuf {
        self.dir.path().join("var/etc/edgehub.json")
    }

    /// Runs `body` after the stubs and the init script, with UCI option values `uci`
    /// (section `main`); `$OUT` is `json_path()` and `$EDGEHUB` the real binary.
    fn run(&self, body: &str, uci: &[(&str, &str)]) -> Output {
        let script = format!("{OPENWRT_STUBS}\n{body}\n");
        let init = format!("{ROOT}/cross/openwrt/files/edgehub.init");
        let out = self.json_path();
        let vars: Vec<(String, &str)> =
            uci.iter().map(|(k, v)| (format!("UCI_main_{k}"), *v)).collect();
        let mut env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        env.extend([("INIT", init.as_str()), ("OUT", path_str(&out)), ("EDGEHUB", EDGEHUB)]);
        self.bb.sh(&["-c", &script], &env)
    }

    /// A complete, valid section with the test's certificates.
    fn valid_section(&self) -> Vec<(&'static str, String)> {
        vec![
            ("enabled", "1".into()),
            ("server", "127.0.0.1:10000".into()),
            ("node_name", "gw-uci".into()),
            ("heartbeat", "7.5".into()),
            ("ca_file", path_str(&self.pki.ca_cert).into()),
            ("cert_file", path_str(&self.pki.client_cert).into()),
            ("key_file", path_str(&self.pki.client_key).into()),
            // Everything a shell or JSON could trip on.
            ("token", r#"ab"c\d$e`f'g h"#.into()),
            ("http_server", "https://127.0.0.1:10002".into()),
            ("rotate_certificates", "0".into()),
            ("outbox_spool", "off".into()),
            ("state_dir", path_str(&self.dir.path().join("state")).into()),
            ("log_level", "debug".into()),
            ("local_api_socket", path_str(&self.dir.path().join("eh.sock")).into()),
        ]
    }
}

fn borrowed<'a>(section: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    section.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn openwrt_uci_section_becomes_json_that_check_config_accepts() {
    let _w = watchdog(Duration::from_secs(30));
    let wrt = OpenWrt::new();
    let section = wrt.valid_section();
    let out = wrt.run(r#"edgehub_config_json "$OUT""#, &borrowed(&section));
    assert!(out.status.success(), "{}", text(&out));

    let written = std::fs::read_to_string(wrt.json_path()).unwrap();
    let json: Value = serde_json::from_str(&written).unwrap_or_else(|e| panic!("{e}: {written}"));
    let value = |k: &str| section.iter().find(|(key, _)| *key == k).unwrap().1.clone();
    assert_eq!(
        json,
        json!({
            "websocket": {"server": "127.0.0.1:10000"},
            "heartbeat": 7.5,
            "nodeName": "gw-uci",
            "tlsCaFile": value("ca_file"),
            "tlsCertFile": value("cert_file"),
            "tlsPrivateKeyFile": value("key_file"),
            "token": value("token"),
            "httpServer": "https://127.0.0.1:10002",
            "stateDir": value("state_dir"),
            "logLevel": "debug",
            "localApiSocket": value("local_api_socket"),
            "rotateCertificates": false,
            "outboxSpool": false,
        })
    );
    let mode = std::fs::metadata(wrt.json_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file holds the token");

    let check =
        Command::new(EDGEHUB).arg("check-config").arg("-c").arg(wrt.json_path()).output().unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let effective: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(effective["heartbeat"], json!(7.5));
    assert_eq!(effective["nodeName"], json!("gw-uci"));
    assert_eq!(effective["websocket"]["server"], json!("127.0.0.1:10000"));
}

#[test]
fn openwrt_empty_options_are_left_to_the_agent_defaults() {
    let wrt = OpenWrt::new();
    let out = wrt
        .run(r#"edgehub_config_json "$OUT""#, &[("server", "cloud.example:10000"), ("token", "")]);
    assert!(out.status.success(), "{}", text(&out));
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(wrt.json_path()).unwrap()).unwrap();
    assert_eq!(json, json!({"websocket": {"server": "cloud.example:10000"}}));
}

#[test]
fn openwrt_bad_options_are_refused_by_name_and_the_old_json_is_kept() {
    let _w = watchdog(Duration::from_secs(30));
    let wrt = OpenWrt::new();
    std::fs::create_dir_all(wrt.json_path().parent().unwrap()).unwrap();
    std::fs::write(wrt.json_path(), "previous").unwrap();
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("heartbeat", "15")], "option server is not set"),
        (&[("server", "c:1"), ("heartbeat", "15s")], "option heartbeat must be a number"),
        (&[("server", "c:1"), ("heartbeat", "1.2.3")], "option heartbeat must be a number"),
        (
            &[("server", "c:1"), ("token", "line\nbreak")],
            "option token contains a control character",
        ),
        (
            &[("server", "c:1"), ("rotate_certificates", "maybe")],
            "option rotate_certificates must be 0 or 1",
        ),
    ];
    for (uci, why) in cases {
        let out = wrt.run(r#"edgehub_config_json "$OUT""#, uci);
        assert_eq!(out.status.code(), Some(1), "{uci:?}: {}", text(&out));
        assert!(stderr(&out).contains(why), "{uci:?}: expected {why:?}: {}", text(&out));
        assert_eq!(std::fs::read_to_string(wrt.json_path()).unwrap(), "previous", "{uci:?}");
    }
}

#[test]
fn openwrt_start_service_registers_a_respawning_foreground_instance() {
    let _w = watchdog(Duration::from_secs(30));
    let wrt = OpenWrt::new();
    let body = r#"PROG="$EDGEHUB"; JSON="$OUT"; start_service && service_triggers"#;
    let section = wrt.valid_section();
    let out = wrt.run(body, &borrowed(&section));
    assert!(out.status.success(), "{}", text(&out));
    let json = path_str(&wrt.json_path()).to_owned();
    let expected = [
        "procd_open_instance".to_owned(),
        format!("procd_set_param command {EDGEHUB} run -c {json}"),
        "procd_set_param respawn 3600 5 5".to_owned(),
        "procd_set_param stdout 1".to_owned(),
        "procd_set_param stderr 1".to_owned(),
        format!("procd_set_param file {json}"),
        "procd_set_param term_timeout 20".to_owned(),
        "procd_close_instance".to_owned(),
        "procd_add_reload_trigger edgehub".to_owned(),
    ];
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), expected, "{}", text(&out));

    // Disabled: nothing is registered, and the operator is told how to enable it.
    let mut disabled = borrowed(&section);
    disabled[0] = ("enabled", "0");
    let out = wrt.run(body, &disabled);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains("procd_open_instance"), "{}", text(&out));
    assert!(stderr(&out).contains("uci set edgehub.main.enabled=1"), "{}", text(&out));

    // A section the agent would refuse (heartbeat not below CloudHub's 30 s timeout): no instance
    // that procd would respawn until it gives up; check-config's reason is shown.
    let mut refused = borrowed(&section);
    refused[3] = ("heartbeat", "40");
    let out = wrt.run(body, &refused);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!stdout(&out).contains("procd_open_instance"), "{}", text(&out));
    assert!(stderr(&out).contains("heartbeat"), "{}", text(&out));
}

// ---- `edgehub run`: a join that fails at boot is retried by the agent itself -------------------

/// The process and its stderr file; killed if a failed assertion leaves it running.
struct RunningAgent {
    child: std::process::Child,
    log: PathBuf,
}

impl RunningAgent {
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
    let config_path = work.path().join("config.json");
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
    std::fs::write(&config_path, config.to_string()).unwrap();
    let log = work.path().join("stderr.log");
    let child = Command::new(EDGEHUB)
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut agent = RunningAgent { child, log };

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
    let config_path = work.path().join("config.json");
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
    std::fs::write(&config_path, config.to_string()).unwrap();
    let log = work.path().join("stderr.log");
    let child = Command::new(EDGEHUB)
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut agent = RunningAgent { child, log };
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
        ("sh", "cross/openwrt/files/edgehub.init"),
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
