//! Funnel history against the sandboxes: stage changes of AmoCRM leads and
//! Bitrix24 leads and deals read into `crm_stage_changes` once each, late
//! and out-of-order changes caught, downtime and back-fills walked window
//! by window, two processes at once, a request cap — counted in rows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use crm_connect::apply::apply_tenant;
use crm_connect::config::TenantConfig;
use crm_connect::funnel::{self, POLL_REQUESTS, PollReport, Polls};
use crm_connect::model::{EntityType, Stream};
use crm_connect_sandbox::amocrm::{AmoSandbox, LeadMove, SandboxPipeline};
use crm_connect_sandbox::bitrix24::{HistoryEntity, StageChange};
use crm_connect_sandbox::tenant_file::{Stage, TenantFile};
use tokio_postgres::Client;

use crate::support::rows::{CursorRow, StageChangeRow};
use crate::support::world::World;

const MAIN: i64 = 7_000_001;
const FIRST: i64 = 61_000_001;
const TALKS: i64 = 61_000_002;
const QUALIFIED: i64 = 61_000_003;
const SALES: i64 = 7_000_002;
const SALES_NEW: i64 = 61_000_004;
const WON: i64 = 142;
const LOST: i64 = 143;
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// A tenant with `[funnel]` (and `extra` keys), connected: stages synced, tables migrated.
async fn connected(world: &World, file: TenantFile, extra: &[(&str, &str)]) -> (TenantConfig, Client) {
    let mut file = file.table_key("funnel", "poll", "\"10s\"");
    for (key, toml) in extra {
        file = file.table_key("funnel", key, toml);
    }
    world.write(&file);
    let tenant = world.tenant(&file);
    let applied = apply_tenant(&world.ctx, &tenant).await.unwrap();
    assert!(!applied.failed(), "{applied:?}");
    (tenant, world.client().await)
}

fn amo_file(world: &World) -> TenantFile {
    world.file_with_code().amocrm_stages("qualified", [Stage::Id(QUALIFIED)])
}

async fn caught_up(world: &World, tenant: &TenantConfig) -> PollReport {
    funnel::until_caught_up(&world.ctx, tenant, tenant.funnel.as_ref().unwrap()).await.unwrap()
}

/// Requests to the AmoCRM events feed so far, with their `created_at` windows.
fn windows(amo: &AmoSandbox) -> Vec<(i64, i64)> {
    let param = |query: &str, name: &str| -> i64 {
        let found = query.split('&').find_map(|pair| pair.strip_prefix(&format!("{name}=")));
        found.unwrap_or_else(|| panic!("{name} in {query}")).parse().unwrap()
    };
    amo.requests()
        .iter()
        .filter(|r| r.path == "/api/v4/events")
        .map(|r| {
            let query = r.query.clone().unwrap_or_default();
            let query = query.replace("%5B", "[").replace("%5D", "]");
            (param(&query, "filter[created_at][from]"), param(&query, "filter[created_at][to]"))
        })
        .collect()
}

fn unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

#[tokio::test]
async fn amocrm_moves_become_one_row_each_with_both_stages_kind_semantic_flags_and_users() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, amo_file(&world), &[]).await;
    let amo = world.amo();
    let before = amo.add_lead(MAIN, FIRST, 9_000_002).unwrap();
    let first = caught_up(&world, &tenant).await;
    assert_eq!(first.ingested, 0, "no history without `since`: {first:?}");
    assert!(first.streams[0].started, "{first:?}");

    let (a, b, c) =
        (before, amo.add_lead(MAIN, FIRST, 9_000_003).unwrap(), amo.add_lead(SALES, SALES_NEW, 9_000_004).unwrap());
    let qualified = amo.move_lead_with(a, LeadMove::to(MAIN, QUALIFIED).by(9_000_007)).unwrap();
    let won = amo.move_lead_with(b, LeadMove::to(MAIN, WON).by(0)).unwrap();
    let lost = amo.move_lead(c, SALES, LOST).unwrap();
    let elsewhere = amo.move_lead(a, SALES, SALES_NEW).unwrap();
    amo.set_responsible_user(a, 9_000_009).unwrap();
    amo.advance_clock(2 * MINUTE);
    let report = caught_up(&world, &tenant).await;

    assert_eq!(report.ingested, 4, "{report:?}");
    let rows = StageChangeRow::all(&client).await;
    let by_event =
        |id: &str| rows.iter().find(|r| r.source_event_id == id).unwrap_or_else(|| panic!("{id}: {rows:#?}"));
    let (main, sales) = (MAIN.to_string(), SALES.to_string());
    let row = by_event(&qualified);
    assert_eq!(
        row.movement(),
        (Some(main.as_str()), Some("61000001"), Some(main.as_str()), "61000003", "moved", Some("process"))
    );
    assert_eq!((row.crm.as_str(), row.entity_type.as_str(), row.entity_id), ("amocrm", "lead", a));
    assert_eq!(row.flags, (Some(true), Some(false), Some(false)));
    assert_eq!(
        (row.changed_by_user_id, row.responsible_user_id, row.outbox_id),
        (Some(9_000_007), Some(9_000_009), None)
    );
    let row = by_event(&won);
    assert_eq!(
        row.movement(),
        (Some(main.as_str()), Some("61000001"), Some(main.as_str()), "142", "moved", Some("success"))
    );
    assert_eq!(
        (row.flags, row.changed_by_user_id, row.responsible_user_id),
        ((Some(false), Some(true), Some(false)), Some(0), Some(9_000_003))
    );
    let row = by_event(&lost);
    assert_eq!(
        row.movement(),
        (Some(sales.as_str()), Some("61000004"), Some(sales.as_str()), "143", "moved", Some("failure"))
    );
    assert_eq!(row.flags, (Some(false), Some(false), Some(true)));
    let row = by_event(&elsewhere);
    assert_eq!(
        row.movement(),
        (Some(main.as_str()), Some("61000003"), Some(sales.as_str()), "61000004", "pipeline", Some("process"))
    );
    // A lead's changes get ids in the order they happened.
    let of_a: Vec<&str> = rows.iter().filter(|r| r.entity_id == a).map(|r| r.source_event_id.as_str()).collect();
    assert_eq!(of_a, [qualified.as_str(), elsewhere.as_str()]);
    let cursor = CursorRow::of(&client, "amocrm", "lead_status_changed").await.unwrap();
    assert_eq!(cursor.window_end, cursor.complete_to);
    assert!(unix(cursor.window_end.unwrap()) >= amo.now_unix() - 62, "{cursor:?} against {}", amo.now_unix());
}

