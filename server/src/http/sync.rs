//! `POST /api/sync/up` and `POST /api/sync/down` (README, "Two-way sync: the server"):
//! thin handlers over [`Store::sync_up`] and [`Store::sync_down`]; parsing, decisions
//! and answers are [`crate::sync`]'s. Bodies are read as a batch's are (bounded by
//! `--batch-max-bytes`, gzip accepted, the answer gzipped for a client that takes it).
//!
//! The tenant is the device token's (`tokens.tenant`), never the body's: a body naming
//! another tenant is refused (403). With `--no-auth` there is no token, so the body's
//! `tenant` is required and the origin device is `open`.
//!
//! The long poll (`wait`): the request waits on its tenant's [`crate::sync::Hub`]
//! (woken by a commit of this server) and re-reads the store every 250 ms, which is
//! how the commits of the other servers sharing a PostgreSQL store are seen. Not
//! LISTEN/NOTIFY: it needs a connection held outside the pool per server and has no
//! SQLite counterpart; one indexed read per waiting device per 250 ms is cheap.

use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use miniserde::json::{self, Number, Value};

use super::App;
use super::auth::{Caller, Tenant};
use super::batch::body;
use super::error::{Error, json_response};
use crate::store::Store;
use crate::sync::{self, Answered, Hub, Kind, LogRow};
use std::sync::Arc;

/// How often a long poll re-reads the store (the other servers' commits).
const POLL_EVERY: Duration = Duration::from_millis(250);
/// `limit` when the request gives none.
const DEFAULT_LIMIT: i64 = 100;

/// The sync routes' state.
#[derive(Debug, Clone)]
pub struct Syncs<S> {
    pub app: App<S>,
    pub max_bytes: usize,
    pub hub: Arc<Hub>,
}

/// Who syncs: the token's tenant and device.
struct Who {
    tenant: String,
    device: String,
}

/// The token's tenant, before the body is read; `None` with `--no-auth`.
fn token_tenant(caller: &Caller, tenant: Option<&Tenant>) -> Result<Option<Who>, Error> {
    match (caller, tenant) {
        (Caller::Open, _) => Ok(None),
        (Caller::Device(device), Some(Tenant(Some(tenant)))) => Ok(Some(Who {
            tenant: tenant.clone(),
            device: device.clone(),
        })),
        (Caller::Device(device), _) => Err(Error::Forbidden(format!(
            "sync: this token has no tenant: add a token with `relais-server token add \
             --device {device} --tenant TENANT`"
        ))),
        (Caller::Admin, _) => Err(Error::Forbidden(
            "sync: takes a device token, not an admin token".into(),
        )),
    }
}

/// The caller's tenant, checked against the body's `tenant`.
fn who(token: Option<Who>, body_tenant: Option<String>) -> Result<Who, Error> {
    match (token, body_tenant) {
        (Some(who), Some(named)) if named != who.tenant => Err(Error::Forbidden(format!(
            "sync: this token syncs tenant {:?}, not {named:?}",
            who.tenant
        ))),
        (Some(who), _) => Ok(who),
        (None, Some(tenant)) if !tenant.is_empty() => Ok(Who {
            tenant,
            device: "open".into(),
        }),
        (None, _) => Err(Error::BadRequest(
            "sync: --no-auth: the body must name its \"tenant\"".into(),
        )),
    }
}

/// `POST /api/sync/up`.
pub async fn up<S: Store>(
    State(syncs): State<Syncs<S>>,
    Extension(caller): Extension<Caller>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let started = Instant::now();
    let token = token_tenant(&caller, tenant.as_ref().map(|t| &t.0))?;
    let gzip = body::accepts_gzip(&headers);
    let text = body::read(&headers, body, syncs.max_bytes).await?;
    let parsed = sync::parse_up(&text).map_err(Error::BadRequest)?;
    let who = who(token, parsed.tenant)?;
    // From here the events are the store's: a client hanging up must not cancel the
    // answer's bookkeeping (the log row, the long polls' wake-up).
    tokio::spawn(async move { apply(syncs, who, parsed.events, started, gzip).await })
        .await
        .map_err(|e| Error::Internal(format!("sync: the applying task failed: {e}")))?
}

