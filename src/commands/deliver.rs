//! `crm-connect deliver [--tenant SLUG]`: delivers what is due in the
//! outboxes of the tenants with `[leads]`, pass after pass until nothing is
//! due, prints per tenant what it delivered and failed and what is left
//! pending or sending, then exits; 1 if a lead failed for good or a tenant
//! could not be worked on.

use std::process::ExitCode;

use crate::cli::{DeliverArgs, GlobalArgs};
use crate::config;
use crate::context::Context;
use crate::db;
use crate::leads;

pub async fn run(global: &GlobalArgs, args: &DeliverArgs) -> ExitCode {
    let loaded = config::load(&global.config, &config::LoadOptions::new(global.database_url_template.clone()));
    let tenants: Vec<_> = loaded
        .files
        .iter()
        .filter_map(|f| f.tenant.as_ref())
        .filter(|t| args.tenant.as_ref().is_none_or(|slug| *slug == t.slug))
        .filter(|t| t.leads.is_some())
        .cloned()
        .collect();
    if let Some(slug) = &args.tenant
        && tenants.is_empty()
    {
        eprintln!("crm-connect: no valid tenant {slug} with a [leads] table");
        return ExitCode::FAILURE;
    }
    let ctx = Context::new(global.pool_settings());
    let outcome = super::settled(&ctx, async {
        let mut failed = false;
        for tenant in &tenants {
            let Some(leads) = &tenant.leads else { continue };
            let report = async {
                let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
                db::migrate(&db).await?;
                let report = leads::until_done(&ctx, tenant, leads).await?;
                let left = db::lead_outbox::summary(&db.session().await?).await?;
                Ok::<_, crate::failure::Cause>((report, left))
            }
            .await;
            match report {
                Ok((r, left)) => {
                    failed |= r.failed > 0;
                    let mut line = format!(
                        "{}: {} delivered, {} failed, {} pending, {} sending",
                        tenant.slug, r.delivered, r.failed, left.pending, left.sending
                    );
                    if let Some(waiting) = &r.waiting {
                        line.push_str(&format!("; waiting: {waiting}"));
                    }
                    println!("{line}");
                }
                Err(cause) => {
                    failed = true;
                    println!("{}: error: {}", tenant.slug, cause.message);
                }
            }
            ctx.pools.close_idle(&tenant.slug);
        }
        if failed { Err("a lead failed, or a tenant could not be delivered to".to_string()) } else { Ok(()) }
    })
    .await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("crm-connect: {message}");
            ExitCode::FAILURE
        }
    }
}
