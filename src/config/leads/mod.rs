//! `[leads]`, `[leads.amocrm]`, `[leads.bitrix24]`: whether and where the
//! tenant's `crm_lead_outbox` rows are delivered, and the defaults a row
//! without its own pipeline, stage or responsible user gets. Only what the
//! file alone can tell is checked here; whether a name or id matches a
//! synced stage is decided at delivery.

use std::fmt;
use std::time::Duration;

use toml::Spanned;
use toml::de::DeValue;

use super::document::{Table, as_i64, read_poll, wrong_type};
use super::problem::Problems;
use super::stages::{AmoStageRef, Bitrix24StageRef, normalize_name, read_ref};
use crate::model::{Crm, EntityType, category_of_stage};

pub const LEADS_KEYS: &[&str] = &["crm", "poll", "max_attempts", "amocrm", "bitrix24"];
pub const LEADS_AMOCRM_KEYS: &[&str] = &["pipeline", "stage", "responsible_user_id", "key_field_name"];
pub const LEADS_BITRIX24_KEYS: &[&str] = &["category", "stage", "responsible_user_id"];

pub const DEFAULT_LEADS_POLL: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 20;
pub const DEFAULT_KEY_FIELD_NAME: &str = "crm-connect key";

pub(crate) const MIN_POLL: Duration = Duration::from_secs(1);
pub(crate) const MAX_ATTEMPTS: u32 = 1000;
/// AmoCRM's won and lost statuses: the same ids in every pipeline, so one
/// alone does not say where a lead goes.
const EVERY_PIPELINE_STATUSES: [i64; 2] = [142, 143];

/// Lead delivery of one tenant (`[leads]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeadsConfig {
    /// Where leads go: `[leads].crm`, or the tenant's only CRM.
    pub crm: Crm,
    /// How often the outbox is checked.
    pub poll: Duration,
    /// Not-executed refusals (and sends proved absent) before a row fails.
    pub max_attempts: u32,
    /// `[leads.amocrm]`: read and checked whatever the target, used only
    /// when leads go to AmoCRM.
    pub amocrm: AmoLeadDefaults,
    /// `[leads.bitrix24]`: likewise for Bitrix24.
    pub bitrix24: B24LeadDefaults,
}

/// Defaults for AmoCRM leads; `None` leaves the choice to delivery (the
/// main pipeline, the pipeline's first stage, no responsible user).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmoLeadDefaults {
    pub pipeline: Option<PipelineRef>,
    pub stage: Option<AmoStageRef>,
    pub responsible_user_id: Option<i64>,
    /// The name of the lead text field that carries the delivery key.
    pub key_field_name: String,
}

impl Default for AmoLeadDefaults {
    fn default() -> Self {
        AmoLeadDefaults {
            pipeline: None,
            stage: None,
            responsible_user_id: None,
            key_field_name: DEFAULT_KEY_FIELD_NAME.to_string(),
        }
    }
}

/// Defaults for Bitrix24 leads or deals; `None` leaves the choice to
/// delivery (category 0 or the lead statuses, the first stage, nobody).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct B24LeadDefaults {
    /// A deal category; never set when `[bitrix24].entity_type = "lead"`.
    pub category: Option<PipelineRef>,
    pub stage: Option<Bitrix24StageRef>,
    pub responsible_user_id: Option<i64>,
}

/// An AmoCRM pipeline or a Bitrix24 deal category (Bitrix24's pipelines):
/// its id, or its name, compared like stage names (trimmed, NFC,
/// case-insensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PipelineRef {
    Id(i64),
    Name(String),
}

impl fmt::Display for PipelineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineRef::Id(id) => write!(f, "{id}"),
            PipelineRef::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// Reads `[leads]` from the file's root table. `None` when the file has no
