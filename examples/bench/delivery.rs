//! Lead delivery: tenants with `[leads]` under `crm-connect run --listen`,
//! leads INSERTed into every outbox at once with a wake per tenant, until
//! the CRMs hold them all; the insert → delivered latency on one more
//! tenant, with a wake after each insert and by its poll alone; then what
//! the delivering tenants cost while nothing is due.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use crm_connect_sandbox::amocrm::AmoSandbox;
use crm_connect_sandbox::bitrix24::B24Sandbox;
use crm_connect_sandbox::faults::RecordedRequest;
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};
use serde::Serialize;
use tokio_postgres::Client;

use crate::Options;
use crate::fixture::{self, Daemon, Databases, QUALIFIED, Waker};
use crate::phases::{call_name, log_file, tenants_dir};
use crate::system::{self, log};

/// Leads each tenant gets at once.
pub const LEADS_PER_TENANT: usize = 10;
/// The poll the delivering tenants keep: the daemon's default.
pub const DEFAULT_POLL_SECS: u64 = 30;
/// The field AmoCRM leads carry their key in (the daemon's default name).
const KEY_FIELD: &str = "crm-connect key";
/// The path of AmoCRM's one create request per lead.
const AMO_CREATE: &str = "/api/v4/leads/complex";
/// Between two wake-driven leads: the daemon starts at most one extra pass
/// per tenant per second, so a wake within a second of the previous pass's
/// start would wait for the rest of that second.
const WAKE_GAP: Duration = Duration::from_secs(1);
/// Poll-only inserts are this far apart on average (or a tenth of the
/// poll, if longer), below AmoCRM's 3 requests/s per account.
const POLL_INSERT_GAP: Duration = Duration::from_millis(500);
/// How often the harness looks at a latency lead's state.
const STATE_POLL: Duration = Duration::from_millis(5);
const LEAD_TIMEOUT: Duration = Duration::from_secs(10);
const METRICS_POLL: Duration = Duration::from_millis(25);
/// The latency tenant's slug and its database's name start.
const LATENCY_SLUG: &str = "dllatency";

enum Crm {
    Amo(AmoSandbox),
    B24(B24Sandbox),
}

struct Tenant {
    slug: String,
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

    /// The delivery key and id of every lead (AmoCRM) or deal (Bitrix24)
    /// the CRM holds; `None` for one without a key.
    fn entities(&self) -> Vec<(Option<String>, i64)> {
        match &self.crm {
            Crm::Amo(s) => {
                let field = s.lead_custom_fields().into_iter().find(|f| f.name == KEY_FIELD).map(|f| f.id.to_string());
                s.leads()
                    .iter()
                    .map(|lead| (field.as_ref().and_then(|f| lead.field_texts(f).into_iter().next()), lead.id))
                    .collect()
            }
            Crm::B24(s) => s.deals().iter().map(|deal| (deal.text("ORIGIN_ID"), deal.id)).collect(),
        }
    }
}

/// Latencies of one way of delivering, from the database's `created_at`
/// and `delivered_at`.
#[derive(Clone, Debug, Serialize)]
pub struct Latencies {
    pub leads: usize,
    /// Not delivered within the wait.
    pub lost: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub latencies_ms: Vec<f64>,
}

impl Latencies {
    fn of(latencies_ms: Vec<f64>, leads: usize) -> Latencies {
        Latencies {
            leads,
            lost: leads.saturating_sub(latencies_ms.len()),
            p50_ms: system::quantile(&latencies_ms, 0.5),
            p99_ms: system::quantile(&latencies_ms, 0.99),
            min_ms: system::quantile(&latencies_ms, 0.0),
            max_ms: system::quantile(&latencies_ms, 1.0),
            mean_ms: latencies_ms.iter().sum::<f64>() / latencies_ms.len().max(1) as f64,
            latencies_ms,
        }
    }
}

/// Insert → delivered on one AmoCRM tenant beside the loaded ones.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub tenants_loaded: usize,
    pub wake_gap_ms: u64,
    /// A wake after each insert (committed), the next insert a second later.
    pub wake: Latencies,
    /// The latency tenant's `[leads].poll`.
    pub poll_secs: u64,
    pub poll_insert_gap_ms: u64,
    /// No wake: the inserts spread over the poll's cycles.
    pub poll: Latencies,
}

