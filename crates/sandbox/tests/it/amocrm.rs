//! The AmoCRM sandbox as a client sees it over HTTP: OAuth codes and
//! rotating refresh tokens, the API and its errors, the rate limit, and
//! every kind of injected fault.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig, SandboxPipeline, SandboxStatus, TokenStats};
use crm_connect_sandbox::faults::Fault;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(5);

/// Most tests make more than 7 calls a second; only the rate-limit tests
/// keep the limit.
fn unlimited() -> AmoSandboxConfig {
    AmoSandboxConfig { rate_limit_per_sec: 0, ..AmoSandboxConfig::default() }
}

async fn sandbox(config: AmoSandboxConfig) -> AmoSandbox {
    AmoSandbox::start(config).await.unwrap()
}

fn token_url(sandbox: &AmoSandbox) -> String {
    format!("{}/oauth2/access_token", sandbox.base_url())
}

fn code_request(sandbox: &AmoSandbox, code: &str) -> Value {
    let config = sandbox.config();
    json!({
        "client_id": config.client_id,
        "client_secret": config.client_secret,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": config.redirect_uri,
    })
}

fn refresh_request(sandbox: &AmoSandbox, refresh_token: &str) -> Value {
    let config = sandbox.config();
    json!({
        "client_id": config.client_id,
        "client_secret": config.client_secret,
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "redirect_uri": config.redirect_uri,
    })
}

async fn post_token(sandbox: &AmoSandbox, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(token_url(sandbox)).json(body).send().await.unwrap()
}

/// Exchanges a fresh code; returns the token answer.
async fn authorize(sandbox: &AmoSandbox) -> Value {
    let answer = post_token(sandbox, &code_request(sandbox, &sandbox.issue_code())).await;
    assert_eq!(answer.status(), 200);
    answer.json().await.unwrap()
}

async fn get(sandbox: &AmoSandbox, path: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new().get(format!("{}{path}", sandbox.base_url())).bearer_auth(token).send().await.unwrap()
}

fn content_type(response: &reqwest::Response) -> String {
    response.headers().get(CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned()
}

fn str_field<'a>(value: &'a Value, name: &str) -> &'a str {
    value[name].as_str().unwrap_or_else(|| panic!("{name} in {value}"))
}

fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn a_code_is_exchanged_once_and_its_reuse_is_a_400_problem() {
    let sandbox = sandbox(unlimited()).await;
    let code = sandbox.issue_code();

    let first = post_token(&sandbox, &code_request(&sandbox, &code)).await;
    assert_eq!(first.status(), 200);
    assert!(content_type(&first).starts_with("application/json"));
    let tokens: Value = first.json().await.unwrap();
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 86_400);
    assert!(!str_field(&tokens, "refresh_token").is_empty());
    assert!(sandbox.is_access_token_valid(str_field(&tokens, "access_token")));

    let second = post_token(&sandbox, &code_request(&sandbox, &code)).await;
    assert_eq!(second.status(), 400);
    assert_eq!(content_type(&second), "application/problem+json");
    let problem: Value = second.json().await.unwrap();
    assert_eq!(problem["title"], "Некорректный запрос");
    assert_eq!(problem["hint"], "Authorization code has been revoked");
    assert_eq!(problem["status"], 400);
    assert_eq!(problem["type"], "https://developers.amocrm.ru/v3/errors/OAuthProblemJson");
    assert_eq!(sandbox.token_stats(), TokenStats { exchanged: 1, exchange_rejected: 1, ..TokenStats::default() });
}

#[tokio::test]
async fn a_redirect_uri_with_an_extra_trailing_slash_is_an_unknown_client() {
    let sandbox = sandbox(unlimited()).await;
    let mut body = code_request(&sandbox, &sandbox.issue_code());
    body["redirect_uri"] = json!(format!("{}/", sandbox.config().redirect_uri));

    let answer = post_token(&sandbox, &body).await;

    assert_eq!(answer.status(), 401);
    assert_eq!(content_type(&answer), "application/problem+json");
    let problem: Value = answer.json().await.unwrap();
    assert_eq!(problem["title"], "Некорректный клиент");
    assert_eq!(problem["status"], 401);
    assert_eq!(problem["type"], "https://developers.amocrm.ru/v3/errors/OAuthProblemJson");
    assert!(problem["hint"].is_string() && problem["detail"].is_string());
}

