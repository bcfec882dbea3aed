//! The Bitrix24 REST client over an inbound webhook: JSON POST, the `time`
//! envelope, pagination, `batch` (≤ 50 commands, per-command errors), errors
//! classified by their code rather than the HTTP status, a renamed portal's
//! redirect followed by re-sending the same POST, and every pipeline with its
//! stages in two round trips. A list is whole or an error: never the part
//! that was read. The webhook code is never printed.

mod batch;
mod errors;
mod leads;
mod stage_history;
mod stages;

use std::sync::Mutex;

use chrono::{DateTime, Utc};

use errors::{api_error, pause_length};
pub use leads::B24LeadTarget;
use serde_json::{Value, json};
pub use stage_history::{HistoryAnswer, HistoryBatch, HistoryQuery, ITEMS_PER_COMMAND};

use super::http::{RawResponse, RetryPolicy, retrying};
use super::{CrmError, Http};
use crate::model::Webhook;

/// The most commands one `batch` takes.
pub const BATCH_LIMIT: usize = 50;
/// Pages of a list (of 50 rows) and redirects followed stop here.
const MAX_PAGES: usize = 200;
const MAX_REDIRECTS: usize = 3;

/// What `scope` and `profile` say about the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub scopes: Vec<String>,
    pub profile_id: Option<String>,
}

/// A deal category (pipeline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Category {
    pub id: i32,
    pub name: String,
}

/// One answer: `result`, for lists `next` and `total`, the `time` block,
/// and the portal's clock (its `Date` header).
#[derive(Debug)]
struct Envelope {
    result: Value,
    next: Option<i64>,
    total: Option<i64>,
    time: Option<Value>,
    date: Option<DateTime<Utc>>,
}

/// One page of a list as answered, before the rest is read.
#[derive(Debug)]
struct Page {
    rows: Vec<Value>,
    next: Option<i64>,
    total: Option<i64>,
}

pub struct B24Client<'h> {
    http: &'h Http,
    webhook: Mutex<Webhook>,
    /// Set when the portal answered with a redirect to a new host.
    moved_to: Mutex<Option<String>>,
    retry: RetryPolicy,
}

