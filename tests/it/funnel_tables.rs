//! The funnel's tables through `db`: stage changes stored once and read
//! back whole, ids committed in one order by concurrent writers, cursors
//! that only move forward and commit with their rows, and what ingestion
//! reads (an entity's last change, delivered creations, stage flags, the
//! outbox row of an entity).

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use crm_connect::db::{self, PoolSettings, Pools, Session, TenantDb, cursors, stage_changes};
use crm_connect::model::{
    AmoStage, B24Stage, ChangeKind, Crm, EntityType, Position, Semantics, StageChange, StageFlags, Stream,
};
use crm_connect::secret::Secret;

use crate::support::{connect, postgres::fresh_database};

async fn tenant_db(url: &str) -> TenantDb {
    let db = Pools::new(PoolSettings::default()).get("t", &Secret::new(url)).unwrap();
    db::migrate(&db).await.unwrap_or_else(|e| panic!("migrate: {e}"));
    db
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_780_000_000 + secs, 0).single().unwrap()
}

fn amo_change(event: &str, lead: i64, from: &str, to: &str) -> StageChange {
    StageChange {
        crm: Crm::AmoCrm,
        source_event_id: event.into(),
        entity_type: EntityType::Lead,
        entity_id: lead,
        pipeline_from: Some("100".into()),
        stage_from: Some(from.into()),
        pipeline_to: Some("100".into()),
        stage_to: to.into(),
        change_kind: ChangeKind::Moved,
        semantic: Some(if to == "142" { Semantics::Success } else { Semantics::Process }),
        flags: Some(StageFlags { qualified: true, success: to == "142", fail: false }),
        changed_at: at(lead),
        changed_by_user_id: Some(0),
        responsible_user_id: Some(77),
        outbox_id: None,
    }
}

fn b24_created(source: &str, lead: i64) -> StageChange {
    StageChange {
        crm: Crm::Bitrix24,
        source_event_id: source.into(),
        entity_type: EntityType::Lead,
        entity_id: lead,
        pipeline_from: None,
        stage_from: None,
        pipeline_to: None,
        stage_to: "NEW".into(),
        change_kind: ChangeKind::Created,
        semantic: None,
        flags: None,
        changed_at: at(0),
        changed_by_user_id: None,
        responsible_user_id: None,
        outbox_id: Some(9),
    }
}

#[tokio::test]
async fn a_change_inserted_twice_is_stored_once_and_read_back_with_every_column() {
    let test = fresh_database().await;
    let db = tenant_db(&test.url).await;
    let mut session = db.session().await.unwrap();
    let first = [amo_change("01a", 1, "10", "20"), b24_created("outbox:9", 5)];

    let tx = session.transaction().await.unwrap();
    assert_eq!(stage_changes::insert(&tx, &first).await.unwrap(), 2);
    tx.commit().await.unwrap();
    let again = [first[1].clone(), amo_change("01b", 1, "20", "142"), first[0].clone()];
    let tx = session.transaction().await.unwrap();
    assert_eq!(stage_changes::insert(&tx, &again).await.unwrap(), 1, "only the new change counts");
    tx.commit().await.unwrap();

    let stored = stage_changes::read_after(&session, 0, 10).await.unwrap();
    let rows: Vec<&StageChange> = stored.iter().map(|s| &s.change).collect();
    assert_eq!(rows, [&first[0], &first[1], &again[1]], "every column as written, in the order given");
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(stage_changes::read_after(&session, stored[1].id, 10).await.unwrap().len(), 1);

    // A transaction that rolls back leaves nothing, and an empty batch is no error.
    let tx = session.transaction().await.unwrap();
    assert_eq!(stage_changes::insert(&tx, &[amo_change("01c", 2, "10", "20")]).await.unwrap(), 1);
    assert_eq!(stage_changes::insert(&tx, &[]).await.unwrap(), 0);
    tx.rollback().await.unwrap();
    assert_eq!(stage_changes::read_after(&session, 0, 10).await.unwrap().len(), 3);
}

