//! AmoCRM end to end against the sandbox and a real PostgreSQL: one code
//! exchange, rotation-safe refreshes, stage sync with flags, and faults.

use std::time::Duration;

use chrono::Utc;
use crm_connect::apply::apply_tenant;
use crm_connect::tokens::{Owner, sha256_hex};
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig, TokenStats};
use crm_connect_sandbox::faults::Fault;
use crm_connect_sandbox::tenant_file::Stage;
use tokio_postgres::Client;

use crate::support::postgres::fresh_database;
use crate::support::rows::{AmoStageRow, EventRow, StatusRow, TokensRow, xmins};
use crate::support::world::World;
use crate::support::{connect, crm_connect, fast_context, tenant};

fn qualified_by_name() -> Stage {
    Stage::in_pipeline("продажи", "КВАЛИФИЦИРОВАН")
}

async fn stored_access_token(client: &Client) -> String {
    client.query_one("SELECT amocrm_access_token FROM config", &[]).await.unwrap().get(0)
}

async fn status(client: &Client) -> StatusRow {
    StatusRow::of(client, "amocrm").await
}

#[tokio::test]
async fn sync_exchanges_a_fresh_code_once_and_stores_tokens_and_every_stage() {
    let world = World::amocrm().await;
    let (amo, db, config) = (world.amo(), &world.db, world.config());
    let code = amo.issue_code();
    world.write(&world.file().authorization_code(&code).amocrm_stages("qualified", [qualified_by_name()]));

    let first = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.stdout.contains("acme: amocrm connected, 12 stages, stages changed"), "{}", first.stdout);

    let client = connect(&db.url).await;
    let row = client
        .query_one(
            "SELECT amocrm_access_token, amocrm_refresh_token, amocrm_token_expires_at, amocrm_auth_code_sha256
             FROM config",
            &[],
        )
        .await
        .unwrap();
    let access: String = row.get(0);
    assert!(amo.is_access_token_valid(&access));
    assert!(!row.get::<_, String>(1).is_empty());
    let expires: chrono::DateTime<Utc> = row.get(2);
    let expected = Utc::now() + chrono::Duration::seconds(86_400);
    assert!((expires - expected).num_seconds().abs() < 120, "expiry {expires}, expected about {expected}");
    assert_eq!(row.get::<_, String>(3), sha256_hex(&crm_connect::secret::Secret::new(code.clone())));

    let stored = AmoStageRow::all(&client).await;
    assert_eq!(stored.len(), 12, "{stored:#?}");
    for pipeline in ["Воронка", "Продажи"] {
        let of = |id: i64| {
            stored
                .iter()
                .find(|s| s.pipeline == pipeline && s.status_id == id)
                .unwrap_or_else(|| panic!("{pipeline} {id}"))
        };
        assert_eq!((of(142).success, of(142).fail), (true, false), "142 is success in {pipeline}");
        assert_eq!((of(143).success, of(143).fail), (false, true), "143 is fail in {pipeline}");
    }
    let qualified: Vec<_> =
        stored.iter().filter(|s| s.qualified).map(|s| (s.pipeline.as_str(), s.name.as_str())).collect();
    assert_eq!(qualified, [("Продажи", "Квалифицирован")]);
    assert_eq!(status(&client).await.state, "connected");

    let (config_before, stages_before) =
        (xmins(&client, "config").await, xmins(&client, "amocrm_pipeline_stages").await);
    let events_before = EventRow::all(&client).await;

    let second = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(second.code, 0, "{second:?}");
    assert!(second.stdout.contains("acme: amocrm connected, 12 stages, stages unchanged"), "{}", second.stdout);
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
    assert_eq!(xmins(&client, "config").await, config_before, "the second sync wrote config");
    assert_eq!(xmins(&client, "amocrm_pipeline_stages").await, stages_before, "the second sync wrote stages");
    assert_eq!(EventRow::all(&client).await, events_before);
    assert_eq!(amo.violations(), 0);
}

#[tokio::test]
async fn two_processes_refreshing_one_tenant_at_once_make_exactly_one_refresh() {
    let world = World::amocrm().await;
    let amo = world.amo();
    let tenant = world.tenant(&world.file_with_code());
    let amo_config = tenant.amocrm.clone().unwrap();
    apply_tenant(&world.ctx, &tenant).await.unwrap();
    let client = world.client().await;

    for round in 1..=3 {
        client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
        // Separate contexts have separate pools: two sessions, as two daemons.
        let (a, b) = (fast_context(), fast_context());
        let dba = a.pools.get("acme", &tenant.database_url).unwrap();
        let dbb = b.pools.get("acme", &tenant.database_url).unwrap();
        let margin = Duration::from_secs(3600);
        let (ta, tb) = (a.tokens(), b.tokens());
        let (ra, rb) = tokio::join!(
            ta.refresh_if_due(Owner { slug: "acme", db: &dba, amo: &amo_config, margin }, None),
            tb.refresh_if_due(Owner { slug: "acme", db: &dbb, amo: &amo_config, margin }, None),
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.access, rb.access, "both end with the same pair");
        assert_eq!(amo.token_stats().refreshed, round);
        assert_eq!(amo.token_stats().refresh_rejected, 0);
        assert_eq!(stored_access_token(&client).await, ra.access.expose());
    }
}