#[tokio::test]
async fn a_wrong_client_secret_is_an_unknown_client() {
    let sandbox = sandbox(unlimited()).await;
    let mut body = code_request(&sandbox, &sandbox.issue_code());
    body["client_secret"] = json!("not-the-secret");

    let answer = post_token(&sandbox, &body).await;

    assert_eq!(answer.status(), 401);
    assert_eq!(answer.json::<Value>().await.unwrap()["title"], "Некорректный клиент");
}

#[tokio::test]
async fn a_code_older_than_twenty_minutes_has_expired() {
    let sandbox = sandbox(unlimited()).await;
    let code = sandbox.issue_code();
    sandbox.advance_clock(Duration::from_secs(21 * 60));

    let answer = post_token(&sandbox, &code_request(&sandbox, &code)).await;

    assert_eq!(answer.status(), 400);
    let problem: Value = answer.json().await.unwrap();
    assert_eq!(problem["hint"], "Authorization code has expired");
    assert_eq!(problem["title"], "Некорректный запрос");
}

#[tokio::test]
async fn an_unknown_code_is_a_400_problem() {
    let sandbox = sandbox(unlimited()).await;

    let answer = post_token(&sandbox, &code_request(&sandbox, "def50200made-up")).await;

    assert_eq!(answer.status(), 400);
    assert_eq!(content_type(&answer), "application/problem+json");
}

#[tokio::test]
async fn a_refresh_rotates_the_pair_and_the_old_refresh_token_is_revoked() {
    let sandbox = sandbox(unlimited()).await;
    let first = authorize(&sandbox).await;
    let old_refresh = str_field(&first, "refresh_token");

    let refreshed = post_token(&sandbox, &refresh_request(&sandbox, old_refresh)).await;
    assert_eq!(refreshed.status(), 200);
    let second: Value = refreshed.json().await.unwrap();
    assert_ne!(second["access_token"], first["access_token"]);
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_eq!(get(&sandbox, "/api/v4/account", str_field(&second, "access_token")).await.status(), 200);
    // The previous access token lives until its own expiry.
    assert_eq!(get(&sandbox, "/api/v4/account", str_field(&first, "access_token")).await.status(), 200);

    let reuse = post_token(&sandbox, &refresh_request(&sandbox, old_refresh)).await;
    assert_eq!(reuse.status(), 401);
    assert_eq!(content_type(&reuse), "application/problem+json");
    let problem: Value = reuse.json().await.unwrap();
    assert_eq!(problem["hint"], "Token has been revoked");
    assert_eq!(problem["title"], "Некорректный запрос");
    assert_eq!(problem["status"], 401);

    let next = post_token(&sandbox, &refresh_request(&sandbox, str_field(&second, "refresh_token"))).await;
    assert_eq!(next.status(), 200);
    let stats = sandbox.token_stats();
    assert_eq!((stats.exchanged, stats.refreshed, stats.refresh_rejected), (1, 2, 1));
}

#[tokio::test]
async fn a_refresh_token_expires_after_ninety_days() {
    let sandbox = sandbox(unlimited()).await;
    let tokens = authorize(&sandbox).await;
    sandbox.advance_clock(Duration::from_secs(91 * 24 * 3600));

    let answer = post_token(&sandbox, &refresh_request(&sandbox, str_field(&tokens, "refresh_token"))).await;

    assert_eq!(answer.status(), 401);
    assert_eq!(answer.json::<Value>().await.unwrap()["hint"], "Token has expired");
}

#[tokio::test]
async fn the_access_token_is_a_jwt_expiring_expires_in_after_issue() {
    let sandbox = sandbox(AmoSandboxConfig { expires_in: Duration::from_secs(3600), ..unlimited() }).await;

    let tokens = authorize(&sandbox).await;

    let access = str_field(&tokens, "access_token");
    assert_eq!(access.split('.').count(), 3);
    assert!(!access.contains('='));
    assert_eq!(jwt_part(access, 0), json!({ "typ": "JWT", "alg": "RS256" }));
    let payload = jwt_part(access, 1);
    let server_time = tokens["server_time"].as_i64().unwrap();
    assert_eq!(tokens["expires_in"], 3600);
    assert_eq!(payload["iat"].as_i64(), Some(server_time));
    assert_eq!(payload["exp"].as_i64(), Some(server_time + 3600));
    assert_eq!(payload["account_id"], 31_000_001);
    assert!(payload["jti"].is_string() && payload["sub"].is_string() && payload["nbf"].is_i64());
    assert_eq!(payload["api_domain"], "api-b.amocrm.ru");
    assert!(payload["scopes"].is_array());
}

