-- Stream positions providers resume from after a restart (e.g. the offset of each Event
-- Hubs partition), keyed by provider instance (scope) and the provider's own key.
CREATE TABLE checkpoints (
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
