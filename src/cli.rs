//! The command line (argh): `run` (which joins first when there is no usable certificate and a
//! token is configured), `join`, `check-config`, `--version`, and the local API clients `send`,
//! `subscribe`, `query`; logging set-up; and turning arguments into a validated `Config` (raw flags
//! first, derived objects after, as ripgrep does). No protocol logic lives here.

use crate::agent::Agent;
use crate::certs;
use crate::config::Config;
use crate::error::{ErrorKind, Result};
use crate::local_client::LocalClient;
use crate::logging::{self, LogTarget};
use crate::modules::{device_twin, event_bus, local_api, meta_store, node, ModuleSpec};
use crate::signals;
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
    Status(StatusArgs),
}

/// Is the agent connected, since when, and is anything piling up or dropped? Exit 0 when
/// connected, 1 when not, 2 when the agent is not running, 3 when it runs but is busy (every
/// local client slot taken, or stopping): ask again.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct StatusArgs {
    #[argh(switch)]
    /// print every counter as JSON instead of the one-line summary
    pub json: bool,
    #[argh(option)]
    /// the agent's local API socket; default: localApiSocket of --config
    pub socket: Option<PathBuf>,
    #[argh(option, short = 'c')]
    /// configuration file to read localApiSocket from; default /etc/edgehub/config.json
    pub config: Option<PathBuf>,
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

