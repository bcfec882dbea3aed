//! Bitrix24 stage history, one store per entity type (1 leads, 2 deals):
//! `crm.stagehistory.list` with `order`, a filter of `>`, `>=`, `<`, `<=`,
//! `@`, `!@`, `!=` on its columns, `select` and pages of 50 (`start: -1`
//! without counting), alone or inside a `batch`; and the test hooks that
//! move leads and deals. Record ids grow per store but may have holes and
//! may commit out of order: a reserved id stays invisible until its record
//! is committed, after records with higher ids were already listed. A knob
//! makes the portal refuse `CREATED_TIME` filters, as some do.

use serde_json::{Map, Value, json};

use super::leads::listed;
use super::{B24Sandbox, Failure, Outcome, State, as_int, as_text, lock, paginate, portal_date};
use crate::hook::HookError;
use filter::{allowed, conditions, invalid, value_of};

mod filter;

/// `TYPE_ID`: created, moved to an intermediate stage, to a final one, or
/// to another pipeline.
const CREATED: i64 = 1;
const TO_INTERMEDIATE: i64 = 2;
const TO_FINAL: i64 = 3;
const TO_PIPELINE: i64 = 5;

/// The entity types with a stage history in the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryEntity {
    Lead,
    Deal,
}

impl HistoryEntity {
    /// Its `entityTypeId`.
    pub fn type_id(self) -> i64 {
        match self {
            HistoryEntity::Lead => 1,
            HistoryEntity::Deal => 2,
        }
    }

    fn of(type_id: i64) -> Option<HistoryEntity> {
        match type_id {
            1 => Some(HistoryEntity::Lead),
            2 => Some(HistoryEntity::Deal),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            HistoryEntity::Lead => "lead",
            HistoryEntity::Deal => "deal",
        }
    }

    /// The columns its records have and its filter and order take.
    fn columns(self) -> &'static [&'static str] {
        match self {
            HistoryEntity::Lead => &["ID", "TYPE_ID", "OWNER_ID", "CREATED_TIME", "STATUS_SEMANTIC_ID", "STATUS_ID"],
            HistoryEntity::Deal => {
                &["ID", "TYPE_ID", "OWNER_ID", "CREATED_TIME", "CATEGORY_ID", "STAGE_SEMANTIC_ID", "STAGE_ID"]
            }
        }
    }
}

/// One stage-history record as stored; `created_time` in unix seconds,
/// `category_id` only for deals, `semantic_id` `P`, `S` or `F`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct B24HistoryRecord {
    pub id: i64,
    pub type_id: i64,
    pub owner_id: i64,
    pub created_time: i64,
    pub category_id: Option<i32>,
    pub stage_id: String,
    pub semantic_id: String,
}

/// A lead's or deal's move, for [`B24Sandbox::apply_stage_change`] and
/// [`B24Sandbox::commit_stage_change`]; dated now unless `at` says otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageChange {
    entity: HistoryEntity,
    owner_id: i64,
    /// Set only for a move to another pipeline.
    category_id: Option<i32>,
    stage_id: String,
    created_time: Option<i64>,
}

impl StageChange {
    /// A lead to another status of the portal's lead statuses.
    pub fn lead(id: i64, status_id: &str) -> StageChange {
        StageChange::new(HistoryEntity::Lead, id, None, status_id)
    }

    /// A deal to another stage of its pipeline.
    pub fn deal(id: i64, stage_id: &str) -> StageChange {
        StageChange::new(HistoryEntity::Deal, id, None, stage_id)
    }

    /// A deal into `stage_id` of another pipeline.
    pub fn deal_to_category(id: i64, category_id: i32, stage_id: &str) -> StageChange {
        StageChange::new(HistoryEntity::Deal, id, Some(category_id), stage_id)
    }

    /// The record's `CREATED_TIME`, unix seconds.
    pub fn at(mut self, created_time: i64) -> StageChange {
        self.created_time = Some(created_time);
        self
    }

    fn new(entity: HistoryEntity, owner_id: i64, category_id: Option<i32>, stage_id: &str) -> StageChange {
        StageChange { entity, owner_id, category_id, stage_id: stage_id.to_owned(), created_time: None }
    }
}

