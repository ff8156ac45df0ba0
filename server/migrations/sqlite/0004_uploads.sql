-- Resumable media uploads (tus 1.0, README "Resumable media uploads"): one row per
-- upload in progress, or completed and kept until it expires. The UNIQUE constraint is
-- what makes a POST repeated after a lost answer find the same upload: the insert is
-- `ON CONFLICT DO NOTHING`, never an application read-then-write.
CREATE TABLE uploads (
    -- Random, the last segment of `Location: /api/uploads/<id>` and the name of the
    -- partial file `<media-dir>/.uploads/<id>.part`.
    id              TEXT PRIMARY KEY,
    device_id       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    -- The row's `/api/<name>`, the JSON member the BLOB belongs to, the row's other
    -- members (a JSON object as text) and the SHA-256 (hex) of the whole BLOB.
    endpoint        TEXT NOT NULL,
    field           TEXT NOT NULL,
    json            TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    length          INTEGER NOT NULL,
    -- Bytes received, fsynced in the partial file (`offset` is an SQL keyword).
    upload_offset   INTEGER NOT NULL DEFAULT 0,
    -- Unix seconds: the upload is gone at this time (its row and its partial file).
    expires_at      INTEGER NOT NULL,
    -- Unix seconds until which one request appends a chunk: another one gets 409. Set
    -- by a conditional update, so that it holds across the servers of a fleet.
    claimed_until   INTEGER,
    -- The `received` row of the completed upload.
    row_id          INTEGER,
    UNIQUE (device_id, idempotency_key)
);

CREATE INDEX uploads_expires_at ON uploads (expires_at);
