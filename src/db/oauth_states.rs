//! `crm_connect_oauth_states`: single-use states of browser authorisations,
//! stored by hash, checked by the database's clock.

use std::time::Duration;

use tokio_postgres::GenericClient;

use super::error::DbError;
use super::session::{Conn, step};

/// Records a state by its hash, usable for `valid_for`. States expired over
/// a day ago go in the same statement, keeping the table small.
pub async fn insert(conn: &impl Conn, state_sha256: &str, valid_for: Duration) -> Result<(), DbError> {
    let secs = valid_for.as_secs_f64();
    step(conn, "recording the authorisation state", async {
        conn.pg()
            .execute(
                "WITH expired AS (
                     DELETE FROM crm_connect_oauth_states WHERE expires_at < now() - interval '1 day'
                 )
                 INSERT INTO crm_connect_oauth_states (state_sha256, expires_at)
                 VALUES ($1, now() + make_interval(secs => $2::double precision))",
                &[&state_sha256, &secs],
            )
            .await?;
        Ok(())
    })
    .await
}

/// Marks a state used if it is known, unused and unexpired; true if this
/// call did. One statement, so two callbacks with one state cannot both win.
pub async fn consume(conn: &impl Conn, state_sha256: &str) -> Result<bool, DbError> {
    step(conn, "checking the authorisation state", async {
        let row = conn
            .pg()
            .query_opt(
                "UPDATE crm_connect_oauth_states SET used_at = now()
                 WHERE state_sha256 = $1 AND used_at IS NULL AND expires_at > now()
                 RETURNING created_at",
                &[&state_sha256],
            )
            .await?;
        Ok(row.is_some())
    })
    .await
}
