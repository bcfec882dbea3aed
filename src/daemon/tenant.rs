//! One tenant inside the daemon: its configuration in force, what runs and
//! what waits, its timers. A tenant knows nothing of the others or of the
//! loop's bookkeeping: it only hears of its own outcomes (with the policy's
//! next step for each failure) and answers with timers that send events.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;

use super::Event;
use super::job::Outcome;
use super::policy::NextStep;
use super::schedule::{delay_until, timer};
use crate::config::TenantConfig;
use crate::metrics::TenantState;
use crate::model::Crm;
use crate::tokens::NextCheck;

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
    pub(crate) state: TenantState,
    /// Lead delivery: the next pass's timer, when the running pass started,
    /// and whether a wake asked for one more after it.
    pub(crate) leads_timer: Option<AbortHandle>,
    pub(crate) delivering: Option<Instant>,
    pub(crate) deliver_again: bool,
    /// Funnel history: the next poll's timer, and whether one runs.
    pub(crate) funnel_timer: Option<AbortHandle>,
    pub(crate) polling_funnel: bool,
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
            state: TenantState::Pending,
            leads_timer: None,
            delivering: None,
            deliver_again: false,
            funnel_timer: None,
            polling_funnel: false,
        }
    }

    fn next_token_backoff(&mut self) -> Duration {
        let delay = self.token_backoff;
        self.token_backoff = (delay * 2).min(MAX_BACKOFF);
        delay
    }

    pub(crate) fn cancel_timers(&mut self) {
        let timers =
            [self.token_timer.take(), self.retry_timer.take(), self.leads_timer.take(), self.funnel_timer.take()];
        for handle in timers.into_iter().flatten() {
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

    /// Updates state and timers from a finished piece of work and the
    /// policy's next step for each of its failures.
    pub(crate) fn after(&mut self, outcome: &Outcome, steps: &[(Crm, NextStep)], events: &UnboundedSender<Event>) {
        let slug = self.config.slug.clone();
        self.state = outcome.state();
        if matches!(outcome.work, Work::Reconcile | Work::Resync) {
            if steps.iter().any(|(_, step)| *step == NextStep::Retry) {
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
        let amo_step = steps.iter().find(|(crm, _)| *crm == Crm::AmoCrm).map(|(_, step)| *step);
        let now = Utc::now();
        let delay = match (amo_step, outcome.next_token_check) {
            // No refresh until a new code or token arrives; only a look at
            // what is stored, now and then.
            (Some(NextStep::AwaitAuthorization), _) => AUTHORIZATION_RECHECK,
            // Every other failure backs off, whatever its kind: never a loop.
            (Some(_), _) => self.next_token_backoff(),
            // A pair waiting in memory, or an expiry that could not be read.
            _ if outcome.tokens_pending => self.next_token_backoff(),
            (None, None) => self.next_token_backoff(),
            (None, Some(NextCheck::Nothing)) => AUTHORIZATION_RECHECK,
            // Due again right after the work: the lifetime is unknown and
            // the margin exceeds it. Back off rather than loop.
            (None, Some(NextCheck::Refresh { at, .. })) if at <= now => self.next_token_backoff(),
            (None, Some(NextCheck::Refresh { at, .. } | NextCheck::Expires(at))) => {
                self.token_backoff = FIRST_BACKOFF;
                delay_until(at, now)
            }
        };
        tracing::debug!(tenant = %slug, refresh_in = ?delay, "token refresh timer");
        let handle = timer(delay, events.clone(), Event::TokenDue(slug));
        if let Some(old) = self.token_timer.replace(handle) {
            old.abort();
        }
    }
}
