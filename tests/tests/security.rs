//! The certificate half of the security suite: client certificates that must not open an agent
//! session, each refused with a precise reason that is counted — at the TLS handshake
//! (`stella_handshake_refusals_total{reason}`) or at session start
//! (`stella_session_refusals_total{reason}`). The envelope half is `refusals.rs`, tokens are in
//! `enrollment.rs` and `trust.rs`.

use std::time::Duration;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use stella_e2e::{Agent, Plane, handshake, wait_until};
use time::OffsetDateTime;

struct Minted {
    cert_pem: String,
    key_pem: String,
}

/// Mints a client certificate with the given issuer, SPIFFE URI and validity window.
fn mint(
    issuer_cert: &str,
    issuer_key: &str,
    uri: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Minted {
    let issuer =
        Issuer::from_ca_cert_pem(issuer_cert, KeyPair::from_pem(issuer_key).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "attacker");
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).unwrap();
    Minted {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn plane_ca(plane: &Plane) -> (String, String) {
    (
        std::fs::read_to_string(plane.dir.join("pki/ca.pem")).unwrap(),
        std::fs::read_to_string(plane.dir.join("pki/ca.key")).unwrap(),
    )
}

/// Opens a gRPC session with a certificate that passes TLS; returns the gRPC status code.
fn session_status(plane: &Plane, minted: &Minted) -> tonic::Code {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let (ca_pem, _) = plane_ca(plane);
    let url = format!("https://127.0.0.1:{}", plane.agent_port);
    let identity = Identity::from_pem(&minted.cert_pem, &minted.key_pem);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            stella_pki::install_crypto_provider();
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .identity(identity)
                .domain_name("localhost");
            let channel = Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = stella_proto::agent_session_client::AgentSessionClient::new(channel);
            let hello = stella_proto::AgentMessage {
                body: Some(stella_proto::agent_message::Body::Hello(
                    stella_proto::Hello::default(),
                )),
            };
            match client.session(tokio_stream::iter(vec![hello])).await {
                Ok(_) => tonic::Code::Ok,
                Err(status) => status.code(),
            }
        })
}

fn counter(plane: &Plane, family: &str, reason: &str) -> f64 {
    let prefix = format!("{family}{{reason=\"{reason}\"}} ");
    plane
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn expect_handshake_refusal(plane: &Plane, minted: &Minted, key_pem: &str, reason: &str) {
    let before = counter(plane, "stella_handshake_refusals_total", reason);
    assert!(
        !handshake(plane, &minted.cert_pem, key_pem),
        "{reason}: the handshake must fail"
    );
    wait_until(Duration::from_secs(5), "the refusal to be counted", || {
        (counter(plane, "stella_handshake_refusals_total", reason) > before).then_some(())
    });
}

#[test]
fn certificates_that_must_not_open_a_session() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll(&plane, &tmp.path().join("agent"), "victim");
    let (ca, ca_key) = plane_ca(&plane);
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let uri = format!("spiffe://stella.local/agent/{}", agent.id);

    // Sanity: the real agent's own certificate and key complete the handshake.
    let own_cert = std::fs::read_to_string(agent.dir.join("identity/agent.pem")).unwrap();
    let own_key = std::fs::read_to_string(agent.dir.join("identity/agent.key")).unwrap();
    assert!(
        handshake(&plane, &own_cert, &own_key),
        "a good certificate is accepted"
    );

    let expired = mint(&ca, &ca_key, &uri, now - hour * 2, now - hour);
    expect_handshake_refusal(&plane, &expired, &expired.key_pem, "expired");

    let early = mint(&ca, &ca_key, &uri, now + hour, now + hour * 2);
    expect_handshake_refusal(&plane, &early, &early.key_pem, "not_yet_valid");

    let other_ca = stella_pki::CertificateAuthority::generate("Some other CA").unwrap();
    let foreign = mint(
        other_ca.cert_pem(),
        &other_ca.key_pem(),
        &uri,
        now - hour,
        now + hour,
    );
    expect_handshake_refusal(&plane, &foreign, &foreign.key_pem, "unknown_ca");

    // The agent's real certificate presented with someone else's key.
    let stolen = Minted {
        cert_pem: own_cert.clone(),
        key_pem: String::new(),
    };
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    expect_handshake_refusal(&plane, &stolen, &other_key, "key_mismatch");

    // TLS-valid certificates that still must not open a session.
    let wrong_domain = mint(
        &ca,
        &ca_key,
        &format!("spiffe://evil.example/agent/{}", agent.id),
        now - hour,
        now + hour,
    );
    assert_eq!(
        session_status(&plane, &wrong_domain),
        tonic::Code::Unauthenticated
    );
    assert!(counter(&plane, "stella_session_refusals_total", "bad_identity") >= 1.0);

    let ghost = mint(
        &ca,
        &ca_key,
        "spiffe://stella.local/agent/agt_ghost",
        now - hour,
        now + hour,
    );
    assert_eq!(
        session_status(&plane, &ghost),
        tonic::Code::PermissionDenied
    );
    assert!(counter(&plane, "stella_session_refusals_total", "unknown_agent") >= 1.0);

    // A certificate for the real agent id that the plane never issued (e.g. minted with a
    // leaked CA key): the serial does not match the enrollment.
    let minted_for_victim = mint(&ca, &ca_key, &uri, now - hour, now + hour);
    assert_eq!(
        session_status(&plane, &minted_for_victim),
        tonic::Code::PermissionDenied
    );
    assert!(
        counter(
            &plane,
            "stella_session_refusals_total",
            "certificate_mismatch"
        ) >= 1.0
    );
    assert!(plane.metrics().contains("stella_agents_connected 0"));
}
