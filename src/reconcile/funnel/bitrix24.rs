//! Bitrix24's funnel rules: one stream per entity, read by stage-history
//! ID with a settle lag (IDs may commit out of order, so the cursor stays
//! behind records younger than 2 minutes, which are read again next poll),
//! the from-stage of each record (the answer, the table, or a look-back),
//! and what a record becomes as a row.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use super::{Found, before, start_of};
use crate::model::{B24StageRecord, ChangeKind, Crm, EntityType, StageAt, StageChange, StageFlags, category_of_stage};

/// How long a record's ID may stay uncommitted behind higher ones.
pub const SETTLE_LAG: Duration = Duration::from_secs(120);
/// Records per answer: a stream that returned this many continues.
pub const PAGE_SIZE: usize = 50;
/// Pages one read may chain: a whole `batch`.
pub const MAX_PAGES: usize = 50;
/// `TYPE_ID` of a creation record.
const CREATED: i64 = 1;
/// `TYPE_ID` of a move to another pipeline (deal category).
const TO_PIPELINE: i64 = 5;

/// Where a stream starts on its first enable: after `highest_id` (the
/// highest ID now, or with `since` the highest before that day; `None`
/// when there is none, or the portal refused to filter by time); complete
/// up to now, or to the start of `since`.
pub fn start(highest_id: Option<i64>, server_time: DateTime<Utc>, since: Option<NaiveDate>) -> (i64, DateTime<Utc>) {
    let complete_to = since.map_or(server_time, start_of);
    (highest_id.unwrap_or(0).max(0), complete_to)
}

/// One stream's reading during one poll: where its next command reads
/// from, and its cursor as far as it has settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRead {
    /// `>ID` of the stream's next command; `None` once it reached its end.
    pub next_from: Option<i64>,
    /// The cursor: every record up to it is older than the settle lag.
    pub last_id: i64,
    /// Every change before it is ingested; `None`: as stored.
    pub complete_to: Option<DateTime<Utc>>,
    /// A record younger than the settle lag was met: the cursor stays
    /// before it for the rest of the poll.
    pub held: bool,
    /// Pages (commands, chained in one `batch`) the next read asks for:
    /// one at first, doubling while every page comes back full, so an idle
    /// stream costs one command and a backlog soon fills whole batches.
    pub pages: usize,
}

impl StreamRead {
    /// A poll's start, from the stored cursor.
    pub fn start(last_id: i64) -> StreamRead {
        StreamRead { next_from: Some(last_id), last_id, complete_to: None, held: false, pages: 1 }
    }

    /// After one answer for this stream (its records in ID order) at
    /// `server_time`: the cursor moves over records older than server time −
    /// 2 minutes and stops at the first younger one (younger ones are still
    /// stored, and read again next poll); 50 records mean more to read from
    /// the highest ID, fewer the end. At the end and settled, complete up
    /// to server time − 2 minutes; else up to the `last_id` record's time.
    pub fn after(self, records: &[B24StageRecord], server_time: DateTime<Utc>) -> StreamRead {
        self.after_pages(records, records.len() < PAGE_SIZE, server_time)
    }

    /// The same after the pages of one read, `records` in ID order: `at_end`
    /// when its last page was short (not when it was full, or a chained page
    /// went unread).
    pub fn after_pages(self, records: &[B24StageRecord], at_end: bool, server_time: DateTime<Utc>) -> StreamRead {
        let settled = before(server_time, SETTLE_LAG);
        let mut read = self;
        let mut last_time = None;
        for record in records {
            if read.held || record.created_time >= settled {
                read.held = true;
            } else {
                read.last_id = read.last_id.max(record.id);
                last_time = Some(record.created_time);
            }
        }
        let highest = records.iter().map(|r| r.id).max();
        read.pages = if at_end { 1 } else { self.pages.saturating_mul(2).min(MAX_PAGES) };
        read.next_from = if at_end { None } else { highest.or(self.next_from) };
        read.complete_to = match (at_end && !read.held, last_time) {
            (true, _) => Some(settled),
            (false, Some(time)) => Some(time),
            (false, None) => self.complete_to,
        };
        read
    }
}

/// Where a record's entity stood before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FromStage {
    /// A creation record: nowhere.
    Creation,
    Known(StageAt),
    /// Neither the answer nor the table knows: the entity's previous record
    /// is read (`OWNER_ID`, `<ID`, the first by ID descending).
    LookBack,
}

/// The records of one answer with their from-stages, and the look-backs
/// still needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chained {
    /// In answer order; a creation record of an entity whose delivery wrote
    /// its `created` row is left out.
    pub records: Vec<(B24StageRecord, FromStage)>,
}

