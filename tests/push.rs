//! Integration tests of the push engine, in process: real SQLite files, relais-server
//! in-process on 127.0.0.1 behind the fault proxy (misbehaving on request), one
//! `Pusher::sync_once` pass at a time. Every test asserts on what arrived at the
//! server, on the agent's `sync_tracking` rows, or on both.
#![cfg(feature = "demo")]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use common::{
    DEVICE, ProxyFault, ReceivedRow, Receiver, Scratch, TrackRow, tracked, tracking_rows, unix_now,
};
use relais::demo::{check_delivery, create_app_db, insert_events, insert_media, settings_for};
use relais::push::{CycleReport, Interruption, Pusher};
use relais::settings::Settings;
use rusqlite::Connection;
use rusqlite::types::Value;

// ---------------------------------------------------------------- helpers

/// Warnings and errors logged by the library, captured so tests can check that a
/// problem produced a clear line. Tests find theirs by a unique path in the line.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}", r.level(), r.args());
            LINES.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Warn);
    });
}

fn logged_lines_with(needle: &str) -> Vec<String> {
    LINES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

/// A scratch directory with an application database (rollback journal) holding
/// `events` events and one media row per entry of `media`.
fn app(tag: &str, events: usize, media: &[Option<u64>]) -> (Scratch, PathBuf) {
    capture_logs();
    let dir = Scratch::new(tag);
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, events).expect("insert events");
    for size in media {
        insert_media(&conn, *size).expect("insert media");
    }
    (dir, db)
}

fn receiver(dir: &Scratch, idempotency: bool) -> Receiver {
    Receiver::start_with(&dir.join("receiver"), idempotency)
}

fn settings(db: &Path, url: &str, dir: &Scratch, extra: &[(&str, &str)]) -> Settings {
    settings_for(db, url, dir.path(), extra).expect("settings")
}

fn pusher(settings: &Settings) -> Pusher {
    relais::daemon::build_pusher(settings, None, Arc::new(AtomicBool::new(false))).expect("pusher")
}

/// A receiver with idempotency that meets `fault` first, and a pusher against it.
fn with_fault(
    dir: &Scratch,
    db: &Path,
    fault: ProxyFault,
    extra: &[(&str, &str)],
) -> (Receiver, Pusher) {
    let rx = receiver(dir, true);
    rx.push_fault(fault);
    let p = pusher(&settings(db, &rx.url(), dir, extra));
    (rx, p)
}

/// The idempotency keys of the received rows, sorted.
fn sorted_keys(rows: &[ReceivedRow]) -> Vec<String> {
    let mut keys: Vec<String> = rows
        .iter()
        .map(|r| r.idempotency_key.clone().unwrap())
        .collect();
    keys.sort();
    keys
}

fn assert_exact(db: &Path, rx: &Receiver) -> relais::demo::Delivery {
    let d = check_delivery(db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "delivery not exact: {d:?}");
    d
}

/// A URL where nothing listens: a port bound, then released.
fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

fn backend_interruption(report: &CycleReport) -> (String, Option<Duration>) {
    match &report.interrupted {
        Some(Interruption::Backend {
            reason,
            retry_after,
        }) => (reason.clone(), *retry_after),
        other => panic!("expected a backend interruption, got {other:?} in {report}"),
    }
}

/// A pass the backend interrupts for a reason containing `needle`: its report and the
/// Retry-After.
fn interrupted_pass(p: &mut Pusher, needle: &str) -> (CycleReport, Option<Duration>) {
    let report = p.sync_once();
    let (reason, retry_after) = backend_interruption(&report);
    assert!(reason.contains(needle), "{reason}");
    (report, retry_after)
}

fn with_status<'a>(rows: &'a [TrackRow], status: &str) -> Vec<&'a TrackRow> {
    rows.iter().filter(|r| r.status == status).collect()
}

/// Writes a JSON configuration file into `dir` and returns its path.
fn config_file(dir: &Scratch, json: &str) -> String {
    let path = dir.join("relais.json");
    std::fs::write(&path, json).expect("write config");
    path.display().to_string()
}

// ---------------------------------------------------------------- 1. first and second pass

#[test]
fn first_pass_pushes_all_and_second_pass_sends_nothing() {
    let media = [None, Some(3 << 20), Some(1000), Some(200 * 1024)];
    let (dir, db) = app("first-pass", 120, &media);
    let rx = receiver(&dir, true);
    let s = settings(&db, &rx.url(), &dir, &[]);
    let mut p = pusher(&s);

    let first = p.sync_once();
    assert!(first.is_clean(), "{first} {:?}", first.errors);
    assert_eq!(first.pushed(), 124, "{first}");
    let d = assert_exact(&db, &rx);
    assert_eq!((d.expected, d.received), (124, 124));
    let rows = tracking_rows(&dir.state_db());
    assert_eq!(rows.len(), 124);
    assert!(
        rows.iter()
            .all(|r| r.status == "success" && r.remote_id.is_some()),
        "every row success with its remote id"
    );
    assert!(first.bytes() > 3 << 20, "bytes counted: {first}");

    let requests = rx.stats().requests;
    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    assert_eq!(second.pushed(), 0);
    assert_eq!(
        rx.stats().requests,
        requests,
        "an idle pass sends no request"
    );
    assert_eq!(rx.rows().len(), 124);
}

