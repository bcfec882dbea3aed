//! Tenant pools: at most two connections while busy, none once idle; a
//! missing database created on its server (the demo on a server of the
//! user's).

use std::time::{Duration, Instant};

use crm_connect::apply::apply_tenant;
use crm_connect::config::{LoadOptions, parse_file};
use crm_connect::context::Context;
use crm_connect::db::PoolSettings;
use crm_connect::secret::Secret;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::support::{connect, postgres};

async fn server_side_connections(admin: &Client, database: &str) -> i64 {
    admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", &[&database]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_tenant_never_holds_more_than_two_connections_and_none_once_idle() {
    let db = postgres::fresh_database().await;
    let text = format!("[tenant]\nslug = \"busy\"\ndatabase_url = \"{}\"\n", db.url);
    let tenant = parse_file("busy.toml".as_ref(), &text, &LoadOptions::default()).tenant.expect("valid");
    let ctx = Context::new(PoolSettings { idle_timeout: Duration::from_millis(300), ..PoolSettings::default() });
    let pools = ctx.pools.clone();

    let mut runs = JoinSet::new();
    for _ in 0..8 {
        let (ctx, tenant) = (ctx.clone(), tenant.clone());
        runs.spawn(async move { apply_tenant(&ctx, &tenant).await });
    }
    let mut most = 0;
    while !runs.is_empty() {
        most = most.max(pools.open_connections());
        tokio::select! {
            Some(done) = runs.join_next() => done.unwrap().unwrap_or_else(|e| panic!("{e}")).changed_columns.len(),
            _ = tokio::task::yield_now() => 0,
        };
    }
    assert!((1..=2).contains(&most), "{most} connections were open at once");

    let admin = connect(&postgres::admin_url().await).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pools.open_connections() > 0 || server_side_connections(&admin, &db.name).await > 0 {
        assert!(Instant::now() < deadline, "idle connections were not closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_missing_database_is_created_once_on_the_same_server() {
    let admin = postgres::admin_url().await;
    let name = format!("crm_connect_ensure_{}", crm_connect_sandbox::files::random() as u32);
    let (server, _) = admin.rsplit_once('/').unwrap();
    let url = Secret::new(format!("{server}/{name}?sslmode=prefer"));
    assert!(crm_connect::db::ensure_database(&url).await.unwrap(), "created");
    assert!(!crm_connect::db::ensure_database(&url).await.unwrap(), "already there");
    let exists: bool = connect(&admin)
        .await
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", &[&name])
        .await
        .unwrap()
        .get(0);
    assert!(exists);
}
