//! The AmoCRM part of a reconcile: tokens obtained or refreshed, the account
//! checked, the pipelines' stages synced with their flags, and the outcome
//! recorded in `crm_connect_status`.

use serde_json::json;

use crate::config::{AmoCrmConfig, TenantConfig};
use crate::context::Context;
use crate::crm::CrmError;
use crate::crm::amocrm::AmoClient;
use crate::db::TenantDb;
use crate::db::queries::{self, StatusUpdate};
use crate::model::{AmoStage, Crm, CrmState, StageFlags, Tokens};
use crate::reconcile::{map_flags, plan_stages};
use crate::secret::Secret;
use crate::tokens::{self, Obtained, TokenError};

use super::CrmOutcome;

/// Connects (if needed), checks the account and syncs the stages.
pub async fn apply(ctx: &Context, tenant: &TenantConfig, amo: &AmoCrmConfig, db: &TenantDb) -> CrmOutcome {
    let outcome = connect_and_sync(ctx, tenant, amo, db).await;
    if let Err(failure) = &outcome {
        let update = StatusUpdate {
            crm: Crm::AmoCrm,
            state: failure.state,
            error: Some(&failure.message),
            success: false,
            stage_count: None,
        };
        // The database may be what failed; the error is reported either way.
        if let Ok(client) = db.client().await {
            let _ = queries::write_status(&**client, &update).await;
        }
        tracing::error!(tenant = %tenant.slug, crm = "amocrm", error = %failure.message, "amocrm failed");
    }
    outcome
}

/// Why a CRM step failed, and the state that leaves the connection in.
#[derive(Clone, Debug)]
pub struct Failure {
    pub state: CrmState,
    pub message: String,
}

impl From<TokenError> for Failure {
    fn from(e: TokenError) -> Self {
        let state = match e {
            TokenError::NeedsAuthorization(_) => CrmState::NeedsAuthorization,
            _ => CrmState::Error,
        };
        Failure { state, message: e.to_string() }
    }
}

impl From<CrmError> for Failure {
    fn from(e: CrmError) -> Self {
        Failure { state: CrmState::Error, message: e.to_string() }
    }
}

impl From<crate::db::DbError> for Failure {
    fn from(e: crate::db::DbError) -> Self {
        Failure { state: CrmState::Error, message: e.to_string() }
    }
}

/// What a successful AmoCRM step did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub obtained: Option<Obtained>,
    pub stage_count: usize,
    pub stages_changed: bool,
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
            return Err(Failure { state: CrmState::NeedsAuthorization, message: why });
        }
        Err(e) => return Err(e.into()),
    };
    let api = AmoClient::new(&ctx.http, amo).with_retry(ctx.retry);
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
    let (stage_count, stages_changed) = sync_stages(db, amo, stages).await?;
    Ok(Report { obtained: Some(obtained), stage_count, stages_changed })
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

/// Upserts the stages and their flags in one transaction; writes nothing to
/// the stage table when nothing changed. A mapping error keeps the stored
/// flags and is recorded; stage names and order still sync.
async fn sync_stages(db: &TenantDb, amo: &AmoCrmConfig, stages: Vec<AmoStage>) -> Result<(usize, bool), Failure> {
    let mapped = map_flags(&stages, &amo.stages, "amocrm.stages");
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    queries::lock_stage_sync(&*tx, Crm::AmoCrm).await.map_err(|e| db.query_error("locking the stage sync", e))?;
    let stored = queries::read_amocrm_stages(&*tx).await.map_err(|e| db.query_error("reading stages", e))?;
    let flags: Vec<StageFlags> = match &mapped {
        Ok(flags) => flags.clone(),
        Err(_) => stages
            .iter()
            .map(|s| {
                let key = (s.pipeline_id, s.status_id);
                stored
                    .iter()
                    .find(|old| (old.row.pipeline_id, old.row.status_id) == key)
                    .map(|old| old.flags)
                    .unwrap_or_default()
            })
            .collect(),
    };
    let stage_count = stages.len();
    let plan = plan_stages(stages.into_iter().zip(flags).collect(), &stored);
    let changed = !plan.is_empty();
    if changed {
        queries::upsert_amocrm_stages(&*tx, &plan.upserts).await.map_err(|e| db.query_error("writing stages", e))?;
        queries::mark_amocrm_stages_removed(&*tx, &plan.removed)
            .await
            .map_err(|e| db.query_error("marking removed stages", e))?;
        let detail = json!({
            "added": plan.added, "changed": plan.changed, "removed": plan.removed_labels,
            "restored": plan.restored, "flags_moved": plan.flags_moved,
        });
        queries::insert_event(&*tx, Some("amocrm"), "stages_changed", &detail)
            .await
            .map_err(|e| db.query_error("recording an event", e))?;
    }
    let count = i32::try_from(stage_count).unwrap_or(i32::MAX);
    let mapping_error = mapped.err().map(|e| format!("stage mapping: {e}"));
    if let Some(message) = &mapping_error {
        queries::insert_event(&*tx, Some("amocrm"), "mapping_error", &json!({ "message": message }))
            .await
            .map_err(|e| db.query_error("recording an event", e))?;
    }
    let update = StatusUpdate {
        crm: Crm::AmoCrm,
        state: if mapping_error.is_some() { CrmState::Error } else { CrmState::Connected },
        error: mapping_error.as_deref(),
        success: mapping_error.is_none(),
        stage_count: Some(count),
    };
    queries::write_status(&*tx, &update).await.map_err(|e| db.query_error("writing status", e))?;
    tx.commit().await.map_err(|e| db.query_error("committing stages", e))?;
    match mapping_error {
        Some(message) => Err(Failure { state: CrmState::Error, message }),
        None => Ok((stage_count, changed)),
    }
}
