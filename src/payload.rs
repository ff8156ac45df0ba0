//! Turning a row of a table's query into the JSON payload the backend expects: the
//! `local_id` column identifies the row, every other column becomes a field, and a
//! dotted alias (`"capteur.nom"`) becomes a member of a nested object.
//!
//! The payload is kept as the text of the object's members (without braces) so that the
//! request body can be assembled around a BLOB streamed from disk.

use base64::Engine;
use rusqlite::types::{Value, ValueRef};

use crate::json;

/// Where each column of the query goes in the payload.
#[derive(Debug)]
pub struct Plan {
    local_id: usize,
    root: Vec<(String, Node)>,
}

#[derive(Debug)]
enum Node {
    Column(usize),
    Object(Vec<(String, Node)>),
}

/// One row, ready to send.
#[derive(Debug, Clone)]
pub struct RowPayload {
    pub local_id: Value,
    /// JSON object members, e.g. `"date": "...", "capteur": {"id": 1}`.
    pub fields: String,
    /// Problems found while converting (text that is not UTF-8), for the log.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Lays out the payload from the query's column names.
    pub fn new(columns: &[String]) -> Result<Plan, String> {
        let local_id = columns
            .iter()
            .position(|c| c == "local_id")
            .ok_or_else(|| {
                "the query yields no local_id column (alias the row's id AS local_id)".to_string()
            })?;
        let mut root = Vec::new();
        for (i, name) in columns.iter().enumerate() {
            if i != local_id {
                insert(&mut root, &name.split('.').collect::<Vec<_>>(), i, name)?;
            }
        }
        Ok(Plan { local_id, root })
    }

    /// Converts one result row.
    pub fn build(&self, row: &rusqlite::Row) -> rusqlite::Result<RowPayload> {
        let mut out = RowPayload {
            local_id: row.get::<_, Value>(self.local_id)?,
            fields: String::new(),
            warnings: Vec::new(),
        };
        write_members(&self.root, row, &mut out)?;
        Ok(out)
    }
}

fn insert(
    nodes: &mut Vec<(String, Node)>,
    path: &[&str],
    column: usize,
    full: &str,
) -> Result<(), String> {
    let (head, rest) = match path.split_first() {
        Some((h, r)) if !h.is_empty() => (*h, r),
        _ => return Err(format!("column alias {full:?} has an empty part")),
    };
    let existing = nodes.iter_mut().find(|(k, _)| k == head);
    match (existing, rest.is_empty()) {
        (None, true) => nodes.push((head.to_string(), Node::Column(column))),
        (None, false) => {
            let mut children = Vec::new();
            insert(&mut children, rest, column, full)?;
            nodes.push((head.to_string(), Node::Object(children)));
        }
        (Some((_, Node::Object(children))), false) => insert(children, rest, column, full)?,
        (Some(_), _) => {
            return Err(format!(
                "column alias {full:?} collides with another column"
            ));
        }
    }
    Ok(())
}

fn write_members(
    nodes: &[(String, Node)],
    row: &rusqlite::Row,
    out: &mut RowPayload,
) -> rusqlite::Result<()> {
    for (i, (key, node)) in nodes.iter().enumerate() {
        json::push_key(&mut out.fields, key, i == 0);
        match node {
            Node::Column(c) => write_value(row.get_ref(*c)?, key, out),
            Node::Object(children) => {
                out.fields.push('{');
                write_members(children, row, out)?;
                out.fields.push('}');
            }
        }
    }
    Ok(())
}

fn write_value(v: ValueRef, key: &str, out: &mut RowPayload) {
    let s = &mut out.fields;
    match v {
        ValueRef::Null => s.push_str("null"),
        ValueRef::Integer(i) => s.push_str(&i.to_string()),
        ValueRef::Real(f) => json::push_f64(s, f),
        ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => json::push_str(s, text),
            Err(_) => {
                // Sending with replacement characters keeps the row flowing; the log says so.
                json::push_str(s, &String::from_utf8_lossy(bytes));
                out.warnings.push(format!(
                    "column {key} is not valid UTF-8; sent with replacement characters"
                ));
            }
        },
        ValueRef::Blob(b) => {
            json::push_str(s, &base64::engine::general_purpose::STANDARD.encode(b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(sql: &str) -> RowPayload {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let plan = Plan::new(&names).unwrap();
        stmt.query_row([], |r| plan.build(r)).unwrap()
    }

    #[test]
    fn nests_dotted_aliases() {
        let p = payload(
            "SELECT 42 AS local_id, '2025-12-18T17:30:00.123456' AS date, 1 AS \"capteur.id\", \
             'PIR Entrée' AS \"capteur.nom\", 1 AS \"capteur.etat\", NULL AS n, 1.5 AS r",
        );
        assert_eq!(p.local_id, Value::Integer(42));
        assert_eq!(
            p.fields,
            r#""date": "2025-12-18T17:30:00.123456", "capteur": {"id": 1, "nom": "PIR Entrée", "etat": 1}, "n": null, "r": 1.5"#
        );
    }

    #[test]
    fn invalid_utf8_is_replaced_and_reported() {
        let p = payload("SELECT 1 AS local_id, CAST(x'ff41' AS TEXT) AS nom");
        assert_eq!(p.fields, "\"nom\": \"\u{fffd}A\"");
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Plan::new(&["id".into()]).unwrap_err().contains("local_id"));
        assert!(
            Plan::new(&["local_id".into(), "a".into(), "a.b".into()])
                .unwrap_err()
                .contains("collides")
        );
    }
}
