//! The rows tests read back from a tenant database, as named structs
//! rather than tuples, so an assertion says which column it checks.

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Row};

/// A CRM's row of `crm_connect_status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRow {
    pub state: String,
    pub last_error: Option<String>,
}

impl StatusRow {
    /// `None` while the row (or the table, or the server) is not there.
    pub async fn read(client: &Client, crm: &str) -> Option<StatusRow> {
        let row = client
            .query_opt("SELECT state, last_error FROM crm_connect_status WHERE crm = $1", &[&crm])
            .await
            .ok()
            .flatten()?;
        Some(StatusRow { state: row.get(0), last_error: row.get(1) })
    }

    /// The row, which must be there.
    pub async fn of(client: &Client, crm: &str) -> StatusRow {
        StatusRow::read(client, crm).await.unwrap_or_else(|| panic!("no status row for {crm}"))
    }
}

/// The AmoCRM token columns of `config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokensRow {
    pub access: Option<String>,
    pub refresh: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl TokensRow {
    pub async fn read(client: &Client) -> TokensRow {
        let row = client
            .query_one("SELECT amocrm_access_token, amocrm_refresh_token, amocrm_token_expires_at FROM config", &[])
            .await
            .unwrap();
        TokensRow { access: row.get(0), refresh: row.get(1), expires_at: row.get(2) }
    }
}

/// A row of `amocrm_pipeline_stages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmoStageRow {
    pub pipeline: String,
    pub status_id: i64,
    pub name: String,
    pub qualified: bool,
    pub success: bool,
    pub fail: bool,
    pub removed: bool,
}

impl AmoStageRow {
    /// Every stored stage, by pipeline and sort.
    pub async fn all(client: &Client) -> Vec<AmoStageRow> {
        let rows = client
            .query(
                "SELECT pipeline_name, status_id, status_name, is_qualified_stage, is_success_stage, is_fail_stage,
                        removed_at IS NOT NULL
                 FROM amocrm_pipeline_stages ORDER BY pipeline_id, status_sort, status_id",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(AmoStageRow::from).collect()
    }
}

impl From<&Row> for AmoStageRow {
    fn from(r: &Row) -> AmoStageRow {
        AmoStageRow {
            pipeline: r.get(0),
            status_id: r.get(1),
            name: r.get(2),
            qualified: r.get(3),
            success: r.get(4),
            fail: r.get(5),
            removed: r.get(6),
        }
    }
}

/// A row of `bitrix24_pipeline_stages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct B24StageRow {
    pub category_id: i32,
    pub category: String,
    pub status_id: String,
    pub name: String,
    pub semantics: String,
    pub qualified: bool,
    pub success: bool,
    pub fail: bool,
    pub removed: bool,
}

impl B24StageRow {
    /// Every stored stage, by category and sort.
    pub async fn all(client: &Client) -> Vec<B24StageRow> {
        let rows = client
            .query(
                "SELECT category_id, category_name, status_id, status_name, semantics, is_qualified_stage,
                        is_success_stage, is_fail_stage, removed_at IS NOT NULL
                 FROM bitrix24_pipeline_stages ORDER BY category_id, status_sort, status_id",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(B24StageRow::from).collect()
    }
}

impl From<&Row> for B24StageRow {
    fn from(r: &Row) -> B24StageRow {
        B24StageRow {
            category_id: r.get(0),
            category: r.get(1),
            status_id: r.get(2),
            name: r.get(3),
            semantics: r.get(4),
            qualified: r.get(5),
            success: r.get(6),
            fail: r.get(7),
            removed: r.get(8),
        }
    }
}

/// A row of `crm_connect_events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub crm: String,
    pub kind: String,
}

impl EventRow {
    /// Every event in the order recorded.
    pub async fn all(client: &Client) -> Vec<EventRow> {
        let rows = client.query("SELECT crm, kind FROM crm_connect_events ORDER BY id", &[]).await.unwrap();
        rows.iter().map(|r| EventRow { crm: r.get(0), kind: r.get(1) }).collect()
    }

    pub async fn count(client: &Client, kind: &str) -> usize {
        EventRow::all(client).await.iter().filter(|e| e.kind == kind).count()
    }
}

/// The row versions (`xmin`) of a query's rows: any write changes them.
pub async fn xmins(client: &Client, table: &str) -> Vec<String> {
    let sql = format!("SELECT xmin::text FROM {table} ORDER BY id");
    client.query(&sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// Every row a failed sync must leave as it was (the `config` row with its
/// tokens and webhook, every stage row), by content and by row version.
pub async fn snapshot(client: &Client) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["config", "amocrm_pipeline_stages", "bitrix24_pipeline_stages"] {
        let sql = format!("SELECT xmin::text || ' ' || to_jsonb(t)::text FROM {table} t ORDER BY id");
        rows.extend(client.query(&sql, &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)));
    }
    rows
}

