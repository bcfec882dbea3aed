//! Lead delivery against the sandboxes: each outcome of the contract's
//! outcome table, the lookup before any resend, crashes and concurrency —
//! counted in the leads the CRM ends up with.

use std::time::Duration;

use crm_connect::apply::apply_tenant;
use crm_connect::config::TenantConfig;
use crm_connect::leads::{self, PassReport};
use crm_connect_sandbox::faults::Fault;
use crm_connect_sandbox::tenant_file::TenantFile;
use tokio_postgres::Client;

use crate::support::daemon::{Running, eventually};
use crate::support::proxy::Proxy;
use crate::support::rows::OutboxRow;
use crate::support::world::World;

/// A tenant with `[leads]`, connected (stages synced, tables migrated).
async fn connected(world: &World, file: TenantFile) -> (TenantConfig, Client) {
    let file = file.table_key("leads", "poll", "\"1s\"");
    world.write(&file);
    let tenant = world.tenant(&file);
    let applied = apply_tenant(&world.ctx, &tenant).await.unwrap();
    assert!(!applied.failed(), "{applied:?}");
    (tenant, world.client().await)
}

async fn insert(client: &Client, title: &str, phone: Option<&str>) -> String {
    client
        .query_one(
            "INSERT INTO crm_lead_outbox (title, phone) VALUES ($1, $2) RETURNING delivery_key::text",
            &[&title, &phone],
        )
        .await
        .unwrap()
        .get(0)
}

async fn deliver(world: &World, tenant: &TenantConfig) -> PassReport {
    leads::until_done(&world.ctx, tenant, tenant.leads.as_ref().unwrap()).await.unwrap()
}

/// What the contract's settle time would bring: the row's lookup is due.
async fn lookup_due(client: &Client) {
    client.execute("UPDATE crm_lead_outbox SET next_attempt_at = now() WHERE state = 'sending'", &[]).await.unwrap();
}

#[tokio::test]
async fn an_amocrm_lead_is_created_once_with_its_key_contact_and_first_stage_of_the_main_pipeline() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    let key = insert(&client, "Order 1", Some("+7 900 000 00 01")).await;

    let report = deliver(&world, &tenant).await;

    assert_eq!((report.sent, report.delivered, report.failed), (1, 1, 0), "{report:?}");
    let row = OutboxRow::one(&client).await;
    let leads = world.amo().leads();
    assert_eq!(leads.len(), 1, "{leads:#?}");
    let lead = &leads[0];
    assert_eq!(
        (row.state.as_str(), row.crm.as_deref(), row.entity_type.as_deref(), row.entity_id, row.contact_id),
        ("delivered", Some("amocrm"), Some("lead"), Some(lead.id), lead.contact_id),
    );
    assert_eq!(lead.name, "Order 1");
    let key_field = world.amo().lead_custom_fields().into_iter().find(|f| f.name == "crm-connect key").unwrap();
    assert_eq!(lead.field_texts(&key_field.id.to_string()), [key]);
    let contact = world.amo().contacts().into_iter().find(|c| Some(c.id) == lead.contact_id).unwrap();
    assert_eq!(contact.field_texts("PHONE"), ["+7 900 000 00 01"]);
    // Nothing is due any more: a second run sends nothing.
    assert_eq!(deliver(&world, &tenant).await, PassReport::default());
    assert_eq!(world.amo().creates(), 1);
    // `status` shows the outbox on the target CRM's line.
    let status = crate::support::crm_connect(&["--config", world.config(), "status"], &[]).await;
    assert!(status.stdout.contains("acme amocrm: leads: 0 pending, 0 sending, 1 delivered, 0 failed\n"), "{status:?}");
    let json = crate::support::crm_connect(&["--config", world.config(), "status", "--json"], &[]).await;
    let lines: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(lines[0]["leads"]["delivered"], 1, "{json:?}");
    assert_eq!(lines[0]["leads"]["oldest_pending_age_seconds"], serde_json::Value::Null, "{json:?}");
}

