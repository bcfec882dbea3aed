//! The daemon's HTTP side in-process: `/healthz`, `/metrics` as OpenMetrics
//! text, and the AmoCRM OAuth callback completing `auth-url` authorisations
//! against the sandbox, refusing forged, reused, expired and foreign ones
//! without a request to the CRM.

use std::collections::BTreeSet;
use std::time::Duration;

use crm_connect::config::TenantConfig;
use crm_connect::context::Context;
use crm_connect::crm::amocrm::AmoClient;
use crm_connect::model::Crm;
use crm_connect::secret::Secret;
use crm_connect::tokens::sha256_hex;
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig, TokenStats};
use crm_connect_sandbox::tenant_file::TenantFile;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support::postgres::{TestDatabase, fresh_database};
use crate::support::{connect, crm_connect, fast_context, tenant, write};

/// A server on a free loopback port; dropping `stop` (or sending) shuts it down.
struct Running {
    base: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(ctx: Context, tenants: Vec<TenantConfig>, loop_age: Duration) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let lookup = move |slug: &str| tenants.iter().find(|t| t.slug == slug).cloned();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(crm_connect::server::serve(listener, ctx, lookup, move || loop_age, shutdown));
    Running { base, stop, task }
}

impl Running {
    async fn get(&self, path_and_query: &str) -> (u16, String, String) {
        let response = reqwest::get(format!("{}{path_and_query}", self.base)).await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, content_type, response.text().await.unwrap())
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        let served = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        served.expect("the server stops on the signal").unwrap().unwrap();
    }
}

/// A sandbox, a tenant `acme` on a fresh database whose file lies in a
/// directory for the command line, and the tenant as parsed.
struct Setup {
    amo: AmoSandbox,
    db: TestDatabase,
    dir: tempfile::TempDir,
    tenant: TenantConfig,
}

async fn setup() -> Setup {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let text = TenantFile::new().database_url(&db.url).amocrm(&amo);
    write(dir.path(), "acme.toml", &text);
    let tenant = tenant("acme", &text);
    Setup { amo, db, dir, tenant }
}

impl Setup {
    /// Runs `crm-connect auth-url` and returns its URL.
    async fn auth_url(&self) -> url::Url {
        let config = self.dir.path().to_str().unwrap();
        let run = crm_connect(&["auth-url", "--config", config, "--tenant", "acme"], &[]).await;
        assert_eq!(run.code, 0, "{run:?}");
        let first = run.stdout.lines().next().unwrap_or_default();
        url::Url::parse(first).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
    }

    async fn state(&self) -> String {
        param(&self.auth_url().await, "state").expect("the URL carries a state")
    }

    /// `127.0.0.1:PORT`: what AmoCRM would send as `referer` for this account.
    fn referer(&self) -> String {
        self.amo.base_url().trim_start_matches("http://").to_string()
    }

    async fn stored_access_token(&self) -> Option<String> {
        connect(&self.db.url).await.query_one("SELECT amocrm_access_token FROM config", &[]).await.unwrap().get(0)
    }
}

fn param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn callback(code: &str, state: &str, referer: &str) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("code", code)
        .append_pair("state", state)
        .append_pair("referer", referer)
        .append_pair("platform", "1")
        .finish();
    format!("/oauth/amocrm/callback?{query}")
}

#[tokio::test]
async fn healthz_follows_the_main_loop_and_the_server_stops_on_its_signal() {
    let alive = start(fast_context(), Vec::new(), Duration::from_secs(1)).await;
    let (status, _, body) = alive.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    alive.stop().await;

    let stalled = start(fast_context(), Vec::new(), Duration::MAX).await;
    assert_eq!(stalled.get("/healthz").await.0, 503);
    assert_eq!(stalled.get("/nothing-here").await.0, 404);
    stalled.stop().await;
}

