-- Readings keyed by an integer series id: one row per (device, measure) in reading_series,
-- and readings and rollups keyed by that id instead of two text columns. A row shrinks from
-- about 60 bytes to 30, each insert compares integers instead of text, and a batch of 1,000
-- readings costs about a quarter of what it did (BENCHMARKS.md, "Readings: the write
-- cost"). The age indexes stay: retention deletes the oldest rows first, in chunks.
CREATE TABLE reading_series (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    measure TEXT NOT NULL,
    UNIQUE (device_id, measure)
);
INSERT INTO reading_series (device_id, measure)
    SELECT device_id, measure FROM readings
    UNION SELECT device_id, measure FROM reading_rollups;
CREATE TABLE readings_new (
    series INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    msg INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (series, at_ms, msg)
) WITHOUT ROWID;
INSERT INTO readings_new (series, at_ms, msg, value)
    SELECT s.id, r.at_ms, r.msg, r.value FROM readings AS r
    JOIN reading_series AS s ON s.device_id = r.device_id AND s.measure = r.measure;
DROP TABLE readings;
ALTER TABLE readings_new RENAME TO readings;
CREATE INDEX readings_age ON readings (at_ms);
CREATE TABLE reading_rollups_new (
    series INTEGER NOT NULL,
    resolution_s INTEGER NOT NULL,
    bucket_ms INTEGER NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    sum REAL NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (series, resolution_s, bucket_ms)
) WITHOUT ROWID;
INSERT INTO reading_rollups_new (series, resolution_s, bucket_ms, min, max, sum, count)
    SELECT s.id, u.resolution_s, u.bucket_ms, u.min, u.max, u.sum, u.count
    FROM reading_rollups AS u
    JOIN reading_series AS s ON s.device_id = u.device_id AND s.measure = u.measure;
DROP TABLE reading_rollups;
ALTER TABLE reading_rollups_new RENAME TO reading_rollups;
CREATE INDEX reading_rollups_age ON reading_rollups (resolution_s, bucket_ms);
