-- Two-way sync, the server (README, "Two-way sync: the server").
-- A device token belongs to a tenant; a device token without one cannot sync.
ALTER TABLE tokens ADD COLUMN tenant TEXT;

-- One row per tenant: `seq` is the tenant's ONE serialized change counter. A change's
-- transaction takes the next value with `UPDATE ... SET seq = seq + 1 RETURNING seq`;
-- the row lock (SQLite: the database's single writer) is held to the commit, so the
-- seq order is the commit order and a reader never sees seq N+1 without N.
CREATE TABLE sync_tenants (
    tenant TEXT PRIMARY KEY,
    seq    INTEGER NOT NULL DEFAULT 0
);

-- The current state of each entity.
CREATE TABLE sync_entities (
    tenant      TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    version     INTEGER NOT NULL,
    payload     TEXT NOT NULL,
    deleted     INTEGER NOT NULL DEFAULT 0,
    -- The writing event's `created_at` (the writer's clock, normalised): what
    -- last_writer_wins compares.
    updated_at  TEXT NOT NULL,
    updated_by  TEXT NOT NULL,
    PRIMARY KEY (tenant, entity_type, entity_id)
);

-- The change log the cursor walks; `payload` per version (field_merge reads the base).
CREATE TABLE sync_changes (
    tenant        TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    entity_type   TEXT NOT NULL,
    entity_id     TEXT NOT NULL,
    version       INTEGER NOT NULL,
    operation     TEXT NOT NULL CHECK (operation IN ('CREATE', 'UPDATE', 'DELETE')),
    payload       TEXT NOT NULL,
    origin_device TEXT NOT NULL,
    PRIMARY KEY (tenant, seq)
);
CREATE INDEX sync_changes_version ON sync_changes (tenant, entity_type, entity_id, version);

-- Idempotency: the primary key decides whether an event was seen; `answer` is its first
-- answer, repeated to a replay.
CREATE TABLE sync_events_applied (
    tenant         TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    server_version INTEGER,
    answer         TEXT NOT NULL,
    PRIMARY KEY (tenant, event_id)
);

-- Conflict strategy per entity type; an entity type without a row: server_wins.
CREATE TABLE sync_entity_types (
    tenant      TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    strategy    TEXT NOT NULL CHECK (strategy IN
        ('server_wins', 'client_wins', 'last_writer_wins', 'field_merge', 'manual')),
    PRIMARY KEY (tenant, entity_type)
);

-- Conflicts kept for a person to resolve (strategy manual), both versions.
CREATE TABLE sync_conflicts (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant         TEXT NOT NULL,
    entity_type    TEXT NOT NULL,
    entity_id      TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    device         TEXT NOT NULL,
    base_version   INTEGER NOT NULL,
    server_version INTEGER NOT NULL,
    server_payload TEXT NOT NULL,
    client_payload TEXT NOT NULL,
    operation      TEXT NOT NULL,
    at             TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

-- The audit trail: one row per sync request.
CREATE TABLE sync_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant       TEXT NOT NULL,
    device       TEXT NOT NULL,
    direction    TEXT NOT NULL CHECK (direction IN ('up', 'down')),
    events       INTEGER NOT NULL,
    acknowledged INTEGER NOT NULL,
    conflicts    INTEGER NOT NULL,
    rejected     INTEGER NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('SUCCESS', 'PARTIAL', 'FAILED')),
    duration_ms  INTEGER NOT NULL,
    at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
