//! Test helpers: a real relais-server child process on 127.0.0.1 with its own store and
//! media directory, a real HTTP client, and looks into the store (its SQLite file or its
//! PostgreSQL database, [`pg`]) with the same SQL on both. [`on_both_stores!`] runs each
//! store test once per store.

#![allow(dead_code)]

pub mod browser;
pub mod haproxy;
pub mod pg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which store a test runs on.
#[derive(Clone, Copy)]
pub enum StoreKind {
    Sqlite,
    /// A new database in this cluster for each server.
    Postgres(&'static pg::Cluster),
}

impl StoreKind {
    /// The shared cluster's kind, or `None` when PostgreSQL tests are skipped.
    pub fn postgres() -> Option<StoreKind> {
        pg::shared().map(StoreKind::Postgres)
    }
}

/// Where a server keeps its rows.
#[derive(Debug, Clone)]
pub enum StoreAt {
    Sqlite(PathBuf),
    /// The database's URL, password included.
    Postgres(String),
}

impl StoreAt {
    /// A new store of `kind`: a file in `dir`, or a new database in the cluster.
    fn new(kind: StoreKind, dir: &Path) -> StoreAt {
        match kind {
            StoreKind::Sqlite => StoreAt::Sqlite(dir.join("store.db")),
            StoreKind::Postgres(cluster) => StoreAt::Postgres(cluster.create_db()),
        }
    }

