//! Bitrix24: what a tenant tracks (deals or leads), the inbound webhook it
//! is reached through, and a stage as the portal lists it.

use std::fmt;

use super::is_loopback;
use crate::secret::Secret;

/// What a Bitrix24 tenant tracks: deals (with categories) or leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityType {
    Deal,
    Lead,
}

impl EntityType {
    pub const ALL: [EntityType; 2] = [EntityType::Deal, EntityType::Lead];

    pub fn as_str(self) -> &'static str {
        match self {
            EntityType::Deal => "deal",
            EntityType::Lead => "lead",
        }
    }

    pub fn parse(s: &str) -> Option<EntityType> {
        EntityType::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// `entityTypeId` in the REST API.
    pub fn type_id(self) -> i64 {
        match self {
            EntityType::Lead => 1,
            EntityType::Deal => 2,
        }
    }
}

/// A Bitrix24 inbound webhook, `https://HOST/rest/USER_ID/CODE/`, kept whole:
/// the runbook dropped the user id, without which no call works.
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    scheme: String,
    /// Host name, with `:port` only when the URL names one.
    host: String,
    /// Positive, and fits the contract's `integer` column.
    user_id: i32,
    code: Secret,
}

/// Why a webhook URL was refused. Never carries the code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("is not a URL")]
    NotUrl,
    #[error("must use https (plain http is accepted only for loopback hosts)")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("must not carry a user name, password, query or fragment")]
    Extras,
    #[error("must have the shape https://HOST/rest/USER_ID/CODE/")]
    Shape,
    #[error("has no user id: the shape is https://HOST/rest/USER_ID/CODE/")]
    NoUserId,
    #[error("has a user id that is not a positive number")]
    BadUserId,
    #[error("has a code with characters other than letters and digits")]
    BadCode,
}

impl Webhook {
    pub fn parse(input: &str) -> Result<Webhook, WebhookError> {
        let url = url::Url::parse(input.trim()).map_err(|_| WebhookError::NotUrl)?;
        let host = url.host_str().ok_or(WebhookError::NoHost)?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(host) => {}
            _ => return Err(WebhookError::Scheme),
        }
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
            return Err(WebhookError::Extras);
        }
        let mut segments: Vec<&str> = url.path_segments().ok_or(WebhookError::Shape)?.collect();
        if segments.last() == Some(&"") {
            segments.pop();
        }
        let (user, code) = match segments.as_slice() {
            ["rest", user, code] => (*user, *code),
            ["rest", _] => return Err(WebhookError::NoUserId),
            _ => return Err(WebhookError::Shape),
        };
        let user_id: i32 = user.parse().map_err(|_| {
            if user.chars().all(|c| c.is_ascii_alphanumeric()) && !user.chars().all(|c| c.is_ascii_digit()) {
                // `/rest/abc123/` with nothing after it is the runbook's form without the user id.
                WebhookError::NoUserId
            } else {
                WebhookError::BadUserId
            }
        })?;
        if user_id <= 0 {
            return Err(WebhookError::BadUserId);
        }
        if code.is_empty() || !code.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(WebhookError::BadCode);
        }
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        Ok(Webhook { scheme: url.scheme().to_string(), host, user_id, code: Secret::new(code) })
    }

    /// `acme.bitrix24.ru`, or `127.0.0.1:18081` when the URL names a port.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn user_id(&self) -> i32 {
        self.user_id
    }

    pub fn code(&self) -> &Secret {
        &self.code
    }

    /// The URL of a REST method, e.g. `…/rest/1/CODE/scope`. A secret: it
    /// contains the code.
    pub fn method_url(&self, method: &str) -> Secret {
        Secret::new(format!("{}://{}/rest/{}/{}/{}", self.scheme, self.host, self.user_id, self.code.expose(), method))
    }
}

/// Prints `https://acme.bitrix24.ru/rest/1/***/`.
impl fmt::Display for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}/rest/{}/***/", self.scheme, self.host, self.user_id)
    }
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Webhook({self})")
    }
}

/// A Bitrix24 stage's meaning: `EXTRA.SEMANTICS`, or `SEMANTICS` S/F
/// (apology counts as failure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Semantics {
    Process,
    Success,
    Failure,
}

