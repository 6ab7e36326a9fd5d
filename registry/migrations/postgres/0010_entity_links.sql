-- Field Service records linked to devices (the Register Custom Entity action): a customer
-- asset or any other entity, by its logical name and record id. A record may have several
-- devices and a device several records.
CREATE TABLE entity_links (
    entity_logical_name text NOT NULL,
    entity_id text NOT NULL,
    device_id text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (entity_logical_name, entity_id, device_id)
);
CREATE INDEX entity_links_by_device ON entity_links (device_id);
