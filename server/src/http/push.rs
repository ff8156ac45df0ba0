//! `POST /api/{name}` (contract section 2): stores the push once per (device_id,
//! Idempotency-Key). A new row and a replay with the same body both answer
//! `201 {"id": N}` with the original id (the original result, as the IETF
//! Idempotency-Key draft asks); a replay with a different body gets 422. A device
//! token's holder may push only its device's rows: the key's device part is checked
//! before the body is read, the body's `device_id` before anything is stored (403).

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use miniserde::json::{Object, Value};

use super::App;
use super::auth::Caller;
use super::error::{Error, json_response, too_large};
use crate::media::{Placed, Received};
use crate::metrics::Outcome;
use crate::store::{MediaMeta, NewPush, Store, Stored};

pub async fn push<S: Store>(
    State(app): State<App<S>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let endpoint = format!("/api/{name}");
    let key = headers
        .get(relais_wire::IDEMPOTENCY_KEY_HEADER)
        .map(|value| usable_key(&caller, value))
        .transpose()?;
    let received = app.media.receive(body).await?;
    // Once the body is in, the rest runs as its own task: a client hanging up must not
    // cancel it between placing a media file and committing the row naming it.
    tokio::spawn(store(app, caller, endpoint, key, received))
        .await
        .map_err(|e| Error::Internal(format!("push: the storing task failed: {e}")))?
}

/// An Idempotency-Key, as the header or a batch row carries it, checked: visible ASCII
/// (400), of `caller`'s device (403).
pub(super) fn usable_key(caller: &Caller, value: &HeaderValue) -> Result<String, Error> {
    let key = match value.to_str() {
        Ok(key) if !key.trim().is_empty() => key.to_string(),
        _ => {
            return Err(Error::BadRequest(format!(
                "{}: must be non-empty visible ASCII",
                relais_wire::IDEMPOTENCY_KEY_HEADER
            )));
        }
    };
    caller.may_use_key(&key)?;
    Ok(key)
}

async fn store<S: Store>(
    app: App<S>,
    caller: Caller,
    endpoint: String,
    key: Option<String>,
    received: Received,
) -> Result<Response, Error> {
    let Received { split, body_sha256 } = received;
    if let Some(problem) = split.storage_problem {
        return Err(Error::Internal(format!("media: {problem}")));
    }
    if split.json_overflow {
        return Err(too_large());
    }
    if let Some(problem) = split.blob_problem {
        return Err(Error::Unprocessable(format!("body: {problem}")));
    }
    let text =
        String::from_utf8(split.json).map_err(|_| Error::BadRequest("body: not UTF-8".into()))?;
    // Refused here, the spooled media file (if any) is deleted as `split.blob` drops.
    let device_id = writable_payload(&caller, &text, &endpoint)?;
    let placed = match split.blob {
        Some(blob) => Some(
            app.media
                .place(blob)
                .await
                .map_err(|e| Error::Internal(format!("media: cannot store the file: {e}")))?,
        ),
        None => None,
    };
    let body = with_media_reference(text, split.blob_at, placed.as_ref());
    let push = new_push(device_id, endpoint, key, body, body_sha256);
    let (id, outcome) = store_placed(&app, push, placed).await?;
    let mut resp = json_response(StatusCode::CREATED, &format!("{{\"id\": {id}}}"));
    resp.extensions_mut().insert(outcome);
    Ok(resp)
}

/// Stores `push` naming the placed media file (if any), which is removed again unless
/// a new row names it (a replay, a failure): what a JSON media push and a completed
/// upload both go through.
pub(super) async fn store_placed<S: Store>(
    app: &App<S>,
    mut push: NewPush,
    placed: Option<Placed>,
) -> Result<(i64, Outcome), Error> {
    push.media = placed.as_ref().map(|p| MediaMeta {
        path: p.name.clone(),
        size: p.size,
        sha256: p.sha256.clone(),
    });
    let stored = app.store.store_push(push).await;
    if let (Some(placed), false) = (&placed, matches!(stored, Ok(Stored::New(_)))) {
        app.media.remove(placed).await;
    }
    answered(stored?)
}

/// The row's JSON text parsed and checked ([`check_payload`]), and its device one
/// `caller` may write: what a per-row push and a batch row both go through. Returns
/// the device id.
pub(super) fn writable_payload(
    caller: &Caller,
    text: &str,
    endpoint: &str,
) -> Result<String, Error> {
    let value: Value = miniserde::json::from_str(text)
        .map_err(|_| Error::BadRequest("body: not valid JSON".into()))?;
    let device_id = check_payload(&value, endpoint)?;
    caller.may_write(&device_id)?;
    Ok(device_id)
}