#[tokio::test]
async fn two_sync_commands_at_once_send_the_code_once() {
    let world = World::amocrm().await;
    let amo = world.amo();
    world.write(&world.file_with_code());
    let args = ["sync", "--config", world.config()];
    let (a, b) = tokio::join!(crm_connect(&args, &[]), crm_connect(&args, &[]));
    assert_eq!((a.code, b.code), (0, 0), "{a:?}\n{b:?}");
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, ..TokenStats::default() });
}

#[tokio::test]
async fn a_refreshed_pair_whose_write_fails_is_stored_once_the_database_is_back() {
    let world = World::amocrm().await;
    let (amo, db, ctx) = (world.amo(), &world.db, &world.ctx);
    let tenant = world.tenant(&world.file_with_code());
    let amo_config = tenant.amocrm.clone().unwrap();
    apply_tenant(ctx, &tenant).await.unwrap();
    let admin = connect(&crate::support::postgres::admin_url().await).await;
    let client = connect(&db.url).await;
    client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();
    drop(client);

    // The token endpoint answers late; meanwhile the database goes away.
    amo.faults().inject("/oauth2/access_token", Fault::Delay(Duration::from_millis(1500)), 1);
    let tenant_db = ctx.pools.get("acme", &tenant.database_url).unwrap();
    let refresh = {
        let (ctx, amo_config, tenant_db) = (ctx.clone(), amo_config.clone(), tenant_db.clone());
        tokio::spawn(async move {
            let owner = Owner { slug: "acme", db: &tenant_db, amo: &amo_config, margin: Duration::from_secs(3600) };
            ctx.tokens().refresh_if_due(owner, None).await
        })
    };
    // The refresh holds the row lock while the CRM answers: its session sits
    // "idle in transaction" on the server, which is when the database goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state = 'idle in transaction'",
                &[&db.name],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the refresh never took the row lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let name = db.name.as_str();
    admin.execute(&format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS false"), &[]).await.unwrap();
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", &[&name]).await.unwrap();

    let new = refresh.await.unwrap().expect("the refreshed pair is usable even though it is not stored");
    assert!(ctx.vault.contains("acme"), "the pair is kept in memory");
    assert!(amo.is_access_token_valid(new.access.expose()));

    // No second refresh while the pair waits: the next attempt only tries to store it.
    let owner = Owner { slug: "acme", db: &tenant_db, amo: &amo_config, margin: Duration::from_secs(3600) };
    let again = ctx.tokens().refresh_if_due(owner, None).await;
    assert!(again.is_err(), "the database is still down");
    assert_eq!(amo.token_stats().refreshed, 1);

    admin.execute(&format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS true"), &[]).await.unwrap();
    ctx.tokens().store_registered_within("acme", Duration::from_secs(20)).await.unwrap();
    assert!(!ctx.vault.contains("acme"));
    let client = connect(&db.url).await;
    assert_eq!(stored_access_token(&client).await, new.access.expose());
    assert_eq!(amo.token_stats(), TokenStats { exchanged: 1, refreshed: 1, ..TokenStats::default() });
}

#[tokio::test]
async fn storms_of_429_and_5xx_end_in_completed_syncs_without_a_rate_limit_violation() {
    let world = World::amocrm().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    let mut tenants = Vec::new();
    for i in 0..6 {
        let db = fresh_database().await;
        let text = world.file_with_code().database_url(&db.url).text();
        tenants.push(tenant(&format!("t{i}"), &text));
    }
    amo.faults().inject("/api/v4/leads/pipelines", Fault::server_error(), 4);
    amo.faults().inject("/api/v4/leads/pipelines", Fault::too_many_requests(), 3);
    amo.faults().inject("/api/v4/account", Fault::DropConnection, 2);
    amo.faults().inject("/oauth2/access_token", Fault::server_error(), 2);
    let mut runs = tokio::task::JoinSet::new();
    for tenant in tenants {
        let ctx = ctx.clone();
        runs.spawn(async move { apply_tenant(&ctx, &tenant).await });
    }
    while let Some(done) = runs.join_next().await {
        let applied = done.unwrap().unwrap();
        assert!(!applied.failed(), "{:?}", applied.crms);
    }
    assert_eq!(amo.violations(), 0, "the sandbox saw more than 7 requests in a second");
    assert_eq!(amo.token_stats().exchanged, 6);
}

#[tokio::test]
async fn an_unknown_stage_reference_keeps_the_flags_and_names_the_closest_stage() {
    let world = World::amocrm().await;
    let config = world.config();
    let with_code = world.file_with_code();
    world.write(&with_code.clone().amocrm_stages("qualified", [qualified_by_name()]));
    assert_eq!(crm_connect(&["sync", "--config", config], &[]).await.code, 0);
    let client = world.client().await;
    let before = AmoStageRow::all(&client).await;

    let typo = with_code
        .amocrm_stages("qualified", [Stage::in_pipeline("Продажи", "Квалифицированный")])
        .amocrm_stages("success", [Stage::Id(142)]);
    world.write(&typo);
    let run = crm_connect(&["sync", "--config", config], &[]).await;

    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(AmoStageRow::all(&client).await, before, "flags must stay as they were");
    let StatusRow { state, last_error } = status(&client).await;
    assert_eq!(state, "error");
    let error = last_error.unwrap();
    assert!(error.contains("\"Продажи\" / \"Квалифицированный\" matches no stage"), "{error}");
    assert!(error.contains("closest: \"Продажи\" / \"Квалифицирован\""), "{error}");
    assert_eq!(EventRow::count(&client, "mapping_error").await, 1);
    assert!(run.stdout.contains("matches no stage"), "{}", run.stdout);
}

#[tokio::test]
async fn a_rejected_code_is_recorded_and_never_sent_again() {
    let world = World::amocrm().await;
    let (amo, config) = (world.amo(), world.config());
    world.write(&world.file().authorization_code("never-issued"));
    let first = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(first.code, 1, "{first:?}");
    let rejected = "acme: amocrm needs_authorization: the authorization code was rejected";
    assert!(first.stdout.contains(rejected), "{}", first.stdout);
    let second = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(second.code, 1, "{second:?}");
    assert!(second.stdout.contains("was already sent once"), "{}", second.stdout);
    assert_eq!(amo.token_stats(), TokenStats { exchange_rejected: 1, ..TokenStats::default() });
    assert_eq!(status(&world.client().await).await.state, "needs_authorization");
}

#[tokio::test]
async fn an_access_token_refused_by_the_api_is_refreshed_once_and_the_call_retried() {
    let world = World::amocrm().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    let tenant = world.tenant(&world.file_with_code());
    apply_tenant(ctx, &tenant).await.unwrap();
    // The CRM's clock passes the access token's expiry; ours does not know.
    amo.advance_clock(Duration::from_secs(2 * 86_400));
    let applied = apply_tenant(ctx, &tenant).await.unwrap();
    assert!(!applied.failed(), "{:?}", applied.crms);
    assert_eq!(amo.token_stats().refreshed, 1);
    let unauthorized = amo.requests().iter().filter(|r| r.status == 401).count();
    assert_eq!(unauthorized, 1);
}

#[tokio::test]
async fn a_rejected_refresh_leaves_needs_authorization_and_keeps_the_tokens() {
    let world = World::amocrm().await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    let tenant = world.tenant(&world.file_with_code());
    apply_tenant(ctx, &tenant).await.unwrap();
    let client = world.client().await;
    let before = stored_access_token(&client).await;
    amo.revoke_all_tokens();
    client.execute("UPDATE config SET amocrm_token_expires_at = now()", &[]).await.unwrap();

    let applied = apply_tenant(ctx, &tenant).await.unwrap();
    assert!(applied.failed());
    assert_eq!(status(&client).await.state, "needs_authorization");
    assert_eq!(stored_access_token(&client).await, before, "stored tokens are never dropped");
    // No further attempts until a new code or token arrives.
    apply_tenant(ctx, &tenant).await.unwrap();
    assert_eq!(amo.token_stats().refresh_rejected, 1);
}

#[tokio::test]
async fn a_long_lived_token_is_stored_with_the_expiry_of_its_jwt() {
    let world = World::amocrm().await;
    let amo = world.amo();
    let token = amo.issue_long_lived_token(Duration::from_secs(365 * 86_400));
    // No client at all: a private integration has none.
    let file = ["client_id", "client_secret", "redirect_uri"]
        .into_iter()
        .fold(world.file(), |file, key| file.without_amocrm_key(key))
        .long_lived_token(&token);
    let applied = apply_tenant(&world.ctx, &world.tenant(&file)).await.unwrap();
    assert!(!applied.failed(), "{:?}", applied.crms);
    let stored = TokensRow::read(&world.client().await).await;
    assert_eq!(stored.access.as_deref(), Some(token.as_str()));
    assert_eq!(stored.refresh, None);
    assert_eq!(stored.expires_at, crm_connect::model::jwt_expiry(&token));
    assert_eq!(amo.token_stats(), TokenStats::default(), "no token request for a long-lived token");
}

#[tokio::test]
async fn authorize_test_lead_status_and_stages_work_from_the_command_line() {
    let world = World::amocrm().await;
    let (amo, db, config) = (world.amo(), &world.db, world.config());
    let pipeline = AmoSandbox::default_pipelines()[1].id;
    world.write(&world.file().amocrm_key("test_pipeline_id", &pipeline.to_string()));
    let code = amo.issue_code();

    let authorize = crm_connect(&["authorize", "--config", config, "--tenant", "acme", "--code", &code], &[]).await;
    assert_eq!(authorize.code, 0, "{authorize:?}");
    assert!(!authorize.output().contains(&code));
    let again = crm_connect(&["authorize", "--config", config, "--tenant", "acme", "--code", &code], &[]).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert_eq!(amo.token_stats().exchanged, 1, "a code is sent once");

    let lead = crm_connect(&["test-lead", "--config", config, "--tenant", "acme", "--crm", "amocrm"], &[]).await;
    assert_eq!(lead.code, 0, "{lead:?}");
    let leads = amo.leads();
    assert_eq!(leads.len(), 1);
    assert_eq!((leads[0].name.as_str(), leads[0].pipeline_id), ("Тест crm-connect", pipeline));
    assert!(lead.stdout.contains(&leads[0].id.to_string()), "{}", lead.stdout);

    assert_eq!(crm_connect(&["sync", "--config", config], &[]).await.code, 0);
    let status = crm_connect(&["status", "--config", config, "--json"], &[]).await;
    assert_eq!(status.code, 0, "{status:?}");
    let json: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(json[0]["tenant"], "acme");
    assert_eq!(json[0]["state"], "connected");
    assert_eq!(json[0]["stage_count"], 12);
    assert!(json[0]["token_expires_at"].is_string());
    let table = crm_connect(&["status", "--config", config], &[]).await;
    assert!(table.stdout.contains("acme") && table.stdout.contains("connected"), "{}", table.stdout);

    let stages = crm_connect(&["stages", "--config", config, "--tenant", "acme"], &[]).await;
    assert_eq!(stages.code, 0, "{stages:?}");
    assert!(stages.stdout.contains("Квалифицирован"), "{}", stages.stdout);
    assert!(stages.stdout.lines().any(|l| l.contains("142") && l.contains("success")), "{}", stages.stdout);

    for run in [&authorize, &lead, &status, &table, &stages] {
        let access = stored_access_token(&connect(&db.url).await).await;
        assert!(!run.output().contains(&access) && !run.output().contains(&amo.config().client_secret));
    }
}

#[tokio::test]
async fn vanished_stages_get_removed_at_and_lose_it_when_they_return_across_pages() {
    let config = AmoSandboxConfig { pipelines_page_size: Some(1), ..AmoSandboxConfig::default() };
    let world = World::amocrm_with(config).await;
    let (amo, ctx) = (world.amo(), &world.ctx);
    let tenant = world.tenant(&world.file_with_code());
    apply_tenant(ctx, &tenant).await.unwrap();
    let client = world.client().await;
    assert_eq!(AmoStageRow::all(&client).await.len(), 12, "both pages were read");

    let mut pipelines = AmoSandbox::default_pipelines();
    let sales = pipelines.remove(1);
    pipelines[0].statuses[0].name = "Первый контакт 🤝 «новый»".into();
    amo.set_pipelines(pipelines);
    apply_tenant(ctx, &tenant).await.unwrap();
    let now = AmoStageRow::all(&client).await;
    assert_eq!(
        now.iter().filter(|s| s.removed).count(),
        6,
        "the sales pipeline's rows are marked removed, not deleted"
    );
    assert!(now.iter().filter(|s| s.pipeline == "Продажи").all(|s| s.removed));
    assert!(now.iter().any(|s| s.name == "Первый контакт 🤝 «новый»" && !s.removed), "renamed byte-exact");

    let mut pipelines = AmoSandbox::default_pipelines();
    pipelines[1] = sales;
    amo.set_pipelines(pipelines);
    apply_tenant(ctx, &tenant).await.unwrap();
    let removed = AmoStageRow::all(&client).await.iter().filter(|s| s.removed).count();
    assert_eq!(removed, 0, "returning stages lose removed_at");
    assert_eq!(EventRow::count(&client, "stages_changed").await, 3);
}
