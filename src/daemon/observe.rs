//! What the daemon tells its metrics about a tenant: after its work (the
//! job counters, its state, its token's horizon, its stage syncs), when its
//! schedule is (re)armed, and when its lease changes hands. The metrics
//! only record; what a state or a schedule is, is decided elsewhere.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Daemon;
use super::job::Outcome;
use super::tenant::{Tenant, Work};
use crate::metrics::TenantState;

impl Daemon {
    /// `was` is the tenant's state before the outcome: the count of tenants
    /// per state (a pass over every tenant) is published when it changed.
    pub(super) fn record(&self, slug: &str, outcome: &Outcome, was: TenantState) {
        let metrics = &self.ctx.metrics;
        metrics.job_done(outcome.work.as_str());
        if let (Work::Reconcile, Some(elapsed)) = (outcome.work, outcome.elapsed) {
            metrics.reconcile_duration(elapsed.as_secs_f64());
        }
        if matches!(outcome.work, Work::Reconcile | Work::Resync) {
            for (crm, result) in &outcome.applied.crms {
                metrics.stage_sync(*crm, result.is_ok());
                if result.is_ok() {
                    metrics.stage_synced(slug, *crm, Utc::now());
                }
            }
        }
        // The database's word wins: the sync's commit time, or the last
        // sync of a tenant whose first sync in this process failed.
        for (crm, at) in &outcome.stages_synced_at {
            metrics.stage_synced(slug, *crm, *at);
        }
        let Some(tenant) = self.tenants.get(slug) else { return };
        metrics.tenant_state(slug, tenant.state);
        if let Some(horizon) = token_horizon(tenant, outcome) {
            metrics.token_horizon(slug, horizon);
        }
        if tenant.state != was {
            self.publish_states();
        }
    }

    pub(super) fn publish_states(&self) {
        let mut counts: BTreeMap<TenantState, i64> = BTreeMap::new();
        for tenant in self.tenants.values() {
            *counts.entry(tenant.state).or_default() += 1;
        }
        let counts: Vec<(TenantState, i64)> = counts.into_iter().collect();
        self.ctx.metrics.set_tenant_states(&counts);
    }

    /// The stage-resync interval of a tenant, from its schedule as of `now`.
    pub(super) fn publish_schedule(&self, slug: &str, now: DateTime<Utc>) {
        let Some(tenant) = self.tenants.get(slug) else { return };
        let interval = tenant.config.schedule.stage_resync.interval_at(now);
        self.publish_interval(slug, interval);
    }

    /// A stage-resync interval worked out already (once for all the
    /// tenants of one cron expression).
    pub(super) fn publish_interval(&self, slug: &str, interval: Option<Duration>) {
        let Some(tenant) = self.tenants.get(slug) else { return };
        self.ctx.metrics.stage_schedule(slug, &tenant.config.crms(), interval);
    }

    /// Whether this process runs the tenant now (with `--lease`), and the
    /// state that follows from it.
    pub(super) fn publish_lease(&self, slug: &str) {
        let Some(tenant) = self.tenants.get(slug) else { return };
        let metrics = &self.ctx.metrics;
        metrics.lease_held(slug, tenant.holds_lease);
        if tenant.state == TenantState::Standby {
            metrics.standing_by(slug);
        }
        metrics.tenant_state(slug, tenant.state);
        self.publish_states();
    }
}

/// What the outcome says of the stored token: `None` when it could not be
/// read (what is known stays); `Some(None)` when there is none.
fn token_horizon(tenant: &Tenant, outcome: &Outcome) -> Option<Option<(DateTime<Utc>, Duration)>> {
    if tenant.config.amocrm.is_none() {
        return Some(None);
    }
    let check = outcome.next_token_check?;
    let margin = || {
        let in_force = check.margin().and_then(|m| m.to_std().ok());
        in_force.unwrap_or(tenant.config.schedule.token_refresh_margin)
    };
    Some(check.expires_at().map(|at| (at, margin())))
}
