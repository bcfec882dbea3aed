//! A piece of a tenant's work (reconcile, stage resync, token refresh), run
//! as a task of its own that reports an [`Outcome`]; the end of a removed
//! tenant. It decides nothing about what comes next: that is the policy's.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::tenant::Work;
use crate::apply::{Applied, Report, apply_tenant, record_failure, resync_stages};
use crate::config::TenantConfig;
use crate::context::Context;
use crate::db;
use crate::failure::{Cause, Failure, FailureKind};
use crate::metrics::TenantState;
use crate::model::{Crm, CrmState};
use crate::tokens::{NextCheck, Owner};

/// A piece of work, with everything it needs (it runs in its own task).
pub(crate) struct Job {
    pub(crate) ctx: Context,
    pub(crate) config: TenantConfig,
    pub(crate) work: Work,
    /// The stage resync's last and next run, recorded in the database.
    pub(crate) schedule: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    /// The tenant is known to wait for authorisation already: a timed look
    /// that finds it still waiting records nothing.
    pub(crate) awaiting_authorization: bool,
}

/// What a piece of work did. A failure of the tenant as a whole (its
/// database before any CRM step, a panic) is each configured CRM's failure.
pub(crate) struct Outcome {
    pub(crate) work: Work,
    pub(crate) applied: Applied,
    pub(crate) elapsed: Option<Duration>,
    /// When the stored token needs a look next (`None`: unreadable).
    pub(crate) next_token_check: Option<NextCheck>,
    /// A pair obtained by this process waits to be stored.
    pub(crate) tokens_pending: bool,
    /// When the tenant's stages of each of its CRMs were last synced, as
    /// its database says after a reconcile or resync (empty if unread).
    pub(crate) stages_synced_at: Vec<(Crm, DateTime<Utc>)>,
}

impl Outcome {
    pub(crate) fn failures(&self) -> impl Iterator<Item = &Failure> {
        self.applied.crms.iter().filter_map(|(_, outcome)| outcome.as_ref().err())
    }

    /// The worst state of the tenant's CRMs.
    pub(crate) fn state(&self) -> TenantState {
        let worst =
            self.failures().map(Failure::state).fold(CrmState::Connected, |worst, state| match (worst, state) {
                (CrmState::Error, _) | (_, CrmState::Error) => CrmState::Error,
                (CrmState::NeedsAuthorization, _) | (_, CrmState::NeedsAuthorization) => CrmState::NeedsAuthorization,
                _ => worst,
            });
        TenantState::Is(worst)
    }
}

/// Every configured CRM failed with `cause`.
fn all_failed(config: &TenantConfig, cause: Cause) -> Applied {
    let crms = config.crms().into_iter().map(|crm| (crm, Err(cause.clone().of(crm)))).collect();
    Applied { changed_columns: Vec::new(), crms }
}

/// Aborts a task when dropped: work stopped from outside (a lost lease)
/// stops the task doing it.
struct AbortOnDrop(tokio::task::JoinHandle<Outcome>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Job {
    /// Runs the work in a task of its own, so that a bug (a panic) in one
    /// tenant's work ends as that tenant's `error` ("internal error: …"),
    /// retried with backoff, instead of a tenant that never runs again.
    /// The tenant's database connections are closed when it is done.
    pub(crate) async fn run_guarded(self) -> Outcome {
        let (ctx, config, work) = (self.ctx.clone(), self.config.clone(), self.work);
        let mut task = AbortOnDrop(tokio::spawn(self.run()));
        let outcome = match (&mut task.0).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let cause = Cause::new(FailureKind::Internal, format!("internal error: {}", panic_message(e)));
                let applied = all_failed(&config, cause);
                record_internal_error(&ctx, &config, &applied).await;
                Outcome {
                    work,
                    applied,
                    elapsed: None,
                    next_token_check: None,
                    tokens_pending: ctx.vault.contains(&config.slug),
                    stages_synced_at: Vec::new(),
                }
            }
        };
        ctx.pools.close_idle(&config.slug);
        outcome
    }

    async fn run(self) -> Outcome {
        let started = Instant::now();
        let (ctx, config) = (&self.ctx, &self.config);
        let applied = match self.work {
            Work::Reconcile => apply_tenant(ctx, config).await.unwrap_or_else(|e| all_failed(config, e.into())),
            Work::Resync => resync_stages(ctx, config).await.unwrap_or_else(|e| all_failed(config, e.into())),
            Work::Refresh => refresh(ctx, config, self.awaiting_authorization).await,
        };
        let next_token_check = match config.amocrm {
            Some(_) => next_token_check(ctx, config).await,
            None => None,
        };
        // `status` shows the next resync from the first reconcile on.
        let stages_synced_at = match self.work {
            Work::Resync | Work::Reconcile => after_sync(ctx, config, self.schedule).await,
            Work::Refresh => Vec::new(),
        };
        let tokens_pending = ctx.vault.contains(&config.slug);
        Outcome {
            work: self.work,
            applied,
            elapsed: Some(started.elapsed()),
            next_token_check,
            tokens_pending,
            stages_synced_at,
        }
    }
}

