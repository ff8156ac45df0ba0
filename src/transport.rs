//! Talking to the backend: one ureq agent (connection reuse, rustls, the timeouts of
//! [`crate::tcp_transport`], `User-Agent: relais/<version>`), the contract's request
//! headers, and the classification of every answer into stored, transient or rejected.

use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use miniserde::json::{Number, Value as Json};
use rusqlite::types::Value;
use ureq::Timeout;
use ureq::http::Method;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{ConnectProxyConnector, Connector, RustlsConnector};

use crate::clock::human_duration;
use crate::settings::HttpSettings;
use crate::tcp_transport::{Deadline, Limits, NEVER, TcpConnector};

/// Largest response body relais reads from a push answer; the `id` is near the start.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// Largest answer to a batch: a result of a few dozen bytes per row, 500 rows at most.
const MAX_BATCH_ANSWER_BYTES: u64 = 1 << 20;

pub const USER_AGENT: &str = concat!("relais/", env!("CARGO_PKG_VERSION"));

/// What became of one upload.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Any 2xx: the backend has the row. `remote_id` is the answer's `id`, when there is one;
    /// `html` says the answer was an HTML page (a captive portal or a proxy may answer so).
    Stored {
        remote_id: Option<Value>,
        html: bool,
    },
    /// Worth retrying soon: network failure, timeout, 408, 429, 5xx, or credentials the
    /// backend refused (fixing the token must not wait for the hourly retry).
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The backend refused this row (other 4xx, and redirects, which are not followed):
    /// retried on the slow clock, unless [`crate::rejections`] finds the URL at fault.
    /// `location` is a redirect's `Location`, shortened and redacted.
    Rejected {
        status: u16,
        reason: String,
        location: Option<String>,
    },
}

/// The backend cannot be used at all (bad CA file).
#[derive(Debug)]
pub struct TransportError(String);

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "transport: {}", self.0)
    }
}

impl std::error::Error for TransportError {}

pub struct Transport {
    agent: ureq::Agent,
    base_url: String,
    bearer: Option<String>,
    connect_timeout: Duration,
    limits: Limits,
    /// The end of the [`Transport::get`] in progress.
    deadline: Deadline,
}

/// An answer to a request of the upload protocol ([`Transport::exchange`]).
#[derive(Debug)]
pub struct Exchanged {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    /// The answer judged as a push's would be (the id of a JSON body, a 5xx transient).
    pub outcome: Outcome,
}

/// A GET answer, for the configuration pull.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub etag: Option<String>,
    pub retry_after: Option<Duration>,
    /// The body, or `None` when it exceeded the size cap.
    pub body: Option<Vec<u8>>,
}

