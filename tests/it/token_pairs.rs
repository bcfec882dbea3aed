//! "Never lose a pair": every path that obtains an AmoCRM token pair — an
//! exchange, a refresh, a reconcile, a one-shot command, the daemon's
//! shutdown, a lease lost in a partition — ends with the pair stored, a code
//! sent at most once, and no refresh token used twice. Each test names the
//! path it closes and asserts on the database and the sandbox's request log.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{Datelike, Utc};
use crm_connect::apply::{apply_tenant, resync_stages};
use crm_connect::model::CrmState;
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig, TokenStats};
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::faults::{Fault, RecordedRequest};
use crm_connect_sandbox::tenant_file::TenantFile;
use serde_json::json;
use tokio_postgres::Client;

use crate::faults::{
    AmoSetup, Binary, TOKEN_PATH, amo_connected, refreshes, row_lock_held_while_idle, succeeded, with_margin,
};
use crate::support::daemon::{Running, eventually};
use crate::support::postgres::fresh_database;
use crate::support::proxy::Proxy;
use crate::support::rows::{StatusRow, TokensRow};
use crate::support::{connect, crm_connect, fast_context, tenant, with_code};

fn code_requests(log: &[RecordedRequest]) -> usize {
    log.iter()
        .filter(|r| r.path == TOKEN_PATH && r.form_or_json_field("grant_type").as_deref() == Some("authorization_code"))
        .count()
}

async fn amo_state(client: &Client) -> String {
    StatusRow::read(client, "amocrm").await.map(|s| s.state).unwrap_or_default()
}

/// Makes every write of a new access token fail, as a database that breaks
/// between the CRM's answer and the commit would.
async fn refuse_token_writes(client: &Client) {
    client
        .batch_execute(
            "CREATE FUNCTION refuse_token_writes() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.amocrm_access_token IS DISTINCT FROM OLD.amocrm_access_token THEN
                     RAISE EXCEPTION 'token writes refused by the test';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_token_writes BEFORE UPDATE ON config
                 FOR EACH ROW EXECUTE FUNCTION refuse_token_writes();",
        )
        .await
        .unwrap();
}

async fn allow_token_writes(client: &Client) {
    client.batch_execute("DROP TRIGGER refuse_token_writes ON config").await.unwrap();
}

/// A free loopback address for `--listen`.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// 1. An account change decided under the row lock

#[tokio::test]
async fn two_processes_applying_an_account_change_with_a_new_code_keep_a_valid_pair_every_round() {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let client = connect(&db.url).await;
    let file = |subdomain: &str| tenant("acme", &with_code(&db.url, &amo).amocrm_string("subdomain", subdomain));
    // Two processes: each its own pools, HTTP client and pairs in memory.
    let (one, two) = (fast_context(), fast_context());
    // The second process starts a little later each round, so that its
    // reads and writes fall at every point of the first one's edit.
    for round in 0..4usize {
        let subdomain = if round == 0 { "sandbox".to_string() } else { format!("sandbox{round}") };
        let edited = file(&subdomain);
        let stagger = Duration::from_millis(round as u64);
        let second = async {
            tokio::time::sleep(stagger).await;
            apply_tenant(&two, &edited).await
        };
        let (a, b) = tokio::join!(apply_tenant(&one, &edited), second);
        let (a, b) = (a.unwrap(), b.unwrap());
        let TokensRow { access, refresh, .. } = TokensRow::read(&client).await;
        assert!(
            access.as_deref().is_some_and(|t| amo.is_access_token_valid(t)) && refresh.is_some(),
            "round {round}: no valid pair stored; {:?} / {:?}",
            a.crms,
            b.crms
        );
        succeeded(&a);
        succeeded(&b);
        let stats = amo.token_stats();
        assert_eq!((stats.exchanged, stats.exchange_rejected), (round + 1, 0), "round {round}: {stats:?}");
        assert_eq!(amo_state(&client).await, "connected");
    }
}

