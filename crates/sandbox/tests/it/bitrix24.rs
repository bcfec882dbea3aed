//! The Bitrix24 sandbox as a client sees it over HTTP: webhook credentials,
//! the three ways of passing parameters, pipelines and stages, paging,
//! `batch`, both limits, a renamed portal, a user without read rights,
//! lists that break off, and injected faults.

use std::time::{Duration, Instant};

use crm_connect_sandbox::bitrix24::{
    B24Category, B24Sandbox, B24SandboxConfig, B24Stage, BlockedCommandTime, query_limit_exceeded,
};
use crm_connect_sandbox::faults::Fault;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

/// Most tests make more than 50 quick calls in all; only the bucket tests
/// keep it.
fn unlimited() -> B24SandboxConfig {
    B24SandboxConfig { bucket_capacity: 0, ..B24SandboxConfig::default() }
}

async fn sandbox(config: B24SandboxConfig) -> B24Sandbox {
    B24Sandbox::start(config).await.unwrap()
}

/// Never follows redirects, so a 302 is what the test sees.
fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn status_and_json(answer: reqwest::Response) -> (u16, Value) {
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

/// Calls `method` with a JSON body, the recommended way.
async fn call(sandbox: &B24Sandbox, method: &str, params: Value) -> (u16, Value) {
    let url = format!("{}{method}", sandbox.webhook_url());
    status_and_json(client().post(url).json(&params).send().await.unwrap()).await
}

async fn post_form(url: String, form: &[(&str, &str)]) -> (u16, Value) {
    let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let answer =
        client().post(url).header(CONTENT_TYPE, "application/x-www-form-urlencoded").body(body).send().await.unwrap();
    status_and_json(answer).await
}

fn status_ids(rows: &Value) -> Vec<&str> {
    rows.as_array().unwrap().iter().map(|row| row["STATUS_ID"].as_str().unwrap()).collect()
}

fn row<'a>(rows: &'a Value, status_id: &str) -> &'a Value {
    rows.as_array().unwrap().iter().find(|row| row["STATUS_ID"] == status_id).unwrap()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn invalid_credentials() -> Value {
    json!({ "error": "INVALID_CREDENTIALS", "error_description": "Invalid request credentials" })
}

fn many_categories(count: i32) -> Vec<B24Category> {
    let default = B24Sandbox::default_categories().remove(0);
    let mut categories = vec![default];
    categories.extend((1..count).map(|id| B24Category {
        id,
        name: format!("Воронка {id}"),
        sort: 100 + id * 10,
        stages: vec![B24Stage {
            status_id: format!("C{id}:NEW"),
            name: "Новая".to_owned(),
            sort: 10,
            semantics: None,
            extra_semantics: "process".to_owned(),
            color: "#39A8EF".to_owned(),
        }],
    }));
    categories
}

