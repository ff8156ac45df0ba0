//! Two-way sync, part 1: change capture on the device (issue 17; seeds 002 and 003).
//!
//! `relais outbox install` creates, in one transaction on the application's database,
//! the outbox `relais_outbox` (seed 002's columns), `relais_sync_control` (echo
//! suppression), `relais_sync_tables` (what was installed) and the INSERT/UPDATE/DELETE
//! triggers of each table of `sync.tables` ([`triggers`]). The triggers run in the
//! application's own transactions: a change is captured if and only if it commits.
//! `uninstall` removes exactly that; `status` shows it; [`Maintainer`] runs at each
//! agent pass, recreating the triggers of a table whose columns changed and pruning
//! acknowledged events.
//!
//! This is the one place relais writes to the application's database, always in short
//! transactions (`BEGIN IMMEDIATE` under the 5 s busy timeout of [`source::open`]), so an
//! application writer waits at most the few milliseconds of a schema change.

pub mod triggers;

use std::collections::HashSet;
use std::fmt::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::settings::{Settings, SyncSettings, SyncTable};
use crate::source::{self, SourceError};
use crate::{clock, json};
use triggers::{CONTROL, Capture, Found, OUTBOX, Shape, TABLES};

/// Statuses whose events are not yet settled with the server: uninstall keeps them
/// unless forced.
const UNSETTLED: &str = "('PENDING', 'SENT', 'CONFLICT')";
const STATUSES: [&str; 5] = ["PENDING", "SENT", "ACKNOWLEDGED", "FAILED", "CONFLICT"];

/// Why an outbox command or the agent's outbox maintenance did not do its work.
#[derive(Debug)]
pub enum OutboxError {
    /// The configuration has no `sync` member.
    NotConfigured,
    Open(SourceError),
    /// Another connection held the database's write lock through the busy timeout.
    Busy(PathBuf),
    Sql {
        path: PathBuf,
        doing: &'static str,
        error: rusqlite::Error,
    },
    /// A configured table that cannot be captured; nothing was changed.
    Refused {
        path: PathBuf,
        table: String,
        problem: String,
    },
    /// Uninstall would drop events the server has not settled.
    Unsettled {
        path: PathBuf,
        events: u64,
    },
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboxError::NotConfigured => write!(
                f,
                "outbox: the configuration (RELAIS_CONFIG) has no \"sync\" member: two-way sync \
                 is opt-in per table, see the README's \"Two-way sync (outbox)\""
            ),
            OutboxError::Open(e) => write!(f, "outbox: {e}"),
            OutboxError::Busy(p) => write!(
                f,
                "outbox {}: another connection held the write lock for longer than the busy \
                 timeout: nothing was changed; run the command again",
                p.display()
            ),
            OutboxError::Sql { path, doing, error } => {
                write!(f, "outbox {}: {doing}: {error}", path.display())
            }
            OutboxError::Refused {
                path,
                table,
                problem,
            } => write!(
                f,
                "outbox {}: table {table} {problem}: nothing was installed",
                path.display()
            ),
            OutboxError::Unsettled { path, events } => write!(
                f,
                "outbox {}: {events} events are PENDING, SENT or CONFLICT, not yet settled with \
                 the server: nothing was removed; `relais outbox uninstall --force` drops them",
                path.display()
            ),
        }
    }
}

impl std::error::Error for OutboxError {}

impl OutboxError {
    /// The command's exit code: 2 for a configuration the capture cannot take, as for
    /// any bad setting; 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            OutboxError::NotConfigured | OutboxError::Refused { .. } => crate::daemon::EXIT_CONFIG,
            _ => crate::daemon::EXIT_FAILED_ROWS,
        }
    }
}

/// Wraps an SQLite error of `path`; a busy one says so.
fn sql_error(path: &Path, doing: &'static str) -> impl Fn(rusqlite::Error) -> OutboxError {
    let path = path.to_path_buf();
    move |error| match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            OutboxError::Busy(path.clone())
        }
        _ => OutboxError::Sql {
            path: path.clone(),
            doing,
            error,
        },
    }
}

