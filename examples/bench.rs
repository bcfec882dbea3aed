//! The benchmark harness: crm-connect's release binary against the CRM
//! sandboxes (answering every request after a configurable latency) and
//! throwaway PostgreSQL clusters, all on this machine. Writes
//! `BENCHMARKS.md` (method, machine, results next to their targets) and
//! `BENCHMARKS.json` (every figure) into the crate directory.
//!
//! ```sh
//! cargo run --release --example bench
//! ```
//!
//! It builds the binary itself (`cargo build --release --bin crm-connect`),
//! then measures, in this order:
//! - cold start of `crm-connect run` for 10, 100 and 500 tenants (half
//!   AmoCRM, half Bitrix24), with peak RSS, PostgreSQL connections while
//!   busy and after the pool idle timeout, and idle CPU;
//! - edit latency: a tenant file rewritten (aside + rename) until the flag
//!   is in the database, on the largest daemon;
//! - requests per stage sync, counted by the sandboxes;
//! - the manual runbook (`scripts/runbook.sh`) against `crm-connect sync`;
//! - the Bitrix24 rate-limit ceiling: 20 tenants on one portal;
//! - 1,000 tenants with every database on ONE cluster at PostgreSQL's stock
//!   `max_connections = 100`, default flags: first start, restart,
//!   connection errors, connections at once, memory, idle CPU;
//! - the soak: the daemon's work loop over a million jobs;
//! - lead delivery: 500 tenants with `[leads]` (half AmoCRM, half Bitrix24
//!   deals), 10 leads each inserted at once with a wake per tenant, until
//!   all are delivered (requests per lead, duplicates, rate limits); insert
//!   → delivered latency with a wake and by the poll alone; the idle cost
//!   of the delivering tenants at the default poll;
//! - funnel history: 500 tenants with `[funnel]` (half AmoCRM, half
//!   Bitrix24 deals) at the default poll (60 s), once every stream has
//!   started: requests per CRM per tenant per poll, counted by the
//!   sandboxes, daemon and PostgreSQL CPU; then the catch-up of one AmoCRM
//!   and one Bitrix24 tenant with a `since` back-fill of 10,000 stage
//!   changes each (`crm-connect funnel --tenant SLUG`): changes per second,
//!   requests against the APIs' ceilings, every change stored once.
//!
//! A quick run (not the documented measurement), for instance:
//! `BENCH_TENANTS=10,100 BENCH_IDLE_SECS=5 BENCH_IDLE_TIMEOUT_SECS=5
//! BENCH_EDITS=20 BENCH_OUT=/tmp/bench cargo run --release --example bench`;
//! the delivery phase alone, small: `BENCH_PHASES=delivery BENCH_TENANTS=20
//! BENCH_DELIVERY_TENANTS=20 BENCH_DELIVERY_LATENCY_LEADS=30 BENCH_IDLE_SECS=20
//! BENCH_OUT=/tmp/bench cargo run --release --example bench`; the funnel
//! phase alone, small: `BENCH_PHASES=funnel BENCH_FUNNEL_TENANTS=20
//! BENCH_FUNNEL_POLL_SECS=10 BENCH_FUNNEL_CHANGES=1000 BENCH_IDLE_SECS=30
//! BENCH_OUT=/tmp/bench cargo run --release --example bench`.

#[path = "bench/delivery.rs"]
mod delivery;
#[path = "bench/fixture.rs"]
mod fixture;
#[path = "bench/funnel.rs"]
mod funnel;
#[path = "bench/phases.rs"]
mod phases;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/system.rs"]
mod system;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// The documented full run uses every default.
#[derive(Clone, Debug, Parser, serde::Serialize)]
#[command(name = "bench", about = "Measures crm-connect against the sandboxes and writes BENCHMARKS.md/.json")]
pub struct Options {
    /// Latency of every sandbox answer, in milliseconds
    #[arg(long, env = "BENCH_LATENCY_MS", default_value_t = 30)]
    pub latency_ms: u64,

    /// Tenant counts of the cold-start runs (half AmoCRM, half Bitrix24)
    #[arg(long, env = "BENCH_TENANTS", value_delimiter = ',', default_value = "10,100,500")]
    pub tenants: Vec<usize>,

    /// Seconds of idle CPU measured after each cold start, and of the
    /// delivering and the funnel tenants' idle cost
    #[arg(long, env = "BENCH_IDLE_SECS", default_value_t = 60)]
    pub idle_secs: u64,

    /// The daemon's pool idle timeout in seconds: connections are counted
    /// once it and the reaper's half-interval have passed after the cold start
    #[arg(long, env = "BENCH_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub idle_timeout_secs: u64,

