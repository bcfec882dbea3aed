//! Every SQL statement of the program. Values always travel as parameters;
//! the only names spliced into SQL are column names from the closed
//! [`ConfigColumn`] set.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::model::{AmoStage, B24Stage, Crm, CrmState, EntityType, Semantics, StageFlags, Tokens};
use crate::reconcile::{ColumnValue, ConfigColumn, CurrentColumns, StoredStage};
use crate::secret::Secret;

/// A failed statement, or a value read back that does not fit: a column
/// another program created with another type, say.
#[derive(Debug)]
pub enum QueryError {
    Statement(tokio_postgres::Error),
    Column { table: &'static str, column: String, reason: String },
}

impl From<tokio_postgres::Error> for QueryError {
    fn from(e: tokio_postgres::Error) -> Self {
        QueryError::Statement(e)
    }
}

impl QueryError {
    /// The server's SQLSTATE, for a statement the server refused.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            QueryError::Statement(e) => e.code(),
            QueryError::Column { .. } => None,
        }
    }
}

/// Column `i` of a row of `table`. A value of an unexpected type or range
/// is an error naming the table and the column, never a panic.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
    table: &'static str,
) -> Result<T, QueryError> {
    row.try_get(i).map_err(|e| {
        let column = row.columns().get(i).map_or_else(|| format!("#{i}"), |c| c.name().to_string());
        let kind = row.columns().get(i).map_or_else(String::new, |c| format!(" (stored as {})", c.type_()));
        let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        QueryError::Column { table, column, reason: format!("{reason}{kind}") }
    })
}

/// The advisory lock key that serialises migrations ("crm-conn" in ASCII).
const MIGRATION_LOCK: i64 = 0x6372_6d2d_636f_6e6e;

pub async fn lock_migrations(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map(drop)
}

pub async fn unlock_migrations(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map(drop)
}

/// The newest migration applied, per the history table `table` (a name of
/// ours, never input).
pub async fn schema_version(client: &impl GenericClient, table: &str) -> Result<Option<i64>, QueryError> {
    let row = client.query_one(&format!("SELECT max(version)::bigint FROM {table}"), &[]).await?;
    col(&row, 0, "crm_connect_schema_history")
}

/// Whether the server has a database of this name.
pub async fn database_exists(client: &impl GenericClient, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some())
}

/// `CREATE DATABASE` (no parameters there: the name is quoted as an
/// identifier).
pub async fn create_database(client: &impl GenericClient, name: &str) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(&format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""))).await
}

/// The managed columns of the `config` row, as stored now.
pub async fn read_config_columns(client: &impl GenericClient) -> Result<CurrentColumns, QueryError> {
    config_columns(client, "").await
}

/// The same, holding the row lock until the transaction ends: an account
/// change is decided under the lock every token write takes.
pub async fn lock_config_columns(tx: &impl GenericClient) -> Result<CurrentColumns, QueryError> {
    config_columns(tx, " FOR UPDATE").await
}

async fn config_columns(client: &impl GenericClient, lock: &str) -> Result<CurrentColumns, QueryError> {
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

/// One UPDATE of the `config` row setting exactly the given columns.
pub async fn update_config_columns(
    client: &impl GenericClient,
    changes: &[(ConfigColumn, ColumnValue)],
) -> Result<(), tokio_postgres::Error> {
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
    client.execute(&sql, &params).await.map(drop)
}

/// Appends to the audit log. `detail` must hold no secret.
pub async fn insert_event(
    client: &impl GenericClient,
    crm: Option<&str>,
    kind: &str,
    detail: &serde_json::Value,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute("INSERT INTO crm_connect_events (crm, kind, detail) VALUES ($1, $2, $3)", &[&crm, &kind, detail])
        .await
        .map(drop)
}

/// The AmoCRM token columns of the `config` row, and the account they
/// belong to.
#[derive(Clone, Debug, Default)]
pub struct StoredTokens {
    pub access: Option<Secret>,
    pub refresh: Option<Secret>,
    pub expires_at: Option<DateTime<Utc>>,
    pub code_sha256: Option<String>,
    pub account: AmoAccount,
}

/// Which AmoCRM account and integration a pair belongs to, as the `config`
/// row names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmoAccount {
    pub subdomain: Option<String>,
    pub domain: Option<String>,
    pub client_id: Option<String>,
}

