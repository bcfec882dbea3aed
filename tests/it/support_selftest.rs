//! Checks of the test support itself.

use std::fs;
use std::path::Path;

use crm_connect_sandbox::postgres::Cluster;
use tokio_postgres::{Client, NoTls};

use crate::support::postgres::{admin_url, fresh_database};

async fn connect(url: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

async fn has_table(client: &Client, table: &str) -> bool {
    client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.expect("look the table up").get(0)
}

#[tokio::test]
async fn each_test_gets_an_empty_database_of_its_own() {
    let first = fresh_database().await;
    let second = fresh_database().await;
    assert_ne!(first.name, second.name);
    assert_ne!(first.url, second.url);

    let one = connect(&first.url).await;
    let two = connect(&second.url).await;
    for (client, name) in [(&one, &first.name), (&two, &second.name)] {
        let current: String =
            client.query_one("SELECT current_database()", &[]).await.expect("ask for the current database").get(0);
        assert_eq!(&current, name);
        let tables: i64 = client
            .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", &[])
            .await
            .expect("count the tables")
            .get(0);
        assert_eq!(tables, 0, "{name} is not empty");
    }

    one.batch_execute("CREATE TABLE only_in_first (id int)").await.expect("create a table");
    assert!(has_table(&one, "only_in_first").await);
    assert!(!has_table(&two, "only_in_first").await);
}

#[tokio::test]
async fn the_server_runs_as_an_unprivileged_user() {
    let admin = connect(&admin_url().await).await;
    let data_directory: String = admin
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .expect("ask for the data directory")
        .get(0);
    assert!(!data_directory.is_empty());

    if std::env::var_os("CRM_CONNECT_TEST_DATABASE_URL").is_some() {
        return; // Not our server: how it runs is not ours to check.
    }
    let pid_file = format!("{data_directory}/postmaster.pid");
    let postmaster = fs::read_to_string(&pid_file).unwrap_or_else(|e| panic!("cannot read {pid_file}: {e}"));
    let postmaster = postmaster.lines().next().unwrap_or_default().trim();
    let status = fs::read_to_string(format!("/proc/{postmaster}/status"))
        .unwrap_or_else(|e| panic!("cannot read the status of postmaster {postmaster}: {e}"));
    let uids = status.lines().find_map(|line| line.strip_prefix("Uid:")).expect("a Uid line in /proc/<pid>/status");
    assert!(uids.split_whitespace().all(|uid| uid != "0"), "the postmaster runs as root (Uid: {uids})");
}

#[tokio::test]
async fn a_dropped_cluster_stops_its_server_and_removes_its_directory() {
    if std::env::var_os("CRM_CONNECT_TEST_DATABASE_URL").is_some() {
        return; // The server binaries need not be installed then.
    }
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("the start does not panic")
        .unwrap_or_else(|e| panic!("cannot start a cluster: {e}"));
    let url = cluster.create_database("dropped").await.unwrap_or_else(|e| panic!("cannot create a database: {e}"));
    assert!(url.ends_with("/dropped"), "{url}");
    let client = connect(&url).await;
    let current: String = client.query_one("SELECT current_database()", &[]).await.expect("ask").get(0);
    assert_eq!(current, "dropped");
    drop(client);

    let dir = cluster.dir().to_owned();
    let postmaster = fs::read_to_string(dir.join("data/postmaster.pid")).expect("the server wrote its pid file");
    let postmaster = postmaster.lines().next().unwrap_or_default().trim().to_owned();
    tokio::task::spawn_blocking(move || drop(cluster)).await.expect("the drop does not panic");

    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(!Path::new(&format!("/proc/{postmaster}")).exists(), "postmaster {postmaster} still runs");
}