impl Chained {
    /// The look-backs to make: each entity's first record that needs one
    /// (owner, that record's ID). Later records chain from the answer.
    pub fn look_backs(&self) -> Vec<(i64, i64)> {
        self.records.iter().filter(|(_, from)| *from == FromStage::LookBack).map(|(r, _)| (r.owner_id, r.id)).collect()
    }
}

/// From-stages of an answer's records (in ID order): the owner's previous
/// record earlier in the answer, else its highest-id row in the table
/// (`stored`, by owner), else a look-back. A creation record of an entity
/// in `delivered` (its delivery wrote the `created` row) is left out, but
/// still chains the records after it.
pub fn chain(
    entity: EntityType,
    records: &[B24StageRecord],
    stored: &HashMap<i64, StageAt>,
    delivered: &HashSet<i64>,
) -> Chained {
    let mut last: HashMap<i64, StageAt> = HashMap::new();
    let mut chained = Vec::new();
    for record in records {
        let from = if record.type_id == CREATED {
            FromStage::Creation
        } else if let Some(previous) = last.get(&record.owner_id).or_else(|| stored.get(&record.owner_id)) {
            FromStage::Known(previous.clone())
        } else {
            FromStage::LookBack
        };
        last.insert(record.owner_id, stage_at(entity, record));
        if !(record.type_id == CREATED && delivered.contains(&record.owner_id)) {
            chained.push((record.clone(), from));
        }
    }
    Chained { records: chained }
}

/// The stage a record moved its entity to: a deal's category (from the
/// record, else from its `C<n>:` stage prefix) and stage; a lead's status.
pub fn stage_at(entity: EntityType, record: &B24StageRecord) -> StageAt {
    let pipeline = match entity {
        EntityType::Lead => None,
        EntityType::Deal => record.category_id.or_else(|| category_of_stage(&record.stage_id)).map(|c| c.to_string()),
    };
    StageAt { pipeline, stage: record.stage_id.clone() }
}

/// The (category, stage) whose flags a record's row copies: lead statuses
/// are stored as category 0. `None` for a category out of range.
pub fn stage_key(entity: EntityType, record: &B24StageRecord) -> Option<(i32, String)> {
    let category = match entity {
        EntityType::Lead => Some(0),
        EntityType::Deal => record.category_id.or_else(|| category_of_stage(&record.stage_id)),
    };
    Some((i32::try_from(category?).ok()?, record.stage_id.clone()))
}

/// `source_event_id` of a record: `lead:<ID>` / `deal:<ID>`.
pub fn source_id(entity: EntityType, record_id: i64) -> String {
    format!("{}:{record_id}", entity.as_str())
}

