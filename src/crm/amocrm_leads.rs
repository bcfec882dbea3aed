//! AmoCRM lead delivery on the wire: the lead custom fields (the key field
//! and the UTM codes), one lead with its contact in `leads/complex`, the
//! lookup of a key, the note. A create is sent once, never retried here:
//! its answer is classified ([`SendAnswer`]) and the delivery rules decide.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::CrmError;
use super::amocrm::{AmoClient, check_api};
use super::http::RawResponse;
use crate::model::{CreatedIds, LookupAnswer, OutboxRow, SendAnswer};
use crate::secret::Secret;

/// Custom-field listings and lead searches stop after this many pages.
const MAX_PAGES: usize = 100;
/// A lookup searches leads created this long before and after the send.
const LOOKUP_WINDOW: chrono::Duration = chrono::Duration::minutes(10);
const UTM_CODES: [&str; 5] = ["UTM_SOURCE", "UTM_MEDIUM", "UTM_CAMPAIGN", "UTM_CONTENT", "UTM_TERM"];

/// A lead custom field of the account.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct LeadField {
    pub id: i64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default, rename = "type")]
    pub field_type: String,
}

/// Where the lead goes and how it is found again.
pub struct AmoLeadTarget<'a> {
    pub pipeline_id: i64,
    pub status_id: i64,
    pub responsible_user_id: Option<i64>,
    /// The text field holding the delivery key.
    pub key_field_id: i64,
    /// The account's UTM field codes (only these are sent).
    pub utm_codes: &'a [String],
}