#[tokio::test]
async fn a_second_run_inserts_nothing_and_asks_each_crm_little() {
    let world = World::both().await;
    let file = amo_file(&world).bitrix24(world.portal()).entity_type("deal");
    let (tenant, client) = connected(&world, file, &[]).await;
    let lead = world.amo().add_lead(MAIN, FIRST, 9_000_002).unwrap();
    let deal = world.portal().create_deal(0, "NEW", 1).unwrap();
    caught_up(&world, &tenant).await;
    world.amo().move_lead(lead, MAIN, TALKS).unwrap();
    world.portal().move_deal(deal, "PREPARATION").unwrap();
    world.amo().advance_clock(2 * MINUTE);
    world.portal().advance_clock(3 * MINUTE);
    assert_eq!(caught_up(&world, &tenant).await.ingested, 2);
    let rows = StageChangeRow::all(&client).await;

    let again = caught_up(&world, &tenant).await;

    assert_eq!(again.ingested, 0, "{again:?}");
    assert_eq!(StageChangeRow::all(&client).await, rows);
    // One window (a minute or less of it new) and one batch.
    assert!(again.requests <= 3, "{again:?}");
}

#[tokio::test]
async fn bitrix24_deal_and_lead_moves_become_one_row_each_with_from_stages_kinds_semantics_and_flags() {
    let world = World::bitrix24().await;
    let file = world.file().entity_type("deal").bitrix24_stages("qualified", [Stage::status("PREPARATION")]);
    let (tenant, client) = connected(&world, file, &[("entities", "[\"deal\", \"lead\"]")]).await;
    let portal = world.portal();
    let old = portal.create_deal(0, "NEW", 1).unwrap();
    let first = caught_up(&world, &tenant).await;
    assert_eq!(first.ingested, 0, "no history without `since`: {first:?}");

    let new = portal.create_deal(1, "C1:NEW", 5).unwrap();
    let lead = portal.create_lead("NEW", 6).unwrap();
    portal.move_deal(old, "PREPARATION").unwrap();
    portal.move_deal(old, "WON").unwrap();
    portal.move_deal_to_category(new, 2, "C2:NEW").unwrap();
    portal.move_lead(lead, "JUNK").unwrap();
    portal.set_assigned_by_id(HistoryEntity::Deal, old, 7).unwrap();
    portal.advance_clock(3 * MINUTE);
    let report = caught_up(&world, &tenant).await;

    assert_eq!(report.ingested, 6, "{report:?}");
    let old_rows = StageChangeRow::of(&client, "bitrix24", "deal", old).await;
    let moves: Vec<_> = old_rows.iter().map(StageChangeRow::movement).collect();
    assert_eq!(
        moves,
        [
            (Some("0"), Some("NEW"), Some("0"), "PREPARATION", "moved", Some("process")),
            (Some("0"), Some("PREPARATION"), Some("0"), "WON", "moved", Some("success")),
        ]
    );
    assert_eq!(old_rows[0].flags, (Some(true), Some(false), Some(false)));
    assert_eq!(old_rows[1].flags, (Some(false), Some(true), Some(false)));
    assert!(old_rows.iter().all(|r| r.responsible_user_id == Some(7) && r.changed_by_user_id.is_none()));
    assert!(old_rows[0].source_event_id.starts_with("deal:"), "{old_rows:?}");
    let new_rows = StageChangeRow::of(&client, "bitrix24", "deal", new).await;
    let moves: Vec<_> = new_rows.iter().map(StageChangeRow::movement).collect();
    assert_eq!(
        moves,
        [
            (None, None, Some("1"), "C1:NEW", "created", Some("process")),
            (Some("1"), Some("C1:NEW"), Some("2"), "C2:NEW", "pipeline", Some("process")),
        ]
    );
    assert_eq!(new_rows[0].responsible_user_id, Some(5));
    let lead_rows = StageChangeRow::of(&client, "bitrix24", "lead", lead).await;
    let moves: Vec<_> = lead_rows.iter().map(StageChangeRow::movement).collect();
    assert_eq!(
        moves,
        [
            (None, None, None, "NEW", "created", Some("process")),
            (None, Some("NEW"), None, "JUNK", "moved", Some("failure"))
        ]
    );
    assert_eq!(lead_rows[1].responsible_user_id, Some(6));
    // A deal portal's stage table has no lead statuses: those rows get no flags.
    assert_eq!(lead_rows[1].flags, (None, None, None));
    let streams: Vec<Stream> = report.streams.iter().map(|s| s.stream).collect();
    assert_eq!(streams, [Stream::Bitrix24(EntityType::Deal), Stream::Bitrix24(EntityType::Lead)]);
    let cursor = CursorRow::of(&client, "bitrix24", "deal").await.unwrap();
    assert_eq!(cursor.last_id, Some(5), "every deal record is settled: {cursor:?}");
}

