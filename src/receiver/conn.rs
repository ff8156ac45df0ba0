//! One connection's life: reading requests one after another (keep-alive),
//! routing them, applying injected faults, and turning a received body into
//! a stored row and a response.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::body::{self, SplitBody};
use super::config;
use super::http::{self, HeadError, RequestHead, Response};
use super::store::{Inserted, NewRow};
use super::{Fault, Shared};

/// A stuck or idle client releases its thread after this long.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// After a response that ends the connection, how long unread client data
/// is still drained so the close does not turn into a reset that could
/// destroy the response before the client reads it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// What to do with the connection after a request.
enum Flow {
    KeepAlive,
    /// Close politely (the client may still be sending).
    Close,
    /// Close at once, whatever is pending (injected faults).
    Abort,
}

/// Serves requests on `stream` until the client or an error ends it.
pub(super) fn serve(shared: &Shared, stream: TcpStream) {
    // Small responses must not wait for Nagle + delayed ACK (40 ms each).
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(SOCKET_TIMEOUT));
    let _ = stream.set_write_timeout(Some(SOCKET_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    while !shared.stopping() {
        let flow = match http::read_head(&mut reader) {
            Ok(head) => handle(shared, &mut reader, &mut writer, head),
            Err(HeadError::Closed | HeadError::Io(_)) => Flow::Abort,
            Err(HeadError::Malformed(why)) => {
                let resp = Response::detail(400, why).closing();
                let _ = http::write_response(&mut writer, &resp);
                Flow::Close
            }
        };
        match flow {
            Flow::KeepAlive => continue,
            Flow::Close => return linger_close(&mut reader, &writer),
            Flow::Abort => return,
        }
    }
}

/// Half-closes, then discards what the client still sends for a moment.
fn linger_close(reader: &mut impl Read, writer: &TcpStream) {
    let _ = writer.shutdown(Shutdown::Write);
    let _ = writer.set_read_timeout(Some(LINGER));
    let _ = io::copy(&mut reader.take(LINGER_MAX_BYTES), &mut io::sink());
}

fn handle(
    shared: &Shared,
    reader: &mut impl Read,
    writer: &mut impl Write,
    head: RequestHead,
) -> Flow {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(token) = config::config_token(&head.path) {
        // The site token is a secret, on the backend's side too.
        log::debug!("receiver: {} /config/***", head.method);
        return match config::handle(shared, reader, &head, token) {
            config::Handled::Respond(mut resp) => {
                resp.close |= !head.keep_alive();
                respond(writer, resp)
            }
            config::Handled::Abort => Flow::Abort,
        };
    }
    log::debug!("receiver: {} {}", head.method, head.path);
    let Some(endpoint) = api_endpoint(&head) else {
        return not_found(reader, writer, &head);
    };
    let len = match (head.content_length, head.transfer_encoding) {
        (Some(len), false) => len,
        // Without a length the body cannot be delimited, so the connection
        // cannot be reused either.
        _ => {
            let msg = "Content-Length required; chunked bodies are not accepted";
            return respond(writer, Response::detail(411, msg).closing());
        }
    };
    let fault = shared.next_fault();
    if fault == Some(Fault::Reset) {
        return Flow::Abort;
    }
    if head.expect_continue && http::write_continue(writer).is_err() {
        return Flow::Abort;
    }
    if let Some(Fault::Status(code, retry_after)) = fault {
        return injected_status(reader, writer, &head, len, code, retry_after);
    }
    let Ok(mut resp) = receive(shared, reader, &head, endpoint, len) else {
        // The client vanished or stalled mid-body: nothing to answer.
        return Flow::Abort;
    };
    match fault {
        Some(Fault::LoseAnswer) => return Flow::Abort,
        Some(Fault::HtmlOk) if (200..300).contains(&resp.status) => {
            resp.content_type = "text/html";
            resp.body = "<html>ok</html>".to_string();
        }
        Some(Fault::Delay(d)) => std::thread::sleep(d),
        _ => {}
    }
    resp.close |= !head.keep_alive();
    respond(writer, resp)
}

/// `Some(name)` for `POST /api/<name>` with a plain single-segment name.
fn api_endpoint(head: &RequestHead) -> Option<String> {
    let name = head.path.strip_prefix("/api/")?;
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    (head.method == "POST" && plain).then(|| name.to_string())
}

fn not_found(reader: &mut impl Read, writer: &mut impl Write, head: &RequestHead) -> Flow {
    let mut resp = Response::detail(404, "Not Found");
    match (head.content_length, head.transfer_encoding) {
        (_, true) => resp.close = true,
        (Some(len), false) => match http::drain(reader, len) {
            Ok(true) => resp.close = !head.keep_alive(),
            _ => return Flow::Abort,
        },
        (None, false) => resp.close = !head.keep_alive(),
    }
    respond(writer, resp)
}

fn injected_status(
    reader: &mut impl Read,
    writer: &mut impl Write,
    head: &RequestHead,
    len: u64,
    code: u16,
    retry_after: Option<u64>,
) -> Flow {
    if !matches!(http::drain(reader, len), Ok(true)) {
        return Flow::Abort;
    }
    let mut resp = Response::detail(code, &format!("injected {code}"));
    resp.retry_after = retry_after;
    resp.close = !head.keep_alive();
    respond(writer, resp)
}

fn respond(writer: &mut impl Write, resp: Response) -> Flow {
    match http::write_response(writer, &resp) {
        Err(_) => Flow::Abort,
        Ok(()) if resp.close => Flow::Close,
        Ok(()) => Flow::KeepAlive,
    }
}

/// Consumes the body and stores it (or finds it already stored). `Err` only
/// when the body could not be read in full.
fn receive(
    shared: &Shared,
    reader: &mut impl Read,
    head: &RequestHead,
    endpoint: String,
    len: u64,
) -> io::Result<Response> {
    // Known key: skip decoding entirely. `Store::insert` checks again under
    // its lock, which is what makes concurrent duplicates safe.
    if let (true, Some(key)) = (shared.idempotency, &head.idempotency_key) {
        if let Ok(Some(id)) = shared.store.find_key(key) {
            if !http::drain(reader, len)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            shared.replays.fetch_add(1, Ordering::Relaxed);
            return Ok(created(id));
        }
    }
    let split = body::split_body(reader, len, &shared.spool)?;
    Ok(store_body(shared, head, endpoint, split))
}

fn store_body(shared: &Shared, head: &RequestHead, endpoint: String, split: SplitBody) -> Response {
    let json = match validate(&split) {
        Ok(()) => match String::from_utf8(split.json) {
            Ok(json) => json,
            Err(_) => return Response::detail(400, "body is not JSON: invalid UTF-8"),
        },
        Err(resp) => return resp,
    };
    let row = NewRow {
        endpoint,
        idempotency_key: head.idempotency_key.clone(),
        json,
        blob: split.blob,
        authorization: head.authorization.clone(),
    };
    match shared.store.insert(row, shared.idempotency) {
        Ok(Inserted::Stored(id)) => {
            shared.stored.fetch_add(1, Ordering::Relaxed);
            created(id)
        }
        Ok(Inserted::Replay(id)) => {
            shared.replays.fetch_add(1, Ordering::Relaxed);
            created(id)
        }
        Err(e) => {
            log::error!("receiver: cannot store row: {e}");
            Response::detail(500, &format!("storage error: {e}"))
        }
    }
}

/// Checks the split body, in the order a client would want to hear about
/// problems: server failures, size, JSON syntax, JSON shape, BLOB content.
fn validate(split: &SplitBody) -> Result<(), Response> {
    if let Some(msg) = &split.storage_problem {
        log::error!("receiver: {msg}");
        return Err(Response::detail(500, msg));
    }
    if split.json_overflow {
        let msg = "JSON outside large strings exceeds 16 MiB";
        return Err(Response::detail(413, msg));
    }
    let Ok(text) = std::str::from_utf8(&split.json) else {
        return Err(Response::detail(400, "body is not JSON: invalid UTF-8"));
    };
    match miniserde::json::from_str::<miniserde::json::Value>(text) {
        Err(_) => return Err(Response::detail(400, "body is not JSON: syntax error")),
        Ok(miniserde::json::Value::Object(_)) => {}
        Ok(_) => return Err(Response::detail(422, "body must be a JSON object")),
    }
    match &split.blob_problem {
        Some(msg) => Err(Response::detail(422, msg)),
        None => Ok(()),
    }
}

fn created(id: i64) -> Response {
    Response::json(201, format!("{{\"id\":{id},\"message\":\"created\"}}"))
}
