//! The control plane's certificate authority: issues the plane's TLS server certificate and the
//! agents' client certificates.

use std::net::IpAddr;
use std::time::Duration;

use rand::RngCore;
use rand::rngs::OsRng;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use crate::PkiError;
use crate::identity::{
    cert_der_from_pem, cert_serial_hex, fingerprint_der, is_valid_agent_id, is_valid_trust_domain,
    pem_encode, spiffe_agent_uri,
};

pub const DEFAULT_TRUST_DOMAIN: &str = "stella.local";

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start slightly in the past so that a peer whose clock lags a little
/// behind the plane's does not reject a certificate fresh from enrollment.
const BACKDATE: time::Duration = time::Duration::minutes(1);

/// The certificate authority of one control plane.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    // The signing key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A freshly issued certificate together with the private key generated for it.
#[derive(Clone)]
pub struct IssuedKeyPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKeyPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// A certificate issued for an agent's CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// Lowercase hex, no leading zero bytes; equal to [`crate::cert_serial_hex`] of the cert.
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
    pub spiffe_id: String,
}

/// Second precision, because that is all X.509 can encode; keeps `IssuedCert::not_after` equal
/// to what a parser later reads back from the certificate.
fn now_utc_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// A TLS server certificate's parameters: SANs = `dns_names` + `ips` (CN the first of them), EKU
/// serverAuth only, no CA rights, a random serial, `validity` from now. The plane's own
/// certificate and a relay's are issued from the same parameters, only the key differs.
fn server_cert_params(
    dns_names: &[String],
    ips: &[IpAddr],
    validity: Duration,
) -> Result<CertificateParams, PkiError> {
    let cn = match (dns_names.first(), ips.first()) {
        (Some(name), _) => name.clone(),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => return Err(PkiError::NoSubjectAltNames),
    };
    let mut sans = Vec::with_capacity(dns_names.len() + ips.len());
    for name in dns_names {
        let ia5 = Ia5String::try_from(name.as_str())
            .map_err(|_| PkiError::InvalidDnsName(name.clone()))?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    let (not_before, not_after) = validity_window(validity)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&cn);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

fn validity_window(validity: Duration) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if validity.is_zero() {
        return Err(PkiError::InvalidValidity(
            "validity must be positive".into(),
        ));
    }
    let validity = time::Duration::try_from(validity)
        .map_err(|_| PkiError::InvalidValidity(format!("{validity:?} is too long")))?;
    let now = now_utc_seconds();
    let not_after = now
        .checked_add(validity)
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| PkiError::InvalidValidity(format!("{validity} is too long")))?;
    // Backdating absorbs clock skew; for very short lifetimes (tests, aggressive settings) it is
    // capped at a tenth of the validity so that "two thirds of the life" stays meaningful.
    let backdate = BACKDATE.min(validity / 10);
    Ok((now - backdate, not_after))
}

