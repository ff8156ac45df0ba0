//! The counters behind `GET /metrics`, in Prometheus' text format (hand-written: thirteen
//! series do not justify a crate). [`track`] is a middleware on every route: it counts
//! requests by route template and status, times them, and counts the body bytes as the
//! handlers read them; handlers report what the middleware cannot see (a row stored, a
//! replay, a store failure) as an [`Outcome`] response extension; the store's group
//! commit keeps its own counters ([`crate::store::group_commit::Counts`]), read here.
//!
//! A route is its template (`/api/{name}`), never the request's path: a path may hold a
//! secret (`/config/{site_token}`), and a label per path would grow without bound. A
//! request that matched no route is `unmatched`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use crate::store::group_commit::Counts;

/// The route label of a request that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// Upper bounds of the latency histogram's buckets, in seconds: from a replay answered
/// from the index to a large media upload over a slow uplink.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];

/// What a handler tells the counters about its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new row was stored.
    Stored,
    /// A replay was answered with the original row.
    Replay,
    /// The store failed.
    StoreError,
    /// A batch was answered, each row with its own result.
    Batch(BatchRows),
    /// A resumable upload was created.
    UploadCreated,
    /// A resumable upload completed: its row stored (`true`) or replayed.
    UploadCompleted(bool),
    /// An agent's heartbeat was stored.
    Heartbeat,
}

/// A batch's rows by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchRows {
    pub stored: u64,
    pub replayed: u64,
    pub rejected: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    /// Updated as body chunks arrive, outside the lock.
    received_bytes: AtomicU64,
    /// The store's group commit.
    commits: Arc<Counts>,
    /// Kept by the uploads' expiry task.
    uploads_expired: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    rows_stored: u64,
    replays: u64,
    store_errors: u64,
    batches: u64,
    batch_rows_rejected: u64,
    uploads_created: u64,
    uploads_completed: u64,
    heartbeats: u64,
}

#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket, not cumulative; the last one is above every bound.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// The route template of `req`, or [`UNMATCHED`].
pub fn route_of<B>(req: &axum::http::Request<B>) -> &str {
    req.extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
}

impl Metrics {
    /// The counters of a server whose store's group commit counts in `commits` and
    /// whose expiry task counts in `uploads_expired`.
    pub fn new(commits: Arc<Counts>, uploads_expired: Arc<AtomicU64>) -> Metrics {
        Metrics {
            commits,
            uploads_expired,
            ..Metrics::default()
        }
    }

    /// A poisoned lock only means a thread panicked while adding to a counter.
    fn lock(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, route: &str, status: StatusCode, outcome: Option<Outcome>, took: Duration) {
        let mut c = self.lock();
        *c.requests
            .entry((route.to_string(), status.as_u16()))
            .or_default() += 1;
        let h = c.latency.entry(route.to_string()).or_default();
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(BUCKETS.len());
        h.counts[bucket] += 1;
        h.sum += secs;
        h.count += 1;
        match outcome {
            Some(Outcome::Stored) => c.rows_stored += 1,
            Some(Outcome::Replay) => c.replays += 1,
            Some(Outcome::StoreError) => c.store_errors += 1,
            Some(Outcome::Batch(rows)) => {
                c.batches += 1;
                c.rows_stored += rows.stored;
                c.replays += rows.replayed;
                c.batch_rows_rejected += rows.rejected;
            }
            Some(Outcome::UploadCreated) => c.uploads_created += 1,
            Some(Outcome::Heartbeat) => c.heartbeats += 1,
            Some(Outcome::UploadCompleted(stored)) => {
                c.uploads_completed += 1;
                if stored {
                    c.rows_stored += 1;
                } else {
                    c.replays += 1;
                }
            }
            None => {}
        }
    }

