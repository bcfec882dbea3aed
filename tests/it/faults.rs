//! The fault matrix of RELIABILITY.md: PostgreSQL down at start or restarted
//! under a running daemon, the process killed in the middle of a refresh,
//! and CRM answers that drop, stall, break off, are not JSON, never end or
//! trickle. Every test asserts that nothing stored is lost and that the
//! sync recovers by itself (or, where it cannot, stops cleanly and says so).

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use crm_connect::apply::{Applied, apply_tenant, resync_stages};
use crm_connect::model::CrmState;
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig, TokenStats};
use crm_connect_sandbox::bitrix24::B24Sandbox;
use crm_connect_sandbox::faults::{Fault, RecordedRequest};
use crm_connect_sandbox::postgres::Cluster;
use crm_connect_sandbox::tenant_file::TenantFile;
use tokio_postgres::{Client, NoTls};

use crate::support::daemon::{Running, eventually};
use crate::support::postgres::fresh_database;
use crate::support::rows::{StatusRow, TokensRow, snapshot};
use crate::support::world::World;
use crate::support::{connect, crm_connect, with_code};

pub(crate) const TOKEN_PATH: &str = "/oauth2/access_token";
const ACCOUNT_PATH: &str = "/api/v4/account";
const PIPELINES_PATH: &str = "/api/v4/leads/pipelines";
/// The sandbox's default pipelines, with the statuses every pipeline gets.
const AMO_STAGES: usize = 12;
/// The client's bound on a body (`crm::http::MAX_BODY_BYTES`).
const BODY_LIMIT: usize = 8 << 20;

// ---------------------------------------------------------------------------
// Plumbing

/// A connection that may fail (the server may be down); its driver runs in a task.
pub(crate) async fn try_connect(url: &str) -> Option<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(connection);
    Some(client)
}

/// A throwaway cluster of this test's own, which it may stop and start.
async fn own_cluster() -> Cluster {
    tokio::task::spawn_blocking(Cluster::start).await.unwrap().expect("a cluster of the test's own starts")
}

async fn stop(mut cluster: Cluster) -> Cluster {
    tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap()
}

async fn start_again(mut cluster: Cluster) -> Cluster {
    tokio::task::spawn_blocking(move || {
        cluster.start_again().expect("the cluster starts again");
        cluster
    })
    .await
    .unwrap()
}

