//! The systemd watchdog is fed through long work, with real child processes and a
//! stand-in `NOTIFY_SOCKET`: an upload slower than the watchdog period per BLOB chunk,
//! and the import of a large legacy `sync_tracking` table, which is also killed midway
//! and must resume where it stopped. A binary of its own: run beside the timing-sensitive
//! tests of push_process.rs, these two took their CPU (a 64 MB upload's read-lock holds
//! doubled and the application's 100 ms busy timeout expired).
#![cfg(feature = "demo")]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    DEVICE, NotifySocket, Proxy, ProxyFault, Receiver, Scratch, agent_env, log_text, run_relais,
    send_signal, spawn_logged, wait_exit, wait_for,
};
use relais::demo::{create_app_db, insert_events, insert_media};
use rusqlite::Connection;

const MB: u64 = 1 << 20;

fn receiver(dir: &Scratch) -> Receiver {
    Receiver::start(&dir.join("receiver"))
}

// ---------------------------------------------------------------- a slow uplink

#[test]
fn the_watchdog_is_fed_while_a_slow_upload_moves() {
    let dir = Scratch::new("watchdog-upload");
    // 16 MiB in 4 MiB chunks (5.3 MiB of base64 each) through a 6 MiB/s uplink: 0.9 s
    // per chunk, more than the 500 ms watchdog below (as 4 MiB over 3G is to 60 s).
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_media(&conn, Some(16 * MB)).expect("insert media");
    let rx = receiver(&dir);
    let proxy = Proxy::start(&rx.url(), 6 * MB);
    let notify = NotifySocket::bind(dir.path());
    let watchdog = Duration::from_millis(500);
    let socket = notify.path.display().to_string();
    let usec = watchdog.as_micros().to_string();
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[
            ("SYNC_INTERVAL_SECONDS", "3600"),
            ("NOTIFY_SOCKET", &socket),
            ("WATCHDOG_USEC", &usec),
        ],
    );
    let (mut child, stderr) = spawn_logged(&["run"], &vars);
    // Watched until 16 of the body's 21.3 MiB went through: the rest may already sit in
    // the kernel's socket buffers, sent without the agent reading anything.
    let (pings, watched_until) = pings_until(&notify, || proxy.forwarded() >= 16 * MB);
    let stored = wait_for(Duration::from_secs(60), || rx.stats().stored == 1);
    send_signal(child.id(), "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let log = log_text(stderr);
    assert!(
        watched_until.is_some() && stored,
        "the media row arrived\n{log}"
    );
    assert!(status.success(), "{status:?}\n{log}");
    assert_fed(&pings, watched_until, watchdog, 4);
}

#[test]
fn the_watchdog_is_fed_while_the_answer_takes_long() {
    let dir = Scratch::new("watchdog-answer");
    let db = dir.join("surveillance.db");
    insert_events(&create_app_db(&db, false).expect("create app db"), 1).expect("insert");
    let rx = receiver(&dir);
    // The backend stores the row, then takes 2.5 s to answer: four watchdog periods.
    rx.push_fault(ProxyFault::DelayAnswer(Duration::from_millis(2500)));
    let notify = NotifySocket::bind(dir.path());
    let watchdog = Duration::from_millis(500);
    let (socket, usec) = (
        notify.path.display().to_string(),
        watchdog.as_micros().to_string(),
    );
    let config = dir.join("relais.json");
    std::fs::write(
        &config,
        r#"{"http": {"io_timeout_s": 1, "response_timeout_s": 10}}"#,
    )
    .expect("config");
    let config = config.display().to_string();
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[
            ("SYNC_INTERVAL_SECONDS", "3600"),
            ("NOTIFY_SOCKET", &socket),
            ("WATCHDOG_USEC", &usec),
            ("RELAIS_CONFIG", &config),
        ],
    );
    let (mut child, stderr) = spawn_logged(&["run"], &vars);
    let state = dir.state_db();
    let (pings, answered) = pings_until(&notify, || {
        state.exists() && common::count_status(&state, "success") == 1
    });
    send_signal(child.id(), "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let log = log_text(stderr);
    assert!(answered.is_some(), "the row was recorded\n{log}");
    assert!(status.success(), "{status:?}\n{log}");
    assert_eq!(rx.stats().stored, 1);
    assert_fed(&pings, answered, watchdog, 4);
}

/// The `WATCHDOG=1` messages received until `done` holds (at most 60 s), and when it did.
fn pings_until(
    notify: &NotifySocket,
    mut done: impl FnMut() -> bool,
) -> (Vec<Instant>, Option<Instant>) {
    let mut pings = Vec::new();
    let held = wait_for(Duration::from_secs(60), || {
        if notify.recv().as_deref() == Some("WATCHDOG=1") {
            pings.push(Instant::now());
        }
        done()
    });
    (pings, held.then(Instant::now))
}

