//! rustls configurations for the plane's REST API and for agents enrolling by CA fingerprint.
//!
//! Every config is built with an explicit ring provider so it works whether or not (and whatever)
//! a process-wide default provider was installed.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::PkiError;
use crate::identity::{certs_from_pem, fingerprint_der};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider. Idempotent: a provider already installed
/// (by an earlier call or another component) is left in place.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Parses `"sha256:<hex>"` (prefix optional and case-insensitive, hex in any case, colons
/// allowed) into the 32 digest bytes.
pub fn parse_fingerprint(fingerprint: &str) -> Result<[u8; 32], PkiError> {
    let trimmed = fingerprint.trim();
    let hex_part = match trimmed.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &trimmed[7..],
        _ => trimmed,
    };
    let hex_digits: String = hex_part.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hex_digits, &mut out)
        .map_err(|_| PkiError::InvalidFingerprint(fingerprint.to_string()))?;
    Ok(out)
}

/// The first private key in `pem` (PKCS#8, SEC1 or PKCS#1).
pub fn private_key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PkiError::PemNotFound("PRIVATE KEY"),
        other => PkiError::InvalidPem(other.to_string()),
    })
}

fn roots_from_pem(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// `[server cert(s)…, CA]`, without repeating the CA if the server PEM already carries it.
fn server_chain(
    server_cert_pem: &str,
    ca_pem: &str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut chain = certs_from_pem(server_cert_pem)?;
    for ca in certs_from_pem(ca_pem)? {
        if !chain.contains(&ca) {
            chain.push(ca);
        }
    }
    Ok(chain)
}

/// Raised when the server's chain does not contain the CA the agent was told to pin.
struct PinnedCaNotPresented {
    expected: String,
    presented: Vec<String>,
}

// rustls renders `CertificateError::Other` with `{:?}`, so Debug carries the readable message.
impl std::fmt::Debug for PinnedCaNotPresented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for PinnedCaNotPresented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server did not present the pinned CA certificate {} (its chain has: {})",
            self.expected,
            if self.presented.is_empty() {
                "no CA certificates".to_string()
            } else {
                self.presented.join(", ")
            }
        )
    }
}

impl std::error::Error for PinnedCaNotPresented {}

/// Trusts exactly one CA, identified by the SHA-256 of its certificate, which the server must
/// send along in its chain.
///
/// Only the CA lookup is custom: the end-entity is then verified by rustls' own webpki verifier
/// with that CA as the single root, so signature, validity, EKU and server-name checks are the
/// standard ones.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref())[..] == self.pin)
        else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinnedCaNotPresented {
                    expected: format!("sha256:{}", hex::encode(self.pin)),
                    presented: intermediates
                        .iter()
                        .map(|c| fingerprint_der(c.as_ref()))
                        .collect(),
                })),
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let others: Vec<CertificateDer<'_>> =
            intermediates.iter().filter(|c| *c != ca).cloned().collect();
        let webpki = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("pinned CA verifier: {e}")))?;
        webpki.verify_server_cert(end_entity, &others, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client config trusting only the CA whose certificate has SHA-256 `fingerprint`
/// (`"sha256:<hex>"`, case-insensitive, colons allowed). The server must present that CA in its
/// chain (the plane sends `[leaf, ca]`). Used by agents to enroll before they hold the CA file.
pub fn client_config_pinned_fingerprint(fingerprint: &str) -> Result<ClientConfig, PkiError> {
    let pin = parse_fingerprint(fingerprint)?;
    let provider = provider();
    let verifier = PinnedCaVerifier {
        pin,
        provider: Arc::clone(&provider),
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Client config trusting only the CA(s) in `ca_pem`.
pub fn client_config_ca(ca_pem: &str) -> Result<ClientConfig, PkiError> {
    let roots = roots_from_pem(ca_pem)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What the host's trust store gave [`client_config_host_trust`]: for the caller to log.
#[derive(Debug, Default)]
pub struct HostTrust {
    pub added: usize,
    pub ignored: usize,
    /// Parts of the store that could not be read.
    pub errors: Vec<String>,
}

/// Client config trusting the host's trust store plus the CA(s) in `extra_ca_pem`: for peers
/// outside Stella's own PKI (registries, HTTP health probes). An unusable `extra_ca_pem` is an
/// error; an unreadable part of the host's store is reported in [`HostTrust::errors`].
pub fn client_config_host_trust(
    extra_ca_pem: Option<&str>,
) -> Result<(ClientConfig, HostTrust), PkiError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    let trust = HostTrust {
        added,
        ignored,
        errors: native.errors.iter().map(|e| e.to_string()).collect(),
    };
    if let Some(pem) = extra_ca_pem {
        for cert in certs_from_pem(pem)? {
            roots.add(cert)?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((config, trust))
}

/// Client config trusting only `ca_pem` and authenticating with the given certificate and key
/// (an agent's identity).
pub fn client_config_mtls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ClientConfig, PkiError> {
    let roots = roots_from_pem(ca_pem)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs_from_pem(cert_pem)?, private_key_from_pem(key_pem)?)?)
}

/// Server config without client authentication presenting `[server cert, CA]`. No ALPN is set;
/// callers add the protocols their HTTP stack speaks.
pub fn server_config(
    server_cert_pem: &str,
    server_key_pem: &str,
    ca_pem: &str,
) -> Result<ServerConfig, PkiError> {
    Ok(ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            server_chain(server_cert_pem, ca_pem)?,
            private_key_from_pem(server_key_pem)?,
        )?)
}

/// Server config presenting `[server cert, CA]` and requiring a client certificate issued by the
/// CA in `ca_pem`.
pub fn server_config_mtls(
    server_cert_pem: &str,
    server_key_pem: &str,
    ca_pem: &str,
) -> Result<ServerConfig, PkiError> {
    server_config_mtls_observed(server_cert_pem, server_key_pem, ca_pem, Arc::new(|_| {}))
}

/// Called with a stable reason each time a client certificate is refused during a handshake
/// (`expired`, `not_yet_valid`, `unknown_ca`, `bad_signature`, `key_mismatch`, `revoked`,
/// `invalid_certificate`), so the plane can count refusals that never reach its handlers.
pub type HandshakeObserver = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Like [`server_config_mtls`], reporting each refused client certificate to `observer`.
pub fn server_config_mtls_observed(
    server_cert_pem: &str,
    server_key_pem: &str,
    ca_pem: &str,
    observer: HandshakeObserver,
) -> Result<ServerConfig, PkiError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots_from_pem(ca_pem)?),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let client_verifier = Arc::new(ObservedClientVerifier { inner, observer });
    Ok(ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            server_chain(server_cert_pem, ca_pem)?,
            private_key_from_pem(server_key_pem)?,
        )?)
}

