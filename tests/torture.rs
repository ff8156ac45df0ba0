//! The fault campaigns of issue 4: power cuts, lost answers, a backend without
//! idempotency, a sick backend, an application that must keep working, hostile input,
//! and the log file's cap. Each campaign runs the `relais` binary against relais-server
//! in-process, mostly through the fault-injecting proxy of `common`, then checks what
//! arrived (every row once, identical bytes), the agent's tracking table and its state
//! database.
//!
//! A short version of each campaign runs in the normal `cargo test`. The full versions
//! are for release checks and print the table of the README's "Fault campaigns":
//!
//! ```sh
//! cargo test --release --test torture -- --ignored --nocapture
//! ```
//!
//! which exits non-zero on any loss, unexpected duplicate or failed check. Fault
//! schedules are random; each campaign prints its seed, and `TORTURE_SEED=<n>` replays it.
#![cfg(feature = "demo")]

mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Agent, AppWriter, DEVICE, FaultProxy, ProxyFault, ReceivedRow, Receiver, Rng, Scratch,
    agent_env, cpu_time, integrity, power_cut, relais_command, run_relais, send_signal, vm_hwm_kib,
    wait_exit, wait_for,
};
use relais::demo::{Delivery, check_delivery, create_app_db, insert_events, insert_media};
use rusqlite::{Connection, OpenFlags};

const KB: u64 = 1 << 10;
const MB: u64 = 1 << 20;

/// Short timeouts and backoffs, so that a sick backend is noticed in seconds.
const SICK_CONFIG: &str = r#"{"http": {"io_timeout_s": 1, "connect_timeout_s": 1, "response_timeout_s": 2},
 "retry": {"initial_backoff_s": 0.2, "max_backoff_s": 1}}"#;

/// `ACK_GROUP` of `src/push.rs`: acknowledgements committed together. A power cut
/// can forget at most one group plus the row in flight (README "What it guarantees").
const ACK_GROUP: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scale {
    Short,
    Full,
}

impl Scale {
    fn pick<T>(self, short: T, full: T) -> T {
        match self {
            Scale::Short => short,
            Scale::Full => full,
        }
    }
}

// ---------------------------------------------------------------- the table

/// One line of the table: what a campaign did and found.
#[derive(Debug, Default)]
struct Line {
    campaign: String,
    trials: u64,
    expected: u64,
    received: u64,
    duplicates: u64,
    lost: u64,
    /// Duplicates the guarantee allows (0 with an idempotent backend).
    allowed_duplicates: u64,
    /// Failed checks other than loss and duplicates, one sentence each.
    problems: Vec<String>,
    /// Figures worth reporting (re-sent rows, CPU time, failed inserts, ...).
    notes: Vec<String>,
}

impl Line {
    fn new(campaign: &str) -> Line {
        Line {
            campaign: campaign.to_string(),
            ..Line::default()
        }
    }

    fn delivery(&mut self, d: &Delivery) {
        self.expected = d.expected;
        self.received = d.received;
        self.duplicates = d.duplicates;
        self.lost = d.missing.len() as u64;
        if !d.missing.is_empty() {
            let some: Vec<&String> = d.missing.iter().take(5).collect();
            self.problems.push(format!("missing rows, e.g. {some:?}"));
        }
        for m in d.mismatched.iter().take(5) {
            self.problems.push(format!("differs: {m}"));
        }
    }

    /// Adds a delivery's counts to the line's (a campaign of several steps).
    fn add_counts(&mut self, d: &Delivery) {
        self.expected += d.expected;
        self.received += d.received;
        self.duplicates += d.duplicates;
        self.lost += d.missing.len() as u64;
    }

    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.problems.push(problem());
        }
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates <= self.allowed_duplicates && self.problems.is_empty()
    }

    /// Fails the calling test with everything the campaign found.
    fn assert_ok(&self) {
        println!("{}", table(std::slice::from_ref(self)));
        assert!(self.ok(), "{}: {:#?}", self.campaign, self);
    }
}

fn table(lines: &[Line]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| campaign | trials | rows expected | rows received | duplicates | lost | errors | notes |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|");
    for l in lines {
        let dup = if l.allowed_duplicates > 0 {
            format!("{} (allowed ≤ {})", l.duplicates, l.allowed_duplicates)
        } else {
            l.duplicates.to_string()
        };
        let mut notes = l.notes.join("; ");
        if !l.problems.is_empty() {
            let _ = write!(notes, "; FAILED: {}", l.problems.join("; "));
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            l.campaign,
            l.trials,
            l.expected,
            l.received,
            dup,
            l.lost,
            l.problems.len(),
            notes
        );
    }
    out
}

// ---------------------------------------------------------------- helpers

fn receiver(dir: &Scratch, idempotency: bool) -> Receiver {
    Receiver::start_with(&dir.join("receiver"), idempotency)
}

/// A receiver and the fault-injecting proxy in front of it.
fn proxied_receiver(dir: &Scratch, idempotency: bool) -> (Receiver, FaultProxy) {
    let rx = receiver(dir, idempotency);
    let proxy = FaultProxy::start(&rx.url());
    (rx, proxy)
}

/// The line, the fault schedule and the directory of a campaign run against a backend
/// with or without idempotency: `names` and `tags` give (with, without).
fn campaign(idempotency: bool, names: (&str, &str), tags: (&str, &str)) -> (Line, Rng, Scratch) {
    let (name, tag) = if idempotency {
        (names.0, tags.0)
    } else {
        (names.1, tags.1)
    };
    (Line::new(name), Rng::from_env(name), Scratch::new(tag))
}

fn write_config(dir: &Scratch, name: &str, json: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, json).expect("write config");
    path.display().to_string()
}

/// The environment of an agent over `db` against `backend` with state and logs in `dir`,
/// passing every `interval` seconds, with `json` as its configuration file.
fn configured_env(
    dir: &Scratch,
    db: &Path,
    backend: &str,
    interval: &str,
    json: &str,
) -> Vec<(String, String)> {
    let config = write_config(dir, "relais.json", json);
    agent_env(
        db,
        backend,
        dir.path(),
        &[
            ("SYNC_INTERVAL_SECONDS", interval),
            ("RELAIS_CONFIG", &config),
        ],
    )
}

/// An application database at `path` with `events` events.
fn app_db(path: &Path, events: usize, wal: bool) -> Connection {
    let conn = create_app_db(path, wal).expect("create app db");
    insert_events(&conn, events).expect("insert events");
    conn
}

/// The application database of the power-cut and lost-answer campaigns.
fn fixture(dir: &Scratch, events: usize, media: &[Option<u64>], wal: bool) -> PathBuf {
    let db = dir.join("surveillance.db");
    let conn = app_db(&db, events, wal);
    for m in media {
        insert_media(&conn, *m).expect("insert media");
    }
    db
}

