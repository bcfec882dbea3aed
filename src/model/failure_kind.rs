//! Why a CRM step failed, as far as deciding what comes next goes: the
//! closed set of failure kinds, the state each leaves a connection in, and
//! the `kind` label of `crm_connect_failures_total`.

use super::CrmState;

/// Why a CRM step failed, as far as deciding what comes next goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// No usable token: a person must authorise again.
    NeedsAuthorization,
    /// The tenant's file or the CRM's setup stands in the way (missing
    /// credentials, a webhook without the `crm` scope, a stage mapping that
    /// matches nothing): nothing changes until someone edits something.
    Config,
    /// The CRM answered, but not usefully (an error it will repeat, an
    /// answer that cannot be read).
    Crm,
    /// The CRM could not be reached or was busy (network, 5xx, 429).
    CrmUnavailable,
    /// The database refused a statement or holds a value this program
    /// cannot read.
    Database,
    /// The database could not be reached or was busy.
    DatabaseUnavailable,
    /// A bug: a panic in the tenant's work.
    Internal,
    /// The process is stopping.
    ShuttingDown,
}

impl FailureKind {
    pub const ALL: [FailureKind; 8] = [
        FailureKind::NeedsAuthorization,
        FailureKind::Config,
        FailureKind::Crm,
        FailureKind::CrmUnavailable,
        FailureKind::Database,
        FailureKind::DatabaseUnavailable,
        FailureKind::Internal,
        FailureKind::ShuttingDown,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::NeedsAuthorization => "needs_authorization",
            FailureKind::Config => "config",
            FailureKind::Crm => "crm",
            FailureKind::CrmUnavailable => "crm_unavailable",
            FailureKind::Database => "database",
            FailureKind::DatabaseUnavailable => "database_unavailable",
            FailureKind::Internal => "internal",
            FailureKind::ShuttingDown => "shutting_down",
        }
    }

    /// Trying again soon may help.
    pub fn is_transient(self) -> bool {
        matches!(self, FailureKind::CrmUnavailable | FailureKind::DatabaseUnavailable | FailureKind::ShuttingDown)
    }

    /// The state a failure of this kind leaves the connection in.
    pub fn state(self) -> CrmState {
        match self {
            FailureKind::NeedsAuthorization => CrmState::NeedsAuthorization,
            _ => CrmState::Error,
        }
    }
}
