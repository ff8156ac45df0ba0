//! What the server knows of its agents, on PostgreSQL: the named queries over
//! `heartbeats_latest`, `heartbeat_hours`, `received_hours` and `config_pulls`
//! (migration 0005), statement for statement those of store/sqlite/fleet.rs. The
//! received rows' flush is one additive UPSERT over arrays, so servers sharing the
//! database add up.

use deadpool_postgres::{Client, GenericClient};
use relais_wire::heartbeat::Heartbeat;
use tokio_postgres::Row;

use super::{Fault, exec, first, rows};
use crate::store::StoreError;
use crate::store::fleet::{DeviceHistory, FleetEntry, HourPoint, hour_of, latest, sql_u64};

const UPSERT_LATEST: &str = "INSERT INTO heartbeats_latest (device_id, received_at, json,
         pass_ok, backlog, failed, config_hash, agent_version, interval_s)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
     ON CONFLICT (device_id) DO UPDATE SET received_at = excluded.received_at,
         json = excluded.json, pass_ok = excluded.pass_ok, backlog = excluded.backlog,
         failed = excluded.failed, config_hash = excluded.config_hash,
         agent_version = excluded.agent_version, interval_s = excluded.interval_s";
const UPSERT_HOUR: &str = "INSERT INTO heartbeat_hours (device_id, hour, backlog, failed, pass_ok)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (device_id, hour) DO UPDATE SET backlog = excluded.backlog,
         failed = excluded.failed, pass_ok = excluded.pass_ok";
/// The counts come from a map: no (device, hour) twice in one statement, which
/// `ON CONFLICT DO UPDATE` refuses.
const ADD_RECEIVED: &str = "INSERT INTO received_hours (device_id, hour, rows)
     SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
     ON CONFLICT (device_id, hour) DO UPDATE SET rows = received_hours.rows + excluded.rows";
const PRUNE_HEARTBEAT_HOURS: &str = "DELETE FROM heartbeat_hours WHERE hour < $1";
const PRUNE_RECEIVED_HOURS: &str = "DELETE FROM received_hours WHERE hour < $1";
const RECORD_PULL: &str = "INSERT INTO config_pulls (device_id, site_id, hash, pulled_at)
     SELECT $1, id, $3, $4 FROM sites WHERE token_sha256 = $2
     ON CONFLICT (device_id) DO UPDATE SET site_id = excluded.site_id,
         hash = excluded.hash, pulled_at = excluded.pulled_at";
const FLEET: &str = "WITH known AS (
         SELECT device_id FROM tokens
         WHERE kind = 'device' AND revoked_at IS NULL AND device_id IS NOT NULL
         UNION SELECT device_id FROM heartbeats_latest),
     today AS (
         SELECT device_id, SUM(rows)::bigint AS rows FROM received_hours
         WHERE hour >= $1 GROUP BY device_id)
     SELECT k.device_id, h.received_at, h.json, COALESCE(t.rows, 0), p.site_id, p.hash,
         p.pulled_at
     FROM known k
     LEFT JOIN heartbeats_latest h ON h.device_id = k.device_id
     LEFT JOIN config_pulls p ON p.device_id = k.device_id
     LEFT JOIN today t ON t.device_id = k.device_id
     ORDER BY k.device_id";
const LATEST: &str = "SELECT received_at, json FROM heartbeats_latest WHERE device_id = $1";
const HOURS: &str = "WITH hours AS (
         SELECT hour FROM heartbeat_hours WHERE device_id = $1 AND hour >= $2
         UNION SELECT hour FROM received_hours WHERE device_id = $1 AND hour >= $2)
     SELECT hours.hour, COALESCE(r.rows, 0), b.backlog, b.failed, b.pass_ok
     FROM hours
     LEFT JOIN received_hours r ON r.device_id = $1 AND r.hour = hours.hour
     LEFT JOIN heartbeat_hours b ON b.device_id = $1 AND b.hour = hours.hour
     ORDER BY hours.hour";