/// Exchanges `code` at the sandbox as another program would, returning
/// (access, refresh).
async fn exchange_elsewhere(amo: &AmoSandbox, code: &str) -> (String, String) {
    let c = amo.config();
    let body = json!({
        "client_id": c.client_id, "client_secret": c.client_secret, "grant_type": "authorization_code",
        "code": code, "redirect_uri": c.redirect_uri,
    });
    let url = format!("{}/oauth2/access_token", amo.base_url());
    let answer: serde_json::Value =
        reqwest::Client::new().post(url).json(&body).send().await.unwrap().json().await.unwrap();
    (answer["access_token"].as_str().unwrap().into(), answer["refresh_token"].as_str().unwrap().into())
}

#[tokio::test]
async fn an_account_change_read_before_another_process_stored_the_new_accounts_pair_never_clears_it() {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let with = |subdomain: &str, code: &str| {
        let file = TenantFile::new().database_url(&db.url).amocrm(&amo).authorization_code(code);
        tenant("acme", &file.amocrm_string("subdomain", subdomain))
    };
    let ctx = fast_context();
    succeeded(&apply_tenant(&ctx, &with("sandbox", &amo.issue_code())).await.unwrap());

    // The other process is ahead: it holds the row while this one reads the
    // old columns and decides that the account changed.
    let mut other = connect(&db.url).await;
    let other_tx = other.transaction().await.unwrap();
    other_tx.query_one("SELECT 1 FROM config WHERE id = 1 FOR UPDATE", &[]).await.unwrap();
    let code = amo.issue_code();
    let edited = with("sandbox2", &code);
    let this = tokio::spawn({
        let ctx = ctx.clone();
        async move { apply_tenant(&ctx, &edited).await.unwrap() }
    });
    let watcher = connect(&db.url).await;
    eventually("this process waits for the row", Duration::from_secs(10), || async {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        waiting > 0
    })
    .await;
    // … applies the same edit, exchanges the new code and stores its pair.
    let (access, refresh) = exchange_elsewhere(&amo, &code).await;
    let hash = crm_connect::tokens::sha256_hex(&crm_connect::secret::Secret::new(code.clone()));
    other_tx
        .execute(
            "UPDATE config SET amocrm_subdomain = 'sandbox2', amocrm_access_token = $1, amocrm_refresh_token = $2,
                 amocrm_token_expires_at = now() + interval '1 day', amocrm_auth_code_sha256 = $3 WHERE id = 1",
            &[&access, &refresh, &hash],
        )
        .await
        .unwrap();
    other_tx.commit().await.unwrap();

    let applied = this.await.unwrap();
    let client = connect(&db.url).await;
    assert_eq!(
        TokensRow::read(&client).await.access.as_deref(),
        Some(access.as_str()),
        "the new account's pair was cleared"
    );
    succeeded(&applied);
    assert_eq!(code_requests(&amo.requests()), 2, "each code once");
}

// ---------------------------------------------------------------------------
// 2 and 6. A pair whose write failed: its code counts as sent, and it is
// written only over what it replaces

/// A tenant whose code was exchanged but whose pair could not be written.
struct Unwritten {
    amo: AmoSandbox,
    url: String,
    client: Client,
    ctx: crm_connect::context::Context,
    with_code: crm_connect::config::TenantConfig,
}

async fn exchanged_but_unwritten() -> Unwritten {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let ctx = fast_context();
    // The tables exist and the tenant waits for authorisation.
    let applied =
        apply_tenant(&ctx, &tenant("acme", &TenantFile::new().database_url(&db.url).amocrm(&amo))).await.unwrap();
    assert!(applied.failed());
    let client = connect(&db.url).await;
    refuse_token_writes(&client).await;

    let with_code = tenant("acme", &crate::support::with_code(&db.url, &amo));
    let applied = apply_tenant(&ctx, &with_code).await.unwrap();
    assert!(applied.failed(), "the write was refused, yet: {:?}", applied.crms);
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    assert_eq!(TokensRow::read(&client).await.access, None);
    allow_token_writes(&client).await;
    Unwritten { amo, url: db.url, client, ctx, with_code }
}

