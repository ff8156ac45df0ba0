//! Media as resumable uploads (tus 1.0.0, README "Resumable media") with `relais` as a
//! child process and relais-server offering them (`Receiver::offer_uploads`): a
//! SIGKILL mid-upload resumes from the server's offset, a connection reset mid-chunk
//! resumes, a lost answer to the creating POST makes one upload and one row, an upload
//! the server expired starts again from 0, a row deleted mid-upload is abandoned, and a
//! backend without uploads gets JSON with base64 as before. Uploads that must last a
//! while go through a throttling proxy that counts the bytes it forwards.
#![cfg(feature = "demo")]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    DEVICE, Proxy, ProxyFault, Receiver, Scratch, agent_env, log_text, run_relais, spawn_logged,
    tracked, utc_in, wait_exit, wait_for, windows_config,
};
use relais::demo::{check_delivery, create_app_db, insert_media};
use rusqlite::{Connection, OpenFlags};

const MB: u64 = 1 << 20;
/// Bytes of one PATCH (`PATCH_BYTES` of src/upload.rs).
const CHUNK: u64 = MB;
/// A rate the proxy never waits for.
const UNTHROTTLED: u64 = 1 << 40;

fn app(dir: &Scratch, blob: u64) -> PathBuf {
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_media(&conn, Some(blob)).expect("insert media");
    db
}

fn receiver(dir: &Scratch) -> Receiver {
    let rx = Receiver::start(&dir.join("receiver"));
    rx.offer_uploads();
    rx
}

