//! Stage rows: the CRM's list (with the flags it should carry) against the
//! stored rows, as a plan of upserts and removals. Rows are never deleted:
//! a stage the CRM stops listing gets `removed_at`, cleared if it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use super::mapping::{Reference, StageMatch, map_flags};
use crate::config::StageMapping;
use crate::model::{StageFlags, StoredStage};

/// A stage as a stage table stores it (flags aside).
pub trait StageRow: Clone + PartialEq {
    type Key: Ord + Clone + Debug;
    fn key(&self) -> Self::Key;
    /// `"Pipeline" / "Stage" (ID)`, for change summaries.
    fn label(&self) -> String;
}

/// What a stage sync writes, and a summary of it for events and dry runs.
#[derive(Debug)]
pub struct StagePlan<R: StageRow> {
    /// Rows to insert or update (clearing `removed_at`).
    pub upserts: Vec<(R, StageFlags)>,
    /// Rows to mark removed.
    pub removed: Vec<R::Key>,
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub restored: Vec<String>,
    pub removed_labels: Vec<String>,
    pub flags_moved: Vec<String>,
}

impl<R: StageRow> StagePlan<R> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// A stage sync: the plan, the number of stages the CRM listed, and the
/// mapping's error, if any.
#[derive(Debug)]
pub struct StageSync<R: StageRow> {
    pub plan: StagePlan<R>,
    pub stage_count: usize,
    /// The mapping matches no stage or flags one both ways: the stored
    /// flags are kept (names and order still sync) and the sync fails.
    pub mapping_error: Option<String>,
}

/// The one rule of a stage sync, for the sync and the dry run alike: the
/// flags mapped — or, on a mapping error, kept as stored — then the rows
/// compared. `table` names the mapping in messages (`amocrm.stages`).
pub fn plan_stage_sync<S, Ref>(
    fetched: Vec<S>,
    mapping: &StageMapping<Ref>,
    table: &str,
    stored: &[StoredStage<S>],
) -> StageSync<S>
where
    S: StageRow + StageMatch<Ref>,
    Ref: Reference,
{
    let mapped = map_flags(&fetched, mapping, table);
    let flags: Vec<StageFlags> = match &mapped {
        Ok(flags) => flags.clone(),
        Err(_) => fetched
            .iter()
            .map(|s| stored.iter().find(|old| old.row.key() == s.key()).map(|old| old.flags).unwrap_or_default())
            .collect(),
    };
    let stage_count = fetched.len();
    StageSync {
        plan: plan_stages(fetched.into_iter().zip(flags).collect(), stored),
        stage_count,
        mapping_error: mapped.err().map(|e| format!("stage mapping: {e}")),
    }
}

/// Compares the CRM's list with the stored rows.
pub fn plan_stages<R: StageRow>(fetched: Vec<(R, StageFlags)>, stored: &[StoredStage<R>]) -> StagePlan<R> {
    let stored_by_key: BTreeMap<R::Key, &StoredStage<R>> = stored.iter().map(|s| (s.row.key(), s)).collect();
    let mut plan = StagePlan {
        upserts: Vec::new(),
        removed: Vec::new(),
        added: Vec::new(),
        changed: Vec::new(),
        restored: Vec::new(),
        removed_labels: Vec::new(),
        flags_moved: Vec::new(),
    };
    let mut seen = BTreeSet::new();
    for (row, flags) in fetched {
        // A CRM listing one stage twice is stored once, as first listed.
        if !seen.insert(row.key()) {
            continue;
        }
        match stored_by_key.get(&row.key()) {
            None => plan.added.push(row.label()),
            Some(old) => {
                if old.row == row && old.flags == flags && !old.removed {
                    continue;
                }
                if old.removed {
                    plan.restored.push(row.label());
                }
                if old.row != row {
                    plan.changed.push(row.label());
                }
                if old.flags != flags {
                    plan.flags_moved.push(format!("{}: {} → {}", row.label(), describe(old.flags), describe(flags)));
                }
            }
        }
        plan.upserts.push((row, flags));
    }
    for old in stored.iter().filter(|s| !s.removed && !seen.contains(&s.row.key())) {
        plan.removed.push(old.row.key());
        plan.removed_labels.push(old.row.label());
    }
    plan
}

fn describe(flags: StageFlags) -> String {
    let names: Vec<&str> = [(flags.qualified, "qualified"), (flags.success, "success"), (flags.fail, "fail")]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
    if names.is_empty() { "none".into() } else { names.join("+") }
}

impl StageRow for crate::model::AmoStage {
    type Key = (i64, i64);

    fn key(&self) -> (i64, i64) {
        (self.pipeline_id, self.status_id)
    }

    fn label(&self) -> String {
        format!("{:?} / {:?} ({})", self.pipeline_name, self.status_name, self.status_id)
    }
}

impl StageRow for crate::model::B24Stage {
    type Key = (crate::model::EntityType, i32, String);

    fn key(&self) -> Self::Key {
        (self.entity_type, self.category_id, self.status_id.clone())
    }

    fn label(&self) -> String {
        format!("{:?} / {:?} ({})", self.category_name, self.status_name, self.status_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Row(u32, &'static str);

    impl StageRow for Row {
        type Key = u32;
        fn key(&self) -> u32 {
            self.0
        }
        fn label(&self) -> String {
            self.1.to_string()
        }
    }

    const NONE: StageFlags = StageFlags { qualified: false, success: false, fail: false };
    const WON: StageFlags = StageFlags { qualified: false, success: true, fail: false };

    fn stored(row: Row, flags: StageFlags, removed: bool) -> StoredStage<Row> {
        StoredStage { row, flags, removed }
    }

    #[test]
    fn a_synced_state_plans_nothing() {
        let plan = plan_stages(vec![(Row(1, "a"), WON)], &[stored(Row(1, "a"), WON, false)]);
        assert!(plan.is_empty());
    }

    #[test]
    fn new_renamed_flagged_vanished_and_returning_stages_are_planned() {
        let plan = plan_stages(
            vec![(Row(1, "a2"), NONE), (Row(2, "b"), WON), (Row(4, "d"), NONE), (Row(4, "dup"), WON)],
            &[
                stored(Row(1, "a"), NONE, false),
                stored(Row(2, "b"), NONE, false),
                stored(Row(3, "c"), NONE, false),
                stored(Row(4, "d"), NONE, true),
            ],
        );
        assert_eq!(plan.upserts.iter().map(|(r, _)| r.0).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(plan.changed, ["a2"]);
        assert_eq!(plan.flags_moved, ["b: none → success"]);
        assert_eq!(plan.restored, ["d"]);
        assert_eq!(plan.removed, [3]);
        assert!(plan.added.is_empty());
        let plan = plan_stages(vec![(Row(5, "e"), NONE)], &[stored(Row(3, "c"), NONE, true)]);
        assert_eq!(plan.added, ["e"]);
        assert!(plan.removed.is_empty(), "an already removed row is not removed again");
    }
}
