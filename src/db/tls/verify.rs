//! The server certificate check for each `sslmode`, as libpq makes it:
//! the chain to `sslrootcert` or the system roots, a certificate of the
//! root file trusted as itself (as OpenSSL does), and libpq's host name
//! rules (the Common Name, `*.` wildcards). Reads the root certificate file.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::settings::{RootCert, SslMode, TlsSettings};

/// What a server certificate must satisfy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Check {
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
    pub(super) fn of(tls: &TlsSettings) -> Check {
        let roots = tls.root_cert.clone();
        match tls.mode {
            SslMode::VerifyFull => Check::ChainAndName(roots.unwrap_or(RootCert::System)),
            SslMode::VerifyCa => Check::Chain(roots.unwrap_or(RootCert::System)),
            _ => roots.map_or(Check::Nothing, Check::Chain),
        }
    }
}

pub(super) fn client_config(check: &Check) -> Result<rustls::ClientConfig, String> {
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
    use std::path::PathBuf;

    use super::*;

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
