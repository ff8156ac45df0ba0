//! The application's databases: finding them (a path or a glob on the file name), opening
//! them read-only so relais can never modify them, and reading rows to push in short,
//! bounded reads that end before any network I/O starts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::payload::{Plan, RowPayload};
use crate::settings::TableSpec;

/// A problem with one application database or one of its tables.
#[derive(Debug)]
pub enum SourceError {
    /// No file matches the configured path or glob.
    Missing(String),
    Open(PathBuf, rusqlite::Error),
    /// The table's query failed (missing table or column, locked database, corrupt file).
    Query {
        path: PathBuf,
        table: String,
        error: rusqlite::Error,
    },
    /// The query does not yield what relais needs.
    Shape {
        path: PathBuf,
        table: String,
        problem: String,
    },
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Missing(p) => write!(f, "source: no database file matches {p}"),
            SourceError::Open(p, e) => {
                write!(f, "source {}: cannot open: {}", p.display(), describe(e))
            }
            SourceError::Query { path, table, error } => {
                write!(
                    f,
                    "source {} table {table}: {}",
                    path.display(),
                    describe(error)
                )
            }
            SourceError::Shape {
                path,
                table,
                problem,
            } => {
                write!(f, "source {} table {table}: {problem}", path.display())
            }
        }
    }
}

impl std::error::Error for SourceError {}

impl SourceError {
    /// SQLite's `no such table: NAME` when the table's query names a table the file does
    /// not have (dropped by the application, or never created in this file); the message
    /// alone, without the query SQLite quotes after it.
    pub fn missing_table(&self) -> Option<&str> {
        let SourceError::Query { error, .. } = self else {
            return None;
        };
        let message = match error {
            rusqlite::Error::SqliteFailure(_, Some(m)) => m.as_str(),
            rusqlite::Error::SqlInputError { msg, .. } => msg.as_str(),
            _ => return None,
        };
        message.starts_with("no such table: ").then_some(message)
    }
}

/// SQLite's messages, with a hint where the operator's next step is not obvious.
fn describe(e: &rusqlite::Error) -> String {
    let text = e.to_string();
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            format!("{text} (the file is not an SQLite database, or is corrupt)")
        }
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            format!("{text} (the application holds a lock; will try again next cycle)")
        }
        _ => text,
    }
}

/// The application database files that `pattern` names, sorted. A pattern without
/// wildcards names one file, which must exist.
pub fn discover(pattern: &str) -> Result<Vec<PathBuf>, SourceError> {
    let path = Path::new(pattern);
    if !is_glob(pattern) {
        return if path.is_file() {
            Ok(vec![path.to_path_buf()])
        } else {
            Err(SourceError::Missing(pattern.into()))
        };
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name_pattern = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|_| SourceError::Missing(pattern.into()))?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| wildcard_match(name_pattern, n))
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(SourceError::Missing(pattern.into()));
    }
    Ok(found)
}

/// What identifies a database file whatever its name: its inode number and birth time.
/// The inode alone would not do: ext4 reuses the inode of a deleted day file for the
/// next file created, and taking a new file for a known one would skip its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub ino: u64,
    /// Birth time, nanoseconds since the epoch.
    pub born: i64,
}

impl FileId {
    /// The file's identity, or `None` when the filesystem records no birth time (FAT,
    /// some network filesystems): such a file is known by its path only.
    pub fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        let born = meta
            .created()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some(FileId {
            ino: meta.ino(),
            born: i64::try_from(born.as_nanos()).ok()?,
        })
    }
}

/// `path` absolute and spelled one way: `data//x.db`, `./data/x.db` and `/srv/data/x.db`
/// (run from `/srv`) are one file. Lexical only: `..` and symbolic links are kept, the
/// file's identity ([`FileId`]) recognises those.
pub fn normalise(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    absolute.components().collect()
}

/// Whether the path has wildcards; only the file name may have them.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// `*` matches any run of characters, `?` any one character. SQLite's own side files
/// (`-wal`, `-shm`, `-journal`) are never sources.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    if name.ends_with("-wal") || name.ends_with("-shm") || name.ends_with("-journal") {
        return false;
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Opens an application database read-only. A busy timeout lets a short application
/// commit finish instead of failing the read.
pub fn open(path: &Path) -> Result<Connection, SourceError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags(path, flags).map_err(|e| SourceError::Open(path.into(), e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| SourceError::Open(path.into(), e))?;
    // Reading the schema now turns "not a database" into an open error, not a table error.
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
        .map_err(|e| SourceError::Open(path.into(), e))?;
    Ok(conn)
}

/// Whether the database is in WAL mode, where readers never block the application's writes.
pub fn is_wal(conn: &Connection) -> bool {
    conn.query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
        .is_ok_and(|m| m.eq_ignore_ascii_case("wal"))
}

