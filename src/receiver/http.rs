//! HTTP/1.1 wire format for the reference receiver: reading a request head
//! (request line + headers) with bounded line lengths, draining bodies, and
//! writing complete responses.
//!
//! Only what the push API needs is understood: the body is framed by
//! `Content-Length` alone (any `Transfer-Encoding` is refused by the caller),
//! and the few headers the receiver acts on are extracted into [`RequestHead`].

use std::io::{self, BufRead, Read, Write};

/// Longest request line or header line accepted; real clients send far less,
/// and the bound keeps a hostile client from growing a buffer without limit.
const MAX_LINE: u64 = 8 * 1024;
/// Most header lines accepted in one request, for the same reason.
const MAX_HEADERS: usize = 100;

/// The parsed request line and the headers the receiver cares about.
#[derive(Debug, Default)]
pub(crate) struct RequestHead {
    pub method: String,
    /// Request target with any query string removed.
    pub path: String,
    /// `1` for HTTP/1.1, `0` for HTTP/1.0.
    pub minor_version: u8,
    pub content_length: Option<u64>,
    /// Any `Transfer-Encoding` header at all: the body length is then not
    /// given by `Content-Length`, which this server refuses.
    pub transfer_encoding: bool,
    pub connection_close: bool,
    pub connection_keep_alive: bool,
    pub expect_continue: bool,
    pub idempotency_key: Option<String>,
    pub authorization: Option<String>,
    /// Raw `If-None-Match` value (the configuration endpoint answers 304 on a match).
    pub if_none_match: Option<String>,
}

impl RequestHead {
    /// Whether the client expects the connection to stay open after the
    /// response (HTTP/1.1 defaults to yes, HTTP/1.0 to no).
    pub fn keep_alive(&self) -> bool {
        if self.minor_version >= 1 {
            !self.connection_close
        } else {
            self.connection_keep_alive && !self.connection_close
        }
    }
}

/// Why no request head could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The peer closed (or timed out) between requests: not an error.
    Closed,
    /// The socket failed or closed in the middle of a head.
    Io(io::Error),
    /// The bytes are not an HTTP/1.x request head; answer 400 and close.
    Malformed(&'static str),
}

impl From<io::Error> for HeadError {
    fn from(e: io::Error) -> Self {
        HeadError::Io(e)
    }
}

/// Reads one request head from `r`.
pub(crate) fn read_head(r: &mut impl BufRead) -> Result<RequestHead, HeadError> {
    let line = read_request_line(r)?;
    let mut head = parse_request_line(&line)?;
    for _ in 0..MAX_HEADERS {
        let line = match read_line(r)? {
            Some(line) => line,
            None => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
        };
        if line.is_empty() {
            return Ok(head);
        }
        apply_header(&mut head, &line)?;
    }
    Err(HeadError::Malformed("too many header lines"))
}

/// Reads the request line, skipping the empty lines RFC 9112 lets a client
/// send before it. End of stream before any byte is a clean close.
fn read_request_line(r: &mut impl BufRead) -> Result<String, HeadError> {
    loop {
        match read_line(r) {
            Ok(Some(line)) if line.is_empty() => continue,
            Ok(Some(line)) => return Ok(line),
            Ok(None) => return Err(HeadError::Closed),
            // An idle keep-alive connection hitting the read timeout is the
            // normal way such a connection ends.
            Err(HeadError::Io(e)) if is_timeout(&e) => return Err(HeadError::Closed),
            Err(e) => return Err(e),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one CRLF- (or LF-) terminated line without its terminator.
/// `Ok(None)` means end of stream before any byte of the line.
fn read_line(r: &mut impl BufRead) -> Result<Option<String>, HeadError> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n as u64 > MAX_LINE {
            return Err(HeadError::Malformed("header line too long"));
        }
        return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    // Header values are ASCII in practice; a stray non-UTF-8 byte should not
    // turn into an error the client cannot understand.
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn parse_request_line(line: &str) -> Result<RequestHead, HeadError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed("malformed request line"));
    };
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(HeadError::Malformed("unsupported HTTP version")),
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !method_ok || !target.starts_with('/') {
        return Err(HeadError::Malformed("malformed request line"));
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(RequestHead {
        method: method.to_string(),
        path,
        minor_version,
        ..RequestHead::default()
    })
}

fn apply_header(head: &mut RequestHead, line: &str) -> Result<(), HeadError> {
    let Some((name, value)) = line.split_once(':') else {
        return Err(HeadError::Malformed("malformed header line"));
    };
    if name.is_empty() || name.ends_with([' ', '\t']) {
        return Err(HeadError::Malformed("malformed header line"));
    }
    let value = value.trim_matches([' ', '\t']);
    match name.to_ascii_lowercase().as_str() {
        "content-length" => set_content_length(head, value)?,
        "transfer-encoding" => head.transfer_encoding = true,
        "connection" => {
            for token in value.split(',').map(str::trim) {
                head.connection_close |= token.eq_ignore_ascii_case("close");
                head.connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
        "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
        "idempotency-key" => head.idempotency_key = Some(value.to_string()),
        "authorization" => head.authorization = Some(value.to_string()),
        "if-none-match" => head.if_none_match = Some(value.to_string()),
        _ => {}
    }
    Ok(())
}

/// Conflicting lengths are a classic request-smuggling vector, so they are
/// rejected rather than resolved.
fn set_content_length(head: &mut RequestHead, value: &str) -> Result<(), HeadError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadError::Malformed("invalid Content-Length"));
    }
    let len: u64 = value
        .parse()
        .map_err(|_| HeadError::Malformed("invalid Content-Length"))?;
    match head.content_length {
        Some(previous) if previous != len => {
            Err(HeadError::Malformed("conflicting Content-Length"))
        }
        _ => {
            head.content_length = Some(len);
            Ok(())
        }
    }
}

