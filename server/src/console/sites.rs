//! Seed 001's sites and their devices, called equipment here (the agents are the
//! fleet's devices): list, create, edit, delete. A form is turned into the JSON body the
//! admin API takes ([`super::form::body`]) and validated by the same
//! [`crate::site_config::input`] functions; an error is shown beside its field, the form
//! re-filled, nothing saved. Secrets never go back to the browser: an equipment's
//! `driver_config` is shown masked, and a mask sent back unchanged keeps the stored
//! secret ([`config_history::unmask`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use miniserde::json::{Number, Object, Value};

use super::Console;
use super::config_history;
use super::error::Error;
use super::form::{self, Form, Kind};
use super::layout;
use super::session::{LoggedIn, Posted};
use crate::site_config::input::{self, Invalid};
use crate::site_config::{self, DRIVERS, Device, NewSite, Site};
use crate::store::{Refused, Store};
use crate::tokens;

const SITE_FIELDS: &[(&str, Kind)] = &[
    ("name", Kind::Text),
    ("timezone", Kind::Text),
    ("doubt_after_days", Kind::Number),
    ("ok_interval_s", Kind::Number),
    ("ko_interval_s", Kind::Number),
];

const EQUIPMENT_FIELDS: &[(&str, Kind)] = &[
    ("ip", Kind::Text),
    ("name", Kind::Text),
    ("building", Kind::Text),
    ("floor", Kind::Text),
    ("room", Kind::Text),
    ("type", Kind::Text),
    ("driver", Kind::Text),
    ("driver_config", Kind::Json),
    ("expectations", Kind::Json),
];

/// The members whose text areas may hold secrets.
const SECRET_AREAS: &[&str] = &["driver_config", "expectations"];

/// A path id that is not a number names no row.
pub fn path_id(id: &str, what: &str) -> Result<i64, Error> {
    id.parse()
        .map_err(|_| Error::NotFound(format!("console: no {what} with id {id:?}")))
}

pub fn no_such(what: &str, id: i64) -> Error {
    Error::NotFound(format!("console: no {what} with id {id}"))
}

