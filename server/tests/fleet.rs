//! Scale-out (issue 13): two relais-server processes on one PostgreSQL database and one
//! shared media directory. Clients racing the same keys to both servers get one row per
//! key and the same id from either; agents pushing through haproxy lose and double
//! nothing while one server is SIGKILLed and restarted; a media upload cut by the kill
//! leaves no row and no visible file, and is stored whole once pushed again.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::haproxy::Haproxy;
use common::{
    Server, StoreAt, client, event, media, pattern, pg, post, send_head, sha256_hex, wait_for,
};
use relais::demo::{create_app_db, insert_events, insert_media, settings_for};

/// Two servers on a new database of the shared cluster, with a new shared media
/// directory; `None` when PostgreSQL tests are skipped.
fn fleet() -> Option<(Server, Server, PathBuf)> {
    let cluster = pg::shared()?;
    let store = StoreAt::Postgres(cluster.create_db());
    let media = common::scratch("fleet-media");
    let a = Server::start_member(store.clone(), "127.0.0.1:0", &media, &[]);
    let b = Server::start_member(store, "127.0.0.1:0", &media, &[]);
    Some((a, b, media))
}

/// SIGKILL, as a power cut or the OOM killer would, and the exit reaped.
fn kill(server: &mut Server) {
    server.signal(libc::SIGKILL);
    assert!(
        server.wait_exit(Duration::from_secs(5)).is_some(),
        "still running after SIGKILL"
    );
}

/// The same server again: same store, same port, same media directory, `extra` flags.
fn restart(server: &Server, extra: &[&str]) -> Server {
    Server::start_member(
        server.store.clone(),
        &server.addr,
        &server.media_dir(),
        extra,
    )
}

