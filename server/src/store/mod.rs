//! Where pushes are stored. [`Store`] is what the HTTP layer needs from a store; the
//! embedded SQLite store ([`sqlite`]) and the PostgreSQL store of a fleet ([`postgres`])
//! implement it (its methods are async for PostgreSQL: the SQLite one runs its blocking
//! calls on `spawn_blocking`). [`watch`] checks the store while nothing is pushed.
//!
//! Exactly once is the schema's job: `received` has a UNIQUE (device_id,
//! idempotency_key) constraint and the insert is `INSERT ... ON CONFLICT DO NOTHING
//! RETURNING id`, so of racing pushes with one key exactly one inserts; the others read
//! the original afterwards. No application read-then-write decides. Concurrent pushes
//! share a transaction ([`group_commit`]): one commit answers a batch.
//!
//! The configuration backend (seed 001, [`crate::site_config`]) is stored the same way:
//! UNIQUE constraints decide a duplicate token or (site, ip), and every change to a
//! site or its devices recomputes the site's hash with
//! [`crate::site_config::config_hash`] in the change's own transaction, updating
//! `config_version` and `config_updated_at` only when the hash moved.
//!
//! What the server knows of its agents (heartbeats, hourly history, rows received per
//! hour, configuration pulls) is in [`fleet`].

pub mod fleet;
pub mod group_commit;
pub mod postgres;
pub mod sqlite;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

pub use fleet::{DeviceHistory, FleetEntry, HourPoint};
use relais_wire::heartbeat::Heartbeat;

use crate::sync;

use crate::site_config::{
    Device, DeviceFields, DevicePatch, NewDevice, NewSite, Site, SiteFields, SitePatch,
};

/// A push about to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPush {
    pub device_id: String,
    /// The request path, e.g. `/api/evenements`.
    pub endpoint: String,
    /// `None`: stored as a new row every time (the seed backend's behaviour).
    pub idempotency_key: Option<String>,
    /// The local id part of the key, for the typed views.
    pub local_id: Option<String>,
    /// The JSON as sent, with the media field replaced by a reference to its file.
    pub body: String,
    /// SHA-256 of the body exactly as sent: a replay must match it.
    pub body_sha256: String,
    pub media: Option<MediaMeta>,
}

/// The stored file of a media push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaMeta {
    /// Relative to the media directory.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// What [`Store::store_push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new row with this id.
    New(i64),
    /// The key was already stored with the same body: the original row's id.
    Replay(i64),
    /// The key was already stored with a different body: nothing stored.
    Mismatch(i64),
}

/// A resumable upload (README, "Resumable media uploads") as the `uploads` table keeps
/// it; times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub id: String,
    pub device_id: String,
    pub idempotency_key: String,
    /// `/api/<name>`: where the row would have been pushed.
    pub endpoint: String,
    /// The JSON member the BLOB belongs to.
    pub field: String,
    /// The row's other members, a JSON object as text.
    pub json: String,
    /// SHA-256 of the whole BLOB, lowercase hex.
    pub sha256: String,
    pub length: u64,
    pub offset: u64,
    pub expires_at: i64,
    /// The stored row, once the upload completed.
    pub row_id: Option<i64>,
}

/// What [`Store::create_upload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// A new upload; `expired`: the id of an expired upload of the same key the store
    /// removed to make room (its partial file is the caller's to remove).
    New {
        upload: Upload,
        expired: Option<String>,
    },
    /// The key's upload, not expired: a POST repeated after a lost answer.
    Existing(Upload),
    /// The key's row is stored already: its id.
    Stored(i64),
}

/// Who a token speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Pushes the rows of one device.
    Device,
    /// The admin API and the metrics.
    Admin,
}

impl TokenKind {
    /// The value of the `tokens.kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Device => "device",
            TokenKind::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<TokenKind> {
        match s {
            "device" => Some(TokenKind::Device),
            "admin" => Some(TokenKind::Admin),
            _ => None,
        }
    }
}

/// A token about to be stored: its hash, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    pub kind: TokenKind,
    /// `Some` exactly for a device token.
    pub device_id: Option<String>,
    pub note: Option<String>,
    /// The sync tenant of a device token (README, "Two-way sync: the server"); a device
    /// token without one cannot sync.
    pub tenant: Option<String>,
    /// SHA-256 of the token, lowercase hex.
    pub sha256: String,
}

/// A stored token as `token list` shows it (the hash stays in the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: i64,
    pub kind: TokenKind,
    pub device_id: Option<String>,
    pub note: Option<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
    pub tenant: Option<String>,
}

/// What [`Store::revoke_token`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Now,
    Already,
    NoSuchToken,
}

