//! The Bitrix24 REST client over an inbound webhook: JSON POST, the `time`
//! envelope, pagination, `batch` (≤ 50 commands, per-command errors), errors
//! classified by their code rather than the HTTP status, a renamed portal's
//! redirect followed by re-sending the same POST, and every pipeline with its
//! stages in two round trips. A list is whole or an error: never the part
//! that was read. The webhook code is never printed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{RawResponse, RetryPolicy, retrying};
use super::{CrmError, Http};
use crate::model::{B24Stage, EntityType, Semantics, Webhook};

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

/// One answer: `result`, for lists `next` and `total`, and the `time` block.
#[derive(Debug)]
struct Envelope {
    result: Value,
    next: Option<i64>,
    total: Option<i64>,
    time: Option<Value>,
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
                Ok(Envelope { result: body["result"].take(), next, total, time })
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
            let mut failed: Vec<(&String, &(String, String))> = answer.errors.iter().collect();
            if failed.is_empty() {
                return Ok(answer);
            }
            // A command out of budget pauses the batch that carries it, until
            // the latest reset any of them was told.
            let waits = failed
                .iter()
                .filter(|(_, (code, _))| code == "OPERATION_TIME_LIMIT")
                .map(|(key, _)| pause_length(answer.times.get(*key), envelope.time.as_ref()));
            if let Some(wait) = waits.max() {
                self.http.pause_bitrix24_method(self.webhook().host(), "batch", wait);
            }
            // A refusal is the batch's answer even when another command was
            // only out of budget: retrying cannot change it.
            failed.sort_by_key(|(key, (code, description))| {
                (api_error(code.clone(), description, 200).is_transient(), key.as_str())
            });
            let (key, (code, description)) = failed[0];
            let method = commands.iter().find(|(k, _)| k == key).map(|(_, c)| command_method(c)).unwrap_or_default();
            Err(match api_error(code.clone(), description, 200) {
                CrmError::Api { code, description, transient } => CrmError::Api {
                    code,
                    description: format!("{description} (batch command {key}: {method})"),
                    transient,
                },
                other => other,
            })
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
    ///
    /// A list that could not be read whole is an error (`ACCESS_DENIED`, a
    /// page cap, a page that came back empty where more were promised, a
    /// category or the default category missing its stages), never the part
    /// that was read. The one answer without stages is a webhook lacking
    /// the `crm` scope: then nothing could be read, and the grant says so —
    /// the caller refuses the webhook on it before writing anything.
    pub async fn stages(
        &self,
        entity: EntityType,
        with_grant: bool,
    ) -> Result<(Option<Grant>, Vec<B24Stage>), CrmError> {
        let (first, what) = match entity {
            EntityType::Deal => ("crm.category.list?entityTypeId=2".to_string(), "crm.category.list".to_string()),
            EntityType::Lead => (status_list_command("STATUS", None), "crm.status.list (STATUS)".to_string()),
        };
        let (grant, page) = if with_grant {
            let commands = [
                ("scope".to_string(), "scope".to_string()),
                ("profile".to_string(), "profile".to_string()),
                ("list".to_string(), first.clone()),
            ];
            let answer = match self.batch(&commands).await {
                // Without the `crm` scope the list command fails; the grant
                // says why. With it, the failure stands: a refused list is
                // an error, not an empty one.
                Err(e @ CrmError::Api { .. }) if e.api_code().is_some_and(is_scope_error) => {
                    let grant = self.grant().await?;
                    if has_crm_scope(&grant) {
                        return Err(e);
                    }
                    return Ok((Some(grant), Vec::new()));
                }
                other => other?,
            };
            let grant = answer.grant();
            if !has_crm_scope(&grant) {
                return Ok((Some(grant), Vec::new()));
            }
            let page = answer.page("list", &what)?;
            (Some(grant), page)
        } else {
            let (method, params) = split_command(&first);
            let envelope = self.call(&method, &params).await?;
            (None, Page { rows: list_rows(&envelope.result, &what)?, next: envelope.next, total: envelope.total })
        };
        let stages = match entity {
            EntityType::Lead => {
                let filter = json!({ "filter": { "ENTITY_ID": "STATUS" } });
                let rows = self.whole_list(&what, "crm.status.list", &filter, page).await?;
                // NEW, CONVERTED and JUNK cannot be deleted.
                if rows.is_empty() {
                    return Err(CrmError::Incomplete(format!(
                        "{what} lists no lead status, though every portal has NEW, CONVERTED and JUNK"
                    )));
                }
                parse_stages(&rows, &what, EntityType::Lead, 0, "")?
            }
            EntityType::Deal => {
                let rows = self.whole_list(&what, "crm.category.list", &json!({ "entityTypeId": 2 }), page).await?;
                let categories = parse_categories(&rows)?;
                // crm.category.list leaves out the categories the webhook's
                // user may not read. The default one cannot be deleted: a
                // list without it is such a filtered list (or a broken one).
                // A non-default category left out this way cannot be told
                // from a deleted one.
                if !categories.iter().any(|c| c.id == 0) {
                    return Err(CrmError::Incomplete(format!(
                        "{what} lacks the default category 0 (every portal has it; the list leaves out what \
                         the webhook's user may not read)"
                    )));
                }
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
                let entity = deal_stage_entity(category.id);
                let what = format!("crm.status.list ({entity})");
                let first = answer.page(&format!("c{}", category.id), &what)?;
                let filter = json!({ "filter": { "ENTITY_ID": entity } });
                let rows = self.whole_list(&what, "crm.status.list", &filter, first).await?;
                // Every category has its NEW, WON and LOSE stages, which
                // cannot be deleted.
                if rows.is_empty() {
                    return Err(CrmError::Incomplete(format!(
                        "{what} lists no stage of category {} ({}), though every category has NEW, WON and LOSE",
                        category.id, category.name
                    )));
                }
                stages.extend(parse_stages(&rows, &what, EntityType::Deal, category.id, &category.name)?);
            }
        }
        Ok(stages)
    }