impl Transport {
    pub fn new(http: &HttpSettings) -> Result<Transport, TransportError> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(USER_AGENT)
            // A redirected POST would lose its streamed body; a redirect is a misconfigured URL.
            .max_redirects(0)
            // Covers the TLS handshake too; the other timeouts are the TCP transport's.
            .timeout_connect(Some(http.connect_timeout))
            .timeout_recv_response(Some(NEVER))
            // One kept-alive connection per upload in flight (ureq keeps 3 by default).
            .max_idle_connections(http.in_flight.max(3))
            .max_idle_connections_per_host(http.in_flight.max(3));
        if let Some(ca) = &http.ca_file {
            config = config.tls_config(TlsConfig::builder().root_certs(load_ca(ca)?).build());
        }
        let limits = Limits {
            io: http.io_timeout,
            response: http.response_timeout,
        };
        // ureq's default chain with its TCP connector replaced: a CONNECT proxy from the
        // environment, then TCP, then rustls for https (with the CA file's roots).
        let deadline = Deadline::default();
        let connector = ConnectProxyConnector::default()
            .chain(TcpConnector(limits, deadline.clone()))
            .chain(RustlsConnector::default());
        Ok(Transport {
            agent: ureq::Agent::with_parts(config.build(), connector, DefaultResolver::default()),
            base_url: http.backend_url.clone(),
            bearer: http.bearer_token.clone(),
            connect_timeout: http.connect_timeout,
            limits,
            deadline,
        })
    }

    /// POSTs a JSON body of exactly `len` bytes read from `body` (never chunked: many
    /// Python backends refuse chunked requests).
    pub fn post(
        &self,
        endpoint: &str,
        idempotency_key: &str,
        len: u64,
        body: &mut dyn Read,
    ) -> Outcome {
        let mut req = self
            .agent
            .post(format!("{}{endpoint}", self.base_url))
            .header("Content-Type", "application/json")
            .header("Content-Length", len.to_string())
            .header(relais_wire::IDEMPOTENCY_KEY_HEADER, idempotency_key);
        if let Some(token) = &self.bearer {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        match req.send(ureq::SendBody::from_reader(body)) {
            Ok(resp) => classify_answer(resp),
            Err(e) => Outcome::Transient {
                reason: self.describe(&e, "the upload"),
                retry_after: None,
            },
        }
    }

    /// Sends `method` (HEAD, PATCH, else POST) to `path` (under the backend's URL, or
    /// an absolute URL the backend gave) with `headers` and a body of exactly `len`
    /// bytes from `body`, if any. `Err`: no answer (the sentence says why), transient.
    pub fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(u64, &mut dyn Read)>,
    ) -> Result<Exchanged, String> {
        let url = if path.starts_with('/') {
            format!("{}{path}", self.base_url)
        } else {
            path.to_string()
        };
        let bearer = self.bearer.as_ref().map(|token| format!("Bearer {token}"));
        let auth = bearer.as_deref().map(|b| ("Authorization", b));
        let headers = headers.iter().copied().chain(auth);
        let sent = match (method, body) {
            (Method::HEAD, _) => {
                let req = headers.fold(self.agent.head(url), |r, (n, v)| r.header(n, v));
                req.call()
            }
            (method, body) => {
                let req = match method {
                    Method::PATCH => self.agent.patch(url),
                    _ => self.agent.post(url),
                };
                let req = headers.fold(req, |r, (n, v)| r.header(n, v));
                match body {
                    Some((len, reader)) => req
                        .header("Content-Length", len.to_string())
                        .send(ureq::SendBody::from_reader(reader)),
                    None => req.header("Content-Length", "0").send_empty(),
                }
            }
        };
        let resp = sent.map_err(|e| self.describe(&e, "the upload"))?;
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        Ok(Exchanged {
            status,
            headers,
            outcome: classify_answer(resp),
        })
    }

    /// POSTs a batch `body` (gzip-compressed when `gzip`) to `path`: each row's outcome
    /// from a `200` answer, in order, or the whole batch's outcome: transient as a push
    /// would be (the rows are tried again), or rejected (the endpoint does not take this
    /// batch: its rows go one by one).
    pub fn post_batch(
        &self,
        path: &str,
        body: &[u8],
        gzip: bool,
        rows: usize,
    ) -> Result<Vec<Outcome>, Outcome> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base_url))
            .header("Content-Type", "application/json")
            // relais-server gzips the results (30-odd bytes a row), else they come plain.
            .header("Accept-Encoding", "gzip");
        if gzip {
            req = req.header("Content-Encoding", "gzip");
        }
        if let Some(token) = &self.bearer {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        let mut resp = match req.send(body) {
            Ok(resp) => resp,
            Err(e) => {
                return Err(Outcome::Transient {
                    reason: self.describe(&e, "the batch upload"),
                    retry_after: None,
                });
            }
        };
        if !resp.status().is_success() {
            return Err(classify_answer(resp));
        }
        let gzipped = resp
            .headers()
            .get("Content-Encoding")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
        let mut answer = Vec::new();
        let mut sent = resp.body_mut().as_reader().take(MAX_BATCH_ANSWER_BYTES);
        // The bound holds for the decompressed bytes too: a gzip bomb stops there.
        let read = if gzipped {
            flate2::read::GzDecoder::new(sent)
                .take(MAX_BATCH_ANSWER_BYTES)
                .read_to_end(&mut answer)
        } else {
            sent.read_to_end(&mut answer)
        };
        // Stored, but which rows? Each one is sent again, and answered as a replay.
        let unreadable = |why: String| Outcome::Transient {
            reason: format!("the batch answer could not be read ({why}): its rows are sent again"),
            retry_after: None,
        };
        if let Err(e) = read {
            return Err(unreadable(e.to_string()));
        }
        crate::batch::outcomes(&answer, rows).ok_or_else(|| {
            unreadable(format!(
                "not the results of {rows} rows{}",
                server_detail(&answer)
            ))
        })
    }

    /// GETs `path`, reading at most `max_bytes` of body. The whole exchange (name
    /// lookup, connection, request, answer and body) is cut after `within`, however
    /// the bytes trickle in.
    pub fn get(
        &self,
        path: &str,
        if_none_match: Option<&str>,
        max_bytes: u64,
        within: Duration,
    ) -> Result<Fetched, String> {
        let deadline = Instant::now() + within;
        self.deadline.set(Some(deadline));
        let fetched = self.get_by(path, if_none_match, max_bytes, within);
        self.deadline.set(None);
        // Whatever phase was cut, the cause is the deadline.
        fetched.map_err(|e| {
            if Instant::now() >= deadline {
                format!(
                    "the exchange with the backend did not end within {} (config_pull_timeout_s): cut",
                    human_duration(within)
                )
            } else {
                e
            }
        })
    }

    fn get_by(
        &self,
        path: &str,
        if_none_match: Option<&str>,
        max_bytes: u64,
        within: Duration,
    ) -> Result<Fetched, String> {
        let mut req = self
            .agent
            .get(format!("{}{path}", self.base_url))
            .header("Accept", "application/json")
            // The name lookup is not the transport's: ureq's own budget for that phase.
            .config()
            .timeout_resolve(Some(within))
            .build();
        if let Some(tag) = if_none_match {
            req = req.header("If-None-Match", format!("\"{tag}\""));
        }
        if let Some(token) = &self.bearer {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        let mut resp = req.call().map_err(|e| self.describe(&e, "the request"))?;
        let status = resp.status().as_u16();
        let etag = header(&resp, "etag").map(|t| t.trim_matches('"').to_string());
        let retry_after = retry_after(&resp);
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(max_bytes + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("reading the answer: {e}"))?;
        let body = if body.len() as u64 > max_bytes {
            None
        } else {
            Some(body)
        };
        Ok(Fetched {
            status,
            etag,
            retry_after,
            body,
        })
    }
}