/// `crm-connect run --config DIR` as a child process, its log in a file;
/// killed if the test ends first.
pub(crate) struct Binary {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Binary {
    pub(crate) fn run(dir: &Path, log: PathBuf) -> Binary {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-connect"));
        for (key, _) in std::env::vars() {
            if key.starts_with("CRM_CONNECT_") || key == "CREDENTIALS_DIRECTORY" || key == "NOTIFY_SOCKET" {
                command.env_remove(key);
            }
        }
        let child = command
            .args(["run", "--config", dir.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Binary { child, log }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and how the process ended (waiting up to `within`).
    pub(crate) async fn terminate(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().expect("the daemon runs").to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(within, self.child.wait()).await.expect("exits in time").unwrap();
        (status, self.log())
    }

    /// SIGKILL: no destructor, no shutdown, no rollback of its own.
    pub(crate) async fn kill(mut self) -> String {
        self.child.start_kill().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.unwrap().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status:?}");
        self.log()
    }
}

pub(crate) fn is_refresh(request: &RecordedRequest) -> bool {
    request.path == TOKEN_PATH && request.form_or_json_field("grant_type").as_deref() == Some("refresh_token")
}

pub(crate) fn refreshes(log: &[RecordedRequest]) -> usize {
    log.iter().filter(|r| is_refresh(r)).count()
}

/// Refresh requests the sandbox answered with a new pair.
pub(crate) fn refreshed(log: &[RecordedRequest]) -> usize {
    log.iter().filter(|r| is_refresh(r) && r.status == 200).count()
}

/// The token refreshed `margin` before expiry, and the stage resync (which
/// would also store a pair kept in memory) kept out of the way: once a year.
pub(crate) fn with_margin(file: TenantFile, margin: &str) -> TenantFile {
    file.schedule("token_refresh_margin", margin).schedule("stage_resync", "0 0 1 1 *")
}

/// The path prefix of one Bitrix24 method of the sandbox's webhook.
fn b24_method(portal: &B24Sandbox, method: &str) -> String {
    format!("/rest/{}/{}/{method}", portal.config().user_id, portal.config().code)
}

fn b24_stage_count() -> usize {
    B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum()
}

/// The CRM's last sync succeeded (state `connected`, stages stored) after `since`.
pub(crate) async fn synced_since(url: &str, crm: &str, since: chrono::DateTime<chrono::Utc>) -> bool {
    let Some(client) = try_connect(url).await else { return false };
    client
        .query_opt(
            "SELECT 1 FROM crm_connect_status WHERE crm = $1 AND state = 'connected' AND last_success_at > $2",
            &[&crm, &since],
        )
        .await
        .is_ok_and(|row| row.is_some())
}

pub(crate) async fn db_now(client: &Client) -> chrono::DateTime<chrono::Utc> {
    client.query_one("SELECT now()", &[]).await.unwrap().get(0)
}

pub(crate) async fn state_is(url: &str, crm: &str, expected: &str) -> bool {
    let Some(client) = try_connect(url).await else { return false };
    StatusRow::read(&client, crm).await.is_some_and(|s| s.state == expected)
}

async fn stage_rows(client: &Client, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE removed_at IS NULL");
    client.query_one(&sql, &[]).await.unwrap().get(0)
}

/// A connection to the tenant's database sits "idle in transaction" holding
/// the `config` row lock (`SELECT … FOR UPDATE` takes RowShareLock on the
/// table): a token request is in flight.
pub(crate) async fn row_lock_held_while_idle(client: &Client) -> bool {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.relation = 'config'::regclass AND l.mode = 'RowShareLock'
               AND a.state = 'idle in transaction' AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map(|row| row.get::<_, i64>(0) > 0)
        .unwrap_or(false)
}

/// Whether a new connection can take the `config` row lock at once.
async fn row_lock_free(url: &str) -> bool {
    let Some(mut client) = try_connect(url).await else { return false };
    let Ok(tx) = client.transaction().await else { return false };
    let locked = tx.query("SELECT 1 FROM config FOR UPDATE NOWAIT", &[]).await;
    let _ = tx.rollback().await;
    locked.is_ok()
}

fn amo_failure(applied: &Applied) -> String {
    let (_, outcome) = applied.crms.first().expect("one CRM");
    match outcome {
        Ok(report) => panic!("the sync succeeded: {report:?}"),
        Err(failure) => {
            assert_eq!(failure.state(), CrmState::Error, "{failure:?}");
            failure.message.clone()
        }
    }
}

pub(crate) fn succeeded(applied: &Applied) {
    assert!(!applied.failed(), "{:?}", applied.crms);
}

/// An AmoCRM tenant applied once (code exchanged, stages stored), in
/// this process.
pub(crate) struct AmoSetup {
    pub(crate) world: World,
    pub(crate) tenant: crm_connect::config::TenantConfig,
    pub(crate) client: Client,
}

pub(crate) async fn amo_connected() -> AmoSetup {
    let world = World::amocrm().await;
    let tenant = world.tenant(&world.file_with_code());
    succeeded(&apply_tenant(&world.ctx, &tenant).await.unwrap());
    let client = world.client().await;
    assert_eq!(stage_rows(&client, "amocrm_pipeline_stages").await, AMO_STAGES as i64);
    AmoSetup { world, tenant, client }
}

struct B24Setup {
    world: World,
    tenant: crm_connect::config::TenantConfig,
    client: Client,
}

async fn b24_connected() -> B24Setup {
    let world = World::bitrix24().await;
    let tenant = world.tenant(&world.file());
    succeeded(&apply_tenant(&world.ctx, &tenant).await.unwrap());
    let client = world.client().await;
    assert_eq!(stage_rows(&client, "bitrix24_pipeline_stages").await, b24_stage_count() as i64);
    B24Setup { world, tenant, client }
}

// ---------------------------------------------------------------------------
// PostgreSQL down, restarted, gone mid-refresh

#[tokio::test]
async fn a_stopped_cluster_refuses_connections_and_starts_again_on_its_port_with_its_data() {
    let cluster = own_cluster().await;
    let url = cluster.create_database("kept").await.unwrap();
    let port = cluster.port();
    connect(&url).await.batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42)").await.unwrap();

    let mut cluster = stop(cluster).await;
    assert!(try_connect(&url).await.is_none(), "a stopped cluster accepts connections");
    cluster.stop(); // stopping twice is harmless
    let cluster = start_again(cluster).await;
    assert_eq!(cluster.port(), port);
    let value: i32 = connect(&url).await.query_one("SELECT v FROM t", &[]).await.unwrap().get(0);
    assert_eq!(value, 42);
    let dir = cluster.dir().to_owned();
    drop(cluster);
    assert!(!dir.exists(), "dropping the cluster removes its directory");
}

#[tokio::test]
async fn a_daemon_started_while_postgres_is_down_keeps_running_and_connects_the_tenant_once_it_is_up() {
    let cluster = own_cluster().await;
    let url = cluster.create_database("acme").await.unwrap();
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    with_code(&url, &amo).write(dir.path(), "acme").unwrap();
    let cluster = stop(cluster).await;

    // The first pass fails on the database, before any CRM call: the
    // single-use code is not spent while it could not be stored.
    let daemon = Running::start(dir.path()).await;
    assert!(daemon.is_running(), "the daemon gave up");
    assert!(amo.requests().is_empty(), "a CRM call without a database: {:?}", amo.requests());

    // Retries come 1, 2, 4 … s after the failure.
    let _cluster = start_again(cluster).await;
    let epoch = chrono::DateTime::UNIX_EPOCH;
    eventually("the tenant is synced", Duration::from_secs(30), || synced_since(&url, "amocrm", epoch)).await;
    let client = connect(&url).await;
    assert_eq!(stage_rows(&client, "amocrm_pipeline_stages").await, AMO_STAGES as i64);
    let TokensRow { access, refresh, .. } = TokensRow::read(&client).await;
    assert!(amo.is_access_token_valid(&access.unwrap()));
    assert!(refresh.is_some());
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    assert!(daemon.is_running());
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

/// A daemon in this process on a cluster of the test's own, its AmoCRM
/// token living 12 s and refreshed 9 s before expiry: every ~3 s.
struct Refreshing {
    cluster: Cluster,
    url: String,
    amo: AmoSandbox,
    daemon: Running,
    _dir: tempfile::TempDir,
}

async fn refreshing() -> Refreshing {
    let cluster = own_cluster().await;
    let url = cluster.create_database("acme").await.unwrap();
    let config = AmoSandboxConfig { expires_in: Duration::from_secs(12), ..AmoSandboxConfig::default() };
    let amo = AmoSandbox::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    with_margin(with_code(&url, &amo), "9s").write(dir.path(), "acme").unwrap();
    let daemon = Running::start(dir.path()).await;
    Refreshing { cluster, url, amo, daemon, _dir: dir }
}

async fn token_refreshed_events(client: &Client, stored_late: bool) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM crm_connect_events
             WHERE kind = 'token_refreshed' AND (coalesce(detail->>'stored_late', '') = 'true') = $1",
            &[&stored_late],
        )
        .await
        .unwrap()
        .get(0)
}

/// Refreshes go on, none rejected, and the stored pair is the live one.
async fn refreshes_go_on(amo: &AmoSandbox, url: &str, more: usize) {
    let now = refreshed(&amo.requests());
    let timeout = Duration::from_secs(10 + 4 * more as u64);
    assert!(amo.wait_for_requests(|r| refreshed(r) >= now + more, timeout).await, "refreshes stopped");
    let stats = amo.token_stats();
    assert_eq!(stats.refresh_rejected, 0, "a refresh token was lost or used twice: {stats:?}");
    assert_eq!(stats.exchanged, 1);
    let client = connect(url).await;
    eventually("the stored pair is the live one", Duration::from_secs(10), || async {
        let access = TokensRow::read(&client).await.access;
        access.is_some_and(|a| amo.is_access_token_valid(&a))
    })
    .await;
    assert_eq!(StatusRow::of(&client, "amocrm").await.state, "connected");
}

#[tokio::test]
async fn refreshes_go_on_after_postgres_was_down_across_a_due_refresh() {
    let Refreshing { cluster, url, amo, daemon, _dir } = refreshing().await;
    let client = connect(&url).await;
    eventually("a first refresh is stored", Duration::from_secs(15), || async {
        token_refreshed_events(&client, false).await >= 1
    })
    .await;
    let expires_at = TokensRow::read(&client).await.expires_at;
    drop(client);

    // Down until the next refresh is due, and a little longer: the daemon
    // tries while it is down (no CRM call without the row lock) and again
    // with backoff; pooled connections are dead when it is back.
    let cluster = stop(cluster).await;
    let due = expires_at.unwrap() - chrono::Duration::seconds(9) + chrono::Duration::milliseconds(1500);
    tokio::time::sleep((due - chrono::Utc::now()).to_std().unwrap_or_default()).await;
    let _cluster = start_again(cluster).await;

    refreshes_go_on(&amo, &url, 2).await;
    assert_eq!(token_refreshed_events(&connect(&url).await, true).await, 0, "no pair waited in memory");
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_pair_refreshed_while_postgres_restarts_is_stored_once_it_is_back_and_refreshes_go_on() {
    let Refreshing { cluster, url, amo, daemon, _dir } = refreshing().await;
    assert!(amo.wait_for_requests(|r| refreshed(r) >= 1, Duration::from_secs(15)).await, "a first refresh");

    // The next refresh holds the row lock while the CRM takes 1.5 s to
    // answer; the cluster stops meanwhile, ending its connection, so the new
    // pair cannot be written and is kept in memory.
    amo.faults().inject(TOKEN_PATH, Fault::Delay(Duration::from_millis(1500)), 1);
    let watcher = connect(&url).await;
    eventually("a refresh holds the row lock", Duration::from_secs(15), || row_lock_held_while_idle(&watcher)).await;
    drop(watcher);
    let answered = refreshed(&amo.requests());
    let cluster = stop(cluster).await;
    assert!(amo.wait_for_requests(|r| refreshed(r) > answered, Duration::from_secs(10)).await, "the CRM answered");
    // Still down when the refresh work ends (it then reads the stored expiry).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _cluster = start_again(cluster).await;

    let client = connect(&url).await;
    eventually("the pair kept in memory is stored", Duration::from_secs(20), || async {
        token_refreshed_events(&client, true).await == 1
    })
    .await;
    refreshes_go_on(&amo, &url, 2).await;
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

// ---------------------------------------------------------------------------
// The process killed with SIGKILL in the middle of a refresh

/// A tenant connected by `crm-connect sync`, its token due, and the next
/// token request spoiled by `fault`; then `crm-connect run` until it holds
/// the row lock waiting for the CRM, and SIGKILL. Returns what was stored
/// before, after the lock is seen to be free again.
struct Killed {
    amo: AmoSandbox,
    url: String,
    dir: tempfile::TempDir,
    client: Client,
    before: TokensRow,
}

async fn kill_mid_refresh(fault: Fault) -> Killed {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    with_code(&db.url, &amo).write(dir.path(), "acme").unwrap();
    let sync = crm_connect(&["sync", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert_eq!(sync.code, 0, "{sync:?}");
    let client = connect(&db.url).await;
    client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
    let before = TokensRow::read(&client).await;

    // A late answer is handled at once: the kill waits until the CRM has it.
    let handled_at_once = matches!(fault, Fault::LateAnswer(_));
    amo.faults().inject(TOKEN_PATH, fault, 1);
    let first = Binary::run(dir.path(), dir.path().join("first.log"));
    eventually("the refresh holds the row lock", Duration::from_secs(20), || row_lock_held_while_idle(&client)).await;
    if handled_at_once {
        let rotated = || async { amo.token_stats().refreshed > 0 };
        eventually("the CRM rotated the pair", Duration::from_secs(20), rotated).await;
    }
    let log = first.kill().await;
    // The lock died with the process: its connection is gone, nothing waits.
    eventually("the row lock is free", Duration::from_secs(10), || row_lock_free(&db.url)).await;
    assert_eq!(TokensRow::read(&client).await, before, "the killed process wrote tokens:\n{log}");
    Killed { amo, url: db.url, dir, client, before }
}

#[tokio::test]
async fn killed_while_a_delayed_refresh_is_in_flight_the_next_process_refreshes_with_the_same_token() {
    let delay = Duration::from_secs(3);
    let Killed { amo, url, dir, client, before } = kill_mid_refresh(Fault::Delay(delay)).await;
    // The sandbox handles a delayed request after the delay, and drops it
    // unhandled when its client is gone by then: nothing was rotated.
    let handled = amo.wait_for_requests(|r| refreshes(r) > 0, delay + Duration::from_secs(2)).await;
    assert!(!handled, "the delayed refresh was handled after its client died: {:?}", amo.requests());
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });

    let since = db_now(&client).await;
    let second = Binary::run(dir.path(), dir.path().join("second.log"));
    eventually("the second process synced", Duration::from_secs(20), || synced_since(&url, "amocrm", since)).await;
    let TokensRow { access, refresh, .. } = TokensRow::read(&client).await;
    assert!(amo.is_access_token_valid(&access.unwrap()), "{}", second.log());
    assert_ne!(refresh, before.refresh);
    assert_eq!(
        amo.token_stats(),
        TokenStats { exchanged: 1, refreshed: 1, ..TokenStats::default() },
        "{}",
        second.log()
    );
    second.kill().await;
}

#[tokio::test]
async fn killed_after_the_crm_rotated_the_pair_the_next_process_stops_at_needs_authorization_keeping_the_tokens() {
    let Killed { amo, url, dir, client, before } = kill_mid_refresh(Fault::LateAnswer(Duration::from_secs(30))).await;
    // The CRM rotated at once; its answer, with the only live refresh
    // token, was lost with the process.
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, refreshed: 1, ..TokenStats::default() });

    let second = Binary::run(dir.path(), dir.path().join("second.log"));
    eventually("needs_authorization", Duration::from_secs(20), || state_is(&url, "amocrm", "needs_authorization"))
        .await;
    let error = StatusRow::of(&client, "amocrm").await.last_error;
    let error = error.unwrap_or_default();
    assert!(error.contains("the refresh token was rejected (HTTP 401)"), "{error}");
    assert_eq!(TokensRow::read(&client).await, before, "the stored tokens must stay (never deleted)");
    assert_eq!(amo.token_stats().refresh_rejected, 1, "{}", second.log());

    // A new code recovers the tenant without a restart.
    let since = db_now(&client).await;
    with_code(&url, &amo).replace(dir.path(), "acme").unwrap();
    eventually("connected again", Duration::from_secs(20), || synced_since(&url, "amocrm", since)).await;
    let access = TokensRow::read(&client).await.access;
    assert!(amo.is_access_token_valid(&access.unwrap()));
    let stats = amo.token_stats();
    assert_eq!((stats.exchanged, stats.refresh_rejected), (2, 1), "{}", second.log());
    second.kill().await;
}

// ---------------------------------------------------------------------------
// CRM answers: dropped, late, broken, not JSON, huge, trickling

#[tokio::test]
async fn dropped_connections_and_late_answers_on_every_amocrm_endpoint_end_in_a_complete_sync() {
    let world = World::amocrm().await;
    let (amo, db, ctx) = (world.amo(), &world.db, &world.ctx);
    let tenant = world.tenant(&world.file_with_code());
    let spoil = || {
        for path in [TOKEN_PATH, ACCOUNT_PATH, PIPELINES_PATH] {
            amo.faults().inject(path, Fault::DropConnection, 1);
            amo.faults().inject(path, Fault::Delay(Duration::from_millis(300)), 1);
        }
    };

    // The code exchange, the account check, the pipelines.
    spoil();
    succeeded(&apply_tenant(ctx, &tenant).await.unwrap());
    let client = connect(&db.url).await;
    client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
    // The refresh, the account check, the pipelines; then a resync.
    spoil();
    succeeded(&apply_tenant(ctx, &tenant).await.unwrap());
    amo.faults().inject(PIPELINES_PATH, Fault::DropConnection, 1);
    succeeded(&resync_stages(ctx, &tenant).await.unwrap());

    let log = amo.requests();
    for path in [TOKEN_PATH, ACCOUNT_PATH, PIPELINES_PATH] {
        let dropped = log.iter().filter(|r| r.path == path && r.status == 0).count();
        assert!(dropped >= 2, "{path}: {dropped} dropped");
    }
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, refreshed: 1, ..TokenStats::default() });
    let access = TokensRow::read(&client).await.access;
    assert!(amo.is_access_token_valid(&access.unwrap()));
    assert_eq!(stage_rows(&client, "amocrm_pipeline_stages").await, AMO_STAGES as i64);
    assert_eq!(StatusRow::of(&client, "amocrm").await.state, "connected");
    assert_eq!(amo.violations(), 0);
}

