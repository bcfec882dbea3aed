//! Desired versus actual, as plans of changes: the `config` columns, the
//! stage rows and their flags. Pure: no I/O, so planning twice on the same
//! inputs gives the same plan, and planning on a synced state gives none.

mod columns;
mod mapping;
mod stages;

pub use columns::{ColumnValue, ConfigColumn, CurrentColumns, amocrm_account_changed, config_changes, desired_columns};
pub use mapping::{AMOCRM_LOST, AMOCRM_WON, MappingError, Reference, StageMatch, map_flags};
pub use stages::{StagePlan, StageRow, StoredStage, plan_stages};
