//! The fleet's store: PostgreSQL through tokio-postgres and a deadpool pool, shared by
//! several servers. Same tables, views and semantics as the SQLite store: the UNIQUE
//! (device_id, idempotency_key) constraint decides in the insert itself; a racing
//! duplicate's insert waits on the unique index for the original's commit, then does
//! nothing and reads the original.
//!
//! Pushes with an Idempotency-Key go through [`super::group_commit`]: a batch is one
//! `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING` ([`INSERT_BATCH`]), then
//! one read of the originals of the rows it did not insert ([`ORIGINALS`]).
//!
//! Surviving the store: the pool drops a connection whose socket closed before handing
//! it out again (`RecyclingMethod::Fast`: PostgreSQL's shutdown or restart closes every
//! connection, so that is how an outage shows; `Verified` would add a round trip to
//! every checkout, a third of a push's store work) and opens new ones by itself when the
//! server is back; a connection that died silently fails its one statement as
//! [`StoreError::Unreachable`] and is dropped;
//! connecting, waiting for a pooled connection and every statement are bounded (a
//! server-side `statement_timeout` and a client-side bound for a server that hangs), and
//! losing the server is [`StoreError::Unreachable`] (503 with `Retry-After`).
//!
//! No TLS yet (`NoTls`): a store on another host goes through a private network or a
//! tunnel. The door is [`Manager::from_config`]'s `tls` argument.
//!
//! The URL may hold a password: only [`PostgresUrl::redacted`] is ever shown.
//!
//! The configuration backend's queries are in [`site_config`]; the tokens' are here.
//! Timestamps are `timestamptz` columns, answered in the text SQLite stores.

mod console;
mod fleet;
mod site_config;
pub mod sync;
mod uploads;

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

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
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "config",
        include_str!("../../migrations/postgres/0002_config.sql"),
    ),
    (
        3,
        "tokens",
        include_str!("../../migrations/postgres/0003_tokens.sql"),
    ),
    (
        4,
        "uploads",
        include_str!("../../migrations/postgres/0004_uploads.sql"),
    ),
    (
        5,
        "heartbeats",
        include_str!("../../migrations/postgres/0005_heartbeats.sql"),
    ),
    (
        6,
        "console",
        include_str!("../../migrations/postgres/0006_console.sql"),
    ),
    (
        7,
        "sync",
        include_str!("../../migrations/postgres/0007_sync.sql"),
    ),
];

/// Serialises migrations across the servers sharing one database (any constant both
/// agree on: "relais" in ASCII).
const MIGRATION_LOCK: i64 = 0x7265_6c61_6973;

/// Connections per server: a push holds one for two short statements.
const POOL_SIZE: usize = 16;
/// Batches of pushes being stored at once. More than one: a batch waits for its commit's
/// WAL flush, and PostgreSQL's own group commit shares that flush between connections.
/// Well below [`POOL_SIZE`]: every authenticated request looks its token up, keyless
/// pushes and the admin API need connections too.
const FLUSHES_IN_FLIGHT: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free connection before it gets a 503.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Enforced by the server on each statement (a lock wait, a slow disk).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Enforced here, for a server that does not answer at all (stopped, partitioned).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

const INSERT: &str = "INSERT INTO received (device_id, endpoint, idempotency_key, local_id,
         body, body_sha256, media_path, media_size, media_sha256)
     VALUES ($1, $2, $3, $4, $5::text::json, $6, $7, $8, $9)
     ON CONFLICT (device_id, idempotency_key) DO NOTHING
     RETURNING id";
const ORIGINAL: &str =
    "SELECT id, body_sha256 FROM received WHERE device_id = $1 AND idempotency_key = $2";
/// A batch of pushes, one array per column. Two pushes with one key in a batch: the
/// unique index skips the second as it skips a committed row. `body_sha256` is returned
/// so that of two such pushes with different bodies the one inserted is known.
const INSERT_BATCH: &str = "INSERT INTO received (device_id, endpoint, idempotency_key,
         local_id, body, body_sha256, media_path, media_size, media_sha256)
     SELECT d, e, k, l, b::json, s, mp, ms, mh
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::text[], $8::bigint[], $9::text[]) AS u(d, e, k, l, b, s, mp, ms, mh)
     ON CONFLICT (device_id, idempotency_key) DO NOTHING
     RETURNING id, device_id, idempotency_key, body_sha256";
