//! What operators watch the daemon with: a live `/metrics` scrape checked by
//! `promtool check metrics` and holding every series the alerts need, with
//! the values the tenant database holds; the alert rules checked and
//! unit-tested by promtool; the Grafana dashboard and the rules naming only
//! metrics the daemon exports, with the labels it gives them.
//!
//! promtool comes from Debian's `prometheus` package. Without it these
//! checks are skipped, loudly, unless `CI` is set: then its absence fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::AsyncWriteExt;

use crate::support::daemon::{Running, eventually};
use crate::support::rows::TokensRow;
use crate::support::world::World;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prometheus/crm-connect.rules.yml");
const RULE_TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prometheus/crm-connect.rules.test.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/grafana/crm-connect.json");

/// The classic text format, as `promtool check metrics` reads it.
const CLASSIC: &str = "text/plain; version=0.0.4";

#[tokio::test]
async fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let checked = run(&promtool, &["check", "rules", RULES], None).await;
    assert!(checked.ok && checked.output.contains("SUCCESS: 6 rules found"), "{checked:?}");
    let tested = run(&promtool, &["test", "rules", RULE_TESTS], None).await;
    assert!(tested.ok && tested.output.contains("SUCCESS"), "{tested:?}");
}

#[tokio::test]
async fn every_dashboard_query_is_valid_promql() {
    let Some(promtool) = promtool() else { return };
    // Each query as a recording rule, Grafana's variables filled in the way
    // Grafana fills them: promtool parses every expression.
    let queries = dashboard_queries(&dashboard());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let promql = query.replace("$__rate_interval", "2m").replace("$instance", ".*").replace("$tenant", ".*");
        let quoted = serde_json::to_string(&promql).unwrap();
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: {quoted}\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, rules).unwrap();
    let checked = run(&promtool, &["check", "rules", path.to_str().unwrap()], None).await;
    let found = format!("SUCCESS: {} rules found", queries.len());
    assert!(checked.ok && checked.output.contains(&found), "{checked:?}");
}

#[test]
fn the_dashboard_is_an_importable_grafana_dashboard() {
    let dashboard = dashboard();
    assert_eq!(dashboard["schemaVersion"], 39);
    assert_eq!(dashboard["uid"], "crm-connect");
    let variables = dashboard["templating"]["list"].as_array().expect("template variables");
    let variable = |name: &str| variables.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name}"));
    assert_eq!(
        (&variable("datasource")["type"], &variable("datasource")["query"]),
        (&"datasource".into(), &"prometheus".into())
    );
    assert_eq!(variable("tenant")["type"], "query");
    assert_eq!(variable("tenant")["includeAll"], true);

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(panel["id"].as_u64().expect("a numeric id")), "id of {title:?} used twice");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24 && grid["h"].as_u64().unwrap() > 0, "{title:?} is off the grid: {grid}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title:?}");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title:?} has no queries"));
        let mut refs = BTreeSet::new();
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title:?}");
            assert!(refs.insert(target["refId"].as_str().unwrap()), "{title:?}: refId used twice");
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{title:?}: a query without expr"));
            assert!(!metric_names(expr).is_empty(), "{title:?}: {expr:?} names no crm-connect metric");
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Tenants by state",
        "Token expiry horizon",
        "Token refreshes by result",
        "Stage sync age",
        "CRM requests by status",
        "Rate-limit waits",
        "PostgreSQL connections in use vs budget",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?} in {titles:?}");
    }
}

