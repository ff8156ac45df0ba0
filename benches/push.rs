//! relais against the Python service it replaces (seed 000), side by side, on the costs
//! that matter on a Raspberry Pi: event rate, media throughput and memory, the cost of a
//! pass that finds nothing new, bytes written to the SD card, idle CPU and wake-ups, and
//! the size of the device binary.
//!
//! Run: `cargo bench --bench push` (about 22 minutes; `RELAIS_BENCH_QUICK=1` for a
//! smoke test of about 5 minutes; `RELAIS_BENCH_ONLY=uplink` for figure 8 alone, about
//! 2 minutes; `RELAIS_BENCH_ONLY=lanes` for figures 9 and 10 alone, about 13 minutes;
//! `RELAIS_BENCH_ONLY=resumable` for figure 11 alone, about 20 minutes).
//! See the README section "Benchmark".
//!
//! How it measures:
//! - relais is the device build (`cargo build --release --no-default-features`), built by
//!   this benchmark into `target/bench-device/` so that it never races with, nor
//!   clobbers, the `target/release/relais` of a concurrent build (`RELAIS_BENCH_BIN`
//!   overrides it). The baseline is `benches/baseline/sync_service.py` run by the
//!   virtual environment `target/bench-venv/`, created and filled from
//!   `benches/baseline/requirements.txt` on first use.
//! - Both run as child processes against relais-server, started in this process on
//!   loopback on its embedded store, with its data in /dev/shm (its own disk writes are
//!   not the agents'). Each measured run gets a fresh server, so that relais's
//!   idempotency keys never hit a previous run's rows.
//! - Databases are generated once per figure with `relais::demo` and copied for each run
//!   and agent; the baseline writes its `sync_tracking` into its copy, as the seed does.
//!   Everything lives under `target/bench-push/` (a real disk: tmpfs would hide writes).
//! - Resource usage comes from `wait4` on the child (`ru_utime + ru_stime`, `ru_oublock`
//!   which is the kernel's `write_bytes` / 512, counted when a page is dirtied), so it
//!   covers the whole process life, exit included. Peak RSS is the child's own `VmHWM`
//!   (`/proc/<pid>/status`), read every 10 ms while it runs: `ru_maxrss` is not the
//!   child's own, Linux keeps in it the spawning process's RSS at the time of the spawn
//!   (`exec` keeps the old address space's high-water mark), so it grew with this
//!   benchmark's own memory (71 MiB for relais in figure 10 where VmHWM said 12 MiB).
//!   Idle figures come from `/proc/<pid>/task/*/{schedstat,status}` between two snapshots
//!   of a running child.
//! - Runs alternate relais, baseline, relais, ...; figures are medians. The two idle
//!   `run` children of figure 5 run at the same time, over the same window.
//! - Figure 8 reaches the server through `common/link.rs`, a delaying TCP proxy (this
//!   machine has no `tc netem`), one run per agent: each is tens of seconds long.
//! - Figures 9 and 10 (`common/lanes.rs`) run each agent's continuous mode through the
//!   link while a writer thread inserts new events at a fixed cadence: 100,000 queued
//!   events over a 100 ms round trip, then a 200 MiB BLOB over 1 MB/s. An event's latency
//!   is the store's `received_at` minus its insert's commit; the child's CPU and peak RSS
//!   come from `wait4` after SIGTERM. The baseline's runs are bounded (it would take hours
//!   to drain): what arrived within the bound is reported as such.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miniserde::json::{Number, Value as Json};
use relais::demo::{create_app_db, fill_pattern, insert_events, insert_media};
use relais::received::{self, EmbeddedServer as Receiver, ReceivedRow};
use relais::tracking::Tracking;
use rusqlite::{Connection, params};

#[path = "common/lanes.rs"]
mod lanes;
#[path = "common/link.rs"]
mod link;

type Res<T> = Result<T, String>;

const MIB: u64 = 1 << 20;
/// relais's peak RSS when its memory is flat, whatever the BLOB or the backlog: the
/// target of figures 2, 9 and 10.
const FLAT_RSS: f64 = 24.0 * MIB as f64;
const DEVICE: &str = "bench-pi";
/// What the baseline writes in `sync_date` (Python's `datetime.now().isoformat()`).
const SYNC_DATE: &str = "2025-12-18T17:30:00.123456";

struct Config {
    quick: bool,
    reps: usize,
    events: usize,
    media_mib: Vec<u64>,
    idle_rows: Vec<usize>,
    idle_secs: u64,
    uplink_events: usize,
    /// Figure 9: the queued events; the baseline's window.
    lanes_events: usize,
    lanes_window: Duration,
    /// Figure 10: the BLOB.
    lanes_media_mib: u64,
    /// Figures 9 and 10: the longest run of an agent.
    lanes_bound: Duration,
    /// `RELAIS_BENCH_ONLY`: `uplink` (figure 8), `lanes` (figures 9 and 10) or
    /// `resumable` (figure 11) alone.
    only: Option<String>,
}

impl Config {
    fn from_env() -> Config {
        let quick = std::env::var("RELAIS_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Config {
            quick,
            reps: num("RELAIS_BENCH_REPS").map_or(3, |n| n.max(1) as usize),
            events: if quick { 2_000 } else { 10_000 },
            media_mib: if quick {
                vec![1, 16]
            } else {
                vec![1, 16, 64, 256]
            },
            idle_rows: if quick {
                vec![10_000, 100_000]
            } else {
                vec![10_000, 100_000, 1_000_000]
            },
            idle_secs: num("RELAIS_BENCH_IDLE_SECS").unwrap_or(if quick { 10 } else { 60 }),
            uplink_events: if quick { 60 } else { 300 },
            lanes_events: if quick { 20_000 } else { 100_000 },
            lanes_window: Duration::from_secs(if quick { 30 } else { 60 }),
            lanes_media_mib: if quick { 20 } else { 200 },
            // The baseline's 200 MiB cannot go up at 1 MB/s in much less (base64: 280 s).
            lanes_bound: Duration::from_secs(if quick { 55 } else { 320 }),
            only: std::env::var("RELAIS_BENCH_ONLY").ok(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    Relais,
    Baseline,
}

impl Agent {
    fn name(self) -> &'static str {
        match self {
            Agent::Relais => "relais",
            Agent::Baseline => "baseline",
        }
    }
}

const AGENTS: [Agent; 2] = [Agent::Relais, Agent::Baseline];

/// Where things are.
struct Env {
    manifest: PathBuf,
    relais: PathBuf,
    python: PathBuf,
    script: PathBuf,
    venv: PathBuf,
    work: PathBuf,
    recv_root: PathBuf,
    next_id: std::cell::Cell<u64>,
}

impl Env {
    fn unique(&self, tag: &str) -> String {
        let n = self.next_id.get() + 1;
        self.next_id.set(n);
        format!("{tag}-{n}")
    }

    /// A fresh relais-server with its data in a fresh directory.
    fn receiver(&self) -> Res<(Receiver, PathBuf)> {
        let dir = self.recv_root.join(self.unique("receiver"));
        let r = Receiver::start(&dir).map_err(|e| format!("relais-server: {e}"))?;
        Ok((r, dir))
    }

    /// The command running `agent` over `db` against `backend`; relais keeps its state
    /// and log under `dir`.
    fn command(&self, agent: Agent, db: &Path, backend: &str, dir: &Path, once: bool) -> Command {
        let mode = if once { "once" } else { "run" };
        match agent {
            Agent::Relais => self.relais_command(mode, db, backend, dir),
            Agent::Baseline => {
                let mut c = Command::new(&self.python);
                c.arg(&self.script);
                c.env_clear()
                    .env("SYNC_MODE", if once { "once" } else { "continuous" })
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .env("PYTHONIOENCODING", "utf-8");
                piped(agent_env(&mut c, db, backend, dir));
                c
            }
        }
    }

    /// `relais <command>` over `db`, its state and log under `dir`.
    fn relais_command(&self, command: &str, db: &Path, backend: &str, dir: &Path) -> Command {
        let mut c = Command::new(&self.relais);
        c.arg(command);
        c.env_clear()
            .env("RELAIS_STATE_DIR", dir.join("state"))
            .env("RELAIS_LOG_DIR", dir.join("log"));
        piped(agent_env(&mut c, db, backend, dir));
        c
    }
}

fn piped(c: &mut Command) {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
}

/// What every agent child gets, relais or baseline: the seed's variables, `PATH`, a home
/// and a locale, `dir` as working directory, no stdin.
fn agent_env<'c>(c: &'c mut Command, db: &Path, backend: &str, dir: &Path) -> &'c mut Command {
    c.env("LOCAL_DB_PATH", db)
        .env("BACKEND_URL", backend)
        .env("DEVICE_ID", DEVICE)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("LANG", "C.UTF-8")
        .current_dir(dir)
        .stdin(Stdio::null())
}

