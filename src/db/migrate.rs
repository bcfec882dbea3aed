//! Applies the embedded migrations (`migrations/*.sql`) to a tenant database,
//! serialised across processes by a PostgreSQL advisory lock: refinery takes
//! none, and two daemons may start on one database at the same moment.

use super::{DbError, TenantDb, queries};

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
    let mut client = db.client().await?;
    // The common case, a database already up to date, is one query: no
    // lock, no runner.
    let latest = migrations::runner().get_migrations().iter().map(|m| i64::from(m.version())).max();
    let applied = queries::schema_version(&**client, HISTORY_TABLE).await.ok().flatten();
    if let (Some(applied), Some(latest)) = (applied, latest)
        && applied >= latest
    {
        return Ok(());
    }
    queries::lock_migrations(&**client).await.map_err(|e| db.query_error("taking the migration lock", e))?;
    // One transaction for all pending migrations: a fresh database gets its
    // schema in one commit instead of one per migration.
    let mut runner = migrations::runner().set_grouped(true);
    let outcome = runner.set_migration_table_name(HISTORY_TABLE).run_async(&mut **client).await;
    let unlocked = queries::unlock_migrations(&**client).await;
    if outcome.is_err() || unlocked.is_err() {
        // A session lock lives as long as its connection: never hand this
        // one back to the pool.
        drop(deadpool_postgres::Object::take(client));
    }
    outcome.map_err(|e| DbError::Migrate { target: db.target().to_string(), reason: e.to_string() })?;
    unlocked.map_err(|e| db.query_error("releasing the migration lock", e))?;
    Ok(())
}
