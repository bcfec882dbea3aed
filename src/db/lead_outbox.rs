//! `crm_lead_outbox`: what a delivery pass reads (one statement on the
//! partial index), the due row it takes (`FOR UPDATE SKIP LOCKED`), and
//! every transition — each one statement, conditional on the state and
//! attempts last seen, so two processes never act on one row.

use std::time::Duration;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::error::{DbError, QueryError};
use super::session::{Conn, col, step};
use crate::model::{CreatedIds, Crm, EntityType, OutboxRow, OutboxState};

const TABLE: &str = "crm_lead_outbox";

/// What a pass starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub pending: i64,
    pub sending: i64,
    pub oldest_pending: Option<DateTime<Utc>>,
    pub earliest_due: Option<DateTime<Utc>>,
    /// Whether a row is due now (by the database's clock).
    pub due_now: bool,
}

/// One statement on the partial index: an idle outbox costs exactly this.
/// Sent unprepared (parse, bind and execute in one message), so that it
/// takes one round trip on the fresh connection each idle poll opens.
pub async fn summary(conn: &impl Conn) -> Result<Summary, DbError> {
    step(conn, "reading the outbox", async {
        let row = conn
            .pg()
            .query_typed_one(
                "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'sending'),
                        min(created_at) FILTER (WHERE state = 'pending'), min(next_attempt_at),
                        coalesce(min(next_attempt_at) <= now(), false)
                 FROM crm_lead_outbox WHERE state IN ('pending', 'sending')",
                &[],
            )
            .await?;
        Ok(Summary {
            pending: col(&row, 0, TABLE)?,
            sending: col(&row, 1, TABLE)?,
            oldest_pending: col(&row, 2, TABLE)?,
            earliest_due: col(&row, 3, TABLE)?,
            due_now: col(&row, 4, TABLE)?,
        })
    })
    .await
}

const ROW_COLUMNS: &str = "id, delivery_key::text, title, contact_name, phone, email, comment, price::float8, source,
     utm_source, utm_medium, utm_campaign, utm_content, utm_term, pipeline_id, stage_id, responsible_user_id,
     extra, state, attempts, crm, crm_contact_id, last_attempt_at";

fn outbox_row(row: &tokio_postgres::Row) -> Result<OutboxRow, QueryError> {
    let text = |i| col::<Option<String>>(row, i, TABLE);
    let state: String = col(row, 18, TABLE)?;
    let crm: Option<String> = col(row, 20, TABLE)?;
    Ok(OutboxRow {
        id: col(row, 0, TABLE)?,
        delivery_key: col(row, 1, TABLE)?,
        title: text(2)?,
        contact_name: text(3)?,
        phone: text(4)?,
        email: text(5)?,
        comment: text(6)?,
        price: col(row, 7, TABLE)?,
        source: text(8)?,
        utm: [text(9)?, text(10)?, text(11)?, text(12)?, text(13)?],
        pipeline_id: text(14)?,
        stage_id: text(15)?,
        responsible_user_id: col(row, 16, TABLE)?,
        extra: col(row, 17, TABLE)?,
        state: OutboxState::parse(&state).ok_or_else(|| QueryError::Column {
            table: TABLE,
            column: "state".into(),
            reason: format!("unknown state {state:?}"),
        })?,
        attempts: col(row, 19, TABLE)?,
        crm: crm.as_deref().and_then(|c| Crm::ALL.into_iter().find(|k| k.as_str() == c)),
        crm_contact_id: col(row, 21, TABLE)?,
        last_attempt_at: col(row, 22, TABLE)?,
    })
}

/// Takes the next due row (`pending` to send, `sending` to look up), by
/// `next_attempt_at` then `id`, locked until the transaction ends; rows
/// another process holds are skipped.
pub async fn take_due(conn: &impl Conn) -> Result<Option<OutboxRow>, DbError> {
    step(conn, "taking an outbox row", async {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM crm_lead_outbox
             WHERE state IN ('pending', 'sending') AND next_attempt_at <= now()
             ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
        );
        conn.pg().query_opt(&sql, &[]).await?.map(|row| outbox_row(&row)).transpose()
    })
    .await
}

/// Reads one row (tests and `status`).
pub async fn read(conn: &impl Conn, id: i64) -> Result<Option<OutboxRow>, DbError> {
    step(conn, "reading an outbox row", async {
        let sql = format!("SELECT {ROW_COLUMNS} FROM crm_lead_outbox WHERE id = $1");
        conn.pg().query_opt(&sql, &[&id]).await?.map(|row| outbox_row(&row)).transpose()
    })
    .await
}

/// Step 1, in the transaction that took the row: `sending` to `crm`, the
/// attempt counted, its lookup scheduled `lookup_after` from now (a row left
/// `sending` by a crash needs nothing more).
pub async fn mark_sending(conn: &impl Conn, id: i64, crm: Crm, lookup_after: Duration) -> Result<(), DbError> {
    let secs = lookup_after.as_secs_f64();
    execute(
        conn,
        "marking a lead as sending",
        "UPDATE crm_lead_outbox SET state = 'sending', crm = $2, attempts = attempts + 1, last_attempt_at = now(),
             next_attempt_at = now() + make_interval(secs => $3)
         WHERE id = $1",
        &[&id, &crm.as_str(), &secs],
    )
    .await
    .map(drop)
}

/// Pushes a row's next look (a lookup under way, or a send put off).
pub async fn postpone(conn: &impl Conn, id: i64, by: Duration) -> Result<(), DbError> {
    let secs = by.as_secs_f64();
    execute(
        conn,
        "postponing an outbox row",
        "UPDATE crm_lead_outbox SET next_attempt_at = now() + make_interval(secs => $2) WHERE id = $1",
        &[&id, &secs],
    )
    .await
    .map(drop)
}

