//! The tenant databases: a small pool per tenant, the migrations, and (in
//! `queries`) every SQL statement the program runs. Nothing outside this
//! module writes SQL.

mod migrate;
pub mod queries;
pub(crate) mod tls;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

pub use migrate::migrate;

use crate::secret::Secret;

/// How tenant pools are sized and aged.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Connections per tenant database.
    pub max_size: usize,
    /// A connection unused this long is closed, so an idle daemon holds none.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings { max_size: 2, idle_timeout: Duration::from_secs(30), connect_timeout: Duration::from_secs(10) }
    }
}

/// Why a database step failed. Messages name the database by host, port and
/// name only, never by its URL (which may hold a password), and never print
/// a server error's DETAIL (which may quote row values).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL")]
    BadUrl,
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("{what} failed on {target}: {reason}")]
    Query { what: &'static str, target: String, reason: String, transient: bool },
    #[error("migrating {target} failed: {reason}")]
    Migrate { target: String, reason: String },
}

impl DbError {
    /// Worth retrying later: the server was unreachable or went away.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Connect { .. } => true,
            DbError::Query { transient, .. } => *transient,
            DbError::BadUrl | DbError::Migrate { .. } => false,
        }
    }
}

/// One tenant's pool, with the name its errors use.
#[derive(Clone)]
pub struct TenantDb {
    pool: Pool,
    target: Arc<str>,
}

impl fmt::Debug for TenantDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantDb({})", self.target)
    }
}

impl TenantDb {
    /// `host:port/database`, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(|e| DbError::Connect { target: self.target.to_string(), reason: pool_reason(e) })
    }

    pub(crate) fn query_error(&self, what: &'static str, e: tokio_postgres::Error) -> DbError {
        let transient = e.is_closed()
            || e.as_db_error()
                .is_none_or(|db| db.code().code().starts_with("08") || db.code().code().starts_with("57P"));
        DbError::Query { what, target: self.target.to_string(), reason: pg_reason(&e), transient }
    }

    /// Connections open right now (in use or idle).
    pub fn open_connections(&self) -> usize {
        self.pool.status().size
    }
}

/// The pools of every tenant database this process talks to, keyed by slug.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Mutex<HashMap<String, (Secret, TenantDb)>>>,
    settings: PoolSettings,
}

impl Pools {
    /// Must be called inside a tokio runtime: it starts the task that closes
    /// idle connections.
    pub fn new(settings: PoolSettings) -> Pools {
        let pools = Pools { inner: Arc::default(), settings };
        tokio::spawn(close_idle_connections(Arc::downgrade(&pools.inner), settings.idle_timeout));
        pools
    }

    /// The pool of a tenant's database, created on first use and replaced
    /// when the tenant's URL changes. Connecting happens lazily.
    pub fn get(&self, slug: &str, url: &Secret) -> Result<TenantDb, DbError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, db)) = inner.get(slug)
            && known == url
        {
            return Ok(db.clone());
        }
        let (mut config, connector) = tls::connect_params(url.expose())?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.settings.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("crm-connect");
        }
        let target: Arc<str> = describe(&config).into();
        let manager =
            Manager::from_connect(config, connector, ManagerConfig { recycling_method: RecyclingMethod::Verified });
        let pool = Pool::builder(manager)
            .max_size(self.settings.max_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(self.settings.connect_timeout))
            .recycle_timeout(Some(self.settings.connect_timeout))
            .wait_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|_| DbError::BadUrl)?;
        let db = TenantDb { pool, target };
        inner.insert(slug.to_string(), (url.clone(), db.clone()));
        Ok(db)
    }

    /// Forgets a tenant's pool; its connections close when the last user
    /// returns them.
    pub fn remove(&self, slug: &str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).remove(slug);
    }

    /// Connections open across all tenants.
    pub fn open_connections(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).values().map(|(_, db)| db.open_connections()).sum()
    }
}

async fn close_idle_connections(pools: Weak<Mutex<HashMap<String, (Secret, TenantDb)>>>, idle_timeout: Duration) {
    let mut tick = tokio::time::interval((idle_timeout / 2).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pools) = pools.upgrade() else { return };
        let dbs: Vec<TenantDb> =
            pools.lock().unwrap_or_else(|p| p.into_inner()).values().map(|(_, db)| db.clone()).collect();
        for db in dbs {
            db.pool.retain(|_, metrics| metrics.last_used() < idle_timeout);
        }
    }
}

/// `host:port/database` of a connection config: what errors and logs show.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("postgres"))
}

fn pool_reason(e: deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_reason(&e),
        deadpool_postgres::PoolError::Timeout(_) => "timed out".into(),
        other => other.to_string(),
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
