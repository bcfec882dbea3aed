//! Stage references of `[amocrm.stages]` and `[bitrix24.stages]`: by id or
//! by name, and the name normalisation (trim, NFC, case-insensitive) that the
//! stage sync matches them with.

use std::fmt;

use toml::de::DeValue;
use unicode_normalization::UnicodeNormalization;

use super::document::{Table, Value, as_i64, wrong_type};
use super::problem::Problems;

pub const MAPPING_KEYS: &[&str] = &["qualified", "success", "fail"];
pub const AMOCRM_NAME_KEYS: &[&str] = &["pipeline", "stage"];
pub const BITRIX24_NAME_KEYS: &[&str] = &["category", "stage"];

/// An AmoCRM stage: a status id (matching that status in every pipeline
/// that has it), or pipeline and stage names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AmoStageRef {
    Id(i64),
    Named { pipeline: String, stage: String },
}

/// A Bitrix24 stage: a `STATUS_ID` such as `WON` or `C1:WON`, or category
/// and stage names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bitrix24StageRef {
    StatusId(String),
    Named { category: String, stage: String },
}

/// The flags a tenant maps stages to. `None` for success/fail means "the
/// CRM's own meaning" (AmoCRM 142/143, Bitrix24 semantics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageMapping<R> {
    pub qualified: Vec<R>,
    pub success: Option<Vec<R>>,
    pub fail: Option<Vec<R>>,
}

impl<R> Default for StageMapping<R> {
    fn default() -> Self {
        StageMapping { qualified: Vec::new(), success: None, fail: None }
    }
}

/// The form in which stage names are compared.
pub fn normalize_name(name: &str) -> String {
    name.trim().nfc().collect::<String>().to_lowercase()
}

impl fmt::Display for AmoStageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmoStageRef::Id(id) => write!(f, "{id}"),
            AmoStageRef::Named { pipeline, stage } => write!(f, "{pipeline:?} / {stage:?}"),
        }
    }
}

impl fmt::Display for Bitrix24StageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bitrix24StageRef::StatusId(id) => write!(f, "{id}"),
            Bitrix24StageRef::Named { category, stage } => write!(f, "{category:?} / {stage:?}"),
        }
    }
}

/// How a reference is read from TOML and compared with another.
pub(crate) trait StageRef: Sized + fmt::Display {
    const NAME_KEYS: &'static [&'static str];
    fn from_scalar(value: &DeValue<'_>) -> Option<Result<Self, String>>;
    fn from_names(container: &str, stage: &str) -> Self;
    /// Equal keys denote the same stage.
    fn key(&self) -> String;
}

impl StageRef for AmoStageRef {
    const NAME_KEYS: &'static [&'static str] = AMOCRM_NAME_KEYS;

    fn from_scalar(value: &DeValue<'_>) -> Option<Result<Self, String>> {
        match as_i64(value)? {
            Ok(id) if id > 0 => Some(Ok(AmoStageRef::Id(id))),
            _ => Some(Err("a status id must be a positive integer".into())),
        }
    }

    fn from_names(pipeline: &str, stage: &str) -> Self {
        AmoStageRef::Named { pipeline: pipeline.to_string(), stage: stage.to_string() }
    }

    fn key(&self) -> String {
        match self {
            AmoStageRef::Id(id) => format!("id:{id}"),
            AmoStageRef::Named { pipeline, stage } => {
                format!("name:{}\u{0}{}", normalize_name(pipeline), normalize_name(stage))
            }
        }
    }
}

impl StageRef for Bitrix24StageRef {
    const NAME_KEYS: &'static [&'static str] = BITRIX24_NAME_KEYS;

    fn from_scalar(value: &DeValue<'_>) -> Option<Result<Self, String>> {
        let id = value.as_str()?.trim();
        if id.is_empty() || id.chars().any(char::is_whitespace) {
            return Some(Err("a STATUS_ID must be a non-empty word such as \"WON\" or \"C1:WON\"".into()));
        }
        Some(Ok(Bitrix24StageRef::StatusId(id.to_string())))
    }

    fn from_names(category: &str, stage: &str) -> Self {
        Bitrix24StageRef::Named { category: category.to_string(), stage: stage.to_string() }
    }

    fn key(&self) -> String {
        match self {
            Bitrix24StageRef::StatusId(id) => format!("id:{id}"),
            Bitrix24StageRef::Named { category, stage } => {
                format!("name:{}\u{0}{}", normalize_name(category), normalize_name(stage))
            }
        }
    }
}

