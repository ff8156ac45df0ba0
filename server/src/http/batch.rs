//! `POST /api/batch` and `GET /api/capabilities` (README, "Batch endpoint"): many rows
//! in one request, each with its own endpoint, Idempotency-Key and body, and its own
//! result in the answer, in the rows' order. A row goes through the per-row push's
//! checks ([`push::usable_key`], [`push::writable_payload`]) and is stored by the same
//! [`Store::store_push`]; the rows are stored concurrently, so the group commit puts
//! them in as few transactions as its limits allow, and the answer waits for every
//! row's commit. A store failure answers the whole batch as it answers a push (503 or
//! 500): every row may be retried, the committed ones are then replayed.
//!
//! The capability document is how an agent finds the endpoint and its limits; a
//! backend without it (the seed's) answers 404 there, and the agent pushes row by row.

pub(super) mod body;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use sha2::{Digest as _, Sha256};

use super::App;
use super::auth::Caller;
use super::error::{Error, json_response};
use super::{push, uploads};
use crate::media::INLINE_STRING_MAX;
use crate::metrics::{BatchRows, Outcome};
use crate::store::{NewPush, Store, StoreError};

/// `--batch-max-rows`'s default.
pub const MAX_ROWS: usize = 500;
/// `--batch-max-bytes`'s default: a batch of a few hundred events, and the group
/// commit's own bound on one transaction's bodies.
pub const MAX_BYTES: usize = crate::store::group_commit::MAX_BATCH_BYTES;
/// A row's body at most: a per-row push diverts a longer string to a media file, which
/// a batch does not carry, so such a row (media) must be sent alone.
pub const MAX_ROW_BYTES: usize = INLINE_STRING_MAX;

/// What the endpoint accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_rows: usize,
    pub max_bytes: usize,
}

/// The batch routes' state.
#[derive(Debug, Clone)]
pub struct Batches<S> {
    pub app: App<S>,
    pub limits: Limits,
}

/// What `GET /api/capabilities` announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub batch: Limits,
    pub uploads: uploads::Limits,
}

/// `GET /api/capabilities`.
pub async fn capabilities(State(capabilities): State<Capabilities>) -> Response {
    let Limits {
        max_rows,
        max_bytes,
    } = capabilities.batch;
    json_response(
        StatusCode::OK,
        &format!(
            "{{\"version\": 1, \"batch\": {{\"path\": \"/api/batch\", \"max_rows\": {max_rows}, \
             \"max_bytes\": {max_bytes}, \"max_row_bytes\": {MAX_ROW_BYTES}, \
             \"encodings\": [\"gzip\", \"identity\"]}}, \"uploads\": {}, \
             \"heartbeat\": {{\"path\": \"{}\", \"max_bytes\": {}}}}}",
            capabilities.uploads.capability(),
            relais_wire::heartbeat::HEARTBEAT_PATH,
            relais_wire::heartbeat::MAX_BYTES
        ),
    )
}

/// `POST /api/batch`.
pub async fn batch<S: Store>(
    State(batches): State<Batches<S>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let limits = batches.limits;
    let gzip = body::accepts_gzip(&headers);
    let text = body::read(&headers, body, limits.max_bytes).await?;
    let rows = rows_of(&text)?;
    if rows.len() > limits.max_rows {
        return Err(Error::TooLarge(format!(
            "batch: {} rows, more than {} (--batch-max-rows): send fewer rows per batch",
            rows.len(),
            limits.max_rows
        )));
    }
    let pushes: Vec<Result<NewPush, Error>> =
        rows.iter().map(|row| checked_row(&caller, row)).collect();
    // From here the rows are the store's: a client hanging up must not cancel a batch
    // half stored (it could not tell which rows were).
    let store = batches.app.store;
    tokio::spawn(async move { answer(&store, pushes, gzip).await })
        .await
        .map_err(|e| Error::Internal(format!("batch: the storing task failed: {e}")))?
}

/// The `rows` array's elements, as text.
fn rows_of(text: &str) -> Result<Vec<&str>, Error> {
    let mut rows = None;
    for (name, value) in body::object(text)? {
        match name.as_str() {
            "rows" => rows = Some(body::array(value)?),
            other => {
                return Err(Error::BadRequest(format!(
                    "batch: unknown member {other:?} (a batch is {{\"rows\": [...]}})"
                )));
            }
        }
    }
    rows.ok_or_else(|| Error::BadRequest("batch: no \"rows\" member".into()))
}

