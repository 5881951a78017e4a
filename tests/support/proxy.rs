//! A fault-injection TCP proxy for tests: it listens on 127.0.0.1:0, forwards each accepted
//! connection to a target, and can pass, delay, throttle or stall all traffic (a half-open link:
//! sockets stay open, no byte moves), refuse new connections, cut every connection, or cut each
//! connection after a number of bytes (mid-frame). It knows nothing about TLS or WebSocket; it only moves bytes.
//! Self-contained (std and crossbeam-channel only) so any test file can include it with
//! `#[path = "support/proxy.rs"] mod proxy;` or through `mod support;`.
//!
//! Threads: one `sim-proxy-acc` accept thread and two `sim-proxy-fwd` threads per connection (one
//! per direction). Dropping the `Proxy` stops and joins all of them.

#![allow(dead_code)] // each test file uses only some of these functions

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Bound on connecting to the target for each accepted connection.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes moved per read.
const CHUNK_BYTES: usize = 16 * 1024;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Forward nothing either way but keep every socket open: to both ends the link looks
    /// half-open. Bytes read meanwhile are held and delivered after a return to `Pass`.
    Stall,
    /// Forward, holding every chunk this long first (a slow path).
    Delay(Duration),
    /// Forward at most this many bytes per second in each direction.
    Throttle(u32),
}

/// A running proxy. Drop stops it, closes every connection and joins every thread.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    mode: Mutex<Mode>,
    /// Signalled when the mode changes, a connection is cut, or the proxy stops.
    wake: Condvar,
    stopping: AtomicBool,
    /// New connections are closed at once (the cloud is "down").
    refusing: AtomicBool,
    /// Cut each connection once this many more bytes went from client to target (0: off).
    cut_after: AtomicUsize,
    accepted: AtomicUsize,
    conns: Mutex<Vec<Arc<Pair>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// The two sockets of one proxied connection.
struct Pair {
    client: TcpStream,
    upstream: TcpStream,
    cut: AtomicBool,
}

impl Pair {
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

impl Shared {
    /// Wakes every forwarder waiting out a stall. Taking the mode lock first means a forwarder
    /// between its check and its wait cannot miss the change.
    fn notify(&self) {
        drop(lock(&self.mode));
        self.wake.notify_all();
    }

    fn cut(&self, pair: &Pair) {
        pair.cut();
        self.notify();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Proxy {
    /// Starts a proxy to `target` on 127.0.0.1 with a free port, in `Mode::Pass`. The port
    /// accepts connections once this returns.
    pub fn start(target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            mode: Mutex::new(Mode::Pass),
            wake: Condvar::new(),
            stopping: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            cut_after: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            workers: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("sim-proxy-acc".to_owned())
            .spawn(move || accept_loop(&accept_shared, &listener))?;
        Ok(Proxy { addr, shared, accept_thread: Some(accept_thread) })
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the mode for every current and future connection. Takes effect for bytes not
    /// already being written.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
        self.shared.wake.notify_all();
    }

    pub fn mode(&self) -> Mode {
        *lock(&self.shared.mode)
    }

    /// Shuts down every current connection, both sockets, both ways (no TLS or WebSocket goodbye
    /// reaches either end). New connections are still accepted.
    pub fn cut_all(&self) {
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for pair in conns {
            pair.cut();
        }
        self.shared.notify();
    }

    /// While set, new connections are accepted and closed at once, like a cloud that is down.
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refusing.store(refuse, Ordering::SeqCst);
    }

    /// Cuts every connection after `bytes` more bytes went from client to target: the cut lands
    /// in the middle of a frame unless `bytes` happens to end one.
    pub fn cut_after(&self, bytes: usize) {
        self.shared.cut_after.store(bytes, Ordering::SeqCst);
    }

    /// Client connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.notify();
        // Wake the accept thread out of accept() with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept_thread) = self.accept_thread.take() {
            let _ = accept_thread.join();
        }
        self.cut_all();
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refusing.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream) = TcpStream::connect_timeout(&shared.target, TARGET_CONNECT_TIMEOUT)
        else {
            // The client sees the connection close, as it would with a dead target.
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(client_rd), Ok(upstream_rd)) = (client.try_clone(), upstream.try_clone()) else {
            continue;
        };
        let pair = Arc::new(Pair { client, upstream, cut: AtomicBool::new(false) });
        {
            let mut conns = lock(&shared.conns);
            conns.retain(|p| !p.cut.load(Ordering::SeqCst));
            conns.push(Arc::clone(&pair));
        }
        let mut workers = lock(&shared.workers);
        workers.retain(|w| !w.is_finished());
        for (from, to_client_side) in [(client_rd, false), (upstream_rd, true)] {
            let fwd_shared = Arc::clone(shared);
            let fwd_pair = Arc::clone(&pair);
            let spawned =
                thread::Builder::new().name("sim-proxy-fwd".to_owned()).spawn(move || {
                    let to = if to_client_side { &fwd_pair.client } else { &fwd_pair.upstream };
                    forward(&fwd_shared, &fwd_pair, from, to);
                });
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(_) => shared.cut(&pair),
            }
        }
    }
}

/// Copies `from` to `to` until either side ends, pausing while the mode is `Stall`.
fn forward(shared: &Shared, pair: &Pair, mut from: TcpStream, mut to: &TcpStream) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                // Pass the half-close on, so the other end sees EOF too; a stalled link holds
                // the FIN back like any other byte.
                if wait_while_stalled(shared, pair) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                shared.cut(pair);
                return;
            }
        };
        if !wait_while_stalled(shared, pair) {
            return;
        }
        let mut chunk = &buf[..n];
        if !to_client_side(pair, to) {
            let budget = shared.cut_after.load(Ordering::SeqCst);
            if budget > 0 {
                if chunk.len() >= budget {
                    let _ = to.write_all(&chunk[..budget]);
                    shared.cut_after.store(0, Ordering::SeqCst);
                    shared.cut(pair);
                    return;
                }
                shared.cut_after.store(budget - chunk.len(), Ordering::SeqCst);
            }
        }
        let mode = *lock(&shared.mode);
        match mode {
            Mode::Delay(d) => thread::sleep(d), // the fault being injected, not synchronisation
            Mode::Throttle(rate) if rate > 0 => {
                // Move the chunk in tenths of the per-second budget.
                let step = (rate as usize / 10).max(1);
                while chunk.len() > step {
                    if to.write_all(&chunk[..step]).is_err() {
                        shared.cut(pair);
                        return;
                    }
                    chunk = &chunk[step..];
                    thread::sleep(Duration::from_millis(100));
                }
            }
            _ => {}
        }
        if to.write_all(chunk).is_err() {
            shared.cut(pair);
            return;
        }
    }
}

fn to_client_side(pair: &Pair, to: &TcpStream) -> bool {
    std::ptr::eq(to, &pair.client)
}

/// Blocks while the proxy is stalled. False when the connection was cut or the proxy stops.
fn wait_while_stalled(shared: &Shared, pair: &Pair) -> bool {
    let mode = lock(&shared.mode);
    let _mode = shared
        .wake
        .wait_while(mode, |m| {
            *m == Mode::Stall
                && !pair.cut.load(Ordering::SeqCst)
                && !shared.stopping.load(Ordering::SeqCst)
        })
        .unwrap_or_else(PoisonError::into_inner);
    !pair.cut.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst)
}