/// The report records, per table, the longest time one BLOB read held the application
/// database's read lock (rollback journal: one chunk per handle, never across network I/O).
#[test]
fn the_report_records_the_longest_read_lock_of_a_64_mb_blob() {
    let (dir, db) = app("lock-hold", 1, &[Some(64 << 20)]);
    let rx = receiver(&dir, true);
    let report = pusher(&settings(&db, &rx.url(), &dir, &[])).sync_once();
    assert!(report.is_clean(), "{report}");
    assert_exact(&db, &rx);
    let media = report.tables.iter().find(|t| t.table == "media").unwrap();
    let events = report
        .tables
        .iter()
        .find(|t| t.table == "evenement")
        .unwrap();
    println!(
        "64 MB BLOB, rollback journal: longest read lock {:?}",
        media.max_lock_hold
    );
    assert!(media.max_lock_hold > Duration::ZERO, "{media:?}");
    assert!(
        media.max_lock_hold < Duration::from_secs(1),
        "read lock held {:?}",
        media.max_lock_hold
    );
    assert_eq!(events.max_lock_hold, Duration::ZERO, "no BLOB, no hold");
    assert!(media.bytes > 64 << 20, "{media:?}");
}

// ---------------------------------------------------------------- 2. server down, then up

#[test]
fn server_down_stops_at_the_first_row_then_everything_arrives_once() {
    let (dir, db) = app("server-down", 5, &[Some(5000)]);
    let s = settings(&db, &dead_url(), &dir, &[]);
    let report = pusher(&s).sync_once();
    let (reason, _) = backend_interruption(&report);
    assert!(
        reason.to_lowercase().contains("connect"),
        "reason: {reason}"
    );
    assert_eq!(
        report.failed(),
        1,
        "the pass stops at the first row: {report}"
    );
    assert_eq!(report.pushed(), 0);
    let rows = tracking_rows(&dir.state_db());
    assert!(with_status(&rows, "success").is_empty(), "{rows:?}");
    let failed = with_status(&rows, "failed");
    assert_eq!(failed.len(), 1, "{rows:?}");
    assert!(
        failed[0].next_attempt_at.unwrap() <= unix_now(),
        "due again"
    );

    let rx = receiver(&dir, true);
    let s = settings(&db, &rx.url(), &dir, &[]);
    let report = pusher(&s).sync_once();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.pushed(), 6);
    let d = assert_exact(&db, &rx);
    assert_eq!(d.received, 6);
    assert_eq!(rx.stats().stored, 6);
    let rows = tracking_rows(&dir.state_db());
    assert_eq!(with_status(&rows, "success").len(), 6, "{rows:?}");
}

// ---------------------------------------------------------------- 3. classification

#[test]
fn server_error_500_stops_the_pass_and_the_row_is_retried_next_pass() {
    let (dir, db) = app("status-500", 3, &[]);
    let (rx, mut p) = with_fault(&dir, &db, ProxyFault::Status(500, None), &[]);

    let (first, retry_after) = interrupted_pass(&mut p, "500");
    assert_eq!(retry_after, None);
    assert_eq!((first.pushed(), first.failed()), (0, 1), "{first}");
    assert_eq!(
        rx.stats().requests,
        1,
        "no request after the transient failure"
    );
    let row = tracked(&dir.state_db(), "evenement", 1).expect("tracked");
    assert_eq!(row.status, "failed");
    assert!(row.error.unwrap().contains("500"));

    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    assert_eq!(second.pushed(), 3);
    assert_exact(&db, &rx);
}

#[test]
fn too_many_requests_429_honours_retry_after() {
    let (dir, db) = app("status-429", 2, &[]);
    let (rx, mut p) = with_fault(&dir, &db, ProxyFault::Status(429, Some(7)), &[]);
    let (first, retry_after) = interrupted_pass(&mut p, "429");
    assert_eq!(retry_after, Some(Duration::from_secs(7)));
    assert_eq!(first.failed(), 1);
    assert!(rx.rows().is_empty());
    let second = p.sync_once();
    assert_eq!(second.pushed(), 2, "{second}");
    assert_exact(&db, &rx);
}

