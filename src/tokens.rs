//! AmoCRM tokens: obtaining them (one exchange per authorization code, or a
//! long-lived token) and refreshing them under the `config` row lock, so that
//! any number of processes make exactly one refresh per expiry. A refreshed
//! pair that cannot be stored is kept here, and no other refresh happens
//! until it is stored: its refresh token is the only live one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::AmoCrmConfig;
use crate::context::Context;
use crate::crm::CrmError;
use crate::crm::amocrm::{AmoClient, Credentials, jwt_expiry};
use crate::db::queries::{self, StatusUpdate, StoredTokens};
use crate::db::{DbError, TenantDb};
use crate::model::{Crm, CrmState, Tokens};
use crate::secret::Secret;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("needs authorization: {0}")]
    NeedsAuthorization(String),
    #[error(transparent)]
    Crm(#[from] CrmError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("a refreshed token pair is waiting to be stored: {0}")]
    Unstored(DbError),
}

impl TokenError {
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::NeedsAuthorization(_) => false,
            TokenError::Crm(e) => e.is_transient(),
            TokenError::Db(e) | TokenError::Unstored(e) => e.is_transient(),
        }
    }
}

/// A token set obtained from the CRM whose write failed.
#[derive(Clone, Debug)]
struct Pending {
    tokens: Tokens,
    code_sha256: Option<String>,
}

/// Token pairs waiting for their database, by tenant slug.
#[derive(Clone, Default)]
pub struct PendingTokens {
    inner: Arc<Mutex<HashMap<String, Pending>>>,
}

impl PendingTokens {
    pub fn contains(&self, slug: &str) -> bool {
        self.lock().contains_key(slug)
    }

    fn get(&self, slug: &str) -> Option<Pending> {
        self.lock().get(slug).cloned()
    }

    fn put(&self, slug: &str, pending: Pending) {
        self.lock().insert(slug.to_string(), pending);
    }

