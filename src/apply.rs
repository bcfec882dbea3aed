//! Applying one tenant: its database migrated, then the `config` columns
//! its file determines written where they differ, with an audit event. The
//! I/O side of [`crate::reconcile`]; the CRM steps join here.

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::TenantConfig;
use crate::db::{self, DbError, Pools, queries};
use crate::reconcile::{self, ConfigColumn};

/// What applying a tenant changed.
#[derive(Debug, Default)]
pub struct Applied {
    pub changed_columns: Vec<ConfigColumn>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Db(#[from] DbError),
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Db(e) => e.is_transient(),
        }
    }
}

pub async fn apply_tenant(pools: &Pools, tenant: &TenantConfig) -> Result<Applied, ApplyError> {
    let db = pools.get(&tenant.slug, &tenant.database_url)?;
    db::migrate(&db).await?;
    let mut client = db.client().await?;
    let current = queries::read_config_columns(&**client).await.map_err(|e| db.query_error("reading config", e))?;
    let changes = reconcile::config_changes(reconcile::desired_columns(tenant), &current);
    if changes.is_empty() {
        return Ok(Applied::default());
    }
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    queries::update_config_columns(&*tx, &changes).await.map_err(|e| db.query_error("updating config", e))?;
    let mut by_crm: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (column, _) in &changes {
        by_crm.entry(column.crm().as_str()).or_default().push(column.name());
    }
    for (crm, columns) in by_crm {
        let detail = json!({ "columns": columns, "file": tenant.file.display().to_string() });
        queries::insert_event(&*tx, Some(crm), "config_applied", &detail)
            .await
            .map_err(|e| db.query_error("recording an event", e))?;
    }
    tx.commit().await.map_err(|e| db.query_error("committing config", e))?;
    Ok(Applied { changed_columns: changes.into_iter().map(|(c, _)| c).collect() })
}
