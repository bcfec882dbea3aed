//! AmoCRM's events feed as funnel history reads it over HTTP: the `Date`
//! header on the sandbox clock, `lead_added` without a status for a lead
//! created into a stage, `lead_status_changed` for a move, pages linked by
//! `_links.next` and 204 past them, the filters, an inclusive `created_at`
//! window, events that turn up late, the order knob, responsible users read
//! back through `GET /api/v4/leads`, and the limit and faults in front.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::DateTime;
use crm_connect_sandbox::amocrm::{AmoEventOrder, AmoSandboxConfig, LeadMove};
use crm_connect_sandbox::faults::Fault;
use crm_connect_sandbox::hook::HookError;
use serde_json::Value;

use crate::amocrm_leads::{Amo, PIPELINE, STATUS};

const FIRST_STATUS: i64 = 61_000_001;
const OTHER_PIPELINE: i64 = 7_000_002;
const OTHER_STATUS: i64 = 61_000_004;
const WON: i64 = 142;
const STATUS_FEED: &str = "/api/v4/events?filter[type]=lead_status_changed&filter[entity]=lead";

/// The events of a page that must hold some.
async fn events(amo: &Amo, path_and_query: &str) -> Vec<Value> {
    page(amo, path_and_query).await["_embedded"]["events"].as_array().unwrap().clone()
}

async fn page(amo: &Amo, path_and_query: &str) -> Value {
    let answer = amo.get(path_and_query).await;
    assert_eq!(answer.status(), 200, "{path_and_query}");
    answer.json().await.unwrap()
}

async fn status_of(amo: &Amo, path_and_query: &str) -> u16 {
    amo.get(path_and_query).await.status().as_u16()
}

fn ids(events: &[Value]) -> Vec<String> {
    events.iter().map(|event| event["id"].as_str().unwrap().to_owned()).collect()
}

fn window(from: i64, to: i64) -> String {
    format!("{STATUS_FEED}&filter[created_at][from]={from}&filter[created_at][to]={to}")
}

/// A lead made elsewhere, in the first status of the main pipeline.
fn lead(amo: &Amo) -> i64 {
    amo.sandbox.add_lead(PIPELINE, FIRST_STATUS, 9_000_001).unwrap()
}

#[tokio::test]
async fn every_answer_is_dated_by_the_sandbox_clock_refusals_included() {
    let amo = Amo::unlimited().await;
    amo.sandbox.advance_clock(Duration::from_secs(2 * 86_400));
    amo.sandbox.faults().inject("/api/v4/events", Fault::too_many_requests(), 1);

    for (path, status) in [("/api/v4/account", 200), ("/api/v4/events", 429), ("/api/v4/events", 204)] {
        let answer = amo.get(path).await;
        assert_eq!(answer.status(), status, "{path}");
        let date = answer.headers()["date"].to_str().unwrap().to_owned();
        assert!(date.ends_with(" GMT"), "{date}");
        let dated = DateTime::parse_from_rfc2822(&date).unwrap().timestamp();
        let real = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap();
        assert!((dated - amo.sandbox.now_unix()).abs() <= 2, "{date} against the sandbox clock");
        assert!(dated - real > 2 * 86_400 - 5, "{date} is not two days ahead");
    }
}

#[tokio::test]
async fn a_lead_created_into_a_stage_yields_lead_added_without_a_status_and_no_status_event() {
    let amo = Amo::unlimited().await;
    let id = amo.create("Заявка").await;

    assert_eq!(status_of(&amo, STATUS_FEED).await, 204);
    let added = events(&amo, "/api/v4/events?filter[type]=lead_added").await;
    assert_eq!(added.len(), 1);
    assert_eq!(added[0]["entity_id"], id);
    assert_eq!(added[0]["entity_type"], "lead");
    assert_eq!(added[0]["value_after"], serde_json::json!([]));
    assert_eq!(added[0]["value_before"], serde_json::json!([]));
}

#[tokio::test]
async fn a_move_yields_one_status_event_naming_both_statuses_and_pipelines() {
    let amo = Amo::unlimited().await;
    let id = amo.create("Заявка").await;
    let now = amo.sandbox.now_unix();

    let event_id = amo.sandbox.move_lead(id, OTHER_PIPELINE, OTHER_STATUS).unwrap();

    let listed = events(&amo, STATUS_FEED).await;
    assert_eq!(listed.len(), 1);
    let event = &listed[0];
    assert_eq!(event["id"], event_id.as_str());
    assert_eq!(event_id.len(), 26);
    assert!(event_id.chars().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()), "{event_id}");
    assert_eq!(event["type"], "lead_status_changed");
    assert_eq!((event["entity_id"].as_i64(), event["entity_type"].as_str()), (Some(id), Some("lead")));
    assert_eq!(event["created_by"], 9_000_001);
    assert!((event["created_at"].as_i64().unwrap() - now).abs() <= 2);
    assert_eq!(event["account_id"], AmoSandboxConfig::default().account_id);
    assert_eq!(
        event["value_before"],
        serde_json::json!([{ "lead_status": { "id": FIRST_STATUS, "pipeline_id": PIPELINE } }])
    );
    assert_eq!(
        event["value_after"],
        serde_json::json!([{ "lead_status": { "id": OTHER_STATUS, "pipeline_id": OTHER_PIPELINE } }])
    );
    let href = event["_links"]["self"]["href"].as_str().unwrap();
    assert!(href.ends_with(&format!("/api/v4/events/{event_id}")), "{href}");
    let read = amo.list(&format!("/api/v4/leads?filter[id][]={id}")).await;
    let lead = &read["_embedded"]["leads"][0];
    assert_eq!((lead["pipeline_id"].as_i64(), lead["status_id"].as_i64()), (Some(OTHER_PIPELINE), Some(OTHER_STATUS)));
}

