#![cfg(feature = "cloudsim")]
//! The MQTT client against a real mosquitto: subscribe and publish round trip, a broker restart
//! mid-stream with nothing accepted lost, a flood with bounded queues and counted drops,
//! credentials, and packets over the size limit.

mod support;

use edgehub::config::{Config, Seconds};
use edgehub::mqtt::{ClientBuilder, Options, Publish};
use std::time::Duration;
use support::mosquitto::Mosquitto;
use support::{recv_within, wait_until, watchdog};

fn options_for(broker: &Mosquitto, tune: impl FnOnce(&mut Config)) -> Options {
    let mut config = Config::from_json("{}").unwrap();
    config.event_bus.mqtt_server_external = broker.url();
    config.event_bus.mqtt_keep_alive = Seconds(Duration::from_secs(5));
    tune(&mut config);
    config.event_bus.validate().unwrap();
    Options::from_config(&config).unwrap().expect("mqtt is on")
}

fn topics(rx: &crossbeam_channel::Receiver<Publish>, n: usize) -> Vec<String> {
    (0..n).map(|_| recv_within(rx, "a publish").topic).collect()
}

#[test]
fn publishes_reach_the_route_whose_filter_matches() {
    let _w = watchdog(Duration::from_secs(60));
    let Some(broker) = Mosquitto::start_or_skip("publishes_reach_the_route_whose_filter_matches")
    else {
        return;
    };
    let mut builder = ClientBuilder::new(options_for(&broker, |_| {}));
    let twin = builder.route(&["$hw/events/device/+/twin/+"], 16);
    let bus = builder.route(&["+/user/#"], 16);
    let rest = builder.route_rest(16);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    wait_until("connected", || publisher.is_connected());
    // Our own publishes come back through our subscriptions: a full round trip via the broker.
    publisher.subscribe("extra/+").unwrap();
    wait_until("subscribed", || {
        publisher.publish("extra/ping", b"p".to_vec()).unwrap();
        rest.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    publisher.publish("$hw/events/device/d1/twin/update", b"{\"a\":1}".to_vec()).unwrap();
    publisher.publish("default/user/x", b"hello".to_vec()).unwrap();
    let got = recv_within(&twin, "twin publish");
    assert_eq!(got.topic, "$hw/events/device/d1/twin/update");
    assert_eq!(got.payload, b"{\"a\":1}");
    let got = recv_within(&bus, "bus publish");
    assert_eq!((got.topic.as_str(), got.payload.as_slice()), ("default/user/x", &b"hello"[..]));
    let stats = publisher.stats();
    assert!(stats.connected && stats.connects == 1, "{stats:?}");
    client.stop();
    assert!(publisher.publish("a", vec![]).is_err(), "a stopped client refuses publishes");
}

#[test]
fn broker_restart_mid_stream_loses_nothing_accepted() {
    let _w = watchdog(Duration::from_secs(120));
    let Some(mut broker) =
        Mosquitto::start_or_skip("broker_restart_mid_stream_loses_nothing_accepted")
    else {
        return;
    };
    let mut builder = ClientBuilder::new(options_for(&broker, |c| {
        c.event_bus.mqtt_session_queue_size = 1000;
    }));
    let rx = builder.route(&["seq/#"], 2000);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    wait_until("connected", || publisher.is_connected());
    wait_until("subscribed", || {
        publisher.publish("seq/probe", vec![]).unwrap();
        rx.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    while rx.try_recv().is_ok() {}

    for i in 0..100 {
        publisher.publish(&format!("seq/{i}"), vec![]).unwrap();
    }
    let first = topics(&rx, 100);
    // Every PUBACK in, so the kill cannot make a publish count as unacknowledged (and be sent
    // twice, as QoS 1 allows).
    wait_until("all acknowledged", || publisher.stats().queued == 0);
    broker.restart();
    // Published while the broker is away or coming back: all kept, sent after the reconnect.
    for i in 100..300 {
        publisher.publish(&format!("seq/{i}"), vec![]).unwrap();
    }
    wait_until("reconnected", || publisher.stats().connects >= 2);
    let second = topics(&rx, 200);
    let mut all: Vec<String> = first.into_iter().chain(second).collect();
    all.retain(|t| t != "seq/probe");
    let want: Vec<String> = (0..300).map(|i| format!("seq/{i}")).collect();
    assert_eq!(all, want, "every publish arrives once, in order");
    assert_eq!(publisher.stats().queue_dropped, 0);
}

#[test]
fn a_full_queue_drops_the_oldest_and_counts() {
    let _w = watchdog(Duration::from_secs(60));
    let Some(mut broker) = Mosquitto::start_or_skip("a_full_queue_drops_the_oldest_and_counts")
    else {
        return;
    };
    broker.kill(); // nobody to send to: everything waits in the queue
    let mut builder = ClientBuilder::new(options_for(&broker, |c| {
        c.event_bus.mqtt_session_queue_size = 10;
        c.event_bus.mqtt_queue_max_bytes = 4096;
    }));
    let rx = builder.route(&["q/#"], 100);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    for i in 0..50 {
        publisher.publish(&format!("q/{i}"), vec![b'x'; 10]).unwrap();
    }
    let stats = publisher.stats();
    assert_eq!((stats.queued, stats.queue_dropped), (10, 40), "{stats:?}");
    // Bytes bound: 10 × 1000-byte payloads do not fit in 4096.
    for i in 0..10 {
        publisher.publish(&format!("q/big{i}"), vec![b'y'; 1000]).unwrap();
    }
    let stats = publisher.stats();
    assert!(stats.queued <= 4, "{stats:?}");
    assert!(publisher.publish("q/huge", vec![0; 5000]).is_err(), "bigger than the whole queue");
    broker.restart();
    wait_until("connected", || publisher.is_connected());
    // What was kept is the newest: the last big ones, in order.
    let mut kept = Vec::new();
    wait_until("queue sent", || publisher.stats().queued == 0);
    while let Ok(p) = rx.recv_timeout(Duration::from_millis(500)) {
        kept.push(p.topic);
    }
    // The subscription may come after the first publishes reached the broker; what arrives must
    // be a suffix of the newest ones, and the counters must add up.
    assert!(kept.iter().all(|t| t.starts_with("q/big")), "{kept:?}");
    let stats = publisher.stats();
    assert_eq!(stats.published + stats.queue_dropped, 60, "{stats:?}");
    client.stop();
}

#[test]
fn user_name_and_password_are_sent() {
    let _w = watchdog(Duration::from_secs(60));
    let Some(mut broker) = Mosquitto::start_or_skip("user_name_and_password_are_sent") else {
        return;
    };
    broker.require_password("mapper", "s3cret");
    broker.restart();
    let mut builder = ClientBuilder::new(options_for(&broker, |c| {
        c.event_bus.mqtt_username = "mapper".into();
        c.event_bus.mqtt_password = "s3cret".into();
    }));
    let rx = builder.route(&["auth/#"], 4);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    wait_until("connected with credentials", || publisher.is_connected());
    wait_until("round trip", || {
        publisher.publish("auth/x", b"1".to_vec()).unwrap();
        rx.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    client.stop();

    // A wrong password never connects, and says why without crashing.
    let builder = ClientBuilder::new(options_for(&broker, |c| {
        c.event_bus.mqtt_username = "mapper".into();
        c.event_bus.mqtt_password = "wrong".into();
    }));
    let client = builder.start().unwrap();
    std::thread::sleep(Duration::from_secs(1)); // nothing to wait for: it must stay down
    assert!(!client.publisher().is_connected());
    assert_eq!(client.publisher().stats().connects, 0);
    client.stop();
}

#[test]
fn a_packet_over_the_size_limit_is_skipped_and_the_connection_goes_on() {
    let _w = watchdog(Duration::from_secs(60));
    let Some(broker) = Mosquitto::start_or_skip("oversized") else {
        return;
    };
    let mut builder = ClientBuilder::new(options_for(&broker, |c| {
        c.event_bus.mqtt_max_packet_bytes = 2048;
    }));
    let rx = builder.route(&["big/#"], 16);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    wait_until("subscribed", || {
        publisher.publish("big/probe", vec![]).unwrap();
        rx.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    publisher.publish("big/huge", vec![b'z'; 100_000]).unwrap();
    publisher.publish("big/after", b"ok".to_vec()).unwrap();
    loop {
        let p = recv_within(&rx, "the publish after the oversized one");
        if p.topic == "big/after" {
            break;
        }
        assert_eq!(p.topic, "big/probe");
    }
    let stats = publisher.stats();
    assert_eq!((stats.oversized, stats.connects), (1, 1), "{stats:?}");
    client.stop();
}

#[test]
fn tls_to_the_broker_with_a_client_certificate() {
    let _w = watchdog(Duration::from_secs(60));
    let certs = support::TempDir::new("mqtt-tls");
    let pki = edgehub::cloudsim::pki::Pki::generate("mapper-host").unwrap();
    let paths = pki.write_to(certs.path()).unwrap();
    let extra = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        paths.ca_cert.display(),
        paths.server_cert.display(),
        paths.server_key.display()
    );
    let Some(broker) = Mosquitto::start_with_or_skip("tls", &extra) else {
        return;
    };
    let tls_options = |with_client_cert: bool| {
        options_for(&broker, |c| {
            c.event_bus.mqtt_server_external = format!("ssl://127.0.0.1:{}", broker.port);
            c.event_bus.event_bus_tls.enable = true;
            c.event_bus.event_bus_tls.tls_mqtt_ca_file = paths.ca_cert.clone();
            if with_client_cert {
                c.event_bus.event_bus_tls.tls_mqtt_cert_file = paths.client_cert.clone();
                c.event_bus.event_bus_tls.tls_mqtt_private_key_file = paths.client_key.clone();
            } else {
                c.event_bus.event_bus_tls.tls_mqtt_cert_file = Default::default();
            }
        })
    };
    let mut builder = ClientBuilder::new(tls_options(true));
    let rx = builder.route(&["secure/#"], 4);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    wait_until("round trip over tls", || {
        publisher.publish("secure/x", b"1".to_vec()).unwrap();
        rx.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    client.stop();

    // Without the client certificate the broker refuses; the client keeps trying, never crashes.
    let client = ClientBuilder::new(tls_options(false)).start().unwrap();
    std::thread::sleep(Duration::from_secs(1)); // nothing to wait for: it must stay down
    assert_eq!(client.publisher().stats().connects, 0);
    client.stop();

    // A CA that did not sign the broker's certificate: never connected.
    let other = edgehub::cloudsim::pki::Pki::generate("other").unwrap();
    let other_dir = support::TempDir::new("mqtt-tls-other");
    let other_paths = other.write_to(other_dir.path()).unwrap();
    let mut options = tls_options(true);
    if let Some(tls) = options.tls.as_mut() {
        tls.ca = other_paths.ca_cert.clone();
    }
    let client = ClientBuilder::new(options).start().unwrap();
    std::thread::sleep(Duration::from_secs(1)); // nothing to wait for: it must stay down
    assert_eq!(client.publisher().stats().connects, 0);
    client.stop();

    // A CA file that does not exist fails the start, naming the key.
    let mut options = tls_options(true);
    if let Some(tls) = options.tls.as_mut() {
        tls.ca = certs.path().join("missing.crt");
    }
    let err = ClientBuilder::new(options).start().err().expect("a missing CA fails").to_string();
    assert!(err.contains("tlsMqttCAFile"), "{err}");
}

#[test]
fn a_full_consumer_is_waited_for_then_dropped_without_stalling_the_others() {
    let _w = watchdog(Duration::from_secs(60));
    let Some(broker) = Mosquitto::start_or_skip("full_consumer") else {
        return;
    };
    let mut builder = ClientBuilder::new(options_for(&broker, |_| {}));
    let slow = builder.route(&["slow/#"], 2);
    let fast = builder.route(&["fast/#"], 100);
    let client = builder.start().unwrap();
    let publisher = client.publisher();
    wait_until("subscribed", || {
        publisher.publish("fast/probe", vec![]).unwrap();
        fast.recv_timeout(Duration::from_millis(200)).is_ok()
    });
    while fast.try_recv().is_ok() {}
    for i in 0..10 {
        publisher.publish(&format!("slow/{i}"), vec![]).unwrap();
    }
    publisher.publish("fast/after", vec![]).unwrap();
    // The slow consumer holds two; the third waited 1 s in vain, the rest were dropped at once.
    assert_eq!(recv_within(&fast, "the fast consumer's publish").topic, "fast/after");
    assert_eq!(publisher.stats().delivery_dropped, 8);
    assert_eq!(topics(&slow, 2), ["slow/0", "slow/1"]);
    // Once it takes publishes again it gets them again.
    publisher.publish("slow/again", vec![]).unwrap();
    assert_eq!(recv_within(&slow, "the slow consumer's next publish").topic, "slow/again");
    client.stop();
}
