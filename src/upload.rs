//! A media row's BLOB as a resumable upload (tus 1.0.0 core with creation and
//! checksum; README, "Resumable media uploads" and "Resumable media"): raw bytes in
//! chunks, each one's SHA-256 in `Upload-Checksum`, the offset the server confirmed
//! after each chunk recorded in the state database, so a dropped link, a crash or a
//! power cut resumes there instead of at byte 0.
//!
//! The BLOB is read twice through [`BlobReader`] (its bounded reads and change checks):
//! once for its length and SHA-256, which the upload is created with and a recorded
//! upload is matched by, then chunk by chunk from the offset. One chunk is in memory,
//! the reader's own buffer. No state transaction spans a request.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rusqlite::Connection;
use rusqlite::types::Value;
use sha2::{Digest, Sha256};
use ureq::http::{HeaderMap, Method};

use crate::batch::Uploads;
use crate::blob_stream::{BlobError, BlobReader};
use crate::media_window::{Cut, MediaPolicy, Throttle};
use crate::notify;
use crate::settings::BlobSpec;
use crate::tracking::{PersistedUpload, Tracking, TrackingError};
use crate::transport::{Outcome, Transport};

/// What a media row's sending came to: its outcome and the bytes sent, or why the BLOB
/// could not be sent (as the JSON path says it).
pub type Sent = Result<(Outcome, u64), BlobError>;

const TUS_VERSION: &str = "1.0.0";
/// Bytes of one PATCH at most: a dropped connection loses the PATCH in flight, on average
/// half of one. With every connection cut every 20 s at 1 MB/s, 1 MiB PATCHes put about
/// 1.03 bytes on the wire per BLOB byte, the 4 MiB of a BLOB read 1.14 (bench figure
/// 11); the server's fsync per PATCH is nothing at field uplink rates.
const PATCH_BYTES: usize = 1 << 20;
/// Tries of one chunk the server found damaged (460) before the row fails for now.
const CHUNK_TRIES: u32 = 3;
/// `409`s (another request appending, an offset out of step) followed by a `HEAD`
/// before the row fails for now.
const CONFLICTS: u32 = 3;

/// One media row, as the push engine knows it.
pub struct Row<'a> {
    pub conn: &'a Connection,
    pub spec: &'a BlobSpec,
    pub rowid: i64,
    /// The source database is in WAL mode ([`BlobReader`]'s rules).
    pub wal: bool,
    /// The row's keys in the state database.
    pub source: &'a str,
    pub table: &'a str,
    pub local_id: &'a Value,
    /// `NAME` of the table's `/api/NAME`.
    pub endpoint: &'a str,
    pub key: &'a str,
    /// The row's members as the JSON push carries them, without the BLOB member.
    pub json: &'a str,
}

/// What one row's upload needs of the push engine.
pub struct Uploader<'a> {
    pub transport: &'a Transport,
    pub tracking: &'a mut Tracking,
    pub uploads: &'a Uploads,
    pub media: &'a MediaPolicy,
    pub chunk_bytes: usize,
    pub stop: &'a AtomicBool,
}

/// Where a row's upload stands before its chunks go.
enum Start {
    /// At `location`, the server holding the bytes before `offset`.
    At { location: String, offset: u64 },
    /// Nothing to send: stored, or failed, as the outcome says.
    Settled(Outcome),
    /// The server has no such upload (expired, removed).
    Gone,
}

/// How the chunks went.
enum Patched {
    Done(Sent),
    /// The server no longer has the upload (expired, removed): start again from 0.
    Gone,
}