#[tokio::test]
async fn pages_follow_links_next_until_the_last_and_a_page_past_it_is_204() {
    let amo = Amo::unlimited().await;
    let id = lead(&amo);
    let mut made = HashSet::new();
    for status in [STATUS, 61_000_003, FIRST_STATUS, WON, STATUS] {
        made.insert(amo.sandbox.move_lead(id, PIPELINE, status).unwrap());
    }

    let mut path = format!("{STATUS_FEED}&limit=2");
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    loop {
        let body = page(&amo, &path).await;
        pages.push(body["_page"].as_i64().unwrap());
        seen.extend(ids(body["_embedded"]["events"].as_array().unwrap()));
        let Some(next) = body["_links"]["next"]["href"].as_str() else {
            break;
        };
        path = next.strip_prefix(&amo.sandbox.base_url()).unwrap().to_owned();
    }

    assert_eq!(pages, [1, 2, 3]);
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), made);
    assert_eq!(status_of(&amo, &format!("{STATUS_FEED}&limit=2&page=4")).await, 204);
}

#[tokio::test]
async fn a_limit_above_one_hundred_is_capped_and_fifty_is_the_default() {
    let amo = Amo::unlimited().await;
    let id = lead(&amo);
    for index in 0..120 {
        let status = if index % 2 == 0 { STATUS } else { FIRST_STATUS };
        amo.sandbox.move_lead(id, PIPELINE, status).unwrap();
    }

    let capped = page(&amo, &format!("{STATUS_FEED}&limit=250")).await;
    let unasked = page(&amo, STATUS_FEED).await;

    assert_eq!(capped["_embedded"]["events"].as_array().unwrap().len(), 100);
    assert!(capped["_links"]["next"]["href"].as_str().unwrap().contains("limit=100"));
    assert_eq!(unasked["_embedded"]["events"].as_array().unwrap().len(), 50);
}

#[tokio::test]
async fn the_created_at_window_includes_both_ends() {
    let amo = Amo::unlimited().await;
    let id = lead(&amo);
    let t = amo.sandbox.now_unix() - 3600;
    let at = |offset: i64, status: i64| amo.sandbox.move_lead_with(id, LeadMove::to(PIPELINE, status).at(t + offset));
    let (early, start, end, late) =
        (at(-1, STATUS).unwrap(), at(0, WON).unwrap(), at(10, STATUS).unwrap(), at(11, WON).unwrap());

    let inside: HashSet<String> = ids(&events(&amo, &window(t, t + 10)).await).into_iter().collect();

    assert_eq!(inside, HashSet::from([start, end]));
    assert!(!inside.contains(&early) && !inside.contains(&late));
    assert_eq!(status_of(&amo, &window(t + 1, t + 9)).await, 204);
}

#[tokio::test]
async fn type_and_entity_filters_take_lists_in_either_form() {
    let amo = Amo::unlimited().await;
    let id = amo.create("Заявка").await;
    amo.sandbox.move_lead(id, PIPELINE, WON).unwrap();

    let bracketed = events(&amo, "/api/v4/events?filter[type][]=lead_status_changed&filter[entity][]=lead").await;
    let both = events(&amo, "/api/v4/events?filter[type]=lead_added,lead_status_changed").await;
    let both_bracketed =
        events(&amo, "/api/v4/events?filter[type][0]=lead_added&filter[type][1]=lead_status_changed").await;

    assert_eq!(bracketed.len(), 1);
    assert_eq!(bracketed[0]["type"], "lead_status_changed");
    assert_eq!(both.len(), 2);
    assert_eq!(both_bracketed.len(), 2);
    assert_eq!(status_of(&amo, "/api/v4/events?filter[entity]=contact").await, 204);
    assert_eq!(status_of(&amo, "/api/v4/events?filter[created_at][from]=soon").await, 400);
}

#[tokio::test]
async fn an_event_dated_minutes_ago_shows_up_in_a_window_read_before_without_it() {
    let amo = Amo::unlimited().await;
    let id = lead(&amo);
    let now = amo.sandbox.now_unix();
    let read_before = status_of(&amo, &window(now - 300, now)).await;

    let late = amo.sandbox.move_lead_with(id, LeadMove::to(PIPELINE, WON).ago(Duration::from_secs(180)).by(0)).unwrap();

    let read_after = events(&amo, &window(now - 300, now)).await;
    assert_eq!(read_before, 204);
    assert_eq!(ids(&read_after), [late]);
    assert!((read_after[0]["created_at"].as_i64().unwrap() - (now - 180)).abs() <= 2);
    assert_eq!(read_after[0]["created_by"], 0, "a robot's move");
}

