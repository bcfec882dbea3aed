//! What `crm.stagehistory.list` makes of its `filter` and `order`: the
//! columns an entity type's records take, conditions with their operators,
//! dates as Bitrix24 reads them, and the `INVALID_ARG_VALUE` refusals of
//! anything else (or of `CREATED_TIME` on a portal that refuses it).

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone};
use serde_json::Value;

use super::super::leads::{listed, split_operator};
use super::super::{Failure, PORTAL_UTC_OFFSET_SECS, State, as_int, as_text};
use super::{B24HistoryRecord, HistoryEntity};

pub(super) fn invalid(description: &str) -> Failure {
    Failure::new(400, "INVALID_ARG_VALUE", description)
}

/// The column `field` names, if `entity`'s records have it.
pub(super) fn allowed(entity: HistoryEntity, field: &str) -> Option<&'static str> {
    entity.columns().iter().copied().find(|column| column.eq_ignore_ascii_case(field))
}

/// A column's value in comparable form: numbers (and times, as unix
/// seconds) by value, text as text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Cell {
    Number(i64),
    Text(String),
}

pub(super) fn value_of(record: &B24HistoryRecord, column: &str) -> Cell {
    match column {
        "ID" => Cell::Number(record.id),
        "TYPE_ID" => Cell::Number(record.type_id),
        "OWNER_ID" => Cell::Number(record.owner_id),
        "CREATED_TIME" => Cell::Number(record.created_time),
        "CATEGORY_ID" => Cell::Number(i64::from(record.category_id.unwrap_or(0))),
        "STAGE_SEMANTIC_ID" | "STATUS_SEMANTIC_ID" => Cell::Text(record.semantic_id.clone()),
        _ => Cell::Text(record.stage_id.clone()),
    }
}

/// One filter condition: an operator on a column against its values.
pub(super) struct Condition {
    operator: String,
    column: &'static str,
    values: Vec<Cell>,
}

impl Condition {
    pub(super) fn holds(&self, record: &B24HistoryRecord) -> bool {
        let actual = value_of(record, self.column);
        let any = |test: &dyn Fn(&Cell) -> bool| self.values.iter().any(test);
        match self.operator.as_str() {
            ">" => any(&|wanted| actual > *wanted),
            ">=" => any(&|wanted| actual >= *wanted),
            "<" => any(&|wanted| actual < *wanted),
            "<=" => any(&|wanted| actual <= *wanted),
            "!" | "!=" | "!@" => !any(&|wanted| actual == *wanted),
            "%" => any(&|wanted| matches!((&actual, wanted), (Cell::Text(a), Cell::Text(w)) if a.contains(w.as_str()))),
            _ => any(&|wanted| actual == *wanted),
        }
    }
}

/// The filter as conditions, or the portal's refusal of a column it does
/// not filter on (or, when refusing it, `CREATED_TIME`) or a value it
/// cannot read.
pub(super) fn conditions(
    state: &State,
    entity: HistoryEntity,
    filter: Option<&Value>,
) -> Result<Vec<Condition>, Failure> {
    let Some(Value::Object(filter)) = filter else {
        return Ok(Vec::new());
    };
    let mut conditions = Vec::new();
    for (key, wanted) in filter {
        let (operator, field) = split_operator(key);
        let not_allowed = || invalid(&format!("Invalid filter: field '{field}' is not allowed in filter"));
        let column = allowed(entity, field).ok_or_else(not_allowed)?;
        if column == "CREATED_TIME" && state.history.refuse_created_time {
            return Err(not_allowed());
        }
        let mut values = Vec::new();
        for value in listed(wanted) {
            let cell = match column {
                "CREATED_TIME" => as_text(&value).as_deref().and_then(parse_time).map(Cell::Number),
                "ID" | "TYPE_ID" | "OWNER_ID" | "CATEGORY_ID" => as_int(&value).map(Cell::Number),
                _ => as_text(&value).map(Cell::Text),
            };
            values.push(cell.ok_or_else(|| invalid(&format!("Invalid filter: field '{field}' has invalid value")))?);
        }
        conditions.push(Condition { operator: operator.to_owned(), column, values });
    }
    Ok(conditions)
}

/// A date as Bitrix24 reads one in a filter: ISO 8601 with an offset, or
/// without one (and `dd.mm.yyyy`) in the portal's time; unix seconds.
fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(moment) = DateTime::parse_from_rfc3339(text) {
        return Some(moment.timestamp());
    }
    let portal = FixedOffset::east_opt(PORTAL_UTC_OFFSET_SECS)?;
    let naive = ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M:%S"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .or_else(|| {
            ["%Y-%m-%d", "%d.%m.%Y"]
                .iter()
                .find_map(|format| NaiveDate::parse_from_str(text, format).ok())
                .and_then(|date| date.and_hms_opt(0, 0, 0))
        })?;
    portal.from_local_datetime(&naive).single().map(|moment| moment.timestamp())
}
