//! Resumable media uploads, tus 1.0.0 core with the creation, checksum and expiration
//! extensions (README, "Resumable media uploads"): `POST /api/uploads` creates an
//! upload for one media row (its other members and the BLOB's SHA-256 in
//! `Upload-Metadata`, its `Idempotency-Key` as on every push), `HEAD` answers its
//! offset, `PATCH` appends raw bytes at that offset, each chunk checked against its
//! `Upload-Checksum`. The last chunk stores the row through the JSON push's own path
//! ([`push::store_placed`]): same `received` row, same media view, once per key.
//!
//! tus 1.0.0 rather than the IETF "Resumable Uploads for HTTP" draft: tus is a stable
//! specification with clients and test suites in every language (the agent's side can
//! use or copy one), while the draft still changes between revisions (headers renamed,
//! status codes moved) and has few implementations to test against.
//!
//! Nothing a request needs lives in this server's memory: the offset, the expiry and
//! the claim of the request appending are in the store, the partial file in the shared
//! media directory, so any server of a fleet continues any upload. A chunk is first
//! received whole into a temporary file and checked; only then is the upload claimed
//! (a conditional update: one of two racing PATCHes gets 409) and the chunk copied in,
//! so a half-dead connection holds no claim while its body trickles in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use miniserde::json::Value;
use sha2::{Digest as _, Sha256};

use super::App;
use super::auth::Caller;
use super::batch::is_push_endpoint;
use super::error::{Error, json_response};
use super::push;
use crate::media::{Chunk, Placed};
use crate::metrics::Outcome;
use crate::store::{Creation, Store, Upload};

/// The protocol version, in `Tus-Resumable` and `Tus-Version`.
const TUS_VERSION: &str = "1.0.0";
const TUS_EXTENSIONS: &str = "creation,checksum,expiration";
/// The one checksum algorithm: the one the metadata's whole-file hash uses too.
const CHECKSUM_ALGORITHM: &str = "sha256";
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// The remote id of a completed upload's row (a PATCH answer has no body).
const RESULT_ID: HeaderName = HeaderName::from_static("upload-result-id");
const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");

/// `--upload-max-bytes`' default: the JSON push's body limit.
pub const MAX_BYTES: u64 = 1 << 30;
/// `--upload-expiry-s`' default: a day, for a device that loses its uplink overnight.
pub const EXPIRY_S: u64 = 24 * 3600;

/// What the endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest `Upload-Length`.
    pub max_bytes: u64,
    /// An upload is removed this long after its creation or its last PATCH.
    pub expiry: Duration,
}

impl Limits {
    /// The `uploads` member of `GET /api/capabilities`.
    pub fn capability(&self) -> String {
        format!(
            "{{\"path\": \"/api/uploads\", \"protocol\": \"tus/{TUS_VERSION}\", \"checksum\": \
             \"{CHECKSUM_ALGORITHM}\", \"max_bytes\": {}, \"expiry_s\": {}}}",
            self.max_bytes,
            self.expiry.as_secs()
        )
    }
}

/// The upload routes' state.
#[derive(Debug, Clone)]
pub struct Uploads<S> {
    pub app: App<S>,
    pub limits: Limits,
    /// How long a PATCH's claim holds if its server dies before releasing it.
    pub lease: Duration,
}

/// Every answer of these routes says the protocol version (tus 1.0.0 asks it of every
/// answer but OPTIONS'; there it does no harm).
fn tus(result: Result<Response, Error>) -> Response {
    let precondition_failed =
        matches!(&result, Err(Error::Status(s, _)) if *s == StatusCode::PRECONDITION_FAILED);
    let mut resp = result.unwrap_or_else(|e| e.into_response());
    let headers = resp.headers_mut();
    headers.insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
    if precondition_failed {
        headers.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    }
    resp
}