/// The expiry is clamped to years 1–9999 in the query: another program may
/// have stored `'infinity'`, which no time type of ours can hold.
const TOKEN_COLUMNS: &str = "amocrm_access_token, amocrm_refresh_token, \
     LEAST(GREATEST(amocrm_token_expires_at, '0001-01-01 00:00:00+00'), '9999-12-31 23:59:59+00') \
         AS amocrm_token_expires_at, \
     amocrm_auth_code_sha256, amocrm_subdomain, amocrm_domain, amocrm_client_id";

fn stored_tokens(row: &tokio_postgres::Row) -> Result<StoredTokens, QueryError> {
    Ok(StoredTokens {
        access: col::<Option<String>>(row, 0, "config")?.map(Secret::new),
        refresh: col::<Option<String>>(row, 1, "config")?.map(Secret::new),
        expires_at: col(row, 2, "config")?,
        code_sha256: col(row, 3, "config")?,
        account: AmoAccount {
            subdomain: col(row, 4, "config")?,
            domain: col(row, 5, "config")?,
            client_id: col(row, 6, "config")?,
        },
    })
}

/// Keeps a token transaction's session alive while it waits for the CRM
/// with the row lock held: a server-wide `idle_in_transaction_session_timeout`
/// shorter than a token request would end the session and free the lock
/// mid-refresh. Local to the transaction.
pub async fn keep_token_transaction_alive(tx: &impl GenericClient, for_secs: u64) -> Result<(), tokio_postgres::Error> {
    let sql = format!("SET LOCAL idle_in_transaction_session_timeout = '{for_secs}s'");
    tx.batch_execute(&sql).await
}

pub async fn read_tokens(client: &impl GenericClient) -> Result<StoredTokens, QueryError> {
    let row = client.query_one(&format!("SELECT {TOKEN_COLUMNS} FROM config WHERE id = 1"), &[]).await?;
    stored_tokens(&row)
}

/// Reads the tokens and holds the `config` row lock until the transaction
/// ends: every token write happens under it, in every process.
pub async fn lock_tokens(tx: &impl GenericClient) -> Result<StoredTokens, QueryError> {
    let row = tx.query_one(&format!("SELECT {TOKEN_COLUMNS} FROM config WHERE id = 1 FOR UPDATE"), &[]).await?;
    stored_tokens(&row)
}

/// Stores a token set; with `code_sha256`, also the hash of the code it came from.
pub async fn write_tokens(
    client: &impl GenericClient,
    tokens: &Tokens,
    code_sha256: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE config SET amocrm_access_token = $1, amocrm_refresh_token = $2, amocrm_token_expires_at = $3,
                 amocrm_auth_code_sha256 = COALESCE($4, amocrm_auth_code_sha256)
             WHERE id = 1",
            &[&tokens.access.expose(), &tokens.refresh.as_ref().map(|r| r.expose()), &tokens.expires_at, &code_sha256],
        )
        .await
        .map(drop)
}

/// Forgets the AmoCRM tokens (the account or integration changed).
pub async fn clear_tokens(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE config SET amocrm_access_token = NULL, amocrm_refresh_token = NULL, amocrm_token_expires_at = NULL
             WHERE id = 1",
            &[],
        )
        .await
        .map(drop)
}

/// Records that a code was sent (and rejected), so that it is never sent again.
pub async fn write_code_hash(client: &impl GenericClient, code_sha256: &str) -> Result<(), tokio_postgres::Error> {
    client.execute("UPDATE config SET amocrm_auth_code_sha256 = $1 WHERE id = 1", &[&code_sha256]).await.map(drop)
}

