//! A database URL's TLS settings and socket hosts, read as libpq reads them
//! (`settings`), the server certificate check for each mode (`verify`), and
//! the connector that opens connections as the URL's `sslmode` says: a
//! second attempt for allow and prefer, never TLS over a socket. Never
//! prints the URL.

mod settings;
mod verify;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

pub(crate) use settings::parse;
use settings::{Attempts, TlsSettings, only_sockets};
use verify::{Check, client_config};

use super::{DbError, socket};

/// The connection settings and the connector for a database URL. The
/// `sslrootcert` file is read here: a problem with it is a `Connect` error
/// naming the file (and the server by host, port and database).
pub(crate) fn connect_params(url: &str) -> Result<(Config, Connector), DbError> {
    let (config, tls) = parse(url).map_err(|_| DbError::BadUrl)?;
    let connector = Connector::new(&config, &tls)
        .map_err(|reason| DbError::Connect { target: super::pool::describe(&config), reason })?;
    Ok((config, connector))
}

/// Opens connections as libpq would for the URL's `sslmode` (see
/// [`Attempts`]); deadpool uses it through [`deadpool_postgres::Connect`].
///
/// With several hosts in one URL, tokio-postgres tries them all within one
/// attempt, so a second attempt (allow, prefer) follows the whole list
/// rather than each host, and a list mixing sockets and TCP hosts uses TLS
/// as if all were TCP.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: MakeRustlsConnect,
    attempts: Attempts,
}

impl Connector {
    fn new(config: &Config, tls: &TlsSettings) -> Result<Connector, String> {
        let attempts = Attempts::of(tls, only_sockets(config));
        // Without TLS the roots are never needed, so they are not read.
        let check = if attempts == Attempts::Plain { Check::Nothing } else { Check::of(tls) };
        Ok(Connector { tls: MakeRustlsConnect::new(client_config(&check)?), attempts })
    }

    /// One connection, trying a second way where the `sslmode` says so.
    pub(crate) async fn open(&self, config: &Config) -> Result<(Client, Driver), tokio_postgres::Error> {
        let attempt = |mode: WireMode| {
            let mut config = config.clone();
            config.ssl_mode(mode);
            connect(config, self.tls.clone())
        };
        match self.attempts {
            Attempts::Plain => attempt(WireMode::Disable).await,
            Attempts::Tls => attempt(WireMode::Require).await,
            // Any error the server sends during startup or authentication,
            // as libpq retries on any.
            Attempts::PlainThenTls => match attempt(WireMode::Disable).await {
                Err(e) if e.as_db_error().is_some() => attempt(WireMode::Require).await,
                done => done,
            },
            Attempts::TlsThenPlain => match attempt(WireMode::Prefer).await {
                Err(e) if is_handshake_failure(&e) => attempt(WireMode::Disable).await,
                done => done,
            },
        }
    }
}

/// What runs a connection until it ends.
pub(crate) type Driver = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// One attempt, over a [`socket::Socket`] whose closing waits for the
/// server where the URL names one host. A socket that cannot be opened is
/// left to tokio-postgres to try and report (its errors are its own to
/// make): at once after a timeout, so that a timeout is not waited twice.
async fn connect(mut config: Config, mut tls: MakeRustlsConnect) -> Result<(Client, Driver), tokio_postgres::Error> {
    if let Some(target) = socket::Target::of(&config) {
        match target.open(&config).await {
            Ok(socket) => {
                let name = target.tls_name.as_deref().unwrap_or("");
                let Ok(tls) = MakeTlsConnect::<socket::Socket>::make_tls_connect(&mut tls, name);
                let (client, connection) = config.connect_raw(socket, tls).await?;
                return Ok((client, Box::pin(connection)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                config.connect_timeout(Duration::from_millis(1));
            }
            Err(_) => {}
        }
    }
    let (client, connection) = config.connect(tls).await?;
    Ok((client, Box::pin(connection)))
}

/// tokio-postgres reports a failed TLS negotiation only through its message.
fn is_handshake_failure(e: &tokio_postgres::Error) -> bool {
    e.to_string().starts_with("error performing TLS handshake")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_root_file_is_named_in_the_error() {
        let url = "postgresql://u:hunter2@h/app?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem";
        let Err(DbError::Connect { target, reason }) = connect_params(url) else {
            panic!("a missing sslrootcert was accepted");
        };
        assert_eq!(target, "h:5432/app");
        assert!(reason.contains("/nonexistent/ca.pem") && !reason.contains("hunter2"), "{reason}");
        // Without TLS the file is never needed.
        assert!(connect_params("postgresql://h/app?sslmode=disable&sslrootcert=/nonexistent/ca.pem").is_ok());
    }
}