#[test]
fn rejected_422_fails_one_row_the_pass_goes_on_and_retry_failed_makes_it_due() {
    let (dir, db) = app("status-422", 3, &[]);
    let (rx, mut p) = with_fault(&dir, &db, ProxyFault::Status(422, None), &[]);

    let before = unix_now();
    let first = p.sync_once();
    assert!(
        first.interrupted.is_none(),
        "a 4xx does not stop the pass: {first}"
    );
    assert_eq!((first.pushed(), first.failed()), (2, 1), "{first}");
    let row = tracked(&dir.state_db(), "evenement", 1).expect("tracked");
    assert_eq!(row.status, "failed");
    let error = row.error.unwrap_or_default();
    assert!(
        error.contains("422") && error.contains("injected 422"),
        "{error}"
    );
    let next = row.next_attempt_at.expect("next attempt");
    assert!(
        (before + 3590..=unix_now() + 3610).contains(&next),
        "retried on the hourly clock, got {} s from now",
        next - unix_now()
    );

    let requests = rx.stats().requests;
    let second = p.sync_once();
    assert_eq!(second.pushed() + second.failed(), 0, "{second}");
    assert_eq!(rx.stats().requests, requests, "not retried before its time");

    assert_eq!(p.tracking().retry_failed().expect("retry-failed"), 1);
    let third = p.sync_once();
    assert!(third.is_clean(), "{third}");
    assert_eq!(third.pushed(), 1);
    assert_exact(&db, &rx);
}

#[test]
fn html_answer_is_a_success_without_remote_id() {
    let (dir, db) = app("html-ok", 2, &[]);
    let (rx, mut p) = with_fault(&dir, &db, ProxyFault::HtmlCreated, &[]);
    let report = p.sync_once();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.pushed(), 2);
    assert_exact(&db, &rx);
    let first = tracked(&dir.state_db(), "evenement", 1).unwrap();
    assert_eq!((first.status.as_str(), first.remote_id), ("success", None));
    let second = tracked(&dir.state_db(), "evenement", 2).unwrap();
    assert!(second.remote_id.is_some(), "a JSON answer's id is kept");
}

#[test]
fn unauthorized_401_is_transient() {
    let (dir, db) = app("status-401", 2, &[]);
    let (rx, mut p) = with_fault(&dir, &db, ProxyFault::Status(401, None), &[]);
    let (first, _) = interrupted_pass(&mut p, "credentials");
    assert_eq!(first.failed(), 1);
    let row = tracked(&dir.state_db(), "evenement", 1).unwrap();
    assert!(row.next_attempt_at.unwrap() <= unix_now(), "due at once");
    let second = p.sync_once();
    assert_eq!(second.pushed(), 2, "{second}");
    assert_exact(&db, &rx);
}

// ---------------------------------------------------------------- 4. lost answer

#[test]
fn lost_answer_is_resent_under_the_same_key_and_stored_once() {
    let (dir, db) = app("lost-answer", 1, &[Some(100 * 1024)]);
    let (rx, mut p) = with_fault(&dir, &db, ProxyFault::LoseAnswer, &[]);

    let first = p.sync_once();
    backend_interruption(&first);
    assert_eq!(first.failed(), 1);
    assert_eq!(rx.stats().stored, 1, "the receiver stored the row");
    assert_eq!(
        tracked(&dir.state_db(), "evenement", 1).unwrap().status,
        "failed"
    );

    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    assert_eq!(second.pushed(), 2);
    let stats = rx.stats();
    assert_eq!((stats.stored, stats.replays), (2, 1), "{stats:?}");
    assert_exact(&db, &rx);
}

#[test]
fn lost_answer_without_idempotency_gives_exactly_one_duplicate() {
    let (dir, db) = app("lost-answer-dup", 3, &[]);
    let rx = receiver(&dir, false);
    rx.push_fault(ProxyFault::LoseAnswer);
    let mut p = pusher(&settings(&db, &rx.url(), &dir, &[]));
    p.sync_once();
    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    let d = check_delivery(&db, &rx.rows(), DEVICE).unwrap();
    assert!(d.missing.is_empty() && d.mismatched.is_empty(), "{d:?}");
    assert_eq!(d.duplicates, 1, "at-least-once: {d:?}");
    assert_eq!(d.received, 4);
}

// ---------------------------------------------------------------- 5. legacy import

fn legacy_table(conn: &Connection) {
    conn.execute_batch(
        "CREATE TABLE sync_tracking (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            table_name TEXT NOT NULL,
            local_id INTEGER NOT NULL,
            remote_id INTEGER,
            sync_date TEXT NOT NULL,
            sync_status TEXT NOT NULL,
            error_message TEXT,
            UNIQUE(table_name, local_id)
        );",
    )
    .unwrap();
}

