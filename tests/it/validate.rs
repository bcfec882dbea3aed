//! `crm-connect validate`: every problem of every file, with its position.

use crate::support::{crm_connect, write};

const VALID_AMOCRM: &str = r#"
[amocrm]
subdomain = "acme"
client_id = "id"
client_secret = "s"
redirect_uri = "https://example.com/oauth"
authorization_code = "code"
"#;

#[tokio::test]
async fn every_problem_of_every_file_is_reported_with_its_position_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "syntax.toml", "[tenant]\nslug = \"syntax\"\n\n[amocrm\nsubdomain = \"x\"\n");
    write(
        dir.path(),
        "amo.toml",
        r#"[amocrm]
subdomain = "acme"
domain = "amocrm.org"
clinet_id = "x"
client_id = "y"
client_secret = { env = "MISSING_X" }
redirect_uri = "https://example.com/oauth"
authorization_code = "abc"

[amocrm.stages]
success = [142, { pipeline = "Продажи", stage = "Успешно" }]
fail = [143, { pipeline = " продажи", stage = "УСПЕШНО" }]

[schedule]
stage_resync = "61 * * * *"
"#,
    );
    write(dir.path(), "b24.toml", "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/abc123def456/\"\n");
    write(
        dir.path(),
        "one.toml",
        "[tenant]\nslug = \"same\"\n[bitrix24]\nwebhook_url = \"https://a.bitrix24.ru/rest/1/a1/\"\n",
    );
    write(
        dir.path(),
        "two.toml",
        "[tenant]\nslug = \"same\"\n[bitrix24]\nwebhook_url = \"https://b.bitrix24.ru/rest/1/b1/\"\n",
    );

    let run = crm_connect(&["validate", "--config", dir.path().to_str().unwrap()], &[]).await;

    assert_eq!(run.code, 1, "{run:?}");
    let at = |file: &str, rest: &str| format!("{}:{rest}", dir.path().join(file).display());
    let expected = [
        at("syntax.toml", "4:8: error: TOML syntax"),
        at("amo.toml", "4:1: error: unknown key `amocrm.clinet_id`, did you mean `client_id`?"),
        at("amo.toml", "3:10: error: `amocrm.domain` \"amocrm.org\" is not one of amocrm.ru, amocrm.com, kommo.com"),
        at("amo.toml", "6:17: error: `amocrm.client_secret`: environment variable MISSING_X is not set"),
        at("amo.toml", "12:14: error: stage \" продажи\" / \"УСПЕШНО\" is in both"),
        at("amo.toml", "15:16: error: `schedule.stage_resync` \"61 * * * *\" is not a valid cron expression"),
        at("b24.toml", "2:15: error: `bitrix24.webhook_url` has no user id"),
        at("one.toml", "2:8: error: slug `same` is also used by"),
        at("two.toml", "2:8: error: slug `same` is also used by"),
    ];
    for line in expected {
        assert!(run.stdout.lines().any(|l| l.starts_with(&line)), "missing {line:?} in:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("5 file(s), 0 valid, 5 invalid"), "{}", run.stdout);
    assert!(!run.output().contains("panicked") && !run.output().contains("backtrace"), "{run:?}");
}

/// Validates a directory of these files (name, text, the lines expected
/// for it): each file's lines are exactly the expected ones, each matched
/// as a prefix after `path:`. The run, for its summary.
async fn validate_files(cases: &[(&str, String, &[&str])]) -> crate::support::Run {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, _) in cases {
        write(dir.path(), name, text);
    }

    let run = crm_connect(&["validate", "--config", dir.path().to_str().unwrap()], &[]).await;

    assert_eq!(run.code, 1, "{run:?}");
    for (name, _, expected) in cases {
        let at = format!("{}:", dir.path().join(name).display());
        let lines: Vec<&str> = run.stdout.lines().filter_map(|l| l.strip_prefix(&at)).collect();
        assert_eq!(lines.len(), expected.len(), "{name}: {lines:#?}");
        for (line, expected) in lines.iter().zip(*expected) {
            assert!(line.starts_with(expected), "{name}: {line:?} does not start with {expected:?}");
        }
    }
    run
}

