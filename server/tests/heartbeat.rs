//! Heartbeats against a real relais-server on both stores: `POST /api/agent/heartbeat`
//! takes a device token (401 without, 403 for an admin's), refuses a body above the
//! bound (413) or one that is not a heartbeat (422 naming the member); what it stores is
//! read back through the store's own `fleet()` and `device_history()` (the store opened
//! by the test on the server's database); the hourly history UPSERTs per hour and is
//! pruned; the rows received per hour count new rows only, once flushed; a config pull
//! made with a device token names that agent's site and the hash served.

mod common;

use std::time::Duration;

use common::{Server, StoreAt, StoreKind, client, event, post_as, wait_for};
use relais_server::store::Store;
use relais_server::store::postgres::{PostgresStore, PostgresUrl};
use relais_server::store::sqlite::SqliteStore;
use relais_wire::heartbeat::{ConfigState, HEARTBEAT_PATH, Heartbeat, Pass, TableState};

common::on_both_stores!(
    a_heartbeat_is_kept_and_read_back_by_fleet,
    the_history_keeps_one_point_per_hour_and_is_pruned,
    received_rows_per_hour_count_new_rows_only,
    a_config_pull_with_a_device_token_names_the_agents_site_and_hash,
);

fn heartbeat(device: &str, backlog: u64) -> Heartbeat {
    Heartbeat {
        device_id: Some(device.into()),
        agent_version: "0.1.0".into(),
        interval_s: 60,
        pass: Pass {
            at: 1_766_000_000,
            ok: true,
            pushed: 3,
            failed: 0,
            error: None,
        },
        tables: vec![TableState {
            source: "app.db".into(),
            table: "evenement".into(),
            backlog,
            failed: 2,
            oldest_unsent_s: None,
        }],
        tables_truncated: 0,
        config: ConfigState {
            hash: Some("abc123".into()),
            last_pull_at: Some(1_766_000_000),
            last_pull_ok: Some(true),
            error: None,
        },
        free_bytes: Some(1 << 30),
        media_lane: None,
    }
}

/// Runs `f` on the server's store, opened by the test, within a runtime of its own.
fn on_store<T>(server: &Server, f: impl FnOnce(&dyn StoreCalls) -> T) -> T {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _in = runtime.enter();
    match &server.store {
        StoreAt::Sqlite(path) => f(&SqliteStore::open(path).expect("open")),
        StoreAt::Postgres(url) => {
            let url = PostgresUrl::parse(url).expect("url");
            f(&PostgresStore::open(&url).expect("open"))
        }
    }
}

/// The store methods these tests call, object-safe (the trait's are `impl Future`).
trait StoreCalls {
    fn fleet(&self) -> Vec<relais_server::store::FleetEntry>;
    fn history(&self, device: &str) -> relais_server::store::DeviceHistory;
    fn record(&self, device: &str, at: i64, hb: Heartbeat);
    fn add(&self, counts: Vec<(String, i64, u64)>);
    fn prune(&self, before: i64) -> u64;
}

impl<S: Store> StoreCalls for S {
    fn fleet(&self) -> Vec<relais_server::store::FleetEntry> {
        block(Store::fleet(self, 0)).expect("fleet")
    }
    fn history(&self, device: &str) -> relais_server::store::DeviceHistory {
        block(self.device_history(device.into(), 0)).expect("history")
    }
    fn record(&self, device: &str, at: i64, hb: Heartbeat) {
        let json = hb.clone().encode();
        block(self.record_heartbeat(device.into(), at, hb, json)).expect("record");
    }
    fn add(&self, counts: Vec<(String, i64, u64)>) {
        block(self.add_received(counts)).expect("add");
    }
    fn prune(&self, before: i64) -> u64 {
        block(self.prune_history(before)).expect("prune")
    }
}

/// Runs a store future on the runtime [`on_store`] entered.
fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Handle::current().block_on(f)
}

fn send(server: &Server, token: Option<&str>, body: &str) -> (u16, String) {
    post_as(
        &client(),
        &server.url,
        HEARTBEAT_PATH,
        token,
        None,
        body.as_bytes(),
    )
}

