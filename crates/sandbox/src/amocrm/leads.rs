//! AmoCRM leads: created one batch at a time (`POST /api/v4/leads`, and
//! `POST /api/v4/leads/complex` with a new contact and company each), read
//! back (`GET /api/v4/leads`: pages, `with=contacts`, `filter[id]`,
//! `filter[created_at]`, full-text `query`), the account's lead custom
//! fields and `common` notes. As in AmoCRM nothing is idempotent: a
//! `request_id` is only echoed. Knobs make the sandbox ignore the
//! `created_at` filter and index leads for `query` late, both of which the
//! vendor leaves open.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::{
    AmoSandbox, CURRENT_USER_ID, HAL_JSON, JSON, LOST_STATUS_ID, PROBLEM_JSON, ServedPipeline, Shared, State,
    UNSORTED_TYPE, WON_STATUS_ID, api_problem, secs,
};
use crate::faults::{Fault, RecordedRequest};
use crate::{lock, respond};

const FIRST_LEAD_ID: i64 = 33_000_001;
const FIRST_CONTACT_ID: i64 = 44_000_001;
const FIRST_COMPANY_ID: i64 = 45_000_001;
const FIRST_NOTE_ID: i64 = 46_000_001;
const FIRST_TAG_ID: i64 = 47_000_001;
/// Fields the account gains through the API get ids from here on.
const FIRST_NEW_FIELD_ID: i64 = 1_200_001;
/// The contact fields every account has, by code.
const PHONE_FIELD_ID: i64 = 1_000_001;
const EMAIL_FIELD_ID: i64 = 1_000_002;
/// Users besides the token's own that leads can be given to.
const OTHER_USER_IDS: [i64; 2] = [9_000_002, 9_000_003];
/// AmoCRM refuses larger batches.
const MAX_BATCH: usize = 50;
/// Custom-field values one entity may carry in one request.
const MAX_FIELD_VALUES: usize = 40;
/// `GET /api/v4/leads` serves at most this many a page, and 50 unasked.
const MAX_LIMIT: usize = 250;
const DEFAULT_LIMIT: usize = 50;
/// Custom fields come at most 50 a page.
const FIELDS_PAGE: usize = 50;
/// The enum codes of the multitext fields PHONE and EMAIL.
const PHONE_ENUMS: [&str; 6] = ["WORK", "WORKDD", "MOB", "FAX", "HOME", "OTHER"];
const EMAIL_ENUMS: [&str; 3] = ["WORK", "PRIV", "OTHER"];
/// Field types `POST /api/v4/leads/custom_fields` takes.
const FIELD_TYPES: [&str; 12] = [
    "text",
    "numeric",
    "checkbox",
    "select",
    "multiselect",
    "date",
    "url",
    "textarea",
    "radiobutton",
    "streetaddress",
    "birthday",
    "date_time",
];
const NOTE_TYPES: [&str; 4] = ["common", "call_in", "call_out", "service_message"];

/// A custom field of the account; UTM fields have the codes `UTM_SOURCE` …
/// `UTM_TERM` and type `tracking_data`, fields made through the API no code.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxCustomField {
    pub id: i64,
    pub name: String,
    pub code: Option<String>,
    pub field_type: String,
}

impl SandboxCustomField {
    /// A `text` field without a code.
    pub fn text(id: i64, name: &str) -> SandboxCustomField {
        SandboxCustomField { id, name: name.to_owned(), code: None, field_type: "text".to_owned() }
    }
}

/// One field's value on a lead or contact, as stored: each of `values` is
/// `{"value": …}`, with `enum_code` or `enum_id` where one was sent.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxFieldValue {
    pub field_id: i64,
    pub field_code: Option<String>,
    pub field_name: String,
    pub field_type: String,
    pub values: Vec<Value>,
}

impl SandboxFieldValue {
    /// Each value's `value` as text.
    pub fn texts(&self) -> Vec<String> {
        self.values.iter().filter_map(|value| value.get("value")).filter_map(scalar_text).collect()
    }

    fn is(&self, field: &str) -> bool {
        self.field_code.as_deref() == Some(field) || self.field_id.to_string() == field
    }
}

/// The texts of `field` (a code such as `PHONE`, or an id in digits).
fn texts_of(values: &[SandboxFieldValue], field: &str) -> Vec<String> {
    values.iter().filter(|value| value.is(field)).flat_map(SandboxFieldValue::texts).collect()
}

/// A lead as stored. `pipeline_id` is where it landed (the main pipeline
/// when none was sent); `status_id` is as sent (`None`: the pipeline's
/// first stage); `created_at` is the sandbox clock's unix seconds.
#[derive(Clone, Debug)]
pub struct SandboxLead {
    pub id: i64,
    pub name: String,
    pub pipeline_id: i64,
    pub status_id: Option<i64>,
    pub price: i64,
    pub responsible_user_id: i64,
    pub custom_fields_values: Vec<SandboxFieldValue>,
    pub tags: Vec<String>,
    pub contact_id: Option<i64>,
    pub company_id: Option<i64>,
    pub created_at: i64,
}

impl SandboxLead {
    /// The texts of the lead's value of `field` (a code such as
    /// `UTM_SOURCE`, or an id in digits); empty when it has none.
    pub fn field_texts(&self, field: &str) -> Vec<String> {
        texts_of(&self.custom_fields_values, field)
    }
}

/// A contact created with a lead through `/leads/complex`.
#[derive(Clone, Debug)]
pub struct SandboxContact {
    pub id: i64,
    pub name: String,
    pub custom_fields_values: Vec<SandboxFieldValue>,
    pub created_at: i64,
}

