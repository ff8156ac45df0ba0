//! What the server knows of its agents, on SQLite: the named queries over
//! `heartbeats_latest`, `heartbeat_hours`, `received_hours` and `config_pulls`
//! (migration 0005). The same statements, `$n` for `?n`, are PostgreSQL's
//! (store/postgres/fleet.rs).

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::store::fleet::{DeviceHistory, FleetEntry, HourPoint, hour_of, latest, sql_u64};
use relais_wire::heartbeat::Heartbeat;

const UPSERT_LATEST: &str = "INSERT INTO heartbeats_latest (device_id, received_at, json,
         pass_ok, backlog, failed, config_hash, agent_version, interval_s)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
     ON CONFLICT (device_id) DO UPDATE SET received_at = excluded.received_at,
         json = excluded.json, pass_ok = excluded.pass_ok, backlog = excluded.backlog,
         failed = excluded.failed, config_hash = excluded.config_hash,
         agent_version = excluded.agent_version, interval_s = excluded.interval_s";
const UPSERT_HOUR: &str = "INSERT INTO heartbeat_hours (device_id, hour, backlog, failed, pass_ok)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (device_id, hour) DO UPDATE SET backlog = excluded.backlog,
         failed = excluded.failed, pass_ok = excluded.pass_ok";
const ADD_RECEIVED: &str = "INSERT INTO received_hours (device_id, hour, rows) VALUES (?1, ?2, ?3)
     ON CONFLICT (device_id, hour) DO UPDATE SET rows = received_hours.rows + excluded.rows";
const PRUNE_HEARTBEAT_HOURS: &str = "DELETE FROM heartbeat_hours WHERE hour < ?1";
const PRUNE_RECEIVED_HOURS: &str = "DELETE FROM received_hours WHERE hour < ?1";
/// Nothing when the site token is unknown: the pull was answered 401 anyway.
const RECORD_PULL: &str = "INSERT INTO config_pulls (device_id, site_id, hash, pulled_at)
     SELECT ?1, id, ?3, ?4 FROM sites WHERE token_sha256 = ?2
     ON CONFLICT (device_id) DO UPDATE SET site_id = excluded.site_id,
         hash = excluded.hash, pulled_at = excluded.pulled_at";
/// Every known device with its latest heartbeat, its last pull and today's rows, in
/// one statement (the console's fleet page with a thousand devices).
pub const FLEET: &str = "WITH known AS (
         SELECT device_id FROM tokens
         WHERE kind = 'device' AND revoked_at IS NULL AND device_id IS NOT NULL
         UNION SELECT device_id FROM heartbeats_latest),
     today AS (
         SELECT device_id, SUM(rows) AS rows FROM received_hours
         WHERE hour >= ?1 GROUP BY device_id)
     SELECT k.device_id, h.received_at, h.json, COALESCE(t.rows, 0), p.site_id, p.hash,
         p.pulled_at
     FROM known k
     LEFT JOIN heartbeats_latest h ON h.device_id = k.device_id
     LEFT JOIN config_pulls p ON p.device_id = k.device_id
     LEFT JOIN today t ON t.device_id = k.device_id
     ORDER BY k.device_id";
const LATEST: &str = "SELECT received_at, json FROM heartbeats_latest WHERE device_id = ?1";
pub const HOURS: &str = "WITH hours AS (
         SELECT hour FROM heartbeat_hours WHERE device_id = ?1 AND hour >= ?2
         UNION SELECT hour FROM received_hours WHERE device_id = ?1 AND hour >= ?2)
     SELECT hours.hour, COALESCE(r.rows, 0), b.backlog, b.failed, b.pass_ok
     FROM hours
     LEFT JOIN received_hours r ON r.device_id = ?1 AND r.hour = hours.hour
     LEFT JOIN heartbeat_hours b ON b.device_id = ?1 AND b.hour = hours.hour
     ORDER BY hours.hour";

pub fn record_heartbeat(
    conn: &mut Connection,
    device_id: &str,
    received_at: i64,
    hb: &Heartbeat,
    json: &str,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (backlog, failed) = (sql_u64(hb.backlog_total()), sql_u64(hb.failed_total()));
    tx.execute(
        UPSERT_LATEST,
        params![
            device_id,
            received_at,
            json,
            hb.pass.ok,
            backlog,
            failed,
            hb.config.hash,
            hb.agent_version,
            sql_u64(hb.interval_s)
        ],
    )?;
    tx.execute(
        UPSERT_HOUR,
        params![device_id, hour_of(received_at), backlog, failed, hb.pass.ok],
    )?;
    tx.commit()
}

pub fn fleet(conn: &mut Connection, today_start: i64) -> rusqlite::Result<Vec<FleetEntry>> {
    let mut stmt = conn.prepare(FLEET)?;
    let rows = stmt.query_map([today_start], |r| {
        let json: Option<String> = r.get(2)?;
        Ok(FleetEntry {
            device_id: r.get(0)?,
            heartbeat: json.as_deref().map(stored_heartbeat).transpose()?,
            rows_today: r.get::<_, i64>(3)?.max(0) as u64,
            site_id: r.get(4)?,
            pulled_hash: r.get(5)?,
            pulled_at: r.get(6)?,
            last_contact: latest(r.get(1)?, r.get(6)?),
        })
    })?;
    rows.collect()
}

pub fn device_history(
    conn: &mut Connection,
    device_id: &str,
    since: i64,
) -> rusqlite::Result<DeviceHistory> {
    // One read transaction: the latest heartbeat and the hours as of one moment.
    let tx = conn.transaction()?;
    let latest = tx
        .query_row(LATEST, [device_id], |r| {
            let json: String = r.get(1)?;
            Ok((r.get(0)?, stored_heartbeat(&json)?))
        })
        .optional()?;
    let hours = {
        let mut stmt = tx.prepare(HOURS)?;
        let rows = stmt.query_map(params![device_id, since], hour_point)?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    tx.commit()?;
    Ok(DeviceHistory { latest, hours })
}

pub fn add_received(conn: &mut Connection, counts: &[(String, i64, u64)]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare(ADD_RECEIVED)?;
        for (device_id, hour, rows) in counts {
            stmt.execute(params![device_id, hour, sql_u64(*rows)])?;
        }
    }
    tx.commit()
}

pub fn prune_history(conn: &mut Connection, before: i64) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = tx.execute(PRUNE_HEARTBEAT_HOURS, [before])?
        + tx.execute(PRUNE_RECEIVED_HOURS, [before])?;
    tx.commit()?;
    Ok(n as u64)
}

pub fn record_config_pull(
    conn: &mut Connection,
    device_id: &str,
    site_token_sha256: &str,
    hash: &str,
    pulled_at: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        RECORD_PULL,
        params![device_id, site_token_sha256, hash, pulled_at],
    )?;
    Ok(())
}

fn hour_point(r: &Row<'_>) -> rusqlite::Result<HourPoint> {
    Ok(HourPoint {
        hour: r.get(0)?,
        rows_received: r.get::<_, i64>(1)?.max(0) as u64,
        backlog: r.get::<_, Option<i64>>(2)?.map(|n| n.max(0) as u64),
        failed: r.get::<_, Option<i64>>(3)?.map(|n| n.max(0) as u64),
        pass_ok: r.get(4)?,
    })
}

/// A stored heartbeat's JSON; one that no longer parses (edited by hand) is an error
/// naming it.
fn stored_heartbeat(json: &str) -> rusqlite::Result<Heartbeat> {
    Heartbeat::parse(json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            2,
            rusqlite::types::Type::Text,
            format!("heartbeats_latest.json: {e}").into(),
        )
    })
}
