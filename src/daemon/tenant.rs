//! One tenant inside the daemon: its configuration in force, what runs and
//! what waits, its timers; and the work itself (reconcile, stage resync,
//! token refresh), run as a task that reports an [`Outcome`]. A tenant
//! knows nothing of the others or of the loop's bookkeeping: it only hears
//! of its own outcomes and answers with timers that send events.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;

use super::Event;
use super::schedule::{delay_until, timer};
use crate::apply::{Applied, Report, apply_tenant, record_failure, resync_stages};
use crate::config::TenantConfig;
use crate::context::Context;
use crate::db;
use crate::failure::{Cause, Failure, FailureKind};
use crate::model::{Crm, CrmState};
use crate::tokens::{NextCheck, Owner};

/// Failed work is tried again after this, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A tenant waiting for authorisation looks at its stored tokens this often
/// (one query, no CRM call): `crm-connect authorize` in another process
/// stores a pair this daemon would otherwise not hear of.
const AUTHORIZATION_RECHECK: Duration = Duration::from_secs(600);

/// What a tenant can be asked to do; a larger one includes the smaller
/// (a reconcile refreshes a due token and syncs stages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Work {
    Refresh,
    Resync,
    Reconcile,
}

impl Work {
    /// Its name in metrics (one of [`crate::metrics::WORK_KINDS`]).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Work::Refresh => "refresh",
            Work::Resync => "resync",
            Work::Reconcile => "reconcile",
        }
    }
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
    /// The running work's task (aborted when the lease is lost), and its
    /// number: a `Done` of an aborted job is not taken for the next one's.
    pub(crate) job: Option<AbortHandle>,
    pub(crate) job_id: u64,
    retry_backoff: Duration,
    token_backoff: Duration,
    /// With `--lease`: whether this process runs the tenant, until when its
    /// own view of the lease lasts, whether a renewal is under way, and the
    /// timers of the next renewal and of the local expiry.
    pub(crate) holds_lease: bool,
    pub(crate) lease_until: Option<Instant>,
    pub(crate) lease_checking: bool,
    pub(crate) lease_timers: Vec<AbortHandle>,
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
            job: None,
            job_id: 0,
            retry_backoff: FIRST_BACKOFF,
            token_backoff: FIRST_BACKOFF,
            holds_lease: false,
            lease_until: None,
            lease_checking: false,
            lease_timers: Vec::new(),
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

    pub(crate) fn cancel_lease_timers(&mut self) {
        for handle in self.lease_timers.drain(..) {
            handle.abort();
        }
    }

    /// Stops everything the tenant does now: queued work dropped, the
    /// running work aborted (its CRM calls with it; a token request runs on
    /// in a task of its own), timers cancelled.
    pub(crate) fn stop_work(&mut self) {
        self.queued = None;
        self.running = None;
        if let Some(job) = self.job.take() {
            job.abort();
        }
        self.cancel_timers();
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
        let now = Utc::now();
        let delay = match (amo_failure, outcome.next_token_check) {
            // No refresh until a new code or token arrives; only a look at
            // what is stored, now and then.
            (Some(f), _) if f.state() == CrmState::NeedsAuthorization => Some(AUTHORIZATION_RECHECK),
            // Every failure backs off, whatever its kind: never a loop.
            (Some(_), _) => Some(self.next_token_backoff()),
            // A pair waiting in memory, or an expiry that could not be read.
            _ if outcome.tokens_pending => Some(self.next_token_backoff()),
            (None, None) => Some(self.next_token_backoff()),
            (None, Some(NextCheck::Nothing)) => Some(AUTHORIZATION_RECHECK),
            // Due again right after the work: the lifetime is unknown and
            // the margin exceeds it. Back off rather than loop.
            (None, Some(NextCheck::Refresh { at, .. })) if at <= now => Some(self.next_token_backoff()),
            (None, Some(NextCheck::Refresh { at, .. } | NextCheck::Expires(at))) => {
                self.token_backoff = FIRST_BACKOFF;
                Some(delay_until(at, now))
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
    /// The tenant is known to wait for authorisation already: a timed look
    /// that finds it still waiting records nothing.
    pub(crate) awaiting_authorization: bool,
}

/// What a piece of work did.
pub(crate) struct Outcome {
    pub(crate) work: Work,
    pub(crate) applied: Result<Applied, (String, bool)>,
    pub(crate) elapsed: Option<Duration>,
    /// When the stored token needs a look next (`None`: unreadable).
    pub(crate) next_token_check: Option<NextCheck>,
    /// A pair obtained by this process waits to be stored.
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
            applied.crms.iter().filter_map(|(_, o)| o.as_ref().err().map(Failure::state)).collect();
        if failures.contains(&CrmState::Error) {
            CrmState::Error.as_str()
        } else if failures.contains(&CrmState::NeedsAuthorization) {
            CrmState::NeedsAuthorization.as_str()
        } else {
            CrmState::Connected.as_str()
        }
    }
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
                let message = format!("internal error: {}", panic_message(e));
                tracing::error!(tenant = %config.slug, error = %message, "the tenant's work failed unexpectedly");
                record_internal_error(&ctx, &config, &message).await;
                Outcome {
                    work,
                    applied: Err((message, true)),
                    elapsed: None,
                    next_token_check: None,
                    tokens_pending: ctx.vault.contains(&config.slug),
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
            Work::Reconcile => apply_tenant(ctx, config).await.map_err(|e| (e.to_string(), e.is_transient())),
            Work::Resync => resync_stages(ctx, config).await.map_err(|e| (e.to_string(), e.is_transient())),
            Work::Refresh => Ok(refresh(ctx, config, self.awaiting_authorization).await),
        };
        if let Err((message, _)) = &applied {
            tracing::error!(tenant = %config.slug, error = %message, "work failed");
        }
        let next_token_check = match config.amocrm {
            Some(_) => next_token_check(ctx, config).await,
            None => None,
        };
        // `status` shows the next resync from the first reconcile on.
        if matches!(self.work, Work::Resync | Work::Reconcile) {
            record_schedule(ctx, config, self.schedule).await;
        }
        let tokens_pending = ctx.vault.contains(&config.slug);
        Outcome { work: self.work, applied, elapsed: Some(started.elapsed()), next_token_check, tokens_pending }
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
            // A long-lived token that expired, say, is recorded as such; a
            // failure that may pass is not an `error` while the token lives.
            let needs_authorization = matches!(&outcome, Err(f) if f.state() == CrmState::NeedsAuthorization);
            match &outcome {
                Err(_) if needs_authorization && !awaiting_authorization => {
                    record_failure(&config.slug, &db, &outcome).await
                }
                Err(f) if needs_authorization => {
                    tracing::debug!(tenant = %config.slug, crm = "amocrm", error = %f.message, "still waiting for authorisation")
                }
                Err(f) => {
                    tracing::warn!(tenant = %config.slug, crm = "amocrm", error = %f.message, "token refresh failed")
                }
                Ok(_) => {}
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

async fn record_schedule(
    ctx: &Context,
    config: &TenantConfig,
    (last, next): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
) {
    let Ok(db) = ctx.pools.get(&config.slug, &config.database_url) else { return };
    let Ok(session) = db.session().await else { return };
    if let Err(e) = db::schedule::write(&session, "stage_resync", last, next).await {
        tracing::debug!(tenant = %config.slug, error = %e, "cannot record the schedule");
    }
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
async fn record_internal_error(ctx: &Context, config: &TenantConfig, message: &str) {
    let Ok(db) = ctx.pools.get(&config.slug, &config.database_url) else { return };
    for (crm, on) in [(Crm::AmoCrm, config.amocrm.is_some()), (Crm::Bitrix24, config.bitrix24.is_some())] {
        if on {
            let failure = Failure { kind: FailureKind::Internal, crm, message: message.to_string() };
            record_failure(&config.slug, &db, &Err(failure)).await;
        }
    }
}
