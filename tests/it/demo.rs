//! `crm-connect demo`: the quick start runs both demo tenants to
//! `connected` and leaves nothing behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::crm_connect;

/// The paths the demo's banner names (its cluster and its tenant files).
fn printed_dirs(stdout: &str) -> Vec<PathBuf> {
    stdout
        .split_whitespace()
        .map(|word| word.trim_end_matches(')'))
        .filter(|word| {
            Path::new(word)
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("crm-connect-pg-") || name.starts_with("crm-connect-demo-"))
        })
        .map(PathBuf::from)
        .collect()
}

/// Processes whose command line mentions `needle` (the cluster directory
/// is on every server process's command line).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|entry| {
            let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then(|| format!("{}: {cmdline}", entry.file_name().to_string_lossy()))
        })
        .collect()
}

#[tokio::test]
async fn demo_once_prints_both_tenants_connected() {
    let run = tokio::time::timeout(Duration::from_secs(60), crm_connect(&["demo", "--once"], &[]))
        .await
        .expect("demo --once finishes within a minute");
    assert_eq!(run.code, 0, "{}", run.output());

    for tenant in ["demo_amo", "demo_b24"] {
        let line = run.stdout.lines().find(|line| line.starts_with(tenant));
        let line = line.unwrap_or_else(|| panic!("no status line for {tenant}:\n{}", run.output()));
        assert_eq!(line.split_whitespace().nth(2), Some("connected"), "{line}\n{}", run.output());
    }

    let dirs = printed_dirs(&run.stdout);
    let cluster = dirs.iter().find(|dir| dir.to_string_lossy().contains("crm-connect-pg-"));
    let config = dirs.iter().find(|dir| dir.to_string_lossy().contains("crm-connect-demo-"));
    let (Some(cluster), Some(config)) = (cluster, config) else {
        panic!("the banner names the cluster and the tenant files:\n{}", run.stdout);
    };
    for dir in [cluster, config] {
        assert!(!dir.exists(), "{} is still there", dir.display());
    }
    let left = processes_mentioning(&cluster.to_string_lossy());
    assert!(left.is_empty(), "processes of the demo cluster still run: {left:#?}");
    assert!(!run.output().contains("sandbox-client-secret"), "{}", run.output());
}
