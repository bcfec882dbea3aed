//! The opt-in lease (`--lease`): one active daemon per tenant, with the
//! tenant's database as the coordination point. Taken or renewed with one
//! conditional UPDATE; the others stand by and take over when it lapses.

use std::time::Duration;

use crate::config::TenantConfig;
use crate::context::Context;
use crate::db::{self, queries};

/// Unique per process: host name, pid and a random part, so two daemons on
/// one host are two holders.
pub(crate) fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// Takes or renews the lease; the tables are created first if needed
/// (migrations touch only the database, never the CRM).
pub(crate) async fn take(
    ctx: &Context,
    config: &TenantConfig,
    holder: &str,
    duration: Duration,
) -> Result<bool, String> {
    let db = ctx.pools.get(&config.slug, &config.database_url).map_err(|e| e.to_string())?;
    db::migrate(&db).await.map_err(|e| e.to_string())?;
    let client = db.client().await.map_err(|e| e.to_string())?;
    queries::take_lease(&**client, holder, duration)
        .await
        .map_err(|e| db.query_error("taking the lease", e).to_string())
}

/// Gives the lease up at once, so that a standby takes over without waiting.
pub(crate) async fn release(ctx: &Context, config: &TenantConfig, holder: &str) {
    let released = tokio::time::timeout(Duration::from_secs(1), async {
        let db = ctx.pools.get(&config.slug, &config.database_url).ok()?;
        let client = db.client().await.ok()?;
        queries::release_lease(&**client, holder).await.ok()
    })
    .await;
    if !matches!(released, Ok(Some(()))) {
        tracing::warn!(tenant = %config.slug, "could not release the lease; it lapses by itself");
    }
}
