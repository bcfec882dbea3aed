//! What funnel history reads from Bitrix24: `crm.stagehistory.list` of a
//! stream after an ID (oldest first, `start: -1`: no counting, no `next`),
//! one entity's record before an ID (a look-back), the highest ID to start
//! a stream from, and `crm.item.list` for responsible users — the first
//! three in one `batch` of up to 50 commands. Ids arrive as strings or
//! numbers; a record missing what a row needs is an error, and so is a
//! record outside the filter (the filter was not applied).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{B24Client, BATCH_LIMIT, lenient_i64};
use crate::crm::CrmError;
use crate::model::{B24StageRecord, EntityType, Semantics};

const HISTORY: &str = "crm.stagehistory.list";
/// Entities per `crm.item.list` command: one page of it.
pub const ITEMS_PER_COMMAND: usize = 50;

/// One command of a funnel batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryQuery {
    /// A stream's records after `after_id`, oldest first (at most 50).
    After { entity: EntityType, after_id: i64 },
    /// The same stream's next records after those of the earlier query
    /// `after` (its index in the batch), referenced as `$result[…]`: one
    /// `batch` reads a backlog of up to 50 pages. Meaningful only when that
    /// query's page was full.
    Continue { entity: EntityType, after: usize },
    /// The entity's last record before `before_id`: where it stood then.
    Before { entity: EntityType, owner_id: i64, before_id: i64 },
    /// The responsible users of up to [`ITEMS_PER_COMMAND`] entities.
    Responsible { entity: EntityType, ids: Vec<i64> },
}

/// What one command answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryAnswer {
    /// `After`: the records in ID order.
    Records(Vec<B24StageRecord>),
    /// `Before`: the previous record, if the entity has one.
    Previous(Option<B24StageRecord>),
    /// `Responsible`: by entity id; an entity gone or unassigned is left out.
    Responsible(HashMap<i64, i64>),
    /// `Continue`: no usable answer (the command failed, or ran on an
    /// empty reference after a short page): the stream's read stops before it.
    Unread,
}

/// A batch's answers, in the order of its queries, and the portal's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryBatch {
    pub answers: Vec<HistoryAnswer>,
    pub server_date: Option<DateTime<Utc>>,
}

impl B24Client<'_> {
    /// Runs up to [`BATCH_LIMIT`] queries in one `batch` (one request).
    pub async fn stage_history(&self, queries: &[HistoryQuery]) -> Result<HistoryBatch, CrmError> {
        if queries.len() > BATCH_LIMIT {
            return Err(CrmError::Config(format!("{} commands do not fit one batch of {BATCH_LIMIT}", queries.len())));
        }
        let commands = queries
            .iter()
            .enumerate()
            .map(|(i, q)| Ok((key(i), command(q)?)))
            .collect::<Result<Vec<(String, String)>, CrmError>>()?;
        let optional: Vec<String> = queries
            .iter()
            .zip(&commands)
            .filter(|(query, _)| matches!(query, HistoryQuery::Continue { .. }))
            .map(|(_, (key, _))| key.clone())
            .collect();
        let answer = self.batch_with_optional(&commands, &optional).await?;
        let answers = queries
            .iter()
            .zip(&commands)
            .map(|(query, (key, _))| match (query, answer.result(key)) {
                (HistoryQuery::Continue { .. }, result) => {
                    Ok(result.and_then(|r| parse_answer(query, r).ok()).unwrap_or(HistoryAnswer::Unread))
                }
                (_, Some(result)) => parse_answer(query, result),
                (_, None) => Err(CrmError::Incomplete(format!("the batch answered nothing for {}", describe(query)))),
            })
            .collect::<Result<_, _>>()?;
        Ok(HistoryBatch { answers, server_date: answer.date })
    }

    /// The highest stage-history ID of `entity` (created before `before`,
    /// when given) where its stream starts, `None` when there is none, and
    /// the portal's clock. A portal that refuses the time filter answers
    /// its error code (`INVALID_ARG_VALUE`) for the caller to decide.
    pub async fn highest_record_id(
        &self,
        entity: EntityType,
        before: Option<DateTime<Utc>>,
    ) -> Result<(Option<i64>, Option<DateTime<Utc>>), CrmError> {
        let mut params = json!({
            "entityTypeId": entity.type_id(),
            "order": { "ID": "DESC" },
            "select": ["ID", "CREATED_TIME"],
            "start": -1,
        });
        if let Some(before) = before {
            params["filter"] = json!({ "<CREATED_TIME": before.to_rfc3339() });
        }
        let envelope = self.call(HISTORY, &params).await?;
        Ok((highest(&envelope.result, before)?, envelope.date))
    }
}