#[tokio::test]
async fn an_amocrm_event_visible_three_minutes_late_is_picked_up_once() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, amo_file(&world), &[]).await;
    let amo = world.amo();
    let (a, b) = (amo.add_lead(MAIN, FIRST, 9_000_002).unwrap(), amo.add_lead(MAIN, FIRST, 9_000_003).unwrap());
    caught_up(&world, &tenant).await;
    amo.move_lead(a, MAIN, TALKS).unwrap();
    amo.advance_clock(2 * MINUTE);
    assert_eq!(caught_up(&world, &tenant).await.ingested, 1);

    // Written three minutes ago, listed only now: behind the last window's end.
    let late = amo.move_lead_with(b, LeadMove::to(MAIN, WON).ago(3 * MINUTE)).unwrap();
    let window_end = CursorRow::of(&client, "amocrm", "lead_status_changed").await.unwrap().window_end.unwrap();
    let late_at = amo.events().into_iter().find(|e| e.id == late).unwrap().created_at;
    assert!(late_at < unix(window_end), "the event lies in a window already read");
    amo.advance_clock(MINUTE);
    let picked = caught_up(&world, &tenant).await;
    amo.advance_clock(MINUTE);
    let again = caught_up(&world, &tenant).await;

    assert_eq!((picked.ingested, again.ingested), (1, 0), "{picked:?} {again:?}");
    let rows = StageChangeRow::all(&client).await;
    assert_eq!(rows.iter().filter(|r| r.source_event_id == late).count(), 1, "{rows:#?}");
    assert_eq!(rows.len(), 2);
}

#[tokio::test]
async fn a_bitrix24_record_whose_lower_id_commits_after_a_higher_one_is_not_skipped() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file().entity_type("deal"), &[]).await;
    let portal = world.portal();
    let (slow, quick) = (portal.create_deal(0, "NEW", 1).unwrap(), portal.create_deal(0, "NEW", 1).unwrap());
    caught_up(&world, &tenant).await;
    let cursor = CursorRow::of(&client, "bitrix24", "deal").await.unwrap();
    assert_eq!(cursor.last_id, Some(2));

    let reserved = portal.reserve_history_id(HistoryEntity::Deal);
    let higher = portal.move_deal(quick, "EXECUTING").unwrap();
    let first = caught_up(&world, &tenant).await;
    let lower = portal.commit_stage_change(reserved, StageChange::deal(slow, "WON")).unwrap();
    portal.advance_clock(3 * MINUTE);
    let second = caught_up(&world, &tenant).await;

    assert!(lower < higher, "{lower} {higher}");
    assert_eq!((first.ingested, second.ingested), (1, 1), "{first:?} {second:?}");
    let sources: Vec<String> = StageChangeRow::all(&client).await.into_iter().map(|r| r.source_event_id).collect();
    assert_eq!(sources, [format!("deal:{higher}"), format!("deal:{lower}")]);
    let cursor = CursorRow::of(&client, "bitrix24", "deal").await.unwrap();
    assert_eq!(cursor.last_id, Some(higher), "{cursor:?}");
}

