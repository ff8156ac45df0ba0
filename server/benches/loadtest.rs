//! The load benchmark (issue 13, "Load, measured"; README, "Load benchmark"): N devices,
//! each a thread with its own keep-alive connection and its own device token, push rows
//! with the contract's per-row API (`POST /api/evenements`, one push in 100 a 64 KiB
//! media to `/api/media`) to one relais-server on loopback for a fixed time, on the
//! SQLite store and on PostgreSQL. In the same invocation pgbench runs the same
//! single-row insert at the same concurrency against the same PostgreSQL cluster, so
//! the ratio relais/pgbench means the same on any machine.
//!
//! Run: `cargo bench -p relais-server --bench loadtest [-- --devices 1,16,500
//! --seconds 10 --store sqlite|postgres|both --quick]`.
//!
//! How it measures:
//! - One throwaway PostgreSQL cluster (server/tests/common/pg.rs) with durability as
//!   deployed: `fsync`, `synchronous_commit` and `full_page_writes` on (read back with
//!   SHOW and printed), so a 201 means the row is on disk, as it means on SQLite
//!   (WAL, `synchronous=FULL`). Its data, and the SQLite stores, are in the temporary
//!   directory, which must be a real disk (tmpfs would make every fsync free).
//! - Each run gets a fresh store (SQLite file or new database), media directory and
//!   server process (the real binary, authentication on, logging at its default `info`
//!   to a file as journald would take it), so each run's peak RSS (VmHWM) is its own.
//! - Every request's latency is recorded; rows/s counts the 201s over the wall time
//!   from the start barrier to the last thread's end.
//! - Checks, exit 1 when one fails: no (device, key) stored twice, every 201's row in
//!   the store under the id it answered, and a replay of a sample of acknowledged rows
//!   answers the same id.

// The tests' helpers: their throwaway PostgreSQL cluster and their incompressible bytes.
#[path = "../tests/common/mod.rs"]
mod common;

use common::{StoreAt, pg};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use base64::Engine as _;
use relais_server::tokens;

type Res<T> = Result<T, String>;

const SERVER: &str = env!("CARGO_BIN_EXE_relais-server");
/// relais-server through PostgreSQL at 500 devices holds its pool's 16 connections;
/// pgbench at 500 clients holds 500; a few more for the checks.
const PG_SETTINGS: &str = "\nmax_connections = 600\nfsync = on\nsynchronous_commit = on\n\
                           full_page_writes = on\n";
const PG_SHOWN: &[&str] = &[
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "max_connections",
];
/// One push in this many is a media.
const MEDIA_EVERY: u64 = 100;
/// Over the server's 64 KiB inline limit once in base64, so it goes to a file as a
/// camera's clip does.
const MEDIA_BYTES: usize = 64 * 1024;
/// Acknowledged rows pushed again at the end of each run.
const REPLAY_SAMPLE: usize = 200;
/// The relais/pgbench ratio issue 13 asks of PostgreSQL.
const TARGET: f64 = 0.60;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

const SQLITE_TOKEN: &str = "INSERT INTO tokens (kind, device_id, note, sha256, created_at)
     VALUES ('device', ?1, 'loadtest', ?2, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))";
const POSTGRES_TOKEN: &str = "INSERT INTO tokens (kind, device_id, note, sha256)
     VALUES ('device', $1, 'loadtest', $2)";
const STORED_ROWS: &str = "SELECT device_id, idempotency_key, id FROM received";
/// pgbench's transaction: relais-server's own insert (store/postgres.rs, INSERT) of an
/// event row, its key unique per transaction. `{body}` and `{sha}` are filled in.
/// (`':' || 'evenements'`: pgbench would take `:evenements` for a variable.)
const PGBENCH_SCRIPT: &str = "\\set k random(1, 9000000000000000000)
INSERT INTO received (device_id, endpoint, idempotency_key, local_id, body, body_sha256) \
VALUES ('pgbench-' || :client_id::text, '/api/evenements', \
'pgbench-' || :client_id::text || ':' || 'evenements' || ':' || :k::text, :k::text, \
'{body}'::text::json, '{sha}') \
ON CONFLICT (device_id, idempotency_key) DO NOTHING RETURNING id;
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sqlite => "sqlite",
            Kind::Postgres => "postgres",
        }
    }
}