/// 20 media rows, several of several MB (full), or 6 (short).
fn media_sizes(scale: Scale) -> Vec<Option<u64>> {
    match scale {
        Scale::Short => vec![None, Some(5 * KB), Some(100 * KB), Some(MB), Some(3 * MB)],
        Scale::Full => (0..20)
            .map(|i| match i % 5 {
                0 if i == 0 => None,
                0 => Some(5 * KB),
                1 => Some(100 * KB),
                2 => Some(MB),
                3 => Some(3 * MB),
                _ => Some(6 * MB),
            })
            .collect(),
    }
}

/// (rows recorded `success`, rows recorded otherwise) in the state database; (0, 0)
/// while it does not exist.
fn synced_counts(state_db: &Path) -> (u64, u64) {
    let Ok(conn) = Connection::open_with_flags(state_db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return (0, 0);
    };
    let _ = conn.busy_timeout(Duration::from_secs(2));
    conn.query_row(
        "SELECT count(*) FILTER (WHERE sync_status = 'success'), count(*) FILTER (WHERE sync_status != 'success') FROM sync_tracking",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap_or((0, 0))
}

/// Waits up to `timeout` for the state database to track `expected` rows `success` and
/// none otherwise.
fn wait_synced(dir: &Scratch, expected: u64, timeout: Duration) -> bool {
    wait_for(timeout, || synced_counts(&dir.state_db()) == (expected, 0))
}

/// Rows of the application database (events and media).
fn app_rows(db: &Path) -> u64 {
    let conn = Connection::open(db).expect("open app db");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT (SELECT count(*) FROM evenement) + (SELECT count(*) FROM media)",
        [],
        |r| r.get::<_, i64>(0),
    )
    .expect("count app rows") as u64
}

/// Checks the agent's state: every row tracked `success`, and the state database intact.
fn check_state(line: &mut Line, dir: &Scratch, expected: u64) {
    let (ok, other) = synced_counts(&dir.state_db());
    line.check(ok == expected && other == 0, || {
        format!("tracking: {ok} success, {other} not, {expected} expected")
    });
    let integrity = integrity(&dir.state_db());
    line.check(integrity == "ok", || {
        format!("state database integrity_check: {integrity}")
    });
}

/// A child agent whose stderr lines are collected as they come.
struct Tail {
    agent: Agent,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Tail {
    fn spawn(args: &[&str], vars: &[(String, String)]) -> Tail {
        let mut cmd = relais_command(args, vars);
        cmd.stdout(Stdio::null());
        let mut agent = Agent(cmd.spawn().expect("spawn relais"));
        let stderr = agent.0.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Tail { agent, lines }
    }

    /// `f` of the lines collected so far.
    fn with_lines<R>(&self, f: impl FnOnce(&[String]) -> R) -> R {
        f(&self.lines.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.with_lines(|lines| lines.iter().filter(|l| pred(l)).count())
    }

    fn find(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.with_lines(|lines| lines.iter().find(|l| pred(l)).cloned())
    }

    fn text(&self) -> String {
        self.with_lines(|lines| lines.join("\n"))
    }

    /// Waits up to `timeout` for `min` lines that `pred` accepts.
    fn wait_count(&self, timeout: Duration, min: usize, pred: impl Fn(&str) -> bool) -> bool {
        wait_for(timeout, || self.count(&pred) >= min)
    }

    /// The last `n` lines, newest first.
    fn last_lines(&self, n: usize) -> String {
        self.text()
            .lines()
            .rev()
            .take(n)
            .collect::<Vec<_>>()
            .join(" / ")
    }

    /// Notes the message of the first line `pred` accepts, if any, as `label: "..."`.
    fn note_first(&self, line: &mut Line, label: &str, pred: impl Fn(&str) -> bool) {
        if let Some(l) = self.find(pred) {
            line.note(format!("{label}: {:?}", message(&l)));
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.agent.0.try_wait(), Ok(None))
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        if self.alive() {
            send_signal(self.agent.0.id(), "TERM");
        }
        wait_exit(&mut self.agent.0, Duration::from_secs(10))
    }

    /// [`Tail::stop`], and a problem on `line` unless the agent exited 0.
    fn stop_checked(&mut self, line: &mut Line) {
        let status = self.stop();
        line.check(status.success(), || format!("agent exited {status:?}"));
    }
}

/// A log line without its leading timestamp.
fn message(l: &str) -> &str {
    l.split_once(' ').map_or(l, |x| x.1)
}

/// Whether the lead has wired the configuration pull into `relais run` yet.
fn pull_wired() -> bool {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/daemon.rs"))
        .is_ok_and(|s| s.contains("pull::"))
}

const SITE_TOKEN: &str = "torture-site-token";
const SITE_CONFIG: &str = r#"{"site_name": "Site Torture", "timezone": "Europe/Paris", "doubt_after_days": 2,
 "reporting": {"ok_interval_s": 300, "ko_interval_s": 60}, "devices": []}"#;

/// A mounted filesystem, unmounted when dropped (tests run as root here).
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir,
        )?;
        Ok(Mount(dir.to_path_buf()))
    }

    fn read_only(&self, ro: bool) -> Result<(), String> {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        mount(&["-o", opt], &self.0)
    }
}

/// A tmpfs of `size` at `dir`; `None`, noted on `line`, where it cannot be mounted
/// (`what` is then not run).
fn tmpfs_or_skip(line: &mut Line, dir: &Path, size: &str, what: &str) -> Option<Mount> {
    Mount::tmpfs(dir, size)
        .map_err(|e| line.note(format!("{what} not run: {e}")))
        .ok()
}

