//! The push engine: one [`Pusher::sync_once`] pass sends every due row of every source
//! and table to the backend and records each acknowledged upload.
//!
//! A pass first retries the rows that are due (interrupted, reset by hand, or failed
//! and past their retry time), then reads new rows above the table's high-water mark in
//! short batches. Each batch is recorded `pending` in one transaction before anything
//! is sent; its event rows go up to `http.in_flight` at once, on sender threads of
//! their own, and their answers are settled as they arrive; acknowledgements are
//! recorded in small groups (the idempotency key makes a group lost in a power cut
//! harmless). The first transient failure ends the pass:
//! failing every remaining row against a dead server helps nobody. Likewise a table
//! whose endpoint looks wrong ([`crate::rejections`]) stops at the evidence.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::types::Value;

use crate::batch::{self, Capabilities, Capability, Discovery, Uploads};
use crate::blob_stream::{Base64Encoder, BlobError, BlobReader, base64_len};
use crate::clock::RetryClock;
use crate::lane::Lane;
use crate::media_window::{Allowance, Cut, Throttle, TimeOfDay, local_time_of_day};
use crate::payload::RowPayload;
use crate::reconcile::{self, SweepError, SweptTable};
use crate::rejections::{Held, Rejections, Verdict};
use crate::settings::{Settings, TableSpec};
use crate::source::{self, SourceError};
use crate::source_registry::{self, Resolved};
use crate::tracking::{Acked, HighWater, Tracking, TrackingError};
use crate::transport::{Outcome, Transport};
use crate::{backoff, clock, config_hash, json, notify, upload};

/// Acknowledgements are committed when this many are waiting...
const ACK_GROUP: usize = 256;
/// ...or when the oldest has waited this long.
const ACK_GROUP_AGE: Duration = Duration::from_secs(1);

/// What one pass did for one table of one source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableReport {
    pub source: String,
    pub table: String,
    pub pushed: u64,
    pub failed: u64,
    pub bytes: u64,
    /// Longest time one BLOB read held the application database's read lock.
    pub max_lock_hold: Duration,
    /// Rows stored with an HTML page for an answer.
    pub html: u64,
    /// The first row the backend rejected, and why (`relais status`'s last error).
    pub rejection: Option<String>,
    /// The table is not in the source file (dropped by the application): said in one
    /// line when it goes and one when it is back, shown in every pass's report between.
    pub gone: bool,
    /// Media rows left pending for a media window that takes them.
    pub waiting: u64,
    /// Bytes of uploads cut short that the server confirmed and keeps: progress, however
    /// the pass ended.
    pub kept: u64,
}

/// Why a pass ended before it was done.
#[derive(Debug, Clone, PartialEq)]
pub enum Interruption {
    /// The backend is unreachable or overloaded; try again after a backoff.
    Backend {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The agent's own state database failed (disk full, not writable).
    State(String),
    /// Shutdown was requested.
    Shutdown,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CycleReport {
    pub tables: Vec<TableReport>,
    pub duration: Duration,
    pub interrupted: Option<Interruption>,
    /// Problems with sources or tables that did not stop the pass (one line each).
    pub errors: Vec<String>,
    /// Sources whose file is gone while rows of theirs are unsynced, with those rows.
    pub vanished: Vec<(String, u64)>,
    /// Untracked rows the reconciliation sweep found and queued.
    pub queued: u64,
    /// Tables whose endpoint looked wrong (see [`crate::rejections`]): their rows are
    /// tried again after the backoff, not the interval.
    pub wrong_url: Vec<String>,
    /// Media wait for a time window ([`crate::media_window`]) that opens in this long
    /// (`Some(None)`: the window is open but these media are too large for it and no
    /// other is configured to open).
    pub window: Option<Option<Duration>>,
}

impl CycleReport {
    pub fn pushed(&self) -> u64 {
        self.tables.iter().map(|t| t.pushed).sum()
    }

    pub fn failed(&self) -> u64 {
        self.tables.iter().map(|t| t.failed).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.bytes).sum()
    }

    /// Whether the pass moved anything on: rows stored, or bytes of an upload the server
    /// keeps. A failure after progress is a link cut, not a backend refusing.
    pub fn progressed(&self) -> bool {
        self.tables.iter().any(|t| t.pushed > 0 || t.kept > 0)
    }

    pub fn html_answers(&self) -> u64 {
        self.tables.iter().map(|t| t.html).sum()
    }

    /// Whether everything due was pushed (media waiting for their window were not).
    pub fn is_clean(&self) -> bool {
        !self.has_problems() && self.window.is_none()
    }

    /// Whether something went wrong: a failed row, an error, an early stop, a table gone.
    /// Media waiting for their window are as configured, not a problem.
    pub fn has_problems(&self) -> bool {
        self.failed() > 0
            || !self.errors.is_empty()
            || self.interrupted.is_some()
            || self.tables.iter().any(|t| t.gone)
    }

    /// Notes media held for a window opening in `opens_in`: the soonest one counts.
    fn wait_for_window(&mut self, opens_in: Option<Duration>) {
        self.window = Some(match (self.window.flatten(), opens_in) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        });
    }
}

impl fmt::Display for CycleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sync report:")?;
        for t in &self.tables {
            write!(f, " {}", t.table)?;
            if self.tables.iter().any(|o| o.source != t.source) {
                write!(f, "@{}", file_name(&t.source))?;
            }
            write!(f, " pushed {} failed {}", t.pushed, t.failed)?;
            if t.waiting > 0 {
                write!(f, " waiting {}", t.waiting)?;
            }
            write!(f, "{};", if t.gone { ", table gone" } else { "" })?;
        }
        write!(
            f,
            " {} sent in {}",
            human_bytes(self.bytes()),
            clock::human_duration(self.duration)
        )?;
        match self.window {
            Some(Some(opens_in)) => write!(
                f,
                "; media wait for their window, which opens at {} local time (in {})",
                TimeOfDay((local_time_of_day() + opens_in.as_secs() as u32) % 86_400),
                clock::human_duration(opens_in)
            )?,
            Some(None) => write!(f, "; media wait for a window that takes them")?,
            None => {}
        }
        match &self.interrupted {
            Some(Interruption::Backend { reason, .. }) => write!(f, "; stopped early: {reason}"),
            Some(Interruption::State(e)) => write!(f, "; stopped early: {e}"),
            Some(Interruption::Shutdown) => write!(f, "; interrupted by shutdown"),
            None => Ok(()),
        }
    }
}

