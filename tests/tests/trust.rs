//! Trust lifecycle: revocation cuts an agent off and cancels its work; join tokens are scoped,
//! listed and revocable; every result carries a receipt signed by the agent's own key.

use std::time::Duration;

use stella_e2e::{Agent, Plane, Stack, TestImage, enroll_cmd, sql_string, unique, wait_until};

fn metric(plane: &Plane, line_prefix: &str) -> Option<f64> {
    plane
        .metrics()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

stella_e2e::both_transports! {
#[test]
fn revoking_an_agent_cuts_its_session_refuses_handshakes_and_cancels_its_jobs() {
    let mut stack = Stack::new();
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/revoke"), "1");
    let id = stack.agent.id.clone();

    // A job waits for the agent while it is away.
    stack.agent.stop();
    stack.plane.wait_agent(&id, "disconnected");
    let dep = stack.deploy_no_wait("before-revoke", &[image.component("web")]);
    stack.agent.start();
    let _ = stack.plane.wait_deployment(dep["id"].as_str().unwrap());
    stack.plane.wait_agent(&id, "connected");

    stack.agent.stop();
    stack.plane.wait_agent(&id, "disconnected");
    let queued = stack.deploy_no_wait("during-revoke", &[image.component("web")]);
    stack.agent.start();
    // Revoke as soon as it is back: the live session must be cut.
    stack.plane.wait_agent(&id, "connected");
    let revoked = stack
        .plane
        .json(&["agents", "revoke", &id, "--reason", "host decommissioned"]);
    assert_eq!(revoked["status"], "revoked");
    wait_until(Duration::from_secs(5), "the live session to be cut", || {
        (metric(&stack.plane, "stella_agents_connected") == Some(0.0)).then_some(())
    });
    // The agent retries by itself and is refused at the handshake.
    wait_until(Duration::from_secs(60), "a refused handshake", || {
        (metric(
            &stack.plane,
            "stella_session_refusals_total{reason=\"revoked\"}",
        )
        .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    });
    assert_eq!(metric(&stack.plane, "stella_agents_connected"), Some(0.0));

    // The deployment created before the revocation is settled: either it ran before the
    // revocation, or it was cancelled with the reason. Never left running.
    let d = stack.plane.wait_deployment(queued["id"].as_str().unwrap());
    let job = &d["jobs"][0];
    if job["status"] == "cancelled" {
        assert_eq!(job["reason_code"], "agent_revoked");
        assert!(
            job["message"]
                .as_str()
                .unwrap()
                .contains("host decommissioned")
        );
    } else {
        assert_eq!(job["status"], "succeeded", "{d:#}");
    }
    // New deployments to a revoked agent's targets are refused with a clear reason.
    stack.plane.ok(&[
        "release",
        "create",
        "after-revoke",
        "--component",
        &image.component("web"),
    ]);
    let err = stack
        .plane
        .fails(&["deploy", "after-revoke", "--env", "dev"]);
    assert!(err.contains("is revoked"), "{err}");
    // Revoking again is harmless.
    assert_eq!(
        stack.plane.json(&["agents", "revoke", &id])["status"],
        "revoked"
    );
}

#[test]
fn queued_jobs_of_a_revoked_agent_are_cancelled_with_the_reason() {
    let mut stack = Stack::new();
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/cancel"), "1");
    let id = stack.agent.id.clone();
    stack.agent.stop();
    stack.plane.wait_agent(&id, "disconnected");
    let dep = stack.deploy_no_wait("queued", &[image.component("web")]);
    stack
        .plane
        .ok(&["agents", "revoke", &id, "--reason", "stolen laptop"]);
    let d = stack.plane.wait_deployment(dep["id"].as_str().unwrap());
    assert_eq!(d["status"], "failed");
    assert_eq!(d["jobs"][0]["status"], "cancelled");
    assert_eq!(d["jobs"][0]["reason_code"], "agent_revoked");
    assert!(
        d["message"].as_str().unwrap().contains("stolen laptop"),
        "{d:#}"
    );
}

#[test]
fn join_tokens_are_scoped_listed_and_revocable() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let server = plane.api_url();
    let created = plane.json(&[
        "token",
        "create",
        "--ttl",
        "10m",
        "--max-uses",
        "2",
        "--label",
        "site=berlin",
    ]);
    let (token, fp) = (
        created["token"].as_str().unwrap(),
        created["ca_fingerprint"].as_str().unwrap(),
    );
    for name in ["a", "b"] {
        let out = enroll_cmd(&tmp.path().join(name), &server, token, fp, name);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = enroll_cmd(&tmp.path().join("c"), &server, token, fp, "c");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already been used"));
    for agent in plane.json(&["agents"]).as_array().unwrap() {
        assert_eq!(
            agent["labels"]["site"], "berlin",
            "token labels reach the agents"
        );
    }

    let other = plane.json(&["token", "create", "--ttl", "10m"]);
    let other_id = other["id"].as_str().unwrap();
    assert_eq!(
        plane.json(&["token", "revoke", other_id])["status"],
        "revoked"
    );
    assert_eq!(
        plane.json(&["token", "revoke", other_id])["status"],
        "revoked",
        "idempotent"
    );
    let out = enroll_cmd(
        &tmp.path().join("d"),
        &server,
        other["token"].as_str().unwrap(),
        fp,
        "d",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));

    let listed = plane.json(&["token", "list"]);
    let statuses: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap(), t["status"].as_str().unwrap()))
        .collect();
    assert!(
        statuses.contains(&(created["id"].as_str().unwrap(), "used")),
        "{statuses:?}"
    );
    assert!(statuses.contains(&(other_id, "revoked")), "{statuses:?}");
    let text = plane.ok(&["token", "list"]);
    assert!(
        !text.contains(token) && !listed.to_string().contains(token),
        "secrets are never listed"
    );
    let err = plane.fails(&["token", "revoke", "jt_ghost"]);
    assert!(err.contains("not found"), "{err}");
    let err = plane.fails(&["token", "create", "--ttl", "1h", "--max-uses", "0"]);
    assert!(err.contains("max uses"), "{err}");
}

