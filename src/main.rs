use std::process::ExitCode;

use clap::Parser;
use crm_connect::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    crm_connect::logging::init(cli.global.log_format);
    // One thread: the work waits on databases and CRMs, and an idle poll's
    // wakeups stay on one core instead of being handed between workers
    // (which doubled the idle CPU of 500 polling tenants). Reading files
    // runs on the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("crm-connect: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(crm_connect::run(cli))
}
