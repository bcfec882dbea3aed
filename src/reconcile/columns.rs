//! The `config` columns a reconcile writes without calling a CRM: what the
//! tenant's file says they should hold, compared with what they hold.

use std::collections::HashMap;

use crate::config::TenantConfig;
use crate::model::Crm;
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

/// What the tenant's file says the managed columns should hold. Columns of
/// a CRM the file does not configure are left as they are.
pub fn desired_columns(tenant: &TenantConfig) -> Vec<(ConfigColumn, ColumnValue)> {
    let mut desired = Vec::new();
    if let Some(amo) = &tenant.amocrm {
        desired.push((ConfigColumn::AmocrmSubdomain, ColumnValue::Text(amo.account.subdomain().into())));
        desired.push((ConfigColumn::AmocrmDomain, ColumnValue::Text(amo.account.domain().as_str().into())));
        if let Some(id) = &amo.client_id {
            desired.push((ConfigColumn::AmocrmClientId, ColumnValue::Text(id.clone())));
        }
        if let Some(secret) = &amo.client_secret {
            desired.push((ConfigColumn::AmocrmClientSecret, ColumnValue::Secret(secret.clone())));
        }
    }
    if let Some(b24) = &tenant.bitrix24 {
        desired.push((ConfigColumn::Bitrix24Domain, ColumnValue::Text(b24.webhook.host().into())));
        desired.push((ConfigColumn::Bitrix24AccessToken, ColumnValue::Secret(b24.webhook.code().clone())));
        desired.push((ConfigColumn::Bitrix24UserId, ColumnValue::Int(b24.webhook.user_id())));
        desired.push((ConfigColumn::Bitrix24EntityType, ColumnValue::Text(b24.entity_type.as_str().into())));
    }
    desired
}

/// The desired values that differ from the stored ones.
pub fn config_changes(
    desired: Vec<(ConfigColumn, ColumnValue)>,
    current: &CurrentColumns,
) -> Vec<(ConfigColumn, ColumnValue)> {
    desired.into_iter().filter(|(column, value)| current.get(column).and_then(Option::as_ref) != Some(value)).collect()
}

/// Whether `changes` move the AmoCRM subdomain or client id away from a
/// stored value: stored tokens then belong to another account or integration.
pub fn amocrm_account_changed(changes: &[(ConfigColumn, ColumnValue)], current: &CurrentColumns) -> bool {
    changes.iter().any(|(column, _)| {
        matches!(column, ConfigColumn::AmocrmSubdomain | ConfigColumn::AmocrmClientId)
            && current.get(column).is_some_and(Option::is_some)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        desired: &[(ConfigColumn, ColumnValue)],
        current: &[(ConfigColumn, Option<ColumnValue>)],
        expected: &[ConfigColumn],
    ) {
        let current: CurrentColumns = current.iter().cloned().collect();
        let changes = config_changes(desired.to_vec(), &current);
        let columns: Vec<ConfigColumn> = changes.iter().map(|(c, _)| *c).collect();
        assert_eq!(columns, expected);
    }

    #[test]
    fn only_differing_columns_change() {
        use ColumnValue::*;
        use ConfigColumn::*;
        let desired = [
            (AmocrmSubdomain, Text("acme".into())),
            (AmocrmClientSecret, Secret(crate::secret::Secret::new("s"))),
            (Bitrix24UserId, Int(1)),
        ];
        check(&desired, &[], &[AmocrmSubdomain, AmocrmClientSecret, Bitrix24UserId]);
        check(
            &desired,
            &[(AmocrmSubdomain, None), (Bitrix24UserId, Some(Int(2)))],
            &[AmocrmSubdomain, AmocrmClientSecret, Bitrix24UserId],
        );
        check(
            &desired,
            &[
                (AmocrmSubdomain, Some(Text("acme".into()))),
                (AmocrmClientSecret, Some(ColumnValue::from_stored(AmocrmClientSecret, "s".into()))),
                (Bitrix24UserId, Some(Int(1))),
            ],
            &[],
        );
    }
}