/// The `sync` settings, or why the outbox commands cannot run.
fn configured(settings: &Settings) -> Result<&SyncSettings, OutboxError> {
    settings.sync.as_ref().ok_or(OutboxError::NotConfigured)
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// A column list as stored in `relais_sync_tables`: a JSON array of names.
fn json_list(names: &[String]) -> String {
    let mut out = String::from("[");
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        json::push_str(&mut out, n);
    }
    out.push(']');
    out
}

/// A table as `relais_sync_tables` records it.
#[derive(Debug, Clone)]
struct Installed {
    table: String,
    tenant: String,
    entity_type: String,
    shape: Shape,
    installed_at: String,
    relais_version: String,
}

fn installed(conn: &Connection) -> rusqlite::Result<Vec<Installed>> {
    if !has_table(conn, TABLES)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT table_name, tenant, entity_type, columns, primary_key, installed_at, \
         relais_version FROM {TABLES} ORDER BY table_name"
    ))?;
    // A list edited into something else by hand reads as empty: the table then shows
    // as drifted, and the agent's next pass recreates its triggers and the record.
    let parse = |text: String| miniserde::json::from_str::<Vec<String>>(&text).unwrap_or_default();
    stmt.query_map([], |r| {
        let shape = Shape {
            columns: parse(r.get(3)?),
            primary_key: parse(r.get(4)?),
            // Only install warns about integer keys, from the live table.
            integer_key: false,
        };
        Ok(Installed {
            table: r.get(0)?,
            tenant: r.get(1)?,
            entity_type: r.get(2)?,
            shape,
            installed_at: r.get(5)?,
            relais_version: r.get(6)?,
        })
    })?
    .collect()
}

/// The shape of a configured table, or why it cannot be captured.
fn capturable(conn: &Connection, path: &Path, t: &SyncTable) -> Result<Shape, OutboxError> {
    let refuse = |problem: String| OutboxError::Refused {
        path: path.to_path_buf(),
        table: t.table.clone(),
        problem,
    };
    let shape = match triggers::inspect(conn, &t.table)
        .map_err(sql_error(path, "reading the table's columns"))?
    {
        Found::Missing => return Err(refuse("does not exist".into())),
        Found::NotATable(what) => return Err(refuse(format!("is {what}, not a table"))),
        Found::Table(shape) => shape,
    };
    if shape.primary_key.is_empty() {
        return Err(refuse(
            "has no declared PRIMARY KEY (its rowid is not stable enough to name an entity \
             across devices): declare one, a UUID or text key"
                .into(),
        ));
    }
    Ok(shape)
}

/// (Re)creates the triggers of one table and records them, inside the caller's
/// transaction. The expressions are compiled first, so a failure leaves nothing.
fn create_capture(conn: &Connection, path: &Path, capture: &Capture) -> Result<(), OutboxError> {
    conn.prepare(&capture.probe_sql())
        .map_err(|e| OutboxError::Refused {
            path: path.to_path_buf(),
            table: capture.table.into(),
            problem: format!("cannot be captured: {e}"),
        })?;
    drop_triggers(conn, path, capture.table)?;
    for sql in capture.create_sql() {
        conn.execute_batch(&sql)
            .map_err(sql_error(path, "creating a trigger"))?;
    }
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO {TABLES} (table_name, tenant, entity_type, columns, \
             primary_key, installed_at, relais_version) VALUES (?1, ?2, ?3, ?4, ?5, {}, ?6)",
            triggers::NOW_MS
        ),
        rusqlite::params![
            capture.table,
            capture.tenant,
            capture.entity_type,
            json_list(&capture.shape.columns),
            json_list(&capture.shape.primary_key),
            env!("CARGO_PKG_VERSION"),
        ],
    )
    .map_err(sql_error(path, "recording the table"))?;
    Ok(())
}

