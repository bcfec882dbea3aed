//! Reading the configuration and applying what changed: the files are read
//! off the loop within a time limit, [`registry::changes`] decides, and
//! this file carries the changes out (cron subscriptions, the view, work
//! requested, removed tenants marked `unmanaged`). It decides nothing
//! about which tenant changed.

use std::collections::HashMap;
use std::time::Duration;

use super::job;
use super::registry::{self, Digest, InForce, Reread, TenantChange};
use super::tenant::{Tenant, Work};
use super::{Daemon, lease};
use crate::config::{self, FileReport, LoadOptions, TenantConfig};
use crate::metrics::TenantState;

/// Reading the files (secret files among them) gives up after this: a
/// secret file on a hung network mount must not stop the daemon.
const RESCAN_WITHIN: Duration = Duration::from_secs(10);

impl Daemon {
    /// Reads every file and applies what changed; with [`Reread::All`],
    /// every valid tenant is reconciled whatever changed.
    pub(super) async fn rescan(&mut self, reread: Reread) {
        let dir = self.global.config.clone();
        let options = LoadOptions::new(self.global.database_url_template.clone());
        // Handed over, not shared: a rescan that fails or times out leaves
        // none, and the next one parses every file.
        let known = match std::mem::take(&mut self.known) {
            known if reread == Reread::Changed => known,
            _ => config::Known::default(),
        };
        let reading = tokio::task::spawn_blocking(move || config::load_reusing(&dir, &options, known));
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
        self.report_invalid(&loaded.files);
        let in_force: HashMap<String, InForce> = self
            .tenants
            .iter()
            .map(|(slug, t)| (slug.clone(), InForce { file: t.config.file.clone(), digest: t.digest }))
            .collect();
        for change in registry::changes(&in_force, &loaded.files, reread) {
            match change {
                TenantChange::Added { config, digest } => self.upsert(digest, config).await,
                TenantChange::Changed { config, digest, moved } => {
                    if moved {
                        tracing::info!(tenant = %config.slug, file = %config.file.display(), "tenant file renamed; same tenant");
                    }
                    self.upsert(digest, config).await;
                }
                TenantChange::Moved { slug, file } => {
                    tracing::info!(tenant = %slug, file = %file.display(), "tenant file renamed; same tenant");
                    if let Some(tenant) = self.tenants.get_mut(&slug) {
                        tenant.config.file = file;
                        self.view.set(tenant.config.clone());
                    }
                }
                TenantChange::Removed(slug) => self.remove(&slug).await,
            }
        }
        self.known = config::Known::of(loaded.files);
        self.first_pass.end_if_none_left(self.tenants.len());
    }

    /// Each invalid file's errors once per content. Checked again on every
    /// rescan all the same: a file invalid only because a secret is missing
    /// applies once the secret appears.
    fn report_invalid(&mut self, files: &[FileReport]) {
        let mut invalid = HashMap::new();
        for file in files.iter().filter(|f| f.tenant.is_none()) {
            if self.invalid.get(&file.path) != Some(&file.digest) {
                for problem in file.problems.iter().filter(|p| p.is_error()) {
                    tracing::error!(problem = %problem, "invalid tenant file; keeping its last good configuration");
                }
            }
            invalid.insert(file.path.clone(), file.digest);
        }
        self.invalid = invalid;
    }

    /// A new or changed tenant: keep its configuration, (re)arm its cron job
    /// when the expression changed, reconcile it.
    async fn upsert(&mut self, digest: Digest, config: TenantConfig) {
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
                    if let Some(tenant) = self.tenants.get_mut(&slug) {
                        tenant.cron_expr = Some(expr);
                        tenant.next_resync = next;
                    }
                    self.ctx.metrics.schedule(&slug, None, next);
                }
                Err(e) => tracing::error!(tenant = %slug, error = %e, "cannot schedule the stage resync"),
            }
        }
        self.view.set(config);
        self.publish_schedule(&slug, chrono::Utc::now());
        if is_new {
            self.first_pass.add(&slug);
            self.ctx.metrics.tenant_state(&slug, TenantState::Pending);
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
        self.first_pass.forget(&slug);
        self.view.remove(&slug);
        self.ctx.metrics.forget_tenant(&slug);
        let (ctx, config, holder) = (self.ctx.clone(), tenant.config.clone(), self.holder.clone());
        let release = tenant.holds_lease;
        self.tasks.spawn(async move {
            // A standby takes over at once, should the file live on elsewhere.
            if release {
                lease::release(&ctx, &config, &holder).await;
            }
            job::mark_unmanaged(&ctx, &config).await
        });
        self.publish_states();
    }
}
