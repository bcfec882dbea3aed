//! The `config` columns a reconcile writes without calling a CRM: what the
//! tenant's file says they should hold, compared with what they hold.

use crate::config::TenantConfig;
use crate::model::{ColumnValue, ConfigColumn, CurrentColumns};

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
