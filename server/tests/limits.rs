//! Limits and operation against a real relais-server: an oversized head, an idle
//! connection, the connection cap, the drain bound on SIGTERM, and the metrics counters.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{Server, StoreKind, client, event, get_as, media, pattern, post_as, wait_for};

/// Reads until the peer closes, or `timeout` passes without a byte. Returns what came
/// and whether the peer closed.
fn read_until_closed(conn: &mut TcpStream, timeout: Duration) -> (String, bool) {
    conn.set_read_timeout(Some(timeout)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A reset after a refused head is a close too.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&got).into_owned(), true);
            }
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

fn request_with_header(server: &Server, filler: usize) -> TcpStream {
    let body = event("pi", 1);
    let mut conn = TcpStream::connect(&server.addr).expect("connect");
    let head = format!(
        "POST /api/evenements HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Idempotency-Key: pi:evenement:{filler}\r\nX-Filler: {}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        "x".repeat(filler),
        body.len()
    );
    // The server may refuse the head and close before all of it is written.
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body.as_bytes());
    conn
}

#[test]
fn a_head_over_the_limit_is_refused_and_stores_nothing() {
    let server = Server::start_with(&["--max-header-bytes", "4096"]);
    let mut big = request_with_header(&server, 8000);
    let (answer, closed) = read_until_closed(&mut big, Duration::from_secs(5));
    assert!(closed, "{answer}");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
    let mut fits = request_with_header(&server, 2000);
    let (answer, _) = read_until_closed(&mut fits, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 1);
}

#[test]
fn an_idle_connection_is_closed_after_the_header_timeout() {
    let server = Server::start_with(&["--header-timeout-s", "1"]);
    // Nothing sent at all.
    let mut silent = TcpStream::connect(&server.addr).expect("connect");
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut silent, Duration::from_secs(5));
    assert!(closed && answer.is_empty(), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Kept alive after one answer, then idle.
    let mut kept = TcpStream::connect(&server.addr).expect("connect");
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("request");
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut kept, Duration::from_secs(5));
    assert!(closed, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let server = Server::start_with(&["--max-connections", "2"]);
    let holders: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&server.addr).expect("connect"))
        .collect();
    let mut third = TcpStream::connect(&server.addr).expect("connect: the backlog");
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .expect("request");
    assert!(
        wait_for(Duration::from_secs(5), || server
            .logged("all 2 slots taken")),
        "no warning"
    );
    let (answer, closed) = read_until_closed(&mut third, Duration::from_millis(500));
    assert!(
        !closed && answer.is_empty(),
        "served beyond the cap: {answer}"
    );
    drop(holders);
    let (answer, _) = read_until_closed(&mut third, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_request_still_in_flight_after_the_grace_is_abandoned_with_exit_2() {
    let mut server = Server::start_with(&["--shutdown-grace-s", "1"]);
    let body = media("pi", &STANDARD.encode(pattern(1 << 20, 5)));
    let mut conn = TcpStream::connect(&server.addr).expect("connect");
    let head = format!(
        "POST /api/media HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(&body.as_bytes()[..body.len() / 2])
        .expect("half the body");
    // Its media string is being spooled: the request is in flight.
    assert!(
        wait_for(Duration::from_secs(5), || !server.media_files().is_empty()),
        "the request never started"
    );
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("exited after the grace");
    assert_eq!(status.code(), Some(2), "{status}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert!(server.logged("abandoned"));
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
}

/// The value of the series `name` (with its labels) in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_pushes_replays_and_errors_by_route_template() {
    let server = Server::start_authenticated(StoreKind::Sqlite, &[], "info");
    let device = server.token(&["--device", "pi"]);
    let admin = server.token(&["--admin", "prometheus"]);
    let agent = client();
    let body = event("pi", 1);
    let key = Some("pi:evenement:1");
    for _ in 0..2 {
        let (status, answer) = post_as(
            &agent,
            &server.url,
            "/api/evenements",
            Some(&device),
            key,
            body.as_bytes(),
        );
        assert_eq!(status, 201, "{answer}");
    }
    let bad = b"{\"date\": ";
    let (status, _) = post_as(
        &agent,
        &server.url,
        "/api/evenements",
        Some(&device),
        None,
        bad,
    );
    assert_eq!(status, 400);
    let (status, _) = post_as(
        &agent,
        &server.url,
        "/api/evenements",
        None,
        key,
        body.as_bytes(),
    );
    assert_eq!(status, 401);
    assert_eq!(
        get_as(&agent, &server.url, "/config/secret-site-token", None).0,
        401
    );
    assert_eq!(
        get_as(&agent, &server.url, "/nowhere/secret-site-token", None).0,
        404
    );

    let (status, _, text) = get_as(&agent, &server.url, "/metrics", Some(&admin));
    assert_eq!(status, 200, "{text}");
    let api = "{route=\"/api/{name}\",status=";
    let expected = [
        (format!("relais_server_requests_total{api}\"201\"}}"), 2.0),
        (format!("relais_server_requests_total{api}\"400\"}}"), 1.0),
        (format!("relais_server_requests_total{api}\"401\"}}"), 1.0),
        (
            "relais_server_requests_total{route=\"unmatched\",status=\"404\"}".to_string(),
            1.0,
        ),
        (
            "relais_server_requests_total{route=\"/config/{site_token}\",status=\"401\"}"
                .to_string(),
            1.0,
        ),
        (
            "relais_server_request_duration_seconds_count{route=\"/api/{name}\"}".to_string(),
            4.0,
        ),
        (
            "relais_server_request_duration_seconds_bucket{route=\"/api/{name}\",le=\"+Inf\"}"
                .to_string(),
            4.0,
        ),
        ("relais_server_rows_stored_total".to_string(), 1.0),
        ("relais_server_replays_total".to_string(), 1.0),
        ("relais_server_store_errors_total".to_string(), 0.0),
    ];
    for (series, value) in &expected {
        assert_eq!(sample(&text, series), Some(*value), "{series}\n{text}");
    }
    // The 401 was answered before its body was read: two bodies and the bad one.
    let received = sample(&text, "relais_server_received_bytes_total").expect("bytes");
    assert!(
        received >= (2 * body.len() + bad.len()) as f64,
        "{received}\n{text}"
    );
    assert!(
        !text.contains("secret-site-token")
            && !text.contains("/nowhere")
            && !text.contains("/api/evenements")
    );
    assert!(text.contains("# TYPE relais_server_request_duration_seconds histogram"));
}