fn legacy_row(conn: &Connection, table: &str, id: i64, status: &str) {
    conn.execute(
        "INSERT INTO sync_tracking (table_name, local_id, remote_id, sync_date, sync_status, error_message)
         VALUES (?1, ?2, ?3, '2025-12-18T10:00:00', ?4, ?5)",
        rusqlite::params![
            table,
            id,
            (status == "success").then_some(1000 + id),
            status,
            (status == "failed").then_some("HTTP 500")
        ],
    )
    .unwrap();
}

#[test]
fn legacy_tracking_is_imported_once_and_its_successes_not_resent() {
    let (dir, db) = app("legacy", 5, &[Some(2000), Some(3000)]);
    let conn = Connection::open(&db).unwrap();
    legacy_table(&conn);
    for id in 1..=3 {
        legacy_row(&conn, "evenement", id, "success");
    }
    legacy_row(&conn, "evenement", 4, "failed");
    legacy_row(&conn, "media", 1, "success");
    let rx = receiver(&dir, true);
    let mut p = pusher(&settings(&db, &rx.url(), &dir, &[]));

    let first = p.sync_once();
    assert!(first.is_clean(), "{first}");
    assert_eq!(first.pushed(), 3, "events 4, 5 and media 2: {first}");
    let d = check_delivery(&db, &rx.rows(), DEVICE).unwrap();
    let mut missing = d.missing.clone();
    missing.sort();
    assert_eq!(
        missing,
        [
            "demo-pi:evenement:1",
            "demo-pi:evenement:2",
            "demo-pi:evenement:3",
            "demo-pi:media:1"
        ],
        "{d:?}"
    );
    assert!(d.mismatched.is_empty() && d.duplicates == 0, "{d:?}");
    let imported = tracked(&dir.state_db(), "evenement", 2).unwrap();
    assert_eq!(
        (imported.status.as_str(), imported.remote_id),
        ("success", Some(1002))
    );

    // The application goes on; a success added to the legacy table now is not imported
    // again, so the new event is sent.
    insert_events(&conn, 1).unwrap();
    legacy_row(&conn, "evenement", 6, "success");
    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    assert_eq!(second.pushed(), 1, "{second}");
    assert!(
        rx.rows()
            .iter()
            .any(|r| r.idempotency_key.as_deref() == Some("demo-pi:evenement:6"))
    );
}

// ---------------------------------------------------------------- 6. glob sources

