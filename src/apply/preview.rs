//! `sync --dry-run`: what a sync of one tenant would change, read from its
//! database and its CRMs without writing anything. No migration runs, no row
//! or event is written, and no authorization code or refresh token is sent:
//! both are single-use, so sending one would change the tenant's state.
//! The database is read in one read-only transaction; the CRMs only with
//! requests that read (AmoCRM's pipelines, Bitrix24's scope, profile and
//! stage lists).

use std::fmt;

use chrono::{DateTime, Utc};

use crate::config::{AmoCrmConfig, Bitrix24Config, StageMapping, TenantConfig};
use crate::context::Context;
use crate::crm::CrmError;
use crate::crm::amocrm::AmoClient;
use crate::crm::bitrix24::B24Client;
use crate::db::{self, DbError, TenantDb, Tx, config_row};
use crate::model::{AmoStage, B24Stage, Crm, CrmState, StoredTokens};
use crate::reconcile::tokens::{ObtainStep, RefreshStep, obtain_step, refresh_step};
use crate::reconcile::{self, ConfigColumn, CurrentColumns, StoredStage, WebhookProblem, check_grant, plan_stage_sync};

use super::stages::StageTable;

/// What a sync of one tenant would change.
#[derive(Clone, Debug)]
pub struct Preview {
    pub slug: String,
    /// The crm-connect tables (or some of their columns, or the `config`
    /// row) are missing: a sync would create them. Stored state counts as
    /// empty where it could not be read.
    pub creates_tables: bool,
    /// The `config` columns a sync would write (names only: some hold secrets).
    pub config_columns: Vec<ConfigColumn>,
    /// The AmoCRM account or integration changes: the stored tokens would be cleared.
    pub tokens_cleared: bool,
    /// One entry per configured CRM.
    pub crms: Vec<CrmPreview>,
}

impl Preview {
    /// Whether a sync would write nothing and fail on nothing.
    pub fn is_unchanged(&self) -> bool {
        !self.creates_tables
            && self.config_columns.is_empty()
            && !self.tokens_cleared
            && self.crms.iter().all(CrmPreview::is_unchanged)
    }
}

/// What a sync would do with one CRM of the tenant.
#[derive(Clone, Debug)]
pub struct CrmPreview {
    pub crm: Crm,
    /// Steps a sync would take before the stages.
    pub actions: Vec<Action>,
    /// What a sync would fail on.
    pub problems: Vec<String>,
    /// The stage changes, or why they cannot be previewed.
    pub stages: Result<StageChanges, String>,
}

impl CrmPreview {
    fn new(crm: Crm) -> CrmPreview {
        CrmPreview { crm, actions: Vec::new(), problems: Vec::new(), stages: Err(String::new()) }
    }

    pub fn is_unchanged(&self) -> bool {
        self.actions.is_empty()
            && self.problems.is_empty()
            && self.stages.as_ref().is_ok_and(|s| s.is_empty() && s.mapping_error.is_none())
    }
}

/// A step a sync would take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// AmoCRM: the configured authorization code was never sent.
    ExchangeCode,
    /// AmoCRM: the configured long-lived token differs from the stored one.
    StoreLongLivedToken,
    /// AmoCRM: the access token expires within `schedule.token_refresh_margin`.
    RefreshToken,
    /// Bitrix24: the webhook is new or changed.
    StampConnected,
    /// Bitrix24: the portal redirected to this host.
    PortalMoved(String),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ExchangeCode => f.write_str("would exchange the authorization code"),
            Action::StoreLongLivedToken => f.write_str("would store the long-lived token"),
            Action::RefreshToken => f.write_str("would refresh the token first"),
            Action::StampConnected => f.write_str("would stamp bitrix24_connected_at"),
            Action::PortalMoved(host) => write!(f, "the portal moved to {host}: update webhook_url"),
        }
    }
}

/// A stage plan's summary: labels `"Pipeline" / "Stage" (ID)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageChanges {
    /// Stages the CRM lists now.
    pub stage_count: usize,
    pub added: Vec<String>,
    /// Renamed, re-sorted or otherwise changed.
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub restored: Vec<String>,
    /// `label: old → new`.
    pub flags_moved: Vec<String>,
    /// The mapping matches no stage or flags one both ways: a sync would
    /// keep the stored flags (as planned here) and fail.
    pub mapping_error: Option<String>,
}

impl StageChanges {
    /// Whether no stage row would be written.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.restored.is_empty()
            && self.flags_moved.is_empty()
    }
}

