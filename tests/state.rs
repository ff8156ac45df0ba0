//! The agent's identity and its state directory, with real `relais` processes: devices
//! left on the default `DEVICE_ID` are still told apart, a state database that is there
//! but unusable is refused untouched until `relais state reset`, and one process owns a
//! state directory at a time.
#![cfg(feature = "demo")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{
    DEVICE, Proxy, Receiver, Scratch, agent_env, log_text, run_relais, send_signal, spawn_logged,
    tracking_rows, wait_exit, wait_for,
};
use relais::demo::{check_delivery, create_app_db, insert_events, insert_media};

fn receiver(dir: &Scratch, idempotency: bool) -> Receiver {
    Receiver::start_with(&dir.join("receiver"), idempotency)
}

/// An application database with `events` events.
fn app(dir: &Scratch, events: usize) -> PathBuf {
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, events).expect("insert events");
    db
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

fn once(vars: &[(String, String)]) -> Output {
    run_relais(&["once"], vars, Duration::from_secs(30))
}

// ---------------------------------------------------------------- the default device id

/// The environment of a device that never set `DEVICE_ID`, whose machine id is in
/// `machine_id_file`.
fn unset_device_env(
    db: &Path,
    backend: &str,
    dir: &Path,
    machine_id_file: &str,
) -> Vec<(String, String)> {
    let mut vars = agent_env(
        db,
        backend,
        dir,
        &[("RELAIS_MACHINE_ID_FILE", machine_id_file)],
    );
    vars.retain(|(k, _)| k != "DEVICE_ID");
    vars
}

#[test]
fn two_devices_left_on_the_default_device_id_both_arrive() {
    let shared = Scratch::new("two-devices");
    let rx = receiver(&shared, true);
    let machine_ids = [
        "0b2d5e6f7a8c4d1e9f0a1b2c3d4e5f60",
        "c0ffee00c0ffee00c0ffee00c0ffee01",
    ];
    let mut dirs = Vec::new();
    for (i, machine_id) in machine_ids.iter().enumerate() {
        let dir = Scratch::new(&format!("device-{i}"));
        let db = app(&dir, 3);
        let file = dir.join("machine-id");
        std::fs::write(&file, format!("{machine_id}\n")).unwrap();
        let vars = unset_device_env(&db, &rx.url(), dir.path(), &file.display().to_string());
        let out = once(&vars);
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "device {i}: {log}");
        let device = relais::device_id::from_machine_id(machine_id);
        assert!(
            log.contains(&format!(
                "device {device} (derived from {})",
                file.display()
            )),
            "the start-up line says the id and where it came from: {log}"
        );
        let d = check_delivery(&db, &rx.rows(), &device).expect("delivery check");
        assert!(d.is_exact(), "device {i}: {d:?}");
        dirs.push(dir);
    }
    let rows = rx.rows();
    let keys: BTreeSet<_> = rows
        .iter()
        .filter_map(|r| r.idempotency_key.clone())
        .collect();
    assert_eq!(rx.stats().stored, 6, "both devices' rows stored: {keys:?}");
    assert_eq!(keys.len(), 6, "six different keys: {keys:?}");
    assert_eq!(rx.stats().replays, 0);
}

#[test]
fn an_empty_device_id_or_no_machine_id_refuses_to_start() {
    let dir = Scratch::new("no-device-id");
    let db = app(&dir, 1);
    let rx = receiver(&dir, true);
    let missing = dir.join("no-machine-id").display().to_string();
    let uninitialized = dir.join("machine-id");
    std::fs::write(&uninitialized, "uninitialized\n").unwrap();
    let mut empty = agent_env(&db, &rx.url(), dir.path(), &[("DEVICE_ID", "")]);
    empty.push(("RELAIS_MACHINE_ID_FILE".into(), missing.clone()));
    let cases = [
        ("DEVICE_ID empty", empty),
        (
            "no machine id",
            unset_device_env(&db, &rx.url(), dir.path(), &missing),
        ),
        (
            "uninitialized machine id",
            unset_device_env(
                &db,
                &rx.url(),
                dir.path(),
                &uninitialized.display().to_string(),
            ),
        ),
    ];
    for (case, vars) in cases {
        let out = once(&vars);
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{case}: {log}");
        assert_eq!(lines(&log).len(), 1, "{case}: one line: {log}");
        assert!(log.contains("setting DEVICE_ID:"), "{case}: {log}");
        assert!(
            !dir.join("state").exists(),
            "{case}: stopped before doing anything"
        );
    }
    assert_eq!(rx.stats().requests, 0);
}

// ---------------------------------------------------------------- a bad state database

