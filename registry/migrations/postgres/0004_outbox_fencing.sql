-- Outbox leases carry a fencing token: every claim increments it, and marking an item
-- delivered, retried or dead requires the token of the claim that is doing it. A replica
-- whose lease ran out (paused, partitioned) and was taken over can no longer change the
-- item. lease_holder names the replica that holds the lease, for operators.
ALTER TABLE outbox ADD COLUMN lease_token bigint NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN lease_holder text;