/// What `wait4` says about a finished child.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    wall: f64,
    /// user + system CPU seconds.
    cpu: f64,
    maxrss: u64,
    /// `write_bytes` (ru_oublock × 512).
    written: u64,
    /// Exit code, or -signal.
    status: i32,
}

struct Running {
    child: Child,
    pid: libc::pid_t,
    started: Instant,
    out: JoinHandle<Vec<u8>>,
    err: JoinHandle<Vec<u8>>,
    /// The child's peak RSS (`VmHWM`, bytes), until it is gone.
    peak: JoinHandle<u64>,
}

/// The highest `VmHWM` of process `pid`, read every 10 ms until its status has no memory
/// lines (it exited) or is gone (reaped).
fn watch_peak(pid: libc::pid_t) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        loop {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            else {
                return peak;
            };
            peak = peak.max(kib * 1024);
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Keeps the last 8 KiB of a pipe, draining it so the child never blocks on output.
fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut tail = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 16384 {
                tail.drain(..tail.len() - 8192);
            }
        }
        tail
    })
}

fn spawn(mut cmd: Command) -> Res<Running> {
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let out = drain(child.stdout.take().ok_or("no stdout")?);
    let err = drain(child.stderr.take().ok_or("no stderr")?);
    let pid = child.id() as libc::pid_t;
    Ok(Running {
        pid,
        child,
        started,
        out,
        err,
        peak: watch_peak(pid),
    })
}

impl Running {
    /// Reaps the child with `wait4`; returns its usage and the tail of its output.
    fn wait(self) -> Res<(Usage, String)> {
        let mut status: libc::c_int = 0;
        // SAFETY: plain syscall on our own child; `ru` is a valid out-pointer.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            let r = unsafe { libc::wait4(self.pid, &mut status, 0, &mut ru) };
            if r == self.pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("wait4: {e}"));
            }
        }
        let wall = self.started.elapsed().as_secs_f64();
        drop(self.child);
        let out = self.out.join().unwrap_or_default();
        let err = self.err.join().unwrap_or_default();
        // A child gone before the first reading (a few ms): its own figure is unknown,
        // `ru_maxrss` (an upper bound, see the module doc) stands in.
        let peak = self.peak.join().unwrap_or_default();
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -libc::WTERMSIG(status)
        };
        let usage = Usage {
            wall,
            cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
            maxrss: if peak > 0 {
                peak
            } else {
                ru.ru_maxrss as u64 * 1024
            },
            written: ru.ru_oublock as u64 * 512,
            status: code,
        };
        let tail = format!(
            "--- stdout (end) ---\n{}\n--- stderr (end) ---\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        Ok((usage, tail))
    }

    /// Whether the child has exited, without reaping it (`wait` still can).
    fn exited(&self) -> bool {
        // SAFETY: plain syscall on our own child; `info` is a valid out-pointer.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: `si_pid` is set by a successful waitid, zero when nothing exited.
        r == 0 && unsafe { info.si_pid() } == self.pid
    }

    fn terminate(&self) {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
    }

    /// SIGKILL: a power cut, as far as the agent can tell.
    fn kill(&self) {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

/// Runs a command to completion; an exit code other than 0 is an error.
fn run_ok(cmd: Command, what: &str) -> Res<Usage> {
    let (u, tail) = spawn(cmd)?.wait()?;
    if u.status != 0 {
        return Err(format!("{what}: exit status {}\n{tail}", u.status));
    }
    Ok(u)
}

/// Writes dirty pages out, so a run starts without someone else's writeback pending.
fn sync_disks() {
    // SAFETY: no arguments, no memory.
    unsafe { libc::sync() };
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------------------
// Set-up: the device binary, the virtual environment, the databases.

fn target_dir(manifest: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { manifest.join(p) })
        .unwrap_or_else(|| manifest.join("target"))
}

fn build_relais(manifest: &Path, target: &Path) -> Res<PathBuf> {
    if let Some(p) = std::env::var_os("RELAIS_BENCH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let dir = target.join("bench-device");
    println!(
        "building the device binary: cargo build --release --no-default-features --target-dir {}",
        dir.display()
    );
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--no-default-features",
            "--bin",
            "relais",
            "--target-dir",
        ])
        .arg(&dir)
        .current_dir(manifest)
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of the device binary failed: {status}"));
    }
    Ok(dir.join("release").join("relais"))
}

/// `target/bench-venv` with the baseline's requirements; recreated when they change.
fn ensure_venv(manifest: &Path, target: &Path) -> Res<(PathBuf, PathBuf)> {
    let venv = target.join("bench-venv");
    let python = venv.join("bin").join("python");
    let reqs_path = manifest.join("benches/baseline/requirements.txt");
    let reqs =
        fs::read_to_string(&reqs_path).map_err(|e| format!("{}: {e}", reqs_path.display()))?;
    let stamp = venv.join(".bench-requirements");
    if python.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == reqs) {
        return Ok((venv, python));
    }
    let host_python = std::env::var_os("RELAIS_BENCH_PYTHON").unwrap_or_else(|| "python3".into());
    println!(
        "creating {} and installing {}",
        venv.display(),
        reqs_path.display()
    );
    let ok = Command::new(&host_python)
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()
        .map_err(|e| format!("{host_python:?} -m venv: {e}"))?
        .success()
        && Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "-q",
                "-r",
            ])
            .arg(&reqs_path)
            .status()
            .map_err(|e| format!("pip install: {e}"))?
            .success();
    if !ok {
        return Err("could not create the baseline's virtual environment".into());
    }
    fs::write(&stamp, reqs).map_err(|e| e.to_string())?;
    Ok((venv, python))
}

