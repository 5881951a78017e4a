//! Fault injection: the cloud restarts, the link goes half-open, flaps, is cut mid-frame; the
//! spool is torn; an outage outlasts the bounds; the cloud re-sends. Every scenario checks exact
//! delivery by sequence number: each accepted message arrives, in order of first arrival, and a
//! message sent again after an unconfirmed write carries the same msg_id (so it is recognisably
//! the same message; the count of such re-sends is printed).
#![cfg(feature = "cloudsim")]

mod support;

use crossbeam_channel::Receiver;
use edgehub::cloudsim::SimEvent;
use edgehub::config::Seconds;
use edgehub::message::{self, Message};
use edgehub::outbox::{FullPolicy, Limits, Outbox, SpoolOptions};
use edgehub::status::Status;
use edgehub::Agent;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::proxy::{Mode, Proxy};
use support::*;

/// What the cloud saw of the numbered messages: first arrivals in order, and re-sends.
#[derive(Default)]
struct Delivery {
    first_seen: Vec<u32>,
    ids: HashMap<u32, String>,
    resent: usize,
}

impl Delivery {
    /// Records one upstream message; panics if a sequence number arrives under two msg_ids.
    fn record(&mut self, msg: &Message) {
        let Some(seq) = seq_of(msg) else { return };
        match self.ids.get(&seq) {
            Some(id) => {
                assert_eq!(id, &msg.header.id, "seq {seq} arrived again under another msg_id");
                self.resent += 1;
            }
            None => {
                self.ids.insert(seq, msg.header.id.clone());
                self.first_seen.push(seq);
            }
        }
    }

    /// Reads events until every seq below `count` has arrived at least once.
    fn collect(&mut self, events: &Receiver<SimEvent>, count: u32) {
        while self.ids.len() < count as usize {
            let msg = wait_event(events, "numbered message", |e| match e {
                SimEvent::Received { msg, .. } if seq_of(msg).is_some() => Some(msg.clone()),
                _ => None,
            });
            self.record(&msg);
        }
    }

    fn assert_exact(&self, count: u32, scenario: &str) {
        assert_eq!(
            self.first_seen,
            (0..count).collect::<Vec<_>>(),
            "{scenario}: in order, none lost"
        );
        eprintln!(
            "{scenario}: {count} delivered, {} re-sent after an unconfirmed write",
            self.resent
        );
    }
}

fn fast_config(cloud: &Cloud, server: &str) -> edgehub::Config {
    let mut config = cloud.config_to(server);
    config.outbox_max_messages = 50_000;
    config.outbox_max_bytes = 64 << 20;
    config
}

/// Sends `count` numbered messages from another thread as fast as the outbox takes them.
fn send_in_background(agent: &Agent, count: u32) -> std::thread::JoinHandle<()> {
    let hub = agent.hub();
    std::thread::spawn(move || {
        for seq in 0..count {
            hub.send(numbered(seq)).unwrap();
        }
    })
}

#[test]
fn cloud_restarts_while_the_agent_sends_10k_messages() {
    let _w = watchdog(Duration::from_secs(60));
    let mut cloud = Cloud::start();
    let agent = Agent::start(fast_config(&cloud, &cloud.sim.addr().to_string()), vec![]).unwrap();
    cloud.wait_connected();
    const COUNT: u32 = 10_000;
    let sender = send_in_background(&agent, COUNT);
    let mut delivery = Delivery::default();
    delivery.collect(&cloud.events, 3_000);
    let old_events = cloud.restart(|_| {});
    // What the old cloud read before it died still counts.
    while let Ok(event) = old_events.try_recv() {
        if let SimEvent::Received { msg, .. } = event {
            delivery.record(&msg);
        }
    }
    delivery.collect(&cloud.events, COUNT);
    sender.join().unwrap();
    delivery.assert_exact(COUNT, "cloud restart");
    assert_eq!(Status::get(&agent.status().sessions), 2);
    agent.stop();
}

#[test]
fn half_open_link_is_detected_reconnected_and_nothing_is_lost() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let agent = Agent::start(fast_config(&cloud, &proxy.addr().to_string()), vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    let hub = agent.hub();
    let mut delivery = Delivery::default();
    for seq in 0..200 {
        hub.send(numbered(seq)).unwrap();
    }
    delivery.collect(&cloud.events, 200);
    let stalled_at = Instant::now();
    proxy.set_mode(Mode::Stall);
    for seq in 200..400 {
        hub.send(numbered(seq)).unwrap(); // written into the dead link, or still queued
    }
    wait_connection_event(&probe_rx, message::CLOUD_DISCONNECTED);
    let detected = stalled_at.elapsed();
    // Generous (issue 11): without the read deadline a stalled link is never noticed.
    let bound = READ_DEADLINE + HEARTBEAT + Duration::from_secs(5);
    assert!(detected <= bound, "half-open noticed after {detected:?}");
    // Drop what the proxy held on the dead connection, then let new connections through.
    proxy.cut_all();
    proxy.set_mode(Mode::Pass);
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    delivery.collect(&cloud.events, 400);
    delivery.assert_exact(400, "half-open");
    agent.stop();
}

