//! Two-way sync on SQLite (migration 0007), statement for statement those of
//! store/postgres/sync.rs; the decisions are [`crate::sync::decide`]'s. A request is one
//! `BEGIN IMMEDIATE` transaction: SQLite's single writer serialises it whole, and the
//! tenant's counter row is taken first, as on PostgreSQL.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::sync::{self, Answered, Change, Decision, Entity, Event, Kind, LogRow, Strategy};

/// Creates the tenant's counter row if needed; on PostgreSQL this is what takes the
/// row lock for the whole request.
const LOCK_TENANT: &str = "INSERT INTO sync_tenants (tenant, seq) VALUES (?1, 0)
     ON CONFLICT (tenant) DO UPDATE SET seq = sync_tenants.seq RETURNING seq";
/// The next seq of the tenant, allocated inside the change's transaction.
const NEXT_SEQ: &str = "UPDATE sync_tenants SET seq = seq + 1 WHERE tenant = ?1 RETURNING seq";
/// The primary key decides whether the event was seen: no row returned, a replay.
const CLAIM_EVENT: &str = "INSERT INTO sync_events_applied (tenant, event_id, outcome, answer)
     VALUES (?1, ?2, 'pending', '') ON CONFLICT (tenant, event_id) DO NOTHING RETURNING 1";
const FIRST_ANSWER: &str = "SELECT outcome, answer, server_version FROM sync_events_applied WHERE tenant = ?1 AND event_id = ?2";
const RECORD_ANSWER: &str = "UPDATE sync_events_applied SET outcome = ?3, answer = ?4,
     server_version = ?5 WHERE tenant = ?1 AND event_id = ?2";
const ENTITY: &str = "SELECT version, payload, deleted, updated_at FROM sync_entities
     WHERE tenant = ?1 AND entity_type = ?2 AND entity_id = ?3";
const STRATEGY: &str =
    "SELECT strategy FROM sync_entity_types WHERE tenant = ?1 AND entity_type = ?2";
const PAYLOAD_AT: &str = "SELECT payload FROM sync_changes
     WHERE tenant = ?1 AND entity_type = ?2 AND entity_id = ?3 AND version = ?4 LIMIT 1";
const UPSERT_ENTITY: &str = "INSERT INTO sync_entities
         (tenant, entity_type, entity_id, version, payload, deleted, updated_at, updated_by)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
     ON CONFLICT (tenant, entity_type, entity_id) DO UPDATE SET version = excluded.version,
         payload = excluded.payload, deleted = excluded.deleted,
         updated_at = excluded.updated_at, updated_by = excluded.updated_by";
const INSERT_CHANGE: &str = "INSERT INTO sync_changes
         (tenant, seq, entity_type, entity_id, version, operation, payload, origin_device)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const INSERT_CONFLICT: &str = "INSERT INTO sync_conflicts (tenant, entity_type, entity_id,
         event_id, device, base_version, server_version, server_payload, client_payload,
         operation)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";
const CHANGES: &str = "SELECT seq, entity_type, entity_id, version, operation, payload,
         origin_device
     FROM sync_changes WHERE tenant = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3";
const SET_STRATEGY: &str = "INSERT INTO sync_entity_types (tenant, entity_type, strategy)
     VALUES (?1, ?2, ?3)
     ON CONFLICT (tenant, entity_type) DO UPDATE SET strategy = excluded.strategy";
const INSERT_LOG: &str = "INSERT INTO sync_log (tenant, device, direction, events,
         acknowledged, conflicts, rejected, status, duration_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

