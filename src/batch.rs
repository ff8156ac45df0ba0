//! Batches (README, "Batch endpoint"): whether the backend takes many rows in one
//! request (relais-server's `GET /api/capabilities`; the seed's backend answers 404
//! there), the batch request's body, and the outcome of each of its rows. The same
//! document says whether media may go as resumable uploads ([`Uploads`]).
//!
//! A row goes in a batch with exactly the body it would have alone: the server hashes
//! and stores those bytes, so a row sent alone, then in a batch (or the reverse) after
//! a lost answer is one row, answered as a replay.

use std::io::Write as _;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use miniserde::json::{Number, Value as Json};

use crate::json;
use crate::transport::{Answer, Outcome, classify};

/// Where the capability document is, under `BACKEND_URL`.
pub const CAPABILITIES_PATH: &str = "/api/capabilities";
/// Largest capability document read.
const MAX_DOCUMENT_BYTES: u64 = 16 * 1024;
/// How long a discovery's answer holds: a backend upgraded (or replaced by one without
/// batches) is found out within the hour.
const RECHECK: Duration = Duration::from_secs(3600);
/// Rows in one batch at most, whatever the server allows: the results of a batch are
/// recorded together, and a batch lost in a power cut is sent again whole.
const MAX_ROWS: usize = 500;

/// The backend's batch endpoint and its limits, from its capability document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub path: String,
    pub max_rows: usize,
    /// Uncompressed bytes of a batch body.
    pub max_bytes: usize,
    /// Bytes of one row's body; a longer row is sent alone.
    pub max_row_bytes: usize,
    pub gzip: bool,
}

/// The backend's resumable uploads (tus 1.0.0 with sha256 checksums), from its
/// capability document (README, "Resumable media uploads").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploads {
    pub path: String,
    /// Largest BLOB an upload takes; a larger one goes as JSON.
    pub max_bytes: u64,
}

/// What the capability document offers; nothing for the seed's backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub batch: Option<Capability>,
    pub uploads: Option<Uploads>,
}

/// What the agent knows of the backend's batches and uploads, and since when.
#[derive(Debug, Default)]
pub struct Discovery {
    known: Option<(Capabilities, Instant)>,
}

impl Discovery {
    /// The capability, asked again with `ask` when unknown or older than [`RECHECK`]; a
    /// backend that could not be asked (no answer at all) is asked again next time.
    pub fn get(
        &mut self,
        ask: impl FnOnce() -> Result<Capabilities, String>,
    ) -> Result<&Capabilities, String> {
        let stale = self
            .known
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= RECHECK);
        if stale {
            self.known = Some((ask()?, Instant::now()));
        }
        Ok(self.known.as_ref().map(|(c, _)| c).unwrap_or(&NOTHING))
    }

    /// The batch capability asked last, if it was asked and still holds.
    pub fn known(&self) -> Option<&Capability> {
        match &self.known {
            Some((c, at)) if at.elapsed() < RECHECK => c.batch.as_ref(),
            _ => None,
        }
    }

    /// The batch endpoint refused a batch as the document announced it: rows go one by
    /// one until the next check (uploads are judged by their own answers).
    pub fn refused(&mut self) {
        let uploads = self.known.take().and_then(|(c, _)| c.uploads);
        let left = Capabilities {
            batch: None,
            uploads,
        };
        self.known = Some((left, Instant::now()));
    }
}

/// Returned by [`Discovery::get`] before anything is known (never, once asked).
static NOTHING: Capabilities = Capabilities {
    batch: None,
    uploads: None,
};

/// Asks the backend with `get` (a GET of a path, at most a number of bytes) what it
/// offers: nothing for the seed's backend (404, an answer that is not the document).
/// `Err`: no answer at all, the backend is down.
pub fn discover(
    get: impl FnOnce(&str, u64) -> Result<(u16, Option<Vec<u8>>), String>,
) -> Result<Capabilities, String> {
    let (status, body) = get(CAPABILITIES_PATH, MAX_DOCUMENT_BYTES)?;
    let doc = match (status, body) {
        (200, Some(body)) => miniserde::json::from_str::<Json>(&String::from_utf8_lossy(&body)),
        _ => Ok(Json::Null),
    };
    let found = match &doc {
        Ok(Json::Object(doc)) => Capabilities {
            batch: parse(doc),
            uploads: parse_uploads(doc),
        },
        _ => Capabilities::default(),
    };
    match &found.batch {
        Some(c) => log::debug!(
            "batches: the backend takes up to {} rows per batch at {}",
            c.max_rows,
            c.path
        ),
        None => log::debug!("batches: none at {CAPABILITIES_PATH} ({status}); rows go one by one"),
    }
    match &found.uploads {
        Some(u) => log::debug!("uploads: media go as resumable uploads at {}", u.path),
        None => log::debug!("uploads: none at {CAPABILITIES_PATH}; media go as JSON"),
    }
    Ok(found)
}

