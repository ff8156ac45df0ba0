//! The admin API of seed 001's configuration backend, one router nested at `/admin`
//! (README, "Configuration backend"): create, read, update (partially) and delete
//! sites and devices. Bodies are read by [`crate::site_config::input`] (422 naming the
//! member, nothing stored); the store decides duplicates (409) and unknown ids (404),
//! and moves the site's `config_version` in the same transaction as the change.
//! Authentication is a layer on the `/admin/` prefix, not this module's concern.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};

use super::App;
use super::error::{Error, json_response};
use crate::site_config::input::{self, Invalid};
use crate::site_config::{self, NewSite};
use crate::store::{Refused, Store};
use crate::tokens;

pub fn router<S: Store>() -> Router<App<S>> {
    Router::new()
        .route("/sites", get(sites::<S>).post(create_site::<S>))
        .route(
            "/sites/{id}",
            get(site::<S>)
                .put(update_site::<S>)
                .delete(delete_site::<S>),
        )
        .route("/devices", get(devices::<S>).post(create_device::<S>))
        .route(
            "/devices/{id}",
            get(device::<S>)
                .put(update_device::<S>)
                .delete(delete_device::<S>),
        )
        .route("/sync/entity-types/{entity_type}", put(set_strategy::<S>))
}

/// `PUT /admin/sync/entity-types/{type}` with `{"tenant": ..., "strategy": ...}`: how
/// the conflicts of the tenant's entity type are resolved (README, "Two-way sync: the
/// server"); the same as `relais-server sync strategy`.
async fn set_strategy<S: Store>(
    State(app): State<App<S>>,
    Path(entity_type): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    use miniserde::json::Value;
    let bad = |d: &str| Error::Unprocessable(format!("sync strategy: {d}"));
    let Ok(Value::Object(mut body)) = miniserde::json::from_str::<Value>(text(&body)?) else {
        return Err(Error::BadRequest(
            "sync strategy: the body must be {\"tenant\": ..., \"strategy\": ...}".into(),
        ));
    };
    let Some(Value::String(tenant)) = body
        .remove("tenant")
        .filter(|t| !matches!(t, Value::String(s) if s.is_empty()))
    else {
        return Err(bad("tenant: missing (a non-empty string)"));
    };
    let strategy = match body.remove("strategy") {
        Some(Value::String(s)) => crate::sync::Strategy::parse(&s).ok_or_else(|| {
            bad(&format!(
                "strategy: {s:?} is not server_wins, client_wins, last_writer_wins, field_merge or manual"
            ))
        })?,
        _ => return Err(bad("strategy: missing (a string)")),
    };
    app.store
        .set_sync_strategy(tenant.clone(), entity_type.clone(), strategy)
        .await?;
    tracing::info!(%tenant, %entity_type, strategy = strategy.as_str(), "sync strategy set");
    let mut answer = String::from("{\"tenant\": ");
    relais_wire::json::push_escaped(&mut answer, &tenant, false);
    answer.push_str(", \"entity_type\": ");
    relais_wire::json::push_escaped(&mut answer, &entity_type, false);
    answer.push_str(&format!(", \"strategy\": \"{}\"}}", strategy.as_str()));
    Ok(json_response(StatusCode::OK, &answer))
}

async fn create_site<S: Store>(State(app): State<App<S>>, body: Bytes) -> Result<Response, Error> {
    let (fields, token) = input::new_site(text(&body)?)?;
    let token = match token {
        Some(token) => token,
        None => tokens::generate().map_err(Error::Internal)?,
    };
    let new = NewSite {
        fields,
        token_sha256: tokens::sha256_hex(&token),
    };
    let site = app
        .store
        .create_site(new)
        .await?
        .map_err(|r| site_refused(r, None))?;
    tracing::info!(site = site.id, name = %site.fields.name, "site created");
    // The one answer that carries the token: only its hash is stored.
    Ok(json_response(
        StatusCode::CREATED,
        &site_config::site_json(&site, Some(&token)),
    ))
}

async fn sites<S: Store>(State(app): State<App<S>>) -> Result<Response, Error> {
    let sites = app.store.sites().await?;
    Ok(json_response(
        StatusCode::OK,
        &site_config::list_json(&sites, |s| site_config::site_json(s, None)),
    ))
}

