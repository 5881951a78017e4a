//! `edgehub-cloudsim`: the CloudHub simulator as a command for the demo and for poking at an agent
//! by hand. It prints every simulator event as one JSON line on stdout and takes commands, one per
//! line, on stdin; `gen-certs` writes a throwaway PKI. With `--https-listen` it also serves
//! CloudHub's certificate API (join and rotation) and prints a join token at start, on stderr and
//! as a `{"event":"token",…}` line. Everything it does is `edgehub::cloudsim`; this file only
//! parses arguments, reads files and moves lines.
//!
//! Exit status: 0 on success, 1 when the simulator fails at run time (the port is taken), 2 for a
//! usage or configuration error (the message names the flag and file).

use argh::FromArgs;
use edgehub::cloudsim::{
    load, CertServer, CertServerConfig, CloudSim, LoadConfig, Pki, SendClass, SimConfig,
};
use edgehub::message::{new_uuid, now_millis};
use edgehub::Message;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

/// CloudHub's WebSocket port (protocol §2.1).
const DEFAULT_LISTEN: &str = "127.0.0.1:10000";

#[derive(FromArgs)]
/// A CloudHub simulator: a mutual-TLS WebSocket server that speaks KubeEdge's cloud-edge protocol.
/// Prints a `listening` line, then every event, as JSON lines on stdout; reads commands from
/// stdin, one per line:
/// `push <node> <message json>`, `push-file <node> <file of JSON lines>`,
/// `push-raw <node> <text>`, `cut <node>`, `node <node>` (print the Node object),
/// `delete-node <node>`, `bind-pod <node> <pod json>`, `delete-pod <node> <namespace> <name>`,
/// `quit`.
struct Args {
    /// address to listen on (default 127.0.0.1:10000)
    #[argh(option)]
    listen: Option<SocketAddr>,
    /// CA certificate (PEM) that client certificates must chain to
    #[argh(option)]
    ca: Option<PathBuf>,
    /// server certificate (PEM)
    #[argh(option)]
    cert: Option<PathBuf>,
    /// server private key (PEM)
    #[argh(option)]
    key: Option<PathBuf>,
    /// seconds without a keepalive before a connection is closed (default 30)
    #[argh(option, default = "30.0")]
    keepalive_timeout: f64,
    /// seconds to wait for an ACK before writing a message again (default 5)
    #[argh(option, default = "5.0")]
    ack_retry: f64,
    /// ack-queue messages in flight per node (default 1, CloudHub's behaviour); more pushes
    /// without waiting for ACKs, for benchmarks
    #[argh(option, default = "1")]
    ack_window: usize,
    /// load mode for benchmarks: bench messages per second to each connected node (0: none,
    /// only measure and answer bench requests; -1: as fast as the edge takes them); prints
    /// load_stats lines and a load_summary instead of one line per message
    #[argh(option)]
    send_rate: Option<i64>,
    /// load mode: bytes of bench content per message (default 130)
    #[argh(option, default = "130")]
    send_size: usize,
    /// load mode: ack (resource updates, one ACK each) or noack (user publishes; default)
    #[argh(option, default = "SendClass::NoAck")]
    send_class: SendClass,
    /// load mode: seconds between load_stats lines (default 5)
    #[argh(option, default = "5.0")]
    stats_every: f64,
    /// also serve CloudHub's certificate HTTPS API (/ca.crt, /edge.crt) on this address
    /// (127.0.0.1:0 picks a port) and print a join token; needs --ca-key
    #[argh(option)]
    https_listen: Option<SocketAddr>,
    /// CA private key (PEM) for the certificate server: signs certificates and keys join tokens
    #[argh(option)]
    ca_key: Option<PathBuf>,
    /// lifetime of the certificates the certificate server signs, in seconds (default 365 days)
    #[argh(option, default = "31_536_000")]
    cert_lifetime: u64,
    /// stop when stdin reaches end of file (default: keep running until killed)
    #[argh(switch)]
    exit_on_eof: bool,
    /// log simulator internals to stderr
    #[argh(switch, short = 'v')]
    verbose: bool,
    /// send each node its own Node object after every change, as a HEAD cloud does
    #[argh(switch)]
    head_node_updates: bool,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    GenCerts(GenCerts),
}

#[derive(FromArgs)]
/// Write a throwaway CA, server and client certificate: ca.crt, ca.key (for --ca-key),
/// server.crt, server.key, client.crt, client.key (SEC1) and client-pkcs8.key.
#[argh(subcommand, name = "gen-certs")]
struct GenCerts {
    /// directory to write into (created if missing)
    #[argh(option)]
    dir: PathBuf,
    /// node name for the client certificate (CN system:node:<node>)
    #[argh(option)]
    node: String,
}