/// Previews one tenant. Only a database that cannot be read is an error;
/// what stands in a CRM's way is reported in its [`CrmPreview`].
pub async fn preview_tenant(ctx: &Context, tenant: &TenantConfig) -> Result<Preview, DbError> {
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
    let stored = read_stored(&db, tenant).await?;
    let changes = reconcile::config_changes(reconcile::desired_columns(tenant), &stored.columns);
    let tokens_cleared = reconcile::amocrm_account_changed(&changes, &stored.columns);
    let config_columns: Vec<ConfigColumn> = changes.into_iter().map(|(c, _)| c).collect();
    let mut crms = Vec::new();
    if let Some(amo) = &tenant.amocrm {
        crms.push(preview_amocrm(ctx, tenant, amo, &stored, tokens_cleared).await);
    }
    if let Some(b24) = &tenant.bitrix24 {
        let webhook_changed = config_columns.iter().any(|c| c.is_bitrix24_webhook());
        crms.push(preview_bitrix24(ctx, b24, &stored, webhook_changed).await);
    }
    Ok(Preview {
        slug: tenant.slug.clone(),
        creates_tables: stored.tables_missing,
        config_columns,
        tokens_cleared,
        crms,
    })
}

/// What the database holds now; empty where a table, column or the
/// `config` row is missing.
#[derive(Default)]
struct Stored {
    tables_missing: bool,
    columns: CurrentColumns,
    tokens: StoredTokens,
    amocrm_state: Option<CrmState>,
    bitrix24_connected_at: Option<DateTime<Utc>>,
    amocrm_stages: Vec<StoredStage<AmoStage>>,
    bitrix24_stages: Vec<StoredStage<B24Stage>>,
}

/// Reads everything in one read-only transaction, each read in a savepoint
/// so that a missing table fails only that read.
async fn read_stored(db: &TenantDb, tenant: &TenantConfig) -> Result<Stored, DbError> {
    let mut session = db.session().await?;
    let mut tx = session.read_only_snapshot().await?;
    let mut stored = Stored::default();
    let missing = &mut stored.tables_missing;
    macro_rules! read {
        ($read:expr) => {{
            let sp = tx.savepoint().await?;
            let result = $read(&sp).await;
            settle(sp, result, missing).await?
        }};
    }
    let row_exists = read!(config_row::row_exists).unwrap_or(false);
    if row_exists {
        stored.columns = read!(config_row::read_columns).unwrap_or_default();
        stored.tokens = read!(config_row::read_tokens).unwrap_or_default();
        if tenant.bitrix24.is_some() {
            stored.bitrix24_connected_at = read!(config_row::bitrix24_connected_at).flatten();
        }
    } else {
        *missing = true;
    }
    if tenant.amocrm.is_some() {
        stored.amocrm_state = read!(|c| db::status::read_state(c, Crm::AmoCrm)).flatten();
        stored.amocrm_stages = read!(db::amocrm_stages::read).unwrap_or_default();
    }
    if let Some(b24) = &tenant.bitrix24 {
        stored.bitrix24_stages = read!(|c| db::bitrix24_stages::read(c, b24.entity_type)).unwrap_or_default();
    }
    tx.rollback().await?;
    Ok(stored)
}

