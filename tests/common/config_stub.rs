//! THE REMAINDER OF THE REFERENCE RECEIVER, until relais-server serves configurations
//! (issue 12's configuration backend): `GET /config/{token}` answered by the tests'
//! [`super::FaultProxy`] itself, in front of relais-server, as the receiver answered it
//! (the stored object with its `config_hash` first, the hash as `ETag`, 304 on a
//! matching `If-None-Match`, 401 for an unknown token), with injected faults. Used by
//! `Receiver::set_config` and `Receiver::push_config_fault` (tests/pull.rs,
//! pull_process.rs, hardening.rs, reload.rs, run_loop.rs, torture.rs). Once the server
//! has sites and devices, `set_config` becomes their admin API and this file goes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miniserde::json::Value;
use relais::config_hash::{self, HASH_MEMBER};

use super::{ProxyFault, ProxyRequest, injected, lock};

/// Injected misbehaviour of `GET /config/<token>`, consumed one per such request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigFault {
    /// Answer this status with `{"detail": "injected <code>"}`.
    Status(u16),
    /// Answer 200 with this body instead of the stored configuration.
    Body(String),
    /// Wait this long, then answer normally.
    Delay(Duration),
}

/// The configurations by site token (the canonical text without its hash, the hash),
/// and the faults to come.
#[derive(Debug, Clone, Default)]
pub struct ConfigStub {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    configs: HashMap<String, (String, String)>,
    faults: VecDeque<ConfigFault>,
}

impl ConfigStub {
    /// Stores `json_text` (a JSON object; any `config_hash` member dropped) as the
    /// configuration of `token`; returns the hash `GET /config/<token>` will serve.
    pub fn set(&self, token: &str, json_text: &str) -> Result<String, String> {
        let mut obj = match miniserde::json::from_str::<Value>(json_text) {
            Ok(Value::Object(obj)) => obj,
            _ => return Err("configuration: not a JSON object".into()),
        };
        obj.remove(HASH_MEMBER);
        let value = Value::Object(obj);
        let hash = config_hash::config_hash(&value).map_err(|e| e.to_string())?;
        let canonical = config_hash::python_dumps(&value).map_err(|e| e.to_string())?;
        lock(&self.inner)
            .configs
            .insert(token.to_string(), (canonical, hash.clone()));
        Ok(hash)
    }

    pub fn push_fault(&self, fault: ConfigFault) {
        lock(&self.inner).faults.push_back(fault);
    }

    /// The answer to `req` when it is a `GET /config/<token>`.
    pub fn answer(&self, req: &ProxyRequest) -> Option<ProxyFault> {
        let token = req.path.strip_prefix("/config/")?;
        if req.method != "GET" {
            return None;
        }
        let mut inner = lock(&self.inner);
        let fault = inner.faults.pop_front();
        let after = match fault {
            Some(ConfigFault::Delay(d)) => d,
            _ => Duration::ZERO,
        };
        let answer = |status: u16, headers: String, body: String| ProxyFault::Answer {
            after,
            status,
            headers,
            body,
        };
        Some(match fault {
            Some(ConfigFault::Status(code)) => answer(code, String::new(), injected(code)),
            Some(ConfigFault::Body(text)) => answer(200, String::new(), text),
            _ => match inner.configs.get(token) {
                None => answer(
                    401,
                    String::new(),
                    r#"{"detail": "unknown site token"}"#.into(),
                ),
                Some((json, hash)) => {
                    let etag = format!("ETag: \"{hash}\"\r\n");
                    if etag_matches(req.if_none_match.as_deref(), hash) {
                        answer(304, etag, String::new())
                    } else {
                        answer(200, etag, with_hash_first(json, hash))
                    }
                }
            },
        })
    }
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
