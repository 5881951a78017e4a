//! Thread hygiene over many reconnects: no session thread outlives its session (KubeEdge leaks
//! goroutines here, protocol §8 W3), and the outbox loses nothing across disconnects (§8 W1).
//! In a file of its own so other tests' threads do not skew the count.
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::config::Seconds;
use edgehub::message;
use edgehub::Agent;
use std::time::Duration;
use support::*;

#[test]
fn fifty_forced_reconnects_leave_no_thread_behind_and_lose_nothing() {
    let _w = watchdog(Duration::from_secs(120));
    let cloud = Cloud::start();
    let mut config = cloud.config();
    config.heartbeat = Seconds(Duration::from_millis(50));
    let (probe, probe_rx) = capture_module("probe", &["meta"], true);
    let agent = Agent::start(config, vec![probe]).unwrap();
    wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    let hub = agent.hub();
    let mut next_seq = 0;
    let mut received = Vec::new();
    let collect = |upto: u32, received: &mut Vec<u32>| {
        while received.last().map_or(upto > 0, |&last| last + 1 < upto) {
            received.push(cloud.wait_for("numbered message", |e| match e {
                SimEvent::Received { msg, .. } => seq_of(msg),
                _ => None,
            }));
        }
    };
    let mut baseline = None;
    for round in 0..50 {
        // Prove each session thread is running (so its name is set) before counting threads:
        // the writer by delivering, the reader by receiving, the heartbeat by a keepalive.
        for _ in 0..10 {
            hub.send(numbered(next_seq)).unwrap();
            next_seq += 1;
        }
        collect(next_seq, &mut received);
        let down = cloud_msg(
            "resource",
            "edgecontroller",
            "update",
            "default/pod/p",
            &(round + 1).to_string(),
        );
        cloud.sim.push(NODE, down.clone());
        assert_eq!(next_cloud_message(&probe_rx), down);
        // Cut only once the ACK is in, or the cloud rightly re-sends `down` next session.
        cloud.wait_for("ack", |e| {
            matches!(e, SimEvent::Ack { parent_id, .. } if *parent_id == down.header.id)
                .then_some(())
        });
        cloud.wait_received("keepalive", |m| m.route.operation == "keepalive");
        // A joined thread can stay listed in /proc for a moment after its join returned.
        let baseline = baseline.get_or_insert_with(agent_threads).clone();
        wait_until(&format!("threads back to the baseline in round {round}"), || {
            agent_threads() == baseline
        });

        cloud.sim.cut(NODE);
        wait_connection_event(&probe_rx, message::CLOUD_DISCONNECTED);
        // Sent while disconnected: must wait in the outbox and go first after the reconnect.
        for _ in 0..5 {
            hub.send(numbered(next_seq)).unwrap();
            next_seq += 1;
        }
        wait_connection_event(&probe_rx, message::CLOUD_CONNECTED);
    }
    assert_eq!(
        baseline.as_deref(),
        Some(
            &["eh-heartbeat", "eh-probe", "eh-reader", "eh-supervisor", "eh-writer"]
                .map(String::from)[..]
        )
    );
    collect(next_seq, &mut received);
    assert_eq!(received, (0..next_seq).collect::<Vec<_>>(), "every message exactly once, in order");
    // The last messages stay in flight until the cloud's pong confirms them.
    wait_until("outbox confirmed empty", || agent.outbox_len() == 0);
    agent.stop();
    wait_until("every agent thread joined after stop", || agent_threads().is_empty());
}
