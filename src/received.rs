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
            let endpoint: String = r.get(1)?;
            Ok(ReceivedRow {
                id: r.get(0)?,
                endpoint: endpoint
                    .strip_prefix("/api/")
                    .unwrap_or(&endpoint)
                    .to_string(),
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

/// How many rows are stored.
pub fn stored(server: &EmbeddedServer) -> Result<u64, String> {
    open(server)?
        .query_row(STORED, [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
        .map_err(|e| fail(server, e))
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
