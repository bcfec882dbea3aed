//! Bitrix24 leads, deals and contacts: `crm.{lead,deal,contact}.add`
//! storing the fields the entity has (unknown names dropped silently,
//! deals without phone or email), `crm.{lead,deal,contact}.list` with
//! column filters, `select`, `order` and pages of 50 (ids as strings), the
//! portal's CRM mode (`crm.settings.mode.get`; no leads in simple mode),
//! and the `$result[…]` references between the commands of a `batch`. A
//! new lead or deal starts its stage history (`history`).

use std::collections::VecDeque;

use serde_json::{Map, Value, json};

use super::{
    B24Sandbox, B24SandboxConfig, Failure, Outcome, State, Success, as_int, as_text, history, lock, method_name,
    paginate, portal_date,
};

const FIRST_LEAD_ID: i64 = 1;
const FIRST_DEAL_ID: i64 = 1;
const FIRST_CONTACT_ID: i64 = 1;
/// The classic CRM, with leads; 2 is the simple CRM, without.
const CLASSIC_MODE: u8 = 1;
const SIMPLE_MODE: u8 = 2;

const UTM_FIELDS: [&str; 5] = ["UTM_SOURCE", "UTM_MEDIUM", "UTM_CAMPAIGN", "UTM_CONTENT", "UTM_TERM"];
/// Fields every entity has besides its own and `UF_CRM_*`.
const COMMON_FIELDS: [&str; 9] = [
    "COMMENTS",
    "SOURCE_ID",
    "SOURCE_DESCRIPTION",
    "ASSIGNED_BY_ID",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
    "OPENED",
    "COMPANY_ID",
    "CURRENCY_ID",
];
const LEAD_FIELDS: [&str; 13] = [
    "TITLE",
    "NAME",
    "LAST_NAME",
    "SECOND_NAME",
    "PHONE",
    "EMAIL",
    "OPPORTUNITY",
    "STATUS_ID",
    "STATUS_DESCRIPTION",
    "POST",
    "CONTACT_ID",
    "CONTACT_IDS",
    "COMPANY_TITLE",
];
/// A deal has no `PHONE` or `EMAIL`: those live on its contacts.
const DEAL_FIELDS: [&str; 9] = [
    "TITLE",
    "OPPORTUNITY",
    "CATEGORY_ID",
    "STAGE_ID",
    "CONTACT_ID",
    "CONTACT_IDS",
    "TYPE_ID",
    "BEGINDATE",
    "CLOSEDATE",
];
const CONTACT_FIELDS: [&str; 7] = ["NAME", "LAST_NAME", "SECOND_NAME", "PHONE", "EMAIL", "POST", "TYPE_ID"];
/// The fields a list shows unasked (besides `ID` and `DATE_CREATE`), as
/// `null` when empty; multi-fields and user fields only when selected.
const LEAD_COLUMNS: [&str; 13] = [
    "TITLE",
    "NAME",
    "LAST_NAME",
    "STATUS_ID",
    "OPPORTUNITY",
    "CURRENCY_ID",
    "SOURCE_ID",
    "SOURCE_DESCRIPTION",
    "COMMENTS",
    "ASSIGNED_BY_ID",
    "CONTACT_ID",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
];
const DEAL_COLUMNS: [&str; 12] = [
    "TITLE",
    "CATEGORY_ID",
    "STAGE_ID",
    "OPPORTUNITY",
    "CURRENCY_ID",
    "SOURCE_ID",
    "SOURCE_DESCRIPTION",
    "COMMENTS",
    "ASSIGNED_BY_ID",
    "CONTACT_ID",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
];
const CONTACT_COLUMNS: [&str; 10] = [
    "NAME",
    "LAST_NAME",
    "SOURCE_ID",
    "SOURCE_DESCRIPTION",
    "COMMENTS",
    "ASSIGNED_BY_ID",
    "HAS_PHONE",
    "HAS_EMAIL",
    "ORIGINATOR_ID",
    "ORIGIN_ID",
];

/// A deal created through `crm.deal.add`. `stage_id` is as sent; `fields`
/// holds every field stored, as a list reads them back (`STAGE_ID` and
/// `CATEGORY_ID` there are where the deal landed).
#[derive(Clone, Debug)]
pub struct B24Deal {
    pub id: i64,
    pub title: String,
    pub category_id: i32,
    pub stage_id: Option<String>,
    pub contact_ids: Vec<i64>,
    pub fields: Map<String, Value>,
}

