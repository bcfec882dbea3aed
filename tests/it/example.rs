//! `crm.example.toml` is the operator manual: it must stay valid and must
//! mention every key the configuration model knows.

use std::path::Path;

use crm_connect::config::{self, AMOCRM_NAME_KEYS, BITRIX24_NAME_KEYS, Environment, LoadOptions, SCHEMA, SOURCE_KEYS};
use crm_connect::secret::Secret;

const EXAMPLE: &str = include_str!("../../crm.example.toml");

#[test]
fn the_example_is_valid_with_its_variables_and_credentials_set() {
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("acme-amocrm-client-secret"), "secret\n").unwrap();
    let env = Environment::fixed(
        [
            ("ACME_DATABASE_URL", "postgresql://postgres@localhost:5432/openclaw_acme"),
            ("ACME_AMOCRM_AUTH_CODE", "def50200aa"),
            ("ACME_BITRIX24_WEBHOOK_URL", "https://acme.bitrix24.ru/rest/1/abc123def456/"),
            ("CREDENTIALS_DIRECTORY", credentials.path().to_str().unwrap()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let options = LoadOptions { database_url_template: Secret::new(config::DEFAULT_DATABASE_URL_TEMPLATE), env };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crm.example.toml");
    let loaded = config::load(&path, &options);
    let problems: Vec<String> = loaded.all_problems().map(|p| p.to_string()).collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let tenant = loaded.tenants().next().expect("the example is one tenant");
    assert_eq!(tenant.slug, "acme");
    let amo = tenant.amocrm.as_ref().unwrap();
    assert_eq!(amo.client_secret.as_ref().unwrap().expose(), "secret");
    assert_eq!(amo.stages.qualified.len(), 2);
    assert_eq!(tenant.bitrix24.as_ref().unwrap().webhook.user_id(), 1);
    let streams: Vec<String> = tenant.funnel_streams().iter().map(|s| s.to_string()).collect();
    assert_eq!(streams, ["amocrm lead_status_changed", "bitrix24 deal"]);
}

#[test]
fn every_key_of_the_model_appears_in_the_example() {
    let sections = sections(EXAMPLE);
    let mut checked = 0;
    for (table, keys) in SCHEMA {
        for key in *keys {
            checked += 1;
            let mentioned = if table.is_empty() {
                sections.iter().any(|(name, _)| name == key)
            } else {
                sections
                    .iter()
                    .filter(|(name, _)| name == table)
                    .any(|(_, lines)| lines.iter().any(|l| assigns(l, key)))
                    || sections.iter().any(|(name, _)| *name == format!("{table}.{key}"))
            };
            assert!(mentioned, "`{table}.{key}` is not documented in crm.example.toml");
        }
    }
    for key in SOURCE_KEYS.iter().chain(AMOCRM_NAME_KEYS).chain(BITRIX24_NAME_KEYS) {
        checked += 1;
        assert!(
            EXAMPLE.contains(&format!("{{ {key} = ")) || EXAMPLE.contains(&format!(", {key} = ")),
            "`{key}` unused"
        );
    }
    assert!(checked > 30, "the schema lists only {checked} keys");
}

/// The example's `[table]` sections (commented-out headers count) with their lines.
fn sections(text: &str) -> Vec<(String, Vec<&str>)> {
    let mut sections = vec![(String::new(), Vec::new())];
    for line in text.lines() {
        let bare = line.trim_start_matches('#').trim();
        if let Some(name) = bare.strip_prefix('[').and_then(|rest| rest.strip_suffix(']'))
            && !name.contains(' ')
            && !name.contains('"')
        {
            sections.push((name.to_string(), Vec::new()));
            continue;
        }
        sections.last_mut().unwrap().1.push(line);
    }
    sections
}

/// `key = …`, or `# key = …` for a key shown commented out.
fn assigns(line: &str, key: &str) -> bool {
    let bare = line.trim_start_matches('#').trim_start();
    bare.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
}
