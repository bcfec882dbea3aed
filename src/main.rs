use std::process::ExitCode;

use clap::Parser;
use crm_connect::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    crm_connect::logging::init(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("crm-connect: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(crm_connect::run(cli))
}