#[test]
fn link_flaps_every_2s_under_load_both_ways() {
    let flap_secs: u64 =
        std::env::var("EDGEHUB_FLAP_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let _w = watchdog(Duration::from_secs(flap_secs + 60));
    let cloud = Cloud::start_with(|c| c.ack_retry_interval = Duration::from_millis(300));
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let mut config = fast_config(&cloud, &proxy.addr().to_string());
    config.message_qps = 2_000;
    config.message_burst = 200;
    let agent = Agent::start(config, vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);

    let running = Arc::new(AtomicBool::new(true));
    let hub = agent.hub();
    let sender = {
        let running = running.clone();
        std::thread::spawn(move || {
            let mut seq = 0u32;
            while running.load(Ordering::Relaxed) {
                if hub.send(numbered(seq)).is_ok() {
                    seq += 1;
                }
                if seq % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(50)); // ~1000 msg/s offered
                }
            }
            seq
        })
    };
    // Downstream load: ack-queue updates of one object, newest version wins at the module.
    let flaps = flap_secs / 2;
    let mut pushed_rv = 0;
    for _ in 0..flaps {
        for _ in 0..20 {
            pushed_rv += 1;
            cloud.sim.push(
                NODE,
                cloud_msg(
                    "resource",
                    "edgecontroller",
                    "update",
                    "default/pod/flap",
                    &pushed_rv.to_string(),
                ),
            );
        }
        std::thread::sleep(Duration::from_secs(2)); // the flap period being tested
        proxy.cut_all();
    }
    running.store(false, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let mut delivery = Delivery::default();
    delivery.collect(&cloud.events, sent);
    delivery.assert_exact(sent, "flapping link");
    // Every downstream version reaches the module at least once.
    let mut seen_rv = 0;
    while seen_rv < pushed_rv {
        let m = next_cloud_message(&probe_rx);
        seen_rv = seen_rv.max(m.header.resource_version.parse().unwrap_or(0));
    }
    assert!(Status::get(&agent.status().sessions) as u64 >= flaps);
    agent.stop();
}

#[test]
fn link_cut_mid_frame_loses_nothing() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let agent = Agent::start(fast_config(&cloud, &proxy.addr().to_string()), vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    let hub = agent.hub();
    let mut delivery = Delivery::default();
    let mut next = 0;
    for round in 0..5 {
        // Cut after an odd number of bytes: inside a TLS record, inside a frame.
        proxy.cut_after(1_000 + round * 777);
        for _ in 0..100 {
            hub.send(numbered(next)).unwrap();
            next += 1;
        }
        wait_connection_event(&probe_rx, message::CLOUD_DISCONNECTED);
        wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    }
    delivery.collect(&cloud.events, next);
    delivery.assert_exact(next, "cut mid-frame");
    agent.stop();
}

#[test]
fn torn_spool_after_a_power_cut_keeps_earlier_records_and_the_agent_starts() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let config = cloud.config();
    let spool_dir = config.state_dir.join("spool");
    {
        // A previous run that queued 100 messages and never reached the cloud.
        let options = SpoolOptions { dir: spool_dir.clone(), sync_interval: Duration::ZERO };
        let outbox = Outbox::open(Limits::simple(1000, 1 << 20, 100, 100), &options).unwrap();
        for seq in 0..100 {
            outbox.push(numbered(seq)).unwrap();
        }
    }
    let segment = std::fs::read_dir(&spool_dir).unwrap().next().unwrap().unwrap().path();
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(len - 7).unwrap();
    let agent = Agent::start(config, vec![]).unwrap();
    let mut delivery = Delivery::default();
    delivery.collect(&cloud.events, 99);
    delivery.assert_exact(99, "torn spool");
    agent.stop();
}

