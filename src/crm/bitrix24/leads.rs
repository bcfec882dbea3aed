//! Bitrix24 lead delivery on the wire: `crm.lead.add`, or a deal with its
//! contact in one `batch` (`halt`, the deal naming `$result[c]`), every
//! entity stamped `ORIGINATOR_ID` / `ORIGIN_ID` with the delivery key so a
//! lookup finds it by a column filter; the lookup; the CRM mode. A create is
//! sent once, never retried here: its answer is classified ([`SendAnswer`]).

use serde_json::{Map, Value, json};

use super::{B24Client, lenient_i64};
use crate::crm::CrmError;
use crate::model::{CreatedIds, LookupAnswer, OutboxRow, SendAnswer};

/// Our name in `ORIGINATOR_ID`: the external system the entity came from.
pub const ORIGINATOR: &str = "crm-connect";
const UTM_FIELDS: [&str; 5] = ["UTM_SOURCE", "UTM_MEDIUM", "UTM_CAMPAIGN", "UTM_CONTENT", "UTM_TERM"];
/// Refusals about the portal or the webhook rather than the lead.
const ACCOUNT_CODES: [&str; 6] =
    ["NO_AUTH_FOUND", "INVALID_CREDENTIALS", "insufficient_scope", "ACCESS_DENIED", "OVERLOAD_LIMIT", "PORTAL_DELETED"];

/// Where the lead goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum B24LeadTarget {
    Lead { status_id: String, responsible_user_id: Option<i64> },
    Deal { category_id: i32, stage_id: String, responsible_user_id: Option<i64> },
}

/// A create's outcome: the contact that came back (kept whatever happens
/// to the deal) and the answer about the entity itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct B24Sent {
    pub contact_id: Option<i64>,
    pub answer: SendAnswer,
}