fn parse(doc: &miniserde::json::Object) -> Option<Capability> {
    let Some(Json::Object(batch)) = doc.get("batch") else {
        return None;
    };
    let number = |key: &str| match batch.get(key) {
        Some(Json::Number(Number::U64(n))) if *n > 0 => usize::try_from(*n).ok(),
        _ => None,
    };
    let path = match batch.get("path") {
        Some(Json::String(p)) if p.starts_with('/') => p.clone(),
        _ => return None,
    };
    let gzip = matches!(batch.get("encodings"),
        Some(Json::Array(e)) if e.iter().any(|v| matches!(v, Json::String(s) if s == "gzip")));
    Some(Capability {
        path,
        max_rows: number("max_rows")?.min(MAX_ROWS),
        max_bytes: number("max_bytes")?,
        max_row_bytes: number("max_row_bytes")?,
        gzip,
    })
}

/// The `uploads` member: tus 1.0.0 with SHA-256 checksums, the only protocol the agent
/// speaks; another protocol or checksum is none.
fn parse_uploads(doc: &miniserde::json::Object) -> Option<Uploads> {
    let Some(Json::Object(uploads)) = doc.get("uploads") else {
        return None;
    };
    let text = |key: &str| match uploads.get(key) {
        Some(Json::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let path = text("path").filter(|p| p.starts_with('/'))?;
    if text("protocol") != Some("tus/1.0.0") || text("checksum") != Some("sha256") {
        return None;
    }
    let max_bytes = match uploads.get("max_bytes") {
        Some(Json::Number(Number::U64(n))) if *n > 0 => *n,
        _ => return None,
    };
    Some(Uploads {
        path: path.to_string(),
        max_bytes,
    })
}

/// One row of a batch: its endpoint, key and body as it would be sent alone.
pub struct Row<'a> {
    pub endpoint: &'a str,
    pub key: &'a str,
    pub body: &'a str,
}

/// Bytes a row adds to a batch body (its members' text around the body).
pub fn row_bytes(row: &Row) -> usize {
    row.endpoint.len() + row.key.len() + row.body.len() + 64
}

/// The batch request's body: `{"rows": [...]}`, gzip-compressed when the backend takes
/// gzip (a Pi's CPU compresses at the fastest level, JSON shrinks several times anyway).
pub fn body(rows: &[Row], gzip: bool) -> std::io::Result<Vec<u8>> {
    let mut text = String::with_capacity(rows.iter().map(row_bytes).sum::<usize>() + 16);
    text.push_str("{\"rows\": [");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        text.push('{');
        json::push_key(&mut text, "endpoint", true);
        json::push_str(&mut text, row.endpoint);
        json::push_key(&mut text, "idempotency_key", false);
        json::push_str(&mut text, row.key);
        json::push_key(&mut text, "body", false);
        text.push_str(row.body);
        text.push('}');
    }
    text.push_str("]}");
    if !gzip {
        return Ok(text.into_bytes());
    }
    let mut encoder = GzEncoder::new(Vec::with_capacity(text.len() / 4), Compression::fast());
    encoder.write_all(text.as_bytes())?;
    encoder.finish()
}

/// Each row's outcome from a batch's `200` answer, in the rows' order: `stored` and
/// `replayed` are stored with their `id`, `rejected` is judged by its `code` as the
/// row alone would be. `None`: not a batch answer for `rows` rows.
pub fn outcomes(answer: &[u8], rows: usize) -> Option<Vec<Outcome>> {
    let text = String::from_utf8_lossy(answer);
    let Ok(Json::Object(doc)) = miniserde::json::from_str::<Json>(&text) else {
        return None;
    };
    let Some(Json::Array(results)) = doc.get("results") else {
        return None;
    };
    if results.len() != rows {
        return None;
    }
    results.iter().map(outcome).collect()
}

