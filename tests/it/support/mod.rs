pub mod postgres;

use std::path::Path;
use std::process::Stdio;

use tokio_postgres::{Client, NoTls};

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Everything the run printed, for assertions that something never appears.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the `crm-connect` binary with `args`, in an environment without
/// inherited `CRM_CONNECT_*` settings, plus `env`.
pub async fn crm_connect(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_crm-connect"));
    for (key, _) in std::env::vars() {
        if key.starts_with("CRM_CONNECT_") || key == "RUST_LOG" || key == "CREDENTIALS_DIRECTORY" {
            command.env_remove(key);
        }
    }
    let output = command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the crm-connect binary runs");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.expect("the test database accepts connections");
    tokio::spawn(connection);
    client
}

/// Writes a tenant file (or any file) into `dir`.
pub fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("the test can write its files");
    path
}