/// A record id taken before its record is written, as a transaction still
/// open holds it: see [`B24Sandbox::reserve_history_id`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation never committed leaves a hole in the ids"]
pub struct HistoryReservation {
    entity: HistoryEntity,
    id: i64,
    created_time: i64,
}

impl HistoryReservation {
    pub fn id(&self) -> i64 {
        self.id
    }
}

/// Both entity types' records and the knobs of the list method.
#[derive(Debug, Default)]
pub(super) struct Store {
    leads: Stream,
    deals: Stream,
    refuse_created_time: bool,
    numbers_as_strings: bool,
}

/// One entity type's records in commit order, and the last id handed out.
#[derive(Debug, Default)]
struct Stream {
    records: Vec<B24HistoryRecord>,
    last_id: i64,
}

impl Stream {
    fn next_id(&mut self) -> i64 {
        self.last_id = self.last_id.saturating_add(1);
        self.last_id
    }
}

impl Store {
    fn stream(&mut self, entity: HistoryEntity) -> &mut Stream {
        match entity {
            HistoryEntity::Lead => &mut self.leads,
            HistoryEntity::Deal => &mut self.deals,
        }
    }

    fn records(&self, entity: HistoryEntity) -> &[B24HistoryRecord] {
        match entity {
            HistoryEntity::Lead => &self.leads.records,
            HistoryEntity::Deal => &self.deals.records,
        }
    }
}

/// The `TYPE_ID` 1 record of a lead or deal just created at `now`.
pub(super) fn record_created(
    state: &mut State,
    entity: HistoryEntity,
    owner_id: i64,
    category_id: Option<i32>,
    stage_id: &str,
    now: f64,
) {
    let semantic_id = semantic(state, entity, category_id, stage_id);
    let stream = state.history.stream(entity);
    let id = stream.next_id();
    stream.records.push(B24HistoryRecord {
        id,
        type_id: CREATED,
        owner_id,
        created_time: now.floor() as i64,
        category_id,
        stage_id: stage_id.to_owned(),
        semantic_id,
    });
}

/// `S` or `F` for a stage with those semantics, else `P`.
fn semantic(state: &State, entity: HistoryEntity, category_id: Option<i32>, stage_id: &str) -> String {
    let stages = match entity {
        HistoryEntity::Lead => Some(&state.lead_statuses),
        HistoryEntity::Deal => state.category(i64::from(category_id.unwrap_or(0))).map(|category| &category.stages),
    };
    let stage = stages.and_then(|stages| stages.iter().find(|stage| stage.status_id == stage_id));
    match stage.and_then(|stage| stage.semantics.as_deref()) {
        Some("S") => "S".to_owned(),
        Some("F") => "F".to_owned(),
        _ => "P".to_owned(),
    }
}

/// Moves the entity as `change` says and writes its record under `id`, or
/// the next id when `None`; `created_time` unless the change is dated.
fn apply(state: &mut State, change: StageChange, id: Option<i64>, created_time: i64) -> Result<i64, HookError> {
    let StageChange { entity, owner_id, category_id: target, stage_id, created_time: dated } = change;
    let unknown_stage = |place: String| HookError::UnknownStage { stage: stage_id.clone(), place };
    let (category_id, type_id) = match entity {
        HistoryEntity::Lead => {
            if !state.crm.leads.iter().any(|lead| lead.id == owner_id) {
                return Err(HookError::UnknownEntity { kind: "lead", id: owner_id });
            }
            if !state.lead_statuses.iter().any(|status| status.status_id == stage_id) {
                return Err(unknown_stage("the lead statuses".to_owned()));
            }
            (None, None)
        }
        HistoryEntity::Deal => {
            let deal = state.crm.deals.iter().find(|deal| deal.id == owner_id);
            let current = deal.ok_or(HookError::UnknownEntity { kind: "deal", id: owner_id })?.category_id;
            let category_id = target.unwrap_or(current);
            if target == Some(current) {
                return Err(HookError::SamePipeline { kind: "deal", id: owner_id, pipeline: i64::from(current) });
            }
            let category =
                state.category(i64::from(category_id)).ok_or(HookError::UnknownPipeline(category_id.into()))?;
            if !category.stages.iter().any(|stage| stage.status_id == stage_id) {
                return Err(unknown_stage(format!("pipeline {category_id}")));
            }
            (Some(category_id), target.map(|_| TO_PIPELINE))
        }
    };
    let semantic_id = semantic(state, entity, category_id, &stage_id);
    let type_id = type_id.unwrap_or(if semantic_id == "P" { TO_INTERMEDIATE } else { TO_FINAL });
    match entity {
        HistoryEntity::Lead => {
            if let Some(lead) = state.crm.leads.iter_mut().find(|lead| lead.id == owner_id) {
                lead.fields.insert("STATUS_ID".to_owned(), json!(stage_id));
            }
        }
        HistoryEntity::Deal => {
            if let Some(deal) = state.crm.deals.iter_mut().find(|deal| deal.id == owner_id) {
                let category = category_id.unwrap_or(deal.category_id);
                deal.category_id = category;
                deal.fields.insert("CATEGORY_ID".to_owned(), json!(category));
                deal.fields.insert("STAGE_ID".to_owned(), json!(stage_id));
            }
        }
    }
    let stream = state.history.stream(entity);
    let id = id.unwrap_or_else(|| stream.next_id());
    let created_time = dated.unwrap_or(created_time);
    stream.records.push(B24HistoryRecord { id, type_id, owner_id, created_time, category_id, stage_id, semantic_id });
    Ok(id)
}