impl Uploader<'_> {
    /// Sends the row's BLOB as an upload. `None`: not an upload's to send (a NULL or empty
    /// BLOB, one above the server's limit): the JSON push sends it. `Err`: the state
    /// database failed.
    pub fn send(
        &mut self,
        row: &Row,
        max_hold: &mut Duration,
    ) -> Result<Option<Sent>, TrackingError> {
        let opened = BlobReader::open(
            row.conn,
            row.spec,
            row.rowid,
            self.chunk_bytes,
            row.wal,
            self.stop,
        );
        let mut reader = match opened {
            Ok(Some(reader)) if !reader.is_empty() && reader.len() <= self.uploads.max_bytes => {
                reader
            }
            Ok(_) => return Ok(None),
            Err(e) => return self.abandon(row, e).map(Some),
        };
        if !self.media.takes(reader.len()) {
            return Ok(Some(Err(BlobError::Waiting)));
        }
        let sent = match digest(&mut reader) {
            Ok(sha256) => self.transfer(row, &mut reader, &sha256),
            Err(e) => Ok(Err(e)),
        };
        *max_hold = (*max_hold).max(reader.max_hold());
        match sent? {
            Err(e) => self.abandon(row, e).map(Some),
            sent => Ok(Some(sent)),
        }
    }

    /// A row changed, deleted or unreadable is abandoned as the JSON path abandons it,
    /// and its upload forgotten; a shutdown or a closed window keeps it for next time.
    fn abandon(&mut self, row: &Row, e: BlobError) -> Result<Sent, TrackingError> {
        if !matches!(e, BlobError::Stopped | BlobError::Waiting) {
            self.forget(row)?;
        }
        Ok(Err(e))
    }

    fn forget(&mut self, row: &Row) -> Result<(), TrackingError> {
        self.tracking
            .forget_upload(row.source, row.table, row.local_id)
    }

    fn transfer(
        &mut self,
        row: &Row,
        reader: &mut BlobReader,
        sha256: &str,
    ) -> Result<Sent, TrackingError> {
        let mut sent = 0;
        // An upload gone once is created again; gone twice in one pass, the server is
        // losing them: the row waits for the next pass.
        for _ in 0..2 {
            let (location, offset) = match self.start(row, reader.len(), sha256)? {
                Start::At { location, offset } => (location, offset),
                Start::Settled(outcome) => return Ok(Ok((outcome, sent))),
                Start::Gone => {
                    self.forget(row)?;
                    continue;
                }
            };
            let upload = PersistedUpload {
                location,
                length: reader.len(),
                sha256: sha256.to_string(),
                offset,
            };
            match self.patch(row, reader, upload, &mut sent)? {
                Patched::Done(done) => return Ok(done),
                Patched::Gone => self.forget(row)?,
            }
        }
        Ok(Ok((
            transient("the server lost the upload twice in a row; it starts again from byte 0"),
            sent,
        )))
    }

    /// The recorded upload of the row if the server still has it, else a new one.
    fn start(&mut self, row: &Row, len: u64, sha256: &str) -> Result<Start, TrackingError> {
        if let Some(known) = self.tracking.upload(row.source, row.table, row.local_id)? {
            if known.length == len && known.sha256 == sha256 {
                match self.head(&known.location) {
                    Ok(Start::Gone) => {}
                    found => return Ok(found.unwrap_or_else(Start::Settled)),
                }
            }
            // Expired, or the upload of another version of the BLOB.
            self.forget(row)?;
        }
        self.create(row, len, sha256)
    }

    /// Asks where an upload stands (`Upload-Offset`; `Upload-Result-Id` when complete).
    /// `Err`: not an answer the upload can go on from.
    fn head(&self, location: &str) -> Result<Start, Outcome> {
        let answer = self
            .transport
            .exchange(
                Method::HEAD,
                location,
                &[("Tus-Resumable", TUS_VERSION)],
                None,
            )
            .map_err(|reason| transient(&reason))?;
        match (answer.status, result_id(&answer.headers)) {
            (200, Some(id)) => Ok(Start::Settled(stored(id))),
            (200, None) => match number(&answer.headers, "upload-offset") {
                Some(offset) => Ok(Start::At {
                    location: location.to_string(),
                    offset,
                }),
                None => Err(transient("the server's HEAD answer has no Upload-Offset")),
            },
            (404 | 410, _) => Ok(Start::Gone),
            _ => Err(answer.outcome),
        }
    }

    /// `POST`s the upload of the row. A second `POST` with the row's key (the answer to
    /// the first was lost) is the same upload, or the stored row's id.
    fn create(&mut self, row: &Row, len: u64, sha256: &str) -> Result<Start, TrackingError> {
        let metadata = [
            ("endpoint", row.endpoint),
            ("field", row.spec.field.as_str()),
            ("json", row.json),
            ("sha256", sha256),
        ]
        .map(|(k, v)| format!("{k} {}", STANDARD.encode(v)))
        .join(",");
        let length = len.to_string();
        let headers = [
            ("Tus-Resumable", TUS_VERSION),
            ("Upload-Length", length.as_str()),
            (relais_wire::IDEMPOTENCY_KEY_HEADER, row.key),
            ("Upload-Metadata", metadata.as_str()),
        ];
        let answer = self
            .transport
            .exchange(Method::POST, &self.uploads.path, &headers, None);
        let answer = match answer {
            Ok(answer) => answer,
            Err(reason) => return Ok(Start::Settled(transient(&reason))),
        };
        let location = answer.headers.get("location").and_then(|l| l.to_str().ok());
        Ok(match (answer.status, location) {
            (201, Some(location)) => {
                let upload = PersistedUpload {
                    location: location.to_string(),
                    length: len,
                    sha256: sha256.to_string(),
                    offset: number(&answer.headers, "upload-offset").unwrap_or(0),
                };
                self.tracking
                    .save_upload(row.source, row.table, row.local_id, &upload)?;
                Start::At {
                    location: upload.location,
                    offset: upload.offset,
                }
            }
            (201, None) => Start::Settled(transient(
                "the server created the upload without a Location",
            )),
            (200, _) => match result_id(&answer.headers) {
                Some(id) => Start::Settled(stored(id)),
                None => Start::Settled(answer.outcome),
            },
            _ => Start::Settled(answer.outcome),
        })
    }

    /// `PATCH`es the chunks from `upload.offset`, recording each confirmed offset.
    fn patch(
        &mut self,
        row: &Row,
        reader: &mut BlobReader,
        mut upload: PersistedUpload,
        sent: &mut u64,
    ) -> Result<Patched, TrackingError> {
        let len = reader.len();
        let (mut tries, mut conflicts) = (0, 0);
        let mut pace = Throttle::new(std::io::empty(), self.media, self.stop);
        reader.skip_to(upload.offset);
        loop {
            let offset = upload.offset;
            let chunk = match reader.next_chunk(PATCH_BYTES) {
                Ok(chunk) => chunk,
                Err(e) => return Ok(Patched::Done(Err(e))),
            };
            let n = chunk.len() as u64;
            let checksum = format!("sha256 {}", STANDARD.encode(Sha256::digest(chunk)));
            let at = offset.to_string();
            let headers = [
                ("Tus-Resumable", TUS_VERSION),
                ("Upload-Offset", at.as_str()),
                ("Content-Type", "application/offset+octet-stream"),
                ("Upload-Checksum", checksum.as_str()),
            ];
            let mut body = pace.next_body(chunk);
            let answer = self.transport.exchange(
                Method::PATCH,
                &upload.location,
                &headers,
                Some((n, &mut notify::Progress(&mut body))),
            );
            match body.cut() {
                Some(Cut::WindowClosed) => return Ok(Patched::Done(Err(BlobError::Waiting))),
                Some(Cut::Stopped) => return Ok(Patched::Done(Err(BlobError::Stopped))),
                None => {}
            }
            pace = body.next_body(std::io::empty());
            let answer = match answer {
                Ok(answer) => answer,
                Err(reason) => return Ok(Patched::Done(Ok((transient(&reason), *sent)))),
            };
            match answer.status {
                204 => {
                    *sent += n;
                    if let Some(id) = result_id(&answer.headers) {
                        return Ok(Patched::Done(Ok((stored(id), *sent))));
                    }
                    let confirmed = number(&answer.headers, "upload-offset").unwrap_or(offset + n);
                    if confirmed >= len && n == 0 {
                        let why = "the server completed the upload without an Upload-Result-Id";
                        return Ok(Patched::Done(Ok((transient(why), *sent))));
                    }
                    upload.offset = confirmed.min(len);
                    self.tracking
                        .save_upload(row.source, row.table, row.local_id, &upload)?;
                    if upload.offset != offset + n {
                        reader.skip_to(upload.offset);
                    }
                    tries = 0;
                }
                409 if conflicts < CONFLICTS => {
                    conflicts += 1;
                    match self.head(&upload.location) {
                        Ok(Start::At { offset, .. }) => upload.offset = offset,
                        Ok(Start::Gone) => return Ok(Patched::Gone),
                        Ok(Start::Settled(done)) => return Ok(Patched::Done(Ok((done, *sent)))),
                        Err(failed) => return Ok(Patched::Done(Ok((failed, *sent)))),
                    }
                    reader.skip_to(upload.offset);
                }
                460 => {
                    // The last chunk's 460 may be the whole BLOB's SHA-256 (the server
                    // removed the upload then): the BLOB changed since it was hashed, or
                    // bytes were damaged on disk. Start from 0 at the next pass.
                    let whole =
                        offset + n == len && matches!(self.head(&upload.location), Ok(Start::Gone));
                    if whole {
                        self.forget(row)?;
                        let why = "the server found the whole BLOB's SHA-256 is not the row's (changed, or damaged on disk); the upload starts again from byte 0";
                        return Ok(Patched::Done(Ok((transient(why), *sent))));
                    }
                    tries += 1;
                    if tries >= CHUNK_TRIES {
                        let why = format!(
                            "the server found {tries} sends of the chunk at byte {offset} damaged (460); the upload resumes there"
                        );
                        return Ok(Patched::Done(Ok((transient(&why), *sent))));
                    }
                    log::debug!(
                        "{} {}: the chunk at byte {offset} arrived damaged (460); sent again",
                        row.table,
                        row.rowid
                    );
                    reader.skip_to(offset);
                }
                404 | 410 => return Ok(Patched::Gone),
                _ => return Ok(Patched::Done(Ok((answer.outcome, *sent)))),
            }
        }
    }
}

