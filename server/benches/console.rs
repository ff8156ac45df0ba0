//! `cargo bench -p relais-server --bench console`: the fleet console's page times
//! (README, "Fleet console"). For each store (SQLite, then PostgreSQL when installed):
//! a real relais-server, 1,000 agents (device tokens) with their latest heartbeat and
//! 30 days of hourly history (720 `heartbeat_hours` and 720 `received_hours` rows
//! each), written in bulk in one transaction, directly with SQL; then a login and 50
//! timed `GET /` (the fleet page, 1,000 rows) and 50 `GET /devices/{id}`: p50, p99 and
//! bytes. The goal: the fleet page under 200 ms.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::{Server, StoreAt, StoreKind};
use relais_wire::heartbeat::{ConfigState, Heartbeat, Pass, TableState};

const DEVICES: usize = 1000;
const HOURS: i64 = 30 * 24;
const RUNS: usize = 50;
const GOAL_MS: f64 = 200.0;

fn main() -> ExitCode {
    let mut met = true;
    let kinds: Vec<(&str, StoreKind)> = std::iter::once(("sqlite", StoreKind::Sqlite))
        .chain(StoreKind::postgres().map(|k| ("postgres", k)))
        .collect();
    for (name, kind) in kinds {
        match bench(name, kind) {
            Ok(ok) => met &= ok,
            Err(e) => {
                eprintln!("console bench: {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if met {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn bench(name: &str, kind: StoreKind) -> Result<bool, String> {
    let server = Server::start_authenticated(kind, &[], "info");
    let admin = server.token(&["--admin", "bench"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let started = Instant::now();
    match &server.store {
        StoreAt::Sqlite(_) => fill_sqlite(&server, now).map_err(|e| format!("fill: {e}"))?,
        StoreAt::Postgres(url) => fill_postgres(url, now).map_err(|e| format!("fill: {e}"))?,
    }
    println!(
        "{name}: {DEVICES} agents, {} history rows written in {:.1} s",
        2 * DEVICES as i64 * HOURS,
        started.elapsed().as_secs_f64()
    );
    let (agent, cookie) = login(&server.url, &admin)?;
    let fleet = time(&agent, &format!("{}/", server.url), &cookie)?;
    let rows = fleet.2.matches("<tr data-device=").count();
    if rows != DEVICES {
        return Err(format!("the fleet page has {rows} rows, not {DEVICES}"));
    }
    let device = time(&agent, &format!("{}/devices/pi-0500", server.url), &cookie)?;
    for (page, (p50, p99, body)) in [("fleet page (GET /)", &fleet), ("device page", &device)] {
        println!(
            "{name}: {page}: p50 {p50:.1} ms, p99 {p99:.1} ms, {} bytes ({RUNS} runs)",
            body.len()
        );
    }
    let met = fleet.1 < GOAL_MS;
    println!(
        "{name}: goal p99 < {GOAL_MS} ms for the fleet page: {}",
        if met { "met" } else { "NOT met" }
    );
    Ok(met)
}

/// The heartbeat every agent last sent: two tables, one with a backlog.
fn heartbeat(i: usize, now: i64) -> Heartbeat {
    let table = |name: &str, backlog: u64| TableState {
        source: "/var/lib/app/events.db".into(),
        table: name.into(),
        backlog,
        failed: 0,
        oldest_unsent_s: (backlog > 0).then_some(30),
    };
    Heartbeat {
        device_id: Some(device_id(i)),
        agent_version: "0.1.0".into(),
        interval_s: 60,
        pass: Pass {
            at: now - (i as i64 % 300),
            ok: i % 50 != 0,
            pushed: 12,
            failed: 0,
            error: (i % 50 == 0).then(|| "push: backend answered 503".into()),
        },
        tables: vec![table("evenements", (i % 7) as u64), table("media", 0)],
        tables_truncated: 0,
        config: ConfigState {
            hash: Some(format!("{:032x}", i % 3)),
            last_pull_at: Some(now - 600),
            last_pull_ok: Some(true),
            error: None,
        },
        free_bytes: Some(8 << 30),
        media_lane: None,
    }
}

fn device_id(i: usize) -> String {
    format!("pi-{i:04}")
}

const INSERT_TOKEN: &str = "INSERT INTO tokens (kind, device_id, sha256, created_at)
     VALUES ('device', $1, $2, '2025-01-01T00:00:00Z')";
const INSERT_LATEST: &str = "INSERT INTO heartbeats_latest (device_id, received_at, json,
         pass_ok, backlog, failed, config_hash, agent_version, interval_s)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const INSERT_HOUR: &str = "INSERT INTO heartbeat_hours (device_id, hour, backlog, failed, pass_ok) VALUES ($1, $2, $3, 0, $4)";
const INSERT_RECEIVED: &str =
    "INSERT INTO received_hours (device_id, hour, rows) VALUES ($1, $2, $3)";

fn fill_sqlite(server: &Server, now: i64) -> rusqlite::Result<()> {
    let mut db = server.db();
    db.busy_timeout(Duration::from_secs(30))?;
    let tx = db.transaction()?;
    let last_hour = now - now.rem_euclid(3600);
    {
        let mut token = tx.prepare(INSERT_TOKEN)?;
        let mut latest = tx.prepare(INSERT_LATEST)?;
        let mut hour = tx.prepare(INSERT_HOUR)?;
        let mut received = tx.prepare(INSERT_RECEIVED)?;
        for i in 0..DEVICES {
            let id = device_id(i);
            let hb = heartbeat(i, now);
            token.execute(rusqlite::params![id, format!("bench-token-{i}")])?;
            latest.execute(rusqlite::params![
                id,
                now - 30,
                hb.clone().encode(),
                hb.pass.ok,
                hb.backlog_total() as i64,
                hb.failed_total() as i64,
                hb.config.hash,
                hb.agent_version,
                hb.interval_s as i64
            ])?;
            for h in 0..HOURS {
                let at = last_hour - h * 3600;
                hour.execute(rusqlite::params![id, at, h % 13, h % 97 != 0])?;
                received.execute(rusqlite::params![id, at, 40 + (h % 24) * 3])?;
            }
        }
    }
    tx.commit()
}

fn fill_postgres(url: &str, now: i64) -> Result<(), postgres::Error> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let mut tx = client.transaction()?;
    let last_hour = now - now.rem_euclid(3600);
    let (mut ids, mut jsons, mut ok, mut backlog, mut hashes) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..DEVICES {
        let hb = heartbeat(i, now);
        ids.push(device_id(i));
        ok.push(hb.pass.ok);
        backlog.push(hb.backlog_total() as i64);
        hashes.push(hb.config.hash.clone());
        jsons.push(hb.encode());
    }
    tx.execute(
        "INSERT INTO tokens (kind, device_id, sha256)
         SELECT 'device', d, 'bench-token-' || d FROM unnest($1::text[]) AS d",
        &[&ids],
    )?;
    tx.execute(
        "INSERT INTO heartbeats_latest (device_id, received_at, json, pass_ok, backlog, failed,
             config_hash, agent_version, interval_s)
         SELECT d, $2, j, o, b, 0, h, '0.1.0', 60
         FROM unnest($1::text[], $3::text[], $4::bool[], $5::bigint[], $6::text[]) AS u(d, j, o, b, h)",
        &[&ids, &(now - 30), &jsons, &ok, &backlog, &hashes],
    )?;
    // The hours of every device, set-based: 720,000 rows per table in one statement.
    tx.execute(
        "INSERT INTO heartbeat_hours (device_id, hour, backlog, failed, pass_ok)
         SELECT d, $2::bigint - h * 3600, h % 13, 0, h % 97 <> 0
         FROM unnest($1::text[]) AS d, generate_series(0, $3::bigint - 1) AS h",
        &[&ids, &last_hour, &HOURS],
    )?;
    tx.execute(
        "INSERT INTO received_hours (device_id, hour, rows)
         SELECT d, $2::bigint - h * 3600, 40 + (h % 24) * 3
         FROM unnest($1::text[]) AS d, generate_series(0, $3::bigint - 1) AS h",
        &[&ids, &last_hour, &HOURS],
    )?;
    tx.commit()
}

/// Logs in as a browser would; returns the client and the session cookie.
fn login(url: &str, admin: &str) -> Result<(ureq::Agent, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let cookie_of = |resp: &ureq::http::Response<ureq::Body>, name: &str| {
        resp.headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|c| {
                c.split(';')
                    .next()?
                    .strip_prefix(&format!("{name}="))
                    .map(str::to_string)
            })
    };
    let mut form = agent
        .get(format!("{url}/login"))
        .call()
        .map_err(|e| e.to_string())?;
    let login_cookie = cookie_of(&form, "relais_login_csrf").ok_or("no login cookie")?;
    let page = form
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    let at = page.find("name=\"csrf\" value=\"").ok_or("no csrf field")? + 19;
    let csrf = page[at..].split('"').next().unwrap_or_default();
    let resp = agent
        .post(format!("{url}/login"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Cookie", format!("relais_login_csrf={login_cookie}"))
        .send(format!("csrf={csrf}&token={admin}").as_bytes())
        .map_err(|e| e.to_string())?;
    let session = cookie_of(&resp, "relais_session").ok_or("login refused")?;
    Ok((agent, format!("relais_session={session}")))
}

/// `RUNS` GETs of `url` after one warm-up: p50 and p99 in ms, and the last body.
fn time(agent: &ureq::Agent, url: &str, cookie: &str) -> Result<(f64, f64, String), String> {
    let get = || -> Result<String, String> {
        let mut resp = agent
            .get(url)
            .header("Cookie", cookie)
            .call()
            .map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("{url}: {}", resp.status()));
        }
        resp.body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| e.to_string())
    };
    let mut body = get()?;
    let mut ms = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        body = get()?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99), body))
}
