//! `config::parse_file` on arbitrary text: never panics; a report without
//! errors carries a tenant; every problem is reported against the file.

#![no_main]

use std::path::Path;

use crm_connect::config::{LoadOptions, parse_file};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "fuzz.toml";

fn check(text: &str) {
    let report = parse_file(Path::new(FILE), text, &LoadOptions::default());
    if !report.problems.iter().any(|p| p.is_error()) {
        assert!(report.tenant.is_some(), "no error problems but no tenant: {:?}", report.problems);
    }
    for problem in &report.problems {
        let line = problem.to_string();
        assert!(line.starts_with(FILE), "problem not reported against {FILE}: {line:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    } else {
        check(&String::from_utf8_lossy(data));
    }
});
