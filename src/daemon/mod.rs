//! The long-running daemon: one loop over a closed set of events — files
//! changed, reload, a tenant's stage resync, token refresh or retry due, a
//! tenant's work done, shutdown. Work runs in tasks, at most one per tenant
//! at a time and at most `--concurrency` at once; what arrives while a
//! tenant is busy is merged and runs once afterwards with the newest file.

mod lease;
mod schedule;
mod systemd;
mod tenant;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::Utc;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

use crate::cli::GlobalArgs;
use crate::config::{self, LoadOptions, TenantConfig};
use crate::context::Context;
use crate::model::CrmState;
use crate::watch::ConfigWatcher;

use schedule::{Crons, timer};
use tenant::{Outcome, Tenant, Work};

/// A periodic rescan catches what file events miss (inotify overflows,
/// network file systems without events).
const RESCAN_EVERY: Duration = Duration::from_secs(30);
/// Reading the files (secret files among them) gives up after this.
const RESCAN_WITHIN: Duration = Duration::from_secs(10);
/// READY=1 (and the first-pass hook) at the latest this long after start:
/// slow tenants go on connecting, the service counts as started.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// At SIGTERM, work other than token requests gets this long to finish
/// before it is stopped (token requests run to their own end).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Then registered pairs get this long to be written.
const SHUTDOWN_PAIRS_WITHIN: Duration = Duration::from_secs(2);

/// Ways for an embedding caller (tests, `demo`) to observe and steer a run.
#[derive(Default)]
pub struct Hooks {
    /// Told once the first reconcile pass over every tenant is done.
    pub first_pass: Option<oneshot::Sender<()>>,
    /// The context to run with (tests: quick retries); default: a new one.
    pub context: Option<Context>,
}

/// The tenants in force, as the HTTP side may read them.
#[derive(Clone, Default)]
pub struct TenantsView(Arc<RwLock<BTreeMap<String, TenantConfig>>>);

impl TenantsView {
    pub fn get(&self, slug: &str) -> Option<TenantConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(slug).cloned()
    }

    pub fn slugs(&self) -> Vec<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    pub(crate) fn set(&self, tenant: TenantConfig) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).insert(tenant.slug.clone(), tenant);
    }

    pub(crate) fn remove(&self, slug: &str) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(slug);
    }
}

/// When the main loop last went round: `/healthz` answers 200 only while
/// it keeps going.
#[derive(Clone, Default)]
pub struct Liveness(Arc<AtomicU64>);

impl Liveness {
    pub(crate) fn beat(&self) {
        self.0.store(unix_millis(), Ordering::Relaxed);
    }

