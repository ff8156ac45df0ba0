//! Two-way sync against a real relais-server (README, "Two-way sync: the server"): up
//! applies and answers, a replay applies nothing twice, tenants are isolated, each
//! conflict strategy's outcome, delete vs update, create on both sides, down's pages
//! and cursor, the long poll; on both stores. On PostgreSQL only: two transactions
//! committing out of order never make a reader skip a change.

mod common;

use std::time::{Duration, Instant};

use common::{Server, StoreAt, StoreKind, client, post, post_as, wait_for};
use serde_json::{Value, json};

common::on_both_stores!(
    up_applies_and_answers_and_a_replay_applies_nothing_twice,
    a_tenant_reads_and_writes_its_own_rows_only,
    each_strategy_resolves_two_devices_editing_from_one_base,
    delete_vs_update_and_create_on_both_sides,
    down_pages_with_has_more_and_the_cursor,
    the_long_poll_returns_within_2_s_of_a_change,
    without_auth_the_body_names_the_tenant,
);

fn uuid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

#[allow(clippy::too_many_arguments)]
fn ev(n: u32, ty: &str, id: &str, op: &str, payload: Value, base: i64, at: &str) -> Value {
    json!({"id": uuid(n), "entity_type": ty, "entity_id": id, "operation": op,
           "payload": payload, "base_version": base, "local_version": 1, "created_at": at})
}

