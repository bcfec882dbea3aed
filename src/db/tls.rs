//! A database URL's TLS settings and socket hosts, read as libpq reads them:
//! `sslmode` (disable, allow, prefer, require, verify-ca, verify-full) and
//! `sslrootcert` are taken out of the URL here, since tokio-postgres knows
//! only three modes and checks no certificate itself; the rest of the URL is
//! tokio-postgres's (which already reads socket directories as hosts).
//! Reads the root certificate file; never prints the URL.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::{Host, SslMode as WireMode, SslNegotiation};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::{DbError, socket};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// libpq's `sslrootcert`: what server certificates are checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RootCert {
    /// `system`: the Mozilla roots (webpki-roots), as built into the binary.
    System,
    /// A PEM file of one or more certificates.
    File(PathBuf),
}

/// The TLS part of a database URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
}

/// Why a database URL is not valid; never holds the URL or a value from it
/// other than a parameter name.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UrlProblem(String);

/// The connection settings and the connector for a database URL. The
/// `sslrootcert` file is read here: a problem with it is a `Connect` error
/// naming the file (and the server by host, port and database).
pub(crate) fn connect_params(url: &str) -> Result<(Config, Connector), DbError> {
    let (config, tls) = parse(url).map_err(|_| DbError::BadUrl)?;
    let connector = Connector::new(&config, &tls)
        .map_err(|reason| DbError::Connect { target: super::pool::describe(&config), reason })?;
    Ok((config, connector))
}

/// Reads a `postgres://` / `postgresql://` URL or a `key=value` connection
/// string, without touching any file: tokio-postgres's settings (its own
/// `sslmode` left at the first attempt's) and the TLS settings.
pub(crate) fn parse(url: &str) -> Result<(Config, TlsSettings), UrlProblem> {
    let (rest, sslmode, sslrootcert) = take_tls_params(url)?;
    let mut config: Config = rest.parse().map_err(|e: tokio_postgres::Error| {
        // tokio-postgres names the option, never its value.
        let cause = std::error::Error::source(&e).map(|c| format!(": {c}")).unwrap_or_default();
        UrlProblem(format!("not a valid connection string{cause}"))
    })?;
    let tls = tls_settings(sslmode.as_deref(), sslrootcert.as_deref())?;
    if config.get_ssl_negotiation() == SslNegotiation::Direct
        && matches!(tls.mode, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    {
        return Err(UrlProblem(format!(
            "sslmode {} cannot be used with sslnegotiation=direct (use require, verify-ca or verify-full)",
            tls.mode.name()
        )));
    }
    config.ssl_mode(match Attempts::of(&tls, only_sockets(&config)) {
        Attempts::Plain | Attempts::PlainThenTls => WireMode::Disable,
        Attempts::TlsThenPlain => WireMode::Prefer,
        Attempts::Tls => WireMode::Require,
    });
    Ok((config, tls))
}

/// libpq's rules for `sslmode` and `sslrootcert` together. Beyond libpq:
/// without `sslrootcert`, verify-ca and verify-full use the system roots
/// (libpq would look for `~/.postgresql/root.crt`).
fn tls_settings(sslmode: Option<&str>, sslrootcert: Option<&str>) -> Result<TlsSettings, UrlProblem> {
    let root_cert = match sslrootcert {
        None | Some("") => None,
        Some("system") => Some(RootCert::System),
        Some(path) => Some(RootCert::File(PathBuf::from(path))),
    };
    let mode = match sslmode {
        // `sslrootcert=system` makes verify-full the default (libpq 16).
        None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(value) => SslMode::parse(value).ok_or_else(|| {
            UrlProblem("sslmode must be disable, allow, prefer, require, verify-ca or verify-full".into())
        })?,
    };
    // Anyone can get a certificate from a public CA for a name of their
    // own, so libpq accepts the system roots only together with the name check.
    if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        return Err(UrlProblem(format!(
            "sslrootcert=system needs sslmode verify-full, not {} (any server name has a publicly trusted certificate)",
            mode.name()
        )));
    }
    Ok(TlsSettings { mode, root_cert })
}

