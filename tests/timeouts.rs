//! The HTTP timeouts, in process against real loopback servers: `response_timeout_s`
//! bounds the wait for the answer counted from when the body's last byte has left the
//! socket, `io_timeout_s` bounds a stall, and neither cuts an exchange that is moving.
#![cfg(feature = "demo")]

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::{DEVICE, Proxy, ProxyFault, Receiver, Scratch, tracking_rows};
use relais::demo::{check_delivery, create_app_db, insert_events, insert_media, settings_for};
use relais::push::{CycleReport, Interruption, Pusher};

/// An application database with `events` events and one media row per entry of `media`.
fn app(tag: &str, events: usize, media: &[u64]) -> (Scratch, PathBuf) {
    let dir = Scratch::new(tag);
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, events).expect("insert events");
    for size in media {
        insert_media(&conn, Some(*size)).expect("insert media");
    }
    (dir, db)
}

/// A pusher to `url` with these HTTP timeouts, in seconds.
/// The JSON push's timeouts: uploads off, or a silent backend's media row would wait
/// for the capability question first (cut as any unanswered exchange).
fn pusher(dir: &Scratch, db: &Path, url: &str, io: f64, response: f64) -> Pusher {
    let config = dir.join("relais.json");
    let json = format!(
        r#"{{"http": {{"connect_timeout_s": 1, "io_timeout_s": {io}, "response_timeout_s": {response}, "uploads": false}}}}"#
    );
    std::fs::write(&config, json).expect("write config");
    let config = config.display().to_string();
    let settings =
        settings_for(db, url, dir.path(), &[("RELAIS_CONFIG", &config)]).expect("settings");
    relais::daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false))).expect("pusher")
}

/// A backend without idempotency: every request that arrives is a row.
fn receiver(dir: &Scratch) -> Receiver {
    Receiver::start_with(&dir.join("receiver"), false)
}

/// Every row arrived exactly once and is tracked `success` after one attempt.
fn assert_delivered_once(dir: &Scratch, db: &Path, rx: &Receiver, report: &CycleReport) {
    assert!(report.is_clean(), "{report} {:?}", report.errors);
    let d = check_delivery(db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "each row stored once: {d:?}");
    let rows = tracking_rows(&dir.state_db());
    assert_eq!(rows.len() as u64, d.expected, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.status == "success" && r.attempts == 1),
        "{rows:?}"
    );
}

/// The pass was stopped by the backend; its reason.
fn interruption(report: &CycleReport) -> String {
    match &report.interrupted {
        Some(Interruption::Backend { reason, .. }) => reason.clone(),
        other => panic!("expected a backend interruption, got {other:?} in {report}"),
    }
}

/// The only row of the state database is still due: failed, after one attempt.
fn assert_still_due(dir: &Scratch) {
    let rows = tracking_rows(&dir.state_db());
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].status.as_str(), rows[0].attempts), ("failed", 1));
}

/// A server on 127.0.0.1 that accepts connections and never answers; `read` says whether
/// it reads what it is sent. Its listener and connections live as long as the process.
fn silent_server(read: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    if !read {
        small_receive_buffer(&listener);
    }
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for conn in listener.incoming().flatten() {
            if read {
                let mut conn = conn.try_clone().expect("clone");
                std::thread::spawn(move || std::io::copy(&mut conn, &mut std::io::sink()));
            }
            held.push(conn);
        }
    });
    url
}

/// A 4 KiB receive buffer for the connections `listener` accepts, so that a request a
/// little larger stays in the sender's queue when nothing reads it.
fn small_receive_buffer(listener: &TcpListener) {
    let size: libc::c_int = 4096;
    // SAFETY: SO_RCVBUF reads one int from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

#[test]
fn a_backend_slower_than_io_timeout_but_within_response_timeout_gets_each_row_once() {
    let (dir, db) = app("slow-answer", 2, &[]);
    let rx = receiver(&dir);
    for _ in 0..2 {
        rx.push_fault(ProxyFault::DelayAnswer(Duration::from_millis(1500)));
    }
    let report = pusher(&dir, &db, &rx.url(), 0.5, 3.0).sync_once();
    assert_delivered_once(&dir, &db, &rx, &report);
}

/// The body reaches the backend seconds after relais handed its last byte to the kernel:
/// the send queue of a slow link is not counted in the answer wait.
#[test]
fn a_slow_media_upload_is_not_cut_while_the_send_queue_drains() {
    let (dir, db) = app("slow-upload", 0, &[2 << 20]);
    let rx = receiver(&dir);
    rx.push_fault(ProxyFault::DelayAnswer(Duration::from_millis(500)));
    let proxy = Proxy::start(&rx.url(), 1 << 20);
    let report = pusher(&dir, &db, &proxy.url(), 1.0, 3.0).sync_once();
    assert_delivered_once(&dir, &db, &rx, &report);
}

#[test]
fn a_backend_that_never_answers_is_cut_after_response_timeout() {
    let (dir, db) = app("never-answers", 1, &[]);
    let url = silent_server(true);
    let mut p = pusher(&dir, &db, &url, 0.5, 1.5);
    let started = Instant::now();
    let report = p.sync_once();
    let waited = started.elapsed();
    let reason = interruption(&report);
    assert!(reason.contains("did not answer"), "{reason}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(3),
        "cut after {waited:?}"
    );
    assert_still_due(&dir);
}

/// A backend that reads nothing: the upload stalls in the writes (8 MiB) or, once the
/// request is written, while the send queue does not drain (8 KiB), and is cut after
/// `io_timeout`, long before `response_timeout`.
#[test]
fn a_stalled_upload_is_cut_after_io_timeout() {
    for size in [8 << 10, 8 << 20] {
        let (dir, db) = app(&format!("stalled-upload-{size}"), 0, &[size]);
        let url = silent_server(false);
        let mut p = pusher(&dir, &db, &url, 0.5, 10.0);
        let started = Instant::now();
        let report = p.sync_once();
        let waited = started.elapsed();
        let reason = interruption(&report);
        assert!(reason.contains("stalled"), "{size} B: {reason}");
        assert!(
            waited < Duration::from_secs(3),
            "{size} B: cut after {waited:?}"
        );
        assert_still_due(&dir);
    }
}