/// Ends a read's savepoint: its value, or `None` (and `missing` set) when
/// the read hit a table or column the migrations would create.
async fn settle<T>(sp: Tx<'_>, result: Result<T, DbError>, missing: &mut bool) -> Result<Option<T>, DbError> {
    match result {
        Ok(value) => {
            sp.commit().await?;
            Ok(Some(value))
        }
        Err(e) if e.is_missing_schema() => {
            sp.rollback().await?;
            *missing = true;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The token steps a sync would take — the plans `tokens` executes — then
/// the pipelines read with the token it would use (never exchanged or
/// refreshed here).
async fn preview_amocrm(
    ctx: &Context,
    tenant: &TenantConfig,
    amo: &AmoCrmConfig,
    stored: &Stored,
    tokens_cleared: bool,
) -> CrmPreview {
    let mut preview = CrmPreview::new(Crm::AmoCrm);
    let kept = if tokens_cleared {
        StoredTokens { code_sha256: stored.tokens.code_sha256.clone(), ..StoredTokens::default() }
    } else {
        stored.tokens.clone()
    };
    // The tokens a sync would call the API with.
    let mut current = kept.clone();
    let mut exchanging = false;
    match obtain_step(amo.long_lived_token.as_ref(), amo.authorization_code.as_ref(), &kept) {
        ObtainStep::Invalid(why) => {
            preview.problems.push(why.into());
            preview.stages = Err(NO_TOKENS.into());
            return preview;
        }
        ObtainStep::StoreLongLived(tokens) => {
            preview.actions.push(Action::StoreLongLivedToken);
            current = StoredTokens {
                access: Some(tokens.access),
                refresh: None,
                expires_at: Some(tokens.expires_at),
                ..current
            };
        }
        ObtainStep::Exchange { .. } => match amo.credentials() {
            Ok(_) => {
                preview.actions.push(Action::ExchangeCode);
                exchanging = true;
            }
            Err(e) => preview.problems.push(e.to_string()),
        },
        ObtainStep::LongLivedUnchanged | ObtainStep::CodeAlreadySent | ObtainStep::NothingConfigured => {}
    }
    if current.access.is_none() || current.expires_at.is_none() {
        preview.stages = Err(if exchanging {
            format!("{NO_TOKENS} until the authorization code is exchanged")
        } else {
            format!(
                "{NO_TOKENS} (none are stored: configure an authorization_code or long_lived_token, \
                 or run `crm-connect authorize`)"
            )
        });
        return preview;
    }
    let now = Utc::now();
    let margin = tenant.schedule.token_refresh_margin;
    // A code exchange brings a fresh pair: nothing to refresh then.
    if !exchanging {
        match refresh_step(&current, stored.amocrm_state, margin, None, now) {
            RefreshStep::Refresh(_) => preview.actions.push(Action::RefreshToken),
            RefreshStep::NeedsAuthorization(why) => preview.problems.push(why.into()),
            RefreshStep::Use(_) => {}
        }
    }
    let Some(access) = current.access.filter(|_| current.expires_at.is_some_and(|at| at > now)) else {
        preview.stages = Err(format!("{NO_TOKENS} (the stored access token has expired)"));
        return preview;
    };
    let api = AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
    preview.stages = match api.pipelines(&access).await {
        Ok(fetched) => Ok(plan(fetched, &amo.stages, &stored.amocrm_stages)),
        Err(CrmError::Unauthorized { .. }) => Err("stages cannot be previewed: the API refused the access token \
                                                   (HTTP 401); a sync would refresh it and try again"
            .into()),
        Err(e) => Err(format!("stages cannot be previewed: {e}")),
    };
    preview
}

const NO_TOKENS: &str = "stages cannot be previewed without tokens";

/// The webhook checked and the stages read, as a sync does, in the same
/// read-only requests.
async fn preview_bitrix24(ctx: &Context, b24: &Bitrix24Config, stored: &Stored, webhook_changed: bool) -> CrmPreview {
    let mut preview = CrmPreview::new(Crm::Bitrix24);
    let api = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry);
    let (grant, fetched) = match api.stages(b24.entity_type, true).await {
        Ok(answer) => answer,
        Err(e) => {
            preview.stages = Err(format!("stages cannot be previewed: {e}"));
            return preview;
        }
    };
    if let Some(grant) = &grant
        && let Err(problem) = check_grant(&b24.webhook, &grant.scopes, grant.profile_id.as_deref())
    {
        preview.stages = Err(match problem {
            WebhookProblem::NoCrmScope { .. } => "stages cannot be previewed without the `crm` scope".into(),
            WebhookProblem::OtherUser { .. } => "stages cannot be previewed with another user's webhook".into(),
        });
        preview.problems.push(problem.to_string());
        return preview;
    }
    if let Some(to) = api.moved_to() {
        preview.actions.push(Action::PortalMoved(to));
    }
    if webhook_changed || stored.bitrix24_connected_at.is_none() {
        preview.actions.push(Action::StampConnected);
    }
    preview.stages = Ok(plan(fetched, &b24.stages, &stored.bitrix24_stages));
    preview
}

/// The plan a sync would write, summarised.
fn plan<S: StageTable>(fetched: Vec<S>, mapping: &StageMapping<S::Ref>, stored: &[StoredStage<S>]) -> StageChanges {
    let sync = plan_stage_sync(fetched, mapping, S::MAPPING, stored);
    StageChanges {
        stage_count: sync.stage_count,
        added: sync.plan.added,
        changed: sync.plan.changed,
        removed: sync.plan.removed_labels,
        restored: sync.plan.restored,
        flags_moved: sync.plan.flags_moved,
        mapping_error: sync.mapping_error,
    }
}
