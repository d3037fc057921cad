//! DSSE envelope parsing and verification on untrusted bytes: `serde_json` → `Envelope`, then
//! `TrustedKeys::verify` (with a good key set and with malformed key records), `decode_payload`
//! and `pae`. Never panics; whatever verifies is the envelope's own payload and was signed by the
//! trusted key under the expected type.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stella_fuzz::job_key;
use stella_pki::{
    DsseError, ED25519, Envelope, JOB_PAYLOAD_TYPE, PublicKeyRecord, TrustedKeys, decode_payload,
    pae,
};

/// The trusted key, preceded by records under the same key id that are not usable keys (wrong
/// algorithm, not base64, wrong length, another key): verification must get past them.
fn trusted() -> &'static [TrustedKeys; 2] {
    static KEYS: OnceLock<[TrustedKeys; 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let good = job_key().public_key();
        let broken = |algorithm: &str, public_key: &str| PublicKeyRecord {
            key_id: good.key_id.clone(),
            algorithm: algorithm.to_string(),
            public_key: public_key.to_string(),
        };
        [
            TrustedKeys {
                keys: vec![good.clone()],
            },
            TrustedKeys {
                keys: vec![
                    broken("rsa", &good.public_key),
                    broken(ED25519, "%%%"),
                    broken(ED25519, "AAAA"),
                    // 32 bytes of some other (or no) point.
                    broken(ED25519, "AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                    good,
                ],
            },
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(env) = serde_json::from_slice::<Envelope>(data) else {
        return;
    };
    let decoded = decode_payload(&env);
    if let Ok(payload) = &decoded {
        let encoded = pae(&env.payload_type, payload);
        let header = format!(
            "DSSEv1 {} {} {} ",
            env.payload_type.len(),
            env.payload_type,
            payload.len()
        );
        assert!(encoded.starts_with(header.as_bytes()));
        assert_eq!(&encoded[header.len()..], payload.as_slice());
    }
    for keys in trusted() {
        for expected_type in [env.payload_type.as_str(), JOB_PAYLOAD_TYPE] {
            match keys.verify(&env, expected_type) {
                Ok(payload) => {
                    assert_eq!(decoded.as_ref().ok(), Some(&payload));
                    assert_eq!(env.payload_type, expected_type);
                    assert!(
                        env.signatures.iter().any(|s| s.keyid == job_key().key_id()),
                        "accepted without a signature under the trusted key id"
                    );
                }
                Err(DsseError::Malformed(_)) => {}
                Err(DsseError::NoSignatures) => assert!(env.signatures.is_empty()),
                Err(DsseError::UnknownKeyId(id)) => {
                    assert!(env.signatures.iter().all(|s| s.keyid != job_key().key_id()));
                    assert_eq!(id, env.signatures[0].keyid);
                }
                Err(DsseError::BadSignature(id)) => assert_eq!(id, job_key().key_id()),
                Err(DsseError::WrongPayloadType { expected, got }) => {
                    assert_eq!(expected, expected_type);
                    assert_eq!(got, env.payload_type);
                    assert_ne!(got, expected);
                }
            }
        }
    }
});