#[tokio::test]
async fn leads_problems_are_reported_with_their_positions_beside_the_others() {
    const B24: &str = "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\n";
    let cases: &[(&str, String, &[&str])] = &[
        (
            "nocrm.toml",
            "[leads]\npoll = \"1m\"\n".into(),
            &[
                "1:1: error: [leads] needs [amocrm] or [bitrix24]: there is no CRM to deliver leads to",
                " warning: the tenant has neither [amocrm] nor [bitrix24]",
            ],
        ),
        (
            "both.toml",
            format!("[leads]\npoll = \"0s\"\n[leads.bitrx24]\n{B24}{VALID_AMOCRM}"),
            &[
                "1:1: error: `leads.crm` is missing: the tenant has both [amocrm] and [bitrix24]",
                "2:8: error: `leads.poll` must be at least 1s",
                "3:8: error: unknown key `leads.bitrx24`, did you mean `bitrix24`?",
            ],
        ),
        (
            "absent.toml",
            format!("[leads]\ncrm = \"bitrix24\"\nmax_attempts = 0\n{VALID_AMOCRM}"),
            &[
                "2:7: error: `leads.crm` is bitrix24, but the tenant has no [bitrix24]",
                "3:16: error: `leads.max_attempts` must be 1 to 1000, found 0",
            ],
        ),
        (
            "unused.toml",
            format!("[leads]\n[leads.bitrix24]\ncategory = 1\n{VALID_AMOCRM}"),
            &["2:1: warning: [leads.bitrix24] is not used: leads go to amocrm"],
        ),
        (
            "stages.toml",
            format!(
                "[leads]\ncrm = \"amocrm\"\n[leads.amocrm]\nstage = 143\n[leads.bitrix24]\ncategory = 2\nstage = \"C1:NEW\"\n{B24}{VALID_AMOCRM}"
            ),
            &[
                "4:9: error: `leads.amocrm.stage` 143 is a status of every pipeline: set `leads.amocrm.pipeline` to say which",
                "5:1: warning: [leads.bitrix24] is not used: leads go to amocrm",
                "7:9: error: `leads.bitrix24.stage` \"C1:NEW\" is a stage of category 1, but `leads.bitrix24.category` is 2",
            ],
        ),
        // [leads] beside a valid [funnel].
        ("funnel.toml", format!("[leads]\n[funnel]\npoll = \"1m\"\n{VALID_AMOCRM}"), &[]),
    ];
    let run = validate_files(cases).await;
    assert!(run.stdout.contains("6 file(s), 2 valid, 4 invalid"), "{}", run.stdout);
}

#[tokio::test]
async fn funnel_problems_are_reported_with_their_positions_beside_the_others() {
    const B24: &str = "[bitrix24]\nwebhook_url = \"https://acme.bitrix24.ru/rest/1/abc/\"\n";
    let cases: &[(&str, String, &[&str])] = &[
        (
            "nocrm.toml",
            "[funnel]\nentities = [\"deal\"]\n".into(),
            &[
                "1:1: error: [funnel] needs [amocrm] or [bitrix24]: there is no CRM to read stage changes from",
                "2:12: error: `funnel.entities` is for Bitrix24 only: the tenant has no [bitrix24]",
                " warning: the tenant has neither [amocrm] nor [bitrix24]",
            ],
        ),
        (
            "values.toml",
            format!(
                "[funnel]\npoll = \"5s\"\nsince = \"2999-01-01\"\nentities = [\"lead\", \"lead\"]\nstart = 1\n{B24}"
            ),
            &[
                "2:8: error: `funnel.poll` must be at least 10s",
                "3:9: error: `funnel.since` 2999-01-01 is in the future",
                "4:21: error: `funnel.entities` names lead twice",
                "5:1: error: unknown key `funnel.start`, expected one of: poll, since, entities",
            ],
        ),
        (
            "amo.toml",
            format!("[funnel]\nsince = \"1.1.2026\"\nentities = []\n{VALID_AMOCRM}"),
            &[
                "2:9: error: `funnel.since` \"1.1.2026\" is not a date like \"2026-01-01\" (YYYY-MM-DD)",
                "3:12: error: `funnel.entities` is for Bitrix24 only",
                "3:12: error: `funnel.entities` must name at least one of lead, deal",
            ],
        ),
        (
            "valid.toml",
            format!("[funnel]\nsince = 2026-01-01\nentities = [\"deal\", \"lead\"]\n{B24}{VALID_AMOCRM}"),
            &[],
        ),
    ];
    let run = validate_files(cases).await;
    assert!(run.stdout.contains("4 file(s), 1 valid, 3 invalid"), "{}", run.stdout);
}