fn drop_triggers(conn: &Connection, path: &Path, table: &str) -> Result<(), OutboxError> {
    for name in triggers::trigger_names(table) {
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS {}",
            triggers::quote_ident(&name)
        ))
        .map_err(sql_error(path, "dropping a trigger"))?;
    }
    Ok(())
}

/// What install did to one database, for the command's output.
struct InstallReport {
    lines: Vec<String>,
    warnings: Vec<String>,
}

/// Installs the capture of `sync.tables` of one database in one `BEGIN IMMEDIATE`
/// transaction. Idempotent: a table already installed gets its triggers recreated from
/// its current columns (the outbox and its events are kept); an installed table no
/// longer configured loses its triggers. So the configuration is the one truth, and
/// re-running install after a schema change is always right.
fn install_source(
    conn: &mut Connection,
    path: &Path,
    sync: &SyncSettings,
) -> Result<InstallReport, OutboxError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error(path, "starting the install"))?;
    let before = installed(&tx).map_err(sql_error(path, "reading relais_sync_tables"))?;
    let mut report = InstallReport {
        lines: Vec::new(),
        warnings: Vec::new(),
    };
    let wanted: Vec<&SyncTable> = sync.tables_of(path).collect();
    let mut shapes = Vec::new();
    for t in &wanted {
        shapes.push(capturable(&tx, path, t)?);
    }
    tx.execute_batch(&triggers::schema_sql())
        .map_err(sql_error(path, "creating the outbox tables"))?;
    for old in &before {
        if !wanted.iter().any(|t| t.table == old.table) {
            drop_triggers(&tx, path, &old.table)?;
            tx.execute(
                &format!("DELETE FROM {TABLES} WHERE table_name = ?1"),
                [&old.table],
            )
            .map_err(sql_error(path, "recording the table"))?;
            report.lines.push(format!(
                "table {}: no longer in sync.tables, capture removed (its events are kept)",
                old.table
            ));
        }
    }
    for (t, shape) in wanted.iter().zip(&shapes) {
        let capture = Capture {
            tenant: &sync.tenant,
            entity_type: &t.entity_type,
            table: &t.table,
            shape,
        };
        create_capture(&tx, path, &capture)?;
        let again = match before.iter().find(|o| o.table == t.table) {
            None => "",
            Some(o) if o.shape.columns == shape.columns => {
                " (installed before: triggers recreated)"
            }
            Some(_) => " (columns changed since the last install: triggers recreated)",
        };
        report.lines.push(format!(
            "table {} captured as {} ({}): columns {}; key {}{again}",
            t.table,
            t.entity_type,
            t.strategy.name(),
            shape.columns.join(", "),
            shape.primary_key.join(", "),
        ));
        if shape.integer_key {
            report.warnings.push(format!(
                "warning: table {} is keyed by an integer ({}): ids allocated by counting on \
                 several devices collide; key a synced table by a UUID or text id generated \
                 on the device",
                t.table, shape.primary_key[0]
            ));
        }
    }
    tx.commit()
        .map_err(sql_error(path, "committing the install"))?;
    Ok(report)
}

/// `relais outbox install`: every source is checked before any is changed.
pub fn run_install(settings: &Settings) -> i32 {
    let result = configured(settings).and_then(|sync| {
        let mut conns = Vec::new();
        for path in sync.sources() {
            let conn = source::open_writable(path).map_err(OutboxError::Open)?;
            for t in sync.tables_of(path) {
                capturable(&conn, path, t)?;
            }
            conns.push((path, conn));
        }
        for (path, mut conn) in conns {
            let report = install_source(&mut conn, path, sync)?;
            println!("outbox {}: installed", path.display());
            for line in report.lines {
                println!("  {line}");
            }
            for w in report.warnings {
                eprintln!("relais: {w}");
            }
        }
        Ok(())
    });
    finish(result)
}

fn finish(result: Result<(), OutboxError>) -> i32 {
    match result {
        Ok(()) => crate::daemon::EXIT_OK,
        Err(e) => {
            eprintln!("relais: {e}");
            e.exit_code()
        }
    }
}

