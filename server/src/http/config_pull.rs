//! `GET /config/{site_token}` (contract section 3, seed 001): the site's configuration
//! assembled by [`crate::site_config::served`], with `ETag: "<config_hash>"` and `304`
//! when `If-None-Match` holds that tag; `401` for an unknown token. The token is a
//! secret: it is only hashed and looked up, never written into a message (and the
//! request log names the route template `/config/{site_token}`, never the path).
//! A pull carrying a device token (the gate's [`Caller::Device`]) is recorded as that
//! device's (`config_pulls`), for the console; recording it failing does not fail the
//! pull.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::App;
use super::auth::Caller;
use super::error::Error;
use crate::site_config;
use crate::store::Store;
use crate::store::fleet::now;

pub async fn config<S: Store>(
    State(app): State<App<S>>,
    caller: Option<Extension<Caller>>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let token_sha256 = crate::tokens::sha256_hex(&token);
    let Some((site, devices)) = app.store.site_config(token_sha256.clone()).await? else {
        return Err(Error::Unauthorized(
            "config: unknown site token: check the agent's SITE_TOKEN".into(),
        ));
    };
    let (hash, body) = site_config::served(&site, &devices)
        .map_err(|e| Error::Internal(format!("config: site {:?}: {e}", site.name)))?;
    if let Some(Extension(Caller::Device(device))) = caller {
        let recorded = app
            .store
            .record_config_pull(device, token_sha256, hash.clone(), now())
            .await;
        if let Err(e) = recorded {
            tracing::warn!("config pull: not recorded: {e}");
        }
    }
    let etag = format!("\"{hash}\"");
    let etag = HeaderValue::from_str(&etag)
        .map_err(|_| Error::Internal("config: the hash is not a valid ETag".into()))?;
    let not_modified = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| none_match_holds(v, &hash)));
    tracing::info!(
        site = %site.name,
        hash = %hash,
        devices = devices.len(),
        not_modified,
        "config served"
    );
    // The configuration holds device passwords: no cache may keep it.
    let cache = (header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag), cache]).into_response());
    }
    let json = HeaderValue::from_static("application/json");
    Ok((
        StatusCode::OK,
        [(header::ETAG, etag), (header::CONTENT_TYPE, json), cache],
        body,
    )
        .into_response())
}

/// Whether an `If-None-Match` value (`*`, or a list of tags, strong or weak `W/"..."`)
/// holds the tag of `hash`: RFC 9110's weak comparison, the one `If-None-Match` uses.
fn none_match_holds(value: &str, hash: &str) -> bool {
    value.split(',').map(str::trim).any(|tag| {
        tag == "*"
            || tag
                .strip_prefix("W/")
                .unwrap_or(tag)
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                == Some(hash)
    })
}

#[cfg(test)]
mod tests {
    use super::none_match_holds;

    #[test]
    fn if_none_match_forms() {
        let h = "abc";
        for yes in [
            "\"abc\"",
            "W/\"abc\"",
            "*",
            "\"x\", \"abc\"",
            " W/\"y\" ,W/\"abc\" ",
        ] {
            assert!(none_match_holds(yes, h), "{yes}");
        }
        for no in ["abc", "\"abcd\"", "\"x\", \"y\"", "", "W/abc", "\"ab\"c\""] {
            assert!(!none_match_holds(no, h), "{no}");
        }
    }
}