#[tokio::test]
async fn an_access_token_stops_working_at_its_expiry() {
    let sandbox = sandbox(unlimited()).await;
    let tokens = authorize(&sandbox).await;
    let access = str_field(&tokens, "access_token");

    sandbox.advance_clock(Duration::from_secs(86_400));

    assert!(!sandbox.is_access_token_valid(access));
    assert_eq!(get(&sandbox, "/api/v4/account", access).await.status(), 401);
}

#[tokio::test]
async fn a_long_lived_token_works_until_its_expiry_and_has_no_refresh_token() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(365 * 24 * 3600));

    assert_eq!(get(&sandbox, "/api/v4/account", &token).await.status(), 200);
    let payload = jwt_part(&token, 1);
    assert_eq!(payload["exp"].as_i64().unwrap() - payload["iat"].as_i64().unwrap(), 365 * 24 * 3600);

    sandbox.advance_clock(Duration::from_secs(366 * 24 * 3600));
    assert_eq!(get(&sandbox, "/api/v4/account", &token).await.status(), 401);
}

#[tokio::test]
async fn revoked_tokens_are_refused_by_the_api_and_the_token_endpoint() {
    let sandbox = sandbox(unlimited()).await;
    let tokens = authorize(&sandbox).await;

    sandbox.revoke_all_tokens();

    assert_eq!(get(&sandbox, "/api/v4/account", str_field(&tokens, "access_token")).await.status(), 401);
    let refresh = post_token(&sandbox, &refresh_request(&sandbox, str_field(&tokens, "refresh_token"))).await;
    assert_eq!(refresh.status(), 401);
}

#[tokio::test]
async fn the_api_answers_a_missing_or_bad_token_with_a_401_problem() {
    let sandbox = sandbox(unlimited()).await;
    let url = format!("{}/api/v4/account", sandbox.base_url());

    let missing = reqwest::Client::new().get(&url).send().await.unwrap();
    let bad = get(&sandbox, "/api/v4/leads/pipelines", "not-a-token").await;

    for answer in [missing, bad] {
        assert_eq!(answer.status(), 401);
        assert_eq!(content_type(&answer), "application/problem+json");
        let problem: Value = answer.json().await.unwrap();
        assert_eq!(problem["title"], "Unauthorized");
        assert_eq!(problem["status"], 401);
        assert_eq!(problem["type"], "https://httpstatus.es/401");
    }
}

#[tokio::test]
async fn the_account_names_its_subdomain_and_id() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));

    let account: Value = get(&sandbox, "/api/v4/account", &token).await.json().await.unwrap();

    assert_eq!(account["id"], 31_000_001);
    assert_eq!(account["subdomain"], "sandbox");
    assert_eq!(account["country"], "RU");
    assert_eq!(account["currency"], "RUB");
    assert!(account["current_user_id"].is_i64());
    assert_eq!(account["_links"]["self"]["href"], format!("{}/api/v4/account", sandbox.base_url()));
}

#[tokio::test]
async fn every_pipeline_has_the_unsorted_status_and_the_system_statuses_142_and_143() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));

    let list: Value = get(&sandbox, "/api/v4/leads/pipelines", &token).await.json().await.unwrap();

    let pipelines = list["_embedded"]["pipelines"].as_array().unwrap();
    assert_eq!(list["_total_items"], 2);
    assert!(list["_links"].get("next").is_none());
    let names: Vec<&str> = pipelines.iter().map(|p| str_field(p, "name")).collect();
    assert_eq!(names, ["Воронка", "Продажи"]);
    assert_eq!(pipelines[0]["is_main"], true);
    assert_eq!(pipelines[1]["is_main"], false);
    let mut status_ids = Vec::new();
    for pipeline in pipelines {
        let statuses = pipeline["_embedded"]["statuses"].as_array().unwrap();
        let by_id = |id: i64| statuses.iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(by_id(142)["name"], "Успешно реализовано");
        assert_eq!(by_id(142)["sort"], 10_000);
        assert_eq!(by_id(142)["is_editable"], false);
        assert_eq!(by_id(143)["name"], "Закрыто и не реализовано");
        assert_eq!(by_id(143)["sort"], 11_000);
        let unsorted: Vec<&Value> = statuses.iter().filter(|s| s["type"] == 1).collect();
        assert_eq!(unsorted.len(), 1);
        assert_eq!(unsorted[0]["name"], "Неразобранное");
        assert_eq!(unsorted[0]["sort"], 10);
        assert_eq!(statuses.len(), 6);
        for status in statuses {
            assert_eq!(status["pipeline_id"], pipeline["id"]);
            if status["id"] != 142 && status["id"] != 143 {
                status_ids.push(status["id"].as_i64().unwrap());
            }
        }
    }
    let count = status_ids.len();
    status_ids.sort_unstable();
    status_ids.dedup();
    assert_eq!(status_ids.len(), count, "status ids other than 142/143 are unique");
}