async fn site<S: Store>(
    State(app): State<App<S>>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let id = site_id(&id)?;
    let site = app
        .store
        .site(id)
        .await?
        .map_err(|r| site_refused(r, Some(id)))?;
    Ok(json_response(
        StatusCode::OK,
        &site_config::site_json(&site, None),
    ))
}

async fn update_site<S: Store>(
    State(app): State<App<S>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    let id = site_id(&id)?;
    let patch = input::site_patch(text(&body)?)?;
    let site = app
        .store
        .update_site(id, patch)
        .await?
        .map_err(|r| site_refused(r, Some(id)))?;
    Ok(json_response(
        StatusCode::OK,
        &site_config::site_json(&site, None),
    ))
}

async fn delete_site<S: Store>(
    State(app): State<App<S>>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let id = site_id(&id)?;
    app.store
        .delete_site(id)
        .await?
        .map_err(|r| site_refused(r, Some(id)))?;
    tracing::info!(site = id, "site deleted with its devices");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn create_device<S: Store>(
    State(app): State<App<S>>,
    body: Bytes,
) -> Result<Response, Error> {
    let new = input::new_device(text(&body)?)?;
    let site_id = new.site_id;
    let device = app
        .store
        .create_device(new)
        .await?
        .map_err(|r| device_refused(r, None, Some(site_id)))?;
    Ok(json_response(
        StatusCode::CREATED,
        &site_config::device_json(&device),
    ))
}

/// `GET /admin/devices`, or `?site_id=N` for one site's.
async fn devices<S: Store>(
    State(app): State<App<S>>,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    let site_id = match query_member(query.as_deref(), "site_id") {
        None => None,
        Some(value) => Some(value.parse::<i64>().map_err(|_| Invalid {
            field: "site_id".into(),
            detail: "devices.site_id: the query's site_id must be a whole number".into(),
        })?),
    };
    let devices = app.store.devices(site_id).await?;
    Ok(json_response(
        StatusCode::OK,
        &site_config::list_json(&devices, site_config::device_json),
    ))
}

async fn device<S: Store>(
    State(app): State<App<S>>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let id = device_id(&id)?;
    let device = app
        .store
        .device(id)
        .await?
        .map_err(|r| device_refused(r, Some(id), None))?;
    Ok(json_response(
        StatusCode::OK,
        &site_config::device_json(&device),
    ))
}

async fn update_device<S: Store>(
    State(app): State<App<S>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    let id = device_id(&id)?;
    let patch = input::device_patch(text(&body)?)?;
    let device = app
        .store
        .update_device(id, patch)
        .await?
        .map_err(|r| device_refused(r, Some(id), None))?;
    Ok(json_response(
        StatusCode::OK,
        &site_config::device_json(&device),
    ))
}

async fn delete_device<S: Store>(
    State(app): State<App<S>>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let id = device_id(&id)?;
    app.store
        .delete_device(id)
        .await?
        .map_err(|r| device_refused(r, Some(id), None))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn text(body: &Bytes) -> Result<&str, Error> {
    std::str::from_utf8(body).map_err(|_| Error::BadRequest("body: not UTF-8".into()))
}

/// A path id that is not a number names no row.
fn site_id(id: &str) -> Result<i64, Error> {
    id.parse()
        .map_err(|_| Error::NotFound(format!("admin: no site with id {id:?}")))
}

fn device_id(id: &str) -> Result<i64, Error> {
    id.parse()
        .map_err(|_| Error::NotFound(format!("admin: no device with id {id:?}")))
}

fn site_refused(refused: Refused, id: Option<i64>) -> Error {
    match refused {
        Refused::Duplicate => {
            Error::Conflict("sites.token: another site already has this token".into())
        }
        Refused::NotFound | Refused::UnknownSite => {
            Error::NotFound(format!("admin: no site with id {}", id.unwrap_or_default()))
        }
    }
}

fn device_refused(refused: Refused, id: Option<i64>, site_id: Option<i64>) -> Error {
    match refused {
        Refused::Duplicate => {
            Error::Conflict("devices.ip: the site already has a device with this IP address".into())
        }
        Refused::NotFound => Error::NotFound(format!(
            "admin: no device with id {}",
            id.unwrap_or_default()
        )),
        Refused::UnknownSite => Error::Invalid(Invalid {
            field: "site_id".into(),
            detail: format!(
                "devices.site_id: no site with id {}",
                site_id.unwrap_or_default()
            ),
        }),
    }
}

/// The value of `name` in a query string (no percent-decoding: the admin API's
/// query members are numbers).
fn query_member<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}
