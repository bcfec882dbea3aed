-- When the daemon last ran and will next run each tenant's stage resync,
-- so that `crm-connect status` shows a schedule that stopped firing.
CREATE TABLE IF NOT EXISTS crm_connect_schedule (
    job text PRIMARY KEY,
    last_run_at timestamptz,
    next_run_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