/// Events not yet settled with the server.
fn unsettled(conn: &Connection) -> rusqlite::Result<u64> {
    if !has_table(conn, OUTBOX)? {
        return Ok(0);
    }
    conn.query_row(
        &format!("SELECT count(*) FROM {OUTBOX} WHERE status IN {UNSETTLED}"),
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// `relais outbox uninstall [--force]`: drops, in one transaction per database, the
/// triggers `relais_sync_tables` lists and the three tables install created; the
/// application's tables and rows are left as they were. Every source is checked first.
pub fn run_uninstall(settings: &Settings, force: bool) -> i32 {
    let result = configured(settings).and_then(|sync| {
        let mut conns = Vec::new();
        for path in sync.sources() {
            let conn = source::open_writable(path).map_err(OutboxError::Open)?;
            let events = unsettled(&conn).map_err(sql_error(path, "counting events"))?;
            if events > 0 && !force {
                return Err(OutboxError::Unsettled {
                    path: path.to_path_buf(),
                    events,
                });
            }
            conns.push((path, conn));
        }
        for (path, mut conn) in conns {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql_error(path, "starting the uninstall"))?;
            let tables = installed(&tx).map_err(sql_error(path, "reading relais_sync_tables"))?;
            let events = unsettled(&tx).map_err(sql_error(path, "counting events"))?;
            if events > 0 && !force {
                return Err(OutboxError::Unsettled {
                    path: path.to_path_buf(),
                    events,
                });
            }
            for t in &tables {
                drop_triggers(&tx, path, &t.table)?;
            }
            tx.execute_batch(&format!(
                "DROP TABLE IF EXISTS {OUTBOX}; DROP TABLE IF EXISTS {CONTROL}; \
                 DROP TABLE IF EXISTS {TABLES};"
            ))
            .map_err(sql_error(path, "dropping the outbox tables"))?;
            tx.commit()
                .map_err(sql_error(path, "committing the uninstall"))?;
            let dropped = if events > 0 {
                format!(", {events} unsettled events dropped (--force)")
            } else {
                String::new()
            };
            println!(
                "outbox {}: uninstalled: {} tables no longer captured{dropped}",
                path.display(),
                tables.len()
            );
        }
        Ok(())
    });
    finish(result)
}

/// Deletes the ACKNOWLEDGED events acknowledged more than `retention` ago, in batches
/// of short transactions, so the application never waits long. Each entity's newest
/// event is kept whatever its age: the next change's `local_version` is 1 + the last
/// one's, and must never go back. Returns how many were deleted.
pub fn prune(conn: &Connection, retention: Duration) -> rusqlite::Result<u64> {
    const BATCH: usize = 500;
    let select = format!(
        "SELECT id FROM {OUTBOX} AS o WHERE status = 'ACKNOWLEDGED' \
         AND updated_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1) \
         AND EXISTS (SELECT 1 FROM {OUTBOX} AS n WHERE n.entity_type = o.entity_type \
         AND n.entity_id = o.entity_id AND n.local_version > o.local_version) LIMIT {BATCH}"
    );
    let modifier = format!("-{} seconds", retention.as_secs());
    let mut deleted = 0;
    loop {
        // Read first: a DELETE matching nothing would still take the write lock.
        let ids: Vec<String> = conn
            .prepare_cached(&select)?
            .query_map([&modifier], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(deleted);
        }
        let mut delete = conn.prepare_cached(&format!("DELETE FROM {OUTBOX} WHERE id = ?1"))?;
        let tx = conn.unchecked_transaction()?;
        for id in &ids {
            deleted += delete.execute([id])? as u64;
        }
        tx.commit()?;
        if ids.len() < BATCH {
            return Ok(deleted);
        }
    }
}

/// The agent's outbox upkeep at each pass: recreates the triggers of a table whose
/// columns changed since they were made (the triggers of an `ALTER TABLE ADD COLUMN`ed
/// table keep capturing the old columns until then), and prunes acknowledged events.
/// The later Up part sends from here. Problems are logged, once each, and never stop
/// the push.
#[derive(Default)]
pub struct Maintainer {
    /// Problems logged already, so that a standing one is one line, not one per pass.
    said: HashSet<String>,
}

impl Maintainer {
    pub fn pass(&mut self, sync: &SyncSettings) {
        for path in sync.sources() {
            if let Err(e) = self.maintain(path, sync) {
                self.say_once(e.to_string());
            }
        }
    }

    fn say_once(&mut self, line: String) {
        if self.said.insert(line.clone()) {
            log::warn!("{line}");
        }
    }

    fn maintain(&mut self, path: &Path, sync: &SyncSettings) -> Result<(), OutboxError> {
        let mut conn = source::open_writable(path).map_err(OutboxError::Open)?;
        let recorded = installed(&conn).map_err(sql_error(path, "reading relais_sync_tables"))?;
        for t in sync.tables_of(path) {
            if !recorded.iter().any(|r| r.table == t.table) {
                self.say_once(format!(
                    "outbox {}: table {} is in sync.tables but not captured: run `relais \
                     outbox install`",
                    path.display(),
                    t.table
                ));
            }
        }
        for r in &recorded {
            if let Some(change) = drift(&conn, path, r)? {
                self.recapture(&mut conn, path, r, &change)?;
            }
        }
        if !recorded.is_empty() {
            let n = prune(&conn, sync.retention).map_err(sql_error(path, "pruning"))?;
            if n > 0 {
                log::info!(
                    "outbox {}: {n} acknowledged events older than {} pruned",
                    path.display(),
                    clock::human_duration(sync.retention)
                );
            }
        }
        Ok(())
    }

    /// Recreates a drifted table's triggers, as recorded (tenant, entity type), from its
    /// current columns, in one short transaction; one line says so.
    fn recapture(
        &mut self,
        conn: &mut Connection,
        path: &Path,
        r: &Installed,
        change: &str,
    ) -> Result<(), OutboxError> {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_error(path, "starting the trigger update"))?;
        let shape = match triggers::inspect(&tx, &r.table)
            .map_err(sql_error(path, "reading the table's columns"))?
        {
            Found::Table(shape) if !shape.primary_key.is_empty() => shape,
            _ => {
                self.say_once(format!(
                    "outbox {}: table {} is gone or has lost its primary key: not captured; \
                     `relais outbox install` says more",
                    path.display(),
                    r.table
                ));
                return Ok(());
            }
        };
        let capture = Capture {
            tenant: &r.tenant,
            entity_type: &r.entity_type,
            table: &r.table,
            shape: &shape,
        };
        create_capture(&tx, path, &capture)?;
        tx.commit()
            .map_err(sql_error(path, "committing the trigger update"))?;
        log::info!(
            "outbox {}: table {}: {change}: triggers recreated with columns {}",
            path.display(),
            r.table,
            shape.columns.join(", ")
        );
        Ok(())
    }
}

