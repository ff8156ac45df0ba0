//! What the server knows of its agents (README "Heartbeats"): the latest heartbeat of
//! each device, an hourly history, the rows received per hour and the last
//! configuration pull, as the console reads them ([`FleetEntry`], [`DeviceHistory`]).
//!
//! Rows received per hour are counted in memory ([`ReceivedCounts`], bumped where a
//! push is stored as new) and flushed by [`flush_every`] with additive UPSERTs, so the
//! push path's transaction gains no statement; a SIGKILL loses at most one flush
//! period of these counts (statistics only: the rows themselves are durable).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use relais_wire::heartbeat::Heartbeat;

use super::Store;

/// How often the in-memory counts of received rows reach the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// One device known to the server: a device token's (not revoked) or one that sent a
/// heartbeat. `None` for what was never seen.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEntry {
    pub device_id: String,
    /// Unix seconds of the latest heartbeat or configuration pull.
    pub last_contact: Option<i64>,
    pub heartbeat: Option<Heartbeat>,
    /// Rows stored new since `today_start` (as flushed).
    pub rows_today: u64,
    /// The site of the last configuration pull with this device's token.
    pub site_id: Option<i64>,
    /// The hash served by that pull.
    pub pulled_hash: Option<String>,
    pub pulled_at: Option<i64>,
}

/// A device's latest heartbeat and its hours since some time.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceHistory {
    /// When it was received (Unix seconds) and the heartbeat.
    pub latest: Option<(i64, Heartbeat)>,
    /// Oldest first, one per hour with a heartbeat or received rows.
    pub hours: Vec<HourPoint>,
}

/// One hour of a device: what it sent and the latest heartbeat's figures in that hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourPoint {
    /// Unix seconds, a multiple of 3600.
    pub hour: i64,
    pub rows_received: u64,
    pub backlog: Option<u64>,
    pub failed: Option<u64>,
    pub pass_ok: Option<bool>,
}

/// The hour (Unix seconds, a multiple of 3600) `at` falls in.
pub fn hour_of(at: i64) -> i64 {
    at - at.rem_euclid(3600)
}

/// Now, Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The later of two optional times.
pub fn latest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    a.max(b)
}

/// SQLite and PostgreSQL integers are signed: a count beyond `i64::MAX` (never in
/// practice) is stored as that.
pub fn sql_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Rows stored new per (device, hour) since the last flush.
#[derive(Debug, Default)]
pub struct ReceivedCounts {
    counts: Mutex<HashMap<(String, i64), u64>>,
}

impl ReceivedCounts {
    /// A poisoned lock only means a thread panicked while adding to a count.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i64), u64>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One new row of `device_id`, received now.
    pub fn bump(&self, device_id: &str) {
        let key = (device_id.to_string(), hour_of(now()));
        *self.lock().entry(key).or_default() += 1;
    }

    /// Takes the counts to flush, leaving none.
    pub fn take(&self) -> Vec<(String, i64, u64)> {
        self.lock()
            .drain()
            .map(|((device, hour), rows)| (device, hour, rows))
            .collect()
    }

    /// Puts back counts a flush could not store, for the next one.
    pub fn restore(&self, counts: Vec<(String, i64, u64)>) {
        let mut held = self.lock();
        for (device, hour, rows) in counts {
            *held.entry((device, hour)).or_default() += rows;
        }
    }
}

/// Moves the counts to the store; on a store failure they are kept for the next try.
pub async fn flush<S: Store>(store: &S) {
    let counts = store.received_counts();
    let taken = counts.take();
    if taken.is_empty() {
        return;
    }
    if let Err(e) = store.add_received(taken.clone()).await {
        tracing::warn!("received rows per hour: not stored, kept for the next flush: {e}");
        counts.restore(taken);
    }
}

/// Flushes every [`FLUSH_EVERY`], forever (the caller aborts it, then flushes once
/// more at shutdown).
pub async fn flush_every<S: Store>(store: S) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush(&store).await;
    }
}

/// Removes the hours older than `days` every hour, forever.
pub async fn prune_every<S: Store>(store: S, days: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let before = hour_of(now() - (days as i64).saturating_mul(86_400));
        match store.prune_history(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!("history: {n} hour row(s) older than {days} days removed"),
            Err(e) => tracing::warn!("history: old hours not removed, tried again in an hour: {e}"),
        }
    }
}
