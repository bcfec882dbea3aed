//! Which CRM, and the state of a tenant's connection to it.

use std::fmt;

/// The two CRMs, as named in `crm_connect_status.crm` and in the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Crm {
    AmoCrm,
    Bitrix24,
}

impl Crm {
    pub const ALL: [Crm; 2] = [Crm::AmoCrm, Crm::Bitrix24];

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrmState {
    Connected,
    NeedsAuthorization,
    Error,
    Unmanaged,
}

impl CrmState {
    pub const ALL: [CrmState; 4] =
        [CrmState::Connected, CrmState::NeedsAuthorization, CrmState::Error, CrmState::Unmanaged];

    pub fn as_str(self) -> &'static str {
        match self {
            CrmState::Connected => "connected",
            CrmState::NeedsAuthorization => "needs_authorization",
            CrmState::Error => "error",
            CrmState::Unmanaged => "unmanaged",
        }
    }

    /// The state a stored `crm_connect_status.state` names; `None` for a
    /// value this program never writes, rather than a guess.
    pub fn parse(s: &str) -> Option<CrmState> {
        CrmState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_back_exactly_as_written() {
        let table = [
            ("connected", Some(CrmState::Connected)),
            ("needs_authorization", Some(CrmState::NeedsAuthorization)),
            ("error", Some(CrmState::Error)),
            ("unmanaged", Some(CrmState::Unmanaged)),
            ("Connected", None),
            ("needs-authorization", None),
            (" error", None),
            ("", None),
        ];
        for (text, expected) in table {
            assert_eq!(CrmState::parse(text), expected, "{text:?}");
        }
        for state in CrmState::ALL {
            assert_eq!(CrmState::parse(state.as_str()), Some(state));
        }
    }
}
