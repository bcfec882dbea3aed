//! `[funnel]`: whether the tenant's stage changes are recorded in
//! `crm_stage_changes`, how often the CRMs are asked, from which day a
//! first enable back-fills, and which Bitrix24 entities are followed.

use std::time::Duration;

use chrono::NaiveDate;
use toml::de::DeValue;

use super::document::{Table, Value, read_poll, wrong_type};
use super::leads::entity_type_as_written;
use super::problem::Problems;
use crate::model::{Crm, EntityType};

pub const FUNNEL_KEYS: &[&str] = &["poll", "since", "entities"];

pub const DEFAULT_FUNNEL_POLL: Duration = Duration::from_secs(60);

/// A poll makes at least one request per CRM: more often would spend the
/// account's budget on nothing.
pub(crate) const MIN_POLL: Duration = Duration::from_secs(10);

/// What `since` looks like as a string (a TOML date reads the same).
pub(crate) const DATE_PATTERN: &str = r"^\d{4}-\d{2}-\d{2}$";

/// Funnel history of one tenant (`[funnel]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunnelConfig {
    /// How often each CRM is asked for new changes.
    pub poll: Duration,
    /// On a stream's first enable, back-fill from this day (00:00 UTC);
    /// read only while the stream has no cursor.
    pub since: Option<NaiveDate>,
    /// The Bitrix24 entities followed, one stream each; empty without
    /// `[bitrix24]`.
    pub entities: Vec<EntityType>,
}

/// Reads `[funnel]` from the file's root table. `None` when the file has
/// none, or when it has a problem (reported).
pub(crate) fn read_funnel(root: &Table, problems: &mut Problems) -> Option<FunnelConfig> {
    let t = root.table("funnel", "funnel", problems)?;
    t.check_keys(FUNNEL_KEYS, problems);
    // The presence of a CRM's table, not its validity: a broken one is
    // reported on its own.
    let configured: Vec<Crm> = Crm::ALL.into_iter().filter(|crm| root.get(crm.as_str()).is_some()).collect();
    let has_crm = !configured.is_empty();
    if !has_crm {
        problems
            .error(Some(t.span()), "[funnel] needs [amocrm] or [bitrix24]: there is no CRM to read stage changes from");
    }
    let poll = read_poll(&t, "poll", DEFAULT_FUNNEL_POLL, MIN_POLL, problems);
    let since = match t.get("since") {
        Some(value) => read_since(value, chrono::Utc::now().date_naive(), problems).map(Some),
        None => Some(None),
    };
    let entities = read_entities(&t, root, configured.contains(&Crm::Bitrix24), problems);
    if !has_crm {
        return None;
    }
    Some(FunnelConfig { poll: poll?, since: since?, entities: entities? })
}

/// `since`: `"YYYY-MM-DD"`, or a bare TOML date, not after `today` (UTC).
fn read_since(value: &Value, today: NaiveDate, problems: &mut Problems) -> Option<NaiveDate> {
    let date = match value.get_ref() {
        DeValue::String(text) => parse_day(text).ok_or_else(|| {
            format!("`funnel.since` {:?} is not a date like \"2026-01-01\" (YYYY-MM-DD)", text.as_ref())
        }),
        DeValue::Datetime(dt) => match (dt.date, dt.time, dt.offset) {
            (Some(d), None, None) => NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
                .ok_or_else(|| format!("`funnel.since` {dt} is not a date")),
            _ => Err(format!("`funnel.since` must be a day like \"2026-01-01\", without a time, found {dt}")),
        },
        other => Err(wrong_type("funnel.since", "a date like \"2026-01-01\"", other)),
    };
    let date = match date {
        Ok(date) if date > today => Err(format!("`funnel.since` {date} is in the future (today is {today}, UTC)")),
        other => other,
    };
    date.map_err(|message| problems.error(Some(value.span()), message)).ok()
}

/// A day written exactly as `YYYY-MM-DD`.
fn parse_day(text: &str) -> Option<NaiveDate> {
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    shaped.then(|| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()).flatten()
}