    /// Time since the last beat (`Duration::MAX` before the first).
    pub fn age(&self) -> Duration {
        match self.0.load(Ordering::Relaxed) {
            0 => Duration::MAX,
            last => Duration::from_millis(unix_millis().saturating_sub(last)),
        }
    }
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The closed set of things the loop reacts to.
pub(crate) enum Event {
    /// A stage-resync cron expression fired (for every tenant using it).
    Cron(String),
    /// A tenant's token is due for refresh.
    TokenDue(String),
    /// A tenant's failed work may be tried again.
    Retry(String),
    /// A tenant's work (its job number) finished.
    Done(String, u64, Outcome),
    /// A tenant's lease is due for renewal, or (not held) for another try.
    LeaseDue(String),
    /// The answer of an attempt to take or renew a tenant's lease.
    Lease(String, lease::Answer),
    /// This process's own view of a tenant's lease may have ended.
    LeaseExpired(String),
    /// A pair was exchanged and stored for a tenant outside its work (the
    /// OAuth callback): its token timer is re-armed.
    Exchanged(String),
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signals() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs until `shutdown` resolves; exit code 0 after a clean shutdown.
pub async fn run(global: GlobalArgs, hooks: Hooks, shutdown: impl Future<Output = ()> + Send) -> ExitCode {
    let ctx = hooks.context.unwrap_or_else(|| Context::new(global.pool_settings()));
    let (events, receiver) = mpsc::unbounded_channel();
    let crons = match Crons::start().await {
        Ok(crons) => crons,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the scheduler");
            return ExitCode::FAILURE;
        }
    };
    let mut daemon = Daemon {
        permits: Arc::new(Semaphore::new(global.concurrency.get())),
        global,
        ctx,
        events,
        crons,
        tenants: HashMap::new(),
        invalid: HashMap::new(),
        tasks: JoinSet::new(),
        view: TenantsView::default(),
        liveness: Liveness::default(),
        first_pass: hooks.first_pass,
        holder: lease::holder_id(),
        in_first_pass: true,
        first_pass_left: 0,
        http_stop: None,
        http_task: None,
        next_job: 0,
    };
    if let Err(e) = daemon.serve_http().await {
        tracing::error!(error = %e, "cannot listen");
        eprintln!("crm-connect: {e}");
        return ExitCode::from(2);
    }
    daemon.main_loop(receiver, shutdown).await
}

struct Daemon {
    global: GlobalArgs,
    ctx: Context,
    events: UnboundedSender<Event>,
    crons: Crons,
    /// The tenants in force, by slug.
    tenants: HashMap<String, Tenant>,
    /// Invalid files and the content last reported (reported once each).
    invalid: HashMap<PathBuf, Option<[u8; 32]>>,
    tasks: JoinSet<()>,
    permits: Arc<Semaphore>,
    view: TenantsView,
    liveness: Liveness,
    first_pass: Option<oneshot::Sender<()>>,
    /// This process's lease holder id (host, pid, random part).
    holder: String,
    /// Until the first pass is over: READY is sent, the hook told, once.
    in_first_pass: bool,
    first_pass_left: usize,
    /// Dropped at shutdown, which stops the HTTP endpoint; the task ends
    /// once its open requests are done.
    http_stop: Option<oneshot::Sender<()>>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    next_job: u64,
}

impl Daemon {
    async fn main_loop(
        mut self,
        mut receiver: UnboundedReceiver<Event>,
        shutdown: impl Future<Output = ()>,
    ) -> ExitCode {
        let (changed_tx, mut changed) = mpsc::unbounded_channel();
        let mut watcher = match ConfigWatcher::start(&self.global.config, changed_tx) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the configuration; rescanning every {}s", RESCAN_EVERY.as_secs());
                None
            }
        };
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut rescan = tokio::time::interval(RESCAN_EVERY);
        rescan.tick().await;
        let mut heartbeat = tokio::time::interval(systemd::heartbeat_interval());
        let mut exchanged = self.ctx.vault.subscribe_exchanges();
        let ready_at_the_latest = tokio::time::sleep(READY_WITHIN);
        tokio::pin!(shutdown, ready_at_the_latest);

