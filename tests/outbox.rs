//! Two-way sync's change capture (issue 17, part 1), on real SQLite files with the real
//! `relais` binary: `relais outbox install|uninstall|status`, what the triggers write,
//! the application's transactions (rollback, echo suppression, writes during install),
//! schema drift repaired by the agent's pass, and the insert-only push beside it.
#![cfg(feature = "demo")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{DEVICE, Receiver, Scratch, agent_env, run_relais, spawn_logged, wait_exit};
use miniserde::json::{Number, Value};
use relais::demo::{check_delivery, create_app_db, insert_events};
use rusqlite::Connection;

const GRADES: &str = "CREATE TABLE grades (id TEXT PRIMARY KEY, student TEXT NOT NULL, \
                      value REAL, scan BLOB)";

/// A scratch directory with an application database made by `schema`, and the sync
/// configuration of `tables` (JSON objects of `sync.tables`, `source` filled in).
struct Setup {
    dir: Scratch,
    db: PathBuf,
    vars: Vec<(String, String)>,
}

fn setup(tag: &str, schema: &str, tables: &[&str]) -> Setup {
    let dir = Scratch::new(tag);
    let db = dir.join("app.db");
    Connection::open(&db)
        .unwrap()
        .execute_batch(schema)
        .unwrap();
    with_config(dir, db, tables, "http://127.0.0.1:9")
}

fn with_config(dir: Scratch, db: PathBuf, tables: &[&str], backend: &str) -> Setup {
    let source = db.display().to_string();
    let entries: Vec<String> = tables
        .iter()
        .map(|t| format!(r#"{{"source": {source:?}, {t}}}"#))
        .collect();
    let config = dir.join("relais.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"sync": {{"tenant": "school-1", "tables": [{}]}}}}"#,
            entries.join(", ")
        ),
    )
    .unwrap();
    let vars = agent_env(
        &db,
        backend,
        dir.path(),
        &[
            ("RELAIS_CONFIG", &config.display().to_string()),
            ("RELAIS_LOG_DIR", "-"),
        ],
    );
    Setup { dir, db, vars }
}

/// `relais <args>`: exit code, stdout, stderr.
fn relais(s: &Setup, args: &[&str]) -> (i32, String, String) {
    let out = run_relais(args, &s.vars, Duration::from_secs(60));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn install(s: &Setup) -> String {
    let (code, out, err) = relais(s, &["outbox", "install"]);
    assert_eq!(code, 0, "{out}{err}");
    out + &err
}

/// The application's connection, as the issue describes it: 100 ms busy timeout.
fn app(db: &Path) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_millis(100)).unwrap();
    conn
}

#[derive(Debug)]
struct Event {
    id: String,
    tenant: String,
    entity_type: String,
    entity_id: String,
    operation: String,
    payload: Value,
    local_version: i64,
    created_at: String,
    attempts: i64,
    status: String,
}

