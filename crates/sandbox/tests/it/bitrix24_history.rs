//! Bitrix24 stage history and `crm.item.list` as a client sees them over
//! HTTP: a `TYPE_ID` 1 record for every new lead or deal (inside a batch
//! too), 2, 3 and 5 for moves, `start: -1` pages without `total` or
//! `next`, offset pages with both, the filters and `order`, ids that leave
//! holes and commit out of order, a portal refusing `CREATED_TIME`, both
//! methods as batch commands in PHP bracket form, and the bucket and
//! faults in front.

use std::time::Duration;

use crm_connect_sandbox::bitrix24::{B24Sandbox, B24SandboxConfig, HistoryEntity, StageChange, query_limit_exceeded};
use crm_connect_sandbox::hook::HookError;
use serde_json::{Value, json};

use crate::bitrix24_leads::{add, call, deal_batch, ok, portal, unlimited};

const LEADS: i64 = 1;
const DEALS: i64 = 2;

/// The items of a `crm.stagehistory.list` that must succeed.
async fn history(portal: &B24Sandbox, params: Value) -> Vec<Value> {
    ok(portal, "crm.stagehistory.list", &params).await["result"]["items"].as_array().unwrap().clone()
}

/// Records after `after`, ascending, without counting: a funnel poll's call.
async fn after(portal: &B24Sandbox, entity_type_id: i64, after: i64) -> Vec<Value> {
    let params =
        json!({ "entityTypeId": entity_type_id, "order": { "ID": "ASC" }, "filter": { ">ID": after }, "start": -1 });
    history(portal, params).await
}

fn ids(items: &[Value]) -> Vec<i64> {
    items.iter().map(|item| item["ID"].as_i64().unwrap()).collect()
}

fn moves(items: &[Value]) -> Vec<(i64, i64, &str)> {
    items
        .iter()
        .map(|item| (item["OWNER_ID"].as_i64().unwrap(), item["TYPE_ID"].as_i64().unwrap(), stage(item)))
        .collect()
}

fn stage(item: &Value) -> &str {
    item.get("STAGE_ID").or(item.get("STATUS_ID")).and_then(Value::as_str).unwrap()
}

/// A deal of the default pipeline made outside the API, in `NEW`.
fn deal(portal: &B24Sandbox) -> i64 {
    portal.create_deal(0, "NEW", 1).unwrap()
}

#[tokio::test]
async fn a_new_lead_or_deal_starts_its_history_with_one_created_record() {
    let portal = portal(unlimited()).await;
    let lead = ok(&portal, "crm.lead.add", &add(json!({ "TITLE": "Заявка", "STATUS_ID": "IN_PROCESS" }))).await;
    ok(&portal, "batch", &deal_batch("key-1", "&fields[CATEGORY_ID]=1&fields[STAGE_ID]=C1:PREPARATION")).await;
    let deal_id = portal.deals()[0].id;

    let answer = ok(&portal, "crm.stagehistory.list", &json!({ "entityTypeId": DEALS, "start": -1 })).await;
    let leads = after(&portal, LEADS, 0).await;

    let deals = answer["result"]["items"].as_array().unwrap();
    assert_eq!(deals.len(), 1);
    let created = deals[0]["CREATED_TIME"].as_str().unwrap().to_owned();
    assert_eq!(
        deals[0],
        json!({
            "ID": 1, "TYPE_ID": 1, "OWNER_ID": deal_id, "CREATED_TIME": created,
            "CATEGORY_ID": 1, "STAGE_SEMANTIC_ID": "P", "STAGE_ID": "C1:PREPARATION",
        })
    );
    let dated = chrono::DateTime::parse_from_rfc3339(&created).unwrap();
    assert!(created.ends_with("+03:00"), "{created}");
    assert!((dated.timestamp() - portal.now_unix()).abs() <= 2);
    assert!(answer.get("total").is_none() && answer.get("next").is_none(), "start -1 counts nothing: {answer}");
    assert!(answer["time"]["start"].is_number());
    assert_eq!(leads.len(), 1);
    assert_eq!(leads[0]["OWNER_ID"], lead["result"]);
    assert_eq!(
        (leads[0]["STATUS_ID"].as_str(), leads[0]["STATUS_SEMANTIC_ID"].as_str()),
        (Some("IN_PROCESS"), Some("P"))
    );
    assert!(leads[0].get("CATEGORY_ID").is_none());
}

