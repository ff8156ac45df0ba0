//! `relais status`: what has been pushed, what failed and why, and how the last pass
//! went, read from the state database (text for people, `--json` for scripts).

use std::fmt::Write;

use rusqlite::types::Value;

use crate::backlog::Backlog;
use crate::lane::Lane;
use crate::pull::SyncStatus;
use crate::push::CycleReport;
use crate::settings::Settings;
use crate::tracking::{Failure, STATE_DB_NAME, Tracking};
use crate::{clock, json};

const LAST_CYCLE_AT: &str = "last_cycle_at";
const LAST_CYCLE: &str = "last_cycle";
const LAST_ERROR: &str = "last_error";
const LAST_ERROR_AT: &str = "last_error_at";
/// Sources gone with unsynced rows at the last pass: `key<TAB>rows` lines.
const VANISHED: &str = "vanished";
/// Failed rows listed in the text, and in `--json` (newest first; SQL has them all).
const TEXT_FAILURES: usize = 10;
const JSON_FAILURES: usize = 100;

/// Remembers a lane's pass outcome for `relais status`. A failure to write it is
/// logged: it is diagnostics, not state.
pub fn record_cycle(tracking: &mut Tracking, report: &CycleReport, lane: Lane) {
    let now = clock::now_iso8601();
    let cycle = report.to_string();
    let error = pass_error(report);
    let vanished: String = report
        .vanished
        .iter()
        .map(|(key, rows)| format!("{key}\t{rows}\n"))
        .collect();
    let key = |k| lane.meta_key(k).into_owned();
    let (at_key, cycle_key) = (key(LAST_CYCLE_AT), key(LAST_CYCLE));
    let (error_key, error_at_key) = (key(LAST_ERROR), key(LAST_ERROR_AT));
    let mut entries = vec![(at_key.as_str(), now.as_str()), (&cycle_key, &cycle)];
    // Only the event lane looks for vanished sources (see `Pusher::find_vanished`).
    if lane == Lane::Events {
        entries.push((VANISHED, &vanished));
    }
    if let Some(e) = &error {
        entries.extend([(error_key.as_str(), e.as_str()), (&error_at_key, &now)]);
    }
    let result = tracking.set_meta(&entries);
    if let Err(e) = result {
        log::warn!("{e}");
    }
}

/// What went wrong in the pass, redacted: its first error, else why it stopped, else
/// its first rejection; what `relais status` and the heartbeat show.
pub fn pass_error(report: &CycleReport) -> Option<String> {
    report
        .errors
        .first()
        .cloned()
        .or_else(|| match &report.interrupted {
            Some(crate::push::Interruption::Backend { reason, .. }) => Some(reason.clone()),
            Some(crate::push::Interruption::State(e)) => Some(e.clone()),
            _ => None,
        })
        .or_else(|| report.tables.iter().find_map(|t| t.rejection.clone()))
        .map(|e| crate::redact::redact(&e))
}

