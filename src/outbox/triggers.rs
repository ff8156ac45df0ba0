//! The SQL of the change capture: the outbox's own tables, and the three triggers of a
//! synchronised table, generated from the table's columns as `PRAGMA table_info` lists
//! them when they are (re)created.
//!
//! Every trigger writes in the application's own transaction, so a change is in the
//! outbox if and only if it commits. None may ever make the application's write fail:
//! the values are made JSON-safe (a BLOB becomes `{"$hex": "..."}`, json_object() would
//! raise an error on it) and the expressions are compiled once at install by
//! [`Capture::probe_sql`], before any trigger exists.

use rusqlite::Connection;

pub const OUTBOX: &str = "relais_outbox";
pub const CONTROL: &str = "relais_sync_control";
pub const TABLES: &str = "relais_sync_tables";

/// A UUID v4 in SQL: 122 random bits, the version nibble `4` and the variant nibble one
/// of `8`, `9`, `a`, `b` (`random() & 3` is 0 to 3 even for a negative `random()`).
const UUID_V4: &str = "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' \
     || substr(lower(hex(randomblob(2))), 2) || '-' || substr('89ab', 1 + (random() & 3), 1) \
     || substr(lower(hex(randomblob(2))), 2) || '-' || lower(hex(randomblob(6)))";

/// UTC, ISO 8601, milliseconds: `2025-12-18T17:30:00.123Z`.
pub const NOW_MS: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// What install creates besides the triggers, in one batch. `IF NOT EXISTS`: a second
/// install keeps the outbox and its events.
pub fn schema_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {OUTBOX} (
    id TEXT PRIMARY KEY NOT NULL DEFAULT ({UUID_V4}),
    tenant TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ('CREATE', 'UPDATE', 'DELETE')),
    payload TEXT NOT NULL,
    local_version INTEGER NOT NULL,
    created_at TEXT NOT NULL DEFAULT ({NOW_MS}),
    updated_at TEXT NOT NULL DEFAULT ({NOW_MS}),
    attempts INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'SENT', 'ACKNOWLEDGED', 'FAILED', 'CONFLICT')),
    error TEXT,
    server_event_id TEXT
);
CREATE INDEX IF NOT EXISTS relais_outbox_status ON {OUTBOX} (status, created_at);
CREATE INDEX IF NOT EXISTS relais_outbox_entity ON {OUTBOX} (entity_type, entity_id);
-- applying = 1 only inside the down-apply's own transaction (see the triggers' WHEN).
CREATE TABLE IF NOT EXISTS {CONTROL} (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    applying INTEGER NOT NULL DEFAULT 0 CHECK (applying IN (0, 1))
);
INSERT OR IGNORE INTO {CONTROL} (id, applying) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS {TABLES} (
    table_name TEXT PRIMARY KEY NOT NULL,
    tenant TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    columns TEXT NOT NULL,
    primary_key TEXT NOT NULL,
    installed_at TEXT NOT NULL,
    relais_version TEXT NOT NULL
);"
    )
}

/// `name` as an SQL identifier, whatever it holds.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The trigger names of `table`: after insert, update, delete.
pub fn trigger_names(table: &str) -> [String; 3] {
    ["ins", "upd", "del"].map(|op| format!("relais_sync_{table}_{op}"))
}

/// A table's columns and key, as the triggers are built from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// In declaration order.
    pub columns: Vec<String>,
    /// In key order; empty for a rowid-only table.
    pub primary_key: Vec<String>,
    /// The key is one column of integer affinity: ids the application allocates by
    /// counting collide between devices.
    pub integer_key: bool,
}

/// What `table` is in the database: absent, not an ordinary table, or its shape.
pub enum Found {
    Missing,
    /// A view or a virtual table: SQLite gives neither AFTER triggers on its rows.
    NotATable(&'static str),
    Table(Shape),
}

pub fn inspect(conn: &Connection, table: &str) -> rusqlite::Result<Found> {
    let kind = conn.query_row(
        "SELECT type, coalesce(sql, '') FROM sqlite_schema \
         WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE",
        [table],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
    );
    match kind {
        Err(rusqlite::Error::QueryReturnedNoRows) => return Ok(Found::Missing),
        Err(e) => return Err(e),
        Ok((kind, _)) if kind == "view" => return Ok(Found::NotATable("a view")),
        Ok((_, sql))
            if sql
                .trim_start()
                .to_ascii_uppercase()
                .starts_with("CREATE VIRTUAL") =>
        {
            return Ok(Found::NotATable("a virtual table"));
        }
        Ok(_) => {}
    }
    let mut stmt = conn.prepare("SELECT name, type, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let rows: Vec<(String, String, i64)> = stmt
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut keyed: Vec<&(String, String, i64)> = rows.iter().filter(|r| r.2 > 0).collect();
    keyed.sort_by_key(|r| r.2);
    Ok(Found::Table(Shape {
        columns: rows.iter().map(|r| r.0.clone()).collect(),
        primary_key: keyed.iter().map(|r| r.0.clone()).collect(),
        // SQLite's affinity rule: a declared type containing INT is an integer column.
        integer_key: keyed.len() == 1 && keyed[0].1.to_ascii_uppercase().contains("INT"),
    }))
}

/// The capture of one table: what its triggers write.
pub struct Capture<'a> {
    pub tenant: &'a str,
    pub entity_type: &'a str,
    pub table: &'a str,
    pub shape: &'a Shape,
}

impl Capture<'_> {
    /// The row's value of `column`, JSON-safe.
    fn value(row: &str, column: &str) -> String {
        let c = format!("{row}.{}", quote_ident(column));
        format!("CASE WHEN typeof({c}) = 'blob' THEN json_object('$hex', hex({c})) ELSE {c} END")
    }

