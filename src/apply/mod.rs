//! Applying one tenant: its database migrated, the `config` columns its file
//! determines written where they differ, then each configured CRM connected
//! and its stages synced. The I/O side of [`crate::reconcile`].

pub mod amocrm;

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::TenantConfig;
use crate::context::Context;
use crate::db::{self, DbError, TenantDb, queries};
use crate::model::Crm;
use crate::reconcile::{self, ConfigColumn};

pub use amocrm::{Failure, Report};

/// The outcome of one CRM of one tenant.
pub type CrmOutcome = Result<Report, Failure>;

/// What applying a tenant did.
#[derive(Debug, Default)]
pub struct Applied {
    pub changed_columns: Vec<ConfigColumn>,
    pub crms: Vec<(Crm, CrmOutcome)>,
}

impl Applied {
    pub fn failed(&self) -> bool {
        self.crms.iter().any(|(_, outcome)| outcome.is_err())
    }
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

/// Reconciles one tenant. Database failures before the CRM steps are an
/// error; a CRM's failure is reported in [`Applied::crms`] and recorded in
/// its status row.
pub async fn apply_tenant(ctx: &Context, tenant: &TenantConfig) -> Result<Applied, ApplyError> {
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
    db::migrate(&db).await?;
    let changed_columns = apply_config_columns(tenant, &db).await?;
    let mut crms = Vec::new();
    if let Some(amo) = &tenant.amocrm {
        crms.push((Crm::AmoCrm, amocrm::apply(ctx, tenant, amo, &db).await));
    }
    Ok(Applied { changed_columns, crms })
}

/// Writes the `config` columns that differ, with one event per CRM; when the
/// AmoCRM account or integration changed, the stored tokens belong to the
/// old one and are cleared with them.
async fn apply_config_columns(tenant: &TenantConfig, db: &TenantDb) -> Result<Vec<ConfigColumn>, DbError> {
    let mut client = db.client().await?;
    let current = queries::read_config_columns(&**client).await.map_err(|e| db.query_error("reading config", e))?;
    let changes = reconcile::config_changes(reconcile::desired_columns(tenant), &current);
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let account_changed = reconcile::amocrm_account_changed(&changes, &current);
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    queries::update_config_columns(&*tx, &changes).await.map_err(|e| db.query_error("updating config", e))?;
    if account_changed {
        queries::clear_tokens(&*tx).await.map_err(|e| db.query_error("clearing tokens", e))?;
    }
    let mut by_crm: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (column, _) in &changes {
        by_crm.entry(column.crm().as_str()).or_default().push(column.name());
    }
    for (crm, columns) in by_crm {
        let mut detail = json!({ "columns": columns, "file": tenant.file.display().to_string() });
        if account_changed && crm == Crm::AmoCrm.as_str() {
            detail["tokens_cleared"] = json!("the account or integration changed");
        }
        queries::insert_event(&*tx, Some(crm), "config_applied", &detail)
            .await
            .map_err(|e| db.query_error("recording an event", e))?;
    }
    tx.commit().await.map_err(|e| db.query_error("committing config", e))?;
    Ok(changes.into_iter().map(|(c, _)| c).collect())
}
