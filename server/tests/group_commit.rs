//! Group commit (server/src/store/group_commit.rs) on both stores: a burst of racing
//! pushes through a real relais-server stores each key once and answers every push of a
//! key alike; one batch holding a key twice, a later batch replaying it, and a bad row
//! in a batch, through the store's own flush on a real SQLite file or PostgreSQL
//! database.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier};

use relais_server::store::group_commit::{Flush, Flushed};
use relais_server::store::postgres::{PostgresStore, PostgresUrl};
use relais_server::store::sqlite::SqliteStore;
use relais_server::store::{NewPush, Stored};

use common::{Server, StoreKind, client, event, post, sha256_hex};

common::on_both_stores!(
    a_burst_of_racing_pushes_stores_each_key_once_and_answers_it_alike,
    one_batch_holding_a_key_twice_answers_both_with_the_first_row,
);

const THREADS: usize = 32;
/// Per thread: as many keys of its own as keys every thread pushes.
const KEYS: usize = 4;
const KEYLESS: usize = 2;

/// A body PostgreSQL refuses (its `text` holds no NUL character) and SQLite stores:
/// valid JSON, so it passes the server's checks and reaches the store.
fn bad_event() -> String {
    event("pi-\\u0000", 1)
}

/// What one push sent and got.
struct Sent {
    key: Option<String>,
    body: String,
    status: u16,
    answer: String,
}

/// 32 threads released at once, each pushing its own keys, the keys every thread
/// pushes (a quarter of the threads with another body) and keyless pushes, interleaved;
/// thread 0 also pushes a row the PostgreSQL store refuses.
fn a_burst_of_racing_pushes_stores_each_key_once_and_answers_it_alike(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (barrier, url) = (Arc::clone(&barrier), server.url.clone());
            std::thread::spawn(move || {
                let agent = client();
                let mut plan: Vec<(Option<String>, String)> = Vec::new();
                for i in 0..KEYS {
                    let variant = if t % 4 == 3 { 2 } else { 1 };
                    plan.push((
                        Some(format!("pi-1:evenement:shared-{i}")),
                        event("pi-1", variant),
                    ));
                    plan.push((Some(format!("pi-1:evenement:{t}-{i}")), event("pi-1", 3)));
                }
                plan.extend((0..KEYLESS).map(|_| (None, event("pi-1", 4))));
                if t == 0 {
                    plan.insert(1, (Some("bad:evenement:1".into()), bad_event()));
                }
                barrier.wait();
                plan.into_iter()
                    .map(|(key, body)| {
                        let (status, answer) = post(
                            &agent,
                            &url,
                            "/api/evenements",
                            key.as_deref(),
                            body.as_bytes(),
                        );
                        Sent {
                            key,
                            body,
                            status,
                            answer,
                        }
                    })
                    .collect::<Vec<Sent>>()
            })
        })
        .collect();
    let sent: Vec<Sent> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();

    let on_postgres = matches!(store, StoreKind::Postgres(_));
    let stored: HashMap<String, (String, String)> = server
        .rows(
            "SELECT idempotency_key, id, body_sha256 FROM received
             WHERE idempotency_key IS NOT NULL",
        )
        .into_iter()
        .map(|r| {
            let r: Vec<String> = r.into_iter().map(Option::unwrap_or_default).collect();
            (r[0].clone(), (r[1].clone(), r[2].clone()))
        })
        .collect();
    let own_keys = THREADS * KEYS;
    let bad_stored = usize::from(!on_postgres);
    assert_eq!(stored.len(), own_keys + KEYS + bad_stored, "{stored:?}");
    let mut mismatches = 0;
    for s in sent.iter().filter(|s| s.key.is_some()) {
        let key = s.key.as_deref().unwrap_or_default();
        if key.starts_with("bad:") && on_postgres {
            assert_eq!(s.status, 500, "{}", s.answer);
            assert!(s.answer.contains("store: "), "{}", s.answer);
            continue;
        }
        let (id, sha) = &stored[key];
        if *sha == sha256_hex(s.body.as_bytes()) {
            assert_eq!(
                (s.status, s.answer.as_str()),
                (201, format!("{{\"id\": {id}}}").as_str()),
                "{key}"
            );
        } else {
            assert_eq!(s.status, 422, "{key}: {}", s.answer);
            assert!(s.answer.contains(&format!("row {id} ")), "{}", s.answer);
            mismatches += 1;
        }
    }
    // Whichever body won a shared key, the threads with the other body were refused.
    assert!(mismatches >= KEYS * THREADS / 4, "{mismatches}");

    let keyless: Vec<&Sent> = sent.iter().filter(|s| s.key.is_none()).collect();
    assert_eq!(keyless.len(), THREADS * KEYLESS);
    let keyless_ids: HashSet<&str> = keyless
        .iter()
        .map(|s| {
            assert_eq!(s.status, 201, "{}", s.answer);
            s.answer.as_str()
        })
        .collect();
    assert_eq!(keyless_ids.len(), THREADS * KEYLESS, "one new row each");
    assert_eq!(
        server.count("SELECT count(*) FROM received WHERE idempotency_key IS NULL"),
        (THREADS * KEYLESS) as i64
    );

    // Every keyed push (and on SQLite every push) was answered by a group commit, and
    // at least one commit answered several.
    let metrics = common::get_as(&client(), &server.url, "/metrics", None).2;
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let keyed = THREADS * KEYS * 2 + bad_stored;
    let batched = if on_postgres {
        keyed
    } else {
        keyed + THREADS * KEYLESS
    };
    let pushes = counter("relais_server_store_committed_pushes_total");
    let commits = counter("relais_server_store_commits_total");
    assert_eq!(pushes, batched as u64, "{metrics}");
    assert!(
        commits > 0 && commits < pushes,
        "{commits} commits: {metrics}"
    );
}

