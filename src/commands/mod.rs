//! One module per subcommand: each turns its arguments into calls on the
//! library and its outcome into output and an exit code.

pub mod auth_url;
pub mod authorize;
pub mod demo;
pub mod stages;
pub mod status;
pub mod sync;
pub mod test_lead;
pub mod validate;

use crate::cli::GlobalArgs;
use crate::config::{self, Environment, LoadOptions, TenantConfig};

pub(crate) fn load_options(global: &GlobalArgs) -> LoadOptions {
    LoadOptions { database_url_template: global.database_url_template.clone(), env: Environment::process() }
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
    let loaded = config::load(&global.config, &load_options(global));
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