/// The highest ID listed; a record not before `before` means the time
/// filter was not applied.
fn highest(result: &Value, before: Option<DateTime<Utc>>) -> Result<Option<i64>, CrmError> {
    let mut highest = None;
    for row in items(result, HISTORY)? {
        let id = row.get("ID").and_then(lenient_i64).ok_or_else(|| malformed(HISTORY, "a record without `ID`"))?;
        let created = row.get("CREATED_TIME").and_then(Value::as_str).and_then(timestamp);
        if let Some(before) = before
            && created.is_none_or(|created| created >= before)
        {
            return Err(CrmError::Incomplete(format!(
                "{HISTORY} listed record {id}, not created before {before}: the filter was not applied"
            )));
        }
        highest = highest.max(Some(id));
    }
    Ok(highest)
}

/// The fields a row needs: a deal's category and stage, a lead's status.
fn select(entity: EntityType) -> &'static [&'static str] {
    match entity {
        EntityType::Deal => {
            &["ID", "TYPE_ID", "OWNER_ID", "CREATED_TIME", "CATEGORY_ID", "STAGE_ID", "STAGE_SEMANTIC_ID"]
        }
        EntityType::Lead => &["ID", "TYPE_ID", "OWNER_ID", "CREATED_TIME", "STATUS_ID", "STATUS_SEMANTIC_ID"],
    }
}

/// A batch command (`method?query`, PHP bracket form).
fn command(query: &HistoryQuery) -> Result<String, CrmError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let method = match query {
        HistoryQuery::After { entity, after_id } => stream_read(&mut pairs, *entity, after_id.to_string()),
        HistoryQuery::Continue { entity, after } => {
            let last_of_page = format!("$result[{}][items][{}][ID]", key(*after), ITEMS_PER_COMMAND - 1);
            stream_read(&mut pairs, *entity, last_of_page)
        }
        HistoryQuery::Before { entity, owner_id, before_id } => {
            pairs.push(("entityTypeId".into(), entity.type_id().to_string()));
            pairs.push(("order[ID]".into(), "DESC".into()));
            pairs.push(("filter[OWNER_ID]".into(), owner_id.to_string()));
            pairs.push(("filter[<ID]".into(), before_id.to_string()));
            pairs.extend(select(*entity).iter().enumerate().map(|(i, f)| (format!("select[{i}]"), f.to_string())));
            pairs.push(("start".into(), "-1".into()));
            HISTORY
        }
        HistoryQuery::Responsible { entity, ids } => {
            if ids.len() > ITEMS_PER_COMMAND {
                return Err(CrmError::Config(format!(
                    "{} ids do not fit one command of {ITEMS_PER_COMMAND}",
                    ids.len()
                )));
            }
            pairs.push(("entityTypeId".into(), entity.type_id().to_string()));
            pairs.extend(ids.iter().enumerate().map(|(i, id)| (format!("filter[@id][{i}]"), id.to_string())));
            pairs.push(("select[0]".into(), "id".into()));
            pairs.push(("select[1]".into(), "assignedById".into()));
            "crm.item.list"
        }
    };
    let mut encoded = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in &pairs {
        encoded.append_pair(key, value);
    }
    Ok(format!("{method}?{}", encoded.finish()))
}

