//! `edgehub-bench`: the load harness (issue 6). It runs the real agent library against a CloudHub
//! (the simulator in load mode, `edgehub-cloudsim --send-rate …`) with in-process bench modules
//! around it: a source that sends edge→cloud messages at `--rate`, requesters that keep
//! `--concurrency` requests in flight (`--sync`), and a sink that takes the cloud's messages and
//! ACKs them at once, like MetaManager without storage (or, with `--durable`, the real resource
//! store `edgehub::modules::meta_store` stores them and ACKs after fsync). Bench content is
//! `{"bench": <seq>, "sent_ns": <unix ns>, "pad": "..."}` (`edgehub::cloudsim::load`), so either
//! end computes one-way latency.
//!
//! Output, JSON lines on stdout: a `bench_config` line, a `bench_stats` line every `--stats-every`
//! seconds and one for the last (partial) interval, and a `bench_summary` at the end: rates, losses by sequence, one-way and round-trip
//! latency, VmRSS/VmHWM/RssAnon, threads, CPU seconds (user+sys) and CPU % of one core, over the
//! load period only (from the connection being up to the end of `--duration`). Everything in this
//! process counts: the agent's threads and the bench's own (named `bench-*`, listed apart in
//! `cpu_by_thread`).
//!
//! The outbox's token bucket (`messageQPS`/`messageBurst`, 30/60 by default, as in edgecore)
//! limits edge→cloud; the bench sets both to [`BENCH_MESSAGE_QPS`]/[`BENCH_MESSAGE_BURST`] so the
//! offered rate, not the limiter, is measured. It says so in `bench_config`.
//!
//! Exit status: 0 when the run completed, 1 when the agent could not connect or failed, 2 for a
//! usage error.

