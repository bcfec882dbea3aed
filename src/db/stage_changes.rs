//! `crm_stage_changes`: the funnel's rows, only ever inserted. Every
//! inserting transaction first takes one advisory lock, so `id` is assigned
//! and committed in one order by every process and a reader keeping
//! "`id` > last seen" misses nothing; a change already stored (same `crm`
//! and `source_event_id`) is skipped, never rewritten.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::error::{DbError, QueryError};
use super::session::{Conn, Tx, col, step, xact_lock};
use crate::model::{ChangeKind, Crm, EntityType, Semantics, StageChange, StageFlags, StoredChange};

const TABLE: &str = "crm_stage_changes";

/// The advisory lock every inserting transaction takes first ("crm-funl"
/// in ASCII): held to the commit, it makes ids commit in the order they
/// were assigned. Cursor writes take it too (`cursors`), so a transaction
/// holding it never waits for another's cursor row. The one lock that may
/// come before it is a delivery's own outbox row, which funnel writers
/// never lock.
pub const INSERT_LOCK: i64 = 0x6372_6d2d_6675_6e6c;

/// Takes the insert lock until the transaction ends; taking it again in
/// the same transaction is free.
pub async fn lock(tx: &Tx<'_>) -> Result<(), DbError> {
    xact_lock(tx, "locking the funnel history", INSERT_LOCK).await
}

/// Inserts the changes in one statement after taking the insert lock;
/// those already stored are skipped. How many were new.
pub async fn insert(tx: &Tx<'_>, changes: &[StageChange]) -> Result<u64, DbError> {
    lock(tx).await?;
    if changes.is_empty() {
        return Ok(0);
    }
    let text = |f: fn(&StageChange) -> Option<&str>| changes.iter().map(f).collect::<Vec<Option<&str>>>();
    let crms: Vec<&str> = changes.iter().map(|c| c.crm.as_str()).collect();
    let sources: Vec<&str> = changes.iter().map(|c| c.source_event_id.as_str()).collect();
    let entity_types: Vec<&str> = changes.iter().map(|c| c.entity_type.as_str()).collect();
    let entity_ids: Vec<i64> = changes.iter().map(|c| c.entity_id).collect();
    let pipelines_from = text(|c| c.pipeline_from.as_deref());
    let stages_from = text(|c| c.stage_from.as_deref());
    let pipelines_to = text(|c| c.pipeline_to.as_deref());
    let stages_to: Vec<&str> = changes.iter().map(|c| c.stage_to.as_str()).collect();
    let kinds: Vec<&str> = changes.iter().map(|c| c.change_kind.as_str()).collect();
    let semantics = text(|c| c.semantic.map(Semantics::as_str));
    let flag = |f: fn(&StageFlags) -> bool| changes.iter().map(|c| c.flags.as_ref().map(f)).collect::<Vec<_>>();
    let (qualified, success, fail) = (flag(|f| f.qualified), flag(|f| f.success), flag(|f| f.fail));
    let changed_at: Vec<DateTime<Utc>> = changes.iter().map(|c| c.changed_at).collect();
    let number = |f: fn(&StageChange) -> Option<i64>| changes.iter().map(f).collect::<Vec<Option<i64>>>();
    let (changed_by, responsible, outbox) =
        (number(|c| c.changed_by_user_id), number(|c| c.responsible_user_id), number(|c| c.outbox_id));
    step(tx, "inserting stage changes", async {
        // Ids follow the order given: a reader sees an entity's changes in order.
        Ok(tx
            .pg()
            .execute(
                "INSERT INTO crm_stage_changes
                     (crm, source_event_id, entity_type, entity_id, pipeline_from, stage_from, pipeline_to, stage_to,
                      change_kind, semantic, is_qualified_stage, is_success_stage, is_fail_stage, changed_at,
                      changed_by_user_id, responsible_user_id, outbox_id)
                 SELECT c, s, et, e, pf, sf, pt, st, k, se, q, su, f, ca, cb, r, o
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                             $8::text[], $9::text[], $10::text[], $11::boolean[], $12::boolean[], $13::boolean[],
                             $14::timestamptz[], $15::bigint[], $16::bigint[], $17::bigint[])
                      WITH ORDINALITY AS u(c, s, et, e, pf, sf, pt, st, k, se, q, su, f, ca, cb, r, o, n)
                 ORDER BY n
                 ON CONFLICT (crm, source_event_id) DO NOTHING",
                &[
                    &crms,
                    &sources,
                    &entity_types,
                    &entity_ids,
                    &pipelines_from,
                    &stages_from,
                    &pipelines_to,
                    &stages_to,
                    &kinds,
                    &semantics,
                    &qualified,
                    &success,
                    &fail,
                    &changed_at,
                    &changed_by,
                    &responsible,
                    &outbox,
                ],
            )
            .await?)
    })
    .await
}

const COLUMNS: &str = "id, crm, source_event_id, entity_type, entity_id, pipeline_from, stage_from, pipeline_to,
     stage_to, change_kind, semantic, is_qualified_stage, is_success_stage, is_fail_stage, changed_at,
     changed_by_user_id, responsible_user_id, outbox_id, ingested_at";

