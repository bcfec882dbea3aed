//! The migrations: every table of database.md, additive on a database that
//! already has its own `config`, and safe when two processes run them at once;
//! the lead outbox as producers use it.

use crm_connect::db::{self, PoolSettings, Pools};
use crm_connect::secret::Secret;
use tokio_postgres::Client;

use crate::support::{connect, postgres::fresh_database};

async fn migrate(url: &str) {
    let pools = Pools::new(PoolSettings::default());
    let db = pools.get("t", &Secret::new(url)).unwrap();
    db::migrate(&db).await.unwrap_or_else(|e| panic!("migrate: {e}"));
}

async fn columns(client: &Client, table: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name = $1 ORDER BY column_name",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The column lists of every unique index of `table`.
async fn unique_keys(client: &Client, table: &str) -> Vec<Vec<String>> {
    client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.n)
             FROM pg_index i
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1::text::regclass AND i.indisunique
             GROUP BY i.indexrelid",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every index of `table`: its columns, whether unique, and its predicate.
async fn indexes(client: &Client, table: &str) -> Vec<(Vec<String>, bool, Option<String>)> {
    client
        .query(
            "SELECT (SELECT array_agg(a.attname::text ORDER BY k.n)
                     FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum),
                    i.indisunique,
                    pg_get_expr(i.indpred, i.indrelid)
             FROM pg_index i
             WHERE i.indrelid = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn check_columns(actual: &[(String, String)], expected: &[(&str, &str)]) {
    for (name, ty) in expected {
        assert!(actual.iter().any(|(n, t)| n == name && t == ty), "missing column {name} {ty} in {actual:?}");
    }
}

#[tokio::test]
async fn an_empty_database_gets_every_table_of_the_contract() {
    let db = fresh_database().await;
    migrate(&db.url).await;
    let client = connect(&db.url).await;

    let config = columns(&client, "config").await;
    check_columns(
        &config,
        &[
            ("id", "integer"),
            ("amocrm_subdomain", "text"),
            ("amocrm_client_id", "text"),
            ("amocrm_client_secret", "text"),
            ("amocrm_access_token", "text"),
            ("amocrm_refresh_token", "text"),
            ("amocrm_token_expires_at", "timestamp with time zone"),
            ("amocrm_domain", "text"),
            ("amocrm_auth_code_sha256", "text"),
            ("bitrix24_domain", "text"),
            ("bitrix24_access_token", "text"),
            ("bitrix24_user_id", "integer"),
            ("bitrix24_entity_type", "text"),
            ("bitrix24_connected_at", "timestamp with time zone"),
            ("amocrm_lead_key_field_id", "bigint"),
        ],
    );
    let ids: Vec<i32> = client.query("SELECT id FROM config", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, [1]);

    check_columns(
        &columns(&client, "bitrix24_pipeline_stages").await,
        &[
            ("id", "bigint"),
            ("category_id", "integer"),
            ("category_name", "text"),
            ("status_id", "text"),
            ("status_name", "text"),
            ("status_sort", "integer"),
            ("entity_type", "text"),
            ("semantics", "text"),
            ("is_qualified_stage", "boolean"),
            ("is_success_stage", "boolean"),
            ("is_fail_stage", "boolean"),
            ("synced_at", "timestamp with time zone"),
            ("removed_at", "timestamp with time zone"),
        ],
    );
    assert!(unique_keys(&client, "bitrix24_pipeline_stages").await.contains(&vec![
        "entity_type".to_string(),
        "category_id".into(),
        "status_id".into()
    ]));

    check_columns(
        &columns(&client, "amocrm_pipeline_stages").await,
        &[
            ("id", "bigint"),
            ("pipeline_id", "bigint"),
            ("pipeline_name", "text"),
            ("pipeline_is_main", "boolean"),
            ("status_id", "bigint"),
            ("status_name", "text"),
            ("status_sort", "integer"),
            ("status_type", "integer"),
            ("is_qualified_stage", "boolean"),
            ("is_success_stage", "boolean"),
            ("is_fail_stage", "boolean"),
            ("synced_at", "timestamp with time zone"),
            ("removed_at", "timestamp with time zone"),
        ],
    );
    assert!(
        unique_keys(&client, "amocrm_pipeline_stages")
            .await
            .contains(&vec!["pipeline_id".to_string(), "status_id".into()])
    );

    check_columns(
        &columns(&client, "crm_connect_status").await,
        &[
            ("crm", "text"),
            ("state", "text"),
            ("last_success_at", "timestamp with time zone"),
            ("last_error", "text"),
            ("last_error_at", "timestamp with time zone"),
            ("stages_synced_at", "timestamp with time zone"),
            ("stage_count", "integer"),
            ("updated_at", "timestamp with time zone"),
        ],
    );
    assert!(unique_keys(&client, "crm_connect_status").await.contains(&vec!["crm".to_string()]));
    check_columns(
        &columns(&client, "crm_connect_events").await,
        &[("id", "bigint"), ("at", "timestamp with time zone"), ("crm", "text"), ("kind", "text"), ("detail", "jsonb")],
    );

    check_columns(
        &columns(&client, "crm_lead_outbox").await,
        &[
            ("id", "bigint"),
            ("delivery_key", "uuid"),
            ("created_at", "timestamp with time zone"),
            ("title", "text"),
            ("contact_name", "text"),
            ("phone", "text"),
            ("email", "text"),
            ("comment", "text"),
            ("price", "numeric"),
            ("source", "text"),
            ("utm_source", "text"),
            ("utm_medium", "text"),
            ("utm_campaign", "text"),
            ("utm_content", "text"),
            ("utm_term", "text"),
            ("pipeline_id", "text"),
            ("stage_id", "text"),
            ("responsible_user_id", "bigint"),
            ("meta_lead_id", "text"),
            ("ctwa_clid", "text"),
            ("extra", "jsonb"),
            ("state", "text"),
            ("attempts", "integer"),
            ("next_attempt_at", "timestamp with time zone"),
            ("last_attempt_at", "timestamp with time zone"),
            ("delivered_at", "timestamp with time zone"),
            ("last_error", "text"),
            ("crm", "text"),
            ("crm_entity_type", "text"),
            ("crm_entity_id", "bigint"),
            ("crm_contact_id", "bigint"),
        ],
    );
    let outbox = indexes(&client, "crm_lead_outbox").await;
    let has = |columns: &[&str], unique: bool| {
        outbox.iter().any(|(c, u, p)| c.iter().eq(columns.iter()) && *u == unique && p.is_none())
    };
    assert!(has(&["id"], true) && has(&["delivery_key"], true), "{outbox:?}");
    assert!(has(&["crm", "crm_entity_type", "crm_entity_id"], false), "{outbox:?}");
    // The index a delivery pass reads covers the due states only.
    let due = outbox.iter().find(|(c, _, p)| c == &["next_attempt_at"] && p.is_some());
    let (_, unique, predicate) = due.unwrap_or_else(|| panic!("no partial index on next_attempt_at: {outbox:?}"));
    let predicate = predicate.as_deref().unwrap_or_default();
    assert!(!unique, "{predicate}");
    assert!(predicate.contains("'pending'") && predicate.contains("'sending'"), "{predicate}");
    assert!(!predicate.contains("'delivered'") && !predicate.contains("'failed'"), "{predicate}");

    check_columns(
        &columns(&client, "crm_stage_changes").await,
        &[
            ("id", "bigint"),
            ("crm", "text"),
            ("source_event_id", "text"),
            ("entity_type", "text"),
            ("entity_id", "bigint"),
            ("pipeline_from", "text"),
            ("stage_from", "text"),
            ("pipeline_to", "text"),
            ("stage_to", "text"),
            ("change_kind", "text"),
            ("semantic", "text"),
            ("is_qualified_stage", "boolean"),
            ("is_success_stage", "boolean"),
            ("is_fail_stage", "boolean"),
            ("changed_at", "timestamp with time zone"),
            ("changed_by_user_id", "bigint"),
            ("responsible_user_id", "bigint"),
            ("outbox_id", "bigint"),
            ("ingested_at", "timestamp with time zone"),
        ],
    );
    let changes = indexes(&client, "crm_stage_changes").await;
    let has = |columns: &[&str], unique: bool| {
        changes.iter().any(|(c, u, p)| c.iter().eq(columns.iter()) && *u == unique && p.is_none())
    };
    assert!(has(&["id"], true), "{changes:?}");
    assert!(has(&["crm", "source_event_id"], true), "{changes:?}");
    assert!(has(&["crm", "entity_type", "entity_id", "id"], false), "{changes:?}");
    check_columns(
        &columns(&client, "crm_connect_cursors").await,
        &[
            ("crm", "text"),
            ("stream", "text"),
            ("last_id", "bigint"),
            ("window_end", "timestamp with time zone"),
            ("complete_to", "timestamp with time zone"),
            ("updated_at", "timestamp with time zone"),
        ],
    );
    assert_eq!(unique_keys(&client, "crm_connect_cursors").await, [vec!["crm".to_string(), "stream".into()]]);
}

#[tokio::test]
async fn the_funnel_tables_refuse_values_outside_the_contract_and_default_their_times() {
    let db = fresh_database().await;
    migrate(&db.url).await;
    let client = connect(&db.url).await;
    client
        .batch_execute(
            "INSERT INTO crm_stage_changes (crm, source_event_id, entity_type, entity_id, stage_to, change_kind, changed_at)
             VALUES ('amocrm', 'e1', 'lead', 7, '142', 'moved', now() - interval '1 hour');
             INSERT INTO crm_connect_cursors (crm, stream, last_id) VALUES ('bitrix24', 'deal', 0);",
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT ingested_at > changed_at, (SELECT updated_at IS NOT NULL FROM crm_connect_cursors)
             FROM crm_stage_changes",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    let insert = |crm: &str, source: &str, entity_type: &str, kind: &str, semantic: &str| {
        format!(
            "INSERT INTO crm_stage_changes (crm, source_event_id, entity_type, entity_id, stage_to, change_kind, semantic, changed_at)
             VALUES ('{crm}', '{source}', '{entity_type}', 1, 'NEW', '{kind}', {semantic}, now())"
        )
    };
    client.batch_execute(&insert("bitrix24", "deal:1", "deal", "created", "'process'")).await.unwrap();
    for wrong in [
        insert("salesforce", "y1", "lead", "moved", "NULL"),
        insert("amocrm", "y2", "contact", "moved", "NULL"),
        insert("amocrm", "y3", "lead", "deleted", "NULL"),
        insert("amocrm", "y4", "lead", "moved", "'apology'"),
    ] {
        let error = client.batch_execute(&wrong).await.expect_err(&wrong);
        let code = error.as_db_error().map(|e| e.code().clone());
        assert_eq!(code, Some(tokio_postgres::error::SqlState::CHECK_VIOLATION), "{wrong}: {error}");
    }
    let error = client
        .batch_execute(&insert("bitrix24", "deal:1", "deal", "moved", "NULL"))
        .await
        .expect_err("the same source event again");
    assert_eq!(error.as_db_error().map(|e| e.code().clone()), Some(tokio_postgres::error::SqlState::UNIQUE_VIOLATION));
}

#[tokio::test]
async fn a_producer_retrying_its_insert_with_one_key_adds_one_row_with_the_daemons_defaults() {
    let db = fresh_database().await;
    migrate(&db.url).await;
    let client = connect(&db.url).await;
    let insert = "INSERT INTO crm_lead_outbox (delivery_key, title, phone, price, state)
                  VALUES ($1::text::uuid, 'Заявка с сайта', '+79990000000', 1500.50, 'pending')
                  ON CONFLICT (delivery_key) DO NOTHING";
    let key = "0b9f4c1e-5b3a-4d6e-9f21-3c8a7e5d2b10";
    let first = client.execute(insert, &[&key]).await.unwrap();
    let second = client.execute(insert, &[&key]).await.unwrap();
    assert_eq!((first, second), (1, 0), "the retry must not add a second lead");

    let row = client
        .query_one(
            "SELECT count(*) OVER (), delivery_key::text, state, attempts, extra::text,
                    next_attempt_at <= now(), crm IS NULL AND last_attempt_at IS NULL AND delivered_at IS NULL
             FROM crm_lead_outbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, String>(1), key);
    assert_eq!(row.get::<_, String>(2), "pending");
    assert_eq!(row.get::<_, i32>(3), 0);
    assert_eq!(row.get::<_, String>(4), "{}");
    assert!(row.get::<_, bool>(5), "due at once");
    assert!(row.get::<_, bool>(6), "the daemon's columns start empty");

    // Without a key of its own, a producer's row gets a generated one.
    client.batch_execute("INSERT INTO crm_lead_outbox (contact_name) VALUES ('Ася'), ('Борис')").await.unwrap();
    let keys: i64 =
        client.query_one("SELECT count(DISTINCT delivery_key) FROM crm_lead_outbox", &[]).await.unwrap().get(0);
    assert_eq!(keys, 3);

    for wrong in [
        "INSERT INTO crm_lead_outbox (title, state) VALUES ('x', 'done')",
        "INSERT INTO crm_lead_outbox (title, crm) VALUES ('x', 'salesforce')",
    ] {
        let error = client.batch_execute(wrong).await.expect_err(wrong);
        let code = error.as_db_error().map(|e| e.code().clone());
        assert_eq!(code, Some(tokio_postgres::error::SqlState::CHECK_VIOLATION), "{wrong}: {error}");
    }
}

#[tokio::test]
async fn an_existing_config_table_keeps_its_columns_and_its_row() {
    let db = fresh_database().await;
    let client = connect(&db.url).await;
    client
        .batch_execute(
            "CREATE TABLE config (
                 id integer PRIMARY KEY,
                 agent_name text NOT NULL DEFAULT 'agent',
                 amocrm_subdomain text,
                 openai_key text
             );
             INSERT INTO config (id, agent_name, amocrm_subdomain, openai_key) VALUES (1, 'Ася', 'old', 'sk-1');
             CREATE TABLE bitrix24_pipeline_stages (
                 id serial PRIMARY KEY,
                 category_id integer NOT NULL,
                 category_name text NOT NULL,
                 status_id text NOT NULL,
                 status_name text NOT NULL,
                 status_sort integer NOT NULL,
                 entity_type text NOT NULL,
                 UNIQUE (entity_type, category_id, status_id)
             );
             INSERT INTO bitrix24_pipeline_stages (category_id, category_name, status_id, status_name, status_sort, entity_type)
             VALUES (0, 'Общее', 'NEW', 'Новая', 10, 'deal');",
        )
        .await
        .unwrap();

    migrate(&db.url).await;

    let row =
        client.query_one("SELECT agent_name, amocrm_subdomain, openai_key, bitrix24_user_id FROM config", &[]).await;
    let row = row.expect("still exactly one row");
    assert_eq!(row.get::<_, String>(0), "Ася");
    assert_eq!(row.get::<_, String>(1), "old");
    assert_eq!(row.get::<_, String>(2), "sk-1");
    assert_eq!(row.get::<_, Option<i32>>(3), None);
    let stage = client
        .query_one("SELECT status_name, is_success_stage, removed_at IS NULL FROM bitrix24_pipeline_stages", &[])
        .await
        .unwrap();
    assert_eq!(stage.get::<_, String>(0), "Новая");
    assert!(!stage.get::<_, bool>(1));
    assert!(stage.get::<_, bool>(2));
}

#[tokio::test]
async fn a_config_table_without_a_row_gets_row_1_and_other_not_null_columns_keep_their_default() {
    let db = fresh_database().await;
    let client = connect(&db.url).await;
    client.batch_execute("CREATE TABLE config (id integer, mode text NOT NULL DEFAULT 'auto')").await.unwrap();
    migrate(&db.url).await;
    let mode: String = client.query_one("SELECT mode FROM config WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(mode, "auto");
}

#[tokio::test]
async fn migrating_again_changes_nothing() {
    let db = fresh_database().await;
    migrate(&db.url).await;
    let client = connect(&db.url).await;
    let before: String = client.query_one("SELECT xmin::text FROM config WHERE id = 1", &[]).await.unwrap().get(0);
    let history_before: i64 =
        client.query_one("SELECT count(*) FROM crm_connect_schema_history", &[]).await.unwrap().get(0);
    migrate(&db.url).await;
    let after: String = client.query_one("SELECT xmin::text FROM config WHERE id = 1", &[]).await.unwrap().get(0);
    let history_after: i64 =
        client.query_one("SELECT count(*) FROM crm_connect_schema_history", &[]).await.unwrap().get(0);
    assert_eq!(before, after);
    assert_eq!(history_before, history_after);
}

#[tokio::test]
async fn two_processes_migrating_one_database_at_once_both_succeed() {
    // Separate pools are separate sessions, as two daemons would be; a few
    // rounds make an unlocked race (duplicate history rows, "relation
    // already exists") very likely to show.
    for _ in 0..4 {
        let db = fresh_database().await;
        let (a, b) = tokio::join!(migrate(&db.url), migrate(&db.url));
        let ((), ()) = (a, b);
        let client = connect(&db.url).await;
        let rows: i64 = client.query_one("SELECT count(*) FROM config", &[]).await.unwrap().get(0);
        assert_eq!(rows, 1);
        let history: i64 =
            client.query_one("SELECT count(*) FROM crm_connect_schema_history", &[]).await.unwrap().get(0);
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count();
        assert_eq!(history as usize, files, "each migration is recorded once");
    }
}
