//! Stage lists that failed, were cut short or were refused: each is an
//! error that names its cause, leaves every stored row as it was (content
//! and row version, no `removed_at`), and the next sync after the fault
//! succeeds without writing anything.

use crm_connect::apply::{Applied, apply_tenant, resync_stages};
use crm_connect::config::TenantConfig;
use crm_connect::model::CrmState;
use crm_connect_sandbox::amocrm::AmoSandboxConfig;
use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig};
use crm_connect_sandbox::faults::Fault;
use crm_connect_sandbox::tenant_file::TenantFile;
use tokio_postgres::Client;

use crate::support::rows::snapshot;
use crate::support::world::World;

const PIPELINES_PATH: &str = "/api/v4/leads/pipelines";
/// The client follows `_links.next` this far (AmoCRM has at most 50 pipelines).
const AMO_PAGE_CAP: usize = 50;

async fn removed(client: &Client, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE removed_at IS NOT NULL");
    client.query_one(&sql, &[]).await.unwrap().get(0)
}

async fn status(client: &Client, crm: &str) -> (String, Option<String>) {
    let row =
        client.query_one("SELECT state, last_error FROM crm_connect_status WHERE crm = $1", &[&crm]).await.unwrap();
    (row.get(0), row.get(1))
}

/// The one CRM's failure message, after checking it is an `error`.
fn failure(applied: &Applied) -> String {
    let (_, outcome) = applied.crms.first().expect("one CRM");
    let failure = outcome.as_ref().expect_err("the sync failed");
    assert_eq!(failure.state(), CrmState::Error, "{failure:?}");
    failure.message.clone()
}

fn succeeded(applied: &Applied) {
    assert!(!applied.failed(), "{:?}", applied.crms);
}

struct Tenant {
    world: World,
    config: TenantConfig,
    client: Client,
}

impl Tenant {
    /// A failed sync: state `error` with `expected` in its message, nothing
    /// stored changed, no stage marked removed. Returns the message.
    async fn fails_keeping_everything(&self, applied: Applied, crm: &str, expected: &[&str]) -> String {
        let message = failure(&applied);
        for part in expected {
            assert!(message.contains(part), "{part:?} not in {message:?}");
        }
        assert_eq!(status(&self.client, crm).await, ("error".to_string(), Some(message.clone())));
        message
    }

    /// The next full sync succeeds and writes nothing.
    async fn recovers_unchanged(&self, crm: &str, before: &[String]) {
        succeeded(&apply_tenant(&self.world.ctx, &self.config).await.unwrap());
        assert_eq!(status(&self.client, crm).await.0, "connected");
        assert_eq!(snapshot(&self.client).await, before, "the recovering sync wrote");
    }
}

/// `world`'s tenant applied once; `stages` rows stored in `table`.
async fn connected(world: World, file: TenantFile, table: &str, stages: usize) -> Tenant {
    let config = world.tenant(&file);
    succeeded(&apply_tenant(&world.ctx, &config).await.unwrap());
    let client = world.client().await;
    let stored: i64 = client.query_one(&format!("SELECT count(*) FROM {table}"), &[]).await.unwrap().get(0);
    assert_eq!(stored, stages as i64);
    Tenant { world, config, client }
}

async fn b24_connected(config: B24SandboxConfig) -> Tenant {
    let world = World::bitrix24_with(config).await;
    let stages = B24Sandbox::default_categories().iter().map(|c| c.stages.len()).sum();
    let file = world.file();
    connected(world, file, "bitrix24_pipeline_stages", stages).await
}

async fn amo_connected(config: AmoSandboxConfig) -> Tenant {
    let world = World::amocrm_with(config).await;
    let file = world.file_with_code();
    connected(world, file, "amocrm_pipeline_stages", 12).await
}

/// The batch paths of the sandbox's webhook, among `requests`.
fn batches(portal: &B24Sandbox, from: usize) -> usize {
    portal.requests()[from..].iter().filter(|r| r.path.ends_with("/batch")).count()
}

#[tokio::test]
async fn access_denied_inside_a_batch_is_an_error_and_no_bitrix24_stage_is_marked_removed() {
    let tenant = b24_connected(B24SandboxConfig::default()).await;
    let portal = tenant.world.portal();
    // The categories ride in the first batch with `scope` and `profile`;
    // the stages of every category make the second.
    for (method, batches_sent, command) in [("crm.category.list", 1, "list"), ("crm.status.list", 2, "c0")] {
        let before = snapshot(&tenant.client).await;
        let sent = portal.requests().len();
        portal.deny_access(&[method]);

        let applied = apply_tenant(&tenant.world.ctx, &tenant.config).await.unwrap();

        let expected = ["ACCESS_DENIED", "lacks the CRM permission to read", &format!("batch command {command}")];
        tenant.fails_keeping_everything(applied, "bitrix24", &expected).await;
        assert_eq!(snapshot(&tenant.client).await, before, "{method}: a refused list changed stored rows");
        assert_eq!(removed(&tenant.client, "bitrix24_pipeline_stages").await, 0);
        assert_eq!(batches(portal, sent), batches_sent, "{method}: a refusal is not retried: {:#?}", portal.requests());

        portal.deny_access(&[]);
        tenant.recovers_unchanged("bitrix24", &before).await;
    }
}

