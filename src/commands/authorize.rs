//! `crm-connect authorize --tenant SLUG --code CODE`: exchanges an AmoCRM
//! authorization code given on the command line, exactly as a code in the
//! tenant's file would be (sent at most once), and stores the tokens.

use std::process::ExitCode;

use crate::cli::{AuthorizeArgs, GlobalArgs};
use crate::context::Context;
use crate::db;
use crate::tokens::{Obtained, Owner};

pub async fn run(global: &GlobalArgs, args: &AuthorizeArgs) -> ExitCode {
    let ctx = Context::new(global.pool_settings());
    super::report(super::settled(&ctx, authorize(&ctx, global, args)).await)
}

async fn authorize(ctx: &Context, global: &GlobalArgs, args: &AuthorizeArgs) -> Result<String, String> {
    let tenant = super::load_tenant(global, &args.tenant)?;
    let amo = tenant.amocrm.as_ref().ok_or("the tenant has no [amocrm] table")?;
    if amo.long_lived_token.is_some() {
        return Err("the tenant uses `amocrm.long_lived_token`; remove it to use the code flow".into());
    }
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url).map_err(|e| e.to_string())?;
    db::migrate(&db).await.map_err(|e| e.to_string())?;
    let owner = Owner::of(&tenant, amo, &db);
    let obtained = ctx.tokens().obtain(owner, Some(&args.code)).await.map_err(|e| e.to_string())?;
    match obtained {
        Obtained::Exchanged => Ok(format!("{}: authorized, tokens stored", tenant.slug)),
        Obtained::CodeAlreadySent => {
            Err("this code was sent before; a code is used at most once: get a new one".into())
        }
        Obtained::CodeRejected(reason) => Err(format!("AmoCRM rejected the code: {reason}")),
        other => Err(format!("unexpected outcome: {other:?}")),
    }
}
