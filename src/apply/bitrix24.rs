//! The Bitrix24 part of a reconcile: the webhook verified (`scope` must hold
//! `crm`, `profile` must be the URL's user), `bitrix24_connected_at` stamped
//! for a new or changed webhook, every category's stages synced with their
//! flags — two round trips in all — and the outcome recorded.

use serde_json::json;

use crate::config::{Bitrix24Config, TenantConfig};
use crate::context::Context;
use crate::crm::bitrix24::B24Client;
use crate::db::{TenantDb, queries};
use crate::model::{B24Stage, Crm};

use super::{CrmOutcome, Failure, Report, stages};

/// What the portal answered, fetched before any database work so that a
/// tenant's database part needs no connection held across a CRM call.
pub struct Fetched(Result<(Vec<B24Stage>, Option<String>), Failure>);

/// The webhook checked and every stage read: the reconcile's CRM part.
pub async fn fetch(ctx: &Context, b24: &Bitrix24Config) -> Fetched {
    Fetched(fetch_checked(ctx, b24).await)
}

/// Stores what [`fetch`] got: the connection stamp, the stages, the status.
pub async fn apply(
    tenant: &TenantConfig,
    b24: &Bitrix24Config,
    db: &TenantDb,
    fetched: Fetched,
    webhook_changed: bool,
) -> CrmOutcome {
    let outcome = match fetched.0 {
        Ok((stages, moved_to)) => store(b24, db, stages, moved_to, webhook_changed).await,
        Err(failure) => Err(failure),
    };
    super::record_failure(Crm::Bitrix24, &tenant.slug, db, &outcome).await;
    outcome
}

/// Stages only: two round trips, no webhook check.
pub async fn resync(ctx: &Context, tenant: &TenantConfig, b24: &Bitrix24Config, db: &TenantDb) -> CrmOutcome {
    let outcome = async {
        let api = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry);
        let (_, fetched) = api.stages(b24.entity_type, false).await?;
        let (stage_count, stages_changed) = stages::sync_stages(db, b24.entity_type, &b24.stages, fetched).await?;
        Ok(Report { obtained: None, stage_count, stages_changed, moved_to: api.moved_to() })
    }
    .await;
    super::record_failure(Crm::Bitrix24, &tenant.slug, db, &outcome).await;
    outcome
}

async fn fetch_checked(ctx: &Context, b24: &Bitrix24Config) -> Result<(Vec<B24Stage>, Option<String>), Failure> {
    let api = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry);
    let (grant, fetched) = api.stages(b24.entity_type, true).await?;
    if let Some(grant) = &grant {
        if !grant.scopes.iter().any(|s| s == "crm") {
            let granted = if grant.scopes.is_empty() { "none".to_string() } else { grant.scopes.join(", ") };
            return Err(Failure::error(format!(
                "the webhook {} lacks the `crm` scope (granted: {granted}); add it in Bitrix24 under Developer resources",
                b24.webhook
            )));
        }
        if let Some(id) = grant.profile_id.as_deref().filter(|id| *id != b24.webhook.user_id().to_string()) {
            return Err(Failure::error(format!(
                "the webhook {} belongs to user {id}, not to the user in its URL",
                b24.webhook
            )));
        }
    }
    Ok((fetched, api.moved_to()))
}

async fn store(
    b24: &Bitrix24Config,
    db: &TenantDb,
    fetched: Vec<B24Stage>,
    moved_to: Option<String>,
    webhook_changed: bool,
) -> Result<Report, Failure> {
    {
        let client = db.client().await?;
        let connected_at =
            queries::bitrix24_connected_at(&**client).await.map_err(|e| db.query_error("reading config", e))?;
        if webhook_changed || connected_at.is_none() {
            queries::mark_bitrix24_connected(&**client).await.map_err(|e| db.query_error("updating config", e))?;
            let detail = json!({ "webhook": b24.webhook.to_string() });
            queries::insert_event(&**client, Some("bitrix24"), "webhook_verified", &detail)
                .await
                .map_err(|e| db.query_error("recording an event", e))?;
        }
        if let Some(to) = &moved_to {
            let detail = json!({ "from": b24.webhook.host(), "to": to });
            queries::insert_event(&**client, Some("bitrix24"), "portal_moved", &detail)
                .await
                .map_err(|e| db.query_error("recording an event", e))?;
        }
    }
    let (stage_count, stages_changed) = stages::sync_stages(db, b24.entity_type, &b24.stages, fetched).await?;
    Ok(Report { obtained: None, stage_count, stages_changed, moved_to })
}
