//! Bitrix24 end to end against the sandbox and a real PostgreSQL: every
//! category including 0 in two round trips, semantics and flags, the
//! webhook's user id everywhere, limits, a renamed portal, a missing scope.

use std::time::{Duration, Instant, SystemTime};

use crm_connect::apply::apply_tenant;
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig, BlockedCommandTime, query_limit_exceeded};
use tokio_postgres::Client;

use crate::support::{connect, crm_connect, fast_context, postgres::fresh_database, tenant, write};

async fn sandbox() -> B24Sandbox {
    B24Sandbox::start(B24SandboxConfig::default()).await.expect("the sandbox starts")
}

fn b24_tenant(database_url: &str, portal: &B24Sandbox, extra: &str) -> String {
    format!(
        "[tenant]\ndatabase_url = \"{database_url}\"\n\n[bitrix24]\nwebhook_url = \"{}\"\n{extra}\n",
        portal.webhook_url()
    )
}

/// (category id, category, status id, name, semantics, qualified, success, fail, removed)
type Row = (i32, String, String, String, String, bool, bool, bool, bool);

async fn stages(client: &Client) -> Vec<Row> {
    client
        .query(
            "SELECT category_id, category_name, status_id, status_name, semantics, is_qualified_stage,
                    is_success_stage, is_fail_stage, removed_at IS NOT NULL
             FROM bitrix24_pipeline_stages ORDER BY category_id, status_sort, status_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8)))
        .collect()
}