#[tokio::test]
async fn metrics_are_openmetrics_text_and_count_crm_requests() {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let ctx = fast_context();
    let server = start(ctx.clone(), Vec::new(), Duration::ZERO).await;

    let (status, content_type, text) = server.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert_well_formed(&text);
    for kind in [
        "# TYPE crm_connect_tenants gauge",
        "# TYPE crm_connect_token_refreshes counter",
        "# TYPE crm_connect_stage_syncs counter",
        "# TYPE crm_connect_reconcile_duration_seconds histogram",
    ] {
        assert!(text.lines().any(|l| l == kind), "missing {kind:?}:\n{text}");
    }
    // A family appears with its first series.
    assert!(!text.contains("crm_connect_crm_requests"), "{text}");

    // A real request through the context's HTTP layer: the API refuses a
    // made-up token with 401.
    let acme = tenant("acme", &TenantFile::new().database_url("postgresql://unused@localhost/unused").amocrm(&amo));
    let api = AmoClient::new(&ctx.http, &acme.amocrm.as_ref().unwrap().account).with_retry(ctx.retry);
    assert!(api.account(&Secret::new("not-a-token")).await.is_err());
    ctx.metrics.stage_sync(Crm::AmoCrm, true);

    let (_, _, text) = server.get("/metrics").await;
    assert_well_formed(&text);
    assert!(text.lines().any(|l| l == "# TYPE crm_connect_crm_requests counter"), "{text}");
    assert!(text.lines().any(|l| l == "crm_connect_crm_requests_total{crm=\"amocrm\",status=\"401\"} 1"), "{text}");
    assert!(text.lines().any(|l| l == "crm_connect_stage_syncs_total{crm=\"amocrm\",result=\"ok\"} 1"), "{text}");
    server.stop().await;
}

/// Every sample belongs to a family declared by `# TYPE`, has a number for
/// a value, and the exposition ends with `# EOF`.
fn assert_well_formed(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    let families: BTreeSet<&str> =
        lines.iter().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    for line in lines.iter().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok(), "not a number: {line}");
        let name = series.split('{').next().unwrap_or_default();
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| families.contains(f)))
            .unwrap_or(name);
        assert!(families.contains(family), "no # TYPE for {line}");
    }
}

#[tokio::test]
async fn auth_url_prints_the_sandbox_url_with_a_state_stored_only_as_its_hash() {
    let s = setup().await;
    let config = s.dir.path().to_str().unwrap();
    let run = crm_connect(&["auth-url", "--config", config, "--tenant", "acme"], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let url = url::Url::parse(run.stdout.lines().next().unwrap()).unwrap();
    assert!(url.as_str().starts_with(&format!("{}/oauth?", s.amo.base_url())), "{url}");
    assert_eq!(param(&url, "client_id").as_deref(), Some(s.amo.config().client_id.as_str()));
    assert_eq!(param(&url, "mode").as_deref(), Some("post_message"));
    let state = param(&url, "state").unwrap();
    assert!(state.starts_with("acme.") && state.len() > 40, "{state}");
    assert!(run.stdout.contains("/oauth/amocrm/callback") && run.stdout.contains("--listen"), "{}", run.stdout);
    assert!(run.stdout.contains(&s.amo.config().redirect_uri), "{}", run.stdout);
    assert!(!run.output().contains(&s.amo.config().client_secret));

    let client = connect(&s.db.url).await;
    let rows = client.query("SELECT state_sha256, expires_at - created_at FROM crm_connect_oauth_states", &[]).await;
    let rows = rows.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), sha256_hex(&Secret::new(state.clone())));
    let dump: String =
        client.query_one("SELECT string_agg(t::text, ' ') FROM crm_connect_oauth_states t", &[]).await.unwrap().get(0);
    assert!(!dump.contains(&state), "the state itself is stored");

    let second = s.state().await;
    assert_ne!(second, state, "every run issues a new state");
}

#[tokio::test]
async fn auth_url_uses_the_vendor_host_of_the_domain() {
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[tenant]\ndatabase_url = \"{}\"\n\n[amocrm]\nsubdomain = \"acme\"\ndomain = \"kommo.com\"\n\
         client_id = \"id with space&more\"\nclient_secret = \"s\"\nredirect_uri = \"https://example.com/cb\"\n",
        db.url
    );
    write(dir.path(), "acme.toml", &text);
    let config = dir.path().to_str().unwrap();
    let run = crm_connect(&["auth-url", "--config", config, "--tenant", "acme"], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let url = url::Url::parse(run.stdout.lines().next().unwrap()).unwrap();
    assert!(
        url.as_str().starts_with("https://www.kommo.com/oauth?client_id=id+with+space%26more&state=acme."),
        "{url}"
    );
    assert_eq!(param(&url, "client_id").as_deref(), Some("id with space&more"));
    assert_eq!(param(&url, "mode").as_deref(), Some("post_message"));
}

