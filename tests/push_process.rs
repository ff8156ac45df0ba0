//! Integration tests of the `relais` binary as a child process: peak memory of a
//! 256 MB upload, an application writing while a large BLOB uploads (rollback journal
//! and WAL), a row deleted or changed mid-upload, SIGTERM mid-upload, exit codes.
//! Uploads that must last a while go through a throttling proxy; every wait is on a
//! condition with a deadline.
#![cfg(feature = "demo")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    DEVICE, Proxy, ProxyFault, Receiver, Scratch, agent_env, count_status, log_text, run_relais,
    send_signal, spawn_logged, tracked, vm_hwm_kib, wait_exit, wait_for,
};
use relais::demo::{check_delivery, create_app_db, insert_events, insert_media};
use rusqlite::Connection;

const MB: u64 = 1 << 20;

fn receiver(dir: &Scratch) -> Receiver {
    Receiver::start(&dir.join("receiver"))
}

/// An application database with one media row of `blob` bytes and `events` events.
fn app(dir: &Scratch, wal: bool, blob: u64, events: usize) -> PathBuf {
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, wal).expect("create app db");
    insert_events(&conn, events).expect("insert events");
    insert_media(&conn, Some(blob)).expect("insert media");
    db
}

/// `relais once` exits 0, and every row of `db` is at `rx` exactly once.
fn once_delivers_everything(db: &Path, rx: &Receiver, vars: &[(String, String)]) {
    let out = run_relais(&["once"], vars, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = check_delivery(db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
}

/// The application's own connection, as the issue describes it: 100 ms busy timeout.
fn app_conn(db: &Path, busy: Duration) -> Connection {
    let conn = Connection::open(db).expect("open app db");
    conn.busy_timeout(busy).expect("busy timeout");
    conn
}

/// The `longest read lock` the agent logs for an uploaded media row, e.g. `12.3ms`.
fn longest_read_lock(stderr: &str) -> Option<Duration> {
    let text = stderr.split("longest read lock ").nth(1)?;
    let text = text.split(')').next()?.trim();
    let (number, unit) = text.split_at(text.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let n: f64 = number.parse().ok()?;
    let secs = match unit {
        "ns" => n / 1e9,
        "µs" | "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Only events inserted after the agent read its events may be missing; the media row
/// must have arrived once, byte for byte.
fn assert_media_delivered(db: &Path, rx: &Receiver) {
    let d = check_delivery(db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(
        d.mismatched.is_empty() && d.duplicates == 0,
        "delivery: {d:?}"
    );
    assert!(
        d.missing.iter().all(|k| k.contains(":evenement:")),
        "media missing: {:?}",
        d.missing
    );
}

// ---------------------------------------------------------------- 9. memory

#[test]
fn a_256_mb_blob_uploads_in_bounded_memory() {
    let dir = Scratch::new("memory");
    let began = Instant::now();
    let db = app(&dir, false, 256 * MB, 2);
    let built = began.elapsed();
    let rx = receiver(&dir);
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "3600")],
    );
    let (mut child, stderr) = spawn_logged(&["run"], &vars);
    let upload = Instant::now();
    let stored = wait_for(Duration::from_secs(180), || rx.stats().stored == 3);
    let uploaded = upload.elapsed();
    let hwm = vm_hwm_kib(child.id());
    send_signal(child.id(), "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(5));
    let log = log_text(stderr);
    assert!(stored, "the rows did not arrive; agent log:\n{log}");
    let hwm = hwm.expect("VmHWM of the live agent");
    println!(
        "256 MB BLOB: built in {built:?}, uploaded in {uploaded:?}, agent VmHWM {hwm} KiB ({:.1} MiB)",
        hwm as f64 / 1024.0
    );
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        hwm < 24 * 1024,
        "peak RSS {hwm} KiB is not under 24 MiB\n{log}"
    );
    assert!(
        log.contains("statistics:"),
        "final statistics printed:\n{log}"
    );
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
    assert_eq!(d.expected, 3);
}

// ---------------------------------------------------------------- 10. concurrent writer

/// What the application's writer thread saw.
struct Writer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<Vec<String>>,
}

/// Inserts an event every 10 ms with a 100 ms busy timeout until stopped.
fn start_writer(db: &Path) -> Writer {
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let conn = app_conn(db, Duration::from_millis(100));
    let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
    let handle = std::thread::spawn(move || {
        let mut errors = Vec::new();
        while !s.load(Ordering::Relaxed) {
            match conn.execute(
                "INSERT INTO evenement (date, id_capteur) VALUES ('2025-12-19T08:00:00.000000', 1)",
                [],
            ) {
                Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    errors.push(e.to_string());
                    f.fetch_add(1, Ordering::Relaxed)
                }
            };
            // The application's pace, not synchronisation.
            std::thread::sleep(Duration::from_millis(10));
        }
        errors
    });
    Writer {
        stop,
        ok,
        failed,
        handle,
    }
}

fn concurrent_writer(wal: bool) {
    let mode = if wal { "wal" } else { "rollback" };
    let dir = Scratch::new(&format!("writer-{mode}"));
    let db = app(&dir, wal, 64 * MB, 10);
    let rx = receiver(&dir);
    // 64 MiB is 85 MiB of base64: about 3.5 s at 24 MiB/s.
    let proxy = Proxy::start(&rx.url(), 24 * MB);
    let writer = start_writer(&db);
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let (mut child, stderr) = spawn_logged(&["once"], &vars);
    assert!(
        wait_for(Duration::from_secs(30), || proxy.forwarded() > 2 * MB),
        "the upload did not start"
    );
    let during_from = writer.ok.load(Ordering::Relaxed);
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let during = writer.ok.load(Ordering::Relaxed) - during_from;
    writer.stop.store(true, Ordering::Relaxed);
    let errors = writer.handle.join().unwrap();
    let log = log_text(stderr);
    let failed = writer.failed.load(Ordering::Relaxed);
    let hold = longest_read_lock(&log);
    println!(
        "{mode}: 64 MB upload, {during} application inserts during it, {failed} failed, longest read lock {hold:?}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(failed, 0, "the application got errors: {errors:?}");
    assert!(
        during >= 20,
        "only {during} inserts happened during the upload"
    );
    assert!(hold.is_some(), "longest read lock logged:\n{log}");
    assert_media_delivered(&db, &rx);
    assert_eq!(
        tracked(&dir.state_db(), "media", 1).unwrap().status,
        "success"
    );
}

#[test]
fn the_application_never_gets_busy_during_a_64_mb_upload_rollback_journal() {
    concurrent_writer(false);
}

#[test]
fn the_application_never_gets_busy_during_a_64_mb_upload_wal() {
    concurrent_writer(true);
}

// ---------------------------------------------------------------- 11. row deleted or changed mid-upload

/// Starts `relais once` on a 32 MB media row through an 8 MiB/s proxy, runs `change` on
/// the application's database once 1 MiB has gone through, and returns the tracking row
/// and the exit code.
fn change_mid_upload(tag: &str, change: &str, expected: &str) {
    let dir = Scratch::new(tag);
    let db = app(&dir, false, 32 * MB, 0);
    let rx = receiver(&dir);
    let proxy = Proxy::start(&rx.url(), 8 * MB);
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let (mut child, stderr) = spawn_logged(&["once"], &vars);
    assert!(
        wait_for(Duration::from_secs(30), || proxy.forwarded() > MB),
        "the upload did not start"
    );
    app_conn(&db, Duration::from_secs(5))
        .execute_batch(change)
        .expect("the application's change");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let log = log_text(stderr);
    let row = tracked(&dir.state_db(), "media", 1).expect("tracked");
    assert_eq!(row.status, "failed", "{row:?}\n{log}");
    let error = row.error.unwrap_or_default();
    assert!(error.contains(expected), "error_message: {error}");
    assert!(
        proxy.forwarded() < 40 * MB,
        "the upload was abandoned early"
    );
    assert_eq!(rx.stats().stored, 0, "the receiver stored nothing");
    assert!(rx.rows().is_empty());
    assert_eq!(status.code(), Some(1), "{log}");
}

#[test]
fn a_row_deleted_mid_upload_is_abandoned_and_recorded_failed() {
    change_mid_upload(
        "deleted-mid-upload",
        "DELETE FROM media WHERE id_media = 1",
        "deleted",
    );
}

#[test]
fn a_row_changed_mid_upload_is_abandoned_and_recorded_failed() {
    change_mid_upload(
        "changed-mid-upload",
        "UPDATE media SET video = zeroblob(1000000) WHERE id_media = 1",
        "changed",
    );
}

// ---------------------------------------------------------------- 12. SIGTERM mid-upload

#[test]
fn sigterm_mid_upload_stops_quickly_and_the_row_is_sent_later_once() {
    let dir = Scratch::new("sigterm");
    let db = app(&dir, false, 32 * MB, 3);
    let rx = receiver(&dir);
    let proxy = Proxy::start(&rx.url(), 8 * MB);
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "3600")],
    );
    let (mut child, stderr) = spawn_logged(&["run"], &vars);
    assert!(
        wait_for(Duration::from_secs(30), || proxy.forwarded() > 2 * MB),
        "the upload did not start"
    );
    send_signal(child.id(), "TERM");
    let signalled = Instant::now();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let took = signalled.elapsed();
    let log = log_text(stderr);
    println!("SIGTERM mid-upload: exited in {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}\n{log}");
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("statistics:"), "{log}");
    let row = tracked(&dir.state_db(), "media", 1).expect("tracked");
    assert_eq!(row.status, "pending", "{row:?}");
    assert_eq!(rx.stats().stored, 3, "only the events arrived");

    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    once_delivers_everything(&db, &rx, &vars);
    assert_eq!(
        rx.stats().replays,
        0,
        "the media row was never stored before"
    );
    assert_eq!(
        tracked(&dir.state_db(), "media", 1).unwrap().status,
        "success"
    );
}

