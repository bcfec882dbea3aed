//! AmoCRM leads as a client sees them over HTTP: `/leads/complex` with a
//! contact, validation refusals, custom fields, lists with their filters,
//! search and its indexing delay, notes, and the faults a lead delivery
//! must survive (refused before executing, created but never answered).

use std::time::Duration;

use crm_connect_sandbox::amocrm::{AmoSandbox, AmoSandboxConfig, SandboxCustomField, validation_refusal};
use crm_connect_sandbox::faults::Fault;
use serde_json::{Value, json};

const COMPLEX: &str = "/api/v4/leads/complex";
const FIELDS: &str = "/api/v4/leads/custom_fields";
/// The main pipeline of the default account and one of its statuses.
pub(crate) const PIPELINE: i64 = 7_000_001;
pub(crate) const STATUS: i64 = 61_000_002;

pub(crate) struct Amo {
    pub(crate) sandbox: AmoSandbox,
    token: String,
    client: reqwest::Client,
}

impl Amo {
    pub(crate) async fn start(config: AmoSandboxConfig) -> Amo {
        let sandbox = AmoSandbox::start(config).await.unwrap();
        // Long enough to outlive every clock jump of these tests.
        let token = sandbox.issue_long_lived_token(Duration::from_secs(30 * 86_400));
        Amo { sandbox, token, client: reqwest::Client::new() }
    }

    pub(crate) async fn unlimited() -> Amo {
        Amo::start(AmoSandboxConfig { rate_limit_per_sec: 0, ..AmoSandboxConfig::default() }).await
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sandbox.base_url())
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, reqwest::Error> {
        self.client.post(self.url(path)).bearer_auth(&self.token).json(body).send().await
    }

    pub(crate) async fn post_ok(&self, path: &str, body: &Value) -> Value {
        let answer = self.post(path, body).await.unwrap();
        assert_eq!(answer.status(), 200, "{path}");
        answer.json().await.unwrap()
    }

    pub(crate) async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client.get(self.url(path_and_query)).bearer_auth(&self.token).send().await.unwrap()
    }

    /// The leads of a `GET /api/v4/leads` that must find some.
    pub(crate) async fn list(&self, path_and_query: &str) -> Value {
        let answer = self.get(path_and_query).await;
        assert_eq!(answer.status(), 200, "{path_and_query}");
        answer.json().await.unwrap()
    }

    /// Creates one lead named `name` through `/leads/complex`; its id.
    pub(crate) async fn create(&self, name: &str) -> i64 {
        let body = self.post_ok(COMPLEX, &json!([{ "name": name, "pipeline_id": PIPELINE }])).await;
        body[0]["id"].as_i64().unwrap()
    }
}

fn ids(list: &Value) -> Vec<i64> {
    list["_embedded"]["leads"].as_array().unwrap().iter().map(|lead| lead["id"].as_i64().unwrap()).collect()
}

fn key_field() -> SandboxCustomField {
    SandboxCustomField::text(1_300_001, "crm-connect key")
}

#[tokio::test]
async fn a_complex_lead_is_created_with_its_contact_and_answered_as_a_bare_array() {
    let amo = Amo::unlimited().await;
    let mut fields = AmoSandbox::default_lead_custom_fields();
    fields.push(key_field());
    amo.sandbox.set_lead_custom_fields(fields);
    let lead = json!({
        "name": "Заявка с сайта",
        "price": 1500,
        "pipeline_id": PIPELINE,
        "status_id": STATUS,
        "responsible_user_id": 9_000_002,
        "request_id": "42",
        "custom_fields_values": [
            { "field_id": 1_300_001, "values": [{ "value": "key-42" }] },
            { "field_code": "UTM_SOURCE", "values": [{ "value": "google" }] },
        ],
        "tags_to_add": [{ "name": "site" }],
        "_embedded": { "contacts": [{
            "name": "Анна",
            "custom_fields_values": [
                { "field_code": "PHONE", "values": [{ "value": "+79990001122", "enum_code": "WORK" }] },
                { "field_code": "EMAIL", "values": [{ "value": "anna@example.com", "enum_code": "WORK" }] },
            ],
        }]},
    });

    let answer = amo.post(COMPLEX, &json!([lead])).await.unwrap();

    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    let items = body.as_array().expect("a bare array");
    assert_eq!(items.len(), 1);
    let contacts = amo.sandbox.contacts();
    assert_eq!(contacts.len(), 1);
    let leads = amo.sandbox.leads();
    assert_eq!(
        items[0],
        json!({
            "id": leads[0].id,
            "contact_id": contacts[0].id,
            "company_id": null,
            "request_id": ["42"],
            "merged": false,
        })
    );
    let stored = &leads[0];
    assert_eq!((stored.name.as_str(), stored.price, stored.pipeline_id), ("Заявка с сайта", 1500, PIPELINE));
    assert_eq!((stored.status_id, stored.responsible_user_id), (Some(STATUS), 9_000_002));
    assert_eq!(stored.field_texts("1300001"), ["key-42"]);
    assert_eq!(stored.field_texts("UTM_SOURCE"), ["google"]);
    assert_eq!(stored.tags, ["site"]);
    assert_eq!(stored.contact_id, Some(contacts[0].id));
    assert_eq!(contacts[0].name, "Анна");
    assert_eq!(contacts[0].field_texts("PHONE"), ["+79990001122"]);
    assert_eq!(contacts[0].field_texts("EMAIL"), ["anna@example.com"]);
    assert_eq!(amo.sandbox.creates(), 1);
}

