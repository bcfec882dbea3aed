//! The flag mapping: which stages are qualified, success and fail, from the
//! tenant's references and the CRM's own meaning of a stage. One copy for
//! both CRMs; an unknown reference is an error that names the closest stages.

use std::fmt::Display;

use crate::config::{AmoStageRef, Bitrix24StageRef, StageMapping, normalize_name};
use crate::model::{AmoStage, B24Stage, Semantics, StageFlags};

/// What the mapping needs to know of a stage.
pub trait StageMatch<R> {
    fn matches(&self, reference: &R) -> bool;
    /// `"Pipeline" / "Stage" (ID)`, for messages.
    fn label(&self) -> String;
    /// The CRM's own meaning, used when the tenant lists no success / fail.
    fn default_success(&self) -> bool;
    fn default_fail(&self) -> bool;
    /// Text a reference is compared with to suggest the closest stages.
    fn similarity_key(&self, by_id: bool) -> String;
}

/// What a reference offers for suggestions.
pub trait Reference: Display {
    /// Compared by id (`true`) or by names.
    fn by_id(&self) -> bool;
    fn similarity_key(&self) -> String;
}

impl Reference for AmoStageRef {
    fn by_id(&self) -> bool {
        matches!(self, AmoStageRef::Id(_))
    }

    fn similarity_key(&self) -> String {
        match self {
            AmoStageRef::Id(id) => id.to_string(),
            AmoStageRef::Named { pipeline, stage } => {
                format!("{} / {}", normalize_name(pipeline), normalize_name(stage))
            }
        }
    }
}

impl Reference for Bitrix24StageRef {
    fn by_id(&self) -> bool {
        matches!(self, Bitrix24StageRef::StatusId(_))
    }

    fn similarity_key(&self) -> String {
        match self {
            Bitrix24StageRef::StatusId(id) => id.clone(),
            Bitrix24StageRef::Named { category, stage } => {
                format!("{} / {}", normalize_name(category), normalize_name(stage))
            }
        }
    }
}

/// References that match no stage (with the closest stages), or stages that
/// end up both success and fail. The flags are then left as they were.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct MappingError {
    pub problems: Vec<String>,
}

/// The flags of every stage, in the order given, or why they cannot be set.
/// `table` names the mapping in messages (`amocrm.stages`).
pub fn map_flags<S, R>(stages: &[S], mapping: &StageMapping<R>, table: &str) -> Result<Vec<StageFlags>, MappingError>
where
    S: StageMatch<R>,
    R: Reference,
{
    let mut flags = vec![StageFlags::default(); stages.len()];
    let mut problems = Vec::new();
    let mut apply = |list: &str, references: &[R], flags: &mut [StageFlags], set: fn(&mut StageFlags)| {
        for reference in references {
            let mut matched = false;
            for (stage, flag) in stages.iter().zip(flags.iter_mut()) {
                if stage.matches(reference) {
                    set(flag);
                    matched = true;
                }
            }
            if !matched {
                problems.push(unknown_reference(stages, reference, &format!("{table}.{list}")));
            }
        }
    };
    apply("qualified", &mapping.qualified, &mut flags, |f| f.qualified = true);
    match &mapping.success {
        Some(list) => apply("success", list, &mut flags, |f| f.success = true),
        None => stages.iter().zip(flags.iter_mut()).for_each(|(s, f)| f.success = s.default_success()),
    }
    match &mapping.fail {
        Some(list) => apply("fail", list, &mut flags, |f| f.fail = true),
        None => stages.iter().zip(flags.iter_mut()).for_each(|(s, f)| f.fail = s.default_fail()),
    }
    for (stage, flag) in stages.iter().zip(&flags) {
        if flag.success && flag.fail {
            problems.push(format!("stage {} would be both success and fail in {table}", stage.label()));
        }
    }
    if problems.is_empty() { Ok(flags) } else { Err(MappingError { problems }) }
}

fn unknown_reference<S: StageMatch<R>, R: Reference>(stages: &[S], reference: &R, list: &str) -> String {
    let wanted = reference.similarity_key();
    let mut scored: Vec<(f64, String)> = stages
        .iter()
        .map(|s| (strsim::jaro_winkler(&wanted, &s.similarity_key(reference.by_id())), s.label()))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    let closest: Vec<String> = scored.into_iter().take(3).map(|(_, label)| label).collect();
    if closest.is_empty() {
        format!("`{list}`: {reference} matches no stage (the CRM lists none)")
    } else {
        format!("`{list}`: {reference} matches no stage; closest: {}", closest.join(", "))
    }
}

impl StageMatch<AmoStageRef> for AmoStage {
    fn matches(&self, reference: &AmoStageRef) -> bool {
        match reference {
            AmoStageRef::Id(id) => self.status_id == *id,
            AmoStageRef::Named { pipeline, stage } => {
                normalize_name(&self.pipeline_name) == normalize_name(pipeline)
                    && normalize_name(&self.status_name) == normalize_name(stage)
            }
        }
    }

