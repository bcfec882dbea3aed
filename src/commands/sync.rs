//! `crm-connect sync`: reconcile every tenant once, concurrently (bounded),
//! report each, exit 1 if any failed. A failing tenant never stops another.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::apply::preview::{Preview, StageChanges, preview_tenant};
use crate::apply::{Applied, apply_tenant};
use crate::cli::{GlobalArgs, SyncArgs};
use crate::config::{self, TenantConfig};
use crate::context::Context;

pub async fn run(global: &GlobalArgs, args: &SyncArgs) -> ExitCode {
    if args.dry_run {
        return dry_run(global, args).await;
    }
    let Some((tenants, mut failed)) = selected(global, args) else {
        return ExitCode::FAILURE;
    };
    let ctx = Context::new(global.pool_settings());
    let timeout = args.timeout;
    let sync = move |ctx: Context, tenant: TenantConfig| async move { sync_one(&ctx, &tenant, timeout).await };
    let (mut results, stopped) = tokio::select! {
        done = fan_out(&ctx, global, tenants, sync) => done,
        () = crate::daemon::signals() => {
            println!("interrupted");
            (Vec::new(), true)
        }
    };
    failed |= stopped;
    // Token requests cut off by the timeout are still running: their pairs
    // are stored before the process exits.
    for (slug, e) in ctx.tokens().settle(super::SETTLE_WITHIN).await {
        println!("{slug}: amocrm error: a token pair could not be stored and is lost: {e}");
        failed = true;
    }
    for (slug, outcome) in results.drain(..) {
        match outcome {
            Ok(applied) => {
                if applied.changed_columns.is_empty() {
                    println!("{slug}: ok, nothing to change");
                } else {
                    let names: Vec<&str> = applied.changed_columns.iter().map(|c| c.name()).collect();
                    println!("{slug}: ok, updated {}", names.join(", "));
                }
                for (crm, outcome) in &applied.crms {
                    match outcome {
                        Ok(report) => {
                            let changed = if report.stages_changed { "stages changed" } else { "stages unchanged" };
                            println!("{slug}: {crm} connected, {} stages, {changed}", report.stage_count);
                            if let Some(to) = &report.moved_to {
                                println!("{slug}: {crm} portal moved to {to}: update webhook_url");
                            }
                        }
                        Err(failure) => println!("{slug}: {crm} {}: {}", failure.state().as_str(), failure.message),
                    }
                }
                failed |= applied.failed();
            }
            Err(e) => {
                tracing::error!(tenant = %slug, error = %e, "sync failed");
                println!("{slug}: failed: {e}");
                failed = true;
            }
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// The valid tenants `--config` (and `--tenant`) select, with every problem
/// printed and whether any file was invalid; `None` for an unknown tenant.
fn selected(global: &GlobalArgs, args: &SyncArgs) -> Option<(Vec<TenantConfig>, bool)> {
    let loaded = config::load(&global.config, &config::LoadOptions::new(global.database_url_template.clone()));
    let wanted = |slug: Option<&str>| args.tenant.as_deref().is_none_or(|t| slug == Some(t));
    let mut invalid = false;
    for problem in loaded.problems.iter().filter(|p| p.is_error()) {
        println!("{problem}");
        invalid = true;
    }
    for file in loaded.files.iter().filter(|f| wanted(f.slug.as_deref())) {
        for problem in &file.problems {
            println!("{problem}");
        }
        if file.tenant.is_none() {
            println!("{}: invalid configuration, not synced", file.name());
            invalid = true;
        }
    }
    if let Some(slug) = &args.tenant
        && loaded.files.iter().all(|f| f.slug.as_deref() != Some(slug))
    {
        println!("{slug}: no such tenant under {}", global.config.display());
        return None;
    }
    Some((loaded.tenants().filter(|t| wanted(Some(&t.slug))).cloned().collect(), invalid))
}

/// Runs `work` for every tenant, at most `--concurrency` at once; a slow or
/// failing tenant delays no other. Results come back sorted by slug, and
/// whether any task stopped unexpectedly.
async fn fan_out<T, Fut>(
    ctx: &Context,
    global: &GlobalArgs,
    tenants: Vec<TenantConfig>,
    work: impl Fn(Context, TenantConfig) -> Fut + Clone + Send + 'static,
) -> (Vec<(String, T)>, bool)
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let permits = Arc::new(Semaphore::new(global.concurrency.get()));
    let mut tasks = JoinSet::new();
    for tenant in tenants {
        let (ctx, permits, work) = (ctx.clone(), permits.clone(), work.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let slug = tenant.slug.clone();
            (slug, work(ctx, tenant).await)
        });
    }
    let (mut results, mut stopped) = (Vec::new(), false);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(e) => {
                println!("a tenant's work stopped unexpectedly: {e}");
                stopped = true;
            }
        }
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    (results, stopped)
}

