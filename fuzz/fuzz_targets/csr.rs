//! CSR handling by the CA (`sign_agent_csr`) on untrusted input: the input as PEM text when it is
//! UTF-8, and its raw bytes armoured as a PEM CERTIFICATE REQUEST (so the fuzzer reaches the DER
//! parser directly). Never panics; whatever is issued names the agent id the plane chose, whatever
//! the CSR asked for, and is signed by this CA.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use stella_fuzz::{AGENT_ID, TRUST_DOMAIN};
use stella_pki::{
    CertificateAuthority, agent_id_from_cert, cert_der_from_pem, cert_serial_hex, spiffe_agent_uri,
};

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| CertificateAuthority::generate("Stella fuzz CA").expect("CA"))
}

fn check(csr_pem: &str) {
    let Ok(issued) =
        ca().sign_agent_csr(csr_pem, TRUST_DOMAIN, AGENT_ID, Duration::from_secs(3600))
    else {
        return;
    };
    let der = cert_der_from_pem(&issued.cert_pem).expect("issued certificate is PEM");
    assert_eq!(
        agent_id_from_cert(&der, TRUST_DOMAIN).expect("issued certificate names an agent"),
        AGENT_ID
    );
    assert_eq!(issued.spiffe_id, spiffe_agent_uri(TRUST_DOMAIN, AGENT_ID));
    assert_eq!(cert_serial_hex(&der).expect("serial"), issued.serial_hex);
    ca().verify_issued(&der).expect("issued by this CA");
}

fn armour(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    }
    check(&armour(data));
});