#[tokio::test]
async fn an_exchanged_pair_whose_write_failed_is_stored_by_the_next_reconcile_without_sending_the_code_again() {
    let Unwritten { amo, client, ctx, with_code, .. } = exchanged_but_unwritten().await;
    let applied = apply_tenant(&ctx, &with_code).await.unwrap();
    succeeded(&applied);
    assert_eq!(code_requests(&amo.requests()), 1, "the code was sent again");
    let TokensRow { access, refresh, .. } = TokensRow::read(&client).await;
    assert!(amo.is_access_token_valid(&access.unwrap()));
    assert!(refresh.is_some());
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    assert_eq!(amo_state(&client).await, "connected");
}

#[tokio::test]
async fn a_pair_kept_in_memory_is_never_written_over_a_long_lived_token_configured_since() {
    let Unwritten { amo, url, client, ctx, .. } = exchanged_but_unwritten().await;
    let long_lived = amo.issue_long_lived_token(Duration::from_secs(3600));
    let text = TenantFile::new().database_url(&url).amocrm(&amo).long_lived_token(&long_lived);
    succeeded(&apply_tenant(&ctx, &tenant("acme", &text)).await.unwrap());
    let TokensRow { access, refresh, .. } = TokensRow::read(&client).await;
    assert_eq!(access.as_deref(), Some(long_lived.as_str()), "the old account's pair was written over it");
    assert_eq!(refresh, None);
    // And it stays so: the pair was dropped, not kept for later.
    succeeded(&apply_tenant(&ctx, &tenant("acme", &text)).await.unwrap());
    assert_eq!(TokensRow::read(&client).await.access.as_deref(), Some(long_lived.as_str()));
}

// ---------------------------------------------------------------------------
// 3 and 4. Deadlines of the caller never cut a token request

/// A tenant connected by `crm-connect sync` whose token is due now; the next
/// token request rotates at once but answers only after `late`.
async fn due_with_a_late_token_answer(late: Duration) -> (AmoSandbox, tempfile::TempDir, Client, Option<String>) {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let text = with_code(&db.url, &amo);
    with_margin(text, "1m").write(dir.path(), "acme").unwrap();
    let sync = crm_connect(&["sync", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert_eq!(sync.code, 0, "{sync:?}");
    let client = connect(&db.url).await;
    client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
    let refresh = TokensRow::read(&client).await.refresh;
    amo.faults().inject(TOKEN_PATH, Fault::LateAnswer(late), 1);
    (amo, dir, client, refresh)
}

async fn the_rotated_pair_is_stored(amo: &AmoSandbox, client: &Client, before: &Option<String>, output: &str) {
    let TokensRow { access, refresh, .. } = TokensRow::read(client).await;
    assert_ne!(&refresh, before, "the rotated pair was lost:\n{output}");
    assert!(access.is_some_and(|a| amo.is_access_token_valid(&a)), "{output}");
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, refreshed: 1, ..TokenStats::default() }, "{output}");
    assert_eq!(amo_state(client).await, "connected", "{output}");
}

#[tokio::test]
async fn sync_whose_deadline_passes_during_a_slow_token_request_stores_the_pair_before_it_exits() {
    let late = Duration::from_secs(3);
    let (amo, dir, client, before) = due_with_a_late_token_answer(late).await;
    let started = Instant::now();
    let run = crm_connect(&["sync", "--config", dir.path().to_str().unwrap(), "--timeout", "1s"], &[]).await;
    assert!(started.elapsed() >= late, "sync left before its token request ended: {run:?}");
    assert!(run.stdout.contains("gave up after 1s"), "{run:?}");
    assert_eq!(run.code, 1, "{run:?}");
    the_rotated_pair_is_stored(&amo, &client, &before, &run.output()).await;
}

