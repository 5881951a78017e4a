//! The command line (argh): `run` (which joins first when there is no usable certificate and a
//! token is configured), `join`, `check-config`, `--version`, and the local API clients `send`,
//! `subscribe`, `query`; logging set-up; and turning arguments into a validated `Config` (raw flags
//! first, derived objects after, as ripgrep does). No protocol logic lives here.

use crate::agent::Agent;
use crate::certs;
use crate::config::Config;
use crate::error::{ErrorKind, Result};
use crate::local_client::LocalClient;
use crate::modules::{local_api, meta_store, node_status, ModuleSpec};
use argh::FromArgs;
use serde_json::value::RawValue;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

/// edgehub: a small KubeEdge-compatible edge agent (one mutual-TLS WebSocket to CloudHub).
#[derive(FromArgs, Debug)]
pub struct Args {
    /// print the version and exit
    #[argh(switch)]
    pub version: bool,
    #[argh(subcommand)]
    pub command: Option<Command>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Run(RunArgs),
    CheckConfig(CheckConfigArgs),
    Send(SendArgs),
    Subscribe(SubscribeArgs),
    Query(QueryArgs),
    Join(JoinArgs),
}

/// Connect to CloudHub and keep the link up until stopped.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "run")]
pub struct RunArgs {
    #[argh(option, short = 'c', default = "default_config_path()")]
    /// configuration file (JSON, edgecore's edgeHub keys); default /etc/edgehub/config.json
    pub config: PathBuf,
    #[argh(option)]
    /// node name (overrides nodeName)
    pub node_name: Option<String>,
    #[argh(option)]
    /// cloudHub address host:port (overrides websocket.server)
    pub server: Option<String>,
    #[argh(switch, short = 'v')]
    /// verbose: log at debug level (twice: trace)
    pub verbose: u8,
}

/// Join the cluster with a token from `keadm gettoken`: fetch the CA and check it against the
/// token, get a certificate for this node from httpServer, write tlsCaFile, tlsCertFile and
/// tlsPrivateKeyFile. Replaces a certificate already there.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "join")]
pub struct JoinArgs {
    #[argh(option, short = 'c', default = "default_config_path()")]
    /// configuration file (httpServer, nodeName, certificate paths); default
    /// /etc/edgehub/config.json
    pub config: PathBuf,
    #[argh(option)]
    /// the token, <caHash>.<jwt>; default: token or tokenFile of the configuration
    pub token: Option<String>,
    #[argh(option)]
    /// node name (overrides nodeName)
    pub node_name: Option<String>,
}

/// Validate the configuration and print the effective settings (token redacted).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check-config")]
pub struct CheckConfigArgs {
    #[argh(option, short = 'c', default = "default_config_path()")]
    /// configuration file; default /etc/edgehub/config.json
    pub config: PathBuf,
    #[argh(option)]
    /// node name (overrides nodeName)
    pub node_name: Option<String>,
    #[argh(option)]
    /// cloudHub address host:port (overrides websocket.server)
    pub server: Option<String>,
}

/// Send messages to the cloud through the running agent: the JSON of --message, or of each
/// message on stdin. Prints each message's msg_id (with --request, the cloud's response).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "send")]
pub struct SendArgs {
    #[argh(option)]
    /// the message, wire JSON ({"route":{...},"content":...}); default: messages from stdin
    pub message: Option<String>,
    #[argh(switch)]
    /// wait for the cloud's response to each message and print it
    pub request: bool,
    #[argh(option)]
    /// how long --request waits, in seconds; default: the agent's requestTimeout
    pub timeout: Option<f64>,
    #[argh(option)]
    /// the agent's local API socket; default: localApiSocket of --config
    pub socket: Option<PathBuf>,
    #[argh(option, short = 'c')]
    /// configuration file to read localApiSocket from; default /etc/edgehub/config.json
    pub config: Option<PathBuf>,
}

/// Print one JSON line per event for the given groups (twin, bus, meta, taskmanager or a custom
/// group), starting with the link state, until the agent stops or stdout closes.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "subscribe")]
pub struct SubscribeArgs {
    #[argh(positional)]
    /// groups to subscribe to
    pub groups: Vec<String>,
    #[argh(option)]
    /// the agent's local API socket; default: localApiSocket of --config
    pub socket: Option<PathBuf>,
    #[argh(option, short = 'c')]
    /// configuration file to read localApiSocket from; default /etc/edgehub/config.json
    pub config: Option<PathBuf>,
}

