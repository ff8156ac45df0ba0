//! The console's failures and their HTML answers, in one place. A console answer is
//! always a page (`text/html`), so the HTTP layer's JSON error mapping leaves it alone.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;

use super::layout;
use crate::store::StoreError;

#[derive(Debug)]
pub enum Error {
    /// No live session: 303 to the login page.
    LoggedOut,
    /// 403: a POST without the session's CSRF token, with a wrong one, or from another
    /// origin. The page carries `id="csrf-refused"`.
    CsrfRefused(String),
    /// 400: a request that cannot be read (a body not UTF-8, a query that is not ours).
    BadRequest(String),
    /// 404: no row with the path's id.
    NotFound(String),
    /// 503 or 500: the store failed.
    Store(StoreError),
    /// 500: the server could not do its part.
    Internal(String),
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::LoggedOut => StatusCode::SEE_OTHER,
            Error::CsrfRefused(_) => StatusCode::FORBIDDEN,
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Store(StoreError::Unreachable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Store(StoreError::Failed(_)) | Error::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::LoggedOut => write!(f, "console: not logged in"),
            Error::CsrfRefused(d)
            | Error::BadRequest(d)
            | Error::NotFound(d)
            | Error::Internal(d) => write!(f, "{d}"),
            Error::Store(e) => write!(f, "{e}"),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Store(e)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::LoggedOut = self {
            return Redirect::to("/login").into_response();
        }
        let status = self.status();
        let detail = self.to_string();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), "{detail}");
        } else {
            tracing::info!(status = status.as_u16(), "{detail}");
        }
        // The store's details name hosts and statements: the operator reads them in
        // the log, the page says what happened.
        let shown = match &self {
            Error::Store(StoreError::Unreachable(_)) => {
                "store: unreachable for now; try again in a few seconds".to_string()
            }
            Error::Store(_) | Error::Internal(_) => {
                "console: the server failed to answer (its log says why)".to_string()
            }
            _ => detail,
        };
        let id = match self {
            Error::CsrfRefused(_) => "csrf-refused",
            _ => "error",
        };
        let body = layout::bare(
            status.canonical_reason().unwrap_or("Error"),
            html! {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p id=(id) class="error" { (shown) }
                p { a href="/" { "Back to the fleet" } }
            },
        );
        let mut resp = (status, body).into_response();
        if let Error::Store(StoreError::Unreachable(_)) = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("3"));
        }
        resp
    }
}
