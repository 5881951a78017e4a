//! The certificate HTTP client against a hostile server on real TLS over 127.0.0.1: whoever
//! answers `httpServer` during a join is not trusted yet (the CA pin is checked after `/ca.crt`
//! arrives), so every answer it can give must be bounded before anything is buffered.
#![cfg(feature = "cloudsim")]

mod support;

use edgehub::certs::{self, http::Abort, Token};
use edgehub::cloudsim::certserver::mint_token;
use edgehub::cloudsim::Pki;
use edgehub::ErrorKind;
use openssl::pkey::PKey;
use openssl::ssl::{SslAcceptor, SslMethod};
use openssl::x509::X509;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::*;

/// Stop streaming after this much, so the old client (which buffered until the peer stopped)
/// ends too; the fixed one stops reading within the first few kilobytes.
const STREAM_LIMIT: usize = 32 << 20;

/// One TLS connection on 127.0.0.1 answered with `head`, then `filler` streamed over and over
/// until the client hangs up or [`STREAM_LIMIT`]. The thread returns the filler bytes it wrote.
fn hostile_server(pki: &Pki, head: &'static [u8], filler: Vec<u8>) -> (String, JoinHandle<usize>) {
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
    acceptor.set_certificate(&X509::from_pem(&pki.server_cert_pem).unwrap()).unwrap();
    acceptor.set_private_key(&PKey::private_key_from_pem(&pki.server_key_pem).unwrap()).unwrap();
    let acceptor = acceptor.build();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        tcp.set_write_timeout(Some(PATIENCE)).unwrap();
        let Ok(mut tls) = acceptor.accept(tcp) else { return 0 };
        // The request head, up to its blank line.
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && tls.read(&mut byte).unwrap_or(0) == 1 {
            request.push(byte[0]);
        }
        let mut written = 0;
        if tls.write_all(head).is_err() {
            return written;
        }
        while written < STREAM_LIMIT {
            if tls.write_all(&filler).is_err() {
                break;
            }
            written += filler.len();
        }
        written
    });
    (url, thread)
}

fn join_config(pki: &Pki, http_server: &str, dir: &TempDir) -> (edgehub::Config, Token) {
    let mut config = edgehub::Config {
        node_name: NODE.to_owned(),
        http_server: http_server.to_owned(),
        tls_ca_file: dir.path().join("ca/rootCA.crt"),
        tls_cert_file: dir.path().join("certs/edge.crt"),
        tls_private_key_file: dir.path().join("certs/edge.key"),
        state_dir: dir.path().join("state"),
        ..Default::default()
    };
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 + 3600;
    config.token = mint_token(&pki.ca_cert_pem, &pki.ca_key_pem, exp).unwrap();
    let token = Token::parse(&config.token).unwrap();
    (config, token)
}

/// Issue 11, item 2: a chunk of 5 bytes then a chunk size of `ffffffffffffffff` wrapped the
/// running total past the 1 MiB check (a panic in debug builds, 1.55 GB of RSS in release) while
/// the server kept streaming. The join must fail at the size line, before reading the chunk.
#[test]
fn a_chunk_size_near_usize_max_is_refused_before_anything_is_buffered() {
    let _watchdog = watchdog(Duration::from_secs(120));
    let pki = Pki::generate(NODE).unwrap();
    let head: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nffffffffffffffff\r\n";
    let (url, server) = hostile_server(&pki, head, vec![b'A'; 16 << 10]);
    let dir = TempDir::new("hostile-chunk");
    let (config, token) = join_config(&pki, &url, &dir);
    let started = Instant::now();
    let err = certs::join(&config, &token, &Abort::new()).unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("limit"), "{err}");
    let written = server.join().unwrap();
    assert!(written < STREAM_LIMIT, "the client read all {written} bytes the server streamed");
    eprintln!("refused after {took:?}; the server wrote {written} filler bytes before the hang-up");
    assert!(!config.tls_ca_file.exists(), "nothing is written on a failed join");
}

/// The same bound for a body of many one-byte chunks whose framing (15 KB chunk extensions) is
/// far bigger than the body: the old client kept every framing byte buffered while the body stayed
/// under its limit, so 1 MiB of body meant 15 GB read. The bytes read for one response are capped.
#[test]
fn chunk_framing_is_bounded_as_well_as_the_body() {
    let _watchdog = watchdog(Duration::from_secs(120));
    let pki = Pki::generate(NODE).unwrap();
    let head: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut chunk = b"1;ext=".to_vec();
    chunk.extend(std::iter::repeat(b'e').take(15_000));
    chunk.extend_from_slice(b"\r\nx\r\n");
    let (url, server) = hostile_server(&pki, head, chunk);
    let dir = TempDir::new("hostile-ext");
    let (config, token) = join_config(&pki, &url, &dir);
    let err = certs::join(&config, &token, &Abort::new()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.to_string().contains("bytes"), "{err}");
    let written = server.join().unwrap();
    assert!(written < STREAM_LIMIT, "the client read all {written} bytes the server streamed");
}
