-- The opt-in lease (`--lease`): which daemon runs this tenant's schedules
-- and CRM calls. One row, taken with a conditional UPDATE.
CREATE TABLE IF NOT EXISTS crm_connect_lease (
    id integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    holder text,
    expires_at timestamptz
);

INSERT INTO crm_connect_lease (id) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM crm_connect_lease);