/// `OPTIONS /api/uploads`: what the server supports.
pub async fn options<S: Store>(State(uploads): State<Uploads<S>>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let headers = resp.headers_mut();
    headers.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    headers.insert("tus-extension", HeaderValue::from_static(TUS_EXTENSIONS));
    headers.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static(CHECKSUM_ALGORITHM),
    );
    headers.insert("tus-max-size", HeaderValue::from(uploads.limits.max_bytes));
    tus(Ok(resp))
}

/// `POST /api/uploads`.
pub async fn create<S: Store>(
    State(uploads): State<Uploads<S>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> Response {
    tus(create_upload(&uploads, &caller, &headers).await)
}

/// `HEAD /api/uploads/{id}`.
pub async fn head<S: Store>(
    State(uploads): State<Uploads<S>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    tus(async {
        resumable(&headers)?;
        let upload = live_upload(&uploads, &caller, id).await?;
        let mut resp = described(StatusCode::OK, &upload);
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(resp)
    }
    .await)
}

/// `PATCH /api/uploads/{id}`.
pub async fn patch<S: Store>(
    State(uploads): State<Uploads<S>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let appended = append(uploads, &caller, id, &headers, body).await;
    let refused = appended.is_err();
    let mut resp = tus(appended);
    if refused {
        // Most refusals answer before the body is read, and hyper then closes the
        // connection without saying so: a client must not send its next request on it.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn create_upload<S: Store>(
    uploads: &Uploads<S>,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    resumable(headers)?;
    let length = number(headers, &UPLOAD_LENGTH)?.ok_or_else(|| {
        Error::BadRequest("Upload-Length: required (deferred lengths are not supported)".into())
    })?;
    if length > uploads.limits.max_bytes {
        return Err(Error::TooLarge(format!(
            "Upload-Length: {length} bytes, more than the server's limit of {} \
             (--upload-max-bytes)",
            uploads.limits.max_bytes
        )));
    }
    let key = headers
        .get(relais_wire::IDEMPOTENCY_KEY_HEADER)
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "{}: required on an upload (a repeated POST must find the same upload)",
                relais_wire::IDEMPOTENCY_KEY_HEADER
            ))
        })
        .and_then(|value| push::usable_key(caller, value))?;
    let meta = Metadata::of(headers)?;
    let endpoint = format!("/api/{}", meta.endpoint);
    if !is_push_endpoint(&endpoint) {
        return Err(Error::NotFound(format!(
            "Upload-Metadata: endpoint {:?} is not a push endpoint (/api/NAME)",
            meta.endpoint
        )));
    }
    let device_id = push::writable_payload(caller, &meta.json, &endpoint)?;
    if let Ok(Value::Object(members)) = miniserde::json::from_str::<Value>(&meta.json) {
        if members.contains_key(&meta.field) {
            return Err(Error::Unprocessable(format!(
                "Upload-Metadata: json already has the member {:?} the upload is for",
                meta.field
            )));
        }
    }
    let now = now_s();
    let wanted = Upload {
        id: new_id(),
        device_id,
        idempotency_key: key,
        endpoint,
        field: meta.field,
        json: meta.json,
        sha256: meta.sha256,
        length,
        offset: 0,
        expires_at: now.saturating_add(secs(uploads.limits.expiry)),
        row_id: None,
    };
    let app = &uploads.app;
    match app.store.create_upload(wanted.clone(), now).await? {
        Creation::New { upload, expired } => {
            if let Some(expired) = expired {
                app.media.remove_upload(&expired).await;
            }
            tracing::debug!(id = upload.id, "upload created");
            let mut resp = created(&upload);
            resp.extensions_mut().insert(Outcome::UploadCreated);
            Ok(resp)
        }
        Creation::Existing(upload) => {
            let same = (
                &upload.endpoint,
                &upload.field,
                &upload.json,
                &upload.sha256,
            ) == (
                &wanted.endpoint,
                &wanted.field,
                &wanted.json,
                &wanted.sha256,
            ) && upload.length == wanted.length;
            if !same {
                return Err(Error::Unprocessable(format!(
                    "{}: already used for upload {} with other metadata or length",
                    relais_wire::IDEMPOTENCY_KEY_HEADER,
                    upload.id
                )));
            }
            Ok(match upload.row_id {
                Some(row_id) => stored(row_id),
                None => created(&upload),
            })
        }
        Creation::Stored(row_id) => Ok(stored(row_id)),
    }
}

