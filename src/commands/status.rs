//! `crm-connect status`: per tenant and CRM, what the tenant's database says
//! (state, token expiry, last stage sync, stage count, last error).

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::cli::{GlobalArgs, StatusArgs};
use crate::config;
use std::time::Duration;

use crate::db::status::StatusRow;
use crate::db::{self, Pools, config_row};
use crate::model::{Cursor, StoredTokens};
use crate::reconcile::tokens::{NextCheck, next_check};

#[derive(Serialize)]
struct Line {
    tenant: String,
    crm: String,
    state: String,
    token_expires_at: Option<DateTime<Utc>>,
    stages_synced_at: Option<DateTime<Utc>>,
    stage_count: Option<i32>,
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    /// The daemon's stage resync schedule: a next run in the past means it
    /// stopped firing.
    stage_resync_last_run: Option<DateTime<Utc>>,
    stage_resync_next_run: Option<DateTime<Utc>>,
    /// With `--lease`: the daemon process that runs this tenant now.
    lease_holder: Option<String>,
    /// Something the operator should know that is not an error.
    note: Option<String>,
    /// With `[leads]`, on the target CRM's line: the outbox by state.
    #[serde(skip_serializing_if = "Option::is_none")]
    leads: Option<LeadsLine>,
    /// With `[funnel]`: each of this CRM's streams, how far it is complete.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    funnel: Vec<StreamLine>,
}

#[derive(Serialize)]
struct StreamLine {
    stream: &'static str,
    /// Every stage change before it is in `crm_stage_changes`; none until
    /// the stream's first poll.
    complete_to: Option<DateTime<Utc>>,
    lag_seconds: Option<i64>,
}

#[derive(Serialize)]
struct LeadsLine {
    #[serde(flatten)]
    counts: db::lead_outbox::Counts,
    oldest_pending_age_seconds: Option<i64>,
}

impl Line {
    fn new(tenant: &str, crm: &str, state: &str) -> Line {
        Line {
            tenant: tenant.into(),
            crm: crm.into(),
            state: state.into(),
            token_expires_at: None,
            stages_synced_at: None,
            stage_count: None,
            last_success_at: None,
            last_error: None,
            last_error_at: None,
            stage_resync_last_run: None,
            stage_resync_next_run: None,
            lease_holder: None,
            note: None,
            leads: None,
            funnel: Vec::new(),
        }
    }
}

pub async fn run(global: &GlobalArgs, args: &StatusArgs) -> ExitCode {
    let loaded = config::load(&global.config, &config::LoadOptions::new(global.database_url_template.clone()));
    let pools = Pools::new(global.pool_settings());
    let mut lines = Vec::new();
    for file in loaded.files.iter().filter(|f| args.tenant.is_none() || f.slug == args.tenant) {
        let name = file.name();
        let Some(tenant) = &file.tenant else {
            let mut line = Line::new(&name, "-", "invalid_config");
            line.last_error = file.problems.iter().find(|p| p.is_error()).map(|p| p.to_string());
            lines.push(line);
            continue;
        };
        let mut crms = Vec::new();
        if tenant.amocrm.is_some() {
            crms.push("amocrm");
        }
        if tenant.bitrix24.is_some() {
            crms.push("bitrix24");
        }
        match read(&pools, tenant).await {
            Ok((rows, stored, schedule, holder, outbox, cursors)) => {
                for crm in crms {
                    let mut line = Line::new(&name, crm, "not_synced");
                    if let Some(row) = rows.iter().find(|r| r.crm == crm) {
                        line.state = row.state.clone();
                        line.stages_synced_at = row.stages_synced_at;
                        line.stage_count = row.stage_count;
                        line.last_success_at = row.last_success_at;
                        line.last_error = row.last_error.clone();
                        line.last_error_at = row.last_error_at;
                    }
                    if crm == "amocrm" {
                        line.token_expires_at = stored.expires_at;
                        line.note = margin_note(&stored, tenant.schedule.token_refresh_margin);
                    }
                    (line.stage_resync_last_run, line.stage_resync_next_run) = schedule;
                    line.lease_holder = holder.clone();
                    if tenant.leads.as_ref().is_some_and(|l| l.crm.as_str() == crm) {
                        line.leads = outbox.clone().map(|counts| LeadsLine {
                            oldest_pending_age_seconds: counts.oldest_pending.map(|at| (Utc::now() - at).num_seconds()),
                            counts,
                        });
                    }
                    line.funnel = tenant
                        .funnel_streams()
                        .into_iter()
                        .filter(|stream| stream.crm().as_str() == crm)
                        .map(|stream| {
                            let complete_to =
                                cursors.iter().find(|c| c.position.stream() == stream).and_then(|c| c.complete_to);
                            let lag_seconds = complete_to.map(|at| (Utc::now() - at).num_seconds().max(0));
                            StreamLine { stream: stream.name(), complete_to, lag_seconds }
                        })
                        .collect();
                    lines.push(line);
                }
            }
            Err(e) => {
                for crm in crms {
                    let mut line = Line::new(&name, crm, "unknown");
                    line.last_error = Some(e.clone());
                    lines.push(line);
                }
            }
        }
    }
    if args.json {
        match serde_json::to_string_pretty(&lines) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("crm-connect: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print_table(&lines);
    }
    ExitCode::SUCCESS
}

type Times = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);
type Read = (Vec<StatusRow>, StoredTokens, Times, Option<String>, Option<db::lead_outbox::Counts>, Vec<Cursor>);

