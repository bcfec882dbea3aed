//! What the measurements run against: PostgreSQL clusters with a database
//! per tenant, a CRM sandbox per tenant, tenant files, and the daemon as a
//! child process.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig};
use crm_connect_sandbox::bitrix24::{self, B24Category, B24Sandbox, B24SandboxConfig, B24Stage};
use crm_connect_sandbox::files::OwnedDir;
use crm_connect_sandbox::postgres::{Cluster, create_database};
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};
use tokio_postgres::{Client, NoTls};

use crate::Options;
use crate::system;

/// Each cluster allows 300 connections; this many are left to tenants, the
/// rest to the harness and superuser slots.
const TENANT_CONNECTIONS_PER_CLUSTER: usize = 280;
/// The daemon's pool holds up to this many connections per tenant.
pub const POOL_SIZE: usize = 2;
/// Deal categories of every Bitrix24 portal, the default one (0) included.
pub const CATEGORIES: i32 = 8;
/// The stage a Bitrix24 tenant flags qualified, and the one edits alternate with.
pub const QUALIFIED: &str = "C1:PREPARATION";
pub const QUALIFIED_ALTERNATIVE: &str = "C1:EXECUTING";

/// PostgreSQL's own default `max_connections`.
pub const STOCK_MAX_CONNECTIONS: u32 = 100;

/// Clusters needed for `tenants` tenants at a full pool each.
pub fn clusters_for(tenants: usize) -> usize {
    (tenants * POOL_SIZE).div_ceil(TENANT_CONNECTIONS_PER_CLUSTER).max(1)
}

/// Throwaway clusters, and a maintenance connection to each.
pub struct Databases {
    admins: Vec<Client>,
    clusters: Vec<Cluster>,
}

impl Databases {
    pub async fn start(count: usize) -> anyhow::Result<Databases> {
        let starting: Vec<_> = (0..count).map(|_| tokio::task::spawn_blocking(Cluster::start)).collect();
        let mut clusters = Vec::new();
        for started in starting {
            clusters.push(started.await?.map_err(|e| anyhow!("cannot start PostgreSQL: {e}"))?);
        }
        let mut admins = Vec::new();
        for cluster in &clusters {
            admins.push(connect(&cluster.admin_url()).await?);
        }
        Ok(Databases { admins, clusters })
    }

    /// One cluster at `max_connections`, for every tenant database.
    pub async fn one_server(max_connections: u32) -> anyhow::Result<Databases> {
        let cluster = tokio::task::spawn_blocking(move || Cluster::start_with_max_connections(max_connections))
            .await?
            .map_err(|e| anyhow!("cannot start PostgreSQL: {e}"))?;
        let admins = vec![connect(&cluster.admin_url()).await?];
        Ok(Databases { admins, clusters: vec![cluster] })
    }

    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    pub async fn server_version(&self) -> anyhow::Result<String> {
        let row = self.admins[0].query_one("SELECT current_setting('server_version')", &[]).await?;
        Ok(format!("PostgreSQL {}", row.get::<_, String>(0)))
    }

    /// The postmasters' process ids (`postmaster.pid`, first line).
    pub fn postmasters(&self) -> Vec<u32> {
        self.clusters
            .iter()
            .filter_map(|c| std::fs::read_to_string(c.dir().join("data/postmaster.pid")).ok())
            .filter_map(|text| text.lines().next()?.trim().parse().ok())
            .collect()
    }

    pub fn admin_urls(&self) -> Vec<String> {
        self.clusters.iter().map(Cluster::admin_url).collect()
    }

    /// Creates `names` (database `i` on cluster `i % clusters`) and returns
    /// their URLs in the same order; the clusters work in parallel.
    pub async fn create(&self, names: &[String]) -> anyhow::Result<Vec<String>> {
        let clusters = self.clusters.len();
        let mut jobs = tokio::task::JoinSet::new();
        for (c, admin_url) in self.admin_urls().into_iter().enumerate() {
            let mine: Vec<(usize, String)> =
                names.iter().cloned().enumerate().filter(|(i, _)| i % clusters == c).collect();
            jobs.spawn(async move {
                let mut urls = Vec::new();
                for (i, name) in mine {
                    let url = create_database(&admin_url, &name).await.map_err(|e| anyhow!("{e}"))?;
                    urls.push((i, url));
                }
                Ok::<_, anyhow::Error>(urls)
            });
        }
        let mut urls = Vec::new();
        while let Some(created) = jobs.join_next().await {
            urls.extend(created??);
        }
        urls.sort_by_key(|(i, _)| *i);
        Ok(urls.into_iter().map(|(_, url)| url).collect())
    }