#[tokio::test]
async fn a_request_id_is_only_echoed_so_the_same_lead_sent_twice_is_two_leads() {
    let amo = Amo::unlimited().await;
    let lead = json!([{ "name": "Дважды", "request_id": "7" }]);

    let first = amo.post_ok(COMPLEX, &lead).await;
    let second = amo.post_ok(COMPLEX, &lead).await;

    assert_ne!(first[0]["id"], second[0]["id"]);
    assert_eq!((first[0]["request_id"].clone(), first[0]["contact_id"].clone()), (json!(["7"]), Value::Null));
    assert_eq!(amo.sandbox.leads().len(), 2);
    assert_eq!(amo.sandbox.creates(), 2);
}

#[tokio::test]
async fn invalid_complex_leads_are_400_validation_errors_and_nothing_is_created() {
    let amo = Amo::unlimited().await;
    let cases = [
        (json!([{ "name": "a", "pipeline_id": 999 }]), "pipeline_id"),
        (json!([{ "name": "a", "pipeline_id": PIPELINE, "status_id": 61_000_004 }]), "status_id"),
        (json!([{ "name": "a", "price": 15.5 }]), "price"),
        (json!([{ "name": "a", "price": "15" }]), "price"),
        (json!([{ "name": "a", "responsible_user_id": 1 }]), "responsible_user_id"),
        (
            json!([{ "name": "a", "custom_fields_values": [{ "field_id": 999, "values": [{ "value": "x" }] }] }]),
            "custom_fields_values.0.field_id",
        ),
        (
            json!([{ "name": "a", "_embedded": { "contacts": [{ "name": "b", "custom_fields_values": [
                { "field_code": "SKYPE", "values": [{ "value": "x" }] },
            ] }] } }]),
            "_embedded.contacts.0.custom_fields_values.0.field_code",
        ),
        (
            json!([{ "name": "a", "_embedded": { "contacts": [{ "name": "b" }, { "name": "c" }] } }]),
            "_embedded.contacts",
        ),
    ];
    for (body, path) in cases {
        let answer = amo.post(COMPLEX, &body).await.unwrap();
        assert_eq!(answer.status(), 400, "{body}");
        assert_eq!(answer.headers()["content-type"], "application/problem+json");
        let problem: Value = answer.json().await.unwrap();
        let errors = &problem["validation-errors"][0]["errors"];
        assert!(errors.as_array().unwrap().iter().any(|error| error["path"] == path), "{path}: {problem}");
    }
    let too_many: Vec<Value> = (0..51).map(|n| json!({ "name": format!("lead {n}") })).collect();
    let answer = amo.post(COMPLEX, &Value::from(too_many)).await.unwrap();
    assert_eq!(answer.status(), 400);
    assert!(answer.json::<Value>().await.unwrap()["validation-errors"].is_array());

    assert!(amo.sandbox.leads().is_empty());
    assert!(amo.sandbox.contacts().is_empty());
    assert_eq!(amo.sandbox.creates(), 0);
}

#[tokio::test]
async fn one_invalid_lead_refuses_the_whole_batch() {
    let amo = Amo::unlimited().await;
    let body = json!([{ "name": "ok" }, { "name": "bad", "pipeline_id": 999, "request_id": "b" }]);

    let answer = amo.post(COMPLEX, &body).await.unwrap();

    assert_eq!(answer.status(), 400);
    let problem: Value = answer.json().await.unwrap();
    assert_eq!(problem["validation-errors"][0]["request_id"], "b");
    assert!(amo.sandbox.leads().is_empty());
}