#[tokio::test]
async fn an_amocrm_answer_lost_after_the_create_is_found_by_its_key_and_the_lead_is_never_sent_twice() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order 2", None).await;
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", Fault::DropAfterExecuting, 1);

    let first = deliver(&world, &tenant).await;
    assert_eq!((first.sent, first.delivered), (1, 0), "{first:?}");
    assert_eq!(OutboxRow::one(&client).await.state, "sending");
    // Before its lookup is due, the row is left alone: not sent again.
    assert_eq!(deliver(&world, &tenant).await, PassReport::default());
    lookup_due(&client).await;
    let second = deliver(&world, &tenant).await;

    assert_eq!((second.sent, second.looked_up, second.delivered), (0, 1, 1), "{second:?}");
    let leads = world.amo().leads();
    assert_eq!(leads.len(), 1, "{leads:#?}");
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.entity_id, row.attempts), ("delivered", Some(leads[0].id), 1));
    assert_eq!(world.amo().creates(), 1);
}

#[tokio::test]
async fn a_bitrix24_deal_answer_lost_after_the_create_is_found_by_its_key_and_never_sent_twice() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file().entity_type("deal")).await;
    insert(&client, "Order 3", Some("+7 900 000 00 03")).await;
    let batch = world.portal().method_path("batch");
    world.portal().faults().inject_for("POST", &batch, Fault::DropAfterExecuting, 1);

    let first = deliver(&world, &tenant).await;
    assert_eq!((first.sent, first.delivered), (1, 0), "{first:?}");
    lookup_due(&client).await;
    let second = deliver(&world, &tenant).await;

    assert_eq!((second.looked_up, second.delivered), (1, 1), "{second:?}");
    let (deals, contacts) = (world.portal().deals(), world.portal().contacts());
    assert_eq!((deals.len(), contacts.len()), (1, 1), "{deals:#?} {contacts:#?}");
    assert_eq!(deals[0].contact_ids, [contacts[0].id]);
    let row = OutboxRow::one(&client).await;
    assert_eq!(
        (row.state.as_str(), row.entity_type.as_deref(), row.entity_id, row.contact_id),
        ("delivered", Some("deal"), Some(deals[0].id), Some(contacts[0].id))
    );
}

#[tokio::test]
async fn a_deal_whose_contact_landed_but_whose_deal_did_not_is_sent_alone_with_that_contact() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file().entity_type("deal")).await;
    let key = insert(&client, "Order 4", Some("+7 900 000 00 04")).await;
    // In the batch, the contact is created, the deal refused before it
    // runs; the answer is lost.
    world.portal().refuse_calls("crm.deal.add", 1, 503, "QUERY_LIMIT_EXCEEDED", "Too many requests");
    let batch = world.portal().method_path("batch");
    world.portal().faults().inject_for("POST", &batch, Fault::DropAfterExecuting, 1);

    deliver(&world, &tenant).await;
    assert_eq!((world.portal().contacts().len(), world.portal().deals().len()), (1, 0));
    lookup_due(&client).await;
    let report = deliver(&world, &tenant).await;

    assert_eq!(report.delivered, 1, "{report:?}");
    let (deals, contacts) = (world.portal().deals(), world.portal().contacts());
    assert_eq!((deals.len(), contacts.len()), (1, 1), "no second contact: {contacts:#?}");
    assert_eq!(deals[0].contact_ids, [contacts[0].id]);
    assert_eq!(deals[0].text("ORIGIN_ID").as_deref(), Some(key.as_str()));
    assert_eq!(OutboxRow::one(&client).await.contact_id, Some(contacts[0].id));
}