#[test]
fn glob_sources_are_tracked_separately_with_distinct_keys() {
    capture_logs();
    let dir = Scratch::new("glob");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let days = ["2025_12_18.db", "2025_12_19.db"];
    for (i, day) in days.iter().enumerate() {
        let conn = create_app_db(&data.join(day), false).unwrap();
        insert_events(&conn, 3 + i).unwrap();
        insert_media(&conn, Some(4096)).unwrap();
    }
    // Not sources: another extension, and a side file of SQLite.
    std::fs::write(data.join("notes.txt"), "x").unwrap();
    let rx = receiver(&dir, true);
    let pattern = data.join("*.db");
    let s = settings(&pattern, &rx.url(), &dir, &[]);
    let mut p = pusher(&s);

    let first = p.sync_once();
    assert!(first.is_clean(), "{first} {:?}", first.errors);
    assert_eq!(first.pushed(), 4 + 5);
    let rows = rx.rows();
    assert_eq!(rows.len(), 9);
    let mut keys = sorted_keys(&rows);
    keys.dedup();
    assert_eq!(keys.len(), 9, "distinct keys: {keys:?}");
    for (i, day) in days.iter().enumerate() {
        let conn = Connection::open(data.join(day)).unwrap();
        for id in 1..=(3 + i as i64) {
            let key = format!("{DEVICE}:evenement@{day}:{id}");
            let found: Vec<_> = rows
                .iter()
                .filter(|r| r.idempotency_key.as_deref() == Some(key.as_str()))
                .collect();
            assert_eq!(found.len(), 1, "{key}");
            let date: String = conn
                .query_row(
                    "SELECT date FROM evenement WHERE id_evenement = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(found[0].json.contains(&date), "{key}: {}", found[0].json);
            assert_eq!(found[0].endpoint, "evenements");
        }
        let key = format!("{DEVICE}:media@{day}:1");
        assert_eq!(
            rows.iter()
                .filter(|r| r.idempotency_key.as_deref() == Some(key.as_str()))
                .count(),
            1,
            "{key}"
        );
    }
    let tracking = tracking_rows(&dir.state_db());
    for (i, day) in days.iter().enumerate() {
        let source = data.join(day).display().to_string();
        let of_source: Vec<_> = tracking.iter().filter(|r| r.source == source).collect();
        assert_eq!(of_source.len(), 4 + i, "{source}: {tracking:?}");
        assert!(of_source.iter().all(|r| r.status == "success"));
    }

    // A new day file and a new row in an old one: only those are sent.
    let conn = create_app_db(&data.join("2025_12_20.db"), false).unwrap();
    insert_events(&conn, 1).unwrap();
    let old = Connection::open(data.join(days[0])).unwrap();
    insert_events(&old, 1).unwrap();
    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    assert_eq!(second.pushed(), 2, "{second}");
    assert_eq!(rx.rows().len(), 11);
    assert_eq!(rx.stats().replays, 0);
}

// ---------------------------------------------------------------- 7. bad input

#[test]
fn missing_database_file_is_a_clear_error_and_nothing_is_lost() {
    capture_logs();
    let dir = Scratch::new("missing-db");
    let db = dir.join("not-yet.db");
    let rx = receiver(&dir, true);
    let mut p = pusher(&settings(&db, &rx.url(), &dir, &[]));
    let report = p.sync_once();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(
        report.errors[0].contains(&db.display().to_string()),
        "{:?}",
        report.errors
    );
    assert!(!report.is_clean());
    assert_eq!(rx.stats().requests, 0);

    // The application creates its database later: the same agent picks it up.
    let conn = create_app_db(&db, false).unwrap();
    insert_events(&conn, 2).unwrap();
    insert_media(&conn, None).unwrap();
    let report = p.sync_once();
    assert!(report.is_clean(), "{report} {:?}", report.errors);
    assert_exact(&db, &rx);
}

#[test]
fn missing_table_is_reported_and_the_other_tables_still_pushed() {
    let (dir, db) = app("missing-table", 4, &[]);
    Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE media")
        .unwrap();
    let rx = receiver(&dir, true);
    let report = pusher(&settings(&db, &rx.url(), &dir, &[])).sync_once();
    assert_eq!(report.pushed(), 4, "{report}");
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let e = &report.errors[0];
    assert!(
        e.contains("table media") && e.contains("no such table"),
        "{e}"
    );
    assert_eq!(rx.rows().len(), 4);
    assert!(
        tracking_rows(&dir.state_db())
            .iter()
            .all(|r| r.table == "evenement" && r.status == "success")
    );
}

#[test]
fn text_that_is_not_utf8_is_sent_with_replacement_characters_and_a_warning() {
    let (dir, db) = app("not-utf8", 1, &[]);
    Connection::open(&db)
        .unwrap()
        .execute_batch(
            "UPDATE capteur SET nom = CAST(x'504952ff20456e74' AS TEXT) WHERE id_capteur = 1",
        )
        .unwrap();
    let rx = receiver(&dir, true);
    let report = pusher(&settings(&db, &rx.url(), &dir, &[])).sync_once();
    assert!(report.is_clean(), "{report}");
    assert_exact(&db, &rx);
    let rows = rx.rows();
    assert!(
        rows[0].json.contains("PIR\u{fffd} Ent"),
        "sent with U+FFFD: {}",
        rows[0].json
    );
    let warnings = logged_lines_with(&db.display().to_string());
    assert!(
        warnings.iter().any(|l| l.starts_with("WARN")
            && l.contains("row 1: column nom")
            && l.contains("UTF-8")),
        "{warnings:?}"
    );
}

#[test]
fn a_file_that_is_not_sqlite_is_a_clear_error() {
    capture_logs();
    let dir = Scratch::new("not-sqlite");
    let db = dir.join("surveillance.db");
    std::fs::write(&db, vec![b'x'; 8192]).unwrap();
    let rx = receiver(&dir, true);
    let report = pusher(&settings(&db, &rx.url(), &dir, &[])).sync_once();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let e = &report.errors[0];
    assert!(
        e.contains(&db.display().to_string()) && e.contains("not an SQLite database"),
        "{e}"
    );
    assert_eq!(rx.stats().requests, 0);
    assert_eq!(
        std::fs::read(&db).unwrap(),
        vec![b'x'; 8192],
        "never modified"
    );
}

#[test]
fn a_custom_query_without_local_id_is_a_clear_error() {
    let (dir, db) = app("no-local-id", 2, &[]);
    let config = config_file(
        &dir,
        r#"{"tables": [
            {"name": "evenement", "query": "SELECT id_evenement AS id, date FROM evenement", "endpoint": "/api/evenements"},
            {"name": "capteur", "query": "SELECT id_capteur AS local_id, nom FROM capteur", "endpoint": "/api/capteurs"}
        ]}"#,
    );
    let rx = receiver(&dir, true);
    let s = settings(&db, &rx.url(), &dir, &[("RELAIS_CONFIG", &config)]);
    let report = pusher(&s).sync_once();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let e = &report.errors[0];
    assert!(
        e.contains("table evenement") && e.contains("local_id"),
        "{e}"
    );
    assert_eq!(report.pushed(), 2, "the other table still goes: {report}");
    assert!(
        rx.rows().iter().all(|r| r.endpoint == "capteurs"),
        "nothing sent for the broken table"
    );
}

