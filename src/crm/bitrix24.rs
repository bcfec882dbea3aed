//! The Bitrix24 REST client over an inbound webhook: JSON POST, the `time`
//! envelope, pagination, `batch` (≤ 50 commands, per-command errors), errors
//! classified by their code rather than the HTTP status, a renamed portal's
//! redirect followed by re-sending the same POST, and every pipeline with its
//! stages in two round trips. The webhook code is never printed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{RawResponse, RetryPolicy, retrying};
use super::{CrmError, Http};
use crate::model::{B24Stage, EntityType, Semantics, Webhook};

/// The most commands one `batch` takes.
pub const BATCH_LIMIT: usize = 50;
/// Pages of a list and redirects followed stop here.
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

/// One answer: `result` and, for lists, `next`.
#[derive(Debug)]
struct Envelope {
    result: Value,
    next: Option<i64>,
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
                let wait = pause_length(body.as_ref().and_then(|b| b.get("time")));
                self.http.pause_bitrix24_method(webhook.host(), method, wait);
            }
            return Err(api_error(code, description.unwrap_or_default(), response.status));
        }
        match body {
            Some(mut body) if response.is_success() && body.get("result").is_some() => {
                let next = body.get("next").and_then(lenient_i64);
                Ok(Envelope { result: body["result"].take(), next })
            }
            _ if !response.is_success() => Err(CrmError::Status {
                status: response.status,
                reason: response.summary(),
                transient: response.status == 429 || response.status >= 500,
            }),
            _ => Err(CrmError::Malformed(format!("`{method}` answered without a `result`: {}", response.summary()))),
        }
    }

    /// Runs up to [`BATCH_LIMIT`] commands (`key`, `method?query`) in one
    /// request. A failed command fails the batch (retried as a whole when
    /// the failure is transient).
    async fn batch(&self, commands: &[(String, String)]) -> Result<BatchAnswer, CrmError> {
        let cmd: serde_json::Map<String, Value> =
            commands.iter().map(|(key, command)| (key.clone(), Value::String(command.clone()))).collect();
        let params = json!({ "halt": 0, "cmd": cmd });
        retrying(self.retry, || async {
            let envelope = self.call_once("batch", &params).await?;
            let answer = BatchAnswer::parse(envelope.result);
            if let Some((key, (code, description))) = answer.errors.iter().next() {
                if code == "OPERATION_TIME_LIMIT" {
                    // A command out of budget pauses the batch that carries it.
                    let wait = pause_length(answer.times.get(key));
                    self.http.pause_bitrix24_method(self.webhook().host(), "batch", wait);
                }
                let e = api_error(code.clone(), description, 200);
                return Err(match e {
                    CrmError::Api { code, description, transient } => {
                        CrmError::Api { code, description: format!("{description} (batch command {key})"), transient }
                    }
                    other => other,
                });
            }
            Ok(answer)
        })
        .await
    }

    /// `scope` and `profile`: what the webhook may do and who it is.
    pub async fn grant(&self) -> Result<Grant, CrmError> {
        let commands = [("scope".to_string(), "scope".to_string()), ("profile".to_string(), "profile".to_string())];
        let answer = self.batch(&commands).await?;
        Ok(answer.grant())
    }

    /// Every stage of every deal category including the default one (0), or
    /// every lead status: two round trips for up to 50 categories (one for
    /// leads). With `grant`, `scope` and `profile` ride along in the first.
    pub async fn stages(
        &self,
        entity: EntityType,
        with_grant: bool,
    ) -> Result<(Option<Grant>, Vec<B24Stage>), CrmError> {
        let first = match entity {
            EntityType::Deal => "crm.category.list?entityTypeId=2".to_string(),
            EntityType::Lead => status_list_command("STATUS", None),
        };
        let (grant, result, next) = if with_grant {
            let commands = [
                ("scope".to_string(), "scope".to_string()),
                ("profile".to_string(), "profile".to_string()),
                ("list".to_string(), first.clone()),
            ];
            // The list command fails without the `crm` scope; the grant says why.
            let answer = match self.batch(&commands).await {
                Err(CrmError::Api { code, .. }) if is_scope_error(&code) => {
                    let grant = self.grant().await?;
                    return Ok((Some(grant), Vec::new()));
                }
                other => other?,
            };
            let grant = answer.grant();
            if !grant.scopes.iter().any(|s| s == "crm") {
                return Ok((Some(grant), Vec::new()));
            }
            let result = answer.results.get("list").cloned().unwrap_or(Value::Null);
            (Some(grant), result, answer.next.get("list").copied())
        } else {
            let (method, params) = split_command(&first);
            let envelope = self.call(&method, &params).await?;
            (None, envelope.result, envelope.next)
        };
        let stages = match entity {
            EntityType::Lead => {
                let mut rows = as_list(&result);
                rows.extend(
                    self.remaining_pages("crm.status.list", &json!({ "filter": { "ENTITY_ID": "STATUS" } }), next)
                        .await?,
                );
                rows.iter().filter_map(|row| parse_stage(row, EntityType::Lead, 0, "")).collect()
            }
            EntityType::Deal => {
                let mut categories = parse_categories(&result);
                let more = self.remaining_pages("crm.category.list", &json!({ "entityTypeId": 2 }), next).await?;
                categories.extend(more.iter().flat_map(|page| parse_categories(&json!({ "categories": [page] }))));
                self.deal_stages(&categories).await?
            }
        };
        Ok((grant, stages))
    }

    /// The stages of the given categories, one `batch` per 50 categories.
    async fn deal_stages(&self, categories: &[Category]) -> Result<Vec<B24Stage>, CrmError> {
        let mut stages = Vec::new();
        for chunk in categories.chunks(BATCH_LIMIT) {
            let commands: Vec<(String, String)> = chunk
                .iter()
                .map(|c| (format!("c{}", c.id), status_list_command(&deal_stage_entity(c.id), None)))
                .collect();
            let answer = self.batch(&commands).await?;
            for category in chunk {
                let key = format!("c{}", category.id);
                let mut rows = answer.results.get(&key).map(as_list).unwrap_or_default();
                let filter = json!({ "filter": { "ENTITY_ID": deal_stage_entity(category.id) } });
                rows.extend(self.remaining_pages("crm.status.list", &filter, answer.next.get(&key).copied()).await?);
                stages.extend(
                    rows.iter().filter_map(|row| parse_stage(row, EntityType::Deal, category.id, &category.name)),
                );
            }
        }
        Ok(stages)
    }

    /// Further pages of a list whose first page said `next`.
    async fn remaining_pages(
        &self,
        method: &str,
        params: &Value,
        mut next: Option<i64>,
    ) -> Result<Vec<Value>, CrmError> {
        let mut rows = Vec::new();
        for _ in 0..MAX_PAGES {
            let Some(start) = next else { break };
            let mut params = params.clone();
            params["start"] = json!(start);
            let envelope = self.call(method, &params).await?;
            match &envelope.result {
                // crm.category.list wraps its page in `categories`.
                Value::Object(o) if o.contains_key("categories") => rows.extend(as_list(&o["categories"])),
                other => rows.extend(as_list(other)),
            }
            next = envelope.next;
        }
        Ok(rows)
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

/// A `batch` answer; empty maps arrive as `[]`.
#[derive(Debug, Default)]
struct BatchAnswer {
    results: HashMap<String, Value>,
    errors: HashMap<String, (String, String)>,
    next: HashMap<String, i64>,
    /// Each command's `time` block.
    times: HashMap<String, Value>,
}

impl BatchAnswer {
    fn parse(result: Value) -> BatchAnswer {
        let map = |v: Option<&Value>| v.and_then(Value::as_object).cloned().unwrap_or_default();
        let errors = map(result.get("result_error"))
            .into_iter()
            .map(|(key, e)| {
                let code = e.get("error").and_then(Value::as_str).unwrap_or_default().to_string();
                let description = e.get("error_description").and_then(Value::as_str).unwrap_or_default().to_string();
                (key, (code, description))
            })
            .collect();
        let next =
            map(result.get("result_next")).into_iter().filter_map(|(k, v)| Some((k, lenient_i64(&v)?))).collect();
        BatchAnswer {
            results: map(result.get("result")).into_iter().collect(),
            errors,
            next,
            times: map(result.get("result_time")).into_iter().collect(),
        }
    }

    fn grant(&self) -> Grant {
        let scopes = self
            .results
            .get("scope")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
            .unwrap_or_default();
        let profile_id = self.results.get("profile").and_then(|p| p.get("ID")).and_then(|id| match id {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        Grant { scopes, profile_id }
    }
}

/// Errors by their code: only the rate limit, the time budget and server
/// failures are worth retrying.
fn api_error(code: String, description: &str, status: u16) -> CrmError {
    let transient = matches!(code.as_str(), "QUERY_LIMIT_EXCEEDED" | "OPERATION_TIME_LIMIT" | "INTERNAL_SERVER_ERROR")
        || (code.is_empty() && status >= 500);
    let mut description = if description.is_empty() { format!("HTTP {status}") } else { description.to_string() };
    let hint = match code.as_str() {
        "NO_AUTH_FOUND" | "INVALID_CREDENTIALS" => Some("the webhook is wrong, deleted or disabled"),
        "insufficient_scope" => Some("the webhook lacks a scope it needs"),
        "ACCESS_DENIED" => Some("REST is not available on the portal's plan"),
        "OVERLOAD_LIMIT" => Some("the portal is blocked for overload; only Bitrix24 support can lift it"),
        "PORTAL_DELETED" => Some("the portal was deleted"),
        _ => None,
    };
    if let Some(hint) = hint {
        description = format!("{description} ({hint})");
    }
    CrmError::Api { code, description, transient }
}

fn is_scope_error(code: &str) -> bool {
    code.eq_ignore_ascii_case("insufficient_scope") || code == "ACCESS_DENIED"
}

/// How long a method stays paused after `OPERATION_TIME_LIMIT`: until
/// `operating_reset_at`, measured on the portal's own clock.
fn pause_length(time: Option<&Value>) -> Duration {
    let reset = time.and_then(|t| t.get("operating_reset_at")).and_then(lenient_f64);
    let now = time.and_then(|t| t.get("finish").or_else(|| t.get("start"))).and_then(lenient_f64);
    match (reset, now) {
        (Some(reset), Some(now)) if reset > now => Duration::from_secs_f64((reset - now).min(600.0)),
        _ => Duration::from_secs(10),
    }
}

fn deal_stage_entity(category_id: i32) -> String {
    if category_id == 0 { "DEAL_STAGE".into() } else { format!("DEAL_STAGE_{category_id}") }
}

fn status_list_command(entity: &str, start: Option<i64>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("filter[ENTITY_ID]", entity);
    if let Some(start) = start {
        query.append_pair("start", &start.to_string());
    }
    format!("crm.status.list?{}", query.finish())
}

/// `method?a=b` → the method and its parameters as JSON.
fn split_command(command: &str) -> (String, Value) {
    let (method, query) = command.split_once('?').unwrap_or((command, ""));
    let mut params = json!({});
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.split_once('[') {
            Some((outer, inner)) => params[outer][inner.trim_end_matches(']')] = json!(value),
            None => params[key.as_ref()] = json!(value),
        }
    }
    (method.to_string(), params)
}

fn as_list(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

fn parse_categories(result: &Value) -> Vec<Category> {
    let list = result.get("categories").map(as_list).unwrap_or_else(|| as_list(result));
    list.iter()
        .filter_map(|c| {
            let id = c.get("id").or_else(|| c.get("ID")).and_then(lenient_i64)?;
            let name = c.get("name").or_else(|| c.get("NAME")).and_then(Value::as_str).unwrap_or_default();
            Some(Category { id: i32::try_from(id).ok()?, name: name.to_string() })
        })
        .collect()
}

/// A `crm.status.list` row; numbers may arrive as strings, fields as null.
fn parse_stage(row: &Value, entity_type: EntityType, category_id: i32, category_name: &str) -> Option<B24Stage> {
    let status_id = row.get("STATUS_ID")?.as_str()?.to_string();
    let semantics = row
        .get("EXTRA")
        .and_then(|e| e.get("SEMANTICS"))
        .and_then(Value::as_str)
        .map(|s| if s == "apology" { Semantics::Failure } else { Semantics::parse(s).unwrap_or(Semantics::Process) })
        .unwrap_or_else(|| match row.get("SEMANTICS").and_then(Value::as_str) {
            Some("S") => Semantics::Success,
            Some("F") => Semantics::Failure,
            _ => Semantics::Process,
        });
    Some(B24Stage {
        entity_type,
        category_id,
        category_name: category_name.to_string(),
        status_name: row.get("NAME").and_then(Value::as_str).unwrap_or_default().to_string(),
        status_sort: row.get("SORT").and_then(lenient_i64).and_then(|s| i32::try_from(s).ok()).unwrap_or_default(),
        status_id,
        semantics,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_read_empty_maps_sent_as_arrays() {
        let answer = BatchAnswer::parse(json!({
            "result": { "scope": ["crm", "task"], "profile": { "ID": "1" } },
            "result_error": [], "result_total": [], "result_next": [], "result_time": []
        }));
        assert!(answer.errors.is_empty() && answer.next.is_empty());
        assert_eq!(answer.grant(), Grant { scopes: vec!["crm".into(), "task".into()], profile_id: Some("1".into()) });
    }

    #[test]
    fn stage_rows_take_semantics_from_extra_and_apology_is_failure() {
        let row = |extra: Value, sem: Value| json!({ "STATUS_ID": "X", "NAME": "n", "SORT": "20", "SEMANTICS": sem, "EXTRA": extra });
        let semantics = |r: Value| parse_stage(&r, EntityType::Deal, 1, "c").unwrap().semantics;
        assert_eq!(semantics(row(json!({ "SEMANTICS": "apology" }), json!("F"))), Semantics::Failure);
        assert_eq!(semantics(row(json!({ "SEMANTICS": "success" }), Value::Null)), Semantics::Success);
        assert_eq!(semantics(row(Value::Null, json!("S"))), Semantics::Success);
        assert_eq!(semantics(row(Value::Null, Value::Null)), Semantics::Process);
        assert_eq!(parse_stage(&row(Value::Null, Value::Null), EntityType::Deal, 1, "c").unwrap().status_sort, 20);
    }

    #[test]
    fn commands_are_url_encoded_and_split_back() {
        let command = status_list_command("DEAL_STAGE_1", Some(50));
        assert_eq!(command, "crm.status.list?filter%5BENTITY_ID%5D=DEAL_STAGE_1&start=50");
        let (method, params) = split_command(&command);
        assert_eq!(method, "crm.status.list");
        assert_eq!(params, json!({ "filter": { "ENTITY_ID": "DEAL_STAGE_1" }, "start": "50" }));
    }
}