#[tokio::test]
async fn a_429_returns_the_row_to_pending_and_a_later_pass_delivers_it_once() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order 5", None).await;
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", Fault::too_many_requests(), 1);

    let first = deliver(&world, &tenant).await;
    assert_eq!((first.sent, first.delivered), (1, 0), "{first:?}");
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 1), "{row:?}");
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("429")), "{row:?}");
    assert!(world.amo().leads().is_empty());
    // The retry's time comes (the pause is the process's own: a new one).
    client.execute("UPDATE crm_lead_outbox SET next_attempt_at = now()", &[]).await.unwrap();
    let later = deliver(&world, &tenant).await;

    assert_eq!(later.delivered, 1, "{later:?}");
    assert_eq!(world.amo().leads().len(), 1);
    assert_eq!(OutboxRow::one(&client).await.attempts, 2);
}

#[tokio::test]
async fn a_validation_refusal_fails_the_row_which_is_never_sent_again() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order 6", None).await;
    let refusal = crm_connect_sandbox::amocrm::validation_refusal("/api/v4/leads/complex", "price must be an int");
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", refusal, 1);

    let report = deliver(&world, &tenant).await;
    client.execute("UPDATE crm_lead_outbox SET next_attempt_at = now()", &[]).await.unwrap();
    let again = deliver(&world, &tenant).await;

    assert_eq!((report.sent, report.failed), (1, 1), "{report:?}");
    assert_eq!(again, PassReport::default());
    let row = OutboxRow::one(&client).await;
    assert_eq!(row.state, "failed");
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("HTTP 400")), "{row:?}");
    assert_eq!(world.amo().creates(), 0);
}

#[tokio::test]
async fn a_row_with_no_title_and_no_contact_fails_without_any_request() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file()).await;
    client.execute("INSERT INTO crm_lead_outbox (comment) VALUES ('just a comment')", &[]).await.unwrap();
    let before = world.portal().requests().len();

    let report = deliver(&world, &tenant).await;

    assert_eq!((report.sent, report.failed), (0, 1), "{report:?}");
    let row = OutboxRow::one(&client).await;
    assert_eq!(row.state, "failed");
    assert_eq!(row.last_error.as_deref(), Some("the lead has no title and no contact (contact_name, phone or email)"));
    assert_eq!(world.portal().requests().len(), before, "no request for a row that can never be delivered");
}

#[tokio::test]
async fn two_producers_inserting_one_delivery_key_make_one_lead() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    let key = "6f1c9c1e-0000-4000-8000-000000000001";
    for _ in 0..2 {
        client
            .execute(
                "INSERT INTO crm_lead_outbox (delivery_key, title) VALUES ($1::text::uuid, 'Same')
                 ON CONFLICT (delivery_key) DO NOTHING",
                &[&key],
            )
            .await
            .unwrap();
    }

    deliver(&world, &tenant).await;

    assert_eq!(OutboxRow::one(&client).await.state, "delivered");
    assert_eq!(world.amo().leads().len(), 1);
}

