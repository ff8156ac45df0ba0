//! What the operator sees, with the `relais` binary as a child process against
//! relais-server in-process (through a second fault proxy where the test's own policy
//! decides): a wrong URL prefix and a redirect on every row are one error line, not a
//! warning per row, and their rows are sent as soon as the settings are right;
//! `relais status` lists failed rows with their reason and next attempt, and says how
//! many it did not list; a 2xx with an HTML page is worth a warning.
#![cfg(feature = "demo")]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    DEVICE, FaultProxy, ProxyFault, Receiver, Scratch, agent_env, run_relais, tracking_rows,
    unix_now,
};
use miniserde::json::Value as Json;
use relais::demo::{check_delivery, create_app_db, insert_events};
use rusqlite::types::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

fn receiver(dir: &Scratch) -> Receiver {
    Receiver::start(&dir.join("receiver"))
}

/// An application database with `events` events and no media.
fn app(dir: &Scratch, events: usize) -> PathBuf {
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, events).expect("insert events");
    db
}

/// `relais once` against `backend`: exit code and stderr.
fn once(db: &std::path::Path, backend: &str, dir: &Scratch) -> (Option<i32>, String) {
    let out = run_relais(&["once"], &agent_env(db, backend, dir.path(), &[]), TIMEOUT);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `relais status [--json]` against `backend`'s settings: stdout.
fn status(db: &std::path::Path, backend: &str, dir: &Scratch, json: bool) -> String {
    let args: &[&str] = if json {
        &["status", "--json"]
    } else {
        &["status"]
    };
    let out = run_relais(args, &agent_env(db, backend, dir.path(), &[]), TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8(out.stdout).expect("status is UTF-8")
}

fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

fn member<'a>(v: &'a Json, key: &str) -> &'a Json {
    match v {
        Json::Object(o) => o.get(key).unwrap_or_else(|| panic!("no {key} in status")),
        _ => panic!("not an object"),
    }
}

#[test]
fn a_404_on_every_row_is_one_error_and_the_rows_go_once_the_url_is_right() {
    let dir = Scratch::new("view-404");
    let db = app(&dir, 8);
    let rx = receiver(&dir);
    let wrong = format!("{}/wrong", rx.url());

    let (code, log) = once(&db, &wrong, &dir);
    assert_eq!(code, Some(1), "{log}");
    let errors = lines_with(&log, "ERROR");
    assert_eq!(errors.len(), 1, "one error line for the pass:\n{log}");
    let error = errors[0];
    for part in [
        "404",
        "/wrong/api/evenements",
        "BACKEND_URL's path is probably wrong",
    ] {
        assert!(error.contains(part), "{part:?} not in {error}");
    }
    assert!(
        lines_with(&log, "; next attempt in").is_empty(),
        "no warning per row:\n{log}"
    );
    assert_eq!(rx.stats().requests, 3, "the table stops after three rows");
    let rows = tracking_rows(&dir.state_db());
    assert!(
        rows.iter()
            .all(|r| r.next_attempt_at.is_none_or(|t| t <= unix_now())),
        "no row waits for the slow clock: {rows:?}"
    );

    let json = status(&db, &wrong, &dir, true);
    let parsed: Json = miniserde::json::from_str(&json).expect("status --json parses");
    match member(&parsed, "last_error") {
        Json::String(e) => assert!(e.contains("BACKEND_URL's path is probably wrong"), "{e}"),
        other => panic!("last_error is {other:?}"),
    }

    let (code, log) = once(&db, &rx.url(), &dir);
    assert_eq!(code, Some(0), "{log}");
    let delivery = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery");
    assert!(delivery.is_exact(), "{delivery:?}");
}

#[test]
fn a_redirect_on_every_row_names_its_location() {
    let dir = Scratch::new("view-301");
    let db = app(&dir, 4);
    let rx = receiver(&dir);
    let proxy = FaultProxy::start(&rx.url());
    let location = format!("https://{}/api/evenements", &proxy.url()[7..]);
    let to = location.clone();
    proxy.set_policy(move |_| ProxyFault::Redirect(to.clone()));

    let (code, log) = once(&db, &proxy.url(), &dir);
    assert_eq!(code, Some(1), "{log}");
    let errors = lines_with(&log, "ERROR");
    assert_eq!(errors.len(), 1, "one error line for the pass:\n{log}");
    let base = location.trim_end_matches("/api/evenements");
    let hint = format!("the backend redirects to {location}: set BACKEND_URL to {base}");
    assert!(
        errors[0].contains("301") && errors[0].contains(&hint),
        "{}",
        errors[0]
    );
    assert!(lines_with(&log, "WARN  evenement").is_empty(), "{log}");
    assert_eq!(
        proxy.stats().pushes,
        1,
        "a redirect stops the table at once"
    );
}