#[tokio::test]
async fn moves_are_type_2_to_an_intermediate_stage_3_to_a_final_one_and_5_to_another_pipeline() {
    let portal = portal(unlimited()).await;
    let (first, second) = (deal(&portal), deal(&portal));
    let lead = portal.create_lead("NEW", 1).unwrap();

    portal.move_deal(first, "PREPARATION").unwrap();
    portal.move_deal(first, "WON").unwrap();
    portal.move_deal_to_category(second, 2, "C2:UC_LAFJPE").unwrap();
    portal.move_deal(second, "C2:APOLOGY").unwrap();
    portal.move_lead(lead, "IN_PROCESS").unwrap();
    portal.move_lead(lead, "JUNK").unwrap();

    let deals = after(&portal, DEALS, 0).await;
    assert_eq!(
        moves(&deals),
        [
            (first, 1, "NEW"),
            (second, 1, "NEW"),
            (first, 2, "PREPARATION"),
            (first, 3, "WON"),
            (second, 5, "C2:UC_LAFJPE"),
            (second, 3, "C2:APOLOGY")
        ]
    );
    let semantics: Vec<&str> = deals.iter().map(|item| item["STAGE_SEMANTIC_ID"].as_str().unwrap()).collect();
    assert_eq!(semantics, ["P", "P", "P", "S", "P", "F"]);
    assert_eq!(deals[4]["CATEGORY_ID"], 2);
    assert_eq!(moves(&after(&portal, LEADS, 0).await), [(lead, 1, "NEW"), (lead, 2, "IN_PROCESS"), (lead, 3, "JUNK")]);
    let listed =
        ok(&portal, "crm.deal.list", &json!({ "filter": { "ID": second }, "select": ["STAGE_ID", "CATEGORY_ID"] }))
            .await;
    assert_eq!(listed["result"][0]["STAGE_ID"], "C2:APOLOGY");
    assert_eq!(listed["result"][0]["CATEGORY_ID"], "2");
}

#[tokio::test]
async fn without_counting_pages_hold_fifty_and_paging_by_id_reaches_the_end() {
    let portal = portal(unlimited()).await;
    let id = deal(&portal);
    for index in 0..119 {
        portal.move_deal(id, if index % 2 == 0 { "PREPARATION" } else { "EXECUTING" }).unwrap();
    }

    let mut cursor = 0;
    let mut sizes = Vec::new();
    loop {
        let page = after(&portal, DEALS, cursor).await;
        sizes.push(page.len());
        if page.len() < 50 {
            break;
        }
        cursor = *ids(&page).last().unwrap();
    }
    let counted = ok(&portal, "crm.stagehistory.list", &json!({ "entityTypeId": DEALS, "start": 100 })).await;
    let first = ok(&portal, "crm.stagehistory.list", &json!({ "entityTypeId": DEALS, "start": 0 })).await;

    assert_eq!(sizes, [50, 50, 20]);
    assert_eq!((first["total"].as_i64(), first["next"].as_i64()), (Some(120), Some(50)));
    assert_eq!(counted["result"]["items"].as_array().unwrap().len(), 20);
    assert_eq!(counted["total"], 120);
    assert!(counted.get("next").is_none(), "no next on the last page");
}

