//! Many tenants on one stock PostgreSQL: every tenant database on a server
//! shares that server's connection budget (`--db-connections`, default 10),
//! and a tenant's connections close when its work is done.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::postgres::Cluster;
use crm_connect_sandbox::tenant_file::TenantFile;
use tokio_postgres::Client;

use crate::support::daemon::{Running, eventually};
use crate::support::{connect, crm_connect, postgres, write};

/// Connections the daemon or command has open to the server.
async fn ours(admin: &Client) -> i64 {
    admin
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'crm-connect'", &[])
        .await
        .unwrap()
        .get(0)
}

/// A tenant with a database and nothing else: migrations and config only.
fn plain_tenant(slug: &str, url: &str) -> TenantFile {
    TenantFile::new().slug(slug).database_url(url)
}

#[tokio::test]
async fn two_hundred_tenants_on_a_server_with_100_connections_share_its_budget_and_none_is_refused() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_with_max_connections(100)).await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = connect(&cluster.admin_url()).await;
    for i in 0..200 {
        let name = format!("tenant_{i:03}");
        admin.batch_execute(&format!("CREATE DATABASE {name} STRATEGY FILE_COPY")).await.unwrap();
        write(dir.path(), &format!("{name}.toml"), plain_tenant(&name, &cluster.database_url(&name)));
    }

    // Sampled while `sync` runs: the server's view of our connections.
    let most = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (most, url) = (most.clone(), cluster.admin_url());
        tokio::spawn(async move {
            let admin = connect(&url).await;
            loop {
                most.fetch_max(ours(&admin).await, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let run = crm_connect(&["sync", "--config", dir.path().to_str().unwrap()], &[]).await;
    sampler.abort();
    assert_eq!(run.code, 0, "{}", run.output().lines().filter(|l| !l.contains(": ok")).collect::<Vec<_>>().join("\n"));
    assert!(!run.output().contains("too many clients"), "{}", run.output());
    assert_eq!(run.stdout.lines().filter(|l| l.contains(": ok")).count(), 200);
    let most = most.load(Ordering::SeqCst);
    assert!((1..=10).contains(&most), "{most} connections open at once, budget 10");
    let migrated: i64 = connect(&cluster.database_url("tenant_199"))
        .await
        .query_one("SELECT count(*) FROM config", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(migrated, 1);
}

#[tokio::test]
async fn a_daemon_closes_each_tenants_connections_once_its_work_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for i in 0..12 {
        let db = postgres::fresh_database().await;
        write(dir.path(), &format!("t{i}.toml"), plain_tenant(&format!("t{i}"), &db.url));
        names.push(db.name);
    }
    let daemon = Running::start(dir.path()).await;
    let admin = connect(&postgres::admin_url().await).await;
    let open = || async {
        let n: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = ANY($1)", &[&names])
            .await
            .unwrap()
            .get(0);
        n
    };
    // Well before any idle timeout: closed because the work ended.
    eventually("no connection is left open", Duration::from_secs(2), || async { open().await == 0 }).await;
    assert_eq!(daemon.stop().await, std::process::ExitCode::SUCCESS);
}

/// Sessions PostgreSQL has counted for each of `names`, once it has counted
/// at least `at_least` in all (a backend reports its session as it ends).
async fn sessions(names: &[String], at_least: i64) -> Vec<i64> {
    let admin = connect(&postgres::admin_url().await).await;
    let read = || async {
        admin
            .query("SELECT sessions FROM pg_stat_database WHERE datname = ANY($1) ORDER BY datname", &[&names])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<Vec<i64>>()
    };
    eventually("every session is counted", Duration::from_secs(5), || async {
        read().await.iter().sum::<i64>() >= at_least
    })
    .await;
    read().await
}

#[tokio::test]
async fn a_bitrix24_reconcile_needs_one_database_session_while_others_wait_for_the_budget() {
    // Slow enough that a waiting tenant takes the only connection while the
    // first one waits for the portal.
    let config = B24SandboxConfig { latency: Duration::from_millis(200), ..B24SandboxConfig::default() };
    let portal = B24Sandbox::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for i in 0..4 {
        let db = postgres::fresh_database().await;
        plain_tenant(&format!("b{i}"), &db.url).bitrix24(&portal).write(dir.path(), &format!("b{i}")).unwrap();
        names.push(db.name);
    }
    let run = crm_connect(&["sync", "--db-connections", "1", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 0, "{}", run.output());
    assert_eq!(run.stdout.lines().filter(|l| l.contains(": ok")).count(), 4, "{}", run.output());
    // Fetched first, then migrated, written and recorded in one session.
    assert_eq!(sessions(&names, 4).await, [1, 1, 1, 1]);
}

/// The value of an unlabelled counter in the metrics text.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_server_out_of_connections_is_waited_for_and_each_refusal_is_counted() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_with_max_connections(4)).await.unwrap().unwrap();
    let admin = connect(&cluster.admin_url()).await;
    admin.batch_execute("CREATE DATABASE busy").await.unwrap();
    // Another program takes every connection the server has left.
    let mut others = Vec::new();
    loop {
        match tokio_postgres::connect(&cluster.admin_url(), tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                others.push(client);
            }
            Err(e) => {
                assert_eq!(e.as_db_error().map(|e| e.code().code()), Some("53300"), "{e}");
                break;
            }
        }
    }
    let ctx = crate::support::fast_context();
    let tenant = crate::support::tenant("busy", &plain_tenant("busy", &cluster.database_url("busy")));
    let work = {
        let ctx = ctx.clone();
        tokio::spawn(async move { crm_connect::apply::apply_tenant(&ctx, &tenant).await.map(|_| ()) })
    };
    eventually("the server refused the tenant as busy", Duration::from_secs(10), || async {
        counter(&ctx.metrics.encode(), "crm_connect_db_busy_retries_total") >= 1
    })
    .await;
    others.pop();
    work.await.unwrap().expect("connected once a connection was free");
    drop(admin);
}