    /// Edits measured on the largest daemon (0 skips the edit latency)
    #[arg(long, env = "BENCH_EDITS", default_value_t = 100)]
    pub edits: usize,

    /// Runs of the runbook and of `crm-connect sync` each (medians reported)
    #[arg(long, env = "BENCH_RUNBOOK_RUNS", default_value_t = 5)]
    pub runbook_runs: usize,

    /// Tenant files sharing one Bitrix24 portal in the rate-limit run
    #[arg(long, env = "BENCH_PORTAL_TENANTS", default_value_t = 20)]
    pub portal_tenants: usize,

    /// Tenants of the one-server run: every tenant database on ONE cluster
    /// at PostgreSQL's stock max_connections = 100, default flags
    #[arg(long, env = "BENCH_ONE_SERVER_TENANTS", default_value_t = 1000)]
    pub one_server_tenants: usize,

    /// Tenants of the soak (each with a resync every second) and the jobs it
    /// runs in all
    #[arg(long, env = "BENCH_SOAK_TENANTS", default_value_t = 5000)]
    pub soak_tenants: usize,
    #[arg(long, env = "BENCH_SOAK_JOBS", default_value_t = 1_000_000)]
    pub soak_jobs: u64,

    /// Tenants with `[leads]` in the delivery run (half AmoCRM, half Bitrix24 deals)
    #[arg(long, env = "BENCH_DELIVERY_TENANTS", default_value_t = 500)]
    pub delivery_tenants: usize,

    /// Leads of each insert → delivered latency (with a wake, then by the poll)
    #[arg(long, env = "BENCH_DELIVERY_LATENCY_LEADS", default_value_t = 100)]
    pub delivery_latency_leads: usize,

    /// `[leads].poll` of the tenant whose poll-only latency is measured, in seconds
    #[arg(long, env = "BENCH_DELIVERY_POLL_SECS", default_value_t = 5)]
    pub delivery_poll_secs: u64,

    /// Tenants with `[funnel]` in the idle run (half AmoCRM, half Bitrix24 deals)
    #[arg(long, env = "BENCH_FUNNEL_TENANTS", default_value_t = 500)]
    pub funnel_tenants: usize,

    /// `[funnel].poll` of those tenants, in seconds (default: the config's
    /// default; the idle window is at least two polls)
    #[arg(long, env = "BENCH_FUNNEL_POLL_SECS", default_value_t = 60)]
    pub funnel_poll_secs: u64,

    /// Stage changes back-filled on each of the two catch-up tenants
    #[arg(long, env = "BENCH_FUNNEL_CHANGES", default_value_t = 10_000)]
    pub funnel_changes: usize,

    /// Before starting, wait (up to 15 minutes) for the 1-minute load average to drop below this
    #[arg(long, env = "BENCH_MAX_LOAD")]
    pub max_load: Option<f64>,

    /// Measurements to run (edits need cold)
    #[arg(
        long,
        env = "BENCH_PHASES",
        value_enum,
        value_delimiter = ',',
        default_value = "cold,edits,resync,runbook,ceiling,one-server,soak,delivery,funnel"
    )]
    pub phases: Vec<Phase>,

    /// `--concurrency` for every crm-connect run (default: the daemon's own, 32)
    #[arg(long, env = "BENCH_CONCURRENCY")]
    pub concurrency: Option<usize>,

    /// Keep the daemons' logs (RUST_LOG=info) in this directory
    #[arg(long, env = "BENCH_LOGS")]
    #[serde(skip)]
    pub logs: Option<PathBuf>,

    /// Where BENCHMARKS.md and BENCHMARKS.json go (default: the crate directory)
    #[arg(long, env = "BENCH_OUT")]
    #[serde(skip)]
    pub out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Cold,
    Edits,
    Resync,
    Runbook,
    Ceiling,
    OneServer,
    Soak,
    Delivery,
    Funnel,
}

