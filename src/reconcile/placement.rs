//! Where a lead goes: the outbox row's own pipeline and stage ids, else the
//! tenant's `[leads.<crm>]` defaults, else the main pipeline (Bitrix24:
//! category 0, or the lead statuses) — each resolved against the synced,
//! not removed stages. A pipeline alone means its first stage. A row whose
//! ids resolve to nothing is refused (the row fails); defaults that do are a
//! configuration error (rows wait). Pure.

use crate::config::{AmoLeadDefaults, B24LeadDefaults, PipelineRef, normalize_name};
use crate::model::{AmoStage, B24Stage, EntityType, LeadPlacement, Semantics, StoredStage};
use crate::reconcile::{AMOCRM_LOST, AMOCRM_WON, StageMatch};

/// The unsorted stage of a pipeline: leads cannot be created there.
const AMOCRM_UNSORTED: i32 = 1;

/// Where an AmoCRM lead goes; `Err` says why the row's ids cannot be used.
pub fn place_amocrm(
    pipeline: Option<&str>,
    stage: Option<&str>,
    default: Option<&LeadPlacement>,
    stages: &[StoredStage<AmoStage>],
) -> Result<LeadPlacement, String> {
    let live: Vec<&AmoStage> = stages.iter().filter(|s| !s.removed).map(|s| &s.row).collect();
    let pipeline = match pipeline.map(str::trim).filter(|p| !p.is_empty()) {
        Some(text) => {
            let id: i64 = text.parse().map_err(|_| format!("pipeline_id {text:?} is not an AmoCRM pipeline id"))?;
            if !live.iter().any(|s| s.pipeline_id == id) {
                return Err(format!("pipeline {id} is not a synced pipeline"));
            }
            Some(id)
        }
        None => None,
    };
    match stage.map(str::trim).filter(|s| !s.is_empty()) {
        Some(text) => {
            let id: i64 = text.parse().map_err(|_| format!("stage_id {text:?} is not an AmoCRM status id"))?;
            let matches: Vec<&&AmoStage> =
                live.iter().filter(|s| s.status_id == id && pipeline.is_none_or(|p| s.pipeline_id == p)).collect();
            match matches.as_slice() {
                [] => Err(match pipeline {
                    Some(p) => format!("status {id} is not a synced status of pipeline {p}"),
                    None => format!("status {id} is not a synced status"),
                }),
                [one] if one.status_type == AMOCRM_UNSORTED => {
                    Err(format!("status {id} is the unsorted stage, where leads cannot be created"))
                }
                [one] => Ok(LeadPlacement::AmoCrm { pipeline_id: one.pipeline_id, status_id: id }),
                _ => Err(format!("status {id} belongs to several pipelines: give pipeline_id too")),
            }
        }
        None => {
            let pipeline = match (pipeline, default) {
                (Some(p), _) => p,
                (None, Some(default)) => return Ok(default.clone()),
                (None, None) => live
                    .iter()
                    .find(|s| s.pipeline_is_main)
                    .map(|s| s.pipeline_id)
                    .ok_or("no main pipeline is synced")?,
            };
            first_amocrm_stage(&live, pipeline)
                .map(|s| LeadPlacement::AmoCrm { pipeline_id: pipeline, status_id: s.status_id })
                .ok_or_else(|| format!("pipeline {pipeline} has no stage a lead can start in"))
        }
    }
}

/// The lowest-sorted ordinary stage of a pipeline (not unsorted, won, lost).
pub fn first_amocrm_stage<'a>(stages: &[&'a AmoStage], pipeline: i64) -> Option<&'a AmoStage> {
    stages
        .iter()
        .filter(|s| s.pipeline_id == pipeline && s.status_type == 0)
        .filter(|s| s.status_id != AMOCRM_WON && s.status_id != AMOCRM_LOST)
        .min_by_key(|s| (s.status_sort, s.status_id))
        .copied()
}

