//! AmoCRM tokens, and the one place every path that obtains a pair goes
//! through (a reconcile, a timed refresh, `sync`, `test-lead`, `authorize`,
//! the OAuth callback, shutdown). The rules ("never lose a pair"):
//!
//! - an exchange or refresh runs under the `config` row lock, in a task of
//!   its own that no caller's deadline cancels, and its pair is registered
//!   in the [`Vault`] before it is written and unregistered after the commit;
//! - a registered pair is written before anything else is done for its
//!   tenant, and only over what it replaces, for the account it belongs to;
//! - a code whose hash is stored, or whose pair is registered, is never sent
//!   again;
//! - at every exit, [`settle`] waits for the requests in flight and writes
//!   every registered pair.

mod vault;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};

use vault::Registered;
pub use vault::Vault;

use crate::config::AmoCrmConfig;
use crate::context::Context;
use crate::crm::CrmError;
use crate::crm::amocrm::{AmoClient, jwt_expiry, jwt_issued_at, latest_time};
use crate::db::queries::{self, StatusUpdate, StoredTokens};
use crate::db::{DbError, TenantDb};
use crate::model::{Crm, CrmState, Tokens};
use crate::secret::Secret;

/// The row lock of a token transaction outlives any token request (a minute
/// of retries plus a last attempt) by far.
const TOKEN_TRANSACTION_IDLE_SECS: u64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("needs authorization: {0}")]
    NeedsAuthorization(String),
    #[error(transparent)]
    Crm(#[from] CrmError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("a token pair obtained earlier is waiting to be stored: {0}")]
    Unstored(DbError),
    #[error("shutting down: no new token request")]
    ShuttingDown,
    #[error("internal error in a token request: {0}")]
    Internal(String),
}

impl TokenError {
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::NeedsAuthorization(_) | TokenError::Internal(_) => false,
            TokenError::Crm(e) => e.is_transient(),
            TokenError::Db(e) | TokenError::Unstored(e) => e.is_transient(),
            TokenError::ShuttingDown => true,
        }
    }
}

/// What obtaining tokens did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Obtained {
    /// A code was exchanged and the tokens stored (or registered, when the
    /// write failed).
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

// ---------------------------------------------------------------------------
// Cadence

/// When a stored token needs attention next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextCheck {
    /// Refresh at this moment; `capped` when the margin was not shorter
    /// than the token's lifetime and half the lifetime is used instead.
    Refresh { at: DateTime<Utc>, capped: bool },
    /// A token without a refresh token (long-lived): nothing to do until it
    /// expires, then `needs_authorization`.
    Expires(DateTime<Utc>),
    /// No usable token is stored.
    Nothing,
}

/// The cadence rule: `margin` before expiry, but when the margin is not
/// shorter than the token's lifetime (known from its JWT), at half the
/// lifetime — at most one refresh per half lifetime, never a loop.
pub fn next_check(stored: &StoredTokens, margin: Duration) -> NextCheck {
    let (Some(access), Some(expires_at)) = (&stored.access, stored.expires_at) else {
        return NextCheck::Nothing;
    };
    if stored.refresh.is_none() {
        return NextCheck::Expires(expires_at);
    }
    let margin = chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
    let lifetime = jwt_issued_at(access.expose()).map(|issued| expires_at - issued);
    let (margin, capped) = match lifetime {
        Some(lifetime) if lifetime > chrono::Duration::zero() && margin >= lifetime => (lifetime / 2, true),
        _ => (margin, false),
    };
    let at = expires_at.checked_sub_signed(margin).unwrap_or(DateTime::<Utc>::MIN_UTC);
    NextCheck::Refresh { at, capped }
}

/// Whether the stored tokens must be refreshed now; with `rejected`, only
/// if the API just refused that very access token.
fn due(stored: &StoredTokens, margin: Duration, rejected: Option<&Secret>) -> bool {
    match (&stored.access, rejected) {
        (Some(access), Some(bad)) => access == bad,
        (None, _) => true,
        (Some(_), None) => match next_check(stored, margin) {
            NextCheck::Refresh { at, .. } => at <= Utc::now(),
            NextCheck::Expires(at) => at <= Utc::now(),
            NextCheck::Nothing => true,
        },
    }
}