#[tokio::test]
async fn dropped_connections_and_late_answers_on_every_bitrix24_endpoint_end_in_a_complete_sync() {
    let world = World::bitrix24().await;
    let (portal, db, ctx) = (world.portal(), &world.db, &world.ctx);
    let tenant = world.tenant(&world.file());
    let (batch, categories) = (b24_method(portal, "batch"), b24_method(portal, "crm.category.list"));
    // Both batches of a full sync (webhook check + categories, then stages).
    for _ in 0..2 {
        portal.faults().inject(&batch, Fault::DropConnection, 1);
        portal.faults().inject(&batch, Fault::Delay(Duration::from_millis(300)), 1);
    }
    succeeded(&apply_tenant(ctx, &tenant).await.unwrap());
    // A resync: the category list, then the stages batch.
    for path in [&categories, &batch] {
        portal.faults().inject(path, Fault::DropConnection, 1);
        portal.faults().inject(path, Fault::Delay(Duration::from_millis(300)), 1);
    }
    succeeded(&resync_stages(ctx, &tenant).await.unwrap());

    let log = portal.requests();
    assert_eq!(log.iter().filter(|r| r.path.starts_with(&batch) && r.status == 0).count(), 3);
    assert_eq!(log.iter().filter(|r| r.path.starts_with(&categories) && r.status == 0).count(), 1);
    let client = connect(&db.url).await;
    assert_eq!(stage_rows(&client, "bitrix24_pipeline_stages").await, b24_stage_count() as i64);
    let connected: bool =
        client.query_one("SELECT bitrix24_connected_at IS NOT NULL FROM config", &[]).await.unwrap().get(0);
    assert!(connected);
    assert_eq!(StatusRow::of(&client, "bitrix24").await.state, "connected");
    assert_eq!(portal.violations(), 0);
}

