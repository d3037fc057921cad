//! Enrollment: one-time, expiring join tokens; the plane pinned by its CA fingerprint; the
//! agent's key generated locally and never sent.

use stella_e2e::{Plane, enroll_cmd, sql_exec};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn enrollment_pins_the_ca_and_tokens_are_single_use_and_expiring() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let server = plane.api_url();

    // A good enrollment: key file is 0600, certificate carries the SPIFFE id, key never left.
    let (token, fp) = plane.join_token();
    let a1 = tmp.path().join("a1");
    let out = enroll_cmd(&a1, &server, &token, &fp, "one");
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a1.join("identity/agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "agent key must be 0600");
    let agent: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a1.join("agent.json")).unwrap()).unwrap();
    let cert = std::fs::read_to_string(a1.join("identity/agent.pem")).unwrap();
    let der = stella_pki::cert_der_from_pem(&cert).unwrap();
    assert_eq!(
        stella_pki::agent_id_from_cert(&der, stella_pki::DEFAULT_TRUST_DOMAIN).unwrap(),
        agent["agent_id"].as_str().unwrap()
    );
    let key = std::fs::read_to_string(a1.join("identity/agent.key")).unwrap();
    let db = plane.db_dump();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !db.contains(&key_body[..40]),
        "the agent's private key must never reach the plane"
    );
    for plane_key in [
        "pki/ca.key",
        "pki/server.key",
        "pki/job-signing.key",
        "admin.token",
    ] {
        let mode = std::fs::metadata(plane.dir.join(plane_key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{plane_key} must be 0600");
    }
    // The join token is stored hashed only.
    assert!(!db.contains(&token), "join tokens are stored hashed");

    // Reuse of the same token is refused, and nothing is written.
    let a2 = tmp.path().join("a2");
    let out = enroll_cmd(&a2, &server, &token, &fp, "two");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already been used"),
        "{}",
        stderr(&out)
    );
    assert!(
        !a2.join("agent.json").exists(),
        "a refused enrollment leaves no identity"
    );

    // An unknown token.
    let out = enroll_cmd(&a2, &server, "stj_not-a-real-token", &fp, "two");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("join token is not valid"),
        "{}",
        stderr(&out)
    );

    // An expired token (expiry moved into the past in the store, as time would).
    let (expired, _) = plane.join_token();
    assert_eq!(
        sql_exec(
            &plane.db(),
            "UPDATE join_tokens SET expires_at = 0 WHERE uses = 0",
            &[]
        ),
        1
    );
    let out = enroll_cmd(&a2, &server, &expired, &fp, "two");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    assert!(!a2.join("agent.json").exists());

    // A wrong CA fingerprint: the TLS handshake is refused before the token is sent, so the
    // token stays usable.
    let (fresh, _) = plane.join_token();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = enroll_cmd(&a2, &server, &fresh, &wrong, "two");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&wrong) || stderr(&out).to_lowercase().contains("fingerprint"),
        "{}",
        stderr(&out)
    );
    assert!(!a2.join("agent.json").exists());
    let out = enroll_cmd(&a2, &server, &fresh, &fp, "two");
    assert!(
        out.status.success(),
        "the token survives a refused handshake: {}",
        stderr(&out)
    );

    // Malformed fingerprint: a clear error.
    let out = enroll_cmd(&tmp.path().join("a3"), &server, &fresh, "nope", "three");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--ca-fingerprint"),
        "{}",
        stderr(&out)
    );

    // Enrolling into an enrolled directory is refused.
    let (t4, _) = plane.join_token();
    let out = enroll_cmd(&a1, &server, &t4, &fp, "again");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("already holds an enrolled agent"),
        "{}",
        stderr(&out)
    );

    let agents = plane.json(&["agents"]);
    assert_eq!(
        agents.as_array().unwrap().len(),
        2,
        "exactly the two good enrollments exist"
    );
}
