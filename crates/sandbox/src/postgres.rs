//! A throwaway PostgreSQL cluster, for the tests and `demo`: `initdb` and
//! `postgres` from the system's binaries, on 127.0.0.1 and a free port.
//!
//! The cluster:
//! - lives in `<tmp>/crm-connect-pg-<pid>-<random>`; directories left behind
//!   by processes that are gone (and whose server has stopped) are removed
//!   whenever a cluster starts;
//! - listens on 127.0.0.1 on a free port and on a unix socket in that directory;
//! - runs as the `postgres` system user when we are root, because PostgreSQL
//!   refuses to run as root;
//! - is started by `setpriv --pdeathsig INT` from a thread that lives as long
//!   as the `Cluster`, so the server gets a fast-shutdown signal as soon as
//!   the `Cluster` is dropped or the process ends, destructors or not (test
//!   binaries never run static destructors);
//! - trades durability for speed (`fsync=off` and the like): its data is
//!   thrown away with it;
//! - can be stopped and started again on the same port with the same data,
//!   for tests that take PostgreSQL away from a running program;
//! - can serve TLS (`ssl = on`) with a certificate and key of the caller's.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::files::{OwnedDir, is_alive};

/// What every cluster directory's name starts with, in the temp directory.
pub const DIR_PREFIX: &str = "crm-connect-pg-";
/// The database role and, when we are root, the system user the server runs as.
const SERVER_USER: &str = "postgres";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 40;