#[tokio::test]
async fn answers_that_trickle_in_within_the_timeout_are_read_whole_on_both_crms() {
    let drip = Fault::SlowDrip { chunk_every: Duration::from_millis(1) };
    let amo = amo_connected().await;
    amo.client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
    for path in [TOKEN_PATH, ACCOUNT_PATH, PIPELINES_PATH] {
        amo.world.amo().faults().inject(path, drip.clone(), 1);
    }
    succeeded(&apply_tenant(&amo.world.ctx, &amo.tenant).await.unwrap());
    assert_eq!(amo.world.amo().token_stats(), TokenStats { exchanged: 1, refreshed: 1, ..TokenStats::default() });
    let access = TokensRow::read(&amo.client).await.access;
    assert!(amo.world.amo().is_access_token_valid(&access.unwrap()));

    let b24 = b24_connected().await;
    let before = snapshot(&b24.client).await;
    b24.world.portal().faults().inject(&b24_method(b24.world.portal(), "batch"), drip, 2);
    succeeded(&apply_tenant(&b24.world.ctx, &b24.tenant).await.unwrap());
    assert_eq!(snapshot(&b24.client).await, before, "an unchanged sync wrote");
}

#[tokio::test]
async fn malformed_or_truncated_amocrm_json_is_a_clear_error_that_changes_nothing_and_the_next_sync_recovers() {
    let AmoSetup { world, tenant, client } = amo_connected().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    let not_json = Fault::Status { status: 200, content_type: "application/json", body: "{not json".into() };
    for fault in [Fault::TruncatedBody, not_json] {
        let before = snapshot(&client).await;
        amo.faults().inject(PIPELINES_PATH, fault.clone(), 1);
        let message = amo_failure(&apply_tenant(ctx, &tenant).await.unwrap());
        assert!(message.contains("HTTP 200 with a body that is not the expected JSON"), "{fault:?}: {message}");
        let StatusRow { state, last_error: error } = StatusRow::of(&client, "amocrm").await;
        assert_eq!((state.as_str(), error.as_deref()), ("error", Some(message.as_str())));
        assert_eq!(snapshot(&client).await, before, "{fault:?} changed stored data");

        succeeded(&apply_tenant(ctx, &tenant).await.unwrap());
        assert_eq!(StatusRow::of(&client, "amocrm").await.state, "connected");
        assert_eq!(snapshot(&client).await, before, "the recovering sync rewrote unchanged data");
    }
    // Not JSON is not worth a retry: one request each.
    let pipelines = amo.requests().iter().filter(|r| r.path == PIPELINES_PATH).count();
    assert_eq!(pipelines, 1 + 2 * 2);
}

