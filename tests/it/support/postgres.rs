//! A PostgreSQL database of its own for every integration test.
//!
//! The server is either the one named by `CRM_CONNECT_TEST_DATABASE_URL` (an
//! admin URL; test databases are created on it) or a throwaway cluster that
//! this test process starts on first use and that dies together with it.
//!
//! The throwaway cluster:
//! - lives in `<tmp>/crm-connect-test-pg-<pid>-<random>`; directories left
//!   behind by test processes that are gone are removed at start;
//! - listens on 127.0.0.1 on a free port and on a unix socket in that directory;
//! - runs as the `postgres` system user when the tests run as root, because
//!   PostgreSQL refuses to run as root;
//! - is started by `setpriv --pdeathsig INT`, so it gets a fast-shutdown signal
//!   as soon as the test process ends (test binaries never run static
//!   destructors, so nothing else would stop it).

use std::fs::{self, DirBuilder, File};
use std::hash::{BuildHasher, RandomState};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{self, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::NoTls;

const URL_VAR: &str = "CRM_CONNECT_TEST_DATABASE_URL";
const DIR_PREFIX: &str = "crm-connect-test-pg-";
const SERVER_USER: &str = "postgres";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 40;

/// A database of its own for one test.
pub struct TestDatabase {
    pub url: String,
    pub name: String,
}

/// Creates a fresh, empty database; the cluster is started on first use.
pub async fn fresh_database() -> TestDatabase {
    static NEXT: AtomicU64 = AtomicU64::new(0);

    let server = server();
    let name =
        format!("crm_connect_test_{}_{}_{:08x}", process::id(), NEXT.fetch_add(1, Ordering::Relaxed), random() as u32,);
    let (client, connection) = tokio_postgres::connect(&server.admin_url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", server.origin));
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name} on {}: {e}", server.origin));
    drop(client);
    let _ = connection.await;

    TestDatabase { url: with_database(&server.admin_url, &name), name }
}

/// The URL of the server's `postgres` maintenance database (for tests that need an admin connection).
pub async fn admin_url() -> String {
    server().admin_url.clone()
}

struct Server {
    admin_url: String,
    /// Where the server comes from, for error messages (never holds a password).
    origin: String,
}

/// The server of this test process. Starting it is synchronous so that it does
/// not belong to the runtime of whichever test happens to come first; a failed
/// start is remembered, so every test reports it without trying again.
fn server() -> &'static Server {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    let server = SERVER.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => external_server(url.trim()),
        _ => start_cluster(),
    });
    match server {
        Ok(server) => server,
        Err(e) => panic!("no PostgreSQL server for the tests: {e}"),
    }
}

fn external_server(url: &str) -> Result<Server, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!("{URL_VAR} must be a postgres:// or postgresql:// URL"));
    }
    Ok(Server { admin_url: url.to_owned(), origin: format!("the server named by {URL_VAR}") })
}

/// `url` with its database (the URL path) replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..].find('/').map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{name}", &base[..path]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

fn start_cluster() -> Result<Server, String> {
    let bindir = find_bindir()?;
    let as_root = running_as_root();
    if as_root && !user_exists(SERVER_USER) {
        return Err(format!(
            "running as root, so the server has to run as the `{SERVER_USER}` system user, \
             which does not exist (create it, or set {URL_VAR})"
        ));
    }

    // Under root the directory must be reachable by the server user, whatever
    // TMPDIR says; the server is given absolute paths in any case.
    let tmp = std::env::temp_dir();
    let base = if as_root || !tmp.is_absolute() { PathBuf::from("/tmp") } else { tmp };
    remove_stale_dirs(&base);
    let dir = create_private_dir(&base)?;
    let data = dir.join("data");
    let log = dir.join("postgres.log");
    File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    if as_root {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg(format!("{SERVER_USER}:{SERVER_USER}")).arg(&dir);
        run(chown, "chown")?;
    }

    let mut initdb = server_user_command(as_root, &bindir.join("initdb"), false);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["--auth=trust", "-U", SERVER_USER])
        .args(["--encoding=UTF8", "--locale=C", "--no-sync"])
        .current_dir(&dir);
    run(initdb, "initdb")?;

    for _ in 0..PORT_ATTEMPTS {
        let port = free_port()?;
        match launch(&bindir, as_root, &dir, port) {
            Ok(()) => {
                return Ok(Server {
                    admin_url: format!("postgresql://{SERVER_USER}@127.0.0.1:{port}/postgres"),
                    origin: format!("the test cluster at 127.0.0.1:{port} (log: {})", log.display()),
                });
            }
            Err(Launch::PortTaken) => continue,
            Err(Launch::Failed(e)) => return Err(e),
        }
    }
    Err(format!("postgres found its port taken {PORT_ATTEMPTS} times in a row; log: {}", log.display()))
}

enum Launch {
    /// Another process bound the port between our probe and the server's bind.
    PortTaken,
    Failed(String),
}

