//! An AmoCRM stage as the API lists it, and the funnel flags a stage of
//! either CRM maps to.

/// One status of one AmoCRM pipeline, as the API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmoStage {
    pub pipeline_id: i64,
    pub pipeline_name: String,
    pub pipeline_is_main: bool,
    pub status_id: i64,
    pub status_name: String,
    pub status_sort: i32,
    pub status_type: i32,
}

/// The funnel flags downstream jobs read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageFlags {
    pub qualified: bool,
    pub success: bool,
    pub fail: bool,
}
