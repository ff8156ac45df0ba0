//! Seed 004 (DBsync) end to end: day files `YYYY_MM_DD.db` in one directory, the agent
//! (in-process) on the glob `<dir>/*.db`, relais-server on PostgreSQL (its own cluster:
//! the test stops it). Between passes a new day file appears, the `media` table is
//! dropped in one file while two of its rows are read but unsent (the seed's bug 5), and
//! PostgreSQL stops and comes back (bugs 3 and 4). At the end PostgreSQL holds exactly
//! the rows of the day files, each once, and the agent's tracking says the same: for the
//! dropped table, the rows acknowledged before the drop; its two unsent rows stay
//! tracked as unsynced, waiting for the table to come back.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{Server, sha256_hex, wait_for};
use relais::demo::{create_app_db, insert_events, insert_media, settings_for};
use relais::push::{CycleReport, Interruption};

/// The store check's lines (server/src/store/watch.rs).
use common::{STORE_BACK_LINE as BACK_LINE, STORE_DOWN_LINE as DOWN_LINE};

const DAY1: &str = "2025_12_18.db";
const DAY2: &str = "2025_12_19.db";
const DAY3: &str = "2025_12_20.db";
const KIB: u64 = 1024;

/// One row, as the day file has it and as it arrived: (file, table, local id, what it
/// holds: the event's date, or the media BLOB's size and SHA-256).
type Row = (String, String, i64, String);

