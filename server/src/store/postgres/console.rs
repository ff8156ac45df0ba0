//! The console's tables on PostgreSQL (migration 0006), statement for statement those
//! of store/sqlite/console.rs: its sessions, and the media rows the device page lists.

use deadpool_postgres::Client;

use super::{Fault, exec, rows};
use crate::store::{MediaRow, NewSession, Session, SessionLife};

/// A session is dead once idle for `$2` seconds or older than `$3` (at `$1`).
const DELETE_DEAD_SESSIONS: &str = "DELETE FROM console_sessions
     WHERE last_seen_at <= $1::bigint - $2::bigint OR created_at <= $1::bigint - $3::bigint";
const INSERT_SESSION: &str = "INSERT INTO console_sessions
         (id_sha256, token_sha256, csrf, created_at, last_seen_at)
     VALUES ($1, $2, $3, $4, $4)";
/// Finding a live session and moving its last request is one statement, so no reader
/// can revive a session another request found dead.
const TOUCH_SESSION: &str = "UPDATE console_sessions SET last_seen_at = $2
     WHERE id_sha256 = $1 AND last_seen_at > $2::bigint - $3::bigint
         AND created_at > $2::bigint - $4::bigint
     RETURNING token_sha256, csrf";
const DELETE_SESSION: &str = "DELETE FROM console_sessions WHERE id_sha256 = $1";
/// `received_at` in the text the SQLite store writes.
const RECENT_MEDIA: &str = "SELECT id,
         to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
         media_size
     FROM received WHERE device_id = $1 AND endpoint = '/api/media'
     ORDER BY id DESC LIMIT $2";

pub async fn create_session(
    client: &mut Client,
    new: &NewSession,
    life: SessionLife,
) -> Result<(), Fault> {
    let tx = client.transaction().await?;
    exec(
        &tx,
        DELETE_DEAD_SESSIONS,
        &[&new.now, &life.idle_s, &life.absolute_s],
    )
    .await?;
    exec(
        &tx,
        INSERT_SESSION,
        &[&new.id_sha256, &new.token_sha256, &new.csrf, &new.now],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn session(
    client: &Client,
    id_sha256: &str,
    now: i64,
    life: SessionLife,
) -> Result<Option<Session>, Fault> {
    let found = rows(
        client,
        TOUCH_SESSION,
        &[&id_sha256, &now, &life.idle_s, &life.absolute_s],
    )
    .await?;
    Ok(found.first().map(|r| Session {
        token_sha256: r.get(0),
        csrf: r.get(1),
    }))
}

pub async fn delete_session(client: &Client, id_sha256: &str) -> Result<(), Fault> {
    exec(client, DELETE_SESSION, &[&id_sha256]).await?;
    Ok(())
}

pub async fn recent_media(
    client: &Client,
    device_id: &str,
    limit: u32,
) -> Result<Vec<MediaRow>, Fault> {
    Ok(rows(client, RECENT_MEDIA, &[&device_id, &i64::from(limit)])
        .await?
        .iter()
        .map(|r| MediaRow {
            id: r.get(0),
            received_at: r.get(1),
            size: r.get::<_, Option<i64>>(2).map(|s| s.max(0) as u64),
        })
        .collect())
}
