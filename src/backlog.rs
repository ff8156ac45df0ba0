//! How many rows wait, counted from both sides: rows the tracking knows and has not
//! synced, and rows of the application's tables above the high-water mark that no pass
//! has read yet. After an outage or a full disk most of the backlog is of the second
//! kind, which the tracking alone cannot see.

use std::fmt;

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
            backlog.tables.push(TableBacklog {
                source: s.key.clone(),
                table: table.name.clone(),
                unsynced: tracked,
                unread,
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