#[test]
fn day_files_reach_postgresql_exactly_once_through_a_dropped_table_and_a_restart() {
    let Some((cluster, server)) = common::on_own_cluster() else {
        return;
    };
    let dir = common::scratch("dbsync");
    let days = dir.join("days");
    std::fs::create_dir_all(dir.join("log")).expect("log dir");
    std::fs::create_dir_all(&days).expect("days dir");
    let day1 = day_file(
        &days.join(DAY1),
        30,
        &[Some(100 * KIB), None, Some(80 * KIB)],
    );
    let day2 = day_file(&days.join(DAY2), 20, &[Some(90 * KIB)]);

    let settings = settings_for(&days.join("*.db"), &server.url, &dir, &[]).expect("settings");
    assert_eq!(settings.local_db_path, format!("{}/*.db", days.display()));
    if let Some(w) = relais::logging::init(&settings.log) {
        panic!("{w}");
    }
    let mut pusher =
        relais::daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false)))
            .expect("pusher");
    let mut pass = || {
        let report = pusher.sync_once();
        relais::daemon::log_report(&report);
        report
    };

    // 1. Two day files, pushed whole.
    let first = pass();
    assert!(first.is_clean(), "{first}");
    assert_eq!(first.pushed(), 30 + 3 + 20 + 1, "{first}");

    // 2. New rows in both files; PostgreSQL stops. The pass reads day 1's new media,
    // records them, and stops at the first 503.
    insert_media(&day1, Some(70 * KIB)).expect("media 4");
    insert_media(&day1, None).expect("media 5");
    insert_events(&day2, 10).expect("events 21..30");
    cluster.stop();
    let down = pass();
    assert_unavailable(&down);
    assert_eq!(down.pushed(), 0, "{down}");
    assert!(
        wait_for(Duration::from_secs(5), || server.logged(DOWN_LINE)),
        "no warning from the server's store check"
    );
    let state = dir.join("state").join("relais.db");
    assert_eq!(
        tracked(&state, DAY1, "media", "sync_status != 'success'"),
        [4, 5],
        "media 4 and 5 read, not sent"
    );
    let acked_before_drop = tracked(&state, DAY1, "media", "sync_status = 'success'");
    assert_eq!(acked_before_drop, [1, 2, 3]);
    // Day 1's media as they were, for the end: the table is about to go.
    let day1_media: Vec<Row> = file_rows(&days.join(DAY1))
        .into_iter()
        .filter(|r| r.1 == "media" && acked_before_drop.contains(&r.2))
        .collect();

    // 3. The application drops day 1's media table while 4 and 5 wait; still no
    // PostgreSQL. The pass says so once, and goes on with the other tables and files.
    day1.execute_batch("DROP TABLE media").expect("drop media");
    let dropped = pass();
    assert_unavailable(&dropped);
    assert_eq!(dropped.errors.len(), 1, "{:?}", dropped.errors);
    assert_gone(&dropped, DAY1, "media");

    // 4. PostgreSQL is back: the server reconnects by itself. A third day file appears.
    common::resume_until_ready(&cluster, &server);
    let _day3 = day_file(&days.join(DAY3), 5, &[Some(64 * KIB)]);
    let back = pass();
    assert_eq!(back.interrupted, None, "{back}");
    assert!(back.errors.is_empty(), "said once: {:?}", back.errors);
    assert_eq!(back.pushed(), 10 + 5 + 1, "{back}");
    assert_gone(&back, DAY1, "media");

    // 5. Nothing left but the gone table's two rows.
    let idle = pass();
    assert_eq!(idle.pushed(), 0, "{idle}");
    assert!(
        idle.errors.is_empty() && idle.interrupted.is_none(),
        "{idle}"
    );
    assert_gone(&idle, DAY1, "media");

    // PostgreSQL holds exactly the day files' rows (day 1's media: those acknowledged
    // before the drop), each once.
    let mut expected: BTreeSet<Row> = day1_media.into_iter().collect();
    for day in [DAY1, DAY2, DAY3] {
        expected.extend(file_rows(&days.join(day)));
    }
    let stored = stored_rows(&server);
    assert_eq!(stored.len(), expected.len(), "no row twice");
    assert_eq!(
        stored.iter().cloned().collect::<BTreeSet<Row>>(),
        expected,
        "the day files' rows, in PostgreSQL"
    );
    let duplicates = server.rows(
        "SELECT device_id, idempotency_key, count(*) FROM received
         GROUP BY device_id, idempotency_key HAVING count(*) > 1",
    );
    assert!(duplicates.is_empty(), "{duplicates:?}");
    // The tracking agrees: acknowledged is exactly what PostgreSQL has; day 1's media 4
    // and 5 still wait for their table.
    let ids = |rows: &BTreeSet<Row>| -> BTreeSet<(String, String, i64)> {
        rows.iter()
            .map(|(f, t, id, _)| (f.clone(), t.clone(), *id))
            .collect()
    };
    assert_eq!(
        acked(&state),
        ids(&expected),
        "sync_tracking's success rows"
    );
    assert_eq!(
        tracked(&state, DAY1, "media", "sync_status != 'success'"),
        [4, 5]
    );

    // The agent's log: the dropped table in one line, naming the file and the table,
    // what was sent of it and what waits.
    let log = std::fs::read_to_string(dir.join("log").join("relais.log")).expect("agent log");
    let gone: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no such table"))
        .collect();
    assert_eq!(gone.len(), 1, "{log}");
    let line = gone[0];
    let day1_path = days.join(DAY1).display().to_string();
    for part in [
        format!(
            "ERROR source {day1_path} table media: no such table: media (dropped by the application"
        ),
        "3 of its rows were sent and stay recorded as sent".into(),
        "2 rows read from it but not sent yet wait until it is back".into(),
        "the other tables and files are pushed as usual".into(),
    ] {
        assert!(line.contains(&part), "{part:?} not in {line}");
    }
    // The server: one line when PostgreSQL went, one when it came back.
    assert_eq!(server.logged_count(DOWN_LINE), 1, "{}", server.log_text());
    assert_eq!(server.logged_count(BACK_LINE), 1, "{}", server.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A day file with the contract's schema, `events` events and one media row per size.
fn day_file(path: &Path, events: usize, media: &[Option<u64>]) -> rusqlite::Connection {
    let conn = create_app_db(path, false).expect("day file");
    insert_events(&conn, events).expect("events");
    for size in media {
        insert_media(&conn, *size).expect("media");
    }
    conn
}

/// A pass that stopped at the server's 503 (PostgreSQL down), to be retried after its
/// `Retry-After`.
fn assert_unavailable(report: &CycleReport) {
    assert!(
        matches!(&report.interrupted, Some(Interruption::Backend { reason, retry_after })
            if reason.contains("503") && *retry_after == Some(Duration::from_secs(3))),
        "{report}"
    );
}

fn assert_gone(report: &CycleReport, file: &str, table: &str) {
    let gone: Vec<(&str, &str)> = report
        .tables
        .iter()
        .filter(|t| t.gone)
        .map(|t| (file_name(&t.source), t.table.as_str()))
        .collect();
    assert_eq!(gone, [(file, table)], "{report}");
    assert!(
        report
            .to_string()
            .contains(&format!("{table}@{file} pushed 0 failed 0, table gone;")),
        "{report}"
    );
}

/// Every event and media row of a day file (none for a table it no longer has).
fn file_rows(path: &Path) -> Vec<Row> {
    let conn = rusqlite::Connection::open(path).expect("day file");
    let file = file_name(&path.display().to_string()).to_string();
    let mut rows: Vec<Row> = Vec::new();
    let mut events = conn
        .prepare("SELECT id_evenement, date FROM evenement")
        .expect("events");
    let found = events
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .expect("events");
    for row in found {
        let (id, date) = row.expect("event");
        rows.push((file.clone(), "evenement".into(), id, date));
    }
    if let Ok(mut media) = conn.prepare("SELECT id_media, video FROM media") {
        let found = media
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
            })
            .expect("media");
        for row in found {
            let (id, video) = row.expect("media row");
            let held = video.map_or("no BLOB".into(), |v| {
                format!("{} {}", v.len(), sha256_hex(&v))
            });
            rows.push((file.clone(), "media".into(), id, held));
        }
    }
    rows
}