#[tokio::test]
async fn malformed_or_truncated_bitrix24_json_is_a_clear_error_that_changes_nothing_and_the_next_sync_recovers() {
    let B24Setup { world, tenant, client } = b24_connected().await;
    let (portal, ctx) = (world.portal(), &world.ctx);
    let batch = b24_method(portal, "batch");
    let not_json = Fault::Status { status: 200, content_type: "application/json", body: "{not json".into() };
    // The first batch (webhook check, categories), then the second (stages):
    // a zero delay lets the first through unspoilt.
    for (first, second) in [(Fault::TruncatedBody, None), (Fault::Delay(Duration::ZERO), Some(not_json))] {
        let before = snapshot(&client).await;
        portal.faults().inject(&batch, first.clone(), 1);
        if let Some(second) = second.clone() {
            portal.faults().inject(&batch, second, 1);
        }
        let applied = apply_tenant(ctx, &tenant).await.unwrap();
        let (_, outcome) = &applied.crms[0];
        let failure = outcome.as_ref().expect_err("the sync failed");
        assert_eq!(failure.state(), CrmState::Error);
        assert!(failure.message.starts_with("unexpected response: `batch` answered"), "{}", failure.message);
        let StatusRow { state, last_error: error } = StatusRow::of(&client, "bitrix24").await;
        assert_eq!((state.as_str(), error.as_deref()), ("error", Some(failure.message.as_str())));
        assert_eq!(snapshot(&client).await, before, "{first:?}/{second:?} changed stored data");

        succeeded(&apply_tenant(ctx, &tenant).await.unwrap());
        assert_eq!(StatusRow::of(&client, "bitrix24").await.state, "connected");
        assert_eq!(snapshot(&client).await, before);
    }
    // Not JSON is not worth a retry: the first sync, then (1 + 2) and (2 + 2).
    let batches = portal.requests().iter().filter(|r| r.path.starts_with(&batch)).count();
    assert_eq!(batches, 2 + 3 + 4);
}

