-- Which replica reads which partition of a provider's stream (an Event Hubs partition):
-- one claim per (scope = provider instance, partition), written with optimistic
-- concurrency on `version` (the etag of Event Hubs' blob checkpoint store) and valid until
-- `expires_at`; its owner renews it, others take it over once it expired.
CREATE TABLE partition_ownership (
    scope        text        NOT NULL,
    partition_id text        NOT NULL,
    owner        text        NOT NULL,
    version      bigint      NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (scope, partition_id)
);

-- A checkpoint's place in its stream (the Event Hubs sequence number): a save never moves
-- it backwards, so a replica that lost a partition cannot write behind the one that took
-- it over. NULL for checkpoints saved before this column existed (any save replaces them).
ALTER TABLE checkpoints ADD COLUMN position bigint;
