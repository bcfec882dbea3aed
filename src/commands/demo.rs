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
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig};
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::files::{OwnedDir, toml_string};
use crm_connect_sandbox::postgres::{Cluster, ClusterError};

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

/// Where the demo tenants' databases are.
enum Postgres {
    /// Started by the demo, stopped and removed with it.
    Own(Cluster),
    /// The user's, as `--database-url-template` names it.
    Theirs,
}

/// Everything the demo started; dropped in `stop`.
struct Demo {
    postgres: Postgres,
    amo: AmoSandbox,
    b24: B24Sandbox,
    config_dir: OwnedDir,
    /// The caller's flags with the demo's tenant directory and databases.
    global: GlobalArgs,
}

impl Demo {
    async fn start(global: &GlobalArgs) -> Result<Demo, DemoError> {
        let amo = AmoSandbox::start(AmoSandboxConfig::default())
            .await
            .map_err(|source| DemoError::Sandbox { crm: "AmoCRM", source })?;
        let b24 = B24Sandbox::start(B24SandboxConfig::default())
            .await
            .map_err(|source| DemoError::Sandbox { crm: "Bitrix24", source })?;

        let mut global = global.clone();
        let theirs = global.database_url_template.expose() != DEFAULT_DATABASE_URL_TEMPLATE;
        let (postgres, amo_db, b24_db) = if theirs {
            for slug in [AMO_SLUG, B24_SLUG] {
                let url = Secret::new(global.database_url_template.expose().replace("{slug}", slug));
                crate::db::ensure_database(&url).await.map_err(|source| DemoError::TheirDatabase { slug, source })?;
            }
            // The files leave the URL to the template, so no password is written to them.
            (Postgres::Theirs, None, None)
        } else {
            // initdb takes seconds: off the runtime's threads.
            let cluster = tokio::task::spawn_blocking(Cluster::start)
                .await
                .map_err(DemoError::Interrupted)?
                .map_err(DemoError::Cluster)?;
            let amo_db = cluster
                .create_database(AMO_SLUG)
                .await
                .map_err(|source| DemoError::Database { slug: AMO_SLUG, source })?;
            let b24_db = cluster
                .create_database(B24_SLUG)
                .await
                .map_err(|source| DemoError::Database { slug: B24_SLUG, source })?;
            global.database_url_template = Secret::new(cluster.url_template());
            (Postgres::Own(cluster), Some(amo_db), Some(b24_db))
        };

        let base = std::env::temp_dir();
        let config_dir = OwnedDir::create(&base, CONFIG_DIR_PREFIX, |_| true)
            .map_err(|source| DemoError::Files { dir: base.clone(), source })?;
        let write = |slug: &str, text: String| {
            config_dir
                .write(&format!("{slug}.toml"), &text)
                .map_err(|source| DemoError::Files { dir: config_dir.path().to_path_buf(), source })
        };
        write(AMO_SLUG, amo_tenant(&amo, amo_db.as_deref()))?;
        write(B24_SLUG, b24_tenant(&b24, b24_db.as_deref()))?;
        global.config = config_dir.path().to_path_buf();

        // A mistake here is the demo's own; say so before the daemon starts.
        let loaded = config::load(&global.config, &config::LoadOptions::new(global.database_url_template.clone()));
        let problems: Vec<String> =
            loaded.files.iter().flat_map(|f| &f.problems).filter(|p| p.is_error()).map(|p| p.to_string()).collect();
        if !problems.is_empty() {
            return Err(DemoError::Invalid(problems.join("\n")));
        }

        Ok(Demo { postgres, amo, b24, config_dir, global })
    }

    fn print_banner(&self) {
        let postgres = match &self.postgres {
            Postgres::Own(cluster) => {
                format!("{}  (throwaway cluster in {})", cluster.url_template(), cluster.dir().display())
            }
            Postgres::Theirs => without_password(self.global.database_url_template.expose()),
        };
        println!("crm-connect demo: the daemon runs two demo tenants; its first pass is done.");
        println!();
        println!("  PostgreSQL        {postgres}");
        println!("  AmoCRM sandbox    {}", self.amo.base_url());
        println!("  Bitrix24 sandbox  {}", self.b24.base_url());
        println!("  tenant files      {}  ({AMO_SLUG}.toml, {B24_SLUG}.toml)", self.config_dir.path().display());
        println!();
    }

    fn print_hints(&self) {
        let config = self.config_dir.path().display();
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
        match &self.postgres {
            Postgres::Own(cluster) => format!("{} and {}", self.config_dir.path().display(), cluster.dir().display()),
            Postgres::Theirs => {
                format!("{} (the demo databases stay on your server)", self.config_dir.path().display())
            }
        }
    }

    /// Stops the sandboxes and the cluster and removes the directories.
    async fn stop(self) {
        let Demo { postgres, amo, b24, config_dir, global: _ } = self;
        drop((amo, b24, config_dir));
        if let Postgres::Own(cluster) = postgres {
            // Waiting for the server to stop blocks.
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }
}

fn amo_tenant(sandbox: &AmoSandbox, database_url: Option<&str>) -> String {
    let c = sandbox.config();
    format!(
        "# Demo tenant on the AmoCRM sandbox: the OAuth code flow, then stages.\n\
         {tenant}\n\
         [amocrm]\n\
         subdomain = {subdomain}\n\
         client_id = {client_id}\n\
         client_secret = {client_secret}\n\
         redirect_uri = {redirect_uri}\n\
         base_url = {base_url}\n\
         authorization_code = {code}\n\
         \n\
         [amocrm.stages]\n\
         qualified = [{{ pipeline = \"Продажи\", stage = \"Квалифицирован\" }}]\n",
        tenant = tenant_table(database_url),
        subdomain = toml_string(&c.subdomain),
        client_id = toml_string(&c.client_id),
        client_secret = toml_string(&c.client_secret),
        redirect_uri = toml_string(&c.redirect_uri),
        base_url = toml_string(&sandbox.base_url()),
        code = toml_string(&sandbox.issue_code()),
    )
}

fn b24_tenant(sandbox: &B24Sandbox, database_url: Option<&str>) -> String {
    format!(
        "# Demo tenant on the Bitrix24 sandbox: an inbound webhook, then stages.\n\
         {tenant}\n\
         [bitrix24]\n\
         webhook_url = {webhook_url}\n\
         \n\
         [bitrix24.stages]\n\
         qualified = [\"C1:PREPARATION\"]\n",
        tenant = tenant_table(database_url),
        webhook_url = toml_string(&sandbox.webhook_url()),
    )
}

/// `[tenant]` with the database URL, or nothing when the template gives it.
fn tenant_table(database_url: Option<&str>) -> String {
    database_url.map_or_else(String::new, |url| format!("[tenant]\ndatabase_url = {}\n", toml_string(url)))
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
