-- The tables of database.md. Additive and idempotent: the database may
-- already hold a `config` table of its own (other columns, NOT NULL columns
-- with defaults, the row id = 1) and the seed's bitrix24_pipeline_stages.

CREATE TABLE IF NOT EXISTS config (id integer PRIMARY KEY);

ALTER TABLE config
    ADD COLUMN IF NOT EXISTS amocrm_subdomain text,
    ADD COLUMN IF NOT EXISTS amocrm_client_id text,
    ADD COLUMN IF NOT EXISTS amocrm_client_secret text,
    ADD COLUMN IF NOT EXISTS amocrm_access_token text,
    ADD COLUMN IF NOT EXISTS amocrm_refresh_token text,
    ADD COLUMN IF NOT EXISTS amocrm_token_expires_at timestamptz,
    ADD COLUMN IF NOT EXISTS amocrm_domain text,
    ADD COLUMN IF NOT EXISTS amocrm_auth_code_sha256 text,
    ADD COLUMN IF NOT EXISTS bitrix24_domain text,
    ADD COLUMN IF NOT EXISTS bitrix24_access_token text,
    ADD COLUMN IF NOT EXISTS bitrix24_user_id integer,
    ADD COLUMN IF NOT EXISTS bitrix24_entity_type text,
    ADD COLUMN IF NOT EXISTS bitrix24_connected_at timestamptz;

-- Not ON CONFLICT: an existing table may lack a unique key on id.
INSERT INTO config (id) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM config WHERE id = 1);

CREATE TABLE IF NOT EXISTS bitrix24_pipeline_stages (
    id bigserial PRIMARY KEY,
    category_id integer NOT NULL,
    category_name text NOT NULL,
    status_id text NOT NULL,
    status_name text NOT NULL,
    status_sort integer NOT NULL,
    entity_type text NOT NULL DEFAULT 'deal',
    semantics text,
    is_qualified_stage boolean NOT NULL DEFAULT false,
    is_success_stage boolean NOT NULL DEFAULT false,
    is_fail_stage boolean NOT NULL DEFAULT false,
    synced_at timestamptz NOT NULL DEFAULT now(),
    removed_at timestamptz
);

-- The seed's table may predate the new columns.
ALTER TABLE bitrix24_pipeline_stages
    ADD COLUMN IF NOT EXISTS semantics text,
    ADD COLUMN IF NOT EXISTS is_qualified_stage boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS is_success_stage boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS is_fail_stage boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS synced_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS removed_at timestamptz;

CREATE UNIQUE INDEX IF NOT EXISTS bitrix24_pipeline_stages_entity_category_status_key
    ON bitrix24_pipeline_stages (entity_type, category_id, status_id);

CREATE TABLE IF NOT EXISTS amocrm_pipeline_stages (
    id bigserial PRIMARY KEY,
    pipeline_id bigint NOT NULL,
    pipeline_name text NOT NULL,
    pipeline_is_main boolean NOT NULL DEFAULT false,
    status_id bigint NOT NULL,
    status_name text NOT NULL,
    status_sort integer NOT NULL,
    status_type integer NOT NULL DEFAULT 0,
    is_qualified_stage boolean NOT NULL DEFAULT false,
    is_success_stage boolean NOT NULL DEFAULT false,
    is_fail_stage boolean NOT NULL DEFAULT false,
    synced_at timestamptz NOT NULL DEFAULT now(),
    removed_at timestamptz
);

CREATE UNIQUE INDEX IF NOT EXISTS amocrm_pipeline_stages_pipeline_status_key
    ON amocrm_pipeline_stages (pipeline_id, status_id);

CREATE TABLE IF NOT EXISTS crm_connect_status (
    crm text PRIMARY KEY,
    state text NOT NULL,
    last_success_at timestamptz,
    last_error text,
    last_error_at timestamptz,
    stages_synced_at timestamptz,
    stage_count integer,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS crm_connect_events (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    crm text,
    kind text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX IF NOT EXISTS crm_connect_events_at_idx ON crm_connect_events (at);
