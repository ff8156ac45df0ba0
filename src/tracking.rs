//! The agent's own state database: the `sync_tracking` table of the contract (which
//! local row reached the backend, under which remote id), the per-table high-water marks
//! that keep an idle cycle cheap, and a small key-value table for the last cycle's
//! outcome. The application's database is never written.
//!
//! Every state change is an SQLite transaction. The database runs in WAL mode with
//! `synchronous = NORMAL`: a power cut may forget the last few commits, never corrupt
//! the file, and a forgotten `success` only means the row is sent again under the same
//! idempotency key.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::atomic_file;
use crate::clock::{self, RetryClock};
use crate::source::FileId;

pub const STATE_DB_NAME: &str = "relais.db";

/// A failure of the state database.
#[derive(Debug)]
pub enum TrackingError {
    Open(PathBuf, String),
    /// A file is there but is no usable state database (`what` it is instead): an
    /// operator matter, since relais cannot tell which rows were already sent.
    Bad(PathBuf, &'static str),
    Sql(&'static str, rusqlite::Error),
    /// A table yields an id both as an integer and as text with the same digits (a column
    /// without a declared type): both would have the same idempotency key.
    TwinIds {
        table: String,
        id: String,
    },
}

impl fmt::Display for TrackingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackingError::Open(p, e) => write!(f, "state database {}: {e}", p.display()),
            TrackingError::Bad(p, what) => write!(
                f,
                "state database {} {what}: relais cannot tell which rows were sent, so it sends \
                 none and moves nothing; `relais state reset` sets it aside and starts afresh \
                 (safe with an idempotent backend; with another, every row still in the \
                 application's database is sent again)",
                p.display()
            ),
            TrackingError::Sql(what, e) => {
                let hint = match e.sqlite_error_code() {
                    Some(rusqlite::ErrorCode::DiskFull) => " (the disk is full)",
                    Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen) => {
                        " (is the state directory writable?)"
                    }
                    _ => "",
                };
                write!(f, "state database: cannot {what}: {e}{hint}")
            }
            TrackingError::TwinIds { table, id } => write!(
                f,
                "table {table}: local_id {id} occurs both as the integer {id} and as the text '{id}' (a column without a declared type?); their idempotency keys would be the same and the backend would drop one, so the table is not pushed further: make the query yield one type, e.g. CAST(id AS INTEGER) AS local_id"
            ),
        }
    }
}

impl std::error::Error for TrackingError {}

fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> TrackingError {
    move |e| TrackingError::Sql(what, e)
}

/// A row acknowledged by the backend, waiting to be recorded.
#[derive(Debug, Clone)]
pub struct Acked {
    pub table: String,
    pub local_id: Value,
    pub remote_id: Option<Value>,
    pub bytes: u64,
}

/// A media row's upload under way, as [`Tracking::upload`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedUpload {
    pub location: String,
    pub length: u64,
    pub sha256: String,
    pub offset: u64,
}

/// A media upload under way, as `relais status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadUnderWay {
    pub source: String,
    pub table: String,
    pub local_id: Value,
    /// Bytes the server confirmed.
    pub offset: u64,
    pub length: u64,
}

/// Counts for `relais status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    pub source: String,
    pub table: String,
    pub status: String,
    pub rows: u64,
}

/// A failed row, for `relais status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub source: String,
    pub table: String,
    pub local_id: Value,
    pub message: String,
    pub attempts: i64,
    /// Unix seconds; `None`: due at the next pass.
    pub next_attempt_at: Option<i64>,
}

/// An application database file the state knows, and the key its rows are tracked by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSource {
    pub key: String,
    pub path: String,
    pub id: Option<FileId>,
}

pub struct Tracking {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sync_tracking (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    table_name TEXT NOT NULL,
    local_id INTEGER NOT NULL,
    remote_id INTEGER,
    sync_date TEXT NOT NULL,
    sync_status TEXT NOT NULL CHECK (sync_status IN ('pending', 'success', 'failed')),
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    bytes INTEGER,
    UNIQUE (source, table_name, local_id)
);
-- Only rows not yet synced: the retry set stays as small as the backlog, whatever the history.
CREATE INDEX IF NOT EXISTS sync_tracking_unsynced
    ON sync_tracking (source, table_name, local_id) WHERE sync_status != 'success';
CREATE TABLE IF NOT EXISTS sync_cursor (
    source TEXT NOT NULL,
    table_name TEXT NOT NULL,
    high_water INTEGER NOT NULL,
    PRIMARY KEY (source, table_name)
);
CREATE TABLE IF NOT EXISTS agent_meta (key TEXT PRIMARY KEY, value TEXT);
-- Every application database file ever pushed, under the key its rows are tracked by.
-- `ino` and `born` (birth time, ns) identify the file across renames; NULL when the
-- filesystem records no birth time.
CREATE TABLE IF NOT EXISTS source_file (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    ino INTEGER,
    born INTEGER,
    changed_at TEXT NOT NULL
);
-- Unsynced rows of vanished sources, closed out by `relais forget`.
CREATE TABLE IF NOT EXISTS sync_forgotten (
    source TEXT NOT NULL,
    table_name TEXT NOT NULL,
    local_id INTEGER NOT NULL,
    sync_status TEXT NOT NULL,
    error_message TEXT,
    attempts INTEGER,
    forgotten_at TEXT NOT NULL
);
-- A media row's resumable upload under way (`upload`): where it is and what the server
-- confirmed it holds, so a dropped link, a crash or a power cut resumes from there. The
-- BLOB's length and SHA-256 tell whether the upload is still the row's.
CREATE TABLE IF NOT EXISTS media_uploads (
    source TEXT NOT NULL,
    table_name TEXT NOT NULL,
    local_id INTEGER NOT NULL,
    location TEXT NOT NULL,
    length INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    upload_offset INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (source, table_name, local_id)
);
-- 2: media_uploads (a version 1 database gains it when opened).
PRAGMA user_version = 2;
";

/// Whether recorded rows move the table's high-water mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HighWater {
    /// Every row up to them was read: the next pass reads above them.
    Advance,
    /// Rows read ahead of a scan still under way (new rows sent during a long drain):
    /// the mark stays below the rows the scan has not reached, and the scan skips these
    /// as synced when it gets there.
    Keep,
}

