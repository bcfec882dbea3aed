//! Every decision as a pure plan: the `config` columns, the stage rows and
//! their flags, the token steps, the webhook grant, lead delivery and
//! funnel history. No I/O, so planning twice on the same inputs gives the
//! same plan, and planning on a synced state gives none. `apply` and
//! `tokens` execute these plans; the dry run renders them.

mod columns;
pub mod delivery;
pub mod funnel;
mod mapping;
pub mod placement;
mod stages;
pub mod tokens;
mod webhook;

pub use crate::model::{ColumnValue, ConfigColumn, CurrentColumns, StoredStage};
pub use columns::{amocrm_account_changed, config_changes, desired_columns};
pub use mapping::{AMOCRM_LOST, AMOCRM_WON, MappingError, Reference, StageMatch, map_flags};
pub use stages::{StagePlan, StageRow, StageSync, plan_stage_sync, plan_stages};
pub use webhook::{WebhookProblem, check_grant};