impl SandboxContact {
    /// The texts of `field`: `PHONE`, `EMAIL`, or an id in digits.
    pub fn field_texts(&self, field: &str) -> Vec<String> {
        texts_of(&self.custom_fields_values, field)
    }
}

/// A note added to a lead; `text` is the `params.text` of a `common` note.
#[derive(Clone, Debug)]
pub struct SandboxNote {
    pub id: i64,
    pub entity_id: i64,
    pub note_type: String,
    pub text: Option<String>,
    pub created_at: i64,
}

/// A 400 `validation-errors` answer of the kind AmoCRM refuses a lead with,
/// `path` naming the field and `detail` the reason: a refusal on demand
/// for `Faults::inject`, the lead not created.
pub fn validation_refusal(path: &str, detail: &str) -> Fault {
    let errors = vec![json!({ "request_id": "0", "errors": [field_error("NotSupportedChoice", path, detail)] })];
    Fault::Status { status: 400, content_type: PROBLEM_JSON, body: validation_body(errors).to_string() }
}

/// Leads, contacts, notes and the account's fields, with their knobs.
pub(super) struct Store {
    pub(super) leads: Vec<SandboxLead>,
    contacts: Vec<SandboxContact>,
    /// Companies are only created and linked: their names.
    companies: Vec<(i64, String)>,
    notes: Vec<SandboxNote>,
    /// Tag names; a tag's id follows from its position.
    tags: Vec<String>,
    lead_fields: Vec<SandboxCustomField>,
    contact_fields: Vec<SandboxCustomField>,
    users: Vec<i64>,
    next_lead_id: i64,
    next_contact_id: i64,
    next_company_id: i64,
    next_note_id: i64,
    next_field_id: i64,
    /// Create requests that created something.
    creates: usize,
    fields_page_size: usize,
    /// Seconds after its creation before `query` finds a lead.
    index_delay_secs: i64,
    ignore_created_at_filter: bool,
}

impl Store {
    pub(super) fn new() -> Store {
        let multitext = |id, name: &str, code: &str| SandboxCustomField {
            id,
            name: name.to_owned(),
            code: Some(code.to_owned()),
            field_type: "multitext".to_owned(),
        };
        Store {
            leads: Vec::new(),
            contacts: Vec::new(),
            companies: Vec::new(),
            notes: Vec::new(),
            tags: Vec::new(),
            lead_fields: AmoSandbox::default_lead_custom_fields(),
            contact_fields: vec![
                multitext(PHONE_FIELD_ID, "Телефон", "PHONE"),
                multitext(EMAIL_FIELD_ID, "Email", "EMAIL"),
            ],
            users: std::iter::once(CURRENT_USER_ID).chain(OTHER_USER_IDS).collect(),
            next_lead_id: FIRST_LEAD_ID,
            next_contact_id: FIRST_CONTACT_ID,
            next_company_id: FIRST_COMPANY_ID,
            next_note_id: FIRST_NOTE_ID,
            next_field_id: FIRST_NEW_FIELD_ID,
            creates: 0,
            fields_page_size: FIELDS_PAGE,
            index_delay_secs: 0,
            ignore_created_at_filter: false,
        }
    }

    /// Stores `lead` under the next id, which it returns.
    pub(super) fn insert_lead(&mut self, mut lead: SandboxLead) -> i64 {
        lead.id = self.next_lead_id;
        self.next_lead_id += 1;
        let id = lead.id;
        self.leads.push(lead);
        id
    }

    /// A tag is the account's from the first lead that carries it on.
    fn remember_tag(&mut self, name: &str) {
        if !self.tags.iter().any(|tag| tag == name) {
            self.tags.push(name.to_owned());
        }
    }

    fn tag_id(&self, name: &str) -> i64 {
        let index = self.tags.iter().position(|tag| tag == name).unwrap_or(0);
        FIRST_TAG_ID + i64::try_from(index).unwrap_or(0)
    }
}

impl AmoSandbox {
    /// Every lead created so far, oldest first.
    pub fn leads(&self) -> Vec<SandboxLead> {
        lock(&self.shared.state).crm.leads.clone()
    }

    /// Every contact created with a lead, oldest first.
    pub fn contacts(&self) -> Vec<SandboxContact> {
        lock(&self.shared.state).crm.contacts.clone()
    }

    pub fn notes(&self) -> Vec<SandboxNote> {
        lock(&self.shared.state).crm.notes.clone()
    }

    /// Create requests (`POST /api/v4/leads` or `/leads/complex`) that were
    /// executed; a refused one (validation, rate limit, fault) is not counted.
    pub fn creates(&self) -> usize {
        lock(&self.shared.state).crm.creates
    }

    /// UTM_SOURCE, UTM_MEDIUM, UTM_CAMPAIGN, UTM_CONTENT and UTM_TERM, ids
    /// 1100001 on, as an account with the UTM integration has them.
    pub fn default_lead_custom_fields() -> Vec<SandboxCustomField> {
        ["UTM_SOURCE", "UTM_MEDIUM", "UTM_CAMPAIGN", "UTM_CONTENT", "UTM_TERM"]
            .iter()
            .zip(1_100_001..)
            .map(|(code, id)| SandboxCustomField {
                id,
                name: code.to_lowercase(),
                code: Some((*code).to_owned()),
                field_type: "tracking_data".to_owned(),
            })
            .collect()
    }

    pub fn lead_custom_fields(&self) -> Vec<SandboxCustomField> {
        lock(&self.shared.state).crm.lead_fields.clone()
    }

    /// Replaces the account's lead custom fields (none: no UTM fields).
    pub fn set_lead_custom_fields(&self, fields: Vec<SandboxCustomField>) {
        lock(&self.shared.state).crm.lead_fields = fields;
    }

