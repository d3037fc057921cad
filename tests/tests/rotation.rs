//! Job-signing key rotation with overlap: the new key is distributed before it signs anything,
//! jobs keep flowing, waiting jobs are re-signed, and the withdrawn key is refused afterwards.

use std::time::Duration;

use serde_json::Value;
use stella_e2e::{
    Agent, Stack, TestImage, containers_of, sql_exec, sql_string, unique, wait_until,
};

fn keyid_of_job(stack: &Stack, job_id: &str) -> String {
    let env: stella_pki::Envelope = serde_json::from_str(&sql_string(
        &stack.plane.db(),
        "SELECT envelope FROM jobs WHERE id = $1",
        &[job_id],
    ))
    .unwrap();
    env.signatures[0].keyid.clone()
}

fn last_job(stack: &Stack) -> String {
    let last = stack.plane.json(&["deployments"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    stack.plane.json(&["deployments", "show", &last])["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn all_up_to_date(status: &Value) -> bool {
    status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["up_to_date"] == true)
}

#[test]
fn rotation_keeps_jobs_flowing_and_withdraws_the_old_key() {
    let mut stack = Stack::new();
    let p = &stack.plane;
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/rotate"), "1");
    let old_key = std::fs::read_to_string(p.dir.join("pki/job-signing.key")).unwrap();
    let before = p.json(&["keys", "status"]);
    let old_id = before["active_key_id"].as_str().unwrap().to_string();

    let started = p.json(&["keys", "rotate", "start"]);
    assert_eq!(started["phase"], "rotating");
    let new_id = started["next_key_id"].as_str().unwrap().to_string();
    assert_eq!(
        p.json(&["keys", "rotate", "start"])["next_key_id"],
        new_id.as_str(),
        "start is idempotent"
    );
    wait_until(
        Duration::from_secs(30),
        "the agent to acknowledge the new bundle",
        || all_up_to_date(&p.json(&["keys", "status"])).then_some(()),
    );

    // During the overlap the old key still signs.
    p.ok(&[
        "release",
        "create",
        "during",
        "--component",
        &image.component("web"),
    ]);
    p.ok(&["deploy", "during", "--env", "dev"]);
    assert_eq!(keyid_of_job(&stack, &last_job(&stack)), old_id);

    let finished = p.json(&["keys", "rotate", "finish"]);
    assert_eq!(finished["phase"], "idle");
    assert_eq!(finished["active_key_id"], new_id.as_str());
    wait_until(
        Duration::from_secs(30),
        "the agent to adopt the final bundle",
        || all_up_to_date(&p.json(&["keys", "status"])).then_some(()),
    );
    let trust: Value =
        serde_json::from_slice(&std::fs::read(stack.agent.dir.join("trust.json")).unwrap())
            .unwrap();
    let ids: Vec<&str> = trust["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![new_id.as_str()],
        "the agent trusts only the new key"
    );

    p.ok(&[
        "release",
        "create",
        "after",
        "--component",
        &image.component("web"),
    ]);
    p.ok(&["deploy", "after", "--env", "dev"]);
    assert_eq!(keyid_of_job(&stack, &last_job(&stack)), new_id);

    // A job signed with the withdrawn key (valid signature, rotated-out key) is refused.
    stack.agent.stop();
    let id = stack.agent.id.clone();
    stack.plane.wait_agent(&id, "disconnected");
    let before_containers = containers_of(&stack.target);
    let dep = stack.deploy_no_wait("forged", &[image.component("web")]);
    let job_id = dep["jobs"][0]["id"].as_str().unwrap().to_string();
    let db = stack.plane.db();
    let env: stella_pki::Envelope = serde_json::from_str(&sql_string(
        &db,
        "SELECT envelope FROM jobs WHERE id = $1",
        &[&job_id],
    ))
    .unwrap();
    let payload: stella_pki::JobPayload =
        serde_json::from_slice(&stella_pki::decode_payload(&env).unwrap()).unwrap();
    let old = stella_pki::SigningKey::from_pem(&old_key).unwrap();
    let forged = serde_json::to_string(&stella_pki::sign_job(&old, &payload).unwrap()).unwrap();
    assert_eq!(
        sql_exec(
            &db,
            "UPDATE jobs SET envelope = $1 WHERE id = $2",
            &[&forged, &job_id]
        ),
        1
    );
    stack.agent.start();
    let done = stack.plane.wait_deployment(dep["id"].as_str().unwrap());
    assert_eq!(done["jobs"][0]["status"], "refused", "{done:#}");
    assert_eq!(done["jobs"][0]["reason_code"], "unknown_key_id");
    assert_eq!(
        containers_of(&stack.target),
        before_containers,
        "nothing executed"
    );
}

#[test]
fn finishing_waits_for_lagging_agents_and_waiting_jobs_are_resigned() {
    let stack = Stack::new();
    let p = &stack.plane;
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/lag"), "1");
    // A second agent, offline through the whole rotation, with a target of its own.
    let mut sleeper = Agent::enroll(p, &stack.tmp.path().join("sleeper"), "sleeper");
    let target = unique("lag");
    let _cleanup = stella_e2e::TargetCleanup(target.clone());
    sleeper.start();
    wait_until(
        Duration::from_secs(30),
        "the sleeper to connect once",
        || (p.agent_status(&sleeper.id) == "connected").then_some(()),
    );
    p.ok(&["env", "create", "lagenv"]);
    p.ok(&[
        "target",
        "create",
        &target,
        "--env",
        "lagenv",
        "--kind",
        "docker",
        "--agent",
        &sleeper.id,
    ]);
    sleeper.stop();
    p.wait_agent(&sleeper.id, "disconnected");

    let started = p.json(&["keys", "rotate", "start"]);
    let new_id = started["next_key_id"].as_str().unwrap().to_string();
    let err = p.fails(&["keys", "rotate", "finish"]);
    assert!(
        err.contains("do not trust the new key yet")
            && err.contains(&sleeper.id)
            && err.contains("HTTP 409"),
        "{err}"
    );

    // A job waits for the sleeper, signed with the old key…
    p.ok(&[
        "release",
        "create",
        "waiting",
        "--component",
        &image.component("web"),
    ]);
    let dep = p.json(&["deploy", "waiting", "--env", "lagenv", "--no-wait"]);
    let job_id = dep["jobs"][0]["id"].as_str().unwrap().to_string();
    // …is re-signed by a forced finish, and the sleeper, back, adopts the countersigned bundle
    // and runs it.
    p.ok(&["keys", "rotate", "finish", "--force"]);
    let env: stella_pki::Envelope = serde_json::from_str(&sql_string(
        &p.db(),
        "SELECT envelope FROM jobs WHERE id = $1",
        &[&job_id],
    ))
    .unwrap();
    assert_eq!(env.signatures[0].keyid, new_id);
    sleeper.start();
    let done = p.wait_deployment(dep["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done:#}");
    wait_until(
        Duration::from_secs(30),
        "every agent on the final bundle",
        || all_up_to_date(&p.json(&["keys", "status"])).then_some(()),
    );
    let err = p.fails(&["keys", "rotate", "finish"]);
    assert!(err.contains("no key rotation is under way"), "{err}");
}
