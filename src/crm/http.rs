//! The HTTP layer both CRM clients share: one reqwest client, per-account
//! rate limiters, transient-failure retries with backoff and jitter within a
//! deadline, response bodies read up to a bound, and error bodies summarised
//! whether they are JSON, HTML or empty. URLs are never part of an error:
//! a Bitrix24 URL holds the webhook code.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::CrmError;
use crate::metrics::{Metrics, RateLimit};
use crate::model::Crm;

/// Bodies past this are refused: no CRM answer we read comes near it.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// What a request brought back.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: String,
    /// The `Location` header of a redirect.
    pub location: Option<String>,
    /// The `Date` header: the server's clock when it answered (whole seconds).
    pub date: Option<DateTime<Utc>>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, CrmError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            CrmError::Malformed(format!("HTTP {} with a body that is not the expected JSON: {e}", self.status))
        })
    }

    /// A short, secret-free description of the body, for error messages.
    pub fn summary(&self) -> String {
        summarize_body(&self.content_type, &self.body)
    }
}

/// One shared client and the rate limiters, for the whole process.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    amocrm: Arc<DefaultKeyedRateLimiter<String>>,
    bitrix24: Arc<DefaultKeyedRateLimiter<String>>,
    /// Bitrix24 methods out of time budget, by portal and method, until when.
    paused: Arc<Mutex<HashMap<(String, String), Instant>>>,
    /// Every request sent is counted here, by CRM and answered status.
    metrics: Arc<Metrics>,
}

/// How long one call may keep retrying before it reports its last error.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub deadline: Duration,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(120),
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl Http {
    pub fn new(metrics: Arc<Metrics>) -> Http {
        Http::with_timeout(metrics, Duration::from_secs(30))
    }

    /// With `timeout` for a whole request, body included: a slow-drip answer
    /// fails then, like any other transient failure.
    pub fn with_timeout(metrics: Arc<Metrics>, timeout: Duration) -> Http {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            // Redirects are the CRM modules' decision: a renamed Bitrix24
            // portal must get the same POST again, not a GET.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("crm-connect/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a client with static settings builds");
        // AmoCRM allows 7 requests in any second per account. A burst of 3
        // then one every 334 ms puts at most 3 + 2 = 5 requests in any
        // second, leaving room for the network bunching arrivals together,
        // while the 3 requests of a reconcile go out at once.
        let amocrm_quota = Quota::with_period(Duration::from_millis(334))
            .expect("non-zero period")
            .allow_burst(NonZeroU32::new(3).expect("3 > 0"));
        // A Bitrix24 portal drains 2 requests/s from a bucket of 50, shared
        // by every application on the portal: stay at 2/s with a burst well
        // under the bucket, so others keep room too.
        let bitrix24_quota =
            Quota::per_second(NonZeroU32::new(2).expect("2 > 0")).allow_burst(NonZeroU32::new(10).expect("10 > 0"));
        Http {
            client,
            amocrm: Arc::new(DefaultKeyedRateLimiter::keyed(amocrm_quota)),
            bitrix24: Arc::new(DefaultKeyedRateLimiter::keyed(bitrix24_quota)),
            paused: Arc::default(),
            metrics,
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Waits until the portal's method is out of its pause and the portal's
    /// bucket has room, then sends.
    pub async fn send_bitrix24(
        &self,
        portal: &str,
        method: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<RawResponse, CrmError> {
        let key = (portal.to_string(), method.to_string());
        let until = self.paused.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
        if let Some(until) = until.filter(|until| *until > Instant::now()) {
            let started = Instant::now();
            tokio::time::sleep_until(until.into()).await;
            self.metrics.rate_limit_wait(Crm::Bitrix24, RateLimit::MethodPause, started.elapsed());
        }
        self.within_quota(&self.bitrix24, &key.0, Crm::Bitrix24).await;
        let response = send(request).await;
        self.metrics.crm_request(Crm::Bitrix24, response.as_ref().ok().map(|r| r.status));
        response
    }

    /// Pauses a Bitrix24 method of a portal (`OPERATION_TIME_LIMIT`).
    pub fn pause_bitrix24_method(&self, portal: &str, method: &str, for_: Duration) {
        let until = Instant::now() + for_;
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).insert((portal.into(), method.into()), until);
    }

    /// Waits for the AmoCRM account's budget, then sends.
    pub async fn send_amocrm(&self, account: &str, request: reqwest::RequestBuilder) -> Result<RawResponse, CrmError> {
        self.within_quota(&self.amocrm, &account.to_string(), Crm::AmoCrm).await;
        let response = send(request).await;
        self.metrics.crm_request(Crm::AmoCrm, response.as_ref().ok().map(|r| r.status));
        response
    }

    /// Takes a place in the account's budget, waiting for one if need be
    /// (the wait counted).
    async fn within_quota(&self, limiter: &DefaultKeyedRateLimiter<String>, key: &String, crm: Crm) {
        if limiter.check_key(key).is_ok() {
            return;
        }
        let started = Instant::now();
        limiter.until_key_ready(key).await;
        self.metrics.rate_limit_wait(crm, RateLimit::Quota, started.elapsed());
    }
}

/// Counts into a registry of its own, which nothing serves.
impl Default for Http {
    fn default() -> Self {
        Http::new(Arc::default())
    }
}

/// Sends one request and reads the body, bounded.
async fn send(request: reqwest::RequestBuilder) -> Result<RawResponse, CrmError> {
    let mut response = request.send().await.map_err(network_error)?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(String::from);
    let date = response.headers().get(reqwest::header::DATE).and_then(|v| v.to_str().ok()).and_then(http_date);
    if response.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(CrmError::TooLarge { limit: MAX_BODY_BYTES });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(CrmError::TooLarge { limit: MAX_BODY_BYTES });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(RawResponse { status, content_type, location, date, body })
}

/// A `Date` header (`Tue, 15 Nov 1994 08:12:31 GMT`); `None` for anything
/// unreadable: a server's clock is a hint, never a reason to fail.
pub fn http_date(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(value.trim()).ok().map(|d| d.with_timezone(&Utc))
}

fn network_error(e: reqwest::Error) -> CrmError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "the response broke off"
    } else {
        "request failed"
    };
    // Only the innermost cause: reqwest's own Display would name the URL.
    let mut cause: &dyn std::error::Error = &e.without_url();
    while let Some(next) = cause.source() {
        cause = next;
    }
    CrmError::Network(format!("{kind}: {cause}"))
}

