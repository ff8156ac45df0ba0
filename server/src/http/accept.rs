//! The accept loop, in place of `axum::serve`, which exposes none of these limits:
//! hyper's HTTP/1 connection builder caps the request head's size and the time to send
//! it (hyper starts that timer whenever it waits for a request, so it is also the idle
//! limit of a kept-alive connection), a semaphore caps the connections served at once,
//! and on stop the listener is closed and the open connections drain.
//!
//! Beyond the cap, a connection is not accepted: it waits in the kernel's listen backlog
//! and is served as soon as a slot frees. That costs nothing per waiting client (no task,
//! no buffer), loses no request, and needs no retry from the agent; the header timeout
//! frees the slots that idle or slow clients hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Below this a client's ordinary headers would not fit.
pub const MIN_HEADER_BYTES: usize = 1024;
pub const HEADER_TIMEOUT_S: u64 = 30;
/// Under the usual soft limit of 1024 open files, leaving room for the store and the
/// media files.
pub const MAX_CONNECTIONS: usize = 512;

/// How often at most the "all slots taken" warning is repeated under sustained load.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);
/// Pause after an accept error that is not the client's (out of file descriptors), so
/// the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line and headers, in bytes: 431 (or the connection closed) above.
    pub max_header_bytes: usize,
    /// To send a request's head; also the longest idle time between requests.
    pub header_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    /// The command line's defaults.
    fn default() -> Limits {
        Limits {
            max_header_bytes: MAX_HEADER_BYTES,
            header_timeout: Duration::from_secs(HEADER_TIMEOUT_S),
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `stop` completes, then closes the
/// listener (new connections are refused) and lets the connections in flight finish
/// their requests for up to `grace`.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    grace: Duration,
    stop: impl Future<Output = Result<(), String>>,
) -> Result<(), String> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let drain = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    let mut warned_full: Option<Instant> = None;
    let stopped = loop {
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY) {
                    tracing::warn!(
                        "connections: all {} slots taken (--max-connections); new connections \
                         wait in the listen backlog",
                        limits.max_connections
                    );
                    warned_full = Some(Instant::now());
                }
                tokio::select! {
                    stopped = &mut stop => break stopped,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break Err("serve: the connection slots were closed".into()),
                    },
                }
            }
        };
        let stream = tokio::select! {
            stopped = &mut stop => break stopped,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = drain.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client gone, a header timeout, a head too large: the client's business.
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
            drop(slot);
        });
    };
    drop(listener);
    stopped?;
    tracing::info!(
        "shutting down: no new connections, requests in flight get {}s to finish",
        grace.as_secs()
    );
    tokio::time::timeout(grace, drain.shutdown())
        .await
        .map_err(|_| {
            format!(
                "shutdown: requests still in flight after {}s (--shutdown-grace-s), abandoned",
                grace.as_secs()
            )
        })
}

async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!("listen: cannot accept a connection: {e}");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}
