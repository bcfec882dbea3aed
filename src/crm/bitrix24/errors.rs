//! Bitrix24 errors, read by their code rather than the HTTP status, and how
//! long a method out of its time budget stays paused.

use std::time::Duration;

use serde_json::Value;

use super::lenient_f64;
use crate::crm::CrmError;

/// Errors by their code: only the rate limit, the time budget and server
/// failures are worth retrying.
pub(super) fn api_error(code: String, description: &str, status: u16) -> CrmError {
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

/// How long a method stays paused after `OPERATION_TIME_LIMIT`: until the
/// best `operating_reset_at` the answer carries — the command's own `time`
/// block, else the batch's outer one (real portals answer `result_time: []`
/// for a command out of budget) — measured on the portal's own clock; 10 s
/// when neither says.
pub(super) fn pause_length(own: Option<&Value>, outer: Option<&Value>) -> Duration {
    let field = |time: Option<&Value>, key: &str| time.and_then(|t| t.get(key)).and_then(lenient_f64);
    let clock = |time: Option<&Value>| field(time, "finish").or_else(|| field(time, "start"));
    let reset = field(own, "operating_reset_at").or_else(|| field(outer, "operating_reset_at"));
    let now = clock(own).or_else(|| clock(outer));
    match (reset, now) {
        (Some(reset), Some(now)) if reset > now => Duration::from_secs_f64((reset - now).min(600.0)),
        _ => Duration::from_secs(10),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
}
