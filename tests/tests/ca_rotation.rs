//! CA rotation in phases: the new CA joins the trust bundle pushed in-band, agents renew under it,
//! the server certificate switches, the old CA leaves. Jobs flow throughout; a certificate from
//! the old CA is refused afterwards.

use std::time::Duration;

use serde_json::Value;
use stella_e2e::{Agent, Stack, TestImage, handshake, unique, wait_until};

fn status(stack: &Stack) -> Value {
    stack.plane.json(&["ca", "status"])
}

fn all_on_newest(s: &Value) -> bool {
    s["agents"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["on_newest_ca"] == true && a["up_to_date"] == true)
}

#[test]
fn the_ca_rotates_without_interrupting_jobs() {
    let mut stack = Stack::new();
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/ca"), "1");
    let old_fp = status(&stack)["ca_fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let old_cert = std::fs::read_to_string(stack.agent.dir.join("identity/agent.pem")).unwrap();
    let old_key = std::fs::read_to_string(stack.agent.dir.join("identity/agent.key")).unwrap();

    let started = stack.plane.json(&["ca", "rotate", "start"]);
    let new_fp = started["next_ca_fingerprint"].as_str().unwrap().to_string();
    assert_ne!(new_fp, old_fp);
    // The agent learns the new CA in-band and renews under it by itself.
    wait_until(
        Duration::from_secs(60),
        "the agent to renew under the new CA",
        || all_on_newest(&status(&stack)).then_some(()),
    );
    stack.plane.ok(&[
        "release",
        "create",
        "overlap",
        "--component",
        &image.component("web"),
    ]);
    stack.plane.ok(&["deploy", "overlap", "--env", "dev"]);

    let finished = stack.plane.json(&["ca", "rotate", "finish"]);
    assert_eq!(finished["ca_fingerprint"], new_fp.as_str());
    assert!(finished["next_ca_fingerprint"].is_null());
    // The CLI (pki/ca.pem) and the API now use the new CA; new sessions too.
    stack.plane.ok(&[
        "release",
        "create",
        "after",
        "--component",
        &image.component("web"),
    ]);
    stack.plane.ok(&["deploy", "after", "--env", "dev"]);
    stack.agent.stop();
    stack.agent.start();
    let id = stack.agent.id.clone();
    wait_until(
        Duration::from_secs(30),
        "the agent to reconnect to the new server certificate",
        || (stack.plane.agent_status(&id) == "connected").then_some(()),
    );
    let ca_on_agent = std::fs::read_to_string(stack.agent.dir.join("identity/ca.pem")).unwrap();
    assert_eq!(
        stella_pki::fingerprint_pem(&ca_on_agent).unwrap(),
        new_fp,
        "the old CA left the agent's trust"
    );
    assert_eq!(ca_on_agent.matches("BEGIN CERTIFICATE").count(), 1);

    // The agent's certificate from before the rotation no longer opens anything.
    assert!(
        !handshake(&stack.plane, &old_cert, &old_key),
        "an old-CA certificate is refused"
    );
    // New enrollments pin the new CA.
    let token = stack.plane.json(&["token", "create", "--ttl", "10m"]);
    assert_eq!(token["ca_fingerprint"], new_fp.as_str());
    let fresh = Agent::enroll_and_start(&stack.plane, &stack.tmp.path().join("fresh"), "fresh");
    assert_eq!(stack.plane.agent_status(&fresh.id), "connected");
}

#[test]
fn finishing_a_ca_rotation_waits_for_agents_still_on_the_old_ca() {
    let mut stack = Stack::new();
    stack.agent.stop();
    let id = stack.agent.id.clone();
    stack.plane.wait_agent(&id, "disconnected");
    stack.plane.ok(&["ca", "rotate", "start"]);
    let err = stack.plane.fails(&["ca", "rotate", "finish"]);
    assert!(
        err.contains("old CA") && err.contains(&id) && err.contains("HTTP 409"),
        "{err}"
    );
    // It comes back, renews under the new CA, and then the rotation can finish.
    stack.agent.start();
    wait_until(
        Duration::from_secs(60),
        "the agent to renew under the new CA",
        || all_on_newest(&status(&stack)).then_some(()),
    );
    stack.plane.ok(&["ca", "rotate", "finish"]);
    let err = stack.plane.fails(&["ca", "rotate", "finish"]);
    assert!(err.contains("no CA rotation is under way"), "{err}");
}
