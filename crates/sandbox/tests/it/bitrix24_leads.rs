//! Bitrix24 leads, deals and contacts as a client sees them over HTTP:
//! adds that keep what the entity has, lists by `ORIGINATOR_ID` /
//! `ORIGIN_ID` with string ids, the CRM mode, `batch` with `$result[…]`
//! and `halt`, and the faults a lead delivery must survive (refused before
//! running, created but never answered, a refused command inside a batch).

use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig, query_limit_exceeded};
use crm_connect_sandbox::faults::Fault;
use serde_json::{Value, json};

pub(crate) fn unlimited() -> B24SandboxConfig {
    B24SandboxConfig { bucket_capacity: 0, ..B24SandboxConfig::default() }
}

pub(crate) async fn portal(config: B24SandboxConfig) -> B24Sandbox {
    B24Sandbox::start(config).await.unwrap()
}

pub(crate) async fn call(portal: &B24Sandbox, method: &str, params: &Value) -> Result<(u16, Value), reqwest::Error> {
    let answer = reqwest::Client::new().post(format!("{}{method}", portal.webhook_url())).json(params).send().await?;
    let status = answer.status().as_u16();
    Ok((status, answer.json().await?))
}

pub(crate) async fn ok(portal: &B24Sandbox, method: &str, params: &Value) -> Value {
    let (status, body) = call(portal, method, params).await.unwrap();
    assert_eq!(status, 200, "{method}: {body}");
    body
}

pub(crate) fn add(fields: Value) -> Value {
    json!({ "fields": fields, "params": { "REGISTER_SONET_EVENT": "Y" } })
}

fn by_origin(key: &str) -> Value {
    json!({ "filter": { "ORIGINATOR_ID": "crm-connect", "ORIGIN_ID": key }, "select": ["ID", "ORIGIN_ID"] })
}

/// The deal-with-contact batch of a lead delivery: `c` then `d`.
pub(crate) fn deal_batch(key: &str, deal_extra: &str) -> Value {
    let contact = format!(
        "crm.contact.add?fields[NAME]=Анна&fields[PHONE][0][VALUE]=%2B79990001122&fields[PHONE][0][VALUE_TYPE]=WORK\
         &fields[ORIGINATOR_ID]=crm-connect&fields[ORIGIN_ID]={key}&params[REGISTER_SONET_EVENT]=Y"
    );
    let deal = format!(
        "crm.deal.add?fields[TITLE]=Заявка&fields[CONTACT_IDS][0]=$result[c]&fields[ORIGINATOR_ID]=crm-connect\
         &fields[ORIGIN_ID]={key}&params[REGISTER_SONET_EVENT]=Y{deal_extra}"
    );
    json!({ "halt": 1, "cmd": { "c": contact, "d": deal } })
}

#[tokio::test]
async fn a_lead_keeps_its_fields_drops_unknown_ones_and_answers_an_integer_id() {
    let portal = portal(unlimited()).await;
    let fields = json!({
        "TITLE": "Заявка с сайта",
        "NAME": "Анна",
        "PHONE": [{ "VALUE": "+79990001122", "VALUE_TYPE": "WORK" }],
        "EMAIL": [{ "VALUE": "anna@example.com", "VALUE_TYPE": "WORK" }],
        "COMMENTS": "Перезвонить",
        "OPPORTUNITY": 1500.5,
        "SOURCE_DESCRIPTION": "site",
        "STATUS_ID": "IN_PROCESS",
        "UTM_SOURCE": "google",
        "ASSIGNED_BY_ID": 5,
        "ORIGINATOR_ID": "crm-connect",
        "ORIGIN_ID": "key-1",
        "UF_CRM_CAMPAIGN": "spring",
        "NO_SUCH_FIELD": "dropped",
    });

    let body = ok(&portal, "crm.lead.add", &add(fields)).await;

    let leads = portal.leads();
    assert_eq!(leads.len(), 1);
    assert_eq!(body["result"].as_i64(), Some(leads[0].id));
    let lead = &leads[0];
    assert_eq!(lead.title, "Заявка с сайта");
    for (field, value) in [
        ("NAME", "Анна"),
        ("PHONE", "+79990001122"),
        ("EMAIL", "anna@example.com"),
        ("COMMENTS", "Перезвонить"),
        ("STATUS_ID", "IN_PROCESS"),
        ("UTM_SOURCE", "google"),
        ("ASSIGNED_BY_ID", "5"),
        ("ORIGIN_ID", "key-1"),
        ("UF_CRM_CAMPAIGN", "spring"),
    ] {
        assert_eq!(lead.text(field).as_deref(), Some(value), "{field}");
    }
    assert_eq!(lead.fields["PHONE"][0]["VALUE_TYPE"], "WORK");
    assert!(lead.text("NO_SUCH_FIELD").is_none());
    assert_eq!(portal.creates(), 1);
}

