//! The long-running daemon: one loop over one closed [`Event`] enum — files
//! changed, reload, a tenant's stage resync, token refresh or retry due, a
//! tenant's work done, a lease answer, heartbeat. Work runs in tasks, at
//! most one per tenant at a time and at most `--concurrency` at once; what
//! arrives while a tenant is busy is merged and runs once afterwards with
//! the newest file. This file owns the loop, the dispatch and a tenant's
//! work queue; deciding what a reload changes (`registry`), the lease, the
//! first pass and the work itself live in their own files.

mod event;
mod delivery;
mod first_pass;
mod funnel;
mod job;
mod lease;
mod lease_events;
mod observe;
mod permits;
mod policy;
mod registry;
mod reload;
mod schedule;
mod systemd;
mod tenant;
mod view;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::cli::GlobalArgs;
use crate::context::Context;
use crate::metrics::TenantState;
use crate::model::CrmState;
use crate::watch::ConfigWatcher;

use event::Event;
use first_pass::FirstPass;
use job::Outcome;
use permits::Permits;
use registry::Reread;
use schedule::Crons;
use tenant::{Tenant, Work};
pub use view::{Liveness, TenantsView};

/// A periodic rescan catches what file events miss (inotify overflows,
/// network file systems without events).
const RESCAN_EVERY: Duration = Duration::from_secs(30);
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
        permits: Permits::new(global.concurrency.get()),
        global,
        ctx,
        events,
        crons,
        tenants: HashMap::new(),
        invalid: HashMap::new(),
        watcher: None,
        tasks: JoinSet::new(),
        view: TenantsView::default(),
        liveness: Liveness::default(),
        first_pass: FirstPass::new(hooks.first_pass),
        holder: lease::holder_id(),
        http_stop: None,
        http_task: None,
        next_job: 0,
        delivery: crate::leads::Delivery::default(),
        polls: crate::funnel::Polls::default(),
        known: Default::default(),
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
    invalid: HashMap<PathBuf, registry::Digest>,
    /// `None` when the directory cannot be watched: the periodic rescan
    /// stands in for it.
    watcher: Option<ConfigWatcher>,
    tasks: JoinSet<()>,
    permits: Permits,
    view: TenantsView,
    liveness: Liveness,
    first_pass: FirstPass,
    /// This process's lease holder id (host, pid, random part).
    holder: String,
    /// Dropped at shutdown, which stops the HTTP endpoint; the task ends
    /// once its open requests are done.
    http_stop: Option<oneshot::Sender<()>>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    next_job: u64,
    /// What lead delivery remembers between passes.
    delivery: crate::leads::Delivery,
    polls: crate::funnel::Polls,
    /// The valid files as the last read found them.
    known: crate::config::Known,
}

impl Daemon {
    /// Every source (the channel, the watch, SIGHUP, the loop's own clocks)
    /// becomes an [`Event`] here, and [`Daemon::handle`] is the one place
    /// that acts on it.
    async fn main_loop(
        mut self,
        mut receiver: UnboundedReceiver<Event>,
        shutdown: impl Future<Output = ()>,
    ) -> ExitCode {
        let (changed_tx, mut changed) = mpsc::unbounded_channel();
        self.watcher = match ConfigWatcher::start(&self.global.config, changed_tx) {
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
        let mut wakes = self.ctx.wakes.subscribe();
        let ready_at_the_latest = tokio::time::sleep(READY_WITHIN);
        tokio::pin!(shutdown, ready_at_the_latest);

        self.liveness.beat();
        self.rescan(Reread::All).await;
        loop {
            let event = tokio::select! {
                _ = &mut shutdown => break,
                Some(event) = receiver.recv() => event,
                Some(rewatch) = changed.recv() => Event::FilesChanged { rewatch },
                Some(()) = recv_signal(&mut hangup) => Event::Reload,
                _ = rescan.tick() => Event::RescanDue,
                Some(slug) = exchanged.recv() => Event::Exchanged(slug),
                Some(slug) = wakes.recv() => Event::LeadsDue(slug),
                // Finished tasks leave nothing behind.
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => continue,
                () = &mut ready_at_the_latest, if self.first_pass.is_on() => Event::FirstPassOverdue,
                _ = heartbeat.tick() => Event::Heartbeat,
            };
            self.handle(event).await;
        }
        self.stop().await;
        ExitCode::SUCCESS
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Cron(expr) => self.cron_fired(&expr).await,
            Event::TokenDue(slug) | Event::Exchanged(slug) => self.request(&slug, Work::Refresh),
            Event::Retry(slug) => self.request(&slug, Work::Reconcile),
            Event::Done(slug, job, outcome) => self.done(&slug, job, outcome),
            Event::LeaseDue(slug) => self.check_lease(&slug),
            Event::Lease(slug, answer) => self.lease(&slug, answer),
            Event::LeaseExpired(slug) => self.lease_expired(&slug),
            Event::LeadsDue(slug) => self.deliver(&slug),
            Event::Delivered(slug, report) => self.delivered(&slug, report),
            Event::FunnelDue(slug) => self.poll_funnel(&slug),
            Event::FunnelPolled(slug, report) => self.funnel_polled(&slug, report),
            Event::FilesChanged { rewatch } => {
                if let (true, Some(watcher)) = (rewatch, self.watcher.as_mut()) {
                    watcher.ensure();
                }
                self.rescan(Reread::Changed).await;
            }
            Event::RescanDue => self.rescan(Reread::Changed).await,
            Event::Reload => {
                tracing::info!("SIGHUP: reloading every tenant");
                systemd::reloading();
                self.rescan(Reread::All).await;
                systemd::ready();
            }
            Event::FirstPassOverdue => {
                tracing::warn!(
                    left = self.first_pass.left(),
                    "first pass not done after {}s; ready anyway",
                    READY_WITHIN.as_secs()
                );
                self.first_pass.end(self.tenants.len());
            }
            Event::Heartbeat => {
                self.liveness.beat();
                systemd::watchdog();
            }
        }
    }

