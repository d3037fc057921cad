//! Property tests of the PKI's encodings and signatures: DSSE pre-authentication encoding, DSSE
//! sign/verify, tamper rejection, token hashing, envelope and result digests, agent receipts,
//! which step jobs (health checks, scripts) an agent accepts.
//!
//! Case counts are bounded so the file runs in a few seconds. The blocks on proptest's default
//! configuration (the pure encodings) take more with e.g.
//! `PROPTEST_CASES=10000 cargo nextest run -p stella-pki --test properties`.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use stella_pki::{
    CertificateAuthority, DsseError, Envelope, ReceiptError, ReceiptPayload, SigningKey,
    TrustedKeys, cert_der_from_pem, decode_payload, envelope_digest, generate_key_and_csr,
    hash_token, pae, result_digest, sign_receipt, token_matches, verify_receipt,
};

/// Signing and verifying cost real work (and the test profile does not optimise the curve
/// arithmetic): fewer cases than the pure encodings.
fn signing_config() -> ProptestConfig {
    ProptestConfig::with_cases(32)
}

/// The signing key of the DSSE cases, and another key (generated once: key generation is not
/// what is under test).
static KEY: LazyLock<SigningKey> = LazyLock::new(SigningKey::generate);
static OTHER_KEY: LazyLock<SigningKey> = LazyLock::new(SigningKey::generate);

/// Payload types: mostly arbitrary Unicode, sometimes digits and spaces (which is what a naive,
/// unprefixed encoding would confuse with the length fields).
fn payload_type() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9 ]{0,12}",
        Just(stella_pki::JOB_PAYLOAD_TYPE.to_string()),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "[0-9 ]{0,12}".prop_map(String::into_bytes),
    ]
}

/// Reads `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body` back into (type, body), strictly:
/// minimal decimal lengths, exact byte counts, nothing left over.
fn parse_pae(encoded: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    fn field(rest: &[u8]) -> Option<(&[u8], &[u8])> {
        let space = rest.iter().position(|&b| b == b' ')?;
        let digits = &rest[..space];
        if digits.is_empty()
            || !digits.iter().all(u8::is_ascii_digit)
            || (digits.len() > 1 && digits[0] == b'0')
        {
            return None;
        }
        let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
        let rest = &rest[space + 1..];
        (rest.len() >= len).then(|| rest.split_at(len))
    }
    let rest = encoded.strip_prefix(b"DSSEv1 ")?;
    let (payload_type, rest) = field(rest)?;
    let rest = rest.strip_prefix(b" ")?;
    let (payload, rest) = field(rest)?;
    rest.is_empty()
        .then(|| (payload_type.to_vec(), payload.to_vec()))
}

fn trust(key: &SigningKey) -> TrustedKeys {
    TrustedKeys {
        keys: vec![key.public_key()],
    }
}

proptest! {
    #[test]
    fn pae_is_the_dsse_length_prefixed_encoding(t in payload_type(), b in body()) {
        let mut expected = format!("DSSEv1 {} {} {} ", t.len(), t, b.len()).into_bytes();
        expected.extend_from_slice(&b);
        let encoded = pae(&t, &b);
        prop_assert_eq!(&encoded, &expected);
        // The encoding can be read back unambiguously, so it is injective.
        prop_assert_eq!(parse_pae(&encoded), Some((t.into_bytes(), b)));
    }

    #[test]
    fn pae_of_different_pairs_differs(
        t1 in payload_type(), b1 in body(), t2 in payload_type(), b2 in body(),
    ) {
        prop_assume!((&t1, &b1) != (&t2, &b2));
        prop_assert_ne!(pae(&t1, &b1), pae(&t2, &b2));
    }

    /// The adversarial case for injectivity: the same bytes split between type and body at two
    /// different points (what a plain concatenation would map to the same message).
    #[test]
    fn pae_separates_type_and_body_at_every_split(
        text in "[0-9a ]{0,24}", i in any::<prop::sample::Index>(), j in any::<prop::sample::Index>(),
    ) {
        let (i, j) = (i.index(text.len() + 1), j.index(text.len() + 1));
        prop_assume!(i != j);
        let (t1, b1) = text.split_at(i);
        let (t2, b2) = text.split_at(j);
        prop_assert_ne!(pae(t1, b1.as_bytes()), pae(t2, b2.as_bytes()));
    }
}

