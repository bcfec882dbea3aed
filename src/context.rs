//! Everything a tenant operation needs, passed explicitly: the database
//! pools, the HTTP layer, token pairs waiting to be stored, retry timing.

use crate::crm::{Http, RetryPolicy};
use crate::db::{PoolSettings, Pools};
use crate::tokens::PendingTokens;

#[derive(Clone)]
pub struct Context {
    pub pools: Pools,
    pub http: Http,
    pub pending: PendingTokens,
    /// How long CRM calls keep retrying transient failures, and how fast.
    pub retry: RetryPolicy,
}

impl Context {
    /// Must be called inside a tokio runtime (the pools start a task).
    pub fn new(pool_settings: PoolSettings) -> Context {
        Context {
            pools: Pools::new(pool_settings),
            http: Http::new(),
            pending: PendingTokens::default(),
            retry: RetryPolicy::default(),
        }
    }
}