/// Where a Bitrix24 lead or deal goes.
pub fn place_bitrix24(
    entity: EntityType,
    pipeline: Option<&str>,
    stage: Option<&str>,
    default: Option<&LeadPlacement>,
    stages: &[StoredStage<B24Stage>],
) -> Result<LeadPlacement, String> {
    let live: Vec<&B24Stage> =
        stages.iter().filter(|s| !s.removed && s.row.entity_type == entity).map(|s| &s.row).collect();
    let pipeline = pipeline.map(str::trim).filter(|p| !p.is_empty());
    let stage = stage.map(str::trim).filter(|s| !s.is_empty());
    if entity == EntityType::Lead {
        if let Some(p) = pipeline {
            return Err(format!("pipeline_id {p:?} given for a Bitrix24 lead: leads have no pipelines"));
        }
        return match (stage, default) {
            (Some(s), _) => live
                .iter()
                .find(|l| l.status_id == s)
                .map(|l| LeadPlacement::Bitrix24Lead { status_id: l.status_id.clone() })
                .ok_or_else(|| format!("stage_id {s:?} is not a synced lead status")),
            (None, Some(default)) => Ok(default.clone()),
            (None, None) => first_bitrix24_stage(&live, 0)
                .map(|l| LeadPlacement::Bitrix24Lead { status_id: l.status_id.clone() })
                .ok_or_else(|| "no lead status a lead can start in is synced".into()),
        };
    }
    let category = match pipeline {
        Some(text) => {
            let id: i32 = text.parse().map_err(|_| format!("pipeline_id {text:?} is not a Bitrix24 category id"))?;
            if !live.iter().any(|s| s.category_id == id) {
                return Err(format!("category {id} is not a synced deal category"));
            }
            Some(id)
        }
        None => None,
    };
    match stage {
        Some(s) => live
            .iter()
            .find(|d| d.status_id == s && category.is_none_or(|c| d.category_id == c))
            .map(|d| LeadPlacement::Bitrix24Deal { category_id: d.category_id, stage_id: d.status_id.clone() })
            .ok_or_else(|| match category {
                Some(c) => format!("stage_id {s:?} is not a synced stage of category {c}"),
                None => format!("stage_id {s:?} is not a synced deal stage"),
            }),
        None => {
            let category = match (category, default) {
                (Some(c), _) => c,
                (None, Some(default)) => return Ok(default.clone()),
                (None, None) => 0,
            };
            first_bitrix24_stage(&live, category)
                .map(|d| LeadPlacement::Bitrix24Deal { category_id: category, stage_id: d.status_id.clone() })
                .ok_or_else(|| format!("category {category} has no stage a deal can start in"))
        }
    }
}

/// The lowest-sorted in-process stage of a category (leads: category 0).
pub fn first_bitrix24_stage<'a>(stages: &[&'a B24Stage], category: i32) -> Option<&'a B24Stage> {
    stages
        .iter()
        .filter(|s| s.category_id == category && s.semantics == Semantics::Process)
        .min_by_key(|s| (s.status_sort, s.status_id.clone()))
        .copied()
}

/// The `[leads.amocrm]` defaults resolved against the synced stages;
/// `None` when they name neither pipeline nor stage.
pub fn amocrm_default(
    defaults: &AmoLeadDefaults,
    stages: &[StoredStage<AmoStage>],
) -> Result<Option<LeadPlacement>, String> {
    let live: Vec<&AmoStage> = stages.iter().filter(|s| !s.removed).map(|s| &s.row).collect();
    let pipeline = match &defaults.pipeline {
        Some(reference) => {
            Some(one_pipeline(reference, live.iter().map(|s| (s.pipeline_id, s.pipeline_name.as_str())), "pipeline")?)
        }
        None => None,
    };
    match (&defaults.stage, pipeline) {
        (Some(reference), _) => {
            let matches: Vec<&&AmoStage> =
                live.iter().filter(|s| s.matches(reference) && pipeline.is_none_or(|p| s.pipeline_id == p)).collect();
            match matches.as_slice() {
                [] => Err(format!("stage {reference} matches no synced stage")),
                [one] if one.status_type == AMOCRM_UNSORTED => {
                    Err(format!("stage {reference} is the unsorted stage, where leads cannot be created"))
                }
                [one] => Ok(Some(LeadPlacement::AmoCrm { pipeline_id: one.pipeline_id, status_id: one.status_id })),
                _ => Err(format!("stage {reference} matches stages of several pipelines: set `pipeline` too")),
            }
        }
        (None, Some(pipeline)) => first_amocrm_stage(&live, pipeline)
            .map(|s| Some(LeadPlacement::AmoCrm { pipeline_id: pipeline, status_id: s.status_id }))
            .ok_or_else(|| format!("pipeline {pipeline} has no stage a lead can start in")),
        (None, None) => Ok(None),
    }
}

