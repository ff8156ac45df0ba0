//! Rows the high-water mark cannot see, and sources whose name changed or whose file
//! vanished: the reconciliation sweep (`relais reconcile`, the slow clock, `once`), the
//! warning for a table whose highest id went down, ids that are both an integer and a
//! text, respelled and renamed source files, `relais forget`. Every test asserts on what
//! relais-server stored and on the agent's `sync_tracking` rows.
#![cfg(feature = "demo")]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{DEVICE, Receiver, Scratch, agent_env, run_relais, tracking_rows};
use relais::demo::{check_delivery, create_app_db, insert_events, settings_for};
use relais::push::Pusher;
use rusqlite::Connection;
use rusqlite::types::Value;

const PASS: Duration = Duration::from_secs(30);

fn receiver(dir: &Scratch) -> Receiver {
    Receiver::start(&dir.join("receiver"))
}

fn pusher(db: &str, url: &str, dir: &Scratch, extra: &[(&str, &str)]) -> Pusher {
    let settings = settings_for(Path::new(db), url, dir.path(), extra).expect("settings");
    relais::daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false))).expect("pusher")
}

fn insert_event_with_id(db: &Path, id: i64) {
    Connection::open(db)
        .unwrap()
        .execute(
            "INSERT INTO evenement (id_evenement, date, id_capteur) VALUES (?1, '2026-12-01T10:00:00', 1)",
            [id],
        )
        .unwrap();
}

fn keys(rx: &Receiver) -> Vec<String> {
    let mut k: Vec<String> = rx
        .rows()
        .into_iter()
        .filter_map(|r| r.idempotency_key)
        .collect();
    k.sort();
    k
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An application database with events 1 to 39 and 50 to 59, all pushed in one pass.
fn pushed_with_a_gap(dir: &Scratch) -> (std::path::PathBuf, Receiver) {
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).unwrap();
    insert_events(&conn, 39).unwrap();
    for id in 50..60 {
        insert_event_with_id(&db, id);
    }
    let rx = receiver(dir);
    let report = pusher(&db.display().to_string(), &rx.url(), dir, &[]).sync_once();
    assert_eq!(report.pushed(), 49, "{report}");
    (db, rx)
}

#[test]
fn rows_committed_below_the_high_water_mark_are_found_by_the_sweep() {
    let dir = Scratch::new("sweep");
    let (db, rx) = pushed_with_a_gap(&dir);
    insert_event_with_id(&db, 45);
    insert_event_with_id(&db, -3);
    // The idle pass stays an idle pass: the sweep runs on the slow clock.
    let mut p = pusher(&db.display().to_string(), &rx.url(), &dir, &[]);
    assert_eq!(p.sync_once().pushed(), 0);

    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let out = run_relais(&["reconcile"], &vars, PASS);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("2 untracked rows queued"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("ids -3, 45"),
        "the log names the ids: {}",
        stderr(&out)
    );
    assert_eq!(p.sync_once().pushed(), 2);

    // A `once` whose last sweep is older than the slow clock sweeps by itself.
    insert_event_with_id(&db, 46);
    let state = Connection::open(dir.state_db()).unwrap();
    state
        .execute(
            "UPDATE agent_meta SET value = CAST(value - 7200 AS TEXT) WHERE key = 'last_sweep_at'",
            [],
        )
        .unwrap();
    let out = run_relais(&["once"], &vars, PASS);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let delivery = check_delivery(&db, &rx.rows(), DEVICE).unwrap();
    assert!(delivery.is_exact(), "{delivery:?}");
    let k = keys(&rx);
    for id in ["-3", "45", "46"] {
        assert!(k.contains(&format!("{DEVICE}:evenement:{id}")), "{k:?}");
    }
    assert!(
        tracking_rows(&dir.state_db())
            .iter()
            .all(|r| r.status == "success")
    );
}