#[tokio::test]
async fn a_valid_directory_exits_0_and_warnings_do_not_fail_it() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "acme.toml", VALID_AMOCRM);
    write(dir.path(), "empty.toml", "");
    let run = crm_connect(&["validate", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("empty.toml: warning: the tenant has neither [amocrm] nor [bitrix24]"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("2 file(s), 2 valid, 0 invalid: 0 error(s), 1 warning(s)"), "{}", run.stdout);
}

#[tokio::test]
async fn only_toml_files_directly_inside_count_and_symlinks_are_followed() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let target = write(elsewhere.path(), "real.toml", VALID_AMOCRM);
    std::os::unix::fs::symlink(&target, dir.path().join("linked.toml")).unwrap();
    // Not tenants: hidden, editor leftovers, other extensions, the `..data`
    // farm of a Kubernetes ConfigMap, and sub-directories.
    for name in [".hidden.toml", "acme.toml.swp", "acme.toml~", "acme.tmp", "notes.txt"] {
        write(dir.path(), name, "this is not toml [");
    }
    std::fs::create_dir(dir.path().join("..2026_11_26")).unwrap();
    write(&dir.path().join("..2026_11_26"), "x.toml", "not toml [");
    std::os::unix::fs::symlink(dir.path().join("..2026_11_26"), dir.path().join("..data")).unwrap();
    std::fs::create_dir(dir.path().join("sub.toml")).unwrap();

    let run = crm_connect(&["validate", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("1 file(s), 1 valid"), "{}", run.stdout);
}

#[tokio::test]
async fn secrets_come_from_env_file_and_credential_sources() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = tempfile::tempdir().unwrap();
    write(credentials.path(), "amo-secret", "from-credential\n");
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    write(&dir.path().join("secrets"), "hook", "https://acme.bitrix24.ru/rest/1/abc/\n");
    write(
        dir.path(),
        "acme.toml",
        r#"[tenant]
database_url = { env = "ACME_DB" }
[amocrm]
subdomain = "acme"
client_id = "id"
client_secret = { credential = "amo-secret" }
redirect_uri = "https://example.com/oauth"
authorization_code = { env = "ACME_CODE" }
[bitrix24]
webhook_url = { file = "secrets/hook" }
"#,
    );
    let config = dir.path().to_str().unwrap();
    let ok = crm_connect(
        &["validate", "--config", config],
        &[
            ("ACME_DB", "postgresql://u@localhost/acme"),
            ("ACME_CODE", "def"),
            ("CREDENTIALS_DIRECTORY", credentials.path().to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(ok.code, 0, "{ok:?}");

    std::fs::remove_file(dir.path().join("secrets/hook")).unwrap();
    let broken = crm_connect(&["validate", "--config", config], &[("ACME_DB", "postgresql://u@localhost/acme")]).await;
    assert_eq!(broken.code, 1, "{broken:?}");
    for expected in [
        "6:17: error: `amocrm.client_secret`: credential amo-secret needs CREDENTIALS_DIRECTORY",
        "8:22: error: `amocrm.authorization_code`: environment variable ACME_CODE is not set",
        "10:15: error: `bitrix24.webhook_url`: cannot read file",
    ] {
        assert!(broken.stdout.contains(expected), "missing {expected:?} in:\n{}", broken.stdout);
    }
}

#[tokio::test]
async fn a_missing_config_path_is_an_error_not_a_crash() {
    let run = crm_connect(&["validate", "--config", "/nonexistent/crm-connect"], &[]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("/nonexistent/crm-connect: error: cannot read"), "{}", run.stdout);
}

#[test]
fn no_input_makes_validation_panic() {
    // Every prefix of the example and of a few malformed files: truncated
    // strings, tables and inline tables must give problems, never a panic.
    let example = include_str!("../../crm.example.toml");
    let options = crm_connect::config::LoadOptions::default();
    let samples =
        [example, "a = [1, {x = ", "[amocrm]\nstages = 5\n[amocrm.stages]\nqualified = [[]]", "\u{feff}[t]\0"];
    let mut checked = 0;
    for sample in samples {
        for (end, _) in sample.char_indices() {
            let report = crm_connect::config::parse_file(std::path::Path::new("f.toml"), &sample[..end], &options);
            let _ = report.problems.len();
            checked += 1;
        }
    }
    assert!(checked > 1000, "checked only {checked} inputs");
}

/// A directory whose name holds the separators of a workflow command's
/// properties, with an error and a warning at a position and an error
/// without one.
fn three_problems() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("tenants,a:b").tempdir().unwrap();
    write(
        dir.path(),
        "acme.toml",
        "[amocrm]\nsubdomain = \"acme\"\nclient_id = \"id\"\nclient_secret = \"s\"\nredirect_uri = \"https://example.com/oauth\"\nclinet_id = \"x\"\n",
    );
    std::fs::write(dir.path().join("latin.toml"), b"slug = \"caf\xe9\"\n").unwrap();
    dir
}

const NO_CODE: &str = "[amocrm] has neither `authorization_code` nor `long_lived_token`: it stays \"needs authorization\" unless tokens are already stored";
const TYPO: &str = "unknown key `amocrm.clinet_id`, did you mean `client_id`?";
const NOT_UTF8: &str = "is not UTF-8 (invalid byte at offset 11)";
const SUMMARY: &str = "2 file(s), 0 valid, 2 invalid: 2 error(s), 1 warning(s)";

#[tokio::test]
async fn text_is_the_default_format_a_line_per_problem_and_a_summary() {
    let dir = three_problems();
    let (acme, latin) = (dir.path().join("acme.toml"), dir.path().join("latin.toml"));
    let config = dir.path().to_str().unwrap();
    let expected = format!(
        "{acme}:1:1: warning: {NO_CODE}\n{acme}:6:1: error: {TYPO}\n{latin}: error: {NOT_UTF8}\n{SUMMARY}\n",
        acme = acme.display(),
        latin = latin.display()
    );
    for args in [&["validate", "--config", config][..], &["validate", "--format", "text", "--config", config]] {
        let run = crm_connect(args, &[]).await;
        assert_eq!((run.code, run.stdout.as_str(), run.stderr.as_str()), (1, expected.as_str(), ""), "{args:?}");
    }
}

#[tokio::test]
async fn json_is_an_array_of_problems_with_file_position_severity_and_key() {
    let dir = three_problems();
    let (acme, latin) = (dir.path().join("acme.toml"), dir.path().join("latin.toml"));
    let run = crm_connect(&["validate", "--format", "json", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 1, "{run:?}");
    let printed: serde_json::Value = serde_json::from_str(&run.stdout).expect("stdout is JSON alone");
    let expected = serde_json::json!([
        {"file": acme, "line": 1, "column": 1, "severity": "warning", "key": "amocrm", "message": NO_CODE},
        {"file": acme, "line": 6, "column": 1, "severity": "error", "key": "amocrm.clinet_id", "message": TYPO},
        {"file": latin, "line": null, "column": null, "severity": "error", "key": null, "message": NOT_UTF8},
    ]);
    assert_eq!(printed, expected);
    assert_eq!(run.stderr, format!("{SUMMARY}\n"));

    let valid = tempfile::tempdir().unwrap();
    write(valid.path(), "acme.toml", VALID_AMOCRM);
    let run = crm_connect(&["validate", "--format", "json", "--config", valid.path().to_str().unwrap()], &[]).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, "[]\n"), "{run:?}");
}

#[tokio::test]
async fn github_prints_a_workflow_command_per_problem_with_properties_escaped() {
    let dir = three_problems();
    let run = crm_connect(&["validate", "--format", "github", "--config", dir.path().to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 1, "{run:?}");
    // `,` and `:` separate a command's properties, so a path escapes them.
    let escaped = dir.path().display().to_string().replace(':', "%3A").replace(',', "%2C");
    assert!(escaped.contains("tenants%2Ca%3Ab"), "{escaped}");
    let expected = format!(
        "::warning file={escaped}/acme.toml,line=1,col=1::{NO_CODE}\n\
         ::error file={escaped}/acme.toml,line=6,col=1::{TYPO}\n\
         ::error file={escaped}/latin.toml::{NOT_UTF8}\n"
    );
    assert_eq!(run.stdout, expected);
    assert_eq!(run.stderr, format!("{SUMMARY}\n"));

    let valid = tempfile::tempdir().unwrap();
    write(valid.path(), "acme.toml", VALID_AMOCRM);
    let run = crm_connect(&["validate", "--format", "github", "--config", valid.path().to_str().unwrap()], &[]).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:?}");
}
