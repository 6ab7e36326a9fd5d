-- iotgw registry schema, version 1, for PostgreSQL: the tables of
-- migrations/sqlite/0001_init.sql one to one, with native types (uuid ids, timestamptz
-- times, jsonb documents, bigint identity keys) and COLLATE "C" on devices.device_id so
-- that device order is byte order, as SQLite's BINARY collation gives.
--
-- Option sets are their Dataverse integer values. Text that is JSON to the user but not
-- parsed by the store (alert_data, dead letter payloads) stays text.

CREATE TABLE devices (
    id                          uuid        NOT NULL PRIMARY KEY,
    device_id                   text        COLLATE "C" NOT NULL,
    name                        text        NOT NULL,
    provider_instance           text        NOT NULL,
    category                    text,
    account                     text,
    connection_state            boolean     NOT NULL DEFAULT FALSE,
    connection_state_updated_at timestamptz,
    last_activity_time          timestamptz,
    reported_properties         jsonb,
    settings                    jsonb,
    tags                        jsonb       NOT NULL DEFAULT '{}',
    registration_status         integer     NOT NULL,
    registration_message        text,
    is_simulated                integer     NOT NULL,
    created_at                  timestamptz NOT NULL,
    updated_at                  timestamptz NOT NULL
);
CREATE UNIQUE INDEX devices_device_id ON devices (device_id);
CREATE INDEX devices_provider_instance ON devices (provider_instance, device_id);

CREATE TABLE registration_history (
    id                uuid        NOT NULL PRIMARY KEY,
    device            uuid        NOT NULL REFERENCES devices (id),
    device_id         text        NOT NULL,
    name              text        NOT NULL,
    action            integer     NOT NULL,
    provider_instance text        NOT NULL,
    created_at        timestamptz NOT NULL
);
CREATE INDEX registration_history_device ON registration_history (device, created_at, id);

CREATE TABLE categories (
    id          uuid        NOT NULL PRIMARY KEY,
    name        text        NOT NULL,
    description text,
    created_at  timestamptz NOT NULL
);
CREATE UNIQUE INDEX categories_name ON categories (name);

CREATE TABLE alerts (
    id                     uuid        NOT NULL PRIMARY KEY,
    description            text        NOT NULL,
    alert_data             text        NOT NULL,
    alert_time             timestamptz NOT NULL,
    alert_token            text        NOT NULL,
    alert_type             integer     NOT NULL,
    priority_score         integer,
    device                 uuid        NOT NULL REFERENCES devices (id),
    device_id              text        NOT NULL,
    parent_alert           uuid        REFERENCES alerts (id),
    parent_alert_token     text,
    last_command_sent      uuid,
    last_command_sent_time timestamptz,
    statecode              integer     NOT NULL,
    statuscode             integer     NOT NULL,
    rule                   text        NOT NULL,
    provider_instance      text        NOT NULL,
    -- Not part of msdyn_iotalert: what debounce groups on.
    debounce_key           text        NOT NULL,
    created_at             timestamptz NOT NULL
);
-- The token is the idempotency key: a redelivered message can never make a second alert,
-- even when two replicas insert it at the same moment.
CREATE UNIQUE INDEX alerts_alert_token ON alerts (alert_token);
CREATE INDEX alerts_debounce ON alerts (debounce_key, alert_time);
CREATE INDEX alerts_created ON alerts (created_at, id);
CREATE INDEX alerts_device_created ON alerts (device_id, created_at, id);
CREATE INDEX alerts_parent ON alerts (parent_alert);

CREATE TABLE commands (
    id                uuid        NOT NULL PRIMARY KEY,
    name              text        NOT NULL,
    message           text        NOT NULL,
    status            integer     NOT NULL,
    status_reason     text,
    device            uuid        NOT NULL REFERENCES devices (id),
    device_id         text        NOT NULL,
    parent_alert      uuid        REFERENCES alerts (id),
    correlation_id    text        NOT NULL,
    provider_instance text        NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);
CREATE UNIQUE INDEX commands_correlation_id ON commands (correlation_id);
CREATE INDEX commands_created ON commands (created_at, id);
CREATE INDEX commands_device_created ON commands (device_id, created_at, id);
CREATE INDEX commands_parent_alert ON commands (parent_alert);

CREATE TABLE outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sink            text        NOT NULL,
    payload         jsonb       NOT NULL,
    idempotency_key text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL,
    leased_until    timestamptz,
    created_at      timestamptz NOT NULL
);
-- One item per (sink, key): an alert is never queued twice for the same sink.
CREATE UNIQUE INDEX outbox_sink_key ON outbox (sink, idempotency_key);
CREATE INDEX outbox_due ON outbox (sink, next_attempt_at, id);

CREATE TABLE dead_letters (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source     text        NOT NULL,
    reason     text        NOT NULL,
    device_id  text,
    message_id text,
    payload    text        NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX dead_letters_created ON dead_letters (created_at, id);
