//! BENCHMARKS.md and BENCHMARKS.json from the measurements.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Options;
use crate::delivery::Delivery;
use crate::funnel::{CatchUp, Funnel};
use crate::phases::{Ceiling, ColdStart, Edits, Floor, Resync, Runbook, Soak};
use crate::system::Machine;

pub const COMMAND: &str = "cargo run --release --example bench";

/// The cold-start size the memory and time targets are about.
const TARGET_TENANTS: usize = 500;

#[derive(Debug, Serialize)]
pub struct Results {
    pub full_run: bool,
    pub options: Options,
    pub machine: Machine,
    /// The commit measured, and whether the sources differed from it.
    pub revision: String,
    pub clusters: usize,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    pub cold_starts: Vec<ColdStart>,
    pub edits: Option<Edits>,
    pub resync: Option<Resync>,
    pub runbook: Option<Runbook>,
    pub ceiling: Option<Ceiling>,
    /// Every tenant database on one cluster at `max_connections = 100`.
    pub one_server: Option<(ColdStart, Floor)>,
    /// The daemon's work loop over a million jobs.
    pub soak: Option<Soak>,
    /// Leads inserted, woken, polled, delivered; then the idle cost.
    pub delivery: Option<Delivery>,
    /// Funnel history: the idle cost of many streams, the catch-up of two.
    pub funnel: Option<Funnel>,
}

/// The one-server run's targets: connections come from `--db-connections`
/// (default 10) per server.
const DB_CONNECTIONS: usize = 10;

/// One line of the results table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub measure: String,
    pub result: String,
    pub target: String,
    /// `None`: no target, or not measured in this run.
    pub met: Option<bool>,
}

fn row(measure: impl Into<String>, result: impl Into<String>, target: &str, met: Option<bool>) -> Row {
    Row { measure: measure.into(), result: result.into(), target: target.to_owned(), met }
}

fn not_measured(measure: impl Into<String>, target: &str) -> Row {
    row(measure, "not measured in this run", target, None)
}

fn secs(value: Option<f64>) -> String {
    value.map_or_else(|| "did not finish".to_owned(), |s| format!("{s:.2} s"))
}

fn calls(list: &[String]) -> String {
    if list.is_empty() { "none".to_owned() } else { list.join(", ") }
}

pub fn rows(r: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    let target = r.cold_starts.iter().find(|c| c.tenants == TARGET_TENANTS);
    let measure = format!("Cold start, {TARGET_TENANTS} tenants (run → all connected, stages synced)");
    rows.push(match target {
        Some(c) => row(measure, secs(c.reconciled_secs), "< 10 s", Some(c.reconciled_secs.is_some_and(|s| s < 10.0))),
        None => not_measured(measure, "< 10 s"),
    });
    for c in r.cold_starts.iter().filter(|c| c.tenants != TARGET_TENANTS) {
        rows.push(row(format!("Cold start, {} tenants", c.tenants), secs(c.reconciled_secs), "—", None));
    }
    for c in &r.cold_starts {
        rows.push(row(
            format!("Restart, {} tenants (databases migrated, tokens stored)", c.tenants),
            secs(c.restart.reconciled_secs),
            "—",
            None,
        ));
    }
    let measure = format!("Peak RSS (VmHWM), {TARGET_TENANTS} tenants");
    rows.push(match target {
        Some(c) => row(measure, format!("{:.1} MB", c.peak_rss_mb), "< 100 MB", Some(c.peak_rss_mb < 100.0)),
        None => not_measured(measure, "< 100 MB"),
    });
    let per_size = |f: &dyn Fn(&ColdStart) -> String| -> String {
        r.cold_starts.iter().map(|c| format!("{} ({})", f(c), c.tenants)).collect::<Vec<_>>().join(", ")
    };
    let any = !r.cold_starts.is_empty();
    rows.push(row(
        format!("Idle CPU over {} s after the cold start (per tenant count)", r.options.idle_secs),
        per_size(&|c| format!("{:.2} %", c.idle_cpu_percent)),
        "< 1 % of one core",
        any.then(|| r.cold_starts.iter().all(|c| c.idle_cpu_percent < 1.0)),
    ));
    rows.push(row(
        "PostgreSQL connections per tenant while busy (max of pg_stat_activity samples)",
        per_size(&|c| format!("{} (total {})", c.busy_connections_per_tenant, c.busy_connections_total)),
        "≤ 2",
        any.then(|| r.cold_starts.iter().all(|c| c.busy_connections_per_tenant <= 2)),
    ));
    rows.push(row(
        "PostgreSQL connections after the pool idle timeout",
        per_size(&|c| c.idle_connections.to_string()),
        "0",
        any.then(|| r.cold_starts.iter().all(|c| c.idle_connections == 0)),
    ));
    match &r.edits {
        Some(e) => {
            let lost = if e.lost > 0 { format!(", {} lost", e.lost) } else { String::new() };
            rows.push(row(
                format!("Edit → flag in the database, p50 ({} edits, {} tenants loaded)", e.edits, e.tenants_loaded),
                format!("{:.0} ms", e.p50_ms),
                "—",
                None,
            ));
            rows.push(row(
                format!("Edit → flag in the database, p99 ({} edits)", e.edits),
                format!("{:.0} ms{lost}", e.p99_ms),
                "< 500 ms",
                Some(e.p99_ms < 500.0 && e.lost == 0),
            ));
        }
        None => rows.push(not_measured("Edit → flag in the database, p99", "< 500 ms")),
    }
    let list = |v: &[usize]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    match &r.resync {
        Some(s) => {
            rows.push(row(
                "Requests per scheduled stage sync, Bitrix24 (each of 3 resyncs)",
                list(&s.bitrix24_per_resync),
                "2",
                Some(!s.bitrix24_per_resync.is_empty() && s.bitrix24_per_resync.iter().all(|&n| n > 0 && n <= 2)),
            ));
            rows.push(row(
                "Requests per scheduled stage sync, AmoCRM (each of 3 resyncs)",
                list(&s.amocrm_per_resync),
                "1",
                Some(!s.amocrm_per_resync.is_empty() && s.amocrm_per_resync.iter().all(|&n| n == 1)),
            ));
            rows.push(row(
                "Requests of the connecting reconcile (Bitrix24 / AmoCRM)",
                format!("{} / {}", s.bitrix24_connect_requests, s.amocrm_connect_requests),
                "—",
                None,
            ));
        }
        None => {
            rows.push(not_measured("Requests per scheduled stage sync, Bitrix24", "2"));
            rows.push(not_measured("Requests per scheduled stage sync, AmoCRM", "1"));
        }
    }
    match &r.runbook {
        Some(b) => {
            rows.push(row(
                format!(
                    "Faster than the runbook sequence (Bitrix24, {} categories; median of {})",
                    b.categories, b.runs
                ),
                format!("{:.1}× ({:.3} s vs {:.3} s)", b.speedup, b.runbook_median_secs, b.sync_median_secs),
                "≥ 10×",
                Some(b.speedup >= 10.0),
            ));
            rows.push(row(
                "Requests: runbook vs crm-connect sync",
                format!("{} vs {}", b.runbook_requests, b.sync_requests),
                "—",
                None,
            ));
        }
        None => rows.push(not_measured("Faster than the runbook sequence", "≥ 10×")),
    }
    match &r.ceiling {
        Some(c) => {
            rows.push(row(
                format!("Rate-limit violations, {} tenants on one Bitrix24 portal", c.tenants),
                c.violations.to_string(),
                "0",
                Some(c.violations == 0 && c.exit_code == 0),
            ));
            rows.push(row(
                "Sustained requests/s at that portal (after the client's burst of 10)",
                format!("{:.2} /s (peak {} in 1 s)", c.sustained_per_sec, c.peak_1s),
                "—",
                None,
            ));
        }
        None => rows.push(not_measured("Rate-limit violations, tenants sharing one Bitrix24 portal", "0")),
    }
    match &r.one_server {
        Some((c, _)) => {
            let n = c.tenants;
            rows.push(row(
                format!("One server at max_connections = 100, {n} tenants: first start (migrations included)"),
                secs(c.reconciled_secs),
                "< 20 s",
                Some(c.reconciled_secs.is_some_and(|s| s < 20.0)),
            ));
            rows.push(row(
                format!("One server, {n} tenants: restart"),
                secs(c.restart.reconciled_secs),
                "< 10 s",
                Some(c.restart.reconciled_secs.is_some_and(|s| s < 10.0)),
            ));
            rows.push(row(
                format!("One server, {n} tenants: connection errors (too many clients, cannot connect now)"),
                c.connection_errors.to_string(),
                "0",
                Some(c.connection_errors == 0),
            ));
            rows.push(row(
                format!("One server, {n} tenants: the daemon's connections at once (max of samples every 50 ms)"),
                c.busy_connections_total.to_string(),
                "≤ 10 (the budget)",
                Some(c.busy_connections_total <= DB_CONNECTIONS),
            ));
            rows.push(row(
                format!("One server, {n} tenants: peak RSS"),
                format!("{:.1} MB", c.peak_rss_mb),
                "< 100 MB",
                Some(c.peak_rss_mb < 100.0),
            ));
            rows.push(row(
                format!("One server, {n} tenants: idle CPU over {} s", c.idle_secs),
                format!("{:.2} %", c.idle_cpu_percent),
                "< 1 % of one core",
                Some(c.idle_cpu_percent < 1.0),
            ));
        }
        None => rows.push(not_measured("One server at max_connections = 100, 1000 tenants", "see the issue")),
    }
    match &r.soak {
        Some(s) => {
            let growth = (s.end.1 / s.early.1 - 1.0) * 100.0;
            rows.push(row(
                format!("Memory after {} jobs vs after {} (RSS)", s.end.0, s.early.0),
                format!("{:.1} MB vs {:.1} MB ({growth:+.1} %)", s.end.1, s.early.1),
                "within 10 %",
                Some(growth.abs() <= 10.0),
            ));
        }
        None => rows.push(not_measured("Memory after 1,000,000 jobs vs after 10,000", "within 10 %")),
    }
    delivery_rows(r.delivery.as_ref(), &mut rows);
    funnel_rows(r.funnel.as_ref(), &mut rows);
    let elsewhere: usize =
        r.cold_starts.iter().chain(r.one_server.as_ref().map(|(c, _)| c)).map(|c| c.violations).sum::<usize>()
            + r.resync.as_ref().map_or(0, |s| s.violations)
            + r.runbook.as_ref().map_or(0, |b| b.violations);
    rows.push(row("Rate-limit violations in every other run", elsewhere.to_string(), "0", Some(elsewhere == 0)));
    rows
}

