//! `crm-connect funnel [--tenant SLUG]`: reads the stage changes of the
//! tenants with `[funnel]` into `crm_stage_changes` until every stream is
//! caught up, prints per tenant the rows it ingested and how far each
//! stream is complete, then exits; 1 if a tenant could not be read.

use std::process::ExitCode;

use chrono::SecondsFormat;

use crate::cli::{FunnelArgs, GlobalArgs};
use crate::context::Context;
use crate::db;
use crate::funnel::{self, PollReport};

pub async fn run(global: &GlobalArgs, args: &FunnelArgs) -> ExitCode {
    let tenants = match super::tenants_with(global, args.tenant.as_ref(), "funnel", |t| t.funnel.is_some()) {
        Ok(tenants) => tenants,
        Err(message) => {
            eprintln!("crm-connect: {message}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = Context::new(global.pool_settings());
    let outcome = super::settled(&ctx, async {
        let mut failed = false;
        for tenant in &tenants {
            let Some(funnel) = &tenant.funnel else { continue };
            let report = async {
                let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
                db::migrate(&db).await?;
                funnel::until_caught_up(&ctx, tenant, funnel).await
            }
            .await;
            match report {
                Ok(report) => println!("{}: {}", tenant.slug, summary(&report)),
                Err(cause) => {
                    failed = true;
                    println!("{}: error: {}", tenant.slug, cause.message);
                }
            }
            ctx.pools.close_idle(&tenant.slug);
        }
        if failed { Err("a tenant's funnel could not be read".to_string()) } else { Ok(()) }
    })
    .await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("crm-connect: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `12 rows ingested; amocrm lead_status_changed complete to 2026-12-03T10:00:00Z; …`
fn summary(report: &PollReport) -> String {
    let mut line = format!("{} rows ingested", report.ingested);
    for stream in &report.streams {
        let to = stream
            .complete_to
            .map_or_else(|| "not started".to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true));
        line.push_str(&format!("; {} complete to {to}", stream.stream));
    }
    line
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::funnel::StreamReport;
    use crate::model::{EntityType, Stream};

    #[test]
    fn one_line_names_the_rows_and_each_stream_complete_to() {
        let at = Utc.with_ymd_and_hms(2026, 12, 3, 10, 0, 0).single();
        let report = PollReport {
            ingested: 12,
            streams: vec![
                StreamReport { stream: Stream::AmoLeadStatusChanged, ingested: 5, complete_to: at, started: false },
                StreamReport {
                    stream: Stream::Bitrix24(EntityType::Deal),
                    ingested: 7,
                    complete_to: None,
                    started: false,
                },
            ],
            ..PollReport::default()
        };
        assert_eq!(
            summary(&report),
            "12 rows ingested; amocrm lead_status_changed complete to 2026-12-03T10:00:00Z; bitrix24 deal complete to not started"
        );
    }
}
