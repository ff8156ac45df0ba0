//! Helpers shared by the push tests: scratch directories, waiting on a condition,
//! running the `relais` binary with a clean environment, a throttling TCP proxy, the
//! backend (relais-server in-process behind a fault-injecting proxy), the peak RSS of a
//! child process and reading the agent's `sync_tracking` table.
#![allow(dead_code)] // Each test file uses a different subset.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miniserde::json::{Number, Object, Value as Json};
use relais::received::EmbeddedServer;
use relais::site_admin::SiteAdmin;
use rusqlite::Connection;
use rusqlite::types::Value;

pub use relais::received::ReceivedRow;

/// The device id `relais::demo::settings_for` uses; children get the same one.
pub const DEVICE: &str = "demo-pi";

// ---------------------------------------------------------------- scratch directories

/// A fresh directory under the temporary directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Unique per process, test (`tag`) and call, so parallel tests never share one.
    pub fn new(tag: &str) -> Scratch {
        let dir = Scratch::uncreated(tag);
        std::fs::create_dir_all(&dir.0).expect("create scratch dir");
        dir
    }

    /// The same path as [`Scratch::new`] would make, but not created: for code under
    /// test that creates its directory itself.
    pub fn uncreated(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relais-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn state_db(&self) -> PathBuf {
        self.0.join("state").join(relais::tracking::STATE_DB_NAME)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- waiting

/// Polls `cond` every 10 ms until it holds (`true`) or `timeout` passes (`false`).
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a child to exit, up to `timeout`; kills it (and fails) if it does not.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "relais (pid {}) did not exit within {timeout:?}",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------- the binary

/// The environment of a child agent: the seed's variables pointing into `dir`, then
/// `extra` (later entries win).
pub fn agent_env(
    db: &Path,
    backend: &str,
    dir: &Path,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = vec![
        ("LOCAL_DB_PATH".into(), db.display().to_string()),
        ("BACKEND_URL".into(), backend.into()),
        ("DEVICE_ID".into(), DEVICE.into()),
        (
            "RELAIS_STATE_DIR".into(),
            dir.join("state").display().to_string(),
        ),
        (
            "RELAIS_LOG_DIR".into(),
            dir.join("log").display().to_string(),
        ),
        // Off unless a test turns it on (tests/heartbeat.rs): the other tests count
        // the requests a pass makes.
        ("RELAIS_HEARTBEAT".into(), "0".into()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    vars
}

/// `relais <args>` with only `vars` and `PATH` in its environment, stdout and stderr
/// piped.
pub fn relais_command(args: &[&str], vars: &[(String, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relais"));
    cmd.args(args).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A child agent, killed if a failing test leaves it running.
pub struct Agent(pub Child);

impl std::ops::Deref for Agent {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn spawn_relais(args: &[&str], vars: &[(String, String)]) -> Agent {
    Agent(relais_command(args, vars).spawn().expect("spawn relais"))
}

/// Spawns `relais <args>` with its stderr read to the end on a thread (see [`log_text`]).
pub fn spawn_logged(args: &[&str], vars: &[(String, String)]) -> (Agent, JoinHandle<Vec<u8>>) {
    let mut child = spawn_relais(args, vars);
    let stderr = drain(child.stderr.take().expect("stderr"));
    (child, stderr)
}

/// What a [`spawn_logged`] child wrote to stderr, once it has exited.
pub fn log_text(stderr: JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&stderr.join().unwrap()).into_owned()
}

/// Runs `relais <args>` to completion (at most `timeout`) and returns its output.
pub fn run_relais(args: &[&str], vars: &[(String, String)], timeout: Duration) -> Output {
    let mut child = spawn_relais(args, vars);
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let status = wait_exit(&mut child, timeout);
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Reads a pipe to its end on a thread.
pub fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        out
    })
}

/// Sends `signal` (e.g. "TERM") to `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

/// Peak resident set size of a live process, in KiB (`VmHWM` of /proc/<pid>/status).
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ---------------------------------------------------------------- systemd notifications

/// A socket in `dir` standing in for systemd's `NOTIFY_SOCKET`.
pub struct NotifySocket {
    pub path: PathBuf,
    socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("notify socket timeout");
        NotifySocket { path, socket }
    }

    /// The next message, if one arrives within 20 ms.
    pub fn recv(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

// ---------------------------------------------------------------- throttling proxy

/// A TCP proxy on 127.0.0.1 that forwards client-to-server bytes at a fixed rate
/// (answers flow back unthrottled) and counts the bytes it forwarded upstream.
pub struct Proxy {
    port: u16,
    forwarded: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: &str, bytes_per_sec: u64) -> Proxy {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let forwarded = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (fwd, stop) = (forwarded.clone(), stopping.clone());
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (fwd, stop) = (fwd.clone(), stop.clone());
                std::thread::spawn(move || relay(client, server, bytes_per_sec, &fwd, &stop));
            }
        });
        Proxy {
            port,
            forwarded,
            stopping,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Bytes forwarded to the server so far, all connections together.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Copies client to server at `rate` bytes per second (paced against the connection's
/// start, in 16 KiB slices) and server to client as fast as it comes.
fn relay(client: TcpStream, server: TcpStream, rate: u64, fwd: &AtomicU64, stop: &AtomicBool) {
    let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (mut server_r, mut client_w) = (server, client);
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_r, &mut client_w);
        let _ = client_w.shutdown(Shutdown::Both);
    });
    let began = Instant::now();
    let mut sent = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let n = match client_r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if server_w.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        fwd.fetch_add(n as u64, Ordering::Relaxed);
        // Pacing, not synchronisation: keep the average rate at `rate`.
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(began.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
    let _ = server_w.shutdown(Shutdown::Write);
    let _ = back.join();
}

// ---------------------------------------------------------------- the agent's state

/// One row of the agent's `sync_tracking` table.
#[derive(Debug, Clone)]
pub struct TrackRow {
    pub source: String,
    pub table: String,
    pub local_id: Value,
    pub remote_id: Option<i64>,
    pub status: String,
    pub error: Option<String>,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
}

/// Every `sync_tracking` row of the state database at `path`, in (source, table, id) order.
pub fn tracking_rows(path: &Path) -> Vec<TrackRow> {
    let conn = Connection::open(path).expect("open state db");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT source, table_name, local_id, remote_id, sync_status, error_message, attempts, next_attempt_at
             FROM sync_tracking ORDER BY source, table_name, local_id",
        )
        .expect("prepare tracking query");
    stmt.query_map([], |r| {
        Ok(TrackRow {
            source: r.get(0)?,
            table: r.get(1)?,
            local_id: r.get(2)?,
            remote_id: r.get(3)?,
            status: r.get(4)?,
            error: r.get(5)?,
            attempts: r.get(6)?,
            next_attempt_at: r.get(7)?,
        })
    })
    .expect("query tracking")
    .collect::<Result<_, _>>()
    .expect("read tracking")
}

/// The tracking row of `table` / `id` (the only source), if any.
pub fn tracked(path: &Path, table: &str, id: i64) -> Option<TrackRow> {
    tracking_rows(path)
        .into_iter()
        .find(|r| r.table == table && r.local_id == Value::Integer(id))
}

/// Counts of tracking rows with this status.
pub fn count_status(path: &Path, status: &str) -> usize {
    tracking_rows(path)
        .iter()
        .filter(|r| r.status == status)
        .count()
}

/// Seconds since the Unix epoch.
/// A batch answer for four rows: stored (id 900), rejected 422, replayed (id 901),
/// rejected 404: what a partly accepted batch's rows must each be recorded as.
pub const PARTLY_ACCEPTED: &str = r#"{"results": [{"status": "stored", "id": 900},
    {"status": "rejected", "code": 422, "detail": "bad date"},
    {"status": "replayed", "id": 901},
    {"status": "rejected", "code": 404, "detail": "no such endpoint"}]}"#;

/// A configuration file in `dir` with these `(from, to)` media windows, the media lane's
/// cap, and `extra` top-level members (`"key": value, ` each); its path.
pub fn windows_config(
    dir: &Scratch,
    windows: &[(String, String)],
    cap: Option<u64>,
    extra: &str,
) -> String {
    let list: Vec<String> = windows
        .iter()
        .map(|(from, to)| format!(r#"{{"from": "{from}", "to": "{to}"}}"#))
        .collect();
    let path = dir.join("relais.json");
    std::fs::write(
        &path,
        format!(
            r#"{{{extra}"media_lane": {{"windows": [{}]{}}}}}"#,
            list.join(", "),
            cap.map_or(String::new(), |c| format!(r#", "max_bytes_per_sec": {c}"#))
        ),
    )
    .expect("config");
    path.display().to_string()
}

/// `HH:MM:SS` in UTC, `secs` from now: a media window's bound for an agent run with
/// `TZ=UTC0`.
pub fn utc_in(secs: i64) -> String {
    let t = (unix_now() + secs).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
}

pub fn unix_now() -> i64 {
    relais::clock::unix_now()
}

// ---------------------------------------------------------------- fault-injecting proxy

/// What the [`FaultProxy`] does with one HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyFault {
    /// Forward the request and the answer untouched.
    Pass,
    /// Forward the request, read the server's whole answer (the row is stored), then
    /// close the agent's connection without sending it.
    LoseAnswer,
    /// Forward the request, then hold the answer this long before sending it (beyond
    /// the agent's timeout, the agent has given up by then).
    DelayAnswer(Duration),
    /// Forward the head and half the body, then reset both connections (TCP RST).
    ResetMidBody,
    /// Forward the request, send the first half of the answer's bytes, then close.
    HalfAnswer,
    /// Read the request and never answer; the connection stays open until the agent
    /// gives up. Nothing reaches the server.
    NeverAnswer,
    /// Answer this status (with `Retry-After: N` when given) without forwarding.
    Status(u16, Option<u64>),
    /// Answer `301 Moved Permanently` to this `Location` without forwarding (a backend
    /// that redirects http to https).
    Redirect(String),
    /// Forward the request (the row is stored), answer `201` with an HTML body.
    HtmlCreated,
    /// Reset the connection as soon as the request head has arrived (a backend going
    /// down, a NAT dropping state).
    Refuse,
    /// Answer `200` with this body without forwarding (a backend serving what it
    /// should not).
    Body(String),
    /// Forward the request with the byte in the middle of its body flipped (a chunk
    /// damaged on the way).
    FlipByte,
}

impl ProxyFault {
    pub fn name(&self) -> String {
        match self {
            ProxyFault::Pass => "pass".into(),
            ProxyFault::LoseAnswer => "lost answer".into(),
            ProxyFault::DelayAnswer(d) => format!("answer delayed {d:?}"),
            ProxyFault::ResetMidBody => "reset mid-body".into(),
            ProxyFault::HalfAnswer => "half-written answer".into(),
            ProxyFault::NeverAnswer => "never answers".into(),
            ProxyFault::Status(s, Some(r)) => format!("{s} Retry-After {r}"),
            ProxyFault::Status(s, None) => format!("{s}"),
            ProxyFault::Redirect(to) => format!("301 to {to}"),
            ProxyFault::HtmlCreated => "201 with HTML".into(),
            ProxyFault::Refuse => "connection reset".into(),
            ProxyFault::Body(body) => format!("200 with {} bytes here", body.len()),
            ProxyFault::FlipByte => "a body byte flipped".into(),
        }
    }
}

/// One request as the proxy saw it, for the policy to decide on.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    /// 0 for the first request through the proxy, then 1, 2, ...
    pub seq: u64,
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub content_length: u64,
}

type Policy = Box<dyn FnMut(&ProxyRequest) -> ProxyFault + Send>;

/// Counters of a [`FaultProxy`].
#[derive(Debug, Default, Clone)]
pub struct ProxyStats {
    pub requests: u64,
    /// Requests to push endpoints (`POST /api/...`).
    pub pushes: u64,
    /// Requests that met a fault other than `Pass`.
    pub faults: u64,
    /// Answers the server gave and the agent never saw (`LoseAnswer`, `DelayAnswer`,
    /// `HalfAnswer`): the row is stored but the agent does not know.
    pub answers_lost: u64,
    /// Requests carrying an idempotency key already seen: rows the agent sent again.
    pub resent: u64,
    /// Idempotency keys seen, with how often.
    pub keys: std::collections::HashMap<String, u64>,
    /// `201` answers the server gave, whether the agent saw them or not.
    pub created: u64,
    /// With the keys stripped ([`FaultProxy::strip_idempotency_keys`]): the key each
    /// stored row was sent with, by the row's id.
    pub stripped_keys: std::collections::HashMap<i64, String>,
    /// Most requests between their head's arrival and their answer at one time.
    pub max_in_flight: u64,
}

struct ProxyShared {
    /// `host:port` of the server; changed by [`Receiver::restart`].
    target: std::sync::Mutex<String>,
    policy: std::sync::Mutex<Policy>,
    stats: std::sync::Mutex<ProxyStats>,
    /// Client-to-server pacing, bytes per second (0: unthrottled).
    rate: AtomicU64,
    strip_keys: AtomicBool,
    stopping: AtomicBool,
    seq: AtomicU64,
    /// Requests whose head arrived and whose answer is not sent yet.
    busy: AtomicU64,
}

/// One request in the proxy's hands, counted in [`ProxyStats::max_in_flight`].
struct Busy<'a>(&'a ProxyShared);

impl<'a> Busy<'a> {
    fn enter(sh: &'a ProxyShared) -> Busy<'a> {
        let now = sh.busy.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = lock(&sh.stats);
        st.max_in_flight = st.max_in_flight.max(now);
        Busy(sh)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An HTTP/1.1-aware proxy on 127.0.0.1 in front of the receiver: parses each request
/// on a keep-alive connection and lets a policy decide its fate ([`ProxyFault`]).
/// Bodies are streamed, never buffered, so it carries media of any size.
pub struct FaultProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

/// `host:port` of an `http://host:port/` URL.
fn host_port(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

impl FaultProxy {
    pub fn start(target: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let shared = Arc::new(ProxyShared {
            target: std::sync::Mutex::new(host_port(target)),
            policy: std::sync::Mutex::new(Box::new(|_: &ProxyRequest| ProxyFault::Pass)),
            stats: std::sync::Mutex::new(ProxyStats::default()),
            rate: AtomicU64::new(0),
            strip_keys: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            busy: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let sh = sh.clone();
                std::thread::spawn(move || serve_proxied(&sh, client));
            }
        });
        FaultProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the policy deciding each request's fate.
    pub fn set_policy(&self, policy: impl FnMut(&ProxyRequest) -> ProxyFault + Send + 'static) {
        *lock(&self.shared.policy) = Box::new(policy);
    }

    /// Paces request bodies at `bytes_per_sec` (0: as fast as they come).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Forwards requests without their `Idempotency-Key` header: the server behind
    /// then stores a new row for each, like a backend without idempotency (the seed's).
    pub fn strip_idempotency_keys(&self) {
        self.shared.strip_keys.store(true, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ProxyStats {
        lock(&self.shared.stats).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes a socket with a TCP RST instead of a FIN (SO_LINGER 0).
pub fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// An HTTP message head: the raw bytes and the fields the proxy needs.
struct Head {
    raw: Vec<u8>,
    first_line: String,
    content_length: Option<u64>,
    idempotency_key: Option<String>,
    close: bool,
}

/// Reads a message head (up to the blank line); `None` at a clean end of stream.
fn read_head(r: &mut impl std::io::BufRead) -> Option<Head> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        match r.read_until(b'\n', &mut raw) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(_) => return None,
        }
        let line = &raw[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                // A stray blank line between messages.
                raw.clear();
                continue;
            }
            break;
        }
        if raw.len() > 64 * 1024 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let first_line = lines.next().unwrap_or("").to_string();
    let (mut content_length, mut idempotency_key, mut close) = (None, None, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = v.parse().ok(),
            "idempotency-key" => idempotency_key = Some(v.to_string()),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    Some(Head {
        raw,
        first_line,
        content_length,
        idempotency_key,
        close,
    })
}

/// `raw` (a request head) without its `Idempotency-Key` line.
fn without_idempotency_key(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let name = line.split(|&b| b == b':').next().unwrap_or(b"");
        if !name.trim_ascii().eq_ignore_ascii_case(b"idempotency-key") {
            out.extend_from_slice(line);
        }
    }
    out
}

/// The `id` of a `201 {"id": N}` answer (`bytes`: head and body).
fn created_id(bytes: &[u8]) -> Option<i64> {
    let at = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let body = std::str::from_utf8(&bytes[at + 4..]).ok()?;
    match miniserde::json::from_str::<miniserde::json::Value>(body).ok()? {
        miniserde::json::Value::Object(obj) => match obj.get("id")? {
            miniserde::json::Value::Number(miniserde::json::Number::U64(n)) => {
                i64::try_from(*n).ok()
            }
            miniserde::json::Value::Number(miniserde::json::Number::I64(n)) => Some(*n),
            _ => None,
        },
        _ => None,
    }
}

/// Copies `n` bytes from `r` to `w` (or discards them when `w` is `None`), paced at
/// `rate` bytes per second when non-zero. Returns the bytes copied.
fn copy_n(
    r: &mut impl Read,
    mut w: Option<&mut TcpStream>,
    n: u64,
    rate: u64,
    stop: &AtomicBool,
) -> Result<u64, u64> {
    let began = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < n {
        if stop.load(Ordering::Relaxed) {
            return Err(done);
        }
        let want = (n - done).min(buf.len() as u64) as usize;
        let got = match r.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return Err(done),
            Ok(k) => k,
        };
        if let Some(w) = w.as_deref_mut() {
            if w.write_all(&buf[..got]).is_err() {
                return Err(done);
            }
        }
        done += got as u64;
        if rate > 0 {
            // Pacing, not synchronisation: keep the average rate at `rate`.
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    Ok(done)
}

/// Reads a whole answer from the server to a `method` request (head and body; answers
/// are small): its bytes, its status and whether the server closes the connection after
/// it.
fn read_answer(r: &mut impl std::io::BufRead, method: &str) -> Option<(Vec<u8>, u16, bool)> {
    let head = read_head(r)?;
    let status: u16 = head
        .first_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut bytes = head.raw;
    let bodyless = status < 200 || status == 204 || status == 304 || method == "HEAD";
    match head.content_length {
        _ if bodyless => {}
        Some(n) => {
            let mut body = vec![0u8; n as usize];
            r.read_exact(&mut body).ok()?;
            bytes.extend_from_slice(&body);
        }
        None => {
            let _ = r.read_to_end(&mut bytes);
            return Some((bytes, status, true));
        }
    }
    Some((bytes, status, head.close))
}

/// Drains the request's body and answers `code` with `extra` header lines and `body`,
/// without forwarding; `false` when the agent's connection is gone.
fn answer_here(
    from_client: &mut impl Read,
    client: &mut TcpStream,
    len: u64,
    (code, extra, body): (u16, &str, &str),
    stop: &AtomicBool,
) -> bool {
    if copy_n(from_client, None, len, 0, stop).is_err() {
        return false;
    }
    let answer = format!(
        "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    client.write_all(answer.as_bytes()).is_ok()
}

fn injected(code: u16) -> String {
    format!("{{\"detail\": \"injected {code}\"}}")
}

fn serve_proxied(sh: &ProxyShared, client: TcpStream) {
    // Head and body go in separate writes: without NODELAY, Nagle's algorithm and the
    // peer's delayed ACK would add 40 ms to every request.
    let _ = client.set_nodelay(true);
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut from_client = std::io::BufReader::new(read_half);
    let mut client = client;
    let mut upstream: Option<(TcpStream, std::io::BufReader<TcpStream>)> = None;
    while let Some(head) = read_head(&mut from_client) {
        let _busy = Busy::enter(sh);
        let mut parts = head.first_line.split_whitespace();
        let req = ProxyRequest {
            seq: sh.seq.fetch_add(1, Ordering::SeqCst),
            method: parts.next().unwrap_or("").to_string(),
            path: parts.next().unwrap_or("").to_string(),
            idempotency_key: head.idempotency_key.clone(),
            content_length: head.content_length.unwrap_or(0),
        };
        let fault = (lock(&sh.policy))(&req);
        {
            let mut st = lock(&sh.stats);
            st.requests += 1;
            if req.method == "POST" && req.path.contains("/api/") {
                st.pushes += 1;
            }
            if fault != ProxyFault::Pass {
                st.faults += 1;
            }
            if matches!(
                fault,
                ProxyFault::LoseAnswer | ProxyFault::DelayAnswer(_) | ProxyFault::HalfAnswer
            ) {
                st.answers_lost += 1;
            }
            if let Some(k) = &req.idempotency_key {
                let n = st.keys.entry(k.clone()).or_insert(0);
                *n += 1;
                if *n > 1 {
                    st.resent += 1;
                }
            }
        }
        let len = req.content_length;
        let rate = sh.rate.load(Ordering::Relaxed);
        match fault {
            ProxyFault::Refuse => {
                reset(&client);
                return;
            }
            ProxyFault::NeverAnswer => {
                // Swallow whatever comes until the agent gives up and closes.
                let _ = std::io::copy(&mut from_client, &mut std::io::sink());
                return;
            }
            ProxyFault::Status(code, retry_after) => {
                let extra = retry_after.map_or(String::new(), |r| format!("Retry-After: {r}\r\n"));
                let body = injected(code);
                let answer = (code, extra.as_str(), body.as_str());
                if !answer_here(&mut from_client, &mut client, len, answer, &sh.stopping) {
                    return;
                }
                continue;
            }
            ProxyFault::Redirect(to) => {
                let extra = format!("Location: {to}\r\n");
                let body = injected(301);
                let answer = (301, extra.as_str(), body.as_str());
                if !answer_here(&mut from_client, &mut client, len, answer, &sh.stopping) {
                    return;
                }
                continue;
            }
            ProxyFault::Body(body) => {
                let answer = (200, "", body.as_str());
                if !answer_here(&mut from_client, &mut client, len, answer, &sh.stopping) {
                    return;
                }
                continue;
            }
            _ => {}
        }
        if upstream.is_none() {
            let target = lock(&sh.target).clone();
            let Ok(s) = TcpStream::connect(&target) else {
                reset(&client);
                return;
            };
            let _ = s.set_nodelay(true);
            let Ok(r) = s.try_clone() else { return };
            upstream = Some((s, std::io::BufReader::new(r)));
        }
        let Some((to_server, from_server)) = upstream.as_mut() else {
            return;
        };
        let strip = sh.strip_keys.load(Ordering::Relaxed);
        let raw = if strip {
            without_idempotency_key(&head.raw)
        } else {
            head.raw
        };
        if to_server.write_all(&raw).is_err() {
            reset(&client);
            return;
        }
        if fault == ProxyFault::ResetMidBody {
            let _ = copy_n(
                &mut from_client,
                Some(to_server),
                len / 2,
                rate,
                &sh.stopping,
            );
            reset(to_server);
            reset(&client);
            return;
        }
        let damaged = fault == ProxyFault::FlipByte && len > 0;
        let forwarded = if damaged {
            let half = len / 2;
            let mut byte = [0u8];
            copy_n(&mut from_client, Some(to_server), half, rate, &sh.stopping)
                .and_then(|_| from_client.read_exact(&mut byte).map_err(|_| half))
                .and_then(|()| to_server.write_all(&[byte[0] ^ 0xff]).map_err(|_| half))
                .and_then(|()| {
                    copy_n(
                        &mut from_client,
                        Some(to_server),
                        len - half - 1,
                        rate,
                        &sh.stopping,
                    )
                })
        } else {
            copy_n(&mut from_client, Some(to_server), len, rate, &sh.stopping)
        };
        if forwarded.is_err() {
            // The agent gave up mid-body: the server must not take half a row for a row.
            reset(to_server);
            return;
        }
        let Some((answer, status, server_closes)) = read_answer(from_server, &req.method) else {
            reset(&client);
            return;
        };
        if status == 201 {
            let mut st = lock(&sh.stats);
            st.created += 1;
            if let (true, Some(key), Some(id)) = (strip, &req.idempotency_key, created_id(&answer))
            {
                st.stripped_keys.insert(id, key.clone());
            }
        }
        let sent = match fault {
            ProxyFault::LoseAnswer => {
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            ProxyFault::DelayAnswer(d) => {
                // The fault itself: hold the answer past the agent's timeout.
                std::thread::sleep(d);
                client.write_all(&answer)
            }
            ProxyFault::HalfAnswer => {
                let _ = client.write_all(&answer[..answer.len() / 2]);
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
            ProxyFault::HtmlCreated => {
                let body = "<html><body>Created</body></html>";
                client.write_all(
                    format!(
                        "HTTP/1.1 201 Created\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
            }
            _ => client.write_all(&answer),
        };
        if sent.is_err() || server_closes || head.close {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    }
}

// ---------------------------------------------------------------- the backend

/// relais-server in-process on its embedded store in a directory, behind a
/// [`FaultProxy`]: the backend the tests push to and pull from ([`Receiver::url`] is
/// the proxy's). Faults queued with [`Receiver::push_fault`] meet the next `POST
/// /api/...` requests, those queued with [`Receiver::push_config_fault`] the next `GET
/// /config/...` requests, one each, in order. Configurations are the server's own
/// sites and devices, set through its admin API ([`Receiver::set_config`]).
pub struct Receiver {
    // Declared first, dropped first: no request reaches a stopped server.
    proxy: FaultProxy,
    server: EmbeddedServer,
    /// relais-server's batch endpoint is announced ([`Receiver::offer_batches`]).
    offer: Arc<AtomicBool>,
    /// Its resumable uploads are announced ([`Receiver::offer_uploads`]).
    offer_uploads: Arc<AtomicBool>,
    faults: Arc<std::sync::Mutex<VecDeque<ProxyFault>>>,
    /// Faults for the next `PATCH` requests (an upload's chunks), one each.
    patch_faults: Arc<std::sync::Mutex<VecDeque<ProxyFault>>>,
    config_faults: Arc<std::sync::Mutex<VecDeque<ConfigFault>>>,
    admin: SiteAdmin,
    /// The site id of each token set so far.
    sites: std::sync::Mutex<HashMap<String, i64>>,
    /// Heartbeats answered 404, as the seed's backend does ([`Receiver::refuse_heartbeats`]).
    refuse_heartbeats: Arc<AtomicBool>,
    /// Heartbeat POSTs that reached the proxy.
    heartbeat_posts: Arc<AtomicU64>,
}

/// A misbehaving configuration endpoint: what the proxy does with one `GET /config/...`
/// instead of forwarding it as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFault {
    /// Answer this status with `{"detail": "injected <code>"}`.
    Status(u16),
    /// Answer 200 with this body instead of the server's.
    Body(String),
    /// Hold the server's answer this long.
    Delay(Duration),
}

impl ConfigFault {
    fn proxied(self) -> ProxyFault {
        match self {
            ConfigFault::Status(code) => ProxyFault::Status(code, None),
            ConfigFault::Body(body) => ProxyFault::Body(body),
            ConfigFault::Delay(d) => ProxyFault::DelayAnswer(d),
        }
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Uploads the agent sent (`POST /api/...`: rows or batches), whatever their outcome.
    pub requests: u64,
    /// Rows stored.
    pub stored: u64,
    /// Requests answered with an already stored row's id.
    pub replays: u64,
    /// Most requests in the proxy's hands at one time.
    pub max_in_flight: u64,
}

impl Receiver {
    /// Serves the store and media under `dir`, honouring `Idempotency-Key`.
    pub fn start(dir: &Path) -> Receiver {
        Receiver::start_with(dir, true)
    }

    /// Without `idempotency`, a backend without idempotency (the seed's): the proxy
    /// strips `Idempotency-Key`, so relais-server stores every request as a new row.
    /// [`Receiver::rows`] still shows the key each row was sent with.
    pub fn start_with(dir: &Path, idempotency: bool) -> Receiver {
        let server = EmbeddedServer::start(dir).expect("relais-server starts");
        let proxy = FaultProxy::start(&server.url());
        let faults = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let config_faults = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let (queue, config_queue) = (Arc::clone(&faults), Arc::clone(&config_faults));
        let offer = Arc::new(AtomicBool::new(false));
        let offered = Arc::clone(&offer);
        let offer_uploads = Arc::new(AtomicBool::new(false));
        let uploads_offered = Arc::clone(&offer_uploads);
        let patch_faults = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let patch_queue = Arc::clone(&patch_faults);
        let refuse_heartbeats = Arc::new(AtomicBool::new(false));
        let heartbeat_posts = Arc::new(AtomicU64::new(0));
        let (refused, posts) = (Arc::clone(&refuse_heartbeats), Arc::clone(&heartbeat_posts));
        let [batch_only, uploads_only] = ["uploads", "batch"].map(|hidden| {
            let mut doc = capability_document(&server.url());
            doc.remove(hidden);
            ProxyFault::Body(miniserde::json::to_string(&doc))
        });
        proxy.set_policy(move |req| {
            let fault = match req.method.as_str() {
                // The contract's backend (the seed's) has neither batches nor uploads.
                "GET" if req.path.ends_with(relais::batch::CAPABILITIES_PATH) => {
                    match (
                        offered.load(Ordering::Relaxed),
                        uploads_offered.load(Ordering::Relaxed),
                    ) {
                        (false, false) => Some(ProxyFault::Status(404, None)),
                        (true, false) => Some(batch_only.clone()),
                        (false, true) => Some(uploads_only.clone()),
                        (true, true) => None,
                    }
                }
                // Not a push: the push faults a test queues are for its rows.
                "POST" if req.path.ends_with(relais_wire::heartbeat::HEARTBEAT_PATH) => {
                    posts.fetch_add(1, Ordering::Relaxed);
                    refused
                        .load(Ordering::Relaxed)
                        .then_some(ProxyFault::Status(404, None))
                }
                "POST" if req.path.starts_with("/api/") => lock(&queue).pop_front(),
                "PATCH" => lock(&patch_queue).pop_front(),
                "GET" if req.path.starts_with("/config/") => {
                    lock(&config_queue).pop_front().map(ConfigFault::proxied)
                }
                _ => None,
            };
            fault.unwrap_or(ProxyFault::Pass)
        });
        if !idempotency {
            proxy.strip_idempotency_keys();
        }
        Receiver {
            admin: SiteAdmin::new(&server.url()),
            proxy,
            server,
            offer,
            offer_uploads,
            faults,
            patch_faults,
            config_faults,
            sites: Default::default(),
            refuse_heartbeats,
            heartbeat_posts,
        }
    }

    pub fn url(&self) -> String {
        self.proxy.url()
    }

    /// Announces relais-server's batch endpoint (`GET /api/capabilities`), hidden
    /// otherwise: the receiver is the contract's per-row backend unless asked.
    pub fn offer_batches(&self) {
        self.offer.store(true, Ordering::Relaxed);
    }

    /// Announces relais-server's resumable uploads, hidden otherwise: media go as JSON
    /// with base64 unless asked.
    pub fn offer_uploads(&self) {
        self.offer_uploads.store(true, Ordering::Relaxed);
    }

    /// Queues a fault for a future `PATCH` (an upload's chunk).
    pub fn patch_fault(&self, fault: ProxyFault) {
        lock(&self.patch_faults).push_back(fault);
    }

    /// Removes every upload the server holds, as its expiry would: `HEAD` and `PATCH`
    /// answer 404 for them from now on.
    pub fn expire_uploads(&self) -> usize {
        let store = Connection::open(self.server.store_path()).expect("open the store");
        store
            .busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        store
            .execute("DELETE FROM uploads", [])
            .expect("remove the uploads")
    }

    /// Uploads the server holds (not completed or expired).
    pub fn uploads(&self) -> i64 {
        let store = Connection::open(self.server.store_path()).expect("open the store");
        store
            .query_row("SELECT count(*) FROM uploads", [], |r| r.get(0))
            .expect("count the uploads")
    }

    /// Queues a fault for a future `POST /api/...`.
    /// Answers heartbeats 404 from now on, as a backend without the endpoint does.
    pub fn refuse_heartbeats(&self) {
        self.refuse_heartbeats.store(true, Ordering::Relaxed);
    }

    /// Heartbeat POSTs sent so far, answered or refused.
    pub fn heartbeat_posts(&self) -> u64 {
        self.heartbeat_posts.load(Ordering::Relaxed)
    }

    /// The latest heartbeat the server keeps for `device`, as its JSON text.
    pub fn heartbeat(&self, device: &str) -> Option<String> {
        let store = Connection::open(self.server.store_path()).expect("open the store");
        store
            .query_row(
                "SELECT json FROM heartbeats_latest WHERE device_id = ?1",
                [device],
                |r| r.get(0),
            )
            .ok()
    }

    pub fn push_fault(&self, fault: ProxyFault) {
        lock(&self.faults).push_back(fault);
    }

    /// Every stored row, ordered by id.
    pub fn rows(&self) -> Vec<ReceivedRow> {
        let mut rows = relais::received::rows(&self.server).expect("read the received rows");
        let stripped = self.proxy.stats().stripped_keys;
        for row in rows.iter_mut().filter(|r| r.idempotency_key.is_none()) {
            row.idempotency_key = stripped.get(&row.id).cloned();
        }
        rows
    }

    pub fn stats(&self) -> ReceiverStats {
        let proxy = self.proxy.stats();
        let stored = relais::received::stored(&self.server).expect("count the received rows");
        ReceiverStats {
            requests: proxy.pushes,
            stored,
            // The server answers 201 to a new row and to a replay alike.
            replays: proxy.created.saturating_sub(stored),
            max_in_flight: proxy.max_in_flight,
        }
    }

    /// Makes `json_text`, a configuration as the contract serves it (section 3), the
    /// server's configuration of site `token`: the site is created with that token the
    /// first time, its members updated and its devices replaced afterwards (members a
    /// later configuration leaves out keep their values). Returns the hash the server
    /// serves now. Anything else a test wants served goes through [`ConfigFault::Body`].
    pub fn set_config(&self, token: &str, json_text: &str) -> Result<String, String> {
        let (mut site, devices) = admin_bodies(json_text)?;
        let mut sites = lock(&self.sites);
        let site_id = match sites.get(token) {
            Some(&id) => {
                self.admin
                    .update_site(id, &miniserde::json::to_string(&site))?;
                self.admin.remove_devices(id)?;
                id
            }
            None => {
                site.insert("token".into(), Json::String(token.into()));
                let id = self.admin.create_site(&miniserde::json::to_string(&site))?;
                sites.insert(token.into(), id);
                id
            }
        };
        for mut device in devices {
            let id = Json::Number(Number::I64(site_id));
            device.insert("site_id".into(), id);
            self.admin
                .add_device(&miniserde::json::to_string(&device))?;
        }
        self.admin.served_hash(token)
    }

    /// Queues a fault for a future `GET /config/...`.
    pub fn push_config_fault(&self, fault: ConfigFault) {
        lock(&self.config_faults).push_back(fault);
    }

    /// Stops the server and starts another on the same store and media directory (a
    /// server restart; its port changes, the proxy's does not).
    pub fn restart(&mut self, dir: &Path) {
        let old = std::mem::replace(
            &mut self.server,
            EmbeddedServer::start(dir).expect("relais-server starts again"),
        );
        // The new one listens before the old one stops, as in a rolling restart of a
        // fleet on one store: from now on the proxy connects to the new one only.
        *lock(&self.proxy.shared.target) = host_port(&self.server.url());
        old.shutdown().expect("the old server stops");
        self.admin = SiteAdmin::new(&self.server.url());
    }

    /// Stops the proxy and the server (as dropping does).
    pub fn shutdown(self) {}
}

/// The server's own capability document, asked directly (not through the proxy).
fn capability_document(server: &str) -> Object {
    let url = format!("{server}{}", relais::batch::CAPABILITIES_PATH);
    let text = ureq::get(&url)
        .call()
        .expect("GET the capability document")
        .body_mut()
        .read_to_string()
        .expect("read the capability document");
    match miniserde::json::from_str::<Json>(&text) {
        Ok(Json::Object(doc)) => doc,
        _ => panic!("not a capability document: {text}"),
    }
}

/// The admin API's bodies for a configuration as the contract serves it: the site's
/// (`site_name` as `name`, the intervals of `reporting` as its own members) and each
/// device's (its `snmp` and `pjlink` in `driver_config`). `config_hash` is dropped: the
/// server computes its own. The server judges every other member (422).
fn admin_bodies(json_text: &str) -> Result<(Object, Vec<Object>), String> {
    let not_seed = |why: &str| {
        format!(
            "set_config: {why}: not a configuration the admin API can hold (serve it with ConfigFault::Body)"
        )
    };
    let Ok(Json::Object(mut config)) = miniserde::json::from_str::<Json>(json_text) else {
        return Err(not_seed("not a JSON object"));
    };
    config.remove(relais::config_hash::HASH_MEMBER);
    let Some(Json::Array(devices)) = config.remove("devices") else {
        return Err(not_seed("devices is missing or not an array"));
    };
    let mut site = Object::new();
    for (key, value) in config {
        match (key.as_str(), value) {
            ("site_name", name) => {
                site.insert("name".into(), name);
            }
            ("reporting", Json::Object(intervals)) => site.extend(intervals),
            (_, value) => {
                site.insert(key, value);
            }
        }
    }
    let devices = devices.into_iter().map(|device| {
        let Json::Object(mut device) = device else {
            return Err(not_seed("a device is not an object"));
        };
        let mut driver_config = Object::new();
        for member in ["snmp", "pjlink"] {
            if let Some(value) = device.remove(member) {
                driver_config.insert(member.into(), value);
            }
        }
        if !driver_config.is_empty() {
            device.insert("driver_config".into(), Json::Object(driver_config));
        }
        Ok(device)
    });
    Ok((site, devices.collect::<Result<_, _>>()?))
}

// ---------------------------------------------------------------- the application

/// The application writing to its database while the agent runs: one insert every
/// `pace`, with its own connection and busy timeout, counting failures.
pub struct AppWriter {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    handle: Option<JoinHandle<Vec<String>>>,
}

impl AppWriter {
    /// Inserts an event every `pace`; every `media_every`-th insert (when set) is a
    /// media row of `media_bytes` instead.
    pub fn start(
        db: &Path,
        pace: Duration,
        busy: Duration,
        media_every: Option<(u64, u64)>,
    ) -> AppWriter {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let conn = Connection::open(db).expect("open app db");
        conn.busy_timeout(busy).expect("busy timeout");
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let result = match media_every {
                    Some((every, bytes)) if n % every == 0 => {
                        relais::demo::insert_media(&conn, Some(bytes)).map(|_| ())
                    }
                    _ => conn
                        .execute(
                            "INSERT INTO evenement (date, id_capteur) VALUES (strftime('%Y-%m-%dT%H:%M:%f', 'now'), 1)",
                            [],
                        )
                        .map(|_| ()),
                };
                match result {
                    Ok(()) => o.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if errors.len() < 20 {
                            errors.push(e.to_string());
                        }
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                // The application's pace, not synchronisation.
                std::thread::sleep(pace);
            }
            errors
        });
        AppWriter {
            stop,
            ok,
            failed,
            handle: Some(handle),
        }
    }

    /// Stops the writer; returns (inserts, failures, the first error messages).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .handle
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

impl Drop for AppWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------- processes

/// CPU time (user + system) a live process has used, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Sends SIGKILL to a child and reaps it: a power cut, as far as the process can tell.
pub fn power_cut(agent: &mut Agent) {
    let _ = agent.0.kill();
    let _ = agent.0.wait();
}

/// `PRAGMA integrity_check` of a database file: "ok" or the problems found.
pub fn integrity(path: &Path) -> String {
    match Connection::open(path).and_then(|c| {
        c.busy_timeout(Duration::from_secs(5))?;
        c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
    }) {
        Ok(s) => s,
        Err(e) => e.to_string(),
    }
}

/// A small xorshift generator: reproducible fault schedules from a printed seed.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `TORTURE_SEED` when set, else from the clock; prints the seed.
    pub fn from_env(tag: &str) -> Rng {
        let seed = std::env::var("TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{tag}: TORTURE_SEED={seed}");
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}
