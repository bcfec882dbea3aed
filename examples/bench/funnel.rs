//! Funnel history: tenants with `[funnel]` under `crm-connect run --listen`,
//! what their polls cost once every stream has started and nothing changes
//! in the CRMs (requests per CRM per tenant per poll as the sandboxes
//! counted them, daemon and PostgreSQL CPU, connections); then the catch-up
//! of one AmoCRM and one Bitrix24 tenant with a `since` back-fill of many
//! stage changes each, read by `crm-connect funnel --tenant SLUG`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use crm_connect_sandbox::amocrm::{AmoSandbox, LeadMove};
use crm_connect_sandbox::bitrix24::{B24Sandbox, HistoryEntity, StageChange};
use crm_connect_sandbox::faults::RecordedRequest;
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};
use serde::Serialize;

use crate::Options;
use crate::fixture::{self, Daemon, Databases, QUALIFIED};
use crate::phases::{call_name, log_file, tenants_dir};
use crate::system::{self, log};

/// The shortest `[funnel].poll` the configuration accepts.
pub const MIN_POLL_SECS: u64 = 10;
/// The daemon's default `[funnel].poll`, which the idle CPU is scaled to.
pub const DEFAULT_POLL_SECS: u64 = 60;
/// The back-filled changes are spread so that a day holds at most this
/// many: a day-long AmoCRM window then stays well under the 20 pages past
/// which the daemon narrows it, as an account with a normal day would.
const CHANGES_PER_DAY: usize = 1000;
/// Changes per lead or deal of the catch-up.
pub const CHANGES_PER_ENTITY: usize = 10;
/// The batching ceilings of the two APIs.
pub const AMO_EVENTS_PER_PAGE: usize = 100;
pub const B24_RECORDS_PER_COMMAND: usize = 50;
pub const B24_COMMANDS_PER_BATCH: usize = 50;
/// AmoCRM's main sandbox pipeline, its entry stage, and the stages the
/// catch-up leads walk round (each differs from the one before).
const AMO_PIPELINE: i64 = 7_000_001;
const AMO_ENTRY: i64 = 61_000_001;
const AMO_WALK: [i64; 3] = [61_000_002, 61_000_003, 61_000_001];
/// Bitrix24 deals start in category 0's first stage and walk round these.
const B24_WALK: [&str; 3] = ["PREPARATION", "EXECUTING", "NEW"];
const METRICS_POLL: Duration = Duration::from_millis(100);
const AMO_SLUG: &str = "fncatchamo";
const B24_SLUG: &str = "fncatchb24";

enum Crm {
    Amo(AmoSandbox),
    B24(B24Sandbox),
}

