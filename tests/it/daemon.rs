//! The daemon: timed token refreshes, file watching (rewrites, invalid
//! files, new and removed files, `..data` swaps, a recreated directory),
//! and a clean shutdown.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crm_connect_sandbox::amocrm::AmoSandboxConfig;
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::files::replace_file;
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};
use tokio_postgres::Client;

use crate::faults::refreshes;
use crate::support::daemon::{Running, eventually};
use crate::support::rows::{StatusRow, TokensRow, xmins};
use crate::support::world::World;
use crate::support::{connect, postgres::fresh_database, write};

async fn qualified(client: &Client) -> Vec<String> {
    client
        .query("SELECT status_id FROM bitrix24_pipeline_stages WHERE is_qualified_stage ORDER BY status_id", &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
}

fn b24_file(db_url: &str, portal: &B24Sandbox, qualified: &str) -> TenantFile {
    TenantFile::new().database_url(db_url).bitrix24(portal).bitrix24_stages("qualified", [Stage::status(qualified)])
}

/// Replaces a file the way editors and `git checkout` do: write aside, rename over.
fn rewrite(dir: &Path, name: &str, text: impl std::fmt::Display) {
    replace_file(&dir.join(name), &text.to_string()).unwrap();
}

/// An AmoCRM tenant whose 20 s tokens are refreshed 15 s before expiry.
async fn refreshed_every_5_seconds() -> World {
    let world =
        World::amocrm_with(AmoSandboxConfig { expires_in: Duration::from_secs(20), ..AmoSandboxConfig::default() })
            .await;
    world.write(&world.file_with_code().schedule("token_refresh_margin", "15s"));
    world
}

#[tokio::test]
async fn tokens_are_refreshed_a_margin_before_expiry_again_and_again() {
    let world = refreshed_every_5_seconds().await;
    let (amo, dir) = (world.amo(), world.dir());
    let daemon = Running::start(dir).await;

    assert!(amo.wait_for_requests(|r| refreshes(r) >= 2, Duration::from_secs(30)).await, "refreshes keep coming");
    let log = amo.requests();
    let exchange =
        log.iter().find(|r| r.form_or_json_field("grant_type").as_deref() == Some("authorization_code")).unwrap();
    let first = log.iter().find(|r| r.form_or_json_field("grant_type").as_deref() == Some("refresh_token")).unwrap();
    let after = first.at - exchange.at;
    assert!(
        (Duration::from_secs(3)..=Duration::from_secs(8)).contains(&after),
        "first refresh {after:?} after the exchange"
    );
    assert_eq!(amo.token_stats().refresh_rejected, 0);
    let stored = TokensRow::read(&world.client().await).await.access;
    assert!(amo.is_access_token_valid(&stored.unwrap()));
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn two_daemons_on_one_tenant_neither_double_nor_break_refreshes() {
    let world = refreshed_every_5_seconds().await;
    let (amo, dir) = (world.amo(), world.dir());
    let (a, b) = tokio::join!(Running::start(dir), Running::start(dir));
    let started = Instant::now();
    assert!(amo.wait_for_requests(|r| refreshes(r) >= 3, Duration::from_secs(40)).await);
    let elapsed = started.elapsed();
    let stats = amo.token_stats();
    assert_eq!(stats.refresh_rejected, 0, "a refresh token was used twice");
    assert_eq!(stats.exchanged, 1, "the code was sent once");
    // One daemon refreshes about every 5 s; two must not double that.
    let most = elapsed.as_secs() / 5 + 2;
    assert!(stats.refreshed as u64 <= most, "{} refreshes in {elapsed:?}", stats.refreshed);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn file_changes_apply_to_their_tenant_only_and_invalid_files_change_nothing() {
    let portal = B24Sandbox::start(B24SandboxConfig::default()).await.unwrap();
    let (db_a, db_b) = (fresh_database().await, fresh_database().await);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "alpha.toml", b24_file(&db_a.url, &portal, "C1:PREPARATION"));
    write(dir.path(), "beta.toml", b24_file(&db_b.url, &portal, "C1:NEW"));
    let daemon = Running::start(dir.path()).await;
    let (a, b) = (connect(&db_a.url).await, connect(&db_b.url).await);
    assert_eq!(qualified(&a).await, ["C1:PREPARATION"]);

    // An atomic rewrite moves a flag.
    rewrite(dir.path(), "alpha.toml", b24_file(&db_a.url, &portal, "C1:EXECUTING"));
    eventually("the flag moved", Duration::from_secs(10), || async { qualified(&a).await == ["C1:EXECUTING"] }).await;
    let beta_requests = portal.requests().len();

    // Invalid TOML: the last good configuration stays, nothing is written.
    let a_xmin = xmins(&a, "bitrix24_pipeline_stages").await;
    rewrite(dir.path(), "alpha.toml", "[bitrix24\nwebhook_url = ");
    // A later valid edit of another tenant proves the daemon went on.
    rewrite(dir.path(), "beta.toml", b24_file(&db_b.url, &portal, "C1:WON"));
    eventually("beta's flag moved", Duration::from_secs(10), || async { qualified(&b).await == ["C1:WON"] }).await;
    let a_xmin_after = xmins(&a, "bitrix24_pipeline_stages").await;
    assert_eq!(a_xmin, a_xmin_after, "an invalid file changed its tenant's database");
    assert_eq!(qualified(&a).await, ["C1:EXECUTING"]);
    assert!(portal.requests().len() > beta_requests);

    // A new file: migrated and connected.
    let db_c = fresh_database().await;
    rewrite(dir.path(), "gamma.toml", b24_file(&db_c.url, &portal, "C1:NEW"));
    let c = connect(&db_c.url).await;
    eventually("the new tenant connected", Duration::from_secs(10), || async {
        StatusRow::read(&c, "bitrix24").await.is_some_and(|s| s.state == "connected")
    })
    .await;

    // A removed file: unmanaged, nothing deleted.
    let rows_before: i64 = b.query_one("SELECT count(*) FROM bitrix24_pipeline_stages", &[]).await.unwrap().get(0);
    std::fs::remove_file(dir.path().join("beta.toml")).unwrap();
    eventually("beta unmanaged", Duration::from_secs(10), || async {
        StatusRow::read(&b, "bitrix24").await.is_some_and(|s| s.state == "unmanaged")
    })
    .await;
    let rows_after: i64 = b.query_one("SELECT count(*) FROM bitrix24_pipeline_stages", &[]).await.unwrap().get(0);
    assert_eq!(rows_before, rows_after);
    let config: i64 =
        b.query_one("SELECT count(*) FROM config WHERE bitrix24_access_token IS NOT NULL", &[]).await.unwrap().get(0);
    assert_eq!(config, 1, "the stored webhook stays");
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_kubernetes_data_symlink_swap_and_a_recreated_directory_are_picked_up() {
    let portal = B24Sandbox::start(B24SandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tenants");
    std::fs::create_dir(&dir).unwrap();
    // The layout of a mounted ConfigMap: files are links into `..data`,
    // which links to a timestamped directory; an update swaps `..data`.
    let first = dir.join("..2026_11_26_1");
    std::fs::create_dir(&first).unwrap();
    write(&first, "acme.toml", b24_file(&db.url, &portal, "C1:PREPARATION"));
    std::os::unix::fs::symlink("..2026_11_26_1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/acme.toml", dir.join("acme.toml")).unwrap();
    let daemon = Running::start(&dir).await;
    let client = connect(&db.url).await;
    assert_eq!(qualified(&client).await, ["C1:PREPARATION"]);

    let second = dir.join("..2026_11_26_2");
    std::fs::create_dir(&second).unwrap();
    write(&second, "acme.toml", b24_file(&db.url, &portal, "C1:EXECUTING"));
    std::os::unix::fs::symlink("..2026_11_26_2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    eventually("the swap applied", Duration::from_secs(10), || async { qualified(&client).await == ["C1:EXECUTING"] })
        .await;

    // The whole directory deleted and recreated (a fresh checkout).
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "acme.toml", b24_file(&db.url, &portal, "C1:WON"));
    eventually("the recreated directory is watched", Duration::from_secs(10), || async {
        qualified(&client).await == ["C1:WON"]
    })
    .await;
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn the_binary_serves_health_and_metrics_and_stops_on_sigterm_with_exit_0_within_10_seconds() {
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    TenantFile::new().database_url(&db.url).write(dir.path(), "acme").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-connect"))
        .args(["run", "--config", dir.path().to_str().unwrap(), "--listen", &listen])
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        // A failing assertion must not leave a daemon behind.
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait for the first pass, as systemd waits for READY.
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("first reconcile pass done") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true));
    let http = reqwest::Client::new();
    let health = http.get(format!("http://{listen}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = http.get(format!("http://{listen}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("crm_connect_tenants{state=\"connected\"} 1"), "{metrics}");
    assert!(metrics.contains("crm_connect_reconcile_duration_seconds_count 1"), "{metrics}");
    assert!(metrics.contains("crm_connect_jobs_total{work=\"reconcile\"} 1"), "{metrics}");
    assert!(metrics.contains("crm_connect_db_busy_retries_total 0"), "{metrics}");
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits within 10 s").unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn with_a_lease_one_daemon_runs_a_tenant_and_a_standby_takes_over_when_it_stops() {
    let portal = B24Sandbox::start(B24SandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", b24_file(&db.url, &portal, "C1:NEW"));
    let a = Running::start_with(&["--lease", "3s"], dir.path()).await;
    let b = Running::start_with(&["--lease", "3s"], dir.path()).await;
    let client = connect(&db.url).await;
    let held: Option<String> = client.query_one("SELECT holder FROM crm_connect_lease", &[]).await.unwrap().get(0);
    let first_holder = held.expect("one daemon holds the lease");
    assert_eq!(portal.requests().len(), 2, "only the holder talked to the CRM");

    assert_eq!(a.stop().await, ExitCode::SUCCESS);
    eventually("the standby took over", Duration::from_secs(10), || async {
        let now: Option<String> = client.query_one("SELECT holder FROM crm_connect_lease", &[]).await.unwrap().get(0);
        now.is_some_and(|h| h != first_holder)
    })
    .await;
    eventually("the new holder reconciled", Duration::from_secs(10), || async { portal.requests().len() == 4 }).await;
    assert_eq!(b.stop().await, ExitCode::SUCCESS);
}