#[test]
fn rows_rejected_for_an_hour_are_sent_at_once_when_the_backend_url_changes() {
    let dir = Scratch::new("view-fingerprint");
    let db = app(&dir, 2);
    let rx = receiver(&dir);
    rx.push_fault(ProxyFault::Status(422, None));
    let (code, log) = once(&db, &rx.url(), &dir);
    assert_eq!(code, Some(1), "{log}");
    let failed = tracking_rows(&dir.state_db());
    assert!(
        failed[0].next_attempt_at.unwrap() > unix_now() + 3000,
        "{failed:?}"
    );

    // The same backend under another URL: the settings changed.
    let proxy = FaultProxy::start(&rx.url());
    let (code, log) = once(&db, &proxy.url(), &dir);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("1 failed rows are due now"), "{log}");
    let delivery = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery");
    assert!(delivery.is_exact(), "{delivery:?}");
}

#[test]
fn status_lists_failed_rows_with_reason_and_next_attempt_and_says_how_many_more() {
    let dir = Scratch::new("view-failed");
    let db = app(&dir, 12);
    let rx = receiver(&dir);
    for _ in 0..12 {
        rx.push_fault(ProxyFault::Status(422, None));
    }
    let (code, log) = once(&db, &rx.url(), &dir);
    assert_eq!(code, Some(1), "{log}");
    let tracked = tracking_rows(&dir.state_db());

    let text = status(&db, &rx.url(), &dir, false);
    assert_eq!(lines_with(&text, "failed: ").len(), 10, "{text}");
    assert!(
        text.contains("... and 2 more failed rows (relais status --json lists"),
        "{text}"
    );
    assert!(
        text.contains("last error: ") && text.contains("injected 422"),
        "{text}"
    );

    let json = status(&db, &rx.url(), &dir, true);
    let parsed: Json = miniserde::json::from_str(&json).expect("status --json parses");
    assert!(
        matches!(member(&parsed, "failed_total"), Json::Number(n) if n.to_string() == "12"),
        "{json}"
    );
    let Json::Array(failed) = member(&parsed, "failed") else {
        panic!("failed is not an array: {json}")
    };
    assert_eq!(failed.len(), 12, "{json}");
    let mut ids = Vec::new();
    for f in failed {
        let Json::Number(id) = member(f, "local_id") else {
            panic!("local_id is not a number: {json}")
        };
        let id: i64 = id.to_string().parse().expect("integer id");
        ids.push(id);
        let row = tracked
            .iter()
            .find(|r| r.local_id == Value::Integer(id))
            .unwrap();
        let due = relais::clock::iso8601(row.next_attempt_at.expect("retry time"));
        assert!(
            matches!(member(f, "next_attempt_at"), Json::String(t) if *t == due),
            "{json}"
        );
        assert!(matches!(member(f, "table"), Json::String(t) if t == "evenement"));
        assert!(matches!(member(f, "source"), Json::String(s) if s.ends_with("surveillance.db")));
        assert!(
            matches!(member(f, "error_message"), Json::String(e) if e.contains("injected 422")),
            "{json}"
        );
        assert!(matches!(member(f, "attempts"), Json::Number(n) if n.to_string() == "1"));
    }
    ids.sort();
    assert_eq!(ids, (1..=12).collect::<Vec<i64>>());
}

#[test]
fn an_html_page_for_an_answer_is_a_warning_once_per_pass() {
    let dir = Scratch::new("view-html");
    let db = app(&dir, 3);
    let rx = receiver(&dir);
    for _ in 0..3 {
        rx.push_fault(ProxyFault::HtmlCreated);
    }
    let (code, log) = once(&db, &rx.url(), &dir);
    assert_eq!(code, Some(0), "success by the contract:\n{log}");
    let warnings = lines_with(&log, "HTML page");
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN")
            && warnings[0].contains(
                "with an HTML page for 3 rows: a captive portal or a proxy may be swallowing them"
            ),
        "{}",
        warnings[0]
    );
}

/// The pass stops at the first row (503) of its first read of 100: the read's rows are
/// tracked and waiting, the 50 beyond it were never read.
#[test]
fn status_counts_the_rows_never_read_after_an_early_stop() {
    let dir = Scratch::new("view-backlog");
    let db = app(&dir, 150);
    let rx = receiver(&dir);
    rx.push_fault(ProxyFault::Status(503, None));
    let (code, log) = once(&db, &rx.url(), &dir);
    assert_eq!(code, Some(1), "{log}");
    let text = status(&db, &rx.url(), &dir, false);
    assert!(
        text.contains("evenement: 100 tracked and waiting, 50 rows not read yet"),
        "{text}"
    );
}

#[test]
fn run_retries_a_wrong_url_after_the_backoff_not_the_interval() {
    let dir = Scratch::new("view-run");
    let db = app(&dir, 5);
    let rx = receiver(&dir);
    let config = dir.join("relais.json");
    std::fs::write(
        &config,
        r#"{"retry": {"initial_backoff_s": 0.2, "max_backoff_s": 1}}"#,
    )
    .unwrap();
    let vars = agent_env(
        &db,
        &format!("{}/wrong", rx.url()),
        dir.path(),
        &[
            ("SYNC_INTERVAL_SECONDS", "3600"),
            ("RELAIS_CONFIG", &config.display().to_string()),
        ],
    );
    let _agent = common::spawn_relais(&["run"], &vars);
    assert!(
        common::wait_for(Duration::from_secs(10), || rx.stats().requests >= 9),
        "three passes of three rows, not one an hour: {:?}",
        rx.stats()
    );
}
