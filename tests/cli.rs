//! The `edgehub` binary as an operator meets it: `--version`, `check-config` with good and bad
//! files (clear messages naming the file and key, exit code 2), and `run` refusing bad input.

mod cli_support {
    use std::path::PathBuf;
    use std::process::{Command, Output};

    pub fn edgehub(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_edgehub")).args(args).output().unwrap()
    }

    pub fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("edgehub-cli-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

use cli_support::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_prints_the_package_version() {
    let out = edgehub(&["--version"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), format!("edgehub {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_prints_the_effective_config_with_defaults_and_no_token() {
    let dir = temp_dir("good");
    for f in ["ca.crt", "edge.crt", "edge.key"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
    let file = dir.join("config.json");
    std::fs::write(
        &file,
        r#"{"nodeName": "gw-1", "heartbeat": 15, "stateDir": "/var/lib/edgehub", "token": "aa.bb.cc.dd",
            "websocket": {"server": "10.0.0.1:10000", "readDeadline": 15},
            "tlsCaFile": "ca.crt", "tlsCertFile": "edge.crt", "tlsPrivateKeyFile": "edge.key"}"#,
    )
    .unwrap();
    let out = edgehub(&["check-config", "--config", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let effective: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(effective["nodeName"], "gw-1");
    assert_eq!(effective["messageQPS"], 30);
    assert_eq!(effective["websocket"]["writeDeadline"], 15);
    assert_eq!(effective["tlsCaFile"], dir.join("ca.crt").to_str().unwrap());
    assert_eq!(effective["token"], "<redacted>");
    assert!(!text(&out.stdout).contains("bb.cc"));

    let out =
        edgehub(&["check-config", "--config", file.to_str().unwrap(), "--server", "cloud:10000"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("\"server\": \"cloud:10000\""));
}

#[test]
fn bad_configs_exit_2_naming_the_file_and_key() {
    let dir = temp_dir("bad");
    let file = dir.join("config.json");
    let cases = [
        (r#"{"heartbeat": 0, "websocket": {"server": "1.2.3.4:1"}}"#, "heartbeat"),
        (r#"{"messageBurst": 0, "websocket": {"server": "1.2.3.4:1"}}"#, "messageBurst"),
        (r#"{"websocket": {"server": "1.2.3.4"}}"#, "websocket.server"),
        (r#"{"websocket": {"server": "1.2.3.4:1"}, "tlsCaFile": "/nope/ca.crt"}"#, "tlsCaFile"),
        (r#"{"websocket": {"servr": "1.2.3.4:1"}}"#, "servr"),
        (r#"{"heartbeat": "15"}"#, "line 1"),
    ];
    for (json, key) in cases {
        std::fs::write(&file, json).unwrap();
        for command in ["check-config", "run"] {
            let out = edgehub(&[command, "--config", file.to_str().unwrap()]);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {json}: {err}");
            assert!(err.contains(key) && err.contains("config.json"), "{command} {json}: {err}");
        }
    }
    let out = edgehub(&["run", "--config", dir.join("absent.json").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("absent.json"));
    let out = edgehub(&["frobnicate"]);
    assert_ne!(out.status.code(), Some(0));
}