pub fn human_bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// Why a table's pass stopped.
enum Halt {
    Pass(Interruption),
    Table(String),
    /// The table's endpoint looks wrong; the line says why.
    WrongUrl(String),
    /// The source file has no such table (SQLite's message).
    Gone(String),
    /// The media window is closed: the table waits, the pass goes on with the others.
    Window(Option<Duration>),
}

impl From<TrackingError> for Halt {
    fn from(e: TrackingError) -> Halt {
        match e {
            TrackingError::TwinIds { .. } => Halt::Table(e.to_string()),
            _ => Halt::Pass(Interruption::State(e.to_string())),
        }
    }
}

impl From<SourceError> for Halt {
    fn from(e: SourceError) -> Halt {
        match e.missing_table() {
            Some(message) => Halt::Gone(message.to_string()),
            None => Halt::Table(e.to_string()),
        }
    }
}

/// One source database during a pass.
struct SourceCtx<'a> {
    conn: &'a Connection,
    path: &'a Path,
    /// Key of the source in `sync_tracking.source`.
    key: String,
    /// WAL mode: a BLOB handle may stay open across chunks (see `blob_stream`).
    wal: bool,
    /// One of several source files (a glob): idempotency keys name the file.
    multi: bool,
}

/// A row ready to send: the row, its idempotency key, its body.
type Job = (RowPayload, String, String);

/// One table of one source during a pass: what sending its rows and settling their
/// answers share.
struct TablePass<'a> {
    ctx: &'a SourceCtx<'a>,
    table: &'a TableSpec,
    report: TableReport,
    acks: AckGroup,
    rejections: Rejections,
}

/// New rows read at most per look during a drain ([`Pusher::send_live`]).
const LIVE_ROWS: usize = 500;

/// What a drain knows of the rows written since it began.
struct Live {
    /// Rows above this id are new (`None`: the table was empty, or has a BLOB).
    above: Option<Value>,
    checked: Instant,
}

/// Acknowledged rows waiting to be recorded together.
#[derive(Default)]
struct AckGroup {
    acked: Vec<Acked>,
    since: Option<Instant>,
}

pub struct Pusher {
    settings: Settings,
    tracking: Tracking,
    /// Shared by the sender threads of [`Pusher::send_events`].
    transport: Arc<Transport>,
    stop: Arc<AtomicBool>,
    /// The backend stored a row in this pass: until then rows go one at a time, so a
    /// backend that is down costs one failed row per pass, not one per request in flight,
    /// and a wrong URL is found out after three rows (see [`crate::rejections`]).
    answered: bool,
    /// Whether the backend takes batches and uploads (relais-server), asked once an hour.
    batches: Discovery,
    /// The lane this pusher runs; `None`: every table, in one pass.
    lane: Option<Lane>,
}

impl Pusher {
    pub fn new(
        settings: Settings,
        tracking: Tracking,
        transport: Transport,
        stop: Arc<AtomicBool>,
    ) -> Pusher {
        Pusher {
            settings,
            tracking,
            transport: Arc::new(transport),
            stop,
            answered: false,
            batches: Discovery::default(),
            lane: None,
        }
    }

    /// A pusher of one lane's tables ([`crate::lane`]).
    pub fn for_lane(
        lane: Lane,
        settings: &Settings,
        tracking: Tracking,
        transport: Transport,
        stop: Arc<AtomicBool>,
    ) -> Pusher {
        let mut pusher = Pusher::new(lane.settings(settings), tracking, transport, stop);
        pusher.lane = Some(lane);
        pusher
    }

    /// The `agent_meta` entry of the last sweep of this pusher's tables. A whole pusher
    /// (`relais reconcile`) records the event lane's: the media lane then sweeps its
    /// tables once more, which only costs a read of their ids.
    fn sweep_key(&self) -> String {
        let lane = self.lane.unwrap_or(Lane::Events);
        lane.meta_key(reconcile::LAST_SWEEP).into_owned()
    }

    pub fn tracking(&mut self) -> &mut Tracking {
        &mut self.tracking
    }

    /// The lane's transport, for the heartbeat that follows a pass.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// One pass over every source and table. Never panics on bad input: problems end up
    /// in the report, one line each.
    pub fn sync_once(&mut self) -> CycleReport {
        let began = Instant::now();
        self.answered = false;
        let mut report = CycleReport::default();
        let found = match source::discover(&self.settings.local_db_path) {
            Ok(p) => p,
            Err(e) => {
                self.source_problem(&mut report, e.to_string());
                Vec::new()
            }
        };
        let multi = source::is_glob(&self.settings.local_db_path);
        let sweep = reconcile::is_due(
            &self.tracking,
            &self.sweep_key(),
            self.settings.retry.permanent_retry,
        );
        report.interrupted = match (source_registry::resolve(&mut self.tracking, &found), sweep) {
            (Ok(sources), Ok(sweep)) => {
                if sweep {
                    // Its problems are the pass's too (a missing table, a locked file),
                    // and the pass reports them; they only keep the sweep due.
                    let _ = self.sweep(&sources, &mut report);
                }
                self.push_sources(&sources, multi, &mut report)
            }
            (Err(e), _) | (_, Err(e)) => Some(Interruption::State(e.to_string())),
        };
        let html = report.html_answers();
        if html > 0 {
            // Success by the contract, but a captive portal answers so too.
            log::warn!(
                "the backend answered 2xx with an HTML page for {html} rows: a captive portal or a proxy may be swallowing them"
            );
        }
        report.duration = began.elapsed();
        report
    }