#[tokio::test]
async fn two_funnel_processes_at_once_insert_each_change_once_with_ids_in_commit_order() {
    let world = World::both().await;
    let file = amo_file(&world).bitrix24(world.portal()).entity_type("deal");
    let (tenant, client) = connected(&world, file, &[]).await;
    let (amo, portal) = (world.amo(), world.portal());
    let leads: Vec<i64> = (0..30).map(|i| amo.add_lead(MAIN, FIRST, 9_000_002 + i).unwrap()).collect();
    let deals: Vec<i64> = (0..30).map(|i| portal.create_deal(0, "NEW", 1 + i).unwrap()).collect();
    caught_up(&world, &tenant).await;
    for (lead, deal) in leads.iter().zip(&deals) {
        amo.move_lead(*lead, MAIN, TALKS).unwrap();
        amo.move_lead(*lead, MAIN, QUALIFIED).unwrap();
        portal.move_deal(*deal, "PREPARATION").unwrap();
        portal.move_deal(*deal, "EXECUTING").unwrap();
    }
    amo.advance_clock(2 * MINUTE);
    portal.advance_clock(3 * MINUTE);
    let args = ["--config", world.config(), "funnel"];

    let (one, two) = tokio::join!(crate::support::crm_connect(&args, &[]), crate::support::crm_connect(&args, &[]));

    for run in [&one, &two] {
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.starts_with("acme: "), "{run:?}");
    }
    let rows = StageChangeRow::all(&client).await;
    assert_eq!(rows.len(), 120, "{rows:#?}");
    let ingested = |run: &crate::support::Run| -> usize {
        run.stdout.trim_start_matches("acme: ").split(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(ingested(&one) + ingested(&two), 120, "{one:?} {two:?}");
    // Each id was committed no earlier than every lower one: its
    // transaction id is never below theirs.
    let xids: Vec<i64> = client
        .query("SELECT xmin::text::bigint FROM crm_stage_changes ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(xids.windows(2).all(|w| w[0] <= w[1]), "{xids:?}");
    for (lead, deal) in leads.iter().zip(&deals) {
        let stages: Vec<String> =
            StageChangeRow::of(&client, "amocrm", "lead", *lead).await.into_iter().map(|r| r.stage_to).collect();
        assert_eq!(stages, [TALKS.to_string(), QUALIFIED.to_string()]);
        let stages: Vec<String> =
            StageChangeRow::of(&client, "bitrix24", "deal", *deal).await.into_iter().map(|r| r.stage_to).collect();
        assert_eq!(stages, ["PREPARATION", "EXECUTING"]);
    }
}

#[tokio::test]
async fn after_two_days_down_each_crm_resumes_from_its_cursor_a_day_per_amocrm_window() {
    let world = World::both().await;
    let file = amo_file(&world).bitrix24(world.portal()).entity_type("deal");
    let (tenant, client) = connected(&world, file, &[]).await;
    let (amo, portal) = (world.amo(), world.portal());
    let lead = amo.add_lead(MAIN, FIRST, 9_000_002).unwrap();
    let deal = portal.create_deal(0, "NEW", 1).unwrap();
    caught_up(&world, &tenant).await;
    let window_end = CursorRow::of(&client, "amocrm", "lead_status_changed").await.unwrap().window_end.unwrap();
    let asked_before = windows(amo).len();

    let t = amo.now_unix();
    amo.move_lead_with(lead, LeadMove::to(MAIN, TALKS).at(t + 3_600)).unwrap();
    amo.move_lead_with(lead, LeadMove::to(MAIN, QUALIFIED).at(t + 90_000)).unwrap();
    amo.move_lead_with(lead, LeadMove::to(MAIN, WON).at(t + 172_000)).unwrap();
    let p = portal.now_unix();
    portal.apply_stage_change(StageChange::deal(deal, "PREPARATION").at(p + 3_600)).unwrap();
    portal.apply_stage_change(StageChange::deal(deal, "WON").at(p + 150_000)).unwrap();
    amo.advance_clock(2 * DAY + 2 * MINUTE);
    portal.advance_clock(2 * DAY + 3 * MINUTE);
    let report = caught_up(&world, &tenant).await;

    assert_eq!(report.ingested, 5, "{report:?}");
    let stages: Vec<String> =
        StageChangeRow::of(&client, "amocrm", "lead", lead).await.into_iter().map(|r| r.stage_to).collect();
    assert_eq!(stages, [TALKS.to_string(), QUALIFIED.to_string(), WON.to_string()]);
    let stages: Vec<String> =
        StageChangeRow::of(&client, "bitrix24", "deal", deal).await.into_iter().map(|r| r.stage_to).collect();
    assert_eq!(stages, ["PREPARATION", "WON"]);
    // Windows from the old cursor on, none longer than a day (plus the overlap), each after the last.
    let read: Vec<(i64, i64)> = windows(amo)[asked_before..].iter().copied().filter(|(from, to)| to > from).collect();
    assert!(read.len() >= 3, "{read:?}");
    assert_eq!(read[0].0, unix(window_end) - 300, "{read:?}");
    assert!(read.iter().all(|(from, to)| to - from <= 86_400 + 300), "{read:?}");
    assert!(read.windows(2).all(|w| w[1].0 == w[0].1 - 300 || w[1] == w[0]), "{read:?}");
    for (crm, stream) in [("amocrm", "lead_status_changed"), ("bitrix24", "deal")] {
        let cursor = CursorRow::of(&client, crm, stream).await.unwrap();
        let complete_to = unix(cursor.complete_to.unwrap());
        assert!(complete_to >= t + 2 * 86_400 - 10, "{crm}: {cursor:?}");
    }
}

#[tokio::test]
async fn a_since_back_fill_walks_day_long_windows_from_that_midnight() {
    let world = World::amocrm().await;
    let amo = world.amo();
    let today = DateTime::from_timestamp(amo.now_unix(), 0).unwrap().date_naive();
    let since = today - chrono::Days::new(2);
    let midnight = unix(since.and_hms_opt(0, 0, 0).unwrap().and_utc());
    let (tenant, client) = connected(&world, amo_file(&world), &[("since", &format!("\"{since}\""))]).await;
    let lead = amo.add_lead(MAIN, FIRST, 9_000_002).unwrap();
    let early = amo.move_lead_with(lead, LeadMove::to(MAIN, TALKS).at(midnight + 3_600)).unwrap();
    let middle = amo.move_lead_with(lead, LeadMove::to(MAIN, QUALIFIED).at(midnight + 90_000)).unwrap();
    let recent = amo.move_lead_with(lead, LeadMove::to(MAIN, WON).ago(10 * MINUTE)).unwrap();
    let before = amo.move_lead_with(lead, LeadMove::to(MAIN, LOST).at(midnight - 3_600)).unwrap();

    let report = caught_up(&world, &tenant).await;

    assert_eq!(report.ingested, 3, "{report:?}");
    let sources: Vec<String> = StageChangeRow::all(&client).await.into_iter().map(|r| r.source_event_id).collect();
    assert_eq!(sources, [early, middle, recent]);
    assert!(!sources.contains(&before), "a change before `since` is not read");
    let read = windows(amo);
    assert!(read.len() >= 3, "{read:?}");
    assert_eq!(read[0], (midnight - 300, midnight + 86_400), "{read:?}");
    assert_eq!(read[1], (midnight + 86_400 - 300, midnight + 2 * 86_400), "{read:?}");
}

#[tokio::test]
async fn a_bitrix24_backlog_is_read_in_batches_of_chained_pages_each_record_once() {
    let world = World::bitrix24().await;
    let file = world.file().entity_type("deal").bitrix24_stages("qualified", [Stage::status("PREPARATION")]);
    let (tenant, client) = connected(&world, file, &[]).await;
    let portal = world.portal();
    caught_up(&world, &tenant).await;
    // 3,000 records: 300 deals created and moved nine times each.
    for _ in 0..300 {
        let deal = portal.create_deal(0, "NEW", 1).unwrap();
        for stage in ["PREPARATION", "NEW"].iter().cycle().take(9) {
            portal.move_deal(deal, stage).unwrap();
        }
    }
    portal.advance_clock(3 * MINUTE);
    let reads_before = stream_reads(portal).len();

    let report = caught_up(&world, &tenant).await;

    assert_eq!(report.ingested, 3_000, "{report:?}");
    assert_eq!(StageChangeRow::all(&client).await.len(), 3_000);
    // Pages chained 1, 2, 4, 8, 16 then 32 to a batch: 50 + 100 + 200 +
    // 400 + 800 + 1,450 records, the last batch's pages after its short
    // one (run on an empty reference) left unread.
    let reads: Vec<usize> = stream_reads(portal)[reads_before..].to_vec();
    assert_eq!(reads, [1, 2, 4, 8, 16, 32], "commands of each batch reading the stream");
    assert_eq!(CursorRow::of(&client, "bitrix24", "deal").await.unwrap().last_id, Some(portal_highest(portal)));
}

/// The `batch` requests that read a stage-history stream, by their count
/// of stream-reading commands.
fn stream_reads(portal: &crm_connect_sandbox::bitrix24::B24Sandbox) -> Vec<usize> {
    let batch = portal.method_path("batch");
    portal
        .requests()
        .iter()
        .filter(|r| r.path == batch)
        .map(|r| r.body.matches("filter%5B%3EID%5D").count())
        .filter(|&n| n > 0)
        .collect()
}

fn portal_highest(portal: &crm_connect_sandbox::bitrix24::B24Sandbox) -> i64 {
    portal.stage_history(HistoryEntity::Deal).iter().map(|r| r.id).max().unwrap()
}

#[tokio::test]
async fn a_stage_renamed_and_remapped_after_the_change_leaves_the_row_as_ingested() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, amo_file(&world), &[]).await;
    let amo = world.amo();
    let lead = amo.add_lead(MAIN, FIRST, 9_000_002).unwrap();
    caught_up(&world, &tenant).await;
    amo.move_lead(lead, MAIN, QUALIFIED).unwrap();
    amo.advance_clock(2 * MINUTE);
    caught_up(&world, &tenant).await;
    let ingested = StageChangeRow::all(&client).await;
    assert_eq!(ingested.len(), 1);
    assert_eq!(
        (ingested[0].stage_to.as_str(), ingested[0].flags),
        ("61000003", (Some(true), Some(false), Some(false)))
    );

    let mut pipelines: Vec<SandboxPipeline> = AmoSandbox::default_pipelines();
    pipelines[0].statuses.iter_mut().filter(|s| s.id == QUALIFIED).for_each(|s| s.name = "Переименован".into());
    amo.set_pipelines(pipelines);
    let remapped = world.file().amocrm_stages("qualified", [Stage::Id(TALKS)]).table_key("funnel", "poll", "\"10s\"");
    world.write(&remapped);
    let applied = apply_tenant(&world.ctx, &world.tenant(&remapped)).await.unwrap();
    assert!(!applied.failed(), "{applied:?}");
    caught_up(&world, &world.tenant(&remapped)).await;

    let stage = client
        .query_one(
            "SELECT status_name, is_qualified_stage FROM amocrm_pipeline_stages WHERE pipeline_id = $1 AND status_id = $2",
            &[&MAIN, &QUALIFIED],
        )
        .await
        .unwrap();
    assert_eq!((stage.get::<_, String>(0), stage.get::<_, bool>(1)), ("Переименован".to_string(), false));
    assert_eq!(StageChangeRow::all(&client).await, ingested);
}