// ---------------------------------------------------------------- requests in flight

/// A power cut with 8 uploads in flight: the next run sends again what was not
/// recorded, under the same keys, and the idempotent backend stores every row once.
#[test]
fn sigkill_with_requests_in_flight_then_every_row_is_stored_once() {
    let dir = Scratch::new("kill-in-flight");
    let db = app(&dir, false, 4096, 400);
    let rx = receiver(&dir);
    // Every answer 50 ms late: 8 requests are in flight at any time.
    for _ in 0..400 {
        rx.push_fault(ProxyFault::DelayAnswer(Duration::from_millis(50)));
    }
    let vars = agent_env(&db, &rx.url(), dir.path(), &[("RELAIS_IN_FLIGHT", "8")]);
    let (mut child, stderr) = spawn_logged(&["run"], &vars);
    assert!(
        wait_for(Duration::from_secs(30), || rx.stats().stored >= 60),
        "the push did not start"
    );
    common::power_cut(&mut child);
    let log = log_text(stderr);
    assert!(rx.stats().max_in_flight >= 4, "{:?}\n{log}", rx.stats());
    assert!(rx.stats().stored < 401, "killed before the end");

    once_delivers_everything(&db, &rx, &vars);
    assert_eq!(
        rx.stats().stored,
        401,
        "400 events and the media, once each"
    );
    for id in [1, 200, 400] {
        let row = tracked(&dir.state_db(), "evenement", id).expect("tracked");
        assert_eq!(row.status, "success", "{row:?}");
        assert!(row.remote_id.is_some(), "{row:?}");
    }
}

