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

pub use relais_wire::json::push_escaped;

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
