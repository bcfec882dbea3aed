//! AmoCRM's events feed as funnel history reads it: `GET /api/v4/events`
//! filtered by type, entity and a `created_at` window, in pages of at most
//! 100 linked by `_links.next`, 204 when nothing matches; and the test hooks
//! that make events happen (a lead moved, added elsewhere, given to another
//! user). As in AmoCRM a lead created into a stage yields only `lead_added`,
//! without a status. The order of the feed is a knob, never creation order
//! by default, and an event can turn up late, after reads that missed it.

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use rand::Rng;
use serde_json::{Value, json};

use super::leads::first_status;
use super::{AmoSandbox, CURRENT_USER_ID, HAL_JSON, SandboxLead, Shared, State, api_problem, secs};
use crate::faults::RecordedRequest;
use crate::hook::HookError;
use crate::{lock, respond};

/// Events a page holds unasked, and at most.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 100;
/// The letters of AmoCRM's event ids: lowercase Crockford base32.
const ID_ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
const ID_LEN: usize = 26;

const LEAD_ADDED: &str = "lead_added";
const LEAD_STATUS_CHANGED: &str = "lead_status_changed";
const RESPONSIBLE_CHANGED: &str = "entity_responsible_changed";

/// An event as stored. `visible_at` (sandbox unix seconds) is when reads
/// begin to list it: an event AmoCRM wrote late.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxEvent {
    pub id: String,
    pub event_type: String,
    pub entity_id: i64,
    pub created_by: i64,
    pub created_at: i64,
    pub value_before: Value,
    pub value_after: Value,
    pub visible_at: i64,
}

/// The order `GET /api/v4/events` lists matching events in. AmoCRM leaves
/// it undocumented, so a client must not depend on any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AmoEventOrder {
    /// Latest `created_at` first, as the account's feed shows them.
    #[default]
    NewestFirst,
    OldestFirst,
    /// A fixed order that follows from the ids alone: unrelated to time,
    /// yet the same from one page to the next.
    ByIdHash,
}

/// A lead's move to another status, for [`AmoSandbox::move_lead_with`]: by
/// default made now by the token's user and listed at once.
#[derive(Clone, Debug, PartialEq)]
pub struct LeadMove {
    pipeline_id: i64,
    status_id: i64,
    when: When,
    created_by: i64,
    hidden_for: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    Now,
    At(i64),
    Ago(Duration),
}

impl LeadMove {
    pub fn to(pipeline_id: i64, status_id: i64) -> LeadMove {
        LeadMove { pipeline_id, status_id, when: When::Now, created_by: CURRENT_USER_ID, hidden_for: Duration::ZERO }
    }

    /// The event's `created_at`, unix seconds.
    pub fn at(mut self, created_at: i64) -> LeadMove {
        self.when = When::At(created_at);
        self
    }

    /// `created_at` this long before the sandbox clock's now, while the
    /// event is listed only from now on: an event every read made before
    /// the hook missed although its time lies behind them.
    pub fn ago(mut self, before_now: Duration) -> LeadMove {
        self.when = When::Ago(before_now);
        self
    }

    /// The event's `created_by`: a user id, or 0 for a robot or the system.
    pub fn by(mut self, user_id: i64) -> LeadMove {
        self.created_by = user_id;
        self
    }

    /// Reads list the event only once the sandbox clock has moved this far
    /// past the hook: an event that stays out of sight for a while.
    pub fn hidden_for(mut self, hidden_for: Duration) -> LeadMove {
        self.hidden_for = hidden_for;
        self
    }
}

/// The account's events and how the feed lists them.
#[derive(Debug, Default)]
pub(super) struct Store {
    events: Vec<SandboxEvent>,
    ids: HashSet<String>,
    order: AmoEventOrder,
}

impl Store {
    pub(super) fn lead_added(&mut self, lead_id: i64, created_by: i64, now: i64) {
        self.push(LEAD_ADDED, lead_id, created_by, now, now, (json!([]), json!([])));
    }

    fn push(
        &mut self,
        kind: &str,
        entity_id: i64,
        created_by: i64,
        created_at: i64,
        visible_at: i64,
        values: (Value, Value),
    ) -> String {
        let id = self.fresh_id();
        let (value_before, value_after) = values;
        self.events.push(SandboxEvent {
            id: id.clone(),
            event_type: kind.to_owned(),
            entity_id,
            created_by,
            created_at,
            value_before,
            value_after,
            visible_at,
        });
        id
    }

    /// Shaped like AmoCRM's (`01pz58t6p04ymgsgfbmfyfy1mf`), never repeated.
    fn fresh_id(&mut self) -> String {
        let mut rng = rand::rng();
        loop {
            let tail: String =
                (2..ID_LEN).map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())])).collect();
            let id = format!("01{tail}");
            if self.ids.insert(id.clone()) {
                return id;
            }
        }
    }
}

fn lead_status(pipeline_id: i64, status_id: i64) -> Value {
    json!([{ "lead_status": { "id": status_id, "pipeline_id": pipeline_id } }])
}