/// `[leads]`, or when its target CRM cannot be told (reported).
pub(crate) fn read_leads(root: &Table, problems: &mut Problems) -> Option<LeadsConfig> {
    let t = root.table("leads", "leads", problems)?;
    t.check_keys(LEADS_KEYS, problems);
    // The presence of a CRM's table, not its validity: a broken [amocrm] is
    // reported on its own, and [leads] is still checked against it.
    let configured: Vec<Crm> = Crm::ALL.into_iter().filter(|crm| root.get(crm.as_str()).is_some()).collect();
    let crm = read_target(&t, &configured, problems);
    let poll = read_poll(&t, "poll", DEFAULT_LEADS_POLL, MIN_POLL, problems);
    let max_attempts = read_max_attempts(&t, problems);

    let amocrm_table = t.table("amocrm", "leads.amocrm", problems);
    let bitrix24_table = t.table("bitrix24", "leads.bitrix24", problems);
    if let Some(target) = crm {
        for (crm, table) in [(Crm::AmoCrm, &amocrm_table), (Crm::Bitrix24, &bitrix24_table)] {
            if let Some(table) = table
                && crm != target
            {
                problems.warning(Some(table.span()), format!("[{}] is not used: leads go to {target}", table.name));
            }
        }
    }
    let amocrm = amocrm_table.map_or_else(AmoLeadDefaults::default, |t| read_amocrm(&t, problems));
    let bitrix24 = bitrix24_table
        .map_or_else(B24LeadDefaults::default, |t| read_bitrix24(&t, entity_type_as_written(root), problems));
    Some(LeadsConfig { crm: crm?, poll: poll?, max_attempts: max_attempts?, amocrm, bitrix24 })
}

/// `[leads].crm`, or the only CRM the tenant has.
fn read_target(t: &Table, configured: &[Crm], problems: &mut Problems) -> Option<Crm> {
    if configured.is_empty() {
        problems.error(Some(t.span()), "[leads] needs [amocrm] or [bitrix24]: there is no CRM to deliver leads to");
    }
    let Some(name) = t.str("crm", problems) else {
        if t.get("crm").is_some() {
            return None; // wrong type, reported
        }
        return match configured {
            [only] => Some(*only),
            [] => None,
            _ => {
                problems.error(
                    Some(t.span()),
                    "`leads.crm` is missing: the tenant has both [amocrm] and [bitrix24], so name the one leads go to",
                );
                None
            }
        };
    };
    let Some(crm) = Crm::ALL.into_iter().find(|crm| crm.as_str() == *name.get_ref()) else {
        problems.error(Some(name.span()), format!("`leads.crm` {:?} is not one of amocrm, bitrix24", name.get_ref()));
        return None;
    };
    if !configured.is_empty() && !configured.contains(&crm) {
        problems.error(Some(name.span()), format!("`leads.crm` is {crm}, but the tenant has no [{crm}]"));
        return None;
    }
    Some(crm)
}

fn read_max_attempts(t: &Table, problems: &mut Problems) -> Option<u32> {
    let Some(n) = t.int("max_attempts", problems) else {
        return t.get("max_attempts").is_none().then_some(DEFAULT_MAX_ATTEMPTS);
    };
    match u32::try_from(*n.get_ref()) {
        Ok(n) if (1..=MAX_ATTEMPTS).contains(&n) => Some(n),
        _ => {
            problems.error(
                Some(n.span()),
                format!("`leads.max_attempts` must be 1 to {MAX_ATTEMPTS}, found {}", n.get_ref()),
            );
            None
        }
    }
}

fn read_amocrm(t: &Table, problems: &mut Problems) -> AmoLeadDefaults {
    t.check_keys(LEADS_AMOCRM_KEYS, problems);
    let pipeline = read_pipeline(t, "pipeline", 1, problems);
    let stage = read_stage::<AmoStageRef>(t, problems);
    if let (Some(p), Some(s)) = (&pipeline, &stage)
        && let (PipelineRef::Name(p_name), AmoStageRef::Named { pipeline: s_pipeline, .. }) = (p.get_ref(), s.get_ref())
        && normalize_name(p_name) != normalize_name(s_pipeline)
    {
        problems.error(
            Some(s.span()),
            format!(
                "`leads.amocrm.stage` is in pipeline {s_pipeline:?}, but `leads.amocrm.pipeline` is {p_name:?}: they must agree (or leave out `pipeline`)"
            ),
        );
    }
    if let Some(s) = &stage
        && let AmoStageRef::Id(id) = s.get_ref()
        && EVERY_PIPELINE_STATUSES.contains(id)
        && t.get("pipeline").is_none()
    {
        problems.error(
            Some(s.span()),
            format!(
                "`leads.amocrm.stage` {id} is a status of every pipeline: set `leads.amocrm.pipeline` to say which"
            ),
        );
    }
    let key_field_name = match t.str("key_field_name", problems) {
        Some(name) if name.get_ref().trim().is_empty() => {
            problems.error(Some(name.span()), "`leads.amocrm.key_field_name` must not be empty");
            DEFAULT_KEY_FIELD_NAME.to_string()
        }
        Some(name) => name.get_ref().trim().to_string(),
        None => DEFAULT_KEY_FIELD_NAME.to_string(),
    };
    AmoLeadDefaults {
        pipeline: pipeline.map(Spanned::into_inner),
        stage: stage.map(Spanned::into_inner),
        responsible_user_id: read_user(t, problems),
        key_field_name,
    }
}

