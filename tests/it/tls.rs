//! TLS to PostgreSQL as libpq's `sslmode` has it, and socket hosts: the
//! product's pools against throwaway clusters serving certificates made
//! here (a self-signed one like Debian's snakeoil, and one signed by a CA).

use std::sync::OnceLock;

use crm_connect::config::{LoadOptions, parse_file};
use crm_connect::db::{Conn, DbError, PoolSettings, Pools};
use crm_connect::secret::Secret;
use crm_connect_sandbox::postgres::Cluster;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// A database that accepts only TLS sessions, on the self-signed server.
const TLS_ONLY_DATABASE: &str = "tls_only";

/// A cluster, with the PEM files a client may name as `sslrootcert` in its
/// directory (removed with it).
struct Server {
    cluster: Cluster,
}

impl Server {
    /// `postgresql://postgres@HOST:PORT/postgres?QUERY`.
    fn url(&self, host: &str, query: &str) -> String {
        self.url_to(host, "postgres", query)
    }

    fn url_to(&self, host: &str, database: &str, query: &str) -> String {
        let query = if query.is_empty() { String::new() } else { format!("?{query}") };
        format!("postgresql://postgres@{host}:{}/{database}{query}", self.cluster.port())
    }

    /// The path of one of the PEM files, as a URL parameter value.
    fn pem(&self, name: &str) -> String {
        let path = self.cluster.dir().join(name);
        assert!(path.is_file(), "{} was not written", path.display());
        path.display().to_string()
    }
}

fn write_pem(cluster: &Cluster, name: &str, pem: &str) {
    std::fs::write(cluster.dir().join(name), pem).expect("the test can write its files");
}

fn server_params(sans: &[&str], common_name: &str) -> CertificateParams {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("valid names");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn start(cert_pem: &str, key_pem: &str) -> Cluster {
    Cluster::start_with_tls(cert_pem, key_pem).unwrap_or_else(|e| panic!("cannot start a TLS cluster: {e}"))
}

/// A server with a self-signed certificate for localhost and 127.0.0.1, as
/// Debian's `ssl-cert` makes for a stock cluster (`snakeoil.pem`); its
/// database `tls_only` refuses sessions without TLS.
fn self_signed() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let key = KeyPair::generate().expect("a key pair");
        let cert = server_params(&["localhost", "127.0.0.1"], "localhost").self_signed(&key).expect("a certificate");
        let mut cluster = start(&cert.pem(), &key.serialize_pem());

        let hba = cluster.dir().join("data/pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).expect("pg_hba.conf is readable");
        let rules = format!("hostnossl {TLS_ONLY_DATABASE} all all reject\n{rules}");
        std::fs::write(&hba, rules).expect("pg_hba.conf is writable");
        // A restart rather than a reload: the rule is in force once it returns.
        cluster.stop();
        cluster.start_again().unwrap_or_else(|e| panic!("cannot restart the TLS cluster: {e}"));
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(async {
            cluster.create_database(TLS_ONLY_DATABASE).await.unwrap_or_else(|e| panic!("{e}"));
        });

        write_pem(&cluster, "snakeoil.pem", &cert.pem());
        Server { cluster }
    })
}

/// A server whose certificate, for `localhost` only, is signed by a CA
/// (`ca.pem`); `other-ca.pem` is a CA that signed nothing of it.
fn ca_signed() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let ca_key = KeyPair::generate().expect("a key pair");
        let params = ca_params("crm-connect test CA");
        let ca_cert = params.self_signed(&ca_key).expect("a CA certificate");
        let ca = Issuer::new(params, ca_key);
        let key = KeyPair::generate().expect("a key pair");
        let cert = server_params(&["localhost"], "crm-connect test server")
            .signed_by(&key, &ca)
            .expect("a server certificate");
        let cluster = start(&cert.pem(), &key.serialize_pem());

        let other_key = KeyPair::generate().expect("a key pair");
        let other = ca_params("crm-connect other CA").self_signed(&other_key).expect("a CA certificate");
        write_pem(&cluster, "ca.pem", &ca_cert.pem());
        write_pem(&cluster, "other-ca.pem", &other.pem());
        Server { cluster }
    })
}

/// A server without TLS (`ssl = off`, PostgreSQL's default).
fn plain() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start().unwrap_or_else(|e| panic!("cannot start a cluster: {e}")))
}

/// Connects through the product's pools; whether the session is encrypted.
async fn encrypted(url: &str) -> Result<bool, DbError> {
    let pools = Pools::new(PoolSettings::default());
    let db = pools.get("tls", &Secret::new(url))?;
    let session = db.session().await?;
    let row = session
        .pg()
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .expect("pg_stat_ssl answers");
    Ok(row.get(0))
}