/// A lead created through `crm.lead.add`; `fields` as for [`B24Deal`].
#[derive(Clone, Debug)]
pub struct B24Lead {
    pub id: i64,
    pub title: String,
    pub fields: Map<String, Value>,
}

/// A contact created through `crm.contact.add`.
#[derive(Clone, Debug)]
pub struct B24Contact {
    pub id: i64,
    pub fields: Map<String, Value>,
}

/// A stored field as text: a scalar as it is, `PHONE` or `EMAIL` as the
/// first `VALUE`.
fn field_text(fields: &Map<String, Value>, name: &str) -> Option<String> {
    match fields.get(name)? {
        Value::Array(items) => items.first().and_then(|item| item.get("VALUE")).and_then(as_text),
        value => as_text(value),
    }
}

impl B24Deal {
    pub fn text(&self, field: &str) -> Option<String> {
        field_text(&self.fields, field)
    }
}

impl B24Lead {
    pub fn text(&self, field: &str) -> Option<String> {
        field_text(&self.fields, field)
    }
}

impl B24Contact {
    pub fn text(&self, field: &str) -> Option<String> {
        field_text(&self.fields, field)
    }
}

/// The three entity kinds the sandbox stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Entity {
    Lead,
    Deal,
    Contact,
}

impl Entity {
    fn of(method: &str) -> Option<(Entity, &str)> {
        let (entity, action) = method.strip_prefix("crm.")?.split_once('.')?;
        let entity = match entity {
            "lead" => Entity::Lead,
            "deal" => Entity::Deal,
            "contact" => Entity::Contact,
            _ => return None,
        };
        matches!(action, "add" | "list").then_some((entity, action))
    }

    fn accepts(self, field: &str) -> bool {
        let own: &[&str] = match self {
            Entity::Lead => &LEAD_FIELDS,
            Entity::Deal => &DEAL_FIELDS,
            Entity::Contact => &CONTACT_FIELDS,
        };
        own.contains(&field) || COMMON_FIELDS.contains(&field) || UTM_FIELDS.contains(&field) || is_user_field(field)
    }

    fn columns(self) -> Vec<&'static str> {
        let own: &[&'static str] = match self {
            Entity::Lead => &LEAD_COLUMNS,
            Entity::Deal => &DEAL_COLUMNS,
            Entity::Contact => &CONTACT_COLUMNS,
        };
        let mut columns = vec!["ID"];
        columns.extend(own);
        columns.extend(UTM_FIELDS);
        columns.push("DATE_CREATE");
        columns
    }
}

/// The sandbox takes any user field of the `UF_CRM_` form as the portal's.
fn is_user_field(field: &str) -> bool {
    field.len() > "UF_CRM_".len() && field.starts_with("UF_CRM_")
}

/// A stored entity: its id, when it was made (sandbox clock) and fields.
#[derive(Clone, Debug)]
struct Row {
    id: i64,
    created: f64,
    fields: Map<String, Value>,
}

/// Leads, deals and contacts, with their knobs.
pub(super) struct Store {
    pub(super) deals: Vec<B24Deal>,
    pub(super) leads: Vec<B24Lead>,
    pub(super) contacts: Vec<B24Contact>,
    /// Every entity's creation time by kind and id.
    created: Vec<(Entity, i64, f64)>,
    next_deal_id: i64,
    next_lead_id: i64,
    next_contact_id: i64,
    /// Ids of `PHONE` and `EMAIL` values, counted across entities.
    next_multifield_id: i64,
    mode: u8,
    /// Calls executed by `crm.*.add`, in a batch or not.
    creates: usize,
    /// Method → refusals still to give.
    refusals: VecDeque<(String, Failure)>,
    ignore_list_filters: bool,
}

impl Store {
    pub(super) fn new() -> Store {
        Store {
            deals: Vec::new(),
            leads: Vec::new(),
            contacts: Vec::new(),
            created: Vec::new(),
            next_deal_id: FIRST_DEAL_ID,
            next_lead_id: FIRST_LEAD_ID,
            next_contact_id: FIRST_CONTACT_ID,
            next_multifield_id: 1,
            mode: CLASSIC_MODE,
            creates: 0,
            refusals: VecDeque::new(),
            ignore_list_filters: false,
        }
    }

