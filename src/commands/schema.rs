//! `crm-connect schema`: the JSON Schema of a tenant file on stdout, for an
//! editor's `#:schema` line or a CI check.

use std::process::ExitCode;

pub fn run() -> ExitCode {
    match crate::config::json_schema() {
        Ok(schema) => {
            print!("{schema}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crm-connect: cannot render the schema: {e}");
            ExitCode::FAILURE
        }
    }
}
