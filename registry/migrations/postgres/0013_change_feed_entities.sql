-- The change feed (issue 18) beyond devices: commands, categories and alerts get the
-- per-record version of their change events, as devices did in 0012. A command counts
-- its changes from 1 at creation, a category from 1 at creation (a description change is
-- the next), an alert from 1 at creation (its new-alert outbox item is version 1; every
-- later change of the row bumps it). Registration history rows are immutable: their one
-- event is version 1 and needs no column. Rows stored before this migration start at 0
-- (commands, categories) or 1 (alerts); a version only has to grow from one event of its
-- record to the next.
ALTER TABLE commands ADD COLUMN change_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE categories ADD COLUMN change_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE alerts ADD COLUMN change_version BIGINT NOT NULL DEFAULT 1;
