//! The fleet console (README, "Fleet console"): server-rendered HTML pages at `/` for
//! the people who run the fleet, no script at all. [`session`] is the access (login with
//! an admin token, the session cookie, CSRF); [`fleet`] the agents' table, [`device`]
//! one agent's charts, errors and media, [`sites`] seed 001's sites and equipment with
//! the admin API's validation, [`config_history`] the configuration as served (masked),
//! its versions and their diff; [`svg`] draws the charts, [`layout`] is the page shell,
//! the stylesheet and the headers every console answer carries, [`error`] the one
//! mapping of the console's failures to HTML answers.
//!
//! The console keeps no state of its own: sessions are rows of the store, so any server
//! of a fleet behind a balancer answers any request.

mod config_history;
mod device;
mod error;
mod fleet;
mod form;
mod layout;
mod session;
mod sites;
mod svg;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::http::App;
use crate::http::auth::TokenCache;
use crate::store::Store;

/// What the console's handlers share.
#[derive(Debug, Clone)]
pub struct Console<S> {
    pub app: App<S>,
    /// The auth gate's cache: a revoked admin token ends its sessions as soon as it
    /// stops opening the admin API.
    pub tokens: Arc<TokenCache>,
    /// `--console-secure-cookie`: cookies are `Secure` even when the request does not
    /// say it came over TLS (`X-Forwarded-Proto: https`).
    pub secure_cookie: bool,
    /// `--console-late-floor-s`: late never sooner than this ([`fleet::state`]).
    pub late_floor_s: i64,
}

pub fn router<S: Store>(console: Console<S>) -> Router {
    Router::new()
        .route("/", get(fleet::page::<S>))
        .route("/login", get(session::login_page).post(session::login::<S>))
        .route("/logout", post(session::logout::<S>))
        .route("/devices/{device_id}", get(device::page::<S>))
        .route("/sites", get(sites::list::<S>))
        .route("/sites/new", get(sites::new_form).post(sites::create::<S>))
        .route("/sites/{id}", get(sites::show::<S>))
        .route(
            "/sites/{id}/edit",
            get(sites::edit_form::<S>).post(sites::update::<S>),
        )
        .route("/sites/{id}/delete", post(sites::delete::<S>))
        .route(
            "/sites/{id}/equipment/new",
            get(sites::new_equipment_form::<S>).post(sites::create_equipment::<S>),
        )
        .route(
            "/equipment/{id}/edit",
            get(sites::edit_equipment_form::<S>).post(sites::update_equipment::<S>),
        )
        .route("/equipment/{id}/delete", post(sites::delete_equipment::<S>))
        .route("/sites/{id}/config/diff", get(config_history::diff::<S>))
        .route("/console.css", get(layout::stylesheet))
        .route("/favicon.ico", get(layout::favicon))
        .layer(axum::middleware::map_response(layout::headers))
        .with_state(console)
}
