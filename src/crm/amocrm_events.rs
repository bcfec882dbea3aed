//! What funnel history reads from AmoCRM: one page of a window's
//! `lead_status_changed` events (`GET /api/v4/events`), and the current
//! responsible user of leads (`GET /api/v4/leads` by `filter[id]`). Answers
//! are read defensively: a missing or mistyped field of an event is an
//! error naming it, an event outside the filters says the filters were not
//! applied (an error: the window is not taken as read), never a panic.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::CrmError;
use super::amocrm::AmoClient;
use super::http::RawResponse;
use crate::model::{AmoStatusEvent, EventWindow, LeadStatus};
use crate::secret::Secret;

const EVENT_TYPE: &str = "lead_status_changed";
/// Events per page.
pub const EVENTS_LIMIT: u32 = 100;
/// Leads per request of [`AmoClient::responsible_users`].
pub const LEADS_LIMIT: usize = 250;

/// One page of a window's events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsPage {
    pub events: Vec<AmoStatusEvent>,
    /// `_links.next` was there: the window has another page.
    pub has_next: bool,
    /// The account's clock when it answered.
    pub server_date: Option<DateTime<Utc>>,
}

impl AmoClient<'_> {
    /// Page `page` (from 1) of the status changes of leads created within
    /// `window`; an empty list is HTTP 204.
    pub async fn status_events(&self, access: &Secret, window: EventWindow, page: u32) -> Result<EventsPage, CrmError> {
        let response = self.get(&events_url(self.base(), window, page), access).await?;
        let (events, has_next) = parse_events(&response, window)?;
        Ok(EventsPage { events, has_next, server_date: response.date })
    }

    /// The responsible user of each of these leads (at most
    /// [`LEADS_LIMIT`]), with the account's clock; a lead the account no
    /// longer has is left out.
    pub async fn responsible_users(
        &self,
        access: &Secret,
        lead_ids: &[i64],
    ) -> Result<(HashMap<i64, i64>, Option<DateTime<Utc>>), CrmError> {
        if lead_ids.len() > LEADS_LIMIT {
            return Err(CrmError::Config(format!("{} leads do not fit one request of {LEADS_LIMIT}", lead_ids.len())));
        }
        if lead_ids.is_empty() {
            return Ok((HashMap::new(), None));
        }
        let mut url = format!("{}/api/v4/leads?limit={LEADS_LIMIT}", self.base());
        for id in lead_ids {
            url.push_str(&format!("&filter[id][]={id}"));
        }
        let response = self.get(&url, access).await?;
        Ok((parse_responsible(&response, lead_ids)?, response.date))
    }
}

fn events_url(base: &str, window: EventWindow, page: u32) -> String {
    format!(
        "{base}/api/v4/events?filter[type]={EVENT_TYPE}&filter[entity]=lead&filter[created_at][from]={}\
         &filter[created_at][to]={}&limit={EVENTS_LIMIT}&page={page}",
        window.from.timestamp(),
        window.to.timestamp()
    )
}

/// A page's events and whether another follows.
fn parse_events(response: &RawResponse, window: EventWindow) -> Result<(Vec<AmoStatusEvent>, bool), CrmError> {
    if response.status == 204 {
        return Ok((Vec::new(), false));
    }
    let page: Value = response.json()?;
    let events = embedded(&page, "events")?
        .iter()
        .enumerate()
        .map(|(i, e)| parse_event(i, e, window))
        .collect::<Result<_, _>>()?;
    Ok((events, has_next(&page)))
}

/// A page's `_embedded.<key>` list.
fn embedded<'p>(page: &'p Value, key: &str) -> Result<&'p [Value], CrmError> {
    page.get("_embedded")
        .and_then(|e| e.get(key))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| CrmError::Malformed(format!("the page has no `_embedded.{key}` list")))
}

fn has_next(page: &Value) -> bool {
    page.get("_links").and_then(|l| l.get("next")).is_some_and(|next| !next.is_null())
}

fn parse_event(index: usize, value: &Value, window: EventWindow) -> Result<AmoStatusEvent, CrmError> {
    let event = value.as_object().ok_or_else(|| bad(&format!("#{index}"), "is not an object"))?;
    let id = match event.get("id") {
        Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
        Some(Value::Number(id)) => id.to_string(),
        _ => return Err(bad(&format!("#{index}"), "has no `id`")),
    };
    let text = |key: &str| event.get(key).and_then(Value::as_str);
    if text("type") != Some(EVENT_TYPE) || text("entity_type") != Some("lead") {
        return Err(CrmError::Incomplete(format!(
            "event {id} is a {:?} of a {:?}, outside `filter[type]` / `filter[entity]`: the filters were not applied",
            text("type").unwrap_or_default(),
            text("entity_type").unwrap_or_default()
        )));
    }
    let number = |key: &str| integer(event, key).ok_or_else(|| bad(&id, &format!("has no integer `{key}`")));
    let created_at = DateTime::from_timestamp(number("created_at")?, 0)
        .ok_or_else(|| bad(&id, "has a `created_at` out of range"))?;
    if !(window.from..=window.to).contains(&created_at) {
        return Err(CrmError::Incomplete(format!(
            "event {id} was created at {created_at}, outside `filter[created_at]` ({} to {}): the filter was not applied",
            window.from, window.to
        )));
    }
    Ok(AmoStatusEvent {
        lead_id: number("entity_id")?,
        created_by: number("created_by")?,
        created_at,
        before: lead_status(event, "value_before").ok_or_else(|| bad(&id, "has no `value_before[0].lead_status`"))?,
        after: lead_status(event, "value_after").ok_or_else(|| bad(&id, "has no `value_after[0].lead_status`"))?,
        id,
    })
}

