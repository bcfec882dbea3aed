//! `DbError`, the only error that leaves `db`: a failed connect, statement
//! or migration, or a stored value this program cannot read — each naming
//! the database by host, port and name, never by its URL (which may hold a
//! password), and never printing a server error's DETAIL (which may quote
//! row values).

/// Why a database step failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL")]
    BadUrl,
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("{what} failed on {target}: {reason}")]
    Query { what: &'static str, target: String, reason: String, transient: bool, missing_schema: bool },
    #[error("migrating {target} failed: {reason}")]
    Migrate { target: String, reason: String },
    /// A stored value this program cannot read (another program's column
    /// type, an out-of-range value).
    #[error("{target}: column {table}.{column} holds a value this program cannot read: {reason}")]
    Column { target: String, table: &'static str, column: String, reason: String },
}

impl DbError {
    /// Worth retrying later: the server was unreachable or went away.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Connect { .. } => true,
            DbError::Query { transient, .. } => *transient,
            DbError::BadUrl | DbError::Migrate { .. } | DbError::Column { .. } => false,
        }
    }

    /// The statement hit a table or column the migrations would create.
    pub fn is_missing_schema(&self) -> bool {
        matches!(self, DbError::Query { missing_schema: true, .. })
    }

    pub(crate) fn query(what: &'static str, target: &str, e: QueryError) -> DbError {
        match e {
            QueryError::Statement(e) => {
                let code = e.as_db_error().map(|db| db.code().code().to_owned());
                let transient = e.is_closed()
                    || code
                        .as_deref()
                        .is_none_or(|code| code.starts_with("08") || code.starts_with("57P") || code == "53300");
                let missing_schema = matches!(code.as_deref(), Some("42P01" | "42703"));
                DbError::Query { what, target: target.to_owned(), reason: pg_reason(&e), transient, missing_schema }
            }
            QueryError::Column { table, column, reason } => {
                DbError::Column { target: target.to_owned(), table, column, reason }
            }
        }
    }
}

/// Inside `db` only: a failed statement, or a value read back that does not
/// fit (a column another program created with another type, say).
#[derive(Debug)]
pub(crate) enum QueryError {
    Statement(tokio_postgres::Error),
    Column { table: &'static str, column: String, reason: String },
}

impl From<tokio_postgres::Error> for QueryError {
    fn from(e: tokio_postgres::Error) -> Self {
        QueryError::Statement(e)
    }
}

/// A server error's severity, code and message (not its DETAIL), or the
/// client-side error chain.
pub(crate) fn pg_reason(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}
