//! Resumable uploads on PostgreSQL: the named queries over `uploads` (migration 0004),
//! statement for statement those of store/sqlite/uploads.rs. A racing creation's insert
//! waits on the unique index for the other's commit, then does nothing and reads it.

use deadpool_postgres::{Client, GenericClient};
use tokio_postgres::Row;

use super::{Fault, exec, first, rows};
use crate::store::{Creation, Upload};

macro_rules! columns {
    () => {
        "id, device_id, idempotency_key, endpoint, field, json, sha256, length,
         upload_offset, expires_at, row_id"
    };
}

const STORED_ROW: &str = "SELECT id FROM received WHERE device_id = $1 AND idempotency_key = $2";
const DELETE_EXPIRED_OF_KEY: &str = "DELETE FROM uploads
     WHERE device_id = $1 AND idempotency_key = $2 AND expires_at <= $3
       AND (claimed_until IS NULL OR claimed_until <= $3)
     RETURNING id";
const INSERT: &str = "INSERT INTO uploads (id, device_id, idempotency_key, endpoint, field,
         json, sha256, length, expires_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
     ON CONFLICT (device_id, idempotency_key) DO NOTHING";
const SELECT_BY_KEY: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM uploads WHERE device_id = $1 AND idempotency_key = $2"
);
const SELECT_LIVE: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM uploads WHERE id = $1 AND expires_at > $2"
);
const CLAIM: &str = "UPDATE uploads SET claimed_until = $4
     WHERE id = $1 AND upload_offset = $2 AND expires_at > $3 AND row_id IS NULL
       AND (claimed_until IS NULL OR claimed_until <= $3)";
const SETTLE: &str = "UPDATE uploads SET upload_offset = $3, expires_at = $4, claimed_until = NULL
     WHERE id = $1 AND upload_offset = $2";
const COMPLETE: &str = "UPDATE uploads SET row_id = $2 WHERE id = $1";
const REMOVE: &str = "DELETE FROM uploads WHERE id = $1";
const EXPIRE: &str = "DELETE FROM uploads
     WHERE expires_at <= $1 AND (claimed_until IS NULL OR claimed_until <= $1)
     RETURNING id, row_id IS NOT NULL";

/// A row of `columns!()`.
fn upload(r: &Row) -> Upload {
    Upload {
        id: r.get(0),
        device_id: r.get(1),
        idempotency_key: r.get(2),
        endpoint: r.get(3),
        field: r.get(4),
        json: r.get(5),
        sha256: r.get(6),
        length: r.get::<_, i64>(7) as u64,
        offset: r.get::<_, i64>(8) as u64,
        expires_at: r.get(9),
        row_id: r.get(10),
    }
}

pub async fn create(c: &mut Client, u: &Upload, now: i64) -> Result<Creation, Fault> {
    let tx = c.transaction().await?;
    if let Some(row) = first(&tx, STORED_ROW, &[&u.device_id, &u.idempotency_key]).await? {
        return Ok(Creation::Stored(row.get(0)));
    }
    let expired = first(
        &tx,
        DELETE_EXPIRED_OF_KEY,
        &[&u.device_id, &u.idempotency_key, &now],
    )
    .await?
    .map(|r| r.get(0));
    let length = u.length as i64;
    let inserted = exec(
        &tx,
        INSERT,
        &[
            &u.id,
            &u.device_id,
            &u.idempotency_key,
            &u.endpoint,
            &u.field,
            &u.json,
            &u.sha256,
            &length,
            &u.expires_at,
        ],
    )
    .await?
        == 1;
    let creation = if inserted {
        Creation::New {
            upload: u.clone(),
            expired,
        }
    } else {
        let row = first(&tx, SELECT_BY_KEY, &[&u.device_id, &u.idempotency_key])
            .await?
            .ok_or_else(|| {
                crate::store::StoreError::Failed("uploads: a key neither inserted nor found".into())
            })?;
        Creation::Existing(upload(&row))
    };
    tx.commit().await?;
    Ok(creation)
}

pub async fn live(c: &impl GenericClient, id: &str, now: i64) -> Result<Option<Upload>, Fault> {
    Ok(first(c, SELECT_LIVE, &[&id, &now])
        .await?
        .map(|r| upload(&r)))
}

pub async fn claim(
    c: &impl GenericClient,
    id: &str,
    offset: u64,
    now: i64,
    until: i64,
) -> Result<bool, Fault> {
    let offset = offset as i64;
    Ok(exec(c, CLAIM, &[&id, &offset, &now, &until]).await? == 1)
}

pub async fn settle(
    c: &impl GenericClient,
    id: &str,
    from: u64,
    to: u64,
    expires_at: i64,
) -> Result<bool, Fault> {
    let (from, to) = (from as i64, to as i64);
    Ok(exec(c, SETTLE, &[&id, &from, &to, &expires_at]).await? == 1)
}

pub async fn complete(c: &impl GenericClient, id: &str, row_id: i64) -> Result<(), Fault> {
    exec(c, COMPLETE, &[&id, &row_id]).await?;
    Ok(())
}

pub async fn remove(c: &impl GenericClient, id: &str) -> Result<(), Fault> {
    exec(c, REMOVE, &[&id]).await?;
    Ok(())
}

pub async fn expire(c: &impl GenericClient, now: i64) -> Result<Vec<(String, bool)>, Fault> {
    Ok(rows(c, EXPIRE, &[&now])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