/// When the daemon should look at a tenant's token again, from its stored
/// tokens; logs once per tenant when the margin is capped.
pub async fn next_check_for(ctx: &Context, slug: &str, db: &TenantDb, margin: Duration) -> Result<NextCheck, DbError> {
    let client = db.client().await?;
    let stored = queries::read_tokens(&**client).await.map_err(|e| db.query_error("reading tokens", e))?;
    let next = next_check(&stored, margin);
    if let NextCheck::Refresh { capped: true, .. } = next
        && ctx.vault.first_note(slug)
    {
        tracing::warn!(
            tenant = slug,
            crm = "amocrm",
            margin = %humantime::format_duration(margin),
            "token_refresh_margin is not shorter than the token lifetime: refreshed at half the token lifetime"
        );
    }
    Ok(next)
}

// ---------------------------------------------------------------------------
// Obtaining

/// Obtains tokens from the configured long-lived token, or from `code` (or
/// else the configured authorization code) if that code was never sent.
pub async fn obtain(
    ctx: &Context,
    slug: &str,
    db: &TenantDb,
    amo: &AmoCrmConfig,
    code: Option<&Secret>,
) -> Result<Obtained, TokenError> {
    store_registered(ctx, slug).await.map_err(TokenError::Unstored)?;
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
    if ctx.vault.holds_code(slug, &hash) {
        return Ok(Obtained::CodeAlreadySent);
    }
    {
        let client = db.client().await?;
        let unlocked = queries::read_tokens(&**client).await.map_err(|e| db.query_error("reading tokens", e))?;
        if unlocked.code_sha256.as_deref() == Some(hash.as_str()) {
            return Ok(Obtained::CodeAlreadySent);
        }
    }
    amo.credentials().map_err(CrmError::from)?;
    let (ctx2, slug2, db2, amo2, code2) = (ctx.clone(), slug.to_string(), db.clone(), amo.clone(), code.clone());
    detached(ctx, async move { locked_exchange(&ctx2, &slug2, &db2, &amo2, &code2, hash).await }).await
}