/// Prints the status; returns the exit code.
pub fn run(settings: &Settings, as_json: bool) -> i32 {
    if !settings.state_dir.join(STATE_DB_NAME).exists() {
        eprintln!(
            "status: no state database in {} yet: relais has not run there",
            settings.state_dir.display()
        );
        return 1;
    }
    let tracking = match Tracking::open_read_only(&settings.state_dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let pull = crate::pull::read_status(&settings.state_dir);
    let backlog = match crate::backlog::measure(&tracking, settings) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    match render(&tracking, &backlog, pull.as_ref(), as_json) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn render(
    tracking: &Tracking,
    backlog: &Backlog,
    pull: Option<&SyncStatus>,
    as_json: bool,
) -> Result<String, crate::tracking::TrackingError> {
    let counts = tracking.counts()?;
    let failed_total: u64 = counts
        .iter()
        .filter(|c| c.status == "failed")
        .map(|c| c.rows)
        .sum();
    let failures = tracking.recent_failures(if as_json {
        JSON_FAILURES
    } else {
        TEXT_FAILURES
    })?;
    let forgotten = tracking.forgotten()?;
    let uploads = tracking.uploads_under_way()?;
    let vanished: Vec<(String, String)> = tracking
        .meta(VANISHED)?
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, n)| (k.to_string(), n.to_string()))
        .collect();
    let events = LastPass::read(tracking, Lane::Events)?;
    let media = LastPass::read(tracking, Lane::Media)?;
    let mut out = String::new();
    if as_json {
        out.push_str("{\"counts\": [");
        for (i, c) in counts.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push('{');
            json::push_key(&mut out, "source", true);
            json::push_str(&mut out, &c.source);
            json::push_key(&mut out, "table", false);
            json::push_str(&mut out, &c.table);
            json::push_key(&mut out, "status", false);
            json::push_str(&mut out, &c.status);
            json::push_key(&mut out, "rows", false);
            let _ = write!(out, "{}}}", c.rows);
        }
        out.push(']');
        events.push_json(&mut out, false);
        json::push_key(&mut out, "media_lane", false);
        if media.at.is_some() {
            out.push('{');
            media.push_json(&mut out, true);
            out.push('}');
        } else {
            out.push_str("null");
        }
        out.push_str(", \"vanished\": [");
        for (i, (source, rows)) in vanished.iter().enumerate() {
            out.push_str(if i > 0 { ", {" } else { "{" });
            json::push_key(&mut out, "source", true);
            json::push_str(&mut out, source);
            let _ = write!(out, ", \"unsynced_rows\": {rows}}}");
        }
        let _ = write!(out, "], \"failed_total\": {failed_total}, \"failed\": [");
        for (i, f) in failures.iter().enumerate() {
            out.push_str(if i > 0 { ", " } else { "" });
            push_failure(&mut out, f);
        }
        out.push_str("], \"backlog\": [");
        for (i, t) in backlog.tables.iter().enumerate() {
            out.push_str(if i > 0 { ", {" } else { "{" });
            json::push_key(&mut out, "source", true);
            json::push_str(&mut out, &t.source);
            json::push_key(&mut out, "table", false);
            json::push_str(&mut out, &t.table);
            let _ = write!(out, ", \"unsynced\": {}, \"unread\": ", t.unsynced);
            match t.unread {
                Some(n) => {
                    let _ = write!(out, "{n}");
                }
                None => out.push_str("null"),
            }
            json::push_key(&mut out, "oldest_unsent_at", false);
            match t.oldest_unsent {
                Some(at) => json::push_str(&mut out, &clock::iso8601(at)),
                None => out.push_str("null"),
            }
            out.push('}');
        }
        out.push_str("], \"forgotten\": [");
        for (i, (source, rows, at)) in forgotten.iter().enumerate() {
            out.push_str(if i > 0 { ", {" } else { "{" });
            json::push_key(&mut out, "source", true);
            json::push_str(&mut out, source);
            let _ = write!(out, ", \"rows\": {rows}");
            json::push_key(&mut out, "forgotten_at", false);
            json::push_str(&mut out, at);
            out.push('}');
        }
        out.push_str("], \"uploads\": [");
        for (i, u) in uploads.iter().enumerate() {
            out.push_str(if i > 0 { ", {" } else { "{" });
            json::push_key(&mut out, "source", true);
            json::push_str(&mut out, &u.source);
            json::push_key(&mut out, "table", false);
            json::push_str(&mut out, &u.table);
            json::push_key(&mut out, "local_id", false);
            json::push_str(&mut out, &id_text(&u.local_id));
            let _ = write!(
                out,
                ", \"offset\": {}, \"length\": {}}}",
                u.offset, u.length
            );
        }
        out.push(']');
        json::push_key(&mut out, "config_pull", false);
        out.push_str(&pull.map_or_else(|| "null".to_string(), SyncStatus::to_json));
        out.push_str("}\n");
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "{:<40} {:<12} {:<8} {:>10}",
        "source", "table", "status", "rows"
    );
    for c in &counts {
        let _ = writeln!(
            out,
            "{:<40} {:<12} {:<8} {:>10}",
            c.source, c.table, c.status, c.rows
        );
    }
    events.push_text(&mut out, "");
    if media.at.is_some() {
        media.push_text(&mut out, "media ");
    }
    for f in &failures {
        let id = id_text(&f.local_id);
        let next = match f.next_attempt_at {
            Some(t) if t > clock::unix_now() => clock::iso8601(t),
            _ => "at the next pass".to_string(),
        };
        let _ = writeln!(
            out,
            "failed: {} {} {id}: {} ({} attempt{}; next attempt {next})",
            f.source,
            f.table,
            crate::redact::redact(&f.message),
            f.attempts,
            if f.attempts == 1 { "" } else { "s" }
        );
    }
    let more = failed_total.saturating_sub(failures.len() as u64);
    if more > 0 {
        let _ = writeln!(
            out,
            "... and {more} more failed rows (relais status --json lists the newest {JSON_FAILURES}; SQL all of them: SELECT * FROM sync_tracking WHERE sync_status = 'failed')"
        );
    }
    for t in backlog
        .tables
        .iter()
        .filter(|t| t.unsynced > 0 || t.unread != Some(0))
    {
        let unread = t
            .unread
            .map_or("an uncounted number of".to_string(), |n| n.to_string());
        let oldest = t.oldest_unsent.map_or(String::new(), |at| {
            format!("; the oldest from {}", clock::iso8601(at))
        });
        let _ = writeln!(
            out,
            "backlog: {} {}: {} tracked and waiting, {unread} rows not read yet{oldest}",
            t.source, t.table, t.unsynced
        );
    }
    for (source, rows) in &vanished {
        let _ = writeln!(
            out,
            "vanished: source {source} with {rows} unsynced rows (relais forget {source} closes them out)"
        );
    }
    for (source, rows, at) in &forgotten {
        let _ = writeln!(
            out,
            "forgotten: source {source}: {rows} unsynced rows closed out by hand, last on {at}"
        );
    }
    for u in &uploads {
        let _ = writeln!(
            out,
            "upload: {} {} {}: {} of {} on the server, the upload resumes there",
            u.source,
            u.table,
            id_text(&u.local_id),
            crate::push::human_bytes(u.offset),
            crate::push::human_bytes(u.length)
        );
    }
    if let Some(p) = pull {
        let _ = write!(out, "{p}");
    }
    Ok(out)
}

