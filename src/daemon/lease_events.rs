//! The daemon's side of the opt-in lease: when to ask for it again, taking
//! a tenant over when it is won, standing by when it is lost or lapses.
//! The asking itself (SQL, the holder's own view of the expiry) is
//! `lease.rs`; nothing here talks to a database.

use std::time::Instant;

use super::schedule::timer;
use super::tenant::Work;
use super::{Daemon, Event, lease};
use crate::metrics::TenantState;

impl Daemon {
    /// Asks the tenant's database whether this process holds its lease;
    /// the attempt waits for a work permit like everything else.
    pub(super) fn check_lease(&mut self, slug: &str) {
        let Some(duration) = self.global.lease else { return };
        let (ctx, holder, events, permits) =
            (self.ctx.clone(), self.holder.clone(), self.events.clone(), self.permits.clone());
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        if std::mem::replace(&mut tenant.lease_checking, true) {
            return;
        }
        let config = tenant.config.clone();
        self.tasks.spawn(async move {
            let _permits = permits.prompt().await;
            let answer = lease::take(&ctx, &config, &holder, duration).await;
            let _ = events.send(Event::Lease(config.slug.clone(), answer));
        });
    }

    pub(super) fn lease(&mut self, slug: &str, answer: lease::Answer) {
        let Some(duration) = self.global.lease else { return };
        let events = self.events.clone();
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        tenant.lease_checking = false;
        // The next renewal (or, standing by, the next try): the first one
        // after a start lands anywhere in the interval, so that tenants
        // loaded together do not all renew on one tick.
        let every = lease::renew_every(duration);
        let next = if tenant.lease_until.is_none() { every.mul_f64(rand::random_range(0.2..=1.0)) } else { every };
        tenant.cancel_lease_timers();
        tenant.lease_timers.push(timer(next, events.clone(), Event::LeaseDue(slug.to_string())));
        let holds = match answer.held {
            Ok(held) => {
                if held {
                    tenant.lease_until = Some(lease::held_until(answer.sent_at, duration));
                }
                held
            }
            Err(e) => {
                // Never extended by a failure: the local expiry stands.
                tracing::warn!(tenant = slug, error = %e, "cannot renew the lease");
                tenant.holds_lease && tenant.lease_until.is_some_and(|until| until > Instant::now())
            }
        };
        if let Some(until) = tenant.lease_until.filter(|_| holds) {
            let left = until.saturating_duration_since(Instant::now());
            tenant.lease_timers.push(timer(left, events, Event::LeaseExpired(slug.to_string())));
        }
        match (tenant.holds_lease, holds) {
            (false, true) => {
                tenant.holds_lease = true;
                tenant.state = TenantState::Pending;
                tracing::info!(tenant = slug, "took the lease: this daemon runs the tenant");
                self.publish_lease(slug);
                self.request(slug, Work::Reconcile);
            }
            (true, false) => self.lose_lease(slug),
            // Another daemon runs it: this one's first pass is done with it.
            (false, false) => {
                if std::mem::replace(&mut tenant.state, TenantState::Standby) != TenantState::Standby {
                    self.publish_lease(slug);
                }
                self.first_pass.done_with(slug, self.tenants.len());
            }
            // Renewed: the state is the work's to tell.
            (true, true) => {}
        }
    }

    /// The local expiry timer fired: unless a renewal moved it on, the lease
    /// is over for this process.
    pub(super) fn lease_expired(&mut self, slug: &str) {
        let Some(tenant) = self.tenants.get(slug) else { return };
        let over = tenant.lease_until.is_none_or(|until| until <= Instant::now());
        if tenant.holds_lease && over {
            tracing::warn!(tenant = slug, "the lease expired without a successful renewal");
            self.lose_lease(slug);
        }
    }

    /// Stands by at once: no more work, no CRM call (a token request in
    /// flight runs to its end in a task of its own, its pair registered).
    fn lose_lease(&mut self, slug: &str) {
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        tenant.holds_lease = false;
        tenant.lease_until = None;
        tenant.state = TenantState::Standby;
        let was_running = tenant.running.is_some();
        tenant.stop_work();
        tracing::info!(tenant = slug, "lost the lease: standing by");
        self.publish_lease(slug);
        // Its first work, stopped, will not report: the pass counts it done.
        if was_running {
            self.first_pass.done_with(slug, self.tenants.len());
        }
    }
}