#[tokio::test]
async fn filters_take_id_owner_type_and_created_time_bounds_and_order_descends() {
    let portal = portal(unlimited()).await;
    let (first, second) = (deal(&portal), deal(&portal));
    let t = portal.now_unix() + 3600;
    portal.apply_stage_change(StageChange::deal(first, "PREPARATION").at(t)).unwrap();
    portal.apply_stage_change(StageChange::deal(second, "EXECUTING").at(t + 60)).unwrap();
    portal.apply_stage_change(StageChange::deal(first, "LOSE").at(t + 120)).unwrap();
    let on = |filter: Value| json!({ "entityTypeId": DEALS, "filter": filter, "start": -1 });
    let iso = |unix: i64| chrono::DateTime::from_timestamp(unix, 0).unwrap().to_rfc3339();

    assert_eq!(ids(&history(&portal, on(json!({ ">=ID": 2, "<ID": 5 }))).await), [2, 3, 4]);
    assert_eq!(ids(&history(&portal, on(json!({ "<=ID": 2 }))).await), [1, 2]);
    assert_eq!(ids(&history(&portal, on(json!({ "OWNER_ID": first }))).await), [1, 3, 5]);
    assert_eq!(ids(&history(&portal, on(json!({ "@OWNER_ID": [first, second], "!=TYPE_ID": 1 }))).await), [3, 4, 5]);
    assert_eq!(ids(&history(&portal, on(json!({ ">=CREATED_TIME": iso(t + 60) }))).await), [4, 5]);
    assert_eq!(ids(&history(&portal, on(json!({ "<CREATED_TIME": iso(t) }))).await), [1, 2]);
    let look_back = json!({ "entityTypeId": DEALS, "order": { "ID": "DESC" }, "filter": { "OWNER_ID": first, "<ID": 5 }, "start": -1 });
    assert_eq!(ids(&history(&portal, look_back).await), [3, 1]);
}

#[tokio::test]
async fn unknown_columns_and_a_refused_created_time_are_invalid_arg_value_alone_and_in_a_batch() {
    let portal = portal(unlimited()).await;
    deal(&portal);
    let by_time =
        json!({ "entityTypeId": DEALS, "filter": { "<CREATED_TIME": "2030-01-01T00:00:00+03:00" }, "start": -1 });
    assert_eq!(history(&portal, by_time.clone()).await.len(), 1, "allowed until refused");

    portal.refuse_created_time_filter(true);

    let (status, body) = call(&portal, "crm.stagehistory.list", &by_time).await.unwrap();
    assert_eq!(status, 400);
    assert_eq!(body["error"], "INVALID_ARG_VALUE");
    assert_eq!(body["error_description"], "Invalid filter: field 'CREATED_TIME' is not allowed in filter");
    let command =
        "crm.stagehistory.list?entityTypeId=2&filter%5B%3CCREATED_TIME%5D=2030-01-01T00%3A00%3A00%2B03%3A00&start=-1";
    let batch = ok(&portal, "batch", &json!({ "halt": 0, "cmd": { "h": command } })).await;
    assert_eq!(batch["result"]["result_error"]["h"]["error"], "INVALID_ARG_VALUE");
    let (status, body) =
        call(&portal, "crm.stagehistory.list", &json!({ "entityTypeId": DEALS, "filter": { "FOO": 1 } }))
            .await
            .unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("INVALID_ARG_VALUE")));
    let (status, body) = call(&portal, "crm.stagehistory.list", &json!({ "entityTypeId": 7 })).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("ENTITY_TYPE_NOT_SUPPORTED")));
}

#[tokio::test]
async fn a_reserved_id_is_listed_only_once_committed_after_higher_ids_were() {
    let portal = portal(unlimited()).await;
    let (first, second) = (deal(&portal), deal(&portal));
    let reservation = portal.reserve_history_id(HistoryEntity::Deal);
    portal.advance_clock(Duration::from_secs(30));
    let later = portal.move_deal(second, "EXECUTING").unwrap();

    let before_commit = after(&portal, DEALS, 2).await;
    let committed = portal.commit_stage_change(reservation, StageChange::deal(first, "WON")).unwrap();
    let after_commit = after(&portal, DEALS, 2).await;

    assert_eq!((committed, later), (3, 4));
    assert_eq!(ids(&before_commit), [4]);
    assert_eq!(ids(&after_commit), [3, 4]);
    let time = |item: &Value| chrono::DateTime::parse_from_rfc3339(item["CREATED_TIME"].as_str().unwrap()).unwrap();
    assert!(time(&after_commit[0]) < time(&after_commit[1]), "the record keeps the time of its reservation");
    assert!(after(&portal, DEALS, 4).await.is_empty());
}