    /// The next refusal queued for `method`, if any.
    pub(super) fn take_refusal(&mut self, method: &str) -> Option<Failure> {
        let index = self.refusals.iter().position(|(refused, _)| refused == method)?;
        self.refusals.remove(index).map(|(_, failure)| failure)
    }

    pub(super) fn created_at(&self, entity: Entity, id: i64) -> f64 {
        self.created.iter().find(|(kind, known, _)| *kind == entity && *known == id).map_or(0.0, |(_, _, at)| *at)
    }

    fn rows(&self, entity: Entity) -> Vec<Row> {
        let row = |id: i64, fields: &Map<String, Value>| Row {
            id,
            created: self.created_at(entity, id),
            fields: fields.clone(),
        };
        match entity {
            Entity::Lead => self.leads.iter().map(|lead| row(lead.id, &lead.fields)).collect(),
            Entity::Deal => self.deals.iter().map(|deal| row(deal.id, &deal.fields)).collect(),
            Entity::Contact => self.contacts.iter().map(|contact| row(contact.id, &contact.fields)).collect(),
        }
    }
}

impl B24Sandbox {
    /// Every deal created so far, oldest first.
    pub fn deals(&self) -> Vec<B24Deal> {
        lock(&self.shared.state).crm.deals.clone()
    }

    /// Every lead created so far, oldest first.
    pub fn leads(&self) -> Vec<B24Lead> {
        lock(&self.shared.state).crm.leads.clone()
    }

    /// Every contact created so far, oldest first.
    pub fn contacts(&self) -> Vec<B24Contact> {
        lock(&self.shared.state).crm.contacts.clone()
    }

    /// `crm.lead.add`, `crm.deal.add` and `crm.contact.add` calls that
    /// created something, alone or inside a `batch`.
    pub fn creates(&self) -> usize {
        lock(&self.shared.state).crm.creates
    }

    /// What `crm.settings.mode.get` answers: 1 the classic CRM (the
    /// default), 2 the simple CRM, where `crm.lead.add` fails.
    pub fn set_crm_mode(&self, mode: u8) {
        lock(&self.shared.state).crm.mode = mode;
    }

    /// The next `times` calls of `method` (any case, `.json` suffix or
    /// not), alone or as a `batch` command, fail with HTTP `status` and
    /// `{"error": error, "error_description": description}` without
    /// running: a field refusal on demand (`400` and `""`), say. Inside a
    /// batch the failure is that command's `result_error`.
    pub fn refuse_calls(&self, method: &str, times: usize, status: u16, error: &str, description: &str) {
        let mut state = lock(&self.shared.state);
        let method = method_name(method);
        for _ in 0..times {
            state.crm.refusals.push_back((method.clone(), Failure::new(status, error, description)));
        }
    }

    /// While on, the list methods of leads, deals and contacts ignore
    /// `filter` and list everything: a filter the portal does not apply,
    /// which a client can tell only by the rows that do not match it.
    pub fn set_ignore_list_filters(&self, on: bool) {
        lock(&self.shared.state).crm.ignore_list_filters = on;
    }

    /// The path of `method` on this portal (`/rest/{user_id}/{code}/{method}`),
    /// for faults meant for one method: `faults().inject_for("POST", &path, …)`.
    pub fn method_path(&self, method: &str) -> String {
        format!("/rest/{}/{}/{method}", self.shared.config.user_id, self.shared.config.code)
    }
}

pub(super) fn is_known(method: &str) -> bool {
    method == "crm.settings.mode.get" || Entity::of(method).is_some()
}

pub(super) fn run(state: &mut State, method: &str, params: &Map<String, Value>, config: &B24SandboxConfig) -> Outcome {
    if method == "crm.settings.mode.get" {
        return Ok(Success::single(json!(state.crm.mode)));
    }
    match Entity::of(method) {
        Some((entity, "add")) => add(state, entity, params, config),
        Some((entity, _)) => list(state, entity, params),
        None => Err(Failure::method_not_found()),
    }
}