#[tokio::test]
async fn pipelines_come_in_pages_linked_by_next() {
    let sandbox = sandbox(AmoSandboxConfig { pipelines_page_size: Some(2), ..unlimited() }).await;
    let pipeline = |id: i64, name: &str| SandboxPipeline {
        id,
        name: name.to_owned(),
        sort: i32::try_from(id).unwrap(),
        is_main: id == 1,
        statuses: vec![SandboxStatus { id: 500 + id, name: "Этап".to_owned(), sort: 20, status_type: 0 }],
    };
    sandbox.set_pipelines(vec![
        pipeline(1, "A"),
        pipeline(2, "B"),
        pipeline(3, "C"),
        pipeline(4, "D"),
        pipeline(5, "E"),
    ]);
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    let client = reqwest::Client::new();

    let mut names = Vec::new();
    let mut pages = 0;
    let mut next = Some(format!("{}/api/v4/leads/pipelines", sandbox.base_url()));
    while let Some(url) = next.take() {
        let page: Value = client.get(&url).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        pages += 1;
        for pipeline in page["_embedded"]["pipelines"].as_array().unwrap() {
            names.push(str_field(pipeline, "name").to_owned());
        }
        next = page["_links"]["next"]["href"].as_str().map(str::to_owned);
    }

    assert_eq!(names, ["A", "B", "C", "D", "E"]);
    assert_eq!(pages, 3);
    let past_the_end = get(&sandbox, "/api/v4/leads/pipelines?page=4", &token).await;
    assert_eq!(past_the_end.status(), 204);
    assert_eq!(get(&sandbox, "/api/v4/leads/pipelines?page=zero", &token).await.status(), 400);
}

#[tokio::test]
async fn endless_pipeline_pages_always_link_a_next_page_with_a_pipeline_of_its_own() {
    let sandbox = sandbox(unlimited()).await;
    sandbox.set_endless_pipeline_pages(true);
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    let page = |n: usize| {
        let (sandbox, token) = (&sandbox, &token);
        async move {
            let path =
                if n == 1 { "/api/v4/leads/pipelines".to_owned() } else { format!("/api/v4/leads/pipelines?page={n}") };
            get(sandbox, &path, token).await.json::<Value>().await.unwrap()
        }
    };

    let first = page(1).await;
    let second = page(2).await;
    let far = page(70).await;
    sandbox.set_endless_pipeline_pages(false);
    let ended = get(&sandbox, "/api/v4/leads/pipelines", &token).await.json::<Value>().await.unwrap();

    let ids = |page: &Value| -> Vec<i64> {
        page["_embedded"]["pipelines"].as_array().unwrap().iter().map(|p| p["id"].as_i64().unwrap()).collect()
    };
    assert_eq!(ids(&first), [7_000_001, 7_000_002]);
    assert!(str_field(&first["_links"]["next"], "href").ends_with("/api/v4/leads/pipelines?page=2"), "{first}");
    assert_eq!(ids(&second), [8_000_002]);
    assert!(str_field(&second["_links"]["next"], "href").ends_with("?page=3"), "{second}");
    assert_eq!(second["_embedded"]["pipelines"][0]["_embedded"]["statuses"].as_array().unwrap().len(), 3);
    assert_eq!(ids(&far), [8_000_070]);
    assert!(far["_links"]["next"]["href"].is_string());
    assert!(ended["_links"].get("next").is_none(), "{ended}");
}

