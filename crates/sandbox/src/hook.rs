//! Why a test hook of a sandbox (a lead moved, a user reassigned, a record
//! committed) refused: the change it asked for could not happen in the CRM
//! emulated. Only hooks return these; the HTTP side answers as the CRM does.

/// A test hook's refusal; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("the sandbox holds no {kind} {id}")]
    UnknownEntity { kind: &'static str, id: i64 },
    #[error("the sandbox has no pipeline {0}")]
    UnknownPipeline(i64),
    #[error("{stage} is not a stage of {place}")]
    UnknownStage { stage: String, place: String },
    #[error("{kind} {id} is already in pipeline {pipeline}: a move within it is no pipeline change")]
    SamePipeline { kind: &'static str, id: i64, pipeline: i64 },
    #[error("the reservation is for {reserved} history, the change for {changed}")]
    ReservationMismatch { reserved: &'static str, changed: &'static str },
}