/// Why a cluster could not be started or a database not be created. The
/// messages say what to do; callers add their own way out (a URL to use
/// instead).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot find the PostgreSQL server programs `initdb` and `postgres` (looked on PATH, in \
         `pg_config --bindir` and in /usr/lib/postgresql/*/bin); install them (Debian/Ubuntu: \
         apt-get install postgresql; Fedora: dnf install postgresql-server)"
    )]
    NoBinaries,
    #[error(
        "running as root, so PostgreSQL has to run as the `{SERVER_USER}` system user, which does \
         not exist (installing the postgresql package creates it)"
    )]
    NoServerUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}): {output}")]
    Command { what: String, status: String, output: String },
    #[error("postgres {how} while starting; {log}")]
    Exited { how: String, log: String },
    #[error("postgres did not accept connections within {READY_TIMEOUT:?}; {log}")]
    NotReady { log: String },
    #[error("postgres found its port taken {PORT_ATTEMPTS} times in a row; {log}")]
    PortsTaken { log: String },
    #[error("postgres cannot start again: another process took port {port}; {log}")]
    PortTakenMeanwhile { port: u16, log: String },
    #[error("invalid database URL (a postgres:// or postgresql:// URL naming a database is needed)")]
    BadUrl,
    #[error("{what} on {target} failed: {reason}")]
    Database { what: String, target: String, reason: String },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A running throwaway cluster. Dropping it stops the server (fast shutdown)
/// and removes its directory.
pub struct Cluster {
    /// Removed after `Drop::drop` has stopped the server.
    dir: OwnedDir,
    port: u16,
    /// `setpriv`, which became `postgres`.
    server: Child,
    /// Dropping this ends the thread that spawned the server, which is what
    /// fires the server's parent-death signal.
    release: Option<mpsc::Sender<()>>,
    owner: Option<JoinHandle<()>>,
    /// What `start_again` needs to launch the server once more.
    bindir: PathBuf,
    as_root: bool,
    max_connections: u32,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("dir", &self.dir.path()).field("port", &self.port).finish()
    }
}

/// Room for the tests that run at once, each with a pool or two.
const DEFAULT_MAX_CONNECTIONS: u32 = 300;

impl Cluster {
    /// Creates a cluster in a new directory and starts its server; blocks
    /// for a few seconds (initdb), so async callers run it off the runtime
    /// (`tokio::task::spawn_blocking`).
    pub fn start() -> Result<Cluster, ClusterError> {
        Cluster::start_configured(None, DEFAULT_MAX_CONNECTIONS)
    }

    /// The same with PostgreSQL's `max_connections` set (its stock value is 100).
    pub fn start_with_max_connections(max_connections: u32) -> Result<Cluster, ClusterError> {
        Cluster::start_configured(None, max_connections)
    }

    /// Like [`Cluster::start`], with `ssl = on` and the given PEM
    /// certificate (chain) and private key as `server.crt` and `server.key`
    /// in the data directory; plain connections stay allowed.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Result<Cluster, ClusterError> {
        Cluster::start_configured(Some(ServerTls { cert_pem, key_pem }), DEFAULT_MAX_CONNECTIONS)
    }

    fn start_configured(tls: Option<ServerTls<'_>>, max_connections: u32) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir()?;
        let as_root = running_as_root();
        if as_root && !user_exists(SERVER_USER) {
            return Err(ClusterError::NoServerUser);
        }

        // Under root the directory must be reachable by the server user,
        // whatever TMPDIR says; the server is given absolute paths in any case.
        let tmp = std::env::temp_dir();
        let base = if as_root || !tmp.is_absolute() { PathBuf::from("/tmp") } else { tmp };
        // A directory whose server still runs is not swept.
        let dir = OwnedDir::create(&base, DIR_PREFIX, |dir| {
            let server_pid = fs::read_to_string(dir.join("data/postmaster.pid"))
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
            !server_pid.is_some_and(is_alive)
        })
        .map_err(io_error(format!("cannot create a directory in {}", base.display())))?;
        // A failure drops (removes) the directory again.
        initdb_and_launch(&bindir, as_root, dir, tls, max_connections)
    }

    /// The directory holding the data, the unix socket (the directory to
    /// give as a socket host) and `postgres.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`: the maintenance
    /// database, as the superuser (no password: trust authentication on
    /// loopback only).
    pub fn admin_url(&self) -> String {
        self.database_url("postgres")
    }

    /// `postgresql://postgres@127.0.0.1:PORT/{slug}`, for `--database-url-template`.
    pub fn url_template(&self) -> String {
        self.database_url("{slug}")
    }

    /// The URL of database `name` on this cluster (which may not exist yet).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgresql://{SERVER_USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates the empty database `name`; returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String, ClusterError> {
        create_database(&self.admin_url(), name).await
    }

    /// Stops the server (fast shutdown: open connections are ended, their
    /// transactions rolled back) and waits until it has exited; the data,
    /// the directory and the port stay for [`Cluster::start_again`].
    /// Blocks for up to a few seconds; stopping a stopped cluster does
    /// nothing.
    pub fn stop(&mut self) {
        // Ending the owner thread sends the server SIGINT (fast shutdown).
        drop(self.release.take());
        if let Some(owner) = self.owner.take() {
            let _ = owner.join();
        }
        if !wait_until_exited(&mut self.server, STOP_TIMEOUT) {
            // Its backends notice the postmaster is gone and exit by themselves.
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
    }

    /// Starts a stopped server again on the same port and data directory
    /// and waits until it accepts connections; does nothing while the
    /// server runs. The log of the previous run is kept as
    /// `postgres.previous.log`. Fails if another process took the port
    /// meanwhile. Blocks like [`Cluster::start`].
    pub fn start_again(&mut self) -> Result<(), ClusterError> {
        if matches!(self.server.try_wait(), Ok(None)) {
            return Ok(());
        }
        self.stop();
        let log = self.dir.join("postgres.log");
        let _ = fs::rename(&log, self.dir.join("postgres.previous.log"));
        match launch(&self.bindir, self.as_root, self.dir.path(), self.port, self.max_connections) {
            Ok((server, release, owner)) => {
                self.server = server;
                self.release = Some(release);
                self.owner = Some(owner);
                Ok(())
            }
            Err(Launch::PortTaken) => {
                Err(ClusterError::PortTakenMeanwhile { port: self.port, log: format!("log: {}", log.display()) })
            }
            Err(Launch::Failed(e)) => Err(e),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_until_exited(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Creates the empty database `name` on the server of `admin_url` (plain
/// TCP, for a server of our own or one the tests were given); returns the
/// database's URL.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String, ClusterError> {
    let target = describe(admin_url);
    let failed = |what: &str, e: tokio_postgres::Error| ClusterError::Database {
        what: what.to_owned(),
        target: target.clone(),
        reason: pg_reason(&e),
    };
    let (client, connection) = tokio_postgres::connect(admin_url, NoTls).await.map_err(|e| failed("connecting", e))?;
    let connection = tokio::spawn(connection);
    let created = client
        .batch_execute(&format!("CREATE DATABASE {}", quote_identifier(name)))
        .await
        .map_err(|e| failed(&format!("creating database {name}"), e));
    drop(client);
    let _ = connection.await;
    created?;
    Ok(with_database(admin_url, name))
}

/// `url` with its database (the URL path) replaced by `name`; the query
/// (`?sslmode=…`) is kept.
pub fn with_database(url: &str, name: &str) -> String {
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

/// `host:port/database`, never the password, for messages.
fn describe(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "the database server".to_owned();
    };
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("postgres"))
}

/// The server's own message when there is one: never the DETAIL, which may
/// quote values.
fn pg_reason(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_owned())
}

/// `name` as an SQL identifier in double quotes.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The server's certificate and key, PEM.
#[derive(Clone, Copy)]
struct ServerTls<'a> {
    cert_pem: &'a str,
    key_pem: &'a str,
}

fn initdb_and_launch(
    bindir: &Path,
    as_root: bool,
    owned: OwnedDir,
    tls: Option<ServerTls<'_>>,
    max_connections: u32,
) -> Result<Cluster, ClusterError> {
    let dir = owned.path();
    let data = dir.join("data");
    let log = dir.join("postgres.log");
    File::create(&log).map_err(io_error(format!("cannot create {}", log.display())))?;
    if as_root {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg(format!("{SERVER_USER}:{SERVER_USER}")).arg(dir);
        run(chown, "chown")?;
    }

    let mut initdb = server_user_command(as_root, &bindir.join("initdb"), false);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["--auth=trust", "-U", SERVER_USER])
        .args(["--encoding=UTF8", "--locale=C", "--no-sync"])
        .current_dir(dir);
    run(initdb, "initdb")?;
    if let Some(tls) = tls {
        enable_tls(&data, as_root, tls)?;
    }

    for _ in 0..PORT_ATTEMPTS {
        let port = free_port()?;
        match launch(bindir, as_root, dir, port, max_connections) {
            Ok((server, release, owner)) => {
                return Ok(Cluster {
                    max_connections,
                    dir: owned,
                    port,
                    server,
                    release: Some(release),
                    owner: Some(owner),
                    bindir: bindir.to_owned(),
                    as_root,
                });
            }
            Err(Launch::PortTaken) => continue,
            Err(Launch::Failed(e)) => return Err(e),
        }
    }
    Err(ClusterError::PortsTaken { log: format!("log: {}", log.display()) })
}

/// Writes `server.crt` and `server.key` (mode 0600, owned by the server's
/// user, as PostgreSQL requires of the key) and turns `ssl` on in
/// `postgresql.conf`, so that `start_again` keeps it.
fn enable_tls(data: &Path, as_root: bool, tls: ServerTls<'_>) -> Result<(), ClusterError> {
    let mut written = Vec::new();
    for (name, pem) in [("server.crt", tls.cert_pem), ("server.key", tls.key_pem)] {
        let path = data.join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(pem.as_bytes()))
            .map_err(io_error(format!("cannot write {}", path.display())))?;
        written.push(path);
    }
    if as_root {
        let mut chown = Command::new("chown");
        chown.arg(format!("{SERVER_USER}:{SERVER_USER}")).args(&written);
        run(chown, "chown")?;
    }
    let conf = data.join("postgresql.conf");
    OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut file| file.write_all(b"\nssl = on\n"))
        .map_err(io_error(format!("cannot write {}", conf.display())))
}

enum Launch {
    /// Another process bound the port between our probe and the server's bind.
    PortTaken,
    Failed(ClusterError),
}

type Owned = (Child, mpsc::Sender<()>, JoinHandle<()>);

/// Starts `postgres` on `port` and waits until it accepts connections.
fn launch(bindir: &Path, as_root: bool, dir: &Path, port: u16, max_connections: u32) -> Result<Owned, Launch> {
    let log = dir.join("postgres.log");
    let log_file =
        File::create(&log).map_err(|e| Launch::Failed(io_error(format!("cannot open {}", log.display()))(e)))?;
    let log_copy =
        log_file.try_clone().map_err(|e| Launch::Failed(io_error(format!("cannot duplicate {}", log.display()))(e)))?;

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
        .arg("-c")
        .arg(format!("max_connections={max_connections}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log_copy)
        .stderr(log_file)
        // A process group of its own: Ctrl-C in a terminal reaches us, and
        // we stop the server when we are done with it, not before.
        .process_group(0);
    let (mut server, release, owner) = spawn_owned(postgres).map_err(Launch::Failed)?;

    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let deadline = Instant::now() + READY_TIMEOUT;
    let give_up = |server: &mut Child, error: Launch| {
        let _ = server.kill();
        let _ = server.wait();
        Err(error)
    };
    loop {
        match server.try_wait() {
            Ok(Some(status)) => {
                let text = fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Address already in use") {
                    return Err(Launch::PortTaken);
                }
                let how = format!("exited ({status})");
                return Err(Launch::Failed(ClusterError::Exited { how, log: log_tail(&log, &text) }));
            }
            Ok(None) => {}
            Err(e) => return give_up(&mut server, Launch::Failed(io_error("cannot wait for postgres")(e))),
        }
        // The unix socket is in our own directory, so whatever answers there is our server.
        if accepts_connections(&socket) {
            return Ok((server, release, owner));
        }
        if Instant::now() >= deadline {
            let text = fs::read_to_string(&log).unwrap_or_default();
            return give_up(&mut server, Launch::Failed(ClusterError::NotReady { log: log_tail(&log, &text) }));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns `command` from a thread of its own that lives until the returned
/// sender is dropped.
///
/// PR_SET_PDEATHSIG (`setpriv --pdeathsig`) fires when the *thread* that
/// spawned the child ends, so that thread has to live as long as the server
/// should; any thread of the process may wait for the child.
fn spawn_owned(mut command: Command) -> Result<Owned, ClusterError> {
    let (spawned_tx, spawned_rx) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let owner = thread::Builder::new()
        .name("crm-connect-postgres".into())
        .spawn(move || {
            let _ = spawned_tx.send(command.spawn().map_err(|e| (e, format!("{command:?}"))));
            // Returns once the sender is dropped; nothing is ever sent.
            let _ = released.recv();
        })
        .map_err(io_error("cannot start the thread that owns the server"))?;
    match spawned_rx.recv() {
        Ok(Ok(child)) => Ok((child, release, owner)),
        Ok(Err((e, command))) => Err(io_error(format!("cannot start postgres ({command})"))(e)),
        Err(_) => Err(io_error("the thread that owns the server ended")(io::Error::other("no child"))),
    }
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

fn run(mut command: Command, what: &str) -> Result<(), ClusterError> {
    let output = command.output().map_err(io_error(format!("cannot run {what} ({command:?})")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(ClusterError::Command {
        what: format!("{what} ({command:?})"),
        status: output.status.to_string(),
        output: format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
    })
}

/// The directory holding both `initdb` and `postgres`: the first on PATH,
/// else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> Result<PathBuf, ClusterError> {
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
    fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|version_dir| has_server(&version_dir.join("bin")))
        .max_by_key(|version_dir| version(version_dir))
        .map(|version_dir| version_dir.join("bin"))
        .ok_or(ClusterError::NoBinaries)
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

fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_error("cannot find a free TCP port on 127.0.0.1"))
}

fn log_tail(log: &Path, text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("last lines of {}:\n{tail}", log.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_only_the_path() {
        assert_eq!(with_database("postgresql://u@h:1/postgres", "x"), "postgresql://u@h:1/x");
        assert_eq!(with_database("postgresql://u@h:1", "x"), "postgresql://u@h:1/x");
        assert_eq!(with_database("postgres://u:p@h/db?sslmode=require", "x"), "postgres://u:p@h/x?sslmode=require");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
