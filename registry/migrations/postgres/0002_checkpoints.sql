-- Stream positions providers resume from after a restart (e.g. the offset of each Event
-- Hubs partition), keyed by provider instance (scope) and the provider's own key.
CREATE TABLE checkpoints (
    scope      text        NOT NULL,
    key        text        NOT NULL,
    value      text        NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
