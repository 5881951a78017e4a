//! The soak run behind `scripts/soak.sh MINUTES`: agent, simulator and a proxy that flaps the link
//! at random (cuts and half-open stalls), with steady traffic both ways. Prints a line a minute and
//! a summary: messages sent, received, lost, re-sent, reconnects, and VmRSS at start and end (of
//! this whole process: agent, simulator and proxy together). Ignored by `cargo test`; the script
//! runs it with `--ignored`.
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::message;
use edgehub::status::Status;
use edgehub::Agent;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::proxy::{Mode, Proxy};
use support::*;

/// Which sequence numbers arrived: one bit each, so the harness's own memory stays flat and the
/// VmRSS figures speak of the agent and simulator.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    count: usize,
}

impl Seen {
    /// Marks `seq`; false if it was already there.
    fn insert(&mut self, seq: u32) -> bool {
        let (word, bit) = (seq as usize / 64, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        self.count += usize::from(fresh);
        fresh
    }

    fn len(&self) -> usize {
        self.count
    }
}

#[test]
#[ignore = "long: run by scripts/soak.sh"]
fn soak() {
    let minutes: f64 =
        std::env::var("SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(1.0);
    let run_for = Duration::from_secs_f64(minutes * 60.0);
    let _w = watchdog(run_for + Duration::from_secs(120));
    let cloud = Cloud::start_with(|c| c.ack_retry_interval = Duration::from_millis(500));
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let mut config = cloud.config_to(&proxy.addr().to_string());
    config.heartbeat = edgehub::config::Seconds(Duration::from_secs(1));
    config.websocket.read_deadline = edgehub::config::Seconds(Duration::from_secs(3));
    config.message_qps = 1_000;
    config.message_burst = 200;
    let agent = Agent::start(config, vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    // Let the first session settle before the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let rss_start = vm_rss_kib();

    let running = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU32::new(0));
    let sender = {
        let (running, sent, hub) = (running.clone(), sent.clone(), agent.hub());
        std::thread::spawn(move || {
            let mut seq = 0;
            while running.load(Ordering::Relaxed) {
                if hub.send(numbered(seq)).is_ok() {
                    seq += 1;
                    sent.store(seq, Ordering::Relaxed);
                }
                if seq % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(100)); // ~200 msg/s offered
                }
            }
        })
    };
    let mut received = Seen::default();
    let mut resent = 0u64;
    let mut faults = 0u32;
    let started = Instant::now();
    let mut next_report = started + Duration::from_secs(60);
    let mut next_fault = started + Duration::from_secs(5 + message::random_u64() % 20);
    // Downstream: one ack-queue update every 100 ms; the probe ACKs them.
    let mut rv = 0u64;
    let mut next_push = Instant::now();
    while started.elapsed() < run_for {
        if Instant::now() >= next_push {
            rv += 1;
            cloud.sim.push(
                NODE,
                cloud_msg(
                    "resource",
                    "edgecontroller",
                    "update",
                    "default/pod/soak",
                    &rv.to_string(),
                ),
            );
            next_push += Duration::from_millis(100);
        }
        if Instant::now() >= next_fault {
            faults += 1;
            if message::random_u64() % 2 == 0 {
                proxy.cut_all();
            } else {
                proxy.set_mode(Mode::Stall);
                std::thread::sleep(Duration::from_secs(4)); // a half-open spell past readDeadline
                proxy.cut_all();
                proxy.set_mode(Mode::Pass);
            }
            next_fault = Instant::now() + Duration::from_secs(5 + message::random_u64() % 25);
        }
        while let Ok(event) = cloud.events.try_recv() {
            if let SimEvent::Received { msg, .. } = event {
                if let Some(seq) = seq_of(&msg) {
                    if !received.insert(seq) {
                        resent += 1;
                    }
                }
            }
        }
        while probe_rx.try_recv().is_ok() {}
        if Instant::now() >= next_report {
            eprintln!(
                "soak {:>4.0} s: sent {} received {} re-sent {} faults {} sessions {} VmRSS {} KiB",
                started.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                received.len(),
                resent,
                faults,
                Status::get(&agent.status().sessions),
                vm_rss_kib()
            );
            next_report += Duration::from_secs(60);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    running.store(false, Ordering::Relaxed);
    sender.join().unwrap();
    proxy.set_mode(Mode::Pass);
    let total = sent.load(Ordering::Relaxed);
    let drain_until = Instant::now() + Duration::from_secs(60);
    while received.len() < total as usize && Instant::now() < drain_until {
        if let Ok(SimEvent::Received { msg, .. }) =
            cloud.events.recv_timeout(Duration::from_secs(1))
        {
            if let Some(seq) = seq_of(&msg) {
                if !received.insert(seq) {
                    resent += 1;
                }
            }
        }
    }
    let rss_end = vm_rss_kib();
    let lost = total as usize - received.len().min(total as usize);
    eprintln!(
        "soak summary: {minutes} min, sent {total}, received {}, lost {lost}, re-sent {resent}, \
         downstream pushed {}, faults {faults}, sessions {}, VmRSS start {rss_start} KiB end {rss_end} KiB",
        received.len(),
        rv,
        Status::get(&agent.status().sessions),
    );
    agent.stop();
    assert_eq!(lost, 0, "messages lost");
}