impl Options {
    pub fn runs(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }

    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    /// Whether these are the documented full run's settings.
    pub fn is_full_run(&self) -> bool {
        let defaults = Options::parse_from(["bench"]);
        self.latency_ms == defaults.latency_ms
            && self.tenants == defaults.tenants
            && self.idle_secs == defaults.idle_secs
            && self.idle_timeout_secs == defaults.idle_timeout_secs
            && self.edits == defaults.edits
            && self.runbook_runs == defaults.runbook_runs
            && self.portal_tenants == defaults.portal_tenants
            && self.one_server_tenants == defaults.one_server_tenants
            && self.soak_tenants == defaults.soak_tenants
            && self.soak_jobs == defaults.soak_jobs
            && self.delivery_tenants == defaults.delivery_tenants
            && self.delivery_latency_leads == defaults.delivery_latency_leads
            && self.delivery_poll_secs == defaults.delivery_poll_secs
            && self.funnel_tenants == defaults.funnel_tenants
            && self.funnel_poll_secs == defaults.funnel_poll_secs
            && self.funnel_changes == defaults.funnel_changes
            && self.phases == defaults.phases
            && self.concurrency.is_none()
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = options.out.clone().unwrap_or_else(|| crate_dir.clone());
    anyhow::ensure!(!options.tenants.is_empty(), "--tenants needs at least one count");
    anyhow::ensure!(options.tenants.iter().all(|&n| n >= 2), "each tenant count must be at least 2");

    if let Some(logs) = &options.logs {
        std::fs::create_dir_all(logs)?;
    }
    system::log("building the release binary");
    let revision = system::revision(&crate_dir);
    let binary = system::build_release_binary(&crate_dir)?;
    if let Some(max) = options.max_load {
        system::wait_for_low_load(max, Duration::from_secs(15 * 60)).await;
    }
    let started_at = chrono::Utc::now();
    let load_before = system::load_average();
    let mut machine = system::machine();

    let largest = options.tenants.iter().copied().max().unwrap_or(2);
    // The delivery run keeps a connection of its own open to each tenant;
    // the funnel run adds its two catch-up tenants.
    let mut most = largest;
    if options.runs(Phase::Delivery) {
        most = most.max(options.delivery_tenants + 1);
    }
    if options.runs(Phase::Funnel) {
        most = most.max(options.funnel_tenants + 2);
    }
    let databases = fixture::Databases::start(fixture::clusters_for(most)).await?;
    machine.postgres = databases.server_version().await?;
    system::log(&format!("{} PostgreSQL cluster(s) up ({})", databases.len(), machine.postgres));

    let mut cold_starts = Vec::new();
    let mut edits = None;
    let cold_counts = if options.runs(Phase::Cold) { options.tenants.clone() } else { Vec::new() };
    for &count in &cold_counts {
        let edit_here = options.runs(Phase::Edits) && count == largest && options.edits > 0 && edits.is_none();
        let (cold, edit) = phases::cold_start(&options, &binary, &databases, count, edit_here).await?;
        cold_starts.push(cold);
        if edit.is_some() {
            edits = edit;
        }
    }
    let resync = match options.runs(Phase::Resync) {
        true => Some(phases::resync(&options, &binary, &databases).await?),
        false => None,
    };
    let runbook = match options.runs(Phase::Runbook) {
        true => Some(phases::runbook(&options, &binary, &databases, &crate_dir).await?),
        false => None,
    };
    let ceiling = match options.runs(Phase::Ceiling) {
        true => Some(phases::ceiling(&options, &binary, &databases).await?),
        false => None,
    };

    // Every tenant on one stock server: the connection budget at work.
    let one_server = match options.runs(Phase::OneServer) {
        true => {
            let one = fixture::Databases::one_server(fixture::STOCK_MAX_CONNECTIONS).await?;
            system::log(&format!("one cluster at max_connections = {} up", fixture::STOCK_MAX_CONNECTIONS));
            let (cold, _) = phases::cold_start(&options, &binary, &one, options.one_server_tenants, false).await?;
            let floor = phases::floor(&one, &crate_dir.join("migrations")).await?;
            Some((cold, floor))
        }
        false => None,
    };

    // Months of uptime in minutes: the daemon's work loop, a million jobs.
    let soak = match options.runs(Phase::Soak) {
        true => Some(phases::soak(&options, &binary).await?),
        false => None,
    };

    // Leads: a burst on every tenant, the latency on one, the idle cost.
    let delivery = match options.runs(Phase::Delivery) {
        true => Some(delivery::delivery(&options, &binary, &databases).await?),
        false => None,
    };

    // Funnel history: the idle cost of many streams, the catch-up of two.
    let funnel = match options.runs(Phase::Funnel) {
        true => Some(funnel::funnel(&options, &binary, &databases).await?),
        false => None,
    };

    let results = report::Results {
        full_run: options.is_full_run(),
        options: options.clone(),
        machine,
        revision,
        clusters: databases.len(),
        started_at,
        finished_at: chrono::Utc::now(),
        load_before,
        load_after: system::load_average(),
        cold_starts,
        edits,
        resync,
        runbook,
        ceiling,
        one_server,
        soak,
        delivery,
        funnel,
    };
    drop(databases);
    std::fs::create_dir_all(&out)?;
    let (markdown, json) = (out.join("BENCHMARKS.md"), out.join("BENCHMARKS.json"));
    std::fs::write(&markdown, report::markdown(&results))?;
    std::fs::write(&json, serde_json::to_string_pretty(&report::json(&results))? + "\n")?;
    println!("{}", report::summary(&results));
    system::log(&format!("wrote {} and {}", markdown.display(), json.display()));
    Ok(())
}
