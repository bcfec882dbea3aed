//! `crm-connect validate`: every problem of every file, as text lines, a JSON
//! array, or GitHub Actions annotations. The exit code is the same whatever
//! the format.

use std::process::ExitCode;

use serde::Serialize;

use crate::cli::{GlobalArgs, ValidateArgs, ValidateFormat};
use crate::config::{self, Loaded, Problem, Severity};

pub fn run(global: &GlobalArgs, args: &ValidateArgs) -> ExitCode {
    let loaded = config::load(&global.config, &config::LoadOptions::new(global.database_url_template.clone()));
    let summary = summary(&loaded);
    match args.format {
        ValidateFormat::Text => {
            for problem in loaded.all_problems() {
                println!("{problem}");
            }
            println!("{summary}");
        }
        // stdout carries the format alone, so that a reader of it need not
        // skip anything; the summary goes to stderr, which CI logs show too.
        ValidateFormat::Json => {
            println!("{}", json(loaded.all_problems()));
            eprintln!("{summary}");
        }
        ValidateFormat::Github => {
            for problem in loaded.all_problems() {
                println!("{}", github(problem));
            }
            eprintln!("{summary}");
        }
    }
    if loaded.is_valid() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn summary(loaded: &Loaded) -> String {
    let count = |severity| loaded.all_problems().filter(|p: &&Problem| p.severity == severity).count();
    let invalid = loaded.files.iter().filter(|f| f.tenant.is_none()).count();
    format!(
        "{} file(s), {} valid, {} invalid: {} error(s), {} warning(s)",
        loaded.files.len(),
        loaded.files.len() - invalid,
        invalid,
        count(Severity::Error),
        count(Severity::Warning)
    )
}

/// One element of `--format json`: every field always present, `null` when
/// the problem has no position or key.
#[derive(Serialize)]
struct JsonProblem<'a> {
    file: String,
    line: Option<usize>,
    column: Option<usize>,
    severity: &'static str,
    key: Option<&'a str>,
    message: &'a str,
}

fn json<'a>(problems: impl Iterator<Item = &'a Problem>) -> String {
    let list: Vec<JsonProblem> = problems
        .map(|p| JsonProblem {
            file: p.file.display().to_string(),
            line: p.position.map(|(line, _)| line),
            column: p.position.map(|(_, column)| column),
            severity: p.severity.as_str(),
            key: p.key.as_deref(),
            message: &p.message,
        })
        .collect();
    serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into())
}

/// A workflow command: `::error file=F,line=L,col=C::message`, which GitHub
/// Actions shows on that line of the pull request.
fn github(problem: &Problem) -> String {
    let mut properties = format!("file={}", escape_property(&problem.file.display().to_string()));
    if let Some((line, column)) = problem.position {
        properties.push_str(&format!(",line={line},col={column}"));
    }
    format!("::{} {properties}::{}", problem.severity.as_str(), escape_data(&problem.message))
}

/// A command's message may not hold a line break, and `%` starts an escape.
fn escape_data(text: &str) -> String {
    text.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
}

/// A property's value may not hold the separators of properties either.
fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn problem(severity: Severity, file: &str, position: Option<(usize, usize)>, message: &str) -> Problem {
        Problem { severity, file: PathBuf::from(file), position, key: None, message: message.into() }
    }

    #[test]
    fn annotations_escape_what_the_command_syntax_reserves() {
        let cases = [
            (
                problem(Severity::Error, "tenants/acme.toml", Some((4, 1)), "unknown key `amocrm.clinet_id`"),
                "::error file=tenants/acme.toml,line=4,col=1::unknown key `amocrm.clinet_id`",
            ),
            (
                problem(Severity::Warning, "a,b:c%.toml", None, "50% done\r\nnext: line, end"),
                "::warning file=a%2Cb%3Ac%25.toml::50%25 done%0D%0Anext: line, end",
            ),
        ];
        for (problem, expected) in cases {
            assert_eq!(github(&problem), expected);
        }
    }

    #[test]
    fn no_problems_is_an_empty_json_array() {
        assert_eq!(json(std::iter::empty()), "[]");
    }
}