/// Reads up to `limit` rows of `table` whose `local_id` is greater than `after` (all
/// rows when `None`), in `local_id` order. The statement is finished when this returns,
/// so no read transaction outlives the call.
pub fn read_after(
    conn: &Connection,
    path: &Path,
    table: &TableSpec,
    after: Option<&Value>,
    limit: usize,
) -> Result<Vec<RowPayload>, SourceError> {
    let sql = match after {
        Some(_) => format!(
            "SELECT * FROM ({}) WHERE local_id > ?1 ORDER BY local_id LIMIT ?2",
            table.query
        ),
        None => format!("SELECT * FROM ({}) ORDER BY local_id LIMIT ?2", table.query),
    };
    let limit = limit as i64;
    let params: Vec<&dyn rusqlite::ToSql> = match after {
        Some(v) => vec![v, &limit],
        None => vec![&rusqlite::types::Null, &limit],
    };
    query_rows(conn, path, table, &sql, &params)
}

/// Reads the row of `table` with this `local_id`, or `None` if it no longer exists.
pub fn read_one(
    conn: &Connection,
    path: &Path,
    table: &TableSpec,
    local_id: &Value,
) -> Result<Option<RowPayload>, SourceError> {
    let sql = format!("SELECT * FROM ({}) WHERE local_id = ?1", table.query);
    Ok(query_rows(conn, path, table, &sql, &[local_id])?
        .into_iter()
        .next())
}

/// The `local_id`s of `table` greater than `after` (from the lowest when `None`) and at
/// most `upto`, in order, at most `limit` of them: the application's side of the
/// reconciliation sweep. Only the id is read, so SQLite walks the id index alone.
pub fn ids_upto(
    conn: &Connection,
    path: &Path,
    table: &TableSpec,
    after: Option<&Value>,
    upto: i64,
    limit: usize,
) -> Result<Vec<Value>, SourceError> {
    let lower = if after.is_some() {
        "local_id > ?1 AND"
    } else {
        "?1 IS NULL AND"
    };
    let sql = format!(
        "SELECT local_id FROM ({}) WHERE {lower} local_id <= ?2 ORDER BY local_id LIMIT ?3",
        table.query
    );
    let query_err = &query_error(path, table);
    let mut stmt = conn.prepare_cached(&sql).map_err(query_err)?;
    let after = after.cloned().unwrap_or(Value::Null);
    let rows = stmt
        .query_map(rusqlite::params![after, upto, limit as i64], |r| r.get(0))
        .map_err(query_err)?;
    rows.collect::<Result<_, _>>().map_err(query_err)
}

/// How many rows of `table` have a `local_id` above `after` (all rows when `None`).
pub fn count_after(
    conn: &Connection,
    path: &Path,
    table: &TableSpec,
    after: Option<i64>,
) -> Result<u64, SourceError> {
    // One range condition, so SQLite counts along the id index from the mark.
    let sql = format!(
        "SELECT count(*) FROM ({}) WHERE local_id >= ?1",
        table.query
    );
    let from = after.map_or(i64::MIN, |a| a.saturating_add(1));
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| stmt.query_row([from], |r| r.get::<_, i64>(0)))
        .map(|n| n as u64)
        .map_err(query_error(path, table))
}

/// The `date` column of the first row whose `local_id` is `from` or above, when the
/// table's query has one (the contract's tables do); `None` without such a row.
pub fn first_date_from(
    conn: &Connection,
    path: &Path,
    table: &TableSpec,
    from: &Value,
) -> Result<Option<String>, SourceError> {
    let sql = format!(
        "SELECT CAST(date AS TEXT) FROM ({}) WHERE local_id >= ?1 ORDER BY local_id LIMIT 1",
        table.query
    );
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_row([from], |r| r.get::<_, Option<String>>(0))
                .optional()
        })
        .map(Option::flatten)
        .map_err(query_error(path, table))
}

/// The table's highest `local_id`, if it has rows. O(log n) for a rowid or indexed id.
pub fn max_id(
    conn: &Connection,
    path: &Path,
    table: &TableSpec,
) -> Result<Option<Value>, SourceError> {
    let sql = format!(
        "SELECT local_id FROM ({}) ORDER BY local_id DESC LIMIT 1",
        table.query
    );
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)).optional())
        .map_err(query_error(path, table))
}

/// The error of a query on `table` of the database at `path`.
fn query_error(path: &Path, table: &TableSpec) -> impl Fn(rusqlite::Error) -> SourceError {
    let (path, table) = (path.to_path_buf(), table.name.clone());
    move |error| SourceError::Query {
        path: path.clone(),
        table: table.clone(),
        error,
    }
}

fn query_rows(
    conn: &Connection,
    path: &Path,
    table: &TableSpec,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<RowPayload>, SourceError> {
    let query_err = &query_error(path, table);
    let mut stmt = conn.prepare_cached(sql).map_err(query_err)?;
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let plan = Plan::new(&names).map_err(|problem| SourceError::Shape {
        path: path.into(),
        table: table.name.clone(),
        problem,
    })?;
    // Bind only the parameters the statement has: `?1` is absent without a lower bound.
    let count = stmt.parameter_count();
    for i in 1..=count {
        stmt.raw_bind_parameter(i, params[i - 1])
            .map_err(query_err)?;
    }
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(query_err)? {
        out.push(plan.build(row).map_err(query_err)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.db", "2025_12_18.db"));
        assert!(wildcard_match("2025_??_*.db", "2025_12_18.db"));
        assert!(!wildcard_match("*.db", "2025_12_18.db-wal"));
        assert!(!wildcard_match("*.db", "notes.txt"));
        assert!(wildcard_match("*", "x"));
    }
}
