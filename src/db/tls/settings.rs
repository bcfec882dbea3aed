//! A database URL read as libpq reads it: `sslmode` (disable, allow,
//! prefer, require, verify-ca, verify-full) and `sslrootcert` taken out of
//! it, since tokio-postgres knows only three modes; the rest of the URL is
//! tokio-postgres's (which already reads socket directories as hosts). The
//! attempts each mode makes follow from here. Touches no file.

use std::path::PathBuf;

use tokio_postgres::Config;
use tokio_postgres::config::{Host, SslMode as WireMode, SslNegotiation};

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
pub(super) fn only_sockets(config: &Config) -> bool {
    !config.get_hosts().is_empty()
        && config.get_hostaddrs().is_empty()
        && config.get_hosts().iter().all(|host| !matches!(host, Host::Tcp(_)))
}

/// How connections are tried for an `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Attempts {
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
    pub(super) fn of(tls: &TlsSettings, only_sockets: bool) -> Attempts {
        match tls.mode {
            _ if only_sockets => Attempts::Plain,
            SslMode::Disable => Attempts::Plain,
            SslMode::Allow => Attempts::PlainThenTls,
            SslMode::Prefer => Attempts::TlsThenPlain,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Attempts::Tls,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::db::DbError;
    use crate::db::tls::connect_params;

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
}