/// One status row change. `error` is recorded with its time; `success`
/// stamps `last_success_at`; `stage_count` stamps `stages_synced_at`.
#[derive(Clone, Debug)]
pub struct StatusUpdate<'a> {
    pub crm: Crm,
    pub state: CrmState,
    pub error: Option<&'a str>,
    pub success: bool,
    pub stage_count: Option<i32>,
}

pub async fn write_status(client: &impl GenericClient, update: &StatusUpdate<'_>) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO crm_connect_status AS s
                 (crm, state, last_success_at, last_error, last_error_at, stages_synced_at, stage_count, updated_at)
             VALUES ($1, $2, CASE WHEN $3 THEN clock_timestamp() END, $4::text,
                     CASE WHEN $4::text IS NOT NULL THEN clock_timestamp() END,
                     CASE WHEN $5::integer IS NOT NULL THEN clock_timestamp() END, $5::integer, clock_timestamp())
             ON CONFLICT (crm) DO UPDATE SET
                 state = EXCLUDED.state,
                 last_success_at = COALESCE(EXCLUDED.last_success_at, s.last_success_at),
                 last_error = COALESCE(EXCLUDED.last_error, s.last_error),
                 last_error_at = COALESCE(EXCLUDED.last_error_at, s.last_error_at),
                 stages_synced_at = COALESCE(EXCLUDED.stages_synced_at, s.stages_synced_at),
                 stage_count = COALESCE(EXCLUDED.stage_count, s.stage_count),
                 updated_at = EXCLUDED.updated_at",
            &[&update.crm.as_str(), &update.state.as_str(), &update.success, &update.error, &update.stage_count],
        )
        .await
        .map(drop)
}

pub async fn read_state(client: &impl GenericClient, crm: Crm) -> Result<Option<String>, QueryError> {
    let row = client.query_opt("SELECT state FROM crm_connect_status WHERE crm = $1", &[&crm.as_str()]).await?;
    row.map(|r| col(&r, 0, "crm_connect_status")).transpose()
}

/// A status row as `crm-connect status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatusRow {
    pub crm: String,
    pub state: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub stages_synced_at: Option<DateTime<Utc>>,
    pub stage_count: Option<i32>,
}

pub async fn read_statuses(client: &impl GenericClient) -> Result<Vec<StatusRow>, QueryError> {
    let rows = client
        .query(
            "SELECT crm, state, last_success_at, last_error, last_error_at, stages_synced_at, stage_count
             FROM crm_connect_status ORDER BY crm",
            &[],
        )
        .await?;
    let table = "crm_connect_status";
    rows.iter()
        .map(|r| {
            Ok(StatusRow {
                crm: col(r, 0, table)?,
                state: col(r, 1, table)?,
                last_success_at: col(r, 2, table)?,
                last_error: col(r, 3, table)?,
                last_error_at: col(r, 4, table)?,
                stages_synced_at: col(r, 5, table)?,
                stage_count: col(r, 6, table)?,
            })
        })
        .collect()
}

/// Serialises stage syncs of one CRM in one database until the transaction ends.
pub async fn lock_stage_sync(tx: &impl GenericClient, crm: Crm) -> Result<(), tokio_postgres::Error> {
    let key: i64 = match crm {
        Crm::AmoCrm => 0x6372_6d2d_7374_6731,
        Crm::Bitrix24 => 0x6372_6d2d_7374_6732,
    };
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&key]).await.map(drop)
}

fn flags_of(row: &tokio_postgres::Row, first: usize, table: &'static str) -> Result<StageFlags, QueryError> {
    Ok(StageFlags {
        qualified: col(row, first, table)?,
        success: col(row, first + 1, table)?,
        fail: col(row, first + 2, table)?,
    })
}

