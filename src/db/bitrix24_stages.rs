//! `bitrix24_pipeline_stages`: every stage of every deal category (or every
//! lead status) with its flags; rows the portal no longer lists keep their
//! flags and get `removed_at`.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::error::DbError;
use super::session::{Conn, col, flags, step, xact_lock};
use crate::model::{B24Stage, EntityType, Semantics, StageFlags, StoredStage};

const TABLE: &str = "bitrix24_pipeline_stages";

/// Serialises Bitrix24 stage syncs of one database until the transaction ends.
pub async fn lock_sync(conn: &impl Conn) -> Result<(), DbError> {
    xact_lock(conn, "locking the stage sync", 0x6372_6d2d_7374_6732).await
}

pub async fn read(conn: &impl Conn, entity_type: EntityType) -> Result<Vec<StoredStage<B24Stage>>, DbError> {
    step(conn, "reading stages", async {
        let rows = conn
            .pg()
            .query(
                "SELECT category_id, category_name, status_id, status_name, status_sort, semantics,
                        is_qualified_stage, is_success_stage, is_fail_stage, removed_at IS NOT NULL
                 FROM bitrix24_pipeline_stages WHERE entity_type = $1
                 ORDER BY category_id, status_sort, status_id",
                &[&entity_type.as_str()],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredStage {
                    row: B24Stage {
                        entity_type,
                        category_id: col(r, 0, TABLE)?,
                        category_name: col(r, 1, TABLE)?,
                        status_id: col(r, 2, TABLE)?,
                        status_name: col(r, 3, TABLE)?,
                        status_sort: col(r, 4, TABLE)?,
                        semantics: col::<Option<&str>>(r, 5, TABLE)?
                            .and_then(Semantics::parse)
                            .unwrap_or(Semantics::Process),
                    },
                    flags: flags(r, 6, TABLE)?,
                    removed: col(r, 9, TABLE)?,
                })
            })
            .collect()
    })
    .await
}

/// The flags of these (category, status) keys of `entity_type` (lead
/// statuses are category 0), removed stages included; keys without a row
/// are left out.
pub async fn flags_of(
    conn: &impl Conn,
    entity_type: EntityType,
    keys: &[(i32, String)],
) -> Result<HashMap<(i32, String), StageFlags>, DbError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let categories: Vec<i32> = keys.iter().map(|k| k.0).collect();
    let statuses: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    step(conn, "reading stage flags", async {
        let rows = conn
            .pg()
            .query(
                "SELECT s.category_id, s.status_id, s.is_qualified_stage, s.is_success_stage, s.is_fail_stage
                 FROM bitrix24_pipeline_stages AS s
                 JOIN unnest($2::integer[], $3::text[]) AS k(c, st) ON s.category_id = k.c AND s.status_id = k.st
                 WHERE s.entity_type = $1",
                &[&entity_type.as_str(), &categories, &statuses],
            )
            .await?;
        rows.iter().map(|r| Ok(((col(r, 0, TABLE)?, col(r, 1, TABLE)?), flags(r, 2, TABLE)?))).collect()
    })
    .await
}

/// Inserts or updates the given rows in one statement, clearing `removed_at`.
pub async fn upsert(conn: &impl Conn, stages: &[(B24Stage, StageFlags)]) -> Result<(), DbError> {
    if stages.is_empty() {
        return Ok(());
    }
    let entity_types: Vec<&str> = stages.iter().map(|(s, _)| s.entity_type.as_str()).collect();
    let category_ids: Vec<i32> = stages.iter().map(|(s, _)| s.category_id).collect();
    let category_names: Vec<&str> = stages.iter().map(|(s, _)| s.category_name.as_str()).collect();
    let status_ids: Vec<&str> = stages.iter().map(|(s, _)| s.status_id.as_str()).collect();
    let status_names: Vec<&str> = stages.iter().map(|(s, _)| s.status_name.as_str()).collect();
    let sorts: Vec<i32> = stages.iter().map(|(s, _)| s.status_sort).collect();
    let semantics: Vec<&str> = stages.iter().map(|(s, _)| s.semantics.as_str()).collect();
    let qualified: Vec<bool> = stages.iter().map(|(_, f)| f.qualified).collect();
    let success: Vec<bool> = stages.iter().map(|(_, f)| f.success).collect();
    let fail: Vec<bool> = stages.iter().map(|(_, f)| f.fail).collect();
    step(conn, "writing stages", async {
        conn.pg()
            .execute(
                "INSERT INTO bitrix24_pipeline_stages
                     (entity_type, category_id, category_name, status_id, status_name, status_sort, semantics,
                      is_qualified_stage, is_success_stage, is_fail_stage, synced_at, removed_at)
                 SELECT e, c, cn, s, sn, so, se, q, su, f, now(), NULL
                 FROM unnest($1::text[], $2::integer[], $3::text[], $4::text[], $5::text[], $6::integer[],
                             $7::text[], $8::boolean[], $9::boolean[], $10::boolean[])
                      AS u(e, c, cn, s, sn, so, se, q, su, f)
                 ON CONFLICT (entity_type, category_id, status_id) DO UPDATE SET
                     category_name = EXCLUDED.category_name, status_name = EXCLUDED.status_name,
                     status_sort = EXCLUDED.status_sort, semantics = EXCLUDED.semantics,
                     is_qualified_stage = EXCLUDED.is_qualified_stage,
                     is_success_stage = EXCLUDED.is_success_stage,
                     is_fail_stage = EXCLUDED.is_fail_stage, synced_at = now(), removed_at = NULL",
                &[
                    &entity_types,
                    &category_ids,
                    &category_names,
                    &status_ids,
                    &status_names,
                    &sorts,
                    &semantics,
                    &qualified,
                    &success,
                    &fail,
                ],
            )
            .await?;
        Ok(())
    })
    .await
}

/// Stamps `removed_at` on the rows of these (entity, category, status) keys.
pub async fn mark_removed(conn: &impl Conn, keys: &[(EntityType, i32, String)]) -> Result<(), DbError> {
    if keys.is_empty() {
        return Ok(());
    }
    let entity_types: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let category_ids: Vec<i32> = keys.iter().map(|k| k.1).collect();
    let status_ids: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    step(conn, "marking removed stages", async {
        conn.pg()
            .execute(
                "UPDATE bitrix24_pipeline_stages AS s SET removed_at = now(), synced_at = now()
                 FROM unnest($1::text[], $2::integer[], $3::text[]) AS k(e, c, st)
                 WHERE s.entity_type = k.e AND s.category_id = k.c AND s.status_id = k.st
                   AND s.removed_at IS NULL",
                &[&entity_types, &category_ids, &status_ids],
            )
            .await?;
        Ok(())
    })
    .await
}
