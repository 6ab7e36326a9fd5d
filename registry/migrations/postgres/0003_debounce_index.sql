-- Debounce looks up "the latest alert with this key inside the window", ordered by
-- alert_time, then created_at, then id: with the whole order in the index the lookup is
-- one index seek (a backward scan), as on SQLite.
CREATE INDEX alerts_debounce_latest ON alerts (debounce_key, alert_time, created_at, id);
DROP INDEX alerts_debounce;
