//! The series of one tenant each: what an alert on a single tenant needs
//! (its state, its token's horizon, its lease, when its stages were last
//! synced and how often they should be). A tenant's series go with it when
//! its file is removed, and those that describe its work go while another
//! daemon holds its lease: a standby's view of that work would be stale.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::labels::{OutboxLabels, StreamLabels, TenantCrmLabels, TenantLabels, TenantState, TenantStateLabels};
use super::{Metrics, Seconds, Timestamp};
use crate::model::Crm;
use crate::model::Stream;

pub(super) struct TenantFamilies {
    state: Family<TenantStateLabels, Gauge>,
    token_expiry: Family<TenantLabels, Timestamp>,
    token_margin: Family<TenantLabels, Seconds>,
    lease_held: Family<TenantLabels, Gauge>,
    stage_sync_interval: Family<TenantCrmLabels, Seconds>,
    last_stage_sync: Family<TenantCrmLabels, Timestamp>,
    schedule_last_run: Family<TenantLabels, Timestamp>,
    schedule_next_run: Family<TenantLabels, Timestamp>,
}

impl TenantFamilies {
    pub(super) fn register(registry: &mut Registry) -> TenantFamilies {
        let families = TenantFamilies {
            state: Family::default(),
            token_expiry: Family::default(),
            token_margin: Family::default(),
            lease_held: Family::default(),
            stage_sync_interval: Family::default(),
            last_stage_sync: Family::default(),
            schedule_last_run: Family::default(),
            schedule_next_run: Family::default(),
        };
        registry.register(
            "crm_connect_tenant_state",
            "A tenant's state: 1 for the state it is in, 0 for the others (pending, connected, \
             needs_authorization, error, standby)",
            families.state.clone(),
        );
        registry.register(
            "crm_connect_token_expiry_timestamp_seconds",
            "When a tenant's stored AmoCRM access token expires, unix time",
            families.token_expiry.clone(),
        );
        registry.register(
            "crm_connect_token_refresh_margin_seconds",
            "How long before its expiry a tenant's AmoCRM token is refreshed: token_refresh_margin, or half \
             the token's lifetime when the margin is not shorter than the lifetime",
            families.token_margin.clone(),
        );
        registry.register(
            "crm_connect_lease_held",
            "With --lease: 1 while this daemon holds the tenant's lease and runs it, 0 while it stands by",
            families.lease_held.clone(),
        );
        registry.register(
            "crm_connect_stage_sync_interval_seconds",
            "The time between the runs of a tenant's stage_resync schedule before and after now (set at every run), \
             by CRM",
            families.stage_sync_interval.clone(),
        );
        registry.register(
            "crm_connect_last_stage_sync_timestamp_seconds",
            "When a tenant's stages of a CRM were last synced, unix time",
            families.last_stage_sync.clone(),
        );
        registry.register(
            "crm_connect_schedule_last_run_timestamp_seconds",
            "When a tenant's scheduled stage resync last ran, unix time",
            families.schedule_last_run.clone(),
        );
        registry.register(
            "crm_connect_schedule_next_run_timestamp_seconds",
            "When a tenant's scheduled stage resync runs next, unix time",
            families.schedule_next_run.clone(),
        );
        families
    }
}

fn tenant_crm(tenant: &str, crm: Crm) -> TenantCrmLabels {
    TenantCrmLabels { tenant: tenant.into(), crm: crm.as_str().into() }
}

impl Metrics {
    /// The state a tenant is in now.
    pub fn tenant_state(&self, tenant: &str, state: TenantState) {
        for each in TenantState::in_force() {
            let labels = TenantStateLabels { tenant: tenant.into(), state: each };
            self.per_tenant.state.get_or_create(&labels).set(i64::from(each == state));
        }
    }

    /// The tenant's stored AmoCRM token: when it expires and the refresh
    /// margin in force; `None` (no token stored, no AmoCRM) removes both.
    pub fn token_horizon(&self, tenant: &str, horizon: Option<(DateTime<Utc>, Duration)>) {
        let labels = TenantLabels { tenant: tenant.into() };
        match horizon {
            Some((expires_at, margin)) => {
                self.per_tenant.token_expiry.get_or_create(&labels).set(unix_seconds(expires_at));
                self.per_tenant.token_margin.get_or_create(&labels).set(margin.as_secs_f64());
            }
            None => {
                self.per_tenant.token_expiry.remove(&labels);
                self.per_tenant.token_margin.remove(&labels);
            }
        }
    }

