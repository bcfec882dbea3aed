//! `batch`: up to 50 commands in one request, each answering on its own
//! (results, errors, pagination, time blocks; empty maps sent as `[]`), and
//! the `method?query` commands it carries.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::errors::{api_error, pause_length};
use super::stages::list_rows;
use super::{B24Client, Grant, Page, lenient_i64};
use crate::crm::CrmError;
use crate::crm::http::retrying;

impl B24Client<'_> {
    /// Runs up to [`super::BATCH_LIMIT`] commands (`key`, `method?query`) in one
    /// request. A failed command fails the batch (retried as a whole when
    /// the failure is transient).
    pub(super) async fn batch(&self, commands: &[(String, String)]) -> Result<BatchAnswer, CrmError> {
        self.batch_with_optional(commands, &[]).await
    }

    /// The same, where a command keyed in `optional` may fail without
    /// failing the batch: its answer is missing (its out-of-budget error
    /// still pauses the method).
    pub(super) async fn batch_with_optional(
        &self,
        commands: &[(String, String)],
        optional: &[String],
    ) -> Result<BatchAnswer, CrmError> {
        let cmd: serde_json::Map<String, Value> =
            commands.iter().map(|(key, command)| (key.clone(), Value::String(command.clone()))).collect();
        let params = json!({ "halt": 0, "cmd": cmd });
        retrying(self.retry, || async {
            let envelope = self.call_once("batch", &params).await?;
            let answer = BatchAnswer::parse(envelope.result, envelope.date);
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
            failed.retain(|(key, _)| !optional.contains(key));
            if failed.is_empty() {
                return Ok(answer);
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
}

impl B24Client<'_> {
    /// One `batch` request, not retried, with `halt` as given: each
    /// command's own result or error, for callers that must read a partial
    /// answer (a create whose first command ran).
    pub(super) async fn batch_once(&self, commands: &[(String, String)], halt: bool) -> Result<BatchAnswer, CrmError> {
        let cmd: serde_json::Map<String, Value> =
            commands.iter().map(|(key, command)| (key.clone(), Value::String(command.clone()))).collect();
        let params = json!({ "halt": u8::from(halt), "cmd": cmd });
        let envelope = self.call_once("batch", &params).await?;
        Ok(BatchAnswer::parse(envelope.result, envelope.date))
    }
}

/// A `batch` answer; empty maps arrive as `[]`.
#[derive(Debug, Default)]
pub(super) struct BatchAnswer {
    results: HashMap<String, Value>,
    errors: HashMap<String, (String, String)>,
    next: HashMap<String, i64>,
    total: HashMap<String, i64>,
    /// Each command's `time` block.
    times: HashMap<String, Value>,
    /// The portal's clock when it answered (the `Date` header).
    pub(super) date: Option<chrono::DateTime<chrono::Utc>>,
}

impl BatchAnswer {
    fn parse(result: Value, date: Option<chrono::DateTime<chrono::Utc>>) -> BatchAnswer {
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
            date,
        }
    }

    /// The first page a list command answered. A command with neither a
    /// result nor an error was not answered: nothing can be taken from it.
    pub(super) fn page(&self, key: &str, what: &str) -> Result<Page, CrmError> {
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

    /// A command's result, if it ran and succeeded.
    pub(super) fn result(&self, key: &str) -> Option<&Value> {
        self.results.get(key)
    }

    /// A command's error (code, description), if it ran and failed.
    pub(super) fn error(&self, key: &str) -> Option<(&str, &str)> {
        self.errors.get(key).map(|(code, description)| (code.as_str(), description.as_str()))
    }

    pub(super) fn grant(&self) -> Grant {
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

pub(super) fn status_list_command(entity: &str, start: Option<i64>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("filter[ENTITY_ID]", entity);
    if let Some(start) = start {
        query.append_pair("start", &start.to_string());
    }
    format!("crm.status.list?{}", query.finish())
}

/// `method?a=b` → the method and its parameters as JSON.
pub(super) fn split_command(command: &str) -> (String, Value) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_read_empty_maps_sent_as_arrays() {
        let answer = BatchAnswer::parse(
            json!({
                "result": { "scope": ["crm", "task"], "profile": { "ID": "1" } },
                "result_error": [], "result_total": [], "result_next": [], "result_time": []
            }),
            None,
        );
        assert!(answer.errors.is_empty() && answer.next.is_empty());
        assert_eq!(answer.grant(), Grant { scopes: vec!["crm".into(), "task".into()], profile_id: Some("1".into()) });
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
