//! An AmoCRM account: the public domain it lives on, and the token set it
//! is reached with.

use chrono::{DateTime, Utc};

use crate::secret::Secret;

/// The public AmoCRM / Kommo domains an account can live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmoDomain {
    AmocrmRu,
    AmocrmCom,
    KommoCom,
}

impl AmoDomain {
    pub const ALL: [AmoDomain; 3] = [AmoDomain::AmocrmRu, AmoDomain::AmocrmCom, AmoDomain::KommoCom];

    pub fn as_str(self) -> &'static str {
        match self {
            AmoDomain::AmocrmRu => "amocrm.ru",
            AmoDomain::AmocrmCom => "amocrm.com",
            AmoDomain::KommoCom => "kommo.com",
        }
    }

    pub fn parse(s: &str) -> Option<AmoDomain> {
        AmoDomain::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// An AmoCRM token set as stored in `config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub access: Secret,
    /// `None` for a long-lived token, which cannot be refreshed.
    pub refresh: Option<Secret>,
    pub expires_at: DateTime<Utc>,
}
