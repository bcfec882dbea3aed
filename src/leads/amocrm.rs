//! AmoCRM delivery: the token and the key field made ready once per pass
//! (the fields listed at most hourly), a lead sent with its 401 handled as
//! the contract says, a lookup by key, the comment as a note after the
//! delivered commit.

use std::time::{Duration, Instant};

use chrono::Utc;

use super::Delivery;
use crate::config::{AmoCrmConfig, LeadsConfig, TenantConfig};
use crate::context::Context;
use crate::crm::amocrm::AmoClient;
use crate::crm::amocrm_leads::{AmoLeadTarget, LeadField};
use crate::db::lead_outbox::{self, Seen};
use crate::db::{self, TenantDb, config_row};
use crate::failure::{Cause, FailureKind};
use crate::model::{
    AmoStage, CreatedIds, Crm, LeadPlacement, LookupAnswer, OutboxRow, Semantics, SendAnswer, StageFlags, StoredStage,
    Tokens,
};
use crate::reconcile::{delivery, funnel, placement};
use crate::tokens::Owner;

/// The lead fields are listed again after this.
const FIELDS_FOR: Duration = Duration::from_secs(3600);
/// After a 400, the fields are listed again at most this often.
const RELIST_AFTER_400: Duration = Duration::from_secs(60);
const UTM_CODES: [&str; 5] = ["UTM_SOURCE", "UTM_MEDIUM", "UTM_CAMPAIGN", "UTM_CONTENT", "UTM_TERM"];

/// What the account's lead fields give delivery.
#[derive(Clone, Debug)]
pub(super) struct Fields {
    key_field: i64,
    utm_codes: Vec<String>,
}

pub(super) struct Ready {
    delivery: Delivery,
    key_field_name: String,
    relisted_at: Option<Instant>,
    slug: String,
    db: TenantDb,
    amo: AmoCrmConfig,
    margin: Duration,
    access: Tokens,
    fields: Fields,
    stages: Vec<StoredStage<AmoStage>>,
    default: Option<LeadPlacement>,
    responsible_user_id: Option<i64>,
}

/// A usable token, the synced stages, the key field: or why not.
pub(super) async fn ready(
    ctx: &Context,
    delivery: &Delivery,
    tenant: &TenantConfig,
    leads: &LeadsConfig,
    db: &TenantDb,
) -> Result<Ready, Cause> {
    let amo = tenant.amocrm.as_ref().ok_or_else(|| Cause::new(FailureKind::Config, "the tenant has no [amocrm]"))?;
    let mut access = ctx.tokens().refresh_if_due(Owner::of(tenant, amo, db), None).await?;
    let stages = db::amocrm_stages::read(&db.session().await?).await?;
    if stages.iter().all(|s| s.removed) {
        return Err(Cause::new(FailureKind::Config, "AmoCRM stages were never synced: leads wait"));
    }
    let default = placement::amocrm_default(&leads.amocrm, &stages)
        .map_err(|e| Cause::new(FailureKind::Config, format!("[leads.amocrm]: {e}")))?;
    let memory = delivery.memory(&tenant.slug, Crm::AmoCrm);
    let fields =
        match memory.amo_fields {
            Some((at, fields)) if at.elapsed() < FIELDS_FOR => fields,
            _ => {
                let api = &AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
                // A token refused here is refreshed as a send's would be.
                let listed =
                    ctx.tokens()
                        .with_fresh_access(Owner::of(tenant, amo, db), &mut access, |t| async move {
                            api.lead_fields(&t).await
                        })
                        .await?;
                let fields = key_field(api, &access, db, &leads.amocrm.key_field_name, listed).await?;
                let kept = fields.clone();
                delivery.update(&tenant.slug, Crm::AmoCrm, |m| m.amo_fields = Some((Instant::now(), kept)));
                fields
            }
        };
    Ok(Ready {
        delivery: delivery.clone(),
        key_field_name: leads.amocrm.key_field_name.clone(),
        relisted_at: None,
        slug: tenant.slug.clone(),
        db: db.clone(),
        amo: amo.clone(),
        margin: tenant.schedule.token_refresh_margin,
        access,
        fields,
        stages,
        default,
        responsible_user_id: leads.amocrm.responsible_user_id,
    })
}

/// The key field among the `listed` fields (a complete listing): the stored
/// one if the account still has it, else a text field of that name, else one
/// created — stored only if no other process stored one meanwhile (else that
/// one is adopted).
async fn key_field(
    api: &AmoClient<'_>,
    access: &Tokens,
    db: &TenantDb,
    name: &str,
    listed: Vec<LeadField>,
) -> Result<Fields, Cause> {
    let utm_codes =
        listed.iter().filter_map(|f| f.code.clone()).filter(|code| UTM_CODES.contains(&code.as_str())).collect();
    let stored = config_row::lead_key_field(&db.session().await?).await?;
    if let Some(id) = stored
        && listed.iter().any(|f| f.id == id)
    {
        return Ok(Fields { key_field: id, utm_codes });
    }
    let id = match listed.iter().find(|f| f.name == name && f.field_type == "text") {
        Some(field) => field.id,
        None => {
            let id = api.create_text_field(&access.access, name).await?;
            tracing::info!(crm = "amocrm", field = id, name, "created the lead field for delivery keys");
            id
        }
    };
    let kept = config_row::store_lead_key_field(&db.session().await?, stored, id).await?;
    Ok(Fields { key_field: kept.unwrap_or(id), utm_codes })
}