async fn locked_exchange(
    ctx: &Context,
    slug: &str,
    db: &TenantDb,
    amo: &AmoCrmConfig,
    code: &Secret,
    hash: String,
) -> Result<Obtained, TokenError> {
    let credentials = amo.credentials().map_err(CrmError::from)?;
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    let stored = lock_for_token_request(&tx, db).await?;
    if stored.code_sha256.as_deref() == Some(hash.as_str()) {
        return Ok(Obtained::CodeAlreadySent);
    }
    let api = AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
    match api.exchange_code(&credentials, code).await {
        Ok(tokens) => {
            ctx.vault.register(slug, Registered::replacing(&stored, tokens.clone(), Some(hash.clone()), db));
            let written = async {
                queries::write_tokens(&*tx, &tokens, Some(&hash))
                    .await
                    .map_err(|e| db.query_error("storing tokens", e))?;
                event(&*tx, db, "token_exchanged", json!({ "expires_at": tokens.expires_at })).await?;
                connected(&*tx, db).await?;
                tx.commit().await.map_err(|e| db.query_error("committing tokens", e))
            }
            .await;
            match written {
                Ok(()) => ctx.vault.unregister(slug, &tokens),
                Err(e) => {
                    tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "exchanged tokens could not be stored; kept in memory")
                }
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

// ---------------------------------------------------------------------------
// Refreshing

/// The tokens to call the API with, refreshed first if they are due — or,
/// with `rejected`, if the API just refused that access token.
pub async fn refresh_if_due(
    ctx: &Context,
    slug: &str,
    db: &TenantDb,
    amo: &AmoCrmConfig,
    margin: Duration,
    rejected: Option<&Secret>,
) -> Result<Tokens, TokenError> {
    store_registered(ctx, slug).await.map_err(TokenError::Unstored)?;
    let stored = {
        let client = db.client().await?;
        queries::read_tokens(&**client).await.map_err(|e| db.query_error("reading tokens", e))?
    };
    if !due(&stored, margin, rejected) {
        return usable(stored);
    }
    let (ctx2, slug2, db2, amo2) = (ctx.clone(), slug.to_string(), db.clone(), amo.clone());
    let rejected = rejected.cloned();
    detached(ctx, async move { locked_refresh(&ctx2, &slug2, &db2, &amo2, margin, rejected.as_ref()).await }).await
}

async fn locked_refresh(
    ctx: &Context,
    slug: &str,
    db: &TenantDb,
    amo: &AmoCrmConfig,
    margin: Duration,
    rejected: Option<&Secret>,
) -> Result<Tokens, TokenError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    let stored = lock_for_token_request(&tx, db).await?;
    if !due(&stored, margin, rejected) {
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
    let credentials = amo.credentials().map_err(CrmError::from)?;
    let api = AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
    match api.refresh(&credentials, &refresh_token).await {
        Ok(tokens) => {
            ctx.vault.register(slug, Registered::replacing(&stored, tokens.clone(), None, db));
            let written = async {
                queries::write_tokens(&*tx, &tokens, None).await.map_err(|e| db.query_error("storing tokens", e))?;
                event(&*tx, db, "token_refreshed", json!({ "expires_at": tokens.expires_at })).await?;
                tx.commit().await.map_err(|e| db.query_error("committing tokens", e))
            }
            .await;
            match written {
                Ok(()) => {
                    ctx.vault.unregister(slug, &tokens);
                    ctx.metrics.token_refresh("ok");
                    tracing::info!(tenant = slug, crm = "amocrm", expires_at = %tokens.expires_at, "token refreshed")
                }
                Err(e) => {
                    ctx.metrics.token_refresh("unstored");
                    tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "refreshed tokens could not be stored; kept in memory");
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

/// Takes the `config` row lock for an exchange or refresh, and keeps the
/// session alive past any server-wide idle-in-transaction timeout while the
/// request runs.
async fn lock_for_token_request(
    tx: &deadpool_postgres::Transaction<'_>,
    db: &TenantDb,
) -> Result<StoredTokens, DbError> {
    queries::keep_token_transaction_alive(&**tx, TOKEN_TRANSACTION_IDLE_SECS)
        .await
        .map_err(|e| db.query_error("setting the token transaction's timeout", e))?;
    queries::lock_tokens(&**tx).await.map_err(|e| db.query_error("locking config", e))
}

/// Runs a token request in a task of its own, counted in flight: no
/// caller's deadline (a command's timeout, the shutdown grace, a lost
/// lease) cancels it; it ends by its own timeouts and registers its pair.
async fn detached<T: Send + 'static>(
    ctx: &Context,
    request: impl Future<Output = Result<T, TokenError>> + Send + 'static,
) -> Result<T, TokenError> {
    let in_flight = ctx.vault.begin().ok_or(TokenError::ShuttingDown)?;
    let task = tokio::spawn(async move {
        let _in_flight = in_flight;
        request.await
    });
    task.await.map_err(|e| TokenError::Internal(e.to_string()))?
}

// ---------------------------------------------------------------------------
// Registered pairs

/// Writes `slug`'s registered pair, if there is one, to the database it was
/// obtained for: under the row lock, only for the same account and over
/// the tokens it replaces (or none); otherwise it belongs to nobody any more
/// and is dropped. Writing it sets the state `connected`.
pub async fn store_registered(ctx: &Context, slug: &str) -> Result<(), DbError> {
    let Some(pair) = ctx.vault.get(slug) else {
        return Ok(());
    };
    let db = &pair.db;
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    let stored = queries::lock_tokens(&*tx).await.map_err(|e| db.query_error("locking config", e))?;
    if stored.access.as_ref() == Some(&pair.tokens.access) {
        // Committed after all (the commit's answer was what got lost).
        ctx.vault.unregister(slug, &pair.tokens);
        return Ok(());
    }
    let same_account = stored.account == pair.account;
    let replaces_stored =
        stored.refresh == pair.replaces.1 && (pair.replaces.1.is_some() || stored.access == pair.replaces.0);
    let nothing_stored = stored.access.is_none() && stored.refresh.is_none();
    if !(same_account && (replaces_stored || nothing_stored)) {
        let reason = if same_account { "the stored tokens were replaced since" } else { "the account changed" };
        event(&*tx, db, "token_pair_dropped", json!({ "reason": reason, "expires_at": pair.tokens.expires_at }))
            .await?;
        tx.commit().await.map_err(|e| db.query_error("committing", e))?;
        ctx.vault.unregister(slug, &pair.tokens);
        tracing::warn!(tenant = slug, crm = "amocrm", reason, "a token pair kept in memory was dropped, not written");
        return Ok(());
    }
    queries::write_tokens(&*tx, &pair.tokens, pair.code_sha256.as_deref())
        .await
        .map_err(|e| db.query_error("storing tokens", e))?;
    let kind = if pair.code_sha256.is_some() { "token_exchanged" } else { "token_refreshed" };
    event(&*tx, db, kind, json!({ "expires_at": pair.tokens.expires_at, "stored_late": true })).await?;
    connected(&*tx, db).await?;
    tx.commit().await.map_err(|e| db.query_error("committing tokens", e))?;
    ctx.vault.unregister(slug, &pair.tokens);
    tracing::info!(tenant = slug, crm = "amocrm", "tokens kept in memory are stored");
    Ok(())
}

/// Every exit goes through here: no token request starts any more, those in
/// flight run to their own end, then every registered pair is written,
/// retried until `within` has passed. Returns the tenants whose pair could
/// not be stored.
pub async fn settle(ctx: &Context, within: Duration) -> Vec<(String, DbError)> {
    ctx.vault.close();
    if ctx.vault.in_flight_count() > 0 {
        tracing::info!(requests = ctx.vault.in_flight_count(), "waiting for token requests in flight");
    }
    ctx.vault.idle().await;
    let deadline = tokio::time::Instant::now() + within;
    let mut writes = tokio::task::JoinSet::new();
    for slug in ctx.vault.slugs() {
        let ctx = ctx.clone();
        writes.spawn(async move {
            let outcome = store_registered_until(&ctx, &slug, deadline).await;
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

/// Keeps trying to write a registered pair until it is written or the
/// deadline has passed.
async fn store_registered_until(ctx: &Context, slug: &str, deadline: tokio::time::Instant) -> Result<(), DbError> {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = tokio::time::timeout_at(deadline, store_registered(ctx, slug)).await;
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

/// Keeps trying to write a registered pair for up to `within` (the OAuth
/// callback answers the browser after that; the daemon keeps trying).
pub async fn store_registered_within(ctx: &Context, slug: &str, within: Duration) -> Result<(), DbError> {
    store_registered_until(ctx, slug, tokio::time::Instant::now() + within).await
}

fn usable(stored: StoredTokens) -> Result<Tokens, TokenError> {
    match (stored.access, stored.expires_at) {
        (Some(access), Some(expires_at)) => {
            Ok(Tokens { access, refresh: stored.refresh, expires_at: expires_at.min(latest_time()) })
        }
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

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn jwt(iat: DateTime<Utc>, exp: DateTime<Utc>) -> Secret {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let claims = format!(r#"{{"iat":{},"exp":{}}}"#, iat.timestamp(), exp.timestamp());
        Secret::new(format!("{}.{}.sig", b64("{}"), b64(&claims)))
    }

    fn stored(iat: DateTime<Utc>, exp: DateTime<Utc>, refresh: bool) -> StoredTokens {
        StoredTokens {
            access: Some(jwt(iat, exp)),
            refresh: refresh.then(|| Secret::new("r".to_string())),
            expires_at: Some(exp),
            ..StoredTokens::default()
        }
    }

    #[test]
    fn a_margin_not_shorter_than_the_lifetime_is_capped_at_half_the_lifetime() {
        // JWT times are whole seconds.
        let issued = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
        let day = issued + chrono::Duration::hours(24);
        let hours = |h: u64| Duration::from_secs(h * 3600);
        assert_eq!(
            next_check(&stored(issued, day, true), hours(1)),
            NextCheck::Refresh { at: day - chrono::Duration::hours(1), capped: false }
        );
        assert_eq!(
            next_check(&stored(issued, day, true), hours(25)),
            NextCheck::Refresh { at: issued + chrono::Duration::hours(12), capped: true }
        );
        assert_eq!(next_check(&stored(issued, day, false), hours(25)), NextCheck::Expires(day));
        assert_eq!(next_check(&StoredTokens::default(), hours(1)), NextCheck::Nothing);
        // A margin of 300,000 years neither overflows nor loops.
        let absurd = Duration::from_secs(300_000 * 365 * 86_400);
        let opaque = StoredTokens {
            access: Some(Secret::new("opaque".to_string())),
            refresh: Some(Secret::new("r".to_string())),
            expires_at: Some(day),
            ..StoredTokens::default()
        };
        assert!(matches!(next_check(&opaque, absurd), NextCheck::Refresh { capped: false, .. }));
        assert!(matches!(next_check(&stored(issued, day, true), absurd), NextCheck::Refresh { capped: true, .. }));
    }
}