/// `201` with the upload's `Location` and where it stands.
fn created(upload: &Upload) -> Response {
    let mut resp = described(StatusCode::CREATED, upload);
    if let Ok(location) = HeaderValue::from_str(&format!("/api/uploads/{}", upload.id)) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

/// `200 {"id": N}`: the key's row is stored, as a push's answer says it.
fn stored(row_id: i64) -> Response {
    let mut resp = json_response(StatusCode::OK, &format!("{{\"id\": {row_id}}}"));
    resp.headers_mut()
        .insert(RESULT_ID, HeaderValue::from(row_id));
    resp
}

/// An answer with the upload's `Upload-Offset`, `Upload-Length`, `Upload-Expires` and,
/// once it completed, `Upload-Result-Id`.
fn described(status: StatusCode, upload: &Upload) -> Response {
    let mut resp = status.into_response();
    let headers = resp.headers_mut();
    headers.insert(UPLOAD_OFFSET, HeaderValue::from(upload.offset));
    headers.insert(UPLOAD_LENGTH, HeaderValue::from(upload.length));
    let expires = UNIX_EPOCH + Duration::from_secs(upload.expires_at.max(0) as u64);
    if let Ok(expires) = HeaderValue::from_str(&httpdate::fmt_http_date(expires)) {
        headers.insert("upload-expires", expires);
    }
    if let Some(row_id) = upload.row_id {
        headers.insert(RESULT_ID, HeaderValue::from(row_id));
    }
    resp
}

/// The upload, not expired, if `caller` may write its device's rows.
async fn live_upload<S: Store>(
    uploads: &Uploads<S>,
    caller: &Caller,
    id: String,
) -> Result<Upload, Error> {
    let upload = uploads
        .app
        .store
        .upload(id, now_s())
        .await?
        .ok_or_else(|| Error::NotFound("upload: unknown or expired: create it again".into()))?;
    caller.may_write(&upload.device_id)?;
    Ok(upload)
}

async fn append<S: Store>(
    uploads: Uploads<S>,
    caller: &Caller,
    id: String,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    resumable(headers)?;
    let content_type = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes);
    if content_type != Some(OFFSET_OCTET_STREAM.as_bytes()) {
        return Err(Error::Status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type: a PATCH sends {OFFSET_OCTET_STREAM}"),
        ));
    }
    let offset = number(headers, &UPLOAD_OFFSET)?
        .ok_or_else(|| Error::BadRequest("Upload-Offset: required".into()))?;
    let checksum = chunk_checksum(headers)?;
    let upload = live_upload(&uploads, caller, id).await?;
    if offset != upload.offset {
        return Err(Error::Conflict(format!(
            "Upload-Offset: {offset}, but the upload is at {} (HEAD says where)",
            upload.offset
        )));
    }
    let remaining = upload.length - upload.offset;
    let chunk = uploads.app.media.receive_chunk(body, remaining).await?;
    if chunk.len > remaining {
        return Err(Error::TooLarge(format!(
            "PATCH: {} bytes, more than the {remaining} the upload still lacks",
            chunk.len
        )));
    }
    if chunk.sha256 != checksum {
        return Err(Error::ChecksumMismatch(
            "Upload-Checksum: not the SHA-256 of this PATCH's body: nothing appended".into(),
        ));
    }
    if upload.row_id.is_some() {
        // The last PATCH again, empty (its answer was lost): the same answer.
        return Ok(described(StatusCode::NO_CONTENT, &upload));
    }
    // From here the upload is the store's: a client hanging up must not leave it
    // claimed, nor cancel it between placing its file and committing the row.
    tokio::spawn(settle(uploads, upload, chunk))
        .await
        .map_err(|e| Error::Internal(format!("upload: the storing task failed: {e}")))?
}