#[tokio::test]
async fn a_bitrix24_answer_that_is_not_json_is_reported_as_such() {
    let B24Setup { world, tenant, .. } = b24_connected().await;
    let (portal, ctx) = (world.portal(), &world.ctx);
    let not_json = Fault::Status { status: 200, content_type: "application/json", body: "{not json".into() };
    portal.faults().inject(&b24_method(portal, "batch"), not_json, 1);
    let applied = apply_tenant(ctx, &tenant).await.unwrap();
    let failure = applied.crms[0].1.as_ref().expect_err("the sync failed");
    assert!(failure.message.contains("JSON"), "{}", failure.message);
    assert!(!failure.message.contains("without a `result`"), "{}", failure.message);
}

#[tokio::test]
async fn a_10_mb_answer_is_refused_at_the_body_limit_and_changes_nothing_on_both_crms() {
    const TEN_MB: usize = 10_000_000;
    let expected = format!("response larger than {BODY_LIMIT} bytes");

    let AmoSetup { world, tenant, client } = amo_connected().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    // Chunked (the client counts while it reads), then with a Content-Length
    // (the client refuses before reading).
    let declared = Fault::Status { status: 200, content_type: "application/json", body: "x".repeat(TEN_MB) };
    for fault in [Fault::HugeBody(TEN_MB), declared] {
        let before = snapshot(&client).await;
        amo.faults().inject(PIPELINES_PATH, fault, 1);
        let sent = amo.requests().iter().filter(|r| r.path == PIPELINES_PATH).count();
        let message = amo_failure(&apply_tenant(ctx, &tenant).await.unwrap());
        assert!(message.contains(&expected), "{message}");
        let attempts = amo.requests().iter().filter(|r| r.path == PIPELINES_PATH).count() - sent;
        assert_eq!(attempts, 1, "a body too large is not worth a retry");
        assert_eq!(StatusRow::of(&client, "amocrm").await.state, "error");
        assert_eq!(snapshot(&client).await, before);
        succeeded(&apply_tenant(ctx, &tenant).await.unwrap());
        assert_eq!(snapshot(&client).await, before);
    }

    let B24Setup { world, tenant, client } = b24_connected().await;
    let (portal, ctx) = (world.portal(), &world.ctx);
    let before = snapshot(&client).await;
    portal.faults().inject(&b24_method(portal, "batch"), Fault::HugeBody(TEN_MB), 1);
    let applied = apply_tenant(ctx, &tenant).await.unwrap();
    let failure = applied.crms[0].1.as_ref().expect_err("the sync failed");
    assert!(failure.message.contains(&expected), "{}", failure.message);
    assert_eq!(StatusRow::of(&client, "bitrix24").await.state, "error");
    assert_eq!(snapshot(&client).await, before);
    succeeded(&apply_tenant(ctx, &tenant).await.unwrap());
    assert_eq!(snapshot(&client).await, before);
}

