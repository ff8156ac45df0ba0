//! The embedded store: one SQLite database file (WAL, `synchronous=FULL`: a 201 tells
//! the device it may forget the row, so the commit must survive a power cut). One
//! connection behind a mutex, used from `spawn_blocking`: SQLite has a single writer
//! anyway, and a push's insert is a few hundred microseconds. Pushes go through
//! [`super::group_commit`], one batch at a time (the single writer): the batch's rows in
//! one `BEGIN IMMEDIATE` transaction, one commit, so one fsync for them all. The
//! configuration backend's queries are in [`site_config`], the agents' ([`super::fleet`])
//! in [`fleet`].

mod console;
mod fleet;
mod site_config;
mod sync;
mod uploads;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::fleet::ReceivedCounts;
use super::group_commit::{self, Flush, Flushed, GroupCommit};
use super::{
    ConfigVersion, Creation, DeviceHistory, FleetEntry, MediaRow, NewPush, NewSession, NewToken,
    Outcome, Revoked, Session, SessionLife, Store, StoreError, Stored, TokenInfo, TokenKind,
    Upload,
};
use relais_wire::heartbeat::Heartbeat;

use crate::site_config::{
    Device, DeviceFields, DevicePatch, NewDevice, NewSite, Site, SiteFields, SitePatch,
};

/// Versioned migrations, applied in order, each recorded in `schema_migrations`.
/// Versions need not be contiguous: each is applied once if it is not recorded yet.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "config",
        include_str!("../../migrations/sqlite/0002_config.sql"),
    ),
    (
        3,
        "tokens",
        include_str!("../../migrations/sqlite/0003_tokens.sql"),
    ),
    (
        4,
        "uploads",
        include_str!("../../migrations/sqlite/0004_uploads.sql"),
    ),
    (
        5,
        "heartbeats",
        include_str!("../../migrations/sqlite/0005_heartbeats.sql"),
    ),
    (
        6,
        "console",
        include_str!("../../migrations/sqlite/0006_console.sql"),
    ),
    (
        7,
        "sync",
        include_str!("../../migrations/sqlite/0007_sync.sql"),
    ),
];

const INSERT_TOKEN: &str = "INSERT INTO tokens (kind, device_id, note, sha256, tenant, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
     RETURNING id";

const LIST_TOKENS: &str =
    "SELECT id, kind, device_id, note, created_at, revoked_at, tenant FROM tokens ORDER BY id";

const FIND_TOKEN: &str = "SELECT id, kind, device_id, note, created_at, revoked_at, tenant
     FROM tokens
     WHERE sha256 = ?1 AND revoked_at IS NULL";

const REVOKE_TOKEN: &str = "UPDATE tokens SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')
     WHERE id = ?1 AND revoked_at IS NULL";

const TOKEN_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM tokens WHERE id = ?1)";

#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    pushes: Arc<GroupCommit>,
    received: Arc<ReceivedCounts>,
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600: it holds the token hashes and every
    /// push) the database file; does not migrate.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        create_private(path).map_err(|e| StoreError::Failed(format!("{}: {e}", path.display())))?;
        let fail = |e: rusqlite::Error| StoreError::Failed(format!("{}: {e}", path.display()));
        let conn = Connection::open(path).map_err(fail)?;
        // `PRAGMA journal_mode` answers with a row, so it is run as a query.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(fail)?;
        // Foreign keys (devices' ON DELETE CASCADE) are on by default only in
        // rusqlite's bundled build: said here so a system SQLite enforces them too.
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(fail)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(fail)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            // One writer: a second batch would only wait for the lock.
            pushes: Arc::new(GroupCommit::new(1)),
            received: Arc::default(),
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

impl Flush for SqliteStore {
    async fn flush(&self, batch: Vec<NewPush>) -> Flushed {
        let n = batch.len();
        self.blocking(move |conn| Ok(insert_batch(conn, &batch)))
            .await
            .unwrap_or_else(|e| Flushed::failed(n, e))
    }
}

impl Store for SqliteStore {
    async fn store_push(&self, push: NewPush) -> Result<Stored, StoreError> {
        let device_id = push.device_id.clone();
        let stored = self.pushes.push(self, push).await;
        if let Ok(Stored::New(_)) = stored {
            self.received.bump(&device_id);
        }
        stored
    }

    fn commit_counts(&self) -> Arc<group_commit::Counts> {
        self.pushes.counts()
    }

    fn received_counts(&self) -> Arc<ReceivedCounts> {
        Arc::clone(&self.received)
    }

    async fn record_heartbeat(
        &self,
        device_id: String,
        received_at: i64,
        heartbeat: Heartbeat,
        json: String,
    ) -> Result<(), StoreError> {
        self.blocking(move |conn| {
            fleet::record_heartbeat(conn, &device_id, received_at, &heartbeat, &json)
        })
        .await
    }

