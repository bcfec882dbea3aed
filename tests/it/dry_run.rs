//! `crm-connect sync --dry-run` against the sandboxes and a real PostgreSQL:
//! it reports what a sync would change and writes nothing anywhere — no
//! tables, rows or events, no code exchange, no refresh, no CRM write.

use std::time::Duration;

use crm_connect_sandbox::amocrm::{AmoSandbox, TokenStats};
use crm_connect_sandbox::bitrix24::B24Sandbox;
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};
use tokio_postgres::Client;

use crate::support::postgres::fresh_database;
use crate::support::rows::xmins;
use crate::support::world::World;
use crate::support::{Run, connect, crm_connect};

fn qualified_in_sales() -> Stage {
    Stage::in_pipeline("Продажи", "Квалифицирован")
}

/// The Bitrix24 methods that only read.
const B24_READS: &[&str] = &["batch", "scope", "profile", "crm.category.list", "crm.status.list"];

async fn dry_run(config: &str) -> Run {
    let run = crm_connect(&["sync", "--dry-run", "--config", config], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    run
}

async fn sync(config: &str) {
    let run = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
}

/// Every Bitrix24 method the portal was asked to run, batch commands included.
fn b24_methods(portal: &B24Sandbox) -> Vec<String> {
    let mut methods = Vec::new();
    for request in portal.requests() {
        let method = request.path.trim_end_matches('/').rsplit('/').next().unwrap_or_default().to_string();
        if method == "batch"
            && let Some(cmd) = request.json().and_then(|b| b.get("cmd").cloned()).and_then(|c| c.as_object().cloned())
        {
            for command in cmd.values() {
                let command = command.as_str().unwrap_or_default();
                methods.push(command.split('?').next().unwrap_or_default().to_string());
            }
        }
        methods.push(method);
    }
    methods
}

async fn events(client: &Client) -> i64 {
    client.query_one("SELECT count(*) FROM crm_connect_events", &[]).await.unwrap().get(0)
}

/// The xmin of the config row and of every stage row: they change with any write.
async fn row_versions(client: &Client) -> (Vec<String>, Vec<String>, Vec<String>) {
    (
        xmins(client, "config").await,
        xmins(client, "amocrm_pipeline_stages").await,
        xmins(client, "bitrix24_pipeline_stages").await,
    )
}

/// The block of lines a tenant's dry run printed.
fn lines(run: &Run) -> Vec<&str> {
    run.stdout.lines().collect()
}

#[tokio::test]
async fn a_dry_run_on_a_fresh_database_creates_no_table_and_sends_no_code() {
    let world = World::both().await;
    let (amo, portal, db, config) = (world.amo(), world.portal(), &world.db, world.config());
    let code = amo.issue_code();
    world.write(&world.file().authorization_code(&code));

    let run = dry_run(config).await;

    let stages: usize = B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum();
    let added = format!("acme: bitrix24: {stages} stages added, 0 renamed, 0 removed, ");
    let out = lines(&run);
    assert_eq!(out[0], "acme: would create the crm-connect tables", "{}", run.stdout);
    assert_eq!(
        out[1],
        "acme: config: would update amocrm_subdomain, amocrm_domain, amocrm_client_id, amocrm_client_secret, \
         bitrix24_domain, bitrix24_access_token, bitrix24_user_id, bitrix24_entity_type"
    );
    assert_eq!(out[2], "acme: amocrm: would exchange the authorization code");
    assert!(out[3].starts_with("acme: amocrm: stages cannot be previewed without tokens"), "{}", run.stdout);
    assert_eq!(out[4], "acme: bitrix24: would stamp bitrix24_connected_at");
    assert!(out[5].starts_with(&added), "{}", run.stdout);
    assert!(run.stdout.contains("  + \"Общее\" / "), "{}", run.stdout);

    let client = connect(&db.url).await;
    let tables: i64 = client
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_name = 'config'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "the dry run created the config table");
    let any: i64 = client
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(any, 0, "the dry run created tables");
    assert_eq!(amo.token_stats(), TokenStats::default(), "no code exchanged");
    assert!(amo.requests().is_empty(), "{:#?}", amo.requests());
    let methods = b24_methods(portal);
    assert!(!methods.is_empty());
    assert!(methods.iter().all(|m| B24_READS.contains(&m.as_str())), "a method that writes: {methods:?}");
    assert!(!run.output().contains(&code), "the code was printed");

    // The code is still good: the dry run did not use it.
    sync(config).await;
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
}

