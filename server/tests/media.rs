//! Media bodies against a real relais-server: streamed to disk in bounded memory with
//! the right SHA-256, and a body cut anywhere leaves no row and no file. Every case runs
//! on both stores.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{Server, StoreKind, client, media, pattern, post, send_head, sha256_hex, wait_for};

common::on_both_stores!(
    a_20_mb_media_body_streams_to_a_file_in_bounded_memory,
    a_media_body_cut_anywhere_leaves_no_row_and_no_file,
    sigterm_lets_a_slow_request_in_flight_finish_and_exits_0,
);

fn a_20_mb_media_body_streams_to_a_file_in_bounded_memory(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let before = server.peak_rss_kib();
    let data = pattern(20 << 20, 20);
    let body = media("pi", &STANDARD.encode(&data));
    let (status, answer) = post(
        &client(),
        &server.url,
        "/api/media",
        Some("pi:media:1"),
        body.as_bytes(),
    );
    assert_eq!(status, 201, "{answer}");
    let peak = server.peak_rss_kib();
    let row = server.row("SELECT media_path, media_size, media_sha256 FROM media");
    let (path, size, sha) = (&row[0], &row[1], &row[2]);
    assert_eq!(size, &data.len().to_string());
    assert_eq!(sha, &sha256_hex(&data));
    let on_disk = std::fs::read(server.media_dir().join(path)).expect("media file");
    assert_eq!(&sha256_hex(&on_disk), sha, "the file's bytes");
    let stored_body = server.row("SELECT body FROM received").remove(0);
    assert!(
        stored_body.contains(&format!("\"media_path\": \"{path}\"")),
        "{stored_body}"
    );
    eprintln!(
        "server VmHWM: {before} KiB at start, {peak} KiB after a {} KiB body",
        body.len() / 1024
    );
    // The growth, not the absolute figure: the binary's own pages at start move with
    // its size (they were 10 MiB, the peak within 0.2 MiB of a fixed 16 MiB bound).
    assert!(
        peak < before + 8 * 1024,
        "peak RSS {peak} KiB (from {before} KiB) for a {} KiB body",
        body.len() / 1024
    );
}

/// Sends the head of a media request announcing the whole body, then `cut` bytes of it,
/// then closes the connection.
fn send_cut(server: &Server, body: &[u8], cut: usize) {
    let mut conn = send_head(&server.addr, "/api/media", "pi:media:1", body.len());
    conn.write_all(&body[..cut]).expect("part of the body");
    // Past the diversion threshold the server is writing a temporary file: wait until
    // it exists, so the cut hits a file being written, not a request not yet read.
    if cut > 100 * 1024 {
        assert!(
            wait_for(Duration::from_secs(5), || !server.media_files().is_empty()),
            "no temporary file for a cut at {cut}"
        );
    }
    conn.shutdown(Shutdown::Both).expect("close");
}

fn a_media_body_cut_anywhere_leaves_no_row_and_no_file(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let data = pattern(2 << 20, 7);
    let body = media("pi", &STANDARD.encode(&data)).into_bytes();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(1);
    eprintln!("cut offsets seed {seed}");
    let mut x = seed | 1;
    let mut cuts = vec![1, 40, body.len() - 1];
    for _ in 0..6 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        cuts.push(1 + (x >> 33) as usize % (body.len() - 1));
    }
    for cut in cuts {
        send_cut(&server, &body, cut);
        assert!(
            wait_for(Duration::from_secs(5), || server.media_files().is_empty()),
            "cut at {cut}: files left {:?}",
            server.media_files()
        );
    }
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
    // The server is still well: the same push, whole, is stored.
    let (status, answer) = post(
        &client(),
        &server.url,
        "/api/media",
        Some("pi:media:1"),
        &body,
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(server.media_files().len(), 1);
    assert_eq!(server.count("SELECT count(*) FROM media"), 1);
}

fn sigterm_lets_a_slow_request_in_flight_finish_and_exits_0(store: StoreKind) {
    let mut server = Server::start_on(store, &["--shutdown-grace-s", "5"]);
    let body = common::event("pi", 3).into_bytes();
    let mut conn = send_head(
        &server.addr,
        "/api/evenements",
        "pi:evenement:3",
        body.len(),
    );
    conn.write_all(&body[..10]).expect("first bytes");
    std::thread::sleep(Duration::from_millis(100));
    server.signal(libc::SIGTERM);
    assert!(
        wait_for(Duration::from_secs(5), || server.logged("shutting down")),
        "no shutdown"
    );
    assert!(
        server.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a request in flight"
    );
    let refused = TcpStream::connect(&server.addr)
        .map(|_| ())
        .map_err(|e| e.kind());
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "a new connection after SIGTERM"
    );
    conn.write_all(&body[10..]).expect("rest of the body");
    let mut answer = String::new();
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("exited within the grace");
    assert!(status.success(), "{status}");
    assert_eq!(server.count("SELECT count(*) FROM evenements"), 1);
}