fn a_heartbeat_is_kept_and_read_back_by_fleet(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let token = server.token(&["--device", "pi-1"]);
    let _never_seen = server.token(&["--device", "pi-2"]);
    let admin = server.token(&["--admin", "ops"]);
    let body = heartbeat("pi-1", 7).encode();

    assert_eq!(send(&server, None, &body).0, 401);
    assert_eq!(send(&server, Some(&admin), &body).0, 403);
    let big = format!("{}{}", body, " ".repeat(17 * 1024));
    assert_eq!(send(&server, Some(&token), &big).0, 413);
    let (status, detail) = send(&server, Some(&token), r#"{"agent_version": 3}"#);
    assert_eq!(status, 422, "{detail}");
    assert!(detail.contains("agent_version"), "{detail}");
    let other = heartbeat("pi-9", 7).encode();
    assert_eq!(send(&server, Some(&token), &other).0, 403, "another device");
    let (status, answer) = send(&server, Some(&token), &body);
    assert_eq!((status, answer.as_str()), (204, ""));

    let fleet = on_store(&server, |s| s.fleet());
    let devices: Vec<&str> = fleet.iter().map(|e| e.device_id.as_str()).collect();
    assert_eq!(devices, ["pi-1", "pi-2"]);
    let seen = &fleet[0];
    assert_eq!(seen.heartbeat, Some(heartbeat("pi-1", 7)));
    assert!(seen.last_contact.is_some());
    let never = &fleet[1];
    assert_eq!(
        (never.last_contact, &never.heartbeat, never.rows_today),
        (None, &None, 0)
    );
    assert_eq!((never.site_id, &never.pulled_hash), (None, &None));
    assert_eq!(
        server.row("SELECT backlog, failed, config_hash, agent_version FROM heartbeats_latest"),
        ["7", "2", "abc123", "0.1.0"]
    );
    let metrics = common::get_as(&client(), &server.url, "/metrics", Some(&admin)).2;
    assert!(
        metrics.contains("relais_server_heartbeats_total 1\n"),
        "{metrics}"
    );
}

fn the_history_keeps_one_point_per_hour_and_is_pruned(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    // Hours of today: the server's own retention task (`--history-days`, 30) prunes
    // older ones whenever it runs, which may be in the middle of this test.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let hour = (now / 3600 - 2) * 3600;
    let history = on_store(&server, |s| {
        s.record("pi", hour + 10, heartbeat("pi", 5));
        s.record("pi", hour + 3000, heartbeat("pi", 6));
        s.record("pi", hour + 3600, heartbeat("pi", 8));
        s.add(vec![("pi".into(), hour, 4)]);
        s.history("pi")
    });
    let points: Vec<(i64, u64, Option<u64>)> = history
        .hours
        .iter()
        .map(|p| (p.hour, p.rows_received, p.backlog))
        .collect();
    assert_eq!(
        points,
        [(hour, 4, Some(6)), (hour + 3600, 0, Some(8))],
        "the hour's latest heartbeat overwrote its point"
    );
    assert_eq!(
        history.latest.map(|(at, hb)| (at, hb.backlog_total())),
        Some((hour + 3600, 8))
    );
    let (pruned, left) = on_store(&server, |s| {
        (s.prune(hour + 3600), s.history("pi").hours.len())
    });
    assert_eq!(
        (pruned, left),
        (2, 1),
        "one heartbeat hour and one received hour"
    );
}

fn received_rows_per_hour_count_new_rows_only(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let agent = client();
    for (key, n) in [
        ("pi:evenement:1", 1),
        ("pi:evenement:1", 1),
        ("pi:evenement:2", 2),
    ] {
        let (status, body) = post_as(
            &agent,
            &server.url,
            "/api/evenements",
            None,
            Some(key),
            event("pi", n).as_bytes(),
        );
        assert_eq!(status, 201, "{body}");
    }
    // Flushed every 5 s: the replay is not counted.
    assert!(
        wait_for(Duration::from_secs(15), || {
            server.count("SELECT coalesce(sum(rows), 0) FROM received_hours") == 2
        }),
        "received_hours: {:?}",
        server.rows("SELECT device_id, hour, rows FROM received_hours")
    );
    let fleet = on_store(&server, |s| {
        s.record("pi", relais_server::store::fleet::now(), heartbeat("pi", 1));
        s.fleet()
    });
    assert_eq!(fleet[0].rows_today, 2);
}

fn a_config_pull_with_a_device_token_names_the_agents_site_and_hash(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let device = server.token(&["--device", "pi-1"]);
    let _other = server.token(&["--device", "pi-2"]);
    let admin = server.token(&["--admin", "ops"]);
    let site = r#"{"name": "Site Paris", "timezone": "Europe/Paris", "token": "paris-site-token-0123456789"}"#;
    let (status, created) = post_as(
        &client(),
        &server.url,
        "/admin/sites",
        Some(&admin),
        None,
        site.as_bytes(),
    );
    assert_eq!(status, 201, "{created}");
    let site_id: i64 = server.row("SELECT id FROM sites")[0]
        .parse()
        .expect("site id");
    let path = "/config/paris-site-token-0123456789";

    // A pull without a token is served as before and names no agent.
    let (status, _, body) = common::get_as(&client(), &server.url, path, None);
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = common::get_as(&client(), &server.url, path, Some(&device));
    assert_eq!(status, 200, "{body}");
    let hash = server.row("SELECT config_version FROM sites")[0].clone();
    assert!(body.contains(&hash), "{body}");

    let fleet = on_store(&server, |s| s.fleet());
    let pulled = fleet.iter().find(|e| e.device_id == "pi-1").expect("pi-1");
    assert_eq!(
        (pulled.site_id, pulled.pulled_hash.as_deref()),
        (Some(site_id), Some(hash.as_str()))
    );
    assert!(pulled.pulled_at.is_some());
    let other = fleet.iter().find(|e| e.device_id == "pi-2").expect("pi-2");
    assert_eq!((other.site_id, &other.pulled_hash), (None, &None));
}