impl B24Client<'_> {
    /// 1 classic CRM (leads), 2 simple CRM (no leads).
    pub async fn crm_mode(&self) -> Result<i64, CrmError> {
        let envelope = self.call("crm.settings.mode.get", &json!({})).await?;
        lenient_i64(&envelope.result)
            .ok_or_else(|| CrmError::Malformed("crm.settings.mode.get answered no number".into()))
    }

    /// Sends one lead, or one deal (with a new contact in the same batch
    /// when it has contact data and no contact yet).
    pub async fn send_lead(&self, row: &OutboxRow, target: &B24LeadTarget) -> B24Sent {
        match target {
            B24LeadTarget::Lead { .. } => {
                let params = json!({ "fields": entity_fields(row, target), "params": { "REGISTER_SONET_EVENT": "Y" } });
                let answer = match self.call_once("crm.lead.add", &params).await {
                    Ok(envelope) => created(&envelope.result, None),
                    Err(e) => classify(e),
                };
                B24Sent { contact_id: None, answer }
            }
            B24LeadTarget::Deal { .. } if row.crm_contact_id.is_none() && row.has_contact() => {
                self.send_deal_with_contact(row, target).await
            }
            B24LeadTarget::Deal { .. } => {
                let mut fields = entity_fields(row, target);
                if let Some(contact) = row.crm_contact_id {
                    fields["CONTACT_IDS"] = json!([contact]);
                }
                let params = json!({ "fields": fields, "params": { "REGISTER_SONET_EVENT": "Y" } });
                let answer = match self.call_once("crm.deal.add", &params).await {
                    Ok(envelope) => created(&envelope.result, row.crm_contact_id),
                    Err(e) => classify(e),
                };
                B24Sent { contact_id: row.crm_contact_id, answer }
            }
        }
    }

    async fn send_deal_with_contact(&self, row: &OutboxRow, target: &B24LeadTarget) -> B24Sent {
        let params = [("params[REGISTER_SONET_EVENT]".to_string(), "Y".to_string())];
        let contact = command("crm.contact.add", &contact_fields(row), &params, None);
        let deal =
            command("crm.deal.add", &entity_fields(row, target), &params, Some("fields[CONTACT_IDS][0]=$result[c]"));
        let commands = [("c".to_string(), contact), ("d".to_string(), deal)];
        let answer = match self.batch_once(&commands, true).await {
            Ok(answer) => answer,
            Err(e) => return B24Sent { contact_id: None, answer: classify(e) },
        };
        if let Some((code, description)) = answer.error("c") {
            return B24Sent { contact_id: None, answer: classify_code(code, description, 200) };
        }
        let contact_id = answer.result("c").and_then(lenient_i64);
        let answer = match (answer.result("d"), answer.error("d")) {
            (_, Some((code, description))) => classify_code(code, description, 200),
            (Some(result), None) => created(result, contact_id),
            (None, None) => SendAnswer::Ambiguous("the batch answered nothing for the deal".into()),
        };
        B24Sent { contact_id, answer }
    }

    /// Finds the entity (and, for a deal, its contact) stamped with `key`.
    pub async fn find_lead(&self, key: &str, deal: bool) -> Result<LookupAnswer, CrmError> {
        let entity = if deal { "crm.deal.list" } else { "crm.lead.list" };
        let select: &[&str] = if deal { &["ID", "ORIGIN_ID", "CONTACT_ID"] } else { &["ID", "ORIGIN_ID"] };
        let mut commands = vec![("e".to_string(), list_command(entity, key, select))];
        if deal {
            commands.push(("c".to_string(), list_command("crm.contact.list", key, &["ID", "ORIGIN_ID"])));
        }
        let answer = self.batch(&commands).await?;
        let entities = matching(&answer.page("e", entity)?.rows, key, entity)?;
        let contacts = match deal {
            true => matching(&answer.page("c", "crm.contact.list")?.rows, key, "crm.contact.list")?,
            false => Vec::new(),
        };
        let lowest = |rows: &[Value]| rows.iter().filter_map(|r| r.get("ID").and_then(lenient_i64)).min();
        if entities.len() > 1 || contacts.len() > 1 {
            tracing::warn!(crm = "bitrix24", entity, "several entities carry one delivery key; the lowest id counts");
        }
        Ok(match (lowest(&entities), lowest(&contacts)) {
            (Some(id), contact) => {
                let own = entities
                    .iter()
                    .find(|r| r.get("ID").and_then(lenient_i64) == Some(id))
                    .and_then(|r| r.get("CONTACT_ID"))
                    .and_then(lenient_i64);
                LookupAnswer::Found(CreatedIds { entity_id: id, contact_id: own.or(contact) })
            }
            (None, Some(contact_id)) => LookupAnswer::ContactWithoutDeal { contact_id },
            (None, None) => LookupAnswer::Absent,
        })
    }
}

/// Rows whose `ORIGIN_ID` is exactly `key`; any other row means the filter
/// was not applied, and the list proves nothing.
fn matching(rows: &[Value], key: &str, what: &str) -> Result<Vec<Value>, CrmError> {
    if rows.iter().any(|r| r.get("ORIGIN_ID").and_then(Value::as_str) != Some(key)) {
        return Err(CrmError::Incomplete(format!("{what} listed an item of another key: the filter was not applied")));
    }
    Ok(rows.to_vec())
}

fn list_command(method: &str, key: &str, select: &[&str]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("filter[ORIGINATOR_ID]", ORIGINATOR).append_pair("filter[ORIGIN_ID]", key);
    query.append_pair("order[ID]", "ASC");
    for (i, field) in select.iter().enumerate() {
        query.append_pair(&format!("select[{i}]"), field);
    }
    format!("{method}?{}", query.finish())
}

/// A batch command: `method?fields[…]=…` in PHP bracket form; `raw` is
/// appended as written (`$result[c]` is substituted by the portal before it
/// parses the query, so it must not be encoded).
fn command(method: &str, fields: &Value, params: &[(String, String)], raw: Option<&str>) -> String {
    let mut pairs = Vec::new();
    php_pairs("fields", fields, &mut pairs);
    pairs.extend(params.iter().cloned());
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in &pairs {
        query.append_pair(key, value);
    }
    let mut command = format!("{method}?{}", query.finish());
    if let Some(raw) = raw {
        command.push('&');
        command.push_str(raw);
    }
    command
}