#[tokio::test]
async fn a_live_scrape_passes_promtool_and_holds_what_the_alerts_and_the_dashboard_use() {
    let world = World::both().await;
    // A margin longer than the sandbox's one-day tokens: refreshed at half the lifetime.
    world
        .write(&world.file_with_code().schedule("token_refresh_margin", "2d").schedule("stage_resync", "*/10 * * * *"));
    let listen = free_address();
    let daemon = Running::start_with(&["--listen", &listen, "--lease", "30s"], world.dir()).await;

    let (content_type, text) = scrape(&listen, CLASSIC).await;
    assert!(content_type.starts_with(CLASSIC), "{content_type}");
    assert!(!text.contains("# EOF"), "{text}");
    let series = samples(&text);
    let client = world.client().await;
    let expires_at = TokensRow::read(&client).await.expires_at.expect("a stored token");
    let synced = stages_synced_at(&client).await;
    let server = server_of(&world.db.url);
    let expected = [
        ("crm_connect_tenant_state{tenant=\"acme\",state=\"connected\"}".to_string(), 1.0),
        ("crm_connect_tenant_state{tenant=\"acme\",state=\"error\"}".into(), 0.0),
        ("crm_connect_tenants{state=\"connected\"}".into(), 1.0),
        ("crm_connect_lease_held{tenant=\"acme\"}".into(), 1.0),
        ("crm_connect_token_expiry_timestamp_seconds{tenant=\"acme\"}".into(), seconds(expires_at)),
        ("crm_connect_stage_sync_interval_seconds{tenant=\"acme\",crm=\"amocrm\"}".into(), 600.0),
        ("crm_connect_stage_sync_interval_seconds{tenant=\"acme\",crm=\"bitrix24\"}".into(), 600.0),
        (
            "crm_connect_last_stage_sync_timestamp_seconds{tenant=\"acme\",crm=\"amocrm\"}".into(),
            seconds(synced["amocrm"]),
        ),
        (
            "crm_connect_last_stage_sync_timestamp_seconds{tenant=\"acme\",crm=\"bitrix24\"}".into(),
            seconds(synced["bitrix24"]),
        ),
        (format!("crm_connect_db_connection_budget{{server=\"{server}\"}}"), 10.0),
        (format!("crm_connect_db_connection_waiters{{server=\"{server}\"}}"), 0.0),
        ("crm_connect_rate_limit_waits_total{crm=\"bitrix24\",limit=\"method_pause\"}".into(), 0.0),
    ];
    for (name, value) in expected {
        assert_eq!(series.get(&name), Some(&value), "{name} in\n{text}");
    }
    assert!(series.contains_key(&format!("crm_connect_db_connections{{server=\"{server}\"}}")), "{text}");
    // Half the token's lifetime (a day, as the sandbox issues them), give or
    // take the moment the daemon heard of it.
    let margin = series.get("crm_connect_token_refresh_margin_seconds{tenant=\"acme\"}").copied();
    assert!(margin.is_some_and(|m| (m - 43_200.0).abs() < 5.0), "{margin:?} in\n{text}");

    if let Some(promtool) = promtool() {
        let checked = run(&promtool, &["check", "metrics"], Some(&text)).await;
        assert!(checked.ok && checked.output.trim().is_empty(), "{checked:?}\n{text}");
    }

    // The names a query can use: every sample's name, `_total`, `_bucket` and all.
    let exported: BTreeSet<String> = series.keys().map(|s| s.split('{').next().unwrap().to_string()).collect();
    let labels = label_names(&series);
    let dashboard_names: BTreeSet<String> =
        dashboard_queries(&dashboard()).iter().flat_map(|q| metric_names(q)).collect();
    let rules_names = metric_names(&std::fs::read_to_string(RULES).unwrap());
    for name in dashboard_names.iter().chain(&rules_names) {
        assert!(exported.contains(name), "{name} is not exported; the daemon exports {exported:#?}");
    }
    // The rules' unit tests feed series the daemon really exports, labelled as it labels them.
    for (name, keys) in test_series(&std::fs::read_to_string(RULE_TESTS).unwrap()) {
        assert_eq!(labels.get(&name), Some(&keys), "the unit tests' {name} is not the daemon's");
    }

    // The OpenMetrics text Prometheus asks for holds the same series.
    let (content_type, openmetrics) = scrape(&listen, "application/openmetrics-text;version=1.0.0,*/*;q=0.1").await;
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("\ncrm_connect_lease_held{tenant=\"acme\"} 1\n"), "{openmetrics}");

    // A removed tenant takes its series along.
    std::fs::remove_file(world.dir().join("acme.toml")).unwrap();
    eventually("the removed tenant's series are gone", Duration::from_secs(10), || async {
        !scrape(&listen, CLASSIC).await.1.contains("tenant=\"acme\"")
    })
    .await;
    assert_eq!(daemon.stop().await, ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_standby_says_so_and_shows_no_stale_view_of_the_tenants_work() {
    let world = World::amocrm().await;
    world.write(&world.file_with_code());
    let (first, second) = (free_address(), free_address());
    let holder = Running::start_with(&["--listen", &first, "--lease", "3s"], world.dir()).await;
    let standby = Running::start_with(&["--listen", &second, "--lease", "3s"], world.dir()).await;

    let held = samples(&scrape(&first, CLASSIC).await.1);
    let (_, text) = scrape(&second, CLASSIC).await;
    let waiting = samples(&text);
    assert_eq!(held.get("crm_connect_lease_held{tenant=\"acme\"}"), Some(&1.0));
    assert_eq!(waiting.get("crm_connect_lease_held{tenant=\"acme\"}"), Some(&0.0), "{text}");
    assert_eq!(waiting.get("crm_connect_tenant_state{tenant=\"acme\",state=\"standby\"}"), Some(&1.0), "{text}");
    assert_eq!(waiting.get("crm_connect_tenants{state=\"standby\"}"), Some(&1.0), "{text}");
    assert!(held.contains_key("crm_connect_token_expiry_timestamp_seconds{tenant=\"acme\"}"));
    assert!(!text.contains("crm_connect_token_expiry_timestamp_seconds{"), "{text}");
    assert!(!text.contains("crm_connect_last_stage_sync_timestamp_seconds{"), "{text}");

    assert_eq!(holder.stop().await, ExitCode::SUCCESS);
    eventually("the standby took over and reports it", Duration::from_secs(15), || async {
        let now = samples(&scrape(&second, CLASSIC).await.1);
        now.get("crm_connect_tenant_state{tenant=\"acme\",state=\"connected\"}") == Some(&1.0)
            && now.get("crm_connect_lease_held{tenant=\"acme\"}") == Some(&1.0)
            && now.contains_key("crm_connect_token_expiry_timestamp_seconds{tenant=\"acme\"}")
    })
    .await;
    assert_eq!(standby.stop().await, ExitCode::SUCCESS);
}

/// promtool from PATH; without it, `None` and a loud note — unless `CI` is
/// set, where its absence fails the test.
fn promtool() -> Option<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&paths).map(|dir| dir.join("promtool")).find(|p| p.is_file());
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing: install Debian's `prometheus` package");
        eprintln!("\n*** SKIPPED the promtool checks: promtool is not installed (Debian package `prometheus`) ***\n");
    }
    found
}