fn delivery_rows(d: Option<&Delivery>, rows: &mut Vec<Row>) {
    let Some(d) = d else {
        rows.push(not_measured("Lead delivery: create requests per lead (AmoCRM / Bitrix24 deal)", "1 / 1"));
        rows.push(not_measured("Lead delivery: duplicates", "0"));
        rows.push(not_measured("Lead delivery: insert → delivered with a wake, p99", "< 500 ms"));
        rows.push(not_measured("Lead delivery: insert → delivered by the poll alone, p99", "≤ poll + 1 s"));
        rows.push(not_measured("Lead delivery: idle CPU of the [leads] tenants at poll 30 s", "< 1 % of one core"));
        return;
    };
    let n = d.tenants;
    let burst = format!("{n} tenants × {} leads", d.leads_per_tenant);
    let states = d.states.iter().map(|(state, rows)| format!("{rows} {state}")).collect::<Vec<_>>().join(", ");
    rows.push(row(
        format!("Lead delivery, {burst} inserted at once, a wake each (first INSERT → last delivered)"),
        match d.all_delivered_secs {
            Some(s) => format!("{s:.2} s"),
            None => format!("not all delivered within {:.0} s ({states})", d.timeout_secs),
        },
        "—",
        None,
    ));
    rows.push(row(
        "Create requests per AmoCRM lead (`POST /api/v4/leads/complex`)",
        format!("{:.2}", d.amocrm_creates_per_lead),
        "1",
        Some(d.amocrm_rows > 0 && d.amocrm_creates_per_lead == 1.0),
    ));
    rows.push(row(
        "Requests per Bitrix24 deal with its contact (`batch`)",
        format!("{:.2}", d.bitrix24_batches_per_deal),
        "1",
        Some(d.bitrix24_rows > 0 && d.bitrix24_batches_per_deal == 1.0),
    ));
    rows.push(row(
        "All requests per lead, one-time key-field setup included (AmoCRM / Bitrix24)",
        format!("{:.2} / {:.2}", d.amocrm_requests_per_lead, d.bitrix24_requests_per_deal),
        "—",
        None,
    ));
    let wrong = d.duplicates + d.strays + d.missing + d.mismatched_ids;
    rows.push(row(
        format!("Lead delivery duplicates, {burst} (CRM leads + deals vs rows, one per key)"),
        format!(
            "{} ({} in the CRMs for {} rows{})",
            d.duplicates,
            d.crm_entities,
            d.rows,
            match wrong - d.duplicates {
                0 => String::new(),
                k => format!("; {k} stray, missing or mismatched"),
            }
        ),
        "0",
        Some(wrong == 0 && d.crm_entities == d.rows),
    ));
    rows.push(row(
        "Rate-limit violations during lead delivery",
        d.violations.to_string(),
        "0",
        Some(d.violations == 0),
    ));
    let l = &d.latency;
    let lost = |lost: usize| if lost > 0 { format!(", {lost} lost") } else { String::new() };
    rows.push(row(
        format!(
            "Insert → delivered with a wake, p99 ({} leads, one AmoCRM tenant, {} loaded)",
            l.wake.leads, l.tenants_loaded
        ),
        format!("{:.0} ms (p50 {:.0} ms){}", l.wake.p99_ms, l.wake.p50_ms, lost(l.wake.lost)),
        "< 500 ms",
        Some(l.wake.p99_ms < 500.0 && l.wake.lost == 0),
    ));
    let bound = l.poll_secs as f64 + 1.0;
    rows.push(row(
        format!("Insert → delivered by the poll alone, p99 ({} leads, poll {} s)", l.poll.leads, l.poll_secs),
        format!("{:.2} s (p50 {:.2} s){}", l.poll.p99_ms / 1000.0, l.poll.p50_ms / 1000.0, lost(l.poll.lost)),
        &format!("≤ poll + 1 s ({bound:.0} s)"),
        Some(l.poll.p99_ms <= bound * 1000.0 && l.poll.lost == 0),
    ));
    let i = &d.idle;
    rows.push(row(
        format!(
            "Idle CPU of {} [leads] tenants at poll {} s, all delivered, over {:.0} s",
            i.tenants, i.poll_secs, i.window_secs
        ),
        format!("{:.2} %", i.daemon_cpu_percent),
        "< 1 % of one core",
        Some(i.daemon_cpu_percent < 1.0),
    ));
    rows.push(row(
        "One fresh connection per idle poll, opened one after another in the harness (the contract's floor)",
        format!("{:.2} % ({:.3} ms CPU a connection)", i.connection_floor_percent, i.connection_cpu_ms),
        "—",
        None,
    ));
    rows.push(row(
        "Their PostgreSQL cost over the same window: CPU, connections per second",
        format!("{:.2} % of one core, {:.1} sessions/s", i.postgres_cpu_percent, i.sessions_per_sec),
        "—",
        None,
    ));
}