use argh::FromArgs;
use crossbeam_channel::{after, bounded, select, tick};
use edgehub::cloudsim::load::{self, bench_content, unix_ns, Histogram, SeqTracker, Stamp};
use edgehub::config::Seconds;
use edgehub::message::{group, Route, CLOUD_CONNECTED, CONNECTION_RESOURCE};
use edgehub::modules::{meta_store, Hub, ModuleSpec};
use edgehub::router::bus_group;
use edgehub::status::Status;
use edgehub::{Agent, Config, Message};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// `messageQPS` for the run: far above any rate a 2-core host reaches, so the limiter is idle.
const BENCH_MESSAGE_QPS: u32 = 10_000_000;
/// `messageBurst` for the run.
const BENCH_MESSAGE_BURST: u32 = 1_000_000;
/// How long the agent may take to connect.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// After the load, how long the outbox may take to drain (every message confirmed by the cloud).
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);
/// A request without a response for this long counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The source sleeps at least this long when ahead of schedule, then sends what is due in one go.
const SOURCE_TICK: Duration = Duration::from_millis(1);
/// Wait before offering a message again that a full outbox refused (back-pressure).
const FULL_BACKOFF: Duration = Duration::from_millis(1);
/// Applied changes queued from the durable store to the bench.
const CHANGES_CAP: usize = 8192;
/// Stacks of the bench's own threads: they format small JSON.
const BENCH_STACK_BYTES: usize = 128 << 10;
/// Linux reports process times in USER_HZ, which is 100 on every architecture it runs on.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(FromArgs)]
/// Load harness: the edgehub agent library with in-process bench source, requesters and sink,
/// against a CloudHub (run `edgehub-cloudsim --send-rate N ...` as the cloud). Prints JSON lines.
struct Args {
    /// host:port of the CloudHub to dial (required for a run)
    #[argh(option)]
    server: Option<String>,
    /// CA certificate (PEM) the server certificate must chain to (required for a run)
    #[argh(option)]
    ca: Option<PathBuf>,
    /// client certificate (PEM) (required for a run)
    #[argh(option)]
    cert: Option<PathBuf>,
    /// client private key (PEM) (required for a run)
    #[argh(option)]
    key: Option<PathBuf>,
    /// node name (default bench-gw)
    #[argh(option, default = "String::from(\"bench-gw\")")]
    node: String,
    /// edge→cloud bench messages per second (default 0: none; -1: as fast as the outbox takes them)
    #[argh(option, default = "0")]
    rate: i64,
    /// bytes of bench content per message (default 130)
    #[argh(option, default = "130")]
    size: usize,
    /// request/response: requesters send a request and wait for the cloud's response, in a loop
    #[argh(switch)]
    sync: bool,
    /// requests in flight with --sync (default 1)
    #[argh(option, default = "1")]
    concurrency: usize,
    /// seconds of load once connected (default 20)
    #[argh(option, default = "20.0")]
    duration: f64,
    /// end the load as soon as this many messages were sent or received, or requests answered
    /// (whichever count is largest), or at --duration: for tests, which check counts within a
    /// generous deadline rather than a throughput within a window (default 0: run --duration)
    #[argh(option, default = "0")]
    until: u64,
    /// cloud messages for the meta group go to the real resource store (stored, fsynced, then
    /// ACKed) instead of the sink, which ACKs at once
    #[argh(switch)]
    durable: bool,
    /// the agent's state folder (spool, store); default a new folder under $TMPDIR, removed after
    #[argh(option)]
    state_dir: Option<PathBuf>,
    /// keep the outbox in memory only (outboxSpool false); by default it is spooled to disk, as
    /// the agent's default config does
    #[argh(switch)]
    no_spool: bool,
    /// seconds between bench_stats lines (default 5)
    #[argh(option, default = "5.0")]
    stats_every: f64,
    /// a label copied into every line
    #[argh(option, default = "String::new()")]
    label: String,
    #[argh(subcommand)]
    command: Option<Command>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Command {
    Table(TableArgs),
    Compare(CompareArgs),
}

#[derive(FromArgs)]
/// Print the Markdown table of a results file written by scripts/bench.sh: one JSON object per
/// line, {"scenario", "kind" (idle|e2c|c2e|sync|durable), "offered", "bench": <bench_summary>,
/// "sim": <load_summary>} or, for idle, "idle": {vmrss_kb, vmhwm_kb, rss_anon_kb, pss_kb,
/// threads, cpu_s, idle_s}.
#[argh(subcommand, name = "table")]
struct TableArgs {
    /// the results file (JSON lines)
    #[argh(positional)]
    results: PathBuf,
}

#[derive(FromArgs)]
/// Compare two results files of scripts/bench.sh (`bench.sh compare`, issue 14): for each
/// scenario in both, one line with the medians over its runs of CPU µs per message or request
/// (whole process, and the agent's threads alone, without the bench's `bench-*` threads),
/// achieved rate and p50 latency, before → after and the ratio after/before, with the load
/// average of the runs (other work on the host shares the cores).
#[argh(subcommand, name = "compare")]
struct CompareArgs {
    /// results of the "before" binary (JSON lines)
    #[argh(positional)]
    before: PathBuf,
    /// results of the "after" binary (JSON lines)
    #[argh(positional)]
    after: PathBuf,
}

/// What the bench threads count; the main thread reads it for each line.
#[derive(Default)]
struct Counts {
    stop: AtomicBool,
    /// Edge→cloud messages the outbox accepted.
    sent: AtomicU64,
    /// Offers a full outbox refused (each retried after `FULL_BACKOFF`).
    outbox_full: AtomicU64,
    next_request: AtomicU64,
    received: Mutex<Received>,
    requests: Mutex<Requests>,
}

/// Cloud→edge bench messages that reached the sink (or the durable store).
#[derive(Default)]
struct Received {
    seqs: SeqTracker,
    count: u64,
    oneway: Histogram,
    interval_count: u64,
    interval_oneway: Histogram,
}

#[derive(Default)]
struct Requests {
    ok: u64,
    failed: u64,
    rtt: Histogram,
    interval_ok: u64,
    interval_rtt: Histogram,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Counts {
    fn record_received(&self, msg: &Message) {
        let Some(stamp) = Stamp::of(&msg.content) else { return };
        let oneway = stamp.age_ns(unix_ns()) / 1000;
        let mut r = lock(&self.received);
        r.seqs.record(stamp.seq);
        r.count += 1;
        r.interval_count += 1;
        r.oneway.record(oneway);
        r.interval_oneway.record(oneway);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The largest of messages sent, received and requests answered (for `--until`).
    fn progress(&self) -> u64 {
        let sent = self.sent.load(Ordering::Relaxed);
        sent.max(lock(&self.received).count).max(lock(&self.requests).ok)
    }
}

/// How often `--until` looks at the counts.
const UNTIL_CHECK: Duration = Duration::from_millis(20);

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let name = argv.first().map(String::as_str).unwrap_or("edgehub-bench");
    let rest: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let args = match Args::from_args(&[name], &rest) {
        Ok(args) => args,
        Err(early) => {
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
    let _ = simplelog::WriteLogger::init(
        log::LevelFilter::Warn,
        simplelog::Config::default(),
        std::io::stderr(),
    );
    let result = match &args.command {
        Some(Command::Table(table)) => print_table(&table.results),
        Some(Command::Compare(compare)) => print_compare(&compare.before, &compare.after),
        None => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(text)) => {
            eprintln!("edgehub-bench: {text}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(text)) => {
            eprintln!("edgehub-bench: {text}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Runtime(String),
}

/// A temp state folder, removed when dropped.
struct TempState(Option<PathBuf>);

impl Drop for TempState {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    let duration = positive_seconds("--duration", args.duration)?;
    let stats_every = positive_seconds("--stats-every", args.stats_every)?;
    if args.sync && args.concurrency == 0 {
        return Err(Failure::Usage("--concurrency 0: must be at least 1".to_owned()));
    }
    let (state_dir, _temp) = match &args.state_dir {
        Some(dir) => (dir.clone(), TempState(None)),
        None => {
            let dir = std::env::temp_dir().join(format!("edgehub-bench-{}", std::process::id()));
            (dir.clone(), TempState(Some(dir)))
        }
    };
    let required = |flag: &str, value: &Option<PathBuf>| {
        value.clone().ok_or_else(|| Failure::Usage(format!("missing {flag} <file>")))
    };
    let server =
        args.server.clone().ok_or_else(|| Failure::Usage("missing --server <host:port>".into()))?;
    let tls = [
        required("--ca", &args.ca)?,
        required("--cert", &args.cert)?,
        required("--key", &args.key)?,
    ];
    let config = agent_config(args, &server, tls, state_dir.clone())?;
    let counts = Arc::new(Counts::default());
    let (connected_tx, connected_rx) = bounded::<()>(1);

    let mut modules = Vec::new();
    let mut sink_groups = vec![bus_group::BUS];
    let mut store = None;
    let mut changes_rx = None;
    if args.durable {
        let (tx, rx) = bounded(CHANGES_CAP);
        let (spec, handle) = meta_store::spec(state_dir.clone(), Some(tx));
        modules.push(spec);
        store = Some(handle);
        changes_rx = Some(rx);
    } else {
        sink_groups.push(bus_group::META);
    }
    let sink_counts = counts.clone();
    modules.push(ModuleSpec::new("bsink", &sink_groups, move |ctx| {
        // Waits as the agent's own modules do, not with a lone recv() that spins (ModuleContext::recv).
        while let Some(msg) = ctx.recv() {
            if msg.route.resource == CONNECTION_RESOURCE {
                if msg.content_text().as_deref() == Some(CLOUD_CONNECTED) {
                    let _ = connected_tx.try_send(());
                }
                continue;
            }
            // Counted before the ACK, so the one-way time does not include waiting for a core
            // while the writer sends it.
            sink_counts.record_received(&msg);
            ctx.hub.ack(&msg); // queues an ACK only for ack-queue messages
        }
    }));

    let cfg_line = json!({
        "event": "bench_config", "label": args.label, "server": server,
        "rate": args.rate, "size": args.size, "sync": args.sync,
        "concurrency": if args.sync { args.concurrency } else { 0 },
        "duration_s": duration.as_secs_f64(), "durable": args.durable,
        "messageQPS": config.message_qps, "messageBurst": config.message_burst,
        "note": "messageQPS/messageBurst raised from edgecore's 30/60 so the offered rate is measured, not the limiter",
        "outboxSpool": config.outbox_spool, "outboxMaxMessages": config.outbox_max_messages,
        "moduleInboxCapacity": config.module_inbox_capacity,
    });
    println!("{cfg_line}");

    let agent =
        Agent::start(config, modules).map_err(|e| Failure::Runtime(format!("start agent: {e}")))?;
    let changes_thread = match changes_rx {
        Some(rx) => Some(spawn("bench-changes", {
            let counts = counts.clone();
            move || rx.iter().for_each(|msg| counts.record_received(&msg))
        })?),
        None => None,
    };
    if connected_rx.recv_timeout(CONNECT_PATIENCE).is_err() {
        agent.stop();
        return Err(Failure::Runtime(format!(
            "not connected to {server} within {CONNECT_PATIENCE:?}"
        )));
    }

    let started = Instant::now();
    let cpu_start = thread_cpu();
    let mut workers = Vec::new();
    if args.rate != 0 {
        let (hub, counts, rate, size) = (agent.hub(), counts.clone(), args.rate, args.size);
        workers.push(spawn("bench-src", move || source(&hub, &counts, rate, size))?);
    }
    if args.sync {
        for i in 0..args.concurrency {
            let (hub, counts, size) = (agent.hub(), counts.clone(), args.size);
            workers.push(spawn(&format!("bench-rr-{i}"), move || requester(&hub, &counts, size))?);
        }
    }

    let mut reporter = Reporter::new(&args.label, started, cpu_start.clone());
    let ticks = tick(stats_every);
    let end = after(duration);
    let check = if args.until > 0 { tick(UNTIL_CHECK) } else { crossbeam_channel::never() };
    loop {
        select! {
            recv(ticks) -> _ => println!("{}", reporter.interval_line(&counts, &agent)),
            recv(check) -> _ => if counts.progress() >= args.until { break },
            recv(end) -> _ => break,
        }
    }
    println!("{}", reporter.interval_line(&counts, &agent));
    let load_elapsed = started.elapsed();
    let cpu_end = thread_cpu();
    counts.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        if worker.join().is_err() {
            eprintln!("edgehub-bench: bug: a bench thread panicked");
        }
    }
    let drained_in = drain(&agent);
    let summary = reporter.summary_line(&Summary {
        counts: &counts,
        agent: &agent,
        load_elapsed,
        cpu_start: &cpu_start,
        cpu_end: &cpu_end,
        drained_in,
        store: store.as_ref().map(|s| s.stats()),
    });
    println!("{summary}");
    agent.stop();
    if let Some(thread) = changes_thread {
        let _ = thread.join(); // the store's change channel closed with the agent
    }
    Ok(())
}

fn agent_config(
    args: &Args,
    server: &str,
    [ca, cert, key]: [PathBuf; 3],
    state_dir: PathBuf,
) -> Result<Config, Failure> {
    let mut config = Config {
        node_name: args.node.clone(),
        tls_ca_file: ca,
        tls_cert_file: cert,
        tls_private_key_file: key,
        state_dir,
        message_qps: BENCH_MESSAGE_QPS,
        message_burst: BENCH_MESSAGE_BURST,
        outbox_spool: !args.no_spool,
        reconnect_jitter: Seconds(Duration::ZERO),
        ..Config::default()
    };
    config.websocket.server = server.to_owned();
    config.validate().map_err(|e| Failure::Usage(format!("agent config: {e}")))?;
    Ok(config)
}

fn positive_seconds(flag: &str, value: f64) -> Result<Duration, Failure> {
    match Duration::try_from_secs_f64(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(Failure::Usage(format!("{flag} {value}: must be a positive number of seconds"))),
    }
}

fn spawn(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<thread::JoinHandle<()>, Failure> {
    thread::Builder::new()
        .name(name.to_owned())
        .stack_size(BENCH_STACK_BYTES)
        .spawn(body)
        .map_err(|e| Failure::Runtime(format!("spawn {name}: {e}")))
}

/// Sends bench messages upstream at `rate` per second (negative: as fast as the outbox takes
/// them). A full outbox refuses a message; it is offered again after `FULL_BACKOFF`.
fn source(hub: &Hub, counts: &Counts, rate: i64, size: usize) {
    let route = Route {
        source: "bench".to_owned(),
        group: group::USER.to_owned(),
        operation: "publish".to_owned(),
        resource: load::UP_RESOURCE.to_owned(),
        ..Route::default()
    };
    let start = Instant::now();
    let mut seq: u64 = 0;
    while !counts.stopping() {
        if rate > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep((due - now).max(SOURCE_TICK));
                continue;
            }
        }
        let mut msg = Message::new(route.clone(), bench_content(seq, size));
        loop {
            match hub.send(msg) {
                Ok(()) => break,
                Err(refused) => {
                    counts.outbox_full.fetch_add(1, Ordering::Relaxed);
                    if counts.stopping() {
                        return;
                    }
                    thread::sleep(FULL_BACKOFF);
                    msg = *refused.message;
                }
            }
        }
        counts.sent.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
}

/// Sends one request at a time and waits for its response, until told to stop.
fn requester(hub: &Hub, counts: &Counts, size: usize) {
    let route = Route {
        source: "bench".to_owned(),
        group: group::USER.to_owned(),
        operation: "query".to_owned(),
        resource: load::REQUEST_RESOURCE.to_owned(),
        ..Route::default()
    };
    while !counts.stopping() {
        let seq = counts.next_request.fetch_add(1, Ordering::Relaxed);
        let msg = Message::new(route.clone(), bench_content(seq, size));
        let sent = Instant::now();
        let answered = hub.request(msg, REQUEST_TIMEOUT);
        let rtt = sent.elapsed().as_micros() as u64;
        let mut r = lock(&counts.requests);
        match answered {
            Ok(_) => {
                r.ok += 1;
                r.interval_ok += 1;
                r.rtt.record(rtt);
                r.interval_rtt.record(rtt);
            }
            Err(e) => {
                r.failed += 1;
                drop(r);
                log::warn!("bench request {seq}: {e}");
            }
        }
    }
}

/// Waits until the cloud confirmed every message the outbox held. Returns how long that took, or
/// `None` if it did not within `DRAIN_PATIENCE`.
fn drain(agent: &Agent) -> Option<Duration> {
    let start = Instant::now();
    // The agent signals nothing when its outbox empties: look every 10 ms, bounded.
    while agent.outbox_len() > 0 {
        if start.elapsed() > DRAIN_PATIENCE {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
    Some(start.elapsed())
}

/// CPU ticks (user+sys) per thread id, with the thread's name, from /proc/self/task.
fn thread_cpu() -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `pid (comm) state ...`: the name may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state is field 3, utime 14 and stime 15 (proc(5)).
        let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        out.insert(tid, (name, ticks(14) + ticks(15)));
    }
    out
}

fn cpu_seconds(cpu: &BTreeMap<u32, (String, u64)>) -> f64 {
    cpu.values().map(|(_, t)| *t).sum::<u64>() as f64 / TICKS_PER_SECOND
}

/// `VmRSS`, `VmHWM`, `RssAnon` (kB) and `Threads` from /proc/self/status.
fn memory_fields(out: &mut Map<String, Value>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for (key, name) in [
        ("VmRSS:", "vmrss_kb"),
        ("VmHWM:", "vmhwm_kb"),
        ("RssAnon:", "rss_anon_kb"),
        ("Threads:", "threads"),
    ] {
        let value = status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        out.insert(name.to_owned(), value.into());
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Builds the stats lines; remembers what the previous line reported.
struct Reporter {
    label: String,
    started: Instant,
    last_at: Instant,
    last_cpu_s: f64,
    last_sent: u64,
}

/// What the summary line reports on.
struct Summary<'a> {
    counts: &'a Counts,
    agent: &'a Agent,
    load_elapsed: Duration,
    cpu_start: &'a BTreeMap<u32, (String, u64)>,
    cpu_end: &'a BTreeMap<u32, (String, u64)>,
    drained_in: Option<Duration>,
    store: Option<meta_store::StoreStats>,
}

impl Reporter {
    fn new(label: &str, started: Instant, cpu_start: BTreeMap<u32, (String, u64)>) -> Reporter {
        Reporter {
            label: label.to_owned(),
            started,
            last_at: started,
            last_cpu_s: cpu_seconds(&cpu_start),
            last_sent: 0,
        }
    }

    fn interval_line(&mut self, counts: &Counts, agent: &Agent) -> String {
        let now = Instant::now();
        let span = now.duration_since(self.last_at).as_secs_f64();
        let cpu_s = cpu_seconds(&thread_cpu());
        let sent = counts.sent.load(Ordering::Relaxed);
        let mut o = Map::new();
        o.insert("event".into(), "bench_stats".into());
        o.insert("label".into(), self.label.clone().into());
        o.insert("t_s".into(), round1(now.duration_since(self.started).as_secs_f64()).into());
        o.insert("sent".into(), (sent - self.last_sent).into());
        o.insert("sent_rate".into(), ((sent - self.last_sent) as f64 / span).round().into());
        o.insert("outbox_len".into(), agent.outbox_len().into());
        {
            let mut r = lock(&counts.received);
            o.insert("received".into(), r.interval_count.into());
            o.insert("received_rate".into(), (r.interval_count as f64 / span).round().into());
            r.interval_oneway.json_fields("oneway", &mut o);
            r.interval_count = 0;
            r.interval_oneway = Histogram::default();
        }
        {
            let mut r = lock(&counts.requests);
            o.insert("requests".into(), r.interval_ok.into());
            o.insert("request_rate".into(), (r.interval_ok as f64 / span).round().into());
            r.interval_rtt.json_fields("rtt", &mut o);
            r.interval_ok = 0;
            r.interval_rtt = Histogram::default();
        }
        memory_fields(&mut o);
        o.insert("cpu_s".into(), round1(cpu_s - self.last_cpu_s).into());
        o.insert("cpu_pct".into(), round1((cpu_s - self.last_cpu_s) / span * 100.0).into());
        self.last_at = now;
        self.last_cpu_s = cpu_s;
        self.last_sent = sent;
        Value::Object(o).to_string()
    }

    fn summary_line(&self, s: &Summary<'_>) -> String {
        let span = s.load_elapsed.as_secs_f64();
        let cpu_s = cpu_seconds(s.cpu_end) - cpu_seconds(s.cpu_start);
        let sent = s.counts.sent.load(Ordering::Relaxed);
        let mut o = Map::new();
        o.insert("event".into(), "bench_summary".into());
        o.insert("label".into(), self.label.clone().into());
        o.insert("load_s".into(), round1(span).into());
        o.insert("sent".into(), sent.into());
        o.insert("sent_rate".into(), (sent as f64 / span).round().into());
        o.insert("outbox_full_waits".into(), s.counts.outbox_full.load(Ordering::Relaxed).into());
        o.insert(
            "drained_s".into(),
            s.drained_in.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0).into(),
        );
        o.insert("unconfirmed_at_end".into(), s.agent.outbox_len().into());
        {
            let r = lock(&s.counts.received);
            o.insert("received".into(), r.count.into());
            o.insert("received_rate".into(), (r.count as f64 / span).round().into());
            r.seqs.json_fields(&mut o);
            r.oneway.json_fields("oneway", &mut o);
        }
        {
            let r = lock(&s.counts.requests);
            o.insert("requests".into(), r.ok.into());
            o.insert("request_rate".into(), (r.ok as f64 / span).round().into());
            o.insert("requests_failed".into(), r.failed.into());
            r.rtt.json_fields("rtt", &mut o);
        }
        memory_fields(&mut o);
        o.insert("cpu_s".into(), ((cpu_s * 100.0).round() / 100.0).into());
        o.insert("cpu_pct".into(), round1(cpu_s / span * 100.0).into());
        let mut by_thread: BTreeMap<String, u64> = BTreeMap::new();
        for (tid, (name, end)) in s.cpu_end {
            let start = s.cpu_start.get(tid).map_or(0, |(_, t)| *t);
            // Requesters are many threads of one role: add them up.
            let role = if name.starts_with("bench-rr-") { "bench-rr" } else { name.as_str() };
            *by_thread.entry(role.to_owned()).or_default() += end.saturating_sub(start);
        }
        let by_thread: BTreeMap<String, f64> = by_thread
            .into_iter()
            .filter(|(_, ticks)| *ticks > 0)
            .map(|(role, ticks)| (role, ticks as f64 / TICKS_PER_SECOND))
            .collect();
        o.insert("cpu_by_thread".into(), json!(by_thread));
        let status = s.agent.status();
        o.insert(
            "agent".into(),
            json!({
                "messages_up": Status::get(&status.messages_up),
                "messages_down": Status::get(&status.messages_down),
                "acks_sent": Status::get(&status.acks_sent),
                "sessions": Status::get(&status.sessions),
                "malformed": Status::get(&status.malformed),
            }),
        );
        if let Some(store) = s.store {
            o.insert(
                "store".into(),
                json!({
                    "batches": store.batches, "messages": store.messages,
                    "largest_batch": store.largest_batch, "file_syncs": store.file_syncs,
                    "dir_syncs": store.dir_syncs, "changes_dropped": store.changes_dropped,
                }),
            );
        }
        Value::Object(o).to_string()
    }
}

/// Prints the Markdown table of a results file (see [`TableArgs`]).
fn print_table(path: &std::path::Path) -> Result<(), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("read {}: {e}", path.display())))?;
    println!(
        "| scenario | offered /s | achieved /s | lost | one-way p50 / p99 µs | RTT p50 / p99 µs \
         | CPU % of a core | CPU µs/msg | VmRSS / VmHWM MB | threads | notes |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: Value = serde_json::from_str(line)
            .map_err(|e| Failure::Usage(format!("{}:{}: {e}", path.display(), n + 1)))?;
        println!("{}", table_row(&row));
    }
    Ok(())
}

fn table_row(row: &Value) -> String {
    let at = |path: &str| path.split('.').try_fold(row, |v, key| v.get(key));
    let num = |path: &str| at(path).and_then(Value::as_f64);
    let int = |path: &str| num(path).map_or("–".to_owned(), |x| format!("{x:.0}"));
    let pair = |a: &str, b: &str| match (num(a), num(b)) {
        (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
        _ => "–".to_owned(),
    };
    let mb = |path: &str| num(path).map_or("–".to_owned(), |kb| format!("{:.1}", kb / 1024.0));
    let scenario = at("scenario").and_then(Value::as_str).unwrap_or("?");
    let kind = at("kind").and_then(Value::as_str).unwrap_or("?");
    let offered = at("offered").map_or("–".to_owned(), |v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    if kind == "idle" {
        let notes = format!(
            "{} s CPU in {} s idle; RssAnon {} MB, PSS {} MB",
            num("idle.cpu_s").map_or("–".to_owned(), |s| format!("{s:.2}")),
            int("idle.idle_s"),
            mb("idle.rss_anon_kb"),
            mb("idle.pss_kb"),
        );
        return format!(
            "| {scenario} | – | – | – | – | – | {} | – | {} / {} | {} | {notes} |",
            num("idle.cpu_s")
                .zip(num("idle.idle_s"))
                .map_or("–".to_owned(), |(c, s)| format!("{:.2}", c / s * 100.0)),
            mb("idle.vmrss_kb"),
            mb("idle.vmhwm_kb"),
            int("idle.threads"),
        );
    }
    // Per kind: what was achieved, what was lost, where latency is measured, what one unit is.
    let (achieved, lost, oneway, rtt, units, mut notes) = match kind {
        "e2c" => {
            let sent = num("bench.sent").unwrap_or(0.0);
            let got = num("sim.up_seq.distinct").unwrap_or(0.0);
            let waits = num("bench.outbox_full_waits").unwrap_or(0.0);
            (
                int("sim.up_bench_rate"),
                format!("{:.0}", (sent - got).max(0.0)),
                pair("sim.up_oneway_p50_us", "sim.up_oneway_p99_us"),
                "–".to_owned(),
                sent,
                if waits > 0.0 {
                    format!("outbox full {waits:.0}× (back-pressure)")
                } else {
                    String::new()
                },
            )
        }
        "sync" => (
            int("bench.request_rate"),
            int("bench.requests_failed"),
            pair("sim.up_oneway_p50_us", "sim.up_oneway_p99_us"),
            pair("bench.rtt_p50_us", "bench.rtt_p99_us"),
            num("bench.requests").unwrap_or(0.0),
            String::new(),
        ),
        _ => {
            let skipped = num("sim.down_skipped").unwrap_or(0.0);
            (
                int("bench.received_rate"),
                int("bench.missing"),
                pair("bench.oneway_p50_us", "bench.oneway_p99_us"),
                pair("sim.ack_rtt_p50_us", "sim.ack_rtt_p99_us"),
                num("bench.received").unwrap_or(0.0),
                if skipped > 0.0 {
                    format!("cloud held back {skipped:.0} (ack window full)")
                } else {
                    String::new()
                },
            )
        }
    };
    if let Some(batches) = num("bench.store.batches") {
        let msgs = num("bench.store.messages").unwrap_or(0.0);
        notes = format!(
            "{notes} {batches:.0} store batches ({:.0} msgs each)",
            msgs / batches.max(1.0)
        );
    }
    if num("bench.duplicates").unwrap_or(0.0) + num("sim.up_seq.duplicates").unwrap_or(0.0) > 0.0 {
        notes = format!(
            "{notes} duplicates {:.0}",
            num("bench.duplicates").unwrap_or(0.0) + num("sim.up_seq.duplicates").unwrap_or(0.0)
        );
    }
    // Other work on the host competes for the cores and shows in latency and throughput.
    if let Some(load) = at("loadavg").and_then(Value::as_str).and_then(|l| l.parse::<f64>().ok()) {
        if load >= 1.0 {
            notes = format!("{notes} host load {load:.1}");
        }
    }
    let per_msg = match num("bench.cpu_s") {
        Some(cpu) if units > 0.0 => format!("{:.1}", cpu * 1e6 / units),
        _ => "–".to_owned(),
    };
    format!(
        "| {scenario} | {offered} | {achieved} | {lost} | {oneway} | {rtt} | {} | {per_msg} | {} / {} | {} | {} |",
        num("bench.cpu_pct").map_or("–".to_owned(), |p| format!("{p:.0}")),
        mb("bench.vmrss_kb"),
        mb("bench.vmhwm_kb"),
        int("bench.threads"),
        notes.trim(),
    )
}

/// The figures of one run that `compare` puts side by side; `None` where the run has none.
#[derive(Clone, Copy, Default)]
struct RunFigures {
    cpu_us_per_unit: Option<f64>,
    agent_us_per_unit: Option<f64>,
    rate: Option<f64>,
    p50_us: Option<f64>,
    load: Option<f64>,
    /// Idle runs: anonymous, private (USS) and proportional (PSS) memory, kB.
    rss_anon_kb: Option<f64>,
    uss_kb: Option<f64>,
    pss_kb: Option<f64>,
}

fn run_figures(row: &Value) -> RunFigures {
    let at = |path: &str| path.split('.').try_fold(row, |v, key| v.get(key));
    let num = |path: &str| at(path).and_then(Value::as_f64);
    let load = at("loadavg").and_then(Value::as_str).and_then(|l| l.parse::<f64>().ok());
    let kind = at("kind").and_then(Value::as_str).unwrap_or("?");
    if kind == "idle" {
        return RunFigures {
            cpu_us_per_unit: num("idle.cpu_s").map(|s| s * 1e6),
            load,
            rss_anon_kb: num("idle.rss_anon_kb"),
            uss_kb: num("idle.uss_kb"),
            pss_kb: num("idle.pss_kb"),
            ..RunFigures::default()
        };
    }
    // One unit: a message the bench sent (e2c), a request answered (sync), a message received.
    let (units, rate, p50) = match kind {
        "e2c" => (num("bench.sent"), num("sim.up_bench_rate"), num("sim.up_oneway_p50_us")),
        "sync" => (num("bench.requests"), num("bench.request_rate"), num("bench.rtt_p50_us")),
        _ => (num("bench.received"), num("bench.received_rate"), num("bench.oneway_p50_us")),
    };
    let units = units.filter(|u| *u > 0.0);
    let cpu = num("bench.cpu_s");
    let bench_threads: f64 = at("bench.cpu_by_thread")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter().filter(|(k, _)| k.starts_with("bench-")).filter_map(|(_, v)| v.as_f64()).sum()
        })
        .unwrap_or(0.0);
    RunFigures {
        cpu_us_per_unit: cpu.zip(units).map(|(c, u)| c * 1e6 / u),
        agent_us_per_unit: cpu.zip(units).map(|(c, u)| (c - bench_threads).max(0.0) * 1e6 / u),
        rate,
        p50_us: p50,
        load,
        ..RunFigures::default()
    }
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    Some(if xs.len() % 2 == 1 { xs[mid] } else { (xs[mid - 1] + xs[mid]) / 2.0 })
}

/// Scenario → its runs, in file order of first appearance.
fn read_runs(path: &std::path::Path) -> Result<Vec<(String, Vec<RunFigures>)>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("read {}: {e}", path.display())))?;
    let mut out: Vec<(String, Vec<RunFigures>)> = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: Value = serde_json::from_str(line)
            .map_err(|e| Failure::Usage(format!("{}:{}: {e}", path.display(), n + 1)))?;
        let scenario = row.get("scenario").and_then(Value::as_str).unwrap_or("?").to_owned();
        let figures = run_figures(&row);
        match out.iter_mut().find(|(name, _)| *name == scenario) {
            Some((_, runs)) => runs.push(figures),
            None => out.push((scenario, vec![figures])),
        }
    }
    Ok(out)
}

