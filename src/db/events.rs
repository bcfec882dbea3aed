//! `crm_connect_events`, the audit log: append only.

use tokio_postgres::GenericClient;

use super::error::DbError;
use super::session::{Conn, step};
use crate::model::Crm;

/// Appends one event. `detail` must hold no secret.
pub async fn insert(conn: &impl Conn, crm: Option<Crm>, kind: &str, detail: &serde_json::Value) -> Result<(), DbError> {
    let crm = crm.map(Crm::as_str);
    step(conn, "recording an event", async {
        conn.pg()
            .execute("INSERT INTO crm_connect_events (crm, kind, detail) VALUES ($1, $2, $3)", &[&crm, &kind, detail])
            .await?;
        Ok(())
    })
    .await
}
