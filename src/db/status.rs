//! `crm_connect_status`: one row per CRM, the connection's state as
//! downstream jobs and `crm-connect status` read it.

use chrono::{DateTime, Utc};

use tokio_postgres::GenericClient;

use super::error::DbError;
use super::session::{Conn, col, step};
use crate::model::{Crm, CrmState};

/// One status row change. `error` is recorded with its time; `success`
/// stamps `last_success_at`; `stage_count` stamps `stages_synced_at`.
#[derive(Clone, Debug)]
pub struct StatusUpdate<'a> {
    pub crm: Crm,
    pub state: CrmState,
    pub error: Option<&'a str>,
    pub success: bool,
    pub stage_count: Option<i32>,
}

impl StatusUpdate<'_> {
    /// Just the state, keeping the row's error and stamps.
    pub fn state(crm: Crm, state: CrmState) -> StatusUpdate<'static> {
        StatusUpdate { crm, state, error: None, success: false, stage_count: None }
    }
}

pub async fn write(conn: &impl Conn, update: &StatusUpdate<'_>) -> Result<(), DbError> {
    step(conn, "writing status", async {
        conn.pg()
            .execute(
                "INSERT INTO crm_connect_status AS s
                     (crm, state, last_success_at, last_error, last_error_at, stages_synced_at, stage_count, updated_at)
                 VALUES ($1, $2, CASE WHEN $3 THEN clock_timestamp() END, $4::text,
                         CASE WHEN $4::text IS NOT NULL THEN clock_timestamp() END,
                         CASE WHEN $5::integer IS NOT NULL THEN clock_timestamp() END, $5::integer, clock_timestamp())
                 ON CONFLICT (crm) DO UPDATE SET
                     state = EXCLUDED.state,
                     last_success_at = COALESCE(EXCLUDED.last_success_at, s.last_success_at),
                     last_error = COALESCE(EXCLUDED.last_error, s.last_error),
                     last_error_at = COALESCE(EXCLUDED.last_error_at, s.last_error_at),
                     stages_synced_at = COALESCE(EXCLUDED.stages_synced_at, s.stages_synced_at),
                     stage_count = COALESCE(EXCLUDED.stage_count, s.stage_count),
                     updated_at = EXCLUDED.updated_at",
                &[&update.crm.as_str(), &update.state.as_str(), &update.success, &update.error, &update.stage_count],
            )
            .await?;
        Ok(())
    })
    .await
}

/// A CRM's stored state; `None` when there is no row, or when another
/// program wrote a state this program does not know (it decides nothing).
pub async fn read_state(conn: &impl Conn, crm: Crm) -> Result<Option<CrmState>, DbError> {
    step(conn, "reading status", async {
        let row = conn.pg().query_opt("SELECT state FROM crm_connect_status WHERE crm = $1", &[&crm.as_str()]).await?;
        let state: Option<String> = row.map(|r| col(&r, 0, "crm_connect_status")).transpose()?;
        Ok(state.as_deref().and_then(CrmState::parse))
    })
    .await
}

/// A status row as `crm-connect status` shows it: the state verbatim, as
/// whichever program wrote it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatusRow {
    pub crm: String,
    pub state: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub stages_synced_at: Option<DateTime<Utc>>,
    pub stage_count: Option<i32>,
}

pub async fn read_all(conn: &impl Conn) -> Result<Vec<StatusRow>, DbError> {
    step(conn, "reading status", async {
        let rows = conn
            .pg()
            .query(
                "SELECT crm, state, last_success_at, last_error, last_error_at, stages_synced_at, stage_count
                 FROM crm_connect_status ORDER BY crm",
                &[],
            )
            .await?;
        let table = "crm_connect_status";
        rows.iter()
            .map(|r| {
                Ok(StatusRow {
                    crm: col(r, 0, table)?,
                    state: col(r, 1, table)?,
                    last_success_at: col(r, 2, table)?,
                    last_error: col(r, 3, table)?,
                    last_error_at: col(r, 4, table)?,
                    stages_synced_at: col(r, 5, table)?,
                    stage_count: col(r, 6, table)?,
                })
            })
            .collect()
    })
    .await
}

/// Marks a CRM's connection as no longer managed (its file was removed).
pub async fn mark_unmanaged(conn: &impl Conn, crm: Crm) -> Result<(), DbError> {
    step(conn, "writing status", async {
        conn.pg()
            .execute(
                "INSERT INTO crm_connect_status (crm, state, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT (crm) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
                &[&crm.as_str(), &CrmState::Unmanaged.as_str()],
            )
            .await?;
        Ok(())
    })
    .await
}