/// A timed refresh: only if due, under the row lock, as everywhere.
async fn refresh(ctx: &Context, config: &TenantConfig, awaiting_authorization: bool) -> Applied {
    let Some(amo) = &config.amocrm else { return Applied::default() };
    let outcome = match ctx.pools.get(&config.slug, &config.database_url) {
        Ok(db) => {
            let outcome = ctx
                .tokens()
                .refresh_if_due(Owner::of(config, amo, &db), None)
                .await
                .map(|_| Report::default())
                .map_err(|e| Cause::from(e).of(Crm::AmoCrm));
            // A long-lived token that expired, say, is recorded as such (once:
            // a timed look that finds it still waiting records nothing); a
            // failure that may pass is not an `error` while the token lives.
            if matches!(&outcome, Err(f) if f.kind == FailureKind::NeedsAuthorization) && !awaiting_authorization {
                record_failure(&config.slug, &db, &outcome).await;
            }
            outcome
        }
        Err(e) => Err(Cause::from(e).of(Crm::AmoCrm)),
    };
    Applied { changed_columns: Vec::new(), crms: vec![(Crm::AmoCrm, outcome)] }
}

async fn next_token_check(ctx: &Context, config: &TenantConfig) -> Option<NextCheck> {
    let db = ctx.pools.get(&config.slug, &config.database_url).ok()?;
    let amo = config.amocrm.as_ref()?;
    ctx.tokens().next_check(Owner::of(config, amo, &db)).await.ok()
}

/// Records the schedule and reads back when each CRM's stages were last
/// synced, in one session.
async fn after_sync(
    ctx: &Context,
    config: &TenantConfig,
    (last, next): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) -> Vec<(Crm, DateTime<Utc>)> {
    let Ok(db) = ctx.pools.get(&config.slug, &config.database_url) else { return Vec::new() };
    let Ok(session) = db.session().await else { return Vec::new() };
    if let Err(e) = db::schedule::write(&session, "stage_resync", last, next).await {
        tracing::debug!(tenant = %config.slug, error = %e, "cannot record the schedule");
    }
    let rows = match db::status::read_all(&session).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(tenant = %config.slug, error = %e, "cannot read when stages were synced");
            return Vec::new();
        }
    };
    let crms = config.crms();
    rows.into_iter()
        .filter_map(|row| Some((*crms.iter().find(|crm| crm.as_str() == row.crm)?, row.stages_synced_at?)))
        .collect()
}

/// A removed tenant's CRMs become `unmanaged`; nothing is deleted.
pub(crate) async fn mark_unmanaged(ctx: &Context, config: &TenantConfig) {
    let crms = [(Crm::AmoCrm, config.amocrm.is_some()), (Crm::Bitrix24, config.bitrix24.is_some())];
    let result = async {
        let session = ctx.pools.get(&config.slug, &config.database_url)?.session().await?;
        for (crm, _) in crms.iter().filter(|(_, on)| *on) {
            db::status::mark_unmanaged(&session, *crm).await?;
        }
        Ok::<_, crate::db::DbError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(tenant = %config.slug, error = %e, "cannot mark the tenant unmanaged");
    }
    ctx.pools.remove(&config.slug);
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
        Err(e) => e.to_string(),
    }
}

/// Best effort: the status rows of the tenant's CRMs say `error`.
async fn record_internal_error(ctx: &Context, config: &TenantConfig, applied: &Applied) {
    let Ok(db) = ctx.pools.get(&config.slug, &config.database_url) else { return };
    for (_, outcome) in &applied.crms {
        record_failure(&config.slug, &db, outcome).await;
    }
}
