//! Resumable uploads on SQLite: the named queries over `uploads` (migration 0004).
//! Who may append is decided by conditional updates ([`CLAIM`], [`SETTLE`]), so the
//! same statements hold for PostgreSQL (store/postgres/uploads.rs) and a fleet.

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::store::{Creation, Upload};

const COLUMNS: &str = "id, device_id, idempotency_key, endpoint, field, json, sha256, length,
     upload_offset, expires_at, row_id";

const STORED_ROW: &str = "SELECT id FROM received WHERE device_id = ?1 AND idempotency_key = ?2";
const DELETE_EXPIRED_OF_KEY: &str = "DELETE FROM uploads
     WHERE device_id = ?1 AND idempotency_key = ?2 AND expires_at <= ?3
       AND (claimed_until IS NULL OR claimed_until <= ?3)
     RETURNING id";
const INSERT: &str = "INSERT INTO uploads (id, device_id, idempotency_key, endpoint, field,
         json, sha256, length, expires_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
     ON CONFLICT (device_id, idempotency_key) DO NOTHING";
const CLAIM: &str = "UPDATE uploads SET claimed_until = ?4
     WHERE id = ?1 AND upload_offset = ?2 AND expires_at > ?3 AND row_id IS NULL
       AND (claimed_until IS NULL OR claimed_until <= ?3)";
const SETTLE: &str = "UPDATE uploads SET upload_offset = ?3, expires_at = ?4, claimed_until = NULL
     WHERE id = ?1 AND upload_offset = ?2";
const COMPLETE: &str = "UPDATE uploads SET row_id = ?2 WHERE id = ?1";
const REMOVE: &str = "DELETE FROM uploads WHERE id = ?1";
const EXPIRE: &str = "DELETE FROM uploads
     WHERE expires_at <= ?1 AND (claimed_until IS NULL OR claimed_until <= ?1)
     RETURNING id, row_id IS NOT NULL";

fn select_by_key() -> String {
    format!("SELECT {COLUMNS} FROM uploads WHERE device_id = ?1 AND idempotency_key = ?2")
}

fn select_live() -> String {
    format!("SELECT {COLUMNS} FROM uploads WHERE id = ?1 AND expires_at > ?2")
}

/// A row of [`COLUMNS`].
fn upload(r: &Row<'_>) -> rusqlite::Result<Upload> {
    Ok(Upload {
        id: r.get(0)?,
        device_id: r.get(1)?,
        idempotency_key: r.get(2)?,
        endpoint: r.get(3)?,
        field: r.get(4)?,
        json: r.get(5)?,
        sha256: r.get(6)?,
        length: r.get::<_, i64>(7)? as u64,
        offset: r.get::<_, i64>(8)? as u64,
        expires_at: r.get(9)?,
        row_id: r.get(10)?,
    })
}

/// In one IMMEDIATE transaction: no other writer between the statements.
pub fn create(conn: &mut Connection, u: &Upload, now: i64) -> rusqlite::Result<Creation> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let stored: Option<i64> = tx
        .query_row(STORED_ROW, params![u.device_id, u.idempotency_key], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(id) = stored {
        return Ok(Creation::Stored(id));
    }
    let expired: Option<String> = tx
        .query_row(
            DELETE_EXPIRED_OF_KEY,
            params![u.device_id, u.idempotency_key, now],
            |r| r.get(0),
        )
        .optional()?;
    let inserted = tx.execute(
        INSERT,
        params![
            u.id,
            u.device_id,
            u.idempotency_key,
            u.endpoint,
            u.field,
            u.json,
            u.sha256,
            u.length as i64,
            u.expires_at
        ],
    )? == 1;
    let creation = if inserted {
        Creation::New {
            upload: u.clone(),
            expired,
        }
    } else {
        Creation::Existing(tx.query_row(
            &select_by_key(),
            params![u.device_id, u.idempotency_key],
            upload,
        )?)
    };
    tx.commit()?;
    Ok(creation)
}

pub fn live(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<Option<Upload>> {
    conn.query_row(&select_live(), params![id, now], upload)
        .optional()
}

pub fn claim(
    conn: &Connection,
    id: &str,
    offset: u64,
    now: i64,
    until: i64,
) -> rusqlite::Result<bool> {
    Ok(conn.execute(CLAIM, params![id, offset as i64, now, until])? == 1)
}

pub fn settle(
    conn: &Connection,
    id: &str,
    from: u64,
    to: u64,
    expires_at: i64,
) -> rusqlite::Result<bool> {
    Ok(conn.execute(SETTLE, params![id, from as i64, to as i64, expires_at])? == 1)
}

pub fn complete(conn: &Connection, id: &str, row_id: i64) -> rusqlite::Result<()> {
    conn.execute(COMPLETE, params![id, row_id]).map(drop)
}

pub fn remove(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute(REMOVE, [id]).map(drop)
}

pub fn expire(conn: &Connection, now: i64) -> rusqlite::Result<Vec<(String, bool)>> {
    conn.prepare(EXPIRE)?
        .query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect()
}