fn mount(args: &[&str], dir: &Path) -> Result<(), String> {
    let out = std::process::Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount {args:?} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem holding `dir` with a file until no space is left.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    let block = vec![0xa5u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    // Small writes to take the last partial block too.
    while f.write_all(&block[..512]).is_ok() {}
    let _ = f.flush();
    path
}

// ---------------------------------------------------------------- 1 and 3. power cut

fn power_cut_campaign(scale: Scale, idempotency: bool) -> Line {
    let (mut line, mut rng, dir) = campaign(
        idempotency,
        (
            "1. power cut (SIGKILL)",
            "3. power cut, backend without idempotency",
        ),
        ("cut", "cut-noidem"),
    );
    let db = fixture(
        &dir,
        scale.pick(300, 2000),
        &media_sizes(scale),
        rng.unit() < 0.5,
    );
    let (rx, proxy) = proxied_receiver(&dir, idempotency);
    // Paced so that uploads last long enough to be cut: the agent is busy for a good
    // share of each trial.
    proxy.set_rate(scale.pick(4, 8) * MB);
    let wired = pull_wired();
    // Campaign 1 checks the configuration file; campaign 3 only counts duplicates.
    let check_config = wired && idempotency;
    let agent_config = dir.join("agent-config.json");
    let mut extra: Vec<(&str, String)> = vec![("SYNC_INTERVAL_SECONDS", "0.3".into())];
    if wired {
        rx.set_config(SITE_TOKEN, SITE_CONFIG).expect("set config");
        extra.push(("SITE_TOKEN", SITE_TOKEN.into()));
        extra.push(("AGENT_CONFIG", agent_config.display().to_string()));
        extra.push(("CONFIG_SYNC_INTERVAL_MIN", "0.01".into()));
    } else {
        line.note("configuration check skipped: the pull is not wired into `relais run` yet");
    }
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let vars = agent_env(&db, &proxy.url(), dir.path(), &extra);
    // The application keeps inserting: an event every 10 ms, a 512 KiB media row
    // every 200 inserts.
    let writer = AppWriter::start(
        &db,
        Duration::from_millis(10),
        Duration::from_millis(100),
        Some((200, 512 * KB)),
    );
    let kills = scale.pick(15, 200);
    let mut bad_configs = Vec::new();
    let mut long_trials = 0;
    for trial in 0..kills {
        let mut cmd = relais_command(&["run"], &vars);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut agent = Agent(cmd.spawn().expect("spawn relais"));
        // The fault schedule, not synchronisation: a power cut at a random instant.
        // With the pull wired, one trial in ten (twenty, full) outlives its first pull (10 s after
        // start), so cuts also land while the configuration is being written.
        let life = if check_config && trial % scale.pick(10, 20) == 5 {
            long_trials += 1;
            rng.range(10_000, 12_000)
        } else {
            rng.range(20, scale.pick(1200, 2500))
        };
        std::thread::sleep(Duration::from_millis(life));
        power_cut(&mut agent);
        if agent_config.exists() {
            let text = std::fs::read_to_string(&agent_config).unwrap_or_default();
            if !matches!(
                miniserde::json::from_str::<miniserde::json::Value>(&text),
                Ok(miniserde::json::Value::Object(_))
            ) {
                bad_configs.push(format!("after trial {trial}: {text:?}"));
            }
        }
        let integrity = integrity(&dir.state_db());
        if integrity != "ok" && dir.state_db().exists() {
            line.problems
                .push(format!("state integrity after cut {trial}: {integrity}"));
        }
    }
    let (inserts, failed, errors) = writer.finish();
    line.trials = kills;
    line.note(format!(
        "{kills} cuts; application inserted {inserts} rows during them ({failed} failed)"
    ));
    line.check(failed == 0, || {
        format!("application inserts failed: {errors:?}")
    });
    line.check(bad_configs.is_empty(), || {
        format!("configuration file did not parse: {bad_configs:?}")
    });
    if check_config {
        line.check(agent_config.exists(), || {
            format!("no configuration file after {long_trials} long trials")
        });
    }
    // Power back for good: the agent finishes the job.
    let expected = app_rows(&db);
    let mut tail = Tail::spawn(&["run"], &vars);
    let done = wait_synced(&dir, expected, Duration::from_secs(scale.pick(120, 300)));
    let status = tail.stop();
    line.check(done, || {
        format!(
            "not everything synced after the last restart: {:?}; log tail: {}",
            synced_counts(&dir.state_db()),
            tail.last_lines(5)
        )
    });
    line.check(status.success(), || {
        format!("final agent exited {status:?}")
    });
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    line.delivery(&d);
    check_state(&mut line, &dir, expected);
    let stats = proxy.stats();
    line.note(format!(
        "{} rows re-sent; receiver replays {}",
        stats.resent,
        rx.stats().replays
    ));
    if !idempotency {
        // At most the row in flight plus one group of acknowledgements per cut.
        line.allowed_duplicates = kills * (ACK_GROUP + 1);
    }
    line
}

// ---------------------------------------------------------------- 2 and 3. lost answers

fn lost_answers_campaign(scale: Scale, idempotency: bool) -> Line {
    let (mut line, mut rng, dir) = campaign(
        idempotency,
        (
            "2. lost answers (10%)",
            "3. lost answers, backend without idempotency",
        ),
        ("lost", "lost-noidem"),
    );
    let db = fixture(
        &dir,
        scale.pick(200, 2000),
        &media_sizes(scale)[..scale.pick(4, 20)],
        false,
    );
    let (rx, proxy) = proxied_receiver(&dir, idempotency);
    proxy.set_policy(move |req| {
        if req.method == "POST" && rng.unit() < 0.10 {
            ProxyFault::LoseAnswer
        } else {
            ProxyFault::Pass
        }
    });
    let vars = configured_env(
        &dir,
        &db,
        &proxy.url(),
        "3600",
        r#"{"retry": {"initial_backoff_s": 0.02, "max_backoff_s": 0.1}}"#,
    );
    let expected = app_rows(&db);
    let mut tail = Tail::spawn(&["run"], &vars);
    let done = wait_synced(&dir, expected, Duration::from_secs(scale.pick(90, 400)));
    let status = tail.stop();
    line.check(done, || {
        format!(
            "not everything synced: {:?}",
            synced_counts(&dir.state_db())
        )
    });
    if std::env::var_os("TORTURE_DEBUG").is_some() {
        println!("{}", tail.text());
    }
    line.check(status.success(), || format!("agent exited {status:?}"));
    let stats = proxy.stats();
    line.trials = stats.requests;
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    line.delivery(&d);
    check_state(&mut line, &dir, expected);
    line.note(format!(
        "{} answers dropped, {} rows re-sent, receiver replays {}",
        stats.answers_lost,
        stats.resent,
        rx.stats().replays
    ));
    // Every dropped answer is one row sent again, no more: the agent resends nothing
    // it had recorded.
    line.check(stats.resent == stats.answers_lost, || {
        format!(
            "{} rows re-sent for {} dropped answers",
            stats.resent, stats.answers_lost
        )
    });
    if idempotency {
        line.check(rx.stats().replays == stats.answers_lost, || {
            format!("receiver replays {} != dropped answers", rx.stats().replays)
        });
    } else {
        // Exactly one duplicate per dropped answer: the at-least-once price.
        line.allowed_duplicates = stats.answers_lost;
        line.check(d.duplicates == stats.answers_lost, || {
            format!(
                "{} duplicates for {} dropped answers",
                d.duplicates, stats.answers_lost
            )
        });
    }
    line
}

// ---------------------------------------------------------------- 4. sick backend

fn sick_backend_campaign(scale: Scale) -> Line {
    let mut line = Line::new("4. sick backend");
    let dir = Scratch::new("sick");
    let db = fixture(
        &dir,
        scale.pick(100, 1000),
        &[Some(2 * MB), Some(MB), Some(300 * KB), Some(4 * MB)],
        false,
    );
    let (rx, proxy) = proxied_receiver(&dir, true);
    // Each fault of the list hits one event request and one media request, with
    // healthy requests between them.
    let faults = vec![
        ProxyFault::DelayAnswer(Duration::from_secs(3)),
        ProxyFault::Status(500, Some(1)),
        ProxyFault::Status(503, Some(1)),
        ProxyFault::Status(429, Some(1)),
        ProxyFault::ResetMidBody,
        ProxyFault::HalfAnswer,
        ProxyFault::HtmlCreated,
        ProxyFault::NeverAnswer,
        ProxyFault::Refuse,
        ProxyFault::LoseAnswer,
    ];
    let rounds = scale.pick(1, 2);
    let (mut events_q, mut media_q) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        events_q.extend(faults.iter().cloned());
        // The short version spares the media the faults that only cost waiting time.
        media_q.extend(
            faults
                .iter()
                .filter(|f| {
                    scale == Scale::Full
                        || !matches!(
                            f,
                            ProxyFault::DelayAnswer(_)
                                | ProxyFault::NeverAnswer
                                | ProxyFault::Status(..)
                        )
                })
                .cloned(),
        );
    }
    let to_inject = events_q.len() + media_q.len();
    let injected = Arc::new(Mutex::new((
        events_q.into_iter(),
        media_q.into_iter(),
        0u64,
    )));
    let inj = injected.clone();
    // Requests seen per endpoint: events and media go on lanes of their own, so the
    // order of the two kinds in the proxy's sequence is the scheduler's.
    let mut seen = (0u64, 0u64);
    proxy.set_policy(move |req| {
        let mut q = inj.lock().unwrap_or_else(|p| p.into_inner());
        if req.method != "POST" {
            return ProxyFault::Pass;
        }
        let media = req.path.ends_with("/media");
        let n = if media { &mut seen.1 } else { &mut seen.0 };
        *n += 1;
        // A fault on every third request of each kind: the agent makes progress between.
        if *n % 3 != 1 {
            return ProxyFault::Pass;
        }
        let next = if media { q.1.next() } else { q.0.next() };
        match next {
            Some(f) => {
                q.2 += 1;
                f
            }
            None => ProxyFault::Pass,
        }
    });
    let vars = configured_env(&dir, &db, &proxy.url(), "0.5", SICK_CONFIG);
    let writer = AppWriter::start(
        &db,
        Duration::from_millis(50),
        Duration::from_millis(100),
        Some((100, 256 * KB)),
    );
    let mut tail = Tail::spawn(&["run"], &vars);
    let all_injected = wait_for(Duration::from_secs(scale.pick(120, 300)), || {
        let q = injected.lock().unwrap_or_else(|p| p.into_inner());
        q.2 as usize >= to_inject
    });
    line.check(all_injected, || {
        format!(
            "only {} faults injected",
            injected.lock().unwrap_or_else(|p| p.into_inner()).2
        )
    });
    // The backend goes down, refusing then never answering: the agent must wait, not spin.
    let down = Duration::from_secs(scale.pick(3, 20));
    let pid = tail.agent.0.id();
    for (fault, label) in [
        (ProxyFault::Refuse, "connections reset"),
        (ProxyFault::NeverAnswer, "never answers"),
    ] {
        let f = fault.clone();
        proxy.set_policy(move |_| f.clone());
        // Let a request in flight from the earlier phase end (the response timeout is
        // 2 s) before measuring.
        std::thread::sleep(Duration::from_millis(2500));
        let (cpu0, t0) = (cpu_time(pid).unwrap_or_default(), Instant::now());
        let requests0 = proxy.stats().requests;
        std::thread::sleep(down);
        let cpu = cpu_time(pid).unwrap_or_default().saturating_sub(cpu0);
        let wall = t0.elapsed();
        let attempts = proxy.stats().requests - requests0;
        line.note(format!(
            "backend down ({label}) {:.0} s: agent CPU {} ms ({:.2}%), {attempts} attempts",
            wall.as_secs_f64(),
            cpu.as_millis(),
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
        ));
        line.check(cpu.as_secs_f64() < 0.02 * wall.as_secs_f64() + 0.05, || {
            format!("CPU {cpu:?} over {wall:?} while the backend was down ({label})")
        });
        line.check((1..=(wall.as_secs() * 10)).contains(&attempts), || {
            format!("{attempts} attempts in {wall:?} while the backend was down")
        });
    }
    proxy.set_policy(|_| ProxyFault::Pass);
    let recovered = Instant::now();
    let (inserts, failed, errors) = writer.finish();
    let expected = app_rows(&db);
    let caught_up = wait_synced(&dir, expected, Duration::from_secs(60));
    line.check(caught_up, || {
        format!(
            "did not catch up after recovery: {:?} of {expected}",
            synced_counts(&dir.state_db())
        )
    });
    line.note(format!(
        "caught up {:.1} s after recovery",
        recovered.elapsed().as_secs_f64()
    ));
    tail.stop_checked(&mut line);
    line.check(failed == 0, || {
        format!("application inserts failed: {errors:?}")
    });
    line.note(format!("{inserts} application inserts meanwhile"));
    let stats = proxy.stats();
    line.trials = injected.lock().unwrap_or_else(|p| p.into_inner()).2;
    line.note(format!(
        "{} faults injected, {} rows re-sent, receiver replays {}",
        line.trials,
        stats.resent,
        rx.stats().replays
    ));
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    line.delivery(&d);
    check_state(&mut line, &dir, expected);
    if !line.problems.is_empty() {
        line.note(format!("agent log tail: {}", tail.last_lines(8)));
    }
    line
}

