-- Funnel history (database.md): every stage change of the tenant's leads
-- and deals, and the daemon's cursors on the CRMs' change streams. Created
-- in every tenant database, [funnel] or not, so that a reader can be set up
-- before ingestion is turned on. Additive and idempotent, like V1.

CREATE TABLE IF NOT EXISTS crm_stage_changes (
    -- Assigned and committed in one order by every writer (each inserting
    -- transaction first takes one advisory lock): a reader keeping
    -- "id > last seen" misses nothing.
    id bigserial PRIMARY KEY,
    crm text NOT NULL
        CONSTRAINT crm_stage_changes_crm_check CHECK (crm IN ('amocrm', 'bitrix24')),
    -- AmoCRM event id; Bitrix24 lead:<ID> / deal:<ID>; outbox:<id> for the
    -- row a delivery writes.
    source_event_id text NOT NULL,
    entity_type text NOT NULL
        CONSTRAINT crm_stage_changes_entity_type_check CHECK (entity_type IN ('lead', 'deal')),
    entity_id bigint NOT NULL,
    -- The CRM's ids as text; the *_from pair is NULL on creation.
    pipeline_from text,
    stage_from text,
    pipeline_to text,
    stage_to text NOT NULL,
    change_kind text NOT NULL
        CONSTRAINT crm_stage_changes_change_kind_check CHECK (change_kind IN ('created', 'moved', 'pipeline')),
    semantic text
        CONSTRAINT crm_stage_changes_semantic_check CHECK (semantic IN ('process', 'success', 'failure')),
    -- Copied from the stage table at ingestion; NULL when the stage was unknown.
    is_qualified_stage boolean,
    is_success_stage boolean,
    is_fail_stage boolean,
    changed_at timestamptz NOT NULL,
    changed_by_user_id bigint,
    responsible_user_id bigint,
    outbox_id bigint,
    ingested_at timestamptz NOT NULL DEFAULT now()
);

-- Unique indexes rather than inline constraints: IF NOT EXISTS keeps them
-- idempotent, and ON CONFLICT (crm, source_event_id) infers them all the same.
CREATE UNIQUE INDEX IF NOT EXISTS crm_stage_changes_source_key ON crm_stage_changes (crm, source_event_id);

-- An entity's changes in order: the from-stage of its next change is the
-- last row's stage.
CREATE INDEX IF NOT EXISTS crm_stage_changes_entity_idx ON crm_stage_changes (crm, entity_type, entity_id, id);

-- Internal: where each change stream of a CRM was read up to. A cursor
-- never moves backwards.
CREATE TABLE IF NOT EXISTS crm_connect_cursors (
    crm text NOT NULL,
    -- lead_status_changed (AmoCRM); lead, deal (Bitrix24).
    stream text NOT NULL,
    last_id bigint,
    window_end timestamptz,
    -- Every change before it is ingested.
    complete_to timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (crm, stream)
);
