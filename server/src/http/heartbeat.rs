//! `POST /api/agent/heartbeat` (README "Heartbeats"): an agent's report after a pass,
//! kept as its device's latest and as a point of its hourly history. The device is the
//! token's (a heartbeat naming another one is refused, 403, as a push would be); with
//! `--no-auth`, the heartbeat's own `device_id`, as a push's body names its device. The
//! body is at most [`relais_wire::heartbeat::MAX_BYTES`] (413) and must read as a
//! [`Heartbeat`] (422 naming the member at fault). Answers 204.

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use http_body_util::BodyExt as _;
use relais_wire::heartbeat::{self, Heartbeat};

use super::App;
use super::auth::Caller;
use super::error::Error;
use crate::metrics::Outcome;
use crate::store::Store;
use crate::store::fleet::now;

pub async fn heartbeat<S: Store>(
    State(app): State<App<S>>,
    Extension(caller): Extension<Caller>,
    body: Body,
) -> Result<Response, Error> {
    let bytes = http_body_util::Limited::new(body, heartbeat::MAX_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Error::TooLarge(format!(
                    "heartbeat: larger than {} bytes",
                    heartbeat::MAX_BYTES
                ))
            } else {
                Error::BadRequest(format!("body: cannot be read to its end: {e}"))
            }
        })?
        .to_bytes();
    let json = String::from_utf8(bytes.to_vec())
        .map_err(|_| Error::BadRequest("heartbeat: not UTF-8".into()))?;
    let beat = Heartbeat::parse(&json).map_err(|e| Error::Unprocessable(e.to_string()))?;
    let device_id = match (&caller, &beat.device_id) {
        (Caller::Device(own), _) => own.clone(),
        (_, Some(named)) if !named.is_empty() => named.clone(),
        _ => {
            return Err(Error::Unprocessable(
                "heartbeat: device_id: missing (without tokens, the heartbeat names its device)"
                    .into(),
            ));
        }
    };
    if let Some(named) = &beat.device_id {
        caller.may_write(named)?;
    }
    app.store
        .record_heartbeat(device_id, now(), beat, json)
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.extensions_mut().insert(Outcome::Heartbeat);
    Ok(resp)
}
