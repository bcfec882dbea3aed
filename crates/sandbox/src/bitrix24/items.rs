//! The newer universal list method over the same leads, deals and contacts,
//! `crm.item.list` (`entityTypeId` 1, 2 or 3): camelCase fields, numbers
//! as JSON integers (unlike `crm.lead.list`'s strings), a filter on its
//! fields with `@` for "in", pages of 50; and the hooks for entities that
//! change outside the API under test: created elsewhere, or given to
//! another user.

use serde_json::{Map, Value, json};

use super::history::HistoryEntity;
use super::leads::{Entity, insert, listed, matches_filter, split_operator};
use super::{B24Sandbox, Failure, Outcome, State, as_int, as_text, lock, paginate, portal_date};
use crate::hook::HookError;

/// The fields each entity type lists, `id` first.
const LEAD_FIELDS: [&str; 6] = ["id", "title", "stageId", "assignedById", "opportunity", "createdTime"];
const DEAL_FIELDS: [&str; 7] = ["id", "title", "categoryId", "stageId", "assignedById", "opportunity", "createdTime"];
const CONTACT_FIELDS: [&str; 5] = ["id", "name", "lastName", "assignedById", "createdTime"];

pub(super) fn is_known(method: &str) -> bool {
    method == "crm.item.list"
}

