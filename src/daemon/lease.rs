//! The opt-in lease (`--lease`): one active daemon per tenant, with the
//! tenant's database as the coordination point. Taken or renewed with one
//! conditional UPDATE; the others stand by and take over when it lapses.
//!
//! The holder's own view is stricter than the database's: its lease ends at
//! the moment its last successful renewal was *sent*, plus the duration,
//! less 10 %. A failed or unanswered renewal never extends it, so a holder
//! cut off from its database stops before a standby can take over.
//!
//! Only the asking: no timers and no daemon state here — what the daemon
//! does with an answer is `lease_events.rs`.

use std::time::{Duration, Instant};

use crate::config::TenantConfig;
use crate::context::Context;
use crate::db;

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

/// Renewed at about a third of the duration.
pub(crate) fn renew_every(duration: Duration) -> Duration {
    (duration / 3).max(Duration::from_millis(100))
}

/// How long this process may act on a lease renewed by a request sent at `sent_at`.
pub(crate) fn held_until(sent_at: Instant, duration: Duration) -> Instant {
    sent_at + duration.mul_f64(0.9)
}

/// The answer to one attempt to take or renew a lease.
#[derive(Debug)]
pub(crate) struct Answer {
    /// When the UPDATE was sent: the lease counts from here, not from the answer.
    pub(crate) sent_at: Instant,
    pub(crate) held: Result<bool, String>,
}

/// Takes or renews the lease. The tables are created only when they are
/// missing (a renewal is one UPDATE, never a migration); the attempt gives
/// up after a third of the duration (an unanswered renewal is a failed one).
pub(crate) async fn take(ctx: &Context, config: &TenantConfig, holder: &str, duration: Duration) -> Answer {
    let mut sent_at = Instant::now();
    let attempt = async {
        let db = ctx.pools.get(&config.slug, &config.database_url)?;
        let session = db.session().await?;
        sent_at = Instant::now();
        match db::lease::take(&session, holder, duration).await {
            Err(e) if e.is_missing_schema() => {
                drop(session);
                db::migrate(&db).await?;
                let session = db.session().await?;
                sent_at = Instant::now();
                db::lease::take(&session, holder, duration).await
            }
            other => other,
        }
    };
    let held = match tokio::time::timeout(renew_every(duration), attempt).await {
        Ok(Ok(held)) => Ok(held),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", renew_every(duration))),
    };
    Answer { sent_at, held }
}

/// Gives the lease up at once, so that a standby takes over without waiting.
pub(crate) async fn release(ctx: &Context, config: &TenantConfig, holder: &str) {
    let released = tokio::time::timeout(Duration::from_secs(1), async {
        let db = ctx.pools.get(&config.slug, &config.database_url).ok()?;
        let session = db.session().await.ok()?;
        db::lease::release(&session, holder).await.ok()
    })
    .await;
    if !matches!(released, Ok(Some(()))) {
        tracing::warn!(tenant = %config.slug, "could not release the lease; it lapses by itself");
    }
}