fn add(state: &mut State, entity: Entity, params: &Map<String, Value>, config: &B24SandboxConfig) -> Outcome {
    if entity == Entity::Lead && state.crm.mode == SIMPLE_MODE {
        return Err(Failure::new(400, "", "Leads are not available in the simple CRM mode"));
    }
    let sent = match params.get("fields") {
        Some(Value::Object(fields)) => fields,
        _ => return Err(Failure::new(400, "", "Parameter 'fields' must be array.")),
    };
    let mut fields = Map::new();
    for (name, value) in sent {
        if !entity.accepts(name) || value.is_null() {
            continue;
        }
        let value = match name.as_str() {
            "PHONE" | "EMAIL" => multi_field(&mut state.crm.next_multifield_id, name, value),
            "CONTACT_IDS" => json!(existing_contacts(state, value)),
            _ => value.clone(),
        };
        fields.insert(name.clone(), value);
    }
    let id = insert(state, entity, fields, config)?;
    state.crm.creates += 1;
    Ok(Success::single(json!(id)))
}

/// Stores an entity from fields it accepts: its contacts linked, its
/// responsible user, title and place (a deal's category and stage, a lead's
/// status) settled; a lead or deal starts its stage history. Returns its id.
pub(super) fn insert(
    state: &mut State,
    entity: Entity,
    mut fields: Map<String, Value>,
    config: &B24SandboxConfig,
) -> Result<i64, Failure> {
    if let Some(contact) = fields.remove("CONTACT_ID") {
        let mut ids = existing_contacts(state, &contact);
        let more = fields.get("CONTACT_IDS").map(|more| listed(more).iter().filter_map(as_int).collect::<Vec<_>>());
        for id in more.unwrap_or_default() {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        fields.insert("CONTACT_IDS".to_owned(), json!(ids));
    }
    let assigned = fields.get("ASSIGNED_BY_ID").and_then(as_int).unwrap_or(i64::from(config.user_id));
    fields.insert("ASSIGNED_BY_ID".to_owned(), json!(assigned));
    let now = state.now();
    let id = match entity {
        Entity::Deal => {
            let (category_id, stage) = place_deal(state, &fields)?;
            let sent_stage = fields.get("STAGE_ID").and_then(as_text).filter(|stage| !stage.is_empty());
            let crm = &mut state.crm;
            let id = crm.next_deal_id;
            crm.next_deal_id += 1;
            let title = title(&fields, || format!("Сделка #{id}"));
            fields.insert("TITLE".to_owned(), json!(title));
            fields.insert("CATEGORY_ID".to_owned(), json!(category_id));
            fields.insert("STAGE_ID".to_owned(), json!(stage));
            let contact_ids = contact_ids(&fields);
            crm.deals.push(B24Deal { id, title, category_id, stage_id: sent_stage, contact_ids, fields });
            history::record_created(state, history::HistoryEntity::Deal, id, Some(category_id), &stage, now);
            id
        }
        Entity::Lead => {
            let status = fields.get("STATUS_ID").and_then(as_text).filter(|status| !status.is_empty());
            let status = match status {
                None => "NEW".to_owned(),
                Some(status) if state.lead_statuses.iter().any(|known| known.status_id == status) => status,
                Some(status) => return Err(Failure::new(400, "", &format!("Unknown lead status \"{status}\""))),
            };
            let crm = &mut state.crm;
            let id = crm.next_lead_id;
            crm.next_lead_id += 1;
            let title = title(&fields, || format!("Лид #{id}"));
            fields.insert("TITLE".to_owned(), json!(title));
            fields.insert("STATUS_ID".to_owned(), json!(status));
            crm.leads.push(B24Lead { id, title, fields });
            history::record_created(state, history::HistoryEntity::Lead, id, None, &status, now);
            id
        }
        Entity::Contact => {
            let crm = &mut state.crm;
            let id = crm.next_contact_id;
            crm.next_contact_id += 1;
            crm.contacts.push(B24Contact { id, fields });
            id
        }
    };
    state.crm.created.push((entity, id, now));
    Ok(id)
}

/// The category and stage a deal lands in: `CATEGORY_ID` (0 when absent),
/// `STAGE_ID` one of its stages (its first when absent); a stage alone
/// picks its category. Anything unknown is a 400 with an empty code.
fn place_deal(state: &State, fields: &Map<String, Value>) -> Result<(i32, String), Failure> {
    let stage = fields.get("STAGE_ID").and_then(as_text).filter(|stage| !stage.trim().is_empty());
    let category = match fields.get("CATEGORY_ID") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if text.trim().is_empty() => None,
        Some(value) => {
            let known = as_int(value).and_then(|id| state.category(id));
            Some(known.ok_or_else(|| Failure::new(400, "", "Category not found"))?)
        }
    };
    let category = match (category, &stage) {
        (Some(category), _) => category,
        (None, Some(stage)) => state
            .categories
            .iter()
            .find(|category| category.stages.iter().any(|known| known.status_id == *stage))
            .ok_or_else(|| Failure::new(400, "", &format!("Stage \"{stage}\" not found")))?,
        (None, None) => state.category(0).ok_or_else(|| Failure::new(400, "", "Category not found"))?,
    };
    let stage = match stage {
        Some(stage) if category.stages.iter().any(|known| known.status_id == stage) => stage,
        Some(stage) => {
            let description = format!("Stage \"{stage}\" is not a stage of category {}", category.id);
            return Err(Failure::new(400, "", &description));
        }
        None => {
            let first = category.stages.iter().min_by_key(|stage| stage.sort);
            first.map(|stage| stage.status_id.clone()).unwrap_or_default()
        }
    };
    Ok((category.id, stage))
}