/// A JSON value as PHP bracket pairs: `fields[PHONE][0][VALUE]=…`.
fn php_pairs(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                php_pairs(&format!("{prefix}[{key}]"), value, out);
            }
        }
        Value::Array(items) => {
            for (i, value) in items.iter().enumerate() {
                php_pairs(&format!("{prefix}[{i}]"), value, out);
            }
        }
        Value::Null => {}
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// The lead's or deal's fields: `extra` first, the columns over it.
fn entity_fields(row: &OutboxRow, target: &B24LeadTarget) -> Value {
    let mut fields: Map<String, Value> = row.extra.as_object().cloned().unwrap_or_default();
    let mut set = |key: &str, value: Value| {
        fields.insert(key.to_string(), value);
    };
    set("TITLE", json!(row.name().unwrap_or_default()));
    set("ORIGINATOR_ID", json!(ORIGINATOR));
    set("ORIGIN_ID", json!(row.delivery_key));
    if let Some(comment) = row.comment.as_deref().filter(|c| !c.is_empty()) {
        set("COMMENTS", json!(comment));
    }
    if let Some(price) = row.price.filter(|p| p.is_finite()) {
        set("OPPORTUNITY", json!(price));
    }
    if let Some(source) = row.source.as_deref().filter(|s| !s.is_empty()) {
        set("SOURCE_DESCRIPTION", json!(source));
    }
    for (field, value) in UTM_FIELDS.iter().zip(&row.utm) {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            set(field, json!(value));
        }
    }
    let responsible = match target {
        B24LeadTarget::Lead { status_id, responsible_user_id } => {
            set("STATUS_ID", json!(status_id));
            // A lead holds its contact data itself.
            for (key, value) in person(row) {
                set(key, value);
            }
            responsible_user_id
        }
        B24LeadTarget::Deal { category_id, stage_id, responsible_user_id } => {
            set("CATEGORY_ID", json!(category_id));
            set("STAGE_ID", json!(stage_id));
            responsible_user_id
        }
    };
    if let Some(user) = row.responsible_user_id.or(*responsible) {
        set("ASSIGNED_BY_ID", json!(user));
    }
    Value::Object(fields)
}

/// A deal's contact: the person, stamped with the key like the deal.
fn contact_fields(row: &OutboxRow) -> Value {
    let mut fields: Map<String, Value> = person(row).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    fields.insert("ORIGINATOR_ID".into(), json!(ORIGINATOR));
    fields.insert("ORIGIN_ID".into(), json!(row.delivery_key));
    if let Some(user) = row.responsible_user_id {
        fields.insert("ASSIGNED_BY_ID".into(), json!(user));
    }
    Value::Object(fields)
}

fn person(row: &OutboxRow) -> Vec<(&'static str, Value)> {
    let mut fields = Vec::new();
    let name = row.contact_name.as_deref().filter(|n| !n.trim().is_empty()).or(row.name()).unwrap_or_default();
    fields.push(("NAME", json!(name)));
    for (key, value) in [("PHONE", &row.phone), ("EMAIL", &row.email)] {
        if let Some(value) = value.as_deref().filter(|v| !v.trim().is_empty()) {
            fields.push((key, json!([{ "VALUE": value, "VALUE_TYPE": "WORK" }])));
        }
    }
    fields
}

fn created(result: &Value, contact_id: Option<i64>) -> SendAnswer {
    match lenient_i64(result) {
        Some(entity_id) => SendAnswer::Created(CreatedIds { entity_id, contact_id }),
        None => SendAnswer::Ambiguous(format!("the create answered no id: {result}")),
    }
}

/// A failed create by what the error says about whether it ran.
fn classify(e: CrmError) -> SendAnswer {
    match e {
        CrmError::Api { code, description, .. } => classify_code(&code, &description, 0),
        CrmError::Status { status, reason, .. } if status >= 500 => {
            SendAnswer::Ambiguous(format!("HTTP {status}: {reason}"))
        }
        // A 4xx without a Bitrix24 error: refused by whatever stands in
        // front of the portal, before the portal ran anything.
        CrmError::Status { status, reason, .. } => SendAnswer::AccountRefused(format!("HTTP {status}: {reason}")),
        CrmError::Config(message) => SendAnswer::Refused(message),
        other => SendAnswer::Ambiguous(other.to_string()),
    }
}