fn read_bitrix24(t: &Table, entity_type: EntityType, problems: &mut Problems) -> B24LeadDefaults {
    t.check_keys(LEADS_BITRIX24_KEYS, problems);
    // Category 0 is Bitrix24's default deal category, a real id.
    let category = read_pipeline(t, "category", 0, problems);
    let stage = read_stage::<Bitrix24StageRef>(t, problems);
    if entity_type == EntityType::Lead
        && let Some(value) = t.get("category")
    {
        problems.error(
            Some(value.span()),
            "`leads.bitrix24.category` is for deals only: [bitrix24] has entity_type = \"lead\", and lead statuses have no categories",
        );
    } else if let (Some(c), Some(s)) = (&category, &stage) {
        check_category_and_stage(c.get_ref(), s, problems);
    }
    B24LeadDefaults {
        category: category.map(Spanned::into_inner),
        stage: stage.map(Spanned::into_inner),
        responsible_user_id: read_user(t, problems),
    }
}

/// A deal stage belongs to one category: `C<n>:` prefixes the STAGE_IDs of
/// category n, and names must name the same category.
fn check_category_and_stage(category: &PipelineRef, stage: &Spanned<Bitrix24StageRef>, problems: &mut Problems) {
    let disagreement = match (category, stage.get_ref()) {
        (PipelineRef::Name(c), Bitrix24StageRef::Named { category: s, .. })
            if normalize_name(c) != normalize_name(s) =>
        {
            format!("is in category {s:?}, but `leads.bitrix24.category` is {c:?}")
        }
        (PipelineRef::Id(c), Bitrix24StageRef::StatusId(id)) => match category_of_stage(id) {
            Some(of_stage) if of_stage != *c => {
                format!("{id:?} is a stage of category {of_stage}, but `leads.bitrix24.category` is {c}")
            }
            _ => return,
        },
        // An id against a name is for the synced stages to settle.
        _ => return,
    };
    problems.error(
        Some(stage.span()),
        format!("`leads.bitrix24.stage` {disagreement}: they must agree (or leave out `category`)"),
    );
}

/// `pipeline` / `category`: an id (at least `min_id`) or a non-empty name.
fn read_pipeline(t: &Table, key: &str, min_id: i64, problems: &mut Problems) -> Option<Spanned<PipelineRef>> {
    let value = t.get(key)?;
    let path = t.path(key);
    let parsed = match (as_i64(value.get_ref()), value.get_ref()) {
        (Some(Ok(id)), _) if id >= min_id => Ok(PipelineRef::Id(id)),
        (Some(_), _) if min_id == 0 => Err(format!("`{path}`: an id must be 0 or more")),
        (Some(_), _) => Err(format!("`{path}`: an id must be a positive integer")),
        (None, DeValue::String(name)) if !name.trim().is_empty() => Ok(PipelineRef::Name(name.to_string())),
        (None, DeValue::String(_)) => Err(format!("`{path}`: a name must not be empty")),
        (None, other) => Err(wrong_type(&path, "an id (integer) or a name (string)", other)),
    };
    parsed.map(|p| Spanned::new(value.span(), p)).map_err(|why| problems.error(Some(value.span()), why)).ok()
}

fn read_stage<R: super::stages::StageRef>(t: &Table, problems: &mut Problems) -> Option<Spanned<R>> {
    let value = t.get("stage")?;
    let path = t.path("stage");
    read_ref::<R>(value, &path, &path, problems).map(|r| Spanned::new(value.span(), r))
}

fn read_user(t: &Table, problems: &mut Problems) -> Option<i64> {
    let id = t.int("responsible_user_id", problems)?;
    if *id.get_ref() <= 0 {
        let message = format!("`{}` must be a positive user id", t.path("responsible_user_id"));
        problems.error(Some(id.span()), message);
        return None;
    }
    Some(id.into_inner())
}

/// `[bitrix24].entity_type` as written, without reporting (reading
/// `[bitrix24]` does): `category` is checked against it, and
/// `[funnel].entities` defaults to it, even when `[bitrix24]` has other
/// errors. Deal by default, as there.
pub(super) fn entity_type_as_written(root: &Table) -> EntityType {
    root.get("bitrix24")
        .and_then(|b| b.get_ref().as_table())
        .and_then(|b| b.get("entity_type"))
        .and_then(|e| e.get_ref().as_str())
        .and_then(EntityType::parse)
        .unwrap_or(EntityType::Deal)
}

#[cfg(test)]
mod tests;