/// Why the command failed, which decides the exit status.
enum Failure {
    /// Bad arguments or configuration: exit 2.
    Usage(String),
    /// The simulator failed while running: exit 1.
    Runtime(String),
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let name = argv.first().map(String::as_str).unwrap_or("edgehub-cloudsim");
    let rest: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let args = match Args::from_args(&[name], &rest) {
        Ok(args) => args,
        Err(early) => {
            // argh exits 1 on bad usage; this tool's contract is 2.
            return match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("{}", early.output);
                    ExitCode::from(2)
                }
            };
        }
    };
    let result = match &args.command {
        Some(Command::GenCerts(gen)) => gen_certs(gen),
        None => serve(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(text)) => {
            eprintln!("edgehub-cloudsim: {text}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(text)) => {
            eprintln!("edgehub-cloudsim: {text}");
            ExitCode::from(1)
        }
    }
}

fn gen_certs(gen: &GenCerts) -> Result<(), Failure> {
    let pki = Pki::generate(&gen.node).map_err(|e| Failure::Runtime(e.to_string()))?;
    let paths = pki.write_to(&gen.dir).map_err(|e| Failure::Usage(e.to_string()))?;
    // The certificate server (--https-listen) signs with the CA key.
    let ca_key = gen.dir.join("ca.key");
    write_secret(&ca_key, &pki.ca_key_pem)
        .map_err(|e| Failure::Usage(format!("write {}: {e}", ca_key.display())))?;
    for path in [
        &paths.ca_cert,
        &ca_key,
        &paths.server_cert,
        &paths.server_key,
        &paths.client_cert,
        &paths.client_key,
        &paths.client_key_pkcs8,
    ] {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes a file only its owner can read.
fn write_secret(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)
}

/// Starts the certificate server when `--https-listen` asks for it.
fn start_cert_server(args: &Args) -> Result<Option<CertServer>, Failure> {
    let Some(listen) = args.https_listen else { return Ok(None) };
    let ca_key = read_pem("--ca-key", args.ca_key.as_deref())?;
    let mut cfg = CertServerConfig::new(
        read_pem("--ca", args.ca.as_deref())?,
        ca_key,
        read_pem("--cert", args.cert.as_deref())?,
        read_pem("--key", args.key.as_deref())?,
    );
    cfg.listen = listen;
    if args.cert_lifetime == 0 {
        return Err(Failure::Usage("--cert-lifetime 0: must be at least 1 second".to_owned()));
    }
    cfg.cert_lifetime = Duration::from_secs(args.cert_lifetime);
    CertServer::start(cfg).map(Some).map_err(|e| {
        Failure::Usage(format!("certificate server (--ca-key {}): {e}", show(&args.ca_key)))
    })
}

/// Runs the simulator until `quit`, end of stdin with `--exit-on-eof`, or a closed stdout.
fn serve(args: &Args) -> Result<(), Failure> {
    init_logging(args.verbose);
    let cfg = sim_config(args)?;
    let load_config = cfg.load.clone();
    let certs = start_cert_server(args)?;
    let sim = CloudSim::start(cfg).map_err(|e| Failure::Runtime(e.to_string()))?;
    eprintln!("edgehub-cloudsim: listening on {}", sim.addr());
    // First line, before any event: tells a script which port `--listen 127.0.0.1:0` got.
    let listening = format!(r#"{{"event":"listening","addr":"{}"}}"#, sim.addr());
    let mut out = io::stdout().lock();
    writeln!(out, "{listening}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Runtime(format!("write stdout: {e}")))?;
    let mut cert_printer = None;
    if let Some(certs) = &certs {
        let token = certs.token().map_err(|e| Failure::Runtime(format!("mint token: {e}")))?;
        eprintln!("edgehub-cloudsim: certificate server on {}", certs.url());
        eprintln!("edgehub-cloudsim: join token: {token}");
        for line in [
            serde_json::json!({"event": "cert_server", "url": certs.url()}),
            serde_json::json!({"event": "token", "token": token}),
        ] {
            writeln!(out, "{line}")
                .and_then(|()| out.flush())
                .map_err(|e| Failure::Runtime(format!("write stdout: {e}")))?;
        }
        let requests_rx = certs.requests();
        cert_printer = Some(
            thread::Builder::new()
                .name("sim-cert-events".to_owned())
                .spawn(move || print_events(&requests_rx))
                .map_err(|e| Failure::Runtime(format!("spawn event printer: {e}")))?,
        );
    }
    drop(out);
    let events_rx = sim.events();
    let stats_every = seconds("--stats-every", args.stats_every)?;
    let printer = thread::Builder::new()
        .name("sim-events".to_owned())
        .spawn(move || match load_config {
            Some(load) => report_load(&events_rx, &load, stats_every),
            None => print_events(&events_rx),
        })
        .map_err(|e| Failure::Runtime(format!("spawn event printer: {e}")))?;
    // Stops the certificate server and joins its printer (which ends once the server is gone).
    let stop_certs = move || {
        drop(certs);
        cert_printer.map_or(Ok(()), join_printer)
    };

    let mut quit = false;
    for line in io::stdin().lock().lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("edgehub-cloudsim: read stdin: {e}");
                break;
            }
        };
        match run_command(&sim, &line) {
            Ok(Flow::Continue) => {}
            Ok(Flow::Quit) => {
                quit = true;
                break;
            }
            Err(text) => eprintln!("edgehub-cloudsim: {text}"),
        }
    }
    if !quit && !args.exit_on_eof {
        // Stdin is done (perhaps `< /dev/null` in the background): serve until killed. The
        // printer only returns when stdout is gone, and then there is no one left to serve.
        let _ = join_printer(printer);
        sim.stop();
        let _ = stop_certs();
        return Ok(());
    }
    // Stopping drops the event sender, so the printer drains what is left and returns.
    sim.stop();
    stop_certs()?;
    join_printer(printer)
}

