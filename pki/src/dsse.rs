//! DSSE v1 envelopes (<https://github.com/secure-systems-lab/dsse/blob/master/protocol.md>)
//! signed with Ed25519.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer as _, VerifyingKey};
use rand::rngs::OsRng;
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::PkiError;
use crate::identity::pem_encode;

pub const ED25519: &str = "ed25519";

/// The JSON envelope of the DSSE spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Standard base64 of the payload bytes.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    /// Standard base64 of the signature over PAE.
    pub sig: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DsseError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("payload type is {got:?}, expected {expected:?}")]
    WrongPayloadType { expected: String, got: String },
    #[error("envelope carries no signatures")]
    NoSignatures,
    #[error("signed by key {0:?}, which is not a trusted key")]
    UnknownKeyId(String),
    #[error("signature by trusted key {0} does not verify")]
    BadSignature(String),
}

/// Pre-Authentication Encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, LEN being the ASCII decimal byte length.
///
/// Signing PAE rather than the payload binds the payload type into the signature, so a signed
/// document cannot be re-labelled as another kind of document.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let header = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    );
    let mut out = Vec::with_capacity(header.len() + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decodes an envelope's payload WITHOUT verifying anything. Only for re-reading envelopes that
/// were verified earlier (e.g. a journal of accepted jobs); use [`TrustedKeys::verify`] for
/// anything received.
pub fn decode_payload(env: &Envelope) -> Result<Vec<u8>, DsseError> {
    STANDARD
        .decode(env.payload.as_bytes())
        .map_err(|e| DsseError::Malformed(format!("payload is not standard base64: {e}")))
}

fn key_id_for(public: &VerifyingKey) -> String {
    let digest = hex::encode(Sha256::digest(public.as_bytes()));
    format!("{ED25519}:{}", &digest[..16])
}

/// An Ed25519 signing key with its derived key id.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    // The secret stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    fn from_dalek(key: ed25519_dalek::SigningKey) -> Self {
        let key_id = key_id_for(&key.verifying_key());
        Self { key, key_id }
    }

    pub fn generate() -> Self {
        Self::from_dalek(ed25519_dalek::SigningKey::generate(&mut OsRng))
    }

    /// Loads a PKCS#8 PEM ("PRIVATE KEY") Ed25519 key, v1 or v2 (as written by OpenSSL or
    /// [`SigningKey::to_pem`]).
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => PkiError::PemNotFound("PRIVATE KEY"),
            other => PkiError::InvalidPem(other.to_string()),
        })?;
        let key = ed25519_dalek::SigningKey::from_pkcs8_der(der.secret_pkcs8_der())
            .map_err(|e| PkiError::InvalidKey(format!("not a PKCS#8 Ed25519 key: {e}")))?;
        Ok(Self::from_dalek(key))
    }

    /// PKCS#8 PEM of the key; store it with [`crate::write_secret_file`].
    pub fn to_pem(&self) -> Result<String, PkiError> {
        let doc = self
            .key
            .to_pkcs8_der()
            .map_err(|e| PkiError::InvalidKey(e.to_string()))?;
        Ok(pem_encode("PRIVATE KEY", doc.as_bytes()))
    }

    /// `"ed25519:"` + first 16 hex chars of SHA-256 over the raw public key.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public_key(&self) -> PublicKeyRecord {
        PublicKeyRecord {
            key_id: self.key_id.clone(),
            algorithm: ED25519.to_string(),
            public_key: STANDARD.encode(self.key.verifying_key().as_bytes()),
        }
    }

    /// Signs `PAE(payload_type, payload)` and wraps it in a single-signature envelope.
    pub fn sign(&self, payload_type: &str, payload: &[u8]) -> Envelope {
        let sig = self.key.sign(&pae(payload_type, payload));
        Envelope {
            payload: STANDARD.encode(payload),
            payload_type: payload_type.to_string(),
            signatures: vec![Signature {
                keyid: self.key_id.clone(),
                sig: STANDARD.encode(sig.to_bytes()),
            }],
        }
    }
}

/// A public key as distributed in trust bundles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyRecord {
    pub key_id: String,
    /// Always `"ed25519"`.
    pub algorithm: String,
    /// Standard base64 of the raw 32-byte public key.
    pub public_key: String,
}