/// Reads a `[…stages]` table, reporting every malformed reference and every
/// stage listed as both success and fail.
pub(crate) fn read_mapping<R: StageRef>(table: Option<Table>, problems: &mut Problems) -> StageMapping<R> {
    let Some(table) = table else {
        return StageMapping::default();
    };
    table.check_keys(MAPPING_KEYS, problems);
    let qualified = read_list::<R>(&table, "qualified", problems).unwrap_or_default();
    let success = read_list::<R>(&table, "success", problems);
    let fail = read_list::<R>(&table, "fail", problems);
    if let (Some(success), Some(fail)) = (&success, &fail) {
        for (stage, span) in fail {
            if success.iter().any(|(s, _)| s.key() == stage.key()) {
                problems.error(
                    Some(span.clone()),
                    format!("stage {stage} is in both `{0}.success` and `{0}.fail`", table.name),
                );
            }
        }
    }
    let strip = |list: Vec<(R, std::ops::Range<usize>)>| list.into_iter().map(|(r, _)| r).collect();
    StageMapping {
        qualified: qualified.into_iter().map(|(r, _)| r).collect(),
        success: success.map(strip),
        fail: fail.map(strip),
    }
}

fn read_list<R: StageRef>(
    table: &Table,
    key: &str,
    problems: &mut Problems,
) -> Option<Vec<(R, std::ops::Range<usize>)>> {
    let items = table.array(key, problems)?;
    let path = table.path(key);
    let shown = format!("{path}[]");
    Some(items.iter().filter_map(|item| Some((read_ref::<R>(item, &path, &shown, problems)?, item.span()))).collect())
}

/// Reads one stage reference, reporting what is wrong with it. `path` names
/// it in messages, `shown` in a wrong-type message (`….success[]` for an
/// item of a list). `[leads.<crm>].stage` reads its single reference here
/// too: one set of rules for every place a stage is named.
pub(crate) fn read_ref<R: StageRef>(item: &Value<'_>, path: &str, shown: &str, problems: &mut Problems) -> Option<R> {
    let span = item.span();
    if let Some(parsed) = R::from_scalar(item.get_ref()) {
        return parsed.map_err(|why| problems.error(Some(span), format!("`{path}`: {why}"))).ok();
    }
    let DeValue::Table(names) = item.get_ref() else {
        let expected = format!("an id or a table like {{ {} = \"…\", stage = \"…\" }}", R::NAME_KEYS[0]);
        problems.error(Some(span), wrong_type(shown, &expected, item.get_ref()));
        return None;
    };
    let names = Table { name: path, table: names, span: span.clone() };
    names.check_keys(R::NAME_KEYS, problems);
    let container = names.str(R::NAME_KEYS[0], problems);
    let stage = names.str("stage", problems);
    match (container, stage) {
        (Some(c), Some(s)) if !c.get_ref().trim().is_empty() && !s.get_ref().trim().is_empty() => {
            Some(R::from_names(c.get_ref(), s.get_ref()))
        }
        _ => {
            problems.error(
                Some(span),
                format!("`{path}`: a name reference needs non-empty `{}` and `stage`", R::NAME_KEYS[0]),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_after_trim_nfc_and_case_folding() {
        // "й" precomposed vs. "и" + combining breve.
        assert_eq!(normalize_name("  Квалифицирован "), normalize_name("квалифицирован"));
        assert_eq!(normalize_name("Новый"), normalize_name("Новы\u{438}\u{306}"));
        assert_ne!(normalize_name("Won"), normalize_name("Lost"));
    }
}
