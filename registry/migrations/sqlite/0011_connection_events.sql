-- Each device's connection state changes, for its timeline (the console's device page):
-- the last 100 per device are kept (older ones are deleted as new ones arrive), so a
-- flapping device cannot grow the table.
CREATE TABLE connection_events (
    device_id TEXT NOT NULL,
    at TEXT NOT NULL,
    connected BOOLEAN NOT NULL,
    PRIMARY KEY (device_id, at)
) WITHOUT ROWID;