#[tokio::test]
async fn an_answer_that_trickles_past_the_request_timeout_is_given_up_retried_and_at_worst_changes_nothing() {
    let AmoSetup { world, tenant, client } = amo_connected().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    let mut ctx = ctx.clone().with_request_timeout(Duration::from_secs(1));
    ctx.retry.deadline = Duration::from_secs(3);
    // About 3 KB at 8 bytes every 50 ms would take 20 s.
    let drip = Fault::SlowDrip { chunk_every: Duration::from_millis(50) };
    let attempts = || amo.requests().iter().filter(|r| r.path == PIPELINES_PATH).count();
    let before = snapshot(&client).await;

    // Once: the attempt is given up at the timeout and the retry completes the sync.
    let (sent, started) = (attempts(), Instant::now());
    amo.faults().inject(PIPELINES_PATH, drip.clone(), 1);
    succeeded(&apply_tenant(&ctx, &tenant).await.unwrap());
    let took = started.elapsed();
    assert!((Duration::from_secs(1)..Duration::from_secs(4)).contains(&took), "took {took:?}");
    assert_eq!(attempts(), sent + 2);
    assert_eq!(snapshot(&client).await, before);

    // On every attempt: a timeout error once the retry deadline has passed.
    let (sent, started) = (attempts(), Instant::now());
    amo.faults().inject(PIPELINES_PATH, drip, 100);
    let message = amo_failure(&apply_tenant(&ctx, &tenant).await.unwrap());
    let took = started.elapsed();
    amo.faults().clear();
    assert!(message.contains("network error: timed out"), "{message}");
    assert!((Duration::from_secs(2)..Duration::from_secs(8)).contains(&took), "gave up after {took:?}");
    assert!(attempts() >= sent + 2, "retried within the deadline");
    assert_eq!(StatusRow::of(&client, "amocrm").await.state, "error");
    assert_eq!(snapshot(&client).await, before);
    succeeded(&apply_tenant(&ctx, &tenant).await.unwrap());
    assert_eq!(StatusRow::of(&client, "amocrm").await.state, "connected");
    assert_eq!(snapshot(&client).await, before);
}