/// `[{"lead_status": {"id", "pipeline_id"}}]`: its first element.
fn lead_status(event: &Map<String, Value>, key: &str) -> Option<LeadStatus> {
    let status = event.get(key)?.as_array()?.first()?.get("lead_status")?.as_object()?;
    Some(LeadStatus { pipeline_id: integer(status, "pipeline_id")?, status_id: integer(status, "id")? })
}

/// An integer, also as a string of digits (proxies have been seen to send them).
fn integer(object: &Map<String, Value>, key: &str) -> Option<i64> {
    match object.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn bad(event: &str, what: &str) -> CrmError {
    CrmError::Malformed(format!("event {event} {what}"))
}

/// `_embedded.leads[{id, responsible_user_id}]`; a lead not asked for means
/// the filter was not applied.
fn parse_responsible(response: &RawResponse, asked: &[i64]) -> Result<HashMap<i64, i64>, CrmError> {
    if response.status == 204 {
        return Ok(HashMap::new());
    }
    let page: Value = response.json()?;
    let leads = embedded(&page, "leads")?;
    let mut users = HashMap::new();
    for lead in leads {
        let lead = lead.as_object().ok_or_else(|| CrmError::Malformed("a listed lead is not an object".into()))?;
        let id = integer(lead, "id").ok_or_else(|| CrmError::Malformed("a listed lead has no integer `id`".into()))?;
        if !asked.contains(&id) {
            return Err(CrmError::Incomplete(format!(
                "lead {id} was listed, though not asked for: `filter[id]` was not applied"
            )));
        }
        if let Some(user) = integer(lead, "responsible_user_id") {
            users.insert(id, user);
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const FROM: i64 = 1_764_763_200;

    fn window() -> EventWindow {
        EventWindow {
            from: DateTime::from_timestamp(FROM, 0).unwrap(),
            to: DateTime::from_timestamp(FROM + 3600, 0).unwrap(),
        }
    }

    fn answer(status: u16, body: &Value) -> RawResponse {
        RawResponse {
            status,
            content_type: "application/hal+json".into(),
            location: None,
            date: None,
            body: if body.is_null() { Vec::new() } else { body.to_string().into_bytes() },
        }
    }

    /// An event as AmoCRM lists it, undocumented fields included.
    fn event(id: &str, lead: i64, at: i64) -> Value {
        json!({
            "id": id,
            "type": "lead_status_changed",
            "entity_id": lead,
            "entity_type": "lead",
            "created_by": 0,
            "created_at": at,
            "value_after": [{ "lead_status": { "id": 142, "pipeline_id": 3 } }],
            "value_before": [{ "lead_status": { "id": 31234567, "pipeline_id": 3 } }],
            "account_id": 29_000_000,
            "_links": { "self": { "href": "https://acme.amocrm.ru/api/v4/events/01pz58" } },
            "_embedded": { "entity": { "id": lead, "_links": { "self": { "href": "…" } } } }
        })
    }

    fn page(events: Vec<Value>, next: bool) -> Value {
        let mut links = json!({ "self": { "href": "https://acme.amocrm.ru/api/v4/events?page=1" } });
        if next {
            links["next"] = json!({ "href": "https://acme.amocrm.ru/api/v4/events?page=2" });
        }
        json!({ "_page": 1, "_links": links, "_embedded": { "events": events } })
    }

    #[test]
    fn a_page_of_events_reads_their_statuses_and_whether_another_follows() {
        let body = page(vec![event("01pz58t6p04ymgsgfbmfyfy1mf", 501, FROM), event("01pz5a", 502, FROM + 3600)], true);
        let (events, next) = parse_events(&answer(200, &body), window()).unwrap();
        assert!(next);
        assert_eq!(
            events[0],
            AmoStatusEvent {
                id: "01pz58t6p04ymgsgfbmfyfy1mf".into(),
                lead_id: 501,
                created_by: 0,
                created_at: window().from,
                before: LeadStatus { pipeline_id: 3, status_id: 31234567 },
                after: LeadStatus { pipeline_id: 3, status_id: 142 },
            }
        );
        assert_eq!(events[1].created_at, window().to, "both ends of the window are in it");
        let (events, next) = parse_events(&answer(200, &page(vec![event("x", 1, FROM)], false)), window()).unwrap();
        assert_eq!((events.len(), next), (1, false));
        let (events, next) = parse_events(&answer(200, &page(vec![], false)), window()).unwrap();
        assert_eq!((events.len(), next), (0, false));
        let (events, next) = parse_events(&answer(204, &Value::Null), window()).unwrap();
        assert_eq!((events.len(), next), (0, false), "an empty list is 204 with no body");
        let mut numeric = event("ignored", 7, FROM);
        numeric["id"] = json!(123);
        numeric["entity_id"] = json!("7");
        numeric["created_by"] = json!(8_123_456);
        let (events, _) = parse_events(&answer(200, &page(vec![numeric], false)), window()).unwrap();
        assert_eq!((events[0].id.as_str(), events[0].lead_id, events[0].created_by), ("123", 7, 8_123_456));
    }

    #[test]
    fn a_broken_event_is_an_error_that_names_it() {
        let check = |change: fn(&mut Value), expected: &str| {
            let mut broken = event("01ab", 501, FROM + 60);
            change(&mut broken);
            let body = page(vec![event("01ok", 500, FROM), broken], false);
            let error = parse_events(&answer(200, &body), window()).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        };
        check(|e| *e = json!("01ab"), "unexpected response: event #1 is not an object");
        check(|e| e["id"] = json!(null), "event #1 has no `id`");
        check(|e| e["id"] = json!(" "), "event #1 has no `id`");
        check(|e| drop(e.as_object_mut().unwrap().remove("entity_id")), "event 01ab has no integer `entity_id`");
        check(|e| e["entity_id"] = json!(1.5), "event 01ab has no integer `entity_id`");
        check(|e| e["created_by"] = json!("robot"), "event 01ab has no integer `created_by`");
        check(|e| e["created_at"] = json!(i64::MAX), "event 01ab has a `created_at` out of range");
        check(|e| e["value_before"] = json!([]), "event 01ab has no `value_before[0].lead_status`");
        check(|e| e["value_before"] = json!(null), "event 01ab has no `value_before[0].lead_status`");
        check(|e| e["value_after"][0]["lead_status"] = json!({ "id": 142 }), "has no `value_after[0].lead_status`");
        check(|e| e["value_after"][0] = json!({ "lead_status": { "id": "x", "pipeline_id": 3 } }), "value_after");
        // Results outside the filters: the filters were not applied, nothing of the page is taken.
        check(|e| e["type"] = json!("lead_added"), "incomplete list: event 01ab is a \"lead_added\" of a \"lead\"");
        check(|e| e["entity_type"] = json!("contact"), "the filters were not applied");
        check(|e| e["created_at"] = json!(FROM - 1), "outside `filter[created_at]`");
        check(|e| e["created_at"] = json!(FROM + 3601), "the filter was not applied");
        for body in [json!({ "_embedded": {} }), json!({ "_embedded": { "events": {} } }), json!([])] {
            let error = parse_events(&answer(200, &body), window()).unwrap_err();
            assert!(matches!(error, CrmError::Malformed(_)), "{body}: {error}");
        }
        let not_json = RawResponse { body: b"<html>".to_vec(), ..answer(200, &Value::Null) };
        assert!(matches!(parse_events(&not_json, window()), Err(CrmError::Malformed(_))));
    }

    #[test]
    fn the_events_request_names_the_filters_the_window_and_the_page() {
        let url = events_url("https://acme.amocrm.ru", window(), 3);
        assert_eq!(
            url,
            format!(
                "https://acme.amocrm.ru/api/v4/events?filter[type]=lead_status_changed&filter[entity]=lead\
                 &filter[created_at][from]={FROM}&filter[created_at][to]={}&limit=100&page=3",
                FROM + 3600
            )
        );
    }

    #[test]
    fn responsible_users_are_read_by_lead_and_a_lead_not_asked_for_is_an_error() {
        let body = json!({
            "_links": { "self": { "href": "…" } },
            "_embedded": { "leads": [
                { "id": 501, "name": "Заявка", "responsible_user_id": 7, "custom_fields_values": null },
                { "id": 502, "responsible_user_id": null },
            ] }
        });
        let users = parse_responsible(&answer(200, &body), &[501, 502, 503]).unwrap();
        assert_eq!(users, HashMap::from([(501, 7)]));
        assert!(parse_responsible(&answer(204, &Value::Null), &[1]).unwrap().is_empty());
        let error = parse_responsible(&answer(200, &body), &[501]).unwrap_err();
        assert!(matches!(error, CrmError::Incomplete(_)), "{error}");
        let broken = json!({ "_embedded": { "leads": [{ "name": "no id" }] } });
        assert!(matches!(parse_responsible(&answer(200, &broken), &[1]), Err(CrmError::Malformed(_))));
    }
}
