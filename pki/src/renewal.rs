//! Certificate renewal helpers shared by agent and plane.
//!
//! In-band renewal needs nothing here (the mTLS session already proves the agent's identity).
//! An agent that was offline past its certificate's expiry cannot complete a handshake, so it
//! renews over the REST API with a *proof of possession*: a signature, with its previous key, over
//! this fixed message. The plane accepts it within a grace period unless the agent was revoked.

use x509_parser::prelude::FromDer;

/// The exact bytes an agent signs to prove it holds its previous key.
pub fn renewal_proof_message(agent_id: &str, csr_pem: &str, timestamp_unix_ms: i64) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let csr_digest = hex::encode(Sha256::digest(csr_pem.as_bytes()));
    format!("stella-renew-v1\n{agent_id}\nsha256:{csr_digest}\n{timestamp_unix_ms}\n").into_bytes()
}

/// Whether the certificate carries the public key of `key_pem` (a renewed certificate must).
pub fn cert_matches_key(cert_der: &[u8], key_pem: &str) -> bool {
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(cert_der) else {
        return false;
    };
    use rcgen::PublicKeyData;
    cert.tbs_certificate.subject_pki.raw == key.subject_public_key_info().as_slice()
}

/// Whether `cert_der` was signed by the CA certificate `ca_pem` (dates not checked).
pub fn issued_by(cert_der: &[u8], ca_pem: &str) -> bool {
    let Ok(ca_der) = crate::cert_der_from_pem(ca_pem) else {
        return false;
    };
    let (Ok((_, ca)), Ok((_, cert))) = (
        x509_parser::certificate::X509Certificate::from_der(&ca_der),
        x509_parser::certificate::X509Certificate::from_der(cert_der),
    ) else {
        return false;
    };
    cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// Validity window of a certificate as unix seconds (not before, not after).
pub fn cert_validity(cert_der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
    Some((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, cert_der_from_pem, generate_key_and_csr};

    #[test]
    fn cert_matches_only_its_own_key() {
        let ca = CertificateAuthority::generate("t").unwrap();
        let (key, csr) = generate_key_and_csr("a").unwrap();
        let (other, _) = generate_key_and_csr("b").unwrap();
        let cert = ca
            .sign_agent_csr(
                &csr,
                "stella.local",
                "agt_a",
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        let der = cert_der_from_pem(&cert.cert_pem).unwrap();
        assert!(cert_matches_key(&der, &key));
        assert!(!cert_matches_key(&der, &other));
        let (nb, na) = cert_validity(&der).unwrap();
        assert!(na > nb);
    }

    #[test]
    fn proof_message_binds_every_field() {
        let m = renewal_proof_message("agt_a", "csr", 1);
        assert_ne!(m, renewal_proof_message("agt_b", "csr", 1));
        assert_ne!(m, renewal_proof_message("agt_a", "csr2", 1));
        assert_ne!(m, renewal_proof_message("agt_a", "csr", 2));
    }
}