    /// With `--lease`: whether this process holds the tenant's lease.
    pub fn lease_held(&self, tenant: &str, held: bool) {
        self.per_tenant.lease_held.get_or_create(&TenantLabels { tenant: tenant.into() }).set(i64::from(held));
    }

    /// The stage-resync interval for each CRM the tenant has; the series of
    /// a CRM it no longer has (interval and last sync) are removed.
    pub fn stage_schedule(&self, tenant: &str, crms: &[Crm], interval: Option<Duration>) {
        for crm in Crm::ALL {
            let labels = tenant_crm(tenant, crm);
            match interval.filter(|_| crms.contains(&crm)) {
                Some(interval) => {
                    self.per_tenant.stage_sync_interval.get_or_create(&labels).set(interval.as_secs_f64());
                }
                None => {
                    self.per_tenant.stage_sync_interval.remove(&labels);
                }
            }
            if !crms.contains(&crm) {
                self.per_tenant.last_stage_sync.remove(&labels);
            }
        }
    }

    pub fn stage_synced(&self, tenant: &str, crm: Crm, at: DateTime<Utc>) {
        self.per_tenant.last_stage_sync.get_or_create(&tenant_crm(tenant, crm)).set(unix_seconds(at));
    }

    /// A tenant's schedule; a time that is `None` removes its series.
    pub fn schedule(&self, tenant: &str, last: Option<DateTime<Utc>>, next: Option<DateTime<Utc>>) {
        let labels = TenantLabels { tenant: tenant.into() };
        for (family, at) in [(&self.per_tenant.schedule_last_run, last), (&self.per_tenant.schedule_next_run, next)] {
            match at {
                Some(at) => {
                    family.get_or_create(&labels).set(unix_seconds(at));
                }
                None => {
                    family.remove(&labels);
                }
            }
        }
    }

    /// Another daemon runs the tenant: this one's view of its token and of
    /// its stage syncs would only grow stale.
    pub fn standing_by(&self, tenant: &str) {
        self.token_horizon(tenant, None);
        for crm in Crm::ALL {
            self.per_tenant.last_stage_sync.remove(&tenant_crm(tenant, crm));
        }
    }

    /// Drops every series labelled with the tenant (its file was removed).
    pub fn forget_tenant(&self, tenant: &str) {
        for state in ["pending", "sending"] {
            self.outbox_rows.remove(&OutboxLabels { tenant: tenant.into(), state });
        }
        let labels = TenantLabels { tenant: tenant.into() };
        self.outbox_oldest_pending.remove(&labels);
        for stream in Stream::ALL {
            self.funnel_lag.remove(&StreamLabels { tenant: tenant.into(), stream: stream.name() });
        }
        self.standing_by(tenant);
        self.stage_schedule(tenant, &[], None);
        for state in TenantState::in_force() {
            self.per_tenant.state.remove(&TenantStateLabels { tenant: tenant.into(), state });
        }
        self.per_tenant.lease_held.remove(&labels);
        self.per_tenant.schedule_last_run.remove(&labels);
        self.per_tenant.schedule_next_run.remove(&labels);
    }
}