#[tokio::test]
async fn ids_have_holes_where_gaps_are_left_or_reservations_dropped() {
    let portal = portal(unlimited()).await;
    let id = deal(&portal);
    portal.leave_history_id_gap(HistoryEntity::Deal, 5);
    portal.move_deal(id, "PREPARATION").unwrap();
    let _never_committed = portal.reserve_history_id(HistoryEntity::Deal);
    portal.move_deal(id, "EXECUTING").unwrap();

    assert_eq!(ids(&after(&portal, DEALS, 0).await), [1, 7, 9]);
    let lead = portal.create_lead("NEW", 1).unwrap();
    assert_eq!(portal.move_lead(lead, "PROCESSED"), Ok(2), "each entity type counts its own ids");
}

#[tokio::test]
async fn both_methods_run_as_batch_commands_in_php_bracket_form() {
    let portal = portal(unlimited()).await;
    let (first, second) = (portal.create_deal(0, "NEW", 5).unwrap(), portal.create_deal(1, "C1:NEW", 6).unwrap());
    let lead = portal.create_lead("NEW", 7).unwrap();
    portal.move_deal(second, "C1:WON").unwrap();
    let cmd = json!({
        "deals": "crm.stagehistory.list?entityTypeId=2&order%5BID%5D=ASC&filter%5B%3EID%5D=1&select%5B%5D=ID&select%5B%5D=OWNER_ID&start=-1",
        "leads": "crm.stagehistory.list?entityTypeId=1&order[ID]=DESC&filter[>=ID]=1&start=-1",
        "users": format!("crm.item.list?entityTypeId=2&filter[@id][]={first}&filter[@id][]={second}&select[]=id&select[]=assignedById"),
    });

    let body = ok(&portal, "batch", &json!({ "halt": 0, "cmd": cmd })).await;

    let results = &body["result"]["result"];
    assert_eq!(results["deals"]["items"], json!([{ "ID": 2, "OWNER_ID": second }, { "ID": 3, "OWNER_ID": second }]));
    assert_eq!(results["leads"]["items"][0]["OWNER_ID"], lead);
    assert_eq!(
        results["users"]["items"],
        json!([{ "id": first, "assignedById": 5 }, { "id": second, "assignedById": 6 }])
    );
    assert_eq!(body["result"]["result_total"]["users"], 2);
    assert_eq!(body["result"]["result_error"], json!([]));
}

#[tokio::test]
async fn item_list_answers_integer_ids_and_current_assigned_users_of_the_ids_asked() {
    let portal = portal(unlimited()).await;
    let deal_id = ok(&portal, "crm.deal.add", &add(json!({ "TITLE": "Сделка", "ASSIGNED_BY_ID": 5 }))).await["result"]
        .as_i64()
        .unwrap();
    let other = deal(&portal);
    let lead = portal.create_lead("NEW", 3).unwrap();

    portal.set_assigned_by_id(HistoryEntity::Deal, deal_id, 9).unwrap();

    let params =
        json!({ "entityTypeId": DEALS, "filter": { "@id": [deal_id, other, 999] }, "select": ["id", "assignedById"] });
    let body = ok(&portal, "crm.item.list", &params).await;
    assert_eq!(
        body["result"],
        json!({ "items": [{ "id": deal_id, "assignedById": 9 }, { "id": other, "assignedById": 1 }] })
    );
    assert_eq!(body["total"], 2);
    let leads = ok(
        &portal,
        "crm.item.list",
        &json!({ "entityTypeId": LEADS, "filter": { "@id": [lead] }, "select": ["id", "assignedById"] }),
    )
    .await;
    assert_eq!(leads["result"]["items"], json!([{ "id": lead, "assignedById": 3 }]));
    let (status, refused) =
        call(&portal, "crm.item.list", &json!({ "entityTypeId": DEALS, "filter": { "@nothing": [1] } })).await.unwrap();
    assert_eq!((status, refused["error"].as_str()), (400, Some("INVALID_ARG_VALUE")));
    assert_eq!(portal.creates(), 1, "hooks are not API creates");
}

