//! The pools: a small pool per tenant database, and a connection budget
//! per PostgreSQL server shared by every tenant database on it.
//!
//! A connection holds a permit of its server's budget from before it is
//! opened until the server has closed it (the permit lives in the
//! connection's task, which ends once the server closed its end), so
//! the daemon never has more connections to one server than the budget,
//! however many tenants it serves. Waiting for a permit is FIFO. Idle
//! connections are closed when their tenant's work ends, and at once when
//! another tenant waits for the budget.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::error::{DbError, pg_reason};
use super::session::Session;
use super::tls;
use crate::secret::Secret;

/// How tenant pools are sized and aged.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Connections per tenant database.
    pub max_size: usize,
    /// Connections per PostgreSQL server, over all its tenant databases
    /// (`--db-connections`).
    pub server_connections: usize,
    /// A connection unused this long is closed even if its tenant's work
    /// did not say it was done.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_size: 2,
            server_connections: 10,
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// "Too many clients" (53300) and "cannot connect now" (57P03, starting up
/// or shutting down): the server is busy, not broken. Retried this long.
const BUSY_RETRY_FOR: Duration = Duration::from_secs(300);

/// One PostgreSQL server's connection budget.
struct Budget {
    permits: Arc<Semaphore>,
    /// The permits it started with (`--db-connections`).
    size: usize,
    /// Tasks waiting for a permit now.
    waiting: AtomicUsize,
    /// Told when a task starts waiting: idle connections are closed for it.
    wanted: Arc<Notify>,
}

impl Budget {
    async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return permit;
        }
        // Counted while waiting, also when the wait is given up (the task
        // was cancelled): a count left behind would keep the reaper busy.
        let _waiting = Waiting::new(&self.waiting);
        self.wanted.notify_one();
        let permit = Arc::clone(&self.permits).acquire_owned().await;
        permit.expect("the budget semaphore is never closed")
    }
}

/// One task waiting for a budget, for as long as this lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Waiting<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens connections within the server's budget; the permit is released
/// when the connection's task ends (the client was dropped or the server
/// went away).
struct BudgetedConnect {
    connector: tls::Connector,
    budget: Arc<Budget>,
    busy_retries: Counter,
}

impl deadpool_postgres::Connect for BudgetedConnect {
    fn connect(&self, config: &tokio_postgres::Config) -> ConnectFuture<'_> {
        let config = config.clone();
        Box::pin(async move {
            let permit = self.budget.acquire().await;
            let started = tokio::time::Instant::now();
            let mut delay = Duration::from_millis(100);
            let (client, connection) = loop {
                match self.connector.open(&config).await {
                    Err(e) if is_busy(&e) && started.elapsed() + delay < BUSY_RETRY_FOR => {
                        self.busy_retries.inc();
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    other => break other?,
                }
            };
            let task = tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "a database connection ended");
                }
            });
            Ok((client, task))
        })
    }
}

type ConnectFuture<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
            > + Send
            + 'a,
    >,
>;

/// 53300 too many clients, 57P03 cannot connect now.
fn is_busy(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| matches!(db.code().code(), "53300" | "57P03"))
}

/// One tenant's pool, with the name its errors use.
#[derive(Clone)]
pub struct TenantDb {
    pool: Pool,
    target: Arc<str>,
    /// The migrations ran (or were found applied) once in this process.
    pub(super) migrated: Arc<tokio::sync::OnceCell<()>>,
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

    /// A connection of the tenant's pool (opened within its server's
    /// budget if none is idle).
    pub async fn session(&self) -> Result<Session, DbError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| DbError::Connect { target: self.target.to_string(), reason: pool_reason(e) })?;
        Ok(Session { client, target: Arc::clone(&self.target) })
    }

    /// Connections open right now (in use or idle).
    pub fn open_connections(&self) -> usize {
        self.pool.status().size
    }

    /// Closes the idle connections: the tenant's work is done.
    pub fn close_idle(&self) {
        self.pool.retain(|_, _| false);
    }
}

type TenantPools = Mutex<HashMap<String, (Secret, TenantDb, Arc<Budget>)>>;

/// The pools of every tenant database this process talks to, keyed by
/// slug, and the connection budget of every server they are on.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<TenantPools>,
    budgets: Arc<Mutex<HashMap<String, Arc<Budget>>>>,
    /// Told when a task starts waiting for a budget.
    wanted: Arc<Notify>,
    busy_retries: Counter,
    settings: PoolSettings,
}

impl Pools {
    /// Must be called inside a tokio runtime: it starts the task that closes
    /// idle connections.
    pub fn new(settings: PoolSettings) -> Pools {
        let pools = Pools {
            inner: Arc::default(),
            budgets: Arc::default(),
            wanted: Arc::default(),
            busy_retries: Counter::default(),
            settings,
        };
        tokio::spawn(close_idle_connections(Arc::downgrade(&pools.inner), pools.wanted.clone(), settings.idle_timeout));
        pools
    }

    /// Counts connection attempts a server refused as busy (53300, 57P03)
    /// and that were tried again in `counter` (the daemon's metric).
    pub fn counting_busy_retries(mut self, counter: Counter) -> Pools {
        self.busy_retries = counter;
        self
    }

    /// The budget of the server `config` points at: same host (or socket
    /// directory) and port, same budget.
    fn budget(&self, config: &tokio_postgres::Config) -> Arc<Budget> {
        let server = describe_server(config);
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let size = self.settings.server_connections.max(1);
        let budget = budgets.entry(server).or_insert_with(|| {
            Arc::new(Budget {
                permits: Arc::new(Semaphore::new(size)),
                size,
                waiting: AtomicUsize::new(0),
                wanted: self.wanted.clone(),
            })
        });
        Arc::clone(budget)
    }

