//! Many tenants on one stock PostgreSQL: every tenant database on a server
//! shares that server's connection budget (`--db-connections`, default 10),
//! and a tenant's connections close when its work is done.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crm_connect::sandbox::postgres::Cluster;
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
fn plain_tenant(slug: &str, url: &str) -> String {
    format!("[tenant]\nslug = \"{slug}\"\ndatabase_url = \"{url}\"\n")
}

#[tokio::test]
async fn two_hundred_tenants_on_a_server_with_100_connections_share_its_budget_and_none_is_refused() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_with_max_connections(100)).await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = connect(&cluster.admin_url()).await;
    for i in 0..200 {
        let name = format!("tenant_{i:03}");
        admin.batch_execute(&format!("CREATE DATABASE {name} STRATEGY FILE_COPY")).await.unwrap();
        write(dir.path(), &format!("{name}.toml"), &plain_tenant(&name, &cluster.database_url(&name)));
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
        write(dir.path(), &format!("t{i}.toml"), &plain_tenant(&format!("t{i}"), &db.url));
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