/// Print a stored resource (namespace/type/name) as JSON; exit 1 if there is none. With --watch,
/// print it (or null) and then one line each time it changes, until the agent stops.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "query")]
pub struct QueryArgs {
    #[argh(positional)]
    /// the resource, such as default/configmap/app-cfg
    pub resource: String,
    #[argh(switch)]
    /// follow the resource: the agent queries it again every --interval while connected
    pub watch: bool,
    #[argh(option)]
    /// seconds between queries with --watch; default: the agent's localApiWatchInterval (never
    /// below its localApiMinWatchInterval)
    pub interval: Option<f64>,
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

/// Logs to stderr with UTC RFC 3339 times (see `logging` for syslog).
pub fn init_logging(level: log::LevelFilter) {
    logging::init(LogTarget::Stderr, level);
}

/// The modules `edgehub run` starts: the durable resource store (group `meta`, ACKs what it
/// stored), the node lifecycle (registration, status, pods), and the local API (which answers queries from the store,
/// passes its changes on to `meta` subscribers, and binds its socket here).
///
/// # Errors
/// `Io` when the local API socket cannot be bound (another agent runs, say).
pub fn builtin_modules(config: &Config) -> Result<Vec<ModuleSpec>> {
    // The store never waits on this: when full, a change event is dropped (and counted). The
    // store bounds it (`spec_with_feed_cap`), so the channel allocates only what is queued.
    let (changes_tx, changes_rx) = crossbeam_channel::unbounded();
    let (meta, store) = meta_store::spec_with_feed_cap(
        config.state_dir.clone(),
        Some(changes_tx),
        config.module_inbox_capacity,
    );
    let local_api = local_api::Settings::from_config(config);
    let mut modules =
        vec![meta, node::spec(node::Settings::from_config(config), Some(store.clone()))];
    // With MQTT on, the store's changes pass through DeviceTwin (it reads Device objects).
    let mut changes_rx = Some(changes_rx);
    match mqtt_modules(config, &mut changes_rx)? {
        None => modules.push(local_api::spec(local_api, Some(store), changes_rx)?),
        Some((mqtt_specs, forwarded, owned)) => {
            modules.extend(mqtt_specs);
            modules.push(local_api::spec_forwarding(
                local_api,
                Some(store),
                changes_rx,
                Some(forwarded),
                &owned,
            )?);
        }
    }
    Ok(modules)
}

/// The modules that exist only with a broker configured (devices over MQTT, issue 13) or the
/// ServiceBus on: the MQTT client, DeviceTwin owning `twin` (with a broker) and the EventBus
/// owning `bus`. Returns them with the channel on which they forward cloud messages of their
/// groups to the local API, and those groups. `None`: neither is configured, and the local API
/// keeps `twin` and `bus` as before. DeviceTwin takes the resource store's `changes` and puts in
/// their place the channel it passes them on through.
#[allow(clippy::type_complexity)] // one private call site; a struct would only name the tuple
fn mqtt_modules(
    config: &Config,
    changes: &mut Option<crossbeam_channel::Receiver<crate::message::Message>>,
) -> Result<
    Option<(
        Vec<ModuleSpec>,
        crossbeam_channel::Receiver<crate::message::Message>,
        Vec<&'static str>,
    )>,
> {
    let options = crate::mqtt::Options::from_config(config)?;
    if options.is_none() && !config.service_bus.enable {
        return Ok(None);
    }
    let cap = config.module_inbox_capacity;
    // The local API never blocks its feeders: when this is full, an event is dropped and counted.
    let (forward_tx, forward_rx) = crossbeam_channel::bounded(cap);
    let (client, bus_routes, twin) = match options {
        Some(options) => {
            let mut builder = crate::mqtt::ClientBuilder::new(options);
            // DeviceTwin's routes go first (first matching route wins).
            let twin_filters = device_twin::topics::subscriptions(config.device_topic_id_segments);
            let twin_filters: Vec<&str> = twin_filters.iter().map(String::as_str).collect();
            let twin_rx = builder.route(&twin_filters, cap);
            let bus_routes = event_bus::routes(&mut builder, cap);
            let client = builder.start()?;
            let twin =
                twin_module(config, twin_rx, client.publisher(), changes, forward_tx.clone())?;
            (Some(client), Some(bus_routes), Some(twin))
        }
        None => (None, None, None),
    };
    let bus = event_bus::spec(event_bus::Wiring {
        client,
        routes: bus_routes,
        service_bus: config.service_bus.enable,
        state_dir: config.state_dir.clone(),
        node_name: config.node_name.clone(),
        local_api: Some(forward_tx),
    });
    let mut specs = Vec::new();
    let mut owned = vec![crate::router::bus_group::BUS];
    if let Some(twin) = twin {
        specs.push(twin);
        owned.push(crate::router::bus_group::TWIN);
    }
    specs.push(bus);
    Ok(Some((specs, forward_rx, owned)))
}

/// DeviceTwin on the MQTT client (issue 13): mapper publishes from `mqtt_in`, the resource
/// store's `changes` through it (replaced by what it passes on), cloud twin messages forwarded to
/// the local API on `local`.
fn twin_module(
    config: &Config,
    mqtt_in: crossbeam_channel::Receiver<crate::mqtt::Publish>,
    mqtt_out: crate::mqtt::Publisher,
    changes: &mut Option<crossbeam_channel::Receiver<crate::message::Message>>,
    local: crossbeam_channel::Sender<crate::message::Message>,
) -> Result<ModuleSpec> {
    let (passed_on_tx, passed_on_rx) = crossbeam_channel::bounded(config.module_inbox_capacity);
    let settings = device_twin::Settings {
        state_dir: config.state_dir.clone(),
        rules: device_twin::rules::Settings {
            node_name: config.node_name.clone(),
            id_segments: config.device_topic_id_segments,
        },
    };
    let links = device_twin::Links {
        mqtt_in,
        mqtt_out,
        meta_in: changes.replace(passed_on_rx),
        meta_out: Some(passed_on_tx),
        local_out: Some(local),
    };
    Ok(device_twin::spec(settings, links)?.0)
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
    if a.watch {
        return watch_command(a);
    }
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

/// An `object` event of the local API's `watch`: the object (`None` for `null`), or an error.
#[derive(serde::Deserialize)]
struct ObjectEvent {
    event: String,
    #[serde(default)]
    resource: String,
    #[serde(default)]
    object: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<String>,
}

/// `edgehub query --watch`: the object now, then one line per change (`null` when it is gone);
/// a cloud error goes to stderr. Ends when the agent closes the connection or stdout closes.
fn watch_command(a: QueryArgs) -> Result<i32> {
    let interval = match a.interval {
        Some(secs) if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) => {
            return Err(ErrorKind::Config.msg(format!("--interval {secs}: not 0 to 86400 s")));
        }
        Some(secs) => Some(Duration::from_secs_f64(secs)),
        None => None,
    };
    let path = socket_path(a.socket, a.config)?;
    let mut client = LocalClient::connect(&path)?;
    let now = client.watch(&a.resource, interval)?;
    let mut out = io::stdout().lock();
    if !print_line(&mut out, now.as_ref().map_or("null", |o| o.get()), false)? {
        return Ok(0);
    }
    while let Some(line) = client.next_event()? {
        let Ok(event) = serde_json::from_str::<ObjectEvent>(&line) else { continue };
        if event.event != "object" || event.resource != a.resource {
            continue;
        }
        if let Some(error) = event.error {
            eprintln!("edgehub: {}: {error}", a.resource);
            continue;
        }
        if !print_line(&mut out, event.object.as_ref().map_or("null", |o| o.get()), false)? {
            return Ok(0);
        }
    }
    Err(ErrorKind::Closed.msg(format!("the agent at {} closed the connection", path.display())))
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
        Some(Command::Run(a)) => run_command(a),
        Some(Command::Status(a)) => status_command(a),
        Some(Command::Send(a)) => send_command(a),
        Some(Command::Subscribe(a)) => subscribe_command(a),
        Some(Command::Query(a)) => query_command(a),
        Some(Command::Join(a)) => join_command(a),
    }
}