/// The media row arrived exactly once, byte for byte.
fn delivered_once(db: &Path, rx: &Receiver) {
    let d = check_delivery(db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
    assert_eq!(rx.rows().len(), 1, "one row");
}

/// `relais once`, its exit code and its log.
fn once(vars: &[(String, String)]) -> (Option<i32>, String) {
    let out = run_relais(&["once"], vars, Duration::from_secs(120));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Uploads the agent's state database records (none once the row is `success`).
fn persisted_uploads(dir: &Scratch) -> i64 {
    let conn = state(dir).expect("open state db");
    conn.query_row("SELECT count(*) FROM media_uploads", [], |r| r.get(0))
        .expect("count media_uploads")
}

/// The state database, read only: opening it must not create it before the agent does.
fn state(dir: &Scratch) -> Option<Connection> {
    let conn =
        Connection::open_with_flags(dir.state_db(), OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    Some(conn)
}

fn persisted_offset(dir: &Scratch) -> Option<u64> {
    let conn = state(dir)?;
    conn.query_row("SELECT upload_offset FROM media_uploads", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()
    .map(|n| n as u64)
}

#[test]
fn sigkill_mid_upload_resumes_from_the_servers_offset_and_the_media_arrives_once() {
    let dir = Scratch::new("upload-sigkill");
    let blob = 32 * MB;
    let db = app(&dir, blob);
    let rx = receiver(&dir);
    let proxy = Proxy::start(&rx.url(), 8 * MB);
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let (mut agent, stderr) = spawn_logged(&["once"], &vars);
    assert!(
        wait_for(Duration::from_secs(60), || proxy.forwarded() > blob / 2),
        "the upload did not get halfway"
    );
    common::power_cut(&mut agent);
    let _ = log_text(stderr);
    let at_kill = proxy.forwarded();
    let offset = persisted_offset(&dir).expect("the upload and its offset are recorded");
    assert!(
        offset >= blob / 2 - CHUNK && offset % CHUNK == 0,
        "offset {offset}"
    );
    assert_eq!(rx.rows().len(), 0, "nothing stored yet");
    let status = run_relais(&["status"], &vars, Duration::from_secs(10));
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let said = format!(
        "{:.1} MiB of 32.0 MiB on the server",
        offset as f64 / MB as f64
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("upload: ") && l.contains(&said)),
        "{status}"
    );

    let (code, log) = once(&vars);
    assert_eq!(code, Some(0), "{log}");
    delivered_once(&db, &rx);
    let total = proxy.forwarded();
    println!(
        "SIGKILL at {} MiB forwarded (offset {} MiB): {} MiB forwarded in all for a {} MiB BLOB",
        at_kill / MB,
        offset / MB,
        total / MB,
        blob / MB
    );
    // JSON with base64 from 0 would be about 1.33 + 0.5 of the BLOB.
    assert!(
        total <= blob + blob / 10 + CHUNK,
        "{total} bytes forwarded: the second run did not resume"
    );
    let row = tracked(&dir.state_db(), "media", 1).expect("tracked");
    assert_eq!(row.status, "success", "{row:?}");
    assert_eq!(row.remote_id, Some(rx.rows()[0].id), "the remote id");
    assert_eq!(persisted_uploads(&dir), 0, "the upload is forgotten");
    assert_eq!(rx.uploads(), 1, "one upload on the server");
}

#[test]
fn a_connection_reset_mid_chunk_resumes_from_the_offset() {
    let dir = Scratch::new("upload-reset");
    let blob = 16 * MB;
    let db = app(&dir, blob);
    let rx = receiver(&dir);
    // The second chunk's connection dies halfway: the first chunk stays on the server.
    rx.patch_fault(ProxyFault::Pass);
    rx.patch_fault(ProxyFault::ResetMidBody);
    let proxy = Proxy::start(&rx.url(), UNTHROTTLED);
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let (code, log) = once(&vars);
    assert_eq!(code, Some(1), "the pass fails transiently: {log}");
    assert_eq!(persisted_offset(&dir), Some(CHUNK), "{log}");
    let row = tracked(&dir.state_db(), "media", 1).expect("tracked");
    assert_eq!(row.status, "failed", "{row:?}");
    let before = proxy.forwarded();

    let (code, log) = once(&vars);
    assert_eq!(code, Some(0), "{log}");
    delivered_once(&db, &rx);
    let resent = proxy.forwarded() - before;
    assert!(
        resent < blob - CHUNK + MB,
        "{resent} bytes sent the second time: not resumed"
    );
    assert_eq!(persisted_uploads(&dir), 0);
}

#[test]
fn a_lost_answer_to_the_creating_post_makes_one_upload_and_one_row() {
    let dir = Scratch::new("upload-lost-post");
    let db = app(&dir, 6 * MB);
    let rx = receiver(&dir);
    rx.push_fault(ProxyFault::LoseAnswer);
    let vars = agent_env(&db, &rx.url(), dir.path(), &[]);
    let (code, log) = once(&vars);
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(rx.uploads(), 1, "the server created the upload");
    assert_eq!(persisted_uploads(&dir), 0, "the agent never heard of it");

    let (code, log) = once(&vars);
    assert_eq!(code, Some(0), "{log}");
    delivered_once(&db, &rx);
    assert_eq!(rx.uploads(), 1, "one upload on the server, not two");
    assert_eq!(rx.stats().stored, 1);
}

#[test]
fn an_upload_the_server_expired_starts_again_from_zero() {
    let dir = Scratch::new("upload-expired");
    let blob = 12 * MB;
    let db = app(&dir, blob);
    let rx = receiver(&dir);
    rx.patch_fault(ProxyFault::Pass);
    rx.patch_fault(ProxyFault::Status(503, None));
    let proxy = Proxy::start(&rx.url(), UNTHROTTLED);
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let (code, log) = once(&vars);
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(persisted_offset(&dir), Some(CHUNK), "{log}");
    assert_eq!(rx.expire_uploads(), 1);
    let before = proxy.forwarded();

    let (code, log) = once(&vars);
    assert_eq!(code, Some(0), "{log}");
    delivered_once(&db, &rx);
    let resent = proxy.forwarded() - before;
    assert!(resent >= blob, "{resent} bytes: the whole BLOB again");
    assert_eq!(persisted_uploads(&dir), 0);
}

/// Starts `relais once` on a 32 MiB upload through an 8 MiB/s proxy, runs `change` on
/// the application's database once a chunk is confirmed, and checks the row is
/// abandoned with `reason`, its upload forgotten, nothing stored.
fn changed_mid_upload(tag: &str, change: &str, reason: &str) {
    let dir = Scratch::new(tag);
    let db = app(&dir, 32 * MB);
    let rx = receiver(&dir);
    let proxy = Proxy::start(&rx.url(), 8 * MB);
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let (mut agent, stderr) = spawn_logged(&["once"], &vars);
    let started = wait_for(Duration::from_secs(30), || {
        persisted_offset(&dir).is_some_and(|o| o > 0)
    });
    if !started {
        common::power_cut(&mut agent);
        panic!("the upload did not start: {}", log_text(stderr));
    }
    let app = Connection::open(&db).expect("open app db");
    app.busy_timeout(Duration::from_secs(5)).unwrap();
    app.execute_batch(change).expect("the application's change");
    let status = wait_exit(&mut agent, Duration::from_secs(30));
    let log = log_text(stderr);
    assert_eq!(status.code(), Some(1), "{log}");
    let row = tracked(&dir.state_db(), "media", 1).expect("tracked");
    assert_eq!(row.status, "failed", "{row:?}");
    let error = row.error.unwrap_or_default();
    assert!(error.contains(reason), "error_message: {error}");
    assert_eq!(persisted_uploads(&dir), 0, "the upload is forgotten");
    assert!(rx.rows().is_empty());
}

#[test]
fn a_row_deleted_mid_upload_is_abandoned_with_the_reason_and_its_upload_forgotten() {
    changed_mid_upload(
        "upload-deleted",
        "DELETE FROM media WHERE id_media = 1",
        "deleted",
    );
}

#[test]
fn a_blob_changed_mid_upload_is_abandoned_with_the_reason_and_its_upload_forgotten() {
    changed_mid_upload(
        "upload-changed",
        "UPDATE media SET video = zeroblob(1000000) WHERE id_media = 1",
        "changed",
    );
}

#[test]
fn a_backend_without_uploads_gets_json_with_base64_and_uploads_off_does_too() {
    for (tag, offer, extra) in [
        ("upload-none", false, vec![]),
        ("upload-off", true, vec![("RELAIS_UPLOADS", "off")]),
    ] {
        let dir = Scratch::new(tag);
        let blob = 2 * MB;
        let db = app(&dir, blob);
        let rx = Receiver::start(&dir.join("receiver"));
        if offer {
            rx.offer_uploads();
        }
        let proxy = Proxy::start(&rx.url(), UNTHROTTLED);
        let vars = agent_env(&db, &proxy.url(), dir.path(), &extra);
        let (code, log) = once(&vars);
        assert_eq!(code, Some(0), "{log}");
        delivered_once(&db, &rx);
        assert!(
            proxy.forwarded() > blob * 4 / 3,
            "{tag}: base64 is a third larger than the BLOB"
        );
        assert!(!log.contains("resumable upload"), "{tag}: {log}");
        assert_eq!(rx.uploads(), 0, "{tag}");
    }
}

#[test]
fn a_window_closing_mid_upload_leaves_the_offset_and_the_next_window_resumes_there() {
    const KIB: u64 = 1 << 10;
    let dir = Scratch::new("upload-window");
    let blob = 1024 * KIB;
    let db = app(&dir, blob);
    let rx = receiver(&dir);
    let proxy = Proxy::start(&rx.url(), UNTHROTTLED);
    // 1 MiB at the lane's cap of 128 KiB/s, 64 KiB chunks: about 8 s, longer than what
    // is left of the first window (6 s, with room for a slow start under qemu); the
    // second opens 6 s after it closes.
    let config = windows_config(
        &dir,
        &[(utc_in(-60), utc_in(6)), (utc_in(12), utc_in(3600))],
        Some(131_072),
        r#""blob_chunk_bytes": 65536, "#,
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
    let held = wait_for(Duration::from_secs(15), || {
        std::fs::read_to_string(dir.join("log/relais.log"))
            .is_ok_and(|l| l.contains("media pushed 0 failed 0 waiting 1"))
    });
    let between = (tracked(&dir.state_db(), "media", 1), persisted_offset(&dir));
    let done = wait_for(Duration::from_secs(60), || rx.rows().len() == 1);
    common::send_signal(agent.id(), "TERM");
    let code = wait_exit(&mut agent, Duration::from_secs(10));
    let log = log_text(stderr);
    assert!(held, "the closing window did not hold the row\n{log}");
    let row = between.0.expect("the row is tracked");
    assert_eq!(row.status, "pending", "{row:?}\n{log}");
    let offset = between.1.expect("the offset is recorded");
    assert!(offset > 0 && offset < blob, "offset {offset}\n{log}");
    assert!(done, "the media never arrived in the second window\n{log}");
    assert_eq!(code.code(), Some(0), "{log}");
    delivered_once(&db, &rx);
    let forwarded = proxy.forwarded();
    assert!(
        forwarded < blob + 64 * KIB + 64 * KIB,
        "{forwarded} bytes forwarded: the second window did not resume"
    );
}

#[test]
fn a_chunk_damaged_on_the_way_is_sent_again_and_the_media_arrives_intact() {
    let dir = Scratch::new("upload-checksum");
    let blob = 10 * MB;
    let db = app(&dir, blob);
    let rx = receiver(&dir);
    rx.patch_fault(ProxyFault::Pass);
    rx.patch_fault(ProxyFault::FlipByte);
    let proxy = Proxy::start(&rx.url(), UNTHROTTLED);
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[("RELAIS_LOG_LEVEL", "debug")],
    );
    let (code, log) = once(&vars);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("arrived damaged (460); sent again"), "{log}");
    delivered_once(&db, &rx);
    let forwarded = proxy.forwarded();
    assert!(
        forwarded > blob + CHUNK && forwarded < blob + CHUNK + MB,
        "{forwarded} bytes: the damaged chunk, and only it, twice"
    );
    assert_eq!(persisted_uploads(&dir), 0);
}

#[test]
fn a_server_restart_mid_upload_then_the_upload_resumes_on_the_new_server() {
    let dir = Scratch::new("upload-restart");
    let blob = 32 * MB;
    let db = app(&dir, blob);
    let mut rx = receiver(&dir);
    let proxy = Proxy::start(&rx.url(), 8 * MB);
    let vars = agent_env(&db, &proxy.url(), dir.path(), &[]);
    let (mut agent, stderr) = spawn_logged(&["once"], &vars);
    let started = wait_for(Duration::from_secs(60), || {
        persisted_offset(&dir).is_some_and(|o| o >= 2 * CHUNK)
    });
    if !started {
        common::power_cut(&mut agent);
        panic!("the upload did not start: {}", log_text(stderr));
    }
    rx.restart(&dir.join("receiver"));
    let first = wait_exit(&mut agent, Duration::from_secs(60));
    let log = log_text(stderr);
    // The chunk in flight may have been answered within the old server's grace period:
    // then the same run goes on with the new server.
    let mut code = first.code();
    for _ in 0..3 {
        if code == Some(0) {
            break;
        }
        let (again, log) = once(&vars);
        code = again;
        println!("{log}");
    }
    assert_eq!(code, Some(0), "{log}");
    delivered_once(&db, &rx);
    let total = proxy.forwarded();
    println!(
        "server restart mid-upload: {} MiB forwarded in all for a {} MiB BLOB",
        total / MB,
        blob / MB
    );
    assert!(
        total <= blob + blob / 10 + CHUNK,
        "{total} bytes forwarded: not resumed"
    );
    assert_eq!(rx.uploads(), 1, "one upload");
}