#[test]
fn malformed_configuration_exits_2_with_one_line_naming_the_setting() {
    let dir = Scratch::new("bad-config");
    let db = dir.join("surveillance.db");
    create_app_db(&db, false).unwrap();
    let bad_type = config_file(&dir, r#"{"batch_size": "many"}"#);
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("SYNC_MODE", "sometimes")], "SYNC_MODE"),
        (&[("RELAIS_CONFIG", bad_type.as_str())], "batch_size"),
        (
            &[("SYNC_INTERVAL_SECONDS", "soon")],
            "SYNC_INTERVAL_SECONDS",
        ),
    ];
    for (extra, setting) in cases {
        let vars = common::agent_env(&db, "http://127.0.0.1:9", dir.path(), extra);
        let out = common::run_relais(&["once"], &vars, Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(lines[0].contains(setting), "{setting} named: {stderr}");
        assert!(!dir.join("state").exists(), "stopped before doing anything");
    }
}

// ---------------------------------------------------------------- 8. non-integer ids

/// An application database without events, with a table `note` keyed by TEXT holding
/// `values` (an SQL list of `(code, body)`), and a connection to it.
fn notes_app(tag: &str, values: &str) -> (Scratch, PathBuf, Connection) {
    let (dir, db) = app(tag, 0, &[]);
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE note (code TEXT PRIMARY KEY, body TEXT NOT NULL);
         INSERT INTO note VALUES {values};"
    ))
    .unwrap();
    (dir, db, conn)
}

/// A pusher of the `note` table alone (configuration members `extra` first) against a
/// receiver that answers 503 first.
fn notes_pusher(dir: &Scratch, db: &Path, extra: &str) -> (Receiver, Pusher) {
    let config = config_file(
        dir,
        &format!(
            r#"{{{extra}"tables": [
            {{"name": "note", "query": "SELECT code AS local_id, body FROM note", "endpoint": "/api/notes"}}
        ]}}"#
        ),
    );
    with_fault(
        dir,
        db,
        ProxyFault::Status(503, None),
        &[("RELAIS_CONFIG", &config)],
    )
}

#[test]
fn text_local_ids_are_pushed_once_across_passes() {
    let (dir, db, conn) = notes_app(
        "text-ids",
        "('cam-b', 'second'), ('cam-a', 'first'), ('z-last', 'third')",
    );
    // A transient failure first, so the retry path (ids read back from tracking) is used.
    let (rx, mut p) = notes_pusher(&dir, &db, r#""batch_size": 2, "#);

    let failed = p.sync_once();
    assert_eq!((failed.pushed(), failed.failed()), (0, 1), "{failed}");
    let first = p.sync_once();
    assert!(first.is_clean(), "{first} {:?}", first.errors);
    assert_eq!(first.pushed(), 3);
    conn.execute_batch("INSERT INTO note VALUES ('a-early', 'fourth'), ('m-mid', 'fifth');")
        .unwrap();
    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    assert_eq!(second.pushed(), 2, "only the new rows: {second}");
    let requests = rx.stats().requests;
    let third = p.sync_once();
    assert_eq!(third.pushed(), 0);
    assert_eq!(rx.stats().requests, requests);

    assert_eq!(
        sorted_keys(&rx.rows()),
        ["a-early", "cam-a", "cam-b", "m-mid", "z-last"].map(|k| format!("{DEVICE}:note:{k}"))
    );
    assert!(rx.rows().iter().any(|r| r.json.contains("\"fifth\"")));
    let tracking = tracking_rows(&dir.state_db());
    assert_eq!(tracking.len(), 5);
    assert!(
        tracking
            .iter()
            // Text ids are stored as the BLOB of their bytes, so no affinity converts them.
            .all(|r| r.status == "success" && matches!(r.local_id, Value::Blob(_)))
    );
}

/// The `local_id INTEGER` column would convert a TEXT id that looks like a number
/// ("0042") to an integer, so that "0042" and "42" shared one tracking row and a retried
/// "0042" was looked up as 42 and never found again.
#[test]
fn numeric_looking_text_ids_are_tracked_as_text() {
    let (dir, db, conn) = notes_app("numeric-text-ids", "('0042', 'padded'), ('0007', 'seven')");
    let (rx, mut p) = notes_pusher(&dir, &db, "");
    p.sync_once();
    p.sync_once();
    conn.execute_batch("INSERT INTO note VALUES ('42', 'plain');")
        .unwrap();
    p.sync_once();
    assert_eq!(
        sorted_keys(&rx.rows()),
        ["0007", "0042", "42"].map(|k| format!("{DEVICE}:note:{k}"))
    );
}

#[test]
fn a_row_without_a_usable_local_id_is_reported_and_does_not_hold_back_the_others() {
    // A TEXT primary key may be NULL in SQLite; such a row sorts first.
    let (dir, db, _conn) = notes_app(
        "null-id",
        "(NULL, 'orphan'), ('a', 'first'), ('b', 'second')",
    );
    let (rx, mut p) = notes_pusher(&dir, &db, r#""batch_size": 2, "#);
    p.sync_once(); // the injected 503
    let report = p.sync_once();
    assert_eq!(
        sorted_keys(&rx.rows()),
        ["a", "b"].map(|k| format!("{DEVICE}:note:{k}"))
    );
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("1 rows have a local_id that is NULL")),
        "{:?}",
        report.errors
    );
}