#[test]
fn a_table_whose_highest_id_went_down_is_said_loudly() {
    let dir = Scratch::new("high-water-down");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).unwrap();
    insert_events(&conn, 10).unwrap();
    let rx = receiver(&dir);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    assert_eq!(run_relais(&["once"], &vars, PASS).status.code(), Some(0));
    // The table is recreated: ids start again at 1.
    conn.execute_batch("DELETE FROM evenement; DELETE FROM sqlite_sequence;")
        .unwrap();
    insert_events(&conn, 3).unwrap();
    let out = run_relais(&["once"], &vars, PASS);
    let log = stderr(&out);
    assert!(
        log.contains("table evenement: its highest id went down from 10 (already sent) to 3")
            && log.contains("ids 4 to 10"),
        "{log}"
    );
    // Said once per new low, not at every pass.
    let again = run_relais(&["once"], &vars, PASS);
    assert!(!stderr(&again).contains("went down"), "{}", stderr(&again));
}

#[test]
fn an_id_both_integer_and_text_refuses_the_table() {
    let dir = Scratch::new("twin-ids");
    let db = dir.join("app.db");
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE reading (id, value TEXT);
         INSERT INTO reading VALUES (11, 'a'), (12, 'b'), ('12', 'c');",
    )
    .unwrap();
    let config = dir.join("relais.json");
    std::fs::write(
        &config,
        r#"{"tables": [{"name": "reading", "endpoint": "/api/readings",
            "query": "SELECT id AS local_id, value FROM reading"}]}"#,
    )
    .unwrap();
    let rx = receiver(&dir);
    let config = config.display().to_string();
    let mut p = pusher(
        &db.display().to_string(),
        &rx.url(),
        &dir,
        &[("RELAIS_CONFIG", &config)],
    );
    let report = p.sync_once();
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("local_id 12 occurs both as the integer 12 and as the text '12'")),
        "{:?}",
        report.errors
    );
    // Neither twin went out under the key they share.
    assert!(
        keys(&rx).iter().all(|k| !k.ends_with(":12")),
        "{:?}",
        keys(&rx)
    );
    assert!(
        tracking_rows(&dir.state_db())
            .iter()
            .all(|r| r.local_id != Value::Integer(12) && r.local_id != Value::Blob(b"12".to_vec()))
    );
}

#[test]
fn a_respelled_path_is_the_same_source() {
    let dir = Scratch::new("respelled");
    let db = dir.join("surveillance.db");
    insert_events(&create_app_db(&db, false).unwrap(), 6).unwrap();
    let rx = receiver(&dir);
    let plain = db.display().to_string();
    assert_eq!(pusher(&plain, &rx.url(), &dir, &[]).sync_once().pushed(), 6);
    let requests = rx.stats().requests;
    let respelled = format!("{}//./surveillance.db", dir.path().display());
    let report = pusher(&respelled, &rx.url(), &dir, &[]).sync_once();
    assert_eq!(report.pushed(), 0, "{report}");
    assert_eq!(rx.stats().requests, requests, "rows were sent again");
    let sources: Vec<String> = tracking_rows(&dir.state_db())
        .into_iter()
        .map(|r| r.source)
        .collect();
    assert!(sources.iter().all(|s| *s == plain), "{sources:?}");
}

#[test]
fn a_renamed_file_keeps_its_rows_and_keys_and_a_new_file_in_its_place_is_new() {
    let dir = Scratch::new("renamed");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let today = data.join("today.db");
    insert_events(&create_app_db(&today, false).unwrap(), 6).unwrap();
    let rx = receiver(&dir);
    let glob = format!("{}/*.db", data.display());
    let mut p = pusher(&glob, &rx.url(), &dir, &[]);
    assert_eq!(p.sync_once().pushed(), 6);
    let requests = rx.stats().requests;

    let renamed = data.join("2026_12_01.db");
    std::fs::rename(&today, &renamed).unwrap();
    assert_eq!(p.sync_once().pushed(), 0);
    assert_eq!(rx.stats().requests, requests, "rows were sent again");

    insert_events(&Connection::open(&renamed).unwrap(), 1).unwrap();
    insert_events(&create_app_db(&today, false).unwrap(), 2).unwrap();
    let report = p.sync_once();
    assert_eq!(report.pushed(), 3, "{report}");
    let k = keys(&rx);
    assert!(
        k.contains(&format!("{DEVICE}:evenement@today.db:7")),
        "{k:?}"
    );
    for id in [1, 2] {
        assert!(
            k.contains(&format!("{DEVICE}:evenement@today.db#2:{id}")),
            "{k:?}"
        );
    }
    assert_eq!(rx.stats().stored, 9, "every row stored once, none replayed");
}