#[test]
fn every_result_carries_a_receipt_signed_by_its_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "receipts");
    let other = Agent::enroll_and_start(&plane, &tmp.path().join("other"), "other");
    let target = unique("rcpt");
    let _cleanup = stella_e2e::TargetCleanup(target.clone());
    plane.ok(&["env", "create", "dev"]);
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/receipt"), "1");
    plane.ok(&[
        "release",
        "create",
        "r1",
        "--component",
        &image.component("web"),
    ]);
    plane.ok(&["deploy", "r1", "--env", "dev"]);

    let db = plane.db();
    let receipt = sql_string(&db, "SELECT receipt FROM jobs LIMIT 1", &[]);
    let envelope_json = sql_string(&db, "SELECT envelope FROM jobs LIMIT 1", &[]);
    let cert_pem = sql_string(
        &db,
        "SELECT cert_pem FROM agents WHERE id = $1",
        &[&agent.id],
    );
    let other_pem = sql_string(
        &db,
        "SELECT cert_pem FROM agents WHERE id = $1",
        &[&other.id],
    );
    let receipt: stella_pki::Envelope = serde_json::from_str(&receipt).expect("a stored receipt");
    let der = stella_pki::cert_der_from_pem(&cert_pem).unwrap();
    let attested = stella_pki::verify_receipt(&der, &receipt)
        .expect("receipt verifies against the agent's certificate");
    assert_eq!(attested.agent_id, agent.id);
    assert_eq!(attested.status, "succeeded");
    assert_eq!(
        attested.envelope_digest,
        stella_pki::envelope_digest(envelope_json.as_bytes()),
        "bound to the job it answers"
    );
    let other_der = stella_pki::cert_der_from_pem(&other_pem).unwrap();
    assert!(
        stella_pki::verify_receipt(&other_der, &receipt).is_err(),
        "no other agent can vouch for it"
    );
    drop(other);
}

#[test]
fn guessing_join_tokens_is_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let (good, fp) = plane.join_token();
    let server = plane.api_url();
    for i in 0..10 {
        let out = enroll_cmd(
            &tmp.path().join(format!("g{i}")),
            &server,
            &format!("stj_guess{i}"),
            &fp,
            "g",
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("join token is not valid"));
    }
    // The 11th attempt from the same address is refused before the token is even looked at,
    // so a correct guess (or a real token) does not get through either.
    let out = enroll_cmd(&tmp.path().join("real"), &server, &good, &fp, "real");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("too many failed enrollment attempts") && err.contains("HTTP 429"),
        "{err}"
    );
    assert!(!tmp.path().join("real/agent.json").exists());
    assert_eq!(
        metric(
            &plane,
            "stella_enrollment_refusals_total{reason=\"token_invalid\"}"
        ),
        Some(10.0)
    );
    assert_eq!(
        metric(
            &plane,
            "stella_enrollment_refusals_total{reason=\"rate_limited\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        plane.json(&["token", "list"])[0]["uses"],
        0,
        "the real token was not consumed"
    );
}
}