async fn assert_encrypted(url: &str) {
    match encrypted(url).await {
        Ok(true) => {}
        Ok(false) => panic!("{url}: connected without TLS"),
        Err(e) => panic!("{url}: {e}"),
    }
}

async fn assert_plain(url: &str) {
    match encrypted(url).await {
        Ok(false) => {}
        Ok(true) => panic!("{url}: connected with TLS"),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// The connection is refused with a reason that contains `why`.
async fn assert_refused(url: &str, why: &str) -> String {
    match encrypted(url).await {
        Ok(tls) => panic!("{url}: connected (TLS: {tls})"),
        Err(DbError::Connect { reason, .. }) => {
            assert!(reason.contains(why), "{url}: refused, but not for {why:?}: {reason}");
            reason
        }
        Err(e) => panic!("{url}: not a connection error: {e}"),
    }
}

fn in_thread<T: Send + 'static>(start: impl FnOnce() -> T + Send + 'static) -> T {
    // Starting a cluster blocks (initdb), and the self-signed one runs a
    // runtime of its own: neither may happen on a test's runtime thread.
    std::thread::spawn(start).join().unwrap_or_else(|_| panic!("starting a cluster panicked"))
}

#[tokio::test]
async fn a_self_signed_server_is_encrypted_without_verification_by_default_and_with_prefer_and_require() {
    let server = in_thread(self_signed);
    assert_encrypted(&server.url("localhost", "")).await;
    assert_encrypted(&server.url("127.0.0.1", "sslmode=prefer")).await;
    assert_encrypted(&server.url("127.0.0.1", "sslmode=require")).await;
}

#[tokio::test]
async fn disable_and_allow_stay_plain_when_the_server_accepts_plain_sessions() {
    let server = in_thread(self_signed);
    assert_plain(&server.url("127.0.0.1", "sslmode=disable")).await;
    assert_plain(&server.url("127.0.0.1", "sslmode=allow")).await;
}

#[tokio::test]
async fn allow_retries_with_tls_when_the_server_refuses_a_plain_session() {
    let server = in_thread(self_signed);
    assert_encrypted(&server.url_to("127.0.0.1", TLS_ONLY_DATABASE, "sslmode=allow")).await;
    assert_refused(&server.url_to("127.0.0.1", TLS_ONLY_DATABASE, "sslmode=disable"), "pg_hba.conf").await;
}

#[tokio::test]
async fn verify_modes_refuse_a_self_signed_server_with_the_system_roots() {
    let server = in_thread(self_signed);
    for query in
        ["sslmode=verify-ca", "sslmode=verify-full", "sslrootcert=system", "sslmode=verify-full&sslrootcert=system"]
    {
        assert_refused(&server.url("localhost", query), "invalid peer certificate").await;
    }
}

#[tokio::test]
async fn a_self_signed_certificate_given_as_the_root_is_trusted() {
    let server = in_thread(self_signed);
    let root = server.pem("snakeoil.pem");
    assert_encrypted(&server.url("localhost", &format!("sslmode=verify-full&sslrootcert={root}"))).await;
    assert_encrypted(&server.url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={root}"))).await;
    assert_encrypted(&server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={root}"))).await;
}

#[tokio::test]
async fn verify_ca_and_verify_full_accept_a_server_signed_by_the_given_ca() {
    let server = in_thread(ca_signed);
    let ca = server.pem("ca.pem");
    assert_encrypted(&server.url("localhost", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await;
    assert_encrypted(&server.url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    let other = server.pem("other-ca.pem");
    assert_refused(&server.url("localhost", &format!("sslmode=verify-full&sslrootcert={other}")), "UnknownIssuer")
        .await;
}

#[tokio::test]
async fn verify_full_refuses_a_name_the_certificate_does_not_hold_and_verify_ca_accepts_it() {
    let server = in_thread(ca_signed);
    let ca = server.pem("ca.pem");
    // The certificate names localhost only.
    let reason = assert_refused(
        &server.url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}")),
        "not valid for name",
    )
    .await;
    assert!(reason.contains("127.0.0.1"), "{reason}");
    assert_refused(
        &server.url("wrong.example", &format!("sslmode=verify-full&sslrootcert={ca}&hostaddr=127.0.0.1")),
        "not valid for name",
    )
    .await;
    assert_encrypted(&server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await;
}

#[tokio::test]
async fn require_with_a_root_file_verifies_the_chain_like_verify_ca() {
    let server = in_thread(ca_signed);
    let ca = server.pem("ca.pem");
    let other = server.pem("other-ca.pem");
    assert_encrypted(&server.url("127.0.0.1", &format!("sslmode=require&sslrootcert={ca}"))).await;
    assert_refused(&server.url("127.0.0.1", &format!("sslmode=require&sslrootcert={other}")), "UnknownIssuer").await;
    // Without a root file, require checks nothing.
    assert_encrypted(&server.url("127.0.0.1", "sslmode=require")).await;
}

#[tokio::test]
async fn prefer_falls_back_to_plain_when_the_handshake_fails() {
    let server = in_thread(ca_signed);
    // libpq verifies the chain whenever it has a root file; a failed
    // handshake under prefer is followed by a plain attempt.
    let other = server.pem("other-ca.pem");
    assert_plain(&server.url("127.0.0.1", &format!("sslmode=prefer&sslrootcert={other}"))).await;
    assert_encrypted(&server.url("127.0.0.1", &format!("sslrootcert={}", server.pem("ca.pem")))).await;
}

#[tokio::test]
async fn a_server_without_tls_is_plain_under_prefer_and_refused_under_require_and_verify() {
    let cluster = in_thread(plain);
    let url = |query: &str| format!("postgresql://postgres@127.0.0.1:{}/postgres?{query}", cluster.port());
    assert_plain(&url("sslmode=prefer")).await;
    assert_plain(&url("application_name=default")).await;
    assert_plain(&url("sslmode=allow")).await;
    assert_refused(&url("sslmode=require"), "server does not support TLS").await;
    assert_refused(&url("sslmode=verify-full"), "server does not support TLS").await;
}

#[tokio::test]
async fn a_missing_root_file_is_an_error_that_names_the_file() {
    let server = in_thread(ca_signed);
    let missing = server.cluster.dir().join("missing.pem");
    let url = format!(
        "postgresql://postgres:hunter2@127.0.0.1:{}/postgres?sslmode=verify-ca&sslrootcert={}",
        server.cluster.port(),
        missing.display()
    );
    let pools = Pools::new(PoolSettings::default());
    let error = pools.get("tls", &Secret::new(url.as_str())).expect_err("a missing sslrootcert is refused");
    let text = error.to_string();
    assert!(matches!(error, DbError::Connect { .. }), "{text}");
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn socket_hosts_work_as_a_host_parameter_and_as_a_percent_encoded_host() {
    let cluster = in_thread(plain);
    let dir = cluster.dir().display().to_string();
    let port = cluster.port();
    let encoded = dir.replace('/', "%2F");
    for url in [
        format!("postgresql:///postgres?host={dir}&port={port}&user=postgres"),
        format!("postgresql://postgres@{encoded}:{port}/postgres"),
        // libpq ignores sslmode on a socket: the server never offers TLS there.
        format!("postgresql://postgres@{encoded}:{port}/postgres?sslmode=require"),
    ] {
        let pools = Pools::new(PoolSettings::default());
        let db = pools.get("socket", &Secret::new(url.as_str())).unwrap_or_else(|e| panic!("{url}: {e}"));
        let session = db.session().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let row = session
            .pg()
            .query_one(
                "SELECT a.client_addr IS NULL, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_activity answers");
        let (on_socket, tls): (bool, bool) = (row.get(0), row.get(1));
        assert!(on_socket && !tls, "{url}: socket {on_socket}, TLS {tls}");
    }
}

#[test]
fn tenant_files_accept_every_sslmode_and_socket_hosts_and_say_what_is_wrong() {
    let load = |url: &str| {
        let text = format!("[tenant]\nslug = \"acme\"\ndatabase_url = \"{url}\"\n");
        let report = parse_file("/tenants/acme.toml".as_ref(), &text, &LoadOptions::default());
        (report.tenant.is_some(), report.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))
    };
    for url in [
        "postgresql://crm:pw@db.example/acme?sslmode=verify-full&sslrootcert=/etc/crm-connect/db-ca.pem",
        "postgresql://crm@db.example/acme?sslmode=verify-ca",
        "postgresql://crm@db.example/acme?sslmode=allow",
        "postgresql://crm@db.example/acme?sslrootcert=system",
        "postgresql:///acme?host=/run/postgresql",
        "postgresql://%2Frun%2Fpostgresql/acme",
    ] {
        let (valid, problems) = load(url);
        assert!(valid, "{url}: {problems}");
    }
    let (valid, problems) = load("postgresql://crm:hunter2@db.example/acme?sslmode=verify_full");
    assert!(!valid && problems.contains("sslmode must be"), "{problems}");
    assert!(!problems.contains("hunter2"), "{problems}");
    let (valid, problems) = load("postgresql://crm@db.example/acme?sslmode=require&sslrootcert=system");
    assert!(!valid && problems.contains("verify-full"), "{problems}");
}