#[test]
fn a_vanished_source_is_said_and_can_be_forgotten() {
    let dir = Scratch::new("vanished");
    let db = dir.join("surveillance.db");
    insert_events(&create_app_db(&db, false).unwrap(), 3).unwrap();
    // Nothing listens there: the batch stays unsynced.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let vars = agent_env(&db, &dead_url, dir.path(), &[]);
    assert_eq!(run_relais(&["once"], &vars, PASS).status.code(), Some(1));
    let plain = db.display().to_string();

    let out = run_relais(&["forget", &plain], &vars, PASS);
    assert_eq!(out.status.code(), Some(1), "the file is still there");
    assert!(stderr(&out).contains("is still there"), "{}", stderr(&out));

    std::fs::remove_file(&db).unwrap();
    let rx = receiver(&dir);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let out = run_relais(&["once"], &vars, PASS);
    assert_eq!(out.status.code(), Some(1));
    let said = format!("source {plain} vanished with 3 unsynced rows");
    assert!(stderr(&out).contains(&said), "{}", stderr(&out));
    let status = stdout(&run_relais(&["status"], &vars, PASS));
    assert!(
        status.contains(&format!("vanished: source {plain} with 3")),
        "{status}"
    );

    let respelled = format!("{}//surveillance.db", dir.path().display());
    let out = run_relais(&["forget", &respelled], &vars, PASS);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("closed out 3 unsynced rows"),
        "{}",
        stderr(&out)
    );
    assert!(tracking_rows(&dir.state_db()).is_empty());
    let status = stdout(&run_relais(&["status"], &vars, PASS));
    assert!(
        status.contains(&format!("forgotten: source {plain}: 3")),
        "{status}"
    );
    assert_eq!(rx.stats().requests, 0);
}

#[test]
fn the_backlog_counts_rows_no_pass_has_read() {
    let dir = Scratch::new("backlog");
    let db = dir.join("surveillance.db");
    insert_events(&create_app_db(&db, false).unwrap(), 50).unwrap();
    let config = dir.join("relais.json");
    std::fs::write(&config, r#"{"batch_size": 10}"#).unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let config = config.display().to_string();
    let vars = agent_env(&db, &dead_url, dir.path(), &[("RELAIS_CONFIG", &config)]);
    let out = run_relais(&["once"], &vars, PASS);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("50 rows are not synced yet: 10 tracked and waiting, 40 not read yet"),
        "{}",
        stderr(&out)
    );
    let status = stdout(&run_relais(&["status"], &vars, PASS));
    assert!(
        status.contains("evenement: 10 tracked and waiting, 40 rows not read yet"),
        "{status}"
    );
}

/// A table dropped from its file has nothing to sweep: the sweep is done without it,
/// or it would stay due and run again, whole, at every pass.
#[test]
fn a_dropped_table_does_not_keep_the_sweep_due() {
    let dir = Scratch::new("sweep-dropped");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).unwrap();
    insert_events(&conn, 3).unwrap();
    relais::demo::insert_media(&conn, None).unwrap();
    let rx = receiver(&dir);
    let mut p = pusher(&db.display().to_string(), &rx.url(), &dir, &[]);
    assert!(p.sync_once().is_clean());
    conn.execute_batch("DROP TABLE media").unwrap();
    let state = Connection::open(dir.state_db()).unwrap();
    state
        .execute(
            "UPDATE agent_meta SET value = '0' WHERE key = 'last_sweep_at'",
            [],
        )
        .unwrap();
    let swept = p.reconcile();
    assert!(swept.errors.is_empty(), "{:?}", swept.errors);
    let last: i64 = state
        .query_row(
            "SELECT CAST(value AS INTEGER) FROM agent_meta WHERE key = 'last_sweep_at'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        last >= common::unix_now() - 5,
        "the sweep was recorded done"
    );
}