#[tokio::test]
async fn access_denied_for_a_whole_method_is_an_error_and_no_bitrix24_stage_is_marked_removed() {
    let tenant = b24_connected(B24SandboxConfig::default()).await;
    let portal = tenant.world.portal();
    let before = snapshot(&tenant.client).await;
    let sent = portal.requests().len();
    // A scheduled resync asks `crm.category.list` alone, not in a batch.
    portal.deny_access(&["crm.category.list"]);

    let applied = resync_stages(&tenant.world.ctx, &tenant.config).await.unwrap();

    let expected = ["ACCESS_DENIED: Access denied.", "lacks the CRM permission to read"];
    let message = tenant.fails_keeping_everything(applied, "bitrix24", &expected).await;
    assert!(!message.contains("batch command"), "{message}");
    assert_eq!(snapshot(&tenant.client).await, before);
    assert_eq!(removed(&tenant.client, "bitrix24_pipeline_stages").await, 0);
    // A refusal is not retried.
    portal.expect_requests_from(sent, [format!("POST /rest/1/{}/crm.category.list", portal.config().code)]);

    portal.deny_access(&[]);
    succeeded(&resync_stages(&tenant.world.ctx, &tenant.config).await.unwrap());
    tenant.recovers_unchanged("bitrix24", &before).await;
}

#[tokio::test]
async fn a_bitrix24_list_that_breaks_off_where_pages_were_promised_is_an_error_and_changes_nothing() {
    // Pages of 3 cut the category list (4 categories); pages of 5 fit the
    // categories but cut the default category's 8 stages.
    for (page_size, list) in [(3, "crm.category.list"), (5, "crm.status.list (DEAL_STAGE)")] {
        let tenant = b24_connected(B24SandboxConfig { page_size, ..B24SandboxConfig::default() }).await;
        let portal = tenant.world.portal();
        let before = snapshot(&tenant.client).await;
        portal.break_off_lists(true);

        let applied = apply_tenant(&tenant.world.ctx, &tenant.config).await.unwrap();

        tenant.fails_keeping_everything(applied, "bitrix24", &["incomplete list", list, "came back empty"]).await;
        assert_eq!(snapshot(&tenant.client).await, before, "pages of {page_size}");
        assert_eq!(removed(&tenant.client, "bitrix24_pipeline_stages").await, 0);

        portal.break_off_lists(false);
        tenant.recovers_unchanged("bitrix24", &before).await;
    }
}

#[tokio::test]
async fn amocrm_pages_past_the_cap_are_an_error_and_change_nothing() {
    let tenant = amo_connected(AmoSandboxConfig::default()).await;
    let amo = tenant.world.amo();
    let before = snapshot(&tenant.client).await;
    let sent = amo.requests().len();
    amo.set_endless_pipeline_pages(true);

    let applied = apply_tenant(&tenant.world.ctx, &tenant.config).await.unwrap();

    let expected = ["incomplete list", &format!("did not end within {AMO_PAGE_CAP} pages")];
    tenant.fails_keeping_everything(applied, "amocrm", &expected).await;
    assert_eq!(snapshot(&tenant.client).await, before);
    assert_eq!(removed(&tenant.client, "amocrm_pipeline_stages").await, 0);
    let pages = amo.requests()[sent..].iter().filter(|r| r.path == PIPELINES_PATH).count();
    assert_eq!(pages, AMO_PAGE_CAP, "pages followed up to the cap, not past it");

    amo.set_endless_pipeline_pages(false);
    tenant.recovers_unchanged("amocrm", &before).await;
}

#[tokio::test]
async fn an_empty_amocrm_answer_where_pipelines_were_promised_is_an_error_and_changes_nothing() {
    // One pipeline a page: the second page is promised by `_links.next`.
    let tenant = amo_connected(AmoSandboxConfig { pipelines_page_size: Some(1), ..Default::default() }).await;
    let amo = tenant.world.amo();
    let empty = Fault::Status { status: 204, content_type: "", body: String::new() };
    let cases = [
        // The first page through, the promised second one empty.
        (vec![Fault::Delay(std::time::Duration::ZERO), empty.clone()], "page 2", 2),
        // No pipeline at all: every account has at least one.
        (vec![empty], "lists no pipelines", 1),
    ];
    for (faults, expected, pages_sent) in cases {
        let before = snapshot(&tenant.client).await;
        let sent = amo.requests().len();
        for fault in faults {
            amo.faults().inject(PIPELINES_PATH, fault, 1);
        }

        let applied = apply_tenant(&tenant.world.ctx, &tenant.config).await.unwrap();

        tenant.fails_keeping_everything(applied, "amocrm", &["incomplete list", expected]).await;
        assert_eq!(snapshot(&tenant.client).await, before, "{expected}");
        assert_eq!(removed(&tenant.client, "amocrm_pipeline_stages").await, 0);
        let pages = amo.requests()[sent..].iter().filter(|r| r.path == PIPELINES_PATH).count();
        assert_eq!(pages, pages_sent, "{expected}: not retried");

        tenant.recovers_unchanged("amocrm", &before).await;
    }
}
