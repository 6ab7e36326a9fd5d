-- Debounce looks up "the latest alert with this key inside the window", ordered by
-- alert_time, then created_at, then id. The old index covered (debounce_key, alert_time)
-- only, so SQLite sorted every alert of the key inside the window on each lookup: a burst
-- of N alerts from one device cost O(N) per alert. With the whole order in the index the
-- lookup is one index seek.
CREATE INDEX alerts_debounce_latest ON alerts (debounce_key, alert_time, created_at, id);
DROP INDEX alerts_debounce;