pub async fn read_amocrm_stages(client: &impl GenericClient) -> Result<Vec<StoredStage<AmoStage>>, QueryError> {
    let rows = client
        .query(
            "SELECT pipeline_id, pipeline_name, pipeline_is_main, status_id, status_name, status_sort, status_type,
                    is_qualified_stage, is_success_stage, is_fail_stage, removed_at IS NOT NULL
             FROM amocrm_pipeline_stages ORDER BY pipeline_id, status_sort, status_id",
            &[],
        )
        .await?;
    let table = "amocrm_pipeline_stages";
    rows.iter()
        .map(|r| {
            Ok(StoredStage {
                row: AmoStage {
                    pipeline_id: col(r, 0, table)?,
                    pipeline_name: col(r, 1, table)?,
                    pipeline_is_main: col(r, 2, table)?,
                    status_id: col(r, 3, table)?,
                    status_name: col(r, 4, table)?,
                    status_sort: col(r, 5, table)?,
                    status_type: col(r, 6, table)?,
                },
                flags: flags_of(r, 7, table)?,
                removed: col(r, 10, table)?,
            })
        })
        .collect()
}

/// Inserts or updates the given rows in one statement, clearing `removed_at`.
pub async fn upsert_amocrm_stages(
    client: &impl GenericClient,
    stages: &[(AmoStage, StageFlags)],
) -> Result<(), tokio_postgres::Error> {
    if stages.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&(AmoStage, StageFlags)) -> i64| stages.iter().map(f).collect::<Vec<i64>>();
    let pipeline_ids = col(|(s, _)| s.pipeline_id);
    let status_ids = col(|(s, _)| s.status_id);
    let pipeline_names: Vec<&str> = stages.iter().map(|(s, _)| s.pipeline_name.as_str()).collect();
    let status_names: Vec<&str> = stages.iter().map(|(s, _)| s.status_name.as_str()).collect();
    let mains: Vec<bool> = stages.iter().map(|(s, _)| s.pipeline_is_main).collect();
    let sorts: Vec<i32> = stages.iter().map(|(s, _)| s.status_sort).collect();
    let types: Vec<i32> = stages.iter().map(|(s, _)| s.status_type).collect();
    let qualified: Vec<bool> = stages.iter().map(|(_, f)| f.qualified).collect();
    let success: Vec<bool> = stages.iter().map(|(_, f)| f.success).collect();
    let fail: Vec<bool> = stages.iter().map(|(_, f)| f.fail).collect();
    client
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
        .await
        .map(drop)
}

pub async fn mark_amocrm_stages_removed(
    client: &impl GenericClient,
    keys: &[(i64, i64)],
) -> Result<(), tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let pipelines: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let statuses: Vec<i64> = keys.iter().map(|k| k.1).collect();
    client
        .execute(
            "UPDATE amocrm_pipeline_stages AS s SET removed_at = now(), synced_at = now()
             FROM unnest($1::bigint[], $2::bigint[]) AS k(p, st)
             WHERE s.pipeline_id = k.p AND s.status_id = k.st AND s.removed_at IS NULL",
            &[&pipelines, &statuses],
        )
        .await
        .map(drop)
}

pub async fn read_bitrix24_stages(
    client: &impl GenericClient,
    entity_type: EntityType,
) -> Result<Vec<StoredStage<B24Stage>>, QueryError> {
    let rows = client
        .query(
            "SELECT category_id, category_name, status_id, status_name, status_sort, semantics,
                    is_qualified_stage, is_success_stage, is_fail_stage, removed_at IS NOT NULL
             FROM bitrix24_pipeline_stages WHERE entity_type = $1 ORDER BY category_id, status_sort, status_id",
            &[&entity_type.as_str()],
        )
        .await?;
    let table = "bitrix24_pipeline_stages";
    rows.iter()
        .map(|r| {
            Ok(StoredStage {
                row: B24Stage {
                    entity_type,
                    category_id: col(r, 0, table)?,
                    category_name: col(r, 1, table)?,
                    status_id: col(r, 2, table)?,
                    status_name: col(r, 3, table)?,
                    status_sort: col(r, 4, table)?,
                    semantics: col::<Option<&str>>(r, 5, table)?
                        .and_then(Semantics::parse)
                        .unwrap_or(Semantics::Process),
                },
                flags: flags_of(r, 6, table)?,
                removed: col(r, 9, table)?,
            })
        })
        .collect()
}

