//! Figures 9 and 10 (issue 14): new events while the uplink is busy; figure 11 (issue
//! 15): a large BLOB over a link that drops, after a SIGKILL, and at the media lane's
//! bandwidth cap. A `run` child of each agent pushes through the shaped link while a
//! writer thread inserts new events at a fixed cadence into the application database;
//! each new event's latency is the time the store recorded it minus the time its insert
//! committed.
//!
//! Arrival times are the store's own `received_at`, stamped by the statement that
//! stores the row (millisecond precision, the same system clock as the writer's): exact
//! whatever the polling period, so the bench polls (`received::arrivals`, only rows it
//! has not seen) just to know when to move on, and the polls cost no accuracy.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relais::demo::{create_app_db, insert_events, insert_media};
use relais::received::{self, EmbeddedServer as Receiver};
use rusqlite::Connection;

use super::{
    Agent, Config, Env, FLAT_RSS, Fresh, MIB, Res, Running, Table, Usage, fmt_bytes, fmt_secs,
    link, spawn, sync_disks, validate_events, validate_media,
};

/// The push interval of both agents' `run` (relais `SYNC_INTERVAL_SECONDS`, the
/// baseline's `SYNC_INTERVAL_MINUTES` in minutes).
const INTERVAL_S: f64 = 5.0;
/// Figure 9's allowance above one interval: the round trip (100 ms), a new connection's
/// handshake (another 100 ms) and the pass's own reads and commit.
const ALLOWANCE_S: f64 = 0.5;
/// Figure 10's target for an event's p99 latency, above the push interval.
const MEDIA_TARGET_S: f64 = 2.0;
/// The writer's events sort after the fixture's (`insert_events` dates are 2025-12-18),
/// so that an agent sending oldest first sends them after the backlog, as on a device.
const LIVE_PREFIX: &str = "2025-12-19T";
/// How often the bench looks at the store while it waits for a condition.
const POLL: Duration = Duration::from_millis(50);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `n` events and, with `media_mib`, one media row, in WAL mode as an application that
/// writes while the agent reads would use it.
fn lanes_db(path: &Path, n: usize, media_mib: Option<u64>) -> Res<()> {
    let conn = create_app_db(path, true).map_err(|e| e.to_string())?;
    insert_events(&conn, n).map_err(|e| e.to_string())?;
    if let Some(mib) = media_mib {
        insert_media(&conn, Some(mib * MIB)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Inserts one event per tick, each in its own transaction, and keeps its date and the
/// time its commit returned.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Res<Vec<(String, f64)>>>,
}

impl Writer {
    fn start(db: &Path, every: Duration) -> Res<Writer> {
        let conn = Connection::open(db).map_err(|e| format!("writer: {e}"))?;
        // The baseline commits into this database after every row.
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| format!("writer: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut inserted = Vec::new();
            let mut next = Instant::now();
            while !stopped.load(Ordering::SeqCst) {
                let date = format!("{LIVE_PREFIX}00:00:00.{:06}", inserted.len());
                conn.execute(
                    "INSERT INTO evenement (date, id_capteur) VALUES (?1, 1)",
                    [&date],
                )
                .map_err(|e| format!("writer: {e}"))?;
                inserted.push((date, unix_now()));
                next += every;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(inserted)
        });
        Ok(Writer { stop, thread })
    }

    fn finish(self) -> Res<Vec<(String, f64)>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().map_err(|_| "writer panicked")?
    }
}

/// What has arrived at the store so far.
#[derive(Default)]
struct Seen {
    last_id: i64,
    /// Event date → arrival (Unix seconds), the first arrival of each.
    at: HashMap<String, f64>,
    backlog: usize,
    backlog_last: f64,
    live: usize,
    media: Option<f64>,
}

impl Seen {
    fn poll(&mut self, receiver: &Receiver) -> Res<()> {
        for a in received::arrivals(receiver, self.last_id)? {
            self.last_id = a.id;
            if a.endpoint == "media" {
                self.media.get_or_insert(a.at);
                continue;
            }
            let Some(date) = a.date else { continue };
            if let Entry::Vacant(v) = self.at.entry(date) {
                if v.key().starts_with(LIVE_PREFIX) {
                    self.live += 1;
                } else {
                    self.backlog += 1;
                    self.backlog_last = self.backlog_last.max(a.at);
                }
                v.insert(a.at);
            }
        }
        Ok(())
    }
}

/// One agent's run of figure 9 or 10.
struct Plan<'a> {
    shape: link::Shape,
    /// The writer's cadence.
    every: Duration,
    /// The whole run, child start to SIGTERM, ends by then whatever has arrived.
    bound: Duration,
    /// The writer starts once the link has forwarded this much up.
    start_after_up: u64,
    /// The writer runs until this holds (or the bound).
    done: &'a dyn Fn(&Seen) -> bool,
    /// The media row's size, if the fixture has one.
    media: Option<u64>,
    /// Added to the agent's environment.
    vars: &'a [(&'a str, &'a str)],
    /// SIGKILL the agent once the link has forwarded this much up, and start it again.
    kill_after_up: Option<u64>,
}

