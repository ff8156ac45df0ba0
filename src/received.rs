//! What arrived at relais-server, as the demo, the tests and the benchmarks check it:
//! the rows of its `received` table, read from the store's SQLite file, each media file
//! located under the media directory. The server runs in-process
//! ([`EmbeddedServer`]).

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::Connection;

pub use relais_server::embedded::EmbeddedServer;

const ROWS: &str = "SELECT id, endpoint, idempotency_key, body, media_path, media_size
                    FROM received ORDER BY id";
const STORED: &str = "SELECT count(*) FROM received";
const ARRIVALS: &str = "SELECT id, endpoint, json_extract(body, '$.date'),
                               unixepoch(received_at, 'subsec')
                        FROM received WHERE id > ?1 ORDER BY id";

/// One stored push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRow {
    pub id: i64,
    /// The `<name>` of `/api/<name>`: `"evenements"`, `"media"`, ...
    pub endpoint: String,
    pub idempotency_key: Option<String>,
    /// The body as sent, its media field (a string longer than 64 KiB) replaced by
    /// `{"media_path": ..., "size": ..., "sha256": ...}`.
    pub json: String,
    /// That string's base64-decoded bytes: the media file.
    pub blob: Option<PathBuf>,
    pub blob_len: Option<u64>,
}

/// Every stored row, ordered by id.
pub fn rows(server: &EmbeddedServer) -> Result<Vec<ReceivedRow>, String> {
    let conn = open(server)?;
    let mut stmt = conn.prepare(ROWS).map_err(|e| fail(server, e))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(ReceivedRow {
                id: r.get(0)?,
                endpoint: endpoint_name(r.get(1)?),
                idempotency_key: r.get(2)?,
                json: r.get(3)?,
                blob: r
                    .get::<_, Option<String>>(4)?
                    .map(|name| server.media_dir().join(name)),
                blob_len: r.get::<_, Option<i64>>(5)?.map(|n| n.max(0) as u64),
            })
        })
        .map_err(|e| fail(server, e))?;
    rows.collect::<Result<_, _>>().map_err(|e| fail(server, e))
}

/// When a stored row arrived: the store's `received_at`, stamped by the statement that
/// stored it (millisecond precision).
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub id: i64,
    /// As in [`ReceivedRow::endpoint`].
    pub endpoint: String,
    /// The payload's `date`.
    pub date: Option<String>,
    /// Seconds since the Unix epoch.
    pub at: f64,
}

/// The rows stored after row `after_id`, ordered by id: a poller passes the last id it
/// saw, so that each poll reads only what is new (the store has one writer at a time, so
/// a row never becomes visible after one with a higher id).
pub fn arrivals(server: &EmbeddedServer, after_id: i64) -> Result<Vec<Arrival>, String> {
    let conn = open(server)?;
    let mut stmt = conn.prepare(ARRIVALS).map_err(|e| fail(server, e))?;
    let rows = stmt
        .query_map([after_id], |r| {
            Ok(Arrival {
                id: r.get(0)?,
                endpoint: endpoint_name(r.get(1)?),
                date: r.get(2)?,
                at: r.get(3)?,
            })
        })
        .map_err(|e| fail(server, e))?;
    rows.collect::<Result<_, _>>().map_err(|e| fail(server, e))
}

/// How many rows are stored.
pub fn stored(server: &EmbeddedServer) -> Result<u64, String> {
    open(server)?
        .query_row(STORED, [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
        .map_err(|e| fail(server, e))
}

/// `/api/<name>` → `<name>`.
fn endpoint_name(path: String) -> String {
    match path.strip_prefix("/api/") {
        Some(name) => name.to_string(),
        None => path,
    }
}

fn open(server: &EmbeddedServer) -> Result<Connection, String> {
    let conn = Connection::open(server.store_path()).map_err(|e| fail(server, e))?;
    // The server may be committing a push right now.
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| fail(server, e))?;
    Ok(conn)
}

fn fail(server: &EmbeddedServer, e: rusqlite::Error) -> String {
    format!("received rows: {}: {e}", server.store_path().display())
}