/// Inserts or updates the given rows in one statement, clearing `removed_at`.
pub async fn upsert_bitrix24_stages(
    client: &impl GenericClient,
    stages: &[(B24Stage, StageFlags)],
) -> Result<(), tokio_postgres::Error> {
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
    client
        .execute(
            "INSERT INTO bitrix24_pipeline_stages
                 (entity_type, category_id, category_name, status_id, status_name, status_sort, semantics,
                  is_qualified_stage, is_success_stage, is_fail_stage, synced_at, removed_at)
             SELECT e, c, cn, s, sn, so, se, q, su, f, now(), NULL
             FROM unnest($1::text[], $2::integer[], $3::text[], $4::text[], $5::text[], $6::integer[], $7::text[],
                         $8::boolean[], $9::boolean[], $10::boolean[])
                  AS u(e, c, cn, s, sn, so, se, q, su, f)
             ON CONFLICT (entity_type, category_id, status_id) DO UPDATE SET
                 category_name = EXCLUDED.category_name, status_name = EXCLUDED.status_name,
                 status_sort = EXCLUDED.status_sort, semantics = EXCLUDED.semantics,
                 is_qualified_stage = EXCLUDED.is_qualified_stage, is_success_stage = EXCLUDED.is_success_stage,
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
        .await
        .map(drop)
}

pub async fn mark_bitrix24_stages_removed(
    client: &impl GenericClient,
    keys: &[(EntityType, i32, String)],
) -> Result<(), tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let entity_types: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let category_ids: Vec<i32> = keys.iter().map(|k| k.1).collect();
    let status_ids: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    client
        .execute(
            "UPDATE bitrix24_pipeline_stages AS s SET removed_at = now(), synced_at = now()
             FROM unnest($1::text[], $2::integer[], $3::text[]) AS k(e, c, st)
             WHERE s.entity_type = k.e AND s.category_id = k.c AND s.status_id = k.st AND s.removed_at IS NULL",
            &[&entity_types, &category_ids, &status_ids],
        )
        .await
        .map(drop)
}

/// Stamps `bitrix24_connected_at` (a webhook verified for the first time,
/// or a changed one).
pub async fn mark_bitrix24_connected(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client.execute("UPDATE config SET bitrix24_connected_at = now() WHERE id = 1", &[]).await.map(drop)
}

pub async fn bitrix24_connected_at(client: &impl GenericClient) -> Result<Option<DateTime<Utc>>, QueryError> {
    col(&client.query_one("SELECT bitrix24_connected_at FROM config WHERE id = 1", &[]).await?, 0, "config")
}

/// Whether the `config` row exists; fails with `undefined_table` before the
/// migrations ran. Reads only (`sync --dry-run`).
pub async fn config_row_exists(client: &impl GenericClient) -> Result<bool, QueryError> {
    col(&client.query_one("SELECT EXISTS (SELECT 1 FROM config WHERE id = 1)", &[]).await?, 0, "config")
}

/// Records a schedule's last and next run (`job` names the schedule, e.g.
/// `stage_resync`).
pub async fn write_schedule(
    client: &impl GenericClient,
    job: &str,
    last_run_at: Option<DateTime<Utc>>,
    next_run_at: Option<DateTime<Utc>>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO crm_connect_schedule AS s (job, last_run_at, next_run_at, updated_at)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (job) DO UPDATE SET last_run_at = COALESCE(EXCLUDED.last_run_at, s.last_run_at),
                 next_run_at = EXCLUDED.next_run_at, updated_at = now()
             WHERE s.next_run_at IS DISTINCT FROM EXCLUDED.next_run_at
                OR (EXCLUDED.last_run_at IS NOT NULL AND s.last_run_at IS DISTINCT FROM EXCLUDED.last_run_at)",
            &[&job, &last_run_at, &next_run_at],
        )
        .await
        .map(drop)
}