#[tokio::test]
async fn posted_leads_are_created_with_their_request_ids() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    let batch = json!([
        { "name": "Заявка с сайта", "pipeline_id": 7_000_002, "status_id": 61_000_005, "price": 1500 },
        { "name": "Звонок", "request_id": "call-1" },
        { "pipeline_id": 7_000_001, "status_id": 142 },
    ]);

    let answer = reqwest::Client::new()
        .post(format!("{}/api/v4/leads", sandbox.base_url()))
        .bearer_auth(&token)
        .json(&batch)
        .send()
        .await
        .unwrap();

    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    let created = body["_embedded"]["leads"].as_array().unwrap();
    let request_ids: Vec<&str> = created.iter().map(|lead| str_field(lead, "request_id")).collect();
    assert_eq!(request_ids, ["0", "call-1", "2"]);
    let leads = sandbox.leads();
    assert_eq!(leads.len(), 3);
    assert_eq!(created[0]["id"], leads[0].id);
    assert_eq!(
        (leads[0].name.as_str(), leads[0].pipeline_id, leads[0].status_id),
        ("Заявка с сайта", 7_000_002, Some(61_000_005))
    );
    assert_eq!((leads[1].pipeline_id, leads[1].status_id), (7_000_001, None));
    assert_eq!((leads[2].name.as_str(), leads[2].status_id), ("", Some(142)));
}

#[tokio::test]
async fn a_lead_in_an_unknown_pipeline_is_a_validation_error_and_nothing_is_created() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    let post = |body: String| {
        reqwest::Client::new()
            .post(format!("{}/api/v4/leads", sandbox.base_url()))
            .bearer_auth(&token)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
    };

    let answer = post(json!([{ "name": "ok" }, { "name": "bad", "pipeline_id": 999 }]).to_string()).await.unwrap();

    assert_eq!(answer.status(), 400);
    assert_eq!(content_type(&answer), "application/problem+json");
    let problem: Value = answer.json().await.unwrap();
    assert_eq!(problem["title"], "Bad Request");
    assert_eq!(problem["detail"], "Request validation failed");
    assert_eq!(
        problem["validation-errors"],
        json!([{ "request_id": "1", "errors": [{
            "code": "NotSupportedChoice",
            "path": "pipeline_id",
            "detail": "The value you selected is not a valid choice.",
        }]}])
    );
    let wrong_status = post(json!([{ "pipeline_id": 7_000_001, "status_id": 61_000_004 }]).to_string()).await.unwrap();
    assert_eq!(wrong_status.json::<Value>().await.unwrap()["validation-errors"][0]["errors"][0]["path"], "status_id");
    assert_eq!(post(json!({ "name": "not an array" }).to_string()).await.unwrap().status(), 400);
    assert_eq!(post("[{".to_owned()).await.unwrap().status(), 400);
    let too_many: Vec<Value> = (0..51).map(|_| json!({ "name": "x" })).collect();
    assert_eq!(post(Value::from(too_many).to_string()).await.unwrap().status(), 400);
    assert!(sandbox.leads().is_empty());
}