#[tokio::test]
async fn a_dry_run_after_a_sync_lists_exactly_the_changes_and_writes_no_row() {
    let world = World::both().await;
    let (amo, portal, db, config) = (world.amo(), world.portal(), &world.db, world.config());
    let with_code = world.file_with_code();
    world.write(&with_code.clone().amocrm_stages("qualified", [qualified_in_sales()]));
    sync(config).await;

    world.write(&with_code.amocrm_stages("qualified", [Stage::in_pipeline("Воронка", "Переговоры")]));
    let mut pipelines = AmoSandbox::default_pipelines();
    pipelines.remove(1);
    pipelines[0].statuses[0].name = "Первый контакт".into();
    amo.set_pipelines(pipelines);
    let client = connect(&db.url).await;
    let (versions, events_before) = (row_versions(&client).await, events(&client).await);
    let b24_requests = portal.requests().len();

    let run = dry_run(config).await;

    let b24_stages: usize = B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum();
    let sales = |id: i64, name: &str| format!("  - \"Продажи\" / \"{name}\" ({id})");
    let expected = [
        "acme: amocrm: 0 stages added, 1 renamed, 6 removed, 1 flag moved".to_string(),
        "  ~ \"Воронка\" / \"Первый контакт\" (61000001)".to_string(),
        sales(70_000_021, "Неразобранное"),
        sales(61_000_004, "Новый"),
        sales(61_000_005, "Квалифицирован"),
        sales(61_000_006, "Счёт выставлен"),
        sales(142, "Успешно реализовано"),
        sales(143, "Закрыто и не реализовано"),
        "  flags: \"Воронка\" / \"Переговоры\" (61000002): none → qualified".to_string(),
        format!("acme: bitrix24: {b24_stages} stages, unchanged"),
    ];
    assert_eq!(lines(&run), expected, "{}", run.stdout);

    assert_eq!(row_versions(&client).await, versions, "the dry run wrote a row");
    assert_eq!(events(&client).await, events_before, "the dry run recorded an event");
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    let methods = b24_methods(portal);
    assert!(methods.iter().all(|m| B24_READS.contains(&m.as_str())), "a method that writes: {methods:?}");
    assert!(portal.requests().len() > b24_requests, "the portal was read");

    // The sync does what the dry run said; then there is nothing left to do.
    sync(config).await;
    assert_ne!(row_versions(&client).await, versions);
    assert_eq!(lines(&dry_run(config).await), ["acme: nothing would change"]);
}

#[tokio::test]
async fn a_second_dry_run_after_a_sync_without_changes_says_nothing_would_change() {
    let world = World::both().await;
    let (amo, config) = (world.amo(), world.config());
    world.write(&world.file_with_code().amocrm_stages("qualified", [qualified_in_sales()]));
    let beta = TenantFile::new().database_url(&fresh_database().await.url).bitrix24(world.portal());
    world.write_as("beta", &beta);
    sync(config).await;

    let first = dry_run(config).await;
    let second = dry_run(config).await;

    let expected = ["acme: nothing would change", "beta: nothing would change"];
    assert_eq!(lines(&first), expected, "{first:?}");
    assert_eq!(lines(&second), expected, "{second:?}");
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    let only = crm_connect(&["sync", "--dry-run", "--config", config, "--tenant", "beta"], &[]).await;
    assert_eq!((only.code, only.stdout.as_str()), (0, "beta: nothing would change\n"));
}

#[tokio::test]
async fn a_dry_run_prints_no_secret() {
    let world = World::both().await;
    let (amo, portal, db, config) = (world.amo(), world.portal(), &world.db, world.config());
    let code = amo.issue_code();
    let file = world.file().authorization_code(&code);
    world.write(&file);
    let fresh = dry_run(config).await;
    sync(config).await;

    // A new client secret and webhook code: the columns are named, never their values.
    let new_secret = "rotated-client-secret-4d2a";
    let new_code = "rotatedwebhookcode7";
    let new_webhook = portal.webhook_url().replace(&portal.config().code, new_code);
    world.write(&file.amocrm_string("client_secret", new_secret).webhook_url(&new_webhook));
    let changed = dry_run(config).await;
    assert!(
        changed.stdout.contains("acme: config: would update amocrm_client_secret, bitrix24_access_token"),
        "{}",
        changed.stdout
    );
    assert!(changed.stdout.contains("acme: bitrix24: stages cannot be previewed"), "{}", changed.stdout);

    let client = connect(&db.url).await;
    let row = client.query_one("SELECT amocrm_access_token, amocrm_refresh_token FROM config", &[]).await.unwrap();
    let (access, refresh): (String, String) = (row.get(0), row.get(1));
    let secrets =
        [amo.config().client_secret.as_str(), new_secret, &portal.config().code, new_code, &access, &refresh, &code];
    for run in [&fresh, &changed] {
        for secret in secrets {
            assert!(!run.output().contains(secret), "a secret was printed:\n{}", run.output());
        }
    }
}

#[tokio::test]
async fn a_token_refused_by_the_api_or_expired_is_reported_never_refreshed() {
    let world = World::amocrm().await;
    let (amo, config) = (world.amo(), world.config());
    world.write(&world.file_with_code());
    sync(config).await;
    let client = world.client().await;
    // The CRM's clock passes the token's expiry: the API refuses it. By the
    // stored expiry (a day away) a sync would not refresh before calling,
    // so it would refresh after the 401.
    client.execute("UPDATE config SET amocrm_token_expires_at = now() + interval '1 day'", &[]).await.unwrap();
    amo.advance_clock(Duration::from_secs(2 * 86_400));
    let versions = row_versions(&client).await;

    let refused = dry_run(config).await;
    assert_eq!(
        lines(&refused),
        ["acme: amocrm: stages cannot be previewed: the API refused the access token (HTTP 401); \
          a sync would refresh it and try again"],
        "{refused:?}"
    );
    assert_eq!(row_versions(&client).await, versions);

    // Expired by the stored expiry: a sync would refresh first.
    client.execute("UPDATE config SET amocrm_token_expires_at = now() - interval '1 minute'", &[]).await.unwrap();
    let versions_expired = row_versions(&client).await;
    let expired = dry_run(config).await;
    assert_eq!(
        lines(&expired),
        [
            "acme: amocrm: would refresh the token first",
            "acme: amocrm: stages cannot be previewed without tokens (the stored access token has expired)",
        ],
        "{expired:?}"
    );
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() }, "no refresh");
    assert_ne!(versions, versions_expired, "the test itself changed the expiry");
    assert_eq!(row_versions(&client).await, versions_expired);
}