/// A record as a row: `from` its from-stage (`None` for a creation, or a
/// look-back that found no earlier record), `flags` of its stage.
pub fn change(
    entity: EntityType,
    record: &B24StageRecord,
    from: Option<&StageAt>,
    flags: Option<StageFlags>,
    found: &Found,
) -> StageChange {
    let to = stage_at(entity, record);
    StageChange {
        crm: Crm::Bitrix24,
        source_event_id: source_id(entity, record.id),
        entity_type: entity,
        entity_id: record.owner_id,
        pipeline_from: from.and_then(|f| f.pipeline.clone()),
        stage_from: from.map(|f| f.stage.clone()),
        pipeline_to: to.pipeline,
        stage_to: to.stage,
        // 2 (to an intermediate stage), 3 (to a final one) and any other:
        // a stage change of the same pipeline.
        change_kind: match record.type_id {
            CREATED => ChangeKind::Created,
            TO_PIPELINE => ChangeKind::Pipeline,
            _ => ChangeKind::Moved,
        },
        semantic: record.semantic,
        flags,
        changed_at: record.created_time,
        changed_by_user_id: None,
        responsible_user_id: found.responsible.get(&record.owner_id).copied(),
        outbox_id: found.outbox.get(&record.owner_id).copied(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Semantics;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + secs, 0).unwrap()
    }

    const NOW: i64 = 10_000;

    /// A deal record of owner 1 made `age` seconds before [`NOW`].
    fn aged(id: i64, age: i64) -> B24StageRecord {
        B24StageRecord {
            id,
            type_id: 2,
            owner_id: 1,
            created_time: t(NOW - age),
            category_id: Some(0),
            stage_id: "PREPARATION".into(),
            semantic: Some(Semantics::Process),
        }
    }

    #[test]
    fn where_a_stream_starts() {
        let since = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        assert_eq!(start(None, t(NOW), None), (0, t(NOW)));
        assert_eq!(start(Some(57), t(NOW), None), (57, t(NOW)));
        assert_eq!(start(Some(12), t(NOW), Some(since)), (12, start_of(since)));
        assert_eq!(start(Some(-3), t(NOW), None), (0, t(NOW)));
    }

    /// Reads answers (record ids with their ages) from a cursor at `last_id`
    /// whose `complete_to` is stored; what the stream's reading is after each.
    #[track_caller]
    fn check(last_id: i64, answers: &[&[(i64, i64)]], expected: StreamRead) {
        let mut read = StreamRead::start(last_id);
        for answer in answers {
            assert!(read.next_from.is_some(), "an answer after the end");
            let records: Vec<B24StageRecord> = answer.iter().map(|&(id, age)| aged(id, age)).collect();
            read = read.after(&records, t(NOW));
        }
        assert_eq!(read, expected, "{answers:?}");
    }

    fn read(next_from: Option<i64>, last_id: i64, complete_to: Option<i64>, held: bool) -> StreamRead {
        let pages = if next_from.is_some() { 2 } else { 1 };
        StreamRead { next_from, last_id, complete_to: complete_to.map(t), held, pages }
    }

    #[test]
    fn the_cursor_moves_over_settled_records_only() {
        let settled = NOW - 120;
        // Nothing new: at the end, complete up to the settled past.
        check(40, &[&[]], read(None, 40, Some(settled), false));
        check(40, &[&[(41, 900), (43, 300), (47, 121)]], read(None, 47, Some(settled), false));
        // A record exactly 2 minutes old is not settled yet.
        check(40, &[&[(41, 900), (42, 120)]], read(None, 41, Some(NOW - 900), true));
        // A younger record holds the cursor, even before older ones with higher IDs.
        check(40, &[&[(41, 900), (42, 30), (43, 600)]], read(None, 41, Some(NOW - 900), true));
        // Held from the first record: the cursor and complete_to stay as stored.
        check(40, &[&[(41, 5), (42, 600)]], read(None, 40, None, true));
    }

    #[test]
    fn a_stream_that_returned_50_continues_from_its_highest_id() {
        let full: Vec<(i64, i64)> = (101..=150).map(|id| (id, 1000)).collect();
        check(100, &[&full], read(Some(150), 150, Some(NOW - 1000), false));
        // Not at its end: complete only up to the last settled record.
        check(100, &[&full, &[(151, 500)]], read(None, 151, Some(NOW - 120), false));
        check(100, &[&full, &[]], read(None, 150, Some(NOW - 120), false));
        // A young record in the first answer holds the cursor for the whole poll.
        let mut young: Vec<(i64, i64)> = full.clone();
        young[10] = (111, 10);
        check(100, &[&young, &[(151, 500)]], read(None, 110, Some(NOW - 1000), true));
        let late: Vec<(i64, i64)> = (151..=200).map(|id| (id, 1000)).collect();
        check(100, &[&young, &late], StreamRead { pages: 4, ..read(Some(200), 110, Some(NOW - 1000), true) });
    }

    #[test]
    fn a_read_chains_twice_the_pages_while_they_come_back_full_and_one_after_its_end() {
        let page = |from: i64| -> Vec<B24StageRecord> { (from..from + 50).map(|id| aged(id, 1000)).collect() };
        let mut read = StreamRead::start(0);
        let mut asked = Vec::new();
        for _ in 0..7 {
            asked.push(read.pages);
            let records: Vec<B24StageRecord> = (0..read.pages as i64).flat_map(|k| page(1 + k * 50)).collect();
            read = read.after_pages(&records, false, t(NOW));
        }
        assert_eq!(asked, [1, 2, 4, 8, 16, 32, 50]);
        assert_eq!(read.pages, MAX_PAGES);
        // A chained page unread: not the end, the next read goes on from the highest ID.
        let read = read.after_pages(&page(10_001), false, t(NOW));
        assert_eq!((read.next_from, read.pages), (Some(10_050), MAX_PAGES));
        let done = read.after_pages(&page(10_051)[..7], true, t(NOW));
        assert_eq!((done.next_from, done.pages, done.complete_to), (None, 1, Some(t(NOW - 120))));
    }

    #[test]
    fn from_stages_come_from_the_answer_the_table_or_a_look_back() {
        let record = |id, owner_id, type_id, stage: &str| B24StageRecord {
            id,
            type_id,
            owner_id,
            created_time: t(id),
            category_id: Some(1),
            stage_id: stage.into(),
            semantic: None,
        };
        let at = |stage: &str| StageAt { pipeline: Some("1".into()), stage: stage.into() };
        let records = [
            record(1, 10, 1, "C1:NEW"),  // A created
            record(2, 20, 2, "C1:PREP"), // B, known in the table
            record(3, 30, 2, "C1:PREP"), // C, unknown anywhere
            record(4, 10, 2, "C1:PREP"), // A again: from its creation
            record(5, 40, 1, "C1:NEW"),  // D created, delivered by us: left out
            record(6, 30, 3, "C1:WON"),  // C again: from its first record
            record(7, 40, 5, "C2:NEW"),  // D moved on: from its creation
        ];
        let stored = HashMap::from([(20, at("C1:NEW"))]);
        let chained = chain(EntityType::Deal, &records, &stored, &HashSet::from([40]));
        let got: Vec<(i64, FromStage)> = chained.records.iter().map(|(r, f)| (r.id, f.clone())).collect();
        assert_eq!(
            got,
            [
                (1, FromStage::Creation),
                (2, FromStage::Known(at("C1:NEW"))),
                (3, FromStage::LookBack),
                (4, FromStage::Known(at("C1:NEW"))),
                (6, FromStage::Known(at("C1:PREP"))),
                (7, FromStage::Known(at("C1:NEW"))),
            ]
        );
        assert_eq!(chained.look_backs(), [(30, 3)]);
        // The answer wins over the table.
        let stored = HashMap::from([(10, at("C1:LOSE"))]);
        let chained = chain(EntityType::Deal, &records[..4], &stored, &HashSet::new());
        assert_eq!(chained.records[3].1, FromStage::Known(at("C1:NEW")));
    }

    #[test]
    fn records_as_rows() {
        let found = Found { responsible: [(7, 3)].into(), outbox: [(7, 99)].into() };
        let deal = B24StageRecord {
            id: 815,
            type_id: 5,
            owner_id: 7,
            created_time: t(5),
            category_id: Some(2),
            stage_id: "C2:NEW".into(),
            semantic: Some(Semantics::Process),
        };
        let from = StageAt { pipeline: Some("0".into()), stage: "WON".into() };
        let flags = Some(StageFlags { qualified: false, success: false, fail: true });
        assert_eq!(
            change(EntityType::Deal, &deal, Some(&from), flags, &found),
            StageChange {
                crm: Crm::Bitrix24,
                source_event_id: "deal:815".into(),
                entity_type: EntityType::Deal,
                entity_id: 7,
                pipeline_from: Some("0".into()),
                stage_from: Some("WON".into()),
                pipeline_to: Some("2".into()),
                stage_to: "C2:NEW".into(),
                change_kind: ChangeKind::Pipeline,
                semantic: Some(Semantics::Process),
                flags,
                changed_at: t(5),
                changed_by_user_id: None,
                responsible_user_id: Some(3),
                outbox_id: Some(99),
            }
        );
        let check = |entity, type_id, category_id, stage: &str, expected: (ChangeKind, Option<&str>)| {
            let record = B24StageRecord { type_id, category_id, stage_id: stage.into(), ..deal.clone() };
            let row = change(entity, &record, None, None, &Found::default());
            assert_eq!((row.change_kind, row.pipeline_to.as_deref()), expected, "{record:?}");
            assert_eq!((row.pipeline_from, row.stage_from, row.outbox_id), (None, None, None));
        };
        check(EntityType::Deal, 1, Some(0), "NEW", (ChangeKind::Created, Some("0")));
        check(EntityType::Deal, 2, Some(3), "C3:PREP", (ChangeKind::Moved, Some("3")));
        check(EntityType::Deal, 3, None, "C12:WON", (ChangeKind::Moved, Some("12")));
        check(EntityType::Deal, 4, None, "LOSE", (ChangeKind::Moved, Some("0")));
        check(EntityType::Lead, 2, None, "IN_PROCESS", (ChangeKind::Moved, None));
        check(EntityType::Lead, 3, Some(5), "CONVERTED", (ChangeKind::Moved, None));
        assert_eq!(source_id(EntityType::Lead, 12), "lead:12");
    }

    #[test]
    fn stage_keys_for_flags() {
        let record = |category_id, stage: &str| B24StageRecord { category_id, stage_id: stage.into(), ..aged(1, 0) };
        let check = |entity, record: B24StageRecord, expected: Option<(i32, &str)>| {
            assert_eq!(stage_key(entity, &record), expected.map(|(c, s)| (c, s.to_string())), "{record:?}");
        };
        check(EntityType::Lead, record(None, "NEW"), Some((0, "NEW")));
        check(EntityType::Deal, record(Some(4), "C4:NEW"), Some((4, "C4:NEW")));
        check(EntityType::Deal, record(None, "C4:NEW"), Some((4, "C4:NEW")));
        check(EntityType::Deal, record(Some(1 << 40), "C1:NEW"), None);
    }
}
