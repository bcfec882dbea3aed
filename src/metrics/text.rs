//! The classic Prometheus text format (0.0.4), for scrapers and tools that
//! do not read OpenMetrics (`promtool check metrics` among them). It is
//! written from the OpenMetrics text: the two differ only in the name a
//! counter family goes by (OpenMetrics names it without `_total`, the
//! classic format with it, as its samples are named), in the `unknown`
//! type (`untyped`), and in `# UNIT` and `# EOF`, which the classic format
//! does not have.

use std::collections::HashSet;

pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for the classic format: it names
/// `text/plain` and not OpenMetrics. Prometheus asks for both, OpenMetrics
/// preferred; a client that asks for anything gets OpenMetrics.
pub fn wants_classic_text(accept: &str) -> bool {
    let accept = accept.to_ascii_lowercase();
    accept.contains("text/plain") && !accept.contains("application/openmetrics-text")
}

pub(super) fn classic(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let tail = if prefix == "# TYPE " && tail == "unknown" { "untyped" } else { tail };
            let suffix = if counters.contains(name) { "_total" } else { "" };
            Some(format!("{prefix}{name}{suffix} {tail}"))
        });
        match descriptor {
            Some(rewritten) => text.push_str(&rewritten),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_families_take_their_samples_name_and_the_openmetrics_markers_go() {
        let openmetrics = "# HELP crm_connect_jobs Tenant work finished, by kind.\n\
                           # TYPE crm_connect_jobs counter\n\
                           crm_connect_jobs_total{work=\"reconcile\"} 1\n\
                           # HELP crm_connect_tenants Tenants by connection state.\n\
                           # TYPE crm_connect_tenants gauge\n\
                           crm_connect_tenants{state=\"connected\"} 2\n\
                           # HELP odd Something.\n\
                           # TYPE odd unknown\n\
                           # UNIT odd seconds\n\
                           odd 1\n\
                           # EOF\n";
        let expected = "# HELP crm_connect_jobs_total Tenant work finished, by kind.\n\
                        # TYPE crm_connect_jobs_total counter\n\
                        crm_connect_jobs_total{work=\"reconcile\"} 1\n\
                        # HELP crm_connect_tenants Tenants by connection state.\n\
                        # TYPE crm_connect_tenants gauge\n\
                        crm_connect_tenants{state=\"connected\"} 2\n\
                        # HELP odd Something.\n\
                        # TYPE odd untyped\n\
                        odd 1\n";
        assert_eq!(classic(openmetrics), expected);
    }

    #[test]
    fn the_classic_format_is_given_only_to_who_asks_for_it_alone() {
        let table = [
            ("text/plain; version=0.0.4", true),
            ("text/plain;version=0.0.4;q=0.5,*/*;q=0.1", true),
            ("TEXT/PLAIN", true),
            (
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                 text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                false,
            ),
            ("*/*", false),
            ("", false),
            ("application/openmetrics-text; version=1.0.0", false),
        ];
        for (accept, classic) in table {
            assert_eq!(wants_classic_text(accept), classic, "{accept:?}");
        }
    }
}
