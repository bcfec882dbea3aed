//! The AmoCRM part of a reconcile: tokens obtained or refreshed, the account
//! checked, the pipelines' stages synced with their flags, and the outcome
//! recorded in `crm_connect_status`.

use crate::config::{AmoCrmConfig, TenantConfig};
use crate::context::Context;
use crate::crm::amocrm::AmoClient;
use crate::db::TenantDb;
use crate::failure::{Cause, FailureKind};
use crate::model::Crm;
use crate::tokens::{Obtained, Owner, TokenError};

use super::{CrmOutcome, Report, stages};

/// Connects (if needed), checks the account and syncs the stages.
pub async fn apply(ctx: &Context, tenant: &TenantConfig, amo: &AmoCrmConfig, db: &TenantDb) -> CrmOutcome {
    let outcome = connect_and_sync(ctx, Owner::of(tenant, amo, db)).await.map_err(|c| c.of(Crm::AmoCrm));
    super::record_failure(&tenant.slug, db, &outcome).await;
    outcome
}

/// Stages only: the token refreshed if due, one pipelines request.
pub async fn resync(ctx: &Context, tenant: &TenantConfig, amo: &AmoCrmConfig, db: &TenantDb) -> CrmOutcome {
    let outcome = async {
        let owner = Owner::of(tenant, amo, db);
        let tokens = ctx.tokens();
        let mut access = tokens.refresh_if_due(owner, None).await?;
        let api = &AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
        let stages = tokens.with_fresh_access(owner, &mut access, |t| async move { api.pipelines(&t).await }).await?;
        let (stage_count, stages_changed) = stages::sync_stages(db, (), &amo.stages, stages).await?;
        Ok::<_, Cause>(Report { obtained: None, stage_count, stages_changed, moved_to: None })
    }
    .await
    .map_err(|c| c.of(Crm::AmoCrm));
    super::record_failure(&tenant.slug, db, &outcome).await;
    outcome
}

async fn connect_and_sync(ctx: &Context, owner: Owner<'_>) -> Result<Report, Cause> {
    let tokens = ctx.tokens();
    let obtained = tokens.obtain(owner, None).await?;
    if let Obtained::CodeRejected(reason) = &obtained {
        tracing::warn!(tenant = owner.slug, crm = "amocrm", reason = %reason, "the authorization code was rejected");
    }
    let mut access = match tokens.refresh_if_due(owner, None).await {
        Ok(access) => access,
        Err(TokenError::NeedsAuthorization(why)) => {
            let why = match &obtained {
                Obtained::CodeRejected(reason) => format!("the authorization code was rejected: {reason}"),
                Obtained::CodeAlreadySent => format!(
                    "{why}; the configured authorization_code was already sent once (codes are single-use): \
                     configure a new one or run `crm-connect authorize`"
                ),
                _ => why,
            };
            return Err(Cause::new(FailureKind::NeedsAuthorization, why));
        }
        Err(e) => return Err(e.into()),
    };
    let api = &AmoClient::new(&ctx.http, &owner.amo.account).with_retry(ctx.retry);
    tokens.with_fresh_access(owner, &mut access, |t| async move { api.account(&t).await }).await?;
    let stages = tokens.with_fresh_access(owner, &mut access, |t| async move { api.pipelines(&t).await }).await?;
    let (stage_count, stages_changed) = stages::sync_stages(owner.db, (), &owner.amo.stages, stages).await?;
    Ok(Report { obtained: Some(obtained), stage_count, stages_changed, moved_to: None })
}
