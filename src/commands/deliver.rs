//! `crm-connect deliver [--tenant SLUG]`: delivers what is due in the
//! outboxes of the tenants with `[leads]`, pass after pass until nothing is
//! due, prints per tenant what it delivered and failed and what is left
//! pending or sending, then exits; 1 if a lead failed for good or a tenant
//! could not be worked on.

use std::process::ExitCode;

use crate::cli::{DeliverArgs, GlobalArgs};
use crate::context::Context;
use crate::db;
use crate::leads;

pub async fn run(global: &GlobalArgs, args: &DeliverArgs) -> ExitCode {
    let tenants = match super::tenants_with(global, args.tenant.as_ref(), "leads", |t| t.leads.is_some()) {
        Ok(tenants) => tenants,
        Err(message) => {
            eprintln!("crm-connect: {message}");
            return ExitCode::FAILURE;
        }
    };
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
