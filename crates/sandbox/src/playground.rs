//! The playground: whichever of a throwaway PostgreSQL cluster, the AmoCRM
//! sandbox and the Bitrix24 sandbox a caller asks for, and a private
//! directory for the tenant files that point at them. The demo runs the
//! daemon on one, the tests build their worlds on one, the benchmark its
//! tenants; all of it goes away when the playground is dropped.

use std::io;
use std::path::{Path, PathBuf};

use crate::amocrm::{AmoSandbox, AmoSandboxConfig};
use crate::bitrix24::{B24Sandbox, B24SandboxConfig};
use crate::files::OwnedDir;
use crate::postgres::{Cluster, ClusterError};
use crate::tenant_file::TenantFile;

/// Why a playground could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlaygroundError {
    #[error("cannot start PostgreSQL: {0}")]
    Cluster(#[source] ClusterError),
    #[error("starting PostgreSQL was cut short: {0}")]
    Interrupted(#[source] tokio::task::JoinError),
    #[error("cannot start the {crm} sandbox: {source}")]
    Sandbox {
        crm: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a directory in {}: {source}", base.display())]
    Dir {
        base: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What to start; `start` starts it.
#[derive(Debug)]
pub struct PlaygroundBuilder {
    dir_prefix: String,
    cluster: bool,
    amocrm: Option<AmoSandboxConfig>,
    bitrix24: Option<B24SandboxConfig>,
}

impl PlaygroundBuilder {
    /// A throwaway cluster of the playground's own; without it the
    /// databases come from elsewhere (a server of the caller's).
    pub fn cluster(mut self) -> PlaygroundBuilder {
        self.cluster = true;
        self
    }

    pub fn amocrm(mut self, config: AmoSandboxConfig) -> PlaygroundBuilder {
        self.amocrm = Some(config);
        self
    }

    pub fn bitrix24(mut self, config: B24SandboxConfig) -> PlaygroundBuilder {
        self.bitrix24 = Some(config);
        self
    }

    /// Starts the sandboxes, then the cluster (initdb takes seconds, so
    /// off the runtime's threads), then makes the directory.
    pub async fn start(self) -> Result<Playground, PlaygroundError> {
        let amocrm = match self.amocrm {
            Some(config) => Some(
                AmoSandbox::start(config).await.map_err(|source| PlaygroundError::Sandbox { crm: "AmoCRM", source })?,
            ),
            None => None,
        };
        let bitrix24 = match self.bitrix24 {
            Some(config) => Some(
                B24Sandbox::start(config)
                    .await
                    .map_err(|source| PlaygroundError::Sandbox { crm: "Bitrix24", source })?,
            ),
            None => None,
        };
        let cluster = if self.cluster {
            let started = tokio::task::spawn_blocking(Cluster::start).await.map_err(PlaygroundError::Interrupted)?;
            Some(started.map_err(PlaygroundError::Cluster)?)
        } else {
            None
        };
        let base = std::env::temp_dir();
        let dir = OwnedDir::create(&base, &self.dir_prefix, |_| true)
            .map_err(|source| PlaygroundError::Dir { base: base.clone(), source })?;
        Ok(Playground { cluster, amocrm, bitrix24, dir })
    }
}

/// A running playground; dropping it stops everything and removes its
/// directories (the cluster's drop blocks a little: see `stop`).
pub struct Playground {
    cluster: Option<Cluster>,
    amocrm: Option<AmoSandbox>,
    bitrix24: Option<B24Sandbox>,
    dir: OwnedDir,
}

impl Playground {
    /// Nothing yet but a directory `<tmp>/<dir_prefix><pid>-<random>`.
    pub fn builder(dir_prefix: &str) -> PlaygroundBuilder {
        PlaygroundBuilder { dir_prefix: dir_prefix.to_owned(), cluster: false, amocrm: None, bitrix24: None }
    }

    /// The AmoCRM sandbox; asking a playground started without one is a
    /// mistake of the caller's, so it panics.
    pub fn amocrm(&self) -> &AmoSandbox {
        self.amocrm.as_ref().expect("the playground was started without the AmoCRM sandbox")
    }

    /// The Bitrix24 sandbox; panics like `amocrm`.
    pub fn bitrix24(&self) -> &B24Sandbox {
        self.bitrix24.as_ref().expect("the playground was started without the Bitrix24 sandbox")
    }

    pub fn has_amocrm(&self) -> bool {
        self.amocrm.is_some()
    }

    pub fn has_bitrix24(&self) -> bool {
        self.bitrix24.is_some()
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Where the tenant files go.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A tenant file on every sandbox of the playground, its database at
    /// `database_url` (none: the URL template gives it).
    pub fn tenant_file(&self, database_url: Option<&str>) -> TenantFile {
        let mut file = TenantFile::new();
        if let Some(url) = database_url {
            file = file.database_url(url);
        }
        if let Some(amo) = &self.amocrm {
            file = file.amocrm(amo);
        }
        if let Some(portal) = &self.bitrix24 {
            file = file.bitrix24(portal);
        }
        file
    }

    /// Writes `<slug>.toml` into the playground's directory.
    pub fn write(&self, slug: &str, file: &TenantFile) -> io::Result<PathBuf> {
        file.write(self.dir(), slug)
    }

    /// Replaces `<slug>.toml` as an editor saves it.
    pub fn replace(&self, slug: &str, file: &TenantFile) -> io::Result<PathBuf> {
        file.replace(self.dir(), slug)
    }

    /// Drops everything, waiting for the cluster to stop off the runtime's
    /// threads (it blocks for up to a few seconds).
    pub async fn stop(self) {
        let Playground { cluster, amocrm, bitrix24, dir } = self;
        drop((amocrm, bitrix24, dir));
        if let Some(cluster) = cluster {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }
}