// ---------------------------------------------------------------------------
// The fault machinery itself

#[tokio::test]
async fn a_huge_body_comes_chunked_and_a_slow_drip_takes_its_time() {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let token = amo.issue_long_lived_token(Duration::from_secs(3600));
    let url = format!("{}{PIPELINES_PATH}", amo.base_url());
    let http = reqwest::Client::new();

    amo.faults().inject(PIPELINES_PATH, Fault::HugeBody(1_000_000), 1);
    let answer = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.content_length(), None, "a huge body declares no length");
    assert_eq!(answer.bytes().await.unwrap().len(), 1_000_000);

    let whole = http.get(&url).bearer_auth(&token).send().await.unwrap().text().await.unwrap();
    amo.faults().inject(PIPELINES_PATH, Fault::SlowDrip { chunk_every: Duration::from_millis(2) }, 1);
    let started = Instant::now();
    let answer = http.get(&url).bearer_auth(&token).send().await.unwrap();
    let dripped = answer.text().await.unwrap();
    let took = started.elapsed();
    assert_eq!(dripped, whole);
    let least = Duration::from_millis(2) * u32::try_from(whole.len() / 8).unwrap();
    assert!(took >= least, "{} bytes in {took:?}", whole.len());
    // The dripping connection was closed: the next answer comes at once.
    let started = Instant::now();
    assert_eq!(http.get(&url).bearer_auth(&token).send().await.unwrap().text().await.unwrap(), whole);
    assert!(started.elapsed() < least);
}

#[tokio::test]
async fn a_late_answer_changes_the_crm_at_once_and_a_delayed_one_not_at_all_if_its_client_is_gone() {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let config = amo.config().clone();
    let exchange = |code: String| {
        serde_json::json!({
            "client_id": config.client_id, "client_secret": config.client_secret,
            "grant_type": "authorization_code", "code": code, "redirect_uri": config.redirect_uri,
        })
    };
    let url = format!("{}{TOKEN_PATH}", amo.base_url());
    let gives_up = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();

    amo.faults().inject(TOKEN_PATH, Fault::Delay(Duration::from_secs(1)), 1);
    let code = amo.issue_code();
    assert!(gives_up.post(&url).json(&exchange(code.clone())).send().await.is_err());
    let handled = amo.wait_for_requests(|r| !r.is_empty(), Duration::from_secs(2)).await;
    assert!(!handled, "a delayed request was handled after its client left");
    assert_eq!(amo.token_stats(), TokenStats::default());

    amo.faults().inject(TOKEN_PATH, Fault::LateAnswer(Duration::from_secs(1)), 1);
    assert!(gives_up.post(&url).json(&exchange(code)).send().await.is_err());
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
}