#[tokio::test]
async fn custom_fields_are_paged_by_next_links_and_a_created_one_joins_them() {
    let amo = Amo::unlimited().await;
    amo.sandbox.set_custom_fields_page_size(2);

    let created = amo.post_ok(FIELDS, &json!([{ "name": "crm-connect key", "type": "text" }])).await;
    let new_field = &created["_embedded"]["custom_fields"][0];
    assert_eq!((new_field["name"].clone(), new_field["type"].clone()), (json!("crm-connect key"), json!("text")));
    assert!(new_field["code"].is_null());
    let new_id = new_field["id"].as_i64().unwrap();

    let mut listed = Vec::new();
    let mut next = Some(amo.url(FIELDS));
    let mut pages = 0;
    while let Some(url) = next.take() {
        let page: Value = amo.client.get(&url).bearer_auth(&amo.token).send().await.unwrap().json().await.unwrap();
        listed.extend(page["_embedded"]["custom_fields"].as_array().unwrap().iter().cloned());
        next = page["_links"]["next"]["href"].as_str().map(str::to_owned);
        pages += 1;
    }
    assert_eq!(pages, 3);
    let codes: Vec<Value> = listed.iter().map(|field| field["code"].clone()).collect();
    assert_eq!(
        codes,
        [
            json!("UTM_SOURCE"),
            json!("UTM_MEDIUM"),
            json!("UTM_CAMPAIGN"),
            json!("UTM_CONTENT"),
            json!("UTM_TERM"),
            Value::Null
        ]
    );
    assert_eq!(listed[5]["id"], new_id);
    assert!(listed.iter().all(|field| field["id"].is_i64() && field["name"].is_string() && field["type"].is_string()));
    assert_eq!(amo.get(&format!("{FIELDS}?page=4")).await.status(), 204);

    // The new field takes values at once; a removed one no longer does.
    let lead = json!([{ "name": "x", "custom_fields_values": [{ "field_id": new_id, "values": [{ "value": "k" }] }] }]);
    amo.post_ok(COMPLEX, &lead).await;
    assert!(amo.sandbox.remove_lead_custom_field(new_id));
    assert_eq!(amo.post(COMPLEX, &lead).await.unwrap().status(), 400);
    assert_eq!(amo.sandbox.leads().len(), 1);
}

#[tokio::test]
async fn an_account_without_utm_fields_lists_none_and_a_bad_field_is_refused() {
    let amo = Amo::unlimited().await;
    amo.sandbox.set_lead_custom_fields(Vec::new());

    assert_eq!(amo.get(FIELDS).await.status(), 204);
    let refused = amo.post(FIELDS, &json!([{ "name": "x", "type": "hologram" }])).await.unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.json::<Value>().await.unwrap()["validation-errors"].is_array());
    let utm = json!([{ "name": "x", "custom_fields_values": [{ "field_code": "UTM_SOURCE", "values": [{ "value": "a" }] }] }]);
    assert_eq!(amo.post(COMPLEX, &utm).await.unwrap().status(), 400);
    assert!(amo.sandbox.lead_custom_fields().is_empty());
}

#[tokio::test]
async fn leads_are_listed_in_pages_with_contacts_and_null_custom_fields() {
    let amo = Amo::unlimited().await;
    let with_contact = json!([{ "name": "с контактом", "_embedded": { "contacts": [{ "name": "Борис" }] } }]);
    let first = amo.post_ok(COMPLEX, &with_contact).await[0]["id"].as_i64().unwrap();
    let second = amo.create("второй").await;
    let third = amo.create("третий").await;

    let page1 = amo.list("/api/v4/leads?limit=2&with=contacts").await;
    assert_eq!(ids(&page1), [first, second]);
    assert!(page1.get("_total_items").is_none());
    let lead = &page1["_embedded"]["leads"][0];
    let contact_id = amo.sandbox.contacts()[0].id;
    assert_eq!(lead["_embedded"]["contacts"][0]["id"], contact_id);
    assert_eq!(lead["_embedded"]["contacts"][0]["is_main"], true);
    assert!(lead["custom_fields_values"].is_null());
    assert_eq!((lead["pipeline_id"].clone(), lead["status_id"].clone()), (json!(PIPELINE), json!(61_000_001)));
    assert!(lead["created_at"].is_i64());
    let next = page1["_links"]["next"]["href"].as_str().unwrap().to_owned();
    assert!(next.contains("with=contacts"), "{next}");

    let page2: Value = amo.client.get(&next).bearer_auth(&amo.token).send().await.unwrap().json().await.unwrap();
    assert_eq!(ids(&page2), [third]);
    assert!(page2["_links"].get("next").is_none(), "{page2}");
    assert!(page2["_embedded"]["leads"][0]["_embedded"]["contacts"].as_array().unwrap().is_empty());

    let plain = amo.list("/api/v4/leads").await;
    assert!(plain["_embedded"]["leads"][0]["_embedded"].get("contacts").is_none());
    let by_id = amo.list(&format!("/api/v4/leads?filter[id][]={first}&filter[id][]={third}")).await;
    assert_eq!(ids(&by_id), [first, third]);
    let newest_first = amo.list("/api/v4/leads?order[id]=desc").await;
    assert_eq!(ids(&newest_first), [third, second, first]);
}