/// Print a stored resource (namespace/type/name) as JSON; exit 1 if there is none.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "query")]
pub struct QueryArgs {
    #[argh(positional)]
    /// the resource, such as default/configmap/app-cfg
    pub resource: String,
    #[argh(option)]
    /// the agent's local API socket; default: localApiSocket of --config
    pub socket: Option<PathBuf>,
    #[argh(option, short = 'c')]
    /// configuration file to read localApiSocket from; default /etc/edgehub/config.json
    pub config: Option<PathBuf>,
}

fn default_config_path() -> PathBuf {
    PathBuf::from("/etc/edgehub/config.json")
}

/// Loads the file, applies flag overrides, validates.
pub fn load_config(
    path: &std::path::Path,
    node_name: Option<String>,
    server: Option<String>,
) -> Result<Config> {
    let mut config = Config::load(path)?;
    if let Some(node_name) = node_name {
        config.node_name = node_name;
    }
    if let Some(server) = server {
        config.websocket.server = server;
    }
    config.validate().map_err(|e| ErrorKind::Config.msg(format!("{}", path.display())).src(e))?;
    Ok(config)
}

/// Logs to stderr (procd, systemd and busybox init all collect it) with UTC RFC 3339 times.
pub fn init_logging(level: log::LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .build();
    // Only fails if a logger is already set (tests calling twice): keep the first.
    let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
}

/// The modules `edgehub run` starts: the durable resource store (group `meta`, ACKs what it
/// stored), the node status reporter, and the local API (which answers queries from the store,
/// passes its changes on to `meta` subscribers, and binds its socket here).
///
/// # Errors
/// `Io` when the local API socket cannot be bound (another agent runs, say).
pub fn builtin_modules(config: &Config) -> Result<Vec<ModuleSpec>> {
    // The store never waits on this: when full, a change event is dropped (and counted).
    let (changes_tx, changes_rx) = crossbeam_channel::bounded(config.module_inbox_capacity);
    let (meta, store) = meta_store::spec(config.state_dir.clone(), Some(changes_tx));
    let local_api = local_api::Settings::from_config(config);
    Ok(vec![
        meta,
        node_status::spec(config.node_name.clone(), config.node_status_interval.0),
        local_api::spec(local_api, Some(store), Some(changes_rx))?,
    ])
}

/// The socket a client command talks to: `--socket`, else `localApiSocket` of `--config` (or of
/// the default file when it exists), else the default path.
fn socket_path(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(socket) = socket {
        return Ok(socket);
    }
    let path = match config {
        Some(path) => path,
        None if default_config_path().exists() => default_config_path(),
        None => return Ok(PathBuf::from(crate::config::DEFAULT_LOCAL_API_SOCKET)),
    };
    Ok(Config::load(&path)?.local_api_socket)
}

/// Writes `line` and a newline to stdout, and flushes unless `more` (another line follows at
/// once). `Ok(false)` when the reader is gone (a closed pipe, as after `| head -n 1`), which ends
/// a command normally.
fn print_line(out: &mut impl Write, line: &str, more: bool) -> Result<bool> {
    let printed = writeln!(out, "{line}").and_then(|()| if more { Ok(()) } else { out.flush() });
    match printed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(ErrorKind::Io.msg("write to stdout").src(e)),
    }
}

fn send_command(a: SendArgs) -> Result<i32> {
    let timeout = match a.timeout {
        Some(secs) if !(secs.is_finite() && secs > 0.0 && secs <= 1e6) => {
            return Err(ErrorKind::Config.msg(format!("--timeout {secs}: not a positive number")));
        }
        Some(secs) => Some(Duration::from_secs_f64(secs)),
        None => None,
    };
    let messages: Vec<Box<RawValue>> = match &a.message {
        Some(text) => vec![serde_json::from_str(text)
            .map_err(|e| ErrorKind::Config.msg("--message is not JSON").src(e))?],
        None => serde_json::Deserializer::from_reader(io::stdin().lock())
            .into_iter::<Box<RawValue>>()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| ErrorKind::Config.msg("stdin is not JSON messages").src(e))?,
    };
    if messages.is_empty() {
        return Err(ErrorKind::Config.msg("no message given (use --message or stdin)"));
    }
    let mut client = LocalClient::connect(&socket_path(a.socket, a.config)?)?;
    let mut out = io::stdout().lock();
    for message in &messages {
        let shown = if a.request {
            client.request(message, timeout)?.get().to_owned()
        } else {
            client.send(message)?
        };
        if !print_line(&mut out, &shown, false)? {
            break;
        }
    }
    Ok(0)
}

