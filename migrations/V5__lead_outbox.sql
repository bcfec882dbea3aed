-- The lead outbox of database.md: other programs INSERT leads, the daemon
-- delivers each to the CRM once and writes the CRM's ids back. Created in
-- every tenant database, [leads] or not, so that a producer may insert
-- before delivery is turned on. Additive and idempotent, like V1;
-- gen_random_uuid() is built in from PostgreSQL 13 on.

CREATE TABLE IF NOT EXISTS crm_lead_outbox (
    id bigserial PRIMARY KEY,
    -- The producer's idempotency key (its retried INSERT uses
    -- ON CONFLICT (delivery_key) DO NOTHING); it travels inside the lead.
    delivery_key uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    title text,
    contact_name text,
    phone text,
    email text,
    comment text,
    price numeric,
    source text,
    utm_source text,
    utm_medium text,
    utm_campaign text,
    utm_content text,
    utm_term text,
    -- Overrides, the CRM's ids as text (AmoCRM pipeline / status id;
    -- Bitrix24 CATEGORY_ID, STAGE_ID or lead STATUS_ID).
    pipeline_id text,
    stage_id text,
    responsible_user_id bigint,
    meta_lead_id text,
    ctwa_clid text,
    extra jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- From here on the daemon's columns; a producer inserts 'pending' only.
    state text NOT NULL DEFAULT 'pending'
        CONSTRAINT crm_lead_outbox_state_check CHECK (state IN ('pending', 'sending', 'delivered', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    delivered_at timestamptz,
    last_error text,
    crm text CONSTRAINT crm_lead_outbox_crm_check CHECK (crm IN ('amocrm', 'bitrix24')),
    crm_entity_type text,
    crm_entity_id bigint,
    crm_contact_id bigint
);

-- A unique index rather than an inline UNIQUE: IF NOT EXISTS keeps it
-- idempotent, and ON CONFLICT (delivery_key) infers it all the same.
CREATE UNIQUE INDEX IF NOT EXISTS crm_lead_outbox_delivery_key_key ON crm_lead_outbox (delivery_key);

-- The only index a delivery pass reads: delivered and failed rows pile up,
-- the due ones stay few.
CREATE INDEX IF NOT EXISTS crm_lead_outbox_due_idx
    ON crm_lead_outbox (next_attempt_at) WHERE state IN ('pending', 'sending');

-- Finding a delivered row by the CRM's entity (the funnel's outbox_id).
CREATE INDEX IF NOT EXISTS crm_lead_outbox_crm_entity_idx ON crm_lead_outbox (crm, crm_entity_type, crm_entity_id);

-- The AmoCRM lead field that carries the delivery key, once known.
ALTER TABLE config ADD COLUMN IF NOT EXISTS amocrm_lead_key_field_id bigint;