/// How the table differs from its recorded capture: columns added or removed, the key
/// changed, or a trigger missing; `None` when it matches.
fn drift(conn: &Connection, path: &Path, r: &Installed) -> Result<Option<String>, OutboxError> {
    let current = match triggers::inspect(conn, &r.table)
        .map_err(sql_error(path, "reading the table's columns"))?
    {
        Found::Table(shape) => shape,
        // Dropped by the application: its triggers went with it; nothing to capture.
        _ => return Ok(None),
    };
    let mut change = Vec::new();
    let added: Vec<&String> = current
        .columns
        .iter()
        .filter(|c| !r.shape.columns.contains(c))
        .collect();
    let removed: Vec<&String> = r
        .shape
        .columns
        .iter()
        .filter(|c| !current.columns.contains(c))
        .collect();
    let names = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    if !added.is_empty() {
        change.push(format!("columns added: {}", names(&added)));
    }
    if !removed.is_empty() {
        change.push(format!("columns removed: {}", names(&removed)));
    }
    if added.is_empty() && removed.is_empty() && current.columns != r.shape.columns {
        change.push("columns reordered".to_string());
    }
    if current.primary_key != r.shape.primary_key {
        change.push(format!("key now {}", current.primary_key.join(", ")));
    }
    let present = triggers_present(conn, &r.table).map_err(sql_error(path, "reading triggers"))?;
    if present.iter().any(|p| !p) {
        change.push("a trigger was missing".to_string());
    }
    Ok((!change.is_empty()).then(|| change.join("; ")))
}

