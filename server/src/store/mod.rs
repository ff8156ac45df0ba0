//! Where pushes are stored. [`Store`] is what the HTTP layer needs from a store; the
//! embedded SQLite store ([`sqlite`]) and the PostgreSQL store of a fleet ([`postgres`])
//! implement it (its methods are async for PostgreSQL: the SQLite one runs its blocking
//! calls on `spawn_blocking`). [`watch`] checks the store while nothing is pushed.
//!
//! Exactly once is the schema's job: `received` has a UNIQUE (device_id,
//! idempotency_key) constraint and the insert is `INSERT ... ON CONFLICT DO NOTHING
//! RETURNING id`, so of racing pushes with one key exactly one inserts; the others read
//! the original afterwards. No application read-then-write decides.

pub mod postgres;
pub mod sqlite;
pub mod watch;

use std::future::Future;

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

pub trait Store: Clone + Send + Sync + 'static {
    /// Stores `push` once per (device_id, idempotency_key).
    fn store_push(&self, push: NewPush) -> impl Future<Output = Result<Stored, StoreError>> + Send;

    /// Whether the store answers a trivial query.
    fn ready(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
