#![cfg(feature = "cloudsim")]
//! The local API over its real Unix socket, with the agent talking to the CloudHub simulator over
//! real TLS: subscriptions by group, connection events, send across a disconnect,
//! request/response and its timeout, ACKs from clients, a slow client cut off while another keeps
//! receiving, malformed lines, the socket file's life (mode, stale file, live agent, removal and no
//! thread left), and the `edgehub` client commands used from a shell.

mod support;

use edgehub::cloudsim::SimEvent;
use edgehub::message::{json_content, Message, Route};
use edgehub::modules::{local_api, meta_store};
use edgehub::{Agent, Config, ErrorKind};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::RwLock;
use std::time::Duration;
use support::*;

/// Tests take it shared; the one that counts threads takes it exclusively, so no other test's
/// threads are running while it counts.
static THREAD_COUNT: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    THREAD_COUNT.read().unwrap_or_else(|e| e.into_inner())
}

/// The cloud's config for an agent whose local API listens in `dir`.
fn api_config(cloud: &Cloud, dir: &TempDir) -> Config {
    let mut config = cloud.config();
    config.local_api_socket = dir.path().join("api.sock");
    config
}

/// An agent running only the local API, connected to `cloud`.
fn api_agent(cloud: &Cloud, config: Config) -> (Agent, PathBuf) {
    let socket = config.local_api_socket.clone();
    let spec = local_api::spec(local_api::Settings::from_config(&config), None, None).unwrap();
    let agent = Agent::start(config, vec![spec]).unwrap();
    cloud.wait_connected();
    (agent, socket)
}

