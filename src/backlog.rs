//! How many rows wait, counted from both sides: rows the tracking knows and has not
//! synced, and rows of the application's tables above the high-water mark that no pass
//! has read yet. After an outage or a full disk most of the backlog is of the second
//! kind, which the tracking alone cannot see.

use std::fmt;

use rusqlite::types::Value;

use crate::clock;
use crate::settings::Settings;
use crate::source;
use crate::source_registry;
use crate::tracking::{Tracking, TrackingError};

/// The backlog of one table of one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableBacklog {
    pub source: String,
    pub table: String,
    /// Tracked rows not synced yet (pending or failed).
    pub unsynced: u64,
    /// Rows not read yet; `None` when it cannot be counted cheaply (text ids) or the
    /// application's database could not be read.
    pub unread: Option<u64>,
    /// Unix seconds of the oldest row not sent yet, as far as known: the first unread
    /// row's `date` column, or when the oldest tracked row was recorded, whichever is
    /// older; `None` when nothing waits or neither time is known.
    pub oldest_unsent: Option<i64>,
}

/// The whole backlog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backlog {
    pub tables: Vec<TableBacklog>,
    /// Unsynced rows of sources not present now (vanished files).
    pub elsewhere: u64,
}

impl Backlog {
    /// Tracked rows not synced, present sources or not.
    pub fn unsynced(&self) -> u64 {
        self.elsewhere + self.tables.iter().map(|t| t.unsynced).sum::<u64>()
    }

    /// Rows not read yet, in the tables where that could be counted.
    pub fn unread(&self) -> u64 {
        self.tables.iter().filter_map(|t| t.unread).sum()
    }

    pub fn total(&self) -> u64 {
        self.unsynced() + self.unread()
    }
}

impl fmt::Display for Backlog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rows are not synced yet: {} tracked and waiting, {} not read yet",
            self.total(),
            self.unsynced(),
            self.unread()
        )?;
        if self.tables.iter().any(|t| t.unread.is_none()) {
            write!(f, " (more in tables that could not be counted)")?;
        }
        Ok(())
    }
}

/// Counts the backlog of every source `settings` names; reads only, so it works on a
/// read-only state database (`relais status` on a full disk).
pub fn measure(tracking: &Tracking, settings: &Settings) -> Result<Backlog, TrackingError> {
    let found = source::discover(&settings.local_db_path).unwrap_or_default();
    let sources = source_registry::lookup(tracking, &found)?;
    let mut unsynced = tracking.unsynced_by_table()?;
    let mut backlog = Backlog::default();
    for s in &sources {
        let conn = source::open(&s.path).ok();
        for table in &settings.tables {
            let tracked = take(&mut unsynced, &s.key, &table.name);
            let unread = match &conn {
                Some(conn) => unread(tracking, conn, s, table)?,
                None => None,
            };
            let oldest_unsent = match &conn {
                Some(conn) if tracked > 0 || unread.is_some_and(|n| n > 0) => {
                    oldest_unsent(tracking, conn, s, table, unread)?
                }
                _ => None,
            };
            backlog.tables.push(TableBacklog {
                source: s.key.clone(),
                table: table.name.clone(),
                unsynced: tracked,
                unread,
                oldest_unsent,
            });
        }
    }
    backlog.elsewhere = unsynced.iter().map(|(_, _, n)| n).sum();
    Ok(backlog)
}

fn take(unsynced: &mut Vec<(String, String, u64)>, source: &str, table: &str) -> u64 {
    match unsynced
        .iter()
        .position(|(s, t, _)| s == source && t == table)
    {
        Some(i) => unsynced.swap_remove(i).2,
        None => 0,
    }
}

/// Unix seconds of the oldest row not sent: the `date` of the oldest tracked unsynced
/// row (else when it was recorded) or of the first row above the high-water mark,
/// whichever is older (`unread`: the count of the latter, `None` when uncountable). A
/// query without a `date` column fails here, which is no problem
/// of the table's: the time is then the tracking's, or unknown.
fn oldest_unsent(
    tracking: &Tracking,
    conn: &rusqlite::Connection,
    s: &source_registry::Resolved,
    table: &crate::settings::TableSpec,
    unread: Option<u64>,
) -> Result<Option<i64>, TrackingError> {
    let date_from = |from: &Value| {
        source::first_date_from(conn, &s.path, table, from)
            .ok()
            .flatten()
            .and_then(|d| clock::parse_iso8601(&d))
    };
    let tracked = tracking
        .oldest_unsynced(&s.key, &table.name)?
        .and_then(|(id, recorded)| date_from(&id).or_else(|| clock::parse_iso8601(&recorded)));
    let unread = match unread {
        Some(n) if n > 0 => {
            let mark = tracking.high_water(&s.key, &table.name)?;
            date_from(&Value::Integer(
                mark.map_or(i64::MIN, |m| m.saturating_add(1)),
            ))
        }
        _ => None,
    };
    Ok(tracked.into_iter().chain(unread).min())
}

/// Rows above the high-water mark (every row when nothing was pushed yet); `None` for a
/// table that has tracked rows but no mark (text ids: counting them is a full scan).
fn unread(
    tracking: &Tracking,
    conn: &rusqlite::Connection,
    s: &source_registry::Resolved,
    table: &crate::settings::TableSpec,
) -> Result<Option<u64>, TrackingError> {
    let high_water = tracking.high_water(&s.key, &table.name)?;
    if high_water.is_none() && tracking.has_rows(&s.key, Some(&table.name))? {
        return Ok(None);
    }
    Ok(source::count_after(conn, &s.path, table, high_water).ok())
}