    async fn fleet(&self, today_start: i64) -> Result<Vec<FleetEntry>, StoreError> {
        self.blocking(move |conn| fleet::fleet(conn, today_start))
            .await
    }

    async fn device_history(
        &self,
        device_id: String,
        since: i64,
    ) -> Result<DeviceHistory, StoreError> {
        self.blocking(move |conn| fleet::device_history(conn, &device_id, since))
            .await
    }

    async fn add_received(&self, counts: Vec<(String, i64, u64)>) -> Result<(), StoreError> {
        self.blocking(move |conn| fleet::add_received(conn, &counts))
            .await
    }

    async fn prune_history(&self, before: i64) -> Result<u64, StoreError> {
        self.blocking(move |conn| fleet::prune_history(conn, before))
            .await
    }

    async fn record_config_pull(
        &self,
        device_id: String,
        site_token_sha256: String,
        hash: String,
        pulled_at: i64,
    ) -> Result<(), StoreError> {
        self.blocking(move |conn| {
            fleet::record_config_pull(conn, &device_id, &site_token_sha256, &hash, pulled_at)
        })
        .await
    }

    async fn create_upload(&self, upload: Upload, now: i64) -> Result<Creation, StoreError> {
        self.blocking(move |conn| uploads::create(conn, &upload, now))
            .await
    }

    async fn upload(&self, id: String, now: i64) -> Result<Option<Upload>, StoreError> {
        self.blocking(move |conn| uploads::live(conn, &id, now))
            .await
    }

    async fn claim_upload(
        &self,
        id: String,
        offset: u64,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        self.blocking(move |conn| uploads::claim(conn, &id, offset, now, until))
            .await
    }

    async fn settle_upload(
        &self,
        id: String,
        from: u64,
        to: u64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        self.blocking(move |conn| uploads::settle(conn, &id, from, to, expires_at))
            .await
    }

    async fn complete_upload(&self, id: String, row_id: i64) -> Result<(), StoreError> {
        self.blocking(move |conn| uploads::complete(conn, &id, row_id))
            .await
    }

    async fn remove_upload(&self, id: String) -> Result<(), StoreError> {
        self.blocking(move |conn| uploads::remove(conn, &id)).await
    }

    async fn expire_uploads(&self, now: i64) -> Result<Vec<(String, bool)>, StoreError> {
        self.blocking(move |conn| uploads::expire(conn, now)).await
    }

