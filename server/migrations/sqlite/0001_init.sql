-- One row per stored push; `id` is the remote id answered to the device.
CREATE TABLE received (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id       TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    -- NULL for a push without Idempotency-Key: NULLs never conflict, so each is a new row.
    idempotency_key TEXT,
    local_id        TEXT,
    received_at     TEXT NOT NULL,
    -- The JSON as sent, its media field replaced by {"media_path", "size", "sha256"}.
    body            TEXT NOT NULL,
    body_sha256     TEXT NOT NULL,
    media_path      TEXT,
    media_size      INTEGER,
    media_sha256    TEXT,
    UNIQUE (device_id, idempotency_key)
);

CREATE VIEW evenements AS
SELECT id, device_id, local_id, received_at,
       json_extract(body, '$.date') AS date,
       json_extract(body, '$.capteur.id') AS capteur_id,
       json_extract(body, '$.capteur.nom') AS capteur_nom,
       json_extract(body, '$.capteur.etat') AS capteur_etat
FROM received WHERE endpoint = '/api/evenements';

CREATE VIEW media AS
SELECT id, device_id, local_id, received_at,
       json_extract(body, '$.date') AS date,
       json_extract(body, '$.capteur.id') AS capteur_id,
       json_extract(body, '$.capteur.nom') AS capteur_nom,
       json_extract(body, '$.numero_camera') AS numero_camera,
       media_path, media_size, media_sha256
FROM received WHERE endpoint = '/api/media';
