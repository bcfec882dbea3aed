-- Single-use states of browser authorisations (`crm-connect auth-url`),
-- kept by their SHA-256 only: a database dump must not let anyone complete
-- a pending authorisation. Additive and idempotent, like V1.

CREATE TABLE IF NOT EXISTS crm_connect_oauth_states (
    state_sha256 text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at timestamptz
);

CREATE INDEX IF NOT EXISTS crm_connect_oauth_states_expires_at_idx ON crm_connect_oauth_states (expires_at);
