//! The heartbeat sent after each event-lane pass (README "Heartbeats"): the pass's
//! outcome, the backlog and failed rows per table (counted as `relais status` counts
//! them, [`crate::backlog`]), the pulled configuration's hash, the state directory's
//! free space. One small JSON POST to [`HEARTBEAT_PATH`] through the lane's own
//! transport (its bearer token, CA and timeouts).
//!
//! Diagnostics, never state: a heartbeat that fails is logged once per change of
//! outcome and changes nothing of the pass (its exit code, its backoff). A backend that
//! does not know the endpoint (404, 405, 501: the seed's) is not asked again for an
//! hour, remembered in the state database so that `relais once` runs remember it too.
//! The counts are read in autocommit statements that end before the request: no read
//! transaction is held across it.

use std::path::Path;

use relais_wire::heartbeat::{ConfigState, HEARTBEAT_PATH, Heartbeat, Pass, TableState};
use ureq::http::Method;

use crate::backlog;
use crate::push::{CycleReport, Interruption, Pusher};
use crate::settings::Settings;
use crate::{clock, pull, status};

/// `agent_meta` key: Unix seconds until which the backend is not sent heartbeats.
const REFUSED_UNTIL: &str = "heartbeat_refused_until";
/// How long a backend that does not take heartbeats is left alone.
const REFUSED_FOR_S: i64 = 3600;

/// What the last heartbeat came to, so that only changes are logged.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Last {
    #[default]
    Unknown,
    Sent,
    Failed,
}

/// The event lane's heartbeats.
#[derive(Debug, Default)]
pub struct Heartbeats {
    last: Last,
}

/// A lane's pass as the heartbeat shows it.
pub fn pass_of(report: &CycleReport) -> Pass {
    Pass {
        at: clock::unix_now(),
        ok: !report.has_problems(),
        pushed: report.pushed(),
        failed: report.failed(),
        error: status::pass_error(report),
    }
}

impl Heartbeats {
    /// Sends the heartbeat of the event lane's pass `report` (the media lane's last
    /// pass: `media`), unless turned off or refused within the hour.
    pub fn after_pass(
        &mut self,
        settings: &Settings,
        pusher: &mut Pusher,
        report: &CycleReport,
        media: Option<Pass>,
    ) {
        // A pass cut by a stop signal: the agent is exiting, not reporting.
        if !settings.heartbeat || matches!(report.interrupted, Some(Interruption::Shutdown)) {
            return;
        }
        let now = clock::unix_now();
        let refused_until = pusher
            .tracking()
            .meta(REFUSED_UNTIL)
            .ok()
            .flatten()
            .and_then(|v| v.parse::<i64>().ok());
        // A clock set back (a Pi booting in 1970) must not silence heartbeats for years.
        if refused_until.is_some_and(|until| now < until && until - now <= REFUSED_FOR_S) {
            return;
        }
        let body = build(settings, pusher, report, media).encode();
        let answer = pusher.transport().exchange(
            Method::POST,
            HEARTBEAT_PATH,
            &[("Content-Type", "application/json")],
            Some((body.len() as u64, &mut body.as_bytes())),
        );
        match answer.map(|a| a.status) {
            Ok(200..=299) => {
                if self.last == Last::Failed {
                    log::info!("heartbeat: sent again");
                }
                self.last = Last::Sent;
            }
            Ok(status @ (404 | 405 | 501)) => {
                log::info!(
                    "backend does not take heartbeats ({status}); not sending them for an hour"
                );
                let until = (now + REFUSED_FOR_S).to_string();
                if let Err(e) = pusher.tracking().set_meta(&[(REFUSED_UNTIL, &until)]) {
                    log::debug!("heartbeat: {e}");
                }
                self.last = Last::Unknown;
            }
            other => {
                let why = match other {
                    Ok(status) => format!("the backend answered {status}"),
                    Err(e) => e,
                };
                if self.last == Last::Failed {
                    log::debug!("heartbeat: not sent: {why}");
                } else {
                    log::info!("heartbeat: not sent: {why} (logged again once sent)");
                }
                self.last = Last::Failed;
            }
        }
    }
}

/// The heartbeat of this pass; a count that cannot be read is left out (the pass's own
/// error says why), never a reason not to send.
fn build(
    settings: &Settings,
    pusher: &mut Pusher,
    report: &CycleReport,
    media: Option<Pass>,
) -> Heartbeat {
    let now = clock::unix_now();
    let tracking = pusher.tracking();
    let failed = tracking.counts().unwrap_or_default();
    let failed_of = |source: &str, table: &str| -> u64 {
        failed
            .iter()
            .filter(|c| c.status == "failed" && c.source == source && c.table == table)
            .map(|c| c.rows)
            .sum()
    };
    let tables = match backlog::measure(tracking, settings) {
        Ok(b) => b
            .tables
            .iter()
            .map(|t| {
                let failed = failed_of(&t.source, &t.table);
                TableState {
                    source: file_name(&t.source),
                    table: t.table.clone(),
                    // Not sent yet: tracked and waiting (the failed rows are counted
                    // apart) and not read yet.
                    backlog: t.unsynced.saturating_sub(failed) + t.unread.unwrap_or(0),
                    failed,
                    oldest_unsent_s: t
                        .oldest_unsent
                        .map(|at| now.saturating_sub(at).max(0) as u64),
                }
            })
            .collect(),
        Err(e) => {
            log::debug!("heartbeat: backlog not counted: {e}");
            Vec::new()
        }
    };
    let pulled = pull::read_status(&settings.state_dir);
    let config = ConfigState {
        hash: pulled.as_ref().and_then(|p| p.current_hash.clone()),
        last_pull_at: pulled
            .as_ref()
            .and_then(|p| p.last_sync_at.as_deref())
            .and_then(clock::parse_iso8601),
        last_pull_ok: pulled.as_ref().map(|p| p.last_sync_ok),
        error: pulled
            .as_ref()
            .and_then(|p| p.last_sync_error.as_deref())
            .map(crate::redact::redact),
    };
    Heartbeat {
        device_id: Some(settings.device_id.clone()),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        interval_s: settings.interval.as_secs(),
        pass: pass_of(report),
        tables,
        tables_truncated: 0,
        config,
        free_bytes: free_bytes(&settings.state_dir),
        media_lane: media,
    }
}

/// A source key's file name: a heartbeat names no directory.
fn file_name(key: &str) -> String {
    Path::new(key)
        .file_name()
        .map_or_else(|| key.to_string(), |n| n.to_string_lossy().into_owned())
}

/// Bytes an unprivileged writer may still use on `dir`'s file system.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is a NUL-terminated string and `stat` a zeroed plain C struct that
    // statvfs fills in; both outlive the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_named_by_file_only() {
        assert_eq!(file_name("/data/app/2025_12_18.db"), "2025_12_18.db");
        assert_eq!(file_name("app.db"), "app.db");
    }

    #[test]
    fn free_space_of_a_directory() {
        assert!(free_bytes(Path::new("/")).is_some());
        assert_eq!(free_bytes(Path::new("/no/such/dir")), None);
    }
}
