//! Agent identity: key and CSR generation on the agent, and SPIFFE-style identity extraction from
//! certificates on both sides.

use base64::Engine as _;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

use crate::PkiError;

/// Generates an ECDSA P-256 key locally and a CSR for it (subject CN = `requested_name`).
///
/// Returns `(key_pem, csr_pem)`. The key never needs to leave the agent: the CA only sees the CSR.
pub fn generate_key_and_csr(requested_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, requested_name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// `"sha256:"` + lowercase hex SHA-256 of `der`.
pub fn fingerprint_der(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Fingerprint (see [`fingerprint_der`]) of the first certificate in `cert_pem`.
pub fn fingerprint_pem(cert_pem: &str) -> Result<String, PkiError> {
    Ok(fingerprint_der(&cert_der_from_pem(cert_pem)?))
}

/// All certificates of a PEM bundle, in order. Fails if there is none.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::InvalidPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::PemNotFound("CERTIFICATE"));
    }
    Ok(certs)
}

/// DER bytes of the first certificate in `pem`.
pub fn cert_der_from_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    let mut certs = certs_from_pem(pem)?;
    Ok(certs.swap_remove(0).to_vec())
}

/// `spiffe://<trust_domain>/agent/<agent_id>`.
pub fn spiffe_agent_uri(trust_domain: &str, agent_id: &str) -> String {
    format!("spiffe://{trust_domain}/agent/{agent_id}")
}

/// Agent ids become a SPIFFE path segment and file names, so they are restricted to a small,
/// unambiguous alphabet; "." and ".." are refused because SPIFFE forbids them as segments.
pub fn is_valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// SPIFFE trust domains are lowercase-only, at most 255 characters.
pub fn is_valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

fn parse_cert(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, PkiError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::CertParse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CertParse(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// Returns the agent id named by the certificate's URI SAN, which must be exactly
/// `spiffe://<trust_domain>/agent/<id>`.
///
/// This only reads the identity: the caller must already have verified the chain (the TLS stack
/// does so for peer certificates).
pub fn agent_id_from_cert(cert_der: &[u8], trust_domain: &str) -> Result<String, PkiError> {
    let cert = parse_cert(cert_der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::CertParse(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    // X509-SVIDs carry exactly one URI SAN; a second one would make the identity ambiguous.
    if !uris.iter().any(|u| u.starts_with("spiffe://")) {
        return Err(PkiError::NoSpiffeUri);
    }
    if uris.len() > 1 {
        return Err(PkiError::MultipleUriSans(uris.len()));
    }
    let uri = uris[0];
    let rest = &uri["spiffe://".len()..];
    let (td, path) = rest
        .split_once('/')
        .ok_or_else(|| PkiError::InvalidSpiffeId(uri.to_string()))?;
    if td != trust_domain {
        return Err(PkiError::WrongTrustDomain {
            expected: trust_domain.to_string(),
            got: td.to_string(),
        });
    }
    match path.strip_prefix("agent/") {
        Some(id) if is_valid_agent_id(id) => Ok(id.to_string()),
        _ => Err(PkiError::InvalidSpiffeId(uri.to_string())),
    }
}

/// notAfter of the first certificate in `cert_pem`.
pub fn cert_not_after(cert_pem: &str) -> Result<time::OffsetDateTime, PkiError> {
    let der = cert_der_from_pem(cert_pem)?;
    let cert = parse_cert(&der)?;
    Ok(cert.validity().not_after.to_datetime())
}

/// Serial number of a DER certificate as lowercase hex without leading zero bytes; the same form
/// as [`crate::IssuedCert::serial_hex`], so the two can be compared as strings.
pub fn cert_serial_hex(cert_der: &[u8]) -> Result<String, PkiError> {
    let cert = parse_cert(cert_der)?;
    let raw = cert.raw_serial();
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    Ok(hex::encode(&raw[first..]))
}

/// PEM-armors DER with 64-column base64 lines, as RFC 7468 requires for strict parsers.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so any byte split is a char boundary.
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_csr_are_pem_and_csr_self_signature_verifies() {
        let (key_pem, csr_pem) = generate_key_and_csr("web-01").unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
        let cn = parsed
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .unwrap();
        assert_eq!(cn, &rcgen::DnValue::Utf8String("web-01".to_string()));
    }

    #[test]
    fn fingerprint_format() {
        let fp = fingerprint_der(b"abc");
        assert_eq!(
            fp,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn certs_from_pem_rejects_input_without_certificates() {
        assert!(matches!(
            certs_from_pem("hello"),
            Err(PkiError::PemNotFound("CERTIFICATE"))
        ));
    }

    #[test]
    fn agent_id_validation() {
        for ok in [
            "a",
            "agent-1",
            "A.b_c-9",
            "550e8400-e29b-41d4-a716-446655440000",
        ] {
            assert!(is_valid_agent_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", "a%2f"] {
            assert!(!is_valid_agent_id(bad), "{bad}");
        }
        assert!(is_valid_trust_domain("stella.local"));
        assert!(!is_valid_trust_domain("Stella.local"));
        assert!(!is_valid_trust_domain(""));
    }

    #[test]
    fn pem_encode_roundtrips_through_a_strict_parser() {
        let der: Vec<u8> = (0..=255u8).collect();
        let pem = pem_encode("CERTIFICATE", &der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(back.as_ref(), der.as_slice());
    }
}
