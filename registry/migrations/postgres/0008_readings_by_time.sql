-- Readings keyed by time: (device, measure, time, message) instead of (device, message,
-- measure), so a batch appends at the end of each device's measure range instead of
-- touching a random page per row; the time index is no longer needed, the key is one. A
-- message delivered again keeps one reading per measure when its time is the same: a
-- device timestamp (readings.time_pointer) or the cloud's own enqueue time.
DROP INDEX readings_by_time;
ALTER TABLE readings DROP CONSTRAINT readings_pkey;
ALTER TABLE readings ADD PRIMARY KEY (device_id, measure, at_ms, msg);