impl PublicKeyRecord {
    /// The key, if the record is well-formed (right algorithm, 32 bytes, a valid curve point).
    pub fn verifying_key(&self) -> Result<VerifyingKey, PkiError> {
        if self.algorithm != ED25519 {
            return Err(PkiError::UnsupportedKeyAlgorithm(self.algorithm.clone()));
        }
        let bytes: [u8; 32] = STANDARD
            .decode(self.public_key.as_bytes())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                PkiError::InvalidKey(format!(
                    "public key of {} is not base64 of 32 bytes",
                    self.key_id
                ))
            })?;
        VerifyingKey::from_bytes(&bytes).map_err(|e| {
            PkiError::InvalidKey(format!("public key of {} is invalid: {e}", self.key_id))
        })
    }
}

/// The set of job-signing keys an agent pinned at enrollment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrustedKeys {
    pub keys: Vec<PublicKeyRecord>,
}

impl TrustedKeys {
    /// Verifies `env` per the DSSE protocol and returns the decoded payload.
    ///
    /// Accepts when at least one signature's keyid is trusted and its signature over
    /// `PAE(env.payloadType, payload)` verifies (Ed25519 `verify_strict`, which rejects
    /// malleable and small-order forms). As the protocol prescribes, the payload type is checked
    /// after the signature.
    ///
    /// Errors: signatures only from unknown keys → `UnknownKeyId` (the first one); a trusted key's
    /// signature failing → `BadSignature`.
    pub fn verify(
        &self,
        env: &Envelope,
        expected_payload_type: &str,
    ) -> Result<Vec<u8>, DsseError> {
        let payload = decode_payload(env)?;
        if env.signatures.is_empty() {
            return Err(DsseError::NoSignatures);
        }
        let message = pae(&env.payload_type, &payload);
        let mut failed_known: Option<&str> = None;
        let mut verified = false;
        for signature in &env.signatures {
            let candidates: Vec<&PublicKeyRecord> = self
                .keys
                .iter()
                .filter(|k| k.key_id == signature.keyid)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let sig_bytes = STANDARD.decode(signature.sig.as_bytes()).map_err(|e| {
                DsseError::Malformed(format!(
                    "signature by {} is not standard base64: {e}",
                    signature.keyid
                ))
            })?;
            let ok = <[u8; 64]>::try_from(sig_bytes.as_slice()).is_ok_and(|raw| {
                let sig = ed25519_dalek::Signature::from_bytes(&raw);
                candidates.iter().any(|record| {
                    record
                        .verifying_key()
                        .is_ok_and(|vk| vk.verify_strict(&message, &sig).is_ok())
                })
            });
            if ok {
                verified = true;
                break;
            }
            failed_known.get_or_insert(signature.keyid.as_str());
        }
        if !verified {
            return Err(match failed_known {
                Some(keyid) => DsseError::BadSignature(keyid.to_string()),
                None => DsseError::UnknownKeyId(env.signatures[0].keyid.clone()),
            });
        }
        if env.payload_type != expected_payload_type {
            return Err(DsseError::WrongPayloadType {
                expected: expected_payload_type.to_string(),
                got: env.payload_type.clone(),
            });
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "application/vnd.test+json";

    fn trust(keys: &[&SigningKey]) -> TrustedKeys {
        TrustedKeys {
            keys: keys.iter().map(|k| k.public_key()).collect(),
        }
    }

    #[test]
    fn pae_matches_the_spec_example() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn pae_counts_bytes_not_chars() {
        assert_eq!(pae("t", "é".as_bytes()), b"DSSEv1 1 t 2 \xc3\xa9".to_vec());
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn roundtrip() {
        let key = SigningKey::generate();
        let env = key.sign(TYPE, b"{\"a\":1}");
        assert_eq!(env.signatures[0].keyid, key.key_id());
        assert_eq!(trust(&[&key]).verify(&env, TYPE).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn signature_is_over_pae_and_json_field_names_follow_the_spec() {
        let key = SigningKey::generate();
        let env = key.sign(TYPE, b"body");
        let raw: [u8; 64] = STANDARD
            .decode(&env.signatures[0].sig)
            .unwrap()
            .try_into()
            .unwrap();
        let vk = key.public_key().verifying_key().unwrap();
        vk.verify_strict(
            &pae(TYPE, b"body"),
            &ed25519_dalek::Signature::from_bytes(&raw),
        )
        .unwrap();
        let json: serde_json::Value = serde_json::to_value(&env).unwrap();
        assert_eq!(json["payloadType"], TYPE);
        assert_eq!(json["payload"], STANDARD.encode(b"body"));
        assert!(json["signatures"][0]["keyid"].is_string());
        assert!(json["signatures"][0]["sig"].is_string());
    }

    #[test]
    fn tampered_payload_is_bad_signature() {
        let key = SigningKey::generate();
        let mut env = key.sign(TYPE, b"deploy v1");
        env.payload = STANDARD.encode(b"deploy v2");
        assert_eq!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::BadSignature(key.key_id().to_string()))
        );
    }

    #[test]
    fn tampered_signature_is_bad_signature() {
        let key = SigningKey::generate();
        let mut env = key.sign(TYPE, b"x");
        let mut raw = STANDARD.decode(&env.signatures[0].sig).unwrap();
        raw[10] ^= 0x01;
        env.signatures[0].sig = STANDARD.encode(&raw);
        assert_eq!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::BadSignature(key.key_id().to_string()))
        );
        env.signatures[0].sig = STANDARD.encode(&raw[..63]);
        assert_eq!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::BadSignature(key.key_id().to_string()))
        );
    }

    #[test]
    fn relabelled_payload_type_does_not_verify() {
        let key = SigningKey::generate();
        let mut env = key.sign("application/other", b"x");
        env.payload_type = TYPE.to_string();
        assert!(matches!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::BadSignature(_))
        ));
    }

    #[test]
    fn signature_by_untrusted_key_is_unknown_key_id() {
        let trusted = SigningKey::generate();
        let other = SigningKey::generate();
        let env = other.sign(TYPE, b"x");
        assert_eq!(
            trust(&[&trusted]).verify(&env, TYPE),
            Err(DsseError::UnknownKeyId(other.key_id().to_string()))
        );
    }

    #[test]
    fn key_id_claimed_by_an_impostor_is_bad_signature() {
        let trusted = SigningKey::generate();
        let impostor = SigningKey::generate();
        let mut env = impostor.sign(TYPE, b"x");
        env.signatures[0].keyid = trusted.key_id().to_string();
        assert_eq!(
            trust(&[&trusted]).verify(&env, TYPE),
            Err(DsseError::BadSignature(trusted.key_id().to_string()))
        );
    }

    #[test]
    fn one_good_signature_among_others_is_enough() {
        let trusted = SigningKey::generate();
        let other = SigningKey::generate();
        let mut env = trusted.sign(TYPE, b"x");
        let foreign = other.sign(TYPE, b"x").signatures.remove(0);
        env.signatures.insert(0, foreign);
        assert_eq!(trust(&[&trusted]).verify(&env, TYPE).unwrap(), b"x");
    }

    #[test]
    fn wrong_payload_type() {
        let key = SigningKey::generate();
        let env = key.sign("application/other", b"x");
        assert_eq!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::WrongPayloadType {
                expected: TYPE.to_string(),
                got: "application/other".to_string()
            })
        );
    }

    #[test]
    fn garbage_base64_is_malformed() {
        let key = SigningKey::generate();
        let mut env = key.sign(TYPE, b"x");
        env.payload = "!!!not base64!!!".to_string();
        assert!(matches!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::Malformed(_))
        ));
        let mut env = key.sign(TYPE, b"x");
        env.signatures[0].sig = "%%%".to_string();
        assert!(matches!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::Malformed(_))
        ));
    }

    #[test]
    fn no_signatures() {
        let key = SigningKey::generate();
        let mut env = key.sign(TYPE, b"x");
        env.signatures.clear();
        assert_eq!(
            trust(&[&key]).verify(&env, TYPE),
            Err(DsseError::NoSignatures)
        );
    }

    #[test]
    fn pem_roundtrip_keeps_key_and_id() {
        let key = SigningKey::generate();
        let pem = key.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(back.key_id(), key.key_id());
        assert_eq!(back.public_key(), key.public_key());
        assert!(format!("{key:?}").contains(key.key_id()));
        assert!(!format!("{key:?}").contains(&pem[28..60]));
    }

    #[test]
    fn from_pem_reads_an_openssl_style_pkcs8_key_and_refuses_others() {
        // RFC 8410 section 10.3 example private key.
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                   -----END PRIVATE KEY-----\n";
        let key = SigningKey::from_pem(pem).unwrap();
        assert!(key.key_id().starts_with("ed25519:"));
        assert_eq!(key.key_id().len(), "ed25519:".len() + 16);
        let p256 = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(matches!(
            SigningKey::from_pem(&p256),
            Err(PkiError::InvalidKey(_))
        ));
        assert!(matches!(
            SigningKey::from_pem("x"),
            Err(PkiError::PemNotFound(_))
        ));
    }

    #[test]
    fn key_id_is_derived_from_the_public_key() {
        let key = SigningKey::generate();
        let raw = STANDARD.decode(&key.public_key().public_key).unwrap();
        assert_eq!(raw.len(), 32);
        let expected = format!("ed25519:{}", &hex::encode(Sha256::digest(&raw))[..16]);
        assert_eq!(key.key_id(), expected);
        assert_eq!(key.public_key().algorithm, "ed25519");
    }
}