/// `edgehub run`: start the agent, then serve signals: SIGTERM/SIGINT stop it cleanly (exit 0),
/// SIGHUP re-reads the config file and applies what can change live.
fn run_command(a: RunArgs) -> Result<i32> {
    // Before any thread starts, so every thread inherits the mask and only eh-signals takes them.
    signals::block();
    let config = load_config(&a.config, a.node_name.clone(), a.server.clone())?;
    let verbose = match a.verbose {
        0 => None,
        1 => Some(log::LevelFilter::Debug),
        _ => Some(log::LevelFilter::Trace),
    };
    logging::init(config.log_target, verbose.unwrap_or(config.log_level.to_filter()));
    let signals =
        signals::listen().map_err(|e| ErrorKind::Io.msg("start the signal thread").src(e))?;
    // An expired, foreign or missing certificate: join with the token (retried until the cloud
    // answers, or a stop signal), or say one is needed.
    if let certs::boot_join::BootJoin::Stopped =
        certs::boot_join::ensure_retrying(&config, &signals)?
    {
        return Ok(0);
    }
    let modules = builtin_modules(&config)?;
    let mut agent = Agent::start(config, modules)?;
    loop {
        match signals.recv() {
            Ok(signals::Signal::Reload) => {
                match load_config(&a.config, a.node_name.clone(), a.server.clone()) {
                    Ok(new) => {
                        let (applied, restart) = agent.reload(&new);
                        if let Some(level) = verbose {
                            log::set_max_level(level); // -v on the command line still wins
                        }
                        log::info!(
                            "reloaded {}: applied {}; need a restart: {}",
                            a.config.display(),
                            list_or_none(&applied),
                            list_or_none(&restart)
                        );
                    }
                    Err(e) => log::error!("reload refused, keeping the running configuration: {e}"),
                }
            }
            Ok(signals::Signal::Stop) | Err(_) => {
                log::info!("stopping: flushing the outbox, closing the link");
                agent.stop();
                log::info!("stopped");
                return Ok(0);
            }
        }
    }
}

fn list_or_none<T: AsRef<str>>(keys: &[T]) -> String {
    if keys.is_empty() {
        "nothing".to_owned()
    } else {
        keys.iter().map(|k| k.as_ref()).collect::<Vec<_>>().join(", ")
    }
}

/// `edgehub status` when the agent runs but cannot answer now (all local client slots taken,
/// or it is stopping): a watchdog should ask again rather than act on "not connected".
pub const STATUS_EXIT_BUSY: i32 = 3;

/// `edgehub status`: a one-line summary (or `--json`), exit 0 connected / 1 not / 2 not running /
/// 3 running but busy.
fn status_command(a: StatusArgs) -> Result<i32> {
    let path = socket_path(a.socket, a.config)?;
    let mut client = match LocalClient::connect(&path) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("edgehub: not running ({e})");
            return Ok(2);
        }
    };
    let status = match client.status() {
        Ok(status) => status,
        Err(e) if e.kind() == ErrorKind::Full => {
            eprintln!("edgehub: busy, cannot answer now; try again ({e})");
            return Ok(STATUS_EXIT_BUSY);
        }
        Err(e) if matches!(e.kind(), ErrorKind::Io | ErrorKind::Closed | ErrorKind::Stopped) => {
            eprintln!("edgehub: running but not answering now; try again ({e})");
            return Ok(STATUS_EXIT_BUSY);
        }
        Err(e) => return Err(e),
    };
    let connected = status["connected"].as_bool().unwrap_or(false);
    let text = if a.json {
        serde_json::to_string_pretty(&status).unwrap_or_default()
    } else {
        status_summary(&status)
    };
    let _ = writeln!(io::stdout(), "{text}"); // a closed pipe is the reader's business
    Ok(if connected { 0 } else { 1 })
}

/// `connected to 10.0.0.1:10000 for 3h12m · outbox 0 · drops 0 · cert expires in 211 d`
pub fn status_summary(status: &serde_json::Value) -> String {
    let now = status["now"].as_i64().unwrap_or(0);
    let server = status["server"].as_str().unwrap_or("?");
    let link = if status["connected"].as_bool().unwrap_or(false) {
        let since = status["connectedSince"].as_i64().unwrap_or(now);
        format!("connected to {server} for {}", human_duration(now - since))
    } else {
        let attempts = status["dialAttempts"].as_u64().unwrap_or(0);
        format!("not connected to {server} ({attempts} failed dials since the last session)")
    };
    let drops: u64 =
        status["drops"].as_object().map_or(0, |d| d.values().filter_map(|v| v.as_u64()).sum());
    let mut line = format!(
        "{link} · outbox {} · drops {drops}",
        status["outbox"]["messages"].as_u64().unwrap_or(0)
    );
    if let Some(not_after) = status["certNotAfter"].as_i64() {
        let left = not_after - now;
        if left > 0 {
            line.push_str(&format!(" · cert expires in {}", human_duration(left)));
        } else {
            line.push_str(" · cert EXPIRED");
        }
    }
    // Devices over MQTT (issue 13): only when a broker is configured.
    if let Some(mqtt) = status["mqtt"].as_object() {
        let up = mqtt.get("connected").and_then(|c| c.as_bool()).unwrap_or(false);
        let dropped: u64 = ["queueDropped", "deliveryDropped"]
            .iter()
            .filter_map(|k| mqtt.get(*k).and_then(|v| v.as_u64()))
            .sum();
        line.push_str(&format!(
            " · mqtt {} · mqtt drops {dropped}",
            if up { "connected" } else { "NOT connected" }
        ));
    }
    line
}

fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 3 * 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{} d", s / 86_400),
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
