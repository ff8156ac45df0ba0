//! The push API against a real relais-server: each push stored once per (device,
//! Idempotency-Key), replays answered with the original id, bad input refused with a
//! JSON detail and nothing stored. Every case runs on both stores.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};

use common::{Server, StoreKind, client, event, post};

common::on_both_stores!(
    an_event_is_stored_once_and_a_replay_gets_the_original_id,
    thirty_two_racing_threads_store_one_row_per_key_and_all_get_its_id,
    a_replay_with_a_different_body_is_refused,
    pushes_without_a_key_are_new_rows,
    bad_bodies_get_a_detail_and_store_nothing,
    health_and_ready_answer,
);

fn an_event_is_stored_once_and_a_replay_gets_the_original_id(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let agent = client();
    let body = event("pi-1", 1);
    let first = post(
        &agent,
        &server.url,
        "/api/evenements",
        Some("pi-1:evenement:42"),
        body.as_bytes(),
    );
    assert_eq!(first.0, 201, "{}", first.1);
    assert!(first.1.starts_with("{\"id\": "), "{}", first.1);
    let again = post(
        &agent,
        &server.url,
        "/api/evenements",
        Some("pi-1:evenement:42"),
        body.as_bytes(),
    );
    assert_eq!(again, first);
    let other_device = post(
        &agent,
        &server.url,
        "/api/evenements",
        Some("pi-1:evenement:42"),
        event("pi-2", 1).as_bytes(),
    );
    assert_eq!(other_device.0, 201);
    assert_ne!(other_device.1, first.1, "another device's key space");
    assert_eq!(
        server.row(
            "SELECT device_id, local_id, date, capteur_id, capteur_nom, capteur_etat
             FROM evenements WHERE device_id = 'pi-1'"
        ),
        [
            "pi-1",
            "42",
            "2025-12-18T17:30:01.123456",
            "1",
            "PIR Entrée",
            "1"
        ]
    );
    assert_eq!(server.count("SELECT count(*) FROM received"), 2);
}

