-- What the server knows of its agents (README "Heartbeats"). Times are Unix seconds;
-- an hour is the Unix second it starts at (a multiple of 3600).

-- The latest heartbeat of each device, with the figures the console filters on.
CREATE TABLE heartbeats_latest (
    device_id     TEXT PRIMARY KEY,
    received_at   BIGINT NOT NULL,
    -- The heartbeat as received (relais_wire::heartbeat::Heartbeat).
    json          TEXT NOT NULL,
    pass_ok       BOOLEAN NOT NULL,
    backlog       BIGINT NOT NULL,
    failed        BIGINT NOT NULL,
    config_hash   TEXT,
    agent_version TEXT NOT NULL,
    interval_s    BIGINT NOT NULL
);

-- One row per device and hour, the hour's latest heartbeat (UPSERT): at most 24 rows
-- per device and day, removed after --history-days.
CREATE TABLE heartbeat_hours (
    device_id TEXT NOT NULL,
    hour      BIGINT NOT NULL,
    backlog   BIGINT NOT NULL,
    failed    BIGINT NOT NULL,
    pass_ok   BOOLEAN NOT NULL,
    PRIMARY KEY (device_id, hour)
);
CREATE INDEX heartbeat_hours_hour ON heartbeat_hours (hour);

-- Rows stored new per device and hour, added to by every server's flush
-- (`rows = rows + excluded.rows`), removed after --history-days.
CREATE TABLE received_hours (
    device_id TEXT NOT NULL,
    hour      BIGINT NOT NULL,
    rows      BIGINT NOT NULL,
    PRIMARY KEY (device_id, hour)
);
CREATE INDEX received_hours_hour ON received_hours (hour);

-- The last configuration pull made with each device's token: which site the device
-- belongs to and which hash it was served.
CREATE TABLE config_pulls (
    device_id TEXT PRIMARY KEY,
    site_id   BIGINT NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    hash      TEXT NOT NULL,
    pulled_at BIGINT NOT NULL
);
