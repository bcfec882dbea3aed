//! `crm_connect_cursors`: where each funnel stream was read up to. A cursor
//! is created once (the first process to enable a stream wins) and then
//! only moves forward: every write is conditional on moving something
//! ahead, so two processes, or a late commit, never move it back.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use super::error::{DbError, QueryError};
use super::session::{Conn, Tx, col, step};
use super::stage_changes;
use crate::model::{Cursor, Position, Stream};

const TABLE: &str = "crm_connect_cursors";

/// The two position columns: `last_id` for an ID, `window_end` for a time.
fn split(position: Position) -> (Option<i64>, Option<DateTime<Utc>>) {
    match position {
        Position::WindowEnd(at) => (None, Some(at)),
        Position::LastId(_, id) => (Some(id), None),
    }
}

fn cursor(stream: Stream, row: &tokio_postgres::Row) -> Result<Cursor, QueryError> {
    let last_id: Option<i64> = col(row, 0, TABLE)?;
    let window_end: Option<DateTime<Utc>> = col(row, 1, TABLE)?;
    let missing = |column: &str| QueryError::Column {
        table: TABLE,
        column: column.into(),
        reason: format!("NULL on the cursor of {stream}"),
    };
    let position = match stream {
        Stream::AmoLeadStatusChanged => Position::WindowEnd(window_end.ok_or_else(|| missing("window_end"))?),
        Stream::Bitrix24(entity) => Position::LastId(entity, last_id.ok_or_else(|| missing("last_id"))?),
    };
    Ok(Cursor { position, complete_to: col(row, 2, TABLE)?, updated_at: col(row, 3, TABLE)? })
}

/// The stream's cursor; `None` before the stream was first enabled.
pub async fn read(conn: &impl Conn, stream: Stream) -> Result<Option<Cursor>, DbError> {
    step(conn, "reading a funnel cursor", async {
        let row = conn
            .pg()
            .query_opt(
                "SELECT last_id, window_end, complete_to, updated_at FROM crm_connect_cursors
                 WHERE crm = $1 AND stream = $2",
                &[&stream.crm().as_str(), &stream.name()],
            )
            .await?;
        row.map(|r| cursor(stream, &r)).transpose()
    })
    .await
}

/// Every cursor of a stream this program knows (`status`); rows of others
/// are left out.
pub async fn read_all(conn: &impl Conn) -> Result<Vec<Cursor>, DbError> {
    step(conn, "reading the funnel cursors", async {
        let rows = conn
            .pg()
            .query_typed(
                "SELECT last_id, window_end, complete_to, updated_at, crm, stream FROM crm_connect_cursors
                 ORDER BY crm, stream",
                &[],
            )
            .await?;
        let mut cursors = Vec::new();
        for row in &rows {
            let (crm, name): (String, String) = (col(row, 4, TABLE)?, col(row, 5, TABLE)?);
            if let Some(stream) = Stream::parse(&crm, &name) {
                cursors.push(cursor(stream, row)?);
            }
        }
        Ok(cursors)
    })
    .await
}

/// Creates the stream's cursor at `position` unless it exists; whether
/// this call created it (else the stored one stands, whatever it says:
/// `since` counts only while a stream has no cursor). Takes the insert
/// lock first, like [`advance`].
pub async fn start(tx: &Tx<'_>, position: Position, complete_to: DateTime<Utc>) -> Result<bool, DbError> {
    stage_changes::lock(tx).await?;
    let stream = position.stream();
    let (last_id, window_end) = split(position);
    step(tx, "starting a funnel cursor", async {
        let created = tx
            .pg()
            .execute(
                "INSERT INTO crm_connect_cursors (crm, stream, last_id, window_end, complete_to, updated_at)
                 VALUES ($1, $2, $3, $4, $5, now())
                 ON CONFLICT (crm, stream) DO NOTHING",
                &[&stream.crm().as_str(), &stream.name(), &last_id, &window_end, &complete_to],
            )
            .await?;
        Ok(created == 1)
    })
    .await
}

/// Moves the stream's cursor to `position` and `complete_to`, each only
/// forward; in the transaction that inserts the rows read up to there, so
/// both commit or neither. Whether anything moved (nothing does when both
/// are at or behind the stored ones, or the cursor does not exist).
///
/// Takes the funnel's insert lock first, as every inserting transaction
/// does: whichever of the two a transaction does first, locks are taken in
/// one order.
pub async fn advance(tx: &Tx<'_>, position: Position, complete_to: Option<DateTime<Utc>>) -> Result<bool, DbError> {
    stage_changes::lock(tx).await?;
    let stream = position.stream();
    let (last_id, window_end) = split(position);
    step(tx, "advancing a funnel cursor", async {
        let moved = tx
            .pg()
            .execute(ADVANCE, &[&stream.crm().as_str(), &stream.name(), &last_id, &window_end, &complete_to])
            .await?;
        Ok(moved == 1)
    })
    .await
}

/// [`advance`] when no rows go with the move (a read that found nothing
/// new, as every idle poll's does): one statement, outside a transaction
/// and without the insert lock — it assigns no id, so the order in which
/// rows commit is not at stake. The cursor as stored after it: this one,
/// or the one before when that is ahead; `None` when there is none.
pub async fn advance_alone(
    conn: &impl Conn,
    position: Position,
    complete_to: Option<DateTime<Utc>>,
) -> Result<Option<Cursor>, DbError> {
    let stream = position.stream();
    let (last_id, window_end) = split(position);
    let (crm, name) = (stream.crm().as_str(), stream.name());
    step(conn, "advancing a funnel cursor", async {
        // Unprepared: one round trip.
        let row = conn
            .pg()
            .query_typed_opt(
                &format!(
                    "WITH moved AS ({ADVANCE} RETURNING last_id, window_end, complete_to, updated_at)
                     SELECT last_id, window_end, complete_to, updated_at FROM moved
                     UNION ALL
                     SELECT last_id, window_end, complete_to, updated_at FROM crm_connect_cursors
                     WHERE crm = $1 AND stream = $2 AND NOT EXISTS (SELECT 1 FROM moved)"
                ),
                &[
                    (&crm, Type::TEXT),
                    (&name, Type::TEXT),
                    (&last_id, Type::INT8),
                    (&window_end, Type::TIMESTAMPTZ),
                    (&complete_to, Type::TIMESTAMPTZ),
                ],
            )
            .await?;
        row.map(|r| cursor(stream, &r)).transpose()
    })
    .await
}

/// Moves `$1`/`$2`'s cursor to `$3`/`$4` and `$5`, each only forward, and
/// only when one of them moves. GREATEST ignores NULLs: a NULL argument
/// leaves its column as it is.
const ADVANCE: &str = "UPDATE crm_connect_cursors
     SET last_id = GREATEST(last_id, $3), window_end = GREATEST(window_end, $4),
         complete_to = GREATEST(complete_to, $5), updated_at = now()
     WHERE crm = $1 AND stream = $2
       AND (last_id < $3 OR window_end < $4 OR complete_to < $5
            OR (last_id IS NULL AND $3::bigint IS NOT NULL)
            OR (window_end IS NULL AND $4::timestamptz IS NOT NULL)
            OR (complete_to IS NULL AND $5::timestamptz IS NOT NULL))";
