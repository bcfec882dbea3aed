//! Refreshing: the stored tokens used while they are good, refreshed under
//! the row lock when due (or refused by the API), and [`TokenService::with_fresh_access`],
//! the one place a 401 turns into a refresh and one more try.

use std::future::Future;

use chrono::Utc;
use serde_json::json;

use super::vault::Registered;
use super::{Owner, TOKEN_TRANSACTION_IDLE, TokenError, TokenService, event, expiry, pair_event};
use crate::crm::CrmError;
use crate::crm::amocrm::AmoClient;
use crate::db::status::StatusUpdate;
use crate::db::{self, DbError, config_row};
use crate::metrics::RefreshResult;
use crate::model::{Crm, CrmState, Tokens};
use crate::reconcile::tokens::{NextCheck, RefreshStep, next_check, refresh_step};
use crate::secret::Secret;

impl TokenService {
    /// The tokens to call the API with, refreshed first if they are due — or,
    /// with `rejected`, if the API just refused that access token.
    pub async fn refresh_if_due(&self, owner: Owner<'_>, rejected: Option<&Secret>) -> Result<Tokens, TokenError> {
        self.store_registered(owner.slug).await.map_err(TokenError::Unstored)?;
        let stored = config_row::read_tokens(&owner.db.session().await?).await?;
        // Without the lock, only "use what is stored" is decided: anything
        // else is decided again under it, where another process's refresh
        // is visible.
        if let RefreshStep::Use(tokens) = refresh_step(&stored, None, owner.margin, rejected, Utc::now()) {
            return Ok(tokens);
        }
        let (service, slug, db, amo, margin) =
            (self.clone(), owner.slug.to_string(), owner.db.clone(), owner.amo.clone(), owner.margin);
        let rejected = rejected.cloned();
        self.detached(async move {
            let owner = Owner { slug: &slug, db: &db, amo: &amo, margin };
            service.locked_refresh(owner, rejected.as_ref()).await
        })
        .await
    }

    async fn locked_refresh(&self, owner: Owner<'_>, rejected: Option<&Secret>) -> Result<Tokens, TokenError> {
        let Owner { slug, db, amo, margin } = owner;
        let mut session = db.session().await?;
        let tx = session.transaction().await?;
        let stored = config_row::lock_tokens_for_request(&tx, TOKEN_TRANSACTION_IDLE).await?;
        let state = db::status::read_state(&tx, Crm::AmoCrm).await?;
        let refresh_token = match refresh_step(&stored, state, margin, rejected, Utc::now()) {
            RefreshStep::Use(tokens) => return Ok(tokens),
            RefreshStep::NeedsAuthorization(why) => return Err(TokenError::NeedsAuthorization(why.into())),
            RefreshStep::Refresh(refresh_token) => refresh_token,
        };
        let credentials = amo.credentials().map_err(CrmError::from)?;
        let api = AmoClient::new(&self.http, &amo.account).with_retry(self.retry);
        match api.refresh(&credentials, &refresh_token).await {
            Ok(tokens) => {
                self.vault.register(slug, Registered::replacing(&stored, tokens.clone(), None, db));
                let written = async {
                    config_row::write_tokens(&tx, &tokens, None).await?;
                    pair_event(&tx, false, expiry(&tokens)).await?;
                    tx.commit().await
                }
                .await;
                match written {
                    Ok(()) => {
                        self.vault.unregister(slug, &tokens);
                        self.metrics.token_refresh(RefreshResult::Ok);
                        tracing::info!(tenant = slug, crm = "amocrm", expires_at = %tokens.expires_at, "token refreshed")
                    }
                    Err(e) => {
                        self.metrics.token_refresh(RefreshResult::Unstored);
                        tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "refreshed tokens could not be stored; kept in memory");
                    }
                }
                Ok(tokens)
            }
            Err(CrmError::GrantRejected { status, reason }) => {
                self.metrics.token_refresh(RefreshResult::Rejected);
                let message = format!("the refresh token was rejected (HTTP {status}): {reason}");
                let update = StatusUpdate {
                    error: Some(&message),
                    ..StatusUpdate::state(Crm::AmoCrm, CrmState::NeedsAuthorization)
                };
                db::status::write(&tx, &update).await?;
                event(&tx, "token_refresh_failed", json!({ "status": status, "reason": reason })).await?;
                tx.commit().await?;
                Err(TokenError::NeedsAuthorization(message))
            }
            Err(e) => {
                self.metrics.token_refresh(RefreshResult::Failed);
                Err(e.into())
            }
        }
    }

    /// Calls the API with `tokens`; a 401 gets one refresh (unless another
    /// process already replaced the refused token) and one more try, with
    /// `tokens` updated for the calls that follow.
    pub async fn with_fresh_access<T, F, Fut>(
        &self,
        owner: Owner<'_>,
        tokens: &mut Tokens,
        call: F,
    ) -> Result<T, TokenError>
    where
        F: Fn(Secret) -> Fut,
        Fut: Future<Output = Result<T, CrmError>>,
    {
        match call(tokens.access.clone()).await {
            Err(CrmError::Unauthorized { .. }) => {
                *tokens = self.refresh_if_due(owner, Some(&tokens.access)).await?;
                Ok(call(tokens.access.clone()).await?)
            }
            other => Ok(other?),
        }
    }

    /// When the daemon should look at a tenant's token again, from its
    /// stored tokens; logs once per tenant when the margin is capped.
    pub async fn next_check(&self, owner: Owner<'_>) -> Result<NextCheck, DbError> {
        let stored = config_row::read_tokens(&owner.db.session().await?).await?;
        let next = next_check(&stored, owner.margin);
        if let NextCheck::Refresh { capped: true, .. } = next
            && self.vault.first_note(owner.slug)
        {
            tracing::warn!(
                tenant = owner.slug,
                crm = "amocrm",
                margin = %humantime::format_duration(owner.margin),
                "token_refresh_margin is not shorter than the token lifetime: refreshed at half the token lifetime"
            );
        }
        Ok(next)
    }
}