// ---------------------------------------------------------------- 5. the application keeps working

fn application_campaign(scale: Scale, wal: bool) -> Line {
    let mode = if wal { "WAL" } else { "rollback journal" };
    let mut line = Line::new(&format!("5. application keeps working, {mode}"));
    let dir = Scratch::new(if wal { "app-wal" } else { "app-rollback" });
    let blob = scale.pick(8 * MB, 50 * MB);
    let db = fixture(&dir, 10, &[Some(blob)], wal);
    let (rx, proxy) = proxied_receiver(&dir, true);
    proxy.set_rate(scale.pick(4 * MB, MB));
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let writer = AppWriter::start(
        &db,
        Duration::from_millis(10),
        Duration::from_millis(100),
        None,
    );
    let began = Instant::now();
    let out = run_relais(&["once"], &vars, Duration::from_secs(scale.pick(120, 300)));
    let took = began.elapsed();
    let (inserts, failed, errors) = writer.finish();
    line.trials = inserts + failed;
    line.check(out.status.code() == Some(0), || {
        format!(
            "relais once exited {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    line.check(failed == 0, || {
        format!("{failed} application inserts failed: {errors:?}")
    });
    line.note(format!(
        "{} MiB media over {} MiB/s in {:.0} s; {inserts} inserts, {failed} failed",
        blob / MB,
        scale.pick(4, 1),
        took.as_secs_f64()
    ));
    // The events inserted during the upload go in a second pass.
    let out = run_relais(&["once"], &vars, Duration::from_secs(60));
    line.check(out.status.code() == Some(0), || {
        format!("second pass exited {:?}", out.status)
    });
    let expected = app_rows(&db);
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    line.delivery(&d);
    check_state(&mut line, &dir, expected);
    line
}

// ---------------------------------------------------------------- 6. hostile input

/// Receiver rows of one file of a glob source, with keys as for a single source.
fn rows_of(rows: &[ReceivedRow], file: &str) -> Vec<ReceivedRow> {
    rows.iter()
        .filter_map(|r| {
            let key = r.idempotency_key.as_deref()?;
            let (table_part, id) = key.rsplit_once(':')?;
            let (table, source) = table_part.split_once('@')?;
            (source == file).then(|| ReceivedRow {
                idempotency_key: Some(format!("{table}:{id}")),
                ..r.clone()
            })
        })
        .collect()
}

/// Bad files next to a good one (a glob source): a file that is not SQLite, a truncated
/// database, NULLs where the payload expects values, text that is not UTF-8.
fn hostile_files(line: &mut Line) {
    let dir = Scratch::new("hostile-files");
    let src = dir.join("data");
    std::fs::create_dir_all(&src).unwrap();
    // The good one, with a sensor name that is not UTF-8 and an event whose sensor is
    // unknown (NULL name and state in the payload).
    let good = src.join("good.db");
    let conn = app_db(&good, 300, false);
    insert_media(&conn, Some(700 * KB)).unwrap();
    insert_media(&conn, None).unwrap();
    conn.execute_batch(
        "PRAGMA foreign_keys = OFF;
         UPDATE capteur SET nom = CAST(x'504952ff20456e74' AS TEXT) WHERE id_capteur = 1;
         INSERT INTO evenement (date, id_capteur) VALUES ('2025-12-18T18:00:00.000000', 99);
         INSERT INTO media (date, id_capteur, numero_camera, video) VALUES ('2025-12-18T18:00:00.000000', 99, NULL, x'00ff');",
    )
    .unwrap();
    drop(conn);
    // An application with a looser schema: NULL date and sensor.
    let nulls = src.join("nulls.db");
    Connection::open(&nulls)
        .unwrap()
        .execute_batch(
            "CREATE TABLE capteur (id_capteur INTEGER PRIMARY KEY, nom TEXT, type TEXT, etat INTEGER);
             CREATE TABLE evenement (id_evenement INTEGER PRIMARY KEY AUTOINCREMENT, date TEXT, id_capteur INTEGER);
             CREATE TABLE media (id_media INTEGER PRIMARY KEY AUTOINCREMENT, date TEXT, id_capteur INTEGER, numero_camera INTEGER, video BLOB);
             INSERT INTO evenement (date, id_capteur) VALUES (NULL, NULL), (NULL, 1);
             INSERT INTO media (date, id_capteur, numero_camera, video) VALUES (NULL, NULL, NULL, NULL);",
        )
        .unwrap();
    std::fs::write(src.join("junk.db"), vec![b'x'; 8192]).unwrap();
    // A database cut in the middle, as a torn copy or a full SD card leaves it.
    let truncated = src.join("truncated.db");
    let conn = app_db(&truncated, 3000, false);
    drop(conn);
    let size = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(size / 2)
        .unwrap();

    let rx = receiver(&dir, true);
    let pattern = src.join("*.db").display().to_string();
    let vars = agent_env(
        Path::new(&pattern),
        &rx.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "0.3")],
    );
    let mut tail = Tail::spawn(&["run"], &vars);
    let good_rows = app_rows(&good);
    let arrived = wait_for(Duration::from_secs(60), || {
        rows_of(&rx.rows(), "good.db").len() as u64 >= good_rows
            && tail.count(|l| l.contains("sync report")) >= 3
    });
    let alive = tail.alive();
    let status = tail.stop();
    line.check(arrived && alive, || {
        format!(
            "good rows did not all arrive (alive {alive}): {}",
            tail.text()
        )
    });
    line.check(status.success(), || format!("agent exited {status:?}"));
    let rows = rx.rows();
    let d = check_delivery(&good, &rows_of(&rows, "good.db"), DEVICE).expect("delivery");
    line.add_counts(&d);
    line.problems.extend(d.mismatched.iter().cloned());
    // Each cause named on a line of its own.
    let passes = tail.count(|l| l.contains("sync report"));
    for (file, cause, what) in [
        ("junk.db", "not an SQLite database", "not SQLite"),
        ("truncated.db", "malformed", "truncated"),
        ("good.db", "UTF-8", "not UTF-8"),
    ] {
        let found = tail.find(|l| l.contains(file) && l.contains(cause));
        line.check(found.is_some(), || {
            format!("no log line names {file} and {cause:?}")
        });
        if let Some(l) = found {
            line.note(format!("{what}: {:?}", message(&l)));
        }
    }
    let junk_lines = tail.count(|l| l.contains("junk.db"));
    line.check(junk_lines <= passes + 1, || {
        format!("{junk_lines} lines about junk.db in {passes} passes")
    });
    // The NULLs travel as JSON nulls; relais-server, like the seed's backend, refuses a
    // null `date` (422 naming it), and the agent records each row failed with that reason.
    let nulls_rows = rows_of(&rows, "nulls.db");
    let refused: Vec<_> = common::tracking_rows(&dir.state_db())
        .into_iter()
        .filter(|r| r.source.ends_with("nulls.db"))
        .collect();
    let named = refused
        .iter()
        .filter(|r| r.status == "failed" && r.error.as_deref().is_some_and(|e| e.contains("date")))
        .count();
    line.check(nulls_rows.is_empty() && named == 3, || {
        format!("NULL rows: stored {nulls_rows:?}, tracked {refused:?}")
    });
    let truncated_sent = rows_of(&rows, "truncated.db").len();
    line.note(format!(
        "truncated.db: {truncated_sent} readable rows of 3000 sent"
    ));
    line.trials += 4;
}

