//! The measurements, one function each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use crm_connect_sandbox::amocrm::AmoSandbox;
use crm_connect_sandbox::bitrix24::B24Sandbox;
use crm_connect_sandbox::faults::RecordedRequest;
use serde::Serialize;

use crate::Options;
use crate::fixture::{self, Daemon, Databases, QUALIFIED, QUALIFIED_ALTERNATIVE, Sampler, TempDir};
use crate::system::{self, log};

/// How often `/metrics` is polled while the daemon starts.
const METRICS_POLL: Duration = Duration::from_millis(25);
/// How often `pg_stat_activity` is sampled while the daemon starts.
const CONNECTIONS_POLL: Duration = Duration::from_millis(50);
/// How often the edit latency polls the database for the flag.
const FLAG_POLL: Duration = Duration::from_millis(2);
/// Between edits, so that each edit's two Bitrix24 requests fit the
/// client's 2 requests/s per portal and no edit waits for the previous
/// one's budget.
const EDIT_GAP: Duration = Duration::from_secs(1);
/// An edit not in the database after this counts as lost.
const EDIT_TIMEOUT: Duration = Duration::from_secs(10);
/// A six-field cron: every five seconds.
const RESYNC_CRON: &str = "*/5 * * * * *";
const RESYNC_PERIOD_MS: u64 = 5_000;
const RESYNCS_COUNTED: usize = 3;
/// The Bitrix24 client's burst per portal (requests let out at once).
const CLIENT_BURST: usize = 10;

enum Crm {
    Amo(AmoSandbox),
    B24(B24Sandbox),
}

struct Tenant {
    slug: String,
    database_url: String,
    file: PathBuf,
    crm: Crm,
}

impl Tenant {
    fn requests(&self) -> Vec<RecordedRequest> {
        match &self.crm {
            Crm::Amo(s) => s.requests(),
            Crm::B24(s) => s.requests(),
        }
    }

