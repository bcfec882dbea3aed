//! `crm-connect sync` for the config columns: values written, a second run
//! writes nothing, failures of one tenant do not stop the others, and no
//! secret reaches any output.

use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig};
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::tenant_file::TenantFile;

use crate::support::{connect, crm_connect, postgres::fresh_database, write};

const CLIENT_SECRET: &str = "cs-7f3a9d2e1b";
const WEBHOOK_CODE: &str = "w3bh00kc0de9x";
const DB_PASSWORD: &str = "pw-z9y8x7";

async fn sandbox() -> AmoSandbox {
    let config = AmoSandboxConfig {
        client_id: "client-1".into(),
        client_secret: CLIENT_SECRET.into(),
        subdomain: "acme".into(),
        ..AmoSandboxConfig::default()
    };
    AmoSandbox::start(config).await.unwrap()
}

async fn portal() -> B24Sandbox {
    B24Sandbox::start(B24SandboxConfig { user_id: 17, code: WEBHOOK_CODE.into(), ..B24SandboxConfig::default() })
        .await
        .unwrap()
}

/// Both CRMs, the client secret from the environment, a lead tenant.
fn both_crms(database_url: &str, amo: &AmoSandbox, code: &str, portal: &B24Sandbox) -> TenantFile {
    TenantFile::new()
        .database_url(database_url)
        .amocrm(amo)
        .amocrm_string("domain", "kommo.com")
        .amocrm_key("client_secret", "{ env = \"ACME_CLIENT_SECRET\" }")
        .authorization_code(code)
        .bitrix24(portal)
        .entity_type("lead")
}

/// The test cluster trusts loopback, so a password in the URL is accepted
/// and ignored: enough to check that it is never printed.
fn with_password(url: &str) -> String {
    url.replacen("postgresql://postgres@", &format!("postgresql://postgres:{DB_PASSWORD}@"), 1)
}

#[tokio::test]
async fn sync_writes_the_config_columns_and_a_second_sync_writes_nothing() {
    let db = fresh_database().await;
    let amo = sandbox().await;
    let portal = portal().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", both_crms(&with_password(&db.url), &amo, &amo.issue_code(), &portal));
    let config = dir.path().to_str().unwrap();
    let env = [("ACME_CLIENT_SECRET", CLIENT_SECRET)];

    let first = crm_connect(&["sync", "--config", config], &env).await;
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.stdout.contains("acme: ok, updated amocrm_subdomain"), "{}", first.stdout);

    let client = connect(&db.url).await;
    let row = client
        .query_one(
            "SELECT amocrm_subdomain, amocrm_domain, amocrm_client_id, amocrm_client_secret,
                    bitrix24_domain, bitrix24_access_token, bitrix24_user_id, bitrix24_entity_type,
                    xmin::text
             FROM config WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "acme");
    assert_eq!(row.get::<_, String>(1), "kommo.com");
    assert_eq!(row.get::<_, String>(2), "client-1");
    assert_eq!(row.get::<_, String>(3), CLIENT_SECRET);
    assert_eq!(row.get::<_, String>(4), portal.base_url().trim_start_matches("http://"));
    assert_eq!(row.get::<_, String>(5), WEBHOOK_CODE);
    assert_eq!(row.get::<_, i32>(6), 17);
    assert_eq!(row.get::<_, String>(7), "lead");
    let xmin: String = row.get(8);
    let events: Vec<(String, String)> = client
        .query("SELECT crm, kind FROM crm_connect_events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        &events[..2],
        [("amocrm".to_string(), "config_applied".to_string()), ("bitrix24".into(), "config_applied".into())]
    );

    let second = crm_connect(&["sync", "--config", config], &env).await;
    assert_eq!(second.code, 0, "{second:?}");
    assert!(second.stdout.contains("acme: ok, nothing to change"), "{}", second.stdout);
    let xmin_after: String = client.query_one("SELECT xmin::text FROM config WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(xmin, xmin_after, "the second sync updated the config row");
    let event_count: i64 = client.query_one("SELECT count(*) FROM crm_connect_events", &[]).await.unwrap().get(0);
    assert_eq!(event_count as usize, events.len(), "the second sync recorded events");
}

