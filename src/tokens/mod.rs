//! AmoCRM tokens: executes the token plans of [`crate::reconcile::tokens`]
//! under the `config` row lock, and is the one place every path that
//! obtains a pair goes through (a reconcile, a timed refresh, `sync`,
//! `test-lead`, `authorize`, the OAuth callback, shutdown). The rules
//! ("never lose a pair"):
//!
//! - an exchange or refresh runs under the `config` row lock, in a task of
//!   its own that no caller's deadline cancels, and its pair is registered
//!   in the [`Vault`] before it is written and unregistered after the commit;
//! - a registered pair is written before anything else is done for its
//!   tenant, and only over what it replaces, for the account it belongs to;
//! - a code whose hash is stored, or whose pair is registered, is never sent
//!   again;
//! - at every exit, [`TokenService::settle`] waits for the requests in
//!   flight and writes every registered pair.

mod obtain;
mod pairs;
mod refresh;
mod vault;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

pub use crate::reconcile::tokens::{NextCheck, sha256_hex};
pub use vault::Vault;

use crate::config::{AmoCrmConfig, TenantConfig};
use crate::crm::{CrmError, Http, RetryPolicy};
use crate::db::status::StatusUpdate;
use crate::db::{self, Conn, DbError, TenantDb};
use crate::metrics::Metrics;
use crate::model::{Crm, CrmState};

/// What token work needs: the HTTP layer, retry timing, the vault of
/// registered pairs, the refresh counter. Cheap to clone.
#[derive(Clone)]
pub struct TokenService {
    pub(crate) http: Http,
    pub(crate) retry: RetryPolicy,
    pub(crate) vault: Vault,
    pub(crate) metrics: Arc<Metrics>,
}

/// The tenant whose tokens are meant: its slug, database and `[amocrm]`
/// table, and how long before expiry its token is refreshed.
#[derive(Clone, Copy)]
pub struct Owner<'a> {
    pub slug: &'a str,
    pub db: &'a TenantDb,
    pub amo: &'a AmoCrmConfig,
    pub margin: Duration,
}

impl<'a> Owner<'a> {
    pub fn of(tenant: &'a TenantConfig, amo: &'a AmoCrmConfig, db: &'a TenantDb) -> Owner<'a> {
        Owner { slug: &tenant.slug, db, amo, margin: tenant.schedule.token_refresh_margin }
    }
}

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

/// The row lock of a token transaction outlives any token request (a minute
/// of retries plus a last attempt) by far.
const TOKEN_TRANSACTION_IDLE: Duration = Duration::from_secs(600);

impl TokenService {
    /// Runs a token request in a task of its own, counted in flight: no
    /// caller's deadline (a command's timeout, the shutdown grace, a lost
    /// lease) cancels it; it ends by its own timeouts and registers its pair.
    async fn detached<T: Send + 'static>(
        &self,
        request: impl Future<Output = Result<T, TokenError>> + Send + 'static,
    ) -> Result<T, TokenError> {
        let in_flight = self.vault.begin().ok_or(TokenError::ShuttingDown)?;
        let task = tokio::spawn(async move {
            let _in_flight = in_flight;
            request.await
        });
        task.await.map_err(|e| TokenError::Internal(e.to_string()))?
    }
}

async fn event(conn: &impl Conn, kind: &str, detail: serde_json::Value) -> Result<(), DbError> {
    db::events::insert(conn, Some(Crm::AmoCrm), kind, &detail).await
}

async fn connected(conn: &impl Conn) -> Result<(), DbError> {
    db::status::write(conn, &StatusUpdate::state(Crm::AmoCrm, CrmState::Connected)).await
}

/// The event of a pair written: exchanged from a code, or refreshed.
async fn pair_event(conn: &impl Conn, exchanged: bool, detail: serde_json::Value) -> Result<(), DbError> {
    event(conn, if exchanged { "token_exchanged" } else { "token_refreshed" }, detail).await
}

fn expiry(tokens: &crate::model::Tokens) -> serde_json::Value {
    json!({ "expires_at": tokens.expires_at })
}
