//! Two-way sync on PostgreSQL (migration 0007), statement for statement those of
//! store/sqlite/sync.rs; the decisions are [`crate::sync::decide`]'s. A request is one
//! transaction whose first statement ([`LOCK_TENANT`]) takes the tenant's counter row
//! lock, held to the commit: the writers of one tenant are serialised, so the seq
//! order is the commit order (README, "Two-way sync: the server"), and the events'
//! claims in `sync_events_applied` cannot deadlock (every claimant holds the lock).
//! The statements are public for the test that holds the counter from a second
//! connection (server/tests/sync.rs).

use deadpool_postgres::{Client, GenericClient};

use super::{Fault, exec, first, rows};
use crate::store::StoreError;
use crate::sync::{self, Answered, Change, Decision, Entity, Event, Kind, LogRow, Strategy};

/// Creates the tenant's counter row if needed; on PostgreSQL this is what takes the
/// row lock for the whole request.
pub const LOCK_TENANT: &str = "INSERT INTO sync_tenants (tenant, seq) VALUES ($1, 0)
     ON CONFLICT (tenant) DO UPDATE SET seq = sync_tenants.seq RETURNING seq";
/// The next seq of the tenant, allocated inside the change's transaction.
pub const NEXT_SEQ: &str = "UPDATE sync_tenants SET seq = seq + 1 WHERE tenant = $1 RETURNING seq";
/// The primary key decides whether the event was seen: no row returned, a replay.
const CLAIM_EVENT: &str = "INSERT INTO sync_events_applied (tenant, event_id, outcome, answer)
     VALUES ($1, $2, 'pending', '') ON CONFLICT (tenant, event_id) DO NOTHING RETURNING 1";
const FIRST_ANSWER: &str = "SELECT outcome, answer, server_version FROM sync_events_applied WHERE tenant = $1 AND event_id = $2";
const RECORD_ANSWER: &str = "UPDATE sync_events_applied SET outcome = $3, answer = $4,
     server_version = $5 WHERE tenant = $1 AND event_id = $2";
const ENTITY: &str = "SELECT version, payload, deleted, updated_at FROM sync_entities
     WHERE tenant = $1 AND entity_type = $2 AND entity_id = $3";
const STRATEGY: &str =
    "SELECT strategy FROM sync_entity_types WHERE tenant = $1 AND entity_type = $2";
const PAYLOAD_AT: &str = "SELECT payload FROM sync_changes
     WHERE tenant = $1 AND entity_type = $2 AND entity_id = $3 AND version = $4 LIMIT 1";
const UPSERT_ENTITY: &str = "INSERT INTO sync_entities
         (tenant, entity_type, entity_id, version, payload, deleted, updated_at, updated_by)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
     ON CONFLICT (tenant, entity_type, entity_id) DO UPDATE SET version = excluded.version,
         payload = excluded.payload, deleted = excluded.deleted,
         updated_at = excluded.updated_at, updated_by = excluded.updated_by";
pub const INSERT_CHANGE: &str = "INSERT INTO sync_changes
         (tenant, seq, entity_type, entity_id, version, operation, payload, origin_device)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const INSERT_CONFLICT: &str = "INSERT INTO sync_conflicts (tenant, entity_type, entity_id,
         event_id, device, base_version, server_version, server_payload, client_payload,
         operation)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
const CHANGES: &str = "SELECT seq, entity_type, entity_id, version, operation, payload,
         origin_device
     FROM sync_changes WHERE tenant = $1 AND seq > $2 ORDER BY seq LIMIT $3";
const SET_STRATEGY: &str = "INSERT INTO sync_entity_types (tenant, entity_type, strategy)
     VALUES ($1, $2, $3)
     ON CONFLICT (tenant, entity_type) DO UPDATE SET strategy = excluded.strategy";
const INSERT_LOG: &str = "INSERT INTO sync_log (tenant, device, direction, events,
         acknowledged, conflicts, rejected, status, duration_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

pub(super) async fn up(
    client: &mut Client,
    tenant: &str,
    device: &str,
    events: &[Event],
) -> Result<Vec<Answered>, Fault> {
    let tx = client.transaction().await?;
    first(&tx, LOCK_TENANT, &[&tenant]).await?;
    let mut answers = Vec::with_capacity(events.len());
    for event in events {
        if first(&tx, CLAIM_EVENT, &[&tenant, &event.id])
            .await?
            .is_none()
        {
            let row = first(&tx, FIRST_ANSWER, &[&tenant, &event.id])
                .await?
                .ok_or_else(|| failed("an event neither claimed nor answered"))?;
            let outcome: String = row.get(0);
            let kind = Kind::parse(&outcome)
                .ok_or_else(|| failed(&format!("sync_events_applied.outcome: {outcome:?}")))?;
            answers.push(Answered {
                kind,
                json: row.get(1),
                server_version: row.get(2),
            });
            continue;
        }
        let answer = apply(&tx, tenant, device, event).await?;
        exec(
            &tx,
            RECORD_ANSWER,
            &[
                &tenant,
                &event.id,
                &answer.kind.as_str(),
                &answer.json,
                &answer.server_version,
            ],
        )
        .await?;
        answers.push(answer);
    }
    tx.commit().await?;
    Ok(answers)
}