/// A stream's records after `after` (an ID, or a reference to one), oldest first.
fn stream_read(pairs: &mut Vec<(String, String)>, entity: EntityType, after: String) -> &'static str {
    pairs.push(("entityTypeId".into(), entity.type_id().to_string()));
    pairs.push(("order[ID]".into(), "ASC".into()));
    pairs.push(("filter[>ID]".into(), after));
    pairs.extend(select(entity).iter().enumerate().map(|(i, f)| (format!("select[{i}]"), f.to_string())));
    pairs.push(("start".into(), "-1".into()));
    HISTORY
}

/// The batch key of the `i`-th command. Zero-padded: a `cmd` object may
/// reach the portal with its keys sorted as text, and a chained command
/// must run after the one it references (`q10` would sort before `q2`).
fn key(i: usize) -> String {
    format!("q{i:02}")
}

/// `>ID` of a stream read; 0 for a continuation, whose records are checked
/// against the page before them by the caller.
fn query_after_id(query: &HistoryQuery) -> i64 {
    match query {
        HistoryQuery::After { after_id, .. } => *after_id,
        _ => 0,
    }
}

fn describe(query: &HistoryQuery) -> String {
    match query {
        HistoryQuery::After { entity, after_id } => format!("the {} stage history after {after_id}", entity.as_str()),
        HistoryQuery::Continue { entity, after } => {
            format!("the {} stage history after the page of command {after}", entity.as_str())
        }
        HistoryQuery::Before { entity, owner_id, before_id } => {
            format!("the stage history of {} {owner_id} before {before_id}", entity.as_str())
        }
        HistoryQuery::Responsible { entity, .. } => format!("the responsible users of {}s", entity.as_str()),
    }
}

fn parse_answer(query: &HistoryQuery, result: &Value) -> Result<HistoryAnswer, CrmError> {
    let what = describe(query);
    match query {
        HistoryQuery::After { entity, .. } | HistoryQuery::Continue { entity, .. } => {
            let records = records(*entity, result, &what)?;
            let mut previous = query_after_id(query);
            for record in &records {
                if record.id <= previous {
                    return Err(CrmError::Incomplete(format!(
                        "{what}: record {} came after {previous}: the filter or the order was not applied",
                        record.id
                    )));
                }
                previous = record.id;
            }
            Ok(HistoryAnswer::Records(records))
        }
        HistoryQuery::Before { entity, owner_id, before_id } => {
            let records = records(*entity, result, &what)?;
            if let Some(stray) = records.iter().find(|r| r.owner_id != *owner_id || r.id >= *before_id) {
                return Err(CrmError::Incomplete(format!(
                    "{what}: record {} of {} {} was listed: the filter was not applied",
                    stray.id,
                    entity.as_str(),
                    stray.owner_id
                )));
            }
            // The highest ID, whatever order the portal used.
            Ok(HistoryAnswer::Previous(records.into_iter().max_by_key(|r| r.id)))
        }
        HistoryQuery::Responsible { ids, .. } => {
            let mut users = HashMap::new();
            for item in items(result, &what)? {
                let id =
                    item.get("id").and_then(lenient_i64).ok_or_else(|| malformed(&what, "an item without `id`"))?;
                if !ids.contains(&id) {
                    return Err(CrmError::Incomplete(format!(
                        "{what}: item {id} was listed, though not asked for: the filter was not applied"
                    )));
                }
                if let Some(user) = item.get("assignedById").and_then(lenient_i64) {
                    users.insert(id, user);
                }
            }
            Ok(HistoryAnswer::Responsible(users))
        }
    }
}

/// `result.items`; an empty answer may also come as `[]`.
fn items<'v>(result: &'v Value, what: &str) -> Result<&'v [Value], CrmError> {
    match result {
        Value::Object(o) => match o.get("items") {
            Some(Value::Array(items)) => Ok(items),
            _ => Err(malformed(what, "an answer without an `items` list")),
        },
        Value::Array(empty) if empty.is_empty() => Ok(&[]),
        _ => Err(malformed(what, "an answer that is not a list")),
    }
}

fn records(entity: EntityType, result: &Value, what: &str) -> Result<Vec<B24StageRecord>, CrmError> {
    items(result, what)?.iter().map(|row| record(entity, row, what)).collect()
}