#[tokio::test]
async fn two_deliver_processes_at_once_send_each_row_once() {
    let world = World::amocrm().await;
    let (_, client) = connected(&world, world.file_with_code()).await;
    for i in 0..10 {
        insert(&client, &format!("Order {i}"), None).await;
    }
    // Together the two processes exceed the account's rate limit now and
    // then: a row refused with 429 waits, and the next round (its time
    // brought forward) sends it.
    let args = ["--config", world.config(), "deliver"];
    for _round in 0..20 {
        let (a, b) = tokio::join!(crate::support::crm_connect(&args, &[]), crate::support::crm_connect(&args, &[]));
        assert_eq!((a.code, b.code), (0, 0), "{a:?} {b:?}");
        if OutboxRow::all(&client).await.iter().all(|r| r.state == "delivered") {
            break;
        }
        client
            .execute("UPDATE crm_lead_outbox SET next_attempt_at = now() WHERE state = 'pending'", &[])
            .await
            .unwrap();
    }

    let rows = OutboxRow::all(&client).await;
    assert!(rows.iter().all(|r| r.state == "delivered"), "{rows:#?}");
    let leads = world.amo().leads();
    let mut names: Vec<String> = leads.iter().map(|l| l.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!((leads.len(), names.len()), (10, 10), "each row once: {names:?}");
    assert_eq!(world.amo().creates(), 10, "no create twice");
}

#[tokio::test]
async fn a_row_claimed_by_a_process_that_died_before_sending_is_proved_absent_and_sent_once() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file().entity_type("lead")).await;
    insert(&client, "Claimed", None).await;
    // What a claim committed just before a crash leaves: `sending`, one
    // attempt, its lookup scheduled.
    client
        .execute(
            "UPDATE crm_lead_outbox SET state = 'sending', crm = 'bitrix24', attempts = 1, last_attempt_at = now(),
                 next_attempt_at = now() + interval '1 minute'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(deliver(&world, &tenant).await, PassReport::default(), "not before its lookup");
    lookup_due(&client).await;

    let report = deliver(&world, &tenant).await;

    assert_eq!((report.looked_up, report.sent, report.delivered), (1, 1, 1), "{report:?}");
    assert_eq!(world.portal().leads().len(), 1);
    assert_eq!(OutboxRow::one(&client).await.attempts, 2);
}

#[tokio::test]
async fn a_process_killed_between_the_create_and_its_commit_leaves_one_lead_after_a_restart() {
    let world = World::amocrm().await;
    let (_, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order 7", None).await;
    // The CRM creates the lead at once; its answer would come much later.
    let late = Fault::LateAnswer(Duration::from_secs(60));
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", late, 1);

    let mut first = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-connect"))
        .args(["--config", world.config(), "deliver"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while world.amo().leads().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the CRM never got the create");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    assert_eq!(OutboxRow::one(&client).await.state, "sending", "killed before any outcome was written");

    lookup_due(&client).await;
    let run = crate::support::crm_connect(&["--config", world.config(), "deliver"], &[]).await;

    assert_eq!((run.code, run.stdout.as_str()), (0, "acme: 1 delivered, 0 failed, 0 pending, 0 sending\n"), "{run:?}");
    assert_eq!(world.amo().leads().len(), 1, "exactly one lead");
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.entity_id), ("delivered", Some(world.amo().leads()[0].id)));
}

#[tokio::test]
async fn the_database_down_after_the_crm_created_the_lead_is_waited_out_in_memory_and_no_lookup_is_needed() {
    let world = World::amocrm().await;
    let proxy = Proxy::in_front_of(&world.db.url).await;
    let file = world.file_with_code().database_url(&proxy.url_for(&world.db.url));
    let (tenant, client) = connected(&world, file).await;
    insert(&client, "Order 8", None).await;
    // The CRM creates the lead at once; its answer comes a moment later,
    // when the database is already gone.
    let late = Fault::LateAnswer(Duration::from_millis(300));
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", late, 1);
    let requests_before = world.amo().requests().len();

    let pass = {
        let (ctx, tenant) = (world.ctx.clone(), tenant.clone());
        tokio::spawn(async move { leads::until_done(&ctx, &tenant, tenant.leads.as_ref().unwrap()).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while world.amo().leads().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the CRM never got the create");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.down();
    // The outcome is being written: the database refuses it for a while.
    proxy.refused_at_least(2).await;
    proxy.up();
    let report = pass.await.unwrap().unwrap();

    assert_eq!((report.sent, report.looked_up, report.delivered), (1, 0, 1), "{report:?}");
    let leads = world.amo().leads();
    assert_eq!(leads.len(), 1, "{leads:#?}");
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.entity_id, row.attempts), ("delivered", Some(leads[0].id), 1));
    let after: Vec<String> =
        world.amo().requests()[requests_before..].iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    let create = ["GET /api/v4/leads/custom_fields", "POST /api/v4/leads/custom_fields", "POST /api/v4/leads/complex"];
    assert_eq!(after, create, "the key field made, one create, and no lookup");
}

#[tokio::test]
async fn the_database_down_before_a_claim_leaves_the_rows_as_they_were_and_sends_nothing() {
    let world = World::bitrix24().await;
    let proxy = Proxy::in_front_of(&world.db.url).await;
    let file = world.file().entity_type("lead").database_url(&proxy.url_for(&world.db.url));
    let (_, client) = connected(&world, file).await;
    insert(&client, "Order 9", Some("+7 900 000 00 09")).await;
    let requests_before = world.portal().requests().len();
    proxy.down();

    let run = crate::support::crm_connect(&["--config", world.config(), "deliver"], &[]).await;

    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.starts_with("acme: error: cannot connect to 127.0.0.1:"), "{run:?}");
    assert_eq!(world.portal().requests().len(), requests_before, "nothing was sent");
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 0));

    proxy.up();
    let run = crate::support::crm_connect(&["--config", world.config(), "deliver"], &[]).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, "acme: 1 delivered, 0 failed, 0 pending, 0 sending\n"), "{run:?}");
    assert_eq!(world.portal().leads().len(), 1);
}