/// The outbox's events in capture order.
fn events(db: &Path) -> Vec<Event> {
    let conn = Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT id, tenant, entity_type, entity_id, operation, payload, local_version, \
             created_at, attempts, status FROM relais_outbox ORDER BY rowid",
        )
        .unwrap();
    stmt.query_map([], |r| {
        let payload: String = r.get(5)?;
        Ok(Event {
            id: r.get(0)?,
            tenant: r.get(1)?,
            entity_type: r.get(2)?,
            entity_id: r.get(3)?,
            operation: r.get(4)?,
            payload: miniserde::json::from_str(&payload).expect("payload is JSON"),
            local_version: r.get(6)?,
            created_at: r.get(7)?,
            attempts: r.get(8)?,
            status: r.get(9)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// (operation, entity_id, local_version) of each event.
fn summary(db: &Path) -> Vec<(String, String, i64)> {
    events(db)
        .into_iter()
        .map(|e| (e.operation, e.entity_id, e.local_version))
        .collect()
}

fn field<'a>(payload: &'a Value, key: &str) -> &'a Value {
    match payload {
        Value::Object(o) => o.get(key).unwrap_or(&Value::Null),
        _ => panic!("payload is not an object: {payload:?}"),
    }
}

fn text(v: &Value) -> &str {
    match v {
        Value::String(s) => s,
        _ => panic!("not a string: {v:?}"),
    }
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Number(Number::F64(n)) => *n,
        Value::Number(Number::U64(n)) => *n as f64,
        Value::Number(Number::I64(n)) => *n as f64,
        _ => panic!("not a number: {v:?}"),
    }
}

/// The database's schema, every object with its SQL.
fn schema(db: &Path) -> Vec<(String, String, String, Option<String>)> {
    let conn = Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn sync_grades() -> &'static str {
    r#""table": "grades", "strategy": "server_wins", "entity_type": "GRADE""#
}

#[test]
fn create_update_delete_are_captured_with_versions_per_entity() {
    let s = setup("outbox-crud", GRADES, &[sync_grades()]);
    let said = install(&s);
    assert!(
        said.contains("table grades captured as GRADE (server_wins)"),
        "{said}"
    );
    assert!(
        !said.contains("warning"),
        "a text key draws no warning: {said}"
    );
    let conn = app(&s.db);
    conn.execute_batch(
        "INSERT INTO grades VALUES ('g1', 'ann', 12.5, x'00ff');
         INSERT INTO grades VALUES ('g2', 'bob', NULL, NULL);
         UPDATE grades SET value = 14 WHERE id = 'g1';
         UPDATE grades SET value = 14 WHERE id = 'g1'; -- changes nothing: no event
         DELETE FROM grades WHERE id = 'g1';
         UPDATE grades SET id = 'g3' WHERE id = 'g2'; -- a new key: DELETE, then CREATE",
    )
    .unwrap();
    let s_ = |o: &str, id: &str, v: i64| (o.to_string(), id.to_string(), v);
    assert_eq!(
        summary(&s.db),
        [
            s_("CREATE", "g1", 1),
            s_("CREATE", "g2", 1),
            s_("UPDATE", "g1", 2),
            s_("DELETE", "g1", 3),
            s_("DELETE", "g2", 2),
            s_("CREATE", "g3", 1),
        ]
    );
    let all = events(&s.db);
    for e in &all {
        assert_eq!(
            (e.tenant.as_str(), e.entity_type.as_str()),
            ("school-1", "GRADE")
        );
        assert_eq!((e.status.as_str(), e.attempts), ("PENDING", 0));
        let parts: Vec<&str> = e.id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(
            parts[2].starts_with('4') && "89ab".contains(&parts[3][..1]),
            "{}",
            e.id
        );
        // 2025-12-18T17:30:00.123Z
        assert_eq!(e.created_at.len(), 24, "{}", e.created_at);
        assert!(e.created_at.ends_with('Z') && &e.created_at[19..20] == ".");
    }
    let created = &all[0].payload;
    assert_eq!(text(field(created, "id")), "g1");
    assert_eq!(text(field(created, "student")), "ann");
    assert_eq!(number(field(created, "value")), 12.5);
    assert_eq!(
        text(field(field(created, "scan"), "$hex")),
        "00FF",
        "a BLOB as hex"
    );
    assert_eq!(number(field(&all[2].payload, "value")), 14.0, "the new row");
    assert_eq!(
        number(field(&all[3].payload, "value")),
        14.0,
        "a DELETE carries the old row"
    );
    assert!(matches!(field(&all[4].payload, "value"), Value::Null));
    assert_eq!(text(field(&all[5].payload, "id")), "g3");
}

#[test]
fn a_composite_key_is_a_json_array() {
    let s = setup(
        "outbox-composite",
        "CREATE TABLE enrolment (student TEXT, course TEXT, mark INTEGER, \
         PRIMARY KEY (student, course)) WITHOUT ROWID",
        &[r#""table": "enrolment", "strategy": "field_merge""#],
    );
    install(&s);
    let conn = app(&s.db);
    conn.execute_batch(
        "INSERT INTO enrolment VALUES ('s1', 'maths', 12);
         UPDATE enrolment SET mark = 15;",
    )
    .unwrap();
    let key = r#"["s1","maths"]"#;
    assert_eq!(
        summary(&s.db),
        [
            ("CREATE".to_string(), key.to_string(), 1),
            ("UPDATE".to_string(), key.to_string(), 2)
        ]
    );
    assert_eq!(
        events(&s.db)[0].entity_type,
        "ENROLMENT",
        "the table's name by default"
    );
}

#[test]
fn install_refuses_what_it_cannot_capture_and_creates_nothing() {
    let schema_sql = format!(
        "{GRADES}; CREATE TABLE notes (student TEXT, body TEXT); \
         CREATE VIEW best AS SELECT * FROM grades WHERE value > 15;"
    );
    for (table, says) in [
        ("notes", "table notes has no declared PRIMARY KEY"),
        ("absent", "table absent does not exist"),
        ("best", "table best is a view, not a table"),
    ] {
        // grades first: refused tables later in the list must leave it uninstalled too.
        let entry = format!(r#""table": "{table}", "strategy": "manual""#);
        let s = setup("outbox-refuse", &schema_sql, &[sync_grades(), &entry]);
        let before = schema(&s.db);
        let (code, out, err) = relais(&s, &["outbox", "install"]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(
            err.contains(says) && err.contains("nothing was installed"),
            "{err}"
        );
        assert_eq!(schema(&s.db), before, "{table}: nothing created");
    }
}

#[test]
fn an_integer_key_installs_with_a_warning() {
    let s = setup(
        "outbox-integer",
        "CREATE TABLE payments (id INTEGER PRIMARY KEY, amount REAL)",
        &[r#""table": "payments", "strategy": "client_wins""#],
    );
    let said = install(&s);
    assert!(
        said.contains("warning: table payments is keyed by an integer (id)")
            && said.contains("collide")
            && said.contains("UUID"),
        "{said}"
    );
    app(&s.db)
        .execute("INSERT INTO payments (amount) VALUES (9.5)", [])
        .unwrap();
    assert_eq!(summary(&s.db), [("CREATE".to_string(), "1".to_string(), 1)]);
}

#[test]
fn a_change_is_captured_if_and_only_if_it_commits() {
    let s = setup("outbox-commit", GRADES, &[sync_grades()]);
    install(&s);
    let mut conn = app(&s.db);
    let tx = conn.transaction().unwrap();
    tx.execute("INSERT INTO grades VALUES ('r1', 'ann', 1, NULL)", [])
        .unwrap();
    tx.rollback().unwrap();
    assert!(
        events(&s.db).is_empty(),
        "a rolled-back change leaves no event"
    );
    let tx = conn.transaction().unwrap();
    tx.execute_batch(
        "INSERT INTO grades VALUES ('c1', 'ann', 1, NULL);
         INSERT INTO grades VALUES ('c2', 'bob', 2, NULL);
         UPDATE grades SET value = 3 WHERE id = 'c1';",
    )
    .unwrap();
    assert!(
        events(&s.db).is_empty(),
        "another connection sees nothing before the commit"
    );
    tx.commit().unwrap();
    let s_ = |o: &str, id: &str, v: i64| (o.to_string(), id.to_string(), v);
    assert_eq!(
        summary(&s.db),
        [
            s_("CREATE", "c1", 1),
            s_("CREATE", "c2", 1),
            s_("UPDATE", "c1", 2)
        ]
    );
}

#[test]
fn writes_while_applying_are_not_captured_and_the_application_s_are() {
    let s = setup("outbox-applying", GRADES, &[sync_grades()]);
    install(&s);
    let mut conn = app(&s.db);
    // What the down-apply of a later part does: set, write, reset, in one transaction.
    let tx = conn.transaction().unwrap();
    tx.execute_batch(
        "UPDATE relais_sync_control SET applying = 1;
         INSERT INTO grades VALUES ('from-server', 'ann', 1, NULL);
         UPDATE grades SET value = 2;
         UPDATE relais_sync_control SET applying = 0;",
    )
    .unwrap();
    tx.commit().unwrap();
    assert!(
        events(&s.db).is_empty(),
        "no echo of the server's own changes"
    );
    conn.execute("UPDATE grades SET value = 5", []).unwrap();
    assert_eq!(
        summary(&s.db),
        [("UPDATE".to_string(), "from-server".to_string(), 1)]
    );
}

#[test]
fn install_while_the_application_writes_never_fails_its_writes() {
    let s = setup("outbox-live", GRADES, &[sync_grades()]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (s.db.clone(), stop.clone());
        std::thread::spawn(move || {
            let conn = app(&db);
            let (mut ids, mut after_stop) = (Vec::new(), 0);
            for i in 0.. {
                let id = format!("w{i:05}");
                // Any error (SQLITE_BUSY past 100 ms) fails the test.
                conn.execute("INSERT INTO grades VALUES (?1, 'ann', 1, NULL)", [&id])
                    .unwrap_or_else(|e| panic!("application write {i} failed: {e}"));
                ids.push(id);
                // An application writing 500 rows a second, which is busy for a device. A
                // writer that takes the lock again the moment it committed, with no pause
                // at all, starves any other writer's busy handler, install's as well as a
                // second application thread's: that is the application's own contention.
                std::thread::sleep(Duration::from_millis(2));
                if stop.load(Ordering::Relaxed) {
                    after_stop += 1;
                    if after_stop == 20 {
                        break;
                    }
                }
            }
            ids
        })
    };
    install(&s);
    stop.store(true, Ordering::Relaxed);
    let written = writer
        .join()
        .expect("the application's writes all succeeded");
    let captured: Vec<String> = events(&s.db).into_iter().map(|e| e.entity_id).collect();
    // Writes committed before the install's commit are not captured, every one after is:
    // the captured ids are the written ones from some point on.
    assert!(captured.len() >= 20, "{} captured", captured.len());
    assert_eq!(captured, written[written.len() - captured.len()..]);
}

#[test]
fn install_waits_for_a_writer_and_fails_clearly_when_it_holds_on() {
    let s = setup("outbox-busy", GRADES, &[sync_grades()]);
    let before = schema(&s.db);
    let mut holder = Connection::open(&s.db).unwrap();
    let tx = holder
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    tx.execute("INSERT INTO grades VALUES ('held', 'ann', 1, NULL)", [])
        .unwrap();
    // Held through install's whole busy timeout (5 s): a clear failure, nothing changed.
    let (code, out, err) = relais(&s, &["outbox", "install"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("held the write lock") && err.contains("nothing was changed"),
        "{err}"
    );
    tx.rollback().unwrap();
    assert_eq!(schema(&s.db), before);
    let check = Connection::open(&s.db).unwrap();
    let ok: String = check
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    // Released while install waits (or before it starts): install goes through.
    let tx = holder
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    tx.execute("INSERT INTO grades VALUES ('held', 'ann', 1, NULL)", [])
        .unwrap();
    let (mut child, stderr) = spawn_logged(&["outbox", "install"], &s.vars);
    tx.commit().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "{}", common::log_text(stderr));
    assert!(
        schema(&s.db)
            .iter()
            .any(|o| o.1 == "relais_sync_grades_ins")
    );
}

#[test]
fn uninstall_restores_the_schema_byte_for_byte_and_keeps_the_data() {
    let s = setup(
        "outbox-uninstall",
        &format!("{GRADES}; CREATE INDEX grades_student ON grades (student);"),
        &[sync_grades()],
    );
    let before = schema(&s.db);
    install(&s);
    let conn = app(&s.db);
    conn.execute_batch(
        "INSERT INTO grades VALUES ('u1', 'ann', 1, NULL);
         INSERT INTO grades VALUES ('u2', 'bob', 2, NULL);",
    )
    .unwrap();
    let (code, out, err) = relais(&s, &["outbox", "uninstall"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("2 events are PENDING, SENT or CONFLICT") && err.contains("--force"),
        "{err}"
    );
    assert_ne!(schema(&s.db), before, "nothing removed");
    let (code, out, err) = relais(&s, &["outbox", "uninstall", "--force"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 unsettled events dropped"), "{out}");
    assert_eq!(schema(&s.db), before);
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM grades", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2);
    // Without an outbox, the application's writes go on as before.
    conn.execute("INSERT INTO grades VALUES ('u3', 'cy', 3, NULL)", [])
        .unwrap();
    // Once everything is settled, uninstall needs no --force.
    install(&s);
    let (code, out, err) = relais(&s, &["outbox", "uninstall"]);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert_eq!(schema(&s.db), before);
}

#[test]
fn status_shows_tables_triggers_and_counts() {
    let s = setup(
        "outbox-status",
        &format!("{GRADES}; CREATE TABLE notes (id TEXT PRIMARY KEY, body TEXT);"),
        &[sync_grades()],
    );
    let (code, out, _) = relais(&s, &["outbox", "status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("not installed: run `relais outbox install`"),
        "{out}"
    );
    install(&s);
    let conn = app(&s.db);
    conn.execute_batch(
        "INSERT INTO grades VALUES ('s1', 'ann', 1, NULL);
         INSERT INTO grades VALUES ('s2', 'ann', 1, NULL);
         UPDATE relais_outbox SET status = 'ACKNOWLEDGED' WHERE entity_id = 's2';
         DROP TRIGGER relais_sync_grades_del;",
    )
    .unwrap();
    let (code, out, err) = relais(&s, &["outbox", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("table grades (GRADE, server_wins): columns id, student, value, scan; key id"),
        "{out}"
    );
    assert!(out.contains("triggers MISSING: del"), "{out}");
    assert!(
        out.contains(
            "events: PENDING 1, SENT 0, ACKNOWLEDGED 1, FAILED 0, CONFLICT 0; oldest pending"
        ),
        "{out}"
    );
    assert!(out.contains("GRADE PENDING: 1"), "{out}");
    let (code, out, _) = relais(&s, &["outbox", "status", "--json"]);
    assert_eq!(code, 0);
    let Ok(Value::Object(doc)) = miniserde::json::from_str::<Value>(&out) else {
        panic!("not a JSON object: {out}");
    };
    let Some(Value::Array(sources)) = doc.get("sources") else {
        panic!("{out}")
    };
    let Value::Array(tables) = field(&sources[0], "tables") else {
        panic!("{out}")
    };
    assert_eq!(text(field(&tables[0], "table")), "grades");
    assert!(matches!(field(&tables[0], "drift"), Value::Bool(false)));
    assert!(matches!(
        field(field(&tables[0], "triggers"), "del"),
        Value::Bool(false)
    ));
    assert!(matches!(
        field(&sources[0], "oldest_pending_s"),
        Value::Number(_)
    ));
}

/// An application database the push knows (the seed's evenement and media tables, ten
/// events) with a synced `grades` table beside it, and a backend.
fn pushed_and_synced(tag: &str) -> (Setup, Receiver) {
    let dir = Scratch::new(tag);
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).unwrap();
    insert_events(&conn, 10).unwrap();
    conn.execute_batch(GRADES).unwrap();
    let rx = Receiver::start(&dir.join("receiver"));
    let url = rx.url();
    (with_config(dir, db, &[sync_grades()], &url), rx)
}

#[test]
fn the_insert_only_push_is_unchanged_beside_a_synced_table() {
    let (s, rx) = pushed_and_synced("outbox-beside");
    install(&s);
    let conn = app(&s.db);
    conn.execute("INSERT INTO grades VALUES ('b1', 'ann', 1, NULL)", [])
        .unwrap();
    insert_events(&conn, 5).unwrap();
    let (code, out, err) = relais(&s, &["once"]);
    assert_eq!(code, 0, "{out}{err}");
    let d = check_delivery(&s.db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
    assert_eq!(rx.rows().len(), 15, "the events, and nothing of the outbox");
    assert_eq!(
        summary(&s.db),
        [("CREATE".to_string(), "b1".to_string(), 1)],
        "the pushed table's rows are not captured"
    );
    // One table, one mode.
    let evenement = s.dir.join("evenement.json");
    std::fs::write(
        &evenement,
        format!(
            r#"{{"sync": {{"tenant": "t", "tables": [{{"source": {:?}, "table": "evenement", "strategy": "manual"}}]}}}}"#,
            s.db.display().to_string()
        ),
    )
    .unwrap();
    let mut vars = s.vars.clone();
    vars.push(("RELAIS_CONFIG".into(), evenement.display().to_string()));
    let out = run_relais(&["outbox", "install"], &vars, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("one table, one mode"), "{err}");
}

#[test]
fn the_agent_recreates_the_triggers_of_a_table_whose_columns_changed() {
    let (s, _rx) = pushed_and_synced("outbox-drift");
    install(&s);
    let conn = app(&s.db);
    conn.execute_batch(
        "ALTER TABLE grades ADD COLUMN comment TEXT;
         INSERT INTO grades VALUES ('d1', 'ann', 1, NULL, 'before the pass');",
    )
    .unwrap();
    let first = events(&s.db);
    assert_eq!(first.len(), 1, "the old triggers go on capturing");
    assert!(
        matches!(field(&first[0].payload, "comment"), Value::Null),
        "without it"
    );
    let (_, out, _) = relais(&s, &["outbox", "status"]);
    assert!(
        out.contains("columns now id, student, value, scan, comment: the agent's next pass"),
        "{out}"
    );
    let (code, out, err) = relais(&s, &["once"]);
    assert_eq!(code, 0, "{out}{err}");
    let line = "table grades: columns added: comment: triggers recreated with columns id, \
                student, value, scan, comment";
    assert_eq!(err.matches(line).count(), 1, "{err}");
    conn.execute("UPDATE grades SET comment = 'after' WHERE id = 'd1'", [])
        .unwrap();
    let all = events(&s.db);
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[1].operation.as_str(), all[1].local_version),
        ("UPDATE", 2)
    );
    assert_eq!(text(field(&all[1].payload, "comment")), "after");
    // A second pass finds nothing to do.
    let (code, _, err) = relais(&s, &["once"]);
    assert_eq!(code, 0);
    assert!(!err.contains("triggers recreated"), "{err}");
    let (_, out, _) = relais(&s, &["outbox", "status", "--json"]);
    assert!(out.contains(r#""drift": false"#), "{out}");
}
