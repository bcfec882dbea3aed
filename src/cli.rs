//! The command line: subcommands and the daemon-level flags, each with its
//! environment variable, accepted before or after the subcommand.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_DATABASE_URL_TEMPLATE;
use crate::secret::Secret;

#[derive(Debug, Parser)]
#[command(
    name = "crm-connect",
    version,
    about = "Keeps the AmoCRM and Bitrix24 connections of many tenants alive from TOML files"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// A tenant file, or a directory of them (every *.toml directly inside)
    #[arg(long, global = true, env = "CRM_CONNECT_CONFIG", default_value = "/etc/crm-connect/tenants")]
    pub config: PathBuf,

    /// Database URL of a tenant without `tenant.database_url`; {slug} is replaced
    #[arg(
        long,
        global = true,
        env = "CRM_CONNECT_DATABASE_URL_TEMPLATE",
        default_value = DEFAULT_DATABASE_URL_TEMPLATE,
        hide_env_values = true,
        value_parser = parse_secret,
    )]
    pub database_url_template: Secret,

    /// Log line format on stderr
    #[arg(long, global = true, env = "CRM_CONNECT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Tenants doing database or CRM work at the same moment
    #[arg(long, global = true, env = "CRM_CONNECT_CONCURRENCY", default_value = "32")]
    pub concurrency: NonZeroUsize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check every tenant file offline; exit 0 if valid (warnings allowed), 1 if not
    Validate,
    /// Reconcile every tenant once, then exit; 1 if any tenant failed
    Sync(SyncArgs),
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Only this tenant
    #[arg(long)]
    pub tenant: Option<String>,
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}