async fn delivered(client: &Client) -> bool {
    OutboxRow::all(client).await.iter().any(|r| r.state == "delivered")
}

#[tokio::test]
async fn the_daemon_delivers_at_once_on_a_wake_and_answers_202_to_any_slug() {
    let world = World::amocrm().await;
    // A poll of an hour: only the wake can bring the lead in time.
    let file = world.file_with_code().table_key("leads", "poll", "\"1h\"");
    world.write(&file);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Running::start_with(&["--listen", &listen], world.dir()).await;
    let client = world.client().await;
    let http = reqwest::Client::new();
    let metrics = || async { http.get(format!("http://{listen}/metrics")).send().await.unwrap().text().await.unwrap() };
    // The first pass (at start) found the outbox empty; the next is an hour away.
    let first_pass = "crm_connect_outbox_rows{tenant=\"acme\",state=\"pending\"} 0";
    eventually("the first delivery pass ended", Duration::from_secs(10), || async {
        metrics().await.contains(first_pass)
    })
    .await;
    insert(&client, "Woken", None).await;

    let unknown = http.post(format!("http://{listen}/leads/wake?tenant=nobody")).send().await.unwrap();
    let woken = http.post(format!("http://{listen}/leads/wake?tenant=acme")).send().await.unwrap();

    assert_eq!((unknown.status().as_u16(), woken.status().as_u16()), (202, 202));
    eventually("the woken pass delivered the lead", Duration::from_secs(10), || delivered(&client)).await;
    assert_eq!(world.amo().leads().len(), 1);
    let text = metrics().await;
    assert!(
        text.contains("crm_connect_lead_delivery_attempts_total{crm=\"amocrm\",outcome=\"delivered\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("crm_connect_lead_delivery_attempts_total{crm=\"bitrix24\",outcome=\"ambiguous\"} 0"),
        "{text}"
    );
    assert!(text.contains("crm_connect_lead_delivery_seconds_count{crm=\"amocrm\"} 1"), "{text}");
    assert_eq!(daemon.stop().await, std::process::ExitCode::SUCCESS);
}

#[tokio::test]
async fn the_daemon_delivers_on_its_poll() {
    let world = World::bitrix24().await;
    let file = world.file().entity_type("deal").table_key("leads", "poll", "\"1s\"");
    world.write(&file);
    let daemon = Running::start(world.dir()).await;
    let client = world.client().await;

    insert(&client, "Polled", Some("+7 900 000 00 09")).await;

    eventually("a poll delivered the deal", Duration::from_secs(10), || delivered(&client)).await;
    assert_eq!(world.portal().deals().len(), 1);
    daemon.stop().await;
}

/// A database server that accepts connections and never answers: work on
/// a tenant of it holds its `--concurrency` permit until the connect times out.
struct Mute {
    url_of: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Mute {
    fn start() -> Mute {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Mute { url_of: format!("postgres://crm@127.0.0.1:{port}/mute?connect_timeout=120"), accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_woken_pass_does_not_queue_behind_reconciles_holding_the_concurrency() {
    let world = World::amocrm().await;
    world.write(&world.file_with_code().table_key("leads", "poll", "\"1h\""));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Running::start_with(&["--listen", &listen, "--concurrency", "4"], world.dir()).await;
    let client = world.client().await;
    let http = reqwest::Client::new();
    let first_pass = "crm_connect_outbox_rows{tenant=\"acme\",state=\"pending\"} 0";
    eventually("the first delivery pass ended", Duration::from_secs(10), || async {
        let text = http.get(format!("http://{listen}/metrics")).send().await.unwrap().text().await.unwrap();
        text.contains(first_pass)
    })
    .await;
    // Five new tenants whose reconciles hang on their database: as many
    // as `--concurrency` lets run at once take a permit each and keep it.
    let mute = Mute::start();
    for i in 0..5 {
        world.write_as(&format!("mute{i}"), &TenantFile::new().database_url(&mute.url_of));
    }
    eventually("reconciles hang on the mute server", Duration::from_secs(10), || async { mute.accepted() >= 3 }).await;

    insert(&client, "Woken while busy", None).await;
    http.post(format!("http://{listen}/leads/wake?tenant=acme")).send().await.unwrap();

    eventually("the woken pass delivered the lead", Duration::from_secs(15), || delivered(&client)).await;
    assert_eq!(world.amo().leads().len(), 1);
    drop(daemon);
}

fn status(status: u16, content_type: &'static str, body: &str) -> Fault {
    Fault::Status { status, content_type, body: body.to_string() }
}

#[tokio::test]
async fn an_amocrm_401_refreshes_the_token_and_sends_again_at_once_without_counting_an_attempt() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order 401", None).await;
    let refused = status(401, "application/json", r#"{"title":"Unauthorized","status":401}"#);
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", refused, 1);

    let report = deliver(&world, &tenant).await;

    assert_eq!((report.sent, report.delivered), (2, 1), "{report:?}");
    assert_eq!(world.amo().token_stats().refreshed, 1);
    assert_eq!(world.amo().leads().len(), 1);
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.attempts), ("delivered", 1), "the 401 was not counted");
}

#[tokio::test]
async fn an_amocrm_401_whose_refresh_is_rejected_leaves_the_row_pending_and_the_tenant_needs_authorization() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order 401", None).await;
    // The account's tokens are revoked: the send gets 401, the refresh 400.
    world.amo().revoke_all_tokens();

    let refused = leads::until_done(&world.ctx, &tenant, tenant.leads.as_ref().unwrap()).await;

    let cause = refused.expect_err("the pass ends at the rejected refresh");
    assert_eq!(cause.kind, crm_connect::model::FailureKind::NeedsAuthorization, "{cause:?}");
    assert!(world.amo().leads().is_empty());
    assert_eq!(world.amo().token_stats().refresh_rejected, 1);
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 0), "{row:?}");
    assert!(crate::faults::state_is(&world.db.url, "amocrm", "needs_authorization").await);
    // Rows wait for the authorization: a later pass sends nothing.
    let requests = world.amo().requests().len();
    let later = deliver(&world, &tenant).await;
    assert_eq!((later.sent, later.waiting.as_deref()), (0, Some("amocrm is not connected")), "{later:?}");
    assert_eq!(world.amo().requests().len(), requests);
}