#[test]
fn a_bad_state_database_is_refused_untouched_until_state_reset() {
    let foreign = Scratch::new("foreign-db");
    let other = foreign.join("other.db");
    rusqlite::Connection::open(&other)
        .and_then(|c| {
            c.execute_batch("CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('x');")
        })
        .unwrap();
    // The Python service's table (contract section 4), without relais's columns.
    let seed = foreign.join("seed.db");
    rusqlite::Connection::open(&seed)
        .and_then(|c| {
            c.execute_batch(
                "CREATE TABLE sync_tracking (id INTEGER PRIMARY KEY AUTOINCREMENT, \
                 table_name TEXT NOT NULL, local_id INTEGER NOT NULL, remote_id INTEGER, \
                 sync_date TEXT NOT NULL, sync_status TEXT NOT NULL, error_message TEXT); \
                 INSERT INTO sync_tracking VALUES (1, 'evenement', 1, 7, '2025-01-01', 'success', NULL);",
            )
        })
        .unwrap();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("empty", Vec::new(), "is empty (0 bytes)"),
        (
            "garbage",
            b"not a database, a text file\n".repeat(200),
            "is not an SQLite database",
        ),
        (
            "foreign",
            std::fs::read(&other).unwrap(),
            "is not a relais state database",
        ),
        (
            "seed-table",
            std::fs::read(&seed).unwrap(),
            "lacks relais's columns",
        ),
    ];
    for (case, bytes, diagnosis) in cases {
        let dir = Scratch::new(&format!("bad-state-{case}"));
        let db = app(&dir, 3);
        let rx = receiver(&dir, true);
        let state_db = dir.state_db();
        std::fs::create_dir_all(state_db.parent().unwrap()).unwrap();
        std::fs::write(&state_db, &bytes).unwrap();
        let vars = agent_env(&db, &rx.url(), dir.path(), &[]);

        let out = once(&vars);
        let log = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{case}: {log}");
        let line = lines(&log)
            .into_iter()
            .find(|l| l.contains(diagnosis))
            .unwrap_or_else(|| panic!("{case}: no line saying {diagnosis:?}: {log}"));
        assert!(
            line.contains(&state_db.display().to_string()) && line.contains("relais state reset"),
            "{case}: the line names the file and the way out: {line}"
        );
        assert_eq!(
            std::fs::read(&state_db).unwrap(),
            bytes,
            "{case}: the file was touched"
        );
        assert_eq!(rx.stats().requests, 0, "{case}: rows were sent");

        let status = run_relais(&["status"], &vars, Duration::from_secs(10));
        assert_eq!(status.status.code(), Some(1), "{case}: status");
        assert!(
            stderr(&status).contains(diagnosis),
            "{case}: status says it: {}",
            stderr(&status)
        );

        let reset = run_relais(&["state", "reset"], &vars, Duration::from_secs(10));
        let said = String::from_utf8_lossy(&reset.stdout).into_owned();
        assert_eq!(
            reset.status.code(),
            Some(0),
            "{case}: reset: {said}{}",
            stderr(&reset)
        );
        assert!(
            !state_db.exists(),
            "{case}: still there after reset: {said}"
        );
        let aside: Vec<PathBuf> = std::fs::read_dir(state_db.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("relais.db.bad-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "{case}: {aside:?}");
        assert_eq!(
            std::fs::read(&aside[0]).unwrap(),
            bytes,
            "{case}: kept aside whole"
        );
        assert!(
            said.contains(&aside[0].display().to_string()),
            "{case}: says where: {said}"
        );

        let out = once(&vars);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{case}: after reset: {}",
            stderr(&out)
        );
        let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
        assert!(d.is_exact() && d.expected == 3, "{case}: {d:?}");
    }
}

// ---------------------------------------------------------------- one process per state directory

#[test]
fn a_second_agent_on_a_state_directory_stands_back_and_says_who_owns_it() {
    let dir = Scratch::new("two-agents");
    let db = app(&dir, 2);
    insert_media(&create_app_db(&db, false).unwrap(), Some(1 << 20)).unwrap();
    // Without idempotency every second upload is a second row; the throttle keeps the
    // media row in flight (pending) while the second agent starts.
    let rx = receiver(&dir, false);
    let proxy = Proxy::start(&rx.url(), 512 * 1024);
    let config = dir.join("relais.json");
    std::fs::write(&config, r#"{"state_lock_wait_s": 0.5}"#).unwrap();
    let config = config.display().to_string();
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[
            ("RELAIS_CONFIG", &config),
            ("SYNC_INTERVAL_SECONDS", "3600"),
        ],
    );
    let (mut daemon, daemon_log) = spawn_logged(&["run"], &vars);
    let pid = daemon.id();
    assert!(
        wait_for(Duration::from_secs(20), || proxy.forwarded() > 256 * 1024),
        "the media upload never started"
    );

    let out = once(&vars);
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let expected = format!(
        "state directory {} is in use by relais run (pid {pid}): it will push at its next pass; to push now: kill -USR1 {pid}",
        dir.join("state").display()
    );
    assert!(log.contains(&expected), "expected {expected:?} in:\n{log}");

    let second = run_relais(&["run"], &vars, Duration::from_secs(10));
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("only one agent may use a state directory"),
        "{}",
        stderr(&second)
    );

    for command in [&["status"][..], &["retry-failed"][..]] {
        let out = run_relais(command, &vars, Duration::from_secs(20));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{command:?} beside the daemon: {}",
            stderr(&out)
        );
    }

    assert!(
        wait_for(Duration::from_secs(30), || {
            tracking_rows(&dir.state_db())
                .iter()
                .filter(|r| r.status == "success")
                .count()
                == 3
        }),
        "the daemon did not finish its pass"
    );
    send_signal(pid, "TERM");
    assert!(wait_exit(&mut daemon, Duration::from_secs(10)).success());
    let daemon_log = log_text(daemon_log);
    let keys: Vec<_> = rx
        .rows()
        .into_iter()
        .filter_map(|r| r.idempotency_key)
        .collect();
    let unique: BTreeSet<_> = keys.iter().collect();
    assert_eq!(
        keys.len(),
        3,
        "each row exactly once: {keys:?}\n{daemon_log}"
    );
    assert_eq!(unique.len(), 3, "{keys:?}");
    assert!(
        dir.join("state")
            .join(relais::state_lock::LOCK_FILE_NAME)
            .exists(),
        "lock file kept"
    );
}
