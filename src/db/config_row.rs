//! The `config` row (one per tenant database): the managed columns, the
//! AmoCRM tokens and the code hash, the Bitrix24 connection stamp. Token
//! writes happen under the row lock ([`lock_tokens`]), in every process.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use super::error::{DbError, QueryError};
use super::session::{Conn, col, step};
use crate::model::{ColumnValue, ConfigColumn, CurrentColumns, StoredAccount, StoredTokens, Tokens};
use crate::secret::Secret;

/// The managed columns of the `config` row, as stored now.
pub async fn read_columns(conn: &impl Conn) -> Result<CurrentColumns, DbError> {
    step(conn, "reading config", columns(conn.pg(), "")).await
}

/// The same, holding the row lock until the transaction ends: an account
/// change is decided under the lock every token write takes.
pub async fn lock_columns(conn: &impl Conn) -> Result<CurrentColumns, DbError> {
    step(conn, "locking config", columns(conn.pg(), " FOR UPDATE")).await
}

async fn columns(client: &impl GenericClient, lock: &str) -> Result<CurrentColumns, QueryError> {
    let names: Vec<&str> = ConfigColumn::ALL.iter().map(|c| c.name()).collect();
    let sql = format!("SELECT {} FROM config WHERE id = 1{lock}", names.join(", "));
    let row = client.query_one(&sql, &[]).await?;
    let mut current = CurrentColumns::default();
    for (i, column) in ConfigColumn::ALL.iter().enumerate() {
        let value = if column.is_integer() {
            col::<Option<i32>>(&row, i, "config")?.map(ColumnValue::Int)
        } else {
            col::<Option<String>>(&row, i, "config")?.map(|s| ColumnValue::from_stored(*column, s))
        };
        current.insert(*column, value);
    }
    Ok(current)
}

/// One UPDATE of the `config` row setting exactly the given columns (the
/// only names spliced into SQL, from the closed [`ConfigColumn`] set).
pub async fn update_columns(conn: &impl Conn, changes: &[(ConfigColumn, ColumnValue)]) -> Result<(), DbError> {
    if changes.is_empty() {
        return Ok(());
    }
    let assignments: Vec<String> =
        changes.iter().enumerate().map(|(i, (column, _))| format!("{} = ${}", column.name(), i + 1)).collect();
    let sql = format!("UPDATE config SET {} WHERE id = 1", assignments.join(", "));
    // Parameters borrow from these two, each change from the one of its type.
    let texts: Vec<&str> = changes
        .iter()
        .map(|(_, value)| match value {
            ColumnValue::Text(s) => s.as_str(),
            ColumnValue::Secret(s) => s.expose(),
            ColumnValue::Int(_) => "",
        })
        .collect();
    let ints: Vec<i32> =
        changes.iter().map(|(_, value)| if let ColumnValue::Int(i) = value { *i } else { 0 }).collect();
    let params: Vec<&(dyn ToSql + Sync)> = changes
        .iter()
        .enumerate()
        .map(|(i, (_, value))| match value {
            ColumnValue::Int(_) => &ints[i] as &(dyn ToSql + Sync),
            _ => &texts[i] as &(dyn ToSql + Sync),
        })
        .collect();
    step(conn, "updating config", async { Ok(conn.pg().execute(&sql, &params).await.map(drop)?) }).await
}

/// The expiry is clamped to years 1–9999 in the query: another program may
/// have stored `'infinity'`, which no time type of ours can hold.
const TOKEN_COLUMNS: &str = "amocrm_access_token, amocrm_refresh_token, \
     LEAST(GREATEST(amocrm_token_expires_at, '0001-01-01 00:00:00+00'), '9999-12-31 23:59:59+00') \
         AS amocrm_token_expires_at, \
     amocrm_auth_code_sha256, amocrm_subdomain, amocrm_domain, amocrm_client_id";

async fn tokens(client: &impl GenericClient, lock: &str) -> Result<StoredTokens, QueryError> {
    // Unprepared: one round trip, on the connection a poll opens for little else.
    let row = client.query_typed_one(&format!("SELECT {TOKEN_COLUMNS} FROM config WHERE id = 1{lock}"), &[]).await?;
    Ok(StoredTokens {
        access: col::<Option<String>>(&row, 0, "config")?.map(Secret::new),
        refresh: col::<Option<String>>(&row, 1, "config")?.map(Secret::new),
        expires_at: col(&row, 2, "config")?,
        code_sha256: col(&row, 3, "config")?,
        account: StoredAccount {
            subdomain: col(&row, 4, "config")?,
            domain: col(&row, 5, "config")?,
            client_id: col(&row, 6, "config")?,
        },
    })
}

pub async fn read_tokens(conn: &impl Conn) -> Result<StoredTokens, DbError> {
    step(conn, "reading tokens", tokens(conn.pg(), "")).await
}

