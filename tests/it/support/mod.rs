//! What every integration test shares: running the binary, connecting to a
//! tenant database, writing and parsing tenant files, a quick context.

pub mod daemon;
pub mod postgres;
pub mod proxy;
pub mod rows;
pub mod world;

use std::path::Path;
use std::process::Stdio;

use crm_connect_sandbox::amocrm::AmoSandbox;
use crm_connect_sandbox::tenant_file::TenantFile;
use tokio_postgres::{Client, NoTls};

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Everything the run printed, for assertions that something never appears.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the `crm-connect` binary with `args`, in an environment without
/// inherited `CRM_CONNECT_*` settings, plus `env`.
pub async fn crm_connect(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-connect"));
    for (key, _) in std::env::vars() {
        if key.starts_with("CRM_CONNECT_") || key == "RUST_LOG" || key == "CREDENTIALS_DIRECTORY" {
            command.env_remove(key);
        }
    }
    let output = command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the crm-connect binary runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.expect("the test database accepts connections");
    tokio::spawn(connection);
    client
}

/// Writes a file (a tenant file, a secret) into `dir`.
pub fn write(dir: &Path, name: &str, text: impl std::fmt::Display) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text.to_string()).expect("the test can write its files");
    path
}

/// A tenant file on `database_url` and the AmoCRM sandbox, with a fresh
/// authorization code.
pub fn with_code(database_url: &str, amo: &AmoSandbox) -> TenantFile {
    TenantFile::new().database_url(database_url).amocrm(amo).authorization_code(&amo.issue_code())
}

/// A context whose CRM retries are quick, for tests that inject faults.
pub fn fast_context() -> crm_connect::context::Context {
    let mut ctx = crm_connect::context::Context::new(crm_connect::db::PoolSettings::default())
        .with_request_timeout(std::time::Duration::from_secs(5));
    ctx.retry = crm_connect::crm::RetryPolicy {
        deadline: std::time::Duration::from_secs(30),
        min_delay: std::time::Duration::from_millis(20),
        max_delay: std::time::Duration::from_millis(300),
    };
    ctx
}

/// Parses a tenant file's text (the file need not exist).
pub fn tenant(slug: &str, text: &impl std::fmt::Display) -> crm_connect::config::TenantConfig {
    let report = crm_connect::config::parse_file(
        std::path::Path::new(&format!("/tenants/{slug}.toml")),
        &text.to_string(),
        &crm_connect::config::LoadOptions::default(),
    );
    let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    report.tenant.unwrap_or_else(|| panic!("invalid test tenant: {problems:#?}"))
}
