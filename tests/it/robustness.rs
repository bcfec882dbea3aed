//! Inputs nobody planned for: values other programs wrote into a tenant
//! database, secret files that are FIFOs or huge, secrets that appear late,
//! tenant files renamed with their slug kept, a `--listen` address in use,
//! and read-only commands on databases never migrated.

use std::process::ExitCode;
use std::time::Duration;

use crm_connect::apply::{apply_tenant, resync_stages};
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig};
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::files::toml_string;
use crm_connect_sandbox::tenant_file::TenantFile;

use crate::faults::{AmoSetup, Binary, amo_connected, succeeded};
use crate::support::daemon::{Running, eventually};
use crate::support::postgres::fresh_database;
use crate::support::rows::StatusRow;
use crate::support::{connect, crm_connect, fast_context, tenant, write};

#[tokio::test]
async fn an_infinite_token_expiry_written_by_another_program_is_read_as_the_far_future() {
    let AmoSetup { world, tenant, client } = amo_connected().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    client.execute("UPDATE config SET amocrm_token_expires_at = 'infinity'", &[]).await.unwrap();
    let applied = resync_stages(ctx, &tenant).await.unwrap();
    succeeded(&applied);
    assert_eq!(amo.token_stats().refreshed, 0, "an expiry in the far future is not due");
    client.execute("UPDATE config SET amocrm_token_expires_at = '-infinity'", &[]).await.unwrap();
    succeeded(&resync_stages(ctx, &tenant).await.unwrap());
    assert_eq!(amo.token_stats().refreshed, 1, "an expiry in the far past is due");
    let status =
        crm_connect(&["status", "--config", tenant.file.parent().unwrap().to_str().unwrap(), "--tenant", "acme"], &[])
            .await;
    assert!(!status.output().contains("panicked"), "{status:?}");
}