proptest! {
    #![proptest_config(signing_config())]

    #[test]
    fn sign_then_verify_roundtrips(t in payload_type(), b in body()) {
        let key = &*KEY;
        let env = key.sign(&t, &b);
        prop_assert_eq!(decode_payload(&env), Ok(b.clone()));
        prop_assert_eq!(&env.signatures[0].keyid, key.key_id());
        prop_assert_eq!(trust(key).verify(&env, &t), Ok(b.clone()));
        // Through its JSON form, as it travels.
        let wire = serde_json::to_vec(&env).unwrap();
        let back: Envelope = serde_json::from_slice(&wire).unwrap();
        prop_assert_eq!(trust(key).verify(&back, &t), Ok(b));
        // Another key with the same key id cannot stand in for it.
        let mut impostor = TrustedKeys { keys: vec![OTHER_KEY.public_key()] };
        impostor.keys[0].key_id = key.key_id().to_string();
        prop_assert_eq!(
            impostor.verify(&env, &t),
            Err(DsseError::BadSignature(key.key_id().to_string()))
        );
    }

    #[test]
    fn any_single_byte_change_in_the_payload_is_rejected(
        t in payload_type(),
        b in prop::collection::vec(any::<u8>(), 1..512),
        at in any::<prop::sample::Index>(),
        mask in 1u8..,
    ) {
        let key = &*KEY;
        let mut env = key.sign(&t, &b);
        let i = at.index(b.len());
        let mut changed = b;
        changed[i] ^= mask;
        env.payload = STANDARD.encode(&changed);
        prop_assert_eq!(
            trust(key).verify(&env, &t),
            Err(DsseError::BadSignature(key.key_id().to_string()))
        );
    }

    #[test]
    fn any_single_byte_change_in_the_signature_is_rejected(
        t in payload_type(),
        b in body(),
        at in 0usize..64,
        mask in 1u8..,
    ) {
        let key = &*KEY;
        let mut env = key.sign(&t, &b);
        let mut sig = STANDARD.decode(&env.signatures[0].sig).unwrap();
        prop_assert_eq!(sig.len(), 64);
        sig[at] ^= mask;
        env.signatures[0].sig = STANDARD.encode(&sig);
        prop_assert_eq!(
            trust(key).verify(&env, &t),
            Err(DsseError::BadSignature(key.key_id().to_string()))
        );
    }

    #[test]
    fn a_relabelled_payload_type_is_rejected(t in payload_type(), other in payload_type(), b in body()) {
        prop_assume!(t != other);
        let key = &*KEY;
        let mut env = key.sign(&t, &b);
        env.payload_type = other.clone();
        // Whatever the verifier expects, the signature no longer covers the envelope.
        for expected in [&t, &other] {
            prop_assert_eq!(
                trust(key).verify(&env, expected),
                Err(DsseError::BadSignature(key.key_id().to_string()))
            );
        }
    }
}