/// Whether each of the table's three triggers exists.
fn triggers_present(conn: &Connection, table: &str) -> rusqlite::Result<[bool; 3]> {
    let mut stmt = conn.prepare_cached(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND name = ?1",
    )?;
    let mut out = [false; 3];
    for (i, name) in triggers::trigger_names(table).iter().enumerate() {
        out[i] = stmt.query_row([name], |r| r.get::<_, i64>(0))? > 0;
    }
    Ok(out)
}

/// One database's outbox, for `relais outbox status`.
struct SourceStatus {
    path: PathBuf,
    tables: Vec<TableStatus>,
    /// (entity_type, status, events).
    counts: Vec<(String, String, u64)>,
    oldest_pending_s: Option<f64>,
}

struct TableStatus {
    table: String,
    configured: Option<SyncTable>,
    installed: Option<Installed>,
    /// `None` when the table no longer exists.
    current: Option<Vec<String>>,
    triggers: [bool; 3],
}

impl TableStatus {
    fn drifted(&self) -> bool {
        matches!((&self.installed, &self.current), (Some(i), Some(c)) if &i.shape.columns != c)
    }
}

fn read_status(path: &Path, sync: &SyncSettings) -> Result<SourceStatus, OutboxError> {
    let conn = source::open(path).map_err(OutboxError::Open)?;
    let e = sql_error(path, "reading the outbox");
    let recorded = installed(&conn).map_err(&e)?;
    let mut names: Vec<String> = sync.tables_of(path).map(|t| t.table.clone()).collect();
    for r in &recorded {
        if !names.contains(&r.table) {
            names.push(r.table.clone());
        }
    }
    let mut tables = Vec::new();
    for table in names {
        let current = match triggers::inspect(&conn, &table).map_err(&e)? {
            Found::Table(shape) => Some(shape.columns),
            _ => None,
        };
        tables.push(TableStatus {
            configured: sync.tables_of(path).find(|t| t.table == table).cloned(),
            installed: recorded.iter().find(|r| r.table == table).cloned(),
            current,
            triggers: triggers_present(&conn, &table).map_err(&e)?,
            table,
        });
    }
    let (mut counts, mut oldest_pending_s) = (Vec::new(), None);
    if has_table(&conn, OUTBOX).map_err(&e)? {
        let mut stmt = conn
            .prepare(&format!(
                "SELECT entity_type, status, count(*) FROM {OUTBOX} GROUP BY 1, 2 ORDER BY 1, 2"
            ))
            .map_err(&e)?;
        counts = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .map_err(&e)?
            .collect::<Result<_, _>>()
            .map_err(&e)?;
        oldest_pending_s = conn
            .query_row(
                &format!(
                    "SELECT (julianday('now') - julianday(min(created_at))) * 86400.0 \
                     FROM {OUTBOX} WHERE status = 'PENDING'"
                ),
                [],
                |r| r.get::<_, Option<f64>>(0),
            )
            .optional()
            .map_err(&e)?
            .flatten();
    }
    Ok(SourceStatus {
        path: path.to_path_buf(),
        tables,
        counts,
        oldest_pending_s,
    })
}

/// `relais outbox status [--json]`: read-only.
pub fn run_status(settings: &Settings, as_json: bool) -> i32 {
    let result = configured(settings).and_then(|sync| {
        let all = sync
            .sources()
            .into_iter()
            .map(|p| read_status(p, sync))
            .collect::<Result<Vec<_>, _>>()?;
        print!(
            "{}",
            if as_json {
                to_json(&all)
            } else {
                to_text(&all)
            }
        );
        Ok(())
    });
    finish(result)
}