/// `PHONE` / `EMAIL` as a list of `{ID, VALUE_TYPE, VALUE, TYPE_ID}`: from
/// a list or a form's `{"0": …}`; values without a `VALUE` are dropped and
/// `VALUE_TYPE` is `WORK` unless given.
fn multi_field(next_id: &mut i64, name: &str, value: &Value) -> Value {
    let items: Vec<Value> = listed(value)
        .into_iter()
        .filter_map(|item| {
            let text = item.get("VALUE").and_then(as_text).filter(|text| !text.trim().is_empty())?;
            let kind = item.get("VALUE_TYPE").and_then(as_text).filter(|kind| !kind.is_empty());
            let id = *next_id;
            *next_id += 1;
            Some(json!({
                "ID": id.to_string(),
                "VALUE_TYPE": kind.unwrap_or_else(|| "WORK".to_owned()),
                "VALUE": text,
                "TYPE_ID": name,
            }))
        })
        .collect();
    Value::Array(items)
}

/// A list, a form's `{"0": …, "1": …}` in key order, or one scalar.
pub(super) fn listed(value: &Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items.clone(),
        Value::Object(entries) => {
            let mut keyed: Vec<(i64, Value)> =
                entries.iter().filter_map(|(key, item)| Some((key.parse().ok()?, item.clone()))).collect();
            keyed.sort_by_key(|(key, _)| *key);
            keyed.into_iter().map(|(_, item)| item).collect()
        }
        Value::Null => Vec::new(),
        scalar => vec![scalar.clone()],
    }
}