/// The delivering tenants at their default poll once nothing is due.
#[derive(Clone, Debug, Serialize)]
pub struct Idle {
    pub tenants: usize,
    pub poll_secs: u64,
    pub window_secs: f64,
    pub daemon_cpu_percent: f64,
    /// The PostgreSQL servers' CPU over the window, every backend included.
    pub postgres_cpu_secs: f64,
    pub postgres_cpu_percent: f64,
    /// `pg_stat_database.sessions` of the tenant databases, the window's delta.
    pub sessions: u64,
    pub sessions_per_sec: f64,
    /// The daemon's connections to them at the window's end.
    pub connections_at_end: usize,
    pub rss_mb: f64,
    /// CPU of one fresh connection as an idle poll makes it (opened as the
    /// daemon opens it, one outbox summary, closed), in this process.
    pub connection_cpu_ms: f64,
    /// That cost at the window's sessions per second: the floor the
    /// contract's one short connection per idle poll puts under the idle CPU.
    pub connection_floor_percent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    pub tenants: usize,
    pub amocrm_tenants: usize,
    pub bitrix24_tenants: usize,
    pub leads_per_tenant: usize,
    pub rows: usize,
    pub amocrm_rows: usize,
    pub bitrix24_rows: usize,
    /// From the first INSERT's `created_at` to the last `delivered_at`;
    /// `None`: not every row delivered within the timeout.
    pub all_delivered_secs: Option<f64>,
    /// The harness's clock: from before the first INSERT until `/metrics`
    /// counted every row delivered.
    pub seen_delivered_secs: Option<f64>,
    pub timeout_secs: f64,
    /// Until every INSERT had committed and every wake been answered.
    pub inserted_secs: f64,
    pub wakes_not_202: usize,
    pub states: BTreeMap<String, usize>,
    /// Each row's insert → delivered in the burst.
    pub burst: Latencies,
    /// `POST /api/v4/leads/complex` per AmoCRM row, `batch` per Bitrix24 row.
    pub amocrm_creates_per_lead: f64,
    pub bitrix24_batches_per_deal: f64,
    /// Every request per row, the one-time key-field setup included.
    pub amocrm_requests_per_lead: f64,
    pub bitrix24_requests_per_deal: f64,
    pub amocrm_calls: BTreeMap<String, usize>,
    pub bitrix24_calls: BTreeMap<String, usize>,
    /// Creations the Bitrix24 sandboxes counted (a contact and a deal each).
    pub bitrix24_sandbox_creates: usize,
    /// AmoCRM leads and Bitrix24 deals the sandboxes hold.
    pub crm_entities: usize,
    /// Entities beyond one per key, entities without a key or with a key
    /// that is no row's, rows whose key no entity carries, and delivered
    /// rows whose `crm_entity_id` is not their entity's.
    pub duplicates: usize,
    pub strays: usize,
    pub missing: usize,
    pub mismatched_ids: usize,
    pub daemon_cpu_secs: f64,
    pub postgres_cpu_secs: f64,
    /// Refused by the sandboxes' rate limits over the whole phase.
    pub violations: usize,
    pub latency: Latency,
    pub idle: Idle,
}

fn amo_file(sandbox: &AmoSandbox, database_url: &str, poll_secs: u64) -> TenantFile {
    TenantFile::new()
        .database_url(database_url)
        .amocrm(sandbox)
        .authorization_code(&sandbox.issue_code())
        .amocrm_stages("qualified", [Stage::in_pipeline("Продажи", "Квалифицирован")])
        .table_key("leads", "poll", &format!("\"{poll_secs}s\""))
}

fn b24_file(sandbox: &B24Sandbox, database_url: &str, poll_secs: u64) -> TenantFile {
    TenantFile::new()
        .database_url(database_url)
        .bitrix24(sandbox)
        .entity_type("deal")
        .bitrix24_stages("qualified", [Stage::status(QUALIFIED)])
        .table_key("leads", "poll", &format!("\"{poll_secs}s\""))
}

