//! The command line (argh): `run` (which joins first when there is no usable certificate and a
//! token is configured), `join`, `check-config`, `--version`; logging set-up; and turning
//! arguments into a validated `Config` (raw flags first, derived objects after, as ripgrep does).
//! No protocol logic lives here.

use crate::agent::Agent;
use crate::certs;
use crate::config::Config;
use crate::error::{ErrorKind, Result};
use crate::modules::{meta_store, node_status, ModuleSpec};
use argh::FromArgs;
use std::path::PathBuf;

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
/// stored) and the node status reporter.
pub fn builtin_modules(config: &Config) -> Vec<ModuleSpec> {
    vec![
        meta_store::spec(config.state_dir.clone(), None).0,
        node_status::spec(config.node_name.clone(), config.node_status_interval.0),
    ]
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
            let modules = builtin_modules(&config);
            let agent = Agent::start(config, modules)?;
            agent.wait();
            Ok(0)
        }
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