/// The stored rows of the (device_id, idempotency_key) pairs a batch did not insert:
/// committed before the batch's insert ended (it waited on the unique index for them).
const ORIGINALS: &str = "SELECT id, device_id, idempotency_key, body_sha256 FROM received
     WHERE (device_id, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))";
const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
     version BIGINT PRIMARY KEY, name TEXT NOT NULL,
     applied_at TIMESTAMPTZ NOT NULL DEFAULT now())";
const MIGRATION_DONE: &str = "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)";
const RECORD_MIGRATION: &str = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)";

/// A token's columns as [`token_row`] reads them, its times in SQLite's text
/// (`2025-01-31T12:00:00Z`).
macro_rules! token_columns {
    () => {
        "id, kind, device_id, note, tenant,
         to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
         to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
    };
}
const INSERT_TOKEN: &str = "INSERT INTO tokens (kind, device_id, note, sha256, tenant)
     VALUES ($1, $2, $3, $4, $5)
     RETURNING id";
const LIST_TOKENS: &str = concat!("SELECT ", token_columns!(), " FROM tokens ORDER BY id");
const FIND_TOKEN: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM tokens WHERE sha256 = $1 AND revoked_at IS NULL"
);
const REVOKE_TOKEN: &str =
    "UPDATE tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL";
const TOKEN_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM tokens WHERE id = $1)";

/// A `postgres://` or `postgresql://` store URL. Its `Debug` is redacted, so a
/// configuration printed whole does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl(String);

impl PostgresUrl {
    pub fn parse(url: &str) -> Option<PostgresUrl> {
        (url.starts_with("postgres://") || url.starts_with("postgresql://"))
            .then(|| PostgresUrl(url.to_string()))
    }

    /// The URL with its password (in the user part or a `password=` parameter)
    /// replaced by `***`: what logs and errors show.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({})", self.redacted())
    }
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{user_info}@{host}"),
        },
        None => authority.to_string(),
    };
    let path = match path.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => path.to_string(),
    };
    format!("{scheme}://{authority}{path}")
}

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The redacted URL, for error lines (shared: the store is cloned for every request).
    target: Arc<str>,
    pushes: Arc<GroupCommit>,
    received: Arc<ReceivedCounts>,
}

impl PostgresStore {
    /// Builds the pool; connects lazily (the first use, e.g. [`Self::migrate`]).
    pub fn open(url: &PostgresUrl) -> Result<PostgresStore, StoreError> {
        let target = url.redacted();
        // tokio-postgres names the option at fault, never its value.
        let mut config = tokio_postgres::Config::from_str(&url.0)
            .map_err(|e| StoreError::Failed(format!("{target}: {}", describe(&e))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("relais-server");
        }
        let options = format!(
            "{} -c statement_timeout={}",
            config.get_options().unwrap_or(""),
            STATEMENT_TIMEOUT.as_millis()
        );
        config.options(options.trim_start());
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Failed(format!("{target}: pool: {e}")))?;
        Ok(PostgresStore {
            pool,
            target: target.into(),
            pushes: Arc::new(GroupCommit::new(FLUSHES_IN_FLIGHT)),
            received: Arc::default(),
        })
    }

