//! An in-process daemon for tests, and waiting on observable conditions.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use crm_connect::cli::Cli;
use crm_connect::daemon::{self, Hooks};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::fast_context;

/// A daemon running in this process with quick CRM retries, until stopped.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<ExitCode>,
}

impl Running {
    /// `crm-connect run --config DIR`, once its first pass is done.
    pub async fn start(dir: &Path) -> Running {
        Running::start_with(&[], dir).await
    }

    /// The same with extra daemon flags (e.g. `--lease 3s`).
    pub async fn start_with(flags: &[&str], dir: &Path) -> Running {
        let mut args = vec!["crm-connect", "run", "--config", dir.to_str().unwrap()];
        args.extend_from_slice(flags);
        let cli = Cli::try_parse_from(args).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (first_tx, first_pass) = oneshot::channel();
        let hooks = Hooks { first_pass: Some(first_tx), context: Some(fast_context()) };
        let handle = tokio::spawn(daemon::run(cli.global, hooks, async move {
            let _ = stopped.await;
        }));
        tokio::time::timeout(Duration::from_secs(30), first_pass).await.expect("first pass in time").unwrap();
        Running { stop: Some(stop), handle }
    }

    /// Still running (it did not give up or panic).
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    pub async fn stop(mut self) -> ExitCode {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut self.handle).await.expect("stops within 10 s").unwrap()
    }
}

/// Waits until `check` holds, polling an observable condition.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