fn load_ca(path: &std::path::Path) -> Result<RootCerts, TransportError> {
    let pem = std::fs::read(path)
        .map_err(|e| TransportError(format!("cannot read CA file {}: {e}", path.display())))?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(TransportError(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(RootCerts::new_with_certs(&certs))
}

fn header<'a>(resp: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `Retry-After`, in seconds or as an HTTP date (against the answer's `Date`).
fn retry_after(resp: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    crate::clock::retry_after(header(resp, "retry-after")?, header(resp, "date"))
}

fn classify_answer(mut resp: ureq::http::Response<ureq::Body>) -> Outcome {
    let mut body = Vec::new();
    // A failure to read the answer of a 2xx still means the backend stored the row.
    let _ = resp
        .body_mut()
        .as_reader()
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut body);
    let location = header(&resp, "location")
        .map(|l| crate::redact::redact(&l.chars().take(300).collect::<String>()));
    let answer = Answer {
        status: resp.status().as_u16(),
        retry: retry_after(&resp),
        html: is_html(header(&resp, "content-type"), &body),
        body: &body,
        location,
    };
    classify(answer)
}

/// What [`classify`] judges an upload by: an HTTP answer, or one row's result in a
/// batch answer (its `code`, and its own JSON for a body).
pub struct Answer<'a> {
    pub status: u16,
    pub retry: Option<Duration>,
    pub html: bool,
    pub body: &'a [u8],
    pub location: Option<String>,
}

/// What became of an upload, from its answer.
pub fn classify(answer: Answer) -> Outcome {
    let Answer {
        status,
        retry,
        html,
        body,
        location,
    } = answer;
    match status {
        200..=299 => Outcome::Stored {
            remote_id: answer_id(&String::from_utf8_lossy(body)),
            html,
        },
        401 | 403 => Outcome::Transient {
            reason: format!(
                "the backend refused the credentials ({status}): check the bearer token"
            ),
            retry_after: retry,
        },
        408 | 429 | 500..=599 => Outcome::Transient {
            reason: format!("the backend answered {status}{}", server_detail(body)),
            retry_after: retry,
        },
        300..=399 => Outcome::Rejected {
            status,
            reason: format!(
                "the backend answered {status}, a redirect to {}, which relais does not follow",
                location
                    .as_deref()
                    .unwrap_or("nowhere (no Location header)")
            ),
            location,
        },
        _ => Outcome::Rejected {
            status,
            reason: format!(
                "the backend rejected the row with {status}{}",
                server_detail(body)
            ),
            location: None,
        },
    }
}

