//! Certificates are short-lived and renew without an operator: in-band over the open session,
//! and, for an agent that was offline past expiry, by proving possession of its previous key
//! within the grace period.

use std::time::Duration;

use base64::Engine;
use stella_e2e::{Agent, Plane, TestImage, free_port, unique, wait_until};

fn not_after(plane: &Plane, agent: &str) -> String {
    plane.json(&["agents", "show", agent])["cert_not_after"]
        .as_str()
        .unwrap()
        .to_string()
}

fn cert_expired(agent: &Agent) -> bool {
    let pem = std::fs::read_to_string(agent.dir.join("identity/agent.pem")).unwrap();
    let der = stella_pki::cert_der_from_pem(&pem).unwrap();
    let (_, not_after) = stella_pki::cert_validity(&der).unwrap();
    time::OffsetDateTime::now_utc().unix_timestamp() > not_after
}

/// Posts an offline renewal the way an agent would, signed with `key_pem`.
fn offline_renew(plane: &Plane, agent: &Agent, key_pem: &str) -> (u16, String) {
    let cert_pem = std::fs::read_to_string(agent.dir.join("identity/agent.pem")).unwrap();
    let (_, csr) = stella_pki::generate_key_and_csr("x").unwrap();
    let ts = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let proof = stella_pki::sign_with_agent_key(
        key_pem,
        &stella_pki::renewal_proof_message(&agent.id, &csr, ts),
    )
    .unwrap();
    let body = serde_json::json!({
        "agent_id": agent.id, "cert_pem": cert_pem, "csr_pem": csr, "timestamp_unix_ms": ts,
        "proof": base64::engine::general_purpose::STANDARD.encode(proof),
    });
    let ca = std::fs::read_to_string(plane.dir.join("pki/ca.pem")).unwrap();
    let url = format!("{}/api/v1/renew", plane.api_url());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            stella_pki::install_crypto_provider();
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(stella_pki::client_config_ca(&ca).unwrap())
                .build()
                .unwrap();
            let resp = client.post(&url).json(&body).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
}

stella_e2e::both_transports! {
#[test]
fn certificates_renew_in_band_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start_with(
        &tmp.path().join("plane"),
        free_port(),
        free_port(),
        &["--agent-cert-ttl", "6s"],
    );
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "renewing");
    let first = not_after(&plane, &agent.id);
    let first_pem = std::fs::read_to_string(agent.dir.join("identity/agent.pem")).unwrap();
    // Two renewals in a row, each recorded by the plane, the agent connected throughout.
    let second = wait_until(Duration::from_secs(30), "a first renewal", || {
        let n = not_after(&plane, &agent.id);
        (n != first).then_some(n)
    });
    wait_until(Duration::from_secs(30), "a second renewal", || {
        (not_after(&plane, &agent.id) != second).then_some(())
    });
    wait_until(
        Duration::from_secs(30),
        "the agent on its renewed certificate",
        || (plane.agent_status(&agent.id) == "connected").then_some(()),
    );
    let now_pem = std::fs::read_to_string(agent.dir.join("identity/agent.pem")).unwrap();
    assert_ne!(first_pem, now_pem, "the certificate on disk was replaced");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.dir.join("identity/agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the renewed key is 0600 too");
    assert!(!cert_expired(&agent));
}