#[tokio::test]
async fn numbers_can_come_as_strings_on_demand() {
    let portal = portal(unlimited()).await;
    deal(&portal);

    portal.set_history_numbers_as_strings(true);

    let items = after(&portal, DEALS, 0).await;
    assert_eq!(
        (items[0]["ID"].as_str(), items[0]["TYPE_ID"].as_str(), items[0]["CATEGORY_ID"].as_str()),
        (Some("1"), Some("1"), Some("0"))
    );
}

#[tokio::test]
async fn hooks_refuse_what_the_portal_would_not_do_and_change_nothing() {
    let portal = portal(unlimited()).await;
    let id = deal(&portal);
    let lead = portal.create_lead("NEW", 1).unwrap();

    assert_eq!(portal.move_deal(99, "WON"), Err(HookError::UnknownEntity { kind: "deal", id: 99 }));
    assert!(matches!(portal.move_deal(id, "C1:WON"), Err(HookError::UnknownStage { .. })));
    assert!(matches!(portal.move_lead(lead, "WON"), Err(HookError::UnknownStage { .. })));
    assert_eq!(
        portal.move_deal_to_category(id, 0, "WON"),
        Err(HookError::SamePipeline { kind: "deal", id, pipeline: 0 })
    );
    assert_eq!(portal.move_deal_to_category(id, 42, "C42:NEW"), Err(HookError::UnknownPipeline(42)));
    let reservation = portal.reserve_history_id(HistoryEntity::Lead);
    assert!(matches!(
        portal.commit_stage_change(reservation, StageChange::deal(id, "WON")),
        Err(HookError::ReservationMismatch { .. })
    ));
    assert_eq!(portal.stage_history(HistoryEntity::Deal).len(), 1);
    assert_eq!(portal.deals()[0].text("STAGE_ID").as_deref(), Some("NEW"));
}

#[tokio::test]
async fn history_calls_pass_the_bucket_faults_and_the_request_log_and_are_dated_by_the_clock() {
    let portal =
        portal(B24SandboxConfig { bucket_capacity: 2, drain_per_sec: 0.0, ..B24SandboxConfig::default() }).await;
    portal.advance_clock(Duration::from_secs(86_400));
    portal.faults().inject_for("POST", &portal.method_path("crm.stagehistory.list"), query_limit_exceeded(), 1);
    let params = json!({ "entityTypeId": DEALS, "start": -1 });

    let faulted = call(&portal, "crm.stagehistory.list", &params).await.unwrap();
    let answer = reqwest::Client::new()
        .post(format!("{}crm.stagehistory.list", portal.webhook_url()))
        .json(&params)
        .send()
        .await
        .unwrap();
    let date = answer.headers()["date"].to_str().unwrap().to_owned();
    let second = call(&portal, "crm.item.list", &json!({ "entityTypeId": DEALS })).await.unwrap();
    let refused = call(&portal, "crm.stagehistory.list", &params).await.unwrap();

    assert_eq!((faulted.0, faulted.1["error"].as_str()), (503, Some("QUERY_LIMIT_EXCEEDED")));
    assert_eq!(answer.status(), 200);
    assert!(
        (chrono::DateTime::parse_from_rfc2822(&date).unwrap().timestamp() - portal.now_unix()).abs() <= 2,
        "{date}"
    );
    assert_eq!(second.0, 200);
    assert_eq!((refused.0, refused.1["error"].as_str()), (503, Some("QUERY_LIMIT_EXCEEDED")));
    assert_eq!(portal.violations(), 1);
    assert_eq!(portal.requests().iter().filter(|request| request.path.ends_with("/crm.stagehistory.list")).count(), 3);
}
