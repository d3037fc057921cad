//! Unit tests of `ntlm.rs`, kept apart because the test server includes that file.

use crate::ntlm::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// MS-NLMP 4.2.4.1.1 test vector (User/Domain/Password).
#[test]
fn ntowfv2_matches_the_spec_vector() {
    assert_eq!(
        ntowfv2("Password", "User", "Domain").to_vec(),
        hex("0c868a403bfd7a93a3001ef22ef02e3f")
    );
}

/// MS-NLMP 4.2.4.2.2: NTProofStr and session base key from the spec's temp blob.
#[test]
fn ntlmv2_response_matches_the_spec_vector() {
    let key = ntowfv2("Password", "User", "Domain");
    let server_challenge = hex("0123456789abcdef");
    let mut temp = hex("01010000000000000000000000000000aaaaaaaaaaaaaaaa00000000");
    temp.extend(hex(
        "02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000",
    ));
    temp.extend(hex("00000000"));
    // The spec's blob ends with the AV pairs plus four zero bytes.
    let proof = hmac_md5(&key, &[&server_challenge, &temp]);
    assert_eq!(proof.to_vec(), hex("68cd0ab851e51c96aabc927bebef6a1c"));
    assert_eq!(
        hmac_md5(&key, &[&proof]).to_vec(),
        hex("8de40ccadbc14a82f15cb0ad0de95ca3")
    );
}

#[test]
fn rc4_known_answer() {
    // RFC 6229 key 0x0102030405, first 16 bytes of keystream.
    let mut data = [0u8; 16];
    Rc4::new(&hex("0102030405")).apply(&mut data);
    assert_eq!(data.to_vec(), hex("b2396305f03dc027ccc3524a0a1118a8"));
}

#[test]
fn seal_and_unseal_round_trip_in_order_only() {
    let key = [7u8; 16];
    let flags = CLIENT_FLAGS;
    let mut client = SessionSecurity::new(&key, flags, true);
    let mut server = SessionSecurity::new(&key, flags, false);
    for text in ["first message", "second, longer message"] {
        let mut m = text.as_bytes().to_vec();
        let sig = client.seal(&mut m);
        assert_ne!(m, text.as_bytes());
        server.unseal(&mut m, &sig).unwrap();
        assert_eq!(m, text.as_bytes());
        let mut reply = b"reply".to_vec();
        let sig = server.seal(&mut reply);
        client.unseal(&mut reply, &sig).unwrap();
        assert_eq!(reply, b"reply");
    }
    let mut m = b"tampered".to_vec();
    let sig = client.seal(&mut m);
    m[0] ^= 1;
    assert!(server.unseal(&mut m, &sig).is_err());
}

#[test]
fn user_names_split_on_backslash_only() {
    assert_eq!(split_user("CORP\\deploy"), ("CORP", "deploy"));
    assert_eq!(
        split_user("deploy@corp.example"),
        ("", "deploy@corp.example")
    );
    assert_eq!(split_user("deploy"), ("", "deploy"));
}

/// The GSS structure rebuilt by hand (16 zero bytes of addresses, the length, the data); that
/// it matches what pyspnego sends is checked by the test server in `tests/pywinrm.rs`.
#[test]
fn tls_channel_bindings_hash_the_certificate() {
    let cert = b"not a certificate: falls back to SHA-256";
    let hash = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut app = b"tls-server-end-point:".to_vec();
    app.extend_from_slice(hash.as_ref());
    let mut s = vec![0u8; 16];
    s.extend_from_slice(&(app.len() as u32).to_le_bytes());
    s.extend_from_slice(&app);
    let expected: [u8; 16] = {
        use md5::Digest;
        md5::Md5::digest(&s).into()
    };
    assert_eq!(tls_channel_bindings(cert), expected);
}
