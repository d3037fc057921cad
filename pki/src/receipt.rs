//! Agent receipts: every job result is signed by the agent (DSSE over the result and the digest
//! of the job envelope it answers) with the private key behind its mTLS certificate, so that a
//! result can later be shown to come from that agent and no other — also after it passed
//! through relays, spools or the plane's database.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rcgen::SigningKey as _;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;

use crate::dsse::{Envelope, Signature, pae};
use crate::identity::fingerprint_der;

/// Signs `message` with an agent's ECDSA P-256 private key (ASN.1 DER signature).
pub fn sign_with_agent_key(agent_key_pem: &str, message: &[u8]) -> Result<Vec<u8>, ReceiptError> {
    let key =
        rcgen::KeyPair::from_pem(agent_key_pem).map_err(|e| ReceiptError::Key(e.to_string()))?;
    key.sign(message)
        .map_err(|e| ReceiptError::Key(e.to_string()))
}

/// Verifies an ECDSA P-256 signature made with the key of the given certificate.
pub fn verify_with_cert(
    cert_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), ReceiptError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(|e| ReceiptError::Malformed(format!("certificate: {e}")))?;
    let public_key = &cert.tbs_certificate.subject_pki.subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(message, signature)
        .map_err(|_| ReceiptError::BadSignature)
}

pub const RECEIPT_PAYLOAD_TYPE: &str = "application/vnd.stella.receipt.v1+json";

/// What an agent attests about one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptPayload {
    pub job_id: String,
    pub agent_id: String,
    /// sha256 of the exact envelope bytes the agent was offered.
    pub envelope_digest: String,
    /// `succeeded`, `failed` or `refused`.
    pub status: String,
    pub reason_code: String,
    /// sha256 over the result message and outcome, binding them without repeating them.
    pub result_digest: String,
    pub finished_at_unix_ms: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("receipt is malformed: {0}")]
    Malformed(String),
    #[error("receipt has payload type {0:?}, expected a Stella receipt")]
    WrongPayloadType(String),
    #[error("receipt is signed by key {got}, not by the agent's certificate key {expected}")]
    WrongKey { expected: String, got: String },
    #[error("receipt signature does not verify against the agent's certificate")]
    BadSignature,
    #[error("agent key cannot sign: {0}")]
    Key(String),
}

/// sha256 over message and outcome (length-prefixed so the split point is unambiguous).
pub fn result_digest(message: &str, outcome_json: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((message.len() as u64).to_be_bytes());
    h.update(message.as_bytes());
    h.update(outcome_json.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Signs a receipt with the agent's ECDSA P-256 key; the key id is the certificate's fingerprint.
pub fn sign_receipt(
    agent_key_pem: &str,
    agent_cert_der: &[u8],
    payload: &ReceiptPayload,
) -> Result<Envelope, ReceiptError> {
    let key =
        rcgen::KeyPair::from_pem(agent_key_pem).map_err(|e| ReceiptError::Key(e.to_string()))?;
    let body = serde_json::to_vec(payload).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    let sig = key
        .sign(&pae(RECEIPT_PAYLOAD_TYPE, &body))
        .map_err(|e| ReceiptError::Key(e.to_string()))?;
    Ok(Envelope {
        payload: B64.encode(&body),
        payload_type: RECEIPT_PAYLOAD_TYPE.to_string(),
        signatures: vec![Signature {
            keyid: fingerprint_der(agent_cert_der),
            sig: B64.encode(sig),
        }],
    })
}

/// Verifies a receipt against the agent's certificate (DER) and returns what it attests.
pub fn verify_receipt(
    agent_cert_der: &[u8],
    env: &Envelope,
) -> Result<ReceiptPayload, ReceiptError> {
    if env.payload_type != RECEIPT_PAYLOAD_TYPE {
        return Err(ReceiptError::WrongPayloadType(env.payload_type.clone()));
    }
    let expected = fingerprint_der(agent_cert_der);
    let sig = env
        .signatures
        .first()
        .ok_or_else(|| ReceiptError::Malformed("no signature".to_string()))?;
    if sig.keyid != expected {
        return Err(ReceiptError::WrongKey {
            expected,
            got: sig.keyid.clone(),
        });
    }
    let body = B64
        .decode(&env.payload)
        .map_err(|e| ReceiptError::Malformed(format!("payload: {e}")))?;
    let sig_bytes = B64
        .decode(&sig.sig)
        .map_err(|e| ReceiptError::Malformed(format!("signature: {e}")))?;
    verify_with_cert(
        agent_cert_der,
        &pae(RECEIPT_PAYLOAD_TYPE, &body),
        &sig_bytes,
    )?;
    serde_json::from_slice(&body).map_err(|e| ReceiptError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, cert_der_from_pem, generate_key_and_csr};

    fn agent(ca: &CertificateAuthority, id: &str) -> (String, Vec<u8>) {
        let (key, csr) = generate_key_and_csr(id).unwrap();
        let cert = ca
            .sign_agent_csr(
                &csr,
                "stella.local",
                id,
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        (key, cert_der_from_pem(&cert.cert_pem).unwrap())
    }

    fn payload() -> ReceiptPayload {
        ReceiptPayload {
            job_id: "job_1".into(),
            agent_id: "agt_a".into(),
            envelope_digest: "sha256:00".into(),
            status: "succeeded".into(),
            reason_code: String::new(),
            result_digest: result_digest("", "{}"),
            finished_at_unix_ms: 5,
        }
    }

    #[test]
    fn roundtrip_and_binding_to_the_agent_key() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let (key_a, cert_a) = agent(&ca, "agt_a");
        let (_key_b, cert_b) = agent(&ca, "agt_b");
        let env = sign_receipt(&key_a, &cert_a, &payload()).unwrap();
        assert_eq!(verify_receipt(&cert_a, &env).unwrap(), payload());
        // Another agent's certificate cannot vouch for it.
        assert!(matches!(
            verify_receipt(&cert_b, &env),
            Err(ReceiptError::WrongKey { .. })
        ));
        // Same key id but another key's signature.
        let (key_c, _) = agent(&ca, "agt_c");
        let forged = sign_receipt(&key_c, &cert_a, &payload()).unwrap();
        assert_eq!(
            verify_receipt(&cert_a, &forged),
            Err(ReceiptError::BadSignature)
        );
        // Tampered payload.
        let mut tampered = env.clone();
        let mut p = payload();
        p.status = "failed".into();
        tampered.payload = B64.encode(serde_json::to_vec(&p).unwrap());
        assert_eq!(
            verify_receipt(&cert_a, &tampered),
            Err(ReceiptError::BadSignature)
        );
    }

    #[test]
    fn result_digest_separates_message_and_outcome() {
        assert_ne!(result_digest("ab", "c"), result_digest("a", "bc"));
        assert_eq!(result_digest("a", "b"), result_digest("a", "b"));
    }
}