/// The status rows, the AmoCRM token expiry, the resync schedule and the
/// lease holder; the tables may not exist yet.
async fn read(pools: &Pools, tenant: &config::TenantConfig) -> Result<Read, String> {
    let db = pools.get(&tenant.slug, &tenant.database_url).map_err(|e| e.to_string())?;
    let session = db.session().await.map_err(|e| e.to_string())?;
    let rows = match db::status::read_all(&session).await {
        Ok(rows) => rows,
        // Never synced: the tables are not there yet.
        Err(e) if e.is_missing_schema() => {
            return Ok((Vec::new(), StoredTokens::default(), (None, None), None, None, Vec::new()));
        }
        Err(e) => return Err(e.to_string()),
    };
    let stored = config_row::read_tokens(&session).await.unwrap_or_default();
    let schedule = db::schedule::read(&session, "stage_resync").await.ok().flatten().unwrap_or_default();
    let holder = db::lease::holder(&session).await.ok().flatten();
    let outbox = match tenant.leads {
        Some(_) => db::lead_outbox::counts(&session).await.ok(),
        None => None,
    };
    let cursors = match tenant.funnel {
        Some(_) => db::cursors::read_all(&session).await.unwrap_or_default(),
        None => Vec::new(),
    };
    Ok((rows, stored, schedule, holder, outbox, cursors))
}

/// Says so when the margin is not shorter than the token's lifetime (the
/// daemon then refreshes at half the lifetime).
fn margin_note(stored: &StoredTokens, margin: Duration) -> Option<String> {
    match next_check(stored, margin) {
        NextCheck::Refresh { capped: true, .. } => Some(format!(
            "token_refresh_margin ({}) is not shorter than the token lifetime: refreshed at half the token lifetime",
            humantime::format_duration(margin)
        )),
        _ => None,
    }
}

fn print_table(lines: &[Line]) {
    let time = |t: Option<DateTime<Utc>>| t.map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
    let rows: Vec<[String; 7]> = lines
        .iter()
        .map(|l| {
            [
                l.tenant.clone(),
                l.crm.clone(),
                l.state.clone(),
                time(l.token_expires_at),
                match (l.stages_synced_at, l.stage_count) {
                    (Some(at), Some(n)) => format!("{n} at {}", time(Some(at))),
                    _ => "-".into(),
                },
                time(l.stage_resync_next_run),
                l.last_error.as_ref().map_or("-".into(), |e| format!("{} ({})", e, time(l.last_error_at))),
            ]
        })
        .collect();
    let header = ["TENANT", "CRM", "STATE", "TOKEN EXPIRES", "STAGES", "NEXT RESYNC", "LAST ERROR"];
    super::stages::print_columns(&header, &rows);
    for line in lines {
        if let Some(note) = &line.note {
            println!("{} {}: note: {note}", line.tenant, line.crm);
        }
        if let Some(leads) = &line.leads {
            let c = &leads.counts;
            let oldest = leads.oldest_pending_age_seconds.map(|s| format!(", oldest pending {s}s")).unwrap_or_default();
            println!(
                "{} {}: leads: {} pending, {} sending, {} delivered, {} failed{oldest}",
                line.tenant, line.crm, c.pending, c.sending, c.delivered, c.failed
            );
        }
        for stream in &line.funnel {
            match (stream.complete_to, stream.lag_seconds) {
                (Some(at), Some(lag)) => println!(
                    "{} {}: funnel {}: complete to {}, lag {lag}s",
                    line.tenant,
                    line.crm,
                    stream.stream,
                    time(Some(at))
                ),
                _ => println!("{} {}: funnel {}: not started", line.tenant, line.crm, stream.stream),
            }
        }
    }
}