/// One record; ids and numbers as strings or numbers.
fn record(entity: EntityType, row: &Value, what: &str) -> Result<B24StageRecord, CrmError> {
    let number = |key: &str| row.get(key).and_then(lenient_i64);
    let id = number("ID").ok_or_else(|| malformed(what, "a record without `ID`"))?;
    let field = |key: &str| -> Result<i64, CrmError> {
        number(key).ok_or_else(|| malformed(what, &format!("record {id} without a numeric `{key}`")))
    };
    let (stage_key, semantic_key) = match entity {
        EntityType::Deal => ("STAGE_ID", "STAGE_SEMANTIC_ID"),
        EntityType::Lead => ("STATUS_ID", "STATUS_SEMANTIC_ID"),
    };
    let stage_id = row
        .get(stage_key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| malformed(what, &format!("record {id} without `{stage_key}`")))?;
    let created_time = row
        .get("CREATED_TIME")
        .and_then(Value::as_str)
        .and_then(timestamp)
        .ok_or_else(|| malformed(what, &format!("record {id} without a readable `CREATED_TIME`")))?;
    Ok(B24StageRecord {
        id,
        type_id: field("TYPE_ID")?,
        owner_id: field("OWNER_ID")?,
        created_time,
        // Leads have no categories; a deal's may be null for the default one.
        category_id: match entity {
            EntityType::Deal => number("CATEGORY_ID"),
            EntityType::Lead => None,
        },
        stage_id: stage_id.to_string(),
        semantic: match row.get(semantic_key).and_then(Value::as_str) {
            Some("S") => Some(Semantics::Success),
            Some("F") => Some(Semantics::Failure),
            Some("P") => Some(Semantics::Process),
            _ => None,
        },
    })
}

/// ISO 8601 with an offset, as the portal writes it (`2026-12-03T18:59:01+03:00`).
fn timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim()).ok().map(|t| t.with_timezone(&Utc))
}