/// `GET /sites`.
pub async fn list<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
) -> Result<Markup, Error> {
    let store = &console.app.store;
    let sites = store.sites().await?;
    let equipment = store.devices(None).await?;
    let count = |site: i64| equipment.iter().filter(|d| d.site_id == site).count();
    Ok(layout::page(
        "Sites",
        &session.csrf,
        html! {
            h1 { "Sites" }
            p { a id="new-site" href="/sites/new" { "New site" } }
            div class="table-wrap" {
                table id="sites" {
                    thead { tr {
                        th { "Site" } th { "Time zone" } th class="num" { "Equipment" }
                        th { "Configuration" } th { "Changed" }
                    } }
                    tbody {
                        @for site in &sites {
                            tr data-site=(site.id) {
                                td { a href={ "/sites/" (site.id) } { (site.fields.name) } }
                                td { (site.fields.timezone) }
                                td class="num" { (count(site.id)) }
                                td { code { (layout::short(&site.config_version)) } }
                                td { (site.config_updated_at) }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// `GET /sites/new`.
pub async fn new_form(session: LoggedIn) -> Markup {
    let defaults: Form = [
        ("timezone", "UTC"),
        ("doubt_after_days", "2"),
        ("ok_interval_s", "300"),
        ("ko_interval_s", "60"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    site_form_page(&session, "New site", "/sites/new", &defaults, None)
}

/// `POST /sites/new`: the site, and its token shown this once.
pub async fn create<S: Store>(
    State(console): State<Console<S>>,
    posted: Posted,
) -> Result<Response, Error> {
    let Posted { session, form } = posted;
    let invalid = |e: Invalid| {
        Ok(refused(site_form_page(
            &session,
            "New site",
            "/sites/new",
            &form,
            Some(&e),
        )))
    };
    let fields =
        match form::body(&form, SITE_FIELDS, "sites").and_then(|b| input::new_site(&text(b))) {
            Ok((fields, _no_token_field)) => fields,
            Err(e) => return invalid(e),
        };
    let token = tokens::generate().map_err(Error::Internal)?;
    let new = NewSite {
        fields,
        token_sha256: tokens::sha256_hex(&token),
    };
    let site = match console.app.store.create_site(new).await? {
        Ok(site) => site,
        Err(_) => {
            return Err(Error::Internal(
                "console: a new site's random token collided with another site's".into(),
            ));
        }
    };
    tracing::info!(site = site.id, name = %site.fields.name, "console: site created");
    Ok(layout::page(
        "Site created",
        &session.csrf,
        html! {
            h1 { "Site created: " (site.fields.name) }
            div class="notice" {
                p { "The site's token, shown this once (only its hash is kept): the site's agents pull their configuration with it." }
                p { code id="site-token" class="token" { (token) } }
            }
            p { a href={ "/sites/" (site.id) } { "Go to the site" } }
        },
    )
    .into_response())
}

/// `GET /sites/{id}`: the site, its equipment, its configuration and history, and the
/// agents that pulled it.
pub async fn show<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
    Path(id): Path<String>,
) -> Result<Markup, Error> {
    let id = path_id(&id, "site")?;
    let store = &console.app.store;
    let site = store.site(id).await?.map_err(|_| no_such("site", id))?;
    let equipment = store.devices(Some(id)).await?;
    let fields: Vec<_> = equipment.iter().map(|d| d.fields.clone()).collect();
    let (hash, served) = site_config::served(&site.fields, &fields)
        .map_err(|e| Error::Internal(format!("console: site {id}: {e}")))?;
    let versions = store.config_versions(id).await?;
    let pulled = super::fleet::pulled(&console, id, &hash).await?;
    let f = &site.fields;
    Ok(layout::page(
        &f.name,
        &session.csrf,
        html! {
            p { a href="/sites" { "← Sites" } }
            h1 { (f.name) }
            dl {
                dt { "Time zone" } dd { (f.timezone) }
                dt { "Doubt after" } dd { (f.doubt_after_days) " day(s)" }
                dt { "Report every" } dd { (f.ok_interval_s) " s when ok, " (f.ko_interval_s) " s when not" }
            }
            p { a id="edit-site" href={ "/sites/" (id) "/edit" } { "Edit the site" } }
            h2 { "Equipment" }
            p { a id="new-equipment" href={ "/sites/" (id) "/equipment/new" } { "New equipment" } }
            div class="table-wrap" {
                table id="equipment" {
                    thead { tr {
                        th { "Name" } th { "IP" } th { "Where" } th { "Type" } th { "Driver" } th {}
                    } }
                    tbody {
                        @for d in &equipment {
                            tr data-equipment=(d.id) {
                                td { (d.fields.name) }
                                td { code { (d.fields.ip) } }
                                td { (d.fields.building) " " (d.fields.floor) " " (d.fields.room) }
                                td { (d.fields.kind) }
                                td { (d.fields.driver) }
                                td { a href={ "/equipment/" (d.id) "/edit" } { "Edit" } }
                            }
                        }
                    }
                }
            }
            (config_history::section(id, &served, &hash, &site.config_updated_at, &versions))
            (pulled)
            div class="danger" {
                form id="delete-site" method="post" action={ "/sites/" (id) "/delete" } {
                    input type="hidden" name="csrf" value=(session.csrf);
                    label { input type="checkbox" name="confirm" value="yes";
                        " Delete this site and its " (equipment.len()) " equipment" }
                    button type="submit" id="delete" { "Delete the site" }
                }
            }
        },
    ))
}

/// `GET /sites/{id}/edit`.
pub async fn edit_form<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
    Path(id): Path<String>,
) -> Result<Markup, Error> {
    let id = path_id(&id, "site")?;
    let site = console
        .app
        .store
        .site(id)
        .await?
        .map_err(|_| no_such("site", id))?;
    let action = format!("/sites/{id}/edit");
    Ok(site_form_page(
        &session,
        &format!("Edit {}", site.fields.name),
        &action,
        &site_values(&site),
        None,
    ))
}

/// `POST /sites/{id}/edit`.
pub async fn update<S: Store>(
    State(console): State<Console<S>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Result<Response, Error> {
    let id = path_id(&id, "site")?;
    let Posted { session, form } = posted;
    let action = format!("/sites/{id}/edit");
    let patch =
        match form::body(&form, SITE_FIELDS, "sites").and_then(|b| input::site_patch(&text(b))) {
            Ok(patch) => patch,
            Err(e) => {
                return Ok(refused(site_form_page(
                    &session,
                    "Edit site",
                    &action,
                    &form,
                    Some(&e),
                )));
            }
        };
    console
        .app
        .store
        .update_site(id, patch)
        .await?
        .map_err(|_| no_such("site", id))?;
    Ok(Redirect::to(&format!("/sites/{id}")).into_response())
}

/// `POST /sites/{id}/delete`, with its `confirm` box ticked.
pub async fn delete<S: Store>(
    State(console): State<Console<S>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Result<Response, Error> {
    let id = path_id(&id, "site")?;
    if posted.form.get("confirm") != Some("yes") {
        return Ok(unconfirmed(&posted.session, &format!("/sites/{id}")));
    }
    console
        .app
        .store
        .delete_site(id)
        .await?
        .map_err(|_| no_such("site", id))?;
    tracing::info!(site = id, "console: site deleted with its equipment");
    Ok(Redirect::to("/sites").into_response())
}

/// `GET /sites/{id}/equipment/new`.
pub async fn new_equipment_form<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
    Path(id): Path<String>,
) -> Result<Markup, Error> {
    let id = path_id(&id, "site")?;
    let site = console
        .app
        .store
        .site(id)
        .await?
        .map_err(|_| no_such("site", id))?;
    let defaults: Form = [("driver", "ping")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let action = format!("/sites/{id}/equipment/new");
    Ok(equipment_form_page(
        &session,
        &format!("New equipment on {}", site.fields.name),
        &action,
        id,
        &defaults,
        None,
    ))
}

/// `POST /sites/{id}/equipment/new`.
pub async fn create_equipment<S: Store>(
    State(console): State<Console<S>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Result<Response, Error> {
    let site_id = path_id(&id, "site")?;
    let Posted { session, form } = posted;
    let action = format!("/sites/{site_id}/equipment/new");
    let page = |e: &Invalid| {
        refused(equipment_form_page(
            &session,
            "New equipment",
            &action,
            site_id,
            &refill(&form),
            Some(e),
        ))
    };
    let new = equipment_body(&form, None).and_then(|mut body| {
        body.insert("site_id".into(), Value::Number(Number::I64(site_id)));
        input::new_device(&text(body))
    });
    let new = match new {
        Ok(new) => new,
        Err(e) => return Ok(page(&e)),
    };
    match console.app.store.create_device(new).await? {
        Ok(_) => Ok(Redirect::to(&format!("/sites/{site_id}")).into_response()),
        Err(Refused::Duplicate) => Ok(page(&duplicate_ip())),
        Err(_) => Err(no_such("site", site_id)),
    }
}

/// `GET /equipment/{id}/edit`, secrets masked.
pub async fn edit_equipment_form<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
    Path(id): Path<String>,
) -> Result<Markup, Error> {
    let id = path_id(&id, "equipment")?;
    let device = console
        .app
        .store
        .device(id)
        .await?
        .map_err(|_| no_such("equipment", id))?;
    let action = format!("/equipment/{id}/edit");
    Ok(equipment_edit_page(
        &session,
        &device,
        &action,
        &equipment_values(&device),
        None,
    ))
}

/// `POST /equipment/{id}/edit`: a mask sent back keeps the stored secret.
pub async fn update_equipment<S: Store>(
    State(console): State<Console<S>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Result<Response, Error> {
    let id = path_id(&id, "equipment")?;
    let Posted { session, form } = posted;
    let store = &console.app.store;
    let device = store
        .device(id)
        .await?
        .map_err(|_| no_such("equipment", id))?;
    let action = format!("/equipment/{id}/edit");
    let page = |e: &Invalid| {
        refused(equipment_edit_page(
            &session,
            &device,
            &action,
            &refill(&form),
            Some(e),
        ))
    };
    let patch =
        equipment_body(&form, Some(&device)).and_then(|body| input::device_patch(&text(body)));
    let patch = match patch {
        Ok(patch) => patch,
        Err(e) => return Ok(page(&e)),
    };
    match store.update_device(id, patch).await? {
        Ok(_) => Ok(Redirect::to(&format!("/sites/{}", device.site_id)).into_response()),
        Err(Refused::Duplicate) => Ok(page(&duplicate_ip())),
        Err(_) => Err(no_such("equipment", id)),
    }
}

/// `POST /equipment/{id}/delete`, with its `confirm` box ticked.
pub async fn delete_equipment<S: Store>(
    State(console): State<Console<S>>,
    Path(id): Path<String>,
    posted: Posted,
) -> Result<Response, Error> {
    let id = path_id(&id, "equipment")?;
    let store = &console.app.store;
    let device = store
        .device(id)
        .await?
        .map_err(|_| no_such("equipment", id))?;
    if posted.form.get("confirm") != Some("yes") {
        return Ok(unconfirmed(
            &posted.session,
            &format!("/equipment/{id}/edit"),
        ));
    }
    store
        .delete_device(id)
        .await?
        .map_err(|_| no_such("equipment", id))?;
    Ok(Redirect::to(&format!("/sites/{}", device.site_id)).into_response())
}

/// The admin API's body for an equipment form, the masks of its text areas replaced by
/// the stored secrets (`stored`: the equipment being edited).
fn equipment_body(form: &Form, stored: Option<&Device>) -> Result<Object, Invalid> {
    let mut body = form::body(form, EQUIPMENT_FIELDS, "devices")?;
    for &area in SECRET_AREAS {
        let old = stored.map(|d| match area {
            "driver_config" => Value::Object(d.fields.driver_config.clone()),
            _ => Value::Object(d.fields.expectations.clone()),
        });
        if let Some(value) = body.get_mut(area) {
            if !config_history::unmask(value, old.as_ref()) {
                return Err(Invalid {
                    field: area.into(),
                    detail: format!(
                        "devices.{area}: type the secrets shown as {} again (they are never sent back to the browser)",
                        config_history::MASK
                    ),
                });
            }
        }
    }
    Ok(body)
}

fn duplicate_ip() -> Invalid {
    Invalid {
        field: "ip".into(),
        detail: "devices.ip: the site already has equipment with this IP address".into(),
    }
}

fn text(body: Object) -> String {
    miniserde::json::to_string(&body)
}

/// A refused form: 422, as the admin API answers an invalid body.
fn refused(page: Markup) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, page).into_response()
}

fn unconfirmed(session: &LoggedIn, back: &str) -> Response {
    refused(layout::page(
        "Not deleted",
        &session.csrf,
        html! {
            h1 { "Nothing deleted" }
            p class="error" id="confirm-error" { "console: tick the box to confirm the deletion" }
            p { a href=(back) { "Back" } }
        },
    ))
}

/// The submitted form as it may be shown again: its text areas masked (or emptied when
/// they are not JSON, as a secret in them could not be masked).
fn refill(form: &Form) -> Form {
    EQUIPMENT_FIELDS
        .iter()
        .map(|&(name, kind)| {
            let raw = form.value(name);
            let shown = match (kind, miniserde::json::from_str::<Value>(raw)) {
                (Kind::Json, Ok(value)) => config_history::pretty(&config_history::mask(&value)),
                (Kind::Json, Err(_)) => String::new(),
                _ => raw.to_string(),
            };
            (name.to_string(), shown)
        })
        .collect()
}

fn site_values(site: &Site) -> Form {
    let f = &site.fields;
    [
        ("name", f.name.clone()),
        ("timezone", f.timezone.clone()),
        ("doubt_after_days", f.doubt_after_days.to_string()),
        ("ok_interval_s", f.ok_interval_s.to_string()),
        ("ko_interval_s", f.ko_interval_s.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn equipment_values(device: &Device) -> Form {
    let f = &device.fields;
    [
        ("ip", f.ip.clone()),
        ("name", f.name.clone()),
        ("building", f.building.clone()),
        ("floor", f.floor.clone()),
        ("room", f.room.clone()),
        ("type", f.kind.clone()),
        ("driver", f.driver.clone()),
        (
            "driver_config",
            config_history::masked_object(&f.driver_config),
        ),
        (
            "expectations",
            config_history::masked_object(&f.expectations),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The error beside `field`, if it is this field's.
fn field_error(error: Option<&Invalid>, field: &str) -> Markup {
    html! {
        @if let Some(e) = error.filter(|e| form::field_of(e) == field) {
            p class="field-error" data-field=(field) { (e.detail) }
        }
    }
}

/// An error naming no field of the form, shown above it.
fn form_error(error: Option<&Invalid>, fields: &[(&str, Kind)]) -> Markup {
    html! {
        @if let Some(e) = error.filter(|e| !fields.iter().any(|(f, _)| *f == form::field_of(e))) {
            p class="error" id="form-error" { (e.detail) }
        }
    }
}

fn input_field(
    form: &Form,
    error: Option<&Invalid>,
    name: &str,
    label: &str,
    kind: Kind,
) -> Markup {
    html! {
        label for=(name) { (label) }
        @match kind {
            Kind::Json => textarea name=(name) id=(name) spellcheck="false" { (form.value(name)) },
            Kind::Number => input type="text" inputmode="numeric" name=(name) id=(name) value=(form.value(name));,
            Kind::Text => input type="text" name=(name) id=(name) value=(form.value(name));,
        }
        (field_error(error, name))
    }
}

fn site_form_page(
    session: &LoggedIn,
    title: &str,
    action: &str,
    form: &Form,
    error: Option<&Invalid>,
) -> Markup {
    let labels = [
        "Name",
        "Time zone (IANA, e.g. Europe/Paris)",
        "Doubt after (days)",
        "Report interval when ok (s)",
        "Report interval when not ok (s)",
    ];
    layout::page(
        title,
        &session.csrf,
        html! {
            p { a href="/sites" { "← Sites" } }
            h1 { (title) }
            (form_error(error, SITE_FIELDS))
            form id="site-form" method="post" action=(action) {
                input type="hidden" name="csrf" value=(session.csrf);
                @for (&(name, kind), label) in SITE_FIELDS.iter().zip(labels) {
                    (input_field(form, error, name, label, kind))
                }
                p { button type="submit" id="save" { "Save" } }
            }
        },
    )
}

fn equipment_form_page(
    session: &LoggedIn,
    title: &str,
    action: &str,
    site_id: i64,
    form: &Form,
    error: Option<&Invalid>,
) -> Markup {
    layout::page(
        title,
        &session.csrf,
        html! {
            p { a href={ "/sites/" (site_id) } { "← Site" } }
            h1 { (title) }
            (equipment_form(session, action, form, error))
        },
    )
}

fn equipment_edit_page(
    session: &LoggedIn,
    device: &Device,
    action: &str,
    form: &Form,
    error: Option<&Invalid>,
) -> Markup {
    layout::page(
        &format!("Edit {}", device.fields.name),
        &session.csrf,
        html! {
            p { a href={ "/sites/" (device.site_id) } { "← Site" } }
            h1 { "Edit " (device.fields.name) }
            (equipment_form(session, action, form, error))
            div class="danger" {
                form id="delete-equipment" method="post" action={ "/equipment/" (device.id) "/delete" } {
                    input type="hidden" name="csrf" value=(session.csrf);
                    label { input type="checkbox" name="confirm" value="yes"; " Delete this equipment" }
                    button type="submit" id="delete" { "Delete the equipment" }
                }
            }
        },
    )
}

fn equipment_form(
    session: &LoggedIn,
    action: &str,
    form: &Form,
    error: Option<&Invalid>,
) -> Markup {
    let driver = form.value("driver");
    html! {
        (form_error(error, EQUIPMENT_FIELDS))
        form id="equipment-form" method="post" action=(action) {
            input type="hidden" name="csrf" value=(session.csrf);
            (input_field(form, error, "ip", "IP address", Kind::Text))
            (input_field(form, error, "name", "Name", Kind::Text))
            (input_field(form, error, "building", "Building", Kind::Text))
            (input_field(form, error, "floor", "Floor", Kind::Text))
            (input_field(form, error, "room", "Room", Kind::Text))
            (input_field(form, error, "type", "Type (projector, display, ...)", Kind::Text))
            label for="driver" { "Driver" }
            select name="driver" id="driver" {
                @for d in DRIVERS {
                    option value=(d) selected[*d == driver] { (d) }
                }
                @if !DRIVERS.contains(&driver) {
                    option value=(driver) selected { (driver) }
                }
            }
            (field_error(error, "driver"))
            (input_field(form, error, "driver_config", "Driver configuration (JSON: {\"pjlink\": {...}} or {\"snmp\": {...}})", Kind::Json))
            p class="muted" { "Secrets show as " (config_history::MASK) "; leave them so to keep the stored ones." }
            (input_field(form, error, "expectations", "Expectations (JSON: always_on, alert_after_s, schedule)", Kind::Json))
            p { button type="submit" id="save" { "Save" } }
        }
    }
}
