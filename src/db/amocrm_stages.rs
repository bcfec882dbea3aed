//! `amocrm_pipeline_stages`: every status of every AmoCRM pipeline with its
//! flags; rows the CRM no longer lists keep their flags and get `removed_at`.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::error::DbError;
use super::session::{Conn, col, flags, step, xact_lock};
use crate::model::{AmoStage, StageFlags, StoredStage};

const TABLE: &str = "amocrm_pipeline_stages";

/// Serialises AmoCRM stage syncs of one database until the transaction ends.
pub async fn lock_sync(conn: &impl Conn) -> Result<(), DbError> {
    xact_lock(conn, "locking the stage sync", 0x6372_6d2d_7374_6731).await
}

pub async fn read(conn: &impl Conn) -> Result<Vec<StoredStage<AmoStage>>, DbError> {
    step(conn, "reading stages", async {
        let rows = conn
            .pg()
            .query(
                "SELECT pipeline_id, pipeline_name, pipeline_is_main, status_id, status_name, status_sort, status_type,
                        is_qualified_stage, is_success_stage, is_fail_stage, removed_at IS NOT NULL
                 FROM amocrm_pipeline_stages ORDER BY pipeline_id, status_sort, status_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredStage {
                    row: AmoStage {
                        pipeline_id: col(r, 0, TABLE)?,
                        pipeline_name: col(r, 1, TABLE)?,
                        pipeline_is_main: col(r, 2, TABLE)?,
                        status_id: col(r, 3, TABLE)?,
                        status_name: col(r, 4, TABLE)?,
                        status_sort: col(r, 5, TABLE)?,
                        status_type: col(r, 6, TABLE)?,
                    },
                    flags: flags(r, 7, TABLE)?,
                    removed: col(r, 10, TABLE)?,
                })
            })
            .collect()
    })
    .await
}

/// The flags of these (pipeline, status) keys, removed stages included
/// (a change into a stage since deleted keeps the flags it had); keys
/// without a row are left out.
pub async fn flags_of(conn: &impl Conn, keys: &[(i64, i64)]) -> Result<HashMap<(i64, i64), StageFlags>, DbError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let pipelines: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let statuses: Vec<i64> = keys.iter().map(|k| k.1).collect();
    step(conn, "reading stage flags", async {
        let rows = conn
            .pg()
            .query(
                "SELECT s.pipeline_id, s.status_id, s.is_qualified_stage, s.is_success_stage, s.is_fail_stage
                 FROM amocrm_pipeline_stages AS s
                 JOIN unnest($1::bigint[], $2::bigint[]) AS k(p, st) ON s.pipeline_id = k.p AND s.status_id = k.st",
                &[&pipelines, &statuses],
            )
            .await?;
        rows.iter().map(|r| Ok(((col(r, 0, TABLE)?, col(r, 1, TABLE)?), flags(r, 2, TABLE)?))).collect()
    })
    .await
}

/// Inserts or updates the given rows in one statement, clearing `removed_at`.
pub async fn upsert(conn: &impl Conn, stages: &[(AmoStage, StageFlags)]) -> Result<(), DbError> {
    if stages.is_empty() {
        return Ok(());
    }
    let pipeline_ids: Vec<i64> = stages.iter().map(|(s, _)| s.pipeline_id).collect();
    let status_ids: Vec<i64> = stages.iter().map(|(s, _)| s.status_id).collect();
    let pipeline_names: Vec<&str> = stages.iter().map(|(s, _)| s.pipeline_name.as_str()).collect();
    let status_names: Vec<&str> = stages.iter().map(|(s, _)| s.status_name.as_str()).collect();
    let mains: Vec<bool> = stages.iter().map(|(s, _)| s.pipeline_is_main).collect();
    let sorts: Vec<i32> = stages.iter().map(|(s, _)| s.status_sort).collect();
    let types: Vec<i32> = stages.iter().map(|(s, _)| s.status_type).collect();
    let qualified: Vec<bool> = stages.iter().map(|(_, f)| f.qualified).collect();
    let success: Vec<bool> = stages.iter().map(|(_, f)| f.success).collect();
    let fail: Vec<bool> = stages.iter().map(|(_, f)| f.fail).collect();
    step(conn, "writing stages", async {
        conn.pg()
            .execute(
                "INSERT INTO amocrm_pipeline_stages
                     (pipeline_id, pipeline_name, pipeline_is_main, status_id, status_name, status_sort, status_type,
                      is_qualified_stage, is_success_stage, is_fail_stage, synced_at, removed_at)
                 SELECT p, pn, m, s, sn, so, t, q, su, f, now(), NULL
                 FROM unnest($1::bigint[], $2::text[], $3::boolean[], $4::bigint[], $5::text[], $6::integer[],
                             $7::integer[], $8::boolean[], $9::boolean[], $10::boolean[])
                      AS u(p, pn, m, s, sn, so, t, q, su, f)
                 ON CONFLICT (pipeline_id, status_id) DO UPDATE SET
                     pipeline_name = EXCLUDED.pipeline_name, pipeline_is_main = EXCLUDED.pipeline_is_main,
                     status_name = EXCLUDED.status_name, status_sort = EXCLUDED.status_sort,
                     status_type = EXCLUDED.status_type, is_qualified_stage = EXCLUDED.is_qualified_stage,
                     is_success_stage = EXCLUDED.is_success_stage, is_fail_stage = EXCLUDED.is_fail_stage,
                     synced_at = now(), removed_at = NULL",
                &[
                    &pipeline_ids,
                    &pipeline_names,
                    &mains,
                    &status_ids,
                    &status_names,
                    &sorts,
                    &types,
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

/// Stamps `removed_at` on the rows of these (pipeline, status) keys.
pub async fn mark_removed(conn: &impl Conn, keys: &[(i64, i64)]) -> Result<(), DbError> {
    if keys.is_empty() {
        return Ok(());
    }
    let pipelines: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let statuses: Vec<i64> = keys.iter().map(|k| k.1).collect();
    step(conn, "marking removed stages", async {
        conn.pg()
            .execute(
                "UPDATE amocrm_pipeline_stages AS s SET removed_at = now(), synced_at = now()
                 FROM unnest($1::bigint[], $2::bigint[]) AS k(p, st)
                 WHERE s.pipeline_id = k.p AND s.status_id = k.st AND s.removed_at IS NULL",
                &[&pipelines, &statuses],
            )
            .await?;
        Ok(())
    })
    .await
}
