//! The daemon's funnel-history lane, beside a tenant's reconcile work and
//! its delivery lane: a poll on each `[funnel].poll`, at most one at a time
//! per tenant, each capped at `funnel::POLL_REQUESTS` CRM requests; a poll
//! that stopped at its cap with more to read is followed at once. Polls
//! count against `--concurrency`.

use std::time::Duration;

use super::Daemon;
use super::event::Event;
use super::schedule::{poll_timer, timer};
use crate::failure::{Cause, FailureKind};
use crate::funnel::{self, PollReport};

impl Daemon {
    /// The first poll of a tenant with `[funnel]`, once its work has run
    /// (its tables are there, its stages synced): later ones follow from it.
    pub(super) fn start_funnel(&mut self, slug: &str) {
        let Some(tenant) = self.tenants.get(slug) else { return };
        if tenant.config.funnel.is_some() && tenant.funnel_timer.is_none() && !tenant.polling_funnel {
            self.poll_funnel(slug);
        }
    }

    /// Starts a poll of the tenant's streams now.
    pub(super) fn poll_funnel(&mut self, slug: &str) {
        let leased = self.global.lease.is_some();
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        let Some(config) = tenant.config.funnel.clone() else { return };
        if (leased && !tenant.holds_lease) || tenant.polling_funnel {
            return;
        }
        if let Some(waiting) = tenant.funnel_timer.take() {
            waiting.abort();
        }
        tenant.polling_funnel = true;
        let (ctx, polls, tenant_config) = (self.ctx.clone(), self.polls.clone(), tenant.config.clone());
        let (events, permits, name) = (self.events.clone(), self.permits.clone(), slug.to_string());
        self.tasks.spawn(async move {
            let _permits = permits.bulk().await;
            let slug = tenant_config.slug.clone();
            let poll = {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    funnel::poll(&ctx, &polls, &tenant_config, &config, Some(funnel::POLL_REQUESTS)).await
                })
            };
            // A bug in a poll ends that poll, never the tenant's history.
            let report = poll.await.unwrap_or_else(|e| {
                Err(Cause::new(FailureKind::Internal, format!("internal error in a funnel poll: {e}")))
            });
            ctx.pools.close_idle(&slug);
            let _ = events.send(Event::FunnelPolled(name, report));
        });
    }

    /// Arms the next poll after one ended.
    pub(super) fn funnel_polled(&mut self, slug: &str, report: Result<PollReport, Cause>) {
        let events = self.events.clone();
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        tenant.polling_funnel = false;
        let Some(config) = &tenant.config.funnel else { return };
        if let Ok(r) = &report {
            let now = chrono::Utc::now();
            for stream in &r.streams {
                if let Some(at) = stream.complete_to {
                    let lag = (now - at).num_milliseconds() as f64 / 1000.0;
                    self.ctx.metrics.funnel_lag(slug, stream.stream.name(), lag);
                }
                self.ctx.metrics.funnel_ingested(stream.stream.crm(), stream.ingested);
            }
        }
        match &report {
            Ok(r) if r.ingested > 0 => {
                tracing::info!(tenant = slug, ingested = r.ingested, requests = r.requests, "funnel poll")
            }
            Ok(_) => {}
            Err(cause) => {
                tracing::warn!(tenant = slug, kind = cause.kind.as_str(), error = %cause.message, "funnel poll failed")
            }
        }
        let due = Event::FunnelDue(slug.to_string());
        tenant.funnel_timer = Some(match &report {
            Ok(r) if r.more => timer(Duration::ZERO, events, due),
            _ => poll_timer(config.poll, events, due),
        });
    }
}
