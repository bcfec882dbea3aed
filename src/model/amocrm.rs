//! An AmoCRM account: the public domain it lives on, the hosts derived from
//! it, the integration's credentials and the token set it is reached with.

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

/// An AmoCRM account and its hosts, derived once here: the API client, the
/// OAuth callback's referer check and `auth-url` all read them from this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmoAccount {
    subdomain: String,
    domain: AmoDomain,
    api_base: String,
    host: String,
    authorize_base: String,
}

impl AmoAccount {
    /// `base_url` (tests, the sandbox) stands for every host of the account.
    pub fn new(subdomain: impl Into<String>, domain: AmoDomain, base_url: Option<&url::Url>) -> AmoAccount {
        let subdomain = subdomain.into();
        let (api_base, host, authorize_base) = match base_url {
            Some(url) => {
                let api_base = url.as_str().trim_end_matches('/').to_string();
                let host = match (url.host_str(), url.port()) {
                    (Some(host), Some(port)) => format!("{host}:{port}"),
                    (Some(host), None) => host.to_string(),
                    (None, _) => url.as_str().to_string(),
                };
                (api_base.clone(), host, api_base)
            }
            None => (
                format!("https://{subdomain}.{}", domain.as_str()),
                format!("{subdomain}.{}", domain.as_str()),
                format!("https://www.{}", domain.as_str()),
            ),
        };
        AmoAccount { subdomain, domain, api_base, host, authorize_base }
    }

    pub fn subdomain(&self) -> &str {
        &self.subdomain
    }

    pub fn domain(&self) -> AmoDomain {
        self.domain
    }

    /// `https://acme.amocrm.ru`, or `base_url` without a trailing slash:
    /// where the API and the token endpoint are.
    pub fn api_base(&self) -> &str {
        &self.api_base
    }

    /// `acme.amocrm.ru`, or `base_url`'s host[:port]: the account as
    /// AmoCRM names it in `referer`, and one rate-limit budget.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `https://www.amocrm.ru` (the domain's own host), or `base_url`:
    /// where a browser authorises the integration.
    pub fn authorize_base(&self) -> &str {
        &self.authorize_base
    }
}

/// The integration's credentials, sent with every token request.
pub struct Credentials<'a> {
    pub client_id: &'a str,
    pub client_secret: &'a Secret,
    pub redirect_uri: &'a str,
}

/// Why no token can be requested: a credential is not configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client_id, client_secret and redirect_uri are needed to obtain tokens")]
pub struct MissingCredentials;

/// An AmoCRM token set as stored in `config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub access: Secret,
    /// `None` for a long-lived token, which cannot be refreshed.
    pub refresh: Option<Secret>,
    pub expires_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_hosts_come_from_the_domain_or_the_base_url() {
        // (domain, base_url) → (API base, account host, authorisation base)
        let cases = [
            (AmoDomain::AmocrmRu, None, ("https://acme.amocrm.ru", "acme.amocrm.ru", "https://www.amocrm.ru")),
            (AmoDomain::AmocrmCom, None, ("https://acme.amocrm.com", "acme.amocrm.com", "https://www.amocrm.com")),
            (AmoDomain::KommoCom, None, ("https://acme.kommo.com", "acme.kommo.com", "https://www.kommo.com")),
            (
                AmoDomain::AmocrmRu,
                Some("http://127.0.0.1:8080/"),
                ("http://127.0.0.1:8080", "127.0.0.1:8080", "http://127.0.0.1:8080"),
            ),
        ];
        for (domain, base_url, (api, account, authorize)) in cases {
            let base_url: Option<url::Url> = base_url.map(|u| u.parse().unwrap());
            let account_hosts = AmoAccount::new("acme", domain, base_url.as_ref());
            assert_eq!(
                (account_hosts.api_base(), account_hosts.host(), account_hosts.authorize_base()),
                (api, account, authorize),
                "{domain:?} {base_url:?}"
            );
        }
    }
}
