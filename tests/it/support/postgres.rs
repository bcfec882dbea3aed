//! A PostgreSQL database of its own for every integration test.
//!
//! The server is either the one named by `CRM_CONNECT_TEST_DATABASE_URL` (an
//! admin URL; test databases are created on it) or one throwaway
//! `crm_connect_sandbox::postgres::Cluster` per test process, started on
//! first use. Test binaries never run static destructors, so the cluster is
//! never dropped: it dies with the process (parent-death signal) and its
//! directory is removed by the next cluster that starts.

use std::process;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crm_connect_sandbox::postgres::{self as pg, Cluster};

const URL_VAR: &str = "CRM_CONNECT_TEST_DATABASE_URL";

/// A database of its own for one test.
pub struct TestDatabase {
    pub url: String,
    pub name: String,
}

/// Creates a fresh, empty database; the cluster is started on first use.
pub async fn fresh_database() -> TestDatabase {
    static NEXT: AtomicU64 = AtomicU64::new(0);

    let server = server();
    let name = format!(
        "crm_connect_test_{}_{}_{:08x}",
        process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        crm_connect_sandbox::files::random() as u32
    );
    let url = pg::create_database(&server.admin_url, &name)
        .await
        .unwrap_or_else(|e| panic!("cannot create a test database on {}: {e}", server.origin));
    TestDatabase { url, name }
}

/// The URL of the server's `postgres` maintenance database (for tests that need an admin connection).
pub async fn admin_url() -> String {
    server().admin_url.clone()
}

struct Server {
    admin_url: String,
    /// Where the server comes from, for error messages (never holds a password).
    origin: String,
    /// Kept for the life of the process.
    _cluster: Option<Cluster>,
}

/// The server of this test process. Starting it is synchronous so that it does
/// not belong to the runtime of whichever test happens to come first; a failed
/// start is remembered, so every test reports it without trying again.
fn server() -> &'static Server {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    let server = SERVER.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => external_server(url.trim()),
        _ => start_cluster(),
    });
    match server {
        Ok(server) => server,
        Err(e) => panic!("no PostgreSQL server for the tests: {e}"),
    }
}

fn external_server(url: &str) -> Result<Server, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!("{URL_VAR} must be a postgres:// or postgresql:// URL"));
    }
    Ok(Server { admin_url: url.to_owned(), origin: format!("the server named by {URL_VAR}"), _cluster: None })
}

fn start_cluster() -> Result<Server, String> {
    let cluster = Cluster::start().map_err(|e| format!("{e} (or set {URL_VAR})"))?;
    Ok(Server {
        admin_url: cluster.admin_url(),
        origin: format!(
            "the test cluster at 127.0.0.1:{} (log: {})",
            cluster.port(),
            cluster.dir().join("postgres.log").display()
        ),
        _cluster: Some(cluster),
    })
}