fn unix_seconds(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::super::tests::{has, lines};
    use super::*;
    use crate::model::CrmState;

    #[test]
    fn a_tenants_series_carry_its_slug() {
        let m = Metrics::new();
        let at = Utc.timestamp_opt(1_700_000_000, 0).single().expect("a valid time");
        m.stage_synced("acme", Crm::AmoCrm, at);
        m.schedule("acme", Some(at), Some(at + chrono::Duration::seconds(900)));
        m.tenant_state("acme", TenantState::Is(CrmState::NeedsAuthorization));
        m.token_horizon("acme", Some((at, Duration::from_secs(3600))));
        m.lease_held("acme", true);
        m.stage_schedule("acme", &[Crm::AmoCrm], Some(Duration::from_secs(900)));
        let lines = lines(&m);
        for line in [
            "crm_connect_last_stage_sync_timestamp_seconds{tenant=\"acme\",crm=\"amocrm\"} 1700000000.0",
            "crm_connect_schedule_last_run_timestamp_seconds{tenant=\"acme\"} 1700000000.0",
            "crm_connect_schedule_next_run_timestamp_seconds{tenant=\"acme\"} 1700000900.0",
            "crm_connect_tenant_state{tenant=\"acme\",state=\"needs_authorization\"} 1",
            "crm_connect_tenant_state{tenant=\"acme\",state=\"connected\"} 0",
            "crm_connect_tenant_state{tenant=\"acme\",state=\"standby\"} 0",
            "crm_connect_token_expiry_timestamp_seconds{tenant=\"acme\"} 1700000000.0",
            "crm_connect_token_refresh_margin_seconds{tenant=\"acme\"} 3600.0",
            "crm_connect_lease_held{tenant=\"acme\"} 1",
            "crm_connect_stage_sync_interval_seconds{tenant=\"acme\",crm=\"amocrm\"} 900.0",
            "# TYPE crm_connect_tenant_state gauge",
            "# TYPE crm_connect_last_stage_sync_timestamp_seconds gauge",
        ] {
            assert!(has(&lines, line), "missing {line:?} in {lines:#?}");
        }
        // A tenant in force is never `unmanaged`: no series for it.
        assert!(!lines.iter().any(|l| l.contains("unmanaged") && l.contains("tenant=")), "{lines:#?}");

        m.tenant_state("acme", TenantState::Is(CrmState::Connected));
        let lines = self::lines(&m);
        assert!(has(&lines, "crm_connect_tenant_state{tenant=\"acme\",state=\"needs_authorization\"} 0"));
        assert!(has(&lines, "crm_connect_tenant_state{tenant=\"acme\",state=\"connected\"} 1"));
    }

    #[test]
    fn a_crm_dropped_from_the_file_takes_its_stage_series_along() {
        let m = Metrics::new();
        let at = Utc::now();
        let both = [Crm::AmoCrm, Crm::Bitrix24];
        m.stage_schedule("acme", &both, Some(Duration::from_secs(60)));
        m.stage_synced("acme", Crm::AmoCrm, at);
        m.stage_synced("acme", Crm::Bitrix24, at);
        m.stage_schedule("acme", &[Crm::Bitrix24], Some(Duration::from_secs(60)));
        let text = m.encode();
        assert!(!text.contains("tenant=\"acme\",crm=\"amocrm\"}"), "{text}");
        assert!(text.contains("crm_connect_stage_sync_interval_seconds{tenant=\"acme\",crm=\"bitrix24\"} 60.0"));
        assert!(text.contains("crm_connect_last_stage_sync_timestamp_seconds{tenant=\"acme\",crm=\"bitrix24\"}"));
    }

    #[test]
    fn a_standby_keeps_no_view_of_the_work() {
        let m = Metrics::new();
        let at = Utc::now();
        m.token_horizon("acme", Some((at, Duration::from_secs(60))));
        m.stage_synced("acme", Crm::AmoCrm, at);
        m.stage_schedule("acme", &[Crm::AmoCrm], Some(Duration::from_secs(60)));
        m.lease_held("acme", false);
        m.standing_by("acme");
        let text = m.encode();
        for gone in ["crm_connect_token_expiry", "crm_connect_token_refresh_margin", "crm_connect_last_stage_sync"] {
            assert!(!text.contains(gone), "{gone} still in {text}");
        }
        assert!(text.contains("crm_connect_lease_held{tenant=\"acme\"} 0"), "{text}");
        assert!(text.contains("crm_connect_stage_sync_interval_seconds{tenant=\"acme\",crm=\"amocrm\"}"), "{text}");
    }

    #[test]
    fn a_forgotten_tenant_leaves_no_series() {
        let m = Metrics::new();
        let at = Utc::now();
        for tenant in ["acme", "other"] {
            m.stage_synced(tenant, Crm::AmoCrm, at);
            m.stage_synced(tenant, Crm::Bitrix24, at);
            m.schedule(tenant, Some(at), Some(at));
            m.tenant_state(tenant, TenantState::Pending);
            m.token_horizon(tenant, Some((at, Duration::from_secs(60))));
            m.lease_held(tenant, true);
            m.stage_schedule(tenant, &Crm::ALL, Some(Duration::from_secs(60)));
            m.outbox(tenant, 1, 0, 2.0);
        }
        m.forget_tenant("acme");
        let text = m.encode();
        assert!(!text.contains("tenant=\"acme\""), "{text}");
        let other = text.lines().filter(|l| l.contains("tenant=\"other\"")).count();
        // 5 states, expiry, margin, lease, 2 intervals, 2 last syncs, 2 schedule times, 2 outbox rows, oldest.
        assert_eq!(other, 17, "{text}");

        m.schedule("other", None, Some(at));
        let text = m.encode();
        assert!(!text.contains("crm_connect_schedule_last_run_timestamp_seconds{"), "{text}");
        assert!(text.contains("crm_connect_schedule_next_run_timestamp_seconds{tenant=\"other\"}"), "{text}");
    }
}