async fn status(client: &Client) -> (String, Option<String>) {
    let row =
        client.query_one("SELECT state, last_error FROM crm_connect_status WHERE crm = 'bitrix24'", &[]).await.unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn sync_stores_every_stage_of_every_category_including_0_in_two_round_trips() {
    let portal = sandbox().await;
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let mapping = "[bitrix24.stages]\nqualified = [\"C1:PREPARATION\", { category = \"partners' DEALS\", stage = \"Customer's \\\"yes\\\" 🎉\" }]\n";
    write(dir.path(), "acme.toml", &b24_tenant(&db.url, &portal, mapping));
    let config = dir.path().to_str().unwrap();

    let first = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(first.code, 0, "{first:?}");
    let requests = portal.requests();
    assert_eq!(requests.len(), 2, "connection check and stage sync in two round trips: {requests:#?}");
    let prefix = format!("/rest/{}/{}/", portal.config().user_id, portal.config().code);
    assert!(requests.iter().all(|r| r.path.starts_with(&prefix)), "a request lacked the user id: {requests:#?}");

    let client = connect(&db.url).await;
    let stored = stages(&client).await;
    let expected: usize = B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum();
    assert_eq!(stored.len(), expected, "{stored:#?}");
    let of = |id: &str| stored.iter().find(|s| s.2 == id).unwrap_or_else(|| panic!("{id} missing: {stored:#?}"));
    assert_eq!((of("NEW").0, of("NEW").1.as_str()), (0, "Общее"), "the default pipeline is there");
    assert_eq!(of("C2:UC_LAFJPE").3, "Customer's \"yes\" 🎉");
    assert_eq!(of("C2:UC_LAFJPE").1, "Partners' deals");
    assert_eq!((of("WON").4.as_str(), of("WON").6, of("WON").7), ("success", true, false));
    assert_eq!((of("LOSE").4.as_str(), of("LOSE").6, of("LOSE").7), ("failure", false, true));
    assert_eq!((of("APOLOGY").4.as_str(), of("APOLOGY").7), ("failure", true), "apology counts as failure");
    assert_eq!((of("C2:APOLOGY").4.as_str(), of("C2:APOLOGY").7), ("failure", true));
    let qualified: Vec<&str> = stored.iter().filter(|s| s.5).map(|s| s.2.as_str()).collect();
    assert_eq!(qualified, ["C1:PREPARATION", "C2:UC_LAFJPE"]);

    let row = client
        .query_one(
            "SELECT bitrix24_domain, bitrix24_access_token, bitrix24_user_id, bitrix24_entity_type,
                    bitrix24_connected_at IS NOT NULL, xmin::text FROM config",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), portal.base_url().trim_start_matches("http://"));
    assert_eq!(row.get::<_, String>(1), portal.config().code);
    assert_eq!(row.get::<_, i32>(2), portal.config().user_id);
    assert_eq!(row.get::<_, String>(3), "deal");
    assert!(row.get::<_, bool>(4));
    assert_eq!(status(&client).await.0, "connected");
    let xmin: String = row.get(5);
    let stage_xmins: Vec<String> = client
        .query("SELECT xmin::text FROM bitrix24_pipeline_stages ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();

    let second = crm_connect(&["sync", "--config", config], &[]).await;
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(portal.requests().len(), 4, "again two round trips");
    let xmin_after: String = client.query_one("SELECT xmin::text FROM config", &[]).await.unwrap().get(0);
    assert_eq!(xmin, xmin_after, "the second sync wrote config");
    let stage_xmins_after: Vec<String> = client
        .query("SELECT xmin::text FROM bitrix24_pipeline_stages ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stage_xmins, stage_xmins_after, "the second sync wrote stages");
    assert_eq!(portal.violations(), 0);
}

#[tokio::test]
async fn query_limits_then_a_portal_rename_still_end_in_a_complete_sync() {
    let portal = sandbox().await;
    let db = fresh_database().await;
    let tenant = tenant("acme", &b24_tenant(&db.url, &portal, ""));
    portal.faults().inject("/rest/", query_limit_exceeded(), 3);
    portal.rename_portal();

    let applied = apply_tenant(&fast_context(), &tenant).await.unwrap();

    let (_, outcome) = &applied.crms[0];
    let report = outcome.as_ref().unwrap_or_else(|f| panic!("{f:?}"));
    let new_host = portal.new_base_url().trim_start_matches("http://").to_string();
    assert_eq!(report.moved_to.as_deref(), Some(new_host.as_str()));
    let client = connect(&db.url).await;
    let expected: usize = B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum();
    assert_eq!(stages(&client).await.len(), expected);
    assert_eq!(portal.violations(), 0);
    let moved: i64 = client
        .query_one("SELECT count(*) FROM crm_connect_events WHERE kind = 'portal_moved'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(moved, 1);
    let posts_after_redirect = portal.requests().iter().filter(|r| r.method == "POST" && r.status == 200).count();
    assert!(posts_after_redirect >= 2, "the same POSTs reached the new host");
}

#[tokio::test]
async fn a_method_out_of_time_budget_waits_for_its_reset_and_the_sync_completes() {
    let portal = sandbox().await;
    let db = fresh_database().await;
    let tenant = tenant("acme", &b24_tenant(&db.url, &portal, ""));
    portal.block_method("crm.status.list", Duration::from_secs(1));
    let started = std::time::Instant::now();
    let applied = apply_tenant(&fast_context(), &tenant).await.unwrap();
    assert!(!applied.failed(), "{:?}", applied.crms);
    let batches: Vec<_> = portal.requests().into_iter().filter(|r| r.path.ends_with("/batch")).collect();
    assert_eq!(batches.len(), 3, "the blocked batch was sent again once, after the pause: {batches:#?}");
    let gap = batches[2].at - batches[1].at;
    assert!(gap >= Duration::from_millis(800), "the retry waited for operating_reset_at, not {gap:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_blocked_batch_command_without_a_reset_time_of_its_own_waits_for_the_batchs_outer_one() {
    let portal = sandbox().await;
    let db = fresh_database().await;
    let tenant = tenant("acme", &b24_tenant(&db.url, &portal, ""));
    // As real portals answer: `result_time` has no entry for the blocked
    // command; the batch's own `time.operating_reset_at` says when.
    portal.set_blocked_command_time(BlockedCommandTime::Outer);
    let block = Duration::from_secs(2);
    // The sandbox clock is the system clock (never advanced here).
    let unblocked_at = SystemTime::now() + block;
    portal.block_method("crm.status.list", block);
    let clocks = (Instant::now(), SystemTime::now());

    let applied = apply_tenant(&fast_context(), &tenant).await.unwrap();

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
    let client = connect(&db.url).await;
    let expected: usize = B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum();
    assert_eq!(stages(&client).await.len(), expected);
}

#[tokio::test]
async fn a_webhook_without_the_crm_scope_is_an_error_that_names_it_and_changes_nothing_else() {
    let portal = sandbox().await;
    portal.set_scopes(vec!["task".into(), "user".into()]);
    let db = fresh_database().await;
    let tenant = tenant("acme", &b24_tenant(&db.url, &portal, ""));
    let applied = apply_tenant(&fast_context(), &tenant).await.unwrap();
    assert!(applied.failed());
    let client = connect(&db.url).await;
    let (state, error) = status(&client).await;
    assert_eq!(state, "error");
    assert!(error.as_deref().unwrap_or_default().contains("lacks the `crm` scope (granted: task, user)"), "{error:?}");
    assert!(stages(&client).await.is_empty());
    let connected: bool =
        client.query_one("SELECT bitrix24_connected_at IS NULL FROM config", &[]).await.unwrap().get(0);
    assert!(connected, "an unverified webhook is not connected");
}

#[tokio::test]
async fn a_lead_tenant_syncs_the_lead_statuses_in_one_round_trip() {
    let portal = sandbox().await;
    let db = fresh_database().await;
    let tenant = tenant("acme", &b24_tenant(&db.url, &portal, "entity_type = \"lead\""));
    let applied = apply_tenant(&fast_context(), &tenant).await.unwrap();
    assert!(!applied.failed(), "{:?}", applied.crms);
    assert_eq!(portal.requests().len(), 1);
    let client = connect(&db.url).await;
    let stored = stages(&client).await;
    assert_eq!(stored.len(), B24Sandbox::default_lead_statuses().len());
    let of = |id: &str| stored.iter().find(|s| s.2 == id).unwrap().clone();
    assert_eq!((of("CONVERTED").6, of("JUNK").7), (true, true));
    let entity: String =
        client.query_one("SELECT DISTINCT entity_type FROM bitrix24_pipeline_stages", &[]).await.unwrap().get(0);
    assert_eq!(entity, "lead");
}

#[tokio::test]
async fn test_lead_creates_a_deal_in_the_test_category_and_stages_lists_it() {
    let portal = sandbox().await;
    let db = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", &b24_tenant(&db.url, &portal, "test_category_id = 1"));
    let config = dir.path().to_str().unwrap();
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
    let portal = sandbox().await;
    let db = fresh_database().await;
    let wrong = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", &b24_tenant(&db.url, &portal, "[bitrix24.stages]\nqualified = [\"C9:NOPE\"]"));
    let bad_code = "wr0ngc0de4242";
    let bad_url = portal.webhook_url().replace(&portal.config().code, bad_code);
    write(
        dir.path(),
        "bad.toml",
        &format!("[tenant]\ndatabase_url = \"{}\"\n[bitrix24]\nwebhook_url = \"{bad_url}\"\n", wrong.url),
    );
    let config = dir.path().to_str().unwrap();
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
