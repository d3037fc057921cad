/// Everything that can go wrong while handling keys, certificates and signatures.
///
/// Messages name the precise check that failed because they end up in operator-facing errors
/// (enrollment refusals, startup failures) where "invalid certificate" alone would not help.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no {0} block found in PEM input")]
    PemNotFound(&'static str),
    #[error("invalid PEM input: {0}")]
    InvalidPem(String),
    #[error("CSR could not be parsed: {0}")]
    CsrParse(String),
    #[error("CSR signature invalid")]
    CsrSignatureInvalid,
    #[error("unsupported key algorithm: {0}")]
    UnsupportedKeyAlgorithm(String),
    #[error("certificate could not be parsed: {0}")]
    CertParse(String),
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    #[error("CA private key does not match the CA certificate's public key")]
    KeyMismatch,
    #[error("certificate is not a CA certificate (basicConstraints CA:TRUE missing)")]
    NotACa,
    #[error("certificate has no spiffe URI SAN")]
    NoSpiffeUri,
    #[error("certificate has {0} URI SANs; an identity certificate must have exactly one")]
    MultipleUriSans(usize),
    #[error("certificate belongs to trust domain {got:?}, expected {expected:?}")]
    WrongTrustDomain { expected: String, got: String },
    #[error("invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/agent/<agent-id>")]
    InvalidSpiffeId(String),
    #[error("invalid agent id {0:?}: must be non-empty and use only A-Z a-z 0-9 . _ -")]
    InvalidAgentId(String),
    #[error("invalid trust domain {0:?}: must be non-empty and use only a-z 0-9 . _ -")]
    InvalidTrustDomain(String),
    #[error("invalid DNS name {0:?} for a certificate")]
    InvalidDnsName(String),
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoSubjectAltNames,
    #[error("invalid certificate validity: {0}")]
    InvalidValidity(String),
    #[error("invalid fingerprint {0:?}: expected sha256:<64 hex digits>")]
    InvalidFingerprint(String),
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("JSON encoding failed: {0}")]
    Json(#[from] serde_json::Error),
}