struct Tenant {
    database_url: String,
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

/// What a funnel request read, from the sandbox's record of it.
#[derive(Debug, Default, PartialEq, Eq)]
struct FunnelCall {
    /// AmoCRM events pages; Bitrix24 `crm.stagehistory.list` commands
    /// reading a stream forward (`>ID`).
    reads: usize,
    /// AmoCRM `GET /api/v4/leads` by id; Bitrix24 `crm.item.list` commands.
    responsible: usize,
    /// Bitrix24 commands reading an entity's record before one (`<ID`).
    look_backs: usize,
    /// Bitrix24's start of a stream: the highest record before `since`.
    starts: usize,
    /// The request was a Bitrix24 `batch`.
    batch: bool,
}

/// The funnel's part of a request, `None` for anything else (token
/// refreshes, stage syncs, the connecting reconcile).
fn funnel_call(request: &RecordedRequest) -> Option<FunnelCall> {
    if request.path == "/api/v4/events" {
        return Some(FunnelCall { reads: 1, ..FunnelCall::default() });
    }
    if request.method == "GET" && request.path == "/api/v4/leads" {
        let query = request.query.as_deref().unwrap_or_default().replace("%5B", "[").replace("%5D", "]");
        return query.contains("filter[id]").then(|| FunnelCall { responsible: 1, ..FunnelCall::default() });
    }
    let name = call_name(request);
    let name = name.trim_end_matches(".json");
    if name == "crm.stagehistory.list" {
        return Some(FunnelCall { starts: 1, ..FunnelCall::default() });
    }
    if name != "batch" {
        return None;
    }
    let body = request.json()?;
    let mut call = FunnelCall { batch: true, ..FunnelCall::default() };
    for command in body.get("cmd")?.as_object()?.values() {
        let command = command.as_str()?;
        let (method, query) = command.split_once('?').unwrap_or((command, ""));
        let keys: Vec<String> = url::form_urlencoded::parse(query.as_bytes()).map(|(k, _)| k.into_owned()).collect();
        match method {
            "crm.stagehistory.list" if keys.iter().any(|k| k == "filter[>ID]") => call.reads += 1,
            "crm.stagehistory.list" if keys.iter().any(|k| k == "filter[<ID]") => call.look_backs += 1,
            "crm.item.list" => call.responsible += 1,
            // A batch of stage lists or creations is not the funnel's.
            _ => return None,
        }
    }
    Some(call)
}

/// Requests per poll of one CRM's tenants over the idle window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PollCounts {
    pub tenants: usize,
    /// Polls seen: a tenant's funnel requests less than half a poll apart
    /// belong to one poll.
    pub polls: usize,
    pub requests: usize,
    pub requests_per_poll: f64,
    pub min_per_poll: usize,
    pub max_per_poll: usize,
    /// Requests in a poll → polls with that many.
    pub per_poll: BTreeMap<usize, usize>,
    pub min_polls_per_tenant: usize,
    pub max_polls_per_tenant: usize,
    /// From one poll's first request to the next poll's, in seconds.
    pub interval_min_secs: f64,
    pub interval_p50_secs: f64,
    pub interval_max_secs: f64,
    pub calls: BTreeMap<String, usize>,
    /// The first few polls of more than one request: each request's time
    /// after the poll's first, status and target.
    pub samples: Vec<Vec<String>>,
}

/// Polls of more than one request kept as samples.
const SAMPLES: usize = 3;

impl PollCounts {
    /// From each tenant's funnel requests in the window.
    fn of(tenants: &[Vec<&RecordedRequest>], poll: Duration) -> PollCounts {
        let mut counts = PollCounts { tenants: tenants.len(), min_per_poll: usize::MAX, ..PollCounts::default() };
        let (mut intervals, mut polls_per_tenant) = (Vec::new(), Vec::new());
        for requests in tenants {
            let mut sorted = requests.clone();
            sorted.sort_by_key(|r| r.at);
            let mut polls: Vec<(Instant, usize)> = Vec::new();
            let mut members: Vec<Vec<&RecordedRequest>> = Vec::new();
            for request in sorted {
                match (polls.last_mut(), members.last_mut()) {
                    (Some((first, n)), Some(these)) if request.at.duration_since(*first) < poll / 2 => {
                        *n += 1;
                        these.push(request);
                    }
                    _ => {
                        polls.push((request.at, 1));
                        members.push(vec![request]);
                    }
                }
            }
            for these in members.iter().filter(|m| m.len() > 1) {
                if counts.samples.len() < SAMPLES {
                    counts.samples.push(these.iter().map(|r| describe(r, these[0].at)).collect());
                }
            }
            for pair in polls.windows(2) {
                intervals.push(pair[1].0.duration_since(pair[0].0).as_secs_f64());
            }
            for &(_, n) in &polls {
                *counts.per_poll.entry(n).or_default() += 1;
                counts.min_per_poll = counts.min_per_poll.min(n);
                counts.max_per_poll = counts.max_per_poll.max(n);
            }
            polls_per_tenant.push(polls.len());
            counts.polls += polls.len();
            counts.requests += requests.len();
            for request in requests {
                *counts.calls.entry(call_name(request).trim_end_matches(".json").to_owned()).or_default() += 1;
            }
        }
        if counts.polls == 0 {
            counts.min_per_poll = 0;
        }
        counts.requests_per_poll = counts.requests as f64 / counts.polls.max(1) as f64;
        counts.min_polls_per_tenant = polls_per_tenant.iter().copied().min().unwrap_or(0);
        counts.max_polls_per_tenant = polls_per_tenant.iter().copied().max().unwrap_or(0);
        counts.interval_min_secs = system::quantile(&intervals, 0.0);
        counts.interval_p50_secs = system::quantile(&intervals, 0.5);
        counts.interval_max_secs = system::quantile(&intervals, 1.0);
        counts
    }
}

