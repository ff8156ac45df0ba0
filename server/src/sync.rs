//! Two-way sync, the server's side (README, "Two-way sync: the server"): what both
//! stores share. An event of `POST /api/sync/up` is parsed and checked here
//! ([`parse_up`]), decided here ([`decide`]: the conflict strategies, the same code on
//! both stores) and answered here ([`Answered`]); the stores only read the entity,
//! lock the tenant's counter and write what [`decide`] said.
//!
//! The cursor: every applied change takes the next `seq` of its tenant's ONE counter
//! row (`UPDATE sync_tenants SET seq = seq + 1 WHERE tenant = ? RETURNING seq`) inside
//! the change's own transaction. The row lock is held until that transaction commits,
//! so the next writer of the tenant gets seq N+1 only after seq N committed: seq order
//! is commit order, and a reader that saw N+1 can never later find an N it skipped. A
//! timestamp (`modifiedAt`) cursor has no such property: two transactions stamped t1 <
//! t2 may commit t2 first, and a reader at t2 never sees t1.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use miniserde::json::{self, Number, Object, Value};
use tokio::sync::Notify;

/// Events one `POST /api/sync/up` may carry.
pub const MAX_EVENTS: usize = 500;
/// Changes one `POST /api/sync/down` answers at most.
pub const MAX_LIMIT: i64 = 1000;
/// The longest long poll, in seconds.
pub const MAX_WAIT_S: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }

    pub fn parse(s: &str) -> Option<Operation> {
        match s {
            "CREATE" => Some(Operation::Create),
            "UPDATE" => Some(Operation::Update),
            "DELETE" => Some(Operation::Delete),
            _ => None,
        }
    }
}

/// How a conflict (an event whose `base_version` is not the entity's version) is
/// resolved, per (tenant, entity type); `server_wins` without a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    ServerWins,
    ClientWins,
    LastWriterWins,
    FieldMerge,
    Manual,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::ServerWins => "server_wins",
            Strategy::ClientWins => "client_wins",
            Strategy::LastWriterWins => "last_writer_wins",
            Strategy::FieldMerge => "field_merge",
            Strategy::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        [
            Strategy::ServerWins,
            Strategy::ClientWins,
            Strategy::LastWriterWins,
            Strategy::FieldMerge,
            Strategy::Manual,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// A checked event of `/sync/up`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub entity_type: String,
    pub entity_id: String,
    pub operation: Operation,
    /// A JSON object, as miniserde writes it (members in name order).
    pub payload: String,
    pub base_version: i64,
    pub local_version: i64,
    /// Normalised UTC `YYYY-MM-DDTHH:MM:SS.ffffff`: compares as text.
    pub created_at: String,
}

/// An entity as the store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    pub version: i64,
    pub payload: String,
    pub deleted: bool,
    pub updated_at: String,
}

impl Entity {
    /// What a conflict names when the store has no such entity: [`decide`] answers a
    /// conflict only for an entity that exists, so this stands in for an impossible case
    /// rather than failing the request.
    pub fn absent() -> Entity {
        Entity {
            version: 0,
            payload: "null".into(),
            deleted: false,
            updated_at: String::new(),
        }
    }
}

/// What to do with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write this payload as the entity's next version.
    Apply {
        payload: String,
        deleted: bool,
    },
    /// Leave the entity; answer a conflict (`manual`: kept in `sync_conflicts`).
    Conflict {
        manual: bool,
    },
    Reject(String),
}