#[tokio::test]
async fn a_deal_holds_no_phone_or_email_and_lands_in_its_category() {
    let portal = portal(unlimited()).await;
    let contact = ok(&portal, "crm.contact.add", &add(json!({ "NAME": "Борис" }))).await["result"].as_i64().unwrap();
    let fields = json!({
        "TITLE": "Сделка",
        "CATEGORY_ID": 1,
        "STAGE_ID": "C1:PREPARATION",
        "PHONE": [{ "VALUE": "+7999" }],
        "EMAIL": [{ "VALUE": "x@example.com" }],
        "CONTACT_IDS": [contact],
        "OPPORTUNITY": "100",
    });

    ok(&portal, "crm.deal.add", &add(fields)).await;
    ok(&portal, "crm.deal.add", &add(json!({ "TITLE": "Без стадии", "CATEGORY_ID": "2" }))).await;

    let deals = portal.deals();
    assert_eq!((deals[0].category_id, deals[0].stage_id.as_deref()), (1, Some("C1:PREPARATION")));
    assert_eq!(deals[0].contact_ids, [contact]);
    assert!(deals[0].text("PHONE").is_none() && deals[0].text("EMAIL").is_none());
    assert_eq!((deals[1].category_id, deals[1].stage_id.as_deref()), (2, None));
    assert_eq!(deals[1].text("STAGE_ID").as_deref(), Some("C2:NEW"), "the category's first stage");
    let listed =
        ok(&portal, "crm.deal.list", &json!({ "select": ["ID", "STAGE_ID", "OPPORTUNITY", "CONTACT_ID"] })).await;
    assert_eq!(
        listed["result"][0],
        json!({ "ID": deals[0].id.to_string(), "STAGE_ID": "C1:PREPARATION", "OPPORTUNITY": "100.00", "CONTACT_ID": contact.to_string() })
    );
}

#[tokio::test]
async fn an_unknown_stage_or_status_is_a_400_with_an_empty_code_and_nothing_is_stored() {
    let portal = portal(unlimited()).await;

    for (method, fields) in [
        ("crm.deal.add", json!({ "TITLE": "x", "CATEGORY_ID": 1, "STAGE_ID": "C2:NEW" })),
        ("crm.deal.add", json!({ "TITLE": "x", "STAGE_ID": "NOWHERE" })),
        ("crm.deal.add", json!({ "TITLE": "x", "CATEGORY_ID": 42 })),
        ("crm.lead.add", json!({ "TITLE": "x", "STATUS_ID": "NOWHERE" })),
    ] {
        let (status, body) = call(&portal, method, &add(fields)).await.unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "", "{body}");
        assert!(!body["error_description"].as_str().unwrap().is_empty());
    }
    assert!(portal.deals().is_empty() && portal.leads().is_empty());
    assert_eq!(portal.creates(), 0);
}

#[tokio::test]
async fn the_crm_mode_is_a_knob_and_the_simple_mode_refuses_leads() {
    let portal = portal(unlimited()).await;
    assert_eq!(ok(&portal, "crm.settings.mode.get", &json!({})).await["result"], 1);

    portal.set_crm_mode(2);

    assert_eq!(ok(&portal, "crm.settings.mode.get", &json!({})).await["result"], 2);
    let (status, body) = call(&portal, "crm.lead.add", &add(json!({ "TITLE": "x" }))).await.unwrap();
    assert_eq!(status, 400);
    assert!(body["error_description"].is_string());
    ok(&portal, "crm.deal.add", &add(json!({ "TITLE": "сделки есть" }))).await;
    assert!(portal.leads().is_empty());
    assert_eq!(portal.deals().len(), 1);
}