    pub fn url(&self) -> String {
        match self {
            StoreAt::Sqlite(path) => format!("sqlite:{}", path.display()),
            StoreAt::Postgres(url) => url.clone(),
        }
    }
}

/// Defines `sqlite::CASE` and `postgres::CASE` tests for each `fn CASE(StoreKind)`.
#[allow(unused_macros)] // postgres.rs has no case for both stores
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $case() { super::$case($crate::common::StoreKind::Sqlite) } )*
        }
        mod postgres {
            $(
                #[test]
                fn $case() {
                    if let Some(store) = $crate::common::StoreKind::postgres() {
                        super::$case(store)
                    }
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_stores;

pub struct Server {
    child: Child,
    pub url: String,
    pub addr: String,
    pub dir: PathBuf,
    pub store: StoreAt,
    media: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_on(StoreKind::Sqlite, extra)
    }

    /// Starts the binary with `--no-auth` on a new store of `kind` (see
    /// [`Server::start_at`]).
    pub fn start_on(kind: StoreKind, extra: &[&str]) -> Server {
        let dir = scratch("srv");
        let store = StoreAt::new(kind, &dir);
        Server::spawn(dir, store, &[&["--no-auth"], extra].concat(), "info")
    }

    /// Starts the binary with authentication (tokens: [`Server::token`]) on a new store
    /// of `kind`, `extra` flags and `RUST_LOG=rust_log`.
    pub fn start_authenticated(kind: StoreKind, extra: &[&str], rust_log: &str) -> Server {
        let dir = scratch("srv");
        let store = StoreAt::new(kind, &dir);
        Server::spawn(dir, store, extra, rust_log)
    }

    /// Starts the binary with `--no-auth`, a free port, `store` (given in DATABASE_URL,
    /// as a deployment would pass a password) and `extra` flags; waits until it listens.
    pub fn start_at(store: StoreAt, extra: &[&str]) -> Server {
        Server::spawn(
            scratch("srv"),
            store,
            &[&["--no-auth"], extra].concat(),
            "info",
        )
    }

    /// Starts the binary with `--no-auth` as one server of a fleet: on `store` (shared
    /// with the others), listening on `listen` (`127.0.0.1:0` for a free port, a killed
    /// server's `addr` to restart it there), its media in `media` (shared too), with
    /// `extra` flags.
    pub fn start_member(store: StoreAt, listen: &str, media: &Path, extra: &[&str]) -> Server {
        let dir = scratch("srv");
        let args: Vec<&str> = ["--no-auth"].iter().chain(extra).copied().collect();
        Server::spawn_at(dir, store, listen, media, &args, "info")
    }

    fn spawn(dir: PathBuf, store: StoreAt, args: &[&str], rust_log: &str) -> Server {
        let media = dir.join("media");
        Server::spawn_at(dir, store, "127.0.0.1:0", &media, args, rust_log)
    }

    fn spawn_at(
        dir: PathBuf,
        store: StoreAt,
        listen: &str,
        media: &Path,
        args: &[&str],
        rust_log: &str,
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_relais-server"))
            .args(["--listen", listen])
            .env("DATABASE_URL", store.url())
            .arg("--media-dir")
            .arg(media)
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relais-server");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                sink.lock().expect("log").push(line);
            }
        });
        let mut server = Server {
            child,
            url: String::new(),
            addr: String::new(),
            dir,
            store,
            media: media.to_path_buf(),
            log,
        };
        assert!(
            wait_for(Duration::from_secs(20), || server.logged("listening addr=")),
            "relais-server did not start"
        );
        let line = server.log_line("listening addr=").expect("listening line");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("address")
            .to_string();
        server.url = format!("http://{addr}");
        server.addr = addr;
        server
    }

    /// Runs `relais-server args...` on this server's store (in DATABASE_URL) to its end.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_relais-server"))
            .env("DATABASE_URL", self.store.url())
            .args(args)
            .env("RUST_LOG", "info")
            .output()
            .expect("run relais-server")
    }

    /// `token add args...`: the new token.
    pub fn token(&self, args: &[&str]) -> String {
        let out = self.cli(&[&["token", "add"], args].concat());
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    }

    /// Everything the server wrote to stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    pub fn logged(&self, needle: &str) -> bool {
        self.log_line(needle).is_some()
    }

    fn log_line(&self, needle: &str) -> Option<String> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// How many log lines contain `needle`.
    pub fn logged_count(&self, needle: &str) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// The status `/ready` answers.
    pub fn ready_status(&self) -> u16 {
        client()
            .get(format!("{}/ready", self.url))
            .call()
            .expect("ready")
            .status()
            .as_u16()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn media_dir(&self) -> PathBuf {
        self.media.clone()
    }

    /// The SQLite store (for a test about SQLite alone).
    pub fn db(&self) -> rusqlite::Connection {
        let StoreAt::Sqlite(path) = &self.store else {
            panic!("not a SQLite store");
        };
        rusqlite::Connection::open(path).expect("open store")
    }

    /// The rows `sql` returns, every value as text (NULL as `None`): one query, the
    /// same SQL and the same answers on both stores.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        match &self.store {
            StoreAt::Sqlite(_) => sqlite_rows(&self.db(), sql),
            StoreAt::Postgres(url) => postgres_rows(url, sql),
        }
    }

    /// The one row `sql` returns, its values as text.
    pub fn row(&self, sql: &str) -> Vec<String> {
        let rows = self.rows(sql);
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0]
            .iter()
            .map(|v| v.clone().unwrap_or_default())
            .collect()
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.row(sql)[0].parse().expect("a count")
    }

    /// Every file under the media directory, temporary ones included.
    pub fn media_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        collect_files(&self.media_dir(), &mut out);
        out
    }

    /// The child's peak resident set (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.child.id()).expect("VmHWM")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill");
    }

    /// Waits for the child to exit (at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sqlite_rows(db: &rusqlite::Connection, sql: &str) -> Vec<Vec<Option<String>>> {
    use rusqlite::types::ValueRef;
    let mut stmt = db.prepare(sql).expect("prepare");
    let columns = stmt.column_count();
    stmt.query_map([], |r| {
        (0..columns)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    ValueRef::Null => None,
                    ValueRef::Integer(n) => Some(n.to_string()),
                    ValueRef::Real(x) => Some(x.to_string()),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Some(String::from_utf8_lossy(t).into_owned())
                    }
                })
            })
            .collect()
    })
    .and_then(|rows| rows.collect())
    .expect("query")
}

/// A test that cannot run here without `tool` says so in a loud line and is skipped,
/// except under `CI=true`, where that is a failure: CI installs what the tests need.
pub fn skip_without(tool: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true: the {tool} tests cannot be skipped: {reason}");
    }
    eprintln!("\n!!! SKIPPED a {tool} test: {reason} !!!\n");
}