/// The `[leads.bitrix24]` defaults resolved against the synced stages.
pub fn bitrix24_default(
    entity: EntityType,
    defaults: &B24LeadDefaults,
    stages: &[StoredStage<B24Stage>],
) -> Result<Option<LeadPlacement>, String> {
    let live: Vec<&B24Stage> =
        stages.iter().filter(|s| !s.removed && s.row.entity_type == entity).map(|s| &s.row).collect();
    let category = match &defaults.category {
        Some(reference) => Some(one_pipeline(
            reference,
            live.iter().map(|s| (i64::from(s.category_id), s.category_name.as_str())),
            "category",
        )?),
        None => None,
    };
    let category = category.map(|c| i32::try_from(c).unwrap_or(i32::MAX));
    let place = |s: &B24Stage| match entity {
        EntityType::Lead => LeadPlacement::Bitrix24Lead { status_id: s.status_id.clone() },
        EntityType::Deal => LeadPlacement::Bitrix24Deal { category_id: s.category_id, stage_id: s.status_id.clone() },
    };
    match (&defaults.stage, category) {
        (Some(reference), _) => {
            let matches: Vec<&&B24Stage> =
                live.iter().filter(|s| s.matches(reference) && category.is_none_or(|c| s.category_id == c)).collect();
            match matches.as_slice() {
                [] => Err(format!("stage {reference} matches no synced stage")),
                [one] => Ok(Some(place(one))),
                _ => Err(format!("stage {reference} matches several stages: set `category` too")),
            }
        }
        (None, Some(category)) => first_bitrix24_stage(&live, category)
            .map(|s| Some(place(s)))
            .ok_or_else(|| format!("category {category} has no stage a deal can start in")),
        (None, None) => Ok(None),
    }
}