fn join_printer(printer: thread::JoinHandle<()>) -> Result<(), Failure> {
    printer.join().map_err(|_| Failure::Runtime("bug: event printer panicked".to_owned()))
}

fn init_logging(verbose: bool) {
    let level = if verbose { log::LevelFilter::Debug } else { log::LevelFilter::Warn };
    // Only fails when a logger is already set, which cannot happen this early in main.
    let _ = simplelog::WriteLogger::init(level, simplelog::Config::default(), io::stderr());
}

/// Reads and checks the TLS files, naming the file in every error.
fn sim_config(args: &Args) -> Result<SimConfig, Failure> {
    let ca = read_pem("--ca", args.ca.as_deref())?;
    let cert = read_pem("--cert", args.cert.as_deref())?;
    let key = read_pem("--key", args.key.as_deref())?;
    check_cert("--ca", args.ca.as_deref(), &ca)?;
    check_cert("--cert", args.cert.as_deref(), &cert)?;
    if let Err(e) = openssl::pkey::PKey::private_key_from_pem(&key) {
        return Err(Failure::Usage(format!(
            "--key {}: not a PEM private key: {e}",
            show(&args.key)
        )));
    }
    let mut cfg = SimConfig::new(ca, cert, key);
    if let Some(listen) = args.listen {
        cfg.listen = listen;
    } else {
        cfg.listen = DEFAULT_LISTEN
            .parse()
            .map_err(|e| Failure::Usage(format!("default listen address: {e}")))?;
    }
    cfg.keepalive_timeout = seconds("--keepalive-timeout", args.keepalive_timeout)?;
    cfg.ack_retry_interval = seconds("--ack-retry", args.ack_retry)?;
    if args.ack_window == 0 {
        return Err(Failure::Usage("--ack-window 0: must be at least 1".to_owned()));
    }
    cfg.ack_window = args.ack_window;
    cfg.load = args.send_rate.map(|rate| LoadConfig::new(rate, args.send_size, args.send_class));
    cfg.head_node_updates = args.head_node_updates;
    Ok(cfg)
}

fn show(path: &Option<PathBuf>) -> String {
    path.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
}

fn read_pem(flag: &str, path: Option<&Path>) -> Result<Vec<u8>, Failure> {
    let path = path.ok_or_else(|| Failure::Usage(format!("missing {flag} <file>")))?;
    std::fs::read(path).map_err(|e| Failure::Usage(format!("{flag} {}: {e}", path.display())))
}

fn check_cert(flag: &str, path: Option<&Path>, pem: &[u8]) -> Result<(), Failure> {
    match openssl::x509::X509::from_pem(pem) {
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::Usage(format!(
            "{flag} {}: not a PEM certificate: {e}",
            path.map(|p| p.display().to_string()).unwrap_or_default()
        ))),
    }
}

fn seconds(flag: &str, value: f64) -> Result<Duration, Failure> {
    match Duration::try_from_secs_f64(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(Failure::Usage(format!("{flag} {value}: must be a positive number of seconds"))),
    }
}

