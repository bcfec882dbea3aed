//! One failure type for every CRM step of a tenant: what kind it is
//! ([`FailureKind`], in the model), which CRM, and the message the status
//! row and the log show; and the one mapping of every module's error to its
//! kind. The daemon's policy decides the next step from the kind alone.

use crate::crm::CrmError;
use crate::db::DbError;
pub use crate::model::FailureKind;
use crate::model::{Crm, CrmState};
use crate::reconcile::WebhookProblem;
use crate::tokens::TokenError;

/// A failed CRM step of one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub crm: Crm,
    pub message: String,
}

impl Failure {
    pub fn state(&self) -> CrmState {
        self.kind.state()
    }

    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

/// A failure before it is tied to its CRM: what the steps return with `?`;
/// [`Cause::of`] names the CRM once, where the step's outcome is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub kind: FailureKind,
    pub message: String,
}

impl Cause {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Cause {
        Cause { kind, message: message.into() }
    }

    pub fn of(self, crm: Crm) -> Failure {
        Failure { kind: self.kind, crm, message: self.message }
    }
}

impl From<CrmError> for Cause {
    fn from(e: CrmError) -> Self {
        let kind = match &e {
            _ if e.is_transient() => FailureKind::CrmUnavailable,
            CrmError::Config(_) => FailureKind::Config,
            _ => FailureKind::Crm,
        };
        Cause::new(kind, e.to_string())
    }
}

impl From<DbError> for Cause {
    fn from(e: DbError) -> Self {
        let kind = if e.is_transient() { FailureKind::DatabaseUnavailable } else { FailureKind::Database };
        Cause::new(kind, e.to_string())
    }
}

impl From<TokenError> for Cause {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::NeedsAuthorization(_) => Cause::new(FailureKind::NeedsAuthorization, e.to_string()),
            TokenError::Crm(e) => e.into(),
            TokenError::Db(_) | TokenError::Unstored(_) => {
                let kind = if e.is_transient() { FailureKind::DatabaseUnavailable } else { FailureKind::Database };
                Cause::new(kind, e.to_string())
            }
            TokenError::ShuttingDown => Cause::new(FailureKind::ShuttingDown, e.to_string()),
            TokenError::Internal(_) => Cause::new(FailureKind::Internal, e.to_string()),
        }
    }
}

impl From<WebhookProblem> for Cause {
    fn from(e: WebhookProblem) -> Self {
        Cause::new(FailureKind::Config, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cause: impl Into<Cause>, kind: FailureKind, state: CrmState, transient: bool) {
        let failure = cause.into().of(Crm::AmoCrm);
        assert_eq!((failure.kind, failure.state(), failure.is_transient()), (kind, state, transient), "{failure:?}");
    }

    #[test]
    fn kinds() {
        use FailureKind as K;
        let (error, needs) = (CrmState::Error, CrmState::NeedsAuthorization);
        check(CrmError::Network("reset".into()), K::CrmUnavailable, error, true);
        check(CrmError::Status { status: 503, reason: "busy".into(), transient: true }, K::CrmUnavailable, error, true);
        check(CrmError::Status { status: 400, reason: "bad".into(), transient: false }, K::Crm, error, false);
        check(CrmError::Malformed("x".into()), K::Crm, error, false);
        check(CrmError::Config("no client_id".into()), K::Config, error, false);
        // Past the token layer, a refused token is the CRM's word, not a
        // missing authorisation: that one comes as a TokenError.
        check(CrmError::Unauthorized { reason: "expired".into() }, K::Crm, error, false);
        check(TokenError::NeedsAuthorization("none".into()), K::NeedsAuthorization, needs, false);
        check(TokenError::ShuttingDown, K::ShuttingDown, error, true);
        check(TokenError::Internal("panic".into()), K::Internal, error, false);
        let down = DbError::Connect { target: "db".into(), reason: "refused".into() };
        check(down, K::DatabaseUnavailable, error, true);
        check(TokenError::Db(DbError::BadUrl), K::Database, error, false);
        let column =
            DbError::Column { target: "db".into(), table: "config", column: "x".into(), reason: "type".into() };
        check(column, K::Database, error, false);
    }

    #[test]
    fn every_kind_has_its_own_label() {
        let labels: std::collections::HashSet<&str> = FailureKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels.len(), FailureKind::ALL.len());
    }
}
