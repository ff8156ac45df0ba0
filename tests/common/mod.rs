//! Helpers shared by the push tests: scratch directories, waiting on a condition,
//! running the `relais` binary with a clean environment, a throttling TCP proxy, the
//! peak RSS of a child process and reading the agent's `sync_tracking` table.
#![allow(dead_code)] // Each test file uses a different subset.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::types::Value;

/// The device id `relais::demo::settings_for` uses; children get the same one.
pub const DEVICE: &str = "demo-pi";

// ---------------------------------------------------------------- scratch directories

/// A fresh directory under the temporary directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Unique per process, test (`tag`) and call, so parallel tests never share one.
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relais-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
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
pub fn unix_now() -> i64 {
    relais::clock::unix_now()
}
