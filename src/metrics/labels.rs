//! The label sets of the daemon's metrics. Every label value comes from an
//! enum's own name (or a tenant slug, a CRM name, an HTTP status), never
//! from `Debug`.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::model::{Crm, CrmState, FailureKind};

/// A tenant as `crm_connect_tenants` counts it: `pending` until its first
/// outcome, then the worst state of its CRMs; `standby` while another
/// daemon holds its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TenantState {
    Pending,
    Is(CrmState),
    Standby,
}

impl TenantState {
    pub(super) fn all() -> impl Iterator<Item = TenantState> {
        std::iter::once(TenantState::Pending)
            .chain(CrmState::ALL.map(TenantState::Is))
            .chain(std::iter::once(TenantState::Standby))
    }

    /// The states a tenant in force can be in: `unmanaged` is what a
    /// removed tenant's database says, and a removed tenant has no series.
    pub(super) fn in_force() -> impl Iterator<Item = TenantState> {
        TenantState::all().filter(|s| *s != TenantState::Is(CrmState::Unmanaged))
    }
}

/// One AmoCRM token refresh's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefreshResult {
    Ok,
    /// The CRM refused the refresh token: `needs_authorization`.
    Rejected,
    /// No answer, or one that could not be used.
    Failed,
    /// Refreshed, but the write failed: the pair waits in memory.
    Unstored,
}

impl RefreshResult {
    pub(super) const ALL: [RefreshResult; 4] =
        [RefreshResult::Ok, RefreshResult::Rejected, RefreshResult::Failed, RefreshResult::Unstored];
}

// Label values come from these enums' own names, never from `Debug`.
impl EncodeLabelValue for TenantState {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        match self {
            TenantState::Pending => "pending".encode(encoder),
            TenantState::Is(state) => state.as_str().encode(encoder),
            TenantState::Standby => "standby".encode(encoder),
        }
    }
}

impl EncodeLabelValue for RefreshResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        let result = match self {
            RefreshResult::Ok => "ok",
            RefreshResult::Rejected => "rejected",
            RefreshResult::Failed => "failed",
            RefreshResult::Unstored => "unstored",
        };
        result.encode(encoder)
    }
}

impl EncodeLabelValue for Crm {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        self.as_str().encode(encoder)
    }
}

impl EncodeLabelValue for FailureKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        self.as_str().encode(encoder)
    }
}

// Closed label sets are created at zero, so that a dashboard sees a zero
// rather than a missing series (the encoder leaves out a family with no
// series at all).

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StateLabels {
    pub(super) state: TenantState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResultLabels {
    pub(super) result: RefreshResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FailureLabels {
    pub(super) crm: Crm,
    pub(super) kind: FailureKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CrmResultLabels {
    pub(super) crm: String,
    pub(super) result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CrmStatusLabels {
    pub(super) crm: String,
    pub(super) status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TenantCrmLabels {
    pub(super) tenant: String,
    pub(super) crm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct WorkLabels {
    pub(super) work: String,
}

/// The kinds of tenant work the daemon runs, each counted from zero.
pub const WORK_KINDS: [&str; 3] = ["reconcile", "resync", "refresh"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TenantLabels {
    pub(super) tenant: String,
}

/// What became of one lead send or lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    Delivered,
    Refused,
    /// Not executed (rate limit, account refusal, refused token).
    Failed,
    Ambiguous,
    Found,
    Absent,
    Inconclusive,
}

impl AttemptOutcome {
    pub(super) const ALL: [AttemptOutcome; 7] = [
        AttemptOutcome::Delivered,
        AttemptOutcome::Refused,
        AttemptOutcome::Failed,
        AttemptOutcome::Ambiguous,
        AttemptOutcome::Found,
        AttemptOutcome::Absent,
        AttemptOutcome::Inconclusive,
    ];
}

impl EncodeLabelValue for AttemptOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        let outcome = match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Refused => "refused",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Ambiguous => "ambiguous",
            AttemptOutcome::Found => "found",
            AttemptOutcome::Absent => "absent",
            AttemptOutcome::Inconclusive => "inconclusive",
        };
        outcome.encode(encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutboxLabels {
    pub(super) tenant: String,
    pub(super) state: &'static str,
}

/// A funnel stream of a tenant: `lead_status_changed` (AmoCRM), `lead`
/// or `deal` (Bitrix24).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StreamLabels {
    pub(super) tenant: String,
    pub(super) stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AttemptLabels {
    pub(super) crm: Crm,
    pub(super) outcome: AttemptOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CrmLabels {
    pub(super) crm: Crm,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TenantStateLabels {
    pub(super) tenant: String,
    pub(super) state: TenantState,
}

/// What a CRM request waited for before it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateLimit {
    /// This process's own per-account (per-portal) request budget.
    Quota,
    /// A Bitrix24 method paused after `OPERATION_TIME_LIMIT`.
    MethodPause,
}

impl EncodeLabelValue for RateLimit {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        match self {
            RateLimit::Quota => "quota".encode(encoder),
            RateLimit::MethodPause => "method_pause".encode(encoder),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct LimitLabels {
    pub(super) crm: Crm,
    pub(super) limit: RateLimit,
}

/// The waits that can happen, each counted from zero.
pub(super) const LIMITS: [(Crm, RateLimit); 3] =
    [(Crm::AmoCrm, RateLimit::Quota), (Crm::Bitrix24, RateLimit::Quota), (Crm::Bitrix24, RateLimit::MethodPause)];

/// A PostgreSQL server as `host:port` (or `socket-directory:port`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ServerLabels {
    pub(super) server: String,
}