    /// Deletes a lead custom field, as an admin would; values already
    /// stored stay. Returns whether it existed.
    pub fn remove_lead_custom_field(&self, id: i64) -> bool {
        let mut state = lock(&self.shared.state);
        let before = state.crm.lead_fields.len();
        state.crm.lead_fields.retain(|field| field.id != id);
        state.crm.lead_fields.len() != before
    }

    /// Custom fields per page of `GET /api/v4/leads/custom_fields` when the
    /// client asks no smaller `limit`; 50 by default and at most. 0 counts as 1.
    pub fn set_custom_fields_page_size(&self, size: usize) {
        lock(&self.shared.state).crm.fields_page_size = size.clamp(1, FIELDS_PAGE);
    }

    /// Users leads can be given to (`responsible_user_id`); others are a
    /// validation error. By default the token's user and two more.
    pub fn set_users(&self, ids: Vec<i64>) {
        lock(&self.shared.state).crm.users = ids;
    }

    /// `query` finds a lead only once the sandbox clock is `delay` past its
    /// creation (AmoCRM's search index lags by an undocumented time).
    pub fn set_query_index_delay(&self, delay: Duration) {
        lock(&self.shared.state).crm.index_delay_secs = secs(delay);
    }

    /// While on, `GET /api/v4/leads` ignores `filter[created_at]`, as
    /// AmoCRM does on accounts its filters do not reach: a client can tell
    /// only by leads outside the window.
    pub fn set_ignore_created_at_filter(&self, on: bool) {
        lock(&self.shared.state).crm.ignore_created_at_filter = on;
    }
}

/// How a create request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// `POST /api/v4/leads`: `_embedded.leads[{id, request_id}]`, contacts
    /// and companies only linked by id.
    Plain,
    /// `POST /api/v4/leads/complex`: a bare array, a new contact and
    /// company allowed with each lead.
    Complex,
}

/// A lead that passed validation, not yet stored.
struct Draft {
    request_id: String,
    lead: SandboxLead,
    contact: Option<Linked<(String, Vec<SandboxFieldValue>)>>,
    company: Option<Linked<String>>,
}

/// An entity embedded in a lead: an existing one, or one to create.
enum Linked<T> {
    Existing(i64),
    New(T),
}

impl Shared {
    /// The lead endpoints' answer, or `None` for a path they do not own.
    pub(super) fn route_leads(&self, request: &RecordedRequest) -> Option<Response> {
        let response = match (request.path.as_str(), request.method.as_str()) {
            ("/api/v4/leads", "GET") => self.authorized(request, Shared::list_leads),
            ("/api/v4/leads", "POST") => self.authorized(request, |shared, r| shared.create_leads(r, Shape::Plain)),
            ("/api/v4/leads/complex", "POST") => {
                self.authorized(request, |shared, r| shared.create_leads(r, Shape::Complex))
            }
            ("/api/v4/leads/custom_fields", "GET") => self.authorized(request, Shared::list_custom_fields),
            ("/api/v4/leads/custom_fields", "POST") => self.authorized(request, Shared::add_custom_fields),
            ("/api/v4/leads/notes", "POST") => self.authorized(request, Shared::add_notes),
            ("/api/v4/leads" | "/api/v4/leads/complex" | "/api/v4/leads/custom_fields" | "/api/v4/leads/notes", _) => {
                respond(405, "", Body::empty())
            }
            _ => return None,
        };
        Some(response)
    }

