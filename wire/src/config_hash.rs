//! The configuration hash of contract section 3: the MD5 hex digest of the configuration
//! serialised exactly as Python's `json.dumps(value, sort_keys=True)` with its defaults
//! (separators `", "` and `": "`, `ensure_ascii=True`, `repr` of floats).
//!
//! This module owns that serialisation and a small MD5 (RFC 1321), so the reference
//! receiver computes the hash as the backend does and the agent can check that a file
//! on disk still matches the hash it carries.
//!
//! What is hashed: the served object *without* its `config_hash` member
//! ([`config_hash`] removes it), since a hash cannot cover itself.
//!
//! Known limit: numbers go through miniserde, which keeps integers up to 64 bits exactly
//! but parses a float with more than about 15 significant digits or a decimal exponent
//! beyond ±22 with a possible one-ulp error, and turns integers beyond 64 bits into
//! floats. Python would then print different digits and the hash would differ. Device
//! configurations hold small numbers, so this is documented rather than handled.

use std::fmt::Write;

use miniserde::json::{Number, Value};

/// The name of the member carrying the hash in a served configuration.
pub const HASH_MEMBER: &str = "config_hash";

/// Deepest nesting serialised. Python's own recursion limit (1000 frames) stops
/// `json.dumps` near there too, and the bound keeps a hostile document from
/// exhausting the stack of the thread hashing it.
pub const MAX_DEPTH: usize = 500;

/// A value that cannot be hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    TooDeep,
}

impl std::fmt::Display for HashError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashError::TooDeep => write!(
                f,
                "config hash: the JSON is nested deeper than {MAX_DEPTH} levels"
            ),
        }
    }
}

impl std::error::Error for HashError {}

/// The hash of a configuration: MD5 of [`python_dumps`] of `value` with any top-level
/// `config_hash` member left out.
pub fn config_hash(value: &Value) -> Result<String, HashError> {
    let text = match value {
        Value::Object(obj) if obj.contains_key(HASH_MEMBER) => {
            let mut without = obj.clone();
            without.remove(HASH_MEMBER);
            python_dumps(&Value::Object(without))?
        }
        other => python_dumps(other)?,
    };
    Ok(md5_hex(text.as_bytes()))
}

/// `json.dumps(value, sort_keys=True)` as Python writes it.
pub fn python_dumps(value: &Value) -> Result<String, HashError> {
    let mut out = String::new();
    write_value(&mut out, value, 0)?;
    Ok(out)
}