#[derive(Debug)]
struct Ran {
    ok: bool,
    output: String,
}

async fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Ran {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool runs");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await.unwrap();
    }
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("promtool ends within a minute")
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Ran { ok: output.status.success(), output: text }
}

fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

/// `/metrics` asked for with `accept`: its content type and text.
async fn scrape(listen: &str, accept: &str) -> (String, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{listen}/metrics"))
        .header(reqwest::header::ACCEPT, accept)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE].to_str().unwrap().to_string();
    (content_type, response.text().await.unwrap())
}

/// Every sample of an exposition: series (name and labels, as written) → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            (series.to_string(), value.parse().unwrap_or_else(|_| panic!("not a number: {line}")))
        })
        .collect()
}

/// Each metric's label names, as its samples carry them.
fn label_names(series: &BTreeMap<String, f64>) -> BTreeMap<String, BTreeSet<String>> {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in series.keys() {
        let (name, labels) = s.split_once('{').unwrap_or((s, ""));
        names.entry(name.to_string()).or_default().extend(label_keys(labels));
    }
    names
}

/// `a="x",b="y"}` → {a, b}; the tests' and the daemon's label values hold no `=`.
fn label_keys(labels: &str) -> BTreeSet<String> {
    labels
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, _)| key.trim().to_string())
        .filter(|key| !key.is_empty())
        .collect()
}

/// The crm-connect series the rules' unit tests feed, with their label
/// names less the ones Prometheus adds (`job`, `instance`).
fn test_series(tests: &str) -> Vec<(String, BTreeSet<String>)> {
    tests
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- series: '")?.strip_suffix('\''))
        .filter(|series| series.starts_with("crm_connect_"))
        .map(|series| {
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let mut keys = label_keys(labels);
            keys.remove("job");
            keys.remove("instance");
            (name.to_string(), keys)
        })
        .collect()
}

/// The `crm_connect_*` metric names a text (PromQL, YAML) names.
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("crm_connect_") {
        if text[..at].chars().next_back().is_some_and(is_name_char) {
            continue;
        }
        let name: String = text[at..].chars().take_while(|c| is_name_char(*c)).collect();
        names.insert(name);
    }
    names
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).expect("the dashboard is JSON")
}

/// Every PromQL query of the dashboard: the panels' and the variables'.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let panels = dashboard["panels"].as_array().into_iter().flatten();
    let targets = panels.flat_map(|p| p["targets"].as_array().into_iter().flatten());
    let mut queries: Vec<String> = targets.filter_map(|t| t["expr"].as_str()).map(String::from).collect();
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(query) = variable["query"]["query"].as_str() {
            // `label_values(metric{…}, label)` is Grafana's, not PromQL: its series selector is.
            let selector = query.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')).map(|(s, _)| s);
            queries.push(selector.unwrap_or(query).to_string());
        }
    }
    assert!(queries.len() > 10, "{queries:?}");
    queries
}

async fn stages_synced_at(client: &tokio_postgres::Client) -> BTreeMap<String, DateTime<Utc>> {
    let rows = client.query("SELECT crm, stages_synced_at FROM crm_connect_status", &[]).await.unwrap();
    rows.iter().map(|r| (r.get(0), r.get::<_, Option<DateTime<Utc>>>(1).expect("stages synced"))).collect()
}

fn seconds(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

/// `host:port` of a database URL, as the daemon names the server.
fn server_of(url: &str) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    format!("{host}:{}", config.get_ports().first().copied().unwrap_or(5432))
}
