//! Every SQL statement of the program. Values always travel as parameters;
//! the only names spliced into SQL are column names from the closed
//! [`ConfigColumn`] set.

use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::reconcile::{ColumnValue, ConfigColumn, CurrentColumns};

/// The advisory lock key that serialises migrations ("crm-conn" in ASCII).
const MIGRATION_LOCK: i64 = 0x6372_6d2d_636f_6e6e;

pub async fn lock_migrations(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map(drop)
}

pub async fn unlock_migrations(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map(drop)
}

/// The managed columns of the `config` row, as stored now.
pub async fn read_config_columns(client: &impl GenericClient) -> Result<CurrentColumns, tokio_postgres::Error> {
    let names: Vec<&str> = ConfigColumn::ALL.iter().map(|c| c.name()).collect();
    let sql = format!("SELECT {} FROM config WHERE id = 1", names.join(", "));
    let row = client.query_one(&sql, &[]).await?;
    let mut current = CurrentColumns::default();
    for (i, column) in ConfigColumn::ALL.iter().enumerate() {
        let value = if column.is_integer() {
            row.get::<_, Option<i32>>(i).map(ColumnValue::Int)
        } else {
            row.get::<_, Option<String>>(i).map(|s| ColumnValue::from_stored(*column, s))
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