fn events_db(path: &Path, n: usize) -> Res<()> {
    let conn = create_app_db(path, false).map_err(|e| e.to_string())?;
    insert_events(&conn, n).map_err(|e| e.to_string())
}

fn media_db(path: &Path, mib: u64) -> Res<()> {
    let conn = create_app_db(path, false).map_err(|e| e.to_string())?;
    insert_media(&conn, Some(mib * MIB))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn copy(from: &Path, to: &Path) -> Res<()> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

fn mkdirs(dir: &Path) -> Res<()> {
    fs::create_dir_all(dir.join("log")).map_err(|e| format!("{}: {e}", dir.display()))
}

// ---------------------------------------------------------------------------------------
// Delivery checks: the numbers only count if both agents delivered the contract's payloads.

fn object(v: &Json) -> Option<&miniserde::json::Object> {
    match v {
        Json::Object(o) => Some(o),
        _ => None,
    }
}

fn text<'a>(o: &'a miniserde::json::Object, k: &str) -> Option<&'a str> {
    match o.get(k) {
        Some(Json::String(s)) => Some(s),
        _ => None,
    }
}

fn is_int(v: Option<&Json>) -> bool {
    matches!(v, Some(Json::Number(Number::U64(_) | Number::I64(_))))
}

fn check_common(r: &ReceivedRow, endpoint: &str, sensor: &str) -> Res<miniserde::json::Object> {
    if r.endpoint != endpoint {
        return Err(format!("row {} arrived at /api/{}", r.id, r.endpoint));
    }
    let v: Json = miniserde::json::from_str(&r.json)
        .map_err(|_| format!("row {}: not JSON: {}", r.id, r.json))?;
    let o = object(&v).ok_or("payload is not an object")?.clone();
    let capteur = o
        .get("capteur")
        .and_then(object)
        .ok_or_else(|| format!("no capteur: {}", r.json))?;
    if !is_int(capteur.get("id")) || text(capteur, "nom") != Some(sensor) {
        return Err(format!("bad capteur: {}", r.json));
    }
    if text(&o, "device_id") != Some(DEVICE) || text(&o, "source") != Some("sync_service") {
        return Err(format!("bad device_id or source: {}", r.json));
    }
    Ok(o)
}

fn validate_events(rows: &[ReceivedRow], db: &Path, n: usize) -> Res<()> {
    let conn = Connection::open(db).map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("SELECT date FROM evenement")
        .map_err(|e| e.to_string())?;
    let dates: HashSet<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| e.to_string())?;
    let mut seen = HashSet::new();
    for r in rows {
        let o = check_common(r, "evenements", "PIR Entrée")?;
        let date = text(&o, "date").ok_or("no date")?.to_string();
        if !is_int(
            o.get("capteur")
                .and_then(object)
                .and_then(|c| c.get("etat")),
        ) {
            return Err(format!("no capteur.etat: {}", r.json));
        }
        if !dates.contains(&date) || !seen.insert(date) {
            return Err(format!("unknown or repeated event: {}", r.json));
        }
    }
    if seen.len() != n {
        return Err(format!(
            "{} distinct events received, {n} expected",
            seen.len()
        ));
    }
    Ok(())
}