/// Event rows among the receiver's.
fn events_received(rows: &[ReceivedRow]) -> usize {
    rows.iter().filter(|r| r.endpoint == "evenements").count()
}

/// The application drops a table while relais is reading it (seed 004): mid-upload of
/// a media row, and between passes for the events.
fn dropped_table(line: &mut Line) {
    let dir = Scratch::new("dropped");
    let db = fixture(&dir, 200, &[Some(8 * MB)], false);
    let (rx, proxy) = proxied_receiver(&dir, true);
    proxy.set_rate(4 * MB);
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "0.3")],
    );
    let mut tail = Tail::spawn(&["run"], &vars);
    let started = wait_for(Duration::from_secs(60), || {
        proxy
            .stats()
            .keys
            .contains_key(&format!("{DEVICE}:media:1"))
    });
    line.check(started, || "the media upload did not start".into());
    let app = Connection::open(&db).unwrap();
    app.busy_timeout(Duration::from_secs(10)).unwrap();
    app.execute_batch("DROP TABLE media").unwrap();
    let noticed = tail.wait_count(Duration::from_secs(30), 1, |l| {
        l.contains("media") && l.contains("no such table")
    });
    line.check(noticed, || {
        format!("no log line names the dropped table: {}", tail.text())
    });
    // The other table keeps going.
    insert_events(&app, 5).unwrap();
    let flowing = wait_for(Duration::from_secs(30), || {
        events_received(&rx.rows()) >= 205
    });
    line.check(flowing, || {
        "events stopped flowing after media was dropped".into()
    });
    // Then the events' table, between passes.
    app.execute_batch("DROP TABLE evenement").unwrap();
    let noticed = tail.wait_count(Duration::from_secs(30), 1, |l| {
        l.contains("evenement") && l.contains("no such table")
    });
    line.check(noticed, || {
        format!(
            "no log line names the dropped events table: {}",
            tail.text()
        )
    });
    let alive = tail.alive();
    line.check(alive, || format!("the agent died: {}", tail.text()));
    // The application restores its tables, ids continuing (a table recreated with ids
    // starting from 1 again is the README's known limit): new rows flow again.
    app.execute_batch(relais::demo::SCHEMA).unwrap();
    app.execute_batch(
        "INSERT INTO evenement (id_evenement, date, id_capteur) VALUES (206, '2025-12-19T08:00:00.000000', 1);
         INSERT INTO evenement (date, id_capteur) VALUES ('2025-12-19T08:00:01.000000', 1);",
    )
    .unwrap();
    let resumed = wait_for(Duration::from_secs(30), || {
        events_received(&rx.rows()) >= 207
    });
    line.check(resumed, || {
        "rows did not flow again after the table came back".into()
    });
    tail.stop_checked(line);
    let rows = rx.rows();
    let events = events_received(&rows) as u64;
    line.expected += 207;
    line.received += events;
    let keys: std::collections::HashSet<_> = rows
        .iter()
        .filter_map(|r| r.idempotency_key.clone())
        .collect();
    line.duplicates += rows.len() as u64 - keys.len() as u64;
    // The first 200 events were recorded success before the drop: still so.
    let tracked = common::tracking_rows(&dir.state_db());
    let first_ok = tracked
        .iter()
        .filter(|r| r.table == "evenement" && r.status == "success")
        .count();
    line.check(first_ok >= 200, || {
        format!("only {first_ok} event rows still recorded success")
    });
    tail.note_first(line, "dropped table", |l| {
        l.contains("media") && l.contains("no such table")
    });
    line.trials += 2;
}