#[tokio::test]
async fn an_account_refusal_leaves_the_row_pending_uncounted_and_pauses_delivery() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order 402", None).await;
    insert(&client, "Order 402b", None).await;
    let unpaid = status(402, "application/json", r#"{"title":"Payment Required","status":402}"#);
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", unpaid, 1);

    let report = deliver(&world, &tenant).await;

    assert_eq!((report.sent, report.delivered), (1, 0), "the second row waits: {report:?}");
    assert!(report.waiting.as_deref().is_some_and(|w| w.contains("paused")), "{report:?}");
    let rows = OutboxRow::all(&client).await;
    assert_eq!((rows[0].state.as_str(), rows[0].attempts), ("pending", 0), "{rows:#?}");
    assert!(rows[0].last_error.as_deref().is_some_and(|e| e.contains("402")), "{rows:#?}");
    assert_eq!(rows[1].attempts, 0, "{rows:#?}");
    assert!(world.amo().leads().is_empty());
}

#[tokio::test]
async fn a_row_refused_as_not_executed_at_max_attempts_fails() {
    let world = World::bitrix24().await;
    let file = world.file().entity_type("lead").table_key("leads", "max_attempts", "1");
    let (tenant, client) = connected(&world, file).await;
    insert(&client, "Order limit", None).await;
    world.portal().refuse_calls("crm.lead.add", 1, 503, "OPERATION_TIME_LIMIT", "Method is blocked");

    let report = deliver(&world, &tenant).await;

    assert_eq!(report.failed, 1, "{report:?}");
    let row = OutboxRow::one(&client).await;
    assert_eq!(row.state, "failed");
    assert!(
        row.last_error.as_deref().is_some_and(|e| e.starts_with("gave up after 1 attempts: OPERATION_TIME_LIMIT")),
        "{row:?}"
    );
    assert!(world.portal().leads().is_empty());
}

