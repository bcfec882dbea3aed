//! Bitrix24 delivery: the synced stages and (for leads) the CRM mode made
//! ready once per pass, a lead or a deal sent (with its contact in one
//! batch), a lookup by key.

use super::Delivery;
use crate::config::{Bitrix24Config, LeadsConfig, TenantConfig};
use crate::context::Context;
use crate::crm::bitrix24::{B24Client, B24LeadTarget};
use crate::db::{self, TenantDb};
use crate::failure::{Cause, FailureKind};
use crate::model::{
    B24Stage, Crm, EntityType, LeadPlacement, LookupAnswer, OutboxRow, Semantics, SendAnswer, StageFlags, StoredStage,
};
use crate::reconcile::{delivery, placement};

/// `crm.settings.mode.get`: the simple CRM has no leads.
const SIMPLE_CRM: i64 = 2;

pub(super) struct Ready {
    b24: Bitrix24Config,
    stages: Vec<StoredStage<B24Stage>>,
    default: Option<LeadPlacement>,
    responsible_user_id: Option<i64>,
}

pub(super) async fn ready(
    ctx: &Context,
    delivery: &Delivery,
    tenant: &TenantConfig,
    leads: &LeadsConfig,
    db: &TenantDb,
) -> Result<Ready, Cause> {
    let b24 =
        tenant.bitrix24.as_ref().ok_or_else(|| Cause::new(FailureKind::Config, "the tenant has no [bitrix24]"))?;
    let stages = db::bitrix24_stages::read(&db.session().await?, b24.entity_type).await?;
    if stages.iter().all(|s| s.removed) {
        return Err(Cause::new(FailureKind::Config, "Bitrix24 stages were never synced: leads wait"));
    }
    let default = placement::bitrix24_default(b24.entity_type, &leads.bitrix24, &stages)
        .map_err(|e| Cause::new(FailureKind::Config, format!("[leads.bitrix24]: {e}")))?;
    if b24.entity_type == EntityType::Lead {
        let mode = match delivery.memory(&tenant.slug, Crm::Bitrix24).bitrix24_mode {
            Some(mode) => mode,
            None => {
                let mode = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry).crm_mode().await?;
                delivery.update(&tenant.slug, Crm::Bitrix24, |m| m.bitrix24_mode = Some(mode));
                mode
            }
        };
        if mode == SIMPLE_CRM {
            return Err(Cause::new(
                FailureKind::Config,
                "the portal runs the simple CRM (crm.settings.mode.get = 2), which has no leads: \
                 set `bitrix24.entity_type = \"deal\"` or switch the portal to the classic CRM",
            ));
        }
    }
    Ok(Ready { b24: b24.clone(), stages, default, responsible_user_id: leads.bitrix24.responsible_user_id })
}

impl Ready {
    pub(super) fn entity_type(&self) -> &'static str {
        self.b24.entity_type.as_str()
    }

    /// Where the row goes, or why it never can.
    pub(super) fn check(&self, row: &OutboxRow) -> Result<LeadPlacement, String> {
        if let Some(why) = delivery::refuse(row, Crm::Bitrix24, None) {
            return Err(why);
        }
        placement::place_bitrix24(
            self.b24.entity_type,
            row.pipeline_id.as_deref(),
            row.stage_id.as_deref(),
            self.default.as_ref(),
            &self.stages,
        )
    }

    /// The stage a placement sends to, as the funnel's `created` row
    /// records it: its semantic and its flags now.
    pub(super) fn stage_of(&self, placement: &LeadPlacement) -> (Option<Semantics>, Option<StageFlags>) {
        let stage = self.stages.iter().find(|s| match placement {
            LeadPlacement::Bitrix24Lead { status_id } => s.row.status_id == *status_id,
            LeadPlacement::Bitrix24Deal { category_id, stage_id } => {
                s.row.category_id == *category_id && s.row.status_id == *stage_id
            }
            LeadPlacement::AmoCrm { .. } => false,
        });
        (stage.map(|s| s.row.semantics), stage.map(|s| s.flags))
    }

    /// Who the lead or deal was sent as assigned to.
    pub(super) fn responsible(&self, row: &OutboxRow) -> Option<i64> {
        row.responsible_user_id.or(self.responsible_user_id)
    }

    /// The contact that came back (kept whatever happens to the deal) and
    /// the answer about the lead or deal.
    pub(super) async fn send(
        &mut self,
        ctx: &Context,
        row: &OutboxRow,
        placement: &LeadPlacement,
    ) -> (Option<i64>, SendAnswer) {
        let responsible_user_id = self.responsible_user_id;
        let target = match placement {
            LeadPlacement::Bitrix24Lead { status_id } => {
                B24LeadTarget::Lead { status_id: status_id.clone(), responsible_user_id }
            }
            LeadPlacement::Bitrix24Deal { category_id, stage_id } => {
                B24LeadTarget::Deal { category_id: *category_id, stage_id: stage_id.clone(), responsible_user_id }
            }
            LeadPlacement::AmoCrm { .. } => return (None, SendAnswer::Refused("not a Bitrix24 placement".into())),
        };
        let api = B24Client::new(&ctx.http, &self.b24.webhook).with_retry(ctx.retry);
        let sent = api.send_lead(row, &target).await;
        (sent.contact_id, sent.answer)
    }

    pub(super) async fn find(&mut self, ctx: &Context, row: &OutboxRow) -> LookupAnswer {
        let api = B24Client::new(&ctx.http, &self.b24.webhook).with_retry(ctx.retry);
        let deal = self.b24.entity_type == EntityType::Deal;
        api.find_lead(&row.delivery_key, deal).await.unwrap_or_else(|e| LookupAnswer::Inconclusive(e.to_string()))
    }
}
