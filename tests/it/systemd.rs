//! The systemd units in `systemd/`: `systemd-analyze verify` accepts them
//! without a warning, and they keep the settings the daemon relies on.
//!
//! `systemd-analyze` and `systemd-sysusers` come with the Debian package
//! `systemd`. Without them these tests fail, unless
//! `CRM_CONNECT_SKIP_SYSTEMD=1` says to skip them.

use std::io::ErrorKind;
use std::path::Path;
use std::process::{Command, Output};

const MAIN: &str = include_str!("../../systemd/crm-connect.service");
const TEMPLATE: &str = include_str!("../../systemd/crm-connect@.service");
const SYSUSERS: &str = include_str!("../../systemd/crm-connect.sysusers.conf");
const TMPFILES: &str = include_str!("../../systemd/crm-connect.tmpfiles.conf");

/// Where the README installs the binary, and so where the units run it from.
const INSTALLED: &str = "/usr/local/bin/crm-connect";

/// Hardening both units must have, with these values.
const HARDENING: &[(&str, &str)] = &[
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ReadOnlyPaths", "/etc/crm-connect/tenants"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("SystemCallArchitectures", "native"),
    ("SystemCallFilter", "@system-service"),
    ("CapabilityBoundingSet", ""),
    ("UMask", "0077"),
];

#[test]
fn systemd_analyze_verify_accepts_both_units_without_a_warning() {
    if !systemd_tool("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify insists that ExecStart= exists: run the binary this build made.
    let main = dir.path().join("crm-connect.service");
    let template = dir.path().join("crm-connect@.service");
    let instance = dir.path().join("crm-connect@acme.service");
    std::fs::write(&main, with_built_binary(MAIN)).unwrap();
    std::fs::write(&template, with_built_binary(TEMPLATE)).unwrap();
    std::fs::write(&instance, with_built_binary(TEMPLATE)).unwrap();

    let output = verify(&[&main, &template, &instance]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-analyze verify failed ({}):\n{stderr}", output.status);
    assert!(!stderr.contains("crm-connect"), "systemd-analyze verify warns about the units:\n{stderr}");

    // The check above means something only if verify reports such problems.
    let broken = dir.path().join("crm-connect-broken.service");
    std::fs::write(&broken, with_built_binary(MAIN).replace("[Service]\n", "[Service]\nNoSuchSetting=yes\n")).unwrap();
    let stderr = String::from_utf8_lossy(&verify(&[&broken]).stderr).into_owned();
    assert!(stderr.contains("crm-connect-broken.service") && stderr.contains("NoSuchSetting"), "{stderr}");
}

#[test]
fn both_units_keep_what_the_daemon_relies_on() {
    for (name, text) in [("crm-connect.service", MAIN), ("crm-connect@.service", TEMPLATE)] {
        let service = settings(text, "Service");
        let one = |key: &str| -> &str {
            let values: Vec<&str> = service.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v).collect();
            assert_eq!(values.len(), 1, "{name}: {key}= should be set once, found {values:?}");
            values[0]
        };
        let all = |key: &str| -> Vec<&str> { service.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v).collect() };

        assert_eq!(one("Type"), "notify", "{name}");
        assert!(one("ExecStart").starts_with(&format!("{INSTALLED} run")), "{name}: {}", one("ExecStart"));
        assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID", "{name}");
        assert_eq!(one("Restart"), "on-failure", "{name}");
        assert_eq!(one("RestartSec"), "5s", "{name}");
        assert!(one("RestartPreventExitStatus").split_whitespace().any(|s| s == "2"), "{name}: usage errors");
        assert_eq!(one("TimeoutStopSec"), "2min", "{name}");
        assert_eq!(one("WatchdogSec"), "30s", "{name}");
        let user = one("User");
        assert!(!user.is_empty() && user != "root", "{name}: User={user}");
        assert!(all("DynamicUser").iter().all(|v| *v == "no"), "{name}: a static user, not DynamicUser=");
        assert!(
            all("EnvironmentFile").contains(&"-/etc/crm-connect/environment"),
            "{name}: the database URL template comes from an optional root-only file"
        );
        for (key, value) in HARDENING {
            assert!(all(key).contains(value), "{name}: {key}={value} missing, found {:?}", all(key));
        }

        let credential_examples: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("#LoadCredential="))
            .filter(|l| l.contains(":/etc/crm-connect/credentials/"))
            .collect();
        assert!(!credential_examples.is_empty(), "{name}: no commented LoadCredential= example");

        let install = settings(text, "Install");
        assert!(install.contains(&("WantedBy", "multi-user.target")), "{name}: {install:?}");
    }

    let main = settings(MAIN, "Service");
    assert!(main.contains(&("Environment", "CRM_CONNECT_CONFIG=/etc/crm-connect/tenants")), "{main:?}");

    // One tenant file per instance, and no shared --listen port.
    let template = settings(TEMPLATE, "Service");
    let exec_start = template.iter().find(|(k, _)| *k == "ExecStart").unwrap().1;
    assert_eq!(exec_start, format!("{INSTALLED} run --config /etc/crm-connect/tenants/%i.toml"));
    assert!(
        !TEMPLATE.lines().any(|l| !l.starts_with('#') && (l.contains("--listen") || l.contains("CRM_CONNECT_LISTEN")))
    );
}

