//! What the HTTP side reads of the running daemon: the tenants in force and
//! when the loop last went round. Shared, cheap to clone; the loop writes,
//! the HTTP handlers only read — nothing here decides anything.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::TenantConfig;

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