/// A console session about to be stored (README, "Fleet console"); times are Unix
/// seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// SHA-256 of the random id the cookie holds, lowercase hex.
    pub id_sha256: String,
    /// SHA-256 of the admin token it was opened with: the session lives as long as it.
    pub token_sha256: String,
    pub csrf: String,
    pub now: i64,
}

/// A live console session, as [`Store::session`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub token_sha256: String,
    pub csrf: String,
}

/// How long a session lives, in seconds: since its last request, and at most since its
/// creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLife {
    pub idle_s: i64,
    pub absolute_s: i64,
}

/// One configuration a site served ([`Store::config_versions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigVersion {
    pub id: i64,
    pub hash: String,
    /// The body of `GET /config/{site_token}` at that version, secrets included.
    pub body: String,
    /// ISO-8601 UTC, as `config_updated_at`.
    pub created_at: String,
}

/// How many versions of a site's configuration the store keeps.
pub const CONFIG_VERSIONS_KEPT: i64 = 50;

/// A media row of a device, as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRow {
    pub id: i64,
    /// ISO-8601 UTC.
    pub received_at: String,
    pub size: Option<u64>,
}

/// A store failure: the server's problem, not the client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot be reached now (connection refused or lost, no connection free
    /// in time, a statement that did not finish in time): transient, the client should
    /// retry later (503 with `Retry-After`).
    Unreachable(String),
    /// Any other failure (500).
    Failed(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unreachable(d) => write!(f, "store: unreachable: {d}"),
            StoreError::Failed(d) => write!(f, "store: {d}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Why a configuration change was refused: the request's problem, not the store's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No row with the id of the path.
    NotFound,
    /// A UNIQUE constraint refused it: the site token, or the device's (site, ip).
    Duplicate,
    /// The body's `site_id` names no site.
    UnknownSite,
}

/// A configuration change: done, refused, or failed in the store.
pub type Outcome<T> = Result<Result<T, Refused>, StoreError>;

pub trait Store: Clone + Send + Sync + 'static {
    /// Stores `push` once per (device_id, idempotency_key).
    fn store_push(&self, push: NewPush) -> impl Future<Output = Result<Stored, StoreError>> + Send;

    /// Creates `upload` (offset 0) once per (device_id, idempotency_key), unless the
    /// key's row is stored already; an expired upload of the key (not claimed) is
    /// replaced. `now`: Unix seconds.
    fn create_upload(
        &self,
        upload: Upload,
        now: i64,
    ) -> impl Future<Output = Result<Creation, StoreError>> + Send;

    /// The upload, unless unknown or expired at `now`.
    fn upload(
        &self,
        id: String,
        now: i64,
    ) -> impl Future<Output = Result<Option<Upload>, StoreError>> + Send;

    /// Claims the upload for appending at `offset` until `until`: `false` when it is
    /// not at that offset, expired, completed or claimed by another request (one
    /// conditional update decides, on every server of a fleet alike).
    fn claim_upload(
        &self,
        id: String,
        offset: u64,
        now: i64,
        until: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Moves a claimed upload from offset `from` to `to`, releases the claim and sets
    /// its expiry; `to == from` only releases it. `false` when it is no longer at
    /// `from` (removed meanwhile).
    fn settle_upload(
        &self,
        id: String,
        from: u64,
        to: u64,
        expires_at: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Records the row a completed upload stored.
    fn complete_upload(
        &self,
        id: String,
        row_id: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn remove_upload(&self, id: String) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the uploads expired at `now` and not claimed; returns their ids and
    /// whether each had completed (a completed one has no partial file left).
    fn expire_uploads(
        &self,
        now: i64,
    ) -> impl Future<Output = Result<Vec<(String, bool)>, StoreError>> + Send;

    /// The group commit's counters, for `/metrics`.
    fn commit_counts(&self) -> Arc<group_commit::Counts>;

    /// The rows stored new per (device, hour) and not flushed yet ([`fleet::flush`]).
    fn received_counts(&self) -> Arc<fleet::ReceivedCounts>;

    /// Keeps `heartbeat` (`json`: its text as received) as the device's latest and as
    /// its hour's (`received_at`'s) point of history, replacing an earlier one of the
    /// same hour.
    fn record_heartbeat(
        &self,
        device_id: String,
        received_at: i64,
        heartbeat: Heartbeat,
        json: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// One per device known to the server: every device token's device_id (not revoked)
    /// and every device with a heartbeat; `None` fields for "never seen". Two queries
    /// whatever the number of devices.
    fn fleet(
        &self,
        today_start: i64,
    ) -> impl Future<Output = Result<Vec<FleetEntry>, StoreError>> + Send;

    /// The device's latest heartbeat and its hours from `since` on.
    fn device_history(
        &self,
        device_id: String,
        since: i64,
    ) -> impl Future<Output = Result<DeviceHistory, StoreError>> + Send;

    /// Adds (device_id, hour, rows) to the rows received per hour: additive, so the
    /// servers sharing a store add up.
    fn add_received(
        &self,
        counts: Vec<(String, i64, u64)>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the hours (heartbeat history and rows received) before `before`; returns
    /// how many rows went.
    fn prune_history(&self, before: i64) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Records that `device_id` pulled the configuration of the site whose token has
    /// this SHA-256, and was served `hash`, at `pulled_at`.
    fn record_config_pull(
        &self,
        device_id: String,
        site_token_sha256: String,
        hash: String,
        pulled_at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores a new token; returns its id.
    fn add_token(&self, token: NewToken) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// Every token, oldest first.
    fn list_tokens(&self) -> impl Future<Output = Result<Vec<TokenInfo>, StoreError>> + Send;

    fn revoke_token(&self, id: i64) -> impl Future<Output = Result<Revoked, StoreError>> + Send;

    /// The token, not revoked, whose SHA-256 is `sha256`: the index lookup is the
    /// comparison, so no byte of the secret is compared in the application.
    fn find_token(
        &self,
        sha256: String,
    ) -> impl Future<Output = Result<Option<TokenInfo>, StoreError>> + Send;

    /// Whether the store answers a trivial query.
    fn ready(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The site whose token has this SHA-256, and its devices in id order, read in one
    /// transaction; `None` for an unknown token.
    fn site_config(
        &self,
        token_sha256: String,
    ) -> impl Future<Output = Result<Option<(SiteFields, Vec<DeviceFields>)>, StoreError>> + Send;

    fn create_site(&self, site: NewSite) -> impl Future<Output = Outcome<Site>> + Send;
    fn sites(&self) -> impl Future<Output = Result<Vec<Site>, StoreError>> + Send;
    fn site(&self, id: i64) -> impl Future<Output = Outcome<Site>> + Send;
    fn update_site(&self, id: i64, patch: SitePatch) -> impl Future<Output = Outcome<Site>> + Send;
    /// Deletes the site and (ON DELETE CASCADE) its devices.
    fn delete_site(&self, id: i64) -> impl Future<Output = Outcome<()>> + Send;

    fn create_device(&self, device: NewDevice) -> impl Future<Output = Outcome<Device>> + Send;
    /// All devices, or those of one site, in id order.
    fn devices(
        &self,
        site_id: Option<i64>,
    ) -> impl Future<Output = Result<Vec<Device>, StoreError>> + Send;
    fn device(&self, id: i64) -> impl Future<Output = Outcome<Device>> + Send;
    fn update_device(
        &self,
        id: i64,
        patch: DevicePatch,
    ) -> impl Future<Output = Outcome<Device>> + Send;
    fn delete_device(&self, id: i64) -> impl Future<Output = Outcome<()>> + Send;

    /// Stores a new console session; sessions dead by `life` at `session.now` are
    /// removed in the same go (logins are rare, so that is often enough).
    fn create_session(
        &self,
        session: NewSession,
        life: SessionLife,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The session whose id has this SHA-256 if it is alive at `now` by `life`, its
    /// last request moved to `now` in the same statement.
    fn session(
        &self,
        id_sha256: String,
        now: i64,
        life: SessionLife,
    ) -> impl Future<Output = Result<Option<Session>, StoreError>> + Send;

    fn delete_session(
        &self,
        id_sha256: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The site's kept configuration versions, newest first.
    fn config_versions(
        &self,
        site_id: i64,
    ) -> impl Future<Output = Result<Vec<ConfigVersion>, StoreError>> + Send;

    /// The device's last `limit` media rows, newest first.
    fn recent_media(
        &self,
        device_id: String,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<MediaRow>, StoreError>> + Send;

    /// Applies `events` of `device` for `tenant` in order, in ONE transaction that
    /// holds the tenant's counter row from its start to its commit ([`crate::sync`]);
    /// answers each, a replayed event (its id in `sync_events_applied`) with its first
    /// answer. `Err`: nothing of the request is stored.
    fn sync_up(
        &self,
        tenant: String,
        device: String,
        events: Vec<sync::Event>,
    ) -> impl Future<Output = Result<Vec<sync::Answered>, StoreError>> + Send;

    /// The tenant's changes after `cursor`, in seq order, at most `limit`.
    fn sync_down(
        &self,
        tenant: String,
        cursor: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<sync::Change>, StoreError>> + Send;

    /// Sets the conflict strategy of the tenant's entity type.
    fn set_sync_strategy(
        &self,
        tenant: String,
        entity_type: String,
        strategy: sync::Strategy,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Adds one row to the audit trail.
    fn log_sync(&self, row: sync::LogRow) -> impl Future<Output = Result<(), StoreError>> + Send;
}