    /// Either every lead of the batch is created or none is.
    fn create_leads(&self, request: &RecordedRequest, shape: Shape) -> Response {
        let Some(Value::Array(items)) = request.json() else {
            return api_problem(400, "The request body must be a JSON array of leads");
        };
        if items.is_empty() {
            return api_problem(400, "The request body must hold at least one lead");
        }
        if items.len() > MAX_BATCH {
            let detail = "This collection should contain 50 elements or less.";
            return validation_problem(vec![json!({ "request_id": "", "errors": [field_error("Count", "", detail)] })]);
        }
        let mut state = lock(&self.state);
        let mut drafts = Vec::new();
        let mut failures = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let request_id = request_id(item, index);
            match check_lead(&state, item, shape) {
                Ok((lead, contact, company)) => drafts.push(Draft { request_id, lead, contact, company }),
                Err(errors) => failures.push(json!({ "request_id": request_id, "errors": errors })),
            }
        }
        if !failures.is_empty() {
            return validation_problem(failures);
        }
        state.crm.creates += 1;
        let answers: Vec<Value> = drafts.into_iter().map(|draft| self.store(&mut state, draft, shape)).collect();
        match shape {
            Shape::Complex => respond(200, JSON, Value::Array(answers).to_string()),
            Shape::Plain => {
                let body = json!({
                    "_links": { "self": self.link("/api/v4/leads") },
                    "_embedded": { "leads": answers },
                });
                respond(200, HAL_JSON, body.to_string())
            }
        }
    }

    /// Stores a checked lead with what it brings; returns its answer item.
    fn store(&self, state: &mut State, draft: Draft, shape: Shape) -> Value {
        let now = state.now();
        let crm = &mut state.crm;
        let Draft { request_id, mut lead, contact, company } = draft;
        lead.contact_id = contact.map(|contact| match contact {
            Linked::Existing(id) => id,
            Linked::New((name, custom_fields_values)) => {
                let id = crm.next_contact_id;
                crm.next_contact_id += 1;
                crm.contacts.push(SandboxContact { id, name, custom_fields_values, created_at: now });
                id
            }
        });
        lead.company_id = company.map(|company| match company {
            Linked::Existing(id) => id,
            Linked::New(name) => {
                let id = crm.next_company_id;
                crm.next_company_id += 1;
                crm.companies.push((id, name));
                id
            }
        });
        lead.id = crm.next_lead_id;
        crm.next_lead_id += 1;
        lead.created_at = now;
        for tag in &lead.tags {
            crm.remember_tag(tag);
        }
        let answer = match shape {
            Shape::Complex => json!({
                "id": lead.id,
                "contact_id": lead.contact_id,
                "company_id": lead.company_id,
                "request_id": [request_id],
                "merged": false,
            }),
            Shape::Plain => json!({
                "id": lead.id,
                "request_id": request_id,
                "_links": { "self": self.link(&format!("/api/v4/leads/{}", lead.id)) },
            }),
        };
        // A lead created into a stage has no status event: only `lead_added`.
        state.events.lead_added(lead.id, CURRENT_USER_ID, now);
        state.crm.leads.push(lead);
        answer
    }

    fn list_leads(&self, request: &RecordedRequest) -> Response {
        let query = match LeadQuery::parse(request) {
            Ok(query) => query,
            Err(detail) => return api_problem(400, &detail),
        };
        let state = lock(&self.state);
        let now = state.now();
        let crm = &state.crm;
        let window = if crm.ignore_created_at_filter { (None, None) } else { query.created };
        let mut found: Vec<&SandboxLead> = crm
            .leads
            .iter()
            .filter(|lead| query.ids.is_empty() || query.ids.contains(&lead.id))
            .filter(|lead| window.0.is_none_or(|from| lead.created_at >= from))
            .filter(|lead| window.1.is_none_or(|to| lead.created_at <= to))
            .filter(|lead| match &query.text {
                None => true,
                Some(text) => lead.created_at.saturating_add(crm.index_delay_secs) <= now && mentions(lead, text),
            })
            .collect();
        match query.order {
            Some(("created_at", descending)) => {
                found.sort_by_key(|lead| (lead.created_at, lead.id));
                if descending {
                    found.reverse();
                }
            }
            Some((_, true)) => found.sort_by_key(|lead| std::cmp::Reverse(lead.id)),
            _ => found.sort_by_key(|lead| lead.id),
        }
        let start = (query.page - 1).saturating_mul(query.limit);
        let page: Vec<Value> = found
            .iter()
            .skip(start)
            .take(query.limit)
            .map(|lead| self.lead_json(&state, lead, query.contacts))
            .collect();
        if page.is_empty() {
            // AmoCRM answers an empty list with 204 and no body.
            return respond(204, "", Body::empty());
        }
        let mut links = json!({ "self": self.link(&query.page_path(query.page)) });
        if start.saturating_add(query.limit) < found.len() {
            links["next"] = self.link(&query.page_path(query.page + 1));
        }
        let body = json!({ "_page": query.page, "_links": links, "_embedded": { "leads": page } });
        respond(200, HAL_JSON, body.to_string())
    }

    fn lead_json(&self, state: &State, lead: &SandboxLead, with_contacts: bool) -> Value {
        let status_id = lead.status_id.or_else(|| first_status(&state.pipelines, lead.pipeline_id)).unwrap_or(0);
        let tags: Vec<Value> =
            lead.tags.iter().map(|name| json!({ "id": state.crm.tag_id(name), "name": name, "color": null })).collect();
        let companies: Vec<Value> = lead
            .company_id
            .iter()
            .map(|id| json!({ "id": id, "_links": { "self": self.link(&format!("/api/v4/companies/{id}")) } }))
            .collect();
        let mut embedded = json!({ "tags": tags, "companies": companies });
        if with_contacts {
            embedded["contacts"] = lead
                .contact_id
                .iter()
                .map(|id| {
                    json!({
                        "id": id,
                        "is_main": true,
                        "_links": { "self": self.link(&format!("/api/v4/contacts/{id}")) },
                    })
                })
                .collect();
        }
        json!({
            "id": lead.id,
            "name": lead.name,
            "price": lead.price,
            "responsible_user_id": lead.responsible_user_id,
            "group_id": 0,
            "status_id": status_id,
            "pipeline_id": lead.pipeline_id,
            "loss_reason_id": null,
            "created_by": CURRENT_USER_ID,
            "updated_by": CURRENT_USER_ID,
            "created_at": lead.created_at,
            "updated_at": lead.created_at,
            "closed_at": null,
            "closest_task_at": null,
            "is_deleted": false,
            "custom_fields_values": values_json(&lead.custom_fields_values),
            "score": null,
            "account_id": self.config.account_id,
            "labor_cost": null,
            "_links": { "self": self.link(&format!("/api/v4/leads/{}", lead.id)) },
            "_embedded": embedded,
        })
    }

    fn list_custom_fields(&self, request: &RecordedRequest) -> Response {
        let path = "/api/v4/leads/custom_fields";
        let page = match positive(request.query_param("page"), 1) {
            Some(page) => page,
            None => return api_problem(400, "The page parameter must be a positive integer"),
        };
        let state = lock(&self.state);
        let asked = match positive(request.query_param("limit"), FIELDS_PAGE) {
            Some(limit) => limit.min(FIELDS_PAGE),
            None => return api_problem(400, "The limit parameter must be a positive integer"),
        };
        let size = asked.min(state.crm.fields_page_size);
        let all = &state.crm.lead_fields;
        let start = (page - 1).saturating_mul(size);
        if start >= all.len() {
            return respond(204, "", Body::empty());
        }
        let end = start.saturating_add(size).min(all.len());
        let fields: Vec<Value> = all[start..end].iter().map(|field| self.field_json(field)).collect();
        let mut links = json!({ "self": self.link(&format!("{path}?page={page}&limit={size}")) });
        if end < all.len() {
            links["next"] = self.link(&format!("{path}?page={}&limit={size}", page + 1));
        }
        let body = json!({
            "_total_items": fields.len(),
            "_page": page,
            "_links": links,
            "_embedded": { "custom_fields": fields },
        });
        respond(200, HAL_JSON, body.to_string())
    }

    /// All or nothing, like leads; answered as the list is.
    fn add_custom_fields(&self, request: &RecordedRequest) -> Response {
        let Some(Value::Array(items)) = request.json() else {
            return api_problem(400, "The request body must be a JSON array of custom fields");
        };
        if items.is_empty() || items.len() > MAX_BATCH {
            return api_problem(400, "A request creates from 1 to 50 custom fields");
        }
        let mut checked = Vec::new();
        let mut failures = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let name = item.get("name").and_then(Value::as_str).map(str::trim).filter(|name| !name.is_empty());
            let field_type = item.get("type").and_then(Value::as_str).filter(|kind| FIELD_TYPES.contains(kind));
            let code = item.get("code").and_then(Value::as_str).map(str::to_owned);
            let mut errors = Vec::new();
            if name.is_none() {
                errors.push(field_error("NotBlank", "name", "This value should not be blank."));
            }
            if field_type.is_none() {
                errors.push(not_a_choice("type"));
            }
            match (name, field_type) {
                (Some(name), Some(kind)) if errors.is_empty() => checked.push((name.to_owned(), kind.to_owned(), code)),
                _ => failures.push(json!({ "request_id": request_id(item, index), "errors": errors })),
            }
        }
        if !failures.is_empty() {
            return validation_problem(failures);
        }
        let mut state = lock(&self.state);
        let crm = &mut state.crm;
        let mut created = Vec::new();
        for (name, field_type, code) in checked {
            let field = SandboxCustomField { id: crm.next_field_id, name, code, field_type };
            crm.next_field_id += 1;
            crm.lead_fields.push(field.clone());
            created.push(field);
        }
        let fields: Vec<Value> = created.iter().map(|field| self.field_json(field)).collect();
        let body = json!({
            "_total_items": fields.len(),
            "_links": { "self": self.link("/api/v4/leads/custom_fields") },
            "_embedded": { "custom_fields": fields },
        });
        respond(200, HAL_JSON, body.to_string())
    }

    fn field_json(&self, field: &SandboxCustomField) -> Value {
        let predefined = field.field_type == "tracking_data";
        json!({
            "id": field.id,
            "name": field.name,
            "type": field.field_type,
            "account_id": self.config.account_id,
            "code": field.code,
            "sort": 500,
            "is_api_only": false,
            "enums": null,
            "group_id": null,
            "required_statuses": [],
            "is_deletable": !predefined,
            "is_predefined": predefined,
            "entity_type": "leads",
            "remind": null,
            "triggers": [],
            "currency": null,
            "hidden_statuses": [],
            "chained_lists": null,
            "_links": { "self": self.link(&format!("/api/v4/leads/custom_fields/{}", field.id)) },
        })
    }

    /// All or nothing; each note needs an existing lead.
    fn add_notes(&self, request: &RecordedRequest) -> Response {
        let Some(Value::Array(items)) = request.json() else {
            return api_problem(400, "The request body must be a JSON array of notes");
        };
        if items.is_empty() || items.len() > MAX_BATCH {
            return api_problem(400, "A request adds from 1 to 50 notes");
        }
        let mut state = lock(&self.state);
        let mut checked = Vec::new();
        let mut failures = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let mut errors = Vec::new();
            let entity_id = item.get("entity_id").and_then(Value::as_i64);
            if !entity_id.is_some_and(|id| state.crm.leads.iter().any(|lead| lead.id == id)) {
                errors.push(not_a_choice("entity_id"));
            }
            let note_type = item.get("note_type").and_then(Value::as_str).filter(|kind| NOTE_TYPES.contains(kind));
            if note_type.is_none() {
                errors.push(not_a_choice("note_type"));
            }
            let text = item.get("params").and_then(|params| params.get("text")).and_then(Value::as_str);
            if note_type == Some("common") && text.is_none_or(|text| text.trim().is_empty()) {
                errors.push(field_error("NotBlank", "params.text", "This value should not be blank."));
            }
            match (entity_id, note_type) {
                (Some(entity_id), Some(kind)) if errors.is_empty() => {
                    checked.push((request_id(item, index), entity_id, kind.to_owned(), text.map(str::to_owned)));
                }
                _ => failures.push(json!({ "request_id": request_id(item, index), "errors": errors })),
            }
        }
        if !failures.is_empty() {
            return validation_problem(failures);
        }
        let now = state.now();
        let crm = &mut state.crm;
        let mut answers = Vec::new();
        for (request_id, entity_id, note_type, text) in checked {
            let id = crm.next_note_id;
            crm.next_note_id += 1;
            crm.notes.push(SandboxNote { id, entity_id, note_type, text, created_at: now });
            answers.push(json!({
                "id": id,
                "entity_id": entity_id,
                "request_id": request_id,
                "_links": { "self": self.link(&format!("/api/v4/leads/{entity_id}/notes/{id}")) },
            }));
        }
        let body = json!({
            "_links": { "self": self.link("/api/v4/leads/notes") },
            "_embedded": { "notes": answers },
        });
        respond(200, HAL_JSON, body.to_string())
    }
}