impl<'h> B24Client<'h> {
    pub fn new(http: &'h Http, webhook: &Webhook) -> B24Client<'h> {
        B24Client {
            http,
            webhook: Mutex::new(webhook.clone()),
            moved_to: Mutex::new(None),
            retry: RetryPolicy::default(),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The portal's new host, if it redirected this client there.
    pub fn moved_to(&self) -> Option<String> {
        self.moved_to.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn webhook(&self) -> Webhook {
        self.webhook.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls one method, retrying transient failures within the deadline.
    async fn call(&self, method: &str, params: &Value) -> Result<Envelope, CrmError> {
        retrying(self.retry, || self.call_once(method, params)).await
    }

    async fn call_once(&self, method: &str, params: &Value) -> Result<Envelope, CrmError> {
        for _ in 0..=MAX_REDIRECTS {
            let webhook = self.webhook();
            let url = webhook.method_url(method);
            let request = self.http.client().post(url.expose()).json(params);
            let response = self.http.send_bitrix24(webhook.host(), method, request).await?;
            if matches!(response.status, 301 | 302 | 303 | 307 | 308) {
                self.follow(&webhook, &response)?;
                continue;
            }
            return self.envelope(&webhook, method, &response);
        }
        Err(CrmError::Malformed(format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// A renamed portal redirects to its new address: the same webhook on
    /// another host. Anything else is refused rather than sent the code.
    fn follow(&self, webhook: &Webhook, response: &RawResponse) -> Result<(), CrmError> {
        let refused =
            || CrmError::Malformed(format!("HTTP {} to an address that is not this webhook's", response.status));
        let location = response.location.as_deref().ok_or_else(refused)?;
        let current = url::Url::parse(webhook.method_url("").expose()).map_err(|_| refused())?;
        let target = current.join(location).map_err(|_| refused())?;
        let segments: Vec<&str> = target.path_segments().map(|s| s.collect()).unwrap_or_default();
        let [_, user, code, ..] = segments.as_slice() else {
            return Err(refused());
        };
        let port = target.port().map(|p| format!(":{p}")).unwrap_or_default();
        let base = format!("{}://{}{port}/rest/{user}/{code}/", target.scheme(), target.host_str().unwrap_or_default());
        let moved = Webhook::parse(&base).map_err(|_| refused())?;
        if moved.user_id() != webhook.user_id() || moved.code() != webhook.code() {
            return Err(refused());
        }
        tracing::warn!(from = webhook.host(), to = moved.host(), "the Bitrix24 portal moved; update webhook_url");
        *self.moved_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(moved.host().to_string());
        *self.webhook.lock().unwrap_or_else(|p| p.into_inner()) = moved;
        Ok(())
    }

    fn envelope(&self, webhook: &Webhook, method: &str, response: &RawResponse) -> Result<Envelope, CrmError> {
        let parsed = serde_json::from_slice::<Value>(&response.body);
        if let (Err(e), true) = (&parsed, response.is_success()) {
            return Err(CrmError::Malformed(format!(
                "`{method}` answered with a body that is not JSON ({e}): {}",
                response.summary()
            )));
        }
        let body = parsed.ok();
        if let Some(error) = body.as_ref().and_then(|b| b.get("error")) {
            let code = error.as_str().unwrap_or_default().to_string();
            let description = body.as_ref().and_then(|b| b.get("error_description")).and_then(Value::as_str);
            if code == "OPERATION_TIME_LIMIT" {
                let wait = pause_length(body.as_ref().and_then(|b| b.get("time")), None);
                self.http.pause_bitrix24_method(webhook.host(), method, wait);
            }
            return Err(api_error(code, description.unwrap_or_default(), response.status));
        }
        match body {
            Some(mut body) if response.is_success() && body.get("result").is_some() => {
                let next = body.get("next").and_then(lenient_i64);
                let total = body.get("total").and_then(lenient_i64);
                let time = body.get("time").cloned();
                Ok(Envelope { result: body["result"].take(), next, total, time, date: response.date })
            }
            _ if !response.is_success() => Err(CrmError::Status {
                status: response.status,
                reason: response.summary(),
                transient: response.status == 429 || response.status >= 500,
            }),
            _ => Err(CrmError::Malformed(format!("`{method}` answered without a `result`: {}", response.summary()))),
        }
    }

    /// `scope` and `profile`: what the webhook may do and who it is.
    pub async fn grant(&self) -> Result<Grant, CrmError> {
        let commands = [("scope".to_string(), "scope".to_string()), ("profile".to_string(), "profile".to_string())];
        let answer = self.batch(&commands).await?;
        Ok(answer.grant())
    }

    /// Creates a deal (`crm.deal.add`) and returns its id. Not retried: a
    /// lost answer must not create a second deal.
    pub async fn add_deal(&self, title: &str, category_id: i64) -> Result<i64, CrmError> {
        let params = json!({
            "fields": { "TITLE": title, "CATEGORY_ID": category_id },
            "params": { "REGISTER_SONET_EVENT": "N" },
        });
        let envelope = self.call_once("crm.deal.add", &params).await?;
        lenient_i64(&envelope.result).ok_or_else(|| CrmError::Malformed("crm.deal.add answered no id".into()))
    }

    /// Creates a lead (`crm.lead.add`) and returns its id.
    pub async fn add_lead(&self, title: &str) -> Result<i64, CrmError> {
        let params = json!({ "fields": { "TITLE": title }, "params": { "REGISTER_SONET_EVENT": "N" } });
        let envelope = self.call_once("crm.lead.add", &params).await?;
        lenient_i64(&envelope.result).ok_or_else(|| CrmError::Malformed("crm.lead.add answered no id".into()))
    }
}

fn lenient_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn lenient_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
