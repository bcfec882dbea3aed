//! The CRM clients: one module per CRM, and the shared HTTP layer (rate
//! limits, retries, bounded bodies, error bodies read whatever their shape).
//! Wire formats stay private to the CRM modules; they return model types.

pub mod amocrm;
pub mod amocrm_events;
pub mod amocrm_leads;
pub mod bitrix24;
mod http;

pub use http::{Http, RetryPolicy};

use crate::model::MissingCredentials;

/// Why a CRM call failed. Messages never hold a token, a client secret or a
/// webhook URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrmError {
    #[error("network error: {0}")]
    Network(String),
    #[error("HTTP {status}: {reason}")]
    Status { status: u16, reason: String, transient: bool },
    /// The token endpoint answered 4xx: this code or refresh token is dead.
    #[error("authorization rejected (HTTP {status}): {reason}")]
    GrantRejected { status: u16, reason: String },
    /// The API refused the access token.
    #[error("access token rejected (HTTP 401): {reason}")]
    Unauthorized { reason: String },
    #[error("unexpected response: {0}")]
    Malformed(String),
    /// A list that was cut short (a page cap, an empty page where more were
    /// promised, fewer rows than its total) or that lacks what every
    /// account has: never taken for the whole list.
    #[error("incomplete list: {0}")]
    Incomplete(String),
    #[error("response larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// A Bitrix24 error code and its description.
    #[error("{code}: {description}")]
    Api { code: String, description: String, transient: bool },
    #[error("{0}")]
    Config(String),
}

/// A token request that cannot be made fails as one refused by the CRM
/// would not: it is the configuration's to fix, never worth a retry.
impl From<MissingCredentials> for CrmError {
    fn from(e: MissingCredentials) -> CrmError {
        CrmError::Config(e.to_string())
    }
}

impl CrmError {
    /// Worth retrying with backoff: network errors, timeouts, 5xx, 429.
    pub fn is_transient(&self) -> bool {
        match self {
            CrmError::Network(_) => true,
            CrmError::Status { transient, .. } | CrmError::Api { transient, .. } => *transient,
            _ => false,
        }
    }

    /// The Bitrix24 error code, for an API error.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            CrmError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}
