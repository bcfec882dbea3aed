//! Applying one tenant: its database migrated, the `config` columns its file
//! determines written where they differ, then each configured CRM connected
//! and its stages synced. The I/O side of [`crate::reconcile`].

pub mod amocrm;
pub mod bitrix24;
pub mod preview;
mod stages;

use std::collections::BTreeMap;

use serde_json::json;

use crate::config::TenantConfig;
use crate::context::Context;
use crate::db::status::StatusUpdate;
use crate::db::{self, DbError, TenantDb, config_row};
use crate::failure::Failure;
use crate::model::Crm;
use crate::reconcile::{self, ConfigColumn};
use crate::tokens::Obtained;

/// The outcome of one CRM of one tenant.
pub type CrmOutcome = Result<Report, Failure>;

/// What a successful CRM step did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// AmoCRM: how tokens were obtained this time.
    pub obtained: Option<Obtained>,
    pub stage_count: usize,
    pub stages_changed: bool,
    /// Bitrix24: the portal's new host, when it redirected there.
    pub moved_to: Option<String>,
}

/// Records a failed CRM step in its status row (best effort: the database
/// may be what failed); the daemon's policy logs it.
pub(crate) async fn record_failure(slug: &str, db: &TenantDb, outcome: &CrmOutcome) {
    let Err(failure) = outcome else { return };
    let crm = failure.crm;
    let update = StatusUpdate { error: Some(&failure.message), ..StatusUpdate::state(crm, failure.state()) };
    if let Ok(session) = db.session().await {
        let _ = db::status::write(&session, &update).await;
    }
    tracing::debug!(tenant = slug, crm = crm.as_str(), kind = failure.kind.as_str(), "failure recorded");
}

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

    /// Some CRM failed for a reason that may pass (worth a retry soon).
    pub fn transient_failure(&self) -> bool {
        self.crms.iter().any(|(_, outcome)| outcome.as_ref().is_err_and(Failure::is_transient))
    }
}

/// Reconciles one tenant. Database failures before the CRM steps are an
/// error; a CRM's failure is reported in [`Applied::crms`] and recorded in
/// its status row.
///
/// The Bitrix24 answers are fetched first: with them in hand, a
/// Bitrix24-only tenant's database work is one session, since no connection
/// is held while a CRM answers (each new session costs the server several
/// milliseconds of CPU, the most of a reconcile's cost at a thousand
/// tenants on one server).
pub async fn apply_tenant(ctx: &Context, tenant: &TenantConfig) -> Result<Applied, DbError> {
    let b24_fetched = match &tenant.bitrix24 {
        Some(b24) => Some(bitrix24::fetch(ctx, b24).await),
        None => None,
    };
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
    db::migrate(&db).await?;
    let changed_columns = apply_config_columns(tenant, &db).await?;
    let mut crms = Vec::new();
    if let Some(amo) = &tenant.amocrm {
        crms.push((Crm::AmoCrm, amocrm::apply(ctx, tenant, amo, &db).await));
    }
    if let (Some(b24), Some(fetched)) = (&tenant.bitrix24, b24_fetched) {
        let webhook_changed = changed_columns.iter().any(|c| c.is_bitrix24_webhook());
        crms.push((Crm::Bitrix24, bitrix24::apply(tenant, b24, &db, fetched, webhook_changed).await));
    }
    Ok(Applied { changed_columns, crms })
}

/// A scheduled resync: only the stage requests (one for AmoCRM, two for
/// Bitrix24) and the stage writes; the account and webhook checks belong to
/// a full reconcile.
pub async fn resync_stages(ctx: &Context, tenant: &TenantConfig) -> Result<Applied, DbError> {
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
    let mut crms = Vec::new();
    if let Some(amo) = &tenant.amocrm {
        crms.push((Crm::AmoCrm, amocrm::resync(ctx, tenant, amo, &db).await));
    }
    if let Some(b24) = &tenant.bitrix24 {
        crms.push((Crm::Bitrix24, bitrix24::resync(ctx, tenant, b24, &db).await));
    }
    Ok(Applied { changed_columns: Vec::new(), crms })
}

/// Writes the `config` columns that differ, with one event per CRM; when the
/// AmoCRM account or integration changed, the stored tokens belong to the
/// old one and are cleared with them. The change is decided again under the
/// `config` row lock, in the transaction that clears: another process that
/// applied the same edit first may have stored the new account's pair since.
async fn apply_config_columns(tenant: &TenantConfig, db: &TenantDb) -> Result<Vec<ConfigColumn>, DbError> {
    let mut session = db.session().await?;
    let desired = reconcile::desired_columns(tenant);
    let current = config_row::read_columns(&session).await?;
    if reconcile::config_changes(desired.clone(), &current).is_empty() {
        return Ok(Vec::new());
    }
    let tx = session.transaction().await?;
    let current = config_row::lock_columns(&tx).await?;
    let changes = reconcile::config_changes(desired, &current);
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let account_changed = reconcile::amocrm_account_changed(&changes, &current);
    config_row::update_columns(&tx, &changes).await?;
    if account_changed {
        config_row::clear_tokens(&tx).await?;
    }
    let mut by_crm: BTreeMap<Crm, Vec<&str>> = BTreeMap::new();
    for (column, _) in &changes {
        by_crm.entry(column.crm()).or_default().push(column.name());
    }
    for (crm, columns) in by_crm {
        let mut detail = json!({ "columns": columns, "file": tenant.file.display().to_string() });
        if account_changed && crm == Crm::AmoCrm {
            detail["tokens_cleared"] = json!("the account or integration changed");
        }
        db::events::insert(&tx, Some(crm), "config_applied", &detail).await?;
    }
    tx.commit().await?;
    Ok(changes.into_iter().map(|(c, _)| c).collect())
}