/// `rows` leads with their contacts in one statement.
fn insert_sql(rows: usize) -> String {
    format!(
        "INSERT INTO crm_lead_outbox (title, contact_name, phone, email) \
         SELECT 'Order ' || g, 'Contact ' || g, '+7 900 000-00-' || lpad(g::text, 2, '0'), 'lead' || g || '@example.com' \
         FROM generate_series(1, {rows}) AS g"
    )
}

/// Rows the daemon has delivered so far, by `/metrics`.
async fn delivered(daemon: &Daemon) -> Option<usize> {
    let metrics = daemon.metrics().await?;
    let sum: f64 = metrics
        .iter()
        .filter(|(k, _)| {
            k.starts_with("crm_connect_lead_delivery_attempts_total{") && k.contains("outcome=\"delivered\"")
        })
        .map(|(_, v)| *v)
        .sum();
    Some(sum as usize)
}

/// One row of an outbox as the check reads it.
struct Row {
    key: String,
    state: String,
    entity_id: Option<i64>,
    created: f64,
    delivered: Option<f64>,
}

async fn outbox(client: &Client) -> anyhow::Result<Vec<Row>> {
    let rows = client
        .query(
            "SELECT delivery_key::text, state, crm_entity_id, extract(epoch FROM created_at)::float8, \
             extract(epoch FROM delivered_at)::float8 FROM crm_lead_outbox",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Row { key: r.get(0), state: r.get(1), entity_id: r.get(2), created: r.get(3), delivered: r.get(4) })
        .collect())
}

/// Insert → delivered in milliseconds of the delivered rows among `ids`.
async fn latencies_of(client: &Client, ids: &[i64]) -> anyhow::Result<Vec<f64>> {
    let rows = client
        .query(
            "SELECT (extract(epoch FROM delivered_at - created_at) * 1000)::float8 FROM crm_lead_outbox \
             WHERE id = ANY($1) AND state = 'delivered' ORDER BY id",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn insert_one(client: &Client, title: &str) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "INSERT INTO crm_lead_outbox (title, contact_name, phone) VALUES ($1, 'Anna', '+7 900 000-00-00') \
             RETURNING id",
            &[&title],
        )
        .await?;
    Ok(row.get(0))
}

/// Waits until every row of `ids` is delivered or `deadline` passes;
/// returns whether all were.
async fn wait_rows(client: &Client, ids: &[i64], deadline: Instant) -> anyhow::Result<bool> {
    let ids = ids.to_vec();
    loop {
        let row = client
            .query_one("SELECT count(*) FROM crm_lead_outbox WHERE id = ANY($1) AND state = 'delivered'", &[&ids])
            .await?;
        if row.get::<_, i64>(0) as usize == ids.len() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(STATE_POLL).await;
    }
}

