//! The Bitrix24 webhook's grant, checked: `scope` must hold `crm` and
//! `profile` must be the user the URL names. One copy of the rule for the
//! reconcile and the dry run. Pure.

use crate::model::Webhook;

/// Why a webhook cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookProblem {
    #[error(
        "the webhook {webhook} lacks the `crm` scope (granted: {granted}); add it in Bitrix24 under Developer resources"
    )]
    NoCrmScope { webhook: String, granted: String },
    #[error("the webhook {webhook} belongs to user {user}, not to the user in its URL")]
    OtherUser { webhook: String, user: String },
}

/// Checks what `scope` and `profile` answered for `webhook`.
pub fn check_grant(webhook: &Webhook, scopes: &[String], profile_id: Option<&str>) -> Result<(), WebhookProblem> {
    if !scopes.iter().any(|s| s == "crm") {
        let granted = if scopes.is_empty() { "none".to_string() } else { scopes.join(", ") };
        return Err(WebhookProblem::NoCrmScope { webhook: webhook.to_string(), granted });
    }
    if let Some(user) = profile_id.filter(|id| *id != webhook.user_id().to_string()) {
        return Err(WebhookProblem::OtherUser { webhook: webhook.to_string(), user: user.to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(scopes: &[&str], profile: Option<&str>, expected: Result<(), &str>) {
        let webhook = Webhook::parse("https://acme.bitrix24.ru/rest/7/abc123/").unwrap();
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        let got = check_grant(&webhook, &scopes, profile).map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_string), "{scopes:?} {profile:?}");
    }

    #[test]
    fn grants() {
        check(&["crm"], Some("7"), Ok(()));
        check(&["user", "crm"], None, Ok(()));
        check(
            &["user", "task"],
            Some("7"),
            Err("the webhook https://acme.bitrix24.ru/rest/7/***/ lacks the `crm` scope (granted: user, task); \
                 add it in Bitrix24 under Developer resources"),
        );
        check(
            &[],
            None,
            Err("the webhook https://acme.bitrix24.ru/rest/7/***/ lacks the `crm` scope (granted: none); \
                 add it in Bitrix24 under Developer resources"),
        );
        check(
            &["crm"],
            Some("8"),
            Err("the webhook https://acme.bitrix24.ru/rest/7/***/ belongs to user 8, not to the user in its URL"),
        );
    }
}