/// Held by [`Tracking::import_legacy`] (see there).
static IMPORTING: Mutex<()> = Mutex::new(());

/// WAL mode, with the WAL kept small. SQLite's defaults let the WAL grow to 1,000 pages
/// (4 MiB) before a checkpoint and never shrink it: on a nearly full partition the WAL
/// took every byte freed, and the checkpoint that would have shrunk it then had no room
/// to grow the database file, so the agent stayed wedged on "disk is full" after space
/// came back (fault campaign 6, disk full). 256 pages (1 MiB) between checkpoints still
/// coalesces the hot pages of a pass; the size limit truncates the WAL after each one.
const WAL_SETUP: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
    PRAGMA wal_autocheckpoint = 256; PRAGMA journal_size_limit = 1048576;";

impl Tracking {
    /// Opens the state database in `state_dir`, creating it when there is none yet. A
    /// file that is there but empty, not SQLite, corrupt or not relais's is an error
    /// ([`TrackingError::Bad`]): taking it for fresh state would send every row again.
    pub fn open(state_dir: &Path) -> Result<Tracking, TrackingError> {
        let path = state_dir.join(STATE_DB_NAME);
        let open_err = |e: String| TrackingError::Open(path.clone(), e);
        create_state_dir(state_dir)
            .map_err(|e| open_err(format!("cannot create the state directory: {e}")))?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.len() == 0 => {
                return Err(TrackingError::Bad(path, "is empty (0 bytes)"));
            }
            Ok(_) => {}
            // A WAL without its database (removed by hand?) would be replayed into a
            // fresh one.
            Err(_) if atomic_file::with_suffix(&path, "-wal").exists() => {
                return Err(TrackingError::Bad(
                    path,
                    "is missing but its -wal file is there",
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path)?,
            Err(e) => return Err(open_err(e.to_string())),
        }
        // No SQLITE_OPEN_CREATE: a database removed meanwhile must not come back empty.
        let flags = OpenFlags::default().difference(OpenFlags::SQLITE_OPEN_CREATE);
        let conn = Connection::open_with_flags(&path, flags).map_err(unwritable(&path))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| open_err(e.to_string()))?;
        check_is_state(&conn, &path)?;
        conn.execute_batch(WAL_SETUP)
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(unwritable(&path))?;
        Ok(Tracking { conn })
    }