    /// The daemon's connections to databases whose name starts with
    /// `prefix`: the total over every cluster and the most on one database.
    pub async fn connections(&self, prefix: &str) -> anyhow::Result<(usize, usize)> {
        count_connections(&self.admins, &format!("{prefix}%")).await
    }

    /// Sessions ever opened to the databases whose names start with
    /// `prefix` (PostgreSQL counts each one when it is established).
    pub async fn sessions(&self, prefix: &str) -> anyhow::Result<u64> {
        let mut total = 0;
        for admin in &self.admins {
            let row = admin
                .query_one(
                    "SELECT coalesce(sum(sessions), 0)::bigint FROM pg_stat_database WHERE datname LIKE $1",
                    &[&format!("{prefix}%")],
                )
                .await?;
            total += u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        }
        Ok(total)
    }
}

async fn count_connections(admins: &[Client], pattern: &str) -> anyhow::Result<(usize, usize)> {
    let (mut total, mut most) = (0, 0);
    for admin in admins {
        let rows = admin
            .query(
                "SELECT datname, count(*) FROM pg_stat_activity \
                 WHERE application_name = 'crm-connect' AND datname LIKE $1 GROUP BY datname",
                &[&pattern],
            )
            .await?;
        for row in rows {
            let count = usize::try_from(row.get::<_, i64>(1)).unwrap_or(0);
            total += count;
            most = most.max(count);
        }
    }
    Ok((total, most))
}

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.with_context(|| "cannot connect".to_owned())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Samples the daemon's connections until stopped: the highest total and
/// per-database counts seen.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<(usize, usize, usize)>>,
}

impl Sampler {
    pub fn start(databases: &Databases, prefix: &str, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let (admin_urls, pattern) = (databases.admin_urls(), format!("{prefix}%"));
        let task = tokio::spawn(async move {
            let mut admins = Vec::new();
            for url in &admin_urls {
                admins.push(connect(url).await?);
            }
            let (mut total, mut per_db, mut samples) = (0, 0, 0);
            while !stopping.load(Ordering::Relaxed) {
                let (t, p) = count_connections(&admins, &pattern).await?;
                total = total.max(t);
                per_db = per_db.max(p);
                samples += 1;
                tokio::time::sleep(every).await;
            }
            Ok((total, per_db, samples))
        });
        Sampler { stop, task }
    }