/// The client's sustained request rate per AmoCRM account (one every 334
/// ms after a burst of 3, under the account's 7 a second) and per Bitrix24
/// portal (2 a second after a burst of 10).
fn rate_limit(crm: &str) -> f64 {
    if crm == "amocrm" { 3.0 } else { 2.0 }
}

fn crm_name(crm: &str) -> &'static str {
    if crm == "amocrm" { "AmoCRM" } else { "Bitrix24" }
}

fn funnel_rows(f: Option<&Funnel>, rows: &mut Vec<Row>) {
    let Some(f) = f else {
        rows.push(not_measured("Funnel idle: requests per CRM per tenant per poll", "exactly 1"));
        rows.push(not_measured("Funnel idle: daemon CPU", "< 1 % of one core"));
        rows.push(not_measured("Funnel catch-up: every back-filled change stored once", "0 duplicates, 0 missing"));
        return;
    };
    let i = &f.idle;
    let (a, b) = (&i.amocrm, &i.bitrix24);
    let missing =
        if i.tenants_not_polled > 0 { format!("; {} tenants not polled", i.tenants_not_polled) } else { String::new() };
    rows.push(row(
        format!(
            "Funnel idle, {} tenants at poll {} s: requests per CRM per tenant per poll, AmoCRM / Bitrix24 \
             (min–max over {} / {} polls)",
            i.tenants, i.poll_secs, a.polls, b.polls
        ),
        format!(
            "{:.2} ({}–{}) / {:.2} ({}–{}){missing}",
            a.requests_per_poll, a.min_per_poll, a.max_per_poll, b.requests_per_poll, b.min_per_poll, b.max_per_poll
        ),
        "exactly 1",
        Some(
            [a, b].iter().all(|c| c.polls > 0 && c.min_per_poll == 1 && c.max_per_poll == 1)
                && i.tenants_not_polled == 0,
        ),
    ));
    rows.push(row(
        format!(
            "Funnel idle: daemon CPU, {} tenants at poll {} s, over {:.0} s",
            i.tenants, i.poll_secs, i.window_secs
        ),
        format!("{:.2} % ({:.2} ms a poll)", i.daemon_cpu_percent, i.cpu_ms_per_poll),
        "< 1 % of one core",
        Some(i.daemon_cpu_percent < 1.0),
    ));
    rows.push(row(
        format!(
            "Funnel idle: daemon CPU at the default poll ({} s), from the CPU a poll (derived)",
            crate::funnel::DEFAULT_POLL_SECS
        ),
        format!("{:.2} %", i.default_poll_cpu_percent),
        "—",
        None,
    ));
    rows.push(row(
        "Funnel idle: PostgreSQL CPU, connections per second (per poll)",
        format!(
            "{:.2} % of one core, {:.1} sessions/s ({:.2} a poll)",
            i.postgres_cpu_percent, i.sessions_per_sec, i.sessions_per_poll
        ),
        "—",
        None,
    ));
    for c in &f.catch_up {
        catch_up_rows(c, rows);
    }
    let violations = i.violations + f.catch_up.iter().map(|c| c.violations).sum::<usize>();
    rows.push(row("Rate-limit violations during the funnel runs", violations.to_string(), "0", Some(violations == 0)));
}

fn catch_up_rows(c: &CatchUp, rows: &mut Vec<Row>) {
    let name = crm_name(&c.crm);
    rows.push(row(
        format!("Funnel catch-up, {name}, {} changes back-filled (`since`): `crm-connect funnel` wall time", c.changes),
        format!(
            "{:.2} s, {:.0} changes/s; {} requests at {:.2}/s",
            c.secs, c.changes_per_sec, c.requests, c.requests_per_sec
        ),
        &format!("near the client's rate ({:.0} requests/s)", rate_limit(&c.crm)),
        Some(c.exit_code == 0 && c.requests_per_sec >= 0.8 * rate_limit(&c.crm)),
    ));
    if c.crm == "amocrm" {
        rows.push(row(
            "Funnel catch-up, AmoCRM: events pages (`GET /api/v4/events`), and responsible-user reads",
            format!(
                "{} pages over {} windows ({:.1} events a page) + {} reads of `GET /api/v4/leads`",
                c.reads,
                c.windows,
                c.changes as f64 / c.reads.max(1) as f64,
                c.responsible
            ),
            &format!(
                "≤ {} pages: {} of 100 events, one partial page a window",
                c.reads_ceiling + c.windows,
                c.reads_ceiling
            ),
            Some(c.reads > 0 && c.reads <= c.reads_ceiling + c.windows),
        ));
    } else {
        rows.push(row(
            "Funnel catch-up, Bitrix24: stream-read commands (`crm.stagehistory.list`, `>ID`)",
            format!("{} ({:.1} records a command)", c.reads, c.changes as f64 / c.reads.max(1) as f64),
            &format!("near {} (50 records a command; ≥ 45)", c.reads_ceiling),
            Some(c.reads > 0 && c.changes as f64 / c.reads as f64 >= 45.0),
        ));
        let ceiling = c.reads_ceiling.div_ceil(crate::funnel::B24_COMMANDS_PER_BATCH);
        // Batches a backlog's reads take before they chain a whole batch.
        const RAMP: usize = 6;
        rows.push(row(
            "Funnel catch-up, Bitrix24: `batch` requests, and commands a batch",
            format!(
                "{} ({} reading the stream, {} of responsible users and look-backs); {:.2} commands a batch",
                c.batches,
                c.read_batches,
                c.batches - c.read_batches,
                c.commands as f64 / c.batches.max(1) as f64
            ),
            &format!(
                "near {ceiling} stream-read batches at 50 commands, after the ramp of {RAMP} (1, 2, 4, … 32 \
                 chained pages while they come back full; an idle poll is one command)"
            ),
            Some(c.read_batches <= ceiling + RAMP),
        ));
    }
    rows.push(row(
        format!("Funnel catch-up, {name}: rows in `crm_stage_changes` for the {} changes", c.changes),
        format!(
            "{} ({} distinct; {} missing, {} strays; {} moves without a from-stage)",
            c.rows, c.distinct_sources, c.missing, c.strays, c.moves_without_from
        ),
        &format!("{}, 0 duplicates", c.changes),
        Some(
            c.rows == c.changes
                && c.distinct_sources == c.rows
                && c.missing == 0
                && c.strays == 0
                && c.moves_without_from == 0,
        ),
    ));
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "—",
    }
}

