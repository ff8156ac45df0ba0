//! `POST /api/batch` and `GET /api/capabilities` against a real relais-server, on both
//! stores: rows stored once each with their ids and replayed with the same ids, each
//! row's own result in a batch partly accepted, the per-row push and a batch row
//! agreeing on a key, gzip bodies, a gzip bomb refused in bounded memory, the limits.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::{Server, StoreKind, client, event, get_as, media, post_as};
use miniserde::json::Value;

common::on_both_stores!(
    new_rows_are_stored_once_and_replayed_with_their_ids,
    a_batch_partly_accepted_answers_each_rows_own_result,
    a_row_pushed_alone_and_in_a_batch_is_one_row,
    a_gzip_body_is_decompressed_and_a_gzip_bomb_refused_in_bounded_memory,
    too_many_rows_are_refused_whole,
    capabilities_are_answered_to_a_device_token,
);

const DEVICE: &str = "pi-1";

/// A server with authentication and a token for [`DEVICE`].
fn server(store: StoreKind, extra: &[&str]) -> (Server, String) {
    let server = Server::start_authenticated(store, extra, "info");
    let token = server.token(&["--device", DEVICE]);
    (server, token)
}

fn key(n: u32) -> String {
    format!("{DEVICE}:evenement:{n}")
}

/// `{"rows": [...]}` of (endpoint, key, body) rows, each body embedded verbatim.
fn batch(rows: &[(&str, &str, &str)]) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|(endpoint, key, body)| {
            format!(r#"{{"endpoint": "{endpoint}", "idempotency_key": "{key}", "body": {body}}}"#)
        })
        .collect();
    format!(r#"{{"rows": [{}]}}"#, rows.join(", "))
}

fn events(keys: std::ops::Range<u32>) -> String {
    let bodies: Vec<(String, String)> = keys.map(|n| (key(n), event(DEVICE, n))).collect();
    let rows: Vec<(&str, &str, &str)> = bodies
        .iter()
        .map(|(k, b)| ("/api/evenements", k.as_str(), b.as_str()))
        .collect();
    batch(&rows)
}

/// POSTs a batch, gzip-compressed when `gzip`; the status and the answer's body.
fn send(server: &Server, token: &str, body: &[u8], gzip: bool) -> (u16, String) {
    let mut req = client()
        .post(format!("{}/api/batch", server.url))
        .header("Content-Type", "application/json")
        .header("Authorization", format!("Bearer {token}"));
    if gzip {
        req = req.header("Content-Encoding", "gzip");
    }
    let (status, _, text) = common::answer(req.send(body).expect("request"));
    (status, text)
}

/// Each result as `stored:ID`, `replayed:ID` or `rejected:CODE`, and the rejections'
/// details.
fn results(text: &str) -> (Vec<String>, Vec<String>) {
    let value: Value = miniserde::json::from_str(text).expect(text);
    let Value::Object(answer) = value else {
        panic!("{text}")
    };
    let Some(Value::Array(results)) = answer.get("results") else {
        panic!("{text}")
    };
    let (mut outcomes, mut details) = (Vec::new(), Vec::new());
    for result in results {
        let Value::Object(r) = result else {
            panic!("{text}")
        };
        let member = |name: &str| match r.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            other => panic!("{name}: {other:?} in {text}"),
        };
        let status = member("status");
        if status == "rejected" {
            outcomes.push(format!("rejected:{}", member("code")));
            details.push(member("detail"));
        } else {
            outcomes.push(format!("{status}:{}", member("id")));
        }
    }
    (outcomes, details)
}

/// The stored rows' ids in `keys`' order.
fn ids(server: &Server, keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| {
            server.row(&format!(
                "SELECT id FROM received WHERE idempotency_key = '{k}'"
            ))[0]
                .clone()
        })
        .collect()
}

fn metric(server: &Server, admin: &str, name: &str) -> String {
    let (status, _, text) = get_as(&client(), &server.url, "/metrics", Some(admin));
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .to_string()
}