    /// The highest total, the highest on one database, and the sample count.
    pub async fn finish(self) -> anyhow::Result<(usize, usize, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// Three stages in progress, won, lost, apology.
fn category_stages(prefix: &str) -> Vec<B24Stage> {
    let rows = [
        ("NEW", "Новая", "process"),
        ("PREPARATION", "Квалификация", "process"),
        ("EXECUTING", "В работе", "process"),
        ("WON", "Сделка успешна", "success"),
        ("LOSE", "Сделка провалена", "failure"),
        ("APOLOGY", "Анализ причины провала", "apology"),
    ];
    let ids: Vec<String> = rows.iter().map(|(id, _, _)| format!("{prefix}{id}")).collect();
    let prefixed: Vec<(&str, &str, &str)> =
        rows.iter().zip(&ids).map(|(&(_, name, extra), id)| (id.as_str(), name, extra)).collect();
    bitrix24::stages(&prefixed)
}

/// Categories 0 ("Общее") to 7, six stages each.
pub fn categories() -> Vec<B24Category> {
    (0..CATEGORIES)
        .map(|id| B24Category {
            id,
            name: if id == 0 { "Общее".to_owned() } else { format!("Воронка {id}") },
            sort: 100 * (id + 1),
            stages: category_stages(&if id == 0 { String::new() } else { format!("C{id}:") }),
        })
        .collect()
}

pub async fn amo_sandbox(index: usize, latency: Duration) -> anyhow::Result<AmoSandbox> {
    let config = AmoSandboxConfig {
        subdomain: format!("bench{index}"),
        account_id: 31_000_000 + index as i64,
        latency,
        ..AmoSandboxConfig::default()
    };
    Ok(AmoSandbox::start(config).await?)
}

pub async fn b24_sandbox(latency: Duration) -> anyhow::Result<B24Sandbox> {
    let sandbox = B24Sandbox::start(B24SandboxConfig { latency, ..B24SandboxConfig::default() }).await?;
    sandbox.set_categories(categories());
    Ok(sandbox)
}

/// A tenant on `database_url`, resyncing its stages on `resync` if given.
fn head(database_url: &str, resync: Option<&str>) -> TenantFile {
    let file = TenantFile::new().database_url(database_url);
    match resync {
        Some(cron) => file.schedule("stage_resync", cron),
        None => file,
    }
}

/// An AmoCRM tenant connecting with a fresh authorization code.
pub fn amo_file(sandbox: &AmoSandbox, database_url: &str, resync: Option<&str>) -> String {
    head(database_url, resync)
        .amocrm(sandbox)
        .authorization_code(&sandbox.issue_code())
        .amocrm_stages("qualified", [Stage::in_pipeline("Продажи", "Квалифицирован")])
        .text()
}

/// A Bitrix24 tenant on a webhook, flagging `qualified`.
pub fn b24_file(webhook_url: &str, database_url: &str, qualified: &str, resync: Option<&str>) -> String {
    head(database_url, resync).webhook_url(webhook_url).bitrix24_stages("qualified", [Stage::status(qualified)]).text()
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// The release binary, run with the settings of a clean environment.
pub fn command(binary: &Path, options: &Options) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary);
    for (key, _) in std::env::vars() {
        if key.starts_with("CRM_CONNECT_") || key == "CREDENTIALS_DIRECTORY" || key == "NOTIFY_SOCKET" {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "info").stdin(Stdio::null());
    if let Some(concurrency) = options.concurrency {
        command.arg("--concurrency").arg(concurrency.to_string());
    }
    command
}

/// `crm-connect run` as a child process, listening for `/metrics`.
pub struct Daemon {
    child: tokio::process::Child,
    pub pid: u32,
    pub started: Instant,
    metrics_url: String,
    wake_url: String,
    http: reqwest::Client,
}

/// `POST /leads/wake?tenant=SLUG` on a daemon's `--listen` address; cheap
/// to clone into many tasks.
#[derive(Clone)]
pub struct Waker {
    url: String,
    http: reqwest::Client,
}

impl Waker {
    /// Wakes `slug`'s delivery; returns the HTTP status (always 202).
    pub async fn wake(&self, slug: &str) -> anyhow::Result<u16> {
        let response = self.http.post(format!("{}?tenant={slug}", self.url)).send().await?;
        Ok(response.status().as_u16())
    }
}

impl Daemon {
    pub fn spawn(binary: &Path, options: &Options, config: &Path, log: &Path) -> anyhow::Result<Daemon> {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let log_file = std::fs::File::create(log)?;
        let started = Instant::now();
        let child = command(binary, options)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(listen.to_string())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start crm-connect run")?;
        let pid = child.id().context("the daemon has no pid")?;
        Ok(Daemon {
            child,
            pid,
            started,
            metrics_url: format!("http://{listen}/metrics"),
            wake_url: format!("http://{listen}/leads/wake"),
            http: reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?,
        })
    }

    /// `/metrics` as name-with-labels → value; `None` until it answers.
    pub async fn metrics(&self) -> Option<BTreeMap<String, f64>> {
        let text = self.http.get(&self.metrics_url).send().await.ok()?.text().await.ok()?;
        Some(parse_metrics(&text))
    }

    pub fn waker(&self) -> Waker {
        Waker { url: self.wake_url.clone(), http: self.http.clone() }
    }

    /// Polls `/metrics` every `every` until `connected` tenants are
    /// connected or `timeout` passes; returns the time since spawning.
    pub async fn wait_connected(&mut self, connected: usize, every: Duration, timeout: Duration) -> Option<Duration> {
        let key = "crm_connect_tenants{state=\"connected\"}";
        let deadline = self.started + timeout;
        loop {
            if let Some(metrics) = self.metrics().await
                && metrics.get(key).copied().unwrap_or(0.0) as usize >= connected
            {
                return Some(self.started.elapsed());
            }
            if Instant::now() >= deadline || self.exited() {
                return None;
            }
            tokio::time::sleep(every).await;
        }
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGTERM, then the exit (killed after 20 s); returns how long it took.
    pub async fn stop(mut self) -> Duration {
        let asked = Instant::now();
        let _ = std::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.is_err() {
            system::log("the daemon did not stop within 20 s; killing it");
            let _ = self.child.kill().await;
        }
        asked.elapsed()
    }
}

pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A private directory of this run, removed with its contents when dropped
/// (and swept by a later run if this one was killed).
pub type TempDir = OwnedDir;

pub fn temp_dir(prefix: &str) -> anyhow::Result<TempDir> {
    Ok(OwnedDir::create(&std::env::temp_dir(), prefix, |_| true)?)
}