#[tokio::test]
async fn an_empty_list_or_a_page_past_the_end_is_a_204_without_a_body() {
    let amo = Amo::unlimited().await;

    let empty = amo.get("/api/v4/leads").await;
    assert_eq!(empty.status(), 204);
    assert!(empty.text().await.unwrap().is_empty());

    amo.create("один").await;
    assert_eq!(amo.get("/api/v4/leads?page=2").await.status(), 204);
    assert_eq!(amo.get("/api/v4/leads?query=nothing-like-this").await.status(), 204);
    assert_eq!(amo.get("/api/v4/leads?filter[id][]=1").await.status(), 204);
}

#[tokio::test]
async fn the_created_at_filter_keeps_to_its_window_unless_the_account_ignores_it() {
    let amo = Amo::unlimited().await;
    let early = amo.create("ранний").await;
    amo.sandbox.advance_clock(Duration::from_secs(3600));
    let middle = amo.create("средний").await;
    let middle_at = amo.sandbox.leads()[1].created_at;
    amo.sandbox.advance_clock(Duration::from_secs(3600));
    let late = amo.create("поздний").await;
    let window = format!("filter[created_at][from]={}&filter[created_at][to]={}", middle_at - 600, middle_at + 600);

    let filtered = amo.list(&format!("/api/v4/leads?{window}&limit=1")).await;
    assert_eq!(ids(&filtered), [middle]);
    assert!(filtered["_links"].get("next").is_none());

    amo.sandbox.set_ignore_created_at_filter(true);
    let ignored = amo.list(&format!("/api/v4/leads?{window}")).await;
    assert_eq!(ids(&ignored), [early, middle, late]);
    let outside: Vec<i64> = ignored["_embedded"]["leads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|lead| (lead["created_at"].as_i64().unwrap() - middle_at).abs() > 600)
        .map(|lead| lead["id"].as_i64().unwrap())
        .collect();
    assert_eq!(outside, [early, late], "a client tells an ignored filter by leads outside the window");
}

#[tokio::test]
async fn query_finds_a_custom_field_value_only_once_indexed() {
    let amo = Amo::unlimited().await;
    amo.sandbox.set_lead_custom_fields(vec![key_field()]);
    amo.sandbox.set_query_index_delay(Duration::from_secs(30));
    let lead = json!([{
        "name": "Поиск",
        "custom_fields_values": [{ "field_id": 1_300_001, "values": [{ "value": "delivery-key-1" }] }],
    }]);
    let id = amo.post_ok(COMPLEX, &lead).await[0]["id"].as_i64().unwrap();
    amo.create("другой").await;

    assert_eq!(amo.get("/api/v4/leads?query=delivery-key-1").await.status(), 204);
    amo.sandbox.advance_clock(Duration::from_secs(31));

    let found = amo.list("/api/v4/leads?query=delivery-key-1&with=contacts").await;
    assert_eq!(ids(&found), [id]);
    let values = &found["_embedded"]["leads"][0]["custom_fields_values"];
    assert_eq!(values[0]["field_id"], 1_300_001);
    assert_eq!(values[0]["values"][0]["value"], "delivery-key-1");
    assert_eq!(ids(&amo.list("/api/v4/leads?query=%D0%BF%D0%BE%D0%B8%D1%81%D0%BA").await), [id], "any case");
}

#[tokio::test]
async fn a_common_note_is_added_to_an_existing_lead_only() {
    let amo = Amo::unlimited().await;
    let lead = amo.create("с заметкой").await;

    let body = amo
        .post_ok(
            "/api/v4/leads/notes",
            &json!([{ "entity_id": lead, "note_type": "common", "params": { "text": "Перезвонить" } }]),
        )
        .await;

    let notes = amo.sandbox.notes();
    assert_eq!(notes.len(), 1);
    assert_eq!(body["_embedded"]["notes"][0]["id"], notes[0].id);
    assert_eq!((notes[0].entity_id, notes[0].note_type.as_str()), (lead, "common"));
    assert_eq!(notes[0].text.as_deref(), Some("Перезвонить"));
    for bad in [
        json!([{ "entity_id": 1, "note_type": "common", "params": { "text": "x" } }]),
        json!([{ "entity_id": lead, "note_type": "common", "params": {} }]),
        json!([{ "entity_id": lead, "note_type": "telepathy", "params": { "text": "x" } }]),
    ] {
        assert_eq!(amo.post("/api/v4/leads/notes", &bad).await.unwrap().status(), 400, "{bad}");
    }
    assert_eq!(amo.sandbox.notes().len(), 1);
}

#[tokio::test]
async fn over_the_rate_limit_a_create_is_refused_before_it_runs() {
    let amo = Amo::start(AmoSandboxConfig { rate_limit_per_sec: 2, ..AmoSandboxConfig::default() }).await;
    let lead = json!([{ "name": "лимит" }]);

    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(amo.post(COMPLEX, &lead).await.unwrap().status().as_u16());
    }

    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(amo.sandbox.leads().len(), 2);
    assert_eq!(amo.sandbox.creates(), 2);
    assert_eq!(amo.sandbox.violations(), 1);
}