/// The state and attempts a transition expects: it changes nothing if the
/// row moved on meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub id: i64,
    pub state: OutboxState,
    pub attempts: i32,
}

/// A row marked `delivered`.
#[derive(Clone, Copy, Debug)]
pub struct Delivered {
    /// Seconds from its insert.
    pub seconds: f64,
    /// When it was last sent (`last_attempt_at`).
    pub sent_at: Option<DateTime<Utc>>,
}

/// `delivered` with the CRM's ids, or `None` if the row had moved on.
pub async fn mark_delivered(
    conn: &impl Conn,
    seen: Seen,
    entity_type: &str,
    ids: CreatedIds,
) -> Result<Option<Delivered>, DbError> {
    step(conn, "marking a lead delivered", async {
        let row = conn
            .pg()
            .query_opt(
                "UPDATE crm_lead_outbox SET state = 'delivered', crm_entity_type = $4, crm_entity_id = $5,
                     crm_contact_id = coalesce($6, crm_contact_id), delivered_at = now(), last_error = NULL
                 WHERE id = $1 AND state = $2 AND attempts = $3
                 RETURNING extract(epoch FROM delivered_at - created_at)::float8, last_attempt_at",
                &[&seen.id, &seen.state.as_str(), &seen.attempts, &entity_type, &ids.entity_id, &ids.contact_id],
            )
            .await?;
        row.map(|r| Ok(Delivered { seconds: col(&r, 0, TABLE)?, sent_at: col(&r, 1, TABLE)? })).transpose()
    })
    .await
}

/// Back to `pending`, due after `delay`; an attempt not `counted` is taken back.
pub async fn mark_pending(
    conn: &impl Conn,
    seen: Seen,
    delay: Duration,
    counted: bool,
    error: Option<&str>,
) -> Result<bool, DbError> {
    let secs = delay.as_secs_f64();
    execute(
        conn,
        "returning a lead to pending",
        "UPDATE crm_lead_outbox SET state = 'pending', next_attempt_at = now() + make_interval(secs => $4),
             attempts = attempts - CASE WHEN $5 THEN 0 ELSE 1 END, last_error = coalesce($6, last_error)
         WHERE id = $1 AND state = $2 AND attempts = $3",
        &[&seen.id, &seen.state.as_str(), &seen.attempts, &secs, &counted, &error],
    )
    .await
    .map(|n| n == 1)
}

/// `failed`, never retried.
pub async fn mark_failed(conn: &impl Conn, seen: Seen, error: &str) -> Result<bool, DbError> {
    execute(
        conn,
        "marking a lead failed",
        "UPDATE crm_lead_outbox SET state = 'failed', last_error = $4
         WHERE id = $1 AND state = $2 AND attempts = $3",
        &[&seen.id, &seen.state.as_str(), &seen.attempts, &error],
    )
    .await
    .map(|n| n == 1)
}

/// Records what is known without moving the row: a contact that came back,
/// the last error.
pub async fn note(conn: &impl Conn, seen: Seen, contact_id: Option<i64>, error: Option<&str>) -> Result<bool, DbError> {
    execute(
        conn,
        "recording an outbox row's progress",
        "UPDATE crm_lead_outbox SET crm_contact_id = coalesce($4, crm_contact_id), last_error = coalesce($5, last_error)
         WHERE id = $1 AND state = $2 AND attempts = $3",
        &[&seen.id, &seen.state.as_str(), &seen.attempts, &contact_id, &error],
    )
    .await
    .map(|n| n == 1)
}

async fn execute(
    conn: &impl Conn,
    what: &'static str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, DbError> {
    step(conn, what, async { Ok(conn.pg().execute(sql, params).await?) }).await
}

/// The outbox row each of these CRM entities was delivered from, if any
/// (the funnel's `outbox_id`); of several, the lowest id.
pub async fn rows_of_entities(
    conn: &impl Conn,
    crm: Crm,
    entity_type: EntityType,
    entity_ids: &[i64],
) -> Result<HashMap<i64, i64>, DbError> {
    if entity_ids.is_empty() {
        return Ok(HashMap::new());
    }
    step(conn, "finding the outbox rows of CRM entities", async {
        let rows = conn
            .pg()
            .query(
                "SELECT crm_entity_id, min(id) FROM crm_lead_outbox
                 WHERE crm = $1 AND crm_entity_type = $2 AND crm_entity_id = ANY($3::bigint[])
                 GROUP BY crm_entity_id",
                &[&crm.as_str(), &entity_type.as_str(), &entity_ids],
            )
            .await?;
        rows.iter().map(|r| Ok((col(r, 0, TABLE)?, col(r, 1, TABLE)?))).collect()
    })
    .await
}

/// Rows by state, for `status` (the delivered and failed ones too, which a
/// pass never counts).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub pending: i64,
    pub sending: i64,
    pub delivered: i64,
    pub failed: i64,
    pub oldest_pending: Option<DateTime<Utc>>,
}

pub async fn counts(conn: &impl Conn) -> Result<Counts, DbError> {
    step(conn, "counting the outbox", async {
        let row = conn
            .pg()
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'sending'),
                        count(*) FILTER (WHERE state = 'delivered'), count(*) FILTER (WHERE state = 'failed'),
                        min(created_at) FILTER (WHERE state = 'pending')
                 FROM crm_lead_outbox",
                &[],
            )
            .await?;
        Ok(Counts {
            pending: col(&row, 0, TABLE)?,
            sending: col(&row, 1, TABLE)?,
            delivered: col(&row, 2, TABLE)?,
            failed: col(&row, 3, TABLE)?,
            oldest_pending: col(&row, 4, TABLE)?,
        })
    })
    .await
}