struct LiveRun {
    agent: Agent,
    usage: Usage,
    /// Unix seconds: the child's start, and the end of the bench's wait.
    started: f64,
    ended: f64,
    /// Whether `done` held within the bound.
    done: bool,
    inserted: Vec<(String, f64)>,
    seen: Seen,
    up: u64,
    /// (Unix seconds, bytes the link forwarded up) at each look while the writer ran.
    samples: Vec<(f64, u64)>,
}

/// Polls `cond` until it holds (true), or the deadline passes or the child exits (false).
fn poll_until(
    child: &Running,
    deadline: Instant,
    mut cond: impl FnMut() -> Res<bool>,
) -> Res<bool> {
    loop {
        if cond()? {
            return Ok(true);
        }
        if Instant::now() >= deadline || child.exited() {
            return Ok(false);
        }
        thread::sleep(POLL);
    }
}

fn live_run(env: &Env, fixture: &Path, agent: Agent, tag: &str, plan: &Plan) -> Res<LiveRun> {
    let run = Fresh::new(env, fixture, agent, tag, Some(plan.shape))?;
    let command = || {
        let mut command = env.command(agent, &run.db, &run.url(), &run.dir, false);
        let minutes = format!("{}", INTERVAL_S / 60.0);
        let seconds = format!("{INTERVAL_S}");
        command.envs([
            ("SYNC_INTERVAL_SECONDS", seconds.as_str()),
            ("SYNC_INTERVAL_MINUTES", minutes.as_str()),
        ]);
        command.envs(plan.vars.iter().copied());
        command
    };
    sync_disks();
    let started = unix_now();
    let deadline = Instant::now() + plan.bound;
    let mut child = spawn(command())?;
    let link = run.link.as_ref().ok_or("a live run needs a link")?;
    let mut killed = None;
    if let Some(at) = plan.kill_after_up {
        poll_until(&child, deadline, || Ok(link.bytes_up() >= at))?;
        child.kill();
        killed = Some(child.wait()?.0);
        child = spawn(command())?;
    }
    poll_until(&child, deadline, || {
        Ok(link.bytes_up() >= plan.start_after_up)
    })?;
    let writer = Writer::start(&run.db, plan.every)?;
    let mut seen = Seen::default();
    let mut samples = Vec::new();
    let done = poll_until(&child, deadline, || {
        samples.push((unix_now(), link.bytes_up()));
        seen.poll(&run.receiver)?;
        Ok((plan.done)(&seen))
    });
    let inserted = writer.finish()?;
    if done? {
        poll_until(&child, deadline, || {
            seen.poll(&run.receiver)?;
            Ok(seen.live >= inserted.len())
        })?;
    }
    let ended = unix_now();
    child.terminate();
    let (mut usage, tail) = child.wait()?;
    // Both processes of a killed run: their CPU together, the higher peak.
    if let Some(first) = killed {
        usage.cpu += first.cpu;
        usage.maxrss = usage.maxrss.max(first.maxrss);
    }
    if usage.status != 0 && usage.status != -libc::SIGTERM {
        return Err(format!(
            "{} run: exit status {}\n{tail}",
            agent.name(),
            usage.status
        ));
    }
    seen.poll(&run.receiver)?;
    check_arrived(&run.receiver, &run.db, &seen, plan.media)
        .map_err(|e| format!("{}: {e}", agent.name()))?;
    let up = run.forwarded()[0];
    run.remove();
    Ok(LiveRun {
        agent,
        usage,
        started,
        ended,
        done: (plan.done)(&seen),
        inserted,
        seen,
        up,
        samples,
    })
}