fn to_text(all: &[SourceStatus]) -> String {
    let mut out = String::new();
    for s in all {
        let installed = s.tables.iter().any(|t| t.installed.is_some());
        let _ = writeln!(
            out,
            "outbox {}: {}",
            s.path.display(),
            if installed {
                "installed"
            } else {
                "not installed: run `relais outbox install`"
            }
        );
        for t in &s.tables {
            let _ = write!(out, "  table {}", t.table);
            if let Some(c) = &t.configured {
                let _ = write!(out, " ({}, {})", c.entity_type, c.strategy.name());
            }
            match (&t.installed, &t.current) {
                (None, _) => out.push_str(": not installed"),
                (Some(_), None) => out.push_str(": the table no longer exists"),
                (Some(i), Some(current)) => {
                    let _ = write!(
                        out,
                        ": columns {}; key {}; installed {} by relais {}",
                        i.shape.columns.join(", "),
                        i.shape.primary_key.join(", "),
                        i.installed_at,
                        i.relais_version
                    );
                    if t.drifted() {
                        let _ = write!(
                            out,
                            "; columns now {}: the agent's next pass recreates the triggers",
                            current.join(", ")
                        );
                    }
                }
            }
            if t.configured.is_none() {
                out.push_str("; no longer in sync.tables");
            }
            if t.installed.is_some() {
                let missing: Vec<&str> = ["ins", "upd", "del"]
                    .iter()
                    .zip(t.triggers)
                    .filter(|(_, present)| !present)
                    .map(|(n, _)| *n)
                    .collect();
                if missing.is_empty() {
                    out.push_str("; triggers present");
                } else {
                    let _ = write!(out, "; triggers MISSING: {}", missing.join(", "));
                }
            }
            out.push('\n');
        }
        let total =
            |status: &str| -> u64 { s.counts.iter().filter(|c| c.1 == status).map(|c| c.2).sum() };
        let totals: Vec<String> = STATUSES
            .iter()
            .map(|st| format!("{st} {}", total(st)))
            .collect();
        let _ = write!(out, "  events: {}", totals.join(", "));
        if let Some(age) = s.oldest_pending_s {
            let _ = write!(
                out,
                "; oldest pending {} old",
                clock::human_duration(Duration::from_secs_f64(age.max(0.0)))
            );
        }
        out.push('\n');
        for (entity_type, status, n) in &s.counts {
            let _ = writeln!(out, "    {entity_type} {status}: {n}");
        }
    }
    out
}