#[tokio::test]
async fn a_wrong_code_a_wrong_user_or_a_missing_user_id_is_invalid_credentials() {
    let sandbox = sandbox(unlimited()).await;
    let base = sandbox.base_url();
    let code = &sandbox.config().code;

    for path in [
        "/rest/1/wrongcode/scope".to_owned(),
        format!("/rest/2/{code}/scope"),
        format!("/rest/{code}/scope"),
        "/rest/scope".to_owned(),
    ] {
        let (status, body) = status_and_json(client().post(format!("{base}{path}")).send().await.unwrap()).await;
        assert_eq!((status, &body), (401, &invalid_credentials()), "{path}");
    }
    let (status, body) = call(&sandbox, "scope", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"], json!(["crm", "task", "user"]));
}

#[tokio::test]
async fn an_unknown_method_is_a_404_method_not_found() {
    let sandbox = sandbox(unlimited()).await;

    let (status, body) = call(&sandbox, "crm.deal.teleport", json!({})).await;

    assert_eq!(status, 404);
    assert_eq!(body, json!({ "error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!" }));
}

#[tokio::test]
async fn a_method_answers_the_same_with_or_without_the_json_suffix() {
    let sandbox = sandbox(unlimited()).await;

    let (plain_status, plain) = call(&sandbox, "crm.category.list", json!({ "entityTypeId": 2 })).await;
    let (suffixed_status, suffixed) = call(&sandbox, "crm.category.list.json", json!({ "entityTypeId": 2 })).await;

    assert_eq!((plain_status, suffixed_status), (200, 200));
    assert_eq!(plain["result"], suffixed["result"]);
    assert_eq!(plain["total"], 4);
}

#[tokio::test]
async fn a_status_filter_works_from_json_from_a_form_and_from_the_query_string() {
    let sandbox = sandbox(unlimited()).await;
    let url = format!("{}crm.status.list", sandbox.webhook_url());

    let (_, from_json) = call(&sandbox, "crm.status.list", json!({ "filter": { "ENTITY_ID": "DEAL_STAGE_1" } })).await;
    let (_, from_form) = post_form(url.clone(), &[("filter[ENTITY_ID]", "DEAL_STAGE_1")]).await;
    let answer = client().get(format!("{url}?filter%5BENTITY_ID%5D=DEAL_STAGE_1")).send().await.unwrap();
    let (query_status, from_query) = status_and_json(answer).await;

    assert_eq!(query_status, 200);
    let expected = ["C1:NEW", "C1:PREPARATION", "C1:EXECUTING", "C1:WON", "C1:LOSE"];
    for answer in [&from_json, &from_form, &from_query] {
        assert_eq!(status_ids(&answer["result"]), expected);
        assert_eq!(answer["total"], 5);
    }
    assert_eq!(from_json["result"], from_form["result"]);
    assert_eq!(from_json["result"], from_query["result"]);
}

#[tokio::test]
async fn every_answer_carries_a_time_block_in_portal_time() {
    let sandbox = sandbox(unlimited()).await;
    let before = unix_now();

    let (status, body) = call(&sandbox, "server.time", json!({})).await;

    assert_eq!(status, 200);
    let time = &body["time"];
    let start = time["start"].as_f64().unwrap();
    assert!((start - before).abs() < 5.0, "{time}");
    assert!(time["finish"].as_f64().unwrap() >= start);
    assert!(time["duration"].is_f64() && time["processing"].is_f64() && time["operating"].is_number());
    assert!(time["operating_reset_at"].is_i64());
    for date in [&body["result"], &time["date_start"], &time["date_finish"]] {
        let date = date.as_str().unwrap();
        assert!(date.ends_with("+03:00") && date.len() == 25, "{date}");
    }
}

#[tokio::test]
async fn the_category_list_includes_the_default_pipeline_and_the_deprecated_list_omits_it() {
    let sandbox = sandbox(unlimited()).await;

    let (_, newer) = call(&sandbox, "crm.category.list", json!({ "entityTypeId": 2 })).await;
    let (_, older) = call(&sandbox, "crm.dealcategory.list", json!({})).await;
    let (_, default) = call(&sandbox, "crm.dealcategory.default.get", json!({})).await;

    let categories = newer["result"]["categories"].as_array().unwrap();
    assert_eq!(categories.len(), 4);
    assert_eq!(categories[0], json!({ "id": 0, "name": "Общее", "sort": 100, "entityTypeId": 2, "isDefault": "Y" }));
    assert_eq!(categories[1]["isDefault"], "N");
    assert_eq!(categories[2]["name"], "Partners' deals");
    let older_rows = older["result"].as_array().unwrap();
    assert_eq!(older["total"], 3);
    let ids: Vec<&str> = older_rows.iter().map(|row| row["ID"].as_str().unwrap()).collect();
    assert_eq!(ids, ["1", "2", "3"]);
    assert_eq!(older_rows[0]["SORT"], "200");
    assert_eq!(older_rows[0]["IS_LOCKED"], "N");
    assert!(older_rows[0]["CREATED_DATE"].is_string());
    assert_eq!(default["result"], json!({ "ID": 0, "NAME": "Общее" }));
}

#[tokio::test]
async fn the_category_list_needs_the_deal_entity_type() {
    let sandbox = sandbox(unlimited()).await;

    for params in [json!({}), json!({ "entityTypeId": 1 }), json!({ "entityTypeId": "nonsense" })] {
        let (status, body) = call(&sandbox, "crm.category.list", params).await;
        assert_eq!(status, 400);
        assert_eq!(body, json!({ "error": "NOT_FOUND", "error_description": "Smart process not found" }));
    }
    assert_eq!(call(&sandbox, "crm.category.list", json!({ "entityTypeId": "2" })).await.0, 200);
}

#[tokio::test]
async fn lists_come_in_pages_of_fifty_continued_with_start() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.set_categories(many_categories(60));

    let (_, first) = call(&sandbox, "crm.category.list", json!({ "entityTypeId": 2 })).await;
    let (_, second) = call(&sandbox, "crm.category.list", json!({ "entityTypeId": 2, "start": first["next"] })).await;
    let (_, older_first) = call(&sandbox, "crm.dealcategory.list", json!({})).await;
    let older_url = format!("{}crm.dealcategory.list", sandbox.webhook_url());
    let (_, older_second) = post_form(older_url, &[("start", "50")]).await;

    assert_eq!(first["result"]["categories"].as_array().unwrap().len(), 50);
    assert_eq!((&first["total"], &first["next"]), (&json!(60), &json!(50)));
    let rest = second["result"]["categories"].as_array().unwrap();
    assert_eq!(rest.len(), 10);
    assert_eq!(rest[9]["id"], 59);
    assert_eq!(second["total"], 60);
    assert!(second.get("next").is_none());
    assert_eq!(older_first["result"].as_array().unwrap().len(), 50);
    assert_eq!((&older_first["total"], &older_first["next"]), (&json!(59), &json!(50)));
    assert_eq!(older_second["result"].as_array().unwrap().len(), 9);
    assert!(older_second.get("next").is_none());
}