/// The one pipeline (or category) a reference names among `(id, name)`s.
fn one_pipeline<'a>(
    reference: &PipelineRef,
    pipelines: impl Iterator<Item = (i64, &'a str)>,
    what: &str,
) -> Result<i64, String> {
    let mut ids: Vec<i64> = pipelines
        .filter(|(id, name)| match reference {
            PipelineRef::Id(wanted) => id == wanted,
            PipelineRef::Name(wanted) => normalize_name(name) == normalize_name(wanted),
        })
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    match ids.as_slice() {
        [] => Err(format!("{what} {reference} matches no synced {what}")),
        [one] => Ok(*one),
        _ => Err(format!("{what} {reference} matches several: use its id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StageFlags;

    fn amo(pipeline_id: i64, main: bool, status_id: i64, sort: i32, status_type: i32) -> StoredStage<AmoStage> {
        StoredStage {
            row: AmoStage {
                pipeline_id,
                pipeline_name: format!("P{pipeline_id}"),
                pipeline_is_main: main,
                status_id,
                status_name: format!("S{status_id}"),
                status_sort: sort,
                status_type,
            },
            flags: StageFlags::default(),
            removed: false,
        }
    }

    fn b24(
        entity_type: EntityType,
        category_id: i32,
        status_id: &str,
        sort: i32,
        semantics: Semantics,
    ) -> StoredStage<B24Stage> {
        StoredStage {
            row: B24Stage {
                entity_type,
                category_id,
                category_name: format!("C{category_id}"),
                status_id: status_id.into(),
                status_name: status_id.into(),
                status_sort: sort,
                semantics,
            },
            flags: StageFlags::default(),
            removed: false,
        }
    }

    #[test]
    fn amocrm_placements() {
        let mut removed = amo(2, false, 30, 5, 0);
        removed.removed = true;
        let stages = vec![
            amo(1, true, 10, 10, 1),
            amo(1, true, 11, 20, 0),
            amo(1, true, 12, 30, 0),
            amo(1, true, 142, 10000, 0),
            amo(1, true, 143, 11000, 0),
            amo(2, false, 21, 20, 0),
            amo(2, false, 142, 10000, 0),
            removed,
        ];
        let at = |p: i64, s: i64| Ok(LeadPlacement::AmoCrm { pipeline_id: p, status_id: s });
        let default = LeadPlacement::AmoCrm { pipeline_id: 2, status_id: 21 };
        let check = |pipeline: Option<&str>, stage: Option<&str>, default: Option<&LeadPlacement>, expected| {
            assert_eq!(place_amocrm(pipeline, stage, default, &stages), expected, "{pipeline:?} {stage:?}");
        };
        check(None, None, None, at(1, 11));
        check(None, None, Some(&default), at(2, 21));
        check(Some("2"), None, None, at(2, 21));
        check(None, Some("12"), None, at(1, 12));
        check(Some("2"), Some("142"), None, at(2, 142));
        check(None, Some("142"), None, Err("status 142 belongs to several pipelines: give pipeline_id too".into()));
        check(None, Some("10"), None, Err("status 10 is the unsorted stage, where leads cannot be created".into()));
        check(Some("1"), Some("21"), None, Err("status 21 is not a synced status of pipeline 1".into()));
        check(None, Some("30"), None, Err("status 30 is not a synced status".into()));
        check(Some("9"), None, None, Err("pipeline 9 is not a synced pipeline".into()));
        check(Some("main"), None, None, Err("pipeline_id \"main\" is not an AmoCRM pipeline id".into()));
    }

    #[test]
    fn bitrix24_placements() {
        use EntityType::{Deal, Lead};
        use Semantics::{Failure, Process, Success};
        let stages = vec![
            b24(Deal, 0, "NEW", 10, Process),
            b24(Deal, 0, "WON", 60, Success),
            b24(Deal, 1, "C1:LOSE", 5, Failure),
            b24(Deal, 1, "C1:NEW", 10, Process),
            b24(Lead, 0, "NEW", 10, Process),
            b24(Lead, 0, "CONVERTED", 20, Success),
        ];
        let deal = |c: i32, s: &str| Ok(LeadPlacement::Bitrix24Deal { category_id: c, stage_id: s.into() });
        let lead = |s: &str| Ok(LeadPlacement::Bitrix24Lead { status_id: s.into() });
        let check = |entity, pipeline: Option<&str>, stage: Option<&str>, expected| {
            assert_eq!(place_bitrix24(entity, pipeline, stage, None, &stages), expected, "{pipeline:?} {stage:?}");
        };
        check(Deal, None, None, deal(0, "NEW"));
        check(Deal, Some("1"), None, deal(1, "C1:NEW"));
        check(Deal, None, Some("C1:LOSE"), deal(1, "C1:LOSE"));
        check(Deal, Some("0"), Some("C1:NEW"), Err("stage_id \"C1:NEW\" is not a synced stage of category 0".into()));
        check(Deal, None, Some("CONVERTED"), Err("stage_id \"CONVERTED\" is not a synced deal stage".into()));
        check(Lead, None, None, lead("NEW"));
        check(Lead, None, Some("CONVERTED"), lead("CONVERTED"));
        check(Lead, None, Some("C1:NEW"), Err("stage_id \"C1:NEW\" is not a synced lead status".into()));
        check(
            Lead,
            Some("1"),
            None,
            Err("pipeline_id \"1\" given for a Bitrix24 lead: leads have no pipelines".into()),
        );
        let defaults = |category: Option<PipelineRef>, stage: Option<crate::config::Bitrix24StageRef>| {
            B24LeadDefaults { category, stage, responsible_user_id: None }
        };
        let check_default = |entity, d: B24LeadDefaults, expected: Result<Option<LeadPlacement>, String>| {
            assert_eq!(bitrix24_default(entity, &d, &stages), expected, "{d:?}");
        };
        check_default(Deal, defaults(None, None), Ok(None));
        check_default(Deal, defaults(Some(PipelineRef::Name("c1".into())), None), deal(1, "C1:NEW").map(Some));
        check_default(
            Deal,
            defaults(Some(PipelineRef::Id(7)), None),
            Err("category 7 matches no synced category".into()),
        );
        let named = crate::config::Bitrix24StageRef::Named { category: "C1".into(), stage: "c1:lose".into() };
        check_default(Deal, defaults(None, Some(named)), deal(1, "C1:LOSE").map(Some));
        let id = crate::config::Bitrix24StageRef::StatusId("CONVERTED".into());
        check_default(Lead, defaults(None, Some(id)), lead("CONVERTED").map(Some));
    }

    #[test]
    fn amocrm_defaults() {
        use crate::config::AmoStageRef;
        let stages = vec![
            amo(1, true, 11, 20, 0),
            amo(1, true, 142, 10000, 0),
            amo(2, false, 21, 20, 0),
            amo(2, false, 142, 10000, 0),
        ];
        let defaults = |pipeline: Option<PipelineRef>, stage: Option<AmoStageRef>| AmoLeadDefaults {
            pipeline,
            stage,
            ..AmoLeadDefaults::default()
        };
        let at = |p: i64, s: i64| Ok(Some(LeadPlacement::AmoCrm { pipeline_id: p, status_id: s }));
        let check = |d: AmoLeadDefaults, expected: Result<Option<LeadPlacement>, String>| {
            assert_eq!(amocrm_default(&d, &stages), expected, "{d:?}");
        };
        check(defaults(None, None), Ok(None));
        check(defaults(Some(PipelineRef::Name(" p2 ".into())), None), at(2, 21));
        check(defaults(None, Some(AmoStageRef::Id(21))), at(2, 21));
        check(defaults(Some(PipelineRef::Id(1)), Some(AmoStageRef::Id(142))), at(1, 142));
        check(
            defaults(None, Some(AmoStageRef::Id(142))),
            Err("stage 142 matches stages of several pipelines: set `pipeline` too".into()),
        );
        check(defaults(None, Some(AmoStageRef::Named { pipeline: "P1".into(), stage: "S11".into() })), at(1, 11));
    }
}
