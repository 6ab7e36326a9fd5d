-- Readings: the numeric and boolean measures of every accepted telemetry message, per
-- device, per measure (a JSON pointer such as /engine/temp) and per time, for the charts
-- Field Service draws. A message delivered again writes nothing twice: a reading's key is
-- its device, a 64-bit hash of its message id, and the measure. Rollups keep min, max,
-- sum and count per minute (resolution_s 60) and per hour (3600), updated in the same
-- transaction from the readings that were new, so a long range is read from them.
CREATE TABLE readings (
    device_id TEXT NOT NULL,
    msg INTEGER NOT NULL,
    measure TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (device_id, msg, measure)
) WITHOUT ROWID;
CREATE INDEX readings_by_time ON readings (device_id, measure, at_ms);
CREATE INDEX readings_age ON readings (at_ms);
CREATE TABLE reading_rollups (
    device_id TEXT NOT NULL,
    measure TEXT NOT NULL,
    resolution_s INTEGER NOT NULL,
    bucket_ms INTEGER NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    sum REAL NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (device_id, measure, resolution_s, bucket_ms)
) WITHOUT ROWID;
CREATE INDEX reading_rollups_age ON reading_rollups (resolution_s, bucket_ms);