impl Ready {
    fn owner(&self) -> Owner<'_> {
        Owner { slug: &self.slug, db: &self.db, amo: &self.amo, margin: self.margin }
    }

    /// Where the row goes, or why it never can.
    pub(super) fn check(&self, row: &OutboxRow) -> Result<LeadPlacement, String> {
        if let Some(why) = delivery::refuse(row, Crm::AmoCrm, Some(self.fields.key_field)) {
            return Err(why);
        }
        placement::place_amocrm(
            row.pipeline_id.as_deref(),
            row.stage_id.as_deref(),
            self.default.as_ref(),
            &self.stages,
        )
    }

    /// The stage a placement sends to, as the funnel's `created` row
    /// records it: its semantic and its flags now.
    pub(super) fn stage_of(&self, placement: &LeadPlacement) -> (Option<Semantics>, Option<StageFlags>) {
        let LeadPlacement::AmoCrm { pipeline_id, status_id } = placement else { return (None, None) };
        let stage = self.stages.iter().find(|s| s.row.pipeline_id == *pipeline_id && s.row.status_id == *status_id);
        (Some(funnel::amocrm::semantic(*status_id)), stage.map(|s| s.flags))
    }

    /// Who the lead was sent as assigned to.
    pub(super) fn responsible(&self, row: &OutboxRow) -> Option<i64> {
        row.responsible_user_id.or(self.responsible_user_id)
    }

    pub(super) async fn send(&mut self, ctx: &Context, row: &OutboxRow, placement: &LeadPlacement) -> SendAnswer {
        let LeadPlacement::AmoCrm { pipeline_id, status_id } = placement else {
            return SendAnswer::Refused("not an AmoCRM placement".into());
        };
        let target = AmoLeadTarget {
            pipeline_id: *pipeline_id,
            status_id: *status_id,
            responsible_user_id: self.responsible_user_id,
            key_field_id: self.fields.key_field,
            utm_codes: &self.fields.utm_codes,
        };
        let api = AmoClient::new(&ctx.http, &self.amo.account).with_retry(ctx.retry);
        let answer = api.send_lead(&self.access.access, row, &target).await;
        if let SendAnswer::Refused(message) = &answer
            && message.starts_with("HTTP 400")
            && let Some(fixed) = self.key_field_gone(&api).await
        {
            return fixed;
        }
        if answer == SendAnswer::Unauthorized {
            // The row goes back to `pending`, due now; the next row (or this
            // one again) goes with the refreshed token.
            match ctx.tokens().refresh_if_due(self.owner(), Some(&self.access.access)).await {
                Ok(access) => self.access = access,
                Err(e) => return SendAnswer::AccountRefused(format!("the token was refused and not refreshed: {e}")),
            }
        }
        answer
    }

    /// After a 400: is the key field gone (deleted in the account)? Then it
    /// is found or created again and the row goes back, not counted.
    async fn key_field_gone(&mut self, api: &AmoClient<'_>) -> Option<SendAnswer> {
        if self.relisted_at.is_some_and(|at| at.elapsed() < RELIST_AFTER_400) {
            return None;
        }
        self.relisted_at = Some(Instant::now());
        let listed = api.lead_fields(&self.access.access).await.ok()?;
        if listed.iter().any(|f| f.id == self.fields.key_field) {
            return None;
        }
        let fields = key_field(api, &self.access, &self.db, &self.key_field_name, listed).await.ok()?;
        tracing::warn!(tenant = %self.slug, crm = "amocrm", field = fields.key_field, "the key field was gone; using a new one");
        self.fields = fields.clone();
        self.delivery.update(&self.slug, Crm::AmoCrm, |m| m.amo_fields = Some((Instant::now(), fields)));
        Some(SendAnswer::Outdated("the lead field for delivery keys was gone; it is there again".into()))
    }

    pub(super) async fn find(&mut self, ctx: &Context, row: &OutboxRow) -> LookupAnswer {
        let api = &AmoClient::new(&ctx.http, &self.amo.account).with_retry(ctx.retry);
        let (key, field) = (row.delivery_key.as_str(), self.fields.key_field);
        let sent_at = row.last_attempt_at.unwrap_or_else(Utc::now);
        let tokens = ctx.tokens();
        let owner = Owner { slug: &self.slug, db: &self.db, amo: &self.amo, margin: self.margin };
        let found = tokens
            .with_fresh_access(owner, &mut self.access, |t| async move { api.find_lead(&t, key, field, sent_at).await })
            .await;
        found.unwrap_or_else(|e| LookupAnswer::Inconclusive(e.to_string()))
    }

    /// The row's comment as a note on its delivered lead, sent once; a
    /// failure only sets `last_error`.
    pub(super) async fn add_comment(
        &mut self,
        ctx: &Context,
        db: &TenantDb,
        seen: Seen,
        row: &OutboxRow,
        ids: CreatedIds,
    ) {
        let Some(comment) = row.comment.as_deref().filter(|c| !c.trim().is_empty()) else { return };
        let api = AmoClient::new(&ctx.http, &self.amo.account).with_retry(ctx.retry);
        if let Err(e) = api.add_note(&self.access.access, ids.entity_id, comment).await {
            let delivered = Seen { state: crate::model::OutboxState::Delivered, ..seen };
            let error = format!("delivered, but the comment was not added as a note: {e}");
            if let Ok(session) = db.session().await {
                let _ = lead_outbox::note(&session, delivered, None, Some(&error)).await;
            }
        }
    }
}