#[tokio::test]
async fn an_injected_429_or_validation_refusal_creates_nothing() {
    let amo = Amo::unlimited().await;
    amo.sandbox.faults().inject_for("POST", COMPLEX, Fault::too_many_requests(), 1);
    amo.sandbox.faults().inject_for("POST", COMPLEX, validation_refusal("custom_fields_values.0.field_id", "gone"), 1);
    let lead = json!([{ "name": "отказ" }]);

    assert_eq!(amo.post(COMPLEX, &lead).await.unwrap().status(), 429);
    let refused = amo.post(COMPLEX, &lead).await.unwrap();
    assert_eq!(refused.status(), 400);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["validation-errors"][0]["errors"][0]["path"], "custom_fields_values.0.field_id");
    assert!(amo.sandbox.leads().is_empty());

    amo.post_ok(COMPLEX, &lead).await;
    assert_eq!(amo.sandbox.leads().len(), 1);
}

#[tokio::test]
async fn a_create_whose_connection_drops_still_exists_on_a_later_list() {
    let amo = Amo::unlimited().await;
    amo.sandbox.set_lead_custom_fields(vec![key_field()]);
    // Only the create: the list on the same prefix is answered normally.
    amo.sandbox.faults().inject_for("GET", COMPLEX, Fault::DropConnection, 1);
    amo.sandbox.faults().inject_for("POST", COMPLEX, Fault::DropAfterExecuting, 1);
    let lead = json!([{
        "name": "потерянный ответ",
        "custom_fields_values": [{ "field_id": 1_300_001, "values": [{ "value": "lost-1" }] }],
    }]);

    let sent = amo.post(COMPLEX, &lead).await;

    assert!(sent.is_err(), "no answer: {sent:?}");
    let leads = amo.sandbox.leads();
    assert_eq!(leads.len(), 1);
    let found = amo.list("/api/v4/leads?query=lost-1").await;
    assert_eq!(ids(&found), [leads[0].id]);
    let recorded = amo.sandbox.requests();
    assert_eq!((recorded[0].path.as_str(), recorded[0].status), (COMPLEX, 0));
    assert_eq!(amo.sandbox.faults().pending(), 1, "the GET fault still waits");
}

#[tokio::test]
async fn the_older_leads_endpoint_stores_leads_the_list_shows() {
    let amo = Amo::unlimited().await;

    let body = amo.post_ok("/api/v4/leads", &json!([{ "name": "старый путь", "price": 10 }])).await;

    let id = body["_embedded"]["leads"][0]["id"].as_i64().unwrap();
    let listed = amo.list("/api/v4/leads").await;
    assert_eq!(ids(&listed), [id]);
    assert_eq!(listed["_embedded"]["leads"][0]["price"], 10);
    let new_contact = json!([{ "name": "x", "_embedded": { "contacts": [{ "name": "нельзя" }] } }]);
    assert_eq!(amo.post("/api/v4/leads", &new_contact).await.unwrap().status(), 400);
}
