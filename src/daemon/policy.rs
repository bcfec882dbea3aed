//! The one error policy: every failed CRM step of a tenant goes through
//! [`error_policy`], which logs it, counts it in
//! `crm_connect_failures_total{crm, kind}` and decides the next step from
//! its kind alone. It schedules nothing itself: the tenant turns the step
//! into timers.

use crate::failure::{Failure, FailureKind};
use crate::metrics::Metrics;

/// What follows a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NextStep {
    /// Try the work again soon, backing off while it keeps failing.
    Retry,
    /// Nothing will work until a person authorises again: only look at the
    /// stored tokens now and then.
    AwaitAuthorization,
    /// Trying again changes nothing until the file, the CRM's setup or the
    /// schedule brings new work.
    AwaitChange,
}

/// The next step for a failure of this kind.
pub(crate) fn next_step(kind: FailureKind) -> NextStep {
    match kind {
        FailureKind::NeedsAuthorization => NextStep::AwaitAuthorization,
        // A panic is a bug that may depend on timing: retried with backoff,
        // never a tenant that stops for good.
        FailureKind::CrmUnavailable
        | FailureKind::DatabaseUnavailable
        | FailureKind::ShuttingDown
        | FailureKind::Internal => NextStep::Retry,
        FailureKind::Config | FailureKind::Crm | FailureKind::Database => NextStep::AwaitChange,
    }
}

/// Logs and counts `failure` of `tenant`, and says what follows it.
/// `known` is set when the tenant was already in the failure's state (a
/// timed look finding it still waiting for authorisation): logged quietly.
pub(crate) fn error_policy(tenant: &str, failure: &Failure, known: bool, metrics: &Metrics) -> NextStep {
    metrics.failure(failure.crm, failure.kind);
    let step = next_step(failure.kind);
    let (crm, kind, error) = (failure.crm.as_str(), failure.kind.as_str(), &failure.message);
    match step {
        _ if known => tracing::debug!(tenant, crm, kind, error = %error, "still failing"),
        NextStep::Retry => tracing::warn!(tenant, crm, kind, error = %error, "failed; will try again"),
        NextStep::AwaitAuthorization | NextStep::AwaitChange => {
            tracing::error!(tenant, crm, kind, error = %error, "failed")
        }
    }
    step
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: FailureKind, expected: NextStep) {
        assert_eq!(next_step(kind), expected, "{kind:?}");
    }

    #[test]
    fn each_kind_has_its_next_step() {
        use FailureKind as K;
        use NextStep as S;
        check(K::NeedsAuthorization, S::AwaitAuthorization);
        check(K::Config, S::AwaitChange);
        check(K::Crm, S::AwaitChange);
        check(K::CrmUnavailable, S::Retry);
        check(K::Database, S::AwaitChange);
        check(K::DatabaseUnavailable, S::Retry);
        check(K::Internal, S::Retry);
        check(K::ShuttingDown, S::Retry);
    }

    #[test]
    fn every_failure_is_counted_by_crm_and_kind() {
        let metrics = Metrics::new();
        let failure = |crm, kind| Failure { kind, crm, message: "x".into() };
        let amo = crate::model::Crm::AmoCrm;
        error_policy("acme", &failure(amo, FailureKind::Config), false, &metrics);
        error_policy("acme", &failure(amo, FailureKind::Config), true, &metrics);
        let text = metrics.encode();
        assert!(text.contains("crm_connect_failures_total{crm=\"amocrm\",kind=\"config\"} 2"), "{text}");
        assert!(text.contains("crm_connect_failures_total{crm=\"bitrix24\",kind=\"config\"} 0"), "{text}");
    }
}