/// Random positive 128-bit serial; the first byte is kept non-zero so the DER integer, and so
/// `serial_hex`, always has the same length.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    SerialNumber::from_slice(&bytes)
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl CertificateAuthority {
    /// ECDSA P-256 self-signed CA, CN = `common_name`, valid 10 years, basicConstraints CA with
    /// path length 0 (it only ever signs leaves), keyCertSign + cRLSign.
    pub fn generate(common_name_str: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (not_before, not_after) = validity_window(CA_VALIDITY)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(common_name_str);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key, refusing a key that does not belong to the
    /// certificate (a mixed-up key would issue certificates nobody can verify).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = cert_der_from_pem(cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::InvalidKey(e.to_string()))?;
        {
            let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
                .map_err(|e| PkiError::CertParse(e.to_string()))?;
            if !cert.is_ca() {
                return Err(PkiError::NotACa);
            }
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(PkiError::KeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)?;
        Ok(Self {
            cert_pem: pem_encode("CERTIFICATE", &cert_der),
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Checks that `cert_der` was signed by this CA. Validity dates are deliberately not checked:
    /// renewal after expiry (within a grace period the caller enforces) needs exactly this.
    pub fn verify_issued(&self, cert_der: &[u8]) -> Result<(), PkiError> {
        use x509_parser::prelude::FromDer;
        let (_, ca) = x509_parser::certificate::X509Certificate::from_der(&self.cert_der)
            .map_err(|e| PkiError::CertParse(e.to_string()))?;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
            .map_err(|e| PkiError::CertParse(e.to_string()))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| PkiError::CertParse("certificate was not issued by this CA".to_string()))
    }

    /// PKCS#8 PEM of the CA key; store it with [`crate::write_secret_file`].
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// `"sha256:<hex>"` of the CA certificate's DER: what operators hand to agents to pin.
    pub fn fingerprint(&self) -> String {
        fingerprint_der(&self.cert_der)
    }

    /// TLS server certificate for the plane with a fresh P-256 key: SANs = `dns_names` + `ips`,
    /// EKU serverAuth.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<IssuedKeyPair, PkiError> {
        let params = server_cert_params(dns_names, ips, validity)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedKeyPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// TLS server certificate for a relay's own key (from its CSR, whose self-signature is
    /// checked): SANs = `dns_names` + `ips` chosen by the plane, EKU serverAuth only. The key
    /// never leaves the relay, unlike [`Self::issue_server_cert`] for the plane's own use.
    pub fn sign_relay_server_csr(
        &self,
        csr_pem: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<String, PkiError> {
        let params = server_cert_params(dns_names, ips, validity)?;
        let public_key = verified_csr_public_key(csr_pem)?;
        Ok(params.signed_by(&public_key, &self.issuer)?.pem())
    }

    /// Signs an agent's CSR after verifying the CSR's self-signature (proof the requester holds
    /// the key).
    ///
    /// Everything the CSR asks for besides its public key is ignored: the identity comes from the
    /// plane (`agent_id`), never from the requester, so a CSR cannot smuggle in another agent's
    /// name, a server EKU or CA rights.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        trust_domain: &str,
        agent_id: &str,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        if !is_valid_trust_domain(trust_domain) {
            return Err(PkiError::InvalidTrustDomain(trust_domain.to_string()));
        }
        if !is_valid_agent_id(agent_id) {
            return Err(PkiError::InvalidAgentId(agent_id.to_string()));
        }
        let (not_before, not_after) = validity_window(validity)?;
        let public_key = verified_csr_public_key(csr_pem)?;

        let spiffe_id = spiffe_agent_uri(trust_domain, agent_id);
        let uri = Ia5String::try_from(spiffe_id.as_str())
            .map_err(|_| PkiError::InvalidSpiffeId(spiffe_id.clone()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(agent_id);
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&public_key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial_hex: cert_serial_hex(cert.der())?,
            not_after,
            spiffe_id,
        })
    }
}

/// Parses a PEM CSR, checks its self-signature and returns only its public key.
fn verified_csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, PkiError> {
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                PkiError::PemNotFound("CERTIFICATE REQUEST")
            }
            other => PkiError::CsrParse(other.to_string()),
        })?;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| PkiError::CsrParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CsrParse(format!(
            "{} trailing bytes after the CSR",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|e| match e {
        x509_parser::error::X509Error::SignatureUnsupportedAlgorithm => {
            PkiError::UnsupportedKeyAlgorithm(csr.signature_algorithm.algorithm.to_id_string())
        }
        _ => PkiError::CsrSignatureInvalid,
    })?;
    SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| PkiError::UnsupportedKeyAlgorithm(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{agent_id_from_cert, cert_not_after, generate_key_and_csr};
    use x509_parser::extensions::GeneralName;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn parse(pem: &str) -> Vec<u8> {
        cert_der_from_pem(pem).unwrap()
    }

    #[test]
    fn generated_ca_is_a_p256_ca_with_the_requested_name() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let der = ca.cert_der().to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.is_ca());
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "Test CA");
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let lifetime = cert.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
        assert!(lifetime > time::Duration::days(3640) && lifetime < time::Duration::days(3660));
        assert!(cert.verify_signature(None).is_ok(), "self-signed");
    }

    #[test]
    fn fingerprint_format() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let fp = ca.fingerprint();
        let hex = fp.strip_prefix("sha256:").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert_eq!(fp, crate::fingerprint_pem(ca.cert_pem()).unwrap());
    }

    #[test]
    fn pem_roundtrip_keeps_identity_and_signing_ability() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let loaded = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let (_, csr) = generate_key_and_csr("x").unwrap();
        let issued = loaded
            .sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "a1", DAY)
            .unwrap();
        let der = parse(&issued.cert_pem);
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(leaf.verify_signature(Some(ca_cert.public_key())).is_ok());
        assert_eq!(leaf.issuer(), ca_cert.subject());
    }

    #[test]
    fn verify_issued_tells_own_certificates_from_others() {
        let a = CertificateAuthority::generate("A").unwrap();
        let b = CertificateAuthority::generate("B").unwrap();
        let (_, csr) = crate::generate_key_and_csr("x").unwrap();
        let cert = a
            .sign_agent_csr(&csr, "stella.local", "agt_x", DAY)
            .unwrap();
        let der = crate::cert_der_from_pem(&cert.cert_pem).unwrap();
        assert!(a.verify_issued(&der).is_ok());
        assert!(b.verify_issued(&der).is_err());
    }

    #[test]
    fn from_pem_refuses_a_key_of_another_ca() {
        let a = CertificateAuthority::generate("A").unwrap();
        let b = CertificateAuthority::generate("B").unwrap();
        let err = CertificateAuthority::from_pem(a.cert_pem(), &b.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
    }

    #[test]
    fn from_pem_refuses_a_leaf_certificate() {
        let ca = CertificateAuthority::generate("A").unwrap();
        let leaf = ca
            .issue_server_cert(&["localhost".into()], &[], DAY)
            .unwrap();
        let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(err, PkiError::NotACa), "{err}");
    }

    #[test]
    fn agent_cert_ignores_requested_subject_and_sans() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        // A CSR asking to be another agent, a server and a CA at once.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        params.distinguished_name = common_name("someone-else");
        params.subject_alt_names.push(SanType::URI(
            Ia5String::try_from("spiffe://stella.local/agent/victim").unwrap(),
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let issued = ca
            .sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "agent-7", DAY)
            .unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://stella.local/agent/agent-7");
        let der = parse(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();

        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            names,
            &vec![GeneralName::URI("spiffe://stella.local/agent/agent-7")]
        );
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "agent-7");
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        // The certified key is the CSR's key.
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );

        assert_eq!(
            agent_id_from_cert(&der, DEFAULT_TRUST_DOMAIN).unwrap(),
            "agent-7"
        );
        assert_eq!(issued.serial_hex, cert_serial_hex(&der).unwrap());
        assert_eq!(issued.serial_hex.len(), 32);
        assert_eq!(cert_not_after(&issued.cert_pem).unwrap(), issued.not_after);
        let now = OffsetDateTime::now_utc();
        let nb = cert.validity().not_before.to_datetime();
        assert!(nb < now - time::Duration::seconds(50) && nb > now - time::Duration::seconds(70));
        let left = issued.not_after - now;
        assert!(left > time::Duration::hours(23) && left <= time::Duration::hours(24));
    }

    #[test]
    fn serials_are_random() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let (_, csr) = generate_key_and_csr("x").unwrap();
        let a = ca
            .sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "a", DAY)
            .unwrap();
        let b = ca
            .sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "a", DAY)
            .unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
    }

    #[test]
    fn agent_id_from_cert_refuses_another_trust_domain() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let (_, csr) = generate_key_and_csr("x").unwrap();
        let issued = ca.sign_agent_csr(&csr, "other.domain", "a1", DAY).unwrap();
        let der = parse(&issued.cert_pem);
        let err = agent_id_from_cert(&der, DEFAULT_TRUST_DOMAIN).unwrap_err();
        assert!(
            matches!(&err, PkiError::WrongTrustDomain { got, .. } if got == "other.domain"),
            "{err}"
        );
        assert_eq!(agent_id_from_cert(&der, "other.domain").unwrap(), "a1");
    }

    #[test]
    fn agent_id_from_cert_refuses_a_cert_without_spiffe_uri() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let server = ca
            .issue_server_cert(&["localhost".into()], &[], DAY)
            .unwrap();
        let err = agent_id_from_cert(&parse(&server.cert_pem), DEFAULT_TRUST_DOMAIN).unwrap_err();
        assert!(matches!(err, PkiError::NoSpiffeUri));
        assert_eq!(err.to_string(), "certificate has no spiffe URI SAN");
    }

    fn self_signed_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI(Ia5String::try_from(*u).unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn agent_id_from_cert_requires_the_exact_agent_path() {
        let td = DEFAULT_TRUST_DOMAIN;
        for bad in [
            "spiffe://stella.local/agent/",
            "spiffe://stella.local/agent/a/b",
            "spiffe://stella.local/agent/..",
            "spiffe://stella.local/plane/a1",
            "spiffe://stella.local",
            "spiffe://stella.local/agent/a%2f",
        ] {
            let err = agent_id_from_cert(&self_signed_with_uris(&[bad]), td).unwrap_err();
            assert!(matches!(err, PkiError::InvalidSpiffeId(_)), "{bad}: {err}");
        }
        let two = self_signed_with_uris(&[
            "spiffe://stella.local/agent/a1",
            "spiffe://stella.local/agent/a2",
        ]);
        assert!(matches!(
            agent_id_from_cert(&two, td),
            Err(PkiError::MultipleUriSans(2))
        ));
        let ok = self_signed_with_uris(&["spiffe://stella.local/agent/a1"]);
        assert_eq!(agent_id_from_cert(&ok, td).unwrap(), "a1");
    }

    #[test]
    fn tampered_csr_is_refused() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let (_, csr_pem) = generate_key_and_csr("honest-name").unwrap();
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        // Change the requested name in the signed part; the signature no longer covers it.
        let pos = bytes
            .windows(b"honest-name".len())
            .position(|w| w == b"honest-name")
            .unwrap();
        bytes[pos] = b'H';
        let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
        let err = ca
            .sign_agent_csr(&tampered, DEFAULT_TRUST_DOMAIN, "a1", DAY)
            .unwrap_err();
        assert!(matches!(err, PkiError::CsrSignatureInvalid), "{err}");
        assert_eq!(err.to_string(), "CSR signature invalid");
    }

    #[test]
    fn garbage_csr_and_bad_ids_are_refused() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let (_, csr) = generate_key_and_csr("x").unwrap();
        assert!(matches!(
            ca.sign_agent_csr("not a csr", DEFAULT_TRUST_DOMAIN, "a1", DAY),
            Err(PkiError::PemNotFound(_))
        ));
        let junk = pem_encode("CERTIFICATE REQUEST", b"junk");
        assert!(matches!(
            ca.sign_agent_csr(&junk, DEFAULT_TRUST_DOMAIN, "a1", DAY),
            Err(PkiError::CsrParse(_))
        ));
        assert!(matches!(
            ca.sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "../a", DAY),
            Err(PkiError::InvalidAgentId(_))
        ));
        assert!(matches!(
            ca.sign_agent_csr(&csr, "Bad Domain", "a1", DAY),
            Err(PkiError::InvalidTrustDomain(_))
        ));
        assert!(matches!(
            ca.sign_agent_csr(&csr, DEFAULT_TRUST_DOMAIN, "a1", Duration::ZERO),
            Err(PkiError::InvalidValidity(_))
        ));
    }

    #[test]
    fn server_cert_has_requested_names_and_server_eku() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let ips = [IpAddr::from([127, 0, 0, 1])];
        let issued = ca
            .issue_server_cert(&["localhost".into(), "plane.example".into()], &ips, DAY)
            .unwrap();
        assert!(issued.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let der = parse(&issued.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let names = &cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::DNSName("plane.example")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(matches!(
            ca.issue_server_cert(&[], &[], DAY),
            Err(PkiError::NoSubjectAltNames)
        ));
    }

    #[test]
    fn ca_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CertificateAuthority>();
    }
}
