-- Readings: the numeric and boolean measures of every accepted telemetry message, per
-- device, per measure (a JSON pointer such as /engine/temp) and per time, for the charts
-- Field Service draws. A message delivered again writes nothing twice: a reading's key is
-- its device, a 64-bit hash of its message id, and the measure. Rollups keep min, max,
-- sum and count per minute (resolution_s 60) and per hour (3600), updated in the same
-- transaction from the readings that were new, so a long range is read from them.
CREATE TABLE readings (
    device_id text NOT NULL,
    msg bigint NOT NULL,
    measure text NOT NULL,
    at_ms bigint NOT NULL,
    value double precision NOT NULL,
    PRIMARY KEY (device_id, msg, measure)
);
CREATE INDEX readings_by_time ON readings (device_id, measure, at_ms);
CREATE INDEX readings_age ON readings (at_ms);
CREATE TABLE reading_rollups (
    device_id text NOT NULL,
    measure text NOT NULL,
    resolution_s bigint NOT NULL,
    bucket_ms bigint NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    sum double precision NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (device_id, measure, resolution_s, bucket_ms)
);
CREATE INDEX reading_rollups_age ON reading_rollups (resolution_s, bucket_ms);