fn load(l: &[f64; 3]) -> String {
    format!("{:.2} / {:.2} / {:.2}", l[0], l[1], l[2])
}

pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let o = &r.options;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Measured, not assumed: every figure below comes from one run of `{COMMAND}` \
         (generated file; rerun the command rather than editing it). Run on {} UTC, {} minutes.\n",
        r.started_at.format("%Y-%m-%d %H:%M"),
        (r.finished_at - r.started_at).num_minutes()
    );
    if !r.full_run {
        let concurrency = o.concurrency.map_or_else(|| "the daemon's default".to_owned(), |n| n.to_string());
        let _ = writeln!(
            md,
            "> **Not the documented full run**: phases {:?}, tenants {:?}, idle {} s, idle timeout {} s, {} edits, \
             latency {} ms, {} runbook runs, {} tenants on one portal, {} delivery tenants, {} latency leads at \
             poll {} s, {} funnel tenants at poll {} s, {} changes a catch-up, concurrency {concurrency}.\n",
            o.phases,
            o.tenants,
            o.idle_secs,
            o.idle_timeout_secs,
            o.edits,
            o.latency_ms,
            o.runbook_runs,
            o.portal_tenants,
            o.delivery_tenants,
            o.delivery_latency_leads,
            o.delivery_poll_secs,
            o.funnel_tenants,
            o.funnel_poll_secs,
            o.funnel_changes
        );
    }

    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(md, "| Measure | Result | Target | |\n| --- | --- | --- | --- |");
    for row in rows(r) {
        let _ = writeln!(md, "| {} | {} | {} | {} |", row.measure, row.result, row.target, met(row.met));
    }

    let m = &r.machine;
    let _ = writeln!(md, "\n## Machine\n");
    let _ = writeln!(md, "| | |\n| --- | --- |");
    let _ = writeln!(md, "| CPUs (`nproc`) | {} |", m.nproc);
    let _ = writeln!(md, "| CPU model | {} |", m.cpu_model);
    let _ = writeln!(md, "| RAM | {:.1} GiB |", m.ram_mib as f64 / 1024.0);
    let _ = writeln!(md, "| Kernel | Linux {} |", m.kernel);
    let _ =
        writeln!(md, "| Database | {} ({} throwaway cluster(s), max_connections 300 each) |", m.postgres, r.clusters);
    let _ = writeln!(md, "| Compiler | {} (release profile) |", m.rustc);
    let _ = writeln!(md, "| Code measured | {} |", r.revision);
    let _ = writeln!(md, "| Load average (1 / 5 / 15 min) before the run | {} |", load(&r.load_before));
    let _ = writeln!(md, "| Load average after the run | {} |", load(&r.load_after));

    let _ = writeln!(md, "\n## Details\n");
    let _ = writeln!(md, "### Cold start\n");
    let _ = writeln!(
        md,
        "| Tenants (AmoCRM + Bitrix24) | All connected | Mean reconcile | CRM part of a reconcile, AmoCRM / Bitrix24 \
         | Last tenant's first request | CPU until then: daemon / PostgreSQL / harness (machine busy) | RSS then / peak \
         | Connections busy: per tenant / total | Connections after idle timeout | Idle CPU | Requests until connected, AmoCRM / Bitrix24 \
         | Verified in the database | Threads / fds | Load before |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for c in &r.cold_starts {
        let _ = writeln!(
            md,
            "| {} ({} + {}) | {} | {:.3} s | {:.3} / {:.3} s | {:.2} s | {:.2} / {:.2} / {:.2} s ({:.0} % of {} CPUs) | {:.1} / {:.1} MB | {} / {} | {} (after {:.0} s) | {:.2} % over {} s{} \
             | {} / {} | {} | {} / {} | {} |",
            c.tenants,
            c.amocrm_tenants,
            c.bitrix24_tenants,
            secs(c.reconciled_secs),
            c.mean_reconcile_secs,
            c.amocrm_mean_crm_secs,
            c.bitrix24_mean_crm_secs,
            c.last_first_request_secs,
            c.cpu_secs_until_reconciled,
            c.postgres_cpu_secs,
            c.harness_cpu_secs,
            c.machine_busy_percent,
            r.machine.nproc,
            c.rss_at_reconciled_mb,
            c.peak_rss_mb,
            c.busy_connections_per_tenant,
            c.busy_connections_total,
            c.idle_connections,
            c.idle_check_after_secs,
            c.idle_cpu_percent,
            c.idle_secs,
            if c.resync_in_idle { " (a scheduled resync of every tenant included)" } else { "" },
            c.requests_amocrm,
            c.requests_bitrix24,
            c.verified_tenants,
            c.threads,
            c.open_fds,
            load(&c.load_before),
        );
    }

    let _ = writeln!(
        md,
        "\nRestart: a second `crm-connect run` on the same files and databases once the first has stopped \
         (migrations done, tokens and stages stored; AmoCRM: account and pipelines, no code exchange).\n"
    );
    let _ = writeln!(
        md,
        "| Tenants | Cold start | Restart | Mean reconcile, cold / restart | PostgreSQL CPU per tenant, cold / restart \
         | Daemon CPU, cold / restart | Machine busy, cold / restart |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    for c in &r.cold_starts {
        let n = c.tenants.max(1) as f64;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} / {:.3} s | {:.1} / {:.1} ms | {:.2} / {:.2} s | {:.0} / {:.0} % |",
            c.tenants,
            secs(c.reconciled_secs),
            secs(c.restart.reconciled_secs),
            c.mean_reconcile_secs,
            c.restart.mean_reconcile_secs,
            c.postgres_cpu_secs / n * 1000.0,
            c.restart.postgres_cpu_secs / n * 1000.0,
            c.cpu_secs_until_reconciled,
            c.restart.daemon_cpu_secs,
            c.machine_busy_percent,
            c.restart.machine_busy_percent,
        );
    }

    if let Some((c, floor)) = &r.one_server {
        let n = c.tenants.max(1) as f64;
        let _ = writeln!(md, "\n### One stock server\n");
        let _ = writeln!(
            md,
            "Every tenant database on ONE cluster at PostgreSQL's default `max_connections = 100`, \
             `crm-connect run` with default flags (`--db-connections 10`, `--concurrency 32`).\n"
        );
        let _ = writeln!(
            md,
            "| Tenants (AmoCRM + Bitrix24) | First start | Restart | Connection errors | Connections at once | \
             Connections after idle | PostgreSQL sessions per tenant, first / restart | \
             PostgreSQL CPU per tenant, first / restart | Daemon CPU, first / restart | \
             RSS then / peak | Idle CPU | Verified |"
        );
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let _ = writeln!(
            md,
            "| {} ({} + {}) | {} | {} | {} | {} | {} | {:.2} / {:.2} | {:.1} / {:.1} ms | {:.2} / {:.2} s | {:.1} / {:.1} MB | {:.2} % over {} s | {} |",
            c.tenants,
            c.amocrm_tenants,
            c.bitrix24_tenants,
            secs(c.reconciled_secs),
            secs(c.restart.reconciled_secs),
            c.connection_errors,
            c.busy_connections_total,
            c.idle_connections,
            c.sessions as f64 / n,
            c.restart.sessions as f64 / n,
            c.postgres_cpu_secs / n * 1000.0,
            c.restart.postgres_cpu_secs / n * 1000.0,
            c.cpu_secs_until_reconciled,
            c.restart.daemon_cpu_secs,
            c.rss_at_reconciled_mb,
            c.peak_rss_mb,
            c.idle_cpu_percent,
            c.idle_secs,
            c.verified_tenants,
        );
        let cpus = r.machine.nproc.max(1) as f64;
        let _ = writeln!(
            md,
            "\nPostgreSQL's own share, measured on the same cluster afterwards with a plain client and no crm-connect \
             ({} databases): connecting to a fresh database and running the whole schema (every migration file, one \
             transaction) costs the server {:.1} ms of CPU; one session of one query on a migrated database {:.1} ms. \
             So {} tenants cannot start for the first time in less than {:.1} s of server CPU on {} CPUs before \
             crm-connect does anything else, nor restart in less than {:.1} s at {:.2} sessions per tenant.",
            floor.databases,
            floor.fresh_ms,
            floor.session_ms,
            c.tenants,
            n * floor.fresh_ms / 1000.0 / cpus,
            cpus,
            n * floor.session_ms * c.restart.sessions as f64 / n / 1000.0 / cpus,
            c.restart.sessions as f64 / n,
        );
    }

    if let Some(s) = &r.soak {
        let _ = writeln!(md, "\n### Soak\n");
        let _ = writeln!(
            md,
            "The daemon's work loop run {} times: {} tenants without a CRM whose database refuses at once (a closed \
             port), each resynced every second, so that the loop itself is measured (jobs queued, run, reaped and \
             recorded; timers re-armed) rather than PostgreSQL or a CRM. {:.0} s, {:.0} jobs/s, daemon CPU {:.1} s. \
             RSS {:.1} MB after {} jobs, {:.1} MB after {}.",
            s.end.0, s.tenants, s.secs, s.jobs_per_sec, s.daemon_cpu_secs, s.early.1, s.early.0, s.end.1, s.end.0
        );
    }

    let _ = writeln!(md, "\n### Edit latency\n");
    match &r.edits {
        Some(e) => {
            let _ = writeln!(
                md,
                "{} edits of one Bitrix24 tenant's `qualified` stage (alternating `C1:PREPARATION` / `C1:EXECUTING`), \
                 {} tenants loaded, {} ms between edits: p50 {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms, \
                 mean {:.0} ms; {} lost; {} Bitrix24 requests per edit (median).",
                e.edits,
                e.tenants_loaded,
                e.gap_ms,
                e.p50_ms,
                e.p99_ms,
                e.min_ms,
                e.max_ms,
                e.mean_ms,
                e.lost,
                e.bitrix24_requests_per_edit
            );
        }
        None => {
            let _ = writeln!(md, "Not measured in this run.");
        }
    }

    let _ = writeln!(md, "\n### Requests per stage sync\n");
    if let Some(s) = &r.resync {
        let _ = writeln!(md, "One tenant of each CRM with `stage_resync = \"{}\"`.\n", s.cron);
        let _ = writeln!(md, "| | Connecting reconcile | Each scheduled resync |\n| --- | --- | --- |");
        let _ = writeln!(
            md,
            "| Bitrix24 | {} ({}) | {:?} ({}) |",
            s.bitrix24_connect_requests,
            calls(&s.bitrix24_connect_calls),
            s.bitrix24_per_resync,
            calls(&s.bitrix24_resync_calls)
        );
        let _ = writeln!(
            md,
            "| AmoCRM | {} ({}) | {:?} ({}) |",
            s.amocrm_connect_requests,
            calls(&s.amocrm_connect_calls),
            s.amocrm_per_resync,
            calls(&s.amocrm_resync_calls)
        );
        if !s.connect_done_before_first_resync {
            let _ = writeln!(
                md,
                "\nThe connecting reconcile was still running at the first resync: its count may include it."
            );
        }
    } else {
        let _ = writeln!(md, "Not measured in this run.");
    }

    let _ = writeln!(md, "\n### Runbook baseline\n");
    if let Some(b) = &r.runbook {
        let _ = writeln!(
            md,
            "One Bitrix24 tenant with {} categories (the default one, 0, included) of {} stages each; {} runs of each, \
         alternating which goes first, each on a fresh database.\n",
            b.categories,
            b.stages / b.categories.max(1) as usize,
            b.runs
        );
        let _ = writeln!(md, "| | `scripts/runbook.sh` | `crm-connect sync` |\n| --- | --- | --- |");
        let join = |v: &[f64]| v.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(md, "| Wall time, median | {:.3} s | {:.3} s |", b.runbook_median_secs, b.sync_median_secs);
        let _ = writeln!(md, "| Wall time, each run (s) | {} | {} |", join(&b.runbook_secs), join(&b.sync_secs));
        let _ = writeln!(md, "| Requests to the portal | {} | {} |", b.runbook_requests, b.sync_requests);
        let _ = writeln!(md, "| Processes (curl, psql) | {} + {} | 1 |", b.runbook_requests, b.runbook_psql_calls);
        let _ = writeln!(md, "| Stage rows written (of {}) | {} | {} |", b.stages, b.runbook_rows, b.sync_rows);
        let _ = writeln!(md, "| Rows of category 0 | {} | {} |", b.runbook_category0_rows, b.sync_category0_rows);
        let _ = writeln!(
            md,
            "| Flagged qualified / success / fail | {} / {} / {} | {} / {} / {} |",
            b.runbook_flagged[0],
            b.runbook_flagged[1],
            b.runbook_flagged[2],
            b.sync_flagged[0],
            b.sync_flagged[1],
            b.sync_flagged[2]
        );
        let _ = writeln!(
            md,
            "\nThe runbook lists pipelines with `crm.dealcategory.list`, which leaves out the default pipeline: \
         its {} stages of category 0 are never loaded (and the success / fail flags of category 0 have no row to \
         land on). Its webhook form without the user id (`/rest/CODE/METHOD`) is answered HTTP {} by the portal; \
         the script uses the URL with the user id. crm-connect's time includes the process start and the \
         migrations of a fresh database; the runbook's tables were created beforehand, untimed.",
            b.stages / b.categories.max(1) as usize,
            b.without_user_id_status
        );
    } else {
        let _ = writeln!(md, "Not measured in this run.");
    }

    let _ = writeln!(md, "\n### Rate-limit ceiling\n");
    if let Some(c) = &r.ceiling {
        let _ = writeln!(
            md,
            "{} tenant files with the same webhook, one `crm-connect sync` (exit code {}, {:.1} s): {} requests over \
         {:.1} s at the portal, {:.2} requests/s on average, {:.2}/s sustained after the client's burst of 10, at \
         most {} in any second; {} refused, {} violations of the portal's bucket (50 requests, draining 2/s); \
         {} of {} tenants connected.",
            c.tenants,
            c.exit_code,
            c.sync_secs,
            c.requests,
            c.span_secs,
            c.mean_per_sec,
            c.sustained_per_sec,
            c.peak_1s,
            c.refused,
            c.violations,
            c.connected_tenants,
            c.tenants
        );
    } else {
        let _ = writeln!(md, "Not measured in this run.");
    }

    let _ = writeln!(md, "\n### Lead delivery\n");
    match &r.delivery {
        Some(d) => delivery_details(&mut md, d, r.machine.nproc),
        None => {
            let _ = writeln!(md, "Not measured in this run.");
        }
    }

    let _ = writeln!(md, "\n### Funnel history\n");
    match &r.funnel {
        Some(f) => funnel_details(&mut md, f),
        None => {
            let _ = writeln!(md, "Not measured in this run.");
        }
    }

    let _ = writeln!(md, "\n## Method\n");
    let method = [
        format!(
            "The harness (`examples/bench.rs`) builds the release binary with `cargo build --release --bin \
             crm-connect` and runs it as a child process. The CRMs are the crate's sandboxes, in the harness \
             process on loopback, each answering every request after {} ms; PostgreSQL is the crate's throwaway \
             cluster (`fsync=off`), {} of them, so that {} tenants at 2 connections each stay under each cluster's \
             300 connections. Harness, sandboxes, databases and daemon share the machine.",
            o.latency_ms,
            r.clusters,
            r.cold_starts.iter().map(|c| c.tenants).max().unwrap_or(0)
        ),
        "Cold start: half the tenants AmoCRM, each its own account (its own sandbox, so the client's per-account \
         request budget applies to each) connecting with a fresh authorization code; half Bitrix24, each its own \
         portal with 8 deal categories of 6 stages. Each tenant has its own fresh database. The time runs from \
         spawning `crm-connect run --listen …` until `/metrics` (polled every 25 ms) reports \
         `crm_connect_tenants{state=\"connected\"} N`: a tenant is counted once its reconcile, stage sync included, \
         has succeeded. Afterwards every tenant's `crm_connect_status` row is checked (connected, stages counted)."
            .to_owned(),
        "Memory is VmHWM from `/proc/<pid>/status` at the end of the idle period; CPU is utime + stime from \
         `/proc/<pid>/stat`. Idle CPU is the daemon's CPU time over the period that starts when all tenants are \
         connected, as a percentage of one core. The tenants keep the default `stage_resync` (every 15 minutes, \
         on the quarter hour): an idle period across a quarter hour includes one resync of every tenant, and the \
         table says so."
            .to_owned(),
        format!(
            "Connections: `pg_stat_activity` rows with `application_name = 'crm-connect'` on the tenants' databases, \
             sampled every 50 ms from the spawn until all are connected (highest count on one database, and highest \
             total); then counted once more {} s after all were connected: the pool's idle timeout ({} s) plus the \
             reaper's half-interval ({} s) plus 2 s.",
            o.idle_timeout_secs + o.idle_timeout_secs / 2 + 2,
            o.idle_timeout_secs,
            o.idle_timeout_secs / 2
        ),
        "Edit latency, on the largest cold start's daemon after its idle period: the file is written aside and \
         renamed over the tenant file (as editors save); the clock starts just before the rename and stops when \
         a query (every 2 ms) sees the new stage flagged `is_qualified_stage` in the tenant's database. Edits are \
         1 s apart, so each edit's two Bitrix24 requests fit the client's 2 requests/s per portal."
            .to_owned(),
        "Requests per stage sync: counted by the sandboxes. The daemon is started just after a 5-second tick; \
         requests before the first tick belong to the connecting reconcile, those in each following 5-second \
         window to one scheduled resync."
            .to_owned(),
        "Runbook baseline: `scripts/runbook.sh` is the manual runbook's Bitrix24 sequence (config UPDATE; \
         `crm.dealcategory.list`, then `crm.dealcategory.stage.list?id=N` per category with one `psql … INSERT … \
         ON CONFLICT DO NOTHING` per stage; the flag UPDATEs in one psql call), with curl and psql, flagging the \
         same stages crm-connect flags. Against it, `crm-connect sync --config <file>` for the same portal, on a \
         fresh database. Wall time from spawn to exit."
            .to_owned(),
        "Rate-limit ceiling: one Bitrix24 sandbox with the cloud portal's leaky bucket (50 requests, draining 2/s); \
         the rate is taken from the sandbox's request log."
            .to_owned(),
        format!(
            "Lead delivery: {} tenants with `[leads]` at the default poll (30 s), half AmoCRM (each its own account), \
             half Bitrix24 deals (each its own portal), one more AmoCRM tenant for the latency, under `crm-connect run \
             --listen …`. Once all are connected, the harness opens a connection to each tenant database, then, all \
             at once, runs one INSERT of {} rows (title, contact name, phone, email) per tenant and after its commit \
             `POST /leads/wake?tenant=SLUG`. The time runs from the first row's `created_at` to the last row's \
             `delivered_at` (both PostgreSQL's clock); requests are counted by the sandboxes from the first INSERT on; \
             duplicates compare each CRM's leads or deals, by the delivery key they carry (AmoCRM's \"crm-connect key\" \
             field, Bitrix24's `ORIGIN_ID`), with the rows. Latency: insert → delivered from `created_at` and \
             `delivered_at` of each row; with a wake, each insert waits for the previous row's delivery and comes \
             {} ms after the previous wake (the daemon runs at most one extra pass per tenant per second); by the \
             poll, the tenant's `[leads].poll` is {} s and the inserts are about {} ms apart, spread over every phase \
             of the poll. Idle: the latency tenant's file removed, daemon and PostgreSQL CPU over {} s (a window \
             that would hold the quarter-hour stage resync starts once every tenant has resynced), \
             connections per second from the tenant databases' `pg_stat_database.sessions`.",
            o.delivery_tenants,
            crate::delivery::LEADS_PER_TENANT,
            r.delivery.as_ref().map_or(1000, |d| d.latency.wake_gap_ms),
            o.delivery_poll_secs,
            r.delivery.as_ref().map_or(500, |d| d.latency.poll_insert_gap_ms),
            o.idle_secs
        ),
        format!(
            "Funnel history, idle: {} tenants with `[funnel]` at `poll = \"{}s\"` (the configuration's default is \
             1 m), half AmoCRM (each its own account), half Bitrix24 deals (each its own portal, one stream), under \
             `crm-connect run --listen …`, nothing changing in the CRMs. The window of {} s (at least two polls) \
             opens once `/metrics` shows a lag series for every tenant (each stream's first poll has ended, its \
             cursor stored), after the quarter-hour stage resync when the window would hold it. Requests are the sandboxes' records within the window that are the funnel's (AmoCRM \
             `GET /api/v4/events` and `GET /api/v4/leads` by id; Bitrix24 `crm.stagehistory.list` and `batch`es of \
             only stage-history and `crm.item.list` commands); token refreshes and stage syncs are counted apart. A \
             tenant's requests less than half a poll apart are one poll. Daemon and PostgreSQL CPU from `/proc`, \
             connections from `pg_stat_database.sessions`; afterwards each tenant database is checked for its \
             cursor row.",
            o.funnel_tenants,
            o.funnel_poll_secs,
            o.idle_secs.max(2 * o.funnel_poll_secs)
        ),
        format!(
            "Funnel history, catch-up: one AmoCRM and one Bitrix24 tenant (deals), each its own sandbox. AmoCRM: {} \
             leads created, the sandbox clock moved on by the back-fill's days (at most {} changes a day, so that a \
             day's window stays under the 20 pages past which it is narrowed), then {} `lead_status_changed` events \
             dated evenly over those days, each lead's in order. Bitrix24 likewise: deals created (a creation record \
             each), the clock moved on, moves dated over the days, {} records in all. Both tenant files have \
             `since` = the day the deals were created; `crm-connect sync` connects them first (token, stages, \
             tables), then `crm-connect funnel --tenant SLUG` runs for each, timed from spawn to exit. Requests are \
             the sandbox's records of that run; rows are checked in `crm_stage_changes` against the sandbox's own \
             list of changes.",
            o.funnel_changes / crate::funnel::CHANGES_PER_ENTITY,
            1000,
            o.funnel_changes,
            o.funnel_changes
        ),
    ];
    for line in method {
        let _ = writeln!(md, "- {line}");
    }

    let _ = writeln!(md, "\n## Command\n");
    let _ = writeln!(md, "```sh\n{COMMAND}\n```\n");
    let _ = writeln!(
        md,
        "It needs the PostgreSQL server binaries (`initdb`, `postgres`), bash, curl, psql and jq (or python3). \
         Settings, as flags after `--` or environment variables: `BENCH_LATENCY_MS` (30), `BENCH_TENANTS` \
         (10,100,500), `BENCH_IDLE_SECS` (60), `BENCH_IDLE_TIMEOUT_SECS` (30), `BENCH_EDITS` (100), \
         `BENCH_RUNBOOK_RUNS` (5), `BENCH_PORTAL_TENANTS` (20), `BENCH_ONE_SERVER_TENANTS` (1000), \
         `BENCH_SOAK_TENANTS` (5000), `BENCH_SOAK_JOBS` (1000000), `BENCH_DELIVERY_TENANTS` (500), \
         `BENCH_DELIVERY_LATENCY_LEADS` (100), `BENCH_DELIVERY_POLL_SECS` (5), `BENCH_FUNNEL_TENANTS` (500), \
         `BENCH_FUNNEL_POLL_SECS` (10), `BENCH_FUNNEL_CHANGES` (10000), \
         `BENCH_PHASES` (cold,edits,resync,runbook,ceiling,one-server,soak,delivery,funnel), \
         `BENCH_CONCURRENCY` (the daemon's own), `BENCH_MAX_LOAD` (wait for a lower load average first), \
         `BENCH_LOGS` (keep the daemons' logs there), `BENCH_OUT` (where the two files go). A quick run: `BENCH_TENANTS=10,100 BENCH_IDLE_SECS=5 \
         BENCH_IDLE_TIMEOUT_SECS=5 BENCH_EDITS=20 BENCH_OUT=/tmp/bench {COMMAND}`."
    );
    md
}