/// A BLOB of 1 GB (full) or 64 MB (short), in bounded memory.
fn huge_blob(line: &mut Line, scale: Scale) {
    let dir = Scratch::new("huge");
    // "1 GB": 999,000,000 bytes, just under SQLite's own limit on a value (SQLITE_MAX_LENGTH,
    // 10^9 bytes), so that no application can store a larger one.
    let size = scale.pick(64 * MB, 999_000_000);
    let began = Instant::now();
    let db = fixture(&dir, 3, &[Some(size)], true);
    let built = began.elapsed();
    let rx = receiver(&dir, true);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let mut cmd = relais_command(&["once"], &vars);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut agent = Agent(cmd.spawn().expect("spawn"));
    let pid = agent.0.id();
    let mut hwm = 0;
    let t0 = Instant::now();
    let exited = wait_for(Duration::from_secs(scale.pick(120, 900)), || {
        hwm = hwm.max(vm_hwm_kib(pid).unwrap_or(0));
        !matches!(agent.0.try_wait(), Ok(None))
    });
    let status = wait_exit(&mut agent.0, Duration::from_secs(5));
    line.check(exited && status.success(), || {
        format!("relais once on a {} MiB BLOB: {status:?}", size / MB)
    });
    line.check(hwm < 32 * 1024, || format!("peak RSS {hwm} KiB"));
    line.note(format!(
        "{} MB BLOB (built in {:.0} s) uploaded in {:.0} s, agent peak RSS {:.1} MiB",
        size / 1_000_000,
        built.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        hwm as f64 / 1024.0
    ));
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery");
    line.add_counts(&d);
    line.problems.extend(d.mismatched.iter().cloned());
    line.trials += 1;
}

/// The disk holding the state database fills up mid-run, then space comes back.
fn state_disk_full(line: &mut Line) {
    let dir = Scratch::new("state-full");
    // 4 MiB: room for the tracking rows of the 5,000 events and a bounded WAL, not for
    // SQLite's default 4 MiB WAL on top.
    let Some(mnt) = tmpfs_or_skip(line, &dir.join("state"), "4m", "disk full (state)") else {
        return;
    };
    let db = fixture(&dir, 50, &[], false);
    let rx = receiver(&dir, true);
    let vars = configured_env(&dir, &db, &rx.url(), "0.3", SICK_CONFIG);
    let mut tail = Tail::spawn(&["run"], &vars);
    line.check(wait_synced(&dir, 50, Duration::from_secs(30)), || {
        "first rows not synced".into()
    });
    let filler = fill(&mnt.0);
    let app = Connection::open(&db).unwrap();
    insert_events(&app, 5000).unwrap();
    insert_media(&app, Some(MB)).unwrap();
    let noticed = tail.wait_count(Duration::from_secs(30), 1, |l| {
        l.contains("state database") && l.contains("full")
    });
    line.check(noticed, || {
        format!("no log line says the disk is full: {}", tail.text())
    });
    tail.note_first(line, "state disk full", |l| {
        l.contains("state database") && l.contains("full")
    });
    status_reads_backlog(line, &vars, "state disk full", "rows not read yet");
    let alive = tail.alive();
    line.check(alive, || format!("the agent died: {}", tail.text()));
    std::fs::remove_file(&filler).unwrap();
    let expected = app_rows(&db);
    let healed = wait_synced(&dir, expected, Duration::from_secs(60));
    line.check(healed, || {
        format!(
            "not synced after space came back: {:?} of {expected}; state dir {:?}; log: {}",
            synced_counts(&dir.state_db()),
            std::fs::read_dir(&mnt.0)
                .map(|d| d
                    .filter_map(Result::ok)
                    .map(|e| (e.file_name(), e.metadata().map(|m| m.len()).unwrap_or(0)))
                    .collect::<Vec<_>>())
                .unwrap_or_default(),
            tail.last_lines(12)
        )
    });
    tail.stop_checked(line);
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery");
    line.add_counts(&d);
    line.problems.extend(d.mismatched.iter().cloned());
    let integrity = integrity(&dir.state_db());
    line.check(integrity == "ok", || {
        format!("state integrity: {integrity}")
    });
    line.note(format!(
        "receiver replays after disk full: {}",
        rx.stats().replays
    ));
    line.trials += 1;
}

