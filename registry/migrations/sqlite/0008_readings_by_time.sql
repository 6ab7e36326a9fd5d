-- Readings keyed by time: (device, measure, time, message) instead of (device, message,
-- measure). A batch of readings now appends at the end of each device's measure range
-- instead of landing on a random page per row (the hash of the message id came second),
-- which dirtied a page per reading: 1,000 rows cost 37 ms on a FULL-synced disk, against
-- 11 ms time-ordered. The time index is no longer needed, the key is one. A message
-- delivered again keeps one reading per measure when its time is the same: a device
-- timestamp (readings.time_pointer) or the cloud's own enqueue time.
CREATE TABLE readings_new (
    device_id TEXT NOT NULL,
    measure TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    msg INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (device_id, measure, at_ms, msg)
) WITHOUT ROWID;
INSERT INTO readings_new (device_id, measure, at_ms, msg, value)
    SELECT device_id, measure, at_ms, msg, value FROM readings WHERE true
    ON CONFLICT DO NOTHING;
DROP TABLE readings;
ALTER TABLE readings_new RENAME TO readings;
CREATE INDEX readings_age ON readings (at_ms);