impl Semantics {
    pub fn as_str(self) -> &'static str {
        match self {
            Semantics::Process => "process",
            Semantics::Success => "success",
            Semantics::Failure => "failure",
        }
    }

    pub fn parse(s: &str) -> Option<Semantics> {
        match s {
            "process" => Some(Semantics::Process),
            "success" => Some(Semantics::Success),
            "failure" => Some(Semantics::Failure),
            _ => None,
        }
    }
}

/// One stage of one Bitrix24 deal category (0 is the default pipeline), or
/// one lead status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct B24Stage {
    pub entity_type: EntityType,
    pub category_id: i32,
    pub category_name: String,
    pub status_id: String,
    pub status_name: String,
    pub status_sort: i32,
    pub semantics: Semantics,
}

/// The category of a deal STAGE_ID: n for `C<n>:…`, 0 without the prefix;
/// `None` when the number does not fit.
pub fn category_of_stage(id: &str) -> Option<i64> {
    let prefixed = id
        .strip_prefix('C')
        .and_then(|rest| rest.split_once(':'))
        .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match prefixed {
        Some((n, _)) => n.parse().ok(),
        None => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_category_of_a_stage_id() {
        for (id, category) in [("NEW", Some(0)), ("C1:NEW", Some(1)), ("C17:UC_X", Some(17)), ("CONVERTED", Some(0))] {
            assert_eq!(category_of_stage(id), category, "{id}");
        }
        assert_eq!(category_of_stage("C:NEW"), Some(0));
        assert_eq!(category_of_stage("C99999999999999999999:NEW"), None);
    }

    fn check(input: &str, expected: Result<(&str, i32, &str), WebhookError>) {
        let got = Webhook::parse(input).map(|w| (w.host().to_string(), w.user_id(), w.code().expose().to_string()));
        let expected = expected.map(|(h, u, c)| (h.to_string(), u, c.to_string()));
        assert_eq!(got, expected, "{input}");
    }

    #[test]
    fn webhook_urls() {
        check("https://acme.bitrix24.ru/rest/1/abc123def456/", Ok(("acme.bitrix24.ru", 1, "abc123def456")));
        check("https://acme.bitrix24.ru/rest/17/abc", Ok(("acme.bitrix24.ru", 17, "abc")));
        check("http://127.0.0.1:8080/rest/1/abc/", Ok(("127.0.0.1:8080", 1, "abc")));
        check("https://crm.example.com:8443/rest/3/x1/", Ok(("crm.example.com:8443", 3, "x1")));
        check("https://acme.bitrix24.ru/rest/abc123def456/", Err(WebhookError::NoUserId));
        check("http://acme.bitrix24.ru/rest/1/abc/", Err(WebhookError::Scheme));
        check("https://acme.bitrix24.ru/rest/0/abc/", Err(WebhookError::BadUserId));
        check("https://acme.bitrix24.ru/rest/-1/abc/", Err(WebhookError::BadUserId));
        check("https://acme.bitrix24.ru/rest/4294967296/abc/", Err(WebhookError::BadUserId));
        check("https://acme.bitrix24.ru/rest/1/abc/profile", Err(WebhookError::Shape));
        check("https://acme.bitrix24.ru/api/1/abc/", Err(WebhookError::Shape));
        check("https://acme.bitrix24.ru/rest/1/ab-c/", Err(WebhookError::BadCode));
        check("https://acme.bitrix24.ru/rest/1/abc/?x=1", Err(WebhookError::Extras));
        check("acme.bitrix24.ru/rest/1/abc/", Err(WebhookError::NotUrl));
        check("", Err(WebhookError::NotUrl));
    }

    #[test]
    fn a_webhook_prints_without_its_code() {
        let w = Webhook::parse("https://acme.bitrix24.ru/rest/1/abc123def456/").unwrap();
        assert_eq!(w.to_string(), "https://acme.bitrix24.ru/rest/1/***/");
        assert!(!format!("{w:?}").contains("abc123"));
        assert_eq!(w.method_url("scope").expose(), "https://acme.bitrix24.ru/rest/1/abc123def456/scope");
    }
}
