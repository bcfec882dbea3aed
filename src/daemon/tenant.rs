//! One tenant inside the daemon: its configuration in force, what runs and
//! what waits, its timers; and the work itself (reconcile, stage resync,
//! token refresh), run as a task that reports an [`Outcome`].

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;

use super::Event;
use super::schedule::{refresh_delay, timer};
use crate::apply::{Applied, Failure, Report, apply_tenant, resync_stages};
use crate::config::TenantConfig;
use crate::context::Context;
use crate::db::queries;
use crate::model::{Crm, CrmState};
use crate::tokens;

/// Failed work is tried again after this, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What a tenant can be asked to do; a larger one includes the smaller
/// (a reconcile refreshes a due token and syncs stages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Work {
    Refresh,
    Resync,
    Reconcile,
}

pub(crate) struct Tenant {
    pub(crate) config: TenantConfig,
    pub(crate) digest: Option<[u8; 32]>,
    pub(crate) running: Option<Work>,
    pub(crate) queued: Option<Work>,
    /// The stage-resync expression this tenant is subscribed to.
    pub(crate) cron_expr: Option<String>,
    pub(crate) last_resync: Option<DateTime<Utc>>,
    pub(crate) next_resync: Option<DateTime<Utc>>,
    pub(crate) token_timer: Option<AbortHandle>,
    pub(crate) retry_timer: Option<AbortHandle>,
    retry_backoff: Duration,
    token_backoff: Duration,
    pub(crate) in_first_pass: bool,
    /// With `--lease`: whether this process runs the tenant, and when the
    /// lease was last renewed.
    pub(crate) holds_lease: bool,
    pub(crate) lease_renewed: Option<std::time::Instant>,
    /// For metrics: `pending` until the first outcome, then the worst CRM state.
    pub(crate) state: &'static str,
}

impl Tenant {
    pub(crate) fn new(config: TenantConfig) -> Tenant {
        Tenant {
            config,
            digest: None,
            running: None,
            queued: None,
            cron_expr: None,
            last_resync: None,
            next_resync: None,
            token_timer: None,
            retry_timer: None,
            retry_backoff: FIRST_BACKOFF,
            token_backoff: FIRST_BACKOFF,
            in_first_pass: false,
            holds_lease: false,
            lease_renewed: None,
            state: "pending",
        }
    }

    fn next_token_backoff(&mut self) -> Duration {
        let delay = self.token_backoff;
        self.token_backoff = (delay * 2).min(MAX_BACKOFF);
        delay
    }

    pub(crate) fn cancel_timers(&mut self) {
        for handle in [self.token_timer.take(), self.retry_timer.take()].into_iter().flatten() {
            handle.abort();
        }
    }

    /// Updates state and timers from a finished piece of work.
    pub(crate) fn after(&mut self, outcome: &Outcome, events: &UnboundedSender<Event>) {
        let slug = self.config.slug.clone();
        self.state = outcome.state();
        if matches!(outcome.work, Work::Reconcile | Work::Resync) {
            if outcome.transient() {
                let delay = self.retry_backoff;
                self.retry_backoff = (delay * 2).min(MAX_BACKOFF);
                tracing::warn!(tenant = %slug, retry_in = ?delay, "will try again");
                let retry = timer(delay, events.clone(), Event::Retry(slug.clone()));
                if let Some(old) = self.retry_timer.replace(retry) {
                    old.abort();
                }
            } else {
                self.retry_backoff = FIRST_BACKOFF;
            }
        }
        if self.config.amocrm.is_none() {
            return;
        }
        let amo_failure = outcome.crm_failure(Crm::AmoCrm);
        let delay = match (amo_failure, outcome.token_expires_at) {
            // No further attempts until a new code or token arrives.
            (Some(f), _) if f.state == CrmState::NeedsAuthorization => None,
            // A pair waiting in memory, a failure that may pass, or an expiry
            // that could not be read (database down): try again soon.
            (Some(f), _) if f.transient => Some(self.next_token_backoff()),
            _ if outcome.tokens_pending => Some(self.next_token_backoff()),
            (_, None) => Some(self.next_token_backoff()),
            (_, Some(expires_at)) => {
                self.token_backoff = FIRST_BACKOFF;
                Some(refresh_delay(expires_at, self.config.schedule.token_refresh_margin, Utc::now()))
            }
        };
        if let Some(delay) = delay {
            tracing::debug!(tenant = %slug, refresh_in = ?delay, "token refresh timer");
            let handle = timer(delay, events.clone(), Event::TokenDue(slug));
            if let Some(old) = self.token_timer.replace(handle) {
                old.abort();
            }
        }
    }
}

/// A piece of work, with everything it needs (it runs in its own task).
pub(crate) struct Job {
    pub(crate) ctx: Context,
    pub(crate) config: TenantConfig,
    pub(crate) work: Work,
    /// The stage resync's last and next run, recorded in the database.
    pub(crate) schedule: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
}

/// What a piece of work did.
pub(crate) struct Outcome {
    pub(crate) work: Work,
    pub(crate) applied: Result<Applied, (String, bool)>,
    pub(crate) elapsed: Option<Duration>,
    /// The stored token expiry after the work, to time the next refresh.
    pub(crate) token_expires_at: Option<DateTime<Utc>>,
    /// A refreshed pair is kept in memory, not yet stored.
    pub(crate) tokens_pending: bool,
}