fn delivery_details(md: &mut String, d: &Delivery, nproc: usize) {
    let calls = |map: &std::collections::BTreeMap<String, usize>| {
        map.iter().map(|(name, n)| format!("{name} × {n}")).collect::<Vec<_>>().join(", ")
    };
    let states = d.states.iter().map(|(state, rows)| format!("{rows} {state}")).collect::<Vec<_>>().join(", ");
    let _ = writeln!(
        md,
        "{} tenants ({} AmoCRM + {} Bitrix24 deals) × {} leads = {} rows, inserted at once with a wake per tenant \
         ({:.2} s until every INSERT had committed and every wake been answered; {} wakes not answered 202). \
         First INSERT → last delivered: {}; the harness saw `/metrics` count them all after {}. Rows now: {states}. \
         Each row's insert → delivered in the burst: p50 {:.2} s, p99 {:.2} s, max {:.2} s. CPU meanwhile: daemon \
         {:.2} s, PostgreSQL {:.2} s ({} CPUs).\n",
        d.tenants,
        d.amocrm_tenants,
        d.bitrix24_tenants,
        d.leads_per_tenant,
        d.rows,
        d.inserted_secs,
        d.wakes_not_202,
        secs(d.all_delivered_secs),
        secs(d.seen_delivered_secs),
        d.burst.p50_ms / 1000.0,
        d.burst.p99_ms / 1000.0,
        d.burst.max_ms / 1000.0,
        d.daemon_cpu_secs,
        d.postgres_cpu_secs,
        nproc,
    );
    let _ = writeln!(md, "| | AmoCRM | Bitrix24 (deals) |\n| --- | --- | --- |");
    let _ = writeln!(md, "| Rows | {} | {} |", d.amocrm_rows, d.bitrix24_rows);
    let _ = writeln!(
        md,
        "| Create requests per lead | {:.2} (`POST /api/v4/leads/complex`) | {:.2} (`batch`: contact + deal) |",
        d.amocrm_creates_per_lead, d.bitrix24_batches_per_deal
    );
    let _ = writeln!(
        md,
        "| All requests per lead | {:.2} | {:.2} |",
        d.amocrm_requests_per_lead, d.bitrix24_requests_per_deal
    );
    let _ = writeln!(md, "| Requests, all tenants | {} | {} |", calls(&d.amocrm_calls), calls(&d.bitrix24_calls));
    let _ = writeln!(
        md,
        "\nIn the CRMs: {} leads and deals for {} rows; {} duplicates (an entity beyond the first with its key), \
         {} strays (no key, or one that is no row's), {} rows whose key no entity carries, {} delivered rows whose \
         `crm_entity_id` is not their entity's; the Bitrix24 portals counted {} creations (a contact and a deal \
         per row). {} rate-limit violations over the phase.\n",
        d.crm_entities,
        d.rows,
        d.duplicates,
        d.strays,
        d.missing,
        d.mismatched_ids,
        d.bitrix24_sandbox_creates,
        d.violations
    );
    let l = &d.latency;
    let _ = writeln!(
        md,
        "| Insert → delivered, one AmoCRM tenant, {} loaded | Leads | p50 | p99 | min | max | mean | Lost |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |",
        l.tenants_loaded
    );
    for (how, x) in [
        (format!("A wake after each insert, {} ms between wakes", l.wake_gap_ms), &l.wake),
        (
            format!("The poll alone (`poll = \"{}s\"`), inserts ~{} ms apart", l.poll_secs, l.poll_insert_gap_ms),
            &l.poll,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {how} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
            x.leads, x.p50_ms, x.p99_ms, x.min_ms, x.max_ms, x.mean_ms, x.lost
        );
    }
    let i = &d.idle;
    let _ = writeln!(
        md,
        "\nIdle, everything delivered, {} tenants at `poll = \"{}s\"` over {:.0} s: daemon CPU {:.2} % of one core \
         (RSS {:.1} MB); PostgreSQL CPU {:.2} s ({:.2} % of one core); {} sessions opened to the tenant databases \
         ({:.1} per second, {:.2} per tenant per poll); {} of the daemon's connections open at the end.",
        i.tenants,
        i.poll_secs,
        i.window_secs,
        i.daemon_cpu_percent,
        i.rss_mb,
        i.postgres_cpu_secs,
        i.postgres_cpu_percent,
        i.sessions,
        i.sessions_per_sec,
        i.sessions_per_sec * i.poll_secs as f64 / i.tenants.max(1) as f64,
        i.connections_at_end
    );
    let _ = writeln!(
        md,
        "\nThe floor under that figure: the contract has each idle poll open a connection of its own and close \
         it when its one statement is done (a daemon with nothing to do holds no connection). One such \
         connection — opened through the daemon's pool and connector, the outbox summary, closed — costs {:.3} ms \
         of CPU here ({} in a row, measured in the harness after the window), {:.2} % of one core at {:.1} per \
         second. Opened one after another like this, each connection wakes its thread for every answer; the \
         daemon starts the polls due in the same second together (its one-second poll grid), so their answers \
         share wake-ups and a connection costs it less than here.",
        i.connection_cpu_ms,
        crate::delivery::CONNECTION_SAMPLES,
        i.connection_floor_percent,
        i.sessions_per_sec
    );
}