impl B24Sandbox {
    /// Moves a lead to another status now, as a user would: a `TYPE_ID` 2
    /// record, or 3 for a final status (semantics `S` or `F`). Returns the
    /// record's id.
    pub fn move_lead(&self, id: i64, status_id: &str) -> Result<i64, HookError> {
        self.apply_stage_change(StageChange::lead(id, status_id))
    }

    /// Moves a deal to another stage of its pipeline now: `TYPE_ID` 2, or
    /// 3 for a final stage. `B24Deal::stage_id` keeps what was sent at
    /// creation; its `fields` and `category_id` follow the move.
    pub fn move_deal(&self, id: i64, stage_id: &str) -> Result<i64, HookError> {
        self.apply_stage_change(StageChange::deal(id, stage_id))
    }

    /// Moves a deal into `stage_id` of another pipeline now: `TYPE_ID` 5.
    pub fn move_deal_to_category(&self, id: i64, category_id: i32, stage_id: &str) -> Result<i64, HookError> {
        self.apply_stage_change(StageChange::deal_to_category(id, category_id, stage_id))
    }

    /// Any move, dated as `change` says, written under the next id and
    /// listed at once. Refused, with nothing changed, for an unknown entity
    /// or stage, or a "pipeline change" into the deal's own pipeline.
    pub fn apply_stage_change(&self, change: StageChange) -> Result<i64, HookError> {
        let mut state = lock(&self.shared.state);
        let now = state.now().floor() as i64;
        apply(&mut state, change, None, now)
    }

    /// Takes the next record id of `entity`'s history now, as a transaction
    /// that has not committed yet: moves made meanwhile get higher ids and
    /// are listed at once, while nothing is listed under this id until
    /// [`B24Sandbox::commit_stage_change`]. A reservation never committed
    /// is a hole in the ids.
    pub fn reserve_history_id(&self, entity: HistoryEntity) -> HistoryReservation {
        let mut state = lock(&self.shared.state);
        let created_time = state.now().floor() as i64;
        let id = state.history.stream(entity).next_id();
        HistoryReservation { entity, id, created_time }
    }

    /// Commits the move of a reservation: the record gets the reserved id
    /// and, unless `change` is dated, the time of the reservation, and is
    /// listed from now on. A refused change leaves the id a hole.
    pub fn commit_stage_change(&self, reservation: HistoryReservation, change: StageChange) -> Result<i64, HookError> {
        if reservation.entity != change.entity {
            let (reserved, changed) = (reservation.entity.name(), change.entity.name());
            return Err(HookError::ReservationMismatch { reserved, changed });
        }
        let mut state = lock(&self.shared.state);
        apply(&mut state, change, Some(reservation.id), reservation.created_time)
    }

    /// Skips `count` ids of `entity`'s history, as records deleted or
    /// replicated elsewhere leave them.
    pub fn leave_history_id_gap(&self, entity: HistoryEntity, count: u32) {
        let mut state = lock(&self.shared.state);
        let stream = state.history.stream(entity);
        stream.last_id = stream.last_id.saturating_add(i64::from(count));
    }

