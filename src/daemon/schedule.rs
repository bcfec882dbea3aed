//! The daemon's clocks: stage-resync cron jobs (cron jobs only: the
//! scheduler's interval jobs can stop firing for good, upstream #113), one
//! per distinct expression shared by the tenants that use it — the scheduler
//! looks at every job twice a second, so a job per tenant would cost idle CPU
//! in proportion to the tenants — and one-shot timers (token refresh, retry
//! after a failure) that send an event when they run out. Clocks only:
//! what a fired event does is the loop's business.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use uuid::Uuid;

use super::Event;

pub(crate) struct Crons {
    scheduler: JobScheduler,
    /// Expression (6 fields) → its job and how many tenants use it.
    jobs: HashMap<String, (Uuid, usize)>,
}

impl Crons {
    pub(crate) async fn start() -> Result<Crons, JobSchedulerError> {
        let scheduler = JobScheduler::new().await?;
        scheduler.start().await?;
        Ok(Crons { scheduler, jobs: HashMap::new() })
    }

    /// One more tenant on `expr`; its job sends `Event::Cron(expr)`.
    pub(crate) async fn subscribe(
        &mut self,
        expr: &str,
        events: &UnboundedSender<Event>,
    ) -> Result<(), JobSchedulerError> {
        if let Some((_, users)) = self.jobs.get_mut(expr) {
            *users += 1;
            return Ok(());
        }
        let (events, fired) = (events.clone(), expr.to_string());
        let job = Job::new_async(expr, move |_, _| {
            let (events, fired) = (events.clone(), fired.clone());
            Box::pin(async move {
                let _ = events.send(Event::Cron(fired));
            })
        })?;
        let id = self.scheduler.add(job).await?;
        self.jobs.insert(expr.to_string(), (id, 1));
        Ok(())
    }

    /// One tenant fewer on `expr`; the job goes with the last one.
    pub(crate) async fn unsubscribe(&mut self, expr: &str) {
        let Some((id, users)) = self.jobs.get_mut(expr) else { return };
        *users -= 1;
        if *users > 0 {
            return;
        }
        let id = *id;
        self.jobs.remove(expr);
        if let Err(e) = self.scheduler.remove(&id).await {
            tracing::warn!(error = %e, "removing a cron job failed");
        }
    }

    pub(crate) async fn next_run(&self, expr: &str) -> Option<DateTime<Utc>> {
        let (id, _) = self.jobs.get(expr)?;
        let mut scheduler = self.scheduler.clone();
        scheduler.next_tick_for_job(*id).await.ok().flatten()
    }

    pub(crate) async fn shutdown(mut self) {
        let _ = self.scheduler.shutdown().await;
    }
}

/// Sends `event` after `delay`; abort the handle to cancel.
pub(crate) fn timer(delay: Duration, events: UnboundedSender<Event>, event: Event) -> AbortHandle {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = events.send(event);
    })
    .abort_handle()
}

/// The grid polls are put on: a `[leads]` or `[funnel]` poll runs on the
/// last grid point before it is due, so the polls of many tenants due in
/// the same second start together — the runtime wakes once for all of them
/// and their connections' answers come in batches, instead of one wakeup
/// per poll and per answer. Never later than due: a poll's interval stays
/// an upper bound.
pub(crate) const POLL_GRID: Duration = Duration::from_secs(1);

/// Sends `event` at the last [`POLL_GRID`] point within `delay` (counted
/// from the process's first poll timer), or after `delay` when none is
/// ahead of now.
pub(crate) fn poll_timer(delay: Duration, events: UnboundedSender<Event>, event: Event) -> AbortHandle {
    static EPOCH: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let now = tokio::time::Instant::now();
    let epoch = *EPOCH.get_or_init(|| now);
    // A clock behind the epoch (time paused in another runtime) polls when due.
    let at = now.checked_duration_since(epoch).map_or(now + delay, |since| epoch + on_grid(since, delay, POLL_GRID));
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        let _ = events.send(event);
    })
    .abort_handle()
}

/// The time (since the epoch) a poll due `delay` after `now` runs at: the
/// last multiple of `grid` not after it, if that is still ahead of `now`.
fn on_grid(now: Duration, delay: Duration, grid: Duration) -> Duration {
    let due = now.saturating_add(delay);
    let past_point =
        u64::try_from(due.as_nanos() % grid.as_nanos().max(1)).map_or(Duration::ZERO, Duration::from_nanos);
    let below = due.saturating_sub(past_point);
    if below > now { below } else { due }
}

/// How long until `at`: at least a second (no busy loop, whatever the
/// clock says) and at most a month (a refresh token unused for three months
/// dies; the month also bounds a long-lived token's wait).
pub(crate) fn delay_until(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    const MONTH: Duration = Duration::from_secs(30 * 86_400);
    let wait = at.signed_duration_since(now).to_std().unwrap_or(Duration::ZERO);
    wait.clamp(Duration::from_secs(1), MONTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_runs_on_the_last_grid_point_before_it_is_due_never_later() {
        let (ms, grid) = (Duration::from_millis, Duration::from_secs(1));
        // Due at 31.4 s: runs at 31 s.
        assert_eq!(on_grid(ms(1_400), Duration::from_secs(30), grid), ms(31_000));
        // Tenants due within the same second run together.
        assert_eq!(on_grid(ms(1_900), Duration::from_secs(30), grid), ms(31_000));
        // No grid point ahead of now before it is due: when due.
        assert_eq!(on_grid(ms(1_400), ms(500), grid), ms(1_900));
        assert_eq!(on_grid(ms(1_400), Duration::ZERO, grid), ms(1_400));
        // Due exactly on a point.
        assert_eq!(on_grid(ms(1_000), Duration::from_secs(1), grid), ms(2_000));
        assert_eq!(on_grid(Duration::MAX, Duration::from_secs(1), grid), Duration::MAX);
    }

    #[test]
    fn timers_wait_at_least_a_second_and_at_most_a_month() {
        let now = Utc::now();
        let secs = |s: i64| now + chrono::Duration::seconds(s);
        assert_eq!(delay_until(secs(5), now), Duration::from_secs(5));
        assert_eq!(delay_until(secs(-10), now), Duration::from_secs(1));
        assert_eq!(delay_until(secs(5 * 365 * 86_400), now), Duration::from_secs(30 * 86_400));
        assert_eq!(delay_until(DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC), Duration::from_secs(30 * 86_400));
    }
}