fn failed(detail: &str) -> Fault {
    Fault::Store(StoreError::Failed(format!("sync: {detail}")))
}

async fn apply(
    tx: &impl GenericClient,
    tenant: &str,
    device: &str,
    event: &Event,
) -> Result<Answered, Fault> {
    let current = first(tx, ENTITY, &[&tenant, &event.entity_type, &event.entity_id])
        .await?
        .map(|r| Entity {
            version: r.get(0),
            payload: r.get(1),
            deleted: r.get(2),
            updated_at: r.get(3),
        });
    let strategy = first(tx, STRATEGY, &[&tenant, &event.entity_type])
        .await?
        .and_then(|r| Strategy::parse(&r.get::<_, String>(0)))
        .unwrap_or_default();
    let base: Option<String> = if strategy == Strategy::FieldMerge && event.base_version > 0 {
        first(
            tx,
            PAYLOAD_AT,
            &[
                &tenant,
                &event.entity_type,
                &event.entity_id,
                &event.base_version,
            ],
        )
        .await?
        .map(|r| r.get(0))
    } else {
        None
    };
    Ok(
        match sync::decide(event, current.as_ref(), strategy, base.as_deref()) {
            Decision::Reject(error) => Answered::rejected(Some(&event.id), &error),
            Decision::Conflict { manual } => {
                let current = current.unwrap_or_else(Entity::absent);
                if manual {
                    exec(
                        tx,
                        INSERT_CONFLICT,
                        &[
                            &tenant,
                            &event.entity_type,
                            &event.entity_id,
                            &event.id,
                            &device,
                            &event.base_version,
                            &current.version,
                            &current.payload,
                            &event.payload,
                            &event.operation.as_str(),
                        ],
                    )
                    .await?;
                }
                Answered::conflict(&event.id, &current, manual)
            }
            Decision::Apply { payload, deleted } => {
                let version = current.as_ref().map_or(0, |c| c.version) + 1;
                let seq: i64 = first(tx, NEXT_SEQ, &[&tenant])
                    .await?
                    .ok_or_else(|| failed("the tenant's counter row is missing"))?
                    .get(0);
                exec(
                    tx,
                    UPSERT_ENTITY,
                    &[
                        &tenant,
                        &event.entity_type,
                        &event.entity_id,
                        &version,
                        &payload,
                        &deleted,
                        &event.created_at,
                        &device,
                    ],
                )
                .await?;
                exec(
                    tx,
                    INSERT_CHANGE,
                    &[
                        &tenant,
                        &seq,
                        &event.entity_type,
                        &event.entity_id,
                        &version,
                        &event.operation.as_str(),
                        &payload,
                        &device,
                    ],
                )
                .await?;
                let merged = (payload != event.payload).then_some(payload.as_str());
                Answered::acknowledged(&event.id, version, seq, merged)
            }
        },
    )
}

pub(super) async fn down(
    client: &Client,
    tenant: &str,
    cursor: i64,
    limit: i64,
) -> Result<Vec<Change>, Fault> {
    Ok(rows(client, CHANGES, &[&tenant, &cursor, &limit])
        .await?
        .iter()
        .map(|r| Change {
            seq: r.get(0),
            entity_type: r.get(1),
            entity_id: r.get(2),
            version: r.get(3),
            operation: r.get(4),
            payload: r.get(5),
            origin_device: r.get(6),
        })
        .collect())
}

pub(super) async fn set_strategy(
    client: &Client,
    tenant: &str,
    entity_type: &str,
    strategy: Strategy,
) -> Result<(), Fault> {
    exec(
        client,
        SET_STRATEGY,
        &[&tenant, &entity_type, &strategy.as_str()],
    )
    .await?;
    Ok(())
}

pub(super) async fn log(client: &Client, row: &LogRow) -> Result<(), Fault> {
    exec(
        client,
        INSERT_LOG,
        &[
            &row.tenant,
            &row.device,
            &row.direction,
            &row.events,
            &row.acknowledged,
            &row.conflicts,
            &row.rejected,
            &row.status,
            &row.duration_ms,
        ],
    )
    .await?;
    Ok(())
}
