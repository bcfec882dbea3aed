//! Creating a tenant database that does not exist yet (the demo on a
//! server of the user's), by way of the same server's `postgres` database
//! and the program's own connection settings (TLS as `sslmode` says).

use super::error::{DbError, QueryError};
use super::session::{Conn, step};
use super::{PoolSettings, Pools};
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
    let session = db.session().await?;
    step(&session, "creating the database", async {
        let client = session.pg();
        if client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some() {
            return Ok(false);
        }
        // No parameters in CREATE DATABASE: the name is quoted as an identifier.
        client.batch_execute(&format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""))).await?;
        Ok::<_, QueryError>(true)
    })
    .await
}