/// At least `min` pings, and no gap of a watchdog period between two of them or after
/// the last one.
fn assert_fed(pings: &[Instant], until: Option<Instant>, watchdog: Duration, min: usize) {
    let until = until.expect("the watched work finished");
    let gaps: Vec<Duration> = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .chain(pings.last().map(|last| until - *last))
        .collect();
    assert!(pings.len() >= min, "{} pings", pings.len());
    assert!(
        gaps.iter().all(|g| *g < watchdog),
        "a gap of the watchdog period or more: {gaps:?}"
    );
}

// ---------------------------------------------------------------- a large legacy import, killed midway

const LEGACY_ROWS: i64 = 50_000;

/// The Python service's `sync_tracking` table, with every event but the last five
/// marked `success` (remote id 1000 + local id), built in one transaction.
fn legacy_app(dir: &Scratch) -> PathBuf {
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, LEGACY_ROWS as usize + 5).expect("insert events");
    conn.execute_batch(
        "CREATE TABLE sync_tracking (
            id INTEGER PRIMARY KEY AUTOINCREMENT, table_name TEXT NOT NULL,
            local_id INTEGER NOT NULL, remote_id INTEGER, sync_date TEXT NOT NULL,
            sync_status TEXT NOT NULL, error_message TEXT, UNIQUE(table_name, local_id));",
    )
    .expect("legacy table");
    conn.execute(
        "INSERT INTO sync_tracking (table_name, local_id, remote_id, sync_date, sync_status)
         SELECT 'evenement', id_evenement, 1000 + id_evenement, date, 'success'
         FROM evenement WHERE id_evenement <= ?1",
        [LEGACY_ROWS],
    )
    .expect("legacy rows");
    db
}

fn agent_meta(state_db: &Path, key: &str) -> Option<String> {
    let conn = Connection::open(state_db).ok()?;
    conn.busy_timeout(Duration::from_secs(1)).ok()?;
    conn.query_row("SELECT value FROM agent_meta WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .ok()
}

#[test]
fn a_legacy_import_killed_midway_resumes_where_it_stopped() {
    let dir = Scratch::new("legacy-resume");
    let db = legacy_app(&dir);
    let rx = receiver(&dir);
    let notify = NotifySocket::bind(dir.path());
    let socket = notify.path.display().to_string();
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    // A watchdog of 200 ms: every batch of the import must ping it.
    let watched = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "200000")],
    );
    let progress_key = format!("legacy_progress:{}", db.display());
    let done_key = format!("legacy_imported:{}", db.display());

    let mut agent = common::spawn_relais(&["run"], &watched);
    // A ping received before the import is marked done was sent during the import:
    // nothing pings between READY=1 and the first pass's import.
    let mut pinged = false;
    let progressed = wait_for(Duration::from_secs(30), || {
        let ping = std::iter::from_fn(|| notify.recv()).any(|m| m == "WATCHDOG=1");
        pinged |= ping && agent_meta(&dir.state_db(), &done_key).is_none();
        pinged && agent_meta(&dir.state_db(), &progress_key).is_some()
    });
    common::power_cut(&mut agent);
    let progress: i64 = agent_meta(&dir.state_db(), &progress_key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        progressed && progress > 0,
        "no watchdog ping ({pinged}) or no recorded progress during the import"
    );
    assert_eq!(
        agent_meta(&dir.state_db(), &done_key),
        None,
        "killed mid-import (after legacy id {progress} of {LEGACY_ROWS})"
    );

    let out = run_relais(&["once"], &vars, Duration::from_secs(120));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    let resumed = "resuming the import of the previous service's tracking after its id ";
    let at: i64 = log
        .split(resumed)
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resumption logged:\n{log}"));
    assert!(at >= progress, "resumed at {at}, progress was {progress}");
    assert!(agent_meta(&dir.state_db(), &done_key).is_some());

    let mut keys: Vec<String> = rx
        .rows()
        .into_iter()
        .filter_map(|r| r.idempotency_key)
        .collect();
    keys.sort();
    let expected: Vec<String> = (LEGACY_ROWS + 1..=LEGACY_ROWS + 5)
        .map(|id| format!("{DEVICE}:evenement:{id}"))
        .collect();
    assert_eq!(keys, expected, "only the events the old service never sent");
    let rows = common::tracking_rows(&dir.state_db());
    assert_eq!(rows.len() as i64, LEGACY_ROWS + 5);
    assert!(rows.iter().all(|r| r.status == "success"));
    let legacy_ids_kept = rows.iter().all(|r| match r.local_id {
        rusqlite::types::Value::Integer(id) if id <= LEGACY_ROWS => r.remote_id == Some(1000 + id),
        _ => true,
    });
    assert!(legacy_ids_kept, "legacy remote ids imported");
}