/// `relais status` works on a state it cannot write, and counts the rows no pass has
/// read yet, which the tracking alone cannot see.
fn status_reads_backlog(line: &mut Line, vars: &[(String, String)], what: &str, expected: &str) {
    let out = run_relais(&["status"], vars, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    line.check(out.status.success() && text.contains(expected), || {
        format!(
            "{what}: status failed or did not say {expected:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if let Some(backlog) = text.lines().find(|l| l.starts_with("backlog:")) {
        line.note(format!("{what}: {backlog}"));
    }
}

/// The disk holding the log file is full: the agent goes on pushing, and logs again
/// to the file once space comes back.
fn log_disk_full(line: &mut Line) {
    let dir = Scratch::new("log-full");
    let Some(mnt) = tmpfs_or_skip(line, &dir.join("log"), "1m", "disk full (log)") else {
        return;
    };
    let filler = fill(&mnt.0);
    let db = fixture(&dir, 30, &[Some(100 * KB)], false);
    let rx = receiver(&dir, true);
    let vars = configured_env(&dir, &db, &rx.url(), "0.2", r#"{"log_max_bytes": 65536}"#);
    let mut tail = Tail::spawn(&["run"], &vars);
    let pushed = wait_synced(&dir, 31, Duration::from_secs(30));
    line.check(pushed, || "rows not pushed with a full log disk".into());
    let noticed = tail.wait_count(Duration::from_secs(10), 1, |l| {
        l.contains("log file") && l.contains("No space left")
    });
    line.check(noticed, || {
        format!("no line about the full log disk: {}", tail.text())
    });
    line.check(
        tail.count(|l| l.contains("log file") && l.contains("No space left")) <= 2,
        || "the full log disk is reported on every line".into(),
    );
    if let Some(l) = tail.find(|l| l.contains("log file") && l.contains("No space left")) {
        line.note(format!("log disk full: {l:?}"));
    }
    std::fs::remove_file(&filler).unwrap();
    insert_events(&Connection::open(&db).unwrap(), 3).unwrap();
    let log_file = mnt.0.join(relais::logging::LOG_FILE_NAME);
    let resumed = wait_for(Duration::from_secs(30), || {
        std::fs::read_to_string(&log_file).is_ok_and(|t| t.contains("sync report"))
    });
    line.check(resumed, || {
        "the log file never got lines again after space came back".into()
    });
    // A pass's line is not the pass that read the three new rows: stopping at the first
    // line raced the agent (3 rows "lost" on a loaded CI machine).
    let all = wait_synced(&dir, 34, Duration::from_secs(30));
    line.check(all, || {
        "the rows written after space came back not pushed".into()
    });
    tail.stop_checked(line);
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery");
    line.add_counts(&d);
    line.trials += 1;
}

/// The state directory is not writable at start, then becomes read-only mid-run.
fn state_read_only(line: &mut Line) {
    let dir = Scratch::new("state-ro");
    let Some(mnt) = tmpfs_or_skip(line, &dir.join("state"), "8m", "read-only state") else {
        return;
    };
    if let Err(e) = mnt.read_only(true) {
        line.note(format!("read-only state not run: {e}"));
        return;
    }
    let db = fixture(&dir, 40, &[], false);
    let rx = receiver(&dir, true);
    let vars = configured_env(
        &dir,
        &db,
        &rx.url(),
        "0.3",
        r#"{"retry": {"initial_backoff_s": 0.2, "max_backoff_s": 0.5}}"#,
    );
    let mut tail = Tail::spawn(&["run"], &vars);
    let noticed = tail.wait_count(Duration::from_secs(20), 2, |l| l.contains("state database"));
    line.check(noticed, || {
        format!("no line about the state directory: {}", tail.text())
    });
    tail.note_first(line, "read-only state", |l| l.contains("state database"));
    line.check(rx.stats().requests == 0, || {
        "rows sent while nothing could be recorded".into()
    });
    mnt.read_only(false).unwrap();
    line.check(wait_synced(&dir, 40, Duration::from_secs(30)), || {
        "did not heal once the state directory was writable".into()
    });
    // Not writable again, for an agent starting with a state database already there
    // (a remount while the database is open is refused: "mount point is busy").
    tail.stop_checked(line);
    mnt.read_only(true).unwrap();
    insert_events(&Connection::open(&db).unwrap(), 20).unwrap();
    let mut tail = Tail::spawn(&["run"], &vars);
    let noticed = tail.wait_count(Duration::from_secs(20), 1, |l| l.contains("state database"));
    line.check(noticed, || {
        format!(
            "no line when the existing state was read-only: {}",
            tail.text()
        )
    });
    tail.note_first(line, "read-only existing state", |l| {
        l.contains("state database")
    });
    status_reads_backlog(line, &vars, "read-only state", "20 rows not read yet");
    line.check(rx.stats().requests == 40, || {
        format!(
            "{} requests: rows sent while nothing could be recorded",
            rx.stats().requests
        )
    });
    mnt.read_only(false).unwrap();
    line.check(wait_synced(&dir, 60, Duration::from_secs(30)), || {
        "did not heal the second time".into()
    });
    tail.stop_checked(line);
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery");
    line.add_counts(&d);
    line.check(integrity(&dir.state_db()) == "ok", || {
        "state integrity".into()
    });
    line.trials += 2;
}

/// A configuration file with the wrong types: one line naming the setting, exit 2
/// before anything is touched; the recorded state survives and the fixed file works.
fn wrong_types(line: &mut Line) {
    let dir = Scratch::new("wrong-types");
    let db = fixture(&dir, 20, &[], false);
    let rx = receiver(&dir, true);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let out = run_relais(&["once"], &vars, Duration::from_secs(30));
    line.check(out.status.code() == Some(0), || "first pass".into());
    let before = std::fs::read(dir.state_db()).unwrap_or_default();
    for (json, setting) in [
        (r#"{"http": {"io_timeout_s": "1"}}"#, "http.io_timeout_s"),
        (r#"{"retry": []}"#, "retry"),
        (r#"{"log_max_bytes": true}"#, "log_max_bytes"),
        (r#"{"tables": {"name": "evenement"}}"#, "tables"),
    ] {
        let config = write_config(&dir, "relais.json", json);
        let mut bad = agent_env(&db, &rx.url(), dir.path(), &[("RELAIS_CONFIG", &config)]);
        bad.push(("SYNC_INTERVAL_SECONDS".into(), "0.1".into()));
        let out = run_relais(&["run"], &bad, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        line.check(
            out.status.code() == Some(2) && lines.len() == 1 && lines[0].contains(setting),
            || format!("{json}: exit {:?}, {stderr:?}", out.status),
        );
        line.trials += 1;
    }
    line.note(format!(
        "wrong types: e.g. {:?}",
        String::from_utf8_lossy(
            &run_relais(
                &["run"],
                &agent_env(
                    &db,
                    &rx.url(),
                    dir.path(),
                    &[(
                        "RELAIS_CONFIG",
                        &write_config(&dir, "x.json", r#"{"http": {"io_timeout_s": "1"}}"#)
                    )]
                ),
                Duration::from_secs(10)
            )
            .stderr
        )
        .trim()
    ));
    line.check(
        std::fs::read(dir.state_db()).unwrap_or_default() == before,
        || "the state database changed".into(),
    );
    insert_events(&Connection::open(&db).unwrap(), 2).unwrap();
    let out = run_relais(&["once"], &vars, Duration::from_secs(30));
    line.check(out.status.code() == Some(0), || {
        "pass after fixing the file".into()
    });
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery");
    line.add_counts(&d);
}

fn hostile_campaign(scale: Scale) -> Vec<Line> {
    let began = Instant::now();
    let step = |name: &str, f: &dyn Fn(&mut Line)| {
        let mut l = Line::new(name);
        f(&mut l);
        println!("{name}: {:.1} s", began.elapsed().as_secs_f64());
        l
    };
    vec![
        step(
            "6. hostile files: not SQLite, truncated, NULLs, not UTF-8",
            &hostile_files,
        ),
        step("6. table dropped while read", &dropped_table),
        step(&format!("6. {} BLOB", scale.pick("64 MB", "1 GB")), &|l| {
            huge_blob(l, scale)
        }),
        step("6. disk full: state, then log", &|l| {
            state_disk_full(l);
            log_disk_full(l);
        }),
        step("6. state directory not writable", &state_read_only),
        step("6. configuration file with wrong types", &wrong_types),
    ]
}

// ---------------------------------------------------------------- the log file's cap

fn log_cap_campaign(cycles: usize) -> Line {
    let mut line = Line::new("log file cap (65536 B)");
    let dir = Scratch::new("log-cap");
    let src = dir.join("data");
    std::fs::create_dir_all(&src).unwrap();
    let db = src.join("app.db");
    drop(app_db(&db, 5, false));
    // Errors on every cycle: a junk file among the sources, and a backend that answers 503.
    std::fs::write(src.join("junk.db"), vec![b'x'; 4096]).unwrap();
    let (_rx, proxy) = proxied_receiver(&dir, true);
    proxy.set_policy(|_| ProxyFault::Status(503, None));
    let pattern = src.join("*.db").display().to_string();
    let vars = configured_env(
        &dir,
        Path::new(&pattern),
        &proxy.url(),
        "0.001",
        r#"{"log_max_bytes": 65536, "retry": {"initial_backoff_s": 0.001, "max_backoff_s": 0.002}}"#,
    );
    let log_dir = dir.join("log");
    std::fs::create_dir_all(&log_dir).unwrap();
    let size = || -> u64 {
        ["relais.log", "relais.log.1"]
            .iter()
            .filter_map(|n| std::fs::metadata(log_dir.join(n)).ok())
            .map(|m| m.len())
            .sum()
    };
    let mut tail = Tail::spawn(&["run"], &vars);
    let mut max = 0;
    let done = wait_for(Duration::from_secs(180), || {
        max = max.max(size());
        tail.count(|l| l.contains("sync report")) >= cycles
    });
    let status = tail.stop();
    max = max.max(size());
    let passes = tail.count(|l| l.contains("sync report"));
    line.trials = passes as u64;
    line.check(done, || format!("only {passes} cycles"));
    line.check(status.success(), || format!("agent exited {status:?}"));
    line.check(max <= 65536, || format!("log files reached {max} bytes"));
    line.note(format!(
        "{passes} cycles with errors, largest log total seen {max} B"
    ));
    line.check(
        std::fs::read_to_string(log_dir.join("relais.log"))
            .is_ok_and(|t| t.contains("relais stopping")),
        || "the last lines are in the current file".into(),
    );
    line
}

// ---------------------------------------------------------------- the short versions

#[test]
fn power_cut_short() {
    power_cut_campaign(Scale::Short, true).assert_ok();
}

#[test]
fn lost_answers_short() {
    lost_answers_campaign(Scale::Short, true).assert_ok();
}

#[test]
fn backend_without_idempotency_short() {
    lost_answers_campaign(Scale::Short, false).assert_ok();
}

#[test]
fn sick_backend_short() {
    sick_backend_campaign(Scale::Short).assert_ok();
}

#[test]
fn application_keeps_working_short() {
    application_campaign(Scale::Short, false).assert_ok();
}

#[test]
fn hostile_input_short() {
    let lines = hostile_campaign(Scale::Short);
    println!("{}", table(&lines));
    for l in &lines {
        assert!(l.ok(), "{}: {l:#?}", l.campaign);
    }
}

#[test]
fn log_file_stays_under_its_cap_short() {
    log_cap_campaign(1000).assert_ok();
}

// ---------------------------------------------------------------- the full run

#[test]
#[ignore = "release check: cargo test --release --test torture -- --ignored --nocapture"]
fn torture_full() {
    let began = Instant::now();
    let mut lines = Vec::new();
    let mut run = |l: Line| {
        println!(
            "{} done after {:.0} s: {}\n{}",
            l.campaign,
            began.elapsed().as_secs_f64(),
            if l.ok() { "ok" } else { "FAILED" },
            table(std::slice::from_ref(&l))
        );
        lines.push(l);
    };
    run(power_cut_campaign(Scale::Full, true));
    run(lost_answers_campaign(Scale::Full, true));
    run(power_cut_campaign(Scale::Full, false));
    run(lost_answers_campaign(Scale::Full, false));
    run(sick_backend_campaign(Scale::Full));
    run(application_campaign(Scale::Full, false));
    run(application_campaign(Scale::Full, true));
    for l in hostile_campaign(Scale::Full) {
        run(l);
    }
    run(log_cap_campaign(1000));
    println!(
        "\nfault campaigns, {:.0} s:\n\n{}",
        began.elapsed().as_secs_f64(),
        table(&lines)
    );
    let failed: Vec<&str> = lines
        .iter()
        .filter(|l| !l.ok())
        .map(|l| l.campaign.as_str())
        .collect();
    assert!(failed.is_empty(), "failed campaigns: {failed:?}");
}