#[test]
fn the_sysusers_snippet_creates_the_user_the_units_run_as() {
    for text in [MAIN, TEMPLATE] {
        let service = settings(text, "Service");
        assert!(service.contains(&("User", "crm-connect")) && service.contains(&("Group", "crm-connect")));
    }
    assert!(
        TMPFILES
            .lines()
            .any(|l| l.starts_with("d ") && l.contains("/etc/crm-connect/tenants") && l.contains("crm-connect"))
    );

    if !systemd_tool("systemd-sysusers") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("crm-connect.conf");
    std::fs::write(&file, SYSUSERS).unwrap();
    let output = Command::new("systemd-sysusers")
        .arg("--dry-run")
        .arg(format!("--root={}", root.path().display()))
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-sysusers failed ({}):\n{stderr}", output.status);
    assert!(stderr.contains("Creating user 'crm-connect'"), "{stderr}");
    assert!(stderr.contains("Creating group 'crm-connect'"), "{stderr}");
}

/// True when the tool can run; false (the test returns early) when it is
/// missing and `CRM_CONNECT_SKIP_SYSTEMD=1`; a failure otherwise.
fn systemd_tool(name: &str) -> bool {
    match Command::new(name).arg("--version").output() {
        Ok(output) if output.status.success() => true,
        Ok(output) => panic!("`{name} --version` failed: {}", output.status),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if std::env::var("CRM_CONNECT_SKIP_SYSTEMD").as_deref() == Ok("1") {
                eprintln!("SKIPPED: {name} is not installed and CRM_CONNECT_SKIP_SYSTEMD=1");
                false
            } else {
                panic!(
                    "{name} is not installed: install the package `systemd` (apt-get install systemd), \
                     or set CRM_CONNECT_SKIP_SYSTEMD=1 to skip the unit file checks"
                )
            }
        }
        Err(e) => panic!("cannot run {name}: {e}"),
    }
}

fn verify(units: &[&Path]) -> Output {
    Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .args(units)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap()
}

/// The unit with its ExecStart= pointing at the binary Cargo built.
fn with_built_binary(unit: &str) -> String {
    let built = env!("CARGO_BIN_EXE_crm-connect");
    assert!(unit.contains(&format!("\nExecStart={INSTALLED} ")), "ExecStart= does not run {INSTALLED}");
    // Quoted for spaces; "%" starts a specifier in unit files.
    unit.replace(&format!("\nExecStart={INSTALLED} "), &format!("\nExecStart=\"{}\" ", built.replace('%', "%%")))
}

/// The `key=value` settings of one section, comments left out.
fn settings<'a>(unit: &'a str, section: &str) -> Vec<(&'a str, &'a str)> {
    let mut current = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name;
        } else if current == section
            && let Some((key, value)) = line.split_once('=')
        {
            out.push((key.trim(), value.trim()));
        }
    }
    out
}
