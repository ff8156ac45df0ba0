//! `relais demo`: the agent's main job end to end on a fresh machine. It creates an
//! application database with the contract's schema (events, and media including one
//! large BLOB), starts relais-server in-process on its embedded store and a free
//! loopback port, runs one pass, checks that every row arrived exactly once with
//! identical bytes, and runs a second pass that must push nothing. Then the
//! configuration pull: a site and a device made through the server's admin API are
//! pulled, an unchanged configuration is not rewritten, a new device is pulled.
//!
//! The database builders and the delivery check are public: the tests, the fault
//! campaigns and the benchmarks use the same ones.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use miniserde::json::{Number, Value as Json};
use rusqlite::{Connection, MAIN_DB};

use crate::push::human_bytes;
use crate::received::{self, EmbeddedServer, ReceivedRow};
use crate::settings::Settings;
use crate::{daemon, logging};

/// The contract's schema (section 1).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS capteur (id_capteur INTEGER PRIMARY KEY, nom TEXT NOT NULL, type TEXT, etat INTEGER);
CREATE TABLE IF NOT EXISTS evenement (id_evenement INTEGER PRIMARY KEY AUTOINCREMENT, date TEXT NOT NULL,
    id_capteur INTEGER NOT NULL REFERENCES capteur(id_capteur));
CREATE TABLE IF NOT EXISTS media (id_media INTEGER PRIMARY KEY AUTOINCREMENT, date TEXT NOT NULL,
    id_capteur INTEGER NOT NULL REFERENCES capteur(id_capteur), numero_camera INTEGER, video BLOB);
";

/// Creates (or opens) an application database with the contract's schema and sensors.
pub fn create_app_db(path: &Path, wal: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    if wal {
        conn.pragma_update(None, "journal_mode", "wal")?;
    }
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(
        "INSERT OR IGNORE INTO capteur VALUES (1, 'PIR Entrée', 'pir', 1);
         INSERT OR IGNORE INTO capteur VALUES (4, 'Caméra 1', 'camera', 1);",
    )?;
    Ok(conn)
}

/// Inserts `n` events in one transaction.
pub fn insert_events(conn: &Connection, n: usize) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN")?;
    for i in 0..n {
        conn.execute(
            "INSERT INTO evenement (date, id_capteur) VALUES (?1, 1)",
            [format!(
                "2025-12-18T17:{:02}:{:02}.{:06}",
                i / 60 % 60,
                i % 60,
                i
            )],
        )?;
    }
    conn.execute_batch("COMMIT")
}

/// Inserts a media row with a BLOB of `size` bytes (NULL for `None`), written in
/// chunks so that building a 1 GB row needs no 1 GB buffer. Returns its id.
pub fn insert_media(conn: &Connection, size: Option<u64>) -> rusqlite::Result<i64> {
    // One transaction, as an application should write it: a reader must never see the
    // row with its BLOB still zeros (that raced with the power-cut campaign's uploads).
    conn.execute_batch("SAVEPOINT insert_media")?;
    let written = write_media(conn, size);
    let end = if written.is_ok() {
        "RELEASE insert_media"
    } else {
        "ROLLBACK TO insert_media; RELEASE insert_media"
    };
    conn.execute_batch(end)?;
    written
}

fn write_media(conn: &Connection, size: Option<u64>) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO media (date, id_capteur, numero_camera, video) VALUES ('2025-12-18T17:30:00.123456', 4, 1, ?1)",
        [size.map(|n| rusqlite::blob::ZeroBlob(n as i32))],
    )?;
    let id = conn.last_insert_rowid();
    if let Some(n) = size {
        let mut blob = conn.blob_open(MAIN_DB, "media", "video", id, false)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        while offset < n {
            let len = (n - offset).min(buf.len() as u64) as usize;
            fill_pattern(id, offset, &mut buf[..len]);
            blob.write_at(&buf[..len], offset as usize)?;
            offset += len as u64;
        }
    }
    Ok(id)
}