fn call(server: &Server, token: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_as(
        &client(),
        &server.url,
        path,
        Some(token),
        None,
        body.to_string().as_bytes(),
    );
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

fn up(server: &Server, token: &str, events: Vec<Value>) -> Value {
    let (status, answer) = call(server, token, "/api/sync/up", &json!({ "events": events }));
    assert_eq!(status, 200, "{answer}");
    answer
}

fn down(server: &Server, token: &str, cursor: i64, limit: i64) -> Value {
    let body = json!({"cursor": cursor, "limit": limit});
    let (status, answer) = call(server, token, "/api/sync/down", &body);
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The entity's latest change: (version, operation, payload).
fn latest(server: &Server, token: &str, ty: &str, id: &str) -> (i64, String, Value) {
    let all = down(server, token, 0, 1000);
    let c = all["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .rfind(|c| c["entity_type"] == ty && c["entity_id"] == id)
        .expect("a change of the entity")
        .clone();
    (
        c["version"].as_i64().expect("version"),
        c["operation"].as_str().expect("operation").into(),
        c["payload"].clone(),
    )
}

fn start(store: StoreKind) -> (Server, String, String) {
    let server = Server::start_authenticated(store, &[], "info");
    let d1 = server.token(&["--device", "pi-1", "--tenant", "A"]);
    let d2 = server.token(&["--device", "pi-2", "--tenant", "A"]);
    (server, d1, d2)
}

fn up_applies_and_answers_and_a_replay_applies_nothing_twice(store: StoreKind) {
    let (server, d1, _) = start(store);
    let events = vec![
        ev(
            1,
            "GRADE",
            "1",
            "CREATE",
            json!({"v": 1}),
            0,
            "2026-01-01T00:00:01Z",
        ),
        ev(
            2,
            "GRADE",
            "2",
            "CREATE",
            json!({"v": 2}),
            0,
            "2026-01-01 00:00:02",
        ),
        ev(
            3,
            "GRADE",
            "3",
            "RENAME",
            json!({}),
            0,
            "2026-01-01T00:00:03Z",
        ),
        json!({"entity_type": "GRADE", "entity_id": "4", "operation": "CREATE"}),
    ];
    let first = up(&server, &d1, events.clone());
    assert_eq!(
        first["acknowledged"],
        json!([{"id": uuid(1), "server_version": 1, "seq": 1},
               {"id": uuid(2), "server_version": 1, "seq": 2}]),
        "{first}"
    );
    assert_eq!(first["conflicts"], json!([]));
    let rejected = first["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 2, "{first}");
    assert_eq!(rejected[0]["id"], json!(uuid(3)));
    assert!(
        rejected[0]["error"]
            .as_str()
            .expect("error")
            .contains("operation")
    );
    assert_eq!(rejected[1]["id"], Value::Null);
    let again = up(&server, &d1, events);
    assert_eq!(again, first, "a replay answers the first outcome");
    assert_eq!(server.count("SELECT count(*) FROM sync_changes"), 2);
    assert_eq!(server.count("SELECT count(*) FROM sync_entities"), 2);
    assert_eq!(server.count("SELECT count(*) FROM sync_events_applied"), 2);
    // The audit trail: one row per request.
    assert_eq!(
        server.rows(
            "SELECT direction, events, acknowledged, conflicts, rejected, status, device \
             FROM sync_log ORDER BY id"
        ),
        vec![
            ["up", "4", "2", "0", "2", "PARTIAL", "pi-1"].map(|s| Some(s.to_string())),
            ["up", "4", "2", "0", "2", "PARTIAL", "pi-1"].map(|s| Some(s.to_string())),
        ]
    );
    let changes = down(&server, &d1, 0, 10);
    assert_eq!(
        changes["changes"][0],
        json!({"seq": 1, "entity_type": "GRADE", "entity_id": "1", "version": 1,
               "operation": "CREATE", "payload": {"v": 1}, "origin_device": "pi-1"})
    );
}

fn a_tenant_reads_and_writes_its_own_rows_only(store: StoreKind) {
    let (server, a, _) = start(store);
    let b = server.token(&["--device", "pi-9", "--tenant", "B"]);
    let none = server.token(&["--device", "pi-0"]);
    up(
        &server,
        &a,
        vec![ev(
            1,
            "T",
            "1",
            "CREATE",
            json!({"x": 1}),
            0,
            "2026-01-01T00:00:00Z",
        )],
    );
    let seen_by_b = down(&server, &b, 0, 100);
    assert_eq!(seen_by_b["changes"], json!([]), "{seen_by_b}");
    assert_eq!(seen_by_b["cursor"], json!(0));
    // B's device naming tenant A in the body is refused, and writes nothing.
    let body = json!({"tenant": "A", "events": [ev(2, "T", "1", "UPDATE", json!({"x": 2}), 1, "2026-01-01T00:00:01Z")]});
    let (status, answer) = call(&server, &b, "/api/sync/up", &body);
    assert_eq!(status, 403, "{answer}");
    let (status, _) = call(
        &server,
        &b,
        "/api/sync/down",
        &json!({"tenant": "A", "cursor": 0}),
    );
    assert_eq!(status, 403);
    // The same entity key in tenant B is B's own entity.
    let own = up(
        &server,
        &b,
        vec![ev(
            1,
            "T",
            "1",
            "CREATE",
            json!({"x": 9}),
            0,
            "2026-01-01T00:00:00Z",
        )],
    );
    assert_eq!(
        own["acknowledged"][0]["seq"],
        json!(1),
        "B's own counter: {own}"
    );
    assert_eq!(latest(&server, &a, "T", "1").2, json!({"x": 1}));
    // A device token without a tenant cannot sync.
    let (status, answer) = call(&server, &none, "/api/sync/down", &json!({"cursor": 0}));
    assert_eq!(status, 403);
    assert!(
        answer["detail"]
            .as_str()
            .expect("detail")
            .contains("this token has no tenant")
    );
}

fn each_strategy_resolves_two_devices_editing_from_one_base(store: StoreKind) {
    let (server, d1, d2) = start(store);
    // One by the admin API, the others by the command.
    let admin = server.token(&["--admin", "ops"]);
    let put = |ty: &str, body: &str| {
        let mut resp = client()
            .put(format!("{}/admin/sync/entity-types/{ty}", server.url))
            .header("Authorization", format!("Bearer {admin}"))
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .expect("request");
        let text = resp.body_mut().read_to_string().expect("body");
        (resp.status().as_u16(), text)
    };
    let (status, text) = put("manual", r#"{"tenant": "A", "strategy": "manual"}"#);
    assert_eq!(status, 200, "{text}");
    let (status, text) = put("manual", r#"{"tenant": "A", "strategy": "coin_toss"}"#);
    assert_eq!(status, 422, "{text}");
    for strategy in ["client_wins", "last_writer_wins", "field_merge"] {
        let out = server.cli(&[
            "sync",
            "strategy",
            "--tenant",
            "A",
            "--type",
            strategy,
            "--strategy",
            strategy,
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    // Per type: device 1 creates {a:1, b:1} (v1) and changes a (v2); device 2, still at
    // v1, changes b, at `at2`.
    let mut n = 0;
    let mut race = |ty: &str, id: &str, at2: &str| -> Value {
        n += 10;
        up(
            &server,
            &d1,
            vec![
                ev(
                    n,
                    ty,
                    id,
                    "CREATE",
                    json!({"a": 1, "b": 1}),
                    0,
                    "2026-01-01T00:00:01Z",
                ),
                ev(
                    n + 1,
                    ty,
                    id,
                    "UPDATE",
                    json!({"a": 2, "b": 1}),
                    1,
                    "2026-01-01T00:00:05Z",
                ),
            ],
        );
        up(
            &server,
            &d2,
            vec![ev(n + 2, ty, id, "UPDATE", json!({"a": 1, "b": 3}), 1, at2)],
        )
    };
    let later = "2026-01-01T00:00:09Z";
    let earlier = "2026-01-01T00:00:03Z";

    let a = race("GRADE", "1", later);
    assert_eq!(a["acknowledged"], json!([]));
    assert_eq!(
        a["conflicts"],
        json!([{"id": uuid(12), "server_version": 2, "server_payload": {"a": 2, "b": 1},
                "deleted": false, "manual": false}]),
        "server_wins (no row: the default)"
    );
    assert_eq!(
        latest(&server, &d1, "GRADE", "1"),
        (2, "UPDATE".into(), json!({"a": 2, "b": 1}))
    );

    let a = race("client_wins", "1", earlier);
    assert_eq!(a["acknowledged"][0]["server_version"], json!(3), "{a}");
    assert_eq!(
        latest(&server, &d1, "client_wins", "1").2,
        json!({"a": 1, "b": 3})
    );

    let a = race("last_writer_wins", "1", later);
    assert_eq!(
        a["acknowledged"][0]["server_version"],
        json!(3),
        "later wins: {a}"
    );
    assert_eq!(
        latest(&server, &d1, "last_writer_wins", "1").2,
        json!({"a": 1, "b": 3})
    );
    let a = race("last_writer_wins", "2", earlier);
    assert_eq!(
        a["conflicts"][0]["server_payload"],
        json!({"a": 2, "b": 1}),
        "earlier loses: {a}"
    );
    assert_eq!(latest(&server, &d1, "last_writer_wins", "2").0, 2);

    let a = race("field_merge", "1", earlier);
    assert_eq!(
        a["acknowledged"][0]["server_payload"],
        json!({"a": 2, "b": 3}),
        "a from device 1, b from device 2: {a}"
    );
    assert_eq!(
        latest(&server, &d1, "field_merge", "1"),
        (3, "UPDATE".into(), json!({"a": 2, "b": 3}))
    );

    let a = race("manual", "1", later);
    assert_eq!(a["conflicts"][0]["manual"], json!(true), "{a}");
    assert_eq!(latest(&server, &d1, "manual", "1").0, 2, "left as it was");
    assert_eq!(
        server.row(
            "SELECT entity_type, device, base_version, server_version, server_payload, \
             client_payload FROM sync_conflicts"
        ),
        [
            "manual",
            "pi-2",
            "1",
            "2",
            r#"{"a":2,"b":1}"#,
            r#"{"a":1,"b":3}"#
        ]
    );
}

fn delete_vs_update_and_create_on_both_sides(store: StoreKind) {
    let (server, d1, d2) = start(store);
    let at = "2026-01-01T00:00:01Z";
    up(
        &server,
        &d1,
        vec![
            ev(1, "T", "1", "CREATE", json!({"a": 1}), 0, at),
            ev(2, "T", "1", "UPDATE", json!({"a": 2}), 1, at),
        ],
    );
    // A DELETE of an entity changed since its base: a conflict (server_wins).
    let a = up(
        &server,
        &d2,
        vec![ev(3, "T", "1", "DELETE", Value::Null, 1, at)],
    );
    assert_eq!(a["conflicts"][0]["deleted"], json!(false), "{a}");
    assert_eq!(a["conflicts"][0]["server_version"], json!(2));
    // Deleted at its current version: applied.
    let a = up(
        &server,
        &d1,
        vec![ev(4, "T", "1", "DELETE", Value::Null, 2, at)],
    );
    assert_eq!(a["acknowledged"][0]["server_version"], json!(3), "{a}");
    // An UPDATE of the deleted entity from an older base: a conflict answering deleted.
    let a = up(
        &server,
        &d2,
        vec![ev(5, "T", "1", "UPDATE", json!({"a": 5}), 2, at)],
    );
    assert_eq!(a["conflicts"][0]["deleted"], json!(true), "{a}");
    assert_eq!(a["conflicts"][0]["server_version"], json!(3));
    // Created on both sides with one key: the second CREATE is a conflict.
    let a = up(
        &server,
        &d1,
        vec![ev(6, "T", "9", "CREATE", json!({"by": 1}), 0, at)],
    );
    assert_eq!(a["acknowledged"][0]["server_version"], json!(1));
    let a = up(
        &server,
        &d2,
        vec![ev(7, "T", "9", "CREATE", json!({"by": 2}), 0, at)],
    );
    assert_eq!(
        a["conflicts"],
        json!([{"id": uuid(7), "server_version": 1, "server_payload": {"by": 1},
                "deleted": false, "manual": false}])
    );
}

fn down_pages_with_has_more_and_the_cursor(store: StoreKind) {
    let (server, d1, d2) = start(store);
    let events = (1..=5)
        .map(|n| {
            ev(
                n,
                "T",
                &n.to_string(),
                "CREATE",
                json!({"n": n}),
                0,
                "2026-01-01T00:00:00Z",
            )
        })
        .collect();
    up(&server, &d1, events);
    let seqs = |page: &Value| -> Vec<i64> {
        page["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|c| c["seq"].as_i64().expect("seq"))
            .collect()
    };
    let p1 = down(&server, &d2, 0, 2);
    assert_eq!(
        (seqs(&p1), &p1["cursor"], &p1["hasMore"]),
        (vec![1, 2], &json!(2), &json!(true))
    );
    let p2 = down(&server, &d2, 2, 2);
    assert_eq!(
        (seqs(&p2), &p2["cursor"], &p2["hasMore"]),
        (vec![3, 4], &json!(4), &json!(true))
    );
    let p3 = down(&server, &d2, 4, 2);
    assert_eq!(
        (seqs(&p3), &p3["cursor"], &p3["hasMore"]),
        (vec![5], &json!(5), &json!(false))
    );
    let p4 = down(&server, &d2, 5, 2);
    assert_eq!(
        (seqs(&p4), &p4["cursor"], &p4["hasMore"]),
        (vec![], &json!(5), &json!(false))
    );
    let (status, _) = call(
        &server,
        &d2,
        "/api/sync/down",
        &json!({"cursor": 0, "limit": 1001}),
    );
    assert_eq!(status, 400);
}

fn the_long_poll_returns_within_2_s_of_a_change(store: StoreKind) {
    let (server, d1, d2) = start(store);
    // Nothing newer: the poll waits its `wait` and answers empty.
    let t = Instant::now();
    let (status, empty) = call(
        &server,
        &d2,
        "/api/sync/down",
        &json!({"cursor": 0, "wait": 1}),
    );
    assert_eq!((status, &empty["changes"]), (200, &json!([])));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let url = server.url.clone();
    let poll = std::thread::spawn(move || {
        let body = json!({"cursor": 0, "wait": 20}).to_string();
        let (status, text) = post_as(
            &client(),
            &url,
            "/api/sync/down",
            Some(&d2),
            None,
            body.as_bytes(),
        );
        (status, text, Instant::now())
    });
    // Whether the poll is waiting yet or not, it must answer the change within 2 s of
    // its commit (a poll that starts after it answers at once).
    up(
        &server,
        &d1,
        vec![ev(
            1,
            "T",
            "1",
            "CREATE",
            json!({}),
            0,
            "2026-01-01T00:00:00Z",
        )],
    );
    let committed = Instant::now();
    let (status, text, answered) = poll.join().expect("poll");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"seq\": 1"), "{text}");
    let after = answered.saturating_duration_since(committed);
    assert!(after < Duration::from_secs(2), "{after:?}");
}

/// PostgreSQL only: two transactions applying a change of one tenant are serialised on
/// the tenant's counter row, so seq order is commit order and a reader never sees seq 2
/// without seq 1.
#[test]
fn out_of_order_commits_never_make_a_reader_skip_a_change() {
    use relais_server::store::postgres::sync::{INSERT_CHANGE, LOCK_TENANT, NEXT_SEQ};
    let Some(store) = StoreKind::postgres() else {
        return;
    };
    let (server, reader, _) = start(store);
    let StoreAt::Postgres(url) = server.store.clone() else {
        unreachable!("a PostgreSQL store")
    };
    let connect = || ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
    let change = |tx: &mut ::postgres::Transaction<'_>, id: &str| -> i64 {
        let seq: i64 = tx.query_one(NEXT_SEQ, &[&"A"]).expect("next seq").get(0);
        tx.execute(
            INSERT_CHANGE,
            &[&"A", &seq, &"T", &id, &1i64, &"CREATE", &"{}", &"test"],
        )
        .expect("insert change");
        seq
    };
    let seqs = || -> Vec<i64> {
        down(&server, &reader, 0, 100)["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|c| c["seq"].as_i64().expect("seq"))
            .collect()
    };
    let mut first = connect();
    let mut tx1 = first.transaction().expect("begin 1");
    tx1.query_one(LOCK_TENANT, &[&"A"]).expect("lock 1");
    assert_eq!(change(&mut tx1, "1"), 1);
    let (allocated_tx, allocated) = std::sync::mpsc::channel();
    let (commit_tx, commit) = std::sync::mpsc::channel::<()>();
    let url2 = url.clone();
    let second = std::thread::spawn(move || {
        let mut client = ::postgres::Client::connect(&url2, ::postgres::NoTls).expect("connect");
        let mut tx2 = client.transaction().expect("begin 2");
        tx2.query_one(LOCK_TENANT, &[&"A"]).expect("lock 2");
        let seq: i64 = tx2.query_one(NEXT_SEQ, &[&"A"]).expect("next seq").get(0);
        tx2.execute(
            INSERT_CHANGE,
            &[&"A", &seq, &"T", &"2", &1i64, &"CREATE", &"{}", &"test"],
        )
        .expect("insert change");
        allocated_tx.send(seq).expect("send");
        commit.recv().expect("commit signal");
        tx2.commit().expect("commit 2");
    });
    // The second blocks on the tenant's counter row.
    let mut watcher = connect();
    assert!(
        wait_for(Duration::from_secs(10), || {
            watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND datname = current_database() \
                     AND query LIKE 'INSERT INTO sync_tenants%'",
                    &[],
                )
                .expect("pg_stat_activity")
                .get::<_, i64>(0)
                == 1
        }),
        "the second transaction waits on the counter row"
    );
    assert!(
        allocated.try_recv().is_err(),
        "blocked: no seq allocated yet"
    );
    assert_eq!(seqs(), Vec::<i64>::new(), "nothing committed yet");
    tx1.commit().expect("commit 1");
    let seq2 = allocated
        .recv_timeout(Duration::from_secs(10))
        .expect("the second goes on");
    assert_eq!(seq2, 2);
    assert_eq!(
        seqs(),
        vec![1],
        "seq 2 allocated, not committed: the reader sees 1 only"
    );
    commit_tx.send(()).expect("signal");
    second.join().expect("second");
    assert_eq!(seqs(), vec![1, 2]);
}

fn without_auth_the_body_names_the_tenant(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let agent = client();
    let send = |path: &str, body: Value| {
        post(&agent, &server.url, path, None, body.to_string().as_bytes())
    };
    let event = ev(1, "T", "1", "CREATE", json!({}), 0, "2026-01-01T00:00:00Z");
    let (status, text) = send("/api/sync/up", json!({"events": [event.clone()]}));
    assert_eq!(status, 400, "{text}");
    let (status, text) = send("/api/sync/up", json!({"tenant": "A", "events": [event]}));
    assert_eq!(status, 200, "{text}");
    let (status, text) = send("/api/sync/down", json!({"tenant": "A", "cursor": 0}));
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        answer["changes"][0]["origin_device"],
        json!("open"),
        "{text}"
    );
}