/// An HTML page rather than an API's answer: `text/html`, or a body that opens a tag.
fn is_html(content_type: Option<&str>, body: &[u8]) -> bool {
    content_type.is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("text/html"))
        || body.trim_ascii_start().starts_with(b"<")
}

/// The `id` of a JSON answer, when the answer is a JSON object that has one.
fn answer_id(text: &str) -> Option<Value> {
    let Ok(Json::Object(obj)) = miniserde::json::from_str::<Json>(text) else {
        return None;
    };
    match obj.get("id")? {
        Json::Number(Number::U64(n)) => i64::try_from(*n).ok().map(Value::Integer),
        Json::Number(Number::I64(n)) => Some(Value::Integer(*n)),
        Json::String(s) => Some(Value::Text(s.clone())),
        _ => None,
    }
}

/// The server's explanation, as `": <text>"` (empty when there is none): FastAPI's
/// `detail` when present, else the start of the body; one line, short, redacted.
pub fn server_detail(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let explained = match miniserde::json::from_str::<Json>(&text) {
        Ok(Json::Object(obj)) => match obj.get("detail") {
            Some(Json::String(s)) => s.clone(),
            Some(other) => miniserde::json::to_string(other),
            None => text.into_owned(),
        },
        _ => text.into_owned(),
    };
    let words: Vec<&str> = explained.split_whitespace().collect();
    if words.is_empty() {
        return String::new();
    }
    let short: String = words.join(" ").chars().take(300).collect();
    format!(": {}", crate::redact::redact(&short))
}

impl Transport {
    /// An operator-readable sentence for a failed exchange; `sent` names what was sent.
    fn describe(&self, e: &ureq::Error, sent: &str) -> String {
        match e {
            ureq::Error::Timeout(t) => self.describe_timeout(*t, sent),
            other => describe_error(other),
        }
    }

    fn describe_timeout(&self, t: Timeout, sent: &str) -> String {
        let io = human_duration(self.limits.io);
        match t {
            Timeout::Connect => format!(
                "cannot connect to the backend within {} (server down or network unreachable)",
                human_duration(self.connect_timeout)
            ),
            Timeout::PerWrite => {
                format!("{sent} stalled: nothing reached the backend for {io}")
            }
            Timeout::RecvResponse => format!(
                "the backend did not answer in time (nothing within {} after {sent})",
                human_duration(self.limits.response)
            ),
            Timeout::PerRead => format!("the backend's answer stalled: nothing came for {io}"),
            other => format!("the backend did not answer in time ({other})"),
        }
    }
}

/// An operator-readable sentence for a failed exchange other than a timeout.
fn describe_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::HostNotFound => {
            "the backend's host name does not resolve (DNS or network down)".into()
        }
        ureq::Error::ConnectionFailed => {
            "cannot connect to the backend (server down or network unreachable)".into()
        }
        ureq::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "cannot connect to the backend: connection refused (server down?)".into()
            }
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => {
                format!("the backend closed the connection mid-exchange ({io})")
            }
            _ => format!("network error: {io}"),
        },
        other => format!("exchange with the backend failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ids_and_details() {
        assert_eq!(
            answer_id(r#"{"id": 123, "message": "ok"}"#),
            Some(Value::Integer(123))
        );
        assert_eq!(
            answer_id(r#"{"id": "a-1"}"#),
            Some(Value::Text("a-1".into()))
        );
        assert_eq!(answer_id("<html>ok</html>"), None);
        assert_eq!(answer_id(r#"{"message": "no id"}"#), None);
        assert_eq!(
            server_detail(br#"{"detail": "video too large"}"#),
            ": video too large"
        );
        assert_eq!(server_detail(b""), "");
    }

    #[test]
    fn tells_html_pages_from_api_answers() {
        assert!(is_html(Some("text/html; charset=utf-8"), b"ok"));
        assert!(is_html(Some("application/json"), b"\n  <!DOCTYPE html>"));
        assert!(is_html(None, b"<html>ok</html>"));
        assert!(!is_html(Some("application/json"), br#"{"id": 1}"#));
        assert!(!is_html(None, b""));
    }
}
