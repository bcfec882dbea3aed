//! `crm-connect completions SHELL`: the tab-completion script, generated
//! from the command line's own definition so it never falls behind it.

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{Cli, CompletionsArgs};

pub fn run(args: &CompletionsArgs) -> ExitCode {
    let script = script(args.shell);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(script.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crm-connect: cannot write the completion script: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The script for `shell`. Rendered into memory first: clap_complete panics
/// on a failed write, and stdout may be a closed pipe.
fn script(shell: Shell) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "crm-connect", &mut script);
    let script = String::from_utf8_lossy(&script).into_owned();
    match shell {
        // clap_complete spells a hyphenated binary's subcommand states two
        // ways in bash (upstream clap issue 6421): the loop that finds the
        // subcommand arrives at `crm__connect__subcmd__sync`, the arms that
        // complete it are labelled `crm__subcmd__connect__subcmd__sync`, so
        // nothing after a subcommand would complete. Spell the arms as the
        // loop does; once fixed upstream there is nothing left to replace.
        Shell::Bash => script.replace("crm__subcmd__connect", "crm__connect"),
        _ => script,
    }
}