/// The BLOB's SHA-256 in hex, read through chunk by chunk.
fn digest(reader: &mut BlobReader) -> Result<String, BlobError> {
    let mut hash = Sha256::new();
    loop {
        let chunk = reader.next_chunk(usize::MAX)?;
        if chunk.is_empty() {
            break;
        }
        hash.update(chunk);
    }
    Ok(relais_wire::hex(&hash.finalize()))
}

fn transient(reason: &str) -> Outcome {
    Outcome::Transient {
        reason: reason.to_string(),
        retry_after: None,
    }
}

fn stored(id: Value) -> Outcome {
    Outcome::Stored {
        remote_id: Some(id),
        html: false,
    }
}

fn number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// `Upload-Result-Id`: the stored row's id, an integer as a JSON answer's would be.
fn result_id(headers: &HeaderMap) -> Option<Value> {
    let text = headers.get("upload-result-id")?.to_str().ok()?.trim();
    Some(match text.parse::<i64>() {
        Ok(n) => Value::Integer(n),
        Err(_) => Value::Text(text.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_id_is_an_integer_when_it_reads_as_one() {
        let mut headers = HeaderMap::new();
        assert_eq!(result_id(&headers), None);
        headers.insert("upload-result-id", " 42 ".parse().unwrap());
        assert_eq!(result_id(&headers), Some(Value::Integer(42)));
        headers.insert("upload-result-id", "a-1".parse().unwrap());
        assert_eq!(result_id(&headers), Some(Value::Text("a-1".into())));
        headers.insert("upload-offset", "4194304".parse().unwrap());
        assert_eq!(number(&headers, "upload-offset"), Some(4 << 20));
        headers.insert("upload-offset", "-1".parse().unwrap());
        assert_eq!(number(&headers, "upload-offset"), None);
    }
}