pub async fn delivery(options: &Options, binary: &Path, databases: &Databases) -> anyhow::Result<Delivery> {
    let count = options.delivery_tenants;
    anyhow::ensure!(count >= 2, "BENCH_DELIVERY_TENANTS must be at least 2");
    log(&format!("lead delivery, {count} tenants: creating databases and sandboxes"));
    let prefix = format!("dl{count}t");
    let mut names: Vec<String> = (0..count).map(|i| format!("{prefix}{i:04}")).collect();
    names.push(format!("{LATENCY_SLUG}{count}"));
    let mut urls = databases.create(&names).await?;
    let latency_url = urls.pop().context("no database for the latency tenant")?;
    let dir = fixture::temp_dir("crm-connect-bench-")?;
    let config = tenants_dir(&dir)?;
    let mut tenants = Vec::new();
    for (i, database_url) in urls.into_iter().enumerate() {
        // Alternating, so that both halves are spread over the clusters.
        let (slug, crm, file) = if i % 2 == 0 {
            let sandbox = fixture::amo_sandbox(100_000 + i, options.latency()).await?;
            let file = amo_file(&sandbox, &database_url, DEFAULT_POLL_SECS);
            (format!("dlamo{i:04}"), Crm::Amo(sandbox), file)
        } else {
            let sandbox = fixture::b24_sandbox(options.latency()).await?;
            let file = b24_file(&sandbox, &database_url, DEFAULT_POLL_SECS);
            (format!("dlb24{i:04}"), Crm::B24(sandbox), file)
        };
        file.write(&config, &slug)?;
        tenants.push(Tenant { slug, database_url, crm });
    }
    let latency_sandbox = fixture::amo_sandbox(199_999, options.latency()).await?;
    let latency_file = amo_file(&latency_sandbox, &latency_url, options.delivery_poll_secs)
        .write(&config, LATENCY_SLUG)
        .context("writing the latency tenant's file")?;
    let amocrm_tenants = tenants.iter().filter(|t| matches!(t.crm, Crm::Amo(_))).count();

    log(&format!("lead delivery, {count} tenants: starting crm-connect run"));
    let mut daemon = Daemon::spawn(binary, options, &config, &log_file(options, &dir, &format!("delivery-{count}")))?;
    let timeout = Duration::from_secs(120) + Duration::from_millis(500) * count as u32;
    if daemon.wait_connected(count + 1, METRICS_POLL, timeout).await.is_none() {
        bail!("lead delivery: the {} tenants did not all connect within {timeout:?}", count + 1);
    }
    let mut connecting = tokio::task::JoinSet::new();
    for (i, tenant) in tenants.iter().enumerate() {
        let url = tenant.database_url.clone();
        connecting.spawn(async move { Ok::<_, anyhow::Error>((i, fixture::connect(&url).await?)) });
    }
    let mut clients: Vec<Option<Client>> = (0..count).map(|_| None).collect();
    while let Some(joined) = connecting.join_next().await {
        let (i, client) = joined??;
        clients[i] = Some(client);
    }
    let before: Vec<usize> = tenants.iter().map(|t| t.requests().len()).collect();

    // The burst: every tenant's leads in one INSERT each, all at once, a
    // wake after each commit.
    let rows = count * LEADS_PER_TENANT;
    log(&format!("lead delivery, {count} tenants: {LEADS_PER_TENANT} leads each at once, a wake per tenant"));
    let postmasters = databases.postmasters();
    let (waker, pid) = (daemon.waker(), daemon.pid);
    let (cpu_before, pg_before) = (system::cpu_ticks(pid), system::postgres_cpu_ticks(&postmasters));
    let started = Instant::now();
    let mut inserting = tokio::task::JoinSet::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let client = client.take().context("a tenant without a connection")?;
        let (waker, slug, sql) = (waker.clone(), tenants[i].slug.clone(), insert_sql(LEADS_PER_TENANT));
        inserting.spawn(async move {
            client.batch_execute(&sql).await?;
            let status = waker.wake(&slug).await?;
            Ok::<_, anyhow::Error>((i, client, status))
        });
    }
    let mut wakes_not_202 = 0;
    while let Some(joined) = inserting.join_next().await {
        let (i, client, status) = joined??;
        clients[i] = Some(client);
        wakes_not_202 += usize::from(status != 202);
    }
    let inserted_secs = started.elapsed().as_secs_f64();
    let delivery_timeout = Duration::from_secs(120) + Duration::from_millis(200) * count as u32;
    let mut seen_delivered = None;
    while started.elapsed() < delivery_timeout && !daemon.exited() {
        if delivered(&daemon).await.is_some_and(|n| n >= rows) {
            seen_delivered = Some(started.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(METRICS_POLL).await;
    }
    let (cpu_after, pg_after) = (system::cpu_ticks(pid), system::postgres_cpu_ticks(&postmasters));
    match seen_delivered {
        Some(secs) => log(&format!("lead delivery, {count} tenants: {rows} rows delivered after {secs:.2} s")),
        None => {
            log(&format!("lead delivery, {count} tenants: NOT all {rows} rows delivered within {delivery_timeout:?}"))
        }
    }

    // What the databases and the CRMs hold.
    let (mut states, mut burst_ms) = (BTreeMap::<String, usize>::new(), Vec::new());
    let (mut first_created, mut last_delivered) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut duplicates, mut strays, mut missing, mut mismatched_ids, mut crm_entities) = (0, 0, 0, 0, 0);
    let (mut amocrm_calls, mut bitrix24_calls) = (BTreeMap::<String, usize>::new(), BTreeMap::<String, usize>::new());
    let (mut amo_creates, mut b24_batches, mut amo_requests, mut b24_requests) = (0, 0, 0, 0);
    let (mut amocrm_rows, mut bitrix24_rows, mut bitrix24_sandbox_creates) = (0, 0, 0);
    for ((tenant, client), before) in tenants.iter().zip(&clients).zip(&before) {
        let client = client.as_ref().context("a tenant without a connection")?;
        let outbox = outbox(client).await?;
        for row in &outbox {
            *states.entry(row.state.clone()).or_default() += 1;
            first_created = first_created.min(row.created);
            if let Some(at) = row.delivered.filter(|_| row.state == "delivered") {
                last_delivered = last_delivered.max(at);
                burst_ms.push((at - row.created) * 1000.0);
            }
        }
        let entities = tenant.entities();
        crm_entities += entities.len();
        let mut by_key: HashMap<&str, i64> = HashMap::new();
        for (key, id) in &entities {
            match key {
                Some(key) if by_key.contains_key(key.as_str()) => duplicates += 1,
                Some(key) => {
                    by_key.insert(key, *id);
                }
                None => strays += 1,
            }
        }
        let keys: HashSet<&str> = outbox.iter().map(|r| r.key.as_str()).collect();
        strays += by_key.keys().filter(|k| !keys.contains(*k)).count();
        for row in &outbox {
            match by_key.get(row.key.as_str()) {
                None => missing += 1,
                Some(id) if row.state == "delivered" && row.entity_id != Some(*id) => mismatched_ids += 1,
                Some(_) => {}
            }
        }
        let requests = tenant.requests();
        // A scheduled stage resync (each quarter hour by default) may fall
        // in the window: its requests are the schedule's, not delivery's.
        let window: Vec<RecordedRequest> =
            requests[(*before).min(requests.len())..].iter().filter(|r| !is_stage_sync(r)).cloned().collect();
        let window = &window[..];
        match &tenant.crm {
            Crm::Amo(_) => {
                amocrm_rows += outbox.len();
                amo_requests += window.len();
                amo_creates += window.iter().filter(|r| r.method == "POST" && r.path == AMO_CREATE).count();
                for request in window {
                    *amocrm_calls.entry(call_name(request)).or_default() += 1;
                }
            }
            Crm::B24(sandbox) => {
                bitrix24_rows += outbox.len();
                b24_requests += window.len();
                bitrix24_sandbox_creates += sandbox.creates();
                for request in window {
                    let name = call_name(request).trim_end_matches(".json").to_owned();
                    b24_batches += usize::from(name == "batch");
                    *bitrix24_calls.entry(name).or_default() += 1;
                }
            }
        }
    }
    let all_delivered = states.get("delivered").copied().unwrap_or(0) == rows && seen_delivered.is_some();
    let per = |n: usize, of: usize| n as f64 / of.max(1) as f64;
    let ticks_per_sec = system::clock_ticks_per_sec() as f64;
    log(&format!(
        "lead delivery, {count} tenants: {:.2} creates per AmoCRM lead, {:.2} batches per Bitrix24 deal, \
         {duplicates} duplicates, {missing} missing",
        per(amo_creates, amocrm_rows),
        per(b24_batches, bitrix24_rows)
    ));

    let latency = latency(options, &daemon, &latency_url, count).await?;

    // Idle: the latency tenant gone, every other one at the default poll.
    drop(clients);
    std::fs::remove_file(&latency_file)?;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(15) {
        let tenants_now: f64 = daemon
            .metrics()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|(k, _)| k.starts_with("crm_connect_tenants{"))
            .map(|(_, v)| *v)
            .sum();
        if tenants_now as usize == count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let window = Duration::from_secs(options.idle_secs);
    past_resync(&daemon, count, window).await;
    log(&format!("lead delivery, {count} tenants: idle for {} s at poll {DEFAULT_POLL_SECS} s", window.as_secs()));
    let sessions_before = databases.sessions(&prefix).await?;
    let (idle_cpu_before, idle_pg_before, idle_from) =
        (system::cpu_ticks(pid), system::postgres_cpu_ticks(&postmasters), Instant::now());
    tokio::time::sleep(window).await;
    let (idle_cpu_after, idle_pg_after, idle_secs) =
        (system::cpu_ticks(pid), system::postgres_cpu_ticks(&postmasters), idle_from.elapsed().as_secs_f64());
    let sessions = databases.sessions(&prefix).await?.saturating_sub(sessions_before);
    let connections_at_end = databases.connections(&prefix).await?.0;
    let rss_mb = system::rss_kib(pid).map_or(f64::NAN, |k| k as f64 * 1024.0 / 1e6);
    let idle_pg_secs = idle_pg_after.saturating_sub(idle_pg_before) as f64 / ticks_per_sec;
    let connection_cpu_ms = connection_cpu_ms(&latency_url, CONNECTION_SAMPLES).await?;
    let sessions_per_sec = sessions as f64 / idle_secs;
    let idle = Idle {
        tenants: count,
        poll_secs: DEFAULT_POLL_SECS,
        window_secs: idle_secs,
        daemon_cpu_percent: idle_cpu_after
            .zip(idle_cpu_before)
            .map_or(f64::NAN, |(a, b)| a.saturating_sub(b) as f64 / ticks_per_sec / idle_secs * 100.0),
        postgres_cpu_secs: idle_pg_secs,
        postgres_cpu_percent: idle_pg_secs / idle_secs * 100.0,
        sessions,
        sessions_per_sec,
        connections_at_end,
        rss_mb,
        connection_cpu_ms,
        connection_floor_percent: connection_cpu_ms * sessions_per_sec / 10.0,
    };
    log(&format!(
        "lead delivery, {count} tenants idle: daemon {:.2} % CPU, PostgreSQL {:.2} % CPU, {:.1} sessions/s; \
         one connection {:.3} ms CPU, {:.2} % at that rate",
        idle.daemon_cpu_percent,
        idle.postgres_cpu_percent,
        idle.sessions_per_sec,
        idle.connection_cpu_ms,
        idle.connection_floor_percent
    ));
    let violations = tenants.iter().map(Tenant::violations).sum::<usize>() + latency_sandbox.violations();
    daemon.stop().await;

    Ok(Delivery {
        tenants: count,
        amocrm_tenants,
        bitrix24_tenants: count - amocrm_tenants,
        leads_per_tenant: LEADS_PER_TENANT,
        rows,
        amocrm_rows,
        bitrix24_rows,
        all_delivered_secs: all_delivered.then_some(last_delivered - first_created),
        seen_delivered_secs: seen_delivered,
        timeout_secs: delivery_timeout.as_secs_f64(),
        inserted_secs,
        wakes_not_202,
        states,
        burst: Latencies::of(burst_ms, rows),
        amocrm_creates_per_lead: per(amo_creates, amocrm_rows),
        bitrix24_batches_per_deal: per(b24_batches, bitrix24_rows),
        amocrm_requests_per_lead: per(amo_requests, amocrm_rows),
        bitrix24_requests_per_deal: per(b24_requests, bitrix24_rows),
        amocrm_calls,
        bitrix24_calls,
        bitrix24_sandbox_creates,
        crm_entities,
        duplicates,
        strays,
        missing,
        mismatched_ids,
        daemon_cpu_secs: cpu_after
            .zip(cpu_before)
            .map_or(f64::NAN, |(a, b)| a.saturating_sub(b) as f64 / ticks_per_sec),
        postgres_cpu_secs: pg_after.saturating_sub(pg_before) as f64 / ticks_per_sec,
        violations,
        latency,
        idle,
    })
}