/// `+12 ms 204 GET /api/v4/events?…`
fn describe(request: &RecordedRequest, since: Instant) -> String {
    let query = request.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default();
    let ms = request.at.duration_since(since).as_millis();
    format!("+{ms} ms {} {} {}{query}", request.status, request.method, request.path)
}

/// The `[funnel]` tenants once every stream has started, nothing new.
#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    pub tenants: usize,
    pub poll_secs: u64,
    /// From spawning the daemon until every tenant's first poll had ended
    /// (each stream's lag on `/metrics`).
    pub all_polled_secs: f64,
    pub window_secs: f64,
    pub amocrm: PollCounts,
    pub bitrix24: PollCounts,
    /// Tenants without a funnel request in the window.
    pub tenants_not_polled: usize,
    /// Other requests in the window (a scheduled stage resync, a token
    /// refresh), by call: left out of the counts above.
    pub other_calls: BTreeMap<String, usize>,
    pub daemon_cpu_percent: f64,
    /// The daemon's CPU over the window per poll seen.
    pub cpu_ms_per_poll: f64,
    /// That cost at the default poll: every tenant polled once a minute.
    pub default_poll_cpu_percent: f64,
    pub postgres_cpu_secs: f64,
    pub postgres_cpu_percent: f64,
    /// `pg_stat_database.sessions` of the tenant databases, the window's delta.
    pub sessions: u64,
    pub sessions_per_sec: f64,
    pub sessions_per_poll: f64,
    pub connections_at_end: usize,
    pub rss_mb: f64,
    /// Tenant databases holding their stream's `crm_connect_cursors` row
    /// after the window.
    pub cursors: usize,
    pub violations: usize,
}

/// One tenant's back-fill read by `crm-connect funnel --tenant SLUG`.
#[derive(Clone, Debug, Serialize)]
pub struct CatchUp {
    pub crm: String,
    /// Stage changes the stream should store: AmoCRM `lead_status_changed`
    /// events; Bitrix24 deal records (creations and moves).
    pub changes: usize,
    pub entities: usize,
    /// The sandbox clock was moved this far on after the entities were
    /// created; the changes are dated over that span.
    pub days: u64,
    pub since: String,
    pub exit_code: i32,
    pub secs: f64,
    pub changes_per_sec: f64,
    /// What the command printed it ingested.
    pub reported: Option<u64>,
    /// `crm_stage_changes` rows of the CRM, their distinct source ids, the
    /// seeded changes without a row and the rows that are none of them.
    pub rows: usize,
    pub distinct_sources: usize,
    pub missing: usize,
    pub strays: usize,
    /// Moves stored without a from-stage, rows without a responsible user.
    pub moves_without_from: usize,
    pub rows_without_responsible: usize,
    /// Every request of the run, by call.
    pub requests: usize,
    pub calls: BTreeMap<String, usize>,
    /// AmoCRM events pages; Bitrix24 stream-read commands.
    pub reads: usize,
    /// AmoCRM: the distinct `created_at` windows the pages belong to.
    pub windows: usize,
    /// The fewest reads the changes need at the API's page size.
    pub reads_ceiling: usize,
    pub responsible: usize,
    pub look_backs: usize,
    pub starts: usize,
    /// Bitrix24 `batch` requests: all, those reading the stream, and the
    /// commands they carried.
    pub batches: usize,
    pub read_batches: usize,
    pub commands: usize,
    pub requests_per_sec: f64,
    /// Requests of the run the sandbox refused for its rate limit.
    pub refused: usize,
    /// The sandbox's violations over the run, and over the whole tenant
    /// (its connecting `sync` included).
    pub violations: usize,
    pub violations_in_all: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Funnel {
    pub idle: Idle,
    pub catch_up: Vec<CatchUp>,
}

pub async fn funnel(options: &Options, binary: &Path, databases: &Databases) -> anyhow::Result<Funnel> {
    anyhow::ensure!(options.funnel_tenants >= 2, "BENCH_FUNNEL_TENANTS must be at least 2");
    anyhow::ensure!(
        options.funnel_poll_secs >= MIN_POLL_SECS,
        "BENCH_FUNNEL_POLL_SECS must be at least {MIN_POLL_SECS}"
    );
    anyhow::ensure!(options.funnel_changes >= CHANGES_PER_ENTITY, "BENCH_FUNNEL_CHANGES must be at least 10");
    let idle = idle(options, binary, databases).await?;
    let catch_up = catch_up(options, binary, databases).await?;
    Ok(Funnel { idle, catch_up })
}

fn poll_key(poll_secs: u64) -> String {
    format!("\"{poll_secs}s\"")
}

/// Every tenant's first funnel poll ended: each has a lag series.
async fn wait_polled(daemon: &mut Daemon, count: usize, timeout: Duration) -> Option<Duration> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(metrics) = daemon.metrics().await {
            let polled = metrics.keys().filter(|k| k.starts_with("crm_connect_funnel_lag_seconds{")).count();
            if polled >= count {
                return Some(daemon.started.elapsed());
            }
        }
        if Instant::now() >= deadline || daemon.exited() {
            return None;
        }
        tokio::time::sleep(METRICS_POLL).await;
    }
}