/// The backend dies in the middle of a pass with batches: a batch is stored but its
/// answer never reaches the agent; at the next pass a batch is cut half-way through its
/// body. The pass after that leaves every row stored exactly once (the lost answer's
/// rows are answered as replays of their first storing).
#[test]
fn the_backend_dying_mid_batch_then_every_row_is_stored_once() {
    let dir = Scratch::new("dying-mid-batch");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, 2000).expect("insert events");
    let rx = receiver(&dir);
    rx.offer_batches();
    // The first batch holds one row (the backend has not stored one yet in this pass).
    rx.push_fault(ProxyFault::Pass);
    rx.push_fault(ProxyFault::LoseAnswer);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let once = || run_relais(&["once"], &vars, Duration::from_secs(60));
    let out = once();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let lost = rx.stats().stored - 1;
    assert!(lost > 1, "{:?}\n{log}", rx.stats());
    assert_eq!(count_status(&dir.state_db(), "success"), 1, "{log}");

    rx.push_fault(ProxyFault::ResetMidBody);
    let out = once();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert_eq!(rx.stats().stored, lost + 1, "the cut batch stored nothing");

    once_delivers_everything(&db, &rx, &vars);
    let stats = rx.stats();
    assert_eq!(stats.stored, 2000, "{stats:?}");
    assert_eq!(count_status(&dir.state_db(), "success"), 2000);
}

/// `relais once` with 8 requests in flight, one answer in three held back 150 ms: the
/// answers arrive out of order and each row is recorded with its own remote id.
#[test]
fn answers_out_of_order_are_each_recorded_with_their_own_remote_id() {
    let dir = Scratch::new("out-of-order-process");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, 60).expect("insert events");
    let rx = receiver(&dir);
    for i in 0..60 {
        rx.push_fault(match i % 3 {
            0 => ProxyFault::DelayAnswer(Duration::from_millis(150)),
            _ => ProxyFault::Pass,
        });
    }
    let vars = agent_env(&db, &rx.url(), dir.path(), &[("RELAIS_IN_FLIGHT", "8")]);
    once_delivers_everything(&db, &rx, &vars);
    let stats = rx.stats();
    assert!(stats.max_in_flight >= 2, "{stats:?}");
    assert_eq!(stats.requests, 60, "nothing sent twice: {stats:?}");
    let rows = rx.rows();
    for id in 1..=60 {
        let stored = rows
            .iter()
            .find(|r| {
                r.idempotency_key
                    .as_deref()
                    .is_some_and(|k| k.ends_with(&format!(":evenement:{id}")))
            })
            .expect("stored");
        let row = tracked(&dir.state_db(), "evenement", id).expect("tracked");
        assert_eq!(row.remote_id, Some(stored.id), "{row:?}");
    }
}

