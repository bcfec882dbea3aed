//! Applies the embedded migrations (`migrations/*.sql`) to a tenant database,
//! serialised across processes by a PostgreSQL advisory lock: refinery takes
//! none, and two daemons may start on one database at the same moment.

use tokio_postgres::GenericClient;

use super::error::{DbError, QueryError};
use super::session::{col, step};
use super::{Conn, TenantDb};

refinery::embed_migrations!("migrations");

/// The history table; prefixed like every internal table of ours.
const HISTORY_TABLE: &str = "crm_connect_schema_history";

/// Brings the tenant's database up to date, once per process: later calls
/// return at once (a migration is additive and never undone, so what was
/// applied stays applied).
pub async fn migrate(db: &TenantDb) -> Result<(), DbError> {
    db.migrated.get_or_try_init(|| run(db)).await.map(drop)
}

async fn run(db: &TenantDb) -> Result<(), DbError> {
    let mut session = db.session().await?;
    // The common case, a database already up to date, is one query: no
    // lock, no runner.
    let latest = migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max();
    let applied = schema_version(session.pg()).await.ok().flatten();
    if let (Some(applied), Some(latest)) = (applied, latest)
        && applied >= latest
    {
        return Ok(());
    }
    step(&session, "taking the migration lock", advisory(session.pg(), "pg_advisory_lock")).await?;
    // One transaction for all pending migrations: a fresh database gets its
    // schema in one commit instead of one per migration.
    let mut runner = migrations::runner().set_grouped(true);
    let outcome = runner.set_migration_table_name(HISTORY_TABLE).run_async(&mut **session.client).await;
    let unlocked = step(&session, "releasing the migration lock", advisory(session.pg(), "pg_advisory_unlock")).await;
    if outcome.is_err() || unlocked.is_err() {
        // A session lock lives as long as its connection: never hand this
        // one back to the pool.
        drop(deadpool_postgres::Object::take(session.client));
    }
    outcome.map_err(|e| DbError::Migrate { target: db.target().to_string(), reason: e.to_string() })?;
    unlocked
}

/// The advisory lock key that serialises migrations ("crm-conn" in ASCII).
const MIGRATION_LOCK: i64 = 0x6372_6d2d_636f_6e6e;

/// Takes or releases the migration lock: `function` is one of the two
/// session-level advisory lock functions.
async fn advisory(client: &impl GenericClient, function: &str) -> Result<(), QueryError> {
    client.execute(&format!("SELECT {function}($1)"), &[&MIGRATION_LOCK]).await?;
    Ok(())
}

/// The newest migration applied, per the history table.
async fn schema_version(client: &impl GenericClient) -> Result<Option<i64>, QueryError> {
    let row = client.query_one(&format!("SELECT max(version)::bigint FROM {HISTORY_TABLE}"), &[]).await?;
    col(&row, 0, HISTORY_TABLE)
}