/// A request of a stage sync: AmoCRM's pipelines, Bitrix24's categories
/// and the batch of their stage lists (method names travel unencoded).
fn is_stage_sync(request: &RecordedRequest) -> bool {
    request.path.ends_with("/api/v4/leads/pipelines")
        || request.path.contains("crm.category.list")
        || request.body.contains("crm.status.list")
        || request.body.contains("crm.dealcategory")
}

/// Fresh connections timed for the floor.
pub const CONNECTION_SAMPLES: usize = 1000;

/// CPU milliseconds of this process per fresh connection that reads the
/// outbox summary and closes, as an idle poll does — one after the other,
/// through the daemon's own pool and connector (`sslmode` as the URL says),
/// on a one-thread runtime of its own as the daemon's.
async fn connection_cpu_ms(url: &str, samples: usize) -> anyhow::Result<f64> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            use crm_connect::db::{PoolSettings, Pools, lead_outbox};
            let pools = Pools::new(PoolSettings::default());
            let db = pools.get("connection-floor", &crm_connect::secret::Secret::new(url))?;
            let me = std::process::id();
            let before = system::cpu_ticks(me);
            for _ in 0..samples {
                let session = db.session().await?;
                lead_outbox::summary(&session).await?;
                drop(session);
                db.close_idle();
            }
            let after = system::cpu_ticks(me);
            let ticks = after.zip(before).map_or(f64::NAN, |(a, b)| a.saturating_sub(b) as f64);
            Ok(ticks / system::clock_ticks_per_sec() as f64 * 1000.0 / samples as f64)
        })
    })
    .await?
}

