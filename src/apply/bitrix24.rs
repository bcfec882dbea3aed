//! The Bitrix24 part of a reconcile: the webhook verified (the grant rule of
//! [`check_grant`]), `bitrix24_connected_at` stamped for a new or changed
//! webhook, every category's stages synced with their flags — two round
//! trips in all — and the outcome recorded.

use serde_json::json;

use crate::config::{Bitrix24Config, TenantConfig};
use crate::context::Context;
use crate::crm::bitrix24::B24Client;
use crate::db::{self, TenantDb, config_row};
use crate::failure::{Cause, Failure};
use crate::model::{B24Stage, Crm};
use crate::reconcile::check_grant;

use super::{CrmOutcome, Report, stages};

/// What the portal answered, fetched before any database work so that a
/// tenant's database part needs no connection held across a CRM call.
pub struct Fetched(Result<(Vec<B24Stage>, Option<String>), Failure>);

/// The webhook checked and every stage read: the reconcile's CRM part.
pub async fn fetch(ctx: &Context, b24: &Bitrix24Config) -> Fetched {
    Fetched(fetch_checked(ctx, b24).await.map_err(|c| c.of(Crm::Bitrix24)))
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
        Ok((stages, moved_to)) => {
            store(b24, db, stages, moved_to, webhook_changed).await.map_err(|c| c.of(Crm::Bitrix24))
        }
        Err(failure) => Err(failure),
    };
    super::record_failure(&tenant.slug, db, &outcome).await;
    outcome
}

/// Stages only: two round trips, no webhook check.
pub async fn resync(ctx: &Context, tenant: &TenantConfig, b24: &Bitrix24Config, db: &TenantDb) -> CrmOutcome {
    let outcome = async {
        let api = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry);
        let (_, fetched) = api.stages(b24.entity_type, false).await?;
        let (stage_count, stages_changed) = stages::sync_stages(db, b24.entity_type, &b24.stages, fetched).await?;
        Ok::<_, Cause>(Report { obtained: None, stage_count, stages_changed, moved_to: api.moved_to() })
    }
    .await
    .map_err(|c| c.of(Crm::Bitrix24));
    super::record_failure(&tenant.slug, db, &outcome).await;
    outcome
}

async fn fetch_checked(ctx: &Context, b24: &Bitrix24Config) -> Result<(Vec<B24Stage>, Option<String>), Cause> {
    let api = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry);
    let (grant, fetched) = api.stages(b24.entity_type, true).await?;
    if let Some(grant) = &grant {
        check_grant(&b24.webhook, &grant.scopes, grant.profile_id.as_deref())?;
    }
    Ok((fetched, api.moved_to()))
}

async fn store(
    b24: &Bitrix24Config,
    db: &TenantDb,
    fetched: Vec<B24Stage>,
    moved_to: Option<String>,
    webhook_changed: bool,
) -> Result<Report, Cause> {
    {
        let session = db.session().await?;
        let connected_at = config_row::bitrix24_connected_at(&session).await?;
        if webhook_changed || connected_at.is_none() {
            config_row::mark_bitrix24_connected(&session).await?;
            let detail = json!({ "webhook": b24.webhook.to_string() });
            db::events::insert(&session, Some(Crm::Bitrix24), "webhook_verified", &detail).await?;
        }
        if let Some(to) = &moved_to {
            let detail = json!({ "from": b24.webhook.host(), "to": to });
            db::events::insert(&session, Some(Crm::Bitrix24), "portal_moved", &detail).await?;
        }
    }
    let (stage_count, stages_changed) = stages::sync_stages(db, b24.entity_type, &b24.stages, fetched).await?;
    Ok(Report { obtained: None, stage_count, stages_changed, moved_to })
}
