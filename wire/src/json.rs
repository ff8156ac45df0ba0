//! JSON string escaping as Python's `json.dumps` writes it: the agent's payloads and the
//! configuration hash both depend on it, so both ends use this one.

use std::fmt::Write;

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
