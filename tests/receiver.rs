//! Integration tests of the reference receiver, driven over real sockets on
//! 127.0.0.1 with a raw HTTP/1.1 client (so tests control framing exactly:
//! chunked bodies, keep-alive, malformed request lines).
#![cfg(feature = "receiver")]

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::Scratch;
use relais::receiver::{Fault, Receiver, ReceiverOptions, ReceiverStats};

// ---------------------------------------------------------------- helpers

fn start(idempotency: bool) -> (Receiver, Scratch) {
    let dir = Scratch::uncreated("receiver");
    let mut opts = ReceiverOptions::new(&dir.0);
    opts.idempotency = idempotency;
    (Receiver::start(opts).expect("receiver starts"), dir)
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `id` of a `{"id": N, ...}` body.
    fn id(&self) -> i64 {
        let rest = self
            .body
            .split("\"id\":")
            .nth(1)
            .unwrap_or_else(|| panic!("no id in {:?}", self.body));
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().expect("numeric id")
    }
}

/// A keep-alive client connection.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(rx: &Receiver) -> Conn {
        let addr = rx.url().trim_start_matches("http://").to_string();
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Conn {
            reader: BufReader::new(stream.try_clone().expect("clone")),
            writer: stream,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Sends a POST with a Content-Length body and the extra headers.
    fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<()> {
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.send_raw(head.as_bytes())?;
        self.send_raw(body)
    }

    /// Reads one response; `Ok(None)` if the server closed without one.
    fn read(&mut self) -> io::Result<Option<Resp>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("header line");
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("length"));
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok(Some(Resp {
            status,
            headers,
            body: String::from_utf8(body).expect("utf8 body"),
        }))
    }

    fn expect_response(&mut self) -> Resp {
        self.read().expect("read").expect("a response")
    }

    /// True when the server closed the connection (EOF or reset) without
    /// sending anything more.
    fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 1];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::TimedOut,
        }
    }
}

/// One request on its own connection.
fn post(rx: &Receiver, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut conn = Conn::open(rx);
    conn.post(path, headers, body).expect("send");
    conn.expect_response()
}

/// The next response has `status`, then the server closes the connection; nothing stored.
fn assert_refused_and_closed(conn: &mut Conn, rx: &Receiver, status: u16) {
    let resp = conn.expect_response();
    assert_eq!(resp.status, status);
    assert!(conn.closed_by_server());
    assert!(rx.rows().is_empty());
}

/// The server closes the connection (or it fails) without an answer.
fn assert_no_answer(conn: &mut Conn) {
    assert!(
        conn.read().map_or(true, |r| r.is_none()),
        "no answer expected"
    );
}

const EVENT: &str = r#"{"date": "2025-12-18T17:30:00.123456", "capteur": {"id": 1, "nom": "PIR Entrée", "etat": 1}, "device_id": "raspberry-1", "source": "sync_service"}"#;

