//! Everything a tenant operation needs, passed explicitly: the database
//! pools, the HTTP layer, the token pairs this process obtained, retry timing.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::crm::{Http, RetryPolicy};
use crate::db::{PoolSettings, Pools};
use crate::metrics::{Metrics, ServerConnections};
use crate::tokens::{TokenService, Vault};

#[derive(Clone)]
pub struct Context {
    pub pools: Pools,
    pub http: Http,
    /// Token pairs from the CRM's answer until their commit, and the token
    /// requests in flight.
    pub vault: Vault,
    /// How long CRM calls keep retrying transient failures, and how fast.
    pub retry: RetryPolicy,
    pub metrics: Arc<Metrics>,
    /// `POST /leads/wake` to the daemon's loop.
    pub wakes: Wakes,
}

/// Lead-delivery wake-ups, from the HTTP side to whoever subscribed (the
/// daemon); without a subscriber a wake does nothing.
#[derive(Clone, Default)]
pub struct Wakes(Arc<Mutex<Option<mpsc::UnboundedSender<String>>>>);

impl Wakes {
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<String> {
        let (sender, receiver) = mpsc::unbounded_channel();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
        receiver
    }

    pub fn wake(&self, slug: &str) {
        if let Some(sender) = self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = sender.send(slug.to_string());
        }
    }
}

impl Context {
    /// Must be called inside a tokio runtime (the pools start a task).
    pub fn new(pool_settings: PoolSettings) -> Context {
        let metrics = Arc::new(Metrics::new());
        let pools = Pools::new(pool_settings).counting_busy_retries(metrics.db_busy_retries());
        let watched = pools.clone();
        metrics.watch_db_servers(move || {
            let servers = watched.servers().into_iter();
            servers
                .map(|s| ServerConnections { server: s.server, open: s.open, budget: s.budget, waiting: s.waiting })
                .collect()
        });
        Context {
            pools,
            http: Http::new(Arc::clone(&metrics)),
            vault: Vault::default(),
            retry: RetryPolicy::default(),
            metrics,
            wakes: Wakes::default(),
        }
    }

    /// What token work needs, from this context.
    pub fn tokens(&self) -> TokenService {
        TokenService {
            http: self.http.clone(),
            retry: self.retry,
            vault: self.vault.clone(),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// CRM requests give up after `timeout` (default 30 s).
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Context {
        self.http = Http::with_timeout(self.metrics.clone(), timeout);
        self
    }
}
