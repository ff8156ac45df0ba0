//! A batch request's body: read within `--batch-max-bytes`, gunzipped within the same
//! bound (a gzip bomb stops at the bound, never in memory), and split into its rows; the
//! answer gzipped for a client that accepts it.
//! A row's `body` is kept as the exact text it was sent as: its SHA-256 is what a
//! replay is compared by, so it must be the same bytes as the row sent alone. miniserde
//! parses into values and would lose them, hence the small scanner here, which only
//! finds where each member's value starts and ends; the values themselves are parsed
//! by miniserde (the row's body by the per-row push's own check).

use std::io::Read as _;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt as _;

use super::super::error::Error;

/// The body as text, decompressed if `Content-Encoding: gzip`, at most `max_bytes`
/// both as sent and decompressed.
pub async fn read(headers: &HeaderMap, body: Body, max_bytes: usize) -> Result<String, Error> {
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or_default().trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("identity") => false,
        Some("gzip") => true,
        Some(_) => {
            return Err(Error::Status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "batch: Content-Encoding must be gzip or identity".into(),
            ));
        }
    };
    let sent = http_body_util::Limited::new(body, max_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large(max_bytes)
            } else {
                Error::BadRequest(format!("body: cannot be read to its end: {e}"))
            }
        })?
        .to_bytes();
    let bytes = if gzip {
        tokio::task::spawn_blocking(move || gunzip(&sent, max_bytes))
            .await
            .map_err(|e| Error::Internal(format!("batch: the decompression failed: {e}")))??
    } else {
        sent.to_vec()
    };
    String::from_utf8(bytes).map_err(|_| Error::BadRequest("batch: not UTF-8".into()))
}

/// Whether the request's `Accept-Encoding` takes gzip (not with `q=0`).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q == 0.0))
            });
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

/// The answer's text gzipped: a batch's results are 30-odd bytes a row that repeat,
/// which a metered uplink's downstream pays for too.
pub fn gzip(text: &str) -> Result<Vec<u8>, Error> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 4),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(text.as_bytes())
        .and_then(|()| encoder.finish())
        .map_err(|e| Error::Internal(format!("batch: cannot compress the answer: {e}")))
}

/// Reads at most one byte past the bound: what is beyond it is never decompressed.
fn gunzip(sent: &Bytes, max_bytes: usize) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&sent[..])
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::BadRequest(format!("batch: not a valid gzip body: {e}")))?;
    if out.len() > max_bytes {
        return Err(too_large(max_bytes));
    }
    Ok(out)
}

fn too_large(max_bytes: usize) -> Error {
    Error::TooLarge(format!(
        "batch: larger than {max_bytes} bytes (--batch-max-bytes) as sent or decompressed: \
         send fewer rows per batch"
    ))
}

/// Where the text is not the JSON a batch is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl From<Malformed> for Error {
    fn from(m: Malformed) -> Error {
        Error::BadRequest(format!("batch: not valid JSON: {}", m.0))
    }
}

/// The members of the JSON object that `text` is (whitespace around it allowed), each
/// value as its raw text.
pub fn object(text: &str) -> Result<Vec<(String, &str)>, Malformed> {
    let b = text.as_bytes();
    let mut i = ws(b, 0);
    expect(b, i, b'{')?;
    i = ws(b, i + 1);
    let mut members = Vec::new();
    if b.get(i) == Some(&b'}') {
        return end(b, i + 1).map(|()| members);
    }
    loop {
        expect(b, i, b'"')?;
        let key_end = value_end(b, i)?;
        let key: String = miniserde::json::from_str(&text[i..key_end])
            .map_err(|_| Malformed("a member's name is not a valid string"))?;
        i = ws(b, key_end);
        expect(b, i, b':')?;
        i = ws(b, i + 1);
        let value_at = i;
        i = value_end(b, i)?;
        members.push((key, &text[value_at..i]));
        i = ws(b, i);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b'}') => return end(b, i + 1).map(|()| members),
            _ => return Err(Malformed("expected , or } after a member")),
        }
    }
}