async fn idle(options: &Options, binary: &Path, databases: &Databases) -> anyhow::Result<Idle> {
    let (count, poll_secs) = (options.funnel_tenants, options.funnel_poll_secs);
    log(&format!("funnel, {count} tenants: creating databases and sandboxes"));
    let prefix = format!("fn{count}t");
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i:04}")).collect();
    let urls = databases.create(&names).await?;
    let dir = fixture::temp_dir("crm-connect-bench-")?;
    let config = tenants_dir(&dir)?;
    let mut tenants = Vec::new();
    for (i, database_url) in urls.into_iter().enumerate() {
        // Alternating, so that both halves are spread over the clusters.
        let (slug, crm, file) = if i % 2 == 0 {
            let sandbox = fixture::amo_sandbox(200_000 + i, options.latency()).await?;
            let file = amo_file(&sandbox, &database_url);
            (format!("fnamo{i:04}"), Crm::Amo(sandbox), file)
        } else {
            let sandbox = fixture::b24_sandbox(options.latency()).await?;
            let file = b24_file(&sandbox, &database_url);
            (format!("fnb24{i:04}"), Crm::B24(sandbox), file)
        };
        file.table_key("funnel", "poll", &poll_key(poll_secs)).write(&config, &slug)?;
        tenants.push(Tenant { database_url, crm });
    }

    log(&format!("funnel, {count} tenants: starting crm-connect run (poll {poll_secs} s)"));
    let mut daemon = Daemon::spawn(binary, options, &config, &log_file(options, &dir, &format!("funnel-{count}")))?;
    let timeout = Duration::from_secs(120) + Duration::from_millis(500) * count as u32;
    if daemon.wait_connected(count, METRICS_POLL, timeout).await.is_none() {
        bail!("funnel: the {count} tenants did not all connect within {timeout:?}");
    }
    let polled_timeout = timeout + Duration::from_secs(poll_secs);
    let Some(all_polled) = wait_polled(&mut daemon, count, polled_timeout).await else {
        bail!("funnel: not every tenant's stream had been polled within {polled_timeout:?}");
    };
    log(&format!("funnel, {count} tenants: every stream polled once after {:.2} s", all_polled.as_secs_f64()));

    let window = Duration::from_secs(options.idle_secs.max(2 * poll_secs));
    crate::delivery::past_resync(&daemon, count, window).await;
    log(&format!("funnel, {count} tenants: idle for {} s at poll {poll_secs} s", window.as_secs()));
    let postmasters = databases.postmasters();
    let pid = daemon.pid;
    let sessions_before = databases.sessions(&prefix).await?;
    let (cpu_before, pg_before, from) =
        (system::cpu_ticks(pid), system::postgres_cpu_ticks(&postmasters), Instant::now());
    tokio::time::sleep(window).await;
    let (cpu_after, pg_after, to) = (system::cpu_ticks(pid), system::postgres_cpu_ticks(&postmasters), Instant::now());
    let sessions = databases.sessions(&prefix).await?.saturating_sub(sessions_before);
    let connections_at_end = databases.connections(&prefix).await?.0;
    let rss_mb = system::rss_kib(pid).map_or(f64::NAN, |k| k as f64 * 1024.0 / 1e6);
    daemon.stop().await;

    let poll = Duration::from_secs(poll_secs);
    let (mut amo, mut b24, mut other_calls) = (Vec::new(), Vec::new(), BTreeMap::<String, usize>::new());
    let all: Vec<Vec<RecordedRequest>> = tenants.iter().map(Tenant::requests).collect();
    for (tenant, requests) in tenants.iter().zip(&all) {
        let mut mine = Vec::new();
        for request in requests.iter().filter(|r| r.at >= from && r.at < to) {
            match funnel_call(request) {
                Some(_) => mine.push(request),
                None => *other_calls.entry(call_name(request).trim_end_matches(".json").to_owned()).or_default() += 1,
            }
        }
        match tenant.crm {
            Crm::Amo(_) => amo.push(mine),
            Crm::B24(_) => b24.push(mine),
        }
    }
    let tenants_not_polled = amo.iter().chain(&b24).filter(|r| r.is_empty()).count();
    let (amocrm, bitrix24) = (PollCounts::of(&amo, poll), PollCounts::of(&b24, poll));
    let mut cursors = 0;
    for tenant in &tenants {
        let client = fixture::connect(&tenant.database_url).await?;
        let row = client.query_one("SELECT count(*) FROM crm_connect_cursors", &[]).await?;
        cursors += usize::from(row.get::<_, i64>(0) == 1);
    }

    let secs = to.duration_since(from).as_secs_f64();
    let ticks_per_sec = system::clock_ticks_per_sec() as f64;
    let cpu_secs = cpu_after.zip(cpu_before).map_or(f64::NAN, |(a, b)| a.saturating_sub(b) as f64 / ticks_per_sec);
    let postgres_cpu_secs = pg_after.saturating_sub(pg_before) as f64 / ticks_per_sec;
    let polls = amocrm.polls + bitrix24.polls;
    let cpu_ms_per_poll = cpu_secs * 1000.0 / polls.max(1) as f64;
    let idle = Idle {
        tenants: count,
        poll_secs,
        all_polled_secs: all_polled.as_secs_f64(),
        window_secs: secs,
        amocrm,
        bitrix24,
        tenants_not_polled,
        other_calls,
        daemon_cpu_percent: cpu_secs / secs * 100.0,
        cpu_ms_per_poll,
        default_poll_cpu_percent: cpu_ms_per_poll * count as f64 / DEFAULT_POLL_SECS as f64 / 10.0,
        postgres_cpu_secs,
        postgres_cpu_percent: postgres_cpu_secs / secs * 100.0,
        sessions,
        sessions_per_sec: sessions as f64 / secs,
        sessions_per_poll: sessions as f64 / polls.max(1) as f64,
        connections_at_end,
        rss_mb,
        cursors,
        violations: tenants.iter().map(Tenant::violations).sum(),
    };
    log(&format!(
        "funnel, {count} tenants idle: {:.2} / {:.2} requests per poll (AmoCRM / Bitrix24, {}–{} / {}–{}), \
         daemon {:.2} % CPU ({:.2} ms a poll), PostgreSQL {:.2} % CPU, {:.1} sessions/s",
        idle.amocrm.requests_per_poll,
        idle.bitrix24.requests_per_poll,
        idle.amocrm.min_per_poll,
        idle.amocrm.max_per_poll,
        idle.bitrix24.min_per_poll,
        idle.bitrix24.max_per_poll,
        idle.daemon_cpu_percent,
        idle.cpu_ms_per_poll,
        idle.postgres_cpu_percent,
        idle.sessions_per_sec
    ));
    Ok(idle)
}

