//! A test's world: a playground with the sandboxes it asks for, a fresh
//! database of its own, a directory for its tenant files and a context
//! with quick retries. Tenant `acme` unless a test names another.

use std::path::{Path, PathBuf};

use crm_connect::config::TenantConfig;
use crm_connect::context::Context;
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig};
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::playground::Playground;
use crm_connect_sandbox::tenant_file::TenantFile;
use tokio_postgres::Client;

use super::postgres::{TestDatabase, fresh_database};
use super::{connect, fast_context, tenant};

/// The slug every world's tenant has.
pub const SLUG: &str = "acme";

pub struct World {
    playground: Playground,
    pub db: TestDatabase,
    pub ctx: Context,
}

impl World {
    /// The sandboxes given, a fresh database, an empty tenant directory.
    pub async fn start(amocrm: Option<AmoSandboxConfig>, bitrix24: Option<B24SandboxConfig>) -> World {
        let mut builder = Playground::builder("crm-connect-test-");
        if let Some(config) = amocrm {
            builder = builder.amocrm(config);
        }
        if let Some(config) = bitrix24 {
            builder = builder.bitrix24(config);
        }
        let playground = builder.start().await.expect("the playground starts");
        World { playground, db: fresh_database().await, ctx: fast_context() }
    }

    pub async fn amocrm() -> World {
        World::amocrm_with(AmoSandboxConfig::default()).await
    }

    pub async fn amocrm_with(config: AmoSandboxConfig) -> World {
        World::start(Some(config), None).await
    }

    pub async fn bitrix24() -> World {
        World::bitrix24_with(B24SandboxConfig::default()).await
    }

    pub async fn bitrix24_with(config: B24SandboxConfig) -> World {
        World::start(None, Some(config)).await
    }

    pub async fn both() -> World {
        World::start(Some(AmoSandboxConfig::default()), Some(B24SandboxConfig::default())).await
    }

    pub fn amo(&self) -> &AmoSandbox {
        self.playground.amocrm()
    }

    pub fn portal(&self) -> &B24Sandbox {
        self.playground.bitrix24()
    }

    /// A tenant file on this world's database and every sandbox.
    pub fn file(&self) -> TenantFile {
        self.playground.tenant_file(Some(&self.db.url))
    }

    /// The same with a fresh authorization code for the AmoCRM sandbox.
    pub fn file_with_code(&self) -> TenantFile {
        self.file().authorization_code(&self.amo().issue_code())
    }

    /// The tenant as the daemon would read `file`.
    pub fn tenant(&self, file: &TenantFile) -> TenantConfig {
        tenant(SLUG, &file.text())
    }

    /// Writes `file` as `acme.toml` into the tenant directory.
    pub fn write(&self, file: &TenantFile) -> PathBuf {
        self.write_as(SLUG, file)
    }

    pub fn write_as(&self, slug: &str, file: &TenantFile) -> PathBuf {
        self.playground.write(slug, file).expect("the test can write its tenant files")
    }

    pub fn dir(&self) -> &Path {
        self.playground.dir()
    }

    /// The tenant directory as `--config` takes it.
    pub fn config(&self) -> &str {
        self.dir().to_str().expect("a UTF-8 temp directory")
    }

    /// A new connection to the tenant database.
    pub async fn client(&self) -> Client {
        connect(&self.db.url).await
    }
}