    /// A problem with a source file as a whole (missing, not SQLite): the event lane opens
    /// every source at every pass and says it; the media lane would only say it twice.
    fn source_problem(&self, report: &mut CycleReport, line: String) {
        match self.lane {
            Some(Lane::Media) => log::debug!("media lane: {line}"),
            _ => report.errors.push(line),
        }
    }

    /// The reconciliation sweep alone (`relais reconcile`): queues the untracked rows
    /// below each table's high-water mark for the next pass, sends nothing.
    pub fn reconcile(&mut self) -> CycleReport {
        let began = Instant::now();
        let mut report = CycleReport::default();
        match source::discover(&self.settings.local_db_path)
            .map_err(|e| e.to_string())
            .and_then(|found| {
                source_registry::resolve(&mut self.tracking, &found).map_err(|e| e.to_string())
            }) {
            Ok(sources) => {
                let errors = self.sweep(&sources, &mut report);
                report.errors.extend(errors);
            }
            Err(e) => report.errors.push(e),
        }
        report.duration = began.elapsed();
        report
    }

    /// Sweeps every table of every source, before any network I/O, and records the sweep
    /// as done when every table was swept; returns the problems that kept it from that.
    fn sweep(&mut self, sources: &[Resolved], report: &mut CycleReport) -> Vec<String> {
        let began = Instant::now();
        let mut errors = Vec::new();
        for s in sources {
            let conn = match source::open(&s.path) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            for table in &self.settings.tables {
                let t = SweptTable {
                    conn: &conn,
                    path: &s.path,
                    key: &s.key,
                    table,
                };
                let clock = self.retry_clock();
                match reconcile::sweep_table(&mut self.tracking, &t, clock) {
                    Ok(n) => report.queued += n,
                    // Nothing to queue in a table the file does not have (the pass says it
                    // is gone); counted as swept, or every pass would sweep again.
                    Err(SweepError::Source(e)) if e.missing_table().is_some() => {}
                    Err(SweepError::Source(e)) => errors.push(e.to_string()),
                    Err(SweepError::State(e)) => errors.push(e.to_string()),
                }
            }
        }
        if errors.is_empty() {
            let now = clock::unix_now().to_string();
            if let Err(e) = self.tracking.set_meta(&[(&self.sweep_key(), &now)]) {
                errors.push(e.to_string());
            }
        }
        log::info!(
            "reconciliation sweep: {} untracked rows queued in {}{}",
            report.queued,
            clock::human_duration(began.elapsed()),
            if errors.is_empty() {
                ""
            } else {
                " (incomplete: some tables could not be read)"
            }
        );
        errors
    }

    fn push_sources(
        &mut self,
        sources: &[Resolved],
        multi: bool,
        report: &mut CycleReport,
    ) -> Option<Interruption> {
        if let Err(e) = self
            .check_backend_settings()
            .and_then(|()| self.find_vanished(sources, report))
        {
            return Some(Interruption::State(e.to_string()));
        }
        for s in sources {
            if let Some(stop) = self.push_source(s, multi, report) {
                return Some(stop);
            }
        }
        None
    }

    /// Rows failed against other backend settings (`BACKEND_URL`, the table's endpoint)
    /// are due now: a wrong URL fixed must not leave its rows waiting for the slow clock.
    fn check_backend_settings(&mut self) -> Result<(), TrackingError> {
        for table in &self.settings.tables {
            let url = format!("{}{}", self.settings.http.backend_url, table.endpoint);
            let fingerprint = config_hash::md5_hex(url.as_bytes());
            let due = self.tracking.backend_settings(&table.name, &fingerprint)?;
            if due > 0 {
                log::info!(
                    "table {}: the backend settings changed: {due} failed rows are due now",
                    table.name
                );
            }
        }
        Ok(())
    }

    /// Sources with unsynced rows whose file is gone: said at every pass until the file
    /// comes back or the operator closes them out with `relais forget`.
    fn find_vanished(
        &self,
        present: &[Resolved],
        report: &mut CycleReport,
    ) -> Result<(), TrackingError> {
        // The count covers every table: said by the event lane alone.
        if self.lane == Some(Lane::Media) {
            return Ok(());
        }
        for (key, rows) in self.tracking.unsynced_by_source()? {
            if present.iter().all(|s| s.key != key) {
                report.errors.push(format!(
                    "source {key} vanished with {rows} unsynced rows; if it is gone for good, `relais forget {key}` closes them out"
                ));
                report.vanished.push((key, rows));
            }
        }
        Ok(())
    }

    fn push_source(
        &mut self,
        source: &Resolved,
        multi: bool,
        report: &mut CycleReport,
    ) -> Option<Interruption> {
        let path = source.path.as_path();
        let conn = match source::open(path) {
            Ok(c) => c,
            Err(e) => {
                self.source_problem(report, e.to_string());
                return None;
            }
        };
        let ctx = SourceCtx {
            conn: &conn,
            path,
            key: source.key.clone(),
            wal: source::is_wal(&conn),
            multi,
        };
        match self.tracking.import_legacy(&ctx.key, &conn) {
            Ok(Some(n)) if n > 0 => log::info!(
                "source {}: imported {n} rows synced by the previous service",
                ctx.key
            ),
            Ok(_) => {}
            Err(e) => return Some(Interruption::State(e.to_string())),
        }
        for table in self.settings.tables.clone() {
            // Found wrong with another source already: more rows to it help nobody.
            if report.wrong_url.contains(&table.name) {
                continue;
            }
            let mut t = TablePass {
                ctx: &ctx,
                table: &table,
                report: TableReport {
                    source: ctx.key.clone(),
                    table: table.name.clone(),
                    ..TableReport::default()
                },
                acks: AckGroup::default(),
                rejections: Rejections::default(),
            };
            let result = self.push_table(&mut t);
            let settled = t
                .rejections
                .finish()
                .into_iter()
                .try_for_each(|held| self.reject(&mut t, held));
            let flushed = self.flush(&mut t);
            let outcome = result.and(settled).and(flushed);
            t.report.gone = matches!(outcome, Err(Halt::Gone(_)));
            if t.report.waiting > 0 {
                report.wait_for_window(self.settings.media.next_change(local_time_of_day()));
            }
            report.tables.push(t.report);
            let outcome = match outcome {
                Ok(()) => self.table_back(&ctx, &table),
                Err(Halt::Gone(message)) => self.table_gone(&ctx, &table, &message, report),
                other => other,
            };
            match outcome {
                Ok(()) => {}
                Err(Halt::Window(opens_in)) => report.wait_for_window(opens_in),
                Err(Halt::Table(e) | Halt::Gone(e)) => report.errors.push(e),
                Err(Halt::WrongUrl(e)) => {
                    report.errors.push(e);
                    report.wrong_url.push(table.name.clone());
                }
                Err(Halt::Pass(stop)) => return Some(stop),
            }
        }
        None
    }