fn amo_file(sandbox: &AmoSandbox, database_url: &str) -> TenantFile {
    TenantFile::new()
        .database_url(database_url)
        .amocrm(sandbox)
        .authorization_code(&sandbox.issue_code())
        .amocrm_stages("qualified", [Stage::in_pipeline("Продажи", "Квалифицирован")])
}

fn b24_file(sandbox: &B24Sandbox, database_url: &str) -> TenantFile {
    TenantFile::new()
        .database_url(database_url)
        .bitrix24(sandbox)
        .entity_type("deal")
        .bitrix24_stages("qualified", [Stage::status(QUALIFIED)])
}

/// Days the catch-up's changes are spread over.
fn days_for(changes: usize) -> u64 {
    changes.div_ceil(CHANGES_PER_DAY).max(1) as u64
}

/// The time of change `i` of `n` spread over `span` seconds after `start`,
/// a minute clear of either end.
fn dated(start: i64, span: i64, i: usize, n: usize) -> i64 {
    start + 60 + (span - 120) * i as i64 / n.max(1) as i64
}

/// Leads created now, the sandbox clock moved `days` on, then `changes`
/// moves dated over those days, each lead's in order; returns the event ids.
fn seed_amocrm(sandbox: &AmoSandbox, changes: usize, days: u64) -> anyhow::Result<HashSet<String>> {
    let leads: Vec<i64> = (0..changes / CHANGES_PER_ENTITY)
        .map(|i| sandbox.add_lead(AMO_PIPELINE, AMO_ENTRY, 9_000_000 + i as i64))
        .collect::<Result<_, _>>()?;
    let start = sandbox.now_unix();
    sandbox.advance_clock(Duration::from_secs(days * 86_400));
    let span = sandbox.now_unix() - start;
    let mut ids = HashSet::new();
    for i in 0..changes {
        let (lead, round) = (leads[i % leads.len()], i / leads.len());
        let change = LeadMove::to(AMO_PIPELINE, AMO_WALK[round % AMO_WALK.len()]).at(dated(start, span, i, changes));
        ids.insert(sandbox.move_lead_with(lead, change)?);
    }
    Ok(ids)
}