fn subscribe_command(a: SubscribeArgs) -> Result<i32> {
    if a.groups.is_empty() {
        return Err(ErrorKind::Config.msg("name at least one group (twin, bus, meta, …)"));
    }
    let path = socket_path(a.socket, a.config)?;
    let mut client = LocalClient::connect(&path)?;
    client.subscribe(&a.groups)?;
    // Stdout is line-buffered; a buffer in front lets a burst of events go out in one write.
    let mut out = io::BufWriter::with_capacity(64 << 10, io::stdout().lock());
    // Each event is flushed as soon as no other is ready, so a `while read` loop sees it at once.
    while let Some(event) = client.next_event()? {
        if !print_line(&mut out, &event, client.event_ready())? {
            return Ok(0);
        }
    }
    Err(ErrorKind::Closed.msg(format!("the agent at {} closed the connection", path.display())))
}

fn query_command(a: QueryArgs) -> Result<i32> {
    let mut client = LocalClient::connect(&socket_path(a.socket, a.config)?)?;
    match client.query(&a.resource)? {
        Some(object) => {
            print_line(&mut io::stdout().lock(), object.get(), false)?;
            Ok(0)
        }
        None => {
            eprintln!("edgehub: {} not found", a.resource);
            Ok(1)
        }
    }
}

/// Runs the parsed command. Returns the process exit code on success.
pub fn run(args: Args) -> Result<i32> {
    if args.version {
        println!("edgehub {}", env!("CARGO_PKG_VERSION"));
        return Ok(0);
    }
    match args.command {
        None => Err(ErrorKind::Config.msg("no command given; try `edgehub --help`")),
        Some(Command::CheckConfig(a)) => {
            let config = load_config(&a.config, a.node_name, a.server)?;
            println!("{}", config.to_redacted_json());
            Ok(0)
        }
        Some(Command::Run(a)) => {
            let config = load_config(&a.config, a.node_name, a.server)?;
            let level = match a.verbose {
                0 => config.log_level.to_filter(),
                1 => log::LevelFilter::Debug,
                _ => log::LevelFilter::Trace,
            };
            init_logging(level);
            // An expired, foreign or missing certificate: join with the token, or say one is needed.
            certs::ensure(&config)?;
            let modules = builtin_modules(&config)?;
            let agent = Agent::start(config, modules)?;
            agent.wait();
            Ok(0)
        }
        Some(Command::Send(a)) => send_command(a),
        Some(Command::Subscribe(a)) => subscribe_command(a),
        Some(Command::Query(a)) => query_command(a),
        Some(Command::Join(a)) => join_command(a),
    }
}

fn join_command(a: JoinArgs) -> Result<i32> {
    let mut config = Config::load(&a.config)?;
    if let Some(node_name) = a.node_name {
        config.node_name = node_name;
    }
    let token = match &a.token {
        Some(text) => certs::Token::parse(text)?,
        None => certs::Token::configured(&config)?.ok_or_else(|| {
            ErrorKind::Config.msg(format!(
                "no token: give --token, or set token or tokenFile in {}",
                a.config.display()
            ))
        })?,
    };
    if let Some(text) = a.token {
        // So validation knows the certificate files may not exist yet.
        config.token = text;
    }
    config
        .validate()
        .map_err(|e| ErrorKind::Config.msg(format!("{}", a.config.display())).src(e))?;
    init_logging(config.log_level.to_filter());
    let info = certs::join(&config, &token, &certs::http::Abort::new())?;
    println!(
        "joined as {}: certificate valid until {}",
        info.common_name,
        certs::rfc3339(info.not_after)
    );
    for (key, path) in [
        ("tlsCaFile", &config.tls_ca_file),
        ("tlsCertFile", &config.tls_cert_file),
        ("tlsPrivateKeyFile", &config.tls_private_key_file),
    ] {
        println!("  {key} {}", path.display());
    }
    Ok(0)
}