/// The push of a row without media.
pub(super) fn new_push(
    device_id: String,
    endpoint: String,
    key: Option<String>,
    body: String,
    body_sha256: String,
) -> NewPush {
    NewPush {
        device_id,
        endpoint,
        local_id: key
            .as_deref()
            .and_then(relais_wire::local_id_of)
            .map(str::to_string),
        idempotency_key: key,
        body,
        body_sha256,
        media: None,
    }
}

/// What the store did, as the answer's row id and the counters' outcome; a key used
/// with another body is the client's error.
pub(super) fn answered(stored: Stored) -> Result<(i64, Outcome), Error> {
    match stored {
        Stored::New(id) => {
            tracing::debug!(id, "push stored");
            Ok((id, Outcome::Stored))
        }
        Stored::Replay(id) => {
            tracing::debug!(id, "push replayed");
            Ok((id, Outcome::Replay))
        }
        Stored::Mismatch(id) => Err(Error::Unprocessable(format!(
            "{}: already used for row {id} with a different body",
            relais_wire::IDEMPOTENCY_KEY_HEADER
        ))),
    }
}

/// The payload's shape: an object with a non-empty `device_id` string, `source` a string
/// when present, and for the contract's two endpoints a `date` string. Returns the
/// device id.
fn check_payload(value: &Value, endpoint: &str) -> Result<String, Error> {
    let Value::Object(obj) = value else {
        return Err(Error::Unprocessable("body: expected a JSON object".into()));
    };
    let device_id = match obj.get(relais_wire::DEVICE_ID_MEMBER) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(Error::Unprocessable(format!(
                "{}: expected a non-empty string",
                relais_wire::DEVICE_ID_MEMBER
            )));
        }
    };
    expect_string(obj, relais_wire::SOURCE_MEMBER, false)?;
    if endpoint == relais_wire::EVENTS_PATH || endpoint == relais_wire::MEDIA_PATH {
        expect_string(obj, "date", true)?;
    }
    Ok(device_id)
}

fn expect_string(obj: &Object, member: &str, required: bool) -> Result<(), Error> {
    match obj.get(member) {
        Some(Value::String(_)) => Ok(()),
        None if !required => Ok(()),
        _ => Err(Error::Unprocessable(format!("{member}: expected a string"))),
    }
}

/// The body text with the placeholder string of the media field replaced by
/// `{"media_path": ..., "size": ..., "sha256": ...}`.
fn with_media_reference(text: String, at: Option<usize>, placed: Option<&Placed>) -> String {
    let (Some(at), Some(placed)) = (at, placed) else {
        return text;
    };
    let placeholder_len = crate::media::BLOB_PLACEHOLDER.len() + 2;
    let Some(end) = at.checked_add(placeholder_len).filter(|&e| e <= text.len()) else {
        return text;
    };
    let reference = media_reference(placed);
    let mut out = String::with_capacity(text.len() + reference.len());
    out.push_str(&text[..at]);
    out.push_str(&reference);
    out.push_str(&text[end..]);
    out
}

/// `{"media_path": ..., "size": ..., "sha256": ...}`: what a row's media member holds.
pub(super) fn media_reference(placed: &Placed) -> String {
    let mut reference = String::from("{\"media_path\": ");
    relais_wire::json::push_escaped(&mut reference, &placed.name, false);
    reference.push_str(&format!(
        ", \"size\": {}, \"sha256\": \"{}\"}}",
        placed.size, placed.sha256
    ));
    reference
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_media_field_becomes_a_reference() {
        let text = r#"{"a": 1, "video_data": "<blob>", "z": "end"}"#.to_string();
        let at = text.find("\"<blob>\"");
        let placed = Placed {
            name: "f.bin".into(),
            size: 3,
            sha256: "ab".into(),
        };
        assert_eq!(
            with_media_reference(text, at, Some(&placed)),
            r#"{"a": 1, "video_data": {"media_path": "f.bin", "size": 3, "sha256": "ab"}, "z": "end"}"#
        );
    }

    #[test]
    fn payload_checks_name_the_member() {
        let check = |t: &str| {
            let v: Value = miniserde::json::from_str(t).expect("json");
            check_payload(&v, relais_wire::EVENTS_PATH).map_err(|e| format!("{e:?}"))
        };
        assert_eq!(check(r#"{"device_id": "d", "date": "x"}"#), Ok("d".into()));
        assert!(
            check(r#"{"device_id": 3, "date": "x"}"#)
                .unwrap_err()
                .contains("device_id")
        );
        assert!(
            check(r#"{"device_id": "d", "date": 1}"#)
                .unwrap_err()
                .contains("date")
        );
        assert!(check("[1]").unwrap_err().contains("object"));
    }
}
