//! The one error type of the HTTP layer and its mapping to a status and a JSON
//! `{"detail": ...}` body (FastAPI's shape, which the agent records), in one place:
//! [`json_errors`] gives the same shape to the answers the framework and the layers
//! produce themselves (404, 405, 408, 413).

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::media::ReceiveError;
use crate::store::StoreError;

/// What a 503 asks the client to wait, in seconds: a store restart takes a few; the
/// agents' own backoff (with jitter) takes over if it is longer.
const RETRY_AFTER_S: u64 = 3;

#[derive(Debug)]
pub enum Error {
    /// 400: the request cannot be read (not JSON, a bad header, a cut body).
    BadRequest(String),
    /// 413: the body is larger than the limit.
    TooLarge(String),
    /// 422: well-formed JSON that is not an acceptable push, or a replay that differs.
    Unprocessable(String),
    /// 503 with `Retry-After`: the store does not answer for now.
    Unavailable(StoreError),
    /// 500: the server could not do its part (media files, a store failure).
    Internal(String),
    /// Any other status the framework chose, with its detail.
    Status(StatusCode, String),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Status(status, _) => *status,
        }
    }

    fn detail(&self) -> String {
        match self {
            Error::BadRequest(d)
            | Error::TooLarge(d)
            | Error::Unprocessable(d)
            | Error::Internal(d)
            | Error::Status(_, d) => d.clone(),
            Error::Unavailable(e) => e.to_string(),
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
        let mut resp = json_response(status, &detail_json(&detail));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(RETRY_AFTER_S),
            );
        }
        resp
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

pub fn json_response(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Middleware: an error answer without a JSON body (from the router or a layer) gets
/// one, so every 4xx and 5xx has a `detail`.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
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