#[tokio::test]
async fn a_bitrix24_from_stage_comes_from_a_look_back_then_the_answer_then_the_table() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file().entity_type("deal"), &[]).await;
    let portal = world.portal();
    let deal = portal.create_deal(0, "NEW", 1).unwrap();
    caught_up(&world, &tenant).await;

    // Its creation lies before the cursor: only a look-back knows it.
    portal.move_deal(deal, "PREPARATION").unwrap();
    portal.move_deal(deal, "EXECUTING").unwrap();
    portal.advance_clock(3 * MINUTE);
    caught_up(&world, &tenant).await;
    portal.move_deal(deal, "LOSE").unwrap();
    portal.advance_clock(3 * MINUTE);
    caught_up(&world, &tenant).await;

    let froms: Vec<(Option<String>, String)> = StageChangeRow::of(&client, "bitrix24", "deal", deal)
        .await
        .into_iter()
        .map(|r| (r.stage_from, r.stage_to))
        .collect();
    assert_eq!(
        froms,
        [
            (Some("NEW".into()), "PREPARATION".into()),
            (Some("PREPARATION".into()), "EXECUTING".into()),
            (Some("EXECUTING".into()), "LOSE".into()),
        ]
    );
    let look_backs = portal.requests().iter().filter(|r| r.body.contains("%3CID")).count();
    assert_eq!(look_backs, 1, "one look-back, in one batch");
}

#[tokio::test]
async fn an_idle_amocrm_poll_reads_one_window_even_when_the_clock_moves_on_while_it_runs() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, amo_file(&world), &[]).await;
    let (polls, funnel) = (Polls::default(), tenant.funnel.clone().unwrap());
    funnel::poll(&world.ctx, &polls, &tenant, &funnel, Some(POLL_REQUESTS)).await.unwrap();
    // A second on, so that the next poll has a window to read.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let before = windows(world.amo()).len();
    // The poll's cursor write waits behind a lock on the cursor for over a
    // second: the settled past has grown by the time it is written.
    client.batch_execute("BEGIN; SELECT 1 FROM crm_connect_cursors FOR UPDATE").await.unwrap();
    let idle = tokio::spawn({
        let (ctx, tenant) = (world.ctx.clone(), tenant.clone());
        async move { funnel::poll(&ctx, &polls, &tenant, &funnel, Some(POLL_REQUESTS)).await.unwrap() }
    });
    let waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted";
    crate::support::daemon::eventually("the poll waits for the cursor", Duration::from_secs(10), || async {
        client.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    client.batch_execute("COMMIT").await.unwrap();
    let idle = idle.await.unwrap();

    assert_eq!((idle.requests, windows(world.amo()).len() - before), (1, 1), "{idle:?}");
    assert!(!idle.more, "{idle:?}");
}

#[tokio::test]
async fn an_idle_poll_moves_its_cursors_while_another_process_holds_the_insert_lock() {
    let (amo, b24) = (World::amocrm().await, World::bitrix24().await);
    // From today: the AmoCRM cursor starts at the settled past, not at the
    // first enable (which windows reach a minute later).
    let today = DateTime::from_timestamp(amo.amo().now_unix(), 0).unwrap().date_naive();
    let since = format!("\"{today}\"");
    for (world, file, since) in [(&amo, amo_file(&amo), Some(since)), (&b24, b24.file().entity_type("deal"), None)] {
        let since: Vec<(&str, &str)> = since.iter().map(|s| ("since", s.as_str())).collect();
        let (tenant, client) = connected(world, file, &since).await;
        let (polls, funnel) = (Polls::default(), tenant.funnel.clone().unwrap());
        funnel::poll(&world.ctx, &polls, &tenant, &funnel, Some(POLL_REQUESTS)).await.unwrap();
        let stream = if tenant.amocrm.is_some() { ("amocrm", "lead_status_changed") } else { ("bitrix24", "deal") };
        let before = CursorRow::of(&client, stream.0, stream.1).await.unwrap().complete_to;
        // Two seconds on, so that the settled past has moved by the
        // server's `Date` (whole seconds) too; Bitrix24's settles over
        // two minutes past the stream's start.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        if tenant.bitrix24.is_some() {
            world.portal().advance_clock(3 * MINUTE);
        }
        // Another process inserting rows for longer than an idle poll takes.
        client.execute("SELECT pg_advisory_lock($1)", &[&crm_connect::db::stage_changes::INSERT_LOCK]).await.unwrap();
        let mut idle = tokio::spawn({
            let (ctx, tenant, polls, funnel) = (world.ctx.clone(), tenant.clone(), polls.clone(), funnel.clone());
            async move { funnel::poll(&ctx, &polls, &tenant, &funnel, Some(POLL_REQUESTS)).await }
        });
        let waited = tokio::time::timeout(Duration::from_secs(10), &mut idle).await;
        client.execute("SELECT pg_advisory_unlock_all()", &[]).await.unwrap();

        let idle = waited.unwrap_or_else(|_| panic!("{stream:?}: the idle poll waited for the insert lock"));
        let idle = idle.unwrap().unwrap();
        let after = CursorRow::of(&client, stream.0, stream.1).await.unwrap().complete_to;
        assert_eq!((idle.ingested, idle.requests), (0, 1), "{idle:?}");
        assert!(after > before, "{stream:?}: {before:?} -> {after:?}");
        let reported = idle.streams.iter().find(|s| s.complete_to.is_some()).and_then(|s| s.complete_to);
        assert_eq!(reported, after, "the report shows the cursor as stored: {idle:?}");
    }
}