/// Reads the tokens and holds the `config` row lock until the transaction
/// ends: every token write happens under it, in every process.
pub async fn lock_tokens(conn: &impl Conn) -> Result<StoredTokens, DbError> {
    step(conn, "locking config", tokens(conn.pg(), " FOR UPDATE")).await
}

/// [`lock_tokens`] for a transaction that then waits for the CRM with the
/// lock held: a server-wide `idle_in_transaction_session_timeout` shorter
/// than a token request would end the session and free the lock
/// mid-refresh, so the transaction gets `idle_for` of its own.
pub async fn lock_tokens_for_request(conn: &impl Conn, idle_for: std::time::Duration) -> Result<StoredTokens, DbError> {
    let sql = format!("SET LOCAL idle_in_transaction_session_timeout = '{}s'", idle_for.as_secs());
    step(conn, "setting the token transaction's timeout", async { Ok(conn.pg().batch_execute(&sql).await?) }).await?;
    lock_tokens(conn).await
}

/// Stores a token set; with `code_sha256`, also the hash of the code it came from.
pub async fn write_tokens(conn: &impl Conn, tokens: &Tokens, code_sha256: Option<&str>) -> Result<(), DbError> {
    let refresh = tokens.refresh.as_ref().map(|r| r.expose());
    step(conn, "storing tokens", async {
        conn.pg()
            .execute(
                "UPDATE config SET amocrm_access_token = $1, amocrm_refresh_token = $2, amocrm_token_expires_at = $3,
                     amocrm_auth_code_sha256 = COALESCE($4, amocrm_auth_code_sha256)
                 WHERE id = 1",
                &[&tokens.access.expose(), &refresh, &tokens.expires_at, &code_sha256],
            )
            .await?;
        Ok(())
    })
    .await
}

/// Forgets the AmoCRM tokens (the account or integration changed).
pub async fn clear_tokens(conn: &impl Conn) -> Result<(), DbError> {
    step(conn, "clearing tokens", async {
        conn.pg()
            .execute(
                "UPDATE config SET amocrm_access_token = NULL, amocrm_refresh_token = NULL,
                     amocrm_token_expires_at = NULL
                 WHERE id = 1",
                &[],
            )
            .await?;
        Ok(())
    })
    .await
}

/// Records that a code was sent (and rejected), so that it is never sent again.
pub async fn write_code_hash(conn: &impl Conn, code_sha256: &str) -> Result<(), DbError> {
    step(conn, "recording the code", async {
        conn.pg().execute("UPDATE config SET amocrm_auth_code_sha256 = $1 WHERE id = 1", &[&code_sha256]).await?;
        Ok(())
    })
    .await
}

/// Stamps `bitrix24_connected_at` (a webhook verified for the first time,
/// or a changed one).
pub async fn mark_bitrix24_connected(conn: &impl Conn) -> Result<(), DbError> {
    step(conn, "updating config", async {
        conn.pg().execute("UPDATE config SET bitrix24_connected_at = now() WHERE id = 1", &[]).await?;
        Ok(())
    })
    .await
}

pub async fn bitrix24_connected_at(conn: &impl Conn) -> Result<Option<DateTime<Utc>>, DbError> {
    step(conn, "reading config", async {
        col(&conn.pg().query_one("SELECT bitrix24_connected_at FROM config WHERE id = 1", &[]).await?, 0, "config")
    })
    .await
}

/// Whether the `config` row exists; fails with a missing-schema error
/// before the migrations ran. Reads only (`sync --dry-run`).
pub async fn row_exists(conn: &impl Conn) -> Result<bool, DbError> {
    step(conn, "reading config", async {
        col(&conn.pg().query_one("SELECT EXISTS (SELECT 1 FROM config WHERE id = 1)", &[]).await?, 0, "config")
    })
    .await
}

/// The AmoCRM lead field that carries the delivery key, if one is stored.
pub async fn lead_key_field(conn: &impl Conn) -> Result<Option<i64>, DbError> {
    step(conn, "reading config", async {
        col(&conn.pg().query_one("SELECT amocrm_lead_key_field_id FROM config WHERE id = 1", &[]).await?, 0, "config")
    })
    .await
}

/// Stores `field` as the key field if the row still holds `replaces` (no
/// other process stored another meanwhile); returns the one stored now.
pub async fn store_lead_key_field(conn: &impl Conn, replaces: Option<i64>, field: i64) -> Result<Option<i64>, DbError> {
    step(conn, "storing the lead key field", async {
        conn.pg()
            .execute(
                "UPDATE config SET amocrm_lead_key_field_id = $2
                 WHERE id = 1 AND amocrm_lead_key_field_id IS NOT DISTINCT FROM $1",
                &[&replaces, &field],
            )
            .await?;
        col(&conn.pg().query_one("SELECT amocrm_lead_key_field_id FROM config WHERE id = 1", &[]).await?, 0, "config")
    })
    .await
}