    /// The rows of a list whose first page is `first`, reading the further
    /// pages `next` promises. A page that comes back empty where `next`
    /// promised more, fewer rows than the largest `total` any page counted,
    /// a `next` that does not move forward, or more than [`MAX_PAGES`]
    /// pages: the list is incomplete, an error.
    async fn whole_list(&self, what: &str, method: &str, params: &Value, first: Page) -> Result<Vec<Value>, CrmError> {
        let Page { mut rows, mut next, mut total } = first;
        if rows.is_empty() && next.is_some() {
            return Err(CrmError::Incomplete(format!("{what} answered an empty first page that promised more")));
        }
        let mut pages = 1;
        while let Some(start) = next {
            if pages == MAX_PAGES {
                return Err(CrmError::Incomplete(format!("{what} did not end within {MAX_PAGES} pages")));
            }
            let mut params = params.clone();
            params["start"] = json!(start);
            let envelope = self.call(method, &params).await?;
            pages += 1;
            let page = list_rows(&envelope.result, what)?;
            if page.is_empty() {
                return Err(CrmError::Incomplete(format!(
                    "{what} broke off: the page from {start}, promised by `next`, came back empty"
                )));
            }
            rows.extend(page);
            total = total.max(envelope.total);
            next = envelope.next;
            if let Some(after) = next.filter(|after| *after <= start) {
                return Err(CrmError::Incomplete(format!("{what}: `next` went from {start} back to {after}")));
            }
        }
        let read = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        if let Some(total) = total.filter(|total| read < *total) {
            return Err(CrmError::Incomplete(format!("{what} broke off: {read} of {total} rows")));
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
    total: HashMap<String, i64>,
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
        let numbers = |v: Option<&Value>| -> HashMap<String, i64> {
            map(v).into_iter().filter_map(|(k, v)| Some((k, lenient_i64(&v)?))).collect()
        };
        BatchAnswer {
            results: map(result.get("result")).into_iter().collect(),
            errors,
            next: numbers(result.get("result_next")),
            total: numbers(result.get("result_total")),
            times: map(result.get("result_time")).into_iter().collect(),
        }
    }

    /// The first page a list command answered. A command with neither a
    /// result nor an error was not answered: nothing can be taken from it.
    fn page(&self, key: &str, what: &str) -> Result<Page, CrmError> {
        let result = self
            .results
            .get(key)
            .ok_or_else(|| CrmError::Incomplete(format!("{what}: the batch answered nothing for command {key}")))?;
        Ok(Page {
            rows: list_rows(result, what)?,
            next: self.next.get(key).copied(),
            total: self.total.get(key).copied(),
        })
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
    // Older methods say it as a sentence, in `error` or with an empty code.
    let code = if is_access_denied(&code, description) { "ACCESS_DENIED".to_string() } else { code };
    let transient = matches!(code.as_str(), "QUERY_LIMIT_EXCEEDED" | "OPERATION_TIME_LIMIT" | "INTERNAL_SERVER_ERROR")
        || (code.is_empty() && status >= 500);
    let mut description = if description.is_empty() { format!("HTTP {status}") } else { description.to_string() };
    let hint = match code.as_str() {
        "NO_AUTH_FOUND" | "INVALID_CREDENTIALS" => Some("the webhook is wrong, deleted or disabled"),
        "insufficient_scope" => Some("the webhook lacks a scope it needs"),
        "ACCESS_DENIED" => Some(
            "the webhook's user lacks the CRM permission to read this, or REST is not available on the portal's plan",
        ),
        "OVERLOAD_LIMIT" => Some("the portal is blocked for overload; only Bitrix24 support can lift it"),
        "PORTAL_DELETED" => Some("the portal was deleted"),
        _ => None,
    };
    if let Some(hint) = hint {
        description = format!("{description} ({hint})");
    }
    CrmError::Api { code, description, transient }
}

/// `ACCESS_DENIED`, `access_denied`, or "Access denied." as the code or, with
/// an empty code, as the description.
fn is_access_denied(code: &str, description: &str) -> bool {
    let denied = |text: &str| {
        let words: String = text.chars().filter(|c| c.is_alphanumeric()).collect();
        words.eq_ignore_ascii_case("accessdenied")
    };
    denied(code) || (code.is_empty() && denied(description))
}

fn is_scope_error(code: &str) -> bool {
    code.eq_ignore_ascii_case("insufficient_scope")
}

fn has_crm_scope(grant: &Grant) -> bool {
    grant.scopes.iter().any(|s| s == "crm")
}

/// How long a method stays paused after `OPERATION_TIME_LIMIT`: until the
/// best `operating_reset_at` the answer carries — the command's own `time`
/// block, else the batch's outer one (real portals answer `result_time: []`
/// for a command out of budget) — measured on the portal's own clock; 10 s
/// when neither says.
fn pause_length(own: Option<&Value>, outer: Option<&Value>) -> Duration {
    let field = |time: Option<&Value>, key: &str| time.and_then(|t| t.get(key)).and_then(lenient_f64);
    let clock = |time: Option<&Value>| field(time, "finish").or_else(|| field(time, "start"));
    let reset = field(own, "operating_reset_at").or_else(|| field(outer, "operating_reset_at"));
    let now = clock(own).or_else(|| clock(outer));
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

/// The method of a batch command (`method?query`).
fn command_method(command: &str) -> &str {
    command.split_once('?').map_or(command, |(method, _)| method)
}

/// The rows of one list page: an array (`[]` when empty), or for
/// crm.category.list an object wrapping it in `categories`.
fn list_rows(result: &Value, what: &str) -> Result<Vec<Value>, CrmError> {
    match result {
        Value::Array(rows) => Ok(rows.clone()),
        Value::Object(o) => match o.get("categories") {
            Some(Value::Array(rows)) => Ok(rows.clone()),
            _ => Err(CrmError::Malformed(format!("{what} answered an object that is not a list"))),
        },
        _ => Err(CrmError::Malformed(format!("{what} answered something that is not a list"))),
    }
}

/// Categories by `id` (or the older `ID`); one without an id is malformed,
/// not skipped.
fn parse_categories(rows: &[Value]) -> Result<Vec<Category>, CrmError> {
    rows.iter()
        .map(|c| {
            let id = c.get("id").or_else(|| c.get("ID")).and_then(lenient_i64).and_then(|id| i32::try_from(id).ok());
            let name = c.get("name").or_else(|| c.get("NAME")).and_then(Value::as_str).unwrap_or_default();
            let id =
                id.ok_or_else(|| CrmError::Malformed("crm.category.list listed a category without an id".into()))?;
            Ok(Category { id, name: name.to_string() })
        })
        .collect()
}

/// Every row as a stage; a row without a `STATUS_ID` is malformed, not skipped.
fn parse_stages(
    rows: &[Value],
    what: &str,
    entity_type: EntityType,
    category_id: i32,
    category_name: &str,
) -> Result<Vec<B24Stage>, CrmError> {
    rows.iter()
        .map(|row| {
            parse_stage(row, entity_type, category_id, category_name)
                .ok_or_else(|| CrmError::Malformed(format!("{what} listed a row without a `STATUS_ID`")))
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
    fn a_pause_lasts_until_the_best_reset_time_the_answer_carries() {
        let time = |reset: Option<f64>| {
            let mut t = json!({ "start": 1000.0, "finish": 1000.5, "duration": 0.5 });
            if let Some(reset) = reset {
                t["operating_reset_at"] = json!(reset);
            }
            t
        };
        let secs = Duration::from_secs_f64;
        let table: [(Option<Value>, Option<Value>, Duration); 7] = [
            (Some(time(Some(1003.5))), Some(time(Some(1200.0))), secs(3.0)),
            (Some(json!([])), Some(time(Some(1002.5))), secs(2.0)),
            (None, Some(time(Some(1002.5))), secs(2.0)),
            (Some(time(None)), Some(time(Some(1004.5))), secs(4.0)),
            (None, Some(json!({ "operating_reset_at": "1001.5", "finish": "1000.5" })), secs(1.0)),
            (None, Some(time(None)), secs(10.0)),
            (None, Some(time(Some(999.0))), secs(10.0)),
        ];
        for (own, outer, expected) in table {
            assert_eq!(pause_length(own.as_ref(), outer.as_ref()), expected, "{own:?} / {outer:?}");
        }
        assert_eq!(pause_length(None, None), secs(10.0));
        assert_eq!(pause_length(None, Some(&time(Some(1e12)))), secs(600.0));
    }

    #[test]
    fn access_denied_is_recognised_in_every_spelling() {
        let code =
            |code: &str, description: &str| api_error(code.into(), description, 400).api_code().map(String::from);
        for (given, description) in
            [("ACCESS_DENIED", "Access denied."), ("access_denied", ""), ("Access denied.", ""), ("", "Access denied.")]
        {
            assert_eq!(code(given, description).as_deref(), Some("ACCESS_DENIED"), "{given:?} / {description:?}");
        }
        assert_eq!(code("", "Category not found").as_deref(), Some(""));
        assert!(!api_error("ACCESS_DENIED".into(), "", 403).is_transient());
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