async fn apply<S: Store>(
    syncs: Syncs<S>,
    who: Who,
    events: Vec<Result<sync::Event, Answered>>,
    started: Instant,
    gzip: bool,
) -> Result<Response, Error> {
    let store = &syncs.app.store;
    let checked: Vec<sync::Event> = events.iter().filter_map(|e| e.clone().ok()).collect();
    let applied = if checked.is_empty() {
        Ok(Vec::new())
    } else {
        store
            .sync_up(who.tenant.clone(), who.device.clone(), checked)
            .await
    };
    let mut row = LogRow {
        tenant: who.tenant.clone(),
        device: who.device.clone(),
        direction: "up",
        events: events.len() as i64,
        acknowledged: 0,
        conflicts: 0,
        rejected: 0,
        status: "FAILED",
        duration_ms: 0,
    };
    let applied = match applied {
        Ok(applied) => applied,
        Err(e) => {
            row.duration_ms = started.elapsed().as_millis() as i64;
            log(store, row).await;
            return Err(e.into());
        }
    };
    let mut applied = applied.into_iter();
    let mut arrays: [Vec<String>; 3] = Default::default();
    for event in events {
        let answer = match event {
            Ok(_) => applied.next().ok_or_else(|| {
                Error::Internal("sync: the store answered fewer events than sent".into())
            })?,
            Err(rejected) => rejected,
        };
        let i = match answer.kind {
            Kind::Acknowledged => 0,
            Kind::Conflict => 1,
            Kind::Rejected => 2,
        };
        arrays[i].push(answer.json);
    }
    let [acknowledged, conflicts, rejected] = arrays;
    if !acknowledged.is_empty() {
        // A replay acknowledged again wakes the polls for nothing: harmless.
        syncs.hub.changed(&who.tenant);
    }
    row.acknowledged = acknowledged.len() as i64;
    row.conflicts = conflicts.len() as i64;
    row.rejected = rejected.len() as i64;
    row.status = if conflicts.is_empty() && rejected.is_empty() {
        "SUCCESS"
    } else {
        "PARTIAL"
    };
    row.duration_ms = started.elapsed().as_millis() as i64;
    log(store, row).await;
    let text = format!(
        "{{\"acknowledged\": [{}], \"conflicts\": [{}], \"rejected\": [{}]}}",
        acknowledged.join(", "),
        conflicts.join(", "),
        rejected.join(", ")
    );
    answer(&text, gzip)
}

/// The audit row; a store that cannot take it is logged, the answer stands.
async fn log<S: Store>(store: &S, row: LogRow) {
    if let Err(e) = store.log_sync(row).await {
        tracing::warn!("sync: the audit row was not stored: {e}");
    }
}

fn answer(text: &str, gzip: bool) -> Result<Response, Error> {
    Ok(if gzip {
        let headers = [
            (header::CONTENT_TYPE, "application/json"),
            (header::CONTENT_ENCODING, "gzip"),
            (header::VARY, "accept-encoding"),
        ];
        (StatusCode::OK, headers, body::gzip(text)?).into_response()
    } else {
        json_response(StatusCode::OK, text)
    })
}

/// A `/sync/down` body.
struct Down {
    tenant: Option<String>,
    cursor: i64,
    limit: i64,
    wait: Duration,
}

fn parse_down(text: &str) -> Result<Down, Error> {
    let bad = |d: &str| Error::BadRequest(format!("sync: {d}"));
    let Ok(Value::Object(body)) = json::from_str::<Value>(text) else {
        return Err(bad("the body must be a JSON object {\"cursor\": N}"));
    };
    let mut down = Down {
        tenant: None,
        cursor: 0,
        limit: DEFAULT_LIMIT,
        wait: Duration::ZERO,
    };
    let integer = |name: &str, v: Value| match v {
        Value::Number(Number::U64(n)) if i64::try_from(n).is_ok() => Ok(n as i64),
        _ => Err(bad(&format!("{name}: expected an integer ≥ 0"))),
    };
    for (name, value) in body {
        match name.as_str() {
            "tenant" => match value {
                Value::String(t) => down.tenant = Some(t),
                Value::Null => {}
                _ => return Err(bad("tenant: expected a string")),
            },
            "cursor" => down.cursor = integer("cursor", value)?,
            "limit" => down.limit = integer("limit", value)?,
            "wait" => down.wait = Duration::from_secs(integer("wait", value)? as u64),
            _ => {}
        }
    }
    if !(1..=sync::MAX_LIMIT).contains(&down.limit) {
        return Err(bad(&format!("limit: from 1 to {}", sync::MAX_LIMIT)));
    }
    if down.wait > Duration::from_secs(sync::MAX_WAIT_S) {
        return Err(bad(&format!("wait: at most {} seconds", sync::MAX_WAIT_S)));
    }
    Ok(down)
}

/// `POST /api/sync/down`.
pub async fn down<S: Store>(
    State(syncs): State<Syncs<S>>,
    Extension(caller): Extension<Caller>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let started = Instant::now();
    let token = token_tenant(&caller, tenant.as_ref().map(|t| &t.0))?;
    let gzip = body::accepts_gzip(&headers);
    let text = body::read(&headers, body, syncs.max_bytes).await?;
    let request = parse_down(&text)?;
    let who = who(token, request.tenant.clone())?;
    let store = &syncs.app.store;
    let deadline = started + request.wait;
    let notify = syncs.hub.of(&who.tenant);
    let mut changes = loop {
        // Registered before the read: a commit between the read and the wait wakes it.
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let changes = store
            .sync_down(who.tenant.clone(), request.cursor, request.limit + 1)
            .await?;
        let now = Instant::now();
        if !changes.is_empty() || now >= deadline {
            break changes;
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep(POLL_EVERY.min(deadline - now)) => {}
        }
    };
    let has_more = changes.len() as i64 > request.limit;
    changes.truncate(request.limit as usize);
    let cursor = changes.last().map_or(request.cursor, |c| c.seq);
    let items: Vec<String> = changes.iter().map(sync::Change::json).collect();
    log(
        store,
        LogRow {
            tenant: who.tenant,
            device: who.device,
            direction: "down",
            events: items.len() as i64,
            acknowledged: 0,
            conflicts: 0,
            rejected: 0,
            status: "SUCCESS",
            duration_ms: started.elapsed().as_millis() as i64,
        },
    )
    .await;
    answer(
        &format!(
            "{{\"changes\": [{}], \"cursor\": {cursor}, \"hasMore\": {has_more}}}",
            items.join(", ")
        ),
        gzip,
    )
}
