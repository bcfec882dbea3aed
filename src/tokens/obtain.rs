//! Obtaining tokens from the tenant's file: the long-lived token stored, or
//! the authorization code exchanged — at most once, ever (its hash is
//! checked again under the row lock, so two daemons starting together send
//! it once; a rejected code's hash is stored too).

use serde_json::json;

use super::vault::Registered;
use super::{Obtained, Owner, TOKEN_TRANSACTION_IDLE, TokenError, TokenService, connected, event, expiry, pair_event};
use crate::config::AmoCrmConfig;
use crate::crm::CrmError;
use crate::crm::amocrm::AmoClient;
use crate::db::{TenantDb, config_row};
use crate::reconcile::tokens::{ObtainStep, obtain_step, sha256_hex};
use crate::secret::Secret;

impl TokenService {
    /// Obtains tokens from the configured long-lived token, or from `code`
    /// (or else the configured authorization code) if that code was never sent.
    pub async fn obtain(&self, owner: Owner<'_>, code: Option<&Secret>) -> Result<Obtained, TokenError> {
        self.store_registered(owner.slug).await.map_err(TokenError::Unstored)?;
        let long_lived = owner.amo.long_lived_token.as_ref();
        let code = code.or(owner.amo.authorization_code.as_ref());
        if long_lived.is_some() {
            return store_long_lived(owner).await;
        }
        let Some(code) = code else { return Ok(Obtained::NothingConfigured) };
        if self.vault.holds_code(owner.slug, &sha256_hex(code)) {
            return Ok(Obtained::CodeAlreadySent);
        }
        let stored = config_row::read_tokens(&owner.db.session().await?).await?;
        let ObtainStep::Exchange { code_sha256 } = obtain_step(None, Some(code), &stored) else {
            return Ok(Obtained::CodeAlreadySent);
        };
        owner.amo.credentials().map_err(CrmError::from)?;
        let (service, slug, db, amo, code) =
            (self.clone(), owner.slug.to_string(), owner.db.clone(), owner.amo.clone(), code.clone());
        self.detached(async move { service.locked_exchange(&slug, &db, &amo, &code, code_sha256).await }).await
    }

    async fn locked_exchange(
        &self,
        slug: &str,
        db: &TenantDb,
        amo: &AmoCrmConfig,
        code: &Secret,
        hash: String,
    ) -> Result<Obtained, TokenError> {
        let credentials = amo.credentials().map_err(CrmError::from)?;
        let mut session = db.session().await?;
        let tx = session.transaction().await?;
        let stored = config_row::lock_tokens_for_request(&tx, TOKEN_TRANSACTION_IDLE).await?;
        if !matches!(obtain_step(None, Some(code), &stored), ObtainStep::Exchange { .. }) {
            return Ok(Obtained::CodeAlreadySent);
        }
        let api = AmoClient::new(&self.http, &amo.account).with_retry(self.retry);
        match api.exchange_code(&credentials, code).await {
            Ok(tokens) => {
                let pair = Registered::replacing(&stored, tokens.clone(), Some(hash.clone()), db);
                self.vault.register(slug, pair);
                let written = async {
                    config_row::write_tokens(&tx, &tokens, Some(&hash)).await?;
                    pair_event(&tx, true, expiry(&tokens)).await?;
                    connected(&tx).await?;
                    tx.commit().await
                }
                .await;
                match written {
                    Ok(()) => self.vault.unregister(slug, &tokens),
                    Err(e) => {
                        tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "exchanged tokens could not be stored; kept in memory")
                    }
                }
                Ok(Obtained::Exchanged)
            }
            Err(CrmError::GrantRejected { status, reason }) => {
                config_row::write_code_hash(&tx, &hash).await?;
                event(&tx, "token_exchange_failed", json!({ "status": status, "reason": reason })).await?;
                tx.commit().await?;
                Ok(Obtained::CodeRejected(reason))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Stores the configured long-lived token under the row lock, unless the
/// row holds it already.
async fn store_long_lived(owner: Owner<'_>) -> Result<Obtained, TokenError> {
    let mut session = owner.db.session().await?;
    let tx = session.transaction().await?;
    let stored = config_row::lock_tokens(&tx).await?;
    match obtain_step(owner.amo.long_lived_token.as_ref(), None, &stored) {
        ObtainStep::StoreLongLived(tokens) => {
            config_row::write_tokens(&tx, &tokens, None).await?;
            let detail = json!({ "source": "long_lived_token", "expires_at": tokens.expires_at });
            event(&tx, "token_stored", detail).await?;
            connected(&tx).await?;
            tx.commit().await?;
            Ok(Obtained::LongLivedStored)
        }
        ObtainStep::Invalid(why) => Err(TokenError::NeedsAuthorization(why.into())),
        _ => Ok(Obtained::LongLivedUnchanged),
    }
}