/// Starts `postgres` on `port` and waits until it accepts connections.
fn launch(bindir: &Path, as_root: bool, dir: &Path, port: u16) -> Result<(), Launch> {
    let log = dir.join("postgres.log");
    let log_file = File::create(&log).map_err(|e| Launch::Failed(format!("cannot open {}: {e}", log.display())))?;
    let log_copy =
        log_file.try_clone().map_err(|e| Launch::Failed(format!("cannot duplicate {}: {e}", log.display())))?;

    let mut postgres = server_user_command(as_root, &bindir.join("postgres"), true);
    postgres
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "fsync=off"])
        .args(["-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off"])
        .args(["-c", "max_connections=300"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log_copy)
        .stderr(log_file);
    let gone = spawn_for_life(postgres).map_err(Launch::Failed)?;

    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(how) = gone.try_recv() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Address already in use") {
                return Err(Launch::PortTaken);
            }
            return Err(Launch::Failed(format!("postgres {how} while starting; {}", log_tail(&log, &text))));
        }
        // The unix socket is in our own directory, so whatever answers there is our server.
        if accepts_connections(&socket) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let text = fs::read_to_string(&log).unwrap_or_default();
            return Err(Launch::Failed(format!(
                "postgres did not accept connections within {READY_TIMEOUT:?}; {}",
                log_tail(&log, &text)
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns `command` from a thread that never ends, and reports on the returned
/// channel how the child went away.
///
/// PR_SET_PDEATHSIG (`setpriv --pdeathsig`) fires when the *thread* that
/// spawned the child ends, so that thread has to live as long as the process.
fn spawn_for_life(mut command: Command) -> Result<mpsc::Receiver<String>, String> {
    let (gone_tx, gone_rx) = mpsc::channel();
    thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let how = match command.spawn() {
                Ok(mut child) => match child.wait() {
                    Ok(status) => format!("exited ({status})"),
                    Err(e) => format!("could not be waited for ({e})"),
                },
                Err(e) => format!("could not be started ({e}): {command:?}"),
            };
            let _ = gone_tx.send(how);
            loop {
                thread::park();
            }
        })
        .map_err(|e| format!("cannot start the thread that owns the server: {e}"))?;
    Ok(gone_rx)
}

/// Does the server on `socket` let `postgres` in? Speaks just enough of the
/// protocol to tell a ready server from one that is still starting up.
fn accepts_connections(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(1));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }

    // StartupMessage: length, protocol 3.0, then NUL-terminated key/value pairs.
    let mut body = 196_608_i32.to_be_bytes().to_vec();
    for field in ["user", SERVER_USER, "database", "postgres"] {
        body.extend_from_slice(field.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut message = (body.len() as i32 + 4).to_be_bytes().to_vec();
    message.extend_from_slice(&body);
    if stream.write_all(&message).is_err() {
        return false;
    }

    // A ready server with trust authentication answers AuthenticationOk
    // ('R', length 8, code 0); one still starting up answers an ErrorResponse.
    let mut reply = [0_u8; 9];
    let ready = stream.read_exact(&mut reply).is_ok() && reply == *b"R\0\0\0\x08\0\0\0\0";
    let _ = stream.write_all(b"X\0\0\0\x04"); // Terminate
    ready
}

/// A command that runs `program` as the server user when we are root (plain
/// otherwise) and, with `die_with_us`, gets SIGINT (fast shutdown) when the
/// spawning thread ends.
fn server_user_command(as_root: bool, program: &Path, die_with_us: bool) -> Command {
    let mut command = Command::new("setpriv");
    if as_root {
        command.args([format!("--reuid={SERVER_USER}"), format!("--regid={SERVER_USER}"), "--init-groups".to_owned()]);
    }
    if die_with_us {
        command.args(["--pdeathsig", "INT"]);
    }
    // English messages: the log is searched for "Address already in use".
    command.arg("--").arg(program).env("LC_ALL", "C");
    command
}

fn run(mut command: Command, what: &str) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("cannot run {what} ({command:?}): {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {command:?}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    ))
}

/// The directory holding both `initdb` and `postgres`: the first on PATH,
/// else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();

    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find(|dir| has_server(dir)) {
        return Ok(dir);
    }

    let pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    if let Some(dir) = pg_config.filter(|dir| has_server(dir)) {
        return Ok(dir);
    }

    let version = |dir: &Path| -> Vec<u32> {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        name.split('.').map(|part| part.parse().unwrap_or(0)).collect()
    };
    let newest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|version_dir| has_server(&version_dir.join("bin")))
        .max_by_key(|version_dir| version(version_dir));
    if let Some(version_dir) = newest {
        return Ok(version_dir.join("bin"));
    }

    Err(format!(
        "cannot find the PostgreSQL server programs `initdb` and `postgres` (looked on PATH, \
         in `pg_config --bindir` and in /usr/lib/postgresql/*/bin); install them \
         (Debian: apt-get install postgresql) or set {URL_VAR}"
    ))
}

fn running_as_root() -> bool {
    // /proc/self/status: "Uid:\t<real>\t<effective>\t<saved>\t<filesystem>"
    let from_proc = fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let ids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
        Some(ids.split_whitespace().nth(1)? == "0")
    });
    from_proc.unwrap_or_else(|| {
        Command::new("id").arg("-u").output().is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
    })
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Removes cluster directories of test processes that are gone (and whose
/// server, if any, has stopped).
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|name| name.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(owner) = owner else {
            continue;
        };
        let dir = entry.path();
        let server_pid = fs::read_to_string(dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
        if !is_alive(owner) && !server_pid.is_some_and(is_alive) {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn create_private_dir(base: &Path) -> Result<PathBuf, String> {
    loop {
        let dir = base.join(format!("{DIR_PREFIX}{}-{:016x}", process::id(), random()));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("cannot find a free TCP port on 127.0.0.1: {e}"))
}

fn random() -> u64 {
    RandomState::new().hash_one(SystemTime::now())
}

fn log_tail(log: &Path, text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("last lines of {}:\n{tail}", log.display())
}