#[tokio::test]
async fn an_unknown_path_is_an_empty_404() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));

    let answer = get(&sandbox, "/api/v4/no-such-thing", &token).await;

    assert_eq!(answer.status(), 404);
    assert!(answer.text().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_eighth_request_within_a_second_is_a_429_and_a_violation() {
    let sandbox = sandbox(AmoSandboxConfig::default()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    let client = reqwest::Client::new();

    let mut statuses = vec![post_token(&sandbox, &code_request(&sandbox, &sandbox.issue_code())).await.status()];
    let mut refused = None;
    for _ in 0..7 {
        let answer = client.get(format!("{}/api/v4/account", sandbox.base_url())).bearer_auth(&token).send().await;
        let answer = answer.unwrap();
        statuses.push(answer.status());
        if answer.status() == 429 {
            refused = Some(answer);
        }
    }

    assert_eq!(statuses.iter().filter(|status| **status == 429).count(), 1, "{statuses:?}");
    assert_eq!(statuses[7], 429);
    assert_eq!(sandbox.violations(), 1);
    let refused = refused.unwrap();
    assert!(content_type(&refused).starts_with("text/html"));
    assert!(refused.headers().get(RETRY_AFTER).is_none());
    assert!(refused.text().await.unwrap().contains("429 Too Many Requests"));
}

#[tokio::test]
async fn paced_requests_stay_within_the_limit() {
    let sandbox = sandbox(AmoSandboxConfig::default()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));

    for _ in 0..8 {
        assert_eq!(get(&sandbox, "/api/v4/account", &token).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    assert_eq!(sandbox.violations(), 0);
}

#[tokio::test]
async fn injected_faults_spend_no_rate_limit_budget() {
    let sandbox = sandbox(AmoSandboxConfig::default()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    sandbox.faults().inject("", Fault::server_error(), 3);

    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(get(&sandbox, "/api/v4/account", &token).await.status().as_u16());
    }

    assert_eq!(statuses, [503, 503, 503, 200, 200, 200, 200, 200, 200, 200]);
    assert_eq!(sandbox.violations(), 0);
}

#[tokio::test]
async fn canned_faults_answer_before_the_sandbox_and_leave_its_state_alone() {
    let sandbox = sandbox(unlimited()).await;
    let code = sandbox.issue_code();
    sandbox.faults().inject("/oauth2/", Fault::server_error(), 1);
    sandbox.faults().inject("/oauth2/", Fault::html_forbidden(), 1);
    let json_error =
        Fault::Status { status: 500, content_type: "application/json", body: r#"{"error":"boom"}"#.into() };
    sandbox.faults().inject("/oauth2/", json_error, 1);

    let unavailable = post_token(&sandbox, &code_request(&sandbox, &code)).await;
    assert_eq!(unavailable.status(), 503);
    assert!(unavailable.text().await.unwrap().is_empty());
    let forbidden = post_token(&sandbox, &code_request(&sandbox, &code)).await;
    assert_eq!(forbidden.status(), 403);
    assert!(content_type(&forbidden).starts_with("text/html"));
    assert!(forbidden.text().await.unwrap().contains("Доступ запрещён"));
    let failed = post_token(&sandbox, &code_request(&sandbox, &code)).await;
    assert_eq!(failed.status(), 500);
    assert_eq!(failed.json::<Value>().await.unwrap(), json!({ "error": "boom" }));

    // The code survived three faulted attempts.
    assert_eq!(post_token(&sandbox, &code_request(&sandbox, &code)).await.status(), 200);
    assert_eq!(sandbox.token_stats().exchanged, 1);
}

#[tokio::test]
async fn a_fault_hits_only_paths_under_its_prefix() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    sandbox.faults().inject("/api/v4/leads", Fault::too_many_requests(), 2);

    assert_eq!(get(&sandbox, "/api/v4/account", &token).await.status(), 200);
    let limited = get(&sandbox, "/api/v4/leads/pipelines", &token).await;
    assert_eq!(limited.status(), 429);
    assert!(content_type(&limited).starts_with("text/html"));

    sandbox.faults().clear();
    assert_eq!(get(&sandbox, "/api/v4/leads/pipelines", &token).await.status(), 200);
    assert_eq!(sandbox.violations(), 0);
}

#[tokio::test]
async fn a_delay_fault_answers_normally_after_the_pause() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    sandbox.faults().inject("/api/v4/account", Fault::Delay(Duration::from_millis(300)), 1);

    let started = Instant::now();
    let answer = get(&sandbox, "/api/v4/account", &token).await;

    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["subdomain"], "sandbox");
}

#[tokio::test]
async fn a_dropped_connection_is_a_network_error_for_the_client() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    sandbox.faults().inject("/api/v4/account", Fault::DropConnection, 1);
    let url = format!("{}/api/v4/account", sandbox.base_url());

    let dropped = reqwest::Client::new().get(&url).bearer_auth(&token).send().await;

    let error = dropped.expect_err("no HTTP response at all");
    assert!(error.status().is_none(), "{error:?}");
    assert_eq!(reqwest::Client::new().get(&url).bearer_auth(&token).send().await.unwrap().status(), 200);
    let statuses: Vec<u16> = sandbox.requests().iter().map(|request| request.status).collect();
    assert_eq!(statuses, [0, 200]);
}