    async fn add_token(&self, token: NewToken) -> Result<i64, StoreError> {
        self.blocking(move |conn| {
            conn.query_row(
                INSERT_TOKEN,
                params![
                    token.kind.as_str(),
                    token.device_id,
                    token.note,
                    token.sha256,
                    token.tenant
                ],
                |r| r.get(0),
            )
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        self.blocking(|conn| {
            conn.prepare(LIST_TOKENS)?
                .query_map([], token_info)?
                .collect()
        })
        .await
    }

    async fn revoke_token(&self, id: i64) -> Result<Revoked, StoreError> {
        self.blocking(move |conn| {
            if conn.execute(REVOKE_TOKEN, [id])? == 1 {
                return Ok(Revoked::Now);
            }
            let exists: bool = conn.query_row(TOKEN_EXISTS, [id], |r| r.get(0))?;
            Ok(if exists {
                Revoked::Already
            } else {
                Revoked::NoSuchToken
            })
        })
        .await
    }

    async fn find_token(&self, sha256: String) -> Result<Option<TokenInfo>, StoreError> {
        self.blocking(move |conn| conn.query_row(FIND_TOKEN, [sha256], token_info).optional())
            .await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.blocking(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn site_config(
        &self,
        token_sha256: String,
    ) -> Result<Option<(SiteFields, Vec<DeviceFields>)>, StoreError> {
        self.blocking(move |conn| site_config::site_config(conn, &token_sha256))
            .await
    }

    async fn create_site(&self, site: NewSite) -> Outcome<Site> {
        self.blocking(move |conn| site_config::create_site(conn, &site))
            .await
    }

    async fn sites(&self) -> Result<Vec<Site>, StoreError> {
        self.blocking(site_config::sites).await
    }

    async fn site(&self, id: i64) -> Outcome<Site> {
        self.blocking(move |conn| site_config::site(conn, id)).await
    }

    async fn update_site(&self, id: i64, patch: SitePatch) -> Outcome<Site> {
        self.blocking(move |conn| site_config::update_site(conn, id, &patch))
            .await
    }

    async fn delete_site(&self, id: i64) -> Outcome<()> {
        self.blocking(move |conn| site_config::delete_site(conn, id))
            .await
    }

    async fn create_device(&self, device: NewDevice) -> Outcome<Device> {
        self.blocking(move |conn| site_config::create_device(conn, &device))
            .await
    }

    async fn devices(&self, site_id: Option<i64>) -> Result<Vec<Device>, StoreError> {
        self.blocking(move |conn| site_config::devices(conn, site_id))
            .await
    }

    async fn device(&self, id: i64) -> Outcome<Device> {
        self.blocking(move |conn| site_config::device(conn, id))
            .await
    }

    async fn update_device(&self, id: i64, patch: DevicePatch) -> Outcome<Device> {
        self.blocking(move |conn| site_config::update_device(conn, id, &patch))
            .await
    }

    async fn delete_device(&self, id: i64) -> Outcome<()> {
        self.blocking(move |conn| site_config::delete_device(conn, id))
            .await
    }

    async fn create_session(
        &self,
        session: NewSession,
        life: SessionLife,
    ) -> Result<(), StoreError> {
        self.blocking(move |conn| console::create_session(conn, &session, life))
            .await
    }

    async fn session(
        &self,
        id_sha256: String,
        now: i64,
        life: SessionLife,
    ) -> Result<Option<Session>, StoreError> {
        self.blocking(move |conn| console::session(conn, &id_sha256, now, life))
            .await
    }

    async fn delete_session(&self, id_sha256: String) -> Result<(), StoreError> {
        self.blocking(move |conn| console::delete_session(conn, &id_sha256))
            .await
    }

    async fn config_versions(&self, site_id: i64) -> Result<Vec<ConfigVersion>, StoreError> {
        self.blocking(move |conn| site_config::config_versions(conn, site_id))
            .await
    }

    async fn sync_up(
        &self,
        tenant: String,
        device: String,
        events: Vec<crate::sync::Event>,
    ) -> Result<Vec<crate::sync::Answered>, StoreError> {
        self.blocking(move |conn| sync::up(conn, &tenant, &device, &events))
            .await
    }

    async fn sync_down(
        &self,
        tenant: String,
        cursor: i64,
        limit: i64,
    ) -> Result<Vec<crate::sync::Change>, StoreError> {
        self.blocking(move |conn| sync::down(conn, &tenant, cursor, limit))
            .await
    }

    async fn set_sync_strategy(
        &self,
        tenant: String,
        entity_type: String,
        strategy: crate::sync::Strategy,
    ) -> Result<(), StoreError> {
        self.blocking(move |conn| sync::set_strategy(conn, &tenant, &entity_type, strategy))
            .await
    }

    async fn log_sync(&self, row: crate::sync::LogRow) -> Result<(), StoreError> {
        self.blocking(move |conn| sync::log(conn, &row)).await
    }

    async fn recent_media(
        &self,
        device_id: String,
        limit: u32,
    ) -> Result<Vec<MediaRow>, StoreError> {
        self.blocking(move |conn| console::recent_media(conn, &device_id, limit))
            .await
    }
}

/// Creates the file with mode 0600 if it does not exist (SQLite gives its `-wal` and
/// `-shm` files the same mode); an existing file keeps the mode its operator chose.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map(drop),
    }
}

/// A row of [`LIST_TOKENS`] or [`FIND_TOKEN`].
fn token_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
    let kind: String = r.get(1)?;
    let kind = TokenKind::parse(&kind).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Text,
            format!("tokens.kind: unknown kind {kind:?}").into(),
        )
    })?;
    Ok(TokenInfo {
        id: r.get(0)?,
        kind,
        device_id: r.get(2)?,
        note: r.get(3)?,
        created_at: r.get(4)?,
        revoked_at: r.get(5)?,
        tenant: r.get(6)?,
    })
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

/// The pushes of `batch` in one IMMEDIATE transaction, each through [`insert`]: a row's
/// failed statement is rolled back alone and fails its push only, unless SQLite rolled
/// the whole transaction back (disk full, I/O error), which fails them all, as does a
/// failed commit.
fn insert_batch(conn: &mut Connection, batch: &[NewPush]) -> Flushed {
    let fail_all = |e: rusqlite::Error| Flushed::failed(batch.len(), store_error(e));
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(e),
    };
    let mut answers = Vec::with_capacity(batch.len());
    for push in batch {
        match insert(&tx, push) {
            Err(e) if tx.is_autocommit() => return fail_all(e),
            stored => answers.push(stored.map_err(store_error)),
        }
    }
    match tx.commit() {
        Ok(()) => Flushed {
            answers,
            commits: 1,
        },
        Err(e) => fail_all(e),
    }
}

fn insert(tx: &rusqlite::Transaction<'_>, p: &NewPush) -> rusqlite::Result<Stored> {
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
