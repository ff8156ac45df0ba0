//! Heartbeats from the `relais` binary (`relais once`) to relais-server in-process:
//! what the server keeps after a pass (backlog, failed rows, the held configuration's
//! hash), no token or password in it nor in the log, and a backend that answers 404
//! (the seed's) is left alone for an hour while the pass stays clean.
#![cfg(feature = "demo")]

mod common;

use std::time::Duration;

use common::{DEVICE, ProxyFault, Receiver, Scratch, agent_env, run_relais};
use relais::demo::{create_app_db, insert_events};
use relais_wire::heartbeat::Heartbeat;

const TOKEN: &str = "site-token-heartbeat-secret";
const BEARER: &str = "bearer-heartbeat-secret-0123";
const PASSWORD: &str = "projector-password-secret";

fn once(vars: &[(String, String)]) -> (Option<i32>, String) {
    let out = run_relais(&["once"], vars, Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_server_keeps_the_heartbeat_of_each_pass_without_secrets() {
    let dir = Scratch::new("hb-kept");
    let rx = Receiver::start(&dir.join("receiver"));
    let config = format!(
        r#"{{"site_name": "Site", "timezone": "Europe/Paris", "devices": [{{"ip": "192.168.1.10", "name": "Projecteur", "type": "projector", "driver": "pjlink", "pjlink": {{"password": "{PASSWORD}"}}}}]}}"#
    );
    let hash = rx.set_config(TOKEN, &config).expect("set config");
    let db = dir.join("app.db");
    let conn = create_app_db(&db, true).expect("app db");
    insert_events(&conn, 5).expect("events");
    let agent_config = dir.join("agent-config.json").display().to_string();
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[
            ("RELAIS_HEARTBEAT", "1"),
            ("RELAIS_BEARER_TOKEN", BEARER),
            ("SITE_TOKEN", TOKEN),
            ("AGENT_CONFIG", &agent_config),
        ],
    );
    // The first pass's third row is rejected for good: a failed row.
    rx.push_fault(ProxyFault::Pass);
    rx.push_fault(ProxyFault::Pass);
    rx.push_fault(ProxyFault::Status(422, None));
    let (code, first_log) = once(&vars);
    assert_eq!(code, Some(1), "a failed row: {first_log}");
    insert_events(&conn, 3).expect("more events");
    // The second run holds the configuration the first one pulled after its pass.
    let (_, second_log) = once(&vars);
    let json = rx.heartbeat(DEVICE).expect("a heartbeat is kept");
    let beat = Heartbeat::parse(&json).expect("parses");
    assert_eq!(beat.config.hash.as_deref(), Some(hash.as_str()), "{json}");
    assert_eq!(beat.config.last_pull_ok, Some(true), "{json}");
    let events = beat
        .tables
        .iter()
        .find(|t| t.table == "evenement")
        .expect("the event table");
    assert_eq!(events.source, "app.db", "no directory: {json}");
    assert_eq!(events.failed, 1, "{json}");
    assert_eq!(events.backlog, 0, "the second pass sent the rest: {json}");
    assert!(beat.free_bytes.is_some_and(|b| b > 0), "{json}");
    assert!(beat.interval_s > 0, "{json}");
    for secret in [TOKEN, BEARER, PASSWORD] {
        assert!(!json.contains(secret), "{secret} in the heartbeat: {json}");
        for log in [&first_log, &second_log] {
            assert!(!log.contains(secret), "{secret} in the log: {log}");
        }
    }
}

#[test]
fn a_backend_without_heartbeats_is_left_alone_for_an_hour() {
    let dir = Scratch::new("hb-refused");
    let rx = Receiver::start(&dir.join("receiver"));
    rx.refuse_heartbeats();
    let db = dir.join("app.db");
    let conn = create_app_db(&db, true).expect("app db");
    insert_events(&conn, 2).expect("events");
    let vars = agent_env(&db, &rx.url(), dir.path(), &[("RELAIS_HEARTBEAT", "1")]);
    let (code, log) = once(&vars);
    assert_eq!(code, Some(0), "the pass is clean: {log}");
    let line = "backend does not take heartbeats (404); not sending them for an hour";
    assert_eq!(log.matches(line).count(), 1, "{log}");
    assert_eq!(rx.heartbeat_posts(), 1);
    insert_events(&conn, 2).expect("more events");
    let (code, log) = once(&vars);
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !log.contains("heartbeat"),
        "nothing about heartbeats: {log}"
    );
    assert_eq!(rx.heartbeat_posts(), 1, "not asked again within the hour");
    let status = run_relais(&["status"], &vars, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!text.contains("heartbeat"), "no error in status: {text}");
}

#[test]
fn the_oldest_unsent_row_is_reported_with_its_age() {
    let dir = Scratch::new("hb-oldest");
    let rx = Receiver::start(&dir.join("receiver"));
    let db = dir.join("app.db");
    let conn = create_app_db(&db, true).expect("app db");
    insert_events(&conn, 4).expect("events");
    conn.execute(
        "UPDATE evenement SET date = strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '-1 hour')",
        [],
    )
    .expect("an hour old");
    let vars = agent_env(&db, &rx.url(), dir.path(), &[("RELAIS_HEARTBEAT", "1")]);
    // The backend is down for pushes: nothing is sent, everything waits.
    rx.push_fault(ProxyFault::Status(503, None));
    let (_, log) = once(&vars);
    let json = rx.heartbeat(DEVICE).expect("a heartbeat is kept");
    let beat = Heartbeat::parse(&json).expect("parses");
    let events = beat
        .tables
        .iter()
        .find(|t| t.table == "evenement")
        .expect("the event table");
    // The row the 503 answered is failed (its retry is scheduled), the others wait.
    assert_eq!(events.backlog + events.failed, 4, "{json}\n{log}");
    let age = events
        .oldest_unsent_s
        .expect("the first row's date is known");
    assert!((3600..3600 + 300).contains(&age), "about an hour: {json}");
}