proptest! {
    #[test]
    fn hash_token_and_token_matches_agree(token in any::<String>(), other in any::<String>()) {
        let hash = hash_token(&token);
        prop_assert_eq!(hash.len(), 64);
        prop_assert!(hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        prop_assert_eq!(&hash, &hex::encode(Sha256::digest(token.as_bytes())));
        prop_assert!(token_matches(&token, &hash));
        prop_assert!(token_matches(&token, &hash.to_uppercase()));
        if other != token {
            prop_assert!(!token_matches(&other, &hash));
        }
        // A truncated or extended hash never matches.
        prop_assert!(!token_matches(&token, &hash[..62]));
        let extended = format!("{hash}00");
        prop_assert!(!token_matches(&token, &extended));
    }

    #[test]
    fn a_token_one_character_off_does_not_match(
        token in "[A-Za-z0-9_-]{1,64}", at in any::<prop::sample::Index>(), c in "[A-Za-z0-9_-]",
    ) {
        let i = at.index(token.len());
        let mut other = token.clone();
        other.replace_range(i..=i, &c);
        prop_assume!(other != token);
        prop_assert!(!token_matches(&other, &hash_token(&token)));
    }

    #[test]
    fn envelope_digest_is_stable_and_separates_inputs(
        a in prop::collection::vec(any::<u8>(), 0..512),
        b in prop::collection::vec(any::<u8>(), 0..512),
        at in any::<prop::sample::Index>(),
        mask in 1u8..,
    ) {
        let digest = envelope_digest(&a);
        prop_assert_eq!(&digest, &envelope_digest(&a));
        prop_assert_eq!(&digest, &format!("sha256:{}", hex::encode(Sha256::digest(&a))));
        if a != b {
            prop_assert_ne!(&digest, &envelope_digest(&b));
        }
        if !a.is_empty() {
            let mut changed = a.clone();
            changed[at.index(a.len())] ^= mask;
            prop_assert_ne!(&digest, &envelope_digest(&changed));
            prop_assert_ne!(&digest, &envelope_digest(&a[..a.len() - 1]));
        }
    }

    #[test]
    fn result_digest_is_injective_over_the_split_point(
        text in "(.|[{}\":0-9])*", i in any::<prop::sample::Index>(), j in any::<prop::sample::Index>(),
    ) {
        let boundaries: Vec<usize> = (0..=text.len()).filter(|&k| text.is_char_boundary(k)).collect();
        let (i, j) = (*i.get(&boundaries), *j.get(&boundaries));
        let (m1, o1) = text.split_at(i);
        let (m2, o2) = text.split_at(j);
        let d1 = result_digest(m1, o1);
        prop_assert_eq!(&d1, &result_digest(m1, o1));
        if i == j {
            prop_assert_eq!(&d1, &result_digest(m2, o2));
        } else {
            prop_assert_ne!(&d1, &result_digest(m2, o2));
        }
    }

    #[test]
    fn result_digest_follows_its_definition(message in any::<String>(), outcome in any::<String>()) {
        let mut h = Sha256::new();
        h.update((message.len() as u64).to_be_bytes());
        h.update(message.as_bytes());
        h.update(outcome.as_bytes());
        prop_assert_eq!(
            result_digest(&message, &outcome),
            format!("sha256:{}", hex::encode(h.finalize()))
        );
    }
}

/// One CA and two agents for all receipt cases (key generation is the slow part).
struct Agents {
    key_a: String,
    cert_a: Vec<u8>,
    key_b: String,
    cert_b: Vec<u8>,
}

static AGENTS: LazyLock<Agents> = LazyLock::new(|| {
    let ca = CertificateAuthority::generate("property CA").unwrap();
    let issue = |id: &str| {
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
    };
    let (key_a, cert_a) = issue("agent-a");
    let (key_b, cert_b) = issue("agent-b");
    Agents {
        key_a,
        cert_a,
        key_b,
        cert_b,
    }
});

fn receipt_payload() -> impl Strategy<Value = ReceiptPayload> {
    (
        any::<String>(),
        any::<String>(),
        any::<Vec<u8>>(),
        prop_oneof![Just("succeeded"), Just("failed"), Just("refused")],
        any::<String>(),
        (any::<String>(), any::<String>()),
        any::<i64>(),
    )
        .prop_map(
            |(job_id, agent_id, envelope, status, reason_code, (message, outcome), at)| {
                ReceiptPayload {
                    job_id,
                    agent_id,
                    envelope_digest: envelope_digest(&envelope),
                    status: status.to_string(),
                    reason_code,
                    result_digest: result_digest(&message, &outcome),
                    finished_at_unix_ms: at,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn receipts_roundtrip_and_bind_to_the_agent_key(
        payload in receipt_payload(),
        at in any::<prop::sample::Index>(),
        mask in 1u8..,
    ) {
        let agents = &*AGENTS;
        let env = sign_receipt(&agents.key_a, &agents.cert_a, &payload).unwrap();
        prop_assert_eq!(verify_receipt(&agents.cert_a, &env), Ok(payload.clone()));
        // Another agent's certificate does not vouch for it.
        let is_wrong_key = matches!(
            verify_receipt(&agents.cert_b, &env),
            Err(ReceiptError::WrongKey { .. })
        );
        prop_assert!(is_wrong_key);
        // Agent B's key cannot sign in agent A's name.
        let forged = sign_receipt(&agents.key_b, &agents.cert_a, &payload).unwrap();
        prop_assert_eq!(verify_receipt(&agents.cert_a, &forged), Err(ReceiptError::BadSignature));
        // Any single-byte change of the signed body is rejected.
        let mut body = decode_payload(&env).unwrap();
        let i = at.index(body.len());
        body[i] ^= mask;
        let mut tampered = env.clone();
        tampered.payload = STANDARD.encode(&body);
        prop_assert_eq!(verify_receipt(&agents.cert_a, &tampered), Err(ReceiptError::BadSignature));
    }
}

// ---- step jobs (health checks, scripts): the job payload's kinds with parameters

fn step_kind() -> impl Strategy<Value = stella_pki::JobKind> {
    use stella_pki::{HealthCheckJob, HttpProbe, JobKind, ScriptJob};
    prop_oneof![
        (
            prop_oneof![
                (any::<bool>(), any::<u16>(), "[a-z/]{0,12}").prop_map(|(tls, port, path)| {
                    format!(
                        "{}://127.0.0.1:{port}/{path}",
                        if tls { "https" } else { "http" }
                    )
                }),
                any::<String>(),
            ],
            any::<u16>(),
            prop_oneof![1u64..10_000, any::<u64>()],
            prop_oneof![1u32..5, any::<u32>()],
            prop_oneof![1u64..100_000, any::<u64>()],
        )
            .prop_map(
                |(url, expect_status, interval_ms, healthy_after, timeout_ms)| {
                    JobKind::HealthCheck(HealthCheckJob {
                        http: HttpProbe { url, expect_status },
                        interval_ms,
                        healthy_after,
                        timeout_ms,
                    })
                }
            ),
        (
            prop::collection::vec(any::<String>(), 0..4),
            prop_oneof![1u64..100_000, any::<u64>()],
        )
            .prop_map(|(command, timeout_ms)| JobKind::Script(ScriptJob {
                command,
                timeout_ms
            })),
    ]
}

fn step_job(kind: stella_pki::JobKind, with_components: bool) -> stella_pki::JobPayload {
    let issued_at = time::OffsetDateTime::from_unix_timestamp(1_893_499_200).unwrap();
    stella_pki::JobPayload {
        job_id: "job-1".into(),
        agent_id: "agent-1".into(),
        target: stella_pki::JobTarget {
            name: "web".into(),
            kind: "docker".into(),
            config: serde_json::Value::Null,
        },
        kind,
        deployment_id: "dep-1".into(),
        release_id: "rel-1".into(),
        release_name: "r1".into(),
        components: if with_components {
            vec![stella_pki::JobComponent {
                name: "api".into(),
                image: "registry.example/api".into(),
                digest: format!("sha256:{}", "ab".repeat(32)),
            }]
        } else {
            Vec::new()
        },
        issued_at,
        not_after: issued_at + time::Duration::minutes(10),
        sequence: 2,
        idempotency_key: "dep-1/t".into(),
        strategy: Default::default(),
    }
}

proptest! {
    #![proptest_config(signing_config())]

    /// A signed step job is accepted exactly when the agent offers its capability, it carries
    /// no components and its parameters are runnable; accepted, it is the job that was signed.
    #[test]
    fn step_jobs_are_accepted_exactly_when_offered_empty_of_digests_and_runnable(
        kind in step_kind(),
        with_components in any::<bool>(),
        offer_health in any::<bool>(),
        offer_script in any::<bool>(),
    ) {
        let job = step_job(kind, with_components);
        let mut capabilities = vec!["docker".to_string()];
        if offer_health { capabilities.push("health-check".into()); }
        if offer_script { capabilities.push("script".into()); }
        let verifier = stella_pki::JobVerifier {
            agent_id: "agent-1".into(),
            trusted: trust(&KEY),
            capabilities,
        };
        let bytes = serde_json::to_vec(&stella_pki::sign_job(&KEY, &job).unwrap()).unwrap();
        let now = job.issued_at;
        let (offered, problem) = match &job.kind {
            stella_pki::JobKind::HealthCheck(h) => (offer_health, h.problem()),
            stella_pki::JobKind::Script(s) => (offer_script, s.problem()),
            stella_pki::JobKind::Deploy => unreachable!(),
        };
        match verifier.verify(&bytes, now, 1) {
            Ok((got, _)) => {
                prop_assert!(offered && !with_components && problem.is_none());
                prop_assert_eq!(got, job);
            }
            Err(refusal) => {
                let want = if !offered {
                    "unsupported_job_kind"
                } else {
                    "invalid_job_parameters"
                };
                prop_assert!(!offered || with_components || problem.is_some());
                prop_assert_eq!(refusal.reason_code(), want);
            }
        }
    }
}
