//! The one error type of the HTTP layer and its mapping to a status and a JSON
//! `{"detail": ...}` body (FastAPI's shape, which the agent records), in one place:
//! [`json_errors`] gives the same shape to the answers the framework and the layers
//! produce themselves (404, 405, 408, 413).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::media::ReceiveError;
use crate::metrics::Outcome;
use crate::site_config::input::Invalid;
use crate::store::StoreError;

/// What a 503 asks the client to wait, in seconds: a store restart takes a few; the
/// agents' own backoff (with jitter) takes over if it is longer.
const RETRY_AFTER_S: u64 = 3;

/// tus 1.0's "Checksum Mismatch" status.
const CHECKSUM_MISMATCH: u16 = 460;

#[derive(Debug)]
pub enum Error {
    /// 400: the request cannot be read (not JSON, a bad header, a cut body).
    BadRequest(String),
    /// 404: no row with the path's id.
    NotFound(String),
    /// 409: a UNIQUE constraint refused the change.
    Conflict(String),
    /// 401: no token, or one the store does not know (or has revoked); an unknown site
    /// token.
    Unauthorized(String),
    /// 403: a valid token that may not do this (another device's rows, the wrong kind).
    Forbidden(String),
    /// 413: the body is larger than the limit.
    TooLarge(String),
    /// 422: well-formed JSON that is not an acceptable push, or a replay that differs.
    Unprocessable(String),
    /// 460 (tus checksum extension): an upload's chunk, or the whole upload, is not
    /// what its checksum says; nothing of it is kept.
    ChecksumMismatch(String),
    /// 422: an admin body with an invalid member; the answer names it in `field`.
    Invalid(Invalid),
    /// 503 with `Retry-After`: the store does not answer for now.
    Unavailable(StoreError),
    /// 500: the server could not do its part (media files, a store failure).
    Internal(String),
    /// Any other status the framework chose, with its detail.
    Status(StatusCode, String),
}

impl Error {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unprocessable(_) | Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::ChecksumMismatch(_) => {
                StatusCode::from_u16(CHECKSUM_MISMATCH).unwrap_or(StatusCode::BAD_REQUEST)
            }
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Status(status, _) => *status,
        }
    }

    pub(super) fn detail(&self) -> String {
        match self {
            Error::BadRequest(d)
            | Error::Unauthorized(d)
            | Error::NotFound(d)
            | Error::Conflict(d)
            | Error::Forbidden(d)
            | Error::TooLarge(d)
            | Error::Unprocessable(d)
            | Error::ChecksumMismatch(d)
            | Error::Internal(d)
            | Error::Status(_, d) => d.clone(),
            Error::Unavailable(e) => e.to_string(),
            Error::Invalid(invalid) => invalid.detail.clone(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = self.detail();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), "{detail}");
        } else {
            tracing::info!(status = status.as_u16(), "{detail}");
        }
        let body = match &self {
            Error::Invalid(invalid) => invalid_json(invalid),
            _ => detail_json(&detail),
        };
        let mut resp = json_response(status, &body);
        if matches!(
            self,
            Error::Unauthorized(_) | Error::Forbidden(_) | Error::TooLarge(_)
        ) {
            // These may answer before the body is read; the server then discards the
            // rest and closes, so the client must not reuse the connection.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        match self {
            Error::Unauthorized(_) => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Error::Unavailable(_) => {
                resp.extensions_mut().insert(Outcome::StoreError);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
            }
            _ => {}
        }
        resp
    }
}

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Error {
        Error::Invalid(invalid)
    }
}

impl From<ReceiveError> for Error {
    fn from(e: ReceiveError) -> Error {
        match e {
            ReceiveError::Body { limit: true, .. } => too_large(),
            ReceiveError::Body { detail, .. } => {
                Error::BadRequest(format!("body: cannot be read to its end: {detail}"))
            }
            ReceiveError::Worker(detail) => Error::Internal(detail),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        match e {
            StoreError::Unreachable(_) => Error::Unavailable(e),
            StoreError::Failed(_) => Error::Internal(e.to_string()),
        }
    }
}

pub fn too_large() -> Error {
    Error::TooLarge("body: larger than the server's limit (--max-body-bytes)".into())
}

/// `{"detail": "..."}`.
pub fn detail_json(detail: &str) -> String {
    let mut s = String::from("{\"detail\": ");
    relais_wire::json::push_escaped(&mut s, detail, false);
    s.push('}');
    s
}

/// `{"detail": "...", "field": "..."}`.
fn invalid_json(invalid: &Invalid) -> String {
    let mut s = String::from("{\"detail\": ");
    relais_wire::json::push_escaped(&mut s, &invalid.detail, false);
    s.push_str(", \"field\": ");
    relais_wire::json::push_escaped(&mut s, &invalid.field, false);
    s.push('}');
    s
}

pub fn json_response(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Middleware: an error answer without a JSON body (from the router or a layer) gets
/// one, so every 4xx and 5xx has a `detail`. The console's pages (HTML, its errors
/// included) are left as they are.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let typed = |prefix: &[u8]| {
        resp.headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(prefix))
    };
    let done = typed(b"application/json") || typed(b"text/html");
    if done || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        StatusCode::REQUEST_TIMEOUT => Error::Status(
            status,
            "request: took longer than the server's limit (--request-timeout-s)".into(),
        ),
        other => Error::Status(
            other,
            other
                .canonical_reason()
                .unwrap_or("request failed")
                .to_lowercase(),
        ),
    }
    .into_response()
}