    fn label(&self) -> String {
        format!("{:?} / {:?} ({})", self.pipeline_name, self.status_name, self.status_id)
    }

    fn default_success(&self) -> bool {
        self.status_id == AMOCRM_WON
    }

    fn default_fail(&self) -> bool {
        self.status_id == AMOCRM_LOST
    }

    fn similarity_key(&self, by_id: bool) -> String {
        if by_id {
            self.status_id.to_string()
        } else {
            format!("{} / {}", normalize_name(&self.pipeline_name), normalize_name(&self.status_name))
        }
    }
}

impl StageMatch<Bitrix24StageRef> for B24Stage {
    fn matches(&self, reference: &Bitrix24StageRef) -> bool {
        match reference {
            Bitrix24StageRef::StatusId(id) => &self.status_id == id,
            Bitrix24StageRef::Named { category, stage } => {
                normalize_name(&self.category_name) == normalize_name(category)
                    && normalize_name(&self.status_name) == normalize_name(stage)
            }
        }
    }

    fn label(&self) -> String {
        format!("{:?} / {:?} ({})", self.category_name, self.status_name, self.status_id)
    }

    fn default_success(&self) -> bool {
        self.semantics == Semantics::Success
    }

    fn default_fail(&self) -> bool {
        self.semantics == Semantics::Failure
    }

    fn similarity_key(&self, by_id: bool) -> String {
        if by_id {
            self.status_id.clone()
        } else {
            format!("{} / {}", normalize_name(&self.category_name), normalize_name(&self.status_name))
        }
    }
}

/// AmoCRM's system statuses, the same ids in every pipeline.
pub const AMOCRM_WON: i64 = 142;
pub const AMOCRM_LOST: i64 = 143;

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(pipeline_id: i64, pipeline: &str, status_id: i64, status: &str) -> AmoStage {
        AmoStage {
            pipeline_id,
            pipeline_name: pipeline.into(),
            pipeline_is_main: false,
            status_id,
            status_name: status.into(),
            status_sort: 0,
            status_type: 0,
        }
    }

    fn stages() -> Vec<AmoStage> {
        vec![
            stage(1, "Воронка", 10, "Переговоры"),
            stage(1, "Воронка", 142, "Успешно реализовано"),
            stage(1, "Воронка", 143, "Закрыто и не реализовано"),
            stage(2, "Продажи", 20, "Квалифицирован"),
            stage(2, "Продажи", 142, "Успешно реализовано"),
            stage(2, "Продажи", 143, "Закрыто и не реализовано"),
        ]
    }

    fn flags(f: &[StageFlags]) -> Vec<(bool, bool, bool)> {
        f.iter().map(|f| (f.qualified, f.success, f.fail)).collect()
    }

    #[test]
    fn defaults_flag_142_and_143_in_every_pipeline() {
        let mapping = StageMapping::default();
        let got = map_flags(&stages(), &mapping, "amocrm.stages").unwrap();
        assert_eq!(
            flags(&got),
            [
                (false, false, false),
                (false, true, false),
                (false, false, true),
                (false, false, false),
                (false, true, false),
                (false, false, true)
            ]
        );
    }

    #[test]
    fn names_match_case_insensitively_and_ids_in_every_pipeline() {
        let mapping = StageMapping {
            qualified: vec![AmoStageRef::Named {
                pipeline: " продажи".into(), stage: "КВАЛИФИЦИРОВАН".into()
            }],
            success: Some(vec![AmoStageRef::Id(142), AmoStageRef::Id(10)]),
            fail: None,
        };
        let got = map_flags(&stages(), &mapping, "amocrm.stages").unwrap();
        assert_eq!(flags(&got)[3], (true, false, false));
        assert_eq!(flags(&got)[0], (false, true, false));
        assert_eq!(flags(&got)[4], (false, true, false));
    }

    #[test]
    fn an_unknown_reference_names_the_closest_stages() {
        let mapping = StageMapping {
            qualified: vec![AmoStageRef::Named {
                pipeline: "Продажи".into(), stage: "Квалифицированный".into()
            }],
            ..StageMapping::default()
        };
        let err = map_flags(&stages(), &mapping, "amocrm.stages").unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(
            err.problems[0].starts_with(
                "`amocrm.stages.qualified`: \"Продажи\" / \"Квалифицированный\" matches no stage; closest: \"Продажи\" / \"Квалифицирован\" (20)"
            ),
            "{}",
            err.problems[0]
        );
    }

    #[test]
    fn a_stage_cannot_end_up_both_success_and_fail() {
        let mapping = StageMapping {
            success: Some(vec![AmoStageRef::Id(10)]),
            fail: Some(vec![AmoStageRef::Id(10)]),
            ..Default::default()
        };
        let err = map_flags(&stages(), &mapping, "amocrm.stages").unwrap_err();
        assert!(err.problems[0].contains("both success and fail"), "{err}");
    }
}