    /// The text exposition format, version 0.0.4.
    pub fn text(&self) -> String {
        let c = self.lock();
        let mut out = String::new();
        header_lines(
            &mut out,
            "relais_server_requests_total",
            "counter",
            "Requests answered, by route template and status.",
        );
        for ((route, status), n) in &c.requests {
            let _ = writeln!(
                out,
                "relais_server_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        header_lines(
            &mut out,
            "relais_server_request_duration_seconds",
            "histogram",
            "Time to answer a request (its upload included), by route template.",
        );
        for (route, h) in &c.latency {
            let route = escape(route);
            let mut cumulative = 0;
            for (i, n) in h.counts.iter().enumerate() {
                cumulative += n;
                let le = BUCKETS.get(i).map_or("+Inf".to_string(), f64::to_string);
                let _ = writeln!(
                    out,
                    "relais_server_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "relais_server_request_duration_seconds_sum{{route=\"{route}\"}} {}\n\
                 relais_server_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.sum, h.count
            );
        }
        let received = self.received_bytes.load(Ordering::Relaxed);
        for (name, help, value) in [
            (
                "relais_server_rows_stored_total",
                "Pushes stored as a new row, alone, in a batch or by a completed upload.",
                c.rows_stored,
            ),
            (
                "relais_server_replays_total",
                "Replays answered with the original row, alone or in a batch.",
                c.replays,
            ),
            (
                "relais_server_batches_total",
                "Batches answered 200, each row with its own result.",
                c.batches,
            ),
            (
                "relais_server_batch_rows_rejected_total",
                "Rows of those batches rejected with a 4xx result (stored and replayed rows are counted above).",
                c.batch_rows_rejected,
            ),
            (
                "relais_server_uploads_created_total",
                "Resumable uploads created (a repeated creation finding its upload is not counted).",
                c.uploads_created,
            ),
            (
                "relais_server_uploads_completed_total",
                "Resumable uploads completed and verified, their rows counted above as stored or replayed.",
                c.uploads_completed,
            ),
            (
                "relais_server_uploads_expired_total",
                "Resumable uploads this server removed once expired, with their partial files.",
                self.uploads_expired.load(Ordering::Relaxed),
            ),
            (
                "relais_server_heartbeats_total",
                "Agents' heartbeats stored.",
                c.heartbeats,
            ),
            (
                "relais_server_received_bytes_total",
                "Request body bytes received.",
                received,
            ),
            (
                "relais_server_store_errors_total",
                "Requests answered 503 because the store failed.",
                c.store_errors,
            ),
            (
                "relais_server_store_commits_total",
                "Transactions the group commit committed, each for a batch of pushes.",
                self.commits.commits(),
            ),
            (
                "relais_server_store_committed_pushes_total",
                "Pushes answered by those transactions; divided by the commits, the mean batch size.",
                self.commits.pushes(),
            ),
        ] {
            header_lines(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

fn header_lines(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Middleware: counts and times every request.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = route_of(&req).to_string();
    let started = Instant::now();
    let counter = Arc::clone(&metrics);
    let req = req.map(|body| {
        Body::new(body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                counter
                    .received_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        }))
    });
    let resp = next.run(req).await;
    let outcome = resp.extensions().get::<Outcome>().copied();
    metrics.record(&route, resp.status(), outcome, started.elapsed());
    resp
}

/// `GET /metrics`.
pub async fn render(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.text(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format() {
        let m = Metrics::default();
        m.record(
            "/api/{name}",
            StatusCode::CREATED,
            Some(Outcome::Stored),
            Duration::from_millis(20),
        );
        m.record(
            "/api/{name}",
            StatusCode::CREATED,
            Some(Outcome::Replay),
            Duration::from_secs(1000),
        );
        let text = m.text();
        assert!(
            text.contains("relais_server_requests_total{route=\"/api/{name}\",status=\"201\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("_bucket{route=\"/api/{name}\",le=\"0.01\"} 0\n"));
        assert!(text.contains("_bucket{route=\"/api/{name}\",le=\"0.025\"} 1\n"));
        assert!(text.contains("_bucket{route=\"/api/{name}\",le=\"600\"} 1\n"));
        assert!(text.contains("_bucket{route=\"/api/{name}\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("relais_server_rows_stored_total 1\n"));
        assert!(text.contains("relais_server_replays_total 1\n"));
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
