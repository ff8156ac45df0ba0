//! The HTTP layer: the router, its layers (body size limit, request timeout, tracing,
//! JSON errors), and serving with a bounded graceful shutdown. Handlers are thin: they
//! read the request, call the media directory and the store, and map the outcome.

mod error;
mod health;
mod push;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::config::Config;
use crate::media::MediaDir;
use crate::store::Store;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct App<S> {
    pub store: S,
    pub media: MediaDir,
}

pub fn router<S: Store>(app: App<S>, config: &Config) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready::<S>))
        .route("/api/{name}", post(push::push::<S>))
        .fallback(not_found)
        .with_state(app)
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(
            TraceLayer::new_for_http()
                // The path only: a query string or a header may carry a secret.
                .make_span_with(|req: &Request<Body>| {
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path())
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
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
/// requests in flight finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    grace: Duration,
    stop: impl Future<Output = Result<(), String>>,
) -> Result<(), String> {
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    let mut server = tokio::spawn(async move { server.await });
    tokio::select! {
        done = &mut server => return finished(done),
        stopped = stop => stopped?,
    }
    tracing::info!(
        "shutting down: no new connections, requests in flight get {}s to finish",
        grace.as_secs()
    );
    let _ = stop_tx.send(true);
    match tokio::time::timeout(grace, &mut server).await {
        Ok(done) => finished(done),
        Err(_) => {
            server.abort();
            Err(format!(
                "shutdown: requests still in flight after {}s (--shutdown-grace-s), abandoned",
                grace.as_secs()
            ))
        }
    }
}

fn finished(done: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), String> {
    match done {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("serve: {e}")),
        Err(e) => Err(format!("serve: {e}")),
    }
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