    /// Applies the migrations not applied yet; returns their versions. Each one runs in
    /// its own transaction holding an advisory lock, so servers starting together apply
    /// each migration once: the second waits, then finds it recorded.
    pub async fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        let mut client = self.client().await?;
        let fail = |e: tokio_postgres::Error| self.error("migration", &e);
        let mut applied = Vec::new();
        for &(version, name, sql) in MIGRATIONS {
            let tx = client.transaction().await.map_err(fail)?;
            // A migration may legitimately take longer than a push's statement.
            tx.batch_execute("SET LOCAL statement_timeout = 0")
                .await
                .map_err(fail)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(fail)?;
            tx.batch_execute(CREATE_SCHEMA_MIGRATIONS)
                .await
                .map_err(fail)?;
            let done: bool = tx
                .query_one(MIGRATION_DONE, &[&version])
                .await
                .map_err(fail)?
                .get(0);
            if done {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(|e| self.error(&format!("migration {version} {name}"), &e))?;
            tx.execute(RECORD_MIGRATION, &[&version, &name])
                .await
                .map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            applied.push(version);
        }
        Ok(applied)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    /// Runs `op` within [`OPERATION_TIMEOUT`].
    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(OPERATION_TIMEOUT, op)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unreachable(format!(
                    "{}: no answer within {}s",
                    self.target,
                    OPERATION_TIMEOUT.as_secs()
                )))
            })
    }

    async fn insert(&self, p: &NewPush) -> Result<Stored, StoreError> {
        let client = self.client().await?;
        let fail = |e: tokio_postgres::Error| self.error("push", &e);
        let insert = client.prepare_cached(INSERT).await.map_err(fail)?;
        let media = p.media.as_ref();
        let inserted = client
            .query_opt(
                &insert,
                &[
                    &p.device_id,
                    &p.endpoint,
                    &p.idempotency_key,
                    &p.local_id,
                    &p.body,
                    &p.body_sha256,
                    &media.map(|m| &m.path),
                    &media.map(|m| m.size as i64),
                    &media.map(|m| &m.sha256),
                ],
            )
            .await
            .map_err(fail)?;
        if let Some(row) = inserted {
            return Ok(Stored::New(row.get(0)));
        }
        // Not inserted: the key is taken by a committed row (the insert waited for it).
        let original = client.prepare_cached(ORIGINAL).await.map_err(fail)?;
        let row = client
            .query_one(&original, &[&p.device_id, &p.idempotency_key])
            .await
            .map_err(fail)?;
        let (id, sha): (i64, String) = (row.get(0), row.get(1));
        Ok(if sha == p.body_sha256 {
            Stored::Replay(id)
        } else {
            Stored::Mismatch(id)
        })
    }

    /// Stores a batch of keyed pushes with [`INSERT_BATCH`] and answers the rows it did
    /// not insert from [`ORIGINALS`]. `Err`: the insert failed, nothing of the batch
    /// is stored. A failed read of the originals fails only the pushes it would have
    /// answered: the new rows are committed, and their callers must know it (a media
    /// push answered with an error would delete the file its row names).
    async fn insert_batch(
        &self,
        batch: &[NewPush],
    ) -> Result<Vec<Result<Stored, StoreError>>, StoreError> {
        let client = self.client().await?;
        let fail = |e: tokio_postgres::Error| self.error("push batch", &e);
        // Inserted in one order, (device_id, key), in every batch of every server: two
        // batches waiting on each other's keys in opposite orders would deadlock.
        let mut order: Vec<&NewPush> = batch.iter().collect();
        order.sort_by(|a, b| {
            (&a.device_id, &a.idempotency_key).cmp(&(&b.device_id, &b.idempotency_key))
        });
        let column = |f: fn(&NewPush) -> Option<&str>| order.iter().map(|p| f(p)).collect();
        let media_size: Vec<Option<i64>> = order
            .iter()
            .map(|p| p.media.as_ref().map(|m| m.size as i64))
            .collect();
        let columns: [Vec<Option<&str>>; 8] = [
            column(|p| Some(&p.device_id)),
            column(|p| Some(&p.endpoint)),
            column(|p| p.idempotency_key.as_deref()),
            column(|p| p.local_id.as_deref()),
            column(|p| Some(&p.body)),
            column(|p| Some(&p.body_sha256)),
            column(|p| p.media.as_ref().map(|m| m.path.as_str())),
            column(|p| p.media.as_ref().map(|m| m.sha256.as_str())),
        ];
        // In INSERT_BATCH's order: the media size, the one integer column, is eighth.
        let (text, media_sha) = columns.split_at(7);
        let params: Vec<&(dyn ToSql + Sync)> = text
            .iter()
            .map(|c| c as &(dyn ToSql + Sync))
            .chain([&media_size as &(dyn ToSql + Sync), &media_sha[0]])
            .collect();
        let inserted = self
            .bounded(async {
                let insert = client.prepare_cached(INSERT_BATCH).await.map_err(fail)?;
                client.query(&insert, &params).await.map_err(fail)
            })
            .await?;
        let mut answers: Vec<Option<Result<Stored, StoreError>>> = vec![None; batch.len()];
        answer_from(batch, &mut answers, key_rows(&inserted), true);
        let missing: Vec<&NewPush> = batch
            .iter()
            .zip(&answers)
            .filter(|(_, a)| a.is_none())
            .map(|(p, _)| p)
            .collect();
        if !missing.is_empty() {
            let devices: Vec<&str> = missing.iter().map(|p| p.device_id.as_str()).collect();
            let keys: Vec<Option<&str>> = missing
                .iter()
                .map(|p| p.idempotency_key.as_deref())
                .collect();
            let originals = self
                .bounded(async {
                    let read = client.prepare_cached(ORIGINALS).await.map_err(fail)?;
                    client.query(&read, &[&devices, &keys]).await.map_err(fail)
                })
                .await;
            match originals {
                Ok(rows) => answer_from(batch, &mut answers, key_rows(&rows), false),
                Err(e) => answers.iter_mut().for_each(|a| {
                    a.get_or_insert_with(|| Err(e.clone()));
                }),
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(StoreError::Failed(format!(
                        "{}: push batch: a row neither inserted nor found",
                        self.target
                    )))
                })
            })
            .collect())
    }

    fn error(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        let detail = format!("{} ({what}): {}", self.target, describe(e));
        if is_unreachable(e) {
            StoreError::Unreachable(detail)
        } else {
            StoreError::Failed(detail)
        }
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Backend(e) => self.error("connect", &e),
            PoolError::Timeout(_) | PoolError::Closed => {
                StoreError::Unreachable(format!("{}: no connection: {e}", self.target))
            }
            other => StoreError::Failed(format!("{}: pool: {other}", self.target)),
        }
    }

    /// Runs `op` (`what` names it in its error line) within [`OPERATION_TIMEOUT`], its
    /// database errors classified as [`Self::error`] does.
    async fn run<T>(
        &self,
        what: &str,
        op: impl Future<Output = Result<T, Fault>>,
    ) -> Result<T, StoreError> {
        self.bounded(async {
            op.await.map_err(|fault| match fault {
                Fault::Db(e) => self.error(what, &e),
                Fault::Store(e) => e,
            })
        })
        .await
    }
}

