//! The reconciliation sweep. A pass finds new rows above each table's high-water mark,
//! which keeps an idle pass flat, but a row committed below it (an explicit id filling a
//! gap, a negative id, a transaction that committed late) is never above it. The sweep
//! walks the application's ids and the tracking's ids below the mark side by side, in
//! order and in batches, and records every untracked row `pending`, so the pass sends it.
//!
//! It also notices a table whose highest id went down: a table dropped and recreated,
//! its newest rows deleted, a day file replaced by another. Ids that come back are taken
//! for rows already sent; nothing can tell them apart, so this is said loudly.

use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::clock::{self, RetryClock};
use crate::settings::TableSpec;
use crate::source::{self, SourceError};
use crate::tracking::{HighWater, Tracking, TrackingError};

/// Ids read from the application per short read.
const SWEEP_BATCH: usize = 1000;
/// Ids of queued rows named in the log line.
const NAMED_IDS: usize = 5;
/// Unix time of the last completed sweep, in `agent_meta` (the event lane's name; see
/// [`crate::lane::Lane::meta_key`]).
pub const LAST_SWEEP: &str = "last_sweep_at";

/// Why a table could not be swept.
#[derive(Debug)]
pub enum SweepError {
    Source(SourceError),
    State(TrackingError),
}

impl From<SourceError> for SweepError {
    fn from(e: SourceError) -> SweepError {
        SweepError::Source(e)
    }
}

impl From<TrackingError> for SweepError {
    fn from(e: TrackingError) -> SweepError {
        SweepError::State(e)
    }
}

/// One source's table, as the sweep sees it.
pub struct SweptTable<'a> {
    pub conn: &'a Connection,
    pub path: &'a Path,
    pub key: &'a str,
    pub table: &'a TableSpec,
}

/// Whether a sweep is due: never done, done longer than `every` ago, or recorded in the
/// future (the clock was set back), as a `once` run from cron must sweep too.
pub fn is_due(
    tracking: &Tracking,
    key: &str,
    every: std::time::Duration,
) -> Result<bool, TrackingError> {
    let last = tracking.meta(key)?.and_then(|v| v.parse::<i64>().ok());
    let now = clock::unix_now();
    let every = every.as_secs() as i64;
    Ok(last.is_none_or(|t| now - t >= every || t - now > every))
}

/// Queues every row of the table at or below its high-water mark that the tracking
/// does not know; returns how many. Memory is one batch of ids, whatever the table.
pub fn sweep_table(
    tracking: &mut Tracking,
    t: &SweptTable,
    clock: RetryClock,
) -> Result<u64, SweepError> {
    let Some(high_water) = tracking.high_water(t.key, &t.table.name)? else {
        // Nothing pushed yet: the pass's scan reads the table from its start.
        return Ok(0);
    };
    let mut queued = 0u64;
    let mut named = Vec::new();
    let mut after: Option<Value> = None;
    loop {
        let ids = source::ids_upto(
            t.conn,
            t.path,
            t.table,
            after.as_ref(),
            high_water,
            SWEEP_BATCH,
        )?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        let untracked = untracked_among(tracking, t, after.as_ref(), &ids, &last)?;
        if !untracked.is_empty() {
            named.extend(
                untracked
                    .iter()
                    .take(NAMED_IDS - named.len().min(NAMED_IDS))
                    .cloned(),
            );
            queued += untracked.len() as u64;
            tracking.record_pending(t.key, &t.table.name, &untracked, clock, HighWater::Advance)?;
        }
        if ids.len() < SWEEP_BATCH {
            break;
        }
        after = Some(last);
    }
    if queued > 0 {
        log::warn!(
            "source {} table {}: {queued} rows at or below the high-water mark {high_water} were never sent (ids {}{}); queued",
            t.key,
            t.table.name,
            id_list(&named),
            if queued > named.len() as u64 {
                ", ..."
            } else {
                ""
            }
        );
    }
    Ok(queued)
}

/// The integer ids of `ids` (sorted, all in `(after, last]`) that the tracking lacks,
/// found by merging them with the tracking's ids of the same range.
fn untracked_among(
    tracking: &Tracking,
    t: &SweptTable,
    after: Option<&Value>,
    ids: &[Value],
    last: &Value,
) -> Result<Vec<Value>, TrackingError> {
    // Only integers: a NULL or REAL id cannot be tracked (the pass says so).
    let mut app = ids.iter().filter_map(|v| match v {
        Value::Integer(i) => Some(*i),
        _ => None,
    });
    let mut untracked = Vec::new();
    let mut next = app.next();
    tracking.each_tracked(t.key, &t.table.name, after, last, |tracked| {
        let Value::Integer(tracked) = tracked else {
            return;
        };
        while let Some(id) = next.filter(|id| *id <= tracked) {
            if id < tracked {
                untracked.push(Value::Integer(id));
            }
            next = app.next();
        }
    })?;
    untracked.extend(next.into_iter().chain(app).map(Value::Integer));
    Ok(untracked)
}

/// Warns, once for each new low, when the table's highest id is below the ids already
/// sent. Costs one indexed read per table per pass.
pub fn check_high_water(tracking: &mut Tracking, t: &SweptTable) -> Result<(), SweepError> {
    let Some(high_water) = tracking.high_water(t.key, &t.table.name)? else {
        return Ok(());
    };
    let Some(Value::Integer(top)) = source::max_id(t.conn, t.path, t.table)? else {
        return Ok(());
    };
    let key = format!("high_water_down:{}:{}", t.key, t.table.name);
    if top >= high_water {
        tracking.clear_meta(&key)?;
        return Ok(());
    }
    if tracking.meta(&key)?.as_deref() == Some(top.to_string().as_str()) {
        return Ok(());
    }
    log::error!(
        "source {} table {}: its highest id went down from {high_water} (already sent) to {top}: the table was emptied or recreated, its newest rows were deleted, or the file was replaced by another with the same name. New rows with ids {} to {high_water} will be taken for rows already sent and not pushed: give the table AUTOINCREMENT ids, or new files new names",
        t.key,
        t.table.name,
        top + 1
    );
    tracking.set_meta(&[(&key, &top.to_string())])?;
    Ok(())
}

fn id_list(ids: &[Value]) -> String {
    ids.iter()
        .map(|v| match v {
            Value::Integer(i) => i.to_string(),
            _ => "?".into(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
