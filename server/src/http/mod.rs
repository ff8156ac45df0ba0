//! The HTTP layer: the router, its layers (metrics, tracing, JSON errors, access,
//! request timeout, body size limit) over the API's routes and the console's
//! ([`crate::console`]), and serving ([`accept`]: connection limits and a
//! bounded graceful shutdown). Handlers are thin: they read the request, call the media
//! directory and the store, and map the outcome.

pub mod accept;
mod admin;
pub(crate) mod auth;
pub mod batch;
mod config_pull;
mod error;
mod health;
mod heartbeat;
mod push;
mod sync;
pub mod uploads;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::{get, head, post};
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::media::MediaDir;
use crate::metrics::{self, Metrics};
use crate::store::Store;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App<S> {
    pub store: S,
    pub media: MediaDir,
    /// Uploads this server's expiry task removed ([`uploads::expire_every`]), for
    /// `/metrics`.
    pub uploads_expired: Arc<AtomicU64>,
}

impl<S> App<S> {
    pub fn new(store: S, media: MediaDir) -> App<S> {
        App {
            store,
            media,
            uploads_expired: Arc::default(),
        }
    }
}

pub fn router<S: Store>(app: App<S>, config: &Config) -> Router {
    let metrics = Arc::new(Metrics::new(
        app.store.commit_counts(),
        Arc::clone(&app.uploads_expired),
    ));
    let tokens = Arc::new(auth::TokenCache::new(config.token_cache));
    let gate = auth::Gate {
        store: app.store.clone(),
        open: config.no_auth,
        cache: Arc::clone(&tokens),
    };
    let console = crate::console::Console {
        app: app.clone(),
        tokens,
        secure_cookie: config.console_secure_cookie,
        late_floor_s: i64::try_from(config.console_late_floor.as_secs()).unwrap_or(i64::MAX),
    };
    let batches = batch::Batches {
        app: app.clone(),
        limits: config.batch,
    };
    let uploads = uploads::Uploads {
        app: app.clone(),
        limits: config.uploads,
        lease: config.request_timeout,
    };
    let syncs = sync::Syncs {
        app: app.clone(),
        max_bytes: config.batch.max_bytes,
        hub: Arc::default(),
    };
    let capabilities = batch::Capabilities {
        batch: config.batch,
        uploads: config.uploads,
    };
    // `Router::layer` wraps every route (and the fallback) after routing, so each layer
    // sees the route template; the last added runs first.
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready::<S>))
        .route("/api/{name}", post(push::push::<S>))
        .route(
            relais_wire::heartbeat::HEARTBEAT_PATH,
            post(heartbeat::heartbeat::<S>),
        )
        .route("/config/{site_token}", get(config_pull::config::<S>))
        .nest("/admin", admin::router::<S>())
        .fallback(not_found)
        .with_state(app)
        .merge(
            Router::new()
                .route("/api/batch", post(batch::batch::<S>))
                .with_state(batches),
        )
        .merge(
            Router::new()
                .route("/api/sync/up", post(sync::up::<S>))
                .route("/api/sync/down", post(sync::down::<S>))
                .with_state(syncs),
        )
        .merge(
            Router::new()
                .route("/api/capabilities", get(batch::capabilities))
                .with_state(capabilities),
        )
        .merge(
            Router::new()
                .route(
                    "/api/uploads",
                    post(uploads::create::<S>).options(uploads::options::<S>),
                )
                .route(
                    "/api/uploads/{id}",
                    head(uploads::head::<S>).patch(uploads::patch::<S>),
                )
                .with_state(uploads),
        )
        .merge(
            Router::new()
                .route("/metrics", get(metrics::render))
                .with_state(Arc::clone(&metrics)),
        )
        .merge(crate::console::router(console))
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(gate, auth::gate::<S>))
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(
            TraceLayer::new_for_http()
                // The route template only: a path may hold a token (`/config/{token}`),
                // a query string or a header too.
                .make_span_with(|req: &Request<Body>| {
                    tracing::info_span!("request", method = %req.method(), route = %metrics::route_of(req))
                })
                .on_response(log_answer),
        )
        .layer(axum::middleware::from_fn_with_state(metrics, metrics::track))
}

/// One line per answer: at `info` for a refusal or a failure, at `debug` for a success.
/// A fleet's servers answer thousands of pushes a second, more than the journal keeps
/// (journald's default limit is 10,000 lines per 30 s per service) and a fifth of a
/// push's CPU time; `/metrics` counts the successes (`RUST_LOG=debug` shows them).
fn log_answer<B>(answer: &axum::http::Response<B>, latency: Duration, _span: &tracing::Span) {
    let status = answer.status().as_u16();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if answer.status().is_client_error() || answer.status().is_server_error() {
        tracing::info!(status, latency_ms, "answered");
    } else {
        tracing::debug!(status, latency_ms, "answered");
    }
}

/// Unknown routes get their 404 once the request body is read (and dropped): hyper
/// closes a connection whose request body was left unread, without a `Connection:
/// close`, so a client's next request on it would fail (an agent with a wrong
/// `BACKEND_URL` prefix would never see its three 404s in a row).
async fn not_found(mut body: Body) -> error::Error {
    use http_body_util::BodyExt as _;
    // Streamed and bounded by the body size limit and the request timeout.
    while let Some(Ok(_)) = body.frame().await {}
    error::Error::Status(StatusCode::NOT_FOUND, "not found: no such endpoint".into())
}

/// Serves until `stop` completes (the binary passes [`shutdown_signal`]: SIGTERM or
/// SIGINT; an in-process server its own trigger), then stops accepting and lets the
/// requests in flight finish for up to `grace`; with the default [`accept::Limits`]
/// (the binary passes its flags' to [`accept::serve_with`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    grace: Duration,
    stop: impl Future<Output = Result<(), String>>,
) -> Result<(), String> {
    accept::serve_with(listener, router, accept::Limits::default(), grace, stop).await
}

/// Completes at the first SIGTERM or SIGINT.
pub async fn shutdown_signal() -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("signals: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("signals: {e}"))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