fn validate_media(rows: &[ReceivedRow], size: u64) -> Res<()> {
    let [r] = rows else {
        return Err(format!("{} media rows received, 1 expected", rows.len()));
    };
    let o = check_common(r, "media", "Caméra 1")?;
    if !is_int(o.get("numero_camera")) {
        return Err(format!("no numero_camera: {}", r.json));
    }
    if r.blob_len != Some(size) {
        return Err(format!(
            "BLOB of {:?} bytes received, {size} expected",
            r.blob_len
        ));
    }
    let path = r.blob.as_ref().ok_or("no BLOB file")?;
    let mut head = vec![0u8; MIB.min(size) as usize];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut want = vec![0u8; head.len()];
    fill_pattern(1, 0, &mut want);
    if head != want {
        return Err("BLOB bytes differ".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Figures 1 and 4: 10,000 events, fresh state each run.

/// `n` events from `fixture`, through a link of `shape` if given (figure 8), with `vars`
/// added to the agent's environment.
fn push_events(
    env: &Env,
    fixture: &Path,
    n: usize,
    (agent, vars): (Agent, &[(&str, &str)]),
    validate: bool,
    shape: Option<link::Shape>,
) -> Res<(Usage, [u64; 2])> {
    push_fresh(
        env,
        fixture,
        (agent, vars),
        "events",
        shape,
        |receiver, db| {
            let stored = received::stored(receiver)?;
            if stored != n as u64 {
                return Err(format!(
                    "{}: {stored} events stored, {n} expected",
                    agent.name()
                ));
            }
            if validate {
                validate_events(&received::rows(receiver)?, db, n)
                    .map_err(|e| format!("{}: {e}", agent.name()))?;
            }
            Ok(())
        },
    )
}

/// A run's set-up: a fresh directory holding a copy of `fixture`, a fresh receiver and,
/// for a `shape`, a link in front of it.
struct Fresh {
    dir: PathBuf,
    db: PathBuf,
    receiver: Receiver,
    recv_dir: PathBuf,
    link: Option<link::Link>,
}

impl Fresh {
    fn new(
        env: &Env,
        fixture: &Path,
        agent: Agent,
        tag: &str,
        shape: Option<link::Shape>,
    ) -> Res<Fresh> {
        let dir = env
            .work
            .join(env.unique(&format!("{tag}-{}", agent.name())));
        mkdirs(&dir)?;
        let db = dir.join("surveillance.db");
        copy(fixture, &db)?;
        let (receiver, recv_dir) = env.receiver()?;
        let link = shape.map(|s| link::Link::start(receiver.addr(), s));
        Ok(Fresh {
            dir,
            db,
            receiver,
            recv_dir,
            link,
        })
    }

    /// Where the agent sends: the link if there is one, else the receiver.
    fn url(&self) -> String {
        self.link
            .as_ref()
            .map_or_else(|| self.receiver.url(), link::Link::url)
    }

    /// Bytes the link forwarded up and down (none without a link).
    fn forwarded(&self) -> [u64; 2] {
        self.link
            .as_ref()
            .map_or([0, 0], |l| [l.bytes_up(), l.bytes_down()])
    }

    /// Stops the receiver and removes its data and the run's directory.
    fn remove(self) {
        drop(self.link);
        drop(self.receiver);
        let _ = fs::remove_dir_all(&self.recv_dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One `once` run of `agent` over a copy of `fixture` against a fresh receiver, timed,
/// through a link of `shape` if given; `check` then judges what arrived (the receiver,
/// the agent's database). The run's directory and the receiver's data are removed once
/// `check` passes. Also returns the bytes the link forwarded up and down.
fn push_fresh(
    env: &Env,
    fixture: &Path,
    (agent, vars): (Agent, &[(&str, &str)]),
    tag: &str,
    shape: Option<link::Shape>,
    check: impl FnOnce(&Receiver, &Path) -> Res<()>,
) -> Res<(Usage, [u64; 2])> {
    let run = Fresh::new(env, fixture, agent, tag, shape)?;
    sync_disks();
    let mut command = env.command(agent, &run.db, &run.url(), &run.dir, true);
    command.envs(vars.iter().copied());
    let u = run_ok(command, agent.name())?;
    let forwarded = run.forwarded();
    check(&run.receiver, &run.db)?;
    run.remove();
    Ok((u, forwarded))
}

// Figure 2: one media row.

fn push_media(env: &Env, fixture: &Path, mib: u64, agent: Agent, validate: bool) -> Res<Usage> {
    push_fresh(env, fixture, (agent, &[]), "media", None, |receiver, _| {
        let rows = received::rows(receiver)?;
        if rows.len() != 1 || rows[0].blob_len != Some(mib * MIB) {
            return Err(format!("{}: media of {mib} MiB not received", agent.name()));
        }
        if validate {
            validate_media(&rows, mib * MIB).map_err(|e| format!("{}: {e}", agent.name()))?;
        }
        Ok(())
    })
    .map(|(u, _)| u)
}

// Figure 8: events over a slow uplink.

/// What issue 14 asks over a 100 ms round trip: of the per-row API, of batches.
const UPLINK_TARGET: f64 = 10.0;
const BATCH_TARGET: f64 = 300.0;

/// One agent's run of figure 8.
struct UplinkRun {
    name: &'static str,
    events: usize,
    usage: Usage,
    up: u64,
    down: u64,
}

impl UplinkRun {
    fn rate(&self) -> f64 {
        self.events as f64 / self.usage.wall
    }
}

/// relais with the per-row API (`RELAIS_BATCHES=off`), relais with batches and the
/// baseline push events through a link with 50 ms each way; rows and the verdicts go
/// into `table`. The batch run pushes more events (`cfg.uplink_events` × 50): at a few
/// thousand events/s, 300 would time the start-up, not the link.
fn uplink(env: &Env, cfg: &Config, table: &mut Table) -> Res<()> {
    let n = cfg.uplink_events;
    println!("8. events over a shaped link, 50 ms each way (100 ms round trip), one run each ...");
    link::self_check()?;
    println!("     link self-check: round trip, pipelining, parallel connections, cap, cut: ok");
    let shape = link::Shape {
        delay_each_way: Duration::from_millis(50),
        bytes_per_sec: None,
        cut_every: None,
    };
    let per_row: &[(&str, &str)] = &[("RELAIS_BATCHES", "off")];
    let cases = [
        ("relais", Agent::Relais, per_row, n),
        ("batches", Agent::Relais, &[][..], n * 50),
        ("baseline", Agent::Baseline, &[][..], n),
    ];
    let mut runs = Vec::new();
    for (name, agent, vars, events) in cases {
        let fixture = env.work.join(format!("fixture-uplink-{events}.db"));
        events_db(&fixture, events)?;
        let (usage, [up, down]) =
            push_events(env, &fixture, events, (agent, vars), true, Some(shape))?;
        let _ = fs::remove_file(&fixture);
        let run = UplinkRun {
            name,
            events,
            usage,
            up,
            down,
        };
        println!(
            "     {:<8} {:>6} events {:>6.2} s  {:>7.1} events/s  CPU {:>9}  peak RSS {:>8}  link: {} up, {} down",
            run.name,
            run.events,
            run.usage.wall,
            run.rate(),
            fmt_secs(run.usage.cpu),
            fmt_bytes(run.usage.maxrss as f64),
            fmt_bytes(run.up as f64),
            fmt_bytes(run.down as f64)
        );
        runs.push(run);
    }
    let baseline = &runs[2];
    for (run, target, api) in [
        (&runs[0], UPLINK_TARGET, "per-row API"),
        (&runs[1], BATCH_TARGET, "batches"),
    ] {
        let ratio = run.rate() / baseline.rate();
        let met = ratio >= target;
        println!(
            "     {} ({api})/baseline {ratio:.2}× against issue 14's target ≥ {target}×: target met: {}",
            run.name,
            if met { "yes" } else { "no" }
        );
        let what = format!("8. uplink, 100 ms round trip, {api}");
        table.rate(
            format!("{what}: events/s ({} events)", run.events),
            run.rate(),
            baseline.rate(),
            fmt_rate,
        );
        table.cost(
            format!("{what}: CPU per 1,000 events"),
            run.usage.cpu * 1000.0 / run.events as f64,
            baseline.usage.cpu * 1000.0 / baseline.events as f64,
            fmt_secs,
        );
        table.cost(
            format!("{what}: peak RSS"),
            run.usage.maxrss as f64,
            baseline.usage.maxrss as f64,
            fmt_bytes,
        );
        table.cost(
            format!("{what}: bytes up per event"),
            run.up as f64 / run.events as f64,
            baseline.up as f64 / baseline.events as f64,
            fmt_bytes,
        );
        table.target(
            met,
            format!("uplink events/s over a 100 ms round trip, {api}, ≥ {target}× the baseline's (issue 14; {ratio:.2}×)"),
        );
    }
    Ok(())
}

// Figure 3: the state of N rows already synced, as each agent leaves it.

/// relais: its state database with N `success` rows and the high-water mark, written in
/// bulk with the schema relais itself created (`Tracking::open`).
fn prepare_relais_state(dir: &Path, db: &Path, n: usize) -> Res<()> {
    let state = dir.join("state");
    drop(Tracking::open(&state).map_err(|e| e.to_string())?);
    let mut conn =
        Connection::open(state.join(relais::tracking::STATE_DB_NAME)).map_err(|e| e.to_string())?;
    let source = db.display().to_string();
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    {
        let mut ins = tx
            .prepare(
                "INSERT INTO sync_tracking (source, table_name, local_id, remote_id, sync_date, sync_status, attempts, bytes)
                 VALUES (?1, 'evenement', ?2, ?2, ?3, 'success', 1, 160)",
            )
            .map_err(|e| e.to_string())?;
        for id in 1..=n as i64 {
            ins.execute(params![source, id, SYNC_DATE])
                .map_err(|e| e.to_string())?;
        }
    }
    tx.execute(
        "INSERT INTO sync_cursor (source, table_name, high_water) VALUES (?1, 'evenement', ?2)",
        params![source, n as i64],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .map_err(|e| e.to_string())
}

/// The baseline: its `sync_tracking` table, created by the baseline's own code, with N
/// `success` rows, in its copy of the application database.
fn prepare_baseline_state(env: &Env, dir: &Path, db: &Path, n: usize) -> Res<()> {
    let mut init = Command::new(&env.python);
    init.args([
        "-c",
        "import sync_service; sync_service.init_tracking_table()",
    ])
    .env("LOCAL_DB_PATH", db)
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .current_dir(env.script.parent().unwrap_or(dir))
    .stdout(Stdio::null());
    if !init.status().map_err(|e| e.to_string())?.success() {
        return Err("the baseline could not create its tracking table".into());
    }
    let mut conn = Connection::open(db).map_err(|e| e.to_string())?;
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    {
        let mut ins = tx
            .prepare(
                "INSERT INTO sync_tracking (table_name, local_id, remote_id, sync_date, sync_status)
                 VALUES ('evenement', ?1, ?1, ?2, 'success')",
            )
            .map_err(|e| e.to_string())?;
        for id in 1..=n as i64 {
            ins.execute(params![id, SYNC_DATE])
                .map_err(|e| e.to_string())?;
        }
    }
    tx.commit().map_err(|e| e.to_string())
}

/// Per agent: the directory and database of an idle set-up.
struct Idle {
    dirs: [(PathBuf, PathBuf); 2],
}

fn prepare_idle(env: &Env, n: usize) -> Res<Idle> {
    let fixture = env.work.join(format!("fixture-idle-{n}.db"));
    events_db(&fixture, n)?;
    let mut dirs = Vec::new();
    for agent in AGENTS {
        let dir = env.work.join(format!("idle-{n}-{}", agent.name()));
        mkdirs(&dir)?;
        let db = dir.join("surveillance.db");
        copy(&fixture, &db)?;
        match agent {
            Agent::Relais => prepare_relais_state(&dir, &db, n)?,
            Agent::Baseline => prepare_baseline_state(env, &dir, &db, n)?,
        }
        dirs.push((dir, db));
    }
    let _ = fs::remove_file(&fixture);
    let [a, b]: [(PathBuf, PathBuf); 2] = dirs.try_into().map_err(|_| "two agents")?;
    Ok(Idle { dirs: [a, b] })
}

/// CPU time of the calling thread.
fn thread_cpu() -> f64 {
    // SAFETY: valid out-pointer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One cycle of relais's `run` loop that finds nothing new (a pass and the record of its
/// outcome, as `daemon::run` does between two sleeps), in a pusher that already did one:
/// the steady state of a device. Measured in this process, on this thread; (wall, CPU).
fn relais_cycle(db: &Path, dir: &Path, backend: &str) -> Res<(f64, f64)> {
    let settings = relais::demo::settings_for(db, backend, dir, &[("DEVICE_ID", DEVICE)])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pusher =
        relais::daemon::build_pusher(&settings, Some(relais::lane::Lane::Events), stop)?;
    let warm = pusher.sync_once();
    relais::status::record_cycle(pusher.tracking(), &warm, relais::lane::Lane::Events);
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let report = pusher.sync_once();
    relais::status::record_cycle(pusher.tracking(), &report, relais::lane::Lane::Events);
    let measured = (wall.elapsed().as_secs_f64(), thread_cpu() - cpu);
    if warm.pushed() + report.pushed() != 0 || !report.is_clean() {
        return Err(format!("relais idle cycle was not idle: {report}"));
    }
    Ok(measured)
}

/// The same for the baseline: `synchronize()` twice in one interpreter, the second timed
/// (the steady state of its continuous mode); (wall, CPU).
fn baseline_cycle(env: &Env, db: &Path, dir: &Path, backend: &str) -> Res<(f64, f64)> {
    let mut cmd = Command::new(&env.python);
    cmd.arg("-c")
        .arg(
            "import sync_service as s, time\n\
             s.synchronize()\n\
             w, c = time.perf_counter(), time.process_time()\n\
             s.synchronize()\n\
             print('CYCLE', time.perf_counter() - w, time.process_time() - c)",
        )
        .env_clear()
        .env("PYTHONPATH", env.script.parent().unwrap_or(dir))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONIOENCODING", "utf-8");
    agent_env(&mut cmd, db, backend, dir);
    let out = cmd.output().map_err(|e| format!("baseline cycle: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CYCLE "))
        .ok_or_else(|| {
            format!(
                "baseline cycle: no measurement ({})\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let mut it = line
        .split_whitespace()
        .filter_map(|v| v.parse::<f64>().ok());
    match (it.next(), it.next()) {
        (Some(w), Some(c)) => Ok((w, c)),
        _ => Err(format!("baseline cycle: bad line {line:?}")),
    }
}

/// Figure 3 for one history size: medians, [relais, baseline].
struct IdleCycle {
    n: usize,
    cycle_wall: [f64; 2],
    cycle_cpu: [f64; 2],
    once_wall: [f64; 2],
    once_cpu: [f64; 2],
    /// `relais reconcile` (wall, CPU, peak RSS): the sweep that finds rows below the
    /// high-water mark; the seed's equivalent is its `NOT IN` rescan, which every pass
    /// does, so the baseline's figures are those of its `once` process.
    sweep: [f64; 3],
    once_rss: f64,
}

// Figure 5: a running child, between two snapshots.

#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    cpu_ns: u64,
    voluntary: u64,
    rss: u64,
}

fn snapshot(pid: libc::pid_t) -> Res<Snapshot> {
    let mut s = Snapshot::default();
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}: {e} (the child died?)"))?;
    for t in tasks.flatten() {
        let p = t.path();
        if let Ok(sched) = fs::read_to_string(p.join("schedstat")) {
            s.cpu_ns += sched
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(status) = fs::read_to_string(p.join("status")) {
            s.voluntary += status_field(&status, "voluntary_ctxt_switches:");
        }
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    s.rss = status_field(&status, "VmRSS:") * 1024;
    Ok(s)
}

fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, Default)]
struct IdleRun {
    cpu_per_min: f64,
    wakeups_per_s: f64,
    rss: u64,
}

fn idle_runs(env: &Env, idle: &Idle, secs: u64, backend: &str) -> Res<[IdleRun; 2]> {
    let mut running = Vec::new();
    for (agent, (dir, db)) in AGENTS.iter().zip(&idle.dirs) {
        running.push(spawn(env.command(*agent, db, backend, dir, false))?);
    }
    // Let both finish their start-up pass (which finds nothing new).
    std::thread::sleep(Duration::from_secs(5));
    let before: Vec<Snapshot> = running
        .iter()
        .map(|r| snapshot(r.pid))
        .collect::<Res<_>>()?;
    std::thread::sleep(Duration::from_secs(secs));
    let after: Vec<Snapshot> = running
        .iter()
        .map(|r| snapshot(r.pid))
        .collect::<Res<_>>()?;
    let mut out = [IdleRun::default(); 2];
    for (i, r) in running.into_iter().enumerate() {
        r.terminate();
        let (u, tail) = r.wait()?;
        if u.status != 0 && u.status != -libc::SIGTERM {
            return Err(format!(
                "{} run: exit status {}\n{tail}",
                AGENTS[i].name(),
                u.status
            ));
        }
        out[i] = IdleRun {
            cpu_per_min: (after[i].cpu_ns - before[i].cpu_ns) as f64 / 1e9 * 60.0 / secs as f64,
            wakeups_per_s: (after[i].voluntary - before[i].voluntary) as f64 / secs as f64,
            rss: after[i].rss,
        };
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The table.

fn fmt_bytes(b: f64) -> String {
    if b >= 10.0 * MIB as f64 {
        format!("{:.0} MiB", b / MIB as f64)
    } else if b >= MIB as f64 {
        format!("{:.1} MiB", b / MIB as f64)
    } else if b >= 10240.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.001 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

struct Row {
    figure: String,
    relais: String,
    baseline: String,
    /// How many times better relais is (> 1: better).
    ratio: Option<f64>,
}

struct Table {
    rows: Vec<Row>,
    verdicts: Vec<(bool, String)>,
}

impl Table {
    /// A row where lower is better (costs).
    fn cost(&mut self, figure: String, relais: f64, baseline: f64, fmt: fn(f64) -> String) {
        let ratio = (relais > 0.0).then(|| baseline / relais);
        self.row(figure, relais, baseline, fmt, ratio);
    }

    /// A row where higher is better (rates).
    fn rate(&mut self, figure: String, relais: f64, baseline: f64, fmt: fn(f64) -> String) {
        let ratio = (baseline > 0.0).then(|| relais / baseline);
        self.row(figure, relais, baseline, fmt, ratio);
    }

    fn row(
        &mut self,
        figure: String,
        relais: f64,
        baseline: f64,
        fmt: fn(f64) -> String,
        ratio: Option<f64>,
    ) {
        self.rows.push(Row {
            figure,
            relais: fmt(relais),
            baseline: fmt(baseline),
            ratio,
        });
    }

    fn target(&mut self, pass: bool, what: String) {
        self.verdicts.push((pass, what));
    }

    fn print(&self) {
        // A column's width: its widest cell, at least `min`; `empty` without rows.
        let width = |cell: fn(&Row) -> &String, empty: usize, min: usize| {
            self.rows
                .iter()
                .map(|r| cell(r).chars().count())
                .max()
                .unwrap_or(empty)
                .max(min)
        };
        let w = width(|r| &r.figure, 10, 6);
        let wr = width(|r| &r.relais, 6, 6);
        let wb = width(|r| &r.baseline, 8, 8);
        let pad =
            |s: &str, n: usize| format!("{s}{}", " ".repeat(n.saturating_sub(s.chars().count())));
        println!(
            "| {} | {} | {} | ratio |",
            pad("figure", w),
            pad("relais", wr),
            pad("baseline", wb)
        );
        println!(
            "|{}|{}:|{}:|------:|",
            "-".repeat(w + 2),
            "-".repeat(wr + 1),
            "-".repeat(wb + 1)
        );
        for r in &self.rows {
            let ratio = match r.ratio {
                Some(x) if x >= 100.0 => format!("{x:.0}×"),
                Some(x) if x.is_finite() => format!("{x:.1}×"),
                _ => "n/a".into(),
            };
            let lpad = |s: &str, n: usize| {
                format!("{}{s}", " ".repeat(n.saturating_sub(s.chars().count())))
            };
            println!(
                "| {} | {} | {} | {} |",
                pad(&r.figure, w),
                lpad(&r.relais, wr),
                lpad(&r.baseline, wb),
                lpad(&ratio, 5)
            );
        }
        println!();
        println!(
            "ratio: how many times better relais is (baseline ÷ relais for costs, relais ÷ baseline for rates)."
        );
        println!();
        for (pass, what) in &self.verdicts {
            println!("{} {what}", if *pass { "PASS" } else { "MISS" });
        }
    }
}

fn rows_label(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{}M", n / 1_000_000)
    } else {
        format!("{}k", n / 1000)
    }
}

fn shell(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn dir_size(p: &Path) -> u64 {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::read_dir(p)
            .map(|d| d.flatten().map(|e| dir_size(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

fn print_header(env: &Env, cfg: &Config) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| {
                    l.starts_with("model name")
                        || l.starts_with("Model")
                        || l.starts_with("Hardware")
                })
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut command = String::new();
    for k in [
        "RELAIS_BENCH_QUICK",
        "RELAIS_BENCH_IDLE_SECS",
        "RELAIS_BENCH_REPS",
        "RELAIS_BENCH_BIN",
        "RELAIS_BENCH_ONLY",
    ] {
        if let Ok(v) = std::env::var(k) {
            command.push_str(&format!("{k}={v} "));
        }
    }
    command.push_str("cargo bench --bench push");
    println!();
    println!(
        "date:     {}",
        shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    println!(
        "machine:  {} · {cpu} · {cores} cores · {}",
        shell("uname", &["-m"]),
        shell("uname", &["-sr"])
    );
    println!(
        "versions: relais {} ({}), {}, requests {}",
        env!("CARGO_PKG_VERSION"),
        shell(
            "git",
            &[
                "-C",
                &env.manifest.display().to_string(),
                "describe",
                "--always",
                "--dirty"
            ]
        ),
        shell(&env.python.display().to_string(), &["--version"]),
        shell(
            &env.python.display().to_string(),
            &["-c", "import requests; print(requests.__version__)"]
        ),
    );
    println!("command:  {command}");
    println!(
        "runs:     {} per figure, alternating, medians{}",
        cfg.reps,
        if cfg.quick {
            " (QUICK: reduced sizes)"
        } else {
            ""
        }
    );
    println!();
}

// ---------------------------------------------------------------------------------------

fn main() {
    if let Err(e) = bench() {
        eprintln!("benchmark FAILED: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Res<()> {
    let cfg = Config::from_env();
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = target_dir(&manifest);
    let relais = build_relais(&manifest, &target)?;
    let (venv, python) = ensure_venv(&manifest, &target)?;
    let work = target.join("bench-push");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let shm = Path::new("/dev/shm");
    let recv_root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        work.clone()
    }
    .join(format!("relais-bench-{}", std::process::id()));
    let env = Env {
        manifest: manifest.clone(),
        relais,
        python,
        script: manifest.join("benches/baseline/sync_service.py"),
        venv,
        work,
        recv_root,
        next_id: std::cell::Cell::new(0),
    };
    let result = measure(&env, &cfg);
    let _ = fs::remove_dir_all(&env.recv_root);
    if result.is_ok() {
        let _ = fs::remove_dir_all(&env.work);
    }
    result
}

fn measure(env: &Env, cfg: &Config) -> Res<()> {
    print_header(env, cfg);
    let mut table = Table {
        rows: Vec::new(),
        verdicts: Vec::new(),
    };
    type Figures = fn(&Env, &Config, &mut Table) -> Res<()>;
    let only: Option<Figures> = match cfg.only.as_deref() {
        None | Some("") => None,
        Some("uplink") => Some(uplink),
        Some("lanes") => Some(lanes::lanes),
        Some("resumable") => Some(lanes::resumable),
        Some(other) => {
            return Err(format!(
                "RELAIS_BENCH_ONLY={other}: want uplink, lanes or resumable"
            ));
        }
    };
    if let Some(figures) = only {
        figures(env, cfg, &mut table)?;
        println!();
        table.print();
        return Ok(());
    }
    let reps = cfg.reps;

    // 1 and 4.
    println!(
        "1/4. pushing {} events, fresh state each run ...",
        cfg.events
    );
    let fixture = env.work.join("fixture-events.db");
    events_db(&fixture, cfg.events)?;
    let mut ev: [Vec<Usage>; 2] = Default::default();
    for rep in 0..reps {
        for (i, agent) in AGENTS.iter().enumerate() {
            let (u, _) = push_events(env, &fixture, cfg.events, (*agent, &[]), rep == 0, None)?;
            println!(
                "     {:<8} {:>7.2} s  {:>7.0} events/s  {:>10} written",
                agent.name(),
                u.wall,
                cfg.events as f64 / u.wall,
                fmt_bytes(u.written as f64)
            );
            ev[i].push(u);
        }
    }
    let _ = fs::remove_file(&fixture);
    let rate = |i: usize| median(ev[i].iter().map(|u| cfg.events as f64 / u.wall).collect());
    let per_event = |i: usize| {
        median(
            ev[i]
                .iter()
                .map(|u| u.written as f64 / cfg.events as f64)
                .collect(),
        )
    };
    let (ev_rate, ev_written) = ([rate(0), rate(1)], [per_event(0), per_event(1)]);

    // 2.
    println!("2. media, one BLOB per database ...");
    let mut media: Vec<(u64, [f64; 2], [f64; 2])> = Vec::new();
    for &mib in &cfg.media_mib {
        let fixture = env.work.join(format!("fixture-media-{mib}.db"));
        media_db(&fixture, mib)?;
        let mut us: [Vec<Usage>; 2] = Default::default();
        for rep in 0..reps {
            for (i, agent) in AGENTS.iter().enumerate() {
                let u = push_media(env, &fixture, mib, *agent, rep == 0)?;
                println!(
                    "     {mib:>3} MiB {:<8} {:>7.2} s  {:>7.1} MiB/s  peak RSS {}",
                    agent.name(),
                    u.wall,
                    mib as f64 / u.wall,
                    fmt_bytes(u.maxrss as f64)
                );
                us[i].push(u);
            }
        }
        let _ = fs::remove_file(&fixture);
        let mbps = |i: usize| median(us[i].iter().map(|u| mib as f64 / u.wall).collect());
        let rss = |i: usize| median(us[i].iter().map(|u| u.maxrss as f64).collect());
        media.push((mib, [mbps(0), mbps(1)], [rss(0), rss(1)]));
    }

    // 3.
    println!("3. a pass that finds nothing new ...");
    let (receiver, recv_dir) = env.receiver()?;
    let mut idle_cycle: Vec<IdleCycle> = Vec::new();
    let mut idle_setups = Vec::new();
    for &n in &cfg.idle_rows {
        let setup = prepare_idle(env, n)?;
        // One unmeasured pass each: the steady state of a device, page cache warm.
        for (agent, (dir, db)) in AGENTS.iter().zip(&setup.dirs) {
            run_ok(
                env.command(*agent, db, &receiver.url(), dir, true),
                agent.name(),
            )?;
        }
        let mut us: [Vec<Usage>; 2] = Default::default();
        let mut cycles: [Vec<(f64, f64)>; 2] = Default::default();
        for _ in 0..reps {
            for (i, (agent, (dir, db))) in AGENTS.iter().zip(&setup.dirs).enumerate() {
                sync_disks();
                let u = run_ok(
                    env.command(*agent, db, &receiver.url(), dir, true),
                    agent.name(),
                )?;
                let c = match agent {
                    Agent::Relais => relais_cycle(db, dir, &receiver.url())?,
                    Agent::Baseline => baseline_cycle(env, db, dir, &receiver.url())?,
                };
                println!(
                    "     {:>4} synced {:<8} `once` process: wall {:>9} CPU {:>9} · `run` cycle: wall {:>9} CPU {:>9}",
                    rows_label(n),
                    agent.name(),
                    fmt_secs(u.wall),
                    fmt_secs(u.cpu),
                    fmt_secs(c.0),
                    fmt_secs(c.1)
                );
                us[i].push(u);
                cycles[i].push(c);
            }
        }
        let mut sweeps = Vec::new();
        for _ in 0..reps {
            let (dir, db) = &setup.dirs[0];
            sync_disks();
            let u = run_ok(
                env.relais_command("reconcile", db, &receiver.url(), dir),
                "relais reconcile",
            )?;
            println!(
                "     {:>4} synced relais   `reconcile` (the sweep): wall {:>9} CPU {:>9} peak RSS {}",
                rows_label(n),
                fmt_secs(u.wall),
                fmt_secs(u.cpu),
                fmt_bytes(u.maxrss as f64)
            );
            sweeps.push(u);
        }
        let med = |i: usize, f: &dyn Fn(&Usage) -> f64| median(us[i].iter().map(f).collect());
        let meds = |f: &dyn Fn(&Usage) -> f64| median(sweeps.iter().map(f).collect());
        let medc =
            |i: usize, f: &dyn Fn(&(f64, f64)) -> f64| median(cycles[i].iter().map(f).collect());
        idle_cycle.push(IdleCycle {
            n,
            cycle_wall: [medc(0, &|c| c.0), medc(1, &|c| c.0)],
            cycle_cpu: [medc(0, &|c| c.1), medc(1, &|c| c.1)],
            once_wall: [med(0, &|u| u.wall), med(1, &|u| u.wall)],
            once_cpu: [med(0, &|u| u.cpu), med(1, &|u| u.cpu)],
            sweep: [
                meds(&|u| u.wall),
                meds(&|u| u.cpu),
                meds(&|u| u.maxrss as f64),
            ],
            once_rss: med(1, &|u| u.maxrss as f64),
        });
        idle_setups.push((n, setup));
    }
    if receiver.requests() != 0 {
        return Err(format!(
            "a pass over already-synced rows sent {} requests: the prepared state is not what the agent expects",
            receiver.requests()
        ));
    }

    // 5 and 6.
    let (n5, setup5) = &idle_setups[0];
    println!(
        "5. idle `run` (default interval, {} rows synced), {} s windows, both at once ...",
        rows_label(*n5),
        cfg.idle_secs
    );
    let mut idle_runs_: [Vec<IdleRun>; 2] = Default::default();
    for _ in 0..reps {
        let r = idle_runs(env, setup5, cfg.idle_secs, &receiver.url())?;
        for (i, agent) in AGENTS.iter().enumerate() {
            println!(
                "     {:<8} {:.4} CPU s/min  {:.2} wake-ups/s  RSS {}",
                agent.name(),
                r[i].cpu_per_min,
                r[i].wakeups_per_s,
                fmt_bytes(r[i].rss as f64)
            );
            idle_runs_[i].push(r[i]);
        }
    }
    if receiver.requests() != 0 {
        return Err("an idle agent sent requests".into());
    }
    drop(receiver);
    let _ = fs::remove_dir_all(&recv_dir);
    let idle_cpu = |i: usize| median(idle_runs_[i].iter().map(|r| r.cpu_per_min).collect());
    let idle_wake = |i: usize| median(idle_runs_[i].iter().map(|r| r.wakeups_per_s).collect());
    let idle_rss = |i: usize| median(idle_runs_[i].iter().map(|r| r.rss as f64).collect());

    let binary = fs::metadata(&env.relais).map_err(|e| e.to_string())?.len();
    let site = fs::read_dir(env.venv.join("lib"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.path().join("site-packages"))
        .unwrap_or_default();
    let baseline_size = [
        "requests",
        "urllib3",
        "idna",
        "charset_normalizer",
        "certifi",
    ]
    .iter()
    .map(|p| dir_size(&site.join(p)))
    .sum::<u64>()
        + dir_size(&env.script);

    // The table.
    table.rate(
        format!("1. events/s ({} events)", cfg.events),
        ev_rate[0],
        ev_rate[1],
        fmt_rate,
    );
    for (mib, mbps, rss) in &media {
        table.rate(
            format!("2. media {mib} MiB: MiB/s"),
            mbps[0],
            mbps[1],
            fmt_rate,
        );
        table.cost(
            format!("2. media {mib} MiB: peak RSS"),
            rss[0],
            rss[1],
            fmt_bytes,
        );
    }
    type Pick = fn(&IdleCycle) -> [f64; 2];
    let idle_rows: [(&str, Pick, Pick); 2] = [
        ("idle cycle of `run`", |c| c.cycle_wall, |c| c.cycle_cpu),
        ("idle `once` process", |c| c.once_wall, |c| c.once_cpu),
    ];
    for (what, wall, cpu) in idle_rows {
        for c in &idle_cycle {
            let n = rows_label(c.n);
            let (wall, cpu) = (wall(c), cpu(c));
            table.cost(
                format!("3. {what}, {n} synced: wall"),
                wall[0],
                wall[1],
                fmt_secs,
            );
            table.cost(
                format!("3. {what}, {n} synced: CPU"),
                cpu[0],
                cpu[1],
                fmt_secs,
            );
        }
    }
    for c in &idle_cycle {
        let n = rows_label(c.n);
        let what = "7. reconciliation sweep (baseline: its `once`, which rescans with NOT IN)";
        table.cost(
            format!("{what}, {n}: wall"),
            c.sweep[0],
            c.once_wall[1],
            fmt_secs,
        );
        table.cost(
            format!("{what}, {n}: CPU"),
            c.sweep[1],
            c.once_cpu[1],
            fmt_secs,
        );
        table.cost(
            format!("{what}, {n}: peak RSS"),
            c.sweep[2],
            c.once_rss,
            fmt_bytes,
        );
    }
    table.cost(
        "4. bytes written per event".into(),
        ev_written[0],
        ev_written[1],
        fmt_bytes,
    );
    table.cost(
        format!("5. idle run: CPU s per minute ({} s)", cfg.idle_secs),
        idle_cpu(0),
        idle_cpu(1),
        |x| format!("{x:.4}"),
    );
    table.cost(
        "5. idle run: wake-ups per second".into(),
        idle_wake(0),
        idle_wake(1),
        |x| format!("{x:.2}"),
    );
    table.cost(
        "6. device binary, stripped (baseline: script + requests & deps, Python not counted)"
            .into(),
        binary as f64,
        baseline_size as f64,
        fmt_bytes,
    );
    table.cost("6. idle RSS".into(), idle_rss(0), idle_rss(1), fmt_bytes);
    uplink(env, cfg, &mut table)?;
    lanes::lanes(env, cfg, &mut table)?;
    lanes::resumable(env, cfg, &mut table)?;

    // Targets.
    // Flat: from 16 MiB up (4× the 4 MiB chunk, so every buffer has its full size), the
    // peak does not grow with the BLOB by more than 2 MiB.
    let large = media.last().ok_or("no media")?;
    let streamed: Vec<f64> = media.iter().filter(|m| m.0 >= 16).map(|m| m.2[0]).collect();
    let spread = streamed.iter().cloned().fold(f64::MIN, f64::max)
        - streamed.iter().cloned().fold(f64::MAX, f64::min);
    let rss_list: Vec<String> = media
        .iter()
        .map(|m| format!("{} MiB: {}", m.0, fmt_bytes(m.2[0])))
        .collect();
    table.target(
        large.2[0] < FLAT_RSS && spread <= 2.0 * MIB as f64,
        format!(
            "media peak RSS flat from 16 MiB up and < 24 MiB at {} MiB: relais {} (baseline {} at {} MiB, {:.1}× the BLOB)",
            large.0,
            rss_list.join(", "),
            fmt_bytes(large.2[1]),
            large.0,
            large.2[1] / (large.0 * MIB) as f64
        ),
    );
    let (first, last) = (
        idle_cycle.first().ok_or("no idle")?,
        idle_cycle.last().ok_or("no idle")?,
    );
    let idle_targets: [(&str, Pick); 4] = [
        ("`run` cycle, wall", |c| c.cycle_wall),
        ("`run` cycle, CPU", |c| c.cycle_cpu),
        ("`once` process, wall", |c| c.once_wall),
        ("`once` process, CPU", |c| c.once_cpu),
    ];
    for (what, pick) in idle_targets {
        let (l, f) = (pick(last), pick(first));
        table.target(
            l[1] / l[0] >= 100.0 && l[0] <= 2.0 * f[0],
            format!(
                "idle {what}: at {} synced ≥ 100× cheaper than the baseline ({:.0}×) and ≤ 2× relais at {} ({:.2}×)",
                rows_label(last.n),
                l[1] / l[0],
                rows_label(first.n),
                l[0] / f[0]
            ),
        );
    }
    table.target(
        ev_rate[0] >= 5.0 * ev_rate[1],
        format!(
            "event rate ≥ 5× the baseline's ({:.1}×)",
            ev_rate[0] / ev_rate[1]
        ),
    );
    table.target(
        ev_written[1] >= 20.0 * ev_written[0],
        format!(
            "bytes written per event ≥ 20× fewer than the baseline ({:.1}×: {} vs {})",
            ev_written[1] / ev_written[0].max(1.0),
            fmt_bytes(ev_written[0]),
            fmt_bytes(ev_written[1])
        ),
    );
    table.target(
        idle_cpu(0) < 0.05 && idle_wake(0) <= 1.0,
        format!(
            "idle run < 0.05 CPU s/min ({:.4}) and ≤ 1 wake-up/s ({:.2})",
            idle_cpu(0),
            idle_wake(0)
        ),
    );
    println!();
    table.print();
    Ok(())
}
