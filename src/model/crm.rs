//! Which CRM, and the state of a tenant's connection to it.

use std::fmt;

/// The two CRMs, as named in `crm_connect_status.crm` and in the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Crm {
    AmoCrm,
    Bitrix24,
}

impl Crm {
    pub fn as_str(self) -> &'static str {
        match self {
            Crm::AmoCrm => "amocrm",
            Crm::Bitrix24 => "bitrix24",
        }
    }
}

impl fmt::Display for Crm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection's state, as `crm_connect_status.state` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrmState {
    Connected,
    NeedsAuthorization,
    Error,
    Unmanaged,
}

impl CrmState {
    pub fn as_str(self) -> &'static str {
        match self {
            CrmState::Connected => "connected",
            CrmState::NeedsAuthorization => "needs_authorization",
            CrmState::Error => "error",
            CrmState::Unmanaged => "unmanaged",
        }
    }
}