fn new_rows_are_stored_once_and_replayed_with_their_ids(store: StoreKind) {
    let (server, token) = server(store, &[]);
    let body = events(1..6);
    let (status, first) = send(&server, &token, body.as_bytes(), false);
    assert_eq!(status, 200, "{first}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 5);
    let keys: Vec<String> = (1..6).map(key).collect();
    let ids = ids(&server, &keys);
    let stored: Vec<String> = ids.iter().map(|id| format!("stored:{id}")).collect();
    assert_eq!(results(&first).0, stored, "{first}");
    assert_eq!(
        server
            .row("SELECT body, local_id FROM received WHERE idempotency_key = 'pi-1:evenement:3'"),
        [event(DEVICE, 3), "3".into()],
        "the body stored exactly as embedded"
    );

    let (status, again) = send(&server, &token, body.as_bytes(), false);
    assert_eq!(status, 200, "{again}");
    let replayed: Vec<String> = ids.iter().map(|id| format!("replayed:{id}")).collect();
    assert_eq!(results(&again).0, replayed, "{again}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 5);

    let admin = server.token(&["--admin", "ops"]);
    assert_eq!(metric(&server, &admin, "relais_server_batches_total"), "2");
    assert_eq!(
        metric(&server, &admin, "relais_server_rows_stored_total"),
        "5"
    );
    assert_eq!(metric(&server, &admin, "relais_server_replays_total"), "5");
    assert_eq!(
        metric(&server, &admin, "relais_server_batch_rows_rejected_total"),
        "0"
    );

    // A full batch shares the group commit's transactions (256 rows at most each).
    let commits = |s: &Server| -> u64 {
        metric(s, &admin, "relais_server_store_commits_total")
            .parse()
            .expect("a count")
    };
    let before = commits(&server);
    let (status, text) = send(&server, &token, events(100..600).as_bytes(), false);
    assert_eq!(status, 200, "{text}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 505);
    let full = commits(&server) - before;
    assert!(full <= 10, "500 rows in {full} transactions");
}

fn a_batch_partly_accepted_answers_each_rows_own_result(store: StoreKind) {
    let (server, token) = server(store, &[]);
    // Key 9 is stored first by a per-row push; the batch then sends another body with it.
    let (status, text) = post_as(
        &client(),
        &server.url,
        "/api/evenements",
        Some(&token),
        Some(&key(9)),
        event(DEVICE, 9).as_bytes(),
    );
    assert_eq!(status, 201, "{text}");
    let [k1, k2, k3, k4, k5, k6, k8, k9] = [1, 2, 3, 4, 5, 6, 8, 9].map(key);
    let foreign_key = "pi-2:evenement:1";
    let big = media(DEVICE, &"A".repeat(70_000));
    let body = batch(&[
        ("/api/evenements", &k1, &event(DEVICE, 1)),
        ("/api/evenements", &k2, r#"{"device_id": "pi-1"}"#),
        ("/api/evenements", foreign_key, &event("pi-2", 1)),
        ("/api/evenements", &k3, &event("pi-2", 3)),
        ("/api/evenements", &k9, &event(DEVICE, 10)),
        ("/elsewhere", &k4, &event(DEVICE, 4)),
        ("/api/media", &k5, &big),
        ("/api/evenements", &k6, "[1, 2]"),
        ("/api/evenements", "", &event(DEVICE, 7)),
        ("/api/evenements", &k8, &event(DEVICE, 8)),
    ]);
    let (status, text) = send(&server, &token, body.as_bytes(), false);
    assert_eq!(status, 200, "{text}");
    let ids = ids(&server, &[k1.clone(), k8.clone()]);
    let (outcomes, details) = results(&text);
    assert_eq!(
        outcomes,
        [
            format!("stored:{}", ids[0]),
            "rejected:422".into(),
            "rejected:403".into(),
            "rejected:403".into(),
            "rejected:422".into(),
            "rejected:404".into(),
            "rejected:413".into(),
            "rejected:422".into(),
            "rejected:400".into(),
            format!("stored:{}", ids[1]),
        ],
        "{text}"
    );
    assert!(
        details[0].contains("date: expected a string"),
        "{details:?}"
    );
    assert!(
        details[1].contains("must start with this token's device"),
        "{details:?}"
    );
    assert!(details[2].contains("not of \"pi-2\""), "{details:?}");
    assert!(details[3].contains("already used for row"), "{details:?}");
    assert!(details[4].contains("not a push endpoint"), "{details:?}");
    assert!(
        details[5].contains("send it alone to /api/media"),
        "{details:?}"
    );
    assert!(details[6].contains("expected a JSON object"), "{details:?}");
    assert!(details[7].contains("visible ASCII"), "{details:?}");
    assert_eq!(
        server.rows("SELECT idempotency_key FROM received ORDER BY idempotency_key"),
        [[Some(k1)], [Some(k8)], [Some(k9.clone())]],
        "the good rows stored, the rejected ones not"
    );
    assert_eq!(
        server.row(&format!(
            "SELECT body FROM received WHERE idempotency_key = '{k9}'"
        )),
        [event(DEVICE, 9)],
        "the original body kept"
    );

    let admin = server.token(&["--admin", "ops"]);
    assert_eq!(
        metric(&server, &admin, "relais_server_batch_rows_rejected_total"),
        "8"
    );

    // Whole-request problems: not JSON, not a batch.
    for bad in [
        "{\"rows\": [",
        "[]",
        r#"{"rows": [], "more": 1}"#,
        r#"{"rows": {}}"#,
    ] {
        let (status, text) = send(&server, &token, bad.as_bytes(), false);
        assert_eq!(status, 400, "{bad}: {text}");
        assert!(text.starts_with("{\"detail\": \"batch: "), "{bad}: {text}");
    }
}

fn a_row_pushed_alone_and_in_a_batch_is_one_row(store: StoreKind) {
    let (server, token) = server(store, &[]);
    let push_alone = |n: u32| {
        post_as(
            &client(),
            &server.url,
            "/api/evenements",
            Some(&token),
            Some(&key(n)),
            event(DEVICE, n).as_bytes(),
        )
    };
    let (status, alone) = push_alone(1);
    assert_eq!(status, 201, "{alone}");
    let (status, text) = send(&server, &token, events(1..3).as_bytes(), false);
    assert_eq!(status, 200, "{text}");
    let ids = ids(&server, &[key(1), key(2)]);
    assert_eq!(alone, format!("{{\"id\": {}}}", ids[0]));
    assert_eq!(
        results(&text).0,
        [format!("replayed:{}", ids[0]), format!("stored:{}", ids[1])],
        "{text}"
    );
    // And the other way round: the batch's row pushed alone is a replay.
    let (status, again) = push_alone(2);
    assert_eq!(status, 201, "{again}");
    assert_eq!(again, format!("{{\"id\": {}}}", ids[1]));
    assert_eq!(server.count("SELECT count(*) FROM received"), 2);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("compress");
    gz.finish().expect("compress")
}

fn a_gzip_body_is_decompressed_and_a_gzip_bomb_refused_in_bounded_memory(store: StoreKind) {
    let (server, token) = server(store, &[]);
    let (status, text) = send(&server, &token, &gzip(events(1..101).as_bytes()), true);
    assert_eq!(status, 200, "{text}");
    assert_eq!(results(&text).0.len(), 100);
    assert_eq!(server.count("SELECT count(*) FROM received"), 100);

    let (status, text) = send(&server, &token, b"not gzip", true);
    assert_eq!(status, 400, "{text}");

    // 100 MB of zeros is 100 KB compressed: refused once 4 MiB are decompressed.
    let bomb = gzip(&vec![0u8; 100 << 20]);
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let before = server.peak_rss_kib();
    let (status, text) = send(&server, &token, &bomb, true);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("--batch-max-bytes"), "{text}");
    let after = server.peak_rss_kib();
    assert!(
        after < before + 32 * 1024,
        "peak RSS went from {before} KiB to {after} KiB"
    );
    assert_eq!(server.count("SELECT count(*) FROM received"), 100);
}

/// The results gzipped for a client that accepts it (the agent does), plain otherwise.
#[test]
fn the_answer_is_gzipped_for_a_client_that_accepts_it() {
    use std::io::Read as _;
    let (server, token) = server(StoreKind::Sqlite, &[]);
    let plain = events(1..201);
    let mut resp = client()
        .post(format!("{}/api/batch", server.url))
        .header("Content-Type", "application/json")
        .header("Accept-Encoding", "br;q=1, gzip;q=0.8")
        .header("Authorization", format!("Bearer {token}"))
        .send(plain.as_bytes())
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let encoding = resp.headers().get("content-encoding").cloned();
    assert_eq!(
        encoding.as_ref().and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let mut sent = Vec::new();
    resp.body_mut()
        .as_reader()
        .read_to_end(&mut sent)
        .expect("body");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&sent[..])
        .read_to_string(&mut text)
        .expect("gunzip");
    assert!(
        sent.len() * 3 < text.len(),
        "{} of {}",
        sent.len(),
        text.len()
    );
    let (stored, _) = results(&text);
    assert_eq!(stored.len(), 200);
    assert!(
        stored.iter().all(|r| r.starts_with("stored:")),
        "{stored:?}"
    );

    // Without Accept-Encoding, or with gzip refused, the same results come plain.
    for accept in [None, Some("gzip;q=0")] {
        let mut req = client()
            .post(format!("{}/api/batch", server.url))
            .header("Content-Type", "application/json")
            .header("Authorization", format!("Bearer {token}"));
        if let Some(a) = accept {
            req = req.header("Accept-Encoding", a);
        }
        let resp = req.send(plain.as_bytes()).expect("request");
        assert!(resp.headers().get("content-encoding").is_none());
        let (status, _, text) = common::answer(resp);
        assert_eq!(status, 200);
        let (replayed, _) = results(&text);
        assert!(
            replayed.iter().all(|r| r.starts_with("replayed:")),
            "{replayed:?}"
        );
    }
}

fn too_many_rows_are_refused_whole(store: StoreKind) {
    let (server, token) = server(
        store,
        &["--batch-max-rows", "3", "--batch-max-bytes", "70000"],
    );
    let (status, text) = send(&server, &token, events(1..5).as_bytes(), false);
    assert_eq!(status, 413, "{text}");
    assert!(
        text.contains("4 rows, more than 3 (--batch-max-rows)"),
        "{text}"
    );
    let (status, text) = send(&server, &token, events(1..4).as_bytes(), false);
    assert_eq!(status, 200, "{text}");
    let padded = format!("{}{}", events(4..5), " ".repeat(70_000));
    let (status, text) = send(&server, &token, padded.as_bytes(), false);
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("larger than 70000 bytes"), "{text}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 3);
}

fn capabilities_are_answered_to_a_device_token(store: StoreKind) {
    let (server, token) = server(store, &["--batch-max-rows", "7"]);
    let (status, _, text) = get_as(&client(), &server.url, "/api/capabilities", Some(&token));
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        text,
        r#"{"version": 1, "batch": {"path": "/api/batch", "max_rows": 7, "max_bytes": 4194304, "max_row_bytes": 65536, "encodings": ["gzip", "identity"]}, "uploads": {"path": "/api/uploads", "protocol": "tus/1.0.0", "checksum": "sha256", "max_bytes": 1073741824, "expiry_s": 86400}, "heartbeat": {"path": "/api/agent/heartbeat", "max_bytes": 16384}}"#
    );
    let (status, challenge, text) = get_as(&client(), &server.url, "/api/capabilities", None);
    assert_eq!(
        (status, challenge.as_deref()),
        (401, Some("Bearer")),
        "{text}"
    );
    let (status, text) = send(&server, "not-a-token", events(1..2).as_bytes(), false);
    assert_eq!(status, 401, "{text}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
}

/// PostgreSQL down: the whole batch answers 503 with `Retry-After`, as a push does, and
/// the same batch sent again once it is back is stored.
#[test]
fn a_store_outage_answers_the_whole_batch_503_and_the_retry_is_stored() {
    let Some((cluster, server)) = common::on_own_cluster() else {
        return;
    };
    let body = events(1..4);
    cluster.stop();
    let resp = client()
        .post(format!("{}/api/batch", server.url))
        .send(body.as_bytes())
        .expect("request");
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (status, _, text) = common::answer(resp);
    assert_eq!((status, retry_after.as_deref()), (503, Some("3")), "{text}");
    assert!(text.contains("store: unreachable"), "{text}");
    assert!(
        common::wait_for(Duration::from_secs(5), || server
            .logged(common::STORE_DOWN_LINE)),
        "no warning from the store check"
    );
    common::resume_until_ready(&cluster, &server);
    // --no-auth: any token (or none) will do.
    let (status, text) = send(&server, "-", body.as_bytes(), false);
    assert_eq!(status, 200, "{text}");
    assert!(
        results(&text).0.iter().all(|r| r.starts_with("stored:")),
        "{text}"
    );
    assert_eq!(server.count("SELECT count(*) FROM received"), 3);
}