#[tokio::test]
async fn leads_wait_while_the_portal_runs_the_simple_crm_which_has_none() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file().entity_type("lead")).await;
    world.portal().set_crm_mode(2);
    insert(&client, "Order simple", None).await;

    let report = deliver(&world, &tenant).await;

    assert_eq!(report.sent, 0, "{report:?}");
    assert!(report.waiting.as_deref().is_some_and(|w| w.contains("simple CRM")), "{report:?}");
    assert_eq!(OutboxRow::one(&client).await.state, "pending");
}

#[tokio::test]
async fn a_lookup_that_cannot_decide_leaves_the_row_sending_and_never_sends_it_again() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    insert(&client, "Order unsure", None).await;
    world.amo().faults().inject_for("POST", "/api/v4/leads/complex", Fault::DropAfterExecuting, 1);
    deliver(&world, &tenant).await;
    world.amo().faults().inject_for("GET", "/api/v4/leads", status(400, "application/json", "{}"), 1);
    lookup_due(&client).await;

    let unsure = deliver(&world, &tenant).await;
    assert_eq!((unsure.looked_up, unsure.sent, unsure.delivered), (1, 0, 0), "{unsure:?}");
    assert_eq!(OutboxRow::one(&client).await.state, "sending");
    lookup_due(&client).await;
    let sure = deliver(&world, &tenant).await;

    assert_eq!((sure.looked_up, sure.delivered), (1, 1), "{sure:?}");
    assert_eq!(world.amo().creates(), 1);
}

#[tokio::test]
async fn a_deal_refused_after_its_contact_landed_fails_and_keeps_the_contact() {
    let world = World::bitrix24().await;
    let (tenant, client) = connected(&world, world.file().entity_type("deal")).await;
    insert(&client, "Order refused", Some("+7 900 000 00 05")).await;
    world.portal().refuse_calls("crm.deal.add", 1, 400, "", "Stage is not valid");

    let report = deliver(&world, &tenant).await;

    assert_eq!(report.failed, 1, "{report:?}");
    let contacts = world.portal().contacts();
    assert_eq!((contacts.len(), world.portal().deals().len()), (1, 0));
    let row = OutboxRow::one(&client).await;
    assert_eq!((row.state.as_str(), row.contact_id), ("failed", Some(contacts[0].id)), "{row:?}");
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("Stage is not valid")), "{row:?}");
}