/// The elements of the JSON array that `text` is, each as its raw text.
pub fn array(text: &str) -> Result<Vec<&str>, Malformed> {
    let b = text.as_bytes();
    let mut i = ws(b, 0);
    expect(b, i, b'[')?;
    i = ws(b, i + 1);
    let mut elements = Vec::new();
    if b.get(i) == Some(&b']') {
        return end(b, i + 1).map(|()| elements);
    }
    loop {
        let at = i;
        i = value_end(b, i)?;
        elements.push(&text[at..i]);
        i = ws(b, i);
        match b.get(i) {
            Some(b',') => i = ws(b, i + 1),
            Some(b']') => return end(b, i + 1).map(|()| elements),
            _ => return Err(Malformed("expected , or ] after an element")),
        }
    }
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

fn expect(b: &[u8], i: usize, c: u8) -> Result<(), Malformed> {
    match b.get(i) {
        Some(&found) if found == c => Ok(()),
        _ => Err(Malformed("unexpected character")),
    }
}

/// Only whitespace after the value.
fn end(b: &[u8], i: usize) -> Result<(), Malformed> {
    if ws(b, i) == b.len() {
        Ok(())
    } else {
        Err(Malformed("text after the end"))
    }
}

/// Where the value starting at `i` ends (one past its last byte). Brackets are counted,
/// not matched: the value's own parser (miniserde) rejects a mismatched one.
fn value_end(b: &[u8], i: usize) -> Result<usize, Malformed> {
    match b.get(i) {
        Some(b'"') => string_end(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while let Some(&c) = b.get(j) {
                match c {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Ok(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Err(Malformed("an object or array is not closed"))
        }
        Some(_) => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                j += 1;
            }
            if j == i {
                Err(Malformed("a value is missing"))
            } else {
                Ok(j)
            }
        }
        None => Err(Malformed("the text ends early")),
    }
}

/// One past the closing quote of the string opening at `i`.
fn string_end(b: &[u8], i: usize) -> Result<usize, Malformed> {
    let mut j = i + 1;
    while let Some(&c) = b.get(j) {
        match c {
            b'\\' => j += 2,
            b'"' => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err(Malformed("a string is not closed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_elements_keep_their_text() {
        let text = r#" {"rows": [ {"a" : "x\"}]"}, 1 ,[2, {"b": []}] ], "k\u0065y":null } "#;
        let members = object(text).expect("object");
        assert_eq!(members[0].0, "rows");
        assert_eq!(members[1], ("key".to_string(), "null"));
        let rows = array(members[0].1).expect("array");
        assert_eq!(rows, [r#"{"a" : "x\"}]"}"#, "1", r#"[2, {"b": []}]"#]);
        assert_eq!(object(rows[0]).expect("row"), [("a".into(), r#""x\"}]""#)]);
        assert_eq!(object("{}"), Ok(vec![]));
        assert_eq!(array("[]"), Ok(vec![]));
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            "[1]",
            "{",
            r#"{"a"}"#,
            r#"{"a": }"#,
            r#"{"a": 1,}"#,
            r#"{"a": 1} x"#,
            r#"{"a": "x}"#,
            r#"{"a": [1}"#,
            r#"{"a" 1}"#,
        ] {
            assert!(object(bad).is_err(), "{bad}");
        }
        assert!(array("[1,]").is_err());
        assert!(array("[1 2]").is_err());
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_bound() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&vec![b' '; 1 << 20]).expect("compress");
        let sent = Bytes::from(gz.finish().expect("compress"));
        assert_eq!(gunzip(&sent, 1 << 20).expect("at the bound").len(), 1 << 20);
        assert!(matches!(gunzip(&sent, 1000), Err(Error::TooLarge(_))));
        assert!(matches!(
            gunzip(&Bytes::from_static(b"not gzip"), 1000),
            Err(Error::BadRequest(_))
        ));
    }
}