/// Load mode: prints load statistics (see `edgehub::cloudsim::load`) instead of message events.
fn report_load(
    events_rx: &crossbeam_channel::Receiver<edgehub::cloudsim::SimEvent>,
    load: &LoadConfig,
    every: Duration,
) {
    let stdout = io::stdout();
    load::report(events_rx, load, every, &mut |line| {
        let mut out = stdout.lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    });
}

/// Prints each event as one JSON line and flushes, so a reader sees it at once.
fn print_events<T: serde::Serialize>(events_rx: &crossbeam_channel::Receiver<T>) {
    let stdout = io::stdout();
    for event in events_rx.iter() {
        let line = match serde_json::to_string(&event) {
            Ok(line) => line,
            Err(e) => {
                eprintln!("edgehub-cloudsim: encode event: {e}");
                continue;
            }
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // Nobody is reading any more.
            return;
        }
    }
}

enum Flow {
    Continue,
    Quit,
}

/// Runs one stdin command. `Err` is a line for stderr; the simulator carries on.
fn run_command(sim: &CloudSim, line: &str) -> Result<Flow, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(Flow::Continue);
    }
    let (verb, rest) = split_word(line);
    match verb {
        "quit" | "exit" => return Ok(Flow::Quit),
        "cut" => {
            let (node, extra) = split_word(rest);
            if node.is_empty() || !extra.is_empty() {
                return Err("usage: cut <node>".to_owned());
            }
            sim.cut(node);
        }
        "push" => {
            let (node, json) = split_word(rest);
            if node.is_empty() || json.is_empty() {
                return Err("usage: push <node> <message json>".to_owned());
            }
            let msg = parse_message(json).map_err(|e| format!("push: {e}"))?;
            sim.push(node, msg);
        }
        "push-file" => {
            let (node, path) = split_word(rest);
            if node.is_empty() || path.is_empty() {
                return Err("usage: push-file <node> <path of JSON-lines file>".to_owned());
            }
            // All or nothing: a bad line anywhere pushes none of the file.
            let messages = read_message_file(Path::new(path))?;
            for msg in messages {
                sim.push(node, msg);
            }
        }
        "push-raw" => {
            let (node, text) = split_word(rest);
            if node.is_empty() {
                return Err("usage: push-raw <node> <text sent as one text frame>".to_owned());
            }
            sim.push_raw(node, text.as_bytes().to_vec(), false);
        }
        "node" | "delete-node" => {
            let (node, extra) = split_word(rest);
            if node.is_empty() || !extra.is_empty() {
                return Err(format!("usage: {verb} <node>"));
            }
            if verb == "node" {
                sim.show_node(node);
            } else {
                sim.delete_node(node);
            }
        }
        "bind-pod" => {
            let (node, json) = split_word(rest);
            let pod: serde_json::Value =
                serde_json::from_str(json).map_err(|e| format!("bind-pod: pod json: {e}"))?;
            if node.is_empty() || pod.pointer("/metadata/name").is_none() {
                return Err("usage: bind-pod <node> <pod json with metadata.name>".to_owned());
            }
            sim.bind_pod(node, pod);
        }
        "delete-pod" => {
            let (node, rest) = split_word(rest);
            let (namespace, name) = split_word(rest);
            if node.is_empty() || namespace.is_empty() || name.is_empty() {
                return Err("usage: delete-pod <node> <namespace> <name>".to_owned());
            }
            sim.delete_pod(node, namespace, name);
        }
        other => {
            return Err(format!(
                "unknown command {other:?} (push, push-file, push-raw, cut, node, delete-node, \
                 bind-pod, delete-pod, quit)"
            ))
        }
    }
    Ok(Flow::Continue)
}

/// Splits off the first whitespace-separated word; the rest is trimmed.
fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

/// Decodes a message and fills in what a hand-written one usually leaves out: a fresh `msg_id`
/// when it is empty, and the current time when `timestamp` is 0.
fn parse_message(json: &str) -> Result<Message, String> {
    let mut msg = Message::decode(json.as_bytes()).map_err(|e| e.to_string())?;
    if msg.header.id.is_empty() {
        msg.header.id = new_uuid();
    }
    if msg.header.timestamp == 0 {
        msg.header.timestamp = now_millis();
    }
    Ok(msg)
}

fn read_message_file(path: &Path) -> Result<Vec<Message>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("push-file {}: {e}", path.display()))?;
    let mut messages = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let msg = parse_message(line)
            .map_err(|e| format!("push-file {}:{}: {e}", path.display(), index + 1))?;
        messages.push(msg);
    }
    Ok(messages)
}
