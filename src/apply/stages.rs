//! A stage sync's write, the same for both CRMs: the flags mapped (or, on a
//! mapping error, kept), the plan against the stored rows, and one
//! transaction that writes the rows only if something changed and records
//! the outcome in the status row. It trusts the list to be whole (the CRM
//! clients return an error for any list that is not) and refuses an empty one.

use std::future::Future;

use serde_json::json;
use tokio_postgres::GenericClient;

use crate::config::{AmoStageRef, Bitrix24StageRef, StageMapping};
use crate::db::TenantDb;
use crate::db::queries::{self, QueryError, StatusUpdate};
use crate::model::{AmoStage, B24Stage, Crm, CrmState, EntityType, StageFlags};
use crate::reconcile::{Reference, StageMatch, StageRow, StoredStage, map_flags, plan_stages};

use super::Failure;

type PgResult<T> = Result<T, tokio_postgres::Error>;

/// A stage type with its table.
pub(crate) trait StageTable: StageRow + StageMatch<Self::Ref> + Send + Sync + Sized {
    type Ref: Reference + Send + Sync;
    /// Which rows of the table one sync owns (Bitrix24: the entity type).
    type Scope: Copy + Send + Sync;
    const CRM: Crm;
    const MAPPING: &'static str;

    fn read(
        tx: &(impl GenericClient + Sync),
        scope: Self::Scope,
    ) -> impl Future<Output = Result<Vec<StoredStage<Self>>, QueryError>> + Send;
    fn upsert(
        tx: &(impl GenericClient + Sync),
        rows: &[(Self, StageFlags)],
    ) -> impl Future<Output = PgResult<()>> + Send;
    fn mark_removed(tx: &(impl GenericClient + Sync), keys: &[Self::Key]) -> impl Future<Output = PgResult<()>> + Send;
}

impl StageTable for AmoStage {
    type Ref = AmoStageRef;
    type Scope = ();
    const CRM: Crm = Crm::AmoCrm;
    const MAPPING: &'static str = "amocrm.stages";

    fn read(
        tx: &(impl GenericClient + Sync),
        (): (),
    ) -> impl Future<Output = Result<Vec<StoredStage<Self>>, QueryError>> + Send {
        queries::read_amocrm_stages(tx)
    }

    fn upsert(
        tx: &(impl GenericClient + Sync),
        rows: &[(Self, StageFlags)],
    ) -> impl Future<Output = PgResult<()>> + Send {
        queries::upsert_amocrm_stages(tx, rows)
    }

    fn mark_removed(tx: &(impl GenericClient + Sync), keys: &[Self::Key]) -> impl Future<Output = PgResult<()>> + Send {
        queries::mark_amocrm_stages_removed(tx, keys)
    }
}

impl StageTable for B24Stage {
    type Ref = Bitrix24StageRef;
    type Scope = EntityType;
    const CRM: Crm = Crm::Bitrix24;
    const MAPPING: &'static str = "bitrix24.stages";

    fn read(
        tx: &(impl GenericClient + Sync),
        entity: EntityType,
    ) -> impl Future<Output = Result<Vec<StoredStage<Self>>, QueryError>> + Send {
        queries::read_bitrix24_stages(tx, entity)
    }

    fn upsert(
        tx: &(impl GenericClient + Sync),
        rows: &[(Self, StageFlags)],
    ) -> impl Future<Output = PgResult<()>> + Send {
        queries::upsert_bitrix24_stages(tx, rows)
    }

    fn mark_removed(tx: &(impl GenericClient + Sync), keys: &[Self::Key]) -> impl Future<Output = PgResult<()>> + Send {
        queries::mark_bitrix24_stages_removed(tx, keys)
    }
}

/// Writes a fetched stage list; returns the stage count and whether any row
/// changed. A mapping error keeps the stored flags, still syncs names and
/// order, and is recorded (event, status) before it is returned.
pub(crate) async fn sync_stages<S: StageTable>(
    db: &TenantDb,
    scope: S::Scope,
    mapping: &StageMapping<S::Ref>,
    stages: Vec<S>,
) -> Result<(usize, bool), Failure> {
    let crm = S::CRM.as_str();
    // Every AmoCRM pipeline has 142 and 143, every Bitrix24 category its
    // NEW, WON and LOSE: an empty list is a read that failed somewhere, and
    // would mark every stored stage removed.
    if stages.is_empty() {
        return Err(Failure::error("the CRM listed no stages at all; the stored stages are left as they were"));
    }
    let mapped = map_flags(&stages, mapping, S::MAPPING);
    let mut client = db.client().await?;
    let tx = client.transaction().await.map_err(|e| db.query_error("starting a transaction", e))?;
    queries::lock_stage_sync(&*tx, S::CRM).await.map_err(|e| db.query_error("locking the stage sync", e))?;
    let stored = S::read(&*tx, scope).await.map_err(|e| db.query_error("reading stages", e))?;
    let flags: Vec<StageFlags> = match &mapped {
        Ok(flags) => flags.clone(),
        Err(_) => stages
            .iter()
            .map(|s| stored.iter().find(|old| old.row.key() == s.key()).map(|old| old.flags).unwrap_or_default())
            .collect(),
    };
    let stage_count = stages.len();
    let plan = plan_stages(stages.into_iter().zip(flags).collect(), &stored);
    let changed = !plan.is_empty();
    if changed {
        S::upsert(&*tx, &plan.upserts).await.map_err(|e| db.query_error("writing stages", e))?;
        S::mark_removed(&*tx, &plan.removed).await.map_err(|e| db.query_error("marking removed stages", e))?;
        let detail = json!({
            "added": plan.added, "changed": plan.changed, "removed": plan.removed_labels,
            "restored": plan.restored, "flags_moved": plan.flags_moved,
        });
        queries::insert_event(&*tx, Some(crm), "stages_changed", &detail)
            .await
            .map_err(|e| db.query_error("recording an event", e))?;
    }
    let mapping_error = mapped.err().map(|e| format!("stage mapping: {e}"));
    if let Some(message) = &mapping_error {
        queries::insert_event(&*tx, Some(crm), "mapping_error", &json!({ "message": message }))
            .await
            .map_err(|e| db.query_error("recording an event", e))?;
    }
    let update = StatusUpdate {
        crm: S::CRM,
        state: if mapping_error.is_some() { CrmState::Error } else { CrmState::Connected },
        error: mapping_error.as_deref(),
        success: mapping_error.is_none(),
        stage_count: Some(i32::try_from(stage_count).unwrap_or(i32::MAX)),
    };
    queries::write_status(&*tx, &update).await.map_err(|e| db.query_error("writing status", e))?;
    tx.commit().await.map_err(|e| db.query_error("committing stages", e))?;
    match mapping_error {
        Some(message) => Err(Failure::error(message)),
        None => Ok((stage_count, changed)),
    }
}
