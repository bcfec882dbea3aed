//! Creating a tenant database that does not exist yet (the demo on a
//! server of the user's), by way of the same server's `postgres` database
//! and the program's own connection settings (TLS as `sslmode` says).

use super::{DbError, PoolSettings, Pools, pg_reason, queries};
use crate::secret::Secret;

/// Creates the database `database_url` names unless it exists; returns
/// whether it was created.
pub async fn ensure_database(database_url: &Secret) -> Result<bool, DbError> {
    let (config, _) = super::tls::parse(database_url.expose()).map_err(|_| DbError::BadUrl)?;
    let name = config.get_dbname().ok_or(DbError::BadUrl)?.to_owned();
    let url = database_url.expose();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(DbError::BadUrl);
    }
    let mut maintenance = url::Url::parse(url).map_err(|_| DbError::BadUrl)?;
    maintenance.set_path("/postgres");
    let maintenance = Secret::new(String::from(maintenance));
    let pools = Pools::new(PoolSettings { max_size: 1, ..PoolSettings::default() });
    let db = pools.get("maintenance", &maintenance)?;
    let client = db.client().await?;
    let failed = |e: tokio_postgres::Error| DbError::Query {
        what: "creating the database",
        target: db.target().to_owned(),
        reason: pg_reason(&e),
        transient: false,
    };
    if queries::database_exists(&**client, &name).await.map_err(failed)? {
        return Ok(false);
    }
    queries::create_database(&**client, &name).await.map_err(failed)?;
    Ok(true)
}