impl AmoSandbox {
    /// Moves a lead to `status_id` of `pipeline_id` now, by the token's
    /// user, as someone working the funnel would; returns the event id.
    pub fn move_lead(&self, lead_id: i64, pipeline_id: i64, status_id: i64) -> Result<String, HookError> {
        self.move_lead_with(lead_id, LeadMove::to(pipeline_id, status_id))
    }

    /// Moves a lead as `change` says and records its `lead_status_changed`
    /// event (one element each in `value_before` and `value_after`).
    /// Refused, with nothing changed, for an unknown lead or a status not
    /// in the pipeline (142 and 143 are in every one).
    pub fn move_lead_with(&self, lead_id: i64, change: LeadMove) -> Result<String, HookError> {
        let mut state = lock(&self.shared.state);
        check_status(&state, change.pipeline_id, change.status_id)?;
        let now = state.now();
        let (before_pipeline, before_status) = {
            let lead = lead_mut(&mut state, lead_id)?;
            let before = (lead.pipeline_id, lead.status_id);
            lead.pipeline_id = change.pipeline_id;
            lead.status_id = Some(change.status_id);
            before
        };
        let before_status =
            before_status.or_else(|| first_status(&state.pipelines, before_pipeline)).unwrap_or_default();
        let created_at = match change.when {
            When::Now => now,
            When::At(at) => at,
            When::Ago(before_now) => now.saturating_sub(secs(before_now)),
        };
        let visible_at = now.saturating_add(secs(change.hidden_for));
        let values = (lead_status(before_pipeline, before_status), lead_status(change.pipeline_id, change.status_id));
        Ok(state.events.push(LEAD_STATUS_CHANGED, lead_id, change.created_by, created_at, visible_at, values))
    }

    /// A lead created elsewhere (a form, a user in the account) into
    /// `status_id` of `pipeline_id`, given to `responsible_user_id`: it
    /// yields `lead_added` and, like any lead created in a stage, no status
    /// event. Returns its id.
    pub fn add_lead(&self, pipeline_id: i64, status_id: i64, responsible_user_id: i64) -> Result<i64, HookError> {
        let mut state = lock(&self.shared.state);
        check_status(&state, pipeline_id, status_id)?;
        let now = state.now();
        let lead = SandboxLead {
            id: 0,
            name: String::new(),
            pipeline_id,
            status_id: Some(status_id),
            price: 0,
            responsible_user_id,
            custom_fields_values: Vec::new(),
            tags: Vec::new(),
            contact_id: None,
            company_id: None,
            created_at: now,
        };
        let id = state.crm.insert_lead(lead);
        state.events.lead_added(id, CURRENT_USER_ID, now);
        Ok(id)
    }

    /// Gives a lead to another user, as reads of `GET /api/v4/leads` then
    /// show; the `entity_responsible_changed` event it yields names no
    /// status, so the status feed never shows it.
    pub fn set_responsible_user(&self, lead_id: i64, user_id: i64) -> Result<(), HookError> {
        let mut state = lock(&self.shared.state);
        let now = state.now();
        let lead = lead_mut(&mut state, lead_id)?;
        let before = std::mem::replace(&mut lead.responsible_user_id, user_id);
        let values =
            (json!([{ "responsible_user": { "id": before } }]), json!([{ "responsible_user": { "id": user_id } }]));
        state.events.push(RESPONSIBLE_CHANGED, lead_id, CURRENT_USER_ID, now, now, values);
        Ok(())
    }

    /// Every event recorded so far, listed or not yet, oldest first.
    pub fn events(&self) -> Vec<SandboxEvent> {
        lock(&self.shared.state).events.events.clone()
    }

    /// The order the feed lists events in from now on.
    pub fn set_event_order(&self, order: AmoEventOrder) {
        lock(&self.shared.state).events.order = order;
    }
}

fn lead_mut(state: &mut State, lead_id: i64) -> Result<&mut SandboxLead, HookError> {
    let lead = state.crm.leads.iter_mut().find(|lead| lead.id == lead_id);
    lead.ok_or(HookError::UnknownEntity { kind: "lead", id: lead_id })
}

fn check_status(state: &State, pipeline_id: i64, status_id: i64) -> Result<(), HookError> {
    let served = state.pipelines.iter().find(|served| served.pipeline.id == pipeline_id);
    let served = served.ok_or(HookError::UnknownPipeline(pipeline_id))?;
    if served.statuses.iter().any(|status| status.id == status_id) {
        Ok(())
    } else {
        Err(HookError::UnknownStage { stage: status_id.to_string(), place: format!("pipeline {pipeline_id}") })
    }
}

/// What `GET /api/v4/events` was asked. Values of a filter come as one
/// parameter (`filter[type]=a,b`) or several (`filter[type][]=a`).
struct EventQuery {
    page: usize,
    limit: usize,
    types: Vec<String>,
    entities: Vec<String>,
    entity_ids: Vec<i64>,
    /// Both ends inclusive, as AmoCRM takes them.
    created: (Option<i64>, Option<i64>),
    /// The query's other parameters, for the page links.
    kept: Vec<(String, String)>,
}