#[tokio::test]
async fn a_forged_or_unknown_state_is_refused_without_a_token_request() {
    let s = setup().await;
    let _issued = s.state().await;
    let server = start(fast_context(), vec![s.tenant.clone()], Duration::ZERO).await;
    let forged = format!("acme.{}", "A".repeat(43));
    for state in [forged.as_str(), "nobody.AAAA", "acme", ""] {
        let (status, content_type, page) = server.get(&callback(&s.amo.issue_code(), state, &s.referer())).await;
        assert_eq!(status, 400, "{state}: {page}");
        assert_eq!(content_type, "text/html; charset=utf-8");
        assert!(page.contains("Unknown or expired"), "{page}");
    }
    assert_eq!(server.get("/oauth/amocrm/callback").await.0, 400);
    assert_eq!(s.amo.token_stats(), TokenStats::default());
    assert_eq!(s.stored_access_token().await, None);
    server.stop().await;
}

#[tokio::test]
async fn a_foreign_referer_is_refused_and_spends_the_state() {
    let s = setup().await;
    let state = s.state().await;
    let server = start(fast_context(), vec![s.tenant.clone()], Duration::ZERO).await;

    let (status, _, page) = server.get(&callback(&s.amo.issue_code(), &state, "evil.amocrm.ru")).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Wrong account"), "{page}");
    assert_eq!(s.amo.token_stats(), TokenStats::default());

    // A state that came with a foreign referer may have leaked: it is gone.
    let (status, _, page) = server.get(&callback(&s.amo.issue_code(), &state, &s.referer())).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Unknown or expired"), "{page}");
    assert_eq!(s.amo.token_stats(), TokenStats::default());
    assert_eq!(s.stored_access_token().await, None);
    server.stop().await;
}

#[tokio::test]
async fn a_live_state_and_the_account_referer_connect_once_and_the_state_never_again() {
    let s = setup().await;
    let state = s.state().await;
    let server = start(fast_context(), vec![s.tenant.clone()], Duration::ZERO).await;

    let code = s.amo.issue_code();
    let (status, content_type, page) = server.get(&callback(&code, &state, &s.referer())).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(page.contains("Connected") && page.contains("acme"), "{page}");
    assert!(!page.contains(&code) && !page.contains(&state), "{page}");
    assert_eq!(s.amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    let access = s.stored_access_token().await.expect("tokens are stored");
    assert!(s.amo.is_access_token_valid(&access));
    let client = connect(&s.db.url).await;
    let state_row: String =
        client.query_one("SELECT state FROM crm_connect_status WHERE crm = 'amocrm'", &[]).await.unwrap().get(0);
    assert_eq!(state_row, "connected");

    let (status, _, page) = server.get(&callback(&s.amo.issue_code(), &state, &s.referer())).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Unknown or expired"), "{page}");
    assert_eq!(s.amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    assert_eq!(s.stored_access_token().await, Some(access));
    server.stop().await;
}

#[tokio::test]
async fn an_expired_state_a_denied_access_and_a_rejected_code_touch_nothing_more() {
    let s = setup().await;
    let server = start(fast_context(), vec![s.tenant.clone()], Duration::ZERO).await;
    let client = connect(&s.db.url).await;

    let expired = s.state().await;
    client
        .execute(
            "UPDATE crm_connect_oauth_states SET expires_at = now() - interval '1 second' WHERE state_sha256 = $1",
            &[&sha256_hex(&Secret::new(expired.clone()))],
        )
        .await
        .unwrap();
    let (status, _, page) = server.get(&callback(&s.amo.issue_code(), &expired, &s.referer())).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("Unknown or expired"), "{page}");

    let denied = s.state().await;
    let query = format!("/oauth/amocrm/callback?error=access_denied&state={denied}");
    let (status, _, page) = server.get(&query).await;
    assert_eq!(status, 403, "{page}");
    assert!(page.contains("Access denied"), "{page}");
    assert_eq!(server.get(&callback(&s.amo.issue_code(), &denied, &s.referer())).await.0, 400, "spent");
    assert_eq!(s.amo.token_stats(), TokenStats::default());

    let rejected = s.state().await;
    let (status, _, page) = server.get(&callback("never-issued", &rejected, &s.referer())).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("AmoCRM rejected the code"), "{page}");
    assert!(!page.contains("never-issued"), "{page}");
    assert_eq!(s.amo.token_stats(), TokenStats { exchange_rejected: 1, ..TokenStats::default() });
    assert_eq!(s.stored_access_token().await, None);
    server.stop().await;
}