/// What the server stored, each push as a [`Row`] named by its idempotency key
/// (`demo-pi:<table>@<file>:<local id>`).
fn stored_rows(server: &Server) -> Vec<Row> {
    server
        .rows(
            "SELECT idempotency_key, endpoint, body->>'date', media_size, media_sha256
             FROM received WHERE device_id = 'demo-pi'",
        )
        .into_iter()
        .map(|r| {
            let [Some(key), Some(endpoint), date, size, sha] = &r[..] else {
                panic!("stored row {r:?}");
            };
            let (table_file, id) = key
                .strip_prefix("demo-pi:")
                .and_then(|k| k.rsplit_once(':'))
                .expect("idempotency key");
            let (table, file) = table_file.split_once('@').expect("key names the file");
            let held = match (endpoint.as_str(), date, size, sha) {
                ("/api/evenements", Some(date), None, None) => date.clone(),
                ("/api/media", _, Some(size), Some(sha)) => format!("{size} {sha}"),
                ("/api/media", _, None, None) => "no BLOB".into(),
                _ => panic!("stored row {r:?}"),
            };
            let id = id.parse().expect("local id");
            (file.to_string(), table.to_string(), id, held)
        })
        .collect()
}

/// The local ids of `table` of day file `file` tracked with `status_is`, in order.
fn tracked(state: &Path, file: &str, table: &str, status_is: &str) -> Vec<i64> {
    let db = rusqlite::Connection::open(state).expect("state db");
    let sql = format!(
        "SELECT local_id FROM sync_tracking WHERE source LIKE '%/' || ?1 AND table_name = ?2
         AND {status_is} ORDER BY local_id"
    );
    let mut stmt = db.prepare(&sql).expect("tracking");
    stmt.query_map([file, table], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .expect("tracking")
}

/// The rows the tracking records as acknowledged: (file, table, local id).
fn acked(state: &Path) -> BTreeSet<(String, String, i64)> {
    let db = rusqlite::Connection::open(state).expect("state db");
    let mut stmt = db
        .prepare(
            "SELECT source, table_name, local_id FROM sync_tracking WHERE sync_status = 'success'",
        )
        .expect("tracking");
    stmt.query_map([], |r| {
        let source: String = r.get(0)?;
        Ok((file_name(&source).to_string(), r.get(1)?, r.get(2)?))
    })
    .and_then(|rows| rows.collect())
    .expect("tracking")
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
