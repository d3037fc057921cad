//! Trust bundles: the set of job-signing keys an agent accepts, versioned and signed.
//!
//! Keys rotate with overlap: a new key first joins the bundle next to the current one, agents
//! acknowledge it, only then does the plane sign with it and drop the old one. A bundle is a
//! DSSE envelope signed by a key the agent already trusts, so whoever carries it (a relay, a
//! proxy) cannot add a key of its own.

use serde::{Deserialize, Serialize};

use crate::dsse::{DsseError, Envelope, PublicKeyRecord, SigningKey, TrustedKeys};

pub const TRUST_BUNDLE_PAYLOAD_TYPE: &str = "application/vnd.stella.trust-bundle.v1+json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundleDocument {
    /// Strictly increasing; an agent never goes back to an older bundle.
    pub version: u64,
    pub job_signing_keys: Vec<PublicKeyRecord>,
    /// CA certificates (PEM) the agent trusts for the plane and that issue agent certificates,
    /// the one serving the plane first. Empty in bundles that do not change CAs.
    #[serde(default)]
    pub ca_pems: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("trust bundle is not signed by a trusted key: {0}")]
    Signature(#[from] DsseError),
    #[error("trust bundle is malformed: {0}")]
    Malformed(String),
    #[error("trust bundle version {got} is not newer than {current}")]
    Stale { got: u64, current: u64 },
    #[error("trust bundle lists no job-signing key")]
    Empty,
}

pub fn sign_bundle(key: &SigningKey, doc: &TrustBundleDocument) -> Result<Envelope, BundleError> {
    let body = serde_json::to_vec(doc).map_err(|e| BundleError::Malformed(e.to_string()))?;
    Ok(key.sign(TRUST_BUNDLE_PAYLOAD_TYPE, &body))
}

/// Verifies a bundle with the keys the agent trusts now and checks it is newer than `current`.
pub fn verify_bundle(
    trusted: &TrustedKeys,
    current_version: u64,
    env: &Envelope,
) -> Result<TrustBundleDocument, BundleError> {
    let body = trusted.verify(env, TRUST_BUNDLE_PAYLOAD_TYPE)?;
    let doc: TrustBundleDocument =
        serde_json::from_slice(&body).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if doc.version <= current_version {
        return Err(BundleError::Stale {
            got: doc.version,
            current: current_version,
        });
    }
    if doc.job_signing_keys.is_empty() {
        return Err(BundleError::Empty);
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_trusted_newer_bundles_are_accepted() {
        let old = SigningKey::generate();
        let new = SigningKey::generate();
        let trusted = TrustedKeys {
            keys: vec![old.public_key()],
        };
        let doc = TrustBundleDocument {
            version: 2,
            job_signing_keys: vec![old.public_key(), new.public_key()],
            ca_pems: vec![],
        };
        let env = sign_bundle(&old, &doc).unwrap();
        assert_eq!(verify_bundle(&trusted, 1, &env).unwrap(), doc);
        assert!(matches!(
            verify_bundle(&trusted, 2, &env),
            Err(BundleError::Stale { .. })
        ));
        // A bundle signed by a key the agent does not trust yet (e.g. injected by a relay).
        let forged = sign_bundle(&new, &doc).unwrap();
        assert!(matches!(
            verify_bundle(&trusted, 1, &forged),
            Err(BundleError::Signature(_))
        ));
        let empty = sign_bundle(
            &old,
            &TrustBundleDocument {
                version: 3,
                job_signing_keys: vec![],
                ca_pems: vec![],
            },
        )
        .unwrap();
        assert_eq!(verify_bundle(&trusted, 1, &empty), Err(BundleError::Empty));
    }
}
