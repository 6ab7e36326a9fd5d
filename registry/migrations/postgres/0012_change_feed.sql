-- The change feed (issue 18): every committed change of a device that a sink takes bumps its
-- change_version, the per-record version of its change events. An outbox item that is a change event names
-- its record in change_of (`<entity>:<key>`); connection_only marks an item whose change is
-- a connection state alone, which a newer connection state of the same record may replace
-- while it waits (coalescing).
ALTER TABLE devices ADD COLUMN change_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN change_of TEXT;
ALTER TABLE outbox ADD COLUMN connection_only BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX outbox_change_of ON outbox (sink, change_of, id) WHERE change_of IS NOT NULL;