impl AmoClient<'_> {
    /// Every lead custom field, all pages: a listing that cannot be whole
    /// is an error (a key field must never be created on half a list).
    pub async fn lead_fields(&self, access: &Secret) -> Result<Vec<LeadField>, CrmError> {
        let mut fields = Vec::new();
        let mut url = format!("{}/api/v4/leads/custom_fields?limit=250", self.base());
        for _ in 0..MAX_PAGES {
            let response = self.get(&url, access).await?;
            if response.status == 204 {
                return Ok(fields);
            }
            let page: FieldsPage = response.json()?;
            fields.extend(page.embedded.map(|e| e.custom_fields).unwrap_or_default());
            match self.next_page(page.links)? {
                Some(next) => url = next,
                None => return Ok(fields),
            }
        }
        Err(CrmError::Incomplete(format!("the lead custom fields did not end within {MAX_PAGES} pages")))
    }

    /// Creates a text lead field named `name`; its id.
    pub async fn create_text_field(&self, access: &Secret, name: &str) -> Result<i64, CrmError> {
        let url = format!("{}/api/v4/leads/custom_fields", self.base());
        let body = json!([{ "name": name, "type": "text" }]);
        let response = self.post_once(&url, access, &body).await?;
        let response = check_api(response)?;
        let page: FieldsPage = response.json()?;
        page.embedded
            .and_then(|e| e.custom_fields.into_iter().next())
            .map(|f| f.id)
            .ok_or_else(|| CrmError::Malformed("the answer lists no created field".into()))
    }

    /// Sends one lead with its contact; the answer classified, never retried.
    pub async fn send_lead(&self, access: &Secret, row: &OutboxRow, target: &AmoLeadTarget<'_>) -> SendAnswer {
        let url = format!("{}/api/v4/leads/complex", self.base());
        let body = json!([lead_body(row, target)]);
        let response = match self.post_once(&url, access, &body).await {
            Ok(response) => response,
            Err(e) => return SendAnswer::Ambiguous(e.to_string()),
        };
        match response.status {
            200..=299 => match created_ids(&response, row.id) {
                Some(ids) => SendAnswer::Created(ids),
                None => SendAnswer::Ambiguous(format!("the answer names no created lead: {}", response.summary())),
            },
            401 => SendAnswer::Unauthorized,
            429 => SendAnswer::NotExecuted { reason: format!("HTTP 429: {}", response.summary()), not_before: None },
            402 | 403 => SendAnswer::AccountRefused(format!(
                "HTTP {}: the account is unpaid or blocked: {}",
                response.status,
                response.summary()
            )),
            400..=499 => SendAnswer::Refused(format!("HTTP {}: {}", response.status, response.summary())),
            _ => SendAnswer::Ambiguous(format!("HTTP {}: {}", response.status, response.summary())),
        }
    }

    /// Looks for the lead carrying `key` in `key_field_id`: first among the
    /// leads created around `sent_at`, then by full-text search.
    pub async fn find_lead(
        &self,
        access: &Secret,
        key: &str,
        key_field_id: i64,
        sent_at: DateTime<Utc>,
    ) -> Result<LookupAnswer, CrmError> {
        let (from, to) = ((sent_at - LOOKUP_WINDOW).timestamp(), (sent_at + LOOKUP_WINDOW).timestamp());
        let by_time = format!(
            "{}/api/v4/leads?limit=250&with=contacts&filter[created_at][from]={from}&filter[created_at][to]={to}",
            self.base()
        );
        match self.search(access, &by_time, key, key_field_id, Some((from, to))).await? {
            LookupAnswer::Absent => {}
            other => return Ok(other),
        }
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("limit", "250")
            .append_pair("with", "contacts")
            .append_pair("query", key)
            .finish();
        let by_text = format!("{}/api/v4/leads?{query}", self.base());
        self.search(access, &by_text, key, key_field_id, None).await
    }

    async fn search(
        &self,
        access: &Secret,
        first: &str,
        key: &str,
        key_field_id: i64,
        window: Option<(i64, i64)>,
    ) -> Result<LookupAnswer, CrmError> {
        let mut url = first.to_string();
        let mut found: Vec<CreatedIds> = Vec::new();
        for _ in 0..MAX_PAGES {
            let response = self.get(&url, access).await?;
            // An empty list is 204 with no body.
            if response.status == 204 {
                break;
            }
            let page: LeadsPage = response.json()?;
            for lead in page.embedded.map(|e| e.leads).unwrap_or_default() {
                if let Some((from, to)) = window
                    && !(from..=to).contains(&lead.created_at)
                {
                    return Ok(LookupAnswer::Inconclusive(
                        "the search by creation time listed a lead created outside it (filter not applied)".into(),
                    ));
                }
                if lead.holds(key_field_id, key) {
                    found.push(CreatedIds { entity_id: lead.id, contact_id: lead.main_contact() });
                }
            }
            match self.next_page(page.links)? {
                Some(next) => url = next,
                None => break,
            }
        }
        found.sort_by_key(|ids| ids.entity_id);
        if found.len() > 1 {
            tracing::warn!(crm = "amocrm", leads = ?found.iter().map(|f| f.entity_id).collect::<Vec<_>>(), "several leads carry one delivery key; the oldest counts");
        }
        Ok(found.first().map_or(LookupAnswer::Absent, |ids| LookupAnswer::Found(*ids)))
    }

    /// Adds a `common` note to a lead.
    pub async fn add_note(&self, access: &Secret, lead_id: i64, text: &str) -> Result<(), CrmError> {
        let url = format!("{}/api/v4/leads/notes", self.base());
        let body = json!([{ "entity_id": lead_id, "note_type": "common", "params": { "text": text } }]);
        check_api(self.post_once(&url, access, &body).await?).map(drop)
    }

    async fn post_once(&self, url: &str, access: &Secret, body: &Value) -> Result<RawResponse, CrmError> {
        let request = self.http.client().post(url).bearer_auth(access.expose()).json(body);
        self.http.send_amocrm(self.account.host(), request).await
    }

    /// The token goes only to the account's own host.
    fn next_page(&self, links: Option<Links>) -> Result<Option<String>, CrmError> {
        match links.and_then(|l| l.next).map(|n| n.href) {
            Some(next) if next.starts_with(&format!("{}/", self.base())) => Ok(Some(next)),
            Some(_) => Err(CrmError::Malformed("`_links.next` points to another host".into())),
            None => Ok(None),
        }
    }
}