/// Claims the upload, appends the checked chunk, moves the offset on, and completes the
/// upload when that was its last byte.
async fn settle<S: Store>(
    uploads: Uploads<S>,
    mut upload: Upload,
    chunk: Chunk,
) -> Result<Response, Error> {
    let (store, media) = (&uploads.app.store, &uploads.app.media);
    let now = now_s();
    let claimed = store
        .claim_upload(
            upload.id.clone(),
            upload.offset,
            now,
            now.saturating_add(secs(uploads.lease)),
        )
        .await?;
    if !claimed {
        return Err(Error::Conflict(
            "upload: another request is appending to it, or it moved on (HEAD says where)".into(),
        ));
    }
    let (from, to) = (upload.offset, upload.offset + chunk.len);
    let expires_at = now_s().saturating_add(secs(uploads.limits.expiry));
    if let Err(e) = media.append(&upload.id, from, chunk).await {
        // Released at the same offset: the retry overwrites what was written.
        store
            .settle_upload(upload.id.clone(), from, from, expires_at)
            .await?;
        return Err(Error::Internal(format!(
            "media: cannot append the chunk: {e}"
        )));
    }
    if !store
        .settle_upload(upload.id.clone(), from, to, expires_at)
        .await?
    {
        return Err(Error::NotFound(
            "upload: removed meanwhile: create it again".into(),
        ));
    }
    upload.offset = to;
    upload.expires_at = expires_at;
    if to < upload.length {
        return Ok(described(StatusCode::NO_CONTENT, &upload));
    }
    complete(&uploads.app, upload).await
}

/// The whole file checked against the metadata's SHA-256, placed, and its row stored
/// as a JSON media push's is; a file that does not match is removed with its upload.
async fn complete<S: Store>(app: &App<S>, mut upload: Upload) -> Result<Response, Error> {
    let internal = |e: std::io::Error| Error::Internal(format!("media: upload: {e}"));
    let sha256 = app
        .media
        .upload_sha256(&upload.id)
        .await
        .map_err(internal)?;
    if sha256 != upload.sha256 {
        app.store.remove_upload(upload.id.clone()).await?;
        app.media.remove_upload(&upload.id).await;
        return Err(Error::ChecksumMismatch(format!(
            "upload: the whole BLOB's SHA-256 is {sha256}, not the metadata's sha256 {}: \
             nothing stored, the upload is removed (create it again)",
            upload.sha256
        )));
    }
    let placed = match app
        .media
        .place_upload(&upload.id, upload.length, sha256)
        .await
    {
        Ok(placed) => placed,
        Err(e) => {
            // The partial file is gone with the failed move: so must the upload be.
            app.store.remove_upload(upload.id.clone()).await?;
            return Err(internal(e));
        }
    };
    let body = row_body(&upload, &placed);
    let push = push::new_push(
        upload.device_id.clone(),
        upload.endpoint.clone(),
        Some(upload.idempotency_key.clone()),
        body,
        row_sha256(&upload),
    );
    let (row_id, outcome) = match push::store_placed(app, push, Some(placed)).await {
        Ok(stored) => stored,
        Err(e) => {
            // The file went with the failed commit: a POST with the key starts afresh
            // (or finds the row, had it been stored after all).
            app.store.remove_upload(upload.id.clone()).await?;
            return Err(e);
        }
    };
    app.store.complete_upload(upload.id.clone(), row_id).await?;
    upload.row_id = Some(row_id);
    let mut resp = described(StatusCode::NO_CONTENT, &upload);
    resp.extensions_mut()
        .insert(Outcome::UploadCompleted(outcome == Outcome::Stored));
    Ok(resp)
}

/// The row as a JSON push stores it: the metadata's members and the BLOB's member,
/// the reference to its file, last.
fn row_body(upload: &Upload, placed: &Placed) -> String {
    let json = upload.json.trim_end();
    let head = json.strip_suffix('}').unwrap_or(json).trim_end();
    let empty = head
        .strip_prefix('{')
        .is_some_and(|rest| rest.trim().is_empty());
    let mut body = head.to_string();
    if !empty {
        body.push_str(", ");
    }
    relais_wire::json::push_escaped(&mut body, &upload.field, false);
    body.push_str(": ");
    body.push_str(&push::media_reference(placed));
    body.push('}');
    body
}

