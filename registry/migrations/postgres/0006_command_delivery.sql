-- Command delivery survives a crash: published_at is set once the provider took the
-- command, so one still In Progress and never published is sent again after a restart
-- (same correlation id) or ends in Error when its deadline passes. A sender claims a
-- command (claim_holder, claimed_until) before it sends, so two replicas never send it at
-- once; a claim that runs out (its holder died) can be taken over. Commands created before
-- this migration are taken as published: they are not sent a second time.
ALTER TABLE commands ADD COLUMN published_at timestamptz;
ALTER TABLE commands ADD COLUMN claim_holder text;
ALTER TABLE commands ADD COLUMN claimed_until timestamptz;
UPDATE commands SET published_at = updated_at;
CREATE INDEX commands_unpublished ON commands (created_at, id)
    WHERE published_at IS NULL AND status = 192350000;