    async fn cron_fired(&mut self, expr: &str) {
        let (now, next) = (Utc::now(), self.crons.next_run(expr).await);
        let mut due = Vec::new();
        // An expression's runs need not be evenly spaced (weekdays only,
        // say): its interval as of now, worked out once for its tenants.
        let mut interval = None;
        for tenant in self.tenants.values_mut().filter(|t| t.cron_expr.as_deref() == Some(expr)) {
            tenant.last_resync = Some(now);
            tenant.next_resync = next;
            self.ctx.metrics.schedule(&tenant.config.slug, Some(now), next);
            let interval = *interval.get_or_insert_with(|| tenant.config.schedule.stage_resync.interval_at(now));
            due.push((tenant.config.slug.clone(), interval));
        }
        for (slug, interval) in due {
            self.publish_interval(&slug, interval);
            self.request(&slug, Work::Resync);
        }
    }

    /// Runs `work` for a tenant now, or after its current work (merged).
    fn request(&mut self, slug: &str, work: Work) {
        let ctx = self.ctx.clone();
        let leased = self.global.lease.is_some();
        self.next_job += 1;
        let job_id = self.next_job;
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
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
        let job = job::Job {
            ctx,
            config: tenant.config.clone(),
            work,
            schedule: (tenant.last_resync, tenant.next_resync),
            awaiting_authorization: tenant.state == TenantState::Is(CrmState::NeedsAuthorization),
        };
        tenant.job_id = job_id;
        let (events, permits, name) = (self.events.clone(), self.permits.clone(), slug.to_string());
        let handle = self.tasks.spawn(async move {
            let _permits = permits.bulk().await;
            let outcome = job.run_guarded().await;
            let _ = events.send(Event::Done(name, job_id, outcome));
        });
        if let Some(tenant) = self.tenants.get_mut(slug) {
            tenant.job = Some(handle);
        }
    }

    fn done(&mut self, slug: &str, job_id: u64, outcome: Outcome) {
        let events = self.events.clone();
        let Some(tenant) = self.tenants.get_mut(slug) else { return };
        if tenant.job_id != job_id || tenant.running.is_none() {
            // Work that was stopped (the lease was lost) and ended anyway.
            return;
        }
        tenant.running = None;
        tenant.job = None;
        let was = tenant.state;
        let steps: Vec<_> = outcome
            .failures()
            .map(|f| {
                let known = was == TenantState::Is(f.state()) && outcome.work == Work::Refresh;
                (f.crm, policy::error_policy(slug, f, known, &self.ctx.metrics))
            })
            .collect();
        tenant.after(&outcome, &steps, &events);
        let queued = tenant.queued.take();
        // Recorded (states published) before the first pass can be declared
        // done: whoever waits for READY reads the metrics next.
        self.record(slug, &outcome, was);
        self.first_pass.done_with(slug, self.tenants.len());
        self.start_delivery(slug);
        self.start_funnel(slug);
        if let Some(work) = queued {
            self.request(slug, work);
        }
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
        self.ctx.tokens().settle(SHUTDOWN_PAIRS_WITHIN).await;
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
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}
