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
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{LoadOptions, Severity, parse_file};

    // `[leads]` comes first in every case, so that positions count from its line.
    const AMO: &str = "[amocrm]\nsubdomain = \"acme\"\nlong_lived_token = \"t\"\n";
    const B24: &str = "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\n";
    const B24_LEADS: &str =
        "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\nentity_type = \"lead\"\n";

    /// Every problem as `line:column: severity: message`, in reading order.
    fn problems(input: &str) -> Vec<String> {
        let report = parse_file(Path::new("acme.toml"), input, &LoadOptions::default());
        report
            .problems
            .iter()
            .map(|p| {
                let severity = if p.severity == Severity::Error { "error" } else { "warning" };
                match p.position {
                    Some((line, column)) => format!("{line}:{column}: {severity}: {}", p.message),
                    None => format!("{severity}: {}", p.message),
                }
            })
            .collect()
    }

    /// The problems are exactly `expected`, each matched as a prefix (a
    /// parser's own words may follow).
    #[track_caller]
    fn check(input: &str, expected: &[&str]) {
        let actual = problems(input);
        let matches = actual.len() == expected.len() && actual.iter().zip(expected).all(|(a, e)| a.starts_with(e));
        assert!(matches, "input:\n{input}\nexpected: {expected:#?}\nactual: {actual:#?}");
    }

    /// The `[leads]` of a file that has no problem at all.
    #[track_caller]
    fn leads(input: &str) -> Option<LeadsConfig> {
        let report = parse_file(Path::new("acme.toml"), input, &LoadOptions::default());
        assert!(report.problems.is_empty(), "{:#?}", report.problems);
        report.tenant.expect("valid").leads
    }

    #[test]
    fn the_target_and_the_defaults_are_resolved() {
        assert_eq!(leads(AMO), None, "no [leads], no delivery");
        assert_eq!(
            leads(&format!("[leads]\n{AMO}")),
            Some(LeadsConfig {
                crm: Crm::AmoCrm,
                poll: Duration::from_secs(30),
                max_attempts: 20,
                amocrm: AmoLeadDefaults {
                    pipeline: None,
                    stage: None,
                    responsible_user_id: None,
                    key_field_name: "crm-connect key".into(),
                },
                bitrix24: B24LeadDefaults::default(),
            })
        );
        assert_eq!(leads(&format!("[leads]\n{B24}")).unwrap().crm, Crm::Bitrix24, "the only CRM");
        // A sub-table implies [leads], as TOML has it.
        assert_eq!(leads(&format!("[leads.amocrm]\nstage = 31234567\n{AMO}")).unwrap().crm, Crm::AmoCrm);
    }

    #[test]
    fn every_setting_is_read() {
        let amo = leads(&format!(
            "[leads]\ncrm = \"amocrm\"\npoll = \"1m 30s\"\nmax_attempts = 1000\n[leads.amocrm]\npipeline = 5\nstage = 142\nresponsible_user_id = 42\nkey_field_name = \" Ключ доставки \"\n{AMO}{B24}"
        ))
        .unwrap();
        assert_eq!((amo.crm, amo.poll, amo.max_attempts), (Crm::AmoCrm, Duration::from_secs(90), 1000));
        assert_eq!(
            amo.amocrm,
            AmoLeadDefaults {
                pipeline: Some(PipelineRef::Id(5)),
                stage: Some(AmoStageRef::Id(142)),
                responsible_user_id: Some(42),
                key_field_name: "Ключ доставки".into(),
            }
        );
        let named = leads(&format!(
            "[leads]\n[leads.amocrm]\npipeline = \" продажи\"\nstage = {{ pipeline = \"Продажи\", stage = \"Новый лид\" }}\n{AMO}"
        ))
        .unwrap();
        assert_eq!(named.amocrm.pipeline, Some(PipelineRef::Name(" продажи".into())));
        assert_eq!(
            named.amocrm.stage,
            Some(AmoStageRef::Named { pipeline: "Продажи".into(), stage: "Новый лид".into() })
        );
        let b24 = leads(&format!(
            "[leads]\ncrm = \"bitrix24\"\npoll = \"1s\"\nmax_attempts = 1\n[leads.bitrix24]\ncategory = 1\nstage = \"C1:NEW\"\nresponsible_user_id = 7\n{AMO}{B24}"
        ))
        .unwrap();
        assert_eq!((b24.crm, b24.poll, b24.max_attempts), (Crm::Bitrix24, Duration::from_secs(1), 1));
        assert_eq!(
            b24.bitrix24,
            B24LeadDefaults {
                category: Some(PipelineRef::Id(1)),
                stage: Some(Bitrix24StageRef::StatusId("C1:NEW".into())),
                responsible_user_id: Some(7),
            }
        );
        let by_name = leads(&format!(
            "[leads]\n[leads.bitrix24]\ncategory = \"Продажи\"\nstage = {{ category = \"ПРОДАЖИ \", stage = \"Новая\" }}\n{B24}"
        ))
        .unwrap();
        assert_eq!(by_name.bitrix24.category, Some(PipelineRef::Name("Продажи".into())));
        let lead_status = leads(&format!("[leads]\n[leads.bitrix24]\nstage = \"NEW\"\n{B24_LEADS}")).unwrap();
        assert_eq!(lead_status.bitrix24.stage, Some(Bitrix24StageRef::StatusId("NEW".into())));
    }

    #[test]
    fn the_target_crm() {
        check(
            "[leads]\npoll = \"1m\"\n",
            &[
                "1:1: error: [leads] needs [amocrm] or [bitrix24]: there is no CRM to deliver leads to",
                "warning: the tenant has neither [amocrm] nor [bitrix24]",
            ],
        );
        check(
            &format!("[leads]\n{AMO}{B24}"),
            &[
                "1:1: error: `leads.crm` is missing: the tenant has both [amocrm] and [bitrix24], so name the one leads go to",
            ],
        );
        check(
            &format!("[leads]\ncrm = \"bitrix24\"\n{AMO}"),
            &["2:7: error: `leads.crm` is bitrix24, but the tenant has no [bitrix24]"],
        );
        check(
            &format!("[leads]\ncrm = \"amocrm\"\n{B24}"),
            &["2:7: error: `leads.crm` is amocrm, but the tenant has no [amocrm]"],
        );
        check(
            &format!("[leads]\ncrm = \"kommo\"\n{AMO}{B24}"),
            &["2:7: error: `leads.crm` \"kommo\" is not one of amocrm, bitrix24"],
        );
        check(&format!("[leads]\ncrm = 1\n{AMO}"), &["2:7: error: `leads.crm` must be a string, found integer"]);
        check(&format!("leads = \"yes\"\n{AMO}"), &["1:9: error: `leads` must be a table, found string"]);
    }

    #[test]
    fn a_table_for_a_crm_that_is_not_the_target_is_a_warning() {
        check(
            &format!("[leads]\ncrm = \"amocrm\"\n[leads.bitrix24]\nstage = \"NEW\"\n{AMO}{B24}"),
            &["3:1: warning: [leads.bitrix24] is not used: leads go to amocrm"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\npipeline = 1\n{B24}"),
            &["2:1: warning: [leads.amocrm] is not used: leads go to bitrix24"],
        );
        // Unused, but still checked: the target may change.
        check(
            &format!("[leads]\n[leads.bitrix24]\ncategory = -1\n{AMO}"),
            &[
                "2:1: warning: [leads.bitrix24] is not used: leads go to amocrm",
                "3:12: error: `leads.bitrix24.category`: an id must be 0 or more",
            ],
        );
    }

    #[test]
    fn poll_and_max_attempts() {
        check(&format!("[leads]\npoll = \"0s\"\n{AMO}"), &["2:8: error: `leads.poll` must be at least 1s"]);
        check(&format!("[leads]\npoll = \"999ms\"\n{AMO}"), &["2:8: error: `leads.poll` must be at least 1s"]);
        check(&format!("[leads]\npoll = \"2days\"\n{AMO}"), &["2:8: error: `leads.poll` must be at most 1 day"]);
        check(
            &format!("[leads]\npoll = \"often\"\n{AMO}"),
            &["2:8: error: `leads.poll` \"often\" is not a duration like \"30s\", \"1m\" or \"5m\": "],
        );
        check(&format!("[leads]\npoll = 30\n{AMO}"), &["2:8: error: `leads.poll` must be a string, found integer"]);
        check(
            &format!("[leads]\nmax_attempts = 0\n{AMO}"),
            &["2:16: error: `leads.max_attempts` must be 1 to 1000, found 0"],
        );
        check(
            &format!("[leads]\nmax_attempts = 1001\n{AMO}"),
            &["2:16: error: `leads.max_attempts` must be 1 to 1000, found 1001"],
        );
        check(
            &format!("[leads]\nmax_attempts = -1\n{AMO}"),
            &["2:16: error: `leads.max_attempts` must be 1 to 1000, found -1"],
        );
        check(
            &format!("[leads]\nmax_attempts = \"20\"\n{AMO}"),
            &["2:16: error: `leads.max_attempts` must be an integer, found string"],
        );
    }

    #[test]
    fn unknown_keys_get_a_did_you_mean() {
        check(
            &format!("[leads]\npol = \"30s\"\n{AMO}"),
            &["2:1: error: unknown key `leads.pol`, did you mean `poll`?"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\npiepline = 1\n{AMO}"),
            &["3:1: error: unknown key `leads.amocrm.piepline`, did you mean `pipeline`?"],
        );
        check(
            &format!("[leads]\n[leads.bitrix24]\ncatgory = 1\n{B24}"),
            &["3:1: error: unknown key `leads.bitrix24.catgory`, did you mean `category`?"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nowner = 1\n{AMO}"),
            &[
                "3:1: error: unknown key `leads.amocrm.owner`, expected one of: pipeline, stage, responsible_user_id, key_field_name",
            ],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nstage = {{ pipline = \"A\", stage = \"B\" }}\n{AMO}"),
            &[
                "3:9: error: `leads.amocrm.stage`: a name reference needs non-empty `pipeline` and `stage`",
                "3:11: error: unknown key `leads.amocrm.stage.pipline`, did you mean `pipeline`?",
            ],
        );
        check(&format!("[leads.bitrix]\n{B24}"), &["1:8: error: unknown key `leads.bitrix`, did you mean `bitrix24`?"]);
    }

    #[test]
    fn amocrm_pipeline_and_stage_must_agree() {
        check(
            &format!(
                "[leads]\n[leads.amocrm]\npipeline = \"Продажи\"\nstage = {{ pipeline = \"Опт\", stage = \"Новый\" }}\n{AMO}"
            ),
            &[
                "4:9: error: `leads.amocrm.stage` is in pipeline \"Опт\", but `leads.amocrm.pipeline` is \"Продажи\": they must agree (or leave out `pipeline`)",
            ],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nstage = 142\n{AMO}"),
            &[
                "3:9: error: `leads.amocrm.stage` 142 is a status of every pipeline: set `leads.amocrm.pipeline` to say which",
            ],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nstage = 143\n{AMO}"),
            &[
                "3:9: error: `leads.amocrm.stage` 143 is a status of every pipeline: set `leads.amocrm.pipeline` to say which",
            ],
        );
        // An id against a name is for the synced stages to settle.
        check(
            &format!(
                "[leads]\n[leads.amocrm]\npipeline = 7\nstage = {{ pipeline = \"Опт\", stage = \"Новый\" }}\n{AMO}"
            ),
            &[],
        );
        check(&format!("[leads]\n[leads.amocrm]\npipeline = \"Опт\"\nstage = 31234567\n{AMO}"), &[]);
    }

    #[test]
    fn amocrm_values() {
        check(
            &format!("[leads]\n[leads.amocrm]\nstage = \"Новый лид\"\n{AMO}"),
            &[
                "3:9: error: `leads.amocrm.stage` must be an id or a table like { pipeline = \"…\", stage = \"…\" }, found string",
            ],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nstage = 0\n{AMO}"),
            &["3:9: error: `leads.amocrm.stage`: a status id must be a positive integer"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nstage = {{ pipeline = \"Опт\", stage = \" \" }}\n{AMO}"),
            &["3:9: error: `leads.amocrm.stage`: a name reference needs non-empty `pipeline` and `stage`"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\npipeline = 0\n{AMO}"),
            &["3:12: error: `leads.amocrm.pipeline`: an id must be a positive integer"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\npipeline = \" \"\n{AMO}"),
            &["3:12: error: `leads.amocrm.pipeline`: a name must not be empty"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\npipeline = true\n{AMO}"),
            &["3:12: error: `leads.amocrm.pipeline` must be an id (integer) or a name (string), found boolean"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nresponsible_user_id = 0\n{AMO}"),
            &["3:23: error: `leads.amocrm.responsible_user_id` must be a positive user id"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nresponsible_user_id = \"Ася\"\n{AMO}"),
            &["3:23: error: `leads.amocrm.responsible_user_id` must be an integer, found string"],
        );
        check(
            &format!("[leads]\n[leads.amocrm]\nkey_field_name = \" \"\n{AMO}"),
            &["3:18: error: `leads.amocrm.key_field_name` must not be empty"],
        );
    }

    #[test]
    fn bitrix24_category_and_stage_must_agree() {
        check(
            &format!("[leads]\n[leads.bitrix24]\ncategory = 1\nstage = \"C2:NEW\"\n{B24}"),
            &[
                "4:9: error: `leads.bitrix24.stage` \"C2:NEW\" is a stage of category 2, but `leads.bitrix24.category` is 1: they must agree (or leave out `category`)",
            ],
        );
        check(
            &format!("[leads]\n[leads.bitrix24]\ncategory = 0\nstage = \"C1:NEW\"\n{B24}"),
            &[
                "4:9: error: `leads.bitrix24.stage` \"C1:NEW\" is a stage of category 1, but `leads.bitrix24.category` is 0",
            ],
        );
        check(
            &format!("[leads]\n[leads.bitrix24]\ncategory = 2\nstage = \"NEW\"\n{B24}"),
            &[
                "4:9: error: `leads.bitrix24.stage` \"NEW\" is a stage of category 0, but `leads.bitrix24.category` is 2",
            ],
        );
        check(
            &format!(
                "[leads]\n[leads.bitrix24]\ncategory = \"Продажи\"\nstage = {{ category = \"Опт\", stage = \"Новая\" }}\n{B24}"
            ),
            &[
                "4:9: error: `leads.bitrix24.stage` is in category \"Опт\", but `leads.bitrix24.category` is \"Продажи\": they must agree (or leave out `category`)",
            ],
        );
        check(&format!("[leads]\n[leads.bitrix24]\ncategory = 0\nstage = \"WON\"\n{B24}"), &[]);
        check(&format!("[leads]\n[leads.bitrix24]\ncategory = 12\nstage = \"C12:UC_LAFJPE\"\n{B24}"), &[]);
        check(
            &format!(
                "[leads]\n[leads.bitrix24]\ncategory = 3\nstage = {{ category = \"Опт\", stage = \"Новая\" }}\n{B24}"
            ),
            &[],
        );
    }

    #[test]
    fn bitrix24_values() {
        check(
            &format!("[leads]\n[leads.bitrix24]\ncategory = 1\n{B24_LEADS}"),
            &[
                "3:12: error: `leads.bitrix24.category` is for deals only: [bitrix24] has entity_type = \"lead\", and lead statuses have no categories",
            ],
        );
        check(
            &format!("[leads]\n[leads.bitrix24]\ncategory = -1\n{B24}"),
            &["3:12: error: `leads.bitrix24.category`: an id must be 0 or more"],
        );
        check(
            &format!("[leads]\n[leads.bitrix24]\nstage = 5\n{B24}"),
            &[
                "3:9: error: `leads.bitrix24.stage` must be an id or a table like { category = \"…\", stage = \"…\" }, found integer",
            ],
        );
        check(
            &format!("[leads]\n[leads.bitrix24]\nstage = \"C1 NEW\"\n{B24}"),
            &["3:9: error: `leads.bitrix24.stage`: a STATUS_ID must be a non-empty word"],
        );
        check(
            &format!("[leads]\n[leads.bitrix24]\nresponsible_user_id = -3\n{B24}"),
            &["3:23: error: `leads.bitrix24.responsible_user_id` must be a positive user id"],
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let input = format!(
            "[leads]\ncrm = \"bitrix24\"\npoll = \"0s\"\nmax_attempts = 5000\n[leads.amocrm]\nstage = 143\nresponsible_user_id = -5\nkey_feild_name = \"k\"\n{AMO}"
        );
        check(
            &input,
            &[
                "2:7: error: `leads.crm` is bitrix24, but the tenant has no [bitrix24]",
                "3:8: error: `leads.poll` must be at least 1s",
                "4:16: error: `leads.max_attempts` must be 1 to 1000, found 5000",
                "6:9: error: `leads.amocrm.stage` 143 is a status of every pipeline",
                "7:23: error: `leads.amocrm.responsible_user_id` must be a positive user id",
                "8:1: error: unknown key `leads.amocrm.key_feild_name`, did you mean `key_field_name`?",
            ],
        );
    }
}
