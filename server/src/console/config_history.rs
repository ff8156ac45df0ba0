//! A site's configuration as the console shows it: the body `GET /config/{site_token}`
//! serves, pretty printed with every secret masked ([`mask`], the one place that knows
//! which members are secrets), its versions (the store keeps the last 50) and a line
//! diff between two of them, masked before diffing so a changed password shows as a
//! changed line without its value.

use axum::extract::{Path, RawQuery, State};
use maud::{Markup, html};
use miniserde::json::{Object, Value};

use super::Console;
use super::error::Error;
use super::form::Form;
use super::layout;
use super::session::LoggedIn;
use crate::store::{ConfigVersion, Store};

/// What a secret shows as; sent back unchanged in a form, it keeps the stored secret.
pub const MASK: &str = "••••••";

/// Whether a member of this name holds a secret: the PJLink password, the SNMP
/// community, and any member named like a password, secret or token, wherever it sits.
fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "community"
        || ["password", "secret", "token"]
            .iter()
            .any(|s| name.contains(s))
}

/// `value` with every secret member's value replaced by [`MASK`].
pub fn mask(value: &Value) -> Value {
    match value {
        Value::Object(obj) => Value::Object(
            obj.iter()
                .map(|(k, v)| {
                    let v = if is_secret(k) {
                        Value::String(MASK.into())
                    } else {
                        mask(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(mask).collect()),
        other => other.clone(),
    }
}

/// Puts back into `edited` the secrets of `stored` where `edited` still holds the
/// [`MASK`] at the same place; `false` if a mask is left with no secret to restore.
pub fn unmask(edited: &mut Value, stored: Option<&Value>) -> bool {
    match edited {
        Value::Object(obj) => obj.iter_mut().all(|(k, v)| {
            let old = match stored {
                Some(Value::Object(s)) => s.get(k),
                _ => None,
            };
            if is_secret(k) && matches!(v, Value::String(s) if s == MASK) {
                match old {
                    Some(old) => {
                        *v = old.clone();
                        true
                    }
                    None => false,
                }
            } else {
                unmask(v, old)
            }
        }),
        Value::Array(items) => items.iter_mut().enumerate().all(|(i, v)| {
            let old = match stored {
                Some(Value::Array(s)) => s.get(i),
                _ => None,
            };
            unmask(v, old)
        }),
        _ => true,
    }
}

/// A served body (JSON text), masked and pretty printed.
pub fn masked_text(body: &str) -> String {
    match miniserde::json::from_str::<Value>(body) {
        Ok(value) => pretty(&mask(&value)),
        // The server wrote it; a body edited by hand in the store is not shown at all
        // rather than shown unmasked.
        Err(_) => "(this version's body is not JSON)".into(),
    }
}

/// An object's members as a JSON text area shows them: masked, pretty printed.
pub fn masked_object(obj: &Object) -> String {
    pretty(&mask(&Value::Object(obj.clone())))
}

/// Two-space indented JSON, members in key order.
pub fn pretty(value: &Value) -> String {
    let mut out = String::new();
    write_pretty(&mut out, value, 0);
    out
}

fn write_pretty(out: &mut String, value: &Value, depth: usize) {
    let indent = |out: &mut String, depth: usize| out.push_str(&"  ".repeat(depth));
    match value {
        Value::Object(obj) if !obj.is_empty() => {
            out.push_str("{\n");
            for (i, (k, v)) in obj.iter().enumerate() {
                indent(out, depth + 1);
                relais_wire::json::push_escaped(out, k, false);
                out.push_str(": ");
                write_pretty(out, v, depth + 1);
                out.push_str(if i + 1 < obj.len() { ",\n" } else { "\n" });
            }
            indent(out, depth);
            out.push('}');
        }
        Value::Array(items) if !items.is_empty() => {
            out.push_str("[\n");
            for (i, v) in items.iter().enumerate() {
                indent(out, depth + 1);
                write_pretty(out, v, depth + 1);
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            indent(out, depth);
            out.push(']');
        }
        Value::String(s) => relais_wire::json::push_escaped(out, s, false),
        other => out.push_str(&miniserde::json::to_string(other)),
    }
}

/// A line of a diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    Same(&'a str),
    Added(&'a str),
    Removed(&'a str),
}

/// Cells of the LCS table at most: two configurations of a few thousand lines each. A
/// larger middle (after the common head and tail) is shown as removed then added.
const DIFF_CELLS_MAX: usize = 4_000_000;

/// The lines of `to` against `from`: a longest common subsequence over lines, after
/// the common head and tail are set aside (a configuration change touches few lines).
pub fn line_diff<'a>(from: &'a str, to: &'a str) -> Vec<Line<'a>> {
    let a: Vec<&str> = from.lines().collect();
    let b: Vec<&str> = to.lines().collect();
    let head = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (ma, mb) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    let mut out: Vec<Line> = a[..head].iter().map(|l| Line::Same(l)).collect();
    let (n, m) = (ma.len(), mb.len());
    if (n + 1) * (m + 1) > DIFF_CELLS_MAX {
        out.extend(ma.iter().map(|l| Line::Removed(l)));
        out.extend(mb.iter().map(|l| Line::Added(l)));
    } else {
        // lcs[i][j]: the LCS length of ma[i..] and mb[j..].
        let w = m + 1;
        let mut lcs = vec![0u32; (n + 1) * w];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * w + j] = if ma[i] == mb[j] {
                    lcs[(i + 1) * w + j + 1] + 1
                } else {
                    lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && ma[i] == mb[j] {
                out.push(Line::Same(ma[i]));
                (i, j) = (i + 1, j + 1);
            } else if j < m && (i == n || lcs[i * w + j + 1] >= lcs[(i + 1) * w + j]) {
                out.push(Line::Added(mb[j]));
                j += 1;
            } else {
                out.push(Line::Removed(ma[i]));
                i += 1;
            }
        }
    }
    out.extend(a[a.len() - tail..].iter().map(|l| Line::Same(l)));
    out
}

/// The configuration part of a site's page: the body as served (masked), its hash and
/// date, the versions, and the form choosing two of them to diff.
pub fn section(
    site_id: i64,
    served: &str,
    hash: &str,
    updated_at: &str,
    versions: &[ConfigVersion],
) -> Markup {
    let older = versions.get(1).or(versions.first()).map_or(0, |v| v.id);
    let newest = versions.first().map_or(0, |v| v.id);
    html! {
        h2 { "Configuration as served" }
        p {
            "Hash " code id="config-hash" { (hash) }
            ", changed " span id="config-updated" { (updated_at) }
        }
        pre id="config" { (masked_text(served)) }
        h2 { "Versions" }
        @if versions.is_empty() {
            p class="muted" { "No version recorded yet (the history starts with the next change)." }
        }
        table id="config-history" {
            thead { tr { th { "Version" } th { "Hash" } th { "Since" } } }
            tbody {
                @for v in versions {
                    tr data-version=(v.id) data-hash=(v.hash) {
                        td { (v.id) }
                        td { code { (layout::short(&v.hash)) } }
                        td { (v.created_at) }
                    }
                }
            }
        }
        form id="config-diff" class="filter" method="get" action={ "/sites/" (site_id) "/config/diff" } {
            div {
                label for="from" { "From" }
                (version_select("from", versions, older))
            }
            div {
                label for="to" { "To" }
                (version_select("to", versions, newest))
            }
            div { button type="submit" id="diff-submit" { "Diff" } }
        }
    }
}

fn version_select(name: &str, versions: &[ConfigVersion], chosen: i64) -> Markup {
    html! {
        select name=(name) id=(name) {
            @for v in versions {
                option value=(v.id) selected[v.id == chosen] {
                    (v.id) " · " (layout::short(&v.hash)) " · " (v.created_at)
                }
            }
        }
    }
}

/// `GET /sites/{id}/config/diff?from=V&to=V`: two versions' masked bodies, line by line.
pub async fn diff<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<maud::Markup, Error> {
    let site_id = super::sites::path_id(&id, "site")?;
    let site = console
        .app
        .store
        .site(site_id)
        .await?
        .map_err(|_| super::sites::no_such("site", site_id))?;
    let versions = console.app.store.config_versions(site_id).await?;
    let query = Form::parse(query.as_deref().unwrap_or(""));
    let pick = |name: &str| -> Result<&ConfigVersion, Error> {
        let wanted: i64 = query.value(name).parse().map_err(|_| {
            Error::BadRequest(format!("console: `{name}` must be a version number"))
        })?;
        versions.iter().find(|v| v.id == wanted).ok_or_else(|| {
            Error::NotFound(format!(
                "console: site {site_id} has no version {wanted} (the last 50 are kept)"
            ))
        })
    };
    let (from, to) = (pick("from")?, pick("to")?);
    let (a, b) = (masked_text(&from.body), masked_text(&to.body));
    let lines = line_diff(&a, &b);
    let changed = lines.iter().filter(|l| !matches!(l, Line::Same(_))).count();
    Ok(layout::page(
        "Configuration diff",
        &session.csrf,
        html! {
            p { a href={ "/sites/" (site_id) } { "← " (site.fields.name) } }
            h1 { "Configuration: version " (from.id) " → " (to.id) }
            p {
                code { (layout::short(&from.hash)) } " (" (from.created_at) ") → "
                code { (layout::short(&to.hash)) } " (" (to.created_at) "): "
                (changed) " line(s) changed"
            }
            pre id="diff" {
                @for line in &lines {
                    @match line {
                        Line::Same(l) => span class="same" { "  " (l) },
                        Line::Added(l) => ins class="add" { "+ " (l) },
                        Line::Removed(l) => del class="del" { "- " (l) },
                    }
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Value {
        miniserde::json::from_str(text).expect("json")
    }

    #[test]
    fn secrets_are_masked_by_member_name_wherever_they_sit() {
        let served = json(
            r#"{"devices": [{"name": "p", "pjlink": {"password": "admin", "port": 4352},
                "snmp": {"community": "public", "v3": {"auth_password": 7}}}],
                "site_name": "password"}"#,
        );
        let text = miniserde::json::to_string(&mask(&served));
        assert!(
            !text.contains("admin") && !text.contains("public"),
            "{text}"
        );
        assert!(!text.contains(":7"), "{text}");
        assert!(
            text.contains(r#""site_name":"password""#),
            "values are not names: {text}"
        );
        assert!(text.contains(r#""port":4352"#));
        assert_eq!(text.matches(MASK).count(), 3);
    }

    #[test]
    fn an_unchanged_mask_keeps_the_stored_secret() {
        let stored = json(r#"{"pjlink": {"password": "admin", "port": 1}}"#);
        let mut edited = mask(&stored);
        if let Value::Object(o) = &mut edited {
            o.insert("snmp".into(), json(r#"{"community": "new"}"#));
        }
        assert!(unmask(&mut edited, Some(&stored)));
        assert_eq!(
            miniserde::json::to_string(&edited),
            r#"{"pjlink":{"password":"admin","port":1},"snmp":{"community":"new"}}"#
        );
        let mut fresh = json(&format!(r#"{{"pjlink": {{"password": "{MASK}"}}}}"#));
        assert!(!unmask(&mut fresh, None), "nothing to restore");
    }

    #[test]
    fn pretty_printing() {
        let v = json(r#"{"b": [1, {"c": "x\"y"}], "a": {}, "d": []}"#);
        assert_eq!(
            pretty(&v),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    {\n      \"c\": \"x\\\"y\"\n    }\n  ],\n  \"d\": []\n}"
        );
    }

    #[test]
    fn diff_marks_changed_lines() {
        let d = line_diff("a\nb\nc\nd", "a\nB\nc\nd\ne");
        assert_eq!(
            d,
            vec![
                Line::Same("a"),
                Line::Added("B"),
                Line::Removed("b"),
                Line::Same("c"),
                Line::Same("d"),
                Line::Added("e"),
            ]
        );
        assert_eq!(line_diff("x", "x"), vec![Line::Same("x")]);
        assert_eq!(line_diff("", "y"), vec![Line::Added("y")]);
    }
}
