/// Why a packet could not be built, decoded or exported. Verification problems are not errors:
/// they are collected in a [`crate::VerificationReport`].
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// The content handed to the chain does not describe a well-formed packet; nothing was
    /// signed and the chain did not advance.
    #[error("invalid evidence content: {field}: {reason}")]
    InvalidContent { field: String, reason: String },
    /// A stored or received packet could not be read back.
    #[error("evidence packet cannot be decoded: {0}")]
    Decode(String),
    /// The chain's sequence counter cannot advance any further.
    #[error("evidence chain is full: sequence {0} is the last one")]
    SequenceExhausted(u64),
    #[error("JSON encoding failed: {0}")]
    Json(#[from] serde_json::Error),
    /// A bundle file is not a bundle this version can read.
    #[error("not a readable evidence bundle: {0}")]
    BundleFormat(String),
    /// The material handed to the exporter cannot make a self-contained bundle.
    #[error("cannot export evidence bundle: {0}")]
    Export(String),
}

impl EvidenceError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidContent {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
