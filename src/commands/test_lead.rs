//! `crm-connect test-lead`: one test lead (AmoCRM) or deal or lead
//! (Bitrix24) named "Тест crm-connect" in the tenant's test pipeline, as the
//! runbook's last steps did; prints its id.

use std::process::ExitCode;

use crate::cli::{CrmArg, GlobalArgs, TestLeadArgs};
use crate::context::Context;
use crate::crm::amocrm::AmoClient;
use crate::crm::bitrix24::B24Client;
use crate::db;
use crate::model::EntityType;
use crate::tokens::Owner;

pub const TEST_LEAD_NAME: &str = "Тест crm-connect";

pub async fn run(global: &GlobalArgs, args: &TestLeadArgs) -> ExitCode {
    let ctx = Context::new(global.pool_settings());
    super::report(super::settled(&ctx, create(&ctx, global, args)).await)
}

async fn create(ctx: &Context, global: &GlobalArgs, args: &TestLeadArgs) -> Result<String, String> {
    let tenant = super::load_tenant(global, &args.tenant)?;
    let crm = match (args.crm, &tenant.amocrm, &tenant.bitrix24) {
        (Some(crm), _, _) => crm,
        (None, Some(_), None) => CrmArg::Amocrm,
        (None, None, Some(_)) => CrmArg::Bitrix24,
        (None, Some(_), Some(_)) => return Err("the tenant uses both CRMs: choose one with --crm".into()),
        (None, None, None) => return Err("the tenant configures no CRM".into()),
    };
    if crm == CrmArg::Bitrix24 {
        let b24 = tenant.bitrix24.as_ref().ok_or("the tenant has no [bitrix24] table")?;
        let api = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry);
        return match b24.entity_type {
            EntityType::Deal => {
                let category = b24.test_category_id.unwrap_or(0);
                let id = api.add_deal(TEST_LEAD_NAME, category).await.map_err(|e| e.to_string())?;
                Ok(format!("created Bitrix24 deal {id} \"{TEST_LEAD_NAME}\" in category {category}"))
            }
            EntityType::Lead => {
                let id = api.add_lead(TEST_LEAD_NAME).await.map_err(|e| e.to_string())?;
                Ok(format!("created Bitrix24 lead {id} \"{TEST_LEAD_NAME}\""))
            }
        };
    }
    let amo = tenant.amocrm.as_ref().ok_or("the tenant has no [amocrm] table")?;
    let pipeline_id =
        amo.test_pipeline_id.ok_or("set `amocrm.test_pipeline_id` to the pipeline the test lead goes to")?;
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url).map_err(|e| e.to_string())?;
    db::migrate(&db).await.map_err(|e| e.to_string())?;
    let owner = Owner::of(&tenant, amo, &db);
    let tokens = ctx.tokens();
    let mut access = tokens.refresh_if_due(owner, None).await.map_err(|e| e.to_string())?;
    let api = &AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
    let id = tokens
        .with_fresh_access(
            owner,
            &mut access,
            |t| async move { api.create_lead(&t, TEST_LEAD_NAME, pipeline_id).await },
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!("created AmoCRM lead {id} \"{TEST_LEAD_NAME}\" in pipeline {pipeline_id}"))
}