/// What a replay of the row is compared by: its metadata and the BLOB's hash, so a
/// second upload of the same row with the same key is a replay, answered the first id.
fn row_sha256(upload: &Upload) -> String {
    let mut sha = Sha256::new();
    for part in [&upload.json, &upload.field, &upload.sha256] {
        sha.update(part.as_bytes());
        sha.update(b"\n");
    }
    relais_wire::hex(&sha.finalize())
}

/// `Tus-Resumable: 1.0.0`, or 412.
fn resumable(headers: &HeaderMap) -> Result<(), Error> {
    if headers.get(TUS_RESUMABLE).map(HeaderValue::as_bytes) == Some(TUS_VERSION.as_bytes()) {
        return Ok(());
    }
    Err(Error::Status(
        StatusCode::PRECONDITION_FAILED,
        format!("Tus-Resumable: this server speaks tus {TUS_VERSION}"),
    ))
}

/// A non-negative integer header, if present.
fn number(headers: &HeaderMap, name: &HeaderName) -> Result<Option<u64>, Error> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::BadRequest(format!("{name}: expected a byte count")))
        })
        .transpose()
}

/// The `Upload-Checksum: sha256 <base64>` of a PATCH, required: it is what makes a
/// chunk corrupted on the way fail alone instead of the whole upload at its end.
fn chunk_checksum(headers: &HeaderMap) -> Result<[u8; 32], Error> {
    let value = headers
        .get("upload-checksum")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Error::BadRequest(format!(
                "Upload-Checksum: required: {CHECKSUM_ALGORITHM} <base64 of the body's digest>"
            ))
        })?;
    let (algorithm, digest) = value.split_once(' ').unwrap_or((value, ""));
    if algorithm != CHECKSUM_ALGORITHM {
        return Err(Error::BadRequest(format!(
            "Upload-Checksum: algorithm {algorithm:?} not supported ({CHECKSUM_ALGORITHM} only)"
        )));
    }
    STANDARD
        .decode(digest.trim())
        .ok()
        .and_then(|d| <[u8; 32]>::try_from(d).ok())
        .ok_or_else(|| {
            Error::BadRequest("Upload-Checksum: not the base64 of a SHA-256 digest".into())
        })
}

/// The members of `Upload-Metadata` an upload needs.
#[derive(Debug, PartialEq, Eq)]
struct Metadata {
    endpoint: String,
    field: String,
    json: String,
    /// Lowercase hex.
    sha256: String,
}

impl Metadata {
    /// tus' `key base64,key base64` pairs; other keys (a client's `filename`) are
    /// ignored.
    fn of(headers: &HeaderMap) -> Result<Metadata, Error> {
        let bad = |detail: String| Error::BadRequest(format!("Upload-Metadata: {detail}"));
        let text = headers
            .get("upload-metadata")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| bad("required (endpoint, field, json, sha256)".into()))?;
        let (mut endpoint, mut field, mut json, mut sha256) = (None, None, None, None);
        for pair in text.split(',') {
            let (key, value) = pair.trim().split_once(' ').unwrap_or((pair.trim(), ""));
            let slot = match key {
                "endpoint" => &mut endpoint,
                "field" => &mut field,
                "json" => &mut json,
                "sha256" => &mut sha256,
                _ => continue,
            };
            let value = STANDARD
                .decode(value.trim())
                .ok()
                .and_then(|v| String::from_utf8(v).ok())
                .ok_or_else(|| bad(format!("{key}: not the base64 of UTF-8 text")))?;
            *slot = Some(value);
        }
        let required = |value: Option<String>, key: &str| {
            value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| bad(format!("no {key}")))
        };
        let sha256 = required(sha256, "sha256")?.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("sha256: expected 64 hex digits".into()));
        }
        Ok(Metadata {
            endpoint: required(endpoint, "endpoint")?,
            field: required(field, "field")?,
            json: required(json, "json")?,
            sha256,
        })
    }
}