    /// The entity id: the key's text, or a JSON array of the key's values when composite.
    fn entity_id(&self, row: &str) -> String {
        match self.shape.primary_key.as_slice() {
            [one] => format!("CAST({} AS TEXT)", Capture::value(row, one)),
            many => {
                let values: Vec<String> = many.iter().map(|c| Capture::value(row, c)).collect();
                format!("json_array({})", values.join(", "))
            }
        }
    }

    /// Every column of the row, as a JSON object.
    fn payload(&self, row: &str) -> String {
        let pairs: Vec<String> = self
            .shape
            .columns
            .iter()
            .map(|c| format!("{}, {}", quote_literal(c), Capture::value(row, c)))
            .collect();
        format!("json_object({})", pairs.join(", "))
    }

    /// The outbox row of the entity `row` names, as a SELECT list: 1 + the entity's
    /// last captured version (the index on entity_type, entity_id finds it).
    fn outbox_values(&self, row: &str, operation: &str) -> String {
        let entity_type = quote_literal(self.entity_type);
        let id = self.entity_id(row);
        format!(
            "{}, {entity_type}, {id}, {operation}, {}, 1 + coalesce((SELECT max(local_version) \
             FROM {OUTBOX} WHERE entity_type = {entity_type} AND entity_id = {id}), 0)",
            quote_literal(self.tenant),
            self.payload(row),
        )
    }

    /// The `CREATE TRIGGER` statements, after insert, update and delete.
    ///
    /// The `WHEN` clause skips the capture while `applying` is 1: the down-apply sets it
    /// and resets it inside its own transaction, and SQLite serialises writers, so an
    /// application write never runs while it is 1; only the down-apply's own writes are
    /// skipped (no echo back to the server). A missing control row captures.
    pub fn create_sql(&self) -> [String; 3] {
        let [ins, upd, del] = trigger_names(self.table).map(|n| quote_ident(&n));
        let table = quote_ident(self.table);
        let capturing = format!("coalesce((SELECT applying FROM {CONTROL} WHERE id = 1), 0) = 0");
        let insert = format!(
            "INSERT INTO {OUTBOX} (tenant, entity_type, entity_id, operation, payload, local_version)"
        );
        let changed: Vec<String> = self
            .shape
            .columns
            .iter()
            .map(|c| format!("OLD.{0} IS NOT NEW.{0}", quote_ident(c)))
            .collect();
        let (old_id, new_id) = (self.entity_id("OLD"), self.entity_id("NEW"));
        [
            format!(
                "CREATE TRIGGER {ins} AFTER INSERT ON {table} WHEN {capturing}\nBEGIN\n  \
                 {insert} SELECT {};\nEND",
                self.outbox_values("NEW", "'CREATE'")
            ),
            // An update that changes no column is no change. One that changes the key
            // is the old entity's end and a new one's start: DELETE, then CREATE.
            format!(
                "CREATE TRIGGER {upd} AFTER UPDATE ON {table} WHEN {capturing} AND ({})\n\
                 BEGIN\n  {insert} SELECT {} WHERE {old_id} IS NOT {new_id};\n  \
                 {insert} SELECT {};\nEND",
                changed.join(" OR "),
                self.outbox_values("OLD", "'DELETE'"),
                self.outbox_values(
                    "NEW",
                    &format!("CASE WHEN {old_id} IS {new_id} THEN 'UPDATE' ELSE 'CREATE' END")
                ),
            ),
            format!(
                "CREATE TRIGGER {del} AFTER DELETE ON {table} WHEN {capturing}\nBEGIN\n  \
                 {insert} SELECT {};\nEND",
                self.outbox_values("OLD", "'DELETE'")
            ),
        ]
    }

    /// A query compiling the triggers' expressions against the table (aliased `NEW`):
    /// preparing it fails, at install, on what would otherwise fail the application's
    /// writes at run time (too many columns for json_object(), say).
    pub fn probe_sql(&self) -> String {
        format!(
            "SELECT {}, {} FROM {} AS NEW LIMIT 0",
            self.entity_id("NEW"),
            self.payload("NEW"),
            quote_ident(self.table)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("l'été"), "'l''été'");
    }

    #[test]
    fn uuids_are_version_4() {
        let conn = Connection::open_in_memory().unwrap();
        for _ in 0..200 {
            let id: String = conn
                .query_row(&format!("SELECT {UUID_V4}"), [], |r| r.get(0))
                .unwrap();
            let parts: Vec<&str> = id.split('-').collect();
            let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
            assert_eq!(lens, [8, 4, 4, 4, 12], "{id}");
            assert!(parts[2].starts_with('4'), "{id}");
            assert!("89ab".contains(&parts[3][..1]), "{id}");
            assert!(
                id.chars()
                    .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
    }
}