/// A schedule's last and next run, if the daemon recorded them.
pub async fn read_schedule(
    client: &impl GenericClient,
    job: &str,
) -> Result<Option<(Option<DateTime<Utc>>, Option<DateTime<Utc>>)>, QueryError> {
    let row =
        client.query_opt("SELECT last_run_at, next_run_at FROM crm_connect_schedule WHERE job = $1", &[&job]).await?;
    row.map(|r| Ok((col(&r, 0, "crm_connect_schedule")?, col(&r, 1, "crm_connect_schedule")?))).transpose()
}

/// Marks a CRM's connection as no longer managed (its file was removed).
pub async fn mark_unmanaged(client: &impl GenericClient, crm: Crm) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO crm_connect_status (crm, state, updated_at) VALUES ($1, 'unmanaged', now())
             ON CONFLICT (crm) DO UPDATE SET state = 'unmanaged', updated_at = now()",
            &[&crm.as_str()],
        )
        .await
        .map(drop)
}

/// Records a browser-authorisation state by its hash, usable for
/// `valid_for_secs` by the database's clock (the one that checks it). States
/// expired over a day ago go in the same statement, keeping the table small.
pub async fn insert_oauth_state(
    client: &impl GenericClient,
    state_sha256: &str,
    valid_for_secs: f64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "WITH expired AS (
                 DELETE FROM crm_connect_oauth_states WHERE expires_at < now() - interval '1 day'
             )
             INSERT INTO crm_connect_oauth_states (state_sha256, expires_at)
             VALUES ($1, now() + make_interval(secs => $2::double precision))",
            &[&state_sha256, &valid_for_secs],
        )
        .await
        .map(drop)
}

/// Marks a state used if it is known, unused and unexpired; true if this
/// call did. One statement, so two callbacks with one state cannot both win.
pub async fn consume_oauth_state(
    client: &impl GenericClient,
    state_sha256: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "UPDATE crm_connect_oauth_states SET used_at = now()
             WHERE state_sha256 = $1 AND used_at IS NULL AND expires_at > now()
             RETURNING created_at",
            &[&state_sha256],
        )
        .await?;
    Ok(row.is_some())
}

/// Takes or renews the tenant's lease for `holder` if it is free, expired
/// or already `holder`'s; returns whether `holder` holds it now.
pub async fn take_lease(
    client: &impl GenericClient,
    holder: &str,
    duration: std::time::Duration,
) -> Result<bool, tokio_postgres::Error> {
    let seconds = duration.as_secs_f64();
    let taken = client
        .execute(
            "UPDATE crm_connect_lease SET holder = $1, expires_at = now() + make_interval(secs => $2)
             WHERE id = 1 AND (holder IS NULL OR holder = $1 OR expires_at IS NULL OR expires_at < now())",
            &[&holder, &seconds],
        )
        .await?;
    Ok(taken == 1)
}

/// Gives the lease up at once (clean shutdown), if `holder` holds it.
pub async fn release_lease(client: &impl GenericClient, holder: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE crm_connect_lease SET holder = NULL, expires_at = NULL WHERE id = 1 AND holder = $1",
            &[&holder],
        )
        .await
        .map(drop)
}

/// The live lease's holder, if any.
pub async fn lease_holder(client: &impl GenericClient) -> Result<Option<String>, QueryError> {
    let row = client.query_opt("SELECT holder FROM crm_connect_lease WHERE id = 1 AND expires_at > now()", &[]).await?;
    Ok(row.map(|r| col::<Option<String>>(&r, 0, "crm_connect_lease")).transpose()?.flatten())
}