/// One tenant within `timeout`. A token request it started is not cut by
/// the timeout (`tokens::settle` waits for it before exit).
async fn sync_one(ctx: &Context, tenant: &TenantConfig, timeout: Duration) -> Result<Applied, String> {
    match tokio::time::timeout(timeout, apply_tenant(ctx, tenant)).await {
        Ok(applied) => applied.map_err(|e| e.to_string()),
        Err(_) => Err(format!("gave up after {}", humantime::format_duration(timeout))),
    }
}

/// `sync --dry-run`: per tenant, the changes a sync would make, read from the
/// databases and CRMs without writing anything. Exit 0 even when a tenant
/// cannot be previewed (its line says why); 1 only for an unknown `--tenant`.
async fn dry_run(global: &GlobalArgs, args: &SyncArgs) -> ExitCode {
    let Some((tenants, _)) = selected(global, args) else {
        return ExitCode::FAILURE;
    };
    let ctx = Context::new(global.pool_settings());
    let preview = |ctx: Context, tenant: TenantConfig| async move {
        let deadline = ctx.retry.deadline;
        match tokio::time::timeout(deadline, preview_tenant(&ctx, &tenant)).await {
            Ok(preview) => preview.map_err(|e| e.to_string()),
            Err(_) => Err(format!("gave up after {}s", deadline.as_secs())),
        }
    };
    let (mut results, _) = fan_out(&ctx, global, tenants, preview).await;
    for (slug, outcome) in results.drain(..) {
        match outcome {
            Ok(preview) => print_preview(&preview),
            Err(e) => println!("{slug}: cannot be previewed: {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// A block of lines per tenant. Column names only, never values.
fn print_preview(preview: &Preview) {
    let slug = &preview.slug;
    if preview.is_unchanged() {
        println!("{slug}: nothing would change");
        return;
    }
    if preview.creates_tables {
        println!("{slug}: would create the crm-connect tables");
    }
    if !preview.config_columns.is_empty() {
        let names: Vec<&str> = preview.config_columns.iter().map(|c| c.name()).collect();
        println!("{slug}: config: would update {}", names.join(", "));
    }
    if preview.tokens_cleared {
        println!("{slug}: config: would clear the stored AmoCRM tokens (the account or integration changed)");
    }
    for crm_preview in &preview.crms {
        let crm = crm_preview.crm;
        for action in &crm_preview.actions {
            println!("{slug}: {crm}: {action}");
        }
        for problem in &crm_preview.problems {
            println!("{slug}: {crm}: a sync would fail: {problem}");
        }
        match &crm_preview.stages {
            Err(why) => println!("{slug}: {crm}: {why}"),
            Ok(stages) => print_stage_changes(slug, &crm.to_string(), stages),
        }
    }
}

fn print_stage_changes(slug: &str, crm: &str, stages: &StageChanges) {
    if stages.is_empty() {
        println!("{slug}: {crm}: {} stages, unchanged", stages.stage_count);
    } else {
        let mut counts = vec![
            format!("{} {} added", stages.added.len(), plural(stages.added.len(), "stage", "stages")),
            format!("{} renamed", stages.changed.len()),
            format!("{} removed", stages.removed.len()),
        ];
        if !stages.restored.is_empty() {
            counts.push(format!("{} restored", stages.restored.len()));
        }
        let moved = stages.flags_moved.len();
        counts.push(format!("{moved} {} moved", plural(moved, "flag", "flags")));
        println!("{slug}: {crm}: {}", counts.join(", "));
        let lists: [(&str, &[String]); 5] = [
            ("+ ", &stages.added),
            ("~ ", &stages.changed),
            ("- ", &stages.removed),
            ("↺ ", &stages.restored),
            ("flags: ", &stages.flags_moved),
        ];
        for (mark, labels) in lists {
            for label in labels {
                println!("  {mark}{label}");
            }
        }
    }
    if let Some(error) = &stages.mapping_error {
        println!("{slug}: {crm}: {error}; a sync would keep the stored flags and fail");
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}