#[tokio::test]
async fn status_lists_are_paged_too() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.set_categories(many_categories(60));

    let (_, first) = call(&sandbox, "crm.status.list", json!({})).await;
    let (_, second) = call(&sandbox, "crm.status.list", json!({ "start": 50 })).await;

    // 5 lead statuses, 8 default stages and one stage in each of 59 others.
    assert_eq!(first["total"], 72);
    assert_eq!(first["next"], 50);
    assert_eq!(second["result"].as_array().unwrap().len(), 22);
    assert!(second.get("next").is_none());
}

#[tokio::test]
async fn default_pipeline_stages_carry_semantics_extra_and_string_sorts() {
    let sandbox = sandbox(unlimited()).await;

    let (status, body) = call(&sandbox, "crm.status.list", json!({ "filter": { "ENTITY_ID": "DEAL_STAGE" } })).await;

    assert_eq!(status, 200);
    let rows = &body["result"];
    assert_eq!(
        status_ids(rows),
        ["NEW", "PREPARATION", "PREPAYMENT_INVOICE", "EXECUTING", "FINAL_INVOICE", "WON", "LOSE", "APOLOGY"]
    );
    assert_eq!(body["total"], 8);
    let new = row(rows, "NEW");
    assert_eq!(new["ENTITY_ID"], "DEAL_STAGE");
    assert_eq!(new["CATEGORY_ID"], Value::Null);
    assert_eq!(new["SORT"], "10");
    assert_eq!(new["NAME"], "Новая");
    assert_eq!(new["SEMANTICS"], Value::Null);
    assert_eq!(new["EXTRA"]["SEMANTICS"], "process");
    assert_eq!(new["EXTRA"]["COLOR"], new["COLOR"]);
    assert!(new["ID"].as_str().unwrap().parse::<u32>().is_ok());
    assert_eq!(
        (&row(rows, "WON")["SEMANTICS"], &row(rows, "WON")["EXTRA"]["SEMANTICS"]),
        (&json!("S"), &json!("success"))
    );
    assert_eq!(
        (&row(rows, "LOSE")["SEMANTICS"], &row(rows, "LOSE")["EXTRA"]["SEMANTICS"]),
        (&json!("F"), &json!("failure"))
    );
    let apology = row(rows, "APOLOGY");
    assert_eq!((&apology["SEMANTICS"], &apology["EXTRA"]["SEMANTICS"]), (&json!("F"), &json!("apology")));
    let ids: std::collections::HashSet<&str> =
        rows.as_array().unwrap().iter().map(|row| row["ID"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 8);
}

#[tokio::test]
async fn other_pipelines_stages_name_their_category_and_there_is_no_deal_stage_0() {
    let sandbox = sandbox(unlimited()).await;

    let (_, partners) = call(&sandbox, "crm.status.list", json!({ "filter": { "ENTITY_ID": "DEAL_STAGE_2" } })).await;
    let (status, zero) = call(&sandbox, "crm.status.list", json!({ "filter": { "ENTITY_ID": "DEAL_STAGE_0" } })).await;

    let rows = &partners["result"];
    assert_eq!(status_ids(rows), ["C2:NEW", "C2:UC_LAFJPE", "C2:WON", "C2:LOSE", "C2:APOLOGY"]);
    let custom = row(rows, "C2:UC_LAFJPE");
    assert_eq!(custom["NAME"], "Customer's \"yes\" 🎉");
    assert_eq!(custom["CATEGORY_ID"], "2");
    assert_eq!(custom["SORT"], "20");
    assert_eq!(custom["ENTITY_ID"], "DEAL_STAGE_2");
    assert_eq!(row(rows, "C2:APOLOGY")["EXTRA"]["SEMANTICS"], "apology");
    assert_eq!(row(rows, "C2:APOLOGY")["SEMANTICS"], "F");
    assert_eq!(status, 200);
    assert_eq!((&zero["result"], &zero["total"]), (&json!([]), &json!(0)));
}

#[tokio::test]
async fn lead_statuses_are_the_status_entity() {
    let sandbox = sandbox(unlimited()).await;

    let (_, body) = call(&sandbox, "crm.status.list", json!({ "filter": { "ENTITY_ID": "STATUS" } })).await;

    let rows = &body["result"];
    assert_eq!(status_ids(rows), ["NEW", "IN_PROCESS", "PROCESSED", "CONVERTED", "JUNK"]);
    assert_eq!(
        (&row(rows, "JUNK")["SEMANTICS"], &row(rows, "JUNK")["EXTRA"]["SEMANTICS"]),
        (&json!("F"), &json!("failure"))
    );
    assert_eq!(row(rows, "CONVERTED")["SEMANTICS"], "S");
    assert_eq!(row(rows, "NEW")["CATEGORY_ID"], Value::Null);
}

#[tokio::test]
async fn the_deprecated_stage_list_names_and_sorts_a_pipelines_stages() {
    let sandbox = sandbox(unlimited()).await;

    let (_, body) = call(&sandbox, "crm.dealcategory.stage.list", json!({ "id": 3 })).await;

    assert_eq!(body["result"][1], json!({ "NAME": "Повторный звонок", "SORT": "20", "STATUS_ID": "C3:1" }));
    assert_eq!(status_ids(&body["result"]), ["C3:NEW", "C3:1", "C3:WON", "C3:LOSE"]);
}

#[tokio::test]
async fn the_profile_names_the_webhook_user() {
    let sandbox = sandbox(B24SandboxConfig { user_id: 17, ..unlimited() }).await;
    assert!(sandbox.webhook_url().contains("/rest/17/"));

    let (status, body) = call(&sandbox, "profile", json!({})).await;

    assert_eq!(status, 200);
    assert_eq!((&body["result"]["ID"], &body["result"]["ADMIN"]), (&json!("17"), &json!(true)));
    assert_eq!(body["result"]["TIME_ZONE_OFFSET"], 10_800);
}

#[tokio::test]
async fn crm_methods_need_the_crm_scope() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.set_scopes(vec!["task".to_owned()]);

    let (status, body) = call(&sandbox, "crm.status.list", json!({})).await;
    let (_, scopes) = call(&sandbox, "scope", json!({})).await;

    assert_eq!(status, 401);
    assert_eq!(body["error"], "insufficient_scope");
    assert_eq!(scopes["result"], json!(["task"]));
}