    /// A table the source file does not have: one error line the first time, with what
    /// was sent of it and what waits, remembered in the state database so that neither
    /// the passes of `run` nor the `once` runs of a cron job repeat it.
    fn table_gone(
        &mut self,
        ctx: &SourceCtx,
        table: &TableSpec,
        message: &str,
        report: &mut CycleReport,
    ) -> Result<(), Halt> {
        let key = gone_key(ctx, table);
        if self.tracking.meta(&key)?.is_some_and(|v| !v.is_empty()) {
            return Ok(());
        }
        let (mut sent, mut waiting) = (0, 0);
        for c in self.tracking.counts()? {
            if c.source == ctx.key && c.table == table.name {
                match c.status.as_str() {
                    "success" => sent += c.rows,
                    _ => waiting += c.rows,
                }
            }
        }
        let waiting = match waiting {
            0 => "no row read from it waits to be sent".to_string(),
            n => format!("{n} rows read from it but not sent yet wait until it is back"),
        };
        self.tracking.set_meta(&[(&key, "gone")])?;
        report.errors.push(format!(
            "source {} table {}: {message} (dropped by the application, or never created in this file): {sent} of its rows were sent and stay recorded as sent, {waiting}, rows written since the last read are gone with it; the other tables and files are pushed as usual. Said once; another line says when the table is back",
            ctx.path.display(),
            table.name
        ));
        Ok(())
    }

    /// A table read again after [`Pusher::table_gone`]: one line.
    fn table_back(&mut self, ctx: &SourceCtx, table: &TableSpec) -> Result<(), Halt> {
        if self.tracking.clear_meta(&gone_key(ctx, table))? {
            log::info!(
                "source {} table {}: the table is back; its rows are pushed again",
                ctx.path.display(),
                table.name
            );
        }
        Ok(())
    }

    fn push_table(&mut self, t: &mut TablePass) -> Result<(), Halt> {
        let (ctx, table) = (t.ctx, t.table);
        if table.blob.is_some() {
            if let Allowance::Closed { opens_in } = self.settings.media.now() {
                return Err(Halt::Window(Some(opens_in)));
            }
        }
        // Due retries first: they are older than anything new.
        let mut after: Option<Value> = None;
        loop {
            let batch = self.read_size(table);
            let ids = self.tracking.due(
                &ctx.key,
                &table.name,
                after.as_ref(),
                self.retry_clock(),
                batch,
            )?;
            let mut rows = Vec::with_capacity(ids.len());
            for id in &ids {
                match source::read_one(ctx.conn, ctx.path, table, id)? {
                    Some(row) => rows.push(row),
                    None => {
                        let delay = self.settings.retry.permanent_retry;
                        let message = "the row no longer exists in the source database";
                        self.fail(t, id, message, delay)?;
                    }
                }
            }
            self.send_events(t, rows)?;
            match ids.last() {
                Some(last) if ids.len() == batch => after = Some(last.clone()),
                _ => break,
            }
        }
        let swept = SweptTable {
            conn: ctx.conn,
            path: ctx.path,
            key: &ctx.key,
            table,
        };
        match reconcile::check_high_water(&mut self.tracking, &swept) {
            Ok(()) => {}
            Err(SweepError::Source(e)) => return Err(e.into()),
            Err(SweepError::State(e)) => return Err(e.into()),
        }
        // Record the retries' acknowledgements first: with non-integer ids the scan below
        // starts from the beginning and would otherwise find them unsynced and send them again.
        self.flush(t)?;
        // Then new rows, above the high-water mark (from the start for non-integer ids,
        // where already-synced rows are skipped one indexed lookup at a time).
        let mut after = self
            .tracking
            .high_water(&ctx.key, &table.name)?
            .map(Value::Integer);
        let mut untrackable = 0;
        // The table's top as the scan begins: rows above it are written during the scan,
        // and go ahead of the backlog should the scan turn out to be a long drain.
        let mut live = Live {
            above: match table.blob {
                None => source::max_id(ctx.conn, ctx.path, table)?,
                Some(_) => None,
            },
            checked: Instant::now(),
        };
        loop {
            let batch = self.read_size(table);
            let rows = source::read_after(ctx.conn, ctx.path, table, after.as_ref(), batch)?;
            let Some(last) = rows.last() else { break };
            after = Some(last.local_id.clone());
            let full = rows.len() == batch;
            untrackable += self.record_and_send(t, rows, HighWater::Advance)?;
            if !full {
                break;
            }
            untrackable += self.send_live(t, &mut live)?;
        }
        if untrackable > 0 {
            return Err(Halt::Table(format!(
                "source {} table {}: {untrackable} rows have a local_id that is NULL or not an integer or text; they cannot be tracked and were skipped",
                ctx.key, table.name
            )));
        }
        Ok(())
    }

