#![cfg(feature = "cloudsim")]
//! ServiceBus through the whole agent (no broker needed): a cloud `router_servicebus` request
//! reaches a local HTTP service on 127.0.0.1 and its answer goes back to the simulator with
//! `parent_msg_id`; a service that is not there is answered 502 rather than left unanswered.

mod support;

use edgehub::message::{json_content, Message, Route};
use edgehub::modules::service_bus::{base64_decode, base64_encode, HttpResponse};
use edgehub::Agent;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;
use support::*;

/// What the local service saw: the request line, the headers (lower-case names), the body.
type Seen = (String, Vec<(String, String)>, Vec<u8>);

/// A one-request HTTP/1.1 service on a free port, answering `answer`.
fn one_shot_service(answer: &'static [u8]) -> (u16, std::thread::JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let mut stream = stream;
        stream.write_all(answer).unwrap();
        (request_line.trim_end().to_owned(), headers, body)
    });
    (port, thread)
}

fn request(port: u16, path: &str, content: &str) -> Message {
    Message::new(
        Route {
            source: "router_servicebus".into(),
            group: "user".into(),
            operation: "post".into(),
            resource: format!("{port}:{path}"),
            ..Route::default()
        },
        json_content(content).unwrap(),
    )
}

fn start(cloud: &Cloud, dir: &TempDir) -> Agent {
    let mut config = cloud.config();
    config.local_api_socket = dir.path().join("api.sock");
    config.service_bus.enable = true;
    let modules = edgehub::cli::builtin_modules(&config).unwrap();
    let agent = Agent::start(config, modules).unwrap();
    cloud.wait_connected();
    agent
}

fn answer_to(cloud: &Cloud, request: &Message) -> HttpResponse {
    let id = request.header.id.clone();
    let msg = cloud.wait_received("the servicebus answer", |m| m.header.parent_id == id);
    assert_eq!(
        (msg.route.source.as_str(), msg.route.group.as_str(), msg.route.operation.as_str()),
        ("servicebus", "user", "upload")
    );
    serde_json::from_str(msg.content.get()).unwrap()
}

#[test]
fn a_cloud_request_reaches_the_local_service_and_its_answer_goes_back() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let dir = TempDir::new("servicebus");
    let agent = start(&cloud, &dir);
    let (port, service) = one_shot_service(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}",
    );
    let content = format!(
        r#"{{"header":{{"X-Test":["1"]}},"body":"{}","method":"POST","url":"http://x/api"}}"#,
        base64_encode(b"hello")
    );
    let req = request(port, "/api/items?limit=1", &content);
    cloud.sim.push(NODE, req.clone());
    let answer = answer_to(&cloud, &req);
    assert_eq!(answer.status_code, 201);
    assert_eq!(base64_decode(&answer.body).unwrap(), br#"{"ok":true}"#);
    assert_eq!(answer.header["Content-Type"], vec!["application/json".to_owned()]);
    let (line, headers, body) = service.join().unwrap();
    assert_eq!(line, "POST /api/items?limit=1 HTTP/1.1");
    assert!(headers.contains(&("x-test".into(), "1".into())), "{headers:?}");
    assert_eq!(body, b"hello");
    agent.stop();
}

#[test]
fn a_missing_service_or_a_bad_request_is_answered_not_dropped() {
    let _w = watchdog(Duration::from_secs(60));
    let cloud = Cloud::start();
    let dir = TempDir::new("servicebus");
    let agent = start(&cloud, &dir);
    // A port nobody listens on (bound, then released).
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let req = request(port, "/x", r#"{"method":"GET","header":{},"body":null}"#);
    cloud.sim.push(NODE, req.clone());
    assert_eq!(answer_to(&cloud, &req).status_code, 502);
    let req = request(port, "no-slash", r#"{"method":"GET"}"#);
    cloud.sim.push(NODE, req.clone());
    assert_eq!(answer_to(&cloud, &req).status_code, 400);
    let req = request(port, "/x", r#"{"method":"GET","body":"%%%"}"#);
    cloud.sim.push(NODE, req.clone());
    assert_eq!(answer_to(&cloud, &req).status_code, 400);
    agent.stop();
}