/// Whatever arrived is the contract's payloads, each event once, the media row intact.
fn check_arrived(receiver: &Receiver, db: &Path, seen: &Seen, media: Option<u64>) -> Res<()> {
    let (media_rows, events): (Vec<_>, Vec<_>) = received::rows(receiver)?
        .into_iter()
        .partition(|r| r.endpoint == "media");
    validate_events(&events, db, seen.at.len())?;
    match media {
        Some(size) if seen.media.is_some() => validate_media(&media_rows, size),
        _ => Ok(()),
    }
}

/// The new events' latencies; an event that had not arrived counts the time until the
/// end of the run, a lower bound.
struct Latency {
    inserted: usize,
    arrived: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(run: &LiveRun) -> Latency {
        let mut l: Vec<f64> = run
            .inserted
            .iter()
            .map(|(date, t)| run.seen.at.get(date).unwrap_or(&run.ended) - t)
            .collect();
        l.sort_by(f64::total_cmp);
        // Nearest rank.
        let pct = |p: f64| {
            let rank = (p * l.len() as f64).ceil() as usize;
            l.get(rank.max(1) - 1).copied().unwrap_or(f64::NAN)
        };
        Latency {
            inserted: l.len(),
            arrived: run
                .inserted
                .iter()
                .filter(|(d, _)| run.seen.at.contains_key(d))
                .count(),
            p50: pct(0.50),
            p99: pct(0.99),
            max: l.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn complete(&self) -> bool {
        self.arrived == self.inserted
    }

    /// "≥ " when some had not arrived: the figures are lower bounds.
    fn bound(&self) -> &'static str {
        if self.complete() { "" } else { "≥ " }
    }

    fn summary(&self) -> String {
        let b = self.bound();
        format!(
            "{} new events, {} arrived: p50 {b}{} p99 {b}{} max {b}{}",
            self.inserted,
            self.arrived,
            fmt_secs(self.p50),
            fmt_secs(self.p99),
            fmt_secs(self.max)
        )
    }

    /// For a table row's label.
    fn note(&self) -> String {
        if self.complete() {
            String::new()
        } else {
            format!(" (≥: {} of {} had arrived)", self.arrived, self.inserted)
        }
    }
}

type Pick = (&'static str, fn(&Latency) -> f64);
const P50: Pick = ("p50", |l| l.p50);
const P99: Pick = ("p99", |l| l.p99);
const MAX: Pick = ("max", |l| l.max);

/// Rows of latencies, relais against the baseline.
fn latency_rows(table: &mut Table, what: &str, [r, b]: [&Latency; 2], picks: &[Pick]) {
    for (name, pick) in picks {
        table.cost(
            format!("{what} {name} latency{}", b.note()),
            pick(r),
            pick(b),
            fmt_secs,
        );
    }
}

fn resources(run: &LiveRun) -> String {
    format!(
        "CPU {} peak RSS {} link {} up",
        fmt_secs(run.usage.cpu),
        fmt_bytes(run.usage.maxrss as f64),
        fmt_bytes(run.up as f64)
    )
}

/// CPU seconds per 1,000 rows the run delivered.
fn cpu_per_1000(run: &LiveRun) -> f64 {
    run.usage.cpu * 1000.0 / run.seen.at.len().max(1) as f64
}

fn met(ok: bool) -> &'static str {
    if ok { "yes" } else { "no" }
}

/// The resource rows both figures have.
fn resource_rows(table: &mut Table, what: &str, runs: &[LiveRun; 2]) {
    let [r, b] = runs;
    table.cost(
        format!("{what}: CPU per 1,000 rows delivered"),
        cpu_per_1000(r),
        cpu_per_1000(b),
        fmt_secs,
    );
    table.cost(
        format!("{what}: peak RSS"),
        r.usage.maxrss as f64,
        b.usage.maxrss as f64,
        fmt_bytes,
    );
    table.target(
        (r.usage.maxrss as f64) < FLAT_RSS,
        format!(
            "{what}: relais's memory stays flat, peak RSS < {} ({})",
            fmt_bytes(FLAT_RSS),
            fmt_bytes(r.usage.maxrss as f64)
        ),
    );
}

/// Figure 9: a backlog drained over a 100 ms round trip while new events keep coming.
fn drain(env: &Env, cfg: &Config, table: &mut Table) -> Res<()> {
    let n = cfg.lanes_events;
    println!(
        "9. drain {n} queued events, 50 ms each way, a new event every 100 ms, push interval {INTERVAL_S} s ..."
    );
    let fixture = env.work.join("fixture-drain.db");
    lanes_db(&fixture, n, None)?;
    let drained = |s: &Seen| s.backlog >= n;
    let plan = |bound| Plan {
        shape: link::Shape {
            delay_each_way: Duration::from_millis(50),
            bytes_per_sec: None,
            cut_every: None,
        },
        every: Duration::from_millis(100),
        bound,
        // New events are those written once the agent pushes: what was there before
        // its first request is the backlog, whoever wrote it.
        start_after_up: 1,
        done: &drained,
        media: None,
        vars: &[],
        kill_after_up: None,
    };
    let relais = live_run(
        env,
        &fixture,
        Agent::Relais,
        "drain",
        &plan(cfg.lanes_bound),
    )?;
    let baseline = live_run(
        env,
        &fixture,
        Agent::Baseline,
        "drain",
        &plan(cfg.lanes_window),
    )?;
    let _ = std::fs::remove_file(&fixture);
    // relais: until the last queued event arrived; the baseline: its rate over its window.
    let drain_time = |run: &LiveRun| {
        if run.done {
            run.seen.backlog_last - run.started
        } else {
            n as f64 * (run.ended - run.started) / run.seen.backlog.max(1) as f64
        }
    };
    let mut lat = Vec::new();
    for run in [&relais, &baseline] {
        let l = Latency::of(run);
        let t = drain_time(run);
        let drained = if run.done {
            format!("drained in {}", fmt_secs(t))
        } else {
            format!(
                "{} of {n} in its {:.0} s window, projected drain {:.1} h",
                run.seen.backlog,
                run.ended - run.started,
                t / 3600.0
            )
        };
        println!(
            "     {:<8} {drained} ({:.1} events/s) · {} · {}",
            run.agent.name(),
            n as f64 / t,
            l.summary(),
            resources(run)
        );
        lat.push((t, l));
    }
    let [(rt, rl), (bt, bl)] = [&lat[0], &lat[1]];
    let what = format!("9. drain {n} queued events, 100 ms round trip, 10 new/s");
    table.cost(
        format!(
            "{what}: drain time (baseline: projected from {:.0} s)",
            baseline.ended - baseline.started
        ),
        *rt,
        *bt,
        fmt_secs,
    );
    latency_rows(
        table,
        &format!("{what}: new events'"),
        [rl, bl],
        &[P99, MAX],
    );
    let runs = [relais, baseline];
    resource_rows(table, &what, &runs);
    let limit = INTERVAL_S + ALLOWANCE_S;
    let ok = runs[0].done && rl.complete() && rl.max <= limit;
    println!(
        "     relais: every new event within one push interval + {ALLOWANCE_S} s ({limit} s): max {}, p99 {}: target met: {}",
        fmt_secs(rl.max),
        fmt_secs(rl.p99),
        met(ok)
    );
    table.target(
        ok,
        format!(
            "{what}: relais drains and every new event arrives within the push interval + {ALLOWANCE_S} s (issue 14; max {}, p99 {}, {} of {} arrived)",
            fmt_secs(rl.max),
            fmt_secs(rl.p99),
            rl.arrived,
            rl.inserted
        ),
    );
    Ok(())
}

/// When the media row arrived, or that it had not by the end of the run.
fn media_arrival(run: &LiveRun) -> String {
    match run.seen.media {
        Some(at) => format!("media arrived intact at {}", fmt_secs(at - run.started)),
        None => format!(
            "media not arrived within {}",
            fmt_secs(run.ended - run.started)
        ),
    }
}

/// Figure 10: events recorded while a large BLOB uploads over 1 MB/s.
fn media(env: &Env, cfg: &Config, table: &mut Table) -> Res<()> {
    let mib = cfg.lanes_media_mib;
    println!(
        "10. a {mib} MiB BLOB over 1 MB/s, 25 ms each way, an event every 500 ms once 5 MB went up, push interval {INTERVAL_S} s, at most {} s per agent ...",
        cfg.lanes_bound.as_secs()
    );
    let fixture = env.work.join("fixture-lanes-media.db");
    lanes_db(&fixture, 0, Some(mib))?;
    let arrived = |s: &Seen| s.media.is_some();
    let plan = Plan {
        shape: link::Shape {
            delay_each_way: Duration::from_millis(25),
            bytes_per_sec: Some(1_000_000),
            cut_every: None,
        },
        every: Duration::from_millis(500),
        bound: cfg.lanes_bound,
        start_after_up: 5_000_000,
        done: &arrived,
        media: Some(mib * MIB),
        vars: &[],
        kill_after_up: None,
    };
    let runs = [
        live_run(env, &fixture, Agent::Relais, "lanes-media", &plan)?,
        live_run(env, &fixture, Agent::Baseline, "lanes-media", &plan)?,
    ];
    let _ = std::fs::remove_file(&fixture);
    let lat: Vec<Latency> = runs.iter().map(Latency::of).collect();
    for (run, l) in runs.iter().zip(&lat) {
        let media = media_arrival(run);
        println!(
            "     {:<8} {media} · {} · {}",
            run.agent.name(),
            l.summary(),
            resources(run)
        );
    }
    let what = format!("10. events during a {mib} MiB upload at 1 MB/s");
    let media_time = |r: &LiveRun| r.seen.media.unwrap_or(r.ended) - r.started;
    table.cost(
        format!(
            "{what}: media arrived after{}",
            if runs[1].done {
                ""
            } else {
                " (baseline: ≥, not within the bound)"
            }
        ),
        media_time(&runs[0]),
        media_time(&runs[1]),
        fmt_secs,
    );
    latency_rows(
        table,
        &format!("{what}: events'"),
        [&lat[0], &lat[1]],
        &[P50, P99, MAX],
    );
    resource_rows(table, &what, &runs);
    let limit = MEDIA_TARGET_S + INTERVAL_S;
    let ok = runs[0].done && lat[0].complete() && lat[0].p99 < limit;
    println!(
        "     relais: events' p99 {} against issue 14's target < {MEDIA_TARGET_S} s + the push interval ({limit} s): target met: {}",
        fmt_secs(lat[0].p99),
        met(ok)
    );
    table.target(
        ok,
        format!(
            "{what}: relais's events' p99 latency < {MEDIA_TARGET_S} s + the push interval (issue 14; {}, {} of {} arrived), media intact",
            fmt_secs(lat[0].p99),
            lat[0].arrived,
            lat[0].inserted
        ),
    );
    Ok(())
}

/// Issue 15's bound on the bytes a resumed upload puts on the wire, per BLOB byte.
const RESUME_TARGET: f64 = 1.05;
/// Figure 11's cap for the media lane, and how close over how long the link must keep to it.
const CAP: u64 = 250_000;
const CAP_TOLERANCE: f64 = 0.10;
const CAP_WINDOW_S: f64 = 60.0;

fn fmt_per_byte(v: f64) -> String {
    format!("{v:.3}")
}

/// Figure 11, a and b: the BLOB over 1 MB/s with every connection cut every 20 s, then
/// with the agent killed (SIGKILL) at half of it; bytes up per BLOB byte.
fn resumed(env: &Env, cfg: &Config, table: &mut Table) -> Res<()> {
    let mib = cfg.lanes_media_mib;
    let blob = mib * MIB;
    let fixture = env.work.join("fixture-resumable.db");
    lanes_db(&fixture, 0, Some(mib))?;
    let arrived = |s: &Seen| s.media.is_some();
    for (label, cut, kill) in [
        (
            "every connection cut every 20 s",
            Some(Duration::from_secs(20)),
            None,
        ),
        ("the agent killed (SIGKILL) at 50 %", None, Some(blob / 2)),
    ] {
        println!(
            "11. a {mib} MiB BLOB over 1 MB/s, 25 ms each way, {label}, an event every 500 ms, at most {} s per agent ...",
            cfg.lanes_bound.as_secs()
        );
        let plan = Plan {
            shape: link::Shape {
                delay_each_way: Duration::from_millis(25),
                bytes_per_sec: Some(1_000_000),
                cut_every: cut,
            },
            every: Duration::from_millis(500),
            bound: cfg.lanes_bound,
            start_after_up: 1,
            done: &arrived,
            media: Some(blob),
            vars: &[],
            kill_after_up: kill,
        };
        let runs = [
            live_run(env, &fixture, Agent::Relais, "resumable", &plan)?,
            live_run(env, &fixture, Agent::Baseline, "resumable", &plan)?,
        ];
        let per_byte = |r: &LiveRun| r.up as f64 / blob as f64;
        for run in &runs {
            let media = media_arrival(run);
            println!(
                "     {:<8} {media} · {:.3} bytes up per BLOB byte · {} · {}",
                run.agent.name(),
                per_byte(run),
                Latency::of(run).summary(),
                resources(run)
            );
        }
        let what = format!("11. a {mib} MiB BLOB at 1 MB/s, {label}");
        table.cost(
            format!(
                "{what}: bytes up per BLOB byte{}",
                if runs[1].done {
                    ""
                } else {
                    " (baseline: not arrived)"
                }
            ),
            per_byte(&runs[0]),
            per_byte(&runs[1]),
            fmt_per_byte,
        );
        resource_rows(table, &what, &runs);
        let ok = runs[0].done && per_byte(&runs[0]) <= RESUME_TARGET;
        println!(
            "     relais: {:.3} bytes up per BLOB byte against issue 15's target ≤ {RESUME_TARGET}: target met: {}",
            per_byte(&runs[0]),
            met(ok)
        );
        table.target(
            ok,
            format!(
                "{what}: relais completes with at most {RESUME_TARGET} bytes up per BLOB byte (issue 15; {:.3})",
                per_byte(&runs[0])
            ),
        );
    }
    let _ = std::fs::remove_file(&fixture);
    Ok(())
}

/// Bytes/s the link forwarded up over [`CAP_WINDOW_S`], from the first look after 1 MB
/// went up (the upload under way); `None` when the run was shorter.
fn capped_rate(samples: &[(f64, u64)]) -> Option<f64> {
    let start = samples.iter().find(|(_, up)| *up >= 1_000_000)?;
    let end = samples.iter().find(|(t, _)| *t >= start.0 + CAP_WINDOW_S)?;
    Some((end.1 - start.1) as f64 / (end.0 - start.0))
}

/// Figure 11, c: a 20 MiB BLOB at the media lane's cap of 250 kB/s on a link that could
/// carry more, events every 500 ms meanwhile. The baseline has no cap to keep to.
fn capped(env: &Env, table: &mut Table) -> Res<()> {
    let mib = 20;
    let cap = CAP.to_string();
    println!(
        "11. a {mib} MiB BLOB at the media lane's cap of {CAP} B/s, 25 ms each way and no link limit, an event every 500 ms ..."
    );
    let fixture = env.work.join("fixture-capped.db");
    lanes_db(&fixture, 0, Some(mib))?;
    let arrived = |s: &Seen| s.media.is_some();
    let vars = [("RELAIS_MEDIA_MAX_BYTES_PER_SEC", cap.as_str())];
    let plan = Plan {
        shape: link::Shape {
            delay_each_way: Duration::from_millis(25),
            bytes_per_sec: None,
            cut_every: None,
        },
        every: Duration::from_millis(500),
        bound: Duration::from_secs(180),
        start_after_up: 1,
        done: &arrived,
        media: Some(mib * MIB),
        vars: &vars,
        kill_after_up: None,
    };
    let run = live_run(env, &fixture, Agent::Relais, "capped", &plan)?;
    let _ = std::fs::remove_file(&fixture);
    let lat = Latency::of(&run);
    let rate = capped_rate(&run.samples);
    println!(
        "     relais   {} over {CAP_WINDOW_S} s · {} · {}",
        rate.map_or("upload shorter than the window".to_string(), |r| format!(
            "{r:.0} B/s up ({:.1} % of the cap)",
            r * 100.0 / CAP as f64
        )),
        lat.summary(),
        resources(&run)
    );
    println!("     baseline has no bandwidth cap (the seed's service sends at the link's speed)");
    let within = rate.is_some_and(|r| (r - CAP as f64).abs() <= CAP_TOLERANCE * CAP as f64);
    let events_ok = lat.complete() && lat.p99 < MEDIA_TARGET_S + INTERVAL_S;
    let flat = (run.usage.maxrss as f64) < FLAT_RSS;
    println!(
        "     relais: the cap kept within {:.0} % over {CAP_WINDOW_S} s: {}; events' p99 {} (< {} s): {}; peak RSS {}: {}",
        CAP_TOLERANCE * 100.0,
        met(within),
        fmt_secs(lat.p99),
        MEDIA_TARGET_S + INTERVAL_S,
        met(events_ok),
        fmt_bytes(run.usage.maxrss as f64),
        met(flat)
    );
    table.target(
        within && events_ok && flat,
        format!(
            "11. the media lane's cap of {CAP} B/s kept within {:.0} % over {CAP_WINDOW_S} s ({}), events unaffected (p99 {}), memory flat ({}) (issue 15)",
            CAP_TOLERANCE * 100.0,
            rate.map_or("no window".to_string(), |r| format!("{r:.0} B/s")),
            fmt_secs(lat.p99),
            fmt_bytes(run.usage.maxrss as f64)
        ),
    );
    Ok(())
}

/// Figures 9 and 10.
pub(super) fn lanes(env: &Env, cfg: &Config, table: &mut Table) -> Res<()> {
    drain(env, cfg, table)?;
    media(env, cfg, table)
}

/// Figure 11.
pub(super) fn resumable(env: &Env, cfg: &Config, table: &mut Table) -> Res<()> {
    resumed(env, cfg, table)?;
    capped(env, table)
}
