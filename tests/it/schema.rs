//! The JSON Schema of a tenant file: `crm-connect schema` prints the
//! committed `crm-connect.schema.json`, the example names it and satisfies
//! it, and a real JSON Schema validator agrees with `validate` on what the
//! schema can express.

use std::path::Path;

use crm_connect::config::{Environment, LoadOptions, parse_file};
use crm_connect::secret::Secret;
use serde_json::Value;

use crate::support::crm_connect;

const SCHEMA: &str = include_str!("../../crm-connect.schema.json");
const EXAMPLE: &str = include_str!("../../crm.example.toml");

fn schema() -> Value {
    serde_json::from_str(SCHEMA).expect("the committed schema is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft7::new(&schema()).expect("the schema compiles")
}

/// A tenant file as JSON, the form a TOML language server checks.
fn as_json(toml_text: &str) -> Value {
    toml::from_str(toml_text).expect("the test's TOML parses")
}

/// Where the schema finds `toml_text` wrong, as `instance path: message`.
fn schema_errors(toml_text: &str) -> Vec<String> {
    let instance = as_json(toml_text);
    validator().iter_errors(&instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// The errors `validate` reports for `toml_text` (warnings left out).
fn validator_errors(toml_text: &str) -> Vec<String> {
    let env = Environment::fixed([("ACME_DB".to_string(), "postgresql://u@localhost/acme".to_string())]);
    let options =
        LoadOptions { database_url_template: Secret::new(crm_connect::config::DEFAULT_DATABASE_URL_TEMPLATE), env };
    let report = parse_file(Path::new("acme.toml"), toml_text, &options);
    report.problems.iter().filter(|p| p.is_error()).map(|p| p.to_string()).collect()
}

#[tokio::test]
async fn crm_connect_schema_prints_the_committed_file() {
    let run = crm_connect(&["schema"], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout == SCHEMA,
        "crm-connect.schema.json is stale: regenerate it with `cargo run -- schema > crm-connect.schema.json`"
    );
    assert_eq!(schema()["$schema"], "http://json-schema.org/draft-07/schema#");
}

#[test]
fn the_schema_is_a_valid_draft_07_schema_and_reads_the_same_as_draft_04() {
    let schema = schema();
    jsonschema::draft7::meta::validate(&schema).expect("a valid draft-07 schema");
    // Taplo promises draft-04: the schema keeps to keywords both drafts
    // read alike, so a draft-04 reading must give the same verdicts.
    let mut as_draft4 = schema.clone();
    as_draft4.as_object_mut().unwrap().remove("$schema");
    jsonschema::draft4::meta::validate(&as_draft4).expect("a valid draft-04 schema");
    let draft4 = jsonschema::draft4::new(&as_draft4).unwrap();
    let draft7 = validator();
    let mut compared = 0;
    for (text, _) in cases().iter().chain(&[(EXAMPLE.to_string(), true)]) {
        let instance = as_json(text);
        assert_eq!(draft4.is_valid(&instance), draft7.is_valid(&instance), "{text}");
        compared += 1;
    }
    assert!(compared > 30, "compared only {compared}");
}

#[test]
fn the_example_names_the_schema_on_its_first_line_and_satisfies_it() {
    let first = EXAMPLE.lines().next().unwrap();
    let target = first.strip_prefix("#:schema ").expect("the example starts with a #:schema directive");
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join(target);
    assert_eq!(std::fs::read_to_string(&beside).unwrap(), SCHEMA, "{first} names the committed schema");
    assert_eq!(schema_errors(EXAMPLE), Vec::<String>::new());
}

#[test]
fn a_misspelled_key_fails_the_schema_as_it_fails_validation() {
    assert!(EXAMPLE.contains("\nclient_id = "), "the example sets amocrm.client_id");
    let typo = EXAMPLE.replacen("\nclient_id = ", "\nclinet_id = ", 1);

    let errors = schema_errors(&typo);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].starts_with("/amocrm: ") && errors[0].contains("clinet_id"), "{errors:#?}");

    let report = parse_file(Path::new("acme.toml"), &typo, &LoadOptions::default());
    let problem = report.problems.iter().find(|p| p.key.as_deref() == Some("amocrm.clinet_id")).expect("reported");
    assert!(problem.message.starts_with("unknown key `amocrm.clinet_id`, did you mean `client_id`?"), "{problem}");
}

const B24: &str = "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\n";
const AMO: &str = "[amocrm]\nsubdomain = \"acme\"\nlong_lived_token = \"t\"\n";

/// Files that both checks accept (`true`) or both reject (`false`): the
/// values the schema can tell apart without reading them as a CRM would.
fn cases() -> Vec<(String, bool)> {
    let case = |text: String, valid| (text, valid);
    vec![
        case(format!("[tenant]\nslug = \"acme_1\"\n{B24}"), true),
        case(format!("[tenant]\nslug = \"{}\"\n{B24}", "a".repeat(48)), true),
        case(format!("[tenant]\nslug = \"{}\"\n{B24}", "a".repeat(49)), false),
        case(format!("[tenant]\nslug = \"Acme\"\n{B24}"), false),
        case(format!("[tenant]\nslug = \"_acme\"\n{B24}"), false),
        case(format!("[tenant]\ndatabase_url = {{ env = \"ACME_DB\" }}\n{B24}"), true),
        case(format!("[tenant]\ndatabase_url = {{ env = \"ACME_DB\", file = \"db\" }}\n{B24}"), false),
        case(format!("[tenant]\ndatabase_url = {{ evn = \"ACME_DB\" }}\n{B24}"), false),
        case(format!("[tenant]\ndatabase_url = \"\"\n{B24}"), false),
        case(format!("[tenant]\ndatabase_url = 5\n{B24}"), false),
        case(format!("[schedule]\ntoken_refresh_margin = \"1h\"\n{B24}"), true),
        case(format!("[schedule]\ntoken_refresh_margin = 3600\n{B24}"), false),
        case(format!("{AMO}domain = \"kommo.com\"\n"), true),
        case(format!("{AMO}domain = \"amocrm.org\"\n"), false),
        case(format!("{AMO}test_pipeline_id = \"1\"\n"), false),
        case(
            format!(
                "{AMO}[amocrm.stages]\nqualified = [31234567, {{ pipeline = \"Продажи\", stage = \"Новый\" }}]\nfail = [143]\n"
            ),
            true,
        ),
        case(format!("{AMO}[amocrm.stages]\nfail = [0]\n"), false),
        case(format!("{AMO}[amocrm.stages]\nfail = [{{ pipeline = \"Продажи\" }}]\n"), false),
        case(format!("{AMO}[amocrm.stages]\nfail = [{{ pipeline = \" \", stage = \"Новый\" }}]\n"), false),
        case(format!("{AMO}[amocrm.stages]\nfail = 143\n"), false),
        case("[amocrm]\nlong_lived_token = \"t\"\n".to_string(), false),
        case(format!("{B24}entity_type = \"lead\"\n"), true),
        case(format!("{B24}entity_type = \"leads\"\n"), false),
        case("[bitrix24]\nentity_type = \"deal\"\n".to_string(), false),
        case(
            format!("{B24}[bitrix24.stages]\nsuccess = [\"WON\", {{ category = \"Продажи\", stage = \"Успех\" }}]\n"),
            true,
        ),
        case(format!("{B24}[bitrix24.stages]\nsuccess = [142]\n"), false),
        case(format!("{B24}[bitrix24.stages]\nsuccess = [\"C1 WON\"]\n"), false),
        case(format!("[leads]\nmax_attempts = 1000\n{B24}"), true),
        case(format!("[leads]\nmax_attempts = 0\n{B24}"), false),
        case(format!("[leads]\nmax_attempts = 1001\n{B24}"), false),
        case(format!("[leads]\ncrm = \"bitrix24\"\n{B24}"), true),
        case(format!("[leads]\ncrm = \"bitrix\"\n{B24}"), false),
        case(format!("[leads.bitrix24]\ncategory = 0\nstage = \"NEW\"\n{B24}"), true),
        case(
            format!(
                "[leads.bitrix24]\ncategory = \"Продажи\"\nstage = {{ category = \"Продажи\", stage = \"Новая\" }}\n{B24}"
            ),
            true,
        ),
        case(format!("[leads.bitrix24]\ncategory = -1\n{B24}"), false),
        case(format!("[leads.bitrix24]\ncategory = \" \"\n{B24}"), false),
        case(format!("[leads.bitrix24]\nstage = \"C1 NEW\"\n{B24}"), false),
        case(format!("[leads.bitrix24]\nstage = {{ category = \"Продажи\" }}\n{B24}"), false),
        case(format!("[leads.amocrm]\npipeline = 1\nresponsible_user_id = 42\nkey_field_name = \"Ключ\"\n{AMO}"), true),
        case(format!("[leads.amocrm]\npipeline = 0\n{AMO}"), false),
        case(format!("[leads.amocrm]\nresponsible_user_id = 0\n{AMO}"), false),
        case(format!("[leads.amocrm]\nkey_field_name = \" \"\n{AMO}"), false),
        case(
            format!("[leads.amocrm]\nstage = {{ pipeline = \"Продажи\", stage = \"Новый\", status = 1 }}\n{AMO}"),
            false,
        ),
        case(format!("[leads]\npol = \"1m\"\n{B24}"), false),
        case(format!("[tenat]\n{B24}"), false),
    ]
}

#[test]
fn the_schema_and_validate_agree_on_what_the_schema_can_express() {
    let cases = cases();
    assert!(cases.iter().filter(|(_, valid)| *valid).count() > 10);
    for (text, valid) in &cases {
        let (schema, validate) = (schema_errors(text), validator_errors(text));
        assert_eq!(schema.is_empty(), *valid, "the schema on\n{text}\nsays {schema:#?}");
        assert_eq!(validate.is_empty(), *valid, "validate on\n{text}\nsays {validate:#?}");
    }
}

#[test]
fn every_key_the_schema_requires_is_required_by_validate() {
    let schema = schema();
    let mut checked = 0;
    for (table, node) in schema["properties"].as_object().unwrap() {
        for key in node["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap();
            let text = format!("[{table}]\n");
            let missing = format!("`{table}.{key}` is missing");
            assert!(validator_errors(&text).iter().any(|e| e.ends_with(&missing)), "validate: {missing}");
            assert!(!schema_errors(&text).is_empty(), "the schema accepts [{table}] without `{key}`");
            checked += 1;
        }
    }
    assert!(checked >= 2, "the schema requires only {checked} keys");
}
