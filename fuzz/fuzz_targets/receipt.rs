//! Agent receipts as the plane receives them: JSON → `Envelope` → `verify_receipt` against a
//! fixed agent certificate. Never panics; what verifies is exactly the envelope's payload. The raw
//! input is also handed to `verify_with_cert` as a certificate, which parses it as X.509 DER.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use stella_fuzz::agent_cert_der;
use stella_pki::{
    Envelope, RECEIPT_PAYLOAD_TYPE, ReceiptError, ReceiptPayload, fingerprint_der, verify_receipt,
    verify_with_cert,
};

fuzz_target!(|data: &[u8]| {
    // Untrusted bytes as the agent certificate: an X.509 parser on attacker input.
    let _ = verify_with_cert(data, b"message", data);

    let Ok(env) = serde_json::from_slice::<Envelope>(data) else {
        return;
    };
    match verify_receipt(agent_cert_der(), &env) {
        Ok(receipt) => {
            assert_eq!(env.payload_type, RECEIPT_PAYLOAD_TYPE);
            assert_eq!(env.signatures[0].keyid, fingerprint_der(agent_cert_der()));
            let body = STANDARD
                .decode(&env.payload)
                .expect("verified payload is base64");
            assert_eq!(
                serde_json::from_slice::<ReceiptPayload>(&body).expect("verified payload parses"),
                receipt
            );
        }
        Err(ReceiptError::WrongPayloadType(t)) => assert_ne!(t, RECEIPT_PAYLOAD_TYPE),
        Err(ReceiptError::WrongKey { expected, got }) => assert_ne!(expected, got),
        Err(ReceiptError::Key(e)) => panic!("verification never touches a private key: {e}"),
        Err(_) => {}
    }
});
