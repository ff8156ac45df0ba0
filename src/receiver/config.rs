//! The configuration endpoints of the reference receiver (contract section 3):
//! `GET /config/{token}` serves the site's configuration with its `config_hash`
//! (also sent as `ETag`, `304` on a matching `If-None-Match`, `401` for an unknown
//! token), and `PUT /config/{token}` stores a new one.
//!
//! The stored text is the object without `config_hash`; the hash is computed as the
//! backend does ([`crate::config_hash`]) when the configuration is stored.

use std::io::Read;

use miniserde::json::Value;

use super::http::{self, RequestHead, Response};
use super::{ConfigFault, Shared};
use crate::config_hash::{self, HASH_MEMBER};

/// Largest configuration accepted by `PUT`.
pub(super) const CONFIG_PUT_MAX: u64 = 16 * 1024 * 1024;

/// What a configuration request needs from the connection after it is handled.
pub(super) enum Handled {
    Respond(Response),
    /// Close at once without answering (a body that cannot be read).
    Abort,
}

/// `Some(token)` for `/config/<token>` with a plain single-segment token.
pub(super) fn config_token(path: &str) -> Option<&str> {
    let token = path.strip_prefix("/config/")?;
    let plain = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b));
    plain.then_some(token)
}

/// Handles a request to `/config/<token>`, reading its body if it has one.
pub(super) fn handle(
    shared: &Shared,
    reader: &mut impl Read,
    head: &RequestHead,
    token: &str,
) -> Handled {
    match head.method.as_str() {
        "GET" => {
            if !matches!(
                http::drain(reader, head.content_length.unwrap_or(0)),
                Ok(true)
            ) {
                return Handled::Abort;
            }
            Handled::Respond(get(shared, head, token))
        }
        "PUT" => put(shared, reader, head, token),
        _ => {
            let mut resp = Response::detail(405, "Method Not Allowed");
            resp.close = true;
            Handled::Respond(resp)
        }
    }
}

fn get(shared: &Shared, head: &RequestHead, token: &str) -> Response {
    let fault = shared.next_config_fault();
    if let Some(ConfigFault::Delay(d)) = fault {
        std::thread::sleep(d);
    }
    match fault {
        Some(ConfigFault::Status(code)) => {
            return Response::detail(code, &format!("injected {code}"));
        }
        Some(ConfigFault::Body(text)) => return Response::json(200, text),
        _ => {}
    }
    let (json, hash) = match shared.store.config(token) {
        Ok(Some(found)) => found,
        Ok(None) => return Response::detail(401, "unknown site token"),
        Err(e) => {
            log::error!("receiver: cannot read configuration: {e}");
            return Response::detail(500, &format!("storage error: {e}"));
        }
    };
    let mut resp = if etag_matches(head.if_none_match.as_deref(), &hash) {
        Response::json(304, String::new())
    } else {
        Response::json(200, with_hash_first(&json, &hash))
    };
    resp.etag = Some(hash);
    resp
}

/// The served body: `config_hash` first (as the seed's backend shows it), then the
/// stored members in the stored (sorted) order.
fn with_hash_first(stored: &str, hash: &str) -> String {
    let rest = stored.trim().trim_start_matches('{').trim_start();
    let separator = if rest.starts_with('}') { "" } else { ", " };
    format!("{{\"{HASH_MEMBER}\": \"{hash}\"{separator}{rest}")
}

/// Whether an `If-None-Match` value (`"a"`, `W/"a", "b"`, `*`) names `hash`.
fn etag_matches(if_none_match: Option<&str>, hash: &str) -> bool {
    let Some(value) = if_none_match else {
        return false;
    };
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/").trim_matches('"') == hash)
}

fn put(shared: &Shared, reader: &mut impl Read, head: &RequestHead, token: &str) -> Handled {
    let len = match (head.content_length, head.transfer_encoding) {
        (Some(len), false) if len <= CONFIG_PUT_MAX => len,
        (Some(_), false) => {
            let msg = "configuration larger than 16 MiB";
            return Handled::Respond(Response::detail(413, msg).closing());
        }
        _ => {
            let msg = "Content-Length required; chunked bodies are not accepted";
            return Handled::Respond(Response::detail(411, msg).closing());
        }
    };
    let mut body = Vec::new();
    match reader.take(len).read_to_end(&mut body) {
        Ok(n) if n as u64 == len => {}
        _ => return Handled::Abort,
    }
    let Ok(text) = String::from_utf8(body) else {
        return Handled::Respond(Response::detail(400, "body is not JSON: invalid UTF-8"));
    };
    Handled::Respond(match store_config(shared, token, &text) {
        Ok(hash) => Response::json(200, format!("{{\"{HASH_MEMBER}\": \"{hash}\"}}")),
        Err(ConfigError::Invalid(msg)) => Response::detail(422, &msg),
        Err(ConfigError::Storage(msg)) => Response::detail(500, &msg),
    })
}

/// Why a configuration could not be stored.
#[derive(Debug)]
pub(super) enum ConfigError {
    /// Not a JSON object: the caller's fault.
    Invalid(String),
    Storage(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Invalid(msg) => write!(f, "receiver configuration: {msg}"),
            ConfigError::Storage(msg) => write!(f, "receiver storage: {msg}"),
        }
    }
}

/// Parses `text` (a JSON object), drops any `config_hash` member, stores it in the
/// canonical sorted form and returns its hash.
pub(super) fn store_config(
    shared: &Shared,
    token: &str,
    text: &str,
) -> Result<String, ConfigError> {
    if config_token(&format!("/config/{token}")).is_none() {
        return Err(ConfigError::Invalid(format!(
            "token {token:?} must be letters, digits, '-', '_', '.' or '~'"
        )));
    }
    let mut obj = match miniserde::json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => return Err(ConfigError::Invalid("body must be a JSON object".into())),
        Err(_) => return Err(ConfigError::Invalid("body is not JSON".into())),
    };
    obj.remove(HASH_MEMBER);
    let value = Value::Object(obj);
    let invalid = |e: config_hash::HashError| ConfigError::Invalid(e.to_string());
    let hash = config_hash::config_hash(&value).map_err(invalid)?;
    let canonical = config_hash::python_dumps(&value).map_err(invalid)?;
    shared
        .store
        .set_config(token, &canonical, &hash)
        .map_err(|e| ConfigError::Storage(e.to_string()))?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_bodies() {
        assert!(etag_matches(Some("\"abc\""), "abc"));
        assert!(etag_matches(Some("W/\"x\", \"abc\""), "abc"));
        assert!(etag_matches(Some("*"), "abc"));
        assert!(!etag_matches(Some("\"abd\""), "abc"));
        assert!(!etag_matches(None, "abc"));
        assert_eq!(with_hash_first("{}", "h"), r#"{"config_hash": "h"}"#);
        assert_eq!(
            with_hash_first(r#"{"a": 1}"#, "h"),
            r#"{"config_hash": "h", "a": 1}"#
        );
        assert_eq!(config_token("/config/abc-1"), Some("abc-1"));
        assert_eq!(config_token("/config/a/b"), None);
        assert_eq!(config_token("/config/"), None);
    }
}
