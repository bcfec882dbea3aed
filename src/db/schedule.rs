//! `crm_connect_schedule`: each schedule's last and next run, so that
//! `status` can show a schedule that stopped firing.

use chrono::{DateTime, Utc};

use tokio_postgres::GenericClient;

use super::error::DbError;
use super::session::{Conn, col, step};

/// Records a schedule's last and next run (`job` names the schedule, e.g.
/// `stage_resync`); writes nothing when neither changed.
pub async fn write(
    conn: &impl Conn,
    job: &str,
    last_run_at: Option<DateTime<Utc>>,
    next_run_at: Option<DateTime<Utc>>,
) -> Result<(), DbError> {
    step(conn, "recording the schedule", async {
        conn.pg()
            .execute(
                "INSERT INTO crm_connect_schedule AS s (job, last_run_at, next_run_at, updated_at)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (job) DO UPDATE SET last_run_at = COALESCE(EXCLUDED.last_run_at, s.last_run_at),
                     next_run_at = EXCLUDED.next_run_at, updated_at = now()
                 WHERE s.next_run_at IS DISTINCT FROM EXCLUDED.next_run_at
                    OR (EXCLUDED.last_run_at IS NOT NULL AND s.last_run_at IS DISTINCT FROM EXCLUDED.last_run_at)",
                &[&job, &last_run_at, &next_run_at],
            )
            .await?;
        Ok(())
    })
    .await
}

/// A schedule's last and next run, if the daemon recorded them.
pub async fn read(
    conn: &impl Conn,
    job: &str,
) -> Result<Option<(Option<DateTime<Utc>>, Option<DateTime<Utc>>)>, DbError> {
    step(conn, "reading the schedule", async {
        let row = conn
            .pg()
            .query_opt("SELECT last_run_at, next_run_at FROM crm_connect_schedule WHERE job = $1", &[&job])
            .await?;
        row.map(|r| Ok((col(&r, 0, "crm_connect_schedule")?, col(&r, 1, "crm_connect_schedule")?))).transpose()
    })
    .await
}