#[tokio::test]
async fn a_deal_is_stored_and_its_id_answered_as_a_number() {
    let sandbox = sandbox(unlimited()).await;
    let fields = json!({ "TITLE": "Заявка с сайта", "CATEGORY_ID": "1", "STAGE_ID": "C1:NEW" });

    let (status, body) =
        call(&sandbox, "crm.deal.add", json!({ "fields": fields, "params": { "REGISTER_SONET_EVENT": "N" } })).await;
    let url = format!("{}crm.deal.add", sandbox.webhook_url());
    let (form_status, from_form) =
        post_form(url, &[("fields[TITLE]", "Из формы"), ("params[REGISTER_SONET_EVENT]", "N")]).await;

    assert_eq!((status, form_status), (200, 200));
    let id = body["result"].as_i64().expect("a JSON number");
    assert!(from_form["result"].is_i64());
    let deals = sandbox.deals();
    assert_eq!(deals.len(), 2);
    assert_eq!((deals[0].id, deals[0].title.as_str(), deals[0].category_id), (id, "Заявка с сайта", 1));
    assert_eq!(deals[0].stage_id.as_deref(), Some("C1:NEW"));
    assert_eq!((deals[1].title.as_str(), deals[1].category_id, deals[1].stage_id.as_deref()), ("Из формы", 0, None));
}

#[tokio::test]
async fn a_deal_in_an_unknown_category_is_a_400_with_an_empty_error_code() {
    let sandbox = sandbox(unlimited()).await;

    let (status, body) = call(&sandbox, "crm.deal.add", json!({ "fields": { "TITLE": "x", "CATEGORY_ID": 99 } })).await;

    assert_eq!(status, 400);
    assert_eq!(body, json!({ "error": "", "error_description": "Category not found" }));
    assert!(sandbox.deals().is_empty());
}

#[tokio::test]
async fn a_lead_is_stored_and_its_id_answered() {
    let sandbox = sandbox(unlimited()).await;

    let (status, body) = call(&sandbox, "crm.lead.add", json!({ "fields": { "TITLE": "Лид с сайта" } })).await;

    assert_eq!(status, 200);
    let leads = sandbox.leads();
    assert_eq!(leads.len(), 1);
    assert_eq!((body["result"].as_i64(), leads[0].title.as_str()), (Some(leads[0].id), "Лид с сайта"));
}