/// `relais once` against a batch answer with rows stored, replayed and rejected: each
/// row is recorded by its own result, and the exit code says rows failed.
#[test]
fn a_batch_partly_accepted_records_each_rows_own_outcome() {
    let dir = Scratch::new("batch-partial-process");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, 5).expect("insert events");
    let rx = receiver(&dir);
    rx.offer_batches();
    // The first batch holds one row; the second the four others.
    rx.push_fault(ProxyFault::Pass);
    rx.push_fault(ProxyFault::Body(common::PARTLY_ACCEPTED.into()));
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let out = run_relais(&["once"], &vars, Duration::from_secs(60));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let state = dir.state_db();
    let remote = |id| tracked(&state, "evenement", id).and_then(|t| t.remote_id);
    assert_eq!((remote(2), remote(4)), (Some(900), Some(901)), "{log}");
    for (id, reason) in [(3, "bad date"), (5, "no such endpoint")] {
        let row = tracked(&state, "evenement", id).expect("tracked");
        assert_eq!(row.status, "failed", "{row:?}");
        assert!(row.error.unwrap_or_default().contains(reason), "{log}");
    }
}

// ---------------------------------------------------------------- 13. exit codes

#[test]
fn once_exits_0_when_everything_is_pushed_and_1_when_a_row_fails() {
    let dir = Scratch::new("exit-codes");
    let db = app(&dir, false, 4096, 3);
    let rx = receiver(&dir);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let out = run_relais(&["once"], &vars, Duration::from_secs(30));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(check_delivery(&db, &rx.rows(), DEVICE).unwrap().is_exact());

    insert_events(&Connection::open(&db).unwrap(), 1).unwrap();
    rx.push_fault(ProxyFault::Status(422, None));
    let out = run_relais(&["once"], &vars, Duration::from_secs(30));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("422"), "the rejection is logged:\n{log}");
    let row = tracked(&dir.state_db(), "evenement", 4).expect("tracked");
    assert_eq!(row.status, "failed");
}

/// Seed 004's bug 5: the application drops a table. `relais once` from cron says it in
/// one line the first time (what was sent, what waits), not at every run, and once more
/// when the table is back; the other table is pushed meanwhile.
#[test]
fn a_dropped_table_is_said_once_and_again_when_it_is_back() {
    let dir = Scratch::new("dropped-table");
    let db = app(&dir, false, 4096, 3);
    let rx = receiver(&dir);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let once = || {
        let out = run_relais(&["once"], &vars, Duration::from_secs(30));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let lines = |log: &str, needle: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    };
    let (code, log) = once();
    assert_eq!(code, Some(0), "{log}");

    let app = Connection::open(&db).expect("app db");
    app.execute_batch("DROP TABLE media").expect("drop");
    insert_events(&app, 2).expect("events");
    let (code, log) = once();
    assert_eq!(code, Some(1), "a table gone is not a clean pass: {log}");
    let said = lines(&log, "no such table");
    assert_eq!(said.len(), 1, "{log}");
    let expected = format!(
        "ERROR source {} table media: no such table: media (dropped by the application, or never created in this file): 1 of its rows were sent and stay recorded as sent, no row read from it waits to be sent, rows written since the last read are gone with it; the other tables and files are pushed as usual",
        db.display()
    );
    assert!(said[0].contains(&expected), "{}", said[0]);
    let events = |rx: &Receiver| {
        rx.rows()
            .iter()
            .filter(|r| r.endpoint == "evenements")
            .count()
    };
    assert_eq!(events(&rx), 5, "the other table is pushed");

    let (code, log) = once();
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(
        lines(&log, "no such table"),
        Vec::<String>::new(),
        "said once"
    );
    assert_eq!(
        lines(&log, "media pushed 0 failed 0, table gone;").len(),
        1,
        "{log}"
    );

    // The application creates the table again, its ids continuing.
    app.execute_batch(relais::demo::SCHEMA).expect("schema");
    app.execute(
        "INSERT INTO media (id_media, date, id_capteur, numero_camera) VALUES (2, '2025-12-19T08:00:00.000000', 4, 1)",
        [],
    )
    .expect("media 2");
    let (code, log) = once();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        lines(
            &log,
            "table media: the table is back; its rows are pushed again"
        )
        .len(),
        1,
        "{log}"
    );
    assert!(check_delivery(&db, &rx.rows(), DEVICE).unwrap().is_exact());
    let media = rx.rows().iter().filter(|r| r.endpoint == "media").count();
    assert_eq!(media, 2);
}