pub fn up(
    conn: &mut Connection,
    tenant: &str,
    device: &str,
    events: &[Event],
) -> rusqlite::Result<Vec<Answered>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let _seq: i64 = tx.query_row(LOCK_TENANT, [tenant], |r| r.get(0))?;
    let mut answers = Vec::with_capacity(events.len());
    for event in events {
        let claimed = tx
            .query_row(CLAIM_EVENT, params![tenant, event.id], |_| Ok(()))
            .optional()?;
        if claimed.is_none() {
            let (outcome, json, server_version): (String, String, Option<i64>) =
                tx.query_row(FIRST_ANSWER, params![tenant, event.id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            let kind = Kind::parse(&outcome).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("sync_events_applied.outcome: {outcome:?}").into(),
                )
            })?;
            answers.push(Answered {
                kind,
                json,
                server_version,
            });
            continue;
        }
        let answer = apply(&tx, tenant, device, event)?;
        tx.execute(
            RECORD_ANSWER,
            params![
                tenant,
                event.id,
                answer.kind.as_str(),
                answer.json,
                answer.server_version
            ],
        )?;
        answers.push(answer);
    }
    tx.commit()?;
    Ok(answers)
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    device: &str,
    event: &Event,
) -> rusqlite::Result<Answered> {
    let key = params![tenant, event.entity_type, event.entity_id];
    let current = tx
        .query_row(ENTITY, key, |r| {
            Ok(Entity {
                version: r.get(0)?,
                payload: r.get(1)?,
                deleted: r.get(2)?,
                updated_at: r.get(3)?,
            })
        })
        .optional()?;
    let strategy = tx
        .query_row(STRATEGY, params![tenant, event.entity_type], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .and_then(|s| Strategy::parse(&s))
        .unwrap_or_default();
    let base = if strategy == Strategy::FieldMerge && event.base_version > 0 {
        tx.query_row(
            PAYLOAD_AT,
            params![
                tenant,
                event.entity_type,
                event.entity_id,
                event.base_version
            ],
            |r| r.get::<_, String>(0),
        )
        .optional()?
    } else {
        None
    };
    Ok(
        match sync::decide(event, current.as_ref(), strategy, base.as_deref()) {
            Decision::Reject(error) => Answered::rejected(Some(&event.id), &error),
            Decision::Conflict { manual } => {
                let current = current.unwrap_or_else(Entity::absent);
                if manual {
                    tx.execute(
                        INSERT_CONFLICT,
                        params![
                            tenant,
                            event.entity_type,
                            event.entity_id,
                            event.id,
                            device,
                            event.base_version,
                            current.version,
                            current.payload,
                            event.payload,
                            event.operation.as_str()
                        ],
                    )?;
                }
                Answered::conflict(&event.id, &current, manual)
            }
            Decision::Apply { payload, deleted } => {
                let version = current.as_ref().map_or(0, |c| c.version) + 1;
                let seq: i64 = tx.query_row(NEXT_SEQ, [tenant], |r| r.get(0))?;
                tx.execute(
                    UPSERT_ENTITY,
                    params![
                        tenant,
                        event.entity_type,
                        event.entity_id,
                        version,
                        payload,
                        deleted,
                        event.created_at,
                        device
                    ],
                )?;
                tx.execute(
                    INSERT_CHANGE,
                    params![
                        tenant,
                        seq,
                        event.entity_type,
                        event.entity_id,
                        version,
                        event.operation.as_str(),
                        payload,
                        device
                    ],
                )?;
                let merged = (payload != event.payload).then_some(payload.as_str());
                Answered::acknowledged(&event.id, version, seq, merged)
            }
        },
    )
}

pub fn down(
    conn: &Connection,
    tenant: &str,
    cursor: i64,
    limit: i64,
) -> rusqlite::Result<Vec<Change>> {
    let mut statement = conn.prepare_cached(CHANGES)?;
    statement
        .query_map(params![tenant, cursor, limit], |r| {
            Ok(Change {
                seq: r.get(0)?,
                entity_type: r.get(1)?,
                entity_id: r.get(2)?,
                version: r.get(3)?,
                operation: r.get(4)?,
                payload: r.get(5)?,
                origin_device: r.get(6)?,
            })
        })?
        .collect()
}

pub fn set_strategy(
    conn: &Connection,
    tenant: &str,
    entity_type: &str,
    strategy: Strategy,
) -> rusqlite::Result<()> {
    conn.execute(
        SET_STRATEGY,
        params![tenant, entity_type, strategy.as_str()],
    )
    .map(drop)
}

pub fn log(conn: &Connection, row: &LogRow) -> rusqlite::Result<()> {
    conn.execute(
        INSERT_LOG,
        params![
            row.tenant,
            row.device,
            row.direction,
            row.events,
            row.acknowledged,
            row.conflicts,
            row.rejected,
            row.status,
            row.duration_ms
        ],
    )
    .map(drop)
}
