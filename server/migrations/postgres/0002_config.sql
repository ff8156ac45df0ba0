-- Seed 001's configuration backend: the sites and their devices, the source of truth
-- of `GET /config/{site_token}`. Written through the admin API (server/src/http/admin.rs).
-- The same names and constraints as the SQLite store's, in PostgreSQL's own types.
CREATE TABLE sites (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              TEXT NOT NULL,
    -- The site token is a secret: only its SHA-256 (hex) is kept.
    token_sha256      TEXT NOT NULL UNIQUE,
    timezone          TEXT NOT NULL,
    doubt_after_days  BIGINT NOT NULL DEFAULT 2,
    ok_interval_s     BIGINT NOT NULL DEFAULT 300,
    ko_interval_s     BIGINT NOT NULL DEFAULT 60,
    -- The configuration hash (seed 001, "Calcul du Hash") as of the last change, and
    -- when it last changed (answered as ISO-8601 UTC with `+00:00`, as on SQLite).
    config_version    TEXT NOT NULL,
    config_updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE devices (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id       BIGINT NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    ip            TEXT NOT NULL,
    name          TEXT NOT NULL,
    building      TEXT NOT NULL,
    floor         TEXT NOT NULL,
    room          TEXT NOT NULL,
    type          TEXT NOT NULL,
    driver        TEXT NOT NULL,
    -- JSON objects: {"snmp": {...}, "pjlink": {...}} and
    -- {"always_on", "alert_after_s", "schedule"}. `json`, not `jsonb`: it keeps the text
    -- as the server wrote it (jsonb would rewrite numbers such as 1e2 as 100, and the
    -- hash, which tells 100.0 from 100, would move).
    driver_config JSON NOT NULL DEFAULT '{}',
    expectations  JSON NOT NULL DEFAULT '{}',
    UNIQUE (site_id, ip)
);