pub async fn record_heartbeat(
    c: &mut Client,
    device_id: &str,
    received_at: i64,
    hb: &Heartbeat,
    json: &str,
) -> Result<(), Fault> {
    let (backlog, failed) = (sql_u64(hb.backlog_total()), sql_u64(hb.failed_total()));
    let interval_s = sql_u64(hb.interval_s);
    let tx = c.transaction().await?;
    exec(
        &tx,
        UPSERT_LATEST,
        &[
            &device_id,
            &received_at,
            &json,
            &hb.pass.ok,
            &backlog,
            &failed,
            &hb.config.hash,
            &hb.agent_version,
            &interval_s,
        ],
    )
    .await?;
    let hour = hour_of(received_at);
    exec(
        &tx,
        UPSERT_HOUR,
        &[&device_id, &hour, &backlog, &failed, &hb.pass.ok],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn fleet(c: &impl GenericClient, today_start: i64) -> Result<Vec<FleetEntry>, Fault> {
    rows(c, FLEET, &[&today_start])
        .await?
        .iter()
        .map(|r| {
            let json: Option<String> = r.get(2);
            let pulled_at: Option<i64> = r.get(6);
            Ok(FleetEntry {
                device_id: r.get(0),
                last_contact: latest(r.get(1), pulled_at),
                heartbeat: json.as_deref().map(stored_heartbeat).transpose()?,
                rows_today: r.get::<_, i64>(3).max(0) as u64,
                site_id: r.get(4),
                pulled_hash: r.get(5),
                pulled_at,
            })
        })
        .collect()
}

pub async fn device_history(
    c: &mut Client,
    device_id: &str,
    since: i64,
) -> Result<DeviceHistory, Fault> {
    // REPEATABLE READ: the latest heartbeat and the hours as of one moment.
    let tx = c
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let latest = match first(&tx, LATEST, &[&device_id]).await? {
        Some(r) => {
            let json: String = r.get(1);
            Some((r.get(0), stored_heartbeat(&json)?))
        }
        None => None,
    };
    let hours = rows(&tx, HOURS, &[&device_id, &since])
        .await?
        .iter()
        .map(hour_point)
        .collect();
    tx.commit().await?;
    Ok(DeviceHistory { latest, hours })
}

pub async fn add_received(
    c: &impl GenericClient,
    counts: &[(String, i64, u64)],
) -> Result<(), Fault> {
    let devices: Vec<&str> = counts.iter().map(|(d, _, _)| d.as_str()).collect();
    let hours: Vec<i64> = counts.iter().map(|&(_, h, _)| h).collect();
    let added: Vec<i64> = counts.iter().map(|&(_, _, n)| sql_u64(n)).collect();
    exec(c, ADD_RECEIVED, &[&devices, &hours, &added]).await?;
    Ok(())
}

pub async fn prune_history(c: &mut Client, before: i64) -> Result<u64, Fault> {
    let tx = c.transaction().await?;
    let n = exec(&tx, PRUNE_HEARTBEAT_HOURS, &[&before]).await?
        + exec(&tx, PRUNE_RECEIVED_HOURS, &[&before]).await?;
    tx.commit().await?;
    Ok(n)
}

pub async fn record_config_pull(
    c: &impl GenericClient,
    device_id: &str,
    site_token_sha256: &str,
    hash: &str,
    pulled_at: i64,
) -> Result<(), Fault> {
    exec(
        c,
        RECORD_PULL,
        &[&device_id, &site_token_sha256, &hash, &pulled_at],
    )
    .await?;
    Ok(())
}

fn hour_point(r: &Row) -> HourPoint {
    HourPoint {
        hour: r.get(0),
        rows_received: r.get::<_, i64>(1).max(0) as u64,
        backlog: r.get::<_, Option<i64>>(2).map(|n| n.max(0) as u64),
        failed: r.get::<_, Option<i64>>(3).map(|n| n.max(0) as u64),
        pass_ok: r.get(4),
    }
}

/// A stored heartbeat's JSON; one that no longer parses (edited by hand) is an error
/// naming it.
fn stored_heartbeat(json: &str) -> Result<Heartbeat, Fault> {
    Heartbeat::parse(json)
        .map_err(|e| Fault::Store(StoreError::Failed(format!("heartbeats_latest.json: {e}"))))
}