/// `entities`: only with `[bitrix24]`; non-empty, each `lead` or `deal`
/// once. Default: `[bitrix24].entity_type`.
fn read_entities(t: &Table, root: &Table, has_bitrix24: bool, problems: &mut Problems) -> Option<Vec<EntityType>> {
    let Some(value) = t.get("entities") else {
        return Some(if has_bitrix24 { vec![entity_type_as_written(root)] } else { Vec::new() });
    };
    let items = t.array("entities", problems)?;
    let mut ok = true;
    if !has_bitrix24 {
        problems.error(
            Some(value.span()),
            "`funnel.entities` is for Bitrix24 only: the tenant has no [bitrix24] (AmoCRM has one stream, of leads)",
        );
        ok = false;
    }
    if items.is_empty() {
        problems.error(Some(value.span()), "`funnel.entities` must name at least one of lead, deal");
        ok = false;
    }
    let mut entities = Vec::new();
    for item in items {
        let entity = match item.get_ref() {
            DeValue::String(name) => EntityType::parse(name)
                .ok_or_else(|| format!("`funnel.entities`: {:?} is not one of lead, deal", name.as_ref())),
            other => Err(wrong_type("funnel.entities", "an array of \"lead\" and \"deal\"", other)),
        };
        match entity {
            Ok(entity) if entities.contains(&entity) => {
                problems.error(Some(item.span()), format!("`funnel.entities` names {} twice", entity.as_str()));
                ok = false;
            }
            Ok(entity) => entities.push(entity),
            Err(message) => {
                problems.error(Some(item.span()), message);
                ok = false;
            }
        }
    }
    ok.then_some(entities)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{LoadOptions, Severity, parse_file};

    // `[funnel]` comes first in every case, so that positions count from its line.
    const AMO: &str = "[amocrm]\nsubdomain = \"acme\"\nlong_lived_token = \"t\"\n";
    const B24: &str = "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\n";
    const B24_LEADS: &str =
        "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\nentity_type = \"lead\"\n";

    /// The problems are exactly `expected`, each as `line:column: severity:
    /// message` matched as a prefix (a parser's own words may follow).
    #[track_caller]
    fn check(input: &str, expected: &[&str]) {
        let report = parse_file(Path::new("acme.toml"), input, &LoadOptions::default());
        let actual: Vec<String> = report
            .problems
            .iter()
            .map(|p| {
                let severity = if p.severity == Severity::Error { "error" } else { "warning" };
                match p.position {
                    Some((line, column)) => format!("{line}:{column}: {severity}: {}", p.message),
                    None => format!("{severity}: {}", p.message),
                }
            })
            .collect();
        let matches = actual.len() == expected.len() && actual.iter().zip(expected).all(|(a, e)| a.starts_with(e));
        assert!(matches, "input:\n{input}\nexpected: {expected:#?}\nactual: {actual:#?}");
        assert_eq!(report.tenant.is_some(), expected.iter().all(|e| !e.contains("error")), "{input}");
    }

    /// The `[funnel]` of a file that has no problem at all, and its streams.
    #[track_caller]
    fn funnel(input: &str) -> (Option<FunnelConfig>, Vec<String>) {
        let report = parse_file(Path::new("acme.toml"), input, &LoadOptions::default());
        assert!(report.problems.is_empty(), "{:#?}", report.problems);
        let tenant = report.tenant.expect("valid");
        let streams = tenant.funnel_streams().iter().map(|s| s.to_string()).collect();
        (tenant.funnel, streams)
    }

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn defaults_follow_the_crms_of_the_tenant() {
        assert_eq!(funnel(AMO), (None, vec![]), "no [funnel], no streams");
        assert_eq!(
            funnel(&format!("[funnel]\n{AMO}")),
            (
                Some(FunnelConfig { poll: Duration::from_secs(60), since: None, entities: vec![] }),
                vec!["amocrm lead_status_changed".into()]
            )
        );
        let (config, streams) = funnel(&format!("[funnel]\n{B24}"));
        assert_eq!(config.unwrap().entities, [EntityType::Deal], "[bitrix24].entity_type defaults to deal");
        assert_eq!(streams, ["bitrix24 deal"]);
        let (config, _) = funnel(&format!("[funnel]\n{B24_LEADS}"));
        assert_eq!(config.unwrap().entities, [EntityType::Lead]);
        let (_, streams) = funnel(&format!("[funnel]\n{AMO}{B24}"));
        assert_eq!(streams, ["amocrm lead_status_changed", "bitrix24 deal"]);
    }

    #[test]
    fn every_setting_is_read() {
        let (config, streams) = funnel(&format!(
            "[funnel]\npoll = \"2m 30s\"\nsince = \"2026-01-01\"\nentities = [\"lead\", \"deal\"]\n{B24}{AMO}"
        ));
        let expected = FunnelConfig {
            poll: Duration::from_secs(150),
            since: Some(day(2026, 1, 1)),
            entities: vec![EntityType::Lead, EntityType::Deal],
        };
        assert_eq!(config, Some(expected));
        assert_eq!(streams, ["amocrm lead_status_changed", "bitrix24 lead", "bitrix24 deal"]);
        // A bare TOML date is the same day.
        let (config, _) = funnel(&format!("[funnel]\nsince = 2025-02-28\npoll = \"10s\"\n{AMO}"));
        let config = config.unwrap();
        assert_eq!((config.since, config.poll), (Some(day(2025, 2, 28)), Duration::from_secs(10)));
    }

    #[test]
    fn a_funnel_needs_a_crm() {
        check(
            "[funnel]\npoll = \"1m\"\n",
            &[
                "1:1: error: [funnel] needs [amocrm] or [bitrix24]: there is no CRM to read stage changes from",
                "warning: the tenant has neither [amocrm] nor [bitrix24]",
            ],
        );
        check(
            &format!("[funnel]\nentities = [\"lead\"]\n{AMO}"),
            &["2:12: error: `funnel.entities` is for Bitrix24 only: the tenant has no [bitrix24]"],
        );
        check(&format!("funnel = 1\n{AMO}"), &["1:10: error: `funnel` must be a table, found integer"]);
    }

    #[test]
    fn poll() {
        check(&format!("[funnel]\npoll = \"9s\"\n{AMO}"), &["2:8: error: `funnel.poll` must be at least 10s"]);
        check(&format!("[funnel]\npoll = \"9999ms\"\n{AMO}"), &["2:8: error: `funnel.poll` must be at least 10s"]);
        check(&format!("[funnel]\npoll = \"25h\"\n{AMO}"), &["2:8: error: `funnel.poll` must be at most 1 day"]);
        check(
            &format!("[funnel]\npoll = \"hourly\"\n{AMO}"),
            &["2:8: error: `funnel.poll` \"hourly\" is not a duration like \"30s\", \"1m\" or \"5m\": "],
        );
        check(&format!("[funnel]\npoll = 60\n{AMO}"), &["2:8: error: `funnel.poll` must be a string, found integer"]);
    }

    #[test]
    fn since() {
        for bad in ["2026-1-1", "01.01.2026", "2026-02-30", "2026-01-01T00:00:00Z", "", "２０２６-01-01"] {
            check(
                &format!("[funnel]\nsince = \"{bad}\"\n{AMO}"),
                &[&format!("2:9: error: `funnel.since` {bad:?} is not a date like \"2026-01-01\" (YYYY-MM-DD)")],
            );
        }
        check(
            &format!("[funnel]\nsince = 2026-01-01T10:00:00\n{AMO}"),
            &[
                "2:9: error: `funnel.since` must be a day like \"2026-01-01\", without a time, found 2026-01-01T10:00:00",
            ],
        );
        check(
            &format!("[funnel]\nsince = 20260101\n{AMO}"),
            &["2:9: error: `funnel.since` must be a date like \"2026-01-01\", found integer"],
        );
        let today = chrono::Utc::now().date_naive();
        let tomorrow = today.succ_opt().unwrap();
        check(
            &format!("[funnel]\nsince = \"{tomorrow}\"\n{AMO}"),
            &[&format!("2:9: error: `funnel.since` {tomorrow} is in the future (today is ")],
        );
        check(
            &format!("[funnel]\nsince = \"9999-12-31\"\n{AMO}"),
            &["2:9: error: `funnel.since` 9999-12-31 is in the future"],
        );
        check(&format!("[funnel]\nsince = \"{today}\"\n{AMO}"), &[]);
    }

    #[test]
    fn entities() {
        check(
            &format!("[funnel]\nentities = []\n{B24}"),
            &["2:12: error: `funnel.entities` must name at least one of lead, deal"],
        );
        check(
            &format!("[funnel]\nentities = [\"deal\", \"contact\", \"deal\", 2]\n{B24}"),
            &[
                "2:21: error: `funnel.entities`: \"contact\" is not one of lead, deal",
                "2:32: error: `funnel.entities` names deal twice",
                "2:40: error: `funnel.entities` must be an array of \"lead\" and \"deal\", found integer",
            ],
        );
        check(
            &format!("[funnel]\nentities = \"deal\"\n{B24}"),
            &["2:12: error: `funnel.entities` must be an array, found string"],
        );
        // Leads on a portal that syncs deal stages are allowed: both are streams of their own.
        check(&format!("[funnel]\nentities = [\"lead\"]\n{B24}"), &[]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        check(
            &format!("[funnel]\npol = \"1m\"\npoll = \"1s\"\nsince = \"tomorrow\"\nentities = [\"leads\"]\n{AMO}"),
            &[
                "2:1: error: unknown key `funnel.pol`, did you mean `poll`?",
                "3:8: error: `funnel.poll` must be at least 10s",
                "4:9: error: `funnel.since` \"tomorrow\" is not a date",
                "5:12: error: `funnel.entities` is for Bitrix24 only",
                "5:13: error: `funnel.entities`: \"leads\" is not one of lead, deal",
            ],
        );
    }
}
