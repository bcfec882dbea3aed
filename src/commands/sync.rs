//! `crm-connect sync`: reconcile every tenant once, concurrently (bounded),
//! report each, exit 1 if any failed. A failing tenant never stops another.

use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::apply::apply_tenant;
use crate::cli::{GlobalArgs, SyncArgs};
use crate::config;
use crate::db::{PoolSettings, Pools};

pub async fn run(global: &GlobalArgs, args: &SyncArgs) -> ExitCode {
    let loaded = config::load(&global.config, &super::load_options(global));
    let wanted = |slug: Option<&str>| args.tenant.as_deref().is_none_or(|t| slug == Some(t));
    let mut failed = false;
    for problem in loaded.problems.iter().filter(|p| p.is_error()) {
        println!("{problem}");
        failed = true;
    }
    for file in loaded.files.iter().filter(|f| wanted(f.slug.as_deref())) {
        for problem in &file.problems {
            println!("{problem}");
        }
        if file.tenant.is_none() {
            println!("{}: invalid configuration, not synced", file.name());
            failed = true;
        }
    }
    let tenants: Vec<_> = loaded.tenants().filter(|t| wanted(Some(&t.slug))).cloned().collect();
    if let Some(slug) = &args.tenant
        && loaded.files.iter().all(|f| f.slug.as_deref() != Some(slug))
    {
        println!("{slug}: no such tenant under {}", global.config.display());
        return ExitCode::FAILURE;
    }

    let pools = Pools::new(PoolSettings::default());
    let permits = Arc::new(Semaphore::new(global.concurrency.get()));
    let mut tasks = JoinSet::new();
    for tenant in tenants {
        let (pools, permits) = (pools.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let outcome = apply_tenant(&pools, &tenant).await;
            (tenant.slug, outcome)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(e) => {
                println!("a tenant's sync stopped unexpectedly: {e}");
                failed = true;
            }
        }
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    for (slug, outcome) in results {
        match outcome {
            Ok(applied) if applied.changed_columns.is_empty() => println!("{slug}: ok, nothing to change"),
            Ok(applied) => {
                let names: Vec<&str> = applied.changed_columns.iter().map(|c| c.name()).collect();
                println!("{slug}: ok, updated {}", names.join(", "));
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