    /// Every committed record of `entity`'s history, by id.
    pub fn stage_history(&self, entity: HistoryEntity) -> Vec<B24HistoryRecord> {
        let mut records = lock(&self.shared.state).history.records(entity).to_vec();
        records.sort_by_key(|record| record.id);
        records
    }

    /// While on, `crm.stagehistory.list` refuses any `CREATED_TIME` filter
    /// with `INVALID_ARG_VALUE`, as portals do that do not allow it.
    pub fn refuse_created_time_filter(&self, on: bool) {
        lock(&self.shared.state).history.refuse_created_time = on;
    }

    /// While on, `crm.stagehistory.list` writes `ID`, `TYPE_ID`,
    /// `OWNER_ID` and `CATEGORY_ID` as strings. The vendor documents
    /// integers, but Bitrix24 numbers have been seen both ways.
    pub fn set_history_numbers_as_strings(&self, on: bool) {
        lock(&self.shared.state).history.numbers_as_strings = on;
    }
}

pub(super) fn is_known(method: &str) -> bool {
    method == "crm.stagehistory.list"
}

/// `crm.stagehistory.list`: `{"items": [...]}` in the list envelope.
pub(super) fn run(state: &State, params: &Map<String, Value>) -> Outcome {
    let type_id = params.get("entityTypeId").and_then(as_int).unwrap_or(0);
    let Some(entity) = HistoryEntity::of(type_id) else {
        let description = format!("Entity type {type_id} is not supported");
        return Err(Failure::new(400, "ENTITY_TYPE_NOT_SUPPORTED", &description));
    };
    let conditions = conditions(state, entity, params.get("filter"))?;
    let mut records: Vec<&B24HistoryRecord> =
        state.history.records(entity).iter().filter(|record| conditions.iter().all(|c| c.holds(record))).collect();
    records.sort_by_key(|record| record.id);
    if let Some(Value::Object(order)) = params.get("order") {
        for (field, direction) in order.iter().rev() {
            let column = allowed(entity, field)
                .ok_or_else(|| invalid(&format!("Invalid order: field '{field}' is not allowed in order")))?;
            let direction = as_text(direction).unwrap_or_default().to_ascii_uppercase();
            if direction != "ASC" && direction != "DESC" {
                let text = format!(
                    "Invalid order: allowed sort directions are ASC, DESC. But got '{direction}' for field '{field}'"
                );
                return Err(invalid(&text));
            }
            records.sort_by(|a, b| {
                let ordering = value_of(a, column).cmp(&value_of(b, column));
                if direction == "DESC" { ordering.reverse() } else { ordering }
            });
        }
    }
    let selected: Vec<&'static str> = {
        let asked: Vec<String> =
            params.get("select").map(|s| listed(s).iter().filter_map(as_text).collect()).unwrap_or_default();
        let all = asked.is_empty() || asked.iter().any(|name| name == "*");
        entity.columns().iter().copied().filter(|column| all || asked.iter().any(|name| name == column)).collect()
    };
    let strings = state.history.numbers_as_strings;
    let rows = records.into_iter().map(|record| record_json(record, &selected, strings)).collect();
    let mut page = paginate(state, rows, params);
    page.result = json!({ "items": page.result });
    Ok(page)
}

/// A record's selected columns; numbers as the vendor documents them
/// (integers) unless `strings`.
fn record_json(record: &B24HistoryRecord, selected: &[&str], strings: bool) -> Value {
    let number = |value: i64| if strings { json!(value.to_string()) } else { json!(value) };
    let mut row = Map::new();
    for column in selected {
        let value = match *column {
            "ID" => number(record.id),
            "TYPE_ID" => number(record.type_id),
            "OWNER_ID" => number(record.owner_id),
            "CREATED_TIME" => json!(portal_date(record.created_time as f64)),
            "CATEGORY_ID" => number(i64::from(record.category_id.unwrap_or(0))),
            "STAGE_SEMANTIC_ID" | "STATUS_SEMANTIC_ID" => json!(record.semantic_id),
            _ => json!(record.stage_id),
        };
        row.insert((*column).to_owned(), value);
    }
    Value::Object(row)
}