/// The ids among `value` of contacts that exist; others are dropped.
fn existing_contacts(state: &State, value: &Value) -> Vec<i64> {
    let mut ids: Vec<i64> = Vec::new();
    for id in listed(value).iter().filter_map(as_int) {
        if state.crm.contacts.iter().any(|contact| contact.id == id) && !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

fn contact_ids(fields: &Map<String, Value>) -> Vec<i64> {
    fields.get("CONTACT_IDS").map(|ids| listed(ids).iter().filter_map(as_int).collect()).unwrap_or_default()
}

/// Bitrix24 names an untitled item after its id.
fn title(fields: &Map<String, Value>, untitled: impl FnOnce() -> String) -> String {
    fields.get("TITLE").and_then(as_text).filter(|title| !title.trim().is_empty()).unwrap_or_else(untitled)
}

/// Rows matching `filter`, in `order` (by `ID` ascending unless asked),
/// a page of them, each cut to `select`.
fn list(state: &State, entity: Entity, params: &Map<String, Value>) -> Outcome {
    let filter = if state.crm.ignore_list_filters { None } else { params.get("filter") };
    let mut rows: Vec<Map<String, Value>> = state
        .crm
        .rows(entity)
        .into_iter()
        .map(|row| full_row(entity, row))
        .filter(|row| matches_filter(row, filter))
        .collect();
    if let Some(Value::Object(order)) = params.get("order") {
        for (field, direction) in order.iter().rev() {
            let descending = as_text(direction).is_some_and(|direction| direction.eq_ignore_ascii_case("desc"));
            rows.sort_by(|a, b| {
                let ordering = compare(a.get(field), b.get(field));
                if descending { ordering.reverse() } else { ordering }
            });
        }
    }
    let columns = selected(entity, params.get("select"));
    let rows = rows.into_iter().map(|row| Value::Object(project(&row, &columns))).collect();
    Ok(paginate(state, rows, params))
}

/// Every field of a row as a list gives it: numbers and ids as strings,
/// `OPPORTUNITY` with two decimals, `CONTACT_ID` the first contact.
fn full_row(entity: Entity, row: Row) -> Map<String, Value> {
    let mut full = Map::new();
    full.insert("ID".to_owned(), json!(row.id.to_string()));
    for (name, value) in row.fields {
        let value = match (name.as_str(), value) {
            ("PHONE" | "EMAIL", value) => value,
            ("CONTACT_IDS", ids) => {
                let first = listed(&ids).first().and_then(as_int);
                if entity != Entity::Contact {
                    full.insert("CONTACT_ID".to_owned(), json!(first.map(|id| id.to_string())));
                }
                continue;
            }
            ("OPPORTUNITY", value) => {
                let amount = as_text(&value).and_then(|text| text.trim().parse::<f64>().ok()).unwrap_or(0.0);
                json!(format!("{amount:.2}"))
            }
            (_, Value::Array(items)) => Value::Array(items),
            (_, value) => as_text(&value).map_or(Value::Null, Value::String),
        };
        full.insert(name, value);
    }
    if entity == Entity::Contact {
        for (multi, flag) in [("PHONE", "HAS_PHONE"), ("EMAIL", "HAS_EMAIL")] {
            let has = full.get(multi).and_then(Value::as_array).is_some_and(|items| !items.is_empty());
            full.insert(flag.to_owned(), json!(if has { "Y" } else { "N" }));
        }
    }
    full.insert("DATE_CREATE".to_owned(), json!(portal_date(row.created)));
    full
}

/// The columns `select` asks for: `*` (or nothing) the standard ones,
/// `UF_*` every user field, and names as given; `ID` always.
fn selected(entity: Entity, select: Option<&Value>) -> Selection {
    let asked: Vec<String> =
        select.map(|select| listed(select).iter().filter_map(as_text).collect()).unwrap_or_default();
    let mut columns: Vec<String> = Vec::new();
    let mut user_fields = false;
    let standard = asked.is_empty() || asked.iter().any(|name| name == "*");
    if standard {
        columns.extend(entity.columns().into_iter().map(str::to_owned));
    }
    for name in asked {
        match name.as_str() {
            "*" => {}
            "UF_*" => user_fields = true,
            _ if !columns.contains(&name) => columns.push(name),
            _ => {}
        }
    }
    if !columns.iter().any(|name| name == "ID") {
        columns.insert(0, "ID".to_owned());
    }
    Selection { columns, user_fields }
}

struct Selection {
    columns: Vec<String>,
    user_fields: bool,
}

/// The selected columns of a row, `null` for those it lacks.
fn project(row: &Map<String, Value>, selection: &Selection) -> Map<String, Value> {
    let mut projected = Map::new();
    for column in &selection.columns {
        projected.insert(column.clone(), row.get(column).cloned().unwrap_or(Value::Null));
    }
    if selection.user_fields {
        for (name, value) in row.iter().filter(|(name, _)| is_user_field(name)) {
            projected.insert(name.clone(), value.clone());
        }
    }
    projected
}

/// Whether a row passes every condition of a column filter. A key may
/// carry an operator (`=`, `!`/`!=`, `>`, `>=`, `<`, `<=`, `%` for
/// "contains", `@` / `!@` for "in" / "not in"); a list of values means any
/// of them. A field the row lacks is empty.
pub(super) fn matches_filter(row: &Map<String, Value>, filter: Option<&Value>) -> bool {
    let Some(Value::Object(filter)) = filter else {
        return true;
    };
    filter.iter().all(|(key, wanted)| {
        let (operator, field) = split_operator(key);
        let actual = row.get(field).and_then(as_text).unwrap_or_default();
        let options: Vec<String> = listed(wanted).iter().filter_map(as_text).collect();
        let hit = |option: &String| match operator {
            ">" | ">=" | "<" | "<=" => {
                let ordering = compare_text(&actual, option);
                match operator {
                    ">" => ordering.is_gt(),
                    ">=" => ordering.is_ge(),
                    "<" => ordering.is_lt(),
                    _ => ordering.is_le(),
                }
            }
            "%" => actual.to_lowercase().contains(&option.to_lowercase()),
            _ => actual == *option,
        };
        let any = options.iter().any(hit);
        if matches!(operator, "!" | "!=" | "!@") { !any } else { any }
    })
}

pub(super) fn split_operator(key: &str) -> (&str, &str) {
    for operator in ["!@", ">=", "<=", "!=", "=", "!", ">", "<", "%", "@"] {
        if let Some(field) = key.strip_prefix(operator) {
            return (operator, field);
        }
    }
    ("", key)
}

/// Two fields' values in order; a missing one is empty.
fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    let text = |value: Option<&Value>| value.and_then(as_text).unwrap_or_default();
    compare_text(&text(a), &text(b))
}

/// Numbers by value, anything else as text.
fn compare_text(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
        (Ok(a), Ok(b)) => a.total_cmp(&b),
        _ => a.cmp(b),
    }
}