impl Outcome {
    fn crm_failure(&self, crm: Crm) -> Option<&Failure> {
        let applied = self.applied.as_ref().ok()?;
        applied.crms.iter().find(|(c, _)| *c == crm).and_then(|(_, o)| o.as_ref().err())
    }

    fn transient(&self) -> bool {
        match &self.applied {
            Ok(applied) => applied.transient_failure(),
            Err((_, transient)) => *transient,
        }
    }

    fn state(&self) -> &'static str {
        let applied = match &self.applied {
            Ok(applied) => applied,
            Err(_) => return CrmState::Error.as_str(),
        };
        let failures: Vec<CrmState> =
            applied.crms.iter().filter_map(|(_, o)| o.as_ref().err().map(|f| f.state)).collect();
        if failures.contains(&CrmState::Error) {
            CrmState::Error.as_str()
        } else if failures.contains(&CrmState::NeedsAuthorization) {
            CrmState::NeedsAuthorization.as_str()
        } else {
            CrmState::Connected.as_str()
        }
    }
}

impl Job {
    pub(crate) async fn run(self) -> Outcome {
        let started = Instant::now();
        let (ctx, config) = (&self.ctx, &self.config);
        let applied = match self.work {
            Work::Reconcile => apply_tenant(ctx, config).await.map_err(|e| (e.to_string(), e.is_transient())),
            Work::Resync => resync_stages(ctx, config).await.map_err(|e| (e.to_string(), e.is_transient())),
            Work::Refresh => Ok(refresh(ctx, config).await),
        };
        if let Err((message, _)) = &applied {
            tracing::error!(tenant = %config.slug, error = %message, "work failed");
        }
        let token_expires_at = match config.amocrm {
            Some(_) => stored_expiry(ctx, config).await,
            None => None,
        };
        if self.work == Work::Resync {
            record_schedule(ctx, config, self.schedule).await;
        }
        let tokens_pending = ctx.pending.contains(&config.slug);
        Outcome { work: self.work, applied, elapsed: Some(started.elapsed()), token_expires_at, tokens_pending }
    }
}

/// A timed refresh: only if due, under the row lock, as everywhere.
async fn refresh(ctx: &Context, config: &TenantConfig) -> Applied {
    let Some(amo) = &config.amocrm else { return Applied::default() };
    let outcome = match ctx.pools.get(&config.slug, &config.database_url) {
        Ok(db) => tokens::refresh_if_due(ctx, &config.slug, &db, amo, config.schedule.token_refresh_margin, None)
            .await
            .map(|_| Report::default())
            .map_err(Failure::from),
        Err(e) => Err(Failure::from(e)),
    };
    if let Err(failure) = &outcome {
        tracing::warn!(tenant = %config.slug, crm = "amocrm", error = %failure.message, "token refresh failed");
    }
    Applied { changed_columns: Vec::new(), crms: vec![(Crm::AmoCrm, outcome)] }
}

async fn stored_expiry(ctx: &Context, config: &TenantConfig) -> Option<DateTime<Utc>> {
    let db = ctx.pools.get(&config.slug, &config.database_url).ok()?;
    let client = db.client().await.ok()?;
    queries::token_expiry(&**client).await.ok().flatten()
}

async fn record_schedule(
    ctx: &Context,
    config: &TenantConfig,
    (last, next): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) {
    let Ok(db) = ctx.pools.get(&config.slug, &config.database_url) else { return };
    let Ok(client) = db.client().await else { return };
    if let Err(e) = queries::write_schedule(&**client, "stage_resync", last, next).await {
        tracing::debug!(tenant = %config.slug, error = %e, "cannot record the schedule");
    }
}

/// A removed tenant's CRMs become `unmanaged`; nothing is deleted.
pub(crate) async fn mark_unmanaged(ctx: &Context, config: &TenantConfig) {
    let crms = [(Crm::AmoCrm, config.amocrm.is_some()), (Crm::Bitrix24, config.bitrix24.is_some())];
    let result = async {
        let db = ctx.pools.get(&config.slug, &config.database_url)?;
        let client = db.client().await?;
        for (crm, _) in crms.iter().filter(|(_, on)| *on) {
            queries::mark_unmanaged(&**client, *crm).await.map_err(|e| db.query_error("writing status", e))?;
        }
        Ok::<_, crate::db::DbError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(tenant = %config.slug, error = %e, "cannot mark the tenant unmanaged");
    }
    ctx.pools.remove(&config.slug);
}

/// At shutdown: one short try to store a refreshed pair kept in memory.
pub(crate) async fn store_pending_briefly(ctx: &Context, config: &TenantConfig) {
    if !ctx.pending.contains(&config.slug) {
        return;
    }
    let Ok(db) = ctx.pools.get(&config.slug, &config.database_url) else { return };
    let stored = tokio::time::timeout(Duration::from_secs(1), tokens::store_pending(ctx, &config.slug, &db)).await;
    if !matches!(stored, Ok(Ok(()))) {
        tracing::error!(tenant = %config.slug, "a refreshed token pair could not be stored before exit");
    }
}
