//! The machine and the processes on it: building the binary, what `/proc`
//! says about the daemon, the load average.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// A progress line on stderr, with the time of day.
pub fn log(message: &str) {
    eprintln!("[bench {}] {message}", chrono::Local::now().format("%H:%M:%S"));
}

/// Runs `cargo build --release --bin crm-connect` (the `cargo` that runs
/// this example, when there is one) and returns the binary it produced.
pub fn build_release_binary(crate_dir: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // What `cargo run` set for this example would differ from a plain
    // `cargo build` and make build scripts (ring's) run again each time.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key == "OUT_DIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST_")
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE"].contains(&key.as_ref())
        {
            command.env_remove(key.as_ref());
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        let target = crate_dir.join("target");
        let kept: Vec<PathBuf> = std::env::split_paths(&paths)
            .filter(|p| !p.starts_with(&target) && !p.to_string_lossy().contains("/toolchains/"))
            .collect();
        match std::env::join_paths(&kept) {
            Ok(joined) if !kept.is_empty() => command.env("LD_LIBRARY_PATH", joined),
            _ => command.env_remove("LD_LIBRARY_PATH"),
        };
    }
    let output = command
        .args(["build", "--release", "--bin", "crm-connect", "--message-format=json-render-diagnostics"])
        .current_dir(crate_dir)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo build")?;
    if !output.status.success() {
        bail!("cargo build --release --bin crm-connect failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let executable = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact" && message["target"]["name"] == "crm-connect")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from));
    let binary = executable.context("cargo build named no crm-connect executable")?;
    anyhow::ensure!(binary.is_file(), "{} is missing after the build", binary.display());
    Ok(binary)
}

/// The commit the binary was built from, noting uncommitted changes to
/// what goes into it.
pub fn revision(crate_dir: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate_dir)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else { return "unknown".to_owned() };
    let dirty = git(&["status", "--porcelain", "--", "src", "migrations", "build.rs", "Cargo.toml", "Cargo.lock"])
        .is_some_and(|status| !status.is_empty());
    if dirty { format!("commit {commit} with uncommitted changes") } else { format!("commit {commit}") }
}

/// What the results were measured on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub ram_mib: u64,
    pub kernel: String,
    pub rustc: String,
    pub postgres: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, v)| v.trim()))
        .unwrap_or("unknown")
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let ram_kib = field_kib(&meminfo, "MemTotal:").unwrap_or(0);
    let nproc = command_output("nproc", &[])
        .and_then(|text| text.trim().parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(0);
    Machine {
        nproc,
        cpu_model,
        ram_mib: ram_kib / 1024,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        rustc: command_output("rustc", &["--version"]).unwrap_or_default().trim().to_owned(),
        postgres: String::new(),
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// 1, 5 and 15 minutes.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(f64::NAN));
    [(); 3].map(|()| fields.next().unwrap_or(f64::NAN))
}

/// Waits until the 1-minute load average is under `max`, for at most `limit`.
pub async fn wait_for_low_load(max: f64, limit: Duration) {
    let started = Instant::now();
    let mut said = false;
    while load_average()[0] >= max && started.elapsed() < limit {
        if !said {
            log(&format!("waiting for the load average ({:.2}) to drop below {max}", load_average()[0]));
            said = true;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if load_average()[0] >= max {
        log(&format!("the load average is still {:.2}; measuring anyway", load_average()[0]));
    }
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(name)).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    field_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmHWM:")
}

/// Resident set size now (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    field_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmRSS:")
}

pub fn threads(pid: u32) -> Option<u64> {
    field_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "Threads:")
}

pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Fields after the command name of `/proc/<pid>/stat` (field 3 first).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// CPU of the PostgreSQL servers whose postmasters are `postmasters`, in
/// clock ticks: theirs, their exited children's, and their live children's.
pub fn postgres_cpu_ticks(postmasters: &[u32]) -> u64 {
    let mut ticks = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Some(fields) = stat_fields(pid) else { continue };
        // fields[1] is the parent (field 4); 11..=14 utime, stime, cutime, cstime.
        let own = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        if postmasters.iter().any(|p| p.to_string() == pid) {
            ticks += own + fields.get(13).copied().unwrap_or(0) + fields.get(14).copied().unwrap_or(0);
        } else if fields.get(1).is_some_and(|parent| postmasters.iter().any(|p| u64::from(*p) == *parent)) {
            ticks += own;
        }
    }
    ticks
}

/// This process's own CPU, in clock ticks.
pub fn own_cpu_ticks() -> u64 {
    stat_fields("self").map_or(0, |f| f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
}

/// All CPUs' busy and total time from `/proc/stat`, in clock ticks.
pub fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return (0, 0) };
    let values: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks_per_sec() -> u64 {
    command_output("getconf", &["CLK_TCK"]).and_then(|text| text.trim().parse().ok()).unwrap_or(100)
}

/// The value at quantile `q` (0..=1) of `values` (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}