fn to_json(all: &[SourceStatus]) -> String {
    let list = |out: &mut String, names: &[String]| out.push_str(&json_list(names));
    let mut out = String::from("{\"sources\": [");
    for (i, s) in all.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('{');
        json::push_key(&mut out, "path", true);
        json::push_str(&mut out, &s.path.display().to_string());
        json::push_key(&mut out, "tables", false);
        out.push('[');
        for (j, t) in s.tables.iter().enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            out.push('{');
            json::push_key(&mut out, "table", true);
            json::push_str(&mut out, &t.table);
            json::push_key(&mut out, "entity_type", false);
            json::push_opt_str(
                &mut out,
                t.configured
                    .as_ref()
                    .map(|c| c.entity_type.as_str())
                    .or(t.installed.as_ref().map(|i| i.entity_type.as_str())),
            );
            json::push_key(&mut out, "strategy", false);
            json::push_opt_str(&mut out, t.configured.as_ref().map(|c| c.strategy.name()));
            json::push_key(&mut out, "configured", false);
            let _ = write!(out, "{}", t.configured.is_some());
            json::push_key(&mut out, "installed", false);
            let _ = write!(out, "{}", t.installed.is_some());
            json::push_key(&mut out, "columns", false);
            match &t.installed {
                Some(i) => list(&mut out, &i.shape.columns),
                None => out.push_str("null"),
            }
            json::push_key(&mut out, "primary_key", false);
            match &t.installed {
                Some(i) => list(&mut out, &i.shape.primary_key),
                None => out.push_str("null"),
            }
            json::push_key(&mut out, "current_columns", false);
            match &t.current {
                Some(c) => list(&mut out, c),
                None => out.push_str("null"),
            }
            json::push_key(&mut out, "drift", false);
            let _ = write!(out, "{}", t.drifted());
            json::push_key(&mut out, "triggers", false);
            let [ins, upd, del] = t.triggers;
            let _ = write!(out, "{{\"ins\": {ins}, \"upd\": {upd}, \"del\": {del}}}}}");
        }
        out.push(']');
        json::push_key(&mut out, "counts", false);
        out.push('[');
        for (j, (entity_type, status, n)) in s.counts.iter().enumerate() {
            if j > 0 {
                out.push_str(", ");
            }
            out.push('{');
            json::push_key(&mut out, "entity_type", true);
            json::push_str(&mut out, entity_type);
            json::push_key(&mut out, "status", false);
            json::push_str(&mut out, status);
            json::push_key(&mut out, "events", false);
            let _ = write!(out, "{n}}}");
        }
        out.push(']');
        json::push_key(&mut out, "oldest_pending_s", false);
        match s.oldest_pending_s {
            Some(age) => json::push_f64(&mut out, age.max(0.0)),
            None => out.push_str("null"),
        }
        out.push('}');
    }
    out.push_str("]}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox_db(tag: &str) -> (PathBuf, Connection) {
        let path =
            std::env::temp_dir().join(format!("relais-outbox-{tag}-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&triggers::schema_sql()).unwrap();
        (path, conn)
    }

    fn event(conn: &Connection, entity: &str, version: i64, status: &str, updated_at: &str) {
        conn.execute(
            "INSERT INTO relais_outbox (tenant, entity_type, entity_id, operation, payload, \
             local_version, status, updated_at) VALUES ('t', 'GRADE', ?1, 'UPDATE', '{}', ?2, ?3, ?4)",
            rusqlite::params![entity, version, status, updated_at],
        )
        .unwrap();
    }

    fn left(conn: &Connection) -> Vec<(String, i64)> {
        let mut stmt = conn
            .prepare("SELECT entity_id, local_version FROM relais_outbox ORDER BY 1, 2")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn prune_deletes_old_acknowledged_events_but_each_entitys_newest() {
        let (path, conn) = outbox_db("prune");
        let old = "2000-01-01T00:00:00.000Z";
        event(&conn, "a", 1, "ACKNOWLEDGED", old);
        event(&conn, "a", 2, "ACKNOWLEDGED", old);
        event(&conn, "a", 3, "ACKNOWLEDGED", "2999-01-01T00:00:00.000Z");
        event(&conn, "b", 1, "ACKNOWLEDGED", old); // b's newest: kept
        event(&conn, "c", 1, "FAILED", old); // not acknowledged: kept
        event(&conn, "c", 2, "PENDING", old);
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(prune(&conn, week).unwrap(), 2);
        assert_eq!(
            left(&conn),
            [
                ("a".to_string(), 3),
                ("b".to_string(), 1),
                ("c".to_string(), 1),
                ("c".to_string(), 2)
            ]
        );
        assert_eq!(prune(&conn, week).unwrap(), 0, "nothing left to prune");
        drop(conn);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn prune_goes_in_batches() {
        let (path, conn) = outbox_db("prune-batches");
        let tx = conn.unchecked_transaction().unwrap();
        for v in 1..=1201 {
            event(&tx, "a", v, "ACKNOWLEDGED", "2000-01-01T00:00:00.000Z");
        }
        tx.commit().unwrap();
        assert_eq!(prune(&conn, Duration::from_secs(86_400)).unwrap(), 1200);
        assert_eq!(left(&conn), [("a".to_string(), 1201)]);
        drop(conn);
        std::fs::remove_file(path).unwrap();
    }
}
