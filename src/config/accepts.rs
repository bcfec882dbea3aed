//! What each table and key of a tenant file accepts and means, in the terms
//! the readers check, for the JSON Schema (`schema.rs`). Which keys exist is
//! not said here: that is `SCHEMA`, the lists `check_keys` enforces. Choices,
//! bounds and defaults are the readers' own constants.

use std::time::Duration;

use serde_json::{Value, json};

use super::document::MAX_POLL;
use super::funnel::{DATE_PATTERN, DEFAULT_FUNNEL_POLL, MIN_POLL as FUNNEL_MIN_POLL};
use super::leads::{DEFAULT_KEY_FIELD_NAME, DEFAULT_LEADS_POLL, DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS, MIN_POLL};
use super::tenant::{DEFAULT_STAGE_RESYNC, DEFAULT_TOKEN_REFRESH_MARGIN, MAX_TOKEN_REFRESH_MARGIN, SLUG_PATTERN};
use crate::model::{AmoDomain, Crm, EntityType};

/// The shape of a value, as far as JSON Schema can say it without
/// rejecting anything the readers accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Accepts {
    /// A table of `SCHEMA`; its keys come from there.
    Table,
    /// Any string (the reader may check more, e.g. a URL or a cron).
    Text,
    /// A string with at least one character that is not white space.
    NonBlank,
    /// A string matching a regular expression.
    Pattern(&'static str),
    /// One of these strings.
    OneOf(Vec<&'static str>),
    /// A string, or `{ env | file | credential = "…" }`.
    Secret,
    Integer {
        min: Option<i64>,
        max: Option<i64>,
    },
    /// An id (an integer of at least `min`) or a name.
    IdOrName {
        min: i64,
    },
    /// A status id, or `{ pipeline = "…", stage = "…" }`.
    AmoStage,
    /// A STATUS_ID, or `{ category = "…", stage = "…" }`.
    Bitrix24Stage,
    List(Box<Accepts>),
}

/// One table or key: its dotted path, what it accepts, and what it means.
#[derive(Clone, Debug)]
pub(crate) struct Described {
    pub(crate) path: &'static str,
    pub(crate) accepts: Accepts,
    pub(crate) doc: String,
    pub(crate) default: Option<Value>,
    /// The reader reports its absence whatever else the table holds.
    pub(crate) required: bool,
}

fn key(path: &'static str, accepts: Accepts, doc: impl Into<String>) -> Described {
    Described { path, accepts, doc: doc.into(), default: None, required: false }
}

impl Described {
    fn default(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self
    }

    fn required(mut self) -> Self {
        self.required = true;
        self
    }
}

fn int(min: Option<i64>, max: Option<i64>) -> Accepts {
    Accepts::Integer { min, max }
}

fn list(item: Accepts) -> Accepts {
    Accepts::List(Box::new(item))
}

/// A duration as the readers parse it back, e.g. "30days".
fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

const SECRET: &str =
    "A secret value: the value itself, or { env = \"NAME\" }, { file = \"path\" } or { credential = \"name\" }.";

/// Every table and key of a tenant file; the root table is `""`.
pub(crate) fn described() -> Vec<Described> {
    use Accepts::*;
    let domains: Vec<&str> = AmoDomain::ALL.iter().map(|d| d.as_str()).collect();
    let entity_types: Vec<&str> = EntityType::ALL.iter().map(|e| e.as_str()).collect();
    let crms: Vec<&str> = Crm::ALL.iter().map(|c| c.as_str()).collect();
    vec![
        key("", Table, "One tenant of crm-connect: its database and its AmoCRM and Bitrix24 connections."),
        key("tenant", Table, "The tenant's name and database."),
        key(
            "tenant.slug",
            Pattern(SLUG_PATTERN),
            "The tenant's name in logs, status and the default database name; unique across all files. Default: the \
            file name without .toml.",
        ),
        key(
            "tenant.database_url",
            Secret,
            format!(
                "The tenant's PostgreSQL database, postgresql://USER@HOST:PORT/DATABASE (libpq's sslmode and \
                sslrootcert apply). Default: --database-url-template with {{slug}} replaced. {SECRET}"
            ),
        ),
        key("schedule", Table, "When stages are re-read and AmoCRM tokens refreshed."),
        key(
            "schedule.stage_resync",
            Text,
            "When to re-read the CRMs' pipelines and stages: cron with 5 fields (minute hour day month weekday) or 6 \
            (seconds first).",
        )
        .default(DEFAULT_STAGE_RESYNC),
        key(
            "schedule.token_refresh_margin",
            Text,
            format!(
                "Refresh AmoCRM access tokens this long before they expire (\"15s\", \"10m\", \"1h\"); at most \
                \"{}\".",
                duration(MAX_TOKEN_REFRESH_MARGIN)
            ),
        )
        .default(duration(DEFAULT_TOKEN_REFRESH_MARGIN)),
        key("amocrm", Table, "AmoCRM (Kommo). Present = this tenant uses AmoCRM."),
        key("amocrm.subdomain", Text, "The account's subdomain: \"acme\" for https://acme.amocrm.ru.").required(),
        key("amocrm.domain", OneOf(domains), "The account's domain.").default(AmoDomain::AmocrmRu.as_str()),
        key(
            "amocrm.client_id",
            Text,
            "The integration's ID (Settings → Integrations). Needed unless long_lived_token is set.",
        ),
        key(
            "amocrm.client_secret",
            Secret,
            format!("The integration's secret key. Needed unless long_lived_token is set. {SECRET}"),
        ),
        key(
            "amocrm.redirect_uri",
            Text,
            "Exactly as in the integration's settings, trailing slash included: an absolute http(s) URL. Needed \
            unless long_lived_token is set.",
        ),
        key(
            "amocrm.authorization_code",
            Secret,
            format!(
                "A one-time authorization code (valid 20 minutes), exchanged at most once; a new value means the \
                account was re-authorised. Excludes long_lived_token. {SECRET}"
            ),
        ),
        key(
            "amocrm.long_lived_token",
            Secret,
            format!(
                "A long-lived token of a private integration, instead of the code flow. Excludes \
                authorization_code. {SECRET}"
            ),
        ),
        key(
            "amocrm.base_url",
            Text,
            "Replaces https://{subdomain}.{domain} for every AmoCRM call, the token endpoint included: an https URL \
            (plain http only for loopback hosts).",
        ),
        key(
            "amocrm.test_pipeline_id",
            int(None, None),
            "The pipeline `crm-connect test-lead --crm amocrm` creates its test lead in.",
        ),
        key(
            "amocrm.stages",
            Table,
            "Which stages set the flags is_qualified_stage, is_success_stage and is_fail_stage.",
        ),
        key("amocrm.stages.qualified", list(AmoStage), "Stages flagged qualified. No default: absent means none."),
        key("amocrm.stages.success", list(AmoStage), "Stages flagged success; a stage cannot be in success and fail.")
            .default(json!([142])),
        key("amocrm.stages.fail", list(AmoStage), "Stages flagged fail; a stage cannot be in success and fail.")
            .default(json!([143])),
        key("bitrix24", Table, "Bitrix24. Present = this tenant uses Bitrix24."),
        key(
            "bitrix24.webhook_url",
            Secret,
            format!("The inbound webhook with the crm scope: https://PORTAL/rest/USER_ID/CODE/. {SECRET}"),
        )
        .required(),
        key(
            "bitrix24.entity_type",
            OneOf(entity_types.clone()),
            "deal: deal categories and their stages; lead: lead statuses.",
        )
        .default(EntityType::Deal.as_str()),
        key(
            "bitrix24.test_category_id",
            int(None, None),
            "The category (pipeline) `crm-connect test-lead --crm bitrix24` creates its test deal in; 0 is the \
            default one.",
        ),
        key(
            "bitrix24.stages",
            Table,
            "Which stages set the flags is_qualified_stage, is_success_stage and is_fail_stage.",
        ),
        key(
            "bitrix24.stages.qualified",
            list(Bitrix24Stage),
            "Stages flagged qualified. No default: absent means none.",
        ),
        key(
            "bitrix24.stages.success",
            list(Bitrix24Stage),
            "Stages flagged success. Default: every stage whose semantics is success.",
        ),
        key(
            "bitrix24.stages.fail",
            list(Bitrix24Stage),
            "Stages flagged fail. Default: every stage whose semantics is failure.",
        ),
        key(
            "leads",
            Table,
            "Lead delivery. Present = a lead is created in the CRM for each row inserted into crm_lead_outbox.",
        ),
        key(
            "leads.crm",
            OneOf(crms),
            "The CRM leads go to. Required only when the tenant has both [amocrm] and [bitrix24].",
        ),
        key(
            "leads.poll",
            Text,
            format!(
                "How often the outbox is checked (\"30s\", \"1m\"): \"{}\" to \"{}\".",
                duration(MIN_POLL),
                duration(MAX_POLL)
            ),
        )
        .default(duration(DEFAULT_LEADS_POLL)),
        key(
            "leads.max_attempts",
            int(Some(1), Some(MAX_ATTEMPTS.into())),
            "Sends refused as not executed or proved absent before a row is failed.",
        )
        .default(DEFAULT_MAX_ATTEMPTS),
        key(
            "leads.amocrm",
            Table,
            "Defaults for rows without pipeline, stage or responsible user, when leads go to AmoCRM.",
        ),
        key("leads.amocrm.pipeline", IdOrName { min: 1 }, "A pipeline id or name. Default: the main pipeline."),
        key(
            "leads.amocrm.stage",
            AmoStage,
            "A status id, or { pipeline, stage } by name; it must agree with pipeline. Default: the pipeline's first \
            stage.",
        ),
        key(
            "leads.amocrm.responsible_user_id",
            int(Some(1), None),
            "The user new leads are assigned to. Default: none.",
        ),
        key(
            "leads.amocrm.key_field_name",
            NonBlank,
            "The lead text field holding each row's delivery key, found by this name or created.",
        )
        .default(DEFAULT_KEY_FIELD_NAME),
        key(
            "leads.bitrix24",
            Table,
            "Defaults for rows without category, stage or responsible user, when leads go to Bitrix24.",
        ),
        key(
            "leads.bitrix24.category",
            IdOrName { min: 0 },
            "Deals only: a category id or name. Default: 0, the default category.",
        ),
        key(
            "leads.bitrix24.stage",
            Bitrix24Stage,
            "A STAGE_ID (deals) or STATUS_ID (leads), or { category, stage } by name; it must agree with category. \
            Default: the first stage.",
        ),
        key(
            "leads.bitrix24.responsible_user_id",
            int(Some(1), None),
            "The user new leads or deals are assigned to. Default: none.",
        ),
        key(
            "funnel",
            Table,
            "Funnel history. Present = every stage change of the CRMs' leads and deals is recorded in \
            crm_stage_changes.",
        ),
        key(
            "funnel.poll",
            Text,
            format!(
                "How often each CRM is asked for new changes (\"1m\"): \"{}\" to \"{}\".",
                duration(FUNNEL_MIN_POLL),
                duration(MAX_POLL)
            ),
        )
        .default(duration(DEFAULT_FUNNEL_POLL)),
        key(
            "funnel.since",
            Pattern(DATE_PATTERN),
            "On a stream's first enable, back-fill history from this day (YYYY-MM-DD, UTC, not in the future). \
            Default: history starts at the first enable.",
        ),
        key(
            "funnel.entities",
            list(OneOf(entity_types)),
            "Bitrix24 only: the entities whose stage history is followed, each once. Default: [bitrix24].entity_type.",
        ),
    ]
}