#[tokio::test]
async fn a_poll_capped_at_fifty_requests_leaves_the_backlog_to_the_next_poll() {
    let world = World::amocrm().await;
    let amo = world.amo();
    let today = DateTime::from_timestamp(amo.now_unix(), 0).unwrap().date_naive();
    let since = today - chrono::Days::new(70);
    let (tenant, client) = connected(&world, amo_file(&world), &[("since", &format!("\"{since}\""))]).await;
    let lead = amo.add_lead(MAIN, FIRST, 9_000_002).unwrap();
    let midnight = unix(since.and_hms_opt(0, 0, 0).unwrap().and_utc());
    let old = amo.move_lead_with(lead, LeadMove::to(MAIN, TALKS).at(midnight + 3_600)).unwrap();
    let recent = amo.move_lead_with(lead, LeadMove::to(MAIN, WON).ago(10 * MINUTE)).unwrap();
    let (polls, funnel) = (Polls::default(), tenant.funnel.clone().unwrap());

    let first = funnel::poll(&world.ctx, &polls, &tenant, &funnel, Some(POLL_REQUESTS)).await.unwrap();
    let asked = windows(amo).len();
    let cursor = CursorRow::of(&client, "amocrm", "lead_status_changed").await.unwrap();
    let second = funnel::poll(&world.ctx, &polls, &tenant, &funnel, Some(POLL_REQUESTS)).await.unwrap();

    assert!(first.more && first.requests <= POLL_REQUESTS, "{first:?}");
    assert!((40..=POLL_REQUESTS).contains(&asked), "{asked} requests");
    let behind = unix(cursor.complete_to.unwrap());
    assert!(behind > midnight + 40 * 86_400 && behind < amo.now_unix() - 5 * 86_400, "{cursor:?}");
    assert!(!second.more && second.requests <= POLL_REQUESTS, "{second:?}");
    let sources: Vec<String> = StageChangeRow::all(&client).await.into_iter().map(|r| r.source_event_id).collect();
    assert_eq!(sources, [old, recent]);
}

#[tokio::test]
async fn a_change_into_a_stage_the_table_lacks_runs_one_stage_sync_and_gets_its_flags() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, amo_file(&world), &[]).await;
    let amo = world.amo();
    let lead = amo.add_lead(MAIN, FIRST, 9_000_002).unwrap();
    caught_up(&world, &tenant).await;
    let mut pipelines = AmoSandbox::default_pipelines();
    let mut added = pipelines[0].statuses[0].clone();
    (added.id, added.name, added.sort) = (61_000_009, "Добавлен".into(), 50);
    pipelines[0].statuses.push(added);
    amo.set_pipelines(pipelines);

    amo.move_lead(lead, MAIN, 61_000_009).unwrap();
    amo.advance_clock(2 * MINUTE);
    let report = caught_up(&world, &tenant).await;

    assert_eq!((report.ingested, report.stage_syncs), (1, 1), "{report:?}");
    let rows = StageChangeRow::all(&client).await;
    assert_eq!((rows[0].stage_to.as_str(), rows[0].flags), ("61000009", (Some(false), Some(false), Some(false))));
    let synced = client
        .query_one("SELECT count(*) FROM amocrm_pipeline_stages WHERE status_id = 61000009", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(synced, 1);
}

#[tokio::test]
async fn a_window_past_twenty_pages_is_narrowed_and_each_event_read_once() {
    let world = World::amocrm().await;
    let amo = world.amo();
    let today = DateTime::from_timestamp(amo.now_unix(), 0).unwrap().date_naive();
    let since = today - chrono::Days::new(1);
    let midnight = unix(since.and_hms_opt(0, 0, 0).unwrap().and_utc());
    let (tenant, client) = connected(&world, amo_file(&world), &[("since", &format!("\"{since}\""))]).await;
    let lead = amo.add_lead(MAIN, FIRST, 9_000_002).unwrap();
    // 2,200 changes spread over that day: 22 pages for its window.
    for i in 0..2_200 {
        let status = if i % 2 == 0 { TALKS } else { FIRST };
        amo.move_lead_with(lead, LeadMove::to(MAIN, status).at(midnight + 10 + i * 39)).unwrap();
    }

    let report = caught_up(&world, &tenant).await;

    assert_eq!(report.ingested, 2_200, "{report:?}");
    let read = windows(amo);
    assert_eq!(read[0], (midnight - 300, midnight + 86_400), "{read:?}");
    assert!(read.contains(&(midnight - 300, midnight + 43_200)), "the day halved: {read:?}");
    let rows = StageChangeRow::all(&client).await;
    let stages: Vec<&str> = rows.iter().map(|r| r.stage_to.as_str()).collect();
    let alternating: Vec<String> =
        (0..2_200).map(|i| if i % 2 == 0 { TALKS.to_string() } else { FIRST.to_string() }).collect();
    assert_eq!(stages, alternating, "every change once, in time order");
}