/// A row of `crm_lead_outbox`, the columns the daemon writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub delivery_key: String,
    pub state: String,
    pub attempts: i32,
    pub crm: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<i64>,
    pub contact_id: Option<i64>,
    pub last_error: Option<String>,
}

impl OutboxRow {
    /// Every row, by id.
    pub async fn all(client: &Client) -> Vec<OutboxRow> {
        client
            .query(
                "SELECT id, delivery_key::text, state, attempts, crm, crm_entity_type, crm_entity_id, crm_contact_id,
                        last_error
                 FROM crm_lead_outbox ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| OutboxRow {
                id: r.get(0),
                delivery_key: r.get(1),
                state: r.get(2),
                attempts: r.get(3),
                crm: r.get(4),
                entity_type: r.get(5),
                entity_id: r.get(6),
                contact_id: r.get(7),
                last_error: r.get(8),
            })
            .collect()
    }

    pub async fn one(client: &Client) -> OutboxRow {
        let mut rows = OutboxRow::all(client).await;
        assert_eq!(rows.len(), 1, "{rows:#?}");
        rows.remove(0)
    }
}

/// Where a stage change went: (pipeline_from, stage_from, pipeline_to,
/// stage_to, change_kind, semantic).
pub type Movement<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, &'a str, &'a str, Option<&'a str>);

/// A row of `crm_stage_changes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageChangeRow {
    pub id: i64,
    pub crm: String,
    pub source_event_id: String,
    pub entity_type: String,
    pub entity_id: i64,
    pub pipeline_from: Option<String>,
    pub stage_from: Option<String>,
    pub pipeline_to: Option<String>,
    pub stage_to: String,
    pub change_kind: String,
    pub semantic: Option<String>,
    /// `is_qualified_stage`, `is_success_stage`, `is_fail_stage`.
    pub flags: (Option<bool>, Option<bool>, Option<bool>),
    pub changed_at: DateTime<Utc>,
    pub changed_by_user_id: Option<i64>,
    pub responsible_user_id: Option<i64>,
    pub outbox_id: Option<i64>,
}

impl StageChangeRow {
    /// Every row, by id.
    pub async fn all(client: &Client) -> Vec<StageChangeRow> {
        client
            .query(
                "SELECT id, crm, source_event_id, entity_type, entity_id, pipeline_from, stage_from, pipeline_to,
                        stage_to, change_kind, semantic, is_qualified_stage, is_success_stage, is_fail_stage,
                        changed_at, changed_by_user_id, responsible_user_id, outbox_id
                 FROM crm_stage_changes ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| StageChangeRow {
                id: r.get(0),
                crm: r.get(1),
                source_event_id: r.get(2),
                entity_type: r.get(3),
                entity_id: r.get(4),
                pipeline_from: r.get(5),
                stage_from: r.get(6),
                pipeline_to: r.get(7),
                stage_to: r.get(8),
                change_kind: r.get(9),
                semantic: r.get(10),
                flags: (r.get(11), r.get(12), r.get(13)),
                changed_at: r.get(14),
                changed_by_user_id: r.get(15),
                responsible_user_id: r.get(16),
                outbox_id: r.get(17),
            })
            .collect()
    }

    /// The rows of one CRM entity, by id.
    pub async fn of(client: &Client, crm: &str, entity_type: &str, entity_id: i64) -> Vec<StageChangeRow> {
        let all = StageChangeRow::all(client).await;
        all.into_iter().filter(|r| r.crm == crm && r.entity_type == entity_type && r.entity_id == entity_id).collect()
    }

    /// (pipeline_from, stage_from, pipeline_to, stage_to, change_kind, semantic), for one assertion.
    pub fn movement(&self) -> Movement<'_> {
        (
            self.pipeline_from.as_deref(),
            self.stage_from.as_deref(),
            self.pipeline_to.as_deref(),
            self.stage_to.as_str(),
            self.change_kind.as_str(),
            self.semantic.as_deref(),
        )
    }
}

/// A row of `crm_connect_cursors`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorRow {
    pub last_id: Option<i64>,
    pub window_end: Option<DateTime<Utc>>,
    pub complete_to: Option<DateTime<Utc>>,
}

impl CursorRow {
    pub async fn of(client: &Client, crm: &str, stream: &str) -> Option<CursorRow> {
        let row = client
            .query_opt(
                "SELECT last_id, window_end, complete_to FROM crm_connect_cursors WHERE crm = $1 AND stream = $2",
                &[&crm, &stream],
            )
            .await
            .unwrap()?;
        Some(CursorRow { last_id: row.get(0), window_end: row.get(1), complete_to: row.get(2) })
    }
}
