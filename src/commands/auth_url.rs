//! `crm-connect auth-url --tenant SLUG`: prints the AmoCRM authorisation URL
//! with a fresh single-use state (stored hashed in the tenant's database),
//! whose callback the daemon completes on `/oauth/amocrm/callback`.

use std::process::ExitCode;

use crate::cli::{GlobalArgs, TenantArg};
use crate::context::Context;
use crate::db;
use crate::oauth;

pub async fn run(global: &GlobalArgs, args: &TenantArg) -> ExitCode {
    match auth_url(global, args).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("crm-connect: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn auth_url(global: &GlobalArgs, args: &TenantArg) -> Result<String, String> {
    let tenant = super::load_tenant(global, &args.tenant)?;
    let amo = tenant.amocrm.as_ref().ok_or("the tenant has no [amocrm] table")?;
    if amo.long_lived_token.is_some() {
        return Err("the tenant uses `amocrm.long_lived_token`; remove it to use the code flow".into());
    }
    // The callback will need all three to exchange the code: say so now,
    // not after the user has clicked through.
    let credentials = amo.credentials().map_err(|e| e.to_string())?;
    let ctx = Context::new(global.pool_settings());
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url).map_err(|e| e.to_string())?;
    db::migrate(&db).await.map_err(|e| e.to_string())?;
    let state = oauth::issue_state(&db, &tenant.slug).await.map_err(|e| e.to_string())?;
    let url = oauth::authorization_url(amo, credentials.client_id, &state)?;
    let minutes = oauth::STATE_LIFETIME.as_secs() / 60;
    Ok(format!(
        "{url}\n\
         Open it within {minutes} minutes, signed in to the tenant's AmoCRM account; it works once.\n\
         The integration's redirect URI ({redirect}, `amocrm.redirect_uri`) must lead to the daemon's \
         /oauth/amocrm/callback, served with --listen.\n",
        redirect = credentials.redirect_uri,
    ))
}
