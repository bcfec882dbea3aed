//! A stage sync's write, the same for both CRMs: the plan of
//! [`plan_stage_sync`] against the stored rows, and one transaction that
//! writes the rows only if something changed and records the outcome in the
//! status row. It trusts the list to be whole (the CRM clients return an
//! error for any list that is not) and refuses an empty one.

use std::future::Future;

use serde_json::json;

use crate::config::{AmoStageRef, Bitrix24StageRef, StageMapping};
use crate::db::status::StatusUpdate;
use crate::db::{self, Conn, DbError, TenantDb};
use crate::failure::{Cause, FailureKind};
use crate::model::{AmoStage, B24Stage, Crm, CrmState, EntityType, StageFlags, StoredStage};
use crate::reconcile::{Reference, StageMatch, StageRow, plan_stage_sync};

/// A stage type with its table.
pub(crate) trait StageTable: StageRow + StageMatch<Self::Ref> + Send + Sync + Sized {
    type Ref: Reference + Send + Sync;
    /// Which rows of the table one sync owns (Bitrix24: the entity type).
    type Scope: Copy + Send + Sync;
    const CRM: Crm;
    const MAPPING: &'static str;

    fn lock(conn: &impl Conn) -> impl Future<Output = Result<(), DbError>> + Send;
    fn read(
        conn: &impl Conn,
        scope: Self::Scope,
    ) -> impl Future<Output = Result<Vec<StoredStage<Self>>, DbError>> + Send;
    fn upsert(conn: &impl Conn, rows: &[(Self, StageFlags)]) -> impl Future<Output = Result<(), DbError>> + Send;
    fn mark_removed(conn: &impl Conn, keys: &[Self::Key]) -> impl Future<Output = Result<(), DbError>> + Send;
}

impl StageTable for AmoStage {
    type Ref = AmoStageRef;
    type Scope = ();
    const CRM: Crm = Crm::AmoCrm;
    const MAPPING: &'static str = "amocrm.stages";

    fn lock(conn: &impl Conn) -> impl Future<Output = Result<(), DbError>> + Send {
        db::amocrm_stages::lock_sync(conn)
    }

    fn read(conn: &impl Conn, (): ()) -> impl Future<Output = Result<Vec<StoredStage<Self>>, DbError>> + Send {
        db::amocrm_stages::read(conn)
    }

    fn upsert(conn: &impl Conn, rows: &[(Self, StageFlags)]) -> impl Future<Output = Result<(), DbError>> + Send {
        db::amocrm_stages::upsert(conn, rows)
    }

    fn mark_removed(conn: &impl Conn, keys: &[Self::Key]) -> impl Future<Output = Result<(), DbError>> + Send {
        db::amocrm_stages::mark_removed(conn, keys)
    }
}

impl StageTable for B24Stage {
    type Ref = Bitrix24StageRef;
    type Scope = EntityType;
    const CRM: Crm = Crm::Bitrix24;
    const MAPPING: &'static str = "bitrix24.stages";

    fn lock(conn: &impl Conn) -> impl Future<Output = Result<(), DbError>> + Send {
        db::bitrix24_stages::lock_sync(conn)
    }

    fn read(
        conn: &impl Conn,
        entity: EntityType,
    ) -> impl Future<Output = Result<Vec<StoredStage<Self>>, DbError>> + Send {
        db::bitrix24_stages::read(conn, entity)
    }

    fn upsert(conn: &impl Conn, rows: &[(Self, StageFlags)]) -> impl Future<Output = Result<(), DbError>> + Send {
        db::bitrix24_stages::upsert(conn, rows)
    }

    fn mark_removed(conn: &impl Conn, keys: &[Self::Key]) -> impl Future<Output = Result<(), DbError>> + Send {
        db::bitrix24_stages::mark_removed(conn, keys)
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
) -> Result<(usize, bool), Cause> {
    // Every AmoCRM pipeline has 142 and 143, every Bitrix24 category its
    // NEW, WON and LOSE: an empty list is a read that failed somewhere, and
    // would mark every stored stage removed.
    if stages.is_empty() {
        return Err(Cause::new(
            FailureKind::Crm,
            "the CRM listed no stages at all; the stored stages are left as they were",
        ));
    }
    let mut session = db.session().await?;
    let tx = session.transaction().await?;
    S::lock(&tx).await?;
    let stored = S::read(&tx, scope).await?;
    let sync = plan_stage_sync(stages, mapping, S::MAPPING, &stored);
    let plan = &sync.plan;
    let changed = !plan.is_empty();
    if changed {
        S::upsert(&tx, &plan.upserts).await?;
        S::mark_removed(&tx, &plan.removed).await?;
        let detail = json!({
            "added": plan.added, "changed": plan.changed, "removed": plan.removed_labels,
            "restored": plan.restored, "flags_moved": plan.flags_moved,
        });
        db::events::insert(&tx, Some(S::CRM), "stages_changed", &detail).await?;
    }
    if let Some(message) = &sync.mapping_error {
        db::events::insert(&tx, Some(S::CRM), "mapping_error", &json!({ "message": message })).await?;
    }
    let update = StatusUpdate {
        crm: S::CRM,
        state: if sync.mapping_error.is_some() { CrmState::Error } else { CrmState::Connected },
        error: sync.mapping_error.as_deref(),
        success: sync.mapping_error.is_none(),
        stage_count: Some(i32::try_from(sync.stage_count).unwrap_or(i32::MAX)),
    };
    db::status::write(&tx, &update).await?;
    tx.commit().await?;
    match sync.mapping_error {
        Some(message) => Err(Cause::new(FailureKind::Config, message)),
        None => Ok((sync.stage_count, changed)),
    }
}
