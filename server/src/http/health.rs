//! `GET /health`: the process answers. `GET /ready`: the store answers too (503 with
//! `Retry-After` when it does not, whatever the reason: not ready is not ready).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::App;
use super::error::{Error, json_response};
use crate::store::Store;

pub async fn health() -> Response {
    json_response(StatusCode::OK, r#"{"status": "ok"}"#)
}

pub async fn ready<S: Store>(State(app): State<App<S>>) -> Result<Response, Error> {
    app.store.ready().await.map_err(Error::Unavailable)?;
    Ok(json_response(StatusCode::OK, r#"{"status": "ready"}"#))
}