fn malformed(what: &str, problem: &str) -> CrmError {
    CrmError::Malformed(format!("{what} answered {problem}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command split back into its method and parameters, decoded.
    fn decoded(query: &HistoryQuery) -> (String, Vec<(String, String)>) {
        let command = command(query).unwrap();
        let (method, encoded) = command.split_once('?').unwrap();
        (method.to_string(), url::form_urlencoded::parse(encoded.as_bytes()).into_owned().collect())
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn commands_read_a_stream_a_look_back_and_responsible_users() {
        let (method, params) = decoded(&HistoryQuery::After { entity: EntityType::Deal, after_id: 1200 });
        assert_eq!(method, "crm.stagehistory.list");
        assert_eq!(
            params,
            pairs(&[
                ("entityTypeId", "2"),
                ("order[ID]", "ASC"),
                ("filter[>ID]", "1200"),
                ("select[0]", "ID"),
                ("select[1]", "TYPE_ID"),
                ("select[2]", "OWNER_ID"),
                ("select[3]", "CREATED_TIME"),
                ("select[4]", "CATEGORY_ID"),
                ("select[5]", "STAGE_ID"),
                ("select[6]", "STAGE_SEMANTIC_ID"),
                ("start", "-1"),
            ])
        );
        let raw = command(&HistoryQuery::After { entity: EntityType::Lead, after_id: 0 }).unwrap();
        assert!(raw.contains("filter%5B%3EID%5D=0"), "the operator is encoded: {raw}");
        let (_, params) = decoded(&HistoryQuery::Before { entity: EntityType::Lead, owner_id: 77, before_id: 1300 });
        assert_eq!(
            params[..4],
            pairs(&[("entityTypeId", "1"), ("order[ID]", "DESC"), ("filter[OWNER_ID]", "77"), ("filter[<ID]", "1300")])
        );
        assert!(params.contains(&("select[4]".into(), "STATUS_ID".into())), "{params:?}");
        let (method, params) = decoded(&HistoryQuery::Responsible { entity: EntityType::Deal, ids: vec![5, 9] });
        assert_eq!(method, "crm.item.list");
        assert_eq!(
            params,
            pairs(&[
                ("entityTypeId", "2"),
                ("filter[@id][0]", "5"),
                ("filter[@id][1]", "9"),
                ("select[0]", "id"),
                ("select[1]", "assignedById"),
            ])
        );
        let too_many = HistoryQuery::Responsible { entity: EntityType::Lead, ids: (0..51).collect() };
        assert!(matches!(command(&too_many), Err(CrmError::Config(_))));
    }

    /// Deal records as the portal lists them: ids as strings, a category as
    /// a number or null.
    fn deal_answer() -> Value {
        json!({ "items": [
            { "ID": "1201", "TYPE_ID": "1", "OWNER_ID": "77", "CREATED_TIME": "2026-12-03T18:59:01+03:00",
              "CATEGORY_ID": "0", "STAGE_ID": "NEW", "STAGE_SEMANTIC_ID": "P" },
            { "ID": 1205, "TYPE_ID": 5, "OWNER_ID": 77, "CREATED_TIME": "2026-12-03T16:00:00+00:00",
              "CATEGORY_ID": 2, "STAGE_ID": "C2:WON", "STAGE_SEMANTIC_ID": "S" },
            { "ID": "1206", "TYPE_ID": "3", "OWNER_ID": "78", "CREATED_TIME": "2026-12-03T16:00:05Z",
              "CATEGORY_ID": null, "STAGE_ID": "LOSE", "STAGE_SEMANTIC_ID": "F", "EXTRA": "ignored" },
        ] })
    }

    #[test]
    fn a_stream_answer_reads_records_whatever_their_ids_are_written_as() {
        let query = HistoryQuery::After { entity: EntityType::Deal, after_id: 1200 };
        let HistoryAnswer::Records(records) = parse_answer(&query, &deal_answer()).unwrap() else { panic!() };
        let at = |text: &str| DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc);
        assert_eq!(
            records[0],
            B24StageRecord {
                id: 1201,
                type_id: 1,
                owner_id: 77,
                created_time: at("2026-12-03T15:59:01Z"),
                category_id: Some(0),
                stage_id: "NEW".into(),
                semantic: Some(Semantics::Process),
            }
        );
        let rest: Vec<_> = records[1..].iter().map(|r| (r.id, r.type_id, r.category_id, r.semantic)).collect();
        assert_eq!(rest, [(1205, 5, Some(2), Some(Semantics::Success)), (1206, 3, None, Some(Semantics::Failure))]);
        for empty in [json!({ "items": [] }), json!([])] {
            assert_eq!(parse_answer(&query, &empty).unwrap(), HistoryAnswer::Records(vec![]));
        }
        let lead = json!({ "items": [{ "ID": "9", "TYPE_ID": "2", "OWNER_ID": "4", "CREATED_TIME": "2026-12-03T10:00:00+03:00",
                                       "STATUS_ID": "IN_PROCESS", "STATUS_SEMANTIC_ID": null }] });
        let query = HistoryQuery::After { entity: EntityType::Lead, after_id: 0 };
        let HistoryAnswer::Records(records) = parse_answer(&query, &lead).unwrap() else { panic!() };
        assert_eq!(
            (records[0].category_id, records[0].stage_id.as_str(), records[0].semantic),
            (None, "IN_PROCESS", None)
        );
    }

    #[test]
    fn a_broken_or_unfiltered_answer_is_an_error() {
        let query = HistoryQuery::After { entity: EntityType::Deal, after_id: 1200 };
        let check = |change: fn(&mut Value), expected: &str| {
            let mut answer = deal_answer();
            change(&mut answer["items"][1]);
            let error = parse_answer(&query, &answer).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        };
        check(|r| r["ID"] = json!(null), "answered a record without `ID`");
        check(|r| r["TYPE_ID"] = json!("moved"), "record 1205 without a numeric `TYPE_ID`");
        check(|r| drop(r.as_object_mut().unwrap().remove("OWNER_ID")), "without a numeric `OWNER_ID`");
        check(|r| r["CREATED_TIME"] = json!("03.12.2026 16:00"), "record 1205 without a readable `CREATED_TIME`");
        check(|r| r["STAGE_ID"] = json!(""), "record 1205 without `STAGE_ID`");
        check(|r| r["ID"] = json!("1200"), "record 1200 came after 1201: the filter or the order was not applied");
        check(|r| r["ID"] = json!(1300), "record 1206 came after 1300");
        check(|r| *r = json!("1205"), "without `ID`");
        for answer in [json!({ "items": {} }), json!({ "records": [] }), json!("x"), json!([1])] {
            assert!(matches!(parse_answer(&query, &answer), Err(CrmError::Malformed(_))), "{answer}");
        }
    }

    #[test]
    fn a_look_back_finds_the_previous_record_of_its_entity_only() {
        let query = HistoryQuery::Before { entity: EntityType::Deal, owner_id: 77, before_id: 1206 };
        let mine = json!({ "items": [
            { "ID": "1201", "TYPE_ID": "1", "OWNER_ID": "77", "CREATED_TIME": "2026-12-03T15:00:00Z", "CATEGORY_ID": "0", "STAGE_ID": "NEW" },
            { "ID": "1205", "TYPE_ID": "2", "OWNER_ID": "77", "CREATED_TIME": "2026-12-03T16:00:00Z", "CATEGORY_ID": "0", "STAGE_ID": "PREPARATION" },
        ] });
        let HistoryAnswer::Previous(Some(previous)) = parse_answer(&query, &mine).unwrap() else { panic!() };
        assert_eq!((previous.id, previous.stage_id.as_str()), (1205, "PREPARATION"), "the highest, whatever the order");
        assert_eq!(parse_answer(&query, &json!([])).unwrap(), HistoryAnswer::Previous(None));
        let error = parse_answer(&query, &deal_answer()).unwrap_err();
        assert!(matches!(error, CrmError::Incomplete(_)), "another entity's record: {error}");
        let later = HistoryQuery::Before { entity: EntityType::Deal, owner_id: 77, before_id: 1205 };
        assert!(matches!(parse_answer(&later, &mine), Err(CrmError::Incomplete(_))), "a record not before the ID");
    }

    #[test]
    fn responsible_users_by_entity() {
        let query = HistoryQuery::Responsible { entity: EntityType::Deal, ids: vec![5, 9, 12] };
        let answer = json!({ "items": [{ "id": 5, "assignedById": 1 }, { "id": "9", "assignedById": "17" }, { "id": 12, "assignedById": null }] });
        assert_eq!(
            parse_answer(&query, &answer).unwrap(),
            HistoryAnswer::Responsible(HashMap::from([(5, 1), (9, 17)]))
        );
        let stray = json!({ "items": [{ "id": 6, "assignedById": 1 }] });
        assert!(matches!(parse_answer(&query, &stray), Err(CrmError::Incomplete(_))));
        assert!(matches!(
            parse_answer(&query, &json!({ "items": [{ "assignedById": 1 }] })),
            Err(CrmError::Malformed(_))
        ));
    }

    #[test]
    fn the_highest_id_to_start_from() {
        let before = DateTime::parse_from_rfc3339("2026-12-03T16:00:01Z").unwrap().with_timezone(&Utc);
        let rows = json!({ "items": [{ "ID": "1205", "CREATED_TIME": "2026-12-03T16:00:00+00:00" }, { "ID": 1201, "CREATED_TIME": "2026-12-03T15:00:00Z" }] });
        assert_eq!(highest(&rows, None).unwrap(), Some(1205));
        assert_eq!(highest(&rows, Some(before)).unwrap(), Some(1205));
        assert_eq!(highest(&json!({ "items": [] }), Some(before)).unwrap(), None);
        let too_late = before - chrono::Duration::seconds(2);
        assert!(matches!(highest(&rows, Some(too_late)), Err(CrmError::Incomplete(_))), "the filter was not applied");
        assert!(matches!(highest(&json!({ "items": [{ "CREATED_TIME": "x" }] }), None), Err(CrmError::Malformed(_))));
    }
}