#[tokio::test]
async fn a_row_naming_a_stage_that_is_not_synced_fails_without_a_request() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    client.execute("INSERT INTO crm_lead_outbox (title, stage_id) VALUES ('Lost', '999999')", &[]).await.unwrap();

    let report = deliver(&world, &tenant).await;

    assert_eq!((report.sent, report.failed), (0, 1), "{report:?}");
    let row = OutboxRow::one(&client).await;
    assert_eq!(
        (row.state.as_str(), row.last_error.as_deref()),
        ("failed", Some("status 999999 is not a synced status"))
    );
    assert_eq!(world.amo().creates(), 0);
}

#[tokio::test]
async fn a_key_field_deleted_in_the_account_is_created_again_and_the_row_sent_again_uncounted() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    let leads = tenant.leads.as_ref().unwrap();
    // One process: its field listing is kept between passes.
    let delivery = leads::Delivery::default();
    insert(&client, "Before", None).await;
    leads::pass(&world.ctx, &delivery, &tenant, leads, leads::PASS_LIMIT).await.unwrap();
    let old: i64 = client.query_one("SELECT amocrm_lead_key_field_id FROM config", &[]).await.unwrap().get(0);
    assert!(world.amo().remove_lead_custom_field(old));
    let key = insert(&client, "After", None).await;

    let report = leads::pass(&world.ctx, &delivery, &tenant, leads, leads::PASS_LIMIT).await.unwrap();

    assert_eq!((report.sent, report.delivered), (2, 1), "a 400, then the send with the new field: {report:?}");
    let new: i64 = client.query_one("SELECT amocrm_lead_key_field_id FROM config", &[]).await.unwrap().get(0);
    assert_ne!(new, old);
    let after = world.amo().leads().into_iter().find(|l| l.name == "After").unwrap();
    assert_eq!(after.field_texts(&new.to_string()), [key]);
    let rows = OutboxRow::all(&client).await;
    assert_eq!((rows[1].state.as_str(), rows[1].attempts), ("delivered", 1), "{rows:#?}");
}

#[tokio::test]
async fn an_amocrm_comment_becomes_one_note_on_the_delivered_lead() {
    let world = World::amocrm().await;
    let (tenant, client) = connected(&world, world.file_with_code()).await;
    client
        .execute("INSERT INTO crm_lead_outbox (title, comment) VALUES ('Noted', 'Call after 18:00')", &[])
        .await
        .unwrap();

    deliver(&world, &tenant).await;
    deliver(&world, &tenant).await;

    let lead = world.amo().leads().into_iter().next().unwrap();
    let notes = world.amo().notes();
    assert_eq!(notes.len(), 1, "sent once: {notes:#?}");
    assert_eq!((notes[0].entity_id, notes[0].text.as_deref()), (lead.id, Some("Call after 18:00")));
}

#[tokio::test]
async fn defaults_matching_no_synced_stage_make_rows_wait_and_are_recorded_once_like_a_mapping_error() {
    let world = World::amocrm().await;
    let file =
        world.file_with_code().table_key("leads.amocrm", "stage", r#"{ pipeline = "Nowhere", stage = "Nothing" }"#);
    let (tenant, client) = connected(&world, file).await;
    insert(&client, "Waiting", None).await;

    let first = deliver(&world, &tenant).await;
    let second = deliver(&world, &tenant).await;

    assert!(first.waiting.as_deref().is_some_and(|w| w.starts_with("[leads.amocrm]: stage")), "{first:?}");
    assert_eq!(second.sent, 0, "{second:?}");
    assert_eq!(OutboxRow::one(&client).await.state, "pending");
    let status = crate::support::rows::StatusRow::of(&client, "amocrm").await;
    assert_eq!(status.state, "error");
    assert_eq!(status.last_error, first.waiting);
    let events: i64 = client
        .query_one("SELECT count(*) FROM crm_connect_events WHERE kind = 'leads_config_error'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1, "recorded once");
    assert_eq!(world.amo().creates(), 0);
}