/// Deterministic, incompressible bytes for media `id` at `offset`.
pub fn fill_pattern(id: i64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let mut x = (offset + i as u64).wrapping_add((id as u64) << 40) ^ 0x9e37_79b9_7f4a_7c15;
        x = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        *b = (x ^ (x >> 29)) as u8;
    }
}

/// What the delivery check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub expected: u64,
    pub received: u64,
    pub duplicates: u64,
    pub missing: Vec<String>,
    pub mismatched: Vec<String>,
}

impl Delivery {
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty() && self.duplicates == 0
    }
}

/// Checks that every event and media row of `db` arrived at the server once, with
/// the contract's payload and identical BLOB bytes.
pub fn check_delivery(
    db: &Path,
    rows: &[ReceivedRow],
    device_id: &str,
) -> Result<Delivery, String> {
    let conn = Connection::open(db).map_err(|e| e.to_string())?;
    let mut by_key: HashMap<&str, Vec<&ReceivedRow>> = HashMap::new();
    for r in rows {
        by_key
            .entry(r.idempotency_key.as_deref().unwrap_or(""))
            .or_default()
            .push(r);
    }
    let mut d = Delivery {
        received: rows.len() as u64,
        ..Delivery::default()
    };
    let mut check = |table: &str, id: i64, verify: &dyn Fn(&ReceivedRow) -> Result<(), String>| {
        d.expected += 1;
        let key = format!("{device_id}:{table}:{id}");
        match by_key.get(key.as_str()).map(Vec::as_slice) {
            None | Some([]) => d.missing.push(key),
            Some(found) => {
                d.duplicates += found.len() as u64 - 1;
                if let Err(e) = verify(found[0]) {
                    d.mismatched.push(format!("{key}: {e}"));
                }
            }
        }
    };
    let events = ids(
        &conn,
        "SELECT id_evenement, date FROM evenement ORDER BY id_evenement",
    )?;
    for (id, date) in &events {
        check("evenement", *id, &|r| {
            check_fields(r, "evenements", date, device_id)
        });
    }
    let media = ids(&conn, "SELECT id_media, date FROM media ORDER BY id_media")?;
    for (id, date) in &media {
        check("media", *id, &|r| {
            check_fields(r, "media", date, device_id)?;
            check_blob(&conn, *id, r)
        });
    }
    Ok(d)
}

fn ids(conn: &Connection, sql: &str) -> Result<Vec<(i64, String)>, String> {
    let mut stmt = conn.prepare(sql).map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(|e| e.to_string())?;
    rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
}

fn check_fields(
    r: &ReceivedRow,
    endpoint: &str,
    date: &str,
    device_id: &str,
) -> Result<(), String> {
    if r.endpoint != endpoint {
        return Err(format!(
            "arrived at /api/{} instead of /api/{endpoint}",
            r.endpoint
        ));
    }
    let Ok(Json::Object(obj)) = miniserde::json::from_str::<Json>(&r.json) else {
        return Err("payload is not a JSON object".into());
    };
    let text = |k: &str| match obj.get(k) {
        Some(Json::String(s)) => Some(s.clone()),
        _ => None,
    };
    if text("date").as_deref() != Some(date)
        || text("device_id").as_deref() != Some(device_id)
        || text("source").as_deref() != Some("sync_service")
    {
        return Err(format!("unexpected payload {}", r.json));
    }
    match obj.get("capteur") {
        Some(Json::Object(c))
            if matches!(
                c.get("id"),
                Some(Json::Number(Number::U64(_) | Number::I64(_)))
            ) =>
        {
            Ok(())
        }
        _ => Err(format!("payload has no capteur.id: {}", r.json)),
    }
}