/// The peak resident set (VmHWM) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or(format!("{path}: no VmHWM"))
}

/// The store check's line when the store stops answering, and when it is back.
pub const STORE_DOWN_LINE: &str = "/ready answers 503 until it answers again";
pub const STORE_BACK_LINE: &str = "store: answering again";

/// Starts `cluster` again and waits until `server` answers `/ready` and its store check
/// has said the store is back: the server reconnects by itself.
pub fn resume_until_ready(cluster: &pg::Cluster, server: &Server) {
    cluster.resume();
    assert!(
        wait_for(Duration::from_secs(10), || server.ready_status() == 200),
        "/ready after the restart"
    );
    assert!(
        wait_for(Duration::from_secs(5), || server.logged(STORE_BACK_LINE)),
        "no info line from the server's store check when the store is back"
    );
}

/// A server on a PostgreSQL cluster of its own, checking its store every second: for
/// a test that stops and restarts PostgreSQL (stopping the shared cluster would fail
/// the other tests). `None` when PostgreSQL tests are skipped.
pub fn on_own_cluster() -> Option<(pg::Cluster, Server)> {
    let cluster = pg::Cluster::start()?;
    let server = Server::start_at(
        StoreAt::Postgres(cluster.create_db()),
        &["--store-check-interval-s", "1"],
    );
    Some((cluster, server))
}

pub fn postgres_rows(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    client
        .simple_query(sql)
        .expect("query")
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A client that returns 4xx and 5xx answers instead of errors.
pub fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs `body` to `url` + `path`; returns the status and the answer's body.
pub fn post(
    agent: &ureq::Agent,
    url: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    post_as(agent, url, path, None, key, body)
}

/// [`post`] with `Authorization: Bearer <token>` when `token` is given.
pub fn post_as(
    agent: &ureq::Agent,
    url: &str,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut req = agent
        .post(format!("{url}{path}"))
        .header("Content-Type", "application/json");
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    if let Some(token) = token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    let mut resp = req.send(body).expect("request");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().expect("answer body");
    (status, text)
}

/// Connects to `addr` and sends the head of a POST to `endpoint` announcing a body of
/// `len` bytes: the body is the caller's to send (or cut).
pub fn send_head(addr: &str, endpoint: &str, key: &str, len: usize) -> std::net::TcpStream {
    use std::io::Write as _;
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    let head = format!(
        "POST {endpoint} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Idempotency-Key: {key}\r\nContent-Length: {len}\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn
}

/// GETs `url` + `path`, with a bearer token when given; returns the status, the
/// `WWW-Authenticate` header and the answer's body.
pub fn get_as(
    agent: &ureq::Agent,
    url: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Option<String>, String) {
    let mut req = agent.get(format!("{url}{path}"));
    if let Some(token) = token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    answer(req.call().expect("request"))
}

/// An answer's status, `WWW-Authenticate` header and body.
pub fn answer(mut resp: ureq::http::Response<ureq::Body>) -> (u16, Option<String>, String) {
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.body_mut().read_to_string().expect("answer body");
    (resp.status().as_u16(), challenge, text)
}

/// An event payload as the agent sends it (contract section 2).
pub fn event(device: &str, n: u32) -> String {
    format!(
        r#"{{"date": "2025-12-18T17:30:{n:02}.123456", "capteur": {{"id": 1, "nom": "PIR Entrée", "etat": 1}}, "device_id": "{device}", "source": "sync_service"}}"#
    )
}

/// A media payload carrying `data` in base64.
pub fn media(device: &str, b64: &str) -> String {
    format!(
        r#"{{"date": "2025-12-18T17:30:00.123456", "capteur": {{"id": 4, "nom": "Caméra 1"}}, "numero_camera": 1, "video_data": "{b64}", "device_id": "{device}", "source": "sync_service"}}"#
    )
}

/// Deterministic incompressible bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `text` with each ASCII digit replaced by `d`: the format of a timestamp, say.
pub fn shape(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_digit() { 'd' } else { c })
        .collect()
}

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

pub fn scratch(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("relais-server-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
