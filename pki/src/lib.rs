//! Stella's PKI: the control plane's certificate authority, agent identities (SPIFFE-style URI
//! SANs), DSSE-signed jobs and their offline verification by agents, bearer tokens, TLS configs
//! and secret files.
//!
//! The only rustls crypto provider used is ring.

mod bundle;
mod ca;
mod canonical;
mod dsse;
mod error;
mod files;
mod identity;
mod job;
mod receipt;
mod renewal;
mod sealed;
mod tls;
mod token;

pub use bundle::{
    BundleError, TRUST_BUNDLE_PAYLOAD_TYPE, TrustBundleDocument, sign_bundle, verify_bundle,
};
pub use ca::{CertificateAuthority, DEFAULT_TRUST_DOMAIN, IssuedCert, IssuedKeyPair};
pub use canonical::{canonical_digest, canonical_json, sha256_digest};
pub use dsse::{
    DsseError, ED25519, Envelope, PublicKeyRecord, Signature, SigningKey, TrustedKeys,
    decode_payload, pae,
};
pub use error::PkiError;
pub use files::write_secret_file;
pub use identity::{
    agent_id_from_cert, cert_der_from_pem, cert_not_after, cert_serial_hex, certs_from_pem,
    fingerprint_der, fingerprint_pem, generate_key_and_csr, is_valid_agent_id,
    is_valid_trust_domain, spiffe_agent_uri,
};
pub use job::{
    BLUE_GREEN_TARGET_KINDS, DEPLOY_MODES, DeployMode, HealthCheckJob, HttpProbe, JOB_KINDS,
    JOB_PAYLOAD_TYPE, JobComponent, JobKind, JobPayload, JobRefusal, JobTarget, JobVerifier,
    MAX_ENVELOPE_BYTES, MAX_HEALTHY_AFTER, MAX_STEP_JOB_TIMEOUT_MS, STEP_CAPABILITIES, ScriptJob,
    envelope_digest, sign_job,
};
pub use receipt::{
    RECEIPT_PAYLOAD_TYPE, ReceiptError, ReceiptPayload, result_digest, sign_receipt,
    sign_with_agent_key, verify_receipt, verify_with_cert,
};
pub use renewal::{cert_matches_key, cert_validity, issued_by, renewal_proof_message};
pub use sealed::{KEK_LEN, KeyEncryptionKey, SealError};
pub use tls::{
    HandshakeObserver, HostTrust, client_config_ca, client_config_host_trust, client_config_mtls,
    client_config_pinned_fingerprint, install_crypto_provider, parse_fingerprint,
    private_key_from_pem, server_config, server_config_mtls, server_config_mtls_observed,
};
pub use token::{generate_api_token, generate_join_token, hash_token, token_matches};
