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

#[derive(Clone, Debug, Args)]
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

    /// Serve /healthz, /metrics and the AmoCRM OAuth callback on this address (e.g. 127.0.0.1:9187)
    #[arg(long, global = true, env = "CRM_CONNECT_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,

    /// Log line format on stderr
    #[arg(long, global = true, env = "CRM_CONNECT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Tenants doing database or CRM work at the same moment (reconciles,
    /// resyncs and funnel polls take at most three quarters of them, the
    /// rest is kept for lead delivery and lease checks)
    #[arg(long, global = true, env = "CRM_CONNECT_CONCURRENCY", default_value = "32")]
    pub concurrency: NonZeroUsize,

    /// Connections to one PostgreSQL server at most, shared by every tenant database on it
    #[arg(long, global = true, env = "CRM_CONNECT_DB_CONNECTIONS", default_value = "10")]
    pub db_connections: NonZeroUsize,

    /// One active daemon per tenant: hold a lease of this length in its database (e.g. 2m)
    #[arg(long, global = true, env = "CRM_CONNECT_LEASE", value_parser = parse_lease)]
    pub lease: Option<std::time::Duration>,
}

impl GlobalArgs {
    /// Database pools as the flags size them.
    pub fn pool_settings(&self) -> crate::db::PoolSettings {
        crate::db::PoolSettings { server_connections: self.db_connections.get(), ..crate::db::PoolSettings::default() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: reconcile every tenant, then keep tokens fresh, stages synced and files watched
    Run,
    /// A throwaway PostgreSQL, both CRM sandboxes and two demo tenants under the daemon
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// Check every tenant file offline; exit 0 if valid (warnings allowed), 1 if not
    Validate(ValidateArgs),
    /// Print the JSON Schema of a tenant file, for editors and CI
    Schema,
    /// Reconcile every tenant once (config, tokens, stages), then exit; 1 if any tenant failed
    Sync(SyncArgs),
    /// Per tenant and CRM: state, token expiry, last stage sync, stage count, last error
    Status(StatusArgs),
    /// The synced stages of a tenant with their ids and flags, to help write a mapping
    Stages(TenantArg),
    /// Deliver the due rows of crm_lead_outbox once, until nothing is due, then exit
    Deliver(DeliverArgs),
    /// Read every stage change of the tenants with [funnel] into crm_stage_changes, until caught up, then exit
    Funnel(FunnelArgs),
    /// Create one test lead (AmoCRM) or deal (Bitrix24) named "Тест crm-connect"; prints its id
    TestLead(TestLeadArgs),
    /// Exchange an AmoCRM authorization code given here, so that it never passes through Git
    Authorize(AuthorizeArgs),
    /// Print the AmoCRM authorisation URL with a single-use state, for the daemon's OAuth callback
    AuthUrl(TenantArg),
    /// Print the tab-completion script for a shell, e.g. `source <(crm-connect completions bash)`
    Completions(CompletionsArgs),
    /// Write the manual pages, crm-connect.1 and one per subcommand, into a directory
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// `text`: a line per problem and a summary; `json`: an array of problems;
    /// `github`: a GitHub Actions annotation per problem (with json and github
    /// the summary goes to stderr)
    #[arg(long, value_enum, default_value_t = ValidateFormat::Text)]
    pub format: ValidateFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ValidateFormat {
    Text,
    Json,
    Github,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Print the status once both demo tenants are connected, then clean up and exit
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this tenant
    #[arg(long)]
    pub tenant: Option<String>,
    /// JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeliverArgs {
    /// Only this tenant
    #[arg(long)]
    pub tenant: Option<String>,
}

#[derive(Debug, Args)]
pub struct FunnelArgs {
    /// Only this tenant
    #[arg(long)]
    pub tenant: Option<String>,
}

#[derive(Debug, Args)]
pub struct TenantArg {
    #[arg(long)]
    pub tenant: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CrmArg {
    Amocrm,
    Bitrix24,
}

#[derive(Debug, Args)]
pub struct TestLeadArgs {
    #[arg(long)]
    pub tenant: String,
    /// Needed when the tenant uses both CRMs
    #[arg(long, value_enum)]
    pub crm: Option<CrmArg>,
}

#[derive(Debug, Args)]
pub struct AuthorizeArgs {
    #[arg(long)]
    pub tenant: String,
    /// The one-time code from the AmoCRM integration (valid 20 minutes)
    #[arg(long, value_parser = parse_secret, hide_env_values = true)]
    pub code: Secret,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// E.g. /usr/local/share/man/man1; created if missing, pages of the same names replaced
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Only this tenant
    #[arg(long)]
    pub tenant: Option<String>,
    /// Read the CRMs and databases and print the changes a sync would make, writing nothing
    #[arg(long)]
    pub dry_run: bool,
    /// How long each tenant may take (a token request in flight still runs to its end and its pair is stored)
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    pub timeout: std::time::Duration,
}

fn parse_lease(s: &str) -> Result<std::time::Duration, String> {
    let lease = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if lease < std::time::Duration::from_secs(1) {
        return Err("a lease must last at least 1s".into());
    }
    Ok(lease)
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}
