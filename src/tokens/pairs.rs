//! Registered pairs written late: a pair the CRM gave but whose commit
//! failed is written before anything else is done for its tenant, and at
//! every exit ([`TokenService::settle`]).

use std::time::Duration;

use serde_json::json;

use super::{TokenService, connected, event, pair_event};
use crate::db::{DbError, config_row};

impl TokenService {
    /// Writes `slug`'s registered pair, if there is one, to the database it
    /// was obtained for: under the row lock, only for the same account and
    /// over the tokens it replaces (or none); otherwise it belongs to
    /// nobody any more and is dropped. Writing it sets the state `connected`.
    pub async fn store_registered(&self, slug: &str) -> Result<(), DbError> {
        let Some(pair) = self.vault.get(slug) else {
            return Ok(());
        };
        let mut session = pair.db.session().await?;
        let tx = session.transaction().await?;
        let stored = config_row::lock_tokens(&tx).await?;
        if stored.access.as_ref() == Some(&pair.tokens.access) {
            // Committed after all (the commit's answer was what got lost).
            self.vault.unregister(slug, &pair.tokens);
            return Ok(());
        }
        let same_account = stored.account == pair.account;
        let replaces_stored =
            stored.refresh == pair.replaces.1 && (pair.replaces.1.is_some() || stored.access == pair.replaces.0);
        let nothing_stored = stored.access.is_none() && stored.refresh.is_none();
        if !(same_account && (replaces_stored || nothing_stored)) {
            let reason = if same_account { "the stored tokens were replaced since" } else { "the account changed" };
            event(&tx, "token_pair_dropped", json!({ "reason": reason, "expires_at": pair.tokens.expires_at })).await?;
            tx.commit().await?;
            self.vault.unregister(slug, &pair.tokens);
            tracing::warn!(
                tenant = slug,
                crm = "amocrm",
                reason,
                "a token pair kept in memory was dropped, not written"
            );
            return Ok(());
        }
        config_row::write_tokens(&tx, &pair.tokens, pair.code_sha256.as_deref()).await?;
        let detail = json!({ "expires_at": pair.tokens.expires_at, "stored_late": true });
        pair_event(&tx, pair.code_sha256.is_some(), detail).await?;
        connected(&tx).await?;
        tx.commit().await?;
        self.vault.unregister(slug, &pair.tokens);
        tracing::info!(tenant = slug, crm = "amocrm", "tokens kept in memory are stored");
        Ok(())
    }

    /// Every exit goes through here: no token request starts any more,
    /// those in flight run to their own end, then every registered pair is
    /// written, retried until `within` has passed. Returns the tenants whose
    /// pair could not be stored.
    pub async fn settle(&self, within: Duration) -> Vec<(String, DbError)> {
        self.vault.close();
        if self.vault.in_flight_count() > 0 {
            tracing::info!(requests = self.vault.in_flight_count(), "waiting for token requests in flight");
        }
        self.vault.idle().await;
        let deadline = tokio::time::Instant::now() + within;
        let mut writes = tokio::task::JoinSet::new();
        for slug in self.vault.slugs() {
            let service = self.clone();
            writes.spawn(async move {
                let outcome = service.store_registered_until(&slug, deadline).await;
                (slug, outcome)
            });
        }
        let mut failed = Vec::new();
        while let Some(joined) = writes.join_next().await {
            if let Ok((slug, Err(e))) = joined {
                tracing::error!(tenant = %slug, crm = "amocrm", error = %e, "a token pair could not be stored before exit");
                failed.push((slug, e));
            }
        }
        failed
    }

    /// Keeps trying to write a registered pair for up to `within` (the
    /// OAuth callback answers the browser after that; the daemon keeps trying).
    pub async fn store_registered_within(&self, slug: &str, within: Duration) -> Result<(), DbError> {
        self.store_registered_until(slug, tokio::time::Instant::now() + within).await
    }

    async fn store_registered_until(&self, slug: &str, deadline: tokio::time::Instant) -> Result<(), DbError> {
        let mut delay = Duration::from_millis(200);
        loop {
            let attempt = tokio::time::timeout_at(deadline, self.store_registered(slug)).await;
            match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if tokio::time::Instant::now() + delay >= deadline => return Err(e),
                Err(_) => {
                    return Err(DbError::Connect { target: "the tenant database".into(), reason: "timed out".into() });
                }
                Ok(Err(e)) => {
                    tracing::warn!(tenant = slug, crm = "amocrm", error = %e, ?delay, "storing kept tokens failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}