#[tokio::test]
async fn a_dropped_connection_sends_no_bytes_at_all() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sandbox = sandbox(unlimited()).await;
    sandbox.faults().inject("", Fault::DropConnection, 1);
    let address = sandbox.base_url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();

    stream.write_all(b"GET /api/v4/account HTTP/1.1\r\nHost: sandbox\r\n\r\n").await.unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut received)).await.unwrap();

    assert!(read.is_err() || received.is_empty(), "received {:?}", String::from_utf8_lossy(&received));
}

#[tokio::test]
async fn a_truncated_body_is_a_200_that_fails_to_parse() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    sandbox.faults().inject("/api/v4/leads/pipelines", Fault::TruncatedBody, 1);

    let answer = get(&sandbox, "/api/v4/leads/pipelines", &token).await;

    assert_eq!(answer.status(), 200);
    assert!(content_type(&answer).starts_with("application/json"));
    let text = answer.text().await.unwrap();
    assert!(text.starts_with('{'));
    assert!(serde_json::from_str::<Value>(&text).is_err());
}

#[tokio::test]
async fn the_request_log_records_headers_bodies_and_answers() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    let code = sandbox.issue_code();

    post_token(&sandbox, &code_request(&sandbox, &code)).await;
    get(&sandbox, "/api/v4/leads/pipelines?with=statuses", &token).await;

    let log = sandbox.requests();
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].method.as_str(), log[0].path.as_str(), log[0].status), ("POST", "/oauth2/access_token", 200));
    assert_eq!(log[0].form_or_json_field("code").as_deref(), Some(code.as_str()));
    assert_eq!(log[0].json().unwrap()["grant_type"], "authorization_code");
    assert_eq!(log[1].query.as_deref(), Some("with=statuses"));
    assert_eq!(log[1].header("Authorization"), Some(format!("Bearer {token}").as_str()));
    assert!(log[1].headers.iter().all(|(name, _)| *name == name.to_ascii_lowercase()));
    assert!(log[0].at <= log[1].at);
}

#[tokio::test]
async fn a_test_can_await_a_request_without_sleeping() {
    let sandbox = sandbox(unlimited()).await;
    let token = sandbox.issue_long_lived_token(Duration::from_secs(3600));
    let url = format!("{}/api/v4/account", sandbox.base_url());
    sandbox.faults().inject("", Fault::Delay(Duration::from_millis(100)), 1);

    let background = tokio::spawn(async move { reqwest::Client::new().get(url).bearer_auth(token).send().await });
    let seen = sandbox
        .wait_for_requests(
            |log| log.iter().any(|request| request.path == "/api/v4/account" && request.status == 200),
            WAIT,
        )
        .await;

    assert!(seen);
    assert_eq!(background.await.unwrap().unwrap().status(), 200);
    assert!(!sandbox.wait_for_requests(|log| log.len() > 1, Duration::from_millis(50)).await);
}

#[tokio::test]
async fn a_form_encoded_token_request_works_like_json() {
    let sandbox = sandbox(unlimited()).await;
    let config = sandbox.config();
    let code = sandbox.issue_code();
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("client_id", &config.client_id)
        .append_pair("client_secret", &config.client_secret)
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", &code)
        .append_pair("redirect_uri", &config.redirect_uri)
        .finish();

    let answer = reqwest::Client::new()
        .post(token_url(&sandbox))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();

    assert_eq!(answer.status(), 200);
    let tokens: Value = answer.json().await.unwrap();
    let refresh = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("client_id", &config.client_id)
        .append_pair("client_secret", &config.client_secret)
        .append_pair("grant_type", "refresh_token")
        .append_pair("refresh_token", str_field(&tokens, "refresh_token"))
        .append_pair("redirect_uri", &config.redirect_uri)
        .finish();
    let refreshed = reqwest::Client::new()
        .post(token_url(&sandbox))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(refresh)
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), 200);
}

#[tokio::test]
async fn a_malformed_token_request_is_a_400_not_a_crash() {
    let sandbox = sandbox(unlimited()).await;

    let answer = reqwest::Client::new()
        .post(token_url(&sandbox))
        .header(CONTENT_TYPE, "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();

    assert_eq!(answer.status(), 400);
    assert_eq!(answer.json::<Value>().await.unwrap()["hint"], "Check the `grant_type` parameter");
    let token = sandbox.issue_long_lived_token(Duration::from_secs(60));
    assert_eq!(get(&sandbox, "/api/v4/account", &token).await.status(), 200);
}