/// One row, `{"endpoint": ..., "idempotency_key": ..., "body": {...}}`, checked as the
/// per-row push checks its request.
fn checked_row(caller: &Caller, row: &str) -> Result<NewPush, Error> {
    let members =
        body::object(row).map_err(|_| Error::BadRequest("row: expected an object".into()))?;
    let (mut endpoint, mut key, mut payload) = (None, None, None);
    for (name, value) in members {
        match name.as_str() {
            "endpoint" => endpoint = Some(string_member("endpoint", value)?),
            "idempotency_key" => key = Some(string_member("idempotency_key", value)?),
            "body" => payload = Some(value),
            other => return Err(Error::BadRequest(format!("row: unknown member {other:?}"))),
        }
    }
    let endpoint = endpoint.ok_or_else(|| missing("endpoint"))?;
    if !is_push_endpoint(&endpoint) {
        return Err(Error::NotFound(format!(
            "endpoint: {endpoint:?} is not a push endpoint (/api/NAME)"
        )));
    }
    // A batch row always has one: without it, a batch retried after a lost answer would
    // store every row again.
    let key = key.ok_or_else(|| missing("idempotency_key"))?;
    let key = HeaderValue::from_str(&key)
        .map_err(|_| {
            Error::BadRequest(format!(
                "{}: must be non-empty visible ASCII",
                relais_wire::IDEMPOTENCY_KEY_HEADER
            ))
        })
        .and_then(|value| push::usable_key(caller, &value))?;
    let payload = payload.ok_or_else(|| missing("body"))?;
    if payload.len() > MAX_ROW_BYTES {
        return Err(Error::TooLarge(format!(
            "row: a body of {} bytes, more than a batch row holds ({MAX_ROW_BYTES}): send it \
             alone to {endpoint}",
            payload.len()
        )));
    }
    let device_id = push::writable_payload(caller, payload, &endpoint)?;
    let sha256 = relais_wire::hex(&Sha256::digest(payload.as_bytes()));
    Ok(push::new_push(
        device_id,
        endpoint,
        Some(key),
        payload.to_string(),
        sha256,
    ))
}

fn string_member(name: &str, raw: &str) -> Result<String, Error> {
    miniserde::json::from_str(raw)
        .map_err(|_| Error::BadRequest(format!("{name}: expected a string")))
}

fn missing(name: &str) -> Error {
    Error::BadRequest(format!("row: no {name:?} member"))
}

/// What `POST /api/{name}` would store: one path segment after `/api/`, not one of the
/// batch routes.
pub(super) fn is_push_endpoint(endpoint: &str) -> bool {
    endpoint.strip_prefix("/api/").is_some_and(|name| {
        !name.is_empty()
            && !name.contains(['/', '?', '#', '%'])
            && !["batch", "capabilities", "uploads"].contains(&name)
    })
}

/// Stores the checked rows concurrently and answers `{"results": [...]}` once every
/// row's outcome is known; a store failure answers the whole batch.
async fn answer<S: Store>(
    store: &S,
    pushes: Vec<Result<NewPush, Error>>,
    gzip: bool,
) -> Result<Response, Error> {
    let outcomes = futures_util::future::join_all(pushes.into_iter().map(|push| async move {
        match push {
            Ok(push) => store.store_push(push).await.map(push::answered),
            Err(refused) => Ok(Err(refused)),
        }
    }))
    .await;
    let mut counts = BatchRows::default();
    let mut results = String::from("{\"results\": [");
    let mut failure: Option<StoreError> = None;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        if i > 0 {
            results.push_str(", ");
        }
        match outcome {
            Ok(Ok((id, outcome))) => {
                let status = if outcome == Outcome::Stored {
                    counts.stored += 1;
                    "stored"
                } else {
                    counts.replayed += 1;
                    "replayed"
                };
                results.push_str(&format!("{{\"status\": \"{status}\", \"id\": {id}}}"));
            }
            Ok(Err(refused)) => {
                counts.rejected += 1;
                results.push_str(&format!(
                    "{{\"status\": \"rejected\", \"code\": {}, \"detail\": ",
                    refused.status().as_u16()
                ));
                relais_wire::json::push_escaped(&mut results, &refused.detail(), false);
                results.push('}');
            }
            // An unreachable store wins: its 503 says "retry", a 500 does not.
            Err(e) => match (&failure, &e) {
                (Some(StoreError::Unreachable(_)), _) => {}
                _ => failure = Some(e),
            },
        }
    }
    if let Some(e) = failure {
        return Err(e.into());
    }
    results.push_str("]}");
    if counts.rejected > 0 {
        tracing::info!(
            stored = counts.stored,
            replayed = counts.replayed,
            rejected = counts.rejected,
            "batch: rows rejected (their results say why)"
        );
    }
    let mut resp = if gzip {
        let headers = [
            (header::CONTENT_TYPE, "application/json"),
            (header::CONTENT_ENCODING, "gzip"),
            (header::VARY, "accept-encoding"),
        ];
        (StatusCode::OK, headers, body::gzip(&results)?).into_response()
    } else {
        json_response(StatusCode::OK, &results)
    };
    resp.extensions_mut().insert(Outcome::Batch(counts));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_endpoints() {
        assert!(is_push_endpoint("/api/evenements"));
        assert!(!is_push_endpoint("/api/"));
        assert!(!is_push_endpoint("/api/a/b"));
        assert!(!is_push_endpoint("/api/batch"));
        assert!(!is_push_endpoint("/api/uploads"));
        assert!(!is_push_endpoint("/other"));
    }
}