/// Decides `event` against the entity's `current` state under `strategy`; `base`: the
/// payload of the entity at `event.base_version` (read for field_merge only).
///
/// Defined outcomes (README): no conflict when `base_version` is the entity's version
/// (a CREATE or UPDATE of a deleted entity seen deleted brings it back). A CREATE with
/// base 0 of an entity that exists (created on both sides) is a conflict; so is a
/// DELETE of an entity changed since its base, and an UPDATE of an entity deleted since
/// its base: the strategy decides. field_merge cannot merge a delete: with a DELETE on
/// either side it answers the conflict as server_wins does.
pub fn decide(
    event: &Event,
    current: Option<&Entity>,
    strategy: Strategy,
    base: Option<&str>,
) -> Decision {
    let deleted = event.operation == Operation::Delete;
    let apply = || Decision::Apply {
        payload: event.payload.clone(),
        deleted,
    };
    let Some(current) = current else {
        if event.base_version != 0 {
            return Decision::Reject(format!(
                "sync: {} {:?} is unknown here, but the event's base_version is {}",
                event.entity_type, event.entity_id, event.base_version
            ));
        }
        if deleted {
            return Decision::Reject(format!(
                "sync: {} {:?} is unknown here: nothing to delete",
                event.entity_type, event.entity_id
            ));
        }
        return apply();
    };
    if event.base_version == current.version {
        return apply();
    }
    match strategy {
        Strategy::ServerWins => Decision::Conflict { manual: false },
        Strategy::ClientWins => apply(),
        Strategy::LastWriterWins if event.created_at > current.updated_at => apply(),
        Strategy::LastWriterWins => Decision::Conflict { manual: false },
        Strategy::FieldMerge if deleted || current.deleted => Decision::Conflict { manual: false },
        Strategy::FieldMerge => match merge(&current.payload, base.unwrap_or("{}"), &event.payload)
        {
            Some(payload) => Decision::Apply {
                payload,
                deleted: false,
            },
            None => Decision::Conflict { manual: false },
        },
        Strategy::Manual => Decision::Conflict { manual: true },
    }
}

/// field_merge: the server's payload with the event's members that differ from the
/// base's (a member the event removed is not merged: the device sends its full row,
/// and an absent member is taken as unchanged). `None` if a payload is not an object.
pub fn merge(server: &str, base: &str, event: &str) -> Option<String> {
    let mut merged = object(server)?;
    let base = object(base)?;
    for (name, value) in object(event)? {
        let changed = base
            .get(&name)
            .is_none_or(|b| json::to_string(b) != json::to_string(&value));
        if changed {
            merged.insert(name, value);
        }
    }
    Some(json::to_string(&Value::Object(merged)))
}

fn object(text: &str) -> Option<Object> {
    match json::from_str::<Value>(text).ok()? {
        Value::Object(o) => Some(o),
        _ => None,
    }
}

/// Which of the answer's arrays an event's answer goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Acknowledged,
    Conflict,
    Rejected,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Acknowledged => "acknowledged",
            Kind::Conflict => "conflict",
            Kind::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::Acknowledged, Kind::Conflict, Kind::Rejected]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// An event's answer: its array and its element, as JSON text (kept as is in
/// `sync_events_applied.answer` for a replay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub kind: Kind,
    pub json: String,
    /// The entity's version after this event (acknowledged) or the server's (conflict).
    pub server_version: Option<i64>,
}

impl Answered {
    /// `{"id", "server_version", "seq"}`, with `server_payload` when the stored payload is
    /// not the event's (a field_merge): the device must take it.
    pub fn acknowledged(id: &str, version: i64, seq: i64, merged: Option<&str>) -> Answered {
        let mut s = String::from("{\"id\": ");
        relais_wire::json::push_escaped(&mut s, id, false);
        s.push_str(&format!(", \"server_version\": {version}, \"seq\": {seq}"));
        if let Some(payload) = merged {
            s.push_str(", \"server_payload\": ");
            s.push_str(payload);
        }
        s.push('}');
        Answered {
            kind: Kind::Acknowledged,
            json: s,
            server_version: Some(version),
        }
    }

    /// `{"id", "server_version", "server_payload", "deleted", "manual"}`.
    pub fn conflict(id: &str, current: &Entity, manual: bool) -> Answered {
        let mut s = String::from("{\"id\": ");
        relais_wire::json::push_escaped(&mut s, id, false);
        s.push_str(&format!(
            ", \"server_version\": {}, \"server_payload\": {}, \"deleted\": {}, \"manual\": {manual}}}",
            current.version, current.payload, current.deleted
        ));
        Answered {
            kind: Kind::Conflict,
            json: s,
            server_version: Some(current.version),
        }
    }

    /// `{"id", "error"}` (`id` null when the event had none).
    pub fn rejected(id: Option<&str>, error: &str) -> Answered {
        let mut s = String::from("{\"id\": ");
        match id {
            Some(id) => relais_wire::json::push_escaped(&mut s, id, false),
            None => s.push_str("null"),
        }
        s.push_str(", \"error\": ");
        relais_wire::json::push_escaped(&mut s, error, false);
        s.push('}');
        Answered {
            kind: Kind::Rejected,
            json: s,
            server_version: None,
        }
    }
}

