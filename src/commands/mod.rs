//! One module per subcommand: each turns its arguments into calls on the
//! library and its outcome into output and an exit code.

pub mod auth_url;
pub mod authorize;
pub mod completions;
pub mod deliver;
pub mod man;
#[cfg(feature = "demo")]
pub mod demo;
pub mod funnel;
pub mod schema;
pub mod stages;
pub mod status;
pub mod sync;
pub mod test_lead;
pub mod validate;

use crate::cli::GlobalArgs;
use crate::config::{self, LoadOptions, TenantConfig};

/// How long a one-shot command keeps trying to store a token pair whose
/// write failed, after its token requests have ended.
pub(crate) const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// A one-shot command's work, cut short by SIGINT or SIGTERM; either way the
/// token pairs it obtained are stored before it returns (token requests in
/// flight run to their end first). A pair that could not be stored is the
/// command's error.
pub(crate) async fn settled<T>(
    ctx: &crate::context::Context,
    work: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let outcome = tokio::select! {
        outcome = work => outcome,
        () = crate::daemon::signals() => Err("interrupted".into()),
    };
    if let Some((_, e)) = ctx.tokens().settle(SETTLE_WITHIN).await.pop() {
        return Err(format!("a token pair was obtained but could not be stored: {e}"));
    }
    outcome
}

/// A one-shot command's outcome: its message on stdout and exit 0, or on
/// stderr and exit 1.
pub(crate) fn report(outcome: Result<String, String>) -> std::process::ExitCode {
    match outcome {
        Ok(message) => {
            println!("{message}");
            std::process::ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("crm-connect: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The valid configuration of one tenant, or a message saying why there is none.
pub(crate) fn load_tenant(global: &GlobalArgs, slug: &str) -> Result<TenantConfig, String> {
    let loaded = config::load(&global.config, &LoadOptions::new(global.database_url_template.clone()));
    let Some(file) = loaded.files.iter().find(|f| f.slug.as_deref() == Some(slug)) else {
        return Err(format!("no tenant `{slug}` under {}", global.config.display()));
    };
    match &file.tenant {
        Some(tenant) => Ok(tenant.clone()),
        None => {
            let problems: Vec<String> = file.problems.iter().filter(|p| p.is_error()).map(|p| p.to_string()).collect();
            Err(format!("the configuration of `{slug}` is invalid:\n{}", problems.join("\n")))
        }
    }
}

/// The valid tenants that have `table` (`has`), or only `slug` with
/// `--tenant`; a message when `--tenant` names no such tenant.
pub(crate) fn tenants_with(
    global: &GlobalArgs,
    slug: Option<&String>,
    table: &str,
    has: impl Fn(&TenantConfig) -> bool,
) -> Result<Vec<TenantConfig>, String> {
    let loaded = config::load(&global.config, &LoadOptions::new(global.database_url_template.clone()));
    let tenants: Vec<TenantConfig> = loaded
        .files
        .iter()
        .filter_map(|f| f.tenant.as_ref())
        .filter(|t| slug.is_none_or(|slug| *slug == t.slug))
        .filter(|t| has(t))
        .cloned()
        .collect();
    match slug {
        Some(slug) if tenants.is_empty() => Err(format!("no valid tenant {slug} with a [{table}] table")),
        _ => Ok(tenants),
    }
}
