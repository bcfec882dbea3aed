//! The Prometheus metrics the daemon exposes on `/metrics`; one registry,
//! carried in the `Context` rather than kept as a global. Labels hold CRM
//! names, states, results, HTTP statuses and tenant slugs — never a secret.

mod labels;

use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use labels::{
    AttemptLabels, CrmLabels, CrmResultLabels, CrmStatusLabels, FailureLabels, OutboxLabels, ResultLabels, StateLabels,
    TenantCrmLabels, TenantLabels, WorkLabels,
};
pub use labels::{AttemptOutcome, RefreshResult, TenantState, WORK_KINDS};

use crate::model::{Crm, FailureKind};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the reconcile duration buckets, in seconds: a tenant
/// whose database and CRMs answer at once takes tens of milliseconds, one
/// waiting out retries up to the two-minute deadline.
const RECONCILE_BUCKETS: [f64; 13] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Upper bounds of the insert → delivered buckets, in seconds: a woken pass
/// delivers within a second, a polled one within its poll, a lost answer
/// after the settle time's lookup.
const DELIVERY_BUCKETS: [f64; 12] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0, 3600.0];

/// Unix time in seconds, with a fractional part.
type Timestamp = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    tenants: Family<StateLabels, Gauge>,
    token_refreshes: Family<ResultLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    stage_syncs: Family<CrmResultLabels, Counter>,
    crm_requests: Family<CrmStatusLabels, Counter>,
    reconcile_duration: Histogram,
    jobs: Family<WorkLabels, Counter>,
    db_busy_retries: Counter,
    last_stage_sync: Family<TenantCrmLabels, Timestamp>,
    schedule_last_run: Family<TenantLabels, Timestamp>,
    schedule_next_run: Family<TenantLabels, Timestamp>,
    outbox_rows: Family<OutboxLabels, Gauge>,
    outbox_oldest_pending: Family<TenantLabels, Gauge<f64, AtomicU64>>,
    delivery_attempts: Family<AttemptLabels, Counter>,
    delivery_seconds: Family<CrmLabels, Histogram>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let tenants = Family::<StateLabels, Gauge>::default();
        let token_refreshes = Family::<ResultLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let stage_syncs = Family::<CrmResultLabels, Counter>::default();
        let crm_requests = Family::<CrmStatusLabels, Counter>::default();
        let reconcile_duration = Histogram::new(RECONCILE_BUCKETS);
        let jobs = Family::<WorkLabels, Counter>::default();
        let db_busy_retries = Counter::default();
        let last_stage_sync = Family::<TenantCrmLabels, Timestamp>::default();
        let schedule_last_run = Family::<TenantLabels, Timestamp>::default();
        let schedule_next_run = Family::<TenantLabels, Timestamp>::default();
        let outbox_rows = Family::<OutboxLabels, Gauge>::default();
        let outbox_oldest_pending = Family::<TenantLabels, Gauge<f64, AtomicU64>>::default();
        let delivery_attempts = Family::<AttemptLabels, Counter>::default();
        let delivery_seconds =
            Family::<CrmLabels, Histogram>::new_with_constructor(|| Histogram::new(DELIVERY_BUCKETS));
        // Counters are registered without `_total`: the encoder appends it.
        registry.register("crm_connect_tenants", "Tenants by connection state", tenants.clone());
        registry.register(
            "crm_connect_token_refreshes",
            "AmoCRM token refresh attempts by result (ok, rejected, failed, unstored)",
            token_refreshes.clone(),
        );
        registry.register(
            "crm_connect_failures",
            "Failed CRM steps of tenants, by CRM and kind (needs_authorization, config, crm, crm_unavailable, \
             database, database_unavailable, internal, shutting_down)",
            failures.clone(),
        );
        registry.register("crm_connect_stage_syncs", "Stage syncs by CRM and result", stage_syncs.clone());
        registry.register(
            "crm_connect_crm_requests",
            "Requests sent to a CRM by CRM and HTTP status (error: no answer)",
            crm_requests.clone(),
        );
        registry.register(
            "crm_connect_reconcile_duration_seconds",
            "Time one tenant's reconcile took",
            reconcile_duration.clone(),
        );
        registry.register("crm_connect_jobs", "Tenant work finished, by kind", jobs.clone());
        registry.register(
            "crm_connect_db_busy_retries",
            "Connection attempts a PostgreSQL server refused as busy (too many clients, cannot connect now), \
             tried again",
            db_busy_retries.clone(),
        );
        registry.register(
            "crm_connect_last_stage_sync_timestamp_seconds",
            "When a tenant's stages of a CRM were last synced, unix time",
            last_stage_sync.clone(),
        );
        registry.register(
            "crm_connect_schedule_last_run_timestamp_seconds",
            "When a tenant's scheduled stage resync last ran, unix time",
            schedule_last_run.clone(),
        );
        registry.register(
            "crm_connect_schedule_next_run_timestamp_seconds",
            "When a tenant's scheduled stage resync runs next, unix time",
            schedule_next_run.clone(),
        );
        registry.register(
            "crm_connect_outbox_rows",
            "Outbox rows waiting, by tenant and state (pending, sending), as the last delivery pass found them",
            outbox_rows.clone(),
        );
        registry.register(
            "crm_connect_outbox_oldest_pending_seconds",
            "Age of a tenant's oldest pending outbox row, as the last delivery pass found it",
            outbox_oldest_pending.clone(),
        );
        registry.register(
            "crm_connect_lead_delivery_attempts",
            "Lead sends and lookups by CRM and outcome (delivered, refused, failed, ambiguous, found, absent, \
             inconclusive)",
            delivery_attempts.clone(),
        );
        registry.register(
            "crm_connect_lead_delivery_seconds",
            "Time from a lead's insert into the outbox to its delivered commit, by CRM",
            delivery_seconds.clone(),
        );
        let metrics = Metrics {
            registry,
            tenants,
            token_refreshes,
            failures,
            stage_syncs,
            crm_requests,
            reconcile_duration,
            jobs,
            db_busy_retries,
            last_stage_sync,
            schedule_last_run,
            schedule_next_run,
            outbox_rows,
            outbox_oldest_pending,
            delivery_attempts,
            delivery_seconds,
        };
        for crm in Crm::ALL {
            for outcome in AttemptOutcome::ALL {
                let _ = metrics.delivery_attempts.get_or_create(&AttemptLabels { crm, outcome });
            }
        }
        metrics.set_tenant_states(&[]);
        for result in RefreshResult::ALL {
            let _ = metrics.token_refreshes.get_or_create(&ResultLabels { result });
        }
        for crm in Crm::ALL {
            for kind in FailureKind::ALL {
                let _ = metrics.failures.get_or_create(&FailureLabels { crm, kind });
            }
        }
        for work in WORK_KINDS {
            let _ = metrics.jobs.get_or_create(&WorkLabels { work: work.into() });
        }
        for crm in [Crm::AmoCrm, Crm::Bitrix24] {
            for result in ["ok", "error"] {
                let _ = metrics
                    .stage_syncs
                    .get_or_create(&CrmResultLabels { crm: crm.as_str().into(), result: result.into() });
            }
        }
        metrics
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Sets the number of tenants in each given state; every other state
    /// drops to zero.
    pub fn set_tenant_states(&self, counts: &[(TenantState, i64)]) {
        for state in TenantState::all() {
            let count = counts.iter().filter(|(s, _)| *s == state).map(|(_, n)| *n).sum();
            self.tenants.get_or_create(&StateLabels { state }).set(count);
        }
    }

    pub fn token_refresh(&self, result: RefreshResult) {
        self.token_refreshes.get_or_create(&ResultLabels { result }).inc();
    }

    /// One failed CRM step of a tenant.
    pub fn failure(&self, crm: Crm, kind: FailureKind) {
        self.failures.get_or_create(&FailureLabels { crm, kind }).inc();
    }

    pub fn stage_sync(&self, crm: Crm, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.stage_syncs.get_or_create(&CrmResultLabels { crm: crm.as_str().into(), result: result.into() }).inc();
    }

    /// One request sent; `None` when no answer came (network failure).
    pub fn crm_request(&self, crm: Crm, status: Option<u16>) {
        let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        self.crm_requests.get_or_create(&CrmStatusLabels { crm: crm.as_str().into(), status }).inc();
    }

    /// One piece of tenant work finished (`reconcile`, `resync`, `refresh`).
    pub fn job_done(&self, work: &str) {
        self.jobs.get_or_create(&WorkLabels { work: work.into() }).inc();
    }

    /// The counter the database pools add each busy refusal to.
    pub fn db_busy_retries(&self) -> Counter {
        self.db_busy_retries.clone()
    }

    pub fn reconcile_duration(&self, seconds: f64) {
        self.reconcile_duration.observe(seconds);
    }

    pub fn stage_synced(&self, tenant: &str, crm: Crm, at: DateTime<Utc>) {
        let labels = TenantCrmLabels { tenant: tenant.into(), crm: crm.as_str().into() };
        self.last_stage_sync.get_or_create(&labels).set(unix_seconds(at));
    }

    /// A tenant's schedule; a time that is `None` removes its series.
    pub fn schedule(&self, tenant: &str, last: Option<DateTime<Utc>>, next: Option<DateTime<Utc>>) {
        let labels = TenantLabels { tenant: tenant.into() };
        for (family, at) in [(&self.schedule_last_run, last), (&self.schedule_next_run, next)] {
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

    /// What a delivery pass found in a tenant's outbox.
    pub fn outbox(&self, tenant: &str, pending: i64, sending: i64, oldest_pending_seconds: f64) {
        for (state, count) in [("pending", pending), ("sending", sending)] {
            self.outbox_rows.get_or_create(&OutboxLabels { tenant: tenant.into(), state }).set(count);
        }
        self.outbox_oldest_pending.get_or_create(&TenantLabels { tenant: tenant.into() }).set(oldest_pending_seconds);
    }

    /// A lead delivered `seconds` after its insert.
    pub fn lead_delivered(&self, crm: Crm, seconds: f64) {
        self.delivery_seconds.get_or_create(&CrmLabels { crm }).observe(seconds.max(0.0));
    }

    /// One lead send or lookup and its outcome.
    pub fn delivery_attempt(&self, crm: Crm, outcome: AttemptOutcome) {
        self.delivery_attempts.get_or_create(&AttemptLabels { crm, outcome }).inc();
    }

    /// Drops every series labelled with the tenant (its file was removed).
    pub fn forget_tenant(&self, tenant: &str) {
        for state in ["pending", "sending"] {
            self.outbox_rows.remove(&OutboxLabels { tenant: tenant.into(), state });
        }
        self.outbox_oldest_pending.remove(&TenantLabels { tenant: tenant.into() });
        for crm in [Crm::AmoCrm, Crm::Bitrix24] {
            self.last_stage_sync.remove(&TenantCrmLabels { tenant: tenant.into(), crm: crm.as_str().into() });
        }
        let labels = TenantLabels { tenant: tenant.into() };
        self.schedule_last_run.remove(&labels);
        self.schedule_next_run.remove(&labels);
    }

    /// The OpenMetrics text exposition, served as [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String fails only if a metric's own encoder does,
        // which the built-in metric types never do.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn unix_seconds(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use crate::model::CrmState;

    use super::*;

    fn lines(metrics: &Metrics) -> Vec<String> {
        metrics.encode().lines().map(String::from).collect()
    }

    fn has(lines: &[String], line: &str) -> bool {
        lines.iter().any(|l| l == line)
    }

    #[test]
    fn closed_label_sets_start_at_zero_and_the_text_ends_with_eof() {
        let lines = lines(&Metrics::new());
        for line in [
            "# TYPE crm_connect_tenants gauge",
            "# TYPE crm_connect_token_refreshes counter",
            "# TYPE crm_connect_stage_syncs counter",
            "# TYPE crm_connect_reconcile_duration_seconds histogram",
            "crm_connect_tenants{state=\"connected\"} 0",
            "crm_connect_token_refreshes_total{result=\"rejected\"} 0",
            "crm_connect_stage_syncs_total{crm=\"bitrix24\",result=\"ok\"} 0",
            "crm_connect_reconcile_duration_seconds_count 0",
        ] {
            assert!(has(&lines, line), "missing {line:?} in {lines:#?}");
        }
        assert_eq!(lines.last().map(String::as_str), Some("# EOF"));
    }

    #[test]
    fn recorded_values_appear_with_their_labels() {
        let m = Metrics::new();
        m.set_tenant_states(&[(TenantState::Is(CrmState::Connected), 3), (TenantState::Is(CrmState::Error), 1)]);
        m.token_refresh(RefreshResult::Ok);
        m.token_refresh(RefreshResult::Ok);
        m.token_refresh(RefreshResult::Unstored);
        m.failure(Crm::Bitrix24, FailureKind::CrmUnavailable);
        m.stage_sync(Crm::Bitrix24, false);
        m.crm_request(Crm::AmoCrm, Some(200));
        m.crm_request(Crm::AmoCrm, None);
        m.reconcile_duration(0.3);
        let at = Utc.timestamp_opt(1_700_000_000, 0).single().expect("a valid time");
        m.stage_synced("acme", Crm::AmoCrm, at);
        m.schedule("acme", Some(at), Some(at + chrono::Duration::seconds(900)));
        let lines = lines(&m);
        for line in [
            "crm_connect_tenants{state=\"connected\"} 3",
            "crm_connect_tenants{state=\"error\"} 1",
            "crm_connect_tenants{state=\"pending\"} 0",
            "crm_connect_token_refreshes_total{result=\"ok\"} 2",
            "crm_connect_token_refreshes_total{result=\"unstored\"} 1",
            "crm_connect_failures_total{crm=\"bitrix24\",kind=\"crm_unavailable\"} 1",
            "crm_connect_failures_total{crm=\"amocrm\",kind=\"config\"} 0",
            "crm_connect_stage_syncs_total{crm=\"bitrix24\",result=\"error\"} 1",
            "crm_connect_crm_requests_total{crm=\"amocrm\",status=\"200\"} 1",
            "crm_connect_crm_requests_total{crm=\"amocrm\",status=\"error\"} 1",
            "crm_connect_reconcile_duration_seconds_count 1",
            "crm_connect_reconcile_duration_seconds_bucket{le=\"0.25\"} 0",
            "crm_connect_reconcile_duration_seconds_bucket{le=\"0.5\"} 1",
            "crm_connect_reconcile_duration_seconds_bucket{le=\"120.0\"} 1",
            "crm_connect_last_stage_sync_timestamp_seconds{tenant=\"acme\",crm=\"amocrm\"} 1700000000.0",
            "crm_connect_schedule_last_run_timestamp_seconds{tenant=\"acme\"} 1700000000.0",
            "crm_connect_schedule_next_run_timestamp_seconds{tenant=\"acme\"} 1700000900.0",
            "# TYPE crm_connect_crm_requests counter",
            "# TYPE crm_connect_last_stage_sync_timestamp_seconds gauge",
            "# TYPE crm_connect_schedule_last_run_timestamp_seconds gauge",
            "# TYPE crm_connect_schedule_next_run_timestamp_seconds gauge",
        ] {
            assert!(has(&lines, line), "missing {line:?} in {lines:#?}");
        }

        // A state no longer given drops to zero rather than keeping its count.
        m.set_tenant_states(&[(TenantState::Is(CrmState::Connected), 4)]);
        let lines = self::lines(&m);
        assert!(has(&lines, "crm_connect_tenants{state=\"error\"} 0"), "{lines:#?}");
        assert!(has(&lines, "crm_connect_tenants{state=\"connected\"} 4"), "{lines:#?}");
    }

    #[test]
    fn a_forgotten_tenant_leaves_no_series() {
        let m = Metrics::new();
        let at = Utc::now();
        m.stage_synced("acme", Crm::AmoCrm, at);
        m.stage_synced("acme", Crm::Bitrix24, at);
        m.stage_synced("other", Crm::AmoCrm, at);
        m.schedule("acme", Some(at), Some(at));
        m.forget_tenant("acme");
        let text = m.encode();
        assert!(!text.contains("tenant=\"acme\""), "{text}");
        assert!(text.contains("tenant=\"other\""), "{text}");

        m.schedule("other", None, Some(at));
        let text = m.encode();
        assert!(!text.contains("crm_connect_schedule_last_run_timestamp_seconds{"), "{text}");
        assert!(text.contains("crm_connect_schedule_next_run_timestamp_seconds{tenant=\"other\"}"), "{text}");
    }
}