struct Options {
    devices: Vec<usize>,
    seconds: u64,
    stores: Vec<Kind>,
}

const USAGE: &str = "usage: cargo bench -p relais-server --bench loadtest -- \
                     [--devices 1,16,500] [--seconds 10] [--store sqlite|postgres|both] [--quick]";

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Res<Options> {
        let (mut devices, mut seconds, mut stores, mut quick) = (None, None, None, false);
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or(format!("{arg}: needs a value\n{USAGE}"));
            match arg.as_str() {
                // What cargo bench passes to a harness-less benchmark.
                "--bench" => {}
                "--quick" => quick = true,
                "--devices" => devices = Some(parse_devices(&value()?)?),
                "--seconds" => seconds = Some(positive("--seconds", &value()?)? as u64),
                "--store" => {
                    stores = Some(match value()?.as_str() {
                        "sqlite" => vec![Kind::Sqlite],
                        "postgres" => vec![Kind::Postgres],
                        "both" => vec![Kind::Sqlite, Kind::Postgres],
                        other => return Err(format!("--store: {other:?}\n{USAGE}")),
                    })
                }
                "--help" | "-h" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        let (default_devices, default_seconds) = if quick {
            (vec![1, 16], 2)
        } else {
            (vec![1, 16, 500], 10)
        };
        let mut devices = devices.unwrap_or(default_devices);
        // The memory line compares 50 and 500 devices.
        if devices.contains(&500) && !devices.contains(&50) {
            devices.push(50);
            devices.sort_unstable();
        }
        Ok(Options {
            devices,
            seconds: seconds.unwrap_or(default_seconds),
            stores: stores.unwrap_or(vec![Kind::Sqlite, Kind::Postgres]),
        })
    }
}

fn parse_devices(list: &str) -> Res<Vec<usize>> {
    list.split(',').map(|n| positive("--devices", n)).collect()
}

fn positive(flag: &str, text: &str) -> Res<usize> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or(format!("{flag}: {text:?} is not a positive number"))
}