/// Reads and discards exactly `len` body bytes. `Ok(false)` means the peer
/// closed before sending them all, so the connection cannot be reused.
pub(crate) fn drain(r: &mut impl Read, len: u64) -> io::Result<bool> {
    let copied = io::copy(&mut r.by_ref().take(len), &mut io::sink())?;
    Ok(copied == len)
}

/// A complete response, written in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub retry_after: Option<u64>,
    /// Entity tag, sent quoted as `ETag` (configuration responses).
    pub etag: Option<String>,
    /// Send `Connection: close` and end the connection after writing.
    pub close: bool,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: String) -> Self {
        Response {
            status,
            content_type: "application/json",
            body,
            retry_after: None,
            etag: None,
            close: false,
        }
    }

    /// A FastAPI-style error: `{"detail": "<message>"}`.
    pub fn detail(status: u16, message: &str) -> Self {
        Response::json(status, detail_body(message))
    }

    /// The same response, ending the connection afterwards.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

/// `{"detail": "<message>"}` with the message JSON-escaped.
pub(crate) fn detail_body(message: &str) -> String {
    format!(
        "{{\"detail\":{}}}",
        miniserde::json::to_string(&message.to_string())
    )
}

/// Writes `resp` (status line, headers, body) and flushes it.
pub(crate) fn write_response(w: &mut impl Write, resp: &Response) -> io::Result<()> {
    // 1xx, 204 and 304 responses must not carry a body (RFC 9110); an
    // injected status of that kind is sent bare so clients do not desync.
    let bodyless = resp.status < 200 || resp.status == 204 || resp.status == 304;
    let body = if bodyless { "" } else { resp.body.as_str() };
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    if !bodyless {
        out.push_str(&format!(
            "Content-Type: {}\r\nContent-Length: {}\r\n",
            resp.content_type,
            body.len()
        ));
    }
    if let Some(tag) = &resp.etag {
        out.push_str(&format!("ETag: \"{tag}\"\r\n"));
    }
    if let Some(seconds) = resp.retry_after {
        out.push_str(&format!("Retry-After: {seconds}\r\n"));
    }
    if resp.close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// Tells a client that sent `Expect: 100-continue` to go on with the body.
pub(crate) fn write_continue(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    w.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<RequestHead, HeadError> {
        read_head(&mut io::Cursor::new(raw.as_bytes().to_vec()))
    }

    #[test]
    fn parses_a_post_head() {
        let h = head(
            "POST /api/media?x=1 HTTP/1.1\r\nContent-Length: 12\r\n\
             Idempotency-Key: d:t:1\r\nAuthorization: Bearer abc\r\n\r\n",
        )
        .expect("valid head");
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, "/api/media");
        assert_eq!(h.content_length, Some(12));
        assert_eq!(h.idempotency_key.as_deref(), Some("d:t:1"));
        assert_eq!(h.authorization.as_deref(), Some("Bearer abc"));
        assert!(h.keep_alive());
    }

    #[test]
    fn rejects_garbage_and_conflicts() {
        assert!(matches!(
            head("hello\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            head("POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(head(""), Err(HeadError::Closed)));
    }

    #[test]
    fn http10_closes_by_default() {
        let h = head("GET / HTTP/1.0\r\n\r\n").expect("valid head");
        assert!(!h.keep_alive());
    }
}