    fn remove_if(&self, slug: &str, stored: &Tokens) {
        let mut inner = self.lock();
        if inner.get(slug).is_some_and(|p| &p.tokens == stored) {
            inner.remove(slug);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What obtaining tokens did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Obtained {
    /// A code was exchanged and the tokens stored.
    Exchanged,
    /// The configured code was sent before (exchanged or rejected): not again.
    CodeAlreadySent,
    /// The CRM refused the code; its reason.
    CodeRejected(String),
    LongLivedStored,
    LongLivedUnchanged,
    /// Neither a code nor a long-lived token is configured.
    NothingConfigured,
}

/// Lowercase hex SHA-256, as `amocrm_auth_code_sha256` stores it.
pub fn sha256_hex(value: &Secret) -> String {
    hex::encode(Sha256::digest(value.expose().as_bytes()))
}

/// Obtains tokens from the configured long-lived token, or from `code` (or
/// else the configured authorization code) if that code was never sent.
pub async fn obtain(
    ctx: &Context,
    slug: &str,
    db: &TenantDb,
    amo: &AmoCrmConfig,
    code: Option<&Secret>,
) -> Result<Obtained, TokenError> {
    if let Some(token) = &amo.long_lived_token {
        return store_long_lived(db, token).await;
    }
    match code.or(amo.authorization_code.as_ref()) {
        Some(code) => exchange_once(ctx, slug, db, amo, code).await,
        None => Ok(Obtained::NothingConfigured),
    }
}

async fn store_long_lived(db: &TenantDb, token: &Secret) -> Result<Obtained, TokenError> {
    let expires_at = jwt_expiry(token.expose()).ok_or_else(|| {
        TokenError::NeedsAuthorization("`amocrm.long_lived_token` is not a JWT with an `exp` claim".into())
    })?;
    let tokens = Tokens { access: token.clone(), refresh: None, expires_at };
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    let stored = queries::lock_tokens(&*tx).await.map_err(|e| db.query_error("locking config", e))?;
    if stored.access.as_ref() == Some(token) && stored.refresh.is_none() && stored.expires_at == Some(expires_at) {
        return Ok(Obtained::LongLivedUnchanged);
    }
    queries::write_tokens(&*tx, &tokens, None).await.map_err(|e| db.query_error("storing tokens", e))?;
    event(&*tx, db, "token_stored", json!({ "source": "long_lived_token", "expires_at": expires_at })).await?;
    connected(&*tx, db).await?;
    tx.commit().await.map_err(|e| db.query_error("committing tokens", e))?;
    Ok(Obtained::LongLivedStored)
}

/// Step 4 of a reconcile: a code is sent at most once, ever. Its hash is
/// checked again under the row lock, so two daemons starting together send
/// it once; a rejected code's hash is stored too.
async fn exchange_once(
    ctx: &Context,
    slug: &str,
    db: &TenantDb,
    amo: &AmoCrmConfig,
    code: &Secret,
) -> Result<Obtained, TokenError> {
    let hash = sha256_hex(code);
    let mut client = db.client().await?;
    let unlocked = queries::read_tokens(&**client).await.map_err(|e| db.query_error("reading tokens", e))?;
    if unlocked.code_sha256.as_deref() == Some(hash.as_str()) {
        return Ok(Obtained::CodeAlreadySent);
    }
    let credentials = Credentials::of(amo)?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    let stored = queries::lock_tokens(&*tx).await.map_err(|e| db.query_error("locking config", e))?;
    if stored.code_sha256.as_deref() == Some(hash.as_str()) {
        return Ok(Obtained::CodeAlreadySent);
    }
    let api = AmoClient::new(&ctx.http, amo).with_retry(ctx.retry);
    match api.exchange_code(&credentials, code).await {
        Ok(tokens) => {
            let stored = async {
                queries::write_tokens(&*tx, &tokens, Some(&hash))
                    .await
                    .map_err(|e| db.query_error("storing tokens", e))?;
                event(&*tx, db, "token_exchanged", json!({ "expires_at": tokens.expires_at })).await?;
                connected(&*tx, db).await?;
                tx.commit().await.map_err(|e| db.query_error("committing tokens", e))
            }
            .await;
            if let Err(e) = stored {
                tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "exchanged tokens could not be stored; kept in memory");
                ctx.pending.put(slug, Pending { tokens, code_sha256: Some(hash) });
            }
            Ok(Obtained::Exchanged)
        }
        Err(CrmError::GrantRejected { status, reason }) => {
            queries::write_code_hash(&*tx, &hash).await.map_err(|e| db.query_error("recording the code", e))?;
            event(&*tx, db, "token_exchange_failed", json!({ "status": status, "reason": reason })).await?;
            tx.commit().await.map_err(|e| db.query_error("committing", e))?;
            Ok(Obtained::CodeRejected(reason))
        }
        Err(e) => Err(e.into()),
    }
}

/// The tokens to call the API with, refreshed first if they expire within
/// `margin` — or, with `rejected`, if the API just refused that access token.
pub async fn refresh_if_due(
    ctx: &Context,
    slug: &str,
    db: &TenantDb,
    amo: &AmoCrmConfig,
    margin: Duration,
    rejected: Option<&Secret>,
) -> Result<Tokens, TokenError> {
    if ctx.pending.contains(slug) {
        store_pending(ctx, slug, db).await.map_err(TokenError::Unstored)?;
    }
    let margin = chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
    let due = |stored: &StoredTokens| match (&stored.access, stored.expires_at, rejected) {
        (Some(access), _, Some(bad)) => access == bad,
        (Some(_), Some(expires_at), None) => expires_at - margin <= Utc::now(),
        _ => true,
    };
    let mut client = db.client().await?;
    let stored = queries::read_tokens(&**client).await.map_err(|e| db.query_error("reading tokens", e))?;
    if !due(&stored) {
        return usable(stored);
    }
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    let stored = queries::lock_tokens(&*tx).await.map_err(|e| db.query_error("locking config", e))?;
    if !due(&stored) {
        // Another process refreshed while this one waited for the lock.
        return usable(stored);
    }
    let Some(refresh_token) = stored.refresh.clone() else {
        return match usable(stored) {
            Ok(tokens) if rejected.is_none() && tokens.expires_at > Utc::now() => Ok(tokens),
            _ => Err(TokenError::NeedsAuthorization(
                "no refresh token is stored and the access token is expired or refused".into(),
            )),
        };
    };
    let state = queries::read_state(&*tx, Crm::AmoCrm).await.map_err(|e| db.query_error("reading status", e))?;
    if state.as_deref() == Some(CrmState::NeedsAuthorization.as_str()) {
        return Err(TokenError::NeedsAuthorization(
            "the last refresh was rejected; a new authorization_code or long_lived_token is needed".into(),
        ));
    }
    let credentials = Credentials::of(amo)?;
    let api = AmoClient::new(&ctx.http, amo).with_retry(ctx.retry);
    match api.refresh(&credentials, &refresh_token).await {
        Ok(tokens) => {
            let stored = async {
                queries::write_tokens(&*tx, &tokens, None).await.map_err(|e| db.query_error("storing tokens", e))?;
                event(&*tx, db, "token_refreshed", json!({ "expires_at": tokens.expires_at })).await?;
                tx.commit().await.map_err(|e| db.query_error("committing tokens", e))
            }
            .await;
            match stored {
                Ok(()) => {
                    ctx.metrics.token_refresh("ok");
                    tracing::info!(tenant = slug, crm = "amocrm", expires_at = %tokens.expires_at, "token refreshed")
                }
                Err(e) => {
                    ctx.metrics.token_refresh("unstored");
                    tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "refreshed tokens could not be stored; kept in memory");
                    ctx.pending.put(slug, Pending { tokens: tokens.clone(), code_sha256: None });
                }
            }
            Ok(tokens)
        }
        Err(CrmError::GrantRejected { status, reason }) => {
            ctx.metrics.token_refresh("rejected");
            let message = format!("the refresh token was rejected (HTTP {status}): {reason}");
            let update = StatusUpdate {
                crm: Crm::AmoCrm,
                state: CrmState::NeedsAuthorization,
                error: Some(&message),
                success: false,
                stage_count: None,
            };
            queries::write_status(&*tx, &update).await.map_err(|e| db.query_error("writing status", e))?;
            event(&*tx, db, "token_refresh_failed", json!({ "status": status, "reason": reason })).await?;
            tx.commit().await.map_err(|e| db.query_error("committing", e))?;
            Err(TokenError::NeedsAuthorization(message))
        }
        Err(e) => {
            ctx.metrics.token_refresh("failed");
            Err(e.into())
        }
    }
}

/// Writes a pair kept in memory, if there is one. Called before any refresh,
/// and by whoever waits for the database to come back.
pub async fn store_pending(ctx: &Context, slug: &str, db: &TenantDb) -> Result<(), DbError> {
    let Some(pending) = ctx.pending.get(slug) else {
        return Ok(());
    };
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    queries::lock_tokens(&*tx).await.map_err(|e| db.query_error("locking config", e))?;
    queries::write_tokens(&*tx, &pending.tokens, pending.code_sha256.as_deref())
        .await
        .map_err(|e| db.query_error("storing tokens", e))?;
    let detail = json!({ "expires_at": pending.tokens.expires_at, "stored_late": true });
    event(&*tx, db, "token_refreshed", detail).await?;
    tx.commit().await.map_err(|e| db.query_error("committing tokens", e))?;
    ctx.pending.remove_if(slug, &pending.tokens);
    tracing::info!(tenant = slug, crm = "amocrm", "tokens kept in memory are stored");
    Ok(())
}

fn usable(stored: StoredTokens) -> Result<Tokens, TokenError> {
    match (stored.access, stored.expires_at) {
        (Some(access), Some(expires_at)) => Ok(Tokens { access, refresh: stored.refresh, expires_at }),
        _ => Err(TokenError::NeedsAuthorization(
            "no tokens are stored: configure an authorization_code or long_lived_token, or run `crm-connect authorize`"
                .into(),
        )),
    }
}

async fn event(
    tx: &impl tokio_postgres::GenericClient,
    db: &TenantDb,
    kind: &str,
    detail: serde_json::Value,
) -> Result<(), DbError> {
    queries::insert_event(tx, Some(Crm::AmoCrm.as_str()), kind, &detail)
        .await
        .map_err(|e| db.query_error("recording an event", e))
}

async fn connected(tx: &impl tokio_postgres::GenericClient, db: &TenantDb) -> Result<(), DbError> {
    let update =
        StatusUpdate { crm: Crm::AmoCrm, state: CrmState::Connected, error: None, success: false, stage_count: None };
    queries::write_status(tx, &update).await.map_err(|e| db.query_error("writing status", e))
}

/// Keeps trying to store a pair kept in memory until it is stored or
/// `within` has passed (a one-shot command must not exit with it unstored
/// while the database may come back).
pub async fn store_pending_until(ctx: &Context, slug: &str, db: &TenantDb, within: Duration) -> Result<(), DbError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut delay = Duration::from_millis(200);
    loop {
        match store_pending(ctx, slug, db).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + delay > deadline => return Err(e),
            Err(e) => {
                tracing::warn!(tenant = slug, crm = "amocrm", error = %e, ?delay, "storing kept tokens failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