    /// Records rows pending (moving the high-water mark as `mark` says) and sends those
    /// due; returns how many could not be tracked (a `local_id` neither integer nor
    /// text), skipped, not fatal: stopping would hold the table's good rows back behind
    /// the bad ones at every pass.
    fn record_and_send(
        &mut self,
        t: &mut TablePass,
        rows: Vec<RowPayload>,
        mark: HighWater,
    ) -> Result<usize, Halt> {
        let (ctx, table) = (t.ctx, t.table);
        let (rows, bad): (Vec<RowPayload>, Vec<RowPayload>) = rows
            .into_iter()
            .partition(|r| matches!(r.local_id, Value::Integer(_) | Value::Text(_)));
        let ids: Vec<Value> = rows.iter().map(|r| r.local_id.clone()).collect();
        let clock = self.retry_clock();
        let due = self
            .tracking
            .record_pending(&ctx.key, &table.name, &ids, clock, mark)?;
        let rows = rows.into_iter().filter(|r| due.contains(&r.local_id));
        self.send_events(t, rows.collect())?;
        Ok(bad.len())
    }

    /// During a long drain of an event table, the rows written since it began: read
    /// ahead of the scan every [`Pusher::live_every`] and sent at once, so a new event
    /// waits for no backlog. The scan meets them later, already synced.
    fn send_live(&mut self, t: &mut TablePass, live: &mut Live) -> Result<usize, Halt> {
        let (ctx, table) = (t.ctx, t.table);
        let Some(above) = &live.above else {
            return Ok(0);
        };
        if live.checked.elapsed() < self.live_every() {
            return Ok(0);
        }
        live.checked = Instant::now();
        let rows = source::read_after(ctx.conn, ctx.path, table, Some(above), LIVE_ROWS)?;
        let Some(last) = rows.last() else {
            return Ok(0);
        };
        live.above = Some(last.local_id.clone());
        self.record_and_send(t, rows, HighWater::Keep)
    }