/// What `GET /api/v4/leads` was asked.
struct LeadQuery {
    page: usize,
    limit: usize,
    contacts: bool,
    ids: Vec<i64>,
    created: (Option<i64>, Option<i64>),
    text: Option<String>,
    /// The field and whether descending.
    order: Option<(&'static str, bool)>,
    /// The query's other parameters, for the page links.
    kept: Vec<(String, String)>,
}

impl LeadQuery {
    fn parse(request: &RecordedRequest) -> Result<LeadQuery, String> {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(request.query.as_deref().unwrap_or("").as_bytes())
                .map(|(key, value)| (key.into_owned(), value.into_owned()))
                .collect();
        let mut query = LeadQuery {
            page: 1,
            limit: DEFAULT_LIMIT,
            contacts: false,
            ids: Vec::new(),
            created: (None, None),
            text: None,
            order: None,
            kept: Vec::new(),
        };
        let int = |key: &str, value: &str| value.trim().parse::<i64>().map_err(|_| format!("{key} must be an integer"));
        for (key, value) in pairs {
            match key.as_str() {
                "page" => query.page = positive(Some(value), 1).ok_or("page must be a positive integer")?,
                // AmoCRM caps a larger limit rather than refusing it.
                "limit" => {
                    query.limit = positive(Some(value), DEFAULT_LIMIT).ok_or("limit must be a positive integer")?;
                    query.limit = query.limit.min(MAX_LIMIT);
                }
                _ => {
                    match key.as_str() {
                        "with" => query.contacts |= value.split(',').any(|with| with.trim() == "contacts"),
                        "query" => query.text = Some(value.trim().to_owned()).filter(|text| !text.is_empty()),
                        "filter[created_at][from]" => query.created.0 = Some(int(&key, &value)?),
                        "filter[created_at][to]" => query.created.1 = Some(int(&key, &value)?),
                        "order[created_at]" | "order[id]" => {
                            let field = if key == "order[id]" { "id" } else { "created_at" };
                            query.order = Some((field, value.eq_ignore_ascii_case("desc")));
                        }
                        _ if key == "filter[id]" || key.starts_with("filter[id][") => {
                            query.ids.push(int("filter[id]", &value)?);
                        }
                        _ => {}
                    }
                    query.kept.push((key, value));
                }
            }
        }
        Ok(query)
    }