/// Deals created now (one creation record each), the sandbox clock moved
/// `days` on, then moves dated over those days up to `changes` records in
/// all; returns the records' source ids as the daemon stores them.
fn seed_bitrix24(sandbox: &B24Sandbox, changes: usize, days: u64) -> anyhow::Result<HashSet<String>> {
    let deals: Vec<i64> = (0..changes / CHANGES_PER_ENTITY)
        .map(|i| sandbox.create_deal(0, "NEW", 1 + i as i64))
        .collect::<Result<_, _>>()?;
    let start = sandbox.now_unix();
    sandbox.advance_clock(Duration::from_secs(days * 86_400));
    let span = sandbox.now_unix() - start;
    let moves = changes - deals.len();
    for i in 0..moves {
        let (deal, round) = (deals[i % deals.len()], i / deals.len());
        let change = StageChange::deal(deal, B24_WALK[round % B24_WALK.len()]).at(dated(start, span, i, moves));
        sandbox.apply_stage_change(change)?;
    }
    Ok(sandbox.stage_history(HistoryEntity::Deal).iter().map(|r| format!("deal:{}", r.id)).collect())
}

async fn catch_up(options: &Options, binary: &Path, databases: &Databases) -> anyhow::Result<Vec<CatchUp>> {
    let changes = options.funnel_changes;
    let days = days_for(changes);
    let since = chrono::Utc::now().date_naive().to_string();
    log(&format!("funnel catch-up: {changes} stage changes each on one AmoCRM and one Bitrix24 tenant"));
    let names = [format!("{AMO_SLUG}{changes}"), format!("{B24_SLUG}{changes}")];
    let urls = databases.create(&names).await?;
    let dir = fixture::temp_dir("crm-connect-bench-")?;
    let config = tenants_dir(&dir)?;

    let amo = fixture::amo_sandbox(299_999, options.latency()).await?;
    let amo_ids = seed_amocrm(&amo, changes, days)?;
    let b24 = fixture::b24_sandbox(options.latency()).await?;
    let b24_ids = seed_bitrix24(&b24, changes, days)?;
    let with_funnel = |file: TenantFile| {
        file.table_key("funnel", "poll", &poll_key(options.funnel_poll_secs)).table_key(
            "funnel",
            "since",
            &format!("\"{since}\""),
        )
    };
    // The code is issued after the clock moved: it lasts 20 minutes.
    with_funnel(amo_file(&amo, &urls[0])).write(&config, AMO_SLUG)?;
    with_funnel(b24_file(&b24, &urls[1])).write(&config, B24_SLUG)?;

    // Connected first (token, stages, tables), so that the funnel run
    // measures the back-fill alone.
    let output = fixture::command(binary, options).arg("sync").arg("--config").arg(&config).output().await?;
    if !output.status.success() {
        bail!("funnel catch-up: crm-connect sync failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let tenants = [
        (AMO_SLUG, "amocrm", Tenant { database_url: urls[0].clone(), crm: Crm::Amo(amo) }, amo_ids),
        (B24_SLUG, "bitrix24", Tenant { database_url: urls[1].clone(), crm: Crm::B24(b24) }, b24_ids),
    ];
    let mut results = Vec::new();
    for (slug, crm, tenant, ids) in &tenants {
        // Each process keeps its own budget per account: the run starts
        // once the sync's requests have left the account's sliding second.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (before, violations_before) = (tenant.requests().len(), tenant.violations());
        log(&format!("funnel catch-up: crm-connect funnel --tenant {slug} ({} changes over {days} days)", ids.len()));
        let timeout = Duration::from_secs(120) + Duration::from_millis(100) * changes as u32;
        let started = Instant::now();
        let run = fixture::command(binary, options)
            .arg("funnel")
            .arg("--config")
            .arg(&config)
            .arg("--tenant")
            .arg(slug)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(timeout, run)
            .await
            .with_context(|| format!("crm-connect funnel --tenant {slug} ran past {timeout:?}"))??;
        let secs = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let requests: Vec<RecordedRequest> = tenant.requests().into_iter().skip(before).collect();
        let mut result = count_requests(crm, &requests, ids.len(), secs);
        result.days = days;
        result.since.clone_from(&since);
        result.exit_code = output.status.code().unwrap_or(-1);
        result.reported = stdout
            .strip_prefix(&format!("{slug}: "))
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok());
        result.entities = changes / CHANGES_PER_ENTITY;
        result.violations_in_all = tenant.violations();
        result.violations = result.violations_in_all - violations_before;
        check_rows(&tenant.database_url, crm, ids, &mut result).await?;
        if result.exit_code != 0 {
            log(&format!(
                "funnel catch-up: {slug} exited {}: {}{}",
                result.exit_code,
                stdout.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        log(&format!(
            "funnel catch-up, {crm}: {} rows in {:.2} s ({:.0} changes/s), {} requests ({} reads, ceiling {}; {} \
             responsible-user, {} look-backs), {} missing, {} strays",
            result.rows,
            result.secs,
            result.changes_per_sec,
            result.requests,
            result.reads,
            result.reads_ceiling,
            result.responsible,
            result.look_backs,
            result.missing,
            result.strays
        ));
        results.push(result);
    }
    Ok(results)
}

/// The requests of one catch-up, sorted into what the funnel read.
fn count_requests(crm: &str, requests: &[RecordedRequest], changes: usize, secs: f64) -> CatchUp {
    let mut result = CatchUp {
        crm: crm.to_owned(),
        changes,
        entities: 0,
        days: 0,
        since: String::new(),
        exit_code: 0,
        secs,
        changes_per_sec: changes as f64 / secs,
        reported: None,
        rows: 0,
        distinct_sources: 0,
        missing: 0,
        strays: 0,
        moves_without_from: 0,
        rows_without_responsible: 0,
        requests: requests.len(),
        calls: BTreeMap::new(),
        reads: 0,
        windows: 0,
        reads_ceiling: match crm {
            "amocrm" => changes.div_ceil(AMO_EVENTS_PER_PAGE),
            _ => changes.div_ceil(B24_RECORDS_PER_COMMAND),
        },
        responsible: 0,
        look_backs: 0,
        starts: 0,
        batches: 0,
        read_batches: 0,
        commands: 0,
        requests_per_sec: 0.0,
        refused: requests.iter().filter(|r| matches!(r.status, 429 | 503)).count(),
        violations: 0,
        violations_in_all: 0,
    };
    let windows: HashSet<(String, String)> = requests
        .iter()
        .filter(|r| r.path == "/api/v4/events")
        .filter_map(|r| {
            let pairs: BTreeMap<String, String> =
                url::form_urlencoded::parse(r.query.as_deref()?.as_bytes()).into_owned().collect();
            Some((pairs.get("filter[created_at][from]")?.clone(), pairs.get("filter[created_at][to]")?.clone()))
        })
        .collect();
    result.windows = windows.len();
    for request in requests {
        *result.calls.entry(call_name(request).trim_end_matches(".json").to_owned()).or_default() += 1;
        let Some(call) = funnel_call(request) else { continue };
        result.reads += call.reads;
        result.responsible += call.responsible;
        result.look_backs += call.look_backs;
        result.starts += call.starts;
        if call.batch {
            result.batches += 1;
            result.read_batches += usize::from(call.reads > 0);
            result.commands += call.reads + call.responsible + call.look_backs;
        }
    }
    let mut times: Vec<Instant> = requests.iter().map(|r| r.at).collect();
    times.sort();
    if let (Some(first), Some(last)) = (times.first(), times.last())
        && times.len() > 1
    {
        result.requests_per_sec = (times.len() - 1) as f64 / last.duration_since(*first).as_secs_f64();
    }
    result
}

/// What landed in `crm_stage_changes` against what was seeded.
async fn check_rows(url: &str, crm: &str, ids: &HashSet<String>, result: &mut CatchUp) -> anyhow::Result<()> {
    let client = fixture::connect(url).await?;
    let rows = client
        .query(
            "SELECT source_event_id, change_kind = 'moved' AND stage_from IS NULL, responsible_user_id IS NULL \
             FROM crm_stage_changes WHERE crm = $1",
            &[&crm],
        )
        .await?;
    let sources: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let distinct: HashSet<&str> = sources.iter().map(String::as_str).collect();
    result.rows = rows.len();
    result.distinct_sources = distinct.len();
    result.missing = ids.iter().filter(|id| !distinct.contains(id.as_str())).count();
    result.strays = distinct.iter().filter(|id| !ids.contains(**id)).count();
    result.moves_without_from = rows.iter().filter(|r| r.get::<_, bool>(1)).count();
    result.rows_without_responsible = rows.iter().filter(|r| r.get::<_, bool>(2)).count();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, body: &str) -> RecordedRequest {
        RecordedRequest {
            method: "POST".to_owned(),
            path: path.to_owned(),
            query: None,
            headers: Vec::new(),
            body: body.to_owned(),
            status: 200,
            at: Instant::now(),
        }
    }

    #[test]
    fn a_batch_is_the_funnels_when_every_command_reads_history_or_users() {
        let read = "crm.stagehistory.list?entityTypeId=2&order%5BID%5D=ASC&filter%5B%3EID%5D=7&start=-1";
        let back = "crm.stagehistory.list?entityTypeId=2&filter%5BOWNER_ID%5D=3&filter%5B%3CID%5D=9";
        let users = "crm.item.list?entityTypeId=2&filter%5B%40id%5D%5B0%5D=3";
        let body = serde_json::json!({ "halt": 0, "cmd": { "q0": read, "q1": back, "q2": users } }).to_string();
        let call = funnel_call(&request("/rest/1/code/batch.json", &body)).unwrap();
        assert_eq!(call, FunnelCall { reads: 1, look_backs: 1, responsible: 1, starts: 0, batch: true });

        let stages =
            serde_json::json!({ "halt": 0, "cmd": { "s0": "crm.status.list?filter%5BENTITY_ID%5D=DEAL_STAGE" } });
        assert_eq!(funnel_call(&request("/rest/1/code/batch.json", &stages.to_string())), None);
        assert_eq!(funnel_call(&request("/oauth2/access_token", "")), None);
    }

    #[test]
    fn requests_less_than_half_a_poll_apart_are_one_poll() {
        let start = Instant::now();
        let at = |ms: u64| RecordedRequest { at: start + Duration::from_millis(ms), ..request("/api/v4/events", "") };
        let one = [at(0), at(10_050), at(10_100), at(20_100)];
        let two = [at(5_000), at(15_000)];
        let counts = PollCounts::of(&[one.iter().collect(), two.iter().collect()], Duration::from_secs(10));
        assert_eq!((counts.polls, counts.requests, counts.min_per_poll, counts.max_per_poll), (5, 6, 1, 2));
        assert_eq!(counts.per_poll, BTreeMap::from([(1, 4), (2, 1)]));
        assert_eq!((counts.min_polls_per_tenant, counts.max_polls_per_tenant), (2, 3));
    }
}
