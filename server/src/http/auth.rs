//! Who may call what, decided by the request path before any handler runs: `/api/...`
//! takes a device token, `/admin/...` and `/metrics` an admin token (so every admin
//! route, present or future, is behind it), everything else is open (`/health`,
//! `/ready`; `/config/{site_token}` carries its own secret, and a device token with it
//! only says which device pulled; the console's pages check their session cookie
//! themselves, [`crate::console`]). `--no-auth` opens all but the console.
//!
//! A token is found by the SHA-256 of what the client sent, through the store's unique
//! index: the secret is never compared byte by byte in the application (no timing leak)
//! and never kept, logged, or repeated in an answer. A token found is trusted for
//! `--token-cache-s` (2 s) by its SHA-256 ([`TokenCache`]): one store query per token
//! and period instead of one per push, half of a push's store work; the price is that a
//! revoked token is refused within that time rather than at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;

use super::error::Error;
use crate::store::{Store, StoreError, TokenInfo, TokenKind};
use crate::tokens;

/// Who is calling, as the gate found out; a request extension of the routes it guards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--no-auth`: anyone, for any device.
    Open,
    /// A device token's holder: writes this device's rows only.
    Device(String),
    Admin,
}

impl Caller {
    /// Refuses a push for a device other than the token's (the body's `device_id`).
    pub fn may_write(&self, device_id: &str) -> Result<(), Error> {
        match self {
            Caller::Device(own) if own != device_id => Err(Error::Forbidden(format!(
                "auth: this token pushes the rows of device {own:?}, not of {device_id:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses an Idempotency-Key whose device part (`<device_id>:...`) is not the
    /// token's device.
    pub fn may_use_key(&self, key: &str) -> Result<(), Error> {
        match self {
            Caller::Device(own)
                if !key
                    .strip_prefix(own.as_str())
                    .is_some_and(|rest| rest.starts_with(':')) =>
            {
                Err(Error::Forbidden(format!(
                    "auth: {} must start with this token's device ({own:?}:)",
                    relais_wire::IDEMPOTENCY_KEY_HEADER
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The sync tenant of a device token (`None`: the token has none), a request extension
/// next to [`Caller::Device`]; absent with `--no-auth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub Option<String>);

/// The gate's state.
#[derive(Debug, Clone)]
pub struct Gate<S> {
    pub store: S,
    /// `--no-auth`.
    pub open: bool,
    pub cache: Arc<TokenCache>,
}

/// Tokens found in the store recently, by SHA-256. Unknown tokens are not kept: a token
/// just added works at once, and guessing fills nothing.
#[derive(Debug)]
pub struct TokenCache {
    ttl: Duration,
    found: Mutex<HashMap<String, (TokenInfo, Instant)>>,
}

/// Entries at most: a fleet's devices each hold one. Beyond it the expired entries go,
/// then all of them if none had expired, so memory stays bounded whatever is sent.
const TOKEN_CACHE_ENTRIES: usize = 50_000;

impl TokenCache {
    pub fn new(ttl: Duration) -> TokenCache {
        TokenCache {
            ttl,
            found: Mutex::default(),
        }
    }

    fn get(&self, sha256: &str) -> Option<TokenInfo> {
        let found = self.found.lock().ok()?;
        let (info, at) = found.get(sha256)?;
        (at.elapsed() < self.ttl).then(|| info.clone())
    }

    fn keep(&self, sha256: String, info: &TokenInfo) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut found) = self.found.lock() else {
            return;
        };
        if found.len() >= TOKEN_CACHE_ENTRIES {
            found.retain(|_, (_, at)| at.elapsed() < self.ttl);
            if found.len() >= TOKEN_CACHE_ENTRIES {
                found.clear();
            }
        }
        found.insert(sha256, (info.clone(), Instant::now()));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Nothing,
    Device,
    Admin,
}

fn need(path: &str) -> Need {
    if path == "/metrics" || path == "/admin" || path.starts_with("/admin/") {
        Need::Admin
    } else if path.starts_with("/api/") {
        Need::Device
    } else {
        Need::Nothing
    }
}

/// Middleware: answers 401 (no, unknown or revoked token) or 403 (a token of the wrong
/// kind) for a guarded path, else passes the request on with its [`Caller`].
pub async fn gate<S: Store>(
    State(gate): State<Gate<S>>,
    mut req: Request,
    next: Next,
) -> Result<Response, Error> {
    let caller = if gate.open {
        Caller::Open
    } else {
        match need(req.uri().path()) {
            Need::Nothing => {
                if let Some(device) = puller(&gate, req.uri().path(), req.headers()).await {
                    req.extensions_mut().insert(Caller::Device(device));
                }
                return Ok(next.run(req).await);
            }
            Need::Device => match authenticate(&gate, req.headers()).await? {
                TokenInfo {
                    kind: TokenKind::Device,
                    device_id: Some(device),
                    tenant,
                    ..
                } => {
                    req.extensions_mut().insert(Tenant(tenant));
                    Caller::Device(device)
                }
                _ => {
                    return Err(Error::Forbidden(
                        "auth: pushes take a device token, not an admin token".into(),
                    ));
                }
            },
            Need::Admin => match authenticate(&gate, req.headers()).await?.kind {
                TokenKind::Admin => Caller::Admin,
                TokenKind::Device => {
                    return Err(Error::Forbidden(
                        "auth: this path takes an admin token, not a device token".into(),
                    ));
                }
            },
        }
    };
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// The device of a configuration pull that carries a valid device token, so the pull
/// can be recorded as that device's; a pull without one (the seed's agents), or with an
/// unknown one, is served as before: the site token is what authorises it.
async fn puller<S: Store>(gate: &Gate<S>, path: &str, headers: &HeaderMap) -> Option<String> {
    if !path.starts_with("/config/") || bearer(headers).is_none() {
        return None;
    }
    match authenticate(gate, headers).await {
        Ok(TokenInfo {
            kind: TokenKind::Device,
            device_id: Some(device),
            ..
        }) => Some(device),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(
                "config pull: its bearer token names no device: {}",
                e.detail()
            );
            None
        }
    }
}

async fn authenticate<S: Store>(gate: &Gate<S>, headers: &HeaderMap) -> Result<TokenInfo, Error> {
    let token = bearer(headers).ok_or_else(|| {
        Error::Unauthorized(
            "auth: this path needs an `Authorization: Bearer <token>` header".into(),
        )
    })?;
    find_token(&gate.store, &gate.cache, tokens::sha256_hex(token))
        .await?
        .ok_or_else(|| Error::Unauthorized("auth: unknown or revoked token".into()))
}

/// The token, not revoked, whose SHA-256 is `sha256`: from `cache`, else from the store
/// (and then kept). The console's logins and sessions look their admin token up here
/// too, so a revoked token closes its sessions within the same `--token-cache-s`.
pub(crate) async fn find_token<S: Store>(
    store: &S,
    cache: &TokenCache,
    sha256: String,
) -> Result<Option<TokenInfo>, StoreError> {
    if let Some(info) = cache.get(&sha256) {
        return Ok(Some(info));
    }
    let info = store.find_token(sha256.clone()).await?;
    if let Some(info) = &info {
        cache.keep(sha256, info);
    }
    Ok(info)
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_what_they_need() {
        assert_eq!(need("/api/evenements"), Need::Device);
        assert_eq!(need("/admin/devices/3"), Need::Admin);
        assert_eq!(need("/admin"), Need::Admin);
        assert_eq!(need("/metrics"), Need::Admin);
        assert_eq!(need("/administrator"), Need::Nothing);
        assert_eq!(need("/health"), Need::Nothing);
        assert_eq!(need("/config/abc"), Need::Nothing);
    }

    #[test]
    fn a_device_token_writes_its_own_rows_and_keys_only() {
        let caller = Caller::Device("pi:1".into());
        assert!(caller.may_write("pi:1").is_ok());
        assert!(caller.may_write("pi:2").is_err());
        assert!(caller.may_use_key("pi:1:evenement:4").is_ok());
        assert!(caller.may_use_key("pi:10:evenement:4").is_err());
        assert!(caller.may_use_key("pi:1").is_err());
        assert!(Caller::Open.may_use_key("x").is_ok());
    }

    #[test]
    fn a_cached_token_expires_and_unknown_ones_are_not_kept() {
        let info = TokenInfo {
            id: 1,
            kind: TokenKind::Device,
            device_id: Some("pi".into()),
            note: None,
            created_at: String::new(),
            revoked_at: None,
            tenant: None,
        };
        let cache = TokenCache::new(Duration::from_millis(50));
        assert_eq!(cache.get("a"), None);
        cache.keep("a".into(), &info);
        assert_eq!(cache.get("a"), Some(info.clone()));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("a"), None, "expired");
        let off = TokenCache::new(Duration::ZERO);
        off.keep("a".into(), &info);
        assert_eq!(off.get("a"), None, "--token-cache-s 0 keeps nothing");
    }

    #[test]
    fn bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            "Bearer  abc ".parse().expect("value"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("value"));
        assert_eq!(bearer(&h), None);
    }
}