    /// Opens the state database for reading only (`relais status`), so it works when the
    /// state cannot be written: a full disk, a read-only mount. Where SQLite cannot even
    /// create its shared-memory file, the file is read as immutable.
    pub fn open_read_only(state_dir: &Path) -> Result<Tracking, TrackingError> {
        let path = state_dir.join(STATE_DB_NAME);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
            return Err(TrackingError::Bad(path, "is empty (0 bytes)"));
        }
        let open = |target: &str, extra: OpenFlags| {
            let conn = Connection::open_with_flags(
                target,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | extra,
            )?;
            conn.busy_timeout(Duration::from_secs(10))?;
            // Reading the schema now, so that a file SQLite cannot read as WAL without
            // its shared memory falls back to the immutable open.
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
            Ok::<_, rusqlite::Error>(conn)
        };
        let immutable = format!("file:{}?immutable=1", path.display());
        let conn = open(&path.to_string_lossy(), OpenFlags::empty())
            .or_else(|_| open(&immutable, OpenFlags::SQLITE_OPEN_URI))
            .map_err(|e| match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase) => {
                    TrackingError::Bad(path.clone(), "is not an SQLite database")
                }
                Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
                    TrackingError::Bad(path.clone(), "is corrupt")
                }
                _ => TrackingError::Open(path.clone(), e.to_string()),
            })?;
        check_is_state(&conn, &path)?;
        Ok(Tracking { conn })
    }

    /// A write transaction taken at once. A deferred one that reads first fails with
    /// "database is locked" when `relais retry-failed` commits between its read and its
    /// write (WAL: a reader's snapshot cannot be upgraded), where an immediate one just
    /// waits for the busy timeout.
    fn write_tx(&mut self) -> Result<rusqlite::Transaction<'_>, TrackingError> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin a transaction"))
    }

    /// Largest integer `local_id` ever recorded for this table: rows above it are new.
    pub fn high_water(&self, source: &str, table: &str) -> Result<Option<i64>, TrackingError> {
        self.conn
            .query_row(
                "SELECT high_water FROM sync_cursor WHERE source = ?1 AND table_name = ?2",
                params![source, table],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read the high-water mark"))
    }

    /// Records these rows as `pending` before they are sent (one transaction), advances
    /// the high-water mark as `mark` says, and returns the ids that are due to be sent:
    /// not yet synced, and not waiting for a later retry.
    pub fn record_pending(
        &mut self,
        source: &str,
        table: &str,
        ids: &[Value],
        now: RetryClock,
        mark: HighWater,
    ) -> Result<Vec<Value>, TrackingError> {
        let date = clock::iso8601(now.now);
        let tx = self.write_tx()?;
        let mut due = Vec::new();
        {
            let mut get = tx
                .prepare_cached(
                    "SELECT sync_status, next_attempt_at FROM sync_tracking WHERE source = ?1 AND table_name = ?2 AND local_id = ?3",
                )
                .map_err(sql("read tracking"))?;
            let mut twin_exists = tx
                .prepare_cached(
                    "SELECT 1 FROM sync_tracking WHERE source = ?1 AND table_name = ?2 AND local_id = ?3",
                )
                .map_err(sql("read tracking"))?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO sync_tracking (source, table_name, local_id, sync_date, sync_status) VALUES (?1, ?2, ?3, ?4, 'pending')",
                )
                .map_err(sql("record a pending row"))?;
            for id in ids {
                let existing: Option<(String, Option<i64>)> = get
                    .query_row(params![source, table, stored(id)], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()
                    .map_err(sql("read tracking"))?;
                if existing.is_none() {
                    if let Some((twin, digits)) = twin(id) {
                        if twin_exists
                            .exists(params![source, table, twin])
                            .map_err(sql("read tracking"))?
                        {
                            return Err(TrackingError::TwinIds {
                                table: table.to_string(),
                                id: digits,
                            });
                        }
                    }
                }
                match existing {
                    None => {
                        insert
                            .execute(params![source, table, stored(id), date])
                            .map_err(sql("record a pending row"))?;
                        due.push(id.clone());
                    }
                    Some((status, next))
                        if status != "success"
                            && (status == "pending" || next.is_none_or(|t| now.is_due(t))) =>
                    {
                        due.push(id.clone())
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(max) = ids
            .iter()
            .filter(|_| mark == HighWater::Advance)
            .filter_map(|v| {
                if let Value::Integer(i) = v {
                    Some(*i)
                } else {
                    None
                }
            })
            .max()
        {
            tx.execute(
                "INSERT INTO sync_cursor (source, table_name, high_water) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source, table_name) DO UPDATE SET high_water = max(high_water, excluded.high_water)",
                params![source, table, max],
            )
            .map_err(sql("advance the high-water mark"))?;
        }
        tx.commit().map_err(sql("commit pending rows"))?;
        Ok(due)
    }

    /// Rows due for another attempt, after `after`, in `local_id` order: `pending` ones
    /// (interrupted, or reset by hand as the seed documents) and `failed` ones whose
    /// retry time has come, or is too far ahead to be true ([`RetryClock`]).
    pub fn due(
        &self,
        source: &str,
        table: &str,
        after: Option<&Value>,
        now: RetryClock,
        limit: usize,
    ) -> Result<Vec<Value>, TrackingError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT local_id FROM sync_tracking
                 WHERE source = ?1 AND table_name = ?2 AND sync_status != 'success'
                   AND (?3 IS NULL OR local_id > ?3)
                   AND (sync_status = 'pending' OR next_attempt_at IS NULL
                        OR next_attempt_at <= ?4 OR next_attempt_at > ?6)
                 ORDER BY local_id LIMIT ?5",
            )
            .map_err(sql("read the retry set"))?;
        let after = after.map_or(Value::Null, stored);
        let rows = stmt
            .query_map(
                params![source, table, after, now.now, limit as i64, now.latest],
                |r| r.get::<_, Value>(0).map(loaded),
            )
            .map_err(sql("read the retry set"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("read the retry set"))
    }

    /// Calls `each` with every tracked `local_id` of the table greater than `after` and at
    /// most `upto`, in order, streaming: the tracking's side of the reconciliation sweep.
    pub fn each_tracked(
        &self,
        source: &str,
        table: &str,
        after: Option<&Value>,
        upto: &Value,
        mut each: impl FnMut(Value),
    ) -> Result<(), TrackingError> {
        // Two statements rather than `(?3 IS NULL OR local_id > ?3)`: SQLite cannot seek
        // on a lower bound behind an OR, and every batch would walk from the first id.
        let query = match after {
            Some(_) => {
                "SELECT local_id FROM sync_tracking
                 WHERE source = ?1 AND table_name = ?2 AND local_id > ?3 AND local_id <= ?4 ORDER BY local_id"
            }
            None => {
                "SELECT local_id FROM sync_tracking
                 WHERE source = ?1 AND table_name = ?2 AND ?3 IS NULL AND local_id <= ?4 ORDER BY local_id"
            }
        };
        let mut stmt = self
            .conn
            .prepare_cached(query)
            .map_err(sql("read tracked ids"))?;
        let after = after.map_or(Value::Null, stored);
        let mut rows = stmt
            .query(params![source, table, after, stored(upto)])
            .map_err(sql("read tracked ids"))?;
        while let Some(row) = rows.next().map_err(sql("read tracked ids"))? {
            each(loaded(row.get(0).map_err(sql("read tracked ids"))?));
        }
        Ok(())
    }

    /// Records acknowledged rows as `success`, all in one transaction.
    pub fn mark_success(&mut self, source: &str, acked: &[Acked]) -> Result<(), TrackingError> {
        if acked.is_empty() {
            return Ok(());
        }
        let date = clock::now_iso8601();
        let tx = self.write_tx()?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO sync_tracking (source, table_name, local_id, remote_id, sync_date, sync_status, attempts, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'success', 1, ?6)
                     ON CONFLICT (source, table_name, local_id) DO UPDATE SET
                       remote_id = excluded.remote_id, sync_date = excluded.sync_date, sync_status = 'success',
                       error_message = NULL, attempts = attempts + 1, next_attempt_at = NULL, bytes = excluded.bytes",
                )
                .map_err(sql("record a synced row"))?;
            let mut forget = tx
                .prepare_cached(
                    "DELETE FROM media_uploads WHERE source = ?1 AND table_name = ?2 AND local_id = ?3",
                )
                .map_err(sql("forget a completed upload"))?;
            for a in acked {
                stmt.execute(params![
                    source,
                    a.table,
                    stored(&a.local_id),
                    a.remote_id,
                    date,
                    a.bytes as i64
                ])
                .map_err(sql("record a synced row"))?;
                // A media row's upload is done with once the row is recorded.
                forget
                    .execute(params![source, a.table, stored(&a.local_id)])
                    .map_err(sql("forget a completed upload"))?;
            }
        }
        tx.commit().map_err(sql("commit synced rows"))
    }

    /// The upload under way for a media row, if one was recorded.
    pub fn upload(
        &self,
        source: &str,
        table: &str,
        local_id: &Value,
    ) -> Result<Option<PersistedUpload>, TrackingError> {
        self.conn
            .query_row(
                "SELECT location, length, sha256, upload_offset FROM media_uploads
                 WHERE source = ?1 AND table_name = ?2 AND local_id = ?3",
                params![source, table, stored(local_id)],
                |r| {
                    Ok(PersistedUpload {
                        location: r.get(0)?,
                        length: r.get::<_, i64>(1)? as u64,
                        sha256: r.get(2)?,
                        offset: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()
            .map_err(sql("read a media upload"))
    }

    /// The media uploads under way, oldest first, for `relais status`. A state database
    /// from before uploads (opened read-only, not upgraded) has none.
    pub fn uploads_under_way(&self) -> Result<Vec<UploadUnderWay>, TrackingError> {
        let mut stmt = match self.conn.prepare(
            "SELECT source, table_name, local_id, upload_offset, length FROM media_uploads
             ORDER BY updated_at",
        ) {
            Ok(stmt) => stmt,
            Err(e) if e.to_string().contains("no such table") => return Ok(Vec::new()),
            Err(e) => return Err(sql("list media uploads")(e)),
        };
        let rows = stmt
            .query_map([], |r| {
                Ok(UploadUnderWay {
                    source: r.get(0)?,
                    table: r.get(1)?,
                    local_id: r.get(2)?,
                    offset: r.get::<_, i64>(3)? as u64,
                    length: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(sql("list media uploads"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("list media uploads"))
    }

    /// Records a media row's upload and the offset the server confirmed.
    pub fn save_upload(
        &mut self,
        source: &str,
        table: &str,
        local_id: &Value,
        upload: &PersistedUpload,
    ) -> Result<(), TrackingError> {
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO media_uploads (source, table_name, local_id, location, length, sha256, upload_offset, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (source, table_name, local_id) DO UPDATE SET
               location = excluded.location, length = excluded.length, sha256 = excluded.sha256,
               upload_offset = excluded.upload_offset, updated_at = excluded.updated_at",
            params![
                source,
                table,
                stored(local_id),
                upload.location,
                upload.length as i64,
                upload.sha256,
                upload.offset as i64,
                clock::now_iso8601()
            ],
        )
        .map_err(sql("record a media upload"))?;
        tx.commit().map_err(sql("commit a media upload"))
    }

    /// Forgets a media row's upload: the next attempt creates one from byte 0.
    pub fn forget_upload(
        &mut self,
        source: &str,
        table: &str,
        local_id: &Value,
    ) -> Result<(), TrackingError> {
        let tx = self.write_tx()?;
        tx.execute(
            "DELETE FROM media_uploads WHERE source = ?1 AND table_name = ?2 AND local_id = ?3",
            params![source, table, stored(local_id)],
        )
        .map_err(sql("forget a media upload"))?;
        tx.commit().map_err(sql("commit a forgotten media upload"))
    }

    /// Records a failed attempt (its message redacted) and when to try again.
    pub fn mark_failed(
        &mut self,
        source: &str,
        table: &str,
        local_id: &Value,
        message: &str,
        retry_at: i64,
    ) -> Result<(), TrackingError> {
        self.conn
            .prepare_cached(
                "INSERT INTO sync_tracking (source, table_name, local_id, sync_date, sync_status, error_message, attempts, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, 'failed', ?5, 1, ?6)
                 ON CONFLICT (source, table_name, local_id) DO UPDATE SET
                   sync_date = excluded.sync_date, sync_status = 'failed', error_message = excluded.error_message,
                   attempts = attempts + 1, next_attempt_at = excluded.next_attempt_at",
            )
            .and_then(|mut s| {
                // Messages come from servers and transports: mask secrets before storing.
                let message = crate::redact::redact(message);
                s.execute(params![source, table, stored(local_id), clock::now_iso8601(), message, retry_at])
            })
            .map(|_| ())
            .map_err(sql("record a failed row"))
    }

    /// How many rows are not synced yet (pending or failed), over every source.
    pub fn unsynced(&self) -> Result<u64, TrackingError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM sync_tracking WHERE sync_status != 'success'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(sql("count unsynced rows"))
    }

    /// Makes every failed row due now (`relais retry-failed`); returns how many.
    pub fn retry_failed(&mut self) -> Result<usize, TrackingError> {
        self.conn
            .execute("UPDATE sync_tracking SET sync_status = 'pending', next_attempt_at = NULL WHERE sync_status = 'failed'", [])
            .map_err(sql("reset failed rows"))
    }

    /// Imports, once per source, the `success` rows of a `sync_tracking` table left in the
    /// application's database by the Python service, so they are not sent again. Reads in
    /// short batches so the application is never locked out for long. A million rows take
    /// minutes on a Pi: each batch pings the watchdog and records, in its own transaction,
    /// the last legacy id imported, so an agent killed mid-import resumes there.
    pub fn import_legacy(
        &mut self,
        source: &str,
        app: &Connection,
    ) -> Result<Option<u64>, TrackingError> {
        // Both lanes import before their first push; the second waits and finds it done.
        let _one_at_a_time = IMPORTING.lock().unwrap_or_else(PoisonError::into_inner);
        let key = format!("legacy_imported:{source}");
        if self.meta(&key)?.is_some() {
            return Ok(None);
        }
        let has_table = app
            .query_row(
                "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'sync_tracking'",
                [],
                |_| Ok(()),
            )
            .optional()
            .map_err(sql("look for a legacy sync_tracking table"))?
            .is_some();
        let mut imported = 0u64;
        if has_table {
            let progress = format!("legacy_progress:{source}");
            let mut after: i64 = self
                .meta(&progress)?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if after > 0 {
                log::info!(
                    "source {source}: resuming the import of the previous service's tracking after its id {after}"
                );
            }
            loop {
                crate::notify::keepalive();
                let batch = read_legacy_batch(app, after)
                    .map_err(sql("read the legacy sync_tracking table"))?;
                let Some(last) = batch.last() else { break };
                after = last.0;
                let tx = self.write_tx()?;
                for (_, table, local_id, remote_id, date) in &batch {
                    imported += tx
                        .execute(
                            "INSERT INTO sync_tracking (source, table_name, local_id, remote_id, sync_date, sync_status, attempts)
                             VALUES (?1, ?2, ?3, ?4, ?5, 'success', 1) ON CONFLICT DO NOTHING",
                            params![source, table, local_id, remote_id, date],
                        )
                        .map_err(sql("import legacy tracking"))? as u64;
                }
                tx.execute(
                    "INSERT OR REPLACE INTO agent_meta (key, value) VALUES (?1, ?2)",
                    params![progress, after.to_string()],
                )
                .map_err(sql("import legacy tracking"))?;
                tx.commit().map_err(sql("import legacy tracking"))?;
            }
        }
        self.set_meta(&[(&key, &clock::now_iso8601())])?;
        Ok(Some(imported))
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, TrackingError> {
        self.conn
            .query_row("SELECT value FROM agent_meta WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("read agent metadata"))
    }

    /// Sets metadata entries, all in one transaction (one SD card write per pass).
    pub fn set_meta(&mut self, entries: &[(&str, &str)]) -> Result<(), TrackingError> {
        let tx = self.write_tx()?;
        for (key, value) in entries {
            tx.execute(
                "INSERT OR REPLACE INTO agent_meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(sql("write agent metadata"))?;
        }
        tx.commit().map_err(sql("write agent metadata"))
    }

    /// Empties the entry `key` if it holds a value (a condition said once and now over);
    /// returns whether it did. A read, and a write only when there is one to make.
    pub fn clear_meta(&mut self, key: &str) -> Result<bool, TrackingError> {
        if self.meta(key)?.is_none_or(|v| v.is_empty()) {
            return Ok(false);
        }
        self.set_meta(&[(key, "")])?;
        Ok(true)
    }

    /// Row counts per source, table and status.
    pub fn counts(&self) -> Result<Vec<Count>, TrackingError> {
        // Grouping the whole history by status would sort every row in a temporary
        // B-tree (half a second and 40 MB of writes at a million rows). Totals come from
        // the unique index, the unsynced statuses from the partial index, and `success`
        // is the difference.
        let totals = self.grouped(
            "SELECT source, table_name, 'success', count(*) FROM sync_tracking GROUP BY source, table_name",
        )?;
        let unsynced = self.grouped(
            "SELECT source, table_name, sync_status, count(*) FROM sync_tracking
             WHERE sync_status != 'success' GROUP BY source, table_name, sync_status",
        )?;
        let mut counts = Vec::new();
        for mut total in totals {
            let others: Vec<&Count> = unsynced
                .iter()
                .filter(|c| c.source == total.source && c.table == total.table)
                .collect();
            total.rows -= others.iter().map(|c| c.rows).sum::<u64>();
            counts.extend(others.into_iter().cloned());
            if total.rows > 0 {
                counts.push(total);
            }
        }
        counts.sort_by(|a, b| {
            (&a.source, &a.table, &a.status).cmp(&(&b.source, &b.table, &b.status))
        });
        Ok(counts)
    }

    fn grouped(&self, query: &str) -> Result<Vec<Count>, TrackingError> {
        let mut stmt = self.conn.prepare_cached(query).map_err(sql("count rows"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Count {
                    source: r.get(0)?,
                    table: r.get(1)?,
                    status: r.get(2)?,
                    rows: r.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(sql("count rows"))?;
        rows.collect::<Result<_, _>>().map_err(sql("count rows"))
    }

    /// The most recently failed rows, newest first.
    pub fn recent_failures(&self, limit: usize) -> Result<Vec<Failure>, TrackingError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT source, table_name, local_id, coalesce(error_message, ''), attempts, next_attempt_at
                 FROM sync_tracking
                 WHERE sync_status = 'failed' AND sync_status != 'success' -- lets SQLite use the partial index
                 ORDER BY sync_date DESC, id DESC LIMIT ?1",
            )
            .map_err(sql("read failures"))?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(Failure {
                    source: r.get(0)?,
                    table: r.get(1)?,
                    local_id: r.get::<_, Value>(2).map(loaded)?,
                    message: r.get(3)?,
                    attempts: r.get(4)?,
                    next_attempt_at: r.get(5)?,
                })
            })
            .map_err(sql("read failures"))?;
        rows.collect::<Result<_, _>>().map_err(sql("read failures"))
    }

    /// How many times this row was tried (0 when it is not tracked).
    pub fn attempts(
        &self,
        source: &str,
        table: &str,
        local_id: &Value,
    ) -> Result<i64, TrackingError> {
        self.conn
            .query_row(
                "SELECT attempts FROM sync_tracking WHERE source = ?1 AND table_name = ?2 AND local_id = ?3",
                params![source, table, stored(local_id)],
                |r| r.get(0),
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(sql("read tracking"))
    }

    /// Records `fingerprint` as the backend settings of `table`; when it differs from
    /// the one recorded, makes the table's failed rows due now (they failed against
    /// other settings) and returns how many, in the same transaction.
    pub fn backend_settings(
        &mut self,
        table: &str,
        fingerprint: &str,
    ) -> Result<usize, TrackingError> {
        let key = format!("backend:{table}");
        if self.meta(&key)?.as_deref() == Some(fingerprint) {
            return Ok(0);
        }
        let tx = self.write_tx()?;
        let due = tx
            .execute(
                "UPDATE sync_tracking SET next_attempt_at = NULL
                 WHERE table_name = ?1 AND sync_status = 'failed' AND sync_status != 'success'",
                [table],
            )
            .map_err(sql("make failed rows due"))?;
        tx.execute(
            "INSERT OR REPLACE INTO agent_meta (key, value) VALUES (?1, ?2)",
            params![key, fingerprint],
        )
        .map_err(sql("write agent metadata"))?;
        tx.commit().map_err(sql("make failed rows due"))?;
        Ok(due)
    }
}

/// The sources: which file is which, which vanished, and the rows closed out by hand.
impl Tracking {
    pub fn known_sources(&self) -> Result<Vec<KnownSource>, TrackingError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, path, ino, born FROM source_file ORDER BY key")
            .map_err(sql("read the known sources"))?;
        let rows = stmt
            .query_map([], |r| {
                let (ino, born): (Option<i64>, Option<i64>) = (r.get(2)?, r.get(3)?);
                Ok(KnownSource {
                    key: r.get(0)?,
                    path: r.get(1)?,
                    id: ino.zip(born).map(|(ino, born)| FileId {
                        ino: ino as u64,
                        born,
                    }),
                })
            })
            .map_err(sql("read the known sources"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("read the known sources"))
    }

    /// Records where a source is and what file it is.
    pub fn remember_source(&mut self, source: &KnownSource) -> Result<(), TrackingError> {
        self.conn
            .execute(
                "INSERT INTO source_file (key, path, ino, born, changed_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (key) DO UPDATE SET path = excluded.path, ino = excluded.ino,
                   born = excluded.born, changed_at = excluded.changed_at",
                params![
                    source.key,
                    source.path,
                    source.id.map(|i| i.ino as i64),
                    source.id.map(|i| i.born),
                    clock::now_iso8601()
                ],
            )
            .map(|_| ())
            .map_err(sql("record a source"))
    }

    /// Whether any row is tracked under this source key (and table).
    pub fn has_rows(&self, source: &str, table: Option<&str>) -> Result<bool, TrackingError> {
        // Two statements: behind `(?2 IS NULL OR table_name = ?2)` SQLite seeks on the
        // source alone and walks every row of it (a million, for a table with none).
        let query = match table {
            Some(_) => "SELECT 1 FROM sync_tracking WHERE source = ?1 AND table_name = ?2 LIMIT 1",
            None => "SELECT 1 FROM sync_tracking WHERE source = ?1 AND ?2 IS NULL LIMIT 1",
        };
        self.conn
            .query_row(query, params![source, table], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(sql("look up a source"))
    }

    /// Unsynced rows per source, in source order: the sums of [`Tracking::unsynced_by_table`].
    pub fn unsynced_by_source(&self) -> Result<Vec<(String, u64)>, TrackingError> {
        let mut per_source: Vec<(String, u64)> = Vec::new();
        for (source, _, rows) in self.unsynced_by_table()? {
            match per_source.last_mut() {
                Some((last, n)) if *last == source => *n += rows,
                _ => per_source.push((source, rows)),
            }
        }
        Ok(per_source)
    }

    /// The unsynced row of `table` with the lowest local id (the oldest, ids growing with
    /// time) and when it was recorded (`sync_date`: a pending row's read, a failed row's
    /// last attempt), from the partial index.
    pub fn oldest_unsynced(
        &self,
        source: &str,
        table: &str,
    ) -> Result<Option<(Value, String)>, TrackingError> {
        self.conn
            .prepare_cached(
                "SELECT local_id, sync_date FROM sync_tracking
                 WHERE source = ?1 AND table_name = ?2 AND sync_status != 'success'
                 ORDER BY local_id LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![source, table], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(sql("read the oldest unsynced row"))
    }

    /// Unsynced rows per source and table, from the partial index.
    pub fn unsynced_by_table(&self) -> Result<Vec<(String, String, u64)>, TrackingError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT source, table_name, count(*) FROM sync_tracking WHERE sync_status != 'success'
                 GROUP BY source, table_name ORDER BY source, table_name",
            )
            .map_err(sql("count unsynced rows"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .map_err(sql("count unsynced rows"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("count unsynced rows"))
    }

    /// Closes out the unsynced rows of a vanished source (`relais forget`): they move to
    /// `sync_forgotten`, in one transaction, and are no longer waited for. Rows already
    /// synced stay, so a file that comes back is not sent twice.
    pub fn forget(&mut self, source: &str) -> Result<u64, TrackingError> {
        let now = clock::now_iso8601();
        let tx = self.write_tx()?;
        let moved = tx
            .execute(
                "INSERT INTO sync_forgotten (source, table_name, local_id, sync_status, error_message, attempts, forgotten_at)
                 SELECT source, table_name, local_id, sync_status, error_message, attempts, ?2 FROM sync_tracking
                 WHERE source = ?1 AND sync_status != 'success'",
                params![source, now],
            )
            .map_err(sql("record forgotten rows"))?;
        tx.execute(
            "DELETE FROM sync_tracking WHERE source = ?1 AND sync_status != 'success'",
            [source],
        )
        .map_err(sql("close out forgotten rows"))?;
        tx.execute("DELETE FROM media_uploads WHERE source = ?1", [source])
            .map_err(sql("forget the source's media uploads"))?;
        tx.commit().map_err(sql("commit forgotten rows"))?;
        Ok(moved as u64)
    }

    /// Forgotten rows per source, with when the last were forgotten.
    pub fn forgotten(&self) -> Result<Vec<(String, u64, String)>, TrackingError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT source, count(*), max(forgotten_at) FROM sync_forgotten GROUP BY source ORDER BY source",
            )
            .map_err(sql("read forgotten rows"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })
            .map_err(sql("read forgotten rows"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("read forgotten rows"))
    }
}

/// Creates the state directory, private, if it is missing.
pub(crate) fn create_state_dir(state_dir: &Path) -> std::io::Result<()> {
    if !state_dir.is_dir() {
        std::fs::create_dir_all(state_dir)?;
        // The tracking database reveals what the device recorded: keep it private.
        let _ = std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// SQLite's "unable to open database file" alone does not say that a read-only state
/// directory or a full disk is the usual cause (fault campaign 6).
fn unwritable<E: fmt::Display>(path: &Path) -> impl Fn(E) -> TrackingError + '_ {
    move |e| {
        TrackingError::Open(
            path.to_path_buf(),
            format!("{e} (is the state directory writable and the disk not full?)"),
        )
    }
}

/// Creates the state database whole: schema made under a temporary name, closed,
/// fsynced, then linked to `path` and the directory fsynced. A power cut during the very
/// first start leaves no `relais.db` (or a leftover `relais.db.new-*`), never an empty
/// one that the next start would have to refuse.
fn create(path: &Path) -> Result<(), TrackingError> {
    let tmp = atomic_file::create_unique(path, 0o600).map_err(unwritable(path))?;
    let built = Connection::open(&tmp)
        .and_then(|conn| {
            conn.execute_batch(WAL_SETUP)?;
            conn.execute_batch(SCHEMA)?;
            conn.close().map_err(|(_, e)| e)
        })
        .map_err(unwritable(path))
        .and_then(|()| atomic_file::install_new(&tmp, path).map_err(unwritable(path)));
    if built.is_err() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(atomic_file::with_suffix(&tmp, suffix));
        }
    }
    // `false` (another process created it first) is fine: that one is opened instead.
    built.map(|_| ())
}

/// Every column of relais's `sync_tracking`.
const TRACKING_COLUMNS: &str = "SELECT id, source, table_name, local_id, remote_id, sync_date, \
    sync_status, error_message, attempts, next_attempt_at, bytes FROM sync_tracking";

/// Tells a relais state database from a file that only has its name.
fn check_is_state(conn: &Connection, path: &Path) -> Result<(), TrackingError> {
    let found = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'sync_tracking'",
        [],
        |r| r.get::<_, i64>(0),
    );
    let bad = |what| Err(TrackingError::Bad(path.to_path_buf(), what));
    match found {
        // Prepared, not run: the columns are checked without reading or writing a row.
        // Without them the schema statements would fail with an error that looks like
        // a permission problem.
        Ok(1) => match conn.prepare(TRACKING_COLUMNS) {
            Ok(_) => Ok(()),
            Err(_) => bad(
                "is not a relais state database (its sync_tracking table lacks relais's columns; the Python service's?)",
            ),
        },
        Ok(_) => bad("is not a relais state database (no sync_tracking table)"),
        Err(e) => match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase) => bad("is not an SQLite database"),
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => bad("is corrupt"),
            _ => Err(TrackingError::Sql("read its schema", e)),
        },
    }
}

/// `relais state reset`: moves the state database and its `-wal` and `-shm` aside, as
/// `relais.db.bad-<UTC time>` (with the same suffixes, so SQLite still opens them
/// together); returns each move made. The caller holds the state lock.
pub fn set_aside(state_dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, TrackingError> {
    let db = state_dir.join(STATE_DB_NAME);
    let stamp = clock::now_iso8601()
        .replace(['-', ':'], "")
        .replace("+0000", "Z");
    let mut base = atomic_file::with_suffix(&db, &format!(".bad-{stamp}"));
    for n in 2.. {
        if !base.exists() {
            break;
        }
        base = atomic_file::with_suffix(&db, &format!(".bad-{stamp}-{n}"));
    }
    let mut moved = Vec::new();
    // The -wal first: a fresh database must never meet the old one's WAL.
    for suffix in ["-wal", "-shm", ""] {
        let from = atomic_file::with_suffix(&db, suffix);
        if std::fs::symlink_metadata(&from).is_err() {
            continue;
        }
        let to = atomic_file::with_suffix(&base, suffix);
        std::fs::rename(&from, &to).map_err(|e| {
            TrackingError::Open(
                from.clone(),
                format!("cannot move it to {}: {e}", to.display()),
            )
        })?;
        moved.push((from, to));
    }
    if !moved.is_empty() {
        atomic_file::sync_dir(state_dir).map_err(|e| TrackingError::Open(db, e.to_string()))?;
    }
    Ok(moved)
}

/// How a `local_id` is stored. `local_id` is declared INTEGER, as the contract and the
/// seed's SQL expect, and that affinity would turn a text id that looks like a number
/// (`"0042"`) into the integer 42, merging it with `"42"`. Text ids are therefore stored
/// as BLOBs of their UTF-8 bytes, which no affinity converts; they sort after integers
/// and among themselves in the same byte order as text.
fn stored(id: &Value) -> Value {
    match id {
        Value::Text(t) => Value::Blob(t.clone().into_bytes()),
        other => other.clone(),
    }
}

/// The stored form of the other id whose key text would be the same as `id`'s: the
/// integer 12 and the text "12" (but not "012" or "+12", which keep their own text).
/// Returns it with the digits both share.
fn twin(id: &Value) -> Option<(Value, String)> {
    match id {
        Value::Integer(i) => Some((Value::Blob(i.to_string().into_bytes()), i.to_string())),
        Value::Text(t) => t
            .parse::<i64>()
            .ok()
            .filter(|i| i.to_string() == *t)
            .map(|i| (Value::Integer(i), t.clone())),
        _ => None,
    }
}

/// The inverse of [`stored`].
fn loaded(id: Value) -> Value {
    match id {
        Value::Blob(b) => Value::Text(String::from_utf8_lossy(&b).into_owned()),
        other => other,
    }
}

type LegacyRow = (i64, String, Value, Option<Value>, String);

fn read_legacy_batch(app: &Connection, after: i64) -> rusqlite::Result<Vec<LegacyRow>> {
    let mut stmt = app.prepare_cached(
        "SELECT id, table_name, local_id, remote_id, coalesce(CAST(sync_date AS TEXT), '') FROM sync_tracking
         WHERE sync_status = 'success' AND id > ?1 ORDER BY id LIMIT 1000",
    )?;
    let rows = stmt.query_map([after], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_source_table_and_status() {
        let dir =
            std::env::temp_dir().join(format!("relais-tracking-counts-{}", std::process::id()));
        let mut t = Tracking::open(&dir).unwrap();
        let ids: Vec<Value> = (1..=5).map(Value::Integer).collect();
        let now = RetryClock::at(0, Duration::from_secs(3600));
        t.record_pending("a.db", "evenement", &ids, now, HighWater::Advance)
            .unwrap();
        let acked: Vec<Acked> = ids[..3]
            .iter()
            .map(|id| Acked {
                table: "evenement".into(),
                local_id: id.clone(),
                remote_id: None,
                bytes: 1,
            })
            .collect();
        t.mark_success("a.db", &acked).unwrap();
        t.mark_failed("a.db", "evenement", &ids[3], "boom", 10)
            .unwrap();
        t.record_pending(
            "a.db",
            "media",
            &[Value::Text("0042".into())],
            now,
            HighWater::Advance,
        )
        .unwrap();
        let got: Vec<(String, String, u64)> = t
            .counts()
            .unwrap()
            .into_iter()
            .map(|c| (c.table, c.status, c.rows))
            .collect();
        assert_eq!(
            got,
            [
                ("evenement".to_string(), "failed".to_string(), 1),
                ("evenement".into(), "pending".into(), 1),
                ("evenement".into(), "success".into(), 3),
                ("media".into(), "pending".into(), 1),
            ]
        );
        assert_eq!(t.unsynced().unwrap(), 3);
        assert_eq!(
            t.due("a.db", "media", None, now, 10).unwrap(),
            [Value::Text("0042".into())]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_state_gains_media_uploads_and_success_forgets_the_upload() {
        let dir =
            std::env::temp_dir().join(format!("relais-tracking-uploads-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        drop(Tracking::open(&dir).unwrap());
        let old = Connection::open(dir.join(STATE_DB_NAME)).unwrap();
        old.execute_batch("DROP TABLE media_uploads; PRAGMA user_version = 1;")
            .unwrap();
        drop(old);
        let mut t = Tracking::open(&dir).unwrap();
        let version: i64 = t
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
        let id = Value::Integer(7);
        let upload = PersistedUpload {
            location: "/api/uploads/ab".into(),
            length: 10,
            sha256: "00".into(),
            offset: 4,
        };
        t.save_upload("a.db", "media", &id, &upload).unwrap();
        assert_eq!(t.upload("a.db", "media", &id).unwrap(), Some(upload));
        let acked = Acked {
            table: "media".into(),
            local_id: id.clone(),
            remote_id: Some(Value::Integer(3)),
            bytes: 10,
        };
        t.mark_success("a.db", &[acked]).unwrap();
        assert_eq!(t.upload("a.db", "media", &id).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