fn funnel_details(md: &mut String, f: &Funnel) {
    let calls = |map: &std::collections::BTreeMap<String, usize>| {
        if map.is_empty() {
            "none".to_owned()
        } else {
            map.iter().map(|(name, n)| format!("{name} × {n}")).collect::<Vec<_>>().join(", ")
        }
    };
    let spread = |map: &std::collections::BTreeMap<usize, usize>| {
        map.iter().map(|(requests, polls)| format!("{polls} with {requests}")).collect::<Vec<_>>().join(", ")
    };
    let i = &f.idle;
    let _ = writeln!(
        md,
        "{} tenants ({} AmoCRM + {} Bitrix24 deals) at `poll = \"{}s\"`: every stream had been polled once {:.2} s \
         after the spawn; then {:.0} s without changes. {} of {} tenant databases hold their cursor row; {} tenants \
         made no funnel request in the window.\n",
        i.tenants,
        i.amocrm.tenants,
        i.bitrix24.tenants,
        i.poll_secs,
        i.all_polled_secs,
        i.window_secs,
        i.cursors,
        i.tenants,
        i.tenants_not_polled
    );
    let _ = writeln!(md, "| Idle, per tenant-poll | AmoCRM | Bitrix24 |\n| --- | --- | --- |");
    let (a, b) = (&i.amocrm, &i.bitrix24);
    let _ = writeln!(md, "| Polls seen | {} | {} |", a.polls, b.polls);
    let _ = writeln!(
        md,
        "| Funnel requests | {} ({}) | {} ({}) |",
        a.requests,
        calls(&a.calls),
        b.requests,
        calls(&b.calls)
    );
    let _ = writeln!(
        md,
        "| Requests a poll: mean (min–max) | {:.2} ({}–{}) | {:.2} ({}–{}) |",
        a.requests_per_poll, a.min_per_poll, a.max_per_poll, b.requests_per_poll, b.min_per_poll, b.max_per_poll
    );
    let _ = writeln!(md, "| Polls by requests | {} | {} |", spread(&a.per_poll), spread(&b.per_poll));
    let _ = writeln!(
        md,
        "| Polls a tenant (min–max) | {}–{} | {}–{} |",
        a.min_polls_per_tenant, a.max_polls_per_tenant, b.min_polls_per_tenant, b.max_polls_per_tenant
    );
    let _ = writeln!(
        md,
        "| Poll to poll: min / p50 / max | {:.2} / {:.2} / {:.2} s | {:.2} / {:.2} / {:.2} s |",
        a.interval_min_secs,
        a.interval_p50_secs,
        a.interval_max_secs,
        b.interval_min_secs,
        b.interval_p50_secs,
        b.interval_max_secs
    );
    for (crm, counts) in [("AmoCRM", a), ("Bitrix24", b)] {
        for sample in &counts.samples {
            let _ = writeln!(md, "\n{crm} poll of {} requests: `{}`", sample.len(), sample.join("`, `"));
        }
    }
    let _ = writeln!(
        md,
        "\nOther requests in the window, left out above: {}. Daemon CPU {:.2} % of one core ({:.2} ms a poll; at the \
         default poll of {} s that is {:.2} %), RSS {:.1} MB; PostgreSQL CPU {:.2} s ({:.2} % of one core); {} \
         sessions opened to the tenant databases ({:.1} per second, {:.2} a poll); {} of the daemon's connections open \
         at the end. {} rate-limit violations.\n",
        calls(&i.other_calls),
        i.daemon_cpu_percent,
        i.cpu_ms_per_poll,
        crate::funnel::DEFAULT_POLL_SECS,
        i.default_poll_cpu_percent,
        i.rss_mb,
        i.postgres_cpu_secs,
        i.postgres_cpu_percent,
        i.sessions,
        i.sessions_per_sec,
        i.sessions_per_poll,
        i.connections_at_end,
        i.violations
    );
    if f.catch_up.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "| Catch-up (`crm-connect funnel --tenant SLUG`) | {} |\n| --- |{}",
        f.catch_up.iter().map(|c| crm_name(&c.crm)).collect::<Vec<_>>().join(" | "),
        " --- |".repeat(f.catch_up.len())
    );
    let line = |md: &mut String, label: &str, value: &dyn Fn(&CatchUp) -> String| {
        let values: Vec<String> = f.catch_up.iter().map(value).collect();
        let _ = writeln!(md, "| {label} | {} |", values.join(" | "));
    };
    line(md, "Changes, entities, days, `since`", &|c| {
        format!("{} on {} entities over {} days from {}", c.changes, c.entities, c.days, c.since)
    });
    line(md, "Exit code, ingested as printed", &|c| {
        format!("{}, {}", c.exit_code, c.reported.map_or("—".to_owned(), |n| n.to_string()))
    });
    line(md, "Wall time, changes per second", &|c| format!("{:.2} s, {:.0} /s", c.secs, c.changes_per_sec));
    line(md, "Requests, rate (the client's limit)", &|c| {
        format!("{} at {:.2}/s ({:.0}/s)", c.requests, c.requests_per_sec, rate_limit(&c.crm))
    });
    line(md, "Requests by call", &|c| calls(&c.calls));
    line(md, "Stream reads (ceiling at the page size)", &|c| {
        format!(
            "{} ({:.1} changes a read; ceiling {})",
            c.reads,
            c.changes as f64 / c.reads.max(1) as f64,
            c.reads_ceiling
        )
    });
    line(md, "Responsible-user reads, look-backs, stream starts", &|c| {
        format!("{}, {}, {}", c.responsible, c.look_backs, c.starts)
    });
    line(md, "Batches: all, reading the stream; commands a batch", &|c| match c.batches {
        0 => "—".to_owned(),
        n => format!("{n}, {}; {:.2}", c.read_batches, c.commands as f64 / n as f64),
    });
    line(md, "Rows: all, distinct sources, missing, strays", &|c| {
        format!("{}, {}, {}, {}", c.rows, c.distinct_sources, c.missing, c.strays)
    });
    line(md, "Moves without a from-stage, rows without a responsible user", &|c| {
        format!("{}, {}", c.moves_without_from, c.rows_without_responsible)
    });
    line(md, "AmoCRM windows read", &|c| if c.crm == "amocrm" { c.windows.to_string() } else { "—".to_owned() });
    line(md, "Refused (429), rate-limit violations in the run / with the connecting sync", &|c| {
        format!("{}, {} / {}", c.refused, c.violations, c.violations_in_all)
    });
}

pub fn json(r: &Results) -> Value {
    let mut value = serde_json::to_value(r).unwrap_or_else(|e| json!({ "error": e.to_string() }));
    value["command"] = json!(COMMAND);
    value["targets"] = serde_json::to_value(rows(r)).unwrap_or(Value::Null);
    value
}

/// The results table as plain text, for the terminal.
pub fn summary(r: &Results) -> String {
    let mut text = String::new();
    for row in rows(r) {
        let _ = writeln!(text, "{:<90} {:<40} {:<18} {}", row.measure, row.result, row.target, met(row.met));
    }
    text
}
