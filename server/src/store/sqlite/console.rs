//! The console's tables on SQLite (migration 0006): its sessions, and the media rows
//! the device page lists. The configuration history is written with the configuration
//! (site_config.rs).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::store::{MediaRow, NewSession, Session, SessionLife};

/// A session is dead once idle for `?2` seconds or older than `?3` (at `?1`).
const DELETE_DEAD_SESSIONS: &str = "DELETE FROM console_sessions
     WHERE last_seen_at <= ?1 - ?2 OR created_at <= ?1 - ?3";
const INSERT_SESSION: &str = "INSERT INTO console_sessions
         (id_sha256, token_sha256, csrf, created_at, last_seen_at)
     VALUES (?1, ?2, ?3, ?4, ?4)";
/// Finding a live session and moving its last request is one statement, so no reader
/// can revive a session another request found dead.
const TOUCH_SESSION: &str = "UPDATE console_sessions SET last_seen_at = ?2
     WHERE id_sha256 = ?1 AND last_seen_at > ?2 - ?3 AND created_at > ?2 - ?4
     RETURNING token_sha256, csrf";
const DELETE_SESSION: &str = "DELETE FROM console_sessions WHERE id_sha256 = ?1";
const RECENT_MEDIA: &str = "SELECT id, received_at, media_size FROM received
     WHERE device_id = ?1 AND endpoint = '/api/media' ORDER BY id DESC LIMIT ?2";

pub fn create_session(
    conn: &mut Connection,
    new: &NewSession,
    life: SessionLife,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        DELETE_DEAD_SESSIONS,
        params![new.now, life.idle_s, life.absolute_s],
    )?;
    tx.execute(
        INSERT_SESSION,
        params![new.id_sha256, new.token_sha256, new.csrf, new.now],
    )?;
    tx.commit()
}

pub fn session(
    conn: &mut Connection,
    id_sha256: &str,
    now: i64,
    life: SessionLife,
) -> rusqlite::Result<Option<Session>> {
    conn.query_row(
        TOUCH_SESSION,
        params![id_sha256, now, life.idle_s, life.absolute_s],
        |r| {
            Ok(Session {
                token_sha256: r.get(0)?,
                csrf: r.get(1)?,
            })
        },
    )
    .optional()
}

pub fn delete_session(conn: &mut Connection, id_sha256: &str) -> rusqlite::Result<()> {
    conn.execute(DELETE_SESSION, [id_sha256]).map(drop)
}

pub fn recent_media(
    conn: &mut Connection,
    device_id: &str,
    limit: u32,
) -> rusqlite::Result<Vec<MediaRow>> {
    let mut stmt = conn.prepare_cached(RECENT_MEDIA)?;
    let rows = stmt.query_map(params![device_id, limit], |r| {
        Ok(MediaRow {
            id: r.get(0)?,
            received_at: r.get(1)?,
            size: r.get::<_, Option<i64>>(2)?.map(|s| s.max(0) as u64),
        })
    })?;
    rows.collect()
}