/// The media files a listing shows: the directory's own files, not `.incoming/`.
fn visible_files(media: &Path) -> BTreeSet<String> {
    std::fs::read_dir(media)
        .expect("media dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn incoming_files(media: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(media.join(".incoming"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The `id` of a `201 {"id": N}` answer.
fn id_of(answer: &str) -> i64 {
    answer
        .trim()
        .strip_prefix("{\"id\": ")
        .and_then(|s| s.strip_suffix('}'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an id answer: {answer}"))
}

/// A counter of the server's `GET /metrics` (it runs `--no-auth`).
fn metric(server: &Server, name: &str) -> u64 {
    let (status, _, text) = common::get_as(&client(), &server.url, "/metrics", None);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

#[test]
fn racing_the_same_keys_to_both_servers_stores_each_once_with_one_id() {
    const EVENTS: u32 = 40;
    const MEDIA: u32 = 4;
    const CLIENTS: usize = 6;
    let Some((a, b, media_dir)) = fleet() else {
        return;
    };
    // Media bodies over the 64 KiB inline limit: each racer spools and places its own
    // file, so the losers' files must be removed again.
    let rows: Vec<(String, &str, String)> = (0..EVENTS)
        .map(|n| {
            let key = relais_wire::idempotency_key("race", "evenement", None, &n.to_string());
            (key, "/api/evenements", event("race", n % 60))
        })
        .chain((0..MEDIA).map(|n| {
            let key = relais_wire::idempotency_key("race", "media", None, &n.to_string());
            let data = pattern(100 * 1024, u64::from(n) + 1);
            (key, "/api/media", media("race", &STANDARD.encode(data)))
        }))
        .collect();
    let rows = Arc::new(rows);
    let start = Arc::new(Barrier::new(CLIENTS));
    let racers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let url = [&a.url, &b.url][i % 2].clone();
            let (rows, start) = (Arc::clone(&rows), Arc::clone(&start));
            std::thread::spawn(move || {
                let agent = client();
                rows.iter()
                    .map(|(key, path, body)| {
                        // All clients at once on every key, half of them on each server.
                        start.wait();
                        let (status, answer) = post(&agent, &url, path, Some(key), body.as_bytes());
                        assert_eq!(status, 201, "{key} via {url}: {answer}");
                        (key.clone(), id_of(&answer))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answered: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for racer in racers {
        for (key, id) in racer.join().expect("racer") {
            answered.entry(key).or_default().insert(id);
        }
    }

    let stored: BTreeMap<String, BTreeSet<i64>> = a
        .rows("SELECT idempotency_key, id FROM received")
        .into_iter()
        .fold(BTreeMap::new(), |mut m, r| {
            let (key, id) = (r[0].clone().expect("key"), r[1].clone().expect("id"));
            m.entry(key)
                .or_default()
                .insert(id.parse::<i64>().expect("id"));
            m
        });
    assert_eq!(stored.len(), rows.len(), "one row per key");
    assert!(
        stored.values().all(|ids| ids.len() == 1),
        "a key stored twice: {stored:?}"
    );
    assert_eq!(answered, stored, "every answer is the stored row's id");
    assert_eq!(
        a.count("SELECT count(*) FROM received"),
        rows.len() as i64,
        "no row without a key"
    );
    // Both processes won races: the constraint, not one server, decided.
    let (won_a, won_b) = (
        metric(&a, "relais_server_rows_stored_total"),
        metric(&b, "relais_server_rows_stored_total"),
    );
    assert_eq!(won_a + won_b, rows.len() as u64);
    eprintln!("rows stored by A: {won_a}, by B: {won_b}");
    assert!(won_a > 0 && won_b > 0, "A stored {won_a}, B {won_b}");
    let replays =
        metric(&a, "relais_server_replays_total") + metric(&b, "relais_server_replays_total");
    assert_eq!(replays, (rows.len() * (CLIENTS - 1)) as u64);

    // One file per media row, the losers' removed.
    let named: BTreeSet<String> = a
        .rows("SELECT media_path FROM media")
        .into_iter()
        .map(|mut r| r.remove(0).expect("media_path"))
        .collect();
    assert_eq!(named.len(), MEDIA as usize);
    assert_eq!(
        visible_files(&media_dir),
        named,
        "no file of a losing racer"
    );

    // A replay with another body: 422 from either server, nothing stored.
    let (key, path, _) = &rows[0];
    let original = stored[key].first().expect("id");
    for server in [&a, &b] {
        let other = event("race", 59);
        let (status, answer) = post(&client(), &server.url, path, Some(key), other.as_bytes());
        assert_eq!(status, 422, "{answer}");
        assert!(
            answer.contains(&format!("already used for row {original}")),
            "{answer}"
        );
    }
    assert_eq!(a.count("SELECT count(*) FROM received"), rows.len() as i64);
    let _ = std::fs::remove_dir_all(&media_dir);
}

/// One device: its application database and the agent's directories.
struct Device {
    id: String,
    dir: PathBuf,
    conn: rusqlite::Connection,
}

impl Device {
    fn new(n: usize) -> Device {
        let dir = common::scratch("fleet-agent");
        std::fs::create_dir_all(dir.join("log")).expect("log dir");
        // WAL: the test adds rows while the agent reads.
        let conn = create_app_db(&dir.join("surveillance.db"), true).expect("app db");
        insert_events(&conn, 250).expect("events");
        for size in [Some(200 * 1024), None, Some(1 << 20)] {
            insert_media(&conn, size).expect("media");
        }
        Device {
            id: format!("fleet-{n}"),
            dir,
            conn,
        }
    }

    /// The agent, in-process: passes until one is clean and pushes nothing once `last`
    /// is set (the test added its last rows); gives up after a minute. Returns how many
    /// passes were interrupted (a 502 from the balancer for a request the kill cut).
    fn run_agent(&self, backend: &str, last: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
        let mut settings = settings_for(
            &self.dir.join("surveillance.db"),
            backend,
            &self.dir,
            &[("DEVICE_ID", &self.id)],
        )
        .expect("settings");
        // An upload the balancer stops reading when its server dies stalls: given up
        // after 2 s, not the default 30, on loopback where nothing else is that slow.
        settings.http.io_timeout = Duration::from_secs(2);
        settings.http.response_timeout = Duration::from_secs(5);
        std::thread::spawn(move || {
            let mut pusher =
                relais::daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false)))
                    .expect("pusher");
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut interrupted = 0;
            loop {
                let done = last.load(Ordering::SeqCst);
                let report = pusher.sync_once();
                if done && report.is_clean() && report.pushed() == 0 {
                    return interrupted;
                }
                interrupted += u32::from(report.interrupted.is_some());
                assert!(Instant::now() < deadline, "agent not done: {report}");
                if report.pushed() == 0 {
                    // Nothing to do yet, or the backend refused: the run loop's pause.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        })
    }

    /// `(local_id, remote id)` of `endpoint`'s rows in the store, in local id order.
    fn stored(&self, server: &Server, endpoint: &str) -> Vec<(i64, i64)> {
        let mut rows: Vec<(i64, i64)> = server
            .rows(&format!(
                "SELECT local_id, id FROM received WHERE device_id = '{}' AND endpoint = '{endpoint}'",
                self.id
            ))
            .into_iter()
            .map(|r| {
                let n = |v: &Option<String>| v.as_deref().and_then(|s| s.parse().ok());
                (n(&r[0]).expect("local_id"), n(&r[1]).expect("id"))
            })
            .collect();
        rows.sort_unstable();
        rows
    }

    fn local_ids(&self, sql: &str) -> Vec<i64> {
        self.conn
            .prepare(sql)
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("local ids")
    }

    /// Every event and media row in the store exactly once, each media file's bytes
    /// right, and the agent's tracking: every row `success` with the store's id.
    fn check(&self, server: &Server, media_dir: &Path) {
        let events = self.stored(server, "/api/evenements");
        let ids: Vec<i64> = events.iter().map(|&(l, _)| l).collect();
        let expected = self.local_ids("SELECT id_evenement FROM evenement ORDER BY 1");
        assert_eq!(ids, expected, "{}: every event once", self.id);
        let media = self.stored(server, "/api/media");
        let ids: Vec<i64> = media.iter().map(|&(l, _)| l).collect();
        let expected = self.local_ids("SELECT id_media FROM media ORDER BY 1");
        assert_eq!(ids, expected, "{}: every media row once", self.id);
        for (local_id, blob) in self.blobs() {
            let row = server.rows(&format!(
                "SELECT media_path, media_sha256 FROM media WHERE device_id = '{}' AND local_id = '{local_id}'",
                self.id
            ));
            let [path, sha] = &row[0][..] else {
                panic!("{}: media row {row:?}", self.id)
            };
            let Some(blob) = blob else {
                assert_eq!((path, sha), (&None, &None), "{}: no BLOB", self.id);
                continue;
            };
            let want = sha256_hex(&blob);
            assert_eq!(
                sha.as_deref(),
                Some(want.as_str()),
                "{} {local_id}",
                self.id
            );
            let file =
                std::fs::read(media_dir.join(path.as_deref().expect("path"))).expect("media file");
            assert_eq!(sha256_hex(&file), want, "{} {local_id} on disk", self.id);
        }

        let tracking =
            rusqlite::Connection::open(self.dir.join("state/relais.db")).expect("state database");
        let tracked: HashMap<(String, i64), (Option<i64>, String)> = tracking
            .prepare("SELECT table_name, local_id, remote_id, sync_status FROM sync_tracking")
            .and_then(|mut s| {
                s.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?))))?
                    .collect()
            })
            .expect("sync_tracking");
        assert_eq!(tracked.len(), events.len() + media.len(), "{}", self.id);
        for (table, rows) in [("evenement", &events), ("media", &media)] {
            for &(local_id, id) in rows {
                assert_eq!(
                    tracked.get(&(table.to_string(), local_id)),
                    Some(&(Some(id), "success".to_string())),
                    "{} {table} {local_id}: tracked with the store's id",
                    self.id
                );
            }
        }
    }

    fn blobs(&self) -> Vec<(i64, Option<Vec<u8>>)> {
        self.conn
            .prepare("SELECT id_media, video FROM media")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .expect("blobs")
    }
}

#[test]
fn agents_through_the_balancer_lose_nothing_while_a_server_is_killed_and_restarted() {
    const AGENTS: usize = 4;
    let Some((mut a, b, media_dir)) = fleet() else {
        return;
    };
    let Some(balancer) = Haproxy::start(&[&a.addr, &b.addr]) else {
        return;
    };
    assert!(
        wait_for(Duration::from_secs(5), || balancer.is_up("s0")
            && balancer.is_up("s1")),
        "haproxy does not see both servers ready"
    );
    let devices: Vec<Device> = (0..AGENTS).map(Device::new).collect();
    let total_at_start = AGENTS as i64 * (250 + 3);
    let last = Arc::new(AtomicBool::new(false));
    let agents: Vec<_> = devices
        .iter()
        .map(|d| d.run_agent(&balancer.url, Arc::clone(&last)))
        .collect();

    let received = || a.count("SELECT count(*) FROM received");
    // Each agent's event and media lanes hold a connection of their own: which server the
    // event lanes land on is the order they connect in, so A's part is waited for too.
    let stored_by_a = || metric(&a, "relais_server_rows_stored_total");
    assert!(
        wait_for(Duration::from_secs(20), || received() >= 100
            && stored_by_a() > 0),
        "no rows through the balancer, or none by A"
    );
    let stored_by_a = stored_by_a();
    kill(&mut a);
    let at_kill = b.count("SELECT count(*) FROM received");
    assert!(
        at_kill < total_at_start,
        "the agents were done before the kill ({at_kill} rows)"
    );
    assert!(stored_by_a > 0, "A took no part before the kill");
    assert!(
        wait_for(Duration::from_secs(5), || !balancer.is_up("s0")),
        "haproxy still sends to the killed server"
    );
    let a = restart(&a, &[]);
    assert!(
        wait_for(Duration::from_secs(5), || balancer.is_up("s0")),
        "haproxy does not take the restarted server back"
    );
    // Rows written after the restart: the restarted server gets its share of them.
    for device in &devices {
        insert_events(&device.conn, 50).expect("more events");
    }
    last.store(true, Ordering::SeqCst);
    let interrupted: u32 = agents.into_iter().map(|a| a.join().expect("agent")).sum();

    for device in &devices {
        device.check(&b, &media_dir);
    }
    assert_eq!(
        b.count("SELECT count(*) FROM received"),
        AGENTS as i64 * (300 + 3)
    );
    assert!(
        metric(&a, "relais_server_rows_stored_total") > 0,
        "the restarted server stored nothing"
    );
    eprintln!(
        "rows when A was killed: {at_kill} of {total_at_start}; stored by A before: \
         {stored_by_a}; interrupted passes: {interrupted}"
    );
    for device in &devices {
        let _ = std::fs::remove_dir_all(&device.dir);
    }
    let _ = std::fs::remove_dir_all(&media_dir);
}

/// Sends the first half of `body` to `addr` as a media push with `key`; returns the
/// connection, its upload in flight.
fn half_upload(addr: &str, key: &str, body: &[u8]) -> std::net::TcpStream {
    let mut conn = send_head(addr, "/api/media", key, body.len());
    for chunk in body[..body.len() / 2].chunks(64 * 1024) {
        conn.write_all(chunk).expect("half the body");
    }
    conn
}

/// The status line and headers of the answer on `conn` (the connection stays open).
fn answer_head(conn: &mut std::net::TcpStream) -> String {
    use std::io::Read as _;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The `.part` files of `.incoming` with at least `bytes` written.
fn parts_over(media: &Path, bytes: u64) -> Vec<PathBuf> {
    incoming_files(media)
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= bytes))
        .collect()
}

#[test]
fn a_media_upload_cut_by_sigkill_leaves_no_row_and_no_visible_file() {
    let Some(cluster) = pg::shared() else {
        return;
    };
    let media_dir = common::scratch("fleet-media");
    let store = StoreAt::Postgres(cluster.create_db());
    // Requests of at most 2 s: a partial file idle for 4 s is a leftover.
    let short = ["--request-timeout-s", "2"];
    let mut a = Server::start_member(store.clone(), "127.0.0.1:0", &media_dir, &short);
    let b = Server::start_member(store, "127.0.0.1:0", &media_dir, &[]);
    let data = pattern(4 << 20, 13);
    let body = media("cut", &STANDARD.encode(&data)).into_bytes();
    let key = relais_wire::idempotency_key("cut", "media", None, "1");
    let conn = half_upload(&a.addr, &key, &body);
    // The kill must hit a file being written: wait until the server has spooled some.
    assert!(
        wait_for(Duration::from_secs(10), || parts_over(&media_dir, 1 << 20)
            .len()
            == 1),
        "no temporary file being written: {:?}",
        incoming_files(&media_dir)
    );
    kill(&mut a);
    drop(conn);

    assert_eq!(
        a.count("SELECT count(*) FROM received"),
        0,
        "a row for a cut body"
    );
    assert_eq!(visible_files(&media_dir), BTreeSet::new(), "a visible file");
    // SIGKILL runs no destructor: the partial file stays in .incoming.
    let left = incoming_files(&media_dir);
    assert!(
        left.len() == 1 && left[0].extension().is_some_and(|e| e == "part"),
        "{left:?}"
    );

    // B is receiving another upload while A starts again: A's start must not take B's
    // partial file for a leftover, nor A's own fresh one yet.
    let other = pattern(4 << 20, 14);
    let other_body = media("live", &STANDARD.encode(&other)).into_bytes();
    let other_key = relais_wire::idempotency_key("live", "media", None, "1");
    let mut live = half_upload(&b.addr, &other_key, &other_body);
    assert!(
        wait_for(Duration::from_secs(10), || parts_over(&media_dir, 1 << 20)
            .len()
            == 2),
        "B is not writing: {:?}",
        incoming_files(&media_dir)
    );
    let a = restart(&a, &short);
    assert_eq!(incoming_files(&media_dir).len(), 2, "a live upload removed");
    live.write_all(&other_body[other_body.len() / 2..])
        .expect("the rest of the body");
    let head = answer_head(&mut live);
    assert!(
        head.starts_with("HTTP/1.1 201"),
        "B's upload across A's restart: {head}"
    );

    // The killed upload's file, idle since the kill, goes at A's next sweep.
    assert!(
        wait_for(Duration::from_secs(15), || incoming_files(&media_dir)
            .is_empty()),
        "leftover kept: {:?}",
        incoming_files(&media_dir)
    );
    // The line comes after the removal: waited for, not read at once.
    assert!(
        wait_for(Duration::from_secs(5), || a
            .logged("media: removed 1 partial upload file(s)")),
        "{}",
        a.log_text()
    );
    let (status, answer) = post(&client(), &a.url, "/api/media", Some(&key), &body);
    assert_eq!(status, 201, "{answer}");
    let row = a.row(
        "SELECT count(*), min(media_size), min(media_sha256), min(media_path) FROM media
         WHERE device_id = 'cut'",
    );
    assert_eq!(
        row[..3],
        ["1".to_string(), data.len().to_string(), sha256_hex(&data)]
    );
    let files = visible_files(&media_dir);
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.contains(&row[3]), "the row's file: {files:?}");
    let file = std::fs::read(media_dir.join(&row[3])).expect("file");
    assert_eq!(sha256_hex(&file), sha256_hex(&data), "the file's bytes");
    assert_eq!(incoming_files(&media_dir), Vec::<PathBuf>::new());
    let _ = std::fs::remove_dir_all(&media_dir);
}
