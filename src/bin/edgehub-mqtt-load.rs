//! `edgehub-mqtt-load`: an MQTT publisher for the benchmarks (`scripts/bench.sh`, MQTT→cloud row).
//! It stands in for a mapper or an edge app flooding the broker: it publishes bench content
//! (`{"bench":<seq>,"sent_ns":<unix ns>,"pad":"…"}`, as `edgehub::cloudsim::load` reads it) on one
//! topic at `--rate` per second (or as fast as the broker takes them) for `--duration` seconds,
//! through edgehub's own MQTT client at QoS 1, then prints one JSON summary line. It never drops:
//! when its queue holds `--window` publishes it waits for the broker (back-pressure).

use argh::FromArgs;
use edgehub::cloudsim::load::bench_content;
use edgehub::mqtt::{ClientBuilder, Options};
use edgehub::Config;
use serde_json::json;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(FromArgs)]
/// Publish bench content to an MQTT broker at a rate, then print a JSON summary line.
struct Args {
    /// broker, tcp://host:port
    #[argh(option)]
    broker: String,
    /// topic to publish on (default default/user/bench: uploaded by the EventBus)
    #[argh(option, default = "String::from(\"default/user/bench\")")]
    topic: String,
    /// publishes per second (default -1: as fast as the broker takes them)
    #[argh(option, default = "-1")]
    rate: i64,
    /// bytes of content per publish (default 130)
    #[argh(option, default = "130")]
    size: usize,
    /// seconds of load (default 20)
    #[argh(option, default = "20.0")]
    duration: f64,
    /// publishes queued or unacknowledged at most before waiting (default 1000)
    #[argh(option, default = "1000")]
    window: u32,
    /// act as a twin mapper instead: report twin `bench` of devices `bench-0`…`bench-<N-1>` in
    /// turn on `$hw/events/device/<id>/twin/update`, the value `<seq>:<sent ns>` (default 0: off)
    #[argh(option, default = "0")]
    twin_devices: u64,
}

/// A mapper's twin report of device `bench-<seq % devices>`: its `bench` twin's value carries the
/// stamp, so the simulator can read it back from `edge_updated`.
fn twin_report(seq: u64, devices: u64) -> (String, Vec<u8>) {
    let topic = format!("$hw/events/device/bench-{}/twin/update", seq % devices);
    let value = format!("{seq}:{}", edgehub::cloudsim::load::unix_ns());
    let payload =
        json!({"event_id": seq.to_string(), "twin": {"bench": {"actual": {"value": value}}}});
    (topic, payload.to_string().into_bytes())
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let mut config = Config::from_json("{}").unwrap_or_default();
    config.event_bus.mqtt_server_external = args.broker.clone();
    config.event_bus.mqtt_sub_client_id = format!("edgehub-mqtt-load-{}", std::process::id());
    config.event_bus.mqtt_session_queue_size = args.window as usize * 2;
    config.event_bus.mqtt_queue_max_bytes = (args.window as usize * 2) * (args.size + 256);
    let options = match Options::from_config(&config) {
        Ok(Some(options)) => options,
        Ok(None) => {
            eprintln!("edgehub-mqtt-load: --broker is empty");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("edgehub-mqtt-load: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match ClientBuilder::new(options).start() {
        Ok(client) => client,
        Err(e) => {
            eprintln!("edgehub-mqtt-load: {e}");
            return ExitCode::from(1);
        }
    };
    let publisher = client.publisher();
    let connect_deadline = Instant::now() + Duration::from_secs(30);
    while !publisher.is_connected() {
        if Instant::now() > connect_deadline {
            eprintln!("edgehub-mqtt-load: not connected to {} within 30 s", args.broker);
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let mut seq = 0u64;
    while started.elapsed() < duration {
        if args.rate > 0 {
            let due = (started.elapsed().as_secs_f64() * args.rate as f64) as u64;
            if seq >= due {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        if publisher.stats().queued >= args.window {
            std::thread::sleep(Duration::from_micros(200)); // the broker is behind: wait for it
            continue;
        }
        let (topic, payload) = if args.twin_devices > 0 {
            twin_report(seq, args.twin_devices)
        } else {
            (args.topic.clone(), bench_content(seq, args.size).get().as_bytes().to_vec())
        };
        if let Err(e) = publisher.publish(&topic, payload) {
            eprintln!("edgehub-mqtt-load: publish: {e}");
            return ExitCode::from(1);
        }
        seq += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Let the last publishes reach the broker before counting.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while publisher.stats().queued > 0 && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = publisher.stats();
    client.stop();
    println!(
        "{}",
        json!({
            "event": "mqtt_load_summary",
            "sent": seq,
            "acked": stats.published,
            "queue_dropped": stats.queue_dropped,
            "rate": (seq as f64 / elapsed).round(),
            "duration_s": (elapsed * 10.0).round() / 10.0,
        })
    );
    ExitCode::SUCCESS
}
