-- Field Service records linked to devices (the Register Custom Entity action): a customer
-- asset or any other entity, by its logical name and record id. A record may have several
-- devices and a device several records.
CREATE TABLE entity_links (
    entity_logical_name TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (entity_logical_name, entity_id, device_id)
) WITHOUT ROWID;
CREATE INDEX entity_links_by_device ON entity_links (device_id);