fn stored(row: &tokio_postgres::Row) -> Result<StoredChange, QueryError> {
    let unknown = |column: &str, value: &str| QueryError::Column {
        table: TABLE,
        column: column.into(),
        reason: format!("unknown value {value:?}"),
    };
    let crm: String = col(row, 1, TABLE)?;
    let entity_type: String = col(row, 3, TABLE)?;
    let kind: String = col(row, 9, TABLE)?;
    let semantic: Option<String> = col(row, 10, TABLE)?;
    let flags: [Option<bool>; 3] = [col(row, 11, TABLE)?, col(row, 12, TABLE)?, col(row, 13, TABLE)?];
    let change = StageChange {
        crm: Crm::ALL.into_iter().find(|c| c.as_str() == crm).ok_or_else(|| unknown("crm", &crm))?,
        source_event_id: col(row, 2, TABLE)?,
        entity_type: EntityType::parse(&entity_type).ok_or_else(|| unknown("entity_type", &entity_type))?,
        entity_id: col(row, 4, TABLE)?,
        pipeline_from: col(row, 5, TABLE)?,
        stage_from: col(row, 6, TABLE)?,
        pipeline_to: col(row, 7, TABLE)?,
        stage_to: col(row, 8, TABLE)?,
        change_kind: ChangeKind::parse(&kind).ok_or_else(|| unknown("change_kind", &kind))?,
        semantic: semantic.as_deref().map(|s| Semantics::parse(s).ok_or_else(|| unknown("semantic", s))).transpose()?,
        // Written all three or none.
        flags: match flags {
            [Some(qualified), Some(success), Some(fail)] => Some(StageFlags { qualified, success, fail }),
            _ => None,
        },
        changed_at: col(row, 14, TABLE)?,
        changed_by_user_id: col(row, 15, TABLE)?,
        responsible_user_id: col(row, 16, TABLE)?,
        outbox_id: col(row, 17, TABLE)?,
    };
    Ok(StoredChange { id: col(row, 0, TABLE)?, change, ingested_at: col(row, 18, TABLE)? })
}

/// Rows after `after_id`, by id, at most `limit`: what a reader with a
/// cursor sees.
pub async fn read_after(conn: &impl Conn, after_id: i64, limit: i64) -> Result<Vec<StoredChange>, DbError> {
    step(conn, "reading stage changes", async {
        let sql = format!("SELECT {COLUMNS} FROM crm_stage_changes WHERE id > $1 ORDER BY id LIMIT $2");
        conn.pg().query(&sql, &[&after_id, &limit]).await?.iter().map(stored).collect()
    })
    .await
}

/// The highest-id row of each of these entities that has one: where the
/// entity stood when its last stored change was ingested (the from-stage of
/// its next change).
pub async fn latest_of(
    conn: &impl Conn,
    crm: Crm,
    entity_type: EntityType,
    entity_ids: &[i64],
) -> Result<HashMap<i64, StoredChange>, DbError> {
    if entity_ids.is_empty() {
        return Ok(HashMap::new());
    }
    step(conn, "reading the latest stage changes", async {
        // One index probe per entity, on (crm, entity_type, entity_id, id).
        let sql = format!(
            "SELECT c.* FROM unnest($3::bigint[]) AS e(entity_id)
             CROSS JOIN LATERAL (
                 SELECT {COLUMNS} FROM crm_stage_changes
                 WHERE crm = $1 AND entity_type = $2 AND entity_id = e.entity_id
                 ORDER BY id DESC LIMIT 1
             ) AS c"
        );
        let rows = conn.pg().query(&sql, &[&crm.as_str(), &entity_type.as_str(), &entity_ids]).await?;
        rows.iter().map(|r| stored(r).map(|s| (s.change.entity_id, s))).collect()
    })
    .await
}

/// Which of these changes of `crm` are stored already (by
/// `source_event_id`): a re-read window or record needs nothing looked up
/// for them.
pub async fn stored_sources(conn: &impl Conn, crm: Crm, source_ids: &[String]) -> Result<HashSet<String>, DbError> {
    if source_ids.is_empty() {
        return Ok(HashSet::new());
    }
    step(conn, "reading stored stage changes", async {
        let rows = conn
            .pg()
            .query(
                "SELECT source_event_id FROM crm_stage_changes WHERE crm = $1 AND source_event_id = ANY($2::text[])",
                &[&crm.as_str(), &source_ids],
            )
            .await?;
        rows.iter().map(|r| col(r, 0, TABLE)).collect()
    })
    .await
}

/// Which of these entities have the `created` row a delivery writes
/// (`outbox:<id>`): their CRM's own creation record is not stored again.
pub async fn created_by_delivery(
    conn: &impl Conn,
    crm: Crm,
    entity_type: EntityType,
    entity_ids: &[i64],
) -> Result<HashSet<i64>, DbError> {
    if entity_ids.is_empty() {
        return Ok(HashSet::new());
    }
    step(conn, "reading delivered creations", async {
        let rows = conn
            .pg()
            .query(
                "SELECT DISTINCT entity_id FROM crm_stage_changes
                 WHERE crm = $1 AND entity_type = $2 AND entity_id = ANY($3::bigint[])
                   AND change_kind = 'created' AND source_event_id LIKE 'outbox:%'",
                &[&crm.as_str(), &entity_type.as_str(), &entity_ids],
            )
            .await?;
        rows.iter().map(|r| col(r, 0, TABLE)).collect()
    })
    .await
}
