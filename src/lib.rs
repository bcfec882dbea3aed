//! crm-connect keeps the AmoCRM and Bitrix24 connections of many tenants
//! alive from declarative TOML files. Modules in reading order:

/// The redacting type every secret travels in.
pub mod secret;
/// Domain types: CRMs, domains, entity types, the Bitrix24 webhook, tokens, stages.
pub mod model;
/// Tenant files: discovery, validation with positions, the typed model.
pub mod config;
/// Desired versus stored state (config columns, stages, flags): plans, no I/O.
pub mod reconcile;
/// Tenant databases: pools, migrations, every SQL statement.
pub mod db;
/// The AmoCRM and Bitrix24 clients and their shared HTTP layer.
pub mod crm;
/// Prometheus metrics, in the context.
pub mod metrics;
/// What every tenant operation needs: pools, HTTP, obtained token pairs, metrics.
pub mod context;
/// AmoCRM tokens: one exchange per code, refreshes under the row lock.
pub mod tokens;
/// One failure type for every CRM step, with its kind.
pub mod failure;
/// Lead delivery: passes over a tenant's outbox.
pub mod leads;
/// Funnel history: polls of each CRM's stage changes into `crm_stage_changes`.
pub mod funnel;
/// Applying one tenant: migrate, write what changed, connect, sync stages.
pub mod apply;
/// The long-running daemon: one loop over tenant events, schedules, timers.
pub mod daemon;
/// Debounced watching of the configuration directory.
pub mod watch;
/// AmoCRM browser authorisation: the single-use state, referer check, URL.
pub mod oauth;
/// The HTTP side of the daemon: health, metrics, the AmoCRM OAuth callback.
pub mod server;
/// The command line.
pub mod cli;
/// Log output that never carries a secret.
pub mod logging;
/// One module per subcommand.
pub mod commands;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one command line to its exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match &cli.command {
        Command::Run => daemon::run(cli.global.clone(), daemon::Hooks::default(), daemon::signals()).await,
        #[cfg(feature = "demo")]
        Command::Demo(args) => commands::demo::run(&cli.global, args).await,
        Command::Validate(args) => commands::validate::run(&cli.global, args),
        Command::Schema => commands::schema::run(),
        Command::Sync(args) => commands::sync::run(&cli.global, args).await,
        Command::Status(args) => commands::status::run(&cli.global, args).await,
        Command::Stages(args) => commands::stages::run(&cli.global, args).await,
        Command::Deliver(args) => commands::deliver::run(&cli.global, args).await,
        Command::Funnel(args) => commands::funnel::run(&cli.global, args).await,
        Command::TestLead(args) => commands::test_lead::run(&cli.global, args).await,
        Command::Authorize(args) => commands::authorize::run(&cli.global, args).await,
        Command::AuthUrl(args) => commands::auth_url::run(&cli.global, args).await,
        Command::Completions(args) => commands::completions::run(args),
        Command::Man(args) => commands::man::run(args),
    }
}
