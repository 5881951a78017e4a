//! The load harness end to end: `edgehub-bench` (the agent library with bench modules) against the
//! simulator in load mode, each way and request/response, each until a few hundred messages went
//! through (`--until`) within a generous deadline. What the two ends count must agree: nothing
//! lost, nothing failed. No throughput is asserted here (issue 11: a count within a time window
//! flaked under qemu on a busy machine); throughput is `scripts/bench.sh`'s business.
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::load::{SeqTracker, Stamp};
use edgehub::cloudsim::{LoadConfig, SendClass, SimEvent};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use support::*;

/// Seconds the bench may take to reach its count: far more than any machine needs.
const DEADLINE_S: &str = "90";

/// Runs edgehub-bench against `cloud` until `until` messages went through (or the deadline)
/// and returns its summary line.
fn bench(cloud: &Cloud, until: u64, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_edgehub-bench"))
        .args(["--server", &cloud.sim.addr().to_string(), "--node", NODE])
        .arg("--ca")
        .arg(&cloud.paths.ca_cert)
        .arg("--cert")
        .arg(&cloud.paths.client_cert)
        .arg("--key")
        .arg(&cloud.paths.client_key)
        .arg("--state-dir")
        .arg(cloud.dir.path().join("bench-state"))
        .args(["--duration", DEADLINE_S, "--until", &until.to_string(), "--stats-every", "0.5"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["event"], "bench_config", "{stdout}");
    assert!(lines.iter().any(|l| l["event"] == "bench_stats"), "{stdout}");
    let summary = lines.last().unwrap().clone();
    assert_eq!(summary["event"], "bench_summary", "{stdout}");
    for key in ["vmrss_kb", "vmhwm_kb", "threads", "cpu_s"] {
        assert!(summary[key].is_number(), "{key} in {summary}");
    }
    summary
}

/// The deadline plus the simulator's and the agent's start and stop.
const WATCHDOG: Duration = Duration::from_secs(150);

fn number(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn edge_to_cloud_every_message_sent_arrives_once() {
    let _w = watchdog(WATCHDOG);
    let cloud = Cloud::start_with(|c| c.load = Some(LoadConfig::new(0, 130, SendClass::NoAck)));
    let summary = bench(&cloud, 500, &["--rate", "2000"]);
    let sent = number(&summary, "sent");
    assert!(sent >= 500, "{summary}");
    assert_eq!(number(&summary, "unconfirmed_at_end"), 0, "{summary}");
    let mut seen = SeqTracker::default();
    while let Ok(event) = cloud.events.try_recv() {
        if let SimEvent::Received { msg, .. } = event {
            if let Some(stamp) = Stamp::of(&msg.content) {
                assert_eq!(msg.content.get().len(), 130);
                seen.record(stamp.seq);
            }
        }
    }
    assert_eq!((seen.distinct(), seen.missing(), seen.duplicates()), (sent, 0, 0));
}

#[test]
fn cloud_to_edge_with_acks_nothing_is_lost_and_every_message_is_acked() {
    let _w = watchdog(WATCHDOG);
    let cloud = Cloud::start_with(|c| {
        c.load = Some(LoadConfig::new(2000, 130, SendClass::Ack));
        c.ack_window = 64;
    });
    let summary = bench(&cloud, 500, &[]);
    let received = number(&summary, "received");
    assert!(received >= 500, "{summary}");
    assert_eq!(number(&summary, "missing"), 0, "{summary}");
    // The cloud keeps sending while the summary is taken: ACKs may run ahead of the count.
    assert!(number(&summary["agent"], "acks_sent") >= received, "{summary}");
    let acked = cloud.events.try_iter().filter(|e| matches!(e, SimEvent::Ack { .. })).count();
    assert!(acked as u64 >= received - 64, "{acked} ACKs for {received} messages");
}

#[test]
fn request_response_every_request_is_answered() {
    let _w = watchdog(WATCHDOG);
    let cloud = Cloud::start_with(|c| c.load = Some(LoadConfig::new(0, 130, SendClass::NoAck)));
    let summary = bench(&cloud, 100, &["--sync", "--concurrency", "4"]);
    assert!(number(&summary, "requests") >= 100, "{summary}");
    assert_eq!(number(&summary, "requests_failed"), 0, "{summary}");
    assert!(summary["rtt_p50_us"].is_number(), "{summary}");
}

#[test]
fn durable_messages_go_through_the_store_before_their_ack() {
    let _w = watchdog(WATCHDOG);
    let cloud = Cloud::start_with(|c| {
        c.load = Some(LoadConfig::new(500, 130, SendClass::Ack));
        c.ack_window = 64;
    });
    let summary = bench(&cloud, 100, &["--durable"]);
    let received = number(&summary, "received");
    assert!(received >= 100, "{summary}");
    assert_eq!(number(&summary, "missing"), 0, "{summary}");
    // The store's and the agent's counters are read at other moments than `received` (the store
    // keeps working while the summary is taken), so only their presence is checked here; the
    // store-before-ACK order itself is tested in tests/meta_store.rs.
    assert!(number(&summary["store"], "messages") > 0, "{summary}");
    assert!(number(&summary["agent"], "acks_sent") > 0, "{summary}");
}

/// The figure behind issue 14's design: the CPU one thread wake-up costs on this machine, from a
/// park/unpark ping-pong between two threads (two wake-ups per round trip). On the 2-core bench VM
/// it was 12–15 µs per wake-up across CPUs and 2–2.5 µs on one CPU (`taskset -c 0`), which is why
/// the pushing thread writes its own message instead of waking the writer. Prints, asserts
/// nothing; run it with
/// `cargo test --release --features cloudsim --test bench -- --ignored --nocapture measure_thread_wake_cost`.
#[test]
#[ignore = "measurement: prints the cost of a thread wake-up"]
fn measure_thread_wake_cost() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    const ROUNDS: u32 = 100_000;
    let turn = Arc::new(AtomicU32::new(0));
    let main_thread = std::thread::current();
    let other_turn = turn.clone();
    let other = std::thread::spawn(move || {
        for round in 0..ROUNDS {
            while other_turn.load(Ordering::Acquire) != 2 * round + 1 {
                std::thread::park();
            }
            other_turn.store(2 * round + 2, Ordering::Release);
            main_thread.unpark();
        }
    });
    let cpu_before = process_cpu_seconds();
    let started = std::time::Instant::now();
    for round in 0..ROUNDS {
        turn.store(2 * round + 1, Ordering::Release);
        other.thread().unpark();
        while turn.load(Ordering::Acquire) != 2 * round + 2 {
            std::thread::park();
        }
    }
    let wall = started.elapsed();
    let cpu = process_cpu_seconds() - cpu_before;
    other.join().unwrap();
    let per_wake_us = |seconds: f64| seconds * 1e6 / f64::from(2 * ROUNDS);
    println!(
        "thread wake-up: {:.1} µs of CPU, {:.1} µs of wall time each ({ROUNDS} round trips)",
        per_wake_us(cpu),
        per_wake_us(wall.as_secs_f64())
    );
}

/// User plus system CPU seconds of this process, from /proc/self/stat (0 if unreadable).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