fn write_value(out: &mut String, value: &Value, depth: usize) -> Result<(), HashError> {
    if depth > MAX_DEPTH {
        return Err(HashError::TooDeep);
    }
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => crate::json::push_escaped(out, s, true),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item, depth + 1)?;
            }
            out.push(']');
        }
        // miniserde's Object is a BTreeMap: keys come in byte order, which for UTF-8 is
        // code point order, the order Python's `sorted` gives `str` keys.
        Value::Object(obj) => {
            out.push('{');
            for (i, (key, item)) in obj.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                crate::json::push_escaped(out, key, true);
                out.push_str(": ");
                write_value(out, item, depth + 1)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_number(out: &mut String, n: &Number) {
    match n {
        Number::U64(u) => {
            let _ = write!(out, "{u}");
        }
        Number::I64(i) => {
            let _ = write!(out, "{i}");
        }
        Number::F64(f) => out.push_str(&python_float_repr(*f)),
    }
}

/// Python's `repr(float)` (and `json.dumps` of a float): the shortest digits that
/// round-trip, in fixed notation when the decimal point falls between 10^-4 and 10^16,
/// otherwise `d.ddde±XX`; non-finite values as `NaN`, `Infinity`, `-Infinity`.
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` prints the same shortest round-trip digits as Python's repr.
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let decpt = exp + 1;
    let body = if (-3..=16).contains(&decpt) {
        fixed_notation(&digits, decpt)
    } else {
        exp_notation(&digits, exp)
    };
    format!("{sign}{body}")
}

fn fixed_notation(digits: &str, decpt: i32) -> String {
    let len = digits.len() as i32;
    if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt < len {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{int}.{frac}")
    } else {
        format!("{digits}{}.0", "0".repeat((decpt - len) as usize))
    }
}

fn exp_notation(digits: &str, exp: i32) -> String {
    let (first, rest) = digits.split_at(1.min(digits.len()));
    let frac = if rest.is_empty() {
        String::new()
    } else {
        format!(".{rest}")
    };
    let sign = if exp < 0 { '-' } else { '+' };
    format!("{first}{frac}e{sign}{:02}", exp.unsigned_abs())
}

/// The MD5 digest of `data` in lowercase hex.
pub fn md5_hex(data: &[u8]) -> String {
    crate::hex(&md5(data))
}

/// Per-round left rotations (RFC 1321, section 3.4).
const SHIFTS: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9,
    14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15,
    21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
];

/// `floor(abs(sin(i + 1)) * 2^32)`, the table T of RFC 1321.
const SINES: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// MD5 of `data` (RFC 1321). Not for security: it identifies configuration versions,
/// as the backend's hash does.
pub fn md5(data: &[u8]) -> [u8; 16] {
    let mut state: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
    let mut message = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_le_bytes());
    for block in message.chunks_exact(64) {
        compress(&mut state, block);
    }
    let mut digest = [0u8; 16];
    for (out, word) in digest.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_le_bytes());
    }
    digest
}

fn compress(state: &mut [u32; 4], block: &[u8]) {
    let mut m = [0u32; 16];
    for (word, bytes) in m.iter_mut().zip(block.chunks_exact(4)) {
        *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    let [mut a, mut b, mut c, mut d] = *state;
    for i in 0..64 {
        let (f, g) = match i / 16 {
            0 => ((b & c) | (!b & d), i),
            1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
            2 => (b ^ c ^ d, (3 * i + 5) % 16),
            _ => (c ^ (b | !d), (7 * i) % 16),
        };
        let rotated = a
            .wrapping_add(f)
            .wrapping_add(SINES[i])
            .wrapping_add(m[g])
            .rotate_left(SHIFTS[i]);
        a = d;
        d = c;
        c = b;
        b = b.wrapping_add(rotated);
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d]) {
        *s = s.wrapping_add(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Value {
        miniserde::json::from_str(text).expect("test JSON parses")
    }

    #[test]
    fn md5_rfc1321_vectors() {
        let vectors = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, expected) in vectors {
            assert_eq!(md5_hex(input.as_bytes()), expected, "md5({input:?})");
        }
    }

    #[test]
    fn md5_block_boundaries() {
        // Lengths around the 56- and 64-byte padding limits, digests from Python's hashlib.
        let cases = [
            (55, "ef1772b6dff9a122358552954ad0df65"),
            (56, "3b0c8ac703f828b04c6c197006d17218"),
            (63, "b06521f39153d618550606be297466d5"),
            (64, "014842d480b571495a4a0363793f7367"),
            (65, "c743a45e0d2e6a95cb859adae0248435"),
        ];
        for (len, expected) in cases {
            assert_eq!(md5_hex(&vec![b'a'; len]), expected, "md5('a' * {len})");
        }
    }

    #[test]
    fn dumps_like_python() {
        // Expected texts are Python's `json.dumps(json.loads(src), sort_keys=True)`.
        let cases = [
            (
                r#"{"b": 1, "a": [true, false, null]}"#,
                r#"{"a": [true, false, null], "b": 1}"#,
            ),
            (
                r#"{"n": "Bâtiment é", "e": "😀"}"#,
                r#"{"e": "\ud83d\ude00", "n": "B\u00e2timent \u00e9"}"#,
            ),
            (
                r#"{"c": "a\"b\\c\n\t\u0001\u007f/"}"#,
                r#"{"c": "a\"b\\c\n\t\u0001\u007f/"}"#,
            ),
            (
                r#"[1.0, 2.5, -0.0, 0.1, 1e16, 1e15, 0.0001, 0.00001, 1.5e300, -7]"#,
                r#"[1.0, 2.5, -0.0, 0.1, 1e+16, 1000000000000000.0, 0.0001, 1e-05, 1.5e+300, -7]"#,
            ),
            (
                r#"{"z": {}, "y": [], "x": {"b": {"d": 1, "c": 2}}}"#,
                r#"{"x": {"b": {"c": 2, "d": 1}}, "y": [], "z": {}}"#,
            ),
        ];
        for (src, expected) in cases {
            assert_eq!(
                python_dumps(&parse(src)).as_deref(),
                Ok(expected),
                "dumps({src})"
            );
        }
    }

    #[test]
    fn float_repr_matches_python() {
        // Values and texts from Python's `repr`.
        let cases = [
            (0.0, "0.0"),
            (100.0, "100.0"),
            (123456789.125, "123456789.125"),
            (1e22, "1e+22"),
            (1.2345e-7, "1.2345e-07"),
            (0.3, "0.3"),
            (2.0 / 3.0, "0.6666666666666666"),
            (9007199254740993.0, "9007199254740992.0"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (-1234.5, "-1234.5"),
        ];
        for (value, expected) in cases {
            assert_eq!(python_float_repr(value), expected, "repr({value})");
        }
    }

    #[test]
    fn hash_matches_python_and_skips_its_own_member() {
        // python3 -c 'import json,hashlib; print(hashlib.md5(json.dumps(json.loads(S),
        //   sort_keys=True).encode()).hexdigest())'
        let seed = r#"{"site_name": "Site Paris", "timezone": "Europe/Paris", "doubt_after_days": 2,
            "reporting": {"ok_interval_s": 300, "ko_interval_s": 60},
            "devices": [{"ip": "192.168.1.10", "name": "Projecteur Salle A", "building": "Bâtiment A",
              "floor": "1", "room": "Salle 101", "type": "projector", "driver": "pjlink", "snmp": {},
              "pjlink": {"password": "admin", "port": 4352, "timeout_s": 2.5},
              "expectations": {"always_on": false, "alert_after_s": 300, "note": null,
                "emoji": "📽️ ok", "schedule": {"timezone": "Europe/Paris",
                "rules": [{"days": ["mon", "tue"], "start": "08:00", "end": "18:00"}]}}}]}"#;
        let expected = "465dcb9fa3b69b93775bae1823d22118";
        assert_eq!(config_hash(&parse(seed)).as_deref(), Ok(expected));
        let Value::Object(mut with_hash) = parse(seed) else {
            panic!("object");
        };
        with_hash.insert(HASH_MEMBER.into(), Value::String("whatever".into()));
        assert_eq!(
            config_hash(&Value::Object(with_hash)).as_deref(),
            Ok(expected)
        );
        assert_eq!(
            config_hash(&parse("{}")).as_deref(),
            Ok("99914b932bd37a50b983c5e7c90ae93b")
        );
    }

    #[test]
    fn refuses_hostile_nesting() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(config_hash(&parse(&deep)), Err(HashError::TooDeep));
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(config_hash(&parse(&ok)).is_ok());
    }
}
