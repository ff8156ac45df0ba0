-- The fleet console (README, "Fleet console"). Its sessions live here, not in a server's
-- memory: several servers behind a balancer share one store. A session is found by the
-- SHA-256 of the random id its cookie holds (the cookie value itself is never stored);
-- `token_sha256` is the admin token it was opened with, checked on every request so a
-- session dies with its token. Times are Unix seconds.
CREATE TABLE console_sessions (
    id_sha256    TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    -- Every POST form of the session carries it; compared in constant time.
    csrf         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);

-- The configurations a site served, one row each time its hash moved (written in the
-- transaction that moves `sites.config_version`), the last 50 per site kept. `body` is
-- the served JSON as served (secrets included, as the devices table has them); the
-- console masks it before showing or diffing it.
CREATE TABLE config_versions (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    site_id    BIGINT NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    hash       TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX config_versions_site ON config_versions (site_id, id);
-- The device page's recent media: the media rows of one device, newest first.
CREATE INDEX received_media_device ON received (device_id, id) WHERE endpoint = '/api/media';