/// The URL without `sslmode` and `sslrootcert`, and their (last, decoded)
/// values.
fn take_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), UrlProblem> {
    let mut sslmode = None;
    let mut sslrootcert = None;
    let mut take = |key: &str, value: String| match key {
        "sslmode" => sslmode = Some(value),
        "sslrootcert" => sslrootcert = Some(value),
        _ => {}
    };
    let is_tls_key = |key: &str| key == "sslmode" || key == "sslrootcert";

    let rest = match ["postgresql://", "postgres://"].iter().find_map(|prefix| url.strip_prefix(prefix)) {
        Some(after_scheme) => {
            // Where tokio-postgres's own parser finds the query: the first
            // `?` after the credentials (which end at the first `@`).
            let credentials = after_scheme.find('@').map_or(0, |at| at + 1);
            match after_scheme[credentials..].find('?') {
                None => url.to_owned(),
                Some(offset) => {
                    let start = url.len() - after_scheme.len() + credentials + offset;
                    let mut kept = Vec::new();
                    for pair in url[start + 1..].split('&') {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        let key = percent_decoded(key)?;
                        if is_tls_key(&key) {
                            take(&key, percent_decoded(value)?);
                        } else {
                            kept.push(pair);
                        }
                    }
                    let base = &url[..start];
                    if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) }
                }
            }
        }
        None => {
            let mut kept = Vec::new();
            for (key, raw, value) in key_values(url)? {
                if is_tls_key(key) {
                    take(key, value);
                } else {
                    kept.push(format!("{key}={raw}"));
                }
            }
            kept.join(" ")
        }
    };
    Ok((rest, sslmode, sslrootcert))
}

fn percent_decoded(text: &str) -> Result<String, UrlProblem> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| UrlProblem("a URL parameter is not valid UTF-8 once percent-decoded".into()))
}

/// The `key = value` pairs of a libpq connection string (the grammar
/// tokio-postgres reads): each key, its value as written (quotes and
/// backslashes kept) and its value as read.
fn key_values(text: &str) -> Result<Vec<(&str, &str, String)>, UrlProblem> {
    let malformed = || UrlProblem("not a valid key=value connection string".into());
    let mut pairs = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let key_end = rest.find(|c: char| c.is_whitespace() || c == '=').unwrap_or(rest.len());
        let key = &rest[..key_end];
        rest = rest[key_end..].trim_start().strip_prefix('=').ok_or_else(malformed)?.trim_start();
        if key.is_empty() {
            return Err(malformed());
        }
        let quoted = rest.starts_with('\'');
        let mut value = String::new();
        let mut chars = rest.char_indices().skip(usize::from(quoted));
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, escaped)| escaped)),
                '\'' if quoted => {
                    end = Some(i + 1);
                    break;
                }
                c if c.is_whitespace() && !quoted => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = match end {
            Some(end) => end,
            None if quoted => return Err(malformed()),
            None => rest.len(),
        };
        if end == 0 {
            return Err(malformed());
        }
        pairs.push((key, &rest[..end], value));
        rest = rest[end..].trim_start();
    }
    Ok(pairs)
}

/// Every host is a socket directory: libpq never uses TLS there (the server
/// would refuse it), whatever `sslmode` says.
fn only_sockets(config: &Config) -> bool {
    !config.get_hosts().is_empty()
        && config.get_hostaddrs().is_empty()
        && config.get_hosts().iter().all(|host| !matches!(host, Host::Tcp(_)))
}

/// How connections are tried for an `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempts {
    /// disable, and socket hosts.
    Plain,
    /// allow: without TLS; again with TLS if the server refused the session.
    PlainThenTls,
    /// prefer: with TLS if the server offers it; again without TLS if the
    /// TLS handshake failed.
    TlsThenPlain,
    /// require, verify-ca, verify-full.
    Tls,
}

impl Attempts {
    fn of(tls: &TlsSettings, only_sockets: bool) -> Attempts {
        match tls.mode {
            _ if only_sockets => Attempts::Plain,
            SslMode::Disable => Attempts::Plain,
            SslMode::Allow => Attempts::PlainThenTls,
            SslMode::Prefer => Attempts::TlsThenPlain,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Attempts::Tls,
        }
    }
}

