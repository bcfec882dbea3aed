//! What a tenant database holds, in the terms decisions compare: the
//! `config` columns a reconcile manages, the AmoCRM tokens with the account
//! they belong to, and a stored stage row with its
//! flags. Shared by `reconcile` (which plans on them) and `db` (which reads
//! and writes them), so neither imports the other.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{Crm, StageFlags};
use crate::secret::Secret;

/// The `config` columns a reconcile writes without calling a CRM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConfigColumn {
    AmocrmSubdomain,
    AmocrmDomain,
    AmocrmClientId,
    AmocrmClientSecret,
    Bitrix24Domain,
    Bitrix24AccessToken,
    Bitrix24UserId,
    Bitrix24EntityType,
}

impl ConfigColumn {
    pub const ALL: [ConfigColumn; 8] = [
        ConfigColumn::AmocrmSubdomain,
        ConfigColumn::AmocrmDomain,
        ConfigColumn::AmocrmClientId,
        ConfigColumn::AmocrmClientSecret,
        ConfigColumn::Bitrix24Domain,
        ConfigColumn::Bitrix24AccessToken,
        ConfigColumn::Bitrix24UserId,
        ConfigColumn::Bitrix24EntityType,
    ];

    /// The column's name in `config` (a public interface: database.md).
    pub fn name(self) -> &'static str {
        match self {
            ConfigColumn::AmocrmSubdomain => "amocrm_subdomain",
            ConfigColumn::AmocrmDomain => "amocrm_domain",
            ConfigColumn::AmocrmClientId => "amocrm_client_id",
            ConfigColumn::AmocrmClientSecret => "amocrm_client_secret",
            ConfigColumn::Bitrix24Domain => "bitrix24_domain",
            ConfigColumn::Bitrix24AccessToken => "bitrix24_access_token",
            ConfigColumn::Bitrix24UserId => "bitrix24_user_id",
            ConfigColumn::Bitrix24EntityType => "bitrix24_entity_type",
        }
    }

    pub fn crm(self) -> Crm {
        match self {
            ConfigColumn::AmocrmSubdomain
            | ConfigColumn::AmocrmDomain
            | ConfigColumn::AmocrmClientId
            | ConfigColumn::AmocrmClientSecret => Crm::AmoCrm,
            _ => Crm::Bitrix24,
        }
    }

    /// Part of the Bitrix24 webhook: a change means a new connection.
    pub fn is_bitrix24_webhook(self) -> bool {
        matches!(self, ConfigColumn::Bitrix24Domain | ConfigColumn::Bitrix24AccessToken | ConfigColumn::Bitrix24UserId)
    }

    pub fn is_integer(self) -> bool {
        self == ConfigColumn::Bitrix24UserId
    }

    fn is_secret(self) -> bool {
        matches!(self, ConfigColumn::AmocrmClientSecret | ConfigColumn::Bitrix24AccessToken)
    }
}

/// A column value; secrets stay wrapped so that a plan can be printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnValue {
    Text(String),
    Secret(Secret),
    Int(i32),
}

impl ColumnValue {
    /// Wraps a stored text value, as a secret where the column holds one.
    pub fn from_stored(column: ConfigColumn, value: String) -> ColumnValue {
        if column.is_secret() { ColumnValue::Secret(Secret::new(value)) } else { ColumnValue::Text(value) }
    }
}

/// The stored value of every managed column (`None` = NULL).
pub type CurrentColumns = HashMap<ConfigColumn, Option<ColumnValue>>;

/// A stored row.
#[derive(Clone, Debug)]
pub struct StoredStage<R> {
    pub row: R,
    pub flags: StageFlags,
    pub removed: bool,
}

/// The AmoCRM token columns of the `config` row, and the account they
/// belong to.
#[derive(Clone, Debug, Default)]
pub struct StoredTokens {
    pub access: Option<Secret>,
    pub refresh: Option<Secret>,
    pub expires_at: Option<DateTime<Utc>>,
    pub code_sha256: Option<String>,
    pub account: StoredAccount,
}

/// Which AmoCRM account and integration a pair belongs to, as the `config`
/// row names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredAccount {
    pub subdomain: Option<String>,
    pub domain: Option<String>,
    pub client_id: Option<String>,
}