#[tokio::test]
async fn lists_filter_on_the_origin_columns_and_give_ids_as_strings() {
    let portal = portal(unlimited()).await;
    for key in ["a", "b", "b"] {
        let fields = json!({ "TITLE": key, "ORIGINATOR_ID": "crm-connect", "ORIGIN_ID": key });
        ok(&portal, "crm.lead.add", &add(fields.clone())).await;
        ok(&portal, "crm.deal.add", &add(fields)).await;
        ok(&portal, "crm.contact.add", &add(json!({ "NAME": key, "ORIGINATOR_ID": "crm-connect", "ORIGIN_ID": key })))
            .await;
    }
    ok(&portal, "crm.lead.add", &add(json!({ "TITLE": "чужой", "ORIGINATOR_ID": "other", "ORIGIN_ID": "b" }))).await;

    for method in ["crm.lead.list", "crm.deal.list", "crm.contact.list"] {
        let body = ok(&portal, method, &by_origin("b")).await;
        assert_eq!(
            body["result"],
            json!([{ "ID": "2", "ORIGIN_ID": "b" }, { "ID": "3", "ORIGIN_ID": "b" }]),
            "{method}"
        );
        assert_eq!(body["total"], 2);
        assert!(body.get("next").is_none());
        let none = ok(&portal, method, &by_origin("zzz")).await;
        assert_eq!(none["result"], json!([]));
    }
    let all = ok(&portal, "crm.lead.list", &json!({ "order": { "ID": "DESC" } })).await;
    let first = &all["result"][0];
    assert_eq!((first["ID"].clone(), first["TITLE"].clone()), (json!("4"), json!("чужой")));
    assert!(first["ASSIGNED_BY_ID"].is_string() && first["DATE_CREATE"].is_string());
    assert!(first.get("PHONE").is_none(), "multi-fields only when selected");
}

#[tokio::test]
async fn lists_come_in_pages_of_fifty_with_an_integer_next_absent_on_the_last() {
    let portal = portal(unlimited()).await;
    for n in 0..51 {
        ok(&portal, "crm.contact.add", &add(json!({ "NAME": format!("c{n}"), "ORIGINATOR_ID": "crm-connect" }))).await;
    }
    let filter = json!({ "ORIGINATOR_ID": "crm-connect" });

    let first = ok(&portal, "crm.contact.list", &json!({ "filter": filter, "select": ["ID"] })).await;
    let second = ok(&portal, "crm.contact.list", &json!({ "filter": filter, "select": ["ID"], "start": 50 })).await;

    assert_eq!(first["result"].as_array().unwrap().len(), 50);
    assert_eq!(first["next"], 50);
    assert_eq!(first["total"], 51);
    assert_eq!(second["result"], json!([{ "ID": "51" }]));
    assert!(second.get("next").is_none());
}

#[tokio::test]
async fn a_deal_batch_links_the_new_contact_through_result_c() {
    let portal = portal(unlimited()).await;

    let body = ok(&portal, "batch", &deal_batch("key-9", "")).await;

    let contacts = portal.contacts();
    let deals = portal.deals();
    assert_eq!((contacts.len(), deals.len()), (1, 1));
    assert_eq!(body["result"]["result"], json!({ "c": contacts[0].id, "d": deals[0].id }));
    assert_eq!(body["result"]["result_error"], json!([]));
    assert_eq!(deals[0].contact_ids, [contacts[0].id]);
    assert_eq!(contacts[0].text("PHONE").as_deref(), Some("+79990001122"));
    assert_eq!(deals[0].text("ORIGIN_ID").as_deref(), Some("key-9"));
    assert_eq!(portal.creates(), 2);
}

#[tokio::test]
async fn a_reference_inside_a_longer_value_or_to_a_field_is_replaced_by_its_text() {
    let portal = portal(unlimited()).await;
    ok(&portal, "crm.contact.add", &add(json!({ "NAME": "первый" }))).await;
    let cmd = json!({
        "first": "crm.contact.list?select[]=ID&select[]=NAME",
        "then": "crm.deal.add?fields[TITLE]=для $result[first][0][NAME] (%23$result[first][0][ID])",
    });

    ok(&portal, "batch", &json!({ "halt": 0, "cmd": cmd })).await;

    assert_eq!(portal.deals()[0].title, "для первый (#1)");
}

#[tokio::test]
async fn with_halt_a_refused_deal_stops_the_batch_but_the_contact_stays() {
    let portal = portal(unlimited()).await;
    let mut batch = deal_batch("key-3", "&fields[CATEGORY_ID]=1&fields[STAGE_ID]=C9:NOWHERE");
    // Sent after `d` (keys go out sorted).
    batch["cmd"]["x"] = json!("crm.lead.add?fields[TITLE]=never");

    let body = ok(&portal, "batch", &batch).await;

    let answer = &body["result"];
    let contact = portal.contacts()[0].id;
    assert_eq!(answer["result"], json!({ "c": contact }));
    assert_eq!(answer["result_error"]["d"]["error"], "");
    assert!(answer["result_error"]["d"]["error_description"].is_string());
    assert!(answer["result_error"].get("x").is_none());
    assert!(portal.deals().is_empty() && portal.leads().is_empty(), "halted: nothing after the refused deal ran");
    let found = ok(&portal, "crm.contact.list", &by_origin("key-3")).await;
    assert_eq!(found["result"], json!([{ "ID": contact.to_string(), "ORIGIN_ID": "key-3" }]), "a batch is not atomic");
}

