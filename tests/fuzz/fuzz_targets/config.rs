//! Fuzzes the configuration file: `Config::from_json`, then `validate()`, `websocket_url()` and the
//! redacted dump, none of which may panic. Property: the redacted JSON of a parsed config parses
//! back, and dumps to the same text (`check-config` output can be pasted back as a config).
//!
//! `validate()` resolves a `websocket.server` whose host is made of digits and dots with the
//! system resolver, which can send a DNS query for an input like `1.2.3.4.5:80`. So that fuzzing
//! never sends traffic, such servers are only validated when `EDGEHUB_FUZZ_OFFLINE=1` says the
//! process runs without a network (`scripts/fuzz.sh` runs targets under `unshare --net`).

#![no_main]

use edgehub::Config;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn offline() -> bool {
    static OFFLINE: OnceLock<bool> = OnceLock::new();
    *OFFLINE.get_or_init(|| std::env::var_os("EDGEHUB_FUZZ_OFFLINE").is_some_and(|v| v == "1"))
}

/// True when `validate()` could hand this server to the resolver (see the file comment).
fn may_resolve(server: &str) -> bool {
    let host = server.rsplit_once(':').map_or(server, |(host, _)| host);
    host.chars().all(|c| c.is_ascii_digit() || c == '.')
        && server.parse::<std::net::SocketAddr>().is_err()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_json(text) else {
        return;
    };
    if offline() || !may_resolve(&config.websocket.server) {
        let _ = config.validate();
    }
    let _ = (config.websocket_url(), config.ping_interval(), format!("{config:?}"));

    let dump = config.to_redacted_json();
    let reparsed = match Config::from_json(&dump) {
        Ok(c) => c,
        Err(e) => panic!("redacted dump does not parse back: {e}\n{dump}"),
    };
    let dump_again = reparsed.to_redacted_json();
    assert!(dump == dump_again, "dump changed on reparse\nfirst:\n{dump}\nsecond:\n{dump_again}");
});
