//! The daemon's clocks: each tenant's stage-resync cron job (cron jobs only:
//! the scheduler's interval jobs can stop firing for good, upstream #113),
//! and one-shot timers (token refresh, retry after a failure) that send an
//! event when they run out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use uuid::Uuid;

use super::Event;

pub(crate) struct Crons {
    scheduler: JobScheduler,
}

impl Crons {
    pub(crate) async fn start() -> Result<Crons, JobSchedulerError> {
        let scheduler = JobScheduler::new().await?;
        scheduler.start().await?;
        Ok(Crons { scheduler })
    }

    /// A job that sends `Event::Resync(slug)` on the 6-field expression.
    pub(crate) async fn add(
        &self,
        slug: &str,
        expr: &str,
        events: UnboundedSender<Event>,
    ) -> Result<Uuid, JobSchedulerError> {
        let slug = slug.to_string();
        let job = Job::new_async(expr, move |_, _| {
            let (events, slug) = (events.clone(), slug.clone());
            Box::pin(async move {
                let _ = events.send(Event::Resync(slug));
            })
        })?;
        self.scheduler.add(job).await
    }

    pub(crate) async fn remove(&self, job: &Uuid) {
        if let Err(e) = self.scheduler.remove(job).await {
            tracing::warn!(error = %e, "removing a cron job failed");
        }
    }

    pub(crate) async fn next_run(&self, job: &Uuid) -> Option<DateTime<Utc>> {
        let mut scheduler = self.scheduler.clone();
        scheduler.next_tick_for_job(*job).await.ok().flatten()
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

/// When to refresh a token expiring at `expires_at`: `margin` before, but at
/// least monthly (a refresh token unused for three months dies) and never
/// sooner than a second from now (no busy loop when the margin exceeds the
/// token's lifetime).
pub(crate) fn refresh_delay(expires_at: DateTime<Utc>, margin: Duration, now: DateTime<Utc>) -> Duration {
    const MONTH: Duration = Duration::from_secs(30 * 86_400);
    let due = expires_at - chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
    let wait = (due - now).to_std().unwrap_or(Duration::ZERO);
    wait.clamp(Duration::from_secs(1), MONTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_come_a_margin_before_expiry_at_least_monthly_and_never_in_a_loop() {
        let now = Utc::now();
        let secs = |s: i64| now + chrono::Duration::seconds(s);
        assert_eq!(refresh_delay(secs(20), Duration::from_secs(15), now), Duration::from_secs(5));
        assert_eq!(refresh_delay(secs(86_400), Duration::from_secs(3600), now), Duration::from_secs(82_800));
        assert_eq!(refresh_delay(secs(10), Duration::from_secs(3600), now), Duration::from_secs(1));
        assert_eq!(
            refresh_delay(secs(5 * 365 * 86_400), Duration::from_secs(3600), now),
            Duration::from_secs(30 * 86_400)
        );
    }
}