fn check_blob(conn: &Connection, id: i64, r: &ReceivedRow) -> Result<(), String> {
    let size: Option<i64> = conn
        .query_row(
            "SELECT length(video) FROM media WHERE id_media = ?1",
            [id],
            |row| row.get(0),
        )
        .map_err(|e| e.to_string())?;
    let Some(size) = size else {
        return if r.json.contains("\"video_data\": null") {
            Ok(())
        } else {
            Err("NULL video not sent as null".into())
        };
    };
    let path = match &r.blob {
        Some(p) => p.clone(),
        // Short BLOBs stay inline in the stored JSON.
        None => return check_inline_blob(conn, id, r),
    };
    let mut file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let blob = conn
        .blob_open(MAIN_DB, "media", "video", id, true)
        .map_err(|e| e.to_string())?;
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0usize;
    while offset < size as usize {
        let n = (size as usize - offset).min(a.len());
        blob.read_at_exact(&mut a[..n], offset)
            .map_err(|e| e.to_string())?;
        file.read_exact(&mut b[..n])
            .map_err(|e| format!("received BLOB shorter than {size} bytes: {e}"))?;
        if a[..n] != b[..n] {
            return Err(format!(
                "BLOB differs within bytes {offset}..{}",
                offset + n
            ));
        }
        offset += n;
    }
    if file.read(&mut a[..1]).map_err(|e| e.to_string())? != 0 {
        return Err(format!("received BLOB longer than {size} bytes"));
    }
    Ok(())
}

fn check_inline_blob(conn: &Connection, id: i64, r: &ReceivedRow) -> Result<(), String> {
    use base64::Engine;
    let bytes: Vec<u8> = conn
        .query_row("SELECT video FROM media WHERE id_media = ?1", [id], |row| {
            row.get(0)
        })
        .map_err(|e| e.to_string())?;
    let expected = format!(
        "\"video_data\": \"{}\"",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
    if r.json.contains(&expected) {
        Ok(())
    } else {
        Err("inline BLOB differs".into())
    }
}

/// Settings for a pass against `backend` over `db`, with state and logs under `dir`.
pub fn settings_for(
    db: &Path,
    backend: &str,
    dir: &Path,
    extra: &[(&str, &str)],
) -> Result<Settings, String> {
    let mut vars: Vec<(String, String)> = vec![
        ("LOCAL_DB_PATH".into(), db.display().to_string()),
        ("BACKEND_URL".into(), backend.into()),
        ("DEVICE_ID".into(), "demo-pi".into()),
        (
            "RELAIS_STATE_DIR".into(),
            dir.join("state").display().to_string(),
        ),
        (
            "RELAIS_LOG_DIR".into(),
            dir.join("log").display().to_string(),
        ),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env = move |k: &str| {
        vars.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    Settings::load(&env, None).map_err(|e| e.to_string())
}

/// Runs the demo; returns the exit code.
pub fn run() -> i32 {
    match demo() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo FAILED: {e}");
            1
        }
    }
}

const DEMO_EVENTS: usize = 500;
const DEMO_MEDIA: [Option<u64>; 4] = [
    Some(300 * 1024),
    None,
    Some(2 * 1024 * 1024),
    Some(64 * 1024 * 1024),
];

fn demo() -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("relais-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("log"))
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let db = dir.join("surveillance.db");
    println!(
        "1. application database {} ({DEMO_EVENTS} events, {} media, the largest {})",
        db.display(),
        DEMO_MEDIA.len(),
        human_bytes(64 << 20)
    );
    let conn = create_app_db(&db, false).map_err(|e| e.to_string())?;
    insert_events(&conn, DEMO_EVENTS).map_err(|e| e.to_string())?;
    for size in DEMO_MEDIA {
        insert_media(&conn, size).map_err(|e| e.to_string())?;
    }
    drop(conn);
    let server = EmbeddedServer::start(&dir.join("server"))
        .map_err(|e| format!("start relais-server: {e}"))?;
    println!(
        "2. relais-server listening on {}, store {}",
        server.url(),
        server.store_path().display()
    );
    let settings = settings_for(&db, &server.url(), &dir, &[])?;
    if let Some(w) = logging::init(&settings.log) {
        log::warn!("{w}");
    }
    let mut pusher = daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false)))?;
    println!("3. one pass:");
    let report = pusher.sync_once();
    println!("   {report}");
    let delivery = check_delivery(&db, &received::rows(&server)?, &settings.device_id)?;
    println!(
        "4. delivery check: {} rows expected, {} received, {} duplicates, {} missing, {} differing",
        delivery.expected,
        delivery.received,
        delivery.duplicates,
        delivery.missing.len(),
        delivery.mismatched.len()
    );
    if !delivery.is_exact() || !report.is_clean() {
        return Err(format!("{delivery:?}"));
    }
    let second = pusher.sync_once();
    println!("5. second pass: {second}");
    if second.pushed() != 0 {
        return Err("the second pass pushed rows again".into());
    }
    demo_pull(&server, &db, &dir)?;
    server.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "demo OK: every row arrived exactly once with identical bytes, and the configuration change was pulled"
    );
    Ok(())
}