fn main() -> ExitCode {
    match Options::parse(std::env::args().skip(1)).and_then(|o| bench(&o)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything and prints the summary; `Ok(false)` when a check failed.
fn bench(options: &Options) -> Res<bool> {
    let most = options.devices.iter().copied().max().unwrap_or(1);
    raise_open_files(most as u64 * 2 + 256)?;
    let cluster = pg::Cluster::start_with(PG_SETTINGS)
        .ok_or("PostgreSQL is needed for pgbench (and the postgres store)")?;
    let scratch = std::env::temp_dir().join(format!("relais-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    println!("{}", describe_setup(&cluster)?);
    let mut rows = Vec::new();
    for &devices in &options.devices {
        let pgbench = pgbench(&cluster, devices, options.seconds, &scratch)?;
        println!("pgbench  devices={devices:<4} {pgbench}");
        for &kind in &options.stores {
            let run = run_relais(kind, devices, options.seconds, &cluster, &scratch)?;
            println!("{:<8} devices={devices:<4} {run}", kind.name());
            rows.push((kind, devices, run, pgbench.rows_per_s));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!("\n{}", summary(&rows, options.seconds));
    println!("{}", memory_line(&rows));
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|(kind, devices, run, _)| {
            run.failure()
                .map(|f| format!("{} at {devices} devices: {f}", kind.name()))
        })
        .collect();
    for f in &failed {
        println!("FAILED: {f}");
    }
    Ok(failed.is_empty())
}

/// 500 client sockets here, 500 in the server (which inherits this limit).
fn raise_open_files(needed: u64) -> Res<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        if limit.rlim_cur >= needed {
            return Ok(());
        }
        if limit.rlim_max < needed {
            return Err(format!(
                "open files: {needed} needed, the hard limit is {} (raise it: ulimit -Hn)",
                limit.rlim_max
            ));
        }
        limit.rlim_cur = needed;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The machine, PostgreSQL's durability settings as the server reports them, and
/// SQLite's.
fn describe_setup(cluster: &pg::Cluster) -> Res<String> {
    let mut client = cluster.client("postgres");
    let mut line = String::from("PostgreSQL:");
    for name in PG_SHOWN {
        let row = client
            .query_one(&format!("SHOW {name}"), &[])
            .map_err(|e| format!("SHOW {name}: {e}"))?;
        let value: String = row.get(0);
        let _ = write!(line, " {name}={value}");
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(format!(
        "{line}\nSQLite: journal_mode=WAL synchronous=FULL (server/src/store/sqlite.rs)\n\
         machine: {cores} cores; data in {}",
        std::env::temp_dir().display()
    ))
}

/// What the bench does to a store, beside the server: migrate it, give the devices their
/// tokens, read back what was stored.
trait BenchStore {
    fn migrate(&self) -> Res<()>;
    fn add_tokens(&self, fleet: &Fleet) -> Res<()>;
    fn stored(&self) -> Res<Vec<(String, String, i64)>>;
}

impl BenchStore for StoreAt {
    /// `relais-server migrate`.
    fn migrate(&self) -> Res<()> {
        let out = Command::new(SERVER)
            .arg("migrate")
            .env("DATABASE_URL", self.url())
            .env("RUST_LOG", "warn")
            .output()
            .map_err(|e| format!("relais-server migrate: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "relais-server migrate: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Gives each device its token. Straight into `tokens` (the SHA-256 the server looks
    /// tokens up by, tokens.rs's), not through `relais-server token add`: 500 processes
    /// would take longer than the run.
    fn add_tokens(&self, fleet: &Fleet) -> Res<()> {
        let pairs = fleet
            .devices
            .iter()
            .zip(&fleet.tokens)
            .map(|(d, t)| (d.as_str(), tokens::sha256_hex(t)));
        match self {
            StoreAt::Sqlite(path) => {
                let fail = |e: rusqlite::Error| format!("tokens: {e}");
                let mut db = rusqlite::Connection::open(path).map_err(fail)?;
                let tx = db.transaction().map_err(fail)?;
                for (device, sha) in pairs {
                    tx.execute(SQLITE_TOKEN, (device, &sha)).map_err(fail)?;
                }
                tx.commit().map_err(fail)
            }
            StoreAt::Postgres(url) => {
                let fail = |e: postgres::Error| format!("tokens: {e}");
                let mut db = postgres::Client::connect(url, postgres::NoTls).map_err(fail)?;
                let mut tx = db.transaction().map_err(fail)?;
                for (device, sha) in pairs {
                    tx.execute(POSTGRES_TOKEN, &[&device, &sha]).map_err(fail)?;
                }
                tx.commit().map_err(fail)
            }
        }
    }

    /// Every stored (device_id, idempotency_key, id).
    fn stored(&self) -> Res<Vec<(String, String, i64)>> {
        match self {
            StoreAt::Sqlite(path) => {
                let fail = |e: rusqlite::Error| format!("stored rows: {e}");
                let db = rusqlite::Connection::open(path).map_err(fail)?;
                let mut stmt = db.prepare(STORED_ROWS).map_err(fail)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(fail)?;
                rows.collect::<Result<_, _>>().map_err(fail)
            }
            StoreAt::Postgres(url) => {
                let fail = |e: postgres::Error| format!("stored rows: {e}");
                let mut db = postgres::Client::connect(url, postgres::NoTls).map_err(fail)?;
                let rows = db.query(STORED_ROWS, &[]).map_err(fail)?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect())
            }
        }
    }
}

/// The simulated devices: their ids and tokens.
struct Fleet {
    devices: Vec<String>,
    tokens: Vec<String>,
}

impl Fleet {
    fn new(n: usize) -> Res<Fleet> {
        Ok(Fleet {
            devices: (0..n).map(device_id).collect(),
            tokens: (0..n).map(|_| tokens::generate()).collect::<Res<_>>()?,
        })
    }
}

/// Fixed width, so every event (and pgbench's) has the same size.
fn device_id(i: usize) -> String {
    format!("site-paris-loadtest-{i:04}")
}

/// An event as the agent sends it (contract section 2), about 250 bytes.
fn event(device: &str, n: u64) -> String {
    format!(
        r#"{{"date": "2025-12-18T17:30:00.{:06}", "capteur": {{"id": 1, "nom": "Détecteur PIR, entrée principale, Bâtiment A, 1er étage, couloir nord (zone 3)", "type": "pir", "etat": 1}}, "device_id": "{device}", "source": "sync_service"}}"#,
        n % 1_000_000
    )
}

/// Push `n` of a device: its path and Idempotency-Key.
fn path_and_key(device: &str, n: u64) -> (&'static str, String) {
    if n % MEDIA_EVERY == 0 {
        ("/api/media", format!("{device}:media:{n}"))
    } else {
        ("/api/evenements", format!("{device}:evenements:{n}"))
    }
}

/// Push `n` of a device: its path, Idempotency-Key and body.
fn push_of(device: &str, n: u64, media_b64: &str) -> (&'static str, String, String) {
    let (path, key) = path_and_key(device, n);
    let body = if n % MEDIA_EVERY == 0 {
        common::media(device, media_b64)
    } else {
        event(device, n)
    };
    (path, key, body)
}

/// The server under test: the real binary, its log in a file.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn spawn(store: &StoreAt, dir: &Path) -> Res<Server> {
        let log_path = dir.join("server.log");
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = Command::new(SERVER)
            .args(["--listen", "127.0.0.1:0", "--media-dir"])
            .arg(dir.join("media"))
            .env("DATABASE_URL", store.url())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("relais-server: {e}"))?;
        let mut server = Server {
            child,
            url: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text
                .split("listening addr=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
            {
                server.url = format!("http://{addr}");
                return Ok(server);
            }
            let exited = server.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                return Err(format!("relais-server did not start ({exited:?}):\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// VmHWM, in KiB.
    fn peak_rss_kib(&self) -> Res<u64> {
        common::peak_rss_kib(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One device's keep-alive connection: a minimal HTTP/1.1 client, so the load generator
/// takes as little of the machine's cores as pgbench's libpq does (ureq took a sixth of
/// both cores at 16 devices, CPU the server and PostgreSQL then lacked). It speaks only
/// what relais-server answers: a status line, headers, a `Content-Length` body.
struct Conn {
    addr: String,
    stream: Option<BufReader<TcpStream>>,
    request: Vec<u8>,
}

impl Conn {
    fn new(url: &str) -> Conn {
        Conn {
            addr: url.trim_start_matches("http://").to_string(),
            stream: None,
            request: Vec::new(),
        }
    }

    /// POSTs a push; its status and the id answered, or a transport error (the
    /// connection is then opened again for the next push).
    fn post(&mut self, token: &str, path: &str, key: &str, body: &str) -> Res<(u16, Option<i64>)> {
        let answer = self.exchange(token, path, key, body);
        if answer.is_err() {
            self.stream = None;
        }
        answer.map_err(|e| format!("{path}: {e}"))
    }

    fn exchange(
        &mut self,
        token: &str,
        path: &str,
        key: &str,
        body: &str,
    ) -> Res<(u16, Option<i64>)> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr).map_err(|e| format!("connect: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("nodelay: {e}"))?;
            stream
                .set_read_timeout(Some(REQUEST_TIMEOUT))
                .map_err(|e| format!("timeout: {e}"))?;
            self.stream = Some(BufReader::new(stream));
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("no connection".into());
        };
        self.request.clear();
        write!(
            self.request,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Authorization: Bearer {token}\r\nIdempotency-Key: {key}\r\n\
             Content-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .map_err(|e| format!("request: {e}"))?;
        self.request.extend_from_slice(body.as_bytes());
        stream
            .get_mut()
            .write_all(&self.request)
            .map_err(|e| format!("send: {e}"))?;
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .map_err(|e| format!("answer: {e}"))?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("answer: status line {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            stream
                .read_line(&mut line)
                .map_err(|e| format!("answer: {e}"))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.ok_or("answer: no Content-Length")?;
        let mut text = vec![0; length];
        stream
            .read_exact(&mut text)
            .map_err(|e| format!("answer body: {e}"))?;
        // The server's `{"id": N}`.
        let id = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.trim().strip_prefix("{\"id\": "))
            .and_then(|s| s.strip_suffix('}'))
            .and_then(|n| n.trim().parse().ok());
        Ok((status, id))
    }
}

/// A push answered 201 with `id`.
struct Ack {
    device: usize,
    n: u64,
    id: i64,
}

/// What one device thread saw.
#[derive(Default)]
struct DeviceLoad {
    latencies_us: Vec<u32>,
    acks: Vec<Ack>,
    errors: u64,
    first_error: Option<String>,
}

/// Every device pushes as fast as its answers come, from one barrier for `seconds`.
fn drive(url: &str, fleet: &Arc<Fleet>, seconds: u64) -> Res<(Vec<DeviceLoad>, Duration)> {
    let media_b64: Arc<str> = base64::engine::general_purpose::STANDARD
        .encode(media_bytes())
        .into();
    let barrier = Arc::new(Barrier::new(fleet.devices.len() + 1));
    let threads: Vec<_> = (0..fleet.devices.len())
        .map(|i| {
            let (url, fleet, barrier, media_b64) = (
                url.to_string(),
                Arc::clone(fleet),
                Arc::clone(&barrier),
                Arc::clone(&media_b64),
            );
            std::thread::Builder::new()
                .name(fleet.devices[i].clone())
                .spawn(move || device_loop(i, &url, &fleet, &barrier, &media_b64, seconds))
                .map_err(|e| format!("device thread: {e}"))
        })
        .collect::<Res<_>>()?;
    barrier.wait();
    let start = Instant::now();
    let loads = threads
        .into_iter()
        .map(|t| t.join().map_err(|_| "a device thread panicked".to_string()))
        .collect::<Res<_>>()?;
    Ok((loads, start.elapsed()))
}

fn device_loop(
    i: usize,
    url: &str,
    fleet: &Fleet,
    barrier: &Barrier,
    media_b64: &str,
    seconds: u64,
) -> DeviceLoad {
    let (device, token) = (&fleet.devices[i], &fleet.tokens[i]);
    let mut conn = Conn::new(url);
    let mut load = DeviceLoad::default();
    barrier.wait();
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        let (path, key, body) = push_of(device, n, media_b64);
        let sent = Instant::now();
        let answer = conn.post(token, path, &key, &body);
        load.latencies_us
            .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        match answer {
            Ok((201, Some(id))) => load.acks.push(Ack { device: i, n, id }),
            other => {
                load.errors += 1;
                load.first_error.get_or_insert(format!("{key}: {other:?}"));
            }
        }
    }
    load
}

/// A camera clip does not compress either.
fn media_bytes() -> Vec<u8> {
    common::pattern(MEDIA_BYTES, 0x9e37_79b9_7f4a_7c15)
}

/// Pushes a spread sample of acknowledged rows again: how many answered their id.
fn replay(url: &str, fleet: &Fleet, acks: &[&Ack]) -> (usize, usize) {
    let media_b64 = base64::engine::general_purpose::STANDARD.encode(media_bytes());
    let mut conn = Conn::new(url);
    let step = (acks.len() / REPLAY_SAMPLE).max(1);
    let sample: Vec<&&Ack> = acks.iter().step_by(step).take(REPLAY_SAMPLE).collect();
    let same = sample
        .iter()
        .filter(|ack| {
            let device = &fleet.devices[ack.device];
            let (path, key, body) = push_of(device, ack.n, &media_b64);
            matches!(
                conn.post(&fleet.tokens[ack.device], path, &key, &body),
                Ok((201, Some(id))) if id == ack.id
            )
        })
        .count();
    (same, sample.len())
}

/// One relais-server run's figures and checks.
struct Run {
    rows_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    first_error: Option<String>,
    peak_rss_kib: u64,
    duplicates: usize,
    lost: usize,
    replay_same: usize,
    replay_sent: usize,
}

impl Run {
    fn failure(&self) -> Option<String> {
        let mut problems = Vec::new();
        if self.duplicates > 0 {
            problems.push(format!("{} duplicates", self.duplicates));
        }
        if self.lost > 0 {
            problems.push(format!("{} lost rows", self.lost));
        }
        if self.replay_same < self.replay_sent {
            problems.push(format!(
                "{} of {} replays answered another id",
                self.replay_sent - self.replay_same,
                self.replay_sent
            ));
        }
        (!problems.is_empty()).then(|| problems.join(", "))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rows/s={:.0} p50={:.2}ms p99={:.2}ms errors={} peak_rss={:.1}MiB duplicates={} \
             lost={} replays={}/{} same id",
            self.rows_per_s,
            self.p50_ms,
            self.p99_ms,
            self.errors,
            mib(self.peak_rss_kib),
            self.duplicates,
            self.lost,
            self.replay_same,
            self.replay_sent
        )?;
        if let Some(e) = &self.first_error {
            write!(f, " first error: {e}")?;
        }
        Ok(())
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn run_relais(
    kind: Kind,
    devices: usize,
    seconds: u64,
    cluster: &pg::Cluster,
    scratch: &Path,
) -> Res<Run> {
    let dir = scratch.join(format!("{}-{devices}", kind.name()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let store = match kind {
        Kind::Sqlite => StoreAt::Sqlite(dir.join("store.db")),
        Kind::Postgres => StoreAt::Postgres(cluster.create_db()),
    };
    store.migrate()?;
    let fleet = Arc::new(Fleet::new(devices)?);
    store.add_tokens(&fleet)?;
    let server = Server::spawn(&store, &dir)?;
    let (loads, elapsed) = drive(&server.url, &fleet, seconds)?;
    let peak_rss_kib = server.peak_rss_kib()?;
    let acks: Vec<&Ack> = loads.iter().flat_map(|l| &l.acks).collect();
    let (replay_same, replay_sent) = replay(&server.url, &fleet, &acks);
    drop(server);
    let (duplicates, lost) = check_store(&store, &fleet, &acks)?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut latencies: Vec<u32> = loads
        .iter()
        .flat_map(|l| l.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    Ok(Run {
        rows_per_s: acks.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
        errors: loads.iter().map(|l| l.errors).sum(),
        first_error: loads.iter().find_map(|l| l.first_error.clone()),
        peak_rss_kib,
        duplicates,
        lost,
        replay_same,
        replay_sent,
    })
}

/// Rows stored more than once per key, and acknowledged rows missing from the store
/// (or stored under another id than the one answered).
fn check_store(store: &StoreAt, fleet: &Fleet, acks: &[&Ack]) -> Res<(usize, usize)> {
    let mut by_key: HashMap<(String, String), i64> = HashMap::new();
    let mut duplicates = 0;
    for (device, key, id) in store.stored()? {
        if by_key.insert((device, key), id).is_some() {
            duplicates += 1;
        }
    }
    let lost = acks
        .iter()
        .filter(|ack| {
            let device = &fleet.devices[ack.device];
            let (_, key) = path_and_key(device, ack.n);
            by_key.get(&(device.clone(), key)) != Some(&ack.id)
        })
        .count();
    Ok((duplicates, lost))
}

fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 * q).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[i]) / 1000.0
}

/// pgbench's figures at one concurrency.
#[derive(Clone, Copy)]
struct Pgbench {
    rows_per_s: f64,
    latency_ms: f64,
    threads: usize,
    /// Its initial connection time.
    connect_s: f64,
    /// How long it ran with every client connected.
    measured_s: f64,
}

impl std::fmt::Display for Pgbench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rows/s={:.0} latency average={:.2}ms (threads={}, connecting {:.1}s, then \
             {:.1}s measured)",
            self.rows_per_s, self.latency_ms, self.threads, self.connect_s, self.measured_s
        )
    }
}

/// pgbench with relais-server's insert at `clients` connections, into a database that
/// relais-server itself migrated (the same table and indexes).
///
/// pgbench's `-T` counts its connections, and each costs a SCRAM exchange and a backend
/// (about 11 s for 500 on this machine), so it runs for `seconds` plus an allowance for
/// them, once more with a larger one if connecting took longer; its `tps` excludes the
/// connection time.
fn pgbench(cluster: &pg::Cluster, clients: usize, seconds: u64, scratch: &Path) -> Res<Pgbench> {
    let url = cluster.create_db();
    StoreAt::Postgres(url.clone()).migrate()?;
    let body = without_variables(&event(&device_id(0), 0));
    let script = PGBENCH_SCRIPT
        .replace("{body}", &body)
        .replace("{sha}", &tokens::sha256_hex(&body));
    let script_path = scratch.join("pgbench.sql");
    std::fs::write(&script_path, script).map_err(|e| format!("{}: {e}", script_path.display()))?;
    // The password goes in PGPASSWORD, not on a command line.
    let target = url.replacen(&format!(":{}@", cluster.password()), "@", 1);
    let run = |allowance_s: f64| {
        run_pgbench(
            &target,
            cluster.password(),
            &script_path,
            clients,
            seconds as f64 + allowance_s,
        )
    };
    let first = run(1.0 + clients as f64 / 25.0)?;
    if first.measured_s >= seconds as f64 * 0.9 {
        return Ok(first);
    }
    run(1.0 + first.connect_s * 1.5)
}

fn run_pgbench(
    target: &str,
    password: &str,
    script: &Path,
    clients: usize,
    duration_s: f64,
) -> Res<Pgbench> {
    // Its threads are cheap: as many as the machine has cores, 2 to 4, at most one per
    // client.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = cores.clamp(2, 4).min(clients);
    let duration_s = duration_s.ceil();
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-c", &clients.to_string()])
        .args([
            "-j",
            &threads.to_string(),
            "-T",
            &duration_s.to_string(),
            "-f",
        ])
        .arg(script)
        .arg(target)
        .env("PGPASSWORD", password)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("pgbench: {e} (Debian's postgresql-client has it)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figure = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
    };
    let figures = (
        figure("tps = "),
        figure("latency average = "),
        figure("initial connection time = "),
    );
    match (out.status.success(), figures) {
        (true, (Some(rows_per_s), Some(latency_ms), Some(connect_ms))) => Ok(Pgbench {
            rows_per_s,
            latency_ms,
            threads,
            connect_s: connect_ms / 1000.0,
            measured_s: duration_s - connect_ms / 1000.0,
        }),
        // No transaction at all (connecting took the whole duration): no figures.
        (true, _) if text.contains("actually processed: 0") => Ok(Pgbench {
            rows_per_s: 0.0,
            latency_ms: f64::NAN,
            threads,
            connect_s: duration_s,
            measured_s: 0.0,
        }),
        _ => Err(format!(
            "pgbench: {}\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// `text` with each `:` that pgbench would take for a variable (`:name`, even in a
/// string literal: the event's time `17:30:00`) replaced by `.`, the same size.
fn without_variables(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let variable = c == ':'
            && chars
                .peek()
                .is_some_and(|n| n.is_alphanumeric() || *n == '_');
        out.push(if variable { '.' } else { c });
    }
    out
}

/// The markdown table (README, "Load benchmark").
fn summary(rows: &[(Kind, usize, Run, f64)], seconds: u64) -> String {
    let mut out = format!(
        "Per run: {seconds} s, 1 push in {MEDIA_EVERY} a {} KiB media; target relais/pgbench \
         >= {TARGET:.2} on PostgreSQL.\n\n\
         | store | devices | rows/s | p50 ms | p99 ms | errors | peak RSS MiB | duplicates \
         | lost | pgbench rows/s | relais/pgbench | target met |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        MEDIA_BYTES / 1024
    );
    for (kind, devices, run, pgbench) in rows {
        let ratio = run.rows_per_s / pgbench;
        let met = match (kind, ratio >= TARGET) {
            (Kind::Postgres, true) => "yes",
            (Kind::Postgres, false) => "no",
            (Kind::Sqlite, _) => "(information)",
        };
        let _ = writeln!(
            out,
            "| {} | {devices} | {:.0} | {:.2} | {:.2} | {} | {:.1} | {} | {} | {pgbench:.0} | {ratio:.2} | {met} |",
            kind.name(),
            run.rows_per_s,
            run.p50_ms,
            run.p99_ms,
            run.errors,
            mib(run.peak_rss_kib),
            run.duplicates,
            run.lost,
        );
    }
    out
}

/// The server's peak RSS at 50 and at 500 devices, per store.
fn memory_line(rows: &[(Kind, usize, Run, f64)]) -> String {
    let peak = |kind: Kind, devices: usize| {
        rows.iter()
            .find(|(k, d, _, _)| *k == kind && *d == devices)
            .map(|(_, _, run, _)| mib(run.peak_rss_kib))
    };
    let parts: Vec<String> = [Kind::Sqlite, Kind::Postgres]
        .into_iter()
        .filter_map(|kind| match (peak(kind, 50), peak(kind, 500)) {
            (Some(at50), Some(at500)) => Some(format!(
                "{} {at50:.1} MiB at 50 devices, {at500:.1} MiB at 500",
                kind.name()
            )),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        "memory: no runs at both 50 and 500 devices".into()
    } else {
        format!("memory (server peak RSS): {}", parts.join("; "))
    }
}
