//! A lead to deliver, as `crm_lead_outbox` holds it, and what a CRM answered
//! to its create or to the lookup of its key — the terms the delivery rules
//! decide on. No I/O here.

use chrono::{DateTime, Utc};

use super::Crm;

/// An outbox row taken for a send or a lookup.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    /// The producer's idempotency key (a UUID, as text); it travels inside
    /// the lead, so a lookup can find it.
    pub delivery_key: String,
    pub title: Option<String>,
    pub contact_name: Option<String>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub comment: Option<String>,
    /// `numeric` read as a float: NaN stays NaN, so validation can refuse it.
    pub price: Option<f64>,
    pub source: Option<String>,
    /// `utm_source`, `utm_medium`, `utm_campaign`, `utm_content`, `utm_term`.
    pub utm: [Option<String>; 5],
    pub pipeline_id: Option<String>,
    pub stage_id: Option<String>,
    pub responsible_user_id: Option<i64>,
    pub extra: serde_json::Value,
    pub state: OutboxState,
    pub attempts: i32,
    /// The CRM of its last send (a `sending` row is settled there).
    pub crm: Option<Crm>,
    pub crm_contact_id: Option<i64>,
    pub last_attempt_at: Option<DateTime<Utc>>,
}

impl OutboxRow {
    /// What the lead is called: its title, else the first contact detail.
    pub fn name(&self) -> Option<&str> {
        [&self.title, &self.contact_name, &self.phone, &self.email]
            .into_iter()
            .flatten()
            .map(|s| s.trim())
            .find(|s| !s.is_empty())
    }

    /// Any contact detail at all.
    pub fn has_contact(&self) -> bool {
        [&self.contact_name, &self.phone, &self.email].into_iter().flatten().any(|s| !s.trim().is_empty())
    }
}

/// `crm_lead_outbox.state`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum OutboxState {
    #[default]
    Pending,
    Sending,
    Delivered,
    Failed,
}

impl OutboxState {
    pub const ALL: [OutboxState; 4] =
        [OutboxState::Pending, OutboxState::Sending, OutboxState::Delivered, OutboxState::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Pending => "pending",
            OutboxState::Sending => "sending",
            OutboxState::Delivered => "delivered",
            OutboxState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<OutboxState> {
        OutboxState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// Where a lead goes in its CRM: the stage resolved against the synced
/// stages, and its responsible user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeadPlacement {
    AmoCrm { pipeline_id: i64, status_id: i64 },
    Bitrix24Lead { status_id: String },
    Bitrix24Deal { category_id: i32, stage_id: String },
}

/// The ids a delivered lead has in its CRM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreatedIds {
    pub entity_id: i64,
    pub contact_id: Option<i64>,
}

/// What a CRM answered to a create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendAnswer {
    Created(CreatedIds),
    /// AmoCRM 401: the token is refreshed and the row sent again.
    Unauthorized,
    /// Refused for something fixed meanwhile (AmoCRM: the key field was
    /// gone and is there again): sent again at once, not counted.
    Outdated(String),
    /// Refused before anything ran (rate limit, time budget); not before
    /// `not_before` when the CRM said.
    NotExecuted {
        reason: String,
        not_before: Option<DateTime<Utc>>,
    },
    /// Refused for the account as a whole (blocked, unpaid, a dead webhook).
    AccountRefused(String),
    /// The CRM refused this lead (validation): final.
    Refused(String),
    /// No answer that says what happened (timeout, reset, 5xx, no id).
    Ambiguous(String),
}

/// What a lookup of a key found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupAnswer {
    Found(CreatedIds),
    /// Bitrix24: the contact exists, the deal does not.
    ContactWithoutDeal {
        contact_id: i64,
    },
    Absent,
    /// The search failed, or a filter was visibly not applied.
    Inconclusive(String),
}

/// The entity a lead became (`crm_entity_type`).
pub fn entity_type_of(placement: &LeadPlacement) -> &'static str {
    match placement {
        LeadPlacement::AmoCrm { .. } | LeadPlacement::Bitrix24Lead { .. } => "lead",
        LeadPlacement::Bitrix24Deal { .. } => "deal",
    }
}