/// A raw line-protocol client, so the tests check the protocol itself. Every read is bounded.
struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Client { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn send(&mut self, request: Value) {
        self.send_raw(format!("{request}\n").as_bytes());
    }

    /// The next line, parsed.
    fn next(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("a line within PATIENCE");
        assert!(n > 0, "agent closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn call(&mut self, request: Value) -> Value {
        self.send(request);
        self.next()
    }

    /// Subscribes, checks the reply, and reads link-state events until the module knows the
    /// link is up (the simulator reports the connection a moment before the agent's modules hear
    /// of it, so the first state may still be "down").
    fn subscribe(&mut self, groups: &[&str]) {
        let reply = self.call(json!({"op": "subscribe", "groups": groups}));
        assert_eq!(reply["ok"], true, "{reply}");
        let mut state = self.next();
        if state == json!({"event": "connection", "connected": false}) {
            state = self.next();
        }
        assert_eq!(state, json!({"event": "connection", "connected": true}));
    }

    /// The message of the next event, which must be a message event for `group`.
    fn next_message(&mut self, group: &str) -> Message {
        let event = self.next();
        assert_eq!(event["event"], "message", "{event}");
        assert_eq!(event["group"], group, "{event}");
        Message::decode(event["message"].to_string().as_bytes()).unwrap()
    }
}

fn user_msg(resource: &str, content: &str) -> Message {
    Message::new(
        Route {
            source: "router_eventbus".into(),
            group: "user".into(),
            operation: "publish".into(),
            resource: resource.into(),
            ..Route::default()
        },
        json_content(content).unwrap(),
    )
}

/// A twin message CloudHub sends without waiting for an ACK (`twin/cloud_updated`).
fn twin_msg(device: &str) -> Message {
    let mut msg = cloud_msg("twin", "twin", "update", "", "");
    msg.route.resource = format!("$hw/events/device/{device}/twin/cloud_updated");
    msg
}

fn wait_ack(cloud: &Cloud, id: &str) {
    cloud.wait_for("ack", |e| {
        matches!(e, SimEvent::Ack { parent_id, .. } if parent_id == id).then_some(())
    });
}

#[test]
fn two_clients_on_different_groups_each_get_only_theirs() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-groups");
    let (agent, socket) = api_agent(&cloud, api_config(&cloud, &dir));
    let mut twin = Client::connect(&socket);
    let mut other = Client::connect(&socket);
    twin.subscribe(&["twin"]);
    other.subscribe(&["bus", "my-app"]);

    let t1 = twin_msg("dev-1");
    let u1 = user_msg("events/temp", r#"{"c":21}"#);
    // A custom group travels in the cloud's ACK queue: the client must ACK it.
    let custom = cloud_msg("my-app", "my-controller", "update", "default/widget/w1", "17");
    let (t2, u2) = (twin_msg("dev-2"), user_msg("events/temp", r#"{"c":22}"#));
    for msg in [&t1, &u1, &custom, &t2, &u2] {
        cloud.sim.push(NODE, msg.clone());
    }
    // No-ack messages keep their order, so a wrongly routed one would come before the marker.
    assert_eq!(twin.next_message("twin"), t1);
    assert_eq!(twin.next_message("twin"), t2);
    let mut got = Vec::new();
    while got.len() < 3 {
        let event = other.next();
        let msg = Message::decode(event["message"].to_string().as_bytes()).unwrap();
        assert_eq!(event["group"], if msg.route.group == "user" { "bus" } else { "my-app" });
        got.push(msg);
    }
    assert!(got.contains(&u1) && got.contains(&custom) && got.contains(&u2), "{got:?}");
    let bus: Vec<_> = got.iter().filter(|m| m.route.group == "user").collect();
    assert_eq!(bus, [&u1, &u2]);

    let got_custom = got.iter().find(|m| m.route.group == "my-app").unwrap();
    let reply = other.call(json!({"op": "ack", "message": got_custom, "id": "a-1"}));
    assert_eq!(reply, json!({"ok": true, "id": "a-1", "acked": true}));
    wait_ack(&cloud, &custom.header.id);
    // A message that needs no ACK says so.
    let reply = twin.call(json!({"op": "ack", "message": t1}));
    assert_eq!(reply, json!({"ok": true, "acked": false}));
    agent.stop();
}

#[test]
fn connection_events_reach_subscribers_and_send_survives_a_disconnect() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-conn");
    let (agent, socket) = api_agent(&cloud, api_config(&cloud, &dir));
    let mut client = Client::connect(&socket);
    client.subscribe(&["twin"]);
    let mut quiet = Client::connect(&socket); // subscribes to nothing: gets no events

    cloud.sim.cut(NODE);
    assert_eq!(client.next(), json!({"event": "connection", "connected": false}));
    let msg = json!({"route": {"source": "mapper", "group": "twin", "operation": "update",
                               "resource": "$hw/events/device/dev-1/twin/update"},
                     "content": {"temperature": "21"}});
    let reply = client.call(json!({"op": "send", "message": msg}));
    assert_eq!(reply["ok"], true, "{reply}");
    let id = reply["msgId"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "the agent filled in the msg_id");
    // The reply came before the reconnect event on the same stream: it was queued while down.
    assert_eq!(client.next(), json!({"event": "connection", "connected": true}));
    let up = cloud.wait_received("the message sent while down", |m| m.header.id == id);
    assert_eq!(up.content.get(), r#"{"temperature":"21"}"#);
    assert!(up.header.timestamp > 1_600_000_000_000, "the agent filled in the timestamp");

    let reply = quiet.call(json!({"op": "send", "message": msg, "id": 1}));
    assert_eq!((reply["ok"].clone(), reply["id"].clone()), (json!(true), json!(1)), "{reply}");
    agent.stop();
}

#[test]
fn request_gets_its_response_other_clients_are_not_held_and_timeout_is_clear() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-request");
    let (agent, socket) = api_agent(&cloud, api_config(&cloud, &dir));
    let mut asker = Client::connect(&socket);
    let mut other = Client::connect(&socket);

    let query = cloud_msg("meta", "edged", "query", "default/configmap/app-cfg", "");
    asker.send(json!({"op": "request", "message": query, "timeoutMs": 5000}));
    let seen = cloud.wait_received("the request", |m| m.header.id == query.header.id);
    // While `asker` waits for the cloud, `other` is served.
    let reply = other.call(json!({"op": "send", "message": numbered(1)}));
    assert_eq!(reply["ok"], true, "{reply}");
    cloud.wait_received("other's message", |m| seq_of(m) == Some(1));

    let mut response = seen.response_to(json_content(r#"{"data":{"k":"v"}}"#).unwrap());
    response.route.source = "edgecontroller".into();
    response.route.group = "resource".into();
    response.header.resource_version = "4711".into(); // it travels in the ACK queue
    cloud.sim.push(NODE, response.clone());
    let reply = asker.next();
    assert_eq!(reply["ok"], true, "{reply}");
    let got = Message::decode(reply["message"].to_string().as_bytes()).unwrap();
    assert_eq!(got, response);
    let reply = asker.call(json!({"op": "ack", "message": got}));
    assert_eq!(reply["acked"], true, "{reply}");
    wait_ack(&cloud, &response.header.id);

    let lonely = cloud_msg("meta", "edged", "query", "default/secret/s", "");
    let reply = asker.call(json!({"op": "request", "message": lonely, "timeoutMs": 300}));
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["kind"], "timeout", "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("no response"), "{reply}");
    let reply = asker.call(json!({"op": "request", "message": lonely, "timeoutMs": 0}));
    assert_eq!(reply["kind"], "bad_request", "{reply}");
    agent.stop();
}

#[test]
fn slow_client_is_cut_off_while_another_keeps_receiving() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-slow");
    let mut config = api_config(&cloud, &dir);
    config.local_client_queue = 64;
    let (agent, socket) = api_agent(&cloud, config);
    let mut slow = Client::connect(&socket);
    slow.subscribe(&["bus"]);
    let mut fast = Client::connect(&socket);
    fast.subscribe(&["bus"]);

    // Pushed in batches that `fast` reads before the next, so it is never far behind, while
    // `slow` never reads: its socket buffer and then its queue of 64 fill up.
    const COUNT: u64 = 400;
    const BATCH: u64 = 16;
    let pad = "x".repeat(4 << 10);
    for batch in 0..COUNT / BATCH {
        let seqs = batch * BATCH..(batch + 1) * BATCH;
        for seq in seqs.clone() {
            let content = format!(r#"{{"seq":{seq},"pad":"{pad}"}}"#);
            cloud.sim.push(NODE, user_msg("events/bulk", &content));
        }
        for want in seqs {
            assert_eq!(seq(&fast.next_message("bus")), want, "the fast client gets every message");
        }
    }

    // The slow client finds what was written before the cut, then the end of the stream.
    let mut rest = Vec::new();
    slow.reader.read_to_end(&mut rest).expect("EOF within PATIENCE");
    let delivered = rest.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() as u64;
    assert!(delivered < COUNT, "cut off after {delivered} lines");
    // The fast client is still served.
    let reply = fast.call(json!({"op": "send", "message": numbered(7)}));
    assert_eq!(reply["ok"], true, "{reply}");
    agent.stop();
}

fn seq(msg: &Message) -> u64 {
    let v: Value = serde_json::from_str(msg.content.get()).unwrap();
    v["seq"].as_u64().unwrap()
}

#[test]
fn malformed_lines_get_an_error_and_the_connection_stays_usable() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-malformed");
    let mut config = api_config(&cloud, &dir);
    config.local_api_max_line_bytes = 1024;
    let (agent, socket) = api_agent(&cloud, config);
    let mut client = Client::connect(&socket);

    let long_json = format!(r#"{{"op":"send","message":{{"content":"{}"}}}}"#, "x".repeat(1100));
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"not json\n".to_vec(), "bad_request", "bad request"),
        (b"{\"op\":\"frobnicate\"}\n".to_vec(), "bad_request", "unknown op \"frobnicate\""),
        (format!("{}\n", "y".repeat(5000)).into_bytes(), "bad_request", "over the limit of 1024"),
        (format!("{long_json}\n").into_bytes(), "bad_request", "line of 1"),
        (b"{\"op\":\"send\"}\n".to_vec(), "bad_request", "send needs \"message\""),
        (b"{\"op\":\"send\",\"mesage\":{}}\n".to_vec(), "bad_request", "unknown field `mesage`"),
        (
            b"{\"op\":\"send\",\"message\":{\"route\":{}}}\n".to_vec(),
            "bad_request",
            "route.group and route.operation",
        ),
        (b"{\"op\":\"send\",\"message\":[1]}\n".to_vec(), "bad_request", "message"),
        (b"{\"op\":\"subscribe\",\"groups\":[]}\n".to_vec(), "bad_request", "empty"),
        (b"{\"op\":\"query\",\"resource\":\"x\"}\n".to_vec(), "failed", "no resource store"),
        (b"\xff\xfe{\n".to_vec(), "bad_request", "bad request"),
        (deep(r#"{"op":"send","message":{"content":"#, "}}"), "bad_request", "route.group"),
        (deep(r#"{"op":"subscribe","groups":"#, "}"), "bad_request", "expected a string"),
    ];
    for (line, kind, text) in cases {
        let reply = {
            client.send_raw(&line);
            client.next()
        };
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["kind"], kind, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains(text), "want {text:?}: {reply}");
    }
    client.send_raw(b"\n   \n"); // blank lines are skipped, not answered
    let reply = client.call(json!({"op": "send", "message": numbered(3), "id": "after"}));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["id"], "after");
    cloud.wait_received("the message after the bad lines", |m| seq_of(m) == Some(3));
    agent.stop();
}

/// `prefix`, 480 nested arrays, `suffix`: deep JSON is answered, and never overflows the small
/// stack of a client thread.
fn deep(prefix: &str, suffix: &str) -> Vec<u8> {
    format!("{prefix}{}{}{suffix}\n", "[".repeat(480), "]".repeat(480)).into_bytes()
}

#[test]
fn socket_is_0660_a_stale_file_is_replaced_a_live_one_refused_and_stop_removes_it() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-socket");
    let mut config = api_config(&cloud, &dir);
    config.local_api_socket = dir.path().join("run/edgehub/api.sock"); // folders made on demand
    let socket = config.local_api_socket.clone();
    let settings = || local_api::Settings::from_config(&config);

    // A socket left by a crashed agent: nobody listens on it.
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(UnixListener::bind(&socket).unwrap());
    assert!(UnixStream::connect(&socket).is_err(), "stale: nobody listens");
    let (agent, _) = api_agent(&cloud, config.clone());
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let mut client = Client::connect(&socket);
    assert_eq!(client.call(json!({"op": "send", "message": numbered(1)}))["ok"], true);

    // A second agent on the same path is refused, and leaves the live socket alone.
    let err = local_api::spec(settings(), None, None).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("another edgehub agent is running"), "{err}");
    assert!(err.to_string().contains(socket.to_str().unwrap()), "{err}");
    assert_eq!(client.call(json!({"op": "send", "message": numbered(2)}))["ok"], true);

    agent.stop();
    assert!(!socket.exists(), "stop deletes the socket file");
    let mut rest = Vec::new();
    client.reader.read_to_end(&mut rest).unwrap(); // the client sees the end, not a hang

    // Stop wakes accept() even when the path no longer leads to it, and deletes only its own file.
    let (agent, _) = api_agent(&cloud, config.clone());
    std::fs::remove_file(&socket).unwrap();
    std::fs::write(&socket, "someone else's").unwrap();
    agent.stop();
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "someone else's");
    std::fs::remove_file(&socket).unwrap();

    // Something that is not a socket is never replaced.
    std::fs::write(&socket, "precious").unwrap();
    let err = local_api::spec(settings(), None, None).err().expect("refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
    std::fs::remove_file(&socket).unwrap();

    // A spec that never runs (the agent failed to start) still removes its socket file.
    drop(local_api::spec(settings(), None, None).unwrap());
    assert!(!socket.exists());
}

#[test]
fn too_many_clients_are_refused_with_an_error_line() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-max");
    let mut config = api_config(&cloud, &dir);
    config.local_api_max_clients = 2;
    let (agent, socket) = api_agent(&cloud, config);
    let mut a = Client::connect(&socket);
    let mut b = Client::connect(&socket);
    // Both are admitted (a reply proves it), so the third is over the limit.
    assert_eq!(a.call(json!({"op": "send", "message": numbered(1)}))["ok"], true);
    assert_eq!(b.call(json!({"op": "send", "message": numbered(2)}))["ok"], true);
    let mut c = Client::connect(&socket);
    let refused = c.next();
    assert_eq!(refused["kind"], "full", "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("too many local clients"), "{refused}");
    // A client that hangs up gets the end of its stream once its replies are written, and its
    // slot goes to the next client.
    b.writer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    b.reader.read_to_end(&mut rest).expect("EOF within PATIENCE");
    assert!(rest.is_empty());
    let mut d = Client::connect(&socket);
    assert_eq!(d.call(json!({"op": "send", "message": numbered(3)}))["ok"], true);
    assert_eq!(a.call(json!({"op": "send", "message": numbered(4)}))["ok"], true);
    agent.stop();
}

#[test]
fn stop_joins_every_local_api_thread_even_with_clients_connected() {
    let _exclusive = THREAD_COUNT.write().unwrap_or_else(|e| e.into_inner());
    let _w = watchdog(Duration::from_secs(30));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-threads");
    let (agent, socket) = api_agent(&cloud, api_config(&cloud, &dir));
    let mut subscribed = Client::connect(&socket);
    subscribed.subscribe(&["twin"]);
    let mut idle = Client::connect(&socket);
    assert_eq!(idle.call(json!({"op": "send", "message": numbered(1)}))["ok"], true);
    let mut partial = Client::connect(&socket); // admitted, then stops halfway through a line
    assert_eq!(partial.call(json!({"op": "send", "message": numbered(2)}))["ok"], true);
    partial.send_raw(b"{\"op\":\"se");
    let threads = agent_threads();
    for name in ["eh-localapi", "eh-api-accept"] {
        assert_eq!(threads.iter().filter(|t| *t == name).count(), 1, "{threads:?}");
    }
    assert_eq!(threads.iter().filter(|t| *t == "eh-client").count(), 3, "{threads:?}");
    assert_eq!(threads.iter().filter(|t| *t == "eh-client-out").count(), 3, "{threads:?}");
    agent.stop();
    let ours = ["eh-localapi", "eh-api-accept", "eh-client", "eh-client-out"];
    let left = threads_left_after_stop(|t| ours.contains(&t));
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!socket.exists());
    drop((subscribed, idle, partial));
}

/// The `edgehub` binary's client commands, from a shell, against an agent running the store and
/// the local API in this process.
#[test]
fn cli_client_from_a_shell_script() {
    let _serial = shared();
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let dir = TempDir::new("api-cli");
    let config = api_config(&cloud, &dir);
    let socket = config.local_api_socket.clone();
    let (changes_tx, changes_rx) = crossbeam_channel::bounded(64);
    let (meta, store) = meta_store::spec(config.state_dir.clone(), Some(changes_tx));
    let settings = local_api::Settings::from_config(&config);
    let api = local_api::spec(settings, Some(store), Some(changes_rx)).unwrap();
    let agent = Agent::start(config, vec![meta, api]).unwrap();
    cloud.wait_connected();
    let sh = |script: &str| {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .env("EDGEHUB", env!("CARGO_BIN_EXE_edgehub"))
            .env("SOCK", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };

    // The module knows the link is up before the client subscribes (so its first line says so).
    Client::connect(&socket).subscribe(&["twin"]);

    // subscribe | while read: one line per event, flushed at once; it ends when the pipe closes.
    let script = r#""$EDGEHUB" subscribe twin meta --socket "$SOCK" | {
        n=0
        while read -r line; do
            printf '%s\n' "$line"
            n=$((n + 1))
            [ "$n" -ge 3 ] && break
        done
    }"#;
    let mut subscriber = sh(script).spawn().unwrap();
    let lines = lines_of(subscriber.stdout.take().unwrap());
    let first: Value = serde_json::from_str(&recv_within(&lines, "state line")).unwrap();
    assert_eq!(first, json!({"event": "connection", "connected": true}));
    let twin = twin_msg("dev-9");
    cloud.sim.push(NODE, twin.clone());
    let second: Value = serde_json::from_str(&recv_within(&lines, "twin line")).unwrap();
    assert_eq!(second["group"], "twin");
    assert_eq!(second["message"]["header"]["msg_id"], twin.header.id.as_str());
    // A stored change reaches `meta` subscribers once durable.
    let insert = cloud_msg("resource", "edgecontroller", "insert", "default/pod/web", "42");
    cloud.sim.push(NODE, insert.clone());
    let third: Value = serde_json::from_str(&recv_within(&lines, "meta line")).unwrap();
    assert_eq!(third["group"], "meta");
    assert_eq!(third["message"]["header"]["msg_id"], insert.header.id.as_str());
    wait_ack(&cloud, &insert.header.id);
    // The loop has ended; the next event meets the closed pipe and the client ends, status 0.
    let exited = exit_of(subscriber);
    cloud.sim.push(NODE, twin_msg("dev-10"));
    assert!(recv_within(&exited, "subscriber exit").success());

    // `| head -n 1`: head prints the state line and exits; the client then ends at the next
    // event. head's output is buffered until it exits, so there is no line to wait for: push an
    // event until the pipeline is done (bounded).
    let mut pipeline =
        sh(r#""$EDGEHUB" subscribe twin --socket "$SOCK" | head -n 1"#).spawn().unwrap();
    let out = lines_of(pipeline.stdout.take().unwrap());
    let exited = exit_of(pipeline);
    let mut status = None;
    for _ in 0..120 {
        cloud.sim.push(NODE, twin_msg("dev-11"));
        if let Ok(done) = exited.recv_timeout(Duration::from_millis(250)) {
            status = Some(done);
            break;
        }
    }
    assert!(status.expect("pipeline ended within 30 s").success());
    let line: Value = serde_json::from_str(&recv_within(&out, "head's line")).unwrap();
    assert_eq!(line, json!({"event": "connection", "connected": true}));

    // send: --message, and several messages on stdin.
    let out = sh(r#""$EDGEHUB" send --socket "$SOCK" --message '{"route":{"source":"mapper","group":"twin","operation":"update","resource":"$hw/events/device/d/twin/update"},"content":{"seq":100}}'"#)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let up = cloud.wait_received("sent by the cli", |m| seq_of(m) == Some(100));
    assert_eq!(up.header.id, id);
    let out = sh(r#"printf '%s\n%s\n' '{"route":{"group":"bus","operation":"publish"},"content":{"seq":101}}' '{"route":{"group":"bus","operation":"publish"},"content":{"seq":102}}' | "$EDGEHUB" send --socket "$SOCK""#)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 2);
    cloud.wait_received("101", |m| seq_of(m) == Some(101));
    cloud.wait_received("102", |m| seq_of(m) == Some(102));

    // query: the stored object, and exit 1 for one that is not there.
    let out = sh(r#""$EDGEHUB" query default/pod/web --socket "$SOCK""#).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let object: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(object["resource"], "default/pod/web");
    assert_eq!(object["resourceVersion"], "42");
    assert_eq!(object["content"], json!({"metadata": {"name": "x"}}));
    let out = sh(r#""$EDGEHUB" query default/pod/absent --socket "$SOCK""#).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("default/pod/absent not found"), "{}", text(&out.stderr));

    // A bad message is a usage error (2); an agent that is not running is named (1).
    let out = sh(r#""$EDGEHUB" send --socket "$SOCK" --message '{"route":{}}'"#).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("route.group"), "{}", text(&out.stderr));
    agent.stop();
    let out = sh(r#""$EDGEHUB" subscribe twin --socket "$SOCK""#).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(socket.to_str().unwrap()) && err.contains("is `edgehub run` running"),
        "{err}"
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The lines of a child's output, on a channel so each wait is bounded.
fn lines_of(out: impl Read + Send + 'static) -> crossbeam_channel::Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The child's exit status, on a channel so each wait is bounded.
fn exit_of(
    mut child: std::process::Child,
) -> crossbeam_channel::Receiver<std::process::ExitStatus> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = tx.send(status);
        }
    });
    rx
}