fn classify_code(code: &str, description: &str, status: u16) -> SendAnswer {
    let text = if description.is_empty() { code.to_string() } else { format!("{code}: {description}") };
    match code {
        "QUERY_LIMIT_EXCEEDED" | "OPERATION_TIME_LIMIT" => SendAnswer::NotExecuted { reason: text, not_before: None },
        code if ACCOUNT_CODES.contains(&code) || code.eq_ignore_ascii_case("ACCESS_DENIED") => {
            SendAnswer::AccountRefused(text)
        }
        "INTERNAL_SERVER_ERROR" => SendAnswer::Ambiguous(text),
        _ if code.is_empty() && status >= 500 => SendAnswer::Ambiguous(text),
        _ => SendAnswer::Refused(if text.is_empty() { "refused without a reason".into() } else { text }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> OutboxRow {
        OutboxRow {
            id: 3,
            delivery_key: "k-3".into(),
            title: Some("Order".into()),
            contact_name: Some("Anna".into()),
            phone: Some("+7 900".into()),
            price: Some(10.5),
            extra: json!({ "UF_CRM_1": "x", "TITLE": "loses" }),
            ..OutboxRow::default()
        }
    }

    #[test]
    fn a_deal_batch_creates_the_contact_first_and_names_it_unencoded() {
        let target = B24LeadTarget::Deal { category_id: 1, stage_id: "C1:NEW".into(), responsible_user_id: Some(4) };
        let deal =
            command("crm.deal.add", &entity_fields(&row(), &target), &[], Some("fields[CONTACT_IDS][0]=$result[c]"));
        assert!(deal.starts_with("crm.deal.add?"), "{deal}");
        assert!(deal.ends_with("&fields[CONTACT_IDS][0]=$result[c]"), "{deal}");
        let (_, params) =
            super::super::batch::split_command(deal.trim_end_matches("&fields[CONTACT_IDS][0]=$result[c]"));
        assert_eq!(params["fields"]["TITLE"], "Order");
        assert_eq!(params["fields"]["STAGE_ID"], "C1:NEW");
        assert_eq!(params["fields"]["ORIGIN_ID"], "k-3");
        assert_eq!(params["fields"]["UF_CRM_1"], "x");
        assert_eq!(params["fields"]["ASSIGNED_BY_ID"], "4");
        assert!(params["fields"].get("PHONE").is_none(), "a deal holds no phone");
        let mut pairs = Vec::new();
        php_pairs("fields", &contact_fields(&row()), &mut pairs);
        assert!(pairs.contains(&("fields[PHONE][0][VALUE]".into(), "+7 900".into())), "{pairs:?}");
        assert!(pairs.contains(&("fields[ORIGINATOR_ID]".into(), "crm-connect".into())), "{pairs:?}");
    }

    #[test]
    fn create_errors_say_whether_the_create_ran() {
        let check = |code: &str, expected: fn(&SendAnswer) -> bool| {
            let answer = classify_code(code, "why", 200);
            assert!(expected(&answer), "{code}: {answer:?}");
        };
        check("QUERY_LIMIT_EXCEEDED", |a| matches!(a, SendAnswer::NotExecuted { .. }));
        check("OPERATION_TIME_LIMIT", |a| matches!(a, SendAnswer::NotExecuted { .. }));
        check("INVALID_CREDENTIALS", |a| matches!(a, SendAnswer::AccountRefused(_)));
        check("insufficient_scope", |a| matches!(a, SendAnswer::AccountRefused(_)));
        check("", |a| matches!(a, SendAnswer::Refused(_)));
        check("ERROR_CORE", |a| matches!(a, SendAnswer::Refused(_)));
        check("INTERNAL_SERVER_ERROR", |a| matches!(a, SendAnswer::Ambiguous(_)));
        assert!(matches!(classify(CrmError::Network("reset".into())), SendAnswer::Ambiguous(_)));
        let lead = entity_fields(&row(), &B24LeadTarget::Lead { status_id: "NEW".into(), responsible_user_id: None });
        assert_eq!(lead["PHONE"], json!([{ "VALUE": "+7 900", "VALUE_TYPE": "WORK" }]));
        assert_eq!(lead["STATUS_ID"], "NEW");
    }
}