// ---------------------------------------------------------------- requests in flight

/// Each tracked row's remote id is the id the receiver stored its key under.
fn assert_remote_ids(dir: &Scratch, rx: &Receiver) {
    let by_key: std::collections::HashMap<String, i64> = rx
        .rows()
        .iter()
        .map(|r| (r.idempotency_key.clone().unwrap_or_default(), r.id))
        .collect();
    let rows = tracking_rows(&dir.state_db());
    assert!(!rows.is_empty());
    for t in rows {
        let Value::Integer(id) = t.local_id else {
            panic!("integer ids: {t:?}")
        };
        let key = format!("{DEVICE}:{}:{id}", t.table);
        assert_eq!(t.status, "success", "{t:?}");
        assert_eq!(t.remote_id, by_key.get(&key).copied(), "{key}");
    }
}

#[test]
fn answers_arriving_out_of_order_are_each_recorded_with_their_own_remote_id() {
    let (dir, db) = app("out-of-order", 60, &[]);
    let rx = receiver(&dir, true);
    // One answer in three is held back: the requests sent after it are answered first.
    for i in 0..60 {
        rx.push_fault(match i % 3 {
            0 => ProxyFault::DelayAnswer(Duration::from_millis(150)),
            _ => ProxyFault::Pass,
        });
    }
    let mut p = pusher(&settings(
        &db,
        &rx.url(),
        &dir,
        &[("RELAIS_IN_FLIGHT", "8")],
    ));
    let report = p.sync_once();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.pushed(), 60);
    assert_exact(&db, &rx);
    assert_remote_ids(&dir, &rx);
    let stats = rx.stats();
    assert!(
        (2..=8).contains(&stats.max_in_flight),
        "requests at once: {stats:?}"
    );
    assert_eq!(stats.requests, 60, "nothing sent twice");
}

#[test]
fn one_request_at_a_time_when_in_flight_is_1() {
    let (dir, db) = app("in-flight-1", 20, &[]);
    let rx = receiver(&dir, true);
    let mut p = pusher(&settings(
        &db,
        &rx.url(),
        &dir,
        &[("RELAIS_IN_FLIGHT", "1")],
    ));
    assert!(p.sync_once().is_clean());
    assert_exact(&db, &rx);
    assert_eq!(rx.stats().max_in_flight, 1);
}

#[test]
fn a_transient_error_with_requests_in_flight_stops_the_pass_and_loses_nothing() {
    let (dir, db) = app("in-flight-503", 80, &[]);
    let rx = receiver(&dir, true);
    for i in 0..10 {
        rx.push_fault(match i {
            5 => ProxyFault::Status(503, Some(1)),
            _ => ProxyFault::Pass,
        });
    }
    let mut p = pusher(&settings(
        &db,
        &rx.url(),
        &dir,
        &[("RELAIS_IN_FLIGHT", "4")],
    ));
    let (first, retry_after) = interrupted_pass(&mut p, "503");
    assert_eq!(retry_after, Some(Duration::from_secs(1)));
    // The sending stopped: the rows not sent yet wait for the next pass.
    assert!(first.pushed() < 80, "{first:?}");
    let tracked = tracking_rows(&dir.state_db());
    let acked = with_status(&tracked, "success").len() as u64;
    assert_eq!(acked, first.pushed(), "every acknowledged row recorded");
    let second = p.sync_once();
    assert!(second.is_clean(), "{second:?}");
    assert_exact(&db, &rx);
    assert_remote_ids(&dir, &rx);
}

// ---------------------------------------------------------------- batches

fn with_batches(tag: &str, events: usize) -> (Scratch, PathBuf, Receiver, Pusher) {
    let (dir, db) = app(tag, events, &[]);
    let rx = receiver(&dir, true);
    rx.offer_batches();
    let p = pusher(&settings(&db, &rx.url(), &dir, &[]));
    (dir, db, rx, p)
}

