//! The Prometheus metrics the daemon exposes on `/metrics`; one registry,
//! carried in the `Context` rather than kept as a global. Labels hold CRM
//! names, states, results, HTTP statuses, PostgreSQL servers (`host:port`)
//! and tenant slugs — never a secret. `tenant.rs` holds the series of one
//! tenant each, `text.rs` the classic text format.

mod labels;
mod tenant;
mod text;

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use labels::{
    AttemptLabels, CrmLabels, CrmResultLabels, CrmStatusLabels, FailureLabels, LIMITS, LimitLabels, OutboxLabels,
    ResultLabels, ServerLabels, StateLabels, StreamLabels, TenantLabels, WorkLabels,
};
pub use labels::{AttemptOutcome, RateLimit, RefreshResult, TenantState, WORK_KINDS};
use tenant::TenantFamilies;
pub use text::{CLASSIC_CONTENT_TYPE, wants_classic_text};

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
/// A length of time in seconds, with a fractional part.
type Seconds = Gauge<f64, AtomicU64>;

/// One PostgreSQL server's connections as the pools see them now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConnections {
    /// `host:port` (or `socket-directory:port`).
    pub server: String,
    /// Open or being opened: each holds a place in the budget.
    pub open: usize,
    /// `--db-connections`.
    pub budget: usize,
    /// Work waiting for a place in the budget.
    pub waiting: usize,
}