/// Removes the expired uploads every `period`, forever: their rows, and the partial
/// files of those that did not complete. Every server of a fleet runs it; each expired
/// row is deleted, and its file removed, by exactly one of them.
pub async fn expire_every<S: Store>(app: App<S>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match app.store.expire_uploads(now_s()).await {
            Ok(gone) => {
                for (id, completed) in &gone {
                    if !completed {
                        app.media.remove_upload(id).await;
                    }
                }
                if !gone.is_empty() {
                    app.uploads_expired
                        .fetch_add(gone.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!("uploads: removed {} expired upload(s)", gone.len());
                }
            }
            Err(e) => tracing::warn!("uploads: cannot remove the expired uploads: {e}"),
        }
    }
}

/// Now, in Unix seconds (the console's sessions are timed by it too).
pub(crate) fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, secs)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// 128 random bits, hex: an upload's id is not guessable (a device token is still
/// needed, and only its own device's uploads answer). std's `RandomState` is keyed
/// from the operating system's random source.
fn new_id() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let half = || {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(n);
        hasher.write_u128(nanos);
        hasher.finish()
    };
    format!("{:016x}{:016x}", half(), half())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        STANDARD.encode(s)
    }

    #[test]
    fn metadata_pairs() {
        let mut h = HeaderMap::new();
        let sha = "AB".repeat(32);
        let value = format!(
            "filename {},endpoint {}, field {},json {},sha256 {}",
            b64("v.mp4"),
            b64("media"),
            b64("video_data"),
            b64(r#"{"a": 1}"#),
            b64(&sha)
        );
        h.insert("upload-metadata", value.parse().expect("value"));
        assert_eq!(
            Metadata::of(&h).expect("metadata"),
            Metadata {
                endpoint: "media".into(),
                field: "video_data".into(),
                json: r#"{"a": 1}"#.into(),
                sha256: sha.to_ascii_lowercase(),
            }
        );
        h.insert(
            "upload-metadata",
            "endpoint bWVkaWE=".parse().expect("value"),
        );
        assert!(matches!(Metadata::of(&h), Err(Error::BadRequest(d)) if d.contains("sha256")));
    }

    #[test]
    fn the_blob_member_goes_last() {
        let placed = Placed {
            name: "f.bin".into(),
            size: 3,
            sha256: "ab".into(),
        };
        let mut upload = Upload {
            id: "u".into(),
            device_id: "d".into(),
            idempotency_key: "d:m:1".into(),
            endpoint: "/api/media".into(),
            field: "video".into(),
            json: r#"{"a": 1} "#.into(),
            sha256: "ab".into(),
            length: 3,
            offset: 3,
            expires_at: 0,
            row_id: None,
        };
        assert_eq!(
            row_body(&upload, &placed),
            r#"{"a": 1, "video": {"media_path": "f.bin", "size": 3, "sha256": "ab"}}"#
        );
        upload.json = "{ }".into();
        assert_eq!(
            row_body(&upload, &placed),
            r#"{"video": {"media_path": "f.bin", "size": 3, "sha256": "ab"}}"#
        );
    }

    #[test]
    fn chunk_checksums() {
        let mut h = HeaderMap::new();
        assert!(chunk_checksum(&h).is_err());
        let digest: [u8; 32] = Sha256::digest(b"abc").into();
        let value = format!("sha256 {}", STANDARD.encode(digest));
        h.insert("upload-checksum", value.parse().expect("value"));
        assert_eq!(chunk_checksum(&h).ok(), Some(digest));
        h.insert(
            "upload-checksum",
            "sha1 qZk+NkcGgWq6PiVxeFDCbJzQ2J0=".parse().expect("value"),
        );
        assert!(chunk_checksum(&h).is_err());
    }
}
