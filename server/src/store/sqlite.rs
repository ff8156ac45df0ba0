//! The embedded store: one SQLite database file (WAL, `synchronous=FULL`: a 201 tells
//! the device it may forget the row, so the commit must survive a power cut). One
//! connection behind a mutex, used from `spawn_blocking`: SQLite has a single writer
//! anyway, and a push's insert is a few hundred microseconds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{NewPush, Store, StoreError, Stored};

/// Versioned migrations, applied in order, each recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "init",
    include_str!("../../migrations/sqlite/0001_init.sql"),
)];

#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file; does not migrate.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let fail = |e: rusqlite::Error| StoreError::Failed(format!("{}: {e}", path.display()));
        let conn = Connection::open(path).map_err(fail)?;
        // `PRAGMA journal_mode` answers with a row, so it is run as a query.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(fail)?;
        conn.execute_batch("PRAGMA synchronous=FULL;")
            .map_err(fail)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Applies the migrations not applied yet; returns their versions.
    pub fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        migrate(&mut self.lock()).map_err(|e| StoreError::Failed(format!("migration: {e}")))
    }

    /// A poisoned lock only means another thread panicked while holding it; SQLite
    /// rolled its transaction back, so the connection is consistent.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&mut store.lock()))
            .await
            .map_err(|e| StoreError::Failed(format!("worker: {e}")))?
            .map_err(store_error)
    }
}

impl Store for SqliteStore {
    async fn store_push(&self, push: NewPush) -> Result<Stored, StoreError> {
        self.blocking(move |conn| insert(conn, &push)).await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.blocking(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

/// A database still locked after the busy timeout (another process holds it) is
/// transient, like an unreachable server; anything else is a failure.
fn store_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Unreachable(e.to_string())
        }
        _ => StoreError::Failed(e.to_string()),
    }
}

/// The path of a `sqlite:PATH` (or `sqlite://PATH`) store URL.
pub fn path_of(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    (!rest.is_empty()).then(|| PathBuf::from(rest))
}

fn insert(conn: &mut Connection, p: &NewPush) -> rusqlite::Result<Stored> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let media = p.media.as_ref();
    let inserted: Option<i64> = tx
        .query_row(
            "INSERT INTO received (device_id, endpoint, idempotency_key, local_id, received_at,
                 body, body_sha256, media_path, media_size, media_sha256)
             VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (device_id, idempotency_key) DO NOTHING
             RETURNING id",
            params![
                p.device_id,
                p.endpoint,
                p.idempotency_key,
                p.local_id,
                p.body,
                p.body_sha256,
                media.map(|m| &m.path),
                media.map(|m| m.size as i64),
                media.map(|m| &m.sha256),
            ],
            |r| r.get(0),
        )
        .optional()?;
    let stored = match inserted {
        Some(id) => Stored::New(id),
        None => {
            let (id, sha): (i64, String) = tx.query_row(
                "SELECT id, body_sha256 FROM received WHERE device_id = ?1 AND idempotency_key = ?2",
                params![p.device_id, p.idempotency_key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if sha == p.body_sha256 {
                Stored::Replay(id)
            } else {
                Stored::Mismatch(id)
            }
        }
    };
    tx.commit()?;
    Ok(stored)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<Vec<i64>> {
    // IMMEDIATE: a second server starting on the same file waits instead of applying
    // the same migration twice.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
    )?;
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let done: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
            [version],
            |r| r.get(0),
        )?;
        if done {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at)
             VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            params![version, name],
        )?;
        applied.push(version);
    }
    tx.commit()?;
    Ok(applied)
}