/// Prints one line per scenario found in both files (see [`CompareArgs`]).
fn print_compare(before: &std::path::Path, after: &std::path::Path) -> Result<(), Failure> {
    let before = read_runs(before)?;
    let after = read_runs(after)?;
    for (scenario, runs_b) in &before {
        let Some((_, runs_a)) = after.iter().find(|(name, _)| name == scenario) else { continue };
        let med = |runs: &[RunFigures], f: fn(&RunFigures) -> Option<f64>| {
            median(runs.iter().filter_map(f).collect())
        };
        let pair = |label: &str, unit: &str, f: fn(&RunFigures) -> Option<f64>| match (
            med(runs_b, f),
            med(runs_a, f),
        ) {
            (Some(b), Some(a)) if b > 0.0 => {
                format!("{label} {b:.1} → {a:.1}{unit} (×{:.2})", a / b)
            }
            (Some(b), Some(a)) => format!("{label} {b:.1} → {a:.1}{unit}"),
            _ => String::new(),
        };
        let parts = if scenario.starts_with("idle") {
            vec![
                pair("CPU µs", "", |r| r.cpu_us_per_unit),
                pair("RssAnon", " kB", |r| r.rss_anon_kb),
                pair("USS", " kB", |r| r.uss_kb),
                pair("PSS", " kB", |r| r.pss_kb),
            ]
        } else {
            vec![
                pair("CPU/unit", " µs", |r| r.cpu_us_per_unit),
                pair("agent threads", " µs", |r| r.agent_us_per_unit),
                pair("rate", "/s", |r| r.rate),
                pair("p50", " µs", |r| r.p50_us),
            ]
        };
        // Runs are paired in file order (bench.sh runs each pair back to back, alternating which
        // build goes first): the median of the pairs' ratios is steadier than the ratio of
        // medians on a busy host.
        let paired: Vec<f64> = runs_b
            .iter()
            .zip(runs_a)
            .filter_map(|(b, a)| b.cpu_us_per_unit.zip(a.cpu_us_per_unit))
            .filter(|(b, _)| *b > 0.0)
            .map(|(b, a)| a / b)
            .collect();
        let mut parts = parts;
        if let Some(ratio) = median(paired) {
            parts.insert(0, format!("CPU after/before ×{ratio:.2} (median of paired runs)"));
        }
        let parts: Vec<String> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        println!(
            "compare {scenario}: {}; median of {}/{} runs, load {:.1}/{:.1}",
            parts.join("; "),
            runs_b.len(),
            runs_a.len(),
            med(runs_b, |r| r.load).unwrap_or(f64::NAN),
            med(runs_a, |r| r.load).unwrap_or(f64::NAN),
        );
    }
    Ok(())
}