/// One row of the change log, as `/sync/down` answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: i64,
    pub entity_type: String,
    pub entity_id: String,
    pub version: i64,
    pub operation: String,
    pub payload: String,
    pub origin_device: String,
}

impl Change {
    pub fn json(&self) -> String {
        let mut s = format!("{{\"seq\": {}, \"entity_type\": ", self.seq);
        relais_wire::json::push_escaped(&mut s, &self.entity_type, false);
        s.push_str(", \"entity_id\": ");
        relais_wire::json::push_escaped(&mut s, &self.entity_id, false);
        s.push_str(&format!(", \"version\": {}, \"operation\": ", self.version));
        relais_wire::json::push_escaped(&mut s, &self.operation, false);
        s.push_str(", \"payload\": ");
        s.push_str(&self.payload);
        s.push_str(", \"origin_device\": ");
        relais_wire::json::push_escaped(&mut s, &self.origin_device, false);
        s.push('}');
        s
    }
}

/// One row of the audit trail (`sync_log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    pub tenant: String,
    pub device: String,
    /// `up` or `down`.
    pub direction: &'static str,
    pub events: i64,
    pub acknowledged: i64,
    pub conflicts: i64,
    pub rejected: i64,
    /// `SUCCESS`, `PARTIAL` or `FAILED`.
    pub status: &'static str,
    pub duration_ms: i64,
}

/// A `/sync/up` body: the `tenant` member if any, and each event, checked or rejected.
pub struct Up {
    pub tenant: Option<String>,
    pub events: Vec<Result<Event, Answered>>,
}

/// Parses a `/sync/up` body; `Err` only when the body as a whole is not one (each
/// malformed event is rejected on its own).
pub fn parse_up(text: &str) -> Result<Up, String> {
    let Ok(Value::Object(body)) = json::from_str::<Value>(text) else {
        return Err("sync: the body must be a JSON object {\"events\": [...]}".into());
    };
    let mut tenant = None;
    let mut events = None;
    for (name, value) in body {
        match (name.as_str(), value) {
            ("tenant", Value::String(t)) => tenant = Some(t),
            ("tenant", Value::Null) => {}
            ("tenant", _) => return Err("sync: tenant: expected a string".into()),
            ("events", Value::Array(a)) => events = Some(a),
            ("events", _) => return Err("sync: events: expected an array".into()),
            // Other members (a device's own bookkeeping) are ignored.
            _ => {}
        }
    }
    let events = events.ok_or("sync: no \"events\" member")?;
    if events.len() > MAX_EVENTS {
        return Err(format!(
            "sync: {} events, more than {MAX_EVENTS}: send fewer per request",
            events.len()
        ));
    }
    Ok(Up {
        tenant,
        events: events.into_iter().map(parse_event).collect(),
    })
}

fn parse_event(value: Value) -> Result<Event, Answered> {
    let Value::Object(mut o) = value else {
        return Err(Answered::rejected(None, "sync: an event must be an object"));
    };
    let id = match o.remove("id") {
        Some(Value::String(id)) if is_uuid(&id) => id,
        Some(Value::String(id)) => {
            return Err(Answered::rejected(Some(&id), "sync: id: not a UUID"));
        }
        _ => {
            return Err(Answered::rejected(
                None,
                "sync: id: missing (a UUID string)",
            ));
        }
    };
    let reject = |e: String| Answered::rejected(Some(&id), &e);
    let mut text = |name: &str| match o.remove(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(reject(format!(
            "sync: {name}: missing (a non-empty string)"
        ))),
    };
    let entity_type = text("entity_type")?;
    let entity_id = text("entity_id")?;
    let operation = text("operation")?;
    let created_at = text("created_at")?;
    let operation = Operation::parse(&operation).ok_or_else(|| {
        reject(format!(
            "sync: operation: {operation:?} is not CREATE, UPDATE or DELETE"
        ))
    })?;
    let created_at = normalise_time(&created_at).ok_or_else(|| {
        reject(format!(
            "sync: created_at: {created_at:?} is not a UTC time YYYY-MM-DDTHH:MM:SS[.f][Z]"
        ))
    })?;
    let payload = match o.remove("payload") {
        Some(v @ Value::Object(_)) => json::to_string(&v),
        Some(Value::Null) | None if operation == Operation::Delete => "{}".into(),
        _ => return Err(reject("sync: payload: expected an object".into())),
    };
    let mut integer = |name: &str| match o.remove(name) {
        Some(Value::Number(Number::U64(n))) if i64::try_from(n).is_ok() => Ok(n as i64),
        None | Some(Value::Null) => Ok(0),
        _ => Err(reject(format!("sync: {name}: expected an integer ≥ 0"))),
    };
    let base_version = integer("base_version")?;
    let local_version = integer("local_version")?;
    Ok(Event {
        id,
        entity_type,
        entity_id,
        operation,
        payload,
        base_version,
        local_version,
        created_at,
    })
}