    fn violations(&self) -> usize {
        match &self.crm {
            Crm::Amo(s) => s.violations(),
            Crm::B24(s) => s.violations(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ColdStart {
    pub tenants: usize,
    pub amocrm_tenants: usize,
    pub bitrix24_tenants: usize,
    pub clusters: usize,
    /// From `crm-connect run` until `/metrics` counts every tenant connected;
    /// `None`: not within the timeout.
    pub reconciled_secs: Option<f64>,
    pub timeout_secs: f64,
    pub states: BTreeMap<String, f64>,
    /// Tenants whose status rows say connected with stages synced.
    pub verified_tenants: usize,
    pub peak_rss_mb: f64,
    pub rss_at_reconciled_mb: f64,
    pub cpu_secs_until_reconciled: f64,
    /// From the spawn until all were connected: the PostgreSQL servers' CPU,
    /// the harness's own (sandboxes included), and how busy the machine's
    /// CPUs were.
    pub postgres_cpu_secs: f64,
    /// Sessions opened to the tenant databases until all were connected.
    pub sessions: u64,
    pub harness_cpu_secs: f64,
    pub machine_busy_percent: f64,
    pub mean_reconcile_secs: f64,
    /// Per CRM, the mean time from a tenant's first request to its last
    /// answer (the sandbox's arrival times plus the latency).
    pub amocrm_mean_crm_secs: f64,
    pub bitrix24_mean_crm_secs: f64,
    /// When the last tenant's first request arrived, after the spawn.
    pub last_first_request_secs: f64,
    pub busy_connections_total: usize,
    pub busy_connections_per_tenant: usize,
    /// "too many clients" and "cannot connect now" lines in the daemons'
    /// logs (cold start and restart).
    pub connection_errors: usize,
    pub connection_samples: usize,
    pub idle_connections: usize,
    pub idle_check_after_secs: f64,
    pub idle_cpu_percent: f64,
    pub idle_secs: u64,
    /// The idle period held the tenants' scheduled stage resync (default
    /// schedule: every quarter hour).
    pub resync_in_idle: bool,
    pub threads: u64,
    pub open_fds: usize,
    /// Requests of the cold start, until all were connected.
    pub requests_amocrm: usize,
    pub requests_bitrix24: usize,
    /// Over the daemon's whole run (idle period and edits included).
    pub violations: usize,
    pub shutdown_secs: f64,
    pub load_before: [f64; 3],
    /// The same tenants once more under a new daemon: databases migrated,
    /// tokens and stages stored.
    pub restart: Restart,
}

#[derive(Clone, Debug, Serialize)]
pub struct Restart {
    pub reconciled_secs: Option<f64>,
    pub mean_reconcile_secs: f64,
    pub daemon_cpu_secs: f64,
    pub postgres_cpu_secs: f64,
    pub sessions: u64,
    pub machine_busy_percent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Edits {
    pub tenants_loaded: usize,
    pub edits: usize,
    pub lost: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub gap_ms: u64,
    pub bitrix24_requests_per_edit: f64,
    pub latencies_ms: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Resync {
    pub cron: String,
    pub amocrm_connect_requests: usize,
    pub bitrix24_connect_requests: usize,
    pub amocrm_connect_calls: Vec<String>,
    pub bitrix24_connect_calls: Vec<String>,
    pub amocrm_per_resync: Vec<usize>,
    pub bitrix24_per_resync: Vec<usize>,
    pub amocrm_resync_calls: Vec<String>,
    pub bitrix24_resync_calls: Vec<String>,
    pub connect_done_before_first_resync: bool,
    pub violations: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Runbook {
    pub runs: usize,
    pub categories: i32,
    pub stages: usize,
    pub runbook_secs: Vec<f64>,
    pub sync_secs: Vec<f64>,
    pub runbook_median_secs: f64,
    pub sync_median_secs: f64,
    /// Runbook time over crm-connect time (medians).
    pub speedup: f64,
    pub runbook_requests: usize,
    pub sync_requests: usize,
    pub runbook_psql_calls: usize,
    pub runbook_rows: i64,
    pub sync_rows: i64,
    pub runbook_category0_rows: i64,
    pub sync_category0_rows: i64,
    pub runbook_flagged: [i64; 3],
    pub sync_flagged: [i64; 3],
    pub runbook_summary: String,
    /// What the portal answers the runbook's webhook form without the user id.
    pub without_user_id_status: u16,
    pub violations: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    pub tenants: usize,
    pub exit_code: i32,
    pub sync_secs: f64,
    pub requests: usize,
    pub span_secs: f64,
    pub mean_per_sec: f64,
    pub sustained_per_sec: f64,
    pub peak_1s: usize,
    pub refused: usize,
    pub violations: usize,
    pub connected_tenants: usize,
}

fn mb(kib: Option<u64>) -> f64 {
    kib.map_or(f64::NAN, |k| k as f64 * 1024.0 / 1e6)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The method name of a Bitrix24 request, the path of any other; never the
/// webhook code.
pub fn call_name(request: &RecordedRequest) -> String {
    match request.path.strip_prefix("/rest/") {
        Some(rest) => rest.rsplit('/').next().unwrap_or_default().to_owned(),
        None => format!("{} {}", request.method, request.path),
    }
}

/// `<dir>/watched/tenants`: the daemon also watches the parent of its
/// configuration directory, so nothing else (its log above all) may live
/// there.
pub fn tenants_dir(dir: &TempDir) -> anyhow::Result<PathBuf> {
    let config = dir.join("watched").join("tenants");
    std::fs::create_dir_all(&config)?;
    Ok(config)
}

/// Where a daemon logs: `--logs` if given (kept), else the run's temporary
/// directory, outside the watched tree.
/// Lines of a daemon log saying the server refused a connection for lack of room.
fn connection_errors_in(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|text| text.lines().filter(|l| l.contains("too many clients") || l.contains("cannot connect now")).count())
        .unwrap_or(0)
}

pub fn log_file(options: &Options, dir: &TempDir, name: &str) -> PathBuf {
    match &options.logs {
        Some(logs) => logs.join(format!("{name}.log")),
        None => dir.join(format!("{name}.log")),
    }
}

/// States and stage counts from each tenant's `crm_connect_status`.
async fn verify(tenants: &[Tenant]) -> usize {
    let mut verified = 0;
    for tenant in tenants {
        let crm = match tenant.crm {
            Crm::Amo(_) => "amocrm",
            Crm::B24(_) => "bitrix24",
        };
        let Ok(client) = fixture::connect(&tenant.database_url).await else { continue };
        let row = client
            .query_opt("SELECT state, coalesce(stage_count, 0) FROM crm_connect_status WHERE crm = $1", &[&crm])
            .await;
        if let Ok(Some(row)) = row
            && row.get::<_, String>(0) == "connected"
            && row.get::<_, i32>(1) > 0
        {
            verified += 1;
        }
    }
    verified
}

/// `crm-connect run` on `count` fresh tenants: the time until all are
/// connected, memory, connections, idle CPU; then, on request, the edit
/// latency on the same daemon.
pub async fn cold_start(
    options: &Options,
    binary: &Path,
    databases: &Databases,
    count: usize,
    measure_edits: bool,
) -> anyhow::Result<(ColdStart, Option<Edits>)> {
    log(&format!("cold start, {count} tenants: creating databases and sandboxes"));
    let prefix = tenant_prefix(count);
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i:04}")).collect();
    let urls = databases.create(&names).await?;
    let dir = fixture::temp_dir("crm-connect-bench-")?;
    let config = tenants_dir(&dir)?;
    let mut tenants = Vec::new();
    for (i, database_url) in urls.into_iter().enumerate() {
        // Alternating, so that both halves are spread over the clusters.
        let (slug, crm, text) = if i % 2 == 0 {
            let sandbox = fixture::amo_sandbox(i, options.latency()).await?;
            let text = fixture::amo_file(&sandbox, &database_url, None);
            (format!("amo{i:04}"), Crm::Amo(sandbox), text)
        } else {
            let sandbox = fixture::b24_sandbox(options.latency()).await?;
            let text = fixture::b24_file(&sandbox.webhook_url(), &database_url, QUALIFIED, None);
            (format!("b24{i:04}"), Crm::B24(sandbox), text)
        };
        let file = config.join(format!("{slug}.toml"));
        std::fs::write(&file, text)?;
        tenants.push(Tenant { slug, database_url, file, crm });
    }
    let amocrm_tenants = tenants.iter().filter(|t| matches!(t.crm, Crm::Amo(_))).count();
    let clusters = fixture::clusters_for(count).min(databases.len());

    log(&format!("cold start, {count} tenants: starting crm-connect run"));
    let load_before = system::load_average();
    let sampler = Sampler::start(databases, &prefix, CONNECTIONS_POLL);
    let timeout = Duration::from_secs(120) + Duration::from_millis(500) * count as u32;
    let postmasters = databases.postmasters();
    let sessions_before = databases.sessions(&prefix).await?;
    let (pg_before, harness_before, machine_before) =
        (system::postgres_cpu_ticks(&postmasters), system::own_cpu_ticks(), system::machine_ticks());
    let mut daemon = Daemon::spawn(binary, options, &config, &log_file(options, &dir, &format!("cold-start-{count}")))?;
    let reconciled = daemon.wait_connected(count, METRICS_POLL, timeout).await;
    let at_reconciled = Instant::now();
    let (pg_after, harness_after, machine_after) =
        (system::postgres_cpu_ticks(&postmasters), system::own_cpu_ticks(), system::machine_ticks());
    let sessions = databases.sessions(&prefix).await?.saturating_sub(sessions_before);
    let pid = daemon.pid;
    let cpu_at_reconciled = system::cpu_ticks(pid);
    let rss_at_reconciled = system::rss_kib(pid);
    let (busy_total, busy_per_tenant, samples) = sampler.finish().await?;
    let metrics = daemon.metrics().await.unwrap_or_default();
    let latency = options.latency().as_secs_f64();
    let crm_secs = |amo: bool| -> f64 {
        let spans: Vec<f64> = tenants
            .iter()
            .filter(|t| matches!(t.crm, Crm::Amo(_)) == amo)
            .filter_map(|t| {
                let times: Vec<Instant> = t.requests().iter().map(|r| r.at).collect();
                let (first, last) = (times.iter().min()?, times.iter().max()?);
                Some(last.duration_since(*first).as_secs_f64() + latency)
            })
            .collect();
        spans.iter().sum::<f64>() / spans.len().max(1) as f64
    };
    let (amocrm_mean_crm_secs, bitrix24_mean_crm_secs) = (crm_secs(true), crm_secs(false));
    let requests = |amo: bool| -> usize {
        tenants.iter().filter(|t| matches!(t.crm, Crm::Amo(_)) == amo).map(|t| t.requests().len()).sum()
    };
    let (requests_amocrm, requests_bitrix24) = (requests(true), requests(false));
    let last_first_request_secs = tenants
        .iter()
        .filter_map(|t| t.requests().iter().map(|r| r.at).min())
        .max()
        .map_or(f64::NAN, |at| at.saturating_duration_since(daemon.started).as_secs_f64());
    match reconciled {
        Some(took) => log(&format!("cold start, {count} tenants: all connected after {:.2} s", took.as_secs_f64())),
        None => log(&format!("cold start, {count} tenants: NOT all connected within {timeout:?}")),
    }

    // Idle: CPU over `idle_secs`, connections once the pool timeout and the
    // reaper's half-interval have passed, whichever comes first.
    let idle = Duration::from_secs(options.idle_secs);
    let idle_timeout = Duration::from_secs(options.idle_timeout_secs);
    let check_after = idle_timeout + idle_timeout / 2 + Duration::from_secs(2);
    log(&format!(
        "cold start, {count} tenants: idle for {} s (connections counted after {} s)",
        idle.as_secs().max(check_after.as_secs()),
        check_after.as_secs()
    ));
    let idle_from = chrono::Utc::now();
    let (mut idle_cpu_ticks, mut idle_connections) = (None, None);
    let mut marks = [(idle, true), (check_after, false)];
    marks.sort_by_key(|(at, _)| *at);
    for (after, cpu) in marks {
        tokio::time::sleep_until((at_reconciled + after).into()).await;
        if cpu {
            idle_cpu_ticks = system::cpu_ticks(pid).zip(cpu_at_reconciled).map(|(now, then)| now - then);
        } else {
            idle_connections = Some(databases.connections(&prefix).await?.0);
        }
    }
    // The tenants' default stage_resync is every quarter hour, on the quarter.
    let quarter = |at: chrono::DateTime<chrono::Utc>| at.timestamp().div_euclid(15 * 60);
    let resync_in_idle = quarter(idle_from) != quarter(idle_from + chrono::Duration::seconds(options.idle_secs as i64));
    let ticks_per_sec = system::clock_ticks_per_sec() as f64;
    let machine_busy_percent =
        (machine_after.0 - machine_before.0) as f64 / (machine_after.1 - machine_before.1).max(1) as f64 * 100.0;
    let idle_cpu_percent =
        idle_cpu_ticks.map_or(f64::NAN, |t| t as f64 / ticks_per_sec / idle.as_secs_f64().max(1e-9) * 100.0);
    let peak_rss = system::peak_rss_kib(pid);
    let (threads, open_fds) = (system::threads(pid).unwrap_or(0), system::open_fds(pid).unwrap_or(0));
    let verified_tenants = verify(&tenants).await;

    let edits = match measure_edits {
        true => Some(edit_latency(options, &tenants, count).await?),
        false => None,
    };

    let violations = tenants.iter().map(Tenant::violations).sum();
    let shutdown = daemon.stop().await;
    let restart = restart(options, binary, databases, &config, &dir, count).await?;
    let connection_errors = [format!("cold-start-{count}"), format!("restart-{count}")]
        .iter()
        .map(|name| connection_errors_in(&log_file(options, &dir, name)))
        .sum();

    let reconcile_sum = metrics.get("crm_connect_reconcile_duration_seconds_sum").copied().unwrap_or(f64::NAN);
    let reconcile_count = metrics.get("crm_connect_reconcile_duration_seconds_count").copied().unwrap_or(f64::NAN);
    let states = metrics
        .iter()
        .filter_map(|(k, v)| {
            let state = k.strip_prefix("crm_connect_tenants{state=\"")?.strip_suffix("\"}")?;
            Some((state.to_owned(), *v))
        })
        .collect();
    Ok((
        ColdStart {
            tenants: count,
            amocrm_tenants,
            bitrix24_tenants: count - amocrm_tenants,
            clusters,
            reconciled_secs: reconciled.map(|d| d.as_secs_f64()),
            timeout_secs: timeout.as_secs_f64(),
            states,
            verified_tenants,
            peak_rss_mb: mb(peak_rss),
            rss_at_reconciled_mb: mb(rss_at_reconciled),
            cpu_secs_until_reconciled: cpu_at_reconciled.map_or(f64::NAN, |t| t as f64 / ticks_per_sec),
            postgres_cpu_secs: pg_after.saturating_sub(pg_before) as f64 / ticks_per_sec,
            sessions,
            harness_cpu_secs: harness_after.saturating_sub(harness_before) as f64 / ticks_per_sec,
            machine_busy_percent,
            mean_reconcile_secs: reconcile_sum / reconcile_count,
            amocrm_mean_crm_secs,
            bitrix24_mean_crm_secs,
            last_first_request_secs,
            busy_connections_total: busy_total,
            busy_connections_per_tenant: busy_per_tenant,
            connection_errors,
            connection_samples: samples,
            idle_connections: idle_connections.unwrap_or(usize::MAX),
            idle_check_after_secs: check_after.as_secs_f64(),
            idle_cpu_percent,
            idle_secs: options.idle_secs,
            resync_in_idle,
            threads,
            open_fds,
            requests_amocrm,
            requests_bitrix24,
            violations,
            shutdown_secs: shutdown.as_secs_f64(),
            load_before,
            restart,
        },
        edits,
    ))
}

/// The names of a run's tenant databases start with this.
fn tenant_prefix(count: usize) -> String {
    format!("c{count}t")
}

/// A second `crm-connect run` on tenants the first one connected.
async fn restart(
    options: &Options,
    binary: &Path,
    databases: &Databases,
    config: &Path,
    dir: &TempDir,
    count: usize,
) -> anyhow::Result<Restart> {
    log(&format!("restart, {count} tenants: a new crm-connect run on the same files and databases"));
    let postmasters = databases.postmasters();
    let prefix = tenant_prefix(count);
    let sessions_before = databases.sessions(&prefix).await?;
    let (pg_before, machine_before) = (system::postgres_cpu_ticks(&postmasters), system::machine_ticks());
    let log_path = log_file(options, dir, &format!("restart-{count}"));
    let mut daemon = Daemon::spawn(binary, options, config, &log_path)?;
    let timeout = Duration::from_secs(120) + Duration::from_millis(500) * count as u32;
    let reconciled = daemon.wait_connected(count, METRICS_POLL, timeout).await;
    let (pg_after, machine_after) = (system::postgres_cpu_ticks(&postmasters), system::machine_ticks());
    let daemon_ticks = system::cpu_ticks(daemon.pid).unwrap_or(0);
    let sessions = databases.sessions(&prefix).await?.saturating_sub(sessions_before);
    let metrics = daemon.metrics().await.unwrap_or_default();
    daemon.stop().await;
    let ticks_per_sec = system::clock_ticks_per_sec() as f64;
    let reconcile = |key: &str| metrics.get(key).copied().unwrap_or(f64::NAN);
    let restart = Restart {
        reconciled_secs: reconciled.map(|d| d.as_secs_f64()),
        mean_reconcile_secs: reconcile("crm_connect_reconcile_duration_seconds_sum")
            / reconcile("crm_connect_reconcile_duration_seconds_count"),
        daemon_cpu_secs: daemon_ticks as f64 / ticks_per_sec,
        postgres_cpu_secs: pg_after.saturating_sub(pg_before) as f64 / ticks_per_sec,
        sessions,
        machine_busy_percent: (machine_after.0 - machine_before.0) as f64
            / (machine_after.1 - machine_before.1).max(1) as f64
            * 100.0,
    };
    match restart.reconciled_secs {
        Some(secs) => log(&format!("restart, {count} tenants: all connected after {secs:.2} s")),
        None => log(&format!("restart, {count} tenants: NOT all connected within {timeout:?}")),
    }
    Ok(restart)
}

/// Rewrites a Bitrix24 tenant's file (aside + rename), alternating its
/// qualified stage, and times each edit until the database has the flag.
async fn edit_latency(options: &Options, tenants: &[Tenant], loaded: usize) -> anyhow::Result<Edits> {
    let tenant = tenants.iter().find(|t| matches!(t.crm, Crm::B24(_))).context("no Bitrix24 tenant to edit")?;
    let Crm::B24(sandbox) = &tenant.crm else { unreachable!("found a Bitrix24 tenant") };
    log(&format!("edit latency: {} edits of {} with {loaded} tenants loaded", options.edits, tenant.slug));
    let client = fixture::connect(&tenant.database_url).await?;
    let flagged = client
        .prepare(
            "SELECT coalesce(bool_or(is_qualified_stage), false) FROM bitrix24_pipeline_stages \
             WHERE entity_type = 'deal' AND status_id = $1",
        )
        .await?;
    let is_flagged = |stage: &'static str| {
        let (client, flagged) = (&client, &flagged);
        async move { client.query_one(flagged, &[&stage]).await.map(|row| row.get::<_, bool>(0)) }
    };
    anyhow::ensure!(is_flagged(QUALIFIED).await?, "{QUALIFIED} is not flagged before the edits");
    let (mut latencies, mut lost, mut requests) = (Vec::new(), 0, Vec::new());
    for k in 0..options.edits {
        let target = if k % 2 == 0 { QUALIFIED_ALTERNATIVE } else { QUALIFIED };
        let text = fixture::b24_file(&sandbox.webhook_url(), &tenant.database_url, target, None);
        let before = sandbox.requests().len();
        let changed = crm_connect_sandbox::files::replace_file(&tenant.file, &text)?;
        loop {
            if is_flagged(target).await? {
                latencies.push(changed.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if changed.elapsed() > EDIT_TIMEOUT {
                lost += 1;
                break;
            }
            tokio::time::sleep(FLAG_POLL).await;
        }
        requests.push((sandbox.requests().len() - before) as f64);
        tokio::time::sleep(EDIT_GAP).await;
    }
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    let edits = Edits {
        tenants_loaded: loaded,
        edits: options.edits,
        lost,
        p50_ms: system::quantile(&latencies, 0.5),
        p99_ms: system::quantile(&latencies, 0.99),
        min_ms: system::quantile(&latencies, 0.0),
        max_ms: system::quantile(&latencies, 1.0),
        mean_ms: mean,
        gap_ms: EDIT_GAP.as_millis() as u64,
        bitrix24_requests_per_edit: system::median(&requests),
        latencies_ms: latencies,
    };
    log(&format!("edit latency: p50 {:.0} ms, p99 {:.0} ms, lost {}", edits.p50_ms, edits.p99_ms, edits.lost));
    Ok(edits)
}

/// One tenant of each CRM with a resync every five seconds: the requests
/// of the connecting reconcile, then of each scheduled resync.
pub async fn resync(options: &Options, binary: &Path, databases: &Databases) -> anyhow::Result<Resync> {
    log("requests per stage sync: one tenant of each CRM, resync every 5 s");
    let urls = databases.create(&["rsamo".to_owned(), "rsbtx".to_owned()]).await?;
    let amo = fixture::amo_sandbox(90_001, options.latency()).await?;
    let b24 = fixture::b24_sandbox(options.latency()).await?;
    let dir = fixture::temp_dir("crm-connect-bench-")?;
    let config = tenants_dir(&dir)?;
    std::fs::write(config.join("rsamo.toml"), fixture::amo_file(&amo, &urls[0], Some(RESYNC_CRON)))?;
    std::fs::write(
        config.join("rsbtx.toml"),
        fixture::b24_file(&b24.webhook_url(), &urls[1], QUALIFIED, Some(RESYNC_CRON)),
    )?;

    // Start just after a tick, so the connecting reconcile has ~4.7 s to
    // itself before the first resync.
    loop {
        let phase = unix_ms() % RESYNC_PERIOD_MS;
        if (300..400).contains(&phase) {
            break;
        }
        let wait = (RESYNC_PERIOD_MS + 300 - phase) % RESYNC_PERIOD_MS;
        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
    }
    let first_tick = Instant::now() + Duration::from_millis(RESYNC_PERIOD_MS - unix_ms() % RESYNC_PERIOD_MS);
    let mut daemon = Daemon::spawn(binary, options, &config, &log_file(options, &dir, "resync"))?;
    let connected = daemon.wait_connected(2, Duration::from_millis(10), Duration::from_secs(60)).await;
    if connected.is_none() {
        bail!("the two resync tenants did not connect within 60 s");
    }
    let connected_in_time = Instant::now() < first_tick;
    let period = Duration::from_millis(RESYNC_PERIOD_MS);
    let end = first_tick + period * RESYNCS_COUNTED as u32 + period / 2;
    tokio::time::sleep_until(end.into()).await;
    let violations = amo.violations() + b24.violations();
    daemon.stop().await;

    let (amo_log, b24_log) = (amo.requests(), b24.requests());
    let before = |log: &[RecordedRequest]| log.iter().filter(|r| r.at < first_tick).map(call_name).collect();
    let window = |log: &[RecordedRequest], k: usize| -> Vec<String> {
        let from = first_tick + period * k as u32;
        log.iter().filter(|r| r.at >= from && r.at < from + period).map(call_name).collect()
    };
    let per_resync = |log: &[RecordedRequest]| (0..RESYNCS_COUNTED).map(|k| window(log, k).len()).collect();
    let amocrm_connect_calls: Vec<String> = before(&amo_log);
    let bitrix24_connect_calls: Vec<String> = before(&b24_log);
    let result = Resync {
        cron: RESYNC_CRON.to_owned(),
        amocrm_connect_requests: amocrm_connect_calls.len(),
        bitrix24_connect_requests: bitrix24_connect_calls.len(),
        connect_done_before_first_resync: connected_in_time,
        amocrm_connect_calls,
        bitrix24_connect_calls,
        amocrm_per_resync: per_resync(&amo_log),
        bitrix24_per_resync: per_resync(&b24_log),
        amocrm_resync_calls: window(&amo_log, 0),
        bitrix24_resync_calls: window(&b24_log, 0),
        violations,
    };
    log(&format!(
        "requests per stage sync: AmoCRM {:?} (connect {}), Bitrix24 {:?} (connect {})",
        result.amocrm_per_resync,
        result.amocrm_connect_requests,
        result.bitrix24_per_resync,
        result.bitrix24_connect_requests
    ));
    Ok(result)
}

/// The migrations' SQL, in version order, for a database the runbook
/// writes into (it expects the tables to exist).
fn migrations(crate_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(crate_dir.join("migrations"))?
        .flatten()
        .map(|entry| entry.path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            let version = name.strip_prefix('V')?.split("__").next()?.parse().ok()?;
            name.ends_with(".sql").then_some((version, path))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, path)| Ok(std::fs::read_to_string(path)?)).collect()
}

/// Rows, rows of category 0, and qualified / success / fail flags set.
async fn stage_rows(database_url: &str) -> anyhow::Result<(i64, i64, [i64; 3])> {
    let client = fixture::connect(database_url).await?;
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE category_id = 0), \
             count(*) FILTER (WHERE is_qualified_stage), count(*) FILTER (WHERE is_success_stage), \
             count(*) FILTER (WHERE is_fail_stage) FROM bitrix24_pipeline_stages WHERE removed_at IS NULL",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), [row.get(2), row.get(3), row.get(4)]))
}

/// The runbook's sequence (`scripts/runbook.sh`) against `crm-connect sync`,
/// for one Bitrix24 tenant with eight categories, alternating which goes
/// first; each run on fresh databases.
pub async fn runbook(
    options: &Options,
    binary: &Path,
    databases: &Databases,
    crate_dir: &Path,
) -> anyhow::Result<Runbook> {
    log(&format!("runbook baseline: {} runs each", options.runbook_runs));
    let sandbox = fixture::b24_sandbox(options.latency()).await?;
    let migrations = migrations(crate_dir)?;
    let script = crate_dir.join("scripts/runbook.sh");
    let stages = fixture::categories().iter().map(|c| c.stages.len()).sum::<usize>();
    // The same flags crm-connect ends up with: the qualified stage, every
    // won stage, every lost and apology stage.
    let ids = |suffixes: &[&str]| -> String {
        let mut ids = Vec::new();
        for category in fixture::categories() {
            let prefix = if category.id == 0 { String::new() } else { format!("C{}:", category.id) };
            ids.extend(suffixes.iter().map(|s| format!("{prefix}{s}")));
        }
        ids.join(" ")
    };
    let (success, fail) = (ids(&["WON"]), ids(&["LOSE", "APOLOGY"]));
    let dir = fixture::temp_dir("crm-connect-bench-")?;

    let (mut runbook_secs, mut sync_secs) = (Vec::new(), Vec::new());
    let (mut runbook_requests, mut sync_requests) = (Vec::new(), Vec::new());
    let (mut runbook_summary, mut runbook_rows, mut sync_rows) = (String::new(), None, None);
    for run in 0..options.runbook_runs {
        let urls = databases.create(&[format!("rbsync{run}"), format!("rbshell{run}")]).await?;
        let (sync_url, shell_url) = (&urls[0], &urls[1]);
        let client = fixture::connect(shell_url).await?;
        for sql in &migrations {
            client.batch_execute(sql).await.context("preparing the runbook's tables")?;
        }
        drop(client);
        let file = dir.join(format!("shop{run}.toml"));
        std::fs::write(&file, fixture::b24_file(&sandbox.webhook_url(), sync_url, QUALIFIED, None))?;

        for sync_first in [run % 2 == 0, run % 2 != 0] {
            let before = sandbox.requests().len();
            if sync_first {
                let started = Instant::now();
                let output = fixture::command(binary, options).arg("sync").arg("--config").arg(&file).output().await?;
                sync_secs.push(started.elapsed().as_secs_f64());
                if !output.status.success() {
                    bail!("crm-connect sync failed: {}", String::from_utf8_lossy(&output.stderr));
                }
                sync_requests.push(sandbox.requests().len() - before);
            } else {
                let started = Instant::now();
                let output = tokio::process::Command::new("bash")
                    .arg(&script)
                    .env("WEBHOOK_URL", sandbox.webhook_url())
                    .env("DATABASE_URL", shell_url)
                    .env("QUALIFIED", QUALIFIED)
                    .env("SUCCESS", &success)
                    .env("FAIL", &fail)
                    .stdin(Stdio::null())
                    .output()
                    .await?;
                runbook_secs.push(started.elapsed().as_secs_f64());
                if !output.status.success() {
                    bail!("scripts/runbook.sh failed: {}", String::from_utf8_lossy(&output.stderr));
                }
                runbook_summary = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                runbook_requests.push(sandbox.requests().len() - before);
            }
        }
        runbook_rows = Some(stage_rows(shell_url).await?);
        sync_rows = Some(stage_rows(sync_url).await?);
    }
    let (runbook_rows, sync_rows) =
        (runbook_rows.context("no runbook run")?, sync_rows.context("no crm-connect sync run")?);

    // The runbook's own webhook form: https://PORTAL/rest/CODE/METHOD.
    let code = sandbox.config().code.clone();
    let without_user_id = reqwest::get(format!("{}/rest/{code}/crm.dealcategory.list", sandbox.base_url())).await?;
    let psql_calls = runbook_summary
        .split_whitespace()
        .find_map(|field| field.strip_prefix("psql_calls="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let (runbook_median, sync_median) = (system::median(&runbook_secs), system::median(&sync_secs));
    let result = Runbook {
        runs: options.runbook_runs,
        categories: fixture::CATEGORIES,
        stages,
        runbook_median_secs: runbook_median,
        sync_median_secs: sync_median,
        speedup: runbook_median / sync_median,
        runbook_secs,
        sync_secs,
        runbook_requests: runbook_requests.iter().copied().max().unwrap_or(0),
        sync_requests: sync_requests.iter().copied().max().unwrap_or(0),
        runbook_psql_calls: psql_calls,
        runbook_rows: runbook_rows.0,
        sync_rows: sync_rows.0,
        runbook_category0_rows: runbook_rows.1,
        sync_category0_rows: sync_rows.1,
        runbook_flagged: runbook_rows.2,
        sync_flagged: sync_rows.2,
        runbook_summary,
        without_user_id_status: without_user_id.status().as_u16(),
        violations: sandbox.violations(),
    };
    log(&format!(
        "runbook baseline: runbook {:.3} s, crm-connect sync {:.3} s ({:.1}x)",
        result.runbook_median_secs, result.sync_median_secs, result.speedup
    ));
    Ok(result)
}

/// Many tenants on one Bitrix24 portal, one `crm-connect sync`: the rate
/// the portal sees and whether its bucket ever overflowed.
pub async fn ceiling(options: &Options, binary: &Path, databases: &Databases) -> anyhow::Result<Ceiling> {
    let count = options.portal_tenants;
    log(&format!("rate-limit ceiling: {count} tenants on one Bitrix24 portal"));
    let sandbox = fixture::b24_sandbox(options.latency()).await?;
    let names: Vec<String> = (0..count).map(|i| format!("portal{i:03}")).collect();
    let urls = databases.create(&names).await?;
    let dir = fixture::temp_dir("crm-connect-bench-")?;
    let config = tenants_dir(&dir)?;
    for (name, url) in names.iter().zip(&urls) {
        std::fs::write(
            config.join(format!("{name}.toml")),
            fixture::b24_file(&sandbox.webhook_url(), url, QUALIFIED, None),
        )?;
    }
    let started = Instant::now();
    let output = fixture::command(binary, options).arg("sync").arg("--config").arg(&config).output().await?;
    let sync_secs = started.elapsed().as_secs_f64();

    let mut times: Vec<Instant> = sandbox.requests().iter().map(|r| r.at).collect();
    times.sort();
    let refused = sandbox.requests().iter().filter(|r| matches!(r.status, 429 | 503)).count();
    let span = match (times.first(), times.last()) {
        (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
        _ => 0.0,
    };
    let rate = |from: usize| -> f64 {
        if times.len() < from + 2 {
            return f64::NAN;
        }
        (times.len() - from - 1) as f64 / times[times.len() - 1].duration_since(times[from]).as_secs_f64()
    };
    let mut peak = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= Duration::from_secs(1) {
            start += 1;
        }
        peak = peak.max(end - start + 1);
    }
    let mut connected_tenants = 0;
    for url in &urls {
        let client = fixture::connect(url).await?;
        let row = client.query_opt("SELECT state FROM crm_connect_status WHERE crm = 'bitrix24'", &[]).await?;
        if row.is_some_and(|row| row.get::<_, String>(0) == "connected") {
            connected_tenants += 1;
        }
    }
    let result = Ceiling {
        tenants: count,
        exit_code: output.status.code().unwrap_or(-1),
        sync_secs,
        requests: times.len(),
        span_secs: span,
        mean_per_sec: rate(0),
        sustained_per_sec: rate(CLIENT_BURST),
        peak_1s: peak,
        refused,
        violations: sandbox.violations(),
        connected_tenants,
    };
    log(&format!(
        "rate-limit ceiling: {} requests in {:.1} s, sustained {:.2}/s, violations {}",
        result.requests, result.span_secs, result.sustained_per_sec, result.violations
    ));
    Ok(result)
}

#[derive(Clone, Debug, Serialize)]
pub struct Soak {
    pub tenants: usize,
    /// (jobs finished, RSS in MB) when first past 10,000 jobs, and at the end.
    pub early: (u64, f64),
    pub end: (u64, f64),
    pub secs: f64,
    pub daemon_cpu_secs: f64,
    pub jobs_per_sec: f64,
}

/// Jobs the daemon finished, of every kind.
fn jobs_done(metrics: &BTreeMap<String, f64>) -> u64 {
    metrics.iter().filter(|(k, _)| k.starts_with("crm_connect_jobs_total{")).map(|(_, v)| *v as u64).sum()
}

/// The daemon's work loop run a million times: tenants without a CRM whose
/// database refuses at once (a closed port), each resynced every second, so
/// that what is measured is the loop itself — jobs queued, run, reaped,
/// recorded, timers re-armed — and not PostgreSQL or a CRM. Memory after
/// 10,000 jobs and after all of them.
pub async fn soak(options: &Options, binary: &Path) -> anyhow::Result<Soak> {
    const EARLY: u64 = 10_000;
    let count = options.soak_tenants;
    let dir = fixture::temp_dir("crm-connect-soak-")?;
    let config = dir.join("tenants");
    std::fs::create_dir_all(&config)?;
    for i in 0..count {
        let text = format!(
            "[tenant]\nslug = \"soak{i:05}\"\ndatabase_url = \"postgres://crm@127.0.0.1:1/soak{i:05}\"\n\n\
             [schedule]\nstage_resync = \"* * * * * *\"\n"
        );
        std::fs::write(config.join(format!("soak{i:05}.toml")), text)?;
    }
    log(&format!("soak: {count} tenants, a resync each every second, until {} jobs", options.soak_jobs));
    let mut daemon = Daemon::spawn(binary, options, &config, &log_file(options, &dir, "soak"))?;
    let started = Instant::now();
    let timeout = Duration::from_secs(60) + Duration::from_secs(options.soak_jobs / 100);
    let (mut early, mut end) = (None, None);
    while started.elapsed() < timeout && !daemon.exited() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(metrics) = daemon.metrics().await else { continue };
        let jobs = jobs_done(&metrics);
        let rss = system::rss_kib(daemon.pid).map_or(f64::NAN, |kib| kib as f64 / 1000.0);
        if early.is_none() && jobs >= EARLY {
            early = Some((jobs, rss));
            log(&format!("soak: {jobs} jobs, RSS {rss:.1} MB"));
        }
        if jobs >= options.soak_jobs {
            end = Some((jobs, rss));
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let daemon_cpu_secs = system::cpu_ticks(daemon.pid).unwrap_or(0) as f64 / system::clock_ticks_per_sec() as f64;
    daemon.stop().await;
    let early = early.context("the soak never reached 10,000 jobs")?;
    let end = end.with_context(|| format!("the soak did not reach {} jobs in {timeout:?}", options.soak_jobs))?;
    log(&format!("soak: {} jobs in {secs:.0} s, RSS {:.1} MB (at {} jobs: {:.1} MB)", end.0, end.1, early.0, early.1));
    Ok(Soak { tenants: count, early, end, secs, daemon_cpu_secs, jobs_per_sec: end.0 as f64 / secs })
}

/// What PostgreSQL itself charges, with no crm-connect in the way: a plain
/// client connecting to a fresh database and running the whole schema
/// (every migration file) in one transaction, and a plain client's session
/// of one query on a migrated database. Measured on the one-server cluster
/// once its tenants exist, so the caches are under the same pressure.
#[derive(Clone, Debug, Serialize)]
pub struct Floor {
    pub databases: usize,
    pub fresh_ms: f64,
    pub session_ms: f64,
}

pub async fn floor(databases: &Databases, migrations: &Path) -> anyhow::Result<Floor> {
    const COUNT: usize = 100;
    let mut files: Vec<PathBuf> = std::fs::read_dir(migrations)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort_by_key(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.trim_start_matches('V').split("__").next().and_then(|v| v.parse::<u32>().ok()).unwrap_or(u32::MAX)
    });
    let mut schema = String::from("BEGIN;\n");
    for file in &files {
        schema.push_str(&std::fs::read_to_string(file)?);
        schema.push_str(";\n");
    }
    schema.push_str("COMMIT;\n");
    let names: Vec<String> = (0..COUNT).map(|i| format!("floor{i:03}")).collect();
    let urls = databases.create(&names).await?;
    log(&format!("floor: the schema on {COUNT} fresh databases by a plain client"));
    let postmasters = databases.postmasters();
    let ticks_per_ms = system::clock_ticks_per_sec() as f64 / 1000.0;
    let measure = |sql: String| {
        let (urls, postmasters) = (urls.clone(), postmasters.clone());
        async move {
            let before = system::postgres_cpu_ticks(&postmasters);
            for url in &urls {
                let client = fixture::connect(url).await?;
                client.batch_execute(&sql).await?;
            }
            // A backend counts its CPU once it has exited.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let ticks = system::postgres_cpu_ticks(&postmasters).saturating_sub(before);
            Ok::<f64, anyhow::Error>(ticks as f64 / ticks_per_ms / urls.len() as f64)
        }
    };
    let fresh_ms = measure(schema).await?;
    let session_ms = measure("SELECT * FROM config".to_owned()).await?;
    log(&format!("floor: {fresh_ms:.1} ms per fresh database, {session_ms:.1} ms per session"));
    Ok(Floor { databases: COUNT, fresh_ms, session_ms })
}