    /// This query's path for page `page`.
    fn page_path(&self, page: usize) -> String {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.extend_pairs(&self.kept);
        form.append_pair("page", &page.to_string());
        form.append_pair("limit", &self.limit.to_string());
        format!("/api/v4/leads?{}", form.finish())
    }
}

/// Whether `text` occurs (in any case) in one of the lead's filled fields.
fn mentions(lead: &SandboxLead, text: &str) -> bool {
    let text = text.to_lowercase();
    let mut filled = vec![lead.name.clone(), lead.id.to_string()];
    if lead.price != 0 {
        filled.push(lead.price.to_string());
    }
    filled.extend(lead.tags.iter().cloned());
    filled.extend(lead.custom_fields_values.iter().flat_map(SandboxFieldValue::texts));
    filled.iter().any(|field| field.to_lowercase().contains(&text))
}

/// A parameter's value as a number from 1 on; `fallback` when absent.
fn positive(value: Option<String>, fallback: usize) -> Option<usize> {
    match value {
        None => Some(fallback),
        Some(text) => text.trim().parse::<usize>().ok().filter(|number| *number >= 1),
    }
}

/// The lowest-sorted ordinary status of a pipeline: where a lead sent
/// without a status lands.
pub(super) fn first_status(pipelines: &[ServedPipeline], pipeline_id: i64) -> Option<i64> {
    let served = pipelines.iter().find(|served| served.pipeline.id == pipeline_id)?;
    served
        .statuses
        .iter()
        .filter(|status| {
            status.status_type != UNSORTED_TYPE && status.id != WON_STATUS_ID && status.id != LOST_STATUS_ID
        })
        .min_by_key(|status| status.sort)
        .map(|status| status.id)
}

/// `null` for none, as AmoCRM reads back an entity without values.
fn values_json(values: &[SandboxFieldValue]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values
        .iter()
        .map(|value| {
            json!({
                "field_id": value.field_id,
                "field_name": value.field_name,
                "field_code": value.field_code,
                "field_type": value.field_type,
                "values": value.values,
            })
        })
        .collect()
}

/// The item's own `request_id`, else its index.
fn request_id(item: &Value, index: usize) -> String {
    match item.get("request_id") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) => number.to_string(),
        _ => index.to_string(),
    }
}

type Checked = (SandboxLead, Option<Linked<(String, Vec<SandboxFieldValue>)>>, Option<Linked<String>>);

