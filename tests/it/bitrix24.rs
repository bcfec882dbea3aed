//! Bitrix24 end to end against the sandbox and a real PostgreSQL: every
//! category including 0 in two round trips, semantics and flags, the
//! webhook's user id everywhere, limits, a renamed portal, a missing scope.

use std::time::{Duration, Instant, SystemTime};

use crm_connect::apply::apply_tenant;
use crm_connect_sandbox::bitrix24::{B24Sandbox, BlockedCommandTime, query_limit_exceeded};
use crm_connect_sandbox::tenant_file::Stage;
use tokio_postgres::Client;

use crate::support::postgres::fresh_database;
use crate::support::rows::{B24StageRow, EventRow, StatusRow, xmins};
use crate::support::world::World;
use crate::support::{connect, crm_connect};

async fn status(client: &Client) -> StatusRow {
    StatusRow::of(client, "bitrix24").await
}

fn stage_count() -> usize {
    B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum()
}

#[tokio::test]
async fn sync_stores_every_stage_of_every_category_including_0_in_two_round_trips() {
    let world = World::bitrix24().await;
    let (portal, db, config) = (world.portal(), &world.db, world.config());
    let qualified = [Stage::status("C1:PREPARATION"), Stage::in_category("partners' DEALS", "Customer's \"yes\" 🎉")];
    world.write(&world.file().bitrix24_stages("qualified", qualified));

    let first = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(first.code, 0, "{first:?}");
    // Connection check and stage sync in two round trips, each with the user id.
    let batch = format!("POST /rest/{}/{}/batch", portal.config().user_id, portal.config().code);
    portal.expect_requests([&batch, &batch]);

    let client = connect(&db.url).await;
    let stored = B24StageRow::all(&client).await;
    assert_eq!(stored.len(), stage_count(), "{stored:#?}");
    let of =
        |id: &str| stored.iter().find(|s| s.status_id == id).unwrap_or_else(|| panic!("{id} missing: {stored:#?}"));
    assert_eq!((of("NEW").category_id, of("NEW").category.as_str()), (0, "Общее"), "the default pipeline is there");
    assert_eq!(of("C2:UC_LAFJPE").name, "Customer's \"yes\" 🎉");
    assert_eq!(of("C2:UC_LAFJPE").category, "Partners' deals");
    assert_eq!((of("WON").semantics.as_str(), of("WON").success, of("WON").fail), ("success", true, false));
    assert_eq!((of("LOSE").semantics.as_str(), of("LOSE").success, of("LOSE").fail), ("failure", false, true));
    assert_eq!((of("APOLOGY").semantics.as_str(), of("APOLOGY").fail), ("failure", true), "apology counts as failure");
    assert_eq!((of("C2:APOLOGY").semantics.as_str(), of("C2:APOLOGY").fail), ("failure", true));
    let qualified: Vec<&str> = stored.iter().filter(|s| s.qualified).map(|s| s.status_id.as_str()).collect();
    assert_eq!(qualified, ["C1:PREPARATION", "C2:UC_LAFJPE"]);

    let row = client
        .query_one(
            "SELECT bitrix24_domain, bitrix24_access_token, bitrix24_user_id, bitrix24_entity_type,
                    bitrix24_connected_at IS NOT NULL FROM config",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), portal.base_url().trim_start_matches("http://"));
    assert_eq!(row.get::<_, String>(1), portal.config().code);
    assert_eq!(row.get::<_, i32>(2), portal.config().user_id);
    assert_eq!(row.get::<_, String>(3), "deal");
    assert!(row.get::<_, bool>(4));
    assert_eq!(status(&client).await.state, "connected");
    let (config_xmin, stage_xmins) = (xmins(&client, "config").await, xmins(&client, "bitrix24_pipeline_stages").await);

    let second = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(second.code, 0, "{second:?}");
    portal.expect_requests_from(2, [&batch, &batch]);
    assert_eq!(xmins(&client, "config").await, config_xmin, "the second sync wrote config");
    assert_eq!(xmins(&client, "bitrix24_pipeline_stages").await, stage_xmins, "the second sync wrote stages");
    assert_eq!(portal.violations(), 0);
}

#[tokio::test]
async fn query_limits_then_a_portal_rename_still_end_in_a_complete_sync() {
    let world = World::bitrix24().await;
    let portal = world.portal();
    let tenant = world.tenant(&world.file());
    portal.faults().inject("/rest/", query_limit_exceeded(), 3);
    portal.rename_portal();

    let applied = apply_tenant(&world.ctx, &tenant).await.unwrap();

    let (_, outcome) = &applied.crms[0];
    let report = outcome.as_ref().unwrap_or_else(|f| panic!("{f:?}"));
    let new_host = portal.new_base_url().trim_start_matches("http://").to_string();
    assert_eq!(report.moved_to.as_deref(), Some(new_host.as_str()));
    let client = world.client().await;
    assert_eq!(B24StageRow::all(&client).await.len(), stage_count());
    assert_eq!(portal.violations(), 0);
    assert_eq!(EventRow::count(&client, "portal_moved").await, 1);
    let posts_after_redirect = portal.requests().iter().filter(|r| r.method == "POST" && r.status == 200).count();
    assert!(posts_after_redirect >= 2, "the same POSTs reached the new host");
}

#[tokio::test]
async fn a_method_out_of_time_budget_waits_for_its_reset_and_the_sync_completes() {
    let world = World::bitrix24().await;
    let portal = world.portal();
    let tenant = world.tenant(&world.file());
    portal.block_method("crm.status.list", Duration::from_secs(1));
    let started = std::time::Instant::now();
    let applied = apply_tenant(&world.ctx, &tenant).await.unwrap();
    assert!(!applied.failed(), "{:?}", applied.crms);
    let batches: Vec<_> = portal.requests().into_iter().filter(|r| r.path.ends_with("/batch")).collect();
    assert_eq!(batches.len(), 3, "the blocked batch was sent again once, after the pause: {batches:#?}");
    let gap = batches[2].at - batches[1].at;
    assert!(gap >= Duration::from_millis(800), "the retry waited for operating_reset_at, not {gap:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_blocked_batch_command_without_a_reset_time_of_its_own_waits_for_the_batchs_outer_one() {
    let world = World::bitrix24().await;
    let portal = world.portal();
    let tenant = world.tenant(&world.file());
    // As real portals answer: `result_time` has no entry for the blocked
    // command; the batch's own `time.operating_reset_at` says when.
    portal.set_blocked_command_time(BlockedCommandTime::Outer);
    let block = Duration::from_secs(2);
    // The sandbox clock is the system clock (never advanced here).
    let unblocked_at = SystemTime::now() + block;
    portal.block_method("crm.status.list", block);
    let clocks = (Instant::now(), SystemTime::now());

    let applied = apply_tenant(&world.ctx, &tenant).await.unwrap();

    assert!(!applied.failed(), "{:?}", applied.crms);
    let batches: Vec<_> = portal.requests().into_iter().filter(|r| r.path.ends_with("/batch")).collect();
    assert_eq!(batches.len(), 3, "the blocked batch was sent again once, after the pause: {batches:#?}");
    let retried_at = clocks.1 + (batches[2].at - clocks.0);
    assert!(
        retried_at >= unblocked_at,
        "the retry came {:?} before the reset",
        unblocked_at.duration_since(retried_at)
    );
    let pause = batches[2].at - batches[1].at;
    assert!(pause < Duration::from_secs(5), "the pause ended at the outer reset, not at the 10 s fallback: {pause:?}");
    assert_eq!(B24StageRow::all(&world.client().await).await.len(), stage_count());
}

#[tokio::test]
async fn a_webhook_without_the_crm_scope_is_an_error_that_names_it_and_changes_nothing_else() {
    let world = World::bitrix24().await;
    world.portal().set_scopes(vec!["task".into(), "user".into()]);
    let applied = apply_tenant(&world.ctx, &world.tenant(&world.file())).await.unwrap();
    assert!(applied.failed());
    let client = world.client().await;
    let StatusRow { state, last_error: error } = status(&client).await;
    assert_eq!(state, "error");
    assert!(error.as_deref().unwrap_or_default().contains("lacks the `crm` scope (granted: task, user)"), "{error:?}");
    assert!(B24StageRow::all(&client).await.is_empty());
    let connected: bool =
        client.query_one("SELECT bitrix24_connected_at IS NULL FROM config", &[]).await.unwrap().get(0);
    assert!(connected, "an unverified webhook is not connected");
}

#[tokio::test]
async fn a_lead_tenant_syncs_the_lead_statuses_in_one_round_trip() {
    let world = World::bitrix24().await;
    let portal = world.portal();
    let applied = apply_tenant(&world.ctx, &world.tenant(&world.file().entity_type("lead"))).await.unwrap();
    assert!(!applied.failed(), "{:?}", applied.crms);
    portal.expect_requests([format!("POST /rest/{}/{}/batch", portal.config().user_id, portal.config().code)]);
    let client = world.client().await;
    let stored = B24StageRow::all(&client).await;
    assert_eq!(stored.len(), B24Sandbox::default_lead_statuses().len());
    let of = |id: &str| stored.iter().find(|s| s.status_id == id).unwrap().clone();
    assert_eq!((of("CONVERTED").success, of("JUNK").fail), (true, true));
    let entity: String =
        client.query_one("SELECT DISTINCT entity_type FROM bitrix24_pipeline_stages", &[]).await.unwrap().get(0);
    assert_eq!(entity, "lead");
}

#[tokio::test]
async fn test_lead_creates_a_deal_in_the_test_category_and_stages_lists_it() {
    let world = World::bitrix24().await;
    let (portal, config) = (world.portal(), world.config());
    world.write(&world.file().bitrix24_key("test_category_id", "1"));
    let lead = crm_connect(&["test-lead", "--config", config, "--tenant", "acme"], &[]).await;
    assert_eq!(lead.code, 0, "{lead:?}");
    let deals = portal.deals();
    assert_eq!(deals.len(), 1);
    assert_eq!((deals[0].title.as_str(), deals[0].category_id), ("Тест crm-connect", 1));
    assert!(lead.stdout.contains(&deals[0].id.to_string()), "{}", lead.stdout);

    assert_eq!(crm_connect(&["sync", "--config", config], &[]).await.code, 0);
    let listed = crm_connect(&["stages", "--config", config, "--tenant", "acme"], &[]).await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(listed.stdout.lines().any(|l| l.contains("C1:WON") && l.contains("success")), "{}", listed.stdout);
}

#[tokio::test]
async fn the_webhook_code_never_appears_in_logs_errors_status_or_events() {
    let world = World::bitrix24().await;
    let (portal, db, config) = (world.portal(), &world.db, world.config());
    let wrong = fresh_database().await;
    world.write(&world.file().bitrix24_stages("qualified", [Stage::status("C9:NOPE")]));
    let bad_code = "wr0ngc0de4242";
    let bad_url = portal.webhook_url().replace(&portal.config().code, bad_code);
    world.write_as("bad", &world.file().database_url(&wrong.url).webhook_url(&bad_url));
    let env = [("RUST_LOG", "trace")];
    let runs = [
        crm_connect(&["sync", "--config", config], &env).await,
        crm_connect(&["sync", "--config", config, "--log-format", "json"], &env).await,
        crm_connect(&["status", "--config", config], &env).await,
        crm_connect(&["status", "--config", config, "--json"], &env).await,
        crm_connect(&["stages", "--config", config, "--tenant", "acme"], &env).await,
        crm_connect(&["validate", "--config", config], &env).await,
    ];
    assert_eq!(runs[0].code, 1, "the mapping error and the bad webhook fail: {:?}", runs[0]);
    assert!(runs[0].stdout.contains("bad: bitrix24 error: INVALID_CREDENTIALS"), "{}", runs[0].stdout);
    let mut texts: Vec<String> = runs.iter().map(|r| r.output()).collect();
    for url in [&db.url, &wrong.url] {
        let client = connect(url).await;
        for row in client.query("SELECT detail::text FROM crm_connect_events", &[]).await.unwrap() {
            texts.push(row.get(0));
        }
        for row in client.query("SELECT coalesce(last_error, '') FROM crm_connect_status", &[]).await.unwrap() {
            texts.push(row.get(0));
        }
    }
    assert!(texts.iter().any(|t| t.contains("/rest/1/***/")), "the redacted webhook shows somewhere");
    for text in &texts {
        assert!(!text.contains(&portal.config().code) && !text.contains(bad_code), "leaked in:\n{text}");
    }
}
