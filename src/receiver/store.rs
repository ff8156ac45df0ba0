//! SQLite storage of received rows (`data_dir/receiver.db`) and the placement
//! of their decoded BLOBs under `data_dir/blobs/<row id>.bin`.
//!
//! One connection behind a mutex: it serialises the idempotency check with
//! the insert (so two concurrent requests with the same key cannot both
//! store a row), and the receiver's write rate is far below what one SQLite
//! connection sustains.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use super::ReceivedRow;
use super::body::SpooledBlob;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS rows (
        id INTEGER PRIMARY KEY,
        endpoint TEXT,
        idempotency_key TEXT,
        json TEXT,
        blob_path TEXT,
        blob_len INTEGER,
        authorization TEXT,
        received_at TEXT
    );
    -- Not UNIQUE: with idempotency off, repeated keys are stored as new rows.
    CREATE INDEX IF NOT EXISTS rows_idempotency_key ON rows(idempotency_key);
    -- One device configuration per site token: the object without its hash, and the hash.
    CREATE TABLE IF NOT EXISTS configs (
        token TEXT PRIMARY KEY,
        json TEXT NOT NULL,
        hash TEXT NOT NULL,
        updated_at TEXT
    );
";

/// A row about to be stored.
#[derive(Debug)]
pub(crate) struct NewRow {
    pub endpoint: String,
    pub idempotency_key: Option<String>,
    pub json: String,
    pub blob: Option<SpooledBlob>,
    pub authorization: Option<String>,
}

/// What [`Store::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inserted {
    Stored(i64),
    /// A row with the same idempotency key already existed; nothing stored.
    Replay(i64),
}

#[derive(Debug)]
pub(crate) struct Store {
    conn: Mutex<Connection>,
    blobs_dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database and the BLOB directory.
    pub fn open(data_dir: &Path) -> Result<Store, String> {
        let blobs_dir = data_dir.join("blobs");
        std::fs::create_dir_all(&blobs_dir)
            .map_err(|e| format!("cannot create {}: {e}", blobs_dir.display()))?;
        let conn = Connection::open(data_dir.join("receiver.db")).map_err(|e| e.to_string())?;
        configure(&conn).map_err(|e| e.to_string())?;
        Ok(Store {
            conn: Mutex::new(conn),
            blobs_dir,
        })
    }

    /// A poisoned lock only means another request thread panicked; the
    /// connection itself is still consistent (SQLite rolls back), so go on.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the first row stored with this idempotency key, if any.
    pub fn find_key(&self, key: &str) -> rusqlite::Result<Option<i64>> {
        find_key(&self.conn(), key)
    }

    /// Stores `row`, moving its BLOB into place, unless `dedupe` is set and
    /// its idempotency key is already known.
    pub fn insert(&self, mut row: NewRow, dedupe: bool) -> Result<Inserted, String> {
        let mut conn = self.conn();
        if let (true, Some(key)) = (dedupe, &row.idempotency_key) {
            if let Some(id) = find_key(&conn, key).map_err(|e| e.to_string())? {
                return Ok(Inserted::Replay(id));
            }
        }
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        tx.execute(
            "INSERT INTO rows (endpoint, idempotency_key, json, authorization, received_at)
             VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            params![
                row.endpoint,
                row.idempotency_key,
                row.json,
                row.authorization
            ],
        )
        .map_err(|e| e.to_string())?;
        let id = tx.last_insert_rowid();
        if let Some(blob) = &mut row.blob {
            let dest = self.blobs_dir.join(format!("{id}.bin"));
            blob.file
                .persist(&dest)
                .map_err(|e| format!("cannot move blob to {}: {e}", dest.display()))?;
            let updated = tx.execute(
                "UPDATE rows SET blob_path = ?1, blob_len = ?2 WHERE id = ?3",
                params![dest.to_string_lossy(), blob.len as i64, id],
            );
            // The file is already in place: remove it again if the row is
            // not going to exist, so blobs/ only holds files of stored rows.
            if let Err(e) = updated.and_then(|_| tx.commit()) {
                let _ = std::fs::remove_file(&dest);
                return Err(e.to_string());
            }
            return Ok(Inserted::Stored(id));
        }
        tx.commit().map_err(|e| e.to_string())?;
        Ok(Inserted::Stored(id))
    }

    /// Every stored row, ordered by id.
    pub fn rows(&self) -> rusqlite::Result<Vec<ReceivedRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, endpoint, idempotency_key, json, blob_path, blob_len, authorization
             FROM rows ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ReceivedRow {
                id: r.get(0)?,
                endpoint: r.get(1)?,
                idempotency_key: r.get(2)?,
                json: r.get(3)?,
                blob: r.get::<_, Option<String>>(4)?.map(PathBuf::from),
                blob_len: r.get::<_, Option<i64>>(5)?.map(|n| n.max(0) as u64),
                authorization: r.get(6)?,
            })
        })?;
        rows.collect()
    }

    /// Stores (or replaces) the configuration of the site `token`.
    pub fn set_config(&self, token: &str, json: &str, hash: &str) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT INTO configs (token, json, hash, updated_at)
             VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             ON CONFLICT(token) DO UPDATE SET json = ?2, hash = ?3, updated_at = excluded.updated_at",
            params![token, json, hash],
        )?;
        Ok(())
    }

    /// The stored configuration of `token` and its hash.
    pub fn config(&self, token: &str) -> rusqlite::Result<Option<(String, String)>> {
        self.conn()
            .query_row(
                "SELECT json, hash FROM configs WHERE token = ?1",
                params![token],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // `PRAGMA journal_mode` answers with a row, so it is run as a query.
    let _mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.execute_batch("PRAGMA synchronous=NORMAL;")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)
}

fn find_key(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT id FROM rows WHERE idempotency_key = ?1 ORDER BY id LIMIT 1",
        params![key],
        |r| r.get(0),
    )
    .optional()
}
