//! The daemon's lead-delivery lane, beside a tenant's reconcile work: a
//! pass on each `[leads].poll` and on each wake, at most one at a time per
//! tenant. A wake during a pass (or within a second of its start) asks for
//! exactly one more right after it; a pass that stopped at its limit is
//! followed at once. Passes count against `--concurrency`,
//! and may use the quarter of it that bulk work leaves (`permits`).

use std::time::{Duration, Instant};

use super::Daemon;
use super::event::Event;
use super::schedule::{poll_timer, timer};
use crate::failure::{Cause, FailureKind};
use crate::leads::{self, PassReport};

/// At most one extra pass per tenant per second.
const WAKE_SPACING: Duration = Duration::from_secs(1);

impl Daemon {
    /// The first pass of a tenant with `[leads]`, once its work has run
    /// (its tables are there, its CRM connected): later ones follow from it.
    pub(super) fn start_delivery(&mut self, slug: &str) {
        let Some(tenant) = self.tenants.get(slug) else { return };
        if tenant.config.leads.is_some() && tenant.leads_timer.is_none() && tenant.delivering.is_none() {
            self.deliver(slug);
        }
    }

    /// Starts a pass now, or marks one more for after the running one.
    pub(super) fn deliver(&mut self, slug: &str) {
        let leased = self.global.lease.is_some();
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        let Some(leads) = tenant.config.leads.clone() else { return };
        if leased && !tenant.holds_lease {
            return;
        }
        if tenant.delivering.is_some() {
            tenant.deliver_again = true;
            return;
        }
        if let Some(waiting) = tenant.leads_timer.take() {
            waiting.abort();
        }
        tenant.delivering = Some(Instant::now());
        let (ctx, delivery, config) = (self.ctx.clone(), self.delivery.clone(), tenant.config.clone());
        let (events, permits, name) = (self.events.clone(), self.permits.clone(), slug.to_string());
        self.tasks.spawn(async move {
            let _permits = permits.prompt().await;
            let slug = config.slug.clone();
            let pass = {
                let ctx = ctx.clone();
                tokio::spawn(async move { leads::pass(&ctx, &delivery, &config, &leads, leads::PASS_LIMIT).await })
            };
            // A bug in a pass ends that pass, never the tenant's delivery.
            let report = pass.await.unwrap_or_else(|e| {
                Err(Cause::new(FailureKind::Internal, format!("internal error in a delivery pass: {e}")))
            });
            ctx.pools.close_idle(&slug);
            let _ = events.send(Event::Delivered(name, report));
        });
    }

    /// Arms the next pass after one ended.
    pub(super) fn delivered(&mut self, slug: &str, report: Result<PassReport, Cause>) {
        let events = self.events.clone();
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        let started = tenant.delivering.take().unwrap_or_else(Instant::now);
        let Some(leads) = &tenant.config.leads else { return };
        if let Ok(PassReport { outbox: Some(outbox), .. }) = &report {
            let oldest =
                outbox.oldest_pending.map_or(0.0, |at| (chrono::Utc::now() - at).num_milliseconds() as f64 / 1000.0);
            self.ctx.metrics.outbox(slug, outbox.pending, outbox.sending, oldest.max(0.0));
        }
        match &report {
            Ok(r) if r.sent + r.looked_up + r.failed > 0 => {
                tracing::info!(
                    tenant = slug,
                    sent = r.sent,
                    looked_up = r.looked_up,
                    delivered = r.delivered,
                    failed = r.failed,
                    "delivery pass"
                )
            }
            Ok(r) => {
                if let Some(waiting) = &r.waiting {
                    tracing::debug!(tenant = slug, waiting = %waiting, "delivery waits");
                }
            }
            Err(cause) => {
                tracing::warn!(tenant = slug, kind = cause.kind.as_str(), error = %cause.message, "delivery pass failed")
            }
        }
        let due = Event::LeadsDue(slug.to_string());
        tenant.leads_timer = Some(match &report {
            Ok(r) if r.more => timer(Duration::ZERO, events, due),
            _ if tenant.deliver_again => {
                timer((started + WAKE_SPACING).saturating_duration_since(Instant::now()), events, due)
            }
            _ => poll_timer(leads.poll, events, due),
        });
        tenant.deliver_again = false;
    }
}