/// Runs `attempt` until it succeeds, fails for good, or `policy.deadline`
/// passes; transient failures wait with exponential backoff and jitter.
pub async fn retrying<T, F, Fut>(policy: RetryPolicy, mut attempt: F) -> Result<T, CrmError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CrmError>>,
{
    let started = Instant::now();
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        match attempt().await {
            Err(e) if e.is_transient() => {
                let delay = delays.next().unwrap_or(policy.max_delay);
                if started.elapsed() + delay > policy.deadline {
                    return Err(e);
                }
                tracing::debug!(error = %e, ?delay, "transient CRM failure, retrying");
                tokio::time::sleep(delay).await;
            }
            outcome => return outcome,
        }
    }
}

/// A one-line, secret-free summary of an error body.
pub fn summarize_body(content_type: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "empty body".into();
    }
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(text) {
        let field = |k: &str| json.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty());
        let parts: Vec<&str> =
            ["title", "hint", "detail", "error", "error_description"].iter().filter_map(|k| field(k)).collect();
        if !parts.is_empty() {
            return clip(&parts.join(": "));
        }
        return clip(text);
    }
    if content_type.contains("html") || text.starts_with('<') {
        let title = between(text, "<title>", "</title>").or_else(|| between(text, "<h1>", "</h1>"));
        return match title {
            Some(t) => format!("HTML page: {}", clip(t.trim())),
            None => format!("HTML page: {}", clip(&strip_tags(text))),
        };
    }
    clip(text)
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let lower = text.to_ascii_lowercase();
    let start = lower.find(open)? + open.len();
    let end = start + lower[start..].find(close)?;
    text.get(start..end)
}

fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                out.push(' ');
            }
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn clip(text: &str) -> String {
    let one_line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match one_line.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::{http_date, summarize_body};

    #[test]
    fn a_date_header_is_the_servers_clock_and_anything_else_is_none() {
        let date = http_date("Thu, 03 Dec 2026 15:59:01 GMT").map(|d| d.to_rfc3339());
        assert_eq!(date.as_deref(), Some("2026-12-03T15:59:01+00:00"));
        let offset = http_date(" Thu, 03 Dec 2026 18:59:01 +0300 ").map(|d| d.to_rfc3339());
        assert_eq!(offset.as_deref(), Some("2026-12-03T15:59:01+00:00"));
        for bad in ["", "yesterday", "2026-12-03T15:59:01Z", "Thu, 32 Dec 2026 15:59:01 GMT"] {
            assert_eq!(http_date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn error_bodies_are_summarised_whatever_their_shape() {
        let problem = r#"{"hint":"Token has been revoked","title":"Некорректный запрос","status":401}"#;
        assert_eq!(
            summarize_body("application/problem+json", problem.as_bytes()),
            "Некорректный запрос: Token has been revoked"
        );
        let bitrix = r#"{"error":"QUERY_LIMIT_EXCEEDED","error_description":"Too many requests"}"#;
        assert_eq!(summarize_body("application/json", bitrix.as_bytes()), "QUERY_LIMIT_EXCEEDED: Too many requests");
        let html = "<html><head><title>403 Forbidden</title></head><body>Доступ запрещён</body></html>";
        assert_eq!(summarize_body("text/html", html.as_bytes()), "HTML page: 403 Forbidden");
        assert_eq!(summarize_body("text/html", b"<html><body><p>Blocked</p></body></html>"), "HTML page: Blocked");
        assert_eq!(summarize_body("", b"  "), "empty body");
        assert_eq!(summarize_body("text/plain", "x".repeat(500).as_bytes()).chars().count(), 161);
    }
}