/// `{"items": [...]}` in the list envelope, with `total` and `next`.
pub(super) fn run(state: &State, params: &Map<String, Value>) -> Outcome {
    let (entity, fields): (Entity, &[&'static str]) = match params.get("entityTypeId").and_then(as_int) {
        Some(1) => (Entity::Lead, &LEAD_FIELDS),
        Some(2) => (Entity::Deal, &DEAL_FIELDS),
        Some(3) => (Entity::Contact, &CONTACT_FIELDS),
        _ => return Err(Failure::new(400, "NOT_FOUND", "Smart process not found")),
    };
    let known = |name: &str| fields.iter().copied().find(|field| field.eq_ignore_ascii_case(name));
    let mut filter = Map::new();
    if let Some(Value::Object(asked)) = params.get("filter") {
        for (key, wanted) in asked {
            let (operator, name) = split_operator(key);
            let field = known(name).ok_or_else(|| {
                Failure::new(
                    400,
                    "INVALID_ARG_VALUE",
                    &format!("Invalid filter: field '{name}' is not allowed in filter"),
                )
            })?;
            filter.insert(format!("{operator}{field}"), wanted.clone());
        }
    }
    let filter = Value::Object(filter);
    let mut rows: Vec<Map<String, Value>> =
        item_rows(state, entity).into_iter().filter(|row| matches_filter(row, Some(&filter))).collect();
    if let Some(Value::Object(order)) = params.get("order") {
        for (name, direction) in order.iter().rev() {
            let Some(field) = known(name) else {
                let text = format!("Invalid order: field '{name}' is not allowed in order");
                return Err(Failure::new(400, "INVALID_ARG_VALUE", &text));
            };
            let descending = as_text(direction).is_some_and(|direction| direction.eq_ignore_ascii_case("desc"));
            rows.sort_by(|a, b| {
                let (a, b) = (a.get(field).and_then(as_int), b.get(field).and_then(as_int));
                if descending { b.cmp(&a) } else { a.cmp(&b) }
            });
        }
    }
    let asked: Vec<String> =
        params.get("select").map(|select| listed(select).iter().filter_map(as_text).collect()).unwrap_or_default();
    let all = asked.is_empty() || asked.iter().any(|name| name == "*");
    let selected: Vec<&str> = fields
        .iter()
        .copied()
        .filter(|field| all || *field == "id" || asked.iter().any(|name| name.eq_ignore_ascii_case(field)))
        .collect();
    let rows = rows
        .into_iter()
        .map(|row| {
            Value::Object(
                selected.iter().map(|f| ((*f).to_owned(), row.get(*f).cloned().unwrap_or(Value::Null))).collect(),
            )
        })
        .collect();
    let mut page = paginate(state, rows, params);
    page.result = json!({ "items": page.result });
    Ok(page)
}

/// Every entity of a kind as `crm.item.list` shows it, by id.
fn item_rows(state: &State, entity: Entity) -> Vec<Map<String, Value>> {
    let crm = &state.crm;
    let stored: Vec<(i64, &Map<String, Value>)> = match entity {
        Entity::Lead => crm.leads.iter().map(|lead| (lead.id, &lead.fields)).collect(),
        Entity::Deal => crm.deals.iter().map(|deal| (deal.id, &deal.fields)).collect(),
        Entity::Contact => crm.contacts.iter().map(|contact| (contact.id, &contact.fields)).collect(),
    };
    stored
        .into_iter()
        .map(|(id, fields)| {
            let text = |name: &str| fields.get(name).and_then(as_text).map_or(Value::Null, Value::String);
            let int = |name: &str| fields.get(name).and_then(as_int).map_or(Value::Null, |number| json!(number));
            let mut row = Map::new();
            row.insert("id".to_owned(), json!(id));
            row.insert("assignedById".to_owned(), int("ASSIGNED_BY_ID"));
            row.insert("createdTime".to_owned(), json!(portal_date(crm.created_at(entity, id))));
            match entity {
                Entity::Contact => {
                    row.insert("name".to_owned(), text("NAME"));
                    row.insert("lastName".to_owned(), text("LAST_NAME"));
                }
                Entity::Lead | Entity::Deal => {
                    row.insert("title".to_owned(), text("TITLE"));
                    let stage = if entity == Entity::Lead { "STATUS_ID" } else { "STAGE_ID" };
                    row.insert("stageId".to_owned(), text(stage));
                    let amount =
                        fields.get("OPPORTUNITY").and_then(as_text).and_then(|text| text.trim().parse::<f64>().ok());
                    row.insert("opportunity".to_owned(), json!(amount.unwrap_or(0.0)));
                    if entity == Entity::Deal {
                        row.insert("categoryId".to_owned(), int("CATEGORY_ID"));
                    }
                }
            }
            row
        })
        .collect()
}

impl B24Sandbox {
    /// A lead created outside the API under test (a web form, a user of
    /// the portal) in `status_id`, given to `assigned_by_id`: it starts its
    /// stage history like any lead but is not counted in `creates`.
    pub fn create_lead(&self, status_id: &str, assigned_by_id: i64) -> Result<i64, HookError> {
        let mut state = lock(&self.shared.state);
        if !state.lead_statuses.iter().any(|status| status.status_id == status_id) {
            return Err(HookError::UnknownStage { stage: status_id.to_owned(), place: "the lead statuses".to_owned() });
        }
        let fields = object(json!({ "STATUS_ID": status_id, "ASSIGNED_BY_ID": assigned_by_id }));
        self.insert_directly(&mut state, Entity::Lead, fields, status_id)
    }

    /// A deal created outside the API under test in `stage_id` of
    /// `category_id`; as [`B24Sandbox::create_lead`].
    pub fn create_deal(&self, category_id: i32, stage_id: &str, assigned_by_id: i64) -> Result<i64, HookError> {
        let mut state = lock(&self.shared.state);
        let category = state.category(i64::from(category_id)).ok_or(HookError::UnknownPipeline(category_id.into()))?;
        if !category.stages.iter().any(|stage| stage.status_id == stage_id) {
            let place = format!("pipeline {category_id}");
            return Err(HookError::UnknownStage { stage: stage_id.to_owned(), place });
        }
        let fields =
            object(json!({ "CATEGORY_ID": category_id, "STAGE_ID": stage_id, "ASSIGNED_BY_ID": assigned_by_id }));
        self.insert_directly(&mut state, Entity::Deal, fields, stage_id)
    }

    fn insert_directly(
        &self,
        state: &mut State,
        entity: Entity,
        fields: Map<String, Value>,
        stage: &str,
    ) -> Result<i64, HookError> {
        insert(state, entity, fields, &self.shared.config)
            .map_err(|failure| HookError::UnknownStage { stage: stage.to_owned(), place: failure.description })
    }

    /// Gives a lead or deal to another user, as a manager would; lists and
    /// `crm.item.list` show it from now on. Stage history does not record it.
    pub fn set_assigned_by_id(&self, entity: HistoryEntity, id: i64, user_id: i64) -> Result<(), HookError> {
        let mut state = lock(&self.shared.state);
        let crm = &mut state.crm;
        let fields = match entity {
            HistoryEntity::Lead => crm.leads.iter_mut().find(|lead| lead.id == id).map(|lead| &mut lead.fields),
            HistoryEntity::Deal => crm.deals.iter_mut().find(|deal| deal.id == id).map(|deal| &mut deal.fields),
        };
        let kind = if entity == HistoryEntity::Lead { "lead" } else { "deal" };
        let fields = fields.ok_or(HookError::UnknownEntity { kind, id })?;
        fields.insert("ASSIGNED_BY_ID".to_owned(), json!(user_id));
        Ok(())
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(fields) => fields,
        _ => Map::new(),
    }
}
