//! The reference receiver: a small synchronous HTTP/1.1 server implementing
//! the contract's push API (`POST /api/<name>`) and configuration pull
//! (`GET /config/<token>`, set with `PUT` or [`Receiver::set_config`]), used by
//! relais's tests, its demo and its benchmarks.
//!
//! This file owns the public API ([`Receiver`], [`ReceiverOptions`],
//! [`Fault`], ...) and the accept loop with its connection bookkeeping.
//! Request handling lives in `conn`, the wire format in `http`, the streaming
//! body split in `body`, the configuration endpoints in `config`, SQLite in
//! `store` and the command line in `cli`.
//!
//! Design constraints: std only (one thread per connection, at most
//! [`MAX_CONNECTIONS`] at once), memory flat in the body size (bodies reach
//! hundreds of MB), and no panic on any input.

mod body;
mod cli;
mod config;
mod conn;
mod http;
mod store;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

pub use cli::run_cli;

use body::Spool;
use store::Store;

/// Most connections served at once; further clients wait in the listen
/// backlog until a connection ends.
pub const MAX_CONNECTIONS: usize = 64;

/// How to start a [`Receiver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverOptions {
    /// Holds `receiver.db`, `blobs/` and the temporary `tmp/`; created if missing.
    pub data_dir: PathBuf,
    /// Answer a repeated `Idempotency-Key` with the original result instead
    /// of storing a new row (the seed's Python backend does not).
    pub idempotency: bool,
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
}

impl ReceiverOptions {
    /// Idempotency on, listening on a free port of 127.0.0.1.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ReceiverOptions {
            data_dir: data_dir.into(),
            idempotency: true,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        }
    }
}

/// Injected misbehaviour, consumed one per incoming `POST /api/<name>`
/// (with a valid `Content-Length`), in FIFO order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Read the whole request, store the row as normal, then close the
    /// connection without answering.
    LoseAnswer,
    /// Drain the body, store nothing, answer this status with
    /// `{"detail": "injected <code>"}` and `Retry-After: N` if given.
    Status(u16, Option<u64>),
    /// Handle the request normally (the row is stored), but sleep this long
    /// before sending the answer.
    Delay(Duration),
    /// Close the connection right after reading the headers; store nothing.
    Reset,
    /// Store the row, answer 201 with a `text/html` body `<html>ok</html>`.
    HtmlOk,
}

/// Injected misbehaviour of `GET /config/<token>`, consumed one per such
/// request in FIFO order (separate from [`Fault`], which POSTs consume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFault {
    /// Answer this status with `{"detail": "injected <code>"}`.
    Status(u16),
    /// Answer 200 with this body instead of the stored configuration.
    Body(String),
    /// Sleep this long, then answer normally.
    Delay(Duration),
}

/// A stored row as seen by tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRow {
    pub id: i64,
    /// The `<name>` of `/api/<name>`: `"evenements"`, `"media"`, ...
    pub endpoint: String,
    pub idempotency_key: Option<String>,
    /// The body as received, except a string value longer than 64 KiB,
    /// replaced by the string `"<blob>"`.
    pub json: String,
    /// The base64-decoded bytes of that long string: `data_dir/blobs/<id>.bin`.
    pub blob: Option<PathBuf>,
    pub blob_len: Option<u64>,
    /// The `Authorization` header as received.
    pub authorization: Option<String>,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// HTTP requests whose head was read, whatever their outcome.
    pub requests: u64,
    /// Rows stored.
    pub stored: u64,
    /// Requests answered from the idempotency cache.
    pub replays: u64,
}

