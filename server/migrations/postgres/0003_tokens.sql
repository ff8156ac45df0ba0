-- Bearer tokens (README, "Access"): only the SHA-256 of a token is kept, so the table
-- leaks no credential; the UNIQUE index is also the lookup that authenticates a request.
CREATE TABLE tokens (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('device', 'admin')),
    -- The device whose rows a device token may push; NULL for an admin token.
    device_id  TEXT,
    -- The admin's name, or the operator's note on a device token.
    note       TEXT,
    sha256     TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ,
    CHECK ((kind = 'device') = (device_id IS NOT NULL))
);