#[tokio::test]
async fn a_config_column_of_another_type_is_an_error_naming_it_and_nothing_panics() {
    let portal = B24Sandbox::start(B24SandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let client = connect(&db.url).await;
    // Another program created `config` first, with a bigint user id.
    client
        .batch_execute(
            "CREATE TABLE config (id integer PRIMARY KEY, bitrix24_user_id bigint);
             INSERT INTO config (id, bitrix24_user_id) VALUES (1, 5000000000);",
        )
        .await
        .unwrap();
    let ctx = fast_context();
    let tenant = tenant("acme", &TenantFile::new().database_url(&db.url).bitrix24(&portal));
    let error = apply_tenant(&ctx, &tenant).await.expect_err("the column cannot be read").to_string();
    assert!(error.contains("config.bitrix24_user_id"), "{error}");
    // The portal was read (before the database, so that the tenant's
    // database work is one session), and nothing of it was stored.
    assert!(portal.requests().iter().all(|r| r.path.ends_with("/batch")), "{:#?}", portal.requests());
    let stored: i64 = client.query_one("SELECT count(*) FROM bitrix24_pipeline_stages", &[]).await.unwrap().get(0);
    assert_eq!(stored, 0);

    // The daemon marks the tenant failed and keeps going: its first pass ends.
    let dir = tempfile::tempdir().unwrap();
    TenantFile::new().database_url(&db.url).bitrix24(&portal).write(dir.path(), "acme").unwrap();
    let daemon = Running::start(dir.path()).await;
    assert!(daemon.is_running());
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_fifo_or_an_oversized_secret_file_is_a_validation_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("secret.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    std::fs::write(dir.path().join("secret.big"), vec![b'x'; 100 * 1024]).unwrap();
    let tenant_with = |file: &str| {
        format!(
            "[tenant]\ndatabase_url = \"postgresql://u@127.0.0.1:1/db\"\n\n[amocrm]\nsubdomain = \"acme\"\nclient_id = \"id\"\n\
             client_secret = {{ file = \"{file}\" }}\nredirect_uri = \"https://example.com/oauth\"\n"
        )
    };
    write(dir.path(), "fifo.toml", tenant_with("secret.fifo"));
    write(dir.path(), "big.toml", tenant_with("secret.big"));
    let config = dir.path().to_str().unwrap().to_string();
    let validate = tokio::time::timeout(Duration::from_secs(20), crm_connect(&["validate", "--config", &config], &[]))
        .await
        .expect("validate does not hang on a FIFO");
    assert_eq!(validate.code, 1, "{validate:?}");
    assert!(validate.stdout.contains("not a regular file"), "{validate:?}");
    assert!(validate.stdout.contains("larger than 64 KiB"), "{validate:?}");
}

#[tokio::test]
async fn a_file_invalid_only_for_a_missing_secret_applies_once_the_secret_appears() {
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let with_secret_file = |name: &str| {
        let secret_file = format!("{{ file = {} }}", toml_string(name));
        TenantFile::new().database_url(&db.url).amocrm(&amo).amocrm_key("client_secret", &secret_file)
    };
    write(dir.path(), "first.secret", "first-secret\n");
    write(dir.path(), "acme.toml", with_secret_file("first.secret"));
    let daemon = Binary::run(dir.path(), dir.path().join("daemon.log"));
    let client = connect(&db.url).await;
    let stored_secret = || async {
        let secret: Option<String> = match client.query_one("SELECT amocrm_client_secret FROM config", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => None,
        };
        secret
    };
    eventually("the first secret is stored", Duration::from_secs(20), || async {
        stored_secret().await.as_deref() == Some("first-secret")
    })
    .await;

    // The file now names a secret that is not there yet (a Kubernetes
    // Secret landing after its ConfigMap): invalid, the last good one stays.
    with_secret_file("second.secret").replace(dir.path(), "acme").unwrap();
    eventually("the file is found invalid", Duration::from_secs(10), || async {
        daemon.log().contains("invalid tenant file")
    })
    .await;
    // The secret lands; the tenant file itself does not change again.
    std::fs::write(dir.path().join("second.secret"), "second-secret\n").unwrap();
    eventually("the file applies with the new secret", Duration::from_secs(10), || async {
        stored_secret().await.as_deref() == Some("second-secret")
    })
    .await;
    let (status, log) = daemon.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{log}");
}

#[tokio::test]
async fn a_file_renamed_with_its_slug_kept_is_the_same_tenant_and_its_edit_applies() {
    let amo = AmoSandbox::start(AmoSandboxConfig::default()).await.unwrap();
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let file = |secret: &str| {
        TenantFile::new().slug("acme").database_url(&db.url).amocrm(&amo).amocrm_string("client_secret", secret)
    };
    write(dir.path(), "acme.toml", file("first-secret"));
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let daemon = Running::start_with(&["--listen", &listen], dir.path()).await;
    let client = connect(&db.url).await;
    let stored_secret = || async {
        let secret: Option<String> =
            client.query_one("SELECT amocrm_client_secret FROM config", &[]).await.unwrap().get(0);
        secret
    };
    assert_eq!(stored_secret().await.as_deref(), Some("first-secret"));

    // `git mv acme.toml acme-prod.toml` with an edit in the same commit.
    write(dir.path(), "acme-prod.toml", file("second-secret"));
    std::fs::remove_file(dir.path().join("acme.toml")).unwrap();
    eventually("the edit applied", Duration::from_secs(10), || async {
        stored_secret().await.as_deref() == Some("second-secret")
    })
    .await;
    // Still managed: the OAuth callback finds the tenant (a refused
    // authorisation, 403, rather than an unknown state, 400) …
    let run = crm_connect(&["auth-url", "--config", dir.path().to_str().unwrap(), "--tenant", "acme"], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let url = url::Url::parse(run.stdout.lines().next().unwrap()).unwrap();
    let state_param = url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("error", "access_denied")
        .append_pair("state", &state_param)
        .finish();
    let page = reqwest::get(format!("http://{listen}/oauth/amocrm/callback?{query}")).await.unwrap();
    assert_eq!(page.status().as_u16(), 403, "the renamed tenant is unknown to the callback");
    // … and its status was never marked `unmanaged`.
    assert_ne!(StatusRow::read(&client, "amocrm").await.map(|s| s.state).as_deref(), Some("unmanaged"));
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_listen_address_in_use_is_a_startup_error_with_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let run = tokio::time::timeout(
        Duration::from_secs(20),
        crm_connect(&["run", "--config", dir.path().to_str().unwrap(), "--listen", &addr], &[]),
    )
    .await
    .expect("the daemon exits instead of running without its endpoint");
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("cannot listen"), "{run:?}");
}

#[tokio::test]
async fn read_only_commands_never_migrate_and_print_only_their_answer() {
    let db = fresh_database().await;
    let portal = B24Sandbox::start(B24SandboxConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    TenantFile::new().database_url(&db.url).bitrix24(&portal).write(dir.path(), "acme").unwrap();
    let config = dir.path().to_str().unwrap();
    for args in [
        vec!["status", "--config", config],
        vec!["stages", "--config", config, "--tenant", "acme"],
        vec!["validate", "--config", config],
        vec!["sync", "--dry-run", "--config", config],
    ] {
        let run = crm_connect(&args, &[]).await;
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert_eq!(run.stderr, "", "{args:?} logged besides its answer");
    }
    let tables: i64 = connect(&db.url)
        .await
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "a read-only command created tables");

    // Once synced, `stages` and `status` answer without migration chatter.
    let sync = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(sync.code, 0, "{sync:?}");
    let stages = crm_connect(&["stages", "--config", config, "--tenant", "acme"], &[]).await;
    assert_eq!(stages.code, 0, "{stages:?}");
    assert_eq!(stages.stderr, "", "{stages:?}");
    assert!(stages.stdout.contains("Bitrix24"), "{stages:?}");
}