/// The one item of a `leads/complex` request.
fn lead_body(row: &OutboxRow, target: &AmoLeadTarget<'_>) -> Value {
    // By field id (digits) or code; columns win over `extra` for the same field.
    let mut fields: Vec<(String, Value)> =
        vec![(target.key_field_id.to_string(), json!([{ "value": row.delivery_key }]))];
    for (code, value) in UTM_CODES.iter().zip(&row.utm) {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty())
            && target.utm_codes.iter().any(|c| c == code)
        {
            fields.push((code.to_string(), json!([{ "value": value }])));
        }
    }
    for (key, value) in row.extra.as_object().into_iter().flatten() {
        let name = key.trim().parse::<i64>().map_or_else(|_| key.clone(), |id| id.to_string());
        if !fields.iter().any(|(filled, _)| *filled == name) {
            fields.push((name, field_values(value)));
        }
    }
    let fields: Vec<Value> = fields
        .into_iter()
        .map(|(name, values)| match name.parse::<i64>() {
            Ok(id) => json!({ "field_id": id, "values": values }),
            Err(_) => json!({ "field_code": name, "values": values }),
        })
        .collect();
    let mut lead = json!({
        "name": row.name().unwrap_or_default(),
        "pipeline_id": target.pipeline_id,
        "status_id": target.status_id,
        "request_id": row.id.to_string(),
        "custom_fields_values": fields,
    });
    if let Some(price) = row.price.filter(|p| p.is_finite()) {
        lead["price"] = json!(price.round() as i64);
    }
    if let Some(user) = row.responsible_user_id.or(target.responsible_user_id) {
        lead["responsible_user_id"] = json!(user);
    }
    if let Some(source) = row.source.as_deref().filter(|s| !s.is_empty()) {
        lead["tags_to_add"] = json!([{ "name": source }]);
    }
    if row.has_contact() {
        let mut contact_fields = Vec::new();
        for (code, value) in [("PHONE", &row.phone), ("EMAIL", &row.email)] {
            if let Some(value) = value.as_deref().filter(|v| !v.trim().is_empty()) {
                contact_fields.push(json!({ "field_code": code, "values": [{ "value": value, "enum_code": "WORK" }] }));
            }
        }
        let name = [&row.contact_name, &row.phone, &row.email]
            .into_iter()
            .flatten()
            .find(|s| !s.trim().is_empty())
            .cloned()
            .unwrap_or_default();
        lead["_embedded"] = json!({ "contacts": [{ "name": name, "custom_fields_values": contact_fields }] });
    }
    lead
}

/// `extra`'s value for one field: a scalar, an array of scalars, or an
/// array of AmoCRM value objects (`{"enum_id": 5}`), passed as given.
fn field_values(value: &Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(
            items.iter().map(|item| if item.is_object() { item.clone() } else { json!({ "value": item }) }).collect(),
        ),
        scalar => json!([{ "value": scalar }]),
    }
}

/// The ids of the item whose `request_id` holds `row_id`.
fn created_ids(response: &RawResponse, row_id: i64) -> Option<CreatedIds> {
    let items: Vec<ComplexItem> = response.json().ok()?;
    let wanted = row_id.to_string();
    let item = items.into_iter().find(|item| match &item.request_id {
        Some(Value::Array(ids)) => ids.iter().any(|id| id.as_str() == Some(wanted.as_str())),
        Some(Value::String(id)) => *id == wanted,
        _ => false,
    })?;
    Some(CreatedIds { entity_id: item.id, contact_id: item.contact_id })
}

#[derive(Deserialize)]
struct ComplexItem {
    id: i64,
    #[serde(default)]
    contact_id: Option<i64>,
    #[serde(default)]
    request_id: Option<Value>,
}

#[derive(Deserialize)]
struct Links {
    #[serde(default)]
    next: Option<Href>,
}