/// Delegates every decision to rustls' WebPKI verifier and only names the refusals.
struct ObservedClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    observer: HandshakeObserver,
}

impl std::fmt::Debug for ObservedClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedClientVerifier")
            .field("inner", &self.inner)
            .finish()
    }
}

fn refusal_reason(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "not_yet_valid"
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => "unknown_ca",
        rustls::Error::InvalidCertificate(C::BadSignature) => "bad_signature",
        rustls::Error::InvalidCertificate(C::Revoked) => "revoked",
        _ => "invalid_certificate",
    }
}

impl rustls::server::danger::ClientCertVerifier for ObservedClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| (self.observer)(refusal_reason(e)))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // A certificate presented with a key that is not its own fails here.
        self.inner
            .verify_tls12_signature(message, cert, dss)
            .inspect_err(|_| (self.observer)("key_mismatch"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .inspect_err(|_| (self.observer)("key_mismatch"))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, DEFAULT_TRUST_DOMAIN, generate_key_and_csr};
    use rustls::{ClientConnection, ServerConnection};
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    struct Plane {
        ca: CertificateAuthority,
        cert_pem: String,
        key_pem: String,
    }

    fn plane() -> Plane {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let issued = ca
            .issue_server_cert(
                &["localhost".into()],
                &[std::net::IpAddr::from([127, 0, 0, 1])],
                DAY,
            )
            .unwrap();
        Plane {
            ca,
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        }
    }

    /// Runs a full handshake over in-memory buffers and returns the first error either side saw.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
        name: &str,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let mut c = ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(name.to_string()).unwrap(),
        )?;
        let mut s = ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    fn server_cfg(p: &Plane) -> ServerConfig {
        server_config(&p.cert_pem, &p.key_pem, p.ca.cert_pem()).unwrap()
    }

    #[test]
    fn pinned_fingerprint_accepts_the_right_ca_in_any_spelling() {
        let p = plane();
        let fp = p.ca.fingerprint();
        let hex = fp.strip_prefix("sha256:").unwrap();
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        for spelling in [
            fp.clone(),
            fp.to_uppercase(),
            hex.to_string(),
            format!("SHA256:{}", colons.join(":")),
        ] {
            let client = client_config_pinned_fingerprint(&spelling).unwrap();
            handshake(client, server_cfg(&p), "localhost").unwrap();
        }
        let client = client_config_pinned_fingerprint(&fp).unwrap();
        handshake(client, server_cfg(&p), "127.0.0.1").unwrap();
    }

    #[test]
    fn pinned_fingerprint_refuses_another_ca_naming_the_expected_one() {
        let p = plane();
        let other = CertificateAuthority::generate("Other CA").unwrap();
        let client = client_config_pinned_fingerprint(&other.fingerprint()).unwrap();
        let err = handshake(client, server_cfg(&p), "localhost").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&other.fingerprint()), "{msg}");
        assert!(msg.contains("did not present the pinned CA"), "{msg}");
    }

    #[test]
    fn pinned_fingerprint_keeps_name_checks() {
        let p = plane();
        let client = client_config_pinned_fingerprint(&p.ca.fingerprint()).unwrap();
        let err = handshake(client, server_cfg(&p), "plane.example").unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
                    | rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            ),
            "{err}"
        );
    }

    #[test]
    fn pinned_fingerprint_refuses_a_leaf_not_issued_by_the_pinned_ca() {
        // An impostor that copies the real CA certificate into its chain but signs its leaf with
        // its own CA.
        let real = plane();
        let impostor = plane();
        let server = server_config(
            &impostor.cert_pem,
            &impostor.key_pem,
            &format!("{}{}", impostor.ca.cert_pem(), real.ca.cert_pem()),
        )
        .unwrap();
        let client = client_config_pinned_fingerprint(&real.ca.fingerprint()).unwrap();
        let err = handshake(client, server, "localhost").unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                    | rustls::Error::InvalidCertificate(CertificateError::BadSignature)
            ),
            "{err}"
        );
    }

    #[test]
    fn invalid_fingerprint_is_refused_up_front() {
        for bad in [
            "",
            "sha256:",
            "sha256:abcd",
            "md5:00",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(
                matches!(
                    client_config_pinned_fingerprint(bad),
                    Err(PkiError::InvalidFingerprint(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn ca_config_accepts_own_ca_and_refuses_another() {
        let p = plane();
        let client = client_config_ca(p.ca.cert_pem()).unwrap();
        handshake(client, server_cfg(&p), "localhost").unwrap();

        let other = plane();
        let client = client_config_ca(p.ca.cert_pem()).unwrap();
        let err = handshake(client, server_cfg(&other), "localhost").unwrap_err();
        // Both CAs share a subject name (as all planes' CAs do), so webpki gets as far as the
        // signature check; with distinct names it stops at the unknown issuer.
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                )
            ),
            "{err}"
        );
        let foreign = CertificateAuthority::generate("Foreign CA").unwrap();
        let leaf = foreign
            .issue_server_cert(&["localhost".into()], &[], DAY)
            .unwrap();
        let server = server_config(&leaf.cert_pem, &leaf.key_pem, foreign.cert_pem()).unwrap();
        let client = client_config_ca(p.ca.cert_pem()).unwrap();
        assert_eq!(
            handshake(client, server, "localhost").unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[test]
    fn server_presents_leaf_then_ca() {
        let p = plane();
        let client = client_config_ca(p.ca.cert_pem()).unwrap();
        let (c, _) = handshake(client, server_cfg(&p), "localhost").unwrap();
        let chain = c.peer_certificates().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].as_ref(), p.ca.cert_der());
    }

    #[test]
    fn mtls_identifies_the_agent_and_refuses_foreign_clients() {
        let p = plane();
        let (key_pem, csr) = generate_key_and_csr("a").unwrap();
        let issued =
            p.ca.sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "agent-1", DAY)
                .unwrap();
        let server = server_config_mtls(&p.cert_pem, &p.key_pem, p.ca.cert_pem()).unwrap();
        let client = client_config_mtls(p.ca.cert_pem(), &issued.cert_pem, &key_pem).unwrap();
        let (_, s) = handshake(client, server, "localhost").unwrap();
        let leaf = &s.peer_certificates().unwrap()[0];
        assert_eq!(
            crate::agent_id_from_cert(leaf, DEFAULT_TRUST_DOMAIN).unwrap(),
            "agent-1"
        );

        let foreign = plane();
        let (key_pem, csr) = generate_key_and_csr("a").unwrap();
        let issued = foreign
            .ca
            .sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "agent-1", DAY)
            .unwrap();
        let server = server_config_mtls(&p.cert_pem, &p.key_pem, p.ca.cert_pem()).unwrap();
        let client = client_config_mtls(p.ca.cert_pem(), &issued.cert_pem, &key_pem).unwrap();
        assert!(handshake(client, server, "localhost").is_err());
    }

    #[test]
    fn host_trust_takes_an_extra_ca_and_refuses_an_unusable_one() {
        let ca = crate::CertificateAuthority::generate("Registry CA").unwrap();
        let (_, trust) = client_config_host_trust(Some(ca.cert_pem())).unwrap();
        assert!(trust.errors.iter().all(|e| !e.is_empty()));
        assert!(client_config_host_trust(None).is_ok());
        for bad in [
            "not a pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            assert!(client_config_host_trust(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn install_crypto_provider_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}