#[tokio::test]
async fn an_invalid_file_and_an_unreachable_database_fail_their_tenants_only() {
    let good = fresh_database().await;
    let portal = B24Sandbox::start(B24SandboxConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    TenantFile::new().database_url(&good.url).bitrix24(&portal).write(dir.path(), "good").unwrap();
    write(dir.path(), "broken.toml", "[bitrix24\n");
    // Port 1 on loopback: nothing listens there.
    write(
        dir.path(),
        "down.toml",
        "[tenant]\ndatabase_url = \"postgresql://postgres@127.0.0.1:1/x?connect_timeout=2\"\n",
    );

    let run = crm_connect(&["sync", "--config", dir.path().to_str().unwrap()], &[]).await;

    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("broken: invalid configuration, not synced"), "{}", run.stdout);
    assert!(run.stdout.contains("down: failed: cannot connect to 127.0.0.1:1/x"), "{}", run.stdout);
    assert!(run.stdout.contains("good: ok, updated bitrix24_domain"), "{}", run.stdout);
    let client = connect(&good.url).await;
    let domain: String = client.query_one("SELECT bitrix24_domain FROM config", &[]).await.unwrap().get(0);
    assert_eq!(domain, portal.base_url().trim_start_matches("http://"));
}

#[tokio::test]
async fn no_secret_appears_in_any_output_even_at_trace_level() {
    let db = fresh_database().await;
    let amo = sandbox().await;
    let code = amo.issue_code();
    let portal = portal().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", both_crms(&with_password(&db.url), &amo, &code, &portal));
    // An invalid file whose secrets are still resolved while it is checked.
    write(
        dir.path(),
        "bad.toml",
        format!(
            "[amocrm]\nsubdomain = \"bad.amocrm.ru\"\nclient_id = \"c\"\nclient_secret = \"{CLIENT_SECRET}\"\nredirect_uri = \"x\"\n[bitrix24]\nwebhook_url = \"https://b.bitrix24.ru/rest/{WEBHOOK_CODE}/\"\n"
        ),
    );
    // A tenant on the template, whose database cannot be reached.
    write(dir.path(), "tmpl.toml", "");
    let config = dir.path().to_str().unwrap();
    let template = format!("postgresql://postgres:{DB_PASSWORD}@127.0.0.1:1/openclaw_{{slug}}");
    let env = [
        ("ACME_CLIENT_SECRET", CLIENT_SECRET),
        ("RUST_LOG", "trace"),
        ("CRM_CONNECT_DATABASE_URL_TEMPLATE", template.as_str()),
    ];
    let mut runs = Vec::new();
    for args in
        [["validate", "--config", config, "--log-format", "text"], ["sync", "--config", config, "--log-format", "json"]]
    {
        runs.push(crm_connect(&args, &env).await);
    }
    runs.push(crm_connect(&["sync", "--config", config], &env).await);
    runs.push(crm_connect(&["--help"], &env).await);

    assert_eq!(runs[1].code, 1, "bad.toml is invalid: {:?}", runs[1]);
    assert!(runs[1].stdout.contains("acme: ok"), "{:?}", runs[1]);
    assert!(runs[1].stdout.contains("tmpl: failed: cannot connect to 127.0.0.1:1/openclaw_tmpl"), "{:?}", runs[1]);
    for run in &runs {
        let output = run.output();
        let access = connect(&db.url).await.query_one("SELECT amocrm_access_token FROM config", &[]).await.unwrap();
        let access: String = access.get(0);
        for secret in [CLIENT_SECRET, WEBHOOK_CODE, &code, DB_PASSWORD, &access] {
            assert!(!output.contains(secret), "{secret} leaked:\n{output}");
        }
    }
}
