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
    fn timers_wait_at_least_a_second_and_at_most_a_month() {
        let now = Utc::now();
        let secs = |s: i64| now + chrono::Duration::seconds(s);
        assert_eq!(delay_until(secs(5), now), Duration::from_secs(5));
        assert_eq!(delay_until(secs(-10), now), Duration::from_secs(1));
        assert_eq!(delay_until(secs(5 * 365 * 86_400), now), Duration::from_secs(30 * 86_400));
        assert_eq!(delay_until(DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC), Duration::from_secs(30 * 86_400));
    }
}