#[tokio::test]
async fn a_batch_answers_every_command_in_one_envelope_with_empty_maps_as_arrays() {
    let sandbox = sandbox(unlimited()).await;
    let cmd = json!({
        "categories": "crm.dealcategory.list",
        "sales": "crm.status.list?filter%5BENTITY_ID%5D=DEAL_STAGE_1",
        "partners": "crm.status.list?filter[ENTITY_ID]=DEAL_STAGE_2",
        "time": "server.time",
    });
    let url = format!("{}batch", sandbox.webhook_url());

    let answer = client().post(url).json(&json!({ "halt": 0, "cmd": cmd })).send().await.unwrap();

    assert_eq!(answer.status(), 200);
    let text = answer.text().await.unwrap();
    assert!(text.contains(r#""result_error":[]"#), "{text}");
    assert!(text.contains(r#""result_next":[]"#), "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let batch = &body["result"];
    assert_eq!(batch["result"]["categories"].as_array().unwrap().len(), 3);
    assert_eq!(status_ids(&batch["result"]["sales"])[0], "C1:NEW");
    assert_eq!(status_ids(&batch["result"]["partners"])[1], "C2:UC_LAFJPE");
    assert!(batch["result"]["time"].is_string());
    assert_eq!(batch["result_total"], json!({ "categories": 3, "sales": 5, "partners": 5 }));
    for key in ["categories", "sales", "partners", "time"] {
        assert!(batch["result_time"][key]["operating_reset_at"].is_i64(), "{key}");
    }
    assert!(body["time"]["start"].is_f64());
}

#[tokio::test]
async fn a_failing_command_shows_up_in_result_error_and_the_batch_is_still_a_200() {
    let sandbox = sandbox(unlimited()).await;
    let cmd = json!({
        "bad": "crm.deal.add?fields[TITLE]=x&fields[CATEGORY_ID]=99",
        "missing": "crm.nothing.here",
        "good": "crm.deal.add?fields[TITLE]=y",
    });

    let (status, body) = call(&sandbox, "batch", json!({ "halt": 0, "cmd": cmd })).await;

    assert_eq!(status, 200);
    let batch = &body["result"];
    assert_eq!(batch["result_error"]["bad"], json!({ "error": "", "error_description": "Category not found" }));
    assert_eq!(batch["result_error"]["missing"]["error"], "ERROR_METHOD_NOT_FOUND");
    assert!(batch["result"]["good"].is_i64());
    assert_eq!(sandbox.deals().len(), 1);
}

#[tokio::test]
async fn batch_commands_run_and_answer_in_the_order_sent() {
    let sandbox = sandbox(unlimited()).await;
    let body = r#"{"halt":0,"cmd":{"zeta":"crm.deal.add?fields[TITLE]=z","alpha":"crm.deal.add?fields[TITLE]=a","mid":"crm.deal.add?fields[TITLE]=m"}}"#;
    let form = [("cmd[zeta]", "crm.lead.add?fields[TITLE]=z"), ("cmd[alpha]", "crm.lead.add?fields[TITLE]=a")];

    let answer = client()
        .post(format!("{}batch", sandbox.webhook_url()))
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let text = answer.text().await.unwrap();
    post_form(format!("{}batch", sandbox.webhook_url()), &form).await;

    let titles: Vec<String> = sandbox.deals().into_iter().map(|deal| deal.title).collect();
    assert_eq!(titles, ["z", "a", "m"]);
    assert!(text.contains(r#""result":{"zeta":1,"alpha":2,"mid":3}"#), "{text}");
    let lead_titles: Vec<String> = sandbox.leads().into_iter().map(|lead| lead.title).collect();
    assert_eq!(lead_titles, ["z", "a"]);
}

#[tokio::test]
async fn halt_stops_a_batch_at_the_first_failing_command() {
    let sandbox = sandbox(unlimited()).await;
    let url = format!("{}batch", sandbox.webhook_url());

    let (status, body) = post_form(
        url,
        &[
            ("halt", "1"),
            ("cmd[0]", "crm.deal.add?fields[TITLE]=first"),
            ("cmd[1]", "crm.deal.add?fields[CATEGORY_ID]=99"),
            ("cmd[2]", "crm.deal.add?fields[TITLE]=never"),
        ],
    )
    .await;

    assert_eq!(status, 200);
    let batch = &body["result"];
    // Keys 0, 1… make PHP lists; a single failure at key 1 is a map.
    assert_eq!(batch["result"].as_array().unwrap().len(), 1);
    assert_eq!(batch["result_error"]["1"]["error_description"], "Category not found");
    let titles: Vec<String> = sandbox.deals().into_iter().map(|deal| deal.title).collect();
    assert_eq!(titles, ["first"]);
}

#[tokio::test]
async fn fifty_one_commands_exceed_the_batch_length() {
    let sandbox = sandbox(unlimited()).await;
    let cmd: serde_json::Map<String, Value> = (0..51).map(|index| (format!("c{index}"), json!("scope"))).collect();

    let (status, body) = call(&sandbox, "batch", json!({ "cmd": cmd })).await;
    let fifty: serde_json::Map<String, Value> = (0..50).map(|index| (format!("c{index}"), json!("scope"))).collect();
    let (fifty_status, _) = call(&sandbox, "batch", json!({ "cmd": fifty })).await;

    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({ "error": "ERROR_BATCH_LENGTH_EXCEEDED", "error_description": "Max batch length exceeded" })
    );
    assert_eq!(fifty_status, 200);
}

#[tokio::test]
async fn a_batch_inside_a_batch_is_a_405() {
    let sandbox = sandbox(unlimited()).await;
    let cmd = json!({ "ok": "scope", "nested": "batch?cmd[a]=scope" });

    let (status, body) = call(&sandbox, "batch", json!({ "cmd": cmd })).await;

    assert_eq!(status, 405);
    assert_eq!(
        body,
        json!({ "error": "ERROR_BATCH_METHOD_NOT_ALLOWED", "error_description": "Method is not allowed for batch usage" })
    );
}

#[tokio::test]
async fn a_batch_takes_one_unit_of_the_bucket() {
    let sandbox =
        sandbox(B24SandboxConfig { bucket_capacity: 3, drain_per_sec: 0.0, ..B24SandboxConfig::default() }).await;
    let cmd: serde_json::Map<String, Value> = (0..50).map(|index| (format!("c{index}"), json!("scope"))).collect();

    let (batch_status, _) = call(&sandbox, "batch", json!({ "cmd": cmd })).await;
    let second = call(&sandbox, "scope", json!({})).await.0;
    let third = call(&sandbox, "scope", json!({})).await.0;
    let (fourth, refused) = call(&sandbox, "scope", json!({})).await;

    assert_eq!((batch_status, second, third, fourth), (200, 200, 200, 503));
    assert_eq!(refused["error"], "QUERY_LIMIT_EXCEEDED");
    assert_eq!(sandbox.violations(), 1);
}

#[tokio::test]
async fn fifty_five_quick_requests_leave_five_violations() {
    let sandbox = sandbox(B24SandboxConfig::default()).await;
    let url = format!("{}server.time", sandbox.webhook_url());
    let client = client();

    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..55 {
        let answer = client.get(&url).send().await.unwrap();
        statuses.push(answer.status().as_u16());
        if answer.status() == 503 {
            refused = Some(answer);
        }
    }

    assert_eq!(statuses.iter().filter(|status| **status == 503).count(), 5, "{statuses:?}");
    assert!(statuses[..50].iter().all(|status| *status == 200), "{statuses:?}");
    assert_eq!(sandbox.violations(), 5);
    let refused = refused.unwrap();
    assert!(refused.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("application/json"));
    assert_eq!(
        refused.json::<Value>().await.unwrap(),
        json!({ "error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests" })
    );
}

#[tokio::test]
async fn a_refused_client_gets_through_once_the_bucket_drains() {
    let sandbox =
        sandbox(B24SandboxConfig { bucket_capacity: 2, drain_per_sec: 20.0, ..B24SandboxConfig::default() }).await;

    let mut quick = Vec::new();
    for _ in 0..3 {
        quick.push(call(&sandbox, "scope", json!({})).await.0);
    }
    // Pacing, not synchronisation: one request leaks out every 50 ms.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let paced = call(&sandbox, "scope", json!({})).await.0;

    assert_eq!(quick.last(), Some(&503), "{quick:?}");
    assert_eq!(paced, 200);
    assert_eq!(sandbox.violations(), 1);
}

#[tokio::test]
async fn a_blocked_method_answers_operation_time_limit_until_its_reset() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.block_method("crm.status.list", Duration::from_secs(60));
    let before = unix_now();

    let (status, body) = call(&sandbox, "crm.status.list", json!({})).await;
    let (suffixed, _) = call(&sandbox, "CRM.STATUS.LIST.json", json!({})).await;
    let (other, _) = call(&sandbox, "crm.dealcategory.list", json!({})).await;
    let (_, in_batch) = call(&sandbox, "batch", json!({ "cmd": { "s": "crm.status.list" } })).await;
    sandbox.advance_clock(Duration::from_secs(61));
    let (after, _) = call(&sandbox, "crm.status.list", json!({})).await;

    assert_eq!(status, 429);
    assert_eq!(body["error"], "OPERATION_TIME_LIMIT");
    assert_eq!(body["error_description"], "Method is blocked due to operation time limit.");
    let reset_at = body["time"]["operating_reset_at"].as_f64().unwrap();
    assert!((reset_at - (before + 60.0)).abs() < 5.0, "{reset_at} vs {before}");
    assert_eq!((suffixed, other), (429, 200));
    assert_eq!(in_batch["result"]["result_error"]["s"]["error"], "OPERATION_TIME_LIMIT");
    assert_eq!(after, 200);
}

#[tokio::test]
async fn a_blocked_command_can_carry_its_reset_time_only_in_the_batchs_outer_time() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.block_method("crm.status.list", Duration::from_secs(60));
    sandbox.set_blocked_command_time(BlockedCommandTime::Outer);
    let before = unix_now();
    let url = format!("{}batch", sandbox.webhook_url());

    let (_, both) = call(&sandbox, "batch", json!({ "cmd": { "s": "crm.status.list", "t": "server.time" } })).await;
    let alone = client().post(url).json(&json!({ "cmd": { "s": "crm.status.list" } })).send().await.unwrap();
    let alone_text = alone.text().await.unwrap();

    assert_eq!(both["result"]["result_error"]["s"]["error"], "OPERATION_TIME_LIMIT");
    assert!(both["result"]["result_time"].get("s").is_none(), "{both}");
    assert!(both["result"]["result_time"]["t"]["operating_reset_at"].is_i64(), "{both}");
    let outer = both["time"]["operating_reset_at"].as_f64().unwrap();
    assert!((outer - (before + 60.0)).abs() < 5.0, "{outer} vs {before}");
    assert!(alone_text.contains(r#""result_time":[]"#), "{alone_text}");
}

#[tokio::test]
async fn a_user_without_read_rights_is_denied_alone_and_inside_a_batch() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.deny_access(&["crm.category.list", "CRM.STATUS.LIST.json"]);
    let denied = json!({ "error": "ACCESS_DENIED", "error_description": "Access denied." });

    let alone = call(&sandbox, "crm.status.list", json!({ "filter": { "ENTITY_ID": "DEAL_STAGE" } })).await;
    let cmd = json!({ "scope": "scope", "list": "crm.category.list?entityTypeId=2" });
    let (batch_status, batch) = call(&sandbox, "batch", json!({ "halt": 0, "cmd": cmd })).await;
    let other = call(&sandbox, "crm.dealcategory.list", json!({})).await.0;
    sandbox.deny_access(&[]);
    let lifted = call(&sandbox, "crm.status.list", json!({})).await.0;

    assert_eq!(alone, (400, denied.clone()));
    assert_eq!(batch_status, 200);
    assert_eq!(batch["result"]["result_error"]["list"], denied);
    assert_eq!(batch["result"]["result"]["scope"], json!(["crm", "task", "user"]));
    assert_eq!((other, lifted), (200, 200));
}

#[tokio::test]
async fn lists_that_break_off_answer_later_pages_empty_with_the_full_total() {
    let sandbox = sandbox(B24SandboxConfig { page_size: 3, ..unlimited() }).await;
    let filter = json!({ "ENTITY_ID": "DEAL_STAGE" });

    let (_, first) = call(&sandbox, "crm.status.list", json!({ "filter": filter })).await;
    sandbox.break_off_lists(true);
    let (_, again) = call(&sandbox, "crm.status.list", json!({ "filter": filter })).await;
    let (_, second) = call(&sandbox, "crm.status.list", json!({ "filter": filter, "start": first["next"] })).await;
    let (_, categories) = call(&sandbox, "crm.category.list", json!({ "entityTypeId": 2, "start": 3 })).await;
    sandbox.break_off_lists(false);
    let (_, whole) = call(&sandbox, "crm.status.list", json!({ "filter": filter, "start": 6 })).await;

    assert_eq!(status_ids(&first["result"]), ["NEW", "PREPARATION", "PREPAYMENT_INVOICE"]);
    assert_eq!((&first["total"], &first["next"]), (&json!(8), &json!(3)));
    assert_eq!(again["result"], first["result"], "the first page is whole");
    assert_eq!(second["result"], json!([]));
    assert_eq!(second["total"], 8);
    assert!(second.get("next").is_none(), "{second}");
    assert_eq!((&categories["result"], &categories["total"]), (&json!({ "categories": [] }), &json!(4)));
    assert_eq!(status_ids(&whole["result"]), ["LOSE", "APOLOGY"]);
}

#[tokio::test]
async fn a_method_past_its_operating_budget_is_blocked_for_the_rest_of_the_window() {
    let config = B24SandboxConfig {
        operating_cost: Duration::from_secs(100),
        operating_budget: Duration::from_secs(250),
        ..unlimited()
    };
    let sandbox = sandbox(config).await;

    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(call(&sandbox, "crm.dealcategory.list", json!({})).await);
    }
    let (other, _) = call(&sandbox, "crm.status.list", json!({})).await;
    sandbox.advance_clock(Duration::from_secs(601));
    let (after, _) = call(&sandbox, "crm.dealcategory.list", json!({})).await;

    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(answers[1].1["time"]["operating"], 200.0);
    let first_reset = answers[0].1["time"]["operating_reset_at"].as_i64().unwrap();
    assert_eq!(answers[3].1["time"]["operating_reset_at"], first_reset);
    assert_eq!(answers[3].1["error"], "OPERATION_TIME_LIMIT");
    assert_eq!((other, after), (200, 200));
}

#[tokio::test]
async fn a_renamed_portal_redirects_to_its_new_address_which_serves_posts() {
    let sandbox = sandbox(unlimited()).await;
    let path = format!("/rest/1/{}/crm.status.list", sandbox.config().code);
    assert_eq!(client().post(format!("{}{path}", sandbox.base_url())).send().await.unwrap().status(), 200);

    sandbox.rename_portal();
    let old = client()
        .post(format!("{}{path}?filter%5BENTITY_ID%5D=STATUS", sandbox.base_url()))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let again = client().get(format!("{}{path}", sandbox.base_url())).send().await.unwrap();

    assert_eq!(old.status(), 302);
    let location = old.headers()[LOCATION].to_str().unwrap().to_owned();
    assert_eq!(location, format!("{}{path}?filter%5BENTITY_ID%5D=STATUS", sandbox.new_base_url()));
    assert_ne!(sandbox.new_base_url(), sandbox.base_url());
    assert_eq!(again.status(), 302);
    let moved = client().post(&location).json(&json!({ "start": 0 })).send().await.unwrap();
    let (status, body) = status_and_json(moved).await;
    assert_eq!(status, 200);
    assert_eq!(body["total"], 5);
    let statuses: Vec<u16> = sandbox.requests().iter().map(|request| request.status).collect();
    assert_eq!(statuses, [200, 302, 302, 200]);
}

#[tokio::test]
async fn injected_bitrix_faults_answer_before_the_portal() {
    let sandbox = sandbox(B24SandboxConfig::default()).await;
    let prefix = format!("/rest/1/{}/crm.status.list", sandbox.config().code);
    sandbox.faults().inject(&prefix, query_limit_exceeded(), 2);
    sandbox.faults().inject("/rest/", Fault::server_error(), 1);

    let (first, body) = call(&sandbox, "crm.status.list", json!({})).await;
    let elsewhere = client().post(format!("{}scope", sandbox.webhook_url())).send().await.unwrap().status();
    let (second, _) = call(&sandbox, "crm.status.list", json!({})).await;
    let (third, _) = call(&sandbox, "crm.status.list", json!({})).await;

    assert_eq!(first, 503);
    assert_eq!(body, json!({ "error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests" }));
    assert_eq!(elsewhere, 503);
    assert_eq!((second, third), (503, 200));
    assert_eq!(sandbox.violations(), 0);
}

#[tokio::test]
async fn a_dropped_connection_and_a_delay_are_awaited_without_sleeping() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.faults().inject("/rest/", Fault::DropConnection, 1);
    sandbox.faults().inject("/rest/", Fault::Delay(Duration::from_millis(100)), 1);
    let url = format!("{}server.time", sandbox.webhook_url());

    let dropped = client().get(&url).send().await;
    let started = Instant::now();
    let background = tokio::spawn(async move { client().get(url).send().await });
    let seen = sandbox.wait_for_requests(|log| log.iter().any(|request| request.status == 200), WAIT).await;

    assert!(dropped.expect_err("no HTTP response").status().is_none());
    assert!(seen);
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(background.await.unwrap().unwrap().status(), 200);
    let statuses: Vec<u16> = sandbox.requests().iter().map(|request| request.status).collect();
    assert_eq!(statuses, [0, 200]);
}

#[tokio::test]
async fn a_malformed_json_body_is_a_400_not_a_crash() {
    let sandbox = sandbox(unlimited()).await;
    let url = format!("{}crm.deal.add", sandbox.webhook_url());

    let answer = client().post(&url).header(CONTENT_TYPE, "application/json").body("{not json").send().await.unwrap();
    let deep = format!("fields{}", "[a]".repeat(10_000));
    let (deep_status, _) = post_form(url, &[(deep.as_str(), "x")]).await;

    assert_eq!(answer.status(), 400);
    assert!(answer.json::<Value>().await.unwrap()["error_description"].is_string());
    assert_eq!(deep_status, 400);
    assert_eq!(call(&sandbox, "scope", json!({})).await.0, 200);
}
