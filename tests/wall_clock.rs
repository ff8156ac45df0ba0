//! A wall clock that is wrong, then corrected (a Raspberry Pi without a real-time clock
//! boots in 1970 or at the last saved time, and NTP moves the clock later): the agent
//! runs under libfaketime (Debian's `faketime` package), as a real child process, with
//! the monotonic clock left alone as NTP leaves it. Needs the host's libfaketime in
//! LD_PRELOAD, so build/cross-test leaves this file out under qemu-user.
#![cfg(feature = "demo")]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    DEVICE, ProxyFault, Receiver, Scratch, agent_env, run_relais, send_signal, spawn_logged,
    tracked, unix_now, wait_exit, wait_for,
};
use relais::demo::{check_delivery, create_app_db, insert_events};

const TEN_YEARS: i64 = 10 * 365 * 86_400;

/// The host's libfaketime; the test fails with a hint when it is not installed.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists());
    found.expect("libfaketime not found: apt-get install faketime")
}

/// `vars` plus what makes libfaketime set the wall clock as `spec` says (`+10y`,
/// `@1970-01-02 00:00:00`) or as the file `spec` says, re-read at every call.
fn faked(vars: &[(String, String)], spec: &str) -> Vec<(String, String)> {
    let mut vars = vars.to_vec();
    let clock = if Path::new(spec).is_file() {
        vec![
            ("FAKETIME_TIMESTAMP_FILE", spec),
            ("FAKETIME_NO_CACHE", "1"),
        ]
    } else {
        vec![("FAKETIME", spec)]
    };
    let lib = libfaketime().display().to_string();
    for (k, v) in clock.into_iter().chain([
        ("LD_PRELOAD", lib.as_str()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]) {
        vars.push((k.into(), v.into()));
    }
    vars
}

fn setup(tag: &str) -> (Scratch, PathBuf, Receiver) {
    let dir = Scratch::new(tag);
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, 3).expect("insert events");
    let rx = Receiver::start(&dir.join("receiver"));
    (dir, db, rx)
}

fn once(vars: &[(String, String)]) -> (Option<i32>, String) {
    let out = run_relais(&["once"], vars, Duration::from_secs(30));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_all_delivered(db: &Path, rx: &Receiver) {
    let d = check_delivery(db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
}

#[test]
fn a_row_rejected_under_a_clock_ten_years_ahead_is_retried_once_the_clock_is_right() {
    let (dir, db, rx) = setup("clock-ahead");
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    rx.push_fault(ProxyFault::Status(422, None));
    let (code, log) = once(&faked(&vars, "+10y"));
    assert_eq!(code, Some(1), "{log}");
    let row = tracked(&dir.state_db(), "evenement", 1).expect("tracked");
    assert_eq!(row.status, "failed", "{row:?}");
    let retry_at = row.next_attempt_at.expect("retry time");
    assert!(retry_at > unix_now() + TEN_YEARS - 86_400, "{row:?}");

    // NTP has corrected the clock: the retry time is ten years ahead, so it is not real.
    assert_due_and_sent(&dir, &db, &rx, &vars);
}

#[test]
fn a_clock_gone_back_to_1970_does_not_keep_a_failed_row_waiting() {
    let (dir, db, rx) = setup("clock-behind");
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    rx.push_fault(ProxyFault::Status(422, None));
    let (code, log) = once(&vars);
    assert_eq!(code, Some(1), "{log}");
    let row = tracked(&dir.state_db(), "evenement", 1).expect("tracked");
    assert!(row.next_attempt_at.unwrap() > unix_now(), "{row:?}");

    // The Pi reboots without its clock: 1970 until NTP answers. The retry time is more
    // than the longest retry delay ahead of that clock.
    assert_due_and_sent(&dir, &db, &rx, &faked(&vars, "@1970-01-02 00:00:00"));
}

/// A `relais once` with `vars` finds the failed row due, sends it and exits 0.
fn assert_due_and_sent(dir: &Scratch, db: &Path, rx: &Receiver, vars: &[(String, String)]) {
    let (code, log) = once(vars);
    assert_eq!(code, Some(0), "the row is due and sent:\n{log}");
    assert_eq!(
        tracked(&dir.state_db(), "evenement", 1).unwrap().status,
        "success"
    );
    assert_all_delivered(db, rx);
}

#[test]
fn a_wall_clock_jump_is_logged_once_with_its_size() {
    let (dir, db, rx) = setup("clock-jump");
    let clock_file = dir.join("faketime");
    std::fs::write(&clock_file, "+0\n").unwrap();
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "3600")],
    );
    let vars = faked(&vars, &clock_file.display().to_string());
    let (mut agent, stderr) = spawn_logged(&["run"], &vars);
    let log_file = dir.join("log/relais.log");
    let logged =
        |text: &str| std::fs::read_to_string(&log_file).is_ok_and(|l| l.matches(text).count() == 1);
    // The event lane's reports (the media lane logs its own).
    assert!(wait_for(Duration::from_secs(20), || logged(
        "sync report: evenement"
    )));

    std::fs::write(&clock_file, "+10y\n").unwrap();
    send_signal(agent.id(), "USR1");
    assert!(wait_for(Duration::from_secs(20), || logged("clock: ")));
    send_signal(agent.id(), "USR1");
    assert!(wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log_file)
            .is_ok_and(|l| l.matches("sync report: evenement").count() == 3)
    }));
    send_signal(agent.id(), "TERM");
    let status = wait_exit(&mut agent, Duration::from_secs(10));
    let log = common::log_text(stderr);
    assert!(status.success(), "{status:?}\n{log}");
    let line = log.lines().find(|l| l.contains("clock: ")).unwrap();
    assert!(
        line.contains("jumped forward by 3153600") && line.contains("3650."),
        "{line}"
    );
    assert_eq!(log.matches("clock: ").count(), 1, "logged once:\n{log}");
}