fn outcome(result: &Json) -> Option<Outcome> {
    let Json::Object(r) = result else {
        return None;
    };
    let own = miniserde::json::to_string(result);
    let status = match r.get("status") {
        Some(Json::String(s)) if s == "stored" || s == "replayed" => 201,
        Some(Json::String(s)) if s == "rejected" => match r.get("code") {
            Some(Json::Number(Number::U64(c))) => u16::try_from(*c).ok()?,
            _ => return None,
        },
        _ => return None,
    };
    Some(classify(Answer {
        status,
        retry: None,
        html: false,
        body: own.as_bytes(),
        location: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value;

    #[test]
    fn the_document_of_relais_server_is_understood_and_others_are_not() {
        let doc = r#"{"version": 1, "batch": {"path": "/api/batch", "max_rows": 900,
            "max_bytes": 4194304, "max_row_bytes": 65536, "encodings": ["gzip", "identity"]},
            "uploads": {"path": "/api/uploads", "protocol": "tus/1.0.0", "checksum": "sha256",
            "max_bytes": 1073741824, "expiry_s": 86400}}"#;
        let found = discover(|_, _| Ok((200, Some(doc.as_bytes().to_vec())))).unwrap();
        let c = found.batch.clone().expect("capability");
        assert_eq!(
            (c.path.as_str(), c.max_rows, c.gzip),
            ("/api/batch", 500, true)
        );
        for bad in [
            "<html>",
            "{}",
            r#"{"batch": {"path": "/api/batch"}}"#,
            r#"{"batch": {"path": "api", "max_rows": 1, "max_bytes": 1, "max_row_bytes": 1}}"#,
        ] {
            let found = discover(|_, _| Ok((200, Some(bad.as_bytes().to_vec())))).unwrap();
            assert_eq!(found.batch, None, "{bad}");
        }
        assert_eq!(
            found.uploads,
            Some(Uploads {
                path: "/api/uploads".into(),
                max_bytes: 1 << 30
            })
        );
        for bad in [
            r#"{"uploads": {"path": "/api/uploads", "protocol": "tus/2", "checksum": "sha256", "max_bytes": 1}}"#,
            r#"{"uploads": {"path": "/api/uploads", "protocol": "tus/1.0.0", "checksum": "sha1", "max_bytes": 1}}"#,
            r#"{"uploads": {"path": "/api/uploads", "protocol": "tus/1.0.0", "checksum": "sha256"}}"#,
        ] {
            let found = discover(|_, _| Ok((200, Some(bad.as_bytes().to_vec())))).unwrap();
            assert_eq!(found.uploads, None, "{bad}");
        }
        let seed = discover(|_, _| Ok((404, Some(b"{}".to_vec())))).unwrap();
        assert_eq!(seed, Capabilities::default());
    }

    #[test]
    fn a_refused_batch_keeps_the_uploads() {
        let mut d = Discovery::default();
        let offered = Capabilities {
            batch: Some(Capability {
                path: "/api/batch".into(),
                max_rows: 1,
                max_bytes: 1,
                max_row_bytes: 1,
                gzip: false,
            }),
            uploads: Some(Uploads {
                path: "/api/uploads".into(),
                max_bytes: 1,
            }),
        };
        assert_eq!(d.get(|| Ok(offered.clone())).unwrap(), &offered);
        d.refused();
        let left = d.get(|| Err("not asked again".into())).unwrap();
        assert_eq!(
            (left.batch.is_none(), &left.uploads),
            (true, &offered.uploads)
        );
    }

    #[test]
    fn a_body_holds_each_row_as_it_would_go_alone_and_gzip_round_trips() {
        let rows = [
            Row {
                endpoint: "/api/evenements",
                key: "pi:evenement:1",
                body: r#"{"a": 1, "t": "\"q\""}"#,
            },
            Row {
                endpoint: "/api/evenements",
                key: "pi:evenement:2",
                body: "{}",
            },
        ];
        let plain = String::from_utf8(body(&rows, false).unwrap()).unwrap();
        assert_eq!(
            plain,
            r#"{"rows": [{"endpoint": "/api/evenements", "idempotency_key": "pi:evenement:1", "body": {"a": 1, "t": "\"q\""}}, {"endpoint": "/api/evenements", "idempotency_key": "pi:evenement:2", "body": {}}]}"#
        );
        let zipped = body(&rows, true).unwrap();
        let mut back = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut back)
            .unwrap();
        assert_eq!(back, plain);
    }

    #[test]
    fn each_result_is_the_outcome_the_row_alone_would_have() {
        let answer =
            br#"{"results": [{"status": "stored", "id": 7}, {"status": "replayed", "id": 3},
            {"status": "rejected", "code": 422, "detail": "bad date"},
            {"status": "rejected", "code": 503, "detail": "busy"}]}"#;
        let o = outcomes(answer, 4).expect("outcomes");
        assert_eq!(
            o[0],
            Outcome::Stored {
                remote_id: Some(Value::Integer(7)),
                html: false
            }
        );
        assert!(matches!(
            &o[1],
            Outcome::Stored {
                remote_id: Some(Value::Integer(3)),
                ..
            }
        ));
        assert!(
            matches!(&o[2], Outcome::Rejected { status: 422, reason, .. } if reason.contains("bad date")),
            "{:?}",
            o[2]
        );
        assert!(matches!(&o[3], Outcome::Transient { .. }), "{:?}", o[3]);
        assert_eq!(outcomes(answer, 3), None, "a count that does not match");
        assert_eq!(outcomes(b"<html>", 1), None);
    }
}
