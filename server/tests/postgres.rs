//! What only the PostgreSQL store has: servers sharing one database migrate it together,
//! the URL's password never shows, and PostgreSQL stopped then restarted in the middle
//! of an agent's run (503 with `Retry-After` while down, one warning line, every row
//! stored once after). The cases common to both stores are in push.rs, media.rs and
//! agent.rs.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, client, event, pg, post, wait_for};
use relais::demo::{create_app_db, insert_events, insert_media, settings_for};
use relais::push::Interruption;

const BIN: &str = env!("CARGO_BIN_EXE_relais-server");

/// The warning line of the store check (store/watch.rs).
use common::{STORE_BACK_LINE as BACK_LINE, STORE_DOWN_LINE as DOWN_LINE};

#[test]
fn servers_migrating_one_database_at_once_apply_each_migration_once() {
    let Some(cluster) = pg::shared() else { return };
    let url = cluster.create_db();
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(BIN)
                .arg("migrate")
                .env("DATABASE_URL", &url)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn migrate")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("migrate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", out.status);
        assert!(stderr.contains("schema up to date"), "{stderr}");
    }
    let applied: Vec<Vec<Option<String>>> = [
        ("1", "init"),
        ("2", "config"),
        ("3", "tokens"),
        ("4", "uploads"),
        ("5", "heartbeats"),
        ("6", "console"),
        ("7", "sync"),
    ]
    .iter()
    .map(|(v, n)| vec![Some(v.to_string()), Some(n.to_string())])
    .collect();
    assert_eq!(
        common::postgres_rows(
            &url,
            "SELECT version, name FROM schema_migrations ORDER BY version"
        ),
        applied
    );
    for relation in [
        "received",
        "evenements",
        "media",
        "sites",
        "devices",
        "uploads",
        "tokens",
        "heartbeats_latest",
        "heartbeat_hours",
        "received_hours",
        "config_pulls",
        "console_sessions",
        "config_versions",
    ] {
        let rows = common::postgres_rows(&url, &format!("SELECT count(*) FROM {relation}"));
        assert_eq!(rows, [[Some("0".to_string())]], "{relation}");
    }
}

#[test]
fn the_url_password_is_in_no_error_and_not_in_help() {
    let Some(cluster) = pg::shared() else { return };
    let wrong = "wrong-pw-4f1d";
    let url = cluster
        .create_db()
        .replace(&format!(":{}@", cluster.password()), &format!(":{wrong}@"));
    let out = Command::new(BIN)
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .output()
        .expect("migrate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("postgres://postgres:***@127.0.0.1")
            && stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(!stderr.contains(wrong), "{stderr}");

    let help = Command::new(BIN)
        .arg("--help")
        .env("DATABASE_URL", cluster.url("postgres"))
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("DATABASE_URL"), "{help}");
    assert!(!help.contains(cluster.password()), "{help}");
}

/// A POST and a `GET /ready` while PostgreSQL is down: 503, `Retry-After`, a detail.
fn assert_unavailable(server: &Server) {
    let agent = client();
    let (status, detail) = post(
        &agent,
        &server.url,
        "/api/evenements",
        Some("probe:evenement:1"),
        event("probe", 1).as_bytes(),
    );
    assert_eq!(status, 503, "{detail}");
    assert!(
        detail.starts_with("{\"detail\": \"store: unreachable: postgres://postgres:***@"),
        "{detail}"
    );
    for path in ["/api/evenements", "/ready"] {
        let resp = if path == "/ready" {
            agent.get(format!("{}{path}", server.url)).call()
        } else {
            agent
                .post(format!("{}{path}", server.url))
                .header("Idempotency-Key", "probe:evenement:2")
                .send(event("probe", 2).as_bytes())
        }
        .expect("request");
        assert_eq!(resp.status().as_u16(), 503, "{path}");
        assert_eq!(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("3"),
            "{path}"
        );
    }
}