#[tokio::test]
async fn a_portal_refusing_the_time_filter_is_read_from_its_first_record_storing_nothing_before_since() {
    let world = World::bitrix24().await;
    let portal = world.portal();
    let today = DateTime::from_timestamp(portal.now_unix(), 0).unwrap().date_naive();
    let since = today - chrono::Days::new(1);
    let midnight = unix(since.and_hms_opt(0, 0, 0).unwrap().and_utc());
    let deal = portal.create_deal(0, "NEW", 1).unwrap();
    let before = portal.apply_stage_change(StageChange::deal(deal, "PREPARATION").at(midnight - 3_600)).unwrap();
    let after = portal.apply_stage_change(StageChange::deal(deal, "EXECUTING").at(midnight + 3_600)).unwrap();
    portal.refuse_created_time_filter(true);
    let file = world.file().entity_type("deal");
    let (tenant, client) = connected(&world, file, &[("since", &format!("\"{since}\""))]).await;

    let report = caught_up(&world, &tenant).await;

    let sources: Vec<String> = StageChangeRow::all(&client).await.into_iter().map(|r| r.source_event_id).collect();
    assert_eq!(sources, ["deal:1".to_string(), format!("deal:{after}")], "{report:?}");
    assert!(!sources.contains(&format!("deal:{before}")));
    assert!(report.streams[0].started, "{report:?}");
}

#[tokio::test]
async fn the_command_exits_1_naming_a_tenant_it_could_not_read_or_one_it_does_not_know() {
    let world = World::bitrix24().await;
    connected(&world, world.file().entity_type("deal"), &[]).await;
    world.portal().deny_access(&["crm.stagehistory.list"]);

    let failed = crate::support::crm_connect(&["--config", world.config(), "funnel"], &[]).await;
    let unknown = crate::support::crm_connect(&["--config", world.config(), "funnel", "--tenant", "nobody"], &[]).await;

    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(failed.stdout.starts_with("acme: error: bitrix24 funnel: "), "{failed:?}");
    assert!(!failed.output().contains(&world.portal().webhook_url()), "the webhook never shows: {failed:?}");
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("no valid tenant nobody with a [funnel] table"), "{unknown:?}");
}

#[tokio::test]
async fn the_daemon_polls_each_tenants_funnel_on_its_schedule() {
    let world = World::bitrix24().await;
    let file = world.file().entity_type("deal").table_key("funnel", "poll", "\"10s\"");
    world.write(&file);
    let deal = world.portal().create_deal(0, "NEW", 1).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = crate::support::daemon::Running::start_with(&["--listen", &listen], world.dir()).await;
    let client = world.client().await;
    let http = reqwest::Client::new();
    let metrics = || async { http.get(format!("http://{listen}/metrics")).send().await.unwrap().text().await.unwrap() };
    // The first poll starts the stream at the portal's highest record: no history.
    crate::support::daemon::eventually("the first poll started the deal stream", Duration::from_secs(20), || async {
        CursorRow::of(&client, "bitrix24", "deal").await.is_some()
    })
    .await;
    assert!(StageChangeRow::all(&client).await.is_empty());

    world.portal().move_deal(deal, "PREPARATION").unwrap();

    crate::support::daemon::eventually("a later poll recorded the move", Duration::from_secs(30), || async {
        StageChangeRow::all(&client).await.iter().any(|r| r.entity_id == deal)
    })
    .await;
    let rows = StageChangeRow::all(&client).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!((rows[0].entity_type.as_str(), rows[0].stage_to.as_str()), ("deal", "PREPARATION"));
    let text = metrics().await;
    assert!(text.contains("crm_connect_funnel_ingested_total{crm=\"bitrix24\"} 1\n"), "{text}");
    assert!(text.contains("crm_connect_funnel_ingested_total{crm=\"amocrm\"} 0\n"), "{text}");
    assert!(text.contains("crm_connect_funnel_lag_seconds{tenant=\"acme\",stream=\"deal\"} "), "{text}");
    daemon.stop().await;
}

#[tokio::test]
async fn status_shows_each_funnel_stream_complete_to_and_its_lag() {
    let world = World::bitrix24().await;
    let (tenant, _client) =
        connected(&world, world.file().entity_type("deal"), &[("entities", "[\"deal\", \"lead\"]")]).await;
    let before = crate::support::crm_connect(&["--config", world.config(), "status"], &[]).await;
    assert!(before.stdout.contains("acme bitrix24: funnel deal: not started\n"), "{before:?}");

    caught_up(&world, &tenant).await;

    let status = crate::support::crm_connect(&["--config", world.config(), "status"], &[]).await;
    for stream in ["deal", "lead"] {
        let prefix = format!("acme bitrix24: funnel {stream}: complete to ");
        assert!(status.stdout.lines().any(|l| l.starts_with(&prefix) && l.ends_with('s')), "{status:?}");
    }
    let json = crate::support::crm_connect(&["--config", world.config(), "status", "--json"], &[]).await;
    let lines: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let streams = lines[0]["funnel"].as_array().unwrap_or_else(|| panic!("{json:?}"));
    assert_eq!(streams.iter().map(|s| s["stream"].as_str().unwrap()).collect::<Vec<_>>(), ["deal", "lead"]);
    assert!(
        streams.iter().all(|s| s["complete_to"].is_string() && s["lag_seconds"].as_i64().unwrap() >= 0),
        "{json:?}"
    );
}

