//! `crm-connect man DIR`: the manual pages, generated from the command
//! line's own definition, so they never fall behind it.

use std::process::ExitCode;

use clap::CommandFactory;

use crate::cli::{Cli, ManArgs};

pub fn run(args: &ManArgs) -> ExitCode {
    let written = std::fs::create_dir_all(&args.dir).and_then(|()| clap_mangen::generate_to(Cli::command(), &args.dir));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crm-connect: cannot write the manual pages into {}: {e}", args.dir.display());
            ExitCode::FAILURE
        }
    }
}
