//! A minimal JSON writer for the payloads and status files relais produces.
//!
//! Payloads are written by hand rather than through a serializer because a media body is
//! assembled around a BLOB that is never in memory: the writer produces the text before
//! and after it. Separators follow Python's `json.dumps` defaults (`", "` and `": "`),
//! so bodies look like the service relais replaces.

use std::fmt::Write;

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut String, s: &str) {
    push_escaped(out, s, false);
}

/// Appends `s` as a JSON string literal; with `ensure_ascii`, as Python's `json.dumps`
/// does by default: everything outside printable ASCII as `\uXXXX` (UTF-16 surrogate
/// pairs above U+FFFF).
pub fn push_escaped(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            c if (c as u32) >= 0x20 && !ensure_ascii => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Appends a float as JSON; NaN and infinities have no JSON form and become `null`.
pub fn push_f64(out: &mut String, v: f64) {
    if v.is_finite() {
        let _ = write!(out, "{v:?}");
    } else {
        out.push_str("null");
    }
}

/// Appends `"key": ` (with the separator before it unless `first`).
pub fn push_key(out: &mut String, key: &str, first: bool) {
    if !first {
        out.push_str(", ");
    }
    push_str(out, key);
    out.push_str(": ");
}

/// Appends an optional string (`null` when absent).
pub fn push_opt_str(out: &mut String, v: Option<&str>) {
    match v {
        Some(s) => push_str(out, s),
        None => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_parses_back() {
        let mut s = String::new();
        push_str(&mut s, "PIR \"Entrée\"\n\u{1}\\");
        let back: String = miniserde::json::from_str(&s).unwrap();
        assert_eq!(back, "PIR \"Entrée\"\n\u{1}\\");
    }

    #[test]
    fn floats() {
        let mut s = String::new();
        push_f64(&mut s, 1.5);
        s.push(' ');
        push_f64(&mut s, f64::NAN);
        s.push(' ');
        push_f64(&mut s, 3.0);
        assert_eq!(s, "1.5 null 3.0");
    }
}