/// The tenants resync their stages on every quarter hour (the default
/// schedule): an idle window that would hold that burst starts after it,
/// once every tenant's stage sync is newer than the quarter hour (at most
/// two minutes' wait for that).
pub async fn past_resync(daemon: &Daemon, count: usize, window: Duration) {
    const QUARTER: i64 = 15 * 60;
    let now = chrono::Utc::now().timestamp();
    let quarter = (now / QUARTER + 1) * QUARTER;
    let window_end = now.saturating_add(i64::try_from(window.as_secs()).unwrap_or(i64::MAX)).saturating_add(5);
    if window_end < quarter {
        return;
    }
    log(&format!("idle: waiting for the quarter-hour resync ({} s away) to pass", quarter - now));
    tokio::time::sleep(Duration::from_secs(u64::try_from(quarter - now).unwrap_or(0))).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let synced = daemon
            .metrics()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|(k, v)| k.starts_with("crm_connect_last_stage_sync_timestamp_seconds{") && **v >= quarter as f64)
            .count();
        if synced >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    log("idle: the resync did not finish within two minutes; the idle window starts anyway");
}

/// Insert → delivered on the latency tenant: with a wake after each
/// insert, then by its poll alone.
async fn latency(options: &Options, daemon: &Daemon, database_url: &str, loaded: usize) -> anyhow::Result<Latency> {
    let n = options.delivery_latency_leads;
    let client = fixture::connect(database_url).await?;
    let waker: Waker = daemon.waker();
    log(&format!("lead delivery latency: {n} leads with a wake each, {loaded} tenants loaded"));
    let mut ids = Vec::new();
    for k in 0..n {
        let started = Instant::now();
        let id = insert_one(&client, &format!("Woken {k}")).await?;
        waker.wake(LATENCY_SLUG).await?;
        wait_rows(&client, &[id], started + LEAD_TIMEOUT).await?;
        ids.push(id);
        tokio::time::sleep_until((started + WAKE_GAP).into()).await;
    }
    let wake = Latencies::of(latencies_of(&client, &ids).await?, n);
    log(&format!("lead delivery latency with a wake: p50 {:.0} ms, p99 {:.0} ms", wake.p50_ms, wake.p99_ms));

    let poll = Duration::from_secs(options.delivery_poll_secs);
    let gap = POLL_INSERT_GAP.max(poll / 10);
    log(&format!(
        "lead delivery latency: {n} leads without a wake, poll {} s, about {} ms apart",
        poll.as_secs(),
        gap.as_millis()
    ));
    let mut ids = Vec::new();
    for k in 0..n {
        ids.push(insert_one(&client, &format!("Polled {k}")).await?);
        // From half to one and a half gaps, spread evenly (golden ratio), so
        // the inserts fall on every phase of the poll.
        let spread = 0.5 + (k as f64 * 0.618_034).fract();
        tokio::time::sleep(gap.mul_f64(spread)).await;
    }
    wait_rows(&client, &ids, Instant::now() + poll + Duration::from_secs(30)).await?;
    let polled = Latencies::of(latencies_of(&client, &ids).await?, n);
    log(&format!(
        "lead delivery latency by the poll ({} s): p50 {:.0} ms, p99 {:.0} ms",
        poll.as_secs(),
        polled.p50_ms,
        polled.p99_ms
    ));
    Ok(Latency {
        tenants_loaded: loaded,
        wake_gap_ms: WAKE_GAP.as_millis() as u64,
        wake,
        poll_secs: options.delivery_poll_secs,
        poll_insert_gap_ms: gap.as_millis() as u64,
        poll: polled,
    })
}