#[tokio::test]
async fn a_refusal_on_demand_fails_one_command_inside_a_batch() {
    let portal = portal(unlimited()).await;
    portal.refuse_calls("crm.deal.add", 1, 400, "", "Поле заполнено неверно");

    let body = ok(&portal, "batch", &deal_batch("key-4", "")).await;

    assert_eq!(
        body["result"]["result_error"]["d"],
        json!({ "error": "", "error_description": "Поле заполнено неверно" })
    );
    assert_eq!((portal.contacts().len(), portal.deals().len()), (1, 0));
    // Used up: the deal alone goes through next.
    ok(&portal, "crm.deal.add", &add(json!({ "TITLE": "повтор" }))).await;
    assert_eq!(portal.deals().len(), 1);
}

#[tokio::test]
async fn query_limit_exceeded_is_refused_before_anything_runs() {
    let config = B24SandboxConfig { bucket_capacity: 1, drain_per_sec: 0.0, ..B24SandboxConfig::default() };
    let portal = portal(config).await;

    ok(&portal, "crm.lead.add", &add(json!({ "TITLE": "первый" }))).await;
    let (status, body) = call(&portal, "batch", &deal_batch("key-5", "")).await.unwrap();

    assert_eq!(status, 503);
    assert_eq!(body["error"], "QUERY_LIMIT_EXCEEDED");
    assert_eq!((portal.leads().len(), portal.contacts().len(), portal.deals().len()), (1, 0, 0));
    assert_eq!(portal.creates(), 1);
}

#[tokio::test]
async fn an_injected_query_limit_on_one_method_spares_the_others() {
    let portal = portal(unlimited()).await;
    portal.faults().inject_for("POST", &portal.method_path("crm.lead.add"), query_limit_exceeded(), 1);

    ok(&portal, "crm.deal.add", &add(json!({ "TITLE": "сделка" }))).await;
    let (status, body) = call(&portal, "crm.lead.add", &add(json!({ "TITLE": "лид" }))).await.unwrap();
    assert_eq!((status, body["error"].clone()), (503, json!("QUERY_LIMIT_EXCEEDED")));
    assert!(portal.leads().is_empty());
    ok(&portal, "crm.lead.add", &add(json!({ "TITLE": "лид" }))).await;
    assert_eq!(portal.leads().len(), 1);
}

#[tokio::test]
async fn a_batch_whose_connection_drops_created_both_and_a_lookup_finds_them() {
    let portal = portal(unlimited()).await;
    portal.faults().inject_for("POST", &portal.method_path("batch"), Fault::DropAfterExecuting, 1);

    let sent = call(&portal, "batch", &deal_batch("key-6", "")).await;

    assert!(sent.is_err(), "no answer: {sent:?}");
    let lookup = json!({ "halt": 0, "cmd": {
        "deal": "crm.deal.list?filter[ORIGINATOR_ID]=crm-connect&filter[ORIGIN_ID]=key-6&select[]=ID&select[]=ORIGIN_ID",
        "contact": "crm.contact.list?filter[ORIGINATOR_ID]=crm-connect&filter[ORIGIN_ID]=key-6&select[]=ID&select[]=ORIGIN_ID",
    }});
    let body = ok(&portal, "batch", &lookup).await;
    let found = &body["result"]["result"];
    assert_eq!(found["deal"][0]["ID"], portal.deals()[0].id.to_string());
    assert_eq!(found["contact"][0]["ID"], portal.contacts()[0].id.to_string());
    assert_eq!(portal.requests()[0].status, 0);
}

#[tokio::test]
async fn an_ignored_filter_lists_rows_that_do_not_match_it() {
    let portal = portal(unlimited()).await;
    for key in ["x", "y"] {
        ok(&portal, "crm.deal.add", &add(json!({ "TITLE": key, "ORIGINATOR_ID": "crm-connect", "ORIGIN_ID": key })))
            .await;
    }
    portal.set_ignore_list_filters(true);

    let body = ok(&portal, "crm.deal.list", &by_origin("y")).await;

    assert_eq!(body["result"], json!([{ "ID": "1", "ORIGIN_ID": "x" }, { "ID": "2", "ORIGIN_ID": "y" }]));
}