type ServerSource = Box<dyn Fn() -> Vec<ServerConnections> + Send + Sync>;

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
    per_tenant: TenantFamilies,
    outbox_rows: Family<OutboxLabels, Gauge>,
    outbox_oldest_pending: Family<TenantLabels, Seconds>,
    delivery_attempts: Family<AttemptLabels, Counter>,
    delivery_seconds: Family<CrmLabels, Histogram>,
    rate_limit_waits: Family<LimitLabels, Counter>,
    rate_limit_wait_seconds: Family<LimitLabels, Counter<f64, AtomicU64>>,
    db_connections: Family<ServerLabels, Gauge>,
    db_connection_budget: Family<ServerLabels, Gauge>,
    db_connection_waiters: Family<ServerLabels, Gauge>,
    funnel_ingested: Family<CrmLabels, Counter>,
    funnel_lag: Family<StreamLabels, Seconds>,
    /// Read at every encoding: the pools' connections are a state, not events.
    db_servers: OnceLock<ServerSource>,
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
        let outbox_rows = Family::<OutboxLabels, Gauge>::default();
        let outbox_oldest_pending = Family::<TenantLabels, Seconds>::default();
        let delivery_attempts = Family::<AttemptLabels, Counter>::default();
        let delivery_seconds =
            Family::<CrmLabels, Histogram>::new_with_constructor(|| Histogram::new(DELIVERY_BUCKETS));
        let rate_limit_waits = Family::<LimitLabels, Counter>::default();
        let rate_limit_wait_seconds = Family::<LimitLabels, Counter<f64, AtomicU64>>::default();
        let db_connections = Family::<ServerLabels, Gauge>::default();
        let db_connection_budget = Family::<ServerLabels, Gauge>::default();
        let db_connection_waiters = Family::<ServerLabels, Gauge>::default();
        let funnel_ingested = Family::<CrmLabels, Counter>::default();
        let funnel_lag = Family::<StreamLabels, Seconds>::default();
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
        let per_tenant = TenantFamilies::register(&mut registry);
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
        registry.register(
            "crm_connect_rate_limit_waits",
            "CRM requests that waited before they were sent, by CRM and limit (quota: this process's budget per \
             account or portal; method_pause: a Bitrix24 method out of its time budget)",
            rate_limit_waits.clone(),
        );
        registry.register(
            "crm_connect_rate_limit_wait_seconds",
            "Time CRM requests spent waiting for a rate limit, by CRM and limit",
            rate_limit_wait_seconds.clone(),
        );
        registry.register(
            "crm_connect_db_connections",
            "Connections to a PostgreSQL server open or being opened, over all its tenant databases",
            db_connections.clone(),
        );
        registry.register(
            "crm_connect_db_connection_budget",
            "Connections this process may hold to a PostgreSQL server (--db-connections)",
            db_connection_budget.clone(),
        );
        registry.register(
            "crm_connect_db_connection_waiters",
            "Work waiting for a place in a PostgreSQL server's connection budget",
            db_connection_waiters.clone(),
        );
        registry.register(
            "crm_connect_funnel_ingested",
            "Stage changes stored in crm_stage_changes by the daemon's funnel polls, by CRM",
            funnel_ingested.clone(),
        );
        registry.register(
            "crm_connect_funnel_lag_seconds",
            "How far behind now a tenant's funnel stream is complete (its complete_to), as its last poll left it",
            funnel_lag.clone(),
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
            per_tenant,
            outbox_rows,
            outbox_oldest_pending,
            delivery_attempts,
            delivery_seconds,
            rate_limit_waits,
            rate_limit_wait_seconds,
            db_connections,
            db_connection_budget,
            db_connection_waiters,
            funnel_ingested,
            funnel_lag,
            db_servers: OnceLock::new(),
        };
        for crm in Crm::ALL {
            let _ = metrics.funnel_ingested.get_or_create(&CrmLabels { crm });
            for outcome in AttemptOutcome::ALL {
                let _ = metrics.delivery_attempts.get_or_create(&AttemptLabels { crm, outcome });
            }
        }
        for (crm, limit) in LIMITS {
            let _ = metrics.rate_limit_waits.get_or_create(&LimitLabels { crm, limit });
            let _ = metrics.rate_limit_wait_seconds.get_or_create(&LimitLabels { crm, limit });
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

    /// What a delivery pass found in a tenant's outbox.
    pub fn outbox(&self, tenant: &str, pending: i64, sending: i64, oldest_pending_seconds: f64) {
        for (state, count) in [("pending", pending), ("sending", sending)] {
            self.outbox_rows.get_or_create(&OutboxLabels { tenant: tenant.into(), state }).set(count);
        }
        self.outbox_oldest_pending.get_or_create(&TenantLabels { tenant: tenant.into() }).set(oldest_pending_seconds);
    }

    /// A funnel poll stored `rows` changes of `crm`.
    pub fn funnel_ingested(&self, crm: Crm, rows: u64) {
        self.funnel_ingested.get_or_create(&CrmLabels { crm }).inc_by(rows);
    }

    /// How far behind now a tenant's funnel stream is complete.
    pub fn funnel_lag(&self, tenant: &str, stream: &'static str, seconds: f64) {
        self.funnel_lag.get_or_create(&StreamLabels { tenant: tenant.into(), stream }).set(seconds.max(0.0));
    }

    /// A lead delivered `seconds` after its insert.
    pub fn lead_delivered(&self, crm: Crm, seconds: f64) {
        self.delivery_seconds.get_or_create(&CrmLabels { crm }).observe(seconds.max(0.0));
    }

    /// One lead send or lookup and its outcome.
    pub fn delivery_attempt(&self, crm: Crm, outcome: AttemptOutcome) {
        self.delivery_attempts.get_or_create(&AttemptLabels { crm, outcome }).inc();
    }

    /// One CRM request waited `waited` for a rate limit.
    pub fn rate_limit_wait(&self, crm: Crm, limit: RateLimit, waited: Duration) {
        let labels = LimitLabels { crm, limit };
        self.rate_limit_waits.get_or_create(&labels).inc();
        self.rate_limit_wait_seconds.get_or_create(&labels).inc_by(waited.as_secs_f64());
    }

    /// Where the connections of each PostgreSQL server are read from at
    /// every encoding (the pools); the first source given stays.
    pub fn watch_db_servers(&self, source: impl Fn() -> Vec<ServerConnections> + Send + Sync + 'static) {
        let _ = self.db_servers.set(Box::new(source));
    }

    fn read_db_servers(&self) {
        let Some(source) = self.db_servers.get() else { return };
        for server in source() {
            let labels = ServerLabels { server: server.server };
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.db_connections.get_or_create(&labels).set(count(server.open));
            self.db_connection_budget.get_or_create(&labels).set(count(server.budget));
            self.db_connection_waiters.get_or_create(&labels).set(count(server.waiting));
        }
    }

    /// The OpenMetrics text exposition, served as [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        self.read_db_servers();
        let mut text = String::new();
        // Writing into a String fails only if a metric's own encoder does,
        // which the built-in metric types never do.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        text
    }

    /// The same in the classic text format, served as [`CLASSIC_CONTENT_TYPE`].
    pub fn encode_classic(&self) -> String {
        text::classic(&self.encode())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use crate::model::CrmState;

    use super::*;

    pub(crate) fn lines(metrics: &Metrics) -> Vec<String> {
        metrics.encode().lines().map(String::from).collect()
    }

    pub(crate) fn has(lines: &[String], line: &str) -> bool {
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
            "crm_connect_tenants{state=\"standby\"} 0",
            "crm_connect_token_refreshes_total{result=\"rejected\"} 0",
            "crm_connect_stage_syncs_total{crm=\"bitrix24\",result=\"ok\"} 0",
            "crm_connect_reconcile_duration_seconds_count 0",
            "crm_connect_rate_limit_waits_total{crm=\"amocrm\",limit=\"quota\"} 0",
            "crm_connect_rate_limit_wait_seconds_total{crm=\"bitrix24\",limit=\"method_pause\"} 0.0",
        ] {
            assert!(has(&lines, line), "missing {line:?} in {lines:#?}");
        }
        assert_eq!(lines.last().map(String::as_str), Some("# EOF"));
        // No source of database servers: no series, and no family shown.
        assert!(!lines.iter().any(|l| l.contains("crm_connect_db_connection")), "{lines:#?}");
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
        m.rate_limit_wait(Crm::Bitrix24, RateLimit::Quota, Duration::from_millis(500));
        m.rate_limit_wait(Crm::Bitrix24, RateLimit::Quota, Duration::from_millis(250));
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
            "crm_connect_rate_limit_waits_total{crm=\"bitrix24\",limit=\"quota\"} 2",
            "crm_connect_rate_limit_wait_seconds_total{crm=\"bitrix24\",limit=\"quota\"} 0.75",
            "crm_connect_rate_limit_waits_total{crm=\"amocrm\",limit=\"quota\"} 0",
            "# TYPE crm_connect_crm_requests counter",
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
    fn database_servers_are_read_at_every_encoding() {
        let m = Metrics::new();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(3));
        let seen = open.clone();
        m.watch_db_servers(move || {
            vec![ServerConnections {
                server: "db1:5432".into(),
                open: seen.load(std::sync::atomic::Ordering::SeqCst),
                budget: 10,
                waiting: 2,
            }]
        });
        let lines = lines(&m);
        for line in [
            "crm_connect_db_connections{server=\"db1:5432\"} 3",
            "crm_connect_db_connection_budget{server=\"db1:5432\"} 10",
            "crm_connect_db_connection_waiters{server=\"db1:5432\"} 2",
        ] {
            assert!(has(&lines, line), "missing {line:?} in {lines:#?}");
        }
        open.store(0, std::sync::atomic::Ordering::SeqCst);
        assert!(has(&self::lines(&m), "crm_connect_db_connections{server=\"db1:5432\"} 0"));
    }
}