impl EventQuery {
    fn parse(request: &RecordedRequest) -> Result<EventQuery, String> {
        let mut query = EventQuery {
            page: 1,
            limit: DEFAULT_LIMIT,
            types: Vec::new(),
            entities: Vec::new(),
            entity_ids: Vec::new(),
            created: (None, None),
            kept: Vec::new(),
        };
        let pairs = url::form_urlencoded::parse(request.query.as_deref().unwrap_or("").as_bytes());
        let int = |key: &str, value: &str| value.trim().parse::<i64>().map_err(|_| format!("{key} must be an integer"));
        for (key, value) in pairs {
            let (key, value) = (key.into_owned(), value.into_owned());
            match key.as_str() {
                "page" => query.page = positive(&value).ok_or("page must be a positive integer")?,
                // AmoCRM caps a larger limit rather than refusing it.
                "limit" => query.limit = positive(&value).ok_or("limit must be a positive integer")?.min(MAX_LIMIT),
                _ => {
                    match filter_field(&key) {
                        Some(("created_at", "[from]")) => query.created.0 = Some(int(&key, &value)?),
                        Some(("created_at", "[to]")) => query.created.1 = Some(int(&key, &value)?),
                        Some(("type", _)) => query.types.extend(listed(&value)),
                        Some(("entity", _)) => query.entities.extend(listed(&value)),
                        Some(("entity_id", _)) => {
                            for id in listed(&value) {
                                query.entity_ids.push(int(&key, &id)?);
                            }
                        }
                        _ => {}
                    }
                    query.kept.push((key, value));
                }
            }
        }
        Ok(query)
    }

    fn matches(&self, event: &SandboxEvent, now: i64) -> bool {
        event.visible_at <= now
            && (self.types.is_empty() || self.types.contains(&event.event_type))
            && (self.entities.is_empty() || self.entities.iter().any(|entity| entity == "lead"))
            && (self.entity_ids.is_empty() || self.entity_ids.contains(&event.entity_id))
            && self.created.0.is_none_or(|from| event.created_at >= from)
            && self.created.1.is_none_or(|to| event.created_at <= to)
    }

    /// This query's path for page `page`.
    fn page_path(&self, page: usize) -> String {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.extend_pairs(&self.kept);
        form.append_pair("page", &page.to_string());
        form.append_pair("limit", &self.limit.to_string());
        format!("/api/v4/events?{}", form.finish())
    }
}

/// `filter[type][]` as `("type", "[]")`, `filter[created_at][from]` as
/// `("created_at", "[from]")`; `None` for anything but a filter.
fn filter_field(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix("filter[")?.split_once(']')
}

/// `a,b` as `["a", "b"]`, blanks dropped.
fn listed(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect()
}

fn positive(value: &str) -> Option<usize> {
    value.trim().parse::<usize>().ok().filter(|number| *number >= 1)
}

/// FNV-1a: a stable scramble, the same in every run.
fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

impl Shared {
    pub(super) fn list_events(&self, request: &RecordedRequest) -> Response {
        let query = match EventQuery::parse(request) {
            Ok(query) => query,
            Err(detail) => return api_problem(400, &detail),
        };
        let state = lock(&self.state);
        let now = state.now();
        let mut found: Vec<&SandboxEvent> =
            state.events.events.iter().filter(|event| query.matches(event, now)).collect();
        match state.events.order {
            AmoEventOrder::NewestFirst => found.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id))),
            AmoEventOrder::OldestFirst => found.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id))),
            AmoEventOrder::ByIdHash => found.sort_by_key(|event| id_hash(&event.id)),
        }
        let start = (query.page - 1).saturating_mul(query.limit);
        let page: Vec<Value> = found.iter().skip(start).take(query.limit).map(|event| self.event_json(event)).collect();
        if page.is_empty() {
            // AmoCRM answers an empty list with 204 and no body.
            return respond(204, "", Body::empty());
        }
        let mut links = json!({ "self": self.link(&query.page_path(query.page)) });
        if start.saturating_add(query.limit) < found.len() {
            links["next"] = self.link(&query.page_path(query.page + 1));
        }
        let body = json!({ "_page": query.page, "_links": links, "_embedded": { "events": page } });
        respond(200, HAL_JSON, body.to_string())
    }

    fn event_json(&self, event: &SandboxEvent) -> Value {
        json!({
            "id": event.id,
            "type": event.event_type,
            "entity_id": event.entity_id,
            "entity_type": "lead",
            "created_by": event.created_by,
            "created_at": event.created_at,
            "value_after": event.value_after,
            "value_before": event.value_before,
            "account_id": self.config.account_id,
            "_links": { "self": self.link(&format!("/api/v4/events/{}", event.id)) },
            "_embedded": { "entity": {
                "id": event.entity_id,
                "_links": { "self": self.link(&format!("/api/v4/leads/{}", event.entity_id)) },
            }},
        })
    }
}
