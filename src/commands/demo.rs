//! `crm-connect demo`: the daemon on two demo tenants, one on AmoCRM (OAuth
//! code flow) and one on Bitrix24 (webhook), against the built-in CRM
//! sandboxes and a throwaway PostgreSQL, all on loopback and all removed on
//! exit.

use std::io;
use std::path::PathBuf;
use std::pin::pin;
use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::cli::{DemoArgs, GlobalArgs, StatusArgs};
use crate::config::{self, DEFAULT_DATABASE_URL_TEMPLATE};
use crate::daemon::{self, Hooks};
use crate::secret::Secret;
use crm_connect_sandbox::amocrm::AmoSandboxConfig;
use crm_connect_sandbox::bitrix24::B24SandboxConfig;
use crm_connect_sandbox::playground::{Playground, PlaygroundError};
use crm_connect_sandbox::postgres::ClusterError;
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};

/// What the temporary tenant directory's name starts with.
const CONFIG_DIR_PREFIX: &str = "crm-connect-demo-";
const AMO_SLUG: &str = "demo_amo";
const B24_SLUG: &str = "demo_b24";
/// Everything is on loopback: a first pass slower than this is stuck.
const FIRST_PASS_TIMEOUT: Duration = Duration::from_secs(60);
/// The daemon's own grace for in-flight work is shorter than this.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("cannot start PostgreSQL: {0}; or pass --database-url-template to use a server of your own")]
    Cluster(#[source] ClusterError),
    #[error("cannot prepare the database of {slug}: {source}")]
    Database {
        slug: &'static str,
        #[source]
        source: ClusterError,
    },
    #[error("cannot prepare the database of {slug}: {source}")]
    TheirDatabase {
        slug: &'static str,
        #[source]
        source: crate::db::DbError,
    },
    #[error("cannot start the {crm} sandbox: {source}")]
    Sandbox {
        crm: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the demo tenant files in {}: {source}", dir.display())]
    Files {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the demo tenant files are invalid:\n{0}")]
    Invalid(String),
    #[error("starting PostgreSQL was cut short: {0}")]
    Interrupted(#[source] tokio::task::JoinError),
}

pub async fn run(global: &GlobalArgs, args: &DemoArgs) -> ExitCode {
    // Listening from the start turns Ctrl-C into a clean stop at any point.
    let mut interrupt = pin!(interrupted());
    let demo = tokio::select! {
        demo = Demo::start(global) => demo,
        () = &mut interrupt => {
            eprintln!("crm-connect demo: interrupted while starting");
            return ExitCode::FAILURE;
        }
    };
    let demo = match demo {
        Ok(demo) => demo,
        Err(e) => {
            eprintln!("crm-connect demo: {e}");
            return ExitCode::FAILURE;
        }
    };

    let (first_pass_tx, first_pass) = oneshot::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    let hooks = Hooks { first_pass: Some(first_pass_tx), context: None };
    let mut running = tokio::spawn(daemon::run(demo.global.clone(), hooks, async move {
        // A dropped sender (the demo failing) stops the daemon as well.
        let _ = stopped.await;
    }));

    let mut code = ExitCode::SUCCESS;
    let mut ended = None;
    tokio::select! {
        Ok(()) = first_pass => {
            demo.print_banner();
            let _ = super::status::run(&demo.global, &StatusArgs { tenant: None, json: false }).await;
            if args.once {
                println!();
                println!("--once: stopping.");
            } else {
                demo.print_hints();
                tokio::select! {
                    () = &mut interrupt => {}
                    result = &mut running => ended = Some(result),
                }
            }
        }
        result = &mut running => ended = Some(result),
        () = &mut interrupt => {
            eprintln!("crm-connect demo: interrupted before the first pass was done");
            code = ExitCode::FAILURE;
        }
        () = tokio::time::sleep(FIRST_PASS_TIMEOUT) => {
            eprintln!("crm-connect demo: the daemon did not finish its first pass within {FIRST_PASS_TIMEOUT:?}");
            code = ExitCode::FAILURE;
        }
    }

    let _ = stop.send(());
    let result = match ended {
        // The daemon stopped before it was asked to: that is a failure.
        Some(result) => {
            eprintln!("crm-connect demo: the daemon stopped on its own");
            code = ExitCode::FAILURE;
            result
        }
        None => match tokio::time::timeout(STOP_TIMEOUT, &mut running).await {
            Ok(result) => result,
            Err(_) => {
                eprintln!("crm-connect demo: the daemon did not stop within {STOP_TIMEOUT:?}");
                running.abort();
                code = ExitCode::FAILURE;
                Ok(ExitCode::FAILURE)
            }
        },
    };
    match result {
        Ok(daemon_code) if daemon_code != ExitCode::SUCCESS => code = daemon_code,
        Ok(_) => {}
        Err(e) => {
            eprintln!("crm-connect demo: the daemon failed: {e}");
            code = ExitCode::FAILURE;
        }
    }

    let removed = demo.removed_on_exit();
    demo.stop().await;
    eprintln!("crm-connect demo: stopped; removed {removed}");
    code
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn interrupted() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Everything the demo started; dropped in `stop`.
struct Demo {
    /// With a cluster of its own unless the user named a server of theirs.
    playground: Playground,
    /// The caller's flags with the demo's tenant directory and databases.
    global: GlobalArgs,
}

impl Demo {
    async fn start(global: &GlobalArgs) -> Result<Demo, DemoError> {
        let mut global = global.clone();
        let theirs = global.database_url_template.expose() != DEFAULT_DATABASE_URL_TEMPLATE;
        let mut builder = Playground::builder(CONFIG_DIR_PREFIX)
            .amocrm(AmoSandboxConfig::default())
            .bitrix24(B24SandboxConfig::default());
        if !theirs {
            builder = builder.cluster();
        }
        let playground = builder.start().await.map_err(DemoError::from)?;

        let (amo_db, b24_db) = match playground.cluster() {
            None => {
                for slug in [AMO_SLUG, B24_SLUG] {
                    let url = Secret::new(global.database_url_template.expose().replace("{slug}", slug));
                    crate::db::ensure_database(&url)
                        .await
                        .map_err(|source| DemoError::TheirDatabase { slug, source })?;
                }
                // The files leave the URL to the template, so no password is written to them.
                (None, None)
            }
            Some(cluster) => {
                let create = |slug: &'static str| async move {
                    cluster.create_database(slug).await.map_err(|source| DemoError::Database { slug, source })
                };
                let (amo_db, b24_db) = (create(AMO_SLUG).await?, create(B24_SLUG).await?);
                global.database_url_template = Secret::new(cluster.url_template());
                (Some(amo_db), Some(b24_db))
            }
        };

        let tenant = |comment: &str, database_url: Option<String>| {
            let file = TenantFile::new().comment(comment);
            database_url.map_or(file.clone(), |url| file.database_url(&url))
        };
        let amo = tenant("Demo tenant on the AmoCRM sandbox: the OAuth code flow, then stages.", amo_db)
            .amocrm(playground.amocrm())
            .authorization_code(&playground.amocrm().issue_code())
            .amocrm_stages("qualified", [Stage::in_pipeline("Продажи", "Квалифицирован")]);
        let b24 = tenant("Demo tenant on the Bitrix24 sandbox: an inbound webhook, then stages.", b24_db)
            .bitrix24(playground.bitrix24())
            .bitrix24_stages("qualified", [Stage::status("C1:PREPARATION")]);
        for (slug, file) in [(AMO_SLUG, amo), (B24_SLUG, b24)] {
            playground
                .write(slug, &file)
                .map_err(|source| DemoError::Files { dir: playground.dir().to_path_buf(), source })?;
        }
        global.config = playground.dir().to_path_buf();

        // A mistake here is the demo's own; say so before the daemon starts.
        let loaded = config::load(&global.config, &config::LoadOptions::new(global.database_url_template.clone()));
        let problems: Vec<String> =
            loaded.files.iter().flat_map(|f| &f.problems).filter(|p| p.is_error()).map(|p| p.to_string()).collect();
        if !problems.is_empty() {
            return Err(DemoError::Invalid(problems.join("\n")));
        }

        Ok(Demo { playground, global })
    }

    fn print_banner(&self) {
        let postgres = match self.playground.cluster() {
            Some(cluster) => format!("{}  (throwaway cluster in {})", cluster.url_template(), cluster.dir().display()),
            None => without_password(self.global.database_url_template.expose()),
        };
        println!("crm-connect demo: the daemon runs two demo tenants; its first pass is done.");
        println!();
        println!("  PostgreSQL        {postgres}");
        println!("  AmoCRM sandbox    {}", self.playground.amocrm().base_url());
        println!("  Bitrix24 sandbox  {}", self.playground.bitrix24().base_url());
        println!("  tenant files      {}  ({AMO_SLUG}.toml, {B24_SLUG}.toml)", self.playground.dir().display());
        println!();
    }

    fn print_hints(&self) {
        let config = self.playground.dir().display();
        // The binary as it was started, so the hints work under `cargo run` too.
        let program = std::env::current_exe().map_or_else(|_| "crm-connect".to_owned(), |p| p.display().to_string());
        println!();
        println!("In another terminal, for instance:");
        println!("  {program} stages --config {config} --tenant {AMO_SLUG}");
        println!("  {program} test-lead --config {config} --tenant {B24_SLUG}");
        println!("Ctrl-C stops the demo and removes everything above.");
    }

    /// What `stop` removes, for the last line.
    fn removed_on_exit(&self) -> String {
        let config = self.playground.dir().display();
        match self.playground.cluster() {
            Some(cluster) => format!("{config} and {}", cluster.dir().display()),
            None => format!("{config} (the demo databases stay on your server)"),
        }
    }

    /// Stops the sandboxes and the cluster and removes the directories.
    async fn stop(self) {
        self.playground.stop().await;
    }
}

impl From<PlaygroundError> for DemoError {
    fn from(error: PlaygroundError) -> DemoError {
        match error {
            PlaygroundError::Cluster(e) => DemoError::Cluster(e),
            PlaygroundError::Interrupted(e) => DemoError::Interrupted(e),
            PlaygroundError::Sandbox { crm, source } => DemoError::Sandbox { crm, source },
            PlaygroundError::Dir { base, source } => DemoError::Files { dir: base, source },
        }
    }
}

/// A database URL fit to print: the password, if any, becomes `***`.
fn without_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return "(a database URL that is not printed)".to_owned();
    };
    let authority_end = url[scheme_end..].find(['/', '?']).map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let Some((user, _password)) = userinfo.split_once(':') else {
        return url.to_owned();
    };
    format!("{}{user}:***@{host}{}", &url[..scheme_end], &url[authority_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(without_password("postgresql://u:secret@h:5432/x_{slug}"), "postgresql://u:***@h:5432/x_{slug}");
        assert_eq!(without_password("postgresql://u@h/x?sslmode=require"), "postgresql://u@h/x?sslmode=require");
        assert_eq!(without_password("postgresql://h/x"), "postgresql://h/x");
        assert_eq!(without_password("host=h password=p"), "(a database URL that is not printed)");
    }
}