#[tokio::test]
async fn concurrent_inserts_commit_their_ids_in_the_order_they_were_assigned() {
    let test = fresh_database().await;
    let db = tenant_db(&test.url).await;
    let observer = connect(&test.url).await;
    let mut first = db.session().await.unwrap();
    let tx = first.transaction().await.unwrap();
    assert_eq!(stage_changes::insert(&tx, &[amo_change("first", 1, "10", "20")]).await.unwrap(), 1);

    // A second writer, while the first has not committed: it must wait
    // before it takes an id, or a reader could see its id first and later
    // miss the first writer's lower one.
    let second_db = db.clone();
    let second = tokio::spawn(async move {
        let mut session = second_db.session().await.unwrap();
        let tx = session.transaction().await.unwrap();
        stage_changes::insert(&tx, &[amo_change("second", 2, "10", "20")]).await.unwrap();
        tx.commit().await.unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND ((classid::bigint << 32) | objid::bigint) = $1",
                &[&stage_changes::INSERT_LOCK],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the second writer never waited for the insert lock");
        tokio::task::yield_now().await;
    }
    let sequence: i64 =
        observer.query_one("SELECT last_value FROM crm_stage_changes_id_seq", &[]).await.unwrap().get(0);
    assert_eq!(sequence, 1, "the waiting writer has taken no id yet");
    assert!(!second.is_finished());

    tx.commit().await.unwrap();
    second.await.unwrap();
    let ids: Vec<(String, i64)> = observer
        .query("SELECT source_event_id, id FROM crm_stage_changes ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(ids, [("first".to_string(), 1), ("second".to_string(), 2)]);
}

#[tokio::test]
async fn a_reader_following_ids_misses_nothing_while_writers_race() {
    let test = fresh_database().await;
    let db = tenant_db(&test.url).await;
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let url = test.url.clone();
            tokio::spawn(async move {
                // A pool of its own: a process of its own.
                let db = tenant_db(&url).await;
                let mut session = db.session().await.unwrap();
                for i in 0..25 {
                    let tx = session.transaction().await.unwrap();
                    let batch = [
                        amo_change(&format!("w{w}-{i}-a"), i, "1", "2"),
                        amo_change(&format!("w{w}-{i}-b"), i, "2", "3"),
                    ];
                    stage_changes::insert(&tx, &batch).await.unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    let session = db.session().await.unwrap();
    let (mut last, mut seen) = (0, Vec::new());
    loop {
        let done = writers.iter().all(|w| w.is_finished());
        let rows = stage_changes::read_after(&session, last, 1000).await.unwrap();
        for row in rows {
            last = row.id;
            seen.push(row.change.source_event_id);
        }
        if done {
            break;
        }
        tokio::task::yield_now().await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let read = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!((read, seen.len()), (100, 100), "every row seen once by a reader asking only for ids above the last");
}

async fn stored_position(session: &Session, stream: Stream) -> (Position, Option<DateTime<Utc>>) {
    let cursor = cursors::read(session, stream).await.unwrap().expect("started");
    (cursor.position, cursor.complete_to)
}

#[tokio::test]
async fn a_cursor_starts_once_and_never_moves_backwards() {
    let test = fresh_database().await;
    let db = tenant_db(&test.url).await;
    let mut session = db.session().await.unwrap();
    let stream = Stream::Bitrix24(EntityType::Deal);
    assert_eq!(cursors::read(&session, stream).await.unwrap(), None);

    let tx = session.transaction().await.unwrap();
    assert!(cursors::start(&tx, Position::LastId(EntityType::Deal, 40), at(100)).await.unwrap());
    assert!(!cursors::start(&tx, Position::LastId(EntityType::Deal, 0), at(0)).await.unwrap(), "the first one stands");
    tx.commit().await.unwrap();
    assert_eq!(stored_position(&session, stream).await, (Position::LastId(EntityType::Deal, 40), Some(at(100))));

    // The id and time given, whether anything moved, the id and time stored after.
    type Step = (i64, Option<i64>, bool, (i64, i64));
    let steps: [Step; 6] = [
        (50, Some(200), true, (50, 200)),
        (45, Some(300), true, (50, 300)), // the id stays, the time moves on
        (60, Some(250), true, (60, 300)), // and the other way round
        (60, None, false, (60, 300)),
        (10, Some(10), false, (60, 300)),
        (60, Some(300), false, (60, 300)),
    ];
    for (id, complete_to, moved, (want_id, want_to)) in steps {
        let tx = session.transaction().await.unwrap();
        let position = Position::LastId(EntityType::Deal, id);
        assert_eq!(cursors::advance(&tx, position, complete_to.map(at)).await.unwrap(), moved, "{id} {complete_to:?}");
        tx.commit().await.unwrap();
        assert_eq!(
            stored_position(&session, stream).await,
            (Position::LastId(EntityType::Deal, want_id), Some(at(want_to)))
        );
    }
    let updated = cursors::read(&session, stream).await.unwrap().unwrap().updated_at;

    // The rows and the cursor commit together, or neither.
    let tx = session.transaction().await.unwrap();
    stage_changes::insert(&tx, &[amo_change("e", 1, "1", "2")]).await.unwrap();
    assert!(cursors::advance(&tx, Position::LastId(EntityType::Deal, 70), Some(at(400))).await.unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(stored_position(&session, stream).await, (Position::LastId(EntityType::Deal, 60), Some(at(300))));
    assert!(stage_changes::read_after(&session, 0, 10).await.unwrap().is_empty());

    // The AmoCRM stream keeps a time; a stream never started does not move.
    let tx = session.transaction().await.unwrap();
    assert!(!cursors::advance(&tx, Position::WindowEnd(at(500)), Some(at(500))).await.unwrap());
    assert!(cursors::start(&tx, Position::WindowEnd(at(500)), at(560)).await.unwrap());
    assert!(!cursors::advance(&tx, Position::WindowEnd(at(400)), Some(at(400))).await.unwrap());
    assert!(cursors::advance(&tx, Position::WindowEnd(at(600)), Some(at(600))).await.unwrap());
    tx.commit().await.unwrap();
    let amo = cursors::read(&session, Stream::AmoLeadStatusChanged).await.unwrap().unwrap();
    assert_eq!((amo.position, amo.complete_to), (Position::WindowEnd(at(600)), Some(at(600))));
    let all: Vec<Stream> = cursors::read_all(&session).await.unwrap().iter().map(|c| c.position.stream()).collect();
    assert_eq!(all, [Stream::AmoLeadStatusChanged, stream]);
    assert_eq!(cursors::read(&session, stream).await.unwrap().unwrap().updated_at, updated, "untouched");
}

#[tokio::test]
async fn ingestion_reads_an_entitys_last_change_its_delivered_creation_and_its_outbox_row() {
    let test = fresh_database().await;
    let db = tenant_db(&test.url).await;
    let mut session = db.session().await.unwrap();
    let tx = session.transaction().await.unwrap();
    let rows = [
        b24_created("outbox:9", 5),
        b24_created("lead:1", 6),
        amo_change("a1", 5, "10", "20"),
        amo_change("a2", 5, "20", "30"),
        amo_change("a3", 6, "10", "40"),
    ];
    stage_changes::insert(&tx, &rows).await.unwrap();
    tx.commit().await.unwrap();

    let latest = stage_changes::latest_of(&session, Crm::AmoCrm, EntityType::Lead, &[5, 6, 7]).await.unwrap();
    let mut stages: Vec<(i64, String)> = latest.iter().map(|(id, s)| (*id, s.change.stage_to.clone())).collect();
    stages.sort();
    assert_eq!(stages, [(5, "30".to_string()), (6, "40".into())]);
    let b24 = stage_changes::latest_of(&session, Crm::Bitrix24, EntityType::Lead, &[5]).await.unwrap();
    assert_eq!(b24[&5].change.source_event_id, "outbox:9");
    assert!(stage_changes::latest_of(&session, Crm::Bitrix24, EntityType::Deal, &[5]).await.unwrap().is_empty());
    assert!(stage_changes::latest_of(&session, Crm::AmoCrm, EntityType::Lead, &[]).await.unwrap().is_empty());

    let created = stage_changes::created_by_delivery(&session, Crm::Bitrix24, EntityType::Lead, &[5, 6]).await;
    assert_eq!(created.unwrap().into_iter().collect::<Vec<_>>(), [5], "lead 6 was created in the CRM itself");

    let client = connect(&test.url).await;
    client
        .batch_execute(
            "INSERT INTO crm_lead_outbox (title, state, crm, crm_entity_type, crm_entity_id)
             VALUES ('a', 'delivered', 'bitrix24', 'deal', 500), ('b', 'delivered', 'bitrix24', 'lead', 500),
                    ('c', 'delivered', 'amocrm', 'lead', 500), ('d', 'delivered', 'bitrix24', 'deal', 500),
                    ('e', 'pending', NULL, NULL, NULL)",
        )
        .await
        .unwrap();
    let outbox = db::lead_outbox::rows_of_entities(&session, Crm::Bitrix24, EntityType::Deal, &[500, 501]).await;
    assert_eq!(outbox.unwrap().into_iter().collect::<Vec<_>>(), [(500, 1)], "the lowest id of the deal's rows");
}

#[tokio::test]
async fn stage_flags_are_read_by_key_for_ingestion_removed_stages_included() {
    let test = fresh_database().await;
    let db = tenant_db(&test.url).await;
    let session = db.session().await.unwrap();
    let amo = |pipeline_id, status_id| AmoStage {
        pipeline_id,
        pipeline_name: "Продажи".into(),
        pipeline_is_main: true,
        status_id,
        status_name: "Этап".into(),
        status_sort: 10,
        status_type: 0,
    };
    let flags = |qualified, success, fail| StageFlags { qualified, success, fail };
    db::amocrm_stages::upsert(
        &session,
        &[
            (amo(1, 20), flags(true, false, false)),
            (amo(1, 142), flags(false, true, false)),
            (amo(2, 142), flags(false, false, false)),
        ],
    )
    .await
    .unwrap();
    db::amocrm_stages::mark_removed(&session, &[(1, 20)]).await.unwrap();
    let read = db::amocrm_stages::flags_of(&session, &[(1, 20), (1, 142), (2, 20), (3, 142)]).await.unwrap();
    assert_eq!(read.len(), 2, "{read:?}");
    assert_eq!(read[&(1, 20)], flags(true, false, false), "removed, still known");
    assert_eq!(read[&(1, 142)], flags(false, true, false));

    let b24 = |entity_type, category_id, status_id: &str| B24Stage {
        entity_type,
        category_id,
        category_name: "Общее".into(),
        status_id: status_id.into(),
        status_name: "Этап".into(),
        status_sort: 10,
        semantics: Semantics::Process,
    };
    db::bitrix24_stages::upsert(
        &session,
        &[
            (b24(EntityType::Deal, 0, "WON"), flags(false, true, false)),
            (b24(EntityType::Deal, 1, "C1:WON"), flags(true, true, false)),
            (b24(EntityType::Lead, 0, "NEW"), flags(true, false, false)),
        ],
    )
    .await
    .unwrap();
    let keys = [(0, "WON".to_string()), (1, "C1:WON".into()), (0, "NEW".into()), (1, "WON".into())];
    let deals = db::bitrix24_stages::flags_of(&session, EntityType::Deal, &keys).await.unwrap();
    assert_eq!(deals.len(), 2, "{deals:?}");
    assert_eq!(deals[&(1, "C1:WON".to_string())], flags(true, true, false));
    let leads = db::bitrix24_stages::flags_of(&session, EntityType::Lead, &keys).await.unwrap();
    assert_eq!(leads.into_iter().collect::<Vec<_>>(), [((0, "NEW".to_string()), flags(true, false, false))]);
}