#[tokio::test]
async fn sigterm_during_a_slow_token_request_stores_the_pair_and_exits_0() {
    // Longer than the shutdown grace for other work, shorter than an attempt.
    let late = Duration::from_secs(11);
    let (amo, dir, client, before) = due_with_a_late_token_answer(late).await;
    let daemon = Binary::run(dir.path(), dir.path().join("daemon.log"));
    eventually("the refresh holds the row lock", Duration::from_secs(20), || row_lock_held_while_idle(&client)).await;
    let (status, log) = daemon.terminate(Duration::from_secs(40)).await;
    assert_eq!(status.code(), Some(0), "{log}");
    the_rotated_pair_is_stored(&amo, &client, &before, &log).await;
}

// ---------------------------------------------------------------------------
// 5. Cadence: no refresh loop, whatever the margin or the error

#[tokio::test]
async fn a_margin_longer_than_the_token_lifetime_refreshes_at_most_once_per_half_lifetime() {
    let lifetime = Duration::from_secs(6);
    let amo =
        AmoSandbox::start(AmoSandboxConfig { expires_in: lifetime, ..AmoSandboxConfig::default() }).await.unwrap();
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let text = with_code(&db.url, &amo);
    with_margin(text, "25h").write(dir.path(), "acme").unwrap();
    let daemon = Running::start(dir.path()).await;
    let window = Duration::from_secs(9);
    tokio::time::sleep(window).await;
    let made = refreshes(&amo.requests());
    // One per 3 s: 3 in 9 s, one more for the edges of the window.
    assert!((2..=4).contains(&made), "{made} refreshes in {window:?} with a {lifetime:?} lifetime");
    assert_eq!(amo.token_stats().refresh_rejected, 0);
    let status = crm_connect(&["status", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert!(status.stdout.contains("refreshed at half the token lifetime"), "{status:?}");
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_refresh_that_keeps_failing_in_a_way_that_is_not_transient_backs_off_instead_of_looping() {
    let AmoSetup { world, tenant, client } = amo_connected().await;
    let amo = world.amo();
    let dir = tempfile::tempdir().unwrap();
    let url = tenant.database_url.expose().to_string();
    with_margin(TenantFile::new().database_url(&url).amocrm(amo), "1m").write(dir.path(), "acme").unwrap();
    client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
    let malformed = Fault::Status { status: 200, content_type: "application/json", body: "{\"hint\":1}".into() };
    amo.faults().inject(TOKEN_PATH, malformed, 1000);
    let daemon = Running::start(dir.path()).await;
    let window = Duration::from_secs(7);
    tokio::time::sleep(window).await;
    let made = refreshes(&amo.requests());
    // 1, 2, 4 s apart: at most 4 in 7 s (a loop would make 7 or more).
    assert!((1..=4).contains(&made), "{made} failing refreshes in {window:?}");
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

// ---------------------------------------------------------------------------
// 7. Token answers read leniently

#[tokio::test]
async fn a_token_answer_with_an_odd_expires_in_is_kept_with_a_sane_expiry() {
    let AmoSetup { world, tenant, client } = amo_connected().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    let shapes = [
        json!("86400"),
        json!(86400.5),
        json!(-5),
        json!(0),
        json!(1e300),
        json!(i64::MAX),
        json!(null),
        json!("soon"),
    ];
    for shape in &shapes {
        amo.set_expires_in_wire(Some(shape.clone()));
        client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
        let before = TokensRow::read(&client).await.refresh;
        let applied = resync_stages(ctx, &tenant).await.unwrap();
        assert!(!applied.failed(), "expires_in {shape}: {:?}", applied.crms);
        let TokensRow { access, refresh, expires_at } = TokensRow::read(&client).await;
        assert_ne!(refresh, before, "expires_in {shape}: the pair was not stored");
        assert!(amo.is_access_token_valid(&access.unwrap()));
        let expires_at = expires_at.unwrap();
        let (low, high) = (Utc::now() + chrono::Duration::hours(23), Utc::now() + chrono::Duration::hours(25));
        assert!(expires_at > low && expires_at < high, "expires_in {shape}: stored expiry {expires_at}");
        assert!(expires_at.year() <= 9999);
    }
    let stats = amo.token_stats();
    assert_eq!((stats.refreshed, stats.refresh_rejected), (shapes.len(), 0), "{stats:?}");
}

// ---------------------------------------------------------------------------
// 9. A server-wide idle-in-transaction timeout

#[tokio::test]
async fn a_server_wide_idle_in_transaction_timeout_cannot_end_a_refresh_while_it_waits_for_the_crm() {
    let AmoSetup { world, tenant, client } = amo_connected().await;
    let amo = world.amo();
    let name: String = client.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    client
        .batch_execute(&format!("ALTER DATABASE \"{name}\" SET idle_in_transaction_session_timeout = '1s'"))
        .await
        .unwrap();
    client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
    amo.faults().inject(TOKEN_PATH, Fault::Delay(Duration::from_secs(3)), 1);

    // Two processes, with connections opened after the setting.
    let (one, two) = (fast_context(), fast_context());
    let first_tenant = tenant.clone();
    let first = tokio::spawn(async move { resync_stages(&one, &first_tenant).await.unwrap() });
    eventually("the refresh holds the row lock", Duration::from_secs(10), || row_lock_held_while_idle(&client)).await;
    // Past the server's timeout, while the CRM has not answered yet.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = resync_stages(&two, &tenant).await.unwrap();
    let first = first.await.unwrap();
    succeeded(&first);
    succeeded(&second);
    let stats = amo.token_stats();
    assert_eq!((stats.refreshed, stats.refresh_rejected), (1, 0), "the lock was lost mid-refresh: {stats:?}");
    let access = TokensRow::read(&client).await.access;
    assert!(amo.is_access_token_valid(&access.unwrap()));
}

// ---------------------------------------------------------------------------
// 8. The lease under a partition

#[tokio::test]
async fn a_holder_cut_off_from_its_database_stops_at_its_local_expiry_and_the_standby_takes_over() {
    let lease = Duration::from_secs(3);
    let db = fresh_database().await;
    let proxy = Proxy::in_front_of(&db.url).await;
    // The holder reaches the database through the proxy, the standby
    // directly; each has a portal of its own so their requests can be told apart.
    let (portal_a, portal_b) = (
        B24Sandbox::start(B24SandboxConfig::default()).await.unwrap(),
        B24Sandbox::start(B24SandboxConfig::default()).await.unwrap(),
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    TenantFile::new().database_url(&proxy.url_for(&db.url)).bitrix24(&portal_a).write(dir_a.path(), "acme").unwrap();
    TenantFile::new().database_url(&db.url).bitrix24(&portal_b).write(dir_b.path(), "acme").unwrap();
    let flags = ["--lease", "3s"];
    let holder = Running::start_with(&flags, dir_a.path()).await;
    let standby = Running::start_with(&flags, dir_b.path()).await;
    assert!(!portal_a.requests().is_empty() && portal_b.requests().is_empty(), "the first daemon holds the lease");

    // The holder is busy with its CRM: every call fails and is retried.
    portal_a.faults().inject("/rest/", Fault::server_error(), 10_000);
    let edited = TenantFile::new().database_url(&proxy.url_for(&db.url)).bitrix24(&portal_a);
    edited.schedule("token_refresh_margin", "2m").write(dir_a.path(), "acme").unwrap();
    assert!(
        portal_a
            .wait_for_requests(|r| r.iter().filter(|r| r.status == 503).count() >= 2, Duration::from_secs(10))
            .await
    );

    let cut = Instant::now();
    proxy.black_hole();
    let client = connect(&db.url).await;
    let standby_holds = || async {
        let holder: Option<String> =
            client.query_one("SELECT holder FROM crm_connect_lease", &[]).await.unwrap().get(0);
        holder.is_some() && !portal_b.requests().is_empty()
    };
    eventually("the standby took over and works", lease * 2 + Duration::from_secs(2), standby_holds).await;
    assert!(cut.elapsed() <= lease * 2 + Duration::from_secs(1), "took {:?}", cut.elapsed());
    // The cut-off holder's own view ended at most 0.9 × lease after its last
    // renewal was sent, which was before the cut (and a second more for a
    // loaded machine to act on it).
    let local_expiry = cut + lease.mul_f64(0.9) + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late: Vec<_> = portal_a.requests().into_iter().filter(|r| r.at > local_expiry).collect();
    assert!(late.is_empty(), "the cut-off holder kept calling the CRM: {} requests after its lease ended", late.len());
    assert_eq!(standby.stop().await, ExitCode::SUCCESS);
    assert_eq!(holder.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_removed_tenant_file_releases_its_lease_at_once() {
    let db = fresh_database().await;
    let portal = B24Sandbox::start(B24SandboxConfig::default()).await.unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    TenantFile::new().database_url(&db.url).bitrix24(&portal).write(dir_a.path(), "acme").unwrap();
    TenantFile::new().database_url(&db.url).bitrix24(&portal).write(dir_b.path(), "acme").unwrap();
    // A long lease: a standby waiting for it to lapse would wait a minute.
    let flags = ["--lease", "60s"];
    let a = Running::start_with(&flags, dir_a.path()).await;
    let b = Running::start_with(&flags, dir_b.path()).await;
    let client = connect(&db.url).await;
    let first: Option<String> = client.query_one("SELECT holder FROM crm_connect_lease", &[]).await.unwrap().get(0);
    let first = first.expect("a holder");

    std::fs::remove_file(dir_a.path().join("acme.toml")).unwrap();
    eventually("the lease is released", Duration::from_secs(5), || async {
        let now: Option<String> = client.query_one("SELECT holder FROM crm_connect_lease", &[]).await.unwrap().get(0);
        now.as_deref() != Some(first.as_str())
    })
    .await;
    assert_eq!(a.stop().await, ExitCode::SUCCESS);
    assert_eq!(b.stop().await, ExitCode::SUCCESS);
}

// ---------------------------------------------------------------------------
// 10. Out-of-band authorisation re-arms the token timer

#[tokio::test]
async fn a_browser_authorisation_through_the_daemon_arms_its_token_timer_at_once() {
    let amo = AmoSandbox::start(AmoSandboxConfig { expires_in: Duration::from_secs(6), ..AmoSandboxConfig::default() })
        .await
        .unwrap();
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    with_margin(TenantFile::new().database_url(&db.url).amocrm(&amo), "3s").write(dir.path(), "acme").unwrap();
    let listen = free_address();
    let daemon = Running::start_with(&["--listen", &listen], dir.path()).await;
    let client = connect(&db.url).await;
    assert_eq!(amo_state(&client).await, CrmState::NeedsAuthorization.as_str());

    let run = crm_connect(&["auth-url", "--config", dir.path().to_str().unwrap(), "--tenant", "acme"], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let url = url::Url::parse(run.stdout.lines().next().unwrap()).unwrap();
    let state_param = url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("code", &amo.issue_code())
        .append_pair("state", &state_param)
        .append_pair("referer", amo.base_url().trim_start_matches("http://"))
        .finish();
    let page = reqwest::get(format!("http://{listen}/oauth/amocrm/callback?{query}")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    // Issued for 6 s with a 3 s margin: refreshed about 3 s later, by the
    // token timer (the stage resync is once a year).
    assert!(
        amo.wait_for_requests(|r| refreshes(r) >= 1, Duration::from_secs(10)).await,
        "no refresh after the authorisation: {:?}",
        amo.requests()
    );
    assert_eq!(amo.token_stats().refresh_rejected, 0);
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}