/// A lane's last pass, as [`record_cycle`] left it.
struct LastPass {
    at: Option<String>,
    cycle: Option<String>,
    error: Option<String>,
    error_at: Option<String>,
}

impl LastPass {
    fn read(tracking: &Tracking, lane: Lane) -> Result<LastPass, crate::tracking::TrackingError> {
        let meta = |k| tracking.meta(&lane.meta_key(k));
        Ok(LastPass {
            at: meta(LAST_CYCLE_AT)?,
            cycle: meta(LAST_CYCLE)?,
            error: meta(LAST_ERROR)?,
            error_at: meta(LAST_ERROR_AT)?,
        })
    }

    /// Its members, as `--json` had them before lanes; `first`: no comma before them.
    fn push_json(&self, out: &mut String, first: bool) {
        for (i, (key, value)) in [
            ("last_cycle_at", &self.at),
            ("last_cycle", &self.cycle),
            ("last_error", &self.error),
            ("last_error_at", &self.error_at),
        ]
        .into_iter()
        .enumerate()
        {
            json::push_key(out, key, first && i == 0);
            json::push_opt_str(out, value.as_deref());
        }
    }

    fn push_text(&self, out: &mut String, lane: &str) {
        let _ = writeln!(
            out,
            "last {lane}pass: {} {}",
            self.at.as_deref().unwrap_or("never"),
            self.cycle.as_deref().unwrap_or("")
        );
        if let Some(e) = &self.error {
            let at = self.error_at.as_deref().unwrap_or("");
            let _ = writeln!(out, "last {lane}error: {at} {e}");
        }
    }
}

fn id_text(v: &Value) -> String {
    match v {
        Value::Integer(i) => i.to_string(),
        Value::Text(t) => t.clone(),
        _ => "?".into(),
    }
}

/// One failed row as a JSON object; the message is redacted again, as everything shown.
fn push_failure(out: &mut String, f: &Failure) {
    out.push('{');
    json::push_key(out, "source", true);
    json::push_str(out, &f.source);
    json::push_key(out, "table", false);
    json::push_str(out, &f.table);
    json::push_key(out, "local_id", false);
    match &f.local_id {
        Value::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Text(t) => json::push_str(out, t),
        _ => out.push_str("null"),
    }
    json::push_key(out, "error_message", false);
    json::push_str(out, &crate::redact::redact(&f.message));
    let _ = write!(out, ", \"attempts\": {}", f.attempts);
    json::push_key(out, "next_attempt_at", false);
    json::push_opt_str(out, f.next_attempt_at.map(clock::iso8601).as_deref());
    out.push('}');
}