        self.liveness.beat();
        self.rescan(true).await;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(event) = receiver.recv() => self.handle(event).await,
                Some(rewatch) = changed.recv() => {
                    if let (true, Some(w)) = (rewatch, watcher.as_mut()) {
                        w.ensure();
                    }
                    self.rescan(false).await;
                }
                Some(()) = recv_signal(&mut hangup) => {
                    tracing::info!("SIGHUP: reloading every tenant");
                    systemd::reloading();
                    self.rescan(true).await;
                    systemd::ready();
                }
                _ = rescan.tick() => self.rescan(false).await,
                Some(slug) = exchanged.recv() => self.handle(Event::Exchanged(slug)).await,
                // Finished tasks leave nothing behind.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                () = &mut ready_at_the_latest, if self.in_first_pass => {
                    tracing::warn!(left = self.first_pass_left, "first pass not done after {}s; ready anyway", READY_WITHIN.as_secs());
                    self.finish_first_pass();
                }
                _ = heartbeat.tick() => {
                    self.liveness.beat();
                    systemd::watchdog();
                }
            }
        }
        self.stop().await;
        ExitCode::SUCCESS
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Cron(expr) => {
                let (now, next) = (Utc::now(), self.crons.next_run(&expr).await);
                let mut due = Vec::new();
                for tenant in self.tenants.values_mut().filter(|t| t.cron_expr.as_deref() == Some(expr.as_str())) {
                    tenant.last_resync = Some(now);
                    tenant.next_resync = next;
                    self.ctx.metrics.schedule(&tenant.config.slug, Some(now), next);
                    due.push(tenant.config.slug.clone());
                }
                for slug in due {
                    self.request(&slug, Work::Resync);
                }
            }
            Event::TokenDue(slug) | Event::Exchanged(slug) => self.request(&slug, Work::Refresh),
            Event::Retry(slug) => self.request(&slug, Work::Reconcile),
            Event::Done(slug, job, outcome) => self.done(&slug, job, outcome),
            Event::LeaseDue(slug) => self.check_lease(&slug),
            Event::Lease(slug, answer) => self.lease(&slug, answer),
            Event::LeaseExpired(slug) => self.lease_expired(&slug),
        }
    }

    /// Asks the tenant's database whether this process holds its lease;
    /// the attempt waits for a work permit like everything else.
    fn check_lease(&mut self, slug: &str) {
        let Some(duration) = self.global.lease else { return };
        let (ctx, holder, events, permits) =
            (self.ctx.clone(), self.holder.clone(), self.events.clone(), self.permits.clone());
        let Some(tenant) = self.by_slug_mut(slug) else { return };
        if std::mem::replace(&mut tenant.lease_checking, true) {
            return;
        }
        let config = tenant.config.clone();
        self.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let answer = lease::take(&ctx, &config, &holder, duration).await;
            let _ = events.send(Event::Lease(config.slug.clone(), answer));
        });
    }

    fn lease(&mut self, slug: &str, answer: lease::Answer) {
        let Some(duration) = self.global.lease else { return };
        let events = self.events.clone();
        let Some(tenant) = self.by_slug_mut(slug) else { return };
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
                tenant.holds_lease && tenant.lease_until.is_some_and(|until| until > std::time::Instant::now())
            }
        };
        if let Some(until) = tenant.lease_until.filter(|_| holds) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            tenant.lease_timers.push(timer(left, events, Event::LeaseExpired(slug.to_string())));
        }
        let was = tenant.holds_lease;
        let first = tenant.in_first_pass;
        match (was, holds) {
            (false, true) => {
                tenant.holds_lease = true;
                tracing::info!(tenant = slug, "took the lease: this daemon runs the tenant");
                self.request(slug, Work::Reconcile);
            }
            (true, false) => self.lose_lease(slug),
            (false, false) if first => {
                // Another daemon runs it: this one's first pass is done with it.
                tenant.in_first_pass = false;
                self.first_pass_done_with_one();
            }
            _ => {}
        }
    }

    /// The local expiry timer fired: unless a renewal moved it on, the lease
    /// is over for this process.
    fn lease_expired(&mut self, slug: &str) {
        let Some(tenant) = self.by_slug(slug) else { return };
        let over = tenant.lease_until.is_none_or(|until| until <= std::time::Instant::now());
        if tenant.holds_lease && over {
            tracing::warn!(tenant = slug, "the lease expired without a successful renewal");
            self.lose_lease(slug);
        }
    }

    /// Stands by at once: no more work, no CRM call (a token request in
    /// flight runs to its end in a task of its own, its pair registered).
    fn lose_lease(&mut self, slug: &str) {
        let Some(tenant) = self.by_slug_mut(slug) else { return };
        tenant.holds_lease = false;
        tenant.lease_until = None;
        let was_running = tenant.running.is_some();
        tenant.stop_work();
        let first = was_running && std::mem::take(&mut tenant.in_first_pass);
        tracing::info!(tenant = slug, "lost the lease: standing by");
        if first {
            self.first_pass_done_with_one();
        }
    }

    fn first_pass_done_with_one(&mut self) {
        self.first_pass_left = self.first_pass_left.saturating_sub(1);
        if self.in_first_pass && self.first_pass_left == 0 {
            self.finish_first_pass();
        }
    }

    /// Reads every file and applies what changed; with `all`, every valid
    /// tenant is reconciled whatever changed (start, SIGHUP: secrets from
    /// the environment or credentials may have changed). Tenants are their
    /// slugs: a file renamed with its slug kept is the same tenant. The
    /// files are read off the loop, within a time limit (a secret file on
    /// a hung network mount must not stop the daemon).
    async fn rescan(&mut self, all: bool) {
        let (dir, options) = (self.global.config.clone(), LoadOptions::new(self.global.database_url_template.clone()));
        let reading = tokio::task::spawn_blocking(move || config::load(&dir, &options));
        let loaded = match tokio::time::timeout(RESCAN_WITHIN, reading).await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the configuration failed; the tenants in force stay");
                return;
            }
            Err(_) => {
                tracing::error!(within = ?RESCAN_WITHIN, "reading the configuration took too long; the tenants in force stay");
                return;
            }
        };
        for problem in loaded.problems.iter() {
            tracing::warn!(problem = %problem, "configuration");
        }
        let mut present = HashSet::new();
        let mut invalid = HashMap::new();
        for file in loaded.files {
            let Some(config) = file.tenant else {
                // The last good configuration of the tenant at this path stays in force.
                if let Some(known) = self.tenants.values().find(|t| t.config.file == file.path) {
                    present.insert(known.config.slug.clone());
                }
                if self.invalid.get(&file.path) != Some(&file.digest) {
                    for problem in file.problems.iter().filter(|p| p.is_error()) {
                        tracing::error!(problem = %problem, "invalid tenant file; keeping its last good configuration");
                    }
                }
                invalid.insert(file.path, file.digest);
                continue;
            };
            present.insert(config.slug.clone());
            let known = self.tenants.get_mut(&config.slug);
            let renamed = known.as_ref().is_some_and(|t| t.config.file != config.file);
            let unchanged = known.as_ref().is_some_and(|t| t.digest == file.digest);
            if let (Some(tenant), true) = (known, renamed) {
                tracing::info!(tenant = %config.slug, file = %config.file.display(), "tenant file renamed; same tenant");
                if unchanged {
                    tenant.config.file = config.file.clone();
                    self.view.set(tenant.config.clone());
                }
            }
            if unchanged && !all {
                continue;
            }
            self.upsert(file.digest, config).await;
        }
        // Checked again on every rescan: a file invalid only because a
        // secret is missing applies once the secret appears.
        self.invalid = invalid;
        let gone: Vec<String> = self.tenants.keys().filter(|slug| !present.contains(*slug)).cloned().collect();
        for slug in gone {
            self.remove(&slug).await;
        }
        if self.in_first_pass && self.first_pass_left == 0 {
            self.finish_first_pass();
        }
    }

    /// A new or changed tenant: keep its configuration, (re)arm its cron job
    /// when the expression changed, reconcile it.
    async fn upsert(&mut self, digest: Option<[u8; 32]>, config: TenantConfig) {
        let slug = config.slug.clone();
        let expr = config.schedule.stage_resync.with_seconds.clone();
        let is_new = !self.tenants.contains_key(&slug);
        let tenant = self.tenants.entry(slug.clone()).or_insert_with(|| Tenant::new(config.clone()));
        tenant.config = config.clone();
        tenant.digest = digest;
        if tenant.cron_expr.as_deref() != Some(expr.as_str()) {
            let old = tenant.cron_expr.take();
            if let Some(old) = old {
                self.crons.unsubscribe(&old).await;
            }
            match self.crons.subscribe(&expr, &self.events).await {
                Ok(()) => {
                    let next = self.crons.next_run(&expr).await;
                    if let Some(tenant) = self.by_slug_mut(&slug) {
                        tenant.cron_expr = Some(expr);
                        tenant.next_resync = next;
                    }
                    self.ctx.metrics.schedule(&slug, None, next);
                }
                Err(e) => tracing::error!(tenant = %slug, error = %e, "cannot schedule the stage resync"),
            }
        }
        self.view.set(config);
        if is_new && self.in_first_pass {
            self.first_pass_left += 1;
            if let Some(tenant) = self.by_slug_mut(&slug) {
                tenant.in_first_pass = true;
            }
        }
        tracing::info!(tenant = %slug, new = is_new, "reconciling");
        if self.global.lease.is_some() && is_new {
            self.check_lease(&slug);
        } else {
            self.request(&slug, Work::Reconcile);
        }
    }

    /// A removed file: schedules stopped, state `unmanaged`, nothing deleted.
    async fn remove(&mut self, slug: &str) {
        let Some(mut tenant) = self.tenants.remove(slug) else { return };
        let slug = tenant.config.slug.clone();
        tracing::info!(tenant = %slug, "file removed: tenant no longer managed");
        if let Some(expr) = tenant.cron_expr.take() {
            self.crons.unsubscribe(&expr).await;
        }
        tenant.cancel_timers();
        tenant.cancel_lease_timers();
        if tenant.in_first_pass {
            self.first_pass_left = self.first_pass_left.saturating_sub(1);
        }
        self.view.remove(&slug);
        self.ctx.metrics.forget_tenant(&slug);
        let (ctx, config, holder) = (self.ctx.clone(), tenant.config.clone(), self.holder.clone());
        let release = tenant.holds_lease;
        self.tasks.spawn(async move {
            // A standby takes over at once, should the file live on elsewhere.
            if release {
                lease::release(&ctx, &config, &holder).await;
            }
            tenant::mark_unmanaged(&ctx, &config).await
        });
        self.publish_states();
    }

    /// Runs `work` for a tenant now, or after its current work (merged).
    fn request(&mut self, slug: &str, work: Work) {
        let ctx = self.ctx.clone();
        let leased = self.global.lease.is_some();
        self.next_job += 1;
        let job_id = self.next_job;
        let Some(tenant) = self.by_slug_mut(slug) else { return };
        let lease_over = tenant.lease_until.is_none_or(|until| until <= std::time::Instant::now());
        if leased && (!tenant.holds_lease || lease_over) {
            return;
        }
        if tenant.running.is_some() {
            tenant.queued = Some(tenant.queued.map_or(work, |q| q.max(work)));
            return;
        }
        tenant.running = Some(work);
        if let Some(retry) = tenant.retry_timer.take() {
            retry.abort();
        }
        let job = tenant::Job {
            ctx,
            config: tenant.config.clone(),
            work,
            schedule: (tenant.last_resync, tenant.next_resync),
            awaiting_authorization: tenant.state == CrmState::NeedsAuthorization.as_str(),
        };
        tenant.job_id = job_id;
        let (events, permits, name) = (self.events.clone(), self.permits.clone(), slug.to_string());
        let handle = self.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let outcome = job.run_guarded().await;
            let _ = events.send(Event::Done(name, job_id, outcome));
        });
        if let Some(tenant) = self.by_slug_mut(slug) {
            tenant.job = Some(handle);
        }
    }

    fn done(&mut self, slug: &str, job_id: u64, outcome: Outcome) {
        let events = self.events.clone();
        let Some(tenant) = self.by_slug_mut(slug) else { return };
        if tenant.job_id != job_id || tenant.running.is_none() {
            // Work that was stopped (the lease was lost) and ended anyway.
            return;
        }
        tenant.running = None;
        tenant.job = None;
        let finished_first = std::mem::take(&mut tenant.in_first_pass);
        tenant.after(&outcome, &events);
        let queued = tenant.queued.take();
        // Recorded (states published) before the first pass can be declared
        // done: whoever waits for READY reads the metrics next.
        self.record(slug, &outcome);
        if finished_first {
            self.first_pass_left = self.first_pass_left.saturating_sub(1);
            if self.in_first_pass && self.first_pass_left == 0 {
                self.finish_first_pass();
            }
        }
        if let Some(work) = queued {
            self.request(slug, work);
        }
    }

    fn record(&self, slug: &str, outcome: &Outcome) {
        let metrics = &self.ctx.metrics;
        metrics.job_done(outcome.work.as_str());
        if let (Work::Reconcile, Some(elapsed)) = (outcome.work, outcome.elapsed) {
            metrics.reconcile_duration(elapsed.as_secs_f64());
        }
        if let Ok(applied) = &outcome.applied {
            for (crm, result) in &applied.crms {
                if matches!(outcome.work, Work::Reconcile | Work::Resync) {
                    metrics.stage_sync(*crm, result.is_ok());
                    if result.is_ok() {
                        metrics.stage_synced(slug, *crm, Utc::now());
                    }
                }
            }
        }
        self.publish_states();
    }

    fn publish_states(&self) {
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for tenant in self.tenants.values() {
            *counts.entry(tenant.state).or_default() += 1;
        }
        let counts: Vec<(&str, i64)> = counts.into_iter().collect();
        self.ctx.metrics.set_tenant_states(&counts);
    }

    fn finish_first_pass(&mut self) {
        self.in_first_pass = false;
        if let Some(first_pass) = self.first_pass.take() {
            let _ = first_pass.send(());
        }
        systemd::ready();
        tracing::info!(tenants = self.tenants.len(), "first reconcile pass done");
    }

    /// Shuts down in the order that loses nothing: no new OAuth callback
    /// (open ones finish), no new schedule or token request, other work
    /// given a grace period and then stopped, token requests in flight run
    /// to their end and every registered pair written, leases released all
    /// at once.
    async fn stop(mut self) {
        systemd::stopping();
        tracing::info!("shutting down");
        drop(self.http_stop.take());
        if let Some(http) = self.http_task.take() {
            let _ = tokio::time::timeout(crate::server::DRAIN + Duration::from_secs(1), http).await;
        }
        for tenant in self.tenants.values_mut() {
            tenant.cancel_timers();
            tenant.cancel_lease_timers();
        }
        self.crons.shutdown().await;
        self.ctx.vault.close();
        let drained =
            tokio::time::timeout(SHUTDOWN_GRACE, async { while self.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("work still running after {}s; stopping it", SHUTDOWN_GRACE.as_secs());
            self.tasks.abort_all();
        }
        crate::tokens::settle(&self.ctx, SHUTDOWN_PAIRS_WITHIN).await;
        let mut releases = JoinSet::new();
        for tenant in self.tenants.values().filter(|t| t.holds_lease) {
            let (ctx, config, holder) = (self.ctx.clone(), tenant.config.clone(), self.holder.clone());
            releases.spawn(async move { lease::release(&ctx, &config, &holder).await });
        }
        while releases.join_next().await.is_some() {}
    }

    /// Binds `--listen` and serves on it; a failure to bind is a startup
    /// error (exit 2): a daemon without its callback is not what was asked.
    async fn serve_http(&mut self) -> Result<(), String> {
        let Some(addr) = self.global.listen else { return Ok(()) };
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let (view, liveness) = (self.view.clone(), self.liveness.clone());
                let lookup = move |slug: &str| view.get(slug);
                let loop_age = move || liveness.age();
                let ctx = self.ctx.clone();
                let (stop_tx, stop_rx) = oneshot::channel::<()>();
                self.http_stop = Some(stop_tx);
                self.http_task = Some(tokio::spawn(async move {
                    let stopped = async move {
                        let _ = stop_rx.await;
                    };
                    if let Err(e) = crate::server::serve(listener, ctx, lookup, loop_age, stopped).await {
                        tracing::error!(error = %e, "the HTTP endpoint stopped");
                    }
                }));
                tracing::info!(%addr, "serving /healthz, /metrics and /oauth/amocrm/callback");
                Ok(())
            }
            Err(e) => Err(format!("cannot listen on {addr}: {e}")),
        }
    }

    fn by_slug(&self, slug: &str) -> Option<&Tenant> {
        self.tenants.get(slug)
    }

    fn by_slug_mut(&mut self, slug: &str) -> Option<&mut Tenant> {
        self.tenants.get_mut(slug)
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
