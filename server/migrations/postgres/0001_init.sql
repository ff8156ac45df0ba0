-- One row per stored push; `id` is the remote id answered to the device. The same names
-- as the SQLite store's, in PostgreSQL's own types.
CREATE TABLE received (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id       TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    -- NULL for a push without Idempotency-Key: NULLs never conflict, so each is a new row.
    idempotency_key TEXT,
    local_id        TEXT,
    received_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The JSON as sent (`json` keeps the text as it came), its media field replaced by
    -- {"media_path", "size", "sha256"}.
    body            JSON NOT NULL,
    body_sha256     TEXT NOT NULL,
    media_path      TEXT,
    media_size      BIGINT,
    media_sha256    TEXT,
    UNIQUE (device_id, idempotency_key)
);

-- A JSON number, or NULL for anything else: one odd row must not break the view.
CREATE FUNCTION relais_json_number(v JSON) RETURNS NUMERIC
LANGUAGE SQL IMMUTABLE AS
$$ SELECT CASE WHEN json_typeof(v) = 'number' THEN (v #>> '{}')::numeric END $$;

CREATE VIEW evenements AS
SELECT id, device_id, local_id, received_at,
       body->>'date' AS date,
       relais_json_number(body->'capteur'->'id') AS capteur_id,
       body->'capteur'->>'nom' AS capteur_nom,
       relais_json_number(body->'capteur'->'etat') AS capteur_etat
FROM received WHERE endpoint = '/api/evenements';

CREATE VIEW media AS
SELECT id, device_id, local_id, received_at,
       body->>'date' AS date,
       relais_json_number(body->'capteur'->'id') AS capteur_id,
       body->'capteur'->>'nom' AS capteur_nom,
       relais_json_number(body->'numero_camera') AS numero_camera,
       media_path, media_size, media_sha256
FROM received WHERE endpoint = '/api/media';
