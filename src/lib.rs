//! crm-connect keeps the AmoCRM and Bitrix24 connections of many tenants
//! alive from declarative TOML files. Modules in reading order:

/// Applying one tenant: migrate, write what changed, record it.
pub mod apply;
/// The command line.
pub mod cli;
/// One module per subcommand.
pub mod commands;
/// Tenant files: discovery, validation with positions, the typed model.
pub mod config;
/// Tenant databases: pools, migrations, every SQL statement.
pub mod db;
/// Log output that never carries a secret.
pub mod logging;
/// Domain types: CRMs, domains, entity types, the Bitrix24 webhook.
pub mod model;
/// Desired versus stored `config` columns: a plan of changes, no I/O.
pub mod reconcile;
/// The redacting type every secret travels in.
pub mod secret;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one command line to its exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match &cli.command {
        Command::Validate => commands::validate::run(&cli.global),
        Command::Sync(args) => commands::sync::run(&cli.global, args).await,
    }
}
