-- iotgw registry schema, version 1.
--
-- Portable on purpose: a PostgreSQL backend mirrors these tables one to one, changing only
-- the types (TEXT times -> timestamptz, TEXT ids -> uuid, TEXT JSON -> jsonb,
-- INTEGER PRIMARY KEY AUTOINCREMENT -> bigint GENERATED ALWAYS AS IDENTITY, and
-- COLLATE "C" on devices.device_id so ordering matches SQLite's BINARY collation).
--
-- Conventions:
--   * ids are UUIDs as lowercase hyphenated text;
--   * times are UTC RFC 3339 text with exactly six fraction digits and a 'Z'
--     (e.g. 2024-05-01T12:00:00.000000Z), so text order is time order;
--   * JSON is text;
--   * option sets are their Dataverse integer values.

CREATE TABLE devices (
    id                          TEXT    NOT NULL PRIMARY KEY,
    device_id                   TEXT    NOT NULL,
    name                        TEXT    NOT NULL,
    provider_instance           TEXT    NOT NULL,
    category                    TEXT,
    account                     TEXT,
    connection_state            BOOLEAN NOT NULL DEFAULT FALSE,
    connection_state_updated_at TEXT,
    last_activity_time          TEXT,
    reported_properties         TEXT,
    settings                    TEXT,
    tags                        TEXT    NOT NULL DEFAULT '{}',
    registration_status         INTEGER NOT NULL,
    registration_message        TEXT,
    is_simulated                INTEGER NOT NULL,
    created_at                  TEXT    NOT NULL,
    updated_at                  TEXT    NOT NULL
);
CREATE UNIQUE INDEX devices_device_id ON devices (device_id);
CREATE INDEX devices_provider_instance ON devices (provider_instance, device_id);

CREATE TABLE registration_history (
    id                TEXT    NOT NULL PRIMARY KEY,
    device            TEXT    NOT NULL REFERENCES devices (id),
    device_id         TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    action            INTEGER NOT NULL,
    provider_instance TEXT    NOT NULL,
    created_at        TEXT    NOT NULL
);
CREATE INDEX registration_history_device ON registration_history (device, created_at, id);

CREATE TABLE categories (
    id          TEXT NOT NULL PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT,
    created_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX categories_name ON categories (name);

CREATE TABLE alerts (
    id                     TEXT    NOT NULL PRIMARY KEY,
    description            TEXT    NOT NULL,
    alert_data             TEXT    NOT NULL,
    alert_time             TEXT    NOT NULL,
    alert_token            TEXT    NOT NULL,
    alert_type             INTEGER NOT NULL,
    priority_score         INTEGER,
    device                 TEXT    NOT NULL REFERENCES devices (id),
    device_id              TEXT    NOT NULL,
    parent_alert           TEXT    REFERENCES alerts (id),
    parent_alert_token     TEXT,
    last_command_sent      TEXT,
    last_command_sent_time TEXT,
    statecode              INTEGER NOT NULL,
    statuscode             INTEGER NOT NULL,
    rule                   TEXT    NOT NULL,
    provider_instance      TEXT    NOT NULL,
    -- Not part of msdyn_iotalert: what debounce groups on.
    debounce_key           TEXT    NOT NULL,
    created_at             TEXT    NOT NULL
);
-- The token is the idempotency key: a redelivered message can never make a second alert,
-- even when two replicas insert it at the same moment.
CREATE UNIQUE INDEX alerts_alert_token ON alerts (alert_token);
CREATE INDEX alerts_debounce ON alerts (debounce_key, alert_time);
CREATE INDEX alerts_created ON alerts (created_at, id);
CREATE INDEX alerts_device_created ON alerts (device_id, created_at, id);
CREATE INDEX alerts_parent ON alerts (parent_alert);

CREATE TABLE commands (
    id                TEXT    NOT NULL PRIMARY KEY,
    name              TEXT    NOT NULL,
    message           TEXT    NOT NULL,
    status            INTEGER NOT NULL,
    status_reason     TEXT,
    device            TEXT    NOT NULL REFERENCES devices (id),
    device_id         TEXT    NOT NULL,
    parent_alert      TEXT    REFERENCES alerts (id),
    correlation_id    TEXT    NOT NULL,
    provider_instance TEXT    NOT NULL,
    created_at        TEXT    NOT NULL,
    updated_at        TEXT    NOT NULL
);
CREATE UNIQUE INDEX commands_correlation_id ON commands (correlation_id);
CREATE INDEX commands_created ON commands (created_at, id);
CREATE INDEX commands_device_created ON commands (device_id, created_at, id);
CREATE INDEX commands_parent_alert ON commands (parent_alert);

CREATE TABLE outbox (
    id              INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    sink            TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TEXT    NOT NULL,
    leased_until    TEXT,
    created_at      TEXT    NOT NULL
);
-- One item per (sink, key): an alert is never queued twice for the same sink.
CREATE UNIQUE INDEX outbox_sink_key ON outbox (sink, idempotency_key);
CREATE INDEX outbox_due ON outbox (sink, next_attempt_at, id);

CREATE TABLE dead_letters (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    source     TEXT    NOT NULL,
    reason     TEXT    NOT NULL,
    device_id  TEXT,
    message_id TEXT,
    payload    TEXT    NOT NULL,
    created_at TEXT    NOT NULL
);
CREATE INDEX dead_letters_created ON dead_letters (created_at, id);