#[tokio::test]
async fn a_hidden_event_is_listed_once_the_clock_has_passed_its_delay() {
    let amo = Amo::unlimited().await;
    let id = lead(&amo);

    let hidden =
        amo.sandbox.move_lead_with(id, LeadMove::to(PIPELINE, STATUS).hidden_for(Duration::from_secs(120))).unwrap();

    assert_eq!(status_of(&amo, STATUS_FEED).await, 204);
    amo.sandbox.advance_clock(Duration::from_secs(60));
    assert_eq!(status_of(&amo, STATUS_FEED).await, 204);
    amo.sandbox.advance_clock(Duration::from_secs(60));
    assert_eq!(ids(&events(&amo, STATUS_FEED).await), [hidden]);
}

#[tokio::test]
async fn the_feed_lists_newest_first_unless_told_otherwise() {
    let amo = Amo::unlimited().await;
    let id = lead(&amo);
    let t = amo.sandbox.now_unix() - 600;
    let made: Vec<String> = (0..6)
        .map(|index| {
            let status = if index % 2 == 0 { STATUS } else { FIRST_STATUS };
            amo.sandbox.move_lead_with(id, LeadMove::to(PIPELINE, status).at(t + index)).unwrap()
        })
        .collect();
    let oldest_first = made.clone();
    let newest_first: Vec<String> = made.iter().rev().cloned().collect();

    let default = ids(&events(&amo, STATUS_FEED).await);
    amo.sandbox.set_event_order(AmoEventOrder::OldestFirst);
    let oldest = ids(&events(&amo, STATUS_FEED).await);
    amo.sandbox.set_event_order(AmoEventOrder::ByIdHash);
    let hashed = ids(&events(&amo, STATUS_FEED).await);
    let hashed_again = ids(&events(&amo, &format!("{STATUS_FEED}&limit=3")).await);

    assert_eq!(default, newest_first);
    assert_eq!(oldest, oldest_first);
    assert_eq!(hashed.iter().cloned().collect::<HashSet<_>>(), made.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(hashed[..3], hashed_again[..], "the same order from one read to the next");
}

#[tokio::test]
async fn responsible_users_read_back_by_id_and_their_change_is_no_status_event() {
    let amo = Amo::unlimited().await;
    let first = amo.sandbox.add_lead(PIPELINE, STATUS, 9_000_002).unwrap();
    let second = amo.create("Заявка").await;

    amo.sandbox.set_responsible_user(second, 9_000_003).unwrap();

    let read = amo.list(&format!("/api/v4/leads?filter[id][]={first}&filter[id][]={second}&limit=250")).await;
    let users: Vec<(i64, i64)> = read["_embedded"]["leads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|lead| (lead["id"].as_i64().unwrap(), lead["responsible_user_id"].as_i64().unwrap()))
        .collect();
    assert_eq!(users, [(first, 9_000_002), (second, 9_000_003)]);
    assert_eq!(status_of(&amo, STATUS_FEED).await, 204);
    let changed = events(&amo, "/api/v4/events?filter[type]=entity_responsible_changed").await;
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0]["entity_id"], second);
}

#[tokio::test]
async fn hooks_refuse_unknown_leads_pipelines_and_statuses_and_change_nothing() {
    let amo = Amo::unlimited().await;
    let id = lead(&amo);

    assert_eq!(amo.sandbox.move_lead(1, PIPELINE, STATUS), Err(HookError::UnknownEntity { kind: "lead", id: 1 }));
    assert_eq!(amo.sandbox.move_lead(id, 1, STATUS), Err(HookError::UnknownPipeline(1)));
    assert!(matches!(amo.sandbox.move_lead(id, PIPELINE, OTHER_STATUS), Err(HookError::UnknownStage { .. })));
    assert!(amo.sandbox.set_responsible_user(2, 9_000_002).is_err());
    assert_eq!(amo.sandbox.events().len(), 1, "only the lead's lead_added");
}

#[tokio::test]
async fn the_feed_sits_behind_the_token_the_rate_limit_and_injected_faults() {
    let amo = Amo::start(AmoSandboxConfig::default()).await;
    let unauthorized = reqwest::get(amo.url(STATUS_FEED)).await.unwrap().status();
    amo.sandbox.faults().inject_for("GET", "/api/v4/events", Fault::server_error(), 1);

    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(status_of(&amo, STATUS_FEED).await);
    }

    assert_eq!(unauthorized, 401);
    assert_eq!(statuses[0], 503);
    assert_eq!(statuses.iter().filter(|status| **status == 429).count(), 1, "{statuses:?}");
    assert_eq!(amo.sandbox.violations(), 1);
}
