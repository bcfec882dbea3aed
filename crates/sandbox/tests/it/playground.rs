//! The playground's own pieces: the request scenarios the sandboxes check
//! and the tenant files the builder writes.

use crm_connect_sandbox::amocrm::AmoSandboxConfig;
use crm_connect_sandbox::bitrix24::B24SandboxConfig;
use crm_connect_sandbox::playground::Playground;
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};

async fn both() -> Playground {
    Playground::builder("crm-connect-sandbox-test-")
        .amocrm(AmoSandboxConfig::default())
        .bitrix24(B24SandboxConfig::default())
        .start()
        .await
        .expect("the playground starts")
}

async fn get(url: String) {
    reqwest::get(url).await.expect("an answer");
}

#[tokio::test]
async fn expect_requests_passes_on_the_sequence_received() {
    let playground = both().await;
    let amo = playground.amocrm();
    amo.expect_requests::<&str>([]);
    get(format!("{}/api/v4/account", amo.base_url())).await;
    get(format!("{}/api/v4/leads/pipelines?page=2", amo.base_url())).await;
    amo.expect_requests(["GET /api/v4/account", "GET /api/v4/leads/pipelines"]);
    amo.expect_requests_from(1, ["GET /api/v4/leads/pipelines"]);
    let portal = playground.bitrix24();
    get(format!("{}profile", portal.webhook_url())).await;
    portal.expect_requests([format!("GET /rest/1/{}/profile", portal.config().code)]);
}

#[tokio::test]
#[should_panic(expected = "-  2  GET /api/v4/account\n+  2  GET /api/v4/leads/pipelines")]
async fn expect_requests_panics_with_a_diff_on_another_sequence() {
    let playground = both().await;
    let amo = playground.amocrm();
    get(format!("{}/api/v4/account", amo.base_url())).await;
    get(format!("{}/api/v4/leads/pipelines", amo.base_url())).await;
    amo.expect_requests(["GET /api/v4/account", "GET /api/v4/account"]);
}

#[tokio::test]
#[should_panic(expected = "+  1  (nothing)")]
async fn expect_requests_panics_on_a_request_that_never_came() {
    let playground = both().await;
    playground.bitrix24().expect_requests(["POST /rest/1/sandboxwebhookcode1/batch"]);
}

#[tokio::test]
async fn a_tenant_file_on_both_sandboxes_names_their_addresses_and_quotes_every_value() {
    let playground = both().await;
    let (amo, portal) = (playground.amocrm(), playground.bitrix24());
    let file = playground
        .tenant_file(Some("postgresql://postgres@127.0.0.1:5432/acme"))
        .comment("Both CRMs")
        .schedule("stage_resync", "0 0 1 1 *")
        .authorization_code("code\"1")
        .amocrm_stages("qualified", [Stage::in_pipeline("Продажи", "Квалифицирован")])
        .amocrm_stages("success", [Stage::Id(142)])
        .entity_type("deal")
        .bitrix24_stages("qualified", [Stage::status("C1:PREPARATION"), Stage::in_category("Partners' deals", "Won")]);
    let expected = format!(
        "# Both CRMs\n\
         [tenant]\n\
         database_url = \"postgresql://postgres@127.0.0.1:5432/acme\"\n\
         \n\
         [schedule]\n\
         stage_resync = \"0 0 1 1 *\"\n\
         \n\
         [amocrm]\n\
         subdomain = \"sandbox\"\n\
         client_id = \"sandbox-client-id\"\n\
         client_secret = \"sandbox-client-secret\"\n\
         redirect_uri = \"https://example.com/oauth\"\n\
         base_url = \"{}\"\n\
         authorization_code = \"code\\\"1\"\n\
         \n\
         [amocrm.stages]\n\
         qualified = [{{ pipeline = \"Продажи\", stage = \"Квалифицирован\" }}]\n\
         success = [142]\n\
         \n\
         [bitrix24]\n\
         webhook_url = \"{}\"\n\
         entity_type = \"deal\"\n\
         \n\
         [bitrix24.stages]\n\
         qualified = [\"C1:PREPARATION\", {{ category = \"Partners' deals\", stage = \"Won\" }}]\n",
        amo.base_url(),
        portal.webhook_url(),
    );
    assert_eq!(file.text(), expected);

    let path = playground.write("acme", &file).unwrap();
    assert_eq!(path, playground.dir().join("acme.toml"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
}

#[test]
fn a_key_set_again_keeps_its_place_and_a_removed_key_is_left_out() {
    let file = TenantFile::new()
        .amocrm_key("subdomain", "\"a\"")
        .amocrm_key("client_id", "\"id\"")
        .amocrm_key("subdomain", "\"b\"")
        .without_amocrm_key("client_id");
    assert_eq!(file.text(), "[amocrm]\nsubdomain = \"b\"\n");
    assert_eq!(TenantFile::new().text(), "", "no table without keys: the URL template gives the database");
}

#[tokio::test]
async fn a_replaced_file_is_never_seen_half_written_and_the_directory_goes_with_the_playground() {
    let playground = Playground::builder("crm-connect-sandbox-test-").start().await.unwrap();
    let first = TenantFile::new().slug("acme");
    playground.write("acme", &first).unwrap();
    let second = first.database_url("postgresql://h/x");
    let path = playground.replace("acme", &second).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), second.text());
    let names: Vec<_> = std::fs::read_dir(playground.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["acme.toml"], "nothing is left aside");
    let dir = playground.dir().to_path_buf();
    playground.stop().await;
    assert!(!dir.exists());
}