#[derive(Deserialize)]
struct Href {
    href: String,
}

#[derive(Deserialize)]
struct FieldsPage {
    #[serde(default, rename = "_embedded")]
    embedded: Option<FieldsEmbedded>,
    #[serde(default, rename = "_links")]
    links: Option<Links>,
}

#[derive(Deserialize)]
struct FieldsEmbedded {
    #[serde(default)]
    custom_fields: Vec<LeadField>,
}

#[derive(Deserialize)]
struct LeadsPage {
    #[serde(default, rename = "_embedded")]
    embedded: Option<LeadsEmbedded>,
    #[serde(default, rename = "_links")]
    links: Option<Links>,
}

#[derive(Deserialize)]
struct LeadsEmbedded {
    #[serde(default)]
    leads: Vec<FoundLead>,
}

#[derive(Deserialize)]
struct FoundLead {
    id: i64,
    #[serde(default)]
    created_at: i64,
    /// `null` when the lead has none.
    #[serde(default)]
    custom_fields_values: Option<Vec<FieldValue>>,
    #[serde(default, rename = "_embedded")]
    embedded: Option<FoundEmbedded>,
}

#[derive(Deserialize)]
struct FieldValue {
    field_id: i64,
    #[serde(default)]
    values: Vec<Value>,
}

#[derive(Deserialize)]
struct FoundEmbedded {
    #[serde(default)]
    contacts: Vec<FoundContact>,
}

#[derive(Deserialize)]
struct FoundContact {
    id: i64,
    #[serde(default)]
    is_main: bool,
}

impl FoundLead {
    /// The key field holds exactly `key`.
    fn holds(&self, field_id: i64, key: &str) -> bool {
        self.custom_fields_values.iter().flatten().any(|f| {
            f.field_id == field_id && f.values.iter().any(|v| v.get("value").and_then(Value::as_str) == Some(key))
        })
    }

    fn main_contact(&self) -> Option<i64> {
        let contacts = self.embedded.as_ref().map(|e| e.contacts.as_slice()).unwrap_or_default();
        contacts.iter().find(|c| c.is_main).or(contacts.first()).map(|c| c.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lead_carries_its_key_utm_codes_the_account_has_and_extra_fields_columns_win() {
        let row = OutboxRow {
            id: 12,
            delivery_key: "k-1".into(),
            title: None,
            contact_name: Some("Anna".into()),
            phone: Some("+7 900".into()),
            price: Some(99.6),
            source: Some("site".into()),
            utm: [Some("google".into()), Some("cpc".into()), None, None, None],
            extra: json!({ "UTM_SOURCE": "ignored", "77": ["a", {"enum_id": 5}], "NOTES": 1 }),
            ..OutboxRow::default()
        };
        let codes = vec!["UTM_SOURCE".to_string()];
        let target = AmoLeadTarget {
            pipeline_id: 1,
            status_id: 2,
            responsible_user_id: Some(9),
            key_field_id: 55,
            utm_codes: &codes,
        };
        let body = lead_body(&row, &target);
        assert_eq!(body["name"], "Anna");
        assert_eq!(body["price"], 100);
        assert_eq!(body["request_id"], "12");
        assert_eq!(body["responsible_user_id"], 9);
        assert_eq!(body["tags_to_add"], json!([{ "name": "site" }]));
        assert_eq!(
            body["custom_fields_values"],
            json!([
                { "field_id": 55, "values": [{ "value": "k-1" }] },
                { "field_code": "UTM_SOURCE", "values": [{ "value": "google" }] },
                { "field_id": 77, "values": [{ "value": "a" }, { "enum_id": 5 }] },
                { "field_code": "NOTES", "values": [{ "value": 1 }] },
            ])
        );
        assert_eq!(
            body["_embedded"]["contacts"][0],
            json!({ "name": "Anna", "custom_fields_values": [
                { "field_code": "PHONE", "values": [{ "value": "+7 900", "enum_code": "WORK" }] }
            ] })
        );
    }
}