/// What a server certificate must satisfy.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Check {
    /// Nothing (the handshake's signatures are still verified).
    Nothing,
    /// A chain to the roots.
    Chain(RootCert),
    /// A chain to the roots, and the host name.
    ChainAndName(RootCert),
}

impl Check {
    /// libpq verifies the chain whenever it has a root certificate file,
    /// whatever the mode (so `require` with `sslrootcert` is verify-ca), and
    /// the name only for verify-full.
    ///
    /// Unlike libpq, a named file that cannot be read is an error in every
    /// mode that may use TLS: libpq goes on without verification under
    /// allow, prefer and require when the file is missing (a rule made for
    /// its default `~/.postgresql/root.crt`), which for a file named in the
    /// URL would turn a typo into a silent loss of verification.
    fn of(tls: &TlsSettings) -> Check {
        let roots = tls.root_cert.clone();
        match tls.mode {
            SslMode::VerifyFull => Check::ChainAndName(roots.unwrap_or(RootCert::System)),
            SslMode::VerifyCa => Check::Chain(roots.unwrap_or(RootCert::System)),
            _ => roots.map_or(Check::Nothing, Check::Chain),
        }
    }
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

fn client_config(check: &Check) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let verifier = match check {
        Check::Nothing => ServerCheck { roots: None, check_name: false, algorithms },
        Check::Chain(roots) => ServerCheck { roots: Some(Roots::load(roots)?), check_name: false, algorithms },
        Check::ChainAndName(roots) => ServerCheck { roots: Some(Roots::load(roots)?), check_name: true, algorithms },
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The trust anchors of a check.
#[derive(Debug)]
struct Roots {
    store: RootCertStore,
    /// The certificates of the `sslrootcert` file. A server presenting one
    /// of them is trusted, as OpenSSL (and so libpq) trusts a self-signed
    /// certificate given as its own root; webpki refuses one marked as a CA.
    pinned: Vec<CertificateDer<'static>>,
}

impl Roots {
    fn load(roots: &RootCert) -> Result<Roots, String> {
        match roots {
            RootCert::System => Ok(Roots {
                store: RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
                pinned: Vec::new(),
            }),
            RootCert::File(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
                Roots::from_pem(&pem, path)
            }
        }
    }

    /// The certificates of a PEM file's text; `path` is for messages.
    fn from_pem(pem: &[u8], path: &Path) -> Result<Roots, String> {
        let pinned = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("sslrootcert {} is not a PEM file: {e}", path.display()))?;
        if pinned.is_empty() {
            return Err(format!("sslrootcert {} holds no PEM certificate", path.display()));
        }
        let mut store = RootCertStore::empty();
        for cert in &pinned {
            store.add(cert.clone()).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        }
        Ok(Roots { store, pinned })
    }
}

/// The server certificate check for one `sslmode`: the handshake signatures
/// are always verified (with ring's algorithms); the certificate against
/// the roots when there are roots, and the host name when asked.
#[derive(Debug)]
struct ServerCheck {
    roots: Option<Roots>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        match verify_server_cert_signed_by_trust_anchor(&cert, &roots.store, intermediates, now, self.algorithms.all) {
            Ok(()) => {}
            Err(_) if roots.pinned.iter().any(|pinned| pinned == end_entity) => check_validity(end_entity, now)?,
            Err(e) => return Err(e),
        }
        if self.check_name
            && let Err(e) = verify_server_name(&cert, server_name)
            && !libpq_name_matches(end_entity, &host_text(server_name))
        {
            return Err(e);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The validity period of a certificate trusted as itself.
fn check_validity(der: &[u8], now: UnixTime) -> Result<(), rustls::Error> {
    let cert = x509_cert::Certificate::from_der(der).map_err(|_| CertificateError::BadEncoding)?;
    let validity = cert.tbs_certificate.validity;
    let now = now.as_secs();
    if now < validity.not_before.to_unix_duration().as_secs() {
        return Err(CertificateError::NotValidYet.into());
    }
    if now > validity.not_after.to_unix_duration().as_secs() {
        return Err(CertificateError::Expired.into());
    }
    Ok(())
}

fn host_text(server_name: &ServerName<'_>) -> String {
    server_name.to_str().into_owned()
}

/// libpq's host name check, for what webpki refuses but libpq accepts: the
/// Common Name when the certificate has no subjectAltName of the host's
/// kind (DNS name or IP address), and an IP host written as a DNS name.
fn libpq_name_matches(der: &[u8], host: &str) -> bool {
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return false;
    };
    let host_ip = host.parse::<IpAddr>().ok();
    let mut check_common_name = true;
    if let Ok(Some((_, SubjectAltName(names)))) = cert.tbs_certificate.get::<SubjectAltName>() {
        for name in names {
            match name {
                GeneralName::DnsName(dns) => {
                    check_common_name &= host_ip.is_some();
                    if name_matches(dns.as_str(), host) {
                        return true;
                    }
                }
                GeneralName::IpAddress(bytes) => {
                    check_common_name &= host_ip.is_none();
                    let ip = match bytes.as_bytes() {
                        &[a, b, c, d] => Some(IpAddr::from([a, b, c, d])),
                        v6 => <[u8; 16]>::try_from(v6).ok().map(IpAddr::from),
                    };
                    if ip.is_some() && ip == host_ip {
                        return true;
                    }
                }
                _ => {}
            }
        }
    }
    let common_name = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == x509_cert::der::oid::db::rfc4519::CN)
        .filter(|attribute| {
            matches!(
                attribute.value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString
            )
        })
        .and_then(|attribute| std::str::from_utf8(attribute.value.value()).ok());
    check_common_name && common_name.is_some_and(|name| name_matches(name, host))
}

/// libpq's comparison of a certificate name with the host: equal ignoring
/// ASCII case, or a `*.` wildcard standing for exactly one label.
fn name_matches(name: &str, host: &str) -> bool {
    if name.eq_ignore_ascii_case(host) {
        return true;
    }
    let Some(suffix) = name.strip_prefix('*').filter(|suffix| suffix.starts_with('.') && suffix.len() > 1) else {
        return false;
    };
    host.len() > suffix.len()
        && host.is_char_boundary(host.len() - suffix.len())
        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        && !host[..host.len() - suffix.len()].contains('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `url` and compares with the expected mode, root certificate,
    /// attempts and tokio-postgres settings of `plain_url`.
    fn check(url: &str, mode: SslMode, root_cert: Option<RootCert>, attempts: Attempts, plain_url: &str) {
        let (config, tls) = parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(tls, TlsSettings { mode, root_cert }, "{url}");
        assert_eq!(Attempts::of(&tls, only_sockets(&config)), attempts, "{url}");
        let mut expected: Config = plain_url.parse().expect("the expected URL parses");
        expected.ssl_mode(config.get_ssl_mode());
        assert!(config == expected, "{url}: {config:?} != {expected:?}");
    }

    fn problem(url: &str) -> String {
        parse(url).err().unwrap_or_else(|| panic!("{url} was accepted")).to_string()
    }

    fn file(path: &str) -> Option<RootCert> {
        Some(RootCert::File(PathBuf::from(path)))
    }

    #[test]
    fn every_sslmode_is_read_and_prefer_is_the_default() {
        use Attempts::*;
        use SslMode::*;
        let base = "postgresql://u@db.example:5433/app";
        check(base, Prefer, None, TlsThenPlain, base);
        check(&format!("{base}?sslmode=disable"), Disable, None, Plain, base);
        check(&format!("{base}?sslmode=allow"), Allow, None, PlainThenTls, base);
        check(&format!("{base}?sslmode=prefer"), Prefer, None, TlsThenPlain, base);
        check(&format!("{base}?sslmode=require"), Require, None, Tls, base);
        check(&format!("{base}?sslmode=verify-ca"), VerifyCa, None, Tls, base);
        check(&format!("{base}?sslmode=verify-full"), VerifyFull, None, Tls, base);
    }

    #[test]
    fn tls_parameters_are_taken_out_and_the_others_kept() {
        use SslMode::*;
        check(
            "postgresql://u:pw@h/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem&connect_timeout=3",
            VerifyFull,
            file("/etc/ca dir/ca.pem"),
            Attempts::Tls,
            "postgresql://u:pw@h/app?application_name=x&connect_timeout=3",
        );
        check(
            "postgres://h/app?sslrootcert=ca.pem",
            Prefer,
            file("ca.pem"),
            Attempts::TlsThenPlain,
            "postgres://h/app",
        );
        check("postgresql://h/app?sslmode=disable&sslmode=require", Require, None, Attempts::Tls, "postgresql://h/app");
        check("postgresql://h/app?sslrootcert=", Prefer, None, Attempts::TlsThenPlain, "postgresql://h/app");
        // A `?` in the password belongs to the password, as for tokio-postgres.
        check("postgresql://u:p?w@h/app?sslmode=require", Require, None, Attempts::Tls, "postgresql://u:p?w@h/app");
    }

    #[test]
    fn key_value_strings_are_read_like_urls() {
        use SslMode::*;
        check(
            "host=h dbname=app sslmode = verify-ca sslrootcert='/etc/my ca.pem' password='a b\\' c'",
            VerifyCa,
            file("/etc/my ca.pem"),
            Attempts::Tls,
            "host=h dbname=app password='a b\\' c'",
        );
        check("host=h sslmode=require", Require, None, Attempts::Tls, "host=h");
        assert!(problem("host=h sslmode").contains("key=value"));
        assert!(problem("host=h sslrootcert='/unterminated").contains("key=value"));
    }

    #[test]
    fn socket_hosts_never_use_tls() {
        use SslMode::*;
        for url in [
            "postgresql:///app?host=/run/postgresql",
            "postgresql://%2Frun%2Fpostgresql/app",
            "postgresql://%2Frun%2Fpostgresql:5433/app?sslmode=verify-full",
        ] {
            let (config, tls) = parse(url).expect("a socket URL is valid");
            assert!(matches!(config.get_hosts(), [Host::Unix(dir)] if dir == Path::new("/run/postgresql")), "{url}");
            assert_eq!(Attempts::of(&tls, only_sockets(&config)), Attempts::Plain, "{url}");
            assert_eq!(config.get_ssl_mode(), WireMode::Disable, "{url}");
        }
        check(
            "postgresql:///app?host=/run/postgresql&sslmode=require",
            Require,
            None,
            Attempts::Plain,
            "postgresql:///app?host=/run/postgresql",
        );
        // A socket host with a TCP address is TCP.
        let (config, tls) = parse("postgresql:///app?host=/run/postgresql&hostaddr=127.0.0.1").expect("valid");
        assert_eq!(Attempts::of(&tls, only_sockets(&config)), Attempts::TlsThenPlain);
    }

    #[test]
    fn system_roots_need_verify_full_as_in_libpq() {
        check(
            "postgresql://h/app?sslrootcert=system",
            SslMode::VerifyFull,
            Some(RootCert::System),
            Attempts::Tls,
            "postgresql://h/app",
        );
        for mode in ["require", "verify-ca", "prefer"] {
            let text = problem(&format!("postgresql://h/app?sslmode={mode}&sslrootcert=system"));
            assert!(text.contains("verify-full") && text.contains(mode), "{text}");
        }
    }

    #[test]
    fn which_certificate_check_each_mode_makes() {
        let of = |mode, root_cert| Check::of(&TlsSettings { mode, root_cert });
        let ca = || RootCert::File(PathBuf::from("ca.pem"));
        assert_eq!(of(SslMode::Prefer, None), Check::Nothing);
        assert_eq!(of(SslMode::Require, None), Check::Nothing);
        assert_eq!(of(SslMode::Require, Some(ca())), Check::Chain(ca()));
        assert_eq!(of(SslMode::Allow, Some(ca())), Check::Chain(ca()));
        assert_eq!(of(SslMode::VerifyCa, None), Check::Chain(RootCert::System));
        assert_eq!(of(SslMode::VerifyCa, Some(ca())), Check::Chain(ca()));
        assert_eq!(of(SslMode::VerifyFull, None), Check::ChainAndName(RootCert::System));
        assert_eq!(of(SslMode::VerifyFull, Some(ca())), Check::ChainAndName(ca()));
    }

    #[test]
    fn bad_tls_parameters_are_refused_without_quoting_the_url() {
        let url = "postgresql://u:hunter2@h/app?sslmode=verify_full";
        let text = problem(url);
        assert!(text.contains("sslmode must be") && !text.contains("hunter2"), "{text}");
        let text = problem("postgresql://u:hunter2@h/app?sslcert=client.pem");
        assert!(text.contains("sslcert") && !text.contains("hunter2"), "{text}");
        assert!(problem("postgresql://h/app?sslnegotiation=direct").contains("sslnegotiation=direct"));
        assert!(parse("postgresql://h/app?sslnegotiation=direct&sslmode=require").is_ok());
        assert!(matches!(connect_params(url), Err(DbError::BadUrl)));
    }

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

    /// A certificate and its key pair, from rcgen.
    struct Made {
        pem: String,
        der: CertificateDer<'static>,
    }

    fn self_signed(params: rcgen::CertificateParams) -> Made {
        let key = rcgen::KeyPair::generate().expect("a key pair");
        let cert = params.self_signed(&key).expect("a certificate");
        Made { pem: cert.pem(), der: cert.der().clone() }
    }

    fn params(sans: &[&str], common_name: &str, is_ca: bool) -> rcgen::CertificateParams {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("valid names");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        if is_ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params
    }

    /// Whether `server` passes the check for `roots` (PEM), with or
    /// without the name check, when reached as `host`.
    fn verifies(server: &Made, roots: &str, check_name: bool, host: &str) -> Result<(), rustls::Error> {
        let check = ServerCheck {
            roots: Some(Roots::from_pem(roots.as_bytes(), Path::new("roots.pem")).expect("valid roots")),
            check_name,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from(host.to_owned()).expect("a valid server name");
        check.verify_server_cert(&server.der, &[], &name, &[], UnixTime::now()).map(|_| ())
    }

    #[test]
    fn a_self_signed_ca_certificate_is_trusted_as_its_own_root_with_its_common_name() {
        // PostgreSQL's documented recipe: `openssl req -x509 -subj /CN=host`
        // makes a CA certificate with the name only in the Common Name.
        let server = self_signed(params(&[], "localhost", true));
        verifies(&server, &server.pem, true, "localhost").expect("verify-full by the Common Name");
        verifies(&server, &server.pem, false, "127.0.0.1").expect("verify-ca ignores the name");
        let refused = verifies(&server, &server.pem, true, "127.0.0.1").expect_err("another name");
        assert!(matches!(refused, rustls::Error::InvalidCertificate(_)), "{refused}");
        let stranger = self_signed(params(&[], "localhost", true));
        verifies(&server, &stranger.pem, false, "localhost").expect_err("another root");
    }

    #[test]
    fn the_common_name_counts_only_without_a_subject_alt_name_of_the_hosts_kind() {
        let server = self_signed(params(&["db.example"], "localhost", false));
        verifies(&server, &server.pem, true, "db.example").expect("the DNS name");
        verifies(&server, &server.pem, true, "localhost").expect_err("the Common Name is ignored beside a DNS name");
        let server = self_signed(params(&["db.example"], "127.0.0.1", false));
        verifies(&server, &server.pem, true, "127.0.0.1").expect("an IP host falls back to the Common Name");
    }

    #[test]
    fn a_pinned_certificate_out_of_its_validity_is_refused() {
        let mut expired = params(&["localhost"], "localhost", true);
        expired.not_before = rcgen::date_time_ymd(2000, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let server = self_signed(expired);
        let refused = verifies(&server, &server.pem, false, "localhost").expect_err("expired");
        assert!(matches!(refused, rustls::Error::InvalidCertificate(CertificateError::Expired)), "{refused}");
    }

    #[test]
    fn a_root_file_without_certificates_is_refused_by_name() {
        let problem = Roots::from_pem(b"not a certificate\n", Path::new("/etc/x/ca.pem")).expect_err("no certificate");
        assert!(problem.contains("/etc/x/ca.pem"), "{problem}");
    }

    #[test]
    fn names_match_as_in_libpq() {
        for (name, host, matches) in [
            ("db.example", "db.example", true),
            ("DB.Example", "db.EXAMPLE", true),
            ("*.example", "db.example", true),
            ("*.example", "a.b.example", false),
            ("*.example", ".example", false),
            ("*.example", "example", false),
            ("*", "db", false),
            ("db.example", "other.example", false),
            ("127.0.0.1", "127.0.0.1", true),
        ] {
            assert_eq!(name_matches(name, host), matches, "{name} vs {host}");
        }
    }
}
