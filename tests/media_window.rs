//! The media lane's time windows with `relais run` as a child process, in a time zone
//! set for the test (`TZ=UTC0`) and windows placed a few seconds from now: media wait
//! for their window, go when it opens without waiting for the interval, and a window
//! closing mid-upload leaves the row pending (not failed) until the next one. Every
//! wait is on a condition with a deadline.
#![cfg(feature = "demo")]

mod common;

use std::time::Duration;

use common::{
    DEVICE, Proxy, Receiver, Scratch, agent_env, log_text, run_relais, send_signal, spawn_logged,
    tracked, utc_in, wait_exit, wait_for, windows_config,
};
use relais::demo::{check_delivery, create_app_db, insert_events, insert_media};

const KIB: u64 = 1 << 10;

fn arrived(rx: &Receiver, endpoint: &str) -> usize {
    rx.rows().iter().filter(|r| r.endpoint == endpoint).count()
}

#[test]
fn media_wait_for_their_window_and_go_when_it_opens_while_events_go_at_once() {
    let dir = Scratch::new("window-opens");
    let db = dir.join("surveillance.db");
    let app = create_app_db(&db, true).expect("app db");
    insert_media(&app, Some(64 * KIB)).expect("media");
    insert_events(&app, 2).expect("events");
    let rx = Receiver::start(&dir.join("receiver"));
    let config = windows_config(&dir, &[(utc_in(10), utc_in(3600))], None, "");
    // An interval far longer than the test: the media lane must wake for the window.
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[
            ("TZ", "UTC0"),
            ("SYNC_INTERVAL_SECONDS", "600"),
            ("RELAIS_CONFIG", &config),
        ],
    );
    let (mut agent, stderr) = spawn_logged(&["run"], &vars);
    let events_first = wait_for(Duration::from_secs(5), || arrived(&rx, "evenements") == 2);
    let media_early = arrived(&rx, "media");
    let mut status = String::new();
    let said = wait_for(Duration::from_secs(5), || {
        let out = run_relais(&["status"], &vars, Duration::from_secs(10));
        status = String::from_utf8_lossy(&out.stdout).into_owned();
        status.contains("media wait for their window, which opens at")
    });
    let media_later = wait_for(Duration::from_secs(30), || arrived(&rx, "media") == 1);
    send_signal(agent.id(), "TERM");
    let code = wait_exit(&mut agent, Duration::from_secs(10));
    let log = log_text(stderr);
    assert!(events_first, "the events waited\n{log}");
    assert_eq!(media_early, 0, "the media went before its window\n{log}");
    assert!(said, "relais status does not say the media wait:\n{status}");
    assert!(media_later, "the media never went\n{log}");
    assert_eq!(code.code(), Some(0), "{log}");
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
}

#[test]
fn a_window_closing_mid_upload_leaves_the_row_pending_until_the_next_one() {
    let dir = Scratch::new("window-closes");
    let db = dir.join("surveillance.db");
    let app = create_app_db(&db, true).expect("app db");
    // 1 MiB, 1.4 MB of base64 at the lane's cap of 128 KiB/s: about 11 s, longer than
    // what is left of the first window (6 s, with room for a slow start under qemu). The cap paces the agent's reads of the body, so the window's end
    // is seen mid-body (a throttling proxy would let the socket buffers take it all).
    insert_media(&app, Some(1024 * KIB)).expect("media");
    let rx = Receiver::start(&dir.join("receiver"));
    let proxy = Proxy::start(&rx.url(), 1 << 30);
    let config = windows_config(
        &dir,
        &[(utc_in(-60), utc_in(6)), (utc_in(12), utc_in(3600))],
        Some(128 * KIB),
        "",
    );
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[
            ("TZ", "UTC0"),
            ("SYNC_INTERVAL_SECONDS", "600"),
            ("RELAIS_CONFIG", &config),
        ],
    );
    let (mut agent, stderr) = spawn_logged(&["run"], &vars);
    let state = dir.state_db();
    let started = wait_for(Duration::from_secs(10), || proxy.forwarded() > 64 * KIB);
    let held = wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(dir.join("log/relais.log"))
            .is_ok_and(|l| l.contains("media pushed 0 failed 0 waiting 1"))
    });
    let between = tracked(&state, "media", 1);
    let done = wait_for(Duration::from_secs(60), || arrived(&rx, "media") == 1);
    send_signal(agent.id(), "TERM");
    let code = wait_exit(&mut agent, Duration::from_secs(10));
    let log = log_text(stderr);
    assert!(started, "the upload never started\n{log}");
    assert!(held, "the closing window did not hold the row\n{log}");
    let between = between.expect("the row is tracked");
    assert_eq!(between.status, "pending", "{between:?}\n{log}");
    assert!(done, "the media never arrived in the second window\n{log}");
    assert_eq!(code.code(), Some(0), "{log}");
    let row = tracked(&state, "media", 1).expect("tracked");
    assert_eq!(row.status, "success", "{row:?}");
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
}

#[test]
fn once_waits_for_the_window_and_once_now_does_not() {
    let dir = Scratch::new("window-once-now");
    let db = dir.join("surveillance.db");
    let app = create_app_db(&db, true).expect("app db");
    insert_media(&app, Some(64 * KIB)).expect("media");
    insert_events(&app, 1).expect("event");
    let rx = Receiver::start(&dir.join("receiver"));
    let config = windows_config(&dir, &[(utc_in(3600), utc_in(7200))], None, "");
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[("TZ", "UTC0"), ("RELAIS_CONFIG", &config)],
    );
    let out = run_relais(&["once"], &vars, Duration::from_secs(30));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "media wait: not done\n{log}");
    assert_eq!(arrived(&rx, "evenements"), 1, "{log}");
    assert_eq!(arrived(&rx, "media"), 0, "{log}");
    assert!(log.contains("media wait for their window"), "{log}");

    let out = run_relais(&["once", "--now"], &vars, Duration::from_secs(30));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
}
