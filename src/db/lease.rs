//! `crm_connect_lease`: which daemon process runs the tenant now, when
//! several share its files.

use std::time::Duration;

use tokio_postgres::GenericClient;

use super::error::DbError;
use super::session::{Conn, col, step};

/// Takes or renews the lease for `holder` if it is free, expired or
/// already `holder`'s; returns whether `holder` holds it now.
pub async fn take(conn: &impl Conn, holder: &str, duration: Duration) -> Result<bool, DbError> {
    let seconds = duration.as_secs_f64();
    step(conn, "taking the lease", async {
        let taken = conn
            .pg()
            .execute(
                "UPDATE crm_connect_lease SET holder = $1, expires_at = now() + make_interval(secs => $2)
                 WHERE id = 1 AND (holder IS NULL OR holder = $1 OR expires_at IS NULL OR expires_at < now())",
                &[&holder, &seconds],
            )
            .await?;
        Ok(taken == 1)
    })
    .await
}

/// Gives the lease up at once (clean shutdown), if `holder` holds it.
pub async fn release(conn: &impl Conn, holder: &str) -> Result<(), DbError> {
    step(conn, "releasing the lease", async {
        conn.pg()
            .execute(
                "UPDATE crm_connect_lease SET holder = NULL, expires_at = NULL WHERE id = 1 AND holder = $1",
                &[&holder],
            )
            .await?;
        Ok(())
    })
    .await
}

/// The live lease's holder, if any.
pub async fn holder(conn: &impl Conn) -> Result<Option<String>, DbError> {
    step(conn, "reading the lease", async {
        let row = conn
            .pg()
            .query_opt("SELECT holder FROM crm_connect_lease WHERE id = 1 AND expires_at > now()", &[])
            .await?;
        Ok(row.map(|r| col::<Option<String>>(&r, 0, "crm_connect_lease")).transpose()?.flatten())
    })
    .await
}