/// `[leads]` and `[funnel]` on one tenant, connected.
async fn delivering(world: &World, file: TenantFile) -> (TenantConfig, Client) {
    connected(world, file.table_key("leads", "poll", "\"1s\""), &[]).await
}

/// Inserts a lead for delivery; its outbox id.
async fn insert_lead(client: &Client, title: &str, responsible: Option<i64>) -> i64 {
    let sql = "INSERT INTO crm_lead_outbox (title, phone, responsible_user_id) VALUES ($1, '+7 900 000 00 09', $2) \
               RETURNING id";
    client.query_one(sql, &[&title, &responsible]).await.unwrap().get(0)
}

async fn sent_at(client: &Client, outbox_id: i64) -> DateTime<Utc> {
    let sql = "SELECT last_attempt_at FROM crm_lead_outbox WHERE id = $1 AND state = 'delivered'";
    client.query_one(sql, &[&outbox_id]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_delivered_amocrm_lead_gets_its_created_row_with_the_delivery_and_its_moves_carry_the_outbox_id() {
    let world = World::amocrm().await;
    let (tenant, client) = delivering(&world, amo_file(&world)).await;
    caught_up(&world, &tenant).await;
    let outbox_id = insert_lead(&client, "Order 1", Some(9_000_003)).await;

    let delivered = crm_connect::leads::until_done(&world.ctx, &tenant, tenant.leads.as_ref().unwrap()).await.unwrap();

    assert_eq!(delivered.delivered, 1, "{delivered:?}");
    let lead = world.amo().leads().pop().unwrap();
    let rows = StageChangeRow::all(&client).await;
    assert_eq!(rows.len(), 1, "the created row lands with the delivery itself: {rows:#?}");
    let created = &rows[0];
    let (pipeline, status) = (lead.pipeline_id.to_string(), lead.status_id.unwrap().to_string());
    assert_eq!(created.movement(), (None, None, Some(pipeline.as_str()), status.as_str(), "created", Some("process")));
    assert_eq!(
        (created.source_event_id.clone(), created.crm.as_str(), created.entity_type.as_str(), created.entity_id),
        (format!("outbox:{outbox_id}"), "amocrm", "lead", lead.id)
    );
    assert_eq!(created.flags, (Some(false), Some(false), Some(false)));
    assert_eq!(
        (created.changed_by_user_id, created.responsible_user_id, created.outbox_id),
        (None, Some(9_000_003), Some(outbox_id))
    );
    assert_eq!(created.changed_at, sent_at(&client, outbox_id).await);

    let moved = world.amo().move_lead(lead.id, MAIN, QUALIFIED).unwrap();
    world.amo().advance_clock(2 * MINUTE);
    let report = caught_up(&world, &tenant).await;
    assert_eq!(report.ingested, 1, "{report:?}");
    let rows = StageChangeRow::of(&client, "amocrm", "lead", lead.id).await;
    let ids: Vec<(&str, Option<i64>)> = rows.iter().map(|r| (r.source_event_id.as_str(), r.outbox_id)).collect();
    assert_eq!(ids, [(created.source_event_id.as_str(), Some(outbox_id)), (moved.as_str(), Some(outbox_id))]);
    assert_eq!(rows[1].stage_from.as_deref(), Some(status.as_str()));
}

#[tokio::test]
async fn a_bitrix24_deal_found_by_its_lookup_gets_one_created_row_and_the_portals_own_is_skipped() {
    let world = World::bitrix24().await;
    let file = world.file().entity_type("deal").bitrix24_stages("qualified", [Stage::status("PREPARATION")]);
    let (tenant, client) = delivering(&world, file).await;
    caught_up(&world, &tenant).await;
    let outbox_id = insert_lead(&client, "Order 2", None).await;
    let batch = world.portal().method_path("batch");
    world.portal().faults().inject_for("POST", &batch, crm_connect_sandbox::faults::Fault::DropAfterExecuting, 1);
    let leads = tenant.leads.as_ref().unwrap();

    let lost = crm_connect::leads::until_done(&world.ctx, &tenant, leads).await.unwrap();
    assert_eq!((lost.sent, lost.delivered), (1, 0), "{lost:?}");
    assert_eq!(StageChangeRow::all(&client).await, [], "nothing before the lead is known to exist");
    client.execute("UPDATE crm_lead_outbox SET next_attempt_at = now() WHERE state = 'sending'", &[]).await.unwrap();
    let found = crm_connect::leads::until_done(&world.ctx, &tenant, leads).await.unwrap();
    assert_eq!((found.looked_up, found.delivered), (1, 1), "{found:?}");

    let deal = world.portal().deals().pop().unwrap();
    world.portal().move_deal(deal.id, "PREPARATION").unwrap();
    world.portal().advance_clock(3 * MINUTE);
    let report = caught_up(&world, &tenant).await;
    assert_eq!(report.ingested, 1, "the portal's creation record is skipped: {report:?}");
    let rows = StageChangeRow::of(&client, "bitrix24", "deal", deal.id).await;
    let moves: Vec<_> = rows.iter().map(StageChangeRow::movement).collect();
    assert_eq!(
        moves,
        [
            (None, None, Some("0"), "NEW", "created", Some("process")),
            (Some("0"), Some("NEW"), Some("0"), "PREPARATION", "moved", Some("process")),
        ]
    );
    assert_eq!(rows[0].source_event_id, format!("outbox:{outbox_id}"));
    assert_eq!(rows[0].changed_at, sent_at(&client, outbox_id).await);
    assert_eq!(
        (rows[0].flags, rows[1].flags),
        ((Some(false), Some(false), Some(false)), (Some(true), Some(false), Some(false)))
    );
    assert!(rows.iter().all(|r| r.outbox_id == Some(outbox_id)), "{rows:#?}");
}