/// A running receiver. Dropping it or calling [`Receiver::shutdown`] stops it.
#[derive(Debug)]
pub struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept_thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Opens the data directory, binds the listener and starts serving.
    pub fn start(opts: ReceiverOptions) -> io::Result<Receiver> {
        std::fs::create_dir_all(&opts.data_dir)?;
        let store = Store::open(&opts.data_dir).map_err(io::Error::other)?;
        let spool = Spool::new(opts.data_dir.join("tmp"))?;
        let listener = TcpListener::bind(opts.listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store,
            spool,
            idempotency: opts.idempotency,
            faults: Mutex::new(VecDeque::new()),
            config_faults: Mutex::new(VecDeque::new()),
            requests: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            active: Mutex::new(0),
            slot_freed: Condvar::new(),
            conns: Mutex::new(HashMap::new()),
        });
        let for_thread = Arc::clone(&shared);
        let accept_thread = std::thread::Builder::new()
            .name("receiver-accept".into())
            .spawn(move || accept_loop(&for_thread, &listener))?;
        log::info!("receiver listening on {addr}");
        Ok(Receiver {
            shared,
            addr,
            accept_thread: Some(accept_thread),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (a wildcard bind address is
    /// reported as the loopback address, which is where it can be reached).
    pub fn url(&self) -> String {
        format!("http://{}", reachable(self.addr))
    }

    /// Queues a fault for a future request.
    pub fn push_fault(&self, f: Fault) {
        lock(&self.shared.faults).push_back(f);
    }

    /// Queues a fault for a future `GET /config/<token>`.
    pub fn push_config_fault(&self, f: ConfigFault) {
        lock(&self.shared.config_faults).push_back(f);
    }

    /// Stores `json_text` (a JSON object; any `config_hash` member is dropped) as
    /// the configuration of site `token`, replacing the previous one, and returns
    /// its hash, the `config_hash` that `GET /config/<token>` will serve.
    pub fn set_config(&self, token: &str, json_text: &str) -> Result<String, String> {
        config::store_config(&self.shared, token, json_text).map_err(|e| e.to_string())
    }

    /// Every stored row, ordered by id. A database error is logged and
    /// yields no rows (callers are tests that will then fail visibly).
    pub fn rows(&self) -> Vec<ReceivedRow> {
        self.shared.store.rows().unwrap_or_else(|e| {
            log::error!("receiver: cannot read rows: {e}");
            Vec::new()
        })
    }

    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            requests: self.shared.requests.load(Ordering::Relaxed),
            stored: self.shared.stored.load(Ordering::Relaxed),
            replays: self.shared.replays.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, closes open connections and returns.
    pub fn shutdown(self) {
        // Drop does the work.
    }

    fn stop(&mut self) {
        let Some(handle) = self.accept_thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.slot_freed.notify_all();
        // `accept` has no timeout: a connection to ourselves unblocks it so
        // it can see the flag.
        let _ = TcpStream::connect_timeout(&reachable(self.addr), Duration::from_secs(1));
        let _ = handle.join();
        // Connection threads are not joined (one may be sleeping in a Delay
        // fault); shutting their sockets down makes them end promptly.
        for stream in lock(&self.shared.conns).values() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        log::info!("receiver on {} stopped", self.addr);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// State shared by the accept loop and the connection threads.
#[derive(Debug)]
struct Shared {
    store: Store,
    spool: Spool,
    idempotency: bool,
    faults: Mutex<VecDeque<Fault>>,
    config_faults: Mutex<VecDeque<ConfigFault>>,
    requests: AtomicU64,
    stored: AtomicU64,
    replays: AtomicU64,
    stopping: AtomicBool,
    /// Connections being served, bounded by [`MAX_CONNECTIONS`].
    active: Mutex<usize>,
    slot_freed: Condvar,
    /// A handle on each open connection, so `stop` can close them.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn next_fault(&self) -> Option<Fault> {
        lock(&self.faults).pop_front()
    }

    fn next_config_fault(&self) -> Option<ConfigFault> {
        lock(&self.config_faults).pop_front()
    }

    /// Waits for a free connection slot; `false` when stopping instead.
    fn acquire_slot(&self) -> bool {
        let mut active = lock(&self.active);
        while *active >= MAX_CONNECTIONS && !self.stopping() {
            active = self
                .slot_freed
                .wait(active)
                .unwrap_or_else(|p| p.into_inner());
        }
        if self.stopping() {
            return false;
        }
        *active += 1;
        true
    }

    fn release_slot(&self) {
        *lock(&self.active) -= 1;
        self.slot_freed.notify_one();
    }
}

/// A mutex poisoned by a panicking connection thread still guards valid
/// data here (plain queues and maps), so keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The address a client should connect to for a listener bound on `addr`.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut next_id = 0u64;
    while shared.acquire_slot() {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                shared.release_slot();
                if shared.stopping() {
                    break;
                }
                // E.g. out of file descriptors: back off instead of spinning.
                log::warn!("receiver: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.stopping() {
            shared.release_slot();
            break;
        }
        next_id += 1;
        spawn_connection(shared, stream, next_id);
    }
}

/// Registers the connection (before its thread runs, so `stop` cannot miss
/// it) and serves it on its own thread.
fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream, id: u64) {
    if let Ok(handle) = stream.try_clone() {
        lock(&shared.conns).insert(id, handle);
    }
    let guard = ConnectionGuard {
        shared: Arc::clone(shared),
        id,
    };
    let spawned = std::thread::Builder::new()
        .name(format!("receiver-conn-{id}"))
        .spawn(move || {
            conn::serve(&guard.shared, stream);
            drop(guard);
        });
    if let Err(e) = spawned {
        // The closure (and with it the guard) was dropped: slot released.
        log::warn!("receiver: cannot spawn connection thread: {e}");
    }
}

/// Releases the connection's slot and registration however its thread ends,
/// panics included.
struct ConnectionGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.conns).remove(&self.id);
        self.shared.release_slot();
    }
}