#[test]
fn outage_longer_than_the_bounds_keeps_memory_capped_and_counts_drops() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    proxy.refuse_new(true); // the cloud is unreachable from the start
    let mut config = cloud.config_to(&proxy.addr().to_string());
    config.outbox_max_messages = 1_000;
    config.outbox_max_bytes = 4 << 20;
    config.outbox_full_policy = FullPolicy::DropOldest;
    let agent = Agent::start(config, vec![]).unwrap();
    let hub = agent.hub();
    let pad = "p".repeat(1000);
    let rss_before = vm_rss_kib();
    const OFFERED: u32 = 100_000; // ~100 MB if it were all kept
    for seq in 0..OFFERED {
        let mut m = numbered(seq);
        m.content = message::json_content(&format!(r#"{{"seq":{seq},"pad":"{pad}"}}"#)).unwrap();
        hub.send(m).unwrap();
    }
    let growth_kib = vm_rss_kib().saturating_sub(rss_before);
    eprintln!("outage: VmRSS grew {growth_kib} KiB while {OFFERED} messages of 1 KiB were offered");
    assert!(growth_kib < 16 << 10, "memory grew {growth_kib} KiB beyond the ~1 MiB outbox cap");
    assert_eq!(agent.outbox_len(), 1_000);
    let dropped = agent.outbox_counters().dropped_oldest.load(Ordering::Relaxed);
    assert_eq!(dropped, OFFERED - 1_000, "every drop counted");
    proxy.refuse_new(false);
    // The newest 1,000 arrive, in order; everything older was dropped and counted.
    let mut got = Vec::new();
    while got.len() < 1_000 {
        got.push(cloud.wait_for("numbered", |e| match e {
            SimEvent::Received { msg, .. } => seq_of(msg),
            _ => None,
        }));
    }
    assert_eq!(got, (OFFERED - 1_000..OFFERED).collect::<Vec<_>>());
    agent.stop();
}

#[test]
fn expired_messages_are_not_sent_after_an_outage() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    proxy.refuse_new(true);
    let mut config = cloud.config_to(&proxy.addr().to_string());
    // Longer than a reconnect (2 x 0.3 s heartbeat), shorter than the outage below.
    config.message_ttl = Seconds(Duration::from_secs(2));
    let agent = Agent::start(config, vec![]).unwrap();
    let hub = agent.hub();
    for seq in 0..50 {
        hub.send(numbered(seq)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(2_200)); // the outage outlives the TTL
    for seq in 50..60 {
        hub.send(numbered(seq)).unwrap();
    }
    proxy.refuse_new(false);
    let mut got = Vec::new();
    while got.len() < 10 {
        got.push(cloud.wait_for("numbered", |e| match e {
            SimEvent::Received { msg, .. } => seq_of(msg),
            _ => None,
        }));
    }
    assert_eq!(got, (50..60).collect::<Vec<_>>());
    assert_eq!(agent.outbox_expired(), 50);
    agent.stop();
}

#[test]
fn cloud_resends_an_ack_queue_message_five_times_the_module_sees_it_once() {
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start_with(|c| {
        c.ack_retry_interval = Duration::from_millis(100);
        c.ack_requeue_delay = Duration::from_millis(200);
    });
    // A module that ACKs only when told to.
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let (seen_tx, seen_rx) = crossbeam_channel::unbounded();
    let slow = edgehub::modules::ModuleSpec::new("slow", &["meta"], move |ctx| {
        for msg in ctx.inbox.iter() {
            if msg.route.resource == message::CONNECTION_RESOURCE {
                continue;
            }
            let _ = seen_tx.send(msg.clone());
            let _ = go_rx.recv();
            ctx.hub.ack(&msg);
        }
    });
    let agent = Agent::start(cloud.config(), vec![slow]).unwrap();
    cloud.wait_connected();
    let msg = cloud_msg("resource", "edgecontroller", "insert", "default/configmap/slow", "9");
    cloud.sim.push(NODE, msg.clone());
    assert_eq!(recv_within(&seen_rx, "first delivery").header.id, msg.header.id);
    cloud.wait_for("fifth write", |e| matches!(e, SimEvent::Sent { attempt: 5, .. }).then_some(()));
    go_tx.send(()).unwrap();
    cloud.wait_for("ack", |e| {
        matches!(e, SimEvent::Ack { parent_id, .. } if *parent_id == msg.header.id).then_some(())
    });
    // The ACK can overtake the reader's handling of the fifth copy (the module writes it itself).
    support::wait_until("four re-sends counted", || Status::get(&agent.status().redeliveries) >= 4);
    assert!(seen_rx.try_recv().is_err(), "the module saw the message once");
    agent.stop();
}

/// The figure for the issue note: half-open detection with edgecore's default timing (heartbeat
/// 15 s, readDeadline 15 s). Slow, so ignored; run it with
/// `cargo test --features cloudsim --test faults -- --ignored --nocapture half_open_default`.
#[test]
#[ignore = "takes up to 30 s"]
fn half_open_default_settings_detection_time() {
    let _w = watchdog(Duration::from_secs(90));
    let cloud = Cloud::start();
    let proxy = Proxy::start(cloud.sim.addr()).unwrap();
    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let mut config = cloud.config_to(&proxy.addr().to_string());
    config.heartbeat = Seconds(edgehub::config::DEFAULT_HEARTBEAT);
    config.websocket.read_deadline = Seconds(edgehub::config::DEFAULT_READ_DEADLINE);
    let agent = Agent::start(config, vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    cloud.wait_for("ping", |e| matches!(e, SimEvent::Ping { .. }).then_some(()));
    let stalled_at = Instant::now();
    proxy.set_mode(Mode::Stall);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match probe_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(m) if m.content_text().as_deref() == Some(message::CLOUD_DISCONNECTED) => break,
            Ok(_) => continue,
            Err(_) => panic!("half-open link not detected within 60 s"),
        }
    }
    eprintln!(
        "half-open detected {:.1} s after the link went silent (defaults)",
        stalled_at.elapsed().as_secs_f64()
    );
    // The figure is printed above; the bound only says the read deadline did it (issue 11:
    // no tight timing in tests).
    assert!(
        stalled_at.elapsed() <= edgehub::config::DEFAULT_READ_DEADLINE + Duration::from_secs(5)
    );
    agent.stop();
}
