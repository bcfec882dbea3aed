//! The AmoCRM part of a reconcile: tokens obtained or refreshed, the account
//! checked, the pipelines' stages synced with their flags, and the outcome
//! recorded in `crm_connect_status`.

use crate::config::{AmoCrmConfig, TenantConfig};
use crate::context::Context;
use crate::crm::CrmError;
use crate::crm::amocrm::AmoClient;
use crate::db::TenantDb;
use crate::model::{Crm, CrmState, Tokens};
use crate::secret::Secret;
use crate::tokens::{self, Obtained, TokenError};

use super::{CrmOutcome, Failure, Report, stages};

/// Connects (if needed), checks the account and syncs the stages.
pub async fn apply(ctx: &Context, tenant: &TenantConfig, amo: &AmoCrmConfig, db: &TenantDb) -> CrmOutcome {
    let outcome = connect_and_sync(ctx, tenant, amo, db).await;
    super::record_failure(Crm::AmoCrm, &tenant.slug, db, &outcome).await;
    outcome
}

/// Stages only: the token refreshed if due, one pipelines request.
pub async fn resync(ctx: &Context, tenant: &TenantConfig, amo: &AmoCrmConfig, db: &TenantDb) -> CrmOutcome {
    let outcome = async {
        let margin = tenant.schedule.token_refresh_margin;
        let mut tokens = tokens::refresh_if_due(ctx, &tenant.slug, db, amo, margin, None).await?;
        let api = AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
        let stages = match api.pipelines(&tokens.access).await {
            Err(CrmError::Unauthorized { .. }) => {
                tokens = reauthorize(ctx, tenant, amo, db, &tokens.access).await?;
                api.pipelines(&tokens.access).await?
            }
            other => other?,
        };
        let (stage_count, stages_changed) = stages::sync_stages(db, (), &amo.stages, stages).await?;
        Ok(Report { obtained: None, stage_count, stages_changed, moved_to: None })
    }
    .await;
    super::record_failure(Crm::AmoCrm, &tenant.slug, db, &outcome).await;
    outcome
}

async fn connect_and_sync(
    ctx: &Context,
    tenant: &TenantConfig,
    amo: &AmoCrmConfig,
    db: &TenantDb,
) -> Result<Report, Failure> {
    let slug = tenant.slug.as_str();
    let margin = tenant.schedule.token_refresh_margin;
    let obtained = tokens::obtain(ctx, slug, db, amo, None).await?;
    if let Obtained::CodeRejected(reason) = &obtained {
        tracing::warn!(tenant = slug, crm = "amocrm", reason = %reason, "the authorization code was rejected");
    }
    let mut tokens = match tokens::refresh_if_due(ctx, slug, db, amo, margin, None).await {
        Ok(tokens) => tokens,
        Err(TokenError::NeedsAuthorization(why)) => {
            let why = match &obtained {
                Obtained::CodeRejected(reason) => format!("the authorization code was rejected: {reason}"),
                Obtained::CodeAlreadySent => format!(
                    "{why}; the configured authorization_code was already sent once (codes are single-use): \
                     configure a new one or run `crm-connect authorize`"
                ),
                _ => why,
            };
            return Err(Failure { state: CrmState::NeedsAuthorization, message: why, transient: false });
        }
        Err(e) => return Err(e.into()),
    };
    let api = AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
    // A 401 gets one refresh and one more try.
    match api.account(&tokens.access).await {
        Err(CrmError::Unauthorized { .. }) => {
            tokens = reauthorize(ctx, tenant, amo, db, &tokens.access).await?;
            api.account(&tokens.access).await?;
        }
        other => drop(other?),
    }
    let stages = match api.pipelines(&tokens.access).await {
        Err(CrmError::Unauthorized { .. }) => {
            tokens = reauthorize(ctx, tenant, amo, db, &tokens.access).await?;
            api.pipelines(&tokens.access).await?
        }
        other => other?,
    };
    let (stage_count, stages_changed) = stages::sync_stages(db, (), &amo.stages, stages).await?;
    Ok(Report { obtained: Some(obtained), stage_count, stages_changed, moved_to: None })
}

/// Refreshes after the API refused `rejected` (unless another process
/// already replaced it).
async fn reauthorize(
    ctx: &Context,
    tenant: &TenantConfig,
    amo: &AmoCrmConfig,
    db: &TenantDb,
    rejected: &Secret,
) -> Result<Tokens, Failure> {
    let margin = tenant.schedule.token_refresh_margin;
    Ok(tokens::refresh_if_due(ctx, &tenant.slug, db, amo, margin, Some(rejected)).await?)
}
