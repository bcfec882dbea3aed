//! How the validator reads `[leads]`: defaults, each key's checks and positions.

use std::path::Path;

use super::*;
use crate::config::{LoadOptions, Severity, parse_file};

// `[leads]` comes first in every case, so that positions count from its line.
const AMO: &str = "[amocrm]\nsubdomain = \"acme\"\nlong_lived_token = \"t\"\n";
const B24: &str = "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\n";
const B24_LEADS: &str = "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\nentity_type = \"lead\"\n";

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
    assert_eq!(named.amocrm.stage, Some(AmoStageRef::Named { pipeline: "Продажи".into(), stage: "Новый лид".into() }));
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
    check(&format!("[leads]\npol = \"30s\"\n{AMO}"), &["2:1: error: unknown key `leads.pol`, did you mean `poll`?"]);
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
        &format!("[leads]\n[leads.amocrm]\npipeline = 7\nstage = {{ pipeline = \"Опт\", stage = \"Новый\" }}\n{AMO}"),
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
        &["4:9: error: `leads.bitrix24.stage` \"C1:NEW\" is a stage of category 1, but `leads.bitrix24.category` is 0"],
    );
    check(
        &format!("[leads]\n[leads.bitrix24]\ncategory = 2\nstage = \"NEW\"\n{B24}"),
        &["4:9: error: `leads.bitrix24.stage` \"NEW\" is a stage of category 0, but `leads.bitrix24.category` is 2"],
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
        &format!("[leads]\n[leads.bitrix24]\ncategory = 3\nstage = {{ category = \"Опт\", stage = \"Новая\" }}\n{B24}"),
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