#[test]
fn jobs_keep_flowing_across_renewals() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start_with(
        &tmp.path().join("plane"),
        free_port(),
        free_port(),
        &["--agent-cert-ttl", "6s"],
    );
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "busy");
    let target = unique("renew");
    let _cleanup = stella_e2e::TargetCleanup(target.clone());
    plane.ok(&["env", "create", "dev"]);
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/renew"), "1");
    let db = plane.db();
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..3 {
        let release = format!("r{round}");
        plane.ok(&[
            "release",
            "create",
            &release,
            "--component",
            &image.component("web"),
        ]);
        plane.ok(&["deploy", &release, "--env", "dev"]);
        // The receipt of the job just finished verifies against the certificate that was current.
        let receipt = stella_e2e::sql_string(
            &db,
            "SELECT receipt FROM jobs ORDER BY sequence DESC LIMIT 1",
            &[],
        );
        let receipt: stella_pki::Envelope = serde_json::from_str(&receipt).unwrap();
        // Receipts name the certificate they were signed under; the plane keeps every one issued.
        let keyid = receipt.signatures[0].keyid.clone();
        let cert = stella_e2e::sql_string(
            &db,
            "SELECT cert_pem FROM agent_certificates WHERE fingerprint = $1",
            &[&keyid],
        );
        let der = stella_pki::cert_der_from_pem(&cert).unwrap();
        let attested = stella_pki::verify_receipt(&der, &receipt).expect("receipt verifies");
        assert_eq!(attested.status, "succeeded", "round {round}");
        seen.insert(keyid);
        let before = not_after(&plane, &agent.id);
        wait_until(
            Duration::from_secs(30),
            "a renewal between deployments",
            || (not_after(&plane, &agent.id) != before).then_some(()),
        );
        wait_until(
            Duration::from_secs(30),
            "the agent back on its new certificate",
            || (plane.agent_status(&agent.id) == "connected").then_some(()),
        );
    }
    assert!(
        seen.len() >= 2,
        "the rounds were signed under different certificates: {seen:?}"
    );
}

#[test]
fn an_agent_offline_past_expiry_renews_with_its_previous_key() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start_with(
        &tmp.path().join("plane"),
        free_port(),
        free_port(),
        &["--agent-cert-ttl", "2s"],
    );
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "sleeper");
    let first = not_after(&plane, &agent.id);
    // Waiting on the clock is the point of this test: the certificate must really be expired.
    wait_until(Duration::from_secs(10), "the certificate to expire", || {
        cert_expired(&agent).then_some(())
    });
    agent.start();
    wait_until(
        Duration::from_secs(30),
        "the agent to renew and connect",
        || (plane.agent_status(&agent.id) == "connected").then_some(()),
    );
    assert_ne!(not_after(&plane, &agent.id), first);
}

#[test]
fn offline_renewal_is_refused_past_grace_for_revoked_agents_and_without_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start_with(
        &tmp.path().join("plane"),
        free_port(),
        free_port(),
        &["--agent-cert-ttl", "1s", "--renewal-grace", "1s"],
    );
    let agent = Agent::enroll(&plane, &tmp.path().join("agent"), "late");
    let key = std::fs::read_to_string(agent.dir.join("identity/agent.key")).unwrap();

    // Without the previous key: refused.
    let (stranger, _) = stella_pki::generate_key_and_csr("stranger").unwrap();
    let (status, body) = offline_renew(&plane, &agent, &stranger);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("proof does not verify"), "{body}");

    // Past the grace period: refused with a clear way out.
    wait_until(Duration::from_secs(15), "expiry plus grace to pass", || {
        let pem = std::fs::read_to_string(agent.dir.join("identity/agent.pem")).unwrap();
        let (_, not_after) =
            stella_pki::cert_validity(&stella_pki::cert_der_from_pem(&pem).unwrap()).unwrap();
        (time::OffsetDateTime::now_utc().unix_timestamp() > not_after + 2).then_some(())
    });
    let (status, body) = offline_renew(&plane, &agent, &key);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("grace period") && body.contains("new join token"),
        "{body}"
    );

    // Revoked: refused whatever the dates.
    let other = Agent::enroll(&plane, &tmp.path().join("other"), "revoked");
    let other_key = std::fs::read_to_string(other.dir.join("identity/agent.key")).unwrap();
    plane.ok(&["agents", "revoke", &other.id]);
    let (status, body) = offline_renew(&plane, &other, &other_key);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
}
}