fn push(device: &str, key: &str, body: &str) -> NewPush {
    NewPush {
        device_id: device.into(),
        endpoint: "/api/evenements".into(),
        idempotency_key: Some(key.into()),
        local_id: None,
        body: body.into(),
        body_sha256: sha256_hex(body.as_bytes()),
        media: None,
    }
}

/// The store's flush, on a new store of `kind`, driven on a runtime of its own.
fn flush_on(kind: StoreKind) -> impl FnMut(Vec<NewPush>) -> Flushed {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    enum Either {
        Sqlite(SqliteStore),
        Postgres(PostgresStore),
    }
    let store = match kind {
        StoreKind::Sqlite => {
            let dir = common::scratch("flush");
            let store = SqliteStore::open(&dir.join("store.db")).expect("open");
            store.migrate().expect("migrate");
            Either::Sqlite(store)
        }
        StoreKind::Postgres(cluster) => {
            let url = PostgresUrl::parse(&cluster.create_db()).expect("url");
            let store = PostgresStore::open(&url).expect("open");
            runtime.block_on(store.migrate()).expect("migrate");
            Either::Postgres(store)
        }
    };
    move |batch| match &store {
        Either::Sqlite(s) => runtime.block_on(s.flush(batch)),
        Either::Postgres(s) => runtime.block_on(s.flush(batch)),
    }
}

/// The unique constraint, not the application, skips the second push of a key in one
/// batch; it gets the first's id (replay) or a mismatch. A later batch is answered from
/// the stored originals. A row the store refuses fails alone.
fn one_batch_holding_a_key_twice_answers_both_with_the_first_row(kind: StoreKind) {
    let mut flush = flush_on(kind);
    let (a, b) = (r#"{"n": 1}"#, r#"{"n": 2}"#);
    let answers = |f: Flushed| -> Vec<Result<Stored, String>> {
        f.answers
            .into_iter()
            .map(|a| a.map_err(|e| e.to_string()))
            .collect()
    };

    let first = flush(vec![
        push("pi-1", "k1", a),
        push("pi-1", "k1", a),
        push("pi-1", "k1", b),
        push("pi-1", "k2", b),
        push("pi-2", "k1", b),
    ]);
    assert_eq!(first.commits, 1, "one transaction for the batch");
    let got = answers(first);
    let Ok(Stored::New(k1)) = got[0] else {
        panic!("{got:?}");
    };
    assert_eq!(
        got[1..3],
        [Ok(Stored::Replay(k1)), Ok(Stored::Mismatch(k1))]
    );
    assert!(matches!(got[3], Ok(Stored::New(_))), "{got:?}");
    assert!(
        matches!(got[4], Ok(Stored::New(_))),
        "another device's key: {got:?}"
    );

    // Here the first push of k3 has the other body: the one inserted is known by its body.
    let second = answers(flush(vec![
        push("pi-1", "k2", b),
        push("pi-1", "k1", b),
        push("pi-1", "k3", b),
        push("pi-1", "k3", a),
        push("pi-1", "k1", a),
    ]));
    let Ok(Stored::New(k3)) = second[2] else {
        panic!("{second:?}");
    };
    assert_eq!(second[1], Ok(Stored::Mismatch(k1)));
    assert_eq!(second[3], Ok(Stored::Mismatch(k3)));
    assert_eq!(second[4], Ok(Stored::Replay(k1)));
    assert_eq!(second[0], got[3].clone().map(|s| Stored::Replay(id_of(s))));

    let third = flush(vec![
        push("pi-1", "k4", a),
        push("pi-\u{0}", "k5", a),
        push("pi-1", "k6", a),
    ]);
    let got = answers(third);
    assert!(matches!(got[0], Ok(Stored::New(_))), "{got:?}");
    assert!(matches!(got[2], Ok(Stored::New(_))), "{got:?}");
    match kind {
        StoreKind::Postgres(_) => {
            let err = got[1].clone().expect_err("a NUL in text is refused");
            assert!(err.contains("0x00"), "{err}");
        }
        // SQLite stores any UTF-8 text: no row that passed the server's JSON checks
        // makes its insert fail.
        StoreKind::Sqlite => assert!(matches!(got[1], Ok(Stored::New(_))), "{got:?}"),
    }
}

fn id_of(s: Stored) -> i64 {
    match s {
        Stored::New(id) | Stored::Replay(id) | Stored::Mismatch(id) => id,
    }
}