/// Replaces `$result[key]` (and `$result[key][field]…`, `$result_total[key]`,
/// `$result_next[key]`) in a batch command's parameters with what earlier
/// commands answered. A value that is one whole reference takes the
/// referenced value (a list or object stays one); a reference inside a
/// longer value is replaced by its text. A reference to a command that has
/// not answered (failed, or not run) becomes empty.
pub(super) fn resolve_references(
    params: &mut Map<String, Value>,
    results: &[(String, Value)],
    totals: &[(String, Value)],
    nexts: &[(String, Value)],
) {
    let lookup = |source: &str, path: &[String]| -> Option<Value> {
        let answers = match source {
            "result" => results,
            "result_total" => totals,
            "result_next" => nexts,
            _ => return None,
        };
        let (key, rest) = path.split_first()?;
        let mut value = answers.iter().find(|(answered, _)| answered == key).map(|(_, value)| value)?;
        for step in rest {
            value = match value {
                Value::Object(fields) => fields.get(step)?,
                Value::Array(items) => items.get(step.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(value.clone())
    };
    for value in params.values_mut() {
        substitute(value, &lookup);
    }
}

fn substitute(value: &mut Value, lookup: &dyn Fn(&str, &[String]) -> Option<Value>) {
    match value {
        Value::Object(fields) => fields.values_mut().for_each(|value| substitute(value, lookup)),
        Value::Array(items) => items.iter_mut().for_each(|value| substitute(value, lookup)),
        Value::String(text) if text.contains('$') => {
            let references = find_references(text);
            if let [(0, end, source, path)] = references.as_slice()
                && *end == text.len()
            {
                let found = lookup(source, path).unwrap_or_else(|| json!(""));
                *value = match found {
                    found @ (Value::Array(_) | Value::Object(_)) => found,
                    scalar => json!(as_text(&scalar).unwrap_or_default()),
                };
                return;
            }
            let mut replaced = String::new();
            let mut at = 0;
            for (start, end, source, path) in references {
                replaced.push_str(&text[at..start]);
                replaced.push_str(&lookup(&source, &path).as_ref().and_then(as_text).unwrap_or_default());
                at = end;
            }
            replaced.push_str(&text[at..]);
            *text = replaced;
        }
        _ => {}
    }
}

/// The references in `text`: (start, end, source, path) for each
/// `$result[a][b]…`, `$result_total[a]` or `$result_next[a]`.
fn find_references(text: &str) -> Vec<(usize, usize, String, Vec<String>)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = text[from..].find('$') {
        let start = from + offset;
        let rest = &text[start + 1..];
        let source = ["result_total", "result_next", "result"]
            .into_iter()
            .find(|source| rest.strip_prefix(source).is_some_and(|after| after.starts_with('[')));
        let Some(source) = source else {
            from = start + 1;
            continue;
        };
        let mut end = start + 1 + source.len();
        let mut path = Vec::new();
        while let Some(inner) = text[end..].strip_prefix('[') {
            let Some(close) = inner.find(']') else {
                break;
            };
            path.push(inner[..close].to_owned());
            end += close + 2;
        }
        if path.is_empty() {
            from = start + 1;
            continue;
        }
        found.push((start, end, source.to_owned(), path));
        from = end;
    }
    found
}