/// A lead ready to store (ids and time still 0) with its contact and
/// company, or the item's validation errors.
fn check_lead(state: &State, item: &Value, shape: Shape) -> Result<Checked, Vec<Value>> {
    let Value::Object(fields) = item else {
        return Err(vec![field_error("InvalidType", "", "This value should be of type object.")]);
    };
    let mut errors = Vec::new();
    let name = optional_string(fields.get("name"), "name", &mut errors);
    let price = match fields.get("price") {
        None | Some(Value::Null) => 0,
        Some(price) => match price.as_i64() {
            Some(price) if price >= 0 => price,
            Some(_) => {
                errors.push(field_error("GreaterThanOrEqual", "price", "This value should be 0 or more."));
                0
            }
            None => {
                errors.push(field_error("InvalidType", "price", "This value should be of type int."));
                0
            }
        },
    };
    let pipeline_id = optional_int(fields.get("pipeline_id"), "pipeline_id", &mut errors);
    let status_id = optional_int(fields.get("status_id"), "status_id", &mut errors);
    let responsible = optional_int(fields.get("responsible_user_id"), "responsible_user_id", &mut errors);
    if responsible.is_some_and(|user| !state.crm.users.contains(&user)) {
        errors.push(not_a_choice("responsible_user_id"));
    }
    let values = check_values(&state.crm.lead_fields, fields.get("custom_fields_values"), "custom_fields_values");
    let custom_fields_values = values.unwrap_or_else(|mut found| {
        errors.append(&mut found);
        Vec::new()
    });
    let mut tags = tag_names(fields.get("tags_to_add"), "tags_to_add", &mut errors);
    let embedded = fields.get("_embedded").and_then(Value::as_object);
    tags.extend(tag_names(embedded.and_then(|embedded| embedded.get("tags")), "_embedded.tags", &mut errors));
    let contact = embedded_contact(state, embedded, shape, &mut errors);
    let company = embedded_company(state, embedded, shape, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let pipeline_id = place_lead(&state.pipelines, pipeline_id, status_id).map_err(|path| vec![not_a_choice(path)])?;
    let lead = SandboxLead {
        id: 0,
        name,
        pipeline_id,
        status_id,
        price,
        responsible_user_id: responsible.unwrap_or(CURRENT_USER_ID),
        custom_fields_values,
        tags,
        contact_id: None,
        company_id: None,
        created_at: 0,
    };
    Ok((lead, contact, company))
}

/// The one contact of `_embedded.contacts`: an id links an existing
/// contact; without one `/leads/complex` creates it from `name` (or
/// `first_name` and `last_name`) and its values.
fn embedded_contact(
    state: &State,
    embedded: Option<&Map<String, Value>>,
    shape: Shape,
    errors: &mut Vec<Value>,
) -> Option<Linked<(String, Vec<SandboxFieldValue>)>> {
    let contact = single(embedded, "contacts", errors)?;
    let path = "_embedded.contacts.0";
    if let Some(id) = contact.get("id") {
        let known = id.as_i64().filter(|id| state.crm.contacts.iter().any(|contact| contact.id == *id));
        if known.is_none() {
            errors.push(not_a_choice(&format!("{path}.id")));
        }
        return known.map(Linked::Existing);
    }
    if shape == Shape::Plain {
        errors.push(field_error("NotBlank", &format!("{path}.id"), "This value should not be blank."));
        return None;
    }
    let mut name = optional_string(contact.get("name"), &format!("{path}.name"), errors);
    if name.is_empty() {
        let parts = ["first_name", "last_name"].map(|key| contact.get(key).and_then(Value::as_str).unwrap_or(""));
        name = parts.iter().filter(|part| !part.is_empty()).copied().collect::<Vec<_>>().join(" ");
    }
    let values = check_values(&state.crm.contact_fields, contact.get("custom_fields_values"), path);
    match values {
        Ok(values) => Some(Linked::New((name, values))),
        Err(mut found) => {
            errors.append(&mut found);
            None
        }
    }
}

fn embedded_company(
    state: &State,
    embedded: Option<&Map<String, Value>>,
    shape: Shape,
    errors: &mut Vec<Value>,
) -> Option<Linked<String>> {
    let company = single(embedded, "companies", errors)?;
    let path = "_embedded.companies.0";
    if let Some(id) = company.get("id") {
        let known = id.as_i64().filter(|id| state.crm.companies.iter().any(|(known, _)| known == id));
        if known.is_none() {
            errors.push(not_a_choice(&format!("{path}.id")));
        }
        return known.map(Linked::Existing);
    }
    if shape == Shape::Plain {
        errors.push(field_error("NotBlank", &format!("{path}.id"), "This value should not be blank."));
        return None;
    }
    Some(Linked::New(optional_string(company.get("name"), &format!("{path}.name"), errors)))
}

/// The only object of `_embedded.<key>`; more than one is refused.
fn single<'a>(embedded: Option<&'a Map<String, Value>>, key: &str, errors: &mut Vec<Value>) -> Option<&'a Value> {
    let path = format!("_embedded.{key}");
    match embedded?.get(key)? {
        Value::Null => None,
        Value::Array(items) if items.len() > 1 => {
            let detail = "This collection should contain 1 element or less.";
            errors.push(field_error("Count", &path, detail));
            None
        }
        Value::Array(items) => match items.first() {
            Some(item @ Value::Object(_)) => Some(item),
            Some(_) => {
                errors.push(field_error("InvalidType", &format!("{path}.0"), "This value should be of type object."));
                None
            }
            None => None,
        },
        _ => {
            errors.push(field_error("InvalidType", &path, "This value should be of type array."));
            None
        }
    }
}

/// The names of `[{"name"}]`; an item without a name is refused.
fn tag_names(value: Option<&Value>, path: &str, errors: &mut Vec<Value>) -> Vec<String> {
    let items = match value {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(items)) => items,
        Some(_) => {
            errors.push(field_error("InvalidType", path, "This value should be of type array."));
            return Vec::new();
        }
    };
    let mut names = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match item.get("name").and_then(Value::as_str).map(str::trim).filter(|name| !name.is_empty()) {
            Some(name) => names.push(name.to_owned()),
            None => {
                errors.push(field_error("NotBlank", &format!("{path}.{index}.name"), "This value should not be blank."))
            }
        }
    }
    names
}