#[test]
fn batches_to_relais_server_store_each_row_once_with_its_id() {
    let (dir, db, rx, mut p) = with_batches("batches", 700);
    let report = p.sync_once();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.pushed(), 700);
    assert_exact(&db, &rx);
    assert_remote_ids(&dir, &rx);
    // One row alone until the backend stored one, then batches of up to 500 rows.
    let uploads = rx.stats().requests;
    assert!((2..=4).contains(&uploads), "{uploads} uploads");
    let again = p.sync_once();
    assert_eq!(again.pushed(), 0);
    assert_eq!(rx.stats().requests, uploads, "nothing sent twice");
}

#[test]
fn a_batch_partly_accepted_records_each_rows_own_outcome() {
    let (dir, _db, rx, mut p) = with_batches("batch-partial", 5);
    rx.push_fault(ProxyFault::Pass);
    rx.push_fault(ProxyFault::Body(common::PARTLY_ACCEPTED.into()));
    let report = p.sync_once();
    assert_eq!((report.pushed(), report.failed()), (3, 2), "{report}");
    let state = dir.state_db();
    let remote = |id| tracked(&state, "evenement", id).and_then(|t| t.remote_id);
    assert_eq!((remote(2), remote(4)), (Some(900), Some(901)));
    for (id, reason) in [(3, "bad date"), (5, "no such endpoint")] {
        let row = tracked(&state, "evenement", id).expect("tracked");
        assert_eq!(row.status, "failed", "{row:?}");
        assert!(row.error.unwrap_or_default().contains(reason));
    }
}

#[test]
fn a_batch_whose_answer_is_lost_is_sent_again_and_stored_once() {
    let (dir, db, rx, mut p) = with_batches("batch-lost", 50);
    rx.push_fault(ProxyFault::Pass);
    rx.push_fault(ProxyFault::LoseAnswer);
    let first = p.sync_once();
    assert!(first.interrupted.is_some(), "{first}");
    assert_eq!(first.pushed(), 1);
    let second = p.sync_once();
    assert!(second.is_clean(), "{second}");
    assert_exact(&db, &rx);
    // The lost batch's 49 rows were sent twice, stored once: one row alone and one batch
    // in each pass.
    assert_eq!(rx.stats().stored, 50);
    assert_eq!(rx.stats().requests, 4);
    assert_remote_ids(&dir, &rx);
}

#[test]
fn a_backend_without_the_batch_endpoint_gets_rows_one_by_one() {
    let (dir, db) = app("no-batches", 12, &[]);
    // The contract's backend: 404 at /api/capabilities.
    let rx = receiver(&dir, true);
    let report = pusher(&settings(&db, &rx.url(), &dir, &[])).sync_once();
    assert!(report.is_clean(), "{report}");
    assert_exact(&db, &rx);
    assert_eq!(rx.stats().requests, 12, "one upload per row");
}

#[test]
fn a_batch_endpoint_that_refuses_a_batch_sends_its_rows_one_by_one() {
    let (dir, db, rx, mut p) = with_batches("batch-refused", 12);
    rx.push_fault(ProxyFault::Pass);
    rx.push_fault(ProxyFault::Status(405, None));
    let report = p.sync_once();
    assert!(report.is_clean(), "{report}");
    assert_exact(&db, &rx);
    assert_remote_ids(&dir, &rx);
    // One row alone, the refused batch, then its 11 rows one by one.
    assert_eq!(rx.stats().requests, 13);
}

/// A drain of 20,000 events: an event written once it is under way goes up before the
/// backlog's last row, not after it, and the scan then skips it as synced.
#[test]
fn an_event_written_during_a_long_drain_goes_before_the_backlog_ends() {
    capture_logs();
    let dir = Scratch::new("live-drain");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, true).expect("create app db");
    insert_events(&conn, 20_000).expect("insert events");
    let rx = receiver(&dir, true);
    // A look for new rows every 100 ms (a quarter of the interval).
    let mut p = pusher(&settings(
        &db,
        &rx.url(),
        &dir,
        &[("SYNC_INTERVAL_SECONDS", "0.4")],
    ));
    let (report, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let under_way = common::wait_for(Duration::from_secs(60), || rx.stats().stored >= 1000);
            insert_events(&Connection::open(&db).expect("open"), 1).expect("new event");
            under_way
        });
        let report = p.sync_once();
        (report, writer.join().expect("writer"))
    });
    assert!(written, "the drain never got under way");
    assert!(report.is_clean(), "{report:?}");
    assert_exact(&db, &rx);
    let rows = rx.rows();
    let at = |id: &str| {
        rows.iter()
            .position(|r| {
                r.idempotency_key
                    .as_deref()
                    .is_some_and(|k| k.ends_with(id))
            })
            .expect("stored")
    };
    assert!(
        at(":evenement:20001") < at(":evenement:20000"),
        "the new event waited for the backlog"
    );
    assert_eq!(rx.stats().requests, 20_001, "nothing sent twice");
}