    /// How often a drain looks for new rows: a quarter of the interval, so they arrive
    /// well within one, between 100 ms and 5 s.
    fn live_every(&self) -> Duration {
        (self.settings.interval / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    fn send_row(&mut self, t: &mut TablePass, row: RowPayload) -> Result<(), Halt> {
        let (ctx, table) = (t.ctx, t.table);
        crate::notify::keepalive();
        if self.stop.load(Ordering::Relaxed) {
            return Err(Halt::Pass(Interruption::Shutdown));
        }
        let key = self.prepare(ctx, table, &row);
        let sent = match &table.blob {
            None => {
                let body = self.small_body(&row.fields);
                Ok((
                    self.post(&table.endpoint, &key, body.len() as u64, body.as_bytes()),
                    body.len() as u64,
                ))
            }
            Some(_) => match self.upload(t, &row, &key)? {
                Some(sent) => sent,
                None => self.send_media(t, &row, &key),
            },
        };
        self.settle(t, row, sent)
    }

    /// Sends a media row as a resumable upload when the backend offers them ([`upload`]).
    /// `None`: the JSON push sends it (no uploads, a NULL or empty BLOB, an endpoint not
    /// under `/api/`, a local_id that is not a rowid, which the JSON path explains).
    fn upload(
        &mut self,
        t: &mut TablePass,
        row: &RowPayload,
        key: &str,
    ) -> Result<Option<upload::Sent>, Halt> {
        let (ctx, table) = (t.ctx, t.table);
        let (Some(spec), Value::Integer(rowid)) = (&table.blob, &row.local_id) else {
            return Ok(None);
        };
        let Some(endpoint) = table
            .endpoint
            .strip_prefix("/api/")
            .filter(|name| !name.is_empty() && !name.contains('/'))
        else {
            return Ok(None);
        };
        let uploads = match self.uploads() {
            Ok(Some(uploads)) => uploads,
            Ok(None) => return Ok(None),
            Err(unanswered) => return Ok(Some(Ok((unanswered, 0)))),
        };
        let json = self.small_body(&row.fields);
        let upload_row = upload::Row {
            conn: ctx.conn,
            spec,
            rowid: *rowid,
            wal: ctx.wal,
            source: &ctx.key,
            table: &table.name,
            local_id: &row.local_id,
            endpoint,
            key,
            json: &json,
        };
        let mut uploader = upload::Uploader {
            transport: &self.transport,
            tracking: &mut self.tracking,
            uploads: &uploads,
            media: &self.settings.media,
            chunk_bytes: self.settings.blob_chunk_bytes,
            stop: &self.stop,
        };
        let sent = uploader.send(&upload_row, &mut t.report.max_lock_hold)?;
        if let Some(Ok((Outcome::Transient { .. }, bytes))) = &sent {
            t.report.kept += bytes;
        }
        if let Some(Ok((Outcome::Stored { .. }, bytes))) = &sent {
            log::info!(
                "{} {} -> backend (resumable upload, {} sent, longest read lock {:?})",
                table.name,
                rowid,
                human_bytes(*bytes),
                t.report.max_lock_hold
            );
        }
        Ok(sent)
    }

    /// Logs the row's conversion warnings; its idempotency key.
    fn prepare(&self, ctx: &SourceCtx, table: &TableSpec, row: &RowPayload) -> String {
        let row_id = id_text(&row.local_id);
        for w in &row.warnings {
            log::warn!("source {} table {} row {row_id}: {w}", ctx.key, table.name);
        }
        self.idempotency_key(ctx, table, &row_id)
    }

    /// Sends the rows of one read: in batches when the backend takes them, else one
    /// row per request. Every row was recorded pending before it is sent, so a row never
    /// acknowledged is sent again at the next pass.
    fn send_events(&mut self, t: &mut TablePass, rows: Vec<RowPayload>) -> Result<(), Halt> {
        let table = t.table;
        if rows.is_empty() {
            return Ok(());
        }
        let capability = match self.capability(table) {
            Ok(capability) => capability,
            // Said of the first row, as the failure of its upload would be: the pass
            // stops there.
            Err(unanswered) => {
                let mut first = rows.into_iter().take(1);
                return first.try_for_each(|row| self.settle(t, row, Ok((unanswered.clone(), 0))));
            }
        };
        match capability {
            Some(capability) => self.send_batches(t, rows, &capability),
            None => self.send_per_row(t, rows),
        }
    }

    /// Sends rows with the seed's per-row API, event rows up to `http.in_flight`
    /// requests at once, each on a connection of its own; settles each answer as it
    /// arrives, in whatever order. The first halt stops the sending: the answers already
    /// in flight are still settled, the rows not sent stay pending.
    fn send_per_row(&mut self, t: &mut TablePass, rows: Vec<RowPayload>) -> Result<(), Halt> {
        let (ctx, table) = (t.ctx, t.table);
        let mut rows = rows.into_iter();
        if table.blob.is_some() || self.settings.http.in_flight == 1 {
            return rows.try_for_each(|row| self.send_row(t, row));
        }
        while !self.answered {
            let Some(row) = rows.next() else {
                return Ok(());
            };
            self.send_row(t, row)?;
        }
        let senders = self.settings.http.in_flight.min(rows.len());
        let jobs = self.jobs(ctx, table, rows);
        let queue = Mutex::new(jobs.into_iter());
        let halted = AtomicBool::new(false);
        let (answered, answers) = mpsc::channel();
        let outcome = std::thread::scope(|scope| {
            for _ in 0..senders {
                let (transport, stop) = (Arc::clone(&self.transport), Arc::clone(&self.stop));
                let (queue, halted, answered) = (&queue, &halted, answered.clone());
                let endpoint = table.endpoint.as_str();
                scope.spawn(move || {
                    while !halted.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        let next = queue.lock().ok().and_then(|mut q| q.next());
                        let Some((row, key, body)) = next else { break };
                        let len = body.len() as u64;
                        let body = notify::Progress(body.as_bytes());
                        let outcome = transport.post(endpoint, &key, len, &mut { body });
                        if answered.send((row, outcome, len)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(answered);
            let mut outcome = Ok(());
            for (row, answer, len) in answers {
                notify::keepalive();
                let settled = self.settle(t, row, Ok((answer, len)));
                if settled.is_err() {
                    halted.store(true, Ordering::Relaxed);
                    outcome = outcome.and(settled);
                }
            }
            outcome
        });
        outcome?;
        let unsent = queue.lock().map_or(0, |q| q.len());
        if unsent > 0 && self.stop.load(Ordering::Relaxed) {
            return Err(Halt::Pass(Interruption::Shutdown));
        }
        Ok(())
    }

    /// Rows per short read of `table`: as many as a batch takes once the backend is known
    /// to take batches (it is asked when there is a row to send, not before).
    fn read_size(&self, table: &TableSpec) -> usize {
        match (&table.blob, self.batches.known()) {
            (None, Some(c)) => c.max_rows.max(self.settings.batch_size),
            _ => self.settings.batch_size,
        }
    }

    /// Each row with its idempotency key and body, as it is sent alone or in a batch.
    fn jobs(
        &self,
        ctx: &SourceCtx,
        table: &TableSpec,
        rows: impl IntoIterator<Item = RowPayload>,
    ) -> Vec<Job> {
        rows.into_iter()
            .map(|row| {
                let key = self.prepare(ctx, table, &row);
                let body = self.small_body(&row.fields);
                (row, key, body)
            })
            .collect()
    }

    /// The backend's batch endpoint, for a table whose rows may go in batches (events:
    /// a media row's BLOB is streamed alone).
    /// `Err`: the backend did not answer the question, an upload's transient failure.
    fn capability(&mut self, table: &TableSpec) -> Result<Option<Capability>, Outcome> {
        if table.blob.is_some() || !self.settings.http.batches {
            return Ok(None);
        }
        Ok(self.offered()?.batch)
    }

    /// The backend's resumable uploads, for media, when they are to be used.
    fn uploads(&mut self) -> Result<Option<Uploads>, Outcome> {
        if !self.settings.http.uploads {
            return Ok(None);
        }
        Ok(self.offered()?.uploads)
    }

    /// What the backend offers, asked once an hour (within the time an upload's answer
    /// may take).
    fn offered(&mut self) -> Result<Capabilities, Outcome> {
        let transport = Arc::clone(&self.transport);
        let http = &self.settings.http;
        let within = http.connect_timeout + http.response_timeout + Duration::from_secs(1);
        let asked = self.batches.get(|| {
            batch::discover(|path, max| {
                transport
                    .get(path, None, max, within)
                    .map(|f| (f.status, f.body))
            })
        });
        match asked {
            Ok(offered) => Ok(offered.clone()),
            Err(reason) => Err(Outcome::Transient {
                reason,
                retry_after: None,
            }),
        }
    }

    /// Sends event rows in batches within `capability`'s limits, one batch at a time,
    /// and settles each row by its own result. Until the backend stored a row in this
    /// pass a batch holds one row, so a backend that is down fails one row per pass. A
    /// row too large for a batch goes alone; a batch the endpoint refuses (the backend
    /// changed) sends its rows and the rest one by one until the next check.
    fn send_batches(
        &mut self,
        t: &mut TablePass,
        rows: Vec<RowPayload>,
        capability: &Capability,
    ) -> Result<(), Halt> {
        let (ctx, table) = (t.ctx, t.table);
        let (jobs, alone): (Vec<Job>, Vec<Job>) = self
            .jobs(ctx, table, rows)
            .into_iter()
            .partition(|(_, _, body)| body.len() <= capability.max_row_bytes);
        let mut jobs = jobs
            .into_iter()
            .map(|job| {
                let size = batch::row_bytes(&batch_row(table, &job));
                (job, size)
            })
            .peekable();
        while jobs.peek().is_some() {
            crate::notify::keepalive();
            if self.stop.load(Ordering::Relaxed) {
                return Err(Halt::Pass(Interruption::Shutdown));
            }
            let limit = if self.answered {
                capability.max_rows
            } else {
                1
            };
            let mut chunk: Vec<Job> = Vec::new();
            let mut bytes = 0;
            while let Some((job, size)) = jobs.next_if(|(_, size)| {
                chunk.len() < limit && (chunk.is_empty() || bytes + size <= capability.max_bytes)
            }) {
                bytes += size;
                chunk.push(job);
            }
            let rows: Vec<batch::Row> = chunk.iter().map(|job| batch_row(table, job)).collect();
            let body = batch::body(&rows, capability.gzip)
                .map_err(|e| Halt::Table(format!("batch: cannot compress the body: {e}")))?;
            let answer =
                self.transport
                    .post_batch(&capability.path, &body, capability.gzip, chunk.len());
            match answer {
                Ok(outcomes) => {
                    let settled = chunk
                        .into_iter()
                        .zip(outcomes)
                        .map(|((row, _, body), o)| self.settle(t, row, Ok((o, body.len() as u64))));
                    settled.fold(Ok(()), Result::and)?;
                }
                Err(Outcome::Rejected { reason, .. }) => {
                    log::warn!(
                        "batches: {} refused a batch ({reason}); rows go one by one until the next check",
                        capability.path
                    );
                    self.batches.refused();
                    let rest = chunk
                        .into_iter()
                        .chain(jobs.map(|(job, _)| job))
                        .chain(alone);
                    let rows = rest.map(|(row, _, _)| row).collect();
                    return self.send_per_row(t, rows);
                }
                Err(failed) => {
                    let settled = chunk.into_iter().map(|(row, _, body)| {
                        let sent = Ok((failed.clone(), body.len() as u64));
                        self.settle(t, row, sent)
                    });
                    return settled.fold(Ok(()), Result::and);
                }
            }
        }
        let rows = alone.into_iter().map(|(row, _, _)| row).collect();
        self.send_per_row(t, rows)
    }

    /// Records what became of one row's upload.
    fn settle(
        &mut self,
        t: &mut TablePass,
        row: RowPayload,
        sent: upload::Sent,
    ) -> Result<(), Halt> {
        let (ctx, table) = (t.ctx, t.table);
        let row_id = id_text(&row.local_id);
        self.answered |= matches!(sent, Ok((Outcome::Stored { .. }, _)));
        match sent {
            Ok((Outcome::Stored { remote_id, html }, bytes)) => {
                for held in t.rejections.stored() {
                    self.reject(t, held)?;
                }
                t.report.html += u64::from(html);
                match &remote_id {
                    Some(r) => {
                        log::debug!("{} {row_id} -> backend (id {})", table.name, id_text(r))
                    }
                    None => log::debug!("{} {row_id} -> backend", table.name),
                }
                t.report.pushed += 1;
                t.report.bytes += bytes;
                t.acks.since.get_or_insert_with(Instant::now);
                t.acks.acked.push(Acked {
                    table: table.name.clone(),
                    local_id: row.local_id,
                    remote_id,
                    bytes,
                });
                // A media row is worth recording at once: resending it costs minutes of uplink.
                if table.blob.is_some()
                    || t.acks.acked.len() >= ACK_GROUP
                    || t.acks.since.is_some_and(|s| s.elapsed() >= ACK_GROUP_AGE)
                {
                    self.flush(t)?;
                }
                Ok(())
            }
            Ok((
                Outcome::Rejected {
                    status,
                    reason,
                    location,
                },
                _,
            )) => {
                let attempts = self
                    .tracking
                    .attempts(&ctx.key, &table.name, &row.local_id)?;
                let held = Held {
                    local_id: row.local_id,
                    reason,
                };
                match t.rejections.rejected(held, status, location, attempts) {
                    Verdict::Hold => Ok(()),
                    Verdict::Rows(rows) => {
                        rows.into_iter().try_for_each(|held| self.reject(t, held))
                    }
                    Verdict::WrongUrl(wrong) => {
                        // Due again after the backoff, not the slow clock: the rows were
                        // never looked at.
                        for held in &wrong.rows {
                            let (id, reason) = (&held.local_id, &held.reason);
                            self.fail(t, id, reason, Duration::ZERO)?;
                        }
                        let url = format!("{}{}", self.settings.http.backend_url, table.endpoint);
                        Err(Halt::WrongUrl(wrong.explain(
                            &table.name,
                            &table.endpoint,
                            &url,
                        )))
                    }
                }
            }
            Ok((
                Outcome::Transient {
                    reason,
                    retry_after,
                },
                _,
            )) => {
                self.flush(t)?;
                // Due at the next pass, which the daemon delays by its backoff.
                self.fail(t, &row.local_id, &reason, Duration::ZERO)?;
                Err(Halt::Pass(Interruption::Backend {
                    reason,
                    retry_after,
                }))
            }
            Err(BlobError::Stopped) => Err(Halt::Pass(Interruption::Shutdown)),
            // Too large for the open window: the next media may fit. A window that closed
            // mid-upload holds the table until it opens again.
            Err(BlobError::Waiting) => {
                t.report.waiting += 1;
                match self.settings.media.now() {
                    Allowance::Closed { opens_in } => Err(Halt::Window(Some(opens_in))),
                    Allowance::Open { .. } => Ok(()),
                }
            }
            Err(e) => {
                log::warn!("source {} table {} row {row_id}: {e}", ctx.key, table.name);
                // A changed row is worth another try soon (its new version); a vanished or
                // unreadable one only on the slow clock.
                let delay = match e {
                    BlobError::Changed(_) => self.settings.retry.initial_backoff,
                    _ => self.settings.retry.permanent_retry,
                };
                self.fail(t, &row.local_id, &e.to_string(), delay)
            }
        }
    }

    /// Streams a row with a BLOB: the JSON before it, the BLOB's base64 chunk by chunk,
    /// the JSON after it, with an exact Content-Length.
    fn send_media(&self, t: &mut TablePass, row: &RowPayload, key: &str) -> upload::Sent {
        let (ctx, table) = (t.ctx, t.table);
        let spec = table.blob.as_ref().ok_or(BlobError::Vanished)?;
        let Value::Integer(rowid) = row.local_id else {
            return Err(BlobError::Read(format!(
                "table {} has a BLOB, so its local_id must be the integer rowid of {}",
                table.name, spec.table
            )));
        };
        let mut prefix = String::with_capacity(row.fields.len() + 64);
        prefix.push('{');
        prefix.push_str(&row.fields);
        json::push_key(&mut prefix, &spec.field, row.fields.is_empty());
        let suffix = self.suffix(true);
        let reader = BlobReader::open(
            ctx.conn,
            spec,
            rowid,
            self.settings.blob_chunk_bytes,
            ctx.wal,
            &self.stop,
        )?;
        let Some(mut reader) = reader else {
            prefix.push_str("null");
            prefix.push_str(&suffix);
            let len = prefix.len() as u64;
            return Ok((self.post(&table.endpoint, key, len, prefix.as_bytes()), len));
        };
        if !self.settings.media.takes(reader.len()) {
            return Err(BlobError::Waiting);
        }
        prefix.push('"');
        let len = prefix.len() as u64 + base64_len(reader.len()) + 1 + suffix.len() as u64;
        let (outcome, cut) = {
            let body = prefix
                .as_bytes()
                .chain(Base64Encoder::new(&mut reader))
                .chain(b"\"".as_slice())
                .chain(suffix.as_bytes());
            let mut body = Throttle::new(body, &self.settings.media, &self.stop);
            let outcome = self.post(&table.endpoint, key, len, &mut body);
            (outcome, body.cut())
        };
        t.report.max_lock_hold = t.report.max_lock_hold.max(reader.max_hold());
        if let Some(failure) = reader.failure() {
            return Err(failure.clone());
        }
        match cut {
            Some(Cut::WindowClosed) => return Err(BlobError::Waiting),
            Some(Cut::Stopped) => return Err(BlobError::Stopped),
            None => {}
        }
        if matches!(outcome, Outcome::Stored { .. }) {
            log::info!(
                "{} {} -> backend ({}, longest read lock {:?})",
                table.name,
                id_text(&row.local_id),
                human_bytes(reader.len()),
                reader.max_hold()
            );
        }
        Ok((outcome, len))
    }

    /// POSTs a body, pinging the watchdog as the HTTP client reads it: over a slow uplink
    /// one BLOB chunk takes longer to send than `WatchdogSec`, and the agent is making
    /// progress for as long as bytes move.
    fn post(&self, endpoint: &str, key: &str, len: u64, body: impl Read) -> Outcome {
        self.transport
            .post(endpoint, key, len, &mut notify::Progress(body))
    }

    /// The wall clock retry times are judged by (see [`RetryClock`]).
    fn retry_clock(&self) -> RetryClock {
        RetryClock::read(backoff::longest_delay(&self.settings.retry))
    }

    /// A row the backend rejected for its own reasons: a warning, and the slow clock.
    fn reject(&mut self, t: &mut TablePass, held: Held) -> Result<(), Halt> {
        let table = t.table;
        let delay = self.settings.retry.permanent_retry;
        let line = format!(
            "{} {}: {}",
            table.name,
            id_text(&held.local_id),
            held.reason
        );
        log::warn!("{line}; next attempt in {}", clock::human_duration(delay));
        t.report.rejection.get_or_insert(line);
        self.fail(t, &held.local_id, &held.reason, delay)
    }

    /// Records a failed row, to be tried again after `delay`.
    fn fail(
        &mut self,
        t: &mut TablePass,
        local_id: &Value,
        message: &str,
        delay: Duration,
    ) -> Result<(), Halt> {
        let (ctx, table) = (t.ctx, t.table);
        let retry_at = clock::unix_now() + delay.as_secs() as i64;
        self.tracking
            .mark_failed(&ctx.key, &table.name, local_id, message, retry_at)?;
        t.report.failed += 1;
        Ok(())
    }

    fn small_body(&self, fields: &str) -> String {
        let mut body = String::with_capacity(fields.len() + 80);
        body.push('{');
        body.push_str(fields);
        body.push_str(&self.suffix(!fields.is_empty()));
        body
    }

    /// The members every payload ends with, and the closing brace.
    fn suffix(&self, after_fields: bool) -> String {
        let mut s = String::new();
        json::push_key(&mut s, relais_wire::DEVICE_ID_MEMBER, !after_fields);
        json::push_str(&mut s, &self.settings.device_id);
        json::push_key(&mut s, relais_wire::SOURCE_MEMBER, false);
        json::push_str(&mut s, relais_wire::SOURCE_VALUE);
        s.push('}');
        s
    }

    /// The contract's key (`relais_wire::idempotency_key`); with several source files
    /// (a glob) it also names the file.
    fn idempotency_key(&self, ctx: &SourceCtx, table: &TableSpec, id: &str) -> String {
        let file = ctx.multi.then(|| file_name(&ctx.key));
        relais_wire::idempotency_key(&self.settings.device_id, &table.name, file, id)
    }

    fn flush(&mut self, t: &mut TablePass) -> Result<(), Halt> {
        let result = self.tracking.mark_success(&t.ctx.key, &t.acks.acked);
        t.acks.acked.clear();
        t.acks.since = None;
        result.map_err(Halt::from)
    }
}

/// A job as a row of a batch.
fn batch_row<'a>(table: &'a TableSpec, (_, key, body): &'a Job) -> batch::Row<'a> {
    batch::Row {
        endpoint: &table.endpoint,
        key,
        body,
    }
}

/// The `agent_meta` entry of a table gone from a source.
fn gone_key(ctx: &SourceCtx, table: &TableSpec) -> String {
    format!("table_gone:{}:{}", ctx.key, table.name)
}

fn id_text(v: &Value) -> String {
    match v {
        Value::Integer(i) => i.to_string(),
        Value::Text(t) => t.clone(),
        Value::Real(r) => r.to_string(),
        Value::Null => "NULL".into(),
        Value::Blob(_) => "<blob>".into(),
    }
}
