//! The AmoCRM (Kommo) API v4 client: the OAuth token endpoint, the account
//! check, pipelines with their statuses, and test leads. Wire formats are
//! private here; callers get model types. At most 7 requests per second per
//! account leave this process (see `http`).

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::http::{RawResponse, RetryPolicy, retrying};
use super::{CrmError, Http};
use crate::model::{AmoAccount, AmoStage, Credentials, Tokens, jwt_expiry, latest_time};
use crate::secret::Secret;

/// AmoCRM documents at most 50 pipelines per account and every page lists
/// at least one, so `_links.next` past page 50 is a list that never ends.
const MAX_PAGES: usize = 50;

/// The account an access token belongs to.
#[derive(Clone, Debug, Deserialize)]
pub struct Account {
    pub id: i64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub subdomain: String,
}

pub struct AmoClient<'h> {
    pub(super) http: &'h Http,
    /// Its host is the rate-limit key: one budget per account.
    pub(super) account: AmoAccount,
    pub(super) retry: RetryPolicy,
}

impl<'h> AmoClient<'h> {
    pub fn new(http: &'h Http, account: &AmoAccount) -> AmoClient<'h> {
        AmoClient { http, account: account.clone(), retry: RetryPolicy::default() }
    }

    /// Shortens the retry deadline (a one-shot command wants an answer).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// `https://acme.amocrm.ru`: the account's API host, for messages.
    pub fn base(&self) -> &str {
        self.account.api_base()
    }

    /// Exchanges a one-time authorization code for tokens.
    pub async fn exchange_code(&self, credentials: &Credentials<'_>, code: &Secret) -> Result<Tokens, CrmError> {
        self.token_request(credentials, "authorization_code", "code", code).await
    }

    /// Trades a refresh token for a new pair; the old refresh token dies.
    pub async fn refresh(&self, credentials: &Credentials<'_>, refresh_token: &Secret) -> Result<Tokens, CrmError> {
        self.token_request(credentials, "refresh_token", "refresh_token", refresh_token).await
    }

    async fn token_request(
        &self,
        credentials: &Credentials<'_>,
        grant_type: &str,
        grant_key: &str,
        grant: &Secret,
    ) -> Result<Tokens, CrmError> {
        let url = format!("{}/oauth2/access_token", self.base());
        let body = json!({
            "client_id": credentials.client_id,
            "client_secret": credentials.client_secret.expose(),
            "grant_type": grant_type,
            grant_key: grant.expose(),
            "redirect_uri": credentials.redirect_uri,
        });
        // A token request holds the `config` row lock while it runs: retry
        // it for less long than an API call.
        let policy = RetryPolicy { deadline: self.retry.deadline.min(Duration::from_secs(60)), ..self.retry };
        let response = retrying(policy, || async {
            let response =
                self.http.send_amocrm(self.account.host(), self.http.client().post(&url).json(&body)).await?;
            match response.status {
                200..=299 => Ok(response),
                // Any 4xx: this grant is dead; sending it again cannot help.
                400..=499 if response.status != 429 => {
                    Err(CrmError::GrantRejected { status: response.status, reason: response.summary() })
                }
                _ => Err(status_error(&response)),
            }
        })
        .await?;
        let wire: TokenResponse = response.json()?;
        let access = wire.access_token.filter(|a| !a.is_empty());
        let Some(access) = access else {
            return Err(CrmError::Malformed("the token response has no access token".into()));
        };
        let expires_at = token_expiry(wire.expires_in.as_ref(), &access, Utc::now());
        Ok(Tokens {
            access: Secret::new(access),
            refresh: wire.refresh_token.filter(|r| !r.is_empty()).map(Secret::new),
            expires_at,
        })
    }

    pub async fn account(&self, access: &Secret) -> Result<Account, CrmError> {
        let response = self.get(&format!("{}/api/v4/account", self.base()), access).await?;
        response.json()
    }

    /// Every status of every pipeline, following `_links.next` if present.
    /// Only a whole list is an answer: a read that cannot be complete is an
    /// error, so that no stage is marked removed because of it.
    pub async fn pipelines(&self, access: &Secret) -> Result<Vec<AmoStage>, CrmError> {
        let mut stages = Vec::new();
        let mut pipeline_ids = HashSet::new();
        let mut url = format!("{}/api/v4/leads/pipelines", self.base());
        for page in 1..=MAX_PAGES {
            let response = self.get(&url, access).await?;
            // AmoCRM answers an empty list with 204 and no body.
            let (pipelines, next) = match response.status {
                204 => (Vec::new(), None),
                _ => response.json::<PipelinesPage>()?.into_pipelines(),
            };
            if pipelines.is_empty() {
                // Every account has its main pipeline, which cannot be
                // deleted: an account listing none is a refused or broken
                // read (an operator would rather see an error than every
                // stage marked removed), and so is a page `_links.next`
                // promised that lists nothing.
                return Err(CrmError::Incomplete(match page {
                    1 => "the account lists no pipelines, though every AmoCRM account has at least one".into(),
                    _ => format!("page {page} of the pipelines, promised by `_links.next`, came back empty"),
                }));
            }
            for pipeline in pipelines {
                if !pipeline_ids.insert(pipeline.id) {
                    return Err(CrmError::Incomplete(format!(
                        "pipeline {} is listed again on page {page}: the pages overlap",
                        pipeline.id
                    )));
                }
                // 142 and 143 belong to every pipeline.
                if pipeline.embedded.statuses.is_empty() {
                    return Err(CrmError::Incomplete(format!(
                        "pipeline {} lists no statuses, though every pipeline has 142 and 143",
                        pipeline.id
                    )));
                }
                for status in pipeline.embedded.statuses {
                    stages.push(AmoStage {
                        pipeline_id: pipeline.id,
                        pipeline_name: pipeline.name.clone(),
                        pipeline_is_main: pipeline.is_main,
                        status_id: status.id,
                        status_name: status.name,
                        status_sort: status.sort,
                        status_type: status.status_type,
                    });
                }
            }
            match next {
                // The token goes only to the account's own host.
                Some(next) if next.starts_with(&format!("{}/", self.base())) => url = next,
                Some(_) => return Err(CrmError::Malformed("`_links.next` points to another host".into())),
                None => return Ok(stages),
            }
        }
        Err(CrmError::Incomplete(format!(
            "the pipelines did not end within {MAX_PAGES} pages (`_links.next` kept coming)"
        )))
    }

    /// Creates one lead and returns its id.
    pub async fn create_lead(&self, access: &Secret, name: &str, pipeline_id: i64) -> Result<i64, CrmError> {
        let url = format!("{}/api/v4/leads", self.base());
        let body = json!([{ "name": name, "pipeline_id": pipeline_id }]);
        // Not retried: a lost answer must not create a second lead.
        let response = self
            .http
            .send_amocrm(self.account.host(), self.http.client().post(&url).bearer_auth(access.expose()).json(&body))
            .await?;
        let response = check_api(response)?;
        let created: LeadsCreated = response.json()?;
        created
            .embedded
            .leads
            .first()
            .map(|l| l.id)
            .ok_or_else(|| CrmError::Malformed("the answer lists no created lead".into()))
    }

    pub(super) async fn get(&self, url: &str, access: &Secret) -> Result<RawResponse, CrmError> {
        retrying(self.retry, || async {
            let request = self.http.client().get(url).bearer_auth(access.expose());
            check_api(self.http.send_amocrm(self.account.host(), request).await?)
        })
        .await
    }
}

pub(super) fn check_api(response: RawResponse) -> Result<RawResponse, CrmError> {
    match response.status {
        200..=299 => Ok(response),
        401 => Err(CrmError::Unauthorized { reason: response.summary() }),
        _ => Err(status_error(&response)),
    }
}

/// 429 and 5xx are worth another try; 403 means the account or address is
/// blocked, where more requests only make it worse.
fn status_error(response: &RawResponse) -> CrmError {
    let transient = response.status == 429 || response.status >= 500;
    CrmError::Status { status: response.status, reason: response.summary(), transient }
}

/// An `expires_in` is believed between a second and ten years; AmoCRM sends
/// 86400 (as a number, though proxies have been seen to send a string).
const SANE_LIFETIME_SECS: std::ops::RangeInclusive<f64> = 1.0..=(10.0 * 365.0 * 86_400.0);

/// When a token pair answered at `now` expires: `expires_in` read as an
/// integer, a float or a string; when absent or absurd, the access token's
/// JWT `exp`; else 24 hours. A 200 that carries tokens is never refused for
/// its `expires_in`: by then the CRM has rotated the refresh token.
pub fn token_expiry(expires_in: Option<&serde_json::Value>, access: &str, now: DateTime<Utc>) -> DateTime<Utc> {
    let seconds = match expires_in {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let from_expires_in = seconds
        .filter(|s| SANE_LIFETIME_SECS.contains(s))
        .and_then(|s| chrono::Duration::try_milliseconds((s * 1000.0) as i64))
        .and_then(|d| now.checked_add_signed(d));
    let from_jwt = || jwt_expiry(access).filter(|exp| *exp > now);
    let expiry = from_expires_in.or_else(from_jwt).unwrap_or_else(|| now + chrono::Duration::hours(24));
    expiry.min(latest_time())
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PipelinesPage {
    #[serde(rename = "_embedded")]
    embedded: PipelinesEmbedded,
    #[serde(rename = "_links")]
    links: Option<Links>,
}

impl PipelinesPage {
    /// The page's pipelines and the next page's address.
    fn into_pipelines(self) -> (Vec<Pipeline>, Option<String>) {
        (self.embedded.pipelines, self.links.and_then(|l| l.next).map(|n| n.href))
    }
}

#[derive(Deserialize)]
struct PipelinesEmbedded {
    pipelines: Vec<Pipeline>,
}

#[derive(Deserialize)]
struct Pipeline {
    id: i64,
    name: String,
    #[serde(default)]
    is_main: bool,
    #[serde(rename = "_embedded")]
    embedded: StatusesEmbedded,
}

#[derive(Deserialize)]
struct StatusesEmbedded {
    statuses: Vec<Status>,
}

#[derive(Deserialize)]
struct Status {
    id: i64,
    name: String,
    #[serde(default)]
    sort: i32,
    #[serde(rename = "type", default)]
    status_type: i32,
}

#[derive(Deserialize)]
struct Links {
    next: Option<Link>,
}

#[derive(Deserialize)]
struct Link {
    href: String,
}

#[derive(Deserialize)]
struct LeadsCreated {
    #[serde(rename = "_embedded")]
    embedded: LeadsEmbedded,
}

#[derive(Deserialize)]
struct LeadsEmbedded {
    leads: Vec<CreatedLead>,
}

#[derive(Deserialize)]
struct CreatedLead {
    id: i64,
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn expires_in_is_read_leniently_and_never_overflows() {
        let now = Utc.with_ymd_and_hms(2026, 12, 3, 12, 0, 0).single().unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let exp = now + chrono::Duration::hours(30);
        let jwt = format!("{}.{}.sig", b64("{}"), b64(&format!(r#"{{"exp":{}}}"#, exp.timestamp())));
        let day = now + chrono::Duration::seconds(86_400);
        let table: [(serde_json::Value, &str, DateTime<Utc>); 12] = [
            (json!(86_400), "opaque", day),
            (json!(86_400.0), "opaque", day),
            (json!("86400"), "opaque", day),
            (json!(" 86400 "), "opaque", day),
            (json!(0), &jwt, exp),
            (json!(-5), &jwt, exp),
            (json!(1e300), &jwt, exp),
            (json!(i64::MAX), &jwt, exp),
            (json!("soon"), &jwt, exp),
            (json!(null), &jwt, exp),
            (json!(-5), "opaque", now + chrono::Duration::hours(24)),
            (json!(u64::MAX), "opaque", now + chrono::Duration::hours(24)),
        ];
        for (expires_in, access, expected) in table {
            assert_eq!(token_expiry(Some(&expires_in), access, now), expected, "expires_in {expires_in}, {access}");
        }
        assert_eq!(token_expiry(None, &jwt, now), exp);
        let far = format!("{}.{}.sig", b64("{}"), b64(r#"{"exp":9223372036854775807}"#));
        assert_eq!(token_expiry(None, &far, now), latest_time());
        // An expired JWT says nothing about the new pair's lifetime.
        let past = format!("{}.{}.sig", b64("{}"), b64(r#"{"exp":1}"#));
        assert_eq!(token_expiry(None, &past, now), now + chrono::Duration::hours(24));
    }
}