/// Each thread posts the same keys, starting at a different one, all released at once:
/// the unique constraint, not the order, decides which insert wins.
fn thirty_two_racing_threads_store_one_row_per_key_and_all_get_its_id(store: StoreKind) {
    const KEYS: usize = 4;
    let server = Server::start_on(store, &[]);
    let barrier = Arc::new(Barrier::new(32));
    let url = server.url.clone();
    let answers: Vec<Vec<(u16, String)>> = (0..32)
        .map(|t| {
            let (barrier, url) = (Arc::clone(&barrier), url.clone());
            std::thread::spawn(move || {
                let agent = client();
                barrier.wait();
                let mut answers = vec![(0, String::new()); KEYS];
                for i in 0..KEYS {
                    let k = (t + i) % KEYS;
                    answers[k] = post(
                        &agent,
                        &url,
                        "/api/evenements",
                        Some(&format!("pi:evenement:{k}")),
                        event("pi", k as u32).as_bytes(),
                    );
                }
                answers
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    for k in 0..KEYS {
        let first = &answers[0][k];
        assert_eq!(first.0, 201, "key {k}: {}", first.1);
        assert!(
            answers.iter().all(|a| &a[k] == first),
            "key {k}: {:?}",
            answers.iter().map(|a| &a[k]).collect::<Vec<_>>()
        );
    }
    assert_eq!(server.count("SELECT count(*) FROM received"), KEYS as i64);
    assert_eq!(
        server.count("SELECT count(DISTINCT idempotency_key) FROM received"),
        KEYS as i64
    );
}

fn a_replay_with_a_different_body_is_refused(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let agent = client();
    let key = Some("pi:evenement:1");
    assert_eq!(
        post(
            &agent,
            &server.url,
            "/api/evenements",
            key,
            event("pi", 1).as_bytes()
        )
        .0,
        201
    );
    let (status, detail) = post(
        &agent,
        &server.url,
        "/api/evenements",
        key,
        event("pi", 2).as_bytes(),
    );
    assert_eq!(status, 422);
    assert!(
        detail.contains("\"detail\"") && detail.contains("different body"),
        "{detail}"
    );
    assert_eq!(
        server.row("SELECT date FROM evenements"),
        ["2025-12-18T17:30:01.123456"],
        "the first body stays"
    );
}

fn pushes_without_a_key_are_new_rows(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let agent = client();
    let a = post(
        &agent,
        &server.url,
        "/api/evenements",
        None,
        event("pi", 1).as_bytes(),
    );
    let b = post(
        &agent,
        &server.url,
        "/api/evenements",
        None,
        event("pi", 1).as_bytes(),
    );
    assert_eq!((a.0, b.0), (201, 201));
    assert_ne!(a.1, b.1);
    assert_eq!(server.count("SELECT count(*) FROM received"), 2);
}

fn bad_bodies_get_a_detail_and_store_nothing(store: StoreKind) {
    let server = Server::start_on(store, &["--max-body-bytes", "200000"]);
    let agent = client();
    let not_base64 = format!(
        r#"{{"date": "x", "device_id": "pi", "video_data": "{}!"}}"#,
        "A".repeat(100_000)
    );
    let cases: [(&str, &str, &[u16]); 6] = [
        ("not JSON", "{\"date\": ", &[400]),
        ("an array", "[1, 2]", &[422]),
        (
            "device_id a number",
            r#"{"date": "x", "device_id": 5}"#,
            &[422],
        ),
        ("no device_id", r#"{"date": "x"}"#, &[422]),
        ("date a number", r#"{"date": 1, "device_id": "pi"}"#, &[422]),
        ("media not base64", &not_base64, &[422]),
    ];
    for (i, (what, body, statuses)) in cases.iter().enumerate() {
        let key = format!("pi:media:{i}");
        let (status, answer) = post(
            &agent,
            &server.url,
            "/api/media",
            Some(&key),
            body.as_bytes(),
        );
        assert!(statuses.contains(&status), "{what}: {status} {answer}");
        assert!(answer.starts_with("{\"detail\": \""), "{what}: {answer}");
    }
    // Refused from its head, before the body is sent (a client still writing would get a
    // broken pipe, so this one goes over a raw socket).
    let mut conn = std::net::TcpStream::connect(&server.addr).expect("connect");
    let head = "POST /api/media HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
                Content-Length: 300000\r\n\r\n";
    conn.write_all(head.as_bytes()).expect("head");
    let mut answer = [0u8; 512];
    let n = conn.read(&mut answer).expect("answer");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("{\"detail\": \"body: larger"), "{answer}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
    assert!(
        common::wait_for(std::time::Duration::from_secs(5), || server
            .media_files()
            .is_empty()),
        "{:?}",
        server.media_files()
    );
}

#[test]
fn an_unknown_route_reads_the_body_and_keeps_the_connection() {
    let server = Server::start();
    let mut conn = std::net::TcpStream::connect(&server.addr).expect("connect");
    let body = r#"{"date": "x", "device_id": "pi"}"#;
    let head = format!(
        "POST /wrong/api/evenements HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).expect("head");
    // The body comes later, as from a client streaming it: no answer before it.
    conn.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("timeout");
    let mut answer = [0u8; 1024];
    assert!(
        conn.read(&mut answer).is_err(),
        "answered before the body was read"
    );
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    for i in 0..2 {
        if i > 0 {
            conn.write_all(head.as_bytes()).expect("second head");
        }
        conn.write_all(body.as_bytes()).expect("body");
        let n = conn.read(&mut answer).expect("answer");
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 404"), "request {i}: {text}");
        assert!(
            text.contains("{\"detail\": \"not found"),
            "request {i}: {text}"
        );
        assert!(!text.contains("close"), "request {i}: {text}");
    }
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
}

fn health_and_ready_answer(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let agent = client();
    for path in ["/health", "/ready"] {
        let mut resp = agent
            .get(format!("{}{path}", server.url))
            .call()
            .expect("get");
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        assert!(
            resp.body_mut()
                .read_to_string()
                .expect("body")
                .contains("status")
        );
    }
}