#[test]
fn postgres_stopped_and_restarted_during_an_agent_run_loses_and_doubles_nothing() {
    let Some((cluster, server)) = common::on_own_cluster() else {
        return;
    };
    // What the start logs (the --no-auth warning among it) is not the outage's.
    let start_lines = server.log_lines().len();
    let dir = common::scratch("outage");
    std::fs::create_dir_all(dir.join("log")).expect("log dir");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, true).expect("app db");
    insert_events(&conn, 300).expect("events");
    insert_media(&conn, Some(200 * 1024)).expect("media");
    let settings = settings_for(&db, &server.url, &dir, &[]).expect("settings");

    // The agent: passes one after the other until told to stop, as its run loop does
    // (the loop's backoff aside), each interruption kept.
    let done = Arc::new(AtomicBool::new(false));
    let interruptions = Arc::new(Mutex::new(Vec::new()));
    let agent = {
        let (done, interruptions) = (Arc::clone(&done), Arc::clone(&interruptions));
        std::thread::spawn(move || {
            let mut pusher =
                relais::daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false)))
                    .expect("pusher");
            while !done.load(Ordering::Relaxed) {
                let report = pusher.sync_once();
                if let Some(i) = report.interrupted {
                    interruptions.lock().expect("interruptions").push(i);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    assert!(
        wait_for(Duration::from_secs(20), || server
            .count("SELECT count(*) FROM received")
            > 0),
        "no row arrived"
    );
    cluster.stop();
    // Rows written while PostgreSQL is down: the agent has work during the outage
    // whether or not the stop fell in the middle of its first pass.
    insert_events(&conn, 50).expect("more events");
    assert_unavailable(&server);
    let saw_503 = || {
        interruptions
            .lock()
            .expect("interruptions")
            .iter()
            .any(|i| {
                matches!(i, Interruption::Backend { retry_after: Some(r), reason }
                if *r == Duration::from_secs(3) && reason.contains("503"))
            })
    };
    assert!(
        wait_for(Duration::from_secs(10), saw_503),
        "{:?}",
        interruptions.lock().expect("interruptions")
    );
    assert!(
        wait_for(Duration::from_secs(5), || server.logged(DOWN_LINE)),
        "no warning from the store check"
    );
    // Absence cannot be waited on: a few more checks (1 s apart) while still down.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(server.ready_status(), 503);

    common::resume_until_ready(&cluster, &server);
    let all_there =
        || server.count("SELECT count(*) FROM evenements WHERE device_id = 'demo-pi'") == 350;
    assert!(
        wait_for(Duration::from_secs(30), all_there),
        "{} events",
        server.count("SELECT count(*) FROM evenements")
    );
    done.store(true, Ordering::Relaxed);
    agent.join().expect("agent");

    assert_eq!(
        server.row(
            "SELECT count(*), count(DISTINCT local_id) FROM evenements WHERE device_id = 'demo-pi'"
        ),
        ["350", "350"],
        "every event exactly once"
    );
    assert_eq!(
        server.row("SELECT count(*), min(media_size) FROM media WHERE device_id = 'demo-pi'"),
        ["1", &(200 * 1024).to_string()]
    );
    assert_eq!(server.logged_count(DOWN_LINE), 1, "one warning line");
    let warnings: Vec<String> = server
        .log_lines()
        .into_iter()
        .skip(start_lines)
        .filter(|l| l.contains(" WARN "))
        .collect();
    assert_eq!(warnings.len(), 1, "no other warning: {warnings:#?}");
    assert_eq!(server.logged_count(BACK_LINE), 1, "one info line");
    let leaked: Vec<String> = server
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(cluster.password()))
        .collect();
    assert!(leaked.is_empty(), "the password in the log: {leaked:?}");
    assert!(server.logged("postgres://postgres:***@127.0.0.1"));
    let _ = std::fs::remove_dir_all(&dir);
}
