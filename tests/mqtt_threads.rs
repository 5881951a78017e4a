#![cfg(feature = "cloudsim")]
//! MQTT thread hygiene: every broker restart ends its connection's reader thread (none is left
//! behind), and stopping the client joins them all. In a file of its own so other tests' threads
//! do not skew the count.

mod support;

use edgehub::config::{Config, Seconds};
use edgehub::mqtt::{ClientBuilder, Options};
use std::time::Duration;
use support::mosquitto::Mosquitto;
use support::{agent_threads, threads_left_after_stop, wait_until, watchdog};

#[test]
fn ten_broker_restarts_leave_one_reader_and_stop_leaves_none() {
    let _w = watchdog(Duration::from_secs(180));
    let Some(mut broker) = Mosquitto::start_or_skip("mqtt_threads") else { return };
    let mut config = Config::from_json("{}").unwrap();
    config.event_bus.mqtt_server_external = broker.url();
    config.event_bus.mqtt_keep_alive = Seconds(Duration::from_secs(5));
    let mut builder = ClientBuilder::new(Options::from_config(&config).unwrap().unwrap());
    let _rx = builder.route(&["x/#"], 4);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    for round in 1..=10u32 {
        wait_until("connected", || publisher.stats().connects == round && publisher.is_connected());
        // A new thread bears its parent's name until it has named itself: wait for that.
        wait_until("one reader", || {
            let threads = agent_threads();
            let readers = threads.iter().filter(|t| *t == "eh-mqtt-read").count();
            assert!(readers <= 1, "round {round}: {threads:?}");
            readers == 1 && threads.len() == 2
        });
        broker.restart();
    }
    client.stop();
    let left = threads_left_after_stop(|t| t.starts_with("eh-mqtt"));
    assert!(left.is_empty(), "{left:?}");
}