/// `custom_fields_values` checked against the entity's fields: each item
/// names a field by `field_id` or `field_code` and has values, each with a
/// scalar `value`, an `enum_id` or an `enum_code`.
fn check_values(
    fields: &[SandboxCustomField],
    value: Option<&Value>,
    path: &str,
) -> Result<Vec<SandboxFieldValue>, Vec<Value>> {
    let path = if path == "custom_fields_values" { path.to_owned() } else { format!("{path}.custom_fields_values") };
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(vec![field_error("InvalidType", &path, "This value should be of type array.")]),
    };
    if items.len() > MAX_FIELD_VALUES {
        return Err(vec![field_error("Count", &path, "This collection should contain 40 elements or less.")]);
    }
    let mut errors = Vec::new();
    let mut stored = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let at = format!("{path}.{index}");
        let field = match (item.get("field_id"), item.get("field_code")) {
            (Some(id), _) => {
                let field = id.as_i64().and_then(|id| fields.iter().find(|field| field.id == id));
                field.ok_or_else(|| not_a_choice(&format!("{at}.field_id")))
            }
            (None, Some(code)) => {
                let field =
                    code.as_str().and_then(|code| fields.iter().find(|field| field.code.as_deref() == Some(code)));
                field.ok_or_else(|| not_a_choice(&format!("{at}.field_code")))
            }
            (None, None) => Err(field_error("NotBlank", &format!("{at}.field_id"), "This value should not be blank.")),
        };
        let field = match field {
            Ok(field) => field,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        match check_field_values(field, item.get("values"), &format!("{at}.values")) {
            Ok(values) => stored.push(SandboxFieldValue {
                field_id: field.id,
                field_code: field.code.clone(),
                field_name: field.name.clone(),
                field_type: field.field_type.clone(),
                values,
            }),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() { Ok(stored) } else { Err(errors) }
}

fn check_field_values(field: &SandboxCustomField, values: Option<&Value>, path: &str) -> Result<Vec<Value>, Value> {
    let Some(Value::Array(values)) = values else {
        return Err(field_error("InvalidType", path, "This value should be of type array."));
    };
    if values.is_empty() {
        return Err(field_error("NotBlank", path, "This value should not be blank."));
    }
    let enums: &[&str] = match field.code.as_deref() {
        Some("PHONE") => &PHONE_ENUMS,
        Some("EMAIL") => &EMAIL_ENUMS,
        _ => &[],
    };
    let mut stored = Vec::new();
    for (index, value) in values.iter().enumerate() {
        let at = format!("{path}.{index}");
        let Value::Object(value) = value else {
            return Err(field_error("InvalidType", &at, "This value should be of type object."));
        };
        let mut kept = Map::new();
        match value.get("value") {
            None | Some(Value::Null) => {}
            Some(scalar @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => {
                kept.insert("value".to_owned(), scalar.clone());
            }
            Some(_) => return Err(field_error("InvalidType", &format!("{at}.value"), "This value should be scalar.")),
        }
        if let Some(code) = value.get("enum_code") {
            match code.as_str() {
                Some(code) if enums.is_empty() || enums.contains(&code) => {
                    kept.insert("enum_code".to_owned(), json!(code));
                }
                _ => return Err(not_a_choice(&format!("{at}.enum_code"))),
            }
        } else if !enums.is_empty() {
            // A multitext value sent without an enum is filed under WORK.
            kept.insert("enum_code".to_owned(), json!("WORK"));
        }
        if let Some(id) = value.get("enum_id") {
            match id.as_i64() {
                Some(id) => {
                    kept.insert("enum_id".to_owned(), json!(id));
                }
                None => {
                    return Err(field_error(
                        "InvalidType",
                        &format!("{at}.enum_id"),
                        "This value should be of type int.",
                    ));
                }
            }
        }
        if !kept.contains_key("value") && !kept.contains_key("enum_id") {
            return Err(field_error("NotBlank", &format!("{at}.value"), "This value should not be blank."));
        }
        stored.push(Value::Object(kept));
    }
    Ok(stored)
}

/// The pipeline a lead lands in, or the path of the field that is not a
/// valid choice. Without a pipeline id the status decides, then the main
/// pipeline; a lead cannot be created into the unsorted status.
fn place_lead(
    pipelines: &[ServedPipeline],
    pipeline_id: Option<i64>,
    status_id: Option<i64>,
) -> Result<i64, &'static str> {
    let holds = |served: &ServedPipeline, id: i64| {
        served.statuses.iter().any(|status| status.id == id && status.status_type != UNSORTED_TYPE)
    };
    let main = || pipelines.iter().find(|p| p.pipeline.is_main).or_else(|| pipelines.first());
    let pipeline = match (pipeline_id, status_id) {
        (Some(id), _) => pipelines.iter().find(|p| p.pipeline.id == id).ok_or("pipeline_id")?,
        (None, Some(status)) if status != WON_STATUS_ID && status != LOST_STATUS_ID => {
            pipelines.iter().find(|p| holds(p, status)).ok_or("status_id")?
        }
        (None, _) => main().ok_or("pipeline_id")?,
    };
    match status_id {
        Some(status) if !holds(pipeline, status) => Err("status_id"),
        _ => Ok(pipeline.pipeline.id),
    }
}

fn optional_int(value: Option<&Value>, path: &str, errors: &mut Vec<Value>) -> Option<i64> {
    match value {
        None | Some(Value::Null) => None,
        Some(value) => {
            let id = value.as_i64();
            if id.is_none() {
                errors.push(field_error("InvalidType", path, "This value should be of type int."));
            }
            id
        }
    }
}

fn optional_string(value: Option<&Value>, path: &str, errors: &mut Vec<Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(_) => {
            errors.push(field_error("InvalidType", path, "This value should be of type string."));
            String::new()
        }
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn not_a_choice(path: &str) -> Value {
    field_error("NotSupportedChoice", path, "The value you selected is not a valid choice.")
}

fn field_error(code: &str, path: &str, detail: &str) -> Value {
    json!({ "code": code, "path": path, "detail": detail })
}

fn validation_body(failures: Vec<Value>) -> Value {
    json!({
        "validation-errors": failures,
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "Request validation failed",
    })
}

fn validation_problem(failures: Vec<Value>) -> Response {
    respond(400, PROBLEM_JSON, validation_body(failures).to_string())
}
