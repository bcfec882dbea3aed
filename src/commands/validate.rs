//! `crm-connect validate`: every problem of every file, one per line.

use std::process::ExitCode;

use crate::cli::GlobalArgs;
use crate::config::{self, Problem, Severity};

pub fn run(global: &GlobalArgs) -> ExitCode {
    let loaded = config::load(&global.config, &config::LoadOptions::new(global.database_url_template.clone()));
    for problem in loaded.all_problems() {
        println!("{problem}");
    }
    let count = |severity| loaded.all_problems().filter(|p: &&Problem| p.severity == severity).count();
    let invalid = loaded.files.iter().filter(|f| f.tenant.is_none()).count();
    println!(
        "{} file(s), {} valid, {} invalid: {} error(s), {} warning(s)",
        loaded.files.len(),
        loaded.files.len() - invalid,
        invalid,
        count(Severity::Error),
        count(Severity::Warning)
    );
    if loaded.is_valid() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