/// Why an operation failed, before [`PostgresStore::run`] makes it a [`StoreError`]:
/// lets the queries use `?` on database errors and store errors alike.
enum Fault {
    Db(tokio_postgres::Error),
    /// Already classified: no connection, or a row that makes no sense.
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fault {
    fn from(e: tokio_postgres::Error) -> Fault {
        Fault::Db(e)
    }
}

impl From<StoreError> for Fault {
    fn from(e: StoreError) -> Fault {
        Fault::Store(e)
    }
}

/// `(id, device_id, idempotency_key, body_sha256)` rows of [`INSERT_BATCH`] or
/// [`ORIGINALS`] by (device_id, idempotency_key), with whether a push of the batch was
/// answered as the new row yet.
type KeyRows = HashMap<(String, String), (i64, String, bool)>;

fn key_rows(rows: &[Row]) -> KeyRows {
    rows.iter()
        .map(|r| ((r.get(1), r.get(2)), (r.get(0), r.get(3), false)))
        .collect()
}

/// Answers each unanswered push of `batch` whose key is in `rows`: with the same body,
/// the first one is the new row when `inserted` and every other one a replay; with
/// another body, a mismatch.
fn answer_from(
    batch: &[NewPush],
    answers: &mut [Option<Result<Stored, StoreError>>],
    mut rows: KeyRows,
    inserted: bool,
) {
    for (push, answer) in batch.iter().zip(answers.iter_mut()) {
        let (Some(key), None) = (&push.idempotency_key, &answer) else {
            continue;
        };
        let Some((id, sha, claimed)) = rows.get_mut(&(push.device_id.clone(), key.clone())) else {
            continue;
        };
        *answer = Some(Ok(if *sha != push.body_sha256 {
            Stored::Mismatch(*id)
        } else if inserted && !*claimed {
            *claimed = true;
            Stored::New(*id)
        } else {
            Stored::Replay(*id)
        }));
    }
}

impl Flush for PostgresStore {
    /// A batch whose insert fails for another reason than the connection (one bad row)
    /// is stored row by row, so only the bad row fails; a lost connection fails them all
    /// with [`StoreError::Unreachable`] (503: the agents retry).
    async fn flush(&self, batch: Vec<NewPush>) -> Flushed {
        // A lone push (one device, or a quiet store) takes the single-row statement:
        // pgbench at one client ran it at 9,700 to 10,300 transactions/s against 6,400
        // to 8,300 for the same row through INSERT_BATCH's nine arrays (fsync off, so
        // the statement's own cost): about 35 µs of a push's round trip.
        if let [push] = batch.as_slice() {
            let answer = self.bounded(self.insert(push)).await;
            let commits = u64::from(answer.is_ok());
            return Flushed {
                answers: vec![answer],
                commits,
            };
        }
        match self.insert_batch(&batch).await {
            Ok(answers) => Flushed {
                answers,
                commits: 1,
            },
            Err(e @ StoreError::Unreachable(_)) => Flushed::failed(batch.len(), e),
            Err(StoreError::Failed(detail)) => {
                tracing::warn!(
                    "{detail}; storing the batch's {} pushes one by one",
                    batch.len()
                );
                let mut answers = Vec::with_capacity(batch.len());
                for push in &batch {
                    answers.push(self.bounded(self.insert(push)).await);
                }
                let commits = answers.iter().filter(|a| a.is_ok()).count() as u64;
                Flushed { answers, commits }
            }
        }
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The first row of the named query `sql` (prepared once per connection), if any.
async fn first(
    c: &impl GenericClient,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.query_opt(&statement, params).await
}

async fn rows(
    c: &impl GenericClient,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.query(&statement, params).await
}

/// Runs the named statement `sql`; returns the number of rows it changed.
async fn exec(
    c: &impl GenericClient,
    sql: &str,
    params: Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.execute(&statement, params).await
}

/// A row of [`LIST_TOKENS`] or [`FIND_TOKEN`].
fn token_row(r: &Row) -> Result<TokenInfo, Fault> {
    let kind: String = r.get(1);
    let kind = TokenKind::parse(&kind).ok_or_else(|| {
        Fault::Store(StoreError::Failed(format!(
            "tokens.kind: unknown kind {kind:?}"
        )))
    })?;
    Ok(TokenInfo {
        id: r.get(0),
        kind,
        device_id: r.get(2),
        note: r.get(3),
        tenant: r.get(4),
        created_at: r.get(5),
        revoked_at: r.get(6),
    })
}

impl Store for PostgresStore {
    async fn store_push(&self, push: NewPush) -> Result<Stored, StoreError> {
        let device_id = push.device_id.clone();
        let stored = if push.idempotency_key.is_none() {
            // A keyless push is a new row every time: nothing in a batch's RETURNING
            // rows (the table's columns only) would say which request a row is.
            self.bounded(self.insert(&push)).await
        } else {
            self.pushes.push(self, push).await
        };
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
        self.run("heartbeat", async {
            fleet::record_heartbeat(
                &mut self.client().await?,
                &device_id,
                received_at,
                &heartbeat,
                &json,
            )
            .await
        })
        .await
    }

    async fn fleet(&self, today_start: i64) -> Result<Vec<FleetEntry>, StoreError> {
        self.run("fleet", async {
            fleet::fleet(&self.client().await?, today_start).await
        })
        .await
    }

    async fn device_history(
        &self,
        device_id: String,
        since: i64,
    ) -> Result<DeviceHistory, StoreError> {
        self.run("device history", async {
            fleet::device_history(&mut self.client().await?, &device_id, since).await
        })
        .await
    }

    async fn add_received(&self, counts: Vec<(String, i64, u64)>) -> Result<(), StoreError> {
        self.run("received rows per hour", async {
            fleet::add_received(&self.client().await?, &counts).await
        })
        .await
    }

    async fn prune_history(&self, before: i64) -> Result<u64, StoreError> {
        self.run("prune history", async {
            fleet::prune_history(&mut self.client().await?, before).await
        })
        .await
    }

    async fn record_config_pull(
        &self,
        device_id: String,
        site_token_sha256: String,
        hash: String,
        pulled_at: i64,
    ) -> Result<(), StoreError> {
        self.run("config pull", async {
            fleet::record_config_pull(
                &self.client().await?,
                &device_id,
                &site_token_sha256,
                &hash,
                pulled_at,
            )
            .await
        })
        .await
    }

    async fn create_upload(&self, upload: Upload, now: i64) -> Result<Creation, StoreError> {
        self.run("create upload", async {
            uploads::create(&mut self.client().await?, &upload, now).await
        })
        .await
    }

    async fn upload(&self, id: String, now: i64) -> Result<Option<Upload>, StoreError> {
        self.run("upload", async {
            uploads::live(&self.client().await?, &id, now).await
        })
        .await
    }

    async fn claim_upload(
        &self,
        id: String,
        offset: u64,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        self.run("claim upload", async {
            uploads::claim(&self.client().await?, &id, offset, now, until).await
        })
        .await
    }

    async fn settle_upload(
        &self,
        id: String,
        from: u64,
        to: u64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        self.run("settle upload", async {
            uploads::settle(&self.client().await?, &id, from, to, expires_at).await
        })
        .await
    }

    async fn complete_upload(&self, id: String, row_id: i64) -> Result<(), StoreError> {
        self.run("complete upload", async {
            uploads::complete(&self.client().await?, &id, row_id).await
        })
        .await
    }

    async fn remove_upload(&self, id: String) -> Result<(), StoreError> {
        self.run("remove upload", async {
            uploads::remove(&self.client().await?, &id).await
        })
        .await
    }

    async fn expire_uploads(&self, now: i64) -> Result<Vec<(String, bool)>, StoreError> {
        self.run("expire uploads", async {
            uploads::expire(&self.client().await?, now).await
        })
        .await
    }

    async fn add_token(&self, token: NewToken) -> Result<i64, StoreError> {
        self.run("add token", async {
            let client = self.client().await?;
            let row = first(
                &client,
                INSERT_TOKEN,
                &[
                    &token.kind.as_str(),
                    &token.device_id,
                    &token.note,
                    &token.sha256,
                    &token.tenant,
                ],
            )
            .await?;
            // RETURNING of a plain INSERT: one row, or an error.
            let row =
                row.ok_or_else(|| StoreError::Failed("tokens: insert answered no id".into()))?;
            Ok(row.get(0))
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        self.run("list tokens", async {
            let client = self.client().await?;
            rows(&client, LIST_TOKENS, &[])
                .await?
                .iter()
                .map(token_row)
                .collect()
        })
        .await
    }

    async fn revoke_token(&self, id: i64) -> Result<Revoked, StoreError> {
        self.run("revoke token", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let revoked = if exec(&tx, REVOKE_TOKEN, &[&id]).await? == 1 {
                Revoked::Now
            } else {
                let exists: bool = rows(&tx, TOKEN_EXISTS, &[&id]).await?[0].get(0);
                if exists {
                    Revoked::Already
                } else {
                    Revoked::NoSuchToken
                }
            };
            tx.commit().await?;
            Ok(revoked)
        })
        .await
    }

    async fn find_token(&self, sha256: String) -> Result<Option<TokenInfo>, StoreError> {
        self.run("find token", async {
            let client = self.client().await?;
            first(&client, FIND_TOKEN, &[&sha256])
                .await?
                .map(|r| token_row(&r))
                .transpose()
        })
        .await
    }

    async fn site_config(
        &self,
        token_sha256: String,
    ) -> Result<Option<(SiteFields, Vec<DeviceFields>)>, StoreError> {
        self.run("site config", async {
            site_config::site_config(&mut self.client().await?, &token_sha256).await
        })
        .await
    }

    async fn create_site(&self, site: NewSite) -> Outcome<Site> {
        self.run("create site", async {
            site_config::create_site(&mut self.client().await?, &site).await
        })
        .await
    }

    async fn sites(&self) -> Result<Vec<Site>, StoreError> {
        self.run("sites", async {
            site_config::sites(&self.client().await?).await
        })
        .await
    }

    async fn site(&self, id: i64) -> Outcome<Site> {
        self.run("site", async {
            site_config::site(&self.client().await?, id).await
        })
        .await
    }

    async fn update_site(&self, id: i64, patch: SitePatch) -> Outcome<Site> {
        self.run("update site", async {
            site_config::update_site(&mut self.client().await?, id, &patch).await
        })
        .await
    }

    async fn delete_site(&self, id: i64) -> Outcome<()> {
        self.run("delete site", async {
            site_config::delete_site(&self.client().await?, id).await
        })
        .await
    }

    async fn create_device(&self, device: NewDevice) -> Outcome<Device> {
        self.run("create device", async {
            site_config::create_device(&mut self.client().await?, &device).await
        })
        .await
    }

    async fn devices(&self, site_id: Option<i64>) -> Result<Vec<Device>, StoreError> {
        self.run("devices", async {
            site_config::devices(&self.client().await?, site_id).await
        })
        .await
    }

    async fn device(&self, id: i64) -> Outcome<Device> {
        self.run("device", async {
            site_config::device(&self.client().await?, id).await
        })
        .await
    }

    async fn update_device(&self, id: i64, patch: DevicePatch) -> Outcome<Device> {
        self.run("update device", async {
            site_config::update_device(&mut self.client().await?, id, &patch).await
        })
        .await
    }

    async fn delete_device(&self, id: i64) -> Outcome<()> {
        self.run("delete device", async {
            site_config::delete_device(&mut self.client().await?, id).await
        })
        .await
    }

    async fn create_session(
        &self,
        session: NewSession,
        life: SessionLife,
    ) -> Result<(), StoreError> {
        self.run("create session", async {
            console::create_session(&mut self.client().await?, &session, life).await
        })
        .await
    }

    async fn session(
        &self,
        id_sha256: String,
        now: i64,
        life: SessionLife,
    ) -> Result<Option<Session>, StoreError> {
        self.run("session", async {
            console::session(&self.client().await?, &id_sha256, now, life).await
        })
        .await
    }

    async fn delete_session(&self, id_sha256: String) -> Result<(), StoreError> {
        self.run("delete session", async {
            console::delete_session(&self.client().await?, &id_sha256).await
        })
        .await
    }

    async fn config_versions(&self, site_id: i64) -> Result<Vec<ConfigVersion>, StoreError> {
        self.run("config versions", async {
            site_config::config_versions(&self.client().await?, site_id).await
        })
        .await
    }

    async fn sync_up(
        &self,
        tenant: String,
        device: String,
        events: Vec<crate::sync::Event>,
    ) -> Result<Vec<crate::sync::Answered>, StoreError> {
        self.run("sync up", async {
            sync::up(&mut self.client().await?, &tenant, &device, &events).await
        })
        .await
    }

    async fn sync_down(
        &self,
        tenant: String,
        cursor: i64,
        limit: i64,
    ) -> Result<Vec<crate::sync::Change>, StoreError> {
        self.run("sync down", async {
            sync::down(&self.client().await?, &tenant, cursor, limit).await
        })
        .await
    }

    async fn set_sync_strategy(
        &self,
        tenant: String,
        entity_type: String,
        strategy: crate::sync::Strategy,
    ) -> Result<(), StoreError> {
        self.run("sync strategy", async {
            sync::set_strategy(&self.client().await?, &tenant, &entity_type, strategy).await
        })
        .await
    }

    async fn log_sync(&self, row: crate::sync::LogRow) -> Result<(), StoreError> {
        self.run("sync log", async {
            sync::log(&self.client().await?, &row).await
        })
        .await
    }

    async fn recent_media(
        &self,
        device_id: String,
        limit: u32,
    ) -> Result<Vec<MediaRow>, StoreError> {
        self.run("recent media", async {
            console::recent_media(&self.client().await?, &device_id, limit).await
        })
        .await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| self.error("ready", &e))?;
            Ok(())
        })
        .await
    }
}

/// tokio-postgres' `Display` is its kind alone ("db error"); the cause says what.
fn describe(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Whether `e` means the server is not there for now: a lost or refused connection, or
/// the server shutting down, starting, out of connections or cancelling a statement
/// that ran too long. Other database errors are failures (500).
fn is_unreachable(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        return code.code().starts_with("08")
            || [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
                SqlState::TOO_MANY_CONNECTIONS,
                SqlState::QUERY_CANCELED,
            ]
            .contains(code);
    }
    e.is_closed() || std::error::Error::source(e).is_some_and(|cause| cause.is::<std::io::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        let r = |u: &str| PostgresUrl::parse(u).expect("url").redacted();
        assert_eq!(
            r("postgres://relais:s3cret@db:5432/relais"),
            "postgres://relais:***@db:5432/relais"
        );
        assert_eq!(r("postgresql://relais@db/x"), "postgresql://relais@db/x");
        assert_eq!(
            r("postgres://u:p%40ss@h/db?sslmode=disable&password=s3cret"),
            "postgres://u:***@h/db?sslmode=disable&password=***"
        );
        assert_eq!(r("postgres://u:a@b@h"), "postgres://u:***@h");
        let debug = format!("{:?}", PostgresUrl::parse("postgres://u:s3cret@h/d"));
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(PostgresUrl::parse("sqlite:x").is_none());
    }
}
