-- Field Service's links: the case or work order an alert became (msdyn_case,
-- msdyn_workorder: Dataverse record ids), and the send-to-all request a command belongs to
-- (one command per connected device, all children of one request).
ALTER TABLE alerts ADD COLUMN case_id uuid;
ALTER TABLE alerts ADD COLUMN workorder_id uuid;
ALTER TABLE commands ADD COLUMN request_id uuid;
CREATE INDEX commands_by_request ON commands (request_id) WHERE request_id IS NOT NULL;