const DEMO_TOKEN: &str = "demo-site-token-0001";

/// The admin API's body of device `i` of site `site_id`.
fn demo_device(site_id: i64, i: usize) -> String {
    format!(
        r#"{{"site_id": {site_id}, "ip": "192.168.1.{}", "name": "Projecteur {i}", "type": "projector",
            "driver": "pjlink", "driver_config": {{"pjlink": {{"password": "admin", "port": 4352}}}}}}"#,
        10 + i
    )
}

/// The configuration pull: a first pull writes the file, an unchanged configuration
/// writes nothing, a device added on the server is pulled and replaces the file.
fn demo_pull(server: &EmbeddedServer, db: &Path, dir: &Path) -> Result<(), String> {
    use crate::pull::{PullOutcome, Puller};
    let agent_config = dir.join("agent").join("config.json");
    std::fs::create_dir_all(dir.join("agent")).map_err(|e| e.to_string())?;
    let path = agent_config.display().to_string();
    let settings = settings_for(
        db,
        &server.url(),
        dir,
        &[("SITE_TOKEN", DEMO_TOKEN), ("AGENT_CONFIG", path.as_str())],
    )?;
    settings.register_secrets();
    let admin = crate::site_admin::SiteAdmin::new(&server.url());
    let site = admin.create_site(&format!(
        r#"{{"name": "Site Paris", "timezone": "Europe/Paris", "token": "{DEMO_TOKEN}"}}"#
    ))?;
    admin.add_device(&demo_device(site, 0))?;
    let first_hash = admin.served_hash(DEMO_TOKEN)?;
    println!("6. site {site} with 1 device created through the admin API; pull into {path}:");
    let mut puller = Puller::new(&settings)?;
    let steps = [
        ("first pull", false),
        ("pull again, nothing changed", false),
        ("device added on the server (2 devices), pull", true),
    ];
    let mut outcomes = Vec::new();
    for (what, change) in steps {
        if change {
            admin.add_device(&demo_device(site, 1))?;
        }
        let outcome = puller.pull_once();
        println!("   {what}: {}", describe_pull(&outcome));
        outcomes.push(outcome);
    }
    let on_disk = std::fs::read_to_string(&agent_config).map_err(|e| format!("{path}: {e}"))?;
    match outcomes.as_slice() {
        [
            PullOutcome::Updated { new_hash, .. },
            PullOutcome::Unchanged { .. },
            PullOutcome::Updated { devices: 2, .. },
        ] if *new_hash == first_hash && on_disk.contains("Projecteur 1") => Ok(()),
        other => Err(format!("unexpected configuration pull outcomes: {other:?}")),
    }
}

fn describe_pull(outcome: &crate::pull::PullOutcome) -> String {
    use crate::pull::PullOutcome;
    match outcome {
        PullOutcome::Unchanged { hash } => format!("up to date (hash {hash}), file not rewritten"),
        PullOutcome::Updated {
            old_hash,
            new_hash,
            devices,
        } => {
            format!(
                "changed {} -> {new_hash}, {devices} devices, file replaced atomically",
                old_hash.as_deref().unwrap_or("(none)")
            )
        }
        PullOutcome::Failed(e) => format!("FAILED: {e}"),
    }
}

/// A scratch directory for tests and benchmarks, unique within the process; removed by
/// the caller.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("relais-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}