/// 8-4-4-4-12 hex digits.
fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][Z|+00:00]` → `YYYY-MM-DDTHH:MM:SS.ffffff`.
pub fn normalise_time(s: &str) -> Option<String> {
    let s = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix("+00:00"))
        .unwrap_or(s);
    let (head, frac) = s.split_at_checked(19)?;
    let shape_ok = head.bytes().enumerate().all(|(i, c)| match i {
        4 | 7 => c == b'-',
        10 => c == b'T' || c == b' ',
        13 | 16 => c == b':',
        _ => c.is_ascii_digit(),
    });
    let frac = match frac.strip_prefix('.') {
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|c| c.is_ascii_digit()) => f,
        None if frac.is_empty() => "",
        _ => return None,
    };
    shape_ok.then(|| format!("{}T{}.{:0<6.6}", &head[..10], &head[11..], frac))
}

/// Wakes the long polls of a tenant when one of its changes commits, in this process
/// (the other servers of a fleet are seen by the poll's 250 ms re-read of the store).
#[derive(Debug, Default)]
pub struct Hub {
    tenants: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Hub {
    pub fn of(&self, tenant: &str) -> Arc<Notify> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(tenants.entry(tenant.to_string()).or_default())
    }

    pub fn changed(&self, tenant: &str) {
        self.of(tenant).notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(op: Operation, base: i64, payload: &str, at: &str) -> Event {
        Event {
            id: "00000000-0000-0000-0000-000000000001".into(),
            entity_type: "GRADE".into(),
            entity_id: "1".into(),
            operation: op,
            payload: payload.into(),
            base_version: base,
            local_version: 1,
            created_at: normalise_time(at).expect("time"),
        }
    }

    fn entity(version: i64, payload: &str, at: &str) -> Entity {
        Entity {
            version,
            payload: payload.into(),
            deleted: false,
            updated_at: normalise_time(at).expect("time"),
        }
    }

    #[test]
    fn times_normalise_to_comparable_text() {
        assert_eq!(
            normalise_time("2026-01-02 03:04:05").as_deref(),
            Some("2026-01-02T03:04:05.000000")
        );
        assert_eq!(
            normalise_time("2026-01-02T03:04:05.12Z").as_deref(),
            Some("2026-01-02T03:04:05.120000")
        );
        assert_eq!(normalise_time("2026-01-02T03:04:05+02:00"), None);
        assert_eq!(normalise_time("yesterday"), None);
    }

    #[test]
    fn strategies() {
        let cur = entity(2, r#"{"a":1,"b":2}"#, "2026-01-01T00:00:10Z");
        let ev = event(
            Operation::Update,
            1,
            r#"{"a":1,"b":3}"#,
            "2026-01-01T00:00:05Z",
        );
        let d = |s, base| decide(&ev, Some(&cur), s, base);
        assert_eq!(
            d(Strategy::ServerWins, None),
            Decision::Conflict { manual: false }
        );
        assert_eq!(
            d(Strategy::Manual, None),
            Decision::Conflict { manual: true }
        );
        assert!(matches!(
            d(Strategy::ClientWins, None),
            Decision::Apply { .. }
        ));
        assert_eq!(
            d(Strategy::LastWriterWins, None),
            Decision::Conflict { manual: false },
            "older"
        );
        assert_eq!(
            d(Strategy::FieldMerge, Some(r#"{"a":0,"b":2}"#)),
            Decision::Apply {
                payload: r#"{"a":1,"b":3}"#.into(),
                deleted: false
            },
            "b changed on the device, a on the server (0 -> 1) and the same on both"
        );
        assert_eq!(
            merge(r#"{"a":5,"b":2}"#, r#"{"a":1,"b":2}"#, r#"{"a":1,"b":3}"#).as_deref(),
            Some(r#"{"a":5,"b":3}"#)
        );
    }
}
