//! A checked-out connection of one tenant database ([`Session`]) and a
//! transaction on it ([`Tx`]): what the per-table modules run their
//! statements on. Every failure turns into a [`DbError`] here, so no caller
//! ever sees a `tokio_postgres::Error`.

use std::future::Future;
use std::sync::Arc;

use tokio_postgres::GenericClient;

use super::error::{DbError, QueryError};

/// Something statements run on: a session or a transaction.
pub trait Conn: Send + Sync {
    #[doc(hidden)]
    type Pg: GenericClient + Sync;
    #[doc(hidden)]
    fn pg(&self) -> &Self::Pg;
    /// `host:port/database`, for messages.
    fn target(&self) -> &str;
}

/// Runs one step's statements; a failure becomes a [`DbError`] saying
/// `what` failed on which database.
pub(crate) async fn step<T>(
    conn: &impl Conn,
    what: &'static str,
    work: impl Future<Output = Result<T, QueryError>>,
) -> Result<T, DbError> {
    work.await.map_err(|e| DbError::query(what, conn.target(), e))
}

/// Column `i` of a row of `table`. A value of an unexpected type or range
/// is an error naming the table and the column, never a panic.
pub(crate) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
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

/// One connection of a tenant's pool, returned to it when dropped.
pub struct Session {
    pub(super) client: deadpool_postgres::Object,
    pub(super) target: Arc<str>,
}

impl Conn for Session {
    type Pg = tokio_postgres::Client;

    fn pg(&self) -> &tokio_postgres::Client {
        &self.client
    }

    fn target(&self) -> &str {
        &self.target
    }
}

impl Session {
    pub async fn transaction(&mut self) -> Result<Tx<'_>, DbError> {
        let target = Arc::clone(&self.target);
        let tx =
            self.client.transaction().await.map_err(|e| DbError::query("starting a transaction", &target, e.into()))?;
        Ok(Tx { tx, target })
    }

    /// A read-only transaction on one snapshot: what `sync --dry-run` reads in.
    pub async fn read_only_snapshot(&mut self) -> Result<Tx<'_>, DbError> {
        let target = Arc::clone(&self.target);
        let tx = self
            .client
            .build_transaction()
            .read_only(true)
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .map_err(|e| DbError::query("starting a read-only transaction", &target, e.into()))?;
        Ok(Tx { tx, target })
    }
}

/// A transaction; dropped without [`Tx::commit`], it rolls back.
pub struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    target: Arc<str>,
}

impl<'a> Conn for Tx<'a> {
    type Pg = tokio_postgres::Transaction<'a>;

    fn pg(&self) -> &tokio_postgres::Transaction<'a> {
        &self.tx
    }

    fn target(&self) -> &str {
        &self.target
    }
}

impl Tx<'_> {
    pub async fn commit(self) -> Result<(), DbError> {
        let target = self.target;
        self.tx.commit().await.map_err(|e| DbError::query("committing", &target, e.into()))
    }

    pub async fn rollback(self) -> Result<(), DbError> {
        let target = self.target;
        self.tx.rollback().await.map_err(|e| DbError::query("rolling back", &target, e.into()))
    }

    /// A nested transaction: one read that may fail without ending this one.
    pub async fn savepoint(&mut self) -> Result<Tx<'_>, DbError> {
        let target = Arc::clone(&self.target);
        let tx =
            self.tx.savepoint("step").await.map_err(|e| DbError::query("setting a savepoint", &target, e.into()))?;
        Ok(Tx { tx, target })
    }
}

/// The three flag columns of a stage row, from column `first` on.
pub(crate) fn flags(
    row: &tokio_postgres::Row,
    first: usize,
    table: &'static str,
) -> Result<crate::model::StageFlags, QueryError> {
    Ok(crate::model::StageFlags {
        qualified: col(row, first, table)?,
        success: col(row, first + 1, table)?,
        fail: col(row, first + 2, table)?,
    })
}

/// Serialises the transaction's holders of `key` until it ends.
pub(crate) async fn xact_lock(conn: &impl Conn, what: &'static str, key: i64) -> Result<(), DbError> {
    step(conn, what, async { Ok(conn.pg().execute("SELECT pg_advisory_xact_lock($1)", &[&key]).await.map(drop)?) })
        .await
}
