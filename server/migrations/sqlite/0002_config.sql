-- Seed 001's configuration backend: the sites and their devices, the source of truth
-- of `GET /config/{site_token}`. Written through the admin API (server/src/http/admin.rs).
CREATE TABLE sites (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT NOT NULL,
    -- The site token is a secret: only its SHA-256 (hex) is kept.
    token_sha256      TEXT NOT NULL UNIQUE,
    timezone          TEXT NOT NULL,
    doubt_after_days  INTEGER NOT NULL DEFAULT 2,
    ok_interval_s     INTEGER NOT NULL DEFAULT 300,
    ko_interval_s     INTEGER NOT NULL DEFAULT 60,
    -- The configuration hash (seed 001, "Calcul du Hash") as of the last change, and
    -- when it last changed (ISO-8601 UTC, `+00:00`).
    config_version    TEXT NOT NULL,
    config_updated_at TEXT NOT NULL
);

CREATE TABLE devices (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id       INTEGER NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    ip            TEXT NOT NULL,
    name          TEXT NOT NULL,
    building      TEXT NOT NULL,
    floor         TEXT NOT NULL,
    room          TEXT NOT NULL,
    type          TEXT NOT NULL,
    driver        TEXT NOT NULL,
    -- JSON objects as text: {"snmp": {...}, "pjlink": {...}} and
    -- {"always_on", "alert_after_s", "schedule"}.
    driver_config TEXT NOT NULL DEFAULT '{}',
    expectations  TEXT NOT NULL DEFAULT '{}',
    UNIQUE (site_id, ip)
);