    /// The pool of a tenant's database, created on first use and replaced
    /// when the tenant's URL changes. Connecting happens lazily.
    pub fn get(&self, slug: &str, url: &Secret) -> Result<TenantDb, DbError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, db, _)) = inner.get(slug)
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
        let budget = self.budget(&config);
        let connect = BudgetedConnect { connector, budget: budget.clone(), busy_retries: self.busy_retries.clone() };
        // A connection lives for one unit of work, so one taken again is
        // seconds old: checked for a closed socket, not with a round trip.
        let manager = Manager::from_connect(config, connect, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        // No create timeout: creating includes the FIFO wait for the
        // server's budget, which may rightly be long; the connect itself
        // has `connect_timeout`.
        let pool = Pool::builder(manager)
            .max_size(self.settings.max_size)
            .runtime(Runtime::Tokio1)
            .recycle_timeout(Some(self.settings.connect_timeout))
            .build()
            .map_err(|_| DbError::BadUrl)?;
        let db = TenantDb { pool, target, migrated: Arc::default() };
        inner.insert(slug.to_string(), (url.clone(), db.clone(), budget));
        Ok(db)
    }

    /// Closes a tenant's idle connections (its work is done).
    pub fn close_idle(&self, slug: &str) {
        let db = self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(slug).map(|(_, db, _)| db.clone());
        if let Some(db) = db {
            db.close_idle();
        }
    }

    /// Forgets a tenant's pool; its connections close when the last user
    /// returns them.
    pub fn remove(&self, slug: &str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).remove(slug);
    }

    /// Connections open across all tenants.
    pub fn open_connections(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).values().map(|(_, db, _)| db.open_connections()).sum()
    }

    /// Every server's budget as it stands now, by `host:port`.
    pub fn servers(&self) -> Vec<ServerUse> {
        let budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let mut servers: Vec<ServerUse> = budgets
            .iter()
            .map(|(server, budget)| ServerUse {
                server: server.clone(),
                open: budget.size.saturating_sub(budget.permits.available_permits()),
                budget: budget.size,
                waiting: budget.waiting.load(Ordering::SeqCst),
            })
            .collect();
        servers.sort_by(|a, b| a.server.cmp(&b.server));
        servers
    }
}

/// One PostgreSQL server's connection budget as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUse {
    /// `host:port` (or `socket-directory:port`).
    pub server: String,
    /// Connections open or being opened: each holds a permit.
    pub open: usize,
    pub budget: usize,
    /// Tasks waiting for a permit.
    pub waiting: usize,
}

/// While others wait for a server's budget, a connection of that server
/// idle this long is closed: longer than the pause between two database
/// steps of one tenant's work, shorter than any CRM answer it waits for.
const IDLE_WHILE_WANTED: Duration = Duration::from_millis(50);

/// Closes connections idle for `idle_timeout`, and, while tasks wait for a
/// server's budget, that server's connections idle for
/// [`IDLE_WHILE_WANTED`] (looking again every few milliseconds until no one
/// waits). A look goes over every tenant's pool, so while someone waits the
/// next look is the timed one: a look per new waiter cost a thousand
/// tenants' pools per connection asked for.
async fn close_idle_connections(pools: Weak<TenantPools>, wanted: Arc<Notify>, idle_timeout: Duration) {
    let mut tick = tokio::time::interval((idle_timeout / 2).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut someone_waits = false;
    loop {
        let soon = tokio::time::sleep(if someone_waits { IDLE_WHILE_WANTED / 2 } else { Duration::from_secs(3600) });
        let waiters_only = tokio::select! {
            _ = tick.tick() => false,
            () = wanted.notified(), if !someone_waits => true,
            () = soon => true,
        };
        let Some(strong) = pools.upgrade() else { return };
        let all = strong.lock().unwrap_or_else(|p| p.into_inner());
        someone_waits = false;
        for (_, db, budget) in all.values() {
            if budget.waiting.load(Ordering::SeqCst) > 0 {
                someone_waits = true;
                db.pool.retain(|_, metrics| metrics.last_used() < IDLE_WHILE_WANTED);
            } else if !waiters_only {
                db.pool.retain(|_, metrics| metrics.last_used() < idle_timeout);
            }
        }
    }
}

/// `host:port/database` of a connection config: what errors and logs show.
pub(super) fn describe(config: &tokio_postgres::Config) -> String {
    format!("{}/{}", describe_server(config), config.get_dbname().unwrap_or("postgres"))
}

/// `host:port` (or `socket-directory:port`): one server, one budget.
fn describe_server(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

fn pool_reason(e: deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_reason(&e),
        deadpool_postgres::PoolError::Timeout(_) => "timed out".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(permits: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(permits)),
            size: permits,
            waiting: AtomicUsize::new(0),
            wanted: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_no_longer_counts_as_waiting() {
        let budget = budget(1);
        let held = budget.acquire().await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), budget.acquire()).await;
        assert!(gave_up.is_err(), "the only permit is held");
        assert_eq!(budget.waiting.load(Ordering::SeqCst), 0);
        drop(held);
        let _again = budget.acquire().await;
        assert_eq!(budget.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn waiters_are_served_in_the_order_they_came() {
        let budget = Arc::new(budget(1));
        let held = budget.acquire().await;
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for i in 0..5 {
            let (shared, order) = (budget.clone(), order_tx.clone());
            waiters.push(tokio::spawn(async move {
                let _permit = shared.acquire().await;
                order.send(i).unwrap();
            }));
            // Each waiter is queued before the next one starts.
            while budget.waiting.load(Ordering::SeqCst) < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        drop(order_tx);
        let mut order = Vec::new();
        while let Some(i) = order_rx.recv().await {
            order.push(i);
        }
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }
}