fn stats(requests: u64, stored: u64, replays: u64) -> ReceiverStats {
    ReceiverStats {
        requests,
        stored,
        replays,
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn stores_an_event_and_reads_it_back() {
    let (rx, _dir) = start(true);
    let resp = post(
        &rx,
        "/api/evenements",
        &[
            ("Idempotency-Key", "raspberry-1:evenements:1"),
            ("Authorization", "Bearer s3cret"),
        ],
        EVENT.as_bytes(),
    );
    assert_eq!(resp.status, 201);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.body, r#"{"id":1,"message":"created"}"#);

    let rows = rx.rows();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.id, 1);
    assert_eq!(row.endpoint, "evenements");
    assert_eq!(
        row.idempotency_key.as_deref(),
        Some("raspberry-1:evenements:1")
    );
    assert_eq!(row.json, EVENT);
    assert_eq!(row.authorization.as_deref(), Some("Bearer s3cret"));
    assert_eq!((row.blob.as_ref(), row.blob_len), (None, None));
    assert_eq!(rx.stats(), stats(1, 1, 0));
}

#[test]
fn media_base64_arrives_as_identical_blob_file() {
    let (rx, dir) = start(true);
    // 3.75 MB of bytes = 5 MB of base64, with '/' and '+' in it.
    let data: Vec<u8> = (0..3_932_160u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let b64 = STANDARD.encode(&data);
    assert_eq!(b64.len(), 5 * 1024 * 1024);
    let body = format!(
        r#"{{"date": "2025-12-18T17:30:00.123456", "capteur": {{"id": 4, "nom": "Caméra 1"}}, "numero_camera": 1, "video_data": "{b64}", "device_id": "raspberry-1", "source": "sync_service"}}"#
    );
    let resp = post(
        &rx,
        "/api/media",
        &[("Idempotency-Key", "r:media:1")],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 201, "{}", resp.body);

    let rows = rx.rows();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.endpoint, "media");
    assert_eq!(
        row.json,
        r#"{"date": "2025-12-18T17:30:00.123456", "capteur": {"id": 4, "nom": "Caméra 1"}, "numero_camera": 1, "video_data": "<blob>", "device_id": "raspberry-1", "source": "sync_service"}"#
    );
    let path = row.blob.as_ref().expect("blob path");
    assert_eq!(path, &dir.0.join("blobs").join(format!("{}.bin", row.id)));
    assert_eq!(row.blob_len, Some(data.len() as u64));
    assert!(std::fs::read(path).expect("blob file") == data);
    // No temporary file is left behind.
    let leftovers = std::fs::read_dir(dir.0.join("tmp")).expect("tmp").count();
    assert_eq!(leftovers, 0);
}

#[test]
fn short_media_string_stays_inline() {
    let (rx, _dir) = start(true);
    let body = r#"{"numero_camera": 1, "video_data": "AAEC"}"#;
    assert_eq!(post(&rx, "/api/media", &[], body.as_bytes()).status, 201);
    let rows = rx.rows();
    assert_eq!(rows[0].json, body);
    assert_eq!(rows[0].blob, None);
}

#[test]
fn repeated_idempotency_key_is_replayed() {
    let (rx, _dir) = start(true);
    let key = [("Idempotency-Key", "raspberry-1:evenements:7")];
    let first = post(&rx, "/api/evenements", &key, EVENT.as_bytes());
    let second = post(&rx, "/api/evenements", &key, EVENT.as_bytes());
    assert_eq!((first.status, second.status), (201, 201));
    assert_eq!(first.id(), second.id());
    assert_eq!(rx.rows().len(), 1);
    assert_eq!(rx.stats(), stats(2, 1, 1));
    // A different key is a different row.
    let other = post(
        &rx,
        "/api/evenements",
        &[("Idempotency-Key", "raspberry-1:evenements:8")],
        EVENT.as_bytes(),
    );
    assert_ne!(other.id(), first.id());
}

#[test]
fn concurrent_duplicates_store_one_row() {
    let (rx, _dir) = start(true);
    let ids: Vec<i64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let key = [("Idempotency-Key", "d:evenements:1")];
                    post(&rx, "/api/evenements", &key, EVENT.as_bytes()).id()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert!(ids.iter().all(|&id| id == ids[0]), "{ids:?}");
    assert_eq!(rx.rows().len(), 1);
    assert_eq!(rx.stats(), stats(8, 1, 7));
}

#[test]
fn idempotency_off_stores_every_request() {
    let (rx, _dir) = start(false);
    let key = [("Idempotency-Key", "raspberry-1:evenements:7")];
    let first = post(&rx, "/api/evenements", &key, EVENT.as_bytes());
    let second = post(&rx, "/api/evenements", &key, EVENT.as_bytes());
    assert_ne!(first.id(), second.id());
    assert_eq!(rx.rows().len(), 2);
    assert_eq!(rx.stats(), stats(2, 2, 0));
}

#[test]
fn chunked_body_is_refused_with_411() {
    let (rx, _dir) = start(true);
    let mut conn = Conn::open(&rx);
    let body = EVENT.as_bytes();
    let mut req = format!(
        "POST /api/evenements HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    conn.send_raw(&req).expect("send");
    assert_refused_and_closed(&mut conn, &rx, 411);
}

#[test]
fn missing_content_length_is_refused_with_411() {
    let (rx, _dir) = start(true);
    let mut conn = Conn::open(&rx);
    conn.send_raw(b"POST /api/evenements HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send");
    assert_eq!(conn.expect_response().status, 411);
}

#[test]
fn invalid_bodies_are_rejected() {
    let (rx, _dir) = start(true);
    let resp = post(&rx, "/api/evenements", &[], b"this is not json");
    assert_eq!(resp.status, 400);
    assert!(
        resp.body.starts_with(r#"{"detail":"body is not JSON: "#),
        "{}",
        resp.body
    );

    let resp = post(&rx, "/api/evenements", &[], b"[1, 2, 3]");
    assert_eq!(resp.status, 422, "{}", resp.body);

    let bad_b64 = format!(r#"{{"video_data": "{}*"}}"#, "A".repeat(100_000));
    let resp = post(&rx, "/api/media", &[], bad_b64.as_bytes());
    assert_eq!(resp.status, 422, "{}", resp.body);
    assert!(resp.body.contains("base64"), "{}", resp.body);

    // Two large strings cannot both be "the" blob.
    let big = "QUJD".repeat(20_000);
    let two = format!(r#"{{"a": "{big}", "b": "{big}"}}"#);
    assert_eq!(post(&rx, "/api/media", &[], two.as_bytes()).status, 422);

    assert!(rx.rows().is_empty());
    assert_eq!(rx.stats().stored, 0);
}

#[test]
fn unknown_routes_and_malformed_requests() {
    let (rx, _dir) = start(true);
    let mut conn = Conn::open(&rx);
    conn.send_raw(b"GET /api/evenements HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send");
    assert_eq!(conn.expect_response().status, 404);
    // The connection survives a 404.
    conn.post("/elsewhere", &[], b"{}").expect("send");
    assert_eq!(conn.expect_response().status, 404);

    let mut conn = Conn::open(&rx);
    conn.send_raw(b"complete garbage\r\n\r\n").expect("send");
    assert_refused_and_closed(&mut conn, &rx, 400);
}

#[test]
fn keep_alive_serves_several_requests_per_connection() {
    let (rx, _dir) = start(true);
    let mut conn = Conn::open(&rx);
    for i in 1..=3 {
        let key = format!("d:evenements:{i}");
        conn.post(
            "/api/evenements",
            &[("Idempotency-Key", &key)],
            EVENT.as_bytes(),
        )
        .expect("send");
        let resp = conn.expect_response();
        assert_eq!((resp.status, resp.id()), (201, i));
        assert_eq!(resp.header("connection"), None);
    }
    // `Connection: close` is honoured.
    conn.post(
        "/api/evenements",
        &[("Connection", "close")],
        EVENT.as_bytes(),
    )
    .expect("send");
    let resp = conn.expect_response();
    assert_eq!(resp.status, 201);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(conn.closed_by_server());
    assert_eq!(rx.rows().len(), 4);
}

#[test]
fn fault_lose_answer_stores_but_does_not_answer() {
    let (rx, _dir) = start(true);
    rx.push_fault(Fault::LoseAnswer);
    let mut conn = Conn::open(&rx);
    conn.post(
        "/api/evenements",
        &[("Idempotency-Key", "k:1")],
        EVENT.as_bytes(),
    )
    .expect("send");
    assert_no_answer(&mut conn);
    assert_eq!(rx.rows().len(), 1);
    // The retry is answered from the idempotency cache with the same id.
    let retry = post(
        &rx,
        "/api/evenements",
        &[("Idempotency-Key", "k:1")],
        EVENT.as_bytes(),
    );
    assert_eq!((retry.status, retry.id()), (201, 1));
    assert_eq!(rx.stats(), stats(2, 1, 1));
}

#[test]
fn fault_status_answers_and_stores_nothing() {
    let (rx, _dir) = start(true);
    rx.push_fault(Fault::Status(503, Some(7)));
    rx.push_fault(Fault::Status(413, None));
    let mut conn = Conn::open(&rx);
    conn.post("/api/evenements", &[], EVENT.as_bytes())
        .expect("send");
    let resp = conn.expect_response();
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("retry-after"), Some("7"));
    assert_eq!(resp.body, r#"{"detail":"injected 503"}"#);
    // The body was drained: the same connection carries the next request.
    conn.post("/api/evenements", &[], EVENT.as_bytes())
        .expect("send");
    let resp = conn.expect_response();
    assert_eq!(resp.status, 413);
    assert_eq!(resp.header("retry-after"), None);
    assert!(rx.rows().is_empty());
    // Faults are used up: the third request is stored.
    conn.post("/api/evenements", &[], EVENT.as_bytes())
        .expect("send");
    assert_eq!(conn.expect_response().status, 201);
    assert_eq!(rx.rows().len(), 1);
}

#[test]
fn fault_delay_answers_late() {
    let (rx, _dir) = start(true);
    rx.push_fault(Fault::Delay(Duration::from_millis(400)));
    let started = Instant::now();
    let resp = post(&rx, "/api/evenements", &[], EVENT.as_bytes());
    assert_eq!(resp.status, 201);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(rx.rows().len(), 1);
}

#[test]
fn fault_reset_closes_after_headers() {
    let (rx, _dir) = start(true);
    rx.push_fault(Fault::Reset);
    let mut conn = Conn::open(&rx);
    // Sending may itself fail once the server has closed.
    let _ = conn.post("/api/evenements", &[], EVENT.as_bytes());
    assert_no_answer(&mut conn);
    assert!(rx.rows().is_empty());
    assert_eq!(rx.stats().stored, 0);
}

#[test]
fn fault_html_ok_stores_and_answers_html() {
    let (rx, _dir) = start(true);
    rx.push_fault(Fault::HtmlOk);
    let resp = post(&rx, "/api/evenements", &[], EVENT.as_bytes());
    assert_eq!(resp.status, 201);
    assert_eq!(resp.header("content-type"), Some("text/html"));
    assert_eq!(resp.body, "<html>ok</html>");
    assert_eq!(rx.rows().len(), 1);
}

#[test]
fn shutdown_is_prompt_with_idle_connections() {
    let (rx, _dir) = start(true);
    let url = rx.url();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut idle = Conn::open(&rx);
    // Make sure the connection is being served before shutting down.
    idle.post("/api/evenements", &[], EVENT.as_bytes())
        .expect("send");
    assert_eq!(idle.expect_response().status, 201);
    let started = Instant::now();
    rx.shutdown();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(idle.closed_by_server());
    assert!(TcpStream::connect(url.trim_start_matches("http://")).is_err());
}

#[test]
fn data_survives_a_restart() {
    let dir = Scratch::uncreated("receiver");
    let rx = Receiver::start(ReceiverOptions::new(&dir.0)).expect("start");
    let key = [("Idempotency-Key", "d:evenements:1")];
    let first = post(&rx, "/api/evenements", &key, EVENT.as_bytes()).id();
    rx.shutdown();
    let rx = Receiver::start(ReceiverOptions::new(&dir.0)).expect("restart");
    assert_eq!(
        post(&rx, "/api/evenements", &key, EVENT.as_bytes()).id(),
        first
    );
    assert_eq!(rx.rows().len(), 1);
}

/// Deterministic content of the big BLOB, generated piecewise so that
/// neither side of the test ever holds the whole body.
fn big_blob_piece(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let n = offset + i as u64;
        *b = (n ^ (n >> 9) ^ (n >> 17)) as u8;
    }
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn a_200_mb_base64_body_is_streamed() {
    const PIECE: usize = 3 * 256 * 1024; // a multiple of 3: pieces encode independently
    const PIECES: u64 = 200; // 150 MiB decoded, 200 MiB of base64
    let (rx, _dir) = start(true);
    let prefix = br#"{"numero_camera": 2, "video_data": ""#;
    let suffix = br#"", "source": "sync_service"}"#;
    let b64_len = PIECES * (PIECE as u64 / 3 * 4);
    let total = prefix.len() as u64 + b64_len + suffix.len() as u64;

    let mut conn = Conn::open(&rx);
    let head = format!(
        "POST /api/media HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\
         Idempotency-Key: d:media:big\r\n\r\n"
    );
    conn.send_raw(head.as_bytes()).expect("head");
    conn.send_raw(prefix).expect("prefix");
    let mut raw = vec![0u8; PIECE];
    for p in 0..PIECES {
        big_blob_piece(p * PIECE as u64, &mut raw);
        conn.send_raw(STANDARD.encode(&raw).as_bytes())
            .expect("piece");
    }
    conn.send_raw(suffix).expect("suffix");
    let resp = conn.expect_response();
    assert_eq!(resp.status, 201, "{}", resp.body);

    let rows = rx.rows();
    let row = &rows[0];
    assert_eq!(
        row.json,
        r#"{"numero_camera": 2, "video_data": "<blob>", "source": "sync_service"}"#
    );
    assert_eq!(row.blob_len, Some(PIECES * PIECE as u64));
    let mut file = std::fs::File::open(row.blob.as_ref().expect("blob")).expect("open");
    let mut got = vec![0u8; PIECE];
    for p in 0..PIECES {
        file.read_exact(&mut got).expect("blob piece");
        big_blob_piece(p * PIECE as u64, &mut raw);
        assert!(got == raw, "blob differs in piece {p}");
    }
    assert_eq!(file.read(&mut got).expect("eof"), 0);
    // The receiver shares this process: had it buffered the body, the peak
    // would exceed 200 MB. (Other tests run concurrently, hence the slack.)
    if let Some(peak) = peak_rss() {
        assert!(peak < 150 * 1024 * 1024, "peak RSS {peak} bytes");
    }
}

#[test]
fn ureq_agent_reuses_its_connection() {
    let (rx, _dir) = start(true);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/api/evenements", rx.url());
    rx.push_fault(Fault::Status(429, Some(3)));
    let mut bodies = Vec::new();
    for i in 0..3 {
        let mut resp = agent
            .post(&url)
            .header("Idempotency-Key", format!("d:evenements:{i}"))
            .header("Authorization", "Bearer tok")
            .content_type("application/json")
            .send(EVENT)
            .expect("request");
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.body_mut().read_to_string().expect("body");
        bodies.push((status, retry_after, body));
    }
    assert_eq!(
        bodies[0],
        (
            429,
            Some("3".to_string()),
            r#"{"detail":"injected 429"}"#.to_string()
        )
    );
    assert_eq!(bodies[1].0, 201);
    assert_eq!(bodies[2].2, r#"{"id":2,"message":"created"}"#);
    // ureq pools the connection after each fully read response, so the
    // second and third requests travel on the first request's socket.
    assert_eq!(rx.stats(), stats(3, 2, 0));
    let rows = rx.rows();
    assert!(
        rows.iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer tok"))
    );
}
